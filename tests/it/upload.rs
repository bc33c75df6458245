//! The S3 tier against a real S3 server (moto) and, for answers moto never
//! gives, a scriptable stub: exactly one outcome per upload, create-if-absent
//! on the wire, read-through that never serves bad bytes, no false hits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, Digest, OutputFile};

use crate::s3::{Bucket, Moto, StubMode, StubS3};
use crate::support::{Hoard, noise, sha256_hex};

pub(crate) fn s3_args(endpoint: &str, bucket: &str, host: &str) -> Vec<String> {
    vec![
        format!("--s3.endpoint={endpoint}"),
        "--s3.disable_ssl".into(),
        format!("--s3.bucket={bucket}"),
        "--s3.access_key_id=AK".into(),
        "--s3.secret_access_key=SK".into(),
        format!("--host_id={host}"),
        "--s3.read_timeout=2s".into(),
        "--grpc_address=none".into(),
    ]
}

/// A fresh moto server with one empty bucket.
pub(crate) fn moto_with_bucket(name: &str) -> (Moto, Bucket) {
    let moto = Moto::start();
    let bucket = Bucket::new(&moto.endpoint(), name);
    bucket.create();
    (moto, bucket)
}

pub(crate) fn start(dir: &std::path::Path, args: &[String]) -> Hoard {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Hoard::start(dir, &a);
    h.wait_ready();
    h
}

/// `metric{labels} value` lines of /metrics, summed by the given label.
pub(crate) fn metric(h: &Hoard, name: &str) -> HashMap<String, f64> {
    let text = h.get("/metrics").text();
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let labels = series.strip_prefix(name).unwrap_or("");
        if !labels.is_empty() && !labels.starts_with('{') {
            continue;
        }
        out.insert(labels.to_string(), value.parse().unwrap_or(0.0));
    }
    out
}

