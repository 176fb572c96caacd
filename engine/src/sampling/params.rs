//! Per-request generation parameters, named as Takeoff names them.

use serde::{Deserialize, Serialize};

/// How one request is sampled and when it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Typical sampling (TGI's and transformers' `typical_p`): keep the tokens whose surprisal
    /// is closest to the entropy until this much of the probability is held; 1 disables.
    #[serde(default = "one")]
    pub typical_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already seen; 1 disables.
    pub repetition_penalty: f32,
    /// Forbids repeating any n-gram of this size; 0 disables.
    pub no_repeat_ngram_size: usize,
    /// EOS is masked until this many tokens are generated.
    pub min_new_tokens: usize,
    /// Generation stops after this many tokens.
    pub max_new_tokens: usize,
    /// Generation stops when the text contains one of these (the match is not returned).
    pub stop: Vec<String>,
    /// Seed for reproducible sampling; random when unset.
    pub seed: Option<u64>,
    /// Keep generating past EOS (benchmarks, reference tests).
    pub ignore_eos: bool,
    /// Number of top log-probabilities to report per generated token; 0 for none.
    pub logprobs: usize,
    /// Report each generated token's own log-probability (in the raw distribution).
    pub token_logprobs: bool,
    /// Prompt log-probabilities (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`):
    /// `Some(n)` reports, for every prompt token but the first, its own log-probability given
    /// the tokens before it and the top `n` there (`n` may be 0); `None` for none. Such a
    /// prompt is computed whole (the prefix cache is not read for it).
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
    /// OpenAI's `frequency_penalty` (in [-2, 2]): each generated token's logit is lowered by
    /// this times the number of times it was generated so far; 0 disables.
    #[serde(default)]
    pub frequency_penalty: f32,
    /// OpenAI's `presence_penalty` (in [-2, 2]): lowers the logit of every token generated
    /// so far by this, once; 0 disables.
    #[serde(default)]
    pub presence_penalty: f32,
    /// TGI's `frequency_penalty` (in [-2, 2]): each token of the sequence so far, prompt
    /// included, has its logit lowered by this times its frequency there (its count over the
    /// sequence's length), as TGI's `HeterogeneousFrequencyPenaltyLogitsProcessor` does; 0
    /// disables.
    #[serde(default)]
    pub relative_frequency_penalty: f32,
    /// OpenAI's `logit_bias`: `(token, bias)` pairs (bias in [-100, 100]) added to the logits
    /// at every step.
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Constrained decoding: the output must match this JSON schema or regex.
    #[serde(default)]
    pub constraint: Option<crate::constraint::Constraint>,
}

fn one() -> f32 {
    1.0
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            min_new_tokens: 0,
            max_new_tokens: 128,
            stop: Vec::new(),
            seed: None,
            ignore_eos: false,
            logprobs: 0,
            token_logprobs: false,
            prompt_logprobs: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            relative_frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            constraint: None,
        }
    }
}

/// A sampling parameter out of range: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    /// The engine's name of the field (`temperature`, `top_p`, ...).
    pub field: &'static str,
    pub message: String,
}

/// Largest `logprobs` a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// Largest magnitude of `frequency_penalty`, `presence_penalty` (OpenAI's range) and
/// `relative_frequency_penalty` (TGI's).
pub const MAX_PENALTY: f32 = 2.0;

/// Largest magnitude of a `logit_bias` value (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

impl SamplingParams {
    /// Greedy decoding of `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_new_tokens,
            ..Self::default()
        }
    }

    /// Checks every field, naming the first one that is out of range.
    pub fn validate(&self) -> Result<(), ParamError> {
        let bad = |field: &'static str, message: String| Err(ParamError { field, message });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !self.typical_p.is_finite() || self.typical_p <= 0.0 || self.typical_p > 1.0 {
            return bad(
                "typical_p",
                format!("must be in (0, 1], got {}", self.typical_p),
            );
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(
                "min_new_tokens",
                format!(
                    "{} is larger than max_new_tokens {}",
                    self.min_new_tokens, self.max_new_tokens
                ),
            );
        }
        if self.logprobs > MAX_LOGPROBS {
            return bad(
                "logprobs",
                format!("at most {MAX_LOGPROBS}, got {}", self.logprobs),
            );
        }
        if let Some(n) = self.prompt_logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return bad(
                "prompt_logprobs",
                format!("at most {MAX_LOGPROBS}, got {n}"),
            );
        }
        for (field, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
            (
                "relative_frequency_penalty",
                self.relative_frequency_penalty,
            ),
        ] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) {
                return bad(
                    field,
                    format!("must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v}"),
                );
            }
        }
        if let Some(&(t, b)) = self
            .logit_bias
            .iter()
            .find(|b| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b.1))
        {
            return bad(
                "logit_bias",
                format!("token {t}: must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {b}"),
            );
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "stop sequences must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams {
            min_new_tokens: 9,
            max_new_tokens: 4,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_new_tokens"));
        let p = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn openai_penalties_and_biases_are_range_checked() {
        let field = |p: SamplingParams| p.validate().err().map(|e| e.field);
        let d = SamplingParams::default;
        for (v, ok) in [
            (2.0, true),
            (-2.0, true),
            (0.5, true),
            (2.01, false),
            (-2.5, false),
            (f32::NAN, false),
            (f32::INFINITY, false),
        ] {
            let want = |name| if ok { None } else { Some(name) };
            let p = SamplingParams {
                frequency_penalty: v,
                ..d()
            };
            assert_eq!(field(p), want("frequency_penalty"), "{v}");
            let p = SamplingParams {
                presence_penalty: v,
                ..d()
            };
            assert_eq!(field(p), want("presence_penalty"), "{v}");
            let p = SamplingParams {
                relative_frequency_penalty: v,
                ..d()
            };
            assert_eq!(field(p), want("relative_frequency_penalty"), "{v}");
        }
        for (b, ok) in [
            (100.0, true),
            (-100.0, true),
            (100.5, false),
            (-101.0, false),
            (f32::NAN, false),
            (f32::NEG_INFINITY, false),
        ] {
            let p = SamplingParams {
                logit_bias: vec![(3, 1.0), (5, b)],
                ..d()
            };
            assert_eq!(field(p), (!ok).then_some("logit_bias"), "{b}");
        }
        let p = |n| SamplingParams {
            prompt_logprobs: Some(n),
            ..d()
        };
        assert_eq!(field(p(0)), None);
        assert_eq!(field(p(MAX_LOGPROBS)), None);
        assert_eq!(field(p(MAX_LOGPROBS + 1)), Some("prompt_logprobs"));
    }
}
