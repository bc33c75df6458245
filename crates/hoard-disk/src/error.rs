use std::io;
use std::path::PathBuf;

use crate::key::{Hash, NamespaceError};

/// What can go wrong in the disk cache. Every variant names what the caller
/// needs to tell a client or an operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes received do not hash to the digest they were sent under.
    #[error("digest mismatch: expected {expected}/{size}, but the body hashes to {actual}/{size}")]
    DigestMismatch {
        expected: Hash,
        actual: Hash,
        size: u64,
    },
    /// More or fewer bytes arrived than the declared size.
    #[error("size mismatch: expected {expected} bytes, received {received}")]
    SizeMismatch { expected: u64, received: u64 },
    /// The blob can never fit in the cache.
    #[error(
        "blob of {size} bytes is larger than the cache (max_size is {max_size} bytes); raise max_size"
    )]
    TooLarge { size: u64, max_size: u64 },
    /// The blob can never fit in its namespace's quota.
    #[error(
        "blob of {size} bytes is larger than its namespace's quota ({quota} bytes, namespaces.max_size)"
    )]
    OverQuota { size: u64, quota: u64 },
    /// Storing the blob now would pass `max_size_hard_limit`.
    #[error(
        "out of cache space: {needed} more bytes would pass max_size_hard_limit ({limit} bytes); try again later"
    )]
    HardLimit { needed: u64, limit: u64 },
    /// The filesystem is full.
    #[error("no space left on the cache device (writing {path})")]
    NoSpace { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// A stored file failed its format checks; it has been dropped.
    #[error("stored blob {path} is corrupt and was dropped from the cache: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// Another process holds the cache directory.
    #[error("cache directory {dir} is in use by another process (lock file .hoard.lock)")]
    Locked { dir: PathBuf },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        let path = path.into();
        if source.raw_os_error() == Some(28) || source.kind() == io::ErrorKind::StorageFull {
            Error::NoSpace { path }
        } else {
            Error::Io { path, source }
        }
    }

    /// True when the failure is the cache being full rather than the request
    /// being wrong or the machine failing.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::NoSpace { .. } | Error::HardLimit { .. })
    }
}
