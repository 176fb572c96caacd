//! Dense f32/bf16 weights on the CPU, repacked at load so that a matmul streams them in order.
//!
//! Decoding a dense model is a pass over its weights per step, so the step runs at the rate
//! the weights are read. A kernel that dots several weight rows at once with an activation
//! row reads several places in memory at once, and the hardware prefetcher follows those
//! interleaved streams badly. [`PackedDense`] stores each tile of [`TILE`] rows interleaved
//! in groups of [`GROUP`] columns (row 0's first 8 values, row 1's, ..., then row 0's next 8),
//! so a tile is one sequential read: in a dense bf16 decode on a Zen 4 the matmuls read at
//! 28-29 GB/s this way against 21-22 GB/s from the row-major layout, interleaved per token
//! in one process.
//!
//! One kernel serves every batch size, so a row's result does not depend on the batch it
//! is computed in: each output is a fixed sequence of operations on its weight row and
//! activation row (see `simd.rs`). The tiles are split over the pool in chunks
//! ([`for_each_chunk`]); within a chunk, blocks of weights that fit in L1 are streamed once
//! and reused by every step of 2-3 activation rows of a block that stays in L2.
//!
//! Against candle's GEMM with its packed operands, which this layout replaced above 8 rows
//! (`examples/dense_gemm.rs`, alternated in one process on a Zen 4): 1.4-2.0x (f32) and
//! 3.9-4.5x (bf16) at 16 rows, 0.72-0.93x (f32) and 0.78-1.07x (bf16) at 512 rows, the
//! price of one kernel for every batch size.

mod simd;

use crate::error::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;
use liftoff_kernels::shares::for_each_chunk;
use liftoff_kernels::DisjointOut;
use simd::{Lane, Operands, Simd};

/// Weight rows per tile.
pub const TILE: usize = 4;

/// Columns of a row stored together (one vector of f32 lanes).
pub const GROUP: usize = 8;

/// Weight bytes per chunk of tiles handed to a pool thread, for each [`ROWS_PER_STEP`]
/// activation rows (so a chunk is a few microseconds of work whatever the batch), up to
/// [`MAX_CHUNK_BYTES`]: small enough that a thread held up at a matmul's end leaves little to
/// wait for, large enough that taking a chunk (one atomic operation) costs under 1 % of it.
const CHUNK_BYTES: usize = 32 << 10;
const ROWS_PER_STEP: usize = 8;
const MAX_CHUNK_BYTES: usize = 256 << 10;

/// The weight values, packed.
#[derive(Debug)]
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A dense `[n, k]` weight matrix on the CPU in tiles of [`TILE`] rows interleaved by
/// [`GROUP`] columns; the last tile is padded with zero rows.
///
/// Within tile `t` (elements `t * TILE * k ..`), the value of row `t * TILE + i` at column
/// `c` lies at `(c / GROUP) * TILE * GROUP + i * GROUP + c % GROUP` for the columns in whole
/// groups, and the `k % GROUP` columns after them at `whole * TILE + i * tail + (c - whole)`.
#[derive(Debug)]
pub struct PackedDense {
    values: Values,
    n: usize,
    k: usize,
}

