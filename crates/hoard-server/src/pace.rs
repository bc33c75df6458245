//! Pacing of bulk transfers, so that a small request never waits long
//! behind a large one on the same runtime thread.
//!
//! Tokio does not preempt: a task runs until it returns `Pending`. A
//! connection streaming a 64 MiB blob is always ready (the socket takes
//! more, or the client has sent more), so without a pause it copies
//! megabytes per poll while a 4 KiB GET queued behind it waits. Every bulk
//! path therefore hands back the thread after [`SLICE`] bytes: the task
//! goes to the back of the run queue, and whatever was waiting runs first.
//! A slice costs tens of microseconds of copying; the pause costs one trip
//! through the scheduler, so bulk throughput does not change measurably.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::Stream;

/// Bytes a bulk transfer moves between two pauses.
pub const SLICE: usize = 256 << 10;

/// Counts the bytes of an upload and says when to pause.
#[derive(Default)]
pub struct Pacer {
    since_pause: usize,
}

impl Pacer {
    /// Records `n` bytes moved; pauses (yields to the scheduler) once a
    /// slice's worth has gone by since the last pause.
    pub async fn moved(&mut self, n: usize) {
        self.since_pause += n;
        if self.since_pause >= SLICE {
            self.since_pause = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// A body stream whose chunks go out at most [`SLICE`] bytes at a time,
/// with a pause before each further slice of a chunk. Slices share the
/// chunk's memory (and so whatever budget permit the chunk carries, until
/// the last slice is written).
pub struct Paced<S> {
    inner: S,
    rest: Bytes,
    paused: bool,
}

impl<S> Paced<S> {
    pub fn new(inner: S) -> Paced<S> {
        Paced {
            inner,
            rest: Bytes::new(),
            paused: false,
        }
    }
}

impl<S, E> Stream for Paced<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            if !this.paused {
                // Back of the run queue: wake now, return Pending.
                this.paused = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.paused = false;
            let n = this.rest.len().min(SLICE);
            return Poll::Ready(Some(Ok(this.rest.split_to(n))));
        }
        match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
            Some(Ok(mut chunk)) if chunk.len() > SLICE => {
                this.rest = chunk.split_off(SLICE);
                Poll::Ready(Some(Ok(chunk)))
            }
            other => Poll::Ready(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn slices_a_large_chunk_and_keeps_every_byte_in_order() {
        let big: Vec<u8> = (0..(SLICE * 2 + 100)).map(|i| (i % 251) as u8).collect();
        let small = Bytes::from_static(b"tail");
        let chunks: Vec<Result<Bytes, ()>> = vec![Ok(Bytes::from(big.clone())), Ok(small)];
        let out: Vec<Bytes> = Paced::new(futures_util::stream::iter(chunks))
            .map(|r| r.unwrap_or_default())
            .collect()
            .await;
        let lens: Vec<usize> = out.iter().map(|b| b.len()).collect();
        assert_eq!(lens, vec![SLICE, SLICE, 100, 4]);
        let joined: Vec<u8> = out.concat();
        assert_eq!(&joined[..big.len()], &big[..]);
        assert_eq!(&joined[big.len()..], b"tail");
    }

    #[tokio::test]
    async fn pauses_between_slices_of_one_chunk() {
        let chunks: Vec<Result<Bytes, ()>> = vec![Ok(Bytes::from(vec![0u8; SLICE * 2]))];
        let mut s = Paced::new(futures_util::stream::iter(chunks));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut s = Pin::new(&mut s);
        assert!(matches!(
            s.as_mut().poll_next(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(s.as_mut().poll_next(&mut cx).is_pending());
        assert!(matches!(
            s.as_mut().poll_next(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(matches!(s.as_mut().poll_next(&mut cx), Poll::Ready(None)));
    }
}
