//! The portable micro-kernel over the panel layout, the same arithmetic as the reference.

use super::super::activation::BlockQ8;
use super::super::packed::{WeightKind, PANEL};
use half::f16;

fn half(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

pub fn tile<const A: usize>(
    kind: WeightKind,
    panel: &[u8],
    nb: usize,
    acts: [&[BlockQ8]; A],
) -> [[f32; PANEL]; A] {
    let pb = kind.panel_block_bytes();
    let mut acc = [[0f32; PANEL]; A];
    for b in 0..nb {
        let blk = &panel[b * pb..(b + 1) * pb];
        for (j, act) in acts.iter().enumerate() {
            let a = &act[b];
            for r in 0..PANEL {
                let lane = |v: usize| &blk[v * 32 + r * 4..v * 32 + r * 4 + 4];
                match kind {
                    WeightKind::Q4_1 => {
                        let mut isum = 0i32;
                        for q in 0..4 {
                            for (i, &w) in lane(q).iter().enumerate() {
                                isum += (w & 0x0F) as i32 * a.qs[4 * q + i] as i32
                                    + (w >> 4) as i32 * a.qs[16 + 4 * q + i] as i32;
                            }
                        }
                        let d = half(blk, 128 + 2 * r);
                        acc[j][r] = (d * a.d).mul_add(isum as f32, acc[j][r]);
                        acc[j][r] = half(blk, 144 + 2 * r).mul_add(a.s, acc[j][r]);
                    }
                    WeightKind::Q8_0 => {
                        let mut isum = 0i32;
                        for g in 0..8 {
                            for (i, &w) in lane(g).iter().enumerate() {
                                isum += w as i8 as i32 * a.qs[4 * g + i] as i32;
                            }
                        }
                        let d = half(blk, 256 + 2 * r);
                        acc[j][r] = (d * a.d).mul_add(isum as f32, acc[j][r]);
                    }
                }
            }
        }
    }
    acc
}
