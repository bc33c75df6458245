//! hoard through the seams of its life, as an operator meets them: a restart
//! on a large directory while clients keep building, a bucket that hangs or
//! refuses, a full disk, bit rot on disk, a stop with a dead bucket, and a
//! closed log pipe. Real hoard processes, real sockets, moto as the bucket.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hoard_proto::google::bytestream::ReadRequest;
use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::prost::Message;
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, Digest, GetActionResultRequest, OutputFile, compressor,
};
use tonic::transport::Channel;

use crate::grpc::{digest, rt};
use crate::s3::{FORWARD, HANG, Proxy, REFUSE, SLOW, SLOW_BY};
use crate::support::{Hoard, files_under, free_port, hoard_bin, noise, request, sha256_hex};
use crate::upload::{
    action_with_output, action_with_outputs, count, drained, jobs, moto_with_bucket, s3_args, start,
};

/// Files of one kind directory (`ac.v2`, `cas.v2`) under a cache directory.
/// A GET and how long it took.
fn timed_get(h: &Hoard, path: &str) -> (crate::support::Resp, Duration) {
    let t = Instant::now();
    let r = h.get(path);
    (r, t.elapsed())
}

fn count_files(dir: &Path, kind_dir: &str) -> usize {
    files_under(dir)
        .iter()
        .filter(|f| f.starts_with(kind_dir) && !f.ends_with(".tmp"))
        .count()
}

