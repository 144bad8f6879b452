//! Many-row f32 products (f32 prefill, image encode) with AVX-512 FMA, or AVX2 and FMA.
//!
//! Flex's f32 gemm (the `gemm` crate) takes a checkpoint-order weight (`[out, in]` rows,
//! used in place from the file) as its packed operand and copies it value by value with
//! strided reads, once per block of columns and per thread: a fifth of an f32 image
//! encode went to that copy. Here each task packs its own columns once per slab of inputs
//! (16 x 16 blocks transposed in registers), the activations are grouped by a tile's rows
//! once per product (`GroupedRows`), and an 8-row x 48-column tile of f32 accumulators
//! takes one FMA per weight register and row. AVX2: 8 x 8 transposes, groups of 6 rows,
//! and 6-row x 16-column tiles (the 12 accumulators that 16 registers allow). bf16 and f16
//! weights are widened as they are packed (CPUs without a bf16 gemm), and bf16 and f16
//! activations as they are grouped (an f32 copy of them first, with its fresh pages, cost
//! more than the grouping itself).
//!
//! Every output is a sum over slabs of [`SLAB`] inputs, in order, of each slab's chain of
//! FMAs from zero (one long chain would add rounding errors over all `k` inputs; these grow
//! with `SLAB + k / SLAB`, as a blocked gemm's do): the result does not depend on the tiling
//! or the thread count, and [`matmul_f32_gemm_reference`] computes the same bits in plain
//! Rust.

use std::mem::MaybeUninit;

use burn::tensor::{DType, Element};

#[cfg(target_arch = "x86_64")]
use super::bf16_gemm::tile_masks;
use super::bf16_gemm::{Block, Output, WeightOrder, for_each_block};
use super::packed::PackedWeight;
use super::{Simd, Widen};

/// Rows of one register tile.
const TILE_ROWS: usize = 8;
/// Columns of one register tile: three registers of 16 f32 lanes.
const TILE_COLS: usize = 48;
/// Inputs per packed weight slab (a 24 KB panel per tile, held in L1).
const SLAB: usize = 128;
/// Rows of one AVX2 register tile (of 16 columns): the tile's rows are taken this many at
/// a time on AVX2.
const AVX2_ROWS: usize = 6;
/// Values of a row group ahead of the AVX-512 tile's input that it prefetches.
const ACTIVATION_PREFETCH: usize = 512;

/// Output rows per register tile step at level `isa` (and the unit of the tasks' row parts,
/// so that AVX2's row groups start at a task's first row).
fn tile_rows(isa: Simd) -> usize {
    if isa == Simd::Avx2 { AVX2_ROWS } else { TILE_ROWS }
}

/// Columns a task's block is made of at level `isa`: AVX2 multiplies 16 columns at a time,
/// AVX-512 a whole (masked) tile of [`TILE_COLS`].
fn tile_col_unit(isa: Simd) -> usize {
    if isa == Simd::Avx2 { 16 } else { TILE_COLS }
}

/// Whether this CPU runs the kernel (AVX2, FMA and F16C; AVX-512 F where it has it).
pub fn f32_gemm_available() -> bool {
    Simd::best() != Simd::Plain
}

/// `x [m, k] @ w [k, n]` with AVX-512 FMA or AVX2 and FMA, a bf16 or f16 `w` widened to
/// f32 as it is packed, and bf16 or f16 activations as they are grouped (no f32 copy of
/// them first); `None` on other CPUs (the caller uses Flex's gemm instead) or when the
/// sizes do not match.
pub fn matmul_f32_gemm<X: Widen + Element, T: Widen + Element>(
    x: &[X],
    w: &[T],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    let isa = Simd::best();
    if isa == Simd::Plain {
        return None;
    }
    run(x, w, order, [m, k, n], isa)
}

/// `x [m, k] @ w` for a packed q8/q4 weight, dequantized as the panels are packed
/// (`scale * q`, rounded to bf16 when `round_bf16`): the bits of [`matmul_f32_gemm`] on
/// [`PackedWeight::dequantize`] (rounded alike), without the f32 copy of the whole weight
/// that a prefill would otherwise write, and read back, for every product. `None` as
/// [`matmul_f32_gemm`].
pub fn matmul_f32_gemm_packed(x: &[f32], w: &PackedWeight, m: usize, round_bf16: bool) -> Option<Vec<f32>> {
    let isa = Simd::best();
    if isa == Simd::Plain {
        return None;
    }
    run_from(x, &Dequantizing { w, round_bf16 }, m, isa)
}

/// [`matmul_f32_gemm_packed`]'s arithmetic in plain Rust, on every CPU (for tests).
pub fn matmul_f32_gemm_packed_reference(
    x: &[f32],
    w: &PackedWeight,
    m: usize,
    round_bf16: bool,
) -> Option<Vec<f32>> {
    run_from(x, &Dequantizing { w, round_bf16 }, m, Simd::Plain)
}

/// [`matmul_f32_gemm`]'s arithmetic in plain Rust, on every CPU (for tests).
pub fn matmul_f32_gemm_reference<X: Widen + Element, T: Widen + Element>(
    x: &[X],
    w: &[T],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    run(x, w, order, [m, k, n], Simd::Plain)
}

