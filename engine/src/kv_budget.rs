//! How many KV-cache blocks a rank allocates: a byte budget, a share of the GPU's memory, or
//! one sequence of the model's maximum length.

use crate::error::{EngineError, Result};
use crate::load::LoadedModel;
use serde::{Deserialize, Serialize};

/// How many KV-cache blocks a rank allocates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum KvBudget {
    /// As many blocks as fit in this many bytes.
    Bytes(u64),
    /// As many blocks as fit in `fraction` of the GPU's memory, less what is in use once the
    /// weights are loaded (vLLM's `gpu_memory_utilization`); the rest is left to activations
    /// and the CUDA context.
    DeviceMemory { fraction: f32 },
    /// Enough for one sequence of the model's maximum length (a batch of one).
    OneSequence,
}

impl LoadedModel {
    /// Bytes of a KV cache of `blocks` blocks of `block_size` tokens on this shard.
    pub fn kv_bytes(&self, blocks: usize, block_size: usize) -> u64 {
        (blocks * self.model.kv_cache_config(1, block_size).bytes_per_block()) as u64
    }

    /// KV-cache blocks of `block_size` tokens this shard allocates under `budget` (measured
    /// after the weights are on the device).
    pub fn kv_blocks(&self, block_size: usize, budget: KvBudget) -> Result<usize> {
        let per_block = self
            .model
            .kv_cache_config(1, block_size)
            .bytes_per_block()
            .max(1) as u64;
        Ok(match budget {
            KvBudget::Bytes(bytes) => (bytes / per_block) as usize,
            KvBudget::DeviceMemory { fraction } => {
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return Err(EngineError::InvalidConfig(format!(
                        "the GPU memory fraction must be in (0, 1], got {fraction}"
                    )));
                }
                let (free, total) = crate::worker::device_memory(self.model.device())?;
                let target = (total as f64 * fraction as f64) as u64;
                let bytes = target.saturating_sub(total - free);
                tracing::info!(
                    free_mib = free >> 20,
                    total_mib = total >> 20,
                    kv_mib = bytes >> 20,
                    "KV cache sized from device memory"
                );
                (bytes / per_block) as usize
            }
            KvBudget::OneSequence => self.model.max_seq_len().div_ceil(block_size.max(1)) + 1,
        })
    }
}
