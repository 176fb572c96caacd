//! Causal attention over the paged KV cache: each query attends to positions `0..=pos` of its
//! own sequence, reading keys and values through the block table.

use crate::storage::{cpu_f32, with_cpu, with_cpu_f32};
use crate::PagedLayout;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Heads of one attention call (this rank's shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: `[tokens, heads, head_dim]` (rotated); caches `[num_blocks, block_size, kv_heads,
/// head_dim]` that already hold the step's keys and values. Returns `[tokens, heads, head_dim]`.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    layout: &PagedLayout,
    shape: AttentionShape,
) -> Result<Tensor> {
    let host = layout.host();
    let (tokens, heads, d) = q.dims3()?;
    let (blocks, block_size, kv_heads, kd) = k_cache.dims4()?;
    if (tokens, heads, d) != (host.num_tokens, shape.heads, shape.head_dim)
        || (block_size, kv_heads, kd) != (host.block_size, shape.kv_heads, shape.head_dim)
        || v_cache.dims() != k_cache.dims()
    {
        bail!(
            "paged_attention: q {:?} and caches {:?}/{:?} do not match {shape:?}, {} tokens, blocks of {}",
            q.dims(),
            k_cache.dims(),
            v_cache.dims(),
            host.num_tokens,
            host.block_size
        );
    }
    if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
        bail!(
            "paged_attention: {} heads cannot share {} KV heads",
            shape.heads,
            shape.kv_heads
        );
    }
    if host.num_tokens > 0 && host.max_block as usize >= blocks {
        bail!(
            "paged_attention: block {} is outside the cache of {blocks}",
            host.max_block
        );
    }
    let cpu_f16_cache =
        q.device().is_cpu() && q.dtype() == DType::F32 && k_cache.dtype() == DType::F16;
    if k_cache.dtype() != v_cache.dtype() || (q.dtype() != k_cache.dtype() && !cpu_f16_cache) {
        bail!(
            "paged_attention: q ({:?}) and the caches ({:?}, {:?}) differ in dtype (the CPU also takes f32 q with f16 caches)",
            q.dtype(),
            k_cache.dtype(),
            v_cache.dtype()
        );
    }
    q.contiguous()?.apply_op1_no_bwd(&PagedAttention {
        k_cache,
        v_cache,
        layout,
        shape,
    })
}

pub(crate) struct PagedAttention<'a> {
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub layout: &'a PagedLayout,
    pub shape: AttentionShape,
}

impl CustomOp1 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let q = cpu_f32(storage, layout, "q")?;
        let (host, shape) = (self.layout.host(), self.shape);
        let out = match self.k_cache.dtype() {
            DType::F16 => with_cpu::<half::f16, _>(self.k_cache, "k_cache", |k| {
                with_cpu::<half::f16, _>(self.v_cache, "v_cache", |v| {
                    crate::attention_cpu::attention_cpu(q, k, v, host, shape)
                })
            })??,
            _ => with_cpu_f32(self.k_cache, "k_cache", |k| {
                with_cpu_f32(self.v_cache, "v_cache", |v| {
                    crate::attention_cpu::attention_cpu(q, k, v, host, shape)
                })
            })??,
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::paged_attention(storage, layout, self)
    }
}
