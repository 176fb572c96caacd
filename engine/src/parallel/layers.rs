//! The sharded layers of a tensor-parallel Llama: column- and row-parallel linears,
//! the vocab-parallel embedding and the LM head.

use super::{shard_range, Communicator, Linear};
use crate::dense::PackedDense;
use crate::error::Result;
use crate::loader::{MatrixWeight, Slice, WeightFormat, WeightSource};
use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor, D};
use std::ops::Range;
use std::sync::Arc;

/// A linear layer whose output features are split over the ranks; no communication.
/// Several weights may be fused (QKV, gate/up): `parts` gives each one's name and local rows.
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear {
    linear: Linear,
    part_sizes: Vec<usize>,
}

impl ColumnParallelLinear {
    /// Bytes of this rank's weight.
    pub fn bytes(&self) -> usize {
        self.linear.bytes()
    }

    /// Loads rows `rows` of each named matrix and stacks them into one layer.
    pub fn load(
        src: &dyn WeightSource,
        parts: &[(&str, Range<usize>)],
        format: WeightFormat,
    ) -> Result<Self> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut part_sizes = Vec::with_capacity(parts.len());
        for (name, rows) in parts {
            let total = src.shape(name)?[0];
            let slice = if rows.start == 0 && rows.end == total {
                Slice::All
            } else {
                Slice::Rows(rows.clone())
            };
            weights.push(src.matrix(name, &slice, format)?);
            part_sizes.push(rows.len());
        }
        Ok(Self {
            linear: Linear::fuse_rows(weights)?,
            part_sizes,
        })
    }

    /// `x: [tokens, in]` -> one `[tokens, part_rows]` tensor per fused part.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.split(&self.forward_fused(x)?)
    }

    /// `x: [tokens, in]` -> `[tokens, sum of part rows]`, the parts side by side.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x)
    }

    /// Splits a fused output into its parts (views).
    pub fn split(&self, y: &Tensor) -> Result<Vec<Tensor>> {
        let y = y.clone();
        if self.part_sizes.len() == 1 {
            return Ok(vec![y]);
        }
        let mut out = Vec::with_capacity(self.part_sizes.len());
        let mut start = 0;
        for &n in &self.part_sizes {
            out.push(y.narrow(D::Minus1, start, n)?);
            start += n;
        }
        Ok(out)
    }
}

/// A linear layer whose input features are split over the ranks; the partial outputs are
/// summed with an all-reduce.
#[derive(Clone)]
pub struct RowParallelLinear {
    linear: Linear,
    comm: Arc<dyn Communicator>,
}

impl RowParallelLinear {
    /// Bytes of this rank's weight.
    pub fn bytes(&self) -> usize {
        self.linear.bytes()
    }

    /// Loads columns `cols` of matrix `name`.
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        cols: Range<usize>,
        format: WeightFormat,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let total = src.shape(name)?[1];
        let slice = if cols.start == 0 && cols.end == total {
            Slice::All
        } else {
            Slice::Cols(cols)
        };
        Ok(Self {
            linear: Linear::new(src.matrix(name, &slice, format)?)?,
            comm,
        })
    }

    /// `x: [tokens, in_local] -> [tokens, out]`, summed over ranks.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let partial = self.linear.forward(x)?;
        self.comm.all_reduce_sum(&partial)
    }
}

/// This rank's vocabulary rows of `name` (`[vocab, hidden]`) and the slice that loads them.
fn vocab_shard(
    src: &dyn WeightSource,
    name: &str,
    comm: &dyn Communicator,
) -> Result<(Range<usize>, Slice)> {
    let vocab = src.shape(name)?[0];
    let range = shard_range(vocab, comm.rank(), comm.world_size());
    let slice = if comm.world_size() == 1 {
        Slice::All
    } else {
        Slice::Rows(range.clone())
    };
    Ok((range, slice))
}

/// The embedding table as stored: dense, packed (f32/bf16 on the CPU, shareable with a tied
/// LM head), or quantized rows dequantized on lookup.
#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor),
    Packed(Arc<PackedDense>),
    Quantized(Arc<QTensor>),
}

