//! `vipllava convert`: a HF model directory into a Burn-native one.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use super::error::{OutputError, io};
use super::staged::StagedDir;
use crate::{BURNPACK_WEIGHTS, ConvertError, LoadOptions, load_model, save_burnpack};

/// Why [`convert_model_dir`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertDirError {
    /// The output directory.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// Loading or saving the weights.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// Files of a HF model directory that are weights (not copied into a burnpack directory).
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin")
        || name.ends_with(".bin.index.json")
        || name == BURNPACK_WEIGHTS
}

/// Converts the model in `input` into a Burn-native directory at `out`: `model.bpk` in the
/// requested dtype (and quantization) plus every non-weight file of `input` (config,
/// tokenizer, processor and generation files), so that `out` loads in `generate` like the
/// original. Written through a [`StagedDir`]: nothing appears at `out` unless all succeeded.
pub fn convert_model_dir(
    input: &Path,
    out: &Path,
    device: &Device,
    options: &LoadOptions,
) -> Result<PathBuf, ConvertDirError> {
    let staged = StagedDir::new(out, input)?;
    let loaded = load_model(input, device, options)?;
    save_burnpack(&loaded.model, &loaded.config, staged.path())?;
    let entries = std::fs::read_dir(input).map_err(io(input))?;
    for entry in entries {
        let entry = entry.map_err(io(input))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_file() && !is_weight_file(&name) && !name.starts_with('.') {
            let target = staged.path().join(&name);
            // The burnpack's own resolved config is already written.
            if target.exists() {
                continue;
            }
            std::fs::copy(&path, &target).map_err(io(&path))?;
        }
    }
    Ok(staged.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_not_copied() {
        for name in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.bpk",
        ] {
            assert!(is_weight_file(name), "{name}");
        }
        for name in ["config.json", "tokenizer.json", "chat_template.jinja"] {
            assert!(!is_weight_file(name), "{name}");
        }
    }
}
