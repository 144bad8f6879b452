//! CPU fast paths for the decode step's weight-streaming matmuls on the Flex backend.
//!
//! A decode step multiplies a few activation rows by every weight matrix once: it is bound
//! by how fast the weights stream from memory. Burn's Flex backend sends bf16/f16 matmuls
//! through a serial whole-matrix conversion to f32 on every call, and its f32 gemm is tuned
//! for large products. [`linear`] instead streams the weight `[K, N]` row by row in K
//! blocks (one per rayon task), converting bf16/f16 to f32 in registers, and sums the
//! per-block partial products; the arithmetic is f32 throughout (as PyTorch's CPU bf16
//! gemm accumulates in f32) and the result is rounded once to the weight dtype.
//!
//! Everything else (other backends, many rows, odd layouts) goes to Burn's own ops. For
//! many rows with bf16/f16 weights the weight is widened to f32 once per call and Burn's
//! f32 gemm does the work.

use burn::nn::Linear;
use burn::tensor::{DType, Device, Tensor, TensorData, bf16, f16};
use burn_flex::{Flex, FlexTensor};

use rayon::prelude::*;

/// Rows up to which the streaming kernel is used (decode steps, small batches).
pub const MAX_STREAM_ROWS: usize = 16;

/// True unless `VIPLLAVA_FAST_PATHS=0` (a switch for before/after measurements: Burn's
/// own ops then do all the work).
pub fn fast_paths_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("VIPLLAVA_FAST_PATHS").map_or(true, |v| v != "0"))
}

/// Whether `device` is the plain Flex CPU device: the fast paths work on Flex primitives,
/// which an autodiff device (it compares equal to its inner device) does not hold.
pub fn is_plain_flex(device: &Device) -> bool {
    *device == Device::flex() && !device.is_autodiff()
}

/// `x @ W (+ b)` for a `Linear`, through the streaming kernel where it applies.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    if !fast_paths_enabled() {
        return layer.forward(x);
    }
    // One handle per call: this runs for every projection of every decode step.
    let weight = layer.weight.val();
    let wdtype = weight.dtype();
    // Quantized weights (`--quantize`) and other devices (autodiff, wgpu, ...) go through
    // Burn's own ops.
    if matches!(wdtype, DType::QFloat(_)) || !is_plain_flex(&weight.device()) {
        return layer.forward(x);
    }
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if rows <= MAX_STREAM_ROWS
        && let Some(out) = stream_linear(layer, weight.clone(), &x, rows)
    {
        return out;
    }
    if wdtype != DType::F32 {
        // Many rows: widen once, f32 gemm, round once (Flex would do the same, serially).
        let xf = x.cast(DType::F32);
        let w = weight.cast(DType::F32);
        let mut y = xf.matmul(w.unsqueeze());
        if let Some(b) = &layer.bias {
            y = y + b.val().cast(DType::F32).unsqueeze();
        }
        return y.cast(wdtype);
    }
    layer.forward(x)
}

fn flex_tensor<const D: usize>(t: Tensor<D>) -> Option<FlexTensor> {
    t.try_into_primitive::<Flex>().ok()
}

/// The streaming kernel on `weight` (`layer.weight` on the plain Flex device).
fn stream_linear<const D: usize>(
    layer: &Linear,
    weight: Tensor<2>,
    x: &Tensor<D>,
    rows: usize,
) -> Option<Tensor<D>> {
    let device = weight.device();
    let dtype = weight.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || x.dtype() != dtype {
        return None;
    }
    let [k, n] = weight.dims();
    let w = flex_tensor(weight)?;
    let layout = w.layout();
    if layout.strides() != [n as isize, 1] {
        return None;
    }
    let offset = layout.start_offset();
    let xs: Vec<f32> = x
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .ok()?;
    if xs.len() != rows * k {
        return None;
    }
    let bias: Option<Vec<f32>> = match &layer.bias {
        Some(b) => Some(b.val().into_data().convert::<f32>().try_into_vec::<f32>().ok()?),
        None => None,
    };
    let mut out = match dtype {
        DType::F32 => matmul_stream(&xs, &w.storage::<f32>()[offset..offset + k * n], rows, k, n),
        DType::BF16 => matmul_stream(&xs, &w.storage::<bf16>()[offset..offset + k * n], rows, k, n),
        DType::F16 => matmul_stream(&xs, &w.storage::<f16>()[offset..offset + k * n], rows, k, n),
        _ => return None,
    };
    if let Some(b) = bias {
        for row in out.chunks_mut(n) {
            for (o, bv) in row.iter_mut().zip(&b) {
                *o += bv;
            }
        }
    }
    let mut shape = x.dims();
    shape[D - 1] = n;
    let y = Tensor::<D>::from_data(TensorData::new(out, shape), &device);
    Some(if dtype == DType::F32 { y } else { y.cast(dtype) })
}

