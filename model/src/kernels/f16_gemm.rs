//! Many-row f16 products on AVX2 (f16 prefill, image encode) as dot products of rows.
//!
//! The f32 gemm ([`super::f32_gemm`]) widens an f16 weight as it packs it and multiplies
//! broadcast activations in a 6 x 16 tile; on Zen 3 it ran the 1.1B model's products at
//! 112-122 GFLOP/s, and llama.cpp's F16 prefill (tinyBLAS, this scheme) was faster than
//! ours. Here both operands stay f16 in memory, read in place: the weight in the
//! checkpoint's `[n, k]` rows, the activations in the prefill's `[m, k]` rows. A tile of 4
//! weight rows x 3 activation rows widens 8 inputs of each row per step (`vcvtph2ps`) into
//! 12 accumulators of 8 lanes along k: the 3 activation vectors are held, the weight rows
//! come one vector at a time (16 registers in all). Nothing is packed, and every operand
//! moves half an f32 operand's bytes through the caches. A task's columns (weight rows)
//! are taken [`TOKEN_BLOCK`] activation rows at a time, so that the block stays in L2
//! while each group of 4 weight rows (in L1 at k = 2048) meets all of it.
//!
//! Every output is the sum of 8 lanes, lane `l` the chain of FMAs from zero over inputs
//! `l, l + 8, l + 16, ...` in order, the lanes added as
//! `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`: the result depends on neither the
//! tiling nor the thread count, and [`matmul_f16_dot_reference`] computes the same bits in
//! plain Rust.

use burn::tensor::f16;

use super::Simd;
use super::attention::sum_lanes8;
use super::bf16_gemm::{Block, Output, for_each_block};

/// Lanes of one accumulator (inputs per step).
const LANES: usize = 8;
/// Weight rows (output columns) of one register tile.
const TILE_COLS: usize = 4;
/// Activation rows (output rows) of one register tile.
const TILE_ROWS: usize = 3;
/// Activation rows a task meets each group of weight rows with before the next group (24
/// tiles: 295 KB of f16 activations at k = 2048, in Zen 3's 512 KB L2).
const TOKEN_BLOCK: usize = 24 * TILE_ROWS;

/// Rows from which a decode step's f16 products (a batch's) take [`matmul_f16_dot`] rather
/// than the row kernels of [`super::rows`]: the 1.1B model's step products on Zen 3 took
/// 0.70-0.98x their time at 3 and 4 rows, 0.67-0.76x at 5-6, 0.61x at 16. At 2 rows the
/// products alone were level or a little faster (0.92-1.04x) but whole decode steps slower
/// (`bench --batch-sizes 2 --dtype f16`: 0.76-1.01x the tokens per second, median 0.88),
/// while at 3 rows the row kernels' steps gave 0.92-0.97x the dot products' rate. Each
/// row's bits then differ from those it gets alone (another summation order), as the AMX
/// row tiles' do.
pub const F16_DOT_MIN_ROWS: usize = 3;

/// Whether this CPU runs [`matmul_f16_dot`]: AVX2 with FMA and F16C, and not AVX-512 F
/// (whose 16-lane f32 gemm is left in place: this kernel was measured on AVX2 only).
pub fn f16_dot_available() -> bool {
    Simd::best() == Simd::Avx2
}

/// `x [m, k] @ w [n, k]ᵀ` (the weight in the checkpoint's `[out, in]` rows) in f32 with
/// AVX2, both operands f16 read in place; `None` on CPUs without it (see
/// [`f16_dot_available`]), when `k` is not a multiple of 8 or the sizes do not match (the
/// caller then takes the f32 gemm).
pub fn matmul_f16_dot(x: &[f16], w: &[f16], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    if !f16_dot_available() {
        return None;
    }
    run(x, w, [m, k, n], Simd::Avx2)
}

/// [`matmul_f16_dot`]'s arithmetic in plain Rust, on every CPU (for tests).
pub fn matmul_f16_dot_reference(x: &[f16], w: &[f16], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    run(x, w, [m, k, n], Simd::Plain)
}

