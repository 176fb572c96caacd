//! Paged attention on the CPU, by key blocks: every query row goes over its visible keys in
//! blocks of [`KEY_BLOCK`] positions (aligned to position 0), each block giving a partial
//! softmax (its max, its sum of exponentials and its unnormalised `P V`), and the partials are
//! merged in block order. What a row computes is a fixed function of that row alone, whichever
//! task computes it, so batching, chunked prefill and the split below change no bit.
//!
//! Work is split into tasks over rayon. A prompt task is (sequence, KV head, up to
//! [`QUERY_TILE`] queries): it goes over the key blocks, reading each block's keys and values
//! once from the cache (the block stays in L1) for all its rows, the query heads that share
//! the KV head in pairs of rows sharing each load. A decode task is (sequence, KV head, key
//! block), so a single long sequence spreads over every thread, its partials merged after;
//! when enough sequences decode to keep every thread busy, a task is a whole sequence, which
//! merges its blocks as it goes (the same operations in the same order) and writes its rows.

mod kernels;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::DisjointOut;
use crate::{AttentionShape, HostLayout};
pub(crate) use kernels::Elem;
use kernels::{Kernels, Plain};
use rayon::prelude::*;
use std::cell::RefCell;

/// Queries (tokens of one sequence) per prompt task.
const QUERY_TILE: usize = 32;

/// Key positions per block of the online softmax (16 KiB of f32 keys at head dim 64).
const KEY_BLOCK: usize = 64;

/// Query-key pairs below which one call runs on the calling thread.
const SEQUENTIAL_WORK: usize = 2048;

/// Decoding sequences per thread from which a decode task is a whole sequence.
const WHOLE_SEQUENCES_PER_THREAD: usize = 4;

/// A unit of work.
#[derive(Debug, Clone, Copy)]
enum Task {
    /// A prompt (or chunk) tile: queries `first..end` of `seq` for `kv_head`'s query heads,
    /// over all their key blocks; writes the output rows.
    Prompt {
        seq: usize,
        kv_head: usize,
        first: usize,
        end: usize,
    },
    /// One key block of a decoding sequence for every head (the block's rows of all KV
    /// heads are contiguous in the cache); writes partials.
    Decode { seq: usize, block: usize },
    /// Every key block of a decoding sequence for every head, merged in the task; writes the
    /// output rows.
    DecodeSequence { seq: usize },
}

/// A row's softmax so far: max `m`, sum of exponentials `l` and `o = sum p v`.
struct Running<'a> {
    m: &'a mut f32,
    l: &'a mut f32,
    o: &'a mut [f32],
}

/// The running softmax of a task's rows, in a reused buffer: maxes, sums, then `d` values of
/// `o` per row.
struct RunningRows<'a> {
    m: &'a mut [f32],
    l: &'a mut [f32],
    o: &'a mut [f32],
    d: usize,
}

impl<'a> RunningRows<'a> {
    fn new(buf: &'a mut Vec<f32>, rows: usize, d: usize) -> Self {
        buf.clear();
        buf.resize(rows * (d + 2), 0.0);
        let (m, rest) = buf.split_at_mut(rows);
        let (l, o) = rest.split_at_mut(rows);
        Self { m, l, o, d }
    }

    /// Folds the block partials [`block_partials`] left in `sc` (its rows in order) into rows
    /// `r0..`; the first block is taken as is.
    fn fold<K: Kernels>(&mut self, r0: usize, first: bool, sc: &Scratch) {
        let d = self.d;
        for (h, (&m, &l)) in sc.m.iter().zip(&sc.l).enumerate() {
            let r = r0 + h;
            let run = Running {
                m: &mut self.m[r],
                l: &mut self.l[r],
                o: &mut self.o[r * d..(r + 1) * d],
            };
            merge::<K>(run, first, m, l, &sc.o[h * d..(h + 1) * d]);
        }
    }

    /// Row `r`'s output values, `o / l`.
    fn output(&self, r: usize) -> impl Iterator<Item = f32> + '_ {
        let l = self.l[r];
        self.o[r * self.d..(r + 1) * self.d]
            .iter()
            .map(move |&x| x / l)
    }
}

