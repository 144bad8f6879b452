//! Small building blocks shared by the vision tower, projector and language model.

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, Linear, LinearConfig};
use burn::tensor::activation::{gelu, gelu_approximate, relu, sigmoid, silu};
use burn::tensor::{DType, Device, Tensor};

use crate::config::Activation;
use crate::kernels::{SigmoidGate, sigmoid_gated};

/// Applies one of the activations named in HF configs.
pub fn activate<const D: usize>(act: Activation, x: Tensor<D>) -> Tensor<D> {
    match act {
        Activation::Gelu => crate::kernels::gelu_bf16(x).unwrap_or_else(gelu),
        Activation::GeluTanh => gelu_approximate(x),
        // CLIP's quick_gelu: x * sigmoid(1.702 x); burn has no built-in for it.
        Activation::QuickGelu => {
            sigmoid_gated(x, SigmoidGate::QuickGelu, None).unwrap_or_else(|x| x.clone() * sigmoid(x * 1.702))
        }
        Activation::Silu => sigmoid_gated(x, SigmoidGate::Silu, None).unwrap_or_else(silu),
        Activation::Relu => relu(x),
    }
}

/// `activate(act, gate) * up` (Llama's gated MLP), in one pass where [`sigmoid_gated`]
/// applies (bf16 and f32 on the CPU).
pub fn activate_times<const D: usize>(act: Activation, gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let kind = match act {
        Activation::Silu => SigmoidGate::Silu,
        Activation::QuickGelu => SigmoidGate::QuickGelu,
        _ => return activate(act, gate) * up,
    };
    match sigmoid_gated(gate, kind, Some(&up)) {
        Ok(out) => out,
        Err(gate) => activate(act, gate) * up,
    }
}

/// How the constructors fill parameters (both lazily: nothing is computed until read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamInit {
    /// Zeros: a placeholder that loading replaces. Burn's loader reads every parameter
    /// once before replacing it, and zeros cost no random-number generation and, being
    /// freshly zeroed pages, almost no resident memory.
    Placeholder,
    /// Normal(0, 0.02) like HF's `initializer_range` (random-weight benchmarks).
    Random,
}

impl ParamInit {
    /// The Burn initializer for weight matrices and embeddings.
    pub fn weights(self) -> Initializer {
        match self {
            ParamInit::Placeholder => Initializer::Zeros,
            ParamInit::Random => Initializer::Normal { mean: 0.0, std: 0.02 },
        }
    }
}

/// A `Linear` with the given bias flag, initialised lazily (weights loaded later replace it).
pub fn linear(d_in: usize, d_out: usize, bias: bool, init: ParamInit, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(init.weights())
        .init(device)
}

/// Llama's RMSNorm: normalises in f32 and multiplies by the weight after casting back,
/// as transformers' `LlamaRMSNorm` does.
///
/// Named `LlamaRmsNorm` (not `RmsNorm`) so that the PyTorch adapter keeps the HF
/// parameter name `weight`.
#[derive(Module, Debug)]
pub struct LlamaRmsNorm {
    /// Per-channel scale, `[hidden]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the reciprocal square root.
    pub eps: f64,
}

impl LlamaRmsNorm {
    /// A norm of width `d` with unit weight.
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([d], device),
            eps,
        }
    }

    /// Normalises the last dimension (in one pass on the CPU, with the bits of
    /// [`LlamaRmsNorm::forward_ops`]).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let weight = self.weight.val();
        crate::kernels::norm_rope::rms_norm(&x, &weight, self.eps).unwrap_or_else(|| self.forward_ops(x))
    }

    /// [`LlamaRmsNorm::forward`] with Burn's tensor operations (other devices, training).
    pub(crate) fn forward_ops<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let xf = if dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let variance = xf.clone().square().mean_dim(D - 1);
        let normed = xf * (variance + self.eps).sqrt().recip();
        let normed = if dtype == DType::F32 {
            normed
        } else {
            normed.cast(dtype)
        };
        let weight = self.weight.val();
        let weight = if weight.dtype() == dtype {
            weight
        } else {
            weight.cast(dtype)
        };
        normed * weight.unsqueeze()
    }
}

/// `LayerNorm` computed in f32 whatever the input dtype, result cast back: PyTorch's CPU
/// `layer_norm` for f16/bf16 accumulates and normalises in f32 and rounds once at the end
/// (Burn's own `LayerNorm` widens f16 only, and does bf16 in bf16). `epsilon` is the norm's
/// own, which Burn does not expose: the bf16/f16 kernel ([`crate::kernels::layer_norm`])
/// needs it.
pub fn layer_norm_f32<const D: usize>(norm: &LayerNorm, epsilon: f64, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    // Under autodiff the widened copies below would be non-leaf parameters, which Burn
    // refuses; training uses Burn's own LayerNorm (it widens f16, keeps bf16).
    if dtype == DType::F32 || x.device().is_autodiff() {
        return norm.forward(x);
    }
    let beta = norm.beta.as_ref().map(|b| b.val());
    if let Some(y) =
        crate::kernels::layer_norm::layer_norm_half(&x, &norm.gamma.val(), beta.as_ref(), epsilon)
    {
        return y;
    }
    let mut wide = norm.clone();
    wide.gamma = Param::from_tensor(norm.gamma.val().cast(DType::F32));
    wide.beta = norm
        .beta
        .as_ref()
        .map(|b| Param::from_tensor(b.val().cast(DType::F32)));
    wide.forward(x.cast(DType::F32)).cast(dtype)
}
