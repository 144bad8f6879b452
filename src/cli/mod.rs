//! Subcommands of the `vipllava` binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use vipllava::generate::GenerationOptions;
use vipllava::hub::{DEFAULT_MODEL, resolve_model};
use vipllava::pipeline::{Pipeline, Prompt};
use vipllava::{LoadOptions, processor};

/// VipLlava (ViP-LLaVA) on Burn: ask about boxes, arrows and scribbles drawn on photos.
#[derive(Parser, Debug)]
#[command(name = "vipllava", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, resolved from config.json (weights optional).
    Info {
        /// Model directory (HF layout: config.json [+ safetensors]) or hub id.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Answer a question about an image, streaming the text.
    Generate(GenerateArgs),
    /// Write the pixel values the model receives, float32 [1, 3, H, W], as .npy.
    Preprocess {
        /// Model directory or hub id.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Input image.
        #[arg(long)]
        image: PathBuf,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the last prompt position's logits, float32 [vocab], as .npy.
    Logits {
        #[command(flatten)]
        input: InputArgs,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct InputArgs {
    /// Model directory or hub id (downloaded into the HF cache).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Input image.
    #[arg(long)]
    image: PathBuf,
    /// The question; wrapped with the image into one user message by the chat template.
    #[arg(long, conflicts_with = "raw_prompt", required_unless_present = "raw_prompt")]
    prompt: Option<String>,
    /// A pre-formatted prompt (no chat template) that contains `<image>`.
    #[arg(long)]
    raw_prompt: Option<String>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Print one JSON object (ids, text, stop reason, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Maximum new tokens (default: generation_config.json, else 256).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sample instead of greedy decoding (implied by --temperature/--top-k/--top-p).
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature (> 0).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens when sampling (0 = all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Repetition penalty (1.0 = off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
}

/// Parses arguments, runs, and turns errors into one readable line and a non-zero exit.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, skipping causes whose text the previous message already
/// includes (many errors embed their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if previous.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        previous = text;
    }
    out.replace('\n', " ")
}

fn model_dir(spec: &str) -> anyhow::Result<PathBuf> {
    resolve_model(spec).with_context(|| format!("resolving --model {spec}"))
}

fn load_pipeline(spec: &str) -> anyhow::Result<Pipeline> {
    let dir = model_dir(spec)?;
    Pipeline::load(&dir, &Device::flex(), &LoadOptions::default())
        .with_context(|| format!("loading model {}", dir.display()))
}

fn load_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    processor::image::load_image(path).with_context(|| format!("reading image {}", path.display()))
}

fn prompt_of(input: &InputArgs) -> Prompt {
    match (&input.prompt, &input.raw_prompt) {
        (_, Some(raw)) => Prompt::Raw(raw.clone()),
        (Some(q), None) => Prompt::User(q.clone()),
        (None, None) => Prompt::User(String::new()),
    }
}

fn write_npy(path: &Path, shape: &[u64], data: &[f32]) -> anyhow::Result<()> {
    use npyz::WriterBuilder;
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()?;
    Ok(())
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { model, json } => {
            let dir = model_dir(&model)?;
            let info = vipllava::info::model_info(&dir)
                .with_context(|| format!("reading model {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.render());
            }
            Ok(())
        }
        Command::Preprocess { model, image, out } => {
            let dir = model_dir(&model)?;
            let config = processor::image::ImageProcessorConfig::from_model_dir(&dir)
                .with_context(|| format!("reading processor settings of {}", dir.display()))?;
            let img = load_image(&image)?;
            let pixels = processor::image::preprocess(&img, &config)?;
            let shape = [
                1,
                pixels.channels as u64,
                pixels.height as u64,
                pixels.width as u64,
            ];
            write_npy(&out, &shape, &pixels.data)?;
            eprintln!("wrote {} {:?}", out.display(), shape);
            Ok(())
        }
        Command::Logits { input, out } => {
            let pipeline = load_pipeline(&input.model)?;
            let img = load_image(&input.image)?;
            let prepared = pipeline.prepare(&[img], &prompt_of(&input))?;
            let (logits, _) = pipeline.prefill(&prepared)?;
            write_npy(&out, &[logits.len() as u64], &logits)?;
            eprintln!(
                "wrote {} [{}] ({} prompt tokens)",
                out.display(),
                logits.len(),
                prepared.input_ids.len()
            );
            Ok(())
        }
        Command::Generate(args) => generate(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let pipeline = load_pipeline(&args.input.model)?;
    let mut options: GenerationOptions = pipeline.generation_defaults.clone();
    if let Some(n) = args.max_new_tokens {
        options.max_new_tokens = n;
    }
    if args.do_sample || args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some() {
        options.do_sample = true;
    }
    if let Some(t) = args.temperature {
        options.temperature = t;
    }
    if let Some(k) = args.top_k {
        options.top_k = Some(k);
    }
    if let Some(p) = args.top_p {
        options.top_p = p;
    }
    if let Some(r) = args.repetition_penalty {
        options.repetition_penalty = r;
    }
    options.seed = args.seed;
    options.stop_strings = args.stop.clone();

    let img = load_image(&args.input.image)?;
    let prepared = pipeline.prepare(&[img], &prompt_of(&args.input))?;
    let stdout = std::io::stdout();
    let result = if args.json {
        pipeline.generate(&prepared, &options, |_| {})?
    } else {
        let mut out = stdout.lock();
        let result = pipeline.generate(&prepared, &options, |text| {
            // A closed pipe (e.g. `| head`) must not abort generation with a panic.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        result
    };
    if args.json {
        let value = json!({
            "token_ids": result.token_ids,
            "text": result.text,
            "stop_reason": result.stop_reason,
            "prompt_tokens": result.prompt_tokens,
            "new_tokens": result.token_ids.len(),
            "load_ms": pipeline.load_ms,
            "prefill_ms": result.prefill_ms,
            "decode_tokens_per_s": result.decode_tokens_per_s,
        });
        println!("{}", serde_json::to_string(&value)?);
    }
    Ok(())
}
