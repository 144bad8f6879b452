//! `vipllava bench`: prefill and decode throughput on the CPU device for several batch
//! sizes, on a real checkpoint or on random weights built from a `config.json` alone.
//!
//! Timings are printed, never asserted: the machines are shared and noisy.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;
use vipllava_convert::{LoadOptions, load_model, read_config};
use vipllava_model::{ForwardInput, KvCache, LogitsMode, VipLlava, VipLlavaConfig};

use crate::generate::argmax;
use crate::pipeline::PipelineError;

/// One measured batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Requests in the forward pass.
    pub batch_size: usize,
    /// Prompt tokens per request (image tokens included).
    pub prompt_tokens: usize,
    /// Prefill wall time (image encoding included), milliseconds.
    pub prefill_ms: f64,
    /// Generated tokens per request.
    pub new_tokens: usize,
    /// Decode wall time, milliseconds.
    pub decode_ms: f64,
    /// Generated tokens per second over the whole batch.
    pub decode_tokens_per_s: f64,
}

/// Loads the model of `dir`, or builds one with random weights when `random_weights` (only
/// `config.json` is read then).
pub fn bench_model(
    dir: &Path,
    random_weights: bool,
    device: &Device,
) -> Result<(VipLlava, VipLlavaConfig), PipelineError> {
    if random_weights {
        let config = read_config(dir)?;
        device.seed(0);
        Ok((VipLlava::new(&config, device), config))
    } else {
        let loaded = load_model(dir, device, &LoadOptions::default())?;
        Ok((loaded.model, loaded.config))
    }
}

/// Greedy generation of `new_tokens` tokens for `batch_size` copies of a synthetic prompt
/// (BOS, one image, `text_tokens` text tokens), timed.
pub fn bench_batch(
    model: &VipLlava,
    config: &VipLlavaConfig,
    device: &Device,
    batch_size: usize,
    text_tokens: usize,
    new_tokens: usize,
) -> Result<BenchRow, PipelineError> {
    let image_tokens = config.image_seq_len();
    let vocab = config.text.vocab_size as i64;
    let image_token = config.image_token_index as i64;
    let mut row: Vec<i64> = vec![1];
    row.extend(std::iter::repeat_n(image_token, image_tokens));
    row.extend(
        (0..text_tokens as i64)
            .map(|i| 3 + (i * 7919) % (vocab - 3).max(1))
            .map(|t| if t == image_token { t + 1 } else { t }),
    );
    let prompt_tokens = row.len();
    let ids: Vec<i64> = (0..batch_size).flat_map(|_| row.clone()).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch_size, prompt_tokens]), device);
    let side = config.vision.image_size;
    let pixels: Vec<f32> = (0..batch_size * 3 * side * side)
        .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
        .collect();
    let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [batch_size, 3, side, side]), device);

    let start = Instant::now();
    let mut cache = KvCache::new();
    let logits = model.forward(
        ForwardInput::new(ids)
            .with_pixels(pixels)
            .with_logits(LogitsMode::LastOnly),
        &mut cache,
    )?;
    let mut next = last_tokens(logits)?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
    let start = Instant::now();
    for _ in 1..new_tokens {
        let ids = Tensor::<2, Int>::from_data(TensorData::new(next.clone(), [batch_size, 1]), device);
        let logits = model.forward(
            ForwardInput::new(ids).with_logits(LogitsMode::LastOnly),
            &mut cache,
        )?;
        next = last_tokens(logits)?;
    }
    let decode_ms = start.elapsed().as_secs_f64() * 1000.0;
    let decoded = (new_tokens.saturating_sub(1) * batch_size) as f64;
    Ok(BenchRow {
        batch_size,
        prompt_tokens,
        prefill_ms,
        new_tokens,
        decode_ms,
        decode_tokens_per_s: if decode_ms > 0.0 {
            decoded / (decode_ms / 1000.0)
        } else {
            0.0
        },
    })
}

fn last_tokens(logits: Tensor<3>) -> Result<Vec<i64>, PipelineError> {
    Ok(crate::pipeline::rows(logits)?
        .iter()
        .map(|row| argmax(row) as i64)
        .collect())
}
