//! The packed dense kernel: a tile of [`TILE`] weight rows against one to three activation rows.
//!
//! One vector accumulator per (weight row, activation row), a fused multiply-add per
//! [`GROUP`] columns in column order, then the lanes summed in a fixed order and the columns
//! past the last whole group added one by one. Every output is this same sequence of
//! operations whatever the tile, the chunk, the activation row's partner or the batch.

use super::{group_offset, tail_offset, GROUP, TILE};
use crate::quant::Isa;
use half::bf16;
use liftoff_kernels::DisjointOut;
use std::ops::Range;

/// Groups ahead of the one being computed whose weights are prefetched (2 KB of bf16, 4 KB of
/// f32): enough reads in flight for one core to stream at the machine's rate.
///
/// For a single activation row only where [`crate::prefetch::single_row`] says so: on a Zen 4
/// its steps stream the tiles in order at a pace the hardware prefetcher keeps up with, and the
/// prefetches only cost issue slots. Alternating per token in one decode (2 x 123 tokens a
/// run, Zen 4, 2026-12-03), a token took 4-8 % less time without them in f32 (5 runs of 5) and
/// 0.7-6 % less in bf16 (4 runs of 5), while at concurrency 16 they saved 2 % (1 run per
/// dtype). On a Xeon a bf16 token took 22 % less with them.
const PREFETCH_GROUPS: usize = 32;

/// Weight bytes of a block of tiles that every step of activation rows walks in turn: half
/// of a 32 KB L1, the rest for the activation rows and the tiles' prefetched successors.
const L1_BYTES: usize = 16 << 10;

/// Activation rows whose slices stay in L2 while a chunk's weight blocks pass through L1.
const ACT_ROWS: usize = 32;

/// A SIMD level of the kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    /// Every level this build has, best first.
    pub(super) const ALL: &'static [Simd] = &[
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2,
        Simd::Portable,
    ];

    /// Whether this CPU has the level's instructions.
    pub(super) fn available(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
    }

    /// The widest level this CPU has, unless the int8 kernels are forced to the portable
    /// ones (`LIFTOFF_CPU_KERNELS=scalar`, see [`Isa::detect`]). Chosen once.
    ///
    /// There is no AVX-512 level: the weights stream from memory, and on a Zen 4 a 512-bit
    /// version of the row-major kernel read bf16 weights at 0.7x the AVX2 loop's rate
    /// (`examples/dense_step.rs bf16 1`, alternated: 13.4-17.1 against 9.6-11.2 ms per step).
    pub(super) fn detect() -> Simd {
        static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            if Isa::detect() == Isa::Scalar {
                return Simd::Portable;
            }
            Simd::ALL
                .iter()
                .copied()
                .find(|s| s.available())
                .unwrap_or(Simd::Portable)
        })
    }
}

