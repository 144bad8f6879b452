//! Decode products with weights in the checkpoint's `[n, k]` order (PyTorch's `[out, in]`).
//!
//! The safetensors loader uses a tensor whose dtype is the load dtype in place, from a
//! memory map of its file (no copy, nothing written, see `vipllava-convert`); a `Linear`
//! weight is then Burn's `[k, n]` parameter as a transposed view of the file's `[n, k]`
//! rows. Each output is the dot product of an activation row with one contiguous weight
//! row, so a task streams whole rows front to back (llama.cpp's layout).
//!
//! Every dot product has one fixed order: 16 lanes, lane `l` taking the values
//! `l, l + 16, ...` (the last partial group included), then the lanes summed pairwise
//! (`l + 8`, `l + 4`, `l + 2`, `l + 1`). The result does not depend on the thread count or
//! on the vector extension. bf16 weights with bf16 activations use `vdpbf16ps` where the
//! CPU has AVX-512 BF16: lane `l` then takes the pairs `2l, 2l + 1` of every 32 values
//! (odd one first, as the instruction adds them), with the same final sum.
//!
//! A batch's decode step has several activation rows: the SIMD kernels take a group of them
//! through each weight row at once (one accumulator per row and lane set), so each weight
//! value is loaded and widened once per group rather than once per row. Every row's sum keeps
//! the order above, so a row's result is the same alone or in a batch. The exceptions: bf16 x
//! bf16 products of 4 to 16 rows, and f16 products of 6 to 16 rows, run on AMX tiles where
//! the CPU has them, 16 weight rows against all the activation rows per instruction, and add
//! in the tiles' order (a row's result then depends on the row count reaching 4 or 6, never
//! on the other rows' values).

use burn::tensor::{Element, bf16, f16};

#[cfg(target_arch = "x86_64")]
use super::amx;
#[cfg(target_arch = "x86_64")]
use super::bf16_dot::as_bh;
use super::bf16_dot::widen;
use super::{Simd, Widen};
#[cfg(target_arch = "x86_64")]
use super::{widen8, widen16};

/// Lanes of every dot product.
const LANES: usize = 16;
/// Output columns per task (whole rows of the weight each).
const COLUMNS_PER_TASK: usize = 32;
/// Activation rows that the f32 and f16 SIMD kernels take through one pass over a weight row
/// (a batch's decode step has several): each weight value is loaded and widened once for
/// all of them. Row by row, a task's weight rows came from L2 again for each activation row
/// after the first, and f16 widened every value again. Four rows' f32 activations (32 KB at
/// k = 2048) fit a 48 KB L1; with eight they did not, and the f16 and f32 products of 8 rows
/// ran slower than with two groups of four (`stream_kernels`, `rows-batch` table, round 38).
/// Longer rows (the down projection's) run in blocks along `k` ([`GROUP_ACTIVATION_BYTES`]).
const ROW_GROUP: usize = 4;
/// [`ROW_GROUP`] for bf16 weights with bf16 activations: `vdpbf16ps` takes 32 values per
/// instruction, and eight rows' activations, 2 bytes a value, take what four f32 rows take.
const BF16_ROW_GROUP: usize = 8;
// The kernels' `match`es list every smaller group size and send the rest to the full group.
const _: () = assert!(ROW_GROUP == 4 && BF16_ROW_GROUP == 8, "update the group matches");
/// How far ahead of its loads [`dots_avx512`] asks for the weight row's bytes. On the AMX
/// Xeon of round 26 (BENCHMARKS.md) the hardware prefetchers alone left the 1.1B f32 decode
/// at 5.6-5.8 tok/s; with the hint 2048 bytes ahead 6.2-6.3 (1024: 6.0-6.1, 4096: 6.1-6.2,
/// 8192: 5.9-6.0), about llama.cpp's rate there. Tuned on one row per pass; with a group of
/// rows per weight row the same distance is reached later in time (not re-tuned).
const ROW_PREFETCH_BYTES: usize = 2048;
/// How far ahead of its loads [`fma_avx2`] asks for a 2-byte (f16, bf16) weight row's bytes.
/// f32 rows keep up with memory without it (94% of the read bound in round 45); f16 and bf16
/// rows, widened 8 values per instruction, reached 65-71% there. On that Zen 3 (round 45,
/// BENCHMARKS.md) a 1.1B decode step's products (`rows-step` table, 1 row) took 0.87-0.88x
/// their time without the hint at 1024 bytes ahead (medians of 8 alternations; 2048 and 4096
/// were within the noise); a C loop of the same widening multiply-adds read 16-19 GB/s
/// without it and 19-25 GB/s with it (1-8 KB ahead) on two threads.
const HALF_ROW_PREFETCH_BYTES: usize = 1024;
/// How far ahead of its loads [`Bf16Dots::group_simd`] asks for the weight row's bytes (a
/// task's rows are one sequential stream per group of activation rows, so past a row's end
/// the hint reaches into the next; past the task's last row it asks for bytes nobody reads,
/// at no risk). Tuned on one activation row per pass, like [`ROW_PREFETCH_BYTES`].
/// On the AMX Xeon of round 33 (BENCHMARKS.md) the 1.1B bf16 decode ran 8.8-9.2 tok/s without
/// the hint, 10.2-10.7 with it 1024 bytes ahead, 10.7-11.8 at 2048 and 11.1-11.7 at 4096
/// (interleaved, 4 rounds); in a slower window 2048 gave 9.7-10.2, 4096 10.1-10.6, 8192
/// 9.1-10.5, 16384 9.1-9.5.
const BF16_ROW_PREFETCH_BYTES: usize = 4096;
/// Bytes of a group's f32 activations that one pass over the task's weight rows reads
/// (32 KB fits a 48 KB L1 beside the weight stream). In [`matmul_rows`] (f32 activations,
/// f32, f16 or bf16 weights) a group whose rows are longer runs in blocks along `k`: each
/// block of its activations goes through the same block of every weight row of the task,
/// and each row's lanes carry over from block to block (so each sum keeps its order).
/// Unblocked, four rows of the 1.1B down projection (k = 5632, 90 KB) came from L2 for every
/// weight vector, and its f16 products of 8 rows took 1.6-1.9x the time of the gate
/// projection's (k = 2048), which has as many values (`rows-batch` table, round 38). The
/// bf16 x bf16 kernel ([`matmul_rows_bf16`]) takes its rows whole: in blocks (whole 64
/// values, 2 bytes a value) its decode steps of 4-16 rows ran 6-22% slower (`rows-step`
/// table, round 39), the weight rows read in short segments.
const GROUP_ACTIVATION_BYTES: usize = 32 * 1024;
/// [`GROUP_ACTIVATION_BYTES`] for groups of 2 or more rows on AVX2. Four f32 rows of 2048
/// values fill Zen 3's whole 32 KB L1, so the weight stream evicted them and every weight
/// vector's four activation loads came from L2. In 16 KB blocks the segments of the weight
/// rows ran slower still (round 45), until each block asked for the segment the task reads
/// next ([`fma_avx2`]'s `ahead`): the hardware prefetchers do not follow a jump to the next
/// row's segment. One row keeps the budget above and its hint (its decode reads at the
/// memory's rate).
const AVX2_GROUP_ACTIVATION_BYTES: usize = 16 * 1024;
/// Activation rows from which [`matmul_rows_bf16`] multiplies on AMX tiles where the CPU has
/// them ([`super::amx::amx_bf16_available`]): 16 weight rows, read where they lie, against
/// all the rows at once ([`super::amx::Tiles::weight_rows16`]). `vdpbf16ps` takes each
/// weight vector once per activation row, and from about 4 rows on a step's products wait
/// on those instructions rather than on memory (`rows-step` table: 8 and 16 rows took 1.5x
/// and 2.8x the time of one). On the AMX Xeon of round 40 (BENCHMARKS.md) a 1.1B
/// step of 4 rows took 1.0-1.1x one row's time on tiles against 1.2-1.3x with `vdpbf16ps`;
/// at 2-3 rows the two were level within the noise, and one row keeps `vdpbf16ps`.
const AMX_MIN_ROWS: usize = 4;
/// How far ahead of its tile loads [`super::amx::Tiles::weight_rows16`] asks for each
/// weight row's bytes (16 streams at once, one per row of the tile). Round 40: 512 and
/// 1024 level, 2048 slower, no hints slower still (1.1B steps of 8 and 16 rows).
const AMX_ROW_PREFETCH_BYTES: usize = 512;
/// Activation rows from which [`matmul_rows_f16`] multiplies on AMX tiles, each f16 value
/// split into two bf16 halves: the weight's split costs the same for any row count, so it
/// pays only where the f32 multiply-adds of several rows cost more.
const F16_AMX_MIN_ROWS: usize = 6;

