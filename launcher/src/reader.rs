//! One reader: a model served by its replica groups. Tensor-parallel groups (and CUDA groups)
//! run as worker processes under a [`Supervisor`]; a CPU group of one rank runs in-process
//! unless `--isolate-workers` asks otherwise. Both sit behind the same `Executor` interface.

use crate::model_resolve;
use crate::plan::{self, DeviceKind};
use crate::serve::ServeArgs;
use crate::supervisor::{GroupPlan, Supervisor};
use anyhow::{bail, Context, Result};
use liftoff_engine::load::open_model;
use liftoff_engine::loader::{ModelPath, WeightFormat};
use liftoff_engine::model::Llama;
use liftoff_engine::parallel::SingleRank;
use liftoff_engine::scheduler::{
    Executor, LocalExecutor, Scheduler, SchedulerConfig, SchedulerHandle, StepTarget,
};
use liftoff_engine::tokenizer::Tokenizer;
use liftoff_engine::worker::protocol::WorkerInit;
use liftoff_engine::{DTypeChoice, EngineOptions, KvBudget, LoadedModel};
use liftoff_server::{ModelInfo, ModelService};
use std::sync::Arc;
use std::time::Duration;

/// Default maximum sequence length when the model allows more.
const DEFAULT_MAX_SEQ_LEN: usize = 4096;

/// A started reader.
pub struct Reader {
    pub service: ModelService,
    /// The reader's worker processes, if it has any.
    pub supervisor: Option<Supervisor>,
    /// Weights and KV cache of every rank, bytes.
    pub memory_bytes: u64,
}

/// The executors of a reader's groups, with what they report.
pub struct Groups {
    pub executors: Vec<Box<dyn Executor>>,
    pub supervisor: Option<Supervisor>,
    pub max_seq_len: usize,
    pub device: DeviceKind,
    /// How the weights are held.
    pub format: WeightFormat,
    /// Weights and KV cache of every rank, bytes.
    pub memory_bytes: u64,
}

/// Where and how a model's replica groups run.
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    pub device: &'a str,
    pub tensor_parallel: usize,
    pub replicas: Option<usize>,
    pub cuda_visible_devices: Option<&'a str>,
    /// Worker processes even for a CPU group of one rank.
    pub isolate: bool,
    /// KV-cache size per rank.
    pub kv_budget: KvBudget,
    /// How long a worker group may take to answer a step before it is declared down.
    pub step_timeout: Duration,
}

/// Checks the settings, plans the groups and starts their executors (loading the weights).
pub fn start_groups(
    opts: &EngineOptions,
    place: &Placement,
    log_level: &str,
) -> Result<(Groups, Tokenizer)> {
    let Placement {
        device,
        tensor_parallel,
        replicas,
        cuda_visible_devices,
        isolate,
        kv_budget,
        step_timeout,
    } = *place;
    let kind = DeviceKind::resolve(device)?;
    let path = ModelPath::resolve(&opts.model)?;
    let format = opts.dtype.weight_format(&path, kind == DeviceKind::Cuda);
    let (source, tokenizer) = open_model(&path, &candle_core::Device::Cpu)?;
    Llama::check_tensor_parallel(source.config(), tensor_parallel)?;
    drop(source);
    let gpus = match (kind, cuda_visible_devices) {
        (DeviceKind::Cuda, Some(list)) => {
            let ids = plan::parse_visible(list)?;
            // The workers see exactly these GPUs, by ordinal.
            std::env::set_var("CUDA_VISIBLE_DEVICES", ids.join(","));
            ids.len()
        }
        _ => plan::gpu_count(),
    };
    let plans: Vec<GroupPlan> = plan::plan_groups(kind, tensor_parallel, replicas, gpus)?;
    if kind == DeviceKind::Cpu && tensor_parallel == 1 && !isolate {
        let mut executors: Vec<Box<dyn Executor>> = Vec::new();
        let mut max_seq_len = 0;
        let mut memory_bytes = 0;
        for g in 0..plans.len() {
            tracing::info!(
                "loading {} (replica group {g}, in-process)",
                opts.model.display()
            );
            let loaded = LoadedModel::load(opts, &candle_core::Device::Cpu, Arc::new(SingleRank))?;
            max_seq_len = loaded.model.max_seq_len();
            let blocks = loaded.kv_blocks(opts.block_size, kv_budget)?;
            memory_bytes += loaded.weight_bytes + loaded.kv_bytes(blocks, opts.block_size);
            // In-process replicas share the cores (as worker processes do).
            let model = if plans.len() > 1 {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                loaded.model.with_threads((cores / plans.len()).max(1))?
            } else {
                loaded.model
            };
            executors.push(Box::new(LocalExecutor::new(
                model,
                blocks,
                opts.block_size,
            )?));
        }
        return Ok((
            Groups {
                executors,
                supervisor: None,
                max_seq_len,
                device: kind,
                format,
                memory_bytes,
            },
            tokenizer,
        ));
    }
    tracing::info!(
        "starting {} replica group(s) of {tensor_parallel} worker process(es) on {}",
        plans.len(),
        kind.name()
    );
    let init = WorkerInit {
        rendezvous: Vec::new(),
        engine: opts.clone(),
        kv_budget,
    };
    let (supervisor, groups) = Supervisor::launch(&plans, &init, log_level)?;
    let max_seq_len = groups
        .first()
        .map(|g| g.ready().max_seq_len as usize)
        .unwrap_or_default();
    let memory_bytes = groups.iter().map(|g| g.ready().memory_bytes).sum();
    Ok((
        Groups {
            executors: groups
                .into_iter()
                .map(|mut g| {
                    g.set_step_timeout(step_timeout)?;
                    Ok(Box::new(g) as Box<dyn Executor>)
                })
                .collect::<Result<_>>()?,
            supervisor: Some(supervisor),
            max_seq_len,
            device: kind,
            format,
            memory_bytes,
        },
        tokenizer,
    ))
}