/// Per-thread buffers, reused across tasks and calls.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    offsets: Vec<usize>,
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    /// The next key block's offsets (prefetched while this one is computed).
    next: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// What every task reads.
struct Call<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    l: &'a HostLayout,
    shape: AttentionShape,
    scale: f32,
    /// For each decoding sequence, where its partials start in the partials buffer.
    partial_base: Vec<usize>,
    /// Whether decode tasks are whole sequences (no partials to merge after).
    whole_decodes: bool,
}

impl<E> Call<'_, E> {
    fn group(&self) -> usize {
        self.shape.heads / self.shape.kv_heads
    }

    fn query_range(&self, seq: usize) -> (usize, usize) {
        let start = self.l.query_starts[seq] as usize;
        (start, self.l.query_starts[seq + 1] as usize - start)
    }

    /// Floats of one partial: `m`, `l`, then `d` values of `o`.
    fn partial_len(&self) -> usize {
        self.shape.head_dim + 2
    }

    /// Cache offsets of KV head 0's rows at positions `from..to` of `seq` (KV head `h`'s row
    /// is `h * head_dim` further).
    fn offsets(&self, seq: usize, from: usize, to: usize, out: &mut Vec<usize>) {
        let bs = self.l.block_size;
        let stride = self.shape.kv_heads * self.shape.head_dim;
        let table = self.l.block_table(seq);
        out.clear();
        let mut p = from;
        while p < to {
            let (block, first) = (p / bs, p % bs);
            let n = (bs - first).min(to - p);
            let base = (table[block] as usize * bs + first) * stride;
            out.extend((0..n).map(|j| base + j * stride));
            p += n;
        }
    }
}

/// `q`: `[tokens, heads, d]`; caches `[blocks, block_size, kv_heads, d]`; returns
/// `[tokens, heads, d]`.
pub(crate) fn attention_cpu<E: Elem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    l: &HostLayout,
    shape: AttentionShape,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        return attention_with::<x86::Avx2, E>(q, k, v, l, shape);
    }
    attention_with::<Plain, E>(q, k, v, l, shape)
}

fn attention_with<K: Kernels, E: Elem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    l: &HostLayout,
    shape: AttentionShape,
) -> Vec<f32> {
    let (heads, d) = (shape.heads, shape.head_dim);
    let mut out = vec![0f32; l.num_tokens * heads * d];
    let mut call = Call {
        q,
        k,
        v,
        l,
        shape,
        scale: 1.0 / (d as f32).sqrt(),
        partial_base: vec![0; l.num_seqs()],
        whole_decodes: false,
    };
    let decoding = (0..l.num_seqs())
        .filter(|&s| call.query_range(s).1 == 1)
        .count();
    call.whole_decodes = decoding >= WHOLE_SEQUENCES_PER_THREAD * rayon::current_num_threads();
    let mut tasks = Vec::new();
    let (mut partials_len, mut work) = (0, 0);
    for seq in 0..l.num_seqs() {
        let (_, qlen) = call.query_range(seq);
        let ctx = l.context_lens[seq] as usize;
        if qlen == 1 && call.whole_decodes {
            tasks.push(Task::DecodeSequence { seq });
        } else if qlen == 1 {
            let blocks = ctx.div_ceil(KEY_BLOCK);
            call.partial_base[seq] = partials_len;
            partials_len += heads * blocks * call.partial_len();
            tasks.extend((0..blocks).map(|block| Task::Decode { seq, block }));
        } else {
            for kv_head in 0..shape.kv_heads {
                for first in (0..qlen).step_by(QUERY_TILE) {
                    let end = (first + QUERY_TILE).min(qlen);
                    tasks.push(Task::Prompt {
                        seq,
                        kv_head,
                        first,
                        end,
                    });
                }
            }
        }
        work += qlen * ctx * heads;
    }
    // Largest tasks first, so the last ones to finish are small.
    tasks.sort_by_key(|t| std::cmp::Reverse(task_work(&call, t)));
    let mut partials = vec![0f32; partials_len];
    let (out_ptr, part_ptr) = (DisjointOut::new(&mut out), DisjointOut::new(&mut partials));
    let run = |task: &Task| {
        SCRATCH.with_borrow_mut(|sc| match *task {
            Task::Prompt {
                seq,
                kv_head,
                first,
                end,
            } => prompt_tile::<K, E>(&call, seq, kv_head, first..end, sc, out_ptr),
            Task::Decode { seq, block } => decode_block::<K, E>(&call, seq, block, sc, part_ptr),
            Task::DecodeSequence { seq } => decode_sequence::<K, E>(&call, seq, sc, out_ptr),
        })
    };
    if work < SEQUENTIAL_WORK {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().with_max_len(1).for_each(run);
    }
    merge_decodes::<K, E>(&call, &partials, &mut out);
    out
}