/// The length of the blocks along `k` for a group of `rows` f32 activation rows over the
/// first `whole` values of a row (a multiple of 16): a multiple of 16, at most `budget`
/// bytes for the group where that leaves 16 values, and the blocks about equal. `whole`
/// itself (one block) when it fits.
fn k_block(whole: usize, rows: usize, budget: usize) -> usize {
    let most = (budget / (rows * size_of::<f32>()) / LANES * LANES).max(LANES);
    let blocks = whole.div_ceil(most).max(1);
    whole.div_ceil(blocks).div_ceil(LANES) * LANES
}

/// `x [rows, k] @ w^T` for `w` stored `[n, k]`, in f32.
pub fn matmul_rows<T: Widen + Element>(x: &[f32], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32> {
    matmul_rows_on(Simd::best(), x, w, rows, k, n)
}

/// [`matmul_rows`] at the instruction level `path`; every level gives the same bits.
fn matmul_rows_on<T: Widen + Element>(
    path: Simd,
    x: &[f32],
    w: &[T],
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "activations");
    assert_eq!(w.len(), n * k, "weight");
    let path = if path.runs_here() { path } else { Simd::Plain };
    by_column_tasks(rows, n, |j0, out| {
        let task = DenseDots { x, w, rows, k, j0 };
        match path {
            // SAFETY: the CPU runs this level (checked above), so it has its features.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { task.run_avx2(out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { task.run_avx512(out) },
            _ => task.run(out, dot),
        }
    })
}

/// [`matmul_rows`] for an f16 weight, and for 6 to 16 rows (`F16_AMX_MIN_ROWS`) (with `k` a
/// multiple of 32 and activations that are f16 values) on AMX tiles where the CPU has them.
/// There each f16 value `v` is the exact sum of two bf16 values: `v_hi`, its first 8
/// significant bits (the upper half of its f32), and `v_lo`, the rest (at most 3 bits, below
/// `2^-7` of `v`). `x w` is `x_hi w_hi + x_lo w_hi + x_hi w_lo + x_lo w_lo`; the last term,
/// below `2^-14` of the product, is left out, and the other three are exact in f32 and added
/// in the tiles' order. A row's result then depends on whether its batch had that many rows
/// (never on the other rows' values). NaN propagates; an infinite weight gives NaN (its rest
/// is `inf - inf`), and an infinite activation NaN where it meets a weight whose split has a
/// zero half (the f32 path gives NaN too as soon as it meets weights of both signs).
pub fn matmul_rows_f16(x: &[f32], w: &[f16], rows: usize, k: usize, n: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if (F16_AMX_MIN_ROWS..=amx::TILE_ROWS).contains(&rows)
        && f16_tiles_run_here()
        // SAFETY: the CPU has what the tiles and the tail columns' kernel need (checked).
        && let Some(out) = unsafe { matmul_rows_f16_amx(x, w, rows, k, n) }
    {
        return out;
    }
    matmul_rows(x, w, rows, k, n)
}

/// Whether [`matmul_rows_f16_amx`] runs here: AMX-BF16, and AVX-512 F, BW, BF16 (the
/// splits) and FMA (the tail columns' kernel).
#[cfg(target_arch = "x86_64")]
fn f16_tiles_run_here() -> bool {
    super::amx::amx_bf16_available()
        && super::bf16_gemm::bf16_gemm_available()
        && Simd::best() == Simd::Avx512
}

/// [`matmul_rows_f16`] on AMX tiles: the activations split and packed once, three tiles per
/// 32 inputs ([`f16_activation_tiles`]), then per task 32 weight rows at a time (16 for a
/// last half), each block of 32 values split in registers into three tiles of weight pairs
/// ([`f16_tiles`]); a task's last columns that do not fill a tile take [`matmul_rows`]'s
/// path. `None` when `k` is not a multiple of 32 or an activation is not an f16 value.
///
/// # Safety
/// The CPU must have what [`f16_tiles_run_here`] checks.
#[cfg(target_arch = "x86_64")]
unsafe fn matmul_rows_f16_amx(x: &[f32], w: &[f16], rows: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    const TILE: usize = amx::TILE_ROWS;
    assert!(rows <= TILE && x.len() == rows * k && w.len() == n * k, "sizes");
    if k == 0 || !k.is_multiple_of(2 * LANES) {
        return None;
    }
    let pairs = f16_activation_tiles(x, rows, k)?;
    by_column_tasks(rows, n, |j0, out| {
        let columns = out.len() / rows;
        let Some(tiles) = amx::Tiles::new() else {
            unreachable!("matmul_rows_f16 checked that AMX is available")
        };
        let mut sums = TileSums([[0f32; TILE * TILE]; 2]);
        let mut t = 0;
        while t + TILE <= columns {
            let halves = if t + 2 * TILE <= columns { 2 } else { 1 };
            let ws = &w[(j0 + t) * k..(j0 + t + halves * TILE) * k];
            // SAFETY: the CPU has AMX-BF16 and AVX-512 F, BW and BF16 (the caller's
            // promise); `ws` is 16 or 32 rows of `k` values, `pairs` three tiles per 32
            // values.
            unsafe {
                match halves {
                    2 => f16_tiles::<2>(&tiles, ws, k, &pairs, &mut sums.0),
                    _ => f16_tiles::<1>(&tiles, ws, k, &pairs, &mut sums.0),
                }
            };
            for (h, sums) in sums.0.iter().enumerate().take(halves) {
                for j in 0..TILE {
                    let column = &mut out[(t + h * TILE + j) * rows..][..rows];
                    column.copy_from_slice(&sums[j * TILE..][..rows]);
                }
            }
            t += halves * TILE;
        }
        if t < columns {
            let dots = DenseDots {
                x,
                w,
                rows,
                k,
                j0: j0 + t,
            };
            // SAFETY: the CPU has AVX-512 F and FMA (the caller's promise).
            unsafe { dots.run_avx512(&mut out[t * rows..]) };
        }
    })
    .into()
}

/// The activation tiles of [`matmul_rows_f16_amx`], three per block of 32 inputs (16
/// columns each, those past `rows` zero): row `p` of the first holds `(x_hi, x_lo)` of input
/// `p` of each activation row, of the second the same for input `16 + p`, of the third
/// `(x_hi, x_hi)` of inputs `2p` and `2p + 1`. Against the weight pairs of
/// [`weight_groups`] they give `x_hi w_hi + x_lo w_hi` and `x_hi w_lo`. A NaN is a quiet
/// NaN `x_hi` and an infinity keeps its `x_hi`, each with a zero `x_lo`. `None` when a
/// finite value is not an f16 value.
fn f16_activation_tiles(x: &[f32], rows: usize, k: usize) -> Option<super::AlignedVec<u32>> {
    const TILE: usize = 16;
    assert!(rows <= TILE && x.len() == rows * k && k.is_multiple_of(2 * TILE));
    let mut tiles = super::aligned_zeros::<u32>(k / (2 * TILE) * 3 * TILE * TILE);
    for (r, row) in x.chunks_exact(k).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            let (hi, lo) = if v.is_nan() {
                (0x7FC0, 0)
            } else if v.is_infinite() {
                (v.to_bits() >> 16, 0)
            } else if f16::from_f32(v).to_f32() != v {
                return None;
            } else {
                let hi = v.to_bits() >> 16;
                // Exact, and so a bf16 value (its lower half zero): `v` has 11 significant bits.
                (hi, (v - f32::from_bits(hi << 16)).to_bits() >> 16)
            };
            let (b, within) = (i / (2 * TILE), i % (2 * TILE));
            // Block `b`'s tiles start at tile `3b`.
            tiles[((3 * b + within / TILE) * TILE + within % TILE) * TILE + r] = hi | (lo << 16);
            let third = &mut tiles[((3 * b + 2) * TILE + within / 2) * TILE + r];
            *third |= hi << (16 * (within % 2));
        }
    }
    Some(tiles)
}

