//! Storage accounting against a real ClickHouse: the footprint the table
//! reports equals what the bucket holds, through outages, restarts and lost
//! acknowledgements.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::clickhouse::{ClickHouse, LosingProxy};
use crate::s3::{Bucket, Moto};
use crate::support::{Hoard, noise, sha256_hex};

fn args(moto: &Moto, bucket: &str, host: &str, ch_url: &str) -> Vec<String> {
    vec![
        format!("--s3.endpoint={}", moto.endpoint()),
        "--s3.disable_ssl".into(),
        format!("--s3.bucket={bucket}"),
        "--s3.access_key_id=AK".into(),
        "--s3.secret_access_key=SK".into(),
        format!("--host_id={host}"),
        "--grpc_address=none".into(),
        format!("--accounting.clickhouse_url={ch_url}"),
        "--accounting.flush_interval=1s".into(),
    ]
}

fn start(dir: &std::path::Path, a: &[String]) -> Hoard {
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let h = Hoard::start(dir, &a);
    h.wait_ready();
    h
}

fn metric(h: &Hoard, name: &str) -> f64 {
    h.get("/metrics")
        .text()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn wait_uploads(h: &Hoard) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(h, "hoard_upload_outcomes_total") != metric(h, "hoard_upload_jobs_total") {
        assert!(Instant::now() < deadline, "uploads never drained");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the bucket holds, per namespace: the objects' sizes as listed, the
/// unit customers are billed in.
pub(crate) fn bucket_footprint(bucket: &Bucket) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (key, size) in bucket.objects() {
        if key.starts_with("_hoard/") {
            continue; // the startup probe's own short-lived keys
        }
        let ns = match key.strip_prefix("ns.v1/") {
            Some(rest) => rest.split('/').next().unwrap_or("").to_string(),
            None => String::new(),
        };
        *out.entry(ns).or_insert(0) += size as u64;
    }
    out
}

fn put_action(h: &Hoard, prefix: &str, outputs: &[Vec<u8>], action: &str) {
    crate::upload::action_with_outputs(h, prefix, outputs, action.as_bytes());
}

#[test]
fn the_footprint_equals_the_bucket_after_a_mixed_workload_on_two_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let ch = ClickHouse::start(&tmp.path().join("ch"));
    let moto = Moto::start();
    let bucket = Bucket::new(&moto.endpoint(), "billing");
    bucket.create();
    let a = start(
        &tmp.path().join("a"),
        &args(&moto, "billing", "host-a", &ch.url()),
    );
    let b = start(
        &tmp.path().join("b"),
        &args(&moto, "billing", "host-b", &ch.url()),
    );
    let shared: Vec<Vec<u8>> = (0..10)
        .map(|i| noise(3000 + i * 500, 40 + i as u64))
        .collect();
    for i in 0..5 {
        put_action(
            &a,
            "",
            &[noise(9000, 60 + i), shared[i as usize].clone()],
            &format!("a{i}"),
        );
    }
    for blob in &shared {
        assert_eq!(
            b.put(&format!("/cas/{}", sha256_hex(blob)), blob).status,
            200
        );
    }
    put_action(
        &b,
        "/team",
        &[noise(5000, 80), noise(70_000, 81)],
        "team action",
    );
    // A refused upload is counted as rejected, never as footprint.
    assert_eq!(
        b.put(&format!("/cas/{}", sha256_hex(b"claimed")), b"different")
            .status,
        400
    );
    wait_uploads(&a);
    wait_uploads(&b);
    assert_eq!(a.stop(), Some(0));
    assert_eq!(b.stop(), Some(0));
    let want = bucket_footprint(&bucket);
    eprintln!("two hosts: footprint {:?}, bucket {want:?}", ch.footprint());
    assert_eq!(
        ch.footprint(),
        want,
        "footprint per namespace vs the bucket"
    );
    assert!(want.contains_key("team") && want.contains_key(""));
    let rejected = ch.query("SELECT sum(count) FROM remote_build_cache_operations FINAL WHERE status = 'rejected' FORMAT TSV");
    assert_eq!(rejected.trim(), "1");
    let existing = ch.query("SELECT sum(count) FROM remote_build_cache_operations FINAL WHERE status = 'already_exists' FORMAT TSV");
    assert_eq!(existing.trim(), "5", "the 5 shared blobs A uploaded first");
}

