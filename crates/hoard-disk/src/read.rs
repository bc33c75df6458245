//! Reading a committed blob, with format checks that turn corruption into a
//! miss instead of a bad body.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
    pos: u64,
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
    /// many were read (0 at the end).
    pub fn read_stored_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
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

    /// Where stored chunk `i` starts in the file, for casblobs. Each chunk
    /// is an independent zstd frame, so a zstd stream of the content from
    /// chunk `i` on is the file from this offset on.
    pub fn stored_offset_of_chunk(&self, i: usize) -> Option<u64> {
        let h = self.header.as_ref()?;
        (i < h.num_chunks()).then(|| h.offsets[i])
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
    /// returns false at the end. A corrupt chunk drops the blob from the
    /// cache and fails with [`Error::Corrupt`]; callers that already sent
    /// part of the body must abort the response, never end it cleanly.
    pub fn next_chunk(&mut self, out: &mut Vec<u8>) -> Result<bool, Error> {
        out.clear();
        if self.pos >= self.loc.logical {
            return Ok(false);
        }
        match self.header.take() {
            None => {
                let n = (self.loc.logical - self.pos).min(CHUNK_SIZE as u64) as usize;
                out.resize(n, 0);
                let read = self.read_stored_at(self.pos, out)?;
                if read != n {
                    return Err(self.corrupt(format!("short read at {}", self.pos)));
                }
                self.pos += n as u64;
                Ok(true)
            }
            Some(h) => {
                let r = self.next_casblob_chunk(&h, out);
                self.header = Some(h);
                r.map(|()| true)
            }
        }
    }

    fn next_casblob_chunk(&mut self, h: &Header, out: &mut Vec<u8>) -> Result<(), Error> {
        let i = (self.pos / h.chunk_size as u64) as usize;
        let skip = (self.pos % h.chunk_size as u64) as usize;
        let (start, end) = (h.offsets[i] as usize, h.offsets[i + 1] as usize);
        let owned;
        let stored: &[u8] = match &self.whole {
            Some(w) => &w[start..end],
            None => {
                let mut buf = vec![0u8; end - start];
                self.read_stored_at(start as u64, &mut buf)?;
                owned = buf;
                &owned
            }
        };
        let decoded = with_decompressor(|d| h.decode_chunk(i, stored, d, out))
            .map_err(|e| Error::io(self.cache.path_of(&self.loc), e))?;
        if let Err(e) = decoded {
            return Err(self.corrupt(e.to_string()));
        }
        if skip > 0 {
            out.drain(..skip);
        }
        self.pos += out.len() as u64;
        Ok(())
    }

    fn corrupt(&self, reason: String) -> Error {
        self.cache.discard(&self.loc, &reason);
        Error::Corrupt {
            path: self.cache.path_of(&self.loc),
            reason,
        }
    }
}
