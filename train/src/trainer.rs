//! The training loop: a [`Trainer`] steps through the schedule, checkpoints and resumes;
//! [`train`] and [`run`] drive it to the end and write the fine-tuned model.
//!
//! # Steps
//!
//! Each epoch visits the usable samples in file order (or in a permutation seeded by
//! `seed` and the epoch when `shuffle` is set). They are cut into micro-batches of
//! `batch_size` (right-padded, with an attention mask), and `grad_accum` micro-batches make
//! one optimizer step (the last step of an epoch may have fewer). The step loss is the mean
//! of its micro-batch losses, and the gradient is the gradient of that mean.
//!
//! # Checkpoints
//!
//! See [`crate::checkpoint`]: `out/checkpoint-{step}/` is complete or absent. Resuming
//! reloads the base model, the trained parameters and the optimizer state and continues the
//! same deterministic schedule, giving the result of an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;
use vipllava_model::{KvCache, VipLlava, VipLlavaConfig};

use crate::batch::{Batch, collate, pad_id, schedule};
use crate::checkpoint::{load_optimizer, read_state, read_trainable};
use crate::data::{BadSample, EncodedSample, ImageJob, SampleEncoder, load_dataset, load_dataset_deferred};
use crate::error::{SetupError, TrainError};
use crate::eval::{EvalResult, evaluate};
use crate::export::{ExportOptions, write_hf_model_with};
use crate::loss::causal_lm_loss;
use crate::params::{list_params, read_params, write_params};
use crate::prefetch::Prefetcher;
use crate::recipes::{LrPlan, ParamRank, clip_global_norm};
use crate::setup::{make_optimizer, mark_trainable, placeholder, trainable_params};

// Paths of the items that lived here before the split into modules.
pub use crate::checkpoint::{OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE, TrainState, check_out_dir};
pub use crate::config::{OptimizerKind, TrainConfig, Trainable};
pub use crate::lora_target::LoraTarget;
pub use crate::setup::{build_model, is_trainable};
pub use crate::tensors::{read_safetensors, write_safetensors};

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Step number, from 1.
    pub step: usize,
    /// Epoch, from 1.
    pub epoch: usize,
    /// Mean loss of the step's micro-batches (before the update).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global L2 norm of the step's gradients before clipping (with `max_grad_norm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Evaluation after the step (with `eval_data`, every `eval_every` steps and after the
    /// last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalResult>,
    /// Input tokens processed (padding excluded).
    pub tokens: usize,
    /// Target tokens in the loss.
    pub targets: usize,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

/// What a finished run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Steps run in total (resumed ones included).
    pub steps: usize,
    /// Loss of every step run by this process.
    pub losses: Vec<f64>,
    /// The final checkpoint.
    pub checkpoint: PathBuf,
    /// The final model directory (HF layout, LoRA merged): `out` itself.
    pub model_dir: PathBuf,
    /// Samples left out.
    pub bad_samples: Vec<BadSample>,
}

/// Images decoded on demand (`prefetch > 0`).
struct Images {
    jobs: Arc<Vec<ImageJob>>,
    /// Position of each usable sample in the data file.
    file_index: Vec<usize>,
    prefetcher: Option<Prefetcher>,
}

/// A model being trained, with its data, optimizer and position in the schedule.
pub struct Trainer {
    /// Settings.
    pub config: TrainConfig,
    /// Resolved model config.
    pub model_config: VipLlavaConfig,
    /// The model on the autodiff device.
    pub model: VipLlava,
    /// Tokenizer, template and image settings.
    pub encoder: SampleEncoder,
    /// Usable samples in file order (with `prefetch > 0` their `pixel_values` are empty: the
    /// images are decoded when a step needs them, see [`crate::prefetch`]).
    pub samples: Vec<EncodedSample>,
    /// Samples left out.
    pub bad_samples: Vec<BadSample>,
    /// Usable evaluation samples (`eval_data`), in file order.
    pub eval_samples: Vec<EncodedSample>,
    /// Evaluation samples left out.
    pub eval_bad_samples: Vec<BadSample>,
    /// Optimizer steps done.
    pub step: usize,
    /// Losses of the steps done.
    pub losses: Vec<f64>,
    optim: ModuleOptimizer,
    lr_plan: LrPlan,
    trainable: Vec<(String, ParamId)>,
    ranks: Vec<ParamRank>,
    images: Option<Images>,
    device: Device,
    pad_id: u32,
}

