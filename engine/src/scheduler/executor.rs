//! What runs a step: the model shard(s) of a replica group and their KV cache.

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::Llama;
use crate::model_runner::{run_step, MaskWait};
use crate::sampling::{RowSampling, SampledToken};
use crate::EngineError;

/// Runs forward passes for a scheduler.
pub trait Executor: Send + 'static {
    /// Runs the batch and samples one token per row [`BatchInput::logits_rows`] names, with
    /// `sampling[i]` for row `i`, where the logits are (on the GPU for a CUDA group): only the
    /// tokens come back. Constrained rows get their masks from `masks` once the forward pass
    /// is done (they are computed meanwhile). An error for which [`EngineError::is_fatal`]
    /// holds means the group is gone.
    fn execute(
        &mut self,
        batch: &BatchInput,
        sampling: &[RowSampling],
        masks: MaskWait,
    ) -> Result<Vec<SampledToken>>;
    /// `(num_blocks, block_size)` of the KV cache.
    fn kv_blocks(&self) -> (usize, usize);
    /// Where the last step's time went, when the executor measures it.
    fn last_timing(&self) -> Option<StepTiming> {
        None
    }
}

impl Executor for Box<dyn Executor> {
    fn execute(
        &mut self,
        batch: &BatchInput,
        sampling: &[RowSampling],
        masks: MaskWait,
    ) -> Result<Vec<SampledToken>> {
        (**self).execute(batch, sampling, masks)
    }
    fn kv_blocks(&self) -> (usize, usize) {
        (**self).kv_blocks()
    }
    fn last_timing(&self) -> Option<StepTiming> {
        (**self).last_timing()
    }
}

/// How one step's wall time split, as measured by a worker group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    /// Rank 0's forward pass, collectives included.
    pub compute: std::time::Duration,
    /// Rank 0's time in all-reduce and gather (waiting for slower ranks included).
    pub comm: std::time::Duration,
}

/// The model and its cache in this process (a group of one rank).
pub struct LocalExecutor {
    model: Llama,
    cache: KvCache,
}

impl LocalExecutor {
    /// An executor over `model` with a cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: Llama, num_blocks: usize, block_size: usize) -> Result<Self> {
        let cache = KvCache::new(
            model.kv_cache_config(num_blocks, block_size),
            model.device(),
        )?;
        Ok(Self { model, cache })
    }
}

impl Executor for LocalExecutor {
    fn execute(
        &mut self,
        batch: &BatchInput,
        sampling: &[RowSampling],
        masks: MaskWait,
    ) -> Result<Vec<SampledToken>> {
        run_step(&self.model, &self.cache, batch, sampling, masks)?
            .ok_or_else(|| EngineError::Parallel("a local executor must hold rank 0".into()))
    }

    fn kv_blocks(&self) -> (usize, usize) {
        let c = self.cache.config();
        (c.num_blocks, c.block_size)
    }
}
