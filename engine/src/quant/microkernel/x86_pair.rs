//! AVX-512 VNNI micro-kernels over two adjacent panels at once: 16 weight rows in the lanes of
//! one 512-bit vector (the first panel's 8 rows in the low half, the second's in the high
//! half), against up to [`PAIR_ACTS`](super::PAIR_ACTS) activation rows.
//!
//! The arithmetic per lane is that of the 256-bit kernels in `x86` (exact 32-bit block sums,
//! then `acc = fma(d_w * d_a, isum, acc)` and Q4_1's `acc = fma(m_w, s_a, acc)`), so every
//! output equals the reference bit for bit. What changes is the work per multiply-add: each
//! broadcast activation word and each `vpdpbusd` serves 16 rows instead of 8, and a tile of 8
//! activation rows unpacks each weight vector once for 8 rows instead of 4. With 8 or more
//! activation rows the matmuls are bound by those instructions, not by memory: a served step's
//! Q4_1 matmuls at 16 rows went from 9.4-10.6 to 7.1-7.6 ms on a 2-core Zen 4
//! (`examples/step_matmuls.rs`; see docs/benchmarks.md, "Two panels at once").

#![allow(clippy::needless_range_loop)] // tiles are indexed by activation row

use super::super::activation::BlockQ8;
use super::super::packed::PANEL;
use super::x86::{offset, prefetch_next};
use std::arch::x86_64::*;

/// The 32-byte vector at `off` of both panels' block, as one 512-bit vector.
#[inline(always)]
unsafe fn both(b0: *const u8, b1: *const u8, off: usize) -> __m512i {
    let lo = _mm256_loadu_si256(b0.add(off) as *const __m256i);
    let hi = _mm256_loadu_si256(b1.add(off) as *const __m256i);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Both panels' 8 f16 scales at `off`, as 16 floats.
#[inline(always)]
unsafe fn scales(b0: *const u8, b1: *const u8, off: usize) -> __m512 {
    let lo = _mm_loadu_si128(b0.add(off) as *const __m128i);
    let hi = _mm_loadu_si128(b1.add(off) as *const __m128i);
    _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
}

/// Four activation bytes of `a` at `byte`, in every 32-bit lane.
#[inline(always)]
unsafe fn bcast4(a: *const BlockQ8, byte: usize) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(
        (*a).qs.as_ptr().add(byte) as *const i32
    ))
}

/// Asks for the same block of the next pair of panels (`BYTES` bytes of each), which follows
/// this pair in memory when `p1` directly follows `p0` (as `gemm` pairs them; otherwise the
/// prefetch is only wasted); past the matrix's end the addresses are never read.
#[inline(always)]
unsafe fn prefetch_next_pair<const BYTES: usize>(b0: *const u8, panel_bytes: usize) {
    prefetch_next::<BYTES>(b0, 2 * panel_bytes);
    prefetch_next::<BYTES>(b0, 3 * panel_bytes);
}

/// Adds one block's contribution for every activation row.
#[inline(always)]
unsafe fn accumulate<const A: usize>(
    acc: &mut [__m512; A],
    isum: [__m512i; A],
    d: __m512,
    acts: [*const BlockQ8; A],
) {
    for j in 0..A {
        let scale = _mm512_mul_ps(d, _mm512_set1_ps((*acts[j]).d));
        acc[j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum[j]), acc[j]);
    }
}

/// The accumulators as `[activation][row]`, `p0`'s rows first.
#[inline(always)]
unsafe fn finish<const A: usize>(acc: [__m512; A]) -> [[f32; 2 * PANEL]; A] {
    let mut out = [[0f32; 2 * PANEL]; A];
    for j in 0..A {
        _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
    }
    out
}

/// Q4_1 panels `p0` and `p1` (`nb` blocks each) against `A` activation rows.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI and F16C; both panels hold `nb` Q4_1 panel blocks and
/// each activation row `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4_1<const A: usize>(
    p0: *const u8,
    p1: *const u8,
    nb: usize,
    acts: [*const BlockQ8; A],
    prefetch: bool,
) -> [[f32; 2 * PANEL]; A] {
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let (b0, b1) = (p0.add(b * 160), p1.add(b * 160));
        if prefetch {
            prefetch_next_pair::<160>(b0, nb * 160);
        }
        let a = offset(acts, b);
        let mut isum = [_mm512_setzero_si512(); A];
        for q in 0..4 {
            let raw = both(b0, b1, q * 32);
            let lo = _mm512_and_si512(raw, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            for j in 0..A {
                isum[j] = _mm512_dpbusd_epi32(isum[j], lo, bcast4(a[j], 4 * q));
                isum[j] = _mm512_dpbusd_epi32(isum[j], hi, bcast4(a[j], 16 + 4 * q));
            }
        }
        accumulate(&mut acc, isum, scales(b0, b1, 128), a);
        let m = scales(b0, b1, 144);
        for j in 0..A {
            acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps((*a[j]).s), acc[j]);
        }
    }
    finish(acc)
}

/// Q8_0 panels `p0` and `p1` (`nb` blocks each) against `A` activation rows. The weights are
/// made unsigned as `w + 128` and `128 * sum(a)` is subtracted per block, as in `x86`.
///
/// # Safety
/// As for [`q4_1`], with Q8_0 panel blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q8_0<const A: usize>(
    p0: *const u8,
    p1: *const u8,
    nb: usize,
    acts: [*const BlockQ8; A],
    prefetch: bool,
) -> [[f32; 2 * PANEL]; A] {
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let (b0, b1) = (p0.add(b * 272), p1.add(b * 272));
        if prefetch {
            prefetch_next_pair::<272>(b0, nb * 272);
        }
        let a = offset(acts, b);
        let mut isum = [_mm512_setzero_si512(); A];
        for g in 0..8 {
            let u = _mm512_xor_si512(both(b0, b1, g * 32), flip);
            for j in 0..A {
                isum[j] = _mm512_dpbusd_epi32(isum[j], u, bcast4(a[j], 4 * g));
            }
        }
        for j in 0..A {
            isum[j] = _mm512_sub_epi32(isum[j], _mm512_set1_epi32((*a[j]).sum << 7));
        }
        accumulate(&mut acc, isum, scales(b0, b1, 256), a);
    }
    finish(acc)
}
