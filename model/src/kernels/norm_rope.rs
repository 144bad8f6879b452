//! Llama's RMSNorm and rotary embedding in one pass each, with the bits of Burn's ops.
//!
//! Written with Burn's ops, an RMSNorm is eight tensor operations (widen, square, mean,
//! add, square root, reciprocal, multiply, round back, times the weight) and a rotary
//! embedding nine (two casts, two narrows, a negation, a concatenation, two products and
//! a sum). On a decode step each works on a few thousand values, so their cost is the
//! per-operation overhead: about 2 ms of a 1.1B model's token (22 layers, two norms and
//! two embeddings each), while the helper thread of the decode team waits. Here each is
//! one pass over the values, doing the same f32 operations and the same roundings to the
//! tensor's dtype in the same order, so the results are bit for bit those of the ops (the
//! tests compare bits); the mean square is summed by Flex's own row-sum kernel.

use burn::tensor::{DType, Tensor, TensorData, bf16, f16};
use burn_flex::{Flex, FlexTensor};

use super::{Vectorized, Widen, fast_paths_enabled, is_plain_flex, round_bf16, vectorized};

/// A float a tensor stores: widened to f32 for arithmetic and rounded back after each
/// operation, as Flex's f16/bf16 ops do (f32 needs no rounding).
trait Stored: Widen + burn::tensor::Element + bytemuck::Pod {
    /// The nearest value of this type (ties to even).
    fn narrow(v: f32) -> Self;
}

impl Stored for f32 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Stored for bf16 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        // The bits of `bf16::from_f32`, in a form that vectorizes.
        round_bf16(v)
    }
}

impl Stored for f16 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        // The bits of `f16::from_f32`, in a form that vectorizes.
        super::round_f16(v)
    }
}

/// Llama's RMSNorm of the last dimension of `x` (any float dtype), as `LlamaRmsNorm`
/// computes it with Burn's ops: in f32, `x * 1 / sqrt(mean(x²) + eps)`, rounded to `x`'s
/// dtype, times the weight rounded to that dtype. `None` where this does not apply (other
/// devices, autodiff, `VIPLLAVA_FAST_PATHS=0`, other dtypes, a weight of another width, a
/// non-contiguous `x`).
pub fn rms_norm<const D: usize>(x: &Tensor<D>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let device = x.device();
    if !fast_paths_enabled() || !is_plain_flex(&device) || !is_plain_flex(&weight.device()) {
        return None;
    }
    let shape = x.dims();
    let width = shape[D - 1];
    if width == 0 || weight.dims() != [width] {
        return None;
    }
    let dtype = x.dtype();
    let xs: FlexTensor = x.clone().try_into_primitive::<Flex>().ok()?;
    let ws: FlexTensor = weight.clone().try_into_primitive::<Flex>().ok()?;
    let values = |t: &FlexTensor| {
        let layout = t.layout();
        layout
            .is_contiguous()
            .then(|| (layout.start_offset(), layout.num_elements()))
    };
    let ((x0, len), (w0, _)) = (values(&xs)?, values(&ws)?);
    let (x, w) = ((&xs, x0, len), (&ws, w0));
    let data = match (dtype, ws.dtype()) {
        (DType::F32, DType::F32) => TensorData::new(norm_rows::<f32, f32>(x, w, width, eps), shape),
        (DType::BF16, DType::BF16) => TensorData::new(norm_rows::<bf16, bf16>(x, w, width, eps), shape),
        (DType::BF16, DType::F32) => TensorData::new(norm_rows::<bf16, f32>(x, w, width, eps), shape),
        (DType::F16, DType::F16) => TensorData::new(norm_rows::<f16, f16>(x, w, width, eps), shape),
        (DType::F16, DType::F32) => TensorData::new(norm_rows::<f16, f32>(x, w, width, eps), shape),
        _ => return None,
    };
    Some(Tensor::from_data(data, (&device, dtype)))
}

