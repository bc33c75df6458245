//! Clients that are slow, bursty, stalled or hostile, against a real hoard
//! over real sockets: none of them may cost a normal client its requests,
//! nor push hoard's memory past `max_inflight_bytes` plus a fixed overhead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use hoard_proto::google::bytestream::WriteRequest;
use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::prost::Message;
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    BatchReadBlobsRequest, Digest, Directory, FileNode, GetActionResultRequest, GetTreeRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::grpc::{digest, rt};
use crate::support::{Hoard, noise, sha256_hex};

const BUDGET: u64 = 32 << 20;

/// A well-formed upload UUID made from `n`.
fn uuid(n: u64) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        n >> 16,
        n & 0xffff_ffff_ffff
    )
}

fn start(extra: &[&str]) -> (tempfile::TempDir, Hoard) {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(&dir.path().join("cache"), extra);
    h.wait_ready();
    (dir, h)
}

fn status_field(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        * 1024
}

/// Resets the peak RSS the kernel tracks for `pid` and returns the RSS now.
fn reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    status_field(pid, "VmRSS:")
}

fn peak(pid: u32) -> u64 {
    status_field(pid, "VmHWM:")
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// One HTTP/1.1 request on a fresh connection, async; the status and body.
async fn fetch(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = || {
        std::io::Error::other(format!(
            "bad response: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        ))
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, raw[end + 4..].to_vec()))
}

#[test]
fn a_thousand_simultaneous_connections_trickling_their_heads_all_get_answers() {
    let (_d, h) = start(&[]);
    let blob = noise(4096, 1);
    let hx = sha256_hex(&blob);
    assert_eq!(h.put(&format!("/cas/{hx}"), &blob).status, 200);
    let addr = h.addr;
    let runtime = rt();
    let overflows = || {
        // TcpExt ListenOverflows: connects the kernel dropped because an
        // accept queue was full (system-wide).
        let s = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            return 0u64;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "ListenOverflows")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let before = overflows();
    for run in 1..=3 {
        let failures = runtime.block_on(async {
            let gate = Arc::new(tokio::sync::Barrier::new(1000));
            let mut tasks = Vec::new();
            for i in 0..1000usize {
                let gate = Arc::clone(&gate);
                let path = format!("/cas/{hx}");
                tasks.push(tokio::spawn(async move {
                    gate.wait().await;
                    let mut s = tokio::net::TcpStream::connect(addr).await?;
                    let head =
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    // 1 to 3 bytes at a time.
                    let mut rest = head.as_bytes();
                    let mut k = i;
                    while !rest.is_empty() {
                        let n = (1 + k % 3).min(rest.len());
                        k = k.wrapping_mul(7).wrapping_add(3);
                        s.write_all(&rest[..n]).await?;
                        rest = &rest[n..];
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let mut raw = Vec::new();
                    s.read_to_end(&mut raw).await?;
                    parse(&raw)
                }));
            }
            let mut failures = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok((200, body)) if body == blob => {}
                    _ => failures += 1,
                }
            }
            failures
        });
        println!("connection burst run {run}: 1000 connections, {failures} failures");
        assert_eq!(failures, 0, "run {run}");
    }
    let dropped = overflows() - before;
    println!("connection bursts: listen queue overflows {dropped}");
    assert_eq!(
        dropped, 0,
        "the kernel dropped connects: the backlog is too short"
    );
}

/// A client that reads `path` at about 1 KB/s for as long as `stop` is
/// unset.
async fn slow_reader(addr: std::net::SocketAddr, path: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        let _ = sock.set_recv_buffer_size(4096);
        let Ok(mut s) = sock.connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        if s.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => tokio::time::sleep(Duration::from_secs(1)).await,
                _ => break,
            }
        }
    }
}

