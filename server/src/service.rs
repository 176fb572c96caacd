//! A served model: its tokenizer and replica groups, request validation shared by the APIs,
//! routing to the least-loaded group, and the token stream of one request with its metrics.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Lease;
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::scheduler::{
    GenerationRequest, PromptLogprob, SchedulerHandle, SeqEvent, SubmitError, TokenEvent,
};
use liftoff_engine::sequence::FinishReason;
use liftoff_engine::tokenizer::Tokenizer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Facts about a model shown by `/info` and `/v1/models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub model_name: String,
    pub model_path: String,
    pub consumer_group: String,
    pub dtype: String,
    pub device: String,
    pub tensor_parallel: usize,
    pub replicas: usize,
    pub max_batch_size: usize,
    pub max_sequence_length: usize,
    pub max_num_batched_tokens: usize,
    pub kv_cache_blocks: usize,
    pub block_size: usize,
    /// The worker processes behind the replica groups (empty when they run in the server's
    /// own process).
    pub workers: Vec<WorkerInfo>,
}

/// A worker process of a replica group.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerInfo {
    pub group: usize,
    pub rank: usize,
    pub pid: u32,
    pub device: String,
}

/// One model, served by one or more replica groups.
pub struct ModelService {
    pub info: ModelInfo,
    pub tokenizer: Tokenizer,
    pub replicas: Vec<SchedulerHandle>,
}

/// Defaults applied to requests that leave a field unset.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;

impl ModelService {
    /// Whether at least one replica group is serving.
    pub fn is_healthy(&self) -> bool {
        self.replicas.iter().any(|r| r.is_alive())
    }

    /// Index of the live replica group with the least outstanding work.
    fn pick_replica(&self) -> Option<usize> {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_alive())
            .min_by_key(|(_, r)| {
                let s = r.stats();
                s.running.load(Ordering::Relaxed)
                    + s.waiting.load(Ordering::Relaxed)
                    + s.queued.load(Ordering::Relaxed)
            })
            .map(|(i, _)| i)
    }

    /// Tokenizes a prompt, applying `prompt_max_tokens` (keeps the last tokens) and checking
    /// it against the model's limits; `field` names the request field in errors.
    pub fn prompt_ids(
        &self,
        text: &str,
        chat: bool,
        prompt_max_tokens: Option<usize>,
        field: &str,
    ) -> Result<Vec<u32>, ApiError> {
        if text.is_empty() {
            return Err(ApiError::invalid(
                field,
                format!("{field} must not be empty"),
            ));
        }
        let mut ids = self
            .tokenizer
            .encode_prompt(text, chat)
            .map_err(|e| ApiError::invalid(field, e.to_string()))?;
        if let Some(max) = prompt_max_tokens {
            if max == 0 {
                return Err(ApiError::invalid(
                    "prompt_max_tokens",
                    "prompt_max_tokens must be at least 1",
                ));
            }
            if ids.len() > max {
                ids.drain(..ids.len() - max);
            }
        }
        self.check_prompt_len(ids.len(), field)?;
        Ok(ids)
    }

    /// Rejects prompts that leave no room to generate.
    pub fn check_prompt_len(&self, len: usize, field: &str) -> Result<(), ApiError> {
        if len >= self.info.max_sequence_length {
            return Err(ApiError::invalid(
                field,
                format!(
                    "the prompt has {len} tokens; the maximum sequence length is {} (prompt and output together)",
                    self.info.max_sequence_length
                ),
            ));
        }
        Ok(())
    }

    /// Fits `max_new_tokens` into the context: an explicit value that does not fit is an
    /// error; the default is shortened.
    pub fn max_new_tokens(
        &self,
        prompt_len: usize,
        requested: Option<usize>,
        field: &str,
    ) -> Result<usize, ApiError> {
        let room = self.info.max_sequence_length.saturating_sub(prompt_len);
        match requested {
            Some(0) => Err(ApiError::invalid(field, format!("{field} must be at least 1"))),
            Some(n) if n > room => Err(ApiError::invalid(
                field,
                format!(
                    "{field} = {n} does not fit: the prompt has {prompt_len} tokens and the maximum sequence length is {}",
                    self.info.max_sequence_length
                ),
            )),
            Some(n) => Ok(n),
            None => Ok(DEFAULT_MAX_NEW_TOKENS.min(room)),
        }
    }

    /// Sends a request to a replica group; the returned stream carries its tokens.
    pub fn submit(
        self: &Arc<Self>,
        prompt: Vec<u32>,
        params: SamplingParams,
        metrics: &Arc<Metrics>,
    ) -> Result<TokenStream, ApiError> {
        params.validate().map_err(|e| ApiError::param(&e, &[]))?;
        let idx = self.pick_replica().ok_or_else(|| {
            ApiError::unavailable("no healthy replica group is serving this model", Some(5))
        })?;
        let (tx, rx) = unbounded_channel();
        let prompt_len = prompt.len();
        let arrival = Instant::now();
        self.replicas[idx]
            .submit(GenerationRequest {
                prompt,
                params,
                events: tx,
                arrival,
            })
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => {
                    ApiError::unavailable(format!("{e}; retry later"), Some(1))
                }
                SubmitError::Unavailable => ApiError::unavailable(e.to_string(), Some(5)),
            })?;
        let model = self.info.model_name.clone();
        metrics
            .group_requests
            .with_label_values(&[&model, &idx.to_string()])
            .inc();
        metrics
            .prompt_tokens
            .with_label_values(&[&model])
            .inc_by(prompt_len as u64);
        Ok(TokenStream {
            rx,
            arrival,
            last: None,
            generated: 0,
            metrics: metrics.clone(),
            model,
            prompt_tokens: prompt_len,
            lease: None,
            pending: None,
        })
    }
}

/// The seed sample `i` of a seeded request draws with: `seed + i` (OpenAI's `n` and the
/// `best_of`s; TGI reports it in each sequence's details).
pub fn sample_seed(seed: Option<u64>, i: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add(i as u64))
}

impl Lease {
    /// Sends a request to the leased reader; the stream keeps the reader loaded until it ends
    /// and records the reader's metrics.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        metrics: &Arc<Metrics>,
    ) -> Result<TokenStream, ApiError> {
        match self.service().submit(prompt, params, metrics) {
            Ok(mut s) => {
                s.lease = Some(self.clone());
                Ok(s)
            }
            Err(e) => {
                metrics.reader_failure(self.labels());
                Err(e)
            }
        }
    }

    /// Submits `n` (at least one) samples of one prompt (OpenAI's `n`, the `best_of`s). The
    /// first is computed alone; the others are sent once its prompt is in the cache, so they
    /// share its blocks (the prefix cache) instead of computing the prompt again, as vLLM's
    /// parallel samples share theirs. Sample `i` draws with [`sample_seed`]; only the first
    /// asks for the prompt's log-probabilities.
    pub async fn submit_samples(
        &self,
        ids: Vec<u32>,
        params: SamplingParams,
        n: usize,
        metrics: &Arc<Metrics>,
    ) -> Result<Vec<TokenStream>, ApiError> {
        debug_assert!(n >= 1, "no samples asked for");
        let mut first = self.submit(ids.clone(), params.clone(), metrics)?;
        if n <= 1 {
            return Ok(vec![first]);
        }
        // A prompt shorter than a block has nothing to share: no reason to wait.
        if ids.len() >= self.service().info.block_size {
            first.peek().await;
            if let Some(e) = first.peeked_error() {
                return Err(e);
            }
        }
        let mut out = vec![first];
        for i in 1..n {
            let p = SamplingParams {
                seed: sample_seed(params.seed, i),
                prompt_logprobs: None,
                ..params.clone()
            };
            out.push(self.submit(ids.clone(), p, metrics)?);
        }
        Ok(out)
    }
}

/// The tokens of one request, recording latency metrics as they arrive.
pub struct TokenStream {
    rx: UnboundedReceiver<SeqEvent>,
    arrival: Instant,
    last: Option<Instant>,
    /// Tokens generated so far, as the last event reported.
    generated: usize,
    metrics: Arc<Metrics>,
    model: String,
    pub prompt_tokens: usize,
    /// The reader it runs on, kept loaded while the stream lives.
    lease: Option<Lease>,
    /// An event [`peek`](Self::peek) read ahead.
    pending: Option<Option<Result<TokenEvent, ApiError>>>,
}

impl TokenStream {
    /// The next token; `Err` when the request failed. `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<TokenEvent, ApiError>> {
        if let Some(ev) = self.pending.take() {
            return ev;
        }
        let ev = self.recv().await;
        if let (Some(Err(_)), Some(lease)) = (&ev, &self.lease) {
            self.metrics.reader_failure(lease.labels());
        }
        ev
    }

    /// Waits for the first event (the request's prompt is then computed, its full blocks in
    /// the prefix cache) and keeps it for [`next`](Self::next).
    pub async fn peek(&mut self) {
        if self.pending.is_none() {
            let ev = self.next().await;
            self.pending = Some(ev);
        }
    }

    /// The error [`peek`](Self::peek) read ahead, if the request failed at once.
    pub fn peeked_error(&self) -> Option<ApiError> {
        match &self.pending {
            Some(Some(Err(e))) => Some(e.clone()),
            _ => None,
        }
    }

    /// The prompt's log-probabilities, when the request asked for them: the first event
    /// carries them (it is read ahead and kept for [`next`](Self::next), without them).
    pub async fn prompt_logprobs(&mut self) -> Vec<PromptLogprob> {
        self.peek().await;
        match &mut self.pending {
            Some(Some(Ok(ev))) => ev.prompt_logprobs.take().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn recv(&mut self) -> Option<Result<TokenEvent, ApiError>> {
        let ev = match self.rx.recv().await {
            None => {
                return Some(Err(ApiError::unavailable(
                    "the replica group stopped while serving the request",
                    Some(5),
                )))
            }
            Some(SeqEvent::Error(msg)) => return Some(Err(ApiError::internal(msg))),
            Some(SeqEvent::Unavailable(msg)) => {
                return Some(Err(ApiError::unavailable(msg, Some(5))))
            }
            Some(SeqEvent::Token(t)) => t,
        };
        let now = Instant::now();
        let m = &self.metrics;
        let l = [self.model.as_str()];
        match self.last {
            None => {
                m.ttft
                    .with_label_values(&l)
                    .observe((now - self.arrival).as_secs_f64());
                if let Some(q) = ev.queue_time {
                    m.queue_time.with_label_values(&l).observe(q.as_secs_f64());
                    if let Some(lease) = &self.lease {
                        m.reader_queued(lease.labels(), (lease.waited() + q).as_secs_f64());
                    }
                }
            }
            Some(prev) => m
                .inter_token
                .with_label_values(&l)
                .observe((now - prev).as_secs_f64()),
        }
        self.last = Some(now);
        // An early finish repeats the count without a new token.
        let new = ev.generated_tokens.saturating_sub(self.generated);
        self.generated = self.generated.max(ev.generated_tokens);
        m.generation_tokens.with_label_values(&l).inc_by(new as u64);
        if ev.finished.is_some() {
            m.e2e
                .with_label_values(&l)
                .observe((now - self.arrival).as_secs_f64());
            self.rx.close();
        }
        Some(Ok(ev))
    }
}

/// A whole generation, for the non-streaming routes.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The events that carried a generated token, in order.
    pub events: Vec<TokenEvent>,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
}

