//! Load-time weight quantization (`--quantize q8|q4`) with Burn's quantization API.
//!
//! What is quantized: the weight matrices of every linear layer — CLIP attention and MLP,
//! the multimodal projector, Llama attention and MLP. They hold almost all parameters
//! (about 97% of vip-llava-7b). What stays in the load dtype: token and position
//! embeddings (a lookup reads one row, quantizing saves little and costs accuracy on rare
//! tokens), `lm_head` (the logits decide every greedy token; it is 3.7% of 7B, and 8-9% of
//! a 1.1B q4 decode step) unless asked for (`--quantize-lm-head`, [`quantize_lm_head`]: as
//! llama.cpp's quantized files do, and transformers' bitsandbytes loads do not), the patch
//! convolution, layer norms and RMS norms, and all biases.
//!
//! Scheme: symmetric integers with one scale per block of 32 values (Q8_0 / Q4_0 in
//! llama.cpp's terms; narrower blocks where 32 does not divide the dimension). On the CPU
//! (Flex) the blocks run along the input dimension and the scales are rounded to f16, as
//! llama.cpp's are (the values are quantized with the rounded scale), so that a decode
//! step can multiply int8 activations by int8 weights block by block (the VNNI kernel of
//! `vipllava_model::kernels::int8`); on other devices they run along the output dimension,
//! Burn's one-dimensional block. On the CPU the quantized weights are then held outside
//! Burn's tensors in the decode kernel's order, q4 two values per byte
//! (`vipllava_model::kernels::packed`; Flex itself keeps one byte per value); other
//! backends keep Burn's storage.

use std::fmt;
use std::str::FromStr;

use burn::backend::{BackendTensor, DispatchKindConversion, DispatchTensor};
use burn::module::{Module, ModuleMapper, Param};
use burn::nn::Linear;
use burn::tensor::quantization::{
    QuantScheme, QuantStore, QuantValue, ScaleDtype, global_scale_dtype, scale_to_dtype,
};
use burn::tensor::{Bytes, DType, Device, Shape, Tensor};
use burn_flex::{Flex, FlexQTensor, FlexTensor, Layout};
use rayon::prelude::*;
use vipllava_model::VipLlava;
use vipllava_model::kernels::packed;

/// Linear layers whose `weight` is quantized (Burn module field names).
pub const QUANTIZED_LINEARS: [&str; 12] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "linear_1",
    "linear_2",
];

/// Preferred block length of the per-block scales; a weight whose output width it does not
/// divide uses the largest power of two that does (per-tensor below 8).
pub const BLOCK_SIZE: u8 = 32;

/// A weight quantization level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 8-bit symmetric integers, one scale per 32 values.
    Q8,
    /// 4-bit symmetric integers, one scale per 32 values.
    Q4,
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        })
    }
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "int8" => Ok(Self::Q8),
            "q4" | "int4" => Ok(Self::Q4),
            other => Err(format!("unknown quantization `{other}`: expected q8 or q4")),
        }
    }
}

impl Quantization {
    /// The Burn scheme for a `[K, N]` weight with blocks of `block` values along K, the
    /// input dimension (`[block, 1]` blocks; `None`: one scale per tensor).
    pub fn scheme_along_input(self, block: Option<u8>) -> QuantScheme {
        match block {
            Some(b) => self.values().per_block([b, 1], ScaleDtype::F16),
            None => self.scheme(None),
        }
    }

    /// The scheme's value type and mode, with no scale level yet.
    fn values(self) -> QuantScheme {
        let value = match self {
            Self::Q8 => QuantValue::Q8S,
            Self::Q4 => QuantValue::Q4S,
        };
        QuantScheme::default().with_value(value)
    }

    /// The Burn scheme for this level with blocks of `block` values along the last
    /// dimension (`None`: one scale per tensor).
    pub fn scheme(self, block: Option<u8>) -> QuantScheme {
        let scheme = self.values();
        match block {
            Some(b) => scheme.per_block([b], ScaleDtype::F32),
            None => scheme.per_tensor(ScaleDtype::F32),
        }
    }
}

/// The block length for a tensor whose last dimension is `width`.
pub fn block_for(width: usize) -> Option<u8> {
    let mut block = BLOCK_SIZE;
    while block >= 8 {
        if width.is_multiple_of(block as usize) {
            return Some(block);
        }
        block /= 2;
    }
    None
}

