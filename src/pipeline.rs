//! The end-to-end pipeline: load a model directory (weights, tokenizer, chat template,
//! processor settings, generation defaults), turn an image and a question into model
//! inputs exactly as transformers' processor does, prefill once with the pixels, then
//! decode with the KV cache while streaming text.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;
use vipllava_convert::{ConvertError, LoadOptions, load_model};
use vipllava_model::{ForwardError, ForwardInput, KvCache, LogitsMode, VipLlava, VipLlavaConfig};
use vipllava_processor::image::{ImageError, ImageProcessorConfig, PixelValues, preprocess};
use vipllava_processor::{ChatMessage, ChatTemplate, ImageTokenConfig, TextError, TextTokenizer};

use crate::generate::{GenerationConfigError, GenerationOptions, StreamDecoder, TokenSelector};

/// Anything that can go wrong between a model directory and generated text.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Loading the checkpoint.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// Tokenizer, template or prompt.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Image decoding or preprocessing.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The forward pass rejected its inputs.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// Generation settings.
    #[error(transparent)]
    Generation(#[from] GenerationConfigError),
    /// The processor's image size and the vision tower disagree.
    #[error(
        "the processor produces {processor} image tokens per image ({height}x{width} px) but the vision tower yields {model} features"
    )]
    ImageSizeMismatch {
        /// Tokens per image from the processor settings.
        processor: usize,
        /// Features per image from the model.
        model: usize,
        /// Processed height.
        height: usize,
        /// Processed width.
        width: usize,
    },
    /// A prompt with images must hold the image tag.
    #[error("the raw prompt must contain `{0}` once per image")]
    RawPromptWithoutImage(String),
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

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

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// `max_new_tokens` reached.
    MaxNewTokens,
    /// A stop string appeared.
    StopString,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated ids (prompt excluded; EOS included when generated, as transformers).
    pub token_ids: Vec<u32>,
    /// Decoded text (special tokens skipped).
    pub text: String,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Prompt length in tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Prefill wall time (image encoding included).
    pub prefill_ms: f64,
    /// Decode speed over the tokens after the first.
    pub decode_tokens_per_s: f64,
}

/// A loaded model with everything needed to answer questions about images.
#[derive(Debug)]
pub struct Pipeline {
    /// The model.
    pub model: VipLlava,
    /// Its resolved config.
    pub config: VipLlavaConfig,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The chat template, when the checkpoint ships one.
    pub chat_template: Option<ChatTemplate>,
    /// Image preprocessing settings.
    pub image_config: ImageProcessorConfig,
    /// `<image>` expansion settings.
    pub image_tokens: ImageTokenConfig,
    /// Generation defaults from `generation_config.json`.
    pub generation_defaults: GenerationOptions,
    /// Where tensors live.
    pub device: Device,
    /// Model directory.
    pub dir: PathBuf,
    /// Time spent loading.
    pub load_ms: f64,
}

