//! The worker's side: connect to the launcher, join the group's communicator, load the shard,
//! then run steps until told to stop or the launcher goes away.

use super::protocol::{self, FromWorker, StepOutput, ToWorker, WorkerInit, WorkerReady};
use super::WorkerDevice;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::load::LoadedModel;
use crate::model::Llama;
use crate::model_runner::run_step;
use crate::model_runner::MaskWait;
use crate::parallel::{Communicator, CpuCommunicator, CpuRendezvous, SingleRank};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the ranks of a group wait for one another to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a worker sits.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The launcher's control socket.
    pub control: PathBuf,
    pub group: usize,
    pub rank: usize,
    pub world_size: usize,
    pub device: WorkerDevice,
}

/// Runs a worker until the launcher sends `Shutdown` or closes its socket.
pub fn run_worker(args: &WorkerArgs) -> Result<()> {
    let lost = |e: std::io::Error| EngineError::WorkerLost(format!("launcher connection: {e}"));
    let mut ctl = UnixStream::connect(&args.control).map_err(lost)?;
    let rendezvous = prepare_rendezvous(args)?;
    protocol::send(
        &mut ctl,
        &FromWorker::Hello {
            group: args.group as u32,
            rank: args.rank as u32,
            rendezvous: rendezvous.as_ref().map(Rendezvous::id),
        },
    )
    .map_err(lost)?;
    let init = match protocol::recv::<ToWorker>(&mut ctl).map_err(lost)? {
        ToWorker::Init(init) => init,
        ToWorker::Shutdown => return Ok(()),
        ToWorker::Step(_) | ToWorker::Masks(_) => {
            return Err(EngineError::WorkerLost(
                "a step arrived before the worker was initialised".into(),
            ))
        }
    };
    let (model, comm, cache, weight_bytes) = match load(args, rendezvous, &init) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = protocol::send(&mut ctl, &FromWorker::Failed(e.to_string()));
            return Err(e);
        }
    };
    let cfg = cache.config();
    let ready = WorkerReady {
        num_blocks: cfg.num_blocks as u64,
        block_size: cfg.block_size as u64,
        max_seq_len: model.max_seq_len() as u64,
        memory_bytes: weight_bytes + (cfg.num_blocks * cfg.bytes_per_block()) as u64,
    };
    protocol::send(&mut ctl, &FromWorker::Ready(ready)).map_err(lost)?;
    tracing::info!(
        "worker g{}/r{} ready on {}: {} KV blocks",
        args.group,
        args.rank,
        args.device,
        cfg.num_blocks
    );
    loop {
        let step = match protocol::recv::<ToWorker>(&mut ctl) {
            Ok(ToWorker::Step(step)) => step,
            Ok(ToWorker::Shutdown) => return Ok(()),
            Ok(ToWorker::Init(_)) => {
                return Err(EngineError::WorkerLost("a second Init arrived".into()))
            }
            Ok(ToWorker::Masks(_)) => {
                return Err(EngineError::WorkerLost(
                    "masks arrived without a step".into(),
                ))
            }
            // The launcher is gone: nothing to serve.
            Err(_) => return Ok(()),
        };
        let t0 = Instant::now();
        let comm0 = comm.busy_time();
        let mut read_masks = || match protocol::recv::<ToWorker>(&mut ctl) {
            Ok(ToWorker::Masks(m)) => Ok(m),
            Ok(other) => Err(EngineError::WorkerLost(format!(
                "expected the step's masks, got {other:?}"
            ))),
            Err(e) => Err(EngineError::WorkerLost(format!("reading masks: {e}"))),
        };
        let masks: MaskWait = if step.masked {
            Some(&mut read_masks)
        } else {
            None
        };
        let reply = match run_step(&model, &cache, &step.batch, &step.sampling, masks) {
            Ok(sampled) => FromWorker::Step(StepOutput {
                sampled,
                compute_us: t0.elapsed().as_micros() as u64,
                comm_us: (comm.busy_time() - comm0).as_micros() as u64,
            }),
            Err(e) => FromWorker::StepFailed {
                message: e.to_string(),
                fatal: e.is_fatal(),
            },
        };
        let fatal = matches!(reply, FromWorker::StepFailed { fatal: true, .. });
        protocol::send(&mut ctl, &reply).map_err(lost)?;
        if fatal {
            return Err(EngineError::Comm(
                "the group's communicator broke; exiting".into(),
            ));
        }
    }
}

