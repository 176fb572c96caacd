//! The paged KV cache: fixed-size blocks in one pool per worker, block tables per sequence,
//! and attention that reads keys and values through the block table.

pub mod attention;
mod block_manager;

pub use attention::paged_attention;
pub use block_manager::{block_hash, BlockManager, PrefixCacheStats};

use crate::error::{EngineError, Result};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Geometry of a worker's KV-cache pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// KV heads held by this worker (its shard).
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheConfig {
    /// Bytes one block takes over all layers (K and V, f32).
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers
            * self.block_size
            * self.kv_heads
            * self.head_dim
            * std::mem::size_of::<f32>()
    }

    fn layer_len(&self) -> usize {
        self.num_blocks * self.block_size * self.kv_heads * self.head_dim
    }
}

/// One layer's keys and values, laid out `[num_blocks, block_size, kv_heads, head_dim]`.
#[derive(Debug)]
pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// A worker's KV-cache pool (CPU storage).
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Allocates the pool.
    pub fn new(config: KvCacheConfig) -> Result<Self> {
        if config.num_blocks == 0 || config.block_size == 0 {
            return Err(EngineError::KvCacheExhausted(format!(
                "a KV cache needs at least one block (got {} blocks of {} tokens)",
                config.num_blocks, config.block_size
            )));
        }
        let layers = (0..config.num_layers)
            .map(|_| LayerCache {
                k: vec![0.0; config.layer_len()],
                v: vec![0.0; config.layer_len()],
            })
            .collect();
        Ok(Self { config, layers })
    }

    /// The pool's geometry.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Mutable access to one layer's storage.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache {
        &mut self.layers[layer]
    }

    /// Writes one layer's new keys and values (`[tokens, kv_heads, head_dim]`) to their slots.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], slots: &[u32]) {
        let row = self.config.kv_heads * self.config.head_dim;
        let cache = &mut self.layers[layer];
        for (t, &slot) in slots.iter().enumerate() {
            let dst = slot as usize * row;
            cache.k[dst..dst + row].copy_from_slice(&k[t * row..(t + 1) * row]);
            cache.v[dst..dst + row].copy_from_slice(&v[t * row..(t + 1) * row]);
        }
    }
}