/// Quantizes the weights of the [`QUANTIZED_LINEARS`], choosing the block per tensor, and
/// packs them for the CPU kernels.
pub(crate) struct WeightQuantizer {
    level: Quantization,
    path: Vec<String>,
}

impl WeightQuantizer {
    /// A quantizer to `level`.
    pub(crate) fn new(level: Quantization) -> Self {
        Self {
            level,
            path: Vec::new(),
        }
    }
}

impl ModuleMapper for WeightQuantizer {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let n = self.path.len();
        let selected =
            n >= 2 && self.path[n - 1] == "weight" && QUANTIZED_LINEARS.contains(&self.path[n - 2].as_str());
        // Quantized and packed straight from its file already (`quantize_file_weight`).
        if !selected || packed::is_packed(&param) {
            return param;
        }
        quantize_weight(param, self.level)
    }
}

/// One linear weight quantized to `level` (blocks along the input dimension on the plain CPU
/// device, along the last one elsewhere) and packed for the CPU kernels.
fn quantize_weight<const D: usize>(param: Param<Tensor<D>>, level: Quantization) -> Param<Tensor<D>> {
    let param = param.map(|tensor| {
        let dims = tensor.dims();
        let scheme = if D == 2 && is_plain_flex(&tensor) {
            level.scheme_along_input(block_for(dims[0]))
        } else {
            level.scheme(block_for(dims[D - 1]))
        };
        quantize_on_flex(tensor, &scheme)
    });
    packed::pack_weight(param)
}

/// `model` with its `lm_head` weight quantized to `level` (`--quantize-lm-head`) and packed
/// for the CPU kernels; one quantized already (a burnpack's) is only packed. A tied
/// `lm_head` (the token embeddings) is left alone: the loader refuses the option for such
/// checkpoints ([`crate::ConvertError::TiedLmHead`]; before reading any weight from
/// safetensors, after reading the config and weights of a burnpack).
pub fn quantize_lm_head(mut model: VipLlava, level: Quantization) -> VipLlava {
    if let Some(head) = model.lm_head.take() {
        let weight = if packed::is_packed(&head.weight) {
            head.weight
        } else if matches!(head.weight.dtype(), DType::QFloat(_)) {
            packed::pack_weight(head.weight)
        } else {
            quantize_weight(head.weight, level)
        };
        model.lm_head = Some(Linear { weight, ..head });
    }
    model
}

/// Packs a module's quantized weights for the CPU kernels ([`packed::pack_weight`]);
/// everything else stays as it is.
pub(crate) struct WeightPacker;

impl ModuleMapper for WeightPacker {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        packed::pack_weight(param)
    }
}

/// `module` with its quantized weights packed for the CPU kernels: a burnpack written by
/// `convert --quantize` holds them as Burn's Flex tensors do (one byte per value, q4
/// included).
pub fn pack_quantized_weights<M: Module>(module: M) -> M {
    module.map(&mut WeightPacker)
}

/// Blocks per rayon task when quantizing.
const BLOCKS_PER_TASK: usize = 4096;

