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

use burn::tensor::bf16;

#[cfg(target_arch = "x86_64")]
use super::bf16_dot::as_bh;
use super::bf16_dot::widen;
use super::{Vectorized, Widen, vectorized};

/// Lanes of every dot product.
const LANES: usize = 16;
/// Output columns per task (whole rows of the weight each).
const COLUMNS_PER_TASK: usize = 32;

/// `x [rows, k] @ w^T` for `w` stored `[n, k]`, in f32.
pub fn matmul_rows<T: Widen>(x: &[f32], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "activations");
    assert_eq!(w.len(), n * k, "weight");
    by_column_tasks(rows, n, |j0, out| {
        vectorized(DenseDots {
            x,
            w,
            rows,
            k,
            j0,
            out,
        });
    })
}

/// `x [rows, k] @ w^T` for bf16 `w` stored `[n, k]` and activations that are bf16 values
/// (widened to f32), with `vdpbf16ps` where the CPU has it. `None` when an activation is
/// not a bf16 value or the sizes do not match.
pub fn matmul_rows_bf16(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    matmul_rows_bf16_with(x, w, rows, k, n, super::bf16_dot::bf16_dot_available())
}

/// [`matmul_rows_bf16`] in plain Rust on every CPU (the same bits).
pub fn matmul_rows_bf16_reference(
    x: &[f32],
    w: &[bf16],
    rows: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    matmul_rows_bf16_with(x, w, rows, k, n, false)
}

fn matmul_rows_bf16_with(
    x: &[f32],
    w: &[bf16],
    rows: usize,
    k: usize,
    n: usize,
    simd: bool,
) -> Option<Vec<f32>> {
    if x.len() != rows * k || w.len() != n * k || x.iter().any(|v| v.to_bits() & 0xFFFF != 0) {
        return None;
    }
    let xb: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    // SAFETY of the reinterpretation: `bf16` is a `u16` bit pattern (`repr(transparent)`).
    let wb: &[u16] = bytemuck::cast_slice(w);
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

/// One task of [`matmul_rows`].
struct DenseDots<'a, T> {
    x: &'a [f32],
    w: &'a [T],
    rows: usize,
    k: usize,
    j0: usize,
    out: &'a mut [f32],
}

impl<T: Widen> Vectorized for DenseDots<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (k, rows) = (self.k, self.rows);
        let columns = self.out.len() / rows;
        let row = |j: usize| &self.w[(self.j0 + j) * k..(self.j0 + j + 1) * k];
        // One weight row at a time: each task reads its rows as one sequential stream (four
        // rows per pass, one activation load for four, read four streams a row apart: 20-25%
        // slower on the Zen 4 machine of round 14, like the bf16 kernel of round 13). Each
        // row's sum is the same either way.
        for r in 0..rows {
            let xr = &self.x[r * k..(r + 1) * k];
            for j in 0..columns {
                self.out[j * rows + r] = dot(row(j), xr);
            }
        }
    }
}

/// The dot product of `x` with `w` (both `x.len()` long), in the module's order.
#[inline(always)]
fn dot<T: Widen>(w: &[T], x: &[f32]) -> f32 {
    let k = x.len();
    let whole = k / LANES * LANES;
    let mut lanes = [0f32; LANES];
    for (xs, w) in x[..whole].chunks_exact(LANES).zip(w[..whole].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = xs[l].mul_add(w[l].widen(), lanes[l]);
        }
    }
    for i in whole..k {
        lanes[i - whole] = x[i].mul_add(w[i].widen(), lanes[i - whole]);
    }
    lane_sum(lanes)
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

    fn run_plain(&self, out: &mut [f32]) {
        let rows = self.rows;
        for j in 0..out.len() / rows {
            let w = self.row(j);
            for r in 0..rows {
                let x = &self.x[r * self.k..(r + 1) * self.k];
                let mut lanes = [0f32; LANES];
                Self::add_pairs_plain(x, w, 0, &mut lanes);
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
        use std::arch::x86_64::*;

        let (k, rows) = (self.k, self.rows);
        let whole = k / (2 * LANES) * (2 * LANES);
        let columns = out.len() / rows;
        let load = |v: &[u16], at: usize| {
            debug_assert!(at + 2 * LANES <= v.len());
            // SAFETY: `at + 32 <= whole <= v.len()`.
            as_bh(unsafe { _mm512_loadu_si512(v.as_ptr().add(at) as *const __m512i) })
        };
        let finish = |acc: __m512, x: &[u16], w: &[u16]| {
            let mut lanes = [0f32; LANES];
            // SAFETY: 16 f32 lanes into a 16-f32 array.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
            Self::add_pairs_plain(x, w, whole, &mut lanes);
            lane_sum(lanes)
        };
        // One weight row at a time: each task reads its rows as one sequential stream. Four
        // rows per pass (one activation load for four) read four streams a row apart, which
        // the Zen 4 machine of round 13 read 15-40% slower (`stream_kernels`, rows table);
        // the activations stay in L1 either way. Each row's sum is the same either way.
        for r in 0..rows {
            let x = &self.x[r * k..(r + 1) * k];
            for j in 0..columns {
                let wr = self.row(j);
                let mut acc = _mm512_setzero_ps();
                for c in (0..whole).step_by(2 * LANES) {
                    acc = _mm512_dpbf16_ps(acc, load(wr, c), load(x, c));
                }
                out[j * rows + r] = finish(acc, x, wr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::f16;

    fn values(len: usize, seed: usize) -> Vec<f32> {
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

    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (1, 15, 3),
        (2, 33, 37),
        (3, 64, 70),
        (16, 100, 65),
        (5, 257, 4),
        (1, 2048, 129),
    ];

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
            let fast = matmul_rows_bf16(&x, &w, rows, k, n).expect("bf16 activations");
            let same = fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "bf16 {rows}x{k}x{n}: SIMD and plain code differ");
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
