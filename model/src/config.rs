//! HuggingFace `config.json` dialects for VipLlava, resolved into one internal config.
//!
//! Two dialects exist in the wild and both load:
//! - files written by transformers 4.x (the hub checkpoints): `rope_theta` and
//!   `rope_scaling` inside `text_config`, `torch_dtype`, plural `vision_feature_layers`;
//!   the 7B hub file instead carries a stray LLaVA key `"vision_feature_layer": -2`;
//! - files written by transformers 5.x: `rope_parameters`, `dtype`, and a singular
//!   `vision_feature_layer` holding the list.
//!
//! Absent fields take transformers' defaults (`LlamaConfig`, `CLIPVisionConfig`,
//! `VipLlavaConfig`), because the hub 7B config relies on them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The VipLlava default for `vision_feature_layers` (transformers' `VipLlavaConfig`).
pub const DEFAULT_VISION_FEATURE_LAYERS: [i64; 5] = [-2, -5, -8, -11, 6];

/// A configuration value that cannot be used, with the field it came from.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConfigError {
    /// The JSON text is not valid JSON or has a field of the wrong type.
    #[error("config.json is not a valid VipLlava config: {0}")]
    Json(String),
    /// `model_type` names another architecture.
    #[error("config.json has model_type {found:?}, expected \"vipllava\"")]
    WrongModelType {
        /// The `model_type` found in the file.
        found: String,
    },
    /// A size that must be positive is zero or negative.
    #[error("config field `{field}` must be a positive integer, found {value}")]
    NotPositive {
        /// Dotted path of the field.
        field: String,
        /// The value found.
        value: i64,
    },
    /// Heads do not divide a hidden size and no explicit `head_dim` is given.
    #[error(
        "config field `{field}`: hidden size {hidden} is not divisible by {heads} attention heads (set `head_dim` explicitly)"
    )]
    HeadsDoNotDivide {
        /// Dotted path of the hidden size field.
        field: String,
        /// Hidden size.
        hidden: usize,
        /// Number of heads.
        heads: usize,
    },
    /// `num_key_value_heads` does not divide `num_attention_heads`.
    #[error("text_config.num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})")]
    KvHeadsDoNotDivide {
        /// Number of attention heads.
        heads: usize,
        /// Number of key/value heads.
        kv_heads: usize,
    },
    /// An activation function this port does not implement.
    #[error(
        "config field `{field}` has unsupported activation {value:?} (supported: gelu, quick_gelu, gelu_pytorch_tanh, gelu_new, silu, relu)"
    )]
    UnknownActivation {
        /// Dotted path of the field.
        field: String,
        /// The activation name.
        value: String,
    },
    /// A rope scaling type this port does not implement.
    #[error("unsupported rope scaling type {value:?} (supported: default, linear, dynamic, llama3)")]
    UnknownRopeType {
        /// The rope type name.
        value: String,
    },
    /// A rope scaling section is missing a parameter it needs.
    #[error("rope scaling {rope_type:?} is missing the parameter `{field}`")]
    MissingRopeParameter {
        /// The rope type.
        rope_type: String,
        /// The missing field.
        field: String,
    },
    /// A vision feature layer index outside the vision tower's hidden states.
    #[error(
        "vision feature layer {layer} is out of range: the vision tower has {num_states} hidden states (indices -{num_states}..{max})",
        max = num_states - 1
    )]
    FeatureLayerOutOfRange {
        /// The offending index.
        layer: i64,
        /// Number of hidden states (layers + 1).
        num_states: usize,
    },
    /// `vision_feature_layers` is empty.
    #[error("vision_feature_layers is empty")]
    NoFeatureLayers,
    /// The image token id is outside the text vocabulary.
    #[error("image_token_index {image_token_index} is outside the text vocabulary (vocab_size {vocab_size})")]
    ImageTokenOutOfVocab {
        /// The image token id.
        image_token_index: i64,
        /// The text vocabulary size.
        vocab_size: usize,
    },
    /// The projector layernorm width in the weights disagrees with the resolved layers.
    #[error(
        "the projector layernorm in the weights has width {found}, but {num_layers} vision feature layers {layers:?} x vision hidden size {hidden} = {expected}"
    )]
    ProjectorWidthMismatch {
        /// The resolved layers.
        layers: Vec<i64>,
        /// Their count.
        num_layers: usize,
        /// Vision hidden size.
        hidden: usize,
        /// Width implied by the config.
        expected: usize,
        /// Width found in the weights.
        found: usize,
    },
    /// A floating point field that must be positive and finite is not.
    #[error("config field `{field}` must be a positive finite number, found {value}")]
    BadFloat {
        /// Dotted path of the field.
        field: String,
        /// The value found.
        value: f64,
    },
}

