//! Paged attention on the CPU. Work is split into tasks of (sequence, KV head, up to
//! [`QUERY_TILE`] of the sequence's queries) spread over rayon: a task reads each key and value
//! row in place from its cache block once, for all the query heads that share the KV head and
//! all the task's queries (a decode step is a task of one query), so the cache is read once per
//! tile rather than once per query and head. Every output row goes through the same
//! operations in the same order whatever the tiling, which keeps batching bit-exact.

use crate::DisjointOut;
use crate::{AttentionShape, HostLayout};
use rayon::prelude::*;

/// Queries (tokens of one sequence) per task.
const QUERY_TILE: usize = 32;

/// Query-key pairs below which one call runs on the calling thread.
const SEQUENTIAL_WORK: usize = 256;

/// One task: sequence `seq`, KV head `kv_head`, its queries `first..end` (relative). A
/// sequence with one query (decode) reads the cache in place instead of gathering it.
#[derive(Debug, Clone, Copy)]
struct Task {
    seq: usize,
    kv_head: usize,
    first: usize,
    end: usize,
    /// The KV head's query heads this task computes (offsets within its group): all of them
    /// for a prompt tile, one for a decode (so one sequence's decode spreads over the threads;
    /// rows are independent, so this changes no bit).
    heads: (usize, usize),
}

/// Per-thread buffers, reused across tasks.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    offsets: Vec<usize>,
}

/// `q`: `[tokens, heads, d]`; caches `[blocks, block_size, kv_heads, d]`; returns
/// `[tokens, heads, d]`.
pub(crate) fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: &HostLayout,
    shape: AttentionShape,
) -> Vec<f32> {
    let (heads, d) = (shape.heads, shape.head_dim);
    let mut out = vec![0f32; l.num_tokens * heads * d];
    let mut tasks = Vec::new();
    for seq in 0..l.num_seqs() {
        let qlen = (l.query_starts[seq + 1] - l.query_starts[seq]) as usize;
        let group = heads / shape.kv_heads;
        for kv_head in 0..shape.kv_heads {
            if qlen == 1 {
                tasks.extend((0..group).map(|h| Task {
                    seq,
                    kv_head,
                    first: 0,
                    end: 1,
                    heads: (h, h + 1),
                }));
                continue;
            }
            for first in (0..qlen).step_by(QUERY_TILE) {
                let end = (first + QUERY_TILE).min(qlen);
                tasks.push(Task {
                    seq,
                    kv_head,
                    first,
                    end,
                    heads: (0, group),
                });
            }
        }
    }
    // Largest tasks (most keys) first, so the last ones to finish are small.
    tasks.sort_by_key(|t| std::cmp::Reverse(keys_seen(l, t)));
    let ptr = DisjointOut::new(&mut out);
    let run = |scratch: &mut Scratch, task: &Task| attend(q, k, v, l, shape, *task, scratch, ptr);
    // Query-key pairs of the whole call: below SEQUENTIAL_WORK, waking the pool costs more
    // than the work (one decoding sequence with a short context).
    let work: usize = tasks
        .iter()
        .map(|t| (t.end - t.first) * keys_seen(l, t))
        .sum();
    if work < SEQUENTIAL_WORK {
        let mut scratch = Scratch::default();
        tasks.iter().for_each(|t| run(&mut scratch, t));
    } else {
        tasks
            .par_iter()
            .with_max_len(1)
            .for_each_init(Scratch::default, run);
    }
    out
}

/// Keys the task's last query attends to.
fn keys_seen(l: &HostLayout, t: &Task) -> usize {
    let qlen = (l.query_starts[t.seq + 1] - l.query_starts[t.seq]) as usize;
    l.context_lens[t.seq] as usize - qlen + t.end
}

