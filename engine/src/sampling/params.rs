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
    /// Number of top log-probabilities to report at every prompt position (vLLM's
    /// `prompt_logprobs`: position `i` is the distribution of token `i + 1`); 0 for none.
    /// Such a prompt is computed whole (the prefix cache is not read for it).
    pub prompt_logprobs: usize,
    /// Constrained decoding: the output must match this JSON schema or regex.
    #[serde(default)]
    pub constraint: Option<crate::constraint::Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            min_new_tokens: 0,
            max_new_tokens: 128,
            stop: Vec::new(),
            seed: None,
            ignore_eos: false,
            logprobs: 0,
            token_logprobs: false,
            prompt_logprobs: 0,
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
        if self.prompt_logprobs > MAX_LOGPROBS {
            return bad(
                "prompt_logprobs",
                format!("at most {MAX_LOGPROBS}, got {}", self.prompt_logprobs),
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
}
