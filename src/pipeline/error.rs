//! Everything that can go wrong between a model directory and generated text, one
//! variant per cause so callers (the CLI, a server mapping errors to HTTP statuses) can
//! tell them apart.

use vipllava_convert::ConvertError;
use vipllava_model::ForwardError;
use vipllava_processor::TextError;
use vipllava_processor::image::ImageError;

use crate::generation::options::GenerationConfigError;

/// Anything that can go wrong between a model directory and generated text.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Loading the checkpoint.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// Tokenizer, template or prompt.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Image decoding or preprocessing.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The forward pass rejected its inputs.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// Generation settings.
    #[error(transparent)]
    Generation(#[from] GenerationConfigError),
    /// The device could not be opened.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// A prompt with images must hold the image tag.
    #[error("the raw prompt must contain `{0}` once per image")]
    RawPromptWithoutImage(String),
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Tensors could not be read back from the device (e.g. a lost GPU or remote device).
    #[error("reading {what} back from the device: {reason}")]
    ReadBack {
        /// What was read.
        what: &'static str,
        /// The backend's message.
        reason: String,
    },
    /// A generation call was given no request.
    #[error("nothing to generate: no request was given")]
    NoRequest,
    /// Prompt plus requested tokens exceed the model's context.
    #[error(
        "the prompt has {prompt} tokens and up to {max_new_tokens} new tokens were requested, beyond the model's {max} positions (max_position_embeddings); shorten the prompt or lower --max-new-tokens"
    )]
    ContextTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_new_tokens: usize,
        /// The model's limit.
        max: usize,
    },
}