/// [`rms_norm`] on `x`'s `len` values from `x0`, rows of `width`, with the weight's `width`
/// values from `w0`: a prefill's rows in parallel blocks (one thread took 6.3 ms for the
/// 617 x 2048 rows of the 1.1B model, 44 times per prefill), a decode step's on this one.
fn norm_rows<T: Stored, W: Stored>(
    (x, x0, len): (&FlexTensor, usize, usize),
    (w, w0): (&FlexTensor, usize),
    width: usize,
    eps: f64,
) -> Vec<T> {
    let x = &x.storage::<T>()[x0..x0 + len];
    // The weight rounded to `x`'s dtype, as the ops cast it.
    let weight: Vec<f32> = w.storage::<W>()[w0..w0 + width]
        .iter()
        .map(|v| T::narrow(v.widen()).widen())
        .collect();
    let mut out = vec![T::zeroed(); len];
    let block = NORM_BLOCK_ROWS * width;
    let task = |(x, out): (&[T], &mut [T])| {
        vectorized(NormRows {
            x,
            weight: &weight,
            width,
            eps,
            out,
        })
    };
    if len >= PARALLEL_VALUES {
        use rayon::prelude::*;
        x.par_chunks(block).zip(out.par_chunks_mut(block)).for_each(task);
    } else {
        x.chunks(block).zip(out.chunks_mut(block)).for_each(task);
    }
    out
}

/// Rows per task of [`norm_rows`].
const NORM_BLOCK_ROWS: usize = 16;

/// The arguments of [`norm_rows`] for one block of rows, as [`Vectorized`] work.
struct NormRows<'a, T> {
    x: &'a [T],
    /// The weight as the ops see it (rounded to `T`), widened.
    weight: &'a [f32],
    width: usize,
    eps: f64,
    out: &'a mut [T],
}

impl<T: Stored> Vectorized for NormRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            x,
            weight,
            width,
            eps,
            out,
        } = self;
        let rows = x.len() / width;
        let wide: Vec<f32> = x.iter().map(|v| v.widen()).collect();
        let squares: Vec<f32> = wide.iter().map(|v| v * v).collect();
        let mut sums = vec![0f32; rows];
        burn_flex::simd::kernels::sum_rows_f32(&squares, &mut sums, rows, width);
        for ((row, sum), out) in wide
            .chunks_exact(width)
            .zip(sums)
            .zip(out.chunks_exact_mut(width))
        {
            // The ops' steps: the mean as sum / width, eps added in f32, then 1 / sqrt.
            let scale = 1.0 / (sum / width as f32 + eps as f32).sqrt();
            for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
                *o = T::narrow(T::narrow(v * scale).widen() * w);
            }
        }
    }
}

/// Values from which [`rope`] runs its `(batch, head)` rows on the rayon pool (a prefill's,
/// not a decode step's).
const PARALLEL_VALUES: usize = 1 << 16;

