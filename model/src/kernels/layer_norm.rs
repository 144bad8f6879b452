//! LayerNorm of bf16 and f16 activations (CLIP's, the projector's) in one parallel pass,
//! with the bits of Burn's `LayerNorm` on Flex.
//!
//! Normalized in f32 with Burn's ops (`layers::layer_norm_f32`), a half-precision tensor
//! takes a cast of the whole tensor, Flex's fused f32 row kernel and a cast back, each cast
//! a pass of its own on one thread. For the 577 x
//! 1024 activations of CLIP-L that was 1.1-1.6 ms per norm against the row kernel's share
//! of a tenth of it, twice per layer. Here each task widens its rows, runs the row kernel's
//! three passes (the same vectors, the same `reduce_add`, through the same SIMD crate, so
//! the same sums) and rounds the result back, as the casts would.

use std::mem::MaybeUninit;

use burn::tensor::{DType, Tensor, TensorData, bf16, f16};
use burn_flex::{Flex, FlexTensor};

use super::{fast_paths_enabled, is_plain_flex};

/// Rows per rayon task: Flex's own chunk of rows.
const ROWS_PER_TASK: usize = 64;

/// A half-precision float that the kernel widens to f32 and rounds back to, as Flex's
/// casts do (`to_f32`, `from_f32`: round to nearest even).
trait Half: burn::tensor::Element + bytemuck::Pod + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl Half for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        super::widen_bf16(self)
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        super::round_bf16(v)
    }
}

impl Half for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        super::widen_f16(self)
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        super::round_f16(v)
    }
}

/// LayerNorm of the last dimension of a bf16 or f16 `x` with `gamma` and `beta` of its
/// width and dtype: the values of `burn::nn::LayerNorm::forward` on all three widened to
/// f32, rounded back (PyTorch's CPU `layer_norm` for half precision). `None` where this does not apply: another device
/// or dtype, autodiff, `VIPLLAVA_FAST_PATHS=0`, parameters of another shape or dtype.
pub fn layer_norm_half<const D: usize>(
    x: &Tensor<D>,
    gamma: &Tensor<1>,
    beta: Option<&Tensor<1>>,
    epsilon: f64,
) -> Option<Tensor<D>> {
    let device = x.device();
    let dtype = x.dtype();
    let shape = x.dims();
    let width = shape[D - 1];
    let flex = |t: &Tensor<1>| {
        (is_plain_flex(&t.device()) && t.dtype() == dtype && t.dims() == [width])
            .then(|| t.clone().try_into_primitive::<Flex>().ok())
            .flatten()
    };
    if !fast_paths_enabled() || !is_plain_flex(&device) || width == 0 {
        return None;
    }
    let gamma = flex(gamma)?.to_contiguous();
    let beta = match beta {
        Some(b) => Some(flex(b)?.to_contiguous()),
        None => None,
    };
    let xs: FlexTensor = x.clone().try_into_primitive::<Flex>().ok()?.to_contiguous();
    let data = match dtype {
        DType::BF16 => TensorData::new(
            normalize::<bf16>(&xs, &gamma, beta.as_ref(), width, epsilon),
            shape,
        ),
        DType::F16 => TensorData::new(
            normalize::<f16>(&xs, &gamma, beta.as_ref(), width, epsilon),
            shape,
        ),
        _ => return None,
    };
    Some(Tensor::from_data(data, (&device, dtype)))
}

/// [`layer_norm_half`] on contiguous tensors of `T`.
fn normalize<T: Half>(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: Option<&FlexTensor>,
    width: usize,
    epsilon: f64,
) -> Vec<T> {
    let values = |t: &FlexTensor| -> Vec<f32> { t.storage::<T>().iter().map(|v| v.widen()).collect() };
    let (gamma, beta) = (values(gamma), beta.map(values));
    let xs = x.storage::<T>();
    let beta = beta.as_deref().unwrap_or(&[]);
    assert!(
        xs.len().is_multiple_of(width),
        "whole rows of a contiguous tensor"
    );
    // Not zeroed first, and each task's f32 rows are one row of scratch each: zeroed
    // buffers of the whole tensor and of a task's 64 rows took a memset, on fresh pages, per
    // norm, and the widening and rounding loops ran at the crate's baseline vector width
    // (with the row kernel, 4.8% of a bf16 image encode's samples on a Sapphire
    // Rapids-class Xeon; BENCHMARKS.md round 32).
    let chunk = ROWS_PER_TASK * width;
    let fill = |i: usize, out: &mut [MaybeUninit<T>]| {
        let xs = &xs[i * chunk..][..out.len()];
        let (mut wide, mut normed) = (vec![0f32; width], vec![0f32; width]);
        for (out, row) in out.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
            // The two loops each on their own under `with_simd`: with the row kernel inside
            // one `with_simd` too, the norm took twice the samples.
            super::with_simd(|| {
                for (w, &v) in wide.iter_mut().zip(row) {
                    *w = v.widen();
                }
            });
            rows_f32(&wide, &mut normed, &gamma, beta, width, epsilon as f32);
            super::with_simd(|| {
                for (o, &v) in out.iter_mut().zip(&normed) {
                    o.write(T::narrow(v));
                }
            });
        }
    };
    // SAFETY: `fill` writes every slot of its chunk: a chunk is whole rows (`xs.len()` is a
    // multiple of `width`, and so is `chunk`), each written value by value.
    unsafe { super::written_in_chunks(xs.len(), chunk, fill) }
}

