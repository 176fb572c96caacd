//! Loading a model with its tokenizer, and running one generation as a batch of one over the
//! paged KV cache (the CLI's `generate`). The server's scheduler drives the same model with
//! larger batches.

use crate::batch::{BatchInput, LogitsWanted};
use crate::error::{EngineError, Result};
use crate::kv_cache::{BlockManager, DEFAULT_BLOCK_SIZE};
use crate::loader::{GgufSource, ModelPath, SafetensorsSource, WeightFormat, WeightSource};
use crate::model::Llama;
use crate::parallel::{Communicator, SingleRank};
use crate::sampling::{SampledToken, SamplingParams};
use crate::scheduler::{Executor, LocalExecutor};
use crate::sequence::{FinishReason, SequenceState, TokenStep};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

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

/// How many KV-cache blocks a rank allocates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum KvBudget {
    /// As many blocks as fit in this many bytes.
    Bytes(u64),
    /// As many blocks as fit in `fraction` of the GPU's memory, less what is in use once the
    /// weights are loaded (vLLM's `gpu_memory_utilization`); the rest is left to activations
    /// and the CUDA context.
    DeviceMemory { fraction: f32 },
    /// Enough for one sequence of the model's maximum length (a batch of one).
    OneSequence,
}

/// A model shard with its tokenizer, as a worker holds it.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub format: WeightFormat,
    pub path: ModelPath,
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
        Ok(Self {
            model,
            tokenizer,
            format,
            path,
        })
    }

    /// KV-cache blocks of `block_size` tokens this shard allocates under `budget` (measured
    /// after the weights are on the device).
    pub fn kv_blocks(&self, block_size: usize, budget: KvBudget) -> Result<usize> {
        let per_block = self
            .model
            .kv_cache_config(1, block_size)
            .bytes_per_block()
            .max(1) as u64;
        Ok(match budget {
            KvBudget::Bytes(bytes) => (bytes / per_block) as usize,
            KvBudget::DeviceMemory { fraction } => {
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return Err(EngineError::InvalidConfig(format!(
                        "the GPU memory fraction must be in (0, 1], got {fraction}"
                    )));
                }
                let (free, total) = crate::worker::device_memory(self.model.device())?;
                let target = (total as f64 * fraction as f64) as u64;
                let bytes = target.saturating_sub(total - free);
                tracing::info!(
                    free_mib = free >> 20,
                    total_mib = total >> 20,
                    kv_mib = bytes >> 20,
                    "KV cache sized from device memory"
                );
                (bytes / per_block) as usize
            }
            KvBudget::OneSequence => self.model.max_seq_len().div_ceil(block_size.max(1)) + 1,
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

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Per generated token, the top `[token_id, logprob]` pairs (when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// A batch-of-one engine over an [`Executor`] (the model in this process, or a tensor-parallel
/// group of worker processes): the CLI's `generate` and the reference tests.
pub struct Engine {
    executor: Box<dyn Executor>,
    tokenizer: Tokenizer,
    allocator: BlockManager,
    max_seq_len: usize,
    max_batched_tokens: usize,
}

impl Engine {
    /// Loads the model on the CPU as a group of one rank.
    pub fn load(opts: &EngineOptions) -> Result<Self> {
        let loaded = LoadedModel::load(opts, &Device::Cpu, Arc::new(SingleRank))?;
        let bs = opts.block_size.max(1);
        let blocks = loaded.kv_blocks(bs, KvBudget::OneSequence)?;
        let max_seq_len = loaded.model.max_seq_len();
        let executor = LocalExecutor::new(loaded.model, blocks, bs)?;
        Ok(Self::new(
            Box::new(executor),
            loaded.tokenizer,
            max_seq_len,
            opts.max_batched_tokens,
        ))
    }

    /// An engine over `executor`, whose model takes sequences up to `max_seq_len` tokens.
    pub fn new(
        executor: Box<dyn Executor>,
        tokenizer: Tokenizer,
        max_seq_len: usize,
        max_batched_tokens: usize,
    ) -> Self {
        let (blocks, bs) = executor.kv_blocks();
        Self {
            executor,
            tokenizer,
            allocator: BlockManager::new(blocks, bs, false),
            max_seq_len,
            max_batched_tokens: max_batched_tokens.max(1),
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Logits (`[len, vocab]`) at every position of `ids`, from a fresh sequence.
    pub fn prompt_logits(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut table = Vec::new();
        let out = self
            .prompt_batches(ids, &mut table, LogitsWanted::All)
            .and_then(|batches| {
                let mut rows = Vec::new();
                for b in &batches {
                    rows.extend(self.executor.logits(b)?);
                }
                Ok(rows)
            });
        self.allocator.release(&table);
        out
    }

    /// The batches that run `ids` through the model in chunks of at most
    /// `max_batched_tokens`, growing `table`; `wanted` applies to every chunk for
    /// [`LogitsWanted::All`], else to the last one.
    fn prompt_batches(
        &mut self,
        ids: &[u32],
        table: &mut Vec<u32>,
        wanted: LogitsWanted,
    ) -> Result<Vec<BatchInput>> {
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if ids.len() > self.max_seq_len {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens, more than the maximum sequence length {}",
                ids.len(),
                self.max_seq_len
            )));
        }
        if !self.allocator.ensure_capacity(table, ids.len()) {
            return Err(EngineError::KvCacheExhausted(format!(
                "{} tokens do not fit",
                ids.len()
            )));
        }
        let mut batches = Vec::new();
        for (c, chunk) in ids.chunks(self.max_batched_tokens).enumerate() {
            let start = c * self.max_batched_tokens;
            let last = start + chunk.len() == ids.len();
            let want = match wanted {
                LogitsWanted::All => LogitsWanted::All,
                _ if last => wanted,
                _ => LogitsWanted::None,
            };
            let mut batch = BatchInput::default();
            batch.push_sequence(chunk, start, table, want);
            batches.push(batch);
        }
        Ok(batches)
    }

    /// The one token a step that sampled one row returned.
    fn one_token(mut tokens: Vec<SampledToken>) -> Result<SampledToken> {
        tokens
            .pop()
            .ok_or_else(|| EngineError::WorkerLost("a step returned no token".into()))
    }

    /// Generates from `prompt_ids`; `on_step` sees every token as it is produced.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        mut on_step: impl FnMut(&TokenStep),
    ) -> Result<Generation> {
        params.validate()?;
        let mut table = Vec::new();
        let result = self.generate_inner(prompt_ids, params, &mut table, &mut on_step);
        self.allocator.release(&table);
        result
    }

    fn generate_inner(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        table: &mut Vec<u32>,
        on_step: &mut dyn FnMut(&TokenStep),
    ) -> Result<Generation> {
        let max_len = self.max_seq_len;
        let eos = self.tokenizer.eos_token_ids().to_vec();
        let mut seq = SequenceState::new(prompt_ids.to_vec(), params.clone(), max_len);
        let t0 = Instant::now();
        let batches = self.prompt_batches(prompt_ids, table, LogitsWanted::Last)?;
        let (last, earlier) = batches
            .split_last()
            .ok_or_else(|| EngineError::InvalidRequest("the prompt is empty".into()))?;
        for b in earlier {
            self.executor.logits(b)?;
        }
        let mut sampled = Self::one_token(self.executor.execute(last, &[seq.sampling(&eos)])?)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut text = String::new();
        let mut top = Vec::new();
        let finish = loop {
            let step = seq.accept(sampled, &self.tokenizer, &eos)?;
            text.push_str(&step.text);
            on_step(&step);
            top.push(step.top_logprobs.clone());
            if let Some(f) = step.finished {
                break f;
            }
            let pos = seq.total_len() - 1;
            if !self.allocator.ensure_capacity(table, pos + 1) {
                return Err(EngineError::KvCacheExhausted(format!(
                    "no block for position {pos}"
                )));
            }
            let mut batch = BatchInput::default();
            batch.push_sequence(&[step.token_id], pos, table, LogitsWanted::Last);
            let spec = seq.sampling(&eos);
            sampled = Self::one_token(self.executor.execute(&batch, &[spec])?)?;
        };
        let decode_s = t1.elapsed().as_secs_f64();
        let generated = seq.generated().to_vec();
        let decode_tokens = generated.len().saturating_sub(1);
        Ok(Generation {
            prompt_tokens_per_s: prompt_ids.len() as f64 / prefill_s.max(1e-9),
            decode_tokens_per_s: if decode_tokens > 0 {
                decode_tokens as f64 / decode_s.max(1e-9)
            } else {
                0.0
            },
            prompt_token_ids: prompt_ids.to_vec(),
            token_ids: generated,
            text,
            finish_reason: if finish == FinishReason::Cancelled {
                FinishReason::Stop
            } else {
                finish
            },
            top_logprobs: (params.logprobs > 0).then_some(top),
        })
    }
}