/// `--step-timeout-secs` as a duration (at least a second).
pub fn step_timeout(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs >= 1.0) {
        bail!("--step-timeout-secs must be at least 1, got {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// KV-cache memory per rank: `--kv-cache-memory-mib` when set, else a fraction of GPU memory
/// on a GPU and 512 MiB on the CPU.
fn kv_budget(args: &ServeArgs) -> Result<KvBudget> {
    let fraction = args.gpu_memory_utilization;
    if !(fraction > 0.0 && fraction <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1], got {fraction}");
    }
    Ok(match args.kv_cache_memory_mib {
        Some(mib) => KvBudget::Bytes((mib as u64) << 20),
        None if DeviceKind::resolve(&args.device)? == DeviceKind::Cuda => {
            KvBudget::DeviceMemory { fraction }
        }
        None => KvBudget::Bytes(DEFAULT_CPU_KV_MIB << 20),
    })
}

/// KV-cache memory per rank on the CPU unless configured.
const DEFAULT_CPU_KV_MIB: u64 = 512;

/// `--max-step-ms`: `auto`, `off`, or milliseconds.
pub fn parse_max_step(v: &str) -> Result<StepTarget> {
    match v.trim() {
        "auto" => Ok(StepTarget::Auto),
        "off" => Ok(StepTarget::Off),
        ms => match ms.parse::<u64>() {
            Ok(n) if n > 0 => Ok(StepTarget::Fixed(Duration::from_millis(n))),
            _ => bail!("--max-step-ms must be `auto`, `off` or a positive number of milliseconds, not `{v}`"),
        },
    }
}

/// Loads and starts one reader.
pub fn start(args: &ServeArgs, log_level: &str) -> Result<Reader> {
    if args.max_batch_size == 0 || args.block_size == 0 || args.max_num_batched_tokens == 0 {
        bail!("--max-batch-size, --block-size and --max-num-batched-tokens must be at least 1");
    }
    let dtype: DTypeChoice = args.dtype.parse()?;
    // Checked before the weights load, like the other settings.
    let max_step = parse_max_step(&args.max_step_ms)?;
    let path = model_resolve::resolve(&args.model, args.access_token.as_deref())?;
    let mut opts = EngineOptions::new(&path);
    opts.dtype = dtype;
    opts.block_size = args.block_size;
    opts.max_seq_len = Some(args.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQ_LEN));
    let place = Placement {
        device: &args.device,
        tensor_parallel: args.tensor_parallel,
        replicas: args.replicas,
        cuda_visible_devices: args.cuda_visible_devices.as_deref(),
        isolate: args.isolate_workers,
        kv_budget: kv_budget(args)?,
        step_timeout: step_timeout(args.step_timeout_secs)?,
    };
    let (groups, tokenizer) = start_groups(&opts, &place, log_level)
        .with_context(|| format!("loading {}", path.display()))?;
    let max_seq_len = groups.max_seq_len;
    let memory_bytes = groups.memory_bytes;
    let config = SchedulerConfig {
        max_batch_size: args.max_batch_size,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_waiting: args.max_waiting,
        max_seq_len,
        enable_prefix_caching: !args.disable_prefix_caching,
        batch_wait: Duration::from_millis(args.batch_duration_millis),
        max_step,
    };
    let mut replicas = Vec::new();
    let mut kv_cache_blocks = 0;
    for (g, executor) in groups.executors.into_iter().enumerate() {
        let (blocks, bs) = executor.kv_blocks();
        if blocks * bs < max_seq_len {
            bail!(
                "the KV cache ({}) holds {} tokens per rank, fewer than one sequence of {max_seq_len}",
                match args.kv_cache_memory_mib {
                    Some(mib) => format!("--kv-cache-memory-mib {mib}"),
                    None => format!("--gpu-memory-utilization {}", args.gpu_memory_utilization),
                },
                blocks * bs
            );
        }
        kv_cache_blocks = blocks;
        let scheduler = Scheduler::new(config.clone(), executor, tokenizer.clone());
        replicas.push(SchedulerHandle::spawn(
            scheduler,
            &format!("scheduler-{g}"),
        )?);
    }
    let mut supervisor = groups.supervisor;
    let workers = supervisor
        .as_ref()
        .map(|s| s.workers().to_vec())
        .unwrap_or_default();
    if let Some(s) = supervisor.as_mut() {
        s.watch(replicas.iter().map(|r| r.health_flag()).collect());
    }
    let info = ModelInfo {
        model_name: model_name(&args.model, &path),
        model_path: path.display().to_string(),
        consumer_group: args.consumer_group.clone(),
        dtype: format!("{:?}", groups.format),
        device: groups.device.name().to_string(),
        tensor_parallel: args.tensor_parallel,
        replicas: replicas.len(),
        max_batch_size: args.max_batch_size,
        max_sequence_length: max_seq_len,
        max_num_batched_tokens: args.max_num_batched_tokens,
        kv_cache_blocks,
        block_size: args.block_size,
        workers,
    };
    Ok(Reader {
        service: ModelService {
            info,
            tokenizer,
            replicas,
        },
        supervisor,
        memory_bytes,
    })
}

