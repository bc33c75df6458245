//! The HTTP API through a real socket: what Bazel relies on, and every kind
//! of bad input the foundation issue lists. Each bad-input test checks the
//! status, the message, and that nothing was stored or corrupted.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, Digest, OutputFile};

use crate::support::{Hoard, files_under, noise, request, sha256_hex};

const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn start() -> (tempfile::TempDir, Hoard) {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(&dir.path().join("cache"), &[]);
    h.wait_ready();
    (dir, h)
}

fn cache_files(h: &Hoard) -> Vec<String> {
    files_under(&h.dir)
}

fn action_result(files: &[(&str, &[u8])]) -> ActionResult {
    ActionResult {
        output_files: files
            .iter()
            .map(|(p, data)| OutputFile {
                path: p.to_string(),
                digest: Some(Digest {
                    hash: sha256_hex(data),
                    size_bytes: data.len() as i64,
                }),
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        ..Default::default()
    }
}

#[test]
fn cas_and_ac_round_trip_including_zstd_and_json() {
    let (_d, h) = start();
    let blob = noise(3 << 20, 1); // three casblob chunks, streamed
    let hx = sha256_hex(&blob);
    assert_eq!(h.put(&format!("/cas/{hx}"), &blob).status, 200);
    let r = h.get(&format!("/cas/{hx}"));
    assert_eq!((r.status, r.body == blob), (200, true));
    let r = h.request("HEAD", &format!("/cas/{hx}"), &[], b"");
    assert_eq!(
        r.header("content-length"),
        Some(blob.len().to_string().as_str())
    );

    // zstd in both directions.
    let small = b"compress me please compress me please".repeat(100);
    let sx = sha256_hex(&small);
    let z = zstd::encode_all(&small[..], 3).unwrap();
    let r = h.request(
        "PUT",
        &format!("/cas/{sx}"),
        &[
            ("Content-Length", &z.len().to_string()),
            ("Content-Encoding", "zstd"),
            ("X-Digest-SizeBytes", &small.len().to_string()),
        ],
        &z,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = h.request(
        "GET",
        &format!("/cas/{sx}"),
        &[("Accept-Encoding", "zstd")],
        b"",
    );
    assert_eq!(r.header("content-encoding"), Some("zstd"));
    assert_eq!(zstd::decode_all(&r.body[..]).unwrap(), small);

    // The empty blob always exists and is never stored.
    assert_eq!(h.get(&format!("/cas/{EMPTY}")).status, 200);
    assert_eq!(
        h.request("HEAD", &format!("/cas/{EMPTY}"), &[], b"").status,
        200
    );
    assert_eq!(h.put(&format!("/cas/{EMPTY}"), b"").status, 200);

    // An action result, binary in and JSON out, and JSON in.
    let ar = action_result(&[("out/big", &blob), ("out/small", &small)]);
    let key = sha256_hex(b"action 1");
    assert_eq!(
        h.put(&format!("/ac/{key}"), &ar.encode_to_vec()).status,
        200
    );
    let r = h.get(&format!("/ac/{key}"));
    assert_eq!(ActionResult::decode(&r.body[..]).unwrap(), ar);
    let r = h.request(
        "GET",
        &format!("/ac/{key}"),
        &[("Accept", "application/json")],
        b"",
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(json["outputFiles"][0]["path"], "out/big");
    let key2 = sha256_hex(b"action 2");
    let r = h.request(
        "PUT",
        &format!("/ac/{key2}"),
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", &r.body.len().to_string()),
        ],
        &r.body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        ActionResult::decode(&h.get(&format!("/ac/{key2}")).body[..]).unwrap(),
        ar
    );
}

#[test]
fn instance_prefixes_are_isolated_namespaces() {
    let (_d, h) = start();
    let blob = b"tenant data".to_vec();
    let hx = sha256_hex(&blob);
    assert_eq!(h.put(&format!("/team-a/cas/{hx}"), &blob).status, 200);
    assert_eq!(h.get(&format!("/team-a/cas/{hx}")).body, blob);
    assert_eq!(h.get(&format!("/cas/{hx}")).status, 404);
    assert_eq!(h.get(&format!("/team-b/cas/{hx}")).status, 404);
    assert!(
        cache_files(&h)
            .iter()
            .all(|f| f.starts_with("ns.v1/team-a/cas.v2/"))
    );
}

#[test]
fn a_cas_body_that_does_not_match_its_digest_is_refused_and_named() {
    let (_d, h) = start();
    let claimed = sha256_hex(b"what the client said");
    let r = h.put(&format!("/cas/{claimed}"), b"what the client sent");
    assert_eq!(r.status, 400);
    let msg = r.text();
    assert!(msg.contains(&claimed), "{msg}");
    assert!(msg.contains(&sha256_hex(b"what the client sent")), "{msg}");
    assert_eq!(h.get(&format!("/cas/{claimed}")).status, 404);
    assert!(cache_files(&h).is_empty());
}

#[test]
fn a_body_shorter_than_content_length_stores_nothing() {
    let (_d, h) = start();
    let blob = noise(100_000, 2);
    let hx = sha256_hex(&blob);
    let mut s = TcpStream::connect(h.addr).unwrap();
    write!(
        s,
        "PUT /cas/{hx} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    )
    .unwrap();
    s.write_all(&blob[..40_000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = crate::support::read_response(&mut s, false);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.get(&format!("/cas/{hx}")).status, 404);
    assert!(cache_files(&h).is_empty(), "{:?}", cache_files(&h));
}

#[test]
fn a_client_that_disconnects_mid_upload_leaves_no_temp_file() {
    let (_d, h) = start();
    let blob = noise(4 << 20, 3);
    let hx = sha256_hex(&blob);
    {
        let mut s = TcpStream::connect(h.addr).unwrap();
        write!(
            s,
            "PUT /cas/{hx} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            blob.len()
        )
        .unwrap();
        s.write_all(&blob[..(2 << 20)]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Mid-upload a temp file exists...
        assert!(cache_files(&h).iter().any(|f| f.ends_with(".tmp")));
    } // ...and the connection drops here.
    let mut gone = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        if cache_files(&h).is_empty() {
            gone = true;
            break;
        }
    }
    assert!(gone, "left behind: {:?}", cache_files(&h));
    assert_eq!(h.get(&format!("/cas/{hx}")).status, 404);
    // The server keeps serving.
    assert_eq!(h.put(&format!("/cas/{hx}"), &blob).status, 200);
}

#[test]
fn a_body_longer_than_its_declared_size_is_refused() {
    let (_d, h) = start();
    let blob = b"0123456789".to_vec();
    let hx = sha256_hex(&blob[..5]);
    // Declared 5 bytes, sent 10.
    let r = h.request(
        "PUT",
        &format!("/cas/{hx}"),
        &[("Content-Length", "10"), ("X-Digest-SizeBytes", "5")],
        &blob,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Content-Length 5 with 10 bytes on the wire: only the declared 5 are the
    // body; the rest is not a valid next request and is answered 400, while
    // the blob stored is exactly the 5 bytes.
    let mut s = TcpStream::connect(h.addr).unwrap();
    write!(
        s,
        "PUT /cas/{hx} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    )
    .unwrap();
    s.write_all(&blob).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut raw = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut raw);
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    assert_eq!(h.get(&format!("/cas/{hx}")).body, &blob[..5]);
    // A zstd body that decompresses to more than X-Digest-SizeBytes.
    let big = noise(10_000, 4);
    let z = zstd::encode_all(&big[..], 1).unwrap();
    let r = h.request(
        "PUT",
        &format!("/cas/{}", sha256_hex(&big)),
        &[
            ("Content-Length", &z.len().to_string()),
            ("Content-Encoding", "zstd"),
            ("X-Digest-SizeBytes", "100"),
        ],
        &z,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("size mismatch"), "{}", r.text());
}

#[test]
fn a_put_without_content_length_is_refused() {
    let (_d, h) = start();
    let hx = sha256_hex(b"abc");
    let r = h.request(
        "PUT",
        &format!("/cas/{hx}"),
        &[("Transfer-Encoding", "chunked")],
        b"3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Content-Length"), "{}", r.text());
    assert!(cache_files(&h).is_empty());
}

#[test]
fn malformed_digests_and_paths_never_touch_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(&dir.path().join("cache"), &[]);
    h.wait_ready();
    let good = sha256_hex(b"x");
    let paths = [
        format!("/cas/{}", &good[..63]),
        format!("/cas/{}", good.to_uppercase()),
        format!("/cas/{}zz", &good[..62]),
        format!("/cas/{good}0"),
        format!("/../cas/{good}"),
        format!("/../../etc/cas/{good}"),
        format!("/%2e%2e/cas/{good}"),
        format!("/a/%2e%2e/%2e%2e/cas/{good}"),
        format!("//cas/{good}"),
        format!("/a//cas/{good}"),
        "/etc/passwd".to_string(),
        format!("/tmp/../cas.v2/{good}"),
    ];
    for p in &paths {
        for method in ["GET", "PUT", "HEAD"] {
            let r = h.request(method, p, &[("Content-Length", "1")], b"x");
            assert_eq!(r.status, 400, "{method} {p}: {}", r.text());
            if method == "GET" {
                assert!(
                    r.text().contains("resource name must be") || r.text().contains("instance"),
                    "{}",
                    r.text()
                );
            }
        }
    }
    let r = h.request("POST", &format!("/cas/{good}"), &[], b"");
    assert_eq!(r.status, 405);
    // Nothing was created anywhere: the temp dir holds only the cache dir,
    // and the cache dir only its empty layout.
    let top: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(top, vec![std::ffi::OsString::from("cache")]);
    assert!(cache_files(&h).is_empty());
    assert!(!dir.path().join("cache/ns.v1").exists());
}

#[test]
fn unsupported_encodings_corrupt_zstd_and_oversized_blobs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(&dir.path().join("cache"), &["--max_blob_size=1000"]);
    h.wait_ready();
    let data = b"some bytes".to_vec();
    let hx = sha256_hex(&data);
    let r = h.request(
        "PUT",
        &format!("/cas/{hx}"),
        &[("Content-Length", "10"), ("Content-Encoding", "gzip")],
        &data,
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("gzip"), "{}", r.text());
    let r = h.request(
        "PUT",
        &format!("/cas/{hx}"),
        &[
            ("Content-Length", "10"),
            ("Content-Encoding", "zstd"),
            ("X-Digest-SizeBytes", "10"),
        ],
        b"notzstd!!!",
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("zstd"), "{}", r.text());
    let big = noise(2000, 5);
    let r = h.put(&format!("/cas/{}", sha256_hex(&big)), &big);
    assert_eq!(r.status, 413);
    assert!(r.text().contains("max_blob_size"), "{}", r.text());
    assert!(cache_files(&h).is_empty());
}

#[test]
fn malformed_action_results_and_absolute_paths_are_refused() {
    let (_d, h) = start();
    let key = sha256_hex(b"an action");
    let r = h.put(&format!("/ac/{key}"), b"\xff\xff\xff not a protobuf");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("ActionResult"), "{}", r.text());
    let ar = action_result(&[("/etc/passwd", b"x")]);
    let r = h.put(&format!("/ac/{key}"), &ar.encode_to_vec());
    assert_eq!(r.status, 400);
    assert!(r.text().contains("absolute"), "{}", r.text());
    let ar = action_result(&[("a/../../b", b"x")]);
    assert_eq!(
        h.put(&format!("/ac/{key}"), &ar.encode_to_vec()).status,
        400
    );
    let r = h.request(
        "PUT",
        &format!("/ac/{key}"),
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "9"),
        ],
        b"{\"bad\": 1",
    );
    assert_eq!(r.status, 400);
    assert!(cache_files(&h).is_empty());
}

