//! Tensor parallelism: the [`Communicator`] between the ranks of a group, and the layer types
//! that shard weights over it.

mod cpu;
mod layers;
mod linear;
#[cfg(feature = "cuda")]
mod nccl;

pub use cpu::{CpuCommunicator, CpuRendezvous};
pub use layers::{ColumnParallelLinear, ParallelLmHead, RowParallelLinear, VocabParallelEmbedding};
pub use linear::Linear;
#[cfg(feature = "cuda")]
pub use nccl::{NcclCommunicator, NcclCommunicatorId};

use crate::error::Result;
use candle_core::Tensor;
use std::ops::Range;

/// Collective operations between the ranks of one tensor-parallel group.
pub trait Communicator: Send + Sync {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum of `x` over all ranks; every rank gets the result.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Concatenation of every rank's `x` along `dim`, in rank order, on rank 0; `None` on the
    /// other ranks (the LM head's logits only matter where they are sampled).
    fn gather_to_root(&self, x: &Tensor, dim: usize) -> Result<Option<Tensor>>;
    /// Total time spent in collectives so far, waiting for slower ranks included.
    fn busy_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// The communicator of a group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn gather_to_root(&self, x: &Tensor, _dim: usize) -> Result<Option<Tensor>> {
        Ok(Some(x.clone()))
    }
}

/// Time a communicator spent in collectives, summed over calls (its
/// [`Communicator::busy_time`]).
#[derive(Debug, Default)]
pub(crate) struct BusyClock(std::sync::atomic::AtomicU64);

impl BusyClock {
    /// Runs `f`, adding its wall time.
    pub(crate) fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        self.0.fetch_add(
            t0.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        out
    }

    /// The total so far.
    pub(crate) fn total(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The even share of `total` items that `rank` of `world` owns.
pub fn shard_range(total: usize, rank: usize, world: usize) -> Range<usize> {
    let per = total / world;
    rank * per..(rank + 1) * per
}

/// How the attention heads of a model split over the ranks of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSharding {
    pub rank: usize,
    pub world: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

impl HeadSharding {
    /// Validates that `world` ranks can split `num_heads` query heads and `num_kv_heads` KV heads.
    pub fn new(rank: usize, world: usize, num_heads: usize, num_kv_heads: usize) -> Result<Self> {
        use crate::error::EngineError;
        if !num_heads.is_multiple_of(world) {
            return Err(EngineError::Parallel(format!(
                "tensor parallel size {world} does not divide the {num_heads} attention heads"
            )));
        }
        if !num_kv_heads.is_multiple_of(world) && !world.is_multiple_of(num_kv_heads) {
            return Err(EngineError::Parallel(format!(
                "tensor parallel size {world} and the {num_kv_heads} KV heads do not divide one another"
            )));
        }
        Ok(Self {
            rank,
            world,
            num_heads,
            num_kv_heads,
        })
    }

    /// Query heads on this rank.
    pub fn local_heads(&self) -> Range<usize> {
        shard_range(self.num_heads, self.rank, self.world)
    }

    /// KV heads on this rank; one replicated head when there are fewer KV heads than ranks.
    pub fn local_kv_heads(&self) -> Range<usize> {
        if self.num_kv_heads >= self.world {
            shard_range(self.num_kv_heads, self.rank, self.world)
        } else {
            let h = self.rank * self.num_kv_heads / self.world;
            h..h + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_heads_split_or_replicate() {
        let s = HeadSharding::new(1, 2, 8, 4).unwrap();
        assert_eq!(s.local_heads(), 4..8);
        assert_eq!(s.local_kv_heads(), 2..4);
        // 4 ranks, 2 KV heads: ranks 0,1 share head 0; ranks 2,3 share head 1.
        let kv: Vec<_> = (0..4)
            .map(|r| HeadSharding::new(r, 4, 8, 2).unwrap().local_kv_heads())
            .collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        let err = HeadSharding::new(0, 2, 9, 3).unwrap_err().to_string();
        assert!(
            err.contains("tensor parallel size 2 does not divide the 9 attention heads"),
            "{err}"
        );
    }
}
