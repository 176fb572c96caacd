//! Dot products of quantized weight rows with 8-bit activations (llama.cpp's
//! `vec_dot_q4_1_q8_1` and `vec_dot_q8_0_q8_0`), scalar and AVX2, one or four rows at a time.

use super::FastType;
use half::f16;

/// Elements per block.
pub const QK: usize = 32;
/// Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;
/// Q8_0 block: f16 scale, 32 signed bytes.
pub const Q8_0_BYTES: usize = 34;

/// 32 activations quantized to 8 bits: `x ≈ d * qs`, and `s = d * sum(qs)` (for Q4_1's min).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
}

impl Default for BlockQ8 {
    fn default() -> Self {
        Self {
            qs: [0; QK],
            d: 0.0,
            s: 0.0,
        }
    }
}

/// Quantizes a row of activations (length a multiple of 32).
pub fn quantize_row_q8(xs: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2, FMA and F16C were detected.
        return unsafe { quantize_row_q8_avx2(xs, out) };
    }
    quantize_row_q8_generic(xs, out)
}

/// The generic loop compiled with AVX2 enabled (vector rounding instead of `rintf` calls).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_q8_avx2(xs: &[f32], out: &mut [BlockQ8]) {
    quantize_row_q8_generic(xs, out)
}

#[inline(always)]
fn quantize_row_q8_generic(xs: &[f32], out: &mut [BlockQ8]) {
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        // llama.cpp stores d and s as f16; round through it to keep its numerics.
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
    }
}

/// Whether the AVX2 kernels can run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `R` consecutive weight rows (`row_bytes` apart) against `A` activation rows;
/// returns `[row][activation]`.
pub fn dot_tile<const R: usize, const A: usize>(
    kind: FastType,
    w: &[u8],
    row_bytes: usize,
    a: [&[BlockQ8]; A],
    simd: bool,
) -> [[f32; A]; R] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set when `simd_available()` found AVX2, FMA and F16C, and `w`
        // holds `R` rows of `row_bytes` (checked inside).
        return unsafe {
            match kind {
                FastType::Q4_1 => avx2::dot_q4_1::<R, A>(w, row_bytes, a),
                FastType::Q8_0 => avx2::dot_q8_0::<R, A>(w, row_bytes, a),
            }
        };
    }
    let _ = simd;
    std::array::from_fn(|r| {
        std::array::from_fn(|j| scalar_dot(kind, &w[r * row_bytes..(r + 1) * row_bytes], a[j]))
    })
}

#[allow(clippy::needless_range_loop)] // index loops mirror llama.cpp's reference code
fn scalar_dot(kind: FastType, w: &[u8], a: &[BlockQ8]) -> f32 {
    let half = |b: &[u8], i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
    let mut sum = 0f32;
    match kind {
        FastType::Q4_1 => {
            for (blk, act) in w.chunks_exact(Q4_1_BYTES).zip(a) {
                let qs = &blk[4..];
                let mut isum = 0i32;
                for j in 0..QK / 2 {
                    isum += (qs[j] & 0x0F) as i32 * act.qs[j] as i32
                        + (qs[j] >> 4) as i32 * act.qs[j + QK / 2] as i32;
                }
                sum += isum as f32 * half(blk, 0) * act.d + half(blk, 2) * act.s;
            }
        }
        FastType::Q8_0 => {
            for (blk, act) in w.chunks_exact(Q8_0_BYTES).zip(a) {
                let isum: i32 = blk[2..]
                    .iter()
                    .zip(&act.qs)
                    .map(|(&w, &x)| w as i8 as i32 * x as i32)
                    .sum();
                sum += isum as f32 * half(blk, 0) * act.d;
            }
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // tiles are indexed by row and activation
mod avx2 {
    use super::{BlockQ8, Q4_1_BYTES, Q8_0_BYTES};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    #[inline(always)]
    unsafe fn f16_pair(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
    }

    /// `R` Q4_1 rows against `A` Q8 activation rows: each weight block is unpacked once and
    /// used for every activation row. Returns `[row][activation]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1<const R: usize, const A: usize>(
        w: &[u8],
        row_bytes: usize,
        a: [&[BlockQ8]; A],
    ) -> [[f32; A]; R] {
        let nb = a[0].len().min(row_bytes / Q4_1_BYTES);
        assert!(w.len() >= R * row_bytes && a.iter().all(|x| x.len() >= nb));
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); A]; R];
        let mut mins = [[0f32; A]; R];
        let wp = w.as_ptr();
        for i in 0..nb {
            let mut qa = [_mm256_setzero_si256(); A];
            for j in 0..A {
                qa[j] = _mm256_load_si256(a[j].get_unchecked(i).qs.as_ptr() as *const __m256i);
            }
            for r in 0..R {
                let blk = wp.add(r * row_bytes + i * Q4_1_BYTES);
                let dm = f16_pair(blk);
                let d = _mm_cvtss_f32(dm);
                let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
                let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
                for j in 0..A {
                    let act = a[j].get_unchecked(i);
                    mins[r][j] += m * act.s;
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qa[j]), ones);
                    acc[r][j] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * act.d),
                        _mm256_cvtepi32_ps(p),
                        acc[r][j],
                    );
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|j| hsum(acc[r][j]) + mins[r][j]))
    }

    /// `R` Q8_0 rows against `A` Q8 activation rows. Returns `[row][activation]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0<const R: usize, const A: usize>(
        w: &[u8],
        row_bytes: usize,
        a: [&[BlockQ8]; A],
    ) -> [[f32; A]; R] {
        let nb = a[0].len().min(row_bytes / Q8_0_BYTES);
        assert!(w.len() >= R * row_bytes && a.iter().all(|x| x.len() >= nb));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); A]; R];
        let wp = w.as_ptr();
        for i in 0..nb {
            for r in 0..R {
                let blk = wp.add(r * row_bytes + i * Q8_0_BYTES);
                let d = _mm_cvtss_f32(f16_pair(blk));
                let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                // |w| * sign(w)·a: maddubs needs an unsigned left operand.
                let aw = _mm256_sign_epi8(qw, qw);
                for j in 0..A {
                    let act = a[j].get_unchecked(i);
                    let qa = _mm256_load_si256(act.qs.as_ptr() as *const __m256i);
                    let p =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qa, qw)), ones);
                    acc[r][j] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * act.d),
                        _mm256_cvtepi32_ps(p),
                        acc[r][j],
                    );
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|j| hsum(acc[r][j])))
    }
}
