//! Attention on Flex for decode steps (a few query rows against the KV cache, read where it
//! lies) and for prefills without a mask tensor ([`prefill_attention`]).
//!
//! Burn's Flex attention makes contiguous f32 copies of the whole cache on every call (a
//! cast for bf16/f16, a copy for a strided view) and runs tiled gemms sized for prefill.
//! A decode step has one query row per sequence: here each (sequence, head) task reads its
//! key/value head in place (any strides, bf16/f16 widened in registers), keeps the scores
//! of its row, and applies the softmax in f32, as Flex does after its cast. Masking
//! follows Burn's: `true` in the mask, or a key after the query's position when causal
//! (bottom-right aligned), is excluded; a fully masked row yields zeros.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Tensor, TensorData, bf16, f16};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::amx;
#[cfg(target_arch = "x86_64")]
use super::widen16;
use super::{Simd, Vectorized, Widen, host_f32, is_plain_flex, vectorized};

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

    /// The first of rows `(b, h, 0..count)` and the distance from one to the next, for loops
    /// that read `d` values at `first + j * step` for `j < count` (bounds checked here once,
    /// with checked arithmetic: panics when row `count - 1` is outside the storage). No rows
    /// (`count` 0) touch nothing.
    #[inline(always)]
    fn rows(&self, b: usize, h: usize, count: usize, d: usize) -> (*const T, usize) {
        if count == 0 {
            return (self.data.as_ptr(), 0);
        }
        let step = self.strides[2];
        let start = [b * self.strides[0], h * self.strides[1]]
            .into_iter()
            .try_fold(self.offset, usize::checked_add);
        let end = start.and_then(|start| {
            (count - 1)
                .checked_mul(step)
                .and_then(|last| last.checked_add(start))
                .and_then(|last| last.checked_add(d))
        });
        match (start, end) {
            (Some(start), Some(end)) if end <= self.data.len() => (self.data[start..].as_ptr(), step),
            _ => panic!("rows 0..{count} of head ({b}, {h}) lie outside the storage"),
        }
    }
}

/// The layout of `t` when it can be read in place: non-negative strides, inner stride 1, and
/// every index inside the storage.
pub(super) fn strided_parts(t: &FlexTensor) -> Option<(usize, [usize; 4])> {
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
    decode_attention_with(q, k, v, mask, options, Simd::best(), None)
}

/// [`decode_attention`] at the instruction level `path` (`Simd::Plain`: the tests' twin), with
/// `group` query heads per SIMD task when given (1, 2, 4 or 8, dividing the heads per
/// key/value head; otherwise one).
fn decode_attention_with(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    options: &AttentionModuleOptions,
    path: Simd,
    group: Option<usize>,
) -> Option<Tensor<4>> {
    let [b, heads, t, _] = q.dims();
    let total = k.dims()[2];
    if t == 0 || t > MAX_QUERY_ROWS {
        return None;
    }
    // First what rules out other devices: the mask is read from the host below.
    let inputs = Inputs::of(q, k, v, options)?;
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
    // Copied once the mask is known to fit.
    let queries = &host_f32(q.clone())?;
    let Inputs { k, v, b, shape, .. } = &inputs;
    let mask = mask.as_ref().map(|(values, mh)| (values.as_slice(), *mh));
    let out = match inputs.dtype {
        DType::F32 => run::<f32>(queries, k, v, mask, *b, shape, path, group)?,
        DType::BF16 => run::<bf16>(queries, k, v, mask, *b, shape, path, group)?,
        DType::F16 => run::<f16>(queries, k, v, mask, *b, shape, path, group)?,
        _ => return None,
    };
    Some(inputs.output(out))
}

/// What the kernels read: queries, keys and values as Flex tensors to read in place (the
/// kernels that take the queries as f32 copy them with [`host_f32`]), and the sizes.
struct Inputs {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    b: usize,
    shape: Shape4,
    dtype: DType,
    device: Device,
}

impl Inputs {
    /// `None` where neither kernel applies: another device, a softcap, mixed or integer
    /// dtypes, key/value shapes that do not match the queries (or a head count that is not
    /// a multiple of theirs), causal with fewer keys than queries.
    fn of(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, options: &AttentionModuleOptions) -> Option<Self> {
        let device = q.device();
        let dtype = q.dtype();
        let [b, heads, t, d] = q.dims();
        let [kb, kv_heads, total, kd] = k.dims();
        if !is_plain_flex(&device)
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
        Some(Self {
            q: q.clone().try_into_primitive::<Flex>().ok()?,
            k: k.clone().try_into_primitive::<Flex>().ok()?,
            v: v.clone().try_into_primitive::<Flex>().ok()?,
            b,
            shape: Shape4 {
                heads,
                rep: heads / kv_heads,
                t,
                total,
                d,
                scale: options.scale.map_or(1.0 / (d as f32).sqrt(), |s| s as f32),
                causal: options.is_causal,
            },
            dtype,
            device,
        })
    }

    /// A kernel's `[b, heads, t, d]` f32 result as a tensor of the inputs' dtype, stored as
    /// `[b, t, heads, d]` and returned as a swapped view: the layers swap heads and
    /// positions back and merge the heads next, which is then free instead of a copy on
    /// one thread (0.55 ms per CLIP-L layer), and the rounding is this parallel pass
    /// instead of a cast of its own.
    fn output(&self, out: Vec<f32>) -> Tensor<4> {
        let b = self.b;
        let Shape4 { heads, t, d, .. } = self.shape;
        let data = match self.dtype {
            DType::BF16 => TensorData::new(
                positions_first(&out, heads, t, d, super::round_bf16),
                [b, t, heads, d],
            ),
            DType::F16 => TensorData::new(
                positions_first(&out, heads, t, d, f16::from_f32),
                [b, t, heads, d],
            ),
            _ => TensorData::new(positions_first(&out, heads, t, d, |v| v), [b, t, heads, d]),
        };
        Tensor::<4>::from_data(data, (&self.device, self.dtype)).swap_dims(1, 2)
    }
}

/// `[b, heads, t, d]` values as `[b, t, heads, d]`, each through `narrow` (the cast to the
/// output's dtype), a position's heads per task.
fn positions_first<T: Copy + Default + Send>(
    out: &[f32],
    heads: usize,
    t: usize,
    d: usize,
    narrow: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let mut moved = vec![T::default(); out.len()];
    if moved.is_empty() {
        // No heads or a head size of 0 (chunks of 0 values would panic).
        return moved;
    }
    super::for_each_chunk(&mut moved, heads * d, |row, values| {
        let (bi, i) = (row / t, row % t);
        for (h, dst) in values.chunks_exact_mut(d).enumerate() {
            let src = &out[((bi * heads + h) * t + i) * d..][..d];
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = narrow(v);
            }
        }
    });
    moved
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

impl Shape4 {
    /// Keys query row `i` sees: all of them, or, when causal, none after its own position
    /// (bottom-right aligned).
    fn visible(&self, i: usize) -> usize {
        if self.causal {
            self.total - self.t + i + 1
        } else {
            self.total
        }
    }

    /// Query row `i` of head `head` of sequence `bi` in `q` (`[b, heads, t, d]`).
    fn query<'q>(&self, q: &'q [f32], bi: usize, head: usize, i: usize) -> &'q [f32] {
        &q[((bi * self.heads + head) * self.t + i) * self.d..][..self.d]
    }

    /// The key/value head of the `group` query heads from `h`, after checking that they share
    /// it, that the head size is `d` and that `out` holds their `group * t * d` outputs
    /// (panics otherwise: the SIMD kernels' sizes are constants of their instances).
    fn shared_kv_head(&self, h: usize, group: usize, d: usize, out: &[f32]) -> usize {
        let kvh = h / self.rep;
        assert!(
            self.d == d && out.len() >= group * self.t * d && (h + group - 1) / self.rep == kvh,
            "{group} query heads of size {d} from head {h}"
        );
        kvh
    }
}

/// Query heads per task of the SIMD kernels at most: the heads that share a key/value head
/// (GQA) read each key and value once for all of them.
const MAX_GROUP: usize = 8;

/// Tasks per thread the grouping leaves at least (the tasks of a step are equal in size).
const TASKS_PER_THREAD: usize = 4;

/// Which decode kernel a head size gets at an instruction level: the AVX-512 heads for 1, 2,
/// 4 or 8 registers of 16 (head sizes 16, 32, 64, 128), the AVX2 heads for 2, 4, 8 or 16
/// registers of 8 (the same sizes) where AVX-512 is not asked for or does not fit, else the
/// plain loop. Returns the level and the registers per head (0 for the plain loop).
fn decode_kernel(path: Simd, d: usize) -> (Simd, usize) {
    let path = if path.runs_here() { path } else { Simd::Plain };
    match path {
        Simd::Avx512 if d.is_multiple_of(LANES) && matches!(d / LANES, 1 | 2 | 4 | 8) => {
            (Simd::Avx512, d / LANES)
        }
        Simd::Avx512 | Simd::Avx2
            if d.is_multiple_of(AVX2_LANES) && matches!(d / AVX2_LANES, 2 | 4 | 8 | 16) =>
        {
            (Simd::Avx2, d / AVX2_LANES)
        }
        _ => (Simd::Plain, 0),
    }
}

/// All `(batch, head group)` tasks in parallel over keys and values stored as `T`; the output
/// is `[b, heads, t, d]` f32. Head sizes 16, 32, 64 and 128 run [`Head::avx512`] or
/// [`Head::avx2`] ([`decode_kernel`] at the level `path`; `Simd::Plain` is the tests' twin),
/// with several query heads of one key/value head per task ([`head_group`], or `group` where
/// given and valid); other sizes and CPUs run the plain loop [`head`], one head per task.
#[allow(clippy::too_many_arguments)]
fn run<T: Widen + burn::tensor::Element + bytemuck::Pod>(
    q: &[f32],
    k: &FlexTensor,
    v: &FlexTensor,
    mask: Option<(&[bool], usize)>,
    b: usize,
    s: &Shape4,
    path: Simd,
    group: Option<usize>,
) -> Option<Vec<f32>> {
    let (k, v) = (strided::<T>(k)?, strided::<T>(v)?);
    let (kernel, registers) = decode_kernel(path, s.d);
    let group = match group {
        _ if kernel == Simd::Plain => 1,
        Some(g) if matches!(g, 1 | 2 | 4 | 8) && s.rep.is_multiple_of(g) => g,
        Some(_) => 1,
        None => head_group(b, s, rayon::current_num_threads()),
    };
    let groups = s.heads / group;
    let mut out = vec![0f32; b * s.heads * s.t * s.d];
    super::team::for_each_chunk_mut(&mut out, group * s.t * s.d, |task, out| {
        let work = Head {
            q,
            k: &k,
            v: &v,
            mask,
            bi: task / groups,
            h: task % groups * group,
            s,
            out,
        };
        // SAFETY: the CPU runs `kernel` (`decode_kernel` checked), `d` is `registers` whole
        // registers of it, `group` query heads from `h` share one key/value head, and each
        // task's output is `group * t * d` values.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            macro_rules! heads {
                ($kernel:ident, $c:literal) => {
                    match group {
                        1 => return work.$kernel::<$c, 1>(),
                        2 => return work.$kernel::<$c, 2>(),
                        4 => return work.$kernel::<$c, 4>(),
                        8 => return work.$kernel::<$c, 8>(),
                        _ => unreachable!("groups are 1, 2, 4 or 8 heads"),
                    }
                };
            }
            match (kernel, registers) {
                (Simd::Avx512, 1) => heads!(avx512, 1),
                (Simd::Avx512, 2) => heads!(avx512, 2),
                (Simd::Avx512, 4) => heads!(avx512, 4),
                (Simd::Avx512, 8) => heads!(avx512, 8),
                (Simd::Avx2, 2) => heads!(avx2, 2),
                (Simd::Avx2, 4) => heads!(avx2, 4),
                (Simd::Avx2, 8) => heads!(avx2, 8),
                (Simd::Avx2, 16) => heads!(avx2, 16),
                _ => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = registers;
        // The plain loop computes the one head `h`: a group here would leave the others zero.
        assert_eq!(group, 1, "the plain decode loop takes one head per task");
        vectorized(work)
    });
    Some(out)
}

/// Query heads per task: the most (1, 2, 4 or 8, dividing the heads per key/value head) that
/// still leave [`TASKS_PER_THREAD`] tasks per thread, or 1.
fn head_group(b: usize, s: &Shape4, threads: usize) -> usize {
    let mut group = 1;
    while group * 2 <= MAX_GROUP
        && s.rep.is_multiple_of(group * 2)
        && b * s.heads / (group * 2) >= TASKS_PER_THREAD * threads
    {
        group *= 2;
    }
    group
}

