//! `liftoff serve` (and plain `liftoff`): loads each reader's model into its replica groups (in
//! this process, or as worker processes per device rank) and serves the HTTP APIs until
//! SIGTERM/SIGINT, then drains in-flight requests and stops the workers.

use crate::loader::Loader;
use crate::model_resolve;
use anyhow::{Context, Result};
use clap::Args;
use liftoff_engine::kv_cache::DEFAULT_BLOCK_SIZE;
use liftoff_server::{AppState, RegistryOptions, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `liftoff serve`. Each may also come from a `TAKEOFF_*` variable or the manifest
/// (`--config-file`); precedence: flag > variable > manifest > default.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub struct ServeArgs {
    /// A .gguf file, a Hugging Face model directory, or the default model's name.
    #[arg(long, env = "TAKEOFF_MODEL_NAME", default_value = model_resolve::DEFAULT_MODEL)]
    pub model: String,
    /// cpu, cuda, or auto (cuda when built with it and a GPU is present).
    #[arg(long, env = "TAKEOFF_DEVICE", default_value = "auto")]
    pub device: String,
    /// Ranks (devices, one worker process each) per replica group.
    #[arg(long, env = "TAKEOFF_TENSOR_PARALLEL", default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Data-parallel replica groups (default: 1 on CPU, visible GPUs / tensor parallel on CUDA).
    #[arg(long, env = "TAKEOFF_REPLICAS")]
    pub replicas: Option<usize>,
    /// GPUs to use, e.g. "0,1" (else CUDA_VISIBLE_DEVICES, else all).
    #[arg(long, env = "TAKEOFF_CUDA_VISIBLE_DEVICES")]
    pub cuda_visible_devices: Option<String>,
    /// Run even a tensor-parallel size of 1 as worker processes (CPU runs it in-process).
    #[arg(long, env = "TAKEOFF_ISOLATE_WORKERS")]
    pub isolate_workers: bool,
    /// auto keeps GGUF weights quantized and loads Hugging Face checkpoints in f32 on CPU, bf16 on
    /// a GPU; f32, bf16, f16 convert.
    #[arg(long, env = "TAKEOFF_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Address to listen on.
    #[arg(long, env = "TAKEOFF_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Inference API port.
    #[arg(long, env = "TAKEOFF_PORT", default_value_t = 3000)]
    pub port: u16,
    /// Management API port (health, info, metrics, readers).
    #[arg(long, env = "TAKEOFF_MANAGEMENT_PORT", default_value_t = 3001)]
    pub management_port: u16,
    /// Address the management API listens on (loopback unless set: it can change what is
    /// served).
    #[arg(long, env = "TAKEOFF_MANAGEMENT_HOST", default_value = "127.0.0.1")]
    pub management_host: String,
    /// API keys of the inference port, comma-separated: requests then need
    /// `Authorization: Bearer <key>` (401 otherwise); /health stays open.
    #[arg(long, env = "TAKEOFF_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// API keys of the management port, comma-separated (/health stays open).
    #[arg(long, env = "TAKEOFF_MANAGEMENT_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub management_api_key: Option<String>,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "TAKEOFF_BODY_SIZE_LIMIT_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub body_size_limit_bytes: usize,
    /// Consumer group this model serves.
    #[arg(long, env = "TAKEOFF_CONSUMER_GROUP", default_value = "primary")]
    pub consumer_group: String,
    /// Most sequences decoded together per replica group.
    #[arg(long, env = "TAKEOFF_MAX_BATCH_SIZE", default_value_t = 16)]
    pub max_batch_size: usize,
    /// When idle, how long a request waits for others to batch with (milliseconds).
    #[arg(long, env = "TAKEOFF_BATCH_DURATION_MILLIS", default_value_t = 0)]
    pub batch_duration_millis: u64,
    /// Most tokens in one forward pass; longer prompts are prefilled in chunks.
    #[arg(long, env = "TAKEOFF_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Longest a step that decodes may take while prompts are prefilled beside it, in
    /// milliseconds: the prefill chunk is sized from the measured step cost to fit. `auto`
    /// keeps such a step within 1.2x of a decode step of every sequence running or waiting
    /// (the streams' pace); `off` bounds chunks by --max-num-batched-tokens only.
    #[arg(long, env = "TAKEOFF_MAX_STEP_MS", default_value = "auto")]
    pub max_step_ms: String,
    /// Longest prompt + output in tokens (default: the model's context, at most 4096).
    #[arg(long, env = "TAKEOFF_MAX_SEQUENCE_LENGTH")]
    pub max_sequence_length: Option<usize>,
    /// KV-cache memory per rank, in MiB (default: 512 on CPU; on a GPU, what
    /// --gpu-memory-utilization leaves once the weights are loaded).
    #[arg(long, env = "TAKEOFF_PAGE_CACHE_SIZE")]
    pub kv_cache_memory_mib: Option<usize>,
    /// Fraction of each GPU's memory the weights and the KV cache may use together, when
    /// --kv-cache-memory-mib is not set.
    #[arg(long, env = "TAKEOFF_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// Tokens per KV-cache block.
    #[arg(long, env = "TAKEOFF_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// Seconds a worker group may take to answer a step before it is declared down (a hung
    /// or stopped worker): its requests get 503 and the other groups keep serving.
    #[arg(long, env = "TAKEOFF_STEP_TIMEOUT_SECS", default_value_t = 60.0)]
    pub step_timeout_secs: f64,
    /// Requests allowed to wait per replica group before 503s.
    #[arg(long, env = "TAKEOFF_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Turn off sharing of cached prompt prefixes.
    #[arg(long, env = "TAKEOFF_DISABLE_PREFIX_CACHING")]
    pub disable_prefix_caching: bool,
    /// Hugging Face token for gated models (also read from HF_TOKEN).
    #[arg(long, env = "TAKEOFF_ACCESS_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub access_token: Option<String>,
    /// The reader's id in the management API (default: `<model>-<n>`; a manifest reader's
    /// key in `readers_config`).
    #[arg(long, env = "TAKEOFF_READER_ID")]
    pub reader_id: Option<String>,
    /// Keep this reader loaded always: it is never unloaded to make room for another.
    #[arg(long, env = "TAKEOFF_PINNED")]
    pub pinned: bool,
    /// Memory all readers on one device may use together, MiB (CPU: host RAM; a GPU: its
    /// own memory). A load that does not fit unloads the least recently used idle readers.
    /// Default: --gpu-memory-utilization of the device's total.
    #[arg(long, env = "TAKEOFF_MODELS_MEMORY_MIB")]
    pub models_memory_mib: Option<u64>,
    /// Directories `POST /reader` may load models from (repeatable, or comma-separated);
    /// Hub ids and the default model are always allowed. Default: the model cache and the
    /// directories of the models given at start.
    #[arg(long, env = "TAKEOFF_MODEL_ROOT", value_delimiter = ',')]
    pub model_root: Vec<PathBuf>,
    /// Longest a request waits for its reader to load (or reload), seconds.
    #[arg(long, env = "TAKEOFF_READER_LOAD_TIMEOUT_SECS", default_value_t = 300)]
    pub reader_load_timeout_secs: u64,
    /// Longest a deleted reader's in-flight requests may run on, seconds; then they end
    /// with 503.
    #[arg(long, env = "TAKEOFF_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Time each part of the forward pass and show the totals on /metrics
    /// (`liftoff_forward_part_seconds_total{part}`); forwards in worker processes (tensor
    /// parallel > 1, --isolate-workers, CUDA) are not counted. A server-wide setting.
    #[arg(long, env = "TAKEOFF_PROFILE")]
    pub profile: bool,
    /// A Takeoff manifest (YAML: takeoff.server_config, takeoff.readers_config).
    #[arg(long, env = "TAKEOFF_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
}

