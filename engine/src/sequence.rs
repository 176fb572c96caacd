//! The state of one request's sequence while it generates: sampling, stop conditions and
//! incremental text. The CLI's single generation and the scheduler share it.

use crate::error::Result;
use crate::sampling::{
    apply_min_new_tokens, apply_no_repeat_ngram, apply_repetition_penalty, top_logprobs, Sampler,
    SamplingParams,
};
use crate::stop::StopChecker;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use serde::{Deserialize, Serialize};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` or the maximum sequence length was reached.
    Length,
    /// An EOS token or a stop string.
    Stop,
    /// The client went away or the request was aborted.
    Cancelled,
}

impl FinishReason {
    /// The name OpenAI and Takeoff clients expect.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One generation step's result for a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStep {
    pub token_id: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// Top log-probabilities, when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Set when this token ended the sequence.
    pub finished: Option<FinishReason>,
}

/// A generating sequence.
#[derive(Debug, Clone)]
pub struct SequenceState {
    /// Prompt then generated ids, in one list (the history the processors read).
    tokens: Vec<u32>,
    prompt_len: usize,
    params: SamplingParams,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopChecker,
    max_total_len: usize,
    finished: Option<FinishReason>,
}

impl SequenceState {
    /// A sequence for `prompt`, limited to `max_total_len` tokens in all.
    pub fn new(prompt: Vec<u32>, params: SamplingParams, max_total_len: usize) -> Self {
        Self {
            decoder: IncrementalDecoder::new(&prompt),
            sampler: Sampler::new(params.seed),
            stop: StopChecker::new(params.stop.clone()),
            prompt_len: prompt.len(),
            tokens: prompt,
            params,
            max_total_len,
            finished: None,
        }
    }

    /// The prompt ids.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The ids generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Prompt and generated ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Prompt and generated ids.
    pub fn total_len(&self) -> usize {
        self.tokens.len()
    }

    /// The request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Marks the sequence cancelled.
    pub fn cancel(&mut self) {
        self.finished.get_or_insert(FinishReason::Cancelled);
    }

    /// Samples the next token from `logits` (modified in place by the processors), appends it,
    /// decodes its text and checks the stop conditions.
    pub fn step(
        &mut self,
        logits: &mut [f32],
        tokenizer: &Tokenizer,
        eos: &[u32],
    ) -> Result<TokenStep> {
        let top = if self.params.logprobs > 0 {
            top_logprobs(logits, self.params.logprobs)
        } else {
            Vec::new()
        };
        apply_repetition_penalty(logits, &self.tokens, self.params.repetition_penalty);
        apply_no_repeat_ngram(logits, &self.tokens, self.params.no_repeat_ngram_size);
        if !self.params.ignore_eos {
            apply_min_new_tokens(
                logits,
                self.generated().len(),
                self.params.min_new_tokens,
                eos,
            );
        }
        let token = self.sampler.sample(logits, &self.params);
        self.tokens.push(token);

        let mut finished = None;
        let mut text = String::new();
        let mut hit_stop_string = false;
        if !self.params.ignore_eos && eos.contains(&token) {
            finished = Some(FinishReason::Stop);
        } else {
            let piece = self.decoder.push(tokenizer, token)?;
            let outcome = self.stop.push(&piece);
            text = outcome.emit;
            if outcome.stopped {
                hit_stop_string = true;
                finished = Some(FinishReason::Stop);
            }
        }
        if finished.is_none()
            && (self.generated().len() >= self.params.max_new_tokens
                || self.total_len() >= self.max_total_len)
        {
            finished = Some(FinishReason::Length);
        }
        if finished.is_some() && !hit_stop_string {
            // Release what the decoder and the stop checker held back; a stop string may
            // still complete inside the flushed text.
            let rest = self.decoder.flush(tokenizer)?;
            let outcome = self.stop.push(&rest);
            text.push_str(&outcome.emit);
            if outcome.stopped {
                finished = Some(FinishReason::Stop);
            } else {
                text.push_str(&self.stop.flush());
            }
        }
        self.finished = finished;
        Ok(TokenStep {
            token_id: token,
            text,
            top_logprobs: top,
            finished,
        })
    }
}
