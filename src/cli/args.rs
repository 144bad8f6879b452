//! Argument groups shared by several commands, each declared once: which model, where and
//! in which precision it runs, how tokens are sampled, which images and how they are
//! processed, and the visual prompts drawn on them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::Device;
use clap::Args;
use image::DynamicImage;

use vipllava::generation::{GenerationOptions, GenerationOverrides};
use vipllava::hub::{DEFAULT_MODEL, resolve_model};
use vipllava::model::Precision;
use vipllava::pipeline::{Pipeline, PipelineOptions};
use vipllava::processor::image::{ImageMode, ImageProcessorConfig, crop_window};
use vipllava::processor::visual_prompt::{self, ArrowHead, DrawOptions, MarkStyle, VisualPrompt};
use vipllava::{LoadOptions, Quantization};

/// `--model`: a local directory or a hub id.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (HF layout: config.json [+ safetensors], or a `convert` output) or
    /// hub id (downloaded into the HF cache).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
}

impl ModelArgs {
    /// The local directory (downloading a hub id first).
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        model_dir(&self.model)
    }
}

/// Where and in which precision the model runs.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// cpu (Flex), ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT; all but
    /// cpu need the cargo feature of the same name (remote: `remote`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations: f32, f16 or bf16 (norms and softmax stay in f32).
    #[arg(long, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Quantize the linear-layer weights at load time: q8 or q4 (embeddings, lm_head, norms
    /// and biases stay in --dtype).
    #[arg(long)]
    pub quantize: Option<Quantization>,
    /// Quantize lm_head too, to q8 or q4 (faster decode, less memory, slightly different
    /// logits; llama.cpp's quantized files do this). Not for checkpoints that tie lm_head to
    /// the token embeddings.
    #[arg(long)]
    pub quantize_lm_head: Option<Quantization>,
}

impl RuntimeArgs {
    /// Opens `--device`.
    pub fn device(&self) -> anyhow::Result<Device> {
        Ok(vipllava::open_device(&self.device)?)
    }

    /// `--dtype` and `--quantize` as load options.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            precision: self.dtype,
            quantize: self.quantize,
            quantize_lm_head: self.quantize_lm_head,
        }
    }
}

/// Loads the pipeline of `--model` on `--device`.
pub fn load_pipeline(
    model: &ModelArgs,
    runtime: &RuntimeArgs,
    image_mode: ImageMode,
) -> anyhow::Result<Pipeline> {
    let dir = model.dir()?;
    let device = runtime.device()?;
    let options = PipelineOptions::from(runtime.load_options()).with_image_mode(image_mode);
    Pipeline::load_with(&dir, &device, &options).with_context(|| format!("loading model {}", dir.display()))
}

/// How tokens are picked and when generation stops (defaults: `generation_config.json`).
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Maximum new tokens (default: generation_config.json, else 256).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sample instead of greedy decoding (implied by --temperature/--top-k/--top-p).
    #[arg(long)]
    pub do_sample: bool,
    /// Sampling temperature (> 0).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens when sampling (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Repetition penalty (1.0 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The pipeline's defaults with these flags applied, checked.
    pub fn options(&self, pipeline: &Pipeline) -> anyhow::Result<GenerationOptions> {
        let mut options = pipeline.generation_defaults().clone();
        GenerationOverrides {
            max_new_tokens: self.max_new_tokens,
            do_sample: self.do_sample.then_some(true),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: Some(self.seed),
            stop: Some(self.stop.clone()),
        }
        .apply(&mut options);
        options.validate()?;
        Ok(options)
    }
}

/// The images a prompt is about and how non-square ones reach the model.
#[derive(Args, Debug, Clone, Default)]
pub struct ImageArgs {
    /// Input image; repeat for several images in one prompt (the model was trained with
    /// one image per conversation, so several is allowed but untested territory).
    #[arg(long)]
    pub image: Vec<PathBuf>,
    #[command(flatten)]
    pub mode: ImageModeArgs,
}

impl ImageArgs {
    /// Decodes every `--image`; at least one is required.
    pub fn load(&self) -> anyhow::Result<Vec<DynamicImage>> {
        anyhow::ensure!(!self.image.is_empty(), "--image is required");
        load_images(&self.image)
    }
}

/// `--image-mode`.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct ImageModeArgs {
    /// `crop`: transformers' resize + center crop (default). `pad`: pad to a square with
    /// the CLIP mean colour first, as ViP-LLaVA was trained, so marks near an edge survive.
    #[arg(long = "image-mode", value_enum, default_value_t = ImageModeArg::Crop)]
    pub image_mode: ImageModeArg,
}

impl ImageModeArgs {
    /// The processor's mode.
    pub fn mode(&self) -> ImageMode {
        self.image_mode.into()
    }
}

/// `--image-mode` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageModeArg {
    /// Resize the shortest edge, then center-crop.
    #[default]
    Crop,
    /// Pad to a square first.
    Pad,
}

