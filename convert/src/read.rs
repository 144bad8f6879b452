//! Checkpoint bytes -> a parameter's values in Burn's layout and the load dtype, in one pass,
//! for the tensors the load converts or quantizes (tensors stored in the load dtype are used in
//! place from a map of their file, see `load.rs`).
//!
//! Burn-store's PyTorch adapter transposes every linear weight (`[out, in]` on disk,
//! `[in, out]` in Burn) on one thread, the cast adapter converts in another pass, and
//! `Bytes::from_bytes_vec` copies each buffer once more to realign it: three fresh copies
//! of every weight, each paying first-touch page faults (a 5.7 GB f32 load spent ~70% of
//! its time there). Here the file bytes are read once into a reused buffer and written once,
//! converted and transposed, into the parameter's own allocation, by all rayon workers.

use std::cell::RefCell;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

use burn::tensor::{DType, TensorData, bf16, f16};
use rayon::prelude::*;

use crate::checkpoint::DiskDType;

/// Output rows (of the transposed matrix) per rayon task.
const ROWS_PER_TASK: usize = 64;
/// Elements per rayon task for a plain conversion.
const CHUNK: usize = 1 << 18;

/// A dtype a parameter is loaded as.
trait LoadElement: burn::tensor::Element + Copy + Default + Send + Sync {
    fn from_f32(v: f32) -> Self;
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
}

impl LoadElement for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// How one on-disk (little-endian) element reads as f32.
trait DiskElement: Send + Sync {
    const SIZE: usize;
    fn at(bytes: &[u8], index: usize) -> f32;
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
}

impl DiskElement for DiskBf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn at(bytes: &[u8], i: usize) -> f32 {
        bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
    }
}

impl DiskElement for DiskF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn at(bytes: &[u8], i: usize) -> f32 {
        f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
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
        let bytes = &buffer[..len];
        match dtype {
            DType::BF16 => by_disk::<bf16>(disk, bytes, shape, transpose),
            DType::F16 => by_disk::<f16>(disk, bytes, shape, transpose),
            _ => by_disk::<f32>(disk, bytes, shape, transpose),
        }
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buffer) => read(&mut buffer),
        // A load nested in another on this thread (a rayon worker that picked up a second
        // load while waiting): a buffer of its own.
        Err(_) => read(&mut Vec::new()),
    })
}

fn by_disk<T: LoadElement>(
    disk: DiskDType,
    bytes: &[u8],
    shape: &[usize],
    transpose: bool,
) -> std::io::Result<TensorData> {
    match disk {
        DiskDType::F32 => convert::<DiskF32, T>(bytes, shape, transpose),
        DiskDType::BF16 => convert::<DiskBf16, T>(bytes, shape, transpose),
        DiskDType::F16 => convert::<DiskF16, T>(bytes, shape, transpose),
        DiskDType::F64 => convert::<DiskF64, T>(bytes, shape, transpose),
        DiskDType::Integer(name) => Err(std::io::Error::other(format!(
            "integer tensor ({name}) where a float parameter was expected"
        ))),
    }
}

fn convert<S: DiskElement, T: LoadElement>(
    bytes: &[u8],
    shape: &[usize],
    transpose: bool,
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
    if transpose && shape.len() == 2 {
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
    }
    slots.par_chunks_mut(CHUNK).enumerate().for_each(|(task, out)| {
        let first = task * CHUNK;
        for (i, o) in out.iter_mut().enumerate() {
            o.write(T::from_f32(S::at(bytes, first + i)));
        }
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
            let data = convert::<DiskF32, f32>(&bytes, &[rows, cols], true).expect("convert");
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
            let data = convert::<DiskF32, bf16>(&bytes, &[rows, cols], false).expect("convert");
            let got: Vec<bf16> = data.try_to_vec().expect("bf16");
            let want: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(got, want);
        }
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
        let got: Vec<f32> = convert::<DiskBf16, f32>(&bf, &[4], false)
            .unwrap()
            .try_to_vec()
            .unwrap();
        assert_eq!(got, values.map(|v| bf16::from_f32(v).to_f32()));
        let got: Vec<f32> = convert::<DiskF16, f32>(&h, &[2, 2], false)
            .unwrap()
            .try_to_vec()
            .unwrap();
        assert_eq!(got, values.map(|v| f16::from_f32(v).to_f32()));
        let got: Vec<f32> = convert::<DiskF64, f32>(&d, &[4], false)
            .unwrap()
            .try_to_vec()
            .unwrap();
        assert_eq!(got, values);
        assert!(convert::<DiskF32, f32>(&d, &[3], false).is_err());
    }
}
