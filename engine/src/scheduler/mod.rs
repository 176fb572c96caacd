//! Continuous batching for one replica group: waiting and running queues, a token budget per
//! step mixing decodes with (chunked) prefills, prefix caching, and preemption by recompute
//! when KV blocks run out. One scheduler thread owns the group's executor; requests arrive on
//! a channel and every token goes back on the request's own channel.

mod executor;
mod handle;
mod stats;
mod step_budget;
#[cfg(test)]
mod tests;

pub use executor::{Executor, LocalExecutor, StepTiming};
pub use handle::{SchedulerHandle, SubmitError};
pub use stats::SchedulerStats;
pub use step_budget::{StepCostModel, StepTarget, AUTO_FACTOR, MIN_PREFILL_TOKENS};

use crate::batch::{BatchInput, LogitsWanted};
use crate::constraint::SeqConstraint;
use crate::kv_cache::{BlockManager, PrefixId};
use crate::model_runner::RowMasks;
use crate::sampling::{RowSampling, SampledToken, SamplingParams};
use crate::sequence::{FinishReason, SequenceState};
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Limits of one scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_batch_size: usize,
    /// Most tokens in one forward pass (decodes + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Most requests waiting; more are refused (HTTP 503).
    pub max_waiting: usize,
    /// Longest prompt + output.
    pub max_seq_len: usize,
    /// Share full prompt blocks between requests with the same prefix.
    pub enable_prefix_caching: bool,
    /// When idle, how long the first request waits for others to batch with it
    /// (Takeoff's batch duration; zero starts at once).
    pub batch_wait: Duration,
    /// How long a step that decodes may take when prompts are prefilled beside it.
    pub max_step: StepTarget,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_num_batched_tokens: 512,
            max_waiting: 256,
            max_seq_len: 2048,
            enable_prefix_caching: true,
            batch_wait: Duration::ZERO,
            max_step: StepTarget::Auto,
        }
    }
}

/// A request for the scheduler.
#[derive(Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Where the tokens go; dropping the receiver cancels the request.
    pub events: UnboundedSender<SeqEvent>,
    pub arrival: Instant,
}

/// One token of a sequence, as sent to its client.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token_id: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    pub top_logprobs: Vec<(u32, f32)>,
    /// The token's own log-probability, when the request asks for it.
    pub logprob: Option<f32>,
    pub finished: Option<FinishReason>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache (at first admission).
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// Time from arrival to admission, on the first token only.
    pub queue_time: Option<Duration>,
    /// On the first token, when asked for ([`SamplingParams::prompt_logprobs`]): entry `i`
    /// describes prompt token `i + 1` (the first prompt token has none).
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
}

/// A prompt token's log-probability given the prompt before it (OpenAI's `echo` with
/// `logprobs`), and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLogprob {
    /// The prompt token.
    pub token: u32,
    /// Its log-probability in the model's raw distribution at its position.
    pub logprob: f32,
    /// The top `n` `(token, log-probability)` there, most likely first (`n` as asked).
    pub top: Vec<(u32, f32)>,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token(TokenEvent),
    /// The request failed; nothing more follows.
    Error(String),
    /// The replica group went down (a worker died); nothing more follows. HTTP 503.
    Unavailable(String),
}

struct Entry {
    state: SequenceState,
    table: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    /// Full blocks offered to the prefix cache.
    registered: usize,
    /// The cached prefix the next full block is registered after (`Some(None)`: none yet);
    /// `None` once a block could not be cached (the rest are not either).
    chain: Option<Option<PrefixId>>,
    events: UnboundedSender<SeqEvent>,
    arrival: Instant,
    queue_time: Option<Duration>,
    /// Prompt log-probabilities gathered so far (entry `i` for prompt token `i + 1`), when the
    /// request asks for them.
    prompt_logprobs: Vec<PromptLogprob>,
    /// Prompt tokens found in the prefix cache at the first admission.
    cached_tokens: Option<usize>,
    /// Constrained decoding: where the output is in its grammar.
    constraint: Option<SeqConstraint>,
}

/// What a step asks of one sequence's chunk.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Index in `running`.
    idx: usize,
    /// First position and number of tokens.
    first: usize,
    took: usize,
    /// Rows of prompt log-probabilities the chunk returns (before the sampled row).
    prompt_rows: usize,
    /// Whether its last row is sampled (the chunk reaches the end of the sequence).
    wants: bool,
}

