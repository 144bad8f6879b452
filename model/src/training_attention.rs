//! Attention in training that keeps no score matrices for the backward pass.
//!
//! Under autodiff, Burn runs attention as its composed fallback (scores, mask fills,
//! softmax, product), and the graph keeps several `[batch, heads, seq, total]` tensors per
//! layer until the backward pass reaches it, gradient checkpointing or not: at 1535 tokens
//! with 32 heads that is hundreds of MB per layer, most of a LoRA step's peak. This op
//! keeps only its inputs (queries, keys, values, the mask) and the log-sum-exp of each
//! score row, and recomputes the probabilities from them in the backward pass, one layer
//! at a time, as FlashAttention's backward does:
//!
//! `P = exp(S - lse)`, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - rowsum(P ∘ dP))`,
//! `dQ = scale · dS K`, `dK = scale · dSᵀ Q`.
//!
//! The arithmetic runs in f32 whatever the activations' dtype (PyTorch's CPU attention
//! accumulates reduced precision in f32 too); the output is rounded once to it. Keys and
//! values may have fewer heads than the queries (GQA): they are repeated for the products
//! and their gradients summed over each group.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, FloatDType, TensorMetadata, backend_extension};
use burn::tensor::{Bool, DType, Int, Shape, Tensor};
use burn_flex::Flex;

/// Scaled dot-product attention whose backward pass recomputes the probabilities.
#[backend_extension(Flex, Autodiff)]
pub trait RecomputedAttention: Backend {
    /// `softmax(scale · q kᵀ, masked) v` for `q [b, h, t, d]`, `k`/`v [b, kvh, total, d]`
    /// (`h` a multiple of `kvh`) and `mask [b, h, t, total]` (`true`: excluded), in `q`'s
    /// dtype.
    fn recomputed_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
}

impl RecomputedAttention for Flex {
    fn recomputed_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        forward::<Flex>(q, k, v, mask, scale).0
    }
}

/// `x` in f32.
fn wide<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    if x.dtype() == DType::F32 {
        x
    } else {
        B::float_cast(x, FloatDType::F32)
    }
}

/// `x` in `dtype`.
fn narrow<B: Backend>(x: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if x.dtype() == dtype {
        x
    } else {
        B::float_cast(x, FloatDType::from(dtype))
    }
}

/// Keys or values `[b, kvh, n, d]` with each head repeated to `heads` (adjacent copies,
/// as HF's `repeat_kv`).
fn repeat_heads<B: Backend>(x: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
    let [b, kvh, n, d] = x.shape().dims::<4>();
    if kvh == heads {
        return x;
    }
    let rep = heads / kvh;
    let x = B::float_reshape(x, Shape::new([b, kvh, 1, n, d]));
    let x = B::float_expand(x, Shape::new([b, kvh, rep, n, d]));
    B::float_reshape(x, Shape::new([b, heads, n, d]))
}

/// The gradient of repeated keys or values `[b, heads, n, d]` summed back onto their
/// `kvh` heads.
fn sum_groups<B: Backend>(x: FloatTensor<B>, kvh: usize) -> FloatTensor<B> {
    let [b, heads, n, d] = x.shape().dims::<4>();
    if kvh == heads {
        return x;
    }
    let x = B::float_reshape(x, Shape::new([b, kvh, heads / kvh, n, d]));
    B::float_reshape(B::float_sum_dim(x, 2), Shape::new([b, kvh, n, d]))
}

/// Queries in f32 and keys in f32 repeated to the queries' heads: what the scores and
/// the gradients multiply.
fn widened<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let heads = q.shape().dims::<4>()[1];
    (wide::<B>(q), repeat_heads::<B>(wide::<B>(k), heads))
}

/// The masked scaled scores `[b, h, t, total]` in f32, from [`widened`] queries and keys.
fn scores<B: Backend>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    mask: &BoolTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let s = B::float_matmul(q.clone(), B::float_transpose(k.clone()));
    let s = B::float_mul_scalar(s, scale.into());
    B::float_mask_fill(s, mask.clone(), f32::NEG_INFINITY.into())
}

