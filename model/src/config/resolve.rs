//! From the raw `config.json` structs to the resolved config: transformers' defaults
//! (`VipLlavaConfig`, `LlamaConfig`, `CLIPVisionConfig`), the dialect choices, and the
//! checks, each error naming its field.

use super::raw::{FeatureLayerKey, RawClipVisionConfig, RawLlamaConfig, RawRope, RawVipLlavaConfig};
use super::{
    Activation, ClipVisionConfig, ConfigError, DEFAULT_VISION_FEATURE_LAYERS, FeatureLayerSource,
    LlamaConfig, RopeScaling, VipLlavaConfig,
};

/// A positive integer field, `default` when absent.
fn positive(field: &str, value: Option<i64>, default: i64) -> Result<usize, ConfigError> {
    let value = value.unwrap_or(default);
    usize::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| ConfigError::NotPositive {
            field: field.to_string(),
            value,
        })
}

/// A positive integer field without a default.
fn opt_positive(field: &str, value: Option<i64>) -> Result<Option<usize>, ConfigError> {
    value.map(|v| positive(field, Some(v), v)).transpose()
}

/// A positive finite float field, `default` when absent.
fn positive_float(field: &str, value: Option<f64>, default: f64) -> Result<f64, ConfigError> {
    let value = value.unwrap_or(default);
    if !(value.is_finite() && value > 0.0) {
        return Err(ConfigError::BadFloat {
            field: field.to_string(),
            value,
        });
    }
    Ok(value)
}

impl RawVipLlavaConfig {
    /// The resolved config (model_type already checked).
    pub(super) fn resolve(self) -> Result<VipLlavaConfig, ConfigError> {
        let vision = match self.vision_config {
            Some(raw) => raw.0.resolve()?,
            None => ClipVisionConfig::vipllava_default(),
        };
        let text = match self.text_config {
            Some(raw) => raw.0.resolve(self.tie_word_embeddings)?,
            None => RawLlamaConfig::default().resolve(self.tie_word_embeddings)?,
        };

        let image_token_index = match (self.image_token_index, &self.image_token_id) {
            (Some(index), _) => index.unwrap_or(32000),
            (None, Some(id)) => id
                .valid()
                .ok_or_else(|| ConfigError::Json("`image_token_id` must be an integer".to_string()))?,
            (None, None) => 32000,
        };
        if image_token_index < 0 || image_token_index as u64 >= text.vocab_size as u64 {
            return Err(ConfigError::ImageTokenOutOfVocab {
                image_token_index,
                vocab_size: text.vocab_size,
            });
        }

        let (vision_feature_layers, source) = match (self.vision_feature_layers, self.vision_feature_layer) {
            (Some(list), _) => (list, FeatureLayerSource::PluralKey),
            (None, Some(FeatureLayerKey::List(list))) => (list, FeatureLayerSource::SingularList),
            (None, Some(FeatureLayerKey::Scalar(scalar))) => (
                DEFAULT_VISION_FEATURE_LAYERS.to_vec(),
                FeatureLayerSource::StrayScalar(scalar),
            ),
            (None, Some(FeatureLayerKey::Invalid(_))) => {
                return Err(ConfigError::Json(
                    "`vision_feature_layer` must be an integer or a list of integers".to_string(),
                ));
            }
            (None, None) => (
                DEFAULT_VISION_FEATURE_LAYERS.to_vec(),
                FeatureLayerSource::Default,
            ),
        };
        let vision_feature_select_strategy = match self.vision_feature_select_strategy {
            None => Default::default(),
            Some(value) => value
                .parse()
                .map_err(|_| ConfigError::UnknownFeatureSelectStrategy { value })?,
        };
        let config = VipLlavaConfig {
            vision,
            text,
            image_token_index: image_token_index as usize,
            pad_token_id: self.pad_token_id.and_then(|p| p.valid()),
            projector_hidden_act: Activation::parse(
                "projector_hidden_act",
                self.projector_hidden_act.as_deref().unwrap_or("gelu"),
            )?,
            projector_layernorm_eps: positive_float(
                "projector_layernorm_eps",
                self.projector_layernorm_eps,
                1e-5,
            )?,
            vision_feature_layers,
            vision_feature_layers_source: source,
            vision_feature_select_strategy,
            declared_dtype: self.dtype.or(self.torch_dtype),
        };
        config.check_feature_layers()?;
        Ok(config)
    }
}