/// A weight element that widens to f32.
pub trait Widen: Copy + Send + Sync {
    /// The value as f32.
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Rows of W per rayon task. Fixed (not derived from the thread count) so that the
/// summation order, hence the result, is the same on every machine.
const K_BLOCK: usize = 256;

/// `x [rows, k] @ w [k, n]` in f32, streaming `w` once.
pub fn matmul_stream<T: Widen>(x: &[f32], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let tasks = k.div_ceil(K_BLOCK).max(1);
    let per_task = K_BLOCK;
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let k0 = (t * per_task).min(k);
            let k1 = ((t + 1) * per_task).min(k);
            let mut acc = vec![0f32; rows * n];
            if k0 < k1 {
                accumulate(x, w, rows, k, n, k0, k1, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; rows * n];
    for p in &partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn accumulate<T: Widen>(
    x: &[f32],
    w: &[T],
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above).
            unsafe { accumulate_avx512(x, w, rows, k, n, k0, k1, acc) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { accumulate_avx2(x, w, rows, k, n, k0, k1, acc) };
            return;
        }
    }
    accumulate_generic(x, w, rows, k, n, k0, k1, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_avx512<T: Widen>(
    x: &[f32],
    w: &[T],
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    accumulate_generic(x, w, rows, k, n, k0, k1, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_avx2<T: Widen>(
    x: &[f32],
    w: &[T],
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    accumulate_generic(x, w, rows, k, n, k0, k1, acc);
}

/// `acc[r, :] += sum_{kk in k0..k1} x[r, kk] * w[kk, :]`, four weight rows at a time so
/// that the accumulator is read and written once per four rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_generic<T: Widen>(
    x: &[f32],
    w: &[T],
    rows: usize,
    k: usize,
    n: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    let mut kk = k0;
    while kk + 4 <= k1 {
        let w0 = &w[kk * n..(kk + 1) * n];
        let w1 = &w[(kk + 1) * n..(kk + 2) * n];
        let w2 = &w[(kk + 2) * n..(kk + 3) * n];
        let w3 = &w[(kk + 3) * n..(kk + 4) * n];
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            let (a0, a1, a2, a3) = (xr[kk], xr[kk + 1], xr[kk + 2], xr[kk + 3]);
            let out = &mut acc[r * n..(r + 1) * n];
            for ((((o, &b0), &b1), &b2), &b3) in out.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
                let s = a0.mul_add(b0.widen(), *o);
                let s = a1.mul_add(b1.widen(), s);
                let s = a2.mul_add(b2.widen(), s);
                *o = a3.mul_add(b3.widen(), s);
            }
        }
        kk += 4;
    }
    while kk < k1 {
        let w0 = &w[kk * n..(kk + 1) * n];
        for r in 0..rows {
            let a0 = x[r * k + kk];
            let out = &mut acc[r * n..(r + 1) * n];
            for (o, &b0) in out.iter_mut().zip(w0) {
                *o = a0.mul_add(b0.widen(), *o);
            }
        }
        kk += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for kk in 0..k {
                for j in 0..n {
                    out[r * n + j] += x[r * k + kk] as f64 * w[kk * n + j] as f64;
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn stream_matches_reference_for_odd_shapes() {
        for &(rows, k, n) in &[(1, 1, 1), (1, 7, 5), (3, 130, 33), (2, 257, 64), (16, 64, 3)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
                .collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 23) as f32 - 11.0) / 16.0).collect();
            let want = reference(&x, &w, rows, k, n);
            let got = matmul_stream(&x, &w, rows, k, n);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{rows}x{k}x{n}: {a} vs {b}"
                );
            }
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let got = matmul_stream(&x, &wb, rows, k, n);
            let want = reference(&x, &wb32, rows, k, n);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "bf16 {rows}x{k}x{n}: {a} vs {b}"
                );
            }
        }
    }
}
