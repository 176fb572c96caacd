//! The Llama model (Llama 2/3/3.1/3.2, SmolLM, Mistral-style), tensor-parallel by construction:
//! every linear is a parallel layer type, and a group of one rank uses [`SingleRank`].
//!
//! [`SingleRank`]: crate::parallel::SingleRank

use super::cpu_ops;
use super::rope::RotaryEmbedding;
use crate::batch::BatchInput;
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::loader::{WeightFormat, WeightSource};
use crate::parallel::{
    shard_range, ColumnParallelLinear, Communicator, HeadSharding, ParallelLmHead,
    RowParallelLinear, VocabParallelEmbedding,
};
use crate::profile::{time, Part};
use candle_core::{DType, Device, Tensor};
use liftoff_kernels::{PagedLayout, SeqSpan};
use std::sync::Arc;

/// RMS normalisation with a learned scale.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }

    fn load(src: &dyn WeightSource, name: &str, dtype: DType, eps: f64) -> Result<Self> {
        let weight = src.vector(name)?;
        crate::loader::expect_shape(name, weight.dims(), &[src.config().hidden_size])?;
        Ok(Self {
            weight: weight.to_dtype(dtype)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = cpu_ops::rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Self-attention over this rank's heads.
struct Attention {
    qkv: ColumnParallelLinear,
    o: RowParallelLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn bytes(&self) -> usize {
        self.qkv.bytes() + self.o.bytes()
    }

    fn load(
        src: &dyn WeightSource,
        prefix: &str,
        sharding: &HeadSharding,
        format: WeightFormat,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let cfg = src.config();
        let d = cfg.head_dim;
        let heads = sharding.local_heads();
        let kv = sharding.local_kv_heads();
        let q_name = format!("{prefix}.q_proj.weight");
        let k_name = format!("{prefix}.k_proj.weight");
        let v_name = format!("{prefix}.v_proj.weight");
        let o_name = format!("{prefix}.o_proj.weight");
        let hidden = cfg.hidden_size;
        src.expect_shape(&q_name, &[cfg.num_attention_heads * d, hidden])?;
        src.expect_shape(&k_name, &[cfg.num_key_value_heads * d, hidden])?;
        src.expect_shape(&v_name, &[cfg.num_key_value_heads * d, hidden])?;
        src.expect_shape(&o_name, &[hidden, cfg.num_attention_heads * d])?;
        let qkv = ColumnParallelLinear::load(
            src,
            &[
                (q_name.as_str(), heads.start * d..heads.end * d),
                (k_name.as_str(), kv.start * d..kv.end * d),
                (v_name.as_str(), kv.start * d..kv.end * d),
            ],
            format,
        )?;
        let o =
            RowParallelLinear::load(src, &o_name, heads.start * d..heads.end * d, format, comm)?;
        Ok(Self {
            qkv,
            o,
            heads: heads.len(),
            kv_heads: kv.len(),
            head_dim: d,
        })
    }

    /// Projects, rotates, writes this step's keys and values to the cache and attends.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        layout: &PagedLayout,
        rope: &RotaryEmbedding,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        // Attention computes in f32 on the CPU (over an f32 or f16 cache), in the cache's
        // dtype on a GPU.
        let attn_dtype = if x.device().is_cpu() {
            DType::F32
        } else {
            cache.config().dtype
        };
        let parts = time(Part::QkvProjection, || self.qkv.forward(x))?;
        let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
            Ok(t.to_dtype(attn_dtype)?
                .reshape((tokens, n, self.head_dim))?
                .contiguous()?)
        };
        let q = heads(&parts[0], self.heads)?;
        let k = heads(&parts[1], self.kv_heads)?;
        let v = heads(&parts[2], self.kv_heads)?;
        time(Part::RotaryAndKvWrite, || -> Result<()> {
            rope.apply(&q, layout)?;
            rope.apply(&k, layout)?;
            cache.write(layer, &k, &v, layout)
        })?;
        let out = time(Part::Attention, || {
            cache.attention(layer, &q, layout, self.heads)
        })?
        .reshape((tokens, self.heads * self.head_dim))?
        .to_dtype(x.dtype())?;
        time(Part::OutputProjection, || self.o.forward(&out))
    }
}

/// The SwiGLU feed-forward block over this rank's share of the intermediate features.
struct Mlp {
    gate_up: ColumnParallelLinear,
    down: RowParallelLinear,
}

impl Mlp {
    fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    fn load(
        src: &dyn WeightSource,
        prefix: &str,
        format: WeightFormat,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let cfg = src.config();
        let (i, h) = (cfg.intermediate_size, cfg.hidden_size);
        let gate = format!("{prefix}.gate_proj.weight");
        let up = format!("{prefix}.up_proj.weight");
        let down = format!("{prefix}.down_proj.weight");
        src.expect_shape(&gate, &[i, h])?;
        src.expect_shape(&up, &[i, h])?;
        src.expect_shape(&down, &[h, i])?;
        let local = shard_range(i, comm.rank(), comm.world_size());
        Ok(Self {
            gate_up: ColumnParallelLinear::load(
                src,
                &[(gate.as_str(), local.clone()), (up.as_str(), local.clone())],
                format,
            )?,
            down: RowParallelLinear::load(src, &down, local, format, comm)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = time(Part::GateUpProjection, || self.gate_up.forward_fused(x))?;
        let act = time(Part::Activation, || -> Result<Tensor> {
            if let Some(y) = cpu_ops::silu_mul_halves(&gu)? {
                return Ok(y);
            }
            let parts = self.gate_up.split(&gu)?;
            Ok((candle_nn::ops::silu(&parts[0])? * &parts[1])?)
        })?;
        time(Part::DownProjection, || self.down.forward(&act))
    }
}

/// One transformer block.
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn bytes(&self) -> usize {
        self.input_norm.bytes()
            + self.attn.bytes()
            + self.post_attention_norm.bytes()
            + self.mlp.bytes()
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        layout: &PagedLayout,
        rope: &RotaryEmbedding,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let normed = time(Part::Norms, || self.input_norm.forward(x))?;
        let h = self.attn.forward(&normed, layer, layout, rope, cache)?;
        let x = time(Part::Residuals, || residual(x, &h))?;
        let normed = time(Part::Norms, || self.post_attention_norm.forward(&x))?;
        let h = self.mlp.forward(&normed)?;
        time(Part::Residuals, || residual(&x, &h))
    }
}

/// `x + h`.
fn residual(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    if let Some(y) = cpu_ops::add(x, h)? {
        return Ok(y);
    }
    Ok((x + h)?)
}

/// A Llama model shard.
pub struct Llama {
    config: LlamaConfig,
    embed: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: ParallelLmHead,
    rope: RotaryEmbedding,
    sharding: HeadSharding,
    device: Device,
    /// What the KV cache holds.
    kv_dtype: DType,
    /// CPU threads for the kernels; the forward runs inside this pool so the calling thread
    /// is one of its workers instead of waking a pool for every matmul.
    pool: Arc<rayon::ThreadPool>,
}

impl Llama {
    /// Bytes of this rank's weights on its device (a tied LM head counted once).
    pub fn weight_bytes(&self) -> u64 {
        (self.embed.bytes()
            + self.layers.iter().map(DecoderLayer::bytes).sum::<usize>()
            + self.norm.bytes()
            + self.lm_head.bytes()) as u64
    }

    /// Loads this rank's shard of the model; `max_seq_len` sizes the RoPE tables.
    pub fn load(
        src: &dyn WeightSource,
        format: WeightFormat,
        comm: Arc<dyn Communicator>,
        max_seq_len: usize,
    ) -> Result<Self> {
        let cfg = src.config().clone();
        Self::check_tensor_parallel(&cfg, comm.world_size())?;
        let sharding = HeadSharding::new(
            comm.rank(),
            comm.world_size(),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        )?;
        // On the CPU the activations are f32 whatever the weights: the matmuls compute in f32
        // anyway, and the norms, SiLU * up and residual adds have fused f32 passes
        // (`cpu_ops.rs`) where bf16 tensors went through candle's generic ops, converting
        // around every matmul (bf16 decode: 0.6 ms of a 12 ms token in those steps).
        let dtype = if src.device().is_cpu() {
            DType::F32
        } else {
            format.activation_dtype()
        };
        let embed_name = "model.embed_tokens.weight";
        src.expect_shape(embed_name, &[cfg.vocab_size, cfg.hidden_size])?;
        let embed = VocabParallelEmbedding::load(src, embed_name, format, dtype, comm.clone())?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_norm: RmsNorm::load(
                    src,
                    &format!("{p}.input_layernorm.weight"),
                    dtype,
                    cfg.rms_norm_eps,
                )?,
                attn: Attention::load(
                    src,
                    &format!("{p}.self_attn"),
                    &sharding,
                    format,
                    comm.clone(),
                )?,
                post_attention_norm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    dtype,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp::load(src, &format!("{p}.mlp"), format, comm.clone())?,
            });
        }
        let norm = RmsNorm::load(src, "model.norm.weight", dtype, cfg.rms_norm_eps)?;
        let lm_head = if src.contains("lm_head.weight") {
            src.expect_shape("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size])?;
            ParallelLmHead::load(src, "lm_head.weight", format, comm.clone())?
        } else {
            ParallelLmHead::tied(&embed, comm.clone())?
        };
        let rope = RotaryEmbedding::new(
            &cfg,
            max_seq_len.min(cfg.max_position_embeddings).max(1),
            src.device(),
        )?;
        let kv_dtype = match (src.device().is_cpu(), format) {
            // Half the bytes every decode step streams (the CPU attends in f32 over f16
            // keys and values, as llama.cpp does by default); f16's rounding is far below
            // the quantized or bf16 weights' own (the bf16 path with bf16 activations agreed
            // with the f32 reference at 97.8 % top-1 with it, 98.4 % with an f32 cache, one
            // position of 183; long bf16 decodes 1.07-1.18x faster). f32 checkpoints keep f32,
            // so the f32 path's greedy tokens stay those of transformers in f32.
            (true, WeightFormat::Dense(DType::F32)) => DType::F32,
            (true, _) => DType::F16,
            (false, _) => dtype,
        };
        let pool = compute_pool(None)?;
        Ok(Self {
            config: cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            sharding,
            device: src.device().clone(),
            kv_dtype,
            pool: Arc::new(pool),
        })
    }

    /// Whether `world` ranks can shard a model of `cfg`; the error names the numbers.
    pub fn check_tensor_parallel(cfg: &LlamaConfig, world: usize) -> Result<()> {
        if world == 0 {
            return Err(EngineError::Parallel(
                "tensor parallel size must be at least 1".into(),
            ));
        }
        HeadSharding::new(0, world, cfg.num_attention_heads, cfg.num_key_value_heads)?;
        if !cfg.intermediate_size.is_multiple_of(world) || !cfg.vocab_size.is_multiple_of(world) {
            return Err(EngineError::Parallel(format!(
                "tensor parallel size {world} must divide intermediate_size {} and vocab_size {}",
                cfg.intermediate_size, cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// The model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Longest sequence the model was set up for.
    pub fn max_seq_len(&self) -> usize {
        self.rope.max_positions()
    }

    /// KV-cache geometry of this shard for `num_blocks` blocks of `block_size`.
    pub fn kv_cache_config(&self, num_blocks: usize, block_size: usize) -> KvCacheConfig {
        KvCacheConfig {
            num_layers: self.config.num_hidden_layers,
            num_blocks,
            block_size,
            kv_heads: self.sharding.local_kv_heads().len(),
            head_dim: self.config.head_dim,
            dtype: self.kv_dtype(),
        }
    }

    /// The KV cache's element type: f16 for quantized weights on the CPU, f32 for dense ones
    /// (its attention runs in f32 over either), the activations' dtype on a GPU.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// The device the shard lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// This shard's rank in its tensor-parallel group.
    pub fn rank(&self) -> usize {
        self.sharding.rank
    }

    /// Runs the model's CPU work on `threads` threads (replicas in one process share the
    /// cores instead of each starting a pool as large as the machine).
    pub fn with_threads(mut self, threads: usize) -> Result<Self> {
        self.pool = Arc::new(compute_pool(Some(threads))?);
        Ok(self)
    }

    /// Runs `f` on the model's compute threads (sampling uses them after the forward).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Runs the batch; returns, on rank 0, the logits (`[rows, vocab]`, f32) of the rows
    /// [`BatchInput::logits_rows`] names, and `None` on the other ranks.
    pub fn forward(&self, batch: &BatchInput, cache: &KvCache) -> Result<Option<Tensor>> {
        super::warm_threads::install(&self.pool, || self.forward_in_pool(batch, cache))
    }

    /// No logits rows: an empty matrix on rank 0.
    fn no_logits(&self) -> Result<Option<Tensor>> {
        if self.sharding.rank != 0 {
            return Ok(None);
        }
        Ok(Some(Tensor::zeros(
            (0, self.config.vocab_size),
            DType::F32,
            &self.device,
        )?))
    }

    fn forward_in_pool(&self, batch: &BatchInput, cache: &KvCache) -> Result<Option<Tensor>> {
        if batch.num_tokens() == 0 {
            return self.no_logits();
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.max_seq_len() {
                return Err(EngineError::InvalidRequest(format!(
                    "position {p} is beyond the maximum sequence length {}",
                    self.max_seq_len()
                )));
            }
        }
        if let Some(&t) = batch
            .token_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::InvalidRequest(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let layout = paged_layout(batch, cache.config().block_size, &self.device)?;
        let mut x = time(Part::Embedding, || self.embed.forward(&batch.token_ids))?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, i, &layout, &self.rope, cache)?;
        }
        let rows = batch.logits_rows();
        if rows.is_empty() {
            return self.no_logits();
        }
        let x = if rows.len() == batch.num_tokens() {
            x
        } else {
            x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
        };
        let x = time(Part::Norms, || self.norm.forward(&x))?;
        time(Part::LmHead, || self.lm_head.forward(&x))
    }
}

/// The compute pool: `threads`, else rayon's default (`RAYON_NUM_THREADS` or every core).
fn compute_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("liftoff-compute-{i}"));
    if let Some(n) = threads {
        b = b.num_threads(n.max(1));
    }
    b.build()
        .map_err(|e| EngineError::InvalidConfig(format!("cannot start compute threads: {e}")))
}

/// The step's attention metadata (made once, on the model's device, for all layers).
fn paged_layout(batch: &BatchInput, block_size: usize, device: &Device) -> Result<PagedLayout> {
    let spans: Vec<SeqSpan> = batch
        .sequences
        .iter()
        .map(|s| SeqSpan {
            query_start: s.start,
            query_len: s.len,
            context_len: match s.len {
                0 => 0,
                n => batch
                    .positions
                    .get(s.start + n - 1)
                    .map_or(0, |&p| p as usize + 1),
            },
            block_table: &s.block_table,
        })
        .collect();
    let layout = PagedLayout::new(&spans, block_size, device)
        .map_err(|e| EngineError::InvalidRequest(format!("malformed batch: {e}")))?;
    if layout.host().num_tokens != batch.num_tokens() {
        return Err(EngineError::InvalidRequest(format!(
            "malformed batch: its sequences cover {} of {} tokens",
            layout.host().num_tokens,
            batch.num_tokens()
        )));
    }
    Ok(layout)
}
