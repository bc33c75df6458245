//! The hot set: the content of small, recently read CAS blobs, kept in
//! memory so that a cache hit on one costs no open, read, decompression or
//! verification.
//!
//! Invariants:
//! * Only content that a verified read produced enters (the disk reader
//!   proves every byte it returns, see `hoard_disk::Blob::next_chunk`), so
//!   the hot set never holds bytes that do not match their digest.
//! * An entry is served only while the disk index still holds the blob
//!   (the caller asks the index first, which also marks the blob used
//!   for the disk's eviction order): the hot set is a faster way to the same answer, never a
//!   second source of truth, and eviction or a dropped corrupt file on
//!   disk ends its life here too.
//! * Its size is bounded by `max_bytes`; replacement is CLOCK (second
//!   chance): a hit sets a bit, and the hand passes over set bits once.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use hoard_disk::{Hash, NamespaceId};
use parking_lot::Mutex;

type Key = (NamespaceId, Hash);

pub struct HotSet {
    inner: Mutex<Inner>,
    max_bytes: u64,
    max_blob: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, (Bytes, bool)>,
    /// The CLOCK's ring, in insertion order.
    ring: VecDeque<Key>,
    bytes: u64,
}

impl HotSet {
    /// A hot set of at most `max_bytes` of content, of blobs up to
    /// `max_blob` bytes each. A `max_bytes` of 0 keeps nothing.
    pub fn new(max_bytes: u64, max_blob: u64) -> HotSet {
        HotSet {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            max_blob: max_blob.min(max_bytes),
        }
    }

    /// Whether a blob of `size` bytes may be kept.
    pub fn admits(&self, size: u64) -> bool {
        size > 0 && size <= self.max_blob
    }

    pub fn get(&self, ns: NamespaceId, hash: &Hash) -> Option<Bytes> {
        if self.max_bytes == 0 {
            return None;
        }
        let mut g = self.inner.lock();
        let (bytes, used) = g.map.get_mut(&(ns, *hash))?;
        *used = true;
        Some(bytes.clone())
    }

    /// Keeps `content`, verified, for `(ns, hash)`.
    pub fn insert(&self, ns: NamespaceId, hash: Hash, content: Bytes) {
        let size = content.len() as u64;
        if !self.admits(size) {
            return;
        }
        let mut g = self.inner.lock();
        let key = (ns, hash);
        if g.map.contains_key(&key) {
            return;
        }
        while g.bytes + size > self.max_bytes {
            let Some(k) = g.ring.pop_front() else { break };
            let second_chance = match g.map.get_mut(&k) {
                Some((_, used)) if *used => {
                    *used = false;
                    true
                }
                Some(_) => false,
                None => continue,
            };
            if second_chance {
                g.ring.push_back(k);
            } else if let Some((b, _)) = g.map.remove(&k) {
                g.bytes -= b.len() as u64;
            }
        }
        g.bytes += size;
        g.map.insert(key, (content, false));
        g.ring.push_back(key);
    }

    /// Forgets a blob (its disk entry is gone).
    pub fn remove(&self, ns: NamespaceId, hash: &Hash) {
        let mut g = self.inner.lock();
        if let Some((b, _)) = g.map.remove(&(ns, *hash)) {
            g.bytes -= b.len() as u64;
        }
    }

    /// Bytes of content held.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        Hash([i; 32])
    }

    #[test]
    fn bounded_and_second_chance() {
        let hot = HotSet::new(3000, 1000);
        let ns = NamespaceId::DEFAULT;
        for i in 0..3 {
            hot.insert(ns, h(i), Bytes::from(vec![i; 1000]));
        }
        assert_eq!(hot.bytes(), 3000);
        // 0 is used: the hand spares it once and takes 1.
        assert!(hot.get(ns, &h(0)).is_some());
        hot.insert(ns, h(3), Bytes::from(vec![3; 1000]));
        assert_eq!(hot.bytes(), 3000);
        assert!(hot.get(ns, &h(0)).is_some());
        assert!(hot.get(ns, &h(1)).is_none());
        assert!(hot.get(ns, &h(3)).is_some());
        // Too large, or empty: not kept.
        hot.insert(ns, h(9), Bytes::from(vec![9; 1001]));
        assert!(hot.get(ns, &h(9)).is_none());
        assert!(!hot.admits(0));
        hot.remove(ns, &h(3));
        assert_eq!(hot.bytes(), 2000);
        let off = HotSet::new(0, 1000);
        off.insert(ns, h(1), Bytes::from(vec![1; 10]));
        assert!(off.get(ns, &h(1)).is_none());
    }
}
