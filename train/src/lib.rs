//! # vipllava-train
//!
//! Fine-tuning VipLlava with Burn autodiff.
//!
//! - [`data`]: LLaVA-format data (JSON/JSONL), bad-sample handling, visual prompts drawn
//!   on the fly, and **the labelling rule** (read its module docs: tests rely on it);
//! - [`loss`]: transformers' causal-LM loss (mean cross-entropy over targets, shifted);
//! - [`config`]: the settings ([`TrainConfig`], typed [`LoraTarget`]s) and their checks;
//! - [`setup`]: the model (base weights, LoRA adapters), the trainable set, the optimizer;
//! - [`batch`]: the step schedule and padded micro-batches with an attention mask;
//! - [`checkpoint`]: the run's state on disk, written whole or not at all, read to resume;
//! - [`recipes`]: learning-rate schedules (Burn's schedulers) and global-norm clipping;
//! - [`eval`]: loss and perplexity over every answer token of a data file;
//! - [`trainer`]: the loop: projector / LoRA / full training with SGD or AdamW, gradient
//!   accumulation and checkpointing, exact resume;
//! - [`export`]: LoRA merged into the base weights and a complete HF model directory
//!   (hub-layout safetensors in the base dtype, written tensor by tensor and sharded like
//!   the hub by [`shards`], config, tokenizer and processor files);
//! - [`tensors`], [`params`], [`error`]: f32 safetensors files, parameters by path, errors.
//!
//! Files depend in one direction: `config` <- `setup`, `checkpoint` <- `export` <- `trainer`;
//! every directory is written through `vipllava_convert::output`.
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

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod lora_target;
pub mod loss;
pub mod params;
pub mod prefetch;
pub mod recipes;
pub mod setup;
pub mod shards;
pub mod tensors;
pub mod trainer;

pub use checkpoint::{TrainState, check_out_dir};
pub use config::{ExportDtype, OptimizerKind, TrainConfig, Trainable};
pub use data::{BadSample, EncodedSample, OnBadSample, RawSample, SampleEncoder, Turn};
pub use error::{DataError, SampleError, SetupError, TrainError};
pub use lora_target::{LoraTarget, UnknownLoraTarget};
pub use trainer::{StepReport, TrainSummary, Trainer, run, train};
