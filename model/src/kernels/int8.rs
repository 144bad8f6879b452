//! Int8 x int8 products for the decode step, on weights quantized in blocks along the
//! input dimension (llama.cpp's Q8_0 x Q8_0 idea, on Burn's own quantized tensors).
//!
//! A decode step with a q8/q4 weight is bound by arithmetic, not by memory: widening every
//! int8 weight to f32 for an f32 FMA costs three vector instructions per 16 values. Here
//! the activation row is quantized too, per block of the weight's block length along K (one
//! f32 scale per block, values rounded to int8), and each block's product is an exact int32
//! sum computed by AVX-512 VNNI (`vpdpbusd`: 64 int8 products per instruction); the int32
//! sum is scaled once per block and output: `y[n] += (isum * dx[kb]) * sw[kb, n]`.
//!
//! The weight stays in Burn's row-major `[K, N]` layout (no second copy): four rows are
//! interleaved in registers so that each 32-bit lane holds the four K values of one output.
//! `vpdpbusd` multiplies unsigned by signed bytes, so the weights enter offset by 128
//! (`q ^ 0x80`) and `128 * sum(x_q)` of the block is taken off the int32 sum (exact).
//!
//! [`matmul_int8_reference`] is the same arithmetic in plain Rust, in the same order: the
//! VNNI path equals it bit for bit (a test checks), so results do not depend on the CPU.

use super::sum_over_slabs;

/// Activation rows quantized to int8, one f32 scale per block of `block` values along K.
#[derive(Debug, Clone)]
pub struct Int8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    rows: usize,
    k: usize,
    block: usize,
}

/// Values per task when [`Int8Rows::quantize`] shares a prefill's blocks among the threads.
const CHUNK_VALUES: usize = 1 << 16;

impl Int8Rows {
    /// Quantizes `x [rows, k]` per block: `scale = max|x| / 127`, `q = round(x / scale)`.
    /// `None` unless `block` is a positive multiple of 8 that divides `k` and the length
    /// matches.
    pub fn quantize(x: &[f32], rows: usize, k: usize, block: usize) -> Option<Self> {
        if block == 0 || !block.is_multiple_of(8) || !k.is_multiple_of(block) || x.len() != rows * k {
            return None;
        }
        let blocks = rows * k / block;
        let mut values = vec![0i8; rows * k];
        let mut scales = vec![0f32; blocks];
        let mut sums = vec![0i32; blocks];
        // Blocks are independent: a prefill's rows are quantized in parallel, a decode
        // step's (at most `MAX_STREAM_ROWS`) on the calling thread, inside its own team.
        let chunk_blocks = (CHUNK_VALUES / block).max(1);
        let chunk = chunk_blocks * block;
        #[cfg(target_arch = "x86_64")]
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let quantize = |x: &[f32], values: &mut [i8], scales: &mut [f32], sums: &mut [i32]| {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU has AVX-512 F (checked above); the slices hold whole
                // blocks, one scale and one sum per block.
                return unsafe { quantize_avx512::blocks(x, values, scales, sums, block) };
            }
            super::vectorized(QuantizeBlocks {
                x,
                values,
                scales,
                sums,
                block,
            })
        };
        if rows > super::MAX_STREAM_ROWS {
            use rayon::prelude::*;
            x.par_chunks(chunk)
                .zip(values.par_chunks_mut(chunk))
                .zip(scales.par_chunks_mut(chunk_blocks))
                .zip(sums.par_chunks_mut(chunk_blocks))
                .for_each(|(((x, values), scales), sums)| quantize(x, values, scales, sums));
        } else {
            quantize(x, &mut values, &mut scales, &mut sums);
        }
        Some(Self {
            values,
            scales,
            sums,
            rows,
            k,
            block,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (the input width K).
    pub fn width(&self) -> usize {
        self.k
    }

    /// Values per scale along K.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The quantized values of row `r` (length `k`).
    pub(crate) fn row(&self, r: usize) -> &[i8] {
        &self.values[r * self.k..(r + 1) * self.k]
    }

    /// The scales and value sums of row `r`'s blocks.
    pub(crate) fn blocks_of_row(&self, r: usize) -> (&[f32], &[i32]) {
        let per_row = self.k / self.block;
        let blocks = r * per_row..(r + 1) * per_row;
        (&self.scales[blocks.clone()], &self.sums[blocks])
    }

    /// Scale and value sum of block `kb` of row `r`.
    pub(crate) fn block_of(&self, r: usize, kb: usize) -> (f32, i32) {
        let i = r * (self.k / self.block) + kb;
        (self.scales[i], self.sums[i])
    }
}

/// A `[k, n]` int8 weight in row-major order with one f32 scale per `block` rows of each
/// column: the scale of `q[kk, j]` is `scales[(kk / block) * n + j]` (Burn's block order
/// for a `[block, 1]` block shape).
#[derive(Debug, Clone, Copy)]
pub struct ColumnBlocks<'a> {
    /// The values, `k * n`.
    pub q: &'a [i8],
    /// The scales, `k / block * n`.
    pub scales: &'a [f32],
    /// Input width (rows of the weight).
    pub k: usize,
    /// Output width.
    pub n: usize,
    /// Rows per scale.
    pub block: usize,
}

impl ColumnBlocks<'_> {
    /// Whether the lengths agree with the shape and the block length works here (a positive
    /// multiple of 8 that divides `k`: the kernel reads eight weight rows at a time).
    pub fn is_valid(&self) -> bool {
        self.block > 0
            && self.block.is_multiple_of(8)
            && self.k.is_multiple_of(self.block)
            && self.q.len() == self.k * self.n
            && self.scales.len() * self.block == self.k * self.n
    }
}

