//! The index snapshot: the index written to one file at a clean stop, so
//! that the next start indexes a million entries from one sequential read
//! instead of a million `stat`s.
//!
//! # Why a snapshot is never trusted blindly
//!
//! A snapshot is a claim about directories, and directories can change
//! while hoard is not running (a bazel-remote started on the same
//! directory, an operator deleting files) or after the snapshot was
//! written (a request still finishing, an eviction the stop cut short).
//! So it records, for every part (`<kind dir>/<hh>` of a namespace), the
//! directory's modification time when the snapshot was taken. Any entry
//! added, renamed or removed in a directory changes that time. At start a
//! part whose directory's time still matches is taken from the snapshot;
//! every other part is listed as if there were no snapshot. A part that had
//! deletions queued but not done when the snapshot was taken is recorded
//! with no time at all, so it is always listed.
//!
//! The file is read once and deleted before anything is written to the
//! cache, so a crash afterwards leaves no snapshot and the next start
//! lists every directory. A file with the wrong magic, an unknown version,
//! a checksum that does not match or a record that does not parse is
//! ignored as a whole (logged), and the start lists every directory.
//!
//! # Format (version 2, little endian)
//!
//! ```text
//! "HOARDIDX" u32 version
//! u32 namespaces, each: u16 length, name bytes
//! u32 parts, each: u16 namespace, u16 part, i64 mtime seconds, u32 nanoseconds
//! u64 entries, each:
//!     [32] hash, u16 namespace, u8 kind, u8 format, u8 clock count (0-3),
//!     u64 logical size, u32 blocks, u32 suffix, u8 odd-suffix length,
//!     odd-suffix bytes
//! [32] SHA-256 of everything before it
//! ```

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::index::{Entry, Format};
use crate::key::{Hash, Kind, NamespaceId};

pub(crate) const FILE: &str = "index.snapshot";
pub(crate) const TMP_FILE: &str = "index.snapshot.tmp";
const MAGIC: &[u8; 8] = b"HOARDIDX";
const VERSION: u32 = 2;
/// Stands for "no time recorded": such a part is always listed.
const NO_TIME: i64 = i64::MIN;

/// A directory's modification time, to the nanosecond.
pub(crate) type Mtime = (i64, u32);

pub(crate) fn mtime_of(dir: &Path) -> Option<Mtime> {
    let m = fs::metadata(dir).ok()?;
    Some((m.mtime(), m.mtime_nsec() as u32))
}

/// One entry as the snapshot holds it.
pub(crate) struct Record {
    pub entry: Entry,
    pub odd: Option<Box<str>>,
}

/// What a snapshot says: namespaces by name, each part's recorded time,
/// and the entries (namespace ids are the snapshot's own,
/// indices into `namespaces`).
pub(crate) struct Snapshot {
    pub namespaces: Vec<String>,
    pub parts: HashMap<(u16, u16), Mtime>,
    pub records: Vec<Record>,
}

/// Writes `snap` to `<dir>/index.snapshot` (through a temp file, fsynced,
/// renamed).
pub(crate) fn write(dir: &Path, snap: &Snapshot) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64 + snap.records.len() * 56);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(snap.namespaces.len() as u32).to_le_bytes());
    for n in &snap.namespaces {
        buf.extend_from_slice(&(n.len() as u16).to_le_bytes());
        buf.extend_from_slice(n.as_bytes());
    }
    buf.extend_from_slice(&(snap.parts.len() as u32).to_le_bytes());
    for ((ns, part), (s, ns_)) in &snap.parts {
        buf.extend_from_slice(&ns.to_le_bytes());
        buf.extend_from_slice(&part.to_le_bytes());
        buf.extend_from_slice(&s.to_le_bytes());
        buf.extend_from_slice(&ns_.to_le_bytes());
    }
    buf.extend_from_slice(&(snap.records.len() as u64).to_le_bytes());
    for r in &snap.records {
        let e = &r.entry;
        buf.extend_from_slice(&e.hash);
        buf.extend_from_slice(&e.ns().0.to_le_bytes());
        buf.push(e.kind().bits() as u8);
        buf.push(e.format().bits() as u8);
        buf.push(e.uses());
        buf.extend_from_slice(&e.logical().to_le_bytes());
        buf.extend_from_slice(&e.blocks.to_le_bytes());
        buf.extend_from_slice(&e.suffix.to_le_bytes());
        match &r.odd {
            Some(s) if s.len() <= u8::MAX as usize => {
                buf.push(s.len() as u8);
                buf.extend_from_slice(s.as_bytes());
            }
            _ => buf.push(0),
        }
    }
    let sum: [u8; 32] = Sha256::digest(&buf).into();
    buf.extend_from_slice(&sum);
    let tmp = dir.join(TMP_FILE);
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(FILE))
}

