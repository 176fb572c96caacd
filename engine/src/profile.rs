//! Where a step's time goes: wall time per part of the forward pass, summed over steps, for
//! `liftoff generate --profile` and `liftoff serve --profile` (on `/metrics`). Off unless
//! [`enable`]d; then each part is timed on the thread that runs the forward (parallel work
//! inside a part counts once, as wall time). The totals are the process's: forwards run in
//! worker processes are not in them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The parts of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Embedding,
    Norms,
    QkvProjection,
    RotaryAndKvWrite,
    Attention,
    OutputProjection,
    GateUpProjection,
    Activation,
    DownProjection,
    Residuals,
    LmHead,
    Sampling,
}

impl Part {
    pub const ALL: [Part; 12] = [
        Part::Embedding,
        Part::Norms,
        Part::QkvProjection,
        Part::RotaryAndKvWrite,
        Part::Attention,
        Part::OutputProjection,
        Part::GateUpProjection,
        Part::Activation,
        Part::DownProjection,
        Part::Residuals,
        Part::LmHead,
        Part::Sampling,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Part::Embedding => "embedding",
            Part::Norms => "rms norms",
            Part::QkvProjection => "qkv projection",
            Part::RotaryAndKvWrite => "rotary + kv write",
            Part::Attention => "attention",
            Part::OutputProjection => "attention output projection",
            Part::GateUpProjection => "gate/up projection",
            Part::Activation => "silu * up",
            Part::DownProjection => "down projection",
            Part::Residuals => "residual adds",
            Part::LmHead => "lm head",
            Part::Sampling => "sampling",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];

/// Starts recording.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether recording is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, adding its wall time to `part` when recording.
#[inline]
pub fn time<R>(part: Part, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    NANOS[part as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Seconds recorded per part, in [`Part::ALL`] order.
pub fn totals() -> Vec<(Part, f64)> {
    Part::ALL
        .iter()
        .map(|&p| (p, NANOS[p as usize].load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}
