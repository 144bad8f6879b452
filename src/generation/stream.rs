//! Streaming detokenization: text increments that a user can print as they come.

use vipllava_processor::{TextError, TextTokenizer};

/// Turns generated ids into text increments that never split a UTF-8 character and never
/// print a stray SentencePiece space.
///
/// Each step decodes only a short window of ids, so a long answer costs linear, not
/// quadratic, time: the window starts at the last token already printed, and the new text
/// is what decoding the window adds to decoding its printed part. Both decodes start at the
/// same token, so a leading space that the decoder strips from the first token is stripped
/// from both, and the increments join up to the text of decoding everything at once. Text
/// is held back while the last token is a byte-fallback token (`<0xNN>`): the decoder joins
/// a run of byte tokens and only once the run ends is its text final (a valid byte can
/// still turn into `\u{FFFD}`); a special token inside the run does not end it, since
/// decoding skips it and the bytes on both sides join.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the decode window: the first id of the last printed piece.
    window_start: usize,
    /// End of what is printed: `ids[..printed_ids]`.
    printed_ids: usize,
    /// The text so far: the printed text (`text[..printed_len]`) plus what is held back.
    text: String,
    printed_len: usize,
}

impl StreamDecoder {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns new text when there is some to show.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Option<String>, TextError> {
        self.ids.push(id);
        let window = &self.ids[self.window_start..];
        let printed = tokenizer.decode(&window[..self.printed_ids - self.window_start], true)?;
        let decoded = tokenizer.decode(window, true)?;
        let pending = match decoded.strip_prefix(printed.as_str()) {
            Some(pending) => pending.to_string(),
            // A decoder whose window text does not extend its printed part: fall back to
            // decoding everything (correct, quadratic).
            None => {
                let all = tokenizer.decode(&self.ids, true)?;
                match all.get(self.printed_len..) {
                    Some(rest) if all.starts_with(&self.text[..self.printed_len]) => rest.to_string(),
                    _ => String::new(),
                }
            }
        };
        self.text.truncate(self.printed_len);
        self.text.push_str(&pending);
        // A skipped special token does not end a run of byte tokens: decoding drops it, and
        // the bytes on both sides join.
        let run_open = tokenizer.is_byte_token(id) || tokenizer.is_special_token(id);
        if run_open || pending.ends_with('\u{FFFD}') {
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
        let new = &self.text[self.printed_len..];
        if new.is_empty() {
            return None;
        }
        let new = new.to_string();
        self.printed_len = self.text.len();
        self.window_start = self.printed_ids;
        self.printed_ids = self.ids.len();
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The earlier decoder: decode everything at every step (quadratic, but obviously right).
    fn quadratic(tokenizer: &TextTokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let (mut pieces, mut emitted) = (Vec::new(), String::new());
        for n in 1..=ids.len() {
            let text = tokenizer.decode(&ids[..n], true).unwrap();
            let last = ids[n - 1];
            if tokenizer.is_byte_token(last) || tokenizer.is_special_token(last) || text.ends_with('\u{FFFD}')
            {
                continue;
            }
            if let Some(new) = text.strip_prefix(emitted.as_str())
                && !new.is_empty()
            {
                pieces.push(new.to_string());
                emitted = text.clone();
            }
        }
        let text = tokenizer.decode(ids, true).unwrap();
        if let Some(new) = text.strip_prefix(emitted.as_str())
            && !new.is_empty()
        {
            pieces.push(new.to_string());
        }
        (pieces, text)
    }

    #[test]
    fn windowed_decoding_streams_what_full_decoding_does() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-5x-f32");
        let tokenizer = TextTokenizer::from_model_dir(&dir).unwrap();
        let vocab = tokenizer.inner().get_vocab_size(true) as u32;
        // Words, multi-byte characters split into byte tokens, invalid byte runs, specials.
        let mut sequences = vec![
            // A greedy answer of the tiny model: bytes, `<s>`, bytes (`serve` found it).
            vec![
                169, 293, 83, 41, 403, 221, 342, 304, 489, 265, 356, 94, 293, 83, 130, 1, 169, 335, 367, 53,
            ],
            tokenizer.encode("Hello world, a cat on a mat.", false).unwrap(),
            tokenizer.encode("naïve café: 猫 and 🐈 together", false).unwrap(),
        ];
        let bytes: Vec<u32> = (0..vocab).filter(|&i| tokenizer.is_byte_token(i)).collect();
        assert_eq!(bytes.len(), 256);
        assert!(sequences[2].iter().any(|&i| tokenizer.is_byte_token(i)));
        // Special tokens inside byte runs: decoding skips them and joins the bytes.
        let specials: Vec<u32> = (0..vocab).filter(|&i| tokenizer.is_special_token(i)).collect();
        assert!(specials.len() >= 3, "{specials:?}");
        let mut state = 0x2545_f491_u64;
        let mut next = |n: u32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(n)) as u32
        };
        for _ in 0..200 {
            let len = 1 + next(30);
            sequences.push(
                (0..len)
                    .map(|_| match next(6) {
                        0 | 1 => bytes[next(bytes.len() as u32) as usize],
                        2 => specials[next(specials.len() as u32) as usize],
                        _ => next(vocab),
                    })
                    .collect(),
            );
        }
        for ids in sequences {
            let mut stream = StreamDecoder::new();
            let mut pieces = Vec::new();
            for &id in &ids {
                if let Some(p) = stream.push(&tokenizer, id).unwrap() {
                    pieces.push(p);
                }
            }
            pieces.extend(stream.finish());
            let (expected, text) = quadratic(&tokenizer, &ids);
            assert_eq!(pieces.concat(), text, "{ids:?}");
            assert_eq!(pieces, expected, "{ids:?}");
            assert_eq!(stream.text(), text, "{ids:?}");
        }
    }

    /// Cost of streaming a long answer, windowed vs decoding everything at every step
    /// (`cargo test --release -p vipllava --lib stream_cost -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing report, not a check"]
    fn stream_cost_report() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-5x-f32");
        let tokenizer = TextTokenizer::from_model_dir(&dir).unwrap();
        let words = "The cat sits on the mat and looks at the red box. ".repeat(400);
        let ids = tokenizer.encode(&words, false).unwrap();
        for n in [500, 1000, 2000, 4000] {
            let ids = &ids[..n.min(ids.len())];
            let t = std::time::Instant::now();
            let mut stream = StreamDecoder::new();
            for &id in ids {
                stream.push(&tokenizer, id).unwrap();
            }
            let windowed = t.elapsed().as_secs_f64() * 1e3;
            let t = std::time::Instant::now();
            quadratic(&tokenizer, ids);
            let full = t.elapsed().as_secs_f64() * 1e3;
            eprintln!(
                "{:5} tokens: windowed {windowed:8.2} ms, full decode per step {full:9.2} ms",
                ids.len()
            );
        }
    }
}
