//! One classification of failures, mapped here, once, to HTTP status codes
//! and gRPC codes, so both front ends answer the same way.

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
    /// No memory for the request within the budget's wait; retry.
    Busy,
    /// The client stopped sending (or reading) for longer than allowed.
    Timeout,
    /// No credentials, or wrong ones, where they are required.
    Unauthenticated,
    /// The identity may not use what the request names.
    PermissionDenied,
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
            ErrorKind::Unavailable | ErrorKind::Busy => 503,
            ErrorKind::Timeout => 408,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::Internal => 500,
        }
    }

    /// The gRPC code for this failure. A blob too large is a bad request
    /// in REAPI terms (INVALID_ARGUMENT, as bazel-remote answers); a full
    /// cache is RESOURCE_EXHAUSTED.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self.kind {
            ErrorKind::InvalidArgument | ErrorKind::TooLarge | ErrorKind::UnknownNamespace => {
                Code::InvalidArgument
            }
            ErrorKind::NoSpace => Code::ResourceExhausted,
            ErrorKind::Unavailable | ErrorKind::Busy => Code::Unavailable,
            ErrorKind::Timeout => Code::DeadlineExceeded,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::Internal => Code::Internal,
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
            ErrorKind::Busy => "busy",
            ErrorKind::Timeout => "client_timeout",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Internal => "internal",
        }
    }
}

impl From<DiskError> for CacheError {
    /// What a client is told never names a server path: errors that carry
    /// one are logged here in full and answered with a plain message.
    fn from(e: DiskError) -> CacheError {
        let (kind, message) = match &e {
            DiskError::DigestMismatch { .. }
            | DiskError::SizeMismatch { .. }
            | DiskError::Namespace(_) => (ErrorKind::InvalidArgument, e.to_string()),
            DiskError::TooLarge { .. } | DiskError::OverQuota { .. } => {
                (ErrorKind::TooLarge, e.to_string())
            }
            DiskError::HardLimit { .. } => (ErrorKind::NoSpace, e.to_string()),
            DiskError::NoSpace { .. } => (
                ErrorKind::NoSpace,
                "no space left on the cache device; try again later".to_string(),
            ),
            DiskError::Io { .. } | DiskError::Locked { .. } => {
                tracing::error!(error = %e, "cache I/O failed");
                (
                    ErrorKind::Internal,
                    "I/O error in the cache; the server log has the details".to_string(),
                )
            }
            DiskError::Corrupt { .. } => {
                tracing::warn!(error = %e, "corrupt cache file");
                (
                    ErrorKind::Internal,
                    "a stored blob was corrupt and has been dropped".to_string(),
                )
            }
        };
        CacheError::new(kind, message)
    }
}
