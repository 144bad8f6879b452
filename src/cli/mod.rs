//! Subcommands of the `vipllava` binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use vipllava::generate::{GenerationOptions, GenerationOverrides};
use vipllava::hub::{DEFAULT_MODEL, resolve_model};
use vipllava::model::Precision;
use vipllava::pipeline::{Pipeline, Prompt};
use vipllava::{LoadOptions, processor};

mod compare;
mod train;

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
    /// Fine-tune on LLaVA-format data (projector, LoRA or all parameters).
    Train(train::TrainArgs),
    /// Merge a fine-tuning checkpoint into its base model and write a HF model directory.
    Export(train::ExportArgs),
    /// Chat about an image: follow-up questions reuse the KV cache. Commands: /image
    /// (print the image path(s)), /reset, /quit.
    Chat {
        /// Model directory or hub id.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Image(s) the conversation is about.
        #[arg(long, required = true)]
        image: Vec<PathBuf>,
        /// Maximum new tokens per answer (default: generation_config.json, else 256).
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// `crop` (transformers) or `pad` (ViP-LLaVA training).
        #[arg(long, value_enum, default_value_t = ImageModeArg::Crop)]
        image_mode: ImageModeArg,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Measure prefill time and decode tokens/s for several batch sizes on the CPU device,
    /// or, with --devices/--dtypes/--quantize and --image, compare devices, dtypes and
    /// quantizations on the real pipeline.
    Bench {
        /// Model directory (or hub id).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
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
    },
    /// Draw visual prompts on an image and write it (what `generate` would show the model).
    Draw {
        /// Input image.
        #[arg(long)]
        image: PathBuf,
        /// Output image (format from the extension).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        marks: VisualPromptArgs,
    },
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
        /// `crop` (transformers) or `pad` (ViP-LLaVA training).
        #[arg(long, value_enum, default_value_t = ImageModeArg::Crop)]
        image_mode: ImageModeArg,
    },
    /// Convert a model to a Burn-native directory (model.bpk in --dtype, optionally
    /// quantized, plus the tokenizer and processor files) that loads faster in `generate`.
    Convert {
        /// Model directory or hub id.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Output directory (must not exist, or be empty; never the input).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Serve this machine's device to `--device remote:ws://HOST:PORT` clients (Burn's remote
    /// backend over WebSocket: unencrypted, for trusted networks).
    ServeDevice {
        /// Device to serve (cpu, ndarray, wgpu, vulkan, metal, cuda[:N]).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// TCP port.
        #[arg(long, default_value_t = 3000)]
        port: u16,
        /// Address to listen on; 0.0.0.0 serves the whole network.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
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

/// Where and in which precision the model runs.
#[derive(Args, Debug, Clone)]
struct RuntimeArgs {
    /// cpu (Flex), ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT; all but
    /// cpu need the cargo feature of the same name (remote: `remote`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights and activations: f32, f16 or bf16 (norms and softmax stay in f32).
    #[arg(long, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Quantize the linear-layer weights at load time: q8 or q4 (embeddings, lm_head, norms
    /// and biases stay in --dtype).
    #[arg(long)]
    quantize: Option<vipllava::Quantization>,
}

impl RuntimeArgs {
    fn device(&self) -> anyhow::Result<Device> {
        Ok(vipllava::open_device(&self.device)?)
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            precision: self.dtype,
            quantize: self.quantize,
        }
    }
}

#[derive(Args, Debug)]
struct InputArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Model directory or hub id (downloaded into the HF cache).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Input image; repeat for several images in one prompt (the model was trained with
    /// one image per conversation, so several is allowed but untested territory).
    #[arg(long, required_unless_present = "batch")]
    image: Vec<PathBuf>,
    /// The question; wrapped with the images into one user message by the chat template.
    #[arg(long, conflicts_with = "raw_prompt", required_unless_present_any = ["raw_prompt", "batch"])]
    prompt: Option<String>,
    /// A pre-formatted prompt (no chat template) with one `<image>` per image.
    #[arg(long)]
    raw_prompt: Option<String>,
    /// Requests, one JSON object per line: {"image": PATH (or "images": [..]), "prompt":
    /// TEXT (or "raw_prompt"), optional "max_new_tokens", "do_sample", "temperature",
    /// "top_k", "top_p", "repetition_penalty", "seed", "stop"}. Relative image paths are
    /// relative to the file.
    #[arg(long, conflicts_with_all = ["image", "prompt", "raw_prompt"])]
    batch: Option<PathBuf>,
    /// `crop`: transformers' resize + center crop (default). `pad`: pad to a square with
    /// the CLIP mean colour first, as ViP-LLaVA was trained, so marks near an edge survive.
    #[arg(long, value_enum, default_value_t = ImageModeArg::Crop)]
    image_mode: ImageModeArg,
}

/// Visual prompts drawn on the (first) image before it is processed, in original-image
/// pixel coordinates, each with an optional `:colour` suffix (default red).
#[derive(Args, Debug, Default, Clone)]
struct VisualPromptArgs {
    /// Rectangle `x0,y0,x1,y1[:colour]` (repeatable).
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1[:COLOUR]")]
    boxes: Vec<String>,
    /// Ellipse inscribed in `x0,y0,x1,y1[:colour]`.
    #[arg(long = "ellipse", value_name = "X0,Y0,X1,Y1[:COLOUR]")]
    ellipses: Vec<String>,
    /// Triangle `x0,y0,x1,y1,x2,y2[:colour]`.
    #[arg(long = "triangle", value_name = "X0,Y0,X1,Y1,X2,Y2[:COLOUR]")]
    triangles: Vec<String>,
    /// Filled dot `x,y[:colour]`.
    #[arg(long = "point", value_name = "X,Y[:COLOUR]")]
    points: Vec<String>,
    /// Arrow from `x0,y0` to the target `x1,y1[:colour]`.
    #[arg(long = "arrow", value_name = "X0,Y0,X1,Y1[:COLOUR]")]
    arrows: Vec<String>,
    /// Smooth curve through `x,y;x,y;...[:colour]`.
    #[arg(long = "scribble", value_name = "X,Y;X,Y;...[:COLOUR]")]
    scribbles: Vec<String>,
    /// Filled mask from a PNG (white = inside) or a polygon `x,y;x,y;x,y`.
    #[arg(long = "mask", value_name = "PNG|POLYGON[:COLOUR]")]
    masks: Vec<String>,
    /// Outline of a mask PNG or polygon.
    #[arg(long = "mask-contour", value_name = "PNG|POLYGON[:COLOUR]")]
    mask_contours: Vec<String>,
    /// Opacity 1..255 of the marks (default 128 for strokes, 88 for filled masks).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    alpha: Option<u8>,
    /// Line width in pixels (default 3 x max(W, H) / 336).
    #[arg(long)]
    line_width: Option<f32>,
    /// Write the image with the marks (what the model sees before resizing) here.
    #[arg(long, value_name = "PATH")]
    save_prompted_image: Option<PathBuf>,
}

impl VisualPromptArgs {
    fn prompts(&self) -> anyhow::Result<Vec<processor::visual_prompt::VisualPrompt>> {
        let groups: [(&str, &Vec<String>); 8] = [
            ("box", &self.boxes),
            ("ellipse", &self.ellipses),
            ("triangle", &self.triangles),
            ("point", &self.points),
            ("arrow", &self.arrows),
            ("scribble", &self.scribbles),
            ("mask", &self.masks),
            ("mask-contour", &self.mask_contours),
        ];
        let mut out = Vec::new();
        for (kind, specs) in groups {
            for spec in specs {
                let prompt = processor::visual_prompt::parse_cli_shape(kind, spec)
                    .with_context(|| format!("--{kind} {spec}"))?;
                out.push(prompt);
            }
        }
        Ok(out)
    }

    /// Draws the marks on `image`; warns (crop mode) when a mark leaves the crop window.
    fn apply(
        &self,
        image: image::DynamicImage,
        config: &processor::image::ImageProcessorConfig,
        mode: processor::image::ImageMode,
    ) -> anyhow::Result<image::DynamicImage> {
        let prompts = self.prompts()?;
        if prompts.is_empty() {
            if let Some(path) = &self.save_prompted_image {
                image
                    .save(path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            return Ok(image);
        }
        let options = processor::visual_prompt::DrawOptions {
            alpha: self.alpha,
            line_width: self.line_width,
        };
        let drawn = processor::visual_prompt::draw(&image, &prompts, &options)?;
        if mode == processor::image::ImageMode::Crop {
            let (w, h) = (drawn.width(), drawn.height());
            let window = crop_window(w, h, config);
            for prompt in &prompts {
                if let Some((x0, y0, x1, y1)) =
                    processor::visual_prompt::bounding_box(prompt, &options, w, h)?
                    && (x0 < window.0 || y0 < window.1 || x1 > window.2 || y1 > window.3)
                {
                    eprintln!(
                        "warning: the {} {} reaches outside the center crop ({:.0},{:.0})-({:.0},{:.0}) and will be partly cut away; use --image-mode pad",
                        prompt.colour,
                        prompt.shape.name(),
                        window.0,
                        window.1,
                        window.2,
                        window.3
                    );
                }
            }
        }
        let drawn = image::DynamicImage::ImageRgb8(drawn);
        if let Some(path) = &self.save_prompted_image {
            drawn
                .save(path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(drawn)
    }
}

/// The part of a `w x h` image that survives resize-shortest-edge + center crop, in
/// original pixels.
fn crop_window(w: u32, h: u32, config: &processor::image::ImageProcessorConfig) -> (f32, f32, f32, f32) {
    if !config.do_center_crop {
        return (0.0, 0.0, w as f32, h as f32);
    }
    let (w, h) = (w as f32, h as f32);
    let short = w.min(h);
    let crop_w = config.crop_size.width as f32;
    let crop_h = config.crop_size.height as f32;
    let target = match config.size {
        processor::image::Size::ShortestEdge { shortest_edge, .. } => shortest_edge as f32,
        _ => return (0.0, 0.0, w, h),
    };
    let scale = target / short;
    let (rw, rh) = (w * scale, h * scale);
    let left = ((rw - crop_w) / 2.0).max(0.0).floor();
    let top = ((rh - crop_h) / 2.0).max(0.0).floor();
    (
        left / scale,
        top / scale,
        ((left + crop_w) / scale).min(w),
        ((top + crop_h) / scale).min(h),
    )
}

/// `--image-mode` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ImageModeArg {
    Crop,
    Pad,
}

impl From<ImageModeArg> for processor::image::ImageMode {
    fn from(m: ImageModeArg) -> Self {
        match m {
            ImageModeArg::Crop => Self::Crop,
            ImageModeArg::Pad => Self::Pad,
        }
    }
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
    /// With --batch: at most this many requests share a forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    marks: VisualPromptArgs,
}

/// Parses arguments, runs, and turns errors into one readable line and a non-zero exit.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C: remove half-written output directories before exiting (no destructors run).
    let _ = ctrlc::set_handler(|| {
        vipllava::output::remove_staged_on_interrupt();
        std::process::exit(130);
    });
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

fn load_pipeline(spec: &str, runtime: &RuntimeArgs) -> anyhow::Result<Pipeline> {
    let dir = model_dir(spec)?;
    let device = runtime.device()?;
    Pipeline::load(&dir, &device, &runtime.load_options())
        .with_context(|| format!("loading model {}", dir.display()))
}

fn load_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    processor::image::load_image(path).with_context(|| format!("reading image {}", path.display()))
}

fn load_images(paths: &[PathBuf]) -> anyhow::Result<Vec<image::DynamicImage>> {
    paths.iter().map(|p| load_image(p)).collect()
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
        Command::Preprocess {
            model,
            image,
            out,
            image_mode,
        } => {
            let dir = model_dir(&model)?;
            let config = processor::image::ImageProcessorConfig::from_model_dir(&dir)
                .with_context(|| format!("reading processor settings of {}", dir.display()))?;
            let img = load_image(&image)?;
            let pixels = processor::image::preprocess_with_mode(&img, &config, image_mode.into())?;
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
            anyhow::ensure!(input.batch.is_none(), "--batch is only for generate");
            let mut pipeline = load_pipeline(&input.model, &input.runtime)?;
            pipeline.image_mode = input.image_mode.into();
            let images = load_images(&input.image)?;
            let prepared = pipeline.prepare(&images, &prompt_of(&input))?;
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
        Command::Convert { model, out, runtime } => {
            let dir = model_dir(&model)?;
            let device = runtime.device()?;
            let start = std::time::Instant::now();
            let written = vipllava::output::convert_model_dir(&dir, &out, &device, &runtime.load_options())
                .with_context(|| format!("converting {}", dir.display()))?;
            eprintln!(
                "wrote {} ({:?}{}) in {:.1} s",
                written.display(),
                runtime.dtype,
                runtime
                    .quantize
                    .map(|q| format!(", {q} weights"))
                    .unwrap_or_default(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::ServeDevice { device, port, host } => serve_device(&device, &host, port),
        Command::Train(args) => train::train(args),
        Command::Export(args) => train::export(args),
        Command::Bench {
            model,
            random_weights,
            image,
            dtype,
            batch_sizes,
            text_tokens,
            new_tokens,
            repeats,
            json,
            compare,
        } => {
            let dir = model_dir(&model)?;
            if compare.requested() {
                return compare::run(&dir, image.as_deref(), &compare, repeats, new_tokens, json);
            }
            anyhow::ensure!(
                compare.quantize.len() <= 1,
                "the batch-size benchmark takes one --quantize level (give --devices or --dtypes to compare several)"
            );
            let quantize = compare.quantize.first().copied();
            let device = Device::flex();
            let start = std::time::Instant::now();
            let (m, config) = vipllava::bench::bench_model(&dir, random_weights, dtype, quantize, &device)?;
            let load_ms = start.elapsed().as_secs_f64() * 1000.0;
            let pixels = match &image {
                Some(path) => {
                    let img = load_image(path)?;
                    let image_config = processor::image::ImageProcessorConfig::from_model_dir(&dir)
                        .unwrap_or_else(|_| processor::image::ImageProcessorConfig::clip_336());
                    let p = processor::image::preprocess_with_mode(
                        &img,
                        &image_config,
                        processor::image::ImageMode::Crop,
                    )?;
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
                "{}{}",
                dtype,
                quantize.map(|q| format!("+{q}")).unwrap_or_default()
            );
            let input = vipllava::bench::BenchInput {
                pixels,
                text_tokens,
                new_tokens: new_tokens.max(2),
            };
            if !json {
                println!(
                    "model {} ({} parameters), device cpu (flex), dtype {}{}, {} threads, load {:.0} ms",
                    dir.display(),
                    vipllava::info::thousands(config.num_parameters()),
                    dtype,
                    quantize.map(|q| format!(" + {q} weights")).unwrap_or_default(),
                    vipllava::bench::cpu_threads(),
                    load_ms
                );
                println!(
                    "| batch | prompt tokens | image encode ms | prefill ms | decode tokens/s (whole batch) | peak RSS MiB |"
                );
                println!("|---|---|---|---|---|---|");
            }
            // Untimed warm-up: materialises lazily initialised weights and fills caches.
            let warm = vipllava::bench::BenchInput {
                pixels: input.pixels.clone(),
                text_tokens,
                new_tokens: 2,
            };
            vipllava::bench::bench_run(&m, &config, &device, 1, &warm)?;
            for b in batch_sizes {
                anyhow::ensure!(b > 0, "batch sizes must be positive");
                let row =
                    vipllava::bench::bench_batch(&m, &config, &device, b, &input, repeats, load_ms, &label)?;
                if json {
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
        Command::Draw { image, out, marks } => {
            let img = load_image(&image)?;
            let marks = VisualPromptArgs {
                save_prompted_image: Some(out.clone()),
                ..marks
            };
            let config = processor::image::ImageProcessorConfig::clip_336();
            marks.apply(img, &config, processor::image::ImageMode::Pad)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Chat {
            model,
            image,
            max_new_tokens,
            image_mode,
            runtime,
        } => chat(&model, &image, max_new_tokens, image_mode, &runtime),
    }
}

fn generation_options(pipeline: &Pipeline, args: &GenerateArgs) -> GenerationOptions {
    let mut options: GenerationOptions = pipeline.generation_defaults.clone();
    GenerationOverrides {
        max_new_tokens: args.max_new_tokens,
        do_sample: args.do_sample.then_some(true),
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: Some(args.seed),
        stop: Some(args.stop.clone()),
    }
    .apply(&mut options);
    options
}

fn result_json(result: &vipllava::Generation, load_ms: f64) -> serde_json::Value {
    json!({
        "token_ids": result.token_ids,
        "text": result.text,
        "stop_reason": result.stop_reason,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.token_ids.len(),
        "load_ms": load_ms,
        "prefill_ms": result.prefill_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s,
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let mut pipeline = load_pipeline(&args.input.model, &args.input.runtime)?;
    pipeline.image_mode = args.input.image_mode.into();
    let options = generation_options(&pipeline, &args);
    if let Some(batch) = &args.input.batch {
        return generate_batch(&pipeline, &args, batch, &options);
    }
    let mut images = load_images(&args.input.image)?;
    if let Some(first) = images.first_mut() {
        *first = args
            .marks
            .apply(first.clone(), &pipeline.image_config, pipeline.image_mode)?;
    }
    let prepared = pipeline.prepare(&images, &prompt_of(&args.input))?;
    let stdout = std::io::stdout();
    if args.json {
        let result = pipeline.generate(&prepared, &options, |_| {})?;
        println!(
            "{}",
            serde_json::to_string(&result_json(&result, pipeline.load_ms))?
        );
    } else {
        let mut out = stdout.lock();
        pipeline.generate(&prepared, &options, |text| {
            // A closed pipe (e.g. `| head`) must not abort generation with a panic.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
    }
    Ok(())
}

/// One line of a `--batch` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    image: Option<PathBuf>,
    #[serde(default)]
    images: Vec<PathBuf>,
    prompt: Option<String>,
    raw_prompt: Option<String>,
    max_new_tokens: Option<usize>,
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
}

fn generate_batch(
    pipeline: &Pipeline,
    args: &GenerateArgs,
    file: &Path,
    defaults: &GenerationOptions,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", file.display(), n + 1);
        let line: BatchLine = serde_json::from_str(line).with_context(at)?;
        let mut paths: Vec<PathBuf> = line.image.into_iter().chain(line.images).collect();
        for p in &mut paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let images = load_images(&paths).with_context(at)?;
        let prompt = match (line.prompt, line.raw_prompt) {
            (Some(q), None) => Prompt::User(q),
            (None, Some(r)) => Prompt::Raw(r),
            _ => anyhow::bail!("{}: give exactly one of \"prompt\" and \"raw_prompt\"", at()),
        };
        let prepared = pipeline.prepare(&images, &prompt).with_context(at)?;
        let mut options = defaults.clone();
        GenerationOverrides {
            max_new_tokens: line.max_new_tokens,
            do_sample: line.do_sample,
            temperature: line.temperature,
            top_k: line.top_k,
            top_p: line.top_p,
            repetition_penalty: line.repetition_penalty,
            seed: line.seed,
            stop: line.stop,
        }
        .apply(&mut options);
        options.validate().with_context(at)?;
        requests.push((prepared, options));
    }
    let mut index = 0usize;
    for chunk in requests.chunks(args.batch_size) {
        let results = pipeline.generate_batch(chunk, |_, _| {})?;
        for result in results {
            if args.json {
                let mut value = result_json(&result, pipeline.load_ms);
                value["index"] = json!(index);
                println!("{}", serde_json::to_string(&value)?);
            } else {
                println!("[{index}] {}", result.text);
            }
            index += 1;
        }
    }
    Ok(())
}

fn chat(
    model: &str,
    images: &[PathBuf],
    max_new_tokens: Option<usize>,
    image_mode: ImageModeArg,
    runtime: &RuntimeArgs,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let mut pipeline = load_pipeline(model, runtime)?;
    pipeline.image_mode = image_mode.into();
    let mut options = pipeline.generation_defaults.clone();
    if let Some(n) = max_new_tokens {
        options.max_new_tokens = n;
    }
    let mut conversation = vipllava::Conversation::new(&pipeline, load_images(images)?);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("Ask about the image. Commands: /image, /reset, /quit.");
    loop {
        let _ = write!(out, "> ");
        let _ = out.flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                conversation.reset();
                eprintln!("(conversation reset)");
            }
            "/image" => {
                for p in images {
                    let _ = writeln!(out, "{}", p.display());
                }
            }
            question => {
                let result = conversation.ask(question, &options, |text| {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                });
                let _ = writeln!(out);
                if let Err(e) = result {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(feature = "remote")]
fn serve_device(device: &str, host: &str, port: u16) -> anyhow::Result<()> {
    let spec: vipllava::DeviceSpec = device.parse()?;
    anyhow::ensure!(
        !matches!(spec, vipllava::DeviceSpec::Remote(_)),
        "a remote device cannot be served again"
    );
    let device = spec.open()?;
    let listener =
        std::net::TcpListener::bind((host, port)).with_context(|| format!("listening on {host}:{port}"))?;
    let address = listener.local_addr()?;
    eprintln!("serving {spec} at ws://{address} (Ctrl-C to stop)");
    burn::server::RemoteServer::new([device])
        .serve(burn::server::WebSocketTransport::from_listener(listener))
        .map_err(|e| anyhow::anyhow!("remote server: {e}"))
}

#[cfg(not(feature = "remote"))]
fn serve_device(_device: &str, _host: &str, _port: u16) -> anyhow::Result<()> {
    anyhow::bail!(
        "serve-device needs the `remote` cargo feature, which this binary was built without (rebuild with `--features remote`)"
    )
}
