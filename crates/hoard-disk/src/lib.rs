//! hoard-disk: the local tier of hoard, a size-bounded cache of content-addressed
//! blobs in bazel-remote's directory layout.
//!
//! What it owns: files under the cache directory, the in-memory index of them,
//! eviction, and the casblob format. What it must not do: talk to the network
//! or know about S3 or HTTP. It reports each newly committed blob through a
//! [`CommitHook`]; whoever wires the daemon decides what happens next (upload,
//! accounting).
//!
//! # Layout
//!
//! ```text
//! <dir>/{ac.v2,cas.v2,raw.v2}/<hh>/<file>     default namespace (bazel-remote's)
//! <dir>/ns.v1/<name>/{ac.v2,cas.v2,raw.v2}/<hh>/<file>
//! ```
//!
//! File names are bazel-remote's: `<hash>-<size>-<suffix>` for casblobs (the
//! logical size is in the name so that startup never opens a file),
//! `<hash>-<suffix>.v1` for uncompressed CAS files, `<hash>-<suffix>` for AC.
//!
//! # Crash safety
//!
//! * A blob is written to `<hash>-<random>-<token>.tmp` in its final directory, while
//!   being hashed and compressed, then (if `fsync` is on) `fsync`ed, then
//!   renamed to its final name. A final name therefore only ever names
//!   complete, verified content; a crash leaves at most `.tmp` files, which
//!   are deleted at the next start (never those of the running process:
//!   `<token>` is this process's).
//! * The directory is not `fsync`ed after the rename: a crash may forget a
//!   blob committed just before it, which is a cache miss, never a corrupt hit.
//! * Reads check every casblob header against the file length and every
//!   chunk's decompressed length (and zstd checksum); a file failing a check
//!   is dropped from the index and deleted, and the read answers a miss.
//! * An evicted file is unlinked only after it left the index. A reader that
//!   opened it before keeps a valid descriptor (POSIX unlink semantics), so a
//!   blob is never deleted under a reader; a reader that comes later misses.
//!
//! Filesystem assumptions: `rename` within a directory is atomic; `unlink` of
//! an open file leaves the open descriptor readable.
//!
//! # Locking
//!
//! One mutex guards the index, and no I/O is done while holding it. The
//! namespace registry has its own lock, taken after the index lock when both
//! are needed and never the other way round. The load-state lock (`parts`)
//! is taken before the index lock, never after it.

pub mod casblob;
mod error;
mod index;
mod key;
mod load;
mod read;
mod snapshot;
pub mod turns;
mod write;

pub use error::Error;
pub use key::{
    EMPTY_SHA256, Hash, HashError, Kind, NamespaceError, NamespaceId, RESERVED_WORDS,
    validate_namespace,
};
pub use load::LoadReport;
pub use read::Blob;
pub use write::{WriteOutcome, Writer};

use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Condvar, Mutex, RwLock};

use index::{Format, Index};

/// Lowers the calling thread's CPU priority (nice 10), once per thread.
///
/// Bulk work (hashing, compressing and decompressing large blobs, and the
/// socket copies of large transfers) runs on threads that call this first,
/// so that on a saturated host it yields the CPU to the threads answering
/// small requests: a client streaming 64 MiB must not add its hashing to
/// everyone's latency. Linux keeps the nice value per thread. Failing to
/// lower it costs fairness, never correctness, so the result is ignored.
pub fn lower_thread_priority() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|l| {
        if !l.get() {
            // No pid: the calling thread, on Linux.
            let _ = rustix::process::setpriority_process(None, BULK_NICE);
            l.set(true);
        }
    });
}

/// Makes the calling thread work for a transfer of `bytes` bytes until the
/// guard drops: its priority is lowered, and if the transfer is bulk
/// ([`turns::MIN_TRANSFER`]) its large hashing, compressing and
/// decompressing steps take turns with every other bulk transfer's
/// ([`turns`]). For threads that may block, never for an async runtime's
/// workers.
pub fn bulk_work(bytes: u64) -> turns::BulkWork {
    lower_thread_priority();
    turns::enter(bytes)
}

/// The nice value of bulk-work threads (see [`lower_thread_priority`]).
const BULK_NICE: i32 = 10;

/// Sizes are counted in blocks of this many bytes, like bazel-remote does.
pub const BLOCK_SIZE: u64 = 4096;

pub(crate) fn round_up_block(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// How CAS blobs are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageMode {
    /// casblob files: 1 MiB chunks, each an independent zstd frame.
    Zstd,
    /// Raw bytes in `.v1` files.
    Uncompressed,
}