/// One task: the KV head's query heads for the task's queries, keys and values read in place
/// from their blocks.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: &HostLayout,
    shape: AttentionShape,
    task: Task,
    sc: &mut Scratch,
    out: DisjointOut,
) {
    let (heads, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let group = heads / kvh;
    let start = l.query_starts[task.seq] as usize;
    let qlen = l.query_starts[task.seq + 1] as usize - start;
    // Position of the sequence's first query this step.
    let p0 = l.context_lens[task.seq] as usize - qlen;
    let tokens = task.end - task.first;
    let (h0, h1) = task.heads;
    let per_token = h1 - h0;
    let rows = tokens * per_token;
    let n_keys = p0 + task.end;
    // Query rows (token, head in group): each token's group of heads is contiguous in `q`.
    sc.q.clear();
    for t in task.first..task.end {
        let off = ((start + t) * heads + task.kv_head * group + h0) * d;
        sc.q.extend_from_slice(&q[off..off + per_token * d]);
    }
    // Cache offsets of this KV head's rows for positions 0..n_keys, block by block.
    let (bs, stride) = (l.block_size, kvh * d);
    sc.offsets.clear();
    sc.offsets.extend(
        l.block_table(task.seq)
            .iter()
            .flat_map(|&b| {
                let base = b as usize * bs * stride + task.kv_head * d;
                (0..bs).map(move |j| base + j * stride)
            })
            .take(n_keys),
    );
    let c = TileCall {
        q: &sc.q,
        k,
        v,
        offsets: &sc.offsets,
        n_keys,
        visible0: p0 + task.first + 1,
        per_token,
        rows,
        d,
    };
    sc.s.clear();
    sc.s.resize(rows * n_keys, 0.0);
    sc.o.clear();
    sc.o.resize(rows * d, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { tile_avx2(&c, &mut sc.s, &mut sc.o) };
    } else {
        tile(&c, &mut sc.s, &mut sc.o);
    }
    #[cfg(not(target_arch = "x86_64"))]
    tile(&c, &mut sc.s, &mut sc.o);
    for (i, t) in (task.first..task.end).enumerate() {
        let off = ((start + t) * heads + task.kv_head * group + h0) * d;
        let src = &sc.o[i * per_token * d..(i + 1) * per_token * d];
        // SAFETY: rows (start + t, the KV head's query heads) belong to this task only, and
        // lie inside the `[tokens, heads, d]` output.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.at(off), per_token * d) };
    }
}

/// What one task reads.
struct TileCall<'a> {
    /// Query rows, `rows x d`: row `r` is token `r / per_token`, head `r % per_token`.
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// Where the key/value row of each position `0..n_keys` starts in the caches.
    offsets: &'a [usize],
    /// Keys the last row sees.
    n_keys: usize,
    /// Keys the first token sees; token `i` sees `visible0 + i`.
    visible0: usize,
    /// Query heads per token.
    per_token: usize,
    rows: usize,
    d: usize,
}

impl TileCall<'_> {
    /// Keys row `r` sees.
    #[inline(always)]
    fn visible(&self, r: usize) -> usize {
        self.visible0 + r / self.per_token
    }
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(c: &TileCall, scores: &mut [f32], out: &mut [f32]) {
    tile_with::<x86::Avx2>(c, scores, out)
}

fn tile(c: &TileCall, scores: &mut [f32], out: &mut [f32]) {
    tile_with::<Plain>(c, scores, out)
}

/// The two inner loops of attention.
trait Kernels {
    /// `a · b` over `d` values.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `out += sum over positions i of p[i] * v[offsets[i]..][..d]`, in position order per
    /// element.
    fn pv(out: &mut [f32], p: &[f32], offsets: &[usize], v: &[f32]);
}

/// Portable loops.
struct Plain;

impl Kernels for Plain {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for i in 0..8 {
                acc[i] = x[i].mul_add(y[i], acc[i]);
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        for (x, y) in ar.iter().zip(br) {
            s = x.mul_add(*y, s);
        }
        s
    }

    fn pv(out: &mut [f32], p: &[f32], offsets: &[usize], v: &[f32]) {
        let d = out.len();
        for (&p, &off) in p.iter().zip(offsets) {
            for (o, x) in out.iter_mut().zip(&v[off..off + d]) {
                *o = p.mul_add(*x, *o);
            }
        }
    }
}

