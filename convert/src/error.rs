//! Errors of checkpoint loading, each naming the file or tensor key at fault.

use std::path::PathBuf;

use vipllava_model::ConfigError;

/// What went wrong while reading a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is absent.
    #[error("no config.json in {dir}: point --model at a HuggingFace VipLlava model directory")]
    NoConfig {
        /// The model directory.
        dir: PathBuf,
    },
    /// `config.json` cannot be used.
    #[error("{path}: {source}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// Neither `model.safetensors` nor a sharded index.
    #[error(
        "no weights in {dir}: expected model.safetensors or model.safetensors.index.json with its shards"
    )]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// A malformed safetensors file.
    #[error("{file} is not a valid safetensors file: {reason}")]
    BadSafetensors {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A malformed `model.safetensors.index.json`.
    #[error("{path} is not a valid shard index: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The index names a shard that is not there.
    #[error("shard {shard} (holding {key:?}) named by model.safetensors.index.json does not exist")]
    MissingShard {
        /// The missing file.
        shard: PathBuf,
        /// A tensor it should hold.
        key: String,
    },
    /// The same tensor appears in two shards.
    #[error("tensor {key:?} appears twice (again in {file})")]
    DuplicateTensor {
        /// The key.
        key: String,
        /// The second file.
        file: PathBuf,
    },
    /// A dtype we cannot read.
    #[error("tensor {key:?} in {file} has unsupported dtype {dtype} (supported: F32, F16, BF16, F64)")]
    UnsupportedDtype {
        /// The key.
        key: String,
        /// The dtype name.
        dtype: String,
        /// The file.
        file: PathBuf,
    },
    /// Tensor names match no known layout.
    #[error(
        "the tensor names match no known VipLlava layout (hub 4.x `language_model.model.*`, transformers 5.x `model.language_model.*`); first keys: {sample:?}"
    )]
    UnknownLayout {
        /// A few keys from the file.
        sample: Vec<String>,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor {key:?} (expected shape {expected:?}){hint}")]
    MissingTensor {
        /// File key in the detected layout.
        key: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Extra guidance.
        hint: String,
    },
    /// `--quantize-lm-head` on a checkpoint whose `lm_head` is the token embeddings.
    #[error(
        "this checkpoint ties lm_head to the token embeddings (tie_word_embeddings): quantizing lm_head \
         would quantize the embeddings as well, which is not supported; load it without --quantize-lm-head"
    )]
    TiedLmHead,
    /// A tensor has another shape than the config implies.
    #[error("tensor {key:?} has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch {
        /// File key.
        key: String,
        /// Shape from the config.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// Burn's store failed on a file.
    #[error("loading {file}: {message}")]
    Store {
        /// The file.
        file: PathBuf,
        /// Burn's message.
        message: String,
    },
    /// Writing a converted checkpoint failed.
    #[error("writing {path}: {message}")]
    Write {
        /// The destination.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}
