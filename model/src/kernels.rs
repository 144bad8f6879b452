//! CPU fast paths for the decode step's weight-streaming matmuls on the Flex backend.
//!
//! A decode step multiplies a few activation rows by every weight matrix once: it is bound
//! by how fast the weights stream from memory. Burn's Flex backend sends bf16/f16 matmuls
//! through a serial whole-matrix conversion to f32 on every call, and its f32 gemm is tuned
//! for large products. [`linear`] instead streams the weight `[K, N]` row by row in K
//! blocks (one task each, on the decode team of `kernels/team.rs`), converting bf16/f16 to
//! f32 in registers, and sums the per-block partial products; the arithmetic is f32
//! throughout (as PyTorch's CPU bf16 gemm accumulates in f32) and the result is rounded
//! once to the weight dtype. bf16 weights with bf16 activations use `vdpbf16ps` where the
//! CPU has AVX-512 BF16 ([`bf16_dot`]); q8/q4 weights use int8 products ([`int8`],
//! [`packed`]).
//!
//! Many rows (prefill, image encode) go to our gemms where the CPU runs them: bf16 with
//! `vdpbf16ps` or AMX ([`bf16_gemm`]), f16 on AVX2 as dot products of f16 rows
//! ([`f16_gemm`]), f32 and bf16 without those (and f16 elsewhere) with AVX-512 or AVX2 FMA
//! ([`f32_gemm`]). Everything else (other backends, odd layouts, other CPUs) goes to Burn's
//! own ops; bf16/f16 weights are then widened to f32 once per call for Burn's f32 gemm.

use burn::backend::{BackendTensor, DispatchKindConversion, DispatchTensor, TensorMetadata};
use burn::nn::Linear;
use burn::tensor::quantization::{QuantMode, QuantValue, global_scale_dtype};
use burn::tensor::{DType, Device, Element, Tensor, TensorData, bf16, f16};
use burn_flex::{Flex, FlexQTensor, FlexTensor};

use rayon::prelude::*;

/// A buffer that starts on a 64-byte boundary: a cache line, an AVX-512 register, an AMX
/// tile row. Rows of a tile that straddle two lines halve the tile loads' rate (AMX block
/// loop on one core: 1300-1700 GFLOP/s aligned against 700-930 with the rows 16 bytes off).
pub type AlignedVec<T> = aligned_vec::AVec<T, aligned_vec::ConstAlign<64>>;

/// An [`AlignedVec`] of `len` values, zeroed chunk by chunk on the pool, each chunk of
/// `chunk` values then handed to `task` (its index, its values) to fill: the zeros are
/// written by the task that uses them, not by one thread's memset of the whole buffer (with
/// a fresh buffer's page faults) while the others wait.
pub(crate) fn aligned_filled<T: bytemuck::Zeroable + Send>(
    len: usize,
    chunk: usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) -> AlignedVec<T> {
    use std::mem::MaybeUninit;

    let mut values = AlignedVec::<T>::with_capacity(64, len);
    // SAFETY: the buffer holds `len` values; `MaybeUninit` needs no initialization.
    let slots = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<MaybeUninit<T>>(), len) };
    slots
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, slots)| {
            for v in slots.iter_mut() {
                v.write(T::zeroed());
            }
            // SAFETY: every value was just written; `MaybeUninit<T>` has `T`'s layout.
            let values = unsafe { &mut *(slots as *mut [MaybeUninit<T>] as *mut [T]) };
            task(i, values);
        });
    // SAFETY: every value was written (zeroed, then by `task`).
    unsafe { values.set_len(len) };
    values
}

/// An [`AlignedVec`] of `len` zeros.
pub fn aligned_zeros<T: bytemuck::Zeroable + Clone>(len: usize) -> AlignedVec<T> {
    let mut values = AlignedVec::with_capacity(64, len);
    values.resize(len, T::zeroed());
    values
}

pub mod amx;
pub mod attention;
pub mod bf16_dot;
pub mod bf16_gemm;
pub mod f16_gemm;
pub mod f32_gemm;
pub mod int8;
pub mod layer_norm;
mod libm_exp;
pub mod norm_rope;
pub mod packed;
pub mod residual;
pub mod rows;
mod team;

use int8::{ColumnBlocks, Int8Rows};

/// Rows up to which the streaming kernel is used (decode steps, small batches).
pub const MAX_STREAM_ROWS: usize = 16;

/// True unless `VIPLLAVA_FAST_PATHS=0` (a switch for before/after measurements: Burn's
/// own ops then do all the work).
pub fn fast_paths_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("VIPLLAVA_FAST_PATHS").map_or(true, |v| v != "0"))
}

/// Whether many-row bf16 products use the bf16 gemm ([`bf16_gemm`]: AMX tiles, else
/// `vdpbf16ps`) where the CPU has AVX-512 BF16: on by default, off with
/// `VIPLLAVA_BF16_GEMM=0` (a switch for before/after measurements: bf16 is then widened to
/// f32 for [`f32_gemm`], or Flex's gemm without it). `VIPLLAVA_AMX=0` keeps `vdpbf16ps` on
/// CPUs with AMX.
pub fn bf16_gemm_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("VIPLLAVA_BF16_GEMM").map_or(true, |v| v != "0"))
        && bf16_gemm::bf16_gemm_available()
}

/// Whether many-row f32 products (and bf16 ones on CPUs without the bf16 gemm) use
/// [`f32_gemm`] where the CPU has AVX-512 F, or AVX2 and FMA: on by default, off with
/// `VIPLLAVA_F32_GEMM=0` (a switch for before/after measurements: Flex's f32 gemm then does
/// them).
pub fn f32_gemm_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("VIPLLAVA_F32_GEMM").map_or(true, |v| v != "0"))
        && f32_gemm::f32_gemm_available()
}

/// Whether decode products with q8/q4 weights quantized along K quantize the activations
/// to int8 too (the AMX, VNNI or AVX2 kernels of [`packed`], [`packed::Int8Kernel`]), and
/// f32/f16 prefill products where an int8 gemm runs
/// ([`packed::PackedWeight::matmul_int8_gemm`]): on by
/// default where the CPU has AVX-512 VNNI or AVX2, off with `VIPLLAVA_INT8_ACTIVATIONS=0`
/// or inside [`with_int8_activations`]`(false, ..)`, which keeps the f32 activations (the
/// weights' error only).
pub fn int8_activations_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let default =
        *ENABLED.get_or_init(|| std::env::var("VIPLLAVA_INT8_ACTIVATIONS").map_or(true, |v| v != "0"));
    INT8_ACTIVATIONS.with(|o| o.get()).unwrap_or(default)
        && packed::Int8Kernel::best() != packed::Int8Kernel::Plain
}

thread_local! {
    static INT8_ACTIVATIONS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with int8 activations switched on or off on this thread (the forward pass
/// decides on the calling thread), then restores the previous setting.
pub fn with_int8_activations<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    let previous = INT8_ACTIVATIONS.with(|o| o.replace(Some(enabled)));
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            INT8_ACTIVATIONS.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(previous);
    f()
}

/// Whether `device` is the plain Flex CPU device: the fast paths work on Flex primitives,
/// which an autodiff device (it compares equal to its inner device) does not hold.
pub fn is_plain_flex(device: &Device) -> bool {
    *device == Device::flex() && !device.is_autodiff()
}

/// `x @ W (+ b)` for a `Linear`, through the streaming kernel where it applies.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    // Training: LoRA in factored form and quantized weights through their own backward,
    // so that no dense copy of a frozen weight enters the graph (see `crate::lora`).
    if x.device().is_autodiff() {
        return crate::lora::training_linear(layer, x);
    }
    if !fast_paths_enabled() {
        return layer.forward(x);
    }
    // A q8/q4 weight held packed: read in place (reading the parameter would unpack it
    // for good).
    if let Some(packed) = packed::packed_weight(&layer.weight)
        && let Some(out) = packed_linear(layer, &packed, &x)
    {
        return out;
    }
    // One handle per call: this runs for every projection of every decode step.
    let weight = layer.weight.val();
    let wdtype = weight.dtype();
    // Other devices (wgpu, ...) go through Burn's own ops; autodiff weights (plain
    // activations) through the training path.
    if !is_plain_flex(&weight.device()) {
        if weight.device().is_autodiff() {
            return crate::lora::training_linear(layer, x);
        }
        return layer.forward(x);
    }
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if matches!(wdtype, DType::QFloat(_)) {
        // Quantized weights (`--quantize`): Flex's own `q_matmul` dequantizes the whole
        // matrix on one thread on every call.
        return match quantized_linear(layer, weight, &x, rows) {
            Some(out) => out,
            None => layer.forward(x),
        };
    }
    if rows <= MAX_STREAM_ROWS
        && !f16_dot_takes(&weight, &x, rows)
        && let Some(out) = stream_linear(layer, weight.clone(), &x, rows)
    {
        return out;
    }
    if let Some(out) = gemm_linear(layer, weight.clone(), &x, rows) {
        return out;
    }
    if weight_in_file_order(&weight) {
        return file_order_linear(layer, weight, x, rows);
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

/// Whether a batch's few f16 rows go to [`f16_gemm`]'s dot products (through
/// [`gemm_linear`]) instead of the row kernels: on AVX2, from
/// [`f16_gemm::F16_DOT_MIN_ROWS`] rows, for a file-order weight and f16 activations.
fn f16_dot_takes<const D: usize>(weight: &Tensor<2>, x: &Tensor<D>, rows: usize) -> bool {
    rows >= f16_gemm::F16_DOT_MIN_ROWS
        && weight.dtype() == DType::F16
        && x.dtype() == DType::F16
        && f16_gemm::f16_dot_available()
        && weight.dims()[0].is_multiple_of(8)
        && weight_in_file_order(weight)
}

/// Whether `weight` (`[k, n]`, a `Linear`'s) is a transposed view of contiguous `[n, k]`
/// rows on the Flex device: a checkpoint's `[out, in]` weight used in place by the loader.
pub fn weight_in_file_order(weight: &Tensor<2>) -> bool {
    let [k, n] = weight.dims();
    k > 1 && n > 1 && flex_tensor(weight.clone()).is_some_and(|w| w.layout().strides() == [1, k as isize])
}

/// `x @ W (+ b)` for many rows with a weight in the checkpoint's order ([`weight_in_file_order`]):
/// `x` as one `[rows, k]` matrix and a two-dimensional product, which Flex's gemm reads
/// with the weight's strides (a batched product would first copy the weight into Burn's
/// order, on every call); bf16/f16 weights are widened once, in their own order.
fn file_order_linear<const D: usize>(
    layer: &Linear,
    weight: Tensor<2>,
    x: Tensor<D>,
    rows: usize,
) -> Tensor<D> {
    let dtype = x.dtype();
    let mut dims = x.dims();
    let k = dims[D - 1];
    let wide = |t: Tensor<2>| {
        if t.dtype() == DType::F32 {
            t
        } else {
            t.cast(DType::F32)
        }
    };
    // `swap_dims` twice: the `[n, k]` rows as they are, widened, then seen as `[k, n]`.
    let w = wide(weight.swap_dims(0, 1)).swap_dims(0, 1);
    let mut y = wide(x.reshape([rows, k])).matmul(w);
    if let Some(b) = &layer.bias {
        let b = b.val();
        y = y + wide(b.unsqueeze());
    }
    dims[D - 1] = y.dims()[1];
    let y = y.reshape(dims);
    if dtype == DType::F32 { y } else { y.cast(dtype) }
}

/// `x @ W (+ b)` for many rows with our own gemm, the weight in either order: bf16 with
/// `vdpbf16ps` ([`bf16_gemm`]) instead of widening both to f32, f16 on AMX tiles as three of
/// the four products of its bf16 halves ([`bf16_gemm::matmul_f16_amx`]), f32 (and bf16 without
/// `vdpbf16ps`, f16 without AMX, widened as packed) with AVX-512 or AVX2 FMA ([`f32_gemm`])
/// instead of Flex's gemm, which copies a file-order weight value by value;
/// `None` where the CPU lacks the instructions, the dtypes differ or the weight is not a
/// plain `[k, n]` or `[n, k]` block of the Flex device.
fn gemm_linear<const D: usize>(
    layer: &Linear,
    weight: Tensor<2>,
    x: &Tensor<D>,
    rows: usize,
) -> Option<Tensor<D>> {
    let dtype = weight.dtype();
    // bf16 through the bf16 gemm where the CPU has AVX-512 BF16, else through the f32 gemm
    // with the weight widened as it is packed (AVX2 CPUs: Flex would widen the whole weight
    // first, on one thread); f16 through either, or `f16_gemm`'s dot products on AVX2
    // (`VIPLLAVA_BF16_GEMM=0` and `VIPLLAVA_F32_GEMM=0` switch the gemms off).
    let bf16_products = match dtype {
        DType::BF16 if bf16_gemm_enabled() => true,
        DType::F16 if bf16_gemm_enabled() || f32_gemm_enabled() || f16_gemm::f16_dot_available() => false,
        DType::BF16 | DType::F32 if f32_gemm_enabled() => false,
        _ => return None,
    };
    if x.dtype() != dtype {
        return None;
    }
    let [k, n] = weight.dims();
    let w = flex_tensor(weight)?;
    let layout = w.layout();
    let order = if layout.strides() == [n as isize, 1] {
        bf16_gemm::WeightOrder::InputMajor
    } else if layout.strides() == [1, k as isize] {
        bf16_gemm::WeightOrder::OutputMajor
    } else {
        return None;
    };
    let values = layout.start_offset()..layout.start_offset() + k * n;
    let (input, inputs) = contiguous_rows(x, rows * k)?;
    let bias = host_bias(layer, n)?;
    let out = if bf16_products {
        let xs = input.storage::<bf16>().get(inputs)?;
        let w = &w.storage::<bf16>()[values];
        // With AMX the blocks are rounded with the bias as they finish (same bits).
        if let Some(out) = bf16_gemm::matmul_bf16_amx_rounded(xs, w, order, (rows, k, n), bias.as_deref()) {
            return Some(bf16_output(out, x, n));
        }
        bf16_gemm::matmul_bf16_gemm(xs, w, order, rows, k, n)?
    } else if dtype == DType::BF16 {
        let xs = input.storage::<bf16>().get(inputs)?;
        f32_gemm::matmul_f32_gemm(xs, &w.storage::<bf16>()[values], order, rows, k, n)?
    } else if dtype == DType::F16 {
        // f16 (the hub 7B's own dtype): with AMX as products of the values' bf16 halves; on
        // AVX2 a file-order weight as dot products of f16 rows ([`f16_gemm`]); else widened
        // as packed, as bf16 weights without `vdpbf16ps` are (Flex would widen the whole
        // weight on every call, then multiply).
        let (xs, w) = (input.storage::<f16>().get(inputs)?, &w.storage::<f16>()[values]);
        let amx = bf16_gemm_enabled()
            .then(|| bf16_gemm::matmul_f16_amx(xs, w, order, rows, k, n))
            .flatten();
        let dot = || {
            (order == bf16_gemm::WeightOrder::OutputMajor)
                .then(|| f16_gemm::matmul_f16_dot(xs, w, rows, k, n))
                .flatten()
        };
        match amx.or_else(dot) {
            Some(out) => out,
            None if f32_gemm_enabled() => f32_gemm::matmul_f32_gemm(xs, w, order, rows, k, n)?,
            None => return None,
        }
    } else {
        let xs = input.storage::<f32>().get(inputs)?;
        f32_gemm::matmul_f32_gemm(xs, &w.storage::<f32>()[values], order, rows, k, n)?
    };
    Some(streamed_output(out, bias.as_deref(), x, n, dtype))
}

/// `x` as one contiguous Flex block and the range of its first `len` values: in place when
/// it already is one (a prefill's activations are; a copy cost 1-2% of an f32 image
/// encode), else a contiguous copy.
fn contiguous_rows<const D: usize>(
    x: &Tensor<D>,
    len: usize,
) -> Option<(FlexTensor, std::ops::Range<usize>)> {
    let input = flex_tensor(x.clone())?;
    let input = if input.layout().is_contiguous() {
        input
    } else {
        input.to_contiguous()
    };
    let start = input.layout().start_offset();
    Some((input, start..start + len))
}

/// A bf16 result `[.., n]` (rows as `x`'s) on `x`'s device.
fn bf16_output<const D: usize>(out: Vec<bf16>, x: &Tensor<D>, n: usize) -> Tensor<D> {
    let mut shape = x.dims();
    shape[D - 1] = n;
    Tensor::from_data(TensorData::new(out, shape), (&x.device(), DType::BF16))
}

/// bf16 values as f32, in parallel chunks for many.
fn widen_bf16_values(xs: &[bf16]) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let mut out = vec![0f32; xs.len()];
    for_each_chunk(&mut out, CHUNK, |i, out| {
        with_simd(|| {
            for (o, &x) in out.iter_mut().zip(&xs[i * CHUNK..]) {
                *o = widen_bf16(x);
            }
        })
    });
    out
}

/// f16 values as f32 ([`widen_f16_into`]), in parallel chunks for many.
fn widen_f16_values(xs: &[f16]) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let mut out = vec![0f32; xs.len()];
    for_each_chunk(&mut out, CHUNK, |i, out| {
        widen_f16_into(&xs[i * CHUNK..][..out.len()], out)
    });
    out
}

