//! Splitting a loop over the rayon pool in contiguous shares that rebalance themselves.
//!
//! A decode step's matmuls stream their weights from memory, split by output rows over the
//! pool's threads. A fixed split waits at the end for its slowest thread, and on a shared
//! machine one thread is often held up (another process, an interrupt, a sibling core): in a
//! traced dense decode on a 2-core VM, the slower of the two halves took 1.10-1.16x their
//! mean, summed over a step's matmuls. Here each thread walks its own contiguous share from the front, so its
//! reads stay one sequential stream; a thread whose share is done takes chunks from the back
//! of the others' shares, so the matmul ends when the work does.

use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// One thread's share, `[front, back)` in chunks, packed in one word so that its owner (at
/// the front) and a thief (at the back) never take the same chunk; a cache line of its own.
#[repr(align(64))]
struct Share(AtomicU64);

impl Share {
    fn new(front: u32, back: u32) -> Self {
        Share(AtomicU64::new(pack(front, back)))
    }

    /// The next chunk from the front (the owner).
    fn take_front(&self) -> Option<u32> {
        self.take(|f, b| (f < b).then(|| (f, pack(f + 1, b))))
    }

    /// The last chunk from the back (another thread).
    fn take_back(&self) -> Option<u32> {
        self.take(|f, b| (f < b).then(|| (b - 1, pack(f, b - 1))))
    }

    fn take(&self, step: impl Fn(u32, u32) -> Option<(u32, u64)>) -> Option<u32> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (chunk, next) = step((cur >> 32) as u32, cur as u32)?;
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(chunk),
                Err(now) => cur = now,
            }
        }
    }
}

fn pack(front: u32, back: u32) -> u64 {
    (front as u64) << 32 | back as u64
}

/// Calls `f` once for every chunk of `0..n` (`chunk` items each, the last one possibly
/// shorter), on the threads of the current rayon pool: thread `t` takes the `t`-th
/// contiguous share of the chunks in order, then helps with the others' from their backs.
/// Which thread runs a chunk varies from call to call; the chunks themselves do not.
pub fn for_each_chunk(n: usize, chunk: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    // Chunk indices are u32s: large enough chunks that there are at most u32::MAX of them.
    let chunk = chunk.max(1).max(n.div_ceil(u32::MAX as usize));
    let chunks = n.div_ceil(chunk);
    let threads = rayon::current_num_threads().clamp(1, chunks);
    let range = |c: u32| {
        let start = c as usize * chunk;
        start..(start + chunk).min(n)
    };
    if threads == 1 {
        (0..chunks as u32).for_each(|c| f(range(c)));
        return;
    }
    let shares: Vec<Share> = (0..threads)
        .map(|t| {
            Share::new(
                (t * chunks / threads) as u32,
                ((t + 1) * chunks / threads) as u32,
            )
        })
        .collect();
    (0..threads).into_par_iter().for_each(|t| {
        while let Some(c) = shares[t].take_front() {
            f(range(c));
        }
        for other in (1..threads).map(|i| (t + i) % threads) {
            while let Some(c) = shares[other].take_back() {
                f(range(c));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Every item is visited exactly once, with chunks of the requested size in order within
    /// each call, for pools of 1 to 4 threads, sizes around the chunk and share boundaries,
    /// and a thread that is held up (its chunks are then taken by the others).
    #[test]
    fn visits_every_item_once() {
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (n, chunk) in [(0, 4), (1, 4), (7, 4), (8, 4), (9, 4), (100, 1), (1000, 7)] {
                for slow in [false, true] {
                    let seen: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                    pool.install(|| {
                        for_each_chunk(n, chunk, |r| {
                            assert!(r.start % chunk == 0 && !r.is_empty(), "{r:?}");
                            assert!(r.len() == chunk || r.end == n, "{r:?} of {n}");
                            if slow && rayon::current_thread_index() == Some(0) {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            for i in r {
                                seen[i].fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    });
                    for (i, s) in seen.iter().enumerate() {
                        let s = s.load(Ordering::Relaxed);
                        assert_eq!(s, 1, "{threads} threads, n {n}, chunk {chunk}: item {i}");
                    }
                }
            }
        }
    }

    /// A share taken from both ends gives each chunk once, also when its back reaches 0 (a
    /// share whose owner had not started yet, emptied by another thread).
    #[test]
    fn a_share_hands_out_each_chunk_once() {
        let s = Share::new(0, 1);
        assert_eq!(
            (s.take_back(), s.take_back(), s.take_front()),
            (Some(0), None, None)
        );
        let s = Share::new(3, 6);
        let taken = [s.take_front(), s.take_back(), s.take_front(), s.take_back()];
        assert_eq!(taken, [Some(3), Some(5), Some(4), None]);
    }

    /// A held-up thread's share is finished by the others: with thread 0 sleeping on each of
    /// its chunks, it runs fewer chunks than its share.
    #[test]
    fn a_held_up_thread_is_helped() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let by_zero = AtomicU32::new(0);
        pool.install(|| {
            for_each_chunk(64, 1, |_| {
                if rayon::current_thread_index() == Some(0) {
                    by_zero.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        });
        let by_zero = by_zero.load(Ordering::Relaxed);
        assert!(
            by_zero < 32,
            "thread 0 ran {by_zero} of its 32 chunks' worth"
        );
    }
}
