//! The scheduler thread: owns the pipeline and the running [`DecodeBatch`]; admits queued
//! requests between steps (each prefilled alone, then joining the batch), sends each
//! row's text to its handler, and drops rows whose handler went away or whose time ran
//! out. All model work happens on this thread.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use image::DynamicImage;
use tokio::sync::mpsc::UnboundedSender;
use vipllava::generation::{DecodeBatch, GenerationOptions, RowId, SchedulerError, StopReason};
use vipllava::pipeline::{Pipeline, PipelineError, Prompt};
use vipllava::processor::ChatMessage;
use vipllava::processor::image::ImageMode;

use super::api::{ApiError, SamplingRequest};
use super::metrics::Metrics;

/// A request for the scheduler.
pub struct Job {
    /// Messages with image placeholders.
    pub messages: Vec<ChatMessage>,
    /// Marked images.
    pub images: Vec<DynamicImage>,
    /// Image mode for this request (`None`: the server's).
    pub mode: Option<ImageMode>,
    /// Sampling fields.
    pub sampling: SamplingRequest,
    /// Where the events go; closed when the client went away.
    pub events: UnboundedSender<JobEvent>,
    /// Arrival time (for the time to first token).
    pub arrived: Instant,
    /// When to give up.
    pub deadline: Instant,
}

/// What the scheduler tells a handler.
#[derive(Debug)]
pub enum JobEvent {
    /// Prefilled; the row is in the batch.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
    },
    /// New text.
    Delta(String),
    /// The last event of a successful request.
    Done {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed (before or after `Started`).
    Failed(ApiError),
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Rows per forward pass.
    pub max_batch_size: usize,
}

/// The handlers' side of the scheduler.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    jobs: Sender<Job>,
}

impl WorkerHandle {
    /// Queues a job; false when the scheduler has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// Starts the scheduler thread, which loads the pipeline with `load`; returns once the
/// model is loaded (or failed to load).
pub fn spawn(
    load: impl FnOnce() -> anyhow::Result<Pipeline> + Send + 'static,
    limits: WorkerLimits,
    metrics: Arc<Metrics>,
) -> anyhow::Result<WorkerHandle> {
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("vipllava-scheduler".into())
        .spawn(move || {
            let pipeline = match load() {
                Ok(p) => {
                    let _ = ready_tx.send(Ok(()));
                    p
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            Scheduler {
                pipeline,
                limits,
                metrics,
                batch: DecodeBatch::new(),
                waiting: VecDeque::new(),
                rows: HashMap::new(),
            }
            .run(queue);
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle { jobs }),
        Ok(Err(e)) => Err(anyhow::anyhow!(e)),
        Err(_) => Err(anyhow::anyhow!(
            "the scheduler thread stopped while loading the model"
        )),
    }
}

/// A running row's handler side.
struct RowState {
    events: UnboundedSender<JobEvent>,
    arrived: Instant,
    deadline: Instant,
    first_token: bool,
    prompt_tokens: usize,
    stop: StopTrim,
}

struct Scheduler {
    pipeline: Pipeline,
    limits: WorkerLimits,
    metrics: Arc<Metrics>,
    batch: DecodeBatch,
    waiting: VecDeque<Job>,
    rows: HashMap<RowId, RowState>,
}

impl Scheduler {
    fn run(mut self, queue: Receiver<Job>) {
        loop {
            // Idle: block for work (with a timeout so that queued deadlines are honoured).
            if self.batch.is_empty() && self.waiting.is_empty() {
                match queue.recv_timeout(Duration::from_millis(500)) {
                    Ok(job) => self.waiting.push_back(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = queue.try_recv() {
                self.waiting.push_back(job);
            }
            // A bug must cost the running requests, not the server: a panic fails them
            // and the loop goes on with an empty batch.
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.admit();
                self.drop_gone();
                self.metrics.load(self.waiting.len(), self.batch.len());
                if !self.batch.is_empty() {
                    self.step();
                }
            }));
            if turn.is_err() {
                self.fail_all("internal error (panic); see the server log");
            }
        }
    }

    /// Prefills waiting requests while there is room.
    fn admit(&mut self) {
        let now = Instant::now();
        // Requests that timed out or whose client left while queued.
        self.waiting.retain(|job| {
            if job.events.is_closed() {
                self.metrics.cancelled();
                return false;
            }
            if now >= job.deadline {
                let _ = job.events.send(JobEvent::Failed(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    "the request timed out waiting for a free batch slot",
                )));
                return false;
            }
            true
        });
        while self.batch.len() < self.limits.max_batch_size {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            match self.start(&job) {
                Ok((id, prompt_tokens)) => {
                    if job.events.send(JobEvent::Started { prompt_tokens }).is_err() {
                        let _ = self.batch.remove(id);
                        self.metrics.cancelled();
                        continue;
                    }
                    let stop = StopTrim::new(job.sampling.stop.clone().unwrap_or_default());
                    self.rows.insert(
                        id,
                        RowState {
                            events: job.events,
                            arrived: job.arrived,
                            deadline: job.deadline,
                            first_token: false,
                            prompt_tokens,
                            stop,
                        },
                    );
                }
                Err(e) => {
                    let _ = job.events.send(JobEvent::Failed(e));
                }
            }
        }
    }

    /// Prepares, checks and prefills one request.
    fn start(&mut self, job: &Job) -> Result<(RowId, usize), ApiError> {
        let mode = job.mode.unwrap_or(self.pipeline.image_mode());
        let input = self
            .pipeline
            .prepare_in_mode(&job.images, &Prompt::Messages(job.messages.clone()), mode)
            .map_err(pipeline_error)?;
        let options = options(&self.pipeline, &job.sampling, input.input_ids.len())?;
        let prompt_tokens = input.input_ids.len();
        let id = self
            .batch
            .add(&self.pipeline, &input, options)
            .map_err(|e| match e {
                SchedulerError::Pipeline(e) => pipeline_error(e),
                other => internal(other.to_string()),
            })?;
        Ok((id, prompt_tokens))
    }

    /// Drops rows whose handler went away or whose deadline passed.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let gone: Vec<RowId> = self
            .rows
            .iter()
            .filter(|(_, r)| r.events.is_closed() || now >= r.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(row) = self.rows.remove(&id) {
                if row.events.is_closed() {
                    self.metrics.cancelled();
                } else {
                    let _ = row.events.send(JobEvent::Failed(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        "the request ran past --request-timeout",
                    )));
                }
            }
            if let Err(e) = self.batch.remove(id) {
                self.fail_all(&e.to_string());
                return;
            }
        }
    }

