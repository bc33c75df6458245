//! ByteStream resource names:
//!
//! ```text
//! read:  {instance}/blobs/{hash}/{size}
//!        {instance}/compressed-blobs/zstd/{hash}/{size}
//! write: {instance}/uploads/{uuid}/blobs/{hash}/{size}[/{metadata}]
//!        {instance}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}[/{metadata}]
//! ```
//!
//! The instance may have several segments. Every part is validated before
//! use: the instance as a namespace name, the hash as 64 lower-case hex
//! characters, the size as a decimal number.

use hoard_disk::Hash;
use tonic::Status;

/// A parsed blob resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobResource {
    pub instance: String,
    pub hash: Hash,
    pub size: u64,
    /// `compressed-blobs/zstd/...`
    pub compressed: bool,
    /// The upload's UUID segment (writes only).
    pub upload_id: Option<String>,
}

impl BlobResource {
    /// The name identifying one upload: everything but trailing metadata.
    pub fn upload_key(&self) -> String {
        format!(
            "{}/uploads/{}/{}/{}/{}",
            self.instance,
            self.upload_id.as_deref().unwrap_or(""),
            if self.compressed {
                "compressed-blobs/zstd"
            } else {
                "blobs"
            },
            self.hash,
            self.size
        )
    }
}

fn bad(name: &str, why: &str) -> Status {
    // The name is the client's and may be any length: only its start is
    // echoed.
    let name = super::codes::clip_to(name, 200);
    Status::invalid_argument(super::codes::clip(&format!(
        "invalid resource name {name:?}: {why}"
    )))
}

/// The error for a name whose instance part holds a reserved word.
fn reserved(name: &str, instance_segs: &[&str]) -> Status {
    let instance = instance_segs.join("/");
    match hoard_disk::validate_namespace(&instance) {
        Err(e) => bad(name, &e.to_string()),
        Ok(()) => bad(name, "the instance name holds a reserved word"),
    }
}

fn instance_of(name: &str, segs: &[&str]) -> Result<String, Status> {
    let instance = segs.join("/");
    if !instance.is_empty() {
        hoard_disk::validate_namespace(&instance).map_err(|e| bad(name, &e.to_string()))?;
    }
    Ok(instance)
}

/// Parses `{blobs|compressed-blobs/zstd}/{hash}/{size}` at `segs[0..]`,
/// returning the resource fields and how many segments were used.
fn parse_blob_part(name: &str, segs: &[&str]) -> Result<(bool, Hash, u64, usize), Status> {
    let (compressed, rest, used) = match segs.first() {
        Some(&"blobs") => (false, &segs[1..], 1),
        Some(&"compressed-blobs") => match segs.get(1) {
            Some(&"zstd") => (true, &segs[2..], 2),
            Some(other) => {
                return Err(bad(
                    name,
                    &format!("unsupported compressor {other:?}; this server supports zstd"),
                ));
            }
            None => return Err(bad(name, "missing compressor")),
        },
        _ => return Err(bad(name, "expected blobs/ or compressed-blobs/")),
    };
    let (hash_s, size_s) = match rest {
        [h, s, ..] => (*h, *s),
        _ => return Err(bad(name, "expected {hash}/{size}")),
    };
    if hash_s.len() != 64 && hash_s.bytes().all(|c| c.is_ascii_lowercase()) {
        return Err(bad(
            name,
            &format!("unsupported digest function {hash_s:?}; this server uses SHA-256"),
        ));
    }
    let hash = Hash::parse(hash_s).map_err(|e| bad(name, &format!("hash {hash_s:?}: {e}")))?;
    let size = size_s.parse::<u64>().map_err(|_| {
        bad(
            name,
            &format!("size {size_s:?} is not a non-negative integer"),
        )
    })?;
    Ok((compressed, hash, size, used + 2))
}

/// Parses a ReadRequest resource name.
pub fn parse_read(name: &str) -> Result<BlobResource, Status> {
    let segs: Vec<&str> = name.split('/').collect();
    let Some(i) = segs
        .iter()
        .position(|s| *s == "blobs" || *s == "compressed-blobs")
    else {
        return Err(bad(name, "expected {instance}/blobs/{hash}/{size}"));
    };
    // Another keyword later means the first one was part of the instance.
    if segs[i + 1..]
        .iter()
        .any(|s| *s == "blobs" || *s == "compressed-blobs")
    {
        return Err(reserved(name, &segs[..=i]));
    }
    let (compressed, hash, size, used) = parse_blob_part(name, &segs[i..])?;
    if i + used != segs.len() {
        return Err(bad(name, "unexpected trailing segments"));
    }
    Ok(BlobResource {
        instance: instance_of(name, &segs[..i])?,
        hash,
        size,
        compressed,
        upload_id: None,
    })
}

/// Parses a WriteRequest resource name.
pub fn parse_write(name: &str) -> Result<BlobResource, Status> {
    let segs: Vec<&str> = name.split('/').collect();
    let Some(i) = segs.iter().position(|s| *s == "uploads") else {
        return Err(bad(
            name,
            "expected {instance}/uploads/{uuid}/blobs/{hash}/{size}",
        ));
    };
    let id = segs.get(i + 1).copied().unwrap_or("");
    if hoard_disk::RESERVED_WORDS.contains(&id) {
        // `{instance}/uploads/uploads/...`: the instance ends in `uploads`.
        return Err(reserved(name, &segs[..=i]));
    }
    if id.is_empty()
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(bad(name, "the upload id must be a UUID"));
    }
    let (compressed, hash, size, _) = parse_blob_part(name, &segs[i + 2..])?;
    Ok(BlobResource {
        instance: instance_of(name, &segs[..i])?,
        hash,
        size,
        compressed,
        upload_id: Some(id.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn resource_names_parse_and_bad_ones_are_refused() {
        let r = parse_read(&format!("a/b/blobs/{H}/0")).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.size, r.compressed),
            ("a/b", 0, false)
        );
        let r = parse_read(&format!("compressed-blobs/zstd/{H}/12")).unwrap();
        assert!(r.compressed && r.instance.is_empty());
        let w = parse_write(&format!("ci/uploads/3f1c-9a/blobs/{H}/5/meta/data")).unwrap();
        assert_eq!(w.upload_id.as_deref(), Some("3f1c-9a"));
        for bad in [
            format!("../blobs/{H}/1"),
            format!("a//blobs/{H}/1"),
            format!("blobs/{}/1", &H[..10]),
            format!("blobs/{H}/-1"),
            format!("compressed-blobs/gzip/{H}/1"),
            format!("blobs/blake3/{H}/1"),
            format!("blobs/{H}/1/extra"),
        ] {
            assert!(parse_read(&bad).is_err(), "{bad} accepted");
        }
        // Reserved words as instance names fail the same way on both.
        for word in hoard_disk::RESERVED_WORDS {
            let r = parse_read(&format!("{word}/blobs/{H}/1")).unwrap_err();
            let w = parse_write(&format!("{word}/uploads/u-1/blobs/{H}/1")).unwrap_err();
            for e in [r, w] {
                assert!(
                    e.message().contains("reserved word"),
                    "{word}: {}",
                    e.message()
                );
            }
        }
        for bad in [
            format!("uploads//blobs/{H}/1"),
            format!("uploads/x/y/blobs/{H}/1"),
            format!("uploads/../blobs/{H}/1"),
            format!("x/../uploads/u/blobs/{H}/1"),
        ] {
            assert!(parse_write(&bad).is_err(), "{bad} accepted");
        }
    }
}