/// `N` AMX tiles of 16 rows of 64 bytes in memory, on cache lines: sums stored from the tiles
/// (as f32), or weight pairs for them (as bits), which `_mm512_store_si512` needs aligned.
#[repr(C, align(64))]
struct TileSums<const N: usize>([[f32; 256]; N]);

/// The activation tiles of [`matmul_rows_bf16_amx`] from `rows` (at most 16) rows of `k`
/// bf16 values (`k` a multiple of 32), one tile per 32 values: group `g`'s row `p` holds the
/// pair `32 g + 2p, 32 g + 2p + 1` of each row (16 columns, those past `rows` zero), paired
/// as they are read, without a copy of the pairs first.
fn bf16_tiles(xb: &[u16], rows: usize, k: usize) -> super::AlignedVec<u32> {
    const TILE: usize = 16;
    assert!(rows <= TILE && xb.len() == rows * k && k.is_multiple_of(2 * TILE));
    let mut tiles = super::aligned_zeros::<u32>(k / 2 * TILE);
    for (r, row) in xb.chunks_exact(k).enumerate() {
        for (i, pair) in row.chunks_exact(2).enumerate() {
            tiles[i * TILE + r] = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
        }
    }
    tiles
}

/// Sums of `16 H` f16 weight rows (`ws`, `k` values each, `k` a multiple of 32; `H` 1 or 2)
/// against the activation tiles `pairs` ([`f16_activation_tiles`]) into `sums[..H]`: per
/// block of 32 values, each row split into its three 64-byte rows of weight pairs
/// ([`weight_groups`]), then the tile products ([`super::amx::Tiles::f16_block32`] or
/// [`super::amx::Tiles::f16_block16`]). Each row's bytes are asked for
/// [`AMX_ROW_PREFETCH_BYTES`] ahead.
///
/// # Safety
/// The CPU must have AMX-BF16 and AVX-512 F, BW and BF16, and `tiles` be this thread's
/// only one; `ws` must hold `16 H k` values and `pairs` `3 k / 32` tiles of 256 pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn f16_tiles<const H: usize>(
    tiles: &amx::Tiles,
    ws: &[f16],
    k: usize,
    pairs: &[u32],
    sums: &mut [[f32; 256]; 2],
) {
    use std::arch::x86_64::*;
    const TILE: usize = amx::TILE_ROWS;
    let blocks = k / (2 * LANES);
    assert!((1..=2).contains(&H) && ws.len() == H * TILE * k && pairs.len() >= blocks * 3 * TILE * TILE);
    // The three tiles of weight pairs of each half, for one block.
    let mut a = TileSums([[0f32; TILE * TILE]; 6]);
    // SAFETY: `tiles` is this thread's only one (the caller's promise).
    unsafe { tiles.f16_sums_zero() };
    for b in 0..blocks {
        for j in 0..H * TILE {
            // SAFETY: values `b * 32..b * 32 + 32` of row `j`, inside `ws` (asserted above);
            // the prefetch is a hint, which never faults.
            unsafe {
                let src = ws.as_ptr().add(j * k + b * 2 * LANES);
                _mm_prefetch::<_MM_HINT_T0>(src.cast::<i8>().wrapping_add(AMX_ROW_PREFETCH_BYTES));
                let first = _mm512_cvtph_ps(_mm256_loadu_si256(src.cast()));
                let second = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(LANES).cast()));
                let (h, row) = (j / TILE, j % TILE);
                for (g, v) in weight_groups(first, second).into_iter().enumerate() {
                    _mm512_store_si512(a.0[3 * h + g].as_mut_ptr().add(row * TILE).cast(), v);
                }
            }
        }
        let b_tiles = pairs[b * 3 * TILE * TILE..].as_ptr().cast();
        // SAFETY: `a` holds 6 KB (3 KB per half), and block `b`'s three activation tiles
        // are 3 KB of `pairs`.
        unsafe {
            if H == 2 {
                tiles.f16_block32(a.0.as_ptr().cast(), b_tiles);
            } else {
                tiles.f16_block16(a.0.as_ptr().cast(), b_tiles);
            }
        }
    }
    // SAFETY: as above.
    unsafe { tiles.f16_sums_store(sums) };
}

/// The three 64-byte rows of weight pairs of 32 f16 weights (`first`: values `0..16`,
/// `second`: `16..32`, widened to f32) for the tiles of [`f16_activation_tiles`]:
/// `(w_hi, w_hi)` of each of the 32 values, then `(w_lo, w_lo)` of each two. `w_hi` is the
/// upper half of each f32, `w_lo` the exact rest as bf16 (its f32's lower half is zero).
/// Cut rather than rounded to nearest as the f16 prefill splits (`bf16_gemm::split_ps`,
/// which bounds the left-out product by `2^-16` instead of `2^-14`): the split is most of
/// these products' work, and with the prefill's split (and its layout of the weight pairs)
/// a 1.1B step of 8 or 16 rows took 2.3x and 2.7x one row's time, against 1.9x and 2.25x
/// (round 40).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn weight_groups(
    first: std::arch::x86_64::__m512,
    second: std::arch::x86_64::__m512,
) -> [std::arch::x86_64::__m512i; 3] {
    use std::arch::x86_64::*;
    let upper = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    // `(f >> 16) | (f & upper)`: the upper half twice (0xF8 = a | (b & c)).
    let doubled = |f: __m512| {
        let f = _mm512_castps_si512(f);
        _mm512_ternarylogic_epi32::<0xF8>(_mm512_srli_epi32::<16>(f), f, upper)
    };
    let rest = |f: __m512| {
        let hi = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(f), upper));
        _mm512_castps_si512(_mm512_sub_ps(f, hi))
    };
    // 16-bit lanes 1, 3, .. of the first rest, then of the second: each `w_lo` as bf16.
    let odd = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15,
        13, 11, 9, 7, 5, 3, 1,
    );
    [
        doubled(first),
        doubled(second),
        _mm512_permutex2var_epi16(rest(first), odd, rest(second)),
    ]
}

/// `x [rows, k] @ w^T` for bf16 `w` stored `[n, k]` and activations that are bf16 values
/// (widened to f32), with `vdpbf16ps` where the CPU has it, and for 4 (`AMX_MIN_ROWS`) to
/// 16 rows (with `k` a multiple of 32) on AMX tiles where it has those: each sum then adds its
/// products in the tiles' order, so a row's bits depend on whether its batch had that many
/// rows (not on the other rows' values). `None` when an activation is not a bf16 value or
/// the sizes do not match.
pub fn matmul_rows_bf16(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    let simd = super::bf16_dot::bf16_dot_available();
    let tiles = simd && rows >= AMX_MIN_ROWS && super::amx::amx_bf16_available();
    matmul_rows_bf16_with(x, w, rows, k, n, simd, tiles)
}

/// [`matmul_rows_bf16`] with `vdpbf16ps` for every row count (no AMX tiles), where the CPU
/// has it; for the tests and the kernel tables.
pub fn matmul_rows_bf16_dots(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    matmul_rows_bf16_with(x, w, rows, k, n, super::bf16_dot::bf16_dot_available(), false)
}

/// [`matmul_rows_bf16`] in plain Rust on every CPU (the same bits).
pub fn matmul_rows_bf16_reference(
    x: &[f32],
    w: &[bf16],
    rows: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    matmul_rows_bf16_with(x, w, rows, k, n, false, false)
}