impl Entry {
    /// Returns the sequence's blocks; it will be computed again from its first token.
    fn release_blocks(&mut self, blocks: &mut BlockManager) {
        blocks.release(&self.table);
        self.table.clear();
        self.computed = 0;
        self.registered = 0;
        self.chain = Some(None);
    }

    /// Whether the prompt's log-probabilities are still to be computed.
    fn wants_prompt_logprobs(&self) -> bool {
        self.state.params().prompt_logprobs.is_some() && self.state.generated().is_empty()
    }

    /// Adds the next `take` uncomputed tokens to `batch`: the last one's logits when they
    /// reach the end of the sequence, and every prompt position's when the request asks for
    /// prompt log-probabilities.
    fn push_chunk(&self, batch: &mut BatchInput, idx: usize, take: usize) -> Chunk {
        let tokens = self.state.tokens();
        let first = self.computed;
        let wants = first + take == tokens.len();
        let prompt_rows = if self.wants_prompt_logprobs() {
            // Positions before the prompt's last one (that one's row is the sampled one): all
            // of the chunk's rows but the sampled one.
            (first + take)
                .min(self.state.prompt().len() - 1)
                .saturating_sub(first)
        } else {
            0
        };
        let logits = if prompt_rows > 0 {
            LogitsWanted::All
        } else if wants {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        batch.push_sequence(&tokens[first..first + take], first, &self.table, logits);
        Chunk {
            idx,
            first,
            took: take,
            prompt_rows,
            wants,
        }
    }
}

/// The scheduler of one replica group.
pub struct Scheduler<E: Executor> {
    config: SchedulerConfig,
    executor: E,
    blocks: BlockManager,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    waiting: VecDeque<Entry>,
    running: Vec<Entry>,
    stats: Arc<SchedulerStats>,
    /// Learned step cost, for sizing prefill chunks.
    cost: StepCostModel,
    /// Set when a step failed fatally; the scheduler then serves nothing more.
    failed: Option<String>,
}

impl<E: Executor> Scheduler<E> {
    /// A scheduler over `executor`'s KV cache.
    pub fn new(config: SchedulerConfig, executor: E, tokenizer: Tokenizer) -> Self {
        let (num_blocks, block_size) = executor.kv_blocks();
        let stats = Arc::new(SchedulerStats::default());
        stats
            .kv_blocks_total
            .store(num_blocks as u64, Ordering::Relaxed);
        Self {
            eos: tokenizer.eos_token_ids().to_vec(),
            blocks: BlockManager::new(num_blocks, block_size, config.enable_prefix_caching),
            config,
            executor,
            tokenizer,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats,
            cost: StepCostModel::default(),
            failed: None,
        }
    }

    /// Shared counters (read by `/metrics`).
    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a request (it is checked here; bad ones get an error event).
    pub fn add(&mut self, req: GenerationRequest) {
        let fail = |msg: String| {
            let _ = req.events.send(SeqEvent::Error(msg));
        };
        if let Err(e) = req.params.validate() {
            return fail(e.to_string());
        }
        if req.prompt.is_empty() {
            return fail("the prompt is empty".into());
        }
        if req.prompt.len() >= self.config.max_seq_len {
            return fail(format!(
                "the prompt has {} tokens; the maximum sequence length is {}",
                req.prompt.len(),
                self.config.max_seq_len
            ));
        }
        if self.blocks.blocks_for(req.prompt.len() + 1) > self.blocks.num_blocks() {
            return fail(format!(
                "the prompt has {} tokens, more than the KV cache holds",
                req.prompt.len()
            ));
        }
        let vocab = self.tokenizer.vocab_size();
        if let Some(&(t, _)) = req.params.logit_bias.iter().find(|b| b.0 as usize >= vocab) {
            return fail(format!(
                "logit_bias: token {t} is outside the vocabulary of {vocab}"
            ));
        }
        let constraint = match &req.params.constraint {
            None => None,
            Some(c) => match self.tokenizer.grammar().and_then(|g| g.matcher(c)) {
                Ok(m) => Some(m),
                Err(e) => return fail(format!("the constraint cannot be used: {e}")),
            },
        };
        self.waiting.push_back(Entry {
            state: SequenceState::new(req.prompt, req.params, self.config.max_seq_len),
            table: Vec::new(),
            computed: 0,
            registered: 0,
            chain: Some(None),
            events: req.events,
            arrival: req.arrival,
            queue_time: None,
            prompt_logprobs: Vec::new(),
            cached_tokens: None,
            constraint,
        });
        self.publish_stats();
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.waiting
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.blocks.num_used() as u64, Ordering::Relaxed);
        s.kv_blocks_cached
            .store(self.blocks.num_cached() as u64, Ordering::Relaxed);
        let p = self.blocks.stats();
        s.prefix_queried_blocks
            .store(p.queried_blocks, Ordering::Relaxed);
        s.prefix_hit_blocks.store(p.hit_blocks, Ordering::Relaxed);
    }

