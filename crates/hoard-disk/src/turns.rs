//! Turns for bulk CPU work: while small requests are short of CPU, bulk
//! threads hash, compress and decompress one turn at a time, and rest
//! after each step.
//!
//! Bulk work runs at nice 10 ([`crate::lower_thread_priority`]) so that
//! the threads answering small requests win a contended core. On a small
//! host that is not enough. The kernel weighs threads, not work: ten
//! runnable nice-10 threads (four 64 MiB uploads hashing, four downloads
//! decompressing, their compressors) weigh as much as one nice-0 thread.
//! And it balances runqueues by weight, so on two cores it stacks the two
//! heavy main-runtime workers on one core and lets the light bulk threads
//! run unopposed on the other. Measured there beside eight 64 MiB clients,
//! bulk threads took a quarter of the machine and the p99 of 4 KiB GETs rose
//! from about 1 ms to 4-5 ms.
//!
//! So while the server says small requests are busy ([`set_contended`]), a
//! large step takes one of [`limit`] turns and, once done, holds it for as
//! long again: bulk work gets at most half of each turn, whatever the
//! number of transfers, and the threads waiting for a turn sleep. When
//! small requests are not busy, steps run at once, at full speed.
//!
//! # Invariants
//!
//! * A turn is held only around a step of pure computation on bytes in
//!   hand (one hash update, one chunk compressed or decoded) and its rest,
//!   never while waiting for anything else (a channel, a lock, the client):
//!   a holder always gives its turn back, so turns cannot deadlock, and a
//!   compressing thread and the hashing thread feeding it each take their
//!   own.
//! * Only threads working for a transfer of [`MIN_TRANSFER`] or more
//!   ([`crate::bulk_work`]) take turns, and only for steps of at least
//!   [`MIN_BYTES`]: a small or medium request's hashing never waits behind
//!   a bulk transfer's, and an async runtime's worker, which must never
//!   block, never waits at all.
//! * Waiters are woken in the order they came (parking_lot's queue is
//!   first come, first served), so no transfer starves; when contention
//!   ends every waiter is woken and goes on without a turn.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Steps smaller than this never take a turn.
pub const MIN_BYTES: usize = 64 << 10;

/// A step that ran while contended is followed by a rest this many times
/// its own length. At 1, bulk work beside 4 KiB GETs saturating two cores
/// moved 553-629 MB/s with their p99 at 1.0-1.4 ms; at 3, 343-444 MB/s for
/// the same p99; without rests, 612-654 MB/s with the p99 at 3.9-5.2 ms.
const REST_PER_STEP: u32 = 1;

thread_local! {
    /// Whether this thread is a bulk worker that takes turns.
    static TAKES_TURNS: Cell<bool> = const { Cell::new(false) };
}

/// Transfers of at least this many bytes are bulk: their steps take turns.
/// The same line as the server's bulk lane (`hoard_server::lanes`), so a
/// 512 KiB GET, answered on the main runtime, never waits for a turn.
pub const MIN_TRANSFER: u64 = 1 << 20;

/// The calling thread works for one transfer until this is dropped (see
/// [`crate::bulk_work`]); blocking-pool threads serve many tasks in turn,
/// so the mark is set per task and put back after it.
pub struct BulkWork {
    was: bool,
    /// The mark is the thread's own: the guard must be dropped there.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for BulkWork {
    fn drop(&mut self) {
        TAKES_TURNS.with(|t| t.set(self.was));
    }
}

/// Marks the calling thread as working for a transfer of `bytes` bytes.
pub(crate) fn enter(bytes: u64) -> BulkWork {
    BulkWork {
        was: TAKES_TURNS.with(|t| t.replace(bytes >= MIN_TRANSFER)),
        _thread: std::marker::PhantomData,
    }
}

/// How many bulk steps may run at once while contended: half the cores, at
/// least one.
pub fn limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / 2).max(1)
    })
}

/// Says whether small requests are short of CPU. Called by whoever watches
/// them (the server's main runtime watcher).
pub fn set_contended(yes: bool) {
    global().set_contended(yes);
}

/// Whether bulk work is resting for small requests right now.
pub fn contended() -> bool {
    global().contended()
}

/// Total time bulk steps have rested (and waited for a turn) since start.
pub fn rested() -> Duration {
    Duration::from_nanos(global().rested_ns.load(Ordering::Relaxed))
}

fn global() -> &'static Turns {
    static TURNS: OnceLock<Turns> = OnceLock::new();
    TURNS.get_or_init(|| Turns::new(limit()))
}

/// Runs `step`, a computation over `bytes` bytes, in a turn if it must (see
/// the module invariants).
pub(crate) fn step<R>(bytes: usize, step: impl FnOnce() -> R) -> R {
    global().step(bytes, TAKES_TURNS.with(|t| t.get()), step)
}

struct Turns {
    limit: usize,
    contended: AtomicBool,
    in_use: Mutex<usize>,
    freed: Condvar,
    rested_ns: AtomicU64,
}

