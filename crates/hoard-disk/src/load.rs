//! Startup: index the files already in the cache directory.
//!
//! Only directory listings and `stat` are used; no blob file is opened (the
//! logical size of a casblob is in its name). Files ending in `.tmp` are
//! writes a crash interrupted and are deleted, except this process's own
//! (they carry its token). Anything else that is not a cache file is logged
//! and left alone: a stray file must never keep the cache from starting.
//!
//! # The load is an explicit state
//!
//! The unit of loading is a *part*: one `<kind dir>/<hh>` directory of one
//! namespace. Each part is `Unloaded`, `Loading` or `Loaded`, and moves
//! forward only. The background load claims parts one by one; a lookup in a
//! part that is not `Loaded` yet ([`DiskCache::ensure_loaded`]) claims and
//! loads it on the spot, or waits for whoever is loading it. So:
//!
//! * a lookup never answers "absent" for a file that was on disk at start;
//! * a part is listed exactly once, before any write to it starts
//!   (`Writer::start` calls `ensure_loaded`), so the load never sees a
//!   file a writer renamed into place but has not indexed yet (the writer
//!   would take it for a duplicate), nor a temp file of a write in flight;
//! * [`DiskCache::is_loaded`] turns true only after every part is `Loaded`,
//!   which is when callers that act on absence (completeness removal,
//!   upload replay) may start.
//!
//! # Sizes come second
//!
//! A casblob's name holds its logical size, so listing a directory is
//! enough to index it: the entry is complete for every lookup and read.
//! What only `stat` gives is the file's stored size (the unit of the size
//! limit) and its access time (its clock count). With the page cache cold,
//! `stat` is most of the start: on a million files here, listing took
//! 1.5 s and listing with `stat` 6.8 s, both cores busy in the kernel
//! building inodes. So the listing indexes casblobs with no stored size
//! and a clock count of zero, and once every part is loaded (the cache is
//! ready) a second pass lists the parts again and sizes them. Other files
//! (action results, `.v1` blobs) have no size in their name and are sized
//! by the listing itself. Until the second pass is done:
//!
//! * the size limit and quotas count only the sized files, and the
//!   evictor passes over entries without a size. Unknown is not small:
//!   evicting one would free bytes the limit never counted, so the evictor
//!   would go on deleting without getting under it. The cache may stand
//!   over its limit by what the sizing has not reached, for the seconds
//!   it takes, and is evicted down once the sizes are in;
//! * the hard limit counts each entry without a size at its logical size,
//!   so that an undercount never lets the disk fill;
//! * an index snapshot written meanwhile marks the parts not sized yet as
//!   changed, so the next start lists and sizes them rather than trusting
//!   the missing sizes;
//! * [`DiskCache::sizes_known`] is false.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::index::{Entry, Format};
use crate::key::{self, Hash};
use crate::{DiskCache, Kind, Location, NS_DIR, NamespaceId, SUBDIRS, Suffix, register};

/// What [`DiskCache::load`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub entries: u64,
    /// Entries taken from the index snapshot (see `snapshot.rs`), and the
    /// parts (directories) it covered, which were not listed.
    pub from_snapshot: u64,
    pub parts_from_snapshot: u64,
    pub size_on_disk: u64,
    pub temp_files_removed: u64,
    pub foreign_files: u64,
    pub duplicates_removed: u64,
    /// Files indexed from their names alone and sized after the cache was
    /// ready (see the module doc).
    pub sizes_deferred: u64,
    /// From the start of the load to ready: every file indexed.
    pub ready_after: Duration,
    /// The whole load, sizing included.
    pub elapsed: Duration,
}

impl LoadReport {
    fn add(&mut self, o: &LoadReport) {
        self.sizes_deferred += o.sizes_deferred;
        self.temp_files_removed += o.temp_files_removed;
        self.foreign_files += o.foreign_files;
        self.duplicates_removed += o.duplicates_removed;
    }
}

/// Load state of one part (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Unloaded,
    Loading,
    Loaded,
}

const PARTS_PER_NS: usize = 3 * SUBDIRS;

/// Per namespace, the state of each of its parts; namespaces not listed yet
/// are all `Unloaded`.
#[derive(Default)]
pub(crate) struct Parts {
    by_ns: Vec<Vec<Part>>,
    loading: usize,
    /// Loaded parts with files indexed from their names alone, which the
    /// second pass has not sized yet.
    to_size: std::collections::BTreeSet<(NamespaceId, usize)>,
}

