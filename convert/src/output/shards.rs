//! A sharded safetensors model left in a directory must not shadow a new single file.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use super::error::{OutputError, io};

/// The single-file weights name.
const SINGLE: &str = "model.safetensors";
/// The index of a sharded model.
const INDEX: &str = "model.safetensors.index.json";

/// When `staged` holds a `model.safetensors`, removes from `dir` a sharded model (its index
/// and the shards the index lists, plain file names only) that loaders would prefer or mix
/// with the new file.
pub(super) fn remove_shadowing_shards(staged: &Path, dir: &Path) -> Result<(), OutputError> {
    let index = dir.join(INDEX);
    if !staged.join(SINGLE).is_file() || !index.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&index).map_err(io(&index))?;
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text)
        && let Some(Value::Object(map)) = m.get("weight_map")
    {
        let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        for shard in shards {
            let path = dir.join(shard);
            if Path::new(shard).components().count() == 1 && path.is_file() {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
    }
    std::fs::remove_file(&index).map_err(io(&index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_listed_shards_only_when_a_single_file_replaces_them() {
        let root = tempfile::tempdir().unwrap();
        let (staged, dir) = (root.path().join("staged"), root.path().join("dir"));
        std::fs::create_dir(&staged).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let index =
            r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors", "c": "../x"}}"#;
        std::fs::write(dir.join(INDEX), index).unwrap();
        for f in ["model-1.safetensors", "model-2.safetensors", "other.safetensors"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        std::fs::write(root.path().join("x"), "x").unwrap();
        // Nothing staged that shadows: nothing removed.
        remove_shadowing_shards(&staged, &dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4);
        std::fs::write(staged.join(SINGLE), "w").unwrap();
        remove_shadowing_shards(&staged, &dir).unwrap();
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["other.safetensors"]);
        assert!(
            root.path().join("x").is_file(),
            "only plain names inside the directory"
        );
    }
}
