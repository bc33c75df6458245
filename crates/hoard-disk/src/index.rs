//! The in-memory index: every committed blob, in LRU order, in 56 bytes.
//!
//! Layout, chosen so that a million entries cost about 61 MB:
//!
//! * `entries`: a slab of fixed-size [`Entry`] records (56 bytes each). An
//!   entry holds the full hash, the LRU links as `u32` slab indices, the
//!   stored size in 4 KiB blocks, the file name's random suffix, the logical
//!   size (46 bits) and a 16-bit tag (namespace, kind, file format).
//! * `table`: an open-addressing hash table of `u32` slab indices with linear
//!   probing, kept at most 80% full (5 bytes per entry). Its capacity is not
//!   a power of two, so a table sized at load has no doubling slack.
//!
//! Buckets are chosen by SipHash with a per-process random key over the whole
//! key, so a client that picks action-cache keys cannot force collisions.
//!
//! The index is not thread-safe by itself; `DiskCache` keeps it under one
//! mutex and never does I/O while holding it.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::key::{Hash, Kind, NamespaceId};

pub(crate) const NIL: u32 = u32::MAX;
const MAX_LOAD_NUM: usize = 4;
const MAX_LOAD_DEN: usize = 5;

/// How the blob's bytes are stored, which decides its file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// zstd casblob, `<hash>-<size>-<suffix>` (`<hash>-<suffix>` when empty).
    Casblob,
    /// Raw CAS bytes, `<hash>-<suffix>.v1`.
    RawV1,
    /// AC or RAW entry bytes, `<hash>-<suffix>`.
    Plain,
}

impl Format {
    pub(crate) fn bits(self) -> u16 {
        match self {
            Format::Casblob => 0,
            Format::RawV1 => 1,
            Format::Plain => 2,
        }
    }
    pub(crate) fn from_bits(b: u16) -> Format {
        match b {
            0 => Format::Casblob,
            1 => Format::RawV1,
            _ => Format::Plain,
        }
    }
}

/// Largest logical size an entry can record (64 TiB).
pub(crate) const MAX_LOGICAL: u64 = (1 << 46) - 1;
/// Largest namespace id that fits the tag.
pub(crate) const MAX_NAMESPACES: usize = 1 << 11;

/// One committed blob. 56 bytes; see the module doc.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Entry {
    pub hash: [u8; 32],
    prev: u32,
    next: u32,
    /// SizeOnDisk in 4 KiB blocks.
    pub blocks: u32,
    /// The file name's random suffix, when it is a 9-digit decimal number;
    /// other suffixes live in `Index::odd_suffixes`.
    pub suffix: u32,
    size_lo: u32,
    /// Bits 0-13: logical size bits 32-45; bit 14: odd suffix; bit 15: the
    /// blob is known to be in the bucket (uploaded, or read from it) since
    /// this process started.
    size_hi: u16,
    /// Bits 0-10 namespace, 11-12 kind, 13-14 format.
    tag: u16,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 56);

impl Entry {
    // A record constructor: each argument is one packed field.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        format: Format,
        logical: u64,
        blocks: u32,
        suffix: u32,
        odd_suffix: bool,
    ) -> Entry {
        let logical = logical.min(MAX_LOGICAL);
        Entry {
            hash: hash.0,
            prev: NIL,
            next: NIL,
            blocks,
            suffix,
            size_lo: logical as u32,
            size_hi: ((logical >> 32) as u16 & 0x3fff) | if odd_suffix { 1 << 14 } else { 0 },
            tag: ns.0 | (kind.bits() << 11) | (format.bits() << 13),
        }
    }

    pub fn ns(&self) -> NamespaceId {
        NamespaceId(self.tag & 0x7ff)
    }
    pub fn kind(&self) -> Kind {
        Kind::from_bits((self.tag >> 11) & 3)
    }
    pub fn format(&self) -> Format {
        Format::from_bits((self.tag >> 13) & 3)
    }
    pub fn logical(&self) -> u64 {
        ((self.size_hi as u64 & 0x3fff) << 32) | self.size_lo as u64
    }
    pub fn odd_suffix(&self) -> bool {
        self.size_hi & (1 << 14) != 0
    }
    pub fn uploaded(&self) -> bool {
        self.size_hi & (1 << 15) != 0
    }
    pub fn set_uploaded(&mut self) {
        self.size_hi |= 1 << 15;
    }
    pub fn size_on_disk(&self) -> u64 {
        self.blocks as u64 * crate::BLOCK_SIZE
    }
    fn key_tag(&self) -> u16 {
        self.tag & 0x1fff
    }
}

