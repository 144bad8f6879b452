//! `vipllava train`: fine-tuning with a progress bar (or JSON lines), checkpoints and resume.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cli::args::model_dir;
use vipllava::train::data::OnBadSample;
use vipllava::train::trainer::{OptimizerKind, TrainConfig, Trainable, Trainer};

/// Fine-tune on LLaVA-format data (JSON list or JSONL of {"id", "image", "conversations"}).
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model directory (HF layout) or hub id.
    #[arg(long)]
    model: String,
    /// Data file: JSON list or JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: checkpoint-N/ folders and, at the end, the fine-tuned model (HF
    /// layout, LoRA merged) that `generate --model DIR` loads. Never the model directory.
    #[arg(long)]
    out: PathBuf,
    /// Folder the images are relative to (default: the data file's folder).
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// What to do with unusable samples.
    #[arg(long, value_enum, default_value_t = OnBadSample::Skip)]
    on_bad_sample: OnBadSample,
    /// Which parameters train.
    #[arg(long, value_enum, default_value_t = Trainable::Projector)]
    trainable: Trainable,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha (update scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// LoRA targets: attn, mlp, all, or projection names (q_proj, ..., down_proj).
    #[arg(long, value_delimiter = ',', default_value = "attn")]
    lora_targets: Vec<vipllava::train::LoraTarget>,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
    /// Learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Samples per micro-batch (right-padded, with an attention mask).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Recompute activations in the backward pass to save memory.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Seed (LoRA initialisation, shuffle).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shuffle the samples every epoch (default: file order).
    #[arg(long)]
    shuffle: bool,
    /// Write a checkpoint every N steps (one is always written at the end).
    #[arg(long)]
    save_every: Option<usize>,
    /// Stop after N steps in total.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Continue from a checkpoint directory (out/checkpoint-N).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// cpu, ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT (see `generate`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Parameter dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: vipllava::model::Precision,
    /// One JSON line per step (step, loss, lr, tokens) instead of the progress bar.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let device = vipllava::open_device(&args.device)?;
    let mut config = TrainConfig::new(model_dir(&args.model)?, &args.data, &args.out);
    config.image_folder = args.image_folder.clone();
    config.on_bad_sample = args.on_bad_sample;
    config.trainable = args.trainable;
    config.lora_rank = args.lora_rank;
    config.lora_alpha = args.lora_alpha;
    config.lora_targets = args.lora_targets.clone();
    config.optimizer = args.optimizer;
    config.lr = args.lr;
    config.weight_decay = args.weight_decay;
    config.momentum = args.momentum;
    config.epochs = args.epochs;
    config.batch_size = args.batch_size;
    config.grad_accum = args.grad_accum;
    config.gradient_checkpointing = args.gradient_checkpointing;
    config.seed = args.seed;
    config.shuffle = args.shuffle;
    config.save_every = args.save_every;
    config.max_steps = args.max_steps;
    config.dtype = args.dtype;
    vipllava::train::trainer::check_out_dir(&config.model, &config.out)?;

    let trainer = match &args.resume {
        Some(ckpt) => Trainer::resume(config, ckpt, &device)
            .with_context(|| format!("resuming from {}", ckpt.display()))?,
        None => Trainer::new(config, &device)?,
    };
    for b in &trainer.bad_samples {
        if args.json {
            eprintln!(
                "{}",
                json!({"bad_sample": b.id, "index": b.index, "reason": b.reason.to_string()})
            );
        } else {
            eprintln!("skipping sample {} (#{}): {}", b.id, b.index, b.reason);
        }
    }
    let total = trainer.total_steps();
    let done = trainer.step;
    let bar = (!args.json).then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(done as u64);
        bar
    });
    let start = Instant::now();
    let mut tokens_seen = 0usize;
    let summary = vipllava::train::trainer::run(trainer, |r| {
        tokens_seen += r.tokens;
        let tps = tokens_seen as f64 / start.elapsed().as_secs_f64().max(1e-9);
        match &bar {
            Some(bar) => {
                bar.set_position(r.step as u64);
                bar.set_message(format!("loss {:.4}  {:.0} tok/s", r.loss, tps));
            }
            None => println!(
                "{}",
                json!({"step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lr, "tokens": r.tokens, "targets": r.targets})
            ),
        }
    })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    if args.json {
        println!(
            "{}",
            json!({"done": true, "steps": summary.steps, "checkpoint": summary.checkpoint, "model_dir": summary.model_dir})
        );
    } else {
        eprintln!(
            "{} steps; checkpoint {}; fine-tuned model in {}",
            summary.steps,
            summary.checkpoint.display(),
            summary.model_dir.display()
        );
    }
    Ok(())
}
