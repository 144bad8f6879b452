//! Load-time weight quantization (`--quantize q8|q4`) with Burn's quantization API.
//!
//! What is quantized: the weight matrices of every linear layer — CLIP attention and MLP,
//! the multimodal projector, Llama attention and MLP. They hold almost all parameters
//! (about 97% of vip-llava-7b). What stays in the load dtype: token and position
//! embeddings (a lookup reads one row, quantizing saves little and costs accuracy on rare
//! tokens), `lm_head` (the logits decide every greedy token; it is 3.7% of 7B), the patch
//! convolution, layer norms and RMS norms, and all biases.
//!
//! Scheme: symmetric integers with one f32 scale per block of 32 consecutive values along
//! the output dimension (Q8_0 / Q4_0 in llama.cpp's terms; narrower blocks where 32 does not
//! divide the width). Backends that store quantized
//! values unpacked (Flex keeps one byte per value) give q4 the accuracy of 4 bits but the
//! memory of q8.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};
use vipllava_model::VipLlava;

/// Linear layers whose `weight` is quantized (Burn module field names).
pub const QUANTIZED_LINEARS: [&str; 12] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "linear_1",
    "linear_2",
];

/// Preferred block length of the per-block scales; a weight whose output width it does not
/// divide uses the largest power of two that does (per-tensor below 8).
pub const BLOCK_SIZE: u8 = 32;

/// A weight quantization level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 8-bit symmetric integers, one scale per 32 values.
    Q8,
    /// 4-bit symmetric integers, one scale per 32 values.
    Q4,
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        })
    }
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "int8" => Ok(Self::Q8),
            "q4" | "int4" => Ok(Self::Q4),
            other => Err(format!("unknown quantization `{other}`: expected q8 or q4")),
        }
    }
}

impl Quantization {
    /// The Burn scheme for this level with blocks of `block` values along the last
    /// dimension (`None`: one scale per tensor).
    pub fn scheme(self, block: Option<u8>) -> QuantScheme {
        let value = match self {
            Self::Q8 => QuantValue::Q8S,
            Self::Q4 => QuantValue::Q4S,
        };
        let scheme = QuantScheme::default().with_value(value);
        match block {
            Some(b) => scheme.per_block([b], ScaleDtype::F32),
            None => scheme.per_tensor(ScaleDtype::F32),
        }
    }
}

/// The block length for a tensor whose last dimension is `width`.
pub fn block_for(width: usize) -> Option<u8> {
    let mut block = BLOCK_SIZE;
    while block >= 8 {
        if width.is_multiple_of(block as usize) {
            return Some(block);
        }
        block /= 2;
    }
    None
}

/// Quantizes the weights of the [`QUANTIZED_LINEARS`], choosing the block per tensor.
struct WeightQuantizer {
    level: Quantization,
    path: Vec<String>,
}

impl ModuleMapper for WeightQuantizer {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let n = self.path.len();
        let selected =
            n >= 2 && self.path[n - 1] == "weight" && QUANTIZED_LINEARS.contains(&self.path[n - 2].as_str());
        if !selected {
            return param;
        }
        let level = self.level;
        param.map(|tensor| {
            let width = tensor.dims()[D - 1];
            tensor.quantize_dynamic(&level.scheme(block_for(width)))
        })
    }
}

/// Quantizes the linear-layer weights of `model` (see the module docs for which).
pub fn quantize_model(model: VipLlava, level: Quantization) -> VipLlava {
    quantize_module(model, level)
}

/// [`quantize_model`] on any part of the model (a decoder layer, the projector): the
/// loader quantizes each part as soon as it is loaded.
pub fn quantize_module<M: Module>(module: M, level: Quantization) -> M {
    module.map(&mut WeightQuantizer {
        level,
        path: Vec::new(),
    })
}

/// Counts parameters by storage: `(quantized, total)` float parameters.
struct QuantizedCounter {
    quantized: usize,
    total: usize,
}

impl burn::module::ModuleVisitor for QuantizedCounter {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
        self.total += 1;
        if matches!(param.val().dtype(), burn::tensor::DType::QFloat(_)) {
            self.quantized += 1;
        }
    }
}

/// Number of quantized float parameters in `model` (a Burn-native checkpoint saved by
/// `vipllava convert --quantize` loads already quantized).
pub fn quantized_parameter_count(model: &VipLlava) -> usize {
    let mut counter = QuantizedCounter {
        quantized: 0,
        total: 0,
    };
    model.visit(&mut counter);
    counter.quantized
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn blocks_divide_the_width() {
        assert_eq!(block_for(4096), Some(32));
        assert_eq!(block_for(48), Some(16));
        assert_eq!(block_for(24), Some(8));
        assert_eq!(block_for(30), None);
    }

    /// Each value is within half a quantization step of its block's scale.
    #[test]
    fn round_trip_error_is_half_a_step() {
        let device = Device::flex();
        let w = Tensor::<2>::random([64, 96], Distribution::Normal(0.0, 0.02), &device);
        let values: Vec<f32> = w.clone().into_data().try_to_vec().unwrap();
        for (level, levels) in [(Quantization::Q8, 127.0f32), (Quantization::Q4, 7.0)] {
            let back: Vec<f32> = w
                .clone()
                .quantize_dynamic(&level.scheme(Some(32)))
                .dequantize()
                .into_data()
                .try_to_vec()
                .unwrap();
            for (block, (orig, deq)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
                let step = orig.iter().fold(0.0f32, |m, v| m.max(v.abs())) / levels;
                let err = orig
                    .iter()
                    .zip(deq)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    err <= step * 0.5001,
                    "{level} block {block}: error {err} > half step {step}"
                );
            }
        }
    }
}
