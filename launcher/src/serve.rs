//! `liftoff serve` (and plain `liftoff`): loads the model into one or more replica groups and
//! serves the HTTP APIs until SIGTERM/SIGINT, then drains in-flight requests.

use crate::model_resolve;
use anyhow::{bail, Context, Result};
use clap::Args;
use liftoff_engine::kv_cache::DEFAULT_BLOCK_SIZE;
use liftoff_engine::parallel::SingleRank;
use liftoff_engine::scheduler::{LocalExecutor, Scheduler, SchedulerConfig, SchedulerHandle};
use liftoff_engine::{DTypeChoice, EngineOptions, LoadedModel};
use liftoff_server::{AppState, ModelInfo, ModelService};
use std::net::SocketAddr;
use std::sync::Arc;

/// Arguments of `liftoff serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A .gguf file, a Hugging Face model directory, or the default model's name.
    #[arg(long, env = "TAKEOFF_MODEL_NAME", default_value = model_resolve::DEFAULT_MODEL)]
    pub model: String,
    /// cpu (cuda needs a build with the `cuda` feature).
    #[arg(long, env = "TAKEOFF_DEVICE", default_value = "cpu")]
    pub device: String,
    /// auto keeps GGUF weights quantized; f32, bf16, f16 convert.
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
    /// Consumer group this model serves.
    #[arg(long, env = "TAKEOFF_CONSUMER_GROUP", default_value = "primary")]
    pub consumer_group: String,
    /// Data-parallel replica groups (each holds a copy of the model).
    #[arg(long, env = "TAKEOFF_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Most sequences decoded together per replica group.
    #[arg(long, env = "TAKEOFF_MAX_BATCH_SIZE", default_value_t = 16)]
    pub max_batch_size: usize,
    /// Most tokens in one forward pass; longer prompts are prefilled in chunks.
    #[arg(long, env = "TAKEOFF_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output in tokens (default: the model's context, at most 4096).
    #[arg(long, env = "TAKEOFF_MAX_SEQUENCE_LENGTH")]
    pub max_sequence_length: Option<usize>,
    /// KV-cache memory per replica group, in MiB.
    #[arg(long, env = "TAKEOFF_PAGE_CACHE_SIZE", default_value_t = 512)]
    pub kv_cache_memory_mib: usize,
    /// Tokens per KV-cache block.
    #[arg(long, env = "TAKEOFF_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// Requests allowed to wait per replica group before 503s.
    #[arg(long, env = "TAKEOFF_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Turn off sharing of cached prompt prefixes.
    #[arg(long, env = "TAKEOFF_DISABLE_PREFIX_CACHING")]
    pub disable_prefix_caching: bool,
}

/// Default maximum sequence length when the model allows more.
const DEFAULT_MAX_SEQ_LEN: usize = 4096;

/// Runs the server.
pub fn run(args: ServeArgs) -> Result<()> {
    if args.device != "cpu" {
        bail!(
            "device '{}' is not available in this build (supported: cpu)",
            args.device
        );
    }
    if args.replicas == 0
        || args.max_batch_size == 0
        || args.block_size == 0
        || args.max_num_batched_tokens == 0
    {
        bail!("--replicas, --max-batch-size, --block-size and --max-num-batched-tokens must be at least 1");
    }
    let dtype: DTypeChoice = args.dtype.parse()?;
    let path = model_resolve::resolve(&args.model)?;
    let mut opts = EngineOptions::new(&path);
    opts.dtype = dtype;
    opts.max_seq_len = Some(args.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQ_LEN));

    let mut replicas = Vec::new();
    let mut tokenizer = None;
    let mut info = None;
    for r in 0..args.replicas {
        tracing::info!("loading {} (replica group {r})", path.display());
        let loaded = LoadedModel::load(&opts, &candle_core::Device::Cpu, Arc::new(SingleRank))
            .with_context(|| format!("loading {}", path.display()))?;
        let max_seq_len = loaded.model.max_seq_len();
        let probe = loaded.model.kv_cache_config(1, args.block_size);
        let num_blocks = (args.kv_cache_memory_mib << 20) / probe.bytes_per_block().max(1);
        if num_blocks * args.block_size < max_seq_len {
            bail!(
                "--kv-cache-memory-mib {} holds {} tokens, fewer than one sequence of {max_seq_len}",
                args.kv_cache_memory_mib,
                num_blocks * args.block_size
            );
        }
        let config = SchedulerConfig {
            max_batch_size: args.max_batch_size,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_waiting: args.max_waiting,
            max_seq_len,
            enable_prefix_caching: !args.disable_prefix_caching,
        };
        info.get_or_insert(ModelInfo {
            model_name: model_name(&args.model, &path),
            model_path: path.display().to_string(),
            consumer_group: args.consumer_group.clone(),
            dtype: format!("{:?}", loaded.format),
            device: args.device.clone(),
            tensor_parallel: 1,
            replicas: args.replicas,
            max_batch_size: args.max_batch_size,
            max_sequence_length: max_seq_len,
            max_num_batched_tokens: args.max_num_batched_tokens,
            kv_cache_blocks: num_blocks,
            block_size: args.block_size,
        });
        tokenizer.get_or_insert(loaded.tokenizer.clone());
        let executor = LocalExecutor::new(loaded.model, num_blocks, args.block_size)?;
        let scheduler = Scheduler::new(config, executor, loaded.tokenizer);
        replicas.push(SchedulerHandle::spawn(
            scheduler,
            &format!("scheduler-{r}"),
        )?);
    }
    let service = Arc::new(ModelService {
        info: info.context("no replica")?,
        tokenizer: tokenizer.context("no replica")?,
        replicas,
    });
    let state = Arc::new(AppState::new(vec![service])?);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve_http(state, &args))
}

fn model_name(arg: &str, path: &std::path::Path) -> String {
    if !std::path::Path::new(arg).exists() {
        return arg.to_string();
    }
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| arg.to_string())
}

async fn serve_http(state: Arc<AppState>, args: &ServeArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("bad listen address {}:{}", args.host, args.port))?;
    let maddr: SocketAddr = format!("{}:{}", args.host, args.management_port)
        .parse()
        .with_context(|| format!("bad listen address {}:{}", args.host, args.management_port))?;
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
