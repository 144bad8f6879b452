//! Attention for decode steps on Flex: a few query rows against the KV cache, read where it
//! lies.
//!
//! Burn's Flex attention makes contiguous f32 copies of the whole cache on every call (a
//! cast for bf16/f16, a copy for a strided view) and runs tiled gemms sized for prefill.
//! A decode step has one query row per sequence: here each (sequence, head) task reads its
//! key/value head in place (any strides, bf16/f16 widened in registers), keeps the scores
//! of its row, and applies the softmax in f32, as Flex does after its cast. Masking
//! follows Burn's: `true` in the mask, or a key after the query's position when causal
//! (bottom-right aligned), is excluded; a fully masked row yields zeros.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor, TensorData, bf16, f16};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{Vectorized, Widen, host_f32, is_plain_flex, vectorized};

/// Query rows per sequence up to which [`decode_attention`] applies (decode steps and short
/// follow-ups; longer prefills go to Burn's tiled kernel).
pub const MAX_QUERY_ROWS: usize = 16;

/// A `[batch, heads, len, head_dim]` tensor read in place: storage, start and strides.
struct Strided<'a, T> {
    data: &'a [T],
    offset: usize,
    strides: [usize; 4],
}

impl<T: Copy> Strided<'_, T> {
    /// The `head_dim` values at `(b, h, j)` (contiguous: the inner stride is 1).
    #[inline(always)]
    fn row(&self, b: usize, h: usize, j: usize, d: usize) -> &[T] {
        let start = self.offset + b * self.strides[0] + h * self.strides[1] + j * self.strides[2];
        &self.data[start..start + d]
    }
}

/// The layout of `t` when it can be read in place: non-negative strides, inner stride 1, and
/// every index inside the storage.
fn strided_parts(t: &FlexTensor) -> Option<(usize, [usize; 4])> {
    let layout = t.layout();
    let dims = layout.shape().to_vec();
    let strides = layout.strides();
    if dims.len() != 4 || strides.len() != 4 || strides[3] != 1 || strides.iter().any(|&s| s < 0) {
        return None;
    }
    let strides = [0, 1, 2, 3].map(|i| strides[i] as usize);
    let offset = layout.start_offset();
    if dims.contains(&0) {
        return Some((offset, strides));
    }
    let last = offset + (0..4).map(|i| (dims[i] - 1) * strides[i]).sum::<usize>();
    let elements = t.bytes().len() / t.dtype().size().max(1);
    (last < elements).then_some((offset, strides))
}

/// Scaled dot-product attention of `q [b, heads, t, d]` over `k`, `v [b, kv_heads, total, d]`
/// (`heads` a multiple of `kv_heads`, GQA), with an optional mask `[b, 1 | heads, t, total]`
/// (`true` = excluded). `None` when this kernel does not apply (another device, more than
/// [`MAX_QUERY_ROWS`] query rows, a softcap, mixed or integer dtypes, unreadable layouts):
/// the caller then uses Burn's attention.
pub fn decode_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    options: &AttentionModuleOptions,
) -> Option<Tensor<4>> {
    let device = q.device();
    let dtype = q.dtype();
    let [b, heads, t, d] = q.dims();
    let [kb, kv_heads, total, kd] = k.dims();
    if !is_plain_flex(&device)
        || t == 0
        || t > MAX_QUERY_ROWS
        || options.softcap.is_some()
        || k.dtype() != dtype
        || v.dtype() != dtype
        || v.dims() != [kb, kv_heads, total, kd]
        || kb != b
        || kd != d
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || (options.is_causal && total < t)
        || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
    {
        return None;
    }
    let mask = match mask {
        Some(m) => {
            let [mb, mh, mt, mtotal] = m.dims();
            if mb != b || (mh != 1 && mh != heads) || mt != t || mtotal != total {
                return None;
            }
            let values: Vec<bool> = m
                .clone()
                .into_data()
                .convert::<bool>()
                .try_into_vec::<bool>()
                .ok()?;
            Some((values, mh))
        }
        None => None,
    };
    let queries = host_f32(q.clone())?;
    let k = k.clone().try_into_primitive::<Flex>().ok()?;
    let v = v.clone().try_into_primitive::<Flex>().ok()?;
    let shape = Shape4 {
        heads,
        rep: heads / kv_heads,
        t,
        total,
        d,
        scale: options.scale.map_or(1.0 / (d as f32).sqrt(), |s| s as f32),
        causal: options.is_causal,
    };
    let mask = mask.as_ref().map(|(values, mh)| (values.as_slice(), *mh));
    let out = match dtype {
        DType::F32 => run::<f32>(&queries, &k, &v, mask, b, &shape)?,
        DType::BF16 => run::<bf16>(&queries, &k, &v, mask, b, &shape)?,
        DType::F16 => run::<f16>(&queries, &k, &v, mask, b, &shape)?,
        _ => return None,
    };
    let y = Tensor::<4>::from_data(TensorData::new(out, [b, heads, t, d]), &device);
    Some(if dtype == DType::F32 { y } else { y.cast(dtype) })
}