impl RawClipVisionConfig {
    /// `vision_config` with `CLIPVisionConfig` defaults.
    fn resolve(self) -> Result<ClipVisionConfig, ConfigError> {
        let config = ClipVisionConfig {
            hidden_size: positive("vision_config.hidden_size", self.hidden_size, 768)?,
            intermediate_size: positive("vision_config.intermediate_size", self.intermediate_size, 3072)?,
            num_hidden_layers: positive("vision_config.num_hidden_layers", self.num_hidden_layers, 12)?,
            num_attention_heads: positive("vision_config.num_attention_heads", self.num_attention_heads, 12)?,
            num_channels: positive("vision_config.num_channels", self.num_channels, 3)?,
            image_size: positive("vision_config.image_size", self.image_size, 224)?,
            patch_size: positive("vision_config.patch_size", self.patch_size, 32)?,
            hidden_act: Activation::parse(
                "vision_config.hidden_act",
                self.hidden_act.as_deref().unwrap_or("quick_gelu"),
            )?,
            layer_norm_eps: positive_float("vision_config.layer_norm_eps", self.layer_norm_eps, 1e-5)?,
        };
        if !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(ConfigError::HeadsDoNotDivide {
                field: "vision_config.hidden_size".into(),
                hidden: config.hidden_size,
                heads: config.num_attention_heads,
            });
        }
        if config.patch_size > config.image_size {
            return Err(ConfigError::Json(format!(
                "vision_config.patch_size {} is larger than image_size {}",
                config.patch_size, config.image_size
            )));
        }
        Ok(config)
    }
}

impl RawLlamaConfig {
    /// `text_config` with `LlamaConfig` defaults; `top_tie` is the top-level
    /// `tie_word_embeddings`, which wins when set.
    fn resolve(self, top_tie: Option<bool>) -> Result<LlamaConfig, ConfigError> {
        let hidden_size = positive("text_config.hidden_size", self.hidden_size, 4096)?;
        let num_attention_heads = positive("text_config.num_attention_heads", self.num_attention_heads, 32)?;
        let num_key_value_heads = opt_positive("text_config.num_key_value_heads", self.num_key_value_heads)?
            .unwrap_or(num_attention_heads);
        let head_dim = match opt_positive("text_config.head_dim", self.head_dim)? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
            None => {
                return Err(ConfigError::HeadsDoNotDivide {
                    field: "text_config.hidden_size".into(),
                    hidden: hidden_size,
                    heads: num_attention_heads,
                });
            }
        };
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(ConfigError::KvHeadsDoNotDivide {
                heads: num_attention_heads,
                kv_heads: num_key_value_heads,
            });
        }
        let max_position_embeddings = positive(
            "text_config.max_position_embeddings",
            self.max_position_embeddings,
            2048,
        )?;
        let theta = positive_float("text_config.rope_theta", self.rope_theta, 10000.0)?;
        let (rope_theta, rope_scaling) = match (self.rope_parameters, self.rope_scaling) {
            (Some(p), _) => {
                let theta = positive_float("text_config.rope_parameters.rope_theta", p.0.rope_theta, theta)?;
                (
                    theta,
                    p.0.resolve("text_config.rope_parameters", max_position_embeddings)?,
                )
            }
            (None, Some(s)) => (
                theta,
                s.0.resolve("text_config.rope_scaling", max_position_embeddings)?,
            ),
            (None, None) => (theta, RopeScaling::None),
        };
        Ok(LlamaConfig {
            vocab_size: positive("text_config.vocab_size", self.vocab_size, 32000)?,
            hidden_size,
            intermediate_size: positive("text_config.intermediate_size", self.intermediate_size, 11008)?,
            num_hidden_layers: positive("text_config.num_hidden_layers", self.num_hidden_layers, 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act: Activation::parse(
                "text_config.hidden_act",
                self.hidden_act.as_deref().unwrap_or("silu"),
            )?,
            max_position_embeddings,
            rms_norm_eps: positive_float("text_config.rms_norm_eps", self.rms_norm_eps, 1e-6)?,
            rope_theta,
            rope_scaling,
            attention_bias: self.attention_bias.unwrap_or(false),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            tie_word_embeddings: top_tie.or(self.tie_word_embeddings).unwrap_or(false),
        })
    }
}

impl RawRope {
    /// The scaling rule of a RoPE section at `path` (its type key is `rope_type` or, in
    /// older files, `type`).
    fn resolve(self, path: &str, max_position_embeddings: usize) -> Result<RopeScaling, ConfigError> {
        let rope_type = self
            .rope_type
            .or(self.legacy_type)
            .unwrap_or_else(|| "default".to_string());
        // Present `null` reads as 1.0; absent is an error.
        let required = |name: &str, value: Option<Option<f64>>| -> Result<f64, ConfigError> {
            let value = value.ok_or_else(|| ConfigError::MissingRopeParameter {
                rope_type: rope_type.clone(),
                field: name.to_string(),
            })?;
            positive_float(&format!("{path}.{name}"), value, 1.0)
        };
        Ok(match rope_type.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor", self.factor)?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: required("factor", self.factor)?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor", self.factor)?,
                low_freq_factor: required("low_freq_factor", self.low_freq_factor)?,
                high_freq_factor: required("high_freq_factor", self.high_freq_factor)?,
                original_max_position_embeddings: opt_positive(
                    &format!("{path}.original_max_position_embeddings"),
                    self.original_max_position_embeddings,
                )?
                .unwrap_or(max_position_embeddings),
            },
            other => {
                return Err(ConfigError::UnknownRopeType {
                    value: other.to_string(),
                });
            }
        })
    }
}
