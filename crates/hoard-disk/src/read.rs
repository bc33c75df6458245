//! Reading a committed blob, with format checks that turn corruption into a
//! miss instead of a bad body.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};

use crate::casblob::{CHUNK_SIZE, Compression, FormatError, Header};
use crate::index::Format;
use crate::{DiskCache, Error, Location};

/// Files up to this size are read with one system call when opened.
const SLURP_LIMIT: u64 = 256 * 1024;

/// An open blob. Holding it keeps the file readable even if the blob is
/// evicted meanwhile (the descriptor outlives the unlink).
pub struct Blob {
    cache: DiskCache,
    loc: Location,
    file: File,
    file_len: u64,
    header: Option<Header>,
    /// The whole file, for small files.
    whole: Option<Vec<u8>>,
    /// Content read position of [`Blob::next_chunk`].
    pos: u64,
    /// SHA-256 of the content from byte 0 and how far it got, once a piece
    /// without its own checksum was read (`u64::MAX`: verified).
    digest: Option<(Sha256, u64)>,
    /// Next stored chunk of [`Blob::next_stored`], and whether the header
    /// comes first.
    stored_next: Option<(usize, bool)>,
}

/// Decompression contexts are costly to create (each holds its tables and
/// window), so they are reused across reads instead of living in each open
/// blob. The pool never holds more than it has handed out at once.
static DECOMPRESSORS: parking_lot::Mutex<Vec<zstd::bulk::Decompressor<'static>>> =
    parking_lot::Mutex::new(Vec::new());

fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> T,
) -> io::Result<T> {
    let pooled = DECOMPRESSORS.lock().pop();
    let mut d = match pooled {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let out = f(&mut d);
    DECOMPRESSORS.lock().push(d);
    Ok(out)
}

pub(crate) fn open(cache: DiskCache, loc: Location) -> Result<Option<Blob>, Error> {
    let path = cache.path_of(&loc);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Evicted or deleted behind our back between lookup and open.
            cache.forget(&loc);
            return Ok(None);
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let file_len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    let whole = if file_len <= SLURP_LIMIT {
        let mut buf = vec![0u8; file_len as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io(&path, e))?;
        Some(buf)
    } else {
        None
    };
    let header = match loc.format {
        Format::Casblob => match read_header(&file, whole.as_deref(), file_len) {
            Ok(h) if h.logical_size == loc.logical => Some(h),
            Ok(h) => {
                let reason = format!(
                    "header says {} bytes, file name says {}",
                    h.logical_size, loc.logical
                );
                cache.discard(&loc, &reason);
                return Ok(None);
            }
            Err(FormatError::Io(e)) => return Err(Error::io(path, e)),
            Err(e) => {
                cache.discard(&loc, &e);
                return Ok(None);
            }
        },
        Format::RawV1 | Format::Plain => {
            if file_len != loc.logical {
                let reason = format!("file has {file_len} bytes, index says {}", loc.logical);
                cache.discard(&loc, &reason);
                return Ok(None);
            }
            None
        }
    };
    Ok(Some(Blob {
        cache,
        loc,
        file,
        file_len,
        header,
        whole,
        pos: 0,
        digest: None,
        stored_next: None,
    }))
}

fn read_header(file: &File, whole: Option<&[u8]>, file_len: u64) -> Result<Header, FormatError> {
    if let Some(buf) = whole {
        return Header::parse(buf, file_len);
    }
    let mut fixed = vec![0u8; Header::FIXED_LEN];
    file.read_exact_at(&mut fixed, 0)?;
    let len = Header::declared_len(&fixed, file_len)?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Header::parse(&buf, file_len)
}

impl Blob {
    /// Size of the content in bytes.
    pub fn logical_size(&self) -> u64 {
        self.loc.logical
    }

    /// Size of the stored file in bytes.
    pub fn stored_len(&self) -> u64 {
        self.file_len
    }

    /// True when the stored file is itself a zstd stream of the content
    /// (a zstd casblob), so it can be sent as-is to a client accepting zstd.
    pub fn is_zstd_stream(&self) -> bool {
        matches!(&self.header, Some(h) if h.compression == Compression::Zstd)
    }

    /// Reads the stored file's bytes from `offset` into `buf`; returns how
    /// many were read (0 at the end). Unverified: for the read paths below.
    fn read_stored_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        if offset >= self.file_len {
            return Ok(0);
        }
        let n = buf.len().min((self.file_len - offset) as usize);
        if let Some(w) = &self.whole {
            buf[..n].copy_from_slice(&w[offset as usize..offset as usize + n]);
            return Ok(n);
        }
        self.file
            .read_exact_at(&mut buf[..n], offset)
            .map_err(|e| Error::io(self.cache.path_of(&self.loc), e))?;
        Ok(n)
    }

    /// True when the stored file is a casblob (the bucket key is then
    /// `cas.v2/...`); false for raw `.v1` CAS files and AC entries.
    pub fn is_casblob(&self) -> bool {
        self.header.is_some()
    }

    /// Path of the stored file. Eviction may unlink it at any time; whoever
    /// opens it by path must treat "not found" as the blob being gone.
    pub fn path(&self) -> std::path::PathBuf {
        self.cache.path_of(&self.loc)
    }

    /// Uncompressed bytes per stored chunk, for casblobs.
    pub fn chunk_size(&self) -> Option<usize> {
        self.header.as_ref().map(|h| h.chunk_size)
    }

    /// Moves the content read position (for ranged reads).
    pub fn seek(&mut self, offset: u64) {
        self.pos = offset.min(self.loc.logical);
    }

    /// Reads the whole content from the current position.
    pub fn read_to_vec(&mut self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity((self.loc.logical - self.pos) as usize);
        let mut chunk = Vec::new();
        while self.next_chunk(&mut chunk)? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Replaces `out` with the next piece of content (at most 1 MiB);
    /// returns false at the end.
    ///
    /// Verified: a piece is returned only once it is known to be right. A
    /// zstd chunk carrying its own checksum proves itself; any other CAS
    /// content (uncompressed files, frames without a checksum) is hashed
    /// from byte 0, and the piece that ends the content is returned only if
    /// the whole hashes to the digest. A failed check drops the blob from
    /// the cache and fails with [`Error::Corrupt`]; callers that already
    /// sent part of the body must abort the response, never end it cleanly,
    /// so that a client never takes wrong bytes for a complete success.
    pub fn next_chunk(&mut self, out: &mut Vec<u8>) -> Result<bool, Error> {
        out.clear();
        if self.pos >= self.loc.logical {
            return Ok(false);
        }
        let pos = self.pos;
        let self_checked = self.decode_at(pos, out, None)?;
        self.account(pos, out, self_checked)?;
        self.pos += out.len() as u64;
        Ok(true)
    }

    /// Makes sure the whole content is right, for a ranged read about to
    /// deliver its last piece before the end of the blob: without a per-chunk
    /// checksum, only the digest of everything proves the range.
    pub fn verify_all(&mut self) -> Result<(), Error> {
        if self.digest.is_none() {
            // Every piece read so far carried its own checksum.
            return Ok(());
        }
        self.hash_through(self.loc.logical)
    }

    /// Starts reading the stored form from casblob chunk `chunk` on:
    /// [`Blob::next_stored`] then returns the stored zstd frames, and from
    /// chunk 0 the casblob header first, which makes the whole file.
    pub fn seek_stored(&mut self, chunk: usize) {
        self.stored_next = Some((chunk, chunk == 0));
    }

    /// Replaces `out` with the next piece of the stored form (the header, or
    /// one stored chunk); false at the end. Each chunk is decoded before it
    /// is returned, so pass-through reads are verified like [`Blob::next_chunk`].
    pub fn next_stored(&mut self, out: &mut Vec<u8>) -> Result<bool, Error> {
        out.clear();
        let Some(h) = self.header.clone() else {
            return Ok(false);
        };
        let Some((i, with_header)) = self.stored_next else {
            return Ok(false);
        };
        if with_header {
            out.resize(h.offsets[0] as usize, 0);
            self.read_stored_at(0, out)?;
            self.stored_next = Some((i, false));
            return Ok(true);
        }
        if i >= h.num_chunks() {
            self.stored_next = None;
            return Ok(false);
        }
        let (start, end) = (h.offsets[i], h.offsets[i + 1]);
        out.resize((end - start) as usize, 0);
        if self.read_stored_at(start, out)? != out.len() {
            return Err(self.corrupt(format!("short read of chunk {i}")));
        }
        let mut decoded = Vec::new();
        let at = i as u64 * h.chunk_size as u64;
        let self_checked = self.decode_at(at, &mut decoded, Some(out))?;
        self.account(at, &decoded, self_checked)?;
        self.stored_next = Some((i + 1, false));
        Ok(true)
    }

    /// Feeds content `[at, at + piece.len())` to the digest check when one
    /// is needed, catching up from where it stopped; verifies at the end.
    fn account(&mut self, at: u64, piece: &[u8], self_checked: bool) -> Result<(), Error> {
        if self.loc.kind != crate::Kind::Cas {
            return Ok(()); // an action result's key is not its content's digest
        }
        if !self_checked && self.digest.is_none() {
            self.digest = Some((Sha256::new(), 0));
        }
        if self.digest.is_none() {
            return Ok(());
        }
        self.hash_through(at)?;
        let done = match &mut self.digest {
            Some((h, upto)) if *upto == at => {
                crate::turns::step(piece.len(), || h.update(piece));
                *upto += piece.len() as u64;
                *upto == self.loc.logical
            }
            _ => false,
        };
        if done {
            self.check_digest()?;
        }
        Ok(())
    }

    /// Hashes content up to `target` (reading what was not hashed yet).
    fn hash_through(&mut self, target: u64) -> Result<(), Error> {
        if self.digest.is_none() {
            self.digest = Some((Sha256::new(), 0));
        }
        let mut buf = Vec::new();
        loop {
            let upto = self.digest.as_ref().map(|d| d.1).unwrap_or(target);
            if upto >= target {
                break;
            }
            self.decode_at(upto, &mut buf, None)?;
            if buf.is_empty() {
                return Err(self.corrupt(format!("no content at {upto}")));
            }
            buf.truncate((target - upto).min(buf.len() as u64) as usize);
            if let Some((h, u)) = &mut self.digest {
                crate::turns::step(buf.len(), || h.update(&buf));
                *u += buf.len() as u64;
            }
        }
        if target == self.loc.logical {
            self.check_digest()?;
        }
        Ok(())
    }

    fn check_digest(&mut self) -> Result<(), Error> {
        let Some((h, upto)) = self.digest.take() else {
            return Ok(());
        };
        if upto != self.loc.logical {
            self.digest = Some((h, upto));
            return Ok(());
        }
        let actual: [u8; 32] = h.finalize().into();
        if actual != self.loc.hash.0 {
            return Err(self.corrupt(format!(
                "content hashes to {}, not to its digest",
                crate::Hash(actual)
            )));
        }
        // Verified once; keep a finished marker so later pieces pass.
        self.digest = Some((Sha256::new(), u64::MAX));
        Ok(())
    }

    /// Decodes the content piece starting at `pos` (to the end of its
    /// chunk) into `out`, from `stored` if the caller already read the
    /// chunk's stored bytes. Returns whether the piece proved itself (a zstd
    /// frame with a content checksum). Format failures drop the blob.
    fn decode_at(
        &mut self,
        pos: u64,
        out: &mut Vec<u8>,
        stored: Option<&[u8]>,
    ) -> Result<bool, Error> {
        out.clear();
        let Some(h) = self.header.take() else {
            let n = (self.loc.logical - pos).min(CHUNK_SIZE as u64) as usize;
            out.resize(n, 0);
            let read = self.read_stored_at(pos, out)?;
            if read != n {
                return Err(self.corrupt(format!("short read at {pos}")));
            }
            return Ok(false);
        };
        let r = self.decode_casblob_at(&h, pos, out, stored);
        self.header = Some(h);
        r
    }

    fn decode_casblob_at(
        &mut self,
        h: &Header,
        pos: u64,
        out: &mut Vec<u8>,
        stored: Option<&[u8]>,
    ) -> Result<bool, Error> {
        let i = (pos / h.chunk_size as u64) as usize;
        let skip = (pos % h.chunk_size as u64) as usize;
        if i >= h.num_chunks() {
            return Ok(false);
        }
        let (start, end) = (h.offsets[i] as usize, h.offsets[i + 1] as usize);
        let owned;
        let bytes: &[u8] = match (stored, &self.whole) {
            (Some(s), _) => s,
            (None, Some(w)) => &w[start..end],
            (None, None) => {
                let mut buf = vec![0u8; end - start];
                if self.read_stored_at(start as u64, &mut buf)? != buf.len() {
                    return Err(self.corrupt(format!("short read of chunk {i}")));
                }
                owned = buf;
                &owned
            }
        };
        // Frame header descriptor, bit 2: the frame ends in a checksum of
        // its content, which the decoder verifies.
        let checked = h.compression == Compression::Zstd && bytes.len() > 4 && bytes[4] & 0x04 != 0;
        // The chunk's decoded length, which is what decoding costs.
        let len =
            (self.loc.logical.saturating_sub(pos - skip as u64)).min(h.chunk_size as u64) as usize;
        let decoded = crate::turns::step(len, || {
            with_decompressor(|d| h.decode_chunk(i, bytes, d, out))
        })
        .map_err(|e| Error::io(self.cache.path_of(&self.loc), e))?;
        if let Err(e) = decoded {
            return Err(self.corrupt(e.to_string()));
        }
        if skip > 0 {
            out.drain(..skip.min(out.len()));
        }
        Ok(checked)
    }

    fn corrupt(&self, reason: String) -> Error {
        self.cache.discard(&self.loc, &reason);
        Error::Corrupt {
            path: self.cache.path_of(&self.loc),
            reason,
        }
    }
}
