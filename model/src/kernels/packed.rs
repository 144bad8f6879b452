//! Quantized weights held outside Burn's tensors, in the order the decode kernel reads them
//! (`--quantize q8|q4` on the CPU).
//!
//! Burn's Flex backend keeps one `i8` per quantized value whatever the bit width, so a q4
//! weight took as much memory, and as many bytes per decode step, as a q8 one; and reading a
//! parameter (`Param::val`) copies its scales on every call. [`PackedWeight`] holds the same
//! values and the same block scales (`[block, 1]` blocks along K; f16, which the CPU
//! quantizer rounds them to, as llama.cpp's Q8_0/Q4_0 do), the values in the
//! order `vpdpbusd` consumes them: per block of K rows, per tile of 16 output columns, per
//! group of rows, 64 bytes in which byte `4 j + i` holds
//! - q8: `q[kk + i, c + j] + 128` (groups of 4 rows, one byte per value);
//! - q4: `q[kk + i, c + j] + 8` in its low nibble and `q[kk + 4 + i, c + j] + 8` in its high
//!   nibble (groups of 8 rows, two values per byte: one AND and one shift make the two
//!   64-byte operands).
//!
//! `vpdpbusd` multiplies unsigned weights by signed activations, so the offset comes off each
//! block's int32 sum as `offset * sum(x_q)`, which is exact, as in [`super::int8`]. CPUs
//! without AVX-512 VNNI read the same bytes as two 256-bit halves ([`Int8Kernel::Avx2`]); on
//! CPUs with AMX-INT8 a product of 12-16 rows takes each block's 16-column tile of q8 bytes as
//! a tile operand where it lies ([`Int8Kernel::Amx`]), and so does the gemm of a prefill
//! ([`PackedWeight::matmul_int8_gemm`]). The products are those of
//! [`super::int8::matmul_int8`] on the unpacked values, in the same order (the same K slabs,
//! one FMA per block): packing changes memory and speed, not a single bit of the result.
//!
//! [`pack_weight`] replaces a parameter by a lazy one whose initializer unpacks it, so any
//! Burn operation that reads the parameter still sees the quantized tensor it had; the
//! packed form is found by parameter id ([`packed_weight`]), which [`super::linear`] asks
//! before it reads the parameter.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, LazyLock, RwLock, Weak};

use burn::backend::{BackendTensor, DispatchKindConversion, DispatchTensor};
use burn::module::{Param, ParamId};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue};
use burn::tensor::{Bytes, DType, Device, Shape, Tensor, bf16, f16};
use burn_flex::{Flex, FlexQTensor, FlexTensor, Layout};
use rayon::prelude::*;

use super::int8::{ColumnBlocks, Int8Rows, vnni_available};
use super::{BlockAxis, K_BLOCK, QuantizedRows, Simd, sum_over_slabs};

/// Output columns per tile: one 512-bit register of int32 sums.
const TILE: usize = 16;
/// Bytes per group and tile.
const GROUP_BYTES: usize = 64;

/// Bits per stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    /// One value per byte, offset by 128.
    Eight,
    /// Two values per byte, offset by 8.
    Four,
}

impl Bits {
    /// Weight rows per 64-byte group.
    const fn group_rows(self) -> usize {
        match self {
            Self::Eight => 4,
            Self::Four => 8,
        }
    }

    /// Bytes of one block row: `block` weight rows of `n` values.
    const fn block_bytes(self, block: usize, n: usize) -> usize {
        match self {
            Self::Eight => block * n,
            Self::Four => block * n / 2,
        }
    }

    /// What is added to each value to store it unsigned.
    const fn offset(self) -> i32 {
        match self {
            Self::Eight => 128,
            Self::Four => 8,
        }
    }

    /// The values this width holds. Inlined where other crates instantiate the generic
    /// packers (a call per value was 7.6% of a q8 load's samples at the 1.1B size).
    #[inline]
    fn holds(self, q: i8) -> bool {
        match self {
            Self::Eight => true,
            Self::Four => (-8..=7).contains(&q),
        }
    }
}

/// A `[k, n]` weight of integers with one f32 scale per `block` rows of each column (Burn's
/// `[block, 1]` blocks), stored in the kernel's order (see the module docs).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    bits: Bits,
    k: usize,
    n: usize,
    block: usize,
    /// `k * n` (q8) or `k * n / 2` (q4) bytes.
    bytes: Held<u8>,
    /// `k / block * n` scales: `scales[kb * n + j]` (Burn's order).
    scales: Held<f16>,
}

/// Where a packed weight's bytes or scales live: an allocation of its own (packed at load),
/// or a window of a memory-mapped checkpoint holding them already in this order (used in
/// place: nothing is copied, and the pages stay file-backed, read when first used).
#[derive(Debug, Clone)]
enum Held<T> {
    Owned(Vec<T>),
    /// Checked when made ([`Held::mapped`]): aligned for `T`, a whole number of them.
    Mapped(Bytes),
}

impl<T: bytemuck::Pod> Held<T> {
    /// `bytes` as `len` values of `T`, if it holds exactly that many at `T`'s alignment.
    fn mapped(bytes: Bytes, len: usize) -> Option<Self> {
        let values: &[T] = bytemuck::try_cast_slice(&bytes).ok()?;
        (values.len() == len).then_some(Self::Mapped(bytes))
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Held<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Self::Owned(values) => values,
            // Cannot fail: checked in `Held::mapped`, and `Bytes` never moves its data.
            Self::Mapped(bytes) => bytemuck::cast_slice(bytes),
        }
    }
}

