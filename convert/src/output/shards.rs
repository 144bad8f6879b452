//! Weights left in a directory must not shadow or mix with newly landed ones: a new single
//! file replaces an old sharded model, new shards replace an old single file and the old
//! shards they do not overwrite.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use super::error::{OutputError, io};

/// The single-file weights name.
const SINGLE: &str = "model.safetensors";
/// The index of a sharded model.
const INDEX: &str = "model.safetensors.index.json";

/// The shard file names an index in `dir` lists (plain names inside `dir` only).
fn indexed_shards(dir: &Path) -> Result<BTreeSet<String>, OutputError> {
    let index = dir.join(INDEX);
    if !index.is_file() {
        return Ok(BTreeSet::new());
    }
    let text = std::fs::read_to_string(&index).map_err(io(&index))?;
    let mut shards = BTreeSet::new();
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text)
        && let Some(Value::Object(map)) = m.get("weight_map")
    {
        for shard in map.values().filter_map(Value::as_str) {
            if Path::new(shard).components().count() == 1 {
                shards.insert(shard.to_string());
            }
        }
    }
    Ok(shards)
}

/// Before `staged`'s files merge into `dir`, removes the weights of `dir` that loaders would
/// prefer to or mix with them: when `staged` holds a `model.safetensors`, the old index and
/// its shards; when it holds an index, an old `model.safetensors` and the old shards the
/// new index does not list (the listed ones are overwritten).
pub(super) fn remove_shadowing_shards(staged: &Path, dir: &Path) -> Result<(), OutputError> {
    let new_single = staged.join(SINGLE).is_file();
    let new_index = staged.join(INDEX).is_file();
    if !new_single && !new_index {
        return Ok(());
    }
    let keep = if new_index {
        indexed_shards(staged)?
    } else {
        BTreeSet::new()
    };
    let mut stale: Vec<String> = indexed_shards(dir)?
        .into_iter()
        .filter(|s| !keep.contains(s))
        .collect();
    if new_single {
        stale.push(INDEX.to_string());
    } else {
        stale.push(SINGLE.to_string());
    }
    for name in stale {
        let path = dir.join(&name);
        if path.is_file() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
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

        // New shards: the old single file and the old shards they do not overwrite go.
        std::fs::remove_file(staged.join(SINGLE)).unwrap();
        std::fs::write(dir.join(SINGLE), "w").unwrap();
        std::fs::write(
            dir.join(INDEX),
            r#"{"weight_map": {"a": "old-1.safetensors", "b": "new-1.safetensors"}}"#,
        )
        .unwrap();
        for f in ["old-1.safetensors", "new-1.safetensors"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        std::fs::write(
            staged.join(INDEX),
            r#"{"weight_map": {"a": "new-1.safetensors"}}"#,
        )
        .unwrap();
        remove_shadowing_shards(&staged, &dir).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [INDEX, "new-1.safetensors", "other.safetensors"]);
    }
}
