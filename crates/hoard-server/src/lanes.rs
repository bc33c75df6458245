//! Two lanes for HTTP connections: small requests on the main runtime,
//! bulk transfers on a runtime of low-priority threads.
//!
//! A 64 MiB GET or PUT spends most of its time copying between a socket
//! and hoard. That copying runs in the connection's task, so on the main
//! runtime it competes, at the same CPU priority, with every 4 KiB hit on
//! the host: on two cores, eight bulk clients pushed the p99 of small GETs
//! from under a millisecond to 4-14 ms, while the kernel was seen delaying
//! the main runtime's threads by up to 6 ms.
//!
//! So a connection moves, for the length of one bulk transfer, to the bulk
//! runtime ([`run`]): its threads run at the same lowered priority as the
//! hashing and compressing threads, so the kernel prefers the main
//! runtime's threads whenever both want a core, and bulk work takes what is
//! left. When the transfer is over the connection moves back, so the next
//! small request on a reused connection (Bazel keeps a pool) is fast again.
//!
//! Moving a connection between runtimes is safe because a future only
//! promises to wake the waker of its latest poll: the connection is moved
//! only between polls, and its new task polls it at once, which registers
//! the new task's waker with every socket, timer and channel it waits on.
//! Sockets, timers and spawned helpers stay with the runtime that created
//! them, and either runtime may poll them.
//!
//! What counts as bulk is marked by the request handler with a
//! [`BulkGuard`] that lives as long as the transfer: the handler of a large
//! PUT holds it while it reads the body, a large GET's response body holds
//! it until hyper has written it. The mark changes only inside the
//! connection's own poll, so the check after each poll sees every change.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// Transfers of at least this many bytes (or of unknown length) take the
/// bulk lane.
pub const BULK_BYTES: u64 = 1 << 20;

/// A connection's count of bulk transfers in progress.
#[derive(Default)]
pub struct Mark(AtomicUsize);

