//! Causal attention over the paged KV cache (CPU): each query token attends to positions
//! `0..=pos` of its own sequence, reading keys and values through the block table.

use super::LayerCache;
use crate::batch::BatchInput;
use rayon::prelude::*;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// `q`: `[tokens, heads, head_dim]` (rotated). Returns `[tokens, heads * head_dim]`.
/// The step's own keys and values must already be written to the cache.
pub fn paged_attention(
    q: &[f32],
    cache: &LayerCache,
    batch: &BatchInput,
    shape: AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        block_size: _,
    } = shape;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let tokens = batch.num_tokens();
    // Which sequence each token belongs to.
    let mut seq_of = vec![0usize; tokens];
    for (i, s) in batch.sequences.iter().enumerate() {
        seq_of[s.start..s.start + s.len].fill(i);
    }
    let mut out = vec![0f32; tokens * heads * d];
    let simd = simd_available();
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (t, h) = (idx / heads, idx % heads);
            let seq = &batch.sequences[seq_of[t]];
            let head = HeadQuery {
                q: &q[(t * heads + h) * d..(t * heads + h + 1) * d],
                kv_head: h / group,
                ctx: batch.positions[t] as usize + 1,
                block_table: &seq.block_table,
            };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe { attend_avx2(&head, cache, shape, scale, scores, o) };
                return;
            }
            let _ = simd;
            attend(&head, cache, shape, scale, scores, o);
        });
    out
}

/// One query head of one token.
struct HeadQuery<'a> {
    q: &'a [f32],
    kv_head: usize,
    /// Positions `0..ctx` are attended to.
    ctx: usize,
    block_table: &'a [u32],
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
unsafe fn attend_avx2(
    head: &HeadQuery,
    cache: &LayerCache,
    shape: AttentionShape,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend(head, cache, shape, scale, scores, out)
}

/// Softmax(q·K / sqrt(d)) V over the head's context, into `out`.
#[inline(always)]
fn attend(
    head: &HeadQuery,
    cache: &LayerCache,
    shape: AttentionShape,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (d, bs, kvh) = (shape.head_dim, shape.block_size, shape.kv_heads);
    // Cache offsets of the context's keys/values, block by block (no division per position).
    let offsets = head
        .block_table
        .iter()
        .flat_map(|&b| (0..bs).map(move |i| ((b as usize * bs + i) * kvh + head.kv_head) * d))
        .take(head.ctx);
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for off in offsets.clone() {
        let s = dot(head.q, &cache.k[off..off + d]) * scale;
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
        for (o, v) in out.iter_mut().zip(&cache.v[off..off + d]) {
            *o += w * v;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::LogitsWanted;
    use crate::kv_cache::{KvCache, KvCacheConfig};

    /// Plain causal attention on contiguous K/V for one sequence.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t_len: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let mut out = vec![0f32; t_len * heads * d];
        for t in 0..t_len {
            for h in 0..heads {
                let kvh = h / group;
                let qh = &q[(t * heads + h) * d..][..d];
                let scores: Vec<f32> = (0..=t)
                    .map(|j| {
                        qh.iter()
                            .zip(&k[(j * kv_heads + kvh) * d..][..d])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for j in 0..=t {
                    for x in 0..d {
                        out[(t * heads + h) * d + x] += e[j] / z * v[(j * kv_heads + kvh) * d + x];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn paged_matches_contiguous_across_scattered_blocks() {
        let (heads, kv_heads, d, bs, t_len) = (4, 2, 16, 4, 11);
        let vals = |n: usize, seed: f32| {
            (0..n)
                .map(|i| (i as f32 * 0.37 + seed).sin())
                .collect::<Vec<f32>>()
        };
        let q = vals(t_len * heads * d, 0.1);
        let k = vals(t_len * kv_heads * d, 0.7);
        let v = vals(t_len * kv_heads * d, 1.3);
        let mut cache = KvCache::new(KvCacheConfig {
            num_layers: 1,
            num_blocks: 8,
            block_size: bs,
            kv_heads,
            head_dim: d,
        })
        .unwrap();
        // Deliberately non-contiguous, out-of-order blocks.
        let table = vec![6, 1, 4];
        let mut batch = BatchInput::default();
        batch.push_sequence(&vec![0; t_len], 0, &table, bs, LogitsWanted::All);
        cache.write(0, &k, &v, &batch.slot_mapping);
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
            block_size: bs,
        };
        let got = paged_attention(&q, &cache.layers[0], &batch, shape);
        let want = reference(&q, &k, &v, t_len, heads, kv_heads, d);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