/// Burn's `quantize_dynamic` for a per-block symmetric scheme on the plain Flex device,
/// computed by all rayon workers (Flex's own runs on one thread: minutes for a 7B model).
/// The same arithmetic (scale = 2 max|x| / range, then `round(x / scale)` clamped), so the
/// result is identical for f32 weights (f16/bf16 weights are widened exactly; Burn rounds
/// their scales to the weight dtype). Anything else goes to Burn's `quantize_dynamic`.
fn quantize_on_flex<const D: usize>(tensor: Tensor<D>, scheme: &QuantScheme) -> Tensor<D> {
    let (low, high) = scheme.value.range();
    let Some(blocks) = flex_blocks(&tensor, scheme).filter(|_| low >= -128.0 && high <= 127.0) else {
        return tensor.quantize_dynamic(scheme);
    };
    let dims = tensor.dims();
    // Reads the values in place when `tensor` is f32 and not shared.
    let data = tensor.into_data().convert::<f32>();
    let copied: Vec<f32>;
    let values: &[f32] = match data.as_slice::<f32>() {
        Ok(values) => values,
        Err(_) => {
            copied = data.iter::<f32>().collect();
            &copied
        }
    };
    let scale_dtype = scheme.scale_dtype();
    let scale_of = |alpha: f32| block_scale(alpha, low, high, scale_dtype);
    let quantize = |v: f32, inv: f32| (v * inv).round().clamp(low, high) as i8;
    let (scales, quantized) = match blocks {
        FlexBlocks::AlongLast(width) => {
            let blocks = values.len() / width;
            let mut scales = vec![0f32; blocks];
            let mut quantized = vec![0i8; values.len()];
            scales
                .par_chunks_mut(BLOCKS_PER_TASK)
                .zip(quantized.par_chunks_mut(BLOCKS_PER_TASK * width))
                .zip(values.par_chunks(BLOCKS_PER_TASK * width))
                .for_each(|((scales, quantized), values)| {
                    for ((scale, q), x) in scales
                        .iter_mut()
                        .zip(quantized.chunks_mut(width))
                        .zip(values.chunks(width))
                    {
                        *scale = scale_of(x.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                        let inv = 1.0 / *scale;
                        for (q, &v) in q.iter_mut().zip(x) {
                            *q = quantize(v, inv);
                        }
                    }
                });
            (scales, quantized)
        }
        FlexBlocks::AlongFirst { height, width } => {
            // `[height, 1]` blocks of a `[rows, width]` matrix: one task per block row.
            let vectors = Vectors::best();
            let mut scales = vec![0f32; values.len() / height];
            let mut quantized = vec![0i8; values.len()];
            scales
                .par_chunks_mut(width)
                .zip(quantized.par_chunks_mut(height * width))
                .zip(values.par_chunks(height * width))
                .for_each(|((scales, quantized), values)| {
                    let mut alpha = vec![0f32; width];
                    block_row_maxima(vectors, values, &mut alpha);
                    for (s, a) in scales.iter_mut().zip(&alpha) {
                        *s = scale_of(*a);
                    }
                    let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
                    quantize_block_row(vectors, values, &inv, quantized, low, high);
                });
            (scales, quantized)
        }
    };
    let values = FlexTensor::new(
        Bytes::from_elems(quantized),
        Layout::contiguous(Shape::from(dims.to_vec())),
        DType::I8,
    );
    let primitive = FlexQTensor::new(values, scheme.with_store(QuantStore::Native), scales, None);
    let dispatch =
        <DispatchTensor as DispatchKindConversion<Flex>>::from_backend(BackendTensor::Quantized(primitive));
    Tensor::from_dispatch(dispatch)
}

/// The scale of a block whose largest magnitude is `alpha` (Burn's `quantize_dynamic`:
/// `2 alpha / (high - low)` rounded to `scale_dtype`; the smallest positive scale where that
/// is zero or not finite).
#[inline(always)]
fn block_scale(alpha: f32, low: f32, high: f32, scale_dtype: ScaleDtype) -> f32 {
    let s = scale_to_dtype(2.0 * alpha / (high - low), scale_dtype);
    if s > 0.0 && s.is_finite() {
        s
    } else {
        scale_to_dtype(f32::MIN_POSITIVE, scale_dtype)
    }
}

/// A linear weight stored `[n, k]` (`[out, in]`, a checkpoint's order) in `bytes` as `disk`,
/// loaded as `dtype`, quantized to `level` with blocks along its input dimension and packed
/// for the CPU kernels, for a plain-CPU parameter of Burn's `[k, n]` shape. The same values,
/// scales and bytes as reading it transposed into a `dtype` tensor, [`quantize_weight`] and
/// packing it, without any of those copies: a block of the input dimension is a contiguous
/// run of the file, quantized where it lies. The load's peak is then the model in its final
/// form plus the file pages of one tensor (which the caller drops), not one layer in the load
/// dtype, its f32 copy and its unpacked integers. `None` where the packed form does not apply
/// (a width the blocks or tiles do not divide, a scale f16 cannot hold): the caller takes
/// the general path.
pub(crate) fn quantize_file_weight(
    bytes: &[u8],
    disk: crate::DiskDType,
    dtype: DType,
    [n, k]: [usize; 2],
    level: Quantization,
) -> Option<FileWeight> {
    use crate::DiskDType;
    let size = match disk {
        DiskDType::F32 => 4,
        DiskDType::F16 | DiskDType::BF16 => 2,
        _ => return None,
    };
    if bytes.len() != n * k * size || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return None;
    }
    let block = block_for(k)?;
    let scheme = level.scheme_along_input(Some(block));
    let block = usize::from(block);
    let bits = match level {
        Quantization::Q8 => packed::Bits::Eight,
        Quantization::Q4 => packed::Bits::Four,
    };
    let (low, high) = scheme.value.range();
    let scale_dtype = scheme.scale_dtype();
    let vectors = Vectors::best();
    let weight = packed::PackedWeight::from_columns(k, n, block, bits, |j, rows, q, scales| {
        let run = &bytes[(j * k + rows.start) * size..(j * k + rows.end) * size];
        let mut stack = [0f32; RUN_VALUES];
        let mut heap = Vec::new();
        let values = if rows.len() <= RUN_VALUES {
            &mut stack[..rows.len()]
        } else {
            heap.resize(rows.len(), 0.0);
            &mut heap[..]
        };
        // Checked above: a float dtype on disk.
        crate::read::decode_loaded(run, disk, dtype, values);
        quantize_runs(vectors, values, block, (low, high), scale_dtype, q, scales);
    })?;
    Some(FileWeight {
        weight,
        scheme: scheme.with_store(QuantStore::Native),
    })
}