/// Whether this CPU runs the VNNI kernel (AVX-512 F, BW and VNNI).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x @ w` as `[rows, n]` f32, with the int8 products on VNNI where the CPU has it (plain
/// Rust otherwise; the same bits either way). `None` when the shapes or blocks disagree.
pub fn matmul_int8(x: &Int8Rows, w: &ColumnBlocks<'_>) -> Option<Vec<f32>> {
    matmul_int8_with(x, w, vnni_available())
}

/// [`matmul_int8`] in plain Rust on every CPU (the reference the VNNI path must equal).
pub fn matmul_int8_reference(x: &Int8Rows, w: &ColumnBlocks<'_>) -> Option<Vec<f32>> {
    matmul_int8_with(x, w, false)
}

fn matmul_int8_with(x: &Int8Rows, w: &ColumnBlocks<'_>, vnni: bool) -> Option<Vec<f32>> {
    if !w.is_valid() || x.k != w.k || x.block != w.block {
        return None;
    }
    Some(sum_over_slabs(x.rows, w.n, w.k, |k0, k1, out| {
        slab(x, w, k0 / w.block..k1 / w.block, vnni, out)
    }))
}

/// Adds the product over weight blocks `blocks` (rows `blocks.start * block..`) to the
/// zeroed `out [rows, n]`.
fn slab(x: &Int8Rows, w: &ColumnBlocks<'_>, blocks: std::ops::Range<usize>, vnni: bool, out: &mut [f32]) {
    let (rows, n) = (x.rows, w.n);
    let tiled = if cfg!(target_arch = "x86_64") && vnni {
        n / vnni_tile::WIDTH * vnni_tile::WIDTH
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    if tiled > 0 {
        // Eight weight rows at a time across all tiles (eight sequential streams, which the
        // hardware prefetchers follow), the int32 sums of the block kept per column in
        // `isum` (in the tiles' lane order), then scaled into `out` once per block.
        let mut isum = vec![0i32; rows * tiled];
        for kb in blocks.clone() {
            isum.fill(0);
            for kk in (kb * w.block..(kb + 1) * w.block).step_by(8) {
                for c in (0..tiled).step_by(vnni_tile::WIDTH) {
                    let mut r = 0;
                    while r < rows {
                        // SAFETY: `vnni` is only true when `vnni_available()` said the CPU
                        // has AVX-512 F/BW/VNNI; `w.is_valid()` and the shape checks of the
                        // caller keep every load inside `w.q` and `x` (rows kk..kk + 8 lie
                        // in block kb: blocks are multiples of 8); each call covers rows
                        // that exist (`r + R <= rows`) and columns `c..c + 64 <= tiled`.
                        r += unsafe {
                            match rows - r {
                                1 => vnni_tile::eight_rows::<1>(x, w, kk, r, c, tiled, &mut isum),
                                2 | 3 => vnni_tile::eight_rows::<2>(x, w, kk, r, c, tiled, &mut isum),
                                _ => vnni_tile::eight_rows::<4>(x, w, kk, r, c, tiled, &mut isum),
                            }
                        };
                    }
                }
            }
            for c in (0..tiled).step_by(vnni_tile::WIDTH) {
                for r in 0..rows {
                    // SAFETY: as above; `isum` holds `rows * tiled` sums.
                    unsafe { vnni_tile::scale_block(x, w, kb, r, c, tiled, &isum, out) };
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = vnni;
    plain_columns(x, w, blocks, tiled, out);
}

/// Columns `c..n` of the product in plain Rust: per block and row the exact int32 sums of
/// all those columns, read along the weight's rows, then scaled by the activation scale and
/// accumulated with the weight scale by one FMA per block (the VNNI kernel's order, so the
/// bits of [`column_reference`]). Integer sums in any order are the same number.
fn plain_columns(
    x: &Int8Rows,
    w: &ColumnBlocks<'_>,
    blocks: std::ops::Range<usize>,
    c: usize,
    out: &mut [f32],
) {
    let n = w.n;
    if c >= n {
        return;
    }
    let mut isum = vec![0i32; n - c];
    for r in 0..x.rows {
        let xr = x.row(r);
        for kb in blocks.clone() {
            isum.fill(0);
            let block_rows = kb * w.block..(kb + 1) * w.block;
            let weight_rows = w.q[block_rows.start * n..block_rows.end * n].chunks_exact(n);
            for (&xv, q) in xr[block_rows].iter().zip(weight_rows) {
                for (s, &q) in isum.iter_mut().zip(&q[c..]) {
                    *s += xv as i32 * q as i32;
                }
            }
            let (dx, _) = x.block_of(r, kb);
            let scales = &w.scales[kb * n + c..(kb + 1) * n];
            for ((o, &s), &sw) in out[r * n + c..(r + 1) * n].iter_mut().zip(&isum).zip(scales) {
                *o = (s as f32 * dx).mul_add(sw, *o);
            }
        }
    }
}

/// The blocks of [`Int8Rows::quantize`], as [`Vectorized`](super::Vectorized) work: on CPUs
/// without AVX-512 (compiled for AVX2 there), where [`quantize_avx512`] does not run. Per
/// block, `scale = max|x| / 127` (a NaN ignored, as `f32::max` ignores it) and `q =
/// round(x / scale)`, halfway away from zero, clamped to +-127, NaN to 0. Eight lanes of
/// maxima (exact in any order) and an unchecked conversion of the clamped value let LLVM
/// vectorize the loops; `as i8` (saturating, lane by lane) had kept them scalar, with a
/// `roundf` call per value.
struct QuantizeBlocks<'a> {
    x: &'a [f32],
    values: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [i32],
    block: usize,
}

impl super::Vectorized for QuantizeBlocks<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let block = self.block;
        for (((xb, qb), scale), sum) in self
            .x
            .chunks_exact(block)
            .zip(self.values.chunks_exact_mut(block))
            .zip(self.scales.iter_mut())
            .zip(self.sums.iter_mut())
        {
            let mut lanes = [0f32; 8];
            for part in xb.chunks(8) {
                for (m, v) in lanes.iter_mut().zip(part) {
                    *m = m.max(v.abs());
                }
            }
            let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut s = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                let t = (v * inv).round().clamp(-127.0, 127.0);
                let t = if t.is_nan() { 0.0 } else { t };
                // SAFETY: `t` is finite and within +-127 (a NaN was replaced above): the
                // value of `t as i8`, converted in vectors.
                let t = unsafe { t.to_int_unchecked::<i32>() };
                *q = t as i8;
                s += t;
            }
            *scale = d;
            *sum = s;
        }
    }
}

/// [`QuantizeBlocks`] in AVX-512 registers, with its bits: the maximum of the magnitudes
/// (a NaN leaves it as `f32::max` does), the same scale and inverse, and `round` (half away
/// from zero) as truncation plus one step where the exact remainder reaches one half. The
/// plain loop had kept a `roundf` call per value (12-14 cycles, a tenth of a q8 prefill
/// through the AMX-INT8 gemm).
#[cfg(target_arch = "x86_64")]
mod quantize_avx512 {
    use std::arch::x86_64::*;

    /// Quantizes each block of `block` values of `x` into `values`, its scale and value sum.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `x` and `values` hold whole blocks (`block` a multiple
    /// of 8), `scales` and `sums` one entry per block.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn blocks(x: &[f32], values: &mut [i8], scales: &mut [f32], sums: &mut [i32], block: usize) {
        let magnitude = _mm512_set1_epi32(0x7FFF_FFFF);
        let sign = _mm512_set1_epi32(i32::MIN);
        let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_epi32(1f32.to_bits() as i32));
        let (low, high) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        // The lanes of the 16 values from `i` that are inside the block.
        let lanes = |i: usize| -> __mmask16 {
            if block - i >= 16 {
                0xFFFF
            } else {
                (1 << (block - i)) - 1
            }
        };
        for (((xb, qb), scale), sum) in x
            .chunks_exact(block)
            .zip(values.chunks_exact_mut(block))
            .zip(scales.iter_mut())
            .zip(sums.iter_mut())
        {
            let mut amax = _mm512_setzero_ps();
            for i in (0..block).step_by(16) {
                // SAFETY: the lanes inside the block.
                let v = unsafe { _mm512_maskz_loadu_ps(lanes(i), xb.as_ptr().add(i)) };
                let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude));
                // `vmaxps` returns its second operand where either is NaN.
                amax = _mm512_max_ps(a, amax);
            }
            let amax = _mm512_reduce_max_ps(amax);
            let d = amax / 127.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let mut total = _mm512_setzero_si512();
            for i in (0..block).step_by(16) {
                let m = lanes(i);
                // SAFETY: as above.
                let v = unsafe { _mm512_maskz_loadu_ps(m, xb.as_ptr().add(i)) };
                let p = _mm512_mul_ps(v, inv);
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
                // `p - t` is exact: the fraction's bits of `p`.
                let fraction = _mm512_castsi512_ps(_mm512_and_si512(
                    _mm512_castps_si512(_mm512_sub_ps(p, t)),
                    magnitude,
                ));
                let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fraction, half);
                let step = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_and_si512(_mm512_castps_si512(p), sign),
                    one,
                ));
                let r = _mm512_mask_add_ps(t, away, t, step);
                let r = _mm512_min_ps(_mm512_max_ps(r, low), high);
                // `NaN as i8` is 0 (the product of an infinite or NaN input).
                let number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p);
                let q = _mm512_maskz_cvttps_epi32(m & number, r);
                total = _mm512_add_epi32(total, q);
                // SAFETY: the lanes inside the block.
                unsafe { _mm512_mask_cvtepi32_storeu_epi8(qb.as_mut_ptr().add(i), m, q) };
            }
            *scale = d;
            *sum = _mm512_reduce_add_epi32(total);
        }
    }
}

