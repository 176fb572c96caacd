//! The model-runner step: one forward pass of a shard over a batch, and on rank 0 the
//! sampled tokens (or the logits rows). The in-process executor and the worker processes both
//! run steps through here.

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::Llama;
use crate::sampling::{sample, RowSampling, SampledToken};
use crate::EngineError;

/// What rank 0 returns from a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepRows {
    /// The logits rows (no sampling asked for).
    Logits(Vec<Vec<f32>>),
    /// One sampled token per logits row.
    Sampled(Vec<SampledToken>),
}

/// Runs one step on a shard; rank 0 gets the rows (sampled on the model's device when
/// `sampling` is given), the other ranks `None`.
pub fn run_step(
    model: &Llama,
    cache: &KvCache,
    batch: &BatchInput,
    sampling: Option<&[RowSampling]>,
) -> Result<Option<StepRows>> {
    if let Some(specs) = sampling {
        let rows = batch.logits_rows().len();
        if specs.len() != rows {
            return Err(EngineError::InvalidRequest(format!(
                "{} sampling specs for {rows} logits rows",
                specs.len()
            )));
        }
    }
    let Some(logits) = model.forward(batch, cache)? else {
        return Ok(None);
    };
    Ok(Some(match sampling {
        Some(specs) => StepRows::Sampled(crate::profile::time(
            crate::profile::Part::Sampling,
            || model.install(|| sample(logits, specs)),
        )?),
        None => StepRows::Logits(logits.to_vec2::<f32>()?),
    }))
}