/// One matmul's operands: the packed `[n, k]` weights `w` and `m` activation rows `xs`.
#[derive(Clone, Copy)]
pub(super) struct Operands<'a, W> {
    pub w: &'a [W],
    pub xs: &'a [f32],
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// The tiles `tiles` of the packed weights against every activation row, a few at a time,
/// into `out[a * n + r]` for the rows `r < n`.
///
/// # Safety
/// `ops.w` holds the packed tiles `tiles`, `ops.xs` holds `m * k` values, no other thread writes these
/// rows' columns of `out` (`[m, n]`), and `simd`'s instructions exist on this CPU.
pub(super) unsafe fn chunk<W: Lane>(
    simd: Simd,
    ops: Operands<W>,
    tiles: Range<usize>,
    out: DisjointOut,
) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => chunk_avx2(ops, tiles, out),
        Simd::Portable => chunk_at::<Portable, W>(ops, tiles, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<W: Lane>(ops: Operands<W>, tiles: Range<usize>, out: DisjointOut) {
    chunk_at::<x86::Ymm, W>(ops, tiles, out)
}

/// [`chunk`] at one level, with the weights' number of activation rows per step: f32 weights
/// take 3 (12 accumulators, a weight vector and 3 activation vectors fill AVX2's 16
/// registers), bf16 weights 2, whose widening needs registers of its own. Alternated in one
/// process at 512 rows (GFLOP/s, 3 rows against 2): f32 98.7 / 111.5 against 96.4 / 100.3,
/// bf16 77.9 / 84.1 against 95.2 / 97.5; at 16 rows f32 100.5 / 96.0 against 72.4 / 73.5.
#[inline(always)]
unsafe fn chunk_at<V: Vector, W: Lane>(ops: Operands<W>, tiles: Range<usize>, out: DisjointOut) {
    if std::mem::size_of::<W>() == 4 {
        chunk_in::<V, W, 3>(ops, tiles, out)
    } else {
        chunk_in::<V, W, 2>(ops, tiles, out)
    }
}

/// [`chunk_at`] with `S` activation rows per step. Every step walks a block of weights that
/// fits in L1 beside its rows, so the first step streams the block from memory and the
/// others find it in L1: several whole tiles when they fit, else one tile's columns a slice
/// at a time, the steps' accumulators kept in memory between slices (stored and reloaded
/// unchanged, so each output is the same sequence of operations as without slices).
#[inline(always)]
unsafe fn chunk_in<V: Vector, W: Lane, const S: usize>(
    ops: Operands<W>,
    tiles: Range<usize>,
    out: DisjointOut,
) {
    let Operands { w, xs, m, n, k } = ops;
    let groups = k / GROUP;
    let group_bytes = TILE * GROUP * std::mem::size_of::<W>();
    let slice = (L1_BYTES / group_bytes).clamp(1, groups.max(1));
    let block = if slice >= groups {
        (L1_BYTES / (group_bytes * groups).max(1)).max(1)
    } else {
        1
    };
    let steps = m.div_ceil(S);
    let mut partial = Vec::new();
    if slice < groups {
        partial.resize(steps, [[V::zero(); TILE]; S]);
    }
    let act_steps = ACT_ROWS.div_ceil(S);
    for step_block in (0..steps).step_by(act_steps) {
        let step_block = step_block..(step_block + act_steps).min(steps);
        let mut b = tiles.start;
        while b < tiles.end {
            let block_end = (b + block).min(tiles.end);
            let mut g0 = 0;
            loop {
                let g1 = (g0 + slice).min(groups);
                for s in step_block.clone() {
                    let a = s * S;
                    let part = Slice {
                        groups: g0..g1,
                        resume: g0 > 0,
                        last: g1 == groups,
                        prefetch: (m > 1 || crate::prefetch::single_row()) && s == step_block.start,
                    };
                    let mut acc = partial.get_mut(s);
                    for t in b..block_end {
                        let at = (t, w.as_ptr().add(t * TILE * k));
                        let acc = acc.as_deref_mut();
                        match (m - a).min(S) {
                            1 => rows::<V, W, 1, S>(at, xs, a, k, n, &part, acc, out),
                            2 => rows::<V, W, 2, S>(at, xs, a, k, n, &part, acc, out),
                            _ => rows::<V, W, S, S>(at, xs, a, k, n, &part, acc, out),
                        }
                    }
                }
                if g1 >= groups {
                    break;
                }
                g0 = g1;
            }
            b = block_end;
        }
    }
}

/// Which columns of a tile one call covers.
struct Slice {
    /// The column groups.
    groups: Range<usize>,
    /// Continue from the saved accumulators (not the first slice).
    resume: bool,
    /// The last slice: finish and store the outputs.
    last: bool,
    /// Prefetch the weights ahead (the first rows to pass over them, when there are several).
    prefetch: bool,
}

/// Tile `t` (its values at `w`) against the `A` activation rows from `a`, over one slice of
/// columns; the accumulators between slices in `saved` (when the tile has several).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<V: Vector, W: Lane, const A: usize, const S: usize>(
    (t, w): (usize, *const W),
    xs: &[f32],
    a: usize,
    k: usize,
    n: usize,
    part: &Slice,
    saved: Option<&mut [[V; TILE]; S]>,
    out: DisjointOut,
) {
    let x: [*const f32; A] = std::array::from_fn(|j| xs.as_ptr().add((a + j) * k));
    let mut start = [[V::zero(); TILE]; A];
    if let (true, Some(saved)) = (part.resume, &saved) {
        start.copy_from_slice(&saved[..A]);
    }
    let sums = accumulate::<V, W, A>(w, x, part.groups.clone(), start, part.prefetch);
    if part.last {
        store(out, n, a, t * TILE, finish(sums, w, x, k));
    } else if let Some(saved) = saved {
        saved[..A].copy_from_slice(&sums);
    }
}

