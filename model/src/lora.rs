//! LoRA linears in training, computed in factored form, and the frozen quantized product
//! of QLoRA with a backward pass that dequantizes again instead of keeping the weight.
//!
//! Burn's [`LoraAdapter`] composes a dense effective weight, `base + scale * (a @ b)`,
//! and the linear multiplies by it. Under autodiff that dense `[d_in, d_out]` weight is a
//! new tensor per layer, kept from the forward pass to the backward pass for the gradient
//! of the activations, and the factors' gradient goes through a weight-shaped gradient:
//! with a quantized base (QLoRA) every layer keeps an f32 copy of its weight, more than
//! the unquantized model. Here the layer computes, as PEFT does,
//!
//! `y = x @ base (+ bias) + scale * ((x @ a) @ b)`,
//!
//! so the only weight-shaped tensor in the graph is the frozen base itself. A dense base is
//! shared with the module (no copy). A quantized base on Flex goes through
//! [`FrozenQuantizedMatmul`], a Burn backend extension with its own autodiff step: the
//! forward pass dequantizes the weight, multiplies and drops it; the backward pass keeps
//! only the quantized weight (shared with the module) and dequantizes it again for
//! `grad @ W^T` (bitsandbytes' QLoRA does the same).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::ops::{FloatTensorOps, QTensorOps};
use burn::backend::tensor::{FloatTensor, QuantizedTensor};
use burn::backend::{Autodiff, Backend, Dispatch, FloatDType, TensorMetadata, backend_extension};
use burn::module::LoraAdapter;
use burn::nn::Linear;
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::Flex;

use crate::kernels;

/// `x @ W` for a frozen block-quantized `W [K, N]` and activations `x [M, K]`, in `x`'s
/// dtype, differentiable in `x` only. The backward pass dequantizes `W` again rather than
/// keeping a dense copy from the forward pass.
#[backend_extension(Flex, Autodiff)]
pub trait FrozenQuantizedMatmul: Backend {
    /// `x [M, K] @ dequantize(w) [K, N]` in `x`'s dtype.
    fn frozen_quantized_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self>;

    /// `dequantize(w)` in `dtype` (the backward pass's copy of the weight).
    fn frozen_dense(w: QuantizedTensor<Self>, dtype: FloatDType) -> FloatTensor<Self>;
}

impl FrozenQuantizedMatmul for Flex {
    fn frozen_quantized_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let dtype = FloatDType::from(x.dtype());
        let w = dense(w, dtype);
        Flex::float_matmul(x, w)
    }

    fn frozen_dense(w: QuantizedTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        dense(w, dtype)
    }
}

/// The dequantized weight in `dtype`: in parallel where [`kernels`] reads the layout (the
/// same `scale * q` as Burn's `dequantize`), through Burn otherwise.
fn dense(w: QuantizedTensor<Flex>, dtype: FloatDType) -> FloatTensor<Flex> {
    let device = w.device();
    let shape = w.shape();
    let f32 = match kernels::dequantize_flex(w) {
        Ok(values) => Flex::float_from_data(TensorData::new(values, shape), &device),
        Err(w) => Flex::dequantize(*w, FloatDType::F32),
    };
    if dtype == FloatDType::F32 {
        f32
    } else {
        Flex::float_cast(f32, dtype)
    }
}

/// The autodiff step of [`FrozenQuantizedMatmul`]: its state is the quantized weight.
#[derive(Debug)]
struct FrozenQuantizedBackward;

impl<B: Backend + FrozenQuantizedMatmul> Backward<B, 1> for FrozenQuantizedBackward {
    type State = QuantizedTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let weight = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let dtype = FloatDType::from(grad.dtype());
            let weight = B::frozen_dense(weight, dtype);
            B::float_matmul(grad, B::float_transpose(weight))
        });
    }
}