pub(crate) fn outcomes(h: &Hoard) -> HashMap<(String, String), f64> {
    metric(h, "hoard_upload_outcomes_total")
        .into_iter()
        .map(|(labels, v)| {
            let kind = labels
                .split("kind=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string();
            let status = labels
                .split("status=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string();
            ((kind, status), v)
        })
        .collect()
}

pub(crate) fn jobs(h: &Hoard) -> f64 {
    metric(h, "hoard_upload_jobs_total").values().sum()
}

/// Waits until every job has its outcome; returns the outcome counts.
pub(crate) fn drained(h: &Hoard) -> HashMap<(String, String), f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = outcomes(h);
        let total: f64 = o.values().sum();
        if total == jobs(h) {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "uploads never drained: {} jobs, outcomes {o:?}",
            jobs(h)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn count(o: &HashMap<(String, String), f64>, kind: &str, status: &str) -> f64 {
    o.get(&(kind.to_string(), status.to_string()))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn two_hoards_sharing_a_bucket_create_each_blob_once_and_read_through_each_other() {
    let (moto, bucket) = moto_with_bucket("shared");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "shared", "host-a"),
    );
    let b = start(
        &tmp.path().join("b"),
        &s3_args(&moto.endpoint(), "shared", "host-b"),
    );
    // 60 blobs on A, 60 on B, 30 of them the same: uploaded concurrently.
    let blobs: Vec<Vec<u8>> = (0..90)
        .map(|i| noise(2000 + i * 37, 100 + i as u64))
        .collect();
    let (addr_a, addr_b) = (a.addr, b.addr);
    std::thread::scope(|s| {
        for (i, blob) in blobs.iter().enumerate() {
            let targets: Vec<_> = match i {
                0..30 => vec![addr_a],
                30..60 => vec![addr_b],
                _ => vec![addr_a, addr_b],
            };
            for t in targets {
                s.spawn(move || {
                    let r = crate::support::request(
                        t,
                        "PUT",
                        &format!("/cas/{}", sha256_hex(blob)),
                        &[("Content-Length", &blob.len().to_string())],
                        blob,
                    );
                    assert_eq!(r.status, 200);
                });
            }
        }
    });
    let (oa, ob) = (drained(&a), drained(&b));
    let created = count(&oa, "cas", "created") + count(&ob, "cas", "created");
    let existing = count(&oa, "cas", "already_exists") + count(&ob, "cas", "already_exists");
    assert_eq!(
        created, 90.0,
        "each distinct blob created exactly once: A {oa:?} B {ob:?}"
    );
    assert_eq!(
        existing, 30.0,
        "the 30 shared blobs already existed for the second host"
    );
    assert_eq!(count(&oa, "cas", "error") + count(&ob, "cas", "error"), 0.0);
    let cas_objects = bucket
        .objects()
        .keys()
        .filter(|k| k.starts_with("cas.v2/"))
        .count();
    assert_eq!(cas_objects, 90);
    // B reads what only A uploaded, verified, and does not upload it back.
    let jobs_before = jobs(&b);
    for blob in &blobs[..30] {
        assert_eq!(b.get(&format!("/cas/{}", sha256_hex(blob))).body, *blob);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        jobs(&b),
        jobs_before,
        "read-through blobs must not be uploaded again"
    );
    assert_eq!(
        metric(&b, "bazel_remote_s3_cache_hits")
            .values()
            .sum::<f64>(),
        30.0
    );
}

/// What a `kill -9` between a PUT that created the object and its outcome
/// leaves, when the blob then leaves the local cache before the restart
/// replays the job: the attempt may have created the object, and no later
/// job of the key will ever ask. The bucket is asked: an object with this
/// host's writer tag is counted `created` at its length; one tagged by
/// another host is `already_exists`.
#[test]
fn a_replayed_upload_whose_blob_is_gone_counts_the_object_it_created() {
    let (moto, bucket) = moto_with_bucket("replay-gone");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let args = s3_args(&moto.endpoint(), &bucket.name, "host-a");
    start(&dir, &args).stop();
    let ours = noise(5_000, 31);
    let theirs = noise(7_000, 32);
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("upload.journal"))
        .unwrap();
    for (data, writer, nonce) in [(&ours, "host-a/abc", "abc"), (&theirs, "host-b/abd", "abd")] {
        let hash = sha256_hex(data);
        bucket.put_tagged(&format!("cas.v2/{}/{hash}", &hash[..2]), data, writer);
        use std::io::Write;
        writeln!(journal, "+ . cas {hash} {} {nonce}", data.len()).unwrap();
    }
    drop(journal);
    let h = start(&dir, &args);
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "created"), 1.0, "{o:?}");
    assert_eq!(count(&o, "cas", "already_exists"), 1.0, "{o:?}");
    assert_eq!(count(&o, "cas", "error"), 0.0, "{o:?}");
    let created: f64 = metric(&h, "bazelre_cache_upload_bytes_created")
        .values()
        .sum();
    assert_eq!(created, ours.len() as f64, "counted at the object's length");
    h.stop();
}

