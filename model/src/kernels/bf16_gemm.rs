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

use burn::tensor::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::bf16_dot::as_bh;
use super::bf16_dot::widen;

/// Rows of one register tile.
const TILE_ROWS: usize = 8;
/// Columns of one register tile: three registers of 16 f32 lanes.
const TILE_COLS: usize = 48;
/// Input values per packed weight slab (128 pairs: a 24 KB panel per tile, held in L1).
const SLAB: usize = 256;
/// Columns per rayon task (four tiles; each task packs its own columns once per slab).
const TASK_COLS: usize = 4 * TILE_COLS;

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

/// `x [m, k] @ w [k, n]` as f32 with `vdpbf16ps`; `None` when the CPU lacks AVX-512 BF16
/// (the caller widens to f32 instead) or the sizes do not match.
pub fn matmul_bf16_gemm(
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
    run(x, w, order, m, k, n, true)
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
    run(x, w, order, m, k, n, false)
}

fn run(
    x: &[bf16],
    w: &[bf16],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
    simd: bool,
) -> Option<Vec<f32>> {
    if x.len() != m * k || w.len() != k * n || m == 0 || k == 0 || n == 0 {
        return None;
    }
    let pairs = Pairs::of(x, m, k);
    let weight = Weight { w, order, k, n };
    let mut out = vec![0f32; m * n];
    let col_tasks = n.div_ceil(TASK_COLS);
    // A narrow product (k/v projections) splits its rows too, so that every thread has work;
    // each output is still one sum over its pairs in order, whatever the split.
    let row_parts = (2 * rayon::current_num_threads())
        .div_ceil(col_tasks)
        .clamp(1, m.div_ceil(TILE_ROWS));
    let part_rows = m.div_ceil(row_parts).next_multiple_of(TILE_ROWS);
    let row_parts = m.div_ceil(part_rows);
    let target = Output(out.as_mut_ptr());
    (0..col_tasks * row_parts).into_par_iter().for_each(|task| {
        let (t, part) = (task / row_parts, task % row_parts);
        let c0 = t * TASK_COLS;
        let r0 = part * part_rows;
        let block = Block {
            c0,
            cols: TASK_COLS.min(n - c0),
            r0,
            r1: (r0 + part_rows).min(m),
        };
        // SAFETY: `out` holds `m * n` values and outlives the tasks; tasks write disjoint
        // (row range, column range) blocks of it.
        unsafe { columns(&pairs, &weight, block, &target, n, simd) };
    });
    Some(out)
}

/// The output's first value, shared by the tasks (each writes its own block).
struct Output(*mut f32);

// SAFETY: the tasks write disjoint blocks of the output (see `run`).
unsafe impl Sync for Output {}

/// One task's share of the output: rows `r0..r1` of columns `c0..c0 + cols`.
#[derive(Clone, Copy)]
struct Block {
    c0: usize,
    cols: usize,
    r0: usize,
    r1: usize,
}

/// The activations as (value `2p`, value `2p + 1`) bit pairs, low half first, as
/// `vdpbf16ps` takes them; an odd last value pairs with zero.
struct Pairs {
    bits: Vec<u32>,
    m: usize,
    /// Pairs per row.
    half: usize,
}

impl Pairs {
    fn of(x: &[bf16], m: usize, k: usize) -> Self {
        let half = k.div_ceil(2);
        let mut bits = vec![0u32; m * half];
        for (row, xs) in bits.chunks_mut(half).zip(x.chunks(k)) {
            for (p, two) in row.iter_mut().zip(xs.chunks(2)) {
                let lo = two[0].to_bits() as u32;
                let hi = two.get(1).map_or(0, |v| v.to_bits() as u32);
                *p = lo | (hi << 16);
            }
        }
        Self { bits, m, half }
    }
}

/// The weight and its layout.
struct Weight<'a> {
    w: &'a [bf16],
    order: WeightOrder,
    k: usize,
    n: usize,
}

