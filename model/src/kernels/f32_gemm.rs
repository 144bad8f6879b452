//! Many-row f32 products (f32 prefill, image encode) with AVX-512 FMA.
//!
//! Flex's f32 gemm (the `gemm` crate) takes a checkpoint-order weight (`[out, in]` rows,
//! used in place from the file) as its packed operand and copies it value by value with
//! strided reads, once per block of columns and per thread: a fifth of an f32 image
//! encode went to that copy. Here each task packs its own columns once per slab of inputs
//! (16 x 16 blocks transposed in registers), the activations are read in place, and an
//! 8-row x 48-column tile of f32 accumulators takes one FMA per weight register and row.
//!
//! Every output is a sum over slabs of [`SLAB`] inputs, in order, of each slab's chain of
//! FMAs from zero (one long chain would add rounding errors over all `k` inputs; these grow
//! with `SLAB + k / SLAB`, as a blocked gemm's do): the result does not depend on the tiling
//! or the thread count, and [`matmul_f32_gemm_reference`] computes the same bits in plain
//! Rust.

#[cfg(target_arch = "x86_64")]
use super::bf16_gemm::tile_masks;
use super::bf16_gemm::{Block, Output, WeightOrder, for_each_block};

/// Rows of one register tile.
const TILE_ROWS: usize = 8;
/// Columns of one register tile: three registers of 16 f32 lanes.
const TILE_COLS: usize = 48;
/// Inputs per packed weight slab (a 24 KB panel per tile, held in L1).
const SLAB: usize = 128;

