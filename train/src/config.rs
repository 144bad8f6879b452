//! Training settings (the flags of `vipllava train`) and their checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vipllava_convert::Quantization;
use vipllava_model::Precision;

use crate::data::OnBadSample;
use crate::error::SetupError;
use crate::lora_target::LoraTarget;
use crate::recipes::LrSchedule;

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
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
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD (`p -= lr * (g + wd * p)`, with optional momentum).
    #[default]
    Sgd,
    /// AdamW (decoupled weight decay, betas 0.9/0.999, eps 1e-8).
    Adamw,
}

/// Dtype of exported weights (`--export-dtype`; default: the base checkpoint's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl ExportDtype {
    /// The Burn dtype.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::F16 => burn::tensor::DType::F16,
            Self::Bf16 => burn::tensor::DType::BF16,
        }
    }

    /// The name `config.json` gives it (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

/// A size in bytes as the hub writes it: a plain number of bytes, or with a unit `KB`,
/// `MB`, `GB` (powers of 1000, as transformers reads them) or `KiB`, `MiB`, `GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 5GB, 500MB, 1000000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = (value * scale).round();
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Training settings. With the `clap` feature they are also the flags of `vipllava train`
/// (the command-line defaults are the ones given there; [`TrainConfig::new`] has its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TrainConfig {
    /// Base model directory (HF layout) or, on the command line, a hub id.
    #[cfg_attr(feature = "clap", arg(long))]
    pub model: PathBuf,
    /// Data file: JSON list or JSONL.
    #[cfg_attr(feature = "clap", arg(long))]
    pub data: PathBuf,
    /// Output directory: checkpoint-N/ folders and, at the end, the fine-tuned model (HF
    /// layout, LoRA merged) that `generate --model DIR` loads. Never the model directory.
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: PathBuf,
    /// Folder the images are relative to (default: the data file's folder).
    #[cfg_attr(feature = "clap", arg(long))]
    pub image_folder: Option<PathBuf>,
    /// What to do with unusable samples.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = OnBadSample::Skip))]
    pub on_bad_sample: OnBadSample,
    /// Which parameters train.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Trainable::Projector))]
    pub trainable: Trainable,
    /// LoRA rank.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 8))]
    pub lora_rank: usize,
    /// LoRA alpha (update scaled by alpha / rank).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 16.0))]
    pub lora_alpha: f64,
    /// LoRA targets: attn, mlp, all, or projection names (q_proj, ..., down_proj).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', default_value = "attn"))]
    pub lora_targets: Vec<LoraTarget>,
    /// Optimizer.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = OptimizerKind::Adamw))]
    pub optimizer: OptimizerKind,
    /// Learning rate.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 2e-4))]
    pub lr: f64,
    /// Weight decay.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.0))]
    pub weight_decay: f64,
    /// SGD momentum.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.0))]
    pub momentum: f64,
    /// Passes over the data.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub epochs: usize,
    /// Samples per micro-batch (right-padded, with an attention mask).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub grad_accum: usize,
    /// Recompute activations in the backward pass to save memory.
    #[cfg_attr(feature = "clap", arg(long))]
    pub gradient_checkpointing: bool,
    /// Seed (LoRA initialisation, shuffle).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Shuffle the samples every epoch (default: file order).
    #[cfg_attr(feature = "clap", arg(long))]
    pub shuffle: bool,
    /// Write a checkpoint every N steps (one is always written at the end).
    #[cfg_attr(feature = "clap", arg(long))]
    pub save_every: Option<usize>,
    /// Stop after N steps in total.
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_steps: Option<usize>,
    /// Parameter dtype: f32, f16 or bf16.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Precision::F32))]
    pub dtype: Precision,
    /// QLoRA: quantize the frozen base's linear weights (q8 or q4) while the LoRA adapters
    /// train in --dtype; the export merges them into the unquantized base.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub quantize: Option<Quantization>,
    /// Learning-rate schedule: constant, or cosine (linear warmup over --warmup-ratio of the
    /// steps, then cosine decay to 0).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = LrSchedule::Constant))]
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Fraction of the steps spent warming up (cosine schedule).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.0))]
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Clip the gradients to this global L2 norm (all trainable parameters together).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Evaluation data (same format as --data): its loss is reported every --eval-every
    /// steps and after the last step.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (with --eval-data).
    #[cfg_attr(feature = "clap", arg(long, requires = "eval_data"))]
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// Decode images on a background thread, this many ahead of the step, instead of all of
    /// them before the first step (0: all up front, kept in memory).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    #[serde(default)]
    pub prefetch: usize,
    /// Dtype of the exported model's weights (default: the base checkpoint's).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    #[serde(default)]
    pub export_dtype: Option<ExportDtype>,
    /// Largest weight file of the exported model (default 5GB, as the hub); bigger models
    /// are sharded with a `model.safetensors.index.json`.
    #[cfg_attr(feature = "clap", arg(long, value_parser = parse_size, hide = true))]
    #[serde(default)]
    pub max_shard_size: Option<u64>,
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
            lora_targets: vec![LoraTarget::Attn],
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
            quantize: None,
            lr_schedule: LrSchedule::Constant,
            warmup_ratio: 0.0,
            max_grad_norm: None,
            eval_data: None,
            eval_every: None,
            prefetch: 0,
            export_dtype: None,
            max_shard_size: None,
        }
    }

    /// The single projections LoRA adapts (groups expanded, each once, in order).
    pub fn lora_modules(&self) -> Result<Vec<LoraTarget>, SetupError> {
        let mut out: Vec<LoraTarget> = Vec::new();
        for p in self.lora_targets.iter().flat_map(|t| t.projections()) {
            if !out.contains(p) {
                out.push(*p);
            }
        }
        if out.is_empty() {
            return Err(SetupError::NoLoraTargets);
        }
        Ok(out)
    }

    /// Checks the settings before anything is loaded.
    pub fn validate(&self) -> Result<(), SetupError> {
        let positive = [
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(SetupError::Zero { flag });
        }
        for (flag, value) in [("--lr", self.lr), ("--weight-decay", self.weight_decay)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(SetupError::NotFiniteNonNegative { flag, value });
            }
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(SetupError::Momentum(self.momentum));
        }
        if self.trainable == Trainable::Lora {
            if self.lora_rank == 0 {
                return Err(SetupError::Zero { flag: "--lora-rank" });
            }
            self.lora_modules()?;
        }
        if self.quantize.is_some() && self.trainable != Trainable::Lora {
            return Err(SetupError::QuantizeNeedsLora);
        }
        if self.save_every == Some(0) {
            return Err(SetupError::Zero { flag: "--save-every" });
        }
        if self.eval_every == Some(0) {
            return Err(SetupError::Zero { flag: "--eval-every" });
        }
        if self.eval_every.is_some() && self.eval_data.is_none() {
            return Err(SetupError::EvalEveryWithoutData);
        }
        if !(self.warmup_ratio.is_finite() && (0.0..=1.0).contains(&self.warmup_ratio)) {
            return Err(SetupError::WarmupRatio(self.warmup_ratio));
        }
        if let Some(max) = self.max_grad_norm
            && !(max.is_finite() && max > 0.0)
        {
            return Err(SetupError::MaxGradNorm(max));
        }
        if self.dtype == Precision::F16 && self.optimizer == OptimizerKind::Adamw {
            return Err(SetupError::AdamwF16);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_flag() {
        let ok = TrainConfig::new("m", "d", "o");
        ok.validate().unwrap();
        let mut c = ok.clone();
        c.grad_accum = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--grad-accum must be at least 1"
        );
        let mut c = ok.clone();
        c.weight_decay = f64::NAN;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--weight-decay must be")
        );
        let mut c = ok.clone();
        c.dtype = Precision::F16;
        c.optimizer = OptimizerKind::Adamw;
        assert!(c.validate().unwrap_err().to_string().contains("bf16"));
        let mut c = ok.clone();
        c.trainable = Trainable::Lora;
        c.lora_targets = vec![];
        assert!(matches!(c.validate(), Err(SetupError::NoLoraTargets)));
    }

    #[test]
    fn sizes_read_as_the_hub_writes_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn saved_configs_round_trip_and_old_ones_read() {
        let mut c = TrainConfig::new("m", "d", "o");
        c.lora_targets = vec![LoraTarget::QProj, LoraTarget::Mlp];
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["lora_targets"], serde_json::json!(["q_proj", "mlp"]));
        let back: TrainConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.lora_targets, c.lora_targets);
        let mut old = json;
        old["lora_targets"] = serde_json::json!(["attention", "down_proj"]);
        let back: TrainConfig = serde_json::from_value(old).unwrap();
        let names: Vec<String> = back
            .lora_modules()
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(names, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]);
    }
}
