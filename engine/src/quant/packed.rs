//! Quantized weights repacked into panels of [`PANEL`] rows, the layout the micro-kernels read.
//!
//! In a panel, every block of 32 columns is stored as 32-byte vectors whose 32-bit lane `r`
//! holds four consecutive bytes of row `r`. One vector load then feeds a 4-way integer dot
//! product per row against four activation bytes broadcast to every lane, and the 8 lanes
//! accumulate the 8 rows' sums side by side: no horizontal reduction, and each output keeps its
//! own exact integer sum per block.
//!
//! - Q4_1 (GGML block: f16 d, f16 m, 16 bytes whose low nibbles are elements 0..16 and high
//!   nibbles elements 16..32): 4 vectors of nibbles (vector `q` holds bytes `4q..4q+4` of each
//!   row: elements `4q..4q+4` in the low nibbles, `16+4q..` in the high ones), then the 8 rows'
//!   d, then their m, as f16. 160 bytes per panel block, the same as the 8 GGML blocks.
//! - Q8_0 (GGML block: f16 d, 32 signed bytes): 8 vectors (vector `g` holds elements
//!   `4g..4g+4` of each row), then the 8 rows' d. 272 bytes per panel block.
//!
//! Rows past the matrix's end are zero (scale 0), so they compute 0 and are never stored.

use super::activation::QK;

/// Rows per panel: one 256-bit vector of 32-bit lanes.
pub const PANEL: usize = 8;

/// GGML block sizes in bytes.
pub const Q4_1_BYTES: usize = 20;
pub const Q8_0_BYTES: usize = 34;

/// A weight layout with its own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    Q4_1,
    Q8_0,
}

impl WeightKind {
    /// Bytes of one GGML block.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            WeightKind::Q4_1 => Q4_1_BYTES,
            WeightKind::Q8_0 => Q8_0_BYTES,
        }
    }

    /// Bytes of one panel block (PANEL rows x 32 columns).
    pub fn panel_block_bytes(self) -> usize {
        match self {
            WeightKind::Q4_1 => 4 * 32 + 2 * 2 * PANEL,
            WeightKind::Q8_0 => 8 * 32 + 2 * PANEL,
        }
    }
}

/// An `[n, k]` quantized matrix in panels.
#[derive(Debug)]
pub struct PackedMatrix {
    kind: WeightKind,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Bytes of the packed panels.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Repacks GGML rows (`n` rows of `k / 32` blocks) into panels.
    pub fn pack(kind: WeightKind, ggml: &[u8], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
        let nb = k / QK;
        let gb = kind.ggml_block_bytes();
        assert_eq!(ggml.len(), n * nb * gb, "GGML data does not hold {n} x {k}");
        let pb = kind.panel_block_bytes();
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u8; panels * nb * pb];
        for row in 0..n {
            let (p, r) = (row / PANEL, row % PANEL);
            for b in 0..nb {
                let src = &ggml[(row * nb + b) * gb..(row * nb + b + 1) * gb];
                let dst = &mut data[(p * nb + b) * pb..(p * nb + b + 1) * pb];
                match kind {
                    WeightKind::Q4_1 => {
                        for q in 0..4 {
                            dst[q * 32 + r * 4..q * 32 + r * 4 + 4]
                                .copy_from_slice(&src[4 + 4 * q..8 + 4 * q]);
                        }
                        dst[128 + 2 * r..130 + 2 * r].copy_from_slice(&src[0..2]);
                        dst[144 + 2 * r..146 + 2 * r].copy_from_slice(&src[2..4]);
                    }
                    WeightKind::Q8_0 => {
                        for g in 0..8 {
                            dst[g * 32 + r * 4..g * 32 + r * 4 + 4]
                                .copy_from_slice(&src[2 + 4 * g..6 + 4 * g]);
                        }
                        dst[256 + 2 * r..258 + 2 * r].copy_from_slice(&src[0..2]);
                    }
                }
            }
        }
        Self { kind, n, k, data }
    }

    pub fn kind(&self) -> WeightKind {
        self.kind
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input columns.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Blocks of 32 per row.
    pub fn blocks_per_row(&self) -> usize {
        self.k / QK
    }

    /// Number of panels (the last one may be padded).
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// The bytes of panel `p`.
    pub fn panel(&self, p: usize) -> &[u8] {
        let len = self.blocks_per_row() * self.kind.panel_block_bytes();
        &self.data[p * len..(p + 1) * len]
    }
}
