//! Safetensors weights written tensor by tensor, in shards of bounded size, with the index
//! the hub writes (`model.safetensors.index.json`).
//!
//! Nothing holds more than one tensor's bytes at a time: each [`PendingTensor`] knows its
//! key, shape and dtype up front (enough to plan the shards and write every header) and
//! produces its bytes only when its turn comes. A model that fits in one shard is written
//! as a single `model.safetensors`, as `save_pretrained` does; otherwise the shards are
//! `model-00001-of-0000N.safetensors` and the index maps every key to its shard, with
//! `metadata.total_size` the sum of the tensors' byte sizes.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;

use burn::tensor::{DType, TensorData};
use serde_json::{Map, Value, json};

use crate::error::{TrainError, io_err};

/// The hub's default largest shard: "5GB", i.e. 5 * 10^9 bytes (what `save_pretrained`
/// uses unless told otherwise).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;
/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Produces one tensor's data when it is written.
pub(crate) type Producer<'a> = Box<dyn Fn() -> Result<TensorData, String> + 'a>;

/// One tensor to write: known up front, produced on demand.
pub(crate) struct PendingTensor<'a> {
    /// Key in the file.
    pub key: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Dtype on disk (f32, f16 or bf16); the producer's data must have it.
    pub dtype: DType,
    /// The data, read or computed when its turn comes.
    pub produce: Producer<'a>,
}

impl PendingTensor<'_> {
    fn byte_len(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// The safetensors name of a float dtype.
fn dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        _ => return None,
    })
}

/// Cuts tensors of the given byte sizes, in order, into shards of at most `max` bytes
/// (a tensor larger than `max` gets a shard of its own), as transformers does.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut current) = (0usize, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && current + size > max {
            shards.push(start..i);
            start = i;
            current = 0;
        }
        current += size;
    }
    if start < sizes.len() {
        shards.push(start..sizes.len());
    }
    shards
}

/// File names for `n` shards (`model.safetensors` when there is one).
pub fn shard_names(n: usize) -> Vec<String> {
    if n <= 1 {
        return vec![SINGLE_FILE.to_string()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// What [`write_weights`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenWeights {
    /// The weight files, in order (one `model.safetensors`, or the shards).
    pub files: Vec<String>,
    /// Bytes of tensor data in all files.
    pub total_size: u64,
}

/// Writes `tensors` (sorted by key first) into `dir` as one `model.safetensors` or as shards
/// of at most `max_shard_bytes` plus `model.safetensors.index.json`. `metadata` goes into
/// every file's header.
pub(crate) fn write_weights(
    dir: &Path,
    mut tensors: Vec<PendingTensor<'_>>,
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<WrittenWeights, TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    tensors.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(w) = tensors.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(bad(format!("tensor {} twice", w[0].key)));
    }
    let sizes: Vec<u64> = tensors.iter().map(PendingTensor::byte_len).collect();
    let shards = plan_shards(&sizes, max_shard_bytes.max(1));
    let names = shard_names(shards.len());
    let mut weight_map = Map::new();
    for (range, name) in shards.iter().zip(&names) {
        let path = dir.join(name);
        write_file(&path, &tensors[range.clone()], metadata)?;
        for t in &tensors[range.clone()] {
            weight_map.insert(t.key.clone(), Value::String(name.clone()));
        }
    }
    let total_size: u64 = sizes.iter().sum();
    if names.len() > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).map_err(|e| bad(e.to_string()))?;
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, text + "\n").map_err(io_err(&path))?;
    }
    Ok(WrittenWeights {
        files: names,
        total_size,
    })
}

/// One safetensors file: the header from the tensors' shapes, then each tensor's bytes as
/// it is produced (data in the tensors' order, offsets contiguous).
fn write_file(
    path: &Path,
    tensors: &[PendingTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0u64;
    for t in tensors {
        let dtype = dtype_name(t.dtype).ok_or_else(|| bad(format!("{}: dtype {:?}", t.key, t.dtype)))?;
        let end = offset + t.byte_len();
        header.insert(
            t.key.clone(),
            json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).map_err(|e| bad(e.to_string()))?;
    // The format pads the header with spaces so that the data starts 8-byte aligned.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(text.as_bytes()))
        .map_err(io_err(path))?;
    for t in tensors {
        let data = (t.produce)().map_err(|e| bad(format!("{}: {e}", t.key)))?;
        if data.dtype() != t.dtype || data.shape().as_slice() != t.shape.as_slice() {
            return Err(bad(format!(
                "{}: produced {:?} {:?}, expected {:?} {:?}",
                t.key,
                data.dtype(),
                data.shape(),
                t.dtype,
                t.shape
            )));
        }
        let bytes = data.as_bytes();
        if bytes.len() as u64 != t.byte_len() {
            return Err(bad(format!(
                "{}: {} bytes, expected {}",
                t.key,
                bytes.len(),
                t.byte_len()
            )));
        }
        write_le(&mut w, bytes, t.dtype.size()).map_err(io_err(path))?;
    }
    let file = w.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))
}

/// Writes native-endian elements of `size` bytes as little-endian.
fn write_le(w: &mut impl Write, bytes: &[u8], size: usize) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        return w.write_all(bytes);
    }
    for chunk in bytes.chunks_exact(size) {
        let mut c = chunk.to_vec();
        c.reverse();
        w.write_all(&c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_cut_like_transformers() {
        assert_eq!(plan_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(
            plan_shards(&[10, 1, 1], 8),
            vec![0..1, 1..3],
            "an oversized tensor alone"
        );
        assert_eq!(plan_shards(&[1, 10, 1], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_shards(&[3, 3], 100), vec![0..2]);
        assert!(plan_shards(&[], 8).is_empty());
        assert_eq!(shard_names(1), ["model.safetensors"]);
        assert_eq!(
            shard_names(2),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn files_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let pending = |key: &str, v: Vec<f32>, dtype: DType| {
            let shape = vec![v.len()];
            PendingTensor {
                key: key.into(),
                shape: shape.clone(),
                dtype,
                produce: Box::new(move || Ok(TensorData::new(v.clone(), shape.clone()).convert_dtype(dtype))),
            }
        };
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let tensors = vec![
            pending("b", vec![1.0, 2.0, 3.0], DType::F32),
            pending("a", vec![0.5; 5], DType::BF16),
            pending("c", vec![-1.0; 7], DType::F16),
        ];
        // 12 + 10 + 14 bytes; at most 24 a shard: [a, b] and [c].
        let written = write_weights(dir.path(), tensors, 24, &meta).unwrap();
        assert_eq!(written.total_size, 36);
        assert_eq!(written.files.len(), 2);
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 36);
        assert_eq!(index["weight_map"]["a"], written.files[0].as_str());
        assert_eq!(index["weight_map"]["c"], written.files[1].as_str());
        let bytes = std::fs::read(dir.path().join(&written.files[0])).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let b = st.tensor("b").unwrap();
        assert_eq!(b.dtype(), safetensors::Dtype::F32);
        assert_eq!(b.data(), [1f32, 2.0, 3.0].map(f32::to_le_bytes).concat());
        assert_eq!(st.tensor("a").unwrap().dtype(), safetensors::Dtype::BF16);
        let (_, meta_back) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta_back.metadata().as_ref().unwrap()["format"], "pt");
        // Everything in one file when it fits: no index.
        let one = tempfile::tempdir().unwrap();
        let written =
            write_weights(one.path(), vec![pending("x", vec![1.0], DType::F32)], 24, &meta).unwrap();
        assert_eq!(written.files, ["model.safetensors"]);
        assert!(!one.path().join(INDEX_FILE).exists());
    }
}
