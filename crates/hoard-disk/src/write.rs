//! Writing a blob: stream to a temp file while hashing and compressing, then
//! verify, fsync, rename and index. See the crate doc's crash-safety notes.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

use crate::casblob::{self, CHUNK_SIZE, Header};
use crate::index::{Entry, Format, MAX_LOGICAL};
use crate::{
    Committed, DiskCache, Error, Hash, Kind, Location, NamespaceId, StorageMode, Suffix,
    round_up_block,
};

const PLAIN_BUFFER: usize = 256 * 1024;
/// With fsync on, large blobs are flushed every this many stored bytes.
const SYNC_EVERY: u64 = 8 << 20;

/// The result of a successful [`Writer::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// False when an identical CAS blob was already present (nothing new
    /// was stored and the commit hook was not called).
    pub created: bool,
    /// SizeOnDisk of the stored file (0 when nothing was stored).
    pub size_on_disk: u64,
}

/// An in-progress write. Dropping it without [`Writer::commit`] removes the
/// temp file and releases the reserved space, so an aborted upload (client
/// gone, bad digest, full disk) leaves nothing behind.
pub struct Writer {
    cache: DiskCache,
    ns: NamespaceId,
    kind: Kind,
    hash: Hash,
    expected: u64,
    hasher: Option<Sha256>,
    received: u64,
    sink: Option<Sink>,
    /// Space counted in `reserved` for this write now. It grows with the
    /// bytes received, [`RESERVE_STEP`] ahead of them, up to `estimate`:
    /// a client that declares a huge blob and then stalls holds only what
    /// it sent, never the whole declared size.
    reservation: u64,
    /// The stored size the whole blob may take.
    estimate: u64,
    from_backend: bool,
    /// The part this write has a temp file in, registered in
    /// `State::active_parts` until it commits or is dropped (see
    /// `snapshot.rs`: a part being written to is never taken from a
    /// snapshot).
    active_part: Option<usize>,
}

/// How far a write's reservation runs ahead of its bytes.
const RESERVE_STEP: u64 = 8 << 20;

struct Sink {
    tmp: PathBuf,
    file: File,
    format: Format,
    /// Next write offset in the file.
    pos: u64,
    /// Pending bytes: one uncompressed chunk (casblob) or a write buffer.
    buf: Vec<u8>,
    offsets: Vec<u64>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    compressed: Vec<u8>,
    /// For blobs of more than one chunk: the thread compressing and writing
    /// chunks while this one hashes the next.
    pipeline: Option<Pipeline>,
    fsync: bool,
    renamed: bool,
}

/// Compression runs beside hashing: SHA-256 and zstd each take a core's
/// worth of time per byte, so a large upload goes twice as fast when they
/// overlap. At most one chunk waits in the channel and one is being
/// compressed, so a writer holds at most three chunk buffers.
/// Where the pipeline left the file: next write offset and chunk offsets.
type Written = (u64, Vec<u64>);

struct Pipeline {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    handle: Option<std::thread::JoinHandle<Result<Written, Error>>>,
}

impl Writer {
    pub(crate) fn start(
        cache: DiskCache,
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        expected: u64,
    ) -> Result<Writer, Error> {
        // The part is indexed before anything is written to it, so the load
        // never lists this write's temp file or its committed file (see
        // `load.rs`).
        cache.ensure_loaded(ns, kind, &hash);
        let cfg = cache.config().clone();
        let hasher = (kind == Kind::Cas).then(Sha256::new);
        let mut w = Writer {
            cache,
            ns,
            kind,
            hash,
            expected,
            hasher,
            received: 0,
            sink: None,
            reservation: 0,
            estimate: 0,
            from_backend: false,
            active_part: None,
        };
        if kind == Kind::Cas && w.cache.contains(ns, kind, &hash).is_some() {
            // Already stored: only verify the bytes, store nothing.
            return Ok(w);
        }
        let format = match (kind, cfg.storage_mode) {
            (Kind::Cas, StorageMode::Zstd) => Format::Casblob,
            (Kind::Cas, StorageMode::Uncompressed) => Format::RawV1,
            _ => Format::Plain,
        };
        let chunks = casblob::num_chunks(expected, CHUNK_SIZE) as u64;
        let estimate = match format {
            // zstd never grows a chunk by more than a few dozen bytes.
            Format::Casblob => round_up_block(
                expected
                    .saturating_add(casblob::header_len(expected) as u64)
                    .saturating_add(64 * chunks),
            ),
            _ => round_up_block(expected),
        };
        if expected > MAX_LOGICAL || estimate > cfg.max_size_bytes {
            return Err(Error::TooLarge {
                size: expected,
                max_size: cfg.max_size_bytes,
            });
        }
        // A blob larger than its namespace's quota could only evict the
        // whole namespace and then itself.
        let quota = w.cache.shared().namespaces.read().quota(ns);
        if estimate > quota {
            return Err(Error::OverQuota {
                size: expected,
                quota,
            });
        }
        // A blob that cannot fit now is refused before a byte is taken;
        // one that fits reserves its first step only.
        w.estimate = estimate;
        w.reserve(estimate.min(RESERVE_STEP), estimate)?;
        let dir = w.cache.dir_of(ns, kind, &hash);
        let tmp = dir.join(format!(
            "{}-{:09}-{:08x}.tmp",
            hash,
            w.cache.random_suffix(),
            w.cache.shared().token
        ));
        let part = crate::load::part_index(kind, hash.0[0] as usize);
        *w.cache
            .shared()
            .state
            .lock()
            .active_parts
            .entry((ns, part))
            .or_insert(0) += 1;
        w.active_part = Some(part);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let (pos, buf_cap, compressor) = match format {
            Format::Casblob => {
                let mut c = zstd::bulk::Compressor::new(1).map_err(|e| Error::io(&tmp, e))?;
                c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                    .map_err(|e| Error::io(&tmp, e))?;
                let first = (expected as usize).min(CHUNK_SIZE);
                (casblob::header_len(expected) as u64, first, Some(c))
            }
            _ => (0, (expected as usize).min(PLAIN_BUFFER), None),
        };
        w.sink = Some(Sink {
            tmp,
            file,
            format,
            pos,
            buf: Vec::with_capacity(buf_cap),
            offsets: Vec::with_capacity(chunks as usize + 1),
            compressor,
            compressed: Vec::new(),
            pipeline: None,
            fsync: cfg.fsync,
            renamed: false,
        });
        Ok(w)
    }

