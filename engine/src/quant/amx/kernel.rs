//! The AMX micro-kernel: 16 activation rows against 16 weight rows (a pair of panels), one
//! `tdpbssd`/`tdpbsud` per block of 32, whose exact integer sums are then scaled in AVX-512 as
//! the reference does: `acc = fma(d_w * d_a, isum, acc)` (and Q4_1's `acc = fma(m_w, s_a, acc)`).
//! Lane `c` of accumulator `i` is activation row `i` against weight row `c`, the output's own
//! layout.

#![allow(clippy::needless_range_loop)] // accumulators are indexed by activation row

use super::super::packed::{PackedMatrix, WeightKind, PANEL};
use super::tiles::{Tiles, ACCUMULATORS, B_BYTES, TILE};
use std::arch::x86_64::*;

/// A pair of panels prepared for the tiles: per block, the B tile and the 16 rows' scales
/// (`d`, and `m` for Q4_1) as f32.
#[derive(Default)]
pub struct Pair {
    pub b: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

impl Pair {
    /// Sizes the buffers for `nb` blocks.
    pub fn resize(&mut self, nb: usize) {
        self.b.resize(nb * B_BYTES, 0);
        self.d.resize(nb * TILE, 0.0);
        self.m.resize(nb * TILE, 0.0);
    }

