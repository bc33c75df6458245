//! The operator artifacts in deploy/ stay true to what hoard exports and
//! accepts.

use std::collections::BTreeSet;
use std::path::Path;

use crate::clickhouse::ClickHouse;
use crate::s3::{Bucket, Moto};
use crate::support::{Hoard, sha256_hex};

fn deploy(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(path),
    )
    .unwrap()
}

/// Metric names an expression mentions (hoard's prefixes only).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_lowercase()
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_lowercase() || bytes[i].is_ascii_digit() || bytes[i] == b'_')
            {
                i += 1;
            }
            let word = &text[start..i];
            if [
                "bazel_remote_",
                "bazelre_",
                "hoard_",
                "http_request_",
                "grpc_server_",
            ]
            .iter()
            .any(|p| word.starts_with(p))
            {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_metric_the_dashboards_and_alerts_use_is_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let ch = ClickHouse::start(&tmp.path().join("ch"));
    let moto = Moto::start();
    Bucket::new(&moto.endpoint(), "deploy").create();
    let args = [
        format!("--s3.endpoint={}", moto.endpoint()),
        "--s3.disable_ssl".into(),
        "--s3.bucket=deploy".into(),
        "--s3.access_key_id=AK".into(),
        "--s3.secret_access_key=SK".into(),
        "--host_id=host-deploy".into(),
        format!("--accounting.clickhouse_url={}", ch.url()),
        "--drift.interval=1s".into(),
        "--max_size_hard_limit=20".into(),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Hoard::start(&tmp.path().join("c"), &a);
    h.wait_ready();
    // Exercise every path once so labelled series exist.
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(b"deploy")), b"deploy")
            .status,
        200
    );
    assert_eq!(
        h.get(&format!("/cas/{}", sha256_hex(b"deploy"))).status,
        200
    );
    assert_eq!(
        h.get(&format!("/cas/{}", sha256_hex(b"absent"))).status,
        404
    );
    let grpc = h.grpc.unwrap();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
        let mut cas = hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(ch);
        cas.find_missing_blobs(hoard_proto::reapi::FindMissingBlobsRequest {
            blob_digests: vec![hoard_proto::reapi::Digest { hash: sha256_hex(b"elsewhere"), size_bytes: 9 }],
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let mut exported = String::new();
    for _ in 0..50 {
        exported = h.get("/metrics").text();
        if exported.contains("bazelre_cache_storage_drift_percent") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let exported_names: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    let mut used = names_in(&deploy("grafana/hoard.json"));
    used.extend(names_in(&deploy("prometheus/alerts.yml")));
    assert!(used.len() > 20, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported_names.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "used in deploy/ but not exported: {missing:?}"
    );
}

#[test]
fn the_example_configuration_is_accepted() {
    let out = std::process::Command::new(crate::support::hoard_bin())
        .args([
            "drift",
            &format!(
                "--config_file={}/../deploy/hoard.yaml",
                env!("CARGO_MANIFEST_DIR")
            ),
        ])
        .args([
            "--accounting.clickhouse_url=http://127.0.0.1:9",
            "--s3.endpoint=127.0.0.1:9",
            "--s3.read_timeout=1s",
        ])
        .output()
        .unwrap();
    // The configuration parses; the unreachable endpoints then fail the
    // command with its own error (exit 2), not a configuration error.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("invalid configuration"), "{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
}
