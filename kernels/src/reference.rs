//! Plain implementations of what the kernels compute, written for clarity, not speed:
//! [`naive_attention`] is the definition; [`split_k_decode`] and [`tiled_prefill`] follow the
//! CUDA kernels' algorithms (partition merge, online softmax over key chunks) step by step, so
//! the tests can show those algorithms equal the definition on the CPU.
//!
//! Layouts as in the kernels: `q` `[tokens, heads, head_dim]`, caches
//! `[num_blocks, block_size, kv_heads, head_dim]`, all f32.

use crate::{AttentionShape, HostLayout};

/// Offset of position `t`'s key (or value) row for `kv_head` of sequence `s`.
fn cache_offset(
    l: &HostLayout,
    shape: AttentionShape,
    s: usize,
    t: usize,
    kv_head: usize,
) -> usize {
    let block = l.block_table(s)[t / l.block_size] as usize;
    ((block * l.block_size + t % l.block_size) * shape.kv_heads + kv_head) * shape.head_dim
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// softmax(q·K / sqrt(d)) V over positions `0..=pos` of each query's sequence.
pub fn naive_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    l: &HostLayout,
    shape: AttentionShape,
) -> Vec<f32> {
    let (h_n, d) = (shape.heads, shape.head_dim);
    let group = h_n / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let seq = l.token_sequences();
    let mut out = vec![0f32; l.num_tokens * h_n * d];
    for t in 0..l.num_tokens {
        let s = seq[t];
        let pos = l.positions[t] as usize;
        for h in 0..h_n {
            let qh = &q[(t * h_n + h) * d..][..d];
            let scores: Vec<f32> = (0..=pos)
                .map(|j| dot(qh, &k_cache[cache_offset(l, shape, s, j, h / group)..][..d]) * scale)
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
            let z: f32 = e.iter().sum();
            let o = &mut out[(t * h_n + h) * d..][..d];
            for (j, w) in e.iter().enumerate() {
                let v = &v_cache[cache_offset(l, shape, s, j, h / group)..][..d];
                for (ox, vx) in o.iter_mut().zip(v) {
                    *ox += w / z * vx;
                }
            }
        }
    }
    out
}

/// The split-K decode algorithm: each partition of `partition` keys yields its max, exp-sum
/// and normalised output; the partitions merge with weights `sum_p * exp(max_p - max)`.
/// Every sequence must have one query.
pub fn split_k_decode(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    l: &HostLayout,
    shape: AttentionShape,
    partition: usize,
) -> Vec<f32> {
    assert!(l.is_decode(), "split-K decode takes one query per sequence");
    let (h_n, d) = (shape.heads, shape.head_dim);
    let group = h_n / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; l.num_tokens * h_n * d];
    for s in 0..l.num_seqs() {
        let t = l.query_starts[s] as usize;
        let ctx = l.context_lens[s] as usize;
        for h in 0..h_n {
            let qh: Vec<f32> = q[(t * h_n + h) * d..][..d]
                .iter()
                .map(|x| x * scale)
                .collect();
            // (max, sum, normalised output) per partition.
            let parts: Vec<(f32, f32, Vec<f32>)> = (0..ctx)
                .step_by(partition)
                .map(|start| {
                    let keys = start..(start + partition).min(ctx);
                    let scores: Vec<f32> = keys
                        .clone()
                        .map(|j| {
                            dot(
                                &qh,
                                &k_cache[cache_offset(l, shape, s, j, h / group)..][..d],
                            )
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let mut o = vec![0f32; d];
                    for (j, w) in keys.zip(&e) {
                        let v = &v_cache[cache_offset(l, shape, s, j, h / group)..][..d];
                        for (ox, vx) in o.iter_mut().zip(v) {
                            *ox += w * vx / sum;
                        }
                    }
                    (m, sum, o)
                })
                .collect();
            let m = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = parts.iter().map(|p| p.1 * (p.0 - m).exp()).sum();
            let o = &mut out[(t * h_n + h) * d..][..d];
            for (pm, ps, po) in &parts {
                let w = ps * (pm - m).exp() / total;
                for (ox, px) in o.iter_mut().zip(po) {
                    *ox += w * px;
                }
            }
        }
    }
    out
}

/// The tiled prefill algorithm: per query, keys in chunks of `tile_k` with a running max `m`,
/// running sum `l` and an output accumulator rescaled by `exp(m_old - m_new)` per chunk; no
/// row of scores longer than a chunk exists.
pub fn tiled_prefill(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    l: &HostLayout,
    shape: AttentionShape,
    tile_k: usize,
) -> Vec<f32> {
    let (h_n, d) = (shape.heads, shape.head_dim);
    let group = h_n / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let seq = l.token_sequences();
    let mut out = vec![0f32; l.num_tokens * h_n * d];
    for t in 0..l.num_tokens {
        let s = seq[t];
        let pos = l.positions[t] as usize;
        for h in 0..h_n {
            let qh: Vec<f32> = q[(t * h_n + h) * d..][..d]
                .iter()
                .map(|x| x * scale)
                .collect();
            let (mut m, mut sum, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; d]);
            for k0 in (0..=pos).step_by(tile_k) {
                let keys = k0..(k0 + tile_k).min(pos + 1);
                let scores: Vec<f32> = keys
                    .clone()
                    .map(|j| {
                        dot(
                            &qh,
                            &k_cache[cache_offset(l, shape, s, j, h / group)..][..d],
                        )
                    })
                    .collect();
                let m_new = scores.iter().cloned().fold(m, f32::max);
                let corr = (m - m_new).exp();
                sum *= corr;
                acc.iter_mut().for_each(|a| *a *= corr);
                for (j, sc) in keys.zip(&scores) {
                    let p = (sc - m_new).exp();
                    sum += p;
                    let v = &v_cache[cache_offset(l, shape, s, j, h / group)..][..d];
                    for (a, vx) in acc.iter_mut().zip(v) {
                        *a += p * vx;
                    }
                }
                m = m_new;
            }
            for (o, a) in out[(t * h_n + h) * d..][..d].iter_mut().zip(&acc) {
                *o = a / sum;
            }
        }
    }
    out
}

