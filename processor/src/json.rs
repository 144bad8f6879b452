//! Shared pieces of the serde-derived config readers.

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

/// A string field whose other JSON types count as absent (the readers before the serde
/// port looked such fields up with `Value::as_str`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum LenientString {
    /// A string.
    Text(String),
    /// Anything else.
    Other(IgnoredAny),
}

impl LenientString {
    /// The string, if the field held one.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            Self::Other(_) => None,
        }
    }
}

/// Deserializes a parsed JSON object into `T`, keeping the path of the offending field
/// (`size.shortest_edge`, `image_mean[1]`) on error.
///
/// Files are parsed into a [`Value`] first so that duplicate keys keep JSON's
/// last-one-wins reading and a file's nested dialect (`"image_processor"`) can be picked
/// before the struct is read.
pub(crate) fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| FieldError {
        path: match e.path().to_string() {
            p if p == "." => "(root)".to_string(),
            p => p,
        },
        message: e.inner().to_string(),
    })
}

/// A field that serde could not read: where, and why.
#[derive(Debug)]
pub(crate) struct FieldError {
    /// The field path (`size.shortest_edge`), `(root)` for the object itself.
    pub(crate) path: String,
    /// serde's message.
    pub(crate) message: String,
}