/// `t` read in place as `T` (`None` for another dtype or an unreadable layout).
fn strided<T: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> Option<Strided<'_, T>> {
    if t.dtype() != T::dtype() {
        return None;
    }
    let (offset, strides) = strided_parts(t)?;
    Some(Strided {
        data: t.storage::<T>(),
        offset,
        strides,
    })
}

/// The sizes every task shares.
struct Shape4 {
    heads: usize,
    rep: usize,
    t: usize,
    total: usize,
    d: usize,
    scale: f32,
    causal: bool,
}

/// All `(batch, head)` tasks in parallel over keys and values stored as `T`; the output is
/// `[b, heads, t, d]` f32.
fn run<T: Widen + burn::tensor::Element + bytemuck::Pod>(
    q: &[f32],
    k: &FlexTensor,
    v: &FlexTensor,
    mask: Option<(&[bool], usize)>,
    b: usize,
    s: &Shape4,
) -> Option<Vec<f32>> {
    let (k, v) = (strided::<T>(k)?, strided::<T>(v)?);
    let mut out = vec![0f32; b * s.heads * s.t * s.d];
    out.par_chunks_mut(s.t * s.d).enumerate().for_each(|(task, out)| {
        vectorized(Head {
            q,
            k: &k,
            v: &v,
            mask,
            bi: task / s.heads,
            h: task % s.heads,
            s,
            out,
        })
    });
    Some(out)
}

/// One `(batch, head)` task of [`run`], as [`Vectorized`] work.
struct Head<'a, T> {
    q: &'a [f32],
    k: &'a Strided<'a, T>,
    v: &'a Strided<'a, T>,
    mask: Option<(&'a [bool], usize)>,
    bi: usize,
    h: usize,
    s: &'a Shape4,
    out: &'a mut [f32],
}

impl<T: Widen> Vectorized for Head<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        head(
            self.q, self.k, self.v, self.mask, self.bi, self.h, self.s, self.out,
        );
    }
}

/// Attention of head `h` of sequence `bi` for its `t` query rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head<T: Widen>(
    q: &[f32],
    k: &Strided<'_, T>,
    v: &Strided<'_, T>,
    mask: Option<(&[bool], usize)>,
    bi: usize,
    h: usize,
    s: &Shape4,
    out: &mut [f32],
) {
    let kvh = h / s.rep;
    let mut scores = vec![0f32; s.total];
    for i in 0..s.t {
        let qrow = &q[((bi * s.heads + h) * s.t + i) * s.d..][..s.d];
        // Keys after the query's own position are excluded when causal.
        let visible = if s.causal { s.total - s.t + i + 1 } else { s.total };
        let masked = |j: usize| {
            mask.is_some_and(|(m, mh)| {
                let mhead = if mh == 1 { 0 } else { h };
                m[((bi * mh + mhead) * s.t + i) * s.total + j]
            })
        };
        let mut max = f32::NEG_INFINITY;
        for (j, score) in scores.iter_mut().enumerate().take(visible) {
            *score = if masked(j) {
                f32::NEG_INFINITY
            } else {
                dot(qrow, k.row(bi, kvh, j, s.d)) * s.scale
            };
            max = max.max(*score);
        }
        let row = &mut out[i * s.d..(i + 1) * s.d];
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut sum = 0f32;
        for score in scores.iter_mut().take(visible) {
            *score = (*score - max).exp();
            sum += *score;
        }
        row.fill(0.0);
        for (j, &p) in scores.iter().enumerate().take(visible) {
            if p != 0.0 {
                for (o, &x) in row.iter_mut().zip(v.row(bi, kvh, j, s.d)) {
                    *o = p.mul_add(x.widen(), *o);
                }
            }
        }
        let inv = 1.0 / sum;
        for o in row.iter_mut() {
            *o *= inv;
        }
    }
}

