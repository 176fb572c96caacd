//! Causal attention over the paged KV cache: each query attends to positions `0..=pos` of its
//! own sequence, reading keys and values through the block table.

use crate::storage::{cpu_f32, with_cpu_f32};
use crate::{HostLayout, PagedLayout};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
    if q.dtype() != k_cache.dtype() || q.dtype() != v_cache.dtype() {
        bail!("paged_attention: q and the caches differ in dtype");
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
        let out = with_cpu_f32(self.k_cache, "k_cache", |k| {
            with_cpu_f32(self.v_cache, "v_cache", |v| {
                attention_cpu(q, k, v, self.layout.host(), self.shape)
            })
        })??;
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

/// One query head of one token.
struct HeadQuery<'a> {
    q: &'a [f32],
    kv_head: usize,
    /// Positions `0..ctx` are attended to.
    ctx: usize,
    block_table: &'a [u32],
}

/// The CPU implementation: a task per (query, head) on rayon, AVX2 + FMA when present.
fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: &HostLayout,
    shape: AttentionShape,
) -> Vec<f32> {
    let (heads, d) = (shape.heads, shape.head_dim);
    let group = heads / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let seq_of = l.token_sequences();
    let mut out = vec![0f32; l.num_tokens * heads * d];
    let simd = simd_available();
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (t, h) = (idx / heads, idx % heads);
            let s = seq_of[t];
            let head = HeadQuery {
                q: &q[idx * d..(idx + 1) * d],
                kv_head: h / group,
                ctx: l.positions[t] as usize + 1,
                block_table: l.block_table(s),
            };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe { attend_avx2(&head, k, v, l.block_size, shape, scale, scores, o) };
                return;
            }
            let _ = simd;
            attend(&head, k, v, l.block_size, shape, scale, scores, o);
        });
    out
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The same code compiled for AVX2 + FMA, chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2(
    head: &HeadQuery,
    k: &[f32],
    v: &[f32],
    block_size: usize,
    shape: AttentionShape,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend(head, k, v, block_size, shape, scale, scores, out)
}

/// Softmax(q·K / sqrt(d)) V over the head's context, into `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend(
    head: &HeadQuery,
    k: &[f32],
    v: &[f32],
    bs: usize,
    shape: AttentionShape,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (d, kvh) = (shape.head_dim, shape.kv_heads);
    // Cache offsets of the context's keys/values, block by block (no division per position).
    let offsets = head
        .block_table
        .iter()
        .flat_map(|&b| (0..bs).map(move |i| ((b as usize * bs + i) * kvh + head.kv_head) * d))
        .take(head.ctx);
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for off in offsets.clone() {
        let s = dot(head.q, &k[off..off + d]) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for (off, &w) in offsets.zip(scores.iter()) {
        let w = w * inv;
        for (o, x) in out.iter_mut().zip(&v[off..off + d]) {
            *o += w * x;
        }
    }
}

/// Dot product with 32 independent lanes (four 8-wide accumulators) so it vectorizes without
/// a serial dependency chain.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let chunks = a.len() / L;
    for c in 0..chunks {
        let (x, y) = (&a[c * L..(c + 1) * L], &b[c * L..(c + 1) * L]);
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * L..a.len() {
        s += a[i] * b[i];
    }
    s
}