/// Activation functions used by CLIP, Llama and the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` with erf (transformers `gelu`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (CLIP's `quick_gelu`).
    QuickGelu,
    /// `x * sigmoid(x)` (`silu`, `swish`).
    Silu,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses a transformers `ACT2FN` name.
    pub fn parse(field: &str, name: &str) -> Result<Self, ConfigError> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            other => {
                return Err(ConfigError::UnknownActivation {
                    field: field.to_string(),
                    value: other.to_string(),
                });
            }
        })
    }
}

/// RoPE frequency scaling, as in transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`).
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// Dynamic NTK: the base grows once the sequence exceeds `max_position_embeddings`.
    Dynamic {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the frequencies were trained for.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The transformers name of this rope type.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "default",
            Self::Linear { .. } => "linear",
            Self::Dynamic { .. } => "dynamic",
            Self::Llama3 { .. } => "llama3",
        }
    }
}

/// The CLIP vision tower configuration (resolved, with transformers' defaults applied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers in the checkpoint.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch size of the convolutional stem.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches per image (without the CLS token).
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The CLIP ViT-L/14-336 tower VipLlava uses when `vision_config` is absent.
    pub fn vipllava_default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// The Llama text model configuration (resolved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (may differ from hidden / heads).
    pub head_dim: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Bias on q/k/v/o projections.
    pub attention_bias: bool,
    /// Bias on gate/up/down projections.
    pub mlp_bias: bool,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Where the resolved `vision_feature_layers` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureLayerSource {
    /// transformers 4.x plural key `vision_feature_layers`.
    PluralKey,
    /// transformers 5.x singular key `vision_feature_layer` holding a list.
    SingularList,
    /// A scalar `vision_feature_layer` (the 7B hub file's stray LLaVA key) without the
    /// plural key: in the 4.x meaning this is the VipLlava default; the projector width in
    /// the weights decides if it is present.
    StrayScalar(i64),
    /// Neither key: the VipLlava default.
    Default,
}

/// The resolved VipLlava configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipLlavaConfig {
    /// Vision tower.
    pub vision: ClipVisionConfig,
    /// Language model.
    pub text: LlamaConfig,
    /// Token id that `<image>` placeholders carry (32000 in the hub checkpoints).
    pub image_token_index: usize,
    /// Padding token id, if set.
    pub pad_token_id: Option<i64>,
    /// Activation between the projector's two linears.
    pub projector_hidden_act: Activation,
    /// Epsilon of the projector's layernorm.
    pub projector_layernorm_eps: f64,
    /// Vision hidden states fed to the projector, in order (negative counts from the end).
    pub vision_feature_layers: Vec<i64>,
    /// Which config key the layers were resolved from.
    pub vision_feature_layers_source: FeatureLayerSource,
    /// `vision_feature_select_strategy` (only `default` drops the CLS token count; the
    /// projector always drops CLS).
    pub vision_feature_select_strategy: String,
    /// dtype the checkpoint declares (`torch_dtype` or `dtype`), informational.
    pub declared_dtype: Option<String>,
}

/// Deserialize helper: a positive integer field, default applied when absent.
fn pos(map: &BTreeMap<String, Value>, prefix: &str, key: &str, default: i64) -> Result<usize, ConfigError> {
    let value = match map.get(key) {
        None | Some(Value::Null) => default,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| ConfigError::Json(format!("`{prefix}{key}` must be an integer, found {v}")))?,
    };
    if value <= 0 {
        return Err(ConfigError::NotPositive {
            field: format!("{prefix}{key}"),
            value,
        });
    }
    usize::try_from(value).map_err(|_| ConfigError::NotPositive {
        field: format!("{prefix}{key}"),
        value,
    })
}