impl Trainer {
    /// Loads the model (on `device` with autodiff), the data and the optimizer.
    pub fn new(config: TrainConfig, device: &Device) -> Result<Self, TrainError> {
        config.validate()?;
        let plain = device.clone().without_autodiff();
        let ad = if config.gradient_checkpointing {
            plain.clone().autodiff().gradient_checkpointing()
        } else {
            plain.clone().autodiff()
        };
        let (model, model_config) = build_model(&config, &ad)?;
        let encoder = SampleEncoder::from_model_dir(&config.model, &model_config)?;
        let (samples, bad_samples, images) = if config.prefetch > 0 {
            let (samples, jobs, bad) = load_dataset_deferred(
                &encoder,
                &config.data,
                config.image_folder.as_deref(),
                config.on_bad_sample,
            )?;
            let bad_index: std::collections::BTreeSet<usize> = bad.iter().map(|b| b.index).collect();
            let file_index = (0..)
                .filter(|i| !bad_index.contains(i))
                .take(samples.len())
                .collect();
            let images = Images {
                jobs: Arc::new(jobs),
                file_index,
                prefetcher: None,
            };
            (samples, bad, Some(images))
        } else {
            let (samples, bad) = load_dataset(
                &encoder,
                &config.data,
                config.image_folder.as_deref(),
                config.on_bad_sample,
            )?;
            (samples, bad, None)
        };
        let (eval_samples, eval_bad_samples) = match &config.eval_data {
            Some(eval) => load_dataset(
                &encoder,
                eval,
                config.image_folder.as_deref(),
                config.on_bad_sample,
            )?,
            None => (Vec::new(), Vec::new()),
        };
        let trainable = trainable_params(&model, config.trainable)?;
        let rank: BTreeMap<String, usize> = list_params(&model)
            .into_iter()
            .map(|p| (p.path, p.shape.len()))
            .collect();
        let ranks = trainable
            .iter()
            .map(|(p, id)| (*id, rank.get(p).copied().unwrap_or(0)))
            .collect();
        let model = mark_trainable(model, &trainable);
        let optim = make_optimizer(&config);
        let lr_plan = LrPlan::new(
            config.lr_schedule,
            config.lr,
            config.warmup_ratio,
            schedule(samples.len(), &config).len(),
        )?;
        let pad_id = pad_id(&encoder, &model_config);
        let mut trainer = Self {
            config,
            model_config,
            model,
            encoder,
            samples,
            bad_samples,
            eval_samples,
            eval_bad_samples,
            step: 0,
            losses: Vec::new(),
            optim,
            lr_plan,
            trainable,
            ranks,
            images,
            device: ad,
            pad_id,
        };
        trainer.start_prefetch();
        Ok(trainer)
    }

    /// (Re)starts the background decoding from the current step (with `prefetch > 0`).
    fn start_prefetch(&mut self) {
        let order: Vec<usize> = schedule(self.samples.len(), &self.config)
            .into_iter()
            .skip(self.step)
            .flat_map(|(_, micro)| micro.into_iter().flatten())
            .collect();
        let depth = self.config.prefetch;
        let encoder = self.encoder.clone();
        if let Some(images) = &mut self.images {
            // The old thread stops when its channel closes.
            images.prefetcher = None;
            images.prefetcher = Some(Prefetcher::spawn(encoder, images.jobs.clone(), order, depth));
        }
    }