/// A client that trickles a request head one byte per second, reconnecting
/// whenever hoard closes it.
async fn trickler(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, closed: Arc<AtomicUsize>) {
    let head = b"GET /cas/0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if s.write_all(&[*b]).await.is_err() {
                closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A normal client for `time`: a 4 KiB GET and a fresh 64 KiB PUT in turn,
/// each on a new connection; every one must succeed. Their latencies.
async fn normal_client(
    addr: std::net::SocketAddr,
    small_path: &str,
    small: &[u8],
    time: Duration,
    seed: u64,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut gets = Vec::new();
    let mut puts = Vec::new();
    let started = Instant::now();
    let mut n = seed;
    while started.elapsed() < time {
        let t = Instant::now();
        let (status, body) = fetch(addr, "GET", small_path, b"").await.unwrap();
        assert_eq!(status, 200, "normal GET");
        assert_eq!(body, small);
        gets.push(t.elapsed());
        let blob = noise(64 * 1024, n);
        n += 1;
        let t = Instant::now();
        let (status, _) = fetch(addr, "PUT", &format!("/cas/{}", sha256_hex(&blob)), &blob)
            .await
            .unwrap();
        assert_eq!(status, 200, "normal PUT");
        puts.push(t.elapsed());
    }
    (gets, puts)
}

#[test]
fn trickling_slow_and_stalled_clients_cost_a_normal_client_nothing() {
    let budget = BUDGET.to_string();
    let (_d, h) = start(&[
        &format!("--max_inflight_bytes={budget}"),
        "--request_header_timeout=5s",
        "--client_idle_timeout=30s",
        "--max_inflight_wait=20s",
    ]);
    let big = noise(16 << 20, 2);
    let big_path = format!("/cas/{}", sha256_hex(&big));
    assert_eq!(h.put(&big_path, &big).status, 200);
    let small = noise(4096, 3);
    let small_path = format!("/cas/{}", sha256_hex(&small));
    assert_eq!(h.put(&small_path, &small).status, 200);
    let addr = h.addr;
    let grpc = h.grpc.unwrap();
    let runtime = rt();
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let (idle_gets, idle_puts) = runtime.block_on(normal_client(
        addr,
        &small_path,
        &small,
        Duration::from_secs(4),
        500_000,
    ));
    println!(
        "without attack: {} GETs p99 {:?}, {} PUTs p99 {:?}",
        idle_gets.len(),
        p99(idle_gets),
        idle_puts.len(),
        p99(idle_puts)
    );
    let base = reset_peak(h.pid());
    let (gets, puts) = runtime.block_on(async {
        let mut attackers = Vec::new();
        for _ in 0..2000 {
            attackers.push(tokio::spawn(trickler(addr, Arc::clone(&stop), Arc::clone(&closed))));
        }
        for _ in 0..200 {
            attackers.push(tokio::spawn(slow_reader(addr, big_path.clone(), Arc::clone(&stop))));
        }
        // 300 ByteStream writes that send one 64 KiB message and stall,
        // over 10 connections.
        for c in 0..10 {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            for i in 0..30 {
                let ch = ch.clone();
                let stop = Arc::clone(&stop);
                attackers.push(tokio::spawn(async move {
                    let data = noise(1 << 20, c * 100 + i + 10);
                    let d = digest(&data);
                    let first = WriteRequest {
                        resource_name: format!(
                            "uploads/{}/blobs/{}/{}",
                            uuid(c * 100 + i),
                            d.hash,
                            d.size_bytes
                        ),
                        write_offset: 0,
                        finish_write: false,
                        data: Bytes::copy_from_slice(&data[..64 * 1024]),
                    };
                    // One message, then nothing, ever.
                    let stream = futures_util::StreamExt::chain(
                        futures_util::stream::iter([first]),
                        futures_util::stream::pending(),
                    );
                    let mut client = ByteStreamClient::new(ch);
                    let call = client.write(stream);
                    tokio::select! {
                        _ = call => {}
                        _ = async { while !stop.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(200)).await } } => {}
                    }
                }));
            }
        }
        // Let the attack build up.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let during = normal_client(addr, &small_path, &small, Duration::from_secs(12), 1000).await;
        stop.store(true, Ordering::Relaxed);
        for a in attackers {
            a.abort();
        }
        during
    });
    let peak_growth = peak(h.pid()).saturating_sub(base);
    println!(
        "under attack (2000 tricklers, 200 slow readers, 300 stalled writes): {} GETs p99 {:?}, {} PUTs p99 {:?}; trickling connections closed by hoard {}; peak RSS +{:.1} MiB (budget {:.0} MiB)",
        gets.len(),
        p99(gets.clone()),
        puts.len(),
        p99(puts.clone()),
        closed.load(Ordering::Relaxed),
        mib(peak_growth),
        mib(BUDGET)
    );
    assert!(
        gets.len() >= 20,
        "the normal client got through too few requests"
    );
    assert!(
        closed.load(Ordering::Relaxed) >= 1000,
        "the request-header timeout did not close the trickling connections"
    );
    // The fixed overhead beside the budget: up to 48 KiB per open
    // connection (hyper's buffers and task; 2,510 here) and 64 MiB for the
    // rest (the normal client's writes, index growth, allocator slack).
    let overhead = 2510 * (48u64 << 10) + (64 << 20);
    assert!(
        peak_growth <= BUDGET + overhead,
        "peak RSS grew by {:.1} MiB",
        mib(peak_growth)
    );
    assert_eq!(h.get(&small_path).status, 200);
}