fn opt_pos(map: &BTreeMap<String, Value>, prefix: &str, key: &str) -> Result<Option<usize>, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => pos(map, prefix, key, 0).map(Some),
    }
}

fn float(map: &BTreeMap<String, Value>, prefix: &str, key: &str, default: f64) -> Result<f64, ConfigError> {
    let value = match map.get(key) {
        None | Some(Value::Null) => default,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| ConfigError::Json(format!("`{prefix}{key}` must be a number, found {v}")))?,
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(ConfigError::BadFloat {
            field: format!("{prefix}{key}"),
            value,
        });
    }
    Ok(value)
}

fn boolean(
    map: &BTreeMap<String, Value>,
    prefix: &str,
    key: &str,
    default: bool,
) -> Result<bool, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ConfigError::Json(format!(
            "`{prefix}{key}` must be true or false, found {v}"
        ))),
    }
}

fn string<'a>(
    map: &'a BTreeMap<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<Option<&'a str>, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(ConfigError::Json(format!(
            "`{prefix}{key}` must be a string, found {v}"
        ))),
    }
}

fn object(value: Option<&Value>, field: &str) -> Result<Option<BTreeMap<String, Value>>, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone().into_iter().collect())),
        Some(v) => Err(ConfigError::Json(format!(
            "`{field}` must be an object, found {v}"
        ))),
    }
}

fn int_list(value: &Value, field: &str) -> Result<Vec<i64>, ConfigError> {
    let items = value
        .as_array()
        .ok_or_else(|| ConfigError::Json(format!("`{field}` must be a list of integers, found {value}")))?;
    items
        .iter()
        .map(|v| {
            v.as_i64()
                .ok_or_else(|| ConfigError::Json(format!("`{field}` must hold integers, found {v}")))
        })
        .collect()
}

impl ClipVisionConfig {
    /// Resolves a `vision_config` object with `CLIPVisionConfig` defaults.
    fn from_map(map: &BTreeMap<String, Value>) -> Result<Self, ConfigError> {
        let p = "vision_config.";
        let act = string(map, p, "hidden_act")?.unwrap_or("quick_gelu");
        let config = Self {
            hidden_size: pos(map, p, "hidden_size", 768)?,
            intermediate_size: pos(map, p, "intermediate_size", 3072)?,
            num_hidden_layers: pos(map, p, "num_hidden_layers", 12)?,
            num_attention_heads: pos(map, p, "num_attention_heads", 12)?,
            num_channels: pos(map, p, "num_channels", 3)?,
            image_size: pos(map, p, "image_size", 224)?,
            patch_size: pos(map, p, "patch_size", 32)?,
            hidden_act: Activation::parse("vision_config.hidden_act", act)?,
            layer_norm_eps: float(map, p, "layer_norm_eps", 1e-5)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::HeadsDoNotDivide {
                field: "vision_config.hidden_size".into(),
                hidden: self.hidden_size,
                heads: self.num_attention_heads,
            });
        }
        if self.patch_size > self.image_size {
            return Err(ConfigError::Json(format!(
                "vision_config.patch_size {} is larger than image_size {}",
                self.patch_size, self.image_size
            )));
        }
        Ok(())
    }
}

