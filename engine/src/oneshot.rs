//! One generation at a time, on the same [`Scheduler`] and executors the server runs (the
//! CLI's `generate` and the reference tests against transformers): the scheduler is stepped
//! on the calling thread until the request ends, so what is checked here is what serves.

use crate::error::{EngineError, Result};
use crate::kv_budget::KvBudget;
use crate::load::{EngineOptions, LoadedModel};
use crate::parallel::SingleRank;
use crate::sampling::SamplingParams;
use crate::scheduler::{
    Executor, GenerationRequest, LocalExecutor, PromptLogprob, Scheduler, SchedulerConfig,
    SeqEvent, TokenEvent,
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
    /// Per prompt token but the first, its own log-probability and the top
    /// `[token_id, logprob]` pairs at its position (when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
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
            prompt_logprobs: Some(n),
            ..SamplingParams::greedy(1)
        };
        let g = self.generate(ids, &params, |_| {})?;
        let mut rows: Vec<Vec<(u32, f32)>> = g
            .prompt_logprobs
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.top)
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-llama2-f32");
        Engine::load(&EngineOptions::new(dir)).unwrap()
    }

    /// One greedy token from `prompt` with `params`; returns it, its log-probability and the
    /// top ones.
    fn one(e: &mut Engine, prompt: &[u32], params: &SamplingParams) -> (u32, f32, Vec<(u32, f32)>) {
        let mut seen = None;
        let g = e
            .generate(prompt, params, |t| {
                seen.get_or_insert((t.logprob, t.top_logprobs.clone()));
            })
            .unwrap();
        let (lp, top) = seen.unwrap();
        (g.token_ids[0], lp.expect("a log-probability"), top)
    }

    /// Each prompt token's log-probability under the model, computed independently: the
    /// prefix before it generates one token with a +100 bias on it (so greedy takes it), and
    /// reports its log-probability in the raw distribution; the top log-probabilities there
    /// must equal the entry's too. Where the prompt continues greedily the token is also the
    /// entry's most likely one, with the log-probability the decode step reported for it.
    #[test]
    fn prompt_logprobs_are_each_tokens_own_under_the_model() {
        let mut e = engine();
        let seed = [1u32, 300, 57, 411];
        let greedy = SamplingParams {
            token_logprobs: true,
            ignore_eos: true,
            ..SamplingParams::greedy(5)
        };
        let mut decoded = Vec::new();
        let g = e
            .generate(&seed, &greedy, |t| decoded.push(t.logprob.unwrap()))
            .unwrap();
        let prompt: Vec<u32> = seed.iter().chain(&g.token_ids).copied().collect();
        let n = 5;
        let params = SamplingParams {
            prompt_logprobs: Some(n),
            ..SamplingParams::greedy(1)
        };
        let entries = e
            .generate(&prompt, &params, |_| {})
            .unwrap()
            .prompt_logprobs
            .expect("prompt log-probabilities");
        assert_eq!(entries.len(), prompt.len() - 1);
        // The model's vocabulary is padded past the tokenizer's (which bounds `logit_bias`),
        // and this random model generates such ids too: those are checked as greedy ones only.
        let vocab = e.tokenizer().vocab_size() as u32;
        let mut biased_checks = 0;
        for (i, p) in entries.iter().enumerate() {
            let token = prompt[i + 1];
            assert_eq!(p.token, token, "entry {i}");
            // A log-probability (of a near-uniform model), not a biased one.
            assert!(
                p.logprob < 0.0 && p.logprob > -20.0,
                "entry {i}: {}",
                p.logprob
            );
            assert_eq!(p.top.len(), n);
            if i + 1 >= seed.len() {
                let d = decoded[i + 1 - seed.len()];
                assert_eq!(
                    p.top[0].0, token,
                    "entry {i}: a greedy token is the arg max"
                );
                assert!((p.top[0].1 - p.logprob).abs() < 1e-6);
                assert!(
                    (p.logprob - d).abs() < 1e-4,
                    "entry {i}: {} vs {d}",
                    p.logprob
                );
            } else if let Some(q) = p.top.iter().find(|q| q.0 == token) {
                assert!((q.1 - p.logprob).abs() < 1e-6);
            } else {
                assert!(p.logprob <= p.top[n - 1].1);
            }
            if token >= vocab {
                continue;
            }
            biased_checks += 1;
            let biased = SamplingParams {
                logit_bias: vec![(token, 100.0)],
                token_logprobs: true,
                logprobs: n,
                ignore_eos: true,
                ..SamplingParams::greedy(1)
            };
            let (t, lp, top) = one(&mut e, &prompt[..=i], &biased);
            assert_eq!(t, token, "the bias takes it");
            assert!(
                (p.logprob - lp).abs() < 1e-4,
                "entry {i}: {} vs {lp}",
                p.logprob
            );
            assert_eq!(top.len(), n);
            for (a, b) in p.top.iter().zip(&top) {
                assert!(
                    a.0 == b.0 && (a.1 - b.1).abs() < 1e-4,
                    "{:?} vs {top:?}",
                    p.top
                );
            }
        }
        assert!(
            biased_checks + 1 >= entries.len(),
            "{biased_checks} checked"
        );
    }

    /// `Some(0)`: the tokens' own log-probabilities, no top ones; the helper's rows.
    #[test]
    fn prompt_logprobs_without_top_ones_and_the_rows_helper() {
        let mut e = engine();
        let prompt = [1u32, 20, 30, 40];
        let params = SamplingParams {
            prompt_logprobs: Some(0),
            ..SamplingParams::greedy(1)
        };
        let entries = e
            .generate(&prompt, &params, |_| {})
            .unwrap()
            .prompt_logprobs
            .unwrap();
        assert_eq!(
            entries.iter().map(|p| p.token).collect::<Vec<_>>(),
            prompt[1..]
        );
        assert!(entries
            .iter()
            .all(|p| p.top.is_empty() && p.logprob.is_finite() && p.logprob < 0.0));
        let rows = e.prompt_logprobs(&prompt, 3).unwrap();
        assert_eq!(rows.len(), prompt.len());
        assert!(rows.iter().all(|r| r.len() == 3));
    }
}