/// A weight quantized and packed from its file ([`quantize_file_weight`]), waiting for its
/// parameter.
pub(crate) struct FileWeight {
    weight: packed::PackedWeight,
    scheme: QuantScheme,
}

impl FileWeight {
    /// The model parameter (plain CPU device; `None` unless `D` is 2).
    pub(crate) fn into_param<const D: usize>(self) -> Option<Param<Tensor<D>>> {
        self.weight.into_param(self.scheme, Device::flex())
    }
}

/// Values decoded on the stack per call of the column quantizer (the packer asks for at most
/// 256 rows at a time).
const RUN_VALUES: usize = 256;

/// Quantizes `values`, consecutive blocks of `block` values, into `q` with one scale per
/// block in `scales` (the arithmetic of [`quantize_on_flex`]), compiled for `vectors` (which
/// must be available).
fn quantize_runs(
    vectors: Vectors,
    values: &[f32],
    block: usize,
    range: (f32, f32),
    scale_dtype: ScaleDtype,
    q: &mut [i8],
    scales: &mut [f32],
) {
    #[inline(always)]
    fn runs(
        values: &[f32],
        block: usize,
        (low, high): (f32, f32),
        dtype: ScaleDtype,
        q: &mut [i8],
        scales: &mut [f32],
    ) {
        for ((x, q), scale) in values.chunks(block).zip(q.chunks_mut(block)).zip(scales) {
            // Eight lanes of maxima (exact in any order), so that the loop vectorizes.
            let mut lanes = [0f32; 8];
            for part in x.chunks(8) {
                for (m, v) in lanes.iter_mut().zip(part) {
                    *m = m.max(v.abs());
                }
            }
            *scale = block_scale(lanes.iter().fold(0.0f32, |m, &v| m.max(v)), low, high, dtype);
            let inv = 1.0 / *scale;
            for (q, &v) in q.iter_mut().zip(x) {
                let t = (v * inv).round().clamp(low, high);
                let t = if t.is_nan() { 0.0 } else { t };
                // SAFETY: `t` is finite and within `[low, high]`, inside `i8` (checked by the
                // caller's scheme). The value of `t as i8`, converted in vectors.
                *q = unsafe { t.to_int_unchecked::<i32>() } as i8;
            }
        }
    }
    /// The arguments of [`runs`], as work for [`Vectors::run`].
    struct Work<'a>(
        &'a [f32],
        usize,
        (f32, f32),
        ScaleDtype,
        &'a mut [i8],
        &'a mut [f32],
    );
    impl Loops for Work<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            runs(self.0, self.1, self.2, self.3, self.4, self.5)
        }
    }
    vectors.run(Work(values, block, range, scale_dtype, q, scales))
}

/// Loops that [`Vectors::run`] compiles for an instruction set: `run` (and what it calls)
/// must be `#[inline(always)]`, so that it is compiled inside the function with the target
/// features. A closure does not do: its body is a function of its own, which LLVM need not
/// inline, and did not in `quantize_runs` (a `roundf` call per value, a third of a q8 load's
/// samples at the 1.1B size).
trait Loops {
    /// What the loops return.
    type Output;
    /// Runs the loops.
    fn run(self) -> Self::Output;
}

