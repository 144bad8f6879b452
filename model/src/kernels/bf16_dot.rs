//! bf16 weights times bf16 activations with AVX-512 BF16 dot products (`vdpbf16ps`).
//!
//! A bf16 model's activations are bf16 tensors, so its decode products are bf16 x bf16
//! with f32 accumulation, as in PyTorch. The plain streaming kernel widens every weight to
//! f32 and issues one FMA per value; `vdpbf16ps` multiplies two bf16 pairs per 32-bit lane
//! and adds both products to an f32 accumulator (each product is exact in f32; each
//! addition rounds once, as an FMA does), so a register takes 32 weight values per
//! instruction instead of 16, with no widening.
//!
//! The weight stays in Burn's `[k, n]` layout: two rows loaded side by side and interleaved
//! 16 bits at a time (`vpunpck{l,h}wd`) give the (row `kk`, row `kk + 1`) pairs of 32
//! columns, in an order within each 128-bit lane that the accumulator keeps until the end
//! of the slab and then undoes with two permutes. Columns past the last whole 32 and an odd
//! last row are added in plain Rust with the same arithmetic; so is everything on a CPU
//! without AVX-512 BF16.

use burn::tensor::bf16;

use super::sum_over_slabs;

/// Whether this CPU runs the `vdpbf16ps` kernel (AVX-512 F, BW and BF16).
pub fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Columns per register pair of the kernel.
const CHUNK: usize = 32;

/// `x [rows, k] @ w [k, n]` as f32, for activations that are bf16 values (widened to f32):
/// per output, the products of each row pair (`kk` even) are added odd row first, as
/// `vdpbf16ps` does, in 256-row slabs summed in slab order. `None` when an
/// activation is not a bf16 value (its rounding would change the product) or the sizes do
/// not match.
pub fn matmul_bf16(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    matmul_bf16_with(x, w, rows, k, n, bf16_dot_available())
}

/// [`matmul_bf16`] in plain Rust on every CPU.
pub fn matmul_bf16_reference(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    matmul_bf16_with(x, w, rows, k, n, false)
}

fn matmul_bf16_with(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize, simd: bool) -> Option<Vec<f32>> {
    if x.len() != rows * k || w.len() != k * n || x.iter().any(|v| v.to_bits() & 0xFFFF != 0) {
        return None;
    }
    // Activation pairs (row kk in the low half, kk + 1 in the high half), as `vdpbf16ps`
    // takes them; an odd last value pairs with zero.
    let half = k.div_ceil(2);
    let mut pairs = vec![0u32; rows * half];
    for r in 0..rows {
        for (p, two) in pairs[r * half..(r + 1) * half]
            .iter_mut()
            .zip(x[r * k..(r + 1) * k].chunks(2))
        {
            let lo = two[0].to_bits() >> 16;
            let hi = two.get(1).map_or(0, |v| v.to_bits() >> 16);
            *p = lo | (hi << 16);
        }
    }
    let slabs = Slabs {
        w,
        pairs: &pairs,
        rows,
        n,
        half,
    };
    Some(sum_over_slabs(rows, n, k, |k0, k1, acc| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when `bf16_dot_available()` said the CPU has
            // AVX-512 F/BW/BF16; `k0` is even (a multiple of K_BLOCK), `k1 <= k`, and `acc`
            // holds `rows * n` values.
            unsafe { slabs.add_simd(k0, k1, acc) };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        slabs.add_plain(k0, k1, 0, acc);
    }))
}

/// What every slab of one product shares.
struct Slabs<'a> {
    w: &'a [bf16],
    pairs: &'a [u32],
    rows: usize,
    n: usize,
    /// Activation pairs per row.
    half: usize,
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub(super) fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

