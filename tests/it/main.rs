//! End-to-end tests of the `hoard` binary. They start real processes on
//! 127.0.0.1 (hoard itself, Bazel) and fail, never skip, when a part is
//! missing: run them through the README's test command, which installs
//! everything.

mod accounting;
mod auth;
mod bazel;
mod campaign;
mod ccache;
mod clickhouse;
mod convergence;
mod deploy;
mod grpc;
mod hostile;
mod http;
mod lifecycle;
mod namespaces;
mod rules;
mod s3;
mod support;
mod switching;
mod tls;
mod upload;