#[cfg(target_arch = "x86_64")]
impl<T: Widen + burn::tensor::Element> Head<'_, T> {
    /// [`head`] for `G` query heads from `h` that share one key/value head, each of `C * 16`
    /// dimensions, with AVX-512: each key and value widened from `T` in registers once for
    /// the `G` heads; per head the query row in `C` registers, the score of each key as one
    /// register of partial sums summed across its lanes (16 keys at a time by
    /// [`lane_sums16`], with the additions of `_mm512_reduce_add_ps`), the exponentials
    /// vectorized ([`exp_nonpositive`]), and the output row held in `C` registers while the
    /// values stream past. The plain loop's auto-vectorized dot product came out as 4-lane
    /// pieces, and its output row went through memory once per key. The bits of each head
    /// do not depend on `G`.
    ///
    /// Panics unless the head size is `C * 16`, heads `h..h + G` share a key/value head and
    /// `out` holds `G * t * d` values.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and FMA.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn avx512<const C: usize, const G: usize>(self) {
        use std::arch::x86_64::*;

        let Self {
            q,
            k,
            v,
            mask,
            bi,
            h,
            s,
            out,
        } = self;
        let d = C * LANES;
        let kvh = s.shared_kv_head(h, G, d, out);
        // Each head's scores, then its probabilities.
        let mut scores = vec![0f32; G * s.total];
        // The partial sums of a block of 16 keys, per head.
        let mut partial = [[_mm512_setzero_ps(); LANES]; G];
        let scale = _mm512_set1_ps(s.scale);
        for i in 0..s.t {
            let qv: [[__m512; C]; G] = std::array::from_fn(|g| {
                let qrow = s.query(q, bi, h + g, i);
                // SAFETY: `C` registers of 16 inside the row of `d = 16 C` values.
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(qrow.as_ptr().add(c * LANES)) })
            });
            let visible = s.visible(i);
            for j0 in (0..visible).step_by(LANES) {
                let keys = LANES.min(visible - j0);
                for jj in 0..keys {
                    let key = k.row(bi, kvh, j0 + jj, d).as_ptr();
                    // SAFETY: the key row holds `d` values (`row` checked the bounds).
                    let kc: [__m512; C] = std::array::from_fn(|c| unsafe { widen16(key.add(c * LANES)) });
                    for (qg, part) in qv.iter().zip(partial.iter_mut()) {
                        // Two chains of additions, then one sum across the lanes.
                        let mut acc = [_mm512_setzero_ps(); 2];
                        for c in 0..C {
                            acc[c % 2] = _mm512_fmadd_ps(qg[c], kc[c], acc[c % 2]);
                        }
                        part[jj] = _mm512_add_ps(acc[0], acc[1]);
                    }
                }
                for (g, part) in partial.iter().enumerate() {
                    let row = &mut scores[g * s.total + j0..][..keys];
                    if keys == LANES {
                        // SAFETY: 16 scores inside the head's row.
                        unsafe {
                            _mm512_storeu_ps(row.as_mut_ptr(), _mm512_mul_ps(lane_sums16(part), scale))
                        };
                    } else {
                        for (score, &p) in row.iter_mut().zip(part) {
                            *score = _mm512_reduce_add_ps(p) * s.scale;
                        }
                    }
                }
            }
            let (sums, live) = probabilities::<G>(&mut scores, mask, bi, h, i, visible, s);
            let mut o = [[_mm512_setzero_ps(); C]; G];
            for j in 0..visible {
                let value = v.row(bi, kvh, j, d).as_ptr();
                // SAFETY: the value row holds `d` values (`row` checked the bounds).
                let vc: [__m512; C] = std::array::from_fn(|c| unsafe { widen16(value.add(c * LANES)) });
                for (g, og) in o.iter_mut().enumerate() {
                    let p = scores[g * s.total + j];
                    if p == 0.0 {
                        continue;
                    }
                    let pv = _mm512_set1_ps(p);
                    for (oc, &vcc) in og.iter_mut().zip(&vc) {
                        *oc = _mm512_fmadd_ps(pv, vcc, *oc);
                    }
                }
            }
            for g in 0..G {
                let row = &mut out[(g * s.t + i) * d..][..d];
                if !live[g] {
                    row.fill(0.0);
                    continue;
                }
                let inv = _mm512_set1_ps(1.0 / sums[g]);
                for (c, oc) in o[g].iter().enumerate() {
                    // SAFETY: 16 values inside the output row of `d`.
                    unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(c * LANES), _mm512_mul_ps(*oc, inv)) };
                }
            }
        }
    }
}

/// Lanes of an AVX2 register of f32.
const AVX2_LANES: usize = 8;

/// Query heads and registers of head dimensions whose outputs [`Head::avx2`] keeps in registers
/// while the values stream past: 2 x 4 accumulators, 4 widened values and a broadcast fit in
/// the 16 AVX registers (all `G x C` accumulators would not: each would go through memory on
/// every key).
const AVX2_VALUE_HEADS: usize = 2;
const AVX2_VALUE_REGISTERS: usize = 4;

#[cfg(target_arch = "x86_64")]
impl<T: Widen + burn::tensor::Element> Head<'_, T> {
    /// [`Head::avx512`] for AVX2 (8-lane registers, 16 of them): `G` query heads from `h`
    /// sharing one key/value head, each of `C * 8` dimensions. Each key is widened once for
    /// the `G` heads and its score summed across lanes 8 keys at a time ([`lane_sums8`], the
    /// bits of [`sum8`]); the probabilities as in the AVX-512 kernel ([`probabilities`]); the
    /// values are then read in passes of [`AVX2_VALUE_HEADS`] heads and
    /// [`AVX2_VALUE_REGISTERS`] registers of output each, held in registers (each value row
    /// read `G / 2` times, part of it per pass). The bits of each head do not depend on `G`.
    ///
    /// Panics unless the head size is `C * 8`, heads `h..h + G` share a key/value head and
    /// `out` holds `G * t * d` values.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<const C: usize, const G: usize>(self) {
        use std::arch::x86_64::*;

        let Self {
            q,
            k,
            v,
            mask,
            bi,
            h,
            s,
            out,
        } = self;
        let d = C * AVX2_LANES;
        let kvh = s.shared_kv_head(h, G, d, out);
        let mut scores = vec![0f32; G * s.total];
        let mut partial = [[_mm256_setzero_ps(); AVX2_LANES]; G];
        let scale = _mm256_set1_ps(s.scale);
        for i in 0..s.t {
            let queries: [*const f32; G] = std::array::from_fn(|g| s.query(q, bi, h + g, i).as_ptr());
            let visible = s.visible(i);
            let (first_key, key_step) = k.rows(bi, kvh, visible, d);
            for j0 in (0..visible).step_by(AVX2_LANES) {
                let keys = AVX2_LANES.min(visible - j0);
                for jj in 0..keys {
                    // SAFETY: key `j0 + jj < visible` holds `d` values (`rows` checked the bounds).
                    let kc: [__m256; C] = std::array::from_fn(|c| unsafe {
                        super::widen8(first_key.add((j0 + jj) * key_step + c * AVX2_LANES))
                    });
                    for (&qrow, part) in queries.iter().zip(partial.iter_mut()) {
                        let mut acc = [_mm256_setzero_ps(); 2];
                        for (c, &kcc) in kc.iter().enumerate() {
                            // SAFETY: register `c` of the query row of `d = 8 C` values.
                            let qc = unsafe { _mm256_loadu_ps(qrow.add(c * AVX2_LANES)) };
                            acc[c % 2] = _mm256_fmadd_ps(qc, kcc, acc[c % 2]);
                        }
                        part[jj] = _mm256_add_ps(acc[0], acc[1]);
                    }
                }
                for (g, part) in partial.iter().enumerate() {
                    let row = &mut scores[g * s.total + j0..][..keys];
                    if keys == AVX2_LANES {
                        // SAFETY: 8 scores inside the head's row.
                        unsafe { _mm256_storeu_ps(row.as_mut_ptr(), _mm256_mul_ps(lane_sums8(part), scale)) };
                    } else {
                        for (score, &p) in row.iter_mut().zip(part) {
                            *score = sum8(p) * s.scale;
                        }
                    }
                }
            }
            let (sums, live) = probabilities::<G>(&mut scores, mask, bi, h, i, visible, s);
            let (first_value, value_step) = v.rows(bi, kvh, visible, d);
            // Both divide their counts (G: 1, 2, 4, 8; C: 2, 4, 8, 16), so every pass is whole.
            let (heads, width) = (AVX2_VALUE_HEADS.min(G), AVX2_VALUE_REGISTERS.min(C));
            for g0 in (0..G).step_by(heads) {
                for c0 in (0..C).step_by(width) {
                    let mut o = [[_mm256_setzero_ps(); AVX2_VALUE_REGISTERS]; AVX2_VALUE_HEADS];
                    for j in 0..visible {
                        // SAFETY: registers `c0..c0 + width` of value `j < visible`, which holds
                        // `d = 8 C` values (`rows` checked the bounds).
                        let vc: [__m256; AVX2_VALUE_REGISTERS] = std::array::from_fn(|c| unsafe {
                            super::widen8(first_value.add(j * value_step + (c0 + c % width) * AVX2_LANES))
                        });
                        for (gg, og) in o.iter_mut().enumerate().take(heads) {
                            let p = scores[(g0 + gg) * s.total + j];
                            if p == 0.0 {
                                continue;
                            }
                            let pv = _mm256_set1_ps(p);
                            for (oc, &vcc) in og.iter_mut().zip(&vc).take(width) {
                                *oc = _mm256_fmadd_ps(pv, vcc, *oc);
                            }
                        }
                    }
                    for (gg, og) in o.iter().enumerate().take(heads) {
                        let g = g0 + gg;
                        let row = &mut out[(g * s.t + i) * d..][..d];
                        let inv = _mm256_set1_ps(if live[g] { 1.0 / sums[g] } else { 0.0 });
                        for (c, oc) in og.iter().enumerate().take(width) {
                            // SAFETY: 8 values inside the output row of `d`.
                            unsafe {
                                _mm256_storeu_ps(
                                    row.as_mut_ptr().add((c0 + c) * AVX2_LANES),
                                    _mm256_mul_ps(*oc, inv),
                                )
                            };
                        }
                    }
                }
            }
        }
    }
}

/// The sum of the 8 lanes of `v` in [`lane_sums8`]'s order ([`sum_lanes8`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(super) fn sum8(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; AVX2_LANES];
    // SAFETY: 8 f32 lanes into an 8-f32 array.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    sum_lanes8(&lanes)
}

/// The sum of 8 lanes in the AVX2 kernels' order, in plain Rust: lanes `l` and `l + 4`,
/// then `l + 2`, then `l + 1`.
#[inline]
pub(super) fn sum_lanes8(lanes: &[f32; AVX2_LANES]) -> f32 {
    let half: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    (half[0] + half[2]) + (half[1] + half[3])
}

/// The lane sums of 8 registers (`v[j]` summed across its lanes into lane `j`) with the
/// additions of [`sum8`]: 15 shuffles and 7 additions for the 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn lane_sums8(v: &[std::arch::x86_64::__m256; AVX2_LANES]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Lanes l and l + 4: the low 128 bits of `halves[i]` belong to register 2 i, the high to 2 i + 1.
    let halves: [__m256; 4] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    });
    // Lanes l and l + 2: elements 0-1 of each 128-bit lane belong to one register, 2-3 to the
    // register two further on.
    let quarters: [__m256; 2] = std::array::from_fn(|i| {
        let (a, b) = (halves[2 * i], halves[2 * i + 1]);
        _mm256_add_ps(_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xEE>(a, b))
    });
    let (a, b) = (quarters[0], quarters[1]);
    let sums = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(a, b), _mm256_shuffle_ps::<0xDD>(a, b));
    // Element e of the low 128 bits now holds register 2 e's sum, of the high, 2 e + 1's.
    _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Masks the scores of the `G` query heads from `h` (query row `i`, `visible` keys; head `g`'s
/// at `scores[g * total..]`) and turns them into unnormalised probabilities in place; returns
/// each head's sum of probabilities and whether any key is left for it (a head with every key
/// masked gets zeros, which the value loops skip).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn probabilities<const G: usize>(
    scores: &mut [f32],
    mask: Option<(&[bool], usize)>,
    bi: usize,
    h: usize,
    i: usize,
    visible: usize,
    s: &Shape4,
) -> ([f32; G], [bool; G]) {
    let mut sums = [0f32; G];
    let mut live = [false; G];
    for g in 0..G {
        let scores = &mut scores[g * s.total..][..visible];
        if let Some((m, mh)) = mask {
            let mhead = if mh == 1 { 0 } else { h + g };
            let row = &m[((bi * mh + mhead) * s.t + i) * s.total..][..visible];
            for (score, &masked) in scores.iter_mut().zip(row) {
                if masked {
                    *score = f32::NEG_INFINITY;
                }
            }
        }
        let max = lane_fold(scores, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
        if max == f32::NEG_INFINITY {
            scores.fill(0.0);
            continue;
        }
        live[g] = true;
        // A masked key's probability is exactly 0 (`exp_nonpositive` stops at `exp(-87)`).
        for score in scores.iter_mut() {
            let p = exp_nonpositive(*score - max);
            *score = if *score == f32::NEG_INFINITY { 0.0 } else { p };
        }
        sums[g] = lane_fold(scores, 0.0, |a, x| a + x);
    }
    (sums, live)
}

/// The lane sums of 16 registers (`v[j]` summed across its lanes into lane `j`), each with
/// the additions of `_mm512_reduce_add_ps` in its order (halves of 256, then 128, 64 and 32
/// bits): 46 shuffles and adds for the 16 instead of about 8 instructions per register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn lane_sums16(v: &[std::arch::x86_64::__m512; LANES]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Lanes l and l + 8 of each register: two registers' halves per result.
    let halves: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // Lanes l and l + 4: 128-bit lane m of `quarters[i]` belongs to register 4 i + m.
    let quarters: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (halves[2 * i], halves[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // Lanes l and l + 2, then l and l + 1, within each 128-bit lane.
    let eighths: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (quarters[2 * i], quarters[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b))
    });
    let (a, b) = (eighths[0], eighths[1]);
    let sums = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(a, b), _mm512_shuffle_ps::<0xDD>(a, b));
    // Element 4 m + e now holds register 4 e + m's sum.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, sums)
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
        let qrow = s.query(q, bi, h, i);
        let visible = s.visible(i);
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

