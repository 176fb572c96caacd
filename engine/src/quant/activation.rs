//! Activations quantized to 8 bits per block of 32 (llama.cpp's Q8_1 numerics), once per
//! matmul input, shared by every weight row.

use super::isa::Isa;
use half::f16;
use rayon::prelude::*;

/// Elements per block.
pub const QK: usize = 32;

/// 32 activations quantized to 8 bits: `x ≈ d * qs` with `|qs| <= 127`; `s = d * sum(qs)`
/// (rounded through f16, for Q4_1's min) and `sum = sum(qs)` (for the unsigned VNNI trick).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(16))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
    pub sum: i32,
}

impl Default for BlockQ8 {
    fn default() -> Self {
        Self {
            qs: [0; QK],
            d: 0.0,
            s: 0.0,
            sum: 0,
        }
    }
}

/// Quantizes a row of activations (length a multiple of 32) into `out`.
pub fn quantize_row_q8(xs: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.available() {
        // SAFETY: AVX2, FMA and F16C were detected.
        return unsafe { quantize_row_avx2(xs, out) };
    }
    quantize_row_generic(xs, out)
}

/// Quantizes `m` rows of `k` activations (row-major) into `m * k / 32` blocks, in parallel
/// when there are enough rows to pay for it.
pub fn quantize_rows(xs: &[f32], k: usize) -> Vec<BlockQ8> {
    let bpr = k / QK;
    let mut out = vec![BlockQ8::default(); xs.len() / k * bpr];
    if xs.len() >= 16 * k {
        out.par_chunks_mut(8 * bpr)
            .zip(xs.par_chunks(8 * k))
            .for_each(|(o, x)| quantize_row_q8(x, o));
    } else {
        quantize_row_q8(xs, &mut out);
    }
    out
}

/// [`quantize_row_generic`] in AVX2, the same values bit for bit: the max of `|x|` ignores
/// NaN (as `f32::max` does), a NaN input quantizes to 0 (as `NaN as i32` does), and every
/// other step is exact or rounds the same way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_avx2(xs: &[f32], out: &mut [BlockQ8]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let p = x.as_ptr();
        // (No closures here: they would be compiled without AVX2.)
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let mut m = _mm256_setzero_ps();
        for &v in &v {
            // `max(x, m)` returns `m` when `x` is NaN: NaN is skipped.
            m = _mm256_max_ps(_mm256_and_ps(v, abs_mask), m);
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (idv, lo, hi) = (
            _mm256_set1_ps(id),
            _mm256_set1_ps(-127.0),
            _mm256_set1_ps(127.0),
        );
        let mut q = [_mm256_setzero_si256(); 4];
        for (q, &v) in q.iter_mut().zip(&v) {
            let r = _mm256_round_ps(
                _mm256_mul_ps(v, idv),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let not_nan = _mm256_cmp_ps(r, r, _CMP_ORD_Q);
            let r = _mm256_and_ps(_mm256_min_ps(_mm256_max_ps(r, lo), hi), not_nan);
            *q = _mm256_cvtps_epi32(r);
        }
        let sum4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(sum4),
            _mm256_extracti128_si256(sum4, 1),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let packed = _mm256_permutevar8x32_epi32(packed, order);
        _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), packed);
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
        b.sum = sum;
    }
}

#[inline(always)]
fn quantize_row_generic(xs: &[f32], out: &mut [BlockQ8]) {
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            // The clamp keeps |q| <= 127, which the SIMD kernels rely on (no i16 saturation).
            let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
            *q = r as i8;
            sum += r;
        }
        // llama.cpp stores d and s as f16; round through it to keep its numerics.
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
        b.sum = sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_values_stay_within_127() {
        let mut xs = vec![0f32; 96];
        xs[3] = -1.0;
        xs[40] = 1e30;
        xs[41] = -1e30;
        for (i, x) in xs[64..].iter_mut().enumerate() {
            *x = i as f32 - 16.0;
        }
        let mut out = vec![BlockQ8::default(); 3];
        quantize_row_q8(&xs, &mut out);
        let mut plain = vec![BlockQ8::default(); 3];
        quantize_row_generic(&xs, &mut plain);
        assert_eq!(out, plain, "the AVX2 loop must equal the plain one");
        for b in &out {
            assert!(b.qs.iter().all(|&q| (-127..=127).contains(&q)));
            assert_eq!(b.sum, b.qs.iter().map(|&q| q as i32).sum::<i32>());
        }
        assert_eq!(out[0].qs[3], -127);
        assert_eq!((out[1].qs[8], out[1].qs[9]), (127, -127));
        // An all-zero block has a zero scale and zero values.
        let zero = [0f32; 32];
        let mut z = [BlockQ8::default()];
        quantize_row_q8(&zero, &mut z);
        assert_eq!((z[0].d, z[0].sum), (0.0, 0));
    }

    /// The AVX2 loop equals the plain one bit for bit on random rows, ties at .5, NaN and
    /// infinities (skipped where the CPU lacks AVX2).
    #[test]
    fn avx2_equals_plain() {
        if !Isa::Avx2.available() {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
            return;
        }
        let mut xs = crate::quant::tests::random(32 * 64, 5);
        for (i, x) in xs.iter_mut().enumerate() {
            *x *= [1.0, 1e-3, 300.0, 1e-30][i / 512];
        }
        // Exact ties after scaling by 127 / amax.
        for (i, x) in xs[..32].iter_mut().enumerate() {
            *x = (i as f32 - 15.5) * 127.0 / 15.5 / 127.0;
        }
        xs[40] = f32::NAN;
        xs[70] = f32::INFINITY;
        xs[100] = f32::NEG_INFINITY;
        xs[101] = f32::NAN;
        let mut a = vec![BlockQ8::default(); xs.len() / 32];
        let mut b = a.clone();
        // SAFETY: AVX2, FMA and F16C detected above.
        unsafe { quantize_row_avx2(&xs, &mut a) };
        quantize_row_generic(&xs, &mut b);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.qs, y.qs, "block {i}");
            assert_eq!(
                (x.d.to_bits(), x.s.to_bits(), x.sum),
                (y.d.to_bits(), y.s.to_bits(), y.sum),
                "block {i}"
            );
        }
    }
}
