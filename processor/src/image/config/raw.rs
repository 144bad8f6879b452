//! The JSON form of a `CLIPImageProcessor` config, as serde reads it, and its
//! [`resolve`](RawImageProcessorConfig::resolve) into an [`ImageProcessorConfig`].
//!
//! One struct serves every dialect: hub 4.x `preprocessor_config.json` holds these fields at
//! its top level, 5.x `processor_config.json` nests the same object under
//! `"image_processor"` (the caller picks the object). Absent and `null` fields take
//! `CLIPImageProcessor`'s defaults; unknown fields are ignored, as transformers'
//! `_set_attributes` does. Fields whose JSON type varies (`size` may be an int, a list or
//! a dict) are kept as untagged enums and checked in `resolve`, with the same messages
//! as before the serde port.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Number, Value};

use super::{HeightWidth, ImageProcessorConfig, Size, invalid};
use crate::image::{ImageError, Resample};
use crate::json::LenientString;

/// `size`: an int (shortest edge, or a square with `default_to_square`), a list
/// (`[h, w]` or `[s]`) or a dict of edges.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Number(Number),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
    Other(Value),
}

/// `crop_size` / `pad_size`: an int (square), `[h, w]`, or `{"height", "width"}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHeightWidth {
    Number(Number),
    Map(BTreeMap<String, Value>),
    Other(Value),
}

/// `image_mean` / `image_std`: one number for all channels, or one per channel.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawChannels {
    Number(f64),
    List(Vec<Value>),
    Other(Value),
}

/// `resample`: a PIL filter code.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawResample {
    Code(i64),
    Other(serde::de::IgnoredAny),
}

/// `CLIPImageProcessor`'s JSON fields, every one optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawImageProcessorConfig {
    image_processor_type: Option<LenientString>,
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    size: Option<RawSize>,
    default_to_square: Option<bool>,
    use_square_size: Option<bool>,
    resample: Option<RawResample>,
    do_center_crop: Option<bool>,
    crop_size: Option<RawHeightWidth>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<RawChannels>,
    image_std: Option<RawChannels>,
    do_pad: Option<bool>,
    pad_size: Option<RawHeightWidth>,
}

impl RawImageProcessorConfig {
    /// Apply `CLIPImageProcessor`'s defaults and interpretation rules, then
    /// [`ImageProcessorConfig::validate`].
    pub(super) fn resolve(self) -> Result<ImageProcessorConfig, ImageError> {
        if let Some(kind) = self.image_processor_type.as_ref().and_then(LenientString::as_str) {
            let base = kind.trim_end_matches("Pil").trim_end_matches("Fast");
            if base != "CLIPImageProcessor" {
                return Err(invalid(
                    "image_processor_type",
                    &format!("{kind:?} is not supported (only CLIPImageProcessor)"),
                ));
            }
        }
        let d = ImageProcessorConfig::default();
        let default_to_square = self.default_to_square.unwrap_or(false);
        let mut size = match self.size {
            None => d.size,
            Some(v) => resolve_size(v, default_to_square)?,
        };
        // CLIPImageProcessor.__init__ (KOSMOS-2 compatibility) squares the *class default*
        // shortest edge, whatever `size` says.
        if self.use_square_size.unwrap_or(false) {
            size = Size::Exact {
                height: 224,
                width: 224,
            };
        }
        let crop_size = match self.crop_size {
            None => d.crop_size,
            Some(v) => resolve_height_width(v, "crop_size")?,
        };
        let pad_size = self
            .pad_size
            .map(|v| resolve_height_width(v, "pad_size"))
            .transpose()?;
        let resample = match self.resample {
            None => d.resample,
            Some(RawResample::Other(_)) => {
                return Err(invalid("resample", "expected a PIL resampling code 0..=5"));
            }
            Some(RawResample::Code(code)) => Resample::from_pil_code(code).ok_or_else(|| {
                invalid(
                    "resample",
                    &format!("{code} is not a PIL resampling filter (0..=5)"),
                )
            })?,
        };
        let cfg = ImageProcessorConfig {
            do_convert_rgb: self.do_convert_rgb.unwrap_or(d.do_convert_rgb),
            do_resize: self.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: self.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            do_rescale: self.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: self.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: self.do_normalize.unwrap_or(d.do_normalize),
            image_mean: resolve_channels(self.image_mean, "image_mean")?.unwrap_or(d.image_mean),
            image_std: resolve_channels(self.image_std, "image_std")?.unwrap_or(d.image_std),
            do_pad: self.do_pad.unwrap_or(false),
            pad_size,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A pixel count: a non-negative integer that fits `u32`.
fn as_size(v: &Number, name: &str) -> Result<u32, ImageError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(name, &format!("expected a non-negative integer, got {v}")))
}

/// [`as_size`] for a dict value or list item, which may hold any JSON.
fn value_as_size(v: &Value, name: &str) -> Result<u32, ImageError> {
    match v {
        Value::Number(n) => as_size(n, name),
        other => Err(invalid(
            name,
            &format!("expected a non-negative integer, got {other}"),
        )),
    }
}

/// transformers' `get_size_dict` for `size` (an int means shortest edge for CLIP, whose
/// `default_to_square` is false).
fn resolve_size(v: RawSize, default_to_square: bool) -> Result<Size, ImageError> {
    match v {
        RawSize::Number(n) => {
            let s = as_size(&n, "size")?;
            Ok(if default_to_square {
                Size::Exact { height: s, width: s }
            } else {
                Size::ShortestEdge {
                    shortest_edge: s,
                    longest_edge: None,
                }
            })
        }
        RawSize::List(list) => match list.as_slice() {
            [h, w] => Ok(Size::Exact {
                height: value_as_size(h, "size[0]")?,
                width: value_as_size(w, "size[1]")?,
            }),
            // `[s]` means `s`, whatever `s` is (transformers unpacks one-item lists).
            [s] => resolve_size(
                RawSize::deserialize(s).unwrap_or_else(|_| RawSize::Other(s.clone())),
                default_to_square,
            ),
            _ => Err(invalid("size", "a list must hold 1 or 2 integers")),
        },
        RawSize::Map(map) => resolve_size_dict(&map),
        RawSize::Other(v) => Err(invalid("size", &format!("unsupported value {v}"))),
    }
}

/// A `size` dict: its non-null keys select the resize rule.
fn resolve_size_dict(map: &BTreeMap<String, Value>) -> Result<Size, ImageError> {
    // Keys holding null are treated as absent.
    let keys: Vec<&str> = map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k.as_str())
        .collect();
    let get = |k: &str| match map.get(k) {
        Some(v) => value_as_size(v, &format!("size.{k}")),
        None => Err(invalid("size", &format!("no key {k:?}"))),
    };
    match keys.as_slice() {
        ["shortest_edge"] => Ok(Size::ShortestEdge {
            shortest_edge: get("shortest_edge")?,
            longest_edge: None,
        }),
        ["longest_edge", "shortest_edge"] => Ok(Size::ShortestEdge {
            shortest_edge: get("shortest_edge")?,
            longest_edge: Some(get("longest_edge")?),
        }),
        ["height", "width"] => Ok(Size::Exact {
            height: get("height")?,
            width: get("width")?,
        }),
        ["max_height", "max_width"] => Ok(Size::MaxHeightWidth {
            max_height: get("max_height")?,
            max_width: get("max_width")?,
        }),
        _ => Err(invalid(
            "size",
            &format!(
                "keys {keys:?} are not supported by the PIL backend's resize; expected shortest_edge \
                 (+ longest_edge), height + width, or max_height + max_width"
            ),
        )),
    }
}