fn run<X: Widen + Element, T: Widen + Element>(
    x: &[X],
    w: &[T],
    order: WeightOrder,
    [m, k, n]: [usize; 3],
    isa: Simd,
) -> Option<Vec<f32>> {
    if w.len() != k * n {
        return None;
    }
    run_from(x, &Weight { w, order, k, n }, m, isa)
}

/// `x [m, k] @ w`, the panels packed by `weight`.
fn run_from<X: Widen + Element, S: Panels>(x: &[X], weight: &S, m: usize, isa: Simd) -> Option<Vec<f32>> {
    let [k, n] = weight.shape();
    if x.len() != m * k || m == 0 || k == 0 || n == 0 {
        return None;
    }
    // The tiles read the activations from groups of their rows (see `GroupedRows`).
    let grouped = GroupedRows::of(x, m, k, tile_rows(isa), isa);
    // Not zeroed first (a single-threaded pass over the output): each task's last slab
    // writes its block (`columns`).
    let mut out = Vec::<f32>::with_capacity(m * n);
    let target = Output(out.as_mut_ptr());
    for_each_block(m, n, tile_rows(isa), tile_col_unit(isa), |block| {
        // SAFETY: `out` has room for `m * n` values and outlives the tasks; tasks write
        // disjoint (row range, column range) blocks of it.
        unsafe { columns(&grouped, weight, block, &target, isa) }
    });
    // SAFETY: the blocks cover all `m * n` outputs and every task's last slab wrote each
    // of its block's (`columns`).
    unsafe { out.set_len(m * n) };
    Some(out)
}

/// The activations as the tiles read them: per slab of [`SLAB`] inputs and group of a
/// tile's rows ([`TILE_ROWS`], [`AVX2_ROWS`] on AVX2), input by input (`[i][row]`; rows
/// past `m` zero), packed once per product. Read in place, rows `k` inputs apart fall into
/// the same few L1 sets when `k` is a multiple of 1024 (every product of these models) and
/// evicted the weight panel; the AVX-512 tile's broadcasts also needed an address
/// computation per row (8 KB-apart rows: 617x2048x5632 ran 219 GFLOP/s, grouped 240-270).
struct GroupedRows {
    values: Vec<f32>,
    /// Rows, padded to whole groups.
    rows: usize,
    /// Rows per group.
    size: usize,
}

impl GroupedRows {
    fn of<X: Widen + Element>(x: &[X], m: usize, k: usize, size: usize, isa: Simd) -> Self {
        let rows = m.next_multiple_of(size);
        let mut values = Vec::with_capacity(rows * k);
        // Every value written once, input by input (no zeroing pass first).
        super::for_each_chunk(
            &mut values.spare_capacity_mut()[..rows * k],
            rows * SLAB,
            |s, slab| {
                let k0 = s * SLAB;
                let depth = slab.len() / rows;
                for (g, group) in slab.chunks_mut(size * depth).enumerate() {
                    // The last group may run past `m`: its missing rows are zero.
                    let live = size.min(m - g * size);
                    fill_group(group, &x[g * size * k..(g * size + live) * k], k, k0, size, isa);
                }
            },
        );
        // SAFETY: the slabs cover all `rows * k` values and each slot of each was written.
        unsafe { values.set_len(rows * k) };
        Self { values, rows, size }
    }

    /// The group of rows from `r` (a multiple of the group size) of the slab from `k0`.
    fn group(&self, k0: usize, r: usize, depth: usize) -> &[f32] {
        &self.values[k0 * self.rows + r * depth..][..self.size * depth]
    }
}

