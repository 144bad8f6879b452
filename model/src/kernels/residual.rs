//! The residual sums of a prefill (`h = x + attention(x)`, `h + mlp(h)`) on the rayon pool.
//!
//! Flex adds two bf16 tensors value by value on one thread, each value widened and rounded
//! through `half`'s scalar conversions: 0.5-0.9 ms for CLIP-L's 577 x 1024 activations,
//! twice per layer, and twice as long for the 1.1B Llama's 617 x 2048. Here the values are
//! summed in parallel chunks by loops that vectorize, with the same bits (an f32 sum of the
//! widened values, rounded to nearest even).

use burn::tensor::{DType, Tensor, TensorData, bf16, f16};

use super::{
    PARALLEL_VALUES, contiguous_flex, fast_paths_enabled, is_plain_flex, round_bf16, round_f16_into,
    widen_bf16, widen_f16_into, with_simd, written_in_chunks,
};

/// Values per task.
const CHUNK: usize = 1 << 14;

/// `a + b` for tensors of one shape: on the pool for a prefill's bf16, f16 or f32 activations on
/// Flex, with Burn's op otherwise (other devices or dtypes, broadcasts, autodiff, few values,
/// `VIPLLAVA_FAST_PATHS=0`).
pub fn add<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    match pooled_sum(&a, &b) {
        Some(sum) => sum,
        None => a + b,
    }
}

/// [`add`]'s pooled sum; `None` where it does not apply.
fn pooled_sum<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> Option<Tensor<D>> {
    let device = a.device();
    let (dtype, shape) = (a.dtype(), a.dims());
    if !fast_paths_enabled()
        || !is_plain_flex(&device)
        || b.device() != device
        || b.dtype() != dtype
        || b.dims() != shape
        || shape.iter().product::<usize>() < PARALLEL_VALUES
    {
        return None;
    }
    let ((fa, ra), (fb, rb)) = (contiguous_flex(a)?, contiguous_flex(b)?);
    let data = match dtype {
        DType::BF16 => {
            let (xs, ys) = (&fa.storage::<bf16>()[ra], &fb.storage::<bf16>()[rb]);
            TensorData::new(
                sum_values(xs, ys, |x, y| round_bf16(widen_bf16(x) + widen_bf16(y))),
                shape,
            )
        }
        DType::F32 => {
            let (xs, ys) = (&fa.storage::<f32>()[ra], &fb.storage::<f32>()[rb]);
            TensorData::new(sum_values(xs, ys, |x, y| x + y), shape)
        }
        DType::F16 => {
            let (xs, ys) = (&fa.storage::<f16>()[ra], &fb.storage::<f16>()[rb]);
            TensorData::new(sum_f16(xs, ys), shape)
        }
        _ => return None,
    };
    Some(Tensor::from_data(data, (&device, dtype)))
}

/// `x + y` of every pair of f16 values: widened, summed in f32 and rounded to nearest even
/// (the bits of Flex's add), in parallel chunks, with the vector conversions of
/// [`widen_f16_into`] and [`round_f16_into`] (`half`'s are a call per value).
fn sum_f16(xs: &[f16], ys: &[f16]) -> Vec<f16> {
    /// Values per conversion pass.
    const STEP: usize = 256;
    assert_eq!(xs.len(), ys.len());
    // SAFETY: chunk `i` holds values `i * CHUNK..` of `xs` and `ys` (the same lengths),
    // each written.
    unsafe {
        written_in_chunks(xs.len(), CHUNK, |i, chunk| {
            let (mut a, mut b) = ([0f32; STEP], [0f32; STEP]);
            for (j, out) in chunk.chunks_mut(STEP).enumerate() {
                let (at, len) = (i * CHUNK + j * STEP, out.len());
                widen_f16_into(&xs[at..][..len], &mut a[..len]);
                widen_f16_into(&ys[at..][..len], &mut b[..len]);
                for (a, &b) in a[..len].iter_mut().zip(&b[..len]) {
                    *a += b;
                }
                round_f16_into(&a[..len], out);
            }
        })
    }
}

/// `sum(x, y)` of every pair, in parallel chunks compiled for the CPU's vectors.
fn sum_values<T: Copy + Send + Sync>(xs: &[T], ys: &[T], sum: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert_eq!(xs.len(), ys.len());
    // SAFETY: chunk `i` holds values `i * CHUNK..` of `xs` and `ys` (the same lengths),
    // each written.
    unsafe {
        written_in_chunks(xs.len(), CHUNK, |i, chunk| {
            let (xs, ys) = (&xs[i * CHUNK..], &ys[i * CHUNK..]);
            with_simd(|| {
                for ((o, &x), &y) in chunk.iter_mut().zip(xs).zip(ys) {
                    o.write(sum(x, y));
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The bits of Burn's add for bf16, f16 and f32, in place of it from [`PARALLEL_VALUES`] on
    /// (a length past whole chunks), Burn's own below and for a broadcast.
    #[test]
    fn pooled_sums_have_the_bits_of_burns() {
        let device = burn::tensor::Device::flex();
        let bits = |t: Tensor<2>| -> Vec<u32> {
            let values: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("f32");
            values.iter().map(|v| v.to_bits()).collect()
        };
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for rows in [3, 77] {
                let random =
                    || Tensor::<2>::random([rows, 1001], Distribution::Normal(0.0, 3.0), &device).cast(dtype);
                let (a, b) = (random(), random());
                assert_eq!(
                    pooled_sum(&a, &b).is_some(),
                    rows * 1001 >= PARALLEL_VALUES,
                    "{rows} rows"
                );
                let sum = add(a.clone(), b.clone());
                assert_eq!(sum.dtype(), dtype);
                assert!(bits(sum) == bits(a + b), "{dtype:?} {rows} rows");
            }
        }
        let a = Tensor::<2>::zeros([100, 1000], &device);
        let row = Tensor::<2>::ones([1, 1000], &device);
        assert!(pooled_sum(&a, &row).is_none(), "broadcasts are Burn's");
        assert_eq!(bits(add(a, row)), vec![1f32.to_bits(); 100_000]);
    }
}