impl Slabs<'_> {
    /// `acc[r, c] += x[r, kk] * w[kk, c]` over rows `k0..k1` for columns `c0..n`, pair by
    /// pair with `vdpbf16ps`'s order (odd row first). A row without a pair (the last of an
    /// odd `k`) multiplies a zero activation, as the kernel's zero pair does.
    fn add_plain(&self, k0: usize, k1: usize, c0: usize, acc: &mut [f32]) {
        let n = self.n;
        let mut kk = k0;
        while kk < k1 {
            let p = kk / 2;
            let second = kk + 1 < k1;
            for r in 0..self.rows {
                let pair = self.pairs[r * self.half + p];
                let (x0, x1) = (widen(pair as u16), widen((pair >> 16) as u16));
                let out = &mut acc[r * n + c0..(r + 1) * n];
                let w0 = &self.w[kk * n + c0..(kk + 1) * n];
                if second {
                    let w1 = &self.w[(kk + 1) * n + c0..(kk + 2) * n];
                    for ((o, a), b) in out.iter_mut().zip(w0).zip(w1) {
                        *o = x0.mul_add(a.to_f32(), x1.mul_add(b.to_f32(), *o));
                    }
                } else {
                    for (o, a) in out.iter_mut().zip(w0) {
                        *o = x0.mul_add(a.to_f32(), *o);
                    }
                }
            }
            kk += 2;
        }
    }

    /// [`Slabs::add_plain`] with `vdpbf16ps` on the whole 32-column chunks.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `k0` must be even, `k1 <= k`, and
    /// `acc.len() == rows * n`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn add_simd(&self, k0: usize, k1: usize, acc: &mut [f32]) {
        use std::arch::x86_64::*;

        let (n, rows, half) = (self.n, self.rows, self.half);
        let chunks = n / CHUNK;
        let whole = chunks * CHUNK;
        // Rows in pairs; an odd last row goes to the plain code after the permutes.
        let paired_end = k0 + (k1 - k0) / 2 * 2;
        let w = self.w.as_ptr() as *const u16;
        let load = |kk: usize, c: usize| {
            // SAFETY: `kk < k`, `c + 32 <= n`: 32 values inside `w`.
            unsafe { _mm512_loadu_si512(w.add(kk * n + c) as *const __m512i) }
        };
        let mut kk = k0;
        // Four row pairs per pass: the accumulator is read and written once per 8 rows.
        while kk + 8 <= paired_end {
            for c in (0..whole).step_by(CHUNK) {
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for j in 0..4 {
                    let (a, b) = (load(kk + 2 * j, c), load(kk + 2 * j + 1, c));
                    lo[j] = _mm512_unpacklo_epi16(a, b);
                    hi[j] = _mm512_unpackhi_epi16(a, b);
                }
                for r in 0..rows {
                    let at = acc[r * n + c..].as_mut_ptr();
                    let p = &self.pairs[r * half + kk / 2..][..4];
                    // SAFETY: `c + 32 <= n`: 32 accumulators of row `r`.
                    unsafe {
                        let mut a_lo = _mm512_loadu_ps(at);
                        let mut a_hi = _mm512_loadu_ps(at.add(16));
                        for j in 0..4 {
                            let xb = _mm512_set1_epi32(p[j] as i32);
                            a_lo = _mm512_dpbf16_ps(a_lo, as_bh(lo[j]), as_bh(xb));
                            a_hi = _mm512_dpbf16_ps(a_hi, as_bh(hi[j]), as_bh(xb));
                        }
                        _mm512_storeu_ps(at, a_lo);
                        _mm512_storeu_ps(at.add(16), a_hi);
                    }
                }
            }
            self.add_plain(kk, kk + 8, whole, acc);
            kk += 8;
        }
        while kk < paired_end {
            for c in (0..whole).step_by(CHUNK) {
                let (a, b) = (load(kk, c), load(kk + 1, c));
                let (lo, hi) = (_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b));
                for r in 0..rows {
                    let at = acc[r * n + c..].as_mut_ptr();
                    let xb = _mm512_set1_epi32(self.pairs[r * half + kk / 2] as i32);
                    // SAFETY: as above.
                    unsafe {
                        _mm512_storeu_ps(at, _mm512_dpbf16_ps(_mm512_loadu_ps(at), as_bh(lo), as_bh(xb)));
                        _mm512_storeu_ps(
                            at.add(16),
                            _mm512_dpbf16_ps(_mm512_loadu_ps(at.add(16)), as_bh(hi), as_bh(xb)),
                        );
                    }
                }
            }
            self.add_plain(kk, kk + 2, whole, acc);
            kk += 2;
        }
        // The interleave put columns 8L..8L+4 of 128-bit lane L in the low accumulator and
        // 8L+4..8L+8 in the high one: back to column order.
        let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        for r in 0..rows {
            for c in (0..whole).step_by(CHUNK) {
                let at = acc[r * n + c..].as_mut_ptr();
                // SAFETY: as above.
                unsafe {
                    let (a_lo, a_hi) = (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)));
                    _mm512_storeu_ps(at, _mm512_permutex2var_ps(a_lo, first, a_hi));
                    _mm512_storeu_ps(at.add(16), _mm512_permutex2var_ps(a_lo, second, a_hi));
                }
            }
        }
        if paired_end < k1 {
            self.add_plain(paired_end, k1, 0, acc);
        }
    }
}