/// Scores (`rows x n_keys`), a causal softmax per row, then `out = P V` (`rows x d`, zeroed
/// by the caller). The tile's key and value rows stay in L1/L2 while its rows go over them;
/// each output row is computed by the same operations in the same order whatever the tile (a
/// decode is a tile of one token), so batching and chunked prefill change no bit.
#[inline(always)]
fn tile_with<K: Kernels>(c: &TileCall, scores: &mut [f32], out: &mut [f32]) {
    let (d, n) = (c.d, c.n_keys);
    let scale = 1.0 / (d as f32).sqrt();
    let offsets = c.offsets;
    for r in 0..c.rows {
        let (q, visible) = (&c.q[r * d..(r + 1) * d], c.visible(r));
        let row = &mut scores[r * n..(r + 1) * n];
        for (s, &off) in row[..visible].iter_mut().zip(offsets) {
            *s = K::dot(q, &c.k[off..off + d]) * scale;
        }
        softmax_prefix(row, visible);
        K::pv(
            &mut out[r * d..(r + 1) * d],
            &row[..visible],
            &offsets[..visible],
            c.v,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2 + FMA: four 8-wide accumulators for the dot product, 32 output values kept in
    /// registers across the positions for `P V`.
    pub struct Avx2;

    impl super::Kernels for Avx2 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let d = a.len().min(b.len());
            // SAFETY: only reached through `tile_avx2` (AVX2 and FMA detected); every load is
            // within `d` values of both slices.
            unsafe {
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= d {
                    for (j, x) in acc.iter_mut().enumerate() {
                        let off = i + 8 * j;
                        *x = _mm256_fmadd_ps(
                            _mm256_loadu_ps(pa.add(off)),
                            _mm256_loadu_ps(pb.add(off)),
                            *x,
                        );
                    }
                    i += 32;
                }
                while i + 8 <= d {
                    acc[0] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i)),
                        _mm256_loadu_ps(pb.add(i)),
                        acc[0],
                    );
                    i += 8;
                }
                let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
                while i < d {
                    s = a[i].mul_add(b[i], s);
                    i += 1;
                }
                s
            }
        }

        #[inline(always)]
        fn pv(out: &mut [f32], p: &[f32], offsets: &[usize], v: &[f32]) {
            let d = out.len();
            let mut c = 0;
            // SAFETY: as for `dot`; `off + c + 32 <= off + d` and `off + d <= v.len()` (the
            // offsets address rows of `d` values in the cache).
            unsafe {
                while c + 32 <= d {
                    let po = out.as_mut_ptr().add(c);
                    let mut acc = [0; 4].map(|j| _mm256_loadu_ps(po.add(8 * j)));
                    for (&p, &off) in p.iter().zip(offsets) {
                        assert!(off + d <= v.len());
                        let pv = v.as_ptr().add(off + c);
                        let w = _mm256_set1_ps(p);
                        for (j, x) in acc.iter_mut().enumerate() {
                            *x = _mm256_fmadd_ps(w, _mm256_loadu_ps(pv.add(8 * j)), *x);
                        }
                    }
                    for (j, x) in acc.iter().enumerate() {
                        _mm256_storeu_ps(po.add(8 * j), *x);
                    }
                    c += 32;
                }
            }
            // Head dims that are not a multiple of 32: the rest element by element (the same
            // fused multiply-add in position order).
            for e in c..d {
                for (&p, &off) in p.iter().zip(offsets) {
                    out[e] = p.mul_add(v[off + e], out[e]);
                }
            }
        }
    }
}

/// Softmax over `row[..visible]`; the rest (future positions) becomes 0.
fn softmax_prefix(row: &mut [f32], visible: usize) {
    let (seen, future) = row.split_at_mut(visible);
    future.fill(0.0);
    let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for x in seen.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in seen.iter_mut() {
        *x *= inv;
    }
}
