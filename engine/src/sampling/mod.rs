//! Sampling: the Takeoff and OpenAI parameters and the logits processors (repetition penalty,
//! OpenAI's frequency/presence penalties and logit bias, no-repeat n-grams, minimum length) as
//! per-row specs. The sampling itself (temperature, top-k, top-p, greedy at temperature 0)
//! runs where the logits are, in `liftoff-kernels`.

mod params;
mod processors;

pub use liftoff_kernels::sampling::{mask_allows, sample, uniform, RowSampling, SampledToken};
pub use params::{ParamError, SamplingParams, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY};
pub use processors::{
    logit_adjustments, min_new_tokens_bans, no_repeat_ngram_bans, penalized_tokens, Penalties,
};