#[test]
fn kill_9_with_a_full_queue_loses_no_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    // No bucket reachable: the probe cannot run, so uploads wait in the queue.
    let dead_port = crate::support::free_port();
    let h = start(
        &dir,
        &s3_args(&format!("127.0.0.1:{dead_port}"), "journal", "host-j"),
    );
    let blobs: Vec<Vec<u8>> = (0..40).map(|i| noise(3000, 500 + i)).collect();
    for blob in &blobs {
        assert_eq!(
            h.put(&format!("/cas/{}", sha256_hex(blob)), blob).status,
            200
        );
    }
    assert_eq!(jobs(&h), 40.0);
    assert_eq!(outcomes(&h).values().sum::<f64>(), 0.0);
    assert_eq!(
        metric(&h, "hoard_upload_queue_length")
            .values()
            .sum::<f64>(),
        40.0
    );
    assert!(
        metric(&h, "hoard_upload_queue_oldest_seconds")
            .values()
            .sum::<f64>()
            > 0.0
    );
    let pid = h.pid().to_string();
    std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(h);
    // The bucket comes up; the restarted hoard uploads every journaled job.
    let moto = Moto::start_on(dead_port);
    let bucket = Bucket::new(&moto.endpoint(), "journal");
    bucket.create();
    let h = start(&dir, &s3_args(&moto.endpoint(), "journal", "host-j"));
    let o = drained(&h);
    assert_eq!(jobs(&h), 40.0, "every journaled job re-queued once");
    assert_eq!(count(&o, "cas", "created"), 40.0, "{o:?}");
    assert_eq!(bucket.objects().len(), 40);
    // Nothing is left to replay after a clean stop.
    assert_eq!(h.stop(), Some(0));
    let h = start(&dir, &s3_args(&moto.endpoint(), "journal", "host-j"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(jobs(&h), 0.0);
}

pub(crate) fn action_with_output(h: &Hoard, out: &[u8], action: &[u8]) -> String {
    assert_eq!(h.put(&format!("/cas/{}", sha256_hex(out)), out).status, 200);
    let ar = ActionResult {
        output_files: vec![OutputFile {
            path: "out/x".into(),
            digest: Some(Digest {
                hash: sha256_hex(out),
                size_bytes: out.len() as i64,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let key = sha256_hex(action);
    assert_eq!(
        h.put(&format!("/ac/{key}"), &ar.encode_to_vec()).status,
        200
    );
    key
}

/// Stores `outputs` (under the instance `prefix`, "" or "/name") and an
/// action result naming them `out/0`, `out/1`, ...; returns its key.
pub(crate) fn action_with_outputs(
    h: &Hoard,
    prefix: &str,
    outputs: &[Vec<u8>],
    action: &[u8],
) -> String {
    for o in outputs {
        assert_eq!(
            h.put(&format!("{prefix}/cas/{}", sha256_hex(o)), o).status,
            200
        );
    }
    let ar = ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(i, o)| OutputFile {
                path: format!("out/{i}"),
                digest: Some(Digest {
                    hash: sha256_hex(o),
                    size_bytes: o.len() as i64,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let key = sha256_hex(action);
    assert_eq!(
        h.put(&format!("{prefix}/ac/{key}"), &ar.encode_to_vec())
            .status,
        200
    );
    key
}

#[test]
fn an_object_deleted_behind_hoards_back_is_a_miss_not_a_hit_that_later_404s() {
    let (moto, bucket) = moto_with_bucket("gone");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "gone", "host-a"),
    );
    let out = noise(5000, 7);
    let key = action_with_output(&a, &out, b"action deleted");
    let o = drained(&a);
    assert_eq!(
        (count(&o, "cas", "created"), count(&o, "ac", "created")),
        (1.0, 1.0),
        "{o:?}"
    );
    // Another host sees the complete entry through the bucket.
    let b = start(
        &tmp.path().join("b"),
        &s3_args(&moto.endpoint(), "gone", "host-b"),
    );
    assert_eq!(b.get(&format!("/ac/{key}")).status, 200);
    // The output is deleted from the bucket (a lifecycle rule, a wipe).
    let cas_key = bucket
        .objects()
        .into_keys()
        .find(|k| k.contains(&sha256_hex(&out)))
        .unwrap();
    bucket.delete(&cas_key);
    // A slow answer would be "unknown", which keeps the entry; give the
    // bucket time to say "absent" even on a loaded machine.
    let mut c_args = s3_args(&moto.endpoint(), "gone", "host-c");
    c_args.push("--s3.read_timeout=15s".into());
    let c = start(&tmp.path().join("c"), &c_args);
    assert_eq!(
        c.get(&format!("/ac/{key}")).status,
        404,
        "an AC hit whose output is gone"
    );
    assert_eq!(
        c.request("HEAD", &format!("/ac/{key}"), &[], b"").status,
        404
    );
    // The evictor thread unlinks removed entries; give it a moment.
    let local_ac = || {
        crate::support::files_under(&c.dir)
            .iter()
            .any(|f| f.starts_with("ac.v2/"))
    };
    let until = Instant::now() + Duration::from_secs(5);
    while local_ac() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!local_ac(), "the stale entry is not kept locally");
}

#[test]
fn a_corrupted_object_is_refused_by_read_through_and_counted() {
    let (moto, bucket) = moto_with_bucket("bad");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "bad", "host-a"),
    );
    let blob = noise(70_000, 8);
    let hx = sha256_hex(&blob);
    assert_eq!(a.put(&format!("/cas/{hx}"), &blob).status, 200);
    drained(&a);
    let key = bucket
        .objects()
        .into_keys()
        .find(|k| k.contains(&hx))
        .unwrap();
    // Same length, different bytes, still a valid zstd stream of the wrong data.
    let other = noise(70_000, 9);
    let mut body = Vec::new();
    let hl = hoard_disk_header_len(other.len());
    let chunk = zstd::bulk::compress(&other, 1).unwrap();
    body.extend(casblob_header(
        other.len() as u64,
        &[hl as u64, (hl + chunk.len()) as u64],
    ));
    body.extend(chunk);
    bucket.put(&key, &body);
    let b = start(
        &tmp.path().join("b"),
        &s3_args(&moto.endpoint(), "bad", "host-b"),
    );
    assert_eq!(b.get(&format!("/cas/{hx}")).status, 404);
    assert_eq!(
        metric(&b, "hoard_readthrough_verify_failures_total")
            .values()
            .sum::<f64>(),
        1.0
    );
    assert!(
        !crate::support::files_under(&b.dir)
            .iter()
            .any(|f| f.starts_with("cas.v2/"))
    );
    // Plain garbage too.
    bucket.put(&key, b"not a casblob at all");
    assert_eq!(b.get(&format!("/cas/{hx}")).status, 404);
}

#[test]
fn an_action_result_from_the_bucket_is_validated_like_a_clients() {
    let (moto, bucket) = moto_with_bucket("acbad");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "acbad", "host-a"),
    );
    let out = noise(3000, 31);
    let key = action_with_output(&a, &out, b"poisoned action");
    drained(&a);
    let object = bucket
        .objects()
        .into_keys()
        .find(|k| k.ends_with(&key))
        .unwrap();
    // Whoever can write to the bucket replaces the entry with one that
    // names an absolute path (its output exists, so completeness alone
    // would serve it), then one larger than the action-result limit.
    let poisoned = ActionResult {
        output_files: vec![OutputFile {
            path: "/etc/cron.d/x".into(),
            digest: Some(Digest {
                hash: sha256_hex(&out),
                size_bytes: out.len() as i64,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    bucket.put(&object, &poisoned.encode_to_vec());
    let mut args = s3_args(&moto.endpoint(), "acbad", "host-b");
    args.push("--max_action_result_size=4096".into());
    let b = start(&tmp.path().join("b"), &args);
    assert_eq!(b.get(&format!("/ac/{key}")).status, 404);
    let failures = || {
        metric(&b, "hoard_readthrough_verify_failures_total")
            .values()
            .sum::<f64>()
    };
    assert_eq!(failures(), 1.0);
    let mut large = poisoned.clone();
    large.output_files[0].path = "out/x".into();
    large.exit_code = 0;
    large.stdout_digest = None;
    while large.encoded_len() <= 4096 {
        let mut f = large.output_files[0].clone();
        f.path = format!("out/{}", large.output_files.len());
        large.output_files.push(f);
    }
    bucket.put(&object, &large.encode_to_vec());
    assert_eq!(b.get(&format!("/ac/{key}")).status, 404);
    assert_eq!(failures(), 2.0);
    assert!(
        !crate::support::files_under(&b.dir)
            .iter()
            .any(|f| f.starts_with("ac.v2/")),
        "a refused action result was stored"
    );
    // A valid one under the limit is served.
    let mut fine = large.clone();
    fine.output_files.truncate(3);
    bucket.put(&object, &fine.encode_to_vec());
    assert_eq!(b.get(&format!("/ac/{key}")).status, 200);
}

#[test]
fn a_remembered_absence_costs_a_re_upload_never_a_hit_and_completeness_never_uses_it() {
    use hoard_proto::reapi::FindMissingBlobsRequest;
    use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    let (moto, _bucket) = moto_with_bucket("absent");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "absent", "host-a"),
    );
    let mut args = s3_args(&moto.endpoint(), "absent", "host-b");
    args.retain(|x| x != "--grpc_address=none");
    let b = start(&tmp.path().join("b"), &args);
    let (x, y) = (noise(3000, 61), noise(3000, 62));
    let rt = crate::grpc::rt();
    let missing = |blobs: &[&[u8]]| -> usize {
        rt.block_on(async {
            let mut cas = ContentAddressableStorageClient::new(b.channel().await);
            cas.find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: blobs.iter().map(|o| crate::grpc::digest(o)).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests
            .len()
        })
    };
    let heads = || {
        metric(&b, "hoard_s3_request_duration_seconds_count")
            .iter()
            .filter(|(k, _)| k.contains("op=\"head\""))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    // B learns that the bucket has neither.
    assert_eq!(missing(&[&x, &y]), 2);
    let asked = heads();
    assert_eq!(missing(&[&x, &y]), 2);
    assert_eq!(
        heads(),
        asked,
        "a recent absence is believed without a HEAD"
    );
    // A uploads both, and an action result naming Y.
    let key = action_with_output(&a, &y, b"absent action");
    assert_eq!(a.put(&format!("/cas/{}", sha256_hex(&x)), &x).status, 200);
    drained(&a);
    // FindMissingBlobs on B may still say "missing" (the remembered
    // absence): the client uploads again, and that settles it.
    assert_eq!(missing(&[&x]), 1, "within absence_ttl");
    assert_eq!(b.put(&format!("/cas/{}", sha256_hex(&x)), &x).status, 200);
    drained(&b);
    assert_eq!(missing(&[&x]), 0, "an upload outcome erases the absence");
    // A completeness check asks the bucket, absence or not: the action
    // result of Y is a hit on B.
    assert_eq!(b.get(&format!("/ac/{key}")).status, 200);
    let o = outcomes(&b);
    assert_eq!(count(&o, "cas", "already_exists"), 1.0, "{o:?}");
}

fn hoard_disk_header_len(size: usize) -> usize {
    29 + 8 * (size.div_ceil(1 << 20) + 1)
}

fn casblob_header(size: u64, offsets: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    out.extend_from_slice(&((21 + 8 * offsets.len()) as u32).to_le_bytes());
    out.extend_from_slice(&(size as i64).to_le_bytes());
    out.push(1);
    out.extend_from_slice(&(1u32 << 20).to_le_bytes());
    out.extend_from_slice(&(offsets.len() as i64).to_le_bytes());
    for o in offsets {
        out.extend_from_slice(&(*o as i64).to_le_bytes());
    }
    out
}

#[test]
fn the_bucket_dying_mid_load_fails_no_client_request_and_outcomes_add_up() {
    let mut moto = Moto::start();
    let port = moto.port;
    let bucket = Bucket::new(&moto.endpoint(), "flaky");
    bucket.create();
    let tmp = tempfile::tempdir().unwrap();
    let h = start(
        &tmp.path().join("c"),
        &s3_args(&moto.endpoint(), "flaky", "host-f"),
    );
    let mut statuses = Vec::new();
    for i in 0..60u64 {
        if i == 20 {
            moto.kill();
        }
        if i == 40 {
            moto = Moto::start_on(port);
            Bucket::new(&moto.endpoint(), "flaky").create();
        }
        let blob = noise(4000, 900 + i);
        statuses.push(h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status);
        // A local read never waits for the dead bucket past read_timeout.
        let t = Instant::now();
        assert_eq!(h.get(&format!("/cas/{}", sha256_hex(&blob))).status, 200);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let o = drained(&h);
    assert_eq!(o.values().sum::<f64>(), 60.0, "one outcome per job: {o:?}");
    assert_eq!(count(&o, "cas", "dropped"), 0.0);
    assert!(count(&o, "cas", "created") >= 20.0, "{o:?}");
    let _ = bucket;
}

#[test]
fn if_none_match_goes_out_as_a_bare_star_and_refusals_are_classified() {
    for (mode, expect) in [
        (StubMode::Conditional(412), "already_exists"),
        (StubMode::Conditional(304), "already_exists"),
        (StubMode::AlreadyExists409, "already_exists"),
    ] {
        let stub = StubS3::start(mode);
        let tmp = tempfile::tempdir().unwrap();
        let args = s3_args(&stub.endpoint(), "stub", "host-s");
        let h = start(&tmp.path().join("a"), &args);
        let blob = noise(1000, 11);
        assert_eq!(
            h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
            200
        );
        let o = drained(&h);
        assert_eq!(count(&o, "cas", "created"), 1.0, "{mode:?}: {o:?}");
        // A second host uploads the same blob: refused, classified.
        let h2 = start(&tmp.path().join("b"), &args);
        assert_eq!(
            h2.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
            200
        );
        let o = drained(&h2);
        assert_eq!(count(&o, "cas", expect), 1.0, "{mode:?}: {o:?}");
        let puts: Vec<_> = stub
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "PUT")
            .cloned()
            .collect();
        assert!(!puts.is_empty());
        for p in &puts {
            let inm: Vec<&str> = p
                .headers
                .iter()
                .filter(|(k, _)| k == "if-none-match")
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(inm, vec!["*"], "If-None-Match must be the bare *: {p:?}");
        }
        let status: serde_json::Value = serde_json::from_slice(&h.get("/status").body).unwrap();
        assert_eq!(status["Backend"]["HonorsIfNoneMatch"], true);
    }
}

#[test]
fn a_conditional_conflict_is_retried_and_a_bucket_ignoring_the_header_is_detected() {
    let stub = StubS3::start(StubMode::ConflictFirst(2));
    let tmp = tempfile::tempdir().unwrap();
    let h = start(
        &tmp.path().join("a"),
        &s3_args(&stub.endpoint(), "stub", "host-c"),
    );
    let blob = noise(1000, 12);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(
        count(&o, "cas", "created"),
        1.0,
        "409 ConditionalRequestConflict is retried: {o:?} {:?}",
        h.logs()
    );

    let stub = StubS3::start(StubMode::Ignoring);
    let args = s3_args(&stub.endpoint(), "stub", "host-i");
    let h = start(&tmp.path().join("b"), &args);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "created"), 1.0, "{o:?}");
    let status: serde_json::Value = serde_json::from_slice(&h.get("/status").body).unwrap();
    assert_eq!(status["Backend"]["HonorsIfNoneMatch"], false, "{status}");
    assert!(
        status["Backend"]["UploadMode"]
            .as_str()
            .unwrap()
            .contains("HEAD before PUT")
    );
    // With HEAD before PUT, a second host's upload is still classified truthfully.
    let h2 = start(
        &tmp.path().join("c"),
        &s3_args(&stub.endpoint(), "stub", "host-i2"),
    );
    assert_eq!(
        h2.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h2);
    assert_eq!(count(&o, "cas", "already_exists"), 1.0, "{o:?}");
}

#[test]
fn large_blobs_use_multipart_and_a_failed_part_aborts_the_upload() {
    let (moto, bucket) = moto_with_bucket("multipart");
    let tmp = tempfile::tempdir().unwrap();
    let mut args = s3_args(&moto.endpoint(), "multipart", "host-m");
    args.push("--s3.multipart_threshold=6291456".into());
    args.push("--s3.part_size=5242880".into());
    let h = start(&tmp.path().join("a"), &args);
    let blob = noise(12 << 20, 13);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "created"), 1.0, "{o:?}");
    assert_eq!(bucket.multipart_uploads(), 0);
    let size = bucket.objects().into_values().next().unwrap();
    assert!(
        size > 12 << 20,
        "the whole casblob is in the bucket ({size} bytes)"
    );
    // Read back through a second host: the parts reassemble to the blob.
    let b = start(&tmp.path().join("b"), &args);
    assert_eq!(b.get(&format!("/cas/{}", sha256_hex(&blob))).body, blob);

    let stub = StubS3::start(StubMode::FailingParts);
    let mut args = s3_args(&stub.endpoint(), "stub", "host-m2");
    args.push("--s3.multipart_threshold=6291456".into());
    args.push("--s3.part_size=5242880".into());
    let h = start(&tmp.path().join("c"), &args);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "error"), 1.0, "{o:?}");
    let seen = stub.seen.lock().unwrap();
    let aborts = seen
        .iter()
        .filter(|s| s.method == "DELETE" && !s.path.contains("_hoard"))
        .count();
    assert!(
        aborts >= 1,
        "every failed multipart upload is aborted: {seen:?}"
    );
    assert!(
        stub.objects
            .lock()
            .unwrap()
            .keys()
            .all(|k| !k.contains(&sha256_hex(&blob)))
    );
}

