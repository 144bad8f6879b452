//! How to pick tokens and when to stop: defaults from `generation_config.json` as
//! transformers applies them, overrides from flags or request fields, range checks.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;

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
