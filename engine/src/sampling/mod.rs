//! Sampling: the Takeoff parameters and the logits processors (repetition penalty, no-repeat
//! n-grams, minimum length) as per-row specs. The sampling itself (temperature, top-k, top-p,
//! greedy at temperature 0) runs where the logits are, in `liftoff-kernels`.

mod params;
mod processors;

pub use liftoff_kernels::sampling::{mask_allows, sample, uniform, RowSampling, SampledToken};
pub use params::{ParamError, SamplingParams, MAX_LOGPROBS};
pub use processors::{min_new_tokens_bans, no_repeat_ngram_bans, penalized_tokens};