/// Query rows per task of [`prefill_attention`] (the AVX2 kernel's: [`AVX2_QUERY_BLOCK`]).
const QUERY_BLOCK: usize = 32;
/// Query rows per task with [`KeyBlock::run_avx2`]: each key block (16 KB of keys and 16 KB
/// of values at head size 64, more than half of a 32 KB L1) serves more rows before the
/// next replaces it (CLIP-L's attention 22.4 -> 12.3 ms in the kernel table against 32 rows).
const AVX2_QUERY_BLOCK: usize = 96;
/// Query rows per task of [`AmxQueryBlock`]: each key block's tiles serve more rows
/// before the next replaces them.
const AMX_QUERY_BLOCK: usize = 64;
/// Keys per step of [`prefill_attention`]: their scores stay in L1 with the block's keys
/// and values widened to f32.
const KEY_BLOCK: usize = 64;
/// Query rows per step of [`KeyBlock::run_avx2`] at most.
const AVX2_QUERY_ROWS: usize = 6;
/// Keys, and dimensions of the output, per pass of [`KeyBlock::run_avx2`] (two AVX2
/// registers).
const AVX2_COLS: usize = 16;

/// Scaled dot-product attention of many query rows (a prefill, the vision tower) on Flex,
/// without a mask tensor (causal or not), with the arguments of [`decode_attention`]: blocks
/// of query rows ([`QUERY_BLOCK`]) in parallel, each going over the keys it can see
/// [`KEY_BLOCK`] at a time with an online softmax (FlashAttention's), keys and values read
/// in place and widened per block, the exponentials vectorized ([`exp_nonpositive`]).
/// Flex's own attention instead copies queries, keys and values to f32 and calls the
/// scalar `expf` per score. `None` where it does not apply (a mask tensor, a softcap,
/// [`MAX_QUERY_ROWS`] rows or fewer, and what [`decode_attention`] refuses).
pub fn prefill_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    options: &AttentionModuleOptions,
) -> Option<Tensor<4>> {
    prefill_attention_with(q, k, v, mask, options, Simd::best(), true)
}

/// Whether a bf16 prefill attention runs on AMX tiles ([`AmxQueryBlock`]) where the key-block
/// kernel would be `kernel`, for head size `d`: on CPUs with AMX-BF16, in place of the
/// AVX-512 kernel (head sizes 64 and 128: whole groups of 32 dimensions for the tiles).
fn amx_apply(kernel: Simd, d: usize) -> bool {
    kernel == Simd::Avx512
        && (d == 4 * LANES || d == 8 * LANES)
        && amx::amx_bf16_available()
        && super::bf16_dot::bf16_dot_available()
}

/// [`prefill_attention`] with the key-block kernel of level `kernel`, all of which give the
/// same bits (the same chains of FMAs per score and per output value, in the same order):
/// [`Simd::Avx2`] up to [`AVX2_QUERY_ROWS`] rows at a time ([`KeyBlock::run_avx2`], head
/// sizes that are multiples of 16), [`Simd::Avx512`] four or two ([`KeyBlock::run`], head
/// sizes 64 and 128), the row loop otherwise. `None` also where the CPU lacks the level.
/// With `amx`, bf16 inputs go to the AMX tiles instead where [`amx_apply`] allows: not the
/// same bits (other sums, probabilities rounded to bf16), see [`AmxQueryBlock`].
fn prefill_attention_with(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    options: &AttentionModuleOptions,
    kernel: Simd,
    amx: bool,
) -> Option<Tensor<4>> {
    let [_, _, t, d] = q.dims();
    if mask.is_some() || t <= MAX_QUERY_ROWS || d == 0 || !kernel.runs_here() {
        return None;
    }
    if amx && q.dtype() == DType::BF16 && amx_apply(kernel, d) {
        return amx_attention(&Inputs::of(q, k, v, options)?);
    }
    let inputs = Inputs::of(q, k, v, options)?;
    let queries = &host_f32(q.clone())?;
    let Inputs { k, v, b, shape, .. } = &inputs;
    let out = match inputs.dtype {
        DType::F32 => run_blocks::<f32>(queries, k, v, *b, shape, kernel)?,
        DType::BF16 => run_blocks::<bf16>(queries, k, v, *b, shape, kernel)?,
        DType::F16 => run_blocks::<f16>(queries, k, v, *b, shape, kernel)?,
        _ => return None,
    };
    Some(inputs.output(out))
}

/// Every `(batch, head, query block)` task of [`prefill_attention`] in parallel; the output
/// is `[b, heads, t, d]` f32.
fn run_blocks<T: Widen + burn::tensor::Element + bytemuck::Pod>(
    q: &[f32],
    k: &FlexTensor,
    v: &FlexTensor,
    b: usize,
    s: &Shape4,
    kernel: Simd,
) -> Option<Vec<f32>> {
    let (k, v) = (strided::<T>(k)?, strided::<T>(v)?);
    let d = s.d;
    // Each key/value head once in f32: keys transposed (`[d, padded]`, so that a query value
    // times a row of them is a vector operation over keys; zero past `total`), values as
    // `[total, d]`. Shared by the head's query blocks and by the query heads of a GQA group.
    let kv_heads = s.heads / s.rep;
    let padded = s.total.next_multiple_of(KEY_BLOCK);
    let (key_len, value_len) = (d * padded, s.total * d);
    let mut keys = super::aligned_zeros::<f32>(b * kv_heads * key_len);
    let mut values = super::aligned_zeros::<f32>(b * kv_heads * value_len);
    keys.par_chunks_mut(key_len)
        .zip(values.par_chunks_mut(value_len))
        .enumerate()
        .for_each(|(task, (kt, vs))| {
            let (bi, kvh) = (task / kv_heads, task % kv_heads);
            for j in 0..s.total {
                let (key, value) = (k.row(bi, kvh, j, d), v.row(bi, kvh, j, d));
                for (dd, &x) in key.iter().enumerate() {
                    kt[dd * padded + j] = x.widen();
                }
                for (o, &x) in vs[j * d..(j + 1) * d].iter_mut().zip(value) {
                    *o = x.widen();
                }
            }
        });
    let query_block = if kernel == Simd::Avx2 {
        AVX2_QUERY_BLOCK
    } else {
        QUERY_BLOCK
    };
    let mut out = vec![0f32; b * s.heads * s.t * d];
    out.par_chunks_mut(s.t * d)
        .enumerate()
        .for_each(|(task, head_out)| {
            let (bi, h) = (task / s.heads, task % s.heads);
            let kv = bi * kv_heads + h / s.rep;
            let q_head = &q[task * s.t * d..(task + 1) * s.t * d];
            head_out
                .par_chunks_mut(query_block * d)
                .enumerate()
                .for_each(|(block, out)| {
                    let i0 = block * query_block;
                    vectorized(QueryBlock {
                        q: &q_head[i0 * d..i0 * d + out.len()],
                        keys: &keys[kv * key_len..(kv + 1) * key_len],
                        values: &values[kv * value_len..(kv + 1) * value_len],
                        padded,
                        i0,
                        s,
                        kernel,
                        out,
                    })
                });
        });
    Some(out)
}

/// [`prefill_attention_with`] on AMX tiles for bf16 inputs ([`amx_apply`]): the queries
/// read in place and the output written as bf16, without the f32 copies of both that the
/// other kernels make (at 7B they took a third of the attention's time).
fn amx_attention(inputs: &Inputs) -> Option<Tensor<4>> {
    let Inputs {
        q, k, v, b, shape: s, ..
    } = inputs;
    let (q, k, v) = (strided::<bf16>(q)?, strided::<bf16>(k)?, strided::<bf16>(v)?);
    let d = s.d;
    // Each key/value head once as bf16 tiles ([`key_tiles`], [`value_tiles`]), `padded * d
    // / 2` pairs each: shared by the head's query blocks and the query heads of a GQA group.
    let kv_heads = s.heads / s.rep;
    let tile_len = s.total.next_multiple_of(KEY_BLOCK) * d / 2;
    // Whole groups of 16 keys (or pairs of values) in registers, the rest one by one; the
    // padding keys stay zero (each task zeroes its own tiles).
    let (whole_keys, whole_pairs) = (s.total / 16 * 16, s.total / 2 * 2);
    let keys = super::aligned_filled::<u32>(b * kv_heads * tile_len, tile_len, |task, kt| {
        let (bi, kvh) = (task / kv_heads, task % kv_heads);
        let (first, step) = k.rows(bi, kvh, whole_keys, d);
        for j0 in (0..whole_keys).step_by(16) {
            // SAFETY: `amx_apply` checked AVX-512 (every AMX CPU has it); `rows` checked
            // keys `0..whole_keys` of `d` values each at `first + j * step`.
            unsafe { key_tiles16(first.add(j0 * step), step, j0, d, kt) };
        }
        for j in whole_keys..s.total {
            key_tiles(k.row(bi, kvh, j, d), j, d, kt);
        }
    });
    let values = super::aligned_filled::<u32>(b * kv_heads * tile_len, tile_len, |task, vs| {
        let (bi, kvh) = (task / kv_heads, task % kv_heads);
        let vs: &mut [u16] = bytemuck::cast_slice_mut(vs);
        let (first, step) = v.rows(bi, kvh, whole_pairs, d);
        for j in (0..whole_pairs).step_by(2) {
            // SAFETY: as above, for values `0..whole_pairs`.
            unsafe { value_tiles2(first.add(j * step), first.add((j + 1) * step), j, d, vs) };
        }
        for j in whole_pairs..s.total {
            value_tiles(v.row(bi, kvh, j, d), j, d, vs);
        }
    });
    // Stored as `[b, t, heads, d]`, returned as a swapped view (see `Inputs::output`). Not
    // zeroed first: the tasks write every value.
    let len = b * s.heads * s.t * d;
    let mut out: Vec<bf16> = Vec::with_capacity(len);
    let target = OutputRows(out.as_mut_ptr());
    let blocks = s.t.div_ceil(AMX_QUERY_BLOCK);
    (0..b * s.heads * blocks).into_par_iter().for_each(|task| {
        let (bi, h, block) = (task / (s.heads * blocks), task / blocks % s.heads, task % blocks);
        let kv = bi * kv_heads + h / s.rep;
        let Some(tiles) = amx::Tiles::new() else {
            unreachable!("amx_apply checked that AMX is available")
        };
        let i0 = block * AMX_QUERY_BLOCK;
        let rows = AMX_QUERY_BLOCK.min(s.t - i0);
        vectorized(AmxQueryBlock {
            tiles: &tiles,
            q: (0..rows).map(|r| q.row(bi, h, i0 + r, d)),
            keys: &keys[kv * tile_len..(kv + 1) * tile_len],
            values: &values[kv * tile_len..(kv + 1) * tile_len],
            i0,
            s,
            rows,
            // SAFETY: row `i0` of head `h` of batch `bi` lies inside `out`; the task's rows
            // (`heads * d` values apart) are its own.
            out: (
                unsafe { target.at(((bi * s.t + i0) * s.heads + h) * d) },
                s.heads * d,
            ),
        })
    });
    // SAFETY: the tasks wrote every value: each `(batch, head, block)` its rows' `d` values.
    unsafe { out.set_len(len) };
    let shape = [*b, s.t, s.heads, d];
    // The dtype named: `from_data` alone would widen the values to the default f32.
    let out = Tensor::<4>::from_data(TensorData::new(out, shape), (&inputs.device, DType::BF16));
    Some(out.swap_dims(1, 2))
}

/// The start of [`amx_attention`]'s output, shared by its tasks.
struct OutputRows(*mut bf16);

// SAFETY: the tasks write disjoint rows of the output (one head's block of positions each).
unsafe impl Sync for OutputRows {}

impl OutputRows {
    /// The value `offset` values in.
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn at(&self, offset: usize) -> *mut bf16 {
        // SAFETY: as this function's.
        unsafe { self.0.add(offset) }
    }
}

const _: () = assert!(KEY_BLOCK == 64, "amx::Tiles::scores16x64 scores 64 keys");

/// Key `j` (its `d` values) into the AMX tiles of [`amx::Tiles::scores16x64`]: per block of
/// [`KEY_BLOCK`] keys and group of 32 dimensions four 16-key tiles of 256 pairs, pair `p`
/// of key `j % 16` at `16 p + j % 16` (the bits of two bf16, the first in the low half).
fn key_tiles<T: Widen>(key: &[T], j: usize, d: usize, tiles: &mut [u32]) {
    let groups = d / 32;
    let (block, t, col) = (j / KEY_BLOCK, j % KEY_BLOCK / 16, j % 16);
    let bits = |x: T| x.widen().to_bits() >> 16;
    for (pair, two) in key.chunks_exact(2).enumerate() {
        let (g, p) = (pair / 16, pair % 16);
        tiles[((block * groups + g) * 4 + t) * 256 + 16 * p + col] = bits(two[0]) | (bits(two[1]) << 16);
    }
}

