//! Counters a scheduler shares with the server's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Live numbers of one scheduler (atomics: written by its thread, read by anyone).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// Blocks held by sequences.
    pub kv_blocks_used: AtomicU64,
    /// Blocks no sequence holds that keep a cached prefix (evictable).
    pub kv_blocks_cached: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub prefix_queried_blocks: AtomicU64,
    pub prefix_hit_blocks: AtomicU64,
    pub preemptions: AtomicU64,
    pub cancelled: AtomicU64,
    pub steps: AtomicU64,
    /// Steps with constrained rows, and the time their masks took (computed on the CPU while
    /// the forward pass runs).
    pub mask_rows_steps: AtomicU64,
    pub mask_micros: AtomicU64,
    pub step_tokens: AtomicU64,
    pub step_micros: AtomicU64,
    /// Rank 0's forward time, summed over steps (worker groups only).
    pub compute_micros: AtomicU64,
    /// Rank 0's time in collectives, summed over steps (worker groups only).
    pub comm_micros: AtomicU64,
    /// Requests handed to the scheduler and not yet admitted (the queue bound).
    pub queued: AtomicU64,
}

impl SchedulerStats {
    pub(crate) fn record_step(&self, tokens: usize, took: Duration) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.step_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Constrained decoding: one step's mask computation (all its constrained rows).
    pub(crate) fn record_mask_time(&self, took: Duration) {
        self.mask_rows_steps.fetch_add(1, Ordering::Relaxed);
        self.mask_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_timing(&self, t: super::StepTiming) {
        self.compute_micros
            .fetch_add(t.compute.as_micros() as u64, Ordering::Relaxed);
        self.comm_micros
            .fetch_add(t.comm.as_micros() as u64, Ordering::Relaxed);
    }

    /// Fraction of KV-cache blocks held by sequences.
    pub fn kv_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Ordering::Relaxed).max(1);
        self.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64
    }

    /// Fraction of looked-up prompt blocks found in the prefix cache.
    pub fn prefix_hit_rate(&self) -> f64 {
        let q = self.prefix_queried_blocks.load(Ordering::Relaxed);
        if q == 0 {
            return 0.0;
        }
        self.prefix_hit_blocks.load(Ordering::Relaxed) as f64 / q as f64
    }
}
