//! The axum routes: authentication, body limits, the in-flight bound, and the translation
//! between the scheduler's events and OpenAI's JSON and Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;

use super::ServeConfig;
use super::api::{self, ApiError, ChatRequest};
use super::media::{self, MediaPolicy};
use super::metrics::Metrics;
use super::worker::{Job, JobEvent, WorkerHandle};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ServeConfig,
    worker: WorkerHandle,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    started: u64,
}

impl AppState {
    /// State for [`router`].
    pub fn new(config: ServeConfig, worker: WorkerHandle, metrics: Arc<Metrics>) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        Self {
            inner: Arc::new(Inner {
                config,
                worker,
                metrics,
                slots,
                next_id: AtomicU64::new(1),
                started: unix_now(),
            }),
        }
    }
}

/// Every route; unknown ones answer 404 in OpenAI's error shape.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The body is read (and limited) by the handler, to answer 413 in JSON.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", request.method(), request.uri().path()),
    )
}

async fn health() -> Response {
    api::json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.inner.metrics.render(),
    )
}

/// `Authorization: Bearer KEY` when `--api-key` is set.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.inner.config.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "incorrect API key",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing API key: send Authorization: Bearer KEY",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let body = json!({
        "object": "list",
        "data": [{
            "id": state.inner.config.model_name,
            "object": "model",
            "created": state.inner.started,
            "owned_by": "vipllava",
        }],
    });
    api::json_response(StatusCode::OK, &body)
}

async fn chat(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let response = match chat_inner(&state, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.inner.metrics.request(response.status().as_u16());
    response
}

async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.inner.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the request body is over --max-body-mb ({} MiB)",
                limit / (1024 * 1024)
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(
        state.inner.config.request_timeout,
        axum::body::to_bytes(body, limit),
    );
    match read.await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body did not arrive in time",
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let text = format!("{e} {:?}", std::error::Error::source(&e));
            if text.contains("length limit") {
                Err(too_large())
            } else {
                Err(ApiError::bad_request(format!("reading the body: {e}"), None))
            }
        }
    }
}

async fn chat_inner(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    authorize(state, headers)?;
    let bytes = read_body(state, headers, body).await?;
    let request = ChatRequest::parse(&bytes)?;
    let sampling = request.sampling()?;
    let (streaming, include_usage) = (request.streaming(), request.include_usage());
    let model = request
        .model
        .clone()
        .unwrap_or_else(|| state.inner.config.model_name.clone());
    let Ok(permit) = state.inner.slots.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            "too many requests in flight (--max-concurrent); retry later",
        ));
    };
    let policy = MediaPolicy {
        media_dir: state.inner.config.media_dir.clone(),
        allow_remote: state.inner.config.allow_remote_images,
    };
    // Base64 and image decoding, and drawing the marks, off the async threads.
    let messages = request.messages;
    let conversation = tokio::task::spawn_blocking(move || media::conversation(&messages, &policy))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string()))??;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let deadline = arrived + state.inner.config.request_timeout;
    let job = Job {
        messages: conversation.messages,
        images: conversation.images,
        mode: conversation.mode,
        sampling,
        events: tx,
        arrived,
        deadline,
    };
    if !state.inner.worker.submit(job) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the scheduler has stopped",
        ));
    }
    let deadline = tokio::time::Instant::from_std(deadline);
    // Wait until the request is prefilled (or refused): errors keep their status.
    let prompt_tokens = match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Some(JobEvent::Started { prompt_tokens })) => prompt_tokens,
        Ok(Some(JobEvent::Failed(e))) => return Err(e),
        Ok(Some(_)) | Ok(None) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the scheduler dropped the request",
            ));
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request timed out waiting for a free batch slot",
            ));
        }
    };
    let id = format!("chatcmpl-{}", state.inner.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    if streaming {
        let stream = SseState {
            rx,
            id,
            model,
            created,
            include_usage,
            phase: Phase::Role,
            prompt_tokens,
            _permit: permit,
        };
        let events = futures_util::stream::unfold(stream, |mut s| async move {
            let event = s.next().await?;
            Some((Ok::<Event, Infallible>(event), s))
        });
        return Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response());
    }
    let mut text = String::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(JobEvent::Delta(t))) => text.push_str(&t),
            Ok(Some(JobEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            })) => {
                drop(permit);
                let usage = api::usage(prompt_tokens, completion_tokens);
                let body = api::completion(&id, created, &model, &text, finish_reason, usage);
                return Ok(api::json_response(StatusCode::OK, &body));
            }
            Ok(Some(JobEvent::Failed(e))) => return Err(e),
            Ok(Some(JobEvent::Started { .. })) => {}
            Ok(None) | Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "the request ran past --request-timeout",
                ));
            }
        }
    }
}

enum Phase {
    Role,
    Tokens,
    Usage { prompt: usize, completion: usize },
    Done,
    Closed,
}

/// One streaming response: the role chunk, content chunks, the finish chunk, the usage
/// chunk when asked for, `[DONE]`. Dropping it (client gone) closes the channel, which
/// frees the row at the next step.
struct SseState {
    rx: UnboundedReceiver<JobEvent>,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    phase: Phase,
    prompt_tokens: usize,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl SseState {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        let value = api::chunk(
            &self.id,
            self.created,
            &self.model,
            delta,
            finish,
            self.include_usage,
        );
        Event::default().data(value.to_string())
    }

    async fn next(&mut self) -> Option<Event> {
        match std::mem::replace(&mut self.phase, Phase::Tokens) {
            Phase::Role => Some(self.chunk(json!({"role": "assistant", "content": ""}), None)),
            Phase::Usage { prompt, completion } => {
                self.phase = Phase::Done;
                let usage = api::usage(prompt, completion);
                let value = api::usage_chunk(&self.id, self.created, &self.model, usage);
                Some(Event::default().data(value.to_string()))
            }
            Phase::Done => {
                self.phase = Phase::Closed;
                Some(Event::default().data("[DONE]"))
            }
            Phase::Closed => {
                self.phase = Phase::Closed;
                None
            }
            Phase::Tokens => loop {
                match self.rx.recv().await {
                    Some(JobEvent::Delta(text)) => return Some(self.chunk(json!({"content": text}), None)),
                    Some(JobEvent::Started { .. }) => {}
                    Some(JobEvent::Done {
                        finish_reason,
                        completion_tokens,
                        ..
                    }) => {
                        self.phase = if self.include_usage {
                            Phase::Usage {
                                prompt: self.prompt_tokens,
                                completion: completion_tokens,
                            }
                        } else {
                            Phase::Done
                        };
                        return Some(self.chunk(json!({}), Some(finish_reason)));
                    }
                    Some(JobEvent::Failed(e)) => {
                        self.phase = Phase::Done;
                        return Some(Event::default().data(e.body().to_string()));
                    }
                    None => {
                        self.phase = Phase::Done;
                        let e = ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal_error",
                            "the scheduler dropped the request",
                        );
                        return Some(Event::default().data(e.body().to_string()));
                    }
                }
            },
        }
    }
}
