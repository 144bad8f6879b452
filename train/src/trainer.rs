//! The training loop: which parameters train, the optimizer, batching, checkpoints and
//! resume.
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
//! `out/checkpoint-{step}/` holds `trainable.safetensors` (the trained parameters by module
//! path, f32, Burn layout: a `Linear` weight is `[in, out]`), `optimizer.bpk` (the optimizer
//! state) and `train_state.json` (step, settings, losses). Each is written into a temporary
//! directory inside `out` and renamed into place, so a checkpoint is complete or absent.
//! Resuming reloads the base model, the trained parameters and the optimizer state and
//! continues the same deterministic schedule, giving the result of an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Lora, Module, ParamGroup, ParamId};
use burn::optim::{
    AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer, SgdConfig, decay::WeightDecayConfig,
    momentum::MomentumConfig,
};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use vipllava_convert::{LoadOptions, load_model};
use vipllava_model::{ForwardInput, KvCache, Precision, VipLlava, VipLlavaConfig};

use crate::data::{BadSample, EncodedSample, IGNORE_INDEX, OnBadSample, SampleEncoder, load_dataset};
use crate::loss::causal_lm_loss;
use crate::params::{canonical_ids, list_params, read_params, write_params};
use crate::{TrainError, io_err};

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    /// The multi-modal projector only.
    #[default]
    Projector,
    /// LoRA adapters on the language model's projections (everything else frozen).
    Lora,
    /// Every parameter.
    All,
}

/// Optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD (`p -= lr * (g + wd * p)`, with optional momentum).
    #[default]
    Sgd,
    /// AdamW (decoupled weight decay, betas 0.9/0.999, eps 1e-8).
    Adamw,
}

/// Training settings (the CLI flags of `vipllava train`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Base model directory.
    pub model: PathBuf,
    /// Data file (JSON list or JSONL).
    pub data: PathBuf,
    /// Output directory (checkpoints and the final model).
    pub out: PathBuf,
    /// Images are looked up here instead of next to the data file.
    pub image_folder: Option<PathBuf>,
    /// Bad samples: skip (reported) or fail.
    pub on_bad_sample: OnBadSample,
    /// What trains.
    pub trainable: Trainable,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (the update is scaled by `alpha / rank`).
    pub lora_alpha: f64,
    /// LoRA targets: projection names (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`) or the groups `attn` and `mlp`.
    pub lora_targets: Vec<String>,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay (0 = none).
    pub weight_decay: f64,
    /// SGD momentum (0 = none).
    pub momentum: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Recompute activations in the backward pass to save memory.
    pub gradient_checkpointing: bool,
    /// Seed of the LoRA initialisation and of the shuffle.
    pub seed: u64,
    /// Shuffle the samples each epoch (default: file order).
    pub shuffle: bool,
    /// Write a checkpoint every N steps (besides the final one).
    pub save_every: Option<usize>,
    /// Stop after this many steps in total.
    pub max_steps: Option<usize>,
    /// Parameter precision (default f32).
    pub dtype: Precision,
}