#[inline(always)]
fn dot<T: Widen>(q: &[f32], k: &[T]) -> f32 {
    // Eight partial sums so that the loop vectorizes (f32 addition does not reassociate).
    let mut acc = [0f32; 8];
    let mut qc = q.chunks_exact(8);
    let mut kc = k.chunks_exact(8);
    for (qs, ks) in (&mut qc).zip(&mut kc) {
        for i in 0..8 {
            acc[i] = qs[i].mul_add(ks[i].widen(), acc[i]);
        }
    }
    let mut tail = 0f32;
    for (&a, &b) in qc.remainder().iter().zip(kc.remainder()) {
        tail = a.mul_add(b.widen(), tail);
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention;
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let a: Vec<f32> = a.into_data().convert::<f32>().try_into_vec().expect("f32");
        let b: Vec<f32> = b.into_data().convert::<f32>().try_into_vec().expect("f32");
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Against Burn's own attention (with HF's `repeat_kv` for GQA): causal and masked,
    /// 1 and 3 query rows, f32/bf16/f16, keys and values given as a narrowed view of a
    /// larger buffer (the KV cache's capacity), a fully masked row.
    #[test]
    fn decode_attention_equals_burn() {
        let device = burn::tensor::Device::flex();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(b, heads, kv_heads, t, total, d) in
                &[(1, 4, 4, 1, 9, 16), (2, 8, 2, 3, 21, 24), (3, 6, 3, 1, 40, 64)]
            {
                let q = Tensor::<4>::random([b, heads, t, d], Distribution::Normal(0.0, 1.0), &device)
                    .cast(dtype);
                let cap = total + 5;
                let kbuf =
                    Tensor::<4>::random([b, kv_heads, cap, d], Distribution::Normal(0.0, 1.0), &device)
                        .cast(dtype);
                let vbuf =
                    Tensor::<4>::random([b, kv_heads, cap, d], Distribution::Normal(0.0, 1.0), &device)
                        .cast(dtype);
                let k = kbuf.clone().slice([0..b, 0..kv_heads, 0..total, 0..d]);
                let v = vbuf.clone().slice([0..b, 0..kv_heads, 0..total, 0..d]);
                let rep = heads / kv_heads;
                let expand = |x: Tensor<4>| {
                    x.unsqueeze_dim::<5>(2)
                        .expand([b, kv_heads, rep, total, d])
                        .reshape([b, heads, total, d])
                };
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                // Causal.
                let options = AttentionModuleOptions {
                    is_causal: true,
                    ..Default::default()
                };
                let ours = decode_attention(&q, &k, &v, None, &options).expect("applies");
                let burn = attention(
                    q.clone(),
                    expand(k.clone()),
                    expand(v.clone()),
                    None,
                    None,
                    options,
                );
                let diff = max_diff(ours, burn);
                assert!(
                    diff <= tol,
                    "{dtype:?} causal {b}x{heads}/{kv_heads}x{t}x{total}x{d}: {diff}"
                );
                // A padding mask over keys (every second key of sequence 0 excluded, the
                // last sequence fully masked on its first query row).
                let mut m = vec![false; b * t * total];
                for j in (0..total).step_by(2) {
                    m[j] = true;
                }
                if b > 1 {
                    for j in 0..total {
                        m[((b - 1) * t) * total + j] = true;
                    }
                }
                let mask = Tensor::<4, Bool>::from_data(TensorData::new(m, [b, 1, t, total]), &device);
                let options = AttentionModuleOptions::default();
                let ours = decode_attention(&q, &k, &v, Some(&mask), &options).expect("applies");
                let full = mask.clone().expand([b, heads, t, total]);
                let burn = attention(
                    q.clone(),
                    expand(k.clone()),
                    expand(v.clone()),
                    Some(full),
                    None,
                    options,
                );
                let diff = max_diff(ours, burn);
                assert!(
                    diff <= tol,
                    "{dtype:?} masked {b}x{heads}/{kv_heads}x{t}x{total}x{d}: {diff}"
                );
            }
        }
        // Too many query rows, or a softcap: not this kernel.
        let q = Tensor::<4>::zeros([1, 2, MAX_QUERY_ROWS + 1, 8], &device);
        let k = Tensor::<4>::zeros([1, 2, MAX_QUERY_ROWS + 1, 8], &device);
        assert!(decode_attention(&q, &k, &k, None, &AttentionModuleOptions::default()).is_none());
        let q = Tensor::<4>::zeros([1, 2, 1, 8], &device);
        let softcap = AttentionModuleOptions {
            softcap: Some(30.0),
            ..Default::default()
        };
        assert!(decode_attention(&q, &k, &k, None, &softcap).is_none());
    }
}
