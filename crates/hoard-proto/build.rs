//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! hoard never needs a system `protoc`.

use std::path::PathBuf;

use prost::Message as _;

const FILES: &[&str] = &[
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/semver/semver.proto",
    "google/bytestream/bytestream.proto",
    "google/rpc/code.proto",
    "google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let paths: Vec<PathBuf> = FILES.iter().map(|f| root.join(f)).collect();
    let fds = protox::compile(&paths, [&root])?;
    let descriptors = fds.encode_to_vec();

    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        .bytes(["."])
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".build", ".google.rpc"])?;

    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
