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
use vipllava_processor::image::{
    ImageError, ImageMode, ImageProcessorConfig, PixelValues, preprocess_with_mode,
};
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
    /// The device could not be opened.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
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
    /// Prompt plus requested tokens exceed the model's context.
    #[error(
        "the prompt has {prompt} tokens and up to {max_new_tokens} new tokens were requested, beyond the model's {max} positions (max_position_embeddings); shorten the prompt or lower --max-new-tokens"
    )]
    ContextTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_new_tokens: usize,
        /// The model's limit.
        max: usize,
    },
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
    /// Crop (transformers, default) or pad (ViP-LLaVA training) for non-square images.
    pub image_mode: ImageMode,
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
        // The small files first: a missing tokenizer should not cost a 14 GB read.
        let tokenizer = TextTokenizer::from_model_dir(dir)?;
        let chat_template = match ChatTemplate::from_model_dir(dir) {
            Ok(t) => Some(t),
            Err(TextError::NoChatTemplate { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let image_config = ImageProcessorConfig::from_model_dir(dir)?;
        let generation_defaults = GenerationOptions::from_model_dir(dir, tokenizer.eos_token_id)?;
        let loaded = load_model(dir, device, options)?;
        let image_tokens = ImageTokenConfig::from_model_dir(
            dir,
            loaded.config.vision.patch_size,
            loaded.config.vision_feature_select_strategy.as_str(),
        )?;
        Ok(Self {
            model: loaded.model,
            config: loaded.config,
            tokenizer,
            chat_template,
            image_config,
            image_tokens,
            image_mode: ImageMode::Crop,
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

    /// Prompt + new tokens must fit `max_position_embeddings` (dynamic NTK rope is made to
    /// extend past it, so it is exempt).
    pub fn check_context(&self, prompt: usize, max_new_tokens: usize) -> Result<(), PipelineError> {
        let max = self.config.text.max_position_embeddings;
        let dynamic = matches!(
            self.config.text.rope_scaling,
            vipllava_model::RopeScaling::Dynamic { .. }
        );
        if !dynamic && prompt.saturating_add(max_new_tokens) > max {
            return Err(PipelineError::ContextTooLong {
                prompt,
                max_new_tokens,
                max,
            });
        }
        Ok(())
    }

    /// Preprocesses images and tokenizes the prompt as transformers' `LlavaProcessor`.
    pub fn prepare(
        &self,
        images: &[image::DynamicImage],
        prompt: &Prompt,
    ) -> Result<PreparedInput, PipelineError> {
        let pixel_values = self.preprocess_images(images)?;
        self.prepare_preprocessed(pixel_values, prompt)
    }

    /// Preprocesses images as the model receives them (crop or pad per `image_mode`).
    pub fn preprocess_images(
        &self,
        images: &[image::DynamicImage],
    ) -> Result<Vec<PixelValues>, PipelineError> {
        images
            .iter()
            .map(|img| Ok(preprocess_with_mode(img, &self.image_config, self.image_mode)?))
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

    fn tensors(&self, input: &PreparedInput) -> (Tensor<2, Int>, Option<Tensor<4>>) {
        let ids: Vec<i64> = input.input_ids.iter().map(|&i| i as i64).collect();
        let n = ids.len();
        let ids = Tensor::from_data(TensorData::new(ids, [1, n]), &self.device);
        let pixels: Vec<&PixelValues> = input.pixel_values.iter().collect();
        (ids, pixel_tensor(&pixels, &self.device))
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
        let mut out = self.generate_batch(&[(input.clone(), options.clone())], |_, t| on_text(t))?;
        out.pop()
            .ok_or_else(|| PipelineError::Forward(ForwardError::BadInput("no generation".into())))
    }

    /// Generates answers for several requests in one forward pass per step: prompts are
    /// left-padded (as transformers recommends for VipLlava), the padding mask is honoured
    /// in every layer, position ids are `cumsum(mask) - 1`, each row stops on its own (a
    /// finished row is fed padding and its output ends at its EOS), and the KV cache is
    /// shared. `on_text(row, text)` receives each row's streamed text.
    pub fn generate_batch(
        &self,
        requests: &[(PreparedInput, GenerationOptions)],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Generation>, PipelineError> {
        let mut on_text = |i: usize, t: &str| on_text(i, t);
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        for (input, options) in requests {
            options.validate()?;
            self.check_context(input.input_ids.len(), options.max_new_tokens)?;
        }
        let start = Instant::now();
        let batch = requests.len();
        let longest = requests.iter().map(|(r, _)| r.input_ids.len()).max().unwrap_or(0);
        let pad = self
            .tokenizer
            .pad_token_id
            .or(self.config.pad_token_id.and_then(|p| u32::try_from(p).ok()))
            .unwrap_or(0);
        let padded = requests.iter().any(|(r, _)| r.input_ids.len() != longest);
        let mut ids = Vec::with_capacity(batch * longest);
        let mut mask: Vec<Vec<bool>> = Vec::with_capacity(batch);
        let mut positions: Vec<Vec<i64>> = Vec::with_capacity(batch);
        for (r, _) in requests {
            let n_pad = longest - r.input_ids.len();
            ids.extend(std::iter::repeat_n(pad as i64, n_pad));
            ids.extend(r.input_ids.iter().map(|&i| i as i64));
            mask.push((0..longest).map(|j| j >= n_pad).collect());
            // transformers: cumsum(mask) - 1, padding positions filled with 1.
            positions.push(
                (0..longest)
                    .map(|j| if j < n_pad { 1 } else { (j - n_pad) as i64 })
                    .collect(),
            );
        }
        let pixel_values: Vec<&PixelValues> =
            requests.iter().flat_map(|(r, _)| r.pixel_values.iter()).collect();
        let pixels = pixel_tensor(&pixel_values, &self.device);
        let input_ids = Tensor::from_data(TensorData::new(ids.clone(), [batch, longest]), &self.device);
        let mut cache = KvCache::new();
        let forward = ForwardInput {
            input_ids,
            host_ids: Some(ids),
            pixel_values: pixels,
            positions: Some(positions.clone()),
            key_mask: padded.then(|| mask.clone()),
            logits: LogitsMode::LastOnly,
        };
        let logits = rows(self.model.forward(forward, &mut cache)?)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let histories = requests.iter().map(|(r, _)| r.input_ids.clone()).collect();
        let options: Vec<GenerationOptions> = requests.iter().map(|(_, o)| o.clone()).collect();
        let state = DecodeState {
            logits,
            positions,
            mask: padded.then_some(mask),
            histories,
            pad,
            prefill_ms,
        };
        self.decode(state, &options, &mut cache, &mut on_text)
    }

    /// Continues a single, unpadded sequence whose prompt `ids` are already in `cache`,
    /// from the last position's `logits`.
    pub(crate) fn continue_generation(
        &self,
        logits: Vec<f32>,
        ids: Vec<u32>,
        cache: &mut KvCache,
        options: &GenerationOptions,
        prefill_ms: f64,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, PipelineError> {
        let last = ids.len().saturating_sub(1) as i64;
        let state = DecodeState {
            logits: vec![logits],
            positions: vec![vec![last]],
            mask: None,
            histories: vec![ids],
            pad: self.tokenizer.pad_token_id.unwrap_or(0),
            prefill_ms,
        };
        let mut out = self.decode(state, std::slice::from_ref(options), cache, &mut |_, t| {
            on_text(t)
        })?;
        out.pop()
            .ok_or_else(|| PipelineError::Forward(ForwardError::BadInput("no generation".into())))
    }

    /// The decode loop shared by batched generation and conversations: picks a token per
    /// row from `state.logits`, feeds them back with the cache, stops rows individually.
    fn decode(
        &self,
        state: DecodeState,
        options: &[GenerationOptions],
        cache: &mut KvCache,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generation>, PipelineError> {
        let DecodeState {
            mut logits,
            mut positions,
            mut mask,
            histories,
            pad,
            prefill_ms,
        } = state;
        let batch = options.len();
        let prompt_tokens: Vec<usize> = histories.iter().map(Vec::len).collect();
        let decode_start = Instant::now();

        struct Row {
            selector: TokenSelector,
            history: Vec<u32>,
            generated: Vec<u32>,
            stream: StreamDecoder,
            stop: Option<StopReason>,
            searched: usize,
        }
        let mut state: Vec<Row> = options
            .iter()
            .zip(histories)
            .map(|(o, history)| Row {
                selector: TokenSelector::new(o.clone()),
                history,
                generated: Vec::new(),
                stream: StreamDecoder::new(),
                stop: (o.max_new_tokens == 0).then_some(StopReason::MaxNewTokens),
                searched: 0,
            })
            .collect();
        let mut decoded = 0usize;
        loop {
            let mut next_ids = Vec::with_capacity(batch);
            for (i, row) in state.iter_mut().enumerate() {
                if row.stop.is_some() {
                    next_ids.push(pad);
                    continue;
                }
                let options = &options[i];
                let next = row.selector.select(&mut logits[i], &row.history);
                row.generated.push(next);
                row.history.push(next);
                next_ids.push(next);
                if let Some(text) = row.stream.push(&self.tokenizer, next)? {
                    on_text(i, &text);
                }
                if options.eos_token_ids.contains(&next) {
                    row.stop = Some(StopReason::Eos);
                } else if !options.stop_strings.is_empty() && {
                    let text = row.stream.text();
                    let from = floor_char_boundary(text, row.searched.saturating_sub(64));
                    row.searched = text.len();
                    options
                        .stop_strings
                        .iter()
                        .any(|s| text[from..].contains(s.as_str()))
                } {
                    row.stop = Some(StopReason::StopString);
                } else if row.generated.len() >= options.max_new_tokens {
                    row.stop = Some(StopReason::MaxNewTokens);
                }
            }
            if state.iter().all(|r| r.stop.is_some()) {
                break;
            }
            for row in positions.iter_mut() {
                let last = row.last().copied().unwrap_or(0);
                *row = vec![last + 1];
            }
            for m in mask.iter_mut().flatten() {
                m.push(true);
            }
            decoded += state.iter().filter(|r| r.stop.is_none()).count();
            let ids: Vec<i64> = next_ids.iter().map(|&i| i as i64).collect();
            let forward = ForwardInput {
                input_ids: Tensor::from_data(TensorData::new(ids.clone(), [batch, 1]), &self.device),
                host_ids: Some(ids),
                pixel_values: None,
                positions: Some(positions.clone()),
                key_mask: mask.clone(),
                logits: LogitsMode::LastOnly,
            };
            logits = rows(self.model.forward(forward, cache)?)?;
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        state
            .into_iter()
            .enumerate()
            .map(|(i, mut row)| {
                if let Some(rest) = row.stream.finish() {
                    on_text(i, &rest);
                }
                Ok(Generation {
                    text: self.tokenizer.decode(&row.generated, true)?,
                    token_ids: row.generated,
                    stop_reason: row.stop.unwrap_or(StopReason::MaxNewTokens),
                    prompt_tokens: prompt_tokens[i],
                    prefill_ms,
                    decode_tokens_per_s: if decode_s > 0.0 && decoded > 0 {
                        decoded as f64 / decode_s
                    } else {
                        0.0
                    },
                })
            })
            .collect()
    }
}

/// Where the decode loop starts: last-position logits per row and the inputs' layout.
struct DecodeState {
    logits: Vec<Vec<f32>>,
    positions: Vec<Vec<i64>>,
    mask: Option<Vec<Vec<bool>>>,
    histories: Vec<Vec<u32>>,
    pad: u32,
    prefill_ms: f64,
}

pub(crate) fn pixel_tensor(pixel_values: &[&PixelValues], device: &Device) -> Option<Tensor<4>> {
    let first = pixel_values.first()?;
    let mut data = Vec::with_capacity(first.data.len() * pixel_values.len());
    for p in pixel_values {
        data.extend_from_slice(&p.data);
    }
    let shape = [pixel_values.len(), first.channels, first.height, first.width];
    Some(Tensor::from_data(TensorData::new(data, shape), device))
}

/// `[batch, 1, vocab]` logits as one host vector per row.
pub(crate) fn rows(logits: Tensor<3>) -> Result<Vec<Vec<f32>>, PipelineError> {
    let [b, _, v] = logits.dims();
    let flat = to_vec(logits.reshape([1, 1, b * v]))?;
    Ok(flat.chunks(v.max(1)).map(<[f32]>::to_vec).collect())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

pub(crate) fn to_vec(logits: Tensor<3>) -> Result<Vec<f32>, PipelineError> {
    let [_, _, v] = logits.dims();
    logits
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| PipelineError::Forward(ForwardError::BadInput(format!("reading logits: {e:?}"))))
}
