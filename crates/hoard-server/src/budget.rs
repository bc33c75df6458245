//! The in-flight byte budget: every body byte hoard holds in memory for a
//! request (request and response bodies, decoder windows, batch calls,
//! action-result inlining, GetTree pages, read-through) is counted here
//! before it is allocated, and given back when the bytes are dropped.
//!
//! # Invariants
//!
//! * Bytes held never exceed `max_inflight_bytes`: every [`Permit`] comes
//!   from one of two semaphores whose capacities sum to it.
//! * No connection holds more than its share (a quarter of the budget, at
//!   least [`MIN_SHARE`]): a permit is taken from the connection's
//!   [`Share`] first, then from the pool. A few greedy or slow connections
//!   can hold most of the pool, never all of the budget.
//! * A slice of the budget (the reserve) serves only small acquisitions
//!   (at most [`SMALL`] bytes): small GETs and PUTs, which give their bytes
//!   back within one write, keep flowing while large streams wait.
//! * Waiting is bounded: an acquisition that cannot be served within the
//!   budget's wait fails with [`ErrorKind::Busy`] (HTTP 503, gRPC
//!   UNAVAILABLE, which clients retry) instead of queueing forever.
//! * An acquisition larger than a share can never be served and is refused
//!   at once ([`ErrorKind::TooLarge`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{CacheError, ErrorKind};

/// Acquisitions up to this size may use the reserve.
pub const SMALL: usize = 256 * 1024;
/// The smallest share a connection gets: the largest zstd window an upload
/// may use (8 MiB) and its output buffer, or a batch call (4 MiB) and a
/// streaming chunk pair, fit in it. Below a budget of 40 MiB this is more
/// than a quarter of it.
pub const MIN_SHARE: u64 = 10 << 20;

/// The budget shared by every request.
pub struct Budget {
    pool: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    total: u64,
    reserve_total: u64,
    share: u32,
    wait: Duration,
}

/// One connection's share of the budget.
#[derive(Clone)]
pub struct Share(Arc<Semaphore>);

/// Bytes held under the budget; released when dropped.
pub struct Permit {
    from_pool: OwnedSemaphorePermit,
    from_share: OwnedSemaphorePermit,
}

impl Permit {
    /// Bytes this permit holds.
    pub fn bytes(&self) -> usize {
        self.from_pool.num_permits()
    }

    /// Gives back what this permit holds beyond `keep` bytes (at least one
    /// byte stays held).
    pub fn shrink_to(&mut self, keep: usize) {
        let excess = self.bytes().saturating_sub(keep.max(1));
        if excess > 0 {
            drop(self.from_pool.split(excess));
            drop(self.from_share.split(excess));
        }
    }

    /// Like [`Permit::hold`], for bytes that are shared already (the hot
    /// set's): the response's reference holds the permit.
    pub fn hold_shared(self, data: Bytes) -> Bytes {
        struct Held {
            data: Bytes,
            _permit: Permit,
        }
        impl AsRef<[u8]> for Held {
            fn as_ref(&self) -> &[u8] {
                &self.data
            }
        }
        Bytes::from_owner(Held {
            data,
            _permit: self,
        })
    }

    /// `data` as `Bytes` that keep holding this permit until the last
    /// reference to them is dropped (hyper and h2 drop a frame once it is
    /// written), so the budget counts the bytes for as long as they exist.
    pub fn hold(self, data: Vec<u8>) -> Bytes {
        self.hold_shared(Bytes::from(data))
    }
}

impl Budget {
    /// A budget of `total` bytes (clamped to 1 MiB ..= 4 GiB) whose
    /// acquisitions wait at most `wait`.
    pub fn new(total: u64, wait: Duration) -> Budget {
        let total = total.clamp(1 << 20, u32::MAX as u64);
        let reserve_total = (total / 8).max(1 << 20).min(total / 2);
        let share = (total / 4).max(MIN_SHARE).min(total) as u32;
        Budget {
            pool: Arc::new(Semaphore::new((total - reserve_total) as usize)),
            reserve: Arc::new(Semaphore::new(reserve_total as usize)),
            total,
            reserve_total,
            share,
            wait,
        }
    }

    /// A new connection's share.
    pub fn share(&self) -> Share {
        Share(Arc::new(Semaphore::new(self.share as usize)))
    }

    /// The most one acquisition (and one connection) may hold.
    pub fn share_bytes(&self) -> u64 {
        self.share as u64
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        let free = self.pool.available_permits() as u64 + self.reserve.available_permits() as u64;
        self.total.saturating_sub(free)
    }

