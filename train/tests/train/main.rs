//! The training crate's integration tests, one binary (each test binary links all of Burn):
//! parity with PyTorch (`parity`) and work at scale (`scale`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, TensorData};
use vipllava_train::EncodedSample;

mod parity;
mod scale;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn device() -> Device {
    Device::flex()
}

fn f32s(d: &TensorData) -> Vec<f32> {
    d.clone().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// For the Python export checks (`scripts/make_train_fixtures.py --check-export`,
/// `scripts/check_export.py`): when the variable `var` names a directory, it receives the
/// export's files and `rust_logits.safetensors` (the sample's input and our logits).
fn keep_export_for_python(var: &str, export: &Path, sample: &EncodedSample, logits: &[f32]) {
    let Ok(dir) = std::env::var(var) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(export).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let n = sample.input_ids.len();
    let p = &sample.pixel_values;
    let ids: Vec<f32> = sample.input_ids.iter().map(|&i| i as f32).collect();
    let mut m = BTreeMap::new();
    m.insert("input_ids".to_string(), TensorData::new(ids, [1, n]));
    m.insert(
        "pixel_values".to_string(),
        TensorData::new(p.data.clone(), [1, 3, p.height, p.width]),
    );
    m.insert(
        "logits".to_string(),
        TensorData::new(logits.to_vec(), [1, n, logits.len() / n]),
    );
    vipllava_train::trainer::write_safetensors(&dir.join("rust_logits.safetensors"), &m, None).unwrap();
}
