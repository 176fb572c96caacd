//! x86 micro-kernels. Lane `r` of every 256-bit vector belongs to weight row `r`; four
//! activation bytes are broadcast to all lanes, so each lane accumulates its row's exact integer
//! dot product for the block, then the float step `acc = fma(d_w * d_a, isum, acc)` runs on
//! 8 rows at once with the reference's rounding.
//!
//! Integer ranges (activations are within ±127, see `quantize_row_q8`):
//! - Q4_1 with `vpmaddubsw`: a 16-bit lane sums 2 products of a nibble (≤ 15) and an
//!   activation, ≤ 3810; eight of them (one block) ≤ 30480, so 16-bit sums never saturate.
//! - Q8_0 with `vpmaddubsw`: |w| ≤ 128 against sign-adjusted activations, 2 products ≤ 32512,
//!   widened to 32 bits at every step.
//! - `vpdpbusd` sums in 32 bits; Q8_0 weights are made unsigned as `w + 128` (xor 0x80) and
//!   `128 * sum(a)` is subtracted per block.

#![allow(clippy::needless_range_loop)] // tiles are indexed by activation row

use super::super::activation::BlockQ8;
use super::super::packed::PANEL;
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn bcast4(a: *const BlockQ8, byte: usize) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(
        (*a).qs.as_ptr().add(byte) as *const i32
    ))
}

#[inline(always)]
unsafe fn scales(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[inline(always)]
unsafe fn finish<const A: usize>(acc: [__m256; A]) -> [[f32; PANEL]; A] {
    let mut out = [[0f32; PANEL]; A];
    for j in 0..A {
        _mm256_storeu_ps(out[j].as_mut_ptr(), acc[j]);
    }
    out
}

/// Adds one block's contribution for every activation row.
#[inline(always)]
unsafe fn accumulate<const A: usize>(
    acc: &mut [__m256; A],
    isum: [__m256i; A],
    d: __m256,
    acts: [*const BlockQ8; A],
) {
    for j in 0..A {
        let scale = _mm256_mul_ps(d, _mm256_set1_ps((*acts[j]).d));
        acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[j]), acc[j]);
    }
}

/// Block `b` of each activation row. (A loop, not `array::map`: a closure would be compiled
/// without the kernels' target features and called, not inlined.)
#[inline(always)]
pub(super) unsafe fn offset<const A: usize>(
    acts: [*const BlockQ8; A],
    b: usize,
) -> [*const BlockQ8; A] {
    let mut a = acts;
    for p in a.iter_mut() {
        *p = p.add(b);
    }
    a
}

/// Asks for the same block of the next panel, which follows this panel in memory, to be
/// brought into L1 (`BYTES` bytes from `blk + panel_bytes`; past the matrix's end the
/// addresses are never read). Otherwise the first tile of each panel waits for its weights
/// from memory, which the hardware prefetcher does not fetch early enough while the other tiles
/// compute: on a served step's matmuls (`examples/step_matmuls.rs`, 12 rows, medians of 5) the
/// AVX2 Q4_1 projections went from 11.8 to 9.1 ms and the LM head from 4.2 to 3.5 ms. Asked
/// for by the caller, which does not for a single activation row (`gemm::prefetch_panels`).
#[inline(always)]
pub(super) unsafe fn prefetch_next<const BYTES: usize>(blk: *const u8, panel_bytes: usize) {
    let next = blk.wrapping_add(panel_bytes) as *const i8;
    let mut off = 0;
    while off < BYTES {
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(off));
        off += 64;
    }
}

