//! HuggingFace `config.json` dialects for VipLlava, resolved into one internal config.
//!
//! Two dialects exist in the wild and both load:
//! - files written by transformers 4.x (the hub checkpoints): `rope_theta` and
//!   `rope_scaling` inside `text_config`, `torch_dtype`, plural `vision_feature_layers`;
//!   the 7B hub file instead carries a stray LLaVA key `"vision_feature_layer": -2`;
//! - files written by transformers 5.x: `rope_parameters`, `dtype`, and a singular
//!   `vision_feature_layer` holding the list.
//!
//! Parsing is two explicit steps: serde reads the file into the raw structs of `raw.rs`
//! (every key of both dialects, nothing defaulted), and `resolve.rs` applies
//! transformers' defaults (`LlamaConfig`, `CLIPVisionConfig`, `VipLlavaConfig`; the hub
//! 7B config relies on them), picks between the dialects' spellings and checks the
//! values. Every error names the field path.

mod error;
mod raw;
mod resolve;
mod resolved;
#[cfg(test)]
mod tests;
mod types;

use serde_json::Value;

pub use error::ConfigError;
pub use resolved::{ClipVisionConfig, LlamaConfig, VipLlavaConfig};
pub use types::{
    Activation, FeatureLayerSource, FeatureSelectStrategy, RopeScaling, UnknownFeatureSelectStrategy,
};

use raw::{Object, RawHeader, RawVipLlavaConfig};

/// The VipLlava default for `vision_feature_layers` (transformers' `VipLlavaConfig`).
pub const DEFAULT_VISION_FEATURE_LAYERS: [i64; 5] = [-2, -5, -8, -11, 6];

/// Deserializes `T` from `value`, a wrong type reported with the path of its field.
fn deserialize<'de, T: serde::Deserialize<'de>>(value: &'de Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::Json(if path == "." {
            inner.to_string()
        } else {
            format!("`{path}`: {inner}")
        })
    })
}

impl VipLlavaConfig {
    /// Parses `config.json` text in either dialect.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_json_value(&value)
    }

    /// Resolves a parsed `config.json`.
    pub fn from_json_value(value: &Value) -> Result<Self, ConfigError> {
        let Object(header) = deserialize::<Object<RawHeader>>(value)?;
        match header.model_type.as_deref() {
            Some("vipllava") => {}
            found => {
                return Err(ConfigError::WrongModelType {
                    found: found.unwrap_or("<missing>").to_string(),
                });
            }
        }
        deserialize::<RawVipLlavaConfig>(value)?.resolve()
    }
}
