//! The machine's limits, measured, so that benchmark figures can be put as a fraction of them:
//! memory read bandwidth, the int8 multiply-add peak of each kernel family (a register-only
//! loop of the instructions the micro-kernels use), and the int8 GEMM's achieved rate.

use super::activation::quantize_rows;
use super::isa::Isa;
use super::packed::{PackedMatrix, WeightKind, Q4_1_BYTES};
use rayon::prelude::*;
use std::time::Instant;

/// Best-of-`reps` read bandwidth in bytes per second over `bytes` (all rayon threads).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(rayon::current_num_threads().max(1));
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        sink ^= buf
            .par_chunks(chunk)
            .map(|c| {
                // Eight independent sums keep the loads, not the adds, the bottleneck.
                let mut acc = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] = acc[i].wrapping_add(w[i]);
                    }
                }
                acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (words * 8) as f64 / best
}

/// Int8 multiply-adds per second of `isa`'s dot-product instruction in a register-only loop,
/// on every rayon thread. `None` for the scalar family (it has no such instruction).
pub fn int8_peak(isa: Isa) -> Option<f64> {
    if !isa.available() || isa == Isa::Scalar {
        return None;
    }
    let iters = 20_000_000u64;
    let threads = rayon::current_num_threads().max(1);
    let t = Instant::now();
    let macs: u64 = (0..threads)
        .into_par_iter()
        .map(|_| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa.available()` was checked above.
            unsafe {
                return x86::peak_loop(isa, iters);
            }
            #[allow(unreachable_code)]
            0
        })
        .sum();
    Some(macs as f64 / t.elapsed().as_secs_f64())
}

/// Achieved int8 multiply-adds per second of the Q4_1 GEMM, `m` activation rows against an
/// `n x k` matrix, best of `reps`.
pub fn gemm_rate(isa: Isa, m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut ggml = Vec::with_capacity(n * k / 32 * Q4_1_BYTES);
    for _ in 0..n * k / 32 {
        ggml.extend_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        ggml.extend_from_slice(&half::f16::from_f32(-0.05).to_bits().to_le_bytes());
        ggml.extend((0..16).map(|_| next() as u8));
    }
    let w = PackedMatrix::pack(WeightKind::Q4_1, &ggml, n, k);
    let xs: Vec<f32> = (0..m * k)
        .map(|_| next() as f32 / u32::MAX as f32 - 0.5)
        .collect();
    let acts = quantize_rows(&xs, k);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::hint::black_box(super::gemm::gemm(&w, &acts, m, isa));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (m * n * k) as f64 / best
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Isa;
    use std::arch::x86_64::*;

    /// Runs `iters` rounds of 8 independent dot-product instructions (AMX: `iters / 16` rounds
    /// of 4 tile products); returns the multiply-adds done.
    pub unsafe fn peak_loop(isa: Isa, iters: u64) -> u64 {
        match isa {
            // A tdpbssd does 16384 multiply-adds in about 16 cycles: fewer rounds.
            Isa::Amx => crate::quant::amx::tiles::peak_loop(iters / 16),
            Isa::Avx512Vnni => vnni(iters),
            Isa::Avx2 => avx2(iters),
            Isa::Scalar => 0,
        }
    }

    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn vnni(iters: u64) -> u64 {
        let a = _mm256_set1_epi8(3);
        let b = _mm256_set1_epi8(-2);
        let mut acc = [_mm256_setzero_si256(); 8];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_epi32(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        iters * 8 * 32
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2(iters: u64) -> u64 {
        // The micro-kernel's sequence: vpmaddubsw, then 16-bit adds (one vpmaddwd per block).
        // Each product reads its accumulator, so the compiler cannot hoist it out of the loop;
        // eight chains keep the multiplier busy.
        let b = _mm256_set1_epi8(-2);
        let mut acc = [_mm256_set1_epi8(3); 8];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_add_epi16(*x, _mm256_maddubs_epi16(*x, b));
            }
        }
        std::hint::black_box(acc);
        iters * 8 * 32
    }
}