impl Parts {
    /// The parts whose files are not all sized yet.
    pub(crate) fn unsized_parts(&self) -> Vec<(NamespaceId, usize)> {
        self.to_size.iter().copied().collect()
    }

    fn state(&mut self, ns: NamespaceId, part: usize) -> &mut Part {
        let n = ns.index();
        if self.by_ns.len() <= n {
            self.by_ns.resize_with(n + 1, Vec::new);
        }
        let v = &mut self.by_ns[n];
        if v.is_empty() {
            v.resize(PARTS_PER_NS, Part::Unloaded);
        }
        &mut v[part]
    }
}

pub(crate) fn part_index(kind: Kind, subdir: usize) -> usize {
    let k = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    k * SUBDIRS + subdir
}

struct Found {
    entry: Entry,
    odd: Option<Box<str>>,
    /// None for a file indexed from its name alone, sized later.
    atime: Option<u32>,
}

/// Gives the files a listing finds clock counts by access time: the most
/// recently accessed quarter starts at three, the next at two, and so on,
/// so that after a crash the clock hand takes the files used longest ago
/// first.
///
/// The quartiles are those of a sample: the first [`SAMPLE`] access times
/// seen. Parts are listed in parallel and each holds keys spread evenly
/// over the hash space, so the first few parts are a fair sample of all of
/// them. Keeping a rank per entry until the end instead would cost four
/// bytes per entry at the moment memory is tightest.
///
/// [`SAMPLE`]: AtimeSplit::SAMPLE
#[derive(Default)]
pub(crate) struct AtimeSplit {
    sample: Vec<u32>,
    quartiles: [u32; 3],
}

impl AtimeSplit {
    const SAMPLE: usize = 4096;

    /// Adds access times to the sample while it is not full.
    fn observe(&mut self, atimes: impl Iterator<Item = u32>) {
        if self.sample.len() >= Self::SAMPLE {
            return;
        }
        self.sample
            .extend(atimes.take(Self::SAMPLE - self.sample.len()));
        let mut sorted = self.sample.clone();
        sorted.sort_unstable();
        let at = |q: usize| sorted.get(sorted.len() * q / 4).copied().unwrap_or(0);
        self.quartiles = [at(1), at(2), at(3)];
    }

    /// The clock count of a file last accessed at `atime`.
    fn uses(&self, atime: u32) -> u8 {
        self.quartiles.iter().filter(|&&q| atime >= q).count() as u8
    }
}

const ROOT_NAMES: &[&str] = &[
    "ac.v2",
    "cas.v2",
    "raw.v2",
    NS_DIR,
    crate::LOCK_FILE,
    "upload.journal",
    "upload.journal.tmp",
    crate::snapshot::FILE,
    crate::snapshot::TMP_FILE,
    "accounting.spool",
    "lost+found",
    ".DS_Store",
];

/// One part to load: namespace, kind, subdirectory number, path.
type Work = (NamespaceId, Kind, usize, PathBuf);

