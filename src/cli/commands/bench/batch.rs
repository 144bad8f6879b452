//! The batch-size benchmark: load time, image encoding, prefill and decode throughput on
//! the CPU device for several batch sizes, on a real checkpoint or on random weights built from a
//! `config.json` alone. The PyTorch side of the comparison is `scripts/bench_pytorch.py`
//! (same prompt ids, same image preprocessing, same field names in `--json`).
//!
//! Timings are printed, never asserted: the machines are shared and noisy.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;
use vipllava::convert::{
    LoadOptions, Quantization, load_model, quantize_lm_head as quantize_lm_head_of, quantize_model,
    read_config,
};
use vipllava::generation::argmax;
use vipllava::model::{ForwardInput, KvCache, LogitsMode, Precision, VipLlava, VipLlavaConfig};
use vipllava::pipeline::logit_rows;

use super::stats::{cpu_threads, median, peak_rss_mib};

/// One measured batch size: medians over the repeats.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BenchRow {
    /// Which implementation (always `"vipllava"`; the PyTorch script writes `"pytorch"`).
    pub side: &'static str,
    /// Weight/activation dtype, with `+q8`/`+q4` for quantized linear weights.
    pub dtype: String,
    /// Worker threads of the CPU backend.
    pub threads: usize,
    /// Requests in the forward pass.
    pub batch_size: usize,
    /// Prompt tokens per request (image tokens included).
    pub prompt_tokens: usize,
    /// Generated tokens per request.
    pub new_tokens: usize,
    /// Timed repeats (after one untimed warm-up).
    pub repeats: usize,
    /// Model load (or random build) time, milliseconds.
    pub load_ms: f64,
    /// Vision tower + projector alone, milliseconds (median).
    pub image_encode_ms: f64,
    /// Prefill wall time (image encoding included) up to the first token, milliseconds (median).
    pub prefill_ms: f64,
    /// Decode wall time for `new_tokens - 1` steps, milliseconds (median).
    pub decode_ms: f64,
    /// Generated tokens per second over the whole batch (median).
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the process so far (`VmHWM`), MiB.
    pub peak_rss_mb: f64,
    /// Greedy tokens of the first request in the last repeat.
    pub tokens: Vec<i64>,
}

/// Inputs shared by every repeat.
pub(crate) struct BenchInput {
    /// `[3 * side * side]` pixels of one image (already preprocessed), or `None` for a
    /// synthetic pattern.
    pub pixels: Option<Vec<f32>>,
    /// Text tokens after the image.
    pub text_tokens: usize,
    /// Tokens generated per request (>= 1).
    pub new_tokens: usize,
}

/// Loads the model of `dir` with `dtype` (and `quantize`d weights), or builds one with
/// random weights when `random_weights` (only `config.json` is read then).
pub(crate) fn bench_model(
    dir: &Path,
    random_weights: bool,
    dtype: Precision,
    quantize: Option<Quantization>,
    quantize_lm_head: Option<Quantization>,
    device: &Device,
) -> anyhow::Result<(VipLlava, VipLlavaConfig)> {
    if random_weights {
        let config = read_config(dir)?;
        if quantize_lm_head.is_some() && config.text.tie_word_embeddings {
            return Err(vipllava::convert::ConvertError::TiedLmHead.into());
        }
        device.seed(0);
        let model = VipLlava::new_random(&config, device);
        let model = match quantize {
            Some(level) => quantize_model(model, level),
            None => model,
        };
        let model = match quantize_lm_head {
            Some(level) => quantize_lm_head_of(model, level),
            None => model,
        };
        Ok((model, config))
    } else {
        let loaded = load_model(
            dir,
            device,
            &LoadOptions {
                precision: dtype,
                quantize,
                quantize_lm_head,
            },
        )?;
        Ok((loaded.model, loaded.config))
    }
}

/// The benchmark prompt: BOS, the image tokens, then `text_tokens` deterministic text ids
/// (the same rule as `scripts/bench_pytorch.py`).
pub(crate) fn bench_prompt_ids(config: &VipLlavaConfig, text_tokens: usize) -> Vec<i64> {
    let vocab = config.text.vocab_size as i64;
    let image_token = config.image_token_index as i64;
    let mut row: Vec<i64> = vec![1];
    row.extend(std::iter::repeat_n(image_token, config.image_seq_len()));
    row.extend(
        (0..text_tokens as i64)
            .map(|i| 3 + (i * 7919) % (vocab - 3).max(1))
            .map(|t| if t == image_token { t + 1 } else { t }),
    );
    row
}