/// Settings of a [`DiskCache`].
#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    /// Evict blobs (in clock order, see `index.rs`) while SizeOnDisk exceeds this.
    pub max_size_bytes: u64,
    /// Refuse writes (with [`Error::HardLimit`]) that would take SizeOnDisk
    /// plus in-flight reservations plus pending deletions above this.
    pub hard_limit_bytes: Option<u64>,
    pub storage_mode: StorageMode,
    /// `fsync` each blob before it becomes visible.
    pub fsync: bool,
    /// Upper bound on the number of namespaces (at most 2048).
    pub max_namespaces: usize,
    /// Per-namespace size limits (SizeOnDisk): a namespace over its quota
    /// evicts its own entries, those used longest ago first, never another's.
    pub quotas: Quotas,
    /// Fault injection for tests: the background load sleeps this long
    /// after each directory it indexes, so that requests meet a partial
    /// index. `None` in production.
    pub load_pause: Option<std::time::Duration>,
    /// Fault injection for tests: the sizing pass after the load (see
    /// `load.rs`) sleeps this long before each directory it sizes, so that
    /// requests meet a ready cache whose sizes are not all known. `None`
    /// in production.
    pub sizing_pause: Option<std::time::Duration>,
}

/// Per-namespace size limits, in bytes of SizeOnDisk.
#[derive(Clone, Debug, Default)]
pub struct Quotas {
    /// For every namespace not named in `by_name`; None: no quota.
    pub default: Option<u64>,
    pub by_name: HashMap<String, u64>,
}

impl Quotas {
    /// The quota of the namespace called `name`, if it has one.
    pub fn of(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied().or(self.default)
    }

    /// No namespace has a quota: the common case, which costs writes and
    /// the evictor nothing.
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.by_name.is_empty()
    }
}

/// One namespace's figures, for `/status` and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceStats {
    pub name: String,
    pub entries: u64,
    pub size_on_disk: u64,
    pub quota: Option<u64>,
    /// SizeOnDisk evicted from this namespace since start, by the global
    /// limit or its own quota.
    pub evicted_bytes_total: u64,
}

/// A blob that was newly committed to disk; given to the [`CommitHook`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub namespace: NamespaceId,
    pub kind: Kind,
    pub hash: Hash,
    pub logical_size: u64,
    /// Stored bytes rounded up to 4 KiB: the unit of the size limit only.
    pub size_on_disk: u64,
    /// The stored file's exact length: what an upload sends, what the
    /// bucket holds, and the unit of billing.
    pub stored_bytes: u64,
    /// The blob came from the backend (a read-through), not from a client.
    pub from_backend: bool,
    /// False for a write that found the blob already stored (nothing new
    /// was written): the hook may still want to upload a blob whose upload
    /// never succeeded.
    pub new: bool,
}

/// Called for each committed blob after it is visible to readers: once for
/// each newly stored blob, and for each write that found it already stored
/// (`new: false`).
pub type CommitHook = Box<dyn Fn(&Committed) + Send + Sync>;

/// Point-in-time figures for `/status` and metrics.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub entries: u64,
    pub size_on_disk: u64,
    pub logical_bytes: u64,
    pub reserved: u64,
    pub pending_deletion: u64,
    pub max_size: u64,
    pub hard_limit: Option<u64>,
    pub evicted_bytes_total: u64,
    pub corrupt_dropped_total: u64,
    pub index_heap_bytes: u64,
    pub loaded: bool,
    pub load_fraction: f64,
    /// Every entry's stored size is known (see `load.rs`): until then
    /// `size_on_disk` and the namespaces' usage count only the files sized
    /// so far.
    pub sizes_known: bool,
}

/// The disk cache. Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct DiskCache {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub cfg: Config,
    pub state: Mutex<State>,
    pub evict_cv: Condvar,
    pub namespaces: RwLock<Namespaces>,
    pub loaded: AtomicBool,
    /// Set once the load has sized every file it indexed from its name
    /// alone (see `load.rs`); until then the evictor passes over entries
    /// without a size.
    pub sized: AtomicBool,
    pub dirs_total: AtomicU64,
    pub dirs_done: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub corrupt_dropped: AtomicU64,
    pub hook: OnceLock<CommitHook>,
    /// Which directories are indexed while the load runs (see `load.rs`).
    pub parts: Mutex<load::Parts>,
    pub parts_cv: Condvar,
    /// Marks this process's temp files (`<hash>-<n>-<token>.tmp`), which the
    /// load never reaps.
    pub token: u32,
    random: std::hash::RandomState,
    counter: AtomicU64,
    evictor: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: File,
}