fn key_tag(ns: NamespaceId, kind: Kind) -> u16 {
    ns.0 | (kind.bits() << 11)
}

pub(crate) struct Index {
    entries: Vec<Entry>,
    /// Head of the free-slot list, threaded through `Entry::next`.
    free: u32,
    table: Vec<u32>,
    len: usize,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to evict.
    tail: u32,
    hasher: RandomState,
    odd_suffixes: HashMap<u32, Box<str>>,
    /// Sum of SizeOnDisk over all entries.
    pub size_on_disk: u64,
    /// Sum of logical sizes rounded up to 4 KiB, as bazel-remote reports it.
    pub logical_bytes: u64,
    /// Per namespace id: entries and SizeOnDisk.
    ns_usage: Vec<(u64, u64)>,
}

impl Index {
    pub fn with_capacity(n: usize) -> Index {
        let mut idx = Index {
            entries: Vec::new(),
            free: NIL,
            table: Vec::new(),
            len: 0,
            head: NIL,
            tail: NIL,
            hasher: RandomState::new(),
            odd_suffixes: HashMap::new(),
            size_on_disk: 0,
            logical_bytes: 0,
            ns_usage: Vec::new(),
        };
        idx.reserve(n);
        idx
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Makes room for `additional` more entries without further allocation.
    /// Growth is geometric (at least a quarter), so a stream of small
    /// reservations costs amortised O(1) per entry.
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len + additional;
        if want > self.entries.capacity() {
            let target = want.max(self.entries.capacity() + self.entries.capacity() / 4);
            self.entries.reserve_exact(target - self.entries.len());
        }
        if want * MAX_LOAD_DEN > self.table.len() * MAX_LOAD_NUM {
            let target = want.max(self.len + self.len / 4);
            self.rehash((target * MAX_LOAD_DEN).div_ceil(MAX_LOAD_NUM).max(16));
        }
    }

    /// Releases growth slack: the slab shrinks to its live length (when no
    /// slot is free) and the table to the size its load factor needs.
    /// Called once the startup load is done.
    pub fn compact(&mut self) {
        if self.free == NIL {
            self.entries.shrink_to_fit();
        }
        let buckets = (self.len * MAX_LOAD_DEN).div_ceil(MAX_LOAD_NUM).max(16);
        if buckets < self.table.len() {
            self.rehash(buckets);
        }
    }