/// Writes a tile's sums for the rows below `n`.
#[inline(always)]
unsafe fn store<const A: usize>(
    out: DisjointOut,
    n: usize,
    a: usize,
    r: usize,
    s: [[f32; TILE]; A],
) {
    for (j, row) in s.iter().enumerate() {
        for (i, v) in row.iter().enumerate().take(n.saturating_sub(r)) {
            *out.at((a + j) * n + r + i) = *v;
        }
    }
}

/// Adds the column groups `groups` of one packed tile (`TILE * k` values at `w`) times `A`
/// activation rows to the accumulators. `prefetch`: ask for the weights [`PREFETCH_GROUPS`]
/// groups ahead (the first pass over them, from memory; tiles follow each other, so this runs
/// into the next one).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // acc[a][i]: a row-by-column index reads clearest
unsafe fn accumulate<V: Vector, W: Lane, const A: usize>(
    w: *const W,
    x: [*const f32; A],
    groups: Range<usize>,
    mut acc: [[V; TILE]; A],
    prefetch: bool,
) -> [[V; TILE]; A] {
    const { assert!(GROUP == 8) };
    let group_bytes = TILE * GROUP * std::mem::size_of::<W>();
    for g in groups {
        let at = w.add(group_offset(0, g));
        if prefetch {
            let ahead = (at as *const u8).wrapping_add(PREFETCH_GROUPS * group_bytes);
            let mut off = 0;
            while off < group_bytes {
                prefetch_line(ahead.wrapping_add(off));
                off += 64;
            }
        }
        let mut xv = [V::zero(); A];
        for (a, v) in xv.iter_mut().enumerate() {
            *v = V::load(x[a].add(g * GROUP));
        }
        for i in 0..TILE {
            let wv = W::load::<V>(at.add(group_offset(i, 0)));
            for a in 0..A {
                acc[a][i] = V::fma(wv, xv[a], acc[a][i]);
            }
        }
    }
    acc
}

/// The tile's outputs from its accumulators over every whole group: the lanes summed, then
/// the columns past the last group added one by one.
#[inline(always)]
unsafe fn finish<V: Vector, W: Lane, const A: usize>(
    acc: [[V; TILE]; A],
    w: *const W,
    x: [*const f32; A],
    k: usize,
) -> [[f32; TILE]; A] {
    let whole = k / GROUP * GROUP;
    let tail = k - whole;
    let mut out = [[0f32; TILE]; A];
    for a in 0..A {
        for i in 0..TILE {
            let mut s = acc[a][i].sum();
            let wt = w.add(tail_offset(k, i));
            for j in 0..tail {
                s += (*wt.add(j)).f32() * *x[a].add(whole + j);
            }
            out[a][i] = s;
        }
    }
    out
}

/// Asks for the cache line at `p` to be brought into L1 (any address: it is never read).
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch reads nothing and cannot fault; SSE is part of x86_64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A vector of [`GROUP`] f32 lanes: the accumulator type of one SIMD level.
pub(super) trait Vector: Copy {
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn load_bf16(p: *const bf16) -> Self;
    /// `a * b + c`.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// The lanes' sum, in a fixed order.
    unsafe fn sum(self) -> f32;
}

/// A weight element: widens to f32, alone or a vector at a time.
pub(super) trait Lane: Copy + Send + Sync {
    fn f32(self) -> f32;
    unsafe fn load<V: Vector>(p: *const Self) -> V;
}

impl Lane for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const f32) -> V {
        V::load(p)
    }
}

impl Lane for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const bf16) -> V {
        V::load_bf16(p)
    }
}

/// Eight lanes in plain arithmetic, for CPUs without the SIMD levels.
#[derive(Clone, Copy)]
pub(super) struct Portable([f32; GROUP]);

impl Vector for Portable {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; GROUP])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; GROUP]))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Self {
        let mut v = [0.0; GROUP];
        for (i, l) in v.iter_mut().enumerate() {
            *l = (*p.add(i)).f32();
        }
        Portable(v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        let mut v = c.0;
        for ((s, x), y) in v.iter_mut().zip(a.0).zip(b.0) {
            *s += x * y;
        }
        Portable(v)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let v = self.0;
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use half::bf16;
    use std::arch::x86_64::*;

    /// AVX2 + FMA: 8 lanes.
    #[derive(Clone, Copy)]
    pub struct Ymm(__m256);

    impl Vector for Ymm {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Ymm(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Ymm(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const bf16) -> Self {
            let h = _mm_loadu_si128(p as *const __m128i);
            Ymm(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(h),
            )))
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Ymm(_mm256_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }
}
