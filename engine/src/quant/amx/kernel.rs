//! The AMX micro-kernel: 16 activation rows against 16 weight rows (a pair of panels), one
//! `tdpbssd`/`tdpbsud` per block of 32, whose exact integer sums are then scaled in AVX-512 as
//! the reference does: `acc = fma(d_w * d_a, isum, acc)` (and Q4_1's `acc = fma(m_w, s_a, acc)`).
//! Lane `c` of accumulator `i` is activation row `i` against weight row `c`, the output's own
//! layout.

#![allow(clippy::needless_range_loop)] // accumulators are indexed by activation row

use super::super::activation::BlockQ8;
use super::super::packed::{PackedMatrix, WeightKind, PANEL};
use super::tiles::{Tiles, B_BYTES, TILE};
use half::f16;
use std::arch::x86_64::*;

/// A pair of panels prepared for the tiles: per block, the B tile and the 16 rows' scales
/// (`d`, and `m` for Q4_1) as f32.
pub struct Pair {
    pub b: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

impl Pair {
    /// Buffers for `nb` blocks.
    pub fn new(nb: usize) -> Self {
        Self {
            b: vec![0; nb * B_BYTES],
            d: vec![0.0; nb * TILE],
            m: vec![0.0; nb * TILE],
        }
    }

    /// Panels `2q` and `2q + 1` of `w` (the second zero past the matrix): row `k` of block
    /// `b`'s B tile holds bytes `4k..4k+4` of weight rows 0..8, then of rows 8..16.
    pub fn load(&mut self, w: &PackedMatrix, q: usize) {
        let (kind, nb, panels) = (w.kind(), w.blocks_per_row(), w.panels());
        let pb = kind.panel_block_bytes();
        let half =
            |b: &[u8], i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
        for (h, p) in [2 * q, 2 * q + 1].into_iter().enumerate() {
            let lanes = PANEL * h..PANEL * (h + 1);
            for b in 0..nb {
                let dst = &mut self.b[b * B_BYTES..(b + 1) * B_BYTES];
                let (d, mins) = (&mut self.d[b * TILE..], &mut self.m[b * TILE..]);
                if p >= panels {
                    for k in 0..8 {
                        dst[k * 64 + 32 * h..k * 64 + 32 * h + 32].fill(0);
                    }
                    d[lanes.clone()].fill(0.0);
                    mins[lanes.clone()].fill(0.0);
                    continue;
                }
                let blk = &w.panel(p)[b * pb..(b + 1) * pb];
                for r in 0..PANEL {
                    match kind {
                        WeightKind::Q4_1 => {
                            d[PANEL * h + r] = half(blk, 128 + 2 * r);
                            mins[PANEL * h + r] = half(blk, 144 + 2 * r);
                        }
                        WeightKind::Q8_0 => d[PANEL * h + r] = half(blk, 256 + 2 * r),
                    }
                }
                for k in 0..8 {
                    let row = &mut dst[k * 64 + 32 * h..k * 64 + 32 * h + 32];
                    match kind {
                        // Panel vector q: elements 4q.. in low nibbles, 16 + 4q.. high.
                        WeightKind::Q4_1 => {
                            let v = &blk[(k % 4) * 32..(k % 4) * 32 + 32];
                            let shift = if k < 4 { 0 } else { 4 };
                            for (o, &x) in row.iter_mut().zip(v) {
                                *o = (x >> shift) & 0x0F;
                            }
                        }
                        WeightKind::Q8_0 => row.copy_from_slice(&blk[k * 32..k * 32 + 32]),
                    }
                }
            }
        }
    }
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
