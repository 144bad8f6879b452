//! The checkpoint's tokenizer (`tokenizer.json`) with its special tokens.

use std::path::Path;

use super::tokenizer_config::RawTokenizerConfig;
use super::{TextError, read_raw};

/// The checkpoint's tokenizer (`tokenizer.json`) with its special tokens.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_token_id: Option<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (and special-token names from `tokenizer_config.json`).
    pub fn from_model_dir(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TextError::NoTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| TextError::Io {
            path: path.clone(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextError::BadTokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config: RawTokenizerConfig = read_raw(&dir.join("tokenizer_config.json"))?;
        let name =
            |key: &str, default: &str| -> String { config.special_token(key).unwrap_or(default).to_string() };
        let bos_token_id = inner.token_to_id(&name("bos_token", "<s>"));
        let eos_token_id = inner.token_to_id(&name("eos_token", "</s>"));
        let pad_token_id = inner.token_to_id(&name("pad_token", "<pad>"));
        Ok(Self {
            inner,
            bos_token_id,
            eos_token_id,
            pad_token_id,
        })
    }

    /// Ids of `text`, with the tokenizer's special tokens (BOS) when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TextError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenize(e.to_string()))
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Result<u32, TextError> {
        self.inner
            .token_to_id(token)
            .ok_or_else(|| TextError::MissingToken { token: token.into() })
    }

    /// True for SentencePiece byte-fallback tokens (`<0x00>`..`<0xFF>`).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
        })
    }

    /// True for special tokens (`<s>`, `</s>`, `<image>`, ...), which decoding with
    /// `skip_special_tokens` drops.
    pub fn is_special_token(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