/// `hoard_inflight_bytes` from `/metrics`.
fn inflight(h: &Hoard) -> u64 {
    h.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("hoard_inflight_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn memory_bypasses_stay_within_the_budget() {
    let (_d, h) = start(&[&format!("--max_inflight_bytes={BUDGET}")]);
    let pid = h.pid();
    let runtime = rt();
    let fixed = 64u64 << 20;
    let mut report = Vec::new();

    // 1. zstd frames declaring a 128 MiB window for a 4 KB body.
    let data = noise(4096, 5);
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    enc.window_log(27).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &data).unwrap();
    let z = enc.finish().unwrap();
    let mut strict = zstd::stream::Decoder::new(&z[..]).unwrap();
    strict.window_log_max(26).unwrap();
    assert!(
        std::io::Read::read_to_end(&mut strict, &mut Vec::new()).is_err(),
        "the attack frame does not declare a 2^27 window"
    );
    let base = reset_peak(pid);
    let path = format!("/cas/{}", sha256_hex(&data));
    let addr = h.addr;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    crate::support::request(
                        addr,
                        "PUT",
                        &path,
                        &[
                            ("Content-Length", &z.len().to_string()),
                            ("Content-Encoding", "zstd"),
                            ("X-Digest-SizeBytes", "4096"),
                        ],
                        &z,
                    )
                    .status
                })
            })
            .collect();
        hs.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 400), "{statuses:?}");
    let grew = peak(pid).saturating_sub(base);
    report.push(format!(
        "8 zstd PUTs with windowLog 27: all 400, peak +{:.1} MiB",
        mib(grew)
    ));
    assert!(grew <= fixed, "zstd windows: +{:.1} MiB", mib(grew));

    // 2. An action result declaring 1 byte, sent as a 64 MiB chunked body.
    let base = reset_peak(pid);
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    let hx = sha256_hex(b"x");
    std::io::Write::write_all(
        &mut s,
        format!("PUT /ac/{hx} HTTP/1.1\r\nHost: x\r\nX-Digest-SizeBytes: 1\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..64 {
            let head = format!("{:x}\r\n", chunk.len());
            if std::io::Write::write_all(&mut w, head.as_bytes()).is_err()
                || std::io::Write::write_all(&mut w, &chunk).is_err()
                || std::io::Write::write_all(&mut w, b"\r\n").is_err()
            {
                return;
            }
        }
        let _ = std::io::Write::write_all(&mut w, b"0\r\n\r\n");
    });
    let r = crate::support::read_response(&mut s, false);
    let _ = writer.join();
    assert_eq!(r.status, 400, "{}", r.text());
    let grew = peak(pid).saturating_sub(base);
    report.push(format!(
        "AC PUT declaring 1 byte, 64 MiB chunked body: {}, peak +{:.1} MiB",
        r.status,
        mib(grew)
    ));
    assert!(grew <= fixed, "AC body: +{:.1} MiB", mib(grew));

    // 3. 200 concurrent BatchReadBlobs of 4 x 1 MiB.
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| noise(1 << 20, 50 + i)).collect();
    for b in &blobs {
        assert_eq!(h.put(&format!("/cas/{}", sha256_hex(b)), b).status, 200);
    }
    let base = reset_peak(pid);
    let ok = runtime.block_on(async {
        let mut calls = Vec::new();
        for c in 0..4 {
            let ch = h.channel().await;
            for _ in 0..50 {
                let mut client = ContentAddressableStorageClient::new(ch.clone())
                    .max_decoding_message_size(16 << 20);
                let digests: Vec<Digest> = blobs.iter().map(|b| digest(b)).collect();
                let _ = c;
                calls.push(tokio::spawn(async move {
                    let r = client
                        .batch_read_blobs(BatchReadBlobsRequest {
                            digests,
                            ..Default::default()
                        })
                        .await;
                    matches!(r, Ok(r) if r.get_ref().responses.iter().all(|x| x.status.as_ref().is_some_and(|s| s.code == 0)))
                }));
            }
        }
        let mut ok = 0;
        for c in calls {
            ok += c.await.unwrap() as usize;
        }
        ok
    });
    let grew = peak(pid).saturating_sub(base);
    report.push(format!(
        "200 concurrent BatchReadBlobs of 4 MiB: {ok} OK, peak +{:.1} MiB",
        mib(grew)
    ));
    assert!(ok >= 190, "{ok} of 200 batch reads succeeded");
    assert!(grew <= BUDGET + fixed, "batch reads: +{:.1} MiB", mib(grew));

    // 4. 8 GetTree calls on a 62 MiB Directory.
    let dir = Directory {
        files: (0..490_000u32)
            .map(|i| FileNode {
                name: format!("{i:060}"),
                digest: Some(digest(&i.to_le_bytes())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let bytes = dir.encode_to_vec();
    assert!(bytes.len() > 60 << 20, "{}", bytes.len());
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&bytes)), &bytes)
            .status,
        200
    );
    let root = digest(&bytes);
    let base = reset_peak(pid);
    let codes = runtime.block_on(async {
        let ch = h.channel().await;
        let mut calls = Vec::new();
        for _ in 0..8 {
            let mut client = ContentAddressableStorageClient::new(ch.clone());
            let root = root.clone();
            calls.push(tokio::spawn(async move {
                match client
                    .get_tree(GetTreeRequest {
                        root_digest: Some(root),
                        ..Default::default()
                    })
                    .await
                {
                    Err(s) => s.code(),
                    Ok(r) => {
                        let mut r = r.into_inner();
                        loop {
                            match r.message().await {
                                Ok(Some(_)) => {}
                                Ok(None) => break Code::Ok,
                                Err(s) => break s.code(),
                            }
                        }
                    }
                }
            }));
        }
        let mut codes = Vec::new();
        for c in calls {
            codes.push(c.await.unwrap());
        }
        codes
    });
    let grew = peak(pid).saturating_sub(base);
    report.push(format!(
        "8 GetTree on a {:.0} MiB Directory: {codes:?}, peak +{:.1} MiB",
        mib(bytes.len() as u64),
        mib(grew)
    ));
    assert!(
        codes.iter().all(|c| *c == Code::FailedPrecondition),
        "{codes:?}"
    );
    assert!(grew <= fixed, "GetTree: +{:.1} MiB", mib(grew));
    for line in report {
        println!("memory bypass: {line}");
    }
    assert_eq!(inflight(&h), 0, "in-flight bytes left held");
}

