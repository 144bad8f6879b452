//! The model thread: loads the pipeline and answers questions, so the window never waits
//! on model work. The UI sends [`Command`]s and drains [`Event`]s once per frame; the
//! thread wakes the UI (`wake`) whenever it sends one.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::DynamicImage;
use vipllava::generation::GenerationOptions;
use vipllava::hub::{DownloadProgress, resolve_model_with_progress};
use vipllava::processor::image::{ImageMode, ImageProcessorConfig};
use vipllava::{Conversation, DeviceSpec, Pipeline, PipelineError, PipelineOptions, StopReason};

use crate::settings::ModelSettings;

/// A question about the current scene.
#[derive(Debug, Clone)]
pub struct AskRequest {
    /// Identifies the image, marks and mode: a new scene starts a new conversation.
    pub scene: u64,
    /// The image with its marks drawn.
    pub image: DynamicImage,
    /// Crop or pad.
    pub image_mode: ImageMode,
    /// The question.
    pub question: String,
    /// Sampling and limits.
    pub options: GenerationOptions,
}

/// What the UI asks of the model thread.
#[derive(Debug)]
pub enum Command {
    /// Open a model (replacing the current one).
    Load(ModelSettings),
    /// Ask a question (a follow-up when the scene is the same as the last question's).
    Ask(AskRequest),
    /// Forget the conversation.
    Reset,
    /// End the thread.
    Shutdown,
}

/// A loaded model, as the UI shows it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model directory.
    pub dir: PathBuf,
    /// One line: architecture, dtype, device.
    pub summary: String,
    /// Load time.
    pub load_ms: f64,
    /// `generation_config.json` as transformers applies it.
    pub defaults: GenerationOptions,
    /// The checkpoint's image processor (for the overlay and the preview).
    pub image_config: ImageProcessorConfig,
}

/// Figures about one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerStats {
    /// Generated ids (EOS included when generated).
    pub token_ids: Vec<u32>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens that had to be computed (the rest came from the KV cache).
    pub computed_tokens: usize,
    /// From the question to the first token.
    pub time_to_first_token_ms: f64,
    /// Decode speed.
    pub tokens_per_s: f64,
    /// Why it stopped.
    pub stop_reason: StopReason,
}

/// What the model thread reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// Loading: a message and, when known, the fraction done.
    Progress {
        /// What is happening.
        message: String,
        /// 0..=1 when known.
        fraction: Option<f32>,
    },
    /// The model is ready.
    Loaded(ModelInfo),
    /// The model could not be opened.
    LoadFailed(String),
    /// A piece of the answer to question `turn`.
    Text {
        /// The question's number.
        turn: u64,
        /// New text.
        text: String,
    },
    /// The answer to `turn` is complete.
    Finished {
        /// The question's number.
        turn: u64,
        /// Its figures.
        stats: AnswerStats,
    },
    /// Something the user should know that is not an error.
    Notice(String),
    /// Question `turn` failed.
    Failed {
        /// The question's number.
        turn: u64,
        /// Why.
        message: String,
    },
}

/// The UI's handle on the model thread.
pub struct Worker {
    commands: Sender<(u64, Command)>,
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    next_turn: u64,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; `wake` is called after every event (e.g. `ctx.request_repaint`).
    pub fn spawn(wake: impl Fn() + Send + 'static) -> Self {
        let (commands, command_rx) = channel();
        let (event_tx, events) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let thread_cancel = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("vipllava-model".into())
            .spawn(move || {
                let out = Outbox {
                    events: event_tx,
                    wake: Box::new(wake),
                };
                run(&command_rx, &out, &thread_cancel);
            })
            .ok();
        Self {
            commands,
            events,
            cancel,
            next_turn: 0,
            thread,
        }
    }

    fn send(&self, turn: u64, command: Command) {
        // A closed channel means the thread has ended; the UI finds out by the missing
        // events, and nothing else can be done here.
        let _ = self.commands.send((turn, command));
    }