    /// Marks the blob as fetched from the backend, so the commit hook can
    /// tell it needs no upload.
    pub fn set_from_backend(&mut self) {
        self.from_backend = true;
    }

    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends content. Fails as soon as more bytes arrive than declared.
    /// Grows this write's reservation to `to` bytes, checking the hard
    /// limit for `check` bytes (what is asked for now, or the whole
    /// estimate at the start).
    fn reserve(&mut self, to: u64, check: u64) -> Result<(), Error> {
        let cfg = self.cache.config();
        let limit = cfg.hard_limit_bytes;
        let mut st = self.cache.shared().state.lock();
        if let Some(limit) = limit {
            let mut used = st.index.size_on_disk + st.reserved + st.pending_deletion;
            // Files the load has not sized yet count at their logical
            // size: the limit is there to keep the disk from filling.
            if !self.cache.sizes_known() {
                used += st.index.unsized_logical_bytes;
            }
            let more = check.saturating_sub(self.reservation);
            if used.saturating_add(more) > limit {
                return Err(Error::HardLimit {
                    needed: more,
                    limit,
                });
            }
        }
        st.reserved += to - self.reservation;
        self.reservation = to;
        Ok(())
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<(), Error> {
        let received = self.received + data.len() as u64;
        if received > self.expected {
            return Err(Error::SizeMismatch {
                expected: self.expected,
                received,
            });
        }
        if self.sink.is_some() && received > self.reservation && self.reservation < self.estimate {
            let to = received.saturating_add(RESERVE_STEP).min(self.estimate);
            self.reserve(to, to)?;
        }
        self.received = received;
        if let Some(h) = &mut self.hasher {
            crate::turns::step(data.len(), || h.update(data));
        }
        let Some(sink) = &mut self.sink else {
            return Ok(());
        };
        match sink.format {
            Format::Casblob => {
                while !data.is_empty() {
                    let room = CHUNK_SIZE - sink.buf.len();
                    let take = room.min(data.len());
                    sink.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    // A full chunk with more to come goes to the pipeline; the
                    // last one waits for commit.
                    if sink.buf.len() == CHUNK_SIZE
                        && (!data.is_empty() || received < self.expected)
                    {
                        sink.send_to_pipeline()?;
                    }
                }
            }
            Format::RawV1 | Format::Plain => {
                if sink.buf.len() + data.len() > PLAIN_BUFFER {
                    sink.flush_plain()?;
                }
                if data.len() >= PLAIN_BUFFER {
                    sink.write_at_end(data)?;
                } else {
                    sink.buf.extend_from_slice(data);
                }
            }
        }
        Ok(())
    }

    /// Verifies size and digest, makes the blob durable and visible, and
    /// reports it to the commit hook if it is new.
    pub fn commit(mut self) -> Result<WriteOutcome, Error> {
        if self.received != self.expected {
            return Err(Error::SizeMismatch {
                expected: self.expected,
                received: self.received,
            });
        }
        if let Some(h) = self.hasher.take() {
            let actual = Hash(h.finalize().into());
            if actual != self.hash {
                return Err(Error::DigestMismatch {
                    expected: self.hash,
                    actual,
                    size: self.expected,
                });
            }
        }
        let Some(sink) = self.sink.as_mut() else {
            // Already stored: verified, nothing written. Tell the hook, which
            // may re-queue an upload that never succeeded.
            self.report_present();
            return Ok(WriteOutcome {
                created: false,
                size_on_disk: 0,
            });
        };
        match sink.format {
            Format::Casblob => {
                if !sink.buf.is_empty() {
                    sink.flush_chunk()?;
                }
                sink.finish_pipeline()?;
                sink.offsets.push(sink.pos);
                let header = Header::encode(self.expected, &sink.offsets);
                sink.file
                    .write_all_at(&header, 0)
                    .map_err(|e| Error::io(&sink.tmp, e))?;
            }
            Format::RawV1 | Format::Plain => sink.flush_plain()?,
        }
        let cfg = self.cache.config();
        if cfg.fsync {
            // Content reaches the disk before the name does: a final name
            // never points at a partial file, even after a power cut.
            sink.file.sync_data().map_err(|e| Error::io(&sink.tmp, e))?;
        }
        let file_len = sink.pos;
        let size_on_disk = round_up_block(file_len);
        let loc = Location {
            ns: self.ns,
            kind: self.kind,
            hash: self.hash,
            format: sink.format,
            logical: self.expected,
            suffix: Suffix::Num(self.cache.random_suffix()),
            size_on_disk,
        };
        let path = self.cache.path_of(&loc);
        // Atomic within the directory: readers see the old state or the
        // complete new file.
        fs::rename(&sink.tmp, &path).map_err(|e| Error::io(&path, e))?;
        sink.renamed = true;

        let entry = Entry::new(
            self.ns,
            self.kind,
            self.hash,
            sink.format,
            self.expected,
            (size_on_disk / crate::BLOCK_SIZE) as u32,
            match loc.suffix {
                Suffix::Num(n) => n,
                Suffix::Odd(_) => 0,
            },
            false,
        );
        let shared = self.cache.shared();
        let created = {
            let mut st = shared.state.lock();
            st.reserved -= self.reservation;
            self.reservation = 0;
            if let Some(part) = self.active_part.take() {
                st.leave_part(self.ns, part);
            }
            let created = match st.index.find(self.ns, self.kind, &self.hash) {
                Some(slot) if self.kind != Kind::Ac => {
                    // Another writer committed the same content first.
                    st.index.touch(slot);
                    false
                }
                existing => {
                    if let Some(slot) = existing {
                        // A newer action result replaces the older one.
                        let old = Location::of(&st.index, slot);
                        st.index.remove(slot);
                        st.pending_deletion += old.size_on_disk;
                        st.doomed.push((shared.path_of(&old), old.size_on_disk));
                    }
                    st.index.insert(entry, None, false);
                    true
                }
            };
            if !st.doomed.is_empty()
                || st.index.size_on_disk > shared.cfg.max_size_bytes
                || (!shared.cfg.quotas.is_empty()
                    && st.index.ns_usage(self.ns).1 > shared.namespaces.read().quota(self.ns))
            {
                shared.evict_cv.notify_one();
            }
            created
        };
        if !created {
            // Never indexed, so no reader can have it open by name.
            let _ = fs::remove_file(&path);
            self.report_present();
            return Ok(WriteOutcome {
                created: false,
                size_on_disk: 0,
            });
        }
        if let Some(hook) = shared.hook.get() {
            hook(&self.committed(size_on_disk, file_len, true));
        }
        Ok(WriteOutcome {
            created: true,
            size_on_disk,
        })
    }
}

impl Writer {
    /// Calls the hook for a blob this write found already stored.
    fn report_present(&self) {
        let shared = self.cache.shared();
        let Some(hook) = shared.hook.get() else {
            return;
        };
        let stored = {
            let st = shared.state.lock();
            st.index
                .find(self.ns, self.kind, &self.hash)
                .map(|slot| st.index.entry(slot).size_on_disk())
        };
        if let Some(size_on_disk) = stored {
            // The stored length is unknown here; the upload measures the
            // file it sends.
            hook(&self.committed(size_on_disk, 0, false));
        }
    }

