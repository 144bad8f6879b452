//! The float precision a model runs in, as a setting: one type for `LoadOptions`,
//! training, benchmarks and the CLI, instead of strings parsed in several places.

use std::fmt;
use std::str::FromStr;

use burn::tensor::DType;

/// Float dtype of weights and activations (norms and softmax still compute in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats: the reference precision.
    #[default]
    #[serde(alias = "float32")]
    F32,
    /// IEEE half precision.
    #[serde(alias = "float16")]
    F16,
    /// bfloat16, the dtype the hub checkpoints were trained in.
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl Precision {
    /// Every precision, in the order the CLI lists them.
    pub const ALL: [Precision; 3] = [Self::F32, Self::F16, Self::Bf16];

    /// The Burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The precision of a Burn float dtype (`None` for anything else).
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// The short name (`f32`, `f16`, `bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A precision name that is not f32, f16 or bf16.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}`: expected f32, f16 or bf16")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    /// Accepts the short names and PyTorch's (`float32`, `float16`, `bfloat16`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(UnknownPrecision(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
            assert_eq!(Precision::from_dtype(p.dtype()), Some(p));
        }
        assert_eq!("bfloat16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("Float32".parse::<Precision>(), Ok(Precision::F32));
        assert!("f64".parse::<Precision>().is_err());
        assert_eq!(Precision::from_dtype(DType::F64), None);
    }
}
