//! Many-row bf16 x bf16 products (prefill, image encode) with AVX-512 BF16 `vdpbf16ps`.
//!
//! Without this, a bf16 prefill widens every weight to f32 on every call and runs an f32
//! gemm: twice the bytes and half the multiplies per instruction of what the CPU offers.
//! Here the weight is packed once per call, slab by slab, into (row `2p`, row `2p + 1`)
//! pairs of 48 columns (three registers), the activations are read in place as pairs, and
//! an 8-row x 48-column tile of f32 accumulators takes 32 products per instruction, each
//! exact in f32 and added with one rounding as an FMA would, as PyTorch's CPU bf16 gemm
//! accumulates in f32.
//!
//! Every output is the sum over its pairs in order, each pair adding its odd product first
//! (as `vdpbf16ps` does): the result does not depend on the tiling or the thread count,
//! and [`matmul_bf16_gemm_reference`] computes the same bits in plain Rust.
//!
//! Where the CPU has AMX ([`super::amx`]), the same packed pairs (in 32-column tiles) feed
//! `tdpbf16ps` tiles instead: 16 times the products per instruction. Its sums are f32 too
//! but grouped by the hardware, so they differ from the plain code's in the last bits.

use std::mem::MaybeUninit;

use burn::tensor::{bf16, f16};
use rayon::prelude::*;

use super::amx;
#[cfg(target_arch = "x86_64")]
use super::bf16_dot::as_bh;
use super::bf16_dot::widen;
use super::packed::PackedWeight;

/// Rows of one register tile.
const TILE_ROWS: usize = 8;
/// Columns of one register tile: three registers of 16 f32 lanes.
const TILE_COLS: usize = 48;
/// Input values per packed weight slab (128 pairs: a 24 KB panel per tile, held in L1).
const SLAB: usize = 256;
/// Columns per rayon task (four tiles; each task packs its own columns once per slab).
const TASK_COLS: usize = 4 * TILE_COLS;
/// Columns of one AMX block: two 16-column weight tiles.
const AMX_COLS: usize = 2 * amx::TILE_ROWS;
/// Rows of one AMX block: two 16-row activation tiles.
const AMX_ROWS: usize = 2 * amx::TILE_ROWS;
/// Pairs per AMX slab: a 1 MB panel for [`AMX_TASK_COLS`] columns, held in L2. Each slab
/// stores the task's sums and the next one loads them again, so fewer, longer slabs move
/// less: 1024 pairs (2048 inputs, the 1.1B model's whole hidden size) against 512 took
/// 10-20% off the 617-row products on a Sapphire Rapids-class Xeon (BENCHMARKS.md, round 26).
const AMX_SLAB_PAIRS: usize = 1024;
/// Columns per rayon task with AMX (eight 32-column blocks).
const AMX_TASK_COLS: usize = 256;

/// The arithmetic that computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Plain Rust (the reference).
    Plain,
    /// AVX-512 BF16 `vdpbf16ps`, 8 x 48 register tiles.
    Vdpbf16ps,
    /// AMX `tdpbf16ps`, 32 x 32 blocks of four tiles.
    Amx,
}

/// How a `[k, n]` weight's values are laid out in its slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightOrder {
    /// `[k, n]` rows: Burn's layout.
    InputMajor,
    /// `[n, k]` rows: a checkpoint's `[out, in]` weight used in place.
    OutputMajor,
}

/// Whether this CPU runs the kernel (AVX-512 F, BW and BF16).
pub fn bf16_gemm_available() -> bool {
    super::bf16_dot::bf16_dot_available()
}

/// `x [m, k] @ w [k, n]` as f32 with the fastest kernel this CPU has: AMX tiles, else
/// `vdpbf16ps`; `None` when it has neither (the caller widens to f32 instead) or the sizes
/// do not match.
pub fn matmul_bf16_gemm(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    match matmul_bf16_amx(x, w, order, m, k, n) {
        Some(out) => Some(out),
        None => matmul_bf16_vdpbf16ps(x, w, order, m, k, n),
    }
}

/// [`matmul_bf16_gemm`] with `vdpbf16ps` only; `None` without AVX-512 BF16.
pub fn matmul_bf16_vdpbf16ps(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    if !bf16_gemm_available() {
        return None;
    }
    run(x, w, order, m, k, n, Kernel::Vdpbf16ps)
}

/// [`matmul_bf16_gemm`] with AMX tiles only; `None` without AMX-BF16 (or with
/// `VIPLLAVA_AMX=0`).
pub fn matmul_bf16_amx(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    // The AMX tasks pack with the AVX-512 transpose too (every AMX CPU has AVX-512).
    if !amx::amx_bf16_available() || !bf16_gemm_available() {
        return None;
    }
    run(x, w, order, m, k, n, Kernel::Amx)
}

/// [`matmul_bf16_amx`] with `bias` (`n` values) added and the sums rounded to bf16 as each
/// 32 x 32 block finishes, from an L1 buffer of the block's last tiles: the bits of rounding the f32 result plus the
/// bias (an f32 add, then to nearest even), without the `m x n` f32 result, its page
/// faults, and the pass over it (1 ms of CLIP-L's 577 x 4096 up projection, 1.5 ms of the
/// 1.1B model's 617 x 5632 ones). `None` as for [`matmul_bf16_amx`], or for a bias of
/// another length.
pub fn matmul_bf16_amx_rounded(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    (m, k, n): (usize, usize, usize),
    bias: Option<&[f32]>,
) -> Option<Vec<bf16>> {
    if w.len() != k * n {
        return None;
    }
    let values = Values::Bf16(w, order);
    amx_rounded(x, Weight { values, k, n }, m, bias)
}

/// [`matmul_bf16_amx_rounded`] for a q8/q4 weight packed for the decode kernels: each task
/// dequantizes its panels from the packed bytes, rounded to bf16
/// ([`PackedWeight::dequantize_tile_pairs`]), instead of reading a dequantized bf16 copy of the
/// whole weight. The panels hold the same pairs, so the result has the bits of
/// [`matmul_bf16_amx_rounded`] on [`PackedWeight::dequantize_bf16`] (`[k, n]` rows) without
/// that copy: its allocation, page faults and second pass over 2 bytes per value (a 7B
/// `--quantize q4` prefill wrote and read 13 GB of them). `None` as for
/// [`matmul_bf16_amx_rounded`].
pub fn matmul_bf16_amx_rounded_packed(
    x: &[bf16],
    w: &PackedWeight,
    m: usize,
    bias: Option<&[f32]>,
) -> Option<Vec<bf16>> {
    let (k, n) = (w.k(), w.n());
    amx_rounded(
        x,
        Weight {
            values: Values::Packed(w),
            k,
            n,
        },
        m,
        bias,
    )
}

/// `x [m, k] @ w [k, n]` for f16 activations and an f16 weight with AMX: f16 prefills
/// (the hub 7B's own dtype) on the bf16 tiles instead of the f32 gemm.
///
/// Every f16 value is the sum of two bf16 values: `hi`, the value rounded to bf16 (to
/// nearest even), and `lo`, the exact rest (at most three significant bits, at most `2^-8`
/// of the value). `x * w` is `x_hi w_hi + x_lo w_hi + x_hi w_lo + x_lo w_lo`; the last term
/// is at most `2^-16` of the product and left out, the other three are exact in f32. The
/// product runs as a bf16 product of three pairs per two inputs ([`F16_BLOCK`] inputs
/// at a time, see [`split_pair`]): 1.5 pairs per input, three times a bf16 product's tile
/// work. The sums are f32, as the f32 gemm's (grouped by the hardware). NaN propagates; an
/// infinite value (its `lo` is zero) can give NaN where f32 gives an infinity, as `inf`
/// meets a zero half of the other operand. `None` without AMX-BF16
/// (or with `VIPLLAVA_AMX=0`), for an empty product, or when the sizes do not match.
pub fn matmul_f16_amx(
    x: &[f16],
    w: &[f16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    if !amx::amx_bf16_available()
        || !bf16_gemm_available()
        || x.len() != m * k
        || w.len() != k * n
        || m == 0
        || k == 0
        || n == 0
    {
        return None;
    }
    let split = split_activations(x, m, k);
    let split_k = 2 * F16_PAIRS * k.div_ceil(F16_BLOCK);
    let pairs = Pairs::of(
        bytemuck::cast_slice(&split),
        m,
        split_k,
        AMX_ROWS,
        amx::TILE_ROWS,
        true,
    );
    drop(split);
    let weight = Weight {
        values: Values::F16Split(w, order),
        k: split_k,
        n,
    };
    Some(amx_f32(&pairs, &weight, m, n))
}

/// Inputs per block of [`matmul_f16_amx`]'s pairs.
const F16_BLOCK: usize = 32;
/// Pairs per block: three 16-pair groups.
const F16_PAIRS: usize = 48;

/// Pair `r` (`< F16_PAIRS`) of a block of [`matmul_f16_amx`], from the [`split_f16`] pairs
/// of the block's inputs (`halves`, zero past the weight's inputs), for activations or for
/// weights:
/// - pairs `0..32`, input `r`: activation `(x_hi, x_lo)`, weight `(w_hi, w_hi)`;
/// - pairs `32..48`, inputs `2j, 2j + 1` (`j = r - 32`): activation `(x_hi, x_hi)` of the
///   two, weight `(w_lo, w_lo)` of the two.
///
/// Their products sum to `x_hi w_hi + x_lo w_hi + x_hi w_lo` over the block's inputs.
fn split_pair(halves: &[u32; F16_BLOCK], r: usize, weight: bool) -> u32 {
    let (hi, lo) = (|v: u32| v & 0xFFFF, |v: u32| v >> 16);
    match (r < F16_BLOCK, weight) {
        (true, false) => halves[r],
        (true, true) => hi(halves[r]) | (hi(halves[r]) << 16),
        (false, false) => {
            let j = r - F16_BLOCK;
            hi(halves[2 * j]) | (hi(halves[2 * j + 1]) << 16)
        }
        (false, true) => {
            let j = r - F16_BLOCK;
            lo(halves[2 * j]) | (lo(halves[2 * j + 1]) << 16)
        }
    }
}

/// `v` as the pair of bf16 values whose sum it is, `hi` in the low half (see
/// [`matmul_f16_amx`]): `hi` is `v` rounded to bf16 (to nearest even), `lo` the exact rest.
fn split_f16(v: f16) -> u32 {
    let f = v.to_f32();
    let hi = super::round_bf16(f).to_bits() as u32;
    // Exact: `f` has 11 significant bits and `hi` its first 8, rounded. Zero for infinities
    // (and NaN, which `hi` keeps).
    let lo = if f.is_finite() {
        f - f32::from_bits(hi << 16)
    } else {
        0.0
    };
    hi | (lo.to_bits() & 0xFFFF_0000)
}

/// The activations of [`matmul_f16_amx`]: per row, [`F16_PAIRS`] pairs per block of
/// [`F16_BLOCK`] inputs ([`split_pair`]), the inputs past `k` zero.
fn split_activations(x: &[f16], m: usize, k: usize) -> Vec<u32> {
    let blocks = k.div_ceil(F16_BLOCK);
    let mut out = vec![0u32; m * blocks * F16_PAIRS];
    let rows = out.par_chunks_mut(blocks * F16_PAIRS).zip(x.par_chunks(k));
    rows.with_min_len((1 << 14) / k.max(1) + 1).for_each(|(out, xs)| {
        for (b, out) in out.chunks_exact_mut(F16_PAIRS).enumerate() {
            let inputs = &xs[b * F16_BLOCK..xs.len().min((b + 1) * F16_BLOCK)];
            #[cfg(target_arch = "x86_64")]
            if inputs.len() == F16_BLOCK && bf16_gemm_available() {
                // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked above); 32 values in,
                // 48 pairs out.
                unsafe { split_block(inputs.as_ptr(), out.as_mut_ptr()) };
                continue;
            }
            let mut halves = [0u32; F16_BLOCK];
            for (h, &v) in halves.iter_mut().zip(inputs) {
                *h = split_f16(v);
            }
            for (r, o) in out.iter_mut().enumerate() {
                *o = split_pair(&halves, r, false);
            }
        }
    });
    out
}

/// [`split_f16`] of 16 f32 values that are f16 values: their 16 pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn split_ps(f: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // To nearest even, NaN kept a NaN, as `round_bf16`.
    // SAFETY: both are 256 bits of plain data.
    let rounded = unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(f)) };
    let hi = _mm512_cvtepu16_epi32(rounded);
    let hi_wide = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi));
    // The rest of the finite values only (NaN and infinities: zero, as `split_f16`).
    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(f), _mm512_set1_ps(f32::INFINITY));
    let lo = _mm512_maskz_sub_ps(finite, f, hi_wide);
    let mask = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    _mm512_or_si512(hi, _mm512_and_si512(_mm512_castps_si512(lo), mask))
}