/// Why a snapshot file was not used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unusable {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("not an index snapshot")]
    Magic,
    #[error("version {0}, this hoard reads version {VERSION}")]
    Version(u32),
    #[error("checksum mismatch (a torn or damaged file)")]
    Checksum,
    #[error("record {0} does not parse")]
    Record(&'static str),
}

/// Reads and checks `path`.
pub(crate) fn read(path: &Path) -> Result<Snapshot, Unusable> {
    let data = fs::read(path)?;
    if data.len() < MAGIC.len() + 4 + 32 || &data[..8] != MAGIC {
        return Err(Unusable::Magic);
    }
    let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if version != VERSION {
        return Err(Unusable::Version(version));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(Unusable::Checksum);
    }
    parse(&body[12..])
}

/// A cursor over the checked body.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Unusable> {
        if self.0.len() < n {
            return Err(Unusable::Record(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, Unusable> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, Unusable> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, Unusable> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, Unusable> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

fn parse(body: &[u8]) -> Result<Snapshot, Unusable> {
    let mut c = Cur(body);
    let n = c.u32("namespace count")? as usize;
    let mut namespaces = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let len = c.u16("namespace")? as usize;
        let name = std::str::from_utf8(c.take(len, "namespace")?)
            .map_err(|_| Unusable::Record("namespace"))?;
        namespaces.push(name.to_string());
    }
    let n = c.u32("part count")? as usize;
    let mut parts = HashMap::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let ns = c.u16("part")?;
        let part = c.u16("part")?;
        let secs = c.u64("part")? as i64;
        let nanos = c.u32("part")?;
        if ns as usize >= namespaces.len() {
            return Err(Unusable::Record("part"));
        }
        parts.insert((ns, part), (secs, nanos));
    }
    let n = c.u64("entry count")? as usize;
    // Each record is at least 54 bytes: a count beyond what the file holds
    // is a bad file, not an allocation.
    if n > c.0.len() / 54 {
        return Err(Unusable::Record("entry count"));
    }
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(c.take(32, "entry")?);
        let ns = c.u16("entry")?;
        let kind = c.u8("entry")?;
        let format = c.u8("entry")?;
        let uses = c.u8("entry")?;
        let logical = c.u64("entry")?;
        let blocks = c.u32("entry")?;
        let suffix = c.u32("entry")?;
        let odd_len = c.u8("entry")? as usize;
        let odd = match odd_len {
            0 => None,
            n => Some(
                std::str::from_utf8(c.take(n, "entry")?)
                    .map_err(|_| Unusable::Record("entry"))?
                    .into(),
            ),
        };
        if ns as usize >= namespaces.len()
            || kind > 2
            || format > 2
            || uses > crate::index::FRESH_USES
            || (odd.is_none() && suffix > 999_999_999)
        {
            return Err(Unusable::Record("entry"));
        }
        let entry = Entry::new(
            NamespaceId(ns),
            Kind::from_bits(kind as u16),
            Hash(hash),
            Format::from_bits(format as u16),
            logical,
            blocks,
            suffix,
            odd.is_some(),
        )
        .with_uses(uses);
        records.push(Record { entry, odd });
    }
    if !c.0.is_empty() {
        return Err(Unusable::Record("trailing bytes"));
    }
    Ok(Snapshot {
        namespaces,
        parts,
        records,
    })
}

/// The recorded time that says "list this part".
pub(crate) fn no_time() -> Mtime {
    (NO_TIME, 0)
}

/// Where a snapshot lives in `dir`.
pub(crate) fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE)
}