/// Whether this CPU runs the kernel (AVX-512 F).
pub fn f32_gemm_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x [m, k] @ w [k, n]` with AVX-512 FMA; `None` without AVX-512 F (the caller uses
/// Flex's gemm instead) or when the sizes do not match.
pub fn matmul_f32_gemm(
    x: &[f32],
    w: &[f32],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    if !f32_gemm_available() {
        return None;
    }
    run(x, w, order, [m, k, n], true)
}

/// [`matmul_f32_gemm`]'s arithmetic in plain Rust, on every CPU (for tests).
pub fn matmul_f32_gemm_reference(
    x: &[f32],
    w: &[f32],
    order: WeightOrder,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    run(x, w, order, [m, k, n], false)
}

fn run(x: &[f32], w: &[f32], order: WeightOrder, [m, k, n]: [usize; 3], simd: bool) -> Option<Vec<f32>> {
    if x.len() != m * k || w.len() != k * n || m == 0 || k == 0 || n == 0 {
        return None;
    }
    let weight = Weight { w, order, k, n };
    // Not zeroed first (a single-threaded pass over the output): each task's first slab
    // writes its block, `0 + sum` as the later slabs add to what is there.
    let mut out = Vec::<f32>::with_capacity(m * n);
    let target = Output(out.as_mut_ptr());
    for_each_block(m, n, TILE_ROWS, |block| {
        // SAFETY: `out` has room for `m * n` values and outlives the tasks; tasks write
        // disjoint (row range, column range) blocks of it.
        unsafe { columns(x, &weight, block, &target, simd) }
    });
    // SAFETY: the blocks cover all `m * n` outputs and every task's first slab wrote each
    // of its block's (`columns`).
    unsafe { out.set_len(m * n) };
    Some(out)
}

/// The weight and its layout.
struct Weight<'a> {
    w: &'a [f32],
    order: WeightOrder,
    k: usize,
    n: usize,
}

impl Weight<'_> {
    /// Packs inputs `k0..k1` of columns `c0..c0 + cols` into `panel`: per tile of
    /// [`TILE_COLS`] columns, `k1 - k0` rows of [`TILE_COLS`] values (columns past `cols`
    /// are zero).
    fn pack(&self, k0: usize, k1: usize, c0: usize, cols: usize, panel: &mut [f32], simd: bool) {
        let (k, n) = (self.k, self.n);
        let depth = k1 - k0;
        for (tile, chunk) in panel.chunks_mut(depth * TILE_COLS).enumerate() {
            let t0 = tile * TILE_COLS;
            let width = TILE_COLS.min(cols.saturating_sub(t0));
            if width < TILE_COLS {
                chunk.fill(0.0);
            }
            let c = c0 + t0;
            match self.order {
                WeightOrder::OutputMajor => {
                    // One row of the file per column, its inputs consecutive: 16 columns x
                    // 16 inputs transposed in registers where the CPU allows, the rest
                    // copied value by value.
                    let mut from = [k0; TILE_COLS];
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        let whole = k0 + depth / 16 * 16;
                        for g in 0..width / 16 {
                            let rows = &self.w[(c + 16 * g) * k..(c + 16 * g + 16) * k];
                            for i in (k0..whole).step_by(16) {
                                let out = &mut chunk[(i - k0) * TILE_COLS + 16 * g..];
                                assert!(i + 16 <= k && out.len() >= 15 * TILE_COLS + 16);
                                // SAFETY: `simd` is only true on CPUs with AVX-512 F; the 16
                                // rows of `k` values hold inputs `i..i + 16`, and `out` the 16
                                // packed rows of 16 values (asserted above).
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
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = simd;
                    for (j, &start) in from.iter().enumerate().take(width) {
                        let row = &self.w[(c + j) * k..(c + j + 1) * k];
                        for i in start..k1 {
                            chunk[(i - k0) * TILE_COLS + j] = row[i];
                        }
                    }
                }
                WeightOrder::InputMajor => {
                    for i in k0..k1 {
                        chunk[(i - k0) * TILE_COLS..][..width].copy_from_slice(&self.w[i * n + c..][..width]);
                    }
                }
            }
        }
    }
}

/// Cache lines of a block of the weight to prefetch, as rows of whole lines.
struct Lines {
    first: *const f32,
    /// Values between the starts of two rows.
    stride: usize,
    rows: usize,
    /// Lines per row (16 values apart).
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
            let at = (line / self.per_row) * self.stride + (line % self.per_row) * 16;
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

impl Weight<'_> {
    /// The lines that packing inputs `k0..k1` of columns `c0..c0 + cols` reads.
    fn lines(&self, k0: usize, k1: usize, c0: usize, cols: usize) -> Lines {
        let (first, stride, rows, width) = match self.order {
            WeightOrder::OutputMajor => (c0 * self.k + k0, self.k, cols, k1 - k0),
            WeightOrder::InputMajor => (k0 * self.n + c0, self.n, k1 - k0, cols),
        };
        Lines {
            first: self.w.as_ptr().wrapping_add(first),
            stride,
            rows: if k0 < k1 { rows } else { 0 },
            // One more for a row that does not start on a line.
            per_row: width.div_ceil(16) + 1,
            next: 0,
        }
    }
}

/// `block` of the product into the `[m, n]` output at `out`, slab by slab: the first slab
/// writes every value of the block, the others add to them.
///
/// # Safety
/// `out` must point to room for `m * n` values (`x` holds `m * k`) that no one else reads
/// or writes inside `block`.
unsafe fn columns(x: &[f32], w: &Weight, block: Block, out: &Output, simd: bool) {
    let Block { c0, cols, r0, r1 } = block;
    let (k, n) = (w.k, w.n);
    assert!(r1 * k <= x.len() && c0 + cols <= n);
    let tiles = cols.div_ceil(TILE_COLS);
    let mut panel = vec![0f32; SLAB * TILE_COLS * tiles];
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + SLAB).min(k);
        let depth = k1 - k0;
        let panel = &mut panel[..depth * TILE_COLS * tiles];
        w.pack(k0, k1, c0, cols, panel, simd);
        // The next slab's weight lines, fetched while this slab computes: packing reads a
        // few lines from each of many rows, too many streams for the hardware prefetchers,
        // and stalled on each (the transpose was 3-4% of an f32 image encode).
        let mut ahead = w.lines(k1, (k1 + SLAB).min(k), c0, cols);
        let steps = tiles * (r1 - r0).div_ceil(TILE_ROWS);
        let per_step = ahead.len().div_ceil(steps.max(1));
        for (tile, b) in panel.chunks(depth * TILE_COLS).enumerate() {
            let t0 = tile * TILE_COLS;
            let mut r = r0;
            while r < r1 {
                if simd {
                    ahead.prefetch(per_step);
                }
                let rows = TILE_ROWS.min(r1 - r);
                let tile = Tile {
                    a: &x[r * k + k0..],
                    lda: k,
                    b,
                    depth,
                    // SAFETY: row `r < m`, column `c0 + t0 < n`: inside the output.
                    c: unsafe { out.0.add(r * n + c0 + t0) },
                    ldc: n,
                    width: TILE_COLS.min(cols - t0),
                    first: k0 == 0,
                };
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is only true when `f32_gemm_available()` said the CPU
                    // has AVX-512 F; `rows` output rows of `width` values from `c` lie in
                    // this task's block.
                    unsafe { tile.simd_rows(rows) };
                    r += rows;
                    continue;
                }
                // SAFETY: as above.
                unsafe { tile.plain(rows) };
                r += rows;
            }
        }
        k0 = k1;
    }
}

/// One register tile's operands: activation rows (stride `lda`), `depth` packed weight rows
/// of [`TILE_COLS`] values, and output rows from `c` (stride `ldc`) of which the first
/// `width` columns are this tile's.
struct Tile<'a> {
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    depth: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    /// The first slab: `c` holds nothing yet and gets `0 + a . b`.
    first: bool,
}

impl Tile<'_> {
    /// `c += a . b` over `rows` rows (`c = 0 + a . b` for the first slab): per output, one
    /// FMA per input in order from zero, then one addition.
    ///
    /// # Safety
    /// `rows` output rows of `width` values from `c` (stride `ldc`) must be valid for writes,
    /// and written before unless `first`, and not in use elsewhere.
    unsafe fn plain(self, rows: usize) {
        assert!(self.width <= TILE_COLS && self.b.len() >= self.depth * TILE_COLS);
        for r in 0..rows {
            let mut sums = [0f32; TILE_COLS];
            for i in 0..self.depth {
                let v = self.a[r * self.lda + i];
                let ws = &self.b[i * TILE_COLS..i * TILE_COLS + self.width];
                for (s, &wv) in sums.iter_mut().zip(ws) {
                    *s = v.mul_add(wv, *s);
                }
            }
            for (j, s) in sums.into_iter().take(self.width).enumerate() {
                // SAFETY: as this function's (raw reads and writes: the first slab finds the
                // output not yet written).
                unsafe {
                    let o = self.c.add(r * self.ldc + j);
                    o.write(if self.first { 0.0 } else { o.read() } + s);
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
    /// The CPU must have AVX-512 F; the output rows as for [`Tile::plain`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn simd<const R: usize>(self) {
        use std::arch::x86_64::*;

        // The pointer reads below stay inside these bounds.
        assert!(self.width <= TILE_COLS && self.b.len() >= self.depth * TILE_COLS);
        assert!(R == 0 || self.a.len() >= (R - 1) * self.lda + self.depth);
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
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R`, input `i < depth` (checked above).
                let v = _mm512_set1_ps(unsafe { *a.add(r * self.lda + i) });
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
                    let before = if self.first {
                        _mm512_setzero_ps()
                    } else {
                        _mm512_maskz_loadu_ps(masks[j], at)
                    };
                    _mm512_mask_storeu_ps(at, masks[j], _mm512_add_ps(before, *v));
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

    #[test]
    fn gemm_has_the_bits_of_its_slabs_fma_chains_in_both_weight_orders() {
        let simd = f32_gemm_available();
        // k across slabs (odd, past 16-input blocks), widths with and without whole tiles,
        // 16-column groups and tasks, row counts with and without whole tiles, narrow
        // products split by rows.
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
        ] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let file = transpose(&w, k, n);
            let want = chains(&x, &w, m, k, n);
            let mut cases = vec![
                (
                    "plain [k,n]",
                    matmul_f32_gemm_reference(&x, &w, WeightOrder::InputMajor, m, k, n),
                ),
                (
                    "plain [n,k]",
                    matmul_f32_gemm_reference(&x, &file, WeightOrder::OutputMajor, m, k, n),
                ),
            ];
            if simd {
                cases.push((
                    "avx512 [k,n]",
                    matmul_f32_gemm(&x, &w, WeightOrder::InputMajor, m, k, n),
                ));
                cases.push((
                    "avx512 [n,k]",
                    matmul_f32_gemm(&x, &file, WeightOrder::OutputMajor, m, k, n),
                ));
            } else {
                assert!(matmul_f32_gemm(&x, &w, WeightOrder::InputMajor, m, k, n).is_none());
            }
            for (name, got) in cases {
                let got = got.expect("sizes match");
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), e.to_bits(), "{name} {m}x{k}x{n} at {i}: {g} vs {e}");
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
        assert!(matmul_f32_gemm_reference(&[], &w, WeightOrder::InputMajor, 0, 4, 3).is_none());
    }
}