/// HF's `apply_rotary_pos_emb` of `x [b, heads, t, d]` (any float dtype, read in place
/// whatever its strides, inner stride 1) with `cos`, `sin` `[b | 1, 1, t, d]` in f32, as
/// `x * cos + rotate_half(x) * sin` computes it with Burn's ops: `cos` and `sin` rounded to
/// `x`'s dtype, each product and the sum rounded to it. The result is contiguous. `None`
/// where this does not apply (other devices, autodiff, `VIPLLAVA_FAST_PATHS=0`, other
/// dtypes or shapes, an odd head size).
pub fn rope(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    let device = x.device();
    let [b, heads, t, d] = x.dims();
    let [cb, ch, ct, cd] = cos.dims();
    if !fast_paths_enabled()
        || !is_plain_flex(&device)
        || !is_plain_flex(&cos.device())
        || !is_plain_flex(&sin.device())
        || (cb != b && cb != 1)
        || ch != 1
        || ct != t
        || cd != d
        || sin.dims() != cos.dims()
        || cos.dtype() != DType::F32
        || sin.dtype() != DType::F32
        || !d.is_multiple_of(2)
    {
        return None;
    }
    let table = |t: &Tensor<4>| super::host_f32(t.clone());
    let (cos, sin) = (table(cos)?, table(sin)?);
    let xs: FlexTensor = x.clone().try_into_primitive::<Flex>().ok()?;
    // Read in place as the decode attention reads the KV cache: every index checked.
    let (offset, strides) = super::attention::strided_parts(&xs)?;
    let view = View {
        offset,
        strides: [strides[0], strides[1], strides[2]],
        heads,
        t,
        d,
        table_rows: if cb == 1 { 0 } else { t },
    };
    let dtype = x.dtype();
    let tables = (cos.as_slice(), sin.as_slice());
    let data = match dtype {
        DType::F32 => TensorData::new(view.rotate::<f32>(&xs, tables, b), [b, heads, t, d]),
        DType::BF16 => TensorData::new(view.rotate::<bf16>(&xs, tables, b), [b, heads, t, d]),
        DType::F16 => TensorData::new(view.rotate::<f16>(&xs, tables, b), [b, heads, t, d]),
        _ => return None,
    };
    Some(Tensor::from_data(data, (&device, dtype)))
}

/// Where [`rope`] reads `x [b, heads, t, d]` and its tables.
struct View {
    offset: usize,
    /// Strides of the batch, head and position dimensions (the inner one is 1).
    strides: [usize; 3],
    heads: usize,
    t: usize,
    d: usize,
    /// Positions per sequence in the tables: `t`, or 0 when one table serves every sequence.
    table_rows: usize,
}

impl View {
    /// The storage index of `x[bi, h, i, 0]`.
    fn at(&self, bi: usize, h: usize, i: usize) -> usize {
        self.offset + bi * self.strides[0] + h * self.strides[1] + i * self.strides[2]
    }

    /// The rotated values of `x`, contiguous `[b, heads, t, d]`.
    fn rotate<T: Stored>(&self, x: &FlexTensor, (cos, sin): (&[f32], &[f32]), b: usize) -> Vec<T> {
        use rayon::prelude::*;

        let (t, d) = (self.t, self.d);
        let data = x.storage::<T>();
        // The tables rounded to `x`'s dtype, as the ops cast them.
        let round = |v: &[f32]| v.iter().map(|&c| T::narrow(c).widen()).collect::<Vec<f32>>();
        let (cos, sin) = (round(cos), round(sin));
        let mut out = vec![T::narrow(0.0); b * self.heads * t * d];
        if t * d == 0 {
            return out;
        }
        let head = |(task, out): (usize, &mut [T])| {
            let (bi, h) = (task / self.heads, task % self.heads);
            let table = bi * self.table_rows * d;
            vectorized(RotateHead {
                view: self,
                x: data,
                bi,
                h,
                cos: &cos[table..],
                sin: &sin[table..],
                out,
            })
        };
        if out.len() >= PARALLEL_VALUES {
            out.par_chunks_mut(t * d).enumerate().for_each(head);
        } else {
            out.chunks_mut(t * d).enumerate().for_each(head);
        }
        out
    }
}

/// One `(batch, head)` of [`View::rotate`], as [`Vectorized`] work: `out` gets its `t`
/// rotated rows; `cos` and `sin` start at the sequence's table.
struct RotateHead<'a, T> {
    view: &'a View,
    x: &'a [T],
    bi: usize,
    h: usize,
    cos: &'a [f32],
    sin: &'a [f32],
    out: &'a mut [T],
}

