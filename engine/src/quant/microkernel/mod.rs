//! Micro-kernels: one panel of [`PANEL`] weight rows against up to [`MAX_ACTS`] activation
//! rows, the 8 rows in the lanes of one vector. Every family equals
//! [`reference_dot`](super::reference::reference_dot) bit for bit.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::activation::BlockQ8;
use super::isa::Isa;
use super::packed::{WeightKind, PANEL};

/// Activation rows per tile: 4 accumulators and 4 partial sums stay in registers.
pub const MAX_ACTS: usize = 4;

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