impl DiskCache {
    /// Indexes every cache file under the directory. Blocking; meant for a
    /// background thread while the daemon already serves. Files found by
    /// listing get clock counts by access time (see [`AtimeSplit`]);
    /// entries from the snapshot keep the counts they had.
    pub fn load(&self) -> LoadReport {
        let started = Instant::now();
        let mut report = LoadReport::default();
        let root = self.dir().to_path_buf();

        report.foreign_files += check_root(&root);
        let mut work: Vec<Work> = Vec::new();
        let mut roots = vec![(NamespaceId::DEFAULT, root.clone())];
        roots.extend(self.discover_namespaces(&root, &mut report));
        for (ns, nsroot) in roots {
            // Kinds interleaved, so that the parts done at any moment are
            // a fair sample of all of them (see `insert_found`).
            for i in 0..SUBDIRS {
                for kind in Kind::ALL {
                    let dir = nsroot.join(kind.dir_name()).join(format!("{i:02x}"));
                    work.push((ns, kind, i, dir));
                }
            }
        }
        let shared = self.shared();
        shared
            .dirs_total
            .store(work.len() as u64, Ordering::Relaxed);
        self.load_snapshot(&mut report);
        let next = AtomicUsize::new(0);
        // Listing and stat are mostly waits on inode reads when the cache
        // is cold, so more threads than cores keep the device queue full.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get() * 8)
            .unwrap_or(16)
            .clamp(8, 32);
        let totals: Vec<LoadReport> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| s.spawn(|| self.scan_worker(&work, &next)))
                .collect();
            let mut last_log = Instant::now();
            while handles.iter().any(|h| !h.is_finished()) {
                std::thread::sleep(Duration::from_millis(50));
                if last_log.elapsed() >= Duration::from_secs(2) {
                    last_log = Instant::now();
                    let done = shared.dirs_done.load(Ordering::Relaxed);
                    tracing::info!(
                        entries = shared.state.lock().index.len(),
                        directories = format!("{done}/{}", work.len()),
                        "loading cache index"
                    );
                }
            }
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for t in totals {
            report.add(&t);
        }
        // Parts claimed by lookups may still be loading: the index is whole
        // only once they are done.
        {
            let mut parts = shared.parts.lock();
            while parts.loading > 0 {
                shared.parts_cv.wait(&mut parts);
            }
            let compact_started = Instant::now();
            let mut st = shared.state.lock();
            st.index.compact();
            report.entries = st.index.len() as u64;
            tracing::debug!(
                seconds = compact_started.elapsed().as_secs_f64(),
                "index packed"
            );
            // Under the parts lock: a lookup either saw a part's state or
            // sees `loaded`, never neither.
            shared.loaded.store(true, Ordering::Release);
        }
        shared.parts_cv.notify_all();
        shared.evict_cv.notify_one();
        report.ready_after = started.elapsed();
        tracing::info!(
            entries = report.entries,
            temp_files_removed = report.temp_files_removed,
            foreign_files = report.foreign_files,
            duplicates_removed = report.duplicates_removed,
            from_snapshot = report.from_snapshot,
            sizes_to_read = report.sizes_deferred,
            seconds = report.ready_after.as_secs_f64(),
            "cache index loaded"
        );
        let sizing_started = Instant::now();
        let sized = self.size_parts();
        report.size_on_disk = shared.state.lock().index.size_on_disk;
        report.elapsed = started.elapsed();
        // A stop cuts the pass short; the sizes are then still unknown.
        if !shared.parts.lock().to_size.is_empty() {
            tracing::info!(files = sized, "sizing of cache files stopped by shutdown");
            return report;
        }
        shared.sized.store(true, Ordering::Release);
        // The sizes just added may put the cache over its limit.
        shared.evict_cv.notify_one();
        tracing::info!(
            files = sized,
            size_on_disk = report.size_on_disk,
            seconds = sizing_started.elapsed().as_secs_f64(),
            "cache sizes known"
        );
        report
    }

    /// The second pass (see the module doc): lists each part the first
    /// left unsized again and gives its casblobs their stored size and a
    /// clock count by access time. Runs while the cache serves, so as
    /// bulk work: a thread per core at the bulk priority, each batch of
    /// `stat`s a step that takes turns and rests while requests keep the
    /// daemon busy (`turns.rs`). `stat` of cold files is kernel CPU; more
    /// threads would only take it from requests. Returns the files sized.
    fn size_parts(&self) -> u64 {
        let shared = self.shared();
        let todo = shared.parts.lock().unsized_parts();
        if todo.is_empty() {
            return 0;
        }
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 4);
        let pause = shared.cfg.sizing_pause;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        // Bulk work: lower priority, and turns and rests
                        // while requests keep the daemon busy (`turns`).
                        let _bulk = crate::bulk_work(crate::turns::MIN_TRANSFER);
                        let mut sized = 0;
                        while let Some(&(ns, part)) = todo.get(next.fetch_add(1, Ordering::Relaxed))
                        {
                            if let Some(p) = pause {
                                std::thread::sleep(p);
                            }
                            if shared.state.lock().stop {
                                break;
                            }
                            sized += self.size_part(ns, part);
                            // Out of the set only once its sizes are in the
                            // index (see `save_snapshot`).
                            shared.parts.lock().to_size.remove(&(ns, part));
                        }
                        sized
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).sum()
        })
    }

    /// Sizes the casblobs of one part that the listing indexed from their
    /// names. A file evicted, replaced or found twice since is no longer
    /// the entry's file (other key or suffix) and is passed over; an entry
    /// written since has its size already and keeps it.
    fn size_part(&self, ns: NamespaceId, part: usize) -> u64 {
        const BATCH: usize = 256;
        let (kind, sub) = (Kind::ALL[part / SUBDIRS], part % SUBDIRS);
        let dir = self.dir_of(ns, kind, &Hash([sub as u8; 32]));
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                // Its entries keep no size: they count nothing against the
                // limit and are evicted like any other once sizing ends.
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list a cache directory to size its files");
                return 0;
            }
        };
        let mut sized = 0;
        let mut batch: Vec<(ParsedName, u32, u32)> = Vec::with_capacity(BATCH);
        let mut flush = |batch: &mut Vec<(ParsedName, u32, u32)>| {
            let mut st = self.shared().state.lock();
            st.atime_split.observe(batch.iter().map(|b| b.2));
            for (p, blocks, atime) in batch.drain(..) {
                let Some(slot) = st.index.find(ns, kind, &p.hash) else {
                    continue;
                };
                let at = Location::of(&st.index, slot);
                if at.suffix != p.suffix || at.format != p.format {
                    continue;
                }
                let uses = st.atime_split.uses(atime);
                st.index.set_size(slot, blocks, uses);
                sized += 1;
            }
        };
        let mut casblobs = rd.flatten().filter_map(|de| {
            let p = parse_name(&de.file_name().to_string_lossy(), kind)?;
            (p.format == Format::Casblob).then_some((p, de))
        });
        loop {
            let chunk: Vec<_> = casblobs.by_ref().take(BATCH).collect();
            if chunk.is_empty() {
                return sized;
            }
            // The `stat`s are the step that takes turns: kernel CPU that
            // requests would otherwise wait behind.
            crate::turns::step(crate::turns::MIN_BYTES, || {
                for (p, de) in chunk {
                    if let Some(m) = de.metadata().ok().filter(|m| m.is_file()) {
                        let blocks = m.len().div_ceil(crate::BLOCK_SIZE) as u32;
                        batch.push((p, blocks, atime_of(&m)));
                    }
                }
            });
            flush(&mut batch);
        }
    }

    /// Takes what the index snapshot can vouch for: each part whose
    /// directory has not changed since the snapshot was written (and that
    /// no lookup claimed first) is indexed from it and marked loaded; the
    /// scan lists the rest. The file is deleted as soon as it is read, so
    /// it serves one start only.
    fn load_snapshot(&self, report: &mut LoadReport) {
        let path = crate::snapshot::path_in(self.dir());
        if !path.exists() {
            return;
        }
        let started = Instant::now();
        let read = crate::snapshot::read(&path);
        let read_seconds = started.elapsed().as_secs_f64();
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the index snapshot; ignoring it");
            return;
        }
        let snap = match read {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "index snapshot not used; listing every directory");
                return;
            }
        };
        let shared = self.shared();
        // The snapshot's namespaces, as this process numbers them: only
        // those the load registered (their directories exist).
        let ids: Vec<Option<NamespaceId>> = {
            let reg = shared.namespaces.read();
            snap.namespaces
                .iter()
                .map(|n| reg.by_name.get(n).copied())
                .collect()
        };
        let mut taken = std::collections::HashSet::new();
        let mut stale = 0u64;
        for (&(sns, part), &t) in &snap.parts {
            let Some(ns) = ids.get(sns as usize).copied().flatten() else {
                continue;
            };
            let part = part as usize;
            let (kind, sub) = (Kind::ALL[part / SUBDIRS], part % SUBDIRS);
            let dir = shared.dir_of(ns, kind, &Hash([sub as u8; 32]));
            if crate::snapshot::mtime_of(&dir) != Some(t) {
                stale += 1;
                continue;
            }
            if self.claim_part(ns, part, false) {
                taken.insert((ns, part));
            }
        }
        const CHUNK: usize = 64 * 1024;
        let mut n = 0u64;
        // One allocation for all of it: growing step by step would rehash
        // the table several times over.
        {
            let mut st = shared.state.lock();
            let total = st.index.len() + snap.records.len();
            st.index.reserve_total(total);
        }
        // Each entry keeps the clock count it had at the stop, so the hand
        // resumes with the same chances left.
        let mut records = snap.records.iter().peekable();
        while records.peek().is_some() {
            let mut st = shared.state.lock();
            for r in records.by_ref().take(CHUNK) {
                let e = &r.entry;
                let Some(ns) = ids.get(e.ns().index()).copied().flatten() else {
                    continue;
                };
                let part = part_index(e.kind(), e.hash[0] as usize);
                if !taken.contains(&(ns, part)) {
                    continue;
                }
                let hash = Hash(e.hash);
                if st.index.find(ns, e.kind(), &hash).is_some() {
                    continue;
                }
                let entry = Entry::new(
                    ns,
                    e.kind(),
                    hash,
                    e.format(),
                    e.logical(),
                    e.blocks,
                    e.suffix,
                    r.odd.is_some(),
                );
                st.index
                    .insert(entry.with_uses(e.uses()), r.odd.clone(), true);
                n += 1;
            }
        }
        for (ns, part) in &taken {
            self.finish_part(*ns, *part, false);
        }
        report.from_snapshot = n;
        report.parts_from_snapshot = taken.len() as u64;
        tracing::info!(
            entries = n,
            directories = taken.len(),
            changed_directories = stale,
            read_seconds,
            seconds = started.elapsed().as_secs_f64(),
            "index snapshot loaded"
        );
    }

    /// Makes sure the part that holds this key is indexed: returns at once
    /// once the load is done; else loads the part now, or waits for the
    /// thread loading it.
    pub(crate) fn ensure_loaded(&self, ns: NamespaceId, kind: Kind, hash: &Hash) {
        if self.is_loaded() {
            return;
        }
        let part = part_index(kind, hash.0[0] as usize);
        if self.claim_part(ns, part, true) {
            let dir = self.dir_of(ns, kind, hash);
            let r = self.load_part(ns, kind, &dir);
            tracing::debug!(dir = %dir.display(), "indexed a directory on demand");
            self.finish_part(ns, part, r.sizes_deferred > 0);
        }
    }

    /// Claims a part for loading: true when the caller must load it and
    /// then call `finish_part`. With `wait`, a part being loaded by another
    /// thread is waited for.
    fn claim_part(&self, ns: NamespaceId, part: usize, wait: bool) -> bool {
        let shared = self.shared();
        let mut parts = shared.parts.lock();
        loop {
            if self.is_loaded() {
                return false;
            }
            match *parts.state(ns, part) {
                Part::Unloaded => {
                    *parts.state(ns, part) = Part::Loading;
                    parts.loading += 1;
                    return true;
                }
                Part::Loaded => return false,
                Part::Loading if !wait => return false,
                Part::Loading => shared.parts_cv.wait(&mut parts),
            }
        }
    }

    fn finish_part(&self, ns: NamespaceId, part: usize, to_size: bool) {
        let shared = self.shared();
        {
            let mut parts = shared.parts.lock();
            *parts.state(ns, part) = Part::Loaded;
            parts.loading -= 1;
            if to_size {
                parts.to_size.insert((ns, part));
            }
        }
        shared.dirs_done.fetch_add(1, Ordering::Relaxed);
        shared.parts_cv.notify_all();
    }

    fn discover_namespaces(
        &self,
        root: &Path,
        report: &mut LoadReport,
    ) -> Vec<(NamespaceId, PathBuf)> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(root.join(NS_DIR)) else {
            return out;
        };
        for de in rd.flatten() {
            let name = de.file_name().to_string_lossy().into_owned();
            let ns_name = key::namespace_from_dir_name(&name);
            let is_dir = de.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir || key::validate_namespace(&ns_name).is_err() {
                tracing::warn!(path = %de.path().display(), "ignoring foreign entry in namespace directory");
                report.foreign_files += 1;
                continue;
            }
            let mut reg = self.shared().namespaces.write();
            let id = match reg.by_name.get(&ns_name) {
                Some(id) => *id,
                None if reg.names.len() < self.shared().cfg.max_namespaces => {
                    let quota = self.shared().cfg.quotas.of(&ns_name);
                    register(&mut reg, &ns_name, de.path(), quota)
                }
                None => {
                    tracing::warn!(namespace = %ns_name, "namespace limit reached; not loading it");
                    continue;
                }
            };
            out.push((id, de.path()));
        }
        out
    }

    fn scan_worker(&self, work: &[Work], next: &AtomicUsize) -> LoadReport {
        let mut report = LoadReport::default();
        let pause = self.shared().cfg.load_pause;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((ns, kind, sub, dir)) = work.get(i) else {
                return report;
            };
            let part = part_index(*kind, *sub);
            // A part a lookup already claimed is that lookup's to load.
            if self.claim_part(*ns, part, false) {
                let r = self.load_part(*ns, *kind, dir);
                self.finish_part(*ns, part, r.sizes_deferred > 0);
                report.add(&r);
            }
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
    }

    /// Lists one part's directory and indexes what it holds. Only the
    /// holder of the part's claim calls this.
    fn load_part(&self, ns: NamespaceId, kind: Kind, dir: &Path) -> LoadReport {
        // Found files go into the index a few hundred at a time: a batch
        // per directory would make each of the many listing threads hold
        // (and its allocator keep) a directory's worth at once.
        const BATCH: usize = 256;
        let mut report = LoadReport::default();
        let mut batch: Vec<Found> = Vec::with_capacity(BATCH);
        let own_tmp = format!("-{:08x}.tmp", self.shared().token);
        let mut foreign_logged = 0;
        if let Ok(rd) = fs::read_dir(dir) {
            for de in rd.flatten() {
                let name = de.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".tmp") {
                    // Ours is a write in flight; any other is a crash's leftover.
                    if !name.ends_with(&own_tmp) && fs::remove_file(de.path()).is_ok() {
                        report.temp_files_removed += 1;
                    }
                    continue;
                }
                let parsed = parse_name(&name, kind);
                // A casblob's name says all a lookup needs; `stat` waits
                // for the second pass (see the module doc).
                let deferred = parsed.as_ref().is_some_and(|p| p.format == Format::Casblob);
                let meta = if deferred {
                    de.file_type().is_ok_and(|t| t.is_file()).then_some(None)
                } else {
                    de.metadata().ok().filter(|m| m.is_file()).map(Some)
                };
                match (parsed, meta) {
                    (Some(p), Some(m)) => {
                        let logical = p.logical.or(m.as_ref().map(|m| m.len())).unwrap_or(0);
                        let blocks = m
                            .as_ref()
                            .map_or(0, |m| m.len().div_ceil(crate::BLOCK_SIZE) as u32);
                        let odd = match &p.suffix {
                            Suffix::Odd(s) => Some(s.clone()),
                            Suffix::Num(_) => None,
                        };
                        let entry = Entry::new(
                            ns,
                            kind,
                            p.hash,
                            p.format,
                            logical,
                            blocks,
                            match p.suffix {
                                Suffix::Num(n) => n,
                                Suffix::Odd(_) => 0,
                            },
                            odd.is_some(),
                        );
                        let atime = m.map(|m| atime_of(&m));
                        report.sizes_deferred += atime.is_none() as u64;
                        batch.push(Found { entry, odd, atime });
                        if batch.len() == BATCH {
                            report.duplicates_removed += self.insert_found(&mut batch);
                        }
                    }
                    _ => {
                        report.foreign_files += 1;
                        if foreign_logged < 20 {
                            foreign_logged += 1;
                            tracing::warn!(path = %de.path().display(), "ignoring foreign file in cache directory");
                        }
                    }
                }
            }
        }
        report.duplicates_removed += self.insert_found(&mut batch);
        report
    }

    /// Adds a directory's worth of found files to the index. Two files of
    /// one key (a crash between writing a newer action result and deleting
    /// the older, or a bazel-remote leftover) keep the first; the other file
    /// is deleted. No writer can have added the key meanwhile: writes to a
    /// part wait for its load.
    fn insert_found(&self, batch: &mut Vec<Found>) -> u64 {
        let mut dupes = Vec::new();
        {
            let shared = self.shared();
            let mut st = shared.state.lock();
            // The count the parts indexed so far predict, plus 1%: the
            // index grows once to about its final size rather than a
            // quarter at a time. The entries of parts still being listed
            // make it high by a few percent, which the final `compact`
            // takes back; so it waits for a sixth of the parts.
            let done = shared.dirs_done.load(Ordering::Relaxed);
            let total = shared.dirs_total.load(Ordering::Relaxed);
            let expected = if done >= 128 && done * 6 >= total {
                (st.index.len() as u128 * total as u128 * 101 / (done as u128 * 100)) as usize
            } else {
                0
            };
            st.index.reserve_toward(batch.len(), expected);
            st.atime_split.observe(batch.iter().filter_map(|f| f.atime));
            for f in batch.drain(..) {
                // Zero until sized: the evictor passes over it meanwhile.
                let uses = f.atime.map_or(0, |t| st.atime_split.uses(t));
                let entry = f.entry.with_uses(uses);
                if let Err((slot, odd)) = st.index.insert_if_absent(entry, f.odd, true) {
                    let existing = Location::of(&st.index, slot);
                    let this = found_location(&entry, odd);
                    if existing.suffix != this.suffix || existing.format != this.format {
                        dupes.push(self.path_of(&this));
                    }
                }
            }
        }
        for p in &dupes {
            tracing::info!(path = %p.display(), "removing duplicate cache file");
            let _ = fs::remove_file(p);
        }
        dupes.len() as u64
    }
}