    /// Drops sequences whose client went away, returning their blocks.
    fn drop_cancelled(&mut self) {
        let blocks = &mut self.blocks;
        let stats = &self.stats;
        let mut drop = |e: &Entry| {
            if e.events.is_closed() {
                blocks.release(&e.table);
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                true
            }
        };
        self.running.retain(&mut drop);
        self.waiting.retain(&mut drop);
    }

    /// Frees a running sequence's blocks and puts it back at the head of the queue; it will be
    /// recomputed from its prompt and generated tokens.
    fn preempt(&mut self, idx: usize) {
        let mut e = self.running.remove(idx);
        e.release_blocks(&mut self.blocks);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(e);
    }

    /// Plans and runs one step. Returns false when there was nothing to do.
    ///
    /// Every running sequence that decodes gets its token; prompts (chunks of running ones
    /// first, then new admissions) share the prefill budget: the token budget, and, when the
    /// step also decodes, the tokens that fit in the step-time target.
    pub fn step(&mut self) -> bool {
        self.drop_cancelled();
        let bs = self.blocks.block_size();
        let remaining = |e: &Entry| e.state.total_len() - e.computed;
        let decode_rows = self
            .running
            .iter()
            .filter(|e| remaining(e) == 1)
            .count()
            .min(self.config.max_num_batched_tokens);
        let mut budget = self.config.max_num_batched_tokens;
        let mut prefill = budget - decode_rows;
        // The streams' pace: every sequence in hand decoding, within the batch limit.
        let pace_rows = (self.running.len() + self.waiting.len()).min(self.config.max_batch_size);
        if let Some(t) = self
            .cost
            .prefill_tokens(self.config.max_step, decode_rows, pace_rows)
        {
            prefill = prefill.min(t);
        }
        let mut batch = BatchInput::default();
        let mut plan: Vec<Chunk> = Vec::new();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let left = remaining(&self.running[i]);
            let take = if left == 1 { 1 } else { left.min(prefill) };
            if take == 0 {
                i += 1;
                continue;
            }
            let e = &mut self.running[i];
            if !self.blocks.ensure_capacity(&mut e.table, e.computed + take) {
                let victim = self.running.len() - 1;
                if victim == 0 {
                    // Alone and out of memory: end it rather than loop.
                    let e = self.running.remove(0);
                    self.finish_early(e, FinishReason::Length);
                    break;
                }
                self.preempt(victim);
                if victim == i {
                    break;
                }
                continue;
            }
            plan.push(e.push_chunk(&mut batch, i, take));
            budget -= take;
            if left > 1 {
                prefill -= take;
            }
            i += 1;
        }

