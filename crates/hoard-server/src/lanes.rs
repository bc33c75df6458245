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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    #[test]
    fn bulk_is_large_or_of_unknown_length() {
        assert!(!is_bulk(Some(BULK_BYTES - 1)));
        assert!(is_bulk(Some(BULK_BYTES)));
        assert!(is_bulk(None));
    }
}