impl<T: Stored> Vectorized for RotateHead<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let d = self.view.d;
        // f16 with F16C: each narrowing one instruction per 8 values (`round_f16` takes a
        // dozen per value, and this loop three per value: 2% of an f16 prefill on AVX2).
        #[cfg(target_arch = "x86_64")]
        if T::dtype() == DType::F16 && super::Simd::best() != super::Simd::Plain && d.is_multiple_of(16) {
            let x: &[f16] = bytemuck::cast_slice(self.x);
            let out: &mut [f16] = bytemuck::cast_slice_mut(self.out);
            for (i, out) in out.chunks_exact_mut(d).enumerate() {
                let row = &x[self.view.at(self.bi, self.h, i)..][..d];
                let (c, s) = (&self.cos[i * d..(i + 1) * d], &self.sin[i * d..(i + 1) * d]);
                // SAFETY: `Simd::Avx2` and `Simd::Avx512` are only chosen on CPUs with AVX2,
                // FMA and F16C.
                unsafe { rotate_f16(out, row, c, s) };
            }
            return;
        }
        for (i, out) in self.out.chunks_exact_mut(d).enumerate() {
            let row = &self.x[self.view.at(self.bi, self.h, i)..][..d];
            let (c, s) = (&self.cos[i * d..(i + 1) * d], &self.sin[i * d..(i + 1) * d]);
            // `rotate_half`: `[-x2, x1]` (the negation is exact in every dtype). Each half
            // in its own loop of plain slices, so that both vectorize.
            let rotate = |out: &mut [T], x: &[T], turned: &[T], sign: f32, c: &[f32], s: &[f32]| {
                for ((((o, x), r), c), s) in out.iter_mut().zip(x).zip(turned).zip(c).zip(s) {
                    let straight = T::narrow(x.widen() * c).widen();
                    let turned = T::narrow(sign * r.widen() * s).widen();
                    *o = T::narrow(straight + turned);
                }
            };
            let (first, second) = row.split_at(d / 2);
            let (out_first, out_second) = out.split_at_mut(d / 2);
            let (c_first, c_second) = c.split_at(d / 2);
            let (s_first, s_second) = s.split_at(d / 2);
            rotate(out_first, first, second, -1.0, c_first, s_first);
            rotate(out_second, second, first, 1.0, c_second, s_second);
        }
    }
}

