//! The image-processor settings of a checkpoint (`CLIPImageProcessor` JSON).

use std::path::Path;

use serde_json::Value;

mod raw;

use raw::RawImageProcessorConfig;

use super::{ImageError, Resample};

/// OpenAI CLIP's normalisation mean (`OPENAI_CLIP_MEAN`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's normalisation standard deviation (`OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Target size of the resize step (transformers' size dictionary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// `{"shortest_edge": s}`: the short side becomes `s`, the long side
    /// `int(s * long / short)`; with `longest_edge` the long side is capped first
    /// (`get_size_with_aspect_ratio`).
    ShortestEdge {
        /// Target length of the short side.
        shortest_edge: u32,
        /// Optional cap on the long side.
        longest_edge: Option<u32>,
    },
    /// `{"height": h, "width": w}`: resize to exactly this size.
    Exact {
        /// Output height.
        height: u32,
        /// Output width.
        width: u32,
    },
    /// `{"max_height": h, "max_width": w}`: scale (up or down) to fit inside, keeping the
    /// aspect ratio.
    MaxHeightWidth {
        /// Maximum output height.
        max_height: u32,
        /// Maximum output width.
        max_width: u32,
    },
}

/// A `{"height", "width"}` size (crop and pad sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeightWidth {
    /// Height in pixels.
    pub height: u32,
    /// Width in pixels.
    pub width: u32,
}

/// Settings of transformers' `CLIPImageProcessor` (PIL backend), with its defaults for
/// every field a JSON file leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Convert to RGB (composite transparency on white) first.
    pub do_convert_rgb: bool,
    /// Resize to `size`.
    pub do_resize: bool,
    /// Resize target.
    pub size: Size,
    /// Resampling filter of the resize.
    pub resample: Resample,
    /// Center-crop to `crop_size` (zero-padding when the image is smaller).
    pub do_center_crop: bool,
    /// Center-crop size.
    pub crop_size: HeightWidth,
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Rescale factor, applied in `f64` then rounded to `f32` as transformers does.
    pub rescale_factor: f64,
    /// Normalise with `image_mean` / `image_std` (in `f32`).
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    pub image_std: [f32; 3],
    /// Zero-pad the normalised image at the bottom and right to `pad_size`.
    pub do_pad: bool,
    /// Pad target (required when `do_pad`).
    pub pad_size: Option<HeightWidth>,
}

impl Default for ImageProcessorConfig {
    /// `CLIPImageProcessor()`'s defaults: shortest edge 224, bicubic, center crop 224,
    /// rescale 1/255, OpenAI CLIP mean/std.
    fn default() -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            size: Size::ShortestEdge {
                shortest_edge: 224,
                longest_edge: None,
            },
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: HeightWidth {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
            do_pad: false,
            pad_size: None,
        }
    }
}

/// Which file a model directory's image-processor settings came from.
const PROCESSOR_CONFIG: &str = "processor_config.json";
const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

impl ImageProcessorConfig {
    /// The settings of the ViP-LLaVA checkpoints (CLIP ViT-L/14-336): shortest edge 336,
    /// center crop 336, otherwise CLIP defaults.
    pub fn clip_336() -> Self {
        Self {
            size: Size::ShortestEdge {
                shortest_edge: 336,
                longest_edge: None,
            },
            crop_size: HeightWidth {
                height: 336,
                width: 336,
            },
            ..Self::default()
        }
    }

    /// Load from a model directory the way transformers 5.x does: the `"image_processor"`
    /// object nested in `processor_config.json` (what 5.x `save_pretrained` writes) takes
    /// precedence, otherwise `preprocessor_config.json` (hub files from 4.x).
    pub fn from_model_dir(dir: &Path) -> Result<Self, ImageError> {
        let processor_path = dir.join(PROCESSOR_CONFIG);
        if processor_path.is_file() {
            let value = read_json(&processor_path)?;
            if let Some(nested) = value.get("image_processor") {
                return Self::from_value(nested)
                    .map_err(|e| e.in_file(&processor_path.display().to_string()));
            }
        }
        let path = dir.join(PREPROCESSOR_CONFIG);
        if !path.is_file() {
            return Err(ImageError::ConfigMissing {
                dir: dir.to_path_buf(),
            });
        }
        let value = read_json(&path)?;
        Self::from_value(&value).map_err(|e| e.in_file(&path.display().to_string()))
    }

    /// Parse an image-processor JSON object (the content of `preprocessor_config.json`);
    /// a processor JSON with a nested `"image_processor"` object is accepted too.
    pub fn from_json_str(json: &str) -> Result<Self, ImageError> {
        let value: Value = serde_json::from_str(json).map_err(|e| ImageError::ConfigJson {
            path: "<string>".into(),
            message: e.to_string(),
        })?;
        match value.get("image_processor") {
            Some(nested) if nested.is_object() => Self::from_value(nested),
            _ => Self::from_value(&value),
        }
    }

    /// Parse an image-processor JSON value. Absent or `null` fields take the
    /// `CLIPImageProcessor` defaults (as transformers' `_set_attributes` does).
    pub fn from_value(value: &Value) -> Result<Self, ImageError> {
        if !value.is_object() {
            return Err(invalid("(root)", "expected a JSON object"));
        }
        let raw: RawImageProcessorConfig =
            crate::json::from_value(value).map_err(|e| invalid(&e.path, &e.message))?;
        raw.resolve()
    }

    /// Check the values transformers would reject or that would make the output
    /// meaningless (zero sizes, non-finite or zero std, missing pad size).
    pub fn validate(&self) -> Result<(), ImageError> {
        let positive = |v: u32, name: &str| {
            if v == 0 {
                Err(invalid(name, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
        match self.size {
            Size::ShortestEdge {
                shortest_edge,
                longest_edge,
            } => {
                positive(shortest_edge, "size.shortest_edge")?;
                if let Some(l) = longest_edge {
                    positive(l, "size.longest_edge")?;
                }
            }
            Size::Exact { height, width } => {
                positive(height, "size.height")?;
                positive(width, "size.width")?;
            }
            Size::MaxHeightWidth {
                max_height,
                max_width,
            } => {
                positive(max_height, "size.max_height")?;
                positive(max_width, "size.max_width")?;
            }
        }
        positive(self.crop_size.height, "crop_size.height")?;
        positive(self.crop_size.width, "crop_size.width")?;
        if let Some(p) = self.pad_size {
            positive(p.height, "pad_size.height")?;
            positive(p.width, "pad_size.width")?;
        }
        if self.do_pad && self.pad_size.is_none() {
            return Err(invalid("pad_size", "must be given when do_pad is true"));
        }
        if !self.rescale_factor.is_finite() {
            return Err(invalid(
                "rescale_factor",
                &format!("{} is not finite", self.rescale_factor),
            ));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(invalid(
                "image_mean",
                &format!("{:?} has a non-finite value", self.image_mean),
            ));
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(invalid(
                "image_std",
                &format!("{:?} must be finite and non-zero", self.image_std),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &str, message: &str) -> ImageError {
    ImageError::InvalidConfig {
        file: None,
        field: field.to_string(),
        message: message.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Value, ImageError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ImageError::ConfigJson {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}
