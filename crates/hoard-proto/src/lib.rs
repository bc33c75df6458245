//! Wire types and gRPC service stubs of the Remote Execution API, ByteStream
//! and google.rpc, generated from `proto/`.
//!
//! This crate owns nothing but generated code: the protobuf messages (prost),
//! their protojson mapping (pbjson; the HTTP front end uses it for
//! `application/json` action-cache bodies) and the tonic service traits and
//! clients. Validation rules live in `hoard-server`, not here.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod build {
    pub mod bazel {
        pub mod remote {
            pub mod execution {
                pub mod v2 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/build.bazel.remote.execution.v2.rs"
                    ));
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/build.bazel.remote.execution.v2.serde.rs"
                    ));
                }
            }
        }
        pub mod semver {
            include!(concat!(env!("OUT_DIR"), "/build.bazel.semver.rs"));
            include!(concat!(env!("OUT_DIR"), "/build.bazel.semver.serde.rs"));
        }
    }
}

pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        include!(concat!(env!("OUT_DIR"), "/google.rpc.serde.rs"));
    }
    pub mod bytestream {
        include!(concat!(env!("OUT_DIR"), "/google.bytestream.rs"));
    }
}

/// `build.bazel.remote.execution.v2`, the name used throughout hoard.
pub use build::bazel::remote::execution::v2 as reapi;

pub use pbjson_types;
pub use prost;
pub use tonic;
