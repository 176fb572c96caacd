//! The NCCL communicator (feature `cuda`): one rank per GPU, each in its own worker process.
//! Rank 0 creates the unique id; the launcher hands it to the other ranks of the group.
//! Collectives run as candle custom ops, so tensors stay on the device.

use super::{BusyClock, Communicator};
use crate::error::{EngineError, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::Arc;
use std::time::Duration;

/// The group's NCCL unique id, created by rank 0.
pub struct NcclCommunicatorId(Id);

impl NcclCommunicatorId {
    /// A fresh id (rank 0).
    pub fn new() -> Result<Self> {
        Id::new()
            .map(Self)
            .map_err(|e| EngineError::Comm(format!("ncclGetUniqueId: {e:?}")))
    }

    /// The id's 128 bytes, to pass to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal().iter().map(|&c| c as u8).collect()
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(EngineError::Comm(format!(
                "an NCCL unique id has 128 bytes, got {}",
                bytes.len()
            )));
        }
        for (d, &b) in internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        Ok(Self(Id::uninit(internal)))
    }
}

/// A rank of an NCCL group.
pub struct NcclCommunicator {
    comm: Arc<Comm>,
    rank: usize,
    world: usize,
    busy: BusyClock,
}

// SAFETY: the NCCL communicator is only used from the worker's forward pass, one collective at
// a time in program order on the device's stream; NCCL allows a communicator to be used from any
// host thread as long as calls are not concurrent.
unsafe impl Send for NcclCommunicator {}
unsafe impl Sync for NcclCommunicator {}

impl NcclCommunicator {
    /// Joins the group whose rank 0 made `id`, on GPU `ordinal`.
    pub fn join(id: &[u8], device: &Device, rank: usize, world: usize) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(EngineError::Comm("NCCL needs a CUDA device".into()));
        };
        let id = NcclCommunicatorId::from_bytes(id)?;
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id.0)
            .map_err(|e| EngineError::Comm(format!("ncclCommInitRank (rank {rank}): {e:?}")))?;
        Ok(Self {
            comm: Arc::new(comm),
            rank,
            world,
            busy: BusyClock::default(),
        })
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.busy.time(|| {
            let op = Collective {
                comm: self.comm.clone(),
                kind: Kind::AllReduceSum,
            };
            Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
        })
    }

    fn gather_to_root(&self, x: &Tensor, dim: usize) -> Result<Option<Tensor>> {
        self.busy.time(|| {
            let op = Collective {
                comm: self.comm.clone(),
                kind: Kind::AllGather(self.world),
            };
            // [world * n] in rank order, then moved so the ranks' parts follow along `dim`.
            let gathered = x.contiguous()?.apply_op1_no_bwd(&op)?;
            if self.rank != 0 {
                return Ok(None);
            }
            let mut dims = vec![self.world];
            dims.extend_from_slice(x.dims());
            let parts = gathered.reshape(dims)?;
            let parts: Vec<Tensor> = (0..self.world)
                .map(|r| parts.get(r))
                .collect::<candle_core::Result<_>>()?;
            Ok(Some(Tensor::cat(&parts, dim)?))
        })
    }

    fn busy_time(&self) -> Duration {
        self.busy.total()
    }
}

enum Kind {
    AllReduceSum,
    /// All-gather over this many ranks.
    AllGather(usize),
}

struct Collective {
    comm: Arc<Comm>,
    kind: Kind,
}

impl Collective {
    fn run<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let src = s.as_cuda_slice::<T>()?;
        let src = match l.contiguous_offsets() {
            Some((0, n)) if n == src.len() => src,
            _ => candle_core::bail!("a collective needs a contiguous tensor"),
        };
        let dev: CudaDevice = s.device().clone();
        let n = l.shape().elem_count();
        match self.kind {
            Kind::AllReduceSum => {
                // SAFETY: every element is written by the all-reduce before it is read.
                let mut dst = unsafe { dev.alloc::<T>(n) }?;
                self.comm
                    .all_reduce(src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
                Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
            }
            Kind::AllGather(world) => {
                // SAFETY: every element is written by the all-gather before it is read.
                let mut dst = unsafe { dev.alloc::<T>(n * world) }?;
                self.comm
                    .all_gather(src, &mut dst)
                    .map_err(|e| candle_core::Error::Msg(format!("ncclAllGather: {e:?}")))?;
                Ok((
                    CudaStorage::wrap_cuda_slice(dst, dev),
                    Shape::from(n * world),
                ))
            }
        }
    }
}

impl CustomOp1 for Collective {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::AllReduceSum => "nccl-all-reduce",
            Kind::AllGather(_) => "nccl-all-gather",
        }
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::BF16 => self.run::<half::bf16>(s, l),
            DType::F16 => self.run::<half::f16>(s, l),
            other => candle_core::bail!("NCCL collectives do not take {other:?}"),
        }
    }
}