/// One group of [`GroupedRows`]: inputs `k0..` of `rows` (whole rows of `k` values, at most
/// `size` of them; missing rows zero) into `group`, input by input, widened to f32: 8 inputs
/// at a time transposed in registers ([`transpose_group`]), the rest value by value.
fn fill_group<X: Widen + Element>(
    group: &mut [MaybeUninit<f32>],
    rows: &[X],
    k: usize,
    k0: usize,
    size: usize,
    isa: Simd,
) {
    let (live, depth) = (rows.len() / k, group.len() / size);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa != Simd::Plain && live > 0 {
        done = depth / 8 * 8;
        for i in (0..done).step_by(8) {
            let to = &mut group[i * size..(i + 8) * size];
            assert!((live - 1) * k + k0 + i + 8 <= rows.len());
            // SAFETY: `Simd::Avx2` and `Simd::Avx512` are only chosen on CPUs with AVX2, FMA
            // and F16C; rows `0..live` hold inputs `k0 + i..k0 + i + 8` (asserted) and `to` 8
            // slots of `size` values (a tile's rows: 8 or 6).
            unsafe { transpose_group(rows[k0 + i..].as_ptr(), k, live, to.as_mut_ptr().cast(), size) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for (i, slot) in group.chunks_exact_mut(size).enumerate().skip(done) {
        for (j, value) in slot.iter_mut().enumerate() {
            value.write(if j < live {
                rows[j * k + k0 + i].widen()
            } else {
                0.0
            });
        }
    }
}

/// The weight and its layout.
struct Weight<'a, T> {
    w: &'a [T],
    order: WeightOrder,
    k: usize,
    n: usize,
}

/// A `[k, n]` weight as the tiles read it: packed into f32 panels slab by slab, and the
/// memory that packing a slab reads (to prefetch it while the slab before computes).
trait Panels: Sync {
    /// `[k, n]`.
    fn shape(&self) -> [usize; 2];

    /// Packs inputs `k0..k1` of columns `c0..c0 + cols` into `panel` as f32: per tile of
    /// [`TILE_COLS`] columns, `k1 - k0` rows of [`TILE_COLS`] values (columns past `cols`
    /// are zero). `isa` decides which instructions pack.
    fn pack(&self, k0: usize, k1: usize, c0: usize, cols: usize, panel: &mut [f32], isa: Simd);

    /// The lines that packing inputs `k0..k1` of columns `c0..c0 + cols` reads.
    fn lines(&self, k0: usize, k1: usize, c0: usize, cols: usize) -> Lines;
}

impl<T: Widen + Element> Panels for Weight<'_, T> {
    fn shape(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    fn lines(&self, k0: usize, k1: usize, c0: usize, cols: usize) -> Lines {
        let (first, stride, rows, width) = match self.order {
            WeightOrder::OutputMajor => (c0 * self.k + k0, self.k, cols, k1 - k0),
            WeightOrder::InputMajor => (k0 * self.n + c0, self.n, k1 - k0, cols),
        };
        let size = std::mem::size_of::<T>();
        Lines {
            first: self.w.as_ptr().wrapping_add(first).cast(),
            stride: stride * size,
            rows: if k0 < k1 { rows } else { 0 },
            // One more for a row that does not start on a line.
            per_row: (width * size).div_ceil(64) + 1,
            next: 0,
        }
    }

    /// Widened to f32 as packed; f32 blocks of a `[n, k]` weight transposed in registers.
    fn pack(&self, k0: usize, k1: usize, c0: usize, cols: usize, panel: &mut [f32], isa: Simd) {
        let (k, n) = (self.k, self.n);
        let depth = k1 - k0;
        for (t0, width, chunk) in panel_tiles(panel, depth, cols) {
            let c = c0 + t0;
            match self.order {
                WeightOrder::OutputMajor => {
                    // One row of the file per column, its inputs consecutive: 16 columns x
                    // 16 f32 inputs transposed in registers where the CPU has AVX-512, 8 x 8
                    // values (widened) with AVX2, the rest copied value by value.
                    let mut from = [k0; TILE_COLS];
                    #[cfg(target_arch = "x86_64")]
                    if isa == Simd::Avx512 && T::dtype() == DType::F32 {
                        let whole = k0 + depth / 16 * 16;
                        for g in 0..width / 16 {
                            let rows = &self.w[(c + 16 * g) * k..(c + 16 * g + 16) * k];
                            for i in (k0..whole).step_by(16) {
                                let out = &mut chunk[(i - k0) * TILE_COLS + 16 * g..];
                                assert!(i + 16 <= k && out.len() >= 15 * TILE_COLS + 16);
                                // SAFETY: `Simd::Avx512` is only chosen on CPUs with AVX-512
                                // F; the 16 rows of `k` f32 values hold inputs `i..i + 16`,
                                // and `out` the 16 packed rows of 16 values (asserted above).
                                unsafe {
                                    super::bf16_gemm::transpose16(
                                        rows[i..].as_ptr().cast(),
                                        4 * k,
                                        out.as_mut_ptr().cast(),
                                        TILE_COLS,
                                    )
                                };
                            }
                            from[16 * g..16 * g + 16].fill(whole);
                        }
                    } else if isa != Simd::Plain {
                        // AVX2, and AVX-512 with bf16 or f16 weights.
                        let whole = k0 + depth / 8 * 8;
                        for g in 0..width / 8 {
                            let rows = &self.w[(c + 8 * g) * k..(c + 8 * g + 8) * k];
                            for i in (k0..whole).step_by(8) {
                                let out = &mut chunk[(i - k0) * TILE_COLS + 8 * g..];
                                assert!(i + 8 <= k && out.len() >= 7 * TILE_COLS + 8);
                                // SAFETY: `Simd::Avx2` and `Simd::Avx512` are only chosen on CPUs
                                // with AVX2, FMA and F16C; the 8 rows of `k` values hold inputs `i..i + 8`,
                                // and `out` the 8 packed rows of 8 values (asserted above).
                                unsafe { transpose8(rows[i..].as_ptr(), k, out.as_mut_ptr(), TILE_COLS) };
                            }
                            from[8 * g..8 * g + 8].fill(whole);
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = isa;
                    for (j, &start) in from.iter().enumerate().take(width) {
                        let row = &self.w[(c + j) * k..(c + j + 1) * k];
                        for i in start..k1 {
                            chunk[(i - k0) * TILE_COLS + j] = row[i].widen();
                        }
                    }
                }
                WeightOrder::InputMajor => {
                    for i in k0..k1 {
                        let to = &mut chunk[(i - k0) * TILE_COLS..][..width];
                        for (d, s) in to.iter_mut().zip(&self.w[i * n + c..][..width]) {
                            *d = s.widen();
                        }
                    }
                }
            }
        }
    }
}

/// 8 rows of 8 values of `T` (rows `step` values apart from `src`) widened to f32 and
/// transposed into 8 rows `dst_step` values apart from `dst`: value `j` of row `i` to
/// `dst[j * dst_step + i]`.
///
/// # Safety
/// The CPU must have AVX2 and F16C; the 8 source rows of 8 values and the 8 destination
/// rows of 8 values must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn transpose8<T: Widen + Element>(src: *const T, step: usize, dst: *mut f32, dst_step: usize) {
    // SAFETY: the 8 source rows are readable (this function's contract).
    let r: [_; 8] = std::array::from_fn(|i| unsafe { super::widen8(src.add(i * step)) });
    for (j, column) in transposed8(r).into_iter().enumerate() {
        // SAFETY: destination row `j` (this function's contract).
        unsafe { std::arch::x86_64::_mm256_storeu_ps(dst.add(j * dst_step), column) };
    }
}

/// Values `i..i + 8` of `live` rows of `T` (at most `size`, rows `step` values apart from
/// `src`; the group's other rows zero) widened to f32 into 8 consecutive slots of `size`
/// values from `dst`, one per input: a group of [`GroupedRows`] (AVX-512's 8 rows or AVX2's
/// 6) 8 inputs at a time.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `size` must be 8 or 6, and the `live` source rows of 8
/// values and the `8 * size` values from `dst` valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn transpose_group<T: Widen + Element>(
    src: *const T,
    step: usize,
    live: usize,
    dst: *mut f32,
    size: usize,
) {
    use std::arch::x86_64::*;

    assert!(live <= size && (size == TILE_ROWS || size == AVX2_ROWS));
    // SAFETY: the `live` source rows are readable (this function's contract).
    let r: [__m256; 8] = std::array::from_fn(|i| {
        if i < live {
            unsafe { super::widen8(src.add(i * step)) }
        } else {
            _mm256_setzero_ps()
        }
    });
    for (j, column) in transposed8(r).into_iter().enumerate() {
        // SAFETY: slot `j < 8` of `size` values from `dst` (this function's contract): the
        // whole column, or its first four values and then its fifth and sixth.
        unsafe {
            let at = dst.add(size * j);
            if size == TILE_ROWS {
                _mm256_storeu_ps(at, column);
            } else {
                _mm_storeu_ps(at, _mm256_castps256_ps128(column));
                _mm_storel_epi64(
                    at.add(4).cast(),
                    _mm_castps_si128(_mm256_extractf128_ps::<1>(column)),
                );
            }
        }
    }
}

/// The transpose of 8 rows of 8 values in registers: `out[j]` holds value `j` of each row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn transposed8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;

    // Within each 128-bit half: pairs of rows interleaved, then groups of four rows.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    // `u[q]` (rows 0-3) and `u[4 + q]` (rows 4-7): value `q` in the low half, `q + 4` in
    // the high half.
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    std::array::from_fn(|j| {
        let q = j % 4;
        if j < 4 {
            _mm256_permute2f128_ps::<0x20>(u[q], u[4 + q])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[q], u[4 + q])
        }
    })
}