#[test]
fn an_action_result_goes_up_only_after_its_outputs_and_is_skipped_without_them() {
    let (moto, bucket) = moto_with_bucket("ordering");
    let tmp = tempfile::tempdir().unwrap();
    let h = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "ordering", "host-o"),
    );
    // Complete: output first, then the action result.
    let key = action_with_output(&h, &noise(3000, 21), b"complete action");
    // Incomplete: the action result names an output nobody uploaded.
    let ar = ActionResult {
        output_files: vec![OutputFile {
            path: "out/y".into(),
            digest: Some(Digest {
                hash: sha256_hex(b"never uploaded"),
                size_bytes: 14,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bad_key = sha256_hex(b"incomplete action");
    assert_eq!(
        h.put(&format!("/ac/{bad_key}"), &ar.encode_to_vec()).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "ac", "created"), 1.0, "{o:?}");
    assert_eq!(count(&o, "ac", "error"), 1.0, "{o:?}");
    assert_eq!(
        metric(&h, "hoard_upload_ac_skipped_total")
            .values()
            .sum::<f64>(),
        1.0
    );
    let keys: Vec<String> = bucket.objects().into_keys().collect();
    assert!(keys.iter().any(|k| k.ends_with(&key)));
    assert!(
        !keys.iter().any(|k| k.ends_with(&bad_key)),
        "an AC whose output is absent reached the bucket"
    );
}

#[test]
fn concurrent_misses_of_one_blob_fetch_it_once_and_a_read_only_host_uploads_nothing() {
    let (moto, bucket) = moto_with_bucket("flight");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "flight", "host-a"),
    );
    let blob = noise(3 << 20, 31);
    let hx = sha256_hex(&blob);
    assert_eq!(a.put(&format!("/cas/{hx}"), &blob).status, 200);
    drained(&a);
    let mut args = s3_args(&moto.endpoint(), "flight", "host-r");
    args.push("--num_uploaders=0".into());
    let r = start(&tmp.path().join("r"), &args);
    let addr = r.addr;
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                let resp = crate::support::request(addr, "GET", &format!("/cas/{hx}"), &[], b"");
                assert_eq!(resp.status, 200);
                assert!(resp.body == blob);
            });
        }
    });
    let gets: f64 = metric(&r, "hoard_s3_request_duration_seconds_count")
        .iter()
        .filter(|(l, _)| l.contains("op=\"get\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(gets, 1.0, "16 concurrent misses of one blob, one GET");
    // Read-only: a client upload stays local.
    let mine = noise(1000, 32);
    assert_eq!(
        r.put(&format!("/cas/{}", sha256_hex(&mine)), &mine).status,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(jobs(&r), 0.0);
    assert!(
        !bucket
            .objects()
            .keys()
            .any(|k| k.contains(&sha256_hex(&mine)))
    );
}

#[test]
fn sigterm_drains_uploads_until_the_deadline_and_journals_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let port = crate::support::free_port();
    let mut args = s3_args(&format!("127.0.0.1:{port}"), "drain", "host-d");
    args.push("--upload_drain_timeout=1s".into());
    let h = start(&dir, &args);
    let blobs: Vec<Vec<u8>> = (0..10).map(|i| noise(2000, 700 + i)).collect();
    for b in &blobs {
        assert_eq!(h.put(&format!("/cas/{}", sha256_hex(b)), b).status, 200);
    }
    let t = Instant::now();
    assert_eq!(
        h.stop(),
        Some(0),
        "SIGTERM with a dead bucket still exits cleanly"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the drain deadline bounds shutdown"
    );
    let moto = Moto::start_on(port);
    let bucket = Bucket::new(&moto.endpoint(), "drain");
    bucket.create();
    let h = start(&dir, &args);
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "created"), 10.0, "{o:?}");
    assert_eq!(bucket.objects().len(), 10);
}