/// Flex's f32 LayerNorm rows (`layer_norm_row_f32_simd` in burn-flex 0.22), pass for pass:
/// the mean, the centered (biased) variance, then `(x - mean) * (inv_std * gamma) + beta`,
/// with the vector width and reductions of the SIMD level macerator picks, as Flex's does.
/// An empty `beta` is none (`with_simd` takes no `Option` of a slice).
#[macerator::with_simd]
fn rows_f32<S: macerator::Simd>(
    input: &[f32],
    output: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    width: usize,
    epsilon: f32,
) {
    use macerator::{Scalar, vload_unaligned, vstore_unaligned};
    let lanes = <f32 as Scalar>::lanes::<S>();
    let vector_len = width / lanes * lanes;
    let n = width as f32;
    assert!(gamma.len() == width && (beta.is_empty() || beta.len() == width));
    for (row, out) in input.chunks_exact(width).zip(output.chunks_exact_mut(width)) {
        let mut acc = 0.0f32.splat::<S>();
        for i in (0..vector_len).step_by(lanes) {
            // SAFETY: `i + lanes <= vector_len <= width`, the row's length.
            acc += unsafe { vload_unaligned::<S, _>(row.as_ptr().add(i)) };
        }
        let mut sum = acc.reduce_add();
        for &x in &row[vector_len..] {
            sum += x;
        }
        let mean = sum / n;
        let mean_vec = mean.splat::<S>();
        let mut acc = 0.0f32.splat::<S>();
        for i in (0..vector_len).step_by(lanes) {
            // SAFETY: as above.
            let d = unsafe { vload_unaligned::<S, _>(row.as_ptr().add(i)) } - mean_vec;
            acc = d.mul_add(d, acc);
        }
        let mut squares = acc.reduce_add();
        for &x in &row[vector_len..] {
            let d = x - mean;
            squares += d * d;
        }
        let inv_std = 1.0f32 / (squares / n + epsilon).sqrt();
        let inv_std_vec = inv_std.splat::<S>();
        for i in (0..vector_len).step_by(lanes) {
            // SAFETY: `i + lanes <= width` for the row, the output row, gamma and beta.
            unsafe {
                let x = vload_unaligned::<S, _>(row.as_ptr().add(i));
                let g = vload_unaligned::<S, _>(gamma.as_ptr().add(i));
                let normed = (x - mean_vec) * (inv_std_vec * g);
                let y = if beta.is_empty() {
                    normed
                } else {
                    normed + vload_unaligned::<S, _>(beta.as_ptr().add(i))
                };
                vstore_unaligned::<S, _>(out.as_mut_ptr().add(i), y);
            }
        }
        for i in vector_len..width {
            let normed = (row[i] - mean) * inv_std * gamma[i];
            out[i] = if beta.is_empty() { normed } else { normed + beta[i] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::tensor::Distribution;

    /// The bits of Burn's f32 `LayerNorm` on the widened values, rounded back, for bf16 and
    /// f16, with and without beta, widths below, at and past whole vectors and row counts
    /// past whole tasks.
    #[test]
    fn half_layer_norm_has_the_bits_of_burns() {
        let device = burn::tensor::Device::flex();
        for dtype in [DType::BF16, DType::F16] {
            for &(rows, width, with_beta) in
                &[(3, 5, true), (70, 1024, true), (129, 40, false), (1, 16, true)]
            {
                let epsilon = 1e-5;
                let mut norm = LayerNormConfig::new(width).with_epsilon(epsilon).init(&device);
                let random =
                    |shape: [usize; 1]| Tensor::<1>::random(shape, Distribution::Normal(0.5, 1.0), &device);
                norm.gamma = Param::from_tensor(random([width]).cast(dtype));
                norm.beta = with_beta.then(|| Param::from_tensor(random([width]).cast(dtype)));
                let x =
                    Tensor::<2>::random([rows, width], Distribution::Normal(0.3, 2.0), &device).cast(dtype);
                let ours = layer_norm_half(
                    &x,
                    &norm.gamma.val(),
                    norm.beta.as_ref().map(|b| b.val()).as_ref(),
                    epsilon,
                )
                .expect("applies");
                assert_eq!(ours.dtype(), dtype);
                // What `layers::layer_norm_f32` did before: all three widened, Flex's f32
                // LayerNorm, the result rounded back.
                let mut wide = norm.clone();
                wide.gamma = Param::from_tensor(norm.gamma.val().cast(DType::F32));
                wide.beta = norm
                    .beta
                    .as_ref()
                    .map(|b| Param::from_tensor(b.val().cast(DType::F32)));
                let burn = wide.forward(x.cast(DType::F32)).cast(dtype);
                let bits = |t: Tensor<2>| -> Vec<u32> {
                    let values: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("f32");
                    values.iter().map(|v| v.to_bits()).collect()
                };
                assert!(
                    bits(ours) == bits(burn),
                    "{dtype:?} {rows}x{width} beta {with_beta}"
                );
            }
        }
        let f32_input = Tensor::<2>::zeros([2, 8], &device);
        let gamma = Tensor::<1>::ones([8], &device);
        assert!(
            layer_norm_half(&f32_input, &gamma, None, 1e-5).is_none(),
            "f32 is Flex's own"
        );
        let x = f32_input.cast(DType::BF16);
        assert!(
            layer_norm_half(&x, &gamma, None, 1e-5).is_none(),
            "gamma of another dtype"
        );
    }
}
