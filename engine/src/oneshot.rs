//! One generation at a time, on the same [`Scheduler`] and executors the server runs (the
//! CLI's `generate` and the reference tests against transformers): the scheduler is stepped
//! on the calling thread until the request ends, so what is checked here is what serves.

use crate::error::{EngineError, Result};
use crate::kv_budget::KvBudget;
use crate::load::{EngineOptions, LoadedModel};
use crate::parallel::SingleRank;
use crate::sampling::SamplingParams;
use crate::scheduler::{
    Executor, GenerationRequest, LocalExecutor, Scheduler, SchedulerConfig, SeqEvent, TokenEvent,
};
use crate::sequence::FinishReason;
use crate::tokenizer::Tokenizer;
use candle_core::Device;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

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
    /// Per prompt position but the last, the top `[token_id, logprob]` pairs of the next
    /// token (when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Vec<(u32, f32)>>>,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// A scheduler over one executor (the model in this process, or a tensor-parallel group of
/// worker processes), driven one request at a time.
pub struct Engine {
    scheduler: Scheduler<Box<dyn Executor>>,
    tokenizer: Tokenizer,
}

impl Engine {
    /// Loads the model on the CPU as a group of one rank, with a cache for one sequence of
    /// the longest length.
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
        let config = SchedulerConfig {
            max_batch_size: 1,
            max_num_batched_tokens: max_batched_tokens.max(1),
            max_seq_len,
            // Each call stands alone (and reference runs must not reuse other prompts' keys).
            enable_prefix_caching: false,
            ..SchedulerConfig::default()
        };
        Self {
            scheduler: Scheduler::new(config, executor, tokenizer.clone()),
            tokenizer,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Generates from `prompt_ids`; `on_token` sees every token as it is produced.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        mut on_token: impl FnMut(&TokenEvent),
    ) -> Result<Generation> {
        params.validate()?;
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let start = Instant::now();
        self.scheduler.add(GenerationRequest {
            prompt: prompt_ids.to_vec(),
            params: params.clone(),
            events,
            arrival: start,
        });
        let mut g = Generation {
            prompt_token_ids: prompt_ids.to_vec(),
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Stop,
            top_logprobs: (params.logprobs > 0).then(Vec::new),
            prompt_logprobs: None,
            prompt_tokens_per_s: 0.0,
            decode_tokens_per_s: 0.0,
        };
        let mut first_token_at = None;
        loop {
            while let Ok(ev) = rx.try_recv() {
                let t = match ev {
                    SeqEvent::Token(t) => t,
                    SeqEvent::Error(m) => return Err(EngineError::Generation(m)),
                    SeqEvent::Unavailable(m) => return Err(EngineError::WorkerLost(m)),
                };
                on_token(&t);
                let now = Instant::now();
                let first = *first_token_at.get_or_insert(now);
                if let Some(p) = t.prompt_logprobs.clone() {
                    g.prompt_logprobs = Some(p);
                }
                // A request ended before any token (out of memory) carries none.
                if t.generated_tokens > g.token_ids.len() {
                    g.token_ids.push(t.token_id);
                    g.text.push_str(&t.text);
                    if let Some(top) = &mut g.top_logprobs {
                        top.push(t.top_logprobs.clone());
                    }
                }
                if let Some(f) = t.finished {
                    let prefill = (first - start).as_secs_f64().max(1e-9);
                    g.prompt_tokens_per_s = prompt_ids.len() as f64 / prefill;
                    let decoded = g.token_ids.len().saturating_sub(1);
                    if decoded > 0 {
                        g.decode_tokens_per_s =
                            decoded as f64 / (now - first).as_secs_f64().max(1e-9);
                    }
                    g.finish_reason = if f == FinishReason::Cancelled {
                        FinishReason::Stop
                    } else {
                        f
                    };
                    return Ok(g);
                }
            }
            if !self.scheduler.step() && rx.is_empty() {
                return Err(match self.scheduler.failure() {
                    Some(m) => EngineError::WorkerLost(m.to_string()),
                    None => EngineError::Generation(
                        "the scheduler stopped before the request finished".into(),
                    ),
                });
            }
        }
    }

    /// The top `n` log-probabilities of the next token at every position of `ids` (the
    /// prompt's positions and the first generated token's distribution), through the
    /// scheduler: vLLM's `prompt_logprobs` plus one greedy step.
    pub fn prompt_logprobs(&mut self, ids: &[u32], n: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let params = SamplingParams {
            logprobs: n,
            prompt_logprobs: n,
            ..SamplingParams::greedy(1)
        };
        let g = self.generate(ids, &params, |_| {})?;
        let mut rows = g.prompt_logprobs.unwrap_or_default();
        rows.extend(g.top_logprobs.unwrap_or_default());
        if rows.len() != ids.len() {
            return Err(EngineError::Generation(format!(
                "{} log-probability rows for {} positions",
                rows.len(),
                ids.len()
            )));
        }
        Ok(rows)
    }
}
