//! A forward pass with the compute pool's other threads kept awake.
//!
//! A decode step is ~120 matmuls, each split over the pool, with short serial steps between
//! them (norms, rotary, attention of one sequence). An idle rayon worker goes to sleep after
//! a few tens of microseconds, and waking it for the next matmul costs as much again: in
//! `examples/dense_step.rs`, 100 us of serial work between the matmuls made each one 25-31 us
//! slower, 20 us of it 1.4 us. So, as llama.cpp's thread pool does within a graph, the other
//! workers poll for work until the pass ends, yielding the core to the OS between polls, and
//! sleep only between passes.
//!
//! Only while the passes in flight in this process use no more threads than there are cores:
//! several models served at once, each with a pool as large as the machine, would otherwise
//! poll on the cores the others compute on. Their helpers leave when that happens, and those
//! passes run as before.

use rayon::{ThreadPool, Yield};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the helpers that started wait for the others before the pass runs without them.
const START_WAIT: Duration = Duration::from_millis(2);

/// Threads of the passes in flight in this process.
static BUSY_THREADS: AtomicUsize = AtomicUsize::new(0);

/// How often a helper left without polling because it ran on the pass's own thread, and
/// because the other helpers did not start in time (for the tests).
#[cfg(test)]
static ON_PASS_THREAD: AtomicUsize = AtomicUsize::new(0);
#[cfg(test)]
static START_TIMEOUTS: AtomicUsize = AtomicUsize::new(0);

/// The cores this process may use.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether the passes in flight leave their helpers a core each.
fn room() -> bool {
    BUSY_THREADS.load(Ordering::Acquire) <= cores()
}