/// How the ranks of a group find one another: rank 0 creates it, the launcher passes its id on.
enum Rendezvous {
    Cpu(CpuRendezvous),
    #[cfg(feature = "cuda")]
    Nccl(crate::parallel::NcclCommunicatorId),
}

impl Rendezvous {
    fn id(&self) -> Vec<u8> {
        match self {
            Self::Cpu(r) => r.path().as_os_str().as_encoded_bytes().to_vec(),
            #[cfg(feature = "cuda")]
            Self::Nccl(id) => id.to_bytes(),
        }
    }
}

/// Rank 0 of a group of several creates the rendezvous before saying hello.
fn prepare_rendezvous(args: &WorkerArgs) -> Result<Option<Rendezvous>> {
    if args.rank != 0 || args.world_size == 1 {
        return Ok(None);
    }
    match args.device {
        WorkerDevice::Cpu => {
            let dir = args.control.parent().unwrap_or(Path::new("."));
            let path = dir.join(format!("comm-g{}.sock", args.group));
            Ok(Some(Rendezvous::Cpu(CpuRendezvous::bind(&path)?)))
        }
        #[cfg(feature = "cuda")]
        WorkerDevice::Cuda(_) => Ok(Some(Rendezvous::Nccl(
            crate::parallel::NcclCommunicatorId::new()?,
        ))),
        #[cfg(not(feature = "cuda"))]
        WorkerDevice::Cuda(_) => Err(EngineError::InvalidConfig(
            "this build has no CUDA support (build with --features cuda)".into(),
        )),
    }
}

fn join_group(
    args: &WorkerArgs,
    rendezvous: Option<Rendezvous>,
    init: &WorkerInit,
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] device: &candle_core::Device,
) -> Result<Arc<dyn Communicator>> {
    if args.world_size == 1 {
        return Ok(Arc::new(SingleRank));
    }
    match (args.device, rendezvous) {
        (WorkerDevice::Cpu, Some(Rendezvous::Cpu(r))) => {
            Ok(Arc::new(r.accept(args.world_size, JOIN_TIMEOUT)?))
        }
        (WorkerDevice::Cpu, _) => {
            let path = PathBuf::from(String::from_utf8_lossy(&init.rendezvous).into_owned());
            Ok(Arc::new(CpuCommunicator::connect(
                &path,
                args.rank,
                args.world_size,
                JOIN_TIMEOUT,
            )?))
        }
        #[cfg(feature = "cuda")]
        (WorkerDevice::Cuda(_), _) => Ok(Arc::new(crate::parallel::NcclCommunicator::join(
            &init.rendezvous,
            device,
            args.rank,
            args.world_size,
        )?)),
        #[cfg(not(feature = "cuda"))]
        (WorkerDevice::Cuda(_), _) => Err(EngineError::InvalidConfig(
            "this build has no CUDA support (build with --features cuda)".into(),
        )),
    }
}

fn load(
    args: &WorkerArgs,
    rendezvous: Option<Rendezvous>,
    init: &WorkerInit,
) -> Result<(Llama, Arc<dyn Communicator>, KvCache, u64)> {
    // One device (one stream) for the weights, the cache and the communicator.
    let device = args.device.open()?;
    let comm = join_group(args, rendezvous, init, &device)?;
    let loaded = LoadedModel::load(&init.engine, &device, comm.clone())?;
    let bs = init.engine.block_size.max(1);
    let blocks = loaded.kv_blocks(bs, init.kv_budget)?;
    let cache = KvCache::new(loaded.model.kv_cache_config(blocks, bs), &device)?;
    Ok((loaded.model, comm, cache, loaded.weight_bytes))
}