impl Pipeline {
    /// Loads a HF model directory (or a burnpack directory that also holds the tokenizer
    /// and processor files).
    pub fn load(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Self, PipelineError> {
        let start = Instant::now();
        let loaded = load_model(dir, device, options)?;
        let tokenizer = TextTokenizer::from_model_dir(dir)?;
        let chat_template = match ChatTemplate::from_model_dir(dir) {
            Ok(t) => Some(t),
            Err(TextError::NoChatTemplate { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let image_config = ImageProcessorConfig::from_model_dir(dir)?;
        let image_tokens = ImageTokenConfig::from_model_dir(
            dir,
            loaded.config.vision.patch_size,
            &loaded.config.vision_feature_select_strategy,
        )?;
        let generation_defaults = GenerationOptions::from_model_dir(dir, tokenizer.eos_token_id)?;
        Ok(Self {
            model: loaded.model,
            config: loaded.config,
            tokenizer,
            chat_template,
            image_config,
            image_tokens,
            generation_defaults,
            device: device.clone(),
            dir: dir.to_path_buf(),
            load_ms: start.elapsed().as_secs_f64() * 1000.0,
        })
    }

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

    /// Preprocesses images and tokenizes the prompt as transformers' `LlavaProcessor`.
    pub fn prepare(
        &self,
        images: &[image::DynamicImage],
        prompt: &Prompt,
    ) -> Result<PreparedInput, PipelineError> {
        let prompt_text = self.render_prompt(images.len(), prompt)?;
        let pixel_values = images
            .iter()
            .map(|img| preprocess(img, &self.image_config))
            .collect::<Result<Vec<_>, _>>()?;
        let seq_len = match pixel_values.first() {
            Some(p) => {
                let n = self.image_tokens.image_seq_len(p.height, p.width);
                let model = self.config.vision.num_patches();
                if n != model
                    || p.height != self.config.vision.image_size
                    || p.width != self.config.vision.image_size
                {
                    return Err(PipelineError::ImageSizeMismatch {
                        processor: n,
                        model,
                        height: p.height,
                        width: p.width,
                    });
                }
                n
            }
            None => 0,
        };
        let expanded = self.image_tokens.expand(&prompt_text, images.len(), seq_len)?;
        let input_ids = self.tokenizer.encode(&expanded, true)?;
        Ok(PreparedInput {
            prompt_text,
            input_ids,
            pixel_values,
        })
    }

    fn tensors(&self, input: &PreparedInput) -> (Tensor<2, Int>, Option<Tensor<4>>) {
        let ids: Vec<i64> = input.input_ids.iter().map(|&i| i as i64).collect();
        let n = ids.len();
        let ids = Tensor::from_data(TensorData::new(ids, [1, n]), &self.device);
        let pixels = input.pixel_values.first().map(|first| {
            let mut data = Vec::with_capacity(first.data.len() * input.pixel_values.len());
            for p in &input.pixel_values {
                data.extend_from_slice(&p.data);
            }
            let shape = [
                input.pixel_values.len(),
                first.channels,
                first.height,
                first.width,
            ];
            Tensor::from_data(TensorData::new(data, shape), &self.device)
        });
        (ids, pixels)
    }

    /// Runs the prefill and returns the last position's logits and the filled cache.
    pub fn prefill(&self, input: &PreparedInput) -> Result<(Vec<f32>, KvCache), PipelineError> {
        let (ids, pixels) = self.tensors(input);
        let mut cache = KvCache::new();
        let mut forward = ForwardInput::new(ids).with_logits(LogitsMode::LastOnly);
        forward.pixel_values = pixels;
        let logits = self.model.forward(forward, &mut cache)?;
        Ok((to_vec(logits)?, cache))
    }

    /// Generates an answer, calling `on_text` with each new piece of text.
    pub fn generate(
        &self,
        input: &PreparedInput,
        options: &GenerationOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, PipelineError> {
        options.validate()?;
        let start = Instant::now();
        let (mut logits, mut cache) = self.prefill(input)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let decode_start = Instant::now();
        let mut selector = TokenSelector::new(options.clone());
        let mut history = input.input_ids.clone();
        let mut generated = Vec::new();
        let mut stream = StreamDecoder::new();
        let mut stop_reason = StopReason::MaxNewTokens;
        let mut searched = 0usize;
        while generated.len() < options.max_new_tokens {
            let next = selector.select(&mut logits, &history);
            generated.push(next);
            history.push(next);
            if let Some(text) = stream.push(&self.tokenizer, next)? {
                on_text(&text);
            }
            if options.eos_token_ids.contains(&next) {
                stop_reason = StopReason::Eos;
                break;
            }
            if !options.stop_strings.is_empty() {
                let text = stream.text();
                let from = floor_char_boundary(text, searched.saturating_sub(64));
                if options
                    .stop_strings
                    .iter()
                    .any(|s| text[from..].contains(s.as_str()))
                {
                    stop_reason = StopReason::StopString;
                    break;
                }
                searched = text.len();
            }
            if generated.len() == options.max_new_tokens {
                break;
            }
            let ids = Tensor::from_data(TensorData::new(vec![next as i64], [1, 1]), &self.device);
            let out = self.model.forward(
                ForwardInput::new(ids).with_logits(LogitsMode::LastOnly),
                &mut cache,
            )?;
            logits = to_vec(out)?;
        }
        if let Some(rest) = stream.finish() {
            on_text(&rest);
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        let decoded = generated.len().saturating_sub(1);
        Ok(Generation {
            text: self.tokenizer.decode(&generated, true)?,
            token_ids: generated,
            stop_reason,
            prompt_tokens: input.input_ids.len(),
            prefill_ms,
            decode_tokens_per_s: if decode_s > 0.0 && decoded > 0 {
                decoded as f64 / decode_s
            } else {
                0.0
            },
        })
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn to_vec(logits: Tensor<3>) -> Result<Vec<f32>, PipelineError> {
    let [_, _, v] = logits.dims();
    logits
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| PipelineError::Forward(ForwardError::BadInput(format!("reading logits: {e:?}"))))
}