/// The three groups of a block from its 32 inputs' [`split_f16`] pairs (`first`: inputs
/// `0..16`, `second`: `16..32`): activations or weights ([`split_pair`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn block_groups(
    first: std::arch::x86_64::__m512i,
    second: std::arch::x86_64::__m512i,
    weight: bool,
) -> [std::arch::x86_64::__m512i; 3] {
    use std::arch::x86_64::*;
    // 16-bit lanes 0, 2, .. of `first` then of `second` (the `hi` halves), or 1, 3, ..
    // (the `lo` halves).
    let even = _mm512_set_epi16(
        62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14,
        12, 10, 8, 6, 4, 2, 0,
    );
    let odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    if !weight {
        return [first, second, _mm512_permutex2var_epi16(first, even, second)];
    }
    let doubled = |v: __m512i| {
        let hi = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF));
        _mm512_or_si512(hi, _mm512_slli_epi32::<16>(hi))
    };
    [
        doubled(first),
        doubled(second),
        _mm512_permutex2var_epi16(first, odd, second),
    ]
}

/// [`split_activations`] of one whole block: 32 f16 values at `src`, 48 pairs at `dst`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `src` must hold 32 readable values and `dst`
/// 48 writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn split_block(src: *const f16, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: as this function's.
    unsafe {
        let first = split_ps(_mm512_cvtph_ps(_mm256_loadu_si256(src.cast())));
        let second = split_ps(_mm512_cvtph_ps(_mm256_loadu_si256(src.add(16).cast())));
        for (g, v) in block_groups(first, second, false).into_iter().enumerate() {
            _mm512_storeu_si512(dst.add(16 * g).cast(), v);
        }
    }
}

/// [`Weight::pack`] of 16-column tiles for an f16 weight (`[k, n]` values in `order`) of
/// [`matmul_f16_amx`]: pairs `p0..p1` of columns `c0..c0 + cols`, pair `p` holding
/// [`split_pair`] `p % 48` of block `p / 48`. Inputs past `k` and columns past `cols` are
/// zero.
fn pack_f16_split(
    w: &[f16],
    order: WeightOrder,
    (k, n): (usize, usize),
    (p0, p1): (usize, usize),
    (c0, cols): (usize, usize),
    panel: &mut [u32],
) {
    const TILE: usize = 16;
    let pairs = p1 - p0;
    // The product's pairs are the blocks' (its `k` is 96 per block): none past the last.
    assert!(
        w.len() == k * n
            && p1 <= k.div_ceil(F16_BLOCK) * F16_PAIRS
            && p0.is_multiple_of(TILE)
            && c0.is_multiple_of(TILE)
            && c0 + cols <= n
            && panel.len() >= pairs * TILE * cols.div_ceil(TILE)
    );
    for (t, chunk) in panel.chunks_mut(pairs * TILE).enumerate() {
        let c = c0 + t * TILE;
        let width = TILE.min(cols.saturating_sub(t * TILE));
        let mut q = p0;
        while q < p1 {
            // Rows `q..end` of block `b` (a slab can start or end inside a block).
            let (b, r) = (q / F16_PAIRS, q % F16_PAIRS);
            let end = p1.min((b + 1) * F16_PAIRS);
            let rows = &mut chunk[(q - p0) * TILE..(end - p0) * TILE];
            if width == 0 {
                rows.fill(0);
            } else if r == 0 && end == (b + 1) * F16_PAIRS {
                split_weight_block_any(w, order, (k, n), (b, c, width), rows);
            } else {
                let mut block = [0u32; F16_PAIRS * TILE];
                split_weight_block_any(w, order, (k, n), (b, c, width), &mut block);
                rows.copy_from_slice(&block[r * TILE..(r + end - q) * TILE]);
            }
            q = end;
        }
    }
}

/// The 48 packed rows of block `b` of columns `c..c + width` (the rest of each row zero)
/// into `rows`: in registers for 16 columns of a whole block, else value by value.
fn split_weight_block_any(
    w: &[f16],
    order: WeightOrder,
    (k, n): (usize, usize),
    (b, c, width): (usize, usize, usize),
    rows: &mut [u32],
) {
    const TILE: usize = 16;
    assert!(rows.len() == F16_PAIRS * TILE && width <= TILE && c + width <= n);
    let i0 = b * F16_BLOCK;
    #[cfg(target_arch = "x86_64")]
    if width == TILE && i0 + F16_BLOCK <= k && bf16_gemm_available() {
        // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked above); inputs
        // `i0..i0 + 32 <= k` of columns `c..c + 16 <= n`, and 48 rows of 16.
        unsafe { split_weight_block(w, order, (k, n), (i0, c), rows) };
        return;
    }
    let at = |i: usize, c: usize| match order {
        WeightOrder::InputMajor => w[i * n + c],
        WeightOrder::OutputMajor => w[c * k + i],
    };
    rows.fill(0);
    for j in 0..width {
        let mut halves = [0u32; F16_BLOCK];
        for (h, i) in halves.iter_mut().zip(i0..k.min(i0 + F16_BLOCK)) {
            *h = split_f16(at(i, c + j));
        }
        for r in 0..F16_PAIRS {
            rows[r * TILE + j] = split_pair(&halves, r, true);
        }
    }
}

/// 48 packed rows of [`pack_f16_split`]: the block of inputs `i0..i0 + 32` of columns
/// `c..c + 16`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `i0 + 32 <= k`, `c + 16 <= n`,
/// `rows.len() >= 768`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn split_weight_block(
    w: &[f16],
    order: WeightOrder,
    (k, n): (usize, usize),
    (i0, c): (usize, usize),
    rows: &mut [u32],
) {
    use std::arch::x86_64::*;
    assert!(i0 + F16_BLOCK <= k && c + 16 <= n && rows.len() >= F16_PAIRS * 16 && w.len() == k * n);
    let split16 = |at: usize| {
        // SAFETY: 16 values from `at`, inside `w` (each caller's index is asserted above).
        split_ps(_mm512_cvtph_ps(unsafe {
            _mm256_loadu_si256(w.as_ptr().add(at).cast())
        }))
    };
    match order {
        WeightOrder::InputMajor => {
            // Input `i0 + i`'s 16 columns are in a row: each pair row is one register. Inputs
            // `2j` and `2j + 1`, split once, give rows `2j` and `2j + 1` (`w_hi` doubled) and
            // row `32 + j` (their `w_lo`).
            let (hi, lo) = (
                _mm512_set1_epi32(0xFFFF),
                _mm512_set1_epi32(0xFFFF_0000_u32 as i32),
            );
            let doubled = |v: __m512i| _mm512_or_si512(_mm512_and_si512(v, hi), _mm512_slli_epi32::<16>(v));
            for j in 0..F16_BLOCK / 2 {
                let (a, b) = (split16((i0 + 2 * j) * n + c), split16((i0 + 2 * j + 1) * n + c));
                let pair = _mm512_or_si512(_mm512_srli_epi32::<16>(a), _mm512_and_si512(b, lo));
                // SAFETY: rows `2j`, `2j + 1 < 32` and `32 + j < 48` of 16 (asserted above).
                unsafe {
                    _mm512_storeu_si512(rows.as_mut_ptr().add(16 * (2 * j)).cast(), doubled(a));
                    _mm512_storeu_si512(rows.as_mut_ptr().add(16 * (2 * j + 1)).cast(), doubled(b));
                    _mm512_storeu_si512(rows.as_mut_ptr().add(16 * (F16_BLOCK + j)).cast(), pair);
                }
            }
        }
        WeightOrder::OutputMajor => {
            // Column `c + j`'s 32 inputs are in a row: its three groups' pairs into row `j`
            // of three 16 x 16 squares, then transposed.
            /// Three 16 x 16 squares of pairs on the stack, aligned for whole-line stores.
            #[repr(align(64))]
            struct Squares([u32; 3 * 256]);
            let mut squares = Squares([0; 3 * 256]);
            for j in 0..16 {
                let at = (c + j) * k + i0;
                let groups = block_groups(split16(at), split16(at + 16), true);
                for (g, v) in groups.into_iter().enumerate() {
                    // SAFETY: row `j` of square `g`: 64 bytes at a multiple of 64
                    // (`Squares`' alignment).
                    unsafe { _mm512_store_si512(squares.0.as_mut_ptr().add(256 * g + 16 * j).cast(), v) };
                }
            }
            for g in 0..3 {
                // SAFETY: a 16 x 16 square of 64-byte rows in, rows `16g..16g + 16` of 16
                // out (asserted above); the CPU has AVX-512 F.
                unsafe {
                    transpose16(
                        squares.0.as_ptr().add(256 * g).cast(),
                        64,
                        rows.as_mut_ptr().add(256 * g),
                        16,
                    )
                };
            }
        }
    }
}

