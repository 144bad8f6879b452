//! The rule every output obeys: never the input model directory, never nested with it.

use std::path::{Path, PathBuf};

use super::error::{OutputError, io};

/// Refuses an `out` that is `input`, lies inside it or contains it (symbolic links resolved
/// for the parts that exist), so that writing `out` can never touch the input model.
pub fn check_separate(out: &Path, input: &Path) -> Result<(), OutputError> {
    let input_abs = absolute(input)?;
    let out_abs = absolute(out)?;
    if out_abs.starts_with(&input_abs) || input_abs.starts_with(&out_abs) {
        return Err(OutputError::OverlapsInput {
            out: out.to_path_buf(),
            input: input.to_path_buf(),
        });
    }
    Ok(())
}

/// `path` made absolute, its deepest existing ancestor canonicalized (symbolic links
/// resolved) and the rest kept as written.
pub(super) fn absolute(path: &Path) -> Result<PathBuf, OutputError> {
    let abs = std::path::absolute(path).map_err(io(path))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return Ok(rest.iter().rev().fold(canonical, |acc, part| acc.join(part)));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return Ok(abs.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_input_inside_it_and_around_it() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        std::fs::create_dir(&input).unwrap();
        for out in [
            input.clone(),
            input.join("sub"),
            input.join("a/b"),
            root.path().to_path_buf(),
        ] {
            let e = check_separate(&out, &input).unwrap_err();
            assert!(
                matches!(e, OutputError::OverlapsInput { .. }),
                "{}",
                out.display()
            );
            let text = e.to_string();
            assert!(
                text.contains("input model") && text.contains("model directory"),
                "{text}"
            );
        }
        check_separate(&root.path().join("other"), &input).unwrap();
        check_separate(&root.path().join("model2"), &input).unwrap();
    }
}