/// A file's access time in whole seconds, as the clock counts use it.
fn atime_of(m: &fs::Metadata) -> u32 {
    m.atime().clamp(0, u32::MAX as i64 - 1) as u32
}

/// Where a file the listing found is, from its entry and odd suffix.
fn found_location(entry: &Entry, odd: Option<Box<str>>) -> Location {
    Location {
        ns: entry.ns(),
        kind: entry.kind(),
        hash: Hash(entry.hash),
        format: entry.format(),
        logical: entry.logical(),
        suffix: match odd {
            Some(s) => Suffix::Odd(s),
            None => Suffix::Num(entry.suffix),
        },
        size_on_disk: entry.size_on_disk(),
    }
}

fn check_root(root: &Path) -> u64 {
    let mut foreign = 0;
    if let Ok(rd) = fs::read_dir(root) {
        for de in rd.flatten() {
            let name = de.file_name();
            if !ROOT_NAMES.iter().any(|n| name == *n) {
                foreign += 1;
                tracing::warn!(path = %de.path().display(), "ignoring foreign entry in cache directory");
            }
        }
    }
    foreign
}

pub(crate) struct ParsedName {
    pub hash: Hash,
    pub logical: Option<u64>,
    pub suffix: Suffix,
    pub format: Format,
}

/// Parses bazel-remote's file names:
/// `^([a-f0-9]{64})(?:-([1-9][0-9]*))?-([0-9a-zA-Z]+)(\.v1)?$`.
pub(crate) fn parse_name(name: &str, kind: Kind) -> Option<ParsedName> {
    let b = name.as_bytes();
    if b.len() < 66 || b[64] != b'-' {
        return None;
    }
    let hash = Hash::parse_bytes(&b[..64]).ok()?;
    let rest = &name[65..];
    let (rest, v1) = match rest.strip_suffix(".v1") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (size, suffix) = match rest.split_once('-') {
        Some((size, suffix)) => (Some(size), suffix),
        None => (None, rest),
    };
    if suffix.is_empty() || !suffix.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let logical = match size {
        Some(s)
            if !s.starts_with('0') && !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) =>
        {
            Some(s.parse::<u64>().ok()?)
        }
        Some(_) => return None,
        None => None,
    };
    let format = match (kind, v1, logical) {
        (Kind::Cas, true, None) => Format::RawV1,
        (Kind::Cas, false, _) => Format::Casblob,
        (Kind::Ac | Kind::Raw, false, None) => Format::Plain,
        _ => return None,
    };
    let logical = match format {
        Format::Casblob => Some(logical.unwrap_or(0)),
        _ => None,
    };
    let suffix = match suffix.parse::<u32>() {
        Ok(n) if suffix.len() == 9 && suffix.bytes().all(|c| c.is_ascii_digit()) => Suffix::Num(n),
        _ => Suffix::Odd(suffix.into()),
    };
    Some(ParsedName {
        hash,
        logical,
        suffix,
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn bazel_remote_file_names_parse() {
        let p = parse_name(&format!("{H}-1234-000000042"), Kind::Cas).unwrap();
        assert_eq!(p.logical, Some(1234));
        assert_eq!(p.suffix, Suffix::Num(42));
        assert_eq!(p.format, Format::Casblob);
        let p = parse_name(&format!("{H}-abcXYZ.v1"), Kind::Cas).unwrap();
        assert_eq!(p.format, Format::RawV1);
        assert_eq!(p.suffix, Suffix::Odd("abcXYZ".into()));
        let p = parse_name(&format!("{H}-123456789"), Kind::Ac).unwrap();
        assert_eq!(p.format, Format::Plain);
        for bad in [
            format!("{H}-0123-1"),
            format!("{H}-12-1.v1"),
            format!("{H}-"),
            format!("{H}-1-a_b"),
            "README".to_string(),
            format!("{}-1", &H[..63]),
        ] {
            assert!(parse_name(&bad, Kind::Cas).is_none(), "{bad} parsed");
        }
        assert!(parse_name(&format!("{H}-1-1"), Kind::Ac).is_none());
    }
}
