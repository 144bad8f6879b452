//! `--model` resolution: a local directory, or a HuggingFace hub id downloaded through
//! `hf-hub` into the standard HF cache (honours `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE`).

use std::path::{Path, PathBuf};

/// The default checkpoint.
pub const DEFAULT_MODEL: &str = "llava-hf/vip-llava-7b-hf";

/// Files a VipLlava repo may hold besides the weights (absent ones are skipped).
const OPTIONAL_FILES: [&str; 8] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "added_tokens.json",
];

/// Why a model could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Not a directory and not shaped like `owner/name`.
    #[error("{0:?} is neither a model directory nor a hub id like `llava-hf/vip-llava-7b-hf`")]
    NotAModel(String),
    /// Offline mode and the files are not cached.
    #[error(
        "{repo} is not in the local HF cache ({cache}) and HF_HUB_OFFLINE is set: download it on a connected machine (e.g. `huggingface-cli download {repo}`) or point --model at a local directory"
    )]
    NotCached {
        /// Repo id.
        repo: String,
        /// Cache directory.
        cache: String,
    },
    /// The download failed.
    #[error(
        "downloading {file} of {repo} failed: {message}. If this machine is offline, set HF_HUB_OFFLINE=1 to use the cache, or point --model at a local directory"
    )]
    Download {
        /// Repo id.
        repo: String,
        /// File name.
        file: String,
        /// hf-hub's message.
        message: String,
    },
    /// The index names no shards.
    #[error("{0}")]
    BadIndex(String),
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
}

/// How far a hub download has come, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The file being downloaded.
    pub file: String,
    /// Bytes of it received so far.
    pub received: u64,
    /// Its size in bytes.
    pub total: u64,
}

/// Resolves `--model`: an existing directory is used as is; `owner/name` is fetched into
/// (or, offline, looked up in) the HF cache and its snapshot directory returned.
pub fn resolve_model(spec: &str) -> Result<PathBuf, HubError> {
    resolve_with(spec, None)
}

/// [`resolve_model`] that reports each file's download progress to `on_progress`
/// instead of drawing a terminal progress bar (for a GUI). Cached files report nothing.
pub fn resolve_model_with_progress(
    spec: &str,
    mut on_progress: impl FnMut(&DownloadProgress),
) -> Result<PathBuf, HubError> {
    resolve_with(spec, Some(&mut on_progress))
}

type ProgressSink<'a> = &'a mut dyn FnMut(&DownloadProgress);

fn resolve_with(spec: &str, on_progress: Option<ProgressSink<'_>>) -> Result<PathBuf, HubError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\');
    if !looks_like_id {
        return Err(HubError::NotAModel(spec.to_string()));
    }
    if offline() {
        return from_cache(spec);
    }
    download(spec, on_progress)
}

/// Forwards hf-hub's byte counts to a [`DownloadProgress`] callback.
struct Reporter<'s, 'a> {
    sink: &'s mut ProgressSink<'a>,
    state: DownloadProgress,
}

impl hf_hub::api::Progress for Reporter<'_, '_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.state = DownloadProgress {
            file: filename.to_string(),
            received: 0,
            total: size as u64,
        };
        (self.sink)(&self.state);
    }

    fn update(&mut self, size: usize) {
        self.state.received += size as u64;
        (self.sink)(&self.state);
    }

    fn finish(&mut self) {
        self.state.received = self.state.total;
        (self.sink)(&self.state);
    }
}

fn from_cache(repo_id: &str) -> Result<PathBuf, HubError> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(repo_id.to_string());
    let not_cached = || HubError::NotCached {
        repo: repo_id.to_string(),
        cache: cache.path().display().to_string(),
    };
    let config = repo.get("config.json").ok_or_else(not_cached)?;
    let has_weights =
        repo.get("model.safetensors").is_some() || repo.get("model.safetensors.index.json").is_some();
    if !has_weights || repo.get("tokenizer.json").is_none() {
        return Err(not_cached());
    }
    config.parent().map(Path::to_path_buf).ok_or_else(not_cached)
}

fn download(repo_id: &str, mut on_progress: Option<ProgressSink<'_>>) -> Result<PathBuf, HubError> {
    let err = |file: &str, e: hf_hub::api::sync::ApiError| HubError::Download {
        repo: repo_id.to_string(),
        file: file.to_string(),
        message: e.to_string(),
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(on_progress.is_none())
        .build()
        .map_err(|e| err("(connection)", e))?;
    let api_repo = api.model(repo_id.to_string());
    let cache = hf_hub::Cache::from_env().model(repo_id.to_string());
    let mut repo = Fetcher {
        api: &api_repo,
        cache: &cache,
        sink: &mut on_progress,
    };
    let config = repo.get("config.json").map_err(|e| err("config.json", e))?;
    repo.get("tokenizer.json").map_err(|e| err("tokenizer.json", e))?;
    for file in OPTIONAL_FILES {
        // Absent optional files are normal (each repo generation ships a different set).
        let _ = repo.get(file);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| HubError::BadIndex(format!("{}: {e}", index.display())))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| HubError::BadIndex(format!("{}: {e}", index.display())))?;
            let mut shards: Vec<String> = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            if shards.is_empty() {
                return Err(HubError::BadIndex(format!("{} names no shards", index.display())));
            }
            for shard in shards {
                repo.get(&shard).map_err(|e| err(&shard, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| err("model.safetensors", e))?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| HubError::NotAModel(repo_id.to_string()))
}

/// `get` from the cache or the hub, with progress reported when a sink is given.
struct Fetcher<'r, 's, 'a> {
    api: &'r hf_hub::api::sync::ApiRepo,
    cache: &'r hf_hub::CacheRepo,
    sink: &'s mut Option<ProgressSink<'a>>,
}

impl Fetcher<'_, '_, '_> {
    fn get(&mut self, file: &str) -> Result<PathBuf, hf_hub::api::sync::ApiError> {
        match self.sink.as_mut() {
            None => self.api.get(file),
            Some(sink) => {
                if let Some(path) = self.cache.get(file) {
                    return Ok(path);
                }
                let reporter = Reporter {
                    sink,
                    state: DownloadProgress {
                        file: file.to_string(),
                        received: 0,
                        total: 0,
                    },
                };
                self.api.download_with_progress(file, reporter)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_directories_and_bad_specs() {
        let dir = env!("CARGO_MANIFEST_DIR");
        assert_eq!(resolve_model(dir).unwrap(), PathBuf::from(dir));
        assert!(matches!(
            resolve_model("./no/such/dir/here"),
            Err(HubError::NotAModel(_))
        ));
        assert!(matches!(resolve_model("not-a-repo"), Err(HubError::NotAModel(_))));
    }
}