impl LlamaConfig {
    /// Resolves a `text_config` object with `LlamaConfig` defaults.
    fn from_map(map: &BTreeMap<String, Value>) -> Result<Self, ConfigError> {
        let p = "text_config.";
        let hidden_size = pos(map, p, "hidden_size", 4096)?;
        let num_attention_heads = pos(map, p, "num_attention_heads", 32)?;
        let num_key_value_heads = opt_pos(map, p, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match opt_pos(map, p, "head_dim")? {
            Some(d) => d,
            None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(ConfigError::HeadsDoNotDivide {
                        field: "text_config.hidden_size".into(),
                        hidden: hidden_size,
                        heads: num_attention_heads,
                    });
                }
                hidden_size / num_attention_heads
            }
        };
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(ConfigError::KvHeadsDoNotDivide {
                heads: num_attention_heads,
                kv_heads: num_key_value_heads,
            });
        }
        let act = string(map, p, "hidden_act")?.unwrap_or("silu");
        let max_position_embeddings = pos(map, p, "max_position_embeddings", 2048)?;
        let (rope_theta, rope_scaling) = parse_rope(map, max_position_embeddings)?;
        Ok(Self {
            vocab_size: pos(map, p, "vocab_size", 32000)?,
            hidden_size,
            intermediate_size: pos(map, p, "intermediate_size", 11008)?,
            num_hidden_layers: pos(map, p, "num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act: Activation::parse("text_config.hidden_act", act)?,
            max_position_embeddings,
            rms_norm_eps: float(map, p, "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            attention_bias: boolean(map, p, "attention_bias", false)?,
            mlp_bias: boolean(map, p, "mlp_bias", false)?,
            tie_word_embeddings: boolean(map, p, "tie_word_embeddings", false)?,
        })
    }
}

/// Reads RoPE settings from either dialect: 5.x `rope_parameters` or 4.x
/// `rope_theta` + `rope_scaling` (whose type key is `type` or `rope_type`).
fn parse_rope(
    map: &BTreeMap<String, Value>,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling), ConfigError> {
    let params = object(map.get("rope_parameters"), "text_config.rope_parameters")?;
    let scaling = object(map.get("rope_scaling"), "text_config.rope_scaling")?;
    let mut theta = float(map, "text_config.", "rope_theta", 10000.0)?;
    let section = match (params, scaling) {
        (Some(p), _) => {
            theta = float(&p, "text_config.rope_parameters.", "rope_theta", theta)?;
            Some((p, "text_config.rope_parameters."))
        }
        (None, Some(s)) => Some((s, "text_config.rope_scaling.")),
        (None, None) => None,
    };
    let Some((section, prefix)) = section else {
        return Ok((theta, RopeScaling::None));
    };
    let rope_type = string(&section, prefix, "rope_type")?
        .or(string(&section, prefix, "type")?)
        .unwrap_or("default")
        .to_string();
    let need_factor = |name: &str| -> Result<f64, ConfigError> {
        if !section.contains_key("factor") {
            return Err(ConfigError::MissingRopeParameter {
                rope_type: name.into(),
                field: "factor".into(),
            });
        }
        float(&section, prefix, "factor", 1.0)
    };
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need_factor("linear")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: need_factor("dynamic")?,
        },
        "llama3" => {
            let factor = need_factor("llama3")?;
            let get = |k: &str| -> Result<f64, ConfigError> {
                if !section.contains_key(k) {
                    return Err(ConfigError::MissingRopeParameter {
                        rope_type: "llama3".into(),
                        field: k.into(),
                    });
                }
                float(&section, prefix, k, 1.0)
            };
            let low_freq_factor = get("low_freq_factor")?;
            let high_freq_factor = get("high_freq_factor")?;
            let original = opt_pos(&section, prefix, "original_max_position_embeddings")?
                .unwrap_or(max_position_embeddings);
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(ConfigError::UnknownRopeType {
                value: other.to_string(),
            });
        }
    };
    Ok((theta, scaling))
}