#[test]
fn clickhouse_down_through_a_restart_loses_nothing_and_counts_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ch = ClickHouse::start(&tmp.path().join("ch"));
    let url = ch.url();
    ch.stop();
    let moto = Moto::start();
    let bucket = Bucket::new(&moto.endpoint(), "outage");
    bucket.create();
    let dir = tmp.path().join("a");
    let a = start(&dir, &args(&moto, "outage", "host-o", &url));
    for i in 0..10 {
        let blob = noise(6000, 200 + i);
        assert_eq!(
            a.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
            200
        );
    }
    wait_uploads(&a);
    // SIGTERM spools every count (the current minute too) and tries once.
    assert_eq!(a.stop(), Some(0));
    // Restarted while ClickHouse is still down: the spool is there and
    // cannot be sent; more work, more spool.
    let a = start(&dir, &args(&moto, "outage", "host-o", &url));
    assert!(metric(&a, "hoard_accounting_spool_batches") >= 1.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&a, "bazelre_cache_accounting_reports_failed_to_send") < 1.0 {
        assert!(Instant::now() < deadline, "no send was attempted");
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..5 {
        let blob = noise(6000, 300 + i);
        assert_eq!(
            a.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
            200
        );
    }
    wait_uploads(&a);
    assert_eq!(a.stop(), Some(0));
    ch.restart();
    let a = start(&dir, &args(&moto, "outage", "host-o", &url));
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&a, "hoard_accounting_spool_batches") > 0.0
        || metric(&a, "bazelre_cache_accounting_reports_completed") < 1.0
    {
        assert!(Instant::now() < deadline, "the spool never drained");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "outage and restart: footprint {:?}, bucket {:?}",
        ch.footprint(),
        bucket_footprint(&bucket)
    );
    assert_eq!(
        ch.footprint(),
        bucket_footprint(&bucket),
        "{:?}",
        bucket.objects()
    );
    let raw = ch.query("SELECT count() FROM remote_build_cache_operations FORMAT TSV");
    let fin = ch.query("SELECT count() FROM remote_build_cache_operations FINAL FORMAT TSV");
    assert_eq!(raw, fin, "no batch reached ClickHouse twice");
}