/// `simd`: `vdpbf16ps` (the CPU must have AVX-512 F, BW and BF16); `tiles`: AMX tiles as
/// well, for `k` a multiple of 32 and at most 16 rows (the CPU must have them, and `simd`).
fn matmul_rows_bf16_with(
    x: &[f32],
    w: &[bf16],
    rows: usize,
    k: usize,
    n: usize,
    simd: bool,
    tiles: bool,
) -> Option<Vec<f32>> {
    if x.len() != rows * k || w.len() != n * k || x.iter().any(|v| v.to_bits() & 0xFFFF != 0) {
        return None;
    }
    let xb: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    // SAFETY of the reinterpretation: `bf16` is a `u16` bit pattern (`repr(transparent)`).
    let wb: &[u16] = bytemuck::cast_slice(w);
    #[cfg(target_arch = "x86_64")]
    if simd && tiles && k.is_multiple_of(2 * LANES) && rows <= amx::TILE_ROWS {
        // SAFETY: `simd` and `tiles` are only true when the CPU has AVX-512 F, BW and BF16
        // and AMX-BF16 (this function's contract).
        return Some(unsafe { matmul_rows_bf16_amx(&xb, wb, rows, k, n) });
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = tiles;
    Some(by_column_tasks(rows, n, |j0, out| {
        let dots = Bf16Dots {
            x: &xb,
            w: wb,
            rows,
            k,
            j0,
        };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when the CPU has AVX-512 F, BW and BF16.
            unsafe { dots.run_simd(out) };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        dots.run_plain(out);
    }))
}

/// [`matmul_rows_bf16`] on AMX tiles: the activations packed once as tiles of pairs (16
/// columns, the rows past `rows` zero), then per task 16 weight rows at a time against all
/// of them; a task's last columns that do not fill a tile go through `vdpbf16ps`.
/// `k` must be a multiple of 32 and `rows` at most 16.
///
/// # Safety
/// The CPU must have AMX-BF16 and AVX-512 F, BW and BF16.
#[cfg(target_arch = "x86_64")]
unsafe fn matmul_rows_bf16_amx(xb: &[u16], w: &[u16], rows: usize, k: usize, n: usize) -> Vec<f32> {
    const TILE: usize = amx::TILE_ROWS;
    assert!(k.is_multiple_of(2 * LANES) && rows <= TILE && xb.len() == rows * k && w.len() == n * k);
    let groups = k / (2 * LANES);
    let pairs = bf16_tiles(xb, rows, k);
    by_column_tasks(rows, n, |j0, out| {
        let columns = out.len() / rows;
        let Some(tiles) = amx::Tiles::new() else {
            unreachable!("matmul_rows_bf16 checked that AMX is available")
        };
        let mut sums = TileSums([[0f32; TILE * TILE]; 2]);
        let mut t = 0;
        while t + TILE <= columns {
            // SAFETY: rows `j0 + t..j0 + t + 16` of `w` exist (`out` has a column for each),
            // each `k` bf16 values (64 bytes per group), `2k` bytes apart; `pairs` holds
            // `groups` tiles of 1 KB; the tiles are this thread's.
            unsafe {
                tiles.weight_rows16(
                    w.as_ptr().add((j0 + t) * k).cast(),
                    2 * k,
                    pairs.as_ptr().cast(),
                    groups,
                    AMX_ROW_PREFETCH_BYTES,
                    &mut sums.0,
                )
            };
            let [even, odd] = &sums.0;
            for j in 0..TILE {
                for r in 0..rows {
                    out[(t + j) * rows + r] = even[j * TILE + r] + odd[j * TILE + r];
                }
            }
            t += TILE;
        }
        if t < columns {
            let dots = Bf16Dots {
                x: xb,
                w,
                rows,
                k,
                j0: j0 + t,
            };
            // SAFETY: the CPU has AVX-512 F, BW and BF16 (the caller's promise).
            unsafe { dots.run_simd(&mut out[t * rows..]) };
        }
    })
}

/// Runs `task(j0, out)` for each block of [`COLUMNS_PER_TASK`] output columns starting at
/// `j0` (`out`: the block's results, column by column, `rows` each) and returns `[rows, n]`.
fn by_column_tasks(rows: usize, n: usize, task: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut by_column = vec![0f32; n * rows];
    if rows == 0 {
        return by_column;
    }
    super::team::for_each_chunk_mut(&mut by_column, COLUMNS_PER_TASK * rows, |t, out| {
        task(t * COLUMNS_PER_TASK, out)
    });
    if rows == 1 {
        return by_column;
    }
    let mut out = vec![0f32; rows * n];
    for (j, column) in by_column.chunks(rows).enumerate() {
        for (r, &v) in column.iter().enumerate() {
            out[r * n + j] = v;
        }
    }
    out
}

/// The lanes of a dot product summed in the fixed pairwise order.
#[inline(always)]
fn lane_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// The body of [`DenseDots::run_avx512`] and [`DenseDots::run_avx2`]: each group of
/// [`ROW_GROUP`] activation rows (or fewer) through [`DenseDots::group`] with `$dots`, or
/// through [`DenseDots::group_blocked`] with `$part` where its rows are long. A macro, so
/// that the kernels' closures are written inside the calling `#[target_feature]` function
/// and inlined there (each group size is a const generic of its own).
#[cfg(target_arch = "x86_64")]
macro_rules! dense_groups {
    ($dense:ident, $out:ident, $dots:ident, $part:ident, $budget:expr) => {
        for_row_groups($dense.rows, ROW_GROUP, |r0, size| {
            let budget: fn(usize) -> usize = $budget;
            macro_rules! arm {
                ($r:expr) => {
                    match $dense.blocks(size, budget(size)) {
                        None => $dense.group::<{ $r }>(r0, $out, |w, xs| unsafe { $dots(w, xs) }),
                        Some(b) => {
                            $dense.group_blocked::<{ $r }>(r0, $out, b, |w, xs, c0, c1, l, ahead| unsafe {
                                $part(w, xs, c0, c1, l, ahead)
                            })
                        }
                    }
                };
            }
            match size {
                1 => arm!(1),
                2 => arm!(2),
                3 => arm!(3),
                _ => arm!(ROW_GROUP),
            }
        })
    };
}

/// One task of [`matmul_rows`]: the output columns `j0..` (as many as `out` holds).
struct DenseDots<'a, T> {
    x: &'a [f32],
    w: &'a [T],
    rows: usize,
    k: usize,
    j0: usize,
}