/// Query-key pairs a task covers.
fn task_work<E>(c: &Call<E>, t: &Task) -> usize {
    match *t {
        Task::Prompt {
            seq, first, end, ..
        } => {
            let (_, qlen) = c.query_range(seq);
            (end - first) * (c.l.context_lens[seq] as usize - qlen + end) * c.group()
        }
        Task::Decode { .. } => KEY_BLOCK * c.shape.heads,
        Task::DecodeSequence { seq } => c.l.context_lens[seq] as usize * c.shape.heads,
    }
}

/// One key block for the query rows of KV heads `kv0..kv0 + kv_count` (`q`: `group` rows per
/// KV head, `d` values each), all seeing the positions whose KV head 0 rows start at
/// `offsets`: their scores, exponentials and unnormalised `P V` into `sc.s`, `sc.m`, `sc.l`
/// and `sc.o`.
fn block_partials<K: Kernels, E: Elem>(
    c: &Call<E>,
    q: &[f32],
    kv0: usize,
    kv_count: usize,
    offsets: &[usize],
    sc: &mut Scratch,
) {
    let (d, n, group) = (c.shape.head_dim, offsets.len(), c.group());
    let rows = kv_count * group;
    sc.s.clear();
    sc.s.resize(rows * n, 0.0);
    sc.o.clear();
    sc.o.resize(rows * d, 0.0);
    sc.m.clear();
    sc.l.clear();
    for h in 0..kv_count {
        let (r0, kv) = (h * group, kv0 + h);
        let q = &q[r0 * d..(r0 + group) * d];
        K::scores(
            q,
            d,
            &c.k[kv * d..],
            offsets,
            c.scale,
            &mut sc.s[r0 * n..],
            n,
        );
    }
    for row in sc.s.chunks_exact_mut(n) {
        let (m, l) = K::exp_row(row);
        sc.m.push(m);
        sc.l.push(l);
    }
    for h in 0..kv_count {
        let (r0, kv) = (h * group, kv0 + h);
        let (o, p) = (&mut sc.o[r0 * d..(r0 + group) * d], &sc.s[r0 * n..]);
        K::pv(o, d, p, n, offsets, &c.v[kv * d..]);
    }
}

/// Folds block partial `(m, l, o)` into `run` (the first block is taken as is).
fn merge<K: Kernels>(run: Running, first: bool, m: f32, l: f32, o: &[f32]) {
    if first {
        *run.m = m;
        *run.l = l;
        run.o.copy_from_slice(o);
        return;
    }
    let new = run.m.max(m);
    let (a, b) = (K::exp1(*run.m - new), K::exp1(m - new));
    *run.m = new;
    *run.l = run.l.mul_add(a, l * b);
    K::scale_add(run.o, a, o, b);
}