/// Runs `f` on `pool` while its other workers poll for work instead of sleeping.
pub fn install<R: Send>(pool: &ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    let threads = pool.current_num_threads();
    let helpers = threads.saturating_sub(1);
    if helpers == 0 {
        return pool.install(f);
    }
    let _busy = Busy::claim(threads);
    if !room() {
        return pool.install(f);
    }
    let (done, started) = (AtomicBool::new(false), AtomicUsize::new(0));
    pool.scope(|s| {
        let pass_thread = rayon::current_thread_index();
        let (done, started) = (&done, &started);
        for _ in 0..helpers {
            s.spawn(move |_| {
                // A helper that starts after the pass ended leaves at once. So does one that
                // this thread runs itself (at the scope's end, or while the pass waits on
                // something other than its own jobs, such as another pool): it would poll
                // until the pass it is holding up ends. The pass then goes on without helpers.
                if done.load(Ordering::Acquire) {
                    return;
                }
                if rayon::current_thread_index() == pass_thread {
                    #[cfg(test)]
                    ON_PASS_THREAD.fetch_add(1, Ordering::Relaxed);
                    done.store(true, Ordering::Release);
                    return;
                }
                started.fetch_add(1, Ordering::AcqRel);
                // Poll only once every helper runs on a worker of its own; before that, a
                // poll could take another helper off the queue and nest it. Helpers that do
                // not come in time leave the pass to run without them.
                let t = Instant::now();
                while started.load(Ordering::Acquire) < helpers && !done.load(Ordering::Acquire) {
                    if t.elapsed() > START_WAIT {
                        #[cfg(test)]
                        START_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
                        done.store(true, Ordering::Release);
                        return;
                    }
                    std::thread::yield_now();
                }
                while !done.load(Ordering::Acquire) && room() {
                    if rayon::yield_now() != Some(Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        // The pass starts at once: the helpers join it when their workers wake (waiting for
        // them cost 35-45 us a pass on a 2-core Zen 4, see docs/benchmarks.md).
        let _end = EndOnDrop(done);
        f()
    })
}

/// A pass's threads, counted in [`BUSY_THREADS`] while it is alive.
struct Busy(usize);

impl Busy {
    fn claim(threads: usize) -> Self {
        BUSY_THREADS.fetch_add(threads, Ordering::AcqRel);
        Busy(threads)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY_THREADS.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// Ends the pass when dropped, also when `f` panics (the helpers would poll forever and the
/// scope would wait for them).
struct EndOnDrop<'a>(&'a AtomicBool);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::{Arc, Mutex, MutexGuard};

    /// The tests of this module one at a time: passes in flight elsewhere count against
    /// `room()`, and without room a pass runs without helpers, which would leave the cases
    /// below untested.
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pass's parallel work runs and returns, with 1 to 4 threads, many times (a helper
    /// left polling or a pass waiting on itself would hang the test).
    #[test]
    fn passes_complete_with_any_pool_size() {
        let _serial = serial();
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for i in 0..200u64 {
                let sum: u64 = install(&pool, || {
                    (0..1000u64).into_par_iter().map(|x| x * i).sum::<u64>()
                        + rayon::join(|| 1, || 2).1
                });
                assert_eq!(sum, 499_500 * i + 2, "{threads} threads, pass {i}");
            }
            // A panicking pass ends its helpers and reaches the caller.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                install(&pool, || -> u32 { panic!("in the pass") })
            }));
            assert!(r.is_err(), "{threads} threads");
            assert_eq!(install(&pool, || 7), 7);
        }
    }

    /// Makes `workers` workers of `pool` sleep for `busy`; returns once they sleep.
    fn occupy(pool: &ThreadPool, workers: usize, busy: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..workers {
            let tx = tx.clone();
            pool.spawn(move || {
                tx.send(()).unwrap();
                std::thread::sleep(busy);
            });
        }
        for _ in 0..workers {
            rx.recv().unwrap();
        }
    }

    /// Runs `f` on another thread; fails if it has not returned within `limit` (a pass that
    /// waits on itself would hang the test run instead).
    fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the pass did not return within {limit:?}: it waits on itself")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the pass panicked"),
        }
    }

    /// A pass that waits on another pool, its other worker busy: the pass's own thread runs
    /// its helper job while it waits, and that job must end instead of polling under the pass
    /// (which would wait for the pass, which waits for it).
    #[test]
    fn a_helper_on_the_pass_thread_ends() {
        if cores() < 2 {
            println!("skipped: a pass's helper on its own thread (needs 2 cores)");
            return;
        }
        let _serial = serial();
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap(),
        );
        let other = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap(),
        );
        // Passes of other modules' tests in this process may take the room now and then: a
        // few tries.
        let before = ON_PASS_THREAD.load(Ordering::Relaxed);
        for _ in 0..10 {
            let (pool, other) = (pool.clone(), other.clone());
            let v = within(Duration::from_secs(20), move || {
                occupy(&pool, 1, Duration::from_millis(100));
                install(&pool, || {
                    other.install(|| {
                        std::thread::sleep(Duration::from_millis(10));
                        7
                    })
                })
            });
            assert_eq!(v, 7);
            if ON_PASS_THREAD.load(Ordering::Relaxed) > before {
                return;
            }
        }
        panic!("in 10 passes no helper ran on the pass's own thread");
    }

    /// Three threads, one busy: the helper that starts waits at most `START_WAIT` for the
    /// other and then becomes a plain worker, which takes some of the pass's parallel work
    /// (polling for the other helper until the pass ended, it would take none). Helpers only
    /// run when the pool has no more threads than the machine has cores, so this needs 3.
    #[test]
    fn a_helper_alone_stops_waiting_for_the_others() {
        if cores() < 3 {
            println!(
                "skipped: a helper waiting for another (needs 3 cores, this machine has {})",
                cores()
            );
            return;
        }
        let _serial = serial();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let before = START_TIMEOUTS.load(Ordering::Relaxed);
        occupy(&pool, 1, Duration::from_millis(300));
        let (pass_thread, workers) = install(&pool, || {
            let me = rayon::current_thread_index();
            let workers: Vec<Option<usize>> = (0..200)
                .into_par_iter()
                .with_max_len(1)
                .map(|_| {
                    std::thread::sleep(Duration::from_micros(500));
                    rayon::current_thread_index()
                })
                .collect();
            (me, workers)
        });
        assert!(
            START_TIMEOUTS.load(Ordering::Relaxed) > before,
            "the helper that started did not stop waiting for the other"
        );
        assert!(
            workers.iter().any(|&w| w != pass_thread),
            "all 200 items ran on the pass's thread"
        );
    }

    /// Passes of several pools at once, more threads than cores in all: each completes (the
    /// helpers leave or never start).
    #[test]
    fn concurrent_pools_complete() {
        let _serial = serial();
        let pools: Vec<ThreadPool> = (0..3)
            .map(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cores() + 1)
                    .build()
                    .unwrap()
            })
            .collect();
        std::thread::scope(|s| {
            for (p, pool) in pools.iter().enumerate() {
                s.spawn(move || {
                    for i in 0..100u64 {
                        let v: u64 = install(pool, || (0..100u64).into_par_iter().sum::<u64>() + i);
                        assert_eq!(v, 4950 + i, "pool {p}, pass {i}");
                    }
                });
            }
        });
    }
}