impl<T: Widen + Element> DenseDots<'_, T> {
    /// Fills `out` (column by column, `rows` each) with `dot(weight row, activation row)`.
    ///
    /// One weight row at a time: each task reads its rows as one sequential stream (four
    /// rows per pass, one activation load for four, read four streams a row apart: 20-25%
    /// slower on the Zen 4 machine of round 14, like the bf16 kernel of round 13). Each
    /// row's sum is the same either way.
    #[inline(always)]
    fn run(&self, out: &mut [f32], dot: impl Fn(&[T], &[f32]) -> f32) {
        let (k, rows) = (self.k, self.rows);
        for r in 0..rows {
            let xr = &self.x[r * k..(r + 1) * k];
            for j in 0..out.len() / rows {
                out[j * rows + r] = dot(&self.w[(self.j0 + j) * k..][..k], xr);
            }
        }
    }

    /// Fills rows `r0..r0 + R` of `out` (column by column, `rows` each) with `dots(weight
    /// row, activation rows r0..r0 + R)`, one weight row at a time as [`DenseDots::run`] does.
    #[inline(always)]
    fn group<const R: usize>(
        &self,
        r0: usize,
        out: &mut [f32],
        dots: impl Fn(&[T], [&[f32]; R]) -> [f32; R],
    ) {
        let (k, rows) = (self.k, self.rows);
        let xs: [&[f32]; R] = std::array::from_fn(|i| &self.x[(r0 + i) * k..(r0 + i + 1) * k]);
        for j in 0..out.len() / rows {
            let sums = dots(&self.w[(self.j0 + j) * k..][..k], xs);
            out[j * rows + r0..][..R].copy_from_slice(&sums);
        }
    }

    /// [`DenseDots::group`] in blocks of `block` values along `k` (a multiple of 16):
    /// `part(weight row, activation rows, c0, c1, lanes, ahead)` adds values `c0..c1` to
    /// each row's 16 lanes, block by block through all the task's weight rows, and
    /// [`finish`] adds the values after the last whole 16. `ahead` is where the task reads
    /// after that block of that row (the same block of the next row, or the next block of
    /// the first), for a prefetch hint; null after the last. A separate path, so that the
    /// unblocked one keeps its sums in registers (through memory, with the blocks' code, the
    /// bf16 and f32 batch-1 decode steps ran 7-14% slower: `rows-step` table, round 39).
    #[inline(always)]
    fn group_blocked<const R: usize>(
        &self,
        r0: usize,
        out: &mut [f32],
        block: usize,
        part: impl Fn(&[T], [&[f32]; R], usize, usize, &mut [[f32; LANES]; R], *const T),
    ) {
        let (k, rows) = (self.k, self.rows);
        let columns = out.len() / rows;
        debug_assert!(columns <= COLUMNS_PER_TASK, "a task's columns");
        let xs: [&[f32]; R] = std::array::from_fn(|i| &self.x[(r0 + i) * k..(r0 + i + 1) * k]);
        let row = |j: usize| &self.w[(self.j0 + j) * k..][..k];
        let whole = k / LANES * LANES;
        let mut sums = [[[0f32; LANES]; R]; COLUMNS_PER_TASK];
        for c0 in (0..whole).step_by(block.max(LANES)) {
            let c1 = (c0 + block).min(whole);
            for (j, sums) in sums.iter_mut().enumerate().take(columns) {
                let ahead = if j + 1 < columns {
                    row(j + 1)[c0..].as_ptr()
                } else if c1 < whole {
                    row(0)[c1..].as_ptr()
                } else {
                    std::ptr::null()
                };
                part(row(j), xs, c0, c1, sums, ahead);
            }
        }
        for (j, sums) in sums.iter().enumerate().take(columns) {
            for (r, (&lanes, x)) in sums.iter().zip(xs).enumerate() {
                out[j * rows + r0 + r] = finish(lanes, row(j), x, whole);
            }
        }
    }

    /// The length of the blocks along `k` for a group of `rows` activation rows within
    /// `budget` bytes ([`k_block`]), `None` when the group takes its rows whole.
    fn blocks(&self, rows: usize, budget: usize) -> Option<usize> {
        let whole = self.k / LANES * LANES;
        Some(k_block(whole, rows, budget)).filter(|&block| block < whole)
    }

    /// [`DenseDots::run`] with [`dots_avx512`], [`ROW_GROUP`] activation rows per pass over
    /// a weight row (the same sums).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn run_avx512(&self, out: &mut [f32]) {
        // SAFETY (each call of `dots_avx512` and `part_avx512`): this function's features are
        // the CPU's (the caller's promise); `group` and `group_blocked` pass rows of `k`
        // values each, and blocks of whole 16 values within them.
        dense_groups!(self, out, dots_avx512, part_avx512, |_| GROUP_ACTIVATION_BYTES);
    }

    /// [`DenseDots::run`] with [`dots_avx2`], as [`DenseDots::run_avx512`] does.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        // SAFETY (each call of `dots_avx2` and `part_avx2`): as in `run_avx512`, with this
        // function's features.
        dense_groups!(self, out, dots_avx2, part_avx2, |rows| {
            if rows > 1 {
                AVX2_GROUP_ACTIVATION_BYTES
            } else {
                GROUP_ACTIVATION_BYTES
            }
        });
    }
}

/// Calls `f(r0, size)` for the groups of `group` rows (the last one smaller) of `rows`
/// activation rows.
#[inline(always)]
fn for_row_groups(rows: usize, group: usize, mut f: impl FnMut(usize, usize)) {
    debug_assert!(group > 0);
    let mut r0 = 0;
    while r0 < rows {
        let size = (rows - r0).min(group);
        f(r0, size);
        r0 += size;
    }
}

/// The dot product of `x` with `w` (both `x.len()` long), in the module's order.
///
/// Written out with intrinsics below: LLVM vectorizes this loop with sixteen 2-lane
/// registers (two-float loads, a quarter of the work per instruction of one 16-lane
/// register), which ran the f32 decode at about 75% of llama.cpp's speed (round 16).
#[inline(always)]
fn dot<T: Widen>(w: &[T], x: &[f32]) -> f32 {
    let whole = x.len() / LANES * LANES;
    let mut lanes = [0f32; LANES];
    for (xs, w) in x[..whole].chunks_exact(LANES).zip(w[..whole].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = xs[l].mul_add(w[l].widen(), lanes[l]);
        }
    }
    finish(lanes, w, x, whole)
}

/// Ends a dot product whose lanes hold values `..from`: adds `x[i] * w[i]` for `i` in
/// `from..` to lane `i % 16`, in order, then sums the lanes.
#[inline(always)]
fn finish<T: Widen>(mut lanes: [f32; LANES], w: &[T], x: &[f32], from: usize) -> f32 {
    for (i, (xv, wv)) in x.iter().zip(w).enumerate().skip(from) {
        lanes[i % LANES] = xv.mul_add(wv.widen(), lanes[i % LANES]);
    }
    lane_sum(lanes)
}

/// [`dot`] of one weight row with each of `R` activation rows, one 16-lane register per
/// row: the same fused multiply-adds in the same order as [`dot`], each weight value widened
/// once for all rows.
///
/// # Safety
/// The CPU must have AVX-512 F and FMA; `w` and every row of `xs` must be equally long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn dots_avx512<T: Widen + Element, const R: usize>(w: &[T], xs: [&[f32]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let whole = w.len() / LANES * LANES;
    // SAFETY: the caller's promises; `whole <= w.len()`.
    let acc = unsafe { fma_avx512(w, xs, 0, whole, [_mm512_setzero_ps(); R]) };
    std::array::from_fn(|r| {
        let mut lanes = [0f32; LANES];
        // SAFETY: 16 f32 lanes into a 16-f32 array.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        finish(lanes, w, xs[r], whole)
    })
}

/// Adds values `c0..c1` (whole 16s) of the weight row `w` times the same values of each of
/// `R` activation rows to the rows' `lanes`, as [`dots_avx512`] does: a block of
/// [`DenseDots::group_blocked`] (which blocks only the longest rows on AVX-512, so `ahead`,
/// [`part_avx2`]'s hint, is not used here: untried on such a CPU).
///
/// # Safety
/// As [`dots_avx512`]; `c1 - c0` a multiple of 16 and `c1 <= w.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn part_avx512<T: Widen + Element, const R: usize>(
    w: &[T],
    xs: [&[f32]; R],
    c0: usize,
    c1: usize,
    lanes: &mut [[f32; LANES]; R],
    _ahead: *const T,
) {
    use std::arch::x86_64::*;
    // SAFETY: 16 f32 lanes from a 16-f32 array.
    let acc = std::array::from_fn(|r| unsafe { _mm512_loadu_ps(lanes[r].as_ptr()) });
    // SAFETY: the caller's promises.
    let acc = unsafe { fma_avx512(w, xs, c0, c1, acc) };
    for (lanes, acc) in lanes.iter_mut().zip(acc) {
        // SAFETY: 16 f32 lanes into a 16-f32 array.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
    }
}

/// The loop of [`dots_avx512`] and [`part_avx512`]: `acc[r]` plus values `c0..c1` of `w`
/// times those of `xs[r]`, lane `i % 16` taking value `i`.
///
/// # Safety
/// As [`part_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn fma_avx512<T: Widen + Element, const R: usize>(
    w: &[T],
    xs: [&[f32]; R],
    c0: usize,
    c1: usize,
    mut acc: [std::arch::x86_64::__m512; R],
) -> [std::arch::x86_64::__m512; R] {
    use std::arch::x86_64::*;
    assert!(
        c0 <= c1 && c1 <= w.len() && (c1 - c0).is_multiple_of(LANES),
        "whole 16s within the weight row"
    );
    assert!(
        xs.iter().all(|x| x.len() == w.len()),
        "activation rows as long as the weight row"
    );
    for c in (c0..c1).step_by(LANES) {
        // A hint only (never faults, changes no result), so it may point past the row.
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(c)
                .cast::<i8>()
                .wrapping_add(ROW_PREFETCH_BYTES),
        );
        // SAFETY: `c + 16 <= c1 <= k`, the length of `w` and of every row.
        let ws = unsafe { widen16(w.as_ptr().add(c)) };
        for (acc, x) in acc.iter_mut().zip(xs) {
            // SAFETY: as above.
            *acc = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(x.as_ptr().add(c)) }, ws, *acc);
        }
    }
    acc
}

