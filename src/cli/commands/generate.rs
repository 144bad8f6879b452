//! `vipllava generate`: answer a question about images, streaming the text, or run a
//! file of requests in batches.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cli::args::{InputArgs, SamplingArgs, VisualPromptArgs, load_images};
use vipllava::generation::{GenerationOptions, GenerationOverrides};
use vipllava::processor::visual_prompt::MarkSpec;
use vipllava::{Generation, Pipeline, Prompt};

/// Answer a question about an image, streaming the text.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Print one JSON object (ids, text, stop reason, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// With --batch: at most this many requests share a forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    marks: VisualPromptArgs,
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let pipeline = args.input.pipeline()?;
    let options = args.sampling.options(&pipeline)?;
    if let Some(batch) = &args.input.batch {
        return generate_batch(&pipeline, &args, batch, &options);
    }
    let mut images = args.input.images.load()?;
    if let Some(first) = images.first_mut() {
        *first = args
            .marks
            .apply(first.clone(), pipeline.image_config(), pipeline.image_mode())?;
    }
    let prepared = pipeline.prepare(&images, &args.input.prompt())?;
    if args.json {
        let result = pipeline.generate(&prepared, &options, |_| {})?;
        println!(
            "{}",
            serde_json::to_string(&result_json(&result, pipeline.load_ms()))?
        );
    } else {
        let stdout = std::io::stdout();
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

fn result_json(result: &Generation, load_ms: f64) -> serde_json::Value {
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
    /// Marks drawn on the line's first image, with the command's drawing options.
    #[serde(default)]
    visual_prompts: Vec<MarkSpec>,
}

impl BatchLine {
    fn overrides(&self) -> GenerationOverrides {
        GenerationOverrides {
            max_new_tokens: self.max_new_tokens,
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }
}

fn generate_batch(
    pipeline: &Pipeline,
    args: &GenerateArgs,
    file: &Path,
    defaults: &GenerationOptions,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(
        !args.marks.has_marks(),
        "with --batch, give each line's marks as \"visual_prompts\": [{{\"shape\": \"box\", \"spec\": \"x0,y0,x1,y1:red\"}}] \
         (--box, --arrow, ... and --save-prompted-image apply to a single request)"
    );
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", file.display(), n + 1);
        let line: BatchLine = serde_json::from_str(line).with_context(at)?;
        let mut options = defaults.clone();
        line.overrides().apply(&mut options);
        let mut paths: Vec<PathBuf> = line.image.into_iter().chain(line.images).collect();
        for p in &mut paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let mut images = load_images(&paths).with_context(at)?;
        if !line.visual_prompts.is_empty() {
            let marks = line
                .visual_prompts
                .iter()
                .map(MarkSpec::to_prompt)
                .collect::<Result<Vec<_>, _>>()
                .with_context(at)?;
            let first = images
                .first_mut()
                .with_context(|| format!("{}: visual_prompts need an image", at()))?;
            *first = args
                .marks
                .draw_marks(
                    first.clone(),
                    &marks,
                    pipeline.image_config(),
                    pipeline.image_mode(),
                )
                .with_context(at)?;
        }
        let prompt = match (line.prompt, line.raw_prompt) {
            (Some(q), None) => Prompt::User(q),
            (None, Some(r)) => Prompt::Raw(r),
            _ => anyhow::bail!("{}: give exactly one of \"prompt\" and \"raw_prompt\"", at()),
        };
        let prepared = pipeline.prepare(&images, &prompt).with_context(at)?;
        options.validate().with_context(at)?;
        requests.push((prepared, options));
    }
    let mut index = 0usize;
    for chunk in requests.chunks(args.batch_size) {
        let results = pipeline.generate_batch(chunk, |_, _| {})?;
        for result in results {
            if args.json {
                let mut value = result_json(&result, pipeline.load_ms());
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