fn run(x: &[f16], w: &[f16], [m, k, n]: [usize; 3], isa: Simd) -> Option<Vec<f32>> {
    if x.len() != m * k || w.len() != n * k || m == 0 || n == 0 || k == 0 || !k.is_multiple_of(LANES) {
        return None;
    }
    let mut out = Vec::<f32>::with_capacity(m * n);
    let target = Output(out.as_mut_ptr());
    for_each_block(m, n, TILE_ROWS, TILE_COLS, |block| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is AVX2 only where the CPU runs it (`matmul_f16_dot`); `out` has room
        // for `m * n` values and outlives the tasks, which write disjoint blocks of it.
        Simd::Avx2 => unsafe { avx2::block(x, w, k, n, block, &target) },
        _ => plain_block(x, w, k, n, block, &target),
    });
    // SAFETY: the blocks cover all `m * n` outputs and each task wrote every one of its own.
    unsafe { out.set_len(m * n) };
    Some(out)
}

/// One output's bits: the lanes' FMA chains (`w * x + acc`, rounded once), then their sum
/// in the kernel's order.
fn dot(x: &[f16], w: &[f16]) -> f32 {
    let mut lanes = [0f32; LANES];
    for (i, (a, b)) in x.iter().zip(w).enumerate() {
        let lane = &mut lanes[i % LANES];
        *lane = b.to_f32().mul_add(a.to_f32(), *lane);
    }
    sum_lanes8(&lanes)
}

