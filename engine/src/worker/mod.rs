//! Worker processes: one per device rank, each holding its weight shard and KV-cache shard and
//! running the forward pass of every step the launcher's scheduler plans.
//!
//! - [`protocol`]: the messages and their framing.
//! - [`run_worker`]: the worker's side (`liftoff worker`).
//! - [`WorkerGroup`]: the launcher's side, an [`Executor`](crate::scheduler::Executor) over the
//!   workers of one tensor-parallel group.

mod group;
mod process;
pub mod protocol;

pub use group::{GroupMember, WorkerGroup};
pub use process::{run_worker, WorkerArgs};

use crate::error::{EngineError, Result};
use std::fmt;

/// The device one worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerDevice {
    Cpu,
    /// A GPU by its ordinal among the visible devices.
    Cuda(usize),
}

impl WorkerDevice {
    /// The candle device.
    pub fn open(&self) -> Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(i) => Ok(candle_core::Device::new_cuda(*i)?),
        }
    }
}

impl fmt::Display for WorkerDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for WorkerDevice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        s.strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Self::Cuda)
            .ok_or_else(|| {
                EngineError::InvalidConfig(format!("unknown device '{s}' (cpu, cuda:N)"))
            })
    }
}

/// GPUs visible to this process (0 when the driver cannot be loaded).
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> usize {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// `(free, total)` bytes of a GPU's memory; an error on the CPU.
pub fn device_memory(device: &candle_core::Device) -> Result<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        let (free, total) =
            dev.cuda_stream().context().mem_get_info().map_err(|e| {
                EngineError::InvalidConfig(format!("cannot read GPU memory: {e:?}"))
            })?;
        return Ok((free as u64, total as u64));
    }
    Err(EngineError::InvalidConfig(format!(
        "a KV budget as a fraction of device memory needs a GPU, not {device:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for d in [WorkerDevice::Cpu, WorkerDevice::Cuda(3)] {
            assert_eq!(d.to_string().parse::<WorkerDevice>().unwrap(), d);
        }
        let err = "tpu:0".parse::<WorkerDevice>().unwrap_err().to_string();
        assert!(err.contains("unknown device 'tpu:0'"), "{err}");
    }

    #[test]
    fn a_memory_fraction_budget_needs_a_gpu() {
        let err = device_memory(&candle_core::Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a GPU"), "{err}");
    }
}