/// `xs` widened into `out` (as long): 16 at a time where the CPU has AVX-512 F, 8 with
/// AVX2 and F16C, the values of `f16::to_f32` either way.
pub(crate) fn widen_f16_into(xs: &[f16], out: &mut [f32]) {
    assert_eq!(xs.len(), out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    match Simd::best() {
        // SAFETY: the CPU has AVX-512 F (checked).
        Simd::Avx512 => done = unsafe { widen_f16_avx512(xs, out) },
        // SAFETY: `Simd::Avx2` is only chosen on CPUs with AVX2, FMA and F16C.
        Simd::Avx2 => done = unsafe { widen_f16_avx2(xs, out) },
        Simd::Plain => {}
    }
    for (o, &x) in out[done..].iter_mut().zip(&xs[done..]) {
        *o = widen_f16(x);
    }
}

/// The whole groups of 16 of [`widen_f16_into`], in one function compiled for AVX-512 (the
/// store, called from a loop without the feature, was a call per 16 values); returns how
/// many values it widened.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_f16_avx512(xs: &[f16], out: &mut [f32]) -> usize {
    for (o, x) in out.chunks_exact_mut(16).zip(xs.chunks_exact(16)) {
        // SAFETY: 16 values in and out; AVX-512 F, this function's promise.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(o.as_mut_ptr(), widen16(x.as_ptr())) };
    }
    xs.len().min(out.len()) / 16 * 16
}

/// `xs` rounded to f16 (to nearest even) into `out` (as long): 16 at a time where the CPU
/// has AVX-512 F, 8 with AVX2 and F16C, the bits of `f16::from_f32` either way (NaN stays
/// a NaN).
pub(crate) fn round_f16_into(xs: &[f32], out: &mut [std::mem::MaybeUninit<f16>]) {
    assert_eq!(xs.len(), out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    match Simd::best() {
        Simd::Avx512 => {
            done = xs.len() / 16 * 16;
            for (o, x) in out.chunks_exact_mut(16).zip(xs.chunks_exact(16)) {
                // SAFETY: the CPU has AVX-512 F (checked); 16 values in and out.
                unsafe { round_f16x16(x.as_ptr(), o.as_mut_ptr().cast()) };
            }
        }
        // SAFETY: `Simd::Avx2` is only chosen on CPUs with AVX2, FMA and F16C.
        Simd::Avx2 => done = unsafe { round_f16_avx2(xs, out) },
        Simd::Plain => {}
    }
    for (o, &x) in out[done..].iter_mut().zip(&xs[done..]) {
        o.write(round_f16(x));
    }
}

/// The whole groups of 8 of [`widen_f16_into`] with F16C (`vcvtph2ps`, exact, and not
/// subject to the denormals-are-zero mode: it reads f16 operands); returns how many values
/// it widened.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16_avx2(xs: &[f16], out: &mut [f32]) -> usize {
    for (o, x) in out.chunks_exact_mut(8).zip(xs.chunks_exact(8)) {
        // SAFETY: 8 values in and out; AVX2 and F16C, this function's promise.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(o.as_mut_ptr(), widen8(x.as_ptr())) };
    }
    xs.len().min(out.len()) / 8 * 8
}

/// The whole groups of 8 of [`round_f16_into`] with F16C (`vcvtps2ph`, to nearest even);
/// returns how many values it rounded.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round_f16_avx2(xs: &[f32], out: &mut [std::mem::MaybeUninit<f16>]) -> usize {
    use std::arch::x86_64::*;
    for (o, x) in out.chunks_exact_mut(8).zip(xs.chunks_exact(8)) {
        // SAFETY: 8 values in and out; F16C, this function's promise.
        unsafe {
            let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr()));
            _mm_storeu_si128(o.as_mut_ptr().cast(), halves);
        }
    }
    xs.len().min(out.len()) / 8 * 8
}

/// 16 f32 values at `src` rounded to f16 at `dst`.
///
/// # Safety
/// The CPU must have AVX-512 F; `src` must hold 16 readable values and `dst` 16 writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_f16x16(src: *const f32, dst: *mut f16) {
    use std::arch::x86_64::*;
    // SAFETY: as this function's.
    unsafe {
        let halves =
            _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(src));
        _mm256_storeu_si256(dst.cast(), halves)
    }
}

/// `xs` rounded to f16 ([`round_f16_into`]), in parallel chunks for many.
fn round_f16_values(xs: &[f32]) -> Vec<f16> {
    const CHUNK: usize = 1 << 14;
    // SAFETY: chunk `i` holds values `i * CHUNK..` of `xs`, each written.
    unsafe {
        written_in_chunks(xs.len(), CHUNK, |i, out| {
            round_f16_into(&xs[i * CHUNK..][..out.len()], out)
        })
    }
}

/// A layer's bias on the host as f32: `Some(None)` for a layer without one, `None` when it
/// cannot be read or does not hold `n` values.
fn host_bias(layer: &Linear, n: usize) -> Option<Option<Vec<f32>>> {
    match &layer.bias {
        // A bias of another length: Burn's ops say what is wrong with such a layer (the
        // kernels write as many values per row as the bias has).
        Some(b) => host_f32(b.val()).filter(|b| b.len() == n).map(Some),
        None => Some(None),
    }
}

/// The values of `t` on the host as f32 (activations and biases for the kernels).
pub(crate) fn host_f32<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().ok()
}

fn flex_tensor<const D: usize>(t: Tensor<D>) -> Option<FlexTensor> {
    t.try_into_primitive::<Flex>().ok()
}

/// `t`'s Flex tensor and the range of its values in the storage, where they are one
/// contiguous run: read in place, without `into_data`'s copy of a shared buffer.
pub(crate) fn contiguous_flex<const D: usize>(t: &Tensor<D>) -> Option<(FlexTensor, std::ops::Range<usize>)> {
    let t = flex_tensor(t.clone())?;
    let (start, end) = t.layout().contiguous_offsets()?;
    Some((t, start..end))
}

/// `x @ W (+ b)` for several `Linear`s that read the same input (q/k/v, gate/up), each
/// with the bits of [`linear`] on its own. On a decode step with packed q8/q4 weights and
/// int8 activations, the input is quantized once and every product's slabs run as one
/// set of tasks (one parallel region instead of one per projection);
/// anything else goes through [`linear`] layer by layer.
pub fn linears<const D: usize, const N: usize>(layers: [&Linear; N], x: Tensor<D>) -> [Tensor<D>; N] {
    if let Some(out) = fused_packed_linears(&layers, &x) {
        return out;
    }
    // `x` is held meanwhile: its AMX packing can serve every product.
    bf16_gemm::sharing_activations(|| layers.map(|layer| linear(layer, x.clone())))
}

/// [`linears`]' fused case, or `None` where it does not apply.
pub(crate) fn fused_packed_linears<const D: usize, const N: usize>(
    layers: &[&Linear; N],
    x: &Tensor<D>,
) -> Option<[Tensor<D>; N]> {
    let dtype = x.dtype();
    if x.device().is_autodiff()
        || !fast_paths_enabled()
        || !int8_activations_enabled()
        || !is_plain_flex(&x.device())
        || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
    {
        return None;
    }
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if rows > MAX_STREAM_ROWS {
        return None;
    }
    let weights = layers
        .iter()
        .map(|layer| packed::packed_weight(&layer.weight))
        .collect::<Option<Vec<_>>>()?;
    let k = dims[D - 1];
    let block = weights.first()?.block();
    // The one quantized input must match every weight.
    if weights.iter().any(|w| w.k() != k || w.block() != block) {
        return None;
    }
    let xq = Int8Rows::quantize(&host_f32(x.clone())?, rows, k, block)?;
    let widths: Vec<usize> = weights.iter().map(|w| w.n()).collect();
    let products = sum_over_slabs_of_each(rows, &widths, k, |i, k0, k1, acc| {
        weights[i].add_slab(&xq, k0, k1, acc)
    });
    let mut outputs = Vec::with_capacity(N);
    for ((layer, out), n) in layers.iter().zip(products).zip(widths) {
        let bias = host_bias(layer, n)?;
        outputs.push(streamed_output(out, bias.as_deref(), x, n, dtype));
    }
    outputs.try_into().ok()
}

/// The streaming kernel on `weight` (`layer.weight` on the plain Flex device).
fn stream_linear<const D: usize>(
    layer: &Linear,
    weight: Tensor<2>,
    x: &Tensor<D>,
    rows: usize,
) -> Option<Tensor<D>> {
    let dtype = weight.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || x.dtype() != dtype {
        return None;
    }
    let [k, n] = weight.dims();
    let w = flex_tensor(weight)?;
    let layout = w.layout();
    // `[k, n]` rows (Burn's layout), or the checkpoint's `[n, k]` rows seen transposed (a
    // weight used in place from the file's map).
    let file_order = layout.strides() == [1, k as isize];
    if layout.strides() != [n as isize, 1] && !file_order {
        return None;
    }
    let offset = layout.start_offset();
    let xs = host_f32(x.clone())?;
    if xs.len() != rows * k {
        return None;
    }
    let bias = host_bias(layer, n)?;
    if file_order {
        let out = match dtype {
            DType::F32 => rows::matmul_rows(&xs, &w.storage::<f32>()[offset..offset + k * n], rows, k, n),
            DType::BF16 => {
                let w = &w.storage::<bf16>()[offset..offset + k * n];
                // bf16 activations with `vdpbf16ps` where the CPU has it (its plain-Rust
                // twin is for tests: one scalar FMA per value).
                bf16_dot::bf16_dot_available()
                    .then(|| rows::matmul_rows_bf16(&xs, w, rows, k, n))
                    .flatten()
                    .unwrap_or_else(|| rows::matmul_rows(&xs, w, rows, k, n))
            }
            DType::F16 => rows::matmul_rows_f16(&xs, &w.storage::<f16>()[offset..offset + k * n], rows, k, n),
            _ => return None,
        };
        return Some(streamed_output(out, bias.as_deref(), x, n, dtype));
    }
    let out = match dtype {
        DType::F32 => matmul_stream(&xs, &w.storage::<f32>()[offset..offset + k * n], rows, k, n),
        DType::BF16 => {
            let w = &w.storage::<bf16>()[offset..offset + k * n];
            // bf16 activations (exact in `xs`) with `vdpbf16ps` where the CPU has it.
            bf16_dot::bf16_dot_available()
                .then(|| bf16_dot::matmul_bf16(&xs, w, rows, k, n))
                .flatten()
                .unwrap_or_else(|| matmul_stream(&xs, w, rows, k, n))
        }
        DType::F16 => matmul_stream(&xs, &w.storage::<f16>()[offset..offset + k * n], rows, k, n),
        _ => return None,
    };
    Some(streamed_output(out, bias.as_deref(), x, n, dtype))
}

/// [`streamed_output`] with the layer's bias read to the host first; `None` where it
/// cannot be read.
fn output_with_bias<const D: usize>(
    out: Vec<f32>,
    bias: Option<&Tensor<1>>,
    x: &Tensor<D>,
    n: usize,
    dtype: DType,
) -> Option<Tensor<D>> {
    let bias = match bias {
        Some(b) => Some(host_f32(b.clone())?),
        None => None,
    };
    Some(streamed_output(out, bias.as_deref(), x, n, dtype))
}

/// The `[.., n]` result of a streaming kernel (`out`, f32 rows) with the bias added, on
/// `x`'s device, rounded once to `dtype`.
fn streamed_output<const D: usize>(
    mut out: Vec<f32>,
    bias: Option<&[f32]>,
    x: &Tensor<D>,
    n: usize,
    dtype: DType,
) -> Tensor<D> {
    // The rounding pass writes as many values per row as the bias has.
    assert!(bias.is_none_or(|b| b.len() == n), "a bias of {n} values");
    let mut shape = x.dims();
    shape[D - 1] = n;
    if dtype == DType::BF16 {
        // Bias and rounding in one pass, in parallel for prefills (Flex's cast is a second
        // pass on one thread); the bits of an f32 add then `bf16::from_f32`.
        // SAFETY: each row is written whole (`out` has the same length, and the bias `n`
        // values).
        let rounded = unsafe {
            written_in_chunks(out.len(), n, |i, r| {
                let o = &out[i * n..][..r.len()];
                with_simd(|| match bias {
                    Some(b) => {
                        for ((d, &v), &bv) in r.iter_mut().zip(o).zip(b) {
                            d.write(round_bf16(v + bv));
                        }
                    }
                    None => {
                        for (d, &v) in r.iter_mut().zip(o) {
                            d.write(round_bf16(v));
                        }
                    }
                })
            })
        };
        return Tensor::<D>::from_data(TensorData::new(rounded, shape), (&x.device(), DType::BF16));
    }
    if let Some(b) = bias {
        for_each_chunk(&mut out, n, |_, row| {
            for (o, bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        });
    }
    if dtype == DType::F16 {
        // In parallel, with the bits of Flex's cast (one thread, value by value).
        let rounded = round_f16_values(&out);
        return Tensor::<D>::from_data(TensorData::new(rounded, shape), (&x.device(), DType::F16));
    }
    let y = Tensor::<D>::from_data(TensorData::new(out, shape), &x.device());
    if dtype == DType::F32 { y } else { y.cast(dtype) }
}

/// Outputs from which rounding and activations run on the rayon pool (a prefill's, not a
/// decode step's).
const PARALLEL_VALUES: usize = 1 << 16;

/// `v` as f32: the bits of `f16::to_f32` (a NaN stays a NaN, quieted), written so that loops
/// over it vectorize. `half` converts one value per call unless the whole build targets F16C,
/// and a loop of those calls ran the f16 decode of a `[k, n]` weight (a burnpack's) at a
/// quarter of the rate of the same loop over bf16.
#[inline(always)]
pub(crate) fn widen_f16(v: f16) -> f32 {
    let half = v.to_bits() as u32;
    let sign = (half & 0x8000) << 16;
    let magnitude = half & 0x7fff;
    // Normal: exponent and mantissa in f32's places give the value times 2^-112, a normal
    // f32, times 2^112 exactly. Subnormal: the count of 2^-24 steps, converted exactly. No
    // operand is an f32 subnormal, which a CPU set to treat them as zero (DAZ) would read
    // as zero, unlike F16C's conversion.
    let normal = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000);
    let subnormal = magnitude as f32 * f32::from_bits(0x3380_0000);
    let finite = if magnitude < 0x400 { subnormal } else { normal };
    let quiet = if magnitude > 0x7c00 { 0x0040_0000 } else { 0 };
    let special = 0x7f80_0000 | (magnitude << 13) | quiet;
    let wide = if magnitude >= 0x7c00 {
        special
    } else {
        finite.to_bits()
    };
    f32::from_bits(wide | sign)
}

/// `v` rounded to the nearest f16, ties to even, a NaN kept a quiet NaN with its payload's top
/// bits: the bits of `f16::from_f32` (F16C's `vcvtps2ph`), written so that loops over it
/// vectorize (see [`widen_f16`]).
#[inline(always)]
pub(crate) fn round_f16(v: f32) -> f16 {
    let bits = v.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let magnitude = bits & 0x7fff_ffff;
    let rounded = if magnitude > 0x7f80_0000 {
        // NaN: quiet, the top 10 bits of the payload kept.
        0x7e00 | ((magnitude >> 13) & 0x3ff)
    } else if magnitude >= 0x4780_0000 {
        // 65536 and above (and infinity): infinite. From 65520 up the normal branch below
        // also rounds to infinity.
        0x7c00
    } else if magnitude < 0x3880_0000 {
        // Below 2^-14, f16's subnormals: adding 0.5 rounds the value to a multiple of 2^-24
        // (f16's subnormal step) in the FPU, to nearest even; 0.5's bits leave the count.
        (f32::from_bits(magnitude) + 0.5).to_bits() - 0x3f00_0000
    } else {
        // Normal: the exponent rebiased (127 -> 15), the 13 bits that go rounded to nearest
        // even (a carry moves into the exponent, up to infinity).
        let odd = (magnitude >> 13) & 1;
        (magnitude - 0x3800_0000 + 0x0fff + odd) >> 13
    };
    f16::from_bits((rounded | sign) as u16)
}

/// `v` rounded to the nearest bf16, ties to even, NaN kept a (quiet) NaN: the bits of
/// `bf16::from_f32`, written so that loops over it vectorize.
#[inline]
pub(crate) fn round_bf16(v: f32) -> bf16 {
    let bits = v.to_bits();
    let rounded = if v.is_nan() {
        (bits >> 16) | 0x40
    } else {
        bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16
    };
    bf16::from_bits(rounded as u16)
}