    fn committed(&self, size_on_disk: u64, stored_bytes: u64, new: bool) -> Committed {
        Committed {
            namespace: self.ns,
            kind: self.kind,
            hash: self.hash,
            logical_size: self.expected,
            size_on_disk,
            stored_bytes,
            from_backend: self.from_backend,
            new,
        }
    }
}

impl Sink {
    /// Compresses the last chunk: through the pipeline if one runs (so
    /// chunks stay in order), else here.
    fn flush_chunk(&mut self) -> Result<(), Error> {
        if self.pipeline.is_some() {
            return self.send_to_pipeline();
        }
        let Some(c) = self.compressor.as_mut() else {
            return Ok(());
        };
        compress_and_write(
            c,
            &self.buf,
            &mut self.compressed,
            &self.file,
            &mut self.pos,
            &mut self.offsets,
        )
        .map_err(|e| Error::io(&self.tmp, e))?;
        self.buf.clear();
        Ok(())
    }

    fn send_to_pipeline(&mut self) -> Result<(), Error> {
        if self.pipeline.is_none() {
            self.start_pipeline()?;
        }
        let Some(p) = self.pipeline.as_mut() else {
            return Ok(());
        };
        let next = p
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK_SIZE));
        let full = std::mem::replace(&mut self.buf, next);
        let sent =
            p.tx.as_ref()
                .map(|tx| tx.send(full).is_ok())
                .unwrap_or(false);
        if !sent {
            // The compressing thread stopped: its error explains why.
            return self.finish_pipeline();
        }
        Ok(())
    }

    fn start_pipeline(&mut self) -> Result<(), Error> {
        let Some(mut c) = self.compressor.take() else {
            return Ok(());
        };
        let file = self.file.try_clone().map_err(|e| Error::io(&self.tmp, e))?;
        let tmp = self.tmp.clone();
        let mut pos = self.pos;
        let mut offsets = std::mem::take(&mut self.offsets);
        let fsync = self.fsync;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let handle = std::thread::Builder::new()
            .name("hoard-compress".into())
            .spawn(move || {
                // A pipeline runs only for blobs of more than one chunk.
                let _bulk = crate::bulk_work(crate::turns::MIN_TRANSFER);
                let mut compressed = Vec::new();
                let mut unsynced = 0u64;
                for mut chunk in rx {
                    let before = pos;
                    compress_and_write(
                        &mut c,
                        &chunk,
                        &mut compressed,
                        &file,
                        &mut pos,
                        &mut offsets,
                    )
                    .map_err(|e| Error::io(&tmp, e))?;
                    // Flush as we go, while the other thread hashes, so the
                    // fsync at commit has little left to wait for.
                    unsynced += pos - before;
                    if fsync && unsynced >= SYNC_EVERY {
                        file.sync_data().map_err(|e| Error::io(&tmp, e))?;
                        unsynced = 0;
                    }
                    chunk.clear();
                    let _ = back_tx.try_send(chunk);
                }
                Ok((pos, offsets))
            })
            .map_err(|e| Error::io(&self.tmp, e))?;
        self.pipeline = Some(Pipeline {
            tx: Some(tx),
            recycled: back_rx,
            handle: Some(handle),
        });
        Ok(())
    }

    /// Waits for the pipeline to write everything sent to it and takes back
    /// the write position and chunk offsets.
    fn finish_pipeline(&mut self) -> Result<(), Error> {
        let Some(mut p) = self.pipeline.take() else {
            return Ok(());
        };
        drop(p.tx.take());
        let Some(handle) = p.handle.take() else {
            return Ok(());
        };
        let joined = handle.join().map_err(|_| {
            Error::io(
                &self.tmp,
                std::io::Error::other("compression thread panicked"),
            )
        })?;
        let (pos, offsets) = joined?;
        self.pos = pos;
        self.offsets = offsets;
        Ok(())
    }

    fn flush_plain(&mut self) -> Result<(), Error> {
        let buf = std::mem::take(&mut self.buf);
        self.write_at_end(&buf)?;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    fn write_at_end(&mut self, data: &[u8]) -> Result<(), Error> {
        self.file
            .write_all_at(data, self.pos)
            .map_err(|e| Error::io(&self.tmp, e))?;
        self.pos += data.len() as u64;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.reservation > 0 || self.active_part.is_some() {
            let mut st = self.cache.shared().state.lock();
            st.reserved -= self.reservation;
            if let Some(part) = self.active_part.take() {
                st.leave_part(self.ns, part);
            }
        }
        if let Some(sink) = &self.sink
            && !sink.renamed
        {
            let _ = fs::remove_file(&sink.tmp);
        }
    }
}

/// Compresses one chunk into its own zstd frame and appends it to the file.
fn compress_and_write(
    c: &mut zstd::bulk::Compressor<'static>,
    chunk: &[u8],
    compressed: &mut Vec<u8>,
    file: &File,
    pos: &mut u64,
    offsets: &mut Vec<u64>,
) -> std::io::Result<()> {
    compressed.clear();
    compressed.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
    crate::turns::step(chunk.len(), || c.compress_to_buffer(chunk, compressed))?;
    offsets.push(*pos);
    file.write_all_at(compressed, *pos)?;
    *pos += compressed.len() as u64;
    Ok(())
}