/// Output `(r, j)` in plain Rust, one column at a time: per block the exact int32 sum,
/// scaled by the activation scale, then accumulated with the weight scale by one FMA (the
/// VNNI kernel's order). The reference of [`plain_columns`].
#[cfg(test)]
fn column_reference(
    x: &Int8Rows,
    w: &ColumnBlocks<'_>,
    blocks: std::ops::Range<usize>,
    r: usize,
    j: usize,
) -> f32 {
    let xr = x.row(r);
    let mut acc = 0f32;
    for kb in blocks {
        let rows = kb * w.block..(kb + 1) * w.block;
        let isum: i32 = xr[rows.clone()]
            .iter()
            .zip(rows)
            .map(|(&x, kk)| x as i32 * w.q[kk * w.n + j] as i32)
            .sum();
        let (dx, _) = x.block_of(r, kb);
        let p = isum as f32 * dx;
        acc = p.mul_add(w.scales[kb * w.n + j], acc);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod vnni_tile {
    use std::arch::x86_64::*;

    use super::{ColumnBlocks, Int8Rows};

    /// Output columns per tile: four 16-lane accumulators.
    pub const WIDTH: usize = 64;

    /// Swaps 128-bit chunk `i` of `s[j]` with chunk `j` of `s[i]` (a 4x4 transpose of
    /// chunks; its own inverse). Converts between natural column order and the order in
    /// which the interleaved lanes hold the columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose_chunks(s: [__m512; 4]) -> [__m512; 4] {
        let a0 = _mm512_shuffle_f32x4::<0x44>(s[0], s[1]);
        let a1 = _mm512_shuffle_f32x4::<0xEE>(s[0], s[1]);
        let b0 = _mm512_shuffle_f32x4::<0x44>(s[2], s[3]);
        let b1 = _mm512_shuffle_f32x4::<0xEE>(s[2], s[3]);
        [
            _mm512_shuffle_f32x4::<0x88>(a0, b0),
            _mm512_shuffle_f32x4::<0xDD>(a0, b0),
            _mm512_shuffle_f32x4::<0x88>(a1, b1),
            _mm512_shuffle_f32x4::<0xDD>(a1, b1),
        ]
    }

    /// Adds weight rows `kk..kk + 8` times activation rows `r0..r0 + R` to the int32 sums
    /// of columns `c..c + 64` in `isum [rows, tiled]` (lane order); returns `R`. The
    /// interleaved weight rows serve all `R` activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `w` must be valid, `x` must match it,
    /// `kk + 8 <= w.k`, `c + 64 <= tiled <= w.n`, `r0 + R <= x.rows` and
    /// `isum.len() == x.rows * tiled`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn eight_rows<const R: usize>(
        x: &Int8Rows,
        w: &ColumnBlocks<'_>,
        kk: usize,
        r0: usize,
        c: usize,
        tiled: usize,
        isum: &mut [i32],
    ) -> usize {
        let n = w.n;
        let offset = _mm512_set1_epi8(-128);
        let base = w.q[kk * n + c..].as_ptr();
        // SAFETY: rows kk..kk + 8 exist and columns c..c + 64 are inside each row.
        let q: [__m512i; 8] = unsafe {
            std::array::from_fn(|i| {
                _mm512_xor_si512(_mm512_loadu_si512(base.add(i * n) as *const __m512i), offset)
            })
        };
        let lanes = [interleave(&q[0..4]), interleave(&q[4..8])];
        for r in 0..R {
            let xr = &x.row(r0 + r)[kk..kk + 8];
            let xv = [0, 4].map(|h| {
                _mm512_set1_epi32(i32::from_le_bytes([
                    xr[h] as u8,
                    xr[h + 1] as u8,
                    xr[h + 2] as u8,
                    xr[h + 3] as u8,
                ]))
            });
            let start = (r0 + r) * tiled + c;
            let dst = &mut isum[start..start + 64];
            for i in 0..4 {
                // SAFETY: `dst` holds 64 sums.
                unsafe {
                    let at = dst[i * 16..].as_mut_ptr() as *mut __m512i;
                    let s = _mm512_loadu_si512(at);
                    let s = _mm512_dpbusd_epi32(s, lanes[0][i], xv[0]);
                    let s = _mm512_dpbusd_epi32(s, lanes[1][i], xv[1]);
                    _mm512_storeu_si512(at, s);
                }
            }
        }
        R
    }

    /// Four rows of 64 offset weights interleaved so that each 32-bit lane holds one
    /// column's four values (lane `i` of result `l` within 128-bit chunk `L` is column
    /// `16 L + 4 l + i`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn interleave(q: &[__m512i]) -> [__m512i; 4] {
        let lo01 = _mm512_unpacklo_epi8(q[0], q[1]);
        let hi01 = _mm512_unpackhi_epi8(q[0], q[1]);
        let lo23 = _mm512_unpacklo_epi8(q[2], q[3]);
        let hi23 = _mm512_unpackhi_epi8(q[2], q[3]);
        [
            _mm512_unpacklo_epi16(lo01, lo23),
            _mm512_unpackhi_epi16(lo01, lo23),
            _mm512_unpacklo_epi16(hi01, hi23),
            _mm512_unpackhi_epi16(hi01, hi23),
        ]
    }

    /// `out[r, c..c + 64] += (isum * dx[r, kb]) * sw[kb, c..c + 64]` for one finished block,
    /// the sums taken back from lane order to column order and cleared of the weight offset.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW; `w` must be valid, `x` must match it,
    /// `kb < w.k / w.block`, `c + 64 <= tiled <= w.n`, `r < x.rows`,
    /// `isum.len() == x.rows * tiled` and `out.len() == x.rows * w.n`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn scale_block(
        x: &Int8Rows,
        w: &ColumnBlocks<'_>,
        kb: usize,
        r: usize,
        c: usize,
        tiled: usize,
        isum: &[i32],
        out: &mut [f32],
    ) {
        let n = w.n;
        let (dx, sum) = x.block_of(r, kb);
        let correction = _mm512_set1_epi32(128 * sum);
        let sums = &isum[r * tiled + c..r * tiled + c + 64];
        // SAFETY: `sums` holds 64 values.
        let exact = unsafe {
            [0, 1, 2, 3].map(|i| {
                let s = _mm512_loadu_si512(sums[i * 16..].as_ptr() as *const __m512i);
                _mm512_cvtepi32_ps(_mm512_sub_epi32(s, correction))
            })
        };
        let natural = transpose_chunks(exact);
        let dx = _mm512_set1_ps(dx);
        let scales = &w.scales[kb * n + c..kb * n + c + 64];
        let dst = &mut out[r * n + c..r * n + c + 64];
        for (i, v) in natural.iter().enumerate() {
            // SAFETY: `scales` and `dst` hold 64 values.
            unsafe {
                let sw = _mm512_loadu_ps(scales[i * 16..].as_ptr());
                let at = dst[i * 16..].as_mut_ptr();
                _mm512_storeu_ps(
                    at,
                    _mm512_fmadd_ps(_mm512_mul_ps(*v, dx), sw, _mm512_loadu_ps(at)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{activations, block_scales, int8_values};

    /// Both quantization loops ([`QuantizeBlocks`] on this CPU's vector extension, and
    /// [`quantize_avx512`] where it runs) give the values, scales and sums of the plain
    /// definition: random values, values whose products land on and beside halves, zeros,
    /// a block whose maximum is subnormal (its inverse scale overflows: +-127), an
    /// infinity, a NaN alone and beside infinities, blocks of 8 to 64.
    #[test]
    fn quantization_loops_have_the_plain_bits() {
        let mut next = crate::kernels::tests::xorshift(0xBB67_AE85_84CA_A73B);
        for block in [8, 16, 24, 32, 64] {
            let blocks = 12;
            let mut x: Vec<f32> = (0..blocks * block)
                .map(|_| {
                    ((next() % 200_001) as f32 / 1000.0 - 100.0)
                        * if next().is_multiple_of(7) { 1e-3 } else { 1.0 }
                })
                .collect();
            // Block 1: maximum 127, so values k + 0.5 are halves after scaling (`inv` 1).
            for (i, v) in x[block..2 * block].iter_mut().enumerate() {
                *v = if i == 0 { 127.0 } else { (i as f32 - 12.0) + 0.5 };
            }
            // Block 2: zeros, one negative. Block 3: the largest float below a half, and
            // its negation, beside halves.
            x[2 * block..3 * block].fill(0.0);
            x[2 * block + 1] = -0.0;
            for (i, v) in x[3 * block..4 * block].iter_mut().enumerate() {
                *v = match i % 4 {
                    0 => 127.0,
                    1 => 0.499_999_97,
                    2 => -0.499_999_97,
                    _ => -(i as f32) - 0.5,
                };
            }
            // Block 4: an infinity; block 5: a NaN beside infinities; block 6: a NaN alone
            // (the maximum must skip it); block 7: a subnormal maximum.
            x[4 * block + 3] = f32::INFINITY;
            x[5 * block + 2] = f32::NAN;
            x[5 * block + 5] = -f32::INFINITY;
            x[6 * block + 1] = f32::NAN;
            for (i, v) in x[7 * block..8 * block].iter_mut().enumerate() {
                *v = if i % 2 == 0 { 1e-40 } else { -3e-41 };
            }
            let mut want = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
            for (kb, xb) in x.chunks(block).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                for (i, &v) in xb.iter().enumerate() {
                    let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    want.0[kb * block + i] = q;
                    want.2[kb] += q as i32;
                }
                want.1[kb] = d;
            }
            assert!(
                want.1[6].is_finite() && want.1[6] > 0.0,
                "block 6 keeps its scale"
            );
            assert!(want.0[7 * block..8 * block].iter().any(|&q| q.abs() == 127));
            let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let check = |name: &str, got: (Vec<i8>, Vec<f32>, Vec<i32>)| {
                assert_eq!(got.0, want.0, "{name}, block {block}: values");
                assert_eq!(bits(&got.1), bits(&want.1), "{name}, block {block}: scales");
                assert_eq!(got.2, want.2, "{name}, block {block}: sums");
            };
            let mut got = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
            crate::kernels::vectorized(QuantizeBlocks {
                x: &x,
                values: &mut got.0,
                scales: &mut got.1,
                sums: &mut got.2,
                block,
            });
            check("vectorized loop", got);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut got = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
                // SAFETY: AVX-512 F checked above; whole blocks.
                unsafe { quantize_avx512::blocks(&x, &mut got.0, &mut got.1, &mut got.2, block) };
                check("AVX-512", got);
            } else {
                eprintln!("no AVX-512 F on this CPU: its loop not checked");
            }
        }
    }

    /// Every output of the int8 product equals `sum_kb dx*isum*sw` computed in f64 to f32
    /// rounding, and the VNNI tiles (when this CPU has them) equal the plain Rust path bit
    /// for bit, on widths with and without a 64-column remainder and 1..6 rows.
    #[test]
    fn int8_product_equals_reference_on_every_path() {
        for &(rows, k, n, block) in &[
            (1, 32, 64, 32),
            (1, 64, 200, 32),
            (3, 128, 130, 32),
            (5, 96, 256, 16),
            (6, 64, 72, 8),
            (2, 32, 7, 32),
            (2, 544, 130, 32),
        ] {
            let x = activations(rows, k);
            let q = int8_values(k * n);
            let scales = block_scales(k * n / block);
            let w = ColumnBlocks {
                q: &q,
                scales: &scales,
                k,
                n,
                block,
            };
            let xq = Int8Rows::quantize(&x, rows, k, block).expect("quantize");
            let plain = matmul_int8_reference(&xq, &w).expect("plain");
            // The same slabs, one column at a time.
            let by_column = sum_over_slabs(rows, n, k, |k0, k1, out| {
                for r in 0..rows {
                    for j in 0..n {
                        out[r * n + j] = column_reference(&xq, &w, k0 / block..k1 / block, r, j);
                    }
                }
            });
            assert_eq!(
                plain, by_column,
                "{rows}x{k}x{n}/{block}: row-major vs one column at a time"
            );
            for r in 0..rows {
                for j in 0..n {
                    let mut exact = 0f64;
                    for kb in 0..k / block {
                        let (dx, _) = xq.block_of(r, kb);
                        let isum: i64 = (kb * block..(kb + 1) * block)
                            .map(|kk| xq.row(r)[kk] as i64 * q[kk * n + j] as i64)
                            .sum();
                        exact += dx as f64 * isum as f64 * scales[kb * n + j] as f64;
                    }
                    let got = plain[r * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "{rows}x{k}x{n}/{block} ({r},{j}): {got} vs {exact}"
                    );
                }
            }
            if vnni_available() {
                let fast = matmul_int8(&xq, &w).expect("vnni");
                assert_eq!(
                    fast, plain,
                    "{rows}x{k}x{n}/{block}: VNNI differs from plain Rust"
                );
            } else {
                eprintln!("no AVX-512 VNNI on this CPU: only the plain path was checked");
            }
        }
    }

    /// Quantized activations are within half a step of the input per block, and their error
    /// bounds the product's: |x W - xq W| <= sum |x - xq| |W|.
    #[test]
    fn activation_quantization_rounds_half_away_from_zero_as_roundf_does() {
        // A block whose largest magnitude is 127 has a scale of exactly 1, so every value
        // below is the quantizer's input as written: ties, near-ties and the ends.
        let mut x = vec![
            127.0f32,
            -127.0,
            0.5,
            -0.5,
            1.5,
            -2.5,
            126.5,
            -126.5,
            0.49999997,
            -0.49999997,
        ];
        x.extend((0..22).map(|i| i as f32 * 3.25 - 40.0));
        let xq = Int8Rows::quantize(&x, 1, 32, 32).expect("quantize");
        assert_eq!(xq.block_of(0, 0).0, 1.0);
        for (i, (&q, &v)) in xq.row(0).iter().zip(&x).enumerate() {
            // `f32::round` here is the library call the vectorized loop replaces.
            assert_eq!(q, v.round().clamp(-127.0, 127.0) as i8, "value {i}: {v}");
        }
        assert_eq!(&xq.row(0)[2..10], &[1, -1, 2, -3, 127, -127, 0, 0]);
    }

    #[test]
    fn activation_quantization_is_within_half_a_step() {
        let (rows, k, n) = (2, 64, 64);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let xq = Int8Rows::quantize(&x, rows, k, 32).expect("quantize");
        for r in 0..rows {
            for kk in 0..k {
                let (d, sum) = xq.block_of(r, kk / 32);
                let back = xq.row(r)[kk] as f32 * d;
                assert!((back - x[r * k + kk]).abs() <= 0.5 * d * 1.0001, "({r},{kk})");
                let block = &xq.row(r)[kk / 32 * 32..kk / 32 * 32 + 32];
                assert_eq!(sum, block.iter().map(|&v| v as i32).sum::<i32>());
            }
        }
        let (q, s) = (int8_values(k * n), block_scales(k * n / 32));
        let w = ColumnBlocks {
            q: &q,
            scales: &s,
            k,
            n,
            block: 32,
        };
        let y = matmul_int8(&xq, &w).expect("product");
        for r in 0..rows {
            for j in 0..n {
                let wv = |kk: usize| s[kk / 32 * n + j] * q[kk * n + j] as f32;
                let exact: f32 = (0..k).map(|kk| x[r * k + kk] * wv(kk)).sum();
                let bound: f32 = (0..k)
                    .map(|kk| 0.5 * xq.block_of(r, kk / 32).0 * wv(kk).abs())
                    .sum();
                assert!((y[r * n + j] - exact).abs() <= bound * 1.01 + 1e-5, "({r},{j})");
            }
        }
        // Zero rows quantize to zeros with a zero scale (no division by zero).
        let zeros = Int8Rows::quantize(&[0.0; 32], 1, 32, 32).expect("zeros");
        assert_eq!(zeros.block_of(0, 0), (0.0, 0));
        // Blocks that do not divide K, or are not a multiple of 8, are refused.
        assert!(Int8Rows::quantize(&[0.0; 30], 1, 30, 32).is_none());
        assert!(Int8Rows::quantize(&[0.0; 36], 1, 36, 12).is_none());
    }
}