    /// Sample `i` with its pixels (decoded now, or taken from the prefetcher when `fetch`).
    fn with_pixels(
        &self,
        i: usize,
        fetched: Option<crate::prefetch::Decoded>,
    ) -> Result<EncodedSample, TrainError> {
        let sample = &self.samples[i];
        let Some(images) = &self.images else {
            return Ok(sample.clone());
        };
        let pixels = match fetched {
            Some((j, r)) if j == i => r,
            _ => self.encoder.pixels(&images.jobs[i]),
        };
        match pixels {
            Ok(pixel_values) => Ok(EncodedSample {
                pixel_values,
                ..sample.clone()
            }),
            Err(reason) => Err(TrainError::BadSample(BadSample {
                id: sample.id.clone(),
                index: images.file_index.get(i).copied().unwrap_or(i),
                reason,
            })),
        }
    }

    /// The samples of one micro-batch of the schedule, pixels from the prefetcher.
    fn prefetched_rows(&mut self, indices: &[usize]) -> Result<Vec<EncodedSample>, TrainError> {
        let mut rows = Vec::with_capacity(indices.len());
        let mut resync = false;
        for &i in indices {
            let fetched = self
                .images
                .as_ref()
                .and_then(|im| im.prefetcher.as_ref())
                .and_then(Prefetcher::next);
            resync |= fetched.as_ref().is_some_and(|(j, _)| *j != i);
            rows.push(self.with_pixels(i, fetched)?);
        }
        if resync {
            self.start_prefetch();
        }
        Ok(rows)
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`] with `config`
    /// (which must train the same parameters the same way).
    pub fn resume(config: TrainConfig, checkpoint: &Path, device: &Device) -> Result<Self, TrainError> {
        let state = read_state(checkpoint)?;
        state.check_settings(&config, checkpoint)?;
        let mut trainer = Self::new(config, device)?;
        let ids: Vec<String> = trainer.samples.iter().map(|s| s.id.clone()).collect();
        state.check_samples(&ids, checkpoint)?;
        let values = read_trainable(checkpoint)?;
        let bad = |reason: String| TrainError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason,
        };
        let names: Vec<&String> = trainer.trainable.iter().map(|(p, _)| p).collect();
        if values.len() != names.len() || names.iter().any(|n| !values.contains_key(*n)) {
            return Err(bad("its trained parameters do not match the model's".into()));
        }
        let model = std::mem::replace(
            &mut trainer.model,
            placeholder(&trainer.model_config, &trainer.device),
        );
        let (model, _) = write_params(model, &values).map_err(bad)?;
        trainer.model = mark_trainable(model, &trainer.trainable);
        trainer.optim = load_optimizer(checkpoint, make_optimizer(&trainer.config))?;
        trainer.step = state.step;
        trainer.lr_plan.skip(state.step);
        trainer.start_prefetch();
        trainer.losses = state.losses;
        Ok(trainer)
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> usize {
        schedule(self.samples.len(), &self.config).len()
    }

    /// True when every step is done.
    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// Paths of the parameters that train.
    pub fn trainable_paths(&self) -> Vec<String> {
        self.trainable.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Loss of some samples as one micro-batch (with autodiff graph), its target count and
    /// input tokens. `None` when the samples have no target.
    pub fn loss(&self, indices: &[usize]) -> Result<Option<(Tensor<1>, usize, usize)>, TrainError> {
        if indices.is_empty() {
            return Ok(None);
        }
        let len = self.samples.len();
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(SetupError::SampleIndex { index, len }.into());
        }
        if self.images.is_some() {
            let owned = indices
                .iter()
                .map(|&i| self.with_pixels(i, None))
                .collect::<Result<Vec<_>, _>>()?;
            return self.loss_of(&owned.iter().collect::<Vec<_>>());
        }
        let rows: Vec<&EncodedSample> = indices.iter().map(|&i| &self.samples[i]).collect();
        self.loss_of(&rows)
    }

    /// Loss of some samples (with pixels) as one micro-batch.
    fn loss_of(&self, rows: &[&EncodedSample]) -> Result<Option<(Tensor<1>, usize, usize)>, TrainError> {
        let Batch {
            input,
            labels,
            tokens,
        } = collate(rows, self.pad_id, self.config.dtype.dtype(), &self.device);
        let logits = self.model.forward(input, &mut KvCache::new())?;
        Ok(causal_lm_loss(logits, &labels).map(|(l, n)| (l, n, tokens)))
    }

    /// Gradients of the trainable parameters for the loss of `indices` (one micro-batch),
    /// by path (f32, Burn layout). Does not update the model.
    pub fn gradients(&self, indices: &[usize]) -> Result<BTreeMap<String, TensorData>, TrainError> {
        let Some((loss, _, _)) = self.loss(indices)? else {
            return Ok(BTreeMap::new());
        };
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        let shapes: BTreeMap<String, usize> = list_params(&self.model)
            .into_iter()
            .map(|p| (p.path, p.shape.len()))
            .collect();
        let mut out = BTreeMap::new();
        for (path, id) in &self.trainable {
            let rank = shapes.get(path).copied().unwrap_or(0);
            let data = match rank {
                1 => grads.get::<1>(*id).map(|t| t.into_data()),
                2 => grads.get::<2>(*id).map(|t| t.into_data()),
                3 => grads.get::<3>(*id).map(|t| t.into_data()),
                4 => grads.get::<4>(*id).map(|t| t.into_data()),
                _ => None,
            };
            if let Some(d) = data {
                out.insert(path.clone(), d);
            }
        }
        Ok(out)
    }

    /// Runs the next optimizer step; `None` when the run is complete.
    pub fn step(&mut self) -> Result<Option<StepReport>, TrainError> {
        let steps = schedule(self.samples.len(), &self.config);
        let Some((epoch, micro)) = steps.get(self.step).cloned() else {
            return Ok(None);
        };
        let start = Instant::now();
        let k = micro.len() as f64;
        let mut acc = GradientsAccumulator::<VipLlava>::new();
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let mut targets = 0;
        for indices in &micro {
            let out = if self.images.is_some() {
                let rows = self.prefetched_rows(indices)?;
                self.loss_of(&rows.iter().collect::<Vec<_>>())?
            } else {
                self.loss(indices)?
            };
            let Some((loss, n, t)) = out else {
                tokens += indices
                    .iter()
                    .map(|&i| self.samples[i].input_ids.len())
                    .sum::<usize>();
                continue;
            };
            let value: f32 = loss
                .clone()
                .inner()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(f32::NAN);
            if !value.is_finite() {
                return Err(TrainError::Diverged {
                    step: self.step + 1,
                    loss: value,
                });
            }
            loss_sum += f64::from(value);
            tokens += t;
            targets += n;
            let loss = if micro.len() > 1 { loss.div_scalar(k) } else { loss };
            let grads = GradientsParams::from_grads(loss.backward(), &self.model);
            acc.accumulate(&self.model, grads);
        }
        let mut grads = acc.grads();
        let grad_norm = self
            .config
            .max_grad_norm
            .map(|max| clip_global_norm(&mut grads, &self.ranks, max));
        let lr = self.lr_plan.next_lr();
        let model = std::mem::replace(&mut self.model, placeholder(&self.model_config, &self.device));
        self.model = self.optim.step(lr, model, grads);
        self.step += 1;
        let loss = loss_sum / k;
        self.losses.push(loss);
        let seconds = start.elapsed().as_secs_f64();
        let due = self
            .config
            .eval_every
            .is_some_and(|n| self.step.is_multiple_of(n))
            || self.step == steps.len();
        let eval = if due { self.evaluate()? } else { None };
        Ok(Some(StepReport {
            step: self.step,
            epoch,
            loss,
            lr,
            grad_norm,
            eval,
            tokens,
            targets,
            seconds,
        }))
    }

    /// Loss and perplexity of the current model on the evaluation samples (`eval_data`), in
    /// micro-batches of `batch_size`; `None` without evaluation data.
    pub fn evaluate(&self) -> Result<Option<EvalResult>, TrainError> {
        if self.eval_samples.is_empty() {
            return Ok(None);
        }
        let plain = self.device.clone().without_autodiff();
        let model = self.model.valid();
        let pad = self.pad_id;
        evaluate(
            &model,
            &self.eval_samples,
            pad,
            self.config.dtype.dtype(),
            self.config.batch_size,
            &plain,
            |_| {},
        )
        .map(Some)
    }

    /// Values (f32, Burn layout) of the trained parameters by path.
    pub fn trainable_values(&self) -> BTreeMap<String, TensorData> {
        let names: std::collections::BTreeSet<&str> =
            self.trainable.iter().map(|(p, _)| p.as_str()).collect();
        read_params(&self.model, |p| names.contains(p))
    }

    /// Writes `out/checkpoint-{step}` (complete or absent) and returns its path.
    pub fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        let state = TrainState {
            step: self.step,
            config: self.config.clone(),
            losses: self.losses.clone(),
            sample_ids: self.samples.iter().map(|s| s.id.clone()).collect(),
        };
        crate::checkpoint::save_checkpoint(&state, &self.trainable_values(), &self.optim)
    }

    /// The model without autodiff, adapters kept (for evaluation).
    pub fn inference_model(&self) -> VipLlava {
        self.model.valid()
    }
}

/// Trains as configured (resuming from `out/checkpoint-*` is [`Trainer::resume`]), writing
/// checkpoints every `save_every` steps and at the end, then the merged model into `out`.
pub fn train(
    config: &TrainConfig,
    device: &Device,
    on_step: impl FnMut(&StepReport),
) -> Result<TrainSummary, TrainError> {
    check_out_dir(&config.model, &config.out)?;
    let trainer = Trainer::new(config.clone(), device)?;
    run(trainer, on_step)
}

/// Runs a trainer to the end of its schedule (checkpoints, final model).
pub fn run(mut trainer: Trainer, mut on_step: impl FnMut(&StepReport)) -> Result<TrainSummary, TrainError> {
    check_out_dir(&trainer.config.model, &trainer.config.out)?;
    let mut losses = Vec::new();
    let mut last_saved = None;
    while let Some(report) = trainer.step()? {
        losses.push(report.loss);
        on_step(&report);
        if let Some(n) = trainer.config.save_every
            && report.step % n == 0
        {
            last_saved = Some((report.step, trainer.save_checkpoint()?));
        }
    }
    let checkpoint = match last_saved {
        Some((s, p)) if s == trainer.step => p,
        _ => trainer.save_checkpoint()?,
    };
    // The autodiff model and the optimizer state go before the export: it needs the merged
    // model plus one tensor at a time.
    let model = std::mem::replace(
        &mut trainer.model,
        placeholder(&trainer.model_config, &trainer.device),
    );
    trainer.optim = make_optimizer(&trainer.config);
    let merged = if trainer.config.quantize.is_some() {
        // QLoRA: the adapters go into the unquantized base, rebuilt from the checkpoint
        // (the quantized one in memory goes first).
        drop(model);
        crate::export::merged_model(&trainer.config.model, &checkpoint, &trainer.device)?
    } else {
        let merged = model.valid().materialize();
        drop(model);
        merged
    };
    let options = ExportOptions::of(&trainer.config);
    write_hf_model_with(&merged, &trainer.config.model, &trainer.config.out, &options)?;
    Ok(TrainSummary {
        steps: trainer.step,
        losses,
        checkpoint,
        model_dir: trainer.config.out.clone(),
        bad_samples: trainer.bad_samples.clone(),
    })
}
