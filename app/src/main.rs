//! `vipllava-app`: the desktop app. `--model`, `--device`, `--dtype`, `--quantize` and
//! `--image` open a model and an image at start.

use std::path::PathBuf;

use clap::Parser;
use vipllava_app::{Launch, VipApp};

/// Draw a visual prompt on a photo, ask about it, watch the answer stream.
#[derive(Parser, Debug)]
#[command(name = "vipllava-app", version)]
struct Cli {
    /// Model directory or hub id to open at start.
    #[arg(long)]
    model: Option<String>,
    /// cpu, or wgpu/vulkan/metal when built with that feature.
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long)]
    dtype: Option<String>,
    /// none, q8 or q4.
    #[arg(long)]
    quantize: Option<String>,
    /// Image to open at start.
    #[arg(long)]
    image: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let launch = Launch {
        model: cli.model,
        device: cli.device,
        dtype: cli.dtype,
        quantize: cli.quantize,
        image: cli.image,
    };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("VipLlava")
            .with_inner_size([1280.0, 800.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native(
        "vipllava-app",
        options,
        Box::new(move |cc| Ok(Box::new(VipApp::new(cc, launch)))),
    )
    .map_err(|e| anyhow::anyhow!("the window could not be opened: {e}"))
}
