//! Products of a few activation rows with dense CPU weights (f32 or bf16), the decode case.
//!
//! candle's CPU matmul packs both operands for a GEMM, which at one to a few rows leaves most
//! of the memory bandwidth unused; decoding a dense model is a pass over its weights per step,
//! so this kernel streams the weights once, dots them with every activation row from L1/L2,
//! and splits the rows over the rayon pool (a contiguous share per thread, which the others
//! help finish: [`for_each_chunk`]). Larger batches go to candle.
//!
//! A tile is [`ROWS`] weight rows against one or two activation rows: one vector accumulator
//! per (weight row, activation row), fused multiply-adds along `k`, then one horizontal sum
//! each. Every output element is computed by the same sequence of operations whatever the tile
//! it falls in (rows at the end of the matrix, an odd activation row, the batch size), so a
//! row's result does not depend on the batch it was computed with.

use crate::quant::Isa;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;
use liftoff_kernels::shares::for_each_chunk;
use liftoff_kernels::DisjointOut;

/// Most activation rows this kernel takes; more go to candle's GEMM.
pub const MAX_ROWS: usize = 8;

/// Weight bytes per chunk of rows handed to a pool thread: a few microseconds of streaming,
/// small enough that a thread held up at a matmul's end leaves little to wait for, large
/// enough that taking a chunk (one atomic operation) costs under 1 % of it.
const CHUNK_BYTES: usize = 32 << 10;

/// Weight rows per tile: with two activation rows, 8 accumulators, 4 weight vectors and an
/// activation vector stay in AVX2's 16 registers.
const ROWS: usize = 4;

/// `x: [m, k]` times `w: [n, k]`ᵀ, when `w` is a contiguous CPU f32/bf16 tensor and
/// `m <= MAX_ROWS`; `None` otherwise (the caller uses candle).
pub fn try_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if m == 0 || m > MAX_ROWS || k != wk || !w.device().is_cpu() {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let simd = simd_level();
    let out = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => rows_times(simd, &v[start..end], &xs, m, n, k),
        Storage::Cpu(CpuStorage::BF16(v)) => rows_times(simd, &v[start..end], &xs, m, n, k),
        _ => return Ok(None),
    };
    Ok(Some(
        Tensor::from_vec(out, (m, n), &Device::Cpu)?.to_dtype(x.dtype())?,
    ))
}

fn rows_times<W: Lane>(simd: Simd, w: &[W], xs: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(w.len() == n * k && xs.len() == m * k);
    let mut out = vec![0f32; m * n];
    // Whole tiles per chunk, so only the matrix's last chunk has a partial tile.
    let row_bytes = (k * std::mem::size_of::<W>()).max(1);
    let chunk = (CHUNK_BYTES / row_bytes / ROWS).max(1) * ROWS;
    let ptr = DisjointOut::new(&mut out);
    for_each_chunk(n, chunk, |rows| {
        // SAFETY: `rows` is within `n` and `w`/`xs` hold `n * k`/`m * k` elements (asserted
        // above); this chunk alone writes the columns `rows` of `out`; the SIMD levels are
        // only chosen when their features were detected at run time.
        unsafe {
            match simd {
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => task_avx2(w, xs, m, n, k, rows, ptr),
                Simd::Portable => task::<Portable, W>(w, xs, m, n, k, rows, ptr),
            }
        }
    });
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    /// Every level this build has, best first.
    const ALL: &'static [Simd] = &[
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2,
        Simd::Portable,
    ];

    /// Whether this CPU has the level's instructions.
    fn available(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
    }
}

/// The widest level this CPU has, unless the int8 kernels are forced to the portable ones
/// (`LIFTOFF_CPU_KERNELS=scalar`, see [`Isa::detect`]). Chosen once.
///
/// There is no AVX-512 level: the weights stream from memory, and on a Zen 4 a 512-bit
/// version of this loop read bf16 weights at 0.7x the AVX2 loop's rate
/// (`examples/dense_step.rs bf16 1`, alternated: 13.4-17.1 against 9.6-11.2 ms per step; f32
/// the same either way), although it was faster with the weights in cache.
fn simd_level() -> Simd {
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<W: Lane>(
    w: &[W],
    xs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    out: DisjointOut,
) {
    task::<x86::Ymm, W>(w, xs, m, n, k, rows, out)
}

/// A vector of f32 lanes: the accumulator type of one SIMD level.
trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn load_bf16(p: *const bf16) -> Self;
    /// `a * b + c`.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// The lanes' sum, in a fixed order.
    unsafe fn sum(self) -> f32;
}