/// A prompt tile (queries `tile` of `seq`, `kv_head`'s query heads): every key block its rows
/// see, merged as it goes, then the output rows.
fn prompt_tile<K: Kernels, E: Elem>(
    c: &Call<E>,
    seq: usize,
    kv_head: usize,
    tile: std::ops::Range<usize>,
    sc: &mut Scratch,
    out: DisjointOut,
) {
    let (heads, d, group) = (c.shape.heads, c.shape.head_dim, c.group());
    let (start, qlen) = c.query_range(seq);
    // Position of the sequence's first query this step; query `t` sees `p0 + t + 1` keys.
    let p0 = c.l.context_lens[seq] as usize - qlen;
    let tokens = tile.len();
    let rows = tokens * group;
    let (mut q, mut acc, mut offsets) = (
        std::mem::take(&mut sc.q),
        std::mem::take(&mut sc.acc),
        std::mem::take(&mut sc.offsets),
    );
    q.clear();
    for t in tile.clone() {
        let off = ((start + t) * heads + kv_head * group) * d;
        q.extend_from_slice(&c.q[off..off + group * d]);
    }
    let mut run = RunningRows::new(&mut acc, rows, d);
    let last_keys = p0 + tile.end;
    for block in 0..last_keys.div_ceil(KEY_BLOCK) {
        let from = block * KEY_BLOCK;
        c.offsets(seq, from, (from + KEY_BLOCK).min(last_keys), &mut offsets);
        for t in 0..tokens {
            let visible = p0 + tile.start + t + 1;
            if visible <= from {
                continue;
            }
            let n = (visible - from).min(KEY_BLOCK);
            let r0 = t * group;
            let q = &q[r0 * d..(r0 + group) * d];
            block_partials::<K, E>(c, q, kv_head, 1, &offsets[..n], sc);
            run.fold::<K>(r0, block == 0, sc);
        }
    }
    for t in 0..tokens {
        let off = ((start + tile.start + t) * heads + kv_head * group) * d;
        for h in 0..group {
            for (e, x) in run.output(t * group + h).enumerate() {
                // SAFETY: rows (start + tile.start + t, kv_head's query heads) belong to this
                // task only, and lie inside the `[tokens, heads, d]` output.
                unsafe { *out.at(off + h * d + e) = x };
            }
        }
    }
    (sc.q, sc.acc, sc.offsets) = (q, acc, offsets);
}

/// Every key block of a decoding sequence for every head, each block's partials merged into
/// the running softmax as [`merge_decodes`] merges them, then the output rows.
fn decode_sequence<K: Kernels, E: Elem>(
    c: &Call<E>,
    seq: usize,
    sc: &mut Scratch,
    out: DisjointOut,
) {
    let (heads, d) = (c.shape.heads, c.shape.head_dim);
    let (start, _) = c.query_range(seq);
    let ctx = c.l.context_lens[seq] as usize;
    let (mut acc, mut offsets) = (std::mem::take(&mut sc.acc), std::mem::take(&mut sc.offsets));
    let mut run = RunningRows::new(&mut acc, heads, d);
    let q = &c.q[start * heads * d..(start + 1) * heads * d];
    for block in 0..ctx.div_ceil(KEY_BLOCK) {
        let from = block * KEY_BLOCK;
        c.offsets(seq, from, (from + KEY_BLOCK).min(ctx), &mut offsets);
        prefetch_block(c, &offsets);
        block_partials::<K, E>(c, q, 0, c.shape.kv_heads, &offsets, sc);
        run.fold::<K>(0, block == 0, sc);
    }
    for h in 0..heads {
        for (e, x) in run.output(h).enumerate() {
            // SAFETY: the sequence's one row belongs to this task only, inside the
            // `[tokens, heads, d]` output.
            unsafe { *out.at((start * heads + h) * d + e) = x };
        }
    }
    (sc.acc, sc.offsets) = (acc, offsets);
}