/// The body of [`matmul_bf16_amx_rounded`] and its packed twin.
fn amx_rounded(x: &[bf16], weight: Weight, m: usize, bias: Option<&[f32]>) -> Option<Vec<bf16>> {
    let (k, n) = (weight.k, weight.n);
    if !amx::amx_bf16_available()
        || !bf16_gemm_available()
        || x.len() != m * k
        || m == 0
        || k == 0
        || n == 0
        || bias.is_some_and(|b| b.len() != n)
    {
        return None;
    }
    let shared = shared_pairs(x, m, k);
    let pairs: &Pairs = &shared;
    let mut out: Vec<bf16> = Vec::with_capacity(m * n);
    let target = RoundedOutput(out.as_mut_ptr());
    for_each_block_of(m, n, AMX_ROWS, AMX_TASK_COLS, AMX_TASK_COLS, |block| {
        // SAFETY: `out` holds `m * n` values and outlives the tasks; tasks write disjoint
        // blocks of it; AMX and AVX-512 BF16 are available (checked above).
        unsafe { amx_columns(pairs, &weight, block, Sums::Rounded(&target, bias), n) };
    });
    // SAFETY: the tasks wrote all `m * n` values (every block's last slab rounds all of its
    // rows and columns).
    unsafe { out.set_len(m * n) };
    Some(out)
}

thread_local! {
    /// Inside [`sharing_activations`]: the AMX tiles of the last activations this thread
    /// packed, by their address, length and row length.
    static SHARED: std::cell::RefCell<Option<Option<SharedPairs>>> = const { std::cell::RefCell::new(None) };
}

/// Activations packed for the AMX products, and what they were packed from.
type SharedPairs = ((usize, usize, usize), std::rc::Rc<Pairs>);

/// Runs `products`, whose AMX products of one activation slice (the same address, length
/// and row length) pack it once: q/k/v and gate/up read one input, and each packing is a
/// pass of 1.2-7 MB. Only for products of the same values: the caller holds the input for
/// the whole call, so an address cannot meet other values inside it.
pub fn sharing_activations<R>(products: impl FnOnce() -> R) -> R {
    /// Ends the sharing, on a panic too.
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            SHARED.set(None);
        }
    }
    SHARED.set(Some(None));
    let _end = End;
    products()
}

/// The AMX tiles of `x`: inside [`sharing_activations`] the packing of the same slice
/// again if there is one, else a new packing (kept for the next product there).
fn shared_pairs(x: &[bf16], m: usize, k: usize) -> std::rc::Rc<Pairs> {
    let key = (x.as_ptr() as usize, x.len(), k);
    SHARED.with_borrow_mut(|shared| match shared {
        Some(Some((at, pairs))) if *at == key && pairs.m == m => pairs.clone(),
        Some(slot) => {
            let pairs = std::rc::Rc::new(Pairs::of(x, m, k, AMX_ROWS, amx::TILE_ROWS, true));
            *slot = Some((key, pairs.clone()));
            pairs
        }
        None => std::rc::Rc::new(Pairs::of(x, m, k, AMX_ROWS, amx::TILE_ROWS, true)),
    })
}

/// [`matmul_bf16_gemm`]'s arithmetic in plain Rust, on every CPU (for tests).
pub fn matmul_bf16_gemm_reference(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    run(x, w, order, m, k, n, Kernel::Plain)
}

fn run(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
    kernel: Kernel,
) -> Option<Vec<f32>> {
    if x.len() != m * k || w.len() != k * n || m == 0 || k == 0 || n == 0 {
        return None;
    }
    // AMX reads whole 32-row blocks and 16-pair groups: zeros pad the activations to them.
    let (row_unit, pair_unit) = match kernel {
        Kernel::Amx => (AMX_ROWS, amx::TILE_ROWS),
        _ => (TILE_ROWS, 1),
    };
    let pairs = Pairs::of(x, m, k, row_unit, pair_unit, kernel == Kernel::Amx);
    let weight = Weight {
        values: Values::Bf16(w, order),
        k,
        n,
    };
    if kernel == Kernel::Amx {
        return Some(amx_f32(&pairs, &weight, m, n));
    }
    // The register tile adds from zero.
    let mut out = vec![0f32; m * n];
    let target = Output(out.as_mut_ptr());
    // Tasks of whole tiles, as even as the thread count allows (whole 192-column tasks left
    // a 1024-column product at 3 against 2.33 tasks of work on two threads; BENCHMARKS.md
    // round 28: 577 x 4096 x 1024 13.8-14.0 -> 12.7-12.8 ms on a Zen 4).
    for_each_block_of(m, n, row_unit, TILE_COLS, TASK_COLS, |block| {
        // SAFETY: `out` holds `m * n` values and outlives the tasks; tasks write disjoint
        // (row range, column range) blocks of it.
        unsafe { columns(&pairs, &weight, block, &target, n, kernel == Kernel::Vdpbf16ps) };
    });
    Some(out)
}

/// The AMX product of `pairs` (tiled) and `weight` as f32, in whole task blocks, as its
/// panels were tuned for. The caller checks that AMX and AVX-512 BF16 are available.
fn amx_f32(pairs: &Pairs, weight: &Weight, m: usize, n: usize) -> Vec<f32> {
    assert!(amx::amx_bf16_available() && bf16_gemm_available());
    // AMX writes every output before it adds to it.
    let mut out = Vec::with_capacity(m * n);
    let target = Output(out.as_mut_ptr());
    for_each_block_of(m, n, AMX_ROWS, AMX_TASK_COLS, AMX_TASK_COLS, |block| {
        // SAFETY: `out` holds `m * n` values and outlives the tasks; tasks write disjoint
        // (row range, column range) blocks of it; AMX is available (asserted above).
        unsafe { amx_columns(pairs, weight, block, Sums::F32(&target), n) };
    });
    // SAFETY: the tasks wrote all `m * n` values (every block of rows and columns, from its
    // first slab on: `amx_columns`).
    unsafe { out.set_len(m * n) };
    out
}

/// Runs `task` on every block of an `[m, n]` product in parallel: at most [`TASK_COLS`]
/// columns each, and for a narrow product (k/v projections) parts of the rows too, in whole
/// `row_unit`s, so that every thread has work.
///
/// Column blocks start on multiples of `col_unit` and are as even as whole units allow,
/// in a number of blocks that the threads share evenly where there are enough units: with
/// whole [`TASK_COLS`] blocks and a short last one, one of two threads got a block more
/// than the other (a 1024-column product is 5.33 blocks: 3 against 2.33 of work, 11% of
/// the product lost to waiting; a 256-column one 192 against 64 columns).
pub(super) fn for_each_block(
    m: usize,
    n: usize,
    row_unit: usize,
    col_unit: usize,
    task: impl Fn(Block) + Sync,
) {
    for_each_block_of(m, n, row_unit, col_unit, TASK_COLS, task)
}

/// [`for_each_block`] with at most `max_cols` columns per task instead of [`TASK_COLS`].
pub(super) fn for_each_block_of(
    m: usize,
    n: usize,
    row_unit: usize,
    col_unit: usize,
    max_cols: usize,
    task: impl Fn(Block) + Sync,
) {
    let threads = rayon::current_num_threads();
    let col_unit = col_unit.clamp(1, max_cols);
    let units = n.div_ceil(col_unit);
    let col_tasks = units
        .div_ceil(max_cols / col_unit)
        .next_multiple_of(threads)
        .min(units)
        .max(1);
    // Task `t`'s columns start at unit `t * units / col_tasks`: sizes differ by one unit at most.
    let start = |t: usize| (t * units / col_tasks * col_unit).min(n);
    let row_parts = (2 * threads).div_ceil(col_tasks).clamp(1, m.div_ceil(row_unit));
    let part_rows = m.div_ceil(row_parts).next_multiple_of(row_unit);
    let row_parts = m.div_ceil(part_rows);
    (0..col_tasks * row_parts).into_par_iter().for_each(|i| {
        let (t, part) = (i / row_parts, i % row_parts);
        let c0 = start(t);
        let r0 = part * part_rows;
        task(Block {
            c0,
            cols: start(t + 1) - c0,
            r0,
            r1: (r0 + part_rows).min(m),
        });
    });
}

/// The output's first value, shared by the tasks (each writes its own block).
pub(super) struct Output(pub(super) *mut f32);

// SAFETY: the tasks write disjoint blocks of the output (see `for_each_block`).
unsafe impl Sync for Output {}

/// [`Output`] of [`matmul_bf16_amx_rounded`].
struct RoundedOutput(*mut bf16);

// SAFETY: as `Output`'s.
unsafe impl Sync for RoundedOutput {}

/// Where the AMX tasks put their sums.
#[derive(Clone, Copy)]
enum Sums<'a> {
    /// As f32 in the `[m, n]` output, which also holds them between slabs.
    F32(&'a Output),
    /// Rounded to bf16 with the bias added (if any) in the `[m, n]` output; between slabs
    /// (k > 2048) in the thread's f32 scratch of the task's blocks, which stays allocated
    /// for the next product (about 1 KB per row of the task: 0.6 MB for a 617-row prefill).
    Rounded(&'a RoundedOutput, Option<&'a [f32]>),
}

/// One task's share of the output: rows `r0..r1` of columns `c0..c0 + cols`.
#[derive(Clone, Copy)]
pub(super) struct Block {
    pub(super) c0: usize,
    pub(super) cols: usize,
    pub(super) r0: usize,
    pub(super) r1: usize,
}

/// The activations as (value `2p`, value `2p + 1`) bit pairs, low half first, as
/// `vdpbf16ps` and `tdpbf16ps` take them; an odd last value pairs with zero, and zero rows
/// and pairs pad the block to whole units of the kernel.
struct Pairs {
    bits: super::AlignedVec<u32>,
    m: usize,
    /// Pairs per row.
    half: usize,
    /// Pairs per stored row (`half` padded).
    stride: usize,
    /// Stored in AMX tiles: per 16 rows and 16 pairs, 16 rows of 16 pairs in a row (1 KB),
    /// the 16 pairs' tiles one after the other. Row-major otherwise.
    tiled: bool,
}

