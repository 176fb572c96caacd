//! The definition every kernel must equal bit for bit: per block an exact integer dot product,
//! then `acc = fma(d_w * d_a, isum, acc)` (and `acc = fma(m_w, s_a, acc)` for Q4_1's min), in
//! block order, on the GGML bytes as stored in the file.

use super::activation::{BlockQ8, QK};
use super::packed::WeightKind;
use half::f16;

fn half(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The exact integer dot product of one GGML block with one activation block.
pub fn block_isum(kind: WeightKind, blk: &[u8], act: &BlockQ8) -> i32 {
    match kind {
        WeightKind::Q4_1 => (0..QK / 2)
            .map(|j| {
                let q = blk[4 + j];
                (q & 0x0F) as i32 * act.qs[j] as i32 + (q >> 4) as i32 * act.qs[j + QK / 2] as i32
            })
            .sum(),
        WeightKind::Q8_0 => blk[2..2 + QK]
            .iter()
            .zip(&act.qs)
            .map(|(&w, &x)| w as i8 as i32 * x as i32)
            .sum(),
    }
}

/// One GGML row (`k / 32` blocks) against one quantized activation row.
pub fn reference_dot(kind: WeightKind, row: &[u8], act: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (blk, a) in row.chunks_exact(kind.ggml_block_bytes()).zip(act) {
        let isum = block_isum(kind, blk, a);
        acc = (half(blk, 0) * a.d).mul_add(isum as f32, acc);
        if kind == WeightKind::Q4_1 {
            acc = half(blk, 2).mul_add(a.s, acc);
        }
    }
    acc
}
