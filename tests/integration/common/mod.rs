//! Shared helpers for the integration tests: fixture paths and reference tensors.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// The tiny checkpoints made by `scripts/make_fixtures.py`.
pub const FIXTURES: [&str; 4] = [
    "tiny-5x-f32",
    "tiny-hub-bf16-sharded",
    "tiny-gqa-f16",
    "tiny-hub-tied-dynamic",
];

/// Path of a fixture directory.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A reference tensor recorded with transformers.
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// Reads `reference.safetensors` of a fixture.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(name: &str) -> Self {
        Self::open_file(&fixture(name).join("reference.safetensors"))
    }

    pub fn open_file(path: &std::path::Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    pub fn get(&self, key: &str) -> RefTensor {
        let st = SafeTensors::deserialize(&self.bytes).expect("reference safetensors");
        let view = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("reference tensor {key}"));
        let data = view.data();
        let (f32, i64) = match view.dtype() {
            Dtype::F32 => (
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Vec::new(),
            ),
            Dtype::I64 => (
                Vec::new(),
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            other => panic!("unexpected dtype {other:?}"),
        };
        RefTensor {
            shape: view.shape().to_vec(),
            f32,
            i64,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .expect("reference")
            .tensor(key)
            .is_ok()
    }

    pub fn float<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let t = self.get(key);
        Tensor::from_data(TensorData::new(t.f32, t.shape), device)
    }

    pub fn ids(&self, device: &Device) -> Tensor<2, Int> {
        let t = self.get("input_ids");
        Tensor::from_data(TensorData::new(t.i64, t.shape), device)
    }
}

/// Max |a - b| over two tensors of the same shape.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    let b: Vec<f32> = b
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Max |a - b| over two equally long slices.
pub fn max_slice_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A temporary copy of a fixture directory (files only), to break on purpose.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
    }
    dir
}

/// Runs the `vipllava` binary offline (no hub access) and returns its output.
pub fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vipllava"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run vipllava")
}

/// Last-position logits and `new_tokens` greedy tokens of `tiny` fixture `name` on
/// `device` for the astronaut photo (device comparisons: remote, wgpu).
pub fn logits_and_tokens(name: &str, device: &Device, new_tokens: usize) -> (Vec<f32>, Vec<u32>) {
    use vipllava::generation::GenerationOptions;
    use vipllava::pipeline::{Pipeline, Prompt};
    let pipeline = Pipeline::load(&fixture(name), device, &vipllava::LoadOptions::default()).expect("load");
    let image = vipllava::processor::image::load_image(&fixture("images/astronaut.png")).expect("image");
    let prepared = pipeline
        .prepare(&[image], &Prompt::User("What is in the red box?".into()))
        .expect("prepare");
    let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
    let options = GenerationOptions {
        max_new_tokens: new_tokens,
        ..pipeline.generation_defaults().clone()
    };
    let tokens = pipeline
        .generate(&prepared, &options, |_| {})
        .expect("generate")
        .token_ids;
    (logits, tokens)
}

/// The wgpu device, or `None` (with a note) where this machine has no adapter: the README's
/// test command builds the wgpu tests, and a machine without a Vulkan/Metal driver must still
/// pass it. CI sets `VIPLLAVA_REQUIRE_WGPU=1` (lavapipe installed), where a missing adapter
/// is a failure.
#[cfg(feature = "wgpu")]
pub fn wgpu_device_or_skip() -> Option<Device> {
    match vipllava::open_device("wgpu") {
        Ok(device) => Some(device),
        Err(e) => {
            assert!(
                std::env::var("VIPLLAVA_REQUIRE_WGPU").is_err(),
                "VIPLLAVA_REQUIRE_WGPU is set but wgpu did not open: {e}"
            );
            eprintln!("no wgpu adapter ({e}): test skipped (install mesa-vulkan-drivers)");
            None
        }
    }
}