impl TrainConfig {
    /// Defaults: projector, SGD lr 1e-3, one epoch, batch 1, LoRA rank 8 alpha 16 on the
    /// attention projections.
    pub fn new(model: impl Into<PathBuf>, data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            data: data.into(),
            out: out.into(),
            image_folder: None,
            on_bad_sample: OnBadSample::Skip,
            trainable: Trainable::Projector,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_targets: vec!["attn".into()],
            optimizer: OptimizerKind::Sgd,
            lr: 1e-3,
            weight_decay: 0.0,
            momentum: 0.0,
            epochs: 1,
            batch_size: 1,
            grad_accum: 1,
            gradient_checkpointing: false,
            seed: 0,
            shuffle: false,
            save_every: None,
            max_steps: None,
            dtype: Precision::F32,
        }
    }

    /// Projection names LoRA adapts.
    pub fn lora_modules(&self) -> Result<Vec<&'static str>, TrainError> {
        const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
        const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
        let mut out: Vec<&'static str> = Vec::new();
        for t in &self.lora_targets {
            let add: Vec<&'static str> = match t.trim() {
                "attn" | "attention" => ATTN.to_vec(),
                "mlp" => MLP.to_vec(),
                "all" => ATTN.iter().chain(MLP.iter()).copied().collect(),
                name => match ATTN.iter().chain(MLP.iter()).find(|n| **n == name) {
                    Some(n) => vec![*n],
                    None => {
                        return Err(TrainError::Setup(format!(
                            "unknown LoRA target `{name}` (attn, mlp, all, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                        )));
                    }
                },
            };
            for a in add {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        if out.is_empty() {
            return Err(TrainError::Setup("no LoRA targets".into()));
        }
        Ok(out)
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Setup(m.into()));
        if self.epochs == 0 {
            return bad("--epochs must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("--lr must be a finite non-negative number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--weight-decay must be finite and non-negative");
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return bad("--momentum must be in [0, 1)");
        }
        if self.trainable == Trainable::Lora {
            if self.lora_rank == 0 {
                return bad("--lora-rank must be at least 1");
            }
            self.lora_modules()?;
        }
        if self.save_every == Some(0) {
            return bad("--save-every must be at least 1");
        }
        if self.dtype == Precision::F16 && self.optimizer == OptimizerKind::Adamw {
            return bad(
                "AdamW cannot train f16 parameters (its epsilon and second moments underflow in f16); use --dtype bf16 or f32, or --optimizer sgd",
            );
        }
        Ok(())
    }
}

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

/// File names inside a checkpoint directory.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// Optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// Step and settings.
pub const STATE_FILE: &str = "train_state.json";

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
    /// Usable samples in file order.
    pub samples: Vec<EncodedSample>,
    /// Samples left out.
    pub bad_samples: Vec<BadSample>,
    /// Optimizer steps done.
    pub step: usize,
    /// Losses of the steps done.
    pub losses: Vec<f64>,
    optim: ModuleOptimizer,
    trainable: Vec<(String, ParamId)>,
    device: Device,
    pad_id: u32,
}

/// `(epoch, micro-batches of sample indices)` for every step.
fn schedule(n: usize, config: &TrainConfig) -> Vec<(usize, Vec<Vec<usize>>)> {
    let mut steps = Vec::new();
    for epoch in 0..config.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        if config.shuffle {
            use rand::seq::SliceRandom;
            use rand::{SeedableRng, rngs::StdRng};
            let mut rng =
                StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
            order.shuffle(&mut rng);
        }
        let micro: Vec<Vec<usize>> = order.chunks(config.batch_size).map(<[usize]>::to_vec).collect();
        for group in micro.chunks(config.grad_accum) {
            steps.push((epoch + 1, group.to_vec()));
        }
    }
    if let Some(max) = config.max_steps {
        steps.truncate(max);
    }
    steps
}

/// Paths of the LoRA base weights for the given projection names.
fn lora_regex(modules: &[&str]) -> String {
    let attn: Vec<&str> = modules
        .iter()
        .copied()
        .filter(|m| ["q_proj", "k_proj", "v_proj", "o_proj"].contains(m))
        .collect();
    let mlp: Vec<&str> = modules
        .iter()
        .copied()
        .filter(|m| ["gate_proj", "up_proj", "down_proj"].contains(m))
        .collect();
    let mut alts = Vec::new();
    if !attn.is_empty() {
        alts.push(format!("self_attn\\.({})", attn.join("|")));
    }
    if !mlp.is_empty() {
        alts.push(format!("mlp\\.({})", mlp.join("|")));
    }
    format!(
        "^language_model\\.layers\\.[0-9]+\\.({})\\.weight$",
        alts.join("|")
    )
}

/// Builds the model as configured: base weights, LoRA adapters when asked, stable ids.
/// Nothing is marked trainable yet.
pub fn build_model(config: &TrainConfig, device: &Device) -> Result<(VipLlava, VipLlavaConfig), TrainError> {
    let loaded = load_model(
        &config.model,
        device,
        &LoadOptions {
            precision: config.dtype,
            quantize: None,
        },
    )?;
    let mut model = loaded.model;
    if config.trainable == Trainable::Lora {
        let group = ParamGroup::from_regex(lora_regex(&config.lora_modules()?))
            .map_err(|e| TrainError::Setup(format!("LoRA targets: {e:?}")))?;
        model = model.apply_lora(Lora::new(config.lora_rank, config.lora_alpha).set_param_group(group));
        model = init_lora_factors(canonical_ids(model), config.seed, config.lora_rank)?;
    }
    Ok((canonical_ids(model), loaded.config))
}

