//! A directory written under a temporary name and moved into place when complete.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::{OutputError, io};
use super::paths::{absolute, check_separate};
use super::shards::remove_shadowing_shards;

/// Staging directories of this process, removed by the Ctrl-C handler.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Makes staging names unique within the process.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// How a finished [`StagedDir`] lands on its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Landing {
    /// A new directory: the destination must be absent or an empty directory
    /// (`vipllava convert`).
    #[default]
    New,
    /// The directory replaces the destination as a whole if it exists (a training
    /// checkpoint written again).
    Replace,
    /// The files are moved into the destination directory, which may already hold other
    /// files (the fine-tuned model written beside its checkpoints, `vipllava export`); each
    /// replaces the file of the same name, and a sharded `model.safetensors.index.json`
    /// model there is removed when a `model.safetensors` arrives.
    Merge,
}

/// A directory being written under a temporary name next to its destination.
///
/// Dropped without [`StagedDir::commit`] (after an error or a panic), it removes itself.
#[derive(Debug)]
pub struct StagedDir {
    staging: PathBuf,
    destination: PathBuf,
    landing: Landing,
    committed: bool,
}

impl StagedDir {
    /// A new directory at `out` ([`Landing::New`]), checked against the input model
    /// directory `input`.
    pub fn new(out: &Path, input: &Path) -> Result<Self, OutputError> {
        Self::create(out, input, Landing::New)
    }

    /// Checks `out` against `input` ([`check_separate`]) and what `landing` allows to exist
    /// at `out`, then creates the staging directory beside `out`.
    pub fn create(out: &Path, input: &Path, landing: Landing) -> Result<Self, OutputError> {
        check_separate(out, input)?;
        let out_abs = absolute(out)?;
        if out.exists() {
            if !out.is_dir() {
                return Err(match landing {
                    Landing::New => OutputError::Exists(out.to_path_buf()),
                    Landing::Replace | Landing::Merge => OutputError::NotADirectory(out.to_path_buf()),
                });
            }
            let empty = std::fs::read_dir(out).map_err(io(out))?.next().is_none();
            if landing == Landing::New && !empty {
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
        let staging = parent.join(format!(
            ".{name}.partial-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
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
            landing,
            committed: false,
        })
    }

    /// Where to write the files now.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Where the directory lands (absolute).
    pub fn destination(&self) -> &Path {
        &self.destination
    }

    /// Moves the finished directory (or, for [`Landing::Merge`], its files) to the
    /// destination and returns the destination.
    pub fn commit(mut self) -> Result<PathBuf, OutputError> {
        let dest = &self.destination;
        match self.landing {
            Landing::New => {
                if dest.is_dir() {
                    // Checked empty in `create`; an empty directory cannot be renamed over
                    // on every OS.
                    std::fs::remove_dir(dest).map_err(io(dest))?;
                }
                std::fs::rename(&self.staging, dest).map_err(io(dest))?;
            }
            Landing::Replace if dest.exists() => self.swap_in()?,
            Landing::Merge if dest.exists() => self.merge_in()?,
            Landing::Replace | Landing::Merge => {
                std::fs::rename(&self.staging, dest).map_err(io(dest))?;
            }
        }
        self.committed = true;
        forget_staged(&self.staging);
        Ok(self.destination.clone())
    }

    /// [`Landing::Replace`] over an existing destination: the old one is moved aside,
    /// the new one renamed in, the old one removed (or put back if the rename failed).
    fn swap_in(&self) -> Result<(), OutputError> {
        let dest = &self.destination;
        let mut old = self.staging.clone().into_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        std::fs::rename(dest, &old).map_err(io(dest))?;
        if let Err(source) = std::fs::rename(&self.staging, dest) {
            let _ = std::fs::rename(&old, dest);
            return Err(OutputError::Io {
                path: dest.clone(),
                source,
            });
        }
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// [`Landing::Merge`] into an existing destination directory: file by file.
    fn merge_in(&self) -> Result<(), OutputError> {
        let dest = &self.destination;
        remove_shadowing_shards(&self.staging, dest)?;
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.staging).map_err(io(&self.staging))? {
            entries.push(entry.map_err(io(&self.staging))?.file_name());
        }
        // A stable order: the same files land first on every platform.
        entries.sort();
        for name in entries {
            let target = dest.join(&name);
            std::fs::rename(self.staging.join(&name), &target).map_err(io(&target))?;
        }
        std::fs::remove_dir(&self.staging).map_err(io(&self.staging))
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

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn refuses_input_and_nonempty_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        std::fs::create_dir(&input).unwrap();
        std::fs::write(input.join("config.json"), "{}").unwrap();
        for landing in [Landing::New, Landing::Replace, Landing::Merge] {
            for out in [input.clone(), input.join("sub"), root.path().to_path_buf()] {
                assert!(
                    matches!(
                        StagedDir::create(&out, &input, landing),
                        Err(OutputError::OverlapsInput { .. })
                    ),
                    "{landing:?} {}",
                    out.display()
                );
            }
        }
        let other = root.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("x"), "x").unwrap();
        assert!(matches!(
            StagedDir::new(&other, &input),
            Err(OutputError::Exists(_))
        ));
        assert!(matches!(
            StagedDir::create(&other.join("x"), &input, Landing::Merge),
            Err(OutputError::NotADirectory(_))
        ));

        let out = root.path().join("out");
        {
            let staged = StagedDir::new(&out, &input).unwrap();
            std::fs::write(staged.path().join("a"), "a").unwrap();
            // Dropped without commit: as after an error.
        }
        assert!(!out.exists());
        assert_eq!(names(root.path()), ["model", "other"], "nothing else remains");

        let staged = StagedDir::new(&out, &input).unwrap();
        std::fs::write(staged.path().join("a"), "a").unwrap();
        let done = staged.commit().unwrap();
        assert_eq!(std::fs::read_to_string(done.join("a")).unwrap(), "a");
        assert_eq!(std::fs::read_to_string(input.join("config.json")).unwrap(), "{}");
    }

    #[test]
    fn replace_swaps_the_whole_directory() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        std::fs::create_dir(&input).unwrap();
        let out = root.path().join("run/checkpoint-2");
        for content in ["first", "second"] {
            let staged = StagedDir::create(&out, &input, Landing::Replace).unwrap();
            std::fs::write(staged.path().join(content), content).unwrap();
            staged.commit().unwrap();
        }
        assert_eq!(names(&out), ["second"]);
        assert_eq!(names(&root.path().join("run")), ["checkpoint-2"]);
    }

