//! Streaming detokenization: text increments that a user can print as they come.

use vipllava_processor::{TextError, TextTokenizer};

/// Turns generated ids into text increments that never split a UTF-8 character and never
/// print a stray SentencePiece space: each step decodes the whole generation (as the
/// final text is decoded) and emits what is new. Text is held back while the last token
/// is a byte-fallback token (`<0xNN>`): the decoder joins a run of byte tokens and only
/// once the run ends is its text final (a valid byte can still turn into `\u{FFFD}`).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: String,
    text: String,
}

impl StreamDecoder {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns new text when there is some to show.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Option<String>, TextError> {
        self.ids.push(id);
        self.text = tokenizer.decode(&self.ids, true)?;
        if tokenizer.is_byte_token(id) || self.text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(self.take_new())
    }

    /// Whatever is left once generation ends.
    pub fn finish(&mut self) -> Option<String> {
        self.take_new()
    }

    /// The full decoded text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take_new(&mut self) -> Option<String> {
        let new = self.text.strip_prefix(self.emitted.as_str())?;
        if new.is_empty() {
            return None;
        }
        let new = new.to_string();
        self.emitted.push_str(&new);
        Some(new)
    }
}
