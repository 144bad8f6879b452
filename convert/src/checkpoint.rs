//! Reading what a HF model directory holds, from file headers only: weight files (single
//! or sharded), each tensor's dtype, shape and place, and the key layout.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;

/// Largest safetensors JSON header we accept (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// A tensor's on-disk dtype, as safetensors spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// Any integer or bool type (buffers such as `position_ids`); never a weight.
    Integer(&'static str),
}

impl DiskDType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F64" => Self::F64,
            "I64" => Self::Integer("I64"),
            "I32" => Self::Integer("I32"),
            "I16" => Self::Integer("I16"),
            "I8" => Self::Integer("I8"),
            "U8" => Self::Integer("U8"),
            "U16" => Self::Integer("U16"),
            "U32" => Self::Integer("U32"),
            "U64" => Self::Integer("U64"),
            "BOOL" => Self::Integer("BOOL"),
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::F64 => 8,
            Self::Integer(name) => match name {
                "I64" | "U64" => 8,
                "I32" | "U32" => 4,
                "I16" | "U16" => 2,
                _ => 1,
            },
        }
    }

    /// The safetensors name.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F64 => "F64",
            Self::Integer(name) => name,
        }
    }

    /// True for float dtypes that can hold weights.
    pub fn is_float(self) -> bool {
        !matches!(self, Self::Integer(_))
    }
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// On-disk dtype.
    pub dtype: DiskDType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range of the tensor's data in its file (absolute offsets).
    pub bytes: Range<u64>,
}

/// The weight files of a model directory and their tensors (headers only).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Weight files, in load order.
    pub files: Vec<PathBuf>,
    /// File key -> entry.
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// How tensor names in the files map onto the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KeyLayout {
    /// Hub checkpoints written by transformers 4.x: `language_model.model.*`,
    /// `language_model.lm_head.*`, `vision_tower.vision_model.*`.
    Hub4,
    /// transformers 5.x with `save_original_format=False`: `model.language_model.*`,
    /// `lm_head.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`.
    Hf5,
    /// transformers 5.x default save (`save_original_format=True`): `language_model.model.*`,
    /// `language_model.lm_head.*`, `vision_tower.*` without the `vision_model.` segment.
    Hf5Original,
}

impl KeyLayout {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hub4 => "hub (transformers 4.x)",
            Self::Hf5 => "transformers 5.x",
            Self::Hf5Original => "transformers 5.x original-format",
        }
    }

    /// The file key of a model (canonical) key in this layout.
    pub fn file_key(self, canonical: &str) -> String {
        let (prefix, rest) = canonical.split_once('.').unwrap_or((canonical, ""));
        match (self, prefix) {
            (Self::Hub4, "vision_tower") => format!("vision_tower.vision_model.{rest}"),
            (Self::Hub4 | Self::Hf5Original, "language_model") => format!("language_model.model.{rest}"),
            (Self::Hub4 | Self::Hf5Original, "lm_head") => format!("language_model.lm_head.{rest}"),
            (Self::Hf5, "vision_tower" | "language_model" | "multi_modal_projector") => {
                format!("model.{canonical}")
            }
            _ => canonical.to_string(),
        }
    }
}

/// The model (canonical) key of a file key in any known layout, or `None` for keys
/// outside the model's namespaces.
pub fn canonical_key(file_key: &str) -> Option<String> {
    let strip = |k: &str, p: &str| k.strip_prefix(p).map(str::to_string);
    if let Some(rest) = strip(file_key, "model.vision_tower.").or_else(|| strip(file_key, "vision_tower.")) {
        let rest = rest
            .strip_prefix("vision_model.")
            .map(str::to_string)
            .unwrap_or(rest);
        return Some(format!("vision_tower.{rest}"));
    }
    if let Some(rest) = strip(file_key, "language_model.lm_head.") {
        return Some(format!("lm_head.{rest}"));
    }
    if let Some(rest) =
        strip(file_key, "model.language_model.").or_else(|| strip(file_key, "language_model.model."))
    {
        return Some(format!("language_model.{rest}"));
    }
    if let Some(rest) = strip(file_key, "model.multi_modal_projector.") {
        return Some(format!("multi_modal_projector.{rest}"));
    }
    if file_key.starts_with("multi_modal_projector.") || file_key.starts_with("lm_head.") {
        return Some(file_key.to_string());
    }
    None
}