/// Asks for the cache line at `p` to be brought into L1 (any address: it is never read).
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: a prefetch reads nothing and cannot fault; SSE is part of x86_64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A weight element: widens to f32, alone or a vector at a time.
trait Lane: Copy + Send + Sync {
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

/// The rows `rows` of `w` against every activation row, into `out[a * n + r]`.
///
/// # Safety
/// `w` holds `n * k` elements, `xs` `m * k`, `rows` lies within `n`, no other thread writes
/// these columns of `out`, and `V`'s instructions exist on this CPU.
#[inline(always)]
unsafe fn task<V: Vector, W: Lane>(
    w: &[W],
    xs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    out: DisjointOut,
) {
    let mut r = rows.start;
    while r < rows.end {
        if rows.end - r >= ROWS {
            row_block::<V, W, ROWS>(w, xs, m, n, k, r, out);
            r += ROWS;
        } else {
            row_block::<V, W, 1>(w, xs, m, n, k, r, out);
            r += 1;
        }
    }
}

/// Weight rows `r..r + R` against every activation row, two at a time.
#[inline(always)]
unsafe fn row_block<V: Vector, W: Lane, const R: usize>(
    w: &[W],
    xs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    out: DisjointOut,
) {
    let mut wr = [w.as_ptr(); R];
    for (i, p) in wr.iter_mut().enumerate() {
        *p = p.add((r + i) * k);
    }
    let x = |a: usize| xs.as_ptr().add(a * k);
    let mut a = 0;
    while a < m {
        if m - a >= 2 {
            let s = tile::<V, W, R, 2>(wr, [x(a), x(a + 1)], k, a == 0);
            store(out, n, a, r, s);
            a += 2;
        } else {
            let s = tile::<V, W, R, 1>(wr, [x(a)], k, a == 0);
            store(out, n, a, r, s);
            a += 1;
        }
    }
}

#[inline(always)]
unsafe fn store<const R: usize, const A: usize>(
    out: DisjointOut,
    n: usize,
    a: usize,
    r: usize,
    s: [[f32; R]; A],
) {
    for (j, row) in s.iter().enumerate() {
        for (i, v) in row.iter().enumerate() {
            *out.at((a + j) * n + r + i) = *v;
        }
    }
}

/// `R` weight rows against `A` activation rows of `k` elements: per pair one accumulator,
/// `LANES` elements per fused multiply-add, the lanes summed, then the tail one by one.
#[inline(always)]
unsafe fn tile<V: Vector, W: Lane, const R: usize, const A: usize>(
    w: [*const W; R],
    x: [*const f32; A],
    k: usize,
    fetch_next: bool,
) -> [[f32; R]; A] {
    let mut acc = [[V::zero(); R]; A];
    let whole = k / V::LANES * V::LANES;
    // The next `R` rows follow these in memory: each step asks for as many of their bytes as
    // it reads of these (with the first activation rows only), so the next tile arrives while
    // this one computes. Without it the four rows' interleaved reads defeat the hardware
    // prefetcher (`examples/dense_step.rs`, bf16, one row: 8 GB/s against 11-12 GB/s for a
    // row at a time and 12-14.5 GB/s with it, on a 15-17 GB/s Zen 3).
    let next = w[0].wrapping_add(R * k) as *const u8;
    let ahead = if fetch_next {
        R * V::LANES * std::mem::size_of::<W>()
    } else {
        0
    };
    let mut i = 0;
    while i < whole {
        let mut off = 0;
        while off < ahead {
            prefetch(next.wrapping_add(i * R * std::mem::size_of::<W>() + off));
            off += 64;
        }
        let mut wv = [V::zero(); R];
        for r in 0..R {
            wv[r] = W::load::<V>(w[r].add(i));
        }
        for a in 0..A {
            let xv = V::load(x[a].add(i));
            for r in 0..R {
                acc[a][r] = V::fma(wv[r], xv, acc[a][r]);
            }
        }
        i += V::LANES;
    }
    let mut out = [[0f32; R]; A];
    for a in 0..A {
        for r in 0..R {
            let mut s = acc[a][r].sum();
            for j in whole..k {
                s += (*w[r].add(j)).f32() * *x[a].add(j);
            }
            out[a][r] = s;
        }
    }
    out
}

/// Eight lanes in plain arithmetic, for CPUs without the SIMD levels below.
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Vector for Portable {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; 8]))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Self {
        let mut v = [0.0; 8];
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
        const LANES: usize = 8;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random;

    /// Every level this build has that this CPU runs (the skipped ones printed).
    fn levels() -> Vec<Simd> {
        for s in Simd::ALL.iter().filter(|s| !s.available()) {
            println!("gemv: {s:?} skipped, not on this CPU");
        }
        Simd::ALL
            .iter()
            .copied()
            .filter(|s| s.available())
            .collect()
    }

    fn weights(n: usize, k: usize, bf: bool) -> Tensor {
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        if bf {
            w.to_dtype(DType::BF16).unwrap()
        } else {
            w
        }
    }

    /// `rows_times` at one level, on the weights' own element type.
    fn product(simd: Simd, w: &Tensor, xs: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = w.dims2().unwrap();
        match w.dtype() {
            DType::F32 => rows_times(
                simd,
                &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                xs,
                m,
                n,
                k,
            ),
            _ => rows_times(
                simd,
                &w.flatten_all().unwrap().to_vec1::<bf16>().unwrap(),
                xs,
                m,
                n,
                k,
            ),
        }
    }

    /// Against candle's matmul (an independent implementation), at every level this CPU has,
    /// f32 and bf16 weights, odd shapes (tails in both `n` and `k`); sums in another order
    /// differ by rounding only.
    #[test]
    fn matches_candle_matmul() {
        for simd in levels() {
            for (n, k) in [(7, 33), (64, 96), (130, 257), (9, 576)] {
                for bf in [false, true] {
                    let w = weights(n, k, bf);
                    let wf = w.to_dtype(DType::F32).unwrap();
                    for m in [1, 2, 3, MAX_ROWS] {
                        let xs = random(m * k, m as u64);
                        let got = product(simd, &w, &xs, m);
                        let x = Tensor::from_vec(xs, (m, k), &Device::Cpu).unwrap();
                        let want = x.matmul(&wf.t().unwrap()).unwrap();
                        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        assert_eq!(got.len(), want.len());
                        for (g, r) in got.iter().zip(&want) {
                            assert!(
                                g.is_finite() && r.is_finite() && (g - r).abs() <= 1e-4,
                                "{simd:?} bf16={bf} {n}x{k} m={m}: {g} vs {r}"
                            );
                        }
                    }
                }
            }
        }
        // Too many rows: candle's turn.
        let w = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((MAX_ROWS + 1, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(try_matmul_t(&x, &w).unwrap().is_none());
        // The public entry point: bf16 activations give the f32 result on the same (widened)
        // values rounded as candle rounds, for contiguous and strided inputs alike.
        let w = weights(5, 40, true);
        let x = Tensor::from_vec(random(2 * 40, 3), (2, 40), &Device::Cpu).unwrap();
        let xb = x.to_dtype(DType::BF16).unwrap();
        let wide = try_matmul_t(&xb.to_dtype(DType::F32).unwrap(), &w)
            .unwrap()
            .unwrap();
        let want = wide.to_dtype(DType::BF16).unwrap();
        let strided = Tensor::cat(&[&xb, &xb], 1)
            .unwrap()
            .narrow(1, 40, 40)
            .unwrap();
        for x in [&xb, &strided] {
            let y = try_matmul_t(x, &w).unwrap().unwrap();
            assert_eq!((y.dims2().unwrap(), y.dtype()), ((2, 5), DType::BF16));
            let bits = |t: &Tensor| {
                let v = t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
                v.iter().map(|h| h.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(&y), bits(&want));
        }
    }

    /// A result does not depend on the batch it was computed in: the same bits for an
    /// activation row alone or among others (first or second of a pair, or the odd one), and
    /// for a weight row in a whole tile or among the rows left over at the matrix's end.
    #[test]
    fn rows_do_not_depend_on_their_tile() {
        let (n, m, k) = (7, 5, 37);
        for simd in levels() {
            for bf in [false, true] {
                let w = weights(n, k, bf);
                let xs = random(m * k, 9);
                let all = product(simd, &w, &xs, m);
                for a in 0..m {
                    let alone = product(simd, &w, &xs[a * k..(a + 1) * k], 1);
                    for r in 0..n {
                        assert_eq!(
                            alone[r].to_bits(),
                            all[a * n + r].to_bits(),
                            "{simd:?} bf16={bf}: activation row {a}, weight row {r}"
                        );
                    }
                }
                // Rows 4..7 end the matrix one by one; first, they make a whole tile.
                let order = [4u32, 5, 6, 0, 1, 2, 3];
                let idx = Tensor::new(&order, &Device::Cpu).unwrap();
                let moved = product(simd, &w.index_select(&idx, 0).unwrap(), &xs, m);
                for a in 0..m {
                    for (i, &r) in order.iter().enumerate() {
                        assert_eq!(
                            moved[a * n + i].to_bits(),
                            all[a * n + r as usize].to_bits(),
                            "{simd:?} bf16={bf}: weight row {r} at position {i}"
                        );
                    }
                }
            }
        }
    }
}