/// The two activations of the form `x * sigmoid(a * x)` that VipLlava uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmoidGate {
    /// `x * sigmoid(x)` (Llama's MLP). PyTorch's bf16 kernel computes it in f32 and rounds
    /// once.
    Silu,
    /// `x * sigmoid(1.702 x)` (CLIP's quick GELU). transformers writes it as three tensor
    /// operations, so in bf16 each of `1.702 x`, the sigmoid and the product is rounded.
    QuickGelu,
}

impl SigmoidGate {
    /// The gate's slot in the per-gate tables ([`gate_table`], [`gate_table_f16`]).
    const fn table_slot(self) -> usize {
        match self {
            Self::Silu => 0,
            Self::QuickGelu => 1,
        }
    }
}

/// An activation of [`SigmoidGate`], times `up` where given (Llama's gated MLP,
/// `act(gate) * up`), in one pass over the values of the plain Flex device, in parallel
/// chunks for a prefill's many values. Burn's ops need a pass per operation (three for quick
/// GELU), each on one thread.
///
/// - **bf16:** a vectorized exponential and bf16 roundings where PyTorch rounds (after the
///   activation, after the product), so that a bf16 run follows transformers' bf16 run;
///   computed once per gate for all 65536 bf16 inputs ([`gate_table`]) and looked up, in
///   place on `x`'s buffer where Flex hands it over.
/// - **f16:** as bf16 (PyTorch's f16 ops round at the same places), from a table of the
///   65536 f16 inputs ([`gate_table_f16`]), times `up` in f32 and rounded once.
/// - **f32:** the bits of Burn's ops ([`BurnGateF32`]: the same operations in the same
///   order, the exponential of `std`, or of glibc's steps vectorized where they give its
///   bits: [`libm_exp`]), which the f32 parity tests pin; only the passes and the threads
///   differ.
///
/// `Err` gives `x` back where this does not apply: other dtypes, autodiff, other devices,
/// bf16 on CPUs without FMA, `VIPLLAVA_FAST_PATHS=0`, shapes or dtypes that differ.
// Both variants are the one tensor (the input given back or the result): no boxing helps.
#[allow(clippy::result_large_err)]
pub fn sigmoid_gated<const D: usize>(
    x: Tensor<D>,
    gate: SigmoidGate,
    up: Option<&Tensor<D>>,
) -> Result<Tensor<D>, Tensor<D>> {
    let dtype = x.dtype();
    if !fast_paths_enabled()
        || !is_plain_flex(&x.device())
        || !(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16 && fma_available())
        || up.is_some_and(|u| u.dims() != x.dims() || u.dtype() != dtype || u.device() != x.device())
    {
        return Err(x);
    }
    match dtype {
        DType::F32 => gate_tensor(x, up, DType::F32, |x: &mut [f32], up| {
            gate_in_place_f32(x, up, gate)
        }),
        DType::F16 => gate_tensor(x, up, DType::F16, |x: &mut [f16], up| {
            gate_in_place_f16(x, up, gate)
        }),
        _ => gate_tensor(x, up, DType::BF16, |x: &mut [bf16], up| {
            gate_in_place_bf16(x, up, gate)
        }),
    }
}

/// [`gate_in_place_bf16`] for f16: the activation of each of the 65536 f16 inputs from a
/// table ([`gate_table_f16`]), times `up` in f32, rounded once.
fn gate_in_place_f16(x: &mut [f16], up: Option<&[f16]>, gate: SigmoidGate) {
    const CHUNK: usize = 1 << 14;
    /// Values per table pass, then per product pass.
    const STEP: usize = 256;
    let table = gate_table_f16(gate);
    if let Some(up) = up {
        assert_eq!(up.len(), x.len());
    }
    for_each_chunk(x, CHUNK, |i, chunk| {
        let (mut acts, mut ups) = ([0f32; STEP], [0f32; STEP]);
        for (j, xs) in chunk.chunks_mut(STEP).enumerate() {
            let len = xs.len();
            for v in xs.iter_mut() {
                *v = table[v.to_bits() as usize];
            }
            let Some(up) = up else { continue };
            widen_f16_into(xs, &mut acts[..len]);
            widen_f16_into(&up[i * CHUNK + j * STEP..][..len], &mut ups[..len]);
            for (a, &u) in acts[..len].iter_mut().zip(&ups[..len]) {
                *a *= u;
            }
            // SAFETY: `MaybeUninit<f16>` has the layout of `f16`; `round_f16_into` only writes
            // initialized values, and writes every one.
            let out = unsafe { &mut *(xs as *mut [f16] as *mut [std::mem::MaybeUninit<f16>]) };
            round_f16_into(&acts[..len], out);
        }
    });
}

/// The f16 gates' arithmetic for every f16 input, by its bits: in f32 with the sigmoid of
/// [`sigmoid_f32`], rounded to f16 where PyTorch's f16 ops round (as the bf16 ones,
/// [`gate_chunk`]).
fn gate_table_f16(gate: SigmoidGate) -> &'static [f16; 1 << 16] {
    static TABLES: [std::sync::OnceLock<Box<[f16; 1 << 16]>>; 2] = [const { std::sync::OnceLock::new() }; 2];
    TABLES[gate.table_slot()].get_or_init(|| {
        let through = |v: f32| f16::from_f32(v).to_f32();
        let mut table = Box::new([f16::ZERO; 1 << 16]);
        for (bits, t) in table.iter_mut().enumerate() {
            let v = f16::from_bits(bits as u16).to_f32();
            *t = f16::from_f32(match gate {
                SigmoidGate::Silu => v * sigmoid_f32(v),
                SigmoidGate::QuickGelu => v * through(sigmoid_f32(through(1.702 * v))),
            });
        }
        table
    })
}

/// [`sigmoid_gated`] on the values of `x` (and `up`), of `dtype` on the plain Flex device,
/// by `apply`: in place where Flex hands `x`'s values over without a copy (a product's fresh
/// output is the tensor's only owner: no buffer, no page faults), with `up` read where it
/// lies when it is one contiguous run (else copied).
// As `sigmoid_gated`'s: the one tensor either way.
#[allow(clippy::result_large_err)]
fn gate_tensor<const D: usize, T: burn::tensor::Element + bytemuck::Pod>(
    x: Tensor<D>,
    up: Option<&Tensor<D>>,
    dtype: DType,
    apply: impl FnOnce(&mut [T], Option<&[T]>),
) -> Result<Tensor<D>, Tensor<D>> {
    let device = x.device();
    let mut data = x.into_data();
    let up_values = up.and_then(contiguous_flex).filter(|(t, _)| t.dtype() == dtype);
    let up_data = match (up, &up_values) {
        (Some(u), None) => Some(u.clone().into_data()),
        _ => None,
    };
    let ups = match (&up_values, &up_data) {
        (Some((t, range)), _) => Some(Ok(&t.storage::<T>()[range.clone()])),
        (None, Some(data)) => Some(data.as_slice::<T>()),
        (None, None) => None,
    };
    let applied = match (data.as_mut_slice::<T>(), ups.transpose()) {
        (Ok(values), Ok(ups)) => {
            apply(values, ups);
            true
        }
        // Flex keeps f32, f16 and bf16 tensors as values of their dtype; should that change, the
        // caller's Burn ops decide.
        _ => false,
    };
    let out = Tensor::from_data(data, (&device, dtype));
    if applied { Ok(out) } else { Err(out) }
}

/// CLIP's quick GELU factor, as Burn's scalar ops give it to an f32 tensor (an `f64` rounded
/// to `f32`).
const QUICK_GELU_SCALE: f64 = 1.702;

/// [`sigmoid_gated`] in f32, computed as Burn's ops on the Flex device compute
/// `act(x) * up` (`x * sigmoid(x)` for SiLU, `x * sigmoid(1.702 x)` for quick GELU): each
/// operation rounded to f32 in the same order, and Flex's sigmoid (`1 / (1 + exp(-z))` for
/// `z >= 0`, `exp(z) / (1 + exp(z))` below), with the exponential of `std` (or the same
/// bits from [`libm_exp`]).
///
/// Both of Flex's cases take `exp(-|z|)`, so the exponential is one per value without a
/// branch (the signs of activations are as good as random: a branch on them was mispredicted
/// half the time), in a loop of its own; the rest runs as a vectorized loop.
#[derive(Clone, Copy)]
struct BurnGateF32 {
    gate: SigmoidGate,
    /// Whether the exponentials go through [`libm_exp::exp_into`] (vectorized, the bits of
    /// this platform's `expf`: [`libm_exp::matches_std`]) instead of `f32::exp` one by one.
    vector_exp: bool,
}

impl BurnGateF32 {
    /// Values per pass of the exponential loop and then the arithmetic loop.
    const STEP: usize = 256;

    /// The sigmoid's argument.
    #[inline(always)]
    fn z(self, v: f32) -> f32 {
        match self.gate {
            SigmoidGate::Silu => v,
            SigmoidGate::QuickGelu => v * QUICK_GELU_SCALE as f32,
        }
    }

    /// `act(v)` given `e = exp(-|z|)`.
    #[inline(always)]
    fn act(self, v: f32, e: f32) -> f32 {
        let numerator = if self.z(v) >= 0.0 { 1.0 } else { e };
        v * (numerator / (1.0 + e))
    }

    /// Every value of `x` replaced by `act(x) (* up)`.
    #[inline(always)]
    fn run(self, x: &mut [f32], up: Option<&[f32]>) {
        let (mut arg, mut e) = ([0f32; Self::STEP], [0f32; Self::STEP]);
        for (i, xs) in x.chunks_mut(Self::STEP).enumerate() {
            let (arg, e) = (&mut arg[..xs.len()], &mut e[..xs.len()]);
            for (a, &v) in arg.iter_mut().zip(xs.iter()) {
                *a = -self.z(v).abs();
            }
            if self.vector_exp {
                libm_exp::exp_into(arg, e);
            } else {
                for (e, &a) in e.iter_mut().zip(arg.iter()) {
                    *e = a.exp();
                }
            }
            match up {
                Some(up) => {
                    let ups = &up[i * Self::STEP..][..xs.len()];
                    for ((v, &e), &u) in xs.iter_mut().zip(e.iter()).zip(ups) {
                        *v = self.act(*v, e) * u;
                    }
                }
                None => {
                    for (v, &e) in xs.iter_mut().zip(e.iter()) {
                        *v = self.act(*v, e);
                    }
                }
            }
        }
    }
}

/// [`BurnGateF32`] on every value of `x` (the results replace them), in parallel chunks for
/// many values, each as [`Vectorized`] work (AVX-512 or AVX2, with FMA, where the CPU has them).
fn gate_in_place_f32(x: &mut [f32], up: Option<&[f32]>, gate: SigmoidGate) {
    const CHUNK: usize = 1 << 14;
    let gate = BurnGateF32 {
        gate,
        vector_exp: libm_exp::matches_std(),
    };
    for_each_chunk(x, CHUNK, |i, chunk| {
        let ups = up.map(|u| &u[i * CHUNK..i * CHUNK + chunk.len()]);
        vectorized(GateChunkF32 { gate, chunk, ups })
    });
}

/// [`BurnGateF32`] on one chunk, as [`Vectorized`] work: compiled with FMA, which the
/// vectorized exponential's `mul_add`s need to be instructions rather than calls.
struct GateChunkF32<'a> {
    gate: BurnGateF32,
    chunk: &'a mut [f32],
    ups: Option<&'a [f32]>,
}

impl Vectorized for GateChunkF32<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.gate.run(self.chunk, self.ups)
    }
}

/// Whether the CPU has fused multiply-adds, which [`sigmoid_gated`]'s exponential needs to be
/// fast (without them `mul_add` is a call into software).
fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    return true;
}

/// The instruction level of the kernels that have several (the f32 gemm, the decode's
/// dense row products, the prefill attention, the q8/q4 dequantization): each gives the same
/// bits on every level, so the level is a matter of speed, and tests run every one the CPU
/// has. The decode attention's levels sum in their registers' order instead: each agrees with
/// its plain loop within rounding, and gives the same bits however its heads are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    /// Plain Rust, on every CPU.
    Plain,
    /// AVX2 with FMA and F16C (x86 CPUs since Haswell and Zen have all three).
    Avx2,
    /// AVX-512 F, with the AVX2 level's instructions.
    Avx512,
}

impl Simd {
    /// The highest level this CPU runs.
    pub(crate) fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            static BEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
            *BEST.get_or_init(|| {
                use std::arch::is_x86_feature_detected as has;
                if !(has!("avx2") && has!("fma") && has!("f16c")) {
                    Simd::Plain
                } else if has!("avx512f") {
                    Simd::Avx512
                } else {
                    Simd::Avx2
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Simd::Plain
        }
    }

    /// Whether this CPU runs the level (every level up to [`Simd::best`]).
    pub(crate) fn runs_here(self) -> bool {
        self <= Self::best()
    }

    /// The levels above plain Rust that this CPU runs (for the tests that compare them with
    /// the plain one).
    #[cfg(test)]
    pub(crate) fn reachable_simd() -> Vec<Self> {
        [Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|level| level.runs_here())
            .collect()
    }
}

/// `task(i, piece)` on every `chunk`-long piece `i` of `values` (the last may be shorter),
/// on the rayon pool when there are at least [`PARALLEL_VALUES`] of them (a prefill's),
/// else on this thread (a decode step's, where waking the pool costs more than it saves).
fn for_each_chunk<T: Send>(values: &mut [T], chunk: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    if values.len() >= PARALLEL_VALUES {
        values
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, piece)| task(i, piece));
    } else {
        values
            .chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, piece)| task(i, piece));
    }
}

/// `len` values written chunk by chunk by `fill` (the chunk's index, its slots), in
/// parallel for many as [`for_each_chunk`], without zeroing them first:
/// `vec![bf16::ZERO; len]` is a memset on one thread, with the page faults of a fresh
/// buffer, while the others wait.
///
/// # Safety
/// `fill` must write every slot it is given.
pub(crate) unsafe fn written_in_chunks<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    for_each_chunk(&mut out.spare_capacity_mut()[..len], chunk, fill);
    // SAFETY: `fill` wrote every value (this function's contract).
    unsafe { out.set_len(len) };
    out
}

/// Runs `f` compiled for AVX-512 where the CPU has it, else for AVX2 and FMA, so that a
/// loop inlined into it (a closure inherits the features of the function it is written in)
/// vectorizes 16 or 8 wide. The bits do not change: Rust never fuses a multiply and an add
/// by itself, and `mul_add` is fused on every path.
#[inline(always)]
fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            #[inline]
            fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has AVX-512 F (checked above).
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// The value of a bf16 ([`bf16_dot::widen`] of its bits).
#[inline(always)]
fn widen_bf16(v: bf16) -> f32 {
    bf16_dot::widen(v.to_bits())
}

/// `v` rounded to bf16 and back.
#[inline(always)]
fn through_bf16(v: f32) -> f32 {
    widen_bf16(round_bf16(v))
}

/// The bf16 gates' arithmetic ([`gate_slice`]) without `up` for every bf16 input, by its bits: an activation of bf16
/// values has only 65536 results, so a prefill's millions of values are table reads of the
/// same bits instead of an exponential, a division and four roundings each (3-6 cycles per
/// value on a Sapphire Rapids-class Xeon: 4% of a bf16 run's samples). Computed once per
/// gate (65536 values, well under a millisecond); 128 KB, of which a layer's activations
/// touch a small part.
fn gate_table(gate: SigmoidGate) -> &'static [bf16; 1 << 16] {
    static TABLES: [std::sync::OnceLock<Box<[bf16; 1 << 16]>>; 2] = [const { std::sync::OnceLock::new() }; 2];
    TABLES[gate.table_slot()].get_or_init(|| {
        // On this thread, not the pool: a pool task that waited here for a table that a
        // pool task builds could deadlock.
        let inputs: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut table = Box::new([bf16::ZERO; 1 << 16]);
        gate_slice(&inputs, None, &mut table[..], gate);
        table
    })
}

/// GELU in its erf form (HF's `"gelu"`, ViP-LLaVA's projector) of a bf16 tensor, read from a
/// table of Burn's own results for all 65536 bf16 inputs ([`gelu_table`]): the bits of
/// `burn::tensor::activation::gelu`, which evaluates `erf` value by value on one thread
/// (1-2% of a bf16 image encode), in parallel table reads, in place where Flex hands the
/// values over.
///
/// `Err` gives `x` back where this does not apply: other dtypes, autodiff, other devices,
/// `VIPLLAVA_FAST_PATHS=0`.
// As `sigmoid_gated`'s: the one tensor either way.
#[allow(clippy::result_large_err)]
pub fn gelu_bf16<const D: usize>(x: Tensor<D>) -> Result<Tensor<D>, Tensor<D>> {
    let device = x.device();
    if !fast_paths_enabled() || !is_plain_flex(&device) || x.dtype() != DType::BF16 {
        return Err(x);
    }
    let Some(table) = gelu_table(&device) else {
        return Err(x);
    };
    gate_tensor(x, None, DType::BF16, |x: &mut [bf16], _| {
        looked_up_in_place(x, table)
    })
}

