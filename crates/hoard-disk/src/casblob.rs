//! bazel-remote's "casblob" file format for compressed CAS entries.
//!
//! ```text
//! offset  field (little-endian)
//! 0       u32  0x184D2A50: a zstd skippable-frame magic
//! 4       u32  frame size = 21 + 8 * num_offsets
//! 8       i64  logical (uncompressed) size
//! 16      u8   compression: 0 identity, 1 zstd
//! 17      u32  chunk size (1 MiB)
//! 21      i64  num_offsets = num_chunks + 1
//! 29      num_offsets x i64: absolute offset of each chunk, then the file size
//! ...     the chunks, each an independent zstd frame of one chunk
//! ```
//!
//! Because the header is a skippable frame, a whole casblob file is a valid
//! zstd stream: it is served verbatim to clients that accept zstd and stored
//! verbatim in the bucket. Independent chunks let a reader start at any
//! 1 MiB boundary.

use std::io;

/// zstd skippable frame magic used as the casblob header tag.
pub const MAGIC: u32 = 0x184D_2A50;
/// Uncompressed bytes per chunk.
pub const CHUNK_SIZE: usize = 1 << 20;
const FIXED_HEADER: usize = 29;

/// How the chunks of a casblob are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Identity,
    Zstd,
}

/// A parsed and validated casblob header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub logical_size: u64,
    pub compression: Compression,
    pub chunk_size: usize,
    /// Chunk start offsets followed by the file length; strictly increasing.
    pub offsets: Vec<u64>,
}

/// Why a file is not a well-formed casblob.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("casblob header: {0}")]
    Header(String),
    #[error("casblob chunk {chunk}: {reason}")]
    Chunk { chunk: usize, reason: String },
    #[error("casblob I/O: {0}")]
    Io(#[from] io::Error),
}

fn bad(msg: impl Into<String>) -> FormatError {
    FormatError::Header(msg.into())
}

/// The logical size a casblob's fixed header declares, if `fixed` starts
/// with one.
pub fn logical_size_of(fixed: &[u8]) -> Option<u64> {
    if fixed.len() < FIXED_HEADER || u32_at(fixed, 0) != MAGIC {
        return None;
    }
    u64::try_from(i64_at(fixed, 8)).ok()
}

/// Number of chunks a blob of `logical_size` bytes is split into.
pub fn num_chunks(logical_size: u64, chunk_size: usize) -> usize {
    logical_size.div_ceil(chunk_size as u64) as usize
}

/// Length of the header for a blob of `logical_size` bytes.
pub fn header_len(logical_size: u64) -> usize {
    FIXED_HEADER + 8 * (num_chunks(logical_size, CHUNK_SIZE) + 1)
}

impl Header {
    /// Bytes before the offset table; enough to learn the header's length.
    pub const FIXED_LEN: usize = FIXED_HEADER;

    /// Total header length as declared by the fixed part, or an error if the
    /// fixed part is malformed. Bounded by `file_len` so a corrupt count can
    /// never make the caller allocate more than the file holds.
    pub fn declared_len(fixed: &[u8], file_len: u64) -> Result<usize, FormatError> {
        if fixed.len() < FIXED_HEADER {
            return Err(bad(format!("file of {} bytes is too short", fixed.len())));
        }
        if u32_at(fixed, 0) != MAGIC {
            return Err(bad(format!("bad magic {:#x}", u32_at(fixed, 0))));
        }
        let num_offsets = i64_at(fixed, 21);
        if num_offsets < 1 || (num_offsets as u64).saturating_mul(8) > file_len {
            return Err(bad(format!("implausible offset count {num_offsets}")));
        }
        let frame_size = u32_at(fixed, 4) as u64;
        if frame_size != 21 + 8 * num_offsets as u64 {
            return Err(bad(format!(
                "frame size {frame_size} does not match {num_offsets} offsets"
            )));
        }
        Ok(FIXED_HEADER + 8 * num_offsets as usize)
    }

