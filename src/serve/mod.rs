//! `pipeline serve`: an OpenAI-compatible HTTP API over one model (and its LoRA adapters), on
//! tokio + axum — shaped like mistral.rs' server core: [`router`] builds the routes and layers
//! (API key, body limit and timeout, OpenAI-shaped errors, request metrics); one file per endpoint
//! ([`chat`], [`completions`], [`models`], [`health`], [`metrics`]); [`openai`] the wire types;
//! [`stream`] turns an engine channel into server-sent events; [`engine`] is the thread that owns
//! the model and schedules sequences ([`sequence`]).
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/models` | the base model, then its adapters |
//! | `POST /v1/chat/completions` | chat (template applied), streaming with `stream: true` |
//! | `POST /v1/completions` | plain-text continuation |
//! | `GET /health` | liveness (open without the API key) |
//! | `GET /metrics` | Prometheus text (open without the API key) |

pub mod chat;
pub mod codec;
pub mod completions;
pub mod engine;
pub mod error;
pub mod health;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod request;
pub mod sequence;
pub mod stream;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dfdx::prelude::{Cpu, Device};
use metrics_exporter_prometheus::PrometheusHandle;
use pipeline_model::pretrained::ModelSource;
use pipeline_model::{Batch, Qwen2};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::common::{arm_checked_reads, corrupt_reads, default_system, model_path, CacheArgs, Usage};
use codec::TextCodec;
use engine::{EngineHandle, EngineLimits};
use error::ApiError;

/// Largest request body accepted (413 above).
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// A client has this long to send its request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which model to load (shared by `pipeline serve`, `pipeline chat` and `pipeline generate`).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json), a .gguf file,
    /// or a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors; merged into
    /// the base its `base_model_name_or_path` names, or --base).
    #[arg(long, required_unless_present = "recipe", conflicts_with = "recipe")]
    pub model: Option<PathBuf>,
    /// With an adapter folder as --model: its base model (overrides `base_model_name_or_path`).
    #[arg(long, requires = "model")]
    pub base: Option<PathBuf>,
    /// Use the model trained by this recipe (from its cache; run the recipe first).
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// With --recipe: the stage whose `model` output to use [default: the last training stage].
    #[arg(long, requires = "recipe")]
    pub stage: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Where the model runs: `cpu`, `cuda` (GPU 0) or `cuda:<N>` (`cuda` needs a binary built
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: pipeline_engine::Device,
}

/// Serve a model over an OpenAI-compatible HTTP API.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example:
  pipeline serve --recipe recipes/qwen-self-cognition.toml
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"model\": \"qwen-self-cognition\", \"messages\": [{\"role\": \"user\", \"content\": \"Who are you?\"}]}'

Requests beyond --max-num-seqs wait in a queue of --max-queue; past that the server answers 429.
A request that runs past --request-timeout fails with 408 (a stream ends with an error event).")]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// LoRA adapters served beside the base, as NAME=PATH (peft folders; repeatable). A request
    /// selects one with `"model": NAME`; each runs unmerged on the shared base weights.
    #[arg(long, value_name = "NAME=PATH", value_parser = parse_adapter, num_args = 1..)]
    pub adapters: Vec<(String, PathBuf)>,
    /// The model id clients use [default: the model folder's name, or the recipe file's stem
    /// (`/STAGE` appended with --stage)].
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on; the default only accepts connections from this machine (0.0.0.0: every
    /// interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (401 otherwise; /health and /metrics stay open).
    #[arg(long, env = "PIPELINE_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Sequences decoded side by side, the tokens of one model's sequences in one batched forward
    /// (a request with `n` choices takes `n`); more requests wait.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_num_seqs: u32,
    /// Sequences of one model decoded in one batched forward [default: --max-num-seqs]; 1 steps
    /// each sequence on its own (one pass over the weights per sequence and token).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_batch_size: Option<u32>,
    /// Prompt tokens run through the model per engine iteration, beside the decoding step of the
    /// running sequences (chunked prefill): new requests delay running ones by about this much
    /// work per token; a longer prompt takes several iterations.
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_prefill_tokens: u32,
    /// Requests that may wait for a free sequence slot; past that the server answers 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_queue: u32,
    /// The most tokens one completion may generate: a larger `max_tokens` is a 400, and a request
    /// without one gets this many (or what is left of the model's context, if less).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,
    /// Seconds a request may take from arrival to its last token (408 past it).
    #[arg(long, default_value_t = 600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
}

fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected NAME=PATH"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("`{s}`: expected NAME=PATH with both parts non-empty"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Per-request limits the handlers check.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tokens: usize,
    pub request_timeout: Duration,
}

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub codec: Arc<TextCodec>,
    /// Served model ids: the base, then the adapters (index = the engine's model index).
    pub models: Vec<String>,
    pub api_key: Option<String>,
    pub limits: Limits,
    /// `created` of the model cards (when the server started).
    pub created: u64,
    pub metrics: Option<PrometheusHandle>,
}

/// A model loaded onto the engine thread.
pub struct Loaded {
    pub engine: EngineHandle,
    pub codec: Arc<TextCodec>,
    /// The path the model came from.
    pub path: PathBuf,
}

/// Loads the model (and `adapters`, unmerged on copies of it that share its weights) and starts
/// the engine thread on the chosen device.
pub fn load(args: &ModelArgs, adapters: &[PathBuf], limits: EngineLimits) -> anyhow::Result<Loaded> {
    match args.device {
        pipeline_engine::Device::Cpu => load_on(args, adapters, limits, Cpu::default()),
        // The engine thread owns its models, and dfdx's CUDA device (its cudarc stream) cannot be
        // sent to another thread, so a CUDA build serves from the CPU until the engine creates
        // its device on its own thread.
        #[cfg(feature = "cuda")]
        pipeline_engine::Device::Cuda { .. } => Err(Usage(format!(
            "--device {}: serving and chat run on the CPU in this build (the CUDA device cannot move to the \
             engine thread yet); leave --device out",
            args.device
        ))
        .into()),
        #[cfg(not(feature = "cuda"))]
        pipeline_engine::Device::Cuda { .. } => {
            Err(Usage(pipeline_stages::cuda_not_built(args.device).to_string()).into())
        }
    }
}

fn load_on<D: Device<f32> + Send + 'static>(
    args: &ModelArgs,
    adapters: &[PathBuf],
    limits: EngineLimits,
    dev: D,
) -> anyhow::Result<Loaded> {
    let (path, store) = model_path(args.model.as_deref(), args.recipe.as_deref(), args.stage.as_deref(), &args.cache)?;
    let src = ModelSource::resolve(&path, args.base.as_deref()).map_err(|e| Usage(e.to_string()))?;
    // A model from the cache (`--recipe`) is checked against its digest while it is read, as
    // `generate` does (issue 14, defect 1).
    if let Some(store) = &store {
        arm_checked_reads(store, &src)?;
    }
    let system = default_system(&src);
    let loaded = src.load_for_inference(&dev);
    corrupt_reads(store.as_ref(), loaded.as_ref().err())?;
    let p = loaded.with_context(|| format!("loading {}", path.display()))?;
    let (base, codec) = TextCodec::split(p, system);
    let mut models = Vec::with_capacity(1 + adapters.len());
    if !adapters.is_empty() {
        // one step makes the frozen weights' host copies, which the clones then share
        base.forward_cached(&Batch::new(vec![0], 1, 1)?, &mut base.new_cache())?;
    }
    for a in adapters {
        let mut m: Qwen2<D> = base.clone();
        m.load_peft_adapter(a).with_context(|| format!("loading adapter {}", a.display()))?;
        models.push(m);
    }
    models.insert(0, base);
    let codec = Arc::new(codec);
    let engine = engine::spawn(models, codec.clone(), limits).context("starting the engine thread")?;
    Ok(Loaded { engine, codec, path })
}

/// The served id of the base model when `--served-model-name` is absent.
fn default_name(args: &ModelArgs, path: &Path) -> String {
    let stem = |p: &Path| {
        let p = if p.is_file() { p.with_extension("") } else { p.to_path_buf() };
        p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    };
    match (&args.recipe, &args.stage) {
        (Some(r), Some(s)) => format!("{}/{s}", stem(r)),
        (Some(r), None) => stem(r),
        _ => stem(path),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let names: Vec<&String> = args.adapters.iter().map(|(n, _)| n).collect();
    if let Some(dup) = names.iter().enumerate().find_map(|(i, n)| names[..i].contains(n).then_some(n)) {
        return Err(Usage(format!("--adapters: the name `{dup}` is given twice")).into());
    }
    let limits = EngineLimits {
        max_running: args.max_num_seqs as usize,
        max_queue: args.max_queue as usize,
        max_batch: args.max_batch_size.unwrap_or(args.max_num_seqs) as usize,
        prefill_tokens: args.max_prefill_tokens as usize,
    };
    let paths: Vec<PathBuf> = args.adapters.iter().map(|(_, p)| p.clone()).collect();
    let loaded = load(&args.model, &paths, limits)?;
    let base = args.served_model_name.clone().unwrap_or_else(|| default_name(&args.model, &loaded.path));
    if names.iter().any(|n| **n == base) {
        return Err(Usage(format!("--adapters: `{base}` is the base model's name")).into());
    }
    let mut models = vec![base];
    models.extend(names.into_iter().cloned());
    let state = Arc::new(AppState {
        engine: loaded.engine,
        codec: loaded.codec,
        models,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        limits: Limits {
            max_tokens: args.max_tokens as usize,
            request_timeout: Duration::from_secs(args.request_timeout),
        },
        created: request::now_secs(),
        metrics: Some(metrics::install()?),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving {} ({}) with {} adapter(s); max {} sequences, queue {}, {} tokens per completion{}",
            state.models[0],
            loaded.path.display(),
            state.models.len() - 1,
            args.max_num_seqs,
            args.max_queue,
            args.max_tokens,
            if state.api_key.is_some() { "; API key required" } else { "" }
        );
        println!("listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // each token is a small write: without TCP_NODELAY, Nagle + delayed ACKs hold a stream's
        // first chunk ~40 ms
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down");
}

/// The routes and layers.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models::list))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health::health))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        // outermost: the layers' own error answers get OpenAI's shape, and every answer is counted
        .layer(middleware::map_response(openai_errors))
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

/// Equal without an early exit (the key is not leaked by timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            None => {
                return ApiError::unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
                    .into_response()
            }
            Some(k) if !same(k.trim().as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("invalid API key").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Error answers made below the handlers (unknown route, wrong method, body too large or too
/// slow) get OpenAI's error body too.
async fn openai_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 << 10).await.unwrap_or_default();
    ApiError::from_status(status, &String::from_utf8_lossy(&text)).into_response()
}

const ROUTES: [&str; 5] = ["/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"];

async fn count_requests(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let route = ROUTES.iter().find(|r| **r == path).copied().unwrap_or("other");
    let t = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    ::metrics::counter!("pipeline_requests_total", "route" => route, "status" => status).increment(1);
    ::metrics::histogram!("pipeline_request_duration_seconds", "route" => route).record(t.elapsed().as_secs_f64());
    resp
}
