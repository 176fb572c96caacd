//! The int8 GEMM driver: `out[m, n] = acts[m, k] · W[n, k]ᵀ` over a packed matrix.
//!
//! Work is split over the rayon pool by panels of output rows: one contiguous share per
//! thread that the others help finish ([`for_each_chunk`]), one synchronisation per matmul.
//! A thread walks each chunk of panels it takes once per block of [`ACT_CHUNK`] activation
//! rows: the block (a few tens of KB) stays in L2 while a panel (a few KB) is reused from L1
//! by every tile of [`MAX_ACTS`] activation rows, so at decode sizes the weights stream from
//! memory once per step for the whole batch.

use super::activation::BlockQ8;
#[cfg(target_arch = "x86_64")]
use super::amx;
use super::isa::Isa;
use super::microkernel::{has_pairs, tile, tile_pair, MAX_ACTS, PAIR_ACTS};
use super::packed::{PackedMatrix, WeightKind, PANEL};
use liftoff_kernels::shares::for_each_chunk;
use liftoff_kernels::DisjointOut;
use std::ops::Range;

/// Activation rows per cache block.
pub const ACT_CHUNK: usize = 64;

/// Weight bytes per chunk of panels at one tile of activation rows (see
/// [`for_each_chunk`]): a thread held up at a matmul's end leaves at most a few microseconds
/// of work, and taking a chunk (one atomic operation) costs under 1 % of it.
const CHUNK_BYTES: usize = 32 << 10;

/// `acts` holds `m` rows of `w.blocks_per_row()` blocks; returns `[m, n]` row-major.
///
/// Panics if this CPU lacks `isa`'s instructions (the kernels would be undefined behaviour).
pub fn gemm(w: &PackedMatrix, acts: &[BlockQ8], m: usize, isa: Isa) -> Vec<f32> {
    let (n, nb) = (w.n(), w.blocks_per_row());
    assert_eq!(acts.len(), m * nb, "activations do not hold {m} rows");
    assert!(isa.available(), "this CPU lacks the {} kernels", isa.name());
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && amx::worth_it(w.kind(), m) {
        // SAFETY: `Isa::Amx` is only chosen when `amx::tiles::usable()`; each task's tiles
        // are configured and released on its own thread.
        amx::gemm_into(w, acts, m, &mut out, || unsafe {
            amx::tiles::Amx::configure()
        });
        return out;
    }
    let panels = w.panels();
    let pairs = has_pairs(isa) && m >= PAIR_MIN_ROWS;
    // A chunk of panels is a few microseconds of work whatever the batch: about
    // [`CHUNK_BYTES`] of weights at one tile of activation rows, fewer panels for more rows;
    // whole pairs of panels when the kernels take two at once.
    let per_panel = w.panel(0).len() * m.div_ceil(MAX_ACTS);
    let mut chunk = (CHUNK_BYTES / per_panel.max(1)).max(1);
    if pairs {
        chunk = chunk.next_multiple_of(2);
    }
    let ptr = DisjointOut::new(&mut out);
    for_each_chunk(panels, chunk, |range| {
        for a0 in (0..m).step_by(ACT_CHUNK) {
            let a_end = (a0 + ACT_CHUNK).min(m);
            let mut p = range.start;
            while pairs && p + 1 < range.end {
                let col = p * PANEL;
                let cols = (2 * PANEL).min(n - col);
                pair_rows(isa, w, p, acts, a0..a_end, |a, vals| {
                    // SAFETY: `a < m` and `col + cols <= n`, so the write is inside `out`; no
                    // other chunk holds panels `p` and `p + 1`'s columns.
                    unsafe { store_row(ptr.at(a * n + col), vals, cols) }
                });
                p += 2;
            }
            for p in p..range.end {
                let col = p * PANEL;
                let cols = PANEL.min(n - col);
                panel_rows(isa, w, p, acts, a0..a_end, |a, vals| {
                    // SAFETY: as above, for panel `p`'s columns.
                    unsafe { store_row(ptr.at(a * n + col), vals, cols) }
                });
            }
        }
    });
    out
}

