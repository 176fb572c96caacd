//! What runs a step: the model shard(s) of a replica group and their KV cache.

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::Llama;

/// Runs forward passes for a scheduler.
pub trait Executor: Send + 'static {
    /// Runs the batch; returns one logits row per sequence that asked for logits, in order.
    fn execute(&mut self, batch: &BatchInput) -> Result<Vec<Vec<f32>>>;
    /// `(num_blocks, block_size)` of the KV cache.
    fn kv_blocks(&self) -> (usize, usize);
}

/// The model and its cache in this process (a group of one rank).
pub struct LocalExecutor {
    model: Llama,
    cache: KvCache,
}

impl LocalExecutor {
    /// An executor over `model` with a cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: Llama, num_blocks: usize, block_size: usize) -> Result<Self> {
        let cache = KvCache::new(model.kv_cache_config(num_blocks, block_size))?;
        Ok(Self { model, cache })
    }
}

impl Executor for LocalExecutor {
    fn execute(&mut self, batch: &BatchInput) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .model
            .forward(batch, &mut self.cache)?
            .to_vec2::<f32>()?)
    }

    fn kv_blocks(&self) -> (usize, usize) {
        let c = self.cache.config();
        (c.num_blocks, c.block_size)
    }
}
