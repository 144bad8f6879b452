//! Text side of the processor: the checkpoint's tokenizer, its Jinja chat template
//! rendered as transformers renders it, and the `<image>` placeholder expansion.
//!
//! The JSON side files (`tokenizer_config.json`, `chat_template.json`,
//! `processor_config.json`) are read into serde-derived raw structs and then resolved
//! into the types below.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod image_tokens;
mod template;
mod tokenizer;
mod tokenizer_config;

pub use image_tokens::{ImageTokenConfig, VisionFeatureSelectStrategy, VisionInput};
pub use template::{ChatMessage, ChatTemplate, ContentPart};
pub use tokenizer::TextTokenizer;

/// Errors of tokenizer, chat template and prompt handling.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.json` is absent.
    #[error("no tokenizer.json in {dir}")]
    NoTokenizer {
        /// The model directory.
        dir: PathBuf,
    },
    /// `tokenizer.json` cannot be parsed.
    #[error("{path} is not a valid tokenizer: {reason}")]
    BadTokenizer {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A JSON side file (`tokenizer_config.json`, `processor_config.json`, ...) is not JSON.
    #[error("{path} is not valid: {source}")]
    BadJson {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field of a JSON side file has the wrong type or value.
    #[error("{path} is not valid: `{field}` {problem}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// The field path (`patch_size`).
        field: String,
        /// What is wrong, e.g. `must be positive`.
        problem: String,
    },
    /// `chat_template.json` holds no `chat_template` string.
    #[error("{path} is not valid: no `chat_template` string")]
    NoTemplateString {
        /// The file.
        path: PathBuf,
    },
    /// A `vision_feature_select_strategy` other than `default` and `full`.
    #[error(
        "unknown vision_feature_select_strategy {value:?}{}: expected \"default\" or \"full\"",
        path.as_deref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
    )]
    UnknownStrategy {
        /// The value found.
        value: String,
        /// The file it came from, when known.
        path: Option<PathBuf>,
    },
    /// The processor's image size and token count disagree with the vision tower.
    #[error(
        "the processor produces {tokens} image tokens per image ({height}x{width} px) but the vision tower yields {features} features"
    )]
    ImageFeatureMismatch {
        /// Tokens per image from the processor settings.
        tokens: usize,
        /// Features per image from the model.
        features: usize,
        /// Processed height.
        height: usize,
        /// Processed width.
        width: usize,
    },
    /// The model directory ships no chat template.
    #[error(
        "no chat template in {dir} (looked for chat_template.jinja, chat_template.json and tokenizer_config.json); use a pre-formatted prompt"
    )]
    NoChatTemplate {
        /// The model directory.
        dir: PathBuf,
    },
    /// A conversation without messages cannot be rendered (as in transformers).
    #[error("chat template: the conversation has no messages")]
    EmptyConversation,
    /// The template does not compile or raised while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// Tokenizing or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The prompt's `<image>` count differs from the number of images.
    #[error(
        "the prompt has {tags} `{token}` tag(s) but {images} image(s) were given; each image needs exactly one tag"
    )]
    ImageTagMismatch {
        /// Tags found.
        tags: usize,
        /// Images given.
        images: usize,
        /// The tag text.
        token: String,
    },
    /// A required special token is not in the vocabulary.
    #[error("the tokenizer has no token {token:?}")]
    MissingToken {
        /// The token text.
        token: String,
    },
}

/// The text of a file.
fn read(path: &Path) -> Result<String, TextError> {
    std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A JSON file's value, `None` when the file does not exist.
fn read_json(path: &Path) -> Result<Option<Value>, TextError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TextError::BadJson {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads a JSON object into its raw struct; other JSON values (and an absent file) give
/// the struct's defaults, as the field-by-field readers did.
fn read_raw<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, TextError> {
    match read_json(path)? {
        Some(value) if value.is_object() => {
            crate::json::from_value(&value).map_err(|e| TextError::BadField {
                path: path.to_path_buf(),
                field: e.path,
                problem: format!("is invalid: {}", e.message),
            })
        }
        _ => Ok(T::default()),
    }
}
