//! Why an output cannot be written.

use std::path::{Path, PathBuf};

/// Why an output directory cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output is the input model directory, lies inside it, or contains it.
    #[error(
        "refusing to write to {}: it would overwrite or nest with the input model directory {} (choose another --out so the source model is never overwritten)",
        out.display(),
        input.display()
    )]
    OverlapsInput {
        /// The requested output.
        out: PathBuf,
        /// The input model directory.
        input: PathBuf,
    },
    /// A new directory was asked for, and the output exists and is not an empty directory.
    #[error("{} already exists and is not empty; remove it or choose another --out", .0.display())]
    Exists(PathBuf),
    /// The output exists and is not a directory.
    #[error("{} exists and is not a directory; remove it or choose another --out", .0.display())]
    NotADirectory(PathBuf),
    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Maps an OS error on `path` to [`OutputError::Io`].
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}