/// Burn's GELU of every bf16 input, by its bits, computed once by Burn itself on the plain
/// Flex `device` (so the table has its bits whatever its formula); `None` if the values do
/// not come back as bf16.
fn gelu_table(device: &Device) -> Option<&'static [bf16; 1 << 16]> {
    static TABLE: std::sync::OnceLock<Option<Box<[bf16; 1 << 16]>>> = std::sync::OnceLock::new();
    TABLE
        .get_or_init(|| {
            let inputs: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
            let x = Tensor::<1>::from_data(TensorData::new(inputs, [1 << 16]), (device, DType::BF16));
            let values = burn::tensor::activation::gelu(x)
                .into_data()
                .try_into_vec::<bf16>()
                .ok()?;
            values.into_boxed_slice().try_into().ok()
        })
        .as_deref()
}

/// Every value of `x` replaced by its gate's arithmetic on it ([`gate_slice`], and `up`), through
/// [`gate_table`]: the same bits, since the gate of `x` alone is a bf16 value that the
/// product with `up` widens exactly.
fn gate_in_place_bf16(x: &mut [bf16], up: Option<&[bf16]>, gate: SigmoidGate) {
    const CHUNK: usize = 1 << 14;
    /// Values per table pass, then per vectorized product pass.
    const STEP: usize = 256;
    let table = gate_table(gate);
    let Some(up) = up else {
        return looked_up_in_place(x, table);
    };
    assert_eq!(up.len(), x.len());
    for_each_chunk(x, CHUNK, |i, chunk| {
        let ups = &up[i * CHUNK..][..chunk.len()];
        let mut acts = [0f32; STEP];
        for (xs, us) in chunk.chunks_mut(STEP).zip(ups.chunks(STEP)) {
            for (a, v) in acts.iter_mut().zip(xs.iter()) {
                *a = widen_bf16(table[v.to_bits() as usize]);
            }
            with_simd(|| {
                for ((v, &a), &u) in xs.iter_mut().zip(&acts).zip(us) {
                    *v = round_bf16(a * widen_bf16(u));
                }
            });
        }
    });
}

/// Every value of `x` replaced by `table`'s entry for its bits, in parallel chunks for a
/// prefill's many values (the bf16 gates without `up`, [`gelu_bf16`]).
fn looked_up_in_place(x: &mut [bf16], table: &[bf16; 1 << 16]) {
    for_each_chunk(x, 1 << 14, |_, chunk| {
        for v in chunk.iter_mut() {
            *v = table[v.to_bits() as usize];
        }
    })
}

/// [`gate_chunk`] compiled for the widest vectors this CPU has with FMA, else plain (the
/// same bits: `mul_add` is fused on every path).
fn gate_slice(x: &[bf16], up: Option<&[bf16]>, out: &mut [bf16], gate: SigmoidGate) {
    match Simd::best() {
        // SAFETY: the level's CPU features (AVX-512 F, AVX2, FMA) are there.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { gate_chunk_avx512(x, up, out, gate) },
        // SAFETY: the level's CPU features (AVX2, FMA) are there.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { gate_chunk_avx2(x, up, out, gate) },
        _ => gate_chunk(x, up, out, gate),
    }
}

/// [`gate_chunk`] compiled for AVX-512 with FMA.
///
/// # Safety
/// The CPU must have AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gate_chunk_avx512(x: &[bf16], up: Option<&[bf16]>, out: &mut [bf16], gate: SigmoidGate) {
    gate_chunk(x, up, out, gate)
}

/// [`gate_chunk`] compiled for AVX2 with FMA.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gate_chunk_avx2(x: &[bf16], up: Option<&[bf16]>, out: &mut [bf16], gate: SigmoidGate) {
    gate_chunk(x, up, out, gate)
}

/// `sigmoid(z)` in f32 through the vectorizable exponential (of `-|z|`, so it cannot
/// overflow).
#[inline(always)]
fn sigmoid_f32(z: f32) -> f32 {
    let e = attention::exp_nonpositive(-z.abs());
    if z >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) }
}

/// One chunk of the bf16 gates ([`gate_slice`]): inlined into the callers above, so that
/// each loop (one per case, without branches inside) vectorizes and the exponential's
/// `mul_add`s are FMA instructions. The roundings are PyTorch's, see [`SigmoidGate`].
#[inline(always)]
fn gate_chunk(x: &[bf16], up: Option<&[bf16]>, out: &mut [bf16], gate: SigmoidGate) {
    #[inline(always)]
    fn silu(v: f32) -> f32 {
        through_bf16(v * sigmoid_f32(v))
    }
    #[inline(always)]
    fn quick_gelu(v: f32) -> f32 {
        through_bf16(v * through_bf16(sigmoid_f32(through_bf16(1.702 * v))))
    }
    match (gate, up) {
        (SigmoidGate::Silu, Some(up)) => {
            for ((o, &v), &u) in out.iter_mut().zip(x).zip(up) {
                *o = round_bf16(silu(widen_bf16(v)) * widen_bf16(u));
            }
        }
        (SigmoidGate::Silu, None) => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = round_bf16(silu(widen_bf16(v)));
            }
        }
        (SigmoidGate::QuickGelu, Some(up)) => {
            for ((o, &v), &u) in out.iter_mut().zip(x).zip(up) {
                *o = round_bf16(quick_gelu(widen_bf16(v)) * widen_bf16(u));
            }
        }
        (SigmoidGate::QuickGelu, None) => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = round_bf16(quick_gelu(widen_bf16(v)));
            }
        }
    }
}

/// Along which dimension of a `[K, N]` weight its block scales run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockAxis {
    /// `[1, B]` blocks: `B` consecutive values of a row (burnpacks written before the
    /// int8 path; Burn's default for a one-dimensional block).
    Output,
    /// `[B, 1]` blocks: `B` rows of one column, i.e. along the input dimension (what
    /// `quantize_module` writes on the CPU): the layout of [`int8`].
    Input,
}

/// The int8 values of a block-quantized weight `[K, N]` with one f32 scale per block of
/// `block` values along [`BlockAxis`].
struct QuantizedRows {
    tensor: FlexQTensor,
    block: usize,
    axis: BlockAxis,
    offset: usize,
}

impl QuantizedRows {
    /// The parts of `weight` when it is a Flex quantized tensor this module can read:
    /// symmetric values with one level of per-block scales along one dimension.
    fn of(weight: Tensor<2>) -> Option<Self> {
        let backend =
            <DispatchTensor as DispatchKindConversion<Flex>>::try_into_backend(weight.into_dispatch())
                .ok()?;
        let BackendTensor::Quantized(tensor) = backend else {
            return None;
        };
        Self::from_flex(tensor).ok()
    }

    /// The parts of a Flex quantized `[K, N]` tensor, as [`QuantizedRows::of`]; the tensor
    /// back when the kernels cannot read it.
    fn from_flex(tensor: FlexQTensor) -> Result<Self, Box<FlexQTensor>> {
        match Self::layout(&tensor) {
            Some((axis, block, offset)) => Ok(Self {
                tensor,
                block,
                axis,
                offset,
            }),
            None => Err(Box::new(tensor)),
        }
    }

    /// The block axis, block width and start offset of a readable tensor.
    fn layout(tensor: &FlexQTensor) -> Option<(BlockAxis, usize, usize)> {
        let shape = tensor.shape();
        if shape.num_dims() != 2 {
            return None;
        }
        let [k, n] = shape.dims::<2>();
        let DType::QFloat(scheme) = tensor.dtype() else {
            return None;
        };
        // Integers scaled per block: not lookup-table indices, not float codes.
        let integer = matches!(
            scheme.value,
            QuantValue::Q8S
                | QuantValue::Q8F
                | QuantValue::Q4S
                | QuantValue::Q4F
                | QuantValue::Q2S
                | QuantValue::Q2F
        );
        if scheme.mode != QuantMode::Symmetric || !integer || global_scale_dtype(&scheme).is_some() {
            return None;
        }
        let block = scheme.block_size()?.to_dim_vec(2);
        let (axis, width, along) = match (block[0] as usize, block[1] as usize) {
            (1, width) => (BlockAxis::Output, width, n),
            (width, 1) => (BlockAxis::Input, width, k),
            _ => return None,
        };
        if ![8, 16, 32].contains(&width) || !along.is_multiple_of(width) {
            return None;
        }
        let layout = tensor.tensor().layout();
        if layout.strides() != [n as isize, 1] || tensor.scales().len() != k * n / width {
            return None;
        }
        Some((axis, width, layout.start_offset()))
    }

    fn values(&self, len: usize) -> &[i8] {
        &self.tensor.tensor().storage::<i8>()[self.offset..self.offset + len]
    }

    /// `scale * q` for every value, in parallel.
    fn dequantize(&self) -> Vec<f32> {
        let [k, n] = self.tensor.shape().dims::<2>();
        let values = self.values(k * n);
        let scales = self.tensor.scales();
        match self.axis {
            BlockAxis::Output => dequantize_rows(values, scales, self.block),
            BlockAxis::Input => dequantize_columns(values, scales, self.block, n),
        }
    }
}

/// The f32 values of a Flex block-quantized `[K, N]` weight (`scale * q`, as Burn's
/// `dequantize`), computed in parallel; the tensor back for layouts the kernels do not read.
pub fn dequantize_flex(tensor: FlexQTensor) -> Result<Vec<f32>, Box<FlexQTensor>> {
    QuantizedRows::from_flex(tensor).map(|rows| rows.dequantize())
}

/// `x @ W (+ b)` for a block-quantized `W` on Flex. For a few rows the int8 values are
/// streamed: with int8 activations and integer products when the blocks run along K
/// and [`int8_activations_enabled`], otherwise as `(x * scale) * q` in f32 (the result is
/// then the f32 product with the dequantized weights up to f32 rounding). For many rows
/// with f32 or f16 activations, the int8 gemm where the CPU has one and int8 activations
/// are on ([`packed::PackedWeight::matmul_int8_gemm`]: the decode product's bits, the weight
/// packed for the call); otherwise the weight is dequantized to f32 in parallel (`scale *
/// q`, exactly as Burn's `dequantize`) for the f32 gemm, or with bf16 activations rounded
/// to bf16 for the bf16 gemm ([`dequantized_linear`]). The result is rounded once to the
/// activation dtype.
/// (Burn's own `q_matmul`, used with `VIPLLAVA_FAST_PATHS=0`, dequantizes into a bf16/f16
/// activation's dtype and multiplies there: less accurate.)
fn quantized_linear<const D: usize>(
    layer: &Linear,
    weight: Tensor<2>,
    x: &Tensor<D>,
    rows: usize,
) -> Option<Tensor<D>> {
    let [k, n] = weight.dims();
    let quantized = QuantizedRows::of(weight)?;
    let values = quantized.values(k * n);
    let scales = quantized.tensor.scales();
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return None;
    }
    let bias = layer.bias.as_ref().map(|b| b.val());
    if rows <= MAX_STREAM_ROWS {
        let xs = host_f32(x.clone())?;
        if xs.len() != rows * k {
            return None;
        }
        let out = match quantized.axis {
            BlockAxis::Output => matmul_stream_q8(&xs, values, scales, quantized.block, rows, k, n)?,
            BlockAxis::Input => {
                let w = ColumnBlocks {
                    q: values,
                    scales,
                    k,
                    n,
                    block: quantized.block,
                };
                if int8_activations_enabled() {
                    let xq = Int8Rows::quantize(&xs, rows, k, quantized.block)?;
                    int8::matmul_int8(&xq, &w)?
                } else {
                    matmul_q8_columns(&xs, &w, rows)?
                }
            }
        };
        return output_with_bias(out, bias.as_ref(), x, n, dtype);
    }
    // A weight that could be packed takes the packed weight's int8 gemm where it runs
    // (packed for the call, a quarter or an eighth of the bytes of the dequantized copy it
    // replaces): packing changes no result.
    if quantized.axis == BlockAxis::Input
        && int8_activations_enabled()
        && !(dtype == DType::BF16 && bf16_gemm_enabled())
        && let DType::QFloat(scheme) = quantized.tensor.dtype()
        && let Some(bits) = packed::bits_of(&scheme)
        && packed::PackedWeight::int8_gemm_runs(bits, quantized.block)
        && let Some(w) = packed::PackedWeight::pack(
            &ColumnBlocks {
                q: values,
                scales,
                k,
                n,
                block: quantized.block,
            },
            bits,
        )
        && let Some(out) = packed_int8_gemm(&w, x, rows)
    {
        return output_with_bias(out, bias.as_ref(), x, n, dtype);
    }
    Some(dequantized_linear(&quantized, [k, n], x, bias))
}

/// A quantized weight as [`dequantized_linear`] reads it: `scale * q` as f32 (the bits
/// of Burn's `dequantize`) or rounded to bf16.
trait Dequantize {
    fn dequantize_f32(&self) -> Vec<f32>;
    fn dequantize_bf16(&self) -> Vec<bf16>;
}

impl Dequantize for QuantizedRows {
    fn dequantize_f32(&self) -> Vec<f32> {
        self.dequantize()
    }

    fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize().into_par_iter().map(bf16::from_f32).collect()
    }
}

impl Dequantize for packed::PackedWeight {
    fn dequantize_f32(&self) -> Vec<f32> {
        self.dequantize()
    }

    fn dequantize_bf16(&self) -> Vec<bf16> {
        packed::PackedWeight::dequantize_bf16(self)
    }
}

/// `x @ W (+ b)` for many rows of a quantized `W` (`[k, n]`), dequantized for the call:
/// Burn's f32 gemm, the bias added in f32, the result rounded once to `x`'s dtype.
///
/// With bf16 activations the dequantized weight is rounded to bf16 first, as Burn's own
/// `q_matmul` and bitsandbytes' bf16 compute dtype do, and multiplied with the bf16 gemm
/// ([`bf16_gemm`], AMX tiles where the CPU has them) instead of Flex's f32 gemm: a q8/q4
/// prefill then runs at the speed of a bf16 one. The rounding happens on every CPU, so
/// the result does not depend on which of the two products runs (up to summation order).
fn dequantized_linear<const D: usize>(
    w: &impl Dequantize,
    shape: [usize; 2],
    x: &Tensor<D>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let bf16_activations = x.dtype() == DType::BF16;
    if bf16_activations
        && bf16_gemm_enabled()
        && let Some(out) = bf16_weight_linear(&w.dequantize_bf16(), shape, x, bias.as_ref())
    {
        return out;
    }
    let mut w = w.dequantize_f32();
    if bf16_activations {
        w.par_iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
    }
    // Our f32 gemm where it runs: the bits of a packed weight's product (which dequantizes
    // into the same gemm's panels, `packed_f32_gemm`), so packing changes no result.
    if f32_gemm_enabled()
        && let Some(out) = f32_weight_linear(&w, shape, x, bias.as_ref())
    {
        return out;
    }
    let weight = Tensor::<2>::from_data(TensorData::new(w, shape), &x.device());
    // Burn's cast keeps a tensor that already has the dtype.
    let mut y = x.clone().cast(DType::F32).matmul(weight.unsqueeze());
    if let Some(b) = bias {
        y = y + b.cast(DType::F32).unsqueeze();
    }
    y.cast(x.dtype())
}

/// `x @ W (+ b)` for a dequantized f32 weight `[k, n]` on the host with [`f32_gemm`], the
/// activations widened to f32 and the result rounded once to `x`'s dtype; `None` where it
/// does not run.
fn f32_weight_linear<const D: usize>(
    w: &[f32],
    [k, n]: [usize; 2],
    x: &Tensor<D>,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<D>> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let out = with_gemm_inputs(x, rows, k, |xs| {
        f32_gemm::matmul_f32_gemm(xs, w, bf16_gemm::WeightOrder::InputMajor, rows, k, n)
    })?;
    output_with_bias(out, bias, x, n, x.dtype())
}

/// `f(values)` for `x`'s first `rows * k` values as f32, for [`f32_gemm`]: f32 read in
/// place from a contiguous block, bf16 and f16 widened in parallel.
fn with_gemm_inputs<const D: usize, R>(
    x: &Tensor<D>,
    rows: usize,
    k: usize,
    f: impl FnOnce(&[f32]) -> Option<R>,
) -> Option<R> {
    let (input, inputs) = contiguous_rows(x, rows * k)?;
    match x.dtype() {
        DType::F32 => f(input.storage::<f32>().get(inputs)?),
        DType::BF16 => f(&widen_bf16_values(input.storage::<bf16>().get(inputs)?)),
        DType::F16 => f(&widen_f16_values(input.storage::<f16>().get(inputs)?)),
        _ => f(&host_f32(x.clone())?),
    }
}

