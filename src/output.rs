//! Writing model directories without losing data.
//!
//! [`StagedDir`] builds an output directory under a temporary name beside its destination
//! and renames it into place only when everything was written. An error, a panic, or Ctrl-C
//! (for binaries that call [`remove_staged_on_interrupt`]) leaves no partial directory, and
//! the destination may never be the input model directory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why an output directory cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output is the input model directory (or inside it, or contains it).
    #[error(
        "refusing to write to {out}: it would overwrite or nest with the input model {input} (choose another --out)"
    )]
    OverlapsInput {
        /// The requested output.
        out: PathBuf,
        /// The input model directory.
        input: PathBuf,
    },
    /// The output exists and is not an empty directory.
    #[error("{0} already exists and is not empty; remove it or choose another --out")]
    Exists(PathBuf),
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Staging directories of this process, removed by the Ctrl-C handler.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A directory being written under a temporary name next to its destination.
#[derive(Debug)]
pub struct StagedDir {
    staging: PathBuf,
    destination: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Checks `out` against `input` and creates the staging directory beside `out`.
    pub fn new(out: &Path, input: &Path) -> Result<Self, OutputError> {
        let input_abs = absolute(input)?;
        let out_abs = absolute(out)?;
        if out_abs.starts_with(&input_abs) || input_abs.starts_with(&out_abs) {
            return Err(OutputError::OverlapsInput {
                out: out.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
        if out.exists() {
            let empty_dir = out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_none();
            if !empty_dir {
                return Err(OutputError::Exists(out.to_path_buf()));
            }
        }
        let parent = out_abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let name = out_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        if let Ok(mut staged) = STAGED.lock() {
            staged.push(staging.clone());
        }
        Ok(Self {
            staging,
            destination: out_abs,
            committed: false,
        })
    }

    /// Where to write the files now.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the finished directory to its destination.
    pub fn commit(mut self) -> Result<PathBuf, OutputError> {
        if self.destination.is_dir() {
            // Checked empty in `new`; an empty directory cannot be renamed over on every OS.
            std::fs::remove_dir(&self.destination).map_err(io(&self.destination))?;
        }
        std::fs::rename(&self.staging, &self.destination).map_err(io(&self.destination))?;
        self.committed = true;
        forget_staged(&self.staging);
        Ok(self.destination.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
            forget_staged(&self.staging);
        }
    }
}

fn forget_staged(path: &Path) {
    if let Ok(mut staged) = STAGED.lock() {
        staged.retain(|p| p != path);
    }
}

fn absolute(path: &Path) -> Result<PathBuf, OutputError> {
    // Canonicalize what exists (resolving symlinks), keep the rest as written.
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let abs = std::path::absolute(path).map_err(io(path))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(p) => Ok(p.join(name)),
            Err(_) => Ok(abs.clone()),
        },
        _ => Ok(abs),
    }
}

/// Removes every unfinished [`StagedDir`] of this process (for a Ctrl-C handler, which then
/// exits: destructors do not run on a signal).
pub fn remove_staged_on_interrupt() {
    if let Ok(staged) = STAGED.lock() {
        for path in staged.iter() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_input_and_nonempty_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        std::fs::create_dir(&input).unwrap();
        std::fs::write(input.join("config.json"), "{}").unwrap();
        for out in [input.clone(), input.join("sub"), root.path().to_path_buf()] {
            assert!(
                matches!(
                    StagedDir::new(&out, &input),
                    Err(OutputError::OverlapsInput { .. })
                ),
                "{}",
                out.display()
            );
        }
        let other = root.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("x"), "x").unwrap();
        assert!(matches!(
            StagedDir::new(&other, &input),
            Err(OutputError::Exists(_))
        ));

        let out = root.path().join("out");
        {
            let staged = StagedDir::new(&out, &input).unwrap();
            std::fs::write(staged.path().join("a"), "a").unwrap();
            // Dropped without commit: as after an error.
        }
        assert!(!out.exists());
        let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "only model/ and other/ remain");

        let staged = StagedDir::new(&out, &input).unwrap();
        std::fs::write(staged.path().join("a"), "a").unwrap();
        let done = staged.commit().unwrap();
        assert_eq!(std::fs::read_to_string(done.join("a")).unwrap(), "a");
        assert_eq!(std::fs::read_to_string(input.join("config.json")).unwrap(), "{}");
    }
}

/// Why [`convert_model_dir`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertDirError {
    /// The output directory.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// Loading or saving the weights.
    #[error(transparent)]
    Convert(#[from] vipllava_convert::ConvertError),
}

/// Files of a HF model directory that are weights (not copied into a burnpack directory).
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin")
        || name.ends_with(".bin.index.json")
        || name == vipllava_convert::BURNPACK_WEIGHTS
}

/// Converts the model in `input` into a Burn-native directory at `out`: `model.bpk` in the
/// requested dtype (and quantization) plus every non-weight file of `input` (config,
/// tokenizer, processor and generation files), so that `out` loads in `generate` like the
/// original. Written through a [`StagedDir`]: nothing appears at `out` unless all succeeded.
pub fn convert_model_dir(
    input: &Path,
    out: &Path,
    device: &burn::tensor::Device,
    options: &vipllava_convert::LoadOptions,
) -> Result<PathBuf, ConvertDirError> {
    let staged = StagedDir::new(out, input)?;
    let loaded = vipllava_convert::load_model(input, device, options)?;
    vipllava_convert::save_burnpack(&loaded.model, &loaded.config, staged.path())?;
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