/// The instruction sets the quantizer's loops are compiled for, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vectors {
    Avx512,
    Avx2,
    Baseline,
}

impl Vectors {
    /// The widest this CPU runs.
    fn best() -> Self {
        [Self::Avx512, Self::Avx2]
            .into_iter()
            .find(|v| v.available())
            .unwrap_or(Self::Baseline)
    }

    /// Runs `work` compiled for these instructions, which must be available: its loops
    /// ([`Loops::run`], inlined) are compiled inside a function with the target features,
    /// where LLVM vectorizes (and rounds) with them.
    #[inline(always)]
    fn run<W: Loops>(self, work: W) -> W::Output {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            #[inline]
            fn avx512<W: Loops>(work: W) -> W::Output {
                work.run()
            }
            #[target_feature(enable = "avx2")]
            #[inline]
            fn avx2<W: Loops>(work: W) -> W::Output {
                work.run()
            }
            assert!(self.available(), "{self:?} on a CPU without it");
            match self {
                // SAFETY: the CPU has the features (asserted above).
                Self::Avx512 => return unsafe { avx512(work) },
                // SAFETY: as above.
                Self::Avx2 => return unsafe { avx2(work) },
                Self::Baseline => {}
            }
        }
        work.run()
    }

    fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Avx512 => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                }
                Self::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
                Self::Baseline => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Baseline
        }
    }
}

/// `alpha[j] = max |values[r * width + j]|` over the rows of one block row (`width` is
/// `alpha.len()`), compiled for `vectors` (which must be available).
fn block_row_maxima(vectors: Vectors, values: &[f32], alpha: &mut [f32]) {
    #[inline(always)]
    fn maxima(values: &[f32], alpha: &mut [f32]) {
        for row in values.chunks(alpha.len()) {
            for (a, v) in alpha.iter_mut().zip(row) {
                *a = a.max(v.abs());
            }
        }
    }
    /// The arguments of [`maxima`], as work for [`Vectors::run`].
    struct Work<'a>(&'a [f32], &'a mut [f32]);
    impl Loops for Work<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            maxima(self.0, self.1)
        }
    }
    vectors.run(Work(values, alpha))
}

/// `q = round(v * inv[j]).clamp(low, high)` for every row of one block row (`inv` holds a
/// column's inverse scale), compiled for `vectors` (which must be available). On the
/// baseline x86-64 target `f32::round` is a `roundf` call per value and the loop stays
/// scalar (half of a q4 load's time); with SSE4.1 and up LLVM rounds in vectors (the same
/// operation: halfway away from zero).
fn quantize_block_row(
    vectors: Vectors,
    values: &[f32],
    inv: &[f32],
    quantized: &mut [i8],
    low: f32,
    high: f32,
) {
    #[inline(always)]
    fn rows(values: &[f32], inv: &[f32], quantized: &mut [i8], low: f32, high: f32) {
        for (q, row) in quantized.chunks_mut(inv.len()).zip(values.chunks(inv.len())) {
            for ((q, &v), &inv) in q.iter_mut().zip(row).zip(inv) {
                let t = (v * inv).round().clamp(low, high);
                let t = if t.is_nan() { 0.0 } else { t };
                // SAFETY: `t` is finite and within the bounds, which `quantize_on_flex`
                // keeps within `i8`. The same value as `t as i8`, converted in vectors
                // (a saturating conversion goes lane by lane).
                *q = unsafe { t.to_int_unchecked::<i32>() } as i8;
            }
        }
    }
    /// The arguments of [`rows`], as work for [`Vectors::run`].
    struct Work<'a>(&'a [f32], &'a [f32], &'a mut [i8], f32, f32);
    impl Loops for Work<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            rows(self.0, self.1, self.2, self.3, self.4)
        }
    }
    vectors.run(Work(values, inv, quantized, low, high))
}

/// Whether `tensor` lives on the plain Flex device (not behind autodiff).
fn is_plain_flex<const D: usize>(tensor: &Tensor<D>) -> bool {
    tensor.device() == Device::flex() && !tensor.device().is_autodiff()
}

/// The block shapes [`quantize_on_flex`] computes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlexBlocks {
    /// `width` consecutive values along the last dimension.
    AlongLast(usize),
    /// `height` rows of one column of a `[rows, width]` matrix.
    AlongFirst { height: usize, width: usize },
}

