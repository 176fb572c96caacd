//! Byte-level slicing of row-major matrices whose elements come in fixed-size units
//! (one scalar for dense dtypes, one quantization block for GGML types).

use std::ops::Range;

/// Layout of a row-major matrix in bytes.
#[derive(Debug, Clone, Copy)]
pub struct MatrixLayout {
    pub rows: usize,
    pub cols: usize,
    /// Elements per storage unit (1 for dense, the block size for quantized types).
    pub unit_elems: usize,
    /// Bytes per storage unit.
    pub unit_bytes: usize,
}

impl MatrixLayout {
    /// Bytes in one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.unit_elems * self.unit_bytes
    }

    /// Copies rows `rows` (all columns).
    pub fn rows<'a>(&self, data: &'a [u8], rows: &Range<usize>) -> &'a [u8] {
        let rb = self.row_bytes();
        &data[rows.start * rb..rows.end * rb]
    }

    /// Copies columns `cols` of every row; `cols` must be aligned to the unit.
    pub fn cols(&self, data: &[u8], cols: &Range<usize>) -> Vec<u8> {
        let rb = self.row_bytes();
        let start = cols.start / self.unit_elems * self.unit_bytes;
        let end = cols.end / self.unit_elems * self.unit_bytes;
        let mut out = Vec::with_capacity(self.rows * (end - start));
        for r in 0..self.rows {
            out.extend_from_slice(&data[r * rb + start..r * rb + end]);
        }
        out
    }

    /// Whether a column range can be cut without splitting a storage unit.
    pub fn cols_aligned(&self, cols: &Range<usize>) -> bool {
        cols.start.is_multiple_of(self.unit_elems) && cols.end.is_multiple_of(self.unit_elems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_rows_and_columns() {
        // 3x4 matrix of u16 units.
        let data: Vec<u8> = (0u8..24).collect();
        let l = MatrixLayout {
            rows: 3,
            cols: 4,
            unit_elems: 1,
            unit_bytes: 2,
        };
        assert_eq!(l.rows(&data, &(1..2)), &data[8..16]);
        assert_eq!(
            l.cols(&data, &(2..4)),
            vec![4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
        );
        let q = MatrixLayout {
            rows: 2,
            cols: 64,
            unit_elems: 32,
            unit_bytes: 20,
        };
        assert_eq!(q.row_bytes(), 40);
        assert!(q.cols_aligned(&(32..64)));
        assert!(!q.cols_aligned(&(16..64)));
    }
}