/// Why [`PackedWeight::from_stored`] refused the stored parts of a weight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoredLayoutError {
    /// The shape cannot be packed (see [`PackedWeight::pack`]).
    #[error("a [{k}, {n}] weight with blocks of {block} rows cannot be packed")]
    Shape {
        /// Input dimension.
        k: usize,
        /// Output dimension.
        n: usize,
        /// Rows per scale block.
        block: usize,
    },
    /// The values are not the bytes the shape needs.
    #[error("the packed values hold {found} bytes, the shape needs {expected}")]
    Values {
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// The scales are not the f16 values the shape needs, or not 2-byte aligned.
    #[error("the scales hold {found} bytes, the shape needs {expected} (2-byte aligned)")]
    Scales {
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
}

/// Whether a `[k, n]` weight with blocks of `block` rows can be packed.
fn shape_fits(k: usize, n: usize, block: usize) -> bool {
    block > 0
        && block.is_multiple_of(8)
        && k.is_multiple_of(block)
        && n.is_multiple_of(TILE)
        && K_BLOCK.is_multiple_of(block)
}

impl PackedWeight {
    /// Packs `w` with `bits` per value. `None` unless every value fits, every scale is an
    /// f16 value, the block is a multiple of 8 dividing `k` and [`K_BLOCK`], and `n` is a
    /// multiple of 16.
    pub fn pack(w: &ColumnBlocks<'_>, bits: Bits) -> Option<Self> {
        let (k, n, block) = (w.k, w.n, w.block);
        if !w.is_valid() || !n.is_multiple_of(TILE) || !K_BLOCK.is_multiple_of(block) {
            return None;
        }
        // In chunks: rayon's `any` over single values checks its stop flag per value.
        if bits == Bits::Four && w.q.par_chunks(1 << 16).any(|q| q.iter().any(|&q| !bits.holds(q))) {
            return None;
        }
        let scales: Vec<f16> = w.scales.iter().map(|&s| f16::from_f32(s)).collect();
        if scales.iter().zip(w.scales).any(|(h, &s)| h.to_f32() != s) {
            return None;
        }
        let mut packed = Self {
            bits,
            k,
            n,
            block,
            bytes: Held::Owned(Vec::new()),
            scales: Held::Owned(scales),
        };
        let mut bytes = vec![0u8; packed.block_bytes() * (k / block)];
        bytes
            .par_chunks_mut(packed.block_bytes())
            .enumerate()
            .for_each(|(kb, dst)| {
                packed.for_each_byte(kb, |at, kk, c| {
                    let value = |kk: usize| (w.q[kk * n + c] as i32 + bits.offset()) as u8;
                    dst[at] = match bits {
                        Bits::Eight => value(kk),
                        Bits::Four => value(kk) | (value(kk + 4) << 4),
                    };
                });
            });
        packed.bytes = Held::Owned(bytes);
        Some(packed)
    }

    /// Builds a `[k, n]` weight column by column, with no row-major copy of it:
    /// `column(j, k0..k1, q, scales)` writes rows `k0..k1` of column `j` (`k1 - k0` values,
    /// a whole number of blocks) and their `(k1 - k0) / block` scales. For a loader that
    /// quantizes a linear weight stored `[n, k]` (the file's order, where a column is a
    /// contiguous run). The same bytes and scales as [`PackedWeight::pack`] of those values,
    /// and `None` wherever `pack` refuses them.
    pub fn from_columns(
        k: usize,
        n: usize,
        block: usize,
        bits: Bits,
        column: impl Fn(usize, Range<usize>, &mut [i8], &mut [f32]) + Sync,
    ) -> Option<Self> {
        if !shape_fits(k, n, block) {
            return None;
        }
        let mut packed = Self {
            bits,
            k,
            n,
            block,
            bytes: Held::Owned(Vec::new()),
            scales: Held::Owned(Vec::new()),
        };
        // One task per `K_BLOCK` weight rows: `K_BLOCK / block` whole block rows.
        let blocks_per_task = K_BLOCK / block;
        let block_bytes = packed.block_bytes();
        let mut bytes = vec![0u8; block_bytes * (k / block)];
        let mut scales = vec![f16::ZERO; k / block * n];
        let group_rows = bits.group_rows();
        let groups = block / group_rows;
        bytes
            .par_chunks_mut(block_bytes * blocks_per_task)
            .zip(scales.par_chunks_mut(n * blocks_per_task))
            .enumerate()
            .try_for_each(|(task, (dst, dst_scales))| {
                let k0 = task * K_BLOCK;
                let rows = dst.len() / block_bytes * block;
                let nb = rows / block;
                // One tile of 16 columns at a time: `q[j * rows + kk]`, `s[j * nb + b]`.
                let mut q = vec![0i8; TILE * rows];
                let mut s = vec![0f32; TILE * nb];
                for t in 0..n / TILE {
                    for j in 0..TILE {
                        column(
                            t * TILE + j,
                            k0..k0 + rows,
                            &mut q[j * rows..(j + 1) * rows],
                            &mut s[j * nb..(j + 1) * nb],
                        );
                    }
                    if bits == Bits::Four && !q.iter().all(|&v| bits.holds(v)) {
                        return None;
                    }
                    for b in 0..nb {
                        for j in 0..TILE {
                            let scale = s[j * nb + b];
                            let half = f16::from_f32(scale);
                            if half.to_f32() != scale {
                                return None;
                            }
                            dst_scales[b * n + t * TILE + j] = half;
                        }
                        for g in 0..groups {
                            let at = b * block_bytes + (t * groups + g) * GROUP_BYTES;
                            for j in 0..TILE {
                                let column = &q[j * rows + b * block + g * group_rows..];
                                for i in 0..4 {
                                    let value = |kk: usize| (column[kk] as i32 + bits.offset()) as u8;
                                    dst[at + 4 * j + i] = match bits {
                                        Bits::Eight => value(i),
                                        Bits::Four => value(i) | (value(i + 4) << 4),
                                    };
                                }
                            }
                        }
                    }
                }
                Some(())
            })?;
        packed.bytes = Held::Owned(bytes);
        packed.scales = Held::Owned(scales);
        Some(packed)
    }

    /// A weight from its stored parts, used in place: `values` as [`PackedWeight::values`]
    /// returns them and `scales` the little-endian f16 bytes of [`PackedWeight::f16_scales`]
    /// (a checkpoint that stores the kernel's layout, read from a memory map: loading copies
    /// nothing). Any bytes of the right length are a valid weight.
    pub fn from_stored(
        bits: Bits,
        [k, n]: [usize; 2],
        block: usize,
        values: Bytes,
        scales: Bytes,
    ) -> Result<Self, StoredLayoutError> {
        if !shape_fits(k, n, block) {
            return Err(StoredLayoutError::Shape { k, n, block });
        }
        let expected = bits.block_bytes(block, n) * (k / block);
        let found = values.len();
        let bytes = Held::mapped(values, expected).ok_or(StoredLayoutError::Values { expected, found })?;
        let (count, found) = (k / block * n, scales.len());
        let scales = Held::mapped(scales, count).ok_or(StoredLayoutError::Scales {
            expected: count * size_of::<f16>(),
            found,
        })?;
        Ok(Self {
            bits,
            k,
            n,
            block,
            bytes,
            scales,
        })
    }

    /// The packed values, in the kernel's order (see the module docs): what
    /// [`PackedWeight::from_stored`] takes back.
    pub fn values(&self) -> &[u8] {
        &self.bytes
    }

    /// The block scales as stored, `[k / block, n]` row-major.
    pub fn f16_scales(&self) -> &[f16] {
        &self.scales
    }

    /// Whether the values are used in place from a checkpoint's map
    /// ([`PackedWeight::from_stored`]) rather than held in memory of their own.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Held::Mapped(_))
    }

    /// This weight as a model parameter of scheme `scheme` on the plain CPU `device`, as
    /// [`pack_weight`] leaves one: found by the kernels through [`packed_weight`], and
    /// unpacked, once, into the quantized `[k, n]` tensor if anything reads it. `None`
    /// unless `D` is 2.
    pub fn into_param<const D: usize>(self, scheme: QuantScheme, device: Device) -> Option<Param<Tensor<D>>> {
        (D == 2).then(|| register(Arc::new(self), scheme, device))
    }

    /// Bits per value.
    pub fn bits(&self) -> Bits {
        self.bits
    }

    /// Input width (rows of the weight).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Rows per scale.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The scales as f32, `scales[kb * n + j]`.
    pub fn scales(&self) -> Vec<f32> {
        self.scales.iter().map(|s| s.to_f32()).collect()
    }

    /// Bytes held: the values and the scales.
    pub fn resident_bytes(&self) -> usize {
        self.bytes.len() + self.scales.len() * size_of::<f16>()
    }

    /// Bytes of one block row (`block` weight rows).
    pub(crate) fn block_bytes(&self) -> usize {
        self.bits.block_bytes(self.block, self.n)
    }

    /// Bytes of one tile (16 columns) of a block row.
    pub(crate) fn tile_bytes(&self) -> usize {
        self.block_bytes() / (self.n / TILE)
    }

    /// Calls `f(at, kk, c)` for every byte of block row `kb`: its index `at` within the
    /// block row and the row `kk` and column `c` of its (first) value.
    #[inline(always)]
    fn for_each_byte(&self, kb: usize, mut f: impl FnMut(usize, usize, usize)) {
        let rows = self.bits.group_rows();
        let groups = self.block / rows;
        for t in 0..self.n / TILE {
            for g in 0..groups {
                let kk = kb * self.block + g * rows;
                let at = (t * groups + g) * GROUP_BYTES;
                for j in 0..TILE {
                    for i in 0..4 {
                        f(at + 4 * j + i, kk + i, t * TILE + j);
                    }
                }
            }
        }
    }

    /// Calls `f(kk, c, q)` for every value of block row `kb`, from its bytes `src`.
    #[inline(always)]
    fn for_each_value(&self, kb: usize, src: &[u8], mut f: impl FnMut(usize, usize, i8)) {
        let bits = self.bits;
        self.for_each_byte(kb, |at, kk, c| {
            let b = src[at] as i32;
            match bits {
                Bits::Eight => f(kk, c, (b - 128) as i8),
                Bits::Four => {
                    f(kk, c, ((b & 15) - 8) as i8);
                    f(kk + 4, c, ((b >> 4) - 8) as i8);
                }
            }
        });
    }

    /// The values, row-major `[k, n]`.
    pub fn unpack(&self) -> Vec<i8> {
        let (n, block) = (self.n, self.block);
        let mut out = vec![0i8; self.k * n];
        out.par_chunks_mut(block * n)
            .zip(self.bytes.par_chunks(self.block_bytes()))
            .enumerate()
            .for_each(|(kb, (dst, src))| {
                let first = kb * block;
                self.for_each_value(kb, src, |kk, c, q| dst[(kk - first) * n + c] = q);
            });
        out
    }

    /// `scale * q` row-major `[k, n]`, in parallel: the same bits as Burn's `dequantize`
    /// of the unpacked tensor.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(Simd::best())
    }

    /// [`PackedWeight::dequantize`] rounded to bf16 (`bf16::from_f32`), without an f32 copy.
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize_with(Simd::best())
    }

    /// [`PackedWeight::dequantize`] in plain Rust on every CPU (the reference of the
    /// vectorized one).
    pub fn dequantize_reference(&self) -> Vec<f32> {
        self.dequantize_with(Simd::Plain)
    }

    /// [`PackedWeight::dequantize_bf16`] in plain Rust on every CPU.
    pub fn dequantize_bf16_reference(&self) -> Vec<bf16> {
        self.dequantize_with(Simd::Plain)
    }

    /// `T::from(scale * q)` row-major `[k, n]`, in parallel over block rows, whose scales
    /// are widened once. A prefill with `--quantize` on a CPU without AMX dequantizes every
    /// weight once per product, so this loop is on its path: the SIMD kernels run it 16 columns at a time
    /// with AVX2 (two halves of 8) or AVX-512 (one register); all give the same bits, and a
    /// level the CPU lacks falls back to the plain loop.
    fn dequantize_with<T: Dequantized>(&self, kernel: Simd) -> Vec<T> {
        let kernel = if kernel.runs_here() { kernel } else { Simd::Plain };
        let (n, block) = (self.n, self.block);
        let mut out = vec![T::default(); self.k * n];
        out.par_chunks_mut(block * n)
            .zip(self.bytes.par_chunks(self.block_bytes()))
            .zip(self.scales.par_chunks(n))
            .enumerate()
            // One scale buffer per rayon job, not one allocation per block row.
            .for_each_init(Vec::new, |widened: &mut Vec<f32>, (kb, ((dst, src), scales))| {
                widened.clear();
                widened.extend(scales.iter().map(|s| s.to_f32()));
                let scales = &widened[..];
                // SAFETY (both arms): the CPU has the kernel's instructions (checked above);
                // `src` is block row `kb` of this weight, `scales` its `n` scales and `dst`
                // its `block * n` outputs.
                #[cfg(target_arch = "x86_64")]
                match kernel {
                    Simd::Avx512 => {
                        return unsafe { dequantize_avx512::block_row(self, src, scales, dst) };
                    }
                    Simd::Avx2 => {
                        return unsafe { dequantize_avx2::block_row(self, src, scales, dst) };
                    }
                    Simd::Plain => {}
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = kernel;
                let first = kb * block;
                self.for_each_value(kb, src, |kk, c, q| {
                    dst[(kk - first) * n + c] = T::from_f32(scales[c] * q as f32)
                });
            });
        out
    }

    /// `scale * q` of inputs `k0..k1` (multiples of 8) and the 16 columns of tile `t`, as
    /// f32, or rounded to bf16 (and kept as f32) when `round_bf16`: input `k0 + i` to
    /// `dst[i * stride..][..16]`. The bits of [`PackedWeight::dequantize`] (then
    /// `bf16::from_f32`), one tile at a time for a gemm that packs its panels from the
    /// packed bytes instead of from a dequantized copy of the whole weight. AVX2 (with
    /// F16C) where `kernel` is above plain Rust and the CPU runs it.
    ///
    /// # Panics
    /// When the range, the tile or `dst` do not fit.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dequantize_tile(
        &self,
        [k0, k1]: [usize; 2],
        t: usize,
        round_bf16: bool,
        dst: &mut [f32],
        stride: usize,
        kernel: Simd,
    ) {
        let rows = self.bits.group_rows();
        assert!(k0 <= k1 && k1 <= self.k && k0.is_multiple_of(rows) && k1.is_multiple_of(rows));
        assert!((t + 1) * TILE <= self.n && stride >= TILE);
        assert!(k1 == k0 || dst.len() >= (k1 - k0 - 1) * stride + TILE);
        let groups = self.block / rows;
        let block_bytes = self.block_bytes();
        // Resolved once: a mapped weight's slices go through `Bytes` on every access.
        let (bytes, all_scales): (&[u8], &[f16]) = (&self.bytes, &self.scales);
        for kk in (k0..k1).step_by(rows) {
            let (kb, g) = (kk / self.block, kk % self.block / rows);
            let at = kb * block_bytes + (t * groups + g) * GROUP_BYTES;
            let group = &bytes[at..at + GROUP_BYTES];
            let scales = &all_scales[kb * self.n + t * TILE..][..TILE];
            let out = &mut dst[(kk - k0) * stride..];
            #[cfg(target_arch = "x86_64")]
            if kernel != Simd::Plain && kernel.runs_here() {
                // SAFETY: AVX2 and F16C come with every level above plain (`Simd::best`);
                // `rows` output rows of 16 values `stride` apart lie in `out` (asserted above).
                unsafe { dequantize_avx2::group(self.bits, group, scales, round_bf16, out, stride) };
                continue;
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = kernel;
            for j in 0..TILE {
                let scale = scales[j].to_f32();
                for i in 0..4 {
                    let b = group[4 * j + i] as i32;
                    let mut put = |row: usize, q: i32| {
                        let v = scale * q as f32;
                        out[row * stride + j] = if round_bf16 { bf16::from_f32(v).to_f32() } else { v };
                    };
                    match self.bits {
                        Bits::Eight => put(i, b - 128),
                        Bits::Four => {
                            put(i, (b & 15) - 8);
                            put(i + 4, (b >> 4) - 8);
                        }
                    }
                }
            }
        }
    }

    /// [`PackedWeight::dequantize_tile`] rounded to bf16 and joined into the pairs that the
    /// AMX gemm's panels hold: pair `i` of inputs `k0 + 2i, k0 + 2i + 1` of tile `t`'s 16
    /// columns to `dst[16 i..][..16]`, the even input's bf16 bits in the low half. In one
    /// AVX-512 pass where the CPU has AVX-512 F (no f32 values written and read back), else
    /// through [`PackedWeight::dequantize_tile`]; the same bits either way.
    ///
    /// # Panics
    /// When `k0..k1` is not whole groups inside the weight, the tile is past it, or `dst`
    /// holds fewer than `(k1 - k0) / 2` rows of 16.
    pub(crate) fn dequantize_tile_pairs(
        &self,
        [k0, k1]: [usize; 2],
        t: usize,
        dst: &mut [u32],
        kernel: Simd,
    ) {
        let rows = self.bits.group_rows();
        assert!(k0 <= k1 && k1 <= self.k && k0.is_multiple_of(rows) && k1.is_multiple_of(rows));
        assert!((t + 1) * TILE <= self.n && dst.len() >= (k1 - k0) / 2 * TILE);
        #[cfg(target_arch = "x86_64")]
        if kernel == Simd::Avx512 && kernel.runs_here() {
            // SAFETY: the CPU has AVX-512 F (checked); the range, tile and `dst` fit (asserted).
            return unsafe { dequantize_avx512::tile_pairs(self, [k0, k1], t, dst) };
        }
        let mut values = vec![0f32; (k1 - k0) * TILE];
        self.dequantize_tile([k0, k1], t, true, &mut values, TILE, kernel);
        for (i, out) in dst.chunks_exact_mut(TILE).take((k1 - k0) / 2).enumerate() {
            let (even, odd) = (
                &values[2 * i * TILE..][..TILE],
                &values[(2 * i + 1) * TILE..][..TILE],
            );
            for ((o, e), d) in out.iter_mut().zip(even).zip(odd) {
                *o = (e.to_bits() >> 16) | (d.to_bits() & 0xFFFF_0000);
            }
        }
    }

    /// `x @ w` as `[rows, n]` f32 with int8 activations (AMX, VNNI or AVX2 where the CPU has
    /// them, [`Int8Kernel::best`]): equal bit for bit to [`super::int8::matmul_int8`] on the
    /// unpacked values. `None` when `x` does not match the weight.
    pub fn matmul_int8(&self, x: &Int8Rows) -> Option<Vec<f32>> {
        self.matmul_int8_on(x, Int8Kernel::best())
    }

    /// [`PackedWeight::matmul_int8`] in plain Rust on every CPU.
    pub fn matmul_int8_reference(&self, x: &Int8Rows) -> Option<Vec<f32>> {
        self.matmul_int8_on(x, Int8Kernel::Plain)
    }

    /// [`PackedWeight::matmul_int8`] on `kernel`; `None` as well when this CPU cannot run it.
    pub fn matmul_int8_on(&self, x: &Int8Rows, kernel: Int8Kernel) -> Option<Vec<f32>> {
        if !self.accepts(x) || !kernel.runs_here() {
            return None;
        }
        Some(sum_over_slabs(x.rows(), self.n, self.k, |k0, k1, out| {
            self.add_slab_with(x, k0, k1, kernel, out)
        }))
    }

    /// Whether [`PackedWeight::matmul_int8_gemm`] runs for this weight on this CPU.
    pub fn int8_gemm_applies(&self) -> bool {
        Self::int8_gemm_runs(self.bits, self.block)
    }

    /// Whether [`PackedWeight::matmul_int8_gemm`] runs on this CPU for weights of `bits`
    /// per value in blocks of `block` (any block that packs, on AMX-INT8).
    pub fn int8_gemm_runs(bits: Bits, block: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match Int8Kernel::best() {
                Int8Kernel::Amx => true,
                Int8Kernel::Avx2 => bits == Bits::Four && block <= q4_gemm_avx2::MAX_BLOCK,
                Int8Kernel::Vnni | Int8Kernel::Plain => false,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (bits, block);
            false
        }
    }

    /// [`PackedWeight::matmul_int8`] for many rows (a prefill), with the same bits, computed
    /// as a gemm where a CPU has the instructions for one:
    /// - AMX-INT8 (q8 and q4): each task takes a block of columns and rows, and per K slab
    ///   passes its rows 16 at a time along the slab's weight tiles, which stay in cache
    ///   (the decode kernel streams the whole weight once per 16 rows);
    /// - AVX2 without AVX-512 VNNI (q4, blocks of at most 32): each task keeps a 16-column
    ///   strip of the weight in L1 while groups of 4 activation rows pass along it, the
    ///   weight's unsigned nibbles multiplied by the activations with `vpmaddubsw` (a pair
    ///   of products is at most `2 * 15 * 127`, so a whole block of 32 sums in int16 with no
    ///   saturation), where the decode kernel spends a sign operation per row and group and
    ///   widens every group to int32.
    ///
    /// `None` where it does not apply ([`PackedWeight::int8_gemm_runs`]) or `x` does not
    /// match.
    pub fn matmul_int8_gemm(&self, x: &Int8Rows) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if self.int8_gemm_applies() && self.accepts(x) {
            use super::bf16_gemm::{Output, for_each_block, for_each_block_of};
            let (rows, n) = (x.rows(), self.n);
            let mut out = vec![0f32; rows * n];
            let target = Output(out.as_mut_ptr());
            if Int8Kernel::best() == Int8Kernel::Amx {
                let refused = std::sync::atomic::AtomicBool::new(false);
                for_each_block_of(rows, n, 16, TILE, AMX_INT8_TASK_COLS, |block| {
                    // SAFETY: `Amx` runs here (AMX-INT8, AVX-512 VNNI); `x` matches the
                    // weight; `out` holds `rows * n` zeros and outlives the tasks, which
                    // write disjoint blocks of whole 16-column tiles.
                    if !unsafe { amx_int8::gemm_block(self, x, block, &target) } {
                        refused.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                // A task whose thread held tiles of the other kind (a stolen task, inside
                // another kernel's): the decode kernels, which give the same bits.
                if refused.into_inner() {
                    return self.matmul_int8_on(x, Int8Kernel::Vnni);
                }
                return Some(out);
            }
            for_each_block(rows, n, q4_gemm_avx2::ROWS, TILE, |block| {
                // SAFETY: the CPU has AVX2, FMA and F16C (`Int8Kernel::Avx2` is the best
                // kernel); the weight holds 4 bits per value with blocks of at most
                // `MAX_BLOCK`, `x` matches it; `out` holds `rows * n` values and outlives
                // the tasks, which write disjoint blocks of whole 16-column tiles.
                unsafe { q4_gemm_avx2::block(self, x, block, &target) }
            });
            return Some(out);
        }
        None
    }

    /// Adds weight rows `k0..k1` (whole blocks) of `x @ w` to `out [rows, n]`: one slab of
    /// [`PackedWeight::matmul_int8`], for callers that run several products' slabs as one
    /// set of tasks. `x` must match the weight ([`PackedWeight::accepts`]). `out` must be
    /// zeroed: the AMX groups add the slab's sums to it once, the VNNI ones block by block,
    /// which gives the same bits only from zero.
    pub(crate) fn add_slab(&self, x: &Int8Rows, k0: usize, k1: usize, out: &mut [f32]) {
        self.add_slab_with(x, k0, k1, Int8Kernel::best(), out);
    }

    /// `kernel` must run on this CPU ([`Int8Kernel::runs_here`]).
    fn add_slab_with(&self, x: &Int8Rows, k0: usize, k1: usize, kernel: Int8Kernel, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if kernel == Int8Kernel::Amx && x.rows() >= AMX_INT8_MIN_ROWS {
            // SAFETY: `Amx` runs here (AMX-INT8 and AVX-512 VNNI, the caller's promise); `x`
            // matches the weight, `k0..k1` are whole blocks inside it and `out` holds
            // `rows * n` values (as for every kernel).
            unsafe { amx_int8::add_slab(self, x, k0, k1, out) };
            return;
        }
        // `Amx` with fewer rows: `add_block` runs VNNI for it.
        for kb in k0 / self.block..k1 / self.block {
            self.add_block(x, kb, kernel, 0..x.rows(), out);
        }
    }

    /// Whether `x` has this weight's width and block length.
    pub(crate) fn accepts(&self, x: &Int8Rows) -> bool {
        x.width() == self.k && x.block() == self.block
    }

    /// `out[r, :] += (isum[r, :] * dx[r, kb]) * sw[kb, :]` for block row `kb` and the
    /// activation rows `r` in `rows` (all of them, or a group [`amx_int8`] leaves to VNNI).
    fn add_block(&self, x: &Int8Rows, kb: usize, kernel: Int8Kernel, rows: Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            // Block row `kb`, all its tiles, up to `$most` activation rows per call of
            // `$tile::add` (`$fewer`: the smaller counts, for the last rows).
            macro_rules! each_tile {
                ($tile:ident, $most:literal, [$($fewer:literal),*]) => {{
                    let mut r = rows.start;
                    while r < rows.end {
                        // SAFETY: `Vnni` (or `Amx`) / `Avx2` are only passed where `runs_here` said
                        // the CPU has AVX-512 F/BW/VNNI / AVX2, FMA and F16C; `matmul_int8_on` checked
                        // that `x` matches the weight; each call covers rows `r..r + R <= rows.end
                        // <= x.rows()` and block row `kb < k / block`, and `out` holds
                        // `x.rows() * n` values.
                        r += unsafe {
                            match (self.bits, rows.end - r) {
                                $((Bits::Eight, $fewer) => $tile::add::<$fewer, 8>(self, x, kb, r, out),)*
                                (Bits::Eight, _) => $tile::add::<$most, 8>(self, x, kb, r, out),
                                $((Bits::Four, $fewer) => $tile::add::<$fewer, 4>(self, x, kb, r, out),)*
                                (Bits::Four, _) => $tile::add::<$most, 4>(self, x, kb, r, out),
                            }
                        };
                    }
                }};
            }
            match kernel {
                Int8Kernel::Vnni | Int8Kernel::Amx => return each_tile!(vnni_tile, 8, [1, 2, 3, 4, 5, 6, 7]),
                Int8Kernel::Avx2 => return each_tile!(avx2_tile, 4, [1, 2, 3]),
                Int8Kernel::Plain => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        let n = self.n;
        let src = &self.bytes[kb * self.block_bytes()..][..self.block_bytes()];
        let mut isum = vec![0i32; n];
        for r in rows {
            let xr = x.row(r);
            isum.fill(0);
            self.for_each_value(kb, src, |kk, c, q| isum[c] += q as i32 * xr[kk] as i32);
            let (dx, _) = x.block_of(r, kb);
            let scales = &self.scales[kb * n..(kb + 1) * n];
            for ((o, &s), &sw) in out[r * n..(r + 1) * n].iter_mut().zip(&isum).zip(scales) {
                *o = (s as f32 * dx).mul_add(sw.to_f32(), *o);
            }
        }
    }
}

/// The instruction sets [`PackedWeight::matmul_int8`] runs on, chosen at run time. Each
/// gives the bits of the plain loop: the int32 sums of a block are exact on all four.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX-INT8 tiles (`tdpbsud`, up to 16 x 16 x 64 products per instruction, here one
    /// block of 16 columns) for products of [`AMX_INT8_MIN_ROWS`] rows or more, VNNI for
    /// fewer: Sapphire Rapids and later Xeons.
    Amx,
    /// AVX-512 VNNI (`vpdpbusd`, 64 products per instruction).
    Vnni,
    /// AVX2 (`vpmaddubsw` then `vpmaddwd`, 32 products per pair), with FMA and F16C: CPUs
    /// without AVX-512 VNNI (most AMD before Zen 4, Intel client cores).
    Avx2,
    /// Plain Rust, every CPU.
    Plain,
}

impl Int8Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        if Self::Amx.runs_here() {
            Self::Amx
        } else if Self::Vnni.runs_here() {
            Self::Vnni
        } else if Self::Avx2.runs_here() {
            Self::Avx2
        } else {
            Self::Plain
        }
    }

    /// Whether this CPU runs it.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Amx => vnni_available() && super::amx::amx_int8_available(),
                Self::Vnni => vnni_available(),
                Self::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
                Self::Plain => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Plain
        }
    }
}

