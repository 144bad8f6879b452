//! Multi-turn conversations about one set of images that keep the KV cache: a follow-up
//! question feeds only the tokens that are new since the last turn, so neither the image
//! nor the earlier turns are recomputed.

use image::DynamicImage;
use vipllava_model::KvCache;
use vipllava_processor::ChatMessage;
use vipllava_processor::image::{ImageMode, PixelValues};

use crate::generation::{Generation, GenerationOptions};
use crate::pipeline::{Pipeline, PipelineError, Prompt};

/// A chat about images, rendered turn by turn with the checkpoint's chat template.
pub struct Conversation<'p> {
    pipeline: &'p Pipeline,
    images: Vec<DynamicImage>,
    /// The images preprocessed once, on the first turn.
    pixel_values: Option<Vec<PixelValues>>,
    messages: Vec<ChatMessage>,
    cache: KvCache,
    /// Token ids whose keys and values are in `cache`.
    fed: Vec<u32>,
    /// Ids up to the end of the last image token (a reused prefix must cover them).
    image_end: usize,
    /// Positions recomputed by the last turn (for reporting and tests).
    last_fed: usize,
    /// Crop or pad; `None`: the pipeline's mode.
    image_mode: Option<ImageMode>,
}

impl<'p> Conversation<'p> {
    /// Starts a conversation about `images` (their `<image>` tags go into the first user
    /// message).
    pub fn new(pipeline: &'p Pipeline, images: Vec<DynamicImage>) -> Self {
        Self {
            pipeline,
            images,
            pixel_values: None,
            messages: Vec::new(),
            cache: KvCache::new(),
            fed: Vec::new(),
            image_end: 0,
            last_fed: 0,
            image_mode: None,
        }
    }

    /// Preprocesses the images in `mode` (crop or pad) instead of the pipeline's mode.
    pub fn with_image_mode(mut self, mode: ImageMode) -> Self {
        self.image_mode = Some(mode);
        self.pixel_values = None;
        self
    }

    /// Messages so far.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Forgets the turns and the cache; keeps the images.
    pub fn reset(&mut self) {
        self.messages.clear();
        self.cache.clear();
        self.fed.clear();
        self.image_end = 0;
    }

    /// Appends a finished exchange without generating (e.g. to replay a transcript); the
    /// cache catches up on the next question.
    pub fn push_exchange(&mut self, question: &str, answer: &str) {
        self.messages.push(self.user_message(question));
        self.messages.push(ChatMessage::text("assistant", answer));
    }

    /// Number of token positions the last turn had to compute (the rest came from the
    /// cache).
    pub fn last_turn_new_tokens(&self) -> usize {
        self.last_fed
    }

    fn user_message(&self, question: &str) -> ChatMessage {
        let images = if self.messages.is_empty() {
            self.images.len()
        } else {
            0
        };
        ChatMessage::user_with_images(images, question)
    }

    /// Renders the conversation plus `question`, brings the cache up to date and returns
    /// the last position's logits and the prompt ids.
    fn advance(&mut self, question: &str) -> Result<(Vec<f32>, Vec<u32>), PipelineError> {
        if question.trim().is_empty() {
            return Err(PipelineError::EmptyPrompt);
        }
        let mut messages = self.messages.clone();
        messages.push(self.user_message(question));
        if self.pixel_values.is_none() {
            let mode = self.image_mode.unwrap_or(self.pipeline.image_mode());
            self.pixel_values = Some(self.pipeline.preprocess_images_in_mode(&self.images, mode)?);
        }
        let pixel_values = self.pixel_values.clone().unwrap_or_default();
        let prepared = self
            .pipeline
            .prepare_preprocessed(pixel_values, &Prompt::Messages(messages))?;
        let ids = prepared.input_ids;
        // Reuse the longest cached prefix, keeping at least one token to feed, and never
        // cutting into the image tokens (their features need the pixels).
        let mut common = self.fed.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        common = common.min(ids.len() - 1);
        if common < self.image_end {
            common = 0;
        }
        self.cache.truncate(common);
        let pixels: &[PixelValues] = if common == 0 { &prepared.pixel_values } else { &[] };
        let logits = self
            .pipeline
            .extend_cache(&ids[common..], pixels, &mut self.cache)?;
        let image_token = self.pipeline.config().image_token_index as u32;
        self.image_end = ids.iter().rposition(|&i| i == image_token).map_or(0, |p| p + 1);
        self.fed = ids.clone();
        self.last_fed = ids.len() - common;
        Ok((logits, ids))
    }

    /// Logits of the next token after `question` is asked, without answering (the
    /// question is not kept).
    pub fn logits_after(&mut self, question: &str) -> Result<Vec<f32>, PipelineError> {
        self.advance(question).map(|(logits, _)| logits)
    }

    /// Asks `question`, streams the answer to `on_text`, and records both turns.
    pub fn ask(
        &mut self,
        question: &str,
        options: &GenerationOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, PipelineError> {
        self.ask_until(question, options, on_text, &|| false)
    }

    /// [`Conversation::ask`] that stops early, with
    /// [`StopReason::Cancelled`](crate::StopReason::Cancelled), once `cancelled()` returns
    /// true; the partial answer is recorded as the assistant's turn.
    pub fn ask_until(
        &mut self,
        question: &str,
        options: &GenerationOptions,
        mut on_text: impl FnMut(&str),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generation, PipelineError> {
        options.validate()?;
        let start = std::time::Instant::now();
        let (logits, ids) = self.advance(question)?;
        self.pipeline.check_context(ids.len(), options.max_new_tokens)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let generation = self.pipeline.continue_from_cache_until(
            logits,
            ids.clone(),
            &mut self.cache,
            options,
            prefill_ms,
            &mut on_text,
            cancelled,
        )?;
        // The cache now holds the prompt and every generated token but the last.
        let mut fed = ids;
        fed.extend(
            generation
                .token_ids
                .iter()
                .take(generation.token_ids.len().saturating_sub(1)),
        );
        self.fed = fed;
        self.messages.push(self.user_message(question));
        self.messages
            .push(ChatMessage::text("assistant", generation.text.clone()));
        Ok(generation)
    }
}