    /// Opens a model.
    pub fn load(&self, settings: ModelSettings) {
        self.cancel.store(true, Ordering::SeqCst);
        self.send(0, Command::Load(settings));
    }

    /// Asks a question; returns its turn number (in the events about it).
    pub fn ask(&mut self, request: AskRequest) -> u64 {
        self.next_turn += 1;
        self.cancel.store(false, Ordering::SeqCst);
        self.send(self.next_turn, Command::Ask(request));
        self.next_turn
    }

    /// Stops the answer being generated (the text so far is kept).
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Starts a new chat.
    pub fn reset(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.send(0, Command::Reset);
    }

    /// The events since the last call.
    pub fn poll(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// Blocks until an event arrives or `timeout` passes (tests and scripts).
    pub fn wait(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Stops any answer, ends the thread and waits up to `timeout` for it (a load in
    /// progress cannot be interrupted: then it is left to finish on its own).
    pub fn shutdown(&mut self, timeout: Duration) -> bool {
        self.cancel.store(true, Ordering::SeqCst);
        self.send(0, Command::Shutdown);
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let start = Instant::now();
        while !thread.is_finished() {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        thread.join().is_ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(2));
    }
}

struct Outbox {
    events: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
}

impl Outbox {
    fn send(&self, event: Event) {
        let _ = self.events.send(event);
        (self.wake)();
    }
}

/// The thread's loop: with no model, wait for one; with a model, chat about it until
/// another is asked for.
fn run(commands: &Receiver<(u64, Command)>, out: &Outbox, cancel: &AtomicBool) {
    let mut pipeline: Option<Pipeline> = None;
    let mut pending: Option<(u64, Command)> = None;
    loop {
        let Some((turn, command)) = pending.take().or_else(|| commands.recv().ok()) else {
            return;
        };
        match command {
            Command::Shutdown => return,
            Command::Load(settings) => {
                pipeline = None;
                match load(&settings, out) {
                    Ok(p) => {
                        out.send(Event::Loaded(info(&p, &settings)));
                        pipeline = Some(p);
                    }
                    Err(message) => out.send(Event::LoadFailed(message)),
                }
            }
            Command::Reset => {}
            Command::Ask(request) => match &pipeline {
                None => out.send(Event::Failed {
                    turn,
                    message: "open a model first".into(),
                }),
                Some(p) => pending = chat(p, (turn, Command::Ask(request)), commands, out, cancel),
            },
        }
    }
}

/// Answers questions with one [`Conversation`] per scene until a command that is not about
/// chatting arrives (returned, to be handled by [`run`]).
fn chat(
    pipeline: &Pipeline,
    first: (u64, Command),
    commands: &Receiver<(u64, Command)>,
    out: &Outbox,
    cancel: &AtomicBool,
) -> Option<(u64, Command)> {
    let mut conversation: Option<(u64, ImageMode, Conversation<'_>)> = None;
    let mut next = Some(first);
    loop {
        let (turn, command) = next.take().or_else(|| commands.recv().ok())?;
        match command {
            Command::Reset => conversation = None,
            Command::Ask(request) => {
                let same = conversation
                    .as_ref()
                    .is_some_and(|(scene, mode, _)| *scene == request.scene && *mode == request.image_mode);
                if !same {
                    let chat =
                        Conversation::new(pipeline, vec![request.image]).with_image_mode(request.image_mode);
                    conversation = Some((request.scene, request.image_mode, chat));
                }
                let Some((_, _, chat)) = conversation.as_mut() else {
                    continue;
                };
                let start = Instant::now();
                let mut first_text: Option<f64> = None;
                let mut options = request.options.clone();
                let mut ask = |options: &GenerationOptions| {
                    chat.ask_until(
                        &request.question,
                        options,
                        |text| {
                            first_text.get_or_insert_with(|| start.elapsed().as_secs_f64() * 1000.0);
                            out.send(Event::Text {
                                turn,
                                text: text.to_string(),
                            });
                        },
                        &|| cancel.load(Ordering::SeqCst),
                    )
                };
                let mut result = ask(&options);
                // The answer length is a limit, not a wish: shorten it to what the
                // context has room for (the prompt is cached by now, so this is cheap).
                if let Err(PipelineError::ContextTooLong { prompt, max, .. }) = &result
                    && max > prompt
                {
                    options.max_new_tokens = max - prompt;
                    out.send(Event::Notice(format!(
                        "The answer is limited to {} tokens: the model has {max} positions and the prompt takes {prompt}.",
                        options.max_new_tokens
                    )));
                    result = ask(&options);
                }
                let Some((_, _, chat)) = conversation.as_mut() else {
                    continue;
                };
                match result {
                    Ok(generation) => out.send(Event::Finished {
                        turn,
                        stats: AnswerStats {
                            prompt_tokens: generation.prompt_tokens,
                            computed_tokens: chat.last_turn_new_tokens(),
                            time_to_first_token_ms: first_text.unwrap_or(generation.prefill_ms),
                            tokens_per_s: generation.decode_tokens_per_s,
                            stop_reason: generation.stop_reason,
                            token_ids: generation.token_ids,
                        },
                    }),
                    Err(e) => {
                        // The conversation's cache may be half-updated: start afresh.
                        conversation = None;
                        out.send(Event::Failed {
                            turn,
                            message: e.to_string(),
                        });
                    }
                }
            }
            other => return Some((turn, other)),
        }
    }
}

fn load(settings: &ModelSettings, out: &Outbox) -> Result<Pipeline, String> {
    let options = settings.load_options().map_err(|e| e.to_string())?;
    out.send(Event::Progress {
        message: format!("resolving {}", settings.model),
        fraction: None,
    });
    let mut last_report = Instant::now();
    let dir = resolve_model_with_progress(settings.model.trim(), |p: &DownloadProgress| {
        // Many updates per second arrive from the download; the UI needs a few.
        let done = p.received >= p.total;
        if done || last_report.elapsed() > Duration::from_millis(100) {
            last_report = Instant::now();
            out.send(Event::Progress {
                message: format!(
                    "downloading {} ({:.1} / {:.1} MB)",
                    p.file,
                    p.received as f64 / 1e6,
                    p.total as f64 / 1e6
                ),
                fraction: (p.total > 0).then(|| p.received as f32 / p.total as f32),
            });
        }
    })
    .map_err(|e| e.to_string())?;
    let spec: DeviceSpec = settings
        .device
        .parse()
        .map_err(|e: vipllava::DeviceError| e.to_string())?;
    out.send(Event::Progress {
        message: format!("opening device {spec}"),
        fraction: None,
    });
    let device = spec.open().map_err(|e| e.to_string())?;
    out.send(Event::Progress {
        message: format!(
            "loading {} ({}{})",
            dir.display(),
            settings.dtype,
            quantize_suffix(settings)
        ),
        fraction: None,
    });
    Pipeline::load_with(&dir, &device, &PipelineOptions::from(options))
        .map_err(|e| format!("loading {}: {e}", dir.display()))
}

fn quantize_suffix(settings: &ModelSettings) -> String {
    match settings.quantize.as_str() {
        "" | "none" => String::new(),
        q => format!(", {q}"),
    }
}

fn info(pipeline: &Pipeline, settings: &ModelSettings) -> ModelInfo {
    let config = pipeline.config();
    ModelInfo {
        dir: pipeline.dir().to_path_buf(),
        summary: format!(
            "{} layers, hidden {}, on {} in {}{}",
            config.text.num_hidden_layers,
            config.text.hidden_size,
            settings.device,
            settings.dtype,
            quantize_suffix(settings)
        ),
        load_ms: pipeline.load_ms(),
        defaults: pipeline.generation_defaults().clone(),
        image_config: pipeline.image_config().clone(),
    }
}
