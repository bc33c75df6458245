//! A bounded, positive-only cache of "this object is in the bucket", so
//! existence checks (FindMissingBlobs, completeness, ByteStream early return)
//! do not HEAD the bucket for every question (bazel-remote measured 48 HEADs
//! per GET). Facts come from upload outcomes (created, already_exists),
//! successful GETs and HEADs; they expire after a TTL, so an object deleted
//! behind hoard's back is believed present for at most that long, and a
//! failed read of it removes the fact at once.
//!
//! Absence is remembered too, separately and briefly (`absence_ttl`), and
//! only for questions where a wrong "missing" costs a re-upload and nothing
//! else (FindMissingBlobs): never for completeness, where "absent" would
//! drop an action result. A presence fact (an upload outcome, a read, a
//! HEAD) erases the absence at once.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hoard_disk::{Hash, Kind};

type Key = (String, Kind, Hash);

pub struct ExistenceCache {
    inner: parking_lot::Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
    absent: parking_lot::Mutex<HashMap<Key, Instant>>,
    absence_ttl: Duration,
}

struct Inner {
    map: HashMap<Key, (u64, Instant)>,
    /// Insertion order, for evicting the oldest fact when full.
    order: VecDeque<Key>,
}

impl ExistenceCache {
    /// Presence facts trusted for `ttl`, at most `capacity` of them;
    /// absence remembered for `absence_ttl` (zero: never).
    pub fn with_absence(ttl: Duration, capacity: usize, absence_ttl: Duration) -> ExistenceCache {
        ExistenceCache {
            inner: parking_lot::Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            ttl,
            capacity: capacity.max(1),
            absent: parking_lot::Mutex::new(HashMap::new()),
            absence_ttl,
        }
    }

    /// Notes that the bucket said it has no such object.
    pub fn note_absent(&self, ns: &str, kind: Kind, hash: &Hash) {
        if self.absence_ttl.is_zero() {
            return;
        }
        let mut a = self.absent.lock();
        if a.len() >= self.capacity {
            // Bounded the simple way: absence is a hint, and forgetting
            // it costs one HEAD each.
            let ttl = self.absence_ttl;
            a.retain(|_, at| at.elapsed() < ttl);
            if a.len() >= self.capacity {
                a.clear();
            }
        }
        a.insert((ns.to_string(), kind, *hash), Instant::now());
    }

    /// Whether the bucket said "absent" less than `absence_ttl` ago (and
    /// nothing said "present" since).
    pub fn known_absent(&self, ns: &str, kind: Kind, hash: &Hash) -> bool {
        if self.absence_ttl.is_zero() {
            return false;
        }
        let mut a = self.absent.lock();
        let key = (ns.to_string(), kind, *hash);
        match a.get(&key) {
            Some(at) if at.elapsed() < self.absence_ttl => true,
            Some(_) => {
                a.remove(&key);
                false
            }
            None => false,
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
        let key = (ns.to_string(), kind, *hash);
        if !self.absence_ttl.is_zero() {
            self.absent.lock().remove(&key);
        }
        let mut g = self.inner.lock();
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
        let c = ExistenceCache::with_absence(Duration::from_millis(50), 2, Duration::ZERO);
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

    #[test]
    fn absence_is_brief_and_presence_erases_it() {
        let h = |i: u8| Hash([i; 32]);
        let off = ExistenceCache::with_absence(Duration::from_secs(60), 10, Duration::ZERO);
        off.note_absent("", Kind::Cas, &h(1));
        assert!(!off.known_absent("", Kind::Cas, &h(1)), "off by default");
        let c =
            ExistenceCache::with_absence(Duration::from_secs(60), 10, Duration::from_millis(50));
        c.note_absent("", Kind::Cas, &h(1));
        c.note_absent("", Kind::Cas, &h(2));
        assert!(c.known_absent("", Kind::Cas, &h(1)));
        assert!(!c.known_absent("other", Kind::Cas, &h(1)));
        c.insert("", Kind::Cas, &h(1), 5);
        assert!(!c.known_absent("", Kind::Cas, &h(1)), "an upload erases it");
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.known_absent("", Kind::Cas, &h(2)), "expired");
    }
}
