//! f32 tensors to and from safetensors bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{DType, TensorData};
use vipllava_convert::output::write_file_atomic;

use crate::error::TrainError;

/// One tensor ready to serialize: name, shape, little-endian f32 bytes.
pub(crate) type RawF32 = (String, Vec<usize>, Vec<u8>);

/// Little-endian bytes of f32 values.
pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file of f32 tensors; the error says which tensor is at fault.
pub(crate) fn serialize_f32(
    tensors: &[RawF32],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| format!("{n}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, metadata).map_err(|e| e.to_string())
}

/// Reads a safetensors file of f32 tensors by name.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, TensorData>, TrainError> {
    let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("{name}: expected f32, found {:?}", view.dtype())));
        }
        let v = to_f32(view.dtype(), view.data()).unwrap_or_default();
        out.insert(name, TensorData::new(v, view.shape().to_vec()));
    }
    Ok(out)
}

/// Writes f32 tensors to a safetensors file (via a temporary file in the same directory
/// renamed into place).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut raw: Vec<RawF32> = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let v: Vec<f32> = data
            .clone()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| bad(format!("{name}: {e:?}")))?;
        raw.push((name.clone(), data.shape().to_vec(), f32_bytes(&v)));
    }
    let bytes = serialize_f32(&raw, metadata).map_err(bad)?;
    Ok(write_file_atomic(path, &bytes)?)
}

/// A tensor snapshot of a module (f32, f16 or bf16) as f32 values.
pub(crate) fn snapshot_f32(snap: &burn_store::burn_pack::Tensor) -> Option<Vec<f32>> {
    let bytes = snap.to_bytes().ok()?;
    let st = match snap.dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => return None,
    };
    to_f32(st, &bytes)
}

/// Little-endian f32, f16 or bf16 bytes as f32 values; `None` for other dtypes.
pub(crate) fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        _ => return None,
    })
}

fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let mut e: i32 = -14;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_and_files_round_trip() {
        for (h, want) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0001, 5.960_464_5e-8),
            (0x7c00, f32::INFINITY),
        ] {
            assert_eq!(half_to_f32(h), want, "{h:#x}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_string(),
            TensorData::new(vec![1.0f32, -2.5, 3.0, 0.0], [2, 2]),
        );
        write_safetensors(&path, &m, None).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["a"].shape().to_vec(), vec![2, 2]);
        assert_eq!(
            back["a"].clone().try_to_vec::<f32>().unwrap(),
            vec![1.0, -2.5, 3.0, 0.0]
        );
    }
}
