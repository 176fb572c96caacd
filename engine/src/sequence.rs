//! The state of one request's sequence while it generates: sampling, stop conditions and
//! incremental text. The CLI's single generation and the scheduler share it.

use crate::error::Result;
use crate::sampling::{
    logit_adjustments, min_new_tokens_bans, no_repeat_ngram_bans, penalized_tokens, uniform,
    Penalties, RowSampling, SampledToken, SamplingParams,
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
    /// The token's own log-probability, when asked for.
    pub logprob: Option<f32>,
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
    /// The seed of this sequence's draws (the request's, or a random one).
    seed: u64,
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
            seed: params.seed.unwrap_or_else(rand::random),
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

    /// How the next token is to be sampled: the parameters, the tokens the processors penalise,
    /// adjust or ban given the history, and this step's uniform draw.
    pub fn sampling(&self, eos: &[u32]) -> RowSampling {
        let p = &self.params;
        let mut banned = no_repeat_ngram_bans(&self.tokens, p.no_repeat_ngram_size);
        if !p.ignore_eos {
            banned.extend(min_new_tokens_bans(
                self.generated().len(),
                p.min_new_tokens,
                eos,
            ));
        }
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            typical_p: p.typical_p,
            repetition_penalty: p.repetition_penalty,
            penalized: penalized_tokens(&self.tokens, p.repetition_penalty),
            banned,
            uniform: uniform(self.seed, self.generated().len() as u64),
            logprobs: p.logprobs as u32,
            token_logprob: p.token_logprobs,
            // Set by the scheduler for a constrained row, computed while the step runs.
            allowed: None,
            // OpenAI's penalties count generated tokens only (the prompt is not penalised),
            // TGI's the whole sequence.
            adjust: logit_adjustments(
                Penalties {
                    generated: self.generated(),
                    sequence: &self.tokens,
                    frequency_penalty: p.frequency_penalty,
                    presence_penalty: p.presence_penalty,
                    relative_frequency_penalty: p.relative_frequency_penalty,
                },
                &p.logit_bias,
            ),
            force: None,
        }
    }

    /// Appends the token sampled with [`sampling`](Self::sampling), decodes its text and
    /// checks the stop conditions.
    pub fn accept(
        &mut self,
        sampled: SampledToken,
        tokenizer: &Tokenizer,
        eos: &[u32],
    ) -> Result<TokenStep> {
        let SampledToken {
            token,
            top_logprobs: top,
            logprob,
        } = sampled;
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
            logprob,
            finished,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenAI's penalties count the generated tokens, not the prompt's; biases apply from the
    /// first step; nothing is forced.
    #[test]
    fn sampling_adjusts_for_generated_tokens_only() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-llama2-f32");
        let tok = Tokenizer::from_hf_dir(&dir, vec![2]).unwrap();
        let params = SamplingParams {
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            logit_bias: vec![(40, -2.0)],
            ..SamplingParams::greedy(10)
        };
        let mut s = SequenceState::new(vec![30, 30, 31], params, 64);
        let row = s.sampling(&[2]);
        assert_eq!(row.adjust, vec![(40, -2.0)]);
        assert_eq!(row.force, None);
        for t in [31, 40, 31] {
            let sampled = SampledToken {
                token: t,
                top_logprobs: Vec::new(),
                logprob: None,
            };
            s.accept(sampled, &tok, &[2]).unwrap();
        }
        assert_eq!(s.sampling(&[2]).adjust, vec![(31, -2.5), (40, -3.5)]);
    }
}
