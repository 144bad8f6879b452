//! `vipllava export`: a fine-tuning checkpoint merged into its base model, written as a
//! complete HF model directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::args::model_dir;

/// Merge a fine-tuning checkpoint into its base model and write a complete HF model directory.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Base model directory or hub id (the one the checkpoint was trained from).
    #[arg(long)]
    model: String,
    /// Checkpoint directory written by `train` (out/checkpoint-N).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (HF layout).
    #[arg(long)]
    out: PathBuf,
    /// cpu, ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT (see `generate`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs the command.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let device = vipllava::open_device(&args.device)?;
    let base = model_dir(&args.model)?;
    vipllava::train::export::export(&base, &args.adapter, &args.out, &device)
        .with_context(|| format!("exporting {} onto {}", args.adapter.display(), base.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