/// Runs the server for `readers` (one per manifest reader; the first's server settings count).
pub fn run(readers: Vec<ServeArgs>, log_level: &str) -> Result<()> {
    let first = readers.first().context("no reader to serve")?.clone();
    // Checked before any weights load, like the other settings.
    let options = ServerOptions {
        api_keys: keys(first.api_key.as_deref(), "--api-key")?,
        management_api_keys: keys(first.management_api_key.as_deref(), "--management-api-key")?,
        body_size_limit_bytes: first.body_size_limit_bytes,
    };
    let loader = Arc::new(Loader::new(&first, &readers, log_level)?);
    if first.profile {
        liftoff_engine::profile::enable();
    }
    // Readers that may share a device size their KV cache from page_cache_size or a default.
    let shared = readers.len() > 1 || first.models_memory_mib.is_some();
    let what = |i: usize, args: &ServeArgs| {
        if readers.len() > 1 {
            format!("reader {i} ({})", args.model)
        } else {
            format!("serving {}", args.model)
        }
    };
    // Every reader's settings are checked before any weights load.
    let specs = readers
        .iter()
        .enumerate()
        .map(|(i, args)| {
            loader
                .spec(args.clone(), false, shared)
                .map_err(|e| anyhow::anyhow!("{}: {}", what(i, args), e.message))
        })
        .collect::<Result<Vec<_>>>()?;
    let registry_options = RegistryOptions {
        load_timeout: Duration::from_secs(first.reader_load_timeout_secs),
        drain_timeout: Duration::from_secs(first.drain_timeout_secs),
        max_waiting: first.max_waiting,
    };
    let state = Arc::new(AppState::with_loader(
        Some(loader),
        options,
        registry_options,
        server_config(&first),
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async {
        // The readers given at start load one after another, before the ports open.
        for (i, spec) in specs.into_iter().enumerate() {
            let args = &readers[i];
            let id = state
                .registry
                .add(spec)
                .map_err(|e| anyhow::anyhow!("{}: {}", what(i, args), e.message))?;
            state
                .registry
                .wait_loaded(&id)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", what(i, args)))?;
        }
        serve_http(state.clone(), &first).await
    });
    // Ends every reader's schedulers, then its worker processes.
    rt.block_on(state.registry.shutdown_all());
    drop(rt);
    served
}

/// The server's settings, as `GET /status` shows them.
fn server_config(a: &ServeArgs) -> serde_json::Value {
    serde_json::json!({
        "host": a.host,
        "port": a.port,
        "management_host": a.management_host,
        "management_port": a.management_port,
        "models_memory_mib": a.models_memory_mib,
        "model_root": a.model_root,
        "reader_load_timeout_secs": a.reader_load_timeout_secs,
        "drain_timeout_secs": a.drain_timeout_secs,
        "body_size_limit_bytes": a.body_size_limit_bytes,
        "api_keys": !a.api_key.as_deref().unwrap_or("").trim().is_empty(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// The keys of a comma-separated list (empty entries dropped); a list given with no key in it
/// is an error, not an open port.
fn keys(list: Option<&str>, flag: &str) -> Result<Vec<String>> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let keys: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(String::from)
        .collect();
    if keys.is_empty() {
        anyhow::bail!("{flag} was given but holds no key");
    }
    Ok(keys)
}

async fn serve_http(state: Arc<AppState>, args: &ServeArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("bad listen address {}:{}", args.host, args.port))?;
    let maddr: SocketAddr = format!("{}:{}", args.management_host, args.management_port)
        .parse()
        .with_context(|| {
            format!(
                "bad listen address {}:{}",
                args.management_host, args.management_port
            )
        })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let mlistener = tokio::net::TcpListener::bind(maddr)
        .await
        .with_context(|| format!("binding {maddr}"))?;
    tracing::info!("serving the inference API on http://{addr} and management on http://{maddr}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut m_stop = stop_rx.clone();
    let mut i_stop = stop_rx;
    let inference = axum::serve(listener, liftoff_server::inference_router(state.clone()))
        .with_graceful_shutdown(async move {
            let _ = i_stop.wait_for(|s| *s).await;
        });
    let management = axum::serve(mlistener, liftoff_server::management_router(state))
        .with_graceful_shutdown(async move {
            let _ = m_stop.wait_for(|s| *s).await;
        });
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
    });
    let (a, b) = tokio::join!(inference, management);
    a?;
    b?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