/// The same 512 bits as 32 bf16 values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn as_bh(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute(v) }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `len` bf16 test values in about [-1, 1] with no simple pattern.
    pub(in crate::kernels) fn values(len: usize, seed: usize) -> Vec<bf16> {
        (0..len)
            .map(|i| bf16::from_f32((((i * 37 + seed * 11) % 101) as f32 - 50.0) / 47.0))
            .collect()
    }

    fn reference(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for kk in 0..k {
                for c in 0..n {
                    out[r * n + c] += x[r * k + kk] as f64 * w[kk * n + c].to_f64();
                }
            }
        }
        out
    }

    #[test]
    fn bf16_products_equal_the_plain_code_and_the_f64_sum() {
        let simd = bf16_dot_available();
        // Odd and even k (across slabs), widths with and without whole 32-column chunks, 1-16
        // rows.
        for &(rows, k, n) in &[
            (1, 1, 1),
            (1, 2, 32),
            (1, 7, 5),
            (2, 8, 64),
            (3, 130, 33),
            (1, 257, 96),
            (4, 300, 70),
            (16, 64, 40),
            (5, 517, 160),
        ] {
            let x: Vec<f32> = values(rows * k, 1).iter().map(|v| v.to_f32()).collect();
            let w = values(k * n, 2);
            let plain = matmul_bf16_reference(&x, &w, rows, k, n).expect("bf16 activations");
            let fast = matmul_bf16(&x, &w, rows, k, n).expect("bf16 activations");
            let exact = reference(&x, &w, rows, k, n);
            let scale = exact.iter().fold(1f64, |m, v| m.max(v.abs()));
            for (i, ((&p, &f), &e)) in plain.iter().zip(&fast).zip(&exact).enumerate() {
                // The same additions in the same order (`vdpbf16ps` flushes subnormal
                // inputs, which these values do not have).
                assert_eq!(p.to_bits(), f.to_bits(), "{rows}x{k}x{n} at {i} (simd {simd})");
                let err = (p as f64 - e).abs() / scale;
                assert!(err < 1e-5, "{rows}x{k}x{n} at {i}: {p} vs {e}");
            }
        }
    }

    #[test]
    fn activations_that_are_not_bf16_or_wrong_sizes_are_refused() {
        let w = values(4 * 3, 0);
        assert!(matmul_bf16(&[0.1, 0.0, 0.0, 0.0], &w, 1, 4, 3).is_none());
        assert!(matmul_bf16(&[0.5, 0.0, 0.0], &w, 1, 4, 3).is_none());
        assert!(matmul_bf16(&[0.5, 0.0, 0.0, 0.25], &w, 1, 4, 3).is_some());
    }
}
