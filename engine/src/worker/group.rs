//! The launcher's side of a tensor-parallel group: every step goes to all its workers; rank 0
//! answers with one sampled token per sequence.

use super::protocol::{
    self, FromWorker, StepOutput, StepRequest, ToWorker, WorkerInit, WorkerReady,
};
use crate::batch::BatchInput;
use crate::error::{EngineError, Result};
use crate::model_runner::MaskWait;
use crate::sampling::{RowSampling, SampledToken};
use crate::scheduler::{Executor, StepTiming};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A worker that has said hello.
pub struct GroupMember {
    pub rank: usize,
    pub link: UnixStream,
    /// Rank 0's rendezvous id for the group's communicator.
    pub rendezvous: Option<Vec<u8>>,
}

/// The workers of one group behind the [`Executor`] interface.
pub struct WorkerGroup {
    /// One link per rank, in rank order.
    links: Vec<UnixStream>,
    ready: WorkerReady,
    timing: Option<StepTiming>,
    /// How long a rank may take to answer a step before the group is declared down.
    step_timeout: Option<Duration>,
}

impl WorkerGroup {
    /// Sends every member its [`WorkerInit`] (with rank 0's rendezvous), then waits until all
    /// have loaded. The error names the rank that failed and why.
    pub fn initialise(mut members: Vec<GroupMember>, mut init: WorkerInit) -> Result<Self> {
        members.sort_by_key(|m| m.rank);
        if members.iter().enumerate().any(|(i, m)| m.rank != i) {
            return Err(EngineError::WorkerLost(
                "the group's ranks are not 0..world_size".into(),
            ));
        }
        if members.len() > 1 {
            init.rendezvous = members[0]
                .rendezvous
                .clone()
                .ok_or_else(|| EngineError::WorkerLost("rank 0 announced no rendezvous".into()))?;
        }
        let msg = ToWorker::Init(init);
        for m in &mut members {
            protocol::send(&mut m.link, &msg).map_err(|e| lost(m.rank, e))?;
        }
        let mut ready: Option<WorkerReady> = None;
        for m in &mut members {
            match protocol::recv::<FromWorker>(&mut m.link).map_err(|e| lost(m.rank, e))? {
                FromWorker::Ready(mut r) => {
                    if ready.is_some_and(|first| first.geometry() != r.geometry()) {
                        return Err(EngineError::WorkerLost(format!(
                            "rank {} has a different KV-cache geometry ({r:?}) than rank 0 ({ready:?})",
                            m.rank
                        )));
                    }
                    // The group's footprint is every rank's.
                    r.memory_bytes += ready.map_or(0, |first| first.memory_bytes);
                    ready = Some(r);
                }
                FromWorker::Failed(why) => {
                    return Err(EngineError::WorkerLost(format!(
                        "rank {} failed to load: {why}",
                        m.rank
                    )))
                }
                other => {
                    return Err(EngineError::WorkerLost(format!(
                        "rank {} answered Init with {other:?}",
                        m.rank
                    )))
                }
            }
        }
        Ok(Self {
            links: members.into_iter().map(|m| m.link).collect(),
            ready: ready.ok_or_else(|| EngineError::WorkerLost("an empty group".into()))?,
            timing: None,
            step_timeout: None,
        })
    }

    /// Declares the group down when a rank has not answered a step within `timeout` (a hung
    /// or stopped worker, or one stuck in a collective with it), instead of waiting forever.
    pub fn set_step_timeout(&mut self, timeout: Duration) -> Result<()> {
        for (rank, link) in self.links.iter().enumerate() {
            link.set_read_timeout(Some(timeout))
                .map_err(|e| lost(rank, e))?;
        }
        self.step_timeout = Some(timeout);
        Ok(())
    }

    /// The geometry the workers reported, with the whole group's footprint.
    pub fn ready(&self) -> WorkerReady {
        self.ready
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.links.len()
    }
}

fn lost(rank: usize, e: std::io::Error) -> EngineError {
    EngineError::WorkerLost(format!("rank {rank}: {e}"))
}

impl WorkerGroup {
    /// Sends one step to every rank and collects rank 0's output.
    fn step(&mut self, request: StepRequest, masks: MaskWait) -> Result<StepOutput> {
        // Encoded once, written to every rank; rank 0's reply carries the rows.
        let frame = protocol::encode(&ToWorker::Step(request)).map_err(|e| lost(0, e))?;
        for (rank, link) in self.links.iter_mut().enumerate() {
            std::io::Write::write_all(link, &frame).map_err(|e| lost(rank, e))?;
        }
        // The masks, computed while the ranks run the forward pass, go to rank 0.
        if let Some(wait) = masks {
            let m = wait()?;
            protocol::send(&mut self.links[0], &ToWorker::Masks(m)).map_err(|e| lost(0, e))?;
        }
        let mut output = None;
        let mut failure: Option<(String, bool)> = None;
        let timeout = self.step_timeout;
        let read_failed = |rank: usize, e: std::io::Error| match (e.kind(), timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(t)) => {
                EngineError::WorkerLost(format!(
                    "rank {rank} did not answer a step within {} s (hung or stopped)",
                    t.as_secs_f64()
                ))
            }
            _ => lost(rank, e),
        };
        for (rank, link) in self.links.iter_mut().enumerate() {
            match protocol::recv::<FromWorker>(link).map_err(|e| read_failed(rank, e))? {
                FromWorker::Step(o) if rank == 0 => output = Some(o),
                FromWorker::Step(_) => {}
                FromWorker::StepFailed { message, fatal } => {
                    let fatal = fatal || failure.as_ref().is_some_and(|f| f.1);
                    failure = Some((format!("rank {rank}: {message}"), fatal));
                }
                other => {
                    return Err(EngineError::WorkerLost(format!(
                        "rank {rank} answered a step with {other:?}"
                    )))
                }
            }
        }
        if let Some((message, fatal)) = failure {
            return Err(if fatal {
                EngineError::WorkerLost(message)
            } else {
                EngineError::InvalidRequest(message)
            });
        }
        let output =
            output.ok_or_else(|| EngineError::WorkerLost("rank 0 sent no step output".into()))?;
        self.timing = Some(StepTiming {
            compute: Duration::from_micros(output.compute_us),
            comm: Duration::from_micros(output.comm_us),
        });
        Ok(output)
    }
}

impl Executor for WorkerGroup {
    fn execute(
        &mut self,
        batch: &BatchInput,
        sampling: &[RowSampling],
        masks: MaskWait,
    ) -> Result<Vec<SampledToken>> {
        let output = self.step(
            StepRequest {
                batch: batch.clone(),
                sampling: sampling.to_vec(),
                masked: masks.is_some(),
            },
            masks,
        )?;
        output
            .sampled
            .ok_or_else(|| EngineError::WorkerLost("rank 0 sent no sampled tokens".into()))
    }

    fn kv_blocks(&self) -> (usize, usize) {
        (
            self.ready.num_blocks as usize,
            self.ready.block_size as usize,
        )
    }

    fn last_timing(&self) -> Option<StepTiming> {
        self.timing
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        for link in &mut self.links {
            let _ = protocol::send(link, &ToWorker::Shutdown);
        }
    }
}
