//! What can go wrong while fine-tuning or exporting.

use std::path::PathBuf;
use std::sync::Arc;

use vipllava_processor::TextError;
use vipllava_processor::image::ImageError;
use vipllava_processor::visual_prompt::VisualPromptError;

use vipllava_convert::output::OutputError;

/// Anything that can go wrong while fine-tuning or exporting.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// File system.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The data file cannot be used.
    #[error("bad data file {}: {reason}", path.display())]
    BadData {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        reason: DataError,
    },
    /// A sample cannot be used (with `--on-bad-sample fail`).
    #[error("bad sample {} (#{}): {}", .0.id, .0.index, .0.reason)]
    BadSample(BadSample),
    /// Loading the model.
    #[error(transparent)]
    Convert(#[from] vipllava_convert::ConvertError),
    /// Tokenizer or template.
    #[error(transparent)]
    Text(#[from] vipllava_processor::TextError),
    /// Image settings.
    #[error(transparent)]
    Image(#[from] vipllava_processor::image::ImageError),
    /// The forward pass.
    #[error(transparent)]
    Forward(#[from] vipllava_model::ForwardError),
    /// Settings, model and data that do not fit together.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The output directory (the model directory itself, nested with it, or not writable).
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The loss stopped being a finite number.
    #[error("step {step}: the loss is {loss} (diverged); lower --lr, or train in f32")]
    Diverged {
        /// The step (from 1).
        step: usize,
        /// The loss.
        loss: f32,
    },
    /// A checkpoint cannot be read or written.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A sample left out, with the reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadSample {
    /// Sample id.
    pub id: String,
    /// Position in the file (0-based).
    pub index: usize,
    /// Why (serialized as its message).
    #[serde(serialize_with = "serialize_display")]
    pub reason: SampleError,
}

/// Serializes a value as its `Display` text.
fn serialize_display<T: std::fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Why one sample cannot be used (its conversation, its image or its visual prompts).
///
/// Errors of the processor are held behind an [`Arc`] so that a [`BadSample`] stays
/// cheap to clone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SampleError {
    /// The sample has no `image`.
    #[error("no image")]
    NoImage,
    /// The image file does not exist.
    #[error("image {} not found", path.display())]
    ImageNotFound {
        /// The image path (joined to the image folder).
        path: PathBuf,
    },
    /// The conversation is empty.
    #[error("no conversations")]
    NoConversations,
    /// No turn is from `human`.
    #[error("no human turn")]
    NoHumanTurn,
    /// The first human turn has no image tag.
    #[error("no `{tag}` in the first human turn")]
    NoImageTag {
        /// The image tag (`<image>`).
        tag: String,
    },
    /// The conversation has more than one image tag.
    #[error("{count} `{tag}` tags; exactly one (in the first human turn) is supported")]
    ImageTagCount {
        /// Tags in the whole conversation.
        count: usize,
        /// The image tag (`<image>`).
        tag: String,
    },
    /// No turn is from `gpt`.
    #[error("no gpt answer")]
    NoAnswer,
    /// A `gpt` turn with blank text.
    #[error("empty answer in turn {turn}")]
    EmptyAnswer {
        /// The turn (from 1).
        turn: usize,
    },
    /// A turn whose `from` is none of `human`, `gpt`, `system`.
    #[error("unknown role `{role}` in turn {turn}")]
    UnknownRole {
        /// The role given.
        role: String,
        /// The turn (from 1).
        turn: usize,
    },
    /// The chat template cannot render the conversation.
    #[error(transparent)]
    Template(Arc<TextError>),
    /// An answer is not found verbatim in the rendered conversation.
    #[error("the chat template does not reproduce answer {answer} verbatim")]
    AnswerNotVerbatim {
        /// The answer (from 1, counting assistant messages).
        answer: usize,
    },
    /// The image tag cannot be expanded to the image tokens.
    #[error(transparent)]
    ExpandImageTokens(Arc<TextError>),
    /// The tokenizer refuses the expanded text.
    #[error(transparent)]
    Tokenize(Arc<dyn std::error::Error + Send + Sync>),
    /// Tokenization does not keep the expanded image tokens.
    #[error("{found} image tokens after tokenization, expected {expected}")]
    ImageTokenCount {
        /// Image tokens in the token ids.
        found: usize,
        /// Image tokens per image.
        expected: usize,
    },
    /// The image cannot be read or decoded.
    #[error(transparent)]
    LoadImage(Arc<ImageError>),
    /// A visual prompt does not parse.
    #[error(transparent)]
    VisualPrompt(Arc<VisualPromptError>),
    /// The visual prompts cannot be drawn on the image.
    #[error(transparent)]
    DrawVisualPrompts(Arc<VisualPromptError>),
    /// The image cannot be preprocessed.
    #[error(transparent)]
    Preprocess(Arc<ImageError>),
}

/// Why a data file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A JSON list that does not parse.
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// A JSONL line that does not parse.
    #[error("line {line}: {source}")]
    JsonLine {
        /// The line (from 1).
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Every sample was left out.
    #[error("no usable samples ({bad} bad)")]
    NoUsableSamples {
        /// Samples left out.
        bad: usize,
    },
}

/// Settings, model and data that do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A count that must be positive (`--epochs`, `--batch-size`, `--grad-accum`,
    /// `--lora-rank`, `--save-every`).
    #[error("{flag} must be at least 1")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// A rate that must be finite and non-negative (`--lr`, `--weight-decay`).
    #[error("{flag} must be a finite non-negative number, not {value}")]
    NotFiniteNonNegative {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: f64,
    },
    /// `--momentum` outside `[0, 1)`.
    #[error("--momentum must be in [0, 1), not {0}")]
    Momentum(f64),
    /// AdamW on f16 parameters.
    #[error(
        "AdamW cannot train f16 parameters (its epsilon and second moments underflow in f16); use --dtype bf16 or f32, or --optimizer sgd"
    )]
    AdamwF16,
    /// LoRA asked for with an empty target list.
    #[error("no LoRA targets")]
    NoLoraTargets,
    /// The LoRA targets as a parameter pattern are refused.
    #[error("LoRA targets: {0}")]
    LoraPattern(String),
    /// No weight of the model is a LoRA target.
    #[error("the LoRA targets match no weight")]
    LoraMatchesNothing,
    /// The initial LoRA factors do not fit their parameters.
    #[error("initialising the LoRA factors: {0}")]
    LoraInit(String),
    /// The trainable set is empty.
    #[error("no parameter to train")]
    NothingToTrain,
    /// A sample index past the data.
    #[error("sample index {index} out of range ({len} samples)")]
    SampleIndex {
        /// The index.
        index: usize,
        /// Usable samples.
        len: usize,
    },
    /// `--eval-every` without `--eval-data`.
    #[error("--eval-every needs --eval-data")]
    EvalEveryWithoutData,
    /// `--quantize` with a trainable set other than LoRA (quantized weights do not train).
    #[error("--quantize trains LoRA adapters over a frozen quantized base: it needs --trainable lora")]
    QuantizeNeedsLora,
    /// `--warmup-ratio` outside `[0, 1]`.
    #[error("--warmup-ratio must be in [0, 1], not {0}")]
    WarmupRatio(f64),
    /// `--max-grad-norm` not a positive number.
    #[error("--max-grad-norm must be a positive number, not {0}")]
    MaxGradNorm(f64),
    /// Burn refuses the learning-rate schedule.
    #[error("--lr-schedule: {0}")]
    LrSchedule(String),
    /// The evaluation data has no target token.
    #[error("the evaluation data has no answer token to score")]
    NoTargets,
    /// The tokenizer has no end-of-sequence token to append to targets.
    #[error("the tokenizer has no EOS token")]
    NoEosToken,
}

