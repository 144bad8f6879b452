//! `vipllava serve`: an OpenAI-compatible HTTP server (`POST /v1/chat/completions`,
//! `GET /v1/models`, `/health`, `/metrics`) with the visual-prompt extension and
//! continuous batching.
//!
//! One scheduler thread ([`worker`]) owns the pipeline and a
//! [`DecodeBatch`](vipllava::generation::DecodeBatch); the axum handlers ([`http`]) parse
//! requests ([`api`]), decode and mark images ([`media`]) and talk to it through channels.

mod api;
mod http;
mod media;
mod metrics;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::cli::args::{ImageModeArgs, ModelArgs, RuntimeArgs, load_pipeline};

/// Serve the model over an OpenAI-compatible HTTP API.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    image_mode: ImageModeArgs,
    /// Address to listen on; 0.0.0.0 serves the whole network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0: any free port; the line `listening on ...` names the real one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/ routes.
    #[arg(long)]
    api_key: Option<String>,
    /// Allow `file://` image URLs below this directory (nothing else on disk is readable).
    #[arg(long)]
    media_dir: Option<PathBuf>,
    /// Fetch http(s) image URLs named in requests (20 s and 20 MB per image, 3 redirects).
    /// The server then makes requests on its clients' behalf, to any host it can reach:
    /// turn this on only for trusted clients.
    #[arg(long)]
    allow_remote_images: bool,
    /// Rows decoded together in one forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    max_batch_size: u32,
    /// Requests in flight (running plus queued); more are refused with 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent: u32,
    /// Largest request body in MiB (413 above it).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_body_mb: u32,
    /// Seconds a request may take from arrival to its last token (queue included).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
}

/// Limits and switches the handlers need.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Name reported by `/v1/models` and in responses.
    pub model_name: String,
    /// Required bearer token.
    pub api_key: Option<String>,
    /// Root of `file://` URLs.
    pub media_dir: Option<PathBuf>,
    /// `--allow-remote-images`.
    pub allow_remote_images: bool,
    /// Body limit in bytes.
    pub max_body_bytes: usize,
    /// Requests in flight.
    pub max_concurrent: usize,
    /// Per-request time limit.
    pub request_timeout: Duration,
}

/// Runs the command.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let media_dir = match &args.media_dir {
        Some(dir) => Some(
            dir.canonicalize()
                .with_context(|| format!("--media-dir {}", dir.display()))?,
        ),
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let (model, runtime, mode) = (args.model.clone(), args.runtime.clone(), args.image_mode.mode());
    let worker = worker::spawn(
        move || load_pipeline(&model, &runtime, mode),
        worker::WorkerLimits {
            max_batch_size: args.max_batch_size as usize,
        },
        metrics.clone(),
    )?;
    let config = ServeConfig {
        model_name: model_name(&args.model.model),
        api_key: args.api_key.clone(),
        media_dir,
        allow_remote_images: args.allow_remote_images,
        max_body_bytes: args.max_body_mb as usize * 1024 * 1024,
        max_concurrent: args.max_concurrent as usize,
        request_timeout: Duration::from_secs(args.request_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound: SocketAddr = listener.local_addr()?;
        let app = http::router(http::AppState::new(config, worker, metrics));
        println!("listening on http://{bound}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app).await.context("serving")
    })
}

/// The model's name in the API: the last path component of `--model` (a hub id keeps its
/// owner).
fn model_name(spec: &str) -> String {
    let path = std::path::Path::new(spec);
    if path.is_dir() {
        let trimmed = spec.trim_end_matches('/');
        return std::path::Path::new(trimmed)
            .file_name()
            .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned());
    }
    spec.to_string()
}
