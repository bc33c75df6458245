//! S3-tier load generators: upload throughput until every job has its
//! outcome, PUT latency with the bucket up and down, HEADs per GET.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, Digest, OutputFile};
use sha2::{Digest as _, Sha256};

use crate::{Res, build_output, http, noise};

fn hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Sum of a metric's series on hoard's /metrics, filtered by a label text.
fn metric(addr: SocketAddr, name: &str, filter: &str) -> Res<f64> {
    let text = get_text(addr, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum())
}

fn get_text(addr: SocketAddr, path: &str) -> Res<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn wait_drained(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = metric(addr, "hoard_upload_jobs_total", "")?;
        let done = metric(addr, "hoard_upload_outcomes_total", "")?;
        if jobs > 0.0 && jobs == done {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not drained: {jobs} jobs, {done} outcomes").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// PUTs `count` fresh blobs of `size` bytes, then waits until every upload
/// has its outcome; reports uploads/s and MB/s from first PUT to last outcome.
pub fn upload_throughput(addr: SocketAddr, size: usize, count: u64, seed: u64) -> Res<()> {
    let blobs: Vec<Vec<u8>> = (0..count).map(|i| build_output(size, seed + i)).collect();
    let t = Instant::now();
    for b in &blobs {
        let (status, _) = http(addr, "PUT", &format!("/cas/{}", hex(b)), b)?;
        if status != 200 {
            return Err(format!("PUT {status}").into());
        }
    }
    wait_drained(addr)?;
    let secs = t.elapsed().as_secs_f64();
    let created = metric(addr, "hoard_upload_outcomes_total", "status=\"created\"")?;
    println!(
        "upload_size={size} uploads={count} created={created} uploads_per_s={:.0} mb_per_s={:.1}",
        count as f64 / secs,
        (size as f64 * count as f64) / secs / 1e6
    );
    Ok(())
}

/// Latency of sequential 4 KiB PUTs.
pub fn put_latency(addr: SocketAddr, count: u64, seed: u64) -> Res<()> {
    let mut lat = Vec::with_capacity(count as usize);
    for i in 0..count {
        let b = noise(4096, seed + i);
        let t = Instant::now();
        let (status, _) = http(addr, "PUT", &format!("/cas/{}", hex(&b)), &b)?;
        lat.push(t.elapsed());
        if status != 200 {
            return Err(format!("PUT {status}").into());
        }
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!("puts={count} p50_ms={:.2} p99_ms={:.2}", p(0.5), p(0.99));
    Ok(())
}

/// A warm mixed workload on a second host: `actions` action results with
/// three outputs each, uploaded through host `a`, then read `rounds` times
/// through host `b` as Bazel does (GET /ac, then GET /cas of each output).
/// Reports the bucket HEADs `b` made per GET it served.
pub fn heads_per_get(a: SocketAddr, b: SocketAddr, actions: u64, rounds: u64) -> Res<()> {
    let mut keys = Vec::new();
    for i in 0..actions {
        let outs: Vec<Vec<u8>> = (0..3)
            .map(|k| noise(2048 + k * 100, 70_000 + i * 10 + k as u64))
            .collect();
        for o in &outs {
            http(a, "PUT", &format!("/cas/{}", hex(o)), o)?;
        }
        let ar = ActionResult {
            output_files: outs
                .iter()
                .enumerate()
                .map(|(k, o)| OutputFile {
                    path: format!("out/{k}"),
                    digest: Some(Digest {
                        hash: hex(o),
                        size_bytes: o.len() as i64,
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let key = hex(format!("action {i}").as_bytes());
        http(a, "PUT", &format!("/ac/{key}"), &ar.encode_to_vec())?;
        keys.push((key, outs));
    }
    wait_drained(a)?;
    let mut gets = 0u64;
    let heads_of = || metric(b, "hoard_s3_request_duration_seconds_count", "op=\"head\"");
    let mut last_heads = heads_of()?;
    for round in 1..=rounds {
        let round_gets = gets;
        for (key, outs) in &keys {
            let (s, _) = http(b, "GET", &format!("/ac/{key}"), b"")?;
            if s != 200 {
                return Err(format!("GET /ac {s}").into());
            }
            gets += 1;
            for o in outs {
                let (s, _) = http(b, "GET", &format!("/cas/{}", hex(o)), b"")?;
                if s != 200 {
                    return Err(format!("GET /cas {s}").into());
                }
                gets += 1;
            }
        }
        let h = heads_of()?;
        println!(
            "round={round} client_gets={} bucket_heads={} heads_per_client_get={:.3}",
            gets - round_gets,
            h - last_heads,
            (h - last_heads) / (gets - round_gets) as f64
        );
        last_heads = h;
    }
    let heads = metric(b, "hoard_s3_request_duration_seconds_count", "op=\"head\"")?;
    let s3_gets = metric(b, "hoard_s3_request_duration_seconds_count", "op=\"get\"")?;
    println!(
        "all rounds: client_gets={gets} bucket_heads={heads} bucket_gets={s3_gets} heads_per_client_get={:.3}",
        heads / gets as f64
    );
    Ok(())
}

/// Bucket requests that FindMissingBlobs costs on a second host: `n` blobs
/// uploaded through host `a`, then `rounds` calls on host `b` (gRPC at
/// `b_grpc`) asking about those `n` and `n` digests nobody uploaded, as a
/// host repeating another's build asks before it uploads. Reports per round
/// the bucket HEADs, GETs and PUTs `b` made per digest asked about.
pub fn findmissing_requests(
    a: SocketAddr,
    b: SocketAddr,
    b_grpc: &str,
    n: u64,
    rounds: u64,
) -> Res<()> {
    use hoard_proto::reapi::FindMissingBlobsRequest;
    use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    let mut digests = Vec::new();
    for i in 0..n {
        let blob = noise(1024, 90_000 + i);
        http(a, "PUT", &format!("/cas/{}", hex(&blob)), &blob)?;
        digests.push(Digest {
            hash: hex(&blob),
            size_bytes: blob.len() as i64,
        });
    }
    for i in 0..n {
        let never = noise(1024, 190_000 + i);
        digests.push(Digest {
            hash: hex(&never),
            size_bytes: never.len() as i64,
        });
    }
    wait_drained(a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ch = rt
        .block_on(tonic::transport::Endpoint::from_shared(format!("http://{b_grpc}"))?.connect())?;
    let mut cas = ContentAddressableStorageClient::new(ch);
    let ops = || -> Res<(f64, f64, f64)> {
        let m = |op: &str| {
            metric(
                b,
                "hoard_s3_request_duration_seconds_count",
                &format!("op=\"{op}\""),
            )
        };
        Ok((m("head")?, m("get")?, m("put")?))
    };
    let mut last = ops()?;
    let asked = digests.len() as f64;
    for round in 1..=rounds {
        let missing = rt
            .block_on(cas.find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: digests.clone(),
                ..Default::default()
            }))?
            .into_inner()
            .missing_blob_digests
            .len();
        if missing as u64 != n {
            return Err(format!("round {round}: {missing} missing, expected {n}").into());
        }
        let now = ops()?;
        println!(
            "round={round} digests={} heads_per_digest={:.3} gets_per_digest={:.3} puts_per_digest={:.3}",
            digests.len(),
            (now.0 - last.0) / asked,
            (now.1 - last.1) / asked,
            (now.2 - last.2) / asked
        );
        last = now;
    }
    Ok(())
}