/// [`key_tiles`] for keys `j0..j0 + 16` (`j0` a multiple of 16) at `first + i * step`: per
/// group of 32 dimensions one 16 x 16 transpose of their pairs in registers.
///
/// # Safety
/// The CPU must have AVX-512 F; the 16 keys of `d` bf16 must be readable; `tiles` as for
/// [`key_tiles`] (asserted).
unsafe fn key_tiles16(first: *const bf16, step: usize, j0: usize, d: usize, tiles: &mut [u32]) {
    let groups = d / 32;
    let (block, t) = (j0 / KEY_BLOCK, j0 % KEY_BLOCK / 16);
    assert!(j0.is_multiple_of(16) && d.is_multiple_of(32));
    for g in 0..groups {
        let at = ((block * groups + g) * 4 + t) * 256;
        let dst = &mut tiles[at..at + 256];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: key `i < 16` holds dimensions `32g..32g + 32` (64 bytes) at `first + i *
        // step`; `dst` holds the 16 rows of 16 pairs; AVX-512 F (this function's contract).
        unsafe {
            super::bf16_gemm::transpose16(first.add(32 * g).cast(), 2 * step, dst.as_mut_ptr(), 16)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no AMX outside x86_64 ({first:?} {step} {dst:?})");
    }
}

/// [`value_tiles`] for the pair of values `j`, `j + 1` (`j` even) at `even` and `odd`: per
/// 16 dimensions one row of a tile, the two values' bits interleaved in a register.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; both values' `d` bf16 must be readable; `tiles` as
/// for [`value_tiles`] (asserted).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn value_tiles2(even: *const bf16, odd: *const bf16, j: usize, d: usize, tiles: &mut [u16]) {
    let col_tiles = d / 16;
    let (block, half, p) = (j / KEY_BLOCK, j % KEY_BLOCK / 32, j % 32 / 2);
    assert!(j.is_multiple_of(2) && d.is_multiple_of(16));
    for c in 0..col_tiles {
        let at = 2 * (((block * 2 + half) * col_tiles + c) * 256 + 16 * p);
        let dst = &mut tiles[at..at + 32];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: dimensions `16c..16c + 16` (32 bytes) of both values are readable and
        // `dst` holds 32 values (this function's contract, asserted above).
        unsafe {
            use std::arch::x86_64::*;
            let lo = _mm512_castsi256_si512(_mm256_loadu_si256(even.add(16 * c).cast()));
            let hi = _mm512_castsi256_si512(_mm256_loadu_si256(odd.add(16 * c).cast()));
            // Lane `2i` from the even value's `i`, lane `2i + 1` from the odd one's (index
            // 32 + i picks the second operand).
            let index = _mm512_set_epi16(
                47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35,
                3, 34, 2, 33, 1, 32, 0,
            );
            let pairs = _mm512_permutex2var_epi16(lo, index, hi);
            _mm512_storeu_si512(dst.as_mut_ptr().cast(), pairs);
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no AMX outside x86_64 ({even:?} {odd:?} {dst:?})");
    }
}

/// Value `j` (its `d` values) into the AMX tiles of [`amx::Tiles::values16x64`]: per block
/// of [`KEY_BLOCK`] keys, two halves of 32 keys, each `d / 16` tiles of 16 dimensions; row
/// `p` of a tile holds keys `2p` (low half) and `2p + 1` of the half for its 16 dimensions.
fn value_tiles<T: Widen>(value: &[T], j: usize, d: usize, tiles: &mut [u16]) {
    let col_tiles = d / 16;
    let (block, half, p, odd) = (j / KEY_BLOCK, j % KEY_BLOCK / 32, j % 32 / 2, j % 2);
    for (c, &x) in value.iter().enumerate() {
        let tile = (block * 2 + half) * col_tiles + c / 16;
        tiles[2 * (tile * 256 + 16 * p + c % 16) + odd] = (x.widen().to_bits() >> 16) as u16;
    }
}

/// One task of [`run_blocks`] on AMX tiles: query rows `i0..` of one head (as many as `out`
/// holds) against its key/value head as bf16 tiles ([`key_tiles`], [`value_tiles`]). Per
/// block of [`KEY_BLOCK`] keys and 16 rows: the scores on the tiles (exact products summed
/// in f32, then scaled), the online softmax in f32 ([`softmax_step`], as the other
/// kernels), the probabilities rounded to bf16 (as PyTorch's CPU flash attention does for
/// bf16) and multiplied with the values on the tiles into the f32 output rows.
struct AmxQueryBlock<'a, Q> {
    tiles: &'a amx::Tiles,
    /// The block's query rows, `d` bf16 each.
    q: Q,
    keys: &'a [u32],
    values: &'a [u32],
    i0: usize,
    s: &'a Shape4,
    /// Query rows in the block.
    rows: usize,
    /// Where the block's `rows` output rows of `d` bf16 go: the first, and the values
    /// from one to the next.
    out: (*mut bf16, usize),
}

impl<'a, Q: Iterator<Item = &'a [bf16]>> Vectorized for AmxQueryBlock<'a, Q> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            tiles,
            q,
            keys,
            values,
            i0,
            s,
            rows,
            out,
        } = self;
        let d = s.d;
        let (groups, col_tiles) = (d / 32, d / 16);
        let padded_rows = rows.next_multiple_of(16);
        // The queries' bits (zero rows up to whole tiles) and the output sums, in buffers
        // that the thread keeps from task to task: an aligned allocation per task took the
        // allocator's slow path and a memset of its own (about 1% of an encode's samples).
        thread_local! {
            static BUFFERS: std::cell::Cell<Option<(super::AlignedVec<bf16>, super::AlignedVec<f32>)>> =
                const { std::cell::Cell::new(None) };
        }
        let (mut q_bits, mut o) = BUFFERS
            .take()
            .unwrap_or_else(|| (super::aligned_zeros(0), super::aligned_zeros(0)));
        q_bits.clear();
        q_bits.resize(padded_rows * d, bf16::ZERO);
        for (row, x) in q_bits.chunks_exact_mut(d).zip(q) {
            row.copy_from_slice(x);
        }
        o.clear();
        o.resize(padded_rows * d, 0.0);
        assert!(rows <= AMX_QUERY_BLOCK);
        let mut scores = [const { ScoreRows([[0f32; KEY_BLOCK]; 16]) }; AMX_QUERY_BLOCK / 16];
        let mut probs = [const { ProbabilityRows([0u16; 16 * KEY_BLOCK]) }; AMX_QUERY_BLOCK / 16];
        // The rows' running maxima and sums, by groups of 16 as the tiles hold them.
        let mut max = [[f32::NEG_INFINITY; 16]; AMX_QUERY_BLOCK / 16];
        let mut sum = [[0f32; 16]; AMX_QUERY_BLOCK / 16];
        for j0 in (0..s.visible(i0 + rows - 1)).step_by(KEY_BLOCK) {
            let block = j0 / KEY_BLOCK;
            let block_keys = &keys[block * groups * 1024..][..groups * 1024];
            let block_values = &values[block * col_tiles * 512..][..col_tiles * 512];
            // The next block's key and value tiles, fetched while this one computes: the
            // tile loads waited on L2 (a third of the kernel's samples on two loads).
            prefetch_lines(
                keys.get((block + 1) * groups * 1024..).unwrap_or(&[]),
                groups * 1024,
            );
            prefetch_lines(
                values.get((block + 1) * col_tiles * 512..).unwrap_or(&[]),
                col_tiles * 512,
            );
            // Each step for all row groups before the next: the vector code reads scores
            // that the tiles stored a while before, and the tiles probabilities and outputs
            // that it wrote a while before (right after, the loads wait for the stores).
            for (r0, scores) in (0..rows).step_by(16).zip(&mut scores) {
                // SAFETY: 16 query rows of `d` bf16 from row `r0` (padded to whole tiles),
                // the block's `groups` groups of four 1 KB key tiles, 16 rows of scores.
                unsafe {
                    tiles.scores16x64(
                        q_bits[r0 * d..].as_ptr().cast(),
                        2 * d,
                        block_keys.as_ptr().cast(),
                        groups,
                        scores.0.as_mut_ptr().cast(),
                    )
                };
            }
            for (((r0, scores), probs), (max, sum)) in (0..rows)
                .step_by(16)
                .zip(&scores)
                .zip(&mut probs)
                .zip(max.iter_mut().zip(&mut sum))
            {
                let visible = std::array::from_fn(|i| {
                    let r = r0 + i;
                    if r < rows {
                        s.visible(i0 + r).saturating_sub(j0).min(KEY_BLOCK)
                    } else {
                        0
                    }
                });
                // SAFETY: `amx_apply` checked AVX-512 F, BW and BF16.
                let rescale = unsafe { softmax_rows16_bf16(scores, visible, s.scale, max, sum, probs) };
                for (r, &factor) in (r0..rows).zip(&rescale) {
                    // An unchanged maximum rescales by exactly 1: the row's output is left
                    // alone (vector stores just before the tiles load it stall them).
                    if factor != 1.0 {
                        for x in &mut o[r * d..(r + 1) * d] {
                            *x *= factor;
                        }
                    }
                }
            }
            for (r0, probs) in (0..rows).step_by(16).zip(&probs) {
                // SAFETY: 16 rows of 64 bf16 probabilities, the block's two halves of
                // `col_tiles` value tiles, and 16 output rows of `d` f32 from row `r0`.
                unsafe {
                    tiles.values16x64(
                        probs.0.as_ptr().cast(),
                        block_values.as_ptr().cast(),
                        o[r0 * d..].as_mut_ptr(),
                        4 * d,
                        col_tiles,
                    )
                };
            }
        }
        for (r, (o, &total)) in o.chunks(d).zip(sum.as_flattened()).enumerate().take(rows) {
            let inv = 1.0 / total;
            for (c, &x) in o.iter().enumerate() {
                // Written through the pointer: the output is not initialized yet.
                // SAFETY: the block's output rows are its own (see `AmxQueryBlock::out`),
                // `d` values each.
                unsafe { out.0.add(r * out.1 + c).write(bf16::from_f32(x * inv)) };
            }
        }
        BUFFERS.set(Some((q_bits, o)));
    }
}

/// An AMX query block's 16 rows of scores, on a cache line as the tile store wants them.
#[repr(C, align(64))]
struct ScoreRows([[f32; KEY_BLOCK]; 16]);

/// An AMX query block's 16 rows of bf16 probabilities, on a cache line as the tile load
/// wants them.
#[repr(C, align(64))]
struct ProbabilityRows([u16; 16 * KEY_BLOCK]);

/// One task of [`run_blocks`]: query rows `i0..` of one head (as many as `out` holds)
/// against its key/value head in f32 (`keys` transposed, `padded` columns).
struct QueryBlock<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    padded: usize,
    i0: usize,
    s: &'a Shape4,
    kernel: Simd,
    out: &'a mut [f32],
}