/// [`RotateHead`]'s row for f16 with F16C: `out = narrow(narrow(x * c) + narrow(sign * r
/// * s))` 8 values at a time, `r` the other half of the row and `sign` -1 in the first half,
/// the operations and roundings of the plain loop (`vcvtps2ph` rounds to nearest even as
/// `round_f16` does).
///
/// # Safety
/// The CPU must have AVX2 and F16C; `out`, `row`, `c` and `s` must hold the same number of
/// values, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn rotate_f16(out: &mut [f16], row: &[f16], c: &[f32], s: &[f32]) {
    use std::arch::x86_64::*;

    let d = row.len();
    assert!(d.is_multiple_of(16) && out.len() == d && c.len() == d && s.len() == d);
    let half = d / 2;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
    let round = |v: __m256| _mm256_cvtph_ps(_mm256_cvtps_ph::<NEAREST>(v));
    for (at, other, sign) in [(0, half, -1.0f32), (half, 0, 1.0)] {
        let sign = _mm256_set1_ps(sign);
        for j in (0..half).step_by(8) {
            // SAFETY: values `at + j..at + j + 8` and `other + j..other + j + 8` lie in the
            // slices of `d` values (asserted above).
            unsafe {
                let x = super::widen8(row.as_ptr().add(at + j));
                let r = super::widen8(row.as_ptr().add(other + j));
                let (cv, sv) = (
                    _mm256_loadu_ps(c.as_ptr().add(at + j)),
                    _mm256_loadu_ps(s.as_ptr().add(at + j)),
                );
                let straight = round(_mm256_mul_ps(x, cv));
                let turned = round(_mm256_mul_ps(_mm256_mul_ps(sign, r), sv));
                let sum = _mm256_cvtps_ph::<NEAREST>(_mm256_add_ps(straight, turned));
                _mm_storeu_si128(out.as_mut_ptr().add(at + j).cast(), sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::layers::LlamaRmsNorm;
    use crate::llama::apply_rope_ops;

    /// The values' bits, widened to f32 (exact and one-to-one for bf16 and f16).
    fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
        let values: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("f32");
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Normal values with a spread of magnitudes, so that roundings happen at every step.
    fn values<const D: usize>(shape: [usize; D], scale: f64, dtype: DType) -> Tensor<D> {
        let device = Device::flex();
        let t = Tensor::<D>::random(shape, Distribution::Normal(0.0, scale), &device);
        t.cast(dtype)
    }

    #[test]
    fn rms_norm_has_the_bits_of_the_tensor_ops() {
        let device = Device::flex();
        for (dtype, weight_dtype) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F16, DType::F16),
            (DType::F16, DType::F32),
        ] {
            // The last: a prefill's rows in parallel blocks of 16, the last block short.
            for (rows, width, eps, scale) in [
                (1, 2048, 1e-5, 1.0),
                (3, 37, 1e-6, 30.0),
                (2, 1, 1e-5, 0.01),
                (67, 1000, 1e-5, 1.0),
            ] {
                let mut norm = LlamaRmsNorm::new(width, eps, &device);
                let weight = values([width], 0.5, DType::F32) + 1.0;
                norm.weight = burn::module::Param::from_tensor(weight.cast(weight_dtype));
                let x: Tensor<3> = values([1, rows, width], scale, dtype);
                let fused = rms_norm(&x, &norm.weight.val(), eps).expect("the fused norm applies");
                assert_eq!(fused.dims(), x.dims());
                assert_eq!(fused.dtype(), dtype);
                let ops = norm.forward_ops(x);
                assert_eq!(
                    bits(fused),
                    bits(ops),
                    "{dtype:?} x {weight_dtype:?}, {rows} x {width}"
                );
            }
        }
    }

    #[test]
    fn rope_has_the_bits_of_the_tensor_ops() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // Decode (one position), a short prefill of two sequences with their own tables,
            // and one table for every sequence; head sizes 64 and 6.
            for (b, heads, t, d, table_batch) in [(1, 32, 1, 64, 1), (2, 4, 5, 16, 2), (3, 2, 3, 6, 1)] {
                // As the model makes them: `[b, t, heads * d]` seen as `[b, heads, t, d]`.
                let projected: Tensor<3> = values([b, t, heads * d], 2.0, dtype);
                let x = projected.reshape([b, t, heads, d]).swap_dims(1, 2);
                let angles: Tensor<4> = values([table_batch, 1, t, d], 3.0, DType::F32);
                let (cos, sin) = (angles.clone().cos(), angles.sin());
                let fused = rope(&x, &cos, &sin).expect("the fused rope applies");
                assert_eq!(fused.dims(), [b, heads, t, d]);
                assert_eq!(fused.dtype(), dtype);
                let ops = apply_rope_ops(x, &cos, &sin);
                assert_eq!(bits(fused), bits(ops), "{dtype:?} {b}x{heads}x{t}x{d}");
            }
        }
    }

    #[test]
    fn other_shapes_are_left_to_the_tensor_ops() {
        let x: Tensor<4> = values([1, 2, 1, 5], 1.0, DType::F32);
        let table: Tensor<4> = values([1, 1, 1, 5], 1.0, DType::F32);
        assert!(rope(&x, &table, &table).is_none(), "odd head size");
        let x: Tensor<4> = values([1, 2, 3, 4], 1.0, DType::F32);
        let table: Tensor<4> = values([1, 1, 2, 4], 1.0, DType::F32);
        assert!(rope(&x, &table, &table).is_none(), "table of other positions");
        let x: Tensor<2> = values([2, 8], 1.0, DType::F32);
        let weight: Tensor<1> = values([4], 1.0, DType::F32);
        assert!(rms_norm(&x, &weight, 1e-5).is_none(), "weight of another width");
    }
}
