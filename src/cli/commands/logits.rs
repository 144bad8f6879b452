//! `vipllava logits`: the last prompt position's logits, as `.npy` (parity checks).

use std::path::PathBuf;

use clap::Args;

use crate::cli::args::{InputArgs, write_npy};

/// Write the last prompt position's logits, float32 [vocab], as .npy.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Output .npy file.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command.
pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.input.batch.is_none(), "--batch is only for generate");
    let pipeline = args.input.pipeline()?;
    let images = args.input.images.load()?;
    let prepared = pipeline.prepare(&images, &args.input.prompt())?;
    let (logits, _) = pipeline.prefill(&prepared)?;
    write_npy(&args.out, &[logits.len() as u64], &logits)?;
    eprintln!(
        "wrote {} [{}] ({} prompt tokens)",
        args.out.display(),
        logits.len(),
        prepared.input_ids.len()
    );
    Ok(())
}