impl<B: Backend + FrozenQuantizedMatmul, C: CheckpointStrategy> FrozenQuantizedMatmul for Autodiff<B, C> {
    fn frozen_quantized_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let (x, guard) = x.into_parts();
        // A matmul: worth keeping its output rather than recomputing it under checkpointing.
        match FrozenQuantizedBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(w.clone(), B::frozen_quantized_matmul(x, w)),
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_quantized_matmul(x, w)),
        }
    }

    fn frozen_dense(w: QuantizedTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        // A constant: the quantized weight carries no graph.
        Self::dequantize(w, dtype)
    }
}

/// `x @ W (+ b)` when the activations or the weights are on an autodiff device, in `x`'s
/// dtype: a LoRA-adapted layer in factored form, a quantized (frozen) weight through
/// [`FrozenQuantizedMatmul`], a weight in another dtype cast to `x`'s (Burn's matmul wants
/// one dtype), anything else through Burn's `Linear`.
pub(crate) fn training_linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    if let Some(adapter) = layer.weight.adapter() {
        return lora_linear(layer, adapter, x);
    }
    let weight = layer.weight.val();
    if weight.dtype() == x.dtype() {
        return layer.forward(x);
    }
    with_bias(layer, frozen_product(x, weight))
}

/// `y + b` with the layer's bias in `y`'s dtype (Burn's `cast` keeps a matching dtype).
fn with_bias<const D: usize>(layer: &Linear, y: Tensor<D>) -> Tensor<D> {
    match &layer.bias {
        Some(b) => {
            let dtype = y.dtype();
            y + b.val().cast(dtype).unsqueeze()
        }
        None => y,
    }
}

/// `x @ W (+ b)` for a LoRA-adapted linear, in factored form (see the module docs), in
/// `x`'s dtype. The factors are cast to it when they differ (a quantized base leaves them
/// in f32); the cast is part of the graph, so their gradients still arrive.
pub(crate) fn lora_linear<const D: usize>(layer: &Linear, adapter: &LoraAdapter, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let y = with_bias(layer, frozen_product(x.clone(), layer.weight.base()));
    let a = adapter.a.val().cast(dtype);
    let b = adapter.b.val().cast(dtype);
    let delta = x.matmul(a.unsqueeze()).matmul(b.unsqueeze());
    y + delta.mul_scalar(adapter.scale)
}

