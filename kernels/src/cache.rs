//! The KV-cache write: each new key (or value) row goes to its slot of the paged pool.

use crate::storage::{contiguous, cpu_f32, cpu_f32_mut};
use crate::PagedLayout;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};

/// Writes `src` (`[tokens, kv_heads, head_dim]`) into `cache`
/// (`[num_blocks, block_size, kv_heads, head_dim]`) at the layout's slots.
pub fn write_kv(cache: &Tensor, src: &Tensor, layout: &PagedLayout) -> Result<()> {
    let (blocks, block_size, kv_heads, head_dim) = cache.dims4()?;
    let host = layout.host();
    if src.dims() != [host.num_tokens, kv_heads, head_dim] {
        bail!(
            "write_kv: new rows {:?} do not match {} tokens of a [{blocks}, {block_size}, {kv_heads}, {head_dim}] cache",
            src.dims(),
            host.num_tokens
        );
    }
    if block_size != host.block_size || (host.num_tokens > 0 && host.max_block as usize >= blocks) {
        bail!(
            "write_kv: the layout (block {} of size {}) does not fit a cache of {blocks} blocks of {block_size}",
            host.max_block,
            host.block_size
        );
    }
    let cpu_f16_cache =
        cache.device().is_cpu() && cache.dtype() == DType::F16 && src.dtype() == DType::F32;
    if (src.dtype() != cache.dtype() && !cpu_f16_cache)
        || src.device().location() != cache.device().location()
    {
        bail!(
            "write_kv: cache ({:?}) and rows ({:?}) differ in dtype or device (the CPU also writes f32 rows to an f16 cache)",
            cache.dtype(),
            src.dtype()
        );
    }
    if host.num_tokens == 0 {
        return Ok(());
    }
    cache.inplace_op2(&src.contiguous()?, &WriteKv { layout })
}

struct WriteKv<'a> {
    layout: &'a PagedLayout,
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (start, end) = contiguous(cl, "cache")?;
        let row = sl.dims()[1] * sl.dims()[2];
        let src = cpu_f32(src, sl, "new rows")?;
        let slots = &self.layout.host().slots;
        match cache {
            // Rounded to the nearest f16 (what the cache then holds exactly).
            CpuStorage::F16(c) => {
                let c = &mut c[start..end];
                for (&slot, new) in slots.iter().zip(src.chunks_exact(row)) {
                    let at = slot as usize * row;
                    for (x, &y) in c[at..at + row].iter_mut().zip(new) {
                        *x = half::f16::from_f32(y);
                    }
                }
            }
            _ => crate::reference::write_kv(cpu_f32_mut(cache, cl, "cache")?, src, slots, row),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        crate::cuda::write_kv(cache, cl, src, sl, self.layout)
    }
}
