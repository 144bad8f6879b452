//! Generation apart from the model and from loading: the decode loop ([`decode`]),
//! token selection ([`sampling`]), streaming detokenization ([`stream`]), left padding for
//! batches ([`batch`]), continuous batching step by step ([`scheduler`]) and the options
//! that steer them ([`options`]).

pub mod batch;
pub mod decode;
pub mod options;
pub mod sampling;
pub mod scheduler;
pub mod stream;

use serde::Serialize;

pub use batch::LeftPadded;
pub use options::{DEFAULT_MAX_NEW_TOKENS, GenerationConfigError, GenerationOptions, GenerationOverrides};
pub use sampling::{TokenSelector, argmax};
pub use scheduler::{DecodeBatch, RowFinished, RowId, SchedulerError, StepEvent};
pub use stream::StreamDecoder;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// `max_new_tokens` reached.
    MaxNewTokens,
    /// A stop string appeared.
    StopString,
    /// The caller asked to stop (e.g. a Stop button); the text so far is kept.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated ids (prompt excluded; EOS included when generated, as transformers).
    pub token_ids: Vec<u32>,
    /// Decoded text (special tokens skipped).
    pub text: String,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Prompt length in tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Prefill wall time (image encoding included).
    pub prefill_ms: f64,
    /// Decode speed over the tokens after the first.
    pub decode_tokens_per_s: f64,
}