#[test]
fn a_failed_head_before_put_and_a_409_that_is_not_exists_end_as_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A bucket that ignores If-None-Match and whose HEADs fail: without an
    // answer there is no PUT (it would overwrite and count `created`).
    let stub = StubS3::start(StubMode::IgnoringFailingHeads);
    let h = start(
        &tmp.path().join("a"),
        &s3_args(&stub.endpoint(), "b", "host-h"),
    );
    let blob = noise(3000, 901);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "error"), 1.0, "{o:?}");
    assert_eq!(count(&o, "cas", "created"), 0.0, "{o:?}");
    let puts = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains(&sha256_hex(&blob)))
        .count();
    assert_eq!(puts, 0, "no blind PUT");
    drop(h);

    // A 409 other than "exists" or a conditional conflict is a failure.
    let stub = StubS3::start(StubMode::OtherConflict);
    let h = start(
        &tmp.path().join("b"),
        &s3_args(&stub.endpoint(), "b", "host-c"),
    );
    let blob = noise(3000, 902);
    stub.objects.lock().unwrap().insert(
        format!(
            "/b/cas.v2/{}/{}",
            &sha256_hex(&blob)[..2],
            sha256_hex(&blob)
        ),
        b"someone else's".to_vec(),
    );
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "error"), 1.0, "{o:?}");
    assert_eq!(count(&o, "cas", "already_exists"), 0.0, "{o:?}");
}