/// `crop_size` / `pad_size`: an int is a square; a list is `[height, width]`.
fn resolve_height_width(v: RawHeightWidth, name: &str) -> Result<HeightWidth, ImageError> {
    match v {
        RawHeightWidth::Number(n) => {
            let s = as_size(&n, name)?;
            Ok(HeightWidth { height: s, width: s })
        }
        RawHeightWidth::Other(Value::Array(list)) if list.len() == 2 => Ok(HeightWidth {
            height: value_as_size(&list[0], name)?,
            width: value_as_size(&list[1], name)?,
        }),
        RawHeightWidth::Map(map) => {
            let field = |k: &str| map.get(k).filter(|v| !v.is_null());
            let present = map.values().filter(|v| !v.is_null()).count();
            match (field("height"), field("width"), present) {
                (Some(h), Some(w), 2) => Ok(HeightWidth {
                    height: value_as_size(h, &format!("{name}.height"))?,
                    width: value_as_size(w, &format!("{name}.width"))?,
                }),
                _ => Err(invalid(
                    name,
                    &format!(
                        "expected {{\"height\", \"width\"}}, got {}",
                        Value::Object(map.into_iter().collect())
                    ),
                )),
            }
        }
        RawHeightWidth::Other(v) => Err(invalid(name, &format!("unsupported value {v}"))),
    }
}

/// `image_mean` / `image_std`: one number for all channels or three numbers. JSON doubles
/// are rounded to `f32` as `np.array(mean, dtype=np.float32)` does.
fn resolve_channels(v: Option<RawChannels>, key: &str) -> Result<Option<[f32; 3]>, ImageError> {
    match v {
        None => Ok(None),
        Some(RawChannels::Number(x)) => Ok(Some([x as f32; 3])),
        Some(RawChannels::List(list)) => {
            let nums: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
            match nums.as_deref() {
                Some([a, b, c]) => Ok(Some([*a as f32, *b as f32, *c as f32])),
                _ => Err(invalid(
                    key,
                    &format!(
                        "expected 3 numbers (one per RGB channel), got {}",
                        Value::Array(list)
                    ),
                )),
            }
        }
        Some(RawChannels::Other(v)) => Err(invalid(key, &format!("expected a number or 3 numbers, got {v}"))),
    }
}