/// How far ahead of the group it reads [`vnni_tile::add`] asks for the packed bytes: the
/// hardware prefetchers stop at page ends, and a decode step streams every weight from
/// memory once. 2048 bytes (32 cache lines) read 1.2-1.5x faster than none, 512-1024 and
/// 3072-4096 less (`STREAM_KERNELS=packed-memory`, 1.1B shapes, 532 MB of q4 weights).
const PREFETCH_BYTES: usize = 2048;

/// What a tile kernel reads of block row `kb` for activation rows `r0..r0 + R`: set up once
/// per call, outside its loop over the tiles.
#[cfg(target_arch = "x86_64")]
struct BlockRow<'a, const R: usize> {
    /// Each activation row's `block` values of this block.
    rows: [&'a [i8]; R],
    /// Each activation row's scale and value sum over this block ([`Int8Rows::block_of`]).
    blocks: [(f32, i32); R],
    /// The block row's packed bytes, tile after tile.
    bytes: &'a [u8],
    /// The block row's weight scales, one per output column.
    scales: &'a [f16],
}

#[cfg(target_arch = "x86_64")]
impl<'a, const R: usize> BlockRow<'a, R> {
    #[inline(always)]
    fn new(w: &'a PackedWeight, x: &'a Int8Rows, kb: usize, r0: usize) -> Self {
        let (n, block) = (w.n, w.block);
        Self {
            rows: std::array::from_fn(|r| &x.row(r0 + r)[kb * block..(kb + 1) * block]),
            blocks: std::array::from_fn(|r| x.block_of(r0 + r, kb)),
            bytes: &w.bytes[kb * w.block_bytes()..(kb + 1) * w.block_bytes()],
            scales: &w.scales[kb * n..(kb + 1) * n],
        }
    }

    /// Activations `i..i + 4` of row `r` in the block as one little-endian 32-bit value (the
    /// operand a kernel broadcasts to every lane): one load, not four.
    #[inline(always)]
    fn four(&self, r: usize, i: usize) -> i32 {
        let xr = &self.rows[r][i..i + 4];
        // SAFETY: `xr` holds four bytes; an unaligned 32-bit read of them.
        unsafe { (xr.as_ptr() as *const i32).read_unaligned() }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni_tile {
    use std::arch::x86_64::*;

    use super::{BlockRow, GROUP_BYTES, Int8Rows, PREFETCH_BYTES, PackedWeight, TILE};

    /// Adds block row `kb` of `x` rows `r0..r0 + R` times `w` (`BITS` per value) to
    /// `out [rows, n]`, tile by tile (columns `16 t..16 t + 16`); returns `R`.
    ///
    /// The loop over the tiles is inside the instruction-set function so that it compiles
    /// to one loop with the activations' setup outside it; a call per tile cost 4-5x the
    /// vector work (round 14, Zen 4: the q4 product ran at 8 GB/s per core from cache).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `w` must hold `BITS` per value and `x`
    /// must match it; `kb < k / block`, `r0 + R <= x.rows()` and
    /// `out.len() == x.rows() * n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn add<const R: usize, const BITS: usize>(
        w: &PackedWeight,
        x: &Int8Rows,
        kb: usize,
        r0: usize,
        out: &mut [f32],
    ) -> usize {
        let (n, block) = (w.n, w.block);
        let group_rows = 32 / BITS;
        let groups = block / group_rows;
        let offset = if BITS == 8 { 128 } else { 8 };
        let mask = _mm512_set1_epi8(0x0F);
        let row = BlockRow::<R>::new(w, x, kb, r0);
        // Four activation values of row `r` from `i` in the block, in every lane.
        let four = |r: usize, i: usize| _mm512_set1_epi32(row.four(r, i));
        for (t, src) in row.bytes.chunks_exact(groups * GROUP_BYTES).enumerate() {
            let mut acc = [_mm512_setzero_si512(); R];
            for g in 0..groups {
                // A hint that never faults, whatever the address (past the end of the weight too).
                _mm_prefetch::<_MM_HINT_T0>(
                    src.as_ptr().wrapping_add(g * GROUP_BYTES + PREFETCH_BYTES) as *const i8
                );
                // SAFETY: `src` holds `groups` groups of 64 bytes.
                let packed = unsafe { _mm512_loadu_si512(src[g * GROUP_BYTES..].as_ptr() as *const __m512i) };
                let i = g * group_rows;
                if BITS == 8 {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_dpbusd_epi32(*acc, packed, four(r, i));
                    }
                } else {
                    let lo = _mm512_and_si512(packed, mask);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), mask);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_dpbusd_epi32(*acc, lo, four(r, i));
                        *acc = _mm512_dpbusd_epi32(*acc, hi, four(r, i + 4));
                    }
                }
            }
            let c = t * TILE;
            // SAFETY: `c + 16 <= n = scales.len()`; f16 widens to f32 exactly.
            let sw = unsafe {
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    row.scales[c..c + TILE].as_ptr() as *const __m256i
                ))
            };
            for (r, acc) in acc.iter().enumerate() {
                let (dx, sum) = row.blocks[r];
                let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(*acc, _mm512_set1_epi32(offset * sum)));
                let dst = &mut out[(r0 + r) * n + c..(r0 + r) * n + c + TILE];
                // SAFETY: `dst` holds 16 values.
                unsafe {
                    let at = dst.as_mut_ptr();
                    _mm512_storeu_ps(
                        at,
                        _mm512_fmadd_ps(_mm512_mul_ps(exact, _mm512_set1_ps(dx)), sw, _mm512_loadu_ps(at)),
                    );
                }
            }
        }
        R
    }
}

/// Activation rows from which [`Int8Kernel::Amx`] multiplies on tiles.
pub const AMX_INT8_MIN_ROWS: usize = 12;

/// Output columns per task of the AMX-INT8 gemm ([`PackedWeight::matmul_int8_gemm`]).
#[cfg(target_arch = "x86_64")]
const AMX_INT8_TASK_COLS: usize = 256;

/// How many 16-column tiles ahead [`amx_int8`] asks for each block row's packed bytes.
#[cfg(target_arch = "x86_64")]
const AMX_INT8_PREFETCH_TILES: usize = 4;

