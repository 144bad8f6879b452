//! Checkpoint bytes -> a parameter's values in the load dtype, in one pass, for the tensors
//! the load converts or quantizes (tensors stored in the load dtype are used in place from a
//! map of their file, see `load.rs`).
//!
//! Burn-store's PyTorch adapter transposes every linear weight (`[out, in]` on disk,
//! `[in, out]` in Burn) on one thread, the cast adapter converts in another pass, and
//! `Bytes::from_bytes_vec` copies each buffer once more to realign it: three fresh copies
//! of every weight, each paying first-touch page faults (a 5.7 GB f32 load spent ~70% of
//! its time there). Here the file bytes are written once, converted, into the parameter's
//! own allocation, by all rayon workers: on the plain CPU device, in the file's order, read
//! from its map, for a tensor the load only converts (`load.rs` sees a linear weight
//! transposed, as it does one used in place); otherwise (a tensor it quantizes, or any on
//! another device) transposed into Burn's `[in, out]`, from a buffer read once. Plain
//! conversions run [`RUN`] values at a time through loops that vectorize (f64 excepted).

use std::cell::RefCell;
use std::fs::File;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::Path;

use burn::tensor::{DType, TensorData, bf16, f16};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::checkpoint::DiskDType;

/// Output rows (of the transposed matrix) per rayon task.
const ROWS_PER_TASK: usize = 64;
/// Elements per rayon task for a plain conversion.
const CHUNK: usize = 1 << 18;

/// Values converted per step of a run: decoded into one stack buffer of f32, then encoded.
const RUN: usize = 256;

/// A dtype a parameter is loaded as.
trait LoadElement: burn::tensor::Element + Copy + Default + Send + Sync {
    fn from_f32(v: f32) -> Self;

    /// `src` converted into `out` (same length), in loops the compiler vectorizes.
    fn encode(src: &[f32], out: &mut [MaybeUninit<Self>]) {
        for (o, &v) in out.iter_mut().zip(src) {
            o.write(Self::from_f32(v));
        }
    }
}

impl LoadElement for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl LoadElement for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }

    fn encode(src: &[f32], out: &mut [MaybeUninit<Self>]) {
        for (o, &v) in out.iter_mut().zip(src) {
            o.write(bf16::from_bits(bf16_bits(v)));
        }
    }
}

/// The bits of `bf16::from_f32(v)` (nearest, ties to even; NaN kept quiet with its high
/// payload) without branches, so that a loop of them vectorizes.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let quiet_nan = (x >> 16) | 0x0040;
    let is_nan = x & 0x7FFF_FFFF > 0x7F80_0000;
    (if is_nan { quiet_nan } else { rounded }) as u16
}

impl LoadElement for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }

    fn encode(src: &[f32], out: &mut [MaybeUninit<Self>]) {
        let mut halves = [f16::ZERO; RUN];
        for (src, out) in src.chunks(RUN).zip(out.chunks_mut(RUN)) {
            let halves = &mut halves[..src.len()];
            // F16C where the CPU has it (detected at run time by `half`).
            halves.convert_from_f32_slice(src);
            for (o, &h) in out.iter_mut().zip(halves.iter()) {
                o.write(h);
            }
        }
    }
}

/// How one on-disk (little-endian) element reads as f32.
trait DiskElement: Send + Sync {
    const SIZE: usize;
    fn at(bytes: &[u8], index: usize) -> f32;

    /// The `out.len()` values in `bytes` (overridden with loops the compiler vectorizes).
    fn decode(bytes: &[u8], out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = Self::at(bytes, i);
        }
    }
}

struct DiskF32;
struct DiskBf16;
struct DiskF16;
struct DiskF64;

impl DiskElement for DiskF32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn at(bytes: &[u8], i: usize) -> f32 {
        f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
    }

    fn decode(bytes: &[u8], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

impl DiskElement for DiskBf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn at(bytes: &[u8], i: usize) -> f32 {
        bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
    }

    fn decode(bytes: &[u8], out: &mut [f32]) {
        // Widening bf16 is exact: its bits are the high half of the f32's (a NaN made
        // quiet, as `bf16::to_f32` does).
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let wide = u32::from(u16::from_le_bytes([b[0], b[1]])) << 16;
            let is_nan = wide & 0x7FFF_FFFF > 0x7F80_0000;
            *o = f32::from_bits(if is_nan { wide | 0x0040_0000 } else { wide });
        }
    }
}