    #[test]
    fn merge_keeps_other_files_and_replaces_shards() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        std::fs::create_dir(&input).unwrap();
        let out = root.path().join("run");
        std::fs::create_dir_all(out.join("checkpoint-1")).unwrap();
        std::fs::write(out.join("config.json"), "old").unwrap();
        std::fs::write(
            out.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(out.join("model-00001.safetensors"), "shard").unwrap();
        {
            let staged = StagedDir::create(&out, &input, Landing::Merge).unwrap();
            std::fs::write(staged.path().join("config.json"), "lost").unwrap();
        }
        assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "old");
        let staged = StagedDir::create(&out, &input, Landing::Merge).unwrap();
        std::fs::write(staged.path().join("config.json"), "new").unwrap();
        std::fs::write(staged.path().join("model.safetensors"), "w").unwrap();
        staged.commit().unwrap();
        assert_eq!(names(&out), ["checkpoint-1", "config.json", "model.safetensors"]);
        assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "new");
        assert_eq!(names(root.path()), ["model", "run"], "no staging left");
        // Merging into a directory that does not exist yet creates it.
        let fresh = root.path().join("fresh");
        let staged = StagedDir::create(&fresh, &input, Landing::Merge).unwrap();
        std::fs::write(staged.path().join("a"), "a").unwrap();
        staged.commit().unwrap();
        assert_eq!(names(&fresh), ["a"]);
    }
}