impl Completion {
    /// The mean log-probability of the generated tokens, how TGI and OpenAI rank `best_of`
    /// samples: minus infinity without tokens, or with a log-probability missing (not asked
    /// for) or not a number, so that such a sample ranks last.
    pub fn mean_logprob(&self) -> f32 {
        let sum = self
            .events
            .iter()
            .try_fold(0f32, |sum, ev| ev.logprob.map(|l| sum + l));
        match sum {
            Some(sum) if !self.events.is_empty() => {
                let mean = sum / self.events.len() as f32;
                if mean.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    mean
                }
            }
            _ => f32::NEG_INFINITY,
        }
    }

    /// The indices of `samples` from the highest [`Self::mean_logprob`] down (equals in
    /// their order).
    pub fn ranked(samples: &[Completion]) -> Vec<usize> {
        let keys: Vec<f32> = samples.iter().map(Self::mean_logprob).collect();
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]));
        order
    }
}

impl TokenStream {
    /// Reads every stream to its end, all at once.
    pub async fn collect_all(streams: Vec<TokenStream>) -> Result<Vec<Completion>, ApiError> {
        futures::future::try_join_all(streams.into_iter().map(TokenStream::collect)).await
    }

    /// Reads the stream to its end.
    pub async fn collect(mut self) -> Result<Completion, ApiError> {
        let mut c = Completion {
            prompt_tokens: self.prompt_tokens,
            ..Default::default()
        };
        while let Some(ev) = self.next().await {
            let ev = ev?;
            c.text.push_str(&ev.text);
            c.cached_tokens = ev.cached_tokens;
            let finished = ev.finished;
            if ev.generated_tokens > c.token_ids.len() {
                c.token_ids.push(ev.token_id);
                c.top_logprobs.push(ev.top_logprobs.clone());
                c.events.push(ev);
            }
            if finished.is_some() {
                c.finish_reason = finished;
                break;
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(logprobs: &[Option<f32>]) -> Completion {
        let events = logprobs
            .iter()
            .enumerate()
            .map(|(i, &logprob)| TokenEvent {
                token_id: i as u32,
                text: String::new(),
                top_logprobs: Vec::new(),
                logprob,
                finished: None,
                prompt_tokens: 1,
                cached_tokens: 0,
                generated_tokens: i + 1,
                queue_time: None,
                prompt_logprobs: None,
            })
            .collect();
        Completion {
            events,
            ..Default::default()
        }
    }

    /// Samples rank by their mean token log-probability (not the sum: a longer sample is not
    /// worse for it), equals in their order, and one without tokens, with a log-probability
    /// missing or one that is not a number after every finite one.
    #[test]
    fn samples_rank_by_mean_logprob() {
        let samples = [
            sample(&[Some(-1.0), Some(-1.0)]), // mean -1
            sample(&[Some(-0.5), Some(-0.5), Some(-0.5), Some(-0.5)]), // mean -0.5, sum -2
            sample(&[]),                       // no tokens
            sample(&[Some(-0.1), None]),       // a missing one
            sample(&[Some(f32::NAN)]),         // not a number
            sample(&[Some(-2.0), Some(0.0)]),  // mean -1, after its equal
            sample(&[Some(f32::NEG_INFINITY)]), // an impossible token
        ];
        assert_eq!(samples[1].mean_logprob(), -0.5);
        let order = Completion::ranked(&samples);
        assert_eq!(&order[..3], &[1, 0, 5]);
        let mut rest = order[3..].to_vec();
        rest.sort();
        assert_eq!(rest, vec![2, 3, 4, 6]);
        assert!(order[3..]
            .iter()
            .all(|&i| samples[i].mean_logprob() == f32::NEG_INFINITY));
    }

    #[test]
    fn sample_seeds_count_up_from_the_request_seed() {
        assert_eq!(sample_seed(Some(7), 0), Some(7));
        assert_eq!(sample_seed(Some(7), 2), Some(9));
        assert_eq!(sample_seed(Some(u64::MAX), 1), Some(0));
        assert_eq!(sample_seed(None, 3), None);
    }
}