impl From<ImageModeArg> for ImageMode {
    fn from(m: ImageModeArg) -> Self {
        match m {
            ImageModeArg::Crop => Self::Crop,
            ImageModeArg::Pad => Self::Pad,
        }
    }
}

/// Decodes an image file with the processor's Pillow-exact decoders.
pub fn load_image(path: &Path) -> anyhow::Result<DynamicImage> {
    vipllava::processor::image::load_image(path).with_context(|| format!("reading image {}", path.display()))
}

/// [`load_image`] for each path.
pub fn load_images(paths: &[PathBuf]) -> anyhow::Result<Vec<DynamicImage>> {
    paths.iter().map(|p| load_image(p)).collect()
}

/// How `--arrow` heads are drawn.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ArrowHeadArg {
    /// A filled triangle.
    #[default]
    Filled,
    /// An open V of the line width.
    Open,
}

impl From<ArrowHeadArg> for ArrowHead {
    fn from(a: ArrowHeadArg) -> Self {
        match a {
            ArrowHeadArg::Filled => Self::Filled,
            ArrowHeadArg::Open => Self::Open,
        }
    }
}

/// Visual prompts drawn on the (first) image before it is processed, in original-image
/// pixel coordinates, each with an optional `:colour` suffix (default red).
#[derive(Args, Debug, Default, Clone)]
pub struct VisualPromptArgs {
    /// Rectangle `x0,y0,x1,y1[:colour]` (repeatable).
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1[:COLOUR]")]
    pub boxes: Vec<String>,
    /// Ellipse inscribed in `x0,y0,x1,y1[:colour]`.
    #[arg(long = "ellipse", value_name = "X0,Y0,X1,Y1[:COLOUR]")]
    pub ellipses: Vec<String>,
    /// Triangle `x0,y0,x1,y1,x2,y2[:colour]`.
    #[arg(long = "triangle", value_name = "X0,Y0,X1,Y1,X2,Y2[:COLOUR]")]
    pub triangles: Vec<String>,
    /// Filled dot `x,y[:colour]`.
    #[arg(long = "point", value_name = "X,Y[:COLOUR]")]
    pub points: Vec<String>,
    /// Arrow from `x0,y0` to the target `x1,y1[:colour]`.
    #[arg(long = "arrow", value_name = "X0,Y0,X1,Y1[:COLOUR]")]
    pub arrows: Vec<String>,
    /// Smooth curve through `x,y;x,y;...[:colour]`.
    #[arg(long = "scribble", value_name = "X,Y;X,Y;...[:COLOUR]")]
    pub scribbles: Vec<String>,
    /// Filled mask from a PNG (white = inside) or a polygon `x,y;x,y;x,y`.
    #[arg(long = "mask", value_name = "PNG|POLYGON[:COLOUR]")]
    pub masks: Vec<String>,
    /// Outline of a mask PNG or polygon.
    #[arg(long = "mask-contour", value_name = "PNG|POLYGON[:COLOUR]")]
    pub mask_contours: Vec<String>,
    /// Opacity 1..255 of the marks (default 128 for strokes, 88 for filled masks).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    pub alpha: Option<u8>,
    /// Line width in pixels (default int(3 x max(W, H) / 336), at least 1).
    #[arg(long)]
    pub line_width: Option<f32>,
    /// Radius of `--point` dots in pixels (default int(8 x max(W, H) / 336), at least 1).
    #[arg(long, value_name = "PX")]
    pub point_radius: Option<f32>,
    /// Side length of arrow heads in pixels (default max(0.35 x arrow length,
    /// int(6 x max(W, H) / 336)), at most the arrow's length).
    #[arg(long, value_name = "PX")]
    pub arrow_head_size: Option<f32>,
    /// Arrow heads filled triangles or open V strokes (training drew both, half each).
    #[arg(long, value_enum, default_value_t = ArrowHeadArg::Filled)]
    pub arrow_head: ArrowHeadArg,
    /// Draw marks anti-aliased instead of hard-edged the way ViP-LLaVA's training code
    /// drew them (Pillow `ImageDraw`, the default).
    #[arg(long)]
    pub smooth: bool,
    /// Write the image with the marks (what the model sees before resizing) here.
    #[arg(long, value_name = "PATH")]
    pub save_prompted_image: Option<PathBuf>,
}