impl Pairs {
    fn of(x: &[bf16], m: usize, k: usize, row_unit: usize, pair_unit: usize, tiled: bool) -> Self {
        let half = k.div_ceil(2);
        let stride = half.next_multiple_of(pair_unit);
        let total = m.next_multiple_of(row_unit) * stride;
        // Not zeroed first: the tasks write every slot, padding included (a zeroed buffer was
        // one thread's memset of it all, and its page faults, while the others waited: 1.3%
        // of a bf16 run's samples).
        let mut bits = super::AlignedVec::<u32>::with_capacity(64, total);
        // SAFETY: the buffer holds `total` values; `MaybeUninit` needs no initialization.
        let slots =
            unsafe { std::slice::from_raw_parts_mut(bits.as_mut_ptr().cast::<MaybeUninit<u32>>(), total) };
        // Rows per contiguous block of `bits`: 16 when tiled (a row of tiles), else 1.
        let tile = amx::TILE_ROWS;
        let block_rows = if tiled { tile } else { 1 };
        // Each slot is written once: a row's pairs, then zeros to the end of its tile's
        // group, and zeros for the rows of the last block past `m`.
        let fill = |(block, xs): (&mut [MaybeUninit<u32>], &[bf16])| {
            for i in 0..block_rows {
                let row = xs.get(i * k..(i + 1) * k).unwrap_or(&[]);
                if tiled {
                    // Group `g` of 16 pairs of row `i`: at `g * 256 + i * 16`.
                    for g in 0..stride / tile {
                        let values = row.get(2 * tile * g..).unwrap_or(&[]);
                        let values = &values[..values.len().min(2 * tile)];
                        write_pairs(&mut block[g * tile * tile + i * tile..][..tile], values);
                    }
                } else {
                    write_pairs(&mut block[..stride], row);
                }
            }
        };
        let (dst, src) = (block_rows * stride, block_rows * k);
        // The blocks of the rows (a whole number of them fits: `row_unit` is a multiple of
        // `block_rows`), then the padding rows.
        let (rows, padding) = slots.split_at_mut(m.div_ceil(block_rows) * dst);
        // One block of slots per block of rows, so that `fill` meets every slot, and whole
        // groups per tiled row.
        assert_eq!(rows.len() / dst, x.len().div_ceil(src));
        assert!(!tiled || stride.is_multiple_of(tile));
        if m * k >= 1 << 16 {
            let blocks = rows.par_chunks_mut(dst).zip(x.par_chunks(src));
            blocks.with_min_len(16 / block_rows).for_each(fill);
        } else {
            rows.chunks_mut(dst).zip(x.chunks(src)).for_each(fill);
        }
        for v in padding.iter_mut() {
            v.write(0);
        }
        // SAFETY: every value was written (by `fill`, or zeroed above).
        unsafe { bits.set_len(total) };
        Self {
            bits,
            m,
            half,
            stride,
            tiled,
        }
    }

    /// The first of the AMX tiles of rows `r..r + 16` from pair `p` (both multiples of 16).
    fn tile(&self, r: usize, p: usize) -> *const u8 {
        let tile = amx::TILE_ROWS;
        assert!(
            self.tiled
                && r.is_multiple_of(tile)
                && p.is_multiple_of(tile)
                && (r + tile) * self.stride <= self.bits.len()
        );
        self.bits[r * self.stride + p * tile..].as_ptr().cast()
    }
}

/// `values` as (value `2p`, value `2p + 1`) pairs into `dst`, an odd last value paired
/// with zero, and zeros after them to the end of `dst`.
fn write_pairs(dst: &mut [MaybeUninit<u32>], values: &[bf16]) {
    assert!(values.len().div_ceil(2) <= dst.len());
    let whole = values.len() / 2;
    let (head, tail) = dst.split_at_mut(whole);
    if cfg!(target_endian = "little") && whole == 16 {
        // A whole tile group: 64 bytes in vector moves.
        // SAFETY: as below, with `whole` 16.
        unsafe { copy64(values.as_ptr().cast(), head.as_mut_ptr().cast()) };
    } else if cfg!(target_endian = "little") {
        // A pair's u32 (first value in the low half) has the two values' bytes in memory
        // order: whole pairs are a plain copy.
        // SAFETY: `head` holds `whole` u32 (`4 whole` bytes) and `values` at least `2 whole`
        // bf16 (as many bytes); a new buffer's slots do not overlap the activations.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr().cast::<u8>(),
                head.as_mut_ptr().cast::<u8>(),
                4 * whole,
            )
        };
    } else {
        for (d, two) in head.iter_mut().zip(values.chunks_exact(2)) {
            d.write(two[0].to_bits() as u32 | ((two[1].to_bits() as u32) << 16));
        }
    }
    for (j, d) in tail.iter_mut().enumerate() {
        let odd = values.get(2 * whole).filter(|_| j == 0);
        d.write(odd.map_or(0, |v| v.to_bits() as u32));
    }
}

/// Copies 64 bytes from `src` to `dst` in four 16-byte vector moves. A `copy_nonoverlapping`
/// of 64 bytes here was merged with the copy of a run-time length beside it into one
/// library call (`memmove`: 1.3% of a bf16 image encode's samples, a quarter of the
/// packing's).
///
/// # Safety
/// `src` must be readable and `dst` writable for 64 bytes, and they must not overlap.
#[inline(always)]
unsafe fn copy64(src: *const u8, dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as this function's; SSE2 is part of x86_64.
    unsafe {
        use std::arch::x86_64::*;
        let v: [__m128i; 4] = std::array::from_fn(|i| _mm_loadu_si128(src.add(16 * i).cast()));
        for (i, v) in v.into_iter().enumerate() {
            _mm_storeu_si128(dst.add(16 * i).cast(), v);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as this function's.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, 64)
    };
}

/// The weight: its values and `[k, n]` shape.
struct Weight<'a> {
    values: Values<'a>,
    k: usize,
    n: usize,
}

