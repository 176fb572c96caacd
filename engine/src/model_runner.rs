//! The model-runner step: one forward pass of a shard over a batch, and on rank 0 the
//! sampled tokens. The in-process executor and the worker processes both run steps through
//! here.

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::Llama;
use crate::sampling::{sample, RowSampling, SampledToken};
use crate::EngineError;

/// The allowed-token bitmasks of a step's constrained rows: `(row, mask)`.
pub type RowMasks = Vec<(usize, Vec<u32>)>;

/// Where rank 0 gets a step's masks once its forward pass is done: they are computed on the
/// CPU while it runs. `None`: the step has no constrained row.
pub type MaskWait<'a> = Option<&'a mut dyn FnMut() -> Result<RowMasks>>;

/// Runs one step on a shard; rank 0 gets one token per logits row, sampled on the model's
/// device with `sampling[i]` for row `i` (and the masks `masks` gives); the other ranks
/// `None`.
pub fn run_step(
    model: &Llama,
    cache: &KvCache,
    batch: &BatchInput,
    sampling: &[RowSampling],
    masks: MaskWait,
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
    let masked;
    let specs = match masks {
        None => sampling,
        Some(wait) => {
            let mut specs = sampling.to_vec();
            for (row, mask) in wait()? {
                let spec = specs.get_mut(row).ok_or_else(|| {
                    EngineError::InvalidRequest(format!("a mask for row {row} of {rows}"))
                })?;
                spec.allowed = Some(mask);
            }
            masked = specs;
            &masked
        }
    };
    Ok(Some(crate::profile::time(
        crate::profile::Part::Sampling,
        || model.install(|| sample(logits, specs)),
    )?))
}