/// A cache directory in bazel-remote's uncompressed layout, written file by
/// file: `cas` blobs, and `ac` action results each naming three of them.
/// Returns the CAS contents and the action keys.
pub(crate) fn build_directory(dir: &Path, cas: usize, ac: usize) -> (Vec<Vec<u8>>, Vec<String>) {
    let blobs: Vec<Vec<u8>> = (0..cas)
        .map(|i| format!("blob number {i:08}").into_bytes())
        .collect();
    for kind in ["ac.v2", "cas.v2"] {
        for i in 0..256 {
            std::fs::create_dir_all(dir.join(kind).join(format!("{i:02x}"))).unwrap();
        }
    }
    for (i, b) in blobs.iter().enumerate() {
        let h = sha256_hex(b);
        let p = dir
            .join("cas.v2")
            .join(&h[..2])
            .join(format!("{h}-{i:09}.v1"));
        std::fs::write(p, b).unwrap();
    }
    let mut keys = Vec::new();
    for j in 0..ac {
        let ar = ActionResult {
            output_files: (0..3)
                .map(|k| OutputFile {
                    path: format!("out/{k}"),
                    digest: Some(digest(&blobs[(j * 3 + k) % cas])),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let key = sha256_hex(format!("action {j}").as_bytes());
        let p = dir
            .join("ac.v2")
            .join(&key[..2])
            .join(format!("{key}-{j:09}"));
        std::fs::write(p, ar.encode_to_vec()).unwrap();
        keys.push(key);
    }
    (blobs, keys)
}

const LOAD_PAUSE: (&str, &str) = ("HOARD_TEST_INDEX_LOAD_PAUSE_MS", "200");

#[test]
fn a_restart_on_a_large_directory_answers_truly_while_the_index_loads() {
    const CAS: usize = 200_000;
    const AC: usize = 2_000;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let t = Instant::now();
    let (blobs, keys) = build_directory(&dir, CAS, AC);
    println!(
        "load test: wrote {} entries in {:.1} s",
        CAS + AC,
        t.elapsed().as_secs_f64()
    );

    let h = Hoard::start_env(&dir, &[], &[LOAD_PAUSE]);
    assert_eq!(
        h.get("/readyz").status,
        503,
        "the index must still be loading for this test to mean anything"
    );
    let misses = AtomicUsize::new(0);
    let put_failures = AtomicUsize::new(0);
    let written: Vec<Vec<u8>> = (0..100)
        .map(|i| noise(if i % 10 == 0 { 3 << 20 } else { 5000 }, 9000 + i as u64))
        .collect();
    let (addr, grpc) = (h.addr, h.grpc.unwrap());
    std::thread::scope(|s| {
        // HTTP: 500 action results, from two threads.
        for part in keys[..500].chunks(250) {
            let misses = &misses;
            s.spawn(move || {
                for k in part {
                    if request(addr, "GET", &format!("/ac/{k}"), &[], b"").status != 200 {
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        // gRPC: 500 others.
        let misses = &misses;
        let grpc_keys = &keys[500..1000];
        s.spawn(move || {
            rt().block_on(async {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut ac = ActionCacheClient::new(ch);
                for k in grpc_keys {
                    let r = ac
                        .get_action_result(GetActionResultRequest {
                            action_digest: Some(Digest {
                                hash: k.clone(),
                                size_bytes: 140,
                            }),
                            ..Default::default()
                        })
                        .await;
                    if let Err(e) = r {
                        eprintln!("GetActionResult during load: {e}");
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });
        // Writes during the load, some large enough to be in flight while
        // the loader lists their directory.
        let (written, put_failures) = (&written, &put_failures);
        s.spawn(move || {
            for b in written {
                let len = b.len().to_string();
                let path = format!("/cas/{}", sha256_hex(b));
                let r = request(addr, "PUT", &path, &[("Content-Length", &len)], b);
                if r.status != 200 {
                    eprintln!("PUT during load: {} {}", r.status, r.text());
                    put_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    });
    let still_loading = h.get("/readyz").status == 503;
    println!(
        "load test: 1000 action-result GETs during the load, {} misses; 100 PUTs, {} failed; still loading after them: {still_loading}",
        misses.load(Ordering::Relaxed),
        put_failures.load(Ordering::Relaxed)
    );
    assert!(
        still_loading,
        "the load ended before the requests did: they did not all meet a partial index"
    );
    assert_eq!(misses.load(Ordering::Relaxed), 0, "hits during the load");
    assert_eq!(
        put_failures.load(Ordering::Relaxed),
        0,
        "PUTs during the load"
    );
    h.wait_ready();
    assert_eq!(
        count_files(&dir, "ac.v2"),
        AC,
        "no action result was removed"
    );
    for k in &keys[1000..1100] {
        assert_eq!(h.get(&format!("/ac/{k}")).status, 200);
    }
    for b in &written {
        let r = h.get(&format!("/cas/{}", sha256_hex(b)));
        assert_eq!(r.status, 200);
        assert!(r.body == *b, "a blob written during the load reads back");
    }
    let removed = AC - count_files(&dir, "ac.v2");
    println!("load test: after the load, {removed} action results removed");
    assert_eq!(h.stop(), Some(0));

    // Upload replay against the same directory: 1,000 queued jobs for blobs
    // that are all there, replayed while the index loads.
    let (_moto, bucket) = moto_with_bucket("replay");
    let mut journal = String::new();
    for (i, b) in blobs.iter().take(1000).enumerate() {
        journal.push_str(&format!("+ . cas {} 4096 {:x}\n", sha256_hex(b), i + 1));
    }
    std::fs::write(dir.join("upload.journal"), journal).unwrap();
    let args = s3_args(&_moto.endpoint(), "replay", "host-r");
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Hoard::start_env(&dir, &a, &[("HOARD_TEST_INDEX_LOAD_PAUSE_MS", "50")]);
    h.wait_ready();
    let o = drained(&h);
    println!("replay: {} jobs, outcomes {o:?}", jobs(&h));
    assert_eq!(jobs(&h), 1000.0);
    assert_eq!(count(&o, "cas", "created"), 1000.0, "{o:?}");
    assert_eq!(bucket.objects().len(), 1000);
}

#[test]
fn a_hanging_or_refusing_bucket_removes_no_action_result() {
    let (moto, _bucket) = moto_with_bucket("outage");
    let tmp = tempfile::tempdir().unwrap();
    // Host A stores an output and its action result; both go to the bucket.
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "outage", "host-a"),
    );
    let key = action_with_output(&a, &noise(3000, 41), b"outage action");
    let o = drained(&a);
    assert_eq!(
        count(&o, "cas", "created") + count(&o, "ac", "created"),
        2.0
    );

    // Host B reaches the bucket through the proxy and trusts "in the
    // bucket" for no time at all, so every completeness check asks it.
    let proxy = Proxy::start(moto.port);
    let mut args = s3_args(&format!("127.0.0.1:{}", proxy.port), "outage", "host-b");
    args.push("--s3.existence_ttl=0s".into());
    let bdir = tmp.path().join("b");
    let b = start(&bdir, &args);
    assert_eq!(b.get(&format!("/ac/{key}")).status, 200, "read through");
    assert_eq!(count_files(&bdir, "ac.v2"), 1, "the action result is local");
    assert_eq!(
        count_files(&bdir, "cas.v2"),
        0,
        "its output is only in the bucket"
    );

    for (mode, name) in [(HANG, "hanging"), (REFUSE, "refusing")] {
        proxy.set(mode);
        let (r, took) = timed_get(&b, &format!("/ac/{key}"));
        println!(
            "outage: bucket {name}: GET /ac answered {} in {:.1} s",
            r.status,
            took.as_secs_f64()
        );
        assert_eq!(r.status, 404, "unknown answers a miss");
        assert_eq!(
            count_files(&bdir, "ac.v2"),
            1,
            "a {name} bucket removed the action result"
        );
    }
    proxy.set(FORWARD);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.get(&format!("/ac/{key}")).status,
        200,
        "back: a hit again"
    );
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "mount -t tmpfs failed: the full-disk test needs root (the README's test command runs as root)"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the filesystem is full.
#[test]
fn a_slow_bucket_costs_a_completeness_check_one_read_timeout_in_all() {
    let (moto, _bucket) = moto_with_bucket("slow");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        &tmp.path().join("a"),
        &s3_args(&moto.endpoint(), "slow", "host-a"),
    );
    // An action result naming four outputs.
    let outs: Vec<Vec<u8>> = (0..4).map(|i| noise(3000, 900 + i)).collect();
    let key = action_with_outputs(&a, "", &outs, b"slow action");
    drained(&a);
    // Host B reads the action result through, then its bucket turns slow:
    // each answer takes 1.2 s of the 2 s read timeout, so asking about the
    // four outputs one by one would take 4.8 s.
    let proxy = Proxy::start(moto.port);
    let mut args = s3_args(&format!("127.0.0.1:{}", proxy.port), "slow", "host-b");
    args.push("--s3.existence_ttl=0s".into());
    let bdir = tmp.path().join("b");
    let b = start(&bdir, &args);
    // The action result itself is local once read through (a fast bucket).
    let (first, took) = timed_get(&b, &format!("/ac/{key}"));
    println!(
        "slow bucket: read-through GET /ac {} in {:.1} s",
        first.status,
        took.as_secs_f64()
    );
    assert_eq!(count_files(&bdir, "ac.v2"), 1);
    proxy.set(SLOW);
    let (r, took) = timed_get(&b, &format!("/ac/{key}"));
    println!(
        "slow bucket: GET /ac answered {} in {:.1} s ({:.1} s per bucket answer)",
        r.status,
        took.as_secs_f64(),
        SLOW_BY.as_secs_f64()
    );
    assert_eq!(r.status, 404, "not known complete in time: a miss");
    assert!(
        took < Duration::from_millis(3000),
        "the check waited {took:?}, more than one 2 s read timeout"
    );
    assert_eq!(
        count_files(&bdir, "ac.v2"),
        1,
        "an unknown answer removes nothing"
    );
    proxy.set(FORWARD);
    assert_eq!(b.get(&format!("/ac/{key}")).status, 200);
}

fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mb = vec![0x5au8; 1 << 20];
    while f.write_all(&mb).is_ok() {}
    let page = vec![0x5au8; 4096];
    while f.write_all(&page).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_with_pending_uploads_starts_serves_reads_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("disk");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let dir = mnt.join("cache");
    // A bucket nobody answers: uploads stay pending in the journal.
    let dead = free_port();
    let mut args = s3_args(&format!("127.0.0.1:{dead}"), "nowhere", "host-f");
    args.push("--upload_drain_timeout=1s".into());
    let h = start(&dir, &args);
    let blobs: Vec<Vec<u8>> = (0..20).map(|i| noise(4000, 300 + i)).collect();
    for b in &blobs {
        assert_eq!(h.put(&format!("/cas/{}", sha256_hex(b)), b).status, 200);
    }
    assert_eq!(h.stop(), Some(0));
    let journal = std::fs::read_to_string(dir.join("upload.journal")).unwrap();
    assert_eq!(journal.lines().filter(|l| l.starts_with('+')).count(), 20);

    fill(&mnt.join("filler"));
    let h = Hoard::try_start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap_or_else(|e| {
            panic!("hoard must start on a full disk with a non-empty journal: {e}")
        });
    h.wait_ready();
    for b in &blobs {
        let r = h.get(&format!("/cas/{}", sha256_hex(b)));
        assert_eq!(r.status, 200, "reads are served on a full disk");
        assert!(r.body == *b);
    }
    let new = noise(50_000, 777);
    let r = h.put(&format!("/cas/{}", sha256_hex(&new)), &new);
    println!("full disk: PUT answered {} {}", r.status, r.text().trim());
    assert_eq!(r.status, 507, "a write on a full disk is 507");
    assert!(
        r.text().contains("no space") && !r.text().contains(&mnt.display().to_string()),
        "the refusal names the problem, not a server path: {}",
        r.text()
    );

    std::fs::remove_file(mnt.join("filler")).unwrap();
    let r = h.put(&format!("/cas/{}", sha256_hex(&new)), &new);
    assert_eq!(r.status, 200, "space is back: writes work again");
    assert_eq!(h.get(&format!("/cas/{}", sha256_hex(&new))).body, new);
    assert_eq!(h.stop(), Some(0));
    let journal = std::fs::read_to_string(dir.join("upload.journal")).unwrap();
    let pending: std::collections::HashSet<&str> = journal
        .lines()
        .filter(|l| l.starts_with('+'))
        .filter_map(|l| l.split(' ').nth(3))
        .collect();
    assert!(
        pending.len() >= 20,
        "the pending uploads survived: {}",
        pending.len()
    );
}

fn status_of(h: &Hoard) -> serde_json::Value {
    serde_json::from_slice(&h.get("/status").body).unwrap()
}

#[test]
fn after_kill_9_hits_come_before_the_sizes_are_read_and_the_size_is_the_same_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let h = Hoard::start(&dir, &[]);
    h.wait_ready();
    let blobs: Vec<Vec<u8>> = (0..30)
        .map(|i| noise(2000 + 7919 * i, 6100 + i as u64))
        .collect();
    for b in &blobs {
        assert_eq!(h.put(&format!("/cas/{}", sha256_hex(b)), b).status, 200);
    }
    let before = status_of(&h);
    h.kill9();

    // The sizing pass waits 300 ms before each of about 30 directories,
    // on two threads: seconds of a ready cache whose sizes are not in.
    let h = Hoard::start_env(&dir, &[], &[("HOARD_TEST_INDEX_SIZING_PAUSE_MS", "300")]);
    h.wait_ready();
    let early = status_of(&h);
    assert_eq!(early["IndexSizesKnown"], false, "{early}");
    assert_eq!(early["NumFiles"], before["NumFiles"]);
    assert!(
        early["CurrSize"].as_u64() < before["CurrSize"].as_u64(),
        "{early} vs {before}"
    );
    assert!(
        h.get("/metrics")
            .text()
            .contains("hoard_index_sizes_known 0")
    );
    let runtime = rt();
    let ch = runtime.block_on(h.channel());
    for b in &blobs {
        let hash = sha256_hex(b);
        let r = h.get(&format!("/cas/{hash}"));
        assert!(r.status == 200 && r.body == *b, "HTTP hit while sizing");
        let res = format!("blobs/{hash}/{}", b.len());
        assert_eq!(
            runtime.block_on(bytestream(&ch, res, 0, 0)).as_deref(),
            Some(&b[..]),
            "ByteStream hit while sizing"
        );
        assert_eq!(
            runtime.block_on(batch(&ch, digest(b), false)).as_deref(),
            Some(&b[..]),
            "BatchReadBlobs hit while sizing"
        );
    }
    assert_eq!(
        status_of(&h)["IndexSizesKnown"],
        false,
        "the reads did not all meet unknown sizes"
    );
    let t = Instant::now();
    while status_of(&h)["IndexSizesKnown"] != true {
        assert!(t.elapsed() < Duration::from_secs(60), "sizing never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = status_of(&h);
    assert_eq!(after["CurrSize"], before["CurrSize"], "{after}");
    assert_eq!(after["NumFiles"], before["NumFiles"]);
    assert!(
        h.get("/metrics")
            .text()
            .contains("hoard_index_sizes_known 1")
    );
    assert_eq!(h.stop(), Some(0));
}

/// Flips a byte two thirds into, or cuts the end off, the stored file of
/// `hash`.
fn damage(dir: &Path, hash: &str, truncate: bool) {
    let f = files_under(dir)
        .into_iter()
        .find(|f| f.starts_with("cas.v2") && f.contains(hash))
        .unwrap_or_else(|| panic!("no stored file for {hash}"));
    let p = dir.join(f);
    let mut bytes = std::fs::read(&p).unwrap();
    if truncate {
        bytes.truncate(bytes.len() - 9);
    } else {
        let at = bytes.len() - bytes.len() / 3;
        bytes[at] ^= 0x20;
    }
    std::fs::write(&p, bytes).unwrap();
}

/// What one read path delivered: `None` for a failure (an error, a status
/// other than OK, a body cut short), else the content it claims.
type Delivered = Option<Vec<u8>>;

async fn bytestream(ch: &Channel, resource: String, offset: i64, limit: i64) -> Delivered {
    let mut s = ByteStreamClient::new(ch.clone())
        .read(ReadRequest {
            resource_name: resource,
            read_offset: offset,
            read_limit: limit,
        })
        .await
        .ok()?
        .into_inner();
    let mut out = Vec::new();
    loop {
        match s.message().await {
            Ok(Some(m)) => out.extend_from_slice(&m.data),
            Ok(None) => return Some(out),
            Err(_) => return None,
        }
    }
}

async fn batch(ch: &Channel, d: Digest, zstd: bool) -> Delivered {
    let r = ContentAddressableStorageClient::new(ch.clone())
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![d],
            acceptable_compressors: if zstd {
                vec![compressor::Value::Zstd as i32]
            } else {
                vec![]
            },
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let one = r.responses.into_iter().next()?;
    if one.status.as_ref().map(|s| s.code).unwrap_or(0) != 0 {
        return None;
    }
    if one.compressor == compressor::Value::Zstd as i32 {
        zstd::decode_all(&one.data[..]).ok()
    } else {
        Some(one.data.to_vec())
    }
}

#[test]
fn a_small_blob_once_read_is_served_from_memory_on_every_front_end_while_the_index_holds_it() {
    let runtime = rt();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let h = Hoard::start(&dir, &[]);
    h.wait_ready();
    let ch = runtime.block_on(h.channel());
    for (i, path) in ["http", "bytestream", "bytestream range", "batch"]
        .iter()
        .enumerate()
    {
        let data = noise(4000, 7700 + i as u64);
        let hash = sha256_hex(&data);
        assert_eq!(h.put(&format!("/cas/{hash}"), &data).status, 200);
        let read = |want: &[u8]| -> bool {
            let got = match *path {
                "http" => {
                    let r = h.get(&format!("/cas/{hash}"));
                    (r.status == 200).then_some(r.body)
                }
                "bytestream" => {
                    runtime.block_on(bytestream(&ch, format!("blobs/{hash}/4000"), 0, 0))
                }
                "bytestream range" => {
                    runtime.block_on(bytestream(&ch, format!("blobs/{hash}/4000"), 100, 50))
                }
                _ => runtime.block_on(batch(&ch, digest(&data), false)),
            };
            got.as_deref() == Some(want)
        };
        let want: &[u8] = if *path == "bytestream range" {
            &data[100..150]
        } else {
            &data
        };
        assert!(read(want), "{path}: first read, from the file");
        // The file is damaged behind hoard's back, but the verified copy
        // the first read kept is what the next read gets.
        damage(&dir, &hash, false);
        assert!(read(want), "{path}: second read, from memory");
        // A read that must go to the file (stored zstd frames) finds the
        // damage and drops the blob: from then on it is gone everywhere,
        // memory included.
        let frames = runtime.block_on(bytestream(
            &ch,
            format!("compressed-blobs/zstd/{hash}/4000"),
            0,
            0,
        ));
        assert!(frames.is_none(), "{path}: the damaged frames are refused");
        assert!(!read(want), "{path}: not served once the index dropped it");
        assert_eq!(h.get(&format!("/cas/{hash}")).status, 404);
    }
    assert_eq!(h.stop(), Some(0));
}

#[test]
fn damaged_files_are_never_served_as_a_complete_success_on_any_read_path() {
    let paths = [
        "http",
        "http zstd",
        "bytestream",
        "bytestream offset",
        "bytestream range",
        "compressed-blobs",
        "compressed-blobs offset",
        "batch",
        "batch zstd",
    ];
    let runtime = rt();
    let mut seed = 5000u64;
    let mut tally: HashMap<&str, (u32, u32)> = HashMap::new();
    for mode in ["zstd", "uncompressed"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let h = Hoard::start(&dir, &[&format!("--storage_mode={mode}")]);
        h.wait_ready();
        let ch = runtime.block_on(h.channel());
        for truncate in [false, true] {
            for size in [4000usize, (2 << 20) + 333] {
                for path in paths {
                    seed += 1;
                    let data = noise(size, seed);
                    let hash = sha256_hex(&data);
                    assert_eq!(h.put(&format!("/cas/{hash}"), &data).status, 200);
                    damage(&dir, &hash, truncate);
                    let d = digest(&data);
                    let res = format!("blobs/{hash}/{size}");
                    let zres = format!("compressed-blobs/zstd/{hash}/{size}");
                    let half = size / 2;
                    let (got, want): (Delivered, &[u8]) = match path {
                        "http" => {
                            let r = h.get(&format!("/cas/{hash}"));
                            (
                                (r.status == 200 && r.body.len() == size).then_some(r.body),
                                &data,
                            )
                        }
                        "http zstd" => {
                            let r = request(
                                h.addr,
                                "GET",
                                &format!("/cas/{hash}"),
                                &[("Accept-Encoding", "zstd")],
                                b"",
                            );
                            let whole = r
                                .header("content-length")
                                .and_then(|l| l.parse::<usize>().ok())
                                .is_none_or(|l| l == r.body.len());
                            let body = if r.header("content-encoding") == Some("zstd") {
                                zstd::decode_all(&r.body[..]).ok()
                            } else {
                                Some(r.body.clone())
                            };
                            ((r.status == 200 && whole).then_some(body).flatten(), &data)
                        }
                        "bytestream" => (runtime.block_on(bytestream(&ch, res, 0, 0)), &data),
                        "bytestream offset" => (
                            runtime.block_on(bytestream(&ch, res, half as i64, 0)),
                            &data[half..],
                        ),
                        "bytestream range" => (
                            runtime.block_on(bytestream(&ch, res, 10, 100)),
                            &data[10..110],
                        ),
                        "compressed-blobs" => (
                            runtime
                                .block_on(bytestream(&ch, zres, 0, 0))
                                .and_then(|z| zstd::decode_all(&z[..]).ok()),
                            &data,
                        ),
                        "compressed-blobs offset" => (
                            runtime
                                .block_on(bytestream(&ch, zres, half as i64, 0))
                                .and_then(|z| zstd::decode_all(&z[..]).ok()),
                            &data[half..],
                        ),
                        "batch" => (runtime.block_on(batch(&ch, d, false)), &data),
                        "batch zstd" => (runtime.block_on(batch(&ch, d, true)), &data),
                        _ => unreachable!(),
                    };
                    let what = format!("{mode}, {path}, size {size}, truncated {truncate}");
                    if let Some(got) = &got {
                        assert!(
                            got[..] == *want,
                            "{what}: wrong bytes delivered as a complete success"
                        );
                    } else {
                        assert_eq!(
                            h.get(&format!("/cas/{hash}")).status,
                            404,
                            "{what}: the damaged entry is dropped"
                        );
                    }
                    let t = tally.entry(path).or_default();
                    if got.is_some() {
                        t.0 += 1;
                    } else {
                        t.1 += 1;
                    }
                    // Whole-blob reads always meet the damage: they must fail.
                    if !path.contains("offset") && !path.contains("range") {
                        assert!(got.is_none(), "{what}: damage went unnoticed");
                    }
                }
            }
        }
        // The refusal names no server path.
        seed += 1;
        let data = noise((2 << 20) + 5, seed);
        let hash = sha256_hex(&data);
        assert_eq!(h.put(&format!("/cas/{hash}"), &data).status, 200);
        damage(&dir, &hash, false);
        let status = runtime.block_on(async {
            let mut s = ByteStreamClient::new(ch.clone())
                .read(ReadRequest {
                    resource_name: format!("blobs/{hash}/{}", data.len()),
                    read_offset: 0,
                    read_limit: 0,
                })
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        });
        let e = status.expect_err("a damaged blob fails the read");
        assert!(
            !e.message().contains(&tmp.path().display().to_string()),
            "{mode}: {}",
            e.message()
        );
        assert_eq!(h.get("/healthz").status, 200, "still serving");
    }
    let mut t: Vec<_> = tally.into_iter().collect();
    t.sort();
    println!("bit rot: per path (correct bytes, refused): {t:?}");
}

#[test]
fn sigterm_with_a_stalled_bucket_and_1000_queued_jobs_is_bounded_and_loses_nothing() {
    let (moto, bucket) = moto_with_bucket("stop");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let mut args = s3_args(&moto.endpoint(), "stop", "host-s");
    args.extend([
        format!(
            "--accounting.clickhouse_url=http://127.0.0.1:{}",
            free_port()
        ),
        "--accounting.flush_interval=60s".into(),
        "--upload_drain_timeout=3s".into(),
        "--shutdown_timeout=2s".into(),
    ]);
    let h = start(&dir, &args);
    for i in 0..10 {
        let b = noise(500, 40_000 + i);
        assert_eq!(h.put(&format!("/cas/{}", sha256_hex(&b)), &b).status, 200);
    }
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "created"), 10.0);

    // The bucket stops answering; 1,000 more uploads queue up behind it.
    moto.signal("STOP");
    for i in 0..1000 {
        let b = noise(100, 50_000 + i);
        assert_eq!(h.put(&format!("/cas/{}", sha256_hex(&b)), &b).status, 200);
    }
    let t = Instant::now();
    let code = h.stop();
    let took = t.elapsed();
    println!(
        "stop: exit {code:?} after {:.1} s with the bucket stalled and 1000 jobs queued",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(0));
    // shutdown_timeout 2 s + spool 5 s + drain 3 s + grace 3 s + accounting
    // 10 s + evictor 5 s is the bound; a dead ClickHouse fails fast.
    assert!(took < Duration::from_secs(28), "the stop is bounded");

    // Counts made before the stop are in the spool.
    let mut spooled: HashMap<String, u64> = HashMap::new();
    for f in files_under(&dir.join("accounting.spool")) {
        let text = std::fs::read_to_string(dir.join("accounting.spool").join(&f)).unwrap();
        let batch: serde_json::Value = serde_json::from_str(&text).unwrap();
        for row in batch["rows"].as_array().unwrap() {
            *spooled
                .entry(row["status"].as_str().unwrap().to_string())
                .or_default() += row["count"].as_u64().unwrap();
        }
    }
    println!("stop: spooled counts {spooled:?}");
    assert_eq!(spooled.get("created"), Some(&10));

    // The jobs are kept: the next start uploads every one.
    moto.signal("CONT");
    let h = start(&dir, &args);
    let o = drained(&h);
    println!("stop: next start, {} jobs, outcomes {o:?}", jobs(&h));
    assert_eq!(jobs(&h), 1000.0);
    assert_eq!(
        count(&o, "cas", "created") + count(&o, "cas", "already_exists"),
        1000.0
    );
    assert_eq!(bucket.objects().len(), 1010);
}

#[test]
fn closed_stdout_and_stderr_lose_log_lines_not_requests_or_signals() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(hoard_bin())
        .arg(format!("--dir={}", tmp.path().join("cache").display()))
        .arg(format!("--http_address=127.0.0.1:{port}"))
        .arg("--grpc_address=none")
        .arg("--fsync=false")
        .env("HOARD_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both pipes closed at the reading end before hoard writes a line.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "hoard died with closed log pipes"
        );
        assert!(Instant::now() < deadline, "hoard never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut answered = 0;
    for i in 0..100 {
        let b = noise(2000, 60_000 + i);
        let path = format!("/cas/{}", sha256_hex(&b));
        let len = b.len().to_string();
        let put = request(addr, "PUT", &path, &[("Content-Length", &len)], &b);
        let get = request(addr, "GET", &path, &[], b"");
        if put.status == 200 && get.status == 200 && get.body == b {
            answered += 1;
        }
    }
    println!("closed pipes: {answered} of 100 PUT+GET pairs answered");
    assert_eq!(answered, 100);
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            println!(
                "closed pipes: SIGTERM stopped hoard in {:.1} s, {st}",
                t.elapsed().as_secs_f64()
            );
            assert_eq!(st.code(), Some(0));
            break;
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("SIGTERM did not stop hoard with closed log pipes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
