//! `vipllava convert`: a Burn-native model directory (burnpack weights in the chosen
//! precision and quantization, plus the tokenizer and processor files).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::args::{ModelArgs, RuntimeArgs};

/// Convert a model to a Burn-native directory (model.bpk in --dtype, optionally
/// quantized, plus the tokenizer and processor files) that loads faster in `generate`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory (must not exist, or be empty; never the input).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Runs the command.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    let device = args.runtime.device()?;
    let start = std::time::Instant::now();
    let written =
        vipllava::convert::output::convert_model_dir(&dir, &args.out, &device, &args.runtime.load_options())
            .with_context(|| format!("converting {}", dir.display()))?;
    eprintln!(
        "wrote {} ({:?}{}{}) in {:.1} s",
        written.display(),
        args.runtime.dtype,
        args.runtime
            .quantize
            .map(|q| format!(", {q} weights"))
            .unwrap_or_default(),
        args.runtime
            .quantize_lm_head
            .map(|q| format!(", {q} lm_head"))
            .unwrap_or_default(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