/// The products of [`Int8Kernel::Amx`]: per K slab, per 16-column tile, per block, one
/// `tdpbsud` per 64 inputs (one for the usual blocks of 32) of up to 16 activation rows by
/// the block's weight tile, read where it lies (the
/// packed q8 order is the tile's; q4 nibbles are spread to bytes first). Each product is
/// stored and scaled as [`vnni_tile::add`] scales its int32 sums, block after block in the
/// same order, so the result has the VNNI kernel's bits; the sums of a tile's rows stay in
/// registers across the slab's blocks instead of going through `out` once per block.
#[cfg(target_arch = "x86_64")]
mod amx_int8 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::K_BLOCK;
    use super::super::amx::{INT8_SLOTS, Int8Tiles};
    use super::super::bf16_gemm::{Block, Output};
    use super::{
        AMX_INT8_MIN_ROWS, AMX_INT8_PREFETCH_TILES, Bits, GROUP_BYTES, Int8Kernel, Int8Rows, PackedWeight,
        TILE, f16,
    };

    /// One tile row: 64 bytes, on a cache line.
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Line([i32; 16]);

    /// The working buffers of [`rows_of`], kept from call to call (a gemm task calls it once
    /// per slab and group of rows).
    #[derive(Default)]
    pub struct Scratch {
        /// Per block of the slab, the rows' activations (`R` rows of `block` bytes).
        a: Vec<i8>,
        /// Per block and row, `offset * sum(x_q)`.
        offsets: Vec<i32>,
        /// Per block and row, the activations' scale.
        dx: Vec<f32>,
        /// Two sets of [`INT8_SLOTS`] stored tile products.
        sums: Vec<[Line; 16]>,
        /// Each slot's q4 weight tile with its nibbles spread to bytes.
        spread: Vec<Line>,
        /// A gemm task's q4 weight tiles of one slab with their nibbles spread, block after
        /// block, tile after tile: spread once for every group of rows that passes.
        slab: Vec<Line>,
        /// Whether `slab` holds the tiles of the slab and columns [`rows_of`] is called for.
        slab_spread: bool,
    }

    /// One 64-byte group of q4 nibbles as two lines of bytes: the low nibbles (rows `i`),
    /// then the high ones (rows `4 + i`), each lane of four bytes one column's four rows.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn spread_group(group: &[u8], lines: &mut [Line], mask: __m512i) {
        assert!(group.len() >= GROUP_BYTES && lines.len() >= 2);
        // SAFETY: 64 bytes in, two aligned lines out (checked above).
        unsafe {
            let packed = _mm512_loadu_si512(group.as_ptr() as *const __m512i);
            let lo = _mm512_and_si512(packed, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), mask);
            _mm512_store_si512(lines[0].0.as_mut_ptr() as *mut __m512i, lo);
            _mm512_store_si512(lines[1].0.as_mut_ptr() as *mut __m512i, hi);
        }
    }

    /// Spreads the nibbles of the q4 weight tiles `columns` of the blocks in `k0..k1` into
    /// `slab` (`block / 4` lines per tile, the order [`rows_of`] reads).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW; `w` holds 4 bits per value, `k0..k1` whole blocks
    /// and `columns` tiles of it.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn spread_slab(
        w: &PackedWeight,
        [k0, k1]: [usize; 2],
        columns: Range<usize>,
        slab: &mut Vec<Line>,
    ) {
        let lines = w.block / 4;
        let (block_bytes, tile_bytes) = (w.block_bytes(), w.tile_bytes());
        let bytes: &[u8] = &w.bytes;
        let mask = _mm512_set1_epi8(0x0F);
        slab.resize((k1 - k0) / w.block * columns.len() * lines, Line([0; 16]));
        let mut out = slab.chunks_exact_mut(2);
        for kb in k0 / w.block..k1 / w.block {
            for t in columns.clone() {
                let src = &bytes[kb * block_bytes + t * tile_bytes..][..tile_bytes];
                for (group, pair) in src.chunks_exact(GROUP_BYTES).zip(&mut out) {
                    spread_group(group, pair, mask);
                }
            }
        }
    }

    /// The inputs of one tile product for blocks of `block` values: the whole block, up to
    /// the 64 bytes of a tile row (the blocks that packing allows, multiples of 8 dividing
    /// 256, are whole numbers of them).
    fn k_step(block: usize) -> usize {
        block.min(64)
    }

    /// Adds weight rows `k0..k1` (whole blocks) of `x @ w` to `out [rows, n]`, 16 rows at a
    /// time; a last group of fewer than [`AMX_INT8_MIN_ROWS`] rows takes the VNNI kernel.
    ///
    /// # Safety
    /// The CPU must have AMX-INT8 (with the tile state) and AVX-512 F, BW and VNNI; `x` must
    /// match `w`, `k0..k1` be whole blocks of it and `out` hold `x.rows() * n` values.
    pub unsafe fn add_slab(w: &PackedWeight, x: &Int8Rows, k0: usize, k1: usize, out: &mut [f32]) {
        let rows = x.rows();
        assert!(out.len() >= rows * w.n, "the output holds every row");
        let mut scratch = Scratch::default();
        let mut r0 = 0;
        while r0 < rows {
            let r = (rows - r0).min(16);
            let tiles = if r >= AMX_INT8_MIN_ROWS {
                Int8Tiles::new(r, k_step(w.block))
            } else {
                None
            };
            match tiles {
                // SAFETY: as this function's; rows `r0..r0 + r` inside `x`, every tile of
                // the weight, `out` checked above.
                Some(tiles) => unsafe {
                    rows_of_count(
                        r,
                        w,
                        x,
                        &tiles,
                        [k0, k1],
                        r0,
                        0..w.n / TILE,
                        out.as_mut_ptr(),
                        &mut scratch,
                    )
                },
                // Fewer than `AMX_INT8_MIN_ROWS` rows (or no tiles after all): the VNNI
                // kernel, block by block.
                None => {
                    for kb in k0 / w.block..k1 / w.block {
                        w.add_block(x, kb, Int8Kernel::Vnni, r0..r0 + r, out);
                    }
                }
            }
            r0 += r;
        }
    }

    /// One task of [`PackedWeight::matmul_int8_gemm`] on the tiles: rows `r0..r1` of the
    /// task's columns, slab after slab of [`K_BLOCK`] inputs (each slab's sums from zero,
    /// then added to `out`, as [`super::super::sum_over_slabs`] adds the slabs of the decode
    /// product: the same bits), within a slab group after group of 16 rows, so that the
    /// slab's weight tiles stay in cache while the rows pass (q4 tiles spread to bytes once
    /// per slab, not once per group: f32 gemm / q4 gemm 1.23-1.75 against 1.07-1.33 before,
    /// BENCHMARKS.md round 42).
    /// A last group of fewer rows takes tiles configured for its count. `false` (nothing
    /// done) where the tiles cannot be configured.
    ///
    /// # Safety
    /// As [`add_slab`]'s, with `out` pointing to `x.rows() * n` zeroed values of which no one
    /// else touches the block, whose columns are whole tiles.
    pub unsafe fn gemm_block(w: &PackedWeight, x: &Int8Rows, block: Block, out: &Output) -> bool {
        let Block { c0, cols, r0, r1 } = block;
        let tiles = c0 / TILE..(c0 + cols) / TILE;
        let full_end = r0 + (r1 - r0) / 16 * 16;
        // The groups of 16 rows, then the last one of fewer, if any: `(rows per group,
        // the rows)`.
        let passes = [(16, r0..full_end), (r1 - full_end, full_end..r1)];
        let mut passes = passes.into_iter().filter(|(_, rows)| !rows.is_empty());
        let Some((rows, first)) = passes.next() else {
            return true;
        };
        let Some(mut config) = Int8Tiles::new(rows, k_step(w.block)) else {
            return false;
        };
        let mut scratch = Scratch::default();
        for (rows, groups) in std::iter::once((rows, first)).chain(passes) {
            let configured = config.set_rows(rows);
            debug_assert!(configured, "1 to 16 rows");
            for k0 in (0..w.k).step_by(K_BLOCK) {
                let k1 = (k0 + K_BLOCK).min(w.k);
                if w.bits == Bits::Four {
                    // SAFETY: as this function's (AVX-512 F and BW come with AMX-INT8's
                    // promise of VNNI).
                    unsafe { spread_slab(w, [k0, k1], tiles.clone(), &mut scratch.slab) };
                    scratch.slab_spread = true;
                }
                for g in groups.clone().step_by(rows) {
                    // SAFETY: as this function's; rows `g..g + rows` inside `r0..r1`, the
                    // tiles configured for `rows` rows just above.
                    unsafe {
                        rows_of_count(
                            rows,
                            w,
                            x,
                            &config,
                            [k0, k1],
                            g,
                            tiles.clone(),
                            out.0,
                            &mut scratch,
                        )
                    };
                }
            }
        }
        true
    }

    /// [`rows_of`] for a run-time row count `rows` (1-16), which `tiles` were configured for.
    ///
    /// # Safety
    /// As [`rows_of`]'s.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_of_count(
        rows: usize,
        w: &PackedWeight,
        x: &Int8Rows,
        tiles: &Int8Tiles,
        ks: [usize; 2],
        r0: usize,
        columns: Range<usize>,
        out: *mut f32,
        scratch: &mut Scratch,
    ) {
        macro_rules! each_count {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: as this function's.
                    $($r => unsafe { rows_of::<$r>(w, x, tiles, ks, r0, columns, out, scratch) },)*
                    _ => unreachable!("1 to 16 rows"),
                }
            };
        }
        each_count!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    /// Adds weight rows `ks[0]..ks[1]` (whole blocks) of `x` rows `r0..r0 + R` times the
    /// 16-column tiles `columns` of `w` to `out [rows, n]`: per tile, the blocks' products
    /// summed from zero in registers, then added to `out`.
    ///
    /// # Safety
    /// The CPU must have AMX-INT8 and AVX-512 F and BW; `tiles` configured on this thread
    /// for `R` rows and `k_step(w.block)` inputs (the last configuration loaded); `x` must
    /// match `w`, `ks` be whole blocks of it, `r0 + R <= x.rows()`, `columns` tiles of
    /// `w`, and `out` point to `x.rows() * n` values whose rows and columns here no one else
    /// uses meanwhile.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_of<const R: usize>(
        w: &PackedWeight,
        x: &Int8Rows,
        tiles: &Int8Tiles,
        [k0, k1]: [usize; 2],
        r0: usize,
        columns: Range<usize>,
        out: *mut f32,
        scratch: &mut Scratch,
    ) {
        let (n, block) = (w.n, w.block);
        let steps = block / k_step(block);
        let (kb0, blocks) = (k0 / block, (k1 - k0) / block);
        let offset = w.bits.offset();
        let Scratch {
            a,
            offsets,
            dx,
            sums,
            spread,
            slab,
            slab_spread,
        } = scratch;
        // Per block of the slab: the rows' activations (`R` rows of `block` bytes, copied
        // out of rows `k` bytes apart), what the stored unsigned weights add to each row's
        // sums (`offset * sum(x_q)`, subtracted as the VNNI kernel subtracts it) and the
        // rows' scales.
        a.resize(blocks * R * block, 0);
        offsets.resize(blocks * R, 0);
        dx.resize(blocks * R, 0.0);
        for j in 0..blocks {
            let kb = kb0 + j;
            for r in 0..R {
                let at = (j * R + r) * block;
                a[at..at + block].copy_from_slice(&x.row(r0 + r)[kb * block..(kb + 1) * block]);
                let (scale, sum) = x.block_of(r0 + r, kb);
                offsets[j * R + r] = offset * sum;
                dx[j * R + r] = scale;
            }
        }
        // The work in units of up to `INT8_SLOTS` blocks of one tile: the tile products of
        // the next unit are started before the sums of this one are scaled, into the other
        // of two buffers, so that the tiles and the vector registers work at once.
        let per_unit = blocks.min(INT8_SLOTS);
        let units_per_tile = blocks.div_ceil(per_unit);
        let units = columns.len() * units_per_tile;
        // Every line is stored before it is read.
        sums.resize(2 * INT8_SLOTS, [Line([0; 16]); 16]);
        let spread_lines = if w.bits == Bits::Four { block / 4 } else { 0 };
        spread.resize(INT8_SLOTS * spread_lines, Line([0; 16]));
        let (block_bytes, tile_bytes) = (w.block_bytes(), w.tile_bytes());
        let (bytes, scales): (&[u8], &[f16]) = (&w.bytes, &w.scales);
        let mask = _mm512_set1_epi8(0x0F);
        // The blocks `j` of unit `u` (of tile `columns.start + u / units_per_tile`).
        let unit_blocks = |u: usize| {
            let first = u % units_per_tile * per_unit;
            first..(first + per_unit).min(blocks)
        };
        let mut acc = [_mm512_setzero_ps(); R];
        // Step `u` starts the products of unit `u` (its sums stored to buffer `u % 2`) and
        // scales those of unit `u - 1`. One loop without calls: a call would spill the
        // accumulators.
        for step in 0..=units {
            if step < units {
                let u = step;
                let c = (columns.start + u / units_per_tile) * TILE;
                for (slot, j) in unit_blocks(u).enumerate() {
                    let kb = kb0 + j;
                    let src = &bytes[kb * block_bytes + c / TILE * tile_bytes..][..tile_bytes];
                    // The q4 tile where the gemm spread the slab, if it did.
                    let spread_tile = (w.bits == Bits::Four && *slab_spread).then(|| {
                        let tile = j * columns.len() + c / TILE - columns.start;
                        slab[tile * spread_lines..(tile + 1) * spread_lines].as_ptr() as *const u8
                    });
                    for line in (0..tile_bytes).step_by(64).take_while(|_| spread_tile.is_none()) {
                        // A hint, which never faults (past the end of the weight too).
                        _mm_prefetch::<_MM_HINT_T0>(
                            src.as_ptr()
                                .wrapping_add(AMX_INT8_PREFETCH_TILES * tile_bytes + line)
                                as *const i8,
                        );
                    }
                    // The block row's scales, read tile by tile too (a hint).
                    _mm_prefetch::<_MM_HINT_T0>(
                        scales
                            .as_ptr()
                            .wrapping_add(kb * n + c + AMX_INT8_PREFETCH_TILES * TILE)
                            as *const i8,
                    );
                    let b = match (spread_tile, w.bits) {
                        (Some(b), _) => b,
                        (None, Bits::Eight) => src.as_ptr(),
                        (None, Bits::Four) => {
                            let spread = &mut spread[slot * spread_lines..(slot + 1) * spread_lines];
                            for (group, pair) in src.chunks_exact(GROUP_BYTES).zip(spread.chunks_exact_mut(2))
                            {
                                spread_group(group, pair, mask);
                            }
                            spread.as_ptr() as *const u8
                        }
                    };
                    // SAFETY: the tiles are this thread's, configured for `R` rows and
                    // `k_step`; `slot < INT8_SLOTS`; `a` holds block `j`'s `R` rows of
                    // `block` bytes, `b` the block's `block / 4` rows of 64 bytes.
                    unsafe {
                        tiles.product(slot, a[j * R * block..].as_ptr() as *const u8, block, b, steps);
                    }
                }
                for slot in 0..unit_blocks(u).len() {
                    // SAFETY: as above; 16 lines of room.
                    unsafe { tiles.store(slot, sums[(u % 2) * INT8_SLOTS + slot].as_mut_ptr() as *mut u8) };
                }
            }
            let Some(u) = step.checked_sub(1) else {
                continue;
            };
            let g = u % units_per_tile;
            let c = (columns.start + u / units_per_tile) * TILE;
            if g == 0 {
                acc = [_mm512_setzero_ps(); R];
            }
            for (slot, j) in unit_blocks(u).enumerate() {
                let kb = kb0 + j;
                let sums = &sums[(u % 2) * INT8_SLOTS + slot];
                // SAFETY: columns `c..c + 16` of block row `kb`'s scales; f16 widens to f32
                // exactly.
                let sw = unsafe {
                    _mm512_cvtph_ps(_mm256_loadu_si256(
                        scales[kb * n + c..kb * n + c + TILE].as_ptr() as *const __m256i
                    ))
                };
                let (offsets, dx) = (&offsets[j * R..][..R], &dx[j * R..][..R]);
                // Row after row with constant indices (a loop kept the sums on the stack).
                macro_rules! scale_rows {
                    ($($r:literal)*) => {$(
                        if $r < R {
                            // SAFETY: an aligned line of 16 int32.
                            let sum = unsafe { _mm512_load_si512(sums[$r].0.as_ptr() as *const __m512i) };
                            let exact =
                                _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_set1_epi32(offsets[$r])));
                            let scaled = _mm512_mul_ps(exact, _mm512_set1_ps(dx[$r]));
                            acc[$r] = _mm512_fmadd_ps(scaled, sw, acc[$r]);
                        }
                    )*};
                }
                scale_rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            }
            if g + 1 == units_per_tile {
                for (r, acc) in acc.iter().enumerate() {
                    // SAFETY: 16 values of row `r0 + r` inside `out` (this function's
                    // promise). The slab's sums from zero, added as a slab's partial
                    // product is added.
                    unsafe {
                        let at = out.add((r0 + r) * n + c);
                        _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *acc));
                    }
                }
            }
        }
    }
}

/// [`vnni_tile`] with 256-bit registers, for CPUs without AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
mod avx2_tile {
    use std::arch::x86_64::*;

    use super::{BlockRow, GROUP_BYTES, Int8Rows, PREFETCH_BYTES, PackedWeight, TILE};