/// Copies row `t` of `src` (`[tokens, row]`) to row `slots[t]` of `cache`.
pub fn write_kv(cache: &mut [f32], src: &[f32], slots: &[u32], row: usize) {
    for (t, &slot) in slots.iter().enumerate() {
        let dst = slot as usize * row;
        cache[dst..dst + row].copy_from_slice(&src[t * row..(t + 1) * row]);
    }
}

/// Rotates `x` (`[tokens, heads, 2 * half]`) by `positions` with `[max_pos, half]` tables;
/// `interleaved` pairs dimensions `(2i, 2i + 1)`, otherwise `(i, i + half)`.
pub fn rotary(
    x: &mut [f32],
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    half: usize,
    interleaved: bool,
) {
    let d = 2 * half;
    for (t, &p) in positions.iter().enumerate() {
        let (c, s) = (
            &cos[p as usize * half..][..half],
            &sin[p as usize * half..][..half],
        );
        for head in x[t * heads * d..(t + 1) * heads * d].chunks_exact_mut(d) {
            if interleaved {
                for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(c.iter().zip(s)) {
                    let (x1, x2) = (pair[0], pair[1]);
                    pair[0] = x1 * c - x2 * s;
                    pair[1] = x2 * c + x1 * s;
                }
            } else {
                // Halves as separate slices, so the loop vectorises (the same operations).
                let (lo, hi) = head.split_at_mut(half);
                for (((x1, x2), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(c).zip(s) {
                    let (a, b) = (*x1, *x2);
                    *x1 = a * c - b * s;
                    *x2 = b * c + a * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{random_case, AttentionCase};

    /// Largest difference; infinite if any is NaN or infinite (f32::max would drop a NaN).
    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, |m, d| {
                if d.is_finite() {
                    m.max(d)
                } else {
                    f32::INFINITY
                }
            })
    }

    /// Decode batches with contexts from a few keys to several partitions.
    #[test]
    fn split_k_equals_the_definition() {
        let case = AttentionCase::decode(&[3, 40, 511, 512, 513, 1300], 8, 2, 64, 16);
        let data = random_case(&case, 11);
        let want = naive_attention(&data.q, &data.k, &data.v, &data.layout, case.shape);
        for partition in [16, 100, 512] {
            let got = split_k_decode(
                &data.q,
                &data.k,
                &data.v,
                &data.layout,
                case.shape,
                partition,
            );
            assert!(max_diff(&got, &want) < 1e-5, "partition {partition}");
        }
    }

    /// Prompts, chunked prefill over a cached prefix, and decode tokens in one batch.
    #[test]
    fn tiled_prefill_equals_the_definition() {
        let case = AttentionCase::mixed(&[(37, 37), (20, 50), (1, 70), (16, 16)], 4, 4, 32, 8);
        let data = random_case(&case, 5);
        let want = naive_attention(&data.q, &data.k, &data.v, &data.layout, case.shape);
        for tile_k in [1, 16, 33] {
            let got = tiled_prefill(&data.q, &data.k, &data.v, &data.layout, case.shape, tile_k);
            assert!(max_diff(&got, &want) < 1e-5, "tile_k {tile_k}");
        }
    }

    #[test]
    fn rotary_layouts_agree_on_permuted_dimensions() {
        let (half, heads) = (4, 2);
        let cos: Vec<f32> = (0..8 * half).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..8 * half).map(|i| (i as f32 * 0.1).sin()).collect();
        let x: Vec<f32> = (0..heads * 2 * half)
            .map(|i| i as f32 * 0.25 - 1.0)
            .collect();
        let mut inter = vec![0f32; x.len()];
        for h in 0..heads {
            for j in 0..half {
                inter[h * 2 * half + 2 * j] = x[h * 2 * half + j];
                inter[h * 2 * half + 2 * j + 1] = x[h * 2 * half + j + half];
            }
        }
        let mut split = x.clone();
        rotary(&mut split, &[5], &cos, &sin, heads, half, false);
        rotary(&mut inter, &[5], &cos, &sin, heads, half, true);
        for h in 0..heads {
            for j in 0..half {
                assert_eq!(split[h * 2 * half + j], inter[h * 2 * half + 2 * j]);
                assert_eq!(
                    split[h * 2 * half + j + half],
                    inter[h * 2 * half + 2 * j + 1]
                );
            }
        }
    }
}