/// `x @ base` for a base weight `[K, N]`, in `x`'s dtype; a quantized base is frozen.
fn frozen_product<const D: usize>(x: Tensor<D>, base: Tensor<2>) -> Tensor<D> {
    let dtype = x.dtype();
    let quantized = matches!(base.dtype(), DType::QFloat(_));
    if !quantized || base.device() != Device::flex() {
        // A dense base (shared with the module, or cast), or a quantized one on another
        // backend: Burn dequantizes it, and the dense weight stays in the graph there.
        let base = if quantized { base.dequantize() } else { base };
        return x.matmul(base.cast(dtype).unsqueeze());
    }
    let dims = x.dims();
    let [k, n] = base.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let x2 = x.reshape([rows, k]);
    let y = <Dispatch as FrozenQuantizedMatmul>::frozen_quantized_matmul(
        x2.into_dispatch(),
        base.into_dispatch(),
    );
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    Tensor::<2>::from_dispatch(y).reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{Lora, Module, ModuleMapper, Param};
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;
    use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a.cast(DType::F32) - b.cast(DType::F32))
            .abs()
            .max()
            .into_scalar::<f32>()
    }

    /// A `[k, n]` linear with bias on the autodiff Flex device, its weight block-quantized
    /// when `scheme` is given, with a LoRA adapter whose `b` is non-zero (so both factors
    /// get gradients that depend on the base).
    fn adapted(k: usize, n: usize, scheme: Option<QuantScheme>, device: &Device) -> Linear {
        let mut layer = LinearConfig::new(k, n).init(device);
        if let Some(scheme) = scheme {
            let w = layer.weight.val().quantize_dynamic(&scheme);
            layer.weight = Param::from_tensor(w);
        }
        layer.apply_lora(Lora::new(RANK, 8.0)).map(&mut NonZeroB)
    }

    const RANK: usize = 4;

    /// Replaces the zero-initialised LoRA factor `b` (`[RANK, n]`) with random values.
    struct NonZeroB;

    impl ModuleMapper for NonZeroB {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let dims = tensor.dims();
            if D != 2 || dims[0] != RANK {
                return Param::from_mapped_value(id, tensor, mapper);
            }
            let b = Tensor::<D>::random(dims, Distribution::Normal(0.0, 0.1), &tensor.device());
            Param::from_mapped_value(id, b.require_grad(), mapper)
        }
    }

    /// The factored LoRA product equals Burn's composed one in value and in the gradients
    /// of the activations and of both factors, over a dense and over a quantized base
    /// (blocks along K as `--quantize` writes them, and along N as older burnpacks).
    #[test]
    fn factored_lora_equals_the_composed_weight() {
        let device = Device::flex().autodiff();
        let schemes = [
            None,
            Some(
                QuantScheme::default()
                    .with_value(QuantValue::Q8S)
                    .per_block([32, 1], ScaleDtype::F32),
            ),
            Some(
                QuantScheme::default()
                    .with_value(QuantValue::Q4S)
                    .per_block([32], ScaleDtype::F32),
            ),
        ];
        for scheme in schemes {
            let layer = adapted(64, 96, scheme, &device);
            let adapter = layer.weight.adapter().expect("adapter");
            let x = Tensor::<3>::random([2, 5, 64], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let seed = Tensor::<3>::random([2, 5, 96], Distribution::Normal(0.0, 1.0), &device);

            let factored = lora_linear(&layer, adapter, x.clone());
            let composed = {
                let w = match layer.weight.val() {
                    w if matches!(w.dtype(), DType::QFloat(_)) => w.dequantize(),
                    w => w,
                };
                x.clone().matmul(w.unsqueeze()) + layer.bias.as_ref().expect("bias").val().unsqueeze()
            };
            assert!(max_diff(factored.clone(), composed.clone()) < 1e-4, "{scheme:?}");

            let grads_f = (factored * seed.clone()).sum().backward();
            let grads_c = (composed * seed).sum().backward();
            let gx = max_diff(x.grad(&grads_f).expect("x"), x.grad(&grads_c).expect("x"));
            let ga = max_diff(
                adapter.a.val().grad(&grads_f).expect("a"),
                adapter.a.val().grad(&grads_c).expect("a"),
            );
            let gb = max_diff(
                adapter.b.val().grad(&grads_f).expect("b"),
                adapter.b.val().grad(&grads_c).expect("b"),
            );
            assert!(gx < 1e-4 && ga < 1e-3 && gb < 1e-3, "{scheme:?}: {gx} {ga} {gb}");
            // The frozen base gets no gradient.
            assert!(layer.weight.base().grad(&grads_f).is_none());
        }
    }

    /// In bf16 the product comes out in bf16 with f32 factors (as QLoRA builds them) and
    /// stays within bf16 rounding of the f32 result.
    #[test]
    fn factored_lora_runs_in_the_activation_dtype() {
        let device = Device::flex().autodiff();
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .per_block([32, 1], ScaleDtype::F32);
        let layer = adapted(64, 32, Some(scheme), &device);
        let adapter = layer.weight.adapter().expect("adapter");
        let x = Tensor::<2>::random([3, 64], Distribution::Normal(0.0, 1.0), &device);
        let wide = lora_linear(&layer, adapter, x.clone());
        let narrow = lora_linear(&layer, adapter, x.cast(DType::BF16).require_grad());
        assert_eq!(narrow.dtype(), DType::BF16);
        let scale: f32 = wide.clone().abs().max().into_scalar::<f32>();
        assert!(max_diff(wide, narrow.clone()) < 0.02 * scale);
        let grads = narrow.sum().backward();
        assert!(adapter.a.val().grad(&grads).is_some() && adapter.b.val().grad(&grads).is_some());
    }
}
