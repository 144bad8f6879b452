//! Continuous batching, one step at a time: a [`DecodeBatch`] holds one KV cache for every
//! running request. A request is prefilled alone (exactly as [`Pipeline::generate`] would)
//! and joins the running rows at once: the shorter side of the cache is left-padded with
//! masked positions, as [`LeftPadded`](super::LeftPadded) pads a static batch. Each
//! [`DecodeBatch::step`] picks one token per row with the row's own options and seed, feeds
//! all rows through the model together, and drops finished rows at once; padding that no
//! remaining row needs is cut from the front of the cache.
//!
//! A server thread owns the pipeline and the batch and alternates `add` / `remove` / `step`.

use vipllava_model::cache::CacheError;
use vipllava_model::{KvCache, LogitsMode};

use super::StopReason;
use super::decode::Row;
use super::options::GenerationOptions;
use crate::pipeline::{Pipeline, PipelineError, PreparedInput, logit_rows};

/// A request's handle in a [`DecodeBatch`].
pub type RowId = u64;

/// Why a request could not join, or why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// Preparing, prefilling or decoding failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The request's cache could not be merged into the batch's.
    #[error("joining the running batch: {0}")]
    Cache(#[from] CacheError),
}

/// What one row did in one [`DecodeBatch::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    /// The row.
    pub row: RowId,
    /// The token picked (`None` for a request that asked for no tokens).
    pub token: Option<u32>,
    /// New text to stream, if any (held back inside multi-byte characters).
    pub text: Option<String>,
    /// Set on the row's last event; the row has left the batch.
    pub finished: Option<RowFinished>,
}

/// The summary of a finished row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFinished {
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Prompt length in tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Generated ids (EOS included when generated).
    pub token_ids: Vec<u32>,
    /// The decoded answer (special tokens skipped), as [`Pipeline::generate`] returns it.
    pub text: String,
}

struct BatchRow {
    id: RowId,
    row: Row,
    options: GenerationOptions,
    /// Logits of the row's next token.
    logits: Vec<f32>,
    /// Position id of the row's last cached token.
    position: i64,
    /// `true` over the cache positions that are this row's tokens.
    mask: Vec<bool>,
    prompt_tokens: usize,
}

/// The running rows of a continuous batch and their shared KV cache.
#[derive(Default)]
pub struct DecodeBatch {
    cache: KvCache,
    rows: Vec<BatchRow>,
    next_id: RowId,
}

