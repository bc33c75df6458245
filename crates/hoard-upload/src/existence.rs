//! A bounded, positive-only cache of "this object is in the bucket", so
//! existence checks (FindMissingBlobs, completeness, ByteStream early return)
//! do not HEAD the bucket for every question (bazel-remote measured 48 HEADs
//! per GET). Facts come from upload outcomes (created, already_exists),
//! successful GETs and HEADs; they expire after a TTL, so an object deleted
//! behind hoard's back is believed present for at most that long, and a
//! failed read of it removes the fact at once. Absence is never cached: a
//! blob another host uploads a second later must not be reported missing.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hoard_disk::{Hash, Kind};

type Key = (String, Kind, Hash);

pub struct ExistenceCache {
    inner: parking_lot::Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
}

struct Inner {
    map: HashMap<Key, (u64, Instant)>,
    /// Insertion order, for evicting the oldest fact when full.
    order: VecDeque<Key>,
}

impl ExistenceCache {
    pub fn new(ttl: Duration, capacity: usize) -> ExistenceCache {
        ExistenceCache {
            inner: parking_lot::Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            ttl,
            capacity: capacity.max(1),
        }
    }

    /// The stored size, if the object is known to be in the bucket.
    pub fn get(&self, ns: &str, kind: Kind, hash: &Hash) -> Option<u64> {
        let mut g = self.inner.lock();
        let key = (ns.to_string(), kind, *hash);
        match g.map.get(&key) {
            Some((size, at)) if at.elapsed() < self.ttl => Some(*size),
            Some(_) => {
                g.map.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, ns: &str, kind: Kind, hash: &Hash, size: u64) {
        let mut g = self.inner.lock();
        let key = (ns.to_string(), kind, *hash);
        if g.map.insert(key.clone(), (size, Instant::now())).is_none() {
            g.order.push_back(key);
        }
        while g.map.len() > self.capacity {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.map.remove(&old);
        }
        // Keep the order queue from growing past the map by much.
        if g.order.len() > 2 * self.capacity {
            let Inner { map, order } = &mut *g;
            order.retain(|k| map.contains_key(k));
        }
    }

    pub fn remove(&self, ns: &str, kind: Kind, hash: &Hash) {
        self.inner.lock().map.remove(&(ns.to_string(), kind, *hash));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_expire_and_capacity_is_bounded() {
        let c = ExistenceCache::new(Duration::from_millis(50), 2);
        let h = |i: u8| Hash([i; 32]);
        c.insert("", Kind::Cas, &h(1), 10);
        assert_eq!(c.get("", Kind::Cas, &h(1)), Some(10));
        assert_eq!(c.get("x", Kind::Cas, &h(1)), None);
        c.insert("", Kind::Cas, &h(2), 20);
        c.insert("", Kind::Cas, &h(3), 30);
        assert_eq!(c.get("", Kind::Cas, &h(1)), None, "oldest evicted");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.get("", Kind::Cas, &h(3)), None, "expired");
    }
}