impl VisualPromptArgs {
    /// Each mark flag's name with its values, in the CLI's order.
    fn groups(&self) -> [(&'static str, &Vec<String>); 8] {
        [
            ("box", &self.boxes),
            ("ellipse", &self.ellipses),
            ("triangle", &self.triangles),
            ("point", &self.points),
            ("arrow", &self.arrows),
            ("scribble", &self.scribbles),
            ("mask", &self.masks),
            ("mask-contour", &self.mask_contours),
        ]
    }

    /// The marks, in flag order per shape.
    pub fn prompts(&self) -> anyhow::Result<Vec<VisualPrompt>> {
        let mut out = Vec::new();
        for (kind, specs) in self.groups() {
            for spec in specs {
                let prompt =
                    visual_prompt::parse_cli_shape(kind, spec).with_context(|| format!("--{kind} {spec}"))?;
                out.push(prompt);
            }
        }
        Ok(out)
    }

    /// `--alpha`, `--line-width`, `--point-radius`, `--arrow-head-size`, `--arrow-head`
    /// and `--smooth`.
    pub fn draw_options(&self) -> DrawOptions {
        DrawOptions {
            alpha: self.alpha,
            line_width: self.line_width,
            style: if self.smooth {
                MarkStyle::Smooth
            } else {
                MarkStyle::Training
            },
            point_radius: self.point_radius,
            arrow_head_size: self.arrow_head_size,
            arrow_head: self.arrow_head.into(),
        }
    }

    /// Draws the marks on `image`; warns (crop mode) when a mark leaves the crop window;
    /// saves the result when `--save-prompted-image` is given.
    pub fn apply(
        &self,
        image: DynamicImage,
        config: &ImageProcessorConfig,
        mode: ImageMode,
    ) -> anyhow::Result<DynamicImage> {
        let prompts = self.prompts()?;
        let drawn = self.draw_marks(image, &prompts, config, mode)?;
        if let Some(path) = &self.save_prompted_image {
            drawn
                .save(path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(drawn)
    }

    /// Whether any mark flag (`--box`, `--arrow`, ...) or `--save-prompted-image` is given.
    pub fn has_marks(&self) -> bool {
        self.groups().iter().any(|(_, v)| !v.is_empty()) || self.save_prompted_image.is_some()
    }

    /// Draws `prompts` on `image` with these flags' options; warns (crop mode) when a mark
    /// leaves the crop window.
    pub fn draw_marks(
        &self,
        image: DynamicImage,
        prompts: &[VisualPrompt],
        config: &ImageProcessorConfig,
        mode: ImageMode,
    ) -> anyhow::Result<DynamicImage> {
        Ok(if prompts.is_empty() {
            image
        } else {
            let options = self.draw_options();
            let drawn = visual_prompt::draw_image(&image, prompts, &options)?;
            if mode == ImageMode::Crop {
                warn_outside_crop(&drawn, prompts, &options, config)?;
            }
            drawn
        })
    }
}

/// Warns about each mark that reaches outside the part of the image that survives the
/// center crop.
fn warn_outside_crop(
    image: &DynamicImage,
    prompts: &[VisualPrompt],
    options: &DrawOptions,
    config: &ImageProcessorConfig,
) -> anyhow::Result<()> {
    let (w, h) = (image.width(), image.height());
    let window = crop_window(w, h, config);
    for prompt in visual_prompt::marks_outside(prompts, options, w, h, &window)? {
        eprintln!(
            "warning: the {} {} reaches outside the center crop ({:.0},{:.0})-({:.0},{:.0}) and will be partly cut away; use --image-mode pad",
            prompt.colour,
            prompt.shape.name(),
            window.x0,
            window.y0,
            window.x1,
            window.y1
        );
    }
    Ok(())
}

/// A question about images, or a file of such requests (`generate`, `logits`).
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// The question; wrapped with the images into one user message by the chat template.
    #[arg(long, conflicts_with = "raw_prompt", required_unless_present_any = ["raw_prompt", "batch"])]
    pub prompt: Option<String>,
    /// A pre-formatted prompt (no chat template) with one `<image>` per image.
    #[arg(long)]
    pub raw_prompt: Option<String>,
    /// Requests, one JSON object per line: {"image": PATH (or "images": [..]), "prompt":
    /// TEXT (or "raw_prompt"), optional "max_new_tokens", "do_sample", "temperature",
    /// "top_k", "top_p", "repetition_penalty", "seed", "stop"}. Relative image paths are
    /// relative to the file.
    #[arg(long, conflicts_with_all = ["image", "prompt", "raw_prompt"])]
    pub batch: Option<PathBuf>,
}

impl InputArgs {
    /// `--prompt` or `--raw-prompt`.
    pub fn prompt(&self) -> vipllava::Prompt {
        match (&self.prompt, &self.raw_prompt) {
            (_, Some(raw)) => vipllava::Prompt::Raw(raw.clone()),
            (Some(q), None) => vipllava::Prompt::User(q.clone()),
            (None, None) => vipllava::Prompt::User(String::new()),
        }
    }

    /// Loads the pipeline in `--image-mode`.
    pub fn pipeline(&self) -> anyhow::Result<Pipeline> {
        load_pipeline(&self.model, &self.runtime, self.images.mode.mode())
    }
}

/// Writes float32 values as an `.npy` array of `shape`.
pub fn write_npy(path: &Path, shape: &[u64], data: &[f32]) -> anyhow::Result<()> {
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

/// Reads a float32 `.npy` array, flattened.
pub fn read_npy(path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("parsing {}", path.display()))?;
    Ok(npy.into_vec::<f32>()?)
}

/// `--model` text -> a local directory (commands whose `--model` has its own help text).
pub fn model_dir(spec: &str) -> anyhow::Result<PathBuf> {
    resolve_model(spec).with_context(|| format!("resolving --model {spec}"))
}