#[test]
fn an_insert_whose_acknowledgement_is_lost_is_sent_again_and_counted_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ch = ClickHouse::start(&tmp.path().join("ch"));
    let proxy = LosingProxy::start(ch.http_port);
    let moto = Moto::start();
    let bucket = Bucket::new(&moto.endpoint(), "lostack");
    bucket.create();
    let dir = tmp.path().join("a");
    let a = start(&dir, &args(&moto, "lostack", "host-l", &proxy.url()));
    for i in 0..8 {
        let blob = noise(10_000, 400 + i);
        assert_eq!(
            a.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
            200
        );
    }
    wait_uploads(&a);
    // SIGTERM spools the counts and sends them: the insert lands, its
    // answer is cut, so the batch stays spooled.
    assert_eq!(a.stop(), Some(0));
    assert!(
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst),
        "no INSERT went through the proxy"
    );
    let a = start(&dir, &args(&moto, "lostack", "host-l", &proxy.url()));
    // Generous: on a loaded machine ClickHouse may take a while.
    let deadline = Instant::now() + Duration::from_secs(90);
    while metric(&a, "bazelre_cache_accounting_reports_completed") < 1.0
        || metric(&a, "hoard_accounting_spool_batches") > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the spooled batch was never sent again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(a.stop(), Some(0));
    let raw: u64 = ch
        .query("SELECT count() FROM remote_build_cache_operations FORMAT TSV")
        .trim()
        .parse()
        .unwrap();
    let fin: u64 = ch
        .query("SELECT count() FROM remote_build_cache_operations FINAL FORMAT TSV")
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "lost acknowledgement: {raw} rows stored, {fin} after FINAL; footprint {:?}, bucket {:?}",
        ch.footprint(),
        bucket_footprint(&bucket)
    );
    assert!(
        raw > fin,
        "the batch really reached ClickHouse twice ({raw} rows, {fin} after FINAL)"
    );
    assert_eq!(
        ch.footprint(),
        bucket_footprint(&bucket),
        "and is counted once"
    );

    // The same DDL and footprint query on a current ClickHouse engine
    // (chdb), over the very rows this run stored, resent batch included.
    let rows = ch.query("SELECT * FROM remote_build_cache_operations FORMAT TSV");
    let rows_file = tmp.path().join("rows.tsv");
    std::fs::write(&rows_file, &rows).unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/clickhouse");
    let queries = std::fs::read_to_string(deploy.join("queries.sql")).unwrap();
    let on_1816 = ch.query(&format!("{queries} FORMAT TSV"));
    let python = std::env::var("CHDB_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/../target/e2e-venv/bin/python",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let out = std::process::Command::new(&python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("chdb/footprint.py"))
        .arg(deploy.join("schema.sql"))
        .arg(deploy.join("queries.sql"))
        .arg(&rows_file)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {python}: {e}; the README's test command installs chdb into the venv")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chdb: {stderr}");
    let on_current = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "footprint query on 18.16: {:?}; on {}: {:?}",
        on_1816.trim(),
        stderr.trim().trim_start_matches("# chdb "),
        on_current.trim()
    );
    assert_eq!(
        on_current.trim(),
        on_1816.trim(),
        "the same answer on both engines"
    );
}

#[test]
fn hoard_drift_reports_zero_on_a_consistent_bucket_and_the_deleted_bytes_after_a_deletion() {
    let tmp = tempfile::tempdir().unwrap();
    let ch = ClickHouse::start(&tmp.path().join("ch"));
    let moto = Moto::start();
    let bucket = Bucket::new(&moto.endpoint(), "drifting");
    bucket.create();
    let mut a_args = args(&moto, "drifting", "host-d", &ch.url());
    a_args.push("--drift.interval=1s".into());
    let a = start(&tmp.path().join("a"), &a_args);
    for i in 0..6 {
        let blob = noise(20_000, 600 + i);
        assert_eq!(
            a.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
            200
        );
    }
    wait_uploads(&a);
    let run_drift = || {
        let mut cmd = std::process::Command::new(crate::support::hoard_bin());
        cmd.arg("drift")
            .args(&a_args)
            .arg(format!("--dir={}", tmp.path().join("a").display()));
        cmd.output().unwrap()
    };
    assert_eq!(a.stop(), Some(0));
    let out = run_drift();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text.lines().find(|l| l.starts_with("(default)")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[1], f[2], "actual equals reported: {line}");
    assert_eq!(f[3], "0", "{line}");
    // Delete one object behind hoard's back: drift is exactly its size.
    let (key, size) = bucket
        .objects()
        .into_iter()
        .find(|(k, _)| k.starts_with("cas.v2/"))
        .unwrap();
    bucket.delete(&key);
    let out = run_drift();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "1 of 6 objects gone is over 10%: {text}"
    );
    let line = text.lines().find(|l| l.starts_with("(default)")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    // Exactly the object's listed size: drift is in the bucket's own bytes.
    let expected = -size;
    eprintln!("drift after deleting one object: {line}");
    assert_eq!(f[3].parse::<i64>().unwrap(), expected, "{line}");
    // The daemon exports the same figures.
    let a = start(&tmp.path().join("a"), &a_args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&a, "bazelre_cache_storage_drift_bytes") != expected as f64 {
        assert!(
            Instant::now() < deadline,
            "drift metrics never showed the deletion"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for name in [
        "bazelre_cache_actual_storage_bytes",
        "bazelre_cache_reported_storage_bytes",
        "bazelre_cache_storage_drift_percent",
    ] {
        assert!(a.get("/metrics").text().contains(name), "{name} missing");
    }
}
