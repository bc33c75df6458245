//! hoard-server: the front ends of hoard and the cache facade they share.
//!
//! * [`cache`]: the facade. Every rule about what may be stored and served
//!   (namespaces, the empty blob, size limits, digest verification, action
//!   result validation and completeness) lives there, once.
//! * [`http`]: the bazel-remote-compatible HTTP API over hyper.
//! * [`grpc`]: REAPI v2, ByteStream and health over tonic.
//! * [`metrics`], [`access_log`]: what operators see.
//!
//! This crate does no disk I/O of its own; it calls `hoard-disk`.

pub mod access_log;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod error;
pub mod grpc;
pub mod hot;
pub mod http;
pub mod lanes;
pub mod listener;
pub mod log_sink;
pub mod metrics;
pub mod pace;
pub mod tls;
pub mod validate;

pub use cache::{Cache, Encoding, Found, InstanceNames, Limits, NamespacePolicy, Upload};
pub use error::{CacheError, ErrorKind};
pub use metrics::Metrics;