/// The blocks when [`quantize_on_flex`] applies: the plain Flex device, a float tensor,
/// one level of per-block scales along the last dimension, or along the first of a matrix.
fn flex_blocks<const D: usize>(tensor: &Tensor<D>, scheme: &QuantScheme) -> Option<FlexBlocks> {
    if !is_plain_flex(tensor) {
        return None;
    }
    if !matches!(tensor.dtype(), DType::F32 | DType::BF16 | DType::F16)
        || global_scale_dtype(scheme).is_some()
    {
        return None;
    }
    let block = scheme.block_size()?.to_dim_vec(D);
    let dims = tensor.dims();
    let width = *block.last()? as usize;
    if width > 0 && dims[D - 1].is_multiple_of(width) && block[..D - 1].iter().all(|&b| b == 1) {
        return Some(FlexBlocks::AlongLast(width));
    }
    let height = block[0] as usize;
    let along_first = D == 2 && width == 1 && height > 0 && dims[0].is_multiple_of(height);
    along_first.then_some(FlexBlocks::AlongFirst {
        height,
        width: dims[D - 1],
    })
}

/// Quantizes the linear-layer weights of `model` (see the module docs for which).
pub fn quantize_model(model: VipLlava, level: Quantization) -> VipLlava {
    quantize_module(model, level)
}

/// [`quantize_model`] on any part of the model (a decoder layer, the projector): the
/// loader quantizes each part as soon as it is loaded.
pub fn quantize_module<M: Module>(module: M, level: Quantization) -> M {
    module.map(&mut WeightQuantizer::new(level))
}

/// Counts parameters by storage: `(quantized, total)` float parameters.
struct QuantizedCounter {
    quantized: usize,
    total: usize,
}

impl burn::module::ModuleVisitor for QuantizedCounter {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
        self.total += 1;
        // A packed weight is quantized; asking its dtype would unpack it.
        if packed::is_packed(param) || matches!(param.dtype(), burn::tensor::DType::QFloat(_)) {
            self.quantized += 1;
        }
    }
}

/// Number of quantized float parameters in `model` (a Burn-native checkpoint saved by
/// `vipllava convert --quantize` loads already quantized).
pub fn quantized_parameter_count(model: &VipLlava) -> usize {
    quantized_parameter_count_of(model)
}