/// Activation rows from which the kernels take two panels at once where the CPU has them
/// ([`has_pairs`]). Below it the matmuls stream their weights from memory, and the two
/// panels' streams cost more than the work saved: a served step's Q4_1 matmuls on a Zen 4
/// (AVX-512 VNNI, 2 threads, `examples/step_matmuls.rs` alternated per step) took 10-26 %
/// longer with pairs at 4 rows, about the same at 6, 13-26 % less at 8 and 16-29 % less at 16
/// to 512 rows.
pub(super) const PAIR_MIN_ROWS: usize = 8;

/// Writes `vals[..cols]` to `dst`; a whole row of `W` values as one fixed-size copy, since a
/// `memcpy` call per tile row (hundreds of thousands per step) costs more than the copy. The
/// partial row (a matrix's last panel) is a function of its own: inlined, its variable-length
/// copy equals the whole-row copy when `cols == W`, and the compiler merged the two into one
/// `memcpy` call for every row.
///
/// # Safety
/// `cols <= W` values are writable at `dst`.
#[inline(always)]
pub(super) unsafe fn store_row<const W: usize>(dst: *mut f32, vals: &[f32; W], cols: usize) {
    if cols == W {
        dst.cast::<[f32; W]>().write_unaligned(*vals)
    } else {
        store_partial_row(dst, vals, cols)
    }
}

/// [`store_row`]'s partial row.
///
/// # Safety
/// As [`store_row`].
#[cold]
#[inline(never)]
unsafe fn store_partial_row<const W: usize>(dst: *mut f32, vals: &[f32; W], cols: usize) {
    std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, cols.min(W))
}

/// Whether tiles over `rows` activation rows ask for the next panel's weights: for a single
/// row only where [`crate::prefetch::single_row`] says so. On a Zen 4 a single row's tiles
/// stream the panels in order at a pace the hardware prefetcher keeps up with, so the
/// prefetches only cost issue slots. Chosen per served step in one process (a pseudo-random
/// half of the steps with them, Zen 4, AVX-512 VNNI, 2026-12-03), in ms per step with /
/// without: 1 row 5.71 / 5.45 (and 5.20 / 5.00, 5.38 / 5.15 in single-stream decodes), 2 rows
/// 5.77 / 5.95, 4 rows 8.52 / 8.60, 7 rows 9.56 / 11.51.
fn prefetch_panels(rows: usize) -> bool {
    rows > 1 || crate::prefetch::single_row()
}

/// Activation rows `rows` against panels `p` and `p + 1` in tiles of up to [`PAIR_ACTS`]
/// rows; `store(a, values)` gets row `a`'s `2 * PANEL` outputs. `isa` must have two-panel
/// kernels ([`has_pairs`]) for this to be worth it.
pub(super) fn pair_rows(
    isa: Isa,
    w: &PackedMatrix,
    p: usize,
    acts: &[BlockQ8],
    rows: Range<usize>,
    store: impl Fn(usize, &[f32; 2 * PANEL]),
) {
    let pair = PanelPair {
        isa,
        kind: w.kind(),
        p0: w.panel(p),
        p1: w.panel(p + 1),
        nb: w.blocks_per_row(),
        acts,
        prefetch: prefetch_panels(rows.len()),
    };
    let mut a = rows.start;
    while a + PAIR_ACTS <= rows.end {
        pair.tile::<PAIR_ACTS>(a, &store);
        a += PAIR_ACTS;
    }
    if a + 4 <= rows.end {
        pair.tile::<4>(a, &store);
        a += 4;
    }
    match rows.end - a {
        3 => pair.tile::<3>(a, &store),
        2 => pair.tile::<2>(a, &store),
        1 => pair.tile::<1>(a, &store),
        _ => {}
    }
}