/// One key block of a decoding sequence for every head: partials `(m, l, o)` at
/// `partial_base[seq] + ((head * blocks) + block) * (d + 2)`.
fn decode_block<K: Kernels, E: Elem>(
    c: &Call<E>,
    seq: usize,
    block: usize,
    sc: &mut Scratch,
    part: DisjointOut,
) {
    let (heads, d) = (c.shape.heads, c.shape.head_dim);
    let (start, _) = c.query_range(seq);
    let ctx = c.l.context_lens[seq] as usize;
    let blocks = ctx.div_ceil(KEY_BLOCK);
    let mut offsets = std::mem::take(&mut sc.offsets);
    let from = block * KEY_BLOCK;
    c.offsets(seq, from, (from + KEY_BLOCK).min(ctx), &mut offsets);
    prefetch_block(c, &offsets);
    prefetch_next(c, seq, block, blocks, sc);
    let q = &c.q[start * heads * d..(start + 1) * heads * d];
    block_partials::<K, E>(c, q, 0, c.shape.kv_heads, &offsets, sc);
    for head in 0..heads {
        let at = c.partial_base[seq] + (head * blocks + block) * c.partial_len();
        // SAFETY: this (sequence, head, block) partial is written by this task only, inside
        // the buffer sized for every decoding sequence's heads and blocks.
        unsafe {
            *part.at(at) = sc.m[head];
            *part.at(at + 1) = sc.l[head];
            std::ptr::copy_nonoverlapping(sc.o[head * d..].as_ptr(), part.at(at + 2), d);
        }
    }
    sc.offsets = offsets;
}

/// Asks for key block `block + 1` of `seq` (of `blocks`), if there is one: decode tasks are
/// taken in block order, each thread's run of them contiguous, so the thread that computes
/// a block mostly goes on to the next, whose keys and values then arrive while this one is
/// computed. Alternated per call in one process (Zen 4, 2026-12-03,
/// `examples/decode_attention.rs 30 576` with `EVICT=3`): 59.9 / 65.4 / 66.2 against 63.0 /
/// 70.3 / 71.6 us per layer; decode passes after a 512-token prompt, alternated per pass,
/// 0.1-2.5 % faster (3 runs of 240 passes). Whole-sequence tasks (many sequences decoding)
/// gained nothing from it (107.2 / 133.3 / 120.1 against 107.3 / 132.8 / 118.8 us for the
/// example's 12 sequences) and keep prefetching each block as they reach it.
fn prefetch_next<E>(c: &Call<E>, seq: usize, block: usize, blocks: usize, sc: &mut Scratch) {
    if block + 1 >= blocks {
        return;
    }
    let from = (block + 1) * KEY_BLOCK;
    let to = (from + KEY_BLOCK).min(c.l.context_lens[seq] as usize);
    let mut next = std::mem::take(&mut sc.next);
    c.offsets(seq, from, to, &mut next);
    prefetch_block(c, &next);
    sc.next = next;
}

/// Asks for the keys and values of every KV head at `offsets` to be brought into L2. A decode
/// task's keys and values are cold (the step's weights went through the caches since the
/// layer last ran), and its loops read them head by head, a few lines per position at a
/// stride, which keeps too few misses in flight (see `examples/decode_attention.rs`).
fn prefetch_block<E>(c: &Call<E>, offsets: &[usize]) {
    let len = c.shape.kv_heads * c.shape.head_dim;
    #[cfg(target_arch = "x86_64")]
    for cache in [c.k, c.v] {
        prefetch_rows(cache, offsets, len);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (offsets, len);
}

#[cfg(target_arch = "x86_64")]
fn prefetch_rows<E>(cache: &[E], offsets: &[usize], len: usize) {
    for &off in offsets {
        let row = &cache[off..off + len];
        let bytes = std::mem::size_of_val(row);
        let p = row.as_ptr() as *const i8;
        for b in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing; the address is inside `row`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.add(b))
            };
        }
    }
}