    /// Panels `2q` and `2q + 1` of `w` (the second zero past the matrix): row `k` of block
    /// `b`'s B tile holds bytes `4k..4k+4` of weight rows 0..8, then of rows 8..16. A panel
    /// vector already holds 4 consecutive elements of each of its 8 rows, so each B half-row is
    /// one vector of the panel, its nibbles split for Q4_1.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub unsafe fn load(&mut self, w: &PackedMatrix, q: usize) {
        let (kind, nb, panels) = (w.kind(), w.blocks_per_row(), w.panels());
        let pb = kind.panel_block_bytes();
        let nibbles = _mm256_set1_epi8(0x0F);
        for (h, p) in [2 * q, 2 * q + 1].into_iter().enumerate() {
            let lanes = PANEL * h..PANEL * (h + 1);
            if p >= panels {
                for b in 0..nb {
                    let dst = &mut self.b[b * B_BYTES..(b + 1) * B_BYTES];
                    for k in 0..8 {
                        dst[k * 64 + 32 * h..k * 64 + 32 * h + 32].fill(0);
                    }
                    self.d[b * TILE..][lanes.clone()].fill(0.0);
                    self.m[b * TILE..][lanes.clone()].fill(0.0);
                }
                continue;
            }
            let panel = w.panel(p);
            assert!(panel.len() >= nb * pb && self.b.len() >= nb * B_BYTES);
            assert!(self.d.len() >= nb * TILE && self.m.len() >= nb * TILE);
            for b in 0..nb {
                // SAFETY (all pointer arithmetic below): block `b` of the panel has `pb`
                // bytes (checked above) and the B tile 512; lanes 8h..8h+8 lie in the block's
                // 16 scales.
                let blk = panel.as_ptr().add(b * pb);
                let dst = self.b.as_mut_ptr().add(b * B_BYTES + 32 * h);
                let d = self.d.as_mut_ptr().add(b * TILE + PANEL * h);
                match kind {
                    WeightKind::Q4_1 => {
                        // Panel vector k: elements 4k.. of each row in the low nibbles,
                        // 16 + 4k.. in the high ones.
                        for k in 0..4 {
                            let v = _mm256_loadu_si256(blk.add(32 * k).cast());
                            let lo = _mm256_and_si256(v, nibbles);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibbles);
                            _mm256_storeu_si256(dst.add(64 * k).cast(), lo);
                            _mm256_storeu_si256(dst.add(64 * (k + 4)).cast(), hi);
                        }
                        let m = self.m.as_mut_ptr().add(b * TILE + PANEL * h);
                        _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(blk.add(128).cast())));
                        _mm256_storeu_ps(m, _mm256_cvtph_ps(_mm_loadu_si128(blk.add(144).cast())));
                    }
                    WeightKind::Q8_0 => {
                        for k in 0..8 {
                            let v = _mm256_loadu_si256(blk.add(32 * k).cast());
                            _mm256_storeu_si256(dst.add(64 * k).cast(), v);
                        }
                        _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(blk.add(256).cast())));
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

/// Bytes of one activation tile: 16 rows of one block's 32 quants.
pub const A_BYTES: usize = TILE * 32;

/// One activation tile, rows side by side, on whole cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct ATile(pub [u8; A_BYTES]);

/// `acts` points at the tile's `nb` packed blocks ([`ATile`]s); returns
/// `[activation row][weight row]`.
///
/// # Safety
/// AVX-512F must be present and `tiles` ready; `acts` must hold `nb` [`ATile`]s, `w` and
/// `scales` `nb` blocks.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile16<T: Tiles>(
    tiles: &mut T,
    kind: WeightKind,
    w: &Pair,
    acts: *const ATile,
    nb: usize,
    scales: &ActScales,
) -> [[f32; TILE]; TILE] {
    debug_assert!(w.b.len() >= nb * B_BYTES && w.d.len() >= nb * TILE);
    debug_assert!(scales.d.len() >= nb * TILE && scales.s.len() >= nb * TILE);
    let q4_1 = kind == WeightKind::Q4_1;
    let mut sums = [Sums([0; TILE * TILE]), Sums([0; TILE * TILE])];
    // Block `b` goes into accumulator `b % 4` (operands `b % 2`), issued two blocks ahead: while
    // the float work on block `b` runs, the products of `b + 1` and `b + 2` compute, so that a
    // store does not wait on its product.
    let issue = |tiles: &mut T, b: usize| {
        let (c, s) = (b % ACCUMULATORS, b % 2);
        tiles.zero_c(c);
        tiles.load_a(s, (*acts.add(b)).0.as_ptr(), 32);
        tiles.load_b(s, w.b.as_ptr().add(b * B_BYTES));
        tiles.dot(c, q4_1);
    };
    let mut acc = [_mm512_setzero_ps(); TILE];
    for b in 0..nb.min(2) {
        issue(tiles, b);
    }
    // Iteration `b` stores block `b`'s sums and scales block `b - 1`'s, stored one iteration
    // earlier: loads right behind a tile store would wait for it to reach the cache.
    for b in 0..=nb {
        if b < nb {
            tiles.store_c(b % ACCUMULATORS, sums[b % 2].0.as_mut_ptr());
            // Operands `b % 2` are free: block b's product is done.
            if b + 2 < nb {
                issue(tiles, b + 2);
            }
        }
        let Some(b) = b.checked_sub(1) else {
            continue;
        };
        let isum = &sums[b % 2].0;
        let (sd, ss) = (
            &scales.d[b * TILE..(b + 1) * TILE],
            &scales.s[b * TILE..(b + 1) * TILE],
        );
        let wd = _mm512_loadu_ps(w.d.as_ptr().add(b * TILE));
        for i in 0..TILE {
            let scale = _mm512_mul_ps(wd, _mm512_set1_ps(sd[i]));
            let x = _mm512_cvtepi32_ps(_mm512_load_si512(isum.as_ptr().add(i * TILE).cast()));
            acc[i] = _mm512_fmadd_ps(scale, x, acc[i]);
        }
        if q4_1 {
            let wm = _mm512_loadu_ps(w.m.as_ptr().add(b * TILE));
            for i in 0..TILE {
                acc[i] = _mm512_fmadd_ps(wm, _mm512_set1_ps(ss[i]), acc[i]);
            }
        }
    }
    let mut out = [[0f32; TILE]; TILE];
    for i in 0..TILE {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}
