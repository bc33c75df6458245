//! The local cache converges to a subset of the bucket: what an upload did
//! not get there (an error, a drop, an adopted directory) goes up later, by
//! the next PUT of the blob or by the rate-limited backfill, and an action
//! result skipped for a missing output follows once the output is up.

use std::time::{Duration, Instant};

use crate::s3::{FORWARD, Proxy, REFUSE};
use crate::support::{Hoard, noise, sha256_hex};
use crate::upload::{action_with_output, count, drained, metric, moto_with_bucket, s3_args, start};

fn in_bucket(bucket: &crate::s3::Bucket, hash: &str) -> bool {
    bucket.objects().keys().any(|k| k.ends_with(hash))
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < within,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    t.elapsed()
}

/// A hoard whose bucket (moto) is reached through a switchable proxy, once
/// its startup probe has run.
struct BehindProxy {
    _moto: crate::s3::Moto,
    bucket: crate::s3::Bucket,
    proxy: Proxy,
    _tmp: tempfile::TempDir,
    h: Hoard,
}

fn behind_proxy(name: &str, extra: &[&str]) -> BehindProxy {
    let (moto, bucket) = moto_with_bucket(name);
    let proxy = Proxy::start(moto.port);
    let tmp = tempfile::tempdir().unwrap();
    let mut args = s3_args(&format!("127.0.0.1:{}", proxy.port), name, "host-converge");
    args.push("--s3.read_timeout=1s".into());
    args.extend(extra.iter().map(|a| a.to_string()));
    let h = start(&tmp.path().join("c"), &args);
    wait_for("the probe", Duration::from_secs(20), || {
        h.get("/status")
            .text()
            .contains("\"HonorsIfNoneMatch\": true")
    });
    BehindProxy {
        _moto: moto,
        bucket,
        proxy,
        _tmp: tmp,
        h,
    }
}

#[test]
fn a_failed_upload_goes_up_on_the_next_put_and_its_action_result_follows() {
    // Every field bound: moto and the directory must live to the end.
    let BehindProxy {
        bucket,
        proxy,
        h,
        _moto,
        _tmp,
    } = behind_proxy("again", &[]);
    proxy.set(REFUSE);
    let out = noise(5000, 71);
    let key = action_with_output(&h, &out, b"converging action");
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "error"), 1.0, "{o:?}");
    assert_eq!(count(&o, "ac", "error"), 1.0, "{o:?}");
    assert!(!in_bucket(&bucket, &sha256_hex(&out)));

    // The bucket is back; the client PUTs the output again (as Bazel does).
    proxy.set(FORWARD);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&out)), &out).status,
        200
    );
    wait_for(
        "the output and its action result in the bucket",
        Duration::from_secs(30),
        || in_bucket(&bucket, &sha256_hex(&out)) && in_bucket(&bucket, &key),
    );
    let o = drained(&h);
    println!("re-PUT: outcomes {o:?}");
    assert_eq!(count(&o, "cas", "created"), 1.0, "{o:?}");
    assert_eq!(count(&o, "ac", "created"), 1.0, "{o:?}");
    // A second re-PUT of an uploaded blob queues nothing.
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&out)), &out).status,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    let jobs: f64 = metric(&h, "hoard_upload_jobs_total").values().sum();
    assert_eq!(jobs, 4.0, "2 failed + 2 that went up");
}

#[test]
fn the_backfill_uploads_what_failed_without_any_client_action() {
    let BehindProxy {
        bucket,
        proxy,
        h,
        _moto,
        _tmp,
    } = behind_proxy("backfill", &["--s3.backfill=true", "--s3.backfill_rate=20"]);
    proxy.set(REFUSE);
    let out = noise(7000, 72);
    let key = action_with_output(&h, &out, b"backfilled action");
    wait_for("both uploads to fail", Duration::from_secs(30), || {
        let o = crate::upload::outcomes(&h);
        count(&o, "cas", "error") >= 1.0 && count(&o, "ac", "error") >= 1.0
    });
    proxy.set(FORWARD);
    let took = wait_for(
        "the backfill to bring the output and its action result",
        Duration::from_secs(60),
        || in_bucket(&bucket, &sha256_hex(&out)) && in_bucket(&bucket, &key),
    );
    let o = drained(&h);
    println!(
        "backfill: both in the bucket {:.1} s after it came back; outcomes {o:?}",
        took.as_secs_f64()
    );
    assert_eq!(count(&o, "cas", "created"), 1.0, "{o:?}");
    assert_eq!(count(&o, "ac", "created"), 1.0, "{o:?}");
}

#[test]
fn an_adopted_bazel_remote_directory_is_uploaded_at_the_backfill_rate() {
    let (moto, bucket) = moto_with_bucket("adopted");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let (blobs, keys) = crate::lifecycle::build_directory(&dir, 120, 20);
    let mut args = s3_args(&moto.endpoint(), "adopted", "host-adopt");
    args.extend(["--s3.backfill=true".into(), "--s3.backfill_rate=25".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Hoard::start(&dir, &a);
    h.wait_ready();
    let t = Instant::now();
    let total = blobs.len() + keys.len();
    let mut samples = Vec::new();
    while bucket.objects().len() < total {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "backfill too slow: {}",
            bucket.objects().len()
        );
        samples.push((t.elapsed().as_secs_f64(), bucket.objects().len()));
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = t.elapsed().as_secs_f64();
    let o = drained(&h);
    println!(
        "adopted directory: {total} blobs and action results up in {took:.1} s at backfill_rate 25/s; outcomes {o:?}"
    );
    assert_eq!(count(&o, "cas", "created"), blobs.len() as f64, "{o:?}");
    assert_eq!(count(&o, "ac", "created"), keys.len() as f64, "{o:?}");
    // The rate holds: never more than a second's burst ahead of it.
    for (at, n) in samples {
        assert!(n as f64 <= 25.0 * (at + 2.0), "{n} objects after {at:.1} s");
    }
    assert!(
        took >= (total as f64 / 25.0) - 2.0,
        "{took} s is faster than the rate allows"
    );
}