/// `x @ W (+ b)` for bf16 activations `x` and a bf16 weight `[k, n]` on the host, with the
/// bf16 gemm; `None` where it does not run (no AVX-512 BF16, sizes that do not match).
fn bf16_weight_linear<const D: usize>(
    w: &[bf16],
    [k, n]: [usize; 2],
    x: &Tensor<D>,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<D>> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let data = x.clone().into_data();
    let xs = data.as_slice::<bf16>().ok()?;
    let out = bf16_gemm::matmul_bf16_gemm(xs, w, bf16_gemm::WeightOrder::InputMajor, rows, k, n)?;
    output_with_bias(out, bias, x, n, DType::BF16)
}

/// `x @ W (+ b)` for a packed `W` ([`packed::PackedWeight`]), with the arithmetic of
/// [`quantized_linear`] on the unpacked weight: the same bits. Few rows with int8
/// activations multiply the nibbles in place; few rows with f32 activations (the slower,
/// exact option) unpack the weight for the call; many rows dequantize it as they pack it
/// into the AMX panels for bf16 activations where the CPU has AMX; many f32 or f16 rows
/// take the int8 gemm with int8 activations where the CPU has one (AMX-INT8; q4 on AVX2
/// without VNNI); the rest dequantize into the f32 gemm's panels (or, without the f32
/// gemm, into a copy for the call).
/// `None` when `x` is not on the plain Flex device or not a float of the model's dtypes.
fn packed_linear<const D: usize>(
    layer: &Linear,
    w: &packed::PackedWeight,
    x: &Tensor<D>,
) -> Option<Tensor<D>> {
    let dtype = x.dtype();
    if !is_plain_flex(&x.device()) || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return None;
    }
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let (k, n) = (w.k(), w.n());
    if dims[D - 1] != k {
        return None;
    }
    let bias = layer.bias.as_ref().map(|b| b.val());
    if rows <= MAX_STREAM_ROWS {
        let xs = host_f32(x.clone())?;
        let out = if int8_activations_enabled() {
            w.matmul_int8(&Int8Rows::quantize(&xs, rows, k, w.block())?)?
        } else {
            let (values, scales) = (w.unpack(), w.scales());
            let columns = ColumnBlocks {
                q: &values,
                scales: &scales,
                k,
                n,
                block: w.block(),
            };
            matmul_q8_columns(&xs, &columns, rows)?
        };
        return output_with_bias(out, bias.as_ref(), x, n, dtype);
    }
    // With AMX, the tasks dequantize their panels from the packed bytes (the bits of the
    // bf16 gemm on `dequantize_bf16`'s copy below, with the bias added as blocks finish).
    if dtype == DType::BF16
        && bf16_gemm_enabled()
        && let Some(out) = packed_amx_linear(layer, w, x, rows)
    {
        return Some(out);
    }
    // Without the bf16 gemm: the int8 gemm where the CPU has one (AMX-INT8; q4 on AVX2
    // without VNNI) multiplies int8 activations (the decode kernel's bits); otherwise our
    // f32 gemm dequantizes the weight tile by tile as it packs (the bits of
    // `dequantized_linear`'s weights, without their f32 copy).
    if !(dtype == DType::BF16 && bf16_gemm_enabled())
        && let Some(out) = packed_int8_gemm(w, x, rows).or_else(|| {
            f32_gemm_enabled()
                .then(|| packed_f32_gemm(w, x, rows, dtype))
                .flatten()
        })
    {
        return output_with_bias(out, bias.as_ref(), x, n, dtype);
    }
    Some(dequantized_linear(w, [k, n], x, bias))
}

/// `x @ w (+ bias)` for bf16 activations and a packed weight with AMX
/// ([`bf16_gemm::matmul_bf16_amx_rounded_packed`]); `None` without AMX.
fn packed_amx_linear<const D: usize>(
    layer: &Linear,
    w: &packed::PackedWeight,
    x: &Tensor<D>,
    rows: usize,
) -> Option<Tensor<D>> {
    // Refused before the bias is read, which the other paths do again.
    if !amx::amx_bf16_available() {
        return None;
    }
    // The activations read in place, as the dense products read them (and so packed once
    // for the products of one input inside `sharing_activations`).
    let (input, inputs) = contiguous_rows(x, rows * w.k())?;
    let xs = input.storage::<bf16>().get(inputs)?;
    let bias = host_bias(layer, w.n())?;
    let out = bf16_gemm::matmul_bf16_amx_rounded_packed(xs, w, rows, bias.as_deref())?;
    Some(bf16_output(out, x, w.n()))
}

/// `x [rows, k] @ w` with the activations quantized to int8 per block, through
/// [`packed::PackedWeight::matmul_int8_gemm`] (AMX-INT8; q4 weights on CPUs with AVX2 but
/// not AVX-512 VNNI); `None` where that gemm does not apply or int8 activations are off.
fn packed_int8_gemm<const D: usize>(
    w: &packed::PackedWeight,
    x: &Tensor<D>,
    rows: usize,
) -> Option<Vec<f32>> {
    if !int8_activations_enabled() || !w.int8_gemm_applies() {
        return None;
    }
    with_gemm_inputs(x, rows, w.k(), |xs| {
        w.matmul_int8_gemm(&Int8Rows::quantize(xs, rows, w.k(), w.block())?)
    })
}

/// `x [rows, k] @ w` in f32 with [`f32_gemm::matmul_f32_gemm_packed`], bf16 activations
/// widened (in parallel) and the weight rounded to bf16 for them as [`dequantized_linear`]
/// rounds it.
fn packed_f32_gemm<const D: usize>(
    w: &packed::PackedWeight,
    x: &Tensor<D>,
    rows: usize,
    dtype: DType,
) -> Option<Vec<f32>> {
    with_gemm_inputs(x, rows, w.k(), |xs| {
        f32_gemm::matmul_f32_gemm_packed(xs, w, rows, dtype == DType::BF16)
    })
}

/// `scale * q` for a weight with `[block, 1]` blocks (`scales[(kk / block) * n + j]`), one
/// rayon task per `block` rows.
fn dequantize_columns(values: &[i8], scales: &[f32], block: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(block * n)
        .zip(values.par_chunks(block * n))
        .zip(scales.par_chunks(n))
        .for_each(|((out, values), scales)| {
            for (out, values) in out.chunks_mut(n).zip(values.chunks(n)) {
                for ((o, &q), &s) in out.iter_mut().zip(values).zip(scales) {
                    *o = s * q as f32;
                }
            }
        });
    out
}

/// `x [rows, k] @ dequantize(w)` in f32 for a weight with `[block, 1]` blocks, f32
/// activations: per block of rows the f32 sum `sum_kk x[kk] * q[kk, j]`, then one FMA with
/// the block's scale. One task per [`K_BLOCK`] weight rows (a contiguous slab), the
/// partial products summed in slab order (the result does not depend on the thread count).
/// `None` when the shapes disagree.
pub fn matmul_q8_columns(x: &[f32], w: &ColumnBlocks<'_>, rows: usize) -> Option<Vec<f32>> {
    if !w.is_valid() || x.len() != rows * w.k || !K_BLOCK.is_multiple_of(w.block) {
        return None;
    }
    Some(stream(x, &KBlocks { w }, rows, w.k))
}

/// A `[k, n]` int8 weight with `[block, 1]` blocks, streamed by [`stream`].
struct KBlocks<'a, 'w> {
    w: &'a ColumnBlocks<'w>,
}

impl StreamedWeight for KBlocks<'_, '_> {
    fn n(&self) -> usize {
        self.w.n
    }

    /// `k0` and `k1` fall on block boundaries: [`K_BLOCK`] is a multiple of the block.
    #[inline(always)]
    fn accumulate(&self, x: &[f32], rows: usize, k: usize, k0: usize, k1: usize, acc: &mut [f32]) {
        let w = self.w;
        let n = w.n;
        let mut block_sum = vec![0f32; rows * n];
        for kb in k0 / w.block..k1 / w.block {
            block_sum.fill(0.0);
            let mut kk = kb * w.block;
            // Four weight rows per pass over the block sums (the int8 kernel's Q8_ROWS
            // trade-off: fewer passes over `block_sum`, four streams).
            while kk + 4 <= (kb + 1) * w.block {
                let q: [&[i8]; 4] = std::array::from_fn(|i| &w.q[(kk + i) * n..(kk + i + 1) * n]);
                for r in 0..rows {
                    let a: [f32; 4] = std::array::from_fn(|i| x[r * k + kk + i]);
                    let sums = &mut block_sum[r * n..(r + 1) * n];
                    for (j, s) in sums.iter_mut().enumerate() {
                        let mut v = *s;
                        for i in 0..4 {
                            v = a[i].mul_add(q[i][j] as f32, v);
                        }
                        *s = v;
                    }
                }
                kk += 4;
            }
            let scales = &w.scales[kb * n..(kb + 1) * n];
            for r in 0..rows {
                let sums = &block_sum[r * n..(r + 1) * n];
                for ((a, &s), &sc) in acc[r * n..(r + 1) * n].iter_mut().zip(sums).zip(scales) {
                    *a = s.mul_add(sc, *a);
                }
            }
        }
    }
}

/// `scale * q` for every value, one rayon task per 64 Ki values.
fn dequantize_rows(values: &[i8], scales: &[f32], block: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let chunk = CHUNK.div_ceil(block) * block;
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(chunk)
        .zip(values.par_chunks(chunk))
        .enumerate()
        .for_each(|(c, (out, values))| {
            let first = c * chunk / block;
            for ((o, q), &s) in out
                .chunks_mut(block)
                .zip(values.chunks(block))
                .zip(&scales[first..])
            {
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = s * q as f32;
                }
            }
        });
    out
}

/// `x [rows, k] @ dequantize(q [k, n])` in f32, streaming the int8 values once, in the
/// K blocks of [`matmul_stream`] (so the result does not depend on the thread count).
/// `scales` holds one scale per `block` consecutive values of a row; `None` unless `block`
/// is 8, 16 or 32 and divides `n`, and the slice lengths match the shapes.
pub fn matmul_stream_q8(
    x: &[f32],
    q: &[i8],
    scales: &[f32],
    block: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    let shapes_match = x.len() == rows * k && q.len() == k * n && scales.len() * block == k * n;
    if ![8, 16, 32].contains(&block) || !n.is_multiple_of(block) || !shapes_match {
        return None;
    }
    Some(stream(x, &QRows { q, scales, block, n }, rows, k))
}

/// Int8 rows of a quantized `[k, n]` weight and their per-block scales.
struct QRows<'a> {
    q: &'a [i8],
    scales: &'a [f32],
    block: usize,
    n: usize,
}

impl QRows<'_> {
    #[inline(always)]
    fn row(&self, kk: usize) -> (&[i8], &[f32]) {
        let blocks = self.n / self.block;
        (
            &self.q[kk * self.n..(kk + 1) * self.n],
            &self.scales[kk * blocks..(kk + 1) * blocks],
        )
    }
}

impl StreamedWeight for QRows<'_> {
    fn n(&self) -> usize {
        self.n
    }

    /// Chooses a fixed block width (so the inner loop unrolls into vector code).
    #[inline(always)]
    fn accumulate(&self, x: &[f32], rows: usize, k: usize, k0: usize, k1: usize, acc: &mut [f32]) {
        match self.block {
            32 => accumulate_q8_generic::<32>(x, self, rows, k, k0, k1, acc),
            16 => accumulate_q8_generic::<16>(x, self, rows, k, k0, k1, acc),
            8 => accumulate_q8_generic::<8>(x, self, rows, k, k0, k1, acc),
            // `matmul_stream_q8` admits no other width.
            _ => unreachable!("block width {}", self.block),
        }
    }
}

/// Weight rows per pass of the int8 kernel: the accumulator is read and written once per
/// this many rows.
const Q8_ROWS: usize = 8;

/// `acc[r, :] += sum_{kk in k0..k1} (x[r, kk] * scale[kk, block]) * q[kk, :]`, [`Q8_ROWS`]
/// weight rows at a time: one product per row and block, then one FMA per value.
#[inline(always)]
fn accumulate_q8_generic<const B: usize>(
    x: &[f32],
    w: &QRows<'_>,
    rows: usize,
    k: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    let n = w.n;
    let mut kk = k0;
    while kk + Q8_ROWS <= k1 {
        let q: [&[i8]; Q8_ROWS] = std::array::from_fn(|i| w.row(kk + i).0);
        let scales: [&[f32]; Q8_ROWS] = std::array::from_fn(|i| w.row(kk + i).1);
        for r in 0..rows {
            let a: [f32; Q8_ROWS] = std::array::from_fn(|i| x[r * k + kk + i]);
            let out = &mut acc[r * n..(r + 1) * n];
            for (b, out) in out.chunks_exact_mut(B).enumerate() {
                let e: [f32; Q8_ROWS] = std::array::from_fn(|i| a[i] * scales[i][b]);
                let blocks: [&[i8]; Q8_ROWS] = std::array::from_fn(|i| &q[i][b * B..(b + 1) * B]);
                for j in 0..B {
                    let mut s = out[j];
                    for i in 0..Q8_ROWS {
                        s = e[i].mul_add(blocks[i][j] as f32, s);
                    }
                    out[j] = s;
                }
            }
        }
        kk += Q8_ROWS;
    }
    while kk < k1 {
        let (q0, s0) = w.row(kk);
        for r in 0..rows {
            let a0 = x[r * k + kk];
            let out = &mut acc[r * n..(r + 1) * n];
            for (b, out) in out.chunks_exact_mut(B).enumerate() {
                let e0 = a0 * s0[b];
                let r0 = &q0[b * B..(b + 1) * B];
                for j in 0..B {
                    out[j] = e0.mul_add(r0[j] as f32, out[j]);
                }
            }
        }
        kk += 1;
    }
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
        widen_f16(self)
    }
}

/// 16 values of `T` at `at` as one register of f32: bf16, f16 and f32 with one or two
/// instructions, any other [`Widen`] type value by value.
///
/// # Safety
/// The CPU must have AVX-512 F; `at` must point to 16 readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn widen16<T: Widen + burn::tensor::Element>(at: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: 16 values of `T` are readable at `at` (the caller's promise), and the dtype
    // says how wide each is.
    unsafe {
        match T::dtype() {
            DType::BF16 => {
                let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(at.cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
            }
            DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(at.cast())),
            DType::F32 => _mm512_loadu_ps(at.cast()),
            _ => {
                let values: [f32; 16] = std::array::from_fn(|i| at.add(i).read_unaligned().widen());
                _mm512_loadu_ps(values.as_ptr())
            }
        }
    }
}

/// 8 values of `T` at `at` as one AVX register of f32, as [`widen16`] does for 16.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `at` must point to 8 readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn widen8<T: Widen + burn::tensor::Element>(at: *const T) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: 8 values of `T` are readable at `at` (the caller's promise), and the dtype
    // says how wide each is.
    unsafe {
        match T::dtype() {
            DType::BF16 => {
                let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(at.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
            }
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(at.cast())),
            DType::F32 => _mm256_loadu_ps(at.cast()),
            _ => {
                let values: [f32; 8] = std::array::from_fn(|i| at.add(i).read_unaligned().widen());
                _mm256_loadu_ps(values.as_ptr())
            }
        }
    }
}

/// Rows of W per task. Fixed (not derived from the thread count) so that the
/// summation order, hence the result, is the same on every machine; a multiple of every
/// quantization block length (8, 16, 32).
const K_BLOCK: usize = 256;

/// A `[k, n]` weight that the decode kernels stream row by row.
trait StreamedWeight: Sync {
    /// Output width.
    fn n(&self) -> usize;
    /// `acc[r, :] += x[r, k0..k1] @ w[k0..k1, :]` for `rows` rows of `x` (row length `k`).
    fn accumulate(&self, x: &[f32], rows: usize, k: usize, k0: usize, k1: usize, acc: &mut [f32]);
}

/// A plain `[k, n]` weight of f32/bf16/f16 values.
struct DenseRows<'a, T> {
    w: &'a [T],
    n: usize,
}

impl<T: Widen + Element> StreamedWeight for DenseRows<'_, T> {
    fn n(&self) -> usize {
        self.n
    }

    #[inline(always)]
    fn accumulate(&self, x: &[f32], rows: usize, k: usize, k0: usize, k1: usize, acc: &mut [f32]) {
        // f16 with F16C's conversion, which the compiler does not generate from scalar code
        // (the same bits for finite values; which NaN payload survives may differ).
        // The 1.1B f16 decode from a burnpack (BENCHMARKS.md round 37): 1.4-2.2 tok/s with
        // `half`'s call per value, 4.4-5.7 with the vectorized `widen_f16` (a handful of
        // instructions per 16 values), 8.0-9.6 with this.
        #[cfg(target_arch = "x86_64")]
        if T::dtype() == DType::F16 {
            let weight = WeightRows {
                w: self.w,
                n: self.n,
                k0,
                k1,
            };
            match Simd::best() {
                // SAFETY: the CPU has this level's features (`Simd::best`).
                Simd::Avx512 => return unsafe { weight.accumulate_avx512(x, rows, k, acc) },
                // SAFETY: as above.
                Simd::Avx2 => return unsafe { weight.accumulate_avx2(x, rows, k, acc) },
                _ => {}
            }
        }
        accumulate_generic(x, self.w, rows, k, self.n, k0, k1, acc);
    }
}