/// The forward pass: output in `q`'s dtype and the rows' log-sum-exp in f32. Rows with
/// every key masked give zeros (as Burn's attention).
fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype = q.dtype();
    let heads = q.shape().dims::<4>()[1];
    let (q, k) = widened::<B>(q, k);
    let s = scores::<B>(&q, &k, &mask, scale);
    let max = B::float_clamp_min(B::float_max_dim(s.clone(), 3), f32::MIN.into());
    let e = B::float_exp(B::float_sub(s, max.clone()));
    let sum = B::float_clamp_min(B::float_sum_dim(e.clone(), 3), f32::MIN_POSITIVE.into());
    let p = B::float_div(e, sum.clone());
    let v = repeat_heads::<B>(wide::<B>(v), heads);
    let out = narrow::<B>(B::float_matmul(p, v), dtype);
    let lse = B::float_add(max, B::float_log(sum));
    (out, lse)
}

/// What the backward pass recomputes from.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    lse: FloatTensor<B>,
    scale: f64,
}

#[derive(Debug)]
struct RecomputedAttentionBackward;

impl<B: Backend> Backward<B, 3> for RecomputedAttentionBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let Saved {
            q,
            k,
            v,
            mask,
            lse,
            scale,
        } = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [q_parent, k_parent, v_parent] = ops.parents;
        let [_, heads, _, _] = q.shape().dims::<4>();
        let kvh = k.shape().dims::<4>()[1];
        let (q_dtype, k_dtype, v_dtype) = (q.dtype(), k.dtype(), v.dtype());

        let d_out = wide::<B>(grad);
        let (q, k) = widened::<B>(q, k);
        // exp(-inf - lse) = 0 for masked keys; a fully masked row has lse = log(tiny) + MIN
        // and exponents of -inf, so zeros there too.
        let p = B::float_exp(B::float_sub(scores::<B>(&q, &k, &mask, scale), lse));
        if let Some(node) = v_parent {
            let dv = B::float_matmul(B::float_transpose(p.clone()), d_out.clone());
            grads.register::<B>(node.id, narrow::<B>(sum_groups::<B>(dv, kvh), v_dtype));
        }
        if q_parent.is_none() && k_parent.is_none() {
            return;
        }
        let v = repeat_heads::<B>(wide::<B>(v), heads);
        let dp = B::float_matmul(d_out, B::float_transpose(v));
        let row = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), 3);
        let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), scale.into());
        if let Some(node) = q_parent {
            grads.register::<B>(node.id, narrow::<B>(B::float_matmul(ds.clone(), k), q_dtype));
        }
        if let Some(node) = k_parent {
            let dk = B::float_matmul(B::float_transpose(ds), q);
            grads.register::<B>(node.id, narrow::<B>(sum_groups::<B>(dk, kvh), k_dtype));
        }
    }
}

impl<B: Backend + RecomputedAttention, C: CheckpointStrategy> RecomputedAttention for Autodiff<B, C> {
    fn recomputed_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let (q, q_guard) = q.into_parts();
        let (k, k_guard) = k.into_parts();
        let (v, v_guard) = v.into_parts();
        let prep = RecomputedAttentionBackward
            .prepare::<C>([q_guard, k_guard, v_guard])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, lse) = forward::<B>(q.clone(), k.clone(), v.clone(), mask.clone(), scale);
                let saved = Saved {
                    q,
                    k,
                    v,
                    mask,
                    lse,
                    scale,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(q, k, v, mask, scale).0),
        }
    }
}

