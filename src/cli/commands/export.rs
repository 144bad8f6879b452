//! `vipllava export`: a fine-tuning checkpoint merged into its base model, written as a
//! complete HF model directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::args::model_dir;
use vipllava::train::config::{ExportDtype, parse_size};
use vipllava::train::export::{ExportOptions, export_with};
use vipllava::train::shards::MAX_SHARD_BYTES;

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
    /// Dtype of the written weights (default: the base checkpoint's).
    #[arg(long, value_enum)]
    export_dtype: Option<ExportDtype>,
    /// Largest weight file, e.g. 5GB (the default, as the hub) or 500MB; bigger models are
    /// sharded with a model.safetensors.index.json.
    #[arg(long, value_parser = parse_size)]
    max_shard_size: Option<u64>,
}

/// Runs the command.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let device = vipllava::open_device(&args.device)?;
    let base = model_dir(&args.model)?;
    let options = ExportOptions {
        dtype: args.export_dtype,
        max_shard_bytes: args.max_shard_size.unwrap_or(MAX_SHARD_BYTES),
    };
    let report = export_with(&base, &args.adapter, &args.out, &device, &options)
        .with_context(|| format!("exporting {} onto {}", args.adapter.display(), base.display()))?;
    eprintln!(
        "wrote {} ({}, {} weight file{})",
        args.out.display(),
        report.dtype.torch_name(),
        report.weights.files.len(),
        if report.weights.files.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