/// Rows `k0..k1` of a `[k, n]` weight, for [`accumulate_generic`]'s loop written with
/// intrinsics.
#[cfg(target_arch = "x86_64")]
struct WeightRows<'a, T> {
    w: &'a [T],
    n: usize,
    k0: usize,
    k1: usize,
}

#[cfg(target_arch = "x86_64")]
impl<T: Widen + Element> WeightRows<'_, T> {
    /// The weight rows `kk..kk + R`, each `n` long.
    fn rows<const R: usize>(&self, kk: usize) -> [&[T]; R] {
        std::array::from_fn(|i| &self.w[(kk + i) * self.n..][..self.n])
    }

    /// [`accumulate_generic`] with 16 columns per register: the same multiply-adds in the
    /// same order (four weight rows per pass, then one), so the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and FMA.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn accumulate_avx512(&self, x: &[f32], rows: usize, k: usize, acc: &mut [f32]) {
        use std::arch::x86_64::*;
        /// `out[j] += a[0] w[0][j] + ... + a[R-1] w[R-1][j]`, one multiply-add after another.
        ///
        /// # Safety
        /// The CPU must have AVX-512 F and FMA.
        #[inline(always)]
        unsafe fn add_rows<T: Widen + Element, const R: usize>(out: &mut [f32], a: [f32; R], w: [&[T]; R]) {
            let w = w.map(|w| &w[..out.len()]);
            let whole = out.len() / 16 * 16;
            for j in (0..whole).step_by(16) {
                // SAFETY: `j + 16 <= whole <= out.len()`, the length of each weight row
                // (sliced above); the CPU has AVX-512 F and FMA (the caller's promise).
                unsafe {
                    let mut sum = _mm512_loadu_ps(out.as_ptr().add(j));
                    for i in 0..R {
                        sum = _mm512_fmadd_ps(_mm512_set1_ps(a[i]), widen16(w[i].as_ptr().add(j)), sum);
                    }
                    _mm512_storeu_ps(out.as_mut_ptr().add(j), sum);
                }
            }
            add_rows_plain(&mut out[whole..], a, w.map(|w| &w[whole..]));
        }
        // SAFETY: this function's features are the CPU's (the caller's promise).
        self.each_pass(
            x,
            rows,
            k,
            acc,
            |o, a, w| unsafe { add_rows::<T, 4>(o, a, w) },
            |o, a, w| unsafe { add_rows::<T, 1>(o, a, w) },
        );
    }

    /// [`WeightRows::accumulate_avx512`] with 8 columns per register.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate_avx2(&self, x: &[f32], rows: usize, k: usize, acc: &mut [f32]) {
        use std::arch::x86_64::*;
        /// As in [`WeightRows::accumulate_avx512`].
        ///
        /// # Safety
        /// The CPU must have AVX2, FMA and F16C.
        #[inline(always)]
        unsafe fn add_rows<T: Widen + Element, const R: usize>(out: &mut [f32], a: [f32; R], w: [&[T]; R]) {
            let w = w.map(|w| &w[..out.len()]);
            let whole = out.len() / 8 * 8;
            for j in (0..whole).step_by(8) {
                // SAFETY: `j + 8 <= whole <= out.len()`, the length of each weight row
                // (sliced above); the CPU has AVX2, FMA and F16C (the caller's promise).
                unsafe {
                    let mut sum = _mm256_loadu_ps(out.as_ptr().add(j));
                    for i in 0..R {
                        sum = _mm256_fmadd_ps(_mm256_set1_ps(a[i]), widen8(w[i].as_ptr().add(j)), sum);
                    }
                    _mm256_storeu_ps(out.as_mut_ptr().add(j), sum);
                }
            }
            add_rows_plain(&mut out[whole..], a, w.map(|w| &w[whole..]));
        }
        // SAFETY: this function's features are the CPU's (the caller's promise).
        self.each_pass(
            x,
            rows,
            k,
            acc,
            |o, a, w| unsafe { add_rows::<T, 4>(o, a, w) },
            |o, a, w| unsafe { add_rows::<T, 1>(o, a, w) },
        );
    }

    /// [`accumulate_generic`]'s passes: four weight rows at a time, then one, each pass over
    /// every activation row.
    #[inline(always)]
    fn each_pass(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        acc: &mut [f32],
        four: impl Fn(&mut [f32], [f32; 4], [&[T]; 4]),
        one: impl Fn(&mut [f32], [f32; 1], [&[T]; 1]),
    ) {
        let n = self.n;
        let mut kk = self.k0;
        while kk + 4 <= self.k1 {
            let w = self.rows::<4>(kk);
            for r in 0..rows {
                four(
                    &mut acc[r * n..][..n],
                    std::array::from_fn(|i| x[r * k + kk + i]),
                    w,
                );
            }
            kk += 4;
        }
        while kk < self.k1 {
            let w = self.rows::<1>(kk);
            for r in 0..rows {
                one(&mut acc[r * n..][..n], [x[r * k + kk]], w);
            }
            kk += 1;
        }
    }
}

/// `out[j] += a[0] w[0][j] + ... + a[R-1] w[R-1][j]`, one multiply-add after another.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn add_rows_plain<T: Widen, const R: usize>(out: &mut [f32], a: [f32; R], w: [&[T]; R]) {
    for (j, o) in out.iter_mut().enumerate() {
        let mut sum = *o;
        for i in 0..R {
            sum = a[i].mul_add(w[i][j].widen(), sum);
        }
        *o = sum;
    }
}

/// `x [rows, k] @ w [k, n]` in f32, streaming `w` once.
pub fn matmul_stream<T: Widen + Element>(x: &[f32], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32> {
    stream(x, &DenseRows { w, n }, rows, k)
}

/// `x [rows, k] @ w` in [`K_BLOCK`]-row blocks of `w` (one task each), the per-block
/// partial products summed in block order.
fn stream<W: StreamedWeight>(x: &[f32], w: &W, rows: usize, k: usize) -> Vec<f32> {
    sum_over_slabs(rows, w.n(), k, |k0, k1, acc| {
        accumulate(x, w, rows, k, k0, k1, acc)
    })
}

/// A `[rows, n]` product as the sum of its [`K_BLOCK`]-row weight slabs: `slab(k0, k1, acc)`
/// adds rows `k0..k1`'s share to the zeroed `acc`, one task per slab (on the decode team),
/// and the partial products are summed in slab order (the result does not depend on the
/// thread count).
pub(crate) fn sum_over_slabs(
    rows: usize,
    n: usize,
    k: usize,
    slab: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = sum_over_slabs_of_each(rows, &[n], k, |_, k0, k1, acc| slab(k0, k1, acc));
    out.pop().unwrap_or_default()
}

/// [`sum_over_slabs`] for several products over the same `k` rows (output widths `widths`)
/// as one set of tasks: `slab(i, k0, k1, acc)` adds product `i`'s share. Each product
/// is summed in its own slab order, so each result has the bits of its own
/// [`sum_over_slabs`]; one parallel region instead of one per product.
pub(crate) fn sum_over_slabs_of_each(
    rows: usize,
    widths: &[usize],
    k: usize,
    slab: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    let slabs = k.div_ceil(K_BLOCK).max(1);
    let partials: Vec<Vec<f32>> = team::map(widths.len() * slabs, |task| {
        let (i, t) = (task / slabs, task % slabs);
        let k0 = (t * K_BLOCK).min(k);
        let k1 = ((t + 1) * K_BLOCK).min(k);
        let mut acc = vec![0f32; rows * widths[i]];
        if k0 < k1 {
            slab(i, k0, k1, &mut acc);
        }
        acc
    });
    // The partials summed in slab order, each output split into pieces summed in parallel
    // (an element's additions, and so its bits, do not depend on the split).
    const SUM_PIECE: usize = 1024;
    partials
        .chunks(slabs)
        .zip(widths)
        .map(|(parts, &n)| {
            let mut out = vec![0f32; rows * n];
            team::for_each_chunk_mut(&mut out, SUM_PIECE, |piece, out| {
                let start = piece * SUM_PIECE;
                for p in parts {
                    for (o, v) in out.iter_mut().zip(&p[start..]) {
                        *o += v;
                    }
                }
            });
            out
        })
        .collect()
}

/// [`StreamedWeight::accumulate`] compiled for the best vector extension the CPU has.
fn accumulate<W: StreamedWeight>(
    x: &[f32],
    w: &W,
    rows: usize,
    k: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    vectorized(Accumulate {
        x,
        w,
        rows,
        k,
        k0,
        k1,
        acc,
    });
}

/// The arguments of one [`StreamedWeight::accumulate`] call, as [`Vectorized`] work.
struct Accumulate<'a, W> {
    x: &'a [f32],
    w: &'a W,
    rows: usize,
    k: usize,
    k0: usize,
    k1: usize,
    acc: &'a mut [f32],
}

impl<W: StreamedWeight> Vectorized for Accumulate<'_, W> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.w
            .accumulate(self.x, self.rows, self.k, self.k0, self.k1, self.acc);
    }
}

/// Work written as plain Rust loops that the compiler vectorizes: [`vectorized`] compiles
/// it once per vector extension and runs the best one the CPU has. `run` (and what it
/// calls) must be `#[inline(always)]`, so that it is compiled inside each copy.
pub(crate) trait Vectorized {
    /// What the work returns.
    type Output;
    /// Does the work.
    fn run(self) -> Self::Output;
}