#[test]
fn stalled_uploads_hold_no_reservation_against_the_hard_limit() {
    let (_d, h) = start(&["--max_size=1", "--max_size_hard_limit=1"]);
    let runtime = rt();
    let others = |what: &str| {
        for i in 0..2 {
            let blob = noise(40 << 20, 700 + i);
            let r = h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob);
            assert_eq!(r.status, 200, "{what}: {}", r.text());
        }
        let blob = noise(40 << 20, 800 + what.len() as u64);
        runtime.block_on(async {
            let ch = h.channel().await;
            let d = digest(&blob);
            let msgs: Vec<WriteRequest> = blob
                .chunks(1 << 20)
                .enumerate()
                .map(|(i, c)| WriteRequest {
                    resource_name: if i == 0 {
                        format!(
                            "uploads/{}/blobs/{}/{}",
                            uuid(what.len() as u64),
                            d.hash,
                            d.size_bytes
                        )
                    } else {
                        String::new()
                    },
                    write_offset: (i << 20) as i64,
                    finish_write: (i + 1) << 20 >= blob.len(),
                    data: Bytes::copy_from_slice(c),
                })
                .collect();
            let r = ByteStreamClient::new(ch)
                .write(futures_util::stream::iter(msgs))
                .await;
            assert!(r.is_ok(), "{what}: ByteStream write {r:?}");
        });
    };
    // A PUT declaring 1,000 MiB that sends 1 KiB and stalls.
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    let hx = sha256_hex(b"never");
    std::io::Write::write_all(
        &mut s,
        format!(
            "PUT /cas/{hx} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            1000u64 << 20
        )
        .as_bytes(),
    )
    .unwrap();
    std::io::Write::write_all(&mut s, &[1u8; 1024]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    others("stalled HTTP PUT");
    drop(s);
    // A ByteStream write of a declared 800 MiB (it fits beside the 120 MiB
    // stored above) that sends one byte and ends its stream: the upload
    // stays paused, resumable, for the resumable-upload TTL.
    runtime.block_on(async {
        let ch = h.channel().await;
        let r = ByteStreamClient::new(ch)
            .write(futures_util::stream::iter([WriteRequest {
                resource_name: format!(
                    "uploads/{}/blobs/{}/{}",
                    uuid(7777),
                    sha256_hex(b"p"),
                    800u64 << 20
                ),
                write_offset: 0,
                finish_write: false,
                data: Bytes::from_static(b"p"),
            }]))
            .await;
        assert!(r.is_ok(), "{r:?}");
    });
    others("paused ByteStream write");
}

