//! `vipllava draw`: only the visual prompts, drawn and written (what `generate` would show
//! the model before preprocessing).

use std::path::PathBuf;

use clap::Args;

use crate::cli::args::{VisualPromptArgs, load_image};
use vipllava::processor::image::{ImageMode, ImageProcessorConfig};

/// Draw visual prompts on an image and write it (what `generate` would show the model).
#[derive(Args, Debug)]
pub struct DrawArgs {
    /// Input image.
    #[arg(long)]
    image: PathBuf,
    /// Output image (format from the extension).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    marks: VisualPromptArgs,
}

/// Runs the command.
pub fn run(args: DrawArgs) -> anyhow::Result<()> {
    let img = load_image(&args.image)?;
    let marks = VisualPromptArgs {
        save_prompted_image: Some(args.out.clone()),
        ..args.marks
    };
    // Pad mode: the whole image is kept, so there is no crop warning to give.
    marks.apply(img, &ImageProcessorConfig::clip_336(), ImageMode::Pad)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
