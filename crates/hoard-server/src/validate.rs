//! Rules an `ActionResult` must follow before hoard stores it, and the list
//! of CAS blobs it depends on.

use hoard_disk::Hash;
use hoard_proto::reapi::{ActionResult, Digest};

use crate::error::CacheError;

/// A parsed, well-formed digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobDigest {
    pub hash: Hash,
    pub size: u64,
}

impl BlobDigest {
    pub fn is_empty_blob(&self) -> bool {
        self.size == 0
    }
}

/// Parses a REAPI digest: 64 lower-case hex characters and a non-negative
/// size; size 0 only for the empty blob's hash.
pub fn parse_digest(d: &Digest) -> Result<BlobDigest, CacheError> {
    let hash = Hash::parse(&d.hash)
        .map_err(|e| CacheError::invalid(format!("invalid digest hash {:?}: {e}", d.hash)))?;
    if d.size_bytes < 0 {
        return Err(CacheError::invalid(format!(
            "invalid digest {}/{}: negative size",
            d.hash, d.size_bytes
        )));
    }
    if d.size_bytes == 0 && !hash.is_empty_blob() {
        return Err(CacheError::invalid(format!(
            "invalid digest {}/0: only the empty blob has size 0",
            d.hash
        )));
    }
    Ok(BlobDigest {
        hash,
        size: d.size_bytes as u64,
    })
}

fn check_path(what: &str, path: &str) -> Result<(), CacheError> {
    if path.starts_with('/') {
        return Err(CacheError::invalid(format!(
            "invalid ActionResult: {what} path {path:?} is absolute; output paths must be relative"
        )));
    }
    if path.split('/').any(|seg| seg == "..") {
        return Err(CacheError::invalid(format!(
            "invalid ActionResult: {what} path {path:?} contains '..'"
        )));
    }
    Ok(())
}

fn required(what: &str, path: &str, d: &Option<Digest>) -> Result<BlobDigest, CacheError> {
    match d {
        Some(d) => parse_digest(d).map_err(|e| {
            CacheError::invalid(format!(
                "invalid ActionResult: {what} {path:?}: {}",
                e.message
            ))
        }),
        None => Err(CacheError::invalid(format!(
            "invalid ActionResult: {what} {path:?} has no digest"
        ))),
    }
}

/// Checks an action result's paths and digests.
pub fn validate_action_result(ar: &ActionResult) -> Result<(), CacheError> {
    for f in &ar.output_files {
        check_path("output file", &f.path)?;
        required("output file", &f.path, &f.digest)?;
    }
    for d in &ar.output_directories {
        check_path("output directory", &d.path)?;
        required("output directory tree", &d.path, &d.tree_digest)?;
    }
    for s in ar
        .output_symlinks
        .iter()
        .chain(&ar.output_file_symlinks)
        .chain(&ar.output_directory_symlinks)
    {
        check_path("output symlink", &s.path)?;
    }
    for (what, d) in [("stdout", &ar.stdout_digest), ("stderr", &ar.stderr_digest)] {
        if let Some(d) = d {
            parse_digest(d).map_err(|e| {
                CacheError::invalid(format!("invalid ActionResult: {what}: {}", e.message))
            })?;
        }
    }
    Ok(())
}

/// The blobs an action result needs, except the trees' contents.
pub struct References {
    pub files: Vec<BlobDigest>,
    pub trees: Vec<BlobDigest>,
}

/// Lists what `ar` references. Assumes `validate_action_result` passed; a
/// digest that does not parse is reported as an error.
pub fn references(ar: &ActionResult) -> Result<References, CacheError> {
    let mut files = Vec::with_capacity(ar.output_files.len() + 2);
    for f in &ar.output_files {
        files.push(required("output file", &f.path, &f.digest)?);
    }
    for d in [&ar.stdout_digest, &ar.stderr_digest].into_iter().flatten() {
        files.push(parse_digest(d)?);
    }
    let mut trees = Vec::with_capacity(ar.output_directories.len());
    for d in &ar.output_directories {
        trees.push(required("output directory tree", &d.path, &d.tree_digest)?);
    }
    Ok(References { files, trees })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_proto::reapi::OutputFile;

    fn digest(h: &str, s: i64) -> Option<Digest> {
        Some(Digest {
            hash: h.into(),
            size_bytes: s,
        })
    }

    #[test]
    fn absolute_and_dotdot_paths_and_bad_digests_are_refused() {
        let good = "a".repeat(64);
        let mk = |path: &str, d| ActionResult {
            output_files: vec![OutputFile {
                path: path.into(),
                digest: d,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(validate_action_result(&mk("out/a", digest(&good, 3))).is_ok());
        assert!(validate_action_result(&mk("/etc/passwd", digest(&good, 3))).is_err());
        assert!(validate_action_result(&mk("a/../../b", digest(&good, 3))).is_err());
        assert!(validate_action_result(&mk("a", digest(&good.to_uppercase(), 3))).is_err());
        assert!(validate_action_result(&mk("a", digest(&good, -1))).is_err());
        assert!(validate_action_result(&mk("a", digest(&good, 0))).is_err());
        assert!(validate_action_result(&mk("a", None)).is_err());
    }
}