impl VipLlavaConfig {
    /// Parses `config.json` text in either dialect.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_json_value(&value)
    }

    /// Resolves a parsed `config.json`.
    pub fn from_json_value(value: &Value) -> Result<Self, ConfigError> {
        let top: BTreeMap<String, Value> = match value {
            Value::Object(m) => m.clone().into_iter().collect(),
            other => {
                return Err(ConfigError::Json(format!(
                    "the top level must be an object, found {}",
                    type_name(other)
                )));
            }
        };
        match string(&top, "", "model_type")? {
            Some("vipllava") => {}
            Some(other) => {
                return Err(ConfigError::WrongModelType {
                    found: other.to_string(),
                });
            }
            None => {
                return Err(ConfigError::WrongModelType {
                    found: "<missing>".to_string(),
                });
            }
        }
        let vision = match object(top.get("vision_config"), "vision_config")? {
            Some(m) => ClipVisionConfig::from_map(&m)?,
            None => ClipVisionConfig::vipllava_default(),
        };
        let mut text_map = object(top.get("text_config"), "text_config")?.unwrap_or_default();
        // transformers 5.x ties `lm_head` according to the top-level `tie_word_embeddings`
        // (text_config's value is ignored there); 4.x files only carry it in text_config.
        if let Some(v) = top.get("tie_word_embeddings").filter(|v| !v.is_null()) {
            text_map.insert("tie_word_embeddings".into(), v.clone());
        }
        let text = LlamaConfig::from_map(&text_map)?;

        let image_token_index = match top.get("image_token_index").or(top.get("image_token_id")) {
            None | Some(Value::Null) => 32000,
            Some(v) => v.as_i64().ok_or_else(|| {
                ConfigError::Json(format!("`image_token_index` must be an integer, found {v}"))
            })?,
        };
        if image_token_index < 0 || image_token_index as u64 >= text.vocab_size as u64 {
            return Err(ConfigError::ImageTokenOutOfVocab {
                image_token_index,
                vocab_size: text.vocab_size,
            });
        }

        let (vision_feature_layers, source) = match (
            top.get("vision_feature_layers").filter(|v| !v.is_null()),
            top.get("vision_feature_layer").filter(|v| !v.is_null()),
        ) {
            (Some(list), _) => (
                int_list(list, "vision_feature_layers")?,
                FeatureLayerSource::PluralKey,
            ),
            (None, Some(v @ Value::Array(_))) => (
                int_list(v, "vision_feature_layer")?,
                FeatureLayerSource::SingularList,
            ),
            (None, Some(v)) => {
                let scalar = v.as_i64().ok_or_else(|| {
                    ConfigError::Json(format!(
                        "`vision_feature_layer` must be an integer or a list, found {v}"
                    ))
                })?;
                (
                    DEFAULT_VISION_FEATURE_LAYERS.to_vec(),
                    FeatureLayerSource::StrayScalar(scalar),
                )
            }
            (None, None) => (
                DEFAULT_VISION_FEATURE_LAYERS.to_vec(),
                FeatureLayerSource::Default,
            ),
        };
        let act = string(&top, "", "projector_hidden_act")?.unwrap_or("gelu");
        let declared_dtype = string(&top, "", "dtype")?
            .or(string(&top, "", "torch_dtype")?)
            .map(str::to_string);
        let pad_token_id = top.get("pad_token_id").and_then(Value::as_i64);
        let config = Self {
            vision,
            text,
            image_token_index: image_token_index as usize,
            pad_token_id,
            projector_hidden_act: Activation::parse("projector_hidden_act", act)?,
            projector_layernorm_eps: float(&top, "", "projector_layernorm_eps", 1e-5)?,
            vision_feature_layers,
            vision_feature_layers_source: source,
            vision_feature_select_strategy: string(&top, "", "vision_feature_select_strategy")?
                .unwrap_or("default")
                .to_string(),
            declared_dtype,
        };
        config.check_feature_layers()?;
        Ok(config)
    }

    fn check_feature_layers(&self) -> Result<(), ConfigError> {
        if self.vision_feature_layers.is_empty() {
            return Err(ConfigError::NoFeatureLayers);
        }
        let num_states = self.vision.num_hidden_layers + 1;
        for &layer in &self.vision_feature_layers {
            let ok = if layer < 0 {
                layer.unsigned_abs() as usize <= num_states
            } else {
                (layer as usize) < num_states
            };
            if !ok {
                return Err(ConfigError::FeatureLayerOutOfRange { layer, num_states });
            }
        }
        Ok(())
    }

    /// The selected hidden-state indices, made non-negative (0 = output of `pre_layrnorm`).
    pub fn resolved_feature_indices(&self) -> Vec<usize> {
        let num_states = (self.vision.num_hidden_layers + 1) as i64;
        self.vision_feature_layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (num_states + l) as usize
                } else {
                    l as usize
                }
            })
            .collect()
    }

    /// Encoder layers that must run: up to the deepest selected hidden state.
    pub fn vision_layers_used(&self) -> usize {
        self.resolved_feature_indices().into_iter().max().unwrap_or(0)
    }

    /// Input width of the projector: selected layers x vision hidden size.
    pub fn projector_input_width(&self) -> usize {
        self.vision_feature_layers.len() * self.vision.hidden_size
    }

    /// Checks (and, for the stray scalar key, decides) the feature layers against the
    /// projector layernorm width found in the weights.
    pub fn reconcile_projector_width(&mut self, found: usize) -> Result<(), ConfigError> {
        if let FeatureLayerSource::StrayScalar(scalar) = self.vision_feature_layers_source
            && found == self.vision.hidden_size
        {
            // A one-layer projector: the scalar meant what it says (5.x single layer).
            self.vision_feature_layers = vec![scalar];
            self.check_feature_layers()?;
        }
        let expected = self.projector_input_width();
        if expected != found {
            return Err(ConfigError::ProjectorWidthMismatch {
                layers: self.vision_feature_layers.clone(),
                num_layers: self.vision_feature_layers.len(),
                hidden: self.vision.hidden_size,
                expected,
                found,
            });
        }
        Ok(())
    }

    /// `<image>` expands to this many tokens (`(image/patch)^2 + 1 - 1` for the
    /// `default` strategy, one more for `full`).
    pub fn image_seq_len(&self) -> usize {
        let extra = if self.vision_feature_select_strategy == "full" {
            1
        } else {
            0
        };
        self.vision.num_patches() + extra
    }

    /// Parameter count exactly as transformers' `model.num_parameters()` counts it: every
    /// vision layer and `post_layernorm` included (they exist in the module even though the
    /// forward pass never uses them), a tied `lm_head` counted once.
    pub fn num_parameters(&self) -> u64 {
        let v = &self.vision;
        let (d, i) = (v.hidden_size as u64, v.intermediate_size as u64);
        let patches = v.num_patches() as u64;
        let embeddings = (v.num_channels * v.patch_size * v.patch_size) as u64 * d + d + (patches + 1) * d;
        let layer = 4 * (d * d + d) + 2 * (2 * d) + (d * i + i) + (i * d + d);
        let vision = embeddings + 2 * d /* pre */ + v.num_hidden_layers as u64 * layer + 2 * d /* post */;

        let t = &self.text;
        let (h, m, vocab) = (
            t.hidden_size as u64,
            t.intermediate_size as u64,
            t.vocab_size as u64,
        );
        let q = (t.num_attention_heads * t.head_dim) as u64;
        let kv = (t.num_key_value_heads * t.head_dim) as u64;
        let attn_bias = if t.attention_bias { q + 2 * kv + h } else { 0 };
        let mlp_bias = if t.mlp_bias { 2 * m + h } else { 0 };
        let text_layer = h * q + 2 * h * kv + q * h + attn_bias + 3 * h * m + mlp_bias + 2 * h;
        let lm_head = if t.tie_word_embeddings { 0 } else { vocab * h };
        let text = vocab * h + t.num_hidden_layers as u64 * text_layer + h + lm_head;

        let w = self.projector_input_width() as u64;
        let projector = 2 * w + (w * h + h) + (h * h + h);
        vision + projector + text
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_7B: &str = r#"{"architectures": ["VipLlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000, "model_type": "vipllava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "projector_layernorm": false, "projector_layernorm_eps": 1e-05,
 "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
 "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
 "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#;

    #[test]
    fn hub_7b_resolves_defaults_and_layers() {
        let c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
        assert_eq!(c.vision_feature_layers, vec![-2, -5, -8, -11, 6]);
        assert_eq!(
            c.vision_feature_layers_source,
            FeatureLayerSource::StrayScalar(-2)
        );
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_hidden_layers, 32);
        assert_eq!(c.text.intermediate_size, 11008);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.rms_norm_eps, 1e-5);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.text.vocab_size, 32064);
        assert_eq!(c.image_seq_len(), 576);
        assert_eq!(c.num_parameters(), 7_080_214_528);
        assert_eq!(c.resolved_feature_indices(), vec![23, 20, 17, 14, 6]);
        assert_eq!(c.vision_layers_used(), 23);
    }

    #[test]
    fn stray_scalar_is_decided_by_projector_width() {
        let mut c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
        c.reconcile_projector_width(5 * 1024).unwrap();
        assert_eq!(c.vision_feature_layers, vec![-2, -5, -8, -11, 6]);
        let mut c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
        c.reconcile_projector_width(1024).unwrap();
        assert_eq!(c.vision_feature_layers, vec![-2]);
        let mut c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
        let err = c.reconcile_projector_width(3 * 1024).unwrap_err();
        assert!(err.to_string().contains("width 3072"), "{err}");
    }

    fn with_text(text: &str) -> Result<VipLlavaConfig, ConfigError> {
        VipLlavaConfig::from_json_str(&format!(
            r#"{{"model_type": "vipllava", "vision_config": {{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 12, "image_size": 56, "patch_size": 14}}, "text_config": {text}, "image_token_index": 5}}"#
        ))
    }

    #[test]
    fn five_x_dialect() {
        let c = VipLlavaConfig::from_json_str(
            r#"{"model_type": "vipllava", "dtype": "bfloat16", "vision_feature_layer": [-1, 3],
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "image_size": 56, "patch_size": 14},
                "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 512,
                   "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                "image_token_index": 500}"#,
        )
        .unwrap();
        assert_eq!(c.vision_feature_layers, vec![-1, 3]);
        assert_eq!(c.vision_feature_layers_source, FeatureLayerSource::SingularList);
        assert_eq!(c.text.rope_theta, 500000.0);
        assert_eq!(c.text.head_dim, 24);
        assert!(matches!(
            c.text.rope_scaling,
            RopeScaling::Llama3 {
                original_max_position_embeddings: 64,
                ..
            }
        ));
        assert_eq!(c.declared_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.vision_layers_used(), 4);
    }

    #[test]
    fn four_x_rope_scaling_forms() {
        let c = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#).unwrap();
        assert_eq!(c.text.rope_theta, 1000.0);
        assert_eq!(c.text.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let c = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}"#).unwrap();
        assert_eq!(c.text.rope_scaling, RopeScaling::Dynamic { factor: 4.0 });
    }

    #[test]
    fn unsupported_values_are_errors() {
        let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"type": "yarn", "factor": 4.0}}"#).unwrap_err();
        assert!(
            e.to_string().contains("unsupported rope scaling type \"yarn\""),
            "{e}"
        );
        let e = with_text(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "hidden_act": "mish"}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("text_config.hidden_act") && e.to_string().contains("mish"),
            "{e}"
        );
        let e = with_text(r#"{"hidden_size": 65, "num_attention_heads": 4, "vocab_size": 512}"#).unwrap_err();
        assert!(matches!(e, ConfigError::HeadsDoNotDivide { .. }), "{e}");
        let e = with_text(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 512}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::KvHeadsDoNotDivide { .. }), "{e}");
        let e = with_text(r#"{"hidden_size": 0, "num_attention_heads": 4, "vocab_size": 512}"#).unwrap_err();
        assert!(
            e.to_string().contains("text_config.hidden_size") && e.to_string().contains("positive"),
            "{e}"
        );
        let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 4}"#).unwrap_err();
        assert!(matches!(e, ConfigError::ImageTokenOutOfVocab { .. }), "{e}");
        let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"type": "linear"}}"#).unwrap_err();
        assert!(matches!(e, ConfigError::MissingRopeParameter { .. }), "{e}");
        let e = VipLlavaConfig::from_json_str(r#"{"model_type": "llava"}"#).unwrap_err();
        assert!(e.to_string().contains("\"llava\""), "{e}");
        let e = VipLlavaConfig::from_json_str("{not json").unwrap_err();
        assert!(matches!(e, ConfigError::Json(_)), "{e}");
        let e = VipLlavaConfig::from_json_str(
            r#"{"model_type": "vipllava", "text_config": {"vocab_size": 32064}, "vision_feature_layers": [30]}"#,
        )
            .unwrap_err();
        assert!(
            matches!(e, ConfigError::FeatureLayerOutOfRange { layer: 30, .. }),
            "{e}"
        );
    }
}
