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
fn every_metric_the_dashboards_and_alerts_use_is_exported_and_every_panel_has_data() {
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
        "--accounting.flush_interval=1s".into(),
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
    let ar = hoard_proto::reapi::ActionResult {
        stdout_digest: Some(hoard_proto::reapi::Digest {
            hash: sha256_hex(b"deploy"),
            size_bytes: 6,
        }),
        ..Default::default()
    };
    let ac = format!("/ac/{}", sha256_hex(b"deploy action"));
    assert_eq!(h.put(&ac, &prost::Message::encode_to_vec(&ar)).status, 200);
    assert_eq!(h.get(&ac).status, 200);
    assert_eq!(
        h.get(&format!("/ac/{}", sha256_hex(b"no action"))).status,
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

    // A real Prometheus scrapes this hoard; every dashboard expression is
    // evaluated through its HTTP API and must return data.
    let prom = Prometheus::start(&tmp.path().join("prom"), h.addr);
    let exprs = dashboard_expressions();
    assert!(exprs.len() >= 28, "{} expressions", exprs.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut empty: Vec<(String, String)>;
    loop {
        // Keep traffic flowing so rates have samples.
        let _ = h.get(&format!("/cas/{}", sha256_hex(b"deploy")));
        let _ = h.get(&ac);
        empty = exprs
            .iter()
            .filter(|(_, e)| prom.query(e).is_empty())
            .cloned()
            .collect();
        if empty.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    println!(
        "prometheus: {} panel expressions, {} with data, empty: {empty:?}",
        exprs.len(),
        exprs.len() - empty.len()
    );
    assert!(
        empty.is_empty(),
        "dashboard expressions without data: {empty:?}"
    );
}

/// (panel title, expression) of every target of every dashboard panel.
fn dashboard_expressions() -> Vec<(String, String)> {
    let d: serde_json::Value = serde_json::from_str(&deploy("grafana/hoard.json")).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
    }
    out
}

/// Prometheus from Debian, scraping one target every second.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, target: std::net::SocketAddr) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let conf = dir.join("prometheus.yml");
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: hoard\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = crate::support::free_port();
        // Waited for in drop, or below when it never gets ready.
        #[allow(clippy::zombie_processes)]
        let mut child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is missing: the README's test command installs Debian's prometheus package");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok()
                && crate::support::request(addr, "GET", "/-/ready", &[], b"").status == 200
            {
                return Prometheus { child, addr };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("prometheus did not become ready on {addr}");
    }

    /// The result vector of an instant query (empty: no data).
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let r = crate::support::request(self.addr, "GET", &path, &[], b"");
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{expr}: {e}: {}", r.text()));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool is missing: the README's test command installs Debian's prometheus package");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "promtool {}: {}",
            args.join(" "),
            text.trim().replace('\n', " ")
        );
        assert!(out.status.success(), "promtool {args:?}: {text}");
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = deploy("systemd/hoard.service");
    // verify checks that ExecStart's binary exists: point it at the build.
    let bin = crate::support::hoard_bin();
    assert!(unit.contains("ExecStart=/usr/local/bin/hoard "));
    let local = unit.replace("/usr/local/bin/hoard", &bin.display().to_string());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("hoard.service");
    std::fs::write(&path, local).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is missing: the README's test command installs systemd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
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