/// Maps an OS error on `path` to [`TrainError::Io`].
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_errors_read_as_before_and_serialize_as_text() {
        let cases = [
            (SampleError::NoImage, "no image"),
            (
                SampleError::ImageNotFound {
                    path: PathBuf::from("d/a.png"),
                },
                "image d/a.png not found",
            ),
            (SampleError::NoConversations, "no conversations"),
            (SampleError::NoHumanTurn, "no human turn"),
            (
                SampleError::NoImageTag {
                    tag: "<image>".into(),
                },
                "no `<image>` in the first human turn",
            ),
            (
                SampleError::ImageTagCount {
                    count: 2,
                    tag: "<image>".into(),
                },
                "2 `<image>` tags; exactly one (in the first human turn) is supported",
            ),
            (SampleError::NoAnswer, "no gpt answer"),
            (SampleError::EmptyAnswer { turn: 2 }, "empty answer in turn 2"),
            (
                SampleError::UnknownRole {
                    role: "bot".into(),
                    turn: 3,
                },
                "unknown role `bot` in turn 3",
            ),
            (
                SampleError::AnswerNotVerbatim { answer: 1 },
                "the chat template does not reproduce answer 1 verbatim",
            ),
            (
                SampleError::ImageTokenCount {
                    found: 575,
                    expected: 576,
                },
                "575 image tokens after tokenization, expected 576",
            ),
            (
                SampleError::Template(Arc::new(TextError::EmptyConversation)),
                &TextError::EmptyConversation.to_string(),
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
        let b = BadSample {
            id: "s1".into(),
            index: 4,
            reason: SampleError::EmptyAnswer { turn: 2 },
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"id": "s1", "index": 4, "reason": "empty answer in turn 2"})
        );
    }
}
