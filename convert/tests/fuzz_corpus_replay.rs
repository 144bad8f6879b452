//! Replays the seed corpora of the `model_config`, `safetensors_header` and
//! `safetensors_index` fuzz targets (`fuzz/corpus/<target>/`) through the same calls, so CI
//! exercises them without a nightly toolchain, and checks the seeds give the expected
//! verdicts (a corpus that only held rejects would fuzz nothing useful).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use vipllava_convert::checkpoint::{parse_index, parse_safetensors_bytes};
use vipllava_model::VipLlavaConfig;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read");
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {target}");
    files
}

fn name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn model_config_corpus() {
    let mut parsed = 0;
    for (path, data) in corpus("model_config") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(config) = VipLlavaConfig::from_json_str(text) {
            parsed += 1;
            assert!(!config.resolved_feature_indices().is_empty(), "{}", name(&path));
            assert!(config.num_parameters() > 0);
            let _ = (
                config.vision_layers_used(),
                config.projector_input_width(),
                config.image_seq_len(),
            );
        }
    }
    assert!(parsed >= 5, "the fixture configs must parse ({parsed})");
}

#[test]
fn safetensors_header_corpus() {
    for (path, data) in corpus("safetensors_header") {
        let file = name(&path);
        let result = parse_safetensors_bytes(&data, &path);
        if file.starts_with("overlap") {
            let err = result.expect_err("overlapping tensors must be refused");
            assert!(err.to_string().contains("overlap"), "{file}: {err}");
        } else {
            let header = result.unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(!header.is_empty(), "{file}");
            for (key, tensor) in &header {
                assert!(tensor.bytes.end <= data.len() as u64, "{file}: {key}");
            }
        }
        // Every truncation of a valid file is refused or still consistent, never a panic.
        for cut in 0..data.len() {
            let _ = parse_safetensors_bytes(&data[..cut], &path);
        }
    }
}

#[test]
fn safetensors_index_corpus() {
    for (path, data) in corpus("safetensors_index") {
        let file = name(&path);
        let text = std::str::from_utf8(&data).expect("utf-8 seed");
        let result = parse_index(text, &path);
        if file.starts_with("escape") {
            let err = result.expect_err("a shard outside the directory must be refused");
            assert!(
                err.to_string().contains("outside the model directory"),
                "{file}: {err}"
            );
        } else {
            let entries = result.unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(!entries.is_empty());
        }
    }
}
