//! A linear layer (`y = x Wᵀ`) over dense or quantized weights, possibly fused from several.

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
    /// `[out, in]` dense weight.
    Dense(Tensor),
    /// GGML-quantized weight through candle's quantized matmul.
    Quantized(Arc<QMatMul>),
    /// Q4_1 / Q8_0 weight through liftoff's own SIMD kernels.
    Fast(Arc<FastQMatMul>),
}

impl Linear {
    /// Wraps a loaded weight, choosing the fastest matmul for its storage.
    pub fn new(weight: MatrixWeight) -> Result<Self> {
        Ok(match weight {
            MatrixWeight::Dense(t) => Linear::Dense(t),
            MatrixWeight::Quantized(q) => Self::from_qtensor(Arc::new(q))?,
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
    pub fn fuse_rows(parts: Vec<MatrixWeight>) -> Result<Self> {
        if parts.len() == 1 {
            return Self::new(
                parts
                    .into_iter()
                    .next()
                    .ok_or_else(|| EngineError::Parallel("empty fuse".into()))?,
            );
        }
        if parts.iter().all(|p| matches!(p, MatrixWeight::Dense(_))) {
            let ts: Vec<Tensor> = parts
                .into_iter()
                .filter_map(|p| match p {
                    MatrixWeight::Dense(t) => Some(t),
                    MatrixWeight::Quantized(_) => None,
                })
                .collect();
            return Ok(Linear::Dense(Tensor::cat(&ts, 0)?));
        }
        let qs: Vec<QTensor> = parts
            .into_iter()
            .map(|p| match p {
                MatrixWeight::Quantized(q) => Ok(q),
                MatrixWeight::Dense(t) => Ok(QTensor::quantize(
                    &t.to_dtype(candle_core::DType::F32)?,
                    candle_core::quantized::GgmlDType::F32,
                )?),
            })
            .collect::<Result<_>>()?;
        let dtype = qs[0].dtype();
        if qs.iter().any(|q| q.dtype() != dtype) {
            // Mixed quantization types cannot share one matrix: dequantize to f32.
            let ts = qs
                .iter()
                .map(|q| q.dequantize(&q.device()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Ok(Linear::Dense(Tensor::cat(&ts, 0)?));
        }
        let cols = qs[0].shape().dims()[1];
        let rows: usize = qs.iter().map(|q| q.shape().dims()[0]).sum();
        let mut bytes = Vec::new();
        for q in &qs {
            bytes.extend_from_slice(&q.data()?);
        }
        let device = qs[0].device();
        let storage = QStorage::from_data(Cow::Owned(bytes), &device, dtype)?;
        Self::from_qtensor(Arc::new(QTensor::new(storage, (rows, cols))?))
    }

    /// `x: [tokens, in] -> [tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            Linear::Quantized(q) => q.forward(x)?,
            Linear::Fast(f) => f.forward(x)?,
        })
    }
}