impl std::fmt::Debug for DecodeBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeBatch")
            .field("rows", &self.ids())
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl DecodeBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Running rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row runs.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The running rows, in batch order.
    pub fn ids(&self) -> Vec<RowId> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// Cached positions per row (the longest row plus the padding in front of the others).
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Prefills `input` alone and adds it to the batch; its first token comes with the next
    /// [`DecodeBatch::step`]. Checks the options and the context length first.
    pub fn add(
        &mut self,
        pipeline: &Pipeline,
        input: &PreparedInput,
        options: GenerationOptions,
    ) -> Result<RowId, SchedulerError> {
        options.validate().map_err(PipelineError::from)?;
        pipeline.check_context(input.input_ids.len(), options.max_new_tokens)?;
        let (logits, cache) = pipeline.prefill(input)?;
        let len = input.input_ids.len();
        let (pad_batch, pad_new) = self.cache.append_rows(cache)?;
        for row in &mut self.rows {
            row.mask.splice(0..0, std::iter::repeat_n(false, pad_batch));
        }
        let mut mask = vec![false; pad_new];
        mask.resize(pad_new + len, true);
        let id = self.next_id;
        self.next_id += 1;
        self.rows.push(BatchRow {
            id,
            row: Row::new(&options, input.input_ids.clone()),
            options,
            logits,
            position: len.saturating_sub(1) as i64,
            mask,
            prompt_tokens: len,
        });
        Ok(id)
    }

    /// Drops a row (e.g. its client went away); false when it is not in the batch.
    pub fn remove(&mut self, id: RowId) -> Result<bool, SchedulerError> {
        if !self.rows.iter().any(|r| r.id == id) {
            return Ok(false);
        }
        self.keep(|r| r.id != id)?;
        Ok(true)
    }

    /// Drops every row (after a failed step) and returns their ids.
    pub fn clear(&mut self) -> Vec<RowId> {
        let ids = self.ids();
        self.rows.clear();
        self.cache.clear();
        ids
    }

    /// Keeps the rows for which `keep` holds, then cuts the padding no row needs.
    fn keep(&mut self, keep: impl Fn(&BatchRow) -> bool) -> Result<(), SchedulerError> {
        let kept: Vec<usize> = (0..self.rows.len()).filter(|&i| keep(&self.rows[i])).collect();
        if kept.len() == self.rows.len() {
            return Ok(());
        }
        self.cache.select_rows(&kept)?;
        let mut i = 0;
        self.rows.retain(|_| {
            let k = kept.contains(&i);
            i += 1;
            k
        });
        let unused = self
            .rows
            .iter()
            .map(|r| r.mask.iter().take_while(|m| !**m).count())
            .min()
            .unwrap_or(0);
        if unused > 0 {
            self.cache.drop_front(unused);
            for row in &mut self.rows {
                row.mask.drain(..unused);
            }
        }
        Ok(())
    }

    /// One token for every row: picks it from the row's logits with the row's options,
    /// reports it, removes the rows that finished and feeds the others' tokens through
    /// the model. After an error the rows' state is unspecified: [`DecodeBatch::clear`]
    /// the batch and fail its requests.
    pub fn step(&mut self, pipeline: &Pipeline) -> Result<Vec<StepEvent>, SchedulerError> {
        let mut events = Vec::with_capacity(self.rows.len());
        for r in &mut self.rows {
            let (token, mut text) = if r.row.stop.is_some() {
                (None, None)
            } else {
                let (token, text) = r.row.step(pipeline, &r.options, &mut r.logits)?;
                (Some(token), text)
            };
            let finished = match r.row.stop {
                Some(stop_reason) => {
                    if let Some(rest) = r.row.stream.finish() {
                        text.get_or_insert_with(String::new).push_str(&rest);
                    }
                    Some(RowFinished {
                        stop_reason,
                        prompt_tokens: r.prompt_tokens,
                        token_ids: r.row.generated.clone(),
                        text: pipeline
                            .tokenizer()
                            .decode(&r.row.generated, true)
                            .map_err(PipelineError::from)?,
                    })
                }
                None => None,
            };
            events.push(StepEvent {
                row: r.id,
                token,
                text,
                finished,
            });
        }
        self.keep(|r| r.row.stop.is_none())?;
        if self.rows.is_empty() {
            return Ok(events);
        }
        let pad = pipeline.pad_token_id();
        let mut ids = Vec::with_capacity(self.rows.len());
        for r in &mut self.rows {
            ids.push(r.row.generated.last().copied().unwrap_or(pad));
            r.position += 1;
            r.mask.push(true);
        }
        let padded = self.rows.iter().any(|r| r.mask.iter().any(|m| !m));
        let rows: Vec<&[u32]> = ids.chunks(1).collect();
        let mut forward = pipeline.forward_input(&rows)?.with_logits(LogitsMode::LastOnly);
        forward.positions = Some(self.rows.iter().map(|r| vec![r.position]).collect());
        forward.key_mask = padded.then(|| self.rows.iter().map(|r| r.mask.clone()).collect());
        let logits = pipeline
            .model()
            .forward(forward, &mut self.cache)
            .map_err(PipelineError::from)?;
        for (r, l) in self.rows.iter_mut().zip(logit_rows(logits)?) {
            r.logits = l;
        }
        Ok(events)
    }
}