impl Shared {
    /// Whether some entries still lack the stored size the load's second
    /// pass reads (see `load.rs`).
    pub(crate) fn sizing(&self) -> bool {
        !self.sized.load(Ordering::Acquire)
    }
}

pub(crate) struct State {
    pub index: Index,
    pub reserved: u64,
    /// Bytes of files that left the index but are not yet unlinked.
    pub pending_deletion: u64,
    /// Files to unlink, with their SizeOnDisk.
    pub doomed: Vec<(PathBuf, u64)>,
    pub stop: bool,
    /// Which files a listing finds start as used (see `load.rs`).
    pub atime_split: load::AtimeSplit,
    /// SizeOnDisk evicted per namespace id since start.
    pub ns_evicted: Vec<u64>,
    /// The slot the next quota walk starts at (see `evict_over_quota`).
    pub quota_hand: usize,
    /// Parts with writes in flight (temp files, renames not yet indexed),
    /// by namespace and part: how many.
    pub active_parts: HashMap<(NamespaceId, usize), u32>,
}

impl State {
    pub(crate) fn leave_part(&mut self, ns: NamespaceId, part: usize) {
        if let Some(n) = self.active_parts.get_mut(&(ns, part)) {
            *n -= 1;
            if *n == 0 {
                self.active_parts.remove(&(ns, part));
            }
        }
    }
}

pub(crate) struct Namespaces {
    pub names: Vec<String>,
    pub roots: Vec<Arc<Path>>,
    pub by_name: HashMap<String, NamespaceId>,
    /// Per namespace id: its quota in bytes (`u64::MAX`: none).
    pub quotas: Vec<u64>,
}

impl Namespaces {
    pub(crate) fn quota(&self, ns: NamespaceId) -> u64 {
        self.quotas.get(ns.index()).copied().unwrap_or(u64::MAX)
    }
}

/// Where an entry's file is, copied out of the index so the path can be
/// built without holding the lock.
#[derive(Clone, Debug)]
pub(crate) struct Location {
    pub ns: NamespaceId,
    pub kind: Kind,
    pub hash: Hash,
    pub format: Format,
    pub logical: u64,
    pub suffix: Suffix,
    pub size_on_disk: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Suffix {
    Num(u32),
    Odd(Box<str>),
}

impl Location {
    pub(crate) fn of(index: &Index, slot: u32) -> Location {
        let e = index.entry(slot);
        Location {
            ns: e.ns(),
            kind: e.kind(),
            hash: Hash(e.hash),
            format: e.format(),
            logical: e.logical(),
            suffix: match index.odd_suffix(slot) {
                Some(s) if e.odd_suffix() => Suffix::Odd(s.into()),
                _ => Suffix::Num(e.suffix),
            },
            size_on_disk: e.size_on_disk(),
        }
    }

    fn same_file(&self, index: &Index, slot: u32) -> bool {
        let e = index.entry(slot);
        let cur = match index.odd_suffix(slot) {
            Some(s) if e.odd_suffix() => Suffix::Odd(s.into()),
            _ => Suffix::Num(e.suffix),
        };
        cur == self.suffix && e.format() == self.format
    }