    fn step(&mut self) {
        let start = Instant::now();
        let events = match self.batch.step(&self.pipeline) {
            Ok(events) => events,
            Err(e) => {
                self.fail_all(&e.to_string());
                return;
            }
        };
        let tokens = events.iter().filter(|e| e.token.is_some()).count();
        self.metrics
            .step(tokens, start.elapsed().as_secs_f64(), !self.batch.is_empty());
        for event in events {
            let Some(row) = self.rows.get_mut(&event.row) else {
                continue;
            };
            if event.token.is_some() && !row.first_token {
                row.first_token = true;
                self.metrics.ttft(row.arrived.elapsed().as_secs_f64());
            }
            let mut text = event.text.map(|t| row.stop.push(&t)).unwrap_or_default();
            let mut alive = true;
            if let Some(finished) = &event.finished {
                text.push_str(&row.stop.finish(finished.stop_reason == StopReason::StopString));
                if !text.is_empty() {
                    alive = row
                        .events
                        .send(JobEvent::Delta(std::mem::take(&mut text)))
                        .is_ok();
                }
                let completion_tokens = finished.token_ids.len();
                self.metrics.tokens(row.prompt_tokens, completion_tokens);
                if alive {
                    let _ = row.events.send(JobEvent::Done {
                        finish_reason: match finished.stop_reason {
                            StopReason::MaxNewTokens => "length",
                            StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
                        },
                        prompt_tokens: row.prompt_tokens,
                        completion_tokens,
                    });
                }
                self.rows.remove(&event.row);
                continue;
            }
            if !text.is_empty() && row.events.send(JobEvent::Delta(text)).is_err() {
                alive = false;
            }
            if !alive {
                // The client left: free the row now.
                self.rows.remove(&event.row);
                self.metrics.cancelled();
                if let Err(e) = self.batch.remove(event.row) {
                    self.fail_all(&e.to_string());
                    return;
                }
            }
        }
    }