/// [`dots_avx512`] with two 8-lane registers per row (lanes 0-7 and 8-15): the same fused
/// multiply-adds in the same order.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` and every row of `xs` must be equally long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dots_avx2<T: Widen + Element, const R: usize>(w: &[T], xs: [&[f32]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let whole = w.len() / LANES * LANES;
    let zero = [_mm256_setzero_ps(); R];
    // SAFETY: the caller's promises; `whole <= w.len()`.
    let (low, high) = unsafe { fma_avx2(w, xs, 0, whole, (zero, zero), std::ptr::null()) };
    std::array::from_fn(|r| {
        let mut lanes = [0f32; LANES];
        // SAFETY: 2 x 8 f32 lanes into a 16-f32 array.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), low[r]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), high[r]);
        }
        finish(lanes, w, xs[r], whole)
    })
}

/// [`part_avx512`] with [`fma_avx2`].
///
/// # Safety
/// As [`dots_avx2`]; `c1 - c0` a multiple of 16 and `c1 <= w.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn part_avx2<T: Widen + Element, const R: usize>(
    w: &[T],
    xs: [&[f32]; R],
    c0: usize,
    c1: usize,
    lanes: &mut [[f32; LANES]; R],
    ahead: *const T,
) {
    use std::arch::x86_64::*;
    // SAFETY (both): 2 x 8 f32 lanes from a 16-f32 array.
    let low = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(lanes[r].as_ptr()) });
    let high = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(lanes[r].as_ptr().add(8)) });
    // One row (blocked only past 32 KB, the 7B down projection) keeps the hint within its
    // row that round 45 tuned: the next block's is tuned for groups.
    let ahead = if R > 1 { ahead } else { std::ptr::null() };
    // SAFETY: the caller's promises.
    let (low, high) = unsafe { fma_avx2(w, xs, c0, c1, (low, high), ahead) };
    for r in 0..R {
        // SAFETY: 2 x 8 f32 lanes into a 16-f32 array.
        unsafe {
            _mm256_storeu_ps(lanes[r].as_mut_ptr(), low[r]);
            _mm256_storeu_ps(lanes[r].as_mut_ptr().add(8), high[r]);
        }
    }
}

/// [`fma_avx512`] with two 8-lane registers per row (lanes 0-7 and 8-15). The bytes at
/// `ahead` (the block [`DenseDots::group_blocked`] reads next) are asked for as this block's
/// are read; without it (null), 2-byte weights [`HALF_ROW_PREFETCH_BYTES`] ahead in the row.
///
/// # Safety
/// As [`part_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fma_avx2<T: Widen + Element, const R: usize>(
    w: &[T],
    xs: [&[f32]; R],
    c0: usize,
    c1: usize,
    (mut low, mut high): ([std::arch::x86_64::__m256; R], [std::arch::x86_64::__m256; R]),
    ahead: *const T,
) -> ([std::arch::x86_64::__m256; R], [std::arch::x86_64::__m256; R]) {
    use std::arch::x86_64::*;
    assert!(
        c0 <= c1 && c1 <= w.len() && (c1 - c0).is_multiple_of(LANES),
        "whole 16s within the weight row"
    );
    assert!(
        xs.iter().all(|x| x.len() == w.len()),
        "activation rows as long as the weight row"
    );
    for c in (c0..c1).step_by(LANES) {
        if !ahead.is_null() {
            // A hint only, as below: the block the task reads next, as far ahead as this one
            // is long.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c - c0).cast::<i8>());
        } else if size_of::<T>() == 2 {
            // A hint only (never faults, changes no result), so it may point past the row.
            _mm_prefetch::<_MM_HINT_T0>(
                w.as_ptr()
                    .wrapping_add(c)
                    .cast::<i8>()
                    .wrapping_add(HALF_ROW_PREFETCH_BYTES),
            );
        }
        // SAFETY: `c + 16 <= c1 <= k`, the length of `w` and of every row.
        let (w_low, w_high) = unsafe { (widen8(w.as_ptr().add(c)), widen8(w.as_ptr().add(c + 8))) };
        for r in 0..R {
            // SAFETY: as above.
            unsafe {
                let x = xs[r].as_ptr().add(c);
                low[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w_low, low[r]);
                high[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), w_high, high[r]);
            }
        }
    }
    (low, high)
}

/// One task of [`matmul_rows_bf16`], on bf16 bits.
struct Bf16Dots<'a> {
    x: &'a [u16],
    w: &'a [u16],
    rows: usize,
    k: usize,
    j0: usize,
}

