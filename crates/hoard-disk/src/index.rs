//! The in-memory index: every committed blob in a 44-byte record, evicted
//! in CLOCK order.
//!
//! Layout, chosen so that a million entries cost about 45 MB:
//!
//! * `slots`: a bucketized cuckoo hash table of [`Record`]s, [`WAYS`] to a
//!   bucket. A key lives in one of two buckets, both chosen by one SipHash
//!   (per-process random key) over the whole key, so a client that picks
//!   action-cache keys can neither predict nor crowd a bucket. A lookup
//!   reads at most two buckets. An insert into two full buckets moves a
//!   resident record to its other bucket, and so on (a random walk of at
//!   most [`MAX_KICKS`] moves); a walk that finds no room grows the table.
//!   Two choices of eight slots keep such walks short even when nearly
//!   full, so the table runs at up to [`MAX_LOAD`] and is packed to
//!   [`PACKED_LOAD`] once the startup load is done. Measured here on a
//!   million entries: a lookup costs about 0.23 µs, an insert into the
//!   packed table about 1.4 µs, and rebuilding the table about 0.15 s.
//! * A record is the full hash (needed to name the file), the file name's
//!   9-digit suffix with two flags, the logical size's low 32 bits and a
//!   32-bit word of namespace, kind, format, the clock count (2 bits), the
//!   uploaded flag and the stored size in 4 KiB blocks (14 bits). Kind 3
//!   marks an empty slot.
//! * Blobs too large for those fields (a logical size of 4 GiB or more, or
//!   64 MiB or more on disk) keep both sizes in `big`; file names whose
//!   suffix is not a 9-digit number keep it in `odd_suffixes`. Both maps
//!   are keyed by the key, not the slot, because records move.
//!
//! # Eviction order
//!
//! CLOCK with a two-bit count instead of an exact LRU list, which would
//! cost eight bytes of links per entry. A new entry, and any entry used,
//! gets a count of three. The hand sweeps the slots in order, takes one
//! from each count it passes, and stops at the first occupied record whose
//! count is zero: an entry left alone is evicted on the fourth pass of the
//! hand after its last use, and entries used less recently have lower
//! counts, so the order comes close to LRU's. (One bit, the classic
//! CLOCK, kept 94% of LRU's hits on the CI-build trace below; two keep
//! 98%.) The unit tests replay a skewed trace and a trace of CI builds
//! through this index and through an exact LRU of the same size and
//! compare the hit ratios.
//!
//! # Slots
//!
//! A slot number names a record until the next insert, which may move any
//! record; a removal moves nothing. Callers use slots only under the lock
//! that guards the index, between two inserts.
//!
//! The index is not thread-safe by itself; `DiskCache` keeps it under one
//! mutex and never does I/O while holding it.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::key::{Hash, Kind, NamespaceId};

/// Slots per bucket.
const WAYS: usize = 8;
/// Moves one insert may make before the table grows instead.
const MAX_KICKS: usize = 500;
/// Fullest the table may get (in percent of its slots) before it grows.
const MAX_LOAD: usize = 98;
/// How full a table is rebuilt when it grows: room to insert without
/// long walks.
const GROWN_LOAD: usize = 85;
/// How full [`Index::compact`] packs the table.
const PACKED_LOAD: usize = 97;
/// Slots one [`Index::not_uploaded`] call looks at (about 3 MB of table).
const UPLOAD_SCAN: usize = 1 << 16;

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

/// One committed blob, as the index hands it out (unpacked; the index
/// stores it as a [`Record`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub hash: [u8; 32],
    /// SizeOnDisk in 4 KiB blocks.
    pub blocks: u32,
    /// The file name's random suffix, when it is a 9-digit decimal number;
    /// other suffixes live in `Index::odd_suffixes`.
    pub suffix: u32,
    logical: u64,
    /// Bits 0-10 namespace, 11-12 kind, 13-14 format.
    tag: u16,
    odd_suffix: bool,
    /// Known to be in the bucket (uploaded, or read from it) since this
    /// process started.
    uploaded: bool,
    /// The clock count: passes of the hand it survives (0-3).
    uses: u8,
}

