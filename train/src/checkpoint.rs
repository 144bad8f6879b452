//! Checkpoints: the state of a run on disk, written whole or not at all, and read back to
//! resume or export.
//!
//! `out/checkpoint-{step}/` holds `trainable.safetensors` (the trained parameters by module
//! path, f32, Burn layout: a `Linear` weight is `[in, out]`), `optimizer.bpk` (the optimizer
//! state) and `train_state.json` (step, settings, losses, sample ids). It is written through
//! a [`StagedDir`] beside it and swapped into place, so a checkpoint is complete or absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};
use vipllava_convert::output::{Landing, StagedDir, check_separate};

use crate::config::{TrainConfig, Trainable};
use crate::error::{TrainError, io_err};
use crate::tensors::{read_safetensors, write_safetensors};

/// Trained parameters inside a checkpoint directory.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// Optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// Step and settings.
pub const STATE_FILE: &str = "train_state.json";

/// Persistent state beside a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Settings of the run.
    pub config: TrainConfig,
    /// Losses of the steps done so far.
    pub losses: Vec<f64>,
    /// Ids of the usable samples, in file order (the schedule depends on them).
    #[serde(default)]
    pub sample_ids: Vec<String>,
}

/// Checks `out` against the model directory: never the same directory, never nested with
/// it either way.
pub fn check_out_dir(model: &Path, out: &Path) -> Result<(), TrainError> {
    Ok(check_separate(out, model)?)
}

/// `out/checkpoint-{step}`.
pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

fn bad(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |reason| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    }
}

/// Writes the checkpoint of `state` (`state.config.out/checkpoint-{state.step}`, replacing
/// one of the same step) and returns its path.
pub fn save_checkpoint(
    state: &TrainState,
    trainable: &BTreeMap<String, TensorData>,
    optimizer: &ModuleOptimizer,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoint_dir(&state.config.out, state.step);
    let staged = StagedDir::create(&dir, &state.config.model, Landing::Replace)?;
    let tmp = staged.path();
    write_safetensors(&tmp.join(TRAINABLE_FILE), trainable, None)?;
    optimizer
        .save(tmp.join(OPTIMIZER_FILE))
        .map_err(|e| bad(tmp)(format!("optimizer state: {e:?}")))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| bad(tmp)(e.to_string()))?;
    std::fs::write(tmp.join(STATE_FILE), json).map_err(io_err(tmp.join(STATE_FILE)))?;
    staged.commit()?;
    Ok(dir)
}

/// Reads `train_state.json` of a checkpoint.
pub fn read_state(checkpoint: &Path) -> Result<TrainState, TrainError> {
    let path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| bad(checkpoint)(e.to_string()))
}

/// Reads the trained parameters of a checkpoint by path.
pub fn read_trainable(checkpoint: &Path) -> Result<BTreeMap<String, TensorData>, TrainError> {
    read_safetensors(&checkpoint.join(TRAINABLE_FILE))
}

/// Loads the optimizer state of a checkpoint into a fresh `optimizer` of the same kind.
pub fn load_optimizer(checkpoint: &Path, optimizer: ModuleOptimizer) -> Result<ModuleOptimizer, TrainError> {
    optimizer
        .load(checkpoint.join(OPTIMIZER_FILE))
        .map_err(|e| bad(checkpoint)(format!("optimizer state: {e:?}")))
}

impl TrainState {
    /// Refuses to resume this checkpoint (at `checkpoint`) with `config` unless it trains
    /// the same parameters the same way.
    pub fn check_settings(&self, config: &TrainConfig, checkpoint: &Path) -> Result<(), TrainError> {
        let s = &self.config;
        if s.trainable != config.trainable
            || s.optimizer != config.optimizer
            || (config.trainable == Trainable::Lora
                && (s.lora_rank != config.lora_rank
                    || s.lora_alpha != config.lora_alpha
                    || config.lora_modules()? != s.lora_modules()?))
        {
            return Err(bad(checkpoint)(
                "it was written with other --trainable / --optimizer / LoRA settings".into(),
            ));
        }
        Ok(())
    }

    /// Refuses to resume this checkpoint (at `checkpoint`) on other samples than it was
    /// trained on (the schedule depends on them).
    pub fn check_samples(&self, ids: &[String], checkpoint: &Path) -> Result<(), TrainError> {
        if !self.sample_ids.is_empty() && self.sample_ids != ids {
            return Err(bad(checkpoint)(format!(
                "it was trained on other samples ({} then, {} now); resume with the same data",
                self.sample_ids.len(),
                ids.len()
            )));
        }
        Ok(())
    }
}