/// Standard LoRA initialisation, `A ~ N(0, 1/rank)` and `B = 0`, drawn from a generator
/// seeded by `seed` and each factor's path, so that it does not depend on any global random
/// state (or on other threads drawing from it).
fn init_lora_factors(model: VipLlava, seed: u64, rank: usize) -> Result<VipLlava, TrainError> {
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let std = 1.0 / rank as f64;
    let mut values = BTreeMap::new();
    for p in list_params(&model) {
        if !p.path.ends_with(".lora.a") {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(seed ^ crate::params::path_id(&p.path).val());
        let n: usize = p.shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller: two normals from two uniforms in (0, 1].
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push((r * t.cos()) as f32);
            if v.len() < n {
                v.push((r * t.sin()) as f32);
            }
        }
        values.insert(p.path, TensorData::new(v, p.shape));
    }
    if values.is_empty() {
        return Err(TrainError::Setup("the LoRA targets match no weight".into()));
    }
    write_params(model, &values)
        .map(|(m, _)| m)
        .map_err(TrainError::Setup)
}

/// True for the paths that train under `trainable`.
pub fn is_trainable(trainable: Trainable, path: &str) -> bool {
    match trainable {
        Trainable::Projector => path.starts_with("multi_modal_projector."),
        Trainable::Lora => path.contains(".lora."),
        Trainable::All => true,
    }
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
        let (samples, bad_samples) = load_dataset(
            &encoder,
            &config.data,
            config.image_folder.as_deref(),
            config.on_bad_sample,
        )?;
        let trainable: Vec<(String, ParamId)> = list_params(&model)
            .into_iter()
            .filter(|p| is_trainable(config.trainable, &p.path))
            .map(|p| (p.path, p.id))
            .collect();
        if trainable.is_empty() {
            return Err(TrainError::Setup("no parameter to train".into()));
        }
        let model = mark_trainable(model, &trainable);
        let optim = make_optimizer(&config);
        let pad_id = encoder
            .tokenizer
            .pad_token_id
            .filter(|&p| (p as usize) < model_config.text.vocab_size && p != encoder.image_token_id)
            .unwrap_or(encoder.eos_token_id);
        Ok(Self {
            config,
            model_config,
            model,
            encoder,
            samples,
            bad_samples,
            step: 0,
            losses: Vec::new(),
            optim,
            trainable,
            device: ad,
            pad_id,
        })
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`] with `config`
    /// (which must train the same parameters the same way).
    pub fn resume(config: TrainConfig, checkpoint: &Path, device: &Device) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason,
        };
        let state: TrainState = serde_json::from_str(
            &std::fs::read_to_string(checkpoint.join(STATE_FILE))
                .map_err(io_err(checkpoint.join(STATE_FILE)))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let s = &state.config;
        if s.trainable != config.trainable
            || s.optimizer != config.optimizer
            || (config.trainable == Trainable::Lora
                && (s.lora_rank != config.lora_rank
                    || s.lora_alpha != config.lora_alpha
                    || config.lora_modules()? != s.lora_modules()?))
        {
            return Err(bad(
                "it was written with other --trainable / --optimizer / LoRA settings".into(),
            ));
        }
        let mut trainer = Self::new(config, device)?;
        let ids: Vec<String> = trainer.samples.iter().map(|s| s.id.clone()).collect();
        if !state.sample_ids.is_empty() && state.sample_ids != ids {
            return Err(bad(format!(
                "it was trained on other samples ({} then, {} now); resume with the same data",
                state.sample_ids.len(),
                ids.len()
            )));
        }
        let values = read_safetensors(&checkpoint.join(TRAINABLE_FILE))?;
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
        let optim = make_optimizer(&trainer.config);
        trainer.optim = optim
            .load(checkpoint.join(OPTIMIZER_FILE))
            .map_err(|e| bad(format!("optimizer state: {e:?}")))?;
        trainer.step = state.step;
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

    /// Model inputs and labels of some samples: right-padded, with a key mask when the
    /// lengths differ.
    fn batch(&self, indices: &[usize]) -> (ForwardInput, Vec<Vec<i64>>, usize) {
        let rows: Vec<&EncodedSample> = indices.iter().map(|&i| &self.samples[i]).collect();
        let t = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut labels = Vec::with_capacity(b);
        let mut mask = Vec::with_capacity(b);
        let mut tokens = 0;
        for r in &rows {
            let n = r.input_ids.len();
            tokens += n;
            ids.extend(r.input_ids.iter().map(|&i| i as i64));
            ids.extend(std::iter::repeat_n(self.pad_id as i64, t - n));
            let mut l = r.labels.clone();
            l.resize(t, IGNORE_INDEX);
            labels.push(l);
            mask.push((0..t).map(|j| j < n).collect::<Vec<bool>>());
        }
        let p0 = &rows[0].pixel_values;
        let mut pix = Vec::with_capacity(b * p0.data.len());
        for r in &rows {
            pix.extend_from_slice(&r.pixel_values.data);
        }
        let pixels = Tensor::<4>::from_data(
            TensorData::new(pix, [b, p0.channels, p0.height, p0.width]),
            &self.device,
        );
        let dtype = self.config.dtype.dtype();
        let pixels = if dtype == DType::F32 {
            pixels
        } else {
            pixels.cast(dtype)
        };
        let input_ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &self.device);
        let mut input = ForwardInput::new(input_ids).with_pixels(pixels);
        if mask.iter().any(|m| m.iter().any(|x| !x)) {
            input.key_mask = Some(mask);
        }
        (input, labels, tokens)
    }

    /// Loss of some samples as one micro-batch (with autodiff graph), its target count and
    /// input tokens. `None` when the samples have no target.
    pub fn loss(&self, indices: &[usize]) -> Result<Option<(Tensor<1>, usize, usize)>, TrainError> {
        if indices.is_empty() {
            return Ok(None);
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= self.samples.len()) {
            return Err(TrainError::Setup(format!(
                "sample index {i} out of range ({} samples)",
                self.samples.len()
            )));
        }
        let (input, labels, tokens) = self.batch(indices);
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
            let Some((loss, n, t)) = self.loss(indices)? else {
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
                return Err(TrainError::Setup(format!(
                    "step {}: the loss is {value} (diverged); lower --lr, or train in f32",
                    self.step + 1
                )));
            }
            loss_sum += f64::from(value);
            tokens += t;
            targets += n;
            let loss = if micro.len() > 1 { loss.div_scalar(k) } else { loss };
            let grads = GradientsParams::from_grads(loss.backward(), &self.model);
            acc.accumulate(&self.model, grads);
        }
        let grads = acc.grads();
        let model = std::mem::replace(&mut self.model, placeholder(&self.model_config, &self.device));
        self.model = self.optim.step(self.config.lr, model, grads);
        self.step += 1;
        let loss = loss_sum / k;
        self.losses.push(loss);
        Ok(Some(StepReport {
            step: self.step,
            epoch,
            loss,
            lr: self.config.lr,
            tokens,
            targets,
            seconds: start.elapsed().as_secs_f64(),
        }))
    }

    /// Values (f32, Burn layout) of the trained parameters by path.
    pub fn trainable_values(&self) -> BTreeMap<String, TensorData> {
        let names: std::collections::BTreeSet<&str> =
            self.trainable.iter().map(|(p, _)| p.as_str()).collect();
        read_params(&self.model, |p| names.contains(p))
    }

    /// Writes `out/checkpoint-{step}` atomically and returns its path.
    pub fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        let out = &self.config.out;
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        let name = format!("checkpoint-{}", self.step);
        let final_dir = out.join(&name);
        let tmp = out.join(format!(".tmp-{name}-{}", std::process::id()));
        let result = (|| {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
            std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
            write_safetensors(&tmp.join(TRAINABLE_FILE), &self.trainable_values(), None)?;
            self.optim
                .save(tmp.join(OPTIMIZER_FILE))
                .map_err(|e| TrainError::Checkpoint {
                    path: tmp.clone(),
                    reason: format!("optimizer state: {e:?}"),
                })?;
            let state = TrainState {
                step: self.step,
                config: self.config.clone(),
                losses: self.losses.clone(),
                sample_ids: self.samples.iter().map(|s| s.id.clone()).collect(),
            };
            let json = serde_json::to_string_pretty(&state).map_err(|e| TrainError::Checkpoint {
                path: tmp.clone(),
                reason: e.to_string(),
            })?;
            std::fs::write(tmp.join(STATE_FILE), json).map_err(io_err(tmp.join(STATE_FILE)))?;
            replace_dir(&tmp, &final_dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|()| final_dir)
    }

    /// The model without autodiff, adapters kept (for evaluation).
    pub fn inference_model(&self) -> VipLlava {
        self.model.valid()
    }
}

/// Renames `tmp` to `dest`, replacing an existing `dest` directory.
pub(crate) fn replace_dir(tmp: &Path, dest: &Path) -> Result<(), TrainError> {
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".old-{}-{}",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("dir"),
            std::process::id()
        ));
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
        std::fs::rename(tmp, dest).map_err(io_err(dest))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dest).map_err(io_err(dest))?;
    }
    Ok(())
}

fn placeholder(config: &VipLlavaConfig, device: &Device) -> VipLlava {
    // Lazily initialised parameters: nothing is allocated until read.
    VipLlava::new(config, device)
}

fn mark_trainable(model: VipLlava, trainable: &[(String, ParamId)]) -> VipLlava {
    let ids: Vec<ParamId> = trainable.iter().map(|(_, id)| *id).collect();
    model.freeze().unfreeze_group(ParamGroup::from_ids(ids))
}

fn make_optimizer(config: &TrainConfig) -> ModuleOptimizer {
    match config.optimizer {
        OptimizerKind::Sgd => {
            let mut c = SgdConfig::new();
            if config.weight_decay > 0.0 {
                c = c.with_weight_decay(Some(WeightDecayConfig::new(config.weight_decay as f32)));
            }
            if config.momentum > 0.0 {
                c = c.with_momentum(Some(
                    MomentumConfig::new()
                        .with_momentum(config.momentum)
                        .with_dampening(0.0)
                        .with_nesterov(false),
                ));
            }
            c.init()
        }
        OptimizerKind::Adamw => AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(config.weight_decay as f32)
            .init(),
    }
}

/// Checks `out` against the model directory: never the same directory, never inside it.
pub fn check_out_dir(model: &Path, out: &Path) -> Result<(), TrainError> {
    let m = model.canonicalize().map_err(io_err(model))?;
    // `out` may not exist yet: resolve its deepest existing ancestor.
    let mut existing = out.to_path_buf();
    let mut rest = Vec::new();
    let o = loop {
        if let Ok(c) = existing.canonicalize() {
            break rest
                .iter()
                .rev()
                .fold(c, |acc: PathBuf, part: &std::ffi::OsString| acc.join(part));
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                };
            }
            _ => {
                return Err(TrainError::Setup(format!(
                    "cannot resolve --out {}",
                    out.display()
                )));
            }
        }
    };
    if o == m || o.starts_with(&m) {
        return Err(TrainError::Setup(format!(
            "the output directory {} is (inside) the model directory {}; choose another --out so the source model is never overwritten",
            out.display(),
            model.display()
        )));
    }
    Ok(())
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
    let merged = trainer.inference_model().materialize();
    crate::export::write_hf_model(&merged, &trainer.config.model, &trainer.config.out)?;
    Ok(TrainSummary {
        steps: trainer.step,
        losses,
        checkpoint,
        model_dir: trainer.config.out.clone(),
        bad_samples: trainer.bad_samples.clone(),
    })
}

/// Reads a safetensors file of f32 tensors by name.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, TensorData>, TrainError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("{name}: expected f32, found {:?}", view.dtype())));
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, TensorData::new(v, view.shape().to_vec()));
    }
    Ok(out)
}

/// Writes f32 tensors to a safetensors file (via a temporary file in the same directory
/// renamed into place).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let v: Vec<f32> = data
            .clone()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| bad(format!("{name}: {e:?}")))?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        buffers.push((name.clone(), data.shape().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(format!("{n}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| bad(e.to_string()))?;
    atomic_write(path, &bytes)
}

/// Writes a file through a temporary file in the same directory and a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let r = std::fs::write(&tmp, bytes)
        .map_err(io_err(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