impl Entry {
    // A record constructor: each argument is one field.
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
        Entry {
            hash: hash.0,
            blocks,
            suffix: if odd_suffix { 0 } else { suffix },
            logical: logical.min(MAX_LOGICAL),
            tag: ns.0 | (kind.bits() << 11) | (format.bits() << 13),
            odd_suffix,
            uploaded: false,
            uses: 0,
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
        self.logical
    }
    pub fn odd_suffix(&self) -> bool {
        self.odd_suffix
    }
    pub fn uploaded(&self) -> bool {
        self.uploaded
    }
    /// The clock count: passes of the hand it survives unless used again
    /// (0 to [`FRESH_USES`]).
    pub fn uses(&self) -> u8 {
        self.uses
    }
    pub fn with_uses(mut self, uses: u8) -> Entry {
        self.uses = uses.min(FRESH_USES);
        self
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

/// The maps beside the table are keyed by the key itself: `(tag, hash)`.
type Key = (u16, [u8; 32]);

// Record fields. `suffix`: bits 0-29 the 9-digit suffix, 30 odd suffix,
// 31 big. `meta`: bits 0-12 the key tag (namespace, kind), 13-14 format,
// 15-16 the clock count, 17 uploaded, 18-31 blocks.
const SUFFIX_BITS: u32 = (1 << 30) - 1;
const ODD: u32 = 1 << 30;
const BIG: u32 = 1 << 31;
const TAG_BITS: u32 = 0x1fff;
const USES_SHIFT: u32 = 15;
const USES: u32 = 3 << USES_SHIFT;
const UPLOADED: u32 = 1 << 17;
const BLOCKS_SHIFT: u32 = 18;
const MAX_INLINE_BLOCKS: u32 = (1 << 14) - 1;
/// Passes of the hand a new or just used entry survives.
pub(crate) const FRESH_USES: u8 = 3;
/// Kind bits 3: no kind, so no lookup ever matches an empty slot.
const EMPTY_TAG: u32 = 3 << 11;

/// One slot of the table. 44 bytes; see the module doc.
#[derive(Clone, Copy)]
#[repr(C)]
struct Record {
    hash: [u8; 32],
    suffix: u32,
    size: u32,
    meta: u32,
}

const _: () = assert!(std::mem::size_of::<Record>() == 44);
const _: () = assert!(MAX_NAMESPACES <= 1 << 11);
// A 9-digit suffix fits its field.
const _: () = assert!(999_999_999 <= SUFFIX_BITS);

const EMPTY: Record = Record {
    hash: [0; 32],
    suffix: 0,
    size: 0,
    meta: EMPTY_TAG,
};

impl Record {
    fn is_empty(&self) -> bool {
        self.meta & TAG_BITS & EMPTY_TAG == EMPTY_TAG
    }
    fn tag(&self) -> u16 {
        (self.meta & TAG_BITS) as u16
    }
    fn key(&self) -> Key {
        (self.tag(), self.hash)
    }
}

pub(crate) struct Index {
    slots: Vec<Record>,
    buckets: usize,
    len: usize,
    /// The clock hand: the next slot the evictor looks at.
    hand: usize,
    /// Per kind, where [`Index::not_uploaded`] goes on.
    upload_cursor: [usize; 3],
    hasher: RandomState,
    /// xorshift state for the cuckoo walk.
    rng: u64,
    odd_suffixes: HashMap<Key, Box<str>>,
    /// Logical size and blocks of blobs too large for a record.
    big: HashMap<Key, (u64, u32)>,
    /// Sum of SizeOnDisk over all entries.
    pub size_on_disk: u64,
    /// Sum of logical sizes rounded up to 4 KiB, as bazel-remote reports it.
    pub logical_bytes: u64,
    /// The same sum over the entries with no stored size: what the hard
    /// limit counts for them while the load sizes them (see `load.rs`).
    pub unsized_logical_bytes: u64,
    /// Per namespace id: entries and SizeOnDisk.
    ns_usage: Vec<(u64, u64)>,
}

impl Index {
    pub fn with_capacity(n: usize) -> Index {
        let hasher = RandomState::new();
        let rng = hasher.hash_one(0x6b69_636bu32) | 1;
        let mut idx = Index {
            slots: Vec::new(),
            buckets: 0,
            len: 0,
            hand: 0,
            upload_cursor: [0; 3],
            hasher,
            rng,
            odd_suffixes: HashMap::new(),
            big: HashMap::new(),
            size_on_disk: 0,
            logical_bytes: 0,
            unsized_logical_bytes: 0,
            ns_usage: Vec::new(),
        };
        idx.reserve(n);
        idx
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots in the table, occupied or not: the range of slot numbers.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Makes room for `additional` more entries. Growth is geometric (at
    /// least a quarter), so a stream of small reservations costs amortised
    /// O(1) per entry.
    pub fn reserve(&mut self, additional: usize) {
        self.reserve_toward(additional, 0);
    }

    /// [`Index::reserve`] for a caller that expects `expected` entries in
    /// all (0: no idea): a growth goes straight there, packed, instead of
    /// a quarter at a time, since each growth moves every record.
    pub fn reserve_toward(&mut self, additional: usize, expected: usize) {
        let want = self.len + additional;
        if want * 100 > self.slots.len() * MAX_LOAD {
            if expected > want {
                self.rebuild(buckets_for(expected, PACKED_LOAD));
            } else {
                let target = want.max(self.len + self.len / 4);
                self.rebuild(buckets_for(target, GROWN_LOAD));
            }
        }
    }

    /// Packs the table to [`PACKED_LOAD`] unless that would save less than
    /// 2%. Called once the startup load is done, when the number of entries
    /// is known.
    pub fn compact(&mut self) {
        let buckets = buckets_for(self.len, PACKED_LOAD);
        if buckets * 102 < self.buckets * 100 {
            self.rebuild(buckets);
        }
        self.odd_suffixes.shrink_to_fit();
        self.big.shrink_to_fit();
    }

    /// Bytes of heap the index holds, for the per-entry memory gauge. The
    /// two maps are estimated at 64 bytes per held entry.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Record>()
            + (self.odd_suffixes.capacity() + self.big.capacity()) * 64
    }

    fn buckets_of(&self, hash: &[u8; 32], tag: u16) -> (usize, usize) {
        let h = self.hasher.hash_one((hash, tag));
        let n = self.buckets as u64;
        let a = (((h & 0xffff_ffff) * n) >> 32) as usize;
        let mut b = (((h >> 32) * n) >> 32) as usize;
        if a == b {
            b = if a + 1 == self.buckets { 0 } else { a + 1 };
        }
        (a, b)
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn free_in(&self, bucket: usize) -> Option<usize> {
        (bucket * WAYS..bucket * WAYS + WAYS).find(|&i| self.slots[i].is_empty())
    }

    /// Puts `rec` into one of its two buckets, moving residents along as
    /// needed, and returns its slot if no other record had to move (else
    /// the caller looks it up). On failure hands back the record left
    /// without a slot (not necessarily `rec`): the table must grow before
    /// it is placed.
    fn place(&mut self, rec: Record) -> Result<Option<usize>, Record> {
        if self.buckets < 2 {
            return Err(rec);
        }
        let (a, b) = self.buckets_of(&rec.hash, rec.tag());
        self.place_in(rec, a, b)
    }

    fn place_in(&mut self, mut rec: Record, a: usize, b: usize) -> Result<Option<usize>, Record> {
        if let Some(i) = self.free_in(a).or_else(|| self.free_in(b)) {
            self.slots[i] = rec;
            return Ok(Some(i));
        }
        let mut bucket = if self.rand() & 1 == 0 { a } else { b };
        for _ in 0..MAX_KICKS {
            let i = bucket * WAYS + (self.rand() as usize % WAYS);
            std::mem::swap(&mut self.slots[i], &mut rec);
            let (x, y) = self.buckets_of(&rec.hash, rec.tag());
            bucket = if x == bucket { y } else { x };
            if let Some(j) = self.free_in(bucket) {
                self.slots[j] = rec;
                return Ok(None);
            }
        }
        Err(rec)
    }

    /// Moves every record into a table of at least `buckets` buckets
    /// (more if the records do not fit there). A million records take
    /// about 0.15 s here, nearly all of it cache and TLB misses.
    fn rebuild(&mut self, buckets: usize) {
        let mut buckets = buckets.max(4);
        let old = std::mem::take(&mut self.slots);
        loop {
            self.buckets = buckets;
            self.slots = vec![EMPTY; buckets * WAYS];
            let fits = old
                .iter()
                .all(|rec| rec.is_empty() || self.place(*rec).is_ok());
            if fits {
                break;
            }
            buckets += buckets / 50 + 1;
        }
        self.hand = 0;
    }

    /// Makes room for `total` entries in all, packed as tightly as
    /// [`Index::compact`] would: for a load that knows its count.
    pub fn reserve_total(&mut self, total: usize) {
        if total * 100 > self.slots.len() * MAX_LOAD {
            self.rebuild(buckets_for(total, PACKED_LOAD));
        }
    }

    fn find_in(&self, tag: u16, hash: &[u8; 32]) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.find_at(tag, hash, self.buckets_of(hash, tag))
    }

    fn find_at(&self, tag: u16, hash: &[u8; 32], (a, b): (usize, usize)) -> Option<usize> {
        let tag = tag as u32;
        [a, b].into_iter().find_map(|bucket| {
            (bucket * WAYS..bucket * WAYS + WAYS)
                .find(|&i| self.slots[i].meta & TAG_BITS == tag && self.slots[i].hash == *hash)
        })
    }

    pub fn find(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> Option<u32> {
        self.find_in(key_tag(ns, kind), &hash.0).map(|i| i as u32)
    }

    /// The entry in `slot`, which must be occupied.
    pub fn entry(&self, slot: u32) -> Entry {
        let r = &self.slots[slot as usize];
        debug_assert!(!r.is_empty());
        let (logical, blocks) = if r.suffix & BIG != 0 {
            self.big.get(&r.key()).copied().unwrap_or((0, 0))
        } else {
            (r.size as u64, r.meta >> BLOCKS_SHIFT)
        };
        Entry {
            hash: r.hash,
            blocks,
            suffix: r.suffix & SUFFIX_BITS,
            logical,
            tag: (r.meta & 0x7fff) as u16,
            odd_suffix: r.suffix & ODD != 0,
            uploaded: r.meta & UPLOADED != 0,
            uses: ((r.meta & USES) >> USES_SHIFT) as u8,
        }
    }

    /// The entry in `slot`, or `None` when the slot is empty.
    pub fn occupied(&self, slot: u32) -> Option<Entry> {
        let r = self.slots.get(slot as usize)?;
        (!r.is_empty()).then(|| self.entry(slot))
    }

    pub fn set_uploaded(&mut self, slot: u32) {
        self.slots[slot as usize].meta |= UPLOADED;
    }

    /// Up to `max` slots of `kind` whose entry is not marked uploaded,
    /// from at most [`UPLOAD_SCAN`] slots, starting where the last call for
    /// `kind` stopped: a caller that asks again and again goes round the
    /// whole table, and no call holds the index lock for long even when
    /// nearly everything is uploaded.
    pub fn not_uploaded(&mut self, kind: Kind, max: usize) -> Vec<u32> {
        let n = self.slots.len();
        let cursor = &mut self.upload_cursor[kind.bits() as usize % 3];
        let mut out = Vec::new();
        for _ in 0..n.min(UPLOAD_SCAN) {
            if out.len() >= max {
                break;
            }
            let i = *cursor % n;
            *cursor = i + 1;
            let r = &self.slots[i];
            if !r.is_empty() && (r.meta >> 11) & 3 == kind.bits() as u32 && r.meta & UPLOADED == 0 {
                out.push(i as u32);
            }
        }
        out
    }

    pub fn odd_suffix(&self, slot: u32) -> Option<&str> {
        let r = &self.slots[slot as usize];
        if r.suffix & ODD == 0 {
            return None;
        }
        self.odd_suffixes.get(&r.key()).map(|s| &**s)
    }

    /// Inserts a key that is not present and returns its slot. Its clock
    /// count is [`FRESH_USES`], or when `cold` (entries found on disk at
    /// startup) the count the entry carries.
    pub fn insert(&mut self, entry: Entry, odd_suffix: Option<Box<str>>, cold: bool) -> u32 {
        debug_assert!(
            self.find(entry.ns(), entry.kind(), &Hash(entry.hash))
                .is_none()
        );
        self.reserve(1);
        let ab = self.buckets_of(&entry.hash, entry.key_tag());
        self.insert_in(entry, odd_suffix, cold, ab)
    }

    /// [`Index::insert`] unless the key is present: then `Err` with the
    /// slot that holds it, and the odd suffix back. One hash and one pair
    /// of buckets for both, for a load that inserts a million keys under
    /// the lock.
    pub fn insert_if_absent(
        &mut self,
        entry: Entry,
        odd_suffix: Option<Box<str>>,
        cold: bool,
    ) -> Result<u32, (u32, Option<Box<str>>)> {
        self.reserve(1);
        let ab = self.buckets_of(&entry.hash, entry.key_tag());
        match self.find_at(entry.key_tag(), &entry.hash, ab) {
            Some(i) => Err((i as u32, odd_suffix)),
            None => Ok(self.insert_in(entry, odd_suffix, cold, ab)),
        }
    }

    /// Inserts into a table with room to spare, given the key's buckets.
    fn insert_in(
        &mut self,
        entry: Entry,
        odd_suffix: Option<Box<str>>,
        cold: bool,
        (a, b): (usize, usize),
    ) -> u32 {
        self.size_on_disk += entry.size_on_disk();
        self.logical_bytes += crate::round_up_block(entry.logical());
        if entry.blocks == 0 {
            self.unsized_logical_bytes += crate::round_up_block(entry.logical());
        }
        let ns = entry.ns().index();
        if self.ns_usage.len() <= ns {
            self.ns_usage.resize(ns + 1, (0, 0));
        }
        self.ns_usage[ns].0 += 1;
        self.ns_usage[ns].1 += entry.size_on_disk();
        let key = (entry.key_tag(), entry.hash);
        let big = entry.logical > u32::MAX as u64 || entry.blocks > MAX_INLINE_BLOCKS;
        if big {
            self.big.insert(key, (entry.logical, entry.blocks));
        }
        let odd = entry.odd_suffix && odd_suffix.is_some();
        if let Some(s) = odd_suffix.filter(|_| odd) {
            self.odd_suffixes.insert(key, s);
        }
        let rec = Record {
            hash: entry.hash,
            suffix: (entry.suffix & SUFFIX_BITS)
                | if odd { ODD } else { 0 }
                | if big { BIG } else { 0 },
            size: if big { 0 } else { entry.logical as u32 },
            meta: entry.tag as u32
                | if entry.uploaded { UPLOADED } else { 0 }
                | (if cold { entry.uses } else { FRESH_USES } as u32) << USES_SHIFT
                | if big { 0 } else { entry.blocks << BLOCKS_SHIFT },
        };
        let mut placed = self.place_in(rec, a, b);
        let mut moved = false;
        while let Err(homeless) = placed {
            // Grow, then place what the walk left over.
            self.rebuild(buckets_for(self.len + self.len / 4 + 1, GROWN_LOAD));
            placed = self.place(homeless);
            moved = true;
        }
        self.len += 1;
        match placed {
            Ok(Some(i)) if !moved => i as u32,
            // The walk may have moved the new record too.
            _ => self
                .find_in(entry.key_tag(), &entry.hash)
                .map_or(0, |i| i as u32),
        }
    }

    /// Marks `slot` as used: its clock count goes back to [`FRESH_USES`].
    pub fn touch(&mut self, slot: u32) {
        self.slots[slot as usize].meta |= USES;
    }

    /// Gives `slot` another chance if it has one left: takes one from its
    /// clock count and says whether there was one to take.
    pub fn second_chance(&mut self, slot: u32) -> bool {
        let m = &mut self.slots[slot as usize].meta;
        let uses = (*m & USES) >> USES_SHIFT;
        if uses == 0 {
            return false;
        }
        *m = (*m & !USES) | (uses - 1) << USES_SHIFT;
        true
    }

    /// Whether the entry in `slot` records no stored size: a file of no
    /// bytes, or one the startup listing indexed before its size was known
    /// (see `load.rs`).
    pub fn size_unknown(&self, slot: u32) -> bool {
        let r = &self.slots[slot as usize];
        if r.suffix & BIG != 0 {
            return self.big.get(&r.key()).is_none_or(|&(_, b)| b == 0);
        }
        r.meta >> BLOCKS_SHIFT == 0
    }

    /// Records the stored size of an entry the startup listing indexed
    /// before its size was known, and raises its clock count to `uses`
    /// (a use since then keeps its higher count). An entry that already
    /// has a size keeps it: a write since the listing sized it exactly.
    pub fn set_size(&mut self, slot: u32, blocks: u32, uses: u8) {
        if blocks > 0 && self.size_unknown(slot) {
            let e = self.entry(slot);
            let r = &mut self.slots[slot as usize];
            if r.suffix & BIG != 0 || blocks > MAX_INLINE_BLOCKS {
                // The size field moves to `big` with the logical size.
                r.suffix |= BIG;
                r.size = 0;
                let key = r.key();
                self.big.insert(key, (e.logical, blocks));
            } else {
                r.meta |= blocks << BLOCKS_SHIFT;
            }
            let bytes = blocks as u64 * crate::BLOCK_SIZE;
            self.unsized_logical_bytes -= crate::round_up_block(e.logical());
            self.size_on_disk += bytes;
            self.ns_usage[e.ns().index()].1 += bytes;
        }
        let m = &mut self.slots[slot as usize].meta;
        let uses = (uses.min(FRESH_USES) as u32) << USES_SHIFT;
        if uses > *m & USES {
            *m = (*m & !USES) | uses;
        }
    }

    /// Advances the clock hand to the next victim: the first occupied slot
    /// whose clock count is zero, taking one from each count it passes.
    /// With `skip_unsized`, entries with no stored size are passed over
    /// untouched: while the startup load is still sizing files, evicting
    /// one would free bytes the limit never counted, so the evictor would
    /// go on deleting without getting under it. Looks at no more than
    /// `budget` slots (the caller holds the lock meanwhile) and gives
    /// `None` when they run out or the index is empty.
    pub fn next_victim(&mut self, budget: &mut usize, skip_unsized: bool) -> Option<u32> {
        let n = self.slots.len();
        if self.len == 0 || n == 0 {
            return None;
        }
        while *budget > 0 {
            *budget -= 1;
            let i = self.hand % n;
            self.hand = i + 1;
            let r = &self.slots[i];
            if r.is_empty() || (skip_unsized && self.size_unknown(i as u32)) {
                continue;
            }
            if !self.second_chance(i as u32) {
                return Some(i as u32);
            }
        }
        None
    }

    pub fn remove(&mut self, slot: u32) -> (Entry, Option<Box<str>>) {
        let e = self.entry(slot);
        let key = self.slots[slot as usize].key();
        self.slots[slot as usize] = EMPTY;
        self.size_on_disk -= e.size_on_disk();
        self.logical_bytes -= crate::round_up_block(e.logical());
        if e.blocks == 0 {
            self.unsized_logical_bytes -= crate::round_up_block(e.logical());
        }
        let usage = &mut self.ns_usage[e.ns().index()];
        usage.0 -= 1;
        usage.1 -= e.size_on_disk();
        self.len -= 1;
        if e.logical > u32::MAX as u64 || e.blocks > MAX_INLINE_BLOCKS {
            self.big.remove(&key);
        }
        let odd = if e.odd_suffix {
            self.odd_suffixes.remove(&key)
        } else {
            None
        };
        (e, odd)
    }

    /// Entries and SizeOnDisk of namespace `ns`.
    pub fn ns_usage(&self, ns: NamespaceId) -> (u64, u64) {
        self.ns_usage.get(ns.index()).copied().unwrap_or((0, 0))
    }

    /// Every occupied slot, in table order.
    pub fn occupied_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, _)| i as u32)
    }
}

/// Buckets for `entries` at `load_pct` percent full.
fn buckets_for(entries: usize, load_pct: usize) -> usize {
    (entries * 100).div_ceil(load_pct * WAYS).max(4)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap as Map};

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
            i % 1_000_000_000,
            false,
        )
    }

    fn key_of(idx: &Index, slot: u32) -> (u32, u16) {
        let en = idx.entry(slot);
        (
            u32::from_le_bytes(en.hash[..4].try_into().unwrap()),
            en.ns().0,
        )
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// An entry the startup listing indexed without a size, in the given
    /// namespace, with a logical size of `logical`.
    fn unsized_entry(i: u32, ns: u16, logical: u64) -> Entry {
        Entry::new(
            NamespaceId(ns),
            Kind::Cas,
            h(i),
            Format::Casblob,
            logical,
            0,
            i,
            false,
        )
    }

    #[test]
    fn sizes_found_after_the_listing_add_up_inline_and_big_and_only_raise_counts() {
        let mut idx = Index::with_capacity(0);
        let small = idx.insert(unsized_entry(1, 0, 100), None, true);
        idx.insert(unsized_entry(2, 1, 1 << 33), None, true);
        idx.insert(unsized_entry(3, 1, 1 << 30), None, true);
        idx.insert(e(4, 1), None, false);
        assert_eq!(
            idx.size_on_disk,
            crate::BLOCK_SIZE,
            "only the sized entry counts"
        );
        let bound = 4096 + (1 << 33) + (1 << 30);
        assert_eq!(idx.unsized_logical_bytes, bound);
        assert!(
            idx.size_unknown(small)
                && !idx.size_unknown(idx.find(NamespaceId(1), Kind::Cas, &h(4)).unwrap())
        );
        idx.set_size(small, 2, 1);
        let s2 = idx.find(NamespaceId(1), Kind::Cas, &h(2)).unwrap();
        idx.set_size(s2, 7, 0);
        let s3 = idx.find(NamespaceId(1), Kind::Cas, &h(3)).unwrap();
        // 4 GiB on disk: too large for the record's field.
        idx.set_size(s3, MAX_INLINE_BLOCKS + 9, 3);
        let got = |idx: &Index, i: u32, ns: u16| {
            let x = idx.entry(idx.find(NamespaceId(ns), Kind::Cas, &h(i)).unwrap());
            (x.logical(), x.blocks, x.uses())
        };
        assert_eq!(got(&idx, 1, 0), (100, 2, 1));
        assert_eq!(got(&idx, 2, 1), (1 << 33, 7, 0));
        assert_eq!(got(&idx, 3, 1), (1 << 30, MAX_INLINE_BLOCKS + 9, 3));
        let blocks = 1 + 2 + 7 + MAX_INLINE_BLOCKS as u64 + 9;
        assert_eq!(idx.size_on_disk, blocks * crate::BLOCK_SIZE);
        assert_eq!(idx.ns_usage(NamespaceId(0)), (1, 2 * crate::BLOCK_SIZE));
        // A second sizing neither adds nor lowers; a use since keeps its count.
        let s4 = idx.find(NamespaceId(1), Kind::Cas, &h(4)).unwrap();
        idx.set_size(s4, 50, 0);
        let small = idx.find(NamespaceId(0), Kind::Cas, &h(1)).unwrap();
        idx.touch(small);
        idx.set_size(small, 2, 1);
        assert_eq!(got(&idx, 1, 0), (100, 2, FRESH_USES));
        assert_eq!(got(&idx, 4, 1).1, 1);
        assert_eq!(idx.size_on_disk, blocks * crate::BLOCK_SIZE);
        // Removal takes back exactly what was added, `big` included.
        for (i, ns) in [(1, 0), (2, 1), (3, 1), (4, 1)] {
            let s = idx.find(NamespaceId(ns), Kind::Cas, &h(i)).unwrap();
            idx.remove(s);
        }
        assert_eq!((idx.size_on_disk, idx.big.len()), (0, 0));
        assert_eq!(idx.unsized_logical_bytes, 0);
    }

    #[test]
    fn the_hand_passes_over_entries_without_a_size_while_told_to() {
        let mut idx = Index::with_capacity(0);
        for i in 0..8 {
            idx.insert(unsized_entry(i, 0, 10), None, true);
        }
        idx.insert(e(100, 0), None, true);
        let mut budget = 1000;
        let v = idx.next_victim(&mut budget, true).unwrap();
        assert_eq!(key_of(&idx, v).0, 100, "the only sized entry");
        idx.remove(v);
        let mut budget = 1000;
        assert_eq!(idx.next_victim(&mut budget, true), None);
        for i in 0..8 {
            let s = idx.find(NamespaceId(0), Kind::Cas, &h(i)).unwrap();
            assert_eq!(idx.entry(s).uses(), 0, "passed over, not aged");
        }
        let mut budget = 1000;
        assert!(idx.next_victim(&mut budget, false).is_some());
    }

    #[test]
    fn entry_fields_round_trip_inline_and_big() {
        let mut idx = Index::with_capacity(0);
        let small = Entry::new(
            NamespaceId(2047),
            Kind::Raw,
            h(7),
            Format::RawV1,
            u32::MAX as u64,
            MAX_INLINE_BLOCKS,
            999_999_999,
            false,
        );
        let big = Entry::new(
            NamespaceId(3),
            Kind::Cas,
            h(8),
            Format::Casblob,
            MAX_LOGICAL,
            MAX_INLINE_BLOCKS + 1,
            5,
            true,
        );
        let s = idx.insert(small, None, false);
        assert_eq!(idx.odd_suffix(s), None);
        idx.insert(big, Some("abcXYZ".into()), true);
        let s = idx.find(NamespaceId(2047), Kind::Raw, &h(7)).unwrap();
        let x = idx.entry(s);
        assert_eq!(x.ns(), NamespaceId(2047));
        assert_eq!(x.kind(), Kind::Raw);
        assert_eq!(x.format(), Format::RawV1);
        assert_eq!(x.logical(), u32::MAX as u64);
        assert_eq!(x.blocks, MAX_INLINE_BLOCKS);
        assert_eq!(x.suffix, 999_999_999);
        assert!(x.uses() == FRESH_USES && !x.odd_suffix() && !x.uploaded());
        let s = idx.find(NamespaceId(3), Kind::Cas, &h(8)).unwrap();
        idx.set_uploaded(s);
        let x = idx.entry(s);
        assert_eq!(x.logical(), MAX_LOGICAL);
        assert_eq!(x.blocks, MAX_INLINE_BLOCKS + 1);
        assert!(x.odd_suffix() && x.uploaded() && x.uses() == 0);
        assert_eq!(idx.odd_suffix(s), Some("abcXYZ"));
        let (gone, odd) = idx.remove(s);
        assert_eq!(gone.blocks, MAX_INLINE_BLOCKS + 1);
        assert_eq!(odd.as_deref(), Some("abcXYZ"));
        assert!(idx.big.is_empty() && idx.odd_suffixes.is_empty());
        assert_eq!(
            idx.size_on_disk,
            MAX_INLINE_BLOCKS as u64 * crate::BLOCK_SIZE
        );
    }

    #[test]
    fn insert_find_remove_and_sums_agree_with_a_model_through_growth() {
        let mut idx = Index::with_capacity(0);
        let mut model: Map<(u32, u16), ()> = Map::new();
        let mut rng = Rng(12345);
        for step in 0..60_000 {
            let k = (rng.next() % 20_000) as u32;
            let ns = (rng.next() % 2) as u16;
            let found = idx.find(NamespaceId(ns), Kind::Cas, &h(k));
            assert_eq!(found.is_some(), model.contains_key(&(k, ns)), "step {step}");
            match (rng.next() % 3, found) {
                (0, Some(s)) => {
                    let (gone, _) = idx.remove(s);
                    assert_eq!(gone.logical(), k as u64 * 10);
                    model.remove(&(k, ns));
                }
                (1, Some(s)) => idx.touch(s),
                (_, None) => {
                    let s = idx.insert(e(k, ns), None, false);
                    assert_eq!(key_of(&idx, s), (k, ns));
                    model.insert((k, ns), ());
                }
                _ => {}
            }
            if step % 20_000 == 0 {
                idx.compact();
            }
        }
        assert_eq!(idx.len(), model.len());
        assert_eq!(idx.occupied_slots().count(), model.len());
        for &(k, ns) in model.keys() {
            let s = idx.find(NamespaceId(ns), Kind::Cas, &h(k)).unwrap();
            assert_eq!(idx.entry(s).logical(), k as u64 * 10);
        }
        assert_eq!(idx.size_on_disk, model.len() as u64 * crate::BLOCK_SIZE);
        let per_ns: u64 = (0..2).map(|n| idx.ns_usage(NamespaceId(n)).0).sum();
        assert_eq!(per_ns, model.len() as u64);
    }

    #[test]
    fn odd_suffixes_and_big_sizes_follow_records_that_move() {
        let mut idx = Index::with_capacity(0);
        for i in 0..50_000u32 {
            let mut en = e(i, 0);
            if i % 7 == 0 {
                en = Entry::new(
                    NamespaceId(0),
                    Kind::Cas,
                    h(i),
                    Format::Casblob,
                    (1 << 40) + i as u64,
                    1 << 20,
                    0,
                    true,
                );
            }
            let odd = (i % 7 == 0).then(|| format!("x{i}").into_boxed_str());
            idx.insert(en, odd, true);
        }
        idx.compact();
        for i in 0..50_000u32 {
            let s = idx.find(NamespaceId(0), Kind::Cas, &h(i)).unwrap();
            if i % 7 == 0 {
                assert_eq!(idx.odd_suffix(s), Some(format!("x{i}").as_str()));
                assert_eq!(idx.entry(s).logical(), (1 << 40) + i as u64);
                assert_eq!(idx.entry(s).blocks, 1 << 20);
            } else {
                assert_eq!(idx.odd_suffix(s), None);
                assert_eq!(idx.entry(s).logical(), i as u64 * 10);
            }
        }
    }

    #[test]
    fn a_million_entries_cost_at_most_48_bytes_each() {
        let n = 1_000_000;
        let mut idx = Index::with_capacity(n);
        for i in 0..n as u32 {
            idx.insert(e(i, 0), None, true);
        }
        idx.compact();
        assert_eq!(idx.len(), n);
        let per = idx.heap_bytes() as f64 / n as f64;
        assert!(per <= 48.0, "{per} bytes per entry");
    }

    #[test]
    fn the_hand_takes_the_least_recently_used_of_four_ages_first() {
        let mut idx = Index::with_capacity(0);
        for i in 0..4 {
            idx.insert(e(i, 0), None, true);
        }
        // Counts 0 (key 0, never used), then 1, 2, 3: keys 1, 2 and 3 used
        // two passes, one pass and no pass ago.
        let mut budget = usize::MAX;
        for k in 1..4 {
            let s = idx.find(NamespaceId(0), Kind::Cas, &h(k)).unwrap();
            idx.touch(s);
            if k < 3 {
                for slot in 0..idx.slot_count() as u32 {
                    if idx.occupied(slot).is_some() {
                        idx.second_chance(slot);
                    }
                }
            }
        }
        let counts: Vec<u8> = (0..4)
            .map(|k| {
                let s = idx.find(NamespaceId(0), Kind::Cas, &h(k)).unwrap();
                idx.entry(s).uses()
            })
            .collect();
        assert_eq!(counts, [0, 1, 2, 3]);
        let mut order = Vec::new();
        while let Some(s) = idx.next_victim(&mut budget, false) {
            order.push(key_of(&idx, s).0);
            idx.remove(s);
        }
        assert_eq!(order, [0, 1, 2, 3]);
        let mut none = 0;
        idx.insert(e(9, 0), None, false);
        assert_eq!(
            idx.next_victim(&mut none, false),
            None,
            "no budget, no victim"
        );
    }

    /// Replays a trace through an index of a fixed byte budget (evicting
    /// by the clock hand) and returns the hits.
    fn clock_hits(trace: &[u32], capacity: usize, touch_on_hit: bool) -> usize {
        let mut idx = Index::with_capacity(0);
        let mut hits = 0;
        for &k in trace {
            match idx.find(NamespaceId(0), Kind::Cas, &h(k)) {
                Some(s) => {
                    hits += 1;
                    if touch_on_hit {
                        idx.touch(s);
                    }
                }
                None => {
                    idx.insert(e(k, 0), None, false);
                    while idx.len() > capacity {
                        let mut budget = usize::MAX;
                        let v = idx.next_victim(&mut budget, false).unwrap();
                        idx.remove(v);
                    }
                }
            }
        }
        hits
    }

    fn lru_hits(trace: &[u32], capacity: usize) -> usize {
        let mut last: Map<u32, u64> = Map::new();
        let mut by_time: BTreeMap<u64, u32> = BTreeMap::new();
        let mut hits = 0;
        for (t, &k) in trace.iter().enumerate() {
            let t = t as u64;
            if let Some(old) = last.insert(k, t) {
                hits += 1;
                by_time.remove(&old);
            }
            by_time.insert(t, k);
            while last.len() > capacity {
                let (_, v) = by_time.pop_first().unwrap();
                last.remove(&v);
            }
        }
        hits
    }

    /// A build-cache-like trace: a skewed (Zipf-like) popularity over a
    /// key space ten times the cache, with a working set that drifts, and
    /// one-off keys mixed in (fresh outputs read once).
    fn trace(len: usize, keys: u32, seed: u64) -> Vec<u32> {
        let mut rng = Rng(seed);
        let mut out = Vec::with_capacity(len);
        for t in 0..len {
            let r = rng.next();
            if r.is_multiple_of(10) {
                out.push(1_000_000 + t as u32);
                continue;
            }
            // rank = u³ × keys: small ranks are far more likely.
            let u = (r >> 11) as f64 / (1u64 << 53) as f64;
            let rank = (u * u * u * keys as f64) as u32;
            let drift = (t / (len / 8)) as u32 * (keys / 16);
            out.push((rank + drift) % keys);
        }
        out
    }

    /// CI builds: each writes its outputs (first access: a miss, then
    /// stored) and reads, besides a skewed set of shared inputs, the
    /// outputs of the build two before it.
    fn build_trace(builds: u32, outputs: u32, seed: u64) -> Vec<u32> {
        let mut rng = Rng(seed);
        let mut out = Vec::new();
        for b in 0..builds {
            for _ in 0..outputs / 2 {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                out.push((u * u * u * 20_000.0) as u32);
            }
            if b >= 2 {
                for i in 0..outputs {
                    out.push(1_000_000 + (b - 2) * outputs + i);
                }
            }
            for i in 0..outputs {
                out.push(1_000_000 + b * outputs + i);
            }
        }
        out
    }

    /// DESIGN asks for a clock approximation measured to be as good as
    /// LRU. Against an exact LRU of the same size: on skewed traces (three
    /// seeds, two sizes) CLOCK keeps at least 99% of LRU's hits, on CI
    /// builds (three sizes, the smallest one too small for either) at
    /// least 98%. FIFO (the same index never told of a hit) is the control
    /// that the skewed traces tell orders apart.
    #[test]
    fn clock_eviction_hits_as_often_as_exact_lru() {
        let ratio = |hits: usize, t: &[u32]| hits as f64 / t.len() as f64;
        for seed in [1u64, 2, 3] {
            let t = trace(200_000, 20_000, seed);
            for cap in [1_000, 4_000] {
                let lru = lru_hits(&t, cap);
                let clock = clock_hits(&t, cap, true);
                let fifo = clock_hits(&t, cap, false);
                println!(
                    "skewed, seed {seed}, {cap} entries: hit ratio LRU {:.4}, CLOCK {:.4}, FIFO {:.4}",
                    ratio(lru, &t),
                    ratio(clock, &t),
                    ratio(fifo, &t)
                );
                assert!(clock * 100 >= lru * 99, "CLOCK {clock} vs LRU {lru}");
                assert!(
                    fifo * 100 < lru * 97,
                    "the trace does not tell FIFO {fifo} from LRU {lru}"
                );
            }
        }
        let t = build_trace(200, 500, 9);
        for cap in [1_500, 2_500, 4_000] {
            let lru = lru_hits(&t, cap);
            let clock = clock_hits(&t, cap, true);
            println!(
                "CI builds, {cap} entries: hit ratio LRU {:.4}, CLOCK {:.4}",
                ratio(lru, &t),
                ratio(clock, &t)
            );
            assert!(clock * 100 >= lru * 98, "CLOCK {clock} vs LRU {lru}");
        }
    }
}
