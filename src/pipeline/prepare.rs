//! Images and a question -> model inputs, exactly as transformers' `LlavaProcessor`: the
//! chat template, image preprocessing (crop or pad), `<image>` expansion, tokenization,
//! and the context-length check.

use image::DynamicImage;
use vipllava_model::RopeScaling;
use vipllava_processor::image::{ImageMode, PixelValues, preprocess_with_mode};
use vipllava_processor::{ChatMessage, TextError};

use super::{Pipeline, PipelineError};

/// What the user asks.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// The user's question; wrapped with the images into one user message by the chat
    /// template, with the generation prompt appended.
    User(String),
    /// A pre-formatted prompt containing `<image>` tags (no template applied).
    Raw(String),
    /// A whole conversation, rendered by the chat template with the generation prompt.
    Messages(Vec<ChatMessage>),
}

/// Model inputs as the processor makes them.
#[derive(Debug, Clone)]
pub struct PreparedInput {
    /// The prompt after the chat template, before `<image>` expansion.
    pub prompt_text: String,
    /// Token ids after expansion (BOS included).
    pub input_ids: Vec<u32>,
    /// One entry per image.
    pub pixel_values: Vec<PixelValues>,
}

impl Pipeline {
    /// The prompt text after the chat template (before `<image>` expansion).
    pub fn render_prompt(&self, num_images: usize, prompt: &Prompt) -> Result<String, PipelineError> {
        let template = || {
            self.chat_template
                .as_ref()
                .ok_or_else(|| TextError::NoChatTemplate {
                    dir: self.dir.clone(),
                })
        };
        Ok(match prompt {
            Prompt::User(q) => {
                if q.trim().is_empty() {
                    return Err(PipelineError::EmptyPrompt);
                }
                template()?.render(&[ChatMessage::user_with_images(num_images, q.clone())], true)?
            }
            Prompt::Raw(s) => {
                if num_images > 0 && !s.contains(&self.image_tokens.image_token) {
                    return Err(PipelineError::RawPromptWithoutImage(
                        self.image_tokens.image_token.clone(),
                    ));
                }
                s.clone()
            }
            Prompt::Messages(m) => template()?.render(m, true)?,
        })
    }

    /// Prompt + new tokens must fit `max_position_embeddings` (dynamic NTK rope is made to
    /// extend past it, so it is exempt).
    pub fn check_context(&self, prompt: usize, max_new_tokens: usize) -> Result<(), PipelineError> {
        let max = self.config.text.max_position_embeddings;
        let dynamic = matches!(self.config.text.rope_scaling, RopeScaling::Dynamic { .. });
        if !dynamic && prompt.saturating_add(max_new_tokens) > max {
            return Err(PipelineError::ContextTooLong {
                prompt,
                max_new_tokens,
                max,
            });
        }
        Ok(())
    }

    /// Preprocesses images (in the pipeline's image mode) and tokenizes the prompt as
    /// transformers' `LlavaProcessor`. Visual prompts are drawn on the images first with
    /// `vipllava_processor::visual_prompt::draw`, which returns the image type taken here.
    pub fn prepare(&self, images: &[DynamicImage], prompt: &Prompt) -> Result<PreparedInput, PipelineError> {
        self.prepare_in_mode(images, prompt, self.image_mode)
    }

    /// [`Pipeline::prepare`] with another image mode for this call only (a server request
    /// may ask for pad mode on one image).
    pub fn prepare_in_mode(
        &self,
        images: &[DynamicImage],
        prompt: &Prompt,
        mode: ImageMode,
    ) -> Result<PreparedInput, PipelineError> {
        let pixel_values = self.preprocess_images_in_mode(images, mode)?;
        self.prepare_preprocessed(pixel_values, prompt)
    }

    /// Preprocesses images as the model receives them (crop or pad per the image mode).
    pub fn preprocess_images(&self, images: &[DynamicImage]) -> Result<Vec<PixelValues>, PipelineError> {
        self.preprocess_images_in_mode(images, self.image_mode)
    }

    /// [`Pipeline::preprocess_images`] in a given mode (crop or pad).
    pub fn preprocess_images_in_mode(
        &self,
        images: &[DynamicImage],
        mode: ImageMode,
    ) -> Result<Vec<PixelValues>, PipelineError> {
        images
            .iter()
            .map(|img| Ok(preprocess_with_mode(img, &self.image_config, mode)?))
            .collect()
    }

    /// [`Pipeline::prepare`] for images already preprocessed (e.g. once per conversation).
    pub fn prepare_preprocessed(
        &self,
        pixel_values: Vec<PixelValues>,
        prompt: &Prompt,
    ) -> Result<PreparedInput, PipelineError> {
        let prompt_text = self.render_prompt(pixel_values.len(), prompt)?;
        let seq_len = match pixel_values.first() {
            Some(p) => self
                .image_tokens
                .checked_seq_len(p.height, p.width, self.vision_input())?,
            None => 0,
        };
        let expanded = self
            .image_tokens
            .expand(&prompt_text, pixel_values.len(), seq_len)?;
        let input_ids = self.tokenizer.encode(&expanded, true)?;
        Ok(PreparedInput {
            prompt_text,
            input_ids,
            pixel_values,
        })
    }
}
