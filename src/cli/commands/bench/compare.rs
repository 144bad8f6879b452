//! Backend comparison (`vipllava bench --image ... --devices ... --dtypes ...`): the real
//! pipeline (image, chat template, prefill, greedy decode) on each device / dtype /
//! quantization, measured as medians over repeated runs after a warm-up. Each combination
//! runs in a child process (so its peak memory is its own) that prints one JSON result and
//! writes its logits; the parent compares the logits with the cpu/f32 run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::Device;
use clap::Args;
use serde::{Deserialize, Serialize};

use super::stats::{median, peak_rss_mib};
use crate::cli::args::{load_image, read_npy, write_npy};
use vipllava::generation::GenerationOptions;
use vipllava::model::Precision;
use vipllava::pipeline::{Pipeline, PreparedInput, Prompt};
use vipllava::{LoadOptions, Quantization};

/// Backend-comparison options of `bench`.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct CompareArgs {
    /// Question asked about the image in a backend comparison.
    #[arg(
        long,
        default_value = "What is shown in the image? Describe the main object and its surroundings."
    )]
    pub question: String,
    /// Backend comparison on --image with the real pipeline: devices to compare (see
    /// --device of `generate`). Giving --devices or --dtypes selects this mode.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Dtypes to compare (default f32).
    #[arg(long, value_delimiter = ',')]
    pub dtypes: Vec<Precision>,
    /// In a backend comparison, also run each device/dtype with these weight
    /// quantizations (q8, q4); without --devices/--dtypes, quantize the weights of the
    /// batch-size benchmark (one level).
    #[arg(long, value_delimiter = ',')]
    pub quantize: Vec<Quantization>,
    /// Quantize lm_head too, to this level (q8 or q4), wherever --quantize applies (as
    /// llama.cpp's quantized files do; the cpu/f32 reference keeps it in f32).
    #[arg(long)]
    pub quantize_lm_head: Option<Quantization>,
    /// Internal: run one combination in this process and write its logits here.
    #[arg(long, hide = true)]
    pub child_logits: Option<PathBuf>,
}

impl CompareArgs {
    /// Whether a backend comparison was asked for.
    pub fn requested(&self) -> bool {
        !self.devices.is_empty() || !self.dtypes.is_empty()
    }
}

