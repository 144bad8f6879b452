//! Typed settings: what is remembered between runs (eframe persistence) and what the
//! command line may set at start.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vipllava::generation::GenerationOptions;
use vipllava::processor::visual_prompt::Colour;
use vipllava::{DeviceSpec, Precision, Quantization};

use crate::marks::Tool;

/// Which model to open, where, and in which precision (the CLI's `--model`, `--device`,
/// `--dtype`, `--quantize`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSettings {
    /// A local directory or a hub id.
    pub model: String,
    /// `cpu`, `wgpu`, `vulkan`, `metal` (those compiled in).
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// `none`, `q8` or `q4`.
    pub quantize: String,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            model: String::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            quantize: "none".into(),
        }
    }
}

/// A bad model setting, said in the window.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// No model given.
    #[error("choose a model directory or type a hub id such as llava-hf/vip-llava-7b-hf")]
    NoModel,
    /// Unknown dtype.
    #[error("dtype {0:?}: expected f32, f16 or bf16")]
    Dtype(String),
    /// Unknown quantization.
    #[error("quantize {0:?}: expected none, q8 or q4")]
    Quantize(String),
    /// Unknown or not compiled device.
    #[error("{0}")]
    Device(String),
}

impl ModelSettings {
    /// Checks the settings and turns them into load options.
    pub fn load_options(&self) -> Result<vipllava::LoadOptions, SettingsError> {
        if self.model.trim().is_empty() {
            return Err(SettingsError::NoModel);
        }
        let precision: Precision = self
            .dtype
            .parse()
            .map_err(|_| SettingsError::Dtype(self.dtype.clone()))?;
        let quantize = match self.quantize.as_str() {
            "" | "none" => None,
            q => Some(
                q.parse::<Quantization>()
                    .map_err(|_| SettingsError::Quantize(q.to_string()))?,
            ),
        };
        let spec: DeviceSpec = self
            .device
            .parse()
            .map_err(|e: vipllava::DeviceError| SettingsError::Device(e.to_string()))?;
        if !spec.is_compiled() {
            return Err(SettingsError::Device(format!(
                "device {} needs the app built with `--features {}`",
                self.device,
                spec.feature().unwrap_or("?")
            )));
        }
        Ok(vipllava::LoadOptions {
            precision,
            quantize,
            quantize_lm_head: None,
        })
    }
}

/// The devices this build can run the model on.
pub fn compiled_devices() -> Vec<&'static str> {
    ["cpu", "wgpu", "vulkan", "metal"]
        .into_iter()
        .filter(|d| d.parse::<DeviceSpec>().is_ok_and(|s| s.is_compiled()))
        .collect()
}

/// How answers are generated (the side panel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Sample (`false`: greedy, the same tokens as `vipllava generate` by default).
    pub sample: bool,
    /// Softmax temperature when sampling.
    pub temperature: f32,
    /// Nucleus mass when sampling.
    pub top_p: f32,
    /// Answer length limit.
    pub max_new_tokens: usize,
    /// Sampler seed.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            sample: false,
            temperature: 0.7,
            top_p: 0.9,
            max_new_tokens: 256,
            seed: 0,
        }
    }
}

impl Sampling {
    /// The checkpoint's defaults with these settings over them.
    pub fn options(&self, defaults: &GenerationOptions) -> GenerationOptions {
        let mut options = defaults.clone();
        options.max_new_tokens = self.max_new_tokens;
        options.do_sample = self.sample;
        if self.sample {
            options.temperature = self.temperature;
            options.top_p = self.top_p;
            options.seed = self.seed;
        }
        options
    }
}

/// Everything remembered between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The last model opened.
    pub model: ModelSettings,
    /// Sampling.
    pub sampling: Sampling,
    /// Pad instead of crop.
    pub pad: bool,
    /// The drawing tool.
    pub tool: Tool,
    /// The colour of new marks.
    pub colour: [u8; 3],
    /// `--alpha` (0: the default, 128 strokes / 88 masks).
    pub alpha: u8,
    /// `--line-width` (0: the default for the image size).
    pub line_width: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: ModelSettings::default(),
            sampling: Sampling::default(),
            pad: false,
            tool: Tool::Box,
            colour: [255, 0, 0],
            alpha: 0,
            line_width: 0.0,
        }
    }
}

impl Settings {
    /// The colour of new marks.
    pub fn colour(&self) -> Colour {
        Colour::new(self.colour[0], self.colour[1], self.colour[2])
    }

    /// `--alpha`, if set.
    pub fn alpha(&self) -> Option<u8> {
        (self.alpha > 0).then_some(self.alpha)
    }

    /// `--line-width`, if set.
    pub fn line_width(&self) -> Option<f32> {
        (self.line_width > 0.0).then_some(self.line_width)
    }
}

/// What the command line asks for at start (`vipllava-app --model M --image I`).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Open this model (directory or hub id) at start.
    pub model: Option<String>,
    /// Device for it.
    pub device: Option<String>,
    /// Dtype for it.
    pub dtype: Option<String>,
    /// Quantization for it.
    pub quantize: Option<String>,
    /// Open this image at start.
    pub image: Option<PathBuf>,
}
