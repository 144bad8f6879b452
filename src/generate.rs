//! Token selection (greedy or sampled, with transformers' logits-processor order),
//! generation defaults from `generation_config.json`, and streaming detokenization.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use vipllava_processor::{TextError, TextTokenizer};

/// Used when neither the user nor `generation_config.json` sets `max_new_tokens`
/// (transformers' `max_length = 20` default counts the 576 image tokens, so it would
/// generate nothing useful).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationOptions {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Sample instead of taking the argmax.
    pub do_sample: bool,
    /// Softmax temperature when sampling.
    pub temperature: f32,
    /// Keep the k most likely tokens when sampling (`None` or 0 = all).
    pub top_k: Option<usize>,
    /// Nucleus sampling mass (`1.0` = off).
    pub top_p: f32,
    /// transformers' repetition penalty over prompt and generated ids (`1.0` = off).
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop once the generated text contains one of these (kept in the output, as
    /// transformers' `stop_strings` does).
    pub stop_strings: Vec<String>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            do_sample: false,
            temperature: 1.0,
            top_k: Some(50),
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop_strings: Vec::new(),
            eos_token_ids: Vec::new(),
        }
    }
}

/// Overrides of the generation defaults, from CLI flags or a batch-file line. Giving a
/// temperature, top-k or top-p turns sampling on unless `do_sample` says otherwise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationOverrides {
    /// Maximum new tokens.
    pub max_new_tokens: Option<usize>,
    /// Sample or not.
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Top-k.
    pub top_k: Option<usize>,
    /// Top-p.
    pub top_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Sampler seed.
    pub seed: Option<u64>,
    /// Stop strings (replace the defaults).
    pub stop: Option<Vec<String>>,
}

impl GenerationOverrides {
    /// Writes the given values over `options`.
    pub fn apply(&self, options: &mut GenerationOptions) {
        if self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some() {
            options.do_sample = true;
        }
        if let Some(v) = self.do_sample {
            options.do_sample = v;
        }
        if let Some(v) = self.max_new_tokens {
            options.max_new_tokens = v;
        }
        if let Some(v) = self.temperature {
            options.temperature = v;
        }
        if let Some(v) = self.top_k {
            options.top_k = Some(v);
        }
        if let Some(v) = self.top_p {
            options.top_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            options.repetition_penalty = v;
        }
        if let Some(v) = self.seed {
            options.seed = v;
        }
        if let Some(v) = &self.stop {
            options.stop_strings = v.clone();
        }
    }
}

/// A bad generation setting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenerationConfigError {
    /// `generation_config.json` is unreadable or not JSON.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// An option out of range.
    #[error("invalid generation option: {0}")]
    Invalid(String),
}

impl GenerationOptions {
    /// Defaults as transformers applies them from `generation_config.json` (greedy unless
    /// `do_sample`; EOS ids from the file, else `fallback_eos`).
    pub fn from_model_dir(dir: &Path, fallback_eos: Option<u32>) -> Result<Self, GenerationConfigError> {
        let mut o = Self::default();
        let path = dir.join("generation_config.json");
        let v: Value = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| GenerationConfigError::BadFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| GenerationConfigError::BadFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
        } else {
            Value::Null
        };
        if let Some(n) = v.get("max_new_tokens").and_then(Value::as_u64) {
            o.max_new_tokens = n as usize;
        }
        if let Some(b) = v.get("do_sample").and_then(Value::as_bool) {
            o.do_sample = b;
        }
        if let Some(t) = v.get("temperature").and_then(Value::as_f64) {
            o.temperature = t as f32;
        }
        match v.get("top_k") {
            Some(Value::Null) => o.top_k = None,
            Some(k) => o.top_k = k.as_u64().map(|k| k as usize),
            None => {}
        }
        if let Some(p) = v.get("top_p").and_then(Value::as_f64) {
            o.top_p = p as f32;
        }
        if let Some(p) = v.get("repetition_penalty").and_then(Value::as_f64) {
            o.repetition_penalty = p as f32;
        }
        o.eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
            _ => fallback_eos.into_iter().collect(),
        };
        Ok(o)
    }

    /// Checks ranges (temperature > 0 when sampling, 0 < top_p <= 1, penalty > 0).
    pub fn validate(&self) -> Result<(), GenerationConfigError> {
        if self.do_sample && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(GenerationConfigError::Invalid(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GenerationConfigError::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(GenerationConfigError::Invalid(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(GenerationConfigError::Invalid("a stop string is empty".into()));
        }
        Ok(())
    }
}

/// Picks tokens from logits, in transformers' order: repetition penalty, then (when
/// sampling) temperature, top-k, top-p, and a draw from the softmax.
#[derive(Debug)]
pub struct TokenSelector {
    options: GenerationOptions,
    rng: StdRng,
}

impl TokenSelector {
    /// A selector seeded from the options.
    pub fn new(options: GenerationOptions) -> Self {
        let rng = StdRng::seed_from_u64(options.seed);
        Self { options, rng }
    }

    /// The next token given the last position's logits and every id so far.
    pub fn select(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let penalty = self.options.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
        if !self.options.do_sample {
            return argmax(logits);
        }
        let t = self.options.temperature;
        for l in logits.iter_mut() {
            *l /= t;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut keep = order.len();
        if let Some(k) = self.options.top_k.filter(|&k| k > 0 && k < keep) {
            // Keep ties with the k-th value, as transformers' `< topk.min` filter does.
            let kth = logits[order[k - 1]];
            keep = order.iter().take_while(|&&i| logits[i] >= kth).count();
        }
        let max = logits[order[0]];
        let probs: Vec<f64> = order[..keep]
            .iter()
            .map(|&i| ((logits[i] - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        if self.options.top_p < 1.0 {
            // Smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut n = 0;
            for p in &probs {
                mass += p / total;
                n += 1;
                if mass >= self.options.top_p as f64 {
                    break;
                }
            }
            keep = n.max(1);
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (j, p) in probs[..keep].iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return order[j] as u32;
            }
        }
        order[keep - 1] as u32
    }
}

/// Index of the first maximum (as `torch.argmax`); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max_and_penalty_applies() {
        let opts = GenerationOptions::default();
        let mut s = TokenSelector::new(opts.clone());
        assert_eq!(s.select(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
        let mut s = TokenSelector::new(GenerationOptions {
            repetition_penalty: 2.0,
            ..opts
        });
        // 3.0 / 2 = 1.5 < 2.0: token 2 wins once token 1 is penalised.
        assert_eq!(s.select(&mut [0.0, 3.0, 2.0], &[1, 1]), 2);
    }

    #[test]
    fn sampling_respects_top_k_and_seed() {
        let opts = GenerationOptions {
            do_sample: true,
            top_k: Some(2),
            seed: 7,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = TokenSelector::new(GenerationOptions { seed, ..opts.clone() });
            (0..50)
                .map(|_| s.select(&mut [5.0, 4.9, -10.0, 4.8], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert!(a.iter().all(|&t| t == 0 || t == 1), "{a:?}");
        assert!(a.contains(&0) && a.contains(&1));
        assert_eq!(a, draw(7), "same seed, same draws");
        let mut s = TokenSelector::new(GenerationOptions {
            top_p: 0.1,
            top_k: None,
            ..opts
        });
        assert!((0..20).all(|_| s.select(&mut [5.0, 4.0, 3.0], &[]) == 0));
    }

    #[test]
    fn validation_rejects_bad_values() {
        let bad = GenerationOptions {
            do_sample: true,
            temperature: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = GenerationOptions {
            top_p: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(GenerationOptions::default().validate().is_ok());
    }
}