/// A packed q8/q4 weight, dequantized 16 columns at a time into the panels.
struct Dequantizing<'a> {
    w: &'a PackedWeight,
    round_bf16: bool,
}

/// A panel's tiles of [`TILE_COLS`] columns, for [`Panels::pack`]: each tile's first
/// column in the block, how many of its columns the block has, and its `depth` rows of
/// values, zeroed first where the block ends inside it (padding columns add nothing).
fn panel_tiles(
    panel: &mut [f32],
    depth: usize,
    cols: usize,
) -> impl Iterator<Item = (usize, usize, &mut [f32])> {
    panel
        .chunks_mut(depth * TILE_COLS)
        .enumerate()
        .map(move |(tile, chunk)| {
            let t0 = tile * TILE_COLS;
            let width = TILE_COLS.min(cols.saturating_sub(t0));
            if width < TILE_COLS {
                chunk.fill(0.0);
            }
            (t0, width, chunk)
        })
}

impl Panels for Dequantizing<'_> {
    fn shape(&self) -> [usize; 2] {
        [self.w.k(), self.w.n()]
    }

    /// Columns come in whole 16-column tiles of the packed weight (`n` is a multiple of
    /// 16, and so are the blocks' first columns, [`tile_col_unit`]).
    fn pack(&self, k0: usize, k1: usize, c0: usize, cols: usize, panel: &mut [f32], isa: Simd) {
        let depth = k1 - k0;
        for (t0, width, chunk) in panel_tiles(panel, depth, cols) {
            for part in (0..width).step_by(16) {
                let t = (c0 + t0 + part) / 16;
                self.w
                    .dequantize_tile([k0, k1], t, self.round_bf16, &mut chunk[part..], TILE_COLS, isa);
            }
        }
    }

    /// Each block row's bytes of the block's tiles (all of a tile's groups: a slab may
    /// cover part of a block).
    fn lines(&self, k0: usize, k1: usize, c0: usize, cols: usize) -> Lines {
        let w = self.w;
        let block_bytes = w.block_bytes();
        let tile_bytes = w.tile_bytes();
        let (kb0, kb1) = (k0 / w.block(), k1.div_ceil(w.block()));
        Lines {
            first: w
                .values()
                .as_ptr()
                .wrapping_add(kb0 * block_bytes + c0 / 16 * tile_bytes),
            stride: block_bytes,
            rows: kb1.saturating_sub(kb0),
            per_row: (cols.div_ceil(16) * tile_bytes).div_ceil(64) + 1,
            next: 0,
        }
    }
}

/// Cache lines of a block of the weight to prefetch, as rows of whole lines.
struct Lines {
    first: *const u8,
    /// Bytes between the starts of two rows.
    stride: usize,
    rows: usize,
    /// Lines per row (64 bytes apart).
    per_row: usize,
    next: usize,
}