/// Runs `work` compiled for AVX-512 (F, BW) + FMA or AVX2 + FMA when the CPU has them
/// (checked at run time; std caches the answer), as plain Rust otherwise.
pub(crate) fn vectorized<V: Vectorized>(work: V) -> V::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX-512F, AVX-512BW and FMA (checked above).
            return unsafe { run_avx512(work) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { run_avx2(work) };
        }
    }
    work.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn run_avx512<V: Vectorized>(work: V) -> V::Output {
    work.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<V: Vectorized>(work: V) -> V::Output {
    work.run()
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
pub(crate) mod tests {
    use super::*;

    /// A xorshift sequence from `seed`: pseudo-random test values with no period a kernel's
    /// tiling could line up with.
    pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// Test activations `[rows, k]` in [-1, 1] with no simple pattern.
    pub(crate) fn activations(rows: usize, k: usize) -> Vec<f32> {
        (0..rows * k)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect()
    }

    /// `len` int8 test weights spanning -127..=127.
    pub(crate) fn int8_values(len: usize) -> Vec<i8> {
        (0..len).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect()
    }

    /// `count` positive test scales, 1e-3 to 7e-3.
    pub(crate) fn block_scales(count: usize) -> Vec<f32> {
        (0..count).map(|i| 1e-3 * (1 + i % 7) as f32).collect()
    }

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
            let x = activations(rows, k);
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
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let got = matmul_stream(&x, &wh, rows, k, n);
            let want = reference(&x, &wh32, rows, k, n);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "f16 {rows}x{k}x{n}: {a} vs {b}"
                );
            }
        }
    }

    /// The f16 `[k, n]` stream written with intrinsics gives the bits of the plain loop at
    /// every level the CPU runs: widths with and without partial registers, slabs whose
    /// length is not a multiple of four rows, one to three activation rows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn f16_stream_levels_give_the_plain_bits() {
        let mut next = xorshift(0x05ee_df16);
        for &(rows, k, n, k0, k1) in &[
            (1, 9, 1, 0, 9),
            (2, 13, 7, 1, 12),
            (3, 40, 17, 4, 39),
            (1, 64, 67, 0, 64),
            (2, 21, 200, 3, 20),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let w: Vec<f16> = (0..k * n)
                .map(|_| f16::from_bits((next() % 0x7c00) as u16 | ((next() % 2) << 15) as u16))
                .collect();
            let start: Vec<f32> = (0..rows * n).map(|i| i as f32 * 0.25 - 3.0).collect();
            let mut plain = start.clone();
            accumulate_generic(&x, &w, rows, k, n, k0, k1, &mut plain);
            let weight = WeightRows { w: &w, n, k0, k1 };
            for level in Simd::reachable_simd() {
                let mut got = start.clone();
                // SAFETY: the CPU runs `level` (`reachable_simd`).
                match level {
                    Simd::Avx512 => unsafe { weight.accumulate_avx512(&x, rows, k, &mut got) },
                    Simd::Avx2 => unsafe { weight.accumulate_avx2(&x, rows, k, &mut got) },
                    Simd::Plain => unreachable!("not a SIMD level"),
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&plain),
                    "{level:?} {rows}x{k}x{n} rows {k0}..{k1}"
                );
            }
        }
    }

    /// Blocks along K (`[block, 1]`, the CPU quantizer's layout): the parallel
    /// dequantization equals `scale * q` exactly and the f32-activation kernel equals the f64
    /// product of the dequantized weights within f32 summation error, on shapes with
    /// several K slabs, odd widths and up to 16 rows.
    #[test]
    fn q8_columns_equal_the_dequantized_product() {
        for &(rows, k, n, block) in &[
            (1, 32, 8, 32),
            (3, 544, 37, 32),
            (16, 64, 130, 16),
            (2, 264, 5, 8),
        ] {
            let x = activations(rows, k);
            let q = int8_values(k * n);
            let scales = block_scales(k / block * n);
            let w = dequantize_columns(&q, &scales, block, n);
            for (i, (&wv, &qv)) in w.iter().zip(&q).enumerate() {
                let (kk, j) = (i / n, i % n);
                assert_eq!(wv, scales[kk / block * n + j] * qv as f32);
            }
            let blocks = ColumnBlocks {
                q: &q,
                scales: &scales,
                k,
                n,
                block,
            };
            let got = matmul_q8_columns(&x, &blocks, rows).expect("supported");
            let exact = reference(&x, &w, rows, k, n);
            for (o, (a, b)) in got.iter().zip(&exact).enumerate() {
                let (r, j) = (o / n, o % n);
                let magnitude: f32 = (0..k).map(|kk| (x[r * k + kk] * w[kk * n + j]).abs()).sum();
                assert!(
                    (a - b).abs() <= 2e-5 * magnitude + 1e-6,
                    "{rows}x{k}x{n} block {block} ({r},{j}): {a} vs {b}"
                );
            }
        }
    }

    /// The int8 kernel equals the f32 kernel on the dequantized weights up to f32 rounding
    /// (it multiplies `(x * scale) * q` instead of `x * (scale * q)`), and the parallel
    /// dequantization equals `scale * q` exactly.
    #[test]
    fn q8_stream_equals_f32_stream_on_dequantized_weights() {
        for &(rows, k, n, block) in &[
            (1, 1, 8, 8),
            (1, 7, 32, 32),
            (3, 130, 64, 16),
            (2, 257, 96, 32),
            (16, 64, 24, 8),
        ] {
            let x = activations(rows, k);
            let q = int8_values(k * n);
            let scales = block_scales(k * n / block);
            let w = dequantize_rows(&q, &scales, block);
            for (i, (&wv, &qv)) in w.iter().zip(&q).enumerate() {
                assert_eq!(wv, scales[i / block] * qv as f32);
            }
            let want = matmul_stream(&x, &w, rows, k, n);
            let got = matmul_stream_q8(&x, &q, &scales, block, rows, k, n).expect("supported");
            let exact = reference(&x, &w, rows, k, n);
            // f32 summation of k products errs by at most ~k * 6e-8 of the sum of their
            // magnitudes (here <= 1.6e-5 of it); one wrong index or scale moves an output by
            // about one product, i.e. ~1/k of that sum (>= 4e-3 of it in these shapes).
            let magnitude: Vec<f32> = (0..rows * n)
                .map(|o| {
                    let (r, j) = (o / n, o % n);
                    (0..k)
                        .map(|kk| (x[r * k + kk] * w[kk * n + j]).abs())
                        .sum::<f32>()
                })
                .collect();
            for (((a, b), c), m) in got.iter().zip(&want).zip(&exact).zip(&magnitude) {
                let bound = 2e-5 * m + 1e-6;
                assert!(
                    (a - b).abs() <= bound,
                    "{rows}x{k}x{n} block {block}: {a} vs f32 path {b}"
                );
                assert!(
                    (a - c).abs() <= bound,
                    "{rows}x{k}x{n} block {block}: {a} vs f64 {c}"
                );
            }
        }
        // Unsupported block widths and inconsistent lengths are refused, not indexed.
        assert!(
            matmul_q8_columns(
                &[0.0; 4],
                &ColumnBlocks {
                    q: &[0; 32],
                    scales: &[1.0; 8],
                    k: 4,
                    n: 8,
                    block: 4
                },
                1
            )
            .is_none()
        );
        assert!(matmul_stream_q8(&[0.0; 4], &[0; 48], &[1.0; 2], 24, 1, 4, 12).is_none());
        assert!(matmul_stream_q8(&[0.0; 4], &[0; 32], &[1.0; 1], 32, 1, 4, 8).is_none());
    }

    /// Many bf16 rows through [`linear`] (the `vdpbf16ps` gemm where the CPU has it, else
    /// widening to f32), with the weight in Burn's order and as a transposed view of `[n, k]`
    /// rows (a weight used in place), and activations that are a strided view: the result is
    /// the f64 product plus bias within one bf16 rounding, and where the gemm runs it has
    /// exactly the bits of its plain-Rust twin plus the bias, rounded once.
    #[test]
    fn rounding_to_bf16_keeps_the_bits_of_from_f32() {
        let mut patterns: Vec<u32> = (0..1u32 << 20)
            .map(|i| i.wrapping_mul(0x9E37_79B9) ^ (i << 7))
            .collect();
        // Ties (both parities), the largest finite values, infinities, NaNs, zeros, subnormals.
        patterns.extend([
            0x3F80_8000,
            0x3F81_8000,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F7F_8000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0xFFC0_0001,
            0x7F80_0001,
            0,
            0x8000_0000,
            1,
            0x0000_8000,
            0x0001_8000,
        ]);
        for bits in patterns {
            let v = f32::from_bits(bits);
            assert_eq!(
                round_bf16(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{bits:#010x}"
            );
        }
    }

    /// The bf16 gates' arithmetic on every value, in parallel chunks as the kernel ran it
    /// before [`gate_table`] (which it builds from the same [`gate_slice`]).
    fn gate_values(x: &[bf16], up: Option<&[bf16]>, gate: SigmoidGate) -> Vec<bf16> {
        const CHUNK: usize = 1 << 14;
        let mut out = vec![bf16::ZERO; x.len()];
        for_each_chunk(&mut out, CHUNK, |i, chunk| {
            let start = i * CHUNK;
            let xs = &x[start..start + chunk.len()];
            let ups = up.map(|u| &u[start..start + chunk.len()]);
            gate_slice(xs, ups, chunk, gate)
        });
        out
    }

    /// The table path has the bits of the arithmetic for every bf16 input (NaNs, infinities,
    /// subnormals included), alone and times `up`, in parallel chunks and a short tail.
    #[test]
    fn gate_tables_have_the_bits_of_the_arithmetic() {
        if !fma_available() {
            eprintln!("no FMA on this CPU: the bf16 gates do not run here; skipped");
            return;
        }
        let inputs: Vec<bf16> = (0..=u16::MAX)
            .map(bf16::from_bits)
            .chain((0..77).map(bf16::from_bits))
            .collect();
        // Every value against a spread of multipliers, zeros and a NaN among them.
        let up: Vec<bf16> = (0..inputs.len())
            .map(|i| match i % 101 {
                0 => bf16::ZERO,
                1 => bf16::NAN,
                j => bf16::from_f32((j as f32 - 50.0) * 0.173),
            })
            .collect();
        for gate in [SigmoidGate::Silu, SigmoidGate::QuickGelu] {
            for up in [None, Some(up.as_slice())] {
                let want = gate_values(&inputs, up, gate);
                let mut got = inputs.clone();
                gate_in_place_bf16(&mut got, up, gate);
                let bits = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(bits(&got) == bits(&want), "{gate:?} up {}", up.is_some());
            }
        }
    }

    /// [`gelu_bf16`] has the bits of Burn's GELU on a bf16 tensor over the parallel chunks and
    /// a short tail: random values over a wide range, zeros, infinities, NaNs, subnormals,
    /// and a strided view (Flex copies it first).
    #[test]
    fn gelu_bf16_has_the_bits_of_burn() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let random = Tensor::<2>::random([3, 30_001], Distribution::Normal(0.0, 4.0), &device);
        let specials = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-39,
            -1e-39,
            3e38,
            -3e38,
            -5.5,
        ];
        let specials = Tensor::<2>::from_data(TensorData::new(specials.repeat(3).to_vec(), [3, 10]), &device);
        // 90 033 values: over `PARALLEL_VALUES`, so the chunks run on the pool, with a tail.
        let x = Tensor::cat(vec![random, specials], 1).cast(DType::BF16);
        for x in [x.clone(), x.swap_dims(0, 1)] {
            let want = burn::tensor::activation::gelu(x.clone()).into_data();
            let Ok(got) = gelu_bf16(x) else {
                panic!("the table path applies to bf16 on Flex");
            };
            assert_eq!(got.dtype(), DType::BF16);
            let bits = |d: TensorData| {
                d.try_to_vec::<bf16>()
                    .expect("bf16")
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            let (got, want) = (bits(got.into_data()), bits(want));
            assert_eq!(got.len(), want.len());
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "values whose bits differ from Burn's GELU");
        }
        let f32s = Tensor::<1>::from_data(TensorData::new(vec![1.0f32; 4], [4]), &device);
        assert!(gelu_bf16(f32s).is_err(), "f32 keeps Burn's op");
    }

    /// PyTorch's bf16 and f16 sequences of roundings (see [`SigmoidGate`]) with the sigmoid
    /// computed in f64: the one-pass kernel must give their bits, except where the f32 value
    /// before a rounding lies within the exponential's error of a halfway point (then one
    /// step of the dtype).
    #[test]
    fn sigmoid_gates_round_where_pytorch_rounds() {
        let device = Device::flex();
        let (rows, cols) = (70, 1100); // over PARALLEL_VALUES: the parallel chunks, a partial last one
        for (dtype, step) in [(DType::BF16, 128.0), (DType::F16, 1024.0)] {
            let round = |v: f64| match dtype {
                DType::BF16 => bf16::from_f64(v).to_f64(),
                _ => f16::from_f64(v).to_f64(),
            };
            let x: Vec<f64> = (0..rows * cols)
                .map(|i| round(((i * 7919) % 2001) as f64 / 100.0 - 10.0))
                .collect();
            let up: Vec<f64> = (0..rows * cols)
                .map(|i| round(((i * 104_729) % 301) as f64 / 50.0 - 3.0))
                .collect();
            let tensor = |v: &[f64], shape: [usize; 2]| {
                let v: Vec<f32> = v.iter().map(|&v| v as f32).collect();
                Tensor::<2>::from_data(TensorData::new(v, shape), &device).cast(dtype)
            };
            let values = |t: Tensor<2>| -> Vec<f64> {
                let v: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("floats");
                v.into_iter().map(f64::from).collect()
            };
            let (xt, ut) = (tensor(&x, [rows, cols]), tensor(&up, [rows, cols]));
            let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
            for gate in [SigmoidGate::Silu, SigmoidGate::QuickGelu] {
                for with_up in [false, true] {
                    let got = sigmoid_gated(xt.clone(), gate, with_up.then_some(&ut)).expect("applies");
                    assert_eq!((got.dims(), got.dtype()), ([rows, cols], dtype));
                    let got = values(got);
                    let mut off = 0;
                    for (i, &g) in got.iter().enumerate() {
                        let v = x[i];
                        let act = match gate {
                            SigmoidGate::Silu => round(v * sigmoid(v)),
                            SigmoidGate::QuickGelu => round(v * round(sigmoid(round(1.702 * v)))),
                        };
                        let want = if with_up { round(act * up[i]) } else { act };
                        if g != want {
                            off += 1;
                            assert!(
                                (g - want).abs() <= want.abs() / step + 1e-30,
                                "{dtype:?} {gate:?} up {with_up} at {i} (x {v}): {g} vs {want}"
                            );
                        }
                    }
                    assert!(
                        off * 1000 <= got.len(),
                        "{dtype:?} {gate:?} up {with_up}: {off} values one step off"
                    );
                }
                // `up` as a transposed view (read through a copy) gives the same bits, and the
                // input, whose buffer `xt` still shares, is left as it was.
                let transposed: Vec<f64> = (0..rows * cols)
                    .map(|i| up[(i % rows) * cols + i / rows])
                    .collect();
                let view = tensor(&transposed, [cols, rows]).transpose();
                let through_view = sigmoid_gated(xt.clone(), gate, Some(&view)).expect("applies");
                let direct = sigmoid_gated(xt.clone(), gate, Some(&ut)).expect("applies");
                assert!(
                    values(through_view) == values(direct),
                    "{dtype:?} {gate:?}: up as a view"
                );
                assert!(values(xt.clone()) == x, "{dtype:?} {gate:?}: the input changed");
            }
        }
        // Shapes that differ, and other dtypes, are given back.
        let x = Tensor::<2>::from_data(TensorData::new(vec![1f32; 6], [2, 3]), &device);
        let up = Tensor::<2>::from_data(TensorData::new(vec![1f32; 6], [3, 2]), &device);
        assert!(
            sigmoid_gated(
                x.clone().cast(DType::BF16),
                SigmoidGate::Silu,
                Some(&up.clone().cast(DType::BF16))
            )
            .is_err()
        );
        assert!(sigmoid_gated(x.clone(), SigmoidGate::Silu, Some(&up)).is_err());
        assert!(sigmoid_gated(x.cast(DType::F64), SigmoidGate::Silu, None).is_err());
    }

    /// The f16 conversions give `half`'s bits for every f16 value, and for f32 values around
    /// every f16 step (halfway points, the subnormal range, overflow), at lengths with and
    /// without a partial last group of 16.
    #[test]
    fn f16_conversions_have_the_bits_of_half() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut wide = vec![0f32; all.len()];
        widen_f16_into(&all, &mut wide);
        for (h, w) in all.iter().zip(&wide) {
            let want = h.to_f32();
            assert!(
                w.to_bits() == want.to_bits() || w.is_nan() && want.is_nan(),
                "{h:?}"
            );
            // The scalar form that loops vectorize: the same bits, NaN payloads included.
            assert_eq!(widen_f16(*h).to_bits(), want.to_bits(), "{:#06x}", h.to_bits());
        }
        // Each finite f16, the next f32 up and down, and the midpoints to the next f16.
        let mut xs: Vec<f32> = vec![
            1e-9,
            -7e-8,
            65519.0,
            65520.0,
            -65520.0,
            1e6,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffa1_2345),
            f32::from_bits(0x7fff_ffff),
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -0.0,
        ];
        for h in all.iter().filter(|h| h.is_finite()) {
            let v = h.to_f32();
            let next = f16::from_bits(h.to_bits().wrapping_add(1)).to_f32();
            xs.extend([v, f32::from_bits(v.to_bits() + 1)]);
            if v != 0.0 {
                xs.push(f32::from_bits(v.to_bits() - 1));
            }
            if next.is_finite() {
                xs.push((v + next) / 2.0);
            }
        }
        for x in &xs {
            let want = f16::from_f32(*x);
            assert_eq!(
                round_f16(*x).to_bits(),
                want.to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
        for len in [xs.len(), xs.len() - 5, 7] {
            let got = round_f16_values(&xs[..len]);
            for (x, g) in xs.iter().zip(&got) {
                let want = f16::from_f32(*x);
                assert!(
                    g.to_bits() == want.to_bits() || g.is_nan() && want.is_nan(),
                    "{x:e}"
                );
            }
        }
    }

    /// The f32 one-pass activations give the bits of Burn's ops (which the f32 parity tests
    /// against transformers pin), in the serial and the parallel chunks, with and without
    /// `up`, on values that reach every branch: both signs, exponentials that underflow and
    /// overflow, zeros, infinities, NaN. The inputs stay as they were (the kernel works in
    /// place only on values it owns).
    #[test]
    fn f32_sigmoid_gates_equal_burns_ops_bit_for_bit() {
        use burn::tensor::activation::{sigmoid, silu};

        let device = Device::flex();
        let special = [
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.0,
            -88.0,
            104.0,
            -104.0,
            f32::MAX,
            f32::MIN,
        ];
        let special = special
            .into_iter()
            .chain([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        for (rows, cols) in [(3, 7), (70, 1100)] {
            let len = rows * cols;
            let mut x = crate::kernels::rows::tests::values(len, 1);
            for (i, v) in x.iter_mut().enumerate() {
                // Spread over [-40, 40], with exact tiny and huge values sprinkled in.
                *v *= 40.0 * ((i % 5) as f32 + 1.0) / 5.0;
            }
            for (slot, v) in x.iter_mut().step_by(7).zip(special.clone()) {
                *slot = v;
            }
            let up = crate::kernels::rows::tests::values(len, 2);
            let tensor =
                |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [rows, cols]), &device);
            let (xt, ut) = (tensor(&x), tensor(&up));
            for gate in [SigmoidGate::Silu, SigmoidGate::QuickGelu] {
                let act = match gate {
                    SigmoidGate::Silu => silu(xt.clone()),
                    SigmoidGate::QuickGelu => xt.clone() * sigmoid(xt.clone() * 1.702),
                };
                for with_up in [false, true] {
                    let want = if with_up {
                        act.clone() * ut.clone()
                    } else {
                        act.clone()
                    };
                    let got = sigmoid_gated(xt.clone(), gate, with_up.then_some(&ut)).expect("applies");
                    assert_eq!((got.dims(), got.dtype()), ([rows, cols], DType::F32));
                    let (got, want) = (
                        got.into_data().try_to_vec::<f32>(),
                        want.into_data().try_to_vec::<f32>(),
                    );
                    let (got, want) = (got.expect("f32"), want.expect("f32"));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan(),
                            "{gate:?} up {with_up} at {i} (x {}): {g} vs Burn's {w}",
                            x[i]
                        );
                    }
                }
            }
            let unchanged = xt.into_data().try_to_vec::<f32>().expect("f32");
            assert!(unchanged.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn many_bf16_rows_through_linear_in_both_weight_orders() {
        use burn::module::Param;
        use burn::nn::LinearConfig;

        let device = Device::flex();
        let (batch, seq, k, n) = (2, 21, 70, 53);
        let rows = batch * seq;
        let to_bf16 = |v: Vec<f32>, shape: Vec<usize>| {
            Tensor::<2>::from_data(TensorData::new(v, shape), &device).cast(DType::BF16)
        };
        let w_kn = to_bf16(activations(k, n).iter().map(|v| v * 0.25).collect(), vec![k, n]);
        let bias = to_bf16((0..n).map(|i| i as f32 * 0.01 - 0.2).collect(), vec![1, n]).reshape([n]);
        // `[n, k]` rows seen as `[k, n]`, as the loader does with a checkpoint's weight.
        let w_file = w_kn.clone().transpose().into_data();
        // (`from_data` makes f32 values: cast back.)
        let w_file = Tensor::<2>::from_data(w_file, &device)
            .cast(DType::BF16)
            .swap_dims(0, 1);
        assert!(weight_in_file_order(&w_file) && !weight_in_file_order(&w_kn));
        assert_eq!(w_file.dtype(), DType::BF16);
        // `[batch, seq, k]` activations stored as `[seq, batch, k]`.
        let x = to_bf16(activations(rows, k), vec![seq * batch, k])
            .reshape([seq, batch, k])
            .swap_dims(0, 1);
        let values = |t: Tensor<2>| t.cast(DType::F32).into_data().try_into_vec::<f32>().expect("f32");
        let (wv, bv) = (values(w_kn.clone()), values(bias.clone().unsqueeze()));
        let xv = values(x.clone().reshape([rows, k]));
        let exact: Vec<f64> = (0..rows * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                bv[c] as f64
                    + (0..k)
                        .map(|kk| xv[r * k + kk] as f64 * wv[kk * n + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        let twin = {
            let xb: Vec<bf16> = xv.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb: Vec<bf16> = wv.iter().map(|&v| bf16::from_f32(v)).collect();
            // The kernel `linear` dispatches to (AMX tiles group their sums differently
            // from the plain code; the kernels are checked against it in `bf16_gemm`); on
            // CPUs without AVX-512 BF16 the f32 gemm of the widened values.
            let order = bf16_gemm::WeightOrder::InputMajor;
            let plain = if bf16_gemm_enabled() {
                bf16_gemm::matmul_bf16_gemm(&xb, &wb, order, rows, k, n)
            } else if f32_gemm_enabled() {
                f32_gemm::matmul_f32_gemm(&xv, &wb, order, rows, k, n)
            } else {
                bf16_gemm::matmul_bf16_gemm_reference(&xb, &wb, order, rows, k, n)
            }
            .expect("sizes");
            let with_bias: Vec<f32> = plain.iter().enumerate().map(|(i, v)| v + bv[i % n]).collect();
            with_bias
                .iter()
                .map(|&v| bf16::from_f32(v).to_f32())
                .collect::<Vec<f32>>()
        };
        for weight in [w_kn, w_file] {
            let mut layer = LinearConfig::new(k, n).init(&device);
            layer.weight = Param::from_tensor(weight);
            layer.bias = Some(Param::from_tensor(bias.clone()));
            let y = linear(&layer, x.clone());
            assert_eq!((y.dims(), y.dtype()), ([batch, seq, n], DType::BF16));
            let got = values(y.reshape([rows, n]));
            for (i, (&g, &e)) in got.iter().zip(&exact).enumerate() {
                // One bf16 rounding of the result (8 bits) plus f32 sums.
                assert!(
                    (g as f64 - e).abs() <= e.abs() / 256.0 + 1e-4,
                    "at {i}: {g} vs {e}"
                );
            }
            if bf16_gemm_enabled() || f32_gemm_enabled() {
                assert_eq!(got, twin, "linear and the gemm it dispatches to");
            }
        }
    }

    /// f16 many-row products through `linear` in both weight orders: the dispatch (AMX tiles
    /// where the CPU has them, the dot products of f16 rows on AVX2, else the f32 gemm), the
    /// bias added in f32 and one rounding to f16 (in parallel), within an f16 step of the
    /// exact result. With `k` a multiple of 8 on AVX2, a file-order weight's rows, down to a
    /// batch's few decode rows ([`f16_gemm::F16_DOT_MIN_ROWS`]), have the dot products' bits.
    #[test]
    fn many_f16_rows_through_linear_in_both_weight_orders() {
        use burn::module::Param;
        use burn::nn::LinearConfig;

        let device = Device::flex();
        let n = 53;
        let to_f16 = |v: Vec<f32>, shape: Vec<usize>| {
            Tensor::<2>::from_data(TensorData::new(v, shape), &device).cast(DType::F16)
        };
        let values = |t: Tensor<2>| t.cast(DType::F32).into_data().try_into_vec::<f32>().expect("f32");
        let halves = |t: Tensor<2>| t.into_data().try_into_vec::<f16>().expect("f16");
        for (rows, k) in [(37, 70), (37, 72), (16, 72), (3, 72), (2, 72), (1, 72)] {
            // Values whose sums round (multiples of 1/8 would add exactly in any order, and
            // every summation order would give the same bits).
            let w_kn = to_f16(activations(k, n).iter().map(|v| v * 0.283).collect(), vec![k, n]);
            let bias = to_f16((0..n).map(|i| i as f32 * 0.01 - 0.2).collect(), vec![1, n]).reshape([n]);
            // `[n, k]` f16 rows (`from_data` makes f32 values: cast back), seen as `[k, n]`.
            let w_file = Tensor::<2>::from_data(w_kn.clone().transpose().into_data(), &device)
                .cast(DType::F16)
                .swap_dims(0, 1);
            assert!(weight_in_file_order(&w_file) && !weight_in_file_order(&w_kn));
            assert_eq!(w_file.dtype(), DType::F16);
            let x = to_f16(
                activations(rows, k).iter().map(|v| v * 0.917).collect(),
                vec![rows, k],
            );
            let (wv, bv, xv) = (
                values(w_kn.clone()),
                values(bias.clone().unsqueeze()),
                values(x.clone()),
            );
            let dot_rows = f16_gemm::matmul_f16_dot_reference(
                &halves(x.clone()),
                &halves(w_kn.clone().transpose()),
                rows,
                k,
                n,
            );
            // A batch's rows go to the dot products exactly where they run (the f16 sums,
            // rounded, rarely tell the two summation orders apart).
            let dots_run = f16_gemm::f16_dot_available() && k % 8 == 0;
            assert_eq!(
                f16_dot_takes(&w_file, &x, rows),
                dots_run && rows >= f16_gemm::F16_DOT_MIN_ROWS
            );
            assert!(!f16_dot_takes(&w_kn, &x, rows));
            assert!(!f16_dot_takes(&w_file, &x.clone().cast(DType::F32), rows));
            for (file_order, weight) in [(false, w_kn), (true, w_file)] {
                let mut layer = LinearConfig::new(k, n).init(&device);
                layer.weight = Param::from_tensor(weight);
                layer.bias = Some(Param::from_tensor(bias.clone()));
                let y = linear(&layer, x.clone());
                assert_eq!((y.dims(), y.dtype()), ([rows, n], DType::F16));
                let got = values(y);
                for (i, &g) in got.iter().enumerate() {
                    let (r, c) = (i / n, i % n);
                    let sum: f64 = (0..k)
                        .map(|kk| xv[r * k + kk] as f64 * wv[kk * n + c] as f64)
                        .sum();
                    let exact = bv[c] as f64 + sum;
                    assert!(
                        (g as f64 - exact).abs() <= exact.abs() / 1024.0 + 1e-4,
                        "{rows}x{k} at {i}: {g} vs {exact}"
                    );
                }
                if file_order
                    && rows >= f16_gemm::F16_DOT_MIN_ROWS
                    && dots_run
                    && let Some(dots) = &dot_rows
                {
                    let twin: Vec<f32> = dots
                        .iter()
                        .enumerate()
                        .map(|(i, v)| f16::from_f32(v + bv[i % n]).to_f32())
                        .collect();
                    assert_eq!(got, twin, "{rows}x{k}: linear and the dot products");
                }
            }
            assert_eq!(dot_rows.is_some(), k % 8 == 0);
        }
    }

    /// Many f32 rows through `linear` with a bias, the weight in Burn's order and as a view of
    /// `[n, k]` rows, the activations a strided view or a block at an offset: within f32 rounding of the f64 product,
    /// and equal bit for bit to [`f32_gemm`] plus the bias where the CPU runs it (`k` spans
    /// two of its slabs). Both orders give the same bits.
    #[test]
    fn many_f32_rows_through_linear_in_both_weight_orders() {
        use burn::module::Param;
        use burn::nn::LinearConfig;

        let device = Device::flex();
        let (batch, seq, k, n) = (2, 21, 170, 53);
        let rows = batch * seq;
        let tensor =
            |v: Vec<f32>, shape: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v, shape), &device);
        // Values whose sums in another order give other bits.
        let wv: Vec<f32> = rows::tests::values(k * n, 1).iter().map(|v| v * 0.25).collect();
        let bv: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.2).collect();
        let w_kn = tensor(wv.clone(), [k, n]);
        let bias = tensor(bv.clone(), [1, n]).reshape([n]);
        // `[n, k]` rows seen as `[k, n]`, as the loader does with a checkpoint's weight.
        let w_file = Tensor::<2>::from_data(w_kn.clone().transpose().into_data(), &device).swap_dims(0, 1);
        assert!(weight_in_file_order(&w_file) && !weight_in_file_order(&w_kn));
        // `[batch, seq, k]` activations stored as `[seq, batch, k]` (copied to one block), and
        // as one block that starts 3 rows into its buffer (read in place).
        let strided = tensor(rows::tests::values(rows * k, 2), [seq * batch, k])
            .reshape([seq, batch, k])
            .swap_dims(0, 1);
        let offset = tensor(rows::tests::values((rows + 3) * k, 3), [rows + 3, k])
            .slice([3..rows + 3, 0..k])
            .reshape([batch, seq, k]);
        for (x, weight) in [strided, offset]
            .into_iter()
            .flat_map(|x| [(x.clone(), w_kn.clone()), (x, w_file.clone())])
        {
            let xv = host_f32(x.clone().reshape([rows, k])).expect("f32");
            let twin: Option<Vec<f32>> = f32_gemm_enabled().then(|| {
                let order = bf16_gemm::WeightOrder::InputMajor;
                let out = f32_gemm::matmul_f32_gemm(&xv, &wv, order, rows, k, n).expect("sizes");
                out.iter().enumerate().map(|(i, v)| v + bv[i % n]).collect()
            });
            let mut layer = LinearConfig::new(k, n).init(&device);
            layer.weight = Param::from_tensor(weight);
            layer.bias = Some(Param::from_tensor(bias.clone()));
            let y = linear(&layer, x.clone());
            assert_eq!((y.dims(), y.dtype()), ([batch, seq, n], DType::F32));
            let got = host_f32(y.reshape([rows, n])).expect("f32");
            for (i, &g) in got.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let (sum, size) = (0..k).fold((bv[c] as f64, bv[c].abs() as f64), |(s, a), kk| {
                    let p = xv[r * k + kk] as f64 * wv[kk * n + c] as f64;
                    (s + p, a + p.abs())
                });
                let bound = (k + 4) as f64 * f32::EPSILON as f64 * size;
                assert!((g as f64 - sum).abs() <= bound, "at {i}: {g} vs {sum}");
            }
            if let Some(twin) = &twin {
                assert_eq!(&got, twin, "linear and the gemm it dispatches to");
            }
        }
    }

    /// A prefill's many f32 rows through a q8/q4 weight: packed and unpacked give the same
    /// bits, within f32 sums of the product with the dequantized weight (`scale * q`).
    #[test]
    fn many_f32_rows_through_quantized_weights_use_the_dequantized_weight() {
        use burn::module::Param;
        use burn::nn::LinearConfig;
        use burn::tensor::quantization::{QuantScheme, ScaleDtype};

        let device = Device::flex();
        // Several K slabs of a blocked gemm.
        let (rows, k, n) = (40, 320, 48);
        let values = |t: Tensor<2>| t.cast(DType::F32).into_data().try_into_vec::<f32>().expect("f32");
        let x = Tensor::<2>::from_data(TensorData::new(activations(rows, k), [rows, k]), &device);
        let xv = values(x.clone());
        for value in [QuantValue::Q8S, QuantValue::Q4S] {
            let scheme = QuantScheme::default()
                .with_value(value)
                .per_block([32, 1], ScaleDtype::F16);
            let mut layer = LinearConfig::new(k, n).init(&device);
            let bv = values(layer.bias.as_ref().expect("bias").val().unsqueeze());
            let quantized = layer.weight.val().quantize_dynamic(&scheme);
            let dequantized = values(quantized.clone().dequantize());
            layer.weight = Param::from_tensor(quantized.clone());
            let unpacked = with_int8_activations(false, || values(linear(&layer, x.clone())));
            layer.weight = packed::pack_weight(Param::from_tensor(quantized));
            // f32 activations (q8/q4 weights take int8 ones by default where the int8 gemm
            // runs: `many_rows_through_a_packed_weight_give_the_bits_of_decode_steps`).
            let got = with_int8_activations(false, || values(linear(&layer, x.clone())));
            assert_eq!(got, unpacked, "{value:?}: packed and unpacked weights");
            for (i, &g) in got.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let terms = (0..k).map(|kk| xv[r * k + kk] as f64 * dequantized[kk * n + c] as f64);
                let exact = bv[c] as f64 + terms.clone().sum::<f64>();
                let size = bv[c].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                assert!(
                    (g as f64 - exact).abs() <= 1e-5 * size,
                    "{value:?} at {i}: {g} vs {exact}"
                );
            }
        }
    }

    /// A prefill's many rows through a q8 or q4 weight, with int8 activations (the default):
    /// packed and unpacked give the same bits; where the int8 gemm runs (AMX-INT8; q4 on
    /// AVX2 without VNNI) for the activations' dtype (not bf16 where the bf16 gemm takes
    /// it), they are the bits of the same rows fed as decode steps (the decode kernel, with
    /// its bias and cast) and differ from f32 activations'. f32, f16 and bf16 activations.
    #[test]
    fn many_rows_through_a_packed_weight_give_the_bits_of_decode_steps() {
        use burn::module::Param;
        use burn::nn::LinearConfig;
        use burn::tensor::quantization::{QuantScheme, ScaleDtype};

        let device = Device::flex();
        let (rows, k, n) = (45, 320, 48);
        let values = |t: Tensor<2>| t.cast(DType::F32).into_data().try_into_vec::<f32>().expect("f32");
        let mut checked = 0;
        for value in [QuantValue::Q8S, QuantValue::Q4S] {
            let scheme = QuantScheme::default()
                .with_value(value)
                .per_block([32, 1], ScaleDtype::F16);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let case = format!("{value:?} {dtype:?}");
                let x = Tensor::<2>::from_data(TensorData::new(activations(rows, k), [rows, k]), &device)
                    .cast(dtype);
                let mut layer = LinearConfig::new(k, n).init(&device);
                let bias = layer.bias.take().expect("bias").val().cast(dtype);
                layer.bias = Some(Param::from_tensor(bias));
                let quantized = layer.weight.val().quantize_dynamic(&scheme);
                layer.weight = Param::from_tensor(quantized.clone());
                let unpacked = with_int8_activations(true, || values(linear(&layer, x.clone())));
                layer.weight = packed::pack_weight(Param::from_tensor(quantized));
                let w = packed::packed_weight(&layer.weight).expect("packed");
                let got = with_int8_activations(true, || values(linear(&layer, x.clone())));
                assert_eq!(got, unpacked, "{case}: packed and unpacked weights");
                if w.int8_gemm_applies() && !(dtype == DType::BF16 && bf16_gemm_enabled()) {
                    let steps: Vec<f32> = (0..rows)
                        .step_by(MAX_STREAM_ROWS)
                        .flat_map(|r0| {
                            let r1 = (r0 + MAX_STREAM_ROWS).min(rows);
                            with_int8_activations(true, || {
                                values(linear(&layer, x.clone().narrow(0, r0, r1 - r0)))
                            })
                        })
                        .collect();
                    assert_eq!(got, steps, "{case}: a prefill and decode steps");
                    let f32s = with_int8_activations(false, || values(linear(&layer, x.clone())));
                    assert_ne!(got, f32s, "{case}: int8 activations left no trace");
                    checked += 1;
                }
            }
        }
        if checked == 0 {
            eprintln!("no int8 gemm runs on this CPU: not checked");
        }
    }

    /// A prefill's many bf16 rows through a q8/q4 weight: packed and unpacked give the same
    /// bits, the weight is dequantized and rounded to bf16 (`bf16(scale * q)`) before the
    /// product, and with the bf16 gemm the result is that gemm's bit for bit.
    #[test]
    fn many_bf16_rows_through_quantized_weights_use_the_weight_rounded_to_bf16() {
        use burn::module::Param;
        use burn::nn::LinearConfig;
        use burn::tensor::quantization::{QuantScheme, ScaleDtype};

        let device = Device::flex();
        let (rows, k, n) = (40, 96, 48);
        let values = |t: Tensor<2>| t.cast(DType::F32).into_data().try_into_vec::<f32>().expect("f32");
        let x = Tensor::<2>::from_data(TensorData::new(activations(rows, k), [rows, k]), &device)
            .cast(DType::BF16);
        let xv = values(x.clone());
        for value in [QuantValue::Q8S, QuantValue::Q4S] {
            let scheme = QuantScheme::default()
                .with_value(value)
                .per_block([32, 1], ScaleDtype::F16);
            let mut layer = LinearConfig::new(k, n).init(&device);
            let bias = layer.bias.take().expect("bias").val().cast(DType::BF16);
            layer.bias = Some(Param::from_tensor(bias.clone()));
            let quantized = layer.weight.val().quantize_dynamic(&scheme);
            let rounded: Vec<bf16> = values(quantized.clone().dequantize())
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            layer.weight = Param::from_tensor(quantized.clone());
            let unpacked = with_int8_activations(false, || values(linear(&layer, x.clone())));
            layer.weight = packed::pack_weight(Param::from_tensor(quantized));
            assert!(
                packed::packed_weight(&layer.weight).is_some(),
                "{value:?}: packed"
            );
            let got = with_int8_activations(false, || values(linear(&layer, x.clone())));
            assert_eq!(got, unpacked, "{value:?}: packed and unpacked weights");
            let bv = values(bias.clone().unsqueeze());
            for (i, &g) in got.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let exact = bv[c] as f64
                    + (0..k)
                        .map(|kk| xv[r * k + kk] as f64 * rounded[kk * n + c].to_f64())
                        .sum::<f64>();
                // One bf16 rounding of the result plus f32 sums.
                assert!(
                    (g as f64 - exact).abs() <= exact.abs() / 256.0 + 1e-4,
                    "{value:?} at {i}: {g} vs {exact}"
                );
            }
            if bf16_gemm_enabled() {
                let xb: Vec<bf16> = xv.iter().map(|&v| bf16::from_f32(v)).collect();
                let order = bf16_gemm::WeightOrder::InputMajor;
                let twin: Vec<f32> = bf16_gemm::matmul_bf16_gemm(&xb, &rounded, order, rows, k, n)
                    .expect("sizes")
                    .iter()
                    .enumerate()
                    .map(|(i, v)| bf16::from_f32(v + bv[i % n]).to_f32())
                    .collect();
                assert_eq!(got, twin, "{value:?}: the bf16 gemm on the rounded weight");
            } else {
                eprintln!("no AVX-512 BF16 on this CPU: the bf16 gemm route was not checked");
            }
        }
    }
}
