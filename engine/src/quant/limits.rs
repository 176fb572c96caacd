//! The machine's limits, measured, so that benchmark figures can be put as a fraction of them:
//! memory read bandwidth, the int8 multiply-add peak of each kernel family (a register-only
//! loop of the instructions the micro-kernels use), and the int8 GEMM's achieved rate.

use super::activation::quantize_rows;
use super::isa::Isa;
use super::packed::{PackedMatrix, WeightKind};
use rayon::prelude::*;
use std::time::Instant;

/// Best-of-`reps` read bandwidth in bytes per second over `bytes` (all rayon threads).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let buf = bandwidth_buffer(bytes);
    let best = (0..reps.max(1))
        .map(|_| read_pass(&buf))
        .fold(f64::INFINITY, f64::min);
    (buf.len() * 8) as f64 / best
}

/// Every pass of a read-bandwidth loop over a stretch of time.
#[derive(Debug, Clone)]
pub struct BandwidthSeries {
    /// Bytes read by one pass.
    pub bytes_per_pass: usize,
    /// Seconds each pass took, in order.
    pub pass_seconds: Vec<f64>,
}

impl BandwidthSeries {
    /// Bytes per second over the whole stretch (all bytes over all time): the rate a reader
    /// streaming for that whole stretch could have had. When the bandwidth moves during the
    /// stretch this is the fair bound for a run as long, where the best pass is not.
    pub fn mean(&self) -> f64 {
        (self.bytes_per_pass * self.pass_seconds.len()) as f64 / self.seconds()
    }

    /// Seconds all passes took together (the time between them not counted).
    pub fn seconds(&self) -> f64 {
        self.pass_seconds.iter().sum()
    }

    /// Bytes per second of the fastest pass.
    pub fn best(&self) -> f64 {
        let fastest = self
            .pass_seconds
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        self.bytes_per_pass as f64 / fastest
    }

    /// Bytes per second of each pass, in order.
    pub fn rates(&self) -> Vec<f64> {
        self.pass_seconds
            .iter()
            .map(|s| self.bytes_per_pass as f64 / s)
            .collect()
    }
}

/// Passes over `bytes` (all rayon threads) for at least `seconds` (and at least two passes),
/// each timed.
pub fn read_bandwidth_series(bytes: usize, seconds: f64) -> BandwidthSeries {
    let buf = bandwidth_buffer(bytes);
    read_pass(&buf); // the first pass after the buffer was written is not timed
    let start = Instant::now();
    let mut pass_seconds = Vec::new();
    while pass_seconds.len() < 2 || start.elapsed().as_secs_f64() < seconds {
        pass_seconds.push(read_pass(&buf));
    }
    BandwidthSeries {
        bytes_per_pass: buf.len() * 8,
        pass_seconds,
    }
}

fn bandwidth_buffer(bytes: usize) -> Vec<u64> {
    (0..(bytes / 8) as u64).collect()
}

/// Seconds to read `buf` once, split across the rayon threads.
fn read_pass(buf: &[u64]) -> f64 {
    // Whole groups of eight words per chunk, so that every word is read.
    let chunk = buf
        .len()
        .div_ceil(rayon::current_num_threads().max(1))
        .next_multiple_of(8);
    let t = Instant::now();
    let sink = buf
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
    let seconds = t.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    seconds
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

/// Achieved int8 multiply-adds per second of the GEMM on a `kind` matrix, `m` activation rows
/// against an `n x k` matrix, best of `reps`.
pub fn gemm_rate(isa: Isa, kind: WeightKind, m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut ggml = Vec::with_capacity(n * k / 32 * kind.ggml_block_bytes());
    for _ in 0..n * k / 32 {
        ggml.extend_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        match kind {
            WeightKind::Q4_1 => {
                ggml.extend_from_slice(&half::f16::from_f32(-0.05).to_bits().to_le_bytes());
                ggml.extend((0..16).map(|_| next() as u8));
            }
            WeightKind::Q8_0 => ggml.extend((0..32).map(|_| next() as u8)),
        }
    }
    let w = PackedMatrix::pack(kind, &ggml, n, k);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_mean_weighs_passes_by_their_time() {
        // 4 bytes in 1 s and 4 bytes in 3 s: 8 bytes in 4 s, not the mean of 4 and 1.33 B/s.
        let s = BandwidthSeries {
            bytes_per_pass: 4,
            pass_seconds: vec![1.0, 3.0],
        };
        assert_eq!(s.mean(), 2.0);
        assert_eq!(s.best(), 4.0);
        assert_eq!(s.rates(), vec![4.0, 4.0 / 3.0]);
    }

    #[test]
    fn a_series_runs_for_its_time_and_at_least_two_passes() {
        let t = Instant::now();
        let s = read_bandwidth_series(1 << 20, 0.05);
        assert!(t.elapsed().as_secs_f64() >= 0.05);
        assert!(s.pass_seconds.len() >= 2);
        assert!(s.pass_seconds.iter().all(|p| p.is_finite() && *p > 0.0));
        let (mean, best) = (s.mean(), s.best());
        assert!(mean.is_finite() && mean > 0.0 && best.is_finite() && best >= mean);
    }
}
