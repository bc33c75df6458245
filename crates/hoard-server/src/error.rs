//! One classification of failures, mapped once to HTTP status codes (and,
//! later, gRPC codes), so both front ends answer the same way.

use hoard_disk::Error as DiskError;

/// What kind of failure a request met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong: bad path, digest, header or body.
    InvalidArgument,
    /// The blob is larger than allowed.
    TooLarge,
    /// The cache cannot take the blob now.
    NoSpace,
    /// The namespace is not one this daemon serves.
    UnknownNamespace,
    /// The daemon is shutting down.
    Unavailable,
    /// Something on this side failed (disk I/O).
    Internal,
}

/// A failure with a message that names the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CacheError {
    pub kind: ErrorKind,
    pub message: String,
}

impl CacheError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> CacheError {
        CacheError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> CacheError {
        CacheError::new(ErrorKind::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> CacheError {
        CacheError::new(ErrorKind::Internal, message)
    }

    /// The HTTP status for this failure.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            ErrorKind::InvalidArgument | ErrorKind::UnknownNamespace => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::NoSpace => 507,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// A short label for metrics (`reason` of rejected uploads).
    pub fn reason(&self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidArgument => "invalid",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::UnknownNamespace => "unknown_namespace",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl From<DiskError> for CacheError {
    fn from(e: DiskError) -> CacheError {
        let kind = match &e {
            DiskError::DigestMismatch { .. }
            | DiskError::SizeMismatch { .. }
            | DiskError::Namespace(_) => ErrorKind::InvalidArgument,
            DiskError::TooLarge { .. } => ErrorKind::TooLarge,
            DiskError::HardLimit { .. } | DiskError::NoSpace { .. } => ErrorKind::NoSpace,
            DiskError::Io { .. } | DiskError::Corrupt { .. } | DiskError::Locked { .. } => {
                ErrorKind::Internal
            }
        };
        CacheError::new(kind, e.to_string())
    }
}