/// Gives the turn back when the step ends, even by a panic.
struct Held<'a>(&'a Turns);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *self.0.in_use.lock() -= 1;
        self.0.freed.notify_one();
    }
}

impl Turns {
    fn new(limit: usize) -> Turns {
        Turns {
            limit: limit.max(1),
            contended: AtomicBool::new(false),
            in_use: Mutex::new(0),
            freed: Condvar::new(),
            rested_ns: AtomicU64::new(0),
        }
    }

    fn contended(&self) -> bool {
        self.contended.load(Ordering::Relaxed)
    }

    fn set_contended(&self, yes: bool) {
        if self.contended.swap(yes, Ordering::Relaxed) && !yes {
            // Taken so that no waiter is between its check and its wait.
            let _in_use = self.in_use.lock();
            self.freed.notify_all();
        }
    }

    fn step<R>(&self, bytes: usize, bulk_thread: bool, step: impl FnOnce() -> R) -> R {
        if bytes < MIN_BYTES || !bulk_thread || !self.contended() {
            return step();
        }
        let asked = Instant::now();
        let held = {
            let mut in_use = self.in_use.lock();
            while *in_use >= self.limit && self.contended() {
                self.freed.wait(&mut in_use);
            }
            *in_use += 1;
            Held(self)
        };
        let started = Instant::now();
        let r = step();
        let mut rest = Duration::ZERO;
        if self.contended() {
            rest = started.elapsed() * REST_PER_STEP;
            std::thread::sleep(rest);
        }
        drop(held);
        let waited = started.duration_since(asked) + rest;
        self.rested_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// Runs `threads` threads of `steps` steps of `work` each and returns
    /// the most steps seen running at once.
    fn most_at_once(t: &Arc<Turns>, threads: usize, steps: usize, work: Duration) -> usize {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (t, running, most) = (Arc::clone(t), Arc::clone(&running), Arc::clone(&most));
                std::thread::spawn(move || {
                    for _ in 0..steps {
                        t.step(MIN_BYTES, true, || {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(work);
                            running.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().is_ok(), "a stepping thread panicked");
        }
        most.load(Ordering::SeqCst)
    }

    #[test]
    fn contended_steps_take_turns_and_rest() {
        let t = Arc::new(Turns::new(2));
        t.set_contended(true);
        let started = Instant::now();
        assert_eq!(most_at_once(&t, 6, 3, Duration::from_millis(5)), 2);
        // 18 steps of 5 ms, two at a time, each resting as long again: at
        // least 9 rounds of 10 ms.
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert!(t.rested_ns.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn uncontended_steps_run_at_once() {
        let t = Arc::new(Turns::new(1));
        assert_eq!(most_at_once(&t, 4, 2, Duration::from_millis(20)), 4);
        assert_eq!(t.rested_ns.load(Ordering::Relaxed), 0);
    }

    /// Contends `t` and has another thread take a turn and hold it for
    /// `hold`; returns once the turn is taken.
    fn hold_a_turn(t: &Arc<Turns>, hold: Duration) -> std::thread::JoinHandle<()> {
        t.set_contended(true);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Arc::clone(t);
        let holder = std::thread::spawn(move || {
            t.step(MIN_BYTES, true, || {
                let _ = tx.send(());
                std::thread::sleep(hold);
            })
        });
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
        holder
    }

    /// Threads waiting for a turn when contention ends go on at once.
    #[test]
    fn the_end_of_contention_releases_waiters() {
        let t = Arc::new(Turns::new(1));
        let holder = hold_a_turn(&t, Duration::from_millis(300));
        let waiter = {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                let asked = Instant::now();
                t.step(MIN_BYTES, true, || ());
                asked.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        t.set_contended(false);
        let waited = waiter.join().unwrap_or(Duration::MAX);
        assert!(
            waited < Duration::from_millis(250),
            "waited {waited:?} for a turn after contention ended"
        );
        assert!(holder.join().is_ok());
    }

    /// Small steps and threads that are not bulk workers never wait, even
    /// while every turn is taken.
    #[test]
    fn small_steps_and_other_threads_never_take_turns() {
        let t = Arc::new(Turns::new(1));
        let holder = hold_a_turn(&t, Duration::from_millis(500));
        let asked = Instant::now();
        t.step(usize::MAX, false, || ());
        t.step(MIN_BYTES - 1, true, || ());
        assert!(asked.elapsed() < Duration::from_millis(400));
        assert!(holder.join().is_ok());
    }

    /// Only a bulk transfer's work takes turns, and the mark ends with the
    /// task, so the next task on a pooled thread starts unmarked.
    #[test]
    fn only_bulk_transfers_mark_their_thread_and_only_while_they_work() {
        let marked = || TAKES_TURNS.with(|t| t.get());
        assert!(!marked());
        {
            let _bulk = enter(MIN_TRANSFER);
            assert!(marked());
            {
                let _medium = enter(MIN_TRANSFER - 1);
                assert!(!marked());
            }
            assert!(marked());
        }
        assert!(!marked());
    }
}
