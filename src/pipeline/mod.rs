//! The end-to-end pipeline: load a model directory (weights, tokenizer, chat template,
//! processor settings, generation defaults), turn images and a question into model inputs
//! exactly as transformers' processor does ([`prepare`](Pipeline::prepare)), prefill once
//! with the pixels, then decode with the KV cache while streaming text (the decode loop
//! lives in [`crate::generation`]).

mod error;
mod prepare;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use vipllava_convert::{LoadOptions, load_model};
use vipllava_model::{ForwardInput, KvCache, LogitsMode, VipLlava, VipLlavaConfig};
use vipllava_processor::image::{ImageMode, ImageProcessorConfig, PixelValues};
use vipllava_processor::{ChatTemplate, ImageTokenConfig, TextError, TextTokenizer, VisionInput};

pub use error::PipelineError;
pub use prepare::{PreparedInput, Prompt};

// The options file only: the decode loop (`generation::decode`) builds on the pipeline,
// never the other way round.
use crate::generation::options::GenerationOptions;

/// How to load a pipeline: the weights' precision and quantization, and how non-square
/// images reach the square model input. Settled at load so every later call agrees.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Precision and quantization of the weights.
    pub load: LoadOptions,
    /// Crop (transformers, default) or pad (ViP-LLaVA training) for non-square images.
    pub image_mode: ImageMode,
}

impl PipelineOptions {
    /// These options with another image mode.
    pub fn with_image_mode(mut self, image_mode: ImageMode) -> Self {
        self.image_mode = image_mode;
        self
    }
}

impl From<LoadOptions> for PipelineOptions {
    fn from(load: LoadOptions) -> Self {
        Self {
            load,
            image_mode: ImageMode::default(),
        }
    }
}

impl From<&LoadOptions> for PipelineOptions {
    fn from(load: &LoadOptions) -> Self {
        load.clone().into()
    }
}

/// A loaded model with everything needed to answer questions about images.
#[derive(Debug)]
pub struct Pipeline {
    model: VipLlava,
    config: VipLlavaConfig,
    tokenizer: TextTokenizer,
    chat_template: Option<ChatTemplate>,
    image_config: ImageProcessorConfig,
    image_tokens: ImageTokenConfig,
    image_mode: ImageMode,
    generation_defaults: GenerationOptions,
    device: Device,
    dir: PathBuf,
    load_ms: f64,
}

