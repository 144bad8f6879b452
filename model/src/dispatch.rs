//! The one place where the forward pass chooses between Burn's own ops and the Flex CPU
//! fast paths of [`crate::kernels`]. Model code calls [`LinearForward::project`],
//! [`grouped_attention`] and [`project_transposed`] and never asks which device it runs
//! on, so it reads like the HF model (`self.q_proj.project(x)`).
//!
//! # Why an extension trait on `burn::nn::Linear`, not a wrapper module
//!
//! candle-transformers puts its dispatch in a `Linear` wrapper struct. In Burn a wrapper
//! module adds a segment to every parameter path (`q_proj.inner.weight`), and those paths
//! are load-bearing: they are the burnpack file keys, the targets of LoRA regexes
//! (`q_proj`), the training parameter names and the HF-name mapping of the loader in
//! `vipllava-convert`. Burn's `apply_lora` and `quantize_weights` also act on
//! `burn::nn::Linear` fields themselves. An extension trait keeps every field a plain
//! `nn::Linear` (same record, same paths, LoRA and quantization untouched) and still gives
//! one call site shape with the dispatch behind it.

use burn::nn::Linear;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Tensor};

use crate::kernels;
use crate::training_attention::recomputed_attention;

/// `x @ W (+ b)` for a Burn `Linear`, through the CPU fast path where it applies.
pub trait LinearForward {
    /// Applies the layer to the last dimension of `x`: the streaming kernels on the plain
    /// Flex device, Burn's `Linear::forward` elsewhere (same result up to f32 rounding).
    fn project<const D: usize>(&self, x: Tensor<D>) -> Tensor<D>;
}

impl LinearForward for Linear {
    fn project<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        kernels::linear(self, x)
    }
}

/// [`LinearForward::project`] for several layers that read the same input (q/k/v,
/// gate/up): each result is that of its own `project`; on the CPU's decode path with packed
/// weights the input is quantized once and the products share one set of rayon tasks.
pub fn project_each<const D: usize, const N: usize>(layers: [&Linear; N], x: Tensor<D>) -> [Tensor<D>; N] {
    kernels::linears(layers, x)
}

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` queries and
/// `[batch, kv_heads, total, head_dim]` keys/values, where `heads` is a multiple of
/// `kv_heads` (GQA): query head `h` reads key/value head `h / (heads / kv_heads)`. The mask
/// is `[batch, 1 | heads, seq, total]`, `true` where a key is excluded.
///
/// Decode steps on Flex (a few query rows) read the cache in place, and prefills without a
/// mask tensor run blocks of query rows with an online softmax ([`kernels::attention`]);
/// Flex's own attention maps the heads itself otherwise; under
/// autodiff on Flex (training) [`recomputed_attention`] keeps no score matrices for the
/// backward pass; other backends get HF's `repeat_kv` copies.
pub fn grouped_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    options: AttentionModuleOptions,
) -> Tensor<4> {
    if kernels::fast_paths_enabled()
        && let Some(out) = kernels::attention::decode_attention(&q, &k, &v, mask.as_ref(), &options)
            .or_else(|| kernels::attention::prefill_attention(&q, &k, &v, mask.as_ref(), &options))
    {
        return out;
    }
    let [b, heads, t, d] = q.dims();
    let total = k.dims()[2];
    // Training on Flex: no score matrices kept for the backward pass.
    if q.device().is_autodiff() && q.device() == Device::flex() && options.softcap.is_none() {
        let scale = options.scale.unwrap_or(1.0 / (d as f64).sqrt());
        return recomputed_attention(q, k, v, mask, options.is_causal, scale);
    }
    let mask = mask.map(|m| m.expand([b, heads, t, total]));
    let rep = heads / k.dims()[1].max(1);
    let (k, v) = if kernels::is_plain_flex(&q.device()) {
        (k, v)
    } else {
        (repeat_kv(k, rep), repeat_kv(v, rep))
    };
    attention(q, k, v, mask, None, options)
}

/// HF `repeat_kv`: each key/value head repeated `rep` times, adjacent.
pub(crate) fn repeat_kv(x: Tensor<4>, rep: usize) -> Tensor<4> {
    if rep <= 1 {
        return x;
    }
    let [b, kvh, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, rep, t, hd])
        .reshape([b, kvh * rep, t, hd])
}

/// `x @ W^T` for a `[out, in]` matrix stored the other way round from a `Linear` (the
/// token embeddings, when `lm_head` is tied to them).
pub fn project_transposed(x: Tensor<3>, weight: Tensor<2>) -> Tensor<3> {
    let dtype = x.dtype();
    if dtype == DType::F32 || !kernels::is_plain_flex(&x.device()) {
        return x.matmul(weight.transpose().unsqueeze());
    }
    // Flex widens bf16/f16 matmuls serially; widen once here instead.
    x.cast(DType::F32)
        .matmul(weight.cast(DType::F32).transpose().unsqueeze())
        .cast(dtype)
}
