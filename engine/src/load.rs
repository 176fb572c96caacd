//! Loading a model shard with its tokenizer: what the user asked for ([`EngineOptions`],
//! [`DTypeChoice`]), the weight files, and the tokenizer with the model's EOS ids.

use crate::error::{EngineError, Result};
use crate::kv_cache::DEFAULT_BLOCK_SIZE;
use crate::loader::{GgufSource, ModelPath, SafetensorsSource, WeightFormat, WeightSource};
use crate::model::Llama;
use crate::parallel::Communicator;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// Numeric mode requested by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DTypeChoice {
    /// GGUF: keep quantized weights (f32 activations); safetensors: f32 on CPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for DTypeChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" | "float32" => Self::F32,
            "bf16" | "bfloat16" => Self::Bf16,
            "f16" | "float16" | "half" => Self::F16,
            other => {
                return Err(EngineError::InvalidConfig(format!(
                    "unknown dtype '{other}' (auto, f32, bf16, f16)"
                )))
            }
        })
    }
}

impl DTypeChoice {
    /// The weight format this choice means for a model of kind `path` served on a GPU
    /// (`on_gpu`) or the CPU: `auto` keeps a Hugging Face checkpoint in bf16 on a GPU.
    pub fn weight_format(&self, path: &ModelPath, on_gpu: bool) -> WeightFormat {
        match (self, path) {
            (Self::Auto, ModelPath::Gguf(_)) => WeightFormat::Quantized(DType::F32),
            (Self::Auto, ModelPath::HfDir(_)) if on_gpu => WeightFormat::Dense(DType::BF16),
            (Self::Auto, ModelPath::HfDir(_)) | (Self::F32, _) => WeightFormat::Dense(DType::F32),
            (Self::Bf16, _) => WeightFormat::Dense(DType::BF16),
            (Self::F16, _) => WeightFormat::Dense(DType::F16),
        }
    }
}

/// What to load and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineOptions {
    pub model: PathBuf,
    pub dtype: DTypeChoice,
    /// Longest prompt + output; defaults to the model's context length.
    pub max_seq_len: Option<usize>,
    pub block_size: usize,
    /// Largest number of tokens in one forward pass (longer prompts are prefilled in chunks).
    pub max_batched_tokens: usize,
}

impl EngineOptions {
    /// Defaults for `model`.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            dtype: DTypeChoice::Auto,
            max_seq_len: None,
            block_size: DEFAULT_BLOCK_SIZE,
            max_batched_tokens: 2048,
        }
    }
}

/// A model shard with its tokenizer, as a worker holds it.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub format: WeightFormat,
    pub path: ModelPath,
    /// Bytes the weights hold on their device (the tensors as loaded, repacked or converted).
    pub weight_bytes: u64,
}

impl LoadedModel {
    /// Loads rank `comm.rank()`'s shard of the model at `opts.model`.
    pub fn load(
        opts: &EngineOptions,
        device: &Device,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let path = ModelPath::resolve(&opts.model)?;
        let format = opts.dtype.weight_format(&path, !device.is_cpu());
        let (source, tokenizer) = open_model(&path, device)?;
        let cfg = source.config();
        let max_seq_len = opts
            .max_seq_len
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(EngineError::InvalidConfig(format!(
                "the tokenizer has {} tokens but the model's vocabulary has {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
        let model = Llama::load(source.as_ref(), format, comm, max_seq_len)?;
        let weight_bytes = model.weight_bytes();
        Ok(Self {
            model,
            tokenizer,
            format,
            path,
            weight_bytes,
        })
    }
}

/// The weights (memory-mapped, nothing read yet) and the tokenizer of the model at `path`.
pub fn open_model(path: &ModelPath, device: &Device) -> Result<(Box<dyn WeightSource>, Tokenizer)> {
    Ok(match path {
        ModelPath::Gguf(p) => {
            let src = GgufSource::open(p, device)?;
            let tok = Tokenizer::from_gguf(src.metadata())?;
            (Box::new(src), tok)
        }
        ModelPath::HfDir(dir) => {
            let src = SafetensorsSource::open(dir, device)?;
            let mut eos = src.config().eos_token_ids.clone();
            eos.extend(generation_config_eos(dir));
            let tok = Tokenizer::from_hf_dir(dir, eos)?;
            (Box::new(src), tok)
        }
    })
}

/// EOS ids from `generation_config.json`, if present.
fn generation_config_eos(dir: &std::path::Path) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}