#[test]
fn an_action_result_above_the_multipart_threshold_goes_up_whole() {
    let (_moto, bucket) = moto_with_bucket("bigac");
    let tmp = tempfile::tempdir().unwrap();
    let mut args = s3_args(&_moto.endpoint(), "bigac", "host-big");
    args.extend([
        "--s3.multipart_threshold=5242880".into(),
        "--s3.part_size=5242880".into(),
    ]);
    let h = start(&tmp.path().join("c"), &args);
    let out = noise(4000, 903);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&out)), &out).status,
        200
    );
    let ar = ActionResult {
        output_files: (0..70_000)
            .map(|i| OutputFile {
                path: format!("out/file-{i}"),
                digest: Some(Digest {
                    hash: sha256_hex(&out),
                    size_bytes: out.len() as i64,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let bytes = ar.encode_to_vec();
    assert!(bytes.len() > 5 << 20, "{} bytes", bytes.len());
    let key = sha256_hex(b"a very large action");
    assert_eq!(h.put(&format!("/ac/{key}"), &bytes).status, 200);
    let o = drained(&h);
    assert_eq!(count(&o, "ac", "created"), 1.0, "{o:?}");
    let objects = bucket.objects();
    let size = objects
        .iter()
        .find(|(k, _)| k.ends_with(&key))
        .map(|(_, v)| *v)
        .unwrap();
    assert_eq!(
        size as usize,
        bytes.len(),
        "the whole action result, by multipart"
    );
}