pub fn model_name(arg: &str, path: &std::path::Path) -> String {
    if !std::path::Path::new(arg).exists() {
        return arg.to_string();
    }
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| arg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn args(extra: &[&str]) -> ServeArgs {
        let argv: Vec<OsString> = ["liftoff", "serve", "--device", "cpu"]
            .iter()
            .chain(extra)
            .map(OsString::from)
            .collect();
        crate::serve_config::readers_from(argv).unwrap().remove(0)
    }

    /// The management API listens on loopback unless told otherwise; no keys by default.
    #[test]
    fn management_is_loopback_and_open_by_default() {
        let a = args(&[]);
        assert_eq!(a.management_host, "127.0.0.1");
        assert_eq!((a.api_key, a.management_api_key), (None, None));
        let a = args(&["--management-host", "0.0.0.0", "--api-key", "a,b"]);
        assert_eq!(a.management_host, "0.0.0.0");
        assert_eq!(a.api_key.as_deref(), Some("a,b"));
    }

    #[test]
    fn max_step_is_auto_off_or_milliseconds() {
        assert_eq!(parse_max_step("auto").unwrap(), StepTarget::Auto);
        assert_eq!(parse_max_step("off").unwrap(), StepTarget::Off);
        assert_eq!(
            parse_max_step("120").unwrap(),
            StepTarget::Fixed(Duration::from_millis(120))
        );
        for bad in ["0", "-5", "fast", "1.5", ""] {
            let err = parse_max_step(bad).unwrap_err().to_string();
            assert!(
                err.contains("--max-step-ms") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn kv_budget_is_the_page_cache_size_or_a_default() {
        assert_eq!(kv_budget(&args(&[])).unwrap(), KvBudget::Bytes(512 << 20));
        assert_eq!(
            kv_budget(&args(&["--kv-cache-memory-mib", "64"])).unwrap(),
            KvBudget::Bytes(64 << 20)
        );
        let err = kv_budget(&args(&["--gpu-memory-utilization", "1.5"])).unwrap_err();
        assert!(err.to_string().contains("(0, 1]"), "{err}");
    }
}
