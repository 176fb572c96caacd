//! `liftoff worker`: one rank of a replica group, spawned by the launcher.

use anyhow::Result;
use clap::Args;
use liftoff_engine::worker::{run_worker, WorkerArgs as EngineWorkerArgs, WorkerDevice};
use std::path::PathBuf;

/// Arguments the launcher passes to a worker.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The launcher's control socket.
    #[arg(long)]
    control: PathBuf,
    /// Replica group index.
    #[arg(long)]
    group: usize,
    /// Rank in the group.
    #[arg(long)]
    rank: usize,
    /// Ranks in the group.
    #[arg(long)]
    world_size: usize,
    /// cpu or cuda:N.
    #[arg(long)]
    device: WorkerDevice,
}

/// Runs the worker until the launcher stops it.
pub fn run(args: WorkerArgs) -> Result<()> {
    let args = EngineWorkerArgs {
        control: args.control,
        group: args.group,
        rank: args.rank,
        world_size: args.world_size,
        device: args.device,
    };
    run_worker(&args).map_err(|e| anyhow::anyhow!("worker g{}/r{}: {e}", args.group, args.rank))
}