/// Where a weight's values are.
#[derive(Clone, Copy)]
enum Values<'a> {
    /// bf16 values in this order.
    Bf16(&'a [bf16], WeightOrder),
    /// Quantized values packed for the decode kernels, dequantized in the pack (AMX only).
    Packed(&'a PackedWeight),
    /// f16 values in this order (`[k0, n]`, the product's `k` being 96 per 32 of them),
    /// packed as [`split_pair`]s (AMX only; see [`matmul_f16_amx`]).
    F16Split(&'a [f16], WeightOrder),
}

impl Weight<'_> {
    /// Packs pairs `p0..p1` of columns `c0..c0 + cols` into `panel`: per tile of `tile_cols`
    /// (at most [`TILE_COLS`]) columns, `p1 - p0` rows of `tile_cols` pairs (columns past
    /// `cols` and pairs past the weight's are zero).
    #[allow(clippy::too_many_arguments)]
    fn pack(
        &self,
        p0: usize,
        p1: usize,
        c0: usize,
        cols: usize,
        panel: &mut [u32],
        simd: bool,
        tile_cols: usize,
    ) {
        assert!(tile_cols <= TILE_COLS && tile_cols.is_multiple_of(16));
        let (k, n) = (self.k, self.n);
        let (w, order) = match self.values {
            Values::Bf16(w, order) => (w, order),
            Values::Packed(packed) => {
                assert!(
                    simd && tile_cols == 16,
                    "packed weights are only read by the AMX tasks"
                );
                return pack_dequantized(packed, p0, p1, c0, cols, panel);
            }
            Values::F16Split(w, order) => {
                assert!(
                    simd && tile_cols == 16,
                    "f16 weights are only read by the AMX tasks"
                );
                return pack_f16_split(w, order, (w.len() / n, n), (p0, p1), (c0, cols), panel);
            }
        };
        let pairs = p1 - p0;
        for (tile, chunk) in panel.chunks_mut(pairs * tile_cols).enumerate() {
            let t0 = tile * tile_cols;
            let width = tile_cols.min(cols.saturating_sub(t0));
            if width < tile_cols || p1 > k.div_ceil(2) {
                chunk.fill(0);
            }
            if width == 0 {
                continue;
            }
            let c = c0 + t0;
            match order {
                WeightOrder::OutputMajor => {
                    // One row of the file per column: its pairs are consecutive. Groups of
                    // 16 columns x 16 pairs are transposed in registers where the CPU
                    // allows; the rest is copied value by value.
                    let mut from = [p0; TILE_COLS];
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        // Whole groups of 16 pairs inside every row (an odd `k`'s last
                        // pair is half outside).
                        let whole = p0 + (p1.min(k / 2).saturating_sub(p0)) / 16 * 16;
                        for g in 0..width / 16 {
                            let rows = &w[(c + 16 * g) * k..(c + 16 * g + 16) * k];
                            for p in (p0..whole).step_by(16) {
                                let out = &mut chunk[(p - p0) * tile_cols + 16 * g..];
                                // SAFETY: `simd` is only true on CPUs with AVX-512 F; 16 rows
                                // of `k` values hold pairs `p..p + 16` (`2p + 32 <= k`), and
                                // `out` holds 16 packed rows of `tile_cols` from column `16g`.
                                unsafe { transpose_pairs(rows, k, p, out, tile_cols) };
                            }
                            from[16 * g..16 * g + 16].fill(whole);
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = simd;
                    for (j, &start) in from.iter().enumerate().take(width) {
                        let row = &w[(c + j) * k..(c + j + 1) * k];
                        // Pairs past the weight's stay zero (filled above).
                        for p in start..p1.min(k.div_ceil(2)) {
                            let lo = row[2 * p].to_bits() as u32;
                            let hi = row.get(2 * p + 1).map_or(0, |v| v.to_bits() as u32);
                            chunk[(p - p0) * tile_cols + j] = lo | (hi << 16);
                        }
                    }
                }
                WeightOrder::InputMajor => {
                    // Two rows of the weight per pair: their columns side by side.
                    for p in p0..p1.min(k.div_ceil(2)) {
                        let lo = &w[2 * p * n + c..][..width];
                        let out = &mut chunk[(p - p0) * tile_cols..][..width];
                        if 2 * p + 1 < k {
                            let hi = &w[(2 * p + 1) * n + c..][..width];
                            for ((o, a), b) in out.iter_mut().zip(lo).zip(hi) {
                                *o = a.to_bits() as u32 | ((b.to_bits() as u32) << 16);
                            }
                        } else {
                            for (o, a) in out.iter_mut().zip(lo) {
                                *o = a.to_bits() as u32;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`Weight::pack`] of 16-column tiles from a packed q8/q4 weight: per tile, its inputs
/// `2 p0..2 p1` dequantized, rounded to bf16 and joined into pairs
/// ([`PackedWeight::dequantize_tile_pairs`], the bits of [`PackedWeight::dequantize_bf16`]).
/// Inputs past the weight's and columns past `cols` are zero.
fn pack_dequantized(w: &PackedWeight, p0: usize, p1: usize, c0: usize, cols: usize, panel: &mut [u32]) {
    const TILE: usize = 16;
    let pairs = p1 - p0;
    let (k0, k1) = ((2 * p0).min(w.k()), (2 * p1).min(w.k()));
    assert!(
        c0.is_multiple_of(TILE)
            && cols.is_multiple_of(TILE)
            && panel.len() >= pairs * TILE * cols.div_ceil(TILE)
    );
    let kernel = super::Simd::best();
    for (t, chunk) in panel.chunks_mut(pairs * TILE).enumerate() {
        if t * TILE >= cols {
            chunk.fill(0);
            continue;
        }
        // Pair rows from inputs `k0..k1`; the rows past `k1` are zero.
        let (live, padding) = chunk.split_at_mut((k1 - k0) / 2 * TILE);
        w.dequantize_tile_pairs([k0, k1], (c0 + t * TILE) / TILE, live, kernel);
        padding.fill(0);
    }
}

/// Pairs `p..p + 16` of 16 rows of `k` values (`rows`) into 16 packed rows `stride` apart
/// (`out`, the rows' 16 columns from its start): a 16 x 16 transpose of 32-bit pairs.
///
/// # Safety
/// The CPU must have AVX-512 F; `rows.len() >= 16 * k`, `2 * p + 32 <= k`, and
/// `out.len() >= 15 * stride + 16`.
#[cfg(target_arch = "x86_64")]
unsafe fn transpose_pairs(rows: &[bf16], k: usize, p: usize, out: &mut [u32], stride: usize) {
    assert!(rows.len() >= 16 * k && 2 * p + 32 <= k && out.len() >= 15 * stride + 16);
    // SAFETY: row `i < 16` holds values `2p..2p + 32` (64 bytes from `2 * (i * k + 2p)`),
    // and `out` the 16 packed rows (asserted above); the CPU has AVX-512 F (this
    // function's contract).
    unsafe { transpose16(rows[2 * p..].as_ptr().cast(), 2 * k, out.as_mut_ptr(), stride) }
}

/// A 16 x 16 block of 32-bit values transposed in registers: value `j` of source row `i`
/// (64 bytes at `src + i * src_step` bytes) to `dst[j * dst_step + i]`.
///
/// # Safety
/// The CPU must have AVX-512 F; the 16 source rows must be readable and the 16 destination
/// rows of 16 values writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(src: *const u8, src_step: usize, dst: *mut u32, dst_step: usize) {
    use std::arch::x86_64::*;

    // SAFETY: the 16 source rows are readable (this function's contract).
    let r: [__m512i; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_si512(src.add(i * src_step) as *const __m512i) });
    // Rows 2i and 2i + 1 interleaved by value, then by two values: in each 128-bit lane `l`,
    // `u[4g + q]` holds value `4l + q` of rows `4g..4g + 4`.
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, q) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + q / 2], t[4 * g + 2 + q / 2]);
        if q % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // Lanes regrouped so that destination row `4l + q` gathers lane `l` of `u[q]`,
    // `u[4 + q]`, `u[8 + q]` and `u[12 + q]`.
    for q in 0..4 {
        let even_lo = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[q], u[4 + q]);
        let odd_lo = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[q], u[4 + q]);
        let even_hi = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + q], u[12 + q]);
        let odd_hi = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + q], u[12 + q]);
        let lanes = [
            _mm512_shuffle_i32x4::<0b10_00_10_00>(even_lo, even_hi),
            _mm512_shuffle_i32x4::<0b10_00_10_00>(odd_lo, odd_hi),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(even_lo, even_hi),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(odd_lo, odd_hi),
        ];
        for (l, v) in lanes.into_iter().enumerate() {
            // SAFETY: destination row `4l + q < 16`, 16 values (this function's contract).
            unsafe { _mm512_storeu_si512(dst.add((4 * l + q) * dst_step) as *mut __m512i, v) };
        }
    }
}

/// `block` of the product into the `[m, n]` output at `out`, slab by slab.
///
/// # Safety
/// `out` must point to `x.m * n` values that no one else reads or writes inside `block`.
unsafe fn columns(x: &Pairs, w: &Weight, block: Block, out: &Output, n: usize, simd: bool) {
    let Block { c0, cols, r0, r1 } = block;
    assert!(r1 <= x.m && c0 + cols <= n);
    let tiles = cols.div_ceil(TILE_COLS);
    let mut panel = super::aligned_zeros::<u32>(SLAB / 2 * TILE_COLS * tiles);
    let mut p0 = 0;
    while p0 < x.half {
        let p1 = (p0 + SLAB / 2).min(x.half);
        let pairs = p1 - p0;
        let panel = &mut panel[..pairs * TILE_COLS * tiles];
        w.pack(p0, p1, c0, cols, panel, simd, TILE_COLS);
        for tile in 0..tiles {
            let t0 = tile * TILE_COLS;
            let b = &panel[tile * pairs * TILE_COLS..(tile + 1) * pairs * TILE_COLS];
            let mut r = r0;
            while r < r1 {
                let rows = TILE_ROWS.min(r1 - r);
                assert!(!x.tiled);
                let tile = Tile {
                    a: &x.bits[r * x.stride + p0..],
                    lda: x.stride,
                    b,
                    pairs,
                    // SAFETY: row `r < m`, column `c0 + t0 < n`: inside the output.
                    c: unsafe { out.0.add(r * n + c0 + t0) },
                    ldc: n,
                    width: TILE_COLS.min(cols - t0),
                };
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is only true when `bf16_gemm_available()` said the
                    // CPU has AVX-512 F/BW/BF16; `rows` output rows of `width` values from
                    // `c` lie in this task's block.
                    unsafe { tile.simd_rows(rows) };
                    r += rows;
                    continue;
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = simd;
                // SAFETY: as above.
                unsafe { tile.plain(rows) };
                r += rows;
            }
        }
        p0 = p1;
    }
}

/// [`columns`] with AMX: per slab of [`AMX_SLAB_PAIRS`] pairs, the task's columns packed in
/// 16-column tiles (each 16-pair group of a tile 1 KB in a row, as the activations are),
/// then every 32-row block of its rows against each 32 columns, four 16 x 16 tiles of sums
/// at a time.
///
/// The first slab's sums start from zero, so `out` need not be initialized.
///
/// # Safety
/// As [`columns`]; AMX and AVX-512 F must be available (`matmul_bf16_amx` checks).
#[inline(never)]
unsafe fn amx_columns(x: &Pairs, w: &Weight, block: Block, out: Sums, n: usize) {
    let Block { c0, cols, r0, r1 } = block;
    let group = amx::TILE_ROWS;
    assert!(r1 <= x.m && c0 + cols <= n && r0.is_multiple_of(AMX_ROWS) && x.stride.is_multiple_of(group));
    let Some(tiles) = amx::Tiles::new() else {
        unreachable!("matmul_bf16_amx checked that AMX is available")
    };
    let col_blocks = cols.div_ceil(AMX_COLS);
    // The panel buffer is the thread's own, kept between calls: zeroing its 1 MB per task
    // cost more than the packing (`pack` writes every value it hands out).
    // The rounded output's sums between slabs: whole 32 x 32 blocks of the task's rows and
    // columns (only products of more than one slab use it).
    thread_local! {
        static PANEL: std::cell::RefCell<super::AlignedVec<u32>> = std::cell::RefCell::new(super::aligned_zeros(0));
        static SCRATCH: std::cell::RefCell<super::AlignedVec<f32>> = std::cell::RefCell::new(super::aligned_zeros(0));
    }
    PANEL.with_borrow_mut(|panel| {
        let size = AMX_SLAB_PAIRS * AMX_COLS * col_blocks;
        if panel.len() < size {
            panel.resize(size, 0);
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let size = match out {
                Sums::Rounded(..) if x.stride > AMX_SLAB_PAIRS => {
                    (r1 - r0).next_multiple_of(AMX_ROWS) * col_blocks * AMX_COLS
                }
                _ => 0,
            };
            if scratch.len() < size {
                scratch.resize(size, 0.0);
            }
            // SAFETY: as this function's.
            unsafe { amx_slabs(x, w, block, out, n, &tiles, panel, scratch) }
        })
    })
}

/// Block `(r, t)`'s sums (rows `r..r + rows`, columns `t0..t0 + width` of the task) from
/// `edge` into the rounded output: plus the column's bias, to nearest even, as
/// `streamed_output` rounds an f32 result.
///
/// # Safety
/// AVX-512 F and BW must be available; the rows and columns must be inside the task's
/// block of `out` (`n` columns).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn round_block(
    edge: &[f32; AMX_ROWS * AMX_COLS],
    (rows, width): (usize, usize),
    bias: Option<&[f32]>,
    dst: *mut bf16,
    n: usize,
) {
    assert!(rows <= AMX_ROWS && width <= AMX_COLS && bias.is_none_or(|b| b.len() >= width));
    for (er, sums) in edge.chunks_exact(AMX_COLS).take(rows).enumerate() {
        // Written through the pointer: the output is not initialized yet, so no slice of it.
        // SAFETY: row `er` of the block, `width` values (this function's contract).
        let row = unsafe { dst.add(er * n) };
        match bias {
            Some(bias) => {
                for (c, (&v, &b)) in sums[..width].iter().zip(bias).enumerate() {
                    // SAFETY: `c < width`.
                    unsafe { row.add(c).write(super::round_bf16(v + b)) };
                }
            }
            None => {
                for (c, &v) in sums[..width].iter().enumerate() {
                    // SAFETY: `c < width`.
                    unsafe { row.add(c).write(super::round_bf16(v)) };
                }
            }
        }
    }
}