    /// Adds block row `kb` of `x` rows `r0..r0 + R` times `w` (`BITS` per value) to
    /// `out [rows, n]`, tile by tile (columns `16 t..16 t + 16`, the loop inside as in
    /// [`super::vnni_tile::add`]); returns `R`.
    ///
    /// A 64-byte group is two registers of 8 columns, each 32-bit lane the four rows of one
    /// column (q4: two nibbles per byte, rows `i` and `i + 4`). The stored values are made
    /// signed again (q8: `b ^ 0x80`; q4: nibble minus 8), and each product of four goes
    /// through `vpmaddubsw` on `|q|` and `x * sign(q)` (llama.cpp's AVX2 trick: pairs of
    /// products stay within i16, `2 * 128 * 127`, because activations stop at +-127), then
    /// `vpmaddwd` by ones to i32. The int32 sum of the block is the VNNI kernel's exactly,
    /// and the scaling below is the same two operations.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w` must hold `BITS` per value and `x` must
    /// match it; `kb < k / block`, `r0 + R <= x.rows()` and
    /// `out.len() == x.rows() * n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn add<const R: usize, const BITS: usize>(
        w: &PackedWeight,
        x: &Int8Rows,
        kb: usize,
        r0: usize,
        out: &mut [f32],
    ) -> usize {
        let (n, block) = (w.n, w.block);
        let group_rows = 32 / BITS;
        let groups = block / group_rows;
        let mask = _mm256_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        let ones = _mm256_set1_epi16(1);
        let row = BlockRow::<R>::new(w, x, kb, r0);
        // Four activation values of row `r` from `i` in the block, in every lane.
        let four = |r: usize, i: usize| _mm256_set1_epi32(row.four(r, i));
        // Per 32-bit lane, the sum of four products of signed weights `q` and activations `a`.
        let dot = |q: __m256i, a: __m256i| {
            _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q)),
                ones,
            )
        };
        for (t, src) in row.bytes.chunks_exact(groups * GROUP_BYTES).enumerate() {
            // Two halves (columns 0-7 and 8-15 of the tile) per row.
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..groups {
                // A hint that never faults, whatever the address (past the end of the weight too).
                _mm_prefetch::<_MM_HINT_T0>(
                    src.as_ptr().wrapping_add(g * GROUP_BYTES + PREFETCH_BYTES) as *const i8
                );
                let i = g * group_rows;
                let mut a = [[_mm256_setzero_si256(); 2]; R];
                for (r, a) in a.iter_mut().enumerate() {
                    a[0] = four(r, i);
                    if BITS == 4 {
                        a[1] = four(r, i + 4);
                    }
                }
                for half in 0..2 {
                    // SAFETY: `src` holds `groups` groups of 64 bytes.
                    let packed = unsafe {
                        _mm256_loadu_si256(src[g * GROUP_BYTES + 32 * half..].as_ptr() as *const __m256i)
                    };
                    if BITS == 8 {
                        let q = _mm256_xor_si256(packed, flip);
                        for (acc, a) in acc.iter_mut().zip(&a) {
                            acc[half] = _mm256_add_epi32(acc[half], dot(q, a[0]));
                        }
                    } else {
                        let lo = _mm256_sub_epi8(_mm256_and_si256(packed, mask), eight);
                        let hi =
                            _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask), eight);
                        for (acc, a) in acc.iter_mut().zip(&a) {
                            let sum = _mm256_add_epi32(dot(lo, a[0]), dot(hi, a[1]));
                            acc[half] = _mm256_add_epi32(acc[half], sum);
                        }
                    }
                }
            }
            let c = t * TILE;
            for half in 0..2 {
                // SAFETY: `c + 16 <= n = scales.len()`; f16 widens to f32 exactly.
                let sw = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        row.scales[c + 8 * half..c + 8 * half + 8].as_ptr() as *const __m128i,
                    ))
                };
                for (r, acc) in acc.iter().enumerate() {
                    let (dx, _) = row.blocks[r];
                    let exact = _mm256_cvtepi32_ps(acc[half]);
                    let at = (r0 + r) * n + c + 8 * half;
                    let dst = &mut out[at..at + 8];
                    // SAFETY: `dst` holds 8 values.
                    unsafe {
                        let at = dst.as_mut_ptr();
                        _mm256_storeu_ps(
                            at,
                            _mm256_fmadd_ps(
                                _mm256_mul_ps(exact, _mm256_set1_ps(dx)),
                                sw,
                                _mm256_loadu_ps(at),
                            ),
                        );
                    }
                }
            }
        }
        R
    }
}

/// [`PackedWeight::matmul_int8_gemm`]'s AVX2 kernel.
#[cfg(target_arch = "x86_64")]
mod q4_gemm_avx2 {
    use std::arch::x86_64::*;

    use super::super::K_BLOCK;
    use super::super::bf16_gemm::{Block, Output};
    use super::{GROUP_BYTES, Int8Rows, PackedWeight, TILE, f16};

    /// Activation rows per register tile: per row an int16 and an f32 accumulator, beside
    /// the weight's two nibble registers and a broadcast (13 of 16 registers).
    pub const ROWS: usize = 4;

    /// The longest block whose int16 sums cannot saturate: 8 `vpmaddubsw` pairs of at most
    /// `2 * 15 * 127` each.
    pub const MAX_BLOCK: usize = 32;

    /// Activation bytes a task's chunk of rows may take, so that the chunk stays in L2
    /// while the weight's 16-column strips pass over it.
    const CHUNK_BYTES: usize = 192 << 10;

    /// One task's block of the output: its tiles' weight strips copied out first (one
    /// tile's blocks lie a block row apart in the packed order, a power of two of bytes
    /// for the usual widths, so read in place they fell into the same few cache sets), then
    /// per chunk of rows, per tile, per group of [`ROWS`] rows, the whole product along K.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w` must hold 4 bits per value with blocks of
    /// at most [`MAX_BLOCK`] and `x` must match it; `out` must point to `x.rows() * n`
    /// zeroed values of which no one else touches `block` (whole tiles).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block(w: &PackedWeight, x: &Int8Rows, block: Block, out: &Output) {
        let Block { c0, cols, r0, r1 } = block;
        let (n, blocks) = (w.n, w.k / w.block);
        let (block_bytes, tile_bytes) = (w.block_bytes(), w.tile_bytes());
        // Resolved once: a mapped weight's slices go through `Bytes` on every access.
        let (all_bytes, all_scales): (&[u8], &[f16]) = (&w.bytes, &w.scales);
        let first = c0 / TILE;
        let tiles = cols.div_ceil(TILE);
        let mut bytes = Vec::with_capacity(tiles * blocks * tile_bytes);
        let mut scales = Vec::with_capacity(tiles * blocks * TILE);
        for t in first..first + tiles {
            for kb in 0..blocks {
                bytes.extend_from_slice(&all_bytes[kb * block_bytes + t * tile_bytes..][..tile_bytes]);
                scales.extend_from_slice(&all_scales[kb * n + t * TILE..][..TILE]);
            }
        }
        let strip = |t: usize| Strip {
            bytes: &bytes[t * blocks * tile_bytes..][..blocks * tile_bytes],
            scales: &scales[t * blocks * TILE..][..blocks * TILE],
            col: (first + t) * TILE,
        };
        let chunk_rows = (CHUNK_BYTES / w.k).max(ROWS).next_multiple_of(ROWS);
        let mut chunk = r0;
        while chunk < r1 {
            let chunk_end = (chunk + chunk_rows).min(r1);
            for t in 0..tiles {
                let strip = strip(t);
                let mut r = chunk;
                while r < chunk_end {
                    // SAFETY: as this function's; rows `r..r + R <= x.rows()`, the strip's
                    // tile inside the task's columns.
                    r += unsafe {
                        match chunk_end - r {
                            1 => tile::<1>(w, x, &strip, r, out.0),
                            2 => tile::<2>(w, x, &strip, r, out.0),
                            3 => tile::<3>(w, x, &strip, r, out.0),
                            _ => tile::<ROWS>(w, x, &strip, r, out.0),
                        }
                    };
                }
            }
            chunk = chunk_end;
        }
    }

    /// One tile's packed bytes and scales, block after block, and its first column.
    struct Strip<'a> {
        bytes: &'a [u8],
        scales: &'a [f16],
        col: usize,
    }

    /// Adds rows `r0..r0 + R` of `x @ w` for the 16 columns of `strip` to `out`, 8 columns
    /// at a time: per slab of [`K_BLOCK`] inputs an FMA chain over the blocks from zero,
    /// added to `out` slab after slab, as [`super::super::sum_over_slabs`] adds the decode
    /// kernel's slabs. Returns `R`.
    ///
    /// Per block, `sum(u * x)` over the stored nibbles `u = q + 8` is exact in int16 and
    /// then int32; `8 * sum(x)` (the row's block sum) takes the offset off, exactly.
    ///
    /// # Safety
    /// As [`block`]'s; `r0 + R <= x.rows()` and the strip's 16 columns inside `n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const R: usize>(
        w: &PackedWeight,
        x: &Int8Rows,
        strip: &Strip<'_>,
        r0: usize,
        out: *mut f32,
    ) -> usize {
        let (n, block) = (w.n, w.block);
        let groups = block / 8;
        let tile_bytes = w.tile_bytes();
        let blocks = w.k / block;
        let slab_blocks = K_BLOCK / block;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let rows: [*const i8; R] = std::array::from_fn(|r| x.row(r0 + r).as_ptr());
        let row_blocks: [(&[f32], &[i32]); R] = std::array::from_fn(|r| x.blocks_of_row(r0 + r));
        assert!(strip.bytes.len() == blocks * tile_bytes && strip.scales.len() == blocks * TILE);
        for half in 0..2 {
            let mut kb0 = 0;
            while kb0 < blocks {
                let kb1 = (kb0 + slab_blocks).min(blocks);
                let mut acc = [_mm256_setzero_ps(); R];
                for kb in kb0..kb1 {
                    let src = strip.bytes[kb * tile_bytes + 32 * half..].as_ptr();
                    let mut sums = [_mm256_setzero_si256(); R];
                    for g in 0..groups {
                        // SAFETY: group `g < block / 8` of block `kb` of the strip: 32 bytes
                        // from `src + 64 g` lie in it.
                        let packed =
                            unsafe { _mm256_loadu_si256(src.add(g * GROUP_BYTES) as *const __m256i) };
                        let lo = _mm256_and_si256(packed, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask);
                        let i = kb * block + g * 8;
                        for (sum, &row) in sums.iter_mut().zip(&rows) {
                            // SAFETY: inputs `i..i + 8 <= k` of a row of `k` values; unaligned
                            // 32-bit reads of four of them, broadcast to every lane.
                            let (a_lo, a_hi) = unsafe {
                                (
                                    _mm256_set1_epi32((row.add(i) as *const i32).read_unaligned()),
                                    _mm256_set1_epi32((row.add(i + 4) as *const i32).read_unaligned()),
                                )
                            };
                            let pair = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, a_lo),
                                _mm256_maddubs_epi16(hi, a_hi),
                            );
                            *sum = _mm256_add_epi16(*sum, pair);
                        }
                    }
                    // SAFETY: 8 of block `kb`'s 16 scales in the strip; f16 widens to f32
                    // exactly.
                    let sw = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            strip.scales[kb * TILE + 8 * half..].as_ptr() as *const __m128i
                        ))
                    };
                    for ((acc, sum), (dx, xsum)) in acc.iter_mut().zip(&sums).zip(&row_blocks) {
                        let exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(
                            _mm256_madd_epi16(*sum, ones),
                            _mm256_set1_epi32(8 * xsum[kb]),
                        ));
                        *acc = _mm256_fmadd_ps(_mm256_mul_ps(exact, _mm256_set1_ps(dx[kb])), sw, *acc);
                    }
                }
                let col = strip.col + 8 * half;
                for (r, acc) in acc.iter().enumerate() {
                    // SAFETY: row `r0 + r < rows`, columns `col..col + 8 <= n`: inside `out`,
                    // in this task's block.
                    unsafe {
                        let at = out.add((r0 + r) * n + col);
                        _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), *acc));
                    }
                }
                kb0 = kb1;
            }
        }
        R
    }
}

/// An element type weights dequantize to: f32, or bf16 for the bf16 gemm (the only two:
/// the vectorized store writes by [`Dequantized::BF16`]).
pub(crate) trait Dequantized: Copy + Default + Send + Sync {
    /// Whether the element is bf16 (rounded to nearest even), else f32.
    const BF16: bool;
    /// `v` as this element.
    fn from_f32(v: f32) -> Self;
}