/// [`quantized_parameter_count`] of any module.
pub(crate) fn quantized_parameter_count_of<M: Module>(module: &M) -> usize {
    let mut counter = QuantizedCounter {
        quantized: 0,
        total: 0,
    };
    module.visit(&mut counter);
    counter.quantized
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn blocks_divide_the_width() {
        assert_eq!(block_for(4096), Some(32));
        assert_eq!(block_for(48), Some(16));
        assert_eq!(block_for(24), Some(8));
        assert_eq!(block_for(30), None);
    }

    /// The parallel quantizer gives exactly what Burn's `quantize_dynamic` gives for f32
    /// weights. For bf16 weights Burn rounds the scale to bf16; ours keeps the f32 scale of
    /// the (exactly widened) values, i.e. quantizes a bf16 tensor as Burn quantizes its f32
    /// copy.
    #[test]
    fn parallel_quantizer_equals_burn() {
        let device = Device::flex();
        let w = Tensor::<2>::random([96, 96], Distribution::Normal(0.0, 0.02), &device);
        // A zero block and an outlier.
        let w = w.slice_assign([0..1, 0..32], Tensor::zeros([1, 32], &device));
        let w = w.slice_assign([1..2, 5..6], Tensor::full([1, 1], 3.0, &device));
        let dequantized =
            |t: Tensor<2>| -> Vec<f32> { t.dequantize().into_data().convert::<f32>().try_to_vec().unwrap() };
        for dtype in [DType::F32, DType::BF16] {
            let w = w.clone().cast(dtype);
            let widened = w.clone().cast(DType::F32);
            for level in [Quantization::Q8, Quantization::Q4] {
                for block in [Some(32), Some(16), Some(8)] {
                    for scheme in [level.scheme(block), level.scheme_along_input(block)] {
                        assert!(flex_blocks(&w, &scheme).is_some());
                        let ours = quantize_on_flex(w.clone(), &scheme);
                        let burn = widened.clone().quantize_dynamic(&scheme);
                        assert_eq!(ours.dtype(), burn.dtype());
                        assert_eq!(
                            dequantized(ours),
                            dequantized(burn),
                            "{level} {block:?} {dtype:?} {scheme:?}"
                        );
                    }
                }
            }
        }
        assert!(flex_blocks(&w, &Quantization::Q8.scheme(None)).is_none());
        // Blocks along K that do not divide K go to Burn.
        let ragged = Tensor::<2>::zeros([70, 96], &device);
        assert!(flex_blocks(&ragged, &Quantization::Q8.scheme_along_input(Some(32))).is_none());
    }

    /// Each instruction set this CPU has gives the plain loop's values (`round().clamp()
    /// as i8`, `max |x|`) on halfway cases, out-of-range and non-finite values, at widths
    /// that end inside a vector.
    #[test]
    fn block_row_loops_equal_plain_ones_on_every_instruction_set() {
        let mut values: Vec<f32> = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e30, -1e30];
        for i in -140..=140 {
            let half = i as f32 + 0.5;
            values.extend([half, half.next_up(), half.next_down(), -half, i as f32 * 0.37]);
        }
        for width in [1, 7, 16, 33, 100] {
            let values = &values[..values.len() / width * width];
            let inv: Vec<f32> = (0..width).map(|j| [1.0, 0.5, 3.0, 0.0625][j % 4]).collect();
            for (low, high) in [(-8.0f32, 7.0f32), (-128.0, 127.0)] {
                let want: Vec<i8> = values
                    .chunks(width)
                    .flat_map(|row| {
                        row.iter()
                            .zip(&inv)
                            .map(|(&v, &i)| (v * i).round().clamp(low, high) as i8)
                    })
                    .collect();
                let mut alpha_want = vec![0f32; width];
                for row in values.chunks(width) {
                    for (a, v) in alpha_want.iter_mut().zip(row) {
                        *a = a.max(v.abs());
                    }
                }
                // The run quantizer (a file's contiguous blocks): every instruction set gives
                // the plain loop's values and scales.
                for block in [8, 16, 32]
                    .into_iter()
                    .filter(|b| values.len().is_multiple_of(*b))
                {
                    let run = |vectors| {
                        let mut q = vec![0i8; values.len()];
                        let mut scales = vec![0f32; values.len() / block];
                        quantize_runs(
                            vectors,
                            values,
                            block,
                            (low, high),
                            ScaleDtype::F16,
                            &mut q,
                            &mut scales,
                        );
                        (q, scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>())
                    };
                    let plain = run(Vectors::Baseline);
                    assert!(plain.0.iter().any(|&q| q != 0));
                    for vectors in [Vectors::Avx512, Vectors::Avx2]
                        .into_iter()
                        .filter(|v| v.available())
                    {
                        assert_eq!(
                            run(vectors),
                            plain,
                            "runs: {vectors:?}, block {block}, width {width}"
                        );
                    }
                }
                for vectors in [Vectors::Avx512, Vectors::Avx2, Vectors::Baseline] {
                    if !vectors.available() {
                        continue;
                    }
                    let mut got = vec![0i8; values.len()];
                    quantize_block_row(vectors, values, &inv, &mut got, low, high);
                    assert_eq!(got, want, "{vectors:?}, width {width}, [{low}, {high}]");
                    let mut alpha = vec![0f32; width];
                    block_row_maxima(vectors, values, &mut alpha);
                    let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&alpha), bits(&alpha_want), "{vectors:?}, width {width}");
                }
            }
        }
    }

    /// `[n, k]` test weights in file order: small normal-like values, a zero block, an outlier,
    /// values on rounding boundaries.
    fn file_order_values(n: usize, k: usize) -> Vec<f32> {
        let mut values: Vec<f32> = (0..n * k)
            .map(|i| {
                let x = ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5;
                0.04 * x * (1.0 + (i % 5) as f32)
            })
            .collect();
        values[..8].fill(0.0);
        values[k + 3] = 3.0;
        values[2 * k + 1] = -0.5;
        values[2 * k + 2] = 0.5 / 7.0 * 3.5;
        values
    }

    /// `values` as `disk` stores them (little-endian).
    fn disk_bytes(values: &[f32], disk: crate::DiskDType) -> Vec<u8> {
        use crate::DiskDType;
        values
            .iter()
            .flat_map(|&v| match disk {
                DiskDType::F32 => v.to_le_bytes().to_vec(),
                DiskDType::BF16 => burn::tensor::bf16::from_f32(v).to_le_bytes().to_vec(),
                _ => burn::tensor::f16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect()
    }

    /// Quantizing a weight where it lies in its file gives the parameter that loading it as
    /// `dtype` (transposed into Burn's `[k, n]`), quantizing and packing give: the same
    /// values, scales and block, for every disk and load dtype, both levels, every block
    /// length and a last task shorter than the others (k = 520). A width the tiles or the
    /// blocks do not divide is left to the general path.
    #[test]
    fn file_weight_equals_the_loaded_weight_quantized() {
        use crate::DiskDType;
        use burn::module::ParamId;
        let device = Device::flex();
        for (n, k, block) in [
            (32, 64, 32),
            (48, 96, 32),
            (16, 40, 8),
            (16, 48, 16),
            (32, 520, 8),
        ] {
            let values = file_order_values(n, k);
            for disk in [DiskDType::F32, DiskDType::BF16, DiskDType::F16] {
                let bytes = disk_bytes(&values, disk);
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    for level in [Quantization::Q8, Quantization::Q4] {
                        let case = format!("[{n}, {k}] {disk:?} as {dtype:?}, {level}");
                        let ours = quantize_file_weight(&bytes, disk, dtype, [n, k], level)
                            .and_then(FileWeight::into_param::<2>)
                            .unwrap_or_else(|| panic!("{case}: not packed"));
                        let data = crate::read::convert_bytes(
                            &bytes,
                            disk,
                            &[n, k],
                            crate::read::Layout::Transposed,
                            dtype,
                        )
                        .expect("converts");
                        let loaded = Tensor::<2>::from_data(data, (&device, dtype));
                        let general = quantize_weight(Param::initialized(ParamId::new(), loaded), level);
                        let ours = packed::packed_weight(&ours).expect("ours is packed");
                        let general = packed::packed_weight(&general).expect("the general path packs");
                        assert_eq!((ours.k(), ours.n(), ours.block()), (k, n, block), "{case}");
                        assert_eq!(ours.bits(), general.bits(), "{case}");
                        assert_eq!(ours.block(), general.block(), "{case}");
                        assert_eq!(ours.scales(), general.scales(), "{case}");
                        assert_eq!(ours.unpack(), general.unpack(), "{case}");
                        assert!(ours.unpack().iter().any(|&q| q != 0), "{case}");
                    }
                }
            }
        }
        let bytes = disk_bytes(&file_order_values(20, 64), DiskDType::F32);
        assert!(
            quantize_file_weight(&bytes, DiskDType::F32, DType::F32, [20, 64], Quantization::Q8).is_none()
        );
        let bytes = disk_bytes(&file_order_values(16, 30), DiskDType::F32);
        assert!(
            quantize_file_weight(&bytes, DiskDType::F32, DType::F32, [16, 30], Quantization::Q8).is_none()
        );
        assert!(
            quantize_file_weight(
                &bytes[4..],
                DiskDType::F32,
                DType::F32,
                [16, 30],
                Quantization::Q8
            )
            .is_none(),
            "a byte count that does not match the shape"
        );
    }

    /// Each value is within half a quantization step of its block's scale.
    #[test]
    fn round_trip_error_is_half_a_step() {
        let device = Device::flex();
        let w = Tensor::<2>::random([64, 96], Distribution::Normal(0.0, 0.02), &device);
        let values: Vec<f32> = w.clone().into_data().try_to_vec().unwrap();
        for (level, levels) in [(Quantization::Q8, 127.0f32), (Quantization::Q4, 7.0)] {
            let back: Vec<f32> = w
                .clone()
                .quantize_dynamic(&level.scheme(Some(32)))
                .dequantize()
                .into_data()
                .try_to_vec()
                .unwrap();
            for (block, (orig, deq)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
                let step = orig.iter().fold(0.0f32, |m, v| m.max(v.abs())) / levels;
                let err = orig
                    .iter()
                    .zip(deq)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    err <= step * 0.5001,
                    "{level} block {block}: error {err} > half step {step}"
                );
            }
        }
    }
}
