//! The AMX micro-kernel: 16 activation rows against 16 weight rows (a pair of panels), one
//! `tdpbssd`/`tdpbsud` per block of 32, whose exact integer sums are then scaled in AVX-512 as
//! the reference does: `acc = fma(d_w * d_a, isum, acc)` (and Q4_1's `acc = fma(m_w, s_a, acc)`).
//! Lane `c` of accumulator `i` is activation row `i` against weight row `c`, the output's own
//! layout.

#![allow(clippy::needless_range_loop)] // accumulators are indexed by activation row

use super::super::activation::BlockQ8;
use super::super::packed::WeightKind;
use super::tiles::{Tiles, B_BYTES, TILE};
use std::arch::x86_64::*;

/// A pair of panels prepared for the tiles: per block, the B tile and the 16 rows' scales
/// (`d`, and `m` for Q4_1) as f32.
pub struct Pair {
    pub b: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

/// One tile's activation scales per block: `d[b * 16 + i]` and `s[b * 16 + i]` of row `i`.
pub struct ActScales<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
}

#[repr(C, align(64))]
struct Sums([i32; TILE * TILE]);

/// `acts` points at block 0 of the tile's first row, rows `nb` blocks apart; returns
/// `[activation row][weight row]`.
///
/// # Safety
/// AVX-512F must be present and `tiles` ready; `acts` must hold 16 rows of `nb` blocks, `w`
/// and `scales` `nb` blocks.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile16<T: Tiles>(
    tiles: &mut T,
    kind: WeightKind,
    w: &Pair,
    acts: *const BlockQ8,
    nb: usize,
    scales: &ActScales,
) -> [[f32; TILE]; TILE] {
    debug_assert!(w.b.len() >= nb * B_BYTES && w.d.len() >= nb * TILE);
    debug_assert!(scales.d.len() >= nb * TILE && scales.s.len() >= nb * TILE);
    let q4_1 = kind == WeightKind::Q4_1;
    let stride = nb * std::mem::size_of::<BlockQ8>();
    let mut sums = [Sums([0; TILE * TILE]), Sums([0; TILE * TILE])];
    // Block `b` into set `b % 2`; issued one block ahead of the float work.
    let issue = |tiles: &mut T, sums: &mut [Sums; 2], b: usize| {
        let s = b % 2;
        tiles.zero_c(s);
        tiles.load_a(s, (*acts.add(b)).qs.as_ptr() as *const u8, stride);
        tiles.load_b(s, w.b.as_ptr().add(b * B_BYTES));
        tiles.dot(s, q4_1);
        tiles.store_c(s, sums[s].0.as_mut_ptr());
    };
    let mut acc = [_mm512_setzero_ps(); TILE];
    if nb > 0 {
        issue(tiles, &mut sums, 0);
    }
    for b in 0..nb {
        if b + 1 < nb {
            issue(tiles, &mut sums, b + 1);
        }
        let isum = &sums[b % 2].0;
        let wd = _mm512_loadu_ps(w.d.as_ptr().add(b * TILE));
        for i in 0..TILE {
            let scale = _mm512_mul_ps(wd, _mm512_set1_ps(scales.d[b * TILE + i]));
            let x = _mm512_cvtepi32_ps(_mm512_load_si512(isum.as_ptr().add(i * TILE).cast()));
            acc[i] = _mm512_fmadd_ps(scale, x, acc[i]);
        }
        if q4_1 {
            let wm = _mm512_loadu_ps(w.m.as_ptr().add(b * TILE));
            for i in 0..TILE {
                acc[i] = _mm512_fmadd_ps(wm, _mm512_set1_ps(scales.s[b * TILE + i]), acc[i]);
            }
        }
    }
    let mut out = [[0f32; TILE]; TILE];
    for i in 0..TILE {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}