impl Lines {
    fn len(&self) -> usize {
        (self.rows * self.per_row).saturating_sub(self.next)
    }

    /// Asks for the next `count` lines (into L2) where the CPU has the instruction.
    #[inline(always)]
    fn prefetch(&mut self, count: usize) {
        let end = (self.next + count).min(self.rows * self.per_row);
        for line in self.next..end {
            let at = (line / self.per_row) * self.stride + (line % self.per_row) * 64;
            // The address is inside the weight (`Weight::lines`); a prefetch never faults.
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch reads nothing the program sees.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T1>(self.first.wrapping_add(at).cast());
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = at;
        }
        self.next = end;
    }
}

/// `block` of the product into the `[m, n]` output at `out`, slab by slab: the first slab
/// writes every value of the block, the others add to them, in a buffer of the task's own
/// until the last slab writes the output.
///
/// # Safety
/// `out` must point to room for `m * n` values (`x` holds `m` rows) that no one else reads
/// or writes inside `block`.
unsafe fn columns<S: Panels>(x: &GroupedRows, w: &S, block: Block, out: &Output, isa: Simd) {
    let Block { c0, cols, r0, r1 } = block;
    let [k, n] = w.shape();
    assert!(r1 <= x.rows && c0 + cols <= n);
    let tiles = cols.div_ceil(TILE_COLS);
    let row_step = tile_rows(isa);
    let mut panel = super::aligned_zeros::<f32>(SLAB * TILE_COLS * tiles);
    // The sums of the slabs before the last, in rows of the task's tiles: the output's rows
    // are `n` values apart, a multiple of 4 KB for most of these products, so that a tile's
    // rows shared L1 sets with the weight panel at every slab.
    let ldp = tiles * TILE_COLS;
    // Not zeroed: the first slab writes each value before the next reads it (through raw
    // pointers only: no reference to the spare room is ever made).
    let mut partial = super::AlignedVec::<f32>::with_capacity(64, if k > SLAB { (r1 - r0) * ldp } else { 0 });
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + SLAB).min(k);
        let depth = k1 - k0;
        let panel = &mut panel[..depth * TILE_COLS * tiles];
        w.pack(k0, k1, c0, cols, panel, isa);
        // The next slab's weight lines, fetched while this slab computes: packing reads a
        // few lines from each of many rows, too many streams for the hardware prefetchers,
        // and stalled on each (the transpose was 3-4% of an f32 image encode).
        let mut ahead = w.lines(k1, (k1 + SLAB).min(k), c0, cols);
        let steps = tiles * (r1 - r0).div_ceil(row_step);
        let per_step = ahead.len().div_ceil(steps.max(1));
        for (tile, b) in panel.chunks(depth * TILE_COLS).enumerate() {
            let t0 = tile * TILE_COLS;
            let mut r = r0;
            while r < r1 {
                if isa != Simd::Plain {
                    ahead.prefetch(per_step);
                }
                let rows = row_step.min(r1 - r);
                // Used only when there are several slabs (`partial` is allocated then).
                let sums = partial.as_mut_ptr().wrapping_add((r - r0) * ldp + t0);
                let (c, ldc) = if k1 < k {
                    (sums, ldp)
                } else {
                    // SAFETY: row `r < m`, column `c0 + t0 < n`: inside the output.
                    (unsafe { out.0.add(r * n + c0 + t0) }, n)
                };
                let tile = Tile {
                    // `r` is a multiple of the group size (`for_each_block`'s row unit).
                    a: x.group(k0, r, depth),
                    group: x.size,
                    b,
                    depth,
                    c,
                    ldc,
                    width: TILE_COLS.min(cols - t0),
                    prior: (k0 > 0).then_some((sums.cast_const(), ldp)),
                };
                // SAFETY: `Simd::Avx512` and `Simd::Avx2` are only chosen on CPUs with their
                // instructions (`Simd::best`); `rows` output rows of `width` values from
                // `c` lie in this task's block.
                unsafe {
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx512 => tile.avx512_rows(rows),
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx2 => tile.avx2_rows(rows),
                        _ => tile.plain(rows),
                    }
                };
                r += rows;
            }
        }
        k0 = k1;
    }
}

/// One register tile's operands: a group of activation rows input by input
/// ([`GroupedRows`]), `depth` packed weight rows of [`TILE_COLS`] values,
/// and output rows from `c` (stride `ldc`) of which the first `width` columns are this
/// tile's.
struct Tile<'a> {
    a: &'a [f32],
    /// Rows in the group `a` holds.
    group: usize,
    b: &'a [f32],
    depth: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    /// The sums of the slabs before (rows `.1` values apart), or none for the first slab,
    /// whose sums are `0 + a . b`. May be `c` itself.
    prior: Option<(*const f32, usize)>,
}