/// Runs the comparison (or, with `--child-logits`, one combination of it).
pub(crate) fn run(
    model: &Path,
    image: Option<&Path>,
    args: &CompareArgs,
    repeats: usize,
    new_tokens: usize,
    json: bool,
) -> anyhow::Result<()> {
    let image_path = image.context("a backend comparison needs --image")?;
    anyhow::ensure!(repeats > 0, "--repeats must be at least 1");
    let devices = if args.devices.is_empty() {
        vec!["cpu".to_string()]
    } else {
        args.devices.clone()
    };
    let dtypes = if args.dtypes.is_empty() {
        vec![Precision::F32]
    } else {
        args.dtypes.clone()
    };
    if let Some(logits_path) = &args.child_logits {
        let image = load_image(image_path)?;
        let spec = ComboSpec {
            device: devices[0].clone(),
            dtype: dtypes[0],
            quantize: args.quantize.first().copied(),
            quantize_lm_head: args.quantize_lm_head,
        };
        let (result, logits) = run_combo(model, &image, &args.question, &spec, repeats, new_tokens)?;
        write_npy(logits_path, &[logits.len() as u64], &logits)?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }

    let mut combos: Vec<(String, Precision, Option<Quantization>)> = Vec::new();
    for device in &devices {
        device.parse::<vipllava::DeviceSpec>()?;
        for &dtype in &dtypes {
            combos.push((device.clone(), dtype, None));
            for &q in &args.quantize {
                combos.push((device.clone(), dtype, Some(q)));
            }
        }
    }
    // The reference every logit is compared with.
    let reference = ("cpu".to_string(), Precision::F32, None);
    if !combos.contains(&reference) {
        combos.insert(0, reference.clone());
    }

    let scratch = tempfile_dir()?;
    let mut results: Vec<(ComboResult, Vec<f32>)> = Vec::new();
    for (n, (device, dtype, quantize)) in combos.iter().enumerate() {
        let logits_path = scratch.join(format!("logits-{n}.npy"));
        let exe = std::env::current_exe().context("locating the vipllava binary")?;
        let mut command = Command::new(exe);
        command
            .arg("bench")
            .arg("--model")
            .arg(model)
            .arg("--image")
            .arg(image_path)
            .arg("--question")
            .arg(&args.question)
            .arg("--devices")
            .arg(device)
            .arg("--dtypes")
            .arg(dtype.to_string())
            .arg("--repeats")
            .arg(repeats.to_string())
            .arg("--new-tokens")
            .arg(new_tokens.to_string())
            .arg("--child-logits")
            .arg(&logits_path);
        if let Some(q) = quantize {
            command.arg("--quantize").arg(q.to_string());
            if let Some(head) = args.quantize_lm_head {
                command.arg("--quantize-lm-head").arg(head.to_string());
            }
        }
        eprintln!(
            "running {device} {dtype}{} ...",
            quantize.map(|q| format!(" {q}")).unwrap_or_default()
        );
        let output = command.output().context("running a benchmark child process")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprintln!("  skipped: {}", stderr.trim().lines().last().unwrap_or("failed"));
            continue;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().context("benchmark child printed nothing")?;
        let result: ComboResult = serde_json::from_str(line).context("benchmark child output")?;
        let logits = read_npy(&logits_path)?;
        results.push((result, logits));
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let reference_logits = results
        .iter()
        .find(|(r, _)| r.device == "cpu" && r.dtype == "f32" && r.quantize.is_none())
        .map(|(_, l)| l.clone());
    let mut table = Vec::new();
    for (mut result, logits) in results {
        if let Some(reference) = &reference_logits
            && reference.len() == logits.len()
        {
            let diff = reference
                .iter()
                .zip(&logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            result.max_abs_logit_diff_vs_cpu_f32 = Some(diff);
        }
        if json {
            println!("{}", serde_json::to_string(&result)?);
        }
        table.push(result);
    }
    if !json {
        print!("{}", render_table(&table));
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vipllava-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct ComboSpec {
    /// `--device` text.
    pub device: String,
    /// Weights and activations dtype.
    pub dtype: Precision,
    /// Weight quantization.
    pub quantize: Option<Quantization>,
    /// `lm_head` quantization.
    pub quantize_lm_head: Option<Quantization>,
}

/// Figures for one combination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ComboResult {
    /// Device as given.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// `q8`, `q4` or none.
    pub quantize: Option<String>,
    /// Model load time, milliseconds (once, not repeated).
    pub load_ms: f64,
    /// Median time of the vision tower + projector on the image, milliseconds.
    pub image_encode_ms: f64,
    /// Median prefill time (image encoding included), milliseconds.
    pub prefill_ms: f64,
    /// Median greedy decode speed, tokens per second.
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the process, MiB (`None` where the OS does not say).
    pub peak_rss_mib: Option<f64>,
    /// Prompt length (image tokens included).
    pub prompt_tokens: usize,
    /// Timed repetitions behind each median.
    pub repeats: usize,
    /// Max |diff| of the last-position logits against cpu/f32 (filled in by the caller).
    pub max_abs_logit_diff_vs_cpu_f32: Option<f32>,
}

/// Runs one combination in this process: load, one untimed warm-up, then `repeats` timed
/// runs of image encoding, prefill and a `new_tokens` greedy decode. Returns the figures and
/// the last-position logits of the prefill.
pub(crate) fn run_combo(
    model_dir: &Path,
    image: &image::DynamicImage,
    question: &str,
    spec: &ComboSpec,
    repeats: usize,
    new_tokens: usize,
) -> anyhow::Result<(ComboResult, Vec<f32>)> {
    let device: Device = vipllava::open_device(&spec.device)?;
    let options = LoadOptions {
        precision: spec.dtype,
        quantize: spec.quantize,
        quantize_lm_head: spec.quantize_lm_head,
    };
    let start = Instant::now();
    let pipeline = Pipeline::load(model_dir, &device, &options)?;
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    let prepared = pipeline.prepare(std::slice::from_ref(image), &Prompt::User(question.into()))?;
    // Decode exactly `new_tokens`: no EOS, so random or tiny models do not stop early.
    let greedy = GenerationOptions {
        max_new_tokens: new_tokens.max(2),
        eos_token_ids: Vec::new(),
        ..GenerationOptions::default()
    };

    let mut encode = Vec::new();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut logits = Vec::new();
    for round in 0..=repeats {
        let encode_ms = time_image_encode(&pipeline, &prepared)?;
        let start = Instant::now();
        let (round_logits, _) = pipeline.prefill(&prepared)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let generation = pipeline.generate(&prepared, &greedy, |_| {})?;
        if round > 0 {
            encode.push(encode_ms);
            prefill.push(prefill_ms);
            decode.push(generation.decode_tokens_per_s);
        }
        logits = round_logits;
    }
    let result = ComboResult {
        device: spec.device.clone(),
        dtype: spec.dtype.to_string(),
        quantize: spec.quantize.map(|q| match spec.quantize_lm_head {
            Some(head) => format!("{q}, lm_head {head}"),
            None => q.to_string(),
        }),
        load_ms,
        image_encode_ms: median(&encode),
        prefill_ms: median(&prefill),
        decode_tokens_per_s: median(&decode),
        peak_rss_mib: peak_rss_mib(),
        prompt_tokens: prepared.input_ids.len(),
        repeats,
        max_abs_logit_diff_vs_cpu_f32: None,
    };
    Ok((result, logits))
}

/// Vision tower + projector on the prepared image, read back to the host so that lazy or
/// asynchronous backends are timed to completion.
fn time_image_encode(pipeline: &Pipeline, prepared: &PreparedInput) -> anyhow::Result<f64> {
    let Some(pixels) = pipeline.pixel_tensor(&prepared.pixel_values) else {
        return Ok(0.0);
    };
    let start = Instant::now();
    let features = pipeline.model().image_features(pixels)?;
    let _ = features.sum().into_data();
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// A readable table of results.
pub(crate) fn render_table(results: &[ComboResult]) -> String {
    let mut out = String::from(
        "| device | dtype | quantize | load ms | image encode ms | prefill ms | decode tok/s | peak RSS MiB | max abs logit diff vs cpu/f32 |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} |\n",
            r.device,
            r.dtype,
            r.quantize.as_deref().unwrap_or("-"),
            r.load_ms,
            r.image_encode_ms,
            r.prefill_ms,
            r.decode_tokens_per_s,
            r.peak_rss_mib
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "?".into()),
            r.max_abs_logit_diff_vs_cpu_f32
                .map(|d| format!("{d:.2e}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    out
}