    /// Waits (up to the budget's wait) until `n` bytes fit both `share` and
    /// the budget.
    pub async fn acquire(&self, n: usize, share: &Share) -> Result<Permit, CacheError> {
        let n = n.max(1);
        if n as u64 > self.share as u64 {
            return Err(CacheError::new(
                ErrorKind::TooLarge,
                format!(
                    "this request needs {n} bytes of memory at once, more than one connection's share ({} bytes) of max_inflight_bytes",
                    self.share
                ),
            ));
        }
        let n32 = n as u32;
        let deadline = tokio::time::Instant::now() + self.wait;
        let busy = || {
            CacheError::new(
                ErrorKind::Busy,
                format!(
                    "server busy: {n} bytes of in-flight memory (max_inflight_bytes) not free within {:?}; retry",
                    self.wait
                ),
            )
        };
        let closed = |_| CacheError::new(ErrorKind::Unavailable, "server is shutting down");
        let from_share =
            tokio::time::timeout_at(deadline, Arc::clone(&share.0).acquire_many_owned(n32))
                .await
                .map_err(|_| busy())?
                .map_err(closed)?;
        let from_pool = if n <= SMALL && (n as u64) <= self.reserve_total {
            match Arc::clone(&self.pool).try_acquire_many_owned(n32) {
                Ok(p) => p,
                Err(_) => {
                    let pool = Arc::clone(&self.pool).acquire_many_owned(n32);
                    let reserve = Arc::clone(&self.reserve).acquire_many_owned(n32);
                    // Whichever frees first; the other acquisition is
                    // dropped, which gives back anything it had gathered.
                    let either = async {
                        tokio::select! {
                            p = pool => p,
                            p = reserve => p,
                        }
                    };
                    tokio::time::timeout_at(deadline, either)
                        .await
                        .map_err(|_| busy())?
                        .map_err(closed)?
                }
            }
        } else {
            tokio::time::timeout_at(deadline, Arc::clone(&self.pool).acquire_many_owned(n32))
                .await
                .map_err(|_| busy())?
                .map_err(closed)?
        };
        Ok(Permit {
            from_pool,
            from_share,
        })
    }

    /// Refuses every waiting and future acquisition (at shutdown).
    pub fn close(&self) {
        self.pool.close();
        self.reserve.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_requests_pass_while_large_ones_hold_the_pool() {
        let b = Budget::new(16 << 20, Duration::from_millis(200));
        let mut held = Vec::new();
        // Many connections each holding 2 MiB exhaust the pool (14 MiB).
        for _ in 0..7 {
            held.push(b.acquire(2 << 20, &b.share()).await.unwrap());
        }
        let err = match b.acquire(2 << 20, &b.share()).await {
            Err(e) => e,
            Ok(_) => panic!("a large acquisition past the pool succeeded"),
        };
        assert_eq!(err.kind, ErrorKind::Busy);
        // Small ones use the reserve.
        let mut small = Vec::new();
        for _ in 0..100 {
            small.push(b.acquire(4096, &b.share()).await.unwrap());
        }
        assert!(b.held() <= 16 << 20);
        drop(held);
        assert!(b.acquire(2 << 20, &b.share()).await.is_ok());
    }

    #[tokio::test]
    async fn one_connection_cannot_take_more_than_its_share() {
        let b = Budget::new(64 << 20, Duration::from_millis(200));
        let s = b.share();
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(b.acquire(2 << 20, &s).await.unwrap());
        }
        assert_eq!(b.held(), 16 << 20);
        let r = b.acquire(2 << 20, &s).await;
        assert_eq!(r.err().map(|e| e.kind), Some(ErrorKind::Busy));
        // Another connection is not affected.
        assert!(b.acquire(2 << 20, &b.share()).await.is_ok());
        let r = b.acquire(17 << 20, &b.share()).await;
        assert_eq!(r.err().map(|e| e.kind), Some(ErrorKind::TooLarge));
    }

    #[tokio::test]
    async fn shrinking_and_holding_give_bytes_back() {
        let b = Budget::new(16 << 20, Duration::from_millis(200));
        let s = b.share();
        let mut p = b.acquire(2 << 20, &s).await.unwrap();
        p.shrink_to(1000);
        assert_eq!(b.held(), 1000);
        let bytes = p.hold(vec![7; 1000]);
        let copy = bytes.clone();
        drop(bytes);
        assert_eq!(b.held(), 1000);
        drop(copy);
        assert_eq!(b.held(), 0);
    }
}