impl Tile<'_> {
    /// The prior sum of output `(r, j)` of the tile (zero for the first slab).
    ///
    /// # Safety
    /// Row `r` and column `j` must lie in the tile's live rows and columns.
    unsafe fn prior_at(&self, r: usize, j: usize) -> f32 {
        // SAFETY: as this function's (`prior` holds the tile's rows).
        self.prior
            .map_or(0.0, |(p, ld)| unsafe { p.add(r * ld + j).read() })
    }

    /// `c = prior + a . b` over `rows` rows (`c = 0 + a . b` for the first slab): per
    /// output, one FMA per input in order from zero, then one addition.
    ///
    /// # Safety
    /// `rows` output rows of `width` values from `c` (stride `ldc`) must be valid for writes,
    /// `prior`'s (if any) written before and valid for reads, and neither in use elsewhere.
    unsafe fn plain(self, rows: usize) {
        assert!(self.width <= TILE_COLS && self.b.len() >= self.depth * TILE_COLS);
        for r in 0..rows {
            let mut sums = [0f32; TILE_COLS];
            for i in 0..self.depth {
                let v = self.a[i * self.group + r];
                let ws = &self.b[i * TILE_COLS..i * TILE_COLS + self.width];
                for (s, &wv) in sums.iter_mut().zip(ws) {
                    *s = v.mul_add(wv, *s);
                }
            }
            for (j, s) in sums.into_iter().take(self.width).enumerate() {
                // SAFETY: as this function's (a raw write: the first slab's target is not
                // yet written; the prior sums are read from `prior`).
                unsafe {
                    let o = self.c.add(r * self.ldc + j);
                    o.write(self.prior_at(r, j) + s);
                }
            }
        }
    }

    /// [`Tile::plain`] with AVX-512 FMA, one copy of the kernel per row count.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; the output rows as for [`Tile::plain`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_rows(self, rows: usize) {
        // SAFETY (all arms): as this function's.
        unsafe {
            match rows {
                8 => self.avx512::<8>(),
                7 => self.avx512::<7>(),
                6 => self.avx512::<6>(),
                5 => self.avx512::<5>(),
                4 => self.avx512::<4>(),
                3 => self.avx512::<3>(),
                2 => self.avx512::<2>(),
                _ => self.avx512::<1>(),
            }
        }
    }

    /// `R` rows of [`Tile::plain`] in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; the output rows as for [`Tile::plain`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn avx512<const R: usize>(self) {
        use std::arch::x86_64::*;

        // The pointer reads below stay inside these bounds.
        assert!(self.width <= TILE_COLS && self.b.len() >= self.depth * TILE_COLS);
        assert!(R <= TILE_ROWS && self.group == TILE_ROWS);
        assert!(self.a.len() >= self.depth * TILE_ROWS);
        let masks = tile_masks(self.width);
        let c = self.c;
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        let a = self.a.as_ptr();
        let b = self.b.as_ptr();
        for i in 0..self.depth {
            // SAFETY: `i < depth`: packed row `i` has 48 values (three registers).
            let (w0, w1, w2) = unsafe {
                (
                    _mm512_loadu_ps(b.add(TILE_COLS * i)),
                    _mm512_loadu_ps(b.add(TILE_COLS * i + 16)),
                    _mm512_loadu_ps(b.add(TILE_COLS * i + 32)),
                )
            };
            // The group's inputs some lines ahead (past its end: the next group's, which the
            // next tile reads; a prefetch never faults).
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(i * TILE_ROWS + ACTIVATION_PREFETCH).cast());
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R`, input `i < depth` (checked above).
                let v = _mm512_set1_ps(unsafe { *a.add(i * TILE_ROWS + r) });
                row[0] = _mm512_fmadd_ps(v, w0, row[0]);
                row[1] = _mm512_fmadd_ps(v, w1, row[1]);
                row[2] = _mm512_fmadd_ps(v, w2, row[2]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: masked to the row's `width` live columns.
                unsafe {
                    let at = c.add(r * self.ldc + 16 * j);
                    let before = match self.prior {
                        None => _mm512_setzero_ps(),
                        Some((p, ld)) => _mm512_maskz_loadu_ps(masks[j], p.add(r * ld + 16 * j)),
                    };
                    _mm512_mask_storeu_ps(at, masks[j], _mm512_add_ps(before, *v));
                }
            }
        }
    }

    /// [`Tile::plain`] with AVX2 and FMA: each 16-column third of the tile for up to
    /// [`AVX2_ROWS`] rows (12 accumulators, 2 weight registers and a broadcast of the 16
    /// registers; a 4 x 24 block, which fits exactly, was compiled with moves and a spill).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the output rows as for [`Tile::plain`], at most
    /// [`AVX2_ROWS`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows(self, rows: usize) {
        assert!(rows <= AVX2_ROWS);
        for c0 in (0..self.width).step_by(16) {
            // SAFETY (all arms): as this function's.
            unsafe {
                match rows {
                    6 => self.avx2::<6>(c0),
                    5 => self.avx2::<5>(c0),
                    4 => self.avx2::<4>(c0),
                    3 => self.avx2::<3>(c0),
                    2 => self.avx2::<2>(c0),
                    _ => self.avx2::<1>(c0),
                }
            }
        }
    }

    /// `R` rows of [`Tile::plain`], columns `c0..c0 + 16` of the tile, in registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the output rows as for [`Tile::plain`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn avx2<const R: usize>(&self, c0: usize) {
        use std::arch::x86_64::*;

        // The pointer reads below stay inside these bounds.
        assert!(self.width <= TILE_COLS && c0 + 16 <= TILE_COLS && self.b.len() >= self.depth * TILE_COLS);
        assert!(R <= AVX2_ROWS && self.group == AVX2_ROWS && self.a.len() >= self.depth * AVX2_ROWS);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let a = self.a.as_ptr();
        // SAFETY: column `c0 < TILE_COLS` of the first packed row (above).
        let b = unsafe { self.b.as_ptr().add(c0) };
        for i in 0..self.depth {
            // SAFETY: `i < depth`: packed row `i` has 16 values from `c0`.
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_ps(b.add(TILE_COLS * i)),
                    _mm256_loadu_ps(b.add(TILE_COLS * i + 8)),
                )
            };
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R <= AVX2_ROWS`, input `i < depth` of the packed group
                // (checked above).
                let v = _mm256_set1_ps(unsafe { *a.add(i * AVX2_ROWS + r) });
                row[0] = _mm256_fmadd_ps(v, w0, row[0]);
                row[1] = _mm256_fmadd_ps(v, w1, row[1]);
            }
        }
        let live = (self.width - c0).min(16);
        for (r, row) in acc.iter().enumerate() {
            // SAFETY: output row `r < rows`, columns `c0..c0 + live` of the tile's.
            unsafe {
                let at = self.c.add(r * self.ldc + c0);
                if live == 16 {
                    for (j, v) in row.iter().enumerate() {
                        let to = at.add(8 * j);
                        let before = match self.prior {
                            None => _mm256_setzero_ps(),
                            Some((p, ld)) => _mm256_loadu_ps(p.add(r * ld + c0 + 8 * j)),
                        };
                        _mm256_storeu_ps(to, _mm256_add_ps(before, *v));
                    }
                } else {
                    let mut sums = [0f32; 16];
                    for (j, v) in row.iter().enumerate() {
                        _mm256_storeu_ps(sums.as_mut_ptr().add(8 * j), *v);
                    }
                    for (j, s) in sums.into_iter().take(live).enumerate() {
                        let o = at.add(j);
                        o.write(self.prior_at(r, c0 + j) + s);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16_gemm::tests::transpose;
    use crate::kernels::rows::tests::values;
    use burn::tensor::{bf16, f16};

    /// Per output, the sum over slabs of each slab's chain of FMAs (the kernel's contract),
    /// written as plainly as possible.
    fn chains(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let slab = |k0: usize| {
                    (k0..(k0 + SLAB).min(k)).fold(0f32, |s, i| x[r * k + i].mul_add(w[i * n + c], s))
                };
                out[r * n + c] = (0..k).step_by(SLAB).fold(0f32, |s, k0| s + slab(k0));
            }
        }
        out
    }

    /// Every kernel this CPU runs (the plain one everywhere).
    fn reachable() -> Vec<Simd> {
        let mut isas = vec![Simd::Plain];
        isas.extend(Simd::reachable_simd());
        isas
    }

    #[test]
    fn gemm_has_the_bits_of_its_slabs_fma_chains_in_both_weight_orders() {
        let isas = reachable();
        assert_eq!(f32_gemm_available(), isas.len() > 1);
        // k across slabs (odd, past 16-input blocks), widths with and without whole tiles,
        // tile halves and 16-column groups and tasks, row counts with and without whole
        // tiles and 4-row steps, narrow products split by rows.
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 2, 48),
            (8, 7, 5),
            (9, 130, 49),
            (17, 257, 200),
            (16, 300, 193),
            (5, 517, 96),
            (23, 64, 400),
            (40, 33, 17),
            (7, 20, 30),
        ] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let file = transpose(&w, k, n);
            // bf16 weights (widened as they are packed): the same chains of their values.
            let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let file16 = transpose(&w16, k, n);
            let wide16: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            // f16 weights alike (f16 prefills on CPUs without AMX).
            let h16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let file_h16 = transpose(&h16, k, n);
            let wide_h16: Vec<f32> = h16.iter().map(|v| v.to_f32()).collect();
            let want = chains(&x, &w, m, k, n);
            let want16 = chains(&x, &wide16, m, k, n);
            let want_h16 = chains(&x, &wide_h16, m, k, n);
            // bf16 and f16 activations (bf16 and f16 prefills), widened as they are grouped.
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let xb_wide: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let xh_wide: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            let want_bb = chains(&xb_wide, &wide16, m, k, n);
            let want_hh = chains(&xh_wide, &wide_h16, m, k, n);
            for &isa in &isas {
                let cases = [
                    (
                        "f32 [k,n]",
                        run(&x, &w, WeightOrder::InputMajor, [m, k, n], isa),
                        &want,
                    ),
                    (
                        "f32 [n,k]",
                        run(&x, &file, WeightOrder::OutputMajor, [m, k, n], isa),
                        &want,
                    ),
                    (
                        "bf16 [k,n]",
                        run(&x, &w16, WeightOrder::InputMajor, [m, k, n], isa),
                        &want16,
                    ),
                    (
                        "bf16 [n,k]",
                        run(&x, &file16, WeightOrder::OutputMajor, [m, k, n], isa),
                        &want16,
                    ),
                    (
                        "f16 [k,n]",
                        run(&x, &h16, WeightOrder::InputMajor, [m, k, n], isa),
                        &want_h16,
                    ),
                    (
                        "f16 [n,k]",
                        run(&x, &file_h16, WeightOrder::OutputMajor, [m, k, n], isa),
                        &want_h16,
                    ),
                    (
                        "bf16 x, bf16 [n,k]",
                        run(&xb, &file16, WeightOrder::OutputMajor, [m, k, n], isa),
                        &want_bb,
                    ),
                    (
                        "f16 x, f16 [n,k]",
                        run(&xh, &file_h16, WeightOrder::OutputMajor, [m, k, n], isa),
                        &want_hh,
                    ),
                    (
                        "f16 x, f16 [k,n]",
                        run(&xh, &h16, WeightOrder::InputMajor, [m, k, n], isa),
                        &want_hh,
                    ),
                ];
                for (name, got, want) in cases {
                    let got = got.expect("sizes match");
                    for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "{isa:?} {name} {m}x{k}x{n} at {i}: {g} vs {e}"
                        );
                    }
                }
            }
            // The public entry runs the best of them, or refuses.
            let best = matmul_f32_gemm(&x, &file, WeightOrder::OutputMajor, m, k, n);
            assert_eq!(best.is_some(), f32_gemm_available());
            if let Some(best) = best {
                assert!(best.iter().zip(&want).all(|(g, e)| g.to_bits() == e.to_bits()));
            }
        }
    }

    /// A q8/q4 weight dequantized as the panels are packed: every kernel the CPU has gives
    /// the bits of the slabs' FMA chains over the dequantized weight (rounded to bf16 for
    /// bf16 activations), blocks shorter and longer than a slab, odd row counts, and
    /// widths of whole and partial tiles and tasks.
    #[test]
    fn packed_weights_dequantized_in_the_pack_give_the_bits_of_the_dequantized_weight() {
        use crate::kernels::int8::ColumnBlocks;
        use crate::kernels::packed::tests::f16_scales;
        use crate::kernels::packed::{Bits, PackedWeight};

        // Pseudo-random values over the whole range (a regular pattern can repeat every
        // 4 rows, and so hide a mix-up of a q4 byte's two nibbles).
        let random = |len: usize, low: i32, count: u64| -> Vec<i8> {
            let mut next = crate::kernels::tests::xorshift(0x9E37_79B9_7F4A_7C15);
            (0..len).map(|_| (low + (next() % count) as i32) as i8).collect()
        };
        let isas = reachable();
        for (bits, low, count) in [(Bits::Eight, -128, 256), (Bits::Four, -8, 16)] {
            for &(m, k, n, block) in &[
                (1, 32, 16, 32),
                (7, 96, 48, 32),
                (13, 256, 208, 32),
                (17, 512, 400, 256),
                (6, 136, 32, 8),
                (25, 384, 1024, 128),
            ] {
                let case = format!("{bits:?} {m}x{k}x{n}/{block}");
                let q = random(k * n, low, count);
                let scales = f16_scales(k * n / block);
                let columns = ColumnBlocks {
                    q: &q,
                    scales: &scales,
                    k,
                    n,
                    block,
                };
                let w = PackedWeight::pack(&columns, bits).expect("pack");
                let x = values(m * k, 5);
                let dequantized = w.dequantize_reference();
                for round_bf16 in [false, true] {
                    let weight: Vec<f32> = if round_bf16 {
                        dequantized.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
                    } else {
                        dequantized.clone()
                    };
                    let want = chains(&x, &weight, m, k, n);
                    for &isa in &isas {
                        let got = run_from(&x, &Dequantizing { w: &w, round_bf16 }, m, isa).expect("sizes");
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{isa:?} {case} bf16 {round_bf16} at {i}: {g} vs {e}"
                            );
                        }
                    }
                    let best = matmul_f32_gemm_packed(&x, &w, m, round_bf16);
                    assert_eq!(best.is_some(), f32_gemm_available(), "{case}");
                    if let Some(best) = best {
                        assert!(
                            best.iter().zip(&want).all(|(g, e)| g.to_bits() == e.to_bits()),
                            "{case}"
                        );
                    }
                    let plain = matmul_f32_gemm_packed_reference(&x, &w, m, round_bf16).expect("sizes");
                    assert!(
                        plain.iter().zip(&want).all(|(g, e)| g.to_bits() == e.to_bits()),
                        "{case}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemm_is_within_rounding_of_the_f64_product() {
        let (m, k, n) = (19, 1000, 70);
        let x = values(m * k, 3);
        let w = values(k * n, 4);
        let got = matmul_f32_gemm_reference(&x, &w, WeightOrder::InputMajor, m, k, n).expect("sizes");
        for r in 0..m {
            for c in 0..n {
                let (sum, size) = (0..k).fold((0f64, 0f64), |(s, a), i| {
                    let p = x[r * k + i] as f64 * w[i * n + c] as f64;
                    (s + p, a + p.abs())
                });
                // Each of the k FMAs and slab additions rounds once:
                // |error| <= (k + slabs) * eps * sum |products|.
                let err = (got[r * n + c] as f64 - sum).abs();
                let bound = (k + k.div_ceil(SLAB)) as f64 * f32::EPSILON as f64 * size;
                assert!(err <= bound, "({r}, {c}): {err} of {size}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let (w, x) = (values(12, 0), values(4, 1));
        assert!(matmul_f32_gemm_reference(&x, &w, WeightOrder::InputMajor, 1, 4, 3).is_some());
        assert!(matmul_f32_gemm_reference(&x[..3], &w, WeightOrder::InputMajor, 1, 4, 3).is_none());
        assert!(matmul_f32_gemm_reference(&x, &w[..11], WeightOrder::OutputMajor, 1, 4, 3).is_none());
        assert!(matmul_f32_gemm_reference::<f32, _>(&[], &w, WeightOrder::InputMajor, 0, 4, 3).is_none());
    }
}
