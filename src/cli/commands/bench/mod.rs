//! `vipllava bench`: one harness for the two benchmarks. Without `--devices`/`--dtypes`,
//! the batch-size benchmark ([`batch`]: prefill time and decode tokens/s per batch size on
//! the CPU device); with them, the backend comparison on the real pipeline ([`compare`]).
//! Both report through [`stats`]. Timings are printed, never asserted.

mod batch;
mod compare;
mod stats;

use std::path::PathBuf;

use burn::tensor::Device;
use clap::Args;

use crate::cli::args::{ModelArgs, load_image};
use vipllava::model::Precision;
use vipllava::processor::image::{ImageMode, ImageProcessorConfig, preprocess_with_mode};

/// Measure prefill time and decode tokens/s for several batch sizes on the CPU device,
/// or, with --devices/--dtypes/--quantize and --image, compare devices, dtypes and
/// quantizations on the real pipeline.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Build the model with random weights from config.json alone (no download).
    #[arg(long)]
    random_weights: bool,
    /// Image to encode (preprocessed with the model's processor config, CLIP-336 if
    /// absent); a synthetic pattern when omitted.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Weight and activation dtype: f32, f16 or bf16.
    #[arg(long, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    batch_sizes: Vec<usize>,
    /// Text tokens in the prompt besides the image.
    #[arg(long, default_value_t = 40)]
    text_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed runs per batch size (medians are reported), after one untimed warm-up.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compare: compare::CompareArgs,
}

/// Runs the command.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    if args.compare.requested() {
        return compare::run(
            &dir,
            args.image.as_deref(),
            &args.compare,
            args.repeats,
            args.new_tokens,
            args.json,
        );
    }
    anyhow::ensure!(
        args.compare.quantize.len() <= 1,
        "the batch-size benchmark takes one --quantize level (give --devices or --dtypes to compare several)"
    );
    let quantize = args.compare.quantize.first().copied();
    let device = Device::flex();
    let start = std::time::Instant::now();
    let head = args.compare.quantize_lm_head;
    let (model, config) = batch::bench_model(&dir, args.random_weights, args.dtype, quantize, head, &device)?;
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    let pixels = match &args.image {
        Some(path) => {
            let img = load_image(path)?;
            let image_config = ImageProcessorConfig::from_model_dir(&dir)
                .unwrap_or_else(|_| ImageProcessorConfig::clip_336());
            let p = preprocess_with_mode(&img, &image_config, ImageMode::Crop)?;
            let side = config.vision.image_size;
            anyhow::ensure!(
                p.height == side && p.width == side,
                "the processor gives {}x{} pixels but the model expects {side}x{side}",
                p.height,
                p.width
            );
            Some(p.data)
        }
        None => None,
    };
    let label = format!(
        "{}{}{}",
        args.dtype,
        quantize.map(|q| format!("+{q}")).unwrap_or_default(),
        head.map(|q| format!("+head-{q}")).unwrap_or_default()
    );
    let input = batch::BenchInput {
        pixels,
        text_tokens: args.text_tokens,
        new_tokens: args.new_tokens.max(2),
    };
    if !args.json {
        println!(
            "model {} ({} parameters), device cpu (flex), dtype {}{}{}, {} threads, load {:.0} ms",
            dir.display(),
            crate::cli::commands::info::thousands(config.num_parameters()),
            args.dtype,
            quantize.map(|q| format!(" + {q} weights")).unwrap_or_default(),
            head.map(|q| format!(" + {q} lm_head")).unwrap_or_default(),
            stats::cpu_threads(),
            load_ms
        );
        println!(
            "| batch | prompt tokens | image encode ms | prefill ms | decode tokens/s (whole batch) | peak RSS MiB |"
        );
        println!("|---|---|---|---|---|---|");
    }
    // Untimed warm-up: materialises lazily initialised weights and fills caches.
    let warm = batch::BenchInput {
        pixels: input.pixels.clone(),
        text_tokens: args.text_tokens,
        new_tokens: 2,
    };
    batch::bench_run(&model, &config, &device, 1, &warm)?;
    for &b in &args.batch_sizes {
        anyhow::ensure!(b > 0, "batch sizes must be positive");
        let row = batch::bench_batch(&model, &config, &device, b, &input, args.repeats, load_ms, &label)?;
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} |",
                row.batch_size,
                row.prompt_tokens,
                row.image_encode_ms,
                row.prefill_ms,
                row.decode_tokens_per_s,
                row.peak_rss_mb
            );
        }
    }
    Ok(())
}