impl DiskElement for DiskF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn at(bytes: &[u8], i: usize) -> f32 {
        f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
    }

    fn decode(bytes: &[u8], out: &mut [f32]) {
        let mut halves = [f16::ZERO; RUN];
        for (bytes, out) in bytes.chunks(2 * RUN).zip(out.chunks_mut(RUN)) {
            let halves = &mut halves[..out.len()];
            for (h, b) in halves.iter_mut().zip(bytes.chunks_exact(2)) {
                *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
            }
            // F16C where the CPU has it (detected at run time by `half`).
            halves.convert_to_f32_slice(out);
        }
    }
}

impl DiskElement for DiskF64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn at(bytes: &[u8], i: usize) -> f32 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[8 * i..8 * i + 8]);
        f64::from_le_bytes(b) as f32
    }
}

/// The values of `bytes` (stored as `disk`, little-endian) as a tensor loaded as `dtype`
/// holds them, widened to f32 into `out` (one per value): what the quantizer sees of a
/// tensor that [`convert_bytes`] loads. `false` for an integer `disk`.
pub(crate) fn decode_loaded(bytes: &[u8], disk: DiskDType, dtype: DType, out: &mut [f32]) -> bool {
    match disk {
        DiskDType::F32 => DiskF32::decode(bytes, out),
        DiskDType::BF16 => DiskBf16::decode(bytes, out),
        DiskDType::F16 => DiskF16::decode(bytes, out),
        DiskDType::F64 => DiskF64::decode(bytes, out),
        DiskDType::Integer(_) => return false,
    }
    let narrowed = match dtype {
        DType::BF16 => disk != DiskDType::BF16,
        DType::F16 => disk != DiskDType::F16,
        _ => false,
    };
    if narrowed {
        for v in out.iter_mut() {
            *v = match dtype {
                DType::BF16 => bf16::from_bits(bf16_bits(*v)).to_f32(),
                _ => f16::from_f32(*v).to_f32(),
            };
        }
    }
    true
}

thread_local! {
    /// The file bytes of the tensor being loaded, reused from tensor to tensor so that its
    /// pages are touched once per load rather than once per tensor.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Frees this thread's read buffer when dropped: hold one for the duration of a load, so
/// that the largest tensor's bytes do not stay allocated after it (or after an error).
pub(crate) struct ScratchGuard;

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        SCRATCH.with(|scratch| {
            // Borrowed: an outer load on this thread is still using it and frees it itself.
            if let Ok(mut buffer) = scratch.try_borrow_mut() {
                *buffer = Vec::new();
            }
        });
    }
}

/// The order [`convert_bytes`] writes a tensor in.
#[derive(Clone, Copy)]
pub(crate) enum Layout<'a> {
    /// Disk `[rows, cols]` as `[cols, rows]`: a linear weight in Burn's `[in, out]`.
    Transposed,
    /// The file's order. The function is called with each piece of the file bytes once
    /// it has been converted (to drop mapped pages as the conversion goes).
    FileOrder(&'a (dyn Fn(&[u8]) + Sync)),
}

/// Nothing to do with a converted piece of file bytes.
pub(crate) fn keep(_: &[u8]) {}

/// Reads `range` of `file` and returns the tensor of `shape` (the file's shape, or its
/// transpose when `transpose`, for a 2-D linear weight) as `dtype`.
pub(crate) fn read_tensor(
    file: &Path,
    range: Range<u64>,
    disk: DiskDType,
    shape: &[usize],
    transpose: bool,
    dtype: DType,
) -> std::io::Result<TensorData> {
    let len = usize::try_from(range.end - range.start)
        .map_err(|_| std::io::Error::other("tensor larger than the address space"))?;
    let read = |buffer: &mut Vec<u8>| -> std::io::Result<TensorData> {
        buffer.resize(len, 0);
        read_exact_at(&File::open(file)?, &mut buffer[..len], range.start)?;
        let layout = if transpose {
            Layout::Transposed
        } else {
            Layout::FileOrder(&keep)
        };
        convert_bytes(&buffer[..len], disk, shape, layout, dtype)
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buffer) => read(&mut buffer),
        // A load nested in another on this thread (a rayon worker that picked up a second
        // load while waiting): a buffer of its own.
        Err(_) => read(&mut Vec::new()),
    })
}

/// The tensor of `shape` (the file's shape, transposed for [`Layout::Transposed`]) stored in
/// `bytes` as `disk`, converted to `dtype` by all rayon workers.
pub(crate) fn convert_bytes(
    bytes: &[u8],
    disk: DiskDType,
    shape: &[usize],
    layout: Layout<'_>,
    dtype: DType,
) -> std::io::Result<TensorData> {
    match dtype {
        DType::BF16 => by_disk::<bf16>(disk, bytes, shape, layout),
        DType::F16 => by_disk::<f16>(disk, bytes, shape, layout),
        _ => by_disk::<f32>(disk, bytes, shape, layout),
    }
}

