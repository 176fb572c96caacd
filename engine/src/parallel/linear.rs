//! A linear layer (`y = x Wᵀ`) over dense or quantized weights, possibly fused from several.

use crate::dense::PackedDense;
use crate::error::{EngineError, Result};
use crate::loader::MatrixWeight;
use crate::quant::FastQMatMul;
use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Module, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// A bias-free linear layer.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `[out, in]` dense weight (on a GPU, or in f16), through candle's matmul.
    Dense(Tensor),
    /// f32/bf16 weight on the CPU, packed for streaming.
    Packed(Arc<PackedDense>),
    /// GGML-quantized weight through candle's quantized matmul.
    Quantized(Arc<QMatMul>),
    /// Q4_1 / Q8_0 weight through liftoff's own SIMD kernels.
    Fast(Arc<FastQMatMul>),
}

impl Linear {
    /// Bytes the weight holds on its device.
    pub fn bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Dense(t) => dense(t),
            Self::Packed(p) => p.bytes(),
            Self::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => dense(t),
            },
            Self::Fast(f) => f.bytes(),
        }
    }

    /// Wraps a loaded weight, choosing the fastest matmul for its storage.
    pub fn new(weight: MatrixWeight) -> Result<Self> {
        Ok(match weight {
            MatrixWeight::Dense(t) => Self::from_dense(t)?,
            MatrixWeight::Quantized(q) => Self::from_qtensor(Arc::new(q))?,
        })
    }

    /// A dense layer: packed when it is an f32/bf16 matrix on the CPU.
    pub fn from_dense(t: Tensor) -> Result<Self> {
        Ok(match PackedDense::new(&t)? {
            Some(p) => Linear::Packed(Arc::new(p)),
            None => Linear::Dense(t),
        })
    }

    /// A quantized layer over a shared tensor (tied embeddings share the LM head's).
    pub fn from_qtensor(q: Arc<QTensor>) -> Result<Self> {
        if let Some(fast) = FastQMatMul::new(&q)? {
            return Ok(Linear::Fast(Arc::new(fast)));
        }
        Ok(Linear::Quantized(Arc::new(QMatMul::from_arc(q)?)))
    }

    /// Stacks weights along the output dimension into one layer (fused QKV, fused gate/up).
    /// Quantized parts of one GGML type are stacked block for block; anything else (dense
    /// parts, or mixed quantization types) is stacked as dense tensors.
    pub fn fuse_rows(parts: Vec<MatrixWeight>) -> Result<Self> {
        let qtype = match parts.first() {
            Some(MatrixWeight::Quantized(q)) => Some(q.dtype()),
            _ => None,
        };
        let same_qtype =
            |p: &MatrixWeight| matches!(p, MatrixWeight::Quantized(q) if Some(q.dtype()) == qtype);
        if parts.len() > 1 && parts.iter().all(same_qtype) {
            let mut bytes = Vec::new();
            let (mut rows, mut cols, mut device) = (0, 0, None);
            for p in &parts {
                if let MatrixWeight::Quantized(q) = p {
                    bytes.extend_from_slice(&q.data()?);
                    let (r, c) = q.shape().dims2()?;
                    rows += r;
                    cols = c;
                    device = Some(q.device());
                }
            }
            let (Some(dtype), Some(device)) = (qtype, device) else {
                return Err(EngineError::Parallel("empty fuse".into()));
            };
            let storage = QStorage::from_data(Cow::Owned(bytes), &device, dtype)?;
            return Self::from_qtensor(Arc::new(QTensor::new(storage, (rows, cols))?));
        }
        if parts.len() == 1 {
            return Self::new(
                parts
                    .into_iter()
                    .next()
                    .ok_or_else(|| EngineError::Parallel("empty fuse".into()))?,
            );
        }
        // Dense parts keep their dtype; dequantized ones (f32) are converted to it.
        let dtype = parts
            .iter()
            .find_map(|p| match p {
                MatrixWeight::Dense(t) => Some(t.dtype()),
                MatrixWeight::Quantized(_) => None,
            })
            .unwrap_or(candle_core::DType::F32);
        let ts = parts
            .into_iter()
            .map(|p| match p {
                MatrixWeight::Dense(t) => Ok(t.to_dtype(dtype)?),
                MatrixWeight::Quantized(q) => Ok(q.dequantize(&q.device())?.to_dtype(dtype)?),
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_dense(Tensor::cat(&ts, 0)?)
    }

    /// `x: [tokens, in] -> [tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            Linear::Packed(p) => p.matmul_t(x)?,
            Linear::Quantized(q) => q.forward(x)?,
            Linear::Fast(f) => f.forward(x)?,
        })
    }
}
