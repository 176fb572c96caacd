//! Micro-kernels: one panel of [`PANEL`] weight rows against up to [`MAX_ACTS`] activation
//! rows, the 8 rows in the lanes of one vector. Every family equals
//! [`reference_dot`](super::reference::reference_dot) bit for bit.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_pair;

use super::activation::BlockQ8;
use super::isa::Isa;
use super::packed::{WeightKind, PANEL};

/// Activation rows per tile: 4 accumulators and 4 partial sums stay in registers.
pub const MAX_ACTS: usize = 4;

/// Activation rows per tile of the two-panel kernels ([`tile_pair`]): 8 accumulators and 8
/// block sums of 512 bits stay in registers.
pub const PAIR_ACTS: usize = 8;

/// Whether `isa` has kernels over two panels at once ([`tile_pair`]): AVX-512 VNNI, which
/// every CPU with AMX has. Which kernels a GEMM of `m` activation rows then uses:
/// - fewer than 8 rows: one panel at a time ([`tile`]);
/// - 8 rows or more: two panels at once;
/// - under AMX, from 16 rows: AMX tiles for whole tiles of 16 rows, two panels at once for 8
///   to 15 rows left over, one panel for fewer.
pub fn has_pairs(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512Vnni | Isa::Amx)
}

/// Panels `p0` and `p1` (`nb` blocks each) against `A` activation rows; returns
/// `[activation][row]`, `p0`'s rows first. A family without two-panel kernels
/// ([`has_pairs`]) runs [`tile`] on each panel.
#[inline]
pub fn tile_pair<const A: usize>(
    isa: Isa,
    kind: WeightKind,
    p0: &[u8],
    p1: &[u8],
    nb: usize,
    acts: [&[BlockQ8]; A],
    prefetch: bool,
) -> [[f32; 2 * PANEL]; A] {
    let need = nb * kind.panel_block_bytes();
    assert!(p0.len() >= need && p1.len() >= need);
    assert!(acts.iter().all(|a| a.len() >= nb));
    #[cfg(target_arch = "x86_64")]
    if has_pairs(isa) {
        let a = acts.map(|a| a.as_ptr());
        let (p0, p1) = (p0.as_ptr(), p1.as_ptr());
        // SAFETY: the sizes were checked above; `Isa::Avx512Vnni` and `Isa::Amx` are only
        // chosen when `Isa::available` found AVX-512 VNNI on this CPU.
        unsafe {
            return match kind {
                WeightKind::Q4_1 => x86_pair::q4_1::<A>(p0, p1, nb, a, prefetch),
                WeightKind::Q8_0 => x86_pair::q8_0::<A>(p0, p1, nb, a, prefetch),
            };
        }
    }
    let (first, second) = (
        tile(isa, kind, p0, nb, acts, prefetch),
        tile(isa, kind, p1, nb, acts, prefetch),
    );
    let mut out = [[0f32; 2 * PANEL]; A];
    for j in 0..A {
        out[j][..PANEL].copy_from_slice(&first[j]);
        out[j][PANEL..].copy_from_slice(&second[j]);
    }
    out
}

/// `PANEL` rows of `panel` (`nb` blocks) against `A` activation rows of at least `nb` blocks;
/// returns `[activation][row]`. `prefetch`: ask for the next panel's weights as this one's
/// are used (the SIMD families; see `x86::prefetch_next`).
#[inline]
pub fn tile<const A: usize>(
    isa: Isa,
    kind: WeightKind,
    panel: &[u8],
    nb: usize,
    acts: [&[BlockQ8]; A],
    prefetch: bool,
) -> [[f32; PANEL]; A] {
    assert!(panel.len() >= nb * kind.panel_block_bytes());
    assert!(acts.iter().all(|a| a.len() >= nb));
    #[cfg(target_arch = "x86_64")]
    {
        let p = panel.as_ptr();
        let a = acts.map(|a| a.as_ptr());
        // SAFETY: the sizes were checked above; the families are only chosen when
        // `Isa::available` found their features on this CPU.
        unsafe {
            match (isa, kind) {
                (Isa::Avx2, WeightKind::Q4_1) => return x86::q4_1_avx2::<A>(p, nb, a, prefetch),
                (Isa::Avx2, WeightKind::Q8_0) => return x86::q8_0_avx2::<A>(p, nb, a, prefetch),
                // AMX covers whole tiles of 16 rows (`amx`); fewer rows take VNNI.
                (Isa::Avx512Vnni | Isa::Amx, WeightKind::Q4_1) => {
                    return x86::q4_1_vnni::<A>(p, nb, a, prefetch)
                }
                (Isa::Avx512Vnni | Isa::Amx, WeightKind::Q8_0) => {
                    return x86::q8_0_vnni::<A>(p, nb, a, prefetch)
                }
                (Isa::Scalar, _) => {}
            }
        }
    }
    let _ = (isa, prefetch);
    scalar::tile(kind, panel, nb, acts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::activation::{quantize_rows, QK};

    /// [`tile_pair`] equals [`tile`] on each panel, bit for bit, for every family this CPU has
    /// (its two-panel kernels where [`has_pairs`], its fallback elsewhere), with a second
    /// panel that is not the one after the first.
    #[test]
    fn a_pair_equals_its_two_panels() {
        let nb = 5;
        for kind in [WeightKind::Q4_1, WeightKind::Q8_0] {
            let len = nb * kind.panel_block_bytes();
            let mut x = 0x2545F4914F6CDD1Du64;
            let mut byte = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            };
            // Scales: f16 values in [1/16, 2) with either sign.
            let mut panel = || -> Vec<u8> {
                let mut p: Vec<u8> = (0..len).map(|_| byte()).collect();
                for b in 0..nb {
                    let blk = &mut p[b * kind.panel_block_bytes()..];
                    let first = match kind {
                        WeightKind::Q4_1 => 128,
                        WeightKind::Q8_0 => 256,
                    };
                    for s in blk[first..kind.panel_block_bytes()].chunks_exact_mut(2) {
                        s[1] = 0x2C + (s[1] & 0x07) + (s[1] & 0x80);
                    }
                }
                p
            };
            let (p0, p1) = (panel(), panel());
            let xs: Vec<f32> = (0..3 * nb * QK)
                .map(|i| ((i * 37) % 23) as f32 - 11.0)
                .collect();
            let acts = quantize_rows(&xs, nb * QK);
            let rows: [&[BlockQ8]; 3] = std::array::from_fn(|j| &acts[j * nb..(j + 1) * nb]);
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let pair = tile_pair(isa, kind, &p0, &p1, nb, rows, false);
                let (a, b) = (
                    tile(isa, kind, &p0, nb, rows, false),
                    tile(isa, kind, &p1, nb, rows, false),
                );
                for j in 0..3 {
                    let want: Vec<u32> = a[j].iter().chain(&b[j]).map(|v| v.to_bits()).collect();
                    let got: Vec<u32> = pair[j].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{kind:?} {} row {j}", isa.name());
                    assert!(pair[j].iter().all(|v| v.is_finite() && *v != 0.0));
                }
            }
        }
    }
}