#[test]
fn an_action_result_whose_outputs_are_missing_is_a_miss_and_is_removed() {
    let (_d, h) = start();
    let present = b"present output".to_vec();
    let absent = b"never uploaded".to_vec();
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&present)), &present)
            .status,
        200
    );
    let ar = action_result(&[("out/a", &present), ("out/b", &absent)]);
    let key = sha256_hex(b"incomplete action");
    assert_eq!(
        h.put(&format!("/ac/{key}"), &ar.encode_to_vec()).status,
        200
    );
    assert!(cache_files(&h).iter().any(|f| f.starts_with("ac.v2/")));
    assert_eq!(
        h.request("HEAD", &format!("/ac/{key}"), &[], b"").status,
        404
    );
    assert_eq!(h.get(&format!("/ac/{key}")).status, 404);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !cache_files(&h).iter().any(|f| f.starts_with("ac.v2/")),
        "{:?}",
        cache_files(&h)
    );
    // Complete again: served again.
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&absent)), &absent)
            .status,
        200
    );
    assert_eq!(
        h.put(&format!("/ac/{key}"), &ar.encode_to_vec()).status,
        200
    );
    assert_eq!(h.get(&format!("/ac/{key}")).status, 200);
    // A CAS blob deleted behind hoard's back makes the entry a miss too.
    let cas_file = cache_files(&h)
        .into_iter()
        .find(|f| f.contains(&sha256_hex(&absent)))
        .unwrap();
    std::fs::remove_file(h.dir.join(&cas_file)).unwrap();
    assert_eq!(h.get(&format!("/cas/{}", sha256_hex(&absent))).status, 404);
    assert_eq!(h.get(&format!("/ac/{key}")).status, 404);
}