impl Checkpoint {
    /// Finds and reads the headers of the weight files in `dir`:
    /// `model.safetensors.index.json` (sharded) or `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, ConvertError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index.is_file() {
            shards_from_index(&index)?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(ConvertError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut tensors = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for (key, tensor) in read_header(file)? {
                if tensors.contains_key(&key) {
                    return Err(ConvertError::DuplicateTensor {
                        key,
                        file: file.clone(),
                    });
                }
                tensors.insert(
                    key,
                    TensorEntry {
                        file: i,
                        dtype: tensor.dtype,
                        shape: tensor.shape,
                        bytes: tensor.bytes,
                    },
                );
            }
        }
        Ok(Self { files, tensors })
    }

    /// Detects the key layout from the tensor names.
    pub fn layout(&self) -> Result<KeyLayout, ConvertError> {
        let has = |p: &str| self.tensors.keys().any(|k| k.starts_with(p));
        if has("model.language_model.") || has("model.vision_tower.") {
            Ok(KeyLayout::Hf5)
        } else if has("vision_tower.vision_model.") {
            Ok(KeyLayout::Hub4)
        } else if has("language_model.model.") || has("vision_tower.") {
            Ok(KeyLayout::Hf5Original)
        } else {
            Err(ConvertError::UnknownLayout {
                sample: self.tensors.keys().take(5).cloned().collect(),
            })
        }
    }

    /// Distinct on-disk dtypes of float tensors.
    pub fn float_dtypes(&self) -> Vec<DiskDType> {
        let mut d: Vec<DiskDType> = self
            .tensors
            .values()
            .map(|t| t.dtype)
            .filter(|d| d.is_float())
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// Entry for a model (canonical) key, whatever the layout.
    pub fn find(&self, layout: KeyLayout, canonical: &str) -> Option<(String, &TensorEntry)> {
        let key = layout.file_key(canonical);
        self.tensors.get(&key).map(|e| (key, e))
    }
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let text = std::fs::read_to_string(index).map_err(|source| ConvertError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (key, name) in parse_index(&text, index)? {
        let path = dir.join(name);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(ConvertError::MissingShard { shard: path, key });
            }
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses `model.safetensors.index.json` (read from `index`, named in errors): the
/// `(tensor key, shard file name)` pairs of its `weight_map`, each shard a plain file name
/// inside the model directory. Pure, so that it can be fuzzed.
pub fn parse_index(text: &str, index: &Path) -> Result<Vec<(String, String)>, ConvertError> {
    let bad = |reason: String| ConvertError::BadIndex {
        path: index.to_path_buf(),
        reason,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut entries = Vec::with_capacity(map.len());
    for (key, file) in map {
        let name = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry {key:?} is not a file name")))?;
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with("..") {
            return Err(bad(format!(
                "weight_map entry {key:?} names a path outside the model directory: {name:?}"
            )));
        }
        entries.push((key.clone(), name.to_string()));
    }
    if entries.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(entries)
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// On-disk dtype.
    pub dtype: DiskDType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range of the data in the file (absolute offsets, already checked to lie inside
    /// the file and to match shape and dtype).
    pub bytes: Range<u64>,
}

/// The tensors a safetensors header lists, by key, in header order.
pub type Header = Vec<(String, HeaderTensor)>;

/// Reads and validates the header of an in-memory safetensors file (`path` only names it
/// in errors), as [`read_header`] does for a file on disk.
pub fn parse_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Header, ConvertError> {
    let file_len = bytes.len() as u64;
    let bad = |reason: String| ConvertError::BadSafetensors {
        file: path.to_path_buf(),
        reason,
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad(format!("file is {file_len} bytes, too short for a header")))?;
    let header_len = checked_header_len(u64::from_le_bytes(len_bytes), file_len, path)?;
    let header = &bytes[8..8 + header_len];
    parse_header(header, 8 + header_len as u64, file_len, path)
}

/// The header length field, refused when it is beyond the file or [`MAX_HEADER_BYTES`].
fn checked_header_len(header_len: u64, file_len: u64, path: &Path) -> Result<usize, ConvertError> {
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(ConvertError::BadSafetensors {
            file: path.to_path_buf(),
            reason: format!("header length {header_len} is beyond the file ({file_len} bytes)"),
        });
    }
    Ok(header_len as usize)
}

/// Reads and validates one safetensors header without touching the tensor data.
pub fn read_header(path: &Path) -> Result<Header, ConvertError> {
    let io = |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| ConvertError::BadSafetensors {
        file: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad(format!("file is {file_len} bytes, too short for a header")))?;
    let header_len = checked_header_len(u64::from_le_bytes(len_bytes), file_len, path)?;
    let mut header = vec![0u8; header_len];
    file.read_exact(&mut header).map_err(io)?;
    parse_header(&header, 8 + header_len as u64, file_len, path)
}

/// Validates the JSON header of a safetensors file of `file_len` bytes whose data section
/// starts at `data_start`: known dtypes, shapes, offsets inside the data, byte lengths
/// agreeing with the shapes, no overlaps.
fn parse_header(header: &[u8], data_start: u64, file_len: u64, path: &Path) -> Result<Header, ConvertError> {
    let data_len = file_len - data_start;
    let bad = |reason: String| ConvertError::BadSafetensors {
        file: path.to_path_buf(),
        reason,
    };
    let value: Value = serde_json::from_slice(header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut out = Vec::with_capacity(obj.len());
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    for (key, entry) in obj {
        if key == "__metadata__" {
            continue;
        }
        let dtype_name = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor {key:?} has no dtype")))?;
        let dtype = DiskDType::parse(dtype_name).ok_or_else(|| ConvertError::UnsupportedDtype {
            key: key.clone(),
            dtype: dtype_name.to_string(),
            file: path.to_path_buf(),
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("tensor {key:?} has no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("tensor {key:?} has a shape that is not a list of sizes")))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor {key:?} has no valid data_offsets")))?;
        let (begin, end) = offsets;
        if begin > end || end > data_len {
            return Err(bad(format!(
                "tensor {key:?} has offsets [{begin}, {end}] past the end of the data ({data_len} bytes)"
            )));
        }
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let expected = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
        if expected != Some(end - begin) {
            return Err(bad(format!(
                "tensor {key:?}: shape {shape:?} of {} needs {} bytes but its offsets span {}",
                dtype.name(),
                expected.map_or("too many".to_string(), |e| e.to_string()),
                end - begin
            )));
        }
        spans.push((begin, end, key.clone()));
        out.push((
            key.clone(),
            HeaderTensor {
                dtype,
                shape,
                bytes: data_start + begin..data_start + end,
            },
        ));
    }
    spans.sort();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(bad(format!(
                "tensors {:?} and {:?} overlap",
                pair[0].2, pair[1].2
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_keys_of_every_layout() {
        let cases = [
            (
                "vision_tower.vision_model.encoder.layers.0.fc1.weight",
                "vision_tower.encoder.layers.0.fc1.weight",
            ),
            (
                "vision_tower.encoder.layers.0.fc1.weight",
                "vision_tower.encoder.layers.0.fc1.weight",
            ),
            (
                "model.vision_tower.pre_layrnorm.weight",
                "vision_tower.pre_layrnorm.weight",
            ),
            (
                "language_model.model.layers.1.mlp.up_proj.weight",
                "language_model.layers.1.mlp.up_proj.weight",
            ),
            ("model.language_model.norm.weight", "language_model.norm.weight"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (
                "model.multi_modal_projector.linear_1.bias",
                "multi_modal_projector.linear_1.bias",
            ),
            (
                "multi_modal_projector.linear_1.bias",
                "multi_modal_projector.linear_1.bias",
            ),
        ];
        for (file, canonical) in cases {
            assert_eq!(canonical_key(file).as_deref(), Some(canonical), "{file}");
        }
        assert_eq!(canonical_key("something.else"), None);
        for layout in [KeyLayout::Hub4, KeyLayout::Hf5, KeyLayout::Hf5Original] {
            for (_, canonical) in cases {
                assert_eq!(
                    canonical_key(&layout.file_key(canonical)).as_deref(),
                    Some(canonical)
                );
            }
        }
    }
}