/// Q4_1's min term, `acc = fma(m_w, s_a, acc)`.
#[inline(always)]
unsafe fn add_min<const A: usize>(acc: &mut [__m256; A], m: __m256, acts: [*const BlockQ8; A]) {
    for j in 0..A {
        acc[j] = _mm256_fmadd_ps(m, _mm256_set1_ps((*acts[j]).s), acc[j]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_1_avx2<const A: usize>(
    panel: *const u8,
    nb: usize,
    acts: [*const BlockQ8; A],
    prefetch: bool,
) -> [[f32; PANEL]; A] {
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..nb {
        let blk = panel.add(b * 160);
        if prefetch {
            prefetch_next::<160>(blk, nb * 160);
        }
        let a = offset(acts, b);
        let mut s16 = [_mm256_setzero_si256(); A];
        for q in 0..4 {
            let raw = _mm256_loadu_si256(blk.add(q * 32) as *const __m256i);
            let lo = _mm256_and_si256(raw, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            for j in 0..A {
                let x = _mm256_maddubs_epi16(lo, bcast4(a[j], 4 * q));
                let y = _mm256_maddubs_epi16(hi, bcast4(a[j], 16 + 4 * q));
                s16[j] = _mm256_add_epi16(s16[j], _mm256_add_epi16(x, y));
            }
        }
        let mut isum = [_mm256_setzero_si256(); A];
        for (i, s) in isum.iter_mut().zip(s16) {
            *i = _mm256_madd_epi16(s, ones);
        }
        accumulate(&mut acc, isum, scales(blk.add(128)), a);
        add_min(&mut acc, scales(blk.add(144)), a);
    }
    finish(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_avx2<const A: usize>(
    panel: *const u8,
    nb: usize,
    acts: [*const BlockQ8; A],
    prefetch: bool,
) -> [[f32; PANEL]; A] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..nb {
        let blk = panel.add(b * 272);
        if prefetch {
            prefetch_next::<272>(blk, nb * 272);
        }
        let a = offset(acts, b);
        let mut isum = [_mm256_setzero_si256(); A];
        for g in 0..8 {
            let w = _mm256_loadu_si256(blk.add(g * 32) as *const __m256i);
            let aw = _mm256_sign_epi8(w, w);
            for j in 0..A {
                let x = _mm256_sign_epi8(bcast4(a[j], 4 * g), w);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x), ones);
                isum[j] = _mm256_add_epi32(isum[j], p);
            }
        }
        accumulate(&mut acc, isum, scales(blk.add(256)), a);
    }
    finish(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4_1_vnni<const A: usize>(
    panel: *const u8,
    nb: usize,
    acts: [*const BlockQ8; A],
    prefetch: bool,
) -> [[f32; PANEL]; A] {
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..nb {
        let blk = panel.add(b * 160);
        if prefetch {
            prefetch_next::<160>(blk, nb * 160);
        }
        let a = offset(acts, b);
        let mut isum = [_mm256_setzero_si256(); A];
        for q in 0..4 {
            let raw = _mm256_loadu_si256(blk.add(q * 32) as *const __m256i);
            let lo = _mm256_and_si256(raw, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            for j in 0..A {
                isum[j] = _mm256_dpbusd_epi32(isum[j], lo, bcast4(a[j], 4 * q));
                isum[j] = _mm256_dpbusd_epi32(isum[j], hi, bcast4(a[j], 16 + 4 * q));
            }
        }
        accumulate(&mut acc, isum, scales(blk.add(128)), a);
        add_min(&mut acc, scales(blk.add(144)), a);
    }
    finish(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q8_0_vnni<const A: usize>(
    panel: *const u8,
    nb: usize,
    acts: [*const BlockQ8; A],
    prefetch: bool,
) -> [[f32; PANEL]; A] {
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..nb {
        let blk = panel.add(b * 272);
        if prefetch {
            prefetch_next::<272>(blk, nb * 272);
        }
        let a = offset(acts, b);
        let mut isum = [_mm256_setzero_si256(); A];
        for g in 0..8 {
            let u = _mm256_xor_si256(_mm256_loadu_si256(blk.add(g * 32) as *const __m256i), flip);
            for j in 0..A {
                isum[j] = _mm256_dpbusd_epi32(isum[j], u, bcast4(a[j], 4 * g));
            }
        }
        for j in 0..A {
            let offset = _mm256_set1_epi32((*a[j]).sum << 7);
            isum[j] = _mm256_sub_epi32(isum[j], offset);
        }
        accumulate(&mut acc, isum, scales(blk.add(256)), a);
    }
    finish(acc)
}
