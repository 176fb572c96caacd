//! The model-runner step: one forward pass of a shard over a batch, and on rank 0 the
//! sampled tokens. The in-process executor and the worker processes both run steps through
//! here.

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::Llama;
use crate::sampling::{sample, RowSampling, SampledToken};
use crate::EngineError;

/// Runs one step on a shard; rank 0 gets one token per logits row, sampled on the model's
/// device with `sampling[i]` for row `i`; the other ranks `None`.
pub fn run_step(
    model: &Llama,
    cache: &KvCache,
    batch: &BatchInput,
    sampling: &[RowSampling],
) -> Result<Option<Vec<SampledToken>>> {
    let rows = batch.logits_rows().len();
    if sampling.len() != rows {
        return Err(EngineError::InvalidRequest(format!(
            "{} sampling specs for {rows} logits rows",
            sampling.len()
        )));
    }
    let Some(logits) = model.forward(batch, cache)? else {
        return Ok(None);
    };
    Ok(Some(crate::profile::time(
        crate::profile::Part::Sampling,
        || model.install(|| sample(logits, sampling)),
    )?))
}