impl Dequantized for f32 {
    const BF16: bool = false;
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Dequantized for bf16 {
    const BF16: bool = true;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

#[cfg(target_arch = "x86_64")]
mod dequantize_avx2 {
    use std::arch::x86_64::*;

    use super::{Bits, Dequantized, GROUP_BYTES, PackedWeight, TILE};

    /// [`super::dequantize_avx512::block_row`] with AVX2: each 64-byte group is read as two
    /// halves of 8 columns (32-bit lanes whose byte, or nibble, `i` is row `i` of the group).
    ///
    /// # Safety
    /// The CPU must have AVX2; `src` must be one block row of `w`, `scales` its `n` scales
    /// and `dst` its `block * n` outputs.
    #[target_feature(enable = "avx2")]
    pub unsafe fn block_row<T: Dequantized>(w: &PackedWeight, src: &[u8], scales: &[f32], dst: &mut [T]) {
        let (n, block) = (w.n, w.block);
        let rows = w.bits.group_rows();
        let groups = block / rows;
        let (value_mask, offset) = match w.bits {
            Bits::Eight => (_mm256_set1_epi32(0xFF), _mm256_set1_epi32(128)),
            Bits::Four => (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(8)),
        };
        assert!(src.len() >= n / TILE * groups * GROUP_BYTES && scales.len() >= n && dst.len() >= block * n);
        let out = dst.as_mut_ptr();
        for t in 0..n / TILE {
            let c = t * TILE;
            // SAFETY: `c + 16 <= n <= scales.len()`.
            let scale = unsafe {
                [
                    _mm256_loadu_ps(scales.as_ptr().add(c)),
                    _mm256_loadu_ps(scales.as_ptr().add(c + 8)),
                ]
            };
            for g in 0..groups {
                // SAFETY: group `g` of tile `t` lies within `src` (asserted above).
                let packed = unsafe {
                    let at = src.as_ptr().add((t * groups + g) * GROUP_BYTES);
                    [
                        _mm256_loadu_si256(at as *const __m256i),
                        _mm256_loadu_si256(at.add(32) as *const __m256i),
                    ]
                };
                let row0 = g * rows;
                // Row `row0 + r` sits `shift` bits up in each lane.
                let put = |r: usize, shift: i32| {
                    let count = _mm_cvtsi32_si128(shift);
                    let v = [0, 1].map(|h| {
                        let shifted = _mm256_srl_epi32(packed[h], count);
                        let q = _mm256_sub_epi32(_mm256_and_si256(shifted, value_mask), offset);
                        _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale[h])
                    });
                    // SAFETY: row `row0 + r < block`, columns `c..c + 16 <= n`: within `dst`.
                    unsafe { store::<T>(out.add((row0 + r) * n + c), v) };
                };
                match w.bits {
                    Bits::Eight => (0..4).for_each(|r| put(r, 8 * r as i32)),
                    Bits::Four => (0..4).for_each(|r| {
                        put(r, 8 * r as i32);
                        put(r + 4, 8 * r as i32 + 4);
                    }),
                }
            }
        }
    }

    /// One 64-byte group of one tile (4 rows of q8, 8 of q4) as f32 `scale * q`, rounded to
    /// bf16 when `round_bf16`, row `r` to `out[r * stride..][..16]`: [`block_row`]'s
    /// arithmetic and rounding.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `out` must hold the group's rows (checked).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn group(
        bits: Bits,
        group: &[u8],
        scales: &[burn::tensor::f16],
        round_bf16: bool,
        out: &mut [f32],
        stride: usize,
    ) {
        assert!(group.len() >= GROUP_BYTES && scales.len() >= TILE);
        assert!(out.len() >= (bits.group_rows() - 1) * stride + TILE);
        let (value_mask, offset) = match bits {
            Bits::Eight => (_mm256_set1_epi32(0xFF), _mm256_set1_epi32(128)),
            Bits::Four => (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(8)),
        };
        // SAFETY: 16 f16 scales and 64 bytes (checked above).
        let (scale, packed) = unsafe {
            let at = scales.as_ptr() as *const __m128i;
            let from = group.as_ptr() as *const __m256i;
            (
                [
                    _mm256_cvtph_ps(_mm_loadu_si128(at)),
                    _mm256_cvtph_ps(_mm_loadu_si128(at.add(1))),
                ],
                [_mm256_loadu_si256(from), _mm256_loadu_si256(from.add(1))],
            )
        };
        let to = out.as_mut_ptr();
        let put = |r: usize, shift: i32| {
            let count = _mm_cvtsi32_si128(shift);
            for h in 0..2 {
                let shifted = _mm256_srl_epi32(packed[h], count);
                let q = _mm256_sub_epi32(_mm256_and_si256(shifted, value_mask), offset);
                let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale[h]);
                if round_bf16 {
                    // `store`'s rounding, the low half cleared.
                    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
                    v = _mm256_castsi256_ps(_mm256_and_si256(rounded_bf16(v), high));
                }
                // SAFETY: row `r` of the group, 8 values from column `8 h` (checked above).
                unsafe { _mm256_storeu_ps(to.add(r * stride + 8 * h), v) };
            }
        };
        match bits {
            Bits::Eight => (0..4).for_each(|r| put(r, 8 * r as i32)),
            Bits::Four => (0..4).for_each(|r| {
                put(r, 8 * r as i32);
                put(r + 4, 8 * r as i32 + 4);
            }),
        }
    }

    /// `bf16::from_f32` of 8 values in the top half of each lane, as the AVX-512 kernel's
    /// `rounded_bf16`: to nearest even, a NaN kept a quiet NaN.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn rounded_bf16(v: __m256) -> __m256i {
        let x = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(rounded, _mm256_or_si256(x, _mm256_set1_epi32(0x0040_0000)), nan)
    }

    /// Stores 16 values (two registers of 8) at `at` as `T`, bf16 rounded as the AVX-512
    /// kernel does.
    ///
    /// # Safety
    /// The CPU must have AVX2 and `at` must have room for 16 `T`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store<T: Dequantized>(at: *mut T, v: [__m256; 2]) {
        if T::BF16 {
            let [lo, hi] = v.map(|v| _mm256_srli_epi32::<16>(rounded_bf16(v)));
            // 16-bit values in 32-bit lanes: `packus` takes 4 of each input per 128-bit half,
            // the permutation puts the halves in column order.
            let packed = _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi32(lo, hi));
            // SAFETY: room for 16 bf16 (32 bytes), by the caller.
            unsafe { _mm256_storeu_si256(at as *mut __m256i, packed) };
        } else {
            // SAFETY: `T` is f32 and there is room for 16, by the caller.
            unsafe {
                _mm256_storeu_ps(at as *mut f32, v[0]);
                _mm256_storeu_ps((at as *mut f32).add(8), v[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod dequantize_avx512 {
    use std::arch::x86_64::*;

    use super::{Bits, Dequantized, GROUP_BYTES, PackedWeight, TILE};

    /// Writes `T::from(scale * q)` of one block row to `dst [block, n]`: each 64-byte
    /// group is 16 columns of 32-bit lanes whose byte `i` (q8), or nibble `i` (q4), is
    /// row `i` of the group; a shift and a mask give one row of 16 columns.
    ///
    /// bf16 is rounded to nearest even with integer operations ([`rounded_bf16`]), which
    /// is `bf16::from_f32` for every value `scale * q` can take.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src` must be one block row of `w`, `scales` its `n`
    /// scales and `dst` its `block * n` outputs.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_row<T: Dequantized>(w: &PackedWeight, src: &[u8], scales: &[f32], dst: &mut [T]) {
        let (n, block) = (w.n, w.block);
        let rows = w.bits.group_rows();
        let groups = block / rows;
        let (value_mask, offset) = match w.bits {
            Bits::Eight => (_mm512_set1_epi32(0xFF), _mm512_set1_epi32(128)),
            Bits::Four => (_mm512_set1_epi32(0x0F), _mm512_set1_epi32(8)),
        };
        assert!(src.len() >= n / TILE * groups * GROUP_BYTES && scales.len() >= n && dst.len() >= block * n);
        let out = dst.as_mut_ptr();
        for t in 0..n / TILE {
            let c = t * TILE;
            // SAFETY: `c + 16 <= n <= scales.len()`.
            let scale = unsafe { _mm512_loadu_ps(scales.as_ptr().add(c)) };
            for g in 0..groups {
                // SAFETY: group `g` of tile `t` lies within `src` (asserted above).
                let packed = unsafe {
                    _mm512_loadu_si512(src.as_ptr().add((t * groups + g) * GROUP_BYTES) as *const __m512i)
                };
                let row0 = g * rows;
                // `shifted` holds row `row0 + r` in the low bits of each lane.
                let put = |r: usize, shifted: __m512i| {
                    let q = _mm512_sub_epi32(_mm512_and_si512(shifted, value_mask), offset);
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale);
                    // SAFETY: row `row0 + r < block`, columns `c..c + 16 <= n`: within `dst`.
                    unsafe { store::<T>(out.add((row0 + r) * n + c), v) };
                };
                match w.bits {
                    Bits::Eight => {
                        put(0, packed);
                        put(1, _mm512_srli_epi32::<8>(packed));
                        put(2, _mm512_srli_epi32::<16>(packed));
                        put(3, _mm512_srli_epi32::<24>(packed));
                    }
                    Bits::Four => {
                        put(0, packed);
                        put(4, _mm512_srli_epi32::<4>(packed));
                        put(1, _mm512_srli_epi32::<8>(packed));
                        put(5, _mm512_srli_epi32::<12>(packed));
                        put(2, _mm512_srli_epi32::<16>(packed));
                        put(6, _mm512_srli_epi32::<20>(packed));
                        put(3, _mm512_srli_epi32::<24>(packed));
                        put(7, _mm512_srli_epi32::<28>(packed));
                    }
                }
            }
        }
    }

    /// [`super::PackedWeight::dequantize_tile_pairs`] on AVX-512: per group, each row's 16
    /// values `scale * q` rounded to bf16 in place in their 32-bit lanes ([`rounded_bf16`],
    /// as [`store`] rounds them), two rows joined into one register of pairs.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `k0..k1` whole groups of the weight, tile `t` inside
    /// it, and room for `(k1 - k0) / 2` rows of 16 in `dst` (the wrapper asserts them).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_pairs(w: &PackedWeight, [k0, k1]: [usize; 2], t: usize, dst: &mut [u32]) {
        let rows = w.bits.group_rows();
        let groups = w.block / rows;
        let block_bytes = w.block_bytes();
        let (value_mask, offset) = match w.bits {
            Bits::Eight => (_mm512_set1_epi32(0xFF), _mm512_set1_epi32(128)),
            Bits::Four => (_mm512_set1_epi32(0x0F), _mm512_set1_epi32(8)),
        };
        let (bytes, scales): (&[u8], &[super::f16]) = (&w.bytes, &w.scales);
        assert!(k0 <= k1 && k1 <= w.k && k0.is_multiple_of(rows) && k1.is_multiple_of(rows));
        assert!(dst.len() >= (k1 - k0) / 2 * TILE && (t + 1) * TILE <= w.n);
        let out = dst.as_mut_ptr() as *mut __m512i;
        let mut scale = _mm512_setzero_ps();
        for kk in (k0..k1).step_by(rows) {
            let (kb, g) = (kk / w.block, kk % w.block / rows);
            if g == 0 || kk == k0 {
                let at = &scales[kb * w.n + t * TILE..][..TILE];
                // SAFETY: 16 f16 scales (32 bytes) of this block and tile.
                scale = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(at.as_ptr() as *const __m256i) });
            }
            let group = &bytes[kb * block_bytes + (t * groups + g) * GROUP_BYTES..][..GROUP_BYTES];
            // SAFETY: 64 bytes.
            let packed = unsafe { _mm512_loadu_si512(group.as_ptr() as *const __m512i) };
            // Row `r` of the group (its low bits in `shifted`) rounded to bf16, kept in the
            // top half of each lane.
            let rounded = |shifted: __m512i| {
                let q = _mm512_sub_epi32(_mm512_and_si512(shifted, value_mask), offset);
                rounded_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(q), scale))
            };
            let pair = |even: __m512i, odd: __m512i| {
                _mm512_or_si512(
                    _mm512_srli_epi32::<16>(rounded(even)),
                    _mm512_and_si512(rounded(odd), _mm512_set1_epi32(0xFFFF_0000u32 as i32)),
                )
            };
            let first = (kk - k0) / 2;
            // Rows 0-3 in each lane's bytes (q8), or in its bytes' low nibbles (q4, rows 4-7
            // in the high ones). SAFETY (stores): pair rows `first..first + rows / 2` lie in
            // `dst` (asserted above: whole groups inside `k0..k1`).
            unsafe {
                _mm512_storeu_si512(out.add(first), pair(packed, _mm512_srli_epi32::<8>(packed)));
                let (two, three) = (_mm512_srli_epi32::<16>(packed), _mm512_srli_epi32::<24>(packed));
                _mm512_storeu_si512(out.add(first + 1), pair(two, three));
                if w.bits == Bits::Four {
                    let (four, five) = (_mm512_srli_epi32::<4>(packed), _mm512_srli_epi32::<12>(packed));
                    _mm512_storeu_si512(out.add(first + 2), pair(four, five));
                    let (six, seven) = (_mm512_srli_epi32::<20>(packed), _mm512_srli_epi32::<28>(packed));
                    _mm512_storeu_si512(out.add(first + 3), pair(six, seven));
                }
            }
        }
    }

    /// `bf16::from_f32` of 16 values, in the top half of each lane (the low half is not
    /// cleared): to nearest even by adding 0x7FFF plus the lowest kept bit; a NaN keeps its
    /// sign and top payload bits with the quiet bit set, as `from_f32` does (a scale read
    /// from a file can be one).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn rounded_bf16(v: __m512) -> __m512i {
        let x = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000)))
    }

    /// Stores 16 values at `at` as `T`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and `at` must have room for 16 `T`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store<T: Dequantized>(at: *mut T, v: __m512) {
        if T::BF16 {
            let rounded = _mm512_srli_epi32::<16>(rounded_bf16(v));
            // SAFETY: room for 16 bf16 (32 bytes), by the caller.
            unsafe { _mm256_storeu_si256(at as *mut __m256i, _mm512_cvtepi32_epi16(rounded)) };
        } else {
            // SAFETY: `T` is f32 and there is room for 16, by the caller.
            unsafe { _mm512_storeu_ps(at as *mut f32, v) };
        }
    }
}

/// Packed weights by parameter id. The registry holds weak references: the strong one is
/// the lazy parameter's initializer, so a packed weight is freed with its model (or when
/// something unpacks it).
/// Each entry also keeps the scheme of the quantized tensor the weight unpacks into.
static PACKED: LazyLock<RwLock<HashMap<ParamId, Registered>>> = LazyLock::new(Default::default);

/// A registry entry: the packed weight (weakly) and the scheme it unpacks to.
type Registered = (Weak<PackedWeight>, QuantScheme);

/// The packed form of `param`, when [`pack_weight`] made it and nothing has unpacked it since
/// (`None` as well when an adapter was attached to it: the effective weight is not the
/// packed one).
pub fn packed_weight<const D: usize>(param: &Param<Tensor<D>>) -> Option<Arc<PackedWeight>> {
    packed_weight_and_scheme(param).map(|(packed, _)| packed)
}

/// [`packed_weight`] and the scheme of the quantized tensor it stands for (what a
/// checkpoint writer stores beside the packed bytes, to give the same parameter back).
pub fn packed_weight_and_scheme<const D: usize>(
    param: &Param<Tensor<D>>,
) -> Option<(Arc<PackedWeight>, QuantScheme)> {
    if param.is_initialized() || param.adapter().is_some() {
        return None;
    }
    let registry = PACKED.read().ok()?;
    let (weak, scheme) = registry.get(&param.id)?;
    Some((weak.upgrade()?, *scheme))
}

/// Whether `param` is held packed (without unpacking it).
pub fn is_packed<const D: usize>(param: &Param<Tensor<D>>) -> bool {
    packed_weight(param).is_some()
}

/// `param` packed ([`PackedWeight`]) when it is a Flex q8 or q4 matrix with blocks along K
/// that [`PackedWeight::pack`] accepts (and no adapter); otherwise `param` as it was. The
/// packed parameter gets a new id (two models loaded from one file must not share an entry)
/// and unpacks itself, once, into the same quantized tensor if anything reads it.
pub fn pack_weight<const D: usize>(param: Param<Tensor<D>>) -> Param<Tensor<D>> {
    if D != 2
        || !param.is_initialized()
        || param.adapter().is_some()
        || !super::is_plain_flex(&param.device())
    {
        return param;
    }
    let DType::QFloat(scheme) = param.dtype() else {
        return param;
    };
    let Some(bits) = bits_of(&scheme) else {
        return param;
    };
    // A second handle on the same values (Flex copies the scales, once per weight).
    let Ok(BackendTensor::Quantized(primitive)) =
        <DispatchTensor as DispatchKindConversion<Flex>>::try_into_backend(param.val().into_dispatch())
    else {
        return param;
    };
    let rows = match QuantizedRows::from_flex(primitive) {
        Ok(rows) if rows.axis == BlockAxis::Input => rows,
        _ => return param,
    };
    let shape = param.shape();
    let [k, n] = [shape[0], shape[1]];
    let columns = ColumnBlocks {
        q: rows.values(k * n),
        scales: rows.tensor.scales(),
        k,
        n,
        block: rows.block,
    };
    let Some(packed) = PackedWeight::pack(&columns, bits).map(Arc::new) else {
        return param;
    };
    let device = param.device();
    drop((rows, param));
    register(packed, scheme, device)
}

/// A lazy parameter for `packed` under a new id, entered in the registry ([`packed_weight`]),
/// whose initializer unpacks it into the quantized tensor of scheme `scheme`.
fn register<const D: usize>(
    packed: Arc<PackedWeight>,
    scheme: QuantScheme,
    device: Device,
) -> Param<Tensor<D>> {
    let shape = Shape::from(vec![packed.k, packed.n]);
    let id = ParamId::new();
    if let Ok(mut registry) = PACKED.write() {
        registry.retain(|_, (weak, _)| weak.strong_count() > 0);
        registry.insert(id, (Arc::downgrade(&packed), scheme));
    }
    Param::uninitialized(
        id,
        move |target, _| {
            let tensor: Tensor<D> = unpacked_tensor(&packed, scheme);
            if super::is_plain_flex(target) {
                tensor
            } else {
                tensor.to_device(target)
            }
        },
        device,
        false,
        shape,
    )
}

/// The packed width of a scheme's integers (`None`: not packed).
pub(super) fn bits_of(scheme: &QuantScheme) -> Option<Bits> {
    match scheme.value {
        QuantValue::Q8S | QuantValue::Q8F => Some(Bits::Eight),
        QuantValue::Q4S | QuantValue::Q4F => Some(Bits::Four),
        _ => None,
    }
}