impl Bf16Dots<'_> {
    fn row(&self, j: usize) -> &[u16] {
        &self.w[(self.j0 + j) * self.k..(self.j0 + j + 1) * self.k]
    }

    /// Adds values `from..` of `x` times `w` to the lanes, pair by pair as `vdpbf16ps`
    /// does (the odd value first; an unpaired last value alone), pair `p` of each 32 to
    /// lane `p`.
    fn add_pairs_plain(x: &[u16], w: &[u16], from: usize, lanes: &mut [f32; LANES]) {
        let mut i = from;
        while i < x.len() {
            let lane = (i % (2 * LANES)) / 2;
            let odd_first = if i + 1 < x.len() {
                widen(x[i + 1]).mul_add(widen(w[i + 1]), lanes[lane])
            } else {
                lanes[lane]
            };
            lanes[lane] = widen(x[i]).mul_add(widen(w[i]), odd_first);
            i += 2;
        }
    }

    /// Fills `out` (column by column, `rows` each): per dot product, the whole blocks of 32
    /// values alternate between two sets of 16 lanes (pair `p` of a block to lane `p`),
    /// which are then added lane by lane; the values after the last whole block go to those
    /// sums, and the lanes are summed pairwise.
    fn run_plain(&self, out: &mut [f32]) {
        let (k, rows) = (self.k, self.rows);
        let whole = k / (2 * LANES) * (2 * LANES);
        for j in 0..out.len() / rows {
            let w = self.row(j);
            for r in 0..rows {
                let x = &self.x[r * k..(r + 1) * k];
                // Whole blocks of 32 values alternate between two sets of lanes.
                let mut two = [[0f32; LANES]; 2];
                for (b, start) in (0..whole).step_by(2 * LANES).enumerate() {
                    let end = start + 2 * LANES;
                    Self::add_pairs_plain(&x[..end], &w[..end], start, &mut two[b % 2]);
                }
                let mut lanes: [f32; LANES] = std::array::from_fn(|l| two[0][l] + two[1][l]);
                Self::add_pairs_plain(x, w, whole, &mut lanes);
                out[j * rows + r] = lane_sum(lanes);
            }
        }
    }

    /// [`Bf16Dots::run_plain`] with `vdpbf16ps` on every whole 32 values.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run_simd(&self, out: &mut [f32]) {
        // Activation rows go [`BF16_ROW_GROUP`] at a time through the task's weight rows, and
        // each group reads those one at a time, as one sequential stream. Four weight rows per
        // pass (one activation load for four) read four streams a row apart, which the Zen 4
        // machine of round 13 read 15-40% slower (`stream_kernels`, rows table). Each row's
        // sum is the same either way.
        for_row_groups(self.rows, BF16_ROW_GROUP, |r0, size| {
            // SAFETY: this function's features are the CPU's (the caller's promise).
            unsafe {
                match size {
                    1 => self.group_simd::<1>(r0, out),
                    2 => self.group_simd::<2>(r0, out),
                    3 => self.group_simd::<3>(r0, out),
                    4 => self.group_simd::<4>(r0, out),
                    5 => self.group_simd::<5>(r0, out),
                    6 => self.group_simd::<6>(r0, out),
                    7 => self.group_simd::<7>(r0, out),
                    _ => self.group_simd::<BF16_ROW_GROUP>(r0, out),
                }
            }
        });
    }

    /// The activation rows `r0..r0 + R` of [`Bf16Dots::run_simd`] against every weight row
    /// of the task, each weight load shared by the `R` rows.
    ///
    /// # Safety
    /// As [`Bf16Dots::run_simd`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn group_simd<const R: usize>(&self, r0: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;

        let (k, rows) = (self.k, self.rows);
        let whole = k / (2 * LANES) * (2 * LANES);
        // Every slice below is `k` long (sliced so), which the loads rely on.
        let xs: [&[u16]; R] = std::array::from_fn(|i| &self.x[(r0 + i) * k..(r0 + i + 1) * k]);
        let load = |v: &[u16], at: usize| {
            debug_assert!(at + 2 * LANES <= v.len());
            // SAFETY: `at + 32 <= whole <= k`, and `v` is an activation row or a weight row,
            // `k` long each.
            as_bh(unsafe { _mm512_loadu_si512(v.as_ptr().add(at) as *const __m512i) })
        };
        for j in 0..out.len() / rows {
            let wr = self.row(j);
            // Two chains of `vdpbf16ps` per row (even and odd blocks of 32 values): with one,
            // each instruction waits on the one before, and a 1.1B bf16 decode ran 5%
            // slower (medians of 10 alternated runs, BENCHMARKS.md round 18).
            let mut even = [_mm512_setzero_ps(); R];
            let mut odd = [_mm512_setzero_ps(); R];
            let mut c = 0;
            while c + 4 * LANES <= whole {
                // Hints only (never fault, change no result): they may point past the
                // weight. Two, for the two cache lines that this step reads.
                let ahead = wr
                    .as_ptr()
                    .wrapping_add(c)
                    .cast::<i8>()
                    .wrapping_add(BF16_ROW_PREFETCH_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                let (w_even, w_odd) = (load(wr, c), load(wr, c + 2 * LANES));
                for r in 0..R {
                    even[r] = _mm512_dpbf16_ps(even[r], w_even, load(xs[r], c));
                    odd[r] = _mm512_dpbf16_ps(odd[r], w_odd, load(xs[r], c + 2 * LANES));
                }
                c += 4 * LANES;
            }
            if c < whole {
                let w_even = load(wr, c);
                for r in 0..R {
                    even[r] = _mm512_dpbf16_ps(even[r], w_even, load(xs[r], c));
                }
            }
            for r in 0..R {
                let mut lanes = [0f32; LANES];
                // SAFETY: 16 f32 lanes into a 16-f32 array.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_add_ps(even[r], odd[r])) };
                Self::add_pairs_plain(xs[r], wr, whole, &mut lanes);
                out[j * rows + r0 + r] = lane_sum(lanes);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use burn::tensor::f16;

    /// Test values in about [-1, 1] whose sums are not exact in f32 (so that another order of
    /// additions gives other bits).
    pub(in crate::kernels) fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 977.0)
            .collect()
    }

    /// `x @ w^T` summed in f64.
    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        // Each of the k terms is below 1.1 in magnitude: k rounding errors of ~1e-7 each.
        let tolerance = 2e-6 * k as f64;
        let worst = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(worst <= tolerance, "{what}: max |diff| {worst} > {tolerance}");
    }

    /// Every group size of the SIMD kernels (groups of 4 rows, of 8 for bf16: 1-7 rows,
    /// 8 + 3, 8 + 4, 8 + 8), partial 16- and 32-value blocks, and task widths that do not
    /// divide 32. The last five take [`matmul_rows`]'s groups in blocks along `k`
    /// ([`GROUP_ACTIVATION_BYTES`]): two groups of 4 in 2 blocks with a partial 16 after
    /// them, a group of 2 in 3 blocks, a group of 4 in 2 blocks beside a row taken whole over
    /// two tasks, one row in 2 blocks, and a group of 3 in 2 blocks; on AVX2
    /// ([`AVX2_GROUP_ACTIVATION_BYTES`]) the groups of 2 or more rows in more blocks (3, 5,
    /// 4 and 3).
    const SHAPES: [(usize, usize, usize); 16] = [
        (1, 1, 1),
        (1, 15, 3),
        (2, 33, 37),
        (3, 64, 70),
        (16, 100, 65),
        (5, 257, 4),
        (6, 95, 33),
        (7, 130, 66),
        (11, 70, 40),
        (12, 96, 34),
        (1, 2048, 129),
        (8, 2230, 5),
        (2, 8300, 3),
        (5, 4099, 40),
        (1, 8220, 3),
        (3, 2750, 5),
    ];

    #[test]
    fn k_blocks_are_whole_16s_within_the_budget() {
        // (whole, rows) -> block length
        let wide = |whole, rows| k_block(whole, rows, GROUP_ACTIVATION_BYTES);
        assert_eq!(wide(2048, 4), 2048, "the 1.1B gate projection: one block");
        assert_eq!(wide(5632, 4), 1888, "the down projection: three blocks");
        assert_eq!(wide(5632, 1), 5632, "one row of 5632 fits");
        assert_eq!(wide(11008, 4), 1840, "the 7B down projection: six blocks");
        assert_eq!(wide(11008, 1), 5504, "one row of 11008: two blocks");
        assert_eq!(wide(8208, 1), 4112, "the test's one row in blocks");
        assert_eq!(wide(2736, 3), 1376, "the test's group of 3 in blocks");
        assert_eq!(wide(0, 4), 0);
        // The AVX2 budget of groups of 2 or more rows.
        let avx2 = |whole, rows| k_block(whole, rows, AVX2_GROUP_ACTIVATION_BYTES);
        assert_eq!(
            avx2(2048, 4),
            1024,
            "the 1.1B gate projection on AVX2: two blocks"
        );
        assert_eq!(avx2(5632, 4), 944, "the down projection on AVX2: six blocks");
        assert_eq!(avx2(2048, 2), 2048, "two rows of 2048 fit");
        assert_eq!(avx2(2224, 4), 752, "the test's group of 4 in three blocks");
        for budget in [GROUP_ACTIVATION_BYTES, AVX2_GROUP_ACTIVATION_BYTES] {
            for (whole, rows) in [(2224, 4), (8288, 2), (16, 64)] {
                let block = k_block(whole, rows, budget);
                assert_eq!(block % LANES, 0, "{whole} {rows}");
                assert!(block > 0 && block * rows * 4 <= budget.max(LANES * rows * 4));
            }
        }
    }

    #[test]
    fn dense_rows_match_an_f64_sum_for_odd_shapes() {
        for &(rows, k, n) in &SHAPES {
            let x = values(rows * k, 1);
            let w = values(n * k, 2);
            let want = reference(&x, &w, rows, k, n);
            assert_close(
                &matmul_rows(&x, &w, rows, k, n),
                &want,
                k,
                &format!("f32 {rows}x{k}x{n}"),
            );
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let w16f: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let want = reference(&x, &w16f, rows, k, n);
            assert_close(
                &matmul_rows(&x, &w16, rows, k, n),
                &want,
                k,
                &format!("f16 {rows}x{k}x{n}"),
            );
        }
    }

    /// Each path's products for f32, f16 and bf16 weights, as bit patterns.
    fn products_on(path: Simd, rows: usize, k: usize, n: usize) -> [Vec<u32>; 3] {
        let x = values(rows * k, 7);
        let w = values(n * k, 8);
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        [
            bits(matmul_rows_on(path, &x, &w, rows, k, n)),
            bits(matmul_rows_on(path, &x, &w16, rows, k, n)),
            bits(matmul_rows_on(path, &x, &wb, rows, k, n)),
        ]
    }

    #[test]
    fn every_dot_path_gives_the_plain_bits() {
        let paths = Simd::reachable_simd();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert_eq!(paths.last(), Some(&Simd::Avx512), "{paths:?}");
        }
        for &(rows, k, n) in &SHAPES {
            let plain = products_on(Simd::Plain, rows, k, n);
            for &path in &paths {
                assert_eq!(products_on(path, rows, k, n), plain, "{path:?} {rows}x{k}x{n}");
            }
        }
    }

    #[test]
    fn the_result_is_the_same_for_one_row_or_many() {
        // Row r of a many-row product equals that row alone (fixed order per dot).
        let (rows, k, n) = (7, 300, 45);
        let x = values(rows * k, 3);
        let w = values(n * k, 4);
        let all = matmul_rows(&x, &w, rows, k, n);
        for r in 0..rows {
            let one = matmul_rows(&x[r * k..(r + 1) * k], &w, 1, k, n);
            assert_eq!(one, all[r * n..(r + 1) * n].to_vec(), "row {r}");
        }
    }

    #[test]
    fn bf16_rows_equal_the_plain_code_and_the_f64_sum() {
        if !crate::kernels::bf16_dot::bf16_dot_available() {
            eprintln!("no AVX-512 BF16 here: the vdpbf16ps rows are not checked");
        }
        for &(rows, k, n) in &SHAPES {
            let x: Vec<f32> = values(rows * k, 5)
                .iter()
                .map(|&v| bf16::from_f32(v).to_f32())
                .collect();
            let w: Vec<bf16> = values(n * k, 6).iter().map(|&v| bf16::from_f32(v)).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let plain = matmul_rows_bf16_reference(&x, &w, rows, k, n).expect("bf16 activations");
            assert_close(
                &plain,
                &reference(&x, &wf, rows, k, n),
                k,
                &format!("bf16 {rows}x{k}x{n}"),
            );
            let fast = matmul_rows_bf16_dots(&x, &w, rows, k, n).expect("bf16 activations");
            let same = fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "bf16 {rows}x{k}x{n}: SIMD and plain code differ");
            // With AMX tiles where the CPU has them (rows 4 and more, `k` a multiple of 32).
            assert_close(
                &matmul_rows_bf16(&x, &w, rows, k, n).expect("bf16 activations"),
                &reference(&x, &wf, rows, k, n),
                k,
                &format!("bf16 {rows}x{k}x{n}, any path"),
            );
        }
    }

    /// Shapes of the AMX products of a batch: row counts from 1 to 16, `k` from one group of
    /// 32 to the 7B down projection's, odd and even group counts, and tasks whose last
    /// columns do not fill a tile (`n` below 16, 17, 33, 70).
    const AMX_SHAPES: [(usize, usize, usize); 11] = [
        (1, 32, 16),
        (2, 64, 17),
        (3, 96, 3),
        (4, 2048, 40),
        (5, 160, 33),
        (7, 1024, 70),
        (8, 5632, 32),
        (9, 11008, 16),
        (12, 4096, 48),
        (16, 352, 100),
        (16, 32, 1),
    ];

    /// The bf16 AMX products of a batch ([`matmul_rows_bf16_amx`]) on [`AMX_SHAPES`]. Each
    /// row's bits do not depend on the other rows.
    #[test]
    fn bf16_rows_on_amx_tiles_match_the_f64_sum() {
        if !(crate::kernels::bf16_dot::bf16_dot_available() && crate::kernels::amx::amx_bf16_available()) {
            eprintln!("no AMX-BF16 here: the tile rows are not checked");
            return;
        }
        for (rows, k, n) in AMX_SHAPES {
            let x: Vec<f32> = values(rows * k, 11)
                .iter()
                .map(|&v| bf16::from_f32(v).to_f32())
                .collect();
            let w: Vec<bf16> = values(n * k, 12).iter().map(|&v| bf16::from_f32(v)).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let tiles = |rows: usize| {
                matmul_rows_bf16_with(&x[..rows * k], &w, rows, k, n, true, true).expect("bf16 activations")
            };
            let all = tiles(rows);
            assert_close(
                &all,
                &reference(&x, &wf, rows, k, n),
                k,
                &format!("amx {rows}x{k}x{n}"),
            );
            for fewer in [1, rows.saturating_sub(1).max(1)] {
                let some = tiles(fewer);
                assert_eq!(
                    some,
                    all[..fewer * n],
                    "amx {rows}x{k}x{n}: the first {fewer} rows alone"
                );
            }
            if rows >= AMX_MIN_ROWS {
                assert_eq!(
                    matmul_rows_bf16(&x, &w, rows, k, n).expect("bf16 activations"),
                    all,
                    "bf16 {rows}x{k}x{n}: the engine's path"
                );
            }
        }
    }

    /// The f16 AMX products of a batch ([`matmul_rows_f16_amx`]) on [`AMX_SHAPES`]: the
    /// columns on tiles against the f64 sum of the three products of halves they keep
    /// (`x_hi w_hi + x_hi w_lo + x_lo w_hi`, each exact), a task's last columns that do not
    /// fill a tile against the f64 sum of the f16 values, each within the f32 sums'
    /// rounding.
    #[test]
    fn f16_rows_on_amx_tiles_match_the_f64_sum() {
        if !f16_tiles_run_here() {
            eprintln!("no AMX-BF16 here: the f16 tile rows are not checked");
            return;
        }
        // The halves of an f16 value: its f32's upper half, and the rest.
        let halves = |v: f32| {
            let hi = f32::from_bits(v.to_bits() & 0xFFFF_0000);
            (hi as f64, (v - hi) as f64)
        };
        // SAFETY: the CPU has what the tiles need (checked above).
        let tiles_of = |x: &[f32], w: &[f16], rows: usize, k: usize, n: usize| unsafe {
            matmul_rows_f16_amx(x, w, rows, k, n)
        };
        for (rows, k, n) in AMX_SHAPES {
            let x: Vec<f32> = values(rows * k, 13)
                .iter()
                .map(|&v| f16::from_f32(v).to_f32())
                .collect();
            let w: Vec<f16> = values(n * k, 14).iter().map(|&v| f16::from_f32(v)).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let tiles = |rows: usize| tiles_of(&x[..rows * k], &w, rows, k, n).expect("f16 activations");
            let all = tiles(rows);
            // Column `j` is on tiles when it is in the whole 16s of its task's columns.
            let on_tiles = |j: usize| {
                let task_columns = COLUMNS_PER_TASK.min(n - j / COLUMNS_PER_TASK * COLUMNS_PER_TASK);
                j % COLUMNS_PER_TASK < task_columns / 16 * 16
            };
            let mut want = vec![0f64; rows * n];
            for r in 0..rows {
                for j in 0..n {
                    want[r * n + j] = (0..k)
                        .map(|i| {
                            let (xv, wv) = (x[r * k + i], wf[j * k + i]);
                            if !on_tiles(j) {
                                return xv as f64 * wv as f64;
                            }
                            let ((xh, xl), (wh, wl)) = (halves(xv), halves(wv));
                            xh * wh + xh * wl + xl * wh
                        })
                        .sum();
                }
            }
            assert_close(&all, &want, k, &format!("f16 amx {rows}x{k}x{n}"));
            for fewer in [1, rows.saturating_sub(1).max(1)] {
                assert_eq!(
                    tiles(fewer),
                    all[..fewer * n],
                    "f16 amx {rows}x{k}x{n}: the first {fewer} rows alone"
                );
            }
            if rows >= F16_AMX_MIN_ROWS {
                assert_eq!(
                    matmul_rows_f16(&x, &w, rows, k, n),
                    all,
                    "f16 {rows}x{k}x{n}: the engine's path"
                );
            }
        }
        let w = vec![f16::from_f32(0.5); 64 * 16];
        assert!(
            tiles_of(&[0.1f32; 64 * 8], &w, 8, 64, 16).is_none(),
            "0.1 is not an f16 value"
        );
        assert!(
            tiles_of(&[0.5f32; 48 * 8], &w[..48 * 16], 8, 48, 16).is_none(),
            "k = 48"
        );
        // A NaN or an infinity in one row: that row NaN, the others as without it.
        let clean = tiles_of(&[0.5f32; 64 * 8], &w, 8, 64, 16).expect("f16 activations");
        assert!(clean.iter().all(|&v| v == 16.0), "64 x 0.5 x 0.5");
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![0.5f32; 64 * 8];
            x[3 * 64 + 5] = bad;
            let got = tiles_of(&x, &w, 8, 64, 16).expect("non-finite values are taken");
            for (r, (row, clean)) in got.chunks(16).zip(clean.chunks(16)).enumerate() {
                if r == 3 {
                    assert!(row.iter().all(|v| v.is_nan()), "{bad}: row 3 {row:?}");
                } else {
                    assert_eq!(row, clean, "{bad}: row {r}");
                }
            }
        }
    }

    #[test]
    fn bf16_rows_refuse_other_activations_and_wrong_sizes() {
        let w = vec![bf16::from_f32(1.0); 8];
        assert!(
            matmul_rows_bf16(&[0.1f32; 4], &w, 1, 4, 2).is_none(),
            "0.1 is not a bf16 value"
        );
        assert!(
            matmul_rows_bf16(&[1.0f32; 3], &w, 1, 4, 2).is_none(),
            "short activations"
        );
        assert!(matmul_rows_bf16(&[1.0f32; 4], &w, 1, 4, 2).is_some());
    }
}
