//! The header of a stored casblob file, read at every open: whatever the
//! bytes (a damaged file, another program's file), parsing must answer an
//! error or a header whose chunks lie inside the file.
#![no_main]

use hoard_disk::casblob::{Header, logical_size_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&data[..8]);
    // Any file length up to 1 TiB, with the header bytes from the input.
    let file_len = u64::from_le_bytes(len) % (1 << 40);
    let buf = &data[8..];
    let _ = logical_size_of(buf);
    let _ = Header::declared_len(buf, file_len);
    if let Ok(h) = Header::parse(buf, file_len) {
        let mut total = 0u64;
        for i in 0..h.num_chunks().min(1 << 16) {
            total += h.chunk_len(i) as u64;
        }
        if h.num_chunks() <= 1 << 16 {
            assert_eq!(total, h.logical_size);
        }
        // Decoding any stored bytes as a chunk fails cleanly or yields
        // exactly the chunk's length.
        if h.num_chunks() > 0 {
            let Ok(mut d) = zstd::bulk::Decompressor::new() else {
                return;
            };
            let mut out = Vec::new();
            if h.chunk_len(0) <= 1 << 20 && h.decode_chunk(0, buf, &mut d, &mut out).is_ok() {
                assert_eq!(out.len(), h.chunk_len(0));
            }
        }
    }
});
