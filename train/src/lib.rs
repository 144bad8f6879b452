//! # vipllava-train
//!
//! Fine-tuning VipLlava with Burn autodiff.
//!
//! - [`data`]: LLaVA-format data (JSON/JSONL), bad-sample handling, visual prompts drawn
//!   on the fly, and **the labelling rule** (read its module docs: tests rely on it);
//! - [`loss`]: transformers' causal-LM loss (mean cross-entropy over targets, shifted);
//! - [`trainer`]: projector / LoRA / full training with SGD or AdamW, batches with
//!   padding and attention mask, gradient accumulation and checkpointing, atomic
//!   checkpoints and exact resume;
//! - [`export`]: LoRA merged into the base weights and a complete HF model directory
//!   (hub-layout safetensors, config, tokenizer and processor files).
//!
//! ```no_run
//! use vipllava_train::trainer::{TrainConfig, Trainable, train};
//! # fn main() -> Result<(), vipllava_train::TrainError> {
//! let mut config = TrainConfig::new("model_dir", "data.json", "out_dir");
//! config.trainable = Trainable::Projector;
//! config.lr = 1e-3;
//! let summary = train(&config, &burn::tensor::Device::flex(), |step| {
//!     println!("step {} loss {:.4}", step.step, step.loss);
//! })?;
//! println!("final model in {}", summary.model_dir.display());
//! # Ok(()) }
//! ```

// Nothing derived from input may panic: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod data;
pub mod export;
pub mod loss;
pub mod params;
pub mod trainer;

use std::path::PathBuf;

pub use data::{BadSample, EncodedSample, OnBadSample, RawSample, SampleEncoder, Turn};
pub use trainer::{StepReport, TrainConfig, TrainSummary, Trainable, Trainer, train};

/// Anything that can go wrong while fine-tuning or exporting.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// File system.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The data file cannot be read.
    #[error("bad data file {}: {reason}", path.display())]
    BadData {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
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
    /// Settings or paths that do not fit together.
    #[error("{0}")]
    Setup(String),
    /// A checkpoint cannot be read or written.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
