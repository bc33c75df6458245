//! Wire types of the Remote Execution API, generated from `proto/`.
//!
//! This crate owns nothing but generated code: the protobuf messages (via
//! prost) and their protojson mapping (via pbjson), which the HTTP front end
//! uses for `application/json` action-cache bodies. Validation rules live in
//! `hoard-server`, not here.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `build.bazel.remote.execution.v2`.
pub mod reapi {
    include!(concat!(
        env!("OUT_DIR"),
        "/build.bazel.remote.execution.v2.rs"
    ));
    include!(concat!(
        env!("OUT_DIR"),
        "/build.bazel.remote.execution.v2.serde.rs"
    ));
}

pub use pbjson_types;
pub use prost;