impl Mark {
    /// Marks a bulk transfer until the guard is dropped.
    pub fn bulk(self: &Arc<Self>) -> BulkGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        BulkGuard(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// Keeps its connection in the bulk lane while alive.
pub struct BulkGuard(Arc<Mark>);

impl Drop for BulkGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection in the bulk lane until hyper
/// has written it (and dropped it). Everything else it forwards, the size
/// hint included, so hyper still sends a Content-Length.
pub struct InBulkLane<B> {
    body: B,
    _guard: BulkGuard,
}

impl<B> InBulkLane<B> {
    pub fn new(body: B, guard: BulkGuard) -> InBulkLane<B> {
        InBulkLane {
            body,
            _guard: guard,
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for InBulkLane<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether a transfer of `len` bytes (None: unknown) is bulk.
pub fn is_bulk(len: Option<u64>) -> bool {
    len.is_none_or(|n| n >= BULK_BYTES)
}

type Conn = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs a connection: on the current runtime while `mark` shows no bulk
/// transfer, on `bulk` while it does. Without a bulk runtime it simply runs
/// here.
pub async fn run(bulk: Option<Handle>, mark: Arc<Mark>, conn: Conn) {
    let Some(bulk) = bulk else {
        return conn.await;
    };
    let mut conn = conn;
    loop {
        if Until::new(&mut conn, || mark.busy()).await {
            return;
        }
        let m = Arc::clone(&mark);
        let moved = bulk.spawn(async move {
            let done = Until::new(&mut conn, || !m.busy()).await;
            (!done).then_some(conn)
        });
        match moved.await {
            Ok(Some(back)) => conn = back,
            Ok(None) => return,
            // The bulk runtime is shutting down (the process is exiting)
            // or the connection panicked there: it is gone either way.
            Err(e) => {
                tracing::debug!(error = %e, "connection ended in the bulk lane");
                return;
            }
        }
    }
}

/// Polls a connection until it ends (true) or, after it returns Pending,
/// until `switch` says it should move (false).
struct Until<'a, S> {
    conn: &'a mut Conn,
    switch: S,
}

impl<'a, S: Fn() -> bool> Until<'a, S> {
    fn new(conn: &'a mut Conn, switch: S) -> Self {
        Until { conn, switch }
    }
}

impl<S: Fn() -> bool + Unpin> Future for Until<'_, S> {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        match self.conn.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(true),
            Poll::Pending if (self.switch)() => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// How often [`watch_main_runtime`] samples the main runtime.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Weight of the newest sample in the smoothed busy share: about ten
/// samples (100 ms) of memory. The runtime reports busy time in lumps
/// (when a worker parks), so single samples swing from 0 to over 1.
const SMOOTHING: f64 = 0.1;

/// The main runtime counts as busy while its workers' smoothed busy share
/// is at least this. Measured on two cores (the highest smoothed value seen
/// in each half second): 0.37-0.44 under 4 KiB GETs from four connections as
/// fast as they go, 0.14-0.24 from one connection (10,000 GETs/s), 0.13-0.17
/// during a lone 64 MiB ByteStream Write (gRPC streams stay on the main
/// runtime), at most 0.16 beside 64 MiB HTTP PUTs, whose connections are
/// only accepted and parsed there.
const BUSY_SHARE: f64 = 0.25;

/// Watches how busy the main runtime's workers are, and has bulk work take
/// turns and rest while they are busy ([`hoard_disk::turns`]).
///
/// Moving bulk connections to their own low-priority lane keeps their
/// socket copies off the main runtime, but the kernel still hands them (and
/// the hashing and decoding threads behind them) whole cores on a small
/// host: it balances runqueues by weight, so it stacks the main runtime's
/// heavy workers and leaves the light bulk threads a core of their own.
/// Resting bulk steps while small requests keep the main runtime busy gives
/// that CPU back; the connections' copies slow with them, because a bulk
/// body is read only as fast as it is hashed and written only as fast as it
/// is decoded. While the main runtime is not busy, bulk work runs unslowed.
///
/// The watcher is a plain thread, so a saturated runtime cannot delay its
/// measurement; it runs as long as the process.
pub fn watch_main_runtime(main: Handle) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hoard-lanes".into())
        .spawn(move || {
            let metrics = main.metrics();
            let workers = metrics.num_workers();
            let busy_total = || -> Duration {
                (0..workers)
                    .map(|w| metrics.worker_total_busy_duration(w))
                    .sum()
            };
            let mut last = (Instant::now(), busy_total());
            let mut smoothed = 0.0f64;
            loop {
                std::thread::sleep(SAMPLE_EVERY);
                let now = (Instant::now(), busy_total());
                let wall = now.0.duration_since(last.0).as_secs_f64() * workers as f64;
                let busy = now.1.saturating_sub(last.1).as_secs_f64();
                last = now;
                if wall > 0.0 {
                    smoothed += SMOOTHING * (busy / wall - smoothed);
                }
                hoard_disk::turns::set_contended(smoothed >= BUSY_SHARE);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(name: &str) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    /// A connection that serves a small request, a bulk one, then a small
    /// one runs the bulk one, and only it, on the bulk runtime; a wait in
    /// the middle of each (a timer made on one runtime, woken on the other)
    /// is not lost.
    #[test]
    fn a_bulk_transfer_moves_and_comes_back() {
        let main = runtime("lane-main");
        let bulk = runtime("lane-bulk");
        let seen = main.block_on(async {
            let mark = Arc::new(Mark::default());
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let m = Arc::clone(&mark);
            let conn: Conn = Box::pin(async move {
                for bulk in [false, true, false] {
                    let guard = bulk.then(|| m.bulk());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let _ = tx.send((bulk, thread_name()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    drop(guard);
                    tokio::task::yield_now().await;
                }
            });
            // Spawned, as the server does: block_on itself runs on the
            // test's thread.
            let task = tokio::spawn(run(Some(bulk.handle().clone()), mark, conn));
            let ran = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(matches!(ran, Ok(Ok(()))), "the connection never finished");
            let mut seen = Vec::new();
            while let Ok(s) = rx.try_recv() {
                seen.push(s);
            }
            seen
        });
        assert_eq!(seen.len(), 3);
        for (bulk, name) in seen {
            let want = if bulk { "lane-bulk" } else { "lane-main" };
            assert_eq!(name, want, "bulk={bulk}");
        }
    }

    /// A main runtime kept busy makes bulk work rest; once it idles, bulk
    /// work goes back to full speed.
    #[test]
    fn a_busy_main_runtime_makes_bulk_work_rest() {
        let main = runtime("lane-watched");
        let watcher = watch_main_runtime(main.handle().clone());
        assert!(watcher.is_ok());
        let wait_for = |want: bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while hoard_disk::turns::contended() != want {
                assert!(Instant::now() < deadline, "never became contended={want}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = Arc::clone(&stop);
        // A task that keeps the only worker busy. It yields between
        // bursts: the runtime reports busy time only from its scheduling
        // loop, as a busy server's does between requests.
        main.spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let burst = Instant::now();
                while burst.elapsed() < Duration::from_micros(200) {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        });
        wait_for(true);
        stop.store(true, Ordering::Relaxed);
        wait_for(false);
    }

    #[test]
    fn bulk_is_large_or_of_unknown_length() {
        assert!(!is_bulk(Some(BULK_BYTES - 1)));
        assert!(is_bulk(Some(BULK_BYTES)));
        assert!(is_bulk(None));
    }
}