    /// Parses and validates a complete header against the file's length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let len = Self::declared_len(buf, file_len)?;
        if buf.len() < len {
            return Err(bad("truncated offset table"));
        }
        let logical = i64_at(buf, 8);
        if logical < 0 {
            return Err(bad(format!("negative logical size {logical}")));
        }
        let compression = match buf[16] {
            0 => Compression::Identity,
            1 => Compression::Zstd,
            other => return Err(bad(format!("unknown compression {other}"))),
        };
        let chunk_size = u32_at(buf, 17) as usize;
        if chunk_size == 0 {
            return Err(bad("zero chunk size"));
        }
        let n = (len - FIXED_HEADER) / 8;
        if n != num_chunks(logical as u64, chunk_size) + 1 {
            return Err(bad(format!(
                "{n} offsets cannot describe {logical} bytes in chunks of {chunk_size}"
            )));
        }
        let mut offsets = Vec::with_capacity(n);
        let mut prev: Option<u64> = None;
        for i in 0..n {
            let off = i64_at(buf, FIXED_HEADER + 8 * i);
            if off < len as i64 {
                return Err(bad(format!("offset {off} points into the header")));
            }
            let off = off as u64;
            if let Some(p) = prev
                && off <= p
            {
                return Err(bad(format!("offsets should increase: {p} -> {off}")));
            }
            prev = Some(off);
            offsets.push(off);
        }
        if offsets.last().copied() != Some(file_len) {
            return Err(bad(format!(
                "last offset {:?} is not the file length {file_len}",
                offsets.last()
            )));
        }
        Ok(Header {
            logical_size: logical as u64,
            compression,
            chunk_size,
            offsets,
        })
    }

    pub fn num_chunks(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Uncompressed length of chunk `i`.
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = (i * self.chunk_size) as u64;
        (self.logical_size - start).min(self.chunk_size as u64) as usize
    }

    /// Serializes a header for `logical_size` bytes with the given offsets.
    pub fn encode(logical_size: u64, offsets: &[u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_HEADER + 8 * offsets.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&((21 + 8 * offsets.len()) as u32).to_le_bytes());
        out.extend_from_slice(&(logical_size as i64).to_le_bytes());
        out.push(1);
        out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&(offsets.len() as i64).to_le_bytes());
        for off in offsets {
            out.extend_from_slice(&(*off as i64).to_le_bytes());
        }
        out
    }

    /// Decodes chunk `i` from its stored bytes into `out` (cleared first),
    /// checking that it yields exactly the expected number of bytes.
    pub fn decode_chunk(
        &self,
        i: usize,
        stored: &[u8],
        decompressor: &mut zstd::bulk::Decompressor<'static>,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let want = self.chunk_len(i);
        out.clear();
        match self.compression {
            Compression::Identity => {
                if stored.len() != want {
                    return Err(FormatError::Chunk {
                        chunk: i,
                        reason: format!("{} stored bytes, expected {want}", stored.len()),
                    });
                }
                out.extend_from_slice(stored);
            }
            Compression::Zstd => {
                out.reserve(want);
                let n = decompressor
                    .decompress_to_buffer(stored, out)
                    .map_err(|e| FormatError::Chunk {
                        chunk: i,
                        reason: e.to_string(),
                    })?;
                if n != want {
                    return Err(FormatError::Chunk {
                        chunk: i,
                        reason: format!("decompressed to {n} bytes, expected {want}"),
                    });
                }
            }
        }
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(data: &[u8]) -> Vec<u8> {
        let hl = header_len(data.len() as u64);
        let mut body = Vec::new();
        let mut offsets = vec![];
        for chunk in data.chunks(CHUNK_SIZE) {
            offsets.push((hl + body.len()) as u64);
            body.extend(zstd::bulk::compress(chunk, 1).unwrap());
        }
        offsets.push((hl + body.len()) as u64);
        let mut file = Header::encode(data.len() as u64, &offsets);
        file.extend(body);
        file
    }

    #[test]
    fn a_casblob_is_a_valid_zstd_stream_and_parses() {
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let file = build(&data);
        assert_eq!(zstd::decode_all(&file[..]).unwrap(), data);
        let h = Header::parse(&file, file.len() as u64).unwrap();
        assert_eq!(h.num_chunks(), 3);
        assert_eq!(h.chunk_len(2), 17);
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut out = Vec::new();
        h.decode_chunk(
            2,
            &file[h.offsets[2] as usize..h.offsets[3] as usize],
            &mut d,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, &data[2 * CHUNK_SIZE..]);
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let file = build(b"hello world");
        let len = file.len() as u64;
        assert!(Header::parse(&file, len + 1).is_err(), "wrong file length");
        let mut f = file.clone();
        f[0] ^= 1;
        assert!(Header::parse(&f, len).is_err(), "bad magic");
        let mut f = file.clone();
        f[21] = 200;
        assert!(Header::parse(&f, len).is_err(), "bad count");
        let mut f = file.clone();
        f[11] = 99;
        assert!(Header::parse(&f, len).is_err(), "size vs offsets");
        assert!(Header::parse(&file[..20], len).is_err(), "short");
    }
}
