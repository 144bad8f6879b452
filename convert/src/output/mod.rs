//! Writing model directories without losing data: the one writer behind `convert`,
//! `export` and training checkpoints.
//!
//! A [`StagedDir`] is built under a temporary name beside its destination and lands there
//! only when everything was written ([`Landing`] says how). An error, a panic, or Ctrl-C
//! (for binaries that call [`remove_staged_on_interrupt`]) leaves no partial directory, and
//! the destination may never be, contain or lie inside the input model directory
//! ([`check_separate`]).

mod atomic_file;
mod error;
mod model_dir;
mod paths;
mod shards;
mod staged;

pub use atomic_file::write_file_atomic;
pub use error::OutputError;
pub use model_dir::{ConvertDirError, convert_model_dir};
pub use paths::check_separate;
pub use staged::{Landing, StagedDir, remove_staged_on_interrupt};