        while prefill > 0 && budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(mut e) = self.waiting.pop_front() else {
                break;
            };
            let tokens = e.state.tokens();
            // A prompt whose log-probabilities are wanted is computed whole.
            if e.computed == 0 && e.table.is_empty() && !e.wants_prompt_logprobs() {
                let (table, prefix) = self.blocks.match_prefix(tokens);
                e.computed = table.len() * bs;
                e.cached_tokens.get_or_insert(e.computed);
                e.registered = table.len();
                e.chain = Some(prefix);
                e.table = table;
            }
            let take = (tokens.len() - e.computed).min(prefill).min(budget);
            if !self.blocks.ensure_capacity(&mut e.table, e.computed + take) {
                e.release_blocks(&mut self.blocks);
                self.waiting.push_front(e);
                break;
            }
            e.queue_time.get_or_insert_with(|| e.arrival.elapsed());
            plan.push(e.push_chunk(&mut batch, self.running.len(), take));
            self.running.push(e);
            budget -= take;
            prefill -= take;
        }

        if plan.is_empty() {
            self.publish_stats();
            return false;
        }
        let mut specs: Vec<RowSampling> = Vec::new();
        // Constrained rows: (row in `specs`, index in `running`).
        let mut constrained: Vec<(usize, usize)> = Vec::new();
        for c in &plan {
            let state = &self.running[c.idx].state;
            // Prompt rows: position `pos` forces the next prompt token, for its log-probability
            // and the asked top ones.
            let prompt = state.prompt();
            let n = state.params().prompt_logprobs.unwrap_or(0) as u32;
            specs.extend((c.first..c.first + c.prompt_rows).map(|pos| RowSampling {
                force: Some(prompt[pos + 1]),
                token_logprob: true,
                logprobs: n,
                ..RowSampling::greedy()
            }));
            if c.wants {
                if self.running[c.idx].constraint.is_some() {
                    constrained.push((specs.len(), c.idx));
                }
                specs.push(state.sampling(&self.eos));
            }
        }
        let predicted = self.cost.predict(batch.num_tokens());
        let t0 = Instant::now();
        let result = if constrained.is_empty() {
            self.executor.execute(&batch, &specs, None)
        } else {
            self.execute_constrained(&batch, &specs, &constrained)
        };
        let took = t0.elapsed();
        self.stats.record_step(batch.num_tokens(), took);
        tracing::trace!(
            target: "liftoff::step",
            decode_rows,
            tokens = batch.num_tokens(),
            sequences = plan.len(),
            micros = took.as_micros() as u64,
            "step"
        );
        if result.is_ok() {
            if let Some(predicted) = predicted {
                // The rows the step really decoded (the plan's one-token chunks that end their
                // sequence), not `decode_rows`, which counts them before a preemption.
                let decoded = plan.iter().filter(|c| c.took == 1 && c.wants).count();
                let prefill = batch.num_tokens() - decoded;
                self.cost.calibrate(decoded, prefill, predicted, took);
            }
            self.cost.observe(batch.num_tokens(), took);
        }
        if let Some(t) = self.executor.last_timing() {
            self.stats.record_timing(t);
        }
        match result {
            Ok(rows) => self.apply(plan, rows),
            Err(e) if e.is_fatal() => {
                let msg = format!("the replica group is down: {e}");
                tracing::error!("{msg}");
                self.fail_all(&msg);
                self.failed = Some(msg);
            }
            Err(e) => {
                let msg = format!("model step failed: {e}");
                tracing::error!("{msg}");
                let mut idx: Vec<usize> = plan.iter().map(|c| c.idx).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let e = self.running.remove(i);
                    self.blocks.release(&e.table);
                    let _ = e.events.send(SeqEvent::Error(msg.clone()));
                }
            }
        }
        self.publish_stats();
        true
    }

    /// Ends every running and waiting request with [`SeqEvent::Unavailable`].
    fn fail_all(&mut self, msg: &str) {
        for e in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.blocks.release(&e.table);
            let _ = e.events.send(SeqEvent::Unavailable(msg.to_string()));
        }
    }

    /// Stops serving: every running and waiting request ends with
    /// [`SeqEvent::Unavailable`]`(msg)`, and so does anything submitted later.
    pub fn abort(&mut self, msg: &str) {
        self.fail_all(msg);
        self.failed = Some(msg.to_string());
    }

    /// Why the group stopped serving, once a step failed fatally.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn finish_early(&mut self, e: Entry, reason: FinishReason) {
        self.blocks.release(&e.table);
        let _ = e.events.send(SeqEvent::Token(TokenEvent {
            token_id: 0,
            text: String::new(),
            top_logprobs: Vec::new(),
            logprob: None,
            finished: Some(reason),
            prompt_tokens: e.state.prompt().len(),
            cached_tokens: e.cached_tokens.unwrap_or(0),
            generated_tokens: e.state.generated().len(),
            queue_time: e.queue_time,
            prompt_logprobs: None,
        }));
    }

    /// Runs a step whose rows `constrained` (`(row, running index)`) sample under grammars:
    /// their masks are computed on another thread while the forward pass runs, and handed
    /// to the executor when it is ready to sample.
    fn execute_constrained(
        &mut self,
        batch: &BatchInput,
        specs: &[RowSampling],
        constrained: &[(usize, usize)],
    ) -> crate::Result<Vec<SampledToken>> {
        let row_of: HashMap<usize, usize> = constrained.iter().map(|&(r, i)| (i, r)).collect();
        let matchers: Vec<(usize, &mut SeqConstraint)> = self
            .running
            .iter_mut()
            .enumerate()
            .filter_map(|(i, e)| Some((*row_of.get(&i)?, e.constraint.as_mut()?)))
            .collect();
        let executor = &mut self.executor;
        let stats = &self.stats;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let t0 = Instant::now();
                let masks: RowMasks = matchers.into_iter().map(|(r, m)| (r, m.mask())).collect();
                stats.record_mask_time(t0.elapsed());
                let _ = tx.send(masks);
            });
            let mut wait = || {
                rx.recv()
                    .map_err(|_| crate::EngineError::InvalidRequest("the mask thread died".into()))
            };
            executor.execute(batch, specs, Some(&mut wait))
        })
    }

    fn apply(&mut self, plan: Vec<Chunk>, rows: Vec<SampledToken>) {
        let bs = self.blocks.block_size();
        let mut rows = rows.into_iter();
        let mut finished = Vec::new();
        for Chunk {
            idx,
            first: first_pos,
            took,
            prompt_rows,
            wants,
        } in plan
        {
            let e = &mut self.running[idx];
            e.computed += took;
            if prompt_rows > 0 {
                let prompt = e.state.prompt();
                let empty = |token| PromptLogprob {
                    token,
                    logprob: f32::NAN,
                    top: Vec::new(),
                };
                if e.prompt_logprobs.len() != prompt.len() - 1 {
                    e.prompt_logprobs = prompt[1..].iter().map(|&t| empty(t)).collect();
                }
                for (pos, row) in (first_pos..first_pos + prompt_rows).zip(rows.by_ref()) {
                    e.prompt_logprobs[pos] = PromptLogprob {
                        token: row.token,
                        logprob: row.logprob.unwrap_or(f32::NAN),
                        top: row.top_logprobs,
                    };
                }
            }
            // Register blocks that became full.
            if (e.registered + 1) * bs <= e.computed {
                let tokens = e.state.tokens();
                while (e.registered + 1) * bs <= e.computed {
                    if let Some(parent) = e.chain {
                        let block = &tokens[e.registered * bs..(e.registered + 1) * bs];
                        e.chain = self
                            .blocks
                            .register(e.table[e.registered], parent, block)
                            .map(Some);
                    }
                    e.registered += 1;
                }
            }
            if !wants {
                continue;
            }
            let Some(sampled) = rows.next() else {
                let _ = e.events.send(SeqEvent::Error(
                    "internal error: missing sampled token".into(),
                ));
                finished.push(idx);
                continue;
            };
            let first = e.state.generated().is_empty();
            if let Some(c) = e.constraint.as_mut() {
                if let Err(why) = c.advance(sampled.token) {
                    let _ = e.events.send(SeqEvent::Error(format!(
                        "constrained decoding failed: {why}"
                    )));
                    finished.push(idx);
                    continue;
                }
            }
            match e.state.accept(sampled, &self.tokenizer, &self.eos) {
                Ok(step) => {
                    let ev = TokenEvent {
                        token_id: step.token_id,
                        text: step.text,
                        top_logprobs: step.top_logprobs,
                        logprob: step.logprob,
                        finished: step.finished,
                        prompt_tokens: e.state.prompt().len(),
                        cached_tokens: e.cached_tokens.unwrap_or(0),
                        generated_tokens: e.state.generated().len(),
                        queue_time: if first { e.queue_time } else { None },
                        prompt_logprobs: (first && e.state.params().prompt_logprobs.is_some())
                            .then(|| std::mem::take(&mut e.prompt_logprobs)),
                    };
                    let gone = e.events.send(SeqEvent::Token(ev)).is_err();
                    if step.finished.is_some() || gone {
                        finished.push(idx);
                    }
                }
                Err(err) => {
                    let _ = e.events.send(SeqEvent::Error(err.to_string()));
                    finished.push(idx);
                }
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for idx in finished {
            let e = self.running.remove(idx);
            self.blocks.release(&e.table);
        }
    }
}