/// Two panels and the activations, for [`pair_rows`]' tiles.
struct PanelPair<'a> {
    isa: Isa,
    kind: WeightKind,
    p0: &'a [u8],
    p1: &'a [u8],
    nb: usize,
    acts: &'a [BlockQ8],
    prefetch: bool,
}

impl PanelPair<'_> {
    /// Activation rows `a..a + A`.
    #[inline]
    fn tile<const A: usize>(&self, a: usize, store: &impl Fn(usize, &[f32; 2 * PANEL])) {
        let nb = self.nb;
        let rows = std::array::from_fn(|j| &self.acts[(a + j) * nb..(a + j + 1) * nb]);
        let r = tile_pair::<A>(
            self.isa,
            self.kind,
            self.p0,
            self.p1,
            nb,
            rows,
            self.prefetch,
        );
        r.iter().enumerate().for_each(|(j, v)| store(a + j, v));
    }
}

/// Activation rows `rows` against panel `p` in tiles of up to [`MAX_ACTS`] rows;
/// `store(a, values)` gets row `a`'s [`PANEL`] outputs.
pub(super) fn panel_rows(
    isa: Isa,
    w: &PackedMatrix,
    p: usize,
    acts: &[BlockQ8],
    rows: Range<usize>,
    store: impl Fn(usize, &[f32; PANEL]),
) {
    let (panel, nb, kind) = (w.panel(p), w.blocks_per_row(), w.kind());
    let row = |a: usize| &acts[a * nb..(a + 1) * nb];
    let prefetch = prefetch_panels(rows.len());
    let mut a = rows.start;
    while a + MAX_ACTS <= rows.end {
        let r = tile::<4>(
            isa,
            kind,
            panel,
            nb,
            [row(a), row(a + 1), row(a + 2), row(a + 3)],
            prefetch,
        );
        r.iter().enumerate().for_each(|(j, v)| store(a + j, v));
        a += MAX_ACTS;
    }
    match rows.end - a {
        3 => {
            let r = tile::<3>(
                isa,
                kind,
                panel,
                nb,
                [row(a), row(a + 1), row(a + 2)],
                prefetch,
            );
            r.iter().enumerate().for_each(|(j, v)| store(a + j, v));
        }
        2 => {
            let r = tile::<2>(isa, kind, panel, nb, [row(a), row(a + 1)], prefetch);
            r.iter().enumerate().for_each(|(j, v)| store(a + j, v));
        }
        1 => store(a, &tile::<1>(isa, kind, panel, nb, [row(a)], prefetch)[0]),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::activation::{quantize_rows, QK};
    use super::super::packed::{WeightKind, Q4_1_BYTES, Q8_0_BYTES};
    use super::super::reference::reference_dot;
    use super::*;
    use half::f16;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn f(&mut self) -> f32 {
            (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
    }

    /// How a generated matrix's bytes look.
    #[derive(Clone, Copy, Debug)]
    enum Fill {
        Random,
        /// Extreme integers: nibbles 15 / bytes ±127 and -128, large scales.
        Extreme,
        /// Zero scales on every other block.
        ZeroScales,
        /// Every row the same.
        EqualRows,
    }

    fn ggml_matrix(kind: WeightKind, n: usize, k: usize, fill: Fill, rng: &mut Rng) -> Vec<u8> {
        let gb = kind.ggml_block_bytes();
        let nb = k / QK;
        let mut first_row = Vec::new();
        let mut data = Vec::with_capacity(n * nb * gb);
        for row in 0..n {
            if matches!(fill, Fill::EqualRows) && row > 0 {
                data.extend_from_slice(&first_row);
                continue;
            }
            let start = data.len();
            for b in 0..nb {
                let zero = matches!(fill, Fill::ZeroScales) && b % 2 == 1;
                let extreme = matches!(fill, Fill::Extreme);
                let scale = |rng: &mut Rng| {
                    if zero {
                        0.0
                    } else if extreme {
                        if rng.next().is_multiple_of(2) {
                            60000.0
                        } else {
                            -60000.0
                        }
                    } else {
                        rng.f() * 0.05
                    }
                };
                let d = f16::from_f32(scale(rng)).to_bits().to_le_bytes();
                data.extend_from_slice(&d);
                match kind {
                    WeightKind::Q4_1 => {
                        let m = f16::from_f32(scale(rng)).to_bits().to_le_bytes();
                        data.extend_from_slice(&m);
                        for _ in 0..16 {
                            data.push(if extreme { 0xFF } else { rng.next() as u8 });
                        }
                    }
                    WeightKind::Q8_0 => {
                        for i in 0..32 {
                            let v = if extreme {
                                [127i8, -127, -128][(i + b) % 3]
                            } else {
                                rng.next() as i8
                            };
                            data.push(v as u8);
                        }
                    }
                }
            }
            if row == 0 {
                first_row = data[start..].to_vec();
            }
        }
        assert_eq!(data.len(), n * nb * gb);
        data
    }

    fn activations(m: usize, k: usize, fill: Fill, rng: &mut Rng) -> Vec<f32> {
        (0..m * k)
            .map(|i| match fill {
                // Every block's extreme value maps to ±127.
                Fill::Extreme => {
                    if i % 3 == 0 {
                        -3.0
                    } else {
                        3.0
                    }
                }
                Fill::ZeroScales if (i / QK) % 3 == 1 => 0.0,
                _ => rng.f() * 4.0,
            })
            .collect()
    }

    fn check(kind: WeightKind, n: usize, k: usize, m: usize, fill: Fill, isa: Isa, seed: u64) {
        check_with(kind, n, k, m, fill, isa.name(), seed, |w, acts, m| {
            gemm(w, acts, m, isa)
        })
    }

    /// `run`'s output against the reference, for a generated matrix and activations.
    #[allow(clippy::too_many_arguments)]
    fn check_with(
        kind: WeightKind,
        n: usize,
        k: usize,
        m: usize,
        fill: Fill,
        name: &str,
        seed: u64,
        run: impl Fn(&PackedMatrix, &[BlockQ8], usize) -> Vec<f32>,
    ) {
        let mut rng = Rng(seed);
        let ggml = ggml_matrix(kind, n, k, fill, &mut rng);
        let packed = PackedMatrix::pack(kind, &ggml, n, k);
        let acts = quantize_rows(&activations(m, k, fill, &mut rng), k);
        let out = run(&packed, &acts, m);
        let (nb, gb) = (k / QK, kind.ggml_block_bytes());
        let mut nonzero = 0;
        for a in 0..m {
            for r in 0..n {
                let want = reference_dot(
                    kind,
                    &ggml[r * nb * gb..(r + 1) * nb * gb],
                    &acts[a * nb..(a + 1) * nb],
                );
                let got = out[a * n + r];
                assert!(
                    want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                    "{kind:?} {name} {fill:?} n={n} k={k} m={m}: out[{a}][{r}] = {got:e}, reference {want:e}"
                );
                nonzero += (got != 0.0) as usize;
            }
        }
        // Guards against comparing two all-zero outputs.
        assert!(
            nonzero > m * n / 4,
            "{kind:?} {fill:?}: only {nonzero} nonzero outputs"
        );
    }

    /// Shapes: one panel, odd rows, odd panel counts (a pair with one panel), and activation
    /// row counts below, at and around whole AMX tiles, chunks and tiles of two-panel kernels
    /// (8 + 3 rows; one panel with enough rows for pairs; pairs whose second panel is partial;
    /// 11 rows left after a whole AMX tile).
    const SHAPES: [(usize, usize, usize); 13] = [
        (8, 32, 1),
        (13, 64, 3),
        (40, 96, 5),
        (40, 96, 11),
        (8, 64, 9),
        (12, 64, 9),
        (28, 96, 16),
        (40, 64, 27),
        (130, 256, 7),
        (64, 576, 70),
        (24, 64, 16),
        (130, 128, 37),
        (17, 64, 131),
    ];

    /// Every kind of generated input.
    const FILLS: [Fill; 4] = [
        Fill::Random,
        Fill::Extreme,
        Fill::ZeroScales,
        Fill::EqualRows,
    ];

    /// Every family this CPU has, against the reference; prints the ones it lacks.
    fn for_each_isa(f: impl Fn(Isa)) {
        for isa in Isa::ALL {
            if isa.available() {
                f(isa);
            } else {
                println!(
                    "skipped: the {} kernels (this CPU lacks the instructions)",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn every_kernel_equals_the_reference_bit_for_bit() {
        for_each_isa(|isa| {
            for kind in [WeightKind::Q4_1, WeightKind::Q8_0] {
                for (i, &(n, k, m)) in SHAPES.iter().enumerate() {
                    for fill in FILLS {
                        check(kind, n, k, m, fill, isa, 7 + i as u64);
                    }
                }
            }
        });
    }

    /// The AMX GEMM for both weight kinds and every shape, whichever `gemm` would dispatch to
    /// it (Q8_0 from 64 rows, [`amx::worth_it`]): on a model of the tile instructions, so that
    /// its layouts (B tiles from panel pairs, packed activation tiles, the scaling of each
    /// block's sums) are checked on CPUs without AMX, and on the tiles themselves where the CPU
    /// has them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_amx_gemm_equals_the_reference_for_both_kinds() {
        use super::super::amx::{gemm_into, tiles};
        if !Isa::Avx512Vnni.available() {
            println!("skipped: the AMX GEMM on the instruction model (this CPU lacks AVX-512)");
            return;
        }
        let hardware = tiles::usable();
        if !hardware {
            println!("skipped: the AMX GEMM on the tiles (this CPU lacks AMX)");
        }
        /// The GEMM with tiles made by `new` on each task's thread.
        fn on<T: tiles::Tiles>(
            new: impl Fn() -> T + Sync + Copy,
        ) -> impl Fn(&PackedMatrix, &[BlockQ8], usize) -> Vec<f32> {
            move |w, acts, m| {
                let mut out = vec![0f32; m * w.n()];
                gemm_into(w, acts, m, &mut out, new);
                out
            }
        }
        for kind in [WeightKind::Q4_1, WeightKind::Q8_0] {
            for (i, &(n, k, m)) in SHAPES.iter().enumerate() {
                let seed = 7 + i as u64;
                for fill in FILLS {
                    check_with(
                        kind,
                        n,
                        k,
                        m,
                        fill,
                        "amx model",
                        seed,
                        on(tiles::Model::new),
                    );
                    if hardware {
                        // SAFETY: `usable()` said the process may use the tiles; each task
                        // configures its own.
                        let new = || unsafe { tiles::Amx::configure() };
                        check_with(kind, n, k, m, fill, "amx tiles", seed, on(new));
                    }
                }
            }
        }
    }

    #[test]
    fn nan_and_infinite_scales_propagate() {
        // A NaN scale in the file must show up as NaN, not be hidden by the kernels.
        for_each_isa(|isa| {
            let kind = WeightKind::Q8_0;
            let (n, k) = (8, 64);
            let mut ggml = ggml_matrix(kind, n, k, Fill::Random, &mut Rng(3));
            ggml[0..2].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
            let packed = PackedMatrix::pack(kind, &ggml, n, k);
            let acts = quantize_rows(&activations(1, k, Fill::Random, &mut Rng(4)), k);
            let out = gemm(&packed, &acts, 1, isa);
            assert!(out[0].is_nan(), "{}: {}", isa.name(), out[0]);
            assert!(out[1..].iter().all(|v| v.is_finite()));
        });
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(WeightKind::Q4_1.ggml_block_bytes(), Q4_1_BYTES);
        assert_eq!(WeightKind::Q8_0.ggml_block_bytes(), Q8_0_BYTES);
        assert_eq!(WeightKind::Q4_1.panel_block_bytes(), PANEL * Q4_1_BYTES);
    }
}