/// The Flex quantized tensor `packed` was made from (scheme `scheme`, one `i8` per value).
fn unpacked_tensor<const D: usize>(packed: &PackedWeight, scheme: QuantScheme) -> Tensor<D> {
    let values = FlexTensor::new(
        Bytes::from_elems(packed.unpack()),
        Layout::contiguous(Shape::from(vec![packed.k, packed.n])),
        DType::I8,
    );
    let primitive = FlexQTensor::new(
        values,
        scheme.with_store(QuantStore::Native),
        packed.scales(),
        None,
    );
    Tensor::from_dispatch(<DispatchTensor as DispatchKindConversion<Flex>>::from_backend(
        BackendTensor::Quantized(primitive),
    ))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::int8::matmul_int8_reference;
    use crate::kernels::tests::{activations, block_scales, int8_values};

    /// A `[k, n]` weight of pseudo-random values of `bits` (from `next`) with [`f16_scales`],
    /// packed.
    pub(in crate::kernels) fn random_packed(
        bits: Bits,
        [k, n]: [usize; 2],
        block: usize,
        next: &mut impl FnMut() -> u64,
    ) -> PackedWeight {
        let range: u64 = if bits == Bits::Four { 16 } else { 255 };
        let q: Vec<i8> = (0..k * n)
            .map(|_| ((next() % range) as i64 - range as i64 / 2) as i8)
            .collect();
        let scales = f16_scales(k * n / block);
        let w = ColumnBlocks {
            q: &q,
            scales: &scales,
            k,
            n,
            block,
        };
        PackedWeight::pack(&w, bits).expect("pack")
    }

    /// The weight `q [k, n]` with [`f16_scales`] packed with `bits`, the activations
    /// `x [rows, k]` quantized per block, and their int8 product on the unpacked values: what
    /// each packed product is checked against.
    fn packed_product_case(
        bits: Bits,
        q: &[i8],
        x: &[f32],
        [rows, k, n]: [usize; 3],
        block: usize,
    ) -> (PackedWeight, Int8Rows, Vec<f32>) {
        let scales = f16_scales(k * n / block);
        let w = ColumnBlocks {
            q,
            scales: &scales,
            k,
            n,
            block,
        };
        let packed = PackedWeight::pack(&w, bits).expect("pack");
        let xq = Int8Rows::quantize(x, rows, k, block).expect("quantize");
        let unpacked = matmul_int8_reference(&xq, &w).expect("unpacked");
        (packed, xq, unpacked)
    }

    /// A `[k, n]` weight's values for the packed-product tests: pseudo-random over the
    /// whole range of `bits`, or (`extreme`) whole blocks at the top or the bottom of it.
    fn weight_values(
        bits: Bits,
        [k, n]: [usize; 2],
        block: usize,
        extreme: bool,
        next: &mut impl FnMut() -> u64,
    ) -> Vec<i8> {
        let (low, span) = match bits {
            Bits::Eight => (-128i32, 256u64),
            Bits::Four => (-8, 16),
        };
        (0..k * n)
            .map(|i: usize| {
                if extreme {
                    if (i / n / block + i % n).is_multiple_of(2) {
                        (low + span as i32 - 1) as i8
                    } else {
                        low as i8
                    }
                } else {
                    (low + (next() % span) as i32) as i8
                }
            })
            .collect()
    }

    /// [`block_scales`] rounded to f16 (what the CPU quantizer writes).
    pub(in crate::kernels) fn f16_scales(count: usize) -> Vec<f32> {
        block_scales(count)
            .into_iter()
            .map(|s| f16::from_f32(s).to_f32())
            .collect()
    }

    /// `len` 4-bit test values spanning -8..=7: the top 4 bits of a mixed hash of the index,
    /// so that no two rows of a tile are equal for any width (a pattern that repeated every
    /// 16 values made every row of a 16-column tile equal, and a row swap inside a tile went
    /// unseen).
    pub(in crate::kernels) fn q4_values(len: usize) -> Vec<i8> {
        (0..len as u64)
            .map(|i| {
                let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                x ^= x >> 29;
                x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                x ^= x >> 32;
                ((x >> 60) as i32 - 8) as i8
            })
            .collect()
    }

    /// Packing keeps every value and scale; the packed product equals the unpacked int8
    /// product bit for bit (plain Rust, VNNI and AVX2; 1 to 16 rows, every group size of the
    /// SIMD kernels: 4 rows on AVX2, 8 on VNNI), and dequantizing equals
    /// `scale * q`; for both widths.
    #[test]
    fn packed_product_equals_the_unpacked_one() {
        for (bits, values, bytes_per_value) in [
            (Bits::Four, q4_values as fn(usize) -> Vec<i8>, 0.5),
            (Bits::Eight, int8_values, 1.0),
        ] {
            for &(rows, k, n, block) in &[
                (1, 32, 16, 32),
                (1, 64, 48, 32),
                (3, 96, 64, 32),
                (4, 512, 32, 32),
                (5, 64, 80, 16),
                (6, 64, 32, 8),
                (7, 64, 48, 32),
                (11, 128, 32, 16),
                (10, 64, 32, 16),
                (16, 288, 16, 32),
            ] {
                let case = format!("{bits:?} {rows}x{k}x{n}/{block}");
                let q = values(k * n);
                let scales = f16_scales(k * n / block);
                let w = ColumnBlocks {
                    q: &q,
                    scales: &scales,
                    k,
                    n,
                    block,
                };
                let packed = PackedWeight::pack(&w, bits).expect("pack");
                assert_eq!(packed.unpack(), q, "{case}: unpack");
                let expected_bytes = (k * n) as f64 * bytes_per_value + (scales.len() * 2) as f64;
                assert_eq!(packed.resident_bytes() as f64, expected_bytes, "{case}");
                let dequantized = packed.dequantize_reference();
                for (i, (&d, &v)) in dequantized.iter().zip(&q).enumerate() {
                    assert_eq!(d, scales[i / n / block * n + i % n] * v as f32, "{case} [{i}]");
                }
                let rounded: Vec<bf16> = dequantized.iter().map(|&d| bf16::from_f32(d)).collect();
                assert_eq!(packed.dequantize_bf16_reference(), rounded, "{case}: to bf16");
                // The dispatched loops, and every SIMD loop this CPU runs.
                assert_eq!(packed.dequantize(), dequantized, "{case}: vectorized");
                assert_eq!(packed.dequantize_bf16(), rounded, "{case}: vectorized to bf16");
                for kernel in simd_dequantize_kernels() {
                    assert_eq!(
                        packed.dequantize_with::<f32>(kernel),
                        dequantized,
                        "{case}: {kernel:?}"
                    );
                    assert_eq!(
                        packed.dequantize_with::<bf16>(kernel),
                        rounded,
                        "{case}: {kernel:?} to bf16"
                    );
                }
                let x = activations(rows, k);
                let xq = Int8Rows::quantize(&x, rows, k, block).expect("quantize");
                let unpacked = matmul_int8_reference(&xq, &w).expect("unpacked");
                let plain = packed.matmul_int8_reference(&xq).expect("plain");
                assert_eq!(plain, unpacked, "{case}: plain packed product");
                for kernel in [Int8Kernel::Amx, Int8Kernel::Vnni, Int8Kernel::Avx2] {
                    match packed.matmul_int8_on(&xq, kernel) {
                        Some(fast) => assert_eq!(fast, unpacked, "{case}: {kernel:?} packed product"),
                        None => eprintln!("{kernel:?} does not run on this CPU: not checked"),
                    }
                }
            }
        }
    }

    /// The AMX-INT8 products of a batch ([`Int8Kernel::Amx`]) give the bits of the int8
    /// product on the unpacked values: every row count from 1 to 18 (VNNI below
    /// [`AMX_INT8_MIN_ROWS`], and for a last group of fewer past 16), blocks of 8 to 256 (one
    /// to four tile products per block), one and several K slabs, one and several tiles,
    /// units of one to four blocks and a last unit of one or three, random values
    /// and the extremes (every weight at either end of its range, activations at +-127, so
    /// the offset the stored unsigned weights carry is as large as it gets).
    #[test]
    fn amx_int8_products_have_the_bits_of_the_int8_product() {
        if !Int8Kernel::Amx.runs_here() {
            // `VIPLLAVA_REQUIRE_AMX=1` on a machine that has the tiles: a skip is a failure.
            assert!(
                std::env::var("VIPLLAVA_REQUIRE_AMX").map_or(true, |v| v != "1"),
                "VIPLLAVA_REQUIRE_AMX=1 but AMX-INT8 does not run here"
            );
            eprintln!("no AMX-INT8 on this CPU: not checked");
            return;
        }
        // Every tile shape used below can be configured (else the kernel would fall back
        // to VNNI unseen).
        for k_step in [8, 16, 32, 64] {
            for rows in AMX_INT8_MIN_ROWS..=16 {
                assert!(
                    crate::kernels::amx::Int8Tiles::new(rows, k_step).is_some(),
                    "{rows} x {k_step}"
                );
            }
        }
        let mut next = crate::kernels::tests::xorshift(0x9E37_79B9_7F4A_7C15);
        let mut cases = Vec::new();
        for rows in 1..=18 {
            cases.push((rows, 512, 48, 32));
        }
        cases.extend([
            (21, 768, 32, 256),
            (28, 768, 32, 256),
            (16, 512, 16, 128),
            (13, 256, 80, 64),
            (12, 96, 32, 16),
            (12, 80, 16, 16),
            (12, 96, 32, 32),
            (14, 64, 16, 8),
            (16, 2048, 64, 32),
        ]);
        for bits in [Bits::Eight, Bits::Four] {
            for &(rows, k, n, block) in &cases {
                for extreme in [false, true] {
                    let case = format!("{bits:?} {rows}x{k}x{n}/{block} extreme {extreme}");
                    let q = weight_values(bits, [k, n], block, extreme, &mut next);
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i: usize| {
                            if extreme {
                                if (i / 7).is_multiple_of(2) { 1.5 } else { -1.5 }
                            } else {
                                (next() % 2001) as f32 / 1000.0 - 1.0
                            }
                        })
                        .collect();
                    let (packed, xq, unpacked) = packed_product_case(bits, &q, &x, [rows, k, n], block);
                    let tiles = packed
                        .matmul_int8_on(&xq, Int8Kernel::Amx)
                        .expect("AMX runs here");
                    assert_eq!(tiles, unpacked, "{case}");
                    // The dispatched product takes them.
                    assert_eq!(Int8Kernel::best(), Int8Kernel::Amx);
                    assert_eq!(packed.matmul_int8(&xq), Some(unpacked), "{case}: dispatched");
                }
            }
        }
    }

    /// The q4 gemm for many rows, and the decode kernels of every instruction set this CPU
    /// runs, give the bits of the int8 product on the unpacked values: pseudo-random
    /// nibbles and activations, row counts that end on every row of the 4-row tiles, one
    /// and several slabs along K, blocks of 8 to 256 (past 32 the AVX2 gemm refuses them,
    /// and only the decode kernels run there), widths of one tile to several tasks, and the
    /// largest int16 sums a block can reach.
    #[test]
    fn q4_gemm_and_decode_kernels_have_the_bits_of_the_int8_product() {
        let mut next = crate::kernels::tests::xorshift(0x2545_F491_4F6C_DD1D);
        let mut ran = false;
        for &(rows, k, n, block) in &[
            (1, 32, 16, 32),
            (5, 96, 48, 32),
            (18, 768, 64, 32),
            (7, 272, 32, 16),
            (9, 64, 16, 8),
            (37, 512, 400, 32),
            (130, 1024, 96, 32),
            (3, 128, 32, 64),
            (6, 384, 48, 128),
            (2, 512, 16, 256),
        ] {
            for extreme in [false, true] {
                let case = format!("{rows}x{k}x{n}/{block} extreme {extreme}");
                // Extreme: every weight 7 (nibble 15) and every activation +127 or -127 per
                // row, the largest int16 sums a block can reach.
                let q: Vec<i8> = (0..k * n)
                    .map(|_| if extreme { 7 } else { (next() % 16) as i8 - 8 })
                    .collect();
                let x: Vec<f32> = (0..rows * k)
                    .map(|i: usize| {
                        if extreme {
                            if (i / k).is_multiple_of(2) { 1.5 } else { -0.25 }
                        } else {
                            (next() % 2001) as f32 / 1000.0 - 1.0
                        }
                    })
                    .collect();
                let (packed, xq, want) = packed_product_case(Bits::Four, &q, &x, [rows, k, n], block);
                match packed.matmul_int8_gemm(&xq) {
                    Some(got) => {
                        ran = true;
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(g.to_bits(), e.to_bits(), "{case} at {i}: {g} vs {e}");
                        }
                    }
                    None => assert!(!packed.int8_gemm_applies(), "{case}: refused where it applies"),
                }
                for kernel in [Int8Kernel::Vnni, Int8Kernel::Avx2]
                    .into_iter()
                    .filter(|k| k.runs_here())
                {
                    let got = packed
                        .matmul_int8_on(&xq, kernel)
                        .expect("a kernel this CPU runs");
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.to_bits(), e.to_bits(), "{case} {kernel:?} at {i}: {g} vs {e}");
                    }
                }
            }
        }
        if !ran {
            eprintln!("the int8 gemm does not run on this CPU (AMX-INT8, or AVX2 without VNNI): not checked");
        }
    }

    /// The AMX-INT8 gemm of a prefill gives the bits of the int8 product on the unpacked
    /// values (the decode kernels'): q8 and q4, row counts that end on every kind of last
    /// group (16 rows, 13, 8, one) and that split into several row parts (a narrow
    /// product), one slab, several, and a short last one along K, blocks of 8 to 256,
    /// widths of one tile to several tasks with a short last one, random values and the
    /// extremes of both ranges.
    #[test]
    fn amx_int8_gemm_has_the_bits_of_the_int8_product() {
        if !Int8Kernel::Amx.runs_here() {
            assert!(
                std::env::var("VIPLLAVA_REQUIRE_AMX").map_or(true, |v| v != "1"),
                "VIPLLAVA_REQUIRE_AMX=1 but AMX-INT8 does not run here"
            );
            eprintln!("no AMX-INT8 on this CPU: not checked");
            return;
        }
        let mut next = crate::kernels::tests::xorshift(0x6A09_E667_F3BC_C908);
        for bits in [Bits::Eight, Bits::Four] {
            assert!(PackedWeight::int8_gemm_runs(bits, 32), "{bits:?}");
            for &(rows, k, n, block) in &[
                (17, 256, 16, 32),
                (29, 288, 48, 32),
                (40, 768, 272, 32),
                (33, 512, 528, 64),
                (64, 96, 32, 8),
                (100, 256, 64, 256),
                (21, 128, 16, 16),
                (45, 1024, 1040, 128),
            ] {
                for extreme in [false, true] {
                    let case = format!("{bits:?} {rows}x{k}x{n}/{block} extreme {extreme}");
                    let q = weight_values(bits, [k, n], block, extreme, &mut next);
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i: usize| {
                            if extreme {
                                if (i / 5).is_multiple_of(2) { 2.0 } else { -2.0 }
                            } else {
                                (next() % 2001) as f32 / 1000.0 - 1.0
                            }
                        })
                        .collect();
                    let (packed, xq, want) = packed_product_case(bits, &q, &x, [rows, k, n], block);
                    let got = packed.matmul_int8_gemm(&xq).expect("the AMX gemm runs here");
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.to_bits(), e.to_bits(), "{case} at {i}: {g} vs {e}");
                    }
                }
            }
        }
    }

    /// A weight rebuilt from its stored parts (as a burnpack maps them) is the same weight:
    /// the same values, scales and products, held in place; wrong lengths, a misaligned
    /// window and unpackable shapes are errors, not panics.
    #[test]
    fn stored_parts_give_back_the_same_weight() {
        for (bits, values) in [
            (Bits::Four, q4_values as fn(usize) -> Vec<i8>),
            (Bits::Eight, int8_values),
        ] {
            for &(k, n, block) in &[(64, 48, 32), (512, 32, 32), (64, 32, 8)] {
                let case = format!("{bits:?} k {k} n {n} block {block}");
                let q = values(k * n);
                let scales = f16_scales(k / block * n);
                let w = ColumnBlocks {
                    q: &q,
                    scales: &scales,
                    k,
                    n,
                    block,
                };
                let packed = PackedWeight::pack(&w, bits).expect("pack");
                let stored_values = || Bytes::from_bytes_vec(packed.values().to_vec());
                let stored_scales = || Bytes::from_elems(packed.f16_scales().to_vec());
                let stored = PackedWeight::from_stored(bits, [k, n], block, stored_values(), stored_scales())
                    .expect("from_stored");
                assert!(stored.is_mapped() && !packed.is_mapped(), "{case}");
                assert_eq!(stored.unpack(), q, "{case}: values");
                assert_eq!(stored.scales(), scales, "{case}: scales");
                assert_eq!(stored.resident_bytes(), packed.resident_bytes(), "{case}");
                assert_eq!(stored.dequantize(), packed.dequantize(), "{case}: dequantized");
                let x = activations(3, k);
                let xq = Int8Rows::quantize(&x, 3, k, block).expect("quantize");
                assert_eq!(
                    stored.matmul_int8(&xq),
                    packed.matmul_int8(&xq),
                    "{case}: product"
                );

                let short = Bytes::from_bytes_vec(packed.values()[1..].to_vec());
                assert!(matches!(
                    PackedWeight::from_stored(bits, [k, n], block, short, stored_scales()),
                    Err(StoredLayoutError::Values { .. })
                ));
                // One byte in: the f16 scales are not 2-byte aligned.
                let mut shifted = vec![0u8];
                shifted.extend(bytemuck::cast_slice::<f16, u8>(packed.f16_scales()));
                let len = shifted.len();
                let misaligned = Bytes::from_elems(shifted).shared().view(1, len).expect("view");
                assert!(matches!(
                    PackedWeight::from_stored(bits, [k, n], block, stored_values(), misaligned),
                    Err(StoredLayoutError::Scales { .. })
                ));
                assert!(matches!(
                    PackedWeight::from_stored(bits, [k, n + 1], block, stored_values(), stored_scales()),
                    Err(StoredLayoutError::Shape { .. })
                ));
            }
        }
    }

    /// The SIMD dequantization loops this CPU runs (said when there are none).
    fn simd_dequantize_kernels() -> Vec<Simd> {
        let kernels = Simd::reachable_simd();
        if kernels.is_empty() {
            eprintln!("no SIMD dequantization loop on this CPU: only the plain one was checked");
        }
        kernels
    }

    /// The AMX panels' pairs of a tile, on every kernel this CPU runs, are the bf16
    /// dequantization's values two inputs at a time (even input in the low half), from
    /// any whole group on, across blocks.
    #[test]
    fn tile_pairs_have_the_bits_of_the_bf16_dequantization() {
        // Random values, so that no pattern hides a swap of a pair's halves.
        let mut next = crate::kernels::tests::xorshift(0x5851_F42D_4C95_7F2D);
        for bits in [Bits::Four, Bits::Eight] {
            for &(k, n, block) in &[(64, 32, 32), (96, 48, 16), (40, 16, 8)] {
                let packed = random_packed(bits, [k, n], block, &mut next);
                let dense = packed.dequantize_bf16_reference();
                let rows = bits.group_rows();
                for kernel in std::iter::once(Simd::Plain).chain(simd_dequantize_kernels()) {
                    for t in 0..n / TILE {
                        for k0 in (0..k).step_by(rows) {
                            let mut got = vec![0u32; (k - k0) / 2 * TILE];
                            packed.dequantize_tile_pairs([k0, k], t, &mut got, kernel);
                            for (i, &pair) in got.iter().enumerate() {
                                let (p, j) = (k0 / 2 + i / TILE, t * TILE + i % TILE);
                                let want = dense[2 * p * n + j].to_bits() as u32
                                    | ((dense[(2 * p + 1) * n + j].to_bits() as u32) << 16);
                                assert_eq!(
                                    pair, want,
                                    "{bits:?} {k}x{n}/{block} {kernel:?} tile {t} from {k0} at {i}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Values halfway between two bf16 values round to the even one on every path, as
    /// `bf16::from_f32` does (the vectorized loop rounds with integer operations).
    #[test]
    fn dequantizing_to_bf16_rounds_halfway_values_to_even() {
        let (k, n, block) = (32, 16, 32);
        // `1 + m 2^-8` for odd `m` lies halfway between two bf16 values near 1; the last
        // column's scale is a NaN (a file can hold one): `from_f32` keeps it a quiet NaN.
        let scales: Vec<f32> = (0..n).map(|j| 1.0 + (2 * j + 1) as f32 / 256.0).collect();
        // A NaN with every payload bit set: rounding it as a number would carry into the sign.
        let nan = f16::from_bits(0x7FFF);
        let stored: Vec<f32> = (0..n)
            .map(|j| if j == n - 1 { nan.to_f32() } else { scales[j] })
            .collect();
        let bits_of = |v: Vec<bf16>| -> Vec<u16> { v.into_iter().map(bf16::to_bits).collect() };
        let q: Vec<i8> = (0..k * n).map(|i| [1, -1, 3, -7][i % 4]).collect();
        let w = ColumnBlocks {
            q: &q,
            scales: &scales,
            k,
            n,
            block,
        };
        for bits in [Bits::Four, Bits::Eight] {
            let packed = PackedWeight::pack(&w, bits).expect("pack");
            // `pack` refuses a NaN scale; a stored weight (a burnpack) may hold one.
            let mut stored_scales = packed.f16_scales().to_vec();
            stored_scales[n - 1] = nan;
            let values = Bytes::from_bytes_vec(packed.values().to_vec());
            let packed =
                PackedWeight::from_stored(bits, [k, n], block, values, Bytes::from_elems(stored_scales))
                    .expect("stored parts");
            let want: Vec<bf16> = (0..k * n)
                .map(|i| bf16::from_f32(stored[i % n] * q[i] as f32))
                .collect();
            assert!(
                (0..k * n).any(|i| want[i].to_f32() != stored[i % n] * q[i] as f32 && !want[i].is_nan()),
                "the case holds values that round"
            );
            let want = bits_of(want);
            assert_eq!(
                bits_of(packed.dequantize_bf16_reference()),
                want,
                "{bits:?}: plain"
            );
            assert_eq!(bits_of(packed.dequantize_bf16()), want, "{bits:?}: dispatched");
            for kernel in simd_dequantize_kernels() {
                assert_eq!(
                    bits_of(packed.dequantize_with::<bf16>(kernel)),
                    want,
                    "{bits:?}: {kernel:?}"
                );
            }
            // The AMX panels' pairs round alike, on every kernel.
            for kernel in std::iter::once(Simd::Plain).chain(simd_dequantize_kernels()) {
                let mut pairs = vec![0u32; k / 2 * n];
                for t in 0..n / TILE {
                    packed.dequantize_tile_pairs([0, k], t, &mut pairs[t * k / 2 * TILE..], kernel);
                }
                for (i, &pair) in pairs.iter().enumerate() {
                    let (t, p, j) = (i / (k / 2 * TILE), i % (k / 2 * TILE) / TILE, i % TILE);
                    let c = t * TILE + j;
                    let expected = want[2 * p * n + c] as u32 | (want[(2 * p + 1) * n + c] as u32) << 16;
                    assert_eq!(pair, expected, "{bits:?}: {kernel:?} pairs at {i}");
                }
            }
        }
    }

    /// A q4 `Linear` weight packs into a lazy parameter that the decode path reads in place
    /// (the same product as the unpacked weight); reading the parameter unpacks it into the
    /// same Burn tensor; a weight with a LoRA adapter is not read packed.
    #[test]
    fn a_packed_parameter_unpacks_when_read_and_yields_to_adapters() {
        use burn::module::{Lora, Module};
        use burn::nn::LinearConfig;
        use burn::tensor::quantization::ScaleDtype;
        use burn::tensor::{Device, Distribution};

        let device = Device::flex();
        let (k, n) = (64, 32);
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q4S)
            .per_block([32, 1], ScaleDtype::F16);
        let mut layer = LinearConfig::new(k, n).init(&device);
        let quantized = layer.weight.val().quantize_dynamic(&scheme);
        let reference = quantized.clone().dequantize();
        layer.weight = pack_weight(Param::from_tensor(quantized));
        let packed = packed_weight(&layer.weight).expect("packed");
        assert_eq!(packed.bits(), Bits::Four);
        let x = Tensor::<2>::random([3, k], Distribution::Normal(0.0, 1.0), &device);
        let expected =
            x.clone().matmul(reference.clone()) + layer.bias.as_ref().expect("bias").val().unsqueeze();
        let got = crate::kernels::with_int8_activations(false, || crate::kernels::linear(&layer, x.clone()));
        let diff: f32 = (got - expected).abs().max().into_scalar();
        assert!(diff < 1e-5, "packed product differs by {diff}");
        assert!(
            packed_weight(&layer.weight).is_some(),
            "the product read the weight in place"
        );

        let adapted = layer.clone().apply_lora(Lora::new(4, 8.0));
        assert!(
            packed_weight(&adapted.weight).is_none(),
            "an adapted weight is not read packed"
        );

        let read = layer.weight.val();
        assert!(matches!(read.dtype(), DType::QFloat(s) if s.value == QuantValue::Q4S));
        assert!(packed_weight(&layer.weight).is_none(), "reading unpacks");
        let back: Vec<f32> = read.dequantize().into_data().try_to_vec().expect("values");
        let want: Vec<f32> = reference.into_data().try_to_vec().expect("values");
        assert_eq!(back, want, "the unpacked tensor is the quantized one");
    }

    /// Values outside 4 bits, widths that are not whole tiles and mismatched activations
    /// are refused.
    #[test]
    fn projections_of_one_input_fused_keep_the_bits_of_each_alone() {
        use burn::nn::{Linear, LinearConfig};
        use burn::tensor::quantization::ScaleDtype;
        use burn::tensor::{Device, Distribution};

        let device = Device::flex();
        // Two K slabs (k = 320), widths as q/k/v with GQA, q8 and q4, with and without bias.
        let k = 320;
        let packed_layer = |n: usize, value: QuantValue, bias: bool| {
            let scheme = QuantScheme::default()
                .with_value(value)
                .per_block([32, 1], ScaleDtype::F16);
            let mut layer = LinearConfig::new(k, n).with_bias(bias).init(&device);
            layer.weight = pack_weight(Param::from_tensor(layer.weight.val().quantize_dynamic(&scheme)));
            assert!(is_packed(&layer.weight));
            layer
        };
        let layers: [Linear; 3] = [
            packed_layer(64, QuantValue::Q8S, true),
            packed_layer(16, QuantValue::Q4S, false),
            packed_layer(48, QuantValue::Q4S, true),
        ];
        for rows in [1, 3, 16] {
            let x = Tensor::<3>::random([1, rows, k], Distribution::Normal(0.0, 1.0), &device);
            let fused = crate::kernels::fused_packed_linears(&[&layers[0], &layers[1], &layers[2]], &x);
            if !crate::kernels::int8_activations_enabled() {
                // No AVX-512 VNNI here: the layers go one by one through `linear`.
                assert!(fused.is_none(), "the fused path needs int8 activations");
                continue;
            }
            let fused = fused.expect("the fused path applies");
            for (layer, got) in layers.iter().zip(fused) {
                let alone = crate::kernels::linear(layer, x.clone());
                let (got, alone): (Vec<f32>, Vec<f32>) = (
                    got.into_data().try_to_vec().expect("f32"),
                    alone.into_data().try_to_vec().expect("f32"),
                );
                assert_eq!(got, alone, "{rows} rows");
            }
        }
        assert!(layers.iter().all(|l| is_packed(&l.weight)), "read in place");
        // A layer that is not packed: each goes through `linear` on its own.
        let plain = LinearConfig::new(k, 32).init(&device);
        let x = Tensor::<2>::random([2, k], Distribution::Normal(0.0, 1.0), &device);
        assert!(crate::kernels::fused_packed_linears(&[&layers[0], &plain], &x).is_none());
        let [a, b] = crate::kernels::linears([&layers[0], &plain], x.clone());
        let a_alone: Vec<f32> = crate::kernels::linear(&layers[0], x.clone())
            .into_data()
            .try_to_vec()
            .expect("f32");
        let b_alone: Vec<f32> = crate::kernels::linear(&plain, x)
            .into_data()
            .try_to_vec()
            .expect("f32");
        assert_eq!(a.into_data().try_to_vec::<f32>().expect("f32"), a_alone);
        assert_eq!(b.into_data().try_to_vec::<f32>().expect("f32"), b_alone);
    }

    #[test]
    fn packing_refuses_what_it_cannot_hold() {
        let mut scales = f16_scales(32);
        let pack = |q: &[i8], scales: &[f32], n: usize, bits| {
            PackedWeight::pack(
                &ColumnBlocks {
                    q,
                    scales: &scales[..64 * n / 32],
                    k: 64,
                    n,
                    block: 32,
                },
                bits,
            )
        };
        let mut q = q4_values(64 * 16);
        assert!(
            pack(&q[..64 * 2], &scales, 2, Bits::Four).is_none(),
            "n not a multiple of 16"
        );
        assert!(pack(&q, &scales, 16, Bits::Four).is_some());
        scales[3] = 1e-3;
        assert!(
            pack(&q, &scales, 16, Bits::Four).is_none(),
            "a scale that is not an f16 value"
        );
        scales[3] = 0.5;
        q[5] = 9;
        assert!(
            pack(&q, &scales, 16, Bits::Four).is_none(),
            "a value outside -8..=7"
        );
        let packed = pack(&q, &scales, 16, Bits::Eight).expect("any int8 value");
        let xq = Int8Rows::quantize(&activations(1, 32), 1, 32, 32).expect("quantize");
        assert!(packed.matmul_int8(&xq).is_none(), "K differs");
    }
}