impl Pipeline {
    /// Loads a HF model directory (or a burnpack directory that also holds the tokenizer
    /// and processor files), in crop mode; see [`Pipeline::load_with`] for pad mode.
    pub fn load(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Self, PipelineError> {
        Self::load_with(dir, device, &PipelineOptions::from(options))
    }

    /// [`Pipeline::load`] with every pipeline option (the image mode besides the weights').
    pub fn load_with(dir: &Path, device: &Device, options: &PipelineOptions) -> Result<Self, PipelineError> {
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
        let loaded = load_model(dir, device, &options.load)?;
        let image_tokens = ImageTokenConfig::from_model_dir(
            dir,
            loaded.config.vision.patch_size,
            loaded.config.vision_feature_select_strategy.as_str(),
        )?;
        let pipeline = Self {
            model: loaded.model,
            config: loaded.config,
            tokenizer,
            chat_template,
            image_config,
            image_tokens,
            image_mode: options.image_mode,
            generation_defaults,
            device: device.clone(),
            dir: dir.to_path_buf(),
            load_ms: 0.0,
        };
        pipeline.check_image_size()?;
        Ok(Self {
            load_ms: start.elapsed().as_secs_f64() * 1000.0,
            ..pipeline
        })
    }

    /// The model.
    pub fn model(&self) -> &VipLlava {
        &self.model
    }

    /// The model, to replace or transform its weights (e.g. after fine-tuning).
    pub fn model_mut(&mut self) -> &mut VipLlava {
        &mut self.model
    }

    /// The resolved model config.
    pub fn config(&self) -> &VipLlavaConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The checkpoint's chat template, when it ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Image preprocessing settings.
    pub fn image_config(&self) -> &ImageProcessorConfig {
        &self.image_config
    }

    /// `<image>` expansion settings.
    pub fn image_tokens(&self) -> &ImageTokenConfig {
        &self.image_tokens
    }

    /// Crop or pad, as given at load.
    pub fn image_mode(&self) -> ImageMode {
        self.image_mode
    }

    /// Generation defaults from `generation_config.json`.
    pub fn generation_defaults(&self) -> &GenerationOptions {
        &self.generation_defaults
    }

    /// Where the tensors live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Milliseconds spent in [`Pipeline::load`].
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// The id fed to padded and finished rows: the tokenizer's pad token, else the
    /// config's, else 0.
    pub fn pad_token_id(&self) -> u32 {
        self.tokenizer
            .pad_token_id
            .or(self.config.pad_token_id.and_then(|p| u32::try_from(p).ok()))
            .unwrap_or(0)
    }

    /// The processor's `<image>` expansion must equal the vision tower's feature count,
    /// checked once here instead of on every prompt.
    fn check_image_size(&self) -> Result<(), PipelineError> {
        if !self.image_config.do_center_crop {
            // The processed size then depends on each image; `prepare` checks it.
            return Ok(());
        }
        let crop = self.image_config.crop_size;
        self.image_tokens
            .checked_seq_len(crop.height as usize, crop.width as usize, self.vision_input())?;
        Ok(())
    }

    /// What the vision tower takes and yields per image.
    pub(crate) fn vision_input(&self) -> VisionInput {
        VisionInput {
            image_size: self.config.vision.image_size,
            features: self.config.image_seq_len(),
        }
    }

    /// Runs the prefill and returns the last position's logits and the filled cache.
    pub fn prefill(&self, input: &PreparedInput) -> Result<(Vec<f32>, KvCache), PipelineError> {
        let mut cache = KvCache::new();
        let logits = self.extend_cache(&input.input_ids, &input.pixel_values, &mut cache)?;
        Ok((logits, cache))
    }

    /// Feeds `ids` (one unpadded sequence) after what `cache` already holds and returns the
    /// last position's logits. `pixel_values` must hold one entry per image whose tokens
    /// are among `ids` (empty when the images are already in the cache). This is the
    /// primitive a multi-turn conversation is built on.
    pub fn extend_cache(
        &self,
        ids: &[u32],
        pixel_values: &[PixelValues],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, PipelineError> {
        let forward = self.forward_input(&[ids])?.with_logits(LogitsMode::LastOnly);
        let forward = match self.pixel_tensor(pixel_values) {
            Some(pixels) => forward.with_pixels(pixels),
            None => forward,
        };
        let logits = self.model.forward(forward, cache)?;
        let mut rows = logit_rows(logits)?;
        rows.pop().ok_or(PipelineError::NoRequest)
    }

    /// A forward input for `rows` of ids of equal length, uploaded to the device and kept
    /// on the host (so the model never reads ids back from the device).
    pub(crate) fn forward_input(&self, rows: &[&[u32]]) -> Result<ForwardInput, PipelineError> {
        let ids: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&i| i as i64)).collect();
        Ok(ForwardInput::from_ids(ids, rows.len(), &self.device)?)
    }

    /// `[images, 3, H, W]` pixels on the device; `None` without images.
    pub fn pixel_tensor<'a>(
        &self,
        pixel_values: impl IntoIterator<Item = &'a PixelValues>,
    ) -> Option<Tensor<4>> {
        let pixel_values: Vec<&PixelValues> = pixel_values.into_iter().collect();
        let first = pixel_values.first()?;
        let mut data = Vec::with_capacity(first.data.len() * pixel_values.len());
        for p in &pixel_values {
            data.extend_from_slice(&p.data);
        }
        let shape = [pixel_values.len(), first.channels, first.height, first.width];
        Some(Tensor::from_data(TensorData::new(data, shape), &self.device))
    }
}

/// `[batch, 1, vocab]` logits as one host vector per row (one read-back from the device).
pub fn logit_rows(logits: Tensor<3>) -> Result<Vec<Vec<f32>>, PipelineError> {
    let [_, _, v] = logits.dims();
    let flat = logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| PipelineError::ReadBack {
            what: "logits",
            reason: format!("{e:?}"),
        })?;
    Ok(flat.chunks(v.max(1)).map(<[f32]>::to_vec).collect())
}
