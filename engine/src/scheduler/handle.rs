//! The scheduler's thread and the handle the server submits requests through.

use super::{Executor, GenerationRequest, Scheduler, SchedulerStats, SeqEvent};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the replica group is not running")]
    Unavailable,
}

/// What the scheduler thread receives: a request, or a nudge to look at its abort flag.
enum Msg {
    Request(Box<GenerationRequest>),
    Wake,
}

/// A cloneable handle to a running scheduler thread.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: Sender<Msg>,
    stats: Arc<SchedulerStats>,
    alive: Arc<AtomicBool>,
    /// Set by [`abort`](Self::abort): the thread ends its requests and stops.
    abort: Arc<AtomicBool>,
    max_waiting: usize,
}

impl SchedulerHandle {
    /// Starts `scheduler` on its own thread.
    pub fn spawn<E: Executor>(scheduler: Scheduler<E>, name: &str) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = scheduler.stats();
        let alive = Arc::new(AtomicBool::new(true));
        let max_waiting = scheduler.config.max_waiting;
        let flag = alive.clone();
        let abort = Arc::new(AtomicBool::new(false));
        let stop = abort.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // Marks the group dead however the thread ends, a panic included, so requests
                // fail fast and /health reports it.
                let _alive = AliveGuard(flag);
                run(scheduler, rx, &stop);
            })?;
        Ok(Self {
            tx,
            stats,
            alive,
            abort,
            max_waiting,
        })
    }

    /// Hands a request to the scheduler, unless its queue is full or it has stopped.
    pub fn submit(&self, req: GenerationRequest) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Unavailable);
        }
        let queued = self.stats.queued.fetch_add(1, Ordering::SeqCst) as usize;
        let waiting = self.stats.waiting.load(Ordering::Relaxed) as usize;
        if queued.max(waiting) >= self.max_waiting {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(queued.max(waiting)));
        }
        self.tx.send(Msg::Request(Box::new(req))).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Unavailable
        })
    }

    /// Ends the scheduler at its next step, however busy: running and waiting requests end
    /// with [`SeqEvent::Unavailable`] (503), and the thread frees the model. An idle scheduler
    /// ends too.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        // An idle scheduler waits for a message.
        let _ = self.tx.send(Msg::Wake);
    }

    /// The scheduler's counters.
    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    /// Whether the scheduler thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// The flag behind [`is_alive`](Self::is_alive): a supervisor that sees a worker of this
    /// group die clears it, so new requests are refused at once.
    pub fn health_flag(&self) -> Arc<AtomicBool> {
        self.alive.clone()
    }
}

/// Takeoff's batch duration: after an idle spell, waits up to `batch_wait` for more requests to
/// start together (up to a full batch).
fn gather_batch<E: Executor>(s: &mut Scheduler<E>, rx: &Receiver<Msg>) {
    let wait = s.config.batch_wait;
    if wait.is_zero() {
        return;
    }
    let deadline = std::time::Instant::now() + wait;
    while s.waiting.len() < s.config.max_batch_size {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Request(req)) => {
                s.stats.queued.fetch_sub(1, Ordering::SeqCst);
                s.add(*req)
            }
            Ok(Msg::Wake) | Err(_) => return,
        }
    }
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn run<E: Executor>(mut s: Scheduler<E>, rx: Receiver<Msg>, abort: &AtomicBool) {
    loop {
        if abort.load(Ordering::SeqCst) && s.failure().is_none() {
            s.abort("the reader was stopped before the request finished");
        }
        if let Some(msg) = s.failure() {
            // The group is down: refuse what is still queued, then end the thread.
            let msg = msg.to_string();
            for m in rx.try_iter() {
                if let Msg::Request(req) = m {
                    s.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = req.events.send(SeqEvent::Unavailable(msg.clone()));
                }
            }
            return;
        }
        if s.is_idle() {
            match rx.recv() {
                Ok(Msg::Request(req)) => {
                    s.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    s.add(*req)
                }
                // Back to the top, where the abort flag is read.
                Ok(Msg::Wake) => continue,
                Err(_) => return,
            }
            gather_batch(&mut s, &rx);
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Request(req)) => {
                    s.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    s.add(*req)
                }
                Ok(Msg::Wake) => {}
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    // Server gone: finish what is in flight, then stop.
                    while !s.is_idle() {
                        if abort.load(Ordering::SeqCst) {
                            s.abort("the reader was stopped before the request finished");
                        }
                        if s.failure().is_some() || !s.step() {
                            break;
                        }
                    }
                    return;
                }
            }
        }
        if abort.load(Ordering::SeqCst) {
            continue;
        }
        if !s.step() && !s.is_idle() {
            // Nothing could be scheduled although work is queued (should not happen): fail it
            // rather than spin.
            for e in s.waiting.drain(..) {
                let _ = e
                    .events
                    .send(SeqEvent::Error("the request cannot be scheduled".into()));
            }
        }
    }
}