/// [`amx::Tiles::block`] for a block of `rows` live rows: where they end in its first half,
/// [`amx::Tiles::block16`] on the first tile of activations only (the rest are zero rows).
///
/// # Safety
/// As [`amx::Tiles::block`].
#[allow(clippy::too_many_arguments)]
unsafe fn block_of(
    tiles: &amx::Tiles,
    rows: usize,
    a: [*const u8; 2],
    b: [*const u8; 2],
    from: Option<(*const u8, usize)>,
    to: (*mut u8, usize),
    steps: usize,
) {
    // SAFETY: as this function's (the 16-row block reads and writes a part of the same).
    unsafe {
        if rows <= amx::TILE_ROWS {
            tiles.block16(a[0], b, from, to, steps)
        } else {
            tiles.block(a, b, from, to, steps)
        }
    }
}

/// [`amx_columns`] with its panel buffer.
///
/// # Safety
/// As [`amx_columns`].
#[allow(clippy::too_many_arguments)]
unsafe fn amx_slabs(
    x: &Pairs,
    w: &Weight,
    block: Block,
    out: Sums,
    n: usize,
    tiles: &amx::Tiles,
    panel: &mut [u32],
    scratch: &mut [f32],
) {
    let Block { c0, cols, r0, r1 } = block;
    let group = amx::TILE_ROWS;
    let col_blocks = cols.div_ceil(AMX_COLS);
    // Sums of a block that overhangs the output's last rows or this task's last columns.
    let mut edge = [0f32; AMX_ROWS * AMX_COLS];
    let mut p0 = 0;
    while p0 < x.stride {
        let p1 = (p0 + AMX_SLAB_PAIRS).min(x.stride);
        let pairs = p1 - p0;
        let steps = pairs / group;
        let panel = &mut panel[..pairs * AMX_COLS * col_blocks];
        w.pack(p0, p1, c0, cols, panel, true, group);
        // Each 32-row block of activations (64 KB) against every column block of the panel.
        let mut r = r0;
        while r < r1 {
            let rows = AMX_ROWS.min(r1 - r);
            // Rows `r..r + 32` (zero-padded) from pair `p0`.
            let a = [x.tile(r, p0), x.tile(r + group, p0)];
            for t in 0..col_blocks {
                let t0 = t * AMX_COLS;
                let width = AMX_COLS.min(cols - t0);
                // The block's two 16-column tiles: `pairs` rows of 16 pairs each.
                let b = [
                    panel[2 * t * pairs * group..].as_ptr().cast::<u8>(),
                    panel[(2 * t + 1) * pairs * group..].as_ptr().cast::<u8>(),
                ];
                let last = p1 == x.stride;
                let out = match out {
                    Sums::F32(out) => out,
                    Sums::Rounded(rounded, bias) => {
                        // The block's sums so far, in the scratch (whole blocks, 128 bytes
                        // per row of the block).
                        // (Empty for a product of one slab, which keeps no sums.)
                        let ld = col_blocks * AMX_COLS;
                        let kept = (p0 > 0 || !last)
                            .then(|| (scratch[(r - r0) * ld + t0..].as_mut_ptr().cast::<u8>(), 4 * ld));
                        let from = kept.filter(|_| p0 > 0).map(|(at, ld)| (at.cast_const(), ld));
                        let to = match kept {
                            Some(kept) if !last => kept,
                            _ => (edge.as_mut_ptr().cast::<u8>(), 4 * AMX_COLS),
                        };
                        // SAFETY: `steps` 1 KB tiles from each of `a` and `b`, 32 rows of
                        // 32 sums in the scratch (sized for the task's whole blocks) and
                        // in `edge`.
                        unsafe { block_of(tiles, rows, a, b, from, to, steps) };
                        if last {
                            let bias = bias.map(|b| &b[c0 + t0..c0 + t0 + width]);
                            // SAFETY: row `r < m`, columns `c0 + t0..c0 + t0 + width` of
                            // this task's block; every AMX CPU has AVX-512 F and BW.
                            unsafe {
                                let dst = rounded.0.add(r * n + c0 + t0);
                                round_block(&edge, (rows, width), bias, dst, n)
                            };
                        }
                        continue;
                    }
                };
                // SAFETY: row `r < m`, column `c0 + t0 < n`: inside the output.
                let c = unsafe { out.0.add(r * n + c0 + t0) };
                if rows == AMX_ROWS && width == AMX_COLS {
                    // SAFETY: `steps` 1 KB tiles from each of `a` and `b` (padded rows and
                    // pairs, packed panel), and 32 x 32 sums of this task's block from `c`.
                    let to = (c.cast::<u8>(), 4 * n);
                    let from = (p0 > 0).then_some((to.0.cast_const(), to.1));
                    unsafe { tiles.block(a, b, from, to, steps) };
                    continue;
                }
                for (i, e) in edge.iter_mut().enumerate() {
                    let (er, ec) = (i / AMX_COLS, i % AMX_COLS);
                    let live = p0 > 0 && er < rows && ec < width;
                    // SAFETY: inside the block's live rows and columns, written by the slab
                    // before.
                    *e = if live { unsafe { *c.add(er * n + ec) } } else { 0.0 };
                }
                // SAFETY: as above, with the sums in `edge`.
                let to = (edge.as_mut_ptr().cast::<u8>(), 4 * AMX_COLS);
                unsafe { block_of(tiles, rows, a, b, Some((to.0.cast_const(), to.1)), to, steps) };
                for er in 0..rows {
                    for ec in 0..width {
                        // SAFETY: as above.
                        unsafe { *c.add(er * n + ec) = edge[er * AMX_COLS + ec] };
                    }
                }
            }
            r += rows;
        }
        p0 = p1;
    }
}

/// One register tile's operands: activation rows (stride `lda` pairs), `pairs` packed
/// weight rows of [`TILE_COLS`] pairs, and output rows from `c` (stride `ldc`) of which
/// the first `width` columns are this tile's.
struct Tile<'a> {
    a: &'a [u32],
    lda: usize,
    b: &'a [u32],
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
}