/// Attention over `q [b, h, t, d]` and `k`/`v [b, kvh, total, d]` through
/// [`RecomputedAttention`]; `mask` (`true`: excluded) broadcasts to `[b, h, t, total]`,
/// and `causal` excludes the keys after each query (bottom-right aligned).
pub fn recomputed_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    scale: f64,
) -> Tensor<4> {
    let [b, heads, t, _] = q.dims();
    let total = k.dims()[2];
    let device = q.device();
    let positions = |n: usize| Tensor::<1, Int>::arange(0..n as i64, &device);
    let mask = match (mask, causal) {
        (Some(mask), false) => mask.expand([b, heads, t, total]),
        (mask, _) => {
            // Keys after each query (none when not causal), bottom-right aligned.
            let offset = if causal {
                total as i64 - t as i64
            } else {
                total as i64
            };
            let rows = positions(t).reshape([t, 1]).add_scalar(offset);
            let future = positions(total).reshape([1, total]).greater(rows);
            let future = future.reshape([1, 1, t, total]).expand([b, heads, t, total]);
            match mask {
                Some(mask) => mask.expand([b, heads, t, total]).bool_or(future),
                None => future,
            }
        }
    };
    let out = <Dispatch as RecomputedAttention>::recomputed_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
        scale,
    );
    Tensor::from_dispatch(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::repeat_kv;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution};

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a.cast(DType::F32) - b.cast(DType::F32))
            .abs()
            .max()
            .into_scalar::<f32>()
    }

    /// Burn's own attention with HF's `repeat_kv`, through autodiff's composed fallback.
    fn reference(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Option<Tensor<4, Bool>>,
        causal: bool,
    ) -> Tensor<4> {
        let [b, heads, t, _] = q.dims();
        let [_, kvh, total, _] = k.dims();
        let repeat = |x: Tensor<4>| repeat_kv(x, heads / kvh);
        let options = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let mask = mask.map(|m| m.expand([b, heads, t, total]));
        attention(q, repeat(k), repeat(v), mask, None, options)
    }

    /// Values and the gradients of queries, keys and values equal Burn's attention: GQA,
    /// causal over a longer cache (bottom-right), a padding mask with and without the
    /// causal part.
    #[test]
    fn recomputed_attention_equals_burn() {
        let device = Device::flex().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        for (t, total, causal, padded) in [
            (7, 7, true, false),
            (3, 9, true, false),
            (6, 6, false, true),
            (6, 6, true, true),
        ] {
            let (b, heads, kvh, d) = (2, 4, 2, 8);
            let q = Tensor::<4>::random([b, heads, t, d], normal, &device).require_grad();
            let k = Tensor::<4>::random([b, kvh, total, d], normal, &device).require_grad();
            let v = Tensor::<4>::random([b, kvh, total, d], normal, &device).require_grad();
            // The second sequence's last two keys are padding.
            let mask = padded.then(|| {
                let cols = Tensor::<1, Int>::arange(0..total as i64, &device).reshape([1, 1, 1, total]);
                let limit = Tensor::<1, Int>::from_data([total as i64, total as i64 - 2], &device)
                    .reshape([b, 1, 1, 1]);
                cols.greater_equal(limit)
            });
            let seed = Tensor::<4>::random([b, heads, t, d], normal, &device);
            let scale = 1.0 / (d as f64).sqrt();
            let ours = recomputed_attention(q.clone(), k.clone(), v.clone(), mask.clone(), causal, scale);
            let theirs = reference(q.clone(), k.clone(), v.clone(), mask, causal);
            let case = format!("t {t} total {total} causal {causal} padded {padded}");
            assert!(max_diff(ours.clone(), theirs.clone()) < 1e-5, "{case}");
            let g_ours = (ours * seed.clone()).sum().backward();
            let g_theirs = (theirs * seed).sum().backward();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_diff(x.grad(&g_ours).expect(name), x.grad(&g_theirs).expect(name));
                assert!(diff < 1e-5, "{case}: d{name} differs by {diff}");
            }
        }
    }

    /// bf16 activations: the output is bf16 and within bf16 rounding of the f32 result.
    #[test]
    fn recomputed_attention_in_bf16() {
        let device = Device::flex().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([1, 2, 5, 8], normal, &device);
        let k = Tensor::<4>::random([1, 2, 5, 8], normal, &device);
        let v = Tensor::<4>::random([1, 2, 5, 8], normal, &device);
        let wide = recomputed_attention(q.clone(), k.clone(), v.clone(), None, true, 0.35);
        let bf16 = |x: Tensor<4>| x.cast(DType::BF16).require_grad();
        let (qn, kn, vn) = (bf16(q), bf16(k), bf16(v));
        let narrow = recomputed_attention(qn.clone(), kn.clone(), vn.clone(), None, true, 0.35);
        assert_eq!(narrow.dtype(), DType::BF16);
        assert!(max_diff(wide, narrow.clone()) < 0.03);
        let grads = narrow.sum().backward();
        for x in [&qn, &kn, &vn] {
            assert_eq!(x.grad(&grads).expect("grad").dtype(), DType::BF16);
        }
    }
}