    /// A failed step: every running request fails, the batch starts over.
    fn fail_all(&mut self, reason: &str) {
        self.metrics.load(self.waiting.len(), 0);
        for id in self.batch.clear() {
            if let Some(row) = self.rows.remove(&id) {
                let _ = row
                    .events
                    .send(JobEvent::Failed(internal(format!("generation failed: {reason}"))));
            }
        }
        for (_, row) in self.rows.drain() {
            let _ = row
                .events
                .send(JobEvent::Failed(internal(format!("generation failed: {reason}"))));
        }
    }
}

/// A seed that differs between requests.
fn fresh_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

fn internal(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
}

/// Request errors (the prompt, the images, the options) are the client's: 400.
fn pipeline_error(e: PipelineError) -> ApiError {
    match e {
        PipelineError::ContextTooLong { .. } => {
            let mut err = ApiError::bad_request(e.to_string(), Some("max_completion_tokens"));
            err.code = "context_length_exceeded";
            err
        }
        PipelineError::Text(_)
        | PipelineError::Image(_)
        | PipelineError::Generation(_)
        | PipelineError::EmptyPrompt
        | PipelineError::RawPromptWithoutImage(_) => ApiError::bad_request(e.to_string(), Some("messages")),
        other => internal(other.to_string()),
    }
}

/// The checkpoint's defaults with the request's fields: temperature 0 is greedy; without
/// `max_tokens` the default is cut to what fits the context.
pub fn options(
    pipeline: &Pipeline,
    s: &SamplingRequest,
    prompt: usize,
) -> Result<GenerationOptions, ApiError> {
    let mut o = pipeline.generation_defaults().clone();
    match s.temperature {
        Some(0.0) => o.do_sample = false,
        Some(t) => {
            o.do_sample = true;
            o.temperature = t;
        }
        None => {}
    }
    if let Some(p) = s.top_p {
        o.top_p = p;
        if s.temperature.is_none() {
            o.do_sample = true;
        }
    }
    // Without a seed each sampled request draws its own (OpenAI's behaviour); with one,
    // the same request gives the same answer.
    o.seed = s.seed.unwrap_or_else(fresh_seed);
    if let Some(stop) = &s.stop {
        o.stop_strings = stop.clone();
    }
    let context = pipeline.config().text.max_position_embeddings;
    match s.max_tokens {
        Some(n) => o.max_new_tokens = n,
        None => o.max_new_tokens = o.max_new_tokens.min(context.saturating_sub(prompt).max(1)),
    }
    o.validate()
        .map_err(|e| ApiError::bad_request(e.to_string(), None))?;
    Ok(o)
}

/// OpenAI leaves stop strings out of the answer: text that could begin a stop string is
/// held back until it cannot, and the answer is cut where the stop string starts.
#[derive(Debug, Default)]
pub struct StopTrim {
    stops: Vec<String>,
    pending: String,
    hold: usize,
    done: bool,
}

impl StopTrim {
    /// For these stop strings (none: text passes straight through).
    pub fn new(stops: Vec<String>) -> Self {
        let hold = stops.iter().map(String::len).max().unwrap_or(0).saturating_sub(1);
        Self {
            stops,
            hold,
            ..Self::default()
        }
    }

    /// Adds generated text; returns what can be shown.
    pub fn push(&mut self, text: &str) -> String {
        if self.done {
            return String::new();
        }
        self.pending.push_str(text);
        if let Some(at) = self.first_stop() {
            self.pending.truncate(at);
            self.done = true;
            return std::mem::take(&mut self.pending);
        }
        let mut cut = self.pending.len().saturating_sub(self.hold);
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        let rest = self.pending.split_off(cut);
        std::mem::replace(&mut self.pending, rest)
    }

    /// The rest once generation ended (cut at a stop string when one was hit).
    pub fn finish(&mut self, hit_stop: bool) -> String {
        if hit_stop && let Some(at) = self.first_stop() {
            self.pending.truncate(at);
        }
        self.done = true;
        std::mem::take(&mut self.pending)
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::StopTrim;

    #[test]
    fn stop_strings_are_cut_even_across_pieces() {
        let mut t = StopTrim::new(vec!["END".into()]);
        let mut out = t.push("hello E");
        out += &t.push("N");
        out += &t.push("D and more");
        out += &t.finish(true);
        assert_eq!(out, "hello ");
        let mut t = StopTrim::new(vec!["xyz".into()]);
        let mut out = t.push("ab");
        out += &t.push("cé");
        out += &t.finish(false);
        assert_eq!(out, "abcé");
        let mut t = StopTrim::new(Vec::new());
        assert_eq!(t.push("free"), "free");
    }
}