    /// Bytes of heap the index holds, for the per-entry memory gauge.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>() + self.table.capacity() * 4
    }

    fn bucket_of(&self, hash: &[u8; 32], tag: u16) -> usize {
        let h = self.hasher.hash_one((hash, tag));
        ((h as u128 * self.table.len() as u128) >> 64) as usize
    }

    fn next_bucket(&self, i: usize) -> usize {
        if i + 1 == self.table.len() { 0 } else { i + 1 }
    }

    fn rehash(&mut self, buckets: usize) {
        self.table = vec![NIL; buckets];
        let mut slot = self.head;
        while slot != NIL {
            self.place(slot);
            slot = self.entries[slot as usize].next;
        }
    }

    fn place(&mut self, slot: u32) {
        let e = &self.entries[slot as usize];
        let mut i = self.bucket_of(&e.hash, e.key_tag());
        while self.table[i] != NIL {
            i = self.next_bucket(i);
        }
        self.table[i] = slot;
    }

    fn find_bucket(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let tag = key_tag(ns, kind);
        let mut i = self.bucket_of(&hash.0, tag);
        loop {
            let slot = self.table[i];
            if slot == NIL {
                return None;
            }
            let e = &self.entries[slot as usize];
            if e.hash == hash.0 && e.key_tag() == tag {
                return Some(i);
            }
            i = self.next_bucket(i);
        }
    }

    pub fn find(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> Option<u32> {
        self.find_bucket(ns, kind, hash).map(|b| self.table[b])
    }

    pub fn entry(&self, slot: u32) -> &Entry {
        &self.entries[slot as usize]
    }

    pub fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        &mut self.entries[slot as usize]
    }

    /// Up to `max` slots of `kind` whose entry is not marked uploaded,
    /// least recently used first.
    pub fn not_uploaded(&self, kind: Kind, max: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut s = self.tail;
        while s != NIL && out.len() < max {
            let e = &self.entries[s as usize];
            if e.kind() == kind && !e.uploaded() {
                out.push(s);
            }
            s = e.prev;
        }
        out
    }

    pub fn odd_suffix(&self, slot: u32) -> Option<&str> {
        self.odd_suffixes.get(&slot).map(|s| &**s)
    }

    /// Inserts a key that is not present, as most recently used, or as least
    /// recently used when `cold` (entries found on disk at startup).
    pub fn insert(&mut self, mut entry: Entry, odd_suffix: Option<Box<str>>, cold: bool) -> u32 {
        debug_assert!(
            self.find(entry.ns(), entry.kind(), &Hash(entry.hash))
                .is_none()
        );
        if (self.len + 1) * MAX_LOAD_DEN > self.table.len() * MAX_LOAD_NUM {
            self.reserve(1);
        }
        entry.prev = NIL;
        entry.next = NIL;
        self.size_on_disk += entry.size_on_disk();
        self.logical_bytes += crate::round_up_block(entry.logical());
        let ns = entry.ns().index();
        if self.ns_usage.len() <= ns {
            self.ns_usage.resize(ns + 1, (0, 0));
        }
        self.ns_usage[ns].0 += 1;
        self.ns_usage[ns].1 += entry.size_on_disk();
        let slot = if self.free != NIL {
            let s = self.free;
            self.free = self.entries[s as usize].next;
            self.entries[s as usize] = entry;
            s
        } else {
            if self.entries.len() == self.entries.capacity() {
                self.reserve(1);
            }
            self.entries.push(entry);
            (self.entries.len() - 1) as u32
        };
        if let Some(s) = odd_suffix {
            self.odd_suffixes.insert(slot, s);
        }
        self.place(slot);
        self.len += 1;
        if cold {
            self.link_tail(slot);
        } else {
            self.link_head(slot);
        }
        slot
    }

    /// Marks `slot` as most recently used.
    pub fn touch(&mut self, slot: u32) {
        if self.head != slot {
            self.unlink(slot);
            self.link_head(slot);
        }
    }

    pub fn remove(&mut self, slot: u32) -> (Entry, Option<Box<str>>) {
        let e = self.entries[slot as usize];
        if let Some(mut i) = self.find_bucket(e.ns(), e.kind(), &Hash(e.hash)) {
            // Backward-shift deletion keeps every probe chain unbroken
            // without tombstones.
            self.table[i] = NIL;
            let mut j = i;
            loop {
                j = self.next_bucket(j);
                let s = self.table[j];
                if s == NIL {
                    break;
                }
                let se = &self.entries[s as usize];
                let k = self.bucket_of(&se.hash, se.key_tag());
                let stays = if i <= j {
                    i < k && k <= j
                } else {
                    i < k || k <= j
                };
                if !stays {
                    self.table[i] = s;
                    self.table[j] = NIL;
                    i = j;
                }
            }
        }
        self.unlink(slot);
        self.size_on_disk -= e.size_on_disk();
        self.logical_bytes -= crate::round_up_block(e.logical());
        let usage = &mut self.ns_usage[e.ns().index()];
        usage.0 -= 1;
        usage.1 -= e.size_on_disk();
        self.len -= 1;
        self.entries[slot as usize].next = self.free;
        self.free = slot;
        let odd = self.odd_suffixes.remove(&slot);
        (e, odd)
    }

    /// Entries and SizeOnDisk of namespace `ns`.
    pub fn ns_usage(&self, ns: NamespaceId) -> (u64, u64) {
        self.ns_usage.get(ns.index()).copied().unwrap_or((0, 0))
    }

    /// The next more recently used entry after `slot` (NIL at the head).
    pub fn hotter(&self, slot: u32) -> u32 {
        self.entries[slot as usize].prev
    }

    /// The least recently used entry.
    pub fn lru(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// Slots from least to most recently used.
    pub fn slots_cold_to_hot(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len);
        let mut s = self.tail;
        while s != NIL {
            out.push(s);
            s = self.entries[s as usize].prev;
        }
        out
    }

    /// Rebuilds the LRU order: `order[0]` becomes the least recently used.
    pub fn relink(&mut self, order: &[u32]) {
        self.head = NIL;
        self.tail = NIL;
        for &s in order {
            self.entries[s as usize].prev = NIL;
            self.entries[s as usize].next = NIL;
            self.link_head(s);
        }
    }

    fn unlink(&mut self, slot: u32) {
        let (p, n) = {
            let e = &self.entries[slot as usize];
            (e.prev, e.next)
        };
        if p != NIL {
            self.entries[p as usize].next = n;
        } else if self.head == slot {
            self.head = n;
        }
        if n != NIL {
            self.entries[n as usize].prev = p;
        } else if self.tail == slot {
            self.tail = p;
        }
        let e = &mut self.entries[slot as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn link_head(&mut self, slot: u32) {
        let old = self.head;
        {
            let e = &mut self.entries[slot as usize];
            e.prev = NIL;
            e.next = old;
        }
        if old != NIL {
            self.entries[old as usize].prev = slot;
        } else {
            self.tail = slot;
        }
        self.head = slot;
    }

    fn link_tail(&mut self, slot: u32) {
        let old = self.tail;
        {
            let e = &mut self.entries[slot as usize];
            e.next = NIL;
            e.prev = old;
        }
        if old != NIL {
            self.entries[old as usize].next = slot;
        } else {
            self.head = slot;
        }
        self.tail = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u32) -> Hash {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_le_bytes());
        Hash(b)
    }

    fn e(i: u32, ns: u16) -> Entry {
        Entry::new(
            NamespaceId(ns),
            Kind::Cas,
            h(i),
            Format::Casblob,
            i as u64 * 10,
            1,
            i,
            false,
        )
    }

    #[test]
    fn entry_fields_round_trip() {
        let x = Entry::new(
            NamespaceId(2047),
            Kind::Raw,
            h(7),
            Format::RawV1,
            MAX_LOGICAL,
            9,
            123_456_789,
            true,
        );
        assert_eq!(x.ns(), NamespaceId(2047));
        assert_eq!(x.kind(), Kind::Raw);
        assert_eq!(x.format(), Format::RawV1);
        assert_eq!(x.logical(), MAX_LOGICAL);
        assert!(x.odd_suffix());
    }

    #[test]
    fn insert_find_remove_and_lru_order_agree_with_a_model() {
        let mut idx = Index::with_capacity(0);
        let mut model: Vec<(u32, u16)> = Vec::new(); // most recent last
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..20_000 {
            let k = (next() % 3000) as u32;
            let ns = (next() % 2) as u16;
            let found = idx.find(NamespaceId(ns), Kind::Cas, &h(k));
            let pos = model.iter().position(|&m| m == (k, ns));
            assert_eq!(found.is_some(), pos.is_some());
            match (next() % 3, found, pos) {
                (0, Some(s), Some(p)) => {
                    idx.remove(s);
                    model.remove(p);
                }
                (1, Some(s), Some(p)) => {
                    idx.touch(s);
                    let m = model.remove(p);
                    model.push(m);
                }
                (_, None, None) => {
                    idx.insert(e(k, ns), None, false);
                    model.push((k, ns));
                }
                _ => {}
            }
        }
        assert_eq!(idx.len(), model.len());
        let order: Vec<(u32, u16)> = idx
            .slots_cold_to_hot()
            .into_iter()
            .map(|s| {
                let en = idx.entry(s);
                (
                    u32::from_le_bytes(en.hash[..4].try_into().unwrap()),
                    en.ns().0,
                )
            })
            .collect();
        assert_eq!(order, model);
        let expected: u64 = model.len() as u64 * crate::BLOCK_SIZE;
        assert_eq!(idx.size_on_disk, expected);
    }

    #[test]
    fn a_million_entries_cost_at_most_64_bytes_each() {
        let n = 1_000_000;
        let mut idx = Index::with_capacity(n);
        for i in 0..n as u32 {
            idx.insert(e(i, 0), None, true);
        }
        let per = idx.heap_bytes() as f64 / n as f64;
        assert!(per <= 64.0, "{per} bytes per entry");
    }
}