/// Merges each decoding row's block partials in block order into its output row.
fn merge_decodes<K: Kernels, E: Elem>(c: &Call<E>, partials: &[f32], out: &mut [f32]) {
    let (heads, d, pl) = (c.shape.heads, c.shape.head_dim, c.partial_len());
    let (mut m, mut l, mut o) = (0f32, 0f32, vec![0f32; d]);
    for seq in 0..c.l.num_seqs() {
        let (start, qlen) = c.query_range(seq);
        if qlen != 1 || c.whole_decodes {
            continue;
        }
        let blocks = (c.l.context_lens[seq] as usize).div_ceil(KEY_BLOCK);
        for head in 0..heads {
            for block in 0..blocks {
                let p = &partials[c.partial_base[seq] + (head * blocks + block) * pl..][..pl];
                let run = Running {
                    m: &mut m,
                    l: &mut l,
                    o: &mut o,
                };
                merge::<K>(run, block == 0, p[0], p[1], &p[2..]);
            }
            let row = &mut out[(start * heads + head) * d..][..d];
            for (y, &x) in row.iter_mut().zip(&o) {
                *y = x / l;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{random_case, AttentionCase};

    /// Builds a layout of `(query_len, context_len, batch sequence whose blocks it reads)`.
    type MakeLayout<'a> = dyn Fn(&[(usize, usize, usize)]) -> HostLayout + 'a;

    /// Rows of `seq` in `out` (`[tokens, heads, d]`) under `layout`.
    fn rows_of(out: &[f32], l: &HostLayout, seq: usize, row: usize) -> Vec<f32> {
        out[l.query_starts[seq] as usize * row..l.query_starts[seq + 1] as usize * row].to_vec()
    }

    /// A sequence's output rows do not depend on what else is in the call, on how its prompt
    /// is chunked, or on whether a position is computed as a prompt row or as a decode: the
    /// same bits in each case, for both cache element types.
    #[test]
    fn rows_are_independent_of_batching_and_chunking() {
        let (heads, kvh, d, bs) = (6, 2, 64, 16);
        let shape = AttentionShape {
            heads,
            kv_heads: kvh,
            head_dim: d,
        };
        let row = heads * d;
        // One batch: a 150-token prompt, two decodes and a chunk, all in one call.
        let batch = AttentionCase::mixed(
            &[(1, 90), (150, 150), (1, 300), (17, 70)],
            heads,
            kvh,
            d,
            bs,
        );
        let data = random_case(&batch, 3);
        let l = &data.layout;
        let q_of = |s: usize| rows_of(&data.q, l, s, row);
        let layout = |seqs: &[(usize, usize, usize)]| {
            // (query_len, context_len, seq of the batch whose blocks it reads)
            let mut starts = vec![0u32];
            for &(ql, _, _) in seqs {
                starts.push(starts.last().unwrap() + ql as u32);
            }
            let max_blocks = l.max_blocks;
            let mut tables = Vec::new();
            for &(_, _, s) in seqs {
                tables.extend_from_slice(l.block_table(s));
            }
            HostLayout {
                block_size: bs,
                num_tokens: *starts.last().unwrap() as usize,
                max_blocks,
                block_tables: tables,
                query_starts: starts,
                context_lens: seqs.iter().map(|&(_, c, _)| c as u32).collect(),
                ..Default::default()
            }
        };
        fn check<E: Elem>(
            k: &[E],
            v: &[E],
            shape: AttentionShape,
            data: &crate::check::CaseData,
            q_of: &dyn Fn(usize) -> Vec<f32>,
            layout: &MakeLayout,
        ) {
            let row = shape.heads * shape.head_dim;
            let all = attention_cpu(&data.q, k, v, &data.layout, shape);
            assert!(all.iter().all(|x| x.is_finite()));
            // The prompt alone.
            let alone = attention_cpu(&q_of(1), k, v, &layout(&[(150, 150, 1)]), shape);
            assert_eq!(
                alone,
                rows_of(&all, &data.layout, 1, row),
                "prompt alone vs batched"
            );
            // The prompt in chunks of 100 and 50.
            let q = q_of(1);
            let first = attention_cpu(&q[..100 * row], k, v, &layout(&[(100, 100, 1)]), shape);
            let rest = attention_cpu(&q[100 * row..], k, v, &layout(&[(50, 150, 1)]), shape);
            assert_eq!([first, rest].concat(), alone, "chunked prompt");
            // Its last position as a decode step.
            let last = attention_cpu(&q[149 * row..], k, v, &layout(&[(1, 150, 1)]), shape);
            assert_eq!(last, alone[149 * row..], "decode vs prompt row");
            // A decode alone.
            let dec = attention_cpu(&q_of(2), k, v, &layout(&[(1, 300, 2)]), shape);
            assert_eq!(
                dec,
                rows_of(&all, &data.layout, 2, row),
                "decode alone vs batched"
            );
        }
        check(&data.k, &data.v, shape, &data, &q_of, &layout);
        let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
            data.k.iter().map(|&x| half::f16::from_f32(x)).collect(),
            data.v.iter().map(|&x| half::f16::from_f32(x)).collect(),
        );
        check(&k16, &v16, shape, &data, &q_of, &layout);
    }

    /// With enough decoding sequences a task is a whole sequence; each row has the same bits
    /// as when its blocks are separate tasks merged after (the sequence alone), and matches the
    /// reference.
    #[test]
    fn whole_sequence_decodes_equal_split_ones() {
        let shape = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 64,
        };
        let contexts = [5, 64, 65, 130, 200, 1, 90, 129, 300];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        assert!(contexts.len() >= WHOLE_SEQUENCES_PER_THREAD * 2);
        let case = AttentionCase::decode(&contexts, shape.heads, shape.kv_heads, 64, 16);
        let data = random_case(&case, 21);
        let l = &data.layout;
        let row = shape.heads * shape.head_dim;
        let k16: Vec<half::f16> = data.k.iter().map(|&x| half::f16::from_f32(x)).collect();
        let v16: Vec<half::f16> = data.v.iter().map(|&x| half::f16::from_f32(x)).collect();
        let all = pool.install(|| attention_cpu(&data.q, &k16, &v16, l, shape));
        let want = crate::reference::naive_attention(
            &data.q,
            &k16.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            &v16.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            l,
            shape,
        );
        for (a, b) in all.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4,
                "whole-sequence decode {a} vs reference {b}"
            );
        }
        for (seq, &ctx) in contexts.iter().enumerate() {
            let alone = HostLayout {
                block_size: 16,
                num_tokens: 1,
                max_blocks: l.max_blocks,
                block_tables: l.block_table(seq).to_vec(),
                query_starts: vec![0, 1],
                context_lens: vec![ctx as u32],
                ..Default::default()
            };
            let q = rows_of(&data.q, l, seq, row);
            let split = pool.install(|| attention_cpu(&q, &k16, &v16, &alone, shape));
            assert_eq!(
                split,
                rows_of(&all, l, seq, row),
                "sequence {seq} ({ctx} keys)"
            );
        }
    }

    /// Every family this CPU can run (the portable one always) against the reference, for
    /// GQA groups of 1 to 5 query heads, head dims with and without a tail past the vectors: the dispatch picks one, so the others would otherwise
    /// go untested here.
    #[test]
    fn every_family_matches_the_reference() {
        for (heads, kv_heads, d) in [(6, 2, 72), (6, 2, 64), (8, 2, 64), (4, 4, 72), (5, 1, 64)] {
            let case = AttentionCase::mixed(
                &[(1, 90), (70, 70), (1, 200), (20, 60)],
                heads,
                kv_heads,
                d,
                16,
            );
            let data = random_case(&case, 11);
            let want = crate::reference::naive_attention(
                &data.q,
                &data.k,
                &data.v,
                &data.layout,
                case.shape,
            );
            let mut got = vec![(
                "plain",
                attention_with::<Plain, f32>(&data.q, &data.k, &data.v, &data.layout, case.shape),
            )];
            #[cfg(target_arch = "x86_64")]
            if x86::available() {
                got.push((
                    "avx2",
                    attention_with::<x86::Avx2, f32>(
                        &data.q,
                        &data.k,
                        &data.v,
                        &data.layout,
                        case.shape,
                    ),
                ));
            } else {
                eprintln!("skipped the AVX2 family: this CPU lacks AVX2, FMA or F16C");
            }
            for (name, got) in got {
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4,
                        "{name}, {heads} heads / {kv_heads}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
