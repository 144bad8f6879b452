//! `vipllava eval`: loss and perplexity of a model (optionally with a fine-tuning checkpoint
//! applied) over every answer token of a data file, labelled as `train` labels it, and
//! greedy answers written for scoring.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cli::args::model_dir;
use vipllava::generation::GenerationOverrides;
use vipllava::model::Precision;
use vipllava::pipeline::{Pipeline, PipelineOptions};
use vipllava::processor::ContentPart;
use vipllava::train::batch::pad_id;
use vipllava::train::checkpoint::read_state;
use vipllava::train::data::{OnBadSample, RawSample, SampleEncoder, load_dataset, read_samples};
use vipllava::train::eval::{evaluate, resolve_adapter};
use vipllava::train::export::merged_model;
use vipllava::{LoadOptions, Prompt};

/// Loss and perplexity over a data file in the training format; optionally greedy answers.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Base model directory or hub id.
    #[arg(long)]
    model: String,
    /// A fine-tuning checkpoint applied to the model before evaluating: `train`'s
    /// out/checkpoint-N (LoRA adapters merged, or the trained projector / all parameters),
    /// or a training output directory (its latest checkpoint).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Data file: JSON list or JSONL of {"id", "image", "conversations"[, "visual_prompts"]}.
    #[arg(long)]
    data: PathBuf,
    /// Folder the images are relative to (default: the data file's folder).
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// What to do with unusable samples.
    #[arg(long, value_enum, default_value_t = OnBadSample::Skip)]
    on_bad_sample: OnBadSample,
    /// Samples per forward pass (loss and generation).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Print one JSON object {loss, perplexity, samples, targets} instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Write greedy answers to the first question of each sample here, one JSON object a
    /// line: {id, question, answer, reference}.
    #[arg(long, value_name = "OUT.jsonl")]
    generate: Option<PathBuf>,
    /// With --generate: most new tokens per answer (default: generation_config.json, else 256).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// cpu, ndarray, wgpu, vulkan, metal, cuda[:N] or remote:ws://HOST:PORT (see `generate`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights and activations: f32, f16 or bf16 (with --adapter: the checkpoint's).
    #[arg(long, default_value_t = Precision::F32)]
    dtype: Precision,
}

/// Runs the command.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let device = vipllava::open_device(&args.device)?;
    let base = model_dir(&args.model)?;
    let adapter = match &args.adapter {
        Some(a) => Some(resolve_adapter(a)?),
        None => None,
    };
    let precision = match &adapter {
        Some(ckpt) => read_state(ckpt)?.config.dtype,
        None => args.dtype,
    };
    let options = PipelineOptions::from(LoadOptions {
        precision,
        quantize: None,
        quantize_lm_head: None,
    });
    let mut pipeline = Pipeline::load_with(&base, &device, &options)
        .with_context(|| format!("loading model {}", base.display()))?;
    if let Some(ckpt) = &adapter {
        *pipeline.model_mut() = merged_model(&base, ckpt, &device)
            .with_context(|| format!("applying {} to {}", ckpt.display(), base.display()))?;
    }
    let encoder = SampleEncoder::from_model_dir(&base, pipeline.config())?;
    let (samples, bad) = load_dataset(
        &encoder,
        &args.data,
        args.image_folder.as_deref(),
        args.on_bad_sample,
    )?;
    for b in &bad {
        eprintln!("skipping sample {} (#{}): {}", b.id, b.index, b.reason);
    }
    let bar = progress(samples.len(), "scoring", args.json);
    let pad = pad_id(&encoder, pipeline.config());
    let result = evaluate(
        pipeline.model(),
        &samples,
        pad,
        precision.dtype(),
        args.batch_size,
        &device,
        |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    if let Some(out) = &args.generate {
        let raw = read_samples(&args.data)?;
        let bad_index: std::collections::BTreeSet<usize> = bad.iter().map(|b| b.index).collect();
        let usable: Vec<&RawSample> = raw
            .iter()
            .enumerate()
            .filter(|(i, _)| !bad_index.contains(i))
            .map(|(_, s)| s)
            .collect();
        anyhow::ensure!(
            usable.len() == samples.len(),
            "the data file changed while it was read"
        );
        let pairs: Vec<(&RawSample, Vec<vipllava::processor::image::PixelValues>)> = usable
            .into_iter()
            .zip(&samples)
            .map(|(r, s)| (r, vec![s.pixel_values.clone()]))
            .collect();
        generate_answers(&pipeline, &encoder, pairs, &args, out)?;
    }
    if args.json {
        println!(
            "{}",
            json!({"loss": result.loss, "perplexity": result.perplexity, "samples": result.samples, "targets": result.targets})
        );
    } else {
        println!(
            "loss {:.6}  perplexity {:.4}  ({} samples, {} answer tokens)",
            result.loss, result.perplexity, result.samples, result.targets
        );
    }
    Ok(())
}

/// A progress bar on stderr (hidden with `--json`).
fn progress(len: usize, what: &str, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} samples [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Greedy answers to each sample's conversation up to its first answer (the image with its
/// visual prompts, preprocessed as for the loss), in batches, one JSON line each.
fn generate_answers(
    pipeline: &Pipeline,
    encoder: &SampleEncoder,
    samples: Vec<(&RawSample, Vec<vipllava::processor::image::PixelValues>)>,
    args: &EvalArgs,
    out: &Path,
) -> anyhow::Result<()> {
    let mut options = pipeline.generation_defaults().clone();
    GenerationOverrides {
        max_new_tokens: args.max_new_tokens,
        do_sample: Some(false),
        ..GenerationOverrides::default()
    }
    .apply(&mut options);
    options.validate()?;
    let tag = encoder.image_tokens.image_token.as_str();
    let mut requests = Vec::with_capacity(samples.len());
    let mut meta = Vec::with_capacity(samples.len());
    for (raw, pixels) in samples {
        let at = || format!("sample {}", raw.id_text());
        let messages = SampleEncoder::messages(&raw.conversations, tag).with_context(at)?;
        let answer = messages
            .iter()
            .position(|m| m.role == "assistant")
            .with_context(|| format!("{}: no answer", at()))?;
        let question = messages[..answer]
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .and_then(|m| {
                m.content.iter().find_map(|c| match c {
                    ContentPart::Text { text } => Some(text.clone()),
                    ContentPart::Image => None,
                })
            })
            .unwrap_or_default();
        let reference = raw
            .conversations
            .iter()
            .find(|t| t.from == "gpt")
            .map(|t| t.value.clone())
            .unwrap_or_default();
        let prompt = Prompt::Messages(messages[..answer].to_vec());
        let prepared = pipeline.prepare_preprocessed(pixels, &prompt).with_context(at)?;
        requests.push((prepared, options.clone()));
        meta.push((raw.id_text(), question, reference));
    }
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let bar = progress(requests.len(), "answering", args.json);
    let mut done = 0usize;
    for (chunk, info) in requests.chunks(args.batch_size).zip(meta.chunks(args.batch_size)) {
        let results = pipeline.generate_batch(chunk, |_, _| {})?;
        for (result, (id, question, reference)) in results.iter().zip(info) {
            let line = json!({"id": id, "question": question, "answer": result.text, "reference": reference});
            writeln!(w, "{line}").with_context(|| format!("writing {}", out.display()))?;
        }
        done += chunk.len();
        bar.set_position(done as u64);
    }
    w.flush().with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    Ok(())
}
