//! Where log lines go: a bounded queue drained by one thread that owns the
//! output (stderr for logs, stdout for the access log).
//!
//! Invariant: writing a line never blocks and never fails for its caller. A
//! reader that stopped reading (a full pipe) blocks only the sink's thread;
//! lines beyond the queue's capacity are dropped and counted. A reader that
//! went away (a closed pipe: EPIPE) makes the thread discard what follows.
//! Nothing here panics, so a dead stdout or stderr can cost log lines, never
//! a request or the signal handler.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The sending side of a log output. Cheap to clone.
#[derive(Clone)]
pub struct LineSink {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl LineSink {
    /// Starts the thread that writes to `out`. `capacity` is the number of
    /// messages that may wait.
    pub fn spawn(name: &str, out: impl Write + Send + 'static, capacity: usize) -> LineSink {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(capacity.max(1));
        // Without its thread the queue fills and every line is dropped:
        // logging is lost, serving is not.
        let _ = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                let mut broken = false;
                while let Ok(first) = rx.recv() {
                    if broken {
                        continue;
                    }
                    let mut ok = out.write_all(&first).is_ok();
                    while ok && let Ok(more) = rx.try_recv() {
                        ok = out.write_all(&more).is_ok();
                    }
                    // Flush when the queue is empty: one write per burst.
                    broken = !(ok && out.flush().is_ok());
                }
            });
        LineSink {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues one message; drops it if the queue is full.
    pub fn send(&self, msg: Vec<u8>) {
        if self.tx.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Messages dropped because the queue was full or the thread is gone.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `wait`) until the queue is empty, for a clean exit.
    pub fn drain(&self, wait: Duration) {
        let until = Instant::now() + wait;
        while !self.tx.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An `io::Write` that collects one message and queues it when dropped
    /// (tracing-subscriber makes one per event).
    pub fn writer(&self) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            buf: Vec::new(),
        }
    }
}

/// One message being written; see [`LineSink::writer`].
pub struct LineWriter {
    sink: LineSink,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.send(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that fails every write, like a closed pipe.
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
    }

    /// An output that never returns, like a pipe nobody reads.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_or_stuck_output_never_blocks_or_fails_the_caller() {
        for sink in [
            LineSink::spawn("t-closed", Closed, 4),
            LineSink::spawn("t-stuck", Stuck, 4),
        ] {
            let t = Instant::now();
            for i in 0..10_000 {
                writeln!(sink.writer(), "line {i}").unwrap();
            }
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        }
        let stuck = LineSink::spawn("t-stuck2", Stuck, 4);
        for _ in 0..100 {
            stuck.send(b"x\n".to_vec());
        }
        assert!(stuck.dropped() >= 90, "{}", stuck.dropped());
    }
}