fn by_disk<T: LoadElement>(
    disk: DiskDType,
    bytes: &[u8],
    shape: &[usize],
    layout: Layout<'_>,
) -> std::io::Result<TensorData> {
    match disk {
        DiskDType::F32 => convert::<DiskF32, T>(bytes, shape, layout),
        DiskDType::BF16 => convert::<DiskBf16, T>(bytes, shape, layout),
        DiskDType::F16 => convert::<DiskF16, T>(bytes, shape, layout),
        DiskDType::F64 => convert::<DiskF64, T>(bytes, shape, layout),
        DiskDType::Integer(name) => Err(std::io::Error::other(format!(
            "integer tensor ({name}) where a float parameter was expected"
        ))),
    }
}

fn convert<S: DiskElement, T: LoadElement>(
    bytes: &[u8],
    shape: &[usize],
    layout: Layout<'_>,
) -> std::io::Result<TensorData> {
    let count: usize = shape.iter().product();
    if bytes.len() != count * S::SIZE {
        return Err(std::io::Error::other(format!(
            "{} bytes for a tensor of shape {shape:?}",
            bytes.len()
        )));
    }
    // Written in parallel without zeroing first: the fresh pages are faulted in (and zeroed
    // by the kernel) by all workers as they write, not by one thread in a memset before.
    let mut out: Vec<T> = Vec::with_capacity(count);
    let slots = &mut out.spare_capacity_mut()[..count];
    let consumed = match layout {
        Layout::Transposed if shape.len() == 2 => None,
        Layout::Transposed => Some(&keep as &(dyn Fn(&[u8]) + Sync)),
        Layout::FileOrder(consumed) => Some(consumed),
    };
    let Some(consumed) = consumed else {
        // Disk `[rows, cols]` -> Burn `[cols, rows]`.
        let (rows, cols) = (shape[0], shape[1]);
        if rows > 0 {
            slots
                .par_chunks_mut(ROWS_PER_TASK * rows)
                .enumerate()
                .for_each(|(task, out)| {
                    let c0 = task * ROWS_PER_TASK;
                    transpose_block::<S, T>(bytes, rows, cols, c0, out);
                });
        }
        // SAFETY: the chunks cover `slots` (all `count` elements, a whole number of `rows`
        // each) and `transpose_block` writes every element of its chunk; with `rows == 0`,
        // `count` is 0.
        unsafe { out.set_len(count) };
        return Ok(TensorData::new(out, [shape[1], shape[0]]));
    };
    slots.par_chunks_mut(CHUNK).enumerate().for_each(|(task, out)| {
        let bytes = &bytes[task * CHUNK * S::SIZE..][..out.len() * S::SIZE];
        let mut values = [0f32; RUN];
        for (run, out) in out.chunks_mut(RUN).enumerate() {
            let values = &mut values[..out.len()];
            S::decode(&bytes[run * RUN * S::SIZE..], values);
            T::encode(values, out);
        }
        consumed(bytes);
    });
    // SAFETY: the chunks cover all `count` elements and each is written above.
    unsafe { out.set_len(count) };
    Ok(TensorData::new(out, shape.to_vec()))
}

