//! Sampling: the Takeoff parameters, logits processors (repetition penalty, no-repeat n-grams,
//! minimum length) and the seeded sampler (temperature, top-k, top-p; greedy at temperature 0).

mod params;
mod processors;
mod sampler;

pub use params::{ParamError, SamplingParams};
pub use processors::{apply_min_new_tokens, apply_no_repeat_ngram, apply_repetition_penalty};
pub use sampler::{top_logprobs, Sampler};
