//! Evaluation: mean loss and perplexity over every answer token of a data file.
//!
//! Samples are encoded by the same [`SampleEncoder`] as training data (the labelling rule
//! of [`crate::data`]), collated by [`crate::batch::collate`] and scored by
//! [`crate::loss::causal_lm_loss`]: the loss is the sum of the targets' cross-entropies
//! divided by the number of targets in the whole file (not a mean of per-batch means), so
//! it does not depend on the batch size and equals the training loss of one step over the
//! same samples.
//!
//! The model is a base model directory, optionally with an adapter: a training checkpoint
//! (`out/checkpoint-N`, whatever `train` trains: LoRA factors, the projector or all
//! parameters), or a training output directory, whose latest checkpoint is used
//! ([`resolve_adapter`]).

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use serde::Serialize;
use vipllava_model::{KvCache, VipLlava};

use crate::batch::collate;
use crate::checkpoint::STATE_FILE;
use crate::data::EncodedSample;
use crate::error::{SetupError, TrainError};
use crate::loss::causal_lm_loss;

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean cross-entropy over all target tokens.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// Target tokens in the loss.
    pub targets: usize,
}

/// Scores `samples` with `model` (no autodiff needed) in micro-batches of `batch_size`
/// (right-padded with `pad_id`, pixels in `dtype`); `on_batch` receives the number of
/// samples done after each batch.
pub fn evaluate(
    model: &VipLlava,
    samples: &[EncodedSample],
    pad_id: u32,
    dtype: DType,
    batch_size: usize,
    device: &Device,
    mut on_batch: impl FnMut(usize),
) -> Result<EvalResult, TrainError> {
    if batch_size == 0 {
        return Err(SetupError::Zero { flag: "--batch-size" }.into());
    }
    let mut sum = 0.0f64;
    let mut targets = 0usize;
    let mut done = 0usize;
    for chunk in samples.chunks(batch_size) {
        let rows: Vec<&EncodedSample> = chunk.iter().collect();
        let batch = collate(&rows, pad_id, dtype, device);
        let logits = model.forward(batch.input, &mut KvCache::new())?;
        if let Some((loss, n)) = causal_lm_loss(logits, &batch.labels) {
            let value = scalar(loss.into_data());
            sum += value * n as f64;
            targets += n;
        }
        done += chunk.len();
        on_batch(done);
    }
    if targets == 0 {
        return Err(SetupError::NoTargets.into());
    }
    let loss = sum / targets as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        samples: samples.len(),
        targets,
    })
}

/// The first value of a tensor's data as f64 (NaN if unreadable).
fn scalar(data: burn::tensor::TensorData) -> f64 {
    data.convert::<f32>()
        .try_to_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .map_or(f64::NAN, f64::from)
}

/// The checkpoint an `--adapter` path names: a checkpoint directory itself (it holds
/// `train_state.json`), or a training output directory, whose `checkpoint-N` with the
/// highest N is taken.
pub fn resolve_adapter(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(crate::error::io_err(path))?;
    let latest = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (step, e.path()))
        })
        .max_by_key(|(step, _)| *step);
    latest.map(|(_, p)| p).ok_or_else(|| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!(
            "neither a checkpoint ({STATE_FILE}) nor a training output with checkpoint-N folders"
        ),
    })
}