/// Timings of one greedy run.
#[derive(Debug, Clone)]
pub(crate) struct RunTimes {
    /// Image encoding alone, ms.
    pub image_encode_ms: f64,
    /// Prefill up to the first token, ms.
    pub prefill_ms: f64,
    /// The remaining decode steps, ms.
    pub decode_ms: f64,
    /// Greedy tokens of row 0.
    pub tokens: Vec<i64>,
}

/// One greedy run of `input.new_tokens` tokens for `batch_size` copies of the benchmark
/// prompt, timed.
pub(crate) fn bench_run(
    model: &VipLlava,
    config: &VipLlavaConfig,
    device: &Device,
    batch_size: usize,
    input: &BenchInput,
) -> anyhow::Result<RunTimes> {
    let row = bench_prompt_ids(config, input.text_tokens);
    let ids: Vec<i64> = (0..batch_size).flat_map(|_| row.clone()).collect();
    let prefill_input = ForwardInput::from_ids(ids, batch_size, device)?;
    let side = config.vision.image_size;
    let one: Vec<f32> = match &input.pixels {
        Some(p) => p.clone(),
        None => (0..3 * side * side)
            .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
            .collect(),
    };
    let pixels: Vec<f32> = (0..batch_size).flat_map(|_| one.iter().copied()).collect();
    let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [batch_size, 3, side, side]), device);

    let start = Instant::now();
    let features = model.image_features(pixels.clone())?;
    let _ = features.slice([0..1, 0..1, 0..1]).into_data();
    let image_encode_ms = start.elapsed().as_secs_f64() * 1000.0;

    let start = Instant::now();
    let mut cache = KvCache::new();
    let logits = model.forward(
        prefill_input
            .with_pixels(pixels)
            .with_logits(LogitsMode::LastOnly),
        &mut cache,
    )?;
    let mut next = last_tokens(logits)?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut tokens = vec![next[0]];
    let start = Instant::now();
    for _ in 1..input.new_tokens {
        let logits = model.forward(
            ForwardInput::from_ids(next.clone(), batch_size, device)?.with_logits(LogitsMode::LastOnly),
            &mut cache,
        )?;
        next = last_tokens(logits)?;
        tokens.push(next[0]);
    }
    let decode_ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(RunTimes {
        image_encode_ms,
        prefill_ms,
        decode_ms,
        tokens,
    })
}

/// Medians of `repeats` runs (after the caller's warm-up) as one row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bench_batch(
    model: &VipLlava,
    config: &VipLlavaConfig,
    device: &Device,
    batch_size: usize,
    input: &BenchInput,
    repeats: usize,
    load_ms: f64,
    dtype_label: &str,
) -> anyhow::Result<BenchRow> {
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        runs.push(bench_run(model, config, device, batch_size, input)?);
    }
    let decoded = (input.new_tokens.saturating_sub(1) * batch_size) as f64;
    let decode_ms = median(&runs.iter().map(|r| r.decode_ms).collect::<Vec<_>>());
    Ok(BenchRow {
        side: "vipllava",
        dtype: dtype_label.to_string(),
        threads: cpu_threads(),
        batch_size,
        prompt_tokens: bench_prompt_ids(config, input.text_tokens).len(),
        new_tokens: input.new_tokens,
        repeats: runs.len(),
        load_ms,
        image_encode_ms: median(&runs.iter().map(|r| r.image_encode_ms).collect::<Vec<_>>()),
        prefill_ms: median(&runs.iter().map(|r| r.prefill_ms).collect::<Vec<_>>()),
        decode_ms,
        decode_tokens_per_s: if decode_ms > 0.0 {
            decoded / (decode_ms / 1000.0)
        } else {
            0.0
        },
        peak_rss_mb: peak_rss_mib().unwrap_or(f64::NAN),
        tokens: runs.last().map(|r| r.tokens.clone()).unwrap_or_default(),
    })
}

/// The greedy token of each row of `[batch, 1, vocab]` logits.
fn last_tokens(logits: Tensor<3>) -> anyhow::Result<Vec<i64>> {
    Ok(logit_rows(logits)?.iter().map(|row| argmax(row) as i64).collect())
}
