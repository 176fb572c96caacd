//! Which devices the workers run on: the device kind, the visible GPUs, and the replica groups
//! of tensor-parallel ranks laid over them.

use crate::supervisor::GroupPlan;
use anyhow::{bail, Result};
use liftoff_engine::worker::WorkerDevice;

/// The kind of device a model is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// Reads `--device`: `cpu`, `cuda`, or `auto` (cuda when this build has CUDA and a GPU is
    /// present, else cpu).
    pub fn resolve(arg: &str) -> Result<Self> {
        match arg.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => {
                if !cfg!(feature = "cuda") {
                    bail!("device 'cuda' needs a liftoff built with --features cuda (this build serves on cpu)");
                }
                Ok(Self::Cuda)
            }
            "auto" => Ok(if gpu_count() > 0 {
                Self::Cuda
            } else {
                Self::Cpu
            }),
            other => bail!("unknown device '{other}' (cpu, cuda, auto)"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// GPUs this process can see.
#[cfg(feature = "cuda")]
pub fn gpu_count() -> usize {
    liftoff_engine::worker::cuda_device_count()
}

/// GPUs this process can see (none without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub fn gpu_count() -> usize {
    0
}

/// The GPU ids `--cuda-visible-devices` lists, as given (e.g. "0,1,3").
pub fn parse_visible(list: &str) -> Result<Vec<String>> {
    let ids: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if ids.is_empty() {
        bail!("--cuda-visible-devices '{list}' names no device");
    }
    Ok(ids)
}

/// Lays `replicas` groups of `tp` ranks over the devices. On CPU every rank is a process on
/// this machine; on CUDA each rank takes the next of `gpus` visible GPUs (by ordinal), and by
/// default there are as many groups as fit.
pub fn plan_groups(
    kind: DeviceKind,
    tp: usize,
    replicas: Option<usize>,
    gpus: usize,
) -> Result<Vec<GroupPlan>> {
    if tp == 0 {
        bail!("--tensor-parallel must be at least 1");
    }
    if replicas == Some(0) {
        bail!("--replicas must be at least 1");
    }
    match kind {
        DeviceKind::Cpu => Ok((0..replicas.unwrap_or(1))
            .map(|_| GroupPlan {
                devices: vec![WorkerDevice::Cpu; tp],
            })
            .collect()),
        DeviceKind::Cuda => {
            if tp > gpus {
                bail!("tensor parallel size {tp} needs {tp} GPUs per replica group, but {gpus} are visible");
            }
            let groups = replicas.unwrap_or(gpus / tp);
            if groups * tp > gpus {
                bail!(
                    "{groups} replica groups of tensor parallel size {tp} need {} GPUs, but {gpus} are visible",
                    groups * tp
                );
            }
            Ok((0..groups)
                .map(|g| GroupPlan {
                    devices: (0..tp).map(|r| WorkerDevice::Cuda(g * tp + r)).collect(),
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_groups_follow_replicas() {
        let p = plan_groups(DeviceKind::Cpu, 2, Some(2), 0).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|g| g.devices == vec![WorkerDevice::Cpu; 2]));
    }

    #[test]
    fn gpu_groups_take_consecutive_devices() {
        let p = plan_groups(DeviceKind::Cuda, 2, None, 5).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[1].devices,
            vec![WorkerDevice::Cuda(2), WorkerDevice::Cuda(3)]
        );
        let err = plan_groups(DeviceKind::Cuda, 4, None, 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "tensor parallel size 4 needs 4 GPUs per replica group, but 2 are visible"
        );
        let err = plan_groups(DeviceKind::Cuda, 2, Some(3), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "3 replica groups of tensor parallel size 2 need 6 GPUs, but 4 are visible"
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_devices_are_named() {
        let err = DeviceKind::resolve("tpu").unwrap_err().to_string();
        assert_eq!(err, "unknown device 'tpu' (cpu, cuda, auto)");
        assert_eq!(DeviceKind::resolve("auto").unwrap(), {
            if gpu_count() > 0 {
                DeviceKind::Cuda
            } else {
                DeviceKind::Cpu
            }
        });
        assert_eq!(parse_visible(" 0, 2 ,").unwrap(), vec!["0", "2"]);
    }
}
