//! Messages between the launcher and its worker processes, one Unix socket per worker. Each
//! frame is a `u32` length then the message encoded with postcard.

use crate::batch::BatchInput;
use crate::sampling::{RowSampling, SampledToken};
use crate::{EngineOptions, KvBudget};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Largest frame accepted (a step's batch is the biggest message).
const MAX_FRAME: usize = 1 << 30;

/// Launcher → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// The answer to [`FromWorker::Hello`]: how to join the group and what to load.
    Init(WorkerInit),
    /// Run one forward pass.
    Step(StepRequest),
    /// The masks of a step's constrained rows (to rank 0, after a step with `masked`).
    Masks(crate::model_runner::RowMasks),
    /// Exit cleanly.
    Shutdown,
}

/// What a worker loads and how it joins its group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInit {
    /// The group's communicator rendezvous, as rank 0 announced it (CPU: the socket path;
    /// CUDA: the NCCL unique id). Empty for a group of one.
    pub rendezvous: Vec<u8>,
    pub engine: EngineOptions,
    /// The size of this rank's KV-cache pool.
    pub kv_budget: KvBudget,
}

/// Worker → launcher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    /// First message: who this is; rank 0 adds the group's rendezvous.
    Hello {
        group: u32,
        rank: u32,
        rendezvous: Option<Vec<u8>>,
    },
    /// Weights loaded and KV cache allocated.
    Ready(WorkerReady),
    /// Loading failed; the worker exits.
    Failed(String),
    /// A step ran.
    Step(StepOutput),
    /// A step failed; `fatal` when the group cannot go on (a broken communicator).
    StepFailed { message: String, fatal: bool },
}

/// A worker's geometry once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReady {
    pub num_blocks: u64,
    pub block_size: u64,
    pub max_seq_len: u64,
    /// This rank's measured footprint: weights and KV cache, in bytes.
    pub memory_bytes: u64,
}

impl WorkerReady {
    /// The KV-cache geometry every rank of a group must share.
    pub fn geometry(&self) -> (u64, u64, u64) {
        (self.num_blocks, self.block_size, self.max_seq_len)
    }
}

/// One step for every rank of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    pub batch: BatchInput,
    /// How rank 0 samples each logits row on its device.
    pub sampling: Vec<RowSampling>,
    /// Rank 0 reads a [`ToWorker::Masks`] after its forward pass, before it samples.
    #[serde(default)]
    pub masked: bool,
}

/// The result of one step on one rank.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepOutput {
    /// Rank 0 only: one token per logits row.
    pub sampled: Option<Vec<SampledToken>>,
    /// Forward pass wall time, collectives included.
    pub compute_us: u64,
    /// Time inside collectives.
    pub comm_us: u64,
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(msg).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Writes `msg` as one frame.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg)?)
}

/// Reads one frame and decodes it.
pub fn recv<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::LogitsWanted;

    #[test]
    fn messages_round_trip_through_frames() {
        let mut batch = BatchInput::default();
        batch.push_sequence(&[5, 6, 7], 0, &[3], LogitsWanted::Last);
        let mut buf = Vec::new();
        let step = StepRequest {
            batch,
            sampling: vec![RowSampling {
                temperature: 0.7,
                banned: vec![2, 9],
                allowed: Some(vec![u32::MAX, 5]),
                adjust: vec![(4, -1.5), (8, 100.0)],
                force: Some(6),
                ..RowSampling::greedy()
            }],
            masked: true,
        };
        send(&mut buf, &ToWorker::Step(step.clone())).unwrap();
        send(&mut buf, &ToWorker::Shutdown).unwrap();
        let mut r = buf.as_slice();
        match recv::<ToWorker>(&mut r).unwrap() {
            ToWorker::Step(s) => assert_eq!(s, step),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            recv::<ToWorker>(&mut r).unwrap(),
            ToWorker::Shutdown
        ));
        assert_eq!(
            recv::<ToWorker>(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