/// Token embeddings with the vocabulary split over the ranks; each rank looks up the ids it
/// owns, the others contribute zeros, and an all-reduce sums the rows.
#[derive(Clone)]
pub struct VocabParallelEmbedding {
    table: Table,
    vocab_range: Range<usize>,
    dtype: DType,
    comm: Arc<dyn Communicator>,
}

impl VocabParallelEmbedding {
    /// Bytes of this rank's table.
    pub fn bytes(&self) -> usize {
        match &self.table {
            Table::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Table::Packed(p) => p.bytes(),
            Table::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// Loads this rank's share of `name` (`[vocab, hidden]`); lookups give `dtype` rows.
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        format: WeightFormat,
        dtype: DType,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let (vocab_range, slice) = vocab_shard(src, name, comm.as_ref())?;
        let table = match src.matrix(name, &slice, format)? {
            MatrixWeight::Dense(t) => match PackedDense::new(&t)? {
                Some(p) => Table::Packed(Arc::new(p)),
                None => Table::Dense(t),
            },
            MatrixWeight::Quantized(q) => Table::Quantized(Arc::new(q)),
        };
        Ok(Self {
            table,
            vocab_range,
            dtype,
            comm,
        })
    }

    /// The table as a linear layer, for an LM head tied to it.
    pub fn tied_weight(&self) -> Result<Linear> {
        match &self.table {
            Table::Dense(t) => Ok(Linear::Dense(t.clone())),
            Table::Packed(p) => Ok(Linear::Packed(p.clone())),
            Table::Quantized(q) => Linear::from_qtensor(q.clone()),
        }
    }

    /// `ids: [tokens] (u32) -> [tokens, hidden]`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let device = match &self.table {
            Table::Dense(t) => t.device().clone(),
            Table::Packed(_) => candle_core::Device::Cpu,
            Table::Quantized(q) => q.device(),
        };
        let start = self.vocab_range.start as u32;
        let end = self.vocab_range.end as u32;
        let local: Vec<u32> = ids
            .iter()
            .map(|&id| {
                if (start..end).contains(&id) {
                    id - start
                } else {
                    0
                }
            })
            .collect();
        let idx = || Tensor::new(local.as_slice(), &device);
        let rows = match &self.table {
            Table::Dense(t) => t.index_select(&idx()?, 0)?,
            Table::Packed(p) => p.rows(&local)?,
            Table::Quantized(q) => q.embedding(&idx()?)?,
        }
        .to_dtype(self.dtype)?;
        if self.comm.world_size() == 1 {
            return Ok(rows);
        }
        let mask: Vec<f32> = ids
            .iter()
            .map(|id| if (start..end).contains(id) { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::new(mask.as_slice(), &device)?
            .to_dtype(self.dtype)?
            .unsqueeze(1)?;
        self.comm.all_reduce_sum(&rows.broadcast_mul(&mask)?)
    }
}

/// The LM head, column-parallel over the vocabulary; the logits are gathered from all ranks.
#[derive(Clone)]
pub struct ParallelLmHead {
    linear: Linear,
    comm: Arc<dyn Communicator>,
    /// Shares the embedding table (unless repacked into a copy of its own).
    tied: bool,
}

impl ParallelLmHead {
    /// Loads this rank's vocabulary rows of `name`.
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        format: WeightFormat,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let (_, slice) = vocab_shard(src, name, comm.as_ref())?;
        Ok(Self {
            linear: Linear::new(src.matrix(name, &slice, format)?)?,
            comm,
            tied: false,
        })
    }

    /// An LM head sharing the (already sharded) embedding table.
    pub fn tied(embedding: &VocabParallelEmbedding, comm: Arc<dyn Communicator>) -> Result<Self> {
        Ok(Self {
            linear: embedding.tied_weight()?,
            comm,
            tied: true,
        })
    }

    /// Bytes of this rank's weight that the embedding table does not already hold.
    pub fn bytes(&self) -> usize {
        match (&self.linear, self.tied) {
            (Linear::Fast(_), _) | (_, false) => self.linear.bytes(),
            _ => 0,
        }
    }

    /// `x: [rows, hidden] -> [rows, vocab]` logits in f32 on rank 0; `None` on other ranks.
    pub fn forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let local = self.linear.forward(x)?.to_dtype(DType::F32)?;
        self.comm.gather_to_root(&local, 1)
    }
}