impl Vectorized for QueryBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            q,
            keys,
            values,
            padded,
            i0,
            s,
            kernel,
            out,
        } = self;
        let d = s.d;
        let rows = out.len() / d;
        let queries: Vec<f32> = q.iter().map(|x| x * s.scale).collect();
        let mut scores = [0f32; KEY_BLOCK];
        const { assert!(KEY_BLOCK.is_multiple_of(LANES)) };
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        out.fill(0.0);
        // Query `i` sees keys up to `past + i` when causal (bottom-right aligned).
        let past = s.total - s.t;
        let seen = |r: usize| if s.causal { past + i0 + r + 1 } else { s.total };
        let last = seen(rows - 1);
        for j0 in (0..last).step_by(KEY_BLOCK) {
            let width = KEY_BLOCK.min(last - j0);
            let values = &values[j0 * d..];
            let visible = |r: usize| seen(r).saturating_sub(j0).min(width);
            // Head sizes of 64 and 128 (the models') on AVX-512: several rows at a time with
            // every partial sum in its own register (four rows of 64: 16 sums and 4 loaded
            // registers, so that each loaded key or value feeds four FMAs; two rows of 128);
            // other sizes and CPUs row by row below.
            #[cfg(target_arch = "x86_64")]
            if kernel == Simd::Avx2 && d.is_multiple_of(AVX2_COLS) {
                let mut r = 0;
                while r < rows {
                    let n = AVX2_QUERY_ROWS.min(rows - r);
                    let block = KeyBlock {
                        queries: &queries[r * d..(r + n) * d],
                        keys,
                        padded,
                        j0,
                        values,
                        max: &mut max[r..r + n],
                        sum: &mut sum[r..r + n],
                        out: &mut out[r * d..(r + n) * d],
                    };
                    let seen = |i: usize| visible(r + i);
                    // SAFETY: `Simd::Avx2` runs only on CPUs with AVX2 and FMA
                    // (`prefill_attention_with`).
                    unsafe {
                        match n {
                            6 => block.run_avx2::<6>(std::array::from_fn(seen)),
                            5 => block.run_avx2::<5>(std::array::from_fn(seen)),
                            4 => block.run_avx2::<4>(std::array::from_fn(seen)),
                            3 => block.run_avx2::<3>(std::array::from_fn(seen)),
                            2 => block.run_avx2::<2>(std::array::from_fn(seen)),
                            _ => block.run_avx2::<1>(std::array::from_fn(seen)),
                        }
                    }
                    r += n;
                }
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if kernel == Simd::Avx512 && (d == 4 * LANES || d == 8 * LANES) {
                let mut r = 0;
                while r < rows {
                    let n = match rows - r {
                        4.. if d == 4 * LANES => 4,
                        2.. => 2,
                        _ => 1,
                    };
                    let block = KeyBlock {
                        queries: &queries[r * d..(r + n) * d],
                        keys,
                        padded,
                        j0,
                        values,
                        max: &mut max[r..r + n],
                        sum: &mut sum[r..r + n],
                        out: &mut out[r * d..(r + n) * d],
                    };
                    // SAFETY: `Simd::Avx512` runs only on CPUs with AVX-512 F and FMA
                    // (`prefill_attention_with`).
                    unsafe {
                        match (n, d / LANES) {
                            (4, _) => block.run::<4, 4>(std::array::from_fn(|i| visible(r + i))),
                            (2, 4) => block.run::<2, 4>([visible(r), visible(r + 1)]),
                            (2, _) => block.run::<2, 8>([visible(r), visible(r + 1)]),
                            (_, 4) => block.run::<1, 4>([visible(r)]),
                            _ => block.run::<1, 8>([visible(r)]),
                        }
                    }
                    r += n;
                }
                continue;
            }
            for r in 0..rows {
                let visible = visible(r);
                if visible == 0 {
                    continue;
                }
                // Scores 16 keys at a time, each group's sums held in one register.
                let query = &queries[r * d..(r + 1) * d];
                for (c, group) in scores.chunks_exact_mut(LANES).enumerate() {
                    let mut acc = [0f32; LANES];
                    for (dd, &a) in query.iter().enumerate() {
                        let kv = &keys[dd * padded + j0 + c * LANES..][..LANES];
                        for (o, &x) in acc.iter_mut().zip(kv) {
                            *o = a.mul_add(x, *o);
                        }
                    }
                    group.copy_from_slice(&acc);
                }
                let scores = &mut scores[..visible];
                let rescale = softmax_step(scores, &mut max[r], &mut sum[r]);
                // Probabilities times values, 16 dimensions of the output row at a time.
                // (A fixed-size accumulator stays in a register; the last dimensions of a
                // head size that is not a multiple of 16 go one by one.)
                let row = &mut out[r * d..(r + 1) * d];
                let whole = d / LANES * LANES;
                for c0 in (0..whole).step_by(LANES) {
                    let mut acc: [f32; LANES] = std::array::from_fn(|l| row[c0 + l] * rescale);
                    for (j, &p) in scores.iter().enumerate() {
                        let vs = &values[j * d + c0..][..LANES];
                        for l in 0..LANES {
                            acc[l] = p.mul_add(vs[l], acc[l]);
                        }
                    }
                    row[c0..c0 + LANES].copy_from_slice(&acc);
                }
                for (c, o) in row.iter_mut().enumerate().skip(whole) {
                    let mut acc = *o * rescale;
                    for (j, &p) in scores.iter().enumerate() {
                        acc = p.mul_add(values[j * d + c], acc);
                    }
                    *o = acc;
                }
            }
        }
        for (row, &total) in out.chunks_mut(d).zip(&sum) {
            let inv = 1.0 / total;
            for o in row.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// One key block for `R` query rows of a head of `C * LANES` dimensions: the online-softmax
/// step of [`QueryBlock`] with fixed sizes, so that every partial sum (the `R x 4` score
/// groups, the `R x C` output chunks) is a register of its own and the chains of additions
/// run side by side.
struct KeyBlock<'a> {
    /// `R` rows of scaled queries.
    queries: &'a [f32],
    /// The head's keys, transposed (`[d, padded]`).
    keys: &'a [f32],
    padded: usize,
    /// The block's first key.
    j0: usize,
    /// Values from key `j0` on (`[.., d]`).
    values: &'a [f32],
    max: &'a mut [f32],
    sum: &'a mut [f32],
    /// `R` output rows.
    out: &'a mut [f32],
}

impl KeyBlock<'_> {
    /// `visible[r]`: how many of the block's keys row `r` sees (possibly none).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::needless_range_loop)] // key `j` indexes every row's probabilities and the values
    unsafe fn run<const R: usize, const C: usize>(mut self, visible: [usize; R]) {
        use std::arch::x86_64::*;

        const GROUPS: usize = KEY_BLOCK / LANES;
        let d = C * LANES;
        let width = visible.iter().copied().max().unwrap_or(0);
        // The pointer reads and writes below stay inside these bounds.
        assert!(self.queries.len() >= R * d && self.out.len() >= R * d && self.max.len() >= R);
        assert!(self.sum.len() >= R && self.values.len() >= width * d);
        assert!(self.keys.len() >= (d - 1) * self.padded + self.j0 + KEY_BLOCK);
        let mut acc = [[_mm512_setzero_ps(); GROUPS]; R];
        let keys = self.keys.as_ptr();
        for dd in 0..d {
            // SAFETY: key row `dd` has `KEY_BLOCK` values from `j0` (asserted above).
            let k: [__m512; GROUPS] = std::array::from_fn(|g| unsafe {
                _mm512_loadu_ps(keys.add(dd * self.padded + self.j0 + g * LANES))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(self.queries[r * d + dd]);
                for (o, kv) in row.iter_mut().zip(k) {
                    *o = _mm512_fmadd_ps(a, kv, *o);
                }
            }
        }
        let mut probs = [[0f32; KEY_BLOCK]; R];
        for (p, row) in probs.iter_mut().zip(&acc) {
            for (g, v) in row.iter().enumerate() {
                // SAFETY: 16 values inside the row of `KEY_BLOCK`.
                unsafe { _mm512_storeu_ps(p.as_mut_ptr().add(g * LANES), *v) };
            }
        }
        let rescale = self.softmax(&mut probs, visible);
        let out = self.out.as_mut_ptr();
        // SAFETY: row `r < R`, chunk `c < C`: inside the `R * d` outputs (asserted above).
        let mut o: [[__m512; C]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|c| unsafe {
                _mm512_mul_ps(
                    _mm512_loadu_ps(out.add(r * d + c * LANES)),
                    _mm512_set1_ps(rescale[r]),
                )
            })
        });
        let values = self.values.as_ptr();
        for j in 0..width {
            // SAFETY: value row `j < width` (asserted above).
            let v: [__m512; C] =
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(values.add(j * d + c * LANES)) });
            for (r, row) in o.iter_mut().enumerate() {
                let p = _mm512_set1_ps(probs[r][j]);
                for (acc, vc) in row.iter_mut().zip(v) {
                    *acc = _mm512_fmadd_ps(p, vc, *acc);
                }
            }
        }
        for (r, row) in o.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(out.add(r * d + c * LANES), *v) };
            }
        }
    }

    /// The scores in `probs` become each row's probabilities against its running maximum
    /// ([`softmax_step`]; the keys a row does not see, 0), and the factors that rescale what
    /// the rows accumulated before.
    #[inline(always)]
    fn softmax<const R: usize>(
        &mut self,
        probs: &mut [[f32; KEY_BLOCK]; R],
        visible: [usize; R],
    ) -> [f32; R] {
        let mut rescale = [1f32; R];
        for (r, (row, &seen)) in probs.iter_mut().zip(&visible).enumerate() {
            let (scores, unseen) = row.split_at_mut(seen);
            unseen.fill(0.0);
            if seen > 0 {
                rescale[r] = softmax_step(scores, &mut self.max[r], &mut self.sum[r]);
            }
        }
        rescale
    }

    /// [`KeyBlock::run`] with AVX2 and FMA, for up to [`AVX2_QUERY_ROWS`] rows of a head size
    /// that is a multiple of [`AVX2_COLS`]: the scores [`AVX2_COLS`] keys at a time, then the
    /// output [`AVX2_COLS`] dimensions at a time, each as `R` rows x 2 registers of sums (12
    /// of the 16 registers at 6 rows, as in the f32 gemm's AVX2 tile). Row by row, each
    /// sum's chain of FMAs waits on the one before.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // key `j` indexes every row's probabilities and the values
    unsafe fn run_avx2<const R: usize>(mut self, visible: [usize; R]) {
        use std::arch::x86_64::*;

        let d = self.queries.len() / R.max(1);
        let width = visible.iter().copied().max().unwrap_or(0);
        // The pointer reads and writes below stay inside these bounds.
        assert!(R >= 1 && d > 0 && d.is_multiple_of(AVX2_COLS) && self.queries.len() == R * d);
        assert!(self.out.len() >= R * d && self.max.len() >= R && self.sum.len() >= R);
        assert!(width <= KEY_BLOCK && self.values.len() >= width * d);
        assert!(self.keys.len() >= (d - 1) * self.padded + self.j0 + KEY_BLOCK);
        let (keys, queries) = (self.keys.as_ptr(), self.queries.as_ptr());
        let mut probs = [[0f32; KEY_BLOCK]; R];
        // Groups of keys that no row sees keep their zeros (`softmax` zeroes them anyway).
        for g in (0..width).step_by(AVX2_COLS) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for dd in 0..d {
                // SAFETY: key row `dd` has `KEY_BLOCK` values from `j0`, and `g + 16 <=
                // KEY_BLOCK` (asserted above).
                let (k0, k1) = unsafe {
                    let at = keys.add(dd * self.padded + self.j0 + g);
                    (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)))
                };
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: row `r < R`, dimension `dd < d` (asserted above).
                    let a = _mm256_set1_ps(unsafe { *queries.add(r * d + dd) });
                    row[0] = _mm256_fmadd_ps(a, k0, row[0]);
                    row[1] = _mm256_fmadd_ps(a, k1, row[1]);
                }
            }
            for (p, row) in probs.iter_mut().zip(&acc) {
                // SAFETY: 16 values from `g` inside the row of `KEY_BLOCK`.
                unsafe {
                    _mm256_storeu_ps(p.as_mut_ptr().add(g), row[0]);
                    _mm256_storeu_ps(p.as_mut_ptr().add(g + 8), row[1]);
                }
            }
        }
        let rescale = self.softmax(&mut probs, visible);
        let (out, values) = (self.out.as_mut_ptr(), self.values.as_ptr());
        for c in (0..d).step_by(AVX2_COLS) {
            // SAFETY (`out`'s loads and stores): row `r < R`, dimensions `c..c + 16` of `d`
            // (asserted above).
            let mut o: [[__m256; 2]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|h| unsafe {
                    _mm256_mul_ps(
                        _mm256_loadu_ps(out.add(r * d + c + 8 * h)),
                        _mm256_set1_ps(rescale[r]),
                    )
                })
            });
            for j in 0..width {
                // SAFETY: value row `j < width`, dimensions `c..c + 16` (asserted above).
                let (v0, v1) = unsafe {
                    let at = values.add(j * d + c);
                    (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)))
                };
                for (r, row) in o.iter_mut().enumerate() {
                    let p = _mm256_set1_ps(probs[r][j]);
                    row[0] = _mm256_fmadd_ps(p, v0, row[0]);
                    row[1] = _mm256_fmadd_ps(p, v1, row[1]);
                }
            }
            for (r, row) in o.iter().enumerate() {
                // SAFETY: as above.
                unsafe {
                    _mm256_storeu_ps(out.add(r * d + c), row[0]);
                    _mm256_storeu_ps(out.add(r * d + c + 8), row[1]);
                }
            }
        }
    }
}

/// One key block's step of a row's online softmax: `scores` (the row's scores of the keys it
/// sees in the block) become `exp(score - max)` against the row's new running maximum,
/// `sum` takes their total, and the returned factor rescales what the row accumulated
/// against the old maximum (0 when there was none yet).
#[inline(always)]
fn softmax_step(scores: &mut [f32], max: &mut f32, sum: &mut f32) -> f32 {
    let block_max = lane_fold(scores, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    let new_max = if block_max > *max { block_max } else { *max };
    let rescale = rescale_factor(*max, new_max);
    for sc in scores.iter_mut() {
        *sc = exp_nonpositive(*sc - new_max);
    }
    *sum = *sum * rescale + lane_fold(scores, 0.0, |a, x| a + x);
    *max = new_max;
    rescale
}

/// What a row's output so far is multiplied by when its running maximum goes from `old` to
/// `new`: 0 when there was none yet, exactly 1 when it stays (`exp_nonpositive(0.0)`,
/// without its chain of dependent steps), else `exp(old - new)`.
#[inline(always)]
fn rescale_factor(old: f32, new: f32) -> f32 {
    if old == f32::NEG_INFINITY {
        0.0
    } else if new == old {
        1.0
    } else {
        exp_nonpositive(old - new)
    }
}

/// Lanes of the vector loops of [`QueryBlock`] (one AVX-512 register of f32).
const LANES: usize = 16;

/// `values` folded with `f` in [`LANES`] independent lanes (so that the loop vectorizes),
/// then the lanes folded in order.
#[inline(always)]
fn lane_fold(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = f(*l, x);
        }
    }
    for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l = f(*l, x);
    }
    lanes.into_iter().fold(init, &f)
}

