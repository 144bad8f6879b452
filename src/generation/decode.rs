//! The decode loop shared by single, batched and multi-turn generation: pick a token per
//! row, stream its text, feed all rows back through the model with the KV cache, and stop
//! each row on its own (EOS, a stop string, or `max_new_tokens`).

use std::time::Instant;

use vipllava_model::{KvCache, LogitsMode};

use super::batch::LeftPadded;
use super::options::GenerationOptions;
use super::sampling::TokenSelector;
use super::stream::StreamDecoder;
use super::{Generation, StopReason};
use crate::pipeline::{Pipeline, PipelineError, PreparedInput, logit_rows};

/// Where a decode loop starts: the prompts are in the cache and each row's last-position
/// logits are known.
#[derive(Debug, Clone)]
pub struct DecodeStart {
    /// Last-position logits, one vector per row.
    pub logits: Vec<Vec<f32>>,
    /// The position id of each row's last cached token.
    pub last_positions: Vec<i64>,
    /// Key mask over the cached positions (`None`: no row is padded).
    pub key_mask: Option<Vec<Vec<bool>>>,
    /// Each row's ids so far (its prompt), for the repetition penalty and reporting.
    pub histories: Vec<Vec<u32>>,
    /// Prefill wall time, reported in every [`Generation`].
    pub prefill_ms: f64,
}

/// One row of the loop (also a row of the continuous batch in
/// [`scheduler`](super::scheduler)).
pub(crate) struct Row {
    selector: TokenSelector,
    history: Vec<u32>,
    pub(crate) generated: Vec<u32>,
    pub(crate) stream: StreamDecoder,
    pub(crate) stop: Option<StopReason>,
    /// Bytes of the text already searched for stop strings.
    searched: usize,
}

impl Row {
    pub(crate) fn new(options: &GenerationOptions, history: Vec<u32>) -> Self {
        Self {
            selector: TokenSelector::new(options.clone()),
            history,
            generated: Vec::new(),
            stream: StreamDecoder::new(),
            stop: (options.max_new_tokens == 0).then_some(StopReason::MaxNewTokens),
            searched: 0,
        }
    }

    /// Picks the next token from `logits`; returns it with the new text to stream.
    pub(crate) fn step(
        &mut self,
        pipeline: &Pipeline,
        options: &GenerationOptions,
        logits: &mut [f32],
    ) -> Result<(u32, Option<String>), PipelineError> {
        let next = self.selector.select(logits, &self.history);
        self.generated.push(next);
        self.history.push(next);
        let text = self.stream.push(pipeline.tokenizer(), next)?;
        if options.eos_token_ids.contains(&next) {
            self.stop = Some(StopReason::Eos);
        } else if self.hit_stop_string(options) {
            self.stop = Some(StopReason::StopString);
        } else if self.generated.len() >= options.max_new_tokens {
            self.stop = Some(StopReason::MaxNewTokens);
        }
        Ok((next, text))
    }

    /// Searches only the text added since the last search (plus an overlap of 64 bytes,
    /// enough for a stop string split across tokens).
    fn hit_stop_string(&mut self, options: &GenerationOptions) -> bool {
        if options.stop_strings.is_empty() {
            return false;
        }
        let text = self.stream.text();
        let from = floor_char_boundary(text, self.searched.saturating_sub(64));
        self.searched = text.len();
        options
            .stop_strings
            .iter()
            .any(|s| text[from..].contains(s.as_str()))
    }
}