impl Tile<'_> {
    /// `c += a . b` over `rows` rows, pair by pair, odd product first.
    ///
    /// # Safety
    /// `rows` output rows of `width` values from `c` (stride `ldc`) must be valid and not
    /// in use elsewhere.
    unsafe fn plain(self, rows: usize) {
        assert!(self.width <= TILE_COLS && self.b.len() >= self.pairs * TILE_COLS);
        for r in 0..rows {
            // SAFETY: as this function's.
            let out = unsafe { std::slice::from_raw_parts_mut(self.c.add(r * self.ldc), self.width) };
            for p in 0..self.pairs {
                let pair = self.a[r * self.lda + p];
                let (x0, x1) = (widen(pair as u16), widen((pair >> 16) as u16));
                let ws = &self.b[p * TILE_COLS..p * TILE_COLS + self.width];
                for (o, &wp) in out.iter_mut().zip(ws) {
                    let odd = x1.mul_add(widen((wp >> 16) as u16), *o);
                    *o = x0.mul_add(widen(wp as u16), odd);
                }
            }
        }
    }

    /// [`Tile::plain`] with `vdpbf16ps`, one copy of the kernel per row count.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; the output rows as for [`Tile::plain`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn simd_rows(self, rows: usize) {
        // SAFETY (all arms): as this function's.
        unsafe {
            match rows {
                8 => self.simd::<8>(),
                7 => self.simd::<7>(),
                6 => self.simd::<6>(),
                5 => self.simd::<5>(),
                4 => self.simd::<4>(),
                3 => self.simd::<3>(),
                2 => self.simd::<2>(),
                _ => self.simd::<1>(),
            }
        }
    }

    /// `R` rows of [`Tile::plain`] in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; the output rows as for [`Tile::plain`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn simd<const R: usize>(self) {
        use std::arch::x86_64::*;

        // The pointer reads below stay inside these bounds.
        assert!(self.width <= TILE_COLS && self.b.len() >= self.pairs * TILE_COLS);
        assert!(R == 0 || self.a.len() >= (R - 1) * self.lda + self.pairs);
        let masks = tile_masks(self.width);
        let c = self.c;
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                // SAFETY: masked to the row's `width` live columns.
                *v = unsafe { _mm512_maskz_loadu_ps(masks[j], c.add(r * self.ldc + 16 * j)) };
            }
        }
        let a = self.a.as_ptr();
        let b = self.b.as_ptr() as *const __m512i;
        for p in 0..self.pairs {
            // SAFETY: `p < pairs`: packed row `p` has 48 pairs (three registers).
            let (w0, w1, w2) = unsafe {
                (
                    _mm512_loadu_si512(b.add(3 * p)),
                    _mm512_loadu_si512(b.add(3 * p + 1)),
                    _mm512_loadu_si512(b.add(3 * p + 2)),
                )
            };
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R`, pair `p < pairs` (checked above).
                let x = _mm512_set1_epi32(unsafe { *a.add(r * self.lda + p) } as i32);
                let x = as_bh(x);
                row[0] = _mm512_dpbf16_ps(row[0], x, as_bh(w0));
                row[1] = _mm512_dpbf16_ps(row[1], x, as_bh(w1));
                row[2] = _mm512_dpbf16_ps(row[2], x, as_bh(w2));
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: masked to the row's `width` live columns.
                unsafe { _mm512_mask_storeu_ps(c.add(r * self.ldc + 16 * j), masks[j], *v) };
            }
        }
    }
}

/// The live lanes of a register tile's three 16-column registers when `width` of its
/// [`TILE_COLS`] columns are the output's.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn tile_masks(width: usize) -> [std::arch::x86_64::__mmask16; 3] {
    std::array::from_fn(|j| {
        let live = width.saturating_sub(16 * j).min(16);
        ((1u32 << live) - 1) as u16
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::bf16_dot::tests::values;

    /// `x @ w` in f64, `w` given as `[k, n]`.
    fn exact(x: &[bf16], w: &[bf16], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for kk in 0..k {
                for c in 0..n {
                    out[r * n + c] += x[r * k + kk].to_f64() * w[kk * n + c].to_f64();
                }
            }
        }
        out
    }

    /// The task blocks cover every output once, start their columns on the unit, stay
    /// within a task's width, and share the columns evenly: column blocks differ by one
    /// unit at most, and with two threads each takes half of them.
    #[test]
    fn task_blocks_cover_the_output_once_and_evenly() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool");
        for (m, n, row_unit, col_unit) in [
            (577, 1024, 6, 16),
            (617, 256, 6, 16),
            (617, 5632, 6, 16),
            (7, 40, 6, 16),
            (577, 1024, 8, TILE_COLS),
            (33, 100, 8, TILE_COLS),
            (64, 1000, 32, TASK_COLS),
            (1, 1, 8, 16),
        ] {
            let blocks = std::sync::Mutex::new(Vec::new());
            pool.install(|| {
                for_each_block(m, n, row_unit, col_unit, |b| blocks.lock().expect("lock").push(b))
            });
            let blocks = blocks.into_inner().expect("lock");
            let mut seen = vec![0u8; m * n];
            let mut widths = std::collections::BTreeMap::new();
            for b in &blocks {
                assert_eq!(b.c0 % col_unit, 0, "{m} x {n}: column start {}", b.c0);
                assert!(b.cols > 0 && b.cols <= TASK_COLS && b.c0 + b.cols <= n);
                assert_eq!(b.r0 % row_unit, 0);
                widths.insert(b.c0, b.cols);
                for r in b.r0..b.r1 {
                    for c in b.c0..b.c0 + b.cols {
                        seen[r * n + c] += 1;
                    }
                }
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "{m} x {n}: not covered exactly once"
            );
            // The last block may end short of a whole unit (`n` not a multiple of it).
            let units: Vec<usize> = widths.values().map(|w| w.div_ceil(col_unit)).collect();
            let (lo, hi) = (
                units.iter().min().expect("a block"),
                units.iter().max().expect("a block"),
            );
            assert!(hi - lo <= 1, "{m} x {n}: column blocks of {units:?} units");
            if units.len() > 1 && units.iter().sum::<usize>() >= 2 * (TASK_COLS / col_unit) {
                assert_eq!(
                    units.len() % 2,
                    0,
                    "{m} x {n}: {} column blocks for two threads",
                    units.len()
                );
            }
        }
    }

    /// A `[k, n]` weight's values in the checkpoint's `[n, k]` order.
    pub(in crate::kernels) fn transpose<T: Copy>(w: &[T], k: usize, n: usize) -> Vec<T> {
        (0..n * k).map(|i| w[(i % k) * n + i / k]).collect()
    }

    /// One test product: activations, the weight in both orders, the f64 sums, their largest
    /// magnitude (at least 1) and the plain-Rust twin's result.
    struct Case {
        x: Vec<bf16>,
        w: Vec<bf16>,
        file: Vec<bf16>,
        want: Vec<f64>,
        scale: f64,
        plain: Vec<f32>,
    }

    impl Case {
        fn new(m: usize, k: usize, n: usize, seed: usize) -> Self {
            let x = values(m * k, seed);
            let w = values(k * n, seed + 1);
            let want = exact(&x, &w, m, k, n);
            let scale = want.iter().fold(1f64, |s, v| s.max(v.abs()));
            let plain = matmul_bf16_gemm_reference(&x, &w, WeightOrder::InputMajor, m, k, n).expect("sizes");
            let file = transpose(&w, k, n);
            Self {
                x,
                w,
                file,
                want,
                scale,
                plain,
            }
        }
    }

    #[test]
    fn gemm_equals_the_plain_code_and_the_f64_sum_in_both_weight_orders() {
        let simd = bf16_gemm_available();
        // Odd and even k (across slabs), widths with and without whole tiles and tasks,
        // row counts with and without whole tiles.
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 2, 48),
            (8, 7, 5),
            (9, 130, 49),
            (17, 257, 200),
            (16, 300, 193),
            (5, 517, 96),
            (23, 64, 400),
        ] {
            let Case {
                x,
                w,
                file,
                want,
                scale,
                plain,
            } = Case::new(m, k, n, 1);
            let plain_file =
                matmul_bf16_gemm_reference(&x, &file, WeightOrder::OutputMajor, m, k, n).expect("sizes");
            assert_eq!(plain, plain_file, "{m}x{k}x{n}: the two orders");
            for (i, (&p, &e)) in plain.iter().zip(&want).enumerate() {
                let err = (p as f64 - e).abs() / scale;
                assert!(err < 1e-5, "{m}x{k}x{n} at {i}: {p} vs {e}");
            }
            if simd {
                for (order, w) in [(WeightOrder::InputMajor, &w), (WeightOrder::OutputMajor, &file)] {
                    let fast = matmul_bf16_vdpbf16ps(&x, w, order, m, k, n).expect("available");
                    for (i, (&p, &f)) in plain.iter().zip(&fast).enumerate() {
                        // The same additions in the same order (`vdpbf16ps` flushes
                        // subnormal inputs, which these values do not have).
                        assert_eq!(p.to_bits(), f.to_bits(), "{m}x{k}x{n} {order:?} at {i}");
                    }
                }
            } else {
                assert!(matmul_bf16_gemm(&x, &w, WeightOrder::InputMajor, m, k, n).is_none());
            }
        }
    }

    #[test]
    fn amx_tiles_agree_with_the_plain_code_and_the_f64_sum_in_both_weight_orders() {
        if !amx::amx_bf16_available() {
            eprintln!("no AMX-BF16 on this CPU: skipped");
            assert!(
                matmul_bf16_amx(&values(4, 1), &values(8, 2), WeightOrder::InputMajor, 2, 2, 4).is_none()
            );
            return;
        }
        // Odd and even k (across 16-pair groups and 1024-pair slabs: k 2100 is two), partial
        // 32-row blocks, 32-column tiles and 256-column tasks, row splits of narrow products.
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 2, 48),
            (8, 7, 5),
            (33, 130, 49),
            (17, 257, 200),
            (64, 1100, 193),
            (70, 1025, 64),
            (5, 517, 96),
            (96, 64, 400),
            (40, 2100, 270),
            (9, 4097, 33),
        ] {
            let Case {
                x,
                w,
                file,
                want,
                scale,
                plain,
            } = Case::new(m, k, n, 3);
            for (order, w) in [(WeightOrder::InputMajor, &w), (WeightOrder::OutputMajor, &file)] {
                let tiles = matmul_bf16_amx(&x, w, order, m, k, n).expect("available");
                assert_eq!(
                    matmul_bf16_gemm(&x, w, order, m, k, n).as_ref(),
                    Some(&tiles),
                    "the dispatch"
                );
                for (i, ((&t, &p), &e)) in tiles.iter().zip(&plain).zip(&want).enumerate() {
                    // Both sum exact products in f32, grouped differently.
                    let (to_exact, to_plain) = ((t as f64 - e).abs() / scale, (t - p).abs() as f64 / scale);
                    assert!(
                        to_exact < 1e-5 && to_plain < 1e-5,
                        "{m}x{k}x{n} {order:?} at {i}: {t} vs {p}, {e}"
                    );
                }
            }
        }
    }

    /// f16 test values: both signs, magnitudes from 2^-6 to just under 2^3, random
    /// significands (so that most `lo` halves are not zero).
    fn f16_values(len: usize, seed: usize) -> Vec<f16> {
        (0..len)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (seed as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let h = h ^ (h >> 29);
                let significand = 1.0 + (h & 0x3FF) as f32 / 1024.0;
                let sign = if (h >> 10) & 1 == 1 { -1.0 } else { 1.0 };
                f16::from_f32(sign * significand * 2f32.powi(((h >> 11) % 9) as i32 - 6))
            })
            .collect()
    }

    /// Every finite f16 is the exact sum of its two bf16 halves (`lo` at most `2^-8` of
    /// `hi`), infinities keep a zero `lo`, and the vector split gives the same bits.
    #[test]
    fn f16_values_are_the_sums_of_their_bf16_halves() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for &v in &all {
            let pair = split_f16(v);
            let (hi, lo) = (widen(pair as u16), widen((pair >> 16) as u16));
            if v.is_finite() {
                assert_eq!(hi as f64 + lo as f64, v.to_f64(), "{v:?}");
                assert!(lo.abs() <= hi.abs() / 256.0, "{v:?}: {hi} + {lo}");
            } else {
                assert!(
                    lo == 0.0 && (hi == v.to_f32() || hi.is_nan() && v.is_nan()),
                    "{v:?}"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if bf16_gemm_available() {
            for (i, group) in all.chunks_exact(16).enumerate() {
                let mut got = [0u32; 16];
                // SAFETY: the CPU has AVX-512 F, BW and BF16; 16 values in, 16 out.
                unsafe {
                    use std::arch::x86_64::*;
                    let pairs = split_ps(_mm512_cvtph_ps(_mm256_loadu_si256(group.as_ptr().cast())));
                    _mm512_storeu_si512(got.as_mut_ptr().cast(), pairs)
                };
                let want: Vec<u32> = group.iter().map(|&v| split_f16(v)).collect();
                assert_eq!(got.to_vec(), want, "values {}..", 16 * i);
            }
        }
    }

    /// The pairs of a block of `x` (`[m, k]`) or of column `c` of `w` (`[k, n]`), as
    /// [`split_pair`] defines them, from the plain split.
    fn block_pairs(values: impl Fn(usize) -> f16, k: usize, b: usize, weight: bool) -> Vec<u32> {
        let mut halves = [0u32; F16_BLOCK];
        for (h, i) in halves.iter_mut().zip(b * F16_BLOCK..k.min((b + 1) * F16_BLOCK)) {
            *h = split_f16(values(i));
        }
        (0..F16_PAIRS).map(|r| split_pair(&halves, r, weight)).collect()
    }

    /// The activations' pairs (whole blocks in registers, a partial last block in plain code)
    /// are the blocks' [`split_pair`]s.
    #[test]
    fn f16_activation_pairs_follow_the_block_layout() {
        for (m, k) in [(3, 37), (2, 64), (1, 5)] {
            let x = f16_values(m * k, 5);
            let got = split_activations(&x, m, k);
            let blocks = k.div_ceil(F16_BLOCK);
            let want: Vec<u32> = (0..m)
                .flat_map(|r| (0..blocks).map(move |b| (r, b)).collect::<Vec<_>>())
                .flat_map(|(r, b)| block_pairs(|i| x[r * k + i], k, b, false))
                .collect();
            assert_eq!(got, want, "{m}x{k}");
        }
    }

    /// The f16 AMX product is, bit for bit, the bf16 AMX product of the pairs spelled out
    /// (`[m, 96 blocks]` activations, `[96 blocks, n]` weight), and within the dropped
    /// `lo x lo` terms (`2^-16` of each product) of the exact f64 sum, in both weight orders:
    /// odd `k` and `n`, partial blocks of inputs, rows and tiles, blocks across slabs
    /// (1024 pairs: k 1100 is 35 blocks, 1680 pairs).
    #[test]
    fn f16_amx_products_sum_the_exact_products_in_both_weight_orders() {
        if !amx::amx_bf16_available() {
            eprintln!("no AMX-BF16 on this CPU: skipped");
            let (x, w) = (f16_values(4, 1), f16_values(8, 2));
            assert!(matmul_f16_amx(&x, &w, WeightOrder::InputMajor, 2, 2, 4).is_none());
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 2, 48),
            (8, 7, 5),
            (33, 130, 49),
            (17, 257, 200),
            (70, 24, 64),
            (9, 515, 33),
            (40, 1100, 270),
        ] {
            let (x, w) = (f16_values(m * k, 1), f16_values(k * n, 2));
            let file = transpose(&w, k, n);
            let blocks = k.div_ceil(F16_BLOCK);
            let split_k = 2 * F16_PAIRS * blocks;
            let halves = |pairs: Vec<u32>| -> Vec<bf16> {
                pairs
                    .into_iter()
                    .flat_map(|p| [bf16::from_bits(p as u16), bf16::from_bits((p >> 16) as u16)])
                    .collect()
            };
            let x3: Vec<bf16> = (0..m)
                .flat_map(|r| {
                    halves(
                        (0..blocks)
                            .flat_map(|b| block_pairs(|i| x[r * k + i], k, b, false))
                            .collect(),
                    )
                })
                .collect();
            // `[n, 96 blocks]` rows, one per column, then in the `[k, n]` order.
            let w3_rows: Vec<bf16> = (0..n)
                .flat_map(|c| {
                    halves(
                        (0..blocks)
                            .flat_map(|b| block_pairs(|i| w[i * n + c], k, b, true))
                            .collect(),
                    )
                })
                .collect();
            let w3 = transpose(&w3_rows, n, split_k);
            let spelled =
                matmul_bf16_amx(&x3, &w3, WeightOrder::InputMajor, m, split_k, n).expect("available");
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (order, w) in [(WeightOrder::InputMajor, &w), (WeightOrder::OutputMajor, &file)] {
                let got = matmul_f16_amx(&x, w, order, m, k, n).expect("available");
                assert!(
                    bits(&got) == bits(&spelled),
                    "{m}x{k}x{n} {order:?}: the spelled-out product"
                );
                for (i, &g) in got.iter().enumerate() {
                    let (r, c) = (i / n, i % n);
                    let term = |kk: usize| {
                        let wv = match order {
                            WeightOrder::InputMajor => w[kk * n + c],
                            WeightOrder::OutputMajor => w[c * k + kk],
                        };
                        x[r * k + kk].to_f64() * wv.to_f64()
                    };
                    let want: f64 = (0..k).map(term).sum();
                    let size: f64 = (0..k).map(|kk| term(kk).abs()).sum();
                    // The dropped terms (at most 2^-16 of each) and f32 sums.
                    assert!(
                        (g as f64 - want).abs() <= size / (1 << 15) as f64,
                        "{m}x{k}x{n} {order:?} at {i}: {g} vs {want} (terms {size})"
                    );
                }
            }
        }
        assert!(
            matmul_f16_amx(
                &f16_values(4, 1),
                &f16_values(7, 2),
                WeightOrder::InputMajor,
                2,
                2,
                4
            )
            .is_none()
        );
    }

    /// The rounded AMX product has the bits of the f32 one plus the bias, rounded: with and
    /// without a bias, one slab and three (k 4100: scratch between slabs), partial blocks
    /// of rows and columns, a row split of a narrow product, both weight orders.
    #[test]
    fn rounded_amx_products_have_the_bits_of_the_rounded_f32_ones() {
        let bias_of = |n: usize| -> Vec<f32> { (0..n).map(|c| (c % 7) as f32 * 0.37 - 1.0).collect() };
        if !amx::amx_bf16_available() {
            eprintln!("no AMX-BF16 on this CPU: skipped");
            let (x, w) = (values(4, 1), values(8, 2));
            assert!(matmul_bf16_amx_rounded(&x, &w, WeightOrder::InputMajor, (2, 2, 4), None).is_none());
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (33, 130, 49),
            (70, 1025, 300),
            (617, 64, 40),
            (40, 4100, 270),
        ] {
            let Case { x, w, file, .. } = Case::new(m, k, n, 3);
            let bias = bias_of(n);
            for (order, w) in [(WeightOrder::InputMajor, &w), (WeightOrder::OutputMajor, &file)] {
                let sums = matmul_bf16_amx(&x, w, order, m, k, n).expect("available");
                for bias in [None, Some(bias.as_slice())] {
                    let rounded = matmul_bf16_amx_rounded(&x, w, order, (m, k, n), bias).expect("available");
                    let want: Vec<u16> = sums
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| bf16::from_f32(v + bias.map_or(0.0, |b| b[i % n])).to_bits())
                        .collect();
                    let got: Vec<u16> = rounded.iter().map(|v| v.to_bits()).collect();
                    assert!(got == want, "{m}x{k}x{n} {order:?} bias {}", bias.is_some());
                }
            }
            assert!(
                matmul_bf16_amx_rounded(&x, &w, WeightOrder::InputMajor, (m, k, n), Some(&bias[1..]))
                    .is_none()
            );
        }
    }

    /// The AMX product of a packed q8/q4 weight, dequantized in the tasks' panels, has the
    /// bits of the same product on the weight's whole bf16 dequantization: one slab and
    /// several (k past 2048 pairs), one task and several, narrow products split by rows,
    /// inputs that end inside a 16-pair group, and 8-, 16- and 32-row blocks.
    #[test]
    fn packed_weights_dequantized_in_the_amx_panels_keep_the_bits() {
        use crate::kernels::packed::Bits;
        use crate::kernels::packed::tests::random_packed;

        let mut next = crate::kernels::tests::xorshift(0x9E37_79B9_7F4A_7C15);
        for &(m, k, n, block) in &[
            (33, 96, 48, 32),
            (70, 4160, 304, 32),
            (45, 40, 32, 8),
            (617, 128, 16, 16),
        ] {
            for bits in [Bits::Eight, Bits::Four] {
                let case = format!("{m}x{k}x{n}/{block} {bits:?}");
                let packed = random_packed(bits, [k, n], block, &mut next);
                let x = values(m * k, 7);
                let bias: Vec<f32> = (0..n).map(|c| (c % 5) as f32 * 0.25 - 0.5).collect();
                let dequantized = packed.dequantize_bf16();
                for bias in [None, Some(bias.as_slice())] {
                    let want =
                        matmul_bf16_amx_rounded(&x, &dequantized, WeightOrder::InputMajor, (m, k, n), bias);
                    let got = matmul_bf16_amx_rounded_packed(&x, &packed, m, bias);
                    let Some(want) = want else {
                        assert!(got.is_none(), "{case}: ran without AMX");
                        continue;
                    };
                    let got = got.expect("AMX ran the dense product");
                    let (got, want): (Vec<u16>, Vec<u16>) = (
                        got.iter().map(|v| v.to_bits()).collect(),
                        want.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert!(got == want, "{case} bias {}", bias.is_some());
                }
                assert!(
                    matmul_bf16_amx_rounded_packed(&x[1..], &packed, m, None).is_none(),
                    "{case}"
                );
            }
        }
        if !amx::amx_bf16_available() {
            eprintln!("no AMX-BF16 on this CPU: only the refusals were checked");
        }
    }

    /// Inside `sharing_activations` one slice is packed once, other slices (or the same
    /// length read as other rows) are not mistaken for it, nothing is kept after it, and every
    /// product keeps its bits.
    #[test]
    fn shared_activations_are_packed_once_and_keep_the_bits() {
        let (m, k, n) = (40, 130, 70);
        let (x, other) = (values(m * k, 1), values(m * k, 9));
        let ws = [values(k * n, 2), values(k * n, 3)];
        let same = |a: &std::rc::Rc<Pairs>, b: &std::rc::Rc<Pairs>| std::rc::Rc::ptr_eq(a, b);
        sharing_activations(|| {
            let first = shared_pairs(&x, m, k);
            assert!(same(&first, &shared_pairs(&x, m, k)), "packed again");
            assert!(!same(&first, &shared_pairs(&other, m, k)), "another slice");
            assert!(
                !same(&shared_pairs(&x, m, k), &shared_pairs(&x, 2 * m, k / 2)),
                "another row length"
            );
        });
        assert!(SHARED.with_borrow(|s| s.is_none()), "kept after the call");
        if !amx::amx_bf16_available() {
            eprintln!("no AMX-BF16 on this CPU: the products skipped");
            return;
        }
        let product = |x: &[bf16], w: &[bf16]| {
            let out =
                matmul_bf16_amx_rounded(x, w, WeightOrder::InputMajor, (m, k, n), None).expect("available");
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let alone = [product(&x, &ws[0]), product(&x, &ws[1]), product(&other, &ws[0])];
        let shared =
            sharing_activations(|| [product(&x, &ws[0]), product(&x, &ws[1]), product(&other, &ws[0])]);
        assert!(alone == shared, "the bits of each product");
    }

    /// Pairs written for whole tile groups (the 64-byte vector moves), a group short of one
    /// value, one value past a group and a group short of pairs, on any CPU: each slot the two
    /// values' bits (the first in the low half), an odd last value with zero, zeros after.
    #[test]
    fn written_pairs_hold_the_values_in_order_then_zeros() {
        for &(len, slots) in &[(32, 16), (31, 16), (33, 17), (32, 17), (30, 17), (0, 3)] {
            let xs: Vec<bf16> = (0..len).map(|i| bf16::from_bits(0x3f00 + 7 * i as u16)).collect();
            let mut dst = vec![MaybeUninit::new(u32::MAX); slots];
            write_pairs(&mut dst, &xs);
            for (p, slot) in dst.iter().enumerate() {
                // SAFETY: every slot was initialized above.
                let got = unsafe { slot.assume_init() };
                let bits = |i: usize| xs.get(i).map_or(0, |v| u32::from(v.to_bits()));
                assert_eq!(got, bits(2 * p) | bits(2 * p + 1) << 16, "{len} values, slot {p}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let w = values(4 * 3, 0);
        let x = values(4, 1);
        assert!(matmul_bf16_gemm_reference(&x, &w, WeightOrder::InputMajor, 1, 4, 3).is_some());
        assert!(matmul_bf16_gemm_reference(&x[..3], &w, WeightOrder::InputMajor, 1, 4, 3).is_none());
        assert!(matmul_bf16_gemm_reference(&x, &w[..11], WeightOrder::OutputMajor, 1, 4, 3).is_none());
        assert!(matmul_bf16_gemm_reference(&[], &w, WeightOrder::InputMajor, 0, 4, 3).is_none());
    }
}
