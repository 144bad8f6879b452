//! `vipllava preprocess`: the pixel values the model receives, as `.npy`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::args::{ImageModeArgs, ModelArgs, load_image, write_npy};
use vipllava::processor::image::{ImageProcessorConfig, preprocess_with_mode};

/// Write the pixel values the model receives, float32 [1, 3, H, W], as .npy.
#[derive(Args, Debug)]
pub struct PreprocessArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input image.
    #[arg(long)]
    image: PathBuf,
    /// Output .npy file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    mode: ImageModeArgs,
}

/// Runs the command.
pub fn run(args: PreprocessArgs) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    let config = ImageProcessorConfig::from_model_dir(&dir)
        .with_context(|| format!("reading processor settings of {}", dir.display()))?;
    let img = load_image(&args.image)?;
    let pixels = preprocess_with_mode(&img, &config, args.mode.mode())?;
    let shape = [
        1,
        pixels.channels as u64,
        pixels.height as u64,
        pixels.width as u64,
    ];
    write_npy(&args.out, &shape, &pixels.data)?;
    eprintln!("wrote {} {:?}", args.out.display(), shape);
    Ok(())
}