impl Pipeline {
    /// Generates an answer, calling `on_text` with each new piece of text.
    pub fn generate(
        &self,
        input: &PreparedInput,
        options: &GenerationOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, PipelineError> {
        let mut out = self.generate_batch(&[(input.clone(), options.clone())], |_, t| on_text(t))?;
        out.pop().ok_or(PipelineError::NoRequest)
    }

    /// Generates answers for several requests in one forward pass per step: prompts are
    /// left-padded ([`LeftPadded`]), the padding mask is honoured in every layer, each row
    /// stops on its own (a finished row is fed padding and its output ends at its EOS), and
    /// the KV cache is shared. `on_text(row, text)` receives each row's streamed text.
    pub fn generate_batch(
        &self,
        requests: &[(PreparedInput, GenerationOptions)],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Generation>, PipelineError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        for (input, options) in requests {
            options.validate()?;
            self.check_context(input.input_ids.len(), options.max_new_tokens)?;
        }
        let start = Instant::now();
        let layout = LeftPadded::new(
            requests.iter().map(|(r, _)| r.input_ids.as_slice()),
            self.pad_token_id(),
        );
        let rows: Vec<&[u32]> = layout.rows.iter().map(Vec::as_slice).collect();
        let mut forward = self.forward_input(&rows)?.with_logits(LogitsMode::LastOnly);
        forward.pixel_values = self.pixel_tensor(requests.iter().flat_map(|(r, _)| r.pixel_values.iter()));
        forward.positions = Some(layout.positions.clone());
        forward.key_mask = layout.key_mask.clone();
        let mut cache = KvCache::new();
        let logits = logit_rows(self.model().forward(forward, &mut cache)?)?;
        let start_state = DecodeStart {
            logits,
            last_positions: layout
                .positions
                .iter()
                .map(|p| p.last().copied().unwrap_or(0))
                .collect(),
            key_mask: layout.key_mask,
            histories: requests.iter().map(|(r, _)| r.input_ids.clone()).collect(),
            prefill_ms: start.elapsed().as_secs_f64() * 1000.0,
        };
        let options: Vec<GenerationOptions> = requests.iter().map(|(_, o)| o.clone()).collect();
        self.decode(start_state, &options, &mut cache, &mut on_text)
    }

    /// Continues one unpadded sequence whose prompt `ids` are already in `cache` (see
    /// [`Pipeline::extend_cache`]), from the last position's `logits`. On return the cache
    /// holds the prompt and every generated token but the last.
    pub fn continue_from_cache(
        &self,
        logits: Vec<f32>,
        ids: Vec<u32>,
        cache: &mut KvCache,
        options: &GenerationOptions,
        prefill_ms: f64,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, PipelineError> {
        self.continue_from_cache_until(logits, ids, cache, options, prefill_ms, on_text, &|| false)
    }

    /// [`Pipeline::continue_from_cache`] that also stops, with [`StopReason::Cancelled`],
    /// as soon as `cancelled()` returns true (checked once per generated token).
    #[allow(clippy::too_many_arguments)]
    pub fn continue_from_cache_until(
        &self,
        logits: Vec<f32>,
        ids: Vec<u32>,
        cache: &mut KvCache,
        options: &GenerationOptions,
        prefill_ms: f64,
        mut on_text: impl FnMut(&str),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generation, PipelineError> {
        options.validate()?;
        self.check_context(ids.len(), options.max_new_tokens)?;
        let start = DecodeStart {
            logits: vec![logits],
            last_positions: vec![ids.len().saturating_sub(1) as i64],
            key_mask: None,
            histories: vec![ids],
            prefill_ms,
        };
        let mut out = self.decode_until(
            start,
            std::slice::from_ref(options),
            cache,
            &mut |_, t| on_text(t),
            cancelled,
        )?;
        out.pop().ok_or(PipelineError::NoRequest)
    }

    /// The loop: one token per unfinished row per step, all rows fed back together.
    pub fn decode(
        &self,
        start: DecodeStart,
        options: &[GenerationOptions],
        cache: &mut KvCache,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generation>, PipelineError> {
        self.decode_until(start, options, cache, on_text, &|| false)
    }

    /// [`Pipeline::decode`] that ends every unfinished row with [`StopReason::Cancelled`]
    /// once `cancelled()` returns true. It is asked after each step's tokens are picked, so
    /// the cache keeps its invariant (every generated token but the last is in it).
    pub fn decode_until(
        &self,
        start: DecodeStart,
        options: &[GenerationOptions],
        cache: &mut KvCache,
        on_text: &mut dyn FnMut(usize, &str),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Generation>, PipelineError> {
        let DecodeStart {
            mut logits,
            mut last_positions,
            mut key_mask,
            histories,
            prefill_ms,
        } = start;
        let batch = options.len();
        let pad = self.pad_token_id();
        let prompt_tokens: Vec<usize> = histories.iter().map(Vec::len).collect();
        let mut rows: Vec<Row> = options
            .iter()
            .zip(histories)
            .map(|(o, history)| Row::new(o, history))
            .collect();
        let decode_start = Instant::now();
        let mut decoded = 0usize;
        loop {
            let mut next_ids = Vec::with_capacity(batch);
            for (i, row) in rows.iter_mut().enumerate() {
                if row.stop.is_some() {
                    next_ids.push(pad);
                    continue;
                }
                let (next, text) = row.step(self, &options[i], &mut logits[i])?;
                next_ids.push(next);
                if let Some(text) = text {
                    on_text(i, &text);
                }
            }
            if rows.iter().all(|r| r.stop.is_some()) {
                break;
            }
            if cancelled() {
                for row in rows.iter_mut().filter(|r| r.stop.is_none()) {
                    row.stop = Some(StopReason::Cancelled);
                }
                break;
            }
            for p in last_positions.iter_mut() {
                *p += 1;
            }
            for m in key_mask.iter_mut().flatten() {
                m.push(true);
            }
            decoded += rows.iter().filter(|r| r.stop.is_none()).count();
            let ids: Vec<&[u32]> = next_ids.chunks(1).collect();
            let mut forward = self.forward_input(&ids)?.with_logits(LogitsMode::LastOnly);
            forward.positions = Some(last_positions.iter().map(|&p| vec![p]).collect());
            forward.key_mask = key_mask.clone();
            logits = logit_rows(self.model().forward(forward, cache)?)?;
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        let decode_tokens_per_s = if decode_s > 0.0 && decoded > 0 {
            decoded as f64 / decode_s
        } else {
            0.0
        };
        rows.into_iter()
            .enumerate()
            .map(|(i, mut row)| {
                if let Some(rest) = row.stream.finish() {
                    on_text(i, &rest);
                }
                Ok(Generation {
                    text: self.tokenizer().decode(&row.generated, true)?,
                    token_ids: row.generated,
                    stop_reason: row.stop.unwrap_or(StopReason::MaxNewTokens),
                    prompt_tokens: prompt_tokens[i],
                    prefill_ms,
                    decode_tokens_per_s,
                })
            })
            .collect()
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
