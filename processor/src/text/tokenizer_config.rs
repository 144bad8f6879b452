//! `tokenizer_config.json` and `chat_template.json` as serde reads them: special-token
//! names and the chat template.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// The fields of `tokenizer_config.json` the processor uses; every one optional and
/// lenient (a value of an unexpected type counts as absent).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawTokenizerConfig {
    bos_token: Option<RawTokenName>,
    eos_token: Option<RawTokenName>,
    unk_token: Option<RawTokenName>,
    pad_token: Option<RawTokenName>,
    /// The chat template (hub repos of transformers < 4.43 keep it here).
    pub(super) chat_template: Option<RawChatTemplate>,
}

/// `chat_template.json` (`{"chat_template": ...}`, hub 4.x processors).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawChatTemplateFile {
    /// The template.
    pub(super) chat_template: Option<RawChatTemplate>,
}

/// The special-token names passed to the chat template.
pub(super) const SPECIAL_TOKEN_NAMES: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

impl RawTokenizerConfig {
    /// The text of special token `name` (one of [`SPECIAL_TOKEN_NAMES`]) when the file
    /// gives it as a string or as an added-token object with a string `content`.
    pub(super) fn special_token(&self, name: &str) -> Option<&str> {
        let token = match name {
            "bos_token" => &self.bos_token,
            "eos_token" => &self.eos_token,
            "unk_token" => &self.unk_token,
            "pad_token" => &self.pad_token,
            _ => &None,
        };
        token.as_ref().and_then(RawTokenName::content)
    }
}

/// A special token: `"<s>"` or `{"content": "<s>", "lstrip": false, ...}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawTokenName {
    Text(String),
    Added(BTreeMap<String, Value>),
    Other(IgnoredAny),
}

impl RawTokenName {
    fn content(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            Self::Added(fields) => fields.get("content").and_then(Value::as_str),
            Self::Other(_) => None,
        }
    }
}

/// A chat template: its source, or a list of named templates
/// (`[{"name": "default", "template": ...}, ...]`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawChatTemplate {
    Text(String),
    Named(Vec<Value>),
    Other(IgnoredAny),
}

impl RawChatTemplate {
    /// The template source; from a list, the one named `default` (as transformers picks).
    pub(super) fn source(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            Self::Named(list) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str),
            Self::Other(_) => None,
        }
    }
}
