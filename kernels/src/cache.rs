//! The KV-cache write: each new key (or value) row goes to its slot of the paged pool.

use crate::storage::{contiguous, cpu_f32, cpu_f32_mut};
use crate::PagedLayout;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use half::slice::HalfFloatSliceExt;

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
                    // F16C eight at a time where the CPU has it; the same rounding.
                    c[at..at + row].convert_from_f32_slice(new);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeqSpan;
    use candle_core::Device;
    use half::f16;

    /// f32 rows into an f16 cache land in their slots rounded as `f16::from_f32` rounds each
    /// value (ties to even, overflow to infinity, NaN kept), and nothing else is written.
    #[test]
    fn f16_cache_rows_are_rounded_into_their_slots() {
        let (blocks, bs, kv, d) = (3, 2, 1, 24);
        let table = [2u32, 0];
        // Two tokens at positions 2 and 3: the table's second entry, pool block 0 (slots 0
        // and 1); pool blocks 1 and 2 keep their fill.
        let spans = [SeqSpan {
            query_start: 0,
            query_len: 2,
            context_len: 4,
            block_table: &table,
        }];
        let layout = PagedLayout::new(&spans, bs, &Device::Cpu).unwrap();
        let special = [
            1.0 + 1.0 / 2048.0, // halfway between two f16 values: rounds to even
            1.0 + 3.0 / 2048.0,
            65520.0, // rounds up past the largest f16
            f32::NAN,
            f32::INFINITY,
            -1e-7, // subnormal in f16
            -0.0,
        ];
        let rows: Vec<f32> = (0..2 * kv * d)
            .map(|i| special.get(i).copied().unwrap_or(i as f32 * 0.37 - 3.0))
            .collect();
        let src = Tensor::from_vec(rows.clone(), (2, kv, d), &Device::Cpu).unwrap();
        let fill = f16::from_f32(7.5);
        let cache = Tensor::from_vec(
            vec![fill; blocks * bs * kv * d],
            (blocks, bs, kv, d),
            &Device::Cpu,
        )
        .unwrap();
        write_kv(&cache, &src, &layout).unwrap();
        let got = cache.flatten_all().unwrap().to_vec1::<f16>().unwrap();
        let slots = &layout.host().slots;
        assert_eq!(slots, &[0, 1], "positions 2 and 3 of table [2, 0]");
        for (i, g) in got.iter().enumerate() {
            let want = match i / (kv * d) {
                s @ (0 | 1) => f16::from_f32(rows[s * kv * d + i % (kv * d)]),
                _ => fill,
            };
            assert!(g.to_bits() == want.to_bits(), "element {i}: {g} vs {want}");
        }
    }
}
