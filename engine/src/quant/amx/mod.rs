//! The int8 GEMM on AMX tiles (Intel Sapphire Rapids and later), for the rows of a matmul
//! that fill whole tiles of 16 activation rows; the rest go through the AVX-512 VNNI
//! micro-kernels. Weights keep the panel layout the other families read: each thread turns a
//! pair of 8-row panels into B tiles (nibbles unpacked) once per chunk of activation rows and
//! reuses them for every tile of the chunk. Equal to the integer reference bit for bit, as
//! every family is.

#[cfg(target_arch = "x86_64")]
mod kernel;
pub mod tiles;

use super::activation::BlockQ8;
use super::packed::{PackedMatrix, WeightKind};

/// Whether the AMX GEMM is used for `m` activation rows of a `kind` matrix: where it was
/// measured faster than the AVX-512 VNNI kernels. On a Xeon with AMX (2 threads,
/// `examples/step_matmuls.rs --vs avx512vnni`, alternated step by step) the Q8_0 LM head took
/// 3.6 against 3.5 ms at 32 rows and 4.6 against 5.1 at 48 (a version before the last), then
/// 5.5 against 6.4 at 64, 14.8 against 15.5 at 128 and 49-51 against 65 at 512. Q4_1 never
/// gained: its nibbles must be unpacked into B tiles, which the VNNI kernels do in registers,
/// and its projections took 11.3 against 5.2 ms at 16 rows, 45.9 against 39.6 at 128 and
/// 157 against 159 at 512.
pub fn worth_it(kind: WeightKind, m: usize) -> bool {
    kind == WeightKind::Q8_0 && m >= 64
}

/// A thread's buffers for [`gemm_into`].
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Scratch {
    pair: kernel::Pair,
    ad: Vec<f32>,
    as_: Vec<f32>,
    packed: Vec<kernel::ATile>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Computes `out[m, n]` (row-major) with tiles made by `new_tiles` on each task's thread.
#[cfg(target_arch = "x86_64")]
pub fn gemm_into<T: tiles::Tiles>(
    w: &PackedMatrix,
    acts: &[BlockQ8],
    m: usize,
    out: &mut [f32],
    new_tiles: impl Fn() -> T + Sync,
) {
    use super::gemm::{pair_rows, panel_rows, store_row, PAIR_MIN_ROWS};
    use super::isa::Isa;
    use super::packed::PANEL;
    use kernel::{ATile, ActScales, A_BYTES};
    use liftoff_kernels::DisjointOut;
    use rayon::prelude::*;
    use tiles::TILE;

    /// Activation rows per chunk: 8 tiles, a few hundred KB at most, kept in L2 while the
    /// thread's panel pairs go by.
    const CHUNK: usize = 128;

    let (n, nb, kind) = (w.n(), w.blocks_per_row(), w.kind());
    assert_eq!(acts.len(), m * nb, "activations do not hold {m} rows");
    assert_eq!(out.len(), m * n);
    assert!(Isa::Avx512Vnni.available(), "the AMX GEMM needs AVX-512");
    let panels = w.panels();
    let pairs = panels.div_ceil(2);
    if m == 0 || pairs == 0 {
        return;
    }
    let tasks = rayon::current_num_threads().clamp(1, pairs);
    let per_task = pairs.div_ceil(tasks);
    let ptr = DisjointOut::new(out);
    (0..tasks).into_par_iter().for_each(|t| {
        let mut tiles = new_tiles();
        // The thread's buffers, kept between matmuls: fresh ones of a few hundred KB would
        // come from `mmap` and fault in page by page on every call.
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch {
                pair,
                ad,
                as_,
                packed,
            } = scratch;
            pair.resize(nb);
            let tiles_per_chunk = CHUNK.min(m) / TILE;
            ad.resize(tiles_per_chunk * nb * TILE, 0.0);
            as_.resize(tiles_per_chunk * nb * TILE, 0.0);
            packed.resize(tiles_per_chunk * nb, ATile([0; A_BYTES]));
            for a0 in (0..m).step_by(CHUNK) {
                let a_end = (a0 + CHUNK).min(m);
                let full = a0 + (a_end - a0) / TILE * TILE;
                // Tile `j`, block `b`: the 16 rows' quants side by side in `packed[j * nb + b]`
                // (8 cache lines, against 16 or more read in place), their scales at
                // `(j * nb + b) * 16 + i`.
                for a in a0..full {
                    let (j, i) = ((a - a0) / TILE, (a - a0) % TILE);
                    for b in 0..nb {
                        let blk = &acts[a * nb + b];
                        ad[(j * nb + b) * TILE + i] = blk.d;
                        as_[(j * nb + b) * TILE + i] = blk.s;
                        for (o, &q) in packed[j * nb + b].0[32 * i..32 * i + 32]
                            .iter_mut()
                            .zip(&blk.qs)
                        {
                            *o = q as u8;
                        }
                    }
                }
                for q in t * per_task..((t + 1) * per_task).min(pairs) {
                    // SAFETY: AVX-512 was checked above (F16C and AVX-512BW come with every CPU
                    // that has AVX-512 VNNI).
                    unsafe { pair.load(w, q) };
                    let col = q * TILE;
                    let cols = TILE.min(n - col);
                    for a in (a0..full).step_by(TILE) {
                        let j = (a - a0) / TILE;
                        let scales = ActScales {
                            d: &ad[j * nb * TILE..(j + 1) * nb * TILE],
                            s: &as_[j * nb * TILE..(j + 1) * nb * TILE],
                        };
                        // SAFETY: AVX-512 was checked above; tile j's `nb` blocks were packed
                        // (a + 16 <= full) and `pair`/`scales` hold `nb` blocks.
                        let r = unsafe {
                            kernel::tile16(
                                &mut tiles,
                                kind,
                                pair,
                                packed[j * nb..(j + 1) * nb].as_ptr().cast(),
                                nb,
                                &scales,
                            )
                        };
                        for (i, vals) in r.iter().enumerate() {
                            // SAFETY: row a + i < m, columns col..col + cols < n belong to this
                            // task's pairs only.
                            unsafe { store_row(ptr.at((a + i) * n + col), vals, cols) }
                        }
                    }
                    // The rows left after whole tiles: both panels at once where there are two and
                    // enough rows (as `gemm` does), else panel by panel.
                    if a_end - full >= PAIR_MIN_ROWS && 2 * q + 1 < panels {
                        pair_rows(Isa::Avx512Vnni, w, 2 * q, acts, full..a_end, |a, vals| {
                            // SAFETY: as above, for the pair's columns.
                            unsafe { store_row(ptr.at(a * n + col), vals, cols) }
                        });
                        continue;
                    }
                    for p in [2 * q, 2 * q + 1].into_iter().filter(|&p| p < panels) {
                        let col = p * PANEL;
                        let cols = PANEL.min(n - col);
                        panel_rows(Isa::Avx512Vnni, w, p, acts, full..a_end, |a, vals| {
                            // SAFETY: as above, for panel p's columns.
                            unsafe { store_row(ptr.at(a * n + col), vals, cols) }
                        });
                    }
                }
            }
        });
    });
}