fn plain_block(x: &[f16], w: &[f16], k: usize, n: usize, block: Block, out: &Output) {
    for r in block.r0..block.r1 {
        for c in block.c0..block.c0 + block.cols {
            let value = dot(&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
            // SAFETY: (r, c) lies in this task's block of the `m * n` output.
            unsafe { out.0.add(r * n + c).write(value) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use burn::tensor::f16;

    use super::super::attention::sum8;
    use super::{Block, LANES, Output, TILE_COLS, TILE_ROWS, TOKEN_BLOCK};

    /// A task's block: [`TOKEN_BLOCK`] activation rows at a time, each group of
    /// [`TILE_COLS`] weight rows against all of them, [`TILE_ROWS`] at a time.
    ///
    /// # Safety
    /// The CPU runs AVX2, FMA and F16C; `x` holds `[m, k]` and `w` `[n, k]` values with the
    /// block inside `m x n`; `out` has room for `m * n` values and no other task writes
    /// this block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block(x: &[f16], w: &[f16], k: usize, n: usize, block: Block, out: &Output) {
        let c1 = block.c0 + block.cols;
        for t0 in (block.r0..block.r1).step_by(TOKEN_BLOCK) {
            let t1 = (t0 + TOKEN_BLOCK).min(block.r1);
            for c in (block.c0..c1).step_by(TILE_COLS) {
                let wr = w[c * k..].as_ptr();
                let mut t = t0;
                while t < t1 {
                    let rows = (t1 - t).min(TILE_ROWS);
                    let xr = x[t * k..].as_ptr();
                    // SAFETY: `rows` activation rows from `t` and `cols` weight rows from `c`
                    // lie inside `x` and `w`, and their outputs inside this task's block.
                    unsafe {
                        let dst = out.0.add(t * n + c);
                        match ((c1 - c).min(TILE_COLS), rows) {
                            (4, 3) => tile43(xr, wr, k, dst, n),
                            (4, 2) => tile::<4, 2>(xr, wr, k, dst, n),
                            (4, 1) => tile::<4, 1>(xr, wr, k, dst, n),
                            (3, 3) => tile::<3, 3>(xr, wr, k, dst, n),
                            (3, 2) => tile::<3, 2>(xr, wr, k, dst, n),
                            (3, 1) => tile::<3, 1>(xr, wr, k, dst, n),
                            (2, 3) => tile::<2, 3>(xr, wr, k, dst, n),
                            (2, 2) => tile::<2, 2>(xr, wr, k, dst, n),
                            (2, 1) => tile::<2, 1>(xr, wr, k, dst, n),
                            (1, 3) => tile::<1, 3>(xr, wr, k, dst, n),
                            (1, 2) => tile::<1, 2>(xr, wr, k, dst, n),
                            _ => tile::<1, 1>(xr, wr, k, dst, n),
                        }
                    }
                    t += rows;
                }
            }
        }
    }

    /// [`tile`] for a whole 4 x 3 tile, its loop in assembly: LLVM kept only 15 of the 16
    /// values in registers (it widens the next weight row before the last FMAs of the one
    /// before) and moved an accumulator to the stack and back on every step.
    ///
    /// # Safety
    /// As [`tile`]'s, with `k` a multiple of 8 and at least 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile43(x: *const f16, w: *const f16, k: usize, dst: *mut f32, n: usize) {
        let z = _mm256_setzero_ps();
        let [mut a00, mut a01, mut a02, mut a03] = [z; 4];
        let [mut a10, mut a11, mut a12, mut a13] = [z; 4];
        let [mut a20, mut a21, mut a22, mut a23] = [z; 4];
        // SAFETY: the caller's: the loop reads 8 values of each of the 3 activation rows and
        // 4 weight rows at input `i`, for `i` from 0 to `k - 8`, and writes no memory.
        unsafe {
            std::arch::asm!(
                "2:",
                "vcvtph2ps {b0}, xmmword ptr [{x0} + 2*{i}]",
                "vcvtph2ps {b1}, xmmword ptr [{x1} + 2*{i}]",
                "vcvtph2ps {b2}, xmmword ptr [{x2} + 2*{i}]",
                "vcvtph2ps {v}, xmmword ptr [{w0} + 2*{i}]",
                "vfmadd231ps {a00}, {v}, {b0}",
                "vfmadd231ps {a10}, {v}, {b1}",
                "vfmadd231ps {a20}, {v}, {b2}",
                "vcvtph2ps {v}, xmmword ptr [{w1} + 2*{i}]",
                "vfmadd231ps {a01}, {v}, {b0}",
                "vfmadd231ps {a11}, {v}, {b1}",
                "vfmadd231ps {a21}, {v}, {b2}",
                "vcvtph2ps {v}, xmmword ptr [{w2} + 2*{i}]",
                "vfmadd231ps {a02}, {v}, {b0}",
                "vfmadd231ps {a12}, {v}, {b1}",
                "vfmadd231ps {a22}, {v}, {b2}",
                "vcvtph2ps {v}, xmmword ptr [{w3} + 2*{i}]",
                "vfmadd231ps {a03}, {v}, {b0}",
                "vfmadd231ps {a13}, {v}, {b1}",
                "vfmadd231ps {a23}, {v}, {b2}",
                "add {i}, 8",
                "cmp {i}, {k}",
                "jb 2b",
                x0 = in(reg) x,
                x1 = in(reg) x.add(k),
                x2 = in(reg) x.add(2 * k),
                w0 = in(reg) w,
                w1 = in(reg) w.add(k),
                w2 = in(reg) w.add(2 * k),
                w3 = in(reg) w.add(3 * k),
                k = in(reg) k,
                i = inout(reg) 0usize => _,
                b0 = out(ymm_reg) _,
                b1 = out(ymm_reg) _,
                b2 = out(ymm_reg) _,
                v = out(ymm_reg) _,
                a00 = inout(ymm_reg) a00,
                a01 = inout(ymm_reg) a01,
                a02 = inout(ymm_reg) a02,
                a03 = inout(ymm_reg) a03,
                a10 = inout(ymm_reg) a10,
                a11 = inout(ymm_reg) a11,
                a12 = inout(ymm_reg) a12,
                a13 = inout(ymm_reg) a13,
                a20 = inout(ymm_reg) a20,
                a21 = inout(ymm_reg) a21,
                a22 = inout(ymm_reg) a22,
                a23 = inout(ymm_reg) a23,
                options(nostack, readonly),
            );
            let sums = [[a00, a01, a02, a03], [a10, a11, a12, a13], [a20, a21, a22, a23]];
            write_sums(&sums, dst, n);
        }
    }

    /// `COLS` weight rows from `w` against `ROWS` activation rows from `x` (each `k` long),
    /// the sums written to `dst[row * n + col]`.
    ///
    /// # Safety
    /// As [`block`]'s, for these rows and outputs.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const COLS: usize, const ROWS: usize>(
        x: *const f16,
        w: *const f16,
        k: usize,
        dst: *mut f32,
        n: usize,
    ) {
        // SAFETY: the caller's: every load reads 8 values of a row inside `x` or `w`.
        unsafe {
            let load = |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            let mut acc = [[_mm256_setzero_ps(); COLS]; ROWS];
            let mut i = 0;
            while i < k {
                let xs: [__m256; ROWS] = std::array::from_fn(|r| load(x.add(r * k + i)));
                for c in 0..COLS {
                    let wv = load(w.add(c * k + i));
                    for (sums, &xv) in acc.iter_mut().zip(&xs) {
                        sums[c] = _mm256_fmadd_ps(wv, xv, sums[c]);
                    }
                }
                i += LANES;
            }
            write_sums(&acc, dst, n);
        }
    }

    /// A tile's accumulators, each summed across its lanes, to `dst[row * n + col]`.
    ///
    /// # Safety
    /// The CPU runs AVX2; `dst[row * n + col]` lies in the caller's block for every `row <
    /// ROWS` and `col < COLS`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn write_sums<const COLS: usize, const ROWS: usize>(
        acc: &[[__m256; COLS]; ROWS],
        dst: *mut f32,
        n: usize,
    ) {
        for (r, sums) in acc.iter().enumerate() {
            for (c, &sum) in sums.iter().enumerate() {
                // SAFETY: the caller's.
                unsafe { dst.add(r * n + c).write(sum8(sum)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rows::tests::values;

    fn halves(values: &[f32]) -> Vec<f16> {
        values.iter().map(|&v| f16::from_f32(v)).collect()
    }

    #[test]
    fn dot_tiles_have_the_bits_of_their_lane_chains() {
        // Widths with and without whole 4-column tiles and 192-column tasks; row counts
        // with and without whole 3-row tiles and 72-row blocks; narrow products (split by
        // rows); k of one step and of many.
        for &(m, k, n) in &[
            (1, 8, 1),
            (2, 16, 3),
            (3, 8, 4),
            (5, 24, 7),
            (17, 64, 33),
            (74, 40, 9),
            (145, 32, 203),
            (20, 136, 400),
            (151, 8, 6),
        ] {
            let x = halves(&values(m * k, 1));
            let w = halves(&values(n * k, 2));
            let want = matmul_f16_dot_reference(&x, &w, m, k, n).expect("sizes match");
            // The plain bits against f64 sums, within the chains' rounding bound: a wrong
            // pairing of rows and columns shows here.
            for r in 0..m {
                for c in 0..n {
                    let terms = (0..k).map(|i| x[r * k + i].to_f64() * w[c * k + i].to_f64());
                    let exact: f64 = terms.clone().sum();
                    let bound =
                        (k / LANES + 3) as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                    let diff = (f64::from(want[r * n + c]) - exact).abs();
                    assert!(diff <= bound, "({r}, {c}) of {m}x{k}x{n}: {diff} > {bound}");
                }
            }
            if f16_dot_available() {
                let got = matmul_f16_dot(&x, &w, m, k, n).expect("AVX2 runs");
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "AVX2 tiles differ from the plain chains at {m}x{k}x{n}");
            }
        }
    }

    #[test]
    fn dot_refuses_what_it_cannot_multiply() {
        let x = halves(&values(3 * 12, 1));
        let w = halves(&values(2 * 12, 2));
        // k not a multiple of 8: the caller takes the f32 gemm.
        assert!(matmul_f16_dot_reference(&x, &w, 3, 12, 2).is_none());
        assert!(matmul_f16_dot(&x, &w, 3, 12, 2).is_none());
        // Lengths that do not match the sizes.
        assert!(matmul_f16_dot_reference(&x[..35], &w[..16], 3, 8, 2).is_none());
        assert!(matmul_f16_dot_reference(&x[..24], &w[..16], 3, 8, 3).is_none());
    }
}
