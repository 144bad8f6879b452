//! Backend comparison: the real pipeline (image, chat template, prefill, greedy decode) on
//! one device / dtype / quantization, measured as medians over repeated runs after a
//! warm-up. `vipllava bench --image ... --devices ... --dtypes ...` runs each combination in
//! its own process (so peak resident memory is that combination's) and compares the
//! logits with the cpu/f32 run.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{DType, Device};
use serde::{Deserialize, Serialize};
use vipllava_convert::{LoadOptions, Quantization};
use vipllava_model::Precision;

use crate::generate::GenerationOptions;
use crate::pipeline::{Pipeline, PipelineError, PreparedInput, Prompt, pixel_tensor};

/// What to run.
#[derive(Debug, Clone)]
pub struct ComboSpec {
    /// `--device` text.
    pub device: String,
    /// Weights and activations dtype.
    pub dtype: Precision,
    /// Weight quantization.
    pub quantize: Option<Quantization>,
}

/// Figures for one combination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComboResult {
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs one combination in this process: load, one untimed warm-up, then `repeats` timed
/// runs of image encoding, prefill and a `new_tokens` greedy decode. Returns the figures and
/// the last-position logits of the prefill.
pub fn run_combo(
    model_dir: &Path,
    image: &image::DynamicImage,
    question: &str,
    spec: &ComboSpec,
    repeats: usize,
    new_tokens: usize,
) -> Result<(ComboResult, Vec<f32>), PipelineError> {
    let device: Device = crate::device::open_device(&spec.device)?;
    let options = LoadOptions {
        precision: spec.dtype,
        quantize: spec.quantize,
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
        quantize: spec.quantize.map(|q| q.to_string()),
        load_ms,
        image_encode_ms: median(encode),
        prefill_ms: median(prefill),
        decode_tokens_per_s: median(decode),
        peak_rss_mib: peak_rss_mib(),
        prompt_tokens: prepared.input_ids.len(),
        repeats,
        max_abs_logit_diff_vs_cpu_f32: None,
    };
    Ok((result, logits))
}

/// Vision tower + projector on the prepared image, read back to the host so that lazy or
/// asynchronous backends are timed to completion.
fn time_image_encode(pipeline: &Pipeline, prepared: &PreparedInput) -> Result<f64, PipelineError> {
    let pixels: Vec<_> = prepared.pixel_values.iter().collect();
    let Some(pixels) = pixel_tensor(&pixels, &pipeline.device) else {
        return Ok(0.0);
    };
    let start = Instant::now();
    let features = pipeline.model.image_features(pixels)?;
    let _ = features.sum().into_data();
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// A readable table of results.
pub fn render_table(results: &[ComboResult]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