    pub(crate) fn file_name(&self) -> String {
        let suffix = match &self.suffix {
            Suffix::Num(n) => format!("{n:09}"),
            Suffix::Odd(s) => s.to_string(),
        };
        match self.format {
            Format::Casblob if self.logical > 0 => {
                format!("{}-{}-{}", self.hash, self.logical, suffix)
            }
            Format::Casblob | Format::Plain => format!("{}-{}", self.hash, suffix),
            Format::RawV1 => format!("{}-{}.v1", self.hash, suffix),
        }
    }
}

const SUBDIRS: usize = 256;
const NS_DIR: &str = "ns.v1";
const LOCK_FILE: &str = ".hoard.lock";

impl DiskCache {
    /// Opens (creating if needed) the cache directory and starts the
    /// eviction thread. The index starts empty: call [`DiskCache::load`]
    /// (typically on a background thread) to index the files already there.
    /// Requests may be served meanwhile: a lookup in a directory the load
    /// has not reached indexes that directory first, so it never answers
    /// "absent" for a file on disk.
    pub fn open(cfg: Config) -> Result<DiskCache, Error> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        fs::create_dir_all(&cfg.dir).map_err(io(&cfg.dir))?;
        let dir = fs::canonicalize(&cfg.dir).map_err(io(&cfg.dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(Error::Locked { dir });
        }
        create_layout(&dir)?;
        let mut cfg = cfg;
        cfg.dir = dir.clone();
        cfg.max_namespaces = cfg.max_namespaces.clamp(1, index::MAX_NAMESPACES);
        let namespaces = Namespaces {
            names: vec![String::new()],
            roots: vec![Arc::from(dir.as_path())],
            by_name: HashMap::from([(String::new(), NamespaceId::DEFAULT)]),
            quotas: vec![cfg.quotas.of("").unwrap_or(u64::MAX)],
        };
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(State {
                index: Index::with_capacity(0),
                reserved: 0,
                pending_deletion: 0,
                doomed: Vec::new(),
                stop: false,
                ns_evicted: Vec::new(),
                quota_hand: 0,
                atime_split: load::AtimeSplit::default(),
                active_parts: HashMap::new(),
            }),
            evict_cv: Condvar::new(),
            namespaces: RwLock::new(namespaces),
            loaded: AtomicBool::new(false),
            sized: AtomicBool::new(false),
            dirs_total: AtomicU64::new(0),
            dirs_done: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            corrupt_dropped: AtomicU64::new(0),
            hook: OnceLock::new(),
            parts: Mutex::new(load::Parts::default()),
            parts_cv: Condvar::new(),
            token: std::hash::RandomState::new().hash_one(std::process::id()) as u32,
            random: std::hash::RandomState::new(),
            counter: AtomicU64::new(0),
            evictor: Mutex::new(None),
            _lock: lock,
        });
        let evictor = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("hoard-evictor".into())
            .spawn(move || evict_loop(&evictor))
            .map_err(io(&dir))?;
        *shared.evictor.lock() = Some(handle);
        Ok(DiskCache { shared })
    }

    /// The canonical cache directory.
    pub fn dir(&self) -> &Path {
        &self.shared.cfg.dir
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// Installs the hook called for each newly committed blob. Only the
    /// first call has an effect.
    pub fn set_commit_hook(&self, hook: CommitHook) {
        let _ = self.shared.hook.set(hook);
    }

    /// True once [`DiskCache::load`] has indexed every file found at start.
    pub fn is_loaded(&self) -> bool {
        self.shared.loaded.load(Ordering::Acquire)
    }

    /// True once [`DiskCache::load`] knows the stored size of every file
    /// it indexed (some after [`DiskCache::is_loaded`]; see `load.rs`).
    pub fn sizes_known(&self) -> bool {
        !self.shared.sizing()
    }

    /// Resolves a namespace name, creating its directories on first use.
    /// The empty name is the default namespace. Only writes should call
    /// this: a namespace costs a directory tree and a slot of
    /// `namespaces.max` for good (see [`DiskCache::find_namespace`]).
    pub fn namespace(&self, name: &str) -> Result<NamespaceId, Error> {
        if let Some(id) = self.find_namespace(name) {
            return Ok(id);
        }
        validate_namespace(name)?;
        let max = self.shared.cfg.max_namespaces;
        if self.shared.namespaces.read().names.len() >= max {
            return Err(NamespaceError::TooMany(name.into(), max).into());
        }
        // The directories are made before the lock is taken (mkdir is
        // idempotent, so a racing creator only repeats it): no lookup or
        // eviction waits on the file system for a new tenant.
        let root = self
            .shared
            .cfg
            .dir
            .join(NS_DIR)
            .join(key::namespace_dir_name(name));
        create_layout(&root)?;
        let mut ns = self.shared.namespaces.write();
        if let Some(id) = ns.by_name.get(name) {
            return Ok(*id);
        }
        if ns.names.len() >= max {
            return Err(NamespaceError::TooMany(name.into(), max).into());
        }
        let quota = self.shared.cfg.quotas.of(name);
        Ok(register(&mut ns, name, root, quota))
    }

    /// A namespace that exists already; None for one never written to.
    /// Creates nothing, so reads of made-up names cost nothing.
    pub fn find_namespace(&self, name: &str) -> Option<NamespaceId> {
        if name.is_empty() {
            return Some(NamespaceId::DEFAULT);
        }
        self.shared.namespaces.read().by_name.get(name).copied()
    }

    /// The name of a namespace id handed out by this cache.
    pub fn namespace_name(&self, id: NamespaceId) -> String {
        self.shared
            .namespaces
            .read()
            .names
            .get(id.index())
            .cloned()
            .unwrap_or_default()
    }

    /// Every namespace known so far.
    pub fn namespaces(&self) -> Vec<String> {
        self.shared.namespaces.read().names.clone()
    }

    /// The logical size of a blob if it is in the cache, marking it used.
    pub fn contains(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> Option<u64> {
        self.ensure_loaded(ns, kind, hash);
        let mut st = self.shared.state.lock();
        let slot = st.index.find(ns, kind, hash)?;
        st.index.touch(slot);
        Some(st.index.entry(slot).logical())
    }

    /// [`DiskCache::contains`] for many keys of one namespace and kind, in
    /// one pass under the index lock: each answer is the logical size, if
    /// present. Found entries are marked used.
    pub fn contains_many(&self, ns: NamespaceId, kind: Kind, hashes: &[Hash]) -> Vec<Option<u64>> {
        for h in hashes {
            self.ensure_loaded(ns, kind, h);
        }
        let mut st = self.shared.state.lock();
        hashes
            .iter()
            .map(|h| {
                let slot = st.index.find(ns, kind, h)?;
                st.index.touch(slot);
                Some(st.index.entry(slot).logical())
            })
            .collect()
    }

    /// Opens a blob for reading, marking it used. `Ok(None)` is a miss,
    /// including when the file turned out to be missing or corrupt (it is
    /// then dropped from the index).
    pub fn get(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> Result<Option<Blob>, Error> {
        self.ensure_loaded(ns, kind, hash);
        let loc = {
            let mut st = self.shared.state.lock();
            let Some(slot) = st.index.find(ns, kind, hash) else {
                return Ok(None);
            };
            st.index.touch(slot);
            Location::of(&st.index, slot)
        };
        read::open(self.clone(), loc)
    }

    /// Notes that a blob is in the bucket (its upload succeeded, or it was
    /// read from there), so neither a re-PUT nor the backfill sends it again.
    pub fn mark_uploaded(&self, ns: NamespaceId, kind: Kind, hash: &Hash) {
        let mut st = self.shared.state.lock();
        if let Some(slot) = st.index.find(ns, kind, hash) {
            st.index.set_uploaded(slot);
        }
    }

    /// Whether a blob is marked as in the bucket (see [`DiskCache::mark_uploaded`]).
    /// Not persisted: after a restart every blob is unmarked until an upload
    /// or the backfill learns otherwise.
    pub fn is_uploaded(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> bool {
        let st = self.shared.state.lock();
        st.index
            .find(ns, kind, hash)
            .is_some_and(|slot| st.index.entry(slot).uploaded())
    }

    /// Up to `max` blobs of `kind` not marked as in the bucket: what a
    /// backfill should upload. Each call looks at a bounded slice of the
    /// index and the next goes on from there (see `Index::not_uploaded`).
    pub fn not_uploaded(&self, kind: Kind, max: usize) -> Vec<(NamespaceId, Hash)> {
        let mut st = self.shared.state.lock();
        let slots = st.index.not_uploaded(kind, max);
        slots
            .into_iter()
            .map(|slot| {
                let e = st.index.entry(slot);
                (e.ns(), Hash(e.hash))
            })
            .collect()
    }

    /// Removes a blob from the cache (for example an action-cache entry
    /// whose outputs are gone). Returns whether it was present.
    pub fn remove(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> bool {
        self.ensure_loaded(ns, kind, hash);
        let mut st = self.shared.state.lock();
        let Some(slot) = st.index.find(ns, kind, hash) else {
            return false;
        };
        let loc = Location::of(&st.index, slot);
        st.index.remove(slot);
        let path = self.path_of(&loc);
        st.pending_deletion += loc.size_on_disk;
        st.doomed.push((path, loc.size_on_disk));
        self.shared.evict_cv.notify_one();
        true
    }

    /// Starts writing a blob of `logical_size` bytes. For CAS the bytes are
    /// verified against `hash` at commit. If a CAS blob is already present,
    /// the writer only verifies what it is given and stores nothing.
    pub fn writer(
        &self,
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        logical_size: u64,
    ) -> Result<Writer, Error> {
        write::Writer::start(self.clone(), ns, kind, hash, logical_size)
    }

    /// Each namespace's figures.
    pub fn namespace_stats(&self) -> Vec<NamespaceStats> {
        let st = self.shared.state.lock();
        let reg = self.shared.namespaces.read();
        reg.names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = NamespaceId(i as u16);
                let (entries, size_on_disk) = st.index.ns_usage(id);
                NamespaceStats {
                    name: name.clone(),
                    entries,
                    size_on_disk,
                    quota: Some(reg.quota(id)).filter(|q| *q != u64::MAX),
                    evicted_bytes_total: st.ns_evicted.get(i).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    /// Current figures.
    pub fn stats(&self) -> Stats {
        let st = self.shared.state.lock();
        let total = self.shared.dirs_total.load(Ordering::Relaxed);
        let loaded = self.is_loaded();
        Stats {
            entries: st.index.len() as u64,
            size_on_disk: st.index.size_on_disk,
            logical_bytes: st.index.logical_bytes,
            reserved: st.reserved,
            pending_deletion: st.pending_deletion,
            max_size: self.shared.cfg.max_size_bytes,
            hard_limit: self.shared.cfg.hard_limit_bytes,
            evicted_bytes_total: self.shared.evicted_bytes.load(Ordering::Relaxed),
            corrupt_dropped_total: self.shared.corrupt_dropped.load(Ordering::Relaxed),
            index_heap_bytes: st.index.heap_bytes() as u64,
            loaded,
            load_fraction: if loaded {
                1.0
            } else if total == 0 {
                0.0
            } else {
                // On-demand loads of namespaces created since start count
                // too, so clamp.
                (self.shared.dirs_done.load(Ordering::Relaxed) as f64 / total as f64).min(0.999)
            },
            sizes_known: self.sizes_known(),
        }
    }

    /// Stops the eviction thread after it has deleted what is queued,
    /// waiting for it at most `wait`, then writes the index snapshot. Files it did not get to delete are
    /// indexed again at the next start, which is harmless: they are
    /// complete blobs. The directory lock is released when the last clone
    /// of this cache is dropped.
    pub fn shutdown(&self, wait: std::time::Duration) {
        {
            let mut st = self.shared.state.lock();
            st.stop = true;
            self.shared.evict_cv.notify_all();
        }
        let handle = self.shared.evictor.lock().take();
        if let Some(h) = handle {
            let until = std::time::Instant::now() + wait;
            while !h.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!("the evictor did not stop in time; leaving it");
            }
        }
        if let Err(e) = self.save_snapshot() {
            tracing::warn!(error = %e, "cannot write the index snapshot; the next start lists every directory");
        }
    }

    /// Writes the index snapshot the next start loads instead of listing
    /// the directories (see `snapshot.rs` for why that is safe). Only a
    /// whole index is written; returns the entries written, or None when
    /// there was nothing to write.
    pub fn save_snapshot(&self) -> Result<Option<u64>, Error> {
        if !self.is_loaded() {
            tracing::info!("index not fully loaded; no snapshot written");
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let (names, roots) = {
            let reg = self.shared.namespaces.read();
            (reg.names.clone(), reg.roots.clone())
        };
        // Directory times first, the index second: a change after a
        // directory's time was taken makes that time stale, so the part is
        // listed at the next start, whether or not the change made it into
        // the copy below.
        let mut parts = HashMap::new();
        let mut part_of_dir = HashMap::new();
        for (i, root) in roots.iter().enumerate() {
            for kind in Kind::ALL {
                for sub in 0..SUBDIRS {
                    let dir = root.join(kind.dir_name()).join(format!("{sub:02x}"));
                    let part = load::part_index(kind, sub);
                    let t = snapshot::mtime_of(&dir).unwrap_or_else(snapshot::no_time);
                    parts.insert((i as u16, part as u16), t);
                    part_of_dir.insert(dir, (i as u16, part as u16));
                }
            }
        }
        // Parts whose files the load has not sized yet are listed (and
        // sized) at the next start too. Taken before the copy: a part
        // leaves this set only after its sizes are in the index.
        for (ns, part) in self.shared.parts.lock().unsized_parts() {
            parts.insert((ns.0, part as u16), snapshot::no_time());
        }
        let records = {
            let st = self.shared.state.lock();
            // Parts with a write in flight or a deletion not yet done are
            // listed at the next start.
            for (ns, part) in st.active_parts.keys() {
                parts.insert((ns.0, *part as u16), snapshot::no_time());
            }
            for (path, _) in &st.doomed {
                if let Some(k) = path.parent().and_then(|d| part_of_dir.get(d)) {
                    parts.insert(*k, snapshot::no_time());
                }
            }
            st.index
                .occupied_slots()
                .map(|slot| snapshot::Record {
                    entry: st.index.entry(slot),
                    odd: st.index.odd_suffix(slot).map(Into::into),
                })
                .collect::<Vec<_>>()
        };
        let n = records.len() as u64;
        let snap = snapshot::Snapshot {
            namespaces: names,
            parts,
            records,
        };
        snapshot::write(self.dir(), &snap).map_err(|source| Error::Io {
            path: snapshot::path_in(self.dir()),
            source,
        })?;
        tracing::info!(
            entries = n,
            seconds = started.elapsed().as_secs_f64(),
            "index snapshot written"
        );
        Ok(Some(n))
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(crate) fn dir_of(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> PathBuf {
        self.shared.dir_of(ns, kind, hash)
    }

    pub(crate) fn path_of(&self, loc: &Location) -> PathBuf {
        self.shared.path_of(loc)
    }

    /// A fresh 9-digit file-name suffix.
    pub(crate) fn random_suffix(&self) -> u32 {
        let n = self.shared.counter.fetch_add(1, Ordering::Relaxed);
        (self.shared.random.hash_one(n) % 1_000_000_000) as u32
    }

    /// Forgets an entry whose file vanished, if the index still names that
    /// same file.
    pub(crate) fn forget(&self, loc: &Location) {
        let mut st = self.shared.state.lock();
        if let Some(slot) = st.index.find(loc.ns, loc.kind, &loc.hash)
            && loc.same_file(&st.index, slot)
        {
            st.index.remove(slot);
        }
    }

    /// Drops an entry whose file failed a format check, and deletes the file.
    pub(crate) fn discard(&self, loc: &Location, reason: &dyn std::fmt::Display) {
        let path = self.path_of(loc);
        tracing::warn!(path = %path.display(), %reason, "dropping corrupt cache file");
        self.shared.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
        let mut st = self.shared.state.lock();
        if let Some(slot) = st.index.find(loc.ns, loc.kind, &loc.hash)
            && loc.same_file(&st.index, slot)
        {
            st.index.remove(slot);
            st.pending_deletion += loc.size_on_disk;
            st.doomed.push((path, loc.size_on_disk));
            self.shared.evict_cv.notify_one();
        }
    }
}

impl Shared {
    fn root_of(&self, ns: NamespaceId) -> Arc<Path> {
        let n = self.namespaces.read();
        n.roots
            .get(ns.index())
            .cloned()
            .unwrap_or_else(|| Arc::from(self.cfg.dir.as_path()))
    }

    pub(crate) fn dir_of(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> PathBuf {
        let mut p = self.root_of(ns).join(kind.dir_name());
        p.push(&hash.to_hex()[..2]);
        p
    }

    pub(crate) fn path_of(&self, loc: &Location) -> PathBuf {
        self.dir_of(loc.ns, loc.kind, &loc.hash)
            .join(loc.file_name())
    }
}

pub(crate) fn register(
    ns: &mut Namespaces,
    name: &str,
    root: PathBuf,
    quota: Option<u64>,
) -> NamespaceId {
    let id = NamespaceId(ns.names.len() as u16);
    ns.names.push(name.to_string());
    ns.quotas.push(quota.unwrap_or(u64::MAX));
    ns.roots.push(Arc::from(root.as_path()));
    ns.by_name.insert(name.to_string(), id);
    id
}

/// Creates `{ac.v2,cas.v2,raw.v2}/00..ff` under `root`.
fn create_layout(root: &Path) -> Result<(), Error> {
    for kind in Kind::ALL {
        let kdir = root.join(kind.dir_name());
        fs::create_dir_all(&kdir).map_err(|source| Error::Io {
            path: kdir.clone(),
            source,
        })?;
        for i in 0..SUBDIRS {
            let d = kdir.join(format!("{i:02x}"));
            match fs::create_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(Error::Io { path: d, source }),
            }
        }
    }
    Ok(())
}

/// Evicts entries in clock order while over `max_size`, and each
/// namespace's own entries in clock order while it is over its quota;
/// unlinks files that left the index. Runs on its own thread so that no
/// request waits for a deletion.
fn evict_loop(shared: &Shared) {
    loop {
        let batch = {
            let mut st = shared.state.lock();
            loop {
                let over = !st.stop
                    && (st.index.size_on_disk > shared.cfg.max_size_bytes
                        || !over_quota(shared, &st).is_empty());
                if !st.doomed.is_empty() || over {
                    break;
                }
                if st.stop {
                    return;
                }
                shared.evict_cv.wait(&mut st);
            }
            // Once stopping, only what is already doomed is deleted.
            let mut budget = HAND_SWEEP;
            let skip_unsized = shared.sizing();
            while !st.stop
                && st.index.size_on_disk > shared.cfg.max_size_bytes
                && st.doomed.len() < EVICT_BATCH
            {
                let Some(slot) = st.index.next_victim(&mut budget, skip_unsized) else {
                    break;
                };
                evict(shared, &mut st, slot);
            }
            if !st.stop && st.doomed.len() < EVICT_BATCH {
                evict_over_quota(shared, &mut st);
            }
            std::mem::take(&mut st.doomed)
        };
        let mut freed = 0;
        for (path, size) in batch {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not delete cache file")
                }
            }
            freed += size;
        }
        shared.state.lock().pending_deletion -= freed;
    }
}

/// Files unlinked per pass of the evictor (the index lock is released
/// between passes).
const EVICT_BATCH: usize = 512;
/// Slots the clock hand passes in one pass under the index lock before
/// letting go: when nearly every entry was used since the last sweep,
/// finding a victim clears many bits, and other requests wait meanwhile.
const HAND_SWEEP: usize = 64 * 1024;
/// Slots one quota walk visits under the index lock before letting go.
const QUOTA_WALK: usize = 16 * 1024;

/// Takes `slot` out of the index and queues its file for deletion.
fn evict(shared: &Shared, st: &mut State, slot: u32) {
    let loc = Location::of(&st.index, slot);
    st.index.remove(slot);
    let path = shared.path_of(&loc);
    st.pending_deletion += loc.size_on_disk;
    shared
        .evicted_bytes
        .fetch_add(loc.size_on_disk, Ordering::Relaxed);
    let ns = loc.ns.index();
    if st.ns_evicted.len() <= ns {
        st.ns_evicted.resize(ns + 1, 0);
    }
    st.ns_evicted[ns] += loc.size_on_disk;
    st.doomed.push((path, loc.size_on_disk));
}

/// Bytes each namespace over its quota must shed, by namespace id (empty
/// when none is over). Namespaces are few (at most 2048): this is a scan
/// of two small arrays.
fn over_quota(shared: &Shared, st: &State) -> Vec<(NamespaceId, u64)> {
    if shared.cfg.quotas.is_empty() {
        return Vec::new();
    }
    let reg = shared.namespaces.read();
    (0..reg.quotas.len())
        .filter_map(|i| {
            let id = NamespaceId(i as u16);
            let used = st.index.ns_usage(id).1;
            let quota = reg.quota(id);
            (used > quota).then(|| (id, used - quota))
        })
        .collect()
}

/// Evicts entries of namespaces over their quota, in clock order, and
/// nothing of any other namespace.
///
/// The quota walk has a hand of its own (`State::quota_hand`) that sweeps
/// the slots like the global one but looks only at over-quota namespaces'
/// entries: a used one loses its bit and is passed, an unused one is
/// evicted. One walk visits at most `QUOTA_WALK` slots under the lock; the
/// next pass goes on from there, so the namespace stays over its quota and
/// the evictor keeps passing until it is not.
fn evict_over_quota(shared: &Shared, st: &mut State) {
    let over = over_quota(shared, st);
    if over.is_empty() {
        return;
    }
    let mut excess: HashMap<NamespaceId, u64> = over.into_iter().collect();
    // As the clock hand does: no entry without a size while sizing.
    let skip_unsized = shared.sizing();
    let n = st.index.slot_count();
    let mut pos = st.quota_hand % n.max(1);
    for _ in 0..QUOTA_WALK.min(n) {
        if st.doomed.len() >= EVICT_BATCH {
            break;
        }
        let slot = pos as u32;
        pos = if pos + 1 == n { 0 } else { pos + 1 };
        let Some(e) = st.index.occupied(slot) else {
            continue;
        };
        if let Some(left) = excess.get_mut(&e.ns())
            && *left > 0
            && !(skip_unsized && st.index.size_unknown(slot))
            && !st.index.second_chance(slot)
        {
            *left = left.saturating_sub(e.size_on_disk());
            evict(shared, st, slot);
            if excess.values().all(|l| *l == 0) {
                break;
            }
        }
    }
    st.quota_hand = pos;
}