/// One row of an online softmax over a block of [`KEY_BLOCK`] scores, of which the first
/// `visible` count: [`softmax_step`] on the scores times `scale`, written as
/// bf16 probabilities (zero past `visible`) into `p`; returns the rescale of the row's
/// output. In registers: the four vectors of the row are scaled, reduced to their maximum
/// and sum as trees, exponentiated ([`exp_nonpositive16`], the bits of [`exp_nonpositive`])
/// and rounded to bf16 by `vcvtne2ps2bf16` (round to nearest even, as `bf16::from_f32`, for
/// the normal numbers and zeros that [`exp_nonpositive`] gives). The loops of
/// [`softmax_step`] left a row in scalar pieces. [`AmxQueryBlock`] now runs 16 rows at once
/// ([`softmax_rows16_bf16`]); this row-by-row form is the tests' reference for it.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `p` must hold [`KEY_BLOCK`] values.
#[cfg(test)]
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
unsafe fn softmax_row_bf16(
    row: &[f32; KEY_BLOCK],
    visible: usize,
    scale: f32,
    max: &mut f32,
    sum: &mut f32,
    p: &mut [u16],
) -> f32 {
    assert!(p.len() >= KEY_BLOCK && visible <= KEY_BLOCK);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no AMX outside x86_64 ({row:?} {visible} {scale} {max} {sum} {p:?})");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // Lanes of vector `i` that hold visible scores.
        let masks: [__mmask16; 4] = std::array::from_fn(|i| {
            let n = visible.saturating_sub(LANES * i).min(LANES);
            ((1u32 << n) - 1) as __mmask16
        });
        let below = _mm512_set1_ps(f32::NEG_INFINITY);
        // SAFETY: the row holds four vectors.
        let x: [__m512; 4] = std::array::from_fn(|i| {
            let v = unsafe { _mm512_loadu_ps(row.as_ptr().add(LANES * i)) };
            _mm512_mask_mov_ps(below, masks[i], _mm512_mul_ps(v, _mm512_set1_ps(scale)))
        });
        let block_max = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(x[0], x[1]),
            _mm512_max_ps(x[2], x[3]),
        ));
        let new_max = if block_max > *max { block_max } else { *max };
        let rescale = rescale_factor(*max, new_max);
        let shift = _mm512_set1_ps(new_max);
        let e: [__m512; 4] = std::array::from_fn(|i| {
            _mm512_maskz_mov_ps(masks[i], exp_nonpositive16(_mm512_sub_ps(x[i], shift)))
        });
        let block_sum = _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(e[0], e[1]),
            _mm512_add_ps(e[2], e[3]),
        ));
        *sum = *sum * rescale + block_sum;
        *max = new_max;
        for half in 0..2 {
            // The low 16 bf16 from the second operand.
            let bits: __m512i =
                unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(e[2 * half + 1], e[2 * half])) };
            // SAFETY: `p` holds 64 values (asserted).
            unsafe { _mm512_storeu_si512(p.as_mut_ptr().add(32 * half).cast(), bits) };
        }
        rescale
    }
}

/// `softmax_row_bf16` (the tests' row-by-row reference) on the 16 rows of an AMX tile of
/// scores at once, with the same bits
/// (maxima, rescales, sums and probabilities): row `r` sees `visible[r]` of its keys (none
/// for a padding row or a row before its first key, whose max and sum stay and whose
/// probabilities are zeros), `max` and `sum` are the rows' running values, and the rows'
/// rescales come back. One row at a time, each row waited on its own chain of dependent
/// steps (two horizontal reductions, a scalar `exp`, the broadcast back); here the 16 rows'
/// maxima and sums are reduced together by [`rows_reduced`], the rescales are one vector,
/// and the rows' exponentials run side by side.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
unsafe fn softmax_rows16_bf16(
    scores: &ScoreRows,
    visible: [usize; 16],
    scale: f32,
    max: &mut [f32; 16],
    sum: &mut [f32; 16],
    probs: &mut ProbabilityRows,
) -> [f32; 16] {
    debug_assert!(visible.iter().all(|&v| v <= KEY_BLOCK));
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "no AMX outside x86_64 ({visible:?} {scale} {max:?} {sum:?} {:?})",
        (&scores.0, &probs.0)
    );
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // Plain loops over the rows rather than `array::from_fn`: its closures were not
        // inlined, and their vectors went through memory.
        // Lanes of each of a row's four vectors that hold visible scores.
        let mut masks = [[0 as __mmask16; 4]; 16];
        for (row, &seen) in masks.iter_mut().zip(&visible) {
            for (i, mask) in row.iter_mut().enumerate() {
                let n = seen.saturating_sub(LANES * i).min(LANES);
                *mask = ((1u32 << n) - 1) as __mmask16;
            }
        }
        let below = _mm512_set1_ps(f32::NEG_INFINITY);
        let scale = _mm512_set1_ps(scale);
        // Row `r`'s scaled visible scores, -inf past them, into `x`.
        macro_rules! scaled {
            ($r:expr, $x:ident) => {
                let mut $x = [below; 4];
                for (i, v) in $x.iter_mut().enumerate() {
                    // SAFETY: a row holds four vectors.
                    let loaded = unsafe { _mm512_loadu_ps(scores.0[$r].as_ptr().add(LANES * i)) };
                    *v = _mm512_mask_mov_ps(below, masks[$r][i], _mm512_mul_ps(loaded, scale));
                }
            };
        }
        let mut row_max = [below; 16];
        for (r, m) in row_max.iter_mut().enumerate() {
            scaled!(r, x);
            *m = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
        }
        let block_max = rows_reduced(row_max, |a, b| _mm512_max_ps(a, b));
        // SAFETY: 16 values each.
        let old = unsafe { _mm512_loadu_ps(max.as_ptr()) };
        // `block > old ? block : old` lane by lane, as the scalar comparison (`vmaxps`
        // gives its second operand where either is NaN).
        let new = _mm512_max_ps(block_max, old);
        // [`rescale_factor`]: 0 where there was no maximum yet, else exactly 1 where it
        // stays, else `exp(old - new)`.
        let rescale = _mm512_mask_mov_ps(
            _mm512_mask_mov_ps(
                exp_nonpositive16(_mm512_sub_ps(old, new)),
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, old),
                _mm512_set1_ps(1.0),
            ),
            _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(old, below),
            _mm512_setzero_ps(),
        );
        // SAFETY: 16 values.
        unsafe { _mm512_storeu_ps(max.as_mut_ptr(), new) };
        let mut row_sums = [below; 16];
        for (r, row_sum) in row_sums.iter_mut().enumerate() {
            scaled!(r, x);
            let shift = _mm512_set1_ps(max[r]);
            let mut e = [below; 4];
            for ((e, &x), &mask) in e.iter_mut().zip(&x).zip(&masks[r]) {
                *e = _mm512_maskz_mov_ps(mask, exp_nonpositive16(_mm512_sub_ps(x, shift)));
            }
            for half in 0..2 {
                // The low 16 bf16 from the second operand.
                let bits: __m512i =
                    unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(e[2 * half + 1], e[2 * half])) };
                // SAFETY: row `r` of `probs` holds 64 values.
                unsafe {
                    _mm512_storeu_si512(probs.0.as_mut_ptr().add(r * KEY_BLOCK + 32 * half).cast(), bits)
                };
            }
            *row_sum = _mm512_add_ps(_mm512_add_ps(e[0], e[1]), _mm512_add_ps(e[2], e[3]));
        }
        let block_sum = rows_reduced(row_sums, |a, b| _mm512_add_ps(a, b));
        // SAFETY: 16 values each.
        unsafe {
            let total = _mm512_loadu_ps(sum.as_ptr());
            _mm512_storeu_ps(
                sum.as_mut_ptr(),
                _mm512_add_ps(_mm512_mul_ps(total, rescale), block_sum),
            );
        }
        let mut out = [0f32; 16];
        // SAFETY: 16 values.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), rescale) };
        out
    }
}

/// Lane `r` of the result is `rows[r]`'s 16 lanes folded by `op` in the order of
/// `_mm512_reduce_add_ps` (lane `i` with lane `i + 8`, then `i + 4`, `i + 2`, `i + 1`), so
/// that a sum has the bits of that reduction; the rows are reduced together, four steps of
/// shuffles for all 16 instead of four per row.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn rows_reduced(
    rows: [std::arch::x86_64::__m512; 16],
    op: impl Fn(std::arch::x86_64::__m512, std::arch::x86_64::__m512) -> std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Halves (lanes i and i + 8): rows 2a and 2a + 1 side by side, eight lanes each.
    let mut halves = [rows[0]; 8];
    for (a, half) in halves.iter_mut().enumerate() {
        let (x, y) = (rows[2 * a], rows[2 * a + 1]);
        *half = op(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        );
    }
    // Quarters (i and i + 4): 128-bit lane k of `quarters[c]` is row 4c + k's four values.
    let mut quarters = [rows[0]; 4];
    for (c, quarter) in quarters.iter_mut().enumerate() {
        let (x, y) = (halves[2 * c], halves[2 * c + 1]);
        *quarter = op(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        );
    }
    // Pairs (i and i + 2): lane k holds rows k, k + 4 (first) or k + 8, k + 12 (second),
    // two values each.
    let mut pairs = [rows[0]; 2];
    for (h, pair) in pairs.iter_mut().enumerate() {
        let (x, y) = (quarters[2 * h], quarters[2 * h + 1]);
        *pair = op(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y));
    }
    // Last step (i and i + 1): 128-bit lane k holds rows k, k + 4, k + 8, k + 12.
    let (x, y) = (pairs[0], pairs[1]);
    let folded = op(_mm512_shuffle_ps::<0x88>(x, y), _mm512_shuffle_ps::<0xDD>(x, y));
    // Row r = 4m + k sits in lane 4k + m.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, folded)
}

/// [`exp_nonpositive`] on 16 lanes, step for step (the same bits, NaN included).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_nonpositive16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    // `vmaxps a, b` gives `b` where either is NaN: NaN stays NaN, as in the scalar clamp.
    let x = _mm512_max_ps(set(EXP_FLOOR), x);
    let shifted = _mm512_add_ps(_mm512_mul_ps(x, set(std::f32::consts::LOG2_E)), set(EXP_ROUND));
    let n = _mm512_sub_ps(shifted, set(EXP_ROUND));
    let r = _mm512_fmadd_ps(n, set(-EXP_LN2_LO), _mm512_fmadd_ps(n, set(-EXP_LN2_HI), x));
    let mut p = set(EXP_TAYLOR[0]);
    for c in &EXP_TAYLOR[1..] {
        p = _mm512_fmadd_ps(p, r, set(*c));
    }
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_castps_si512(shifted),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(two_n))
}

/// Asks for the cache lines of the first `len` values of `values` (fewer if it is shorter),
/// into L1, where the CPU has the instruction.
#[inline(always)]
fn prefetch_lines(values: &[u32], len: usize) {
    let values = &values[..len.min(values.len())];
    for line in values.chunks(16) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch reads nothing the program sees; the address is inside `values`.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = line;
    }
}