impl PackedDense {
    /// Packs a CPU f32 or bf16 matrix; `None` for any other dtype or device (the caller keeps
    /// candle's matmul).
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        let (n, k) = w.dims2()?;
        if !w.device().is_cpu() || !matches!(w.dtype(), DType::F32 | DType::BF16) {
            return Ok(None);
        }
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let values = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Values::F32(pack(&v[start..end], n, k)),
            Storage::Cpu(CpuStorage::BF16(v)) => Values::Bf16(pack(&v[start..end], n, k)),
            _ => return Ok(None),
        };
        Ok(Some(Self { values, n, k }))
    }

    /// `[n, k]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        match self.values {
            Values::F32(_) => DType::F32,
            Values::Bf16(_) => DType::BF16,
        }
    }

    /// Bytes the packed values hold (the padding of the last tile included).
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.len() * 4,
            Values::Bf16(v) => v.len() * 2,
        }
    }

    /// `x: [m, k]` times the matrix transposed: `[m, n]` in `x`'s dtype (computed in f32).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: (self.n, self.k).into(),
                op: "matmul_t",
            }
            .into());
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let simd = Simd::detect();
        let out = match &self.values {
            Values::F32(w) => self.rows_times(simd, w, &xs, m),
            Values::Bf16(w) => self.rows_times(simd, w, &xs, m),
        };
        Ok(Tensor::from_vec(out, (m, self.n), &Device::Cpu)?.to_dtype(x.dtype())?)
    }

    /// The rows `ids` of the matrix, `[ids.len(), k]` in the weights' dtype (an embedding
    /// lookup in a table shared with a tied LM head).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (n, k) = (self.n, self.k);
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(candle_core::Error::Msg(format!("row {bad} of a {n}-row table")).into());
        }
        fn gather<W: Copy>(p: &PackedDense, v: &[W], ids: &[u32]) -> Vec<W> {
            let mut out = Vec::with_capacity(ids.len() * p.k);
            for &id in ids {
                let id = id as usize;
                out.extend((0..p.k).map(|c| v[p.index(id, c)]));
            }
            out
        }
        let t = match &self.values {
            Values::F32(v) => Tensor::from_vec(gather(self, v, ids), (ids.len(), k), &Device::Cpu),
            Values::Bf16(v) => Tensor::from_vec(gather(self, v, ids), (ids.len(), k), &Device::Cpu),
        };
        Ok(t?)
    }

    /// Where row `r`'s column `c` lies in the packed values.
    fn index(&self, r: usize, c: usize) -> usize {
        let k = self.k;
        let whole = k / GROUP * GROUP;
        let (t, i) = (r / TILE, r % TILE);
        let within = if c < whole {
            group_offset(i, c / GROUP) + c % GROUP
        } else {
            tail_offset(k, i) + (c - whole)
        };
        t * TILE * k + within
    }

    /// `xs: [m, k]` (f32) times the matrix transposed, `[m, n]`.
    fn rows_times<W: Lane>(&self, simd: Simd, w: &[W], xs: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(w.len() == n.div_ceil(TILE) * TILE * k && xs.len() == m * k);
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let tile_bytes = (TILE * k * std::mem::size_of::<W>()).max(1);
        let bytes = (CHUNK_BYTES * m.div_ceil(ROWS_PER_STEP)).min(MAX_CHUNK_BYTES);
        let chunk = (bytes / tile_bytes).max(1);
        let ptr = DisjointOut::new(&mut out);
        for_each_chunk(n.div_ceil(TILE), chunk, |tiles| {
            // SAFETY: `tiles` lies within the matrix's tiles and `w`/`xs` hold them and
            // `m * k` values (asserted above); this chunk alone writes the columns of its
            // tiles' rows below `n`; `simd` was detected on this CPU.
            unsafe { simd::chunk(simd, Operands { w, xs, m, n, k }, tiles, ptr) }
        });
        out
    }
}

/// Within a tile, where row `i`'s column group `g` starts (the layout of [`PackedDense`]).
#[inline(always)]
fn group_offset(i: usize, g: usize) -> usize {
    g * TILE * GROUP + i * GROUP
}

/// Within a tile of rows of `k` values, where row `i`'s columns past the last whole group
/// start.
#[inline(always)]
fn tail_offset(k: usize, i: usize) -> usize {
    k / GROUP * GROUP * TILE + i * (k % GROUP)
}

/// Packs a row-major `[n, k]` matrix into tiles (see [`PackedDense`]).
fn pack<W: Copy + Default>(w: &[W], n: usize, k: usize) -> Vec<W> {
    let tiles = n.div_ceil(TILE);
    let whole = k / GROUP * GROUP;
    let tail = k - whole;
    let mut out = vec![W::default(); tiles * TILE * k];
    for (t, dst) in out.chunks_exact_mut(TILE * k).enumerate() {
        for i in 0..TILE {
            let r = t * TILE + i;
            if r >= n {
                break;
            }
            let row = &w[r * k..(r + 1) * k];
            for (g, src) in row[..whole].chunks_exact(GROUP).enumerate() {
                let at = group_offset(i, g);
                dst[at..at + GROUP].copy_from_slice(src);
            }
            let at = tail_offset(k, i);
            dst[at..at + tail].copy_from_slice(&row[whole..]);
        }
    }
    out
}

#[cfg(test)]
mod tests;