#[test]
fn a_full_disk_answers_507_and_hoard_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small-disk");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("running mount");
    assert!(
        st.success(),
        "mounting a 2 MiB tmpfs failed: this test needs root (CAP_SYS_ADMIN) to build a disk that fills up"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(mnt.clone());
    let h = Hoard::start(&mnt.join("cache"), &[]);
    h.wait_ready();
    let big = noise(3 << 20, 6);
    let r = h.put(&format!("/cas/{}", sha256_hex(&big)), &big);
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(r.text().contains("no space"), "{}", r.text());
    assert!(!cache_files(&h).iter().any(|f| f.ends_with(".tmp")));
    let small = b"still fits".to_vec();
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&small)), &small)
            .status,
        200
    );
    assert_eq!(h.get(&format!("/cas/{}", sha256_hex(&small))).body, small);
}

#[test]
fn the_hard_limit_answers_507() {
    let dir = tempfile::tempdir().unwrap();
    // max_size 1 GiB, hard limit 1 GiB.
    let h = Hoard::start(
        &dir.path().join("c"),
        &["--max_size=1", "--max_size_hard_limit=1"],
    );
    h.wait_ready();
    // A stalled upload declaring 700 MiB holds only what it sent (one
    // reservation step), not the whole declared size.
    let mut s = TcpStream::connect(h.addr).unwrap();
    let hx = sha256_hex(b"big");
    write!(
        s,
        "PUT /cas/{hx} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\nabc",
        700u64 << 20
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // One that cannot fit beside what is held is refused before its body
    // is read.
    let r = h.request(
        "PUT",
        &format!("/cas/{}", sha256_hex(b"huge")),
        &[("Content-Length", &(1020u64 << 20).to_string())],
        b"",
    );
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(r.text().contains("max_size_hard_limit"), "{}", r.text());
    // Another upload still fits.
    let other = vec![7u8; 1024];
    let r = h.put(&format!("/cas/{}", sha256_hex(&other)), &other);
    assert_eq!(r.status, 200, "{}", r.text());
    drop(s);
}

#[test]
fn a_thousand_concurrent_puts_of_one_blob_store_one_correct_file() {
    let (_d, h) = start();
    let blob = noise(64 * 1024, 7);
    let hx = sha256_hex(&blob);
    let addr = h.addr;
    let handles: Vec<_> = (0..1000)
        .map(|_| {
            let blob = blob.clone();
            let hx = hx.clone();
            std::thread::spawn(move || {
                request(
                    addr,
                    "PUT",
                    &format!("/cas/{hx}"),
                    &[("Content-Length", &blob.len().to_string())],
                    &blob,
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let files = cache_files(&h);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(h.get(&format!("/cas/{hx}")).body, blob);
}

#[test]
fn data_survives_a_restart_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let blob = noise(200_000, 8);
    let hx = sha256_hex(&blob);
    let h = Hoard::start(&cache, &[]);
    h.wait_ready();
    assert_eq!(h.put(&format!("/cas/{hx}"), &blob).status, 200);
    assert_eq!(h.stop(), Some(0));
    let h = Hoard::start(&cache, &[]);
    h.wait_ready();
    assert_eq!(h.get(&format!("/cas/{hx}")).body, blob);
    let status: serde_json::Value = serde_json::from_slice(&h.get("/status").body).unwrap();
    assert_eq!(status["NumFiles"], 1);
    let metrics = h.get("/metrics").text();
    for name in [
        "bazel_remote_disk_cache_size_bytes",
        "bazel_remote_disk_cache_logical_bytes",
        "bazel_remote_disk_cache_evicted_bytes_total",
        "bazel_remote_incoming_requests_total",
        "http_request_duration_seconds",
        "hoard_index_entries",
        "hoard_inflight_bytes",
        "hoard_index_load_progress",
        "hoard_index_sizes_known",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[test]
fn sigterm_lets_an_in_flight_upload_finish() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(&dir.path().join("c"), &[]);
    h.wait_ready();
    let blob = noise(1 << 20, 9);
    let hx = sha256_hex(&blob);
    let mut s = TcpStream::connect(h.addr).unwrap();
    write!(
        s,
        "PUT /cas/{hx} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        blob.len()
    )
    .unwrap();
    s.write_all(&blob[..1000]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let pid = format!("{}", h_pid(&h));
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(&blob[1000..]).unwrap();
    let r = crate::support::read_response(&mut s, false);
    assert_eq!(r.status, 200);
    assert_eq!(h.stop(), Some(0));
    let h = Hoard::start(&dir.path().join("c"), &[]);
    h.wait_ready();
    assert_eq!(h.get(&format!("/cas/{hx}")).body, blob);
}

fn h_pid(h: &Hoard) -> u32 {
    h.pid()
}

#[test]
fn a_bad_configuration_value_exits_non_zero_with_one_line() {
    let out = std::process::Command::new(crate::support::hoard_bin())
        .args(["--max_size=lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("max_size"), "{err}");
}

/// One response on a keep-alive connection: status and body (by its
/// Content-Length).
fn read_one(s: &mut TcpStream) -> (u16, Vec<u8>) {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, body)
}

/// CPU time (clock ticks) of hoard's threads named `name`, summed.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // the thread ended
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with(&format!("({name}")) {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state, then ... utime (11) and stime (12).
        sum += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    sum
}

/// Small requests stay on the main runtime; a large PUT and GET move to
/// the bulk lane (threads named hoard-bulk, at lowered priority), and the
/// connection comes back: the small request after them on the same
/// keep-alive connection is answered, and the blob is whole.
#[test]
fn large_transfers_run_in_the_bulk_lane_and_small_ones_do_not() {
    let (_dir, h) = start();
    let pid = h.pid();
    let before = thread_ticks(pid, "hoard-bulk");
    for i in 0..300u64 {
        let small = noise(4096, i);
        let hx = sha256_hex(&small);
        assert_eq!(h.put(&format!("/cas/{hx}"), &small).status, 200);
        assert_eq!(h.get(&format!("/cas/{hx}")).body, small);
    }
    let small_cost = thread_ticks(pid, "hoard-bulk") - before;
    assert!(
        small_cost <= 1,
        "small requests cost the bulk lane {small_cost} ticks"
    );

    let big = noise(48 << 20, 7);
    let big_hx = sha256_hex(&big);
    let small = noise(4096, 1000);
    let small_hx = sha256_hex(&small);
    assert_eq!(h.put(&format!("/cas/{small_hx}"), &small).status, 200);
    // One keep-alive connection: big PUT, big GET, then a small GET.
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "PUT /cas/{big_hx} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    s.write_all(&big).unwrap();
    assert_eq!(read_one(&mut s).0, 200);
    write!(s, "GET /cas/{big_hx} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (status, body) = read_one(&mut s);
    assert_eq!(status, 200);
    assert!(body == big, "the large blob came back changed");
    write!(s, "GET /cas/{small_hx} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (status, body) = read_one(&mut s);
    assert_eq!((status, body == small), (200, true));
    let bulk_cost = thread_ticks(pid, "hoard-bulk") - before - small_cost;
    assert!(
        bulk_cost >= 3,
        "48 MiB each way cost the bulk lane only {bulk_cost} ticks"
    );
}

/// While small requests keep the main runtime busy, bulk hashing and
/// decoding take turns and rest (and say so in
/// `hoard_bulk_rest_seconds_total`); what they move still arrives whole.
#[test]
fn bulk_work_rests_while_small_requests_keep_hoard_busy() {
    let (_dir, h) = start();
    let rested = |h: &Hoard| crate::upload::metric(h, "hoard_bulk_rest_seconds_total");
    assert_eq!(rested(&h).get(""), Some(&0.0), "{:?}", rested(&h));
    let small: Vec<(String, Vec<u8>)> = (0..50u64)
        .map(|i| {
            let b = noise(4096, 5000 + i);
            (sha256_hex(&b), b)
        })
        .collect();
    for (hx, b) in &small {
        assert_eq!(h.put(&format!("/cas/{hx}"), b).status, 200);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (addr, small, stop) = (h.addr, small.clone(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (hx, b) = &small[(n + t) % small.len()];
                    let r = request(addr, "GET", &format!("/cas/{hx}"), &[], b"");
                    assert_eq!((r.status, &r.body == b), (200, true));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut round = 0u64;
    while rested(&h).get("").copied().unwrap_or(0.0) == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "bulk work never rested beside four busy small-GET clients"
        );
        let big = noise(16 << 20, 900 + round);
        let hx = sha256_hex(&big);
        assert_eq!(h.put(&format!("/cas/{hx}"), &big).status, 200);
        let back = h.get(&format!("/cas/{hx}"));
        assert!(
            back.status == 200 && back.body == big,
            "a large blob came back changed"
        );
        round += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let served = r.join().unwrap();
        assert!(served > 0);
    }
}
