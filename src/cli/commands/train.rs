//! `vipllava train`: fine-tuning with a progress bar (or JSON lines), checkpoints and resume.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cli::args::model_dir;
use vipllava::train::trainer::{TrainConfig, Trainer};

/// Fine-tune on LLaVA-format data (JSON list or JSONL of {"id", "image", "conversations"}).
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    config: TrainConfig,
    /// Continue from a checkpoint directory (out/checkpoint-N).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// cpu, ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT (see `generate`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// One JSON line per step (step, loss, lr, tokens) instead of the progress bar.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let device = vipllava::open_device(&args.device)?;
    let mut config = args.config;
    // `--model` may be a hub id: resolve it to the local directory.
    config.model = model_dir(&config.model.to_string_lossy())?;
    vipllava::train::trainer::check_out_dir(&config.model, &config.out)?;

    let trainer = match &args.resume {
        Some(ckpt) => Trainer::resume(config, ckpt, &device)
            .with_context(|| format!("resuming from {}", ckpt.display()))?,
        None => Trainer::new(config, &device)?,
    };
    let bad = trainer
        .bad_samples
        .iter()
        .map(|b| (b, ""))
        .chain(trainer.eval_bad_samples.iter().map(|b| (b, "evaluation ")));
    for (b, what) in bad {
        if args.json {
            let mut line = json!({"bad_sample": b.id, "index": b.index, "reason": b.reason.to_string()});
            if !what.is_empty() {
                line["eval"] = json!(true);
            }
            eprintln!("{line}");
        } else {
            eprintln!("skipping {what}sample {} (#{}): {}", b.id, b.index, b.reason);
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
                let eval = r
                    .eval
                    .map(|e| format!("  eval loss {:.4}", e.loss))
                    .unwrap_or_default();
                bar.set_message(format!("loss {:.4}{eval}  {:.0} tok/s", r.loss, tps));
                if let Some(e) = r.eval {
                    bar.println(format!(
                        "step {}: eval loss {:.4}, perplexity {:.3} ({} samples, {} targets)",
                        r.step, e.loss, e.perplexity, e.samples, e.targets
                    ));
                }
            }
            None => {
                let mut line = json!({"step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lr, "tokens": r.tokens, "targets": r.targets, "seconds": r.seconds});
                if let Some(norm) = r.grad_norm {
                    line["grad_norm"] = json!(norm);
                }
                if let Some(e) = r.eval {
                    line["eval_loss"] = json!(e.loss);
                    line["eval_perplexity"] = json!(e.perplexity);
                }
                println!("{line}");
            }
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
