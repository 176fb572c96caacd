//! `liftoff kernel-check`: runs liftoff-kernels' ops on a device against their reference
//! implementations and prints one line per check (how the CUDA kernels are tested on a GPU
//! machine without a Rust toolchain).

use anyhow::{bail, Result};
use clap::Args;
use liftoff_engine::worker::WorkerDevice;

#[derive(Args, Debug)]
pub struct KernelCheckArgs {
    /// Device to check: `cpu` or `cuda:N`.
    #[arg(long, default_value = if cfg!(feature = "cuda") { "cuda:0" } else { "cpu" })]
    pub device: String,
}

pub fn run(args: KernelCheckArgs) -> Result<()> {
    let device: WorkerDevice = args.device.parse()?;
    let reports = liftoff_kernels::check::run(&device.open()?)?;
    for r in &reports {
        println!("{r}");
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    println!("{} checks on {device}, {failed} failed", reports.len());
    if failed > 0 {
        bail!("{failed} kernel checks failed on {device}");
    }
    Ok(())
}