// The constants of [`exp_nonpositive`], shared with its 16-lane form [`exp_nonpositive16`]
// so that both give the same bits.
/// Inputs below this clamp to it: `exp(-87)` is still a normal f32.
const EXP_FLOOR: f32 = -87.0;
/// ln 2 in two parts: `n * EXP_LN2_HI` is exact for |n| < 2^11.
const EXP_LN2_HI: f32 = 0.693_145_75;
const EXP_LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
const EXP_ROUND: f32 = 12_582_912.0;
/// The Taylor coefficients of `e^r` from degree 7 down to 0, for Horner's scheme.
const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `exp(x)` for `x <= 0` (a score minus its row's maximum) in plain arithmetic that
/// vectorizes: `2^n * e^r` with `n` the nearest integer to `x / ln 2` and `|r| <= ln 2 / 2`,
/// `e^r` by its Taylor series to degree 7 (truncation below 6e-9 relative, under f32's
/// rounding). Below -87 the result is `exp(-87)` (about 1.6e-38, nothing next to the row's
/// maximum term, 1); NaN stays NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = if x < EXP_FLOOR { EXP_FLOOR } else { x };
    let shifted = x * std::f32::consts::LOG2_E + EXP_ROUND;
    let n = shifted - EXP_ROUND;
    let r = n.mul_add(-EXP_LN2_LO, n.mul_add(-EXP_LN2_HI, x));
    let mut p = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    // `n` lies in [-126, 0] and sits in the low bits of `shifted` (1.5 * 2^23 + n, whose
    // bits are 0x4B40_0000 + n): shifted left by 23 past those high bits, `n + 127` is the
    // exponent field of 2^n, a normal f32 (no float-to-integer conversion, which would not
    // vectorize as simply).
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention;
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::dispatch::repeat_kv;

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let a: Vec<f32> = a.into_data().convert::<f32>().try_into_vec().expect("f32");
        let b: Vec<f32> = b.into_data().convert::<f32>().try_into_vec().expect("f32");
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// The reference: Burn's own attention, each key/value head repeated for its query heads
    /// (HF's `repeat_kv`) and the mask expanded to every head.
    fn burn_attention(
        q: &Tensor<4>,
        k: &Tensor<4>,
        v: &Tensor<4>,
        mask: Option<&Tensor<4, Bool>>,
        options: AttentionModuleOptions,
    ) -> Tensor<4> {
        let [b, heads, t, _] = q.dims();
        let [_, kv_heads, total, _] = k.dims();
        let rep = heads / kv_heads;
        let mask = mask.map(|m| m.clone().expand([b, heads, t, total]));
        attention(
            q.clone(),
            repeat_kv(k.clone(), rep),
            repeat_kv(v.clone(), rep),
            mask,
            None,
            options,
        )
    }

    /// Each SIMD kernel the CPU runs with 1, 2, 4 and 8 query heads per task (those that
    /// divide `rep`) and with the automatic choice: the same bits; and within `tol` of the
    /// plain loop `twin` (only the order of the sums and the exponential differ; the result is
    /// then cast to the dtype, so bf16/f16 may land one rounding apart).
    #[allow(clippy::too_many_arguments)]
    fn simd_kernels_agree(
        q: &Tensor<4>,
        k: &Tensor<4>,
        v: &Tensor<4>,
        mask: Option<&Tensor<4, Bool>>,
        options: &AttentionModuleOptions,
        rep: usize,
        twin: &Tensor<4>,
        tol: f32,
    ) {
        let bits = |t: Tensor<4>| -> Vec<u32> {
            let values: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("f32");
            values.iter().map(|v| v.to_bits()).collect()
        };
        for path in Simd::reachable_simd() {
            let one = decode_attention_with(q, k, v, mask, options, path, Some(1)).expect("applies");
            let diff = max_diff(one.clone(), twin.clone());
            assert!(diff <= tol, "{path:?} against the plain loop, rep {rep}: {diff}");
            let one = bits(one);
            if path == Simd::best() {
                let auto = bits(decode_attention(q, k, v, mask, options).expect("applies"));
                assert_eq!(one, auto, "{path:?} automatic grouping, rep {rep}");
            }
            for group in [2, 4, 8].into_iter().filter(|g| rep.is_multiple_of(*g)) {
                let grouped =
                    decode_attention_with(q, k, v, mask, options, path, Some(group)).expect("applies");
                assert_eq!(one, bits(grouped), "{path:?} {group} heads per task, rep {rep}");
            }
        }
    }

    /// The eight-lane sums against the one-register sum, on values of many magnitudes (so that
    /// another order of additions rounds differently).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn eight_lane_sums_have_the_bits_of_the_reduction() {
        use std::arch::x86_64::*;
        if !Simd::Avx2.runs_here() {
            return;
        }
        let value = |i: usize| {
            let x = ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5;
            x * 10f32.powi((i % 9) as i32 - 4)
        };
        for trial in 0..64 {
            let values: Vec<f32> = (0..64).map(|i| value(i + trial * 64)).collect();
            // SAFETY: the CPU has AVX2 (checked above); 8 registers of 8 values.
            let (sums, each) = unsafe {
                let v: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(values[j * 8..].as_ptr()));
                let mut sums = [0f32; 8];
                _mm256_storeu_ps(sums.as_mut_ptr(), lane_sums8(&v));
                (sums, v.map(|r| sum8(r)))
            };
            for j in 0..8 {
                let lanes = &values[j * 8..][..8];
                let written = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
                    + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
                assert_eq!(
                    sums[j].to_bits(),
                    each[j].to_bits(),
                    "trial {trial}, register {j}"
                );
                assert_eq!(
                    each[j].to_bits(),
                    written.to_bits(),
                    "trial {trial}, register {j}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lane_sums_have_the_bits_of_the_reduction() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // Values of many magnitudes, so that another order of additions rounds differently.
        let value = |i: usize| {
            let x = ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5;
            x * 10f32.powi((i % 9) as i32 - 4)
        };
        for trial in 0..64 {
            let values: Vec<f32> = (0..256).map(|i| value(i + trial * 256)).collect();
            // SAFETY: the CPU has AVX-512 F (checked above); 16 registers of 16 values.
            let (sums, each) = unsafe {
                let v: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(values[j * 16..].as_ptr()));
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), lane_sums16(&v));
                (sums, v.map(|r| _mm512_reduce_add_ps(r)))
            };
            for j in 0..16 {
                assert_eq!(
                    sums[j].to_bits(),
                    each[j].to_bits(),
                    "trial {trial}, register {j}"
                );
            }
        }
    }

    /// Against Burn's own attention (with HF's `repeat_kv` for GQA) and the plain loop:
    /// causal, masked (one mask for all heads, or one per head together with the causal
    /// limit), 1 to 3 query rows, head sizes 16/24/32/48/64/128 (every AVX-512 and AVX2 head
    /// width, and two that are not), f32/bf16/f16, keys and values given as a narrowed view of a larger
    /// buffer (the KV cache's capacity), fully masked rows.
    #[test]
    fn decode_attention_equals_burn() {
        let device = burn::tensor::Device::flex();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (case, &(b, heads, kv_heads, t, total, d)) in [
                (1, 4, 4, 1, 9, 16),
                (2, 8, 2, 3, 21, 24),
                (3, 6, 3, 1, 40, 64),
                (1, 8, 2, 2, 37, 128),
                (2, 4, 2, 1, 70, 32),
                (2, 4, 4, 2, 33, 64),
                // Eight query heads per key/value head: the largest grouping.
                (1, 16, 2, 1, 45, 64),
                // A multiple of 16 that no SIMD kernel takes: the plain loop, one head per task
                // (grouping heads there once computed only the first of each group).
                (1, 8, 2, 1, 30, 48),
            ]
            .iter()
            .enumerate()
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
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                let twin_tol = match dtype {
                    DType::F32 => 2e-6,
                    DType::F16 => 4e-3,
                    _ => 3.2e-2,
                };
                // Causal.
                let options = AttentionModuleOptions {
                    is_causal: true,
                    ..Default::default()
                };
                let ours = decode_attention(&q, &k, &v, None, &options).expect("applies");
                let twin =
                    decode_attention_with(&q, &k, &v, None, &options, Simd::Plain, None).expect("applies");
                simd_kernels_agree(&q, &k, &v, None, &options, heads / kv_heads, &twin, twin_tol);
                let burn = burn_attention(&q, &k, &v, None, options);
                let diff = max_diff(ours, burn);
                assert!(
                    diff <= tol,
                    "{dtype:?} causal {b}x{heads}/{kv_heads}x{t}x{total}x{d}: {diff}"
                );
                // A padding mask over keys: one for all heads (`[b, 1, t, total]`) on every
                // second shape, one per head (`[b, heads, t, total]`, with the causal limit
                // as well) on the others. Every second key of sequence 0's first query row is
                // excluded (from key `h % 2` with a mask per head), and the last sequence's
                // last query row is fully masked where there is more than one row.
                let per_head = case % 2 == 1;
                let mh = if per_head { heads } else { 1 };
                let at = |bi: usize, hh: usize, i: usize, j: usize| ((bi * mh + hh) * t + i) * total + j;
                let mut m = vec![false; b * mh * t * total];
                for hh in 0..mh {
                    for j in (hh % 2..total).step_by(2) {
                        m[at(0, hh, 0, j)] = true;
                    }
                    if b * t > 1 {
                        for j in 0..total {
                            m[at(b - 1, hh, t - 1, j)] = true;
                        }
                    }
                }
                let mask = Tensor::<4, Bool>::from_data(TensorData::new(m, [b, mh, t, total]), &device);
                let options = AttentionModuleOptions {
                    is_causal: per_head,
                    ..Default::default()
                };
                let ours = decode_attention(&q, &k, &v, Some(&mask), &options).expect("applies");
                let twin = decode_attention_with(&q, &k, &v, Some(&mask), &options, Simd::Plain, None)
                    .expect("applies");
                simd_kernels_agree(
                    &q,
                    &k,
                    &v,
                    Some(&mask),
                    &options,
                    heads / kv_heads,
                    &twin,
                    twin_tol,
                );
                let burn = burn_attention(&q, &k, &v, Some(&mask), options);
                let diff = max_diff(ours, burn);
                assert!(
                    diff <= tol,
                    "{dtype:?} masked {b}x{heads}/{kv_heads}x{t}x{total}x{d}: {diff}"
                );
            }
        }
        // No keys at all (not causal): every kernel gives zeros, as a fully masked row.
        let q = Tensor::<4>::random([1, 4, 1, 16], Distribution::Normal(0.0, 1.0), &device);
        let none = Tensor::<4>::zeros([1, 2, 0, 16], &device);
        for path in std::iter::once(Simd::Plain).chain(Simd::reachable_simd()) {
            let out = decode_attention_with(
                &q,
                &none,
                &none,
                None,
                &AttentionModuleOptions::default(),
                path,
                None,
            )
            .expect("applies");
            assert_eq!(out.dims(), [1, 4, 1, 16]);
            let values: Vec<f32> = out.into_data().convert::<f32>().try_into_vec().expect("f32");
            assert!(
                values.iter().all(|&v| v == 0.0),
                "{path:?} without keys: {values:?}"
            );
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

    /// Against Burn's own attention (HF's `repeat_kv` for GQA): causal with and without
    /// earlier cached keys, not causal, row counts with and without whole query and key
    /// blocks (and every row step of the AVX-512 kernel), head dims 16/24/64/128,
    /// f32/bf16/f16, keys and values as a narrowed view of a larger buffer; a mask tensor,
    /// a softcap or few rows are not this kernel's.
    #[test]
    fn prefill_attention_equals_burn() {
        let device = burn::tensor::Device::flex();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(b, heads, kv_heads, t, total, d, causal) in &[
                (1, 2, 2, 17, 17, 16, true),
                (2, 4, 2, 70, 70, 24, true),
                (1, 4, 1, 33, 100, 64, true),
                (2, 3, 3, 65, 65, 64, false),
                // Last query blocks of 7 and 30 rows: four-, two- and one-row steps of 64.
                (1, 3, 1, 39, 60, 64, true),
                (1, 2, 2, 62, 62, 64, false),
                (1, 2, 2, 40, 130, 16, false),
                (1, 2, 1, 35, 35, 128, true),
                (1, 2, 2, 19, 50, 128, false),
            ] {
                let (q, k, v) = prefill_inputs([b, heads, kv_heads, t, total, d], dtype);
                let options = AttentionModuleOptions {
                    is_causal: causal,
                    ..Default::default()
                };
                let ours = prefill_attention(&q, &k, &v, None, &options).expect("applies");
                // Every kernel reachable here (AMX for bf16 with d 64 or 128) keeps the dtype.
                assert_eq!(ours.dtype(), dtype, "{b}x{heads}/{kv_heads}x{t}x{total}x{d}");
                let burn = burn_attention(&q, &k, &v, None, options);
                let diff = max_diff(ours, burn);
                let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
                assert!(
                    diff <= tol,
                    "{dtype:?} causal {causal} {b}x{heads}/{kv_heads}x{t}x{total}x{d}: {diff}"
                );
            }
        }
        let q = Tensor::<4>::zeros([1, 2, 20, 8], &device);
        let k = Tensor::<4>::zeros([1, 2, 20, 8], &device);
        let mask = Tensor::<4, Bool>::from_data(TensorData::new(vec![false; 400], [1, 1, 20, 20]), &device);
        let options = AttentionModuleOptions::default();
        assert!(prefill_attention(&q, &k, &k, Some(&mask), &options).is_none());
        let softcap = AttentionModuleOptions {
            softcap: Some(30.0),
            ..Default::default()
        };
        assert!(prefill_attention(&q, &k, &k, None, &softcap).is_none());
        let few = Tensor::<4>::zeros([1, 2, MAX_QUERY_ROWS, 8], &device);
        assert!(prefill_attention(&few, &k, &k, None, &options).is_none());
    }

    /// Random queries `[b, heads, t, d]`, keys and values `[b, kv_heads, total, d]` in
    /// `dtype`, the keys and values narrowed from a buffer of 3 more positions (so that
    /// they are read with strides, as a KV cache is).
    fn prefill_inputs(
        [b, heads, kv_heads, t, total, d]: [usize; 6],
        dtype: DType,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let device = burn::tensor::Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, heads, t, d], normal, &device).cast(dtype);
        let buffer = || {
            Tensor::<4>::random([b, kv_heads, total + 3, d], normal, &device)
                .cast(dtype)
                .slice([0..b, 0..kv_heads, 0..total, 0..d])
        };
        (q, buffer(), buffer())
    }

    /// Every key-block kernel this CPU has gives the bits of the row-by-row loop: head sizes
    /// 16, 32, 64 and 128, causal (with earlier keys) and not, row counts that end on every
    /// row step (6 down to 1 rows with AVX2; 4, 2, 1 with AVX-512), f32 and bf16 keys and
    /// values in a narrowed view.
    #[test]
    fn prefill_kernels_have_the_bits_of_the_row_loop() {
        let kernels = Simd::reachable_simd();
        if kernels.is_empty() {
            eprintln!("no SIMD key-block kernel on this CPU: only the row loop runs");
        }
        let bits = |t: Tensor<4>| -> Vec<u32> {
            let values: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("f32");
            values.iter().map(|v| v.to_bits()).collect()
        };
        for dtype in [DType::F32, DType::BF16] {
            // AVX2 (blocks of 96 rows, steps of 6): last steps of 5 (47 rows), 1 (61), 6 (36),
            // 2 (98 = 96 + 2), 3 (33), 4 (100 = 96 + 4). AVX-512 (blocks of 32, steps of 4):
            // 47 = 32 + 15 rows (4, 4, 4, 2, 1), 98 = 3 x 32 + 2, 100 = 3 x 32 + 4.
            for &(b, heads, kv_heads, t, total, d, causal) in &[
                (1, 2, 1, 47, 47, 64, true),
                (2, 2, 2, 61, 61, 128, false),
                (1, 1, 1, 36, 100, 32, true),
                (1, 2, 2, 98, 130, 64, true),
                (1, 2, 1, 33, 33, 16, false),
                (1, 2, 2, 100, 100, 128, true),
            ] {
                let (q, k, v) = prefill_inputs([b, heads, kv_heads, t, total, d], dtype);
                let options = AttentionModuleOptions {
                    is_causal: causal,
                    ..Default::default()
                };
                let run = |kernel| {
                    prefill_attention_with(&q, &k, &v, None, &options, kernel, false).expect("applies")
                };
                let rows = bits(run(Simd::Plain));
                for &kernel in &kernels {
                    assert!(
                        rows == bits(run(kernel)),
                        "{kernel:?} {dtype:?} causal {causal} {b}x{heads}/{kv_heads}x{t}x{total}x{d}"
                    );
                }
            }
        }
    }

    /// bf16 attention on AMX tiles against the AVX-512 kernel's f32 FMAs: the scores are the
    /// same exact products summed in another order and scaled after the sum, the
    /// probabilities are rounded to bf16 before the values, so the outputs agree within two
    /// bf16 steps of the largest; head sizes 64 and 128, causal (with earlier keys) and not,
    /// GQA, row counts past whole 16-row tiles and key counts past whole 64-key blocks.
    #[test]
    fn amx_attention_agrees_with_the_f32_kernel() {
        if !Simd::Avx512.runs_here() || !amx::amx_bf16_available() {
            eprintln!("no AMX-BF16 on this CPU: skipped");
            return;
        }
        let values =
            |t: Tensor<4>| -> Vec<f32> { t.into_data().convert::<f32>().try_into_vec().expect("f32") };
        for &(b, heads, kv_heads, t, total, d, causal) in &[
            (1, 2, 1, 47, 47, 64, true),
            (2, 2, 2, 61, 61, 128, false),
            (1, 4, 2, 17, 100, 64, true),
            (1, 2, 2, 98, 130, 64, false),
            (1, 2, 2, 100, 100, 128, true),
        ] {
            let (q, k, v) = prefill_inputs([b, heads, kv_heads, t, total, d], DType::BF16);
            let options = AttentionModuleOptions {
                is_causal: causal,
                ..Default::default()
            };
            let run = |amx| {
                let out =
                    prefill_attention_with(&q, &k, &v, None, &options, Simd::Avx512, amx).expect("applies");
                // The layers add the output to bf16 residuals: another dtype fails there.
                assert_eq!(out.dtype(), DType::BF16, "amx {amx}");
                values(out)
            };
            let (fma, tiles) = (run(false), run(true));
            let diff = fma
                .iter()
                .zip(&tiles)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let largest = fma.iter().fold(0f32, |m, x| m.max(x.abs()));
            // Two bf16 steps of the largest output (2^-7 each, relative).
            assert!(
                diff <= largest / 64.0,
                "causal {causal} {b}x{heads}/{kv_heads}x{t}x{total}x{d}: {diff} (largest {largest})"
            );
        }
    }

    /// Whether this CPU has AVX-512 F, BW and BF16, which the AMX kernel's vector pieces need;
    /// says so when a test skips for want of them.
    fn avx512_bf16_here() -> bool {
        let here = Simd::Avx512.runs_here() && super::super::bf16_dot::bf16_dot_available();
        if !here {
            eprintln!("no AVX-512 BF16 on this CPU: skipped");
        }
        here
    }

    /// The AMX kernel's packing in registers ([`key_tiles16`], [`value_tiles2`]) writes the
    /// bits of the value-by-value packing, from rows further apart than `d`.
    #[test]
    fn amx_tiles_packed_in_registers_match_the_scalar_packing() {
        if !avx512_bf16_here() {
            return;
        }
        for d in [64, 128] {
            let (keys, step) = (64, d + 24);
            let rows: Vec<bf16> = (0..keys * step)
                .map(|i| bf16::from_f32(((i * 7919) % 1013) as f32 / 64.0 - 8.0))
                .collect();
            let row = |j: usize| &rows[j * step..j * step + d];
            let len = keys * d / 2;
            let (mut want, mut got) = (vec![0u32; len], vec![0u32; len]);
            for j in 0..keys {
                key_tiles(row(j), j, d, &mut want);
            }
            for j0 in (0..keys).step_by(16) {
                // SAFETY: AVX-512 checked above; 16 rows of `d` values `step` apart from `j0`.
                unsafe { key_tiles16(rows[j0 * step..].as_ptr(), step, j0, d, &mut got) };
            }
            assert_eq!(want, got, "keys, d {d}");
            let (mut want, mut got) = (vec![0u16; 2 * len], vec![0u16; 2 * len]);
            for j in 0..keys {
                value_tiles(row(j), j, d, &mut want);
            }
            for j in (0..keys).step_by(2) {
                let (even, odd) = (row(j).as_ptr(), row(j + 1).as_ptr());
                // SAFETY: AVX-512 BW checked above; both rows hold `d` values.
                unsafe { value_tiles2(even, odd, j, d, &mut got) };
            }
            assert_eq!(want, got, "values, d {d}");
        }
    }

    /// [`softmax_row_bf16`] is [`softmax_step`] on the scaled visible scores with the
    /// probabilities rounded to bf16: the same maxima, rescales and probability bits, sums
    /// within f32 rounding (the order of the additions differs), over blocks whose maximum
    /// rises, stays and falls, for every count of visible keys.
    #[test]
    fn softmax_row_bf16_is_softmax_step_rounded() {
        if !avx512_bf16_here() {
            return;
        }
        let scale = 0.125;
        for visible in 1..=KEY_BLOCK {
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
            let (mut want_max, mut want_sum) = (f32::NEG_INFINITY, 0f32);
            for (block, offset) in [0.0f32, 9.0, 9.0, -30.0].into_iter().enumerate() {
                let row: [f32; KEY_BLOCK] =
                    std::array::from_fn(|j| ((j * 37 + block * 11) % 61) as f32 * 0.7 - 20.0 + offset);
                let mut p = vec![0xFFFFu16; KEY_BLOCK];
                // SAFETY: AVX-512 F, BW and BF16 checked above; `p` holds a block.
                let rescale = unsafe { softmax_row_bf16(&row, visible, scale, &mut max, &mut sum, &mut p) };
                let mut scores: Vec<f32> = row[..visible].iter().map(|x| x * scale).collect();
                let want_rescale = softmax_step(&mut scores, &mut want_max, &mut want_sum);
                assert_eq!(
                    rescale.to_bits(),
                    want_rescale.to_bits(),
                    "visible {visible} block {block}"
                );
                assert_eq!(
                    max.to_bits(),
                    want_max.to_bits(),
                    "visible {visible} block {block}"
                );
                assert!((sum - want_sum).abs() <= 1e-6 * want_sum, "{sum} vs {want_sum}");
                let want: Vec<u16> = scores.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                assert_eq!(p[..visible], want[..], "visible {visible} block {block}");
                assert!(
                    p[visible..].iter().all(|&b| b == 0),
                    "zeros past the visible keys"
                );
            }
        }
    }

    /// [`softmax_rows16_bf16`] has the bits of [`softmax_row_bf16`] run on each of its rows
    /// (maxima, rescales, sums, probabilities), over blocks whose maxima rise, stay and fall,
    /// with rows that see every count of keys from none (a row before its first key, a
    /// padding row) to all, so that every lane of the joint reductions is checked; and a last
    /// pattern of special scores where `vmaxps`'s operand order shows (NaNs at the lanes the
    /// reductions pair, ties of +0 and -0, +inf, a row of -inf, a running maximum that turns
    /// NaN).
    #[test]
    fn softmax_rows16_bf16_has_the_bits_of_the_row_loop() {
        if !avx512_bf16_here() {
            return;
        }
        let scale = 0.125;
        let specials = 9;
        for pattern in 0..=specials {
            let (mut max, mut sum) = ([f32::NEG_INFINITY; 16], [0f32; 16]);
            let (mut want_max, mut want_sum) = ([f32::NEG_INFINITY; 16], [0f32; 16]);
            for (block, offset) in [0.0f32, 9.0, 9.0, -30.0, 4.0].into_iter().enumerate() {
                // Causal-like counts that grow with the row and the block, some rows
                // without keys until a later block, the last rows padding in some patterns.
                let visible: [usize; 16] = std::array::from_fn(|r| {
                    if pattern == specials {
                        KEY_BLOCK
                    } else if pattern % 3 == 2 && r >= 13 {
                        0
                    } else {
                        ((r * 7 + pattern * 5 + block * 13) % 67)
                            .saturating_sub(3 * (r % 2))
                            .min(KEY_BLOCK)
                    }
                });
                let mut scores = ScoreRows([[0f32; KEY_BLOCK]; 16]);
                for (r, row) in scores.0.iter_mut().enumerate() {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = ((j * 37 + block * 11 + r * 29 + pattern) % 61) as f32 * 0.7 - 20.0
                            + offset
                            + r as f32 * 0.5;
                    }
                }
                if pattern == specials {
                    let rows = &mut scores.0;
                    // A NaN reaches a row's maximum from the second operand of `vmaxps`
                    // (the last vector of the row): at the lanes that the reductions pair.
                    for j in [48, 55, 56, 63, 40] {
                        rows[1][j] = f32::NAN;
                    }
                    // +0 and -0 in the lanes that each step of the reductions pairs.
                    for (r, stride) in [(2, 8), (6, 4), (7, 2), (8, 1)] {
                        for (j, x) in rows[r].iter_mut().enumerate() {
                            *x = if j / stride % 2 == 0 { 0.0 } else { -0.0 };
                        }
                    }
                    if block == 1 {
                        rows[3][5] = f32::INFINITY;
                    }
                    rows[4].fill(f32::NEG_INFINITY);
                    if block == 2 {
                        rows[5][33] = f32::NAN;
                    }
                }
                let mut probs = ProbabilityRows([0xFFFF; 16 * KEY_BLOCK]);
                // SAFETY: AVX-512 F, BW and BF16 checked above.
                let rescale =
                    unsafe { softmax_rows16_bf16(&scores, visible, scale, &mut max, &mut sum, &mut probs) };
                for r in 0..16 {
                    let mut p = vec![0xFFFFu16; KEY_BLOCK];
                    // SAFETY: as above; `p` holds a block.
                    let want_rescale = unsafe {
                        softmax_row_bf16(
                            &scores.0[r],
                            visible[r],
                            scale,
                            &mut want_max[r],
                            &mut want_sum[r],
                            &mut p,
                        )
                    };
                    let at = format!("pattern {pattern} block {block} row {r} visible {}", visible[r]);
                    assert_eq!(rescale[r].to_bits(), want_rescale.to_bits(), "{at}");
                    assert_eq!(max[r].to_bits(), want_max[r].to_bits(), "{at}");
                    assert_eq!(sum[r].to_bits(), want_sum[r].to_bits(), "{at}");
                    assert_eq!(probs.0[r * KEY_BLOCK..][..KEY_BLOCK], p[..], "{at}");
                }
            }
            assert!(sum.iter().any(|&x| x > 0.0), "some rows saw keys");
        }
    }

    /// [`exp_nonpositive16`] has the bits of [`exp_nonpositive`], clamp and NaN included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_nonpositive16_has_the_scalar_bits() {
        if !Simd::Avx512.runs_here() {
            eprintln!("no AVX-512 on this CPU: skipped");
            return;
        }
        use std::arch::x86_64::{_mm512_loadu_ps, _mm512_storeu_ps};
        let mut xs: Vec<f32> = (0..4096).map(|i| -100.0 * i as f32 / 4096.0).collect();
        xs.extend([
            0.0,
            -0.0,
            -87.0,
            -87.5,
            f32::NEG_INFINITY,
            f32::NAN,
            -1e-30,
            -88.7,
        ]);
        xs.resize(xs.len().next_multiple_of(16), -3.25);
        for chunk in xs.chunks_exact(16) {
            let mut out = [0f32; 16];
            // SAFETY: AVX-512 F checked above; 16 values in and out.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    exp_nonpositive16(_mm512_loadu_ps(chunk.as_ptr())),
                )
            };
            for (&x, &y) in chunk.iter().zip(&out) {
                let want = exp_nonpositive(x);
                assert!(
                    want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                    "{x}: {y} vs {want}"
                );
            }
        }
    }

    /// The vectorizable exponential within 2 f32 roundings of `f32::exp` over [-87, 0], and
    /// NaN in, NaN out.
    #[test]
    fn exp_nonpositive_matches_std() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 2.5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
