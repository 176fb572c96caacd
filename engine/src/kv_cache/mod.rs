//! The paged KV cache: fixed-size blocks in one pool per worker, on the model's device, and
//! block tables per sequence. Writes and attention go through `liftoff-kernels` (CUDA kernels on
//! a GPU, their Rust implementations on the CPU).

mod block_manager;

pub use block_manager::{BlockManager, PrefixCacheStats, PrefixHasher, PrefixId};

use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use liftoff_kernels::{paged_attention, write_kv, AttentionShape, PagedLayout};

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
    /// Element type of the pool (f32 on the CPU, the activations' on a GPU).
    pub dtype: DType,
}

impl KvCacheConfig {
    /// Bytes one block takes over all layers (K and V).
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers
            * self.block_size
            * self.kv_heads
            * self.head_dim
            * self.dtype.size_in_bytes()
    }

    fn layer_shape(&self) -> (usize, usize, usize, usize) {
        (
            self.num_blocks,
            self.block_size,
            self.kv_heads,
            self.head_dim,
        )
    }
}

/// One layer's keys and values, `[num_blocks, block_size, kv_heads, head_dim]` each.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// A worker's KV-cache pool.
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Allocates the pool on `device`.
    pub fn new(config: KvCacheConfig, device: &Device) -> Result<Self> {
        if config.num_blocks == 0 || config.block_size == 0 {
            return Err(EngineError::KvCacheExhausted(format!(
                "a KV cache needs at least one block (got {} blocks of {} tokens)",
                config.num_blocks, config.block_size
            )));
        }
        let layers = (0..config.num_layers)
            .map(|_| {
                Ok(LayerCache {
                    k: Tensor::zeros(config.layer_shape(), config.dtype, device)?,
                    v: Tensor::zeros(config.layer_shape(), config.dtype, device)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, layers })
    }

    /// The pool's geometry.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Writes one layer's new keys and values (`[tokens, kv_heads, head_dim]`) to the slots
    /// `layout` names.
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor, layout: &PagedLayout) -> Result<()> {
        let cache = &self.layers[layer];
        write_kv(&cache.k, k, layout)?;
        write_kv(&cache.v, v, layout)?;
        Ok(())
    }

    /// Causal attention of `q` (`[tokens, heads, head_dim]`, rotated) over one layer's cache,
    /// which already holds the step's keys and values.
    pub fn attention(
        &self,
        layer: usize,
        q: &Tensor,
        layout: &PagedLayout,
        heads: usize,
    ) -> Result<Tensor> {
        let cache = &self.layers[layer];
        let shape = AttentionShape {
            heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        };
        Ok(paged_attention(q, &cache.k, &cache.v, layout, shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liftoff_kernels::SeqSpan;

    /// Written rows land in their (scattered) slots and attention reads them back: a single
    /// key makes the output equal its value.
    #[test]
    fn writes_land_in_slots_and_attention_reads_them() {
        let config = KvCacheConfig {
            num_layers: 2,
            num_blocks: 4,
            block_size: 2,
            kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
        };
        let cache = KvCache::new(config, &Device::Cpu).unwrap();
        assert_eq!(config.bytes_per_block(), 2 * 2 * 2 * 4 * 4);
        let table = [3u32];
        let span = SeqSpan {
            query_start: 0,
            query_len: 1,
            context_len: 1,
            block_table: &table,
        };
        let layout = PagedLayout::new(&[span], 2, &Device::Cpu).unwrap();
        let k = Tensor::new(&[[[1f32, 0., 0., 0.]]], &Device::Cpu).unwrap();
        let v = Tensor::new(&[[[0.5f32, -1., 2., 3.]]], &Device::Cpu).unwrap();
        cache.write(1, &k, &v, &layout).unwrap();
        let stored = cache.layers[1].v.get(3).unwrap().get(0).unwrap();
        assert_eq!(
            stored.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5, -1., 2., 3.]
        );
        let out = cache.attention(1, &k, &layout, 1).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5, -1., 2., 3.]
        );
        // Layer 0 was not touched.
        assert_eq!(
            cache.layers[0]
                .v
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
