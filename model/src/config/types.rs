//! The small enums of a resolved config: activations, RoPE scaling, where the feature
//! layers came from, and the feature-select strategy.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

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

/// transformers' `vision_feature_select_strategy`: whether the CLS token counts among the
/// image tokens. The projector always drops CLS; only the `<image>` expansion differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSelectStrategy {
    /// `default`: `(image / patch)^2` image tokens (CLS dropped).
    #[default]
    Default,
    /// `full`: one more (CLS kept).
    Full,
}

impl FeatureSelectStrategy {
    /// The transformers name (`default` or `full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Full => "full",
        }
    }

    /// Image tokens beyond one per patch.
    pub fn extra_tokens(self) -> usize {
        match self {
            Self::Default => 0,
            Self::Full => 1,
        }
    }
}

/// A `vision_feature_select_strategy` name other than `default` and `full`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("unknown vision feature select strategy {0:?} (expected default or full)")]
pub struct UnknownFeatureSelectStrategy(pub String);

impl FromStr for FeatureSelectStrategy {
    type Err = UnknownFeatureSelectStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(Self::Default),
            "full" => Ok(Self::Full),
            other => Err(UnknownFeatureSelectStrategy(other.to_string())),
        }
    }
}

impl fmt::Display for FeatureSelectStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
