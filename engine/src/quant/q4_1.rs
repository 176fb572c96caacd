//! Q4_1 x Q8_1 dot products (llama.cpp's `ggml_vec_dot_q4_1_q8_1`), scalar and AVX2.

use half::f16;

/// Elements per block.
pub const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;

/// One block of 32 activations quantized to 8 bits, with `s = d * sum(qs)`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self { d: 0.0, s: 0.0, qs: [0; QK] }
    }
}

/// Quantizes a row of activations (length a multiple of 32) to Q8_1 blocks.
pub fn quantize_row_q8_1(xs: &[f32], out: &mut [BlockQ8_1]) {
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        // llama.cpp rounds d and s through f16; keep that so results match its numerics.
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
    }
}

/// Whether the AVX2 kernel can run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product of one Q4_1 weight row (raw bytes) with one Q8_1 activation row.
#[inline]
pub fn vec_dot(w: &[u8], a: &[BlockQ8_1], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when `simd_available()` confirmed AVX2, FMA and F16C.
        return unsafe { vec_dot_avx2(w, a) };
    }
    let _ = simd;
    vec_dot_scalar(w, a)
}

fn vec_dot_scalar(w: &[u8], a: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (blk, act) in w.chunks_exact(BLOCK_BYTES).zip(a) {
        let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
        let m = f16::from_bits(u16::from_le_bytes([blk[2], blk[3]])).to_f32();
        let qs = &blk[4..BLOCK_BYTES];
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += (qs[j] & 0x0F) as i32 * act.qs[j] as i32 + (qs[j] >> 4) as i32 * act.qs[j + QK / 2] as i32;
        }
        sum += isum as f32 * d * act.d + m * act.s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_avx2(w: &[u8], a: &[BlockQ8_1]) -> f32 {
    use std::arch::x86_64::*;
    let nb = a.len().min(w.len() / BLOCK_BYTES);
    let low_mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let wp = w.as_ptr();
    for i in 0..nb {
        let blk = wp.add(i * BLOCK_BYTES);
        let act = a.get_unchecked(i);
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(blk as *const i32)));
        let d = _mm_cvtss_f32(scales);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1));
        summs += m * act.s;
        // 16 bytes of nibbles -> 32 unsigned bytes: low nibbles then high nibbles.
        let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let nibbles = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let qw = _mm256_and_si256(nibbles, low_mask);
        let qa = _mm256_loadu_si256(act.qs.as_ptr() as *const __m256i);
        let prod16 = _mm256_maddubs_epi16(qw, qa);
        let prod32 = _mm256_madd_epi16(prod16, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * act.d), _mm256_cvtepi32_ps(prod32), acc);
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s4 = _mm_add_ps(hi, lo);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1) + summs
}
