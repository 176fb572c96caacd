//! Model weights from GGUF files and Hugging Face safetensors directories.
//!
//! A [`WeightSource`] hands out whole tensors or row/column slices of matrices, so that a
//! tensor-parallel rank reads only its own shard.

mod gguf;
mod safetensors;
mod slicing;

pub use gguf::GgufSource;
pub use safetensors::SafetensorsSource;

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How matrix weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Keep GGML-quantized tensors quantized (quantized matmul); dense tensors use `DType`.
    Quantized(DType),
    /// Dequantize or convert everything to this dtype.
    Dense(DType),
}

impl WeightFormat {
    /// The dtype of dense weights and activations.
    pub fn activation_dtype(&self) -> DType {
        match self {
            WeightFormat::Quantized(d) | WeightFormat::Dense(d) => *d,
        }
    }
}

/// A matrix weight (`[out_features, in_features]`) as the model keeps it.
#[derive(Debug)]
pub enum MatrixWeight {
    Dense(Tensor),
    Quantized(QTensor),
}

/// Which part of a `[rows, cols]` matrix to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slice {
    All,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

/// Where the weights of a model come from.
pub trait WeightSource: Send + Sync {
    /// The model configuration.
    fn config(&self) -> &LlamaConfig;
    /// Whether a tensor exists (by Hugging Face name).
    fn contains(&self, name: &str) -> bool;
    /// The full shape of a tensor (row-major, `[out, in]` for matrices).
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// Loads a matrix, or a slice of it, in the requested format.
    fn matrix(&self, name: &str, slice: &Slice, format: WeightFormat) -> Result<MatrixWeight>;
    /// Loads a 1-D tensor (norm weights) as f32.
    fn vector(&self, name: &str) -> Result<Tensor>;
    /// The device tensors are created on.
    fn device(&self) -> &Device;

    /// Checks that tensor `name` has the shape the config implies.
    fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        expect_shape(name, &self.shape(name)?, expected)
    }
}

/// A resolved model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPath {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelPath {
    /// Classifies a path: a `.gguf` file, or a directory with `config.json`.
    pub fn resolve(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelPath::HfDir(path.to_path_buf()));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| EngineError::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelPath::Gguf(one.clone())),
                _ => Err(EngineError::ModelNotFound(path.to_path_buf())),
            };
        }
        if path.is_file() {
            return Ok(ModelPath::Gguf(path.to_path_buf()));
        }
        Err(EngineError::ModelNotFound(path.to_path_buf()))
    }

    /// Opens the weights on `device`.
    pub fn open(&self, device: &Device) -> Result<Box<dyn WeightSource>> {
        Ok(match self {
            ModelPath::Gguf(p) => Box::new(GgufSource::open(p, device)?),
            ModelPath::HfDir(p) => Box::new(SafetensorsSource::open(p, device)?),
        })
    }
}

/// Checks a loaded tensor's shape against what the config implies.
pub fn expect_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(EngineError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}