/// Output rows `c0..` (as many as `out` holds) of the transpose of the `[rows, cols]`
/// matrix in `bytes`, in tiles of 16 source rows so that each cache line read from the
/// source is used for 16 output rows.
fn transpose_block<S: DiskElement, T: LoadElement>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    c0: usize,
    out: &mut [std::mem::MaybeUninit<T>],
) {
    const TILE: usize = 16;
    let n_out = out.len() / rows;
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + TILE).min(rows);
        for c in 0..n_out {
            let dst = &mut out[c * rows + r0..c * rows + r1];
            for (dr, d) in dst.iter_mut().enumerate() {
                d.write(T::from_f32(S::at(bytes, (r0 + dr) * cols + c0 + c)));
            }
        }
        r0 = r1;
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_f32(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn transposes_and_converts_every_shape() {
        for &(rows, cols) in &[(1, 1), (3, 5), (17, 70), (130, 33), (64, 64), (200, 1)] {
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 7.0).collect();
            let bytes = bytes_f32(&values);
            let data = convert::<DiskF32, f32>(&bytes, &[rows, cols], Layout::Transposed).expect("convert");
            assert_eq!(data.shape().to_vec(), vec![cols, rows]);
            let got: Vec<f32> = data.try_to_vec().expect("f32");
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        got[c * rows + r],
                        values[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
            let data =
                convert::<DiskF32, bf16>(&bytes, &[rows, cols], Layout::FileOrder(&keep)).expect("convert");
            let got: Vec<bf16> = data.try_to_vec().expect("bf16");
            let want: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(got, want);
        }
    }

    /// Every dtype pair's run conversion gives the bits of the one-value-at-a-time
    /// `from_f32(at(..))`, on specials (NaN payloads, infinities, subnormals of each width,
    /// bf16 halfway cases both sides of even) and a stride through all f32 bit patterns, at
    /// lengths that end inside a run and inside a task's chunk.
    #[test]
    fn run_conversions_give_the_bits_of_single_values() {
        let specials: [u32; 14] = [
            0x7FC0_0001,
            0x7F80_0001,
            0xFFA0_1234,
            0x7F80_0000,
            0xFF80_0000,
            0x0000_0001,
            0x8000_0000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x7F7F_FFFF,
            0x0033_0000,
            0x3880_0000,
            0x3380_0000,
        ];
        let mut bits: Vec<u32> = specials.to_vec();
        bits.extend((0..600_000u32).map(|i| i.wrapping_mul(7_159)));
        let f32s: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let disks: [(DiskDType, Vec<u8>); 3] = [
            (
                DiskDType::F32,
                f32s.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                DiskDType::BF16,
                bits.iter()
                    .flat_map(|&b| ((b >> 16) as u16).to_le_bytes())
                    .collect(),
            ),
            (
                DiskDType::F16,
                bits.iter().flat_map(|&b| (b as u16).to_le_bytes()).collect(),
            ),
        ];
        for len in [1, RUN - 1, RUN + 3, CHUNK + 5, bits.len()] {
            for (disk, bytes) in &disks {
                let name = disk.name();
                let size = bytes.len() / bits.len();
                let bytes = &bytes[..len * size];
                let singles = |i: usize| match disk {
                    DiskDType::F32 => DiskF32::at(bytes, i),
                    DiskDType::BF16 => DiskBf16::at(bytes, i),
                    _ => DiskF16::at(bytes, i),
                };
                let run = |dtype| {
                    convert_bytes(bytes, *disk, &[len], Layout::FileOrder(&keep), dtype).expect("convert")
                };
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let data = run(dtype);
                    let got: Vec<u32> = match dtype {
                        DType::BF16 => bits_of(data.as_slice::<bf16>(), |v| v.to_bits().into()),
                        DType::F16 => bits_of(data.as_slice::<f16>(), |v| v.to_bits().into()),
                        _ => bits_of(data.as_slice::<f32>(), |v| v.to_bits()),
                    };
                    let want: Vec<u32> = (0..len)
                        .map(|i| match dtype {
                            DType::BF16 => bf16::from_f32(singles(i)).to_bits().into(),
                            DType::F16 => f16::from_f32(singles(i)).to_bits().into(),
                            _ => singles(i).to_bits(),
                        })
                        .collect();
                    assert!(got == want, "{name} -> {dtype:?}, {len} values");
                }
            }
        }
    }

    /// The bits of a converted tensor's values, widened to `u32`.
    fn bits_of<T: Copy>(values: Result<&[T], burn::tensor::DataError>, bits: impl Fn(T) -> u32) -> Vec<u32> {
        values.expect("the load dtype").iter().map(|&v| bits(v)).collect()
    }

    #[test]
    fn half_precision_disks_widen_exactly() {
        let values = [1.5f32, -2.25, 65504.0, 1e-3];
        let bf: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let h: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let d: Vec<u8> = values.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
        let got: Vec<f32> = convert::<DiskBf16, f32>(&bf, &[4], Layout::FileOrder(&keep))
            .unwrap()
            .try_to_vec()
            .unwrap();
        assert_eq!(got, values.map(|v| bf16::from_f32(v).to_f32()));
        let got: Vec<f32> = convert::<DiskF16, f32>(&h, &[2, 2], Layout::FileOrder(&keep))
            .unwrap()
            .try_to_vec()
            .unwrap();
        assert_eq!(got, values.map(|v| f16::from_f32(v).to_f32()));
        let got: Vec<f32> = convert::<DiskF64, f32>(&d, &[4], Layout::FileOrder(&keep))
            .unwrap()
            .try_to_vec()
            .unwrap();
        assert_eq!(got, values);
        assert!(convert::<DiskF32, f32>(&d, &[3], Layout::FileOrder(&keep)).is_err());
    }
}