impl Weight<'_> {
    /// Packs pairs `p0..p1` of columns `c0..c0 + cols` into `panel`: per tile of
    /// [`TILE_COLS`] columns, `p1 - p0` rows of [`TILE_COLS`] pairs (columns past `cols` are
    /// zero).
    fn pack(&self, p0: usize, p1: usize, c0: usize, cols: usize, panel: &mut [u32], simd: bool) {
        let (k, n) = (self.k, self.n);
        let pairs = p1 - p0;
        for (tile, chunk) in panel.chunks_mut(pairs * TILE_COLS).enumerate() {
            let t0 = tile * TILE_COLS;
            let width = TILE_COLS.min(cols.saturating_sub(t0));
            if width < TILE_COLS {
                chunk.fill(0);
            }
            let c = c0 + t0;
            match self.order {
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
                            let rows = &self.w[(c + 16 * g) * k..(c + 16 * g + 16) * k];
                            for p in (p0..whole).step_by(16) {
                                let out = &mut chunk[(p - p0) * TILE_COLS + 16 * g..];
                                // SAFETY: `simd` is only true on CPUs with AVX-512 F; 16 rows
                                // of `k` values hold pairs `p..p + 16` (`2p + 32 <= k`), and
                                // `out` holds 16 packed rows of 48 from column `16g`.
                                unsafe { transpose_pairs(rows, k, p, out) };
                            }
                            from[16 * g..16 * g + 16].fill(whole);
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = simd;
                    for (j, &start) in from.iter().enumerate().take(width) {
                        let row = &self.w[(c + j) * k..(c + j + 1) * k];
                        for p in start..p1 {
                            let lo = row[2 * p].to_bits() as u32;
                            let hi = row.get(2 * p + 1).map_or(0, |v| v.to_bits() as u32);
                            chunk[(p - p0) * TILE_COLS + j] = lo | (hi << 16);
                        }
                    }
                }
                WeightOrder::InputMajor => {
                    // Two rows of the weight per pair: their columns side by side.
                    for p in p0..p1 {
                        let lo = &self.w[2 * p * n + c..][..width];
                        let out = &mut chunk[(p - p0) * TILE_COLS..][..width];
                        if 2 * p + 1 < k {
                            let hi = &self.w[(2 * p + 1) * n + c..][..width];
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

/// Pairs `p..p + 16` of 16 rows of `k` values (`rows`) into 16 packed rows of
/// [`TILE_COLS`] (`out`, the rows' 16 columns from its start): a 16 x 16 transpose of
/// 32-bit pairs in registers.
///
/// # Safety
/// The CPU must have AVX-512 F; `rows.len() >= 16 * k`, `2 * p + 32 <= k`, and
/// `out.len() >= 15 * TILE_COLS + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_pairs(rows: &[bf16], k: usize, p: usize, out: &mut [u32]) {
    use std::arch::x86_64::*;

    assert!(rows.len() >= 16 * k && 2 * p + 32 <= k && out.len() >= 15 * TILE_COLS + 16);
    let base = rows.as_ptr();
    // SAFETY: row `i < 16` holds values `2p..2p + 32` (asserted above).
    let r: [__m512i; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_si512(base.add(i * k + 2 * p) as *const __m512i) });
    // Rows 2i and 2i + 1 interleaved by pair, then by two pairs: in each 128-bit lane `l`,
    // `u[4g + q]` holds pair `4l + q` of rows `4g..4g + 4`.
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
    // Lanes regrouped so that packed row `4l + q` gathers lane `l` of `u[q]`, `u[4 + q]`,
    // `u[8 + q]` and `u[12 + q]`.
    let dst = out.as_mut_ptr();
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
            // SAFETY: packed row `4l + q < 16`, 16 values (asserted above).
            unsafe { _mm512_storeu_si512(dst.add((4 * l + q) * TILE_COLS) as *mut __m512i, v) };
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
    let mut panel = vec![0u32; SLAB / 2 * TILE_COLS * tiles];
    let mut p0 = 0;
    while p0 < x.half {
        let p1 = (p0 + SLAB / 2).min(x.half);
        let pairs = p1 - p0;
        let panel = &mut panel[..pairs * TILE_COLS * tiles];
        w.pack(p0, p1, c0, cols, panel, simd);
        for tile in 0..tiles {
            let t0 = tile * TILE_COLS;
            let b = &panel[tile * pairs * TILE_COLS..(tile + 1) * pairs * TILE_COLS];
            let mut r = r0;
            while r < r1 {
                let rows = TILE_ROWS.min(r1 - r);
                let tile = Tile {
                    a: &x.bits[r * x.half + p0..],
                    lda: x.half,
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
        let masks: [__mmask16; 3] = std::array::from_fn(|j| {
            let live = self.width.saturating_sub(16 * j).min(16);
            ((1u32 << live) - 1) as __mmask16
        });
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

#[cfg(test)]
mod tests {
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

    fn transpose(w: &[bf16], k: usize, n: usize) -> Vec<bf16> {
        (0..n * k).map(|i| w[(i % k) * n + i / k]).collect()
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
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let want = exact(&x, &w, m, k, n);
            let scale = want.iter().fold(1f64, |s, v| s.max(v.abs()));
            let plain = matmul_bf16_gemm_reference(&x, &w, WeightOrder::InputMajor, m, k, n).expect("sizes");
            let file = transpose(&w, k, n);
            let plain_file =
                matmul_bf16_gemm_reference(&x, &file, WeightOrder::OutputMajor, m, k, n).expect("sizes");
            assert_eq!(plain, plain_file, "{m}x{k}x{n}: the two orders");
            for (i, (&p, &e)) in plain.iter().zip(&want).enumerate() {
                let err = (p as f64 - e).abs() / scale;
                assert!(err < 1e-5, "{m}x{k}x{n} at {i}: {p} vs {e}");
            }
            if simd {
                for (order, w) in [(WeightOrder::InputMajor, &w), (WeightOrder::OutputMajor, &file)] {
                    let fast = matmul_bf16_gemm(&x, w, order, m, k, n).expect("available");
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
    fn wrong_sizes_are_refused() {
        let w = values(4 * 3, 0);
        let x = values(4, 1);
        assert!(matmul_bf16_gemm_reference(&x, &w, WeightOrder::InputMajor, 1, 4, 3).is_some());
        assert!(matmul_bf16_gemm_reference(&x[..3], &w, WeightOrder::InputMajor, 1, 4, 3).is_none());
        assert!(matmul_bf16_gemm_reference(&x, &w[..11], WeightOrder::OutputMajor, 1, 4, 3).is_none());
        assert!(matmul_bf16_gemm_reference(&[], &w, WeightOrder::InputMajor, 0, 4, 3).is_none());
    }
}