#[test]
fn reads_of_made_up_namespaces_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let h = Hoard::start(&cache, &["--namespaces.max=5"]);
    h.wait_ready();
    let hx = sha256_hex(b"absent");
    let before = crate::support::files_under(&cache).len();
    let dirs = |p: &std::path::Path| {
        std::fs::read_dir(p.join("ns.v1"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    let ns_before = dirs(&cache);
    for i in 0..300 {
        assert_eq!(h.get(&format!("/rnd-{i}/cas/{hx}")).status, 404);
        assert_eq!(h.get(&format!("/rnd-{i}/ac/{hx}")).status, 404);
        assert_eq!(
            h.request("HEAD", &format!("/rnd-{i}/cas/{hx}"), &[], b"")
                .status,
            404
        );
    }
    let runtime = rt();
    runtime.block_on(async {
        let ch = h.channel().await;
        for i in 0..100 {
            let r = ActionCacheClient::new(ch.clone())
                .get_action_result(GetActionResultRequest {
                    instance_name: format!("g-{i}"),
                    action_digest: Some(digest(b"absent")),
                    ..Default::default()
                })
                .await;
            assert_eq!(r.err().map(|s| s.code()), Some(Code::NotFound));
            let r = ContentAddressableStorageClient::new(ch.clone())
                .find_missing_blobs(hoard_proto::reapi::FindMissingBlobsRequest {
                    instance_name: format!("f-{i}"),
                    blob_digests: vec![digest(b"absent")],
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(r.get_ref().missing_blob_digests.len(), 1);
        }
    });
    assert_eq!(dirs(&cache), ns_before, "a read created a namespace");
    assert_eq!(crate::support::files_under(&cache).len(), before);
    let status: serde_json::Value = serde_json::from_slice(&h.get("/status").body).unwrap();
    assert!(
        status["Namespaces"].as_array().unwrap().len() <= 1,
        "{}",
        status["Namespaces"]
    );
    // A real tenant still gets its namespace, also after a restart.
    let blob = b"tenant data".to_vec();
    assert_eq!(
        h.put(&format!("/tenant/cas/{}", sha256_hex(&blob)), &blob)
            .status,
        200
    );
    drop(h);
    let h = Hoard::start(&cache, &["--namespaces.max=5"]);
    h.wait_ready();
    assert_eq!(
        h.get(&format!("/tenant/cas/{}", sha256_hex(&blob))).body,
        blob
    );
    assert_eq!(
        h.put(&format!("/tenant2/cas/{}", sha256_hex(&blob)), &blob)
            .status,
        200
    );
}

#[test]
fn refusals_reach_clients_that_send_first_and_half_closed_requests_are_answered() {
    let (_d, h) = start(&["--max_blob_size=1048576"]);
    let body = vec![9u8; 20 << 20];
    let cases = [
        (
            "413 too large",
            format!(
                "PUT /cas/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                sha256_hex(&body),
                body.len()
            ),
            413,
        ),
        (
            "400 bad encoding",
            format!(
                "PUT /cas/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nContent-Encoding: br\r\n\r\n",
                sha256_hex(&body),
                body.len()
            ),
            400,
        ),
    ];
    for (what, head, want) in &cases {
        for i in 0..6 {
            // Send everything, then read: the way simple clients work.
            let mut s = std::net::TcpStream::connect(h.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
            let sent = std::io::Write::write_all(&mut s, &body);
            let mut raw = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut raw);
            let got = parse(&raw).map(|(c, _)| c).ok();
            assert_eq!(
                got,
                Some(*want),
                "{what}, try {i}: send {sent:?}, got {} bytes",
                raw.len()
            );
        }
    }
    let blob = noise(100_000, 8);
    let path = format!("/cas/{}", sha256_hex(&blob));
    assert_eq!(h.put(&path, &blob).status, 200);
    for i in 0..20 {
        let mut s = std::net::TcpStream::connect(h.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut raw = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut raw);
        let got = parse(&raw).ok();
        assert!(
            matches!(&got, Some((200, b)) if *b == blob),
            "half-closed GET {i}: {} bytes",
            raw.len()
        );
    }
    println!(
        "refusals: 12 of 12 send-then-read clients read their 413/400; 20 of 20 half-closed GETs answered"
    );
}

#[test]
fn clients_that_stop_reading_or_sending_give_their_memory_back() {
    let (_d, h) = start(&[
        &format!("--max_inflight_bytes={BUDGET}"),
        "--client_idle_timeout=2s",
    ]);
    let big = noise(16 << 20, 12);
    let path = format!("/cas/{}", sha256_hex(&big));
    assert_eq!(h.put(&path, &big).status, 200);
    // 20 readers that never read (small receive buffers), and 20 writers
    // that never send more.
    let runtime = rt();
    let addr = h.addr;
    let readers: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut v = Vec::new();
        for _ in 0..20 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            let mut s = sock.connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            v.push(s);
        }
        v
    });
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let grpc = h.grpc.unwrap();
            runtime.spawn(async move {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let data = noise(4 << 20, 900 + i);
                let d = digest(&data);
                let first = WriteRequest {
                    resource_name: format!(
                        "uploads/{}/blobs/{}/{}",
                        uuid(5000 + i),
                        d.hash,
                        d.size_bytes
                    ),
                    write_offset: 0,
                    finish_write: false,
                    data: Bytes::copy_from_slice(&data[..1 << 20]),
                };
                let stream = futures_util::StreamExt::chain(
                    futures_util::stream::iter([first]),
                    futures_util::stream::pending(),
                );
                ByteStreamClient::new(ch)
                    .write(stream)
                    .await
                    .err()
                    .map(|s| s.code())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let held = inflight(&h);
    println!(
        "stalled clients hold {:.1} MiB of in-flight memory",
        mib(held)
    );
    assert!(
        held > 0,
        "the stalled readers hold nothing: the test does not stall them"
    );
    let t = Instant::now();
    while inflight(&h) > 0 && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = t.elapsed() + Duration::from_millis(1000);
    assert_eq!(inflight(&h), 0, "memory still held after {after:?}");
    let codes: Vec<_> = writers
        .into_iter()
        .map(|w| runtime.block_on(w).unwrap())
        .collect();
    println!(
        "stalled clients gave back their memory {after:?} after they stalled; writers ended with {:?}",
        codes[0]
    );
    // Each stalled call fails; normally on its own timeout, with a status
    // the client can read (a connection cut first, on a loaded machine,
    // shows as another code).
    assert!(codes.iter().all(|c| c.is_some()), "{codes:?}");
    let deadline = codes
        .iter()
        .filter(|c| **c == Some(Code::DeadlineExceeded))
        .count();
    assert!(deadline >= 15, "{codes:?}");
    drop(readers);
    assert_eq!(h.get(&path).body.len(), big.len());
}

/// Sends raw bytes as a gRPC message and reads whatever comes back.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

#[test]
fn undecodable_and_oversized_requests_get_client_error_codes_on_every_method() {
    let (_d, h) = start(&[]);
    let runtime = rt();
    let methods: &[(&str, &str)] = &[
        (
            "unary",
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        ),
        (
            "unary",
            "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
        ),
        (
            "unary",
            "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
        ),
        (
            "unary",
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        ),
        (
            "unary",
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
        ),
        (
            "unary",
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
        ),
        (
            "server",
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
        ),
        ("server", "/google.bytestream.ByteStream/Read"),
        ("client", "/google.bytestream.ByteStream/Write"),
        ("unary", "/google.bytestream.ByteStream/QueryWriteStatus"),
        ("unary", "/grpc.health.v1.Health/Check"),
    ];
    // A field tag with wire type 7 does not exist: no message decodes it.
    let garbage = Bytes::from_static(&[0x0f, 0xff, 0xff, 0xff]);
    let oversized = Bytes::from(vec![0u8; 6 << 20]);
    let mut table = Vec::new();
    runtime.block_on(async {
        let ch = h.channel().await;
        for (shape, path) in methods {
            for (what, body, want) in [
                ("undecodable", garbage.clone(), Code::InvalidArgument),
                ("oversized", oversized.clone(), Code::ResourceExhausted),
            ] {
                let mut g = tonic::client::Grpc::new(ch.clone());
                g.ready().await.unwrap();
                let p = tonic::codegen::http::uri::PathAndQuery::from_static(path);
                let r: Result<(), tonic::Status> = match *shape {
                    "unary" => g
                        .unary(tonic::Request::new(body), p, RawCodec)
                        .await
                        .map(|_| ()),
                    "server" => match g
                        .server_streaming(tonic::Request::new(body), p, RawCodec)
                        .await
                    {
                        Err(s) => Err(s),
                        Ok(r) => r.into_inner().message().await.map(|_| ()),
                    },
                    _ => g
                        .client_streaming(
                            tonic::Request::new(futures_util::stream::iter([body])),
                            p,
                            RawCodec,
                        )
                        .await
                        .map(|_| ()),
                };
                let s = r.expect_err("a bad request succeeded");
                table.push(format!("{path} {what}: {:?}", s.code()));
                assert_eq!(s.code(), want, "{path} {what}: {}", s.message());
                assert!(
                    s.message().len() <= 600,
                    "{path}: a {}-byte message",
                    s.message().len()
                );
            }
        }
        // A 20 KB resource name is not echoed whole.
        let name = "x/".repeat(10_000);
        let r = ByteStreamClient::new(ch.clone())
            .read(hoard_proto::google::bytestream::ReadRequest {
                resource_name: name,
                ..Default::default()
            })
            .await;
        let s = r.expect_err("a bad resource name was accepted");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().len() <= 600, "{}", s.message().len());
        // GetTree of a blob that is not a Directory is the client's error.
        let not_dir = b"\xff\xff not a directory".to_vec();
        assert_eq!(
            h.put(&format!("/cas/{}", sha256_hex(&not_dir)), &not_dir)
                .status,
            200
        );
        let r = ContentAddressableStorageClient::new(ch)
            .get_tree(GetTreeRequest {
                root_digest: Some(digest(&not_dir)),
                ..Default::default()
            })
            .await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::InvalidArgument));
    });
    println!("gRPC codes: {}", table.join("; "));
}
