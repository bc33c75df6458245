//! hoard's load generators. Each prints one `key=value` line per figure so
//! `benches/run.sh` can put hoard's numbers next to a reference measured in
//! the same run.
//!
//! ```text
//! hoard-bench gen-blobs DIR N SIZE          N random blobs, saved as DIR/cas/<sha256>
//! hoard-bench upload ADDR DIR                PUT every blob in DIR/cas to hoard
//! hoard-bench put ADDR SIZE_MIB COUNT SEED   PUT COUNT fresh blobs of SIZE_MIB, report MB/s
//! hoard-bench reference SIZE_MIB COUNT SEED  one pass of SHA-256 + zstd-1 over the same bytes
//! hoard-bench concurrent-get ADDR PATH N     N simultaneous GETs of PATH, report totals
//! hoard-bench mkcache DIR N                  a bazel-remote-layout directory of N entries
//! hoard-bench grpc-findmissing ADDR N ROUNDS FindMissingBlobs of N present digests
//! hoard-bench grpc-bytestream ADDR MIB COUNT SEED [CHUNK_KIB]  ByteStream write then read, MB/s
//! hoard-bench grpc-batchread ADDR SECS CONC  BatchReadBlobs of 100 x 4 KiB, blobs/s
//! hoard-bench grpc-smallread ADDR SECS CONC  ByteStream reads of one 4 KiB blob each, reads/s
//! hoard-bench s3-upload ADDR SIZE COUNT SEED  uploads/s until every outcome is in
//! hoard-bench s3-put-latency ADDR COUNT SEED   p50/p99 of sequential 4 KiB PUTs
//! hoard-bench s3-heads ADDR_A ADDR_B ACTIONS ROUNDS  bucket HEADs per GET on a second host
//! hoard-bench s3-findmissing ADDR_A ADDR_B GRPC_B N ROUNDS  bucket requests per FindMissingBlobs digest
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

mod grpc;
mod s3;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("hoard-bench: {e}");
        std::process::exit(1);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Res<T> {
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse::<T>()
        .map_err(|_| format!("bad {what}: {:?}", args[i]).into())
}

fn run(args: &[String]) -> Res<()> {
    match args.first().map(String::as_str) {
        Some("gen-blobs") => gen_blobs(
            Path::new(&args[1]),
            arg(args, 2, "N")?,
            arg(args, 3, "SIZE")?,
        ),
        Some("upload") => upload(arg(args, 1, "ADDR")?, Path::new(&args[2])),
        Some("put") => put(
            arg(args, 1, "ADDR")?,
            arg(args, 2, "SIZE_MIB")?,
            arg(args, 3, "COUNT")?,
            arg(args, 4, "SEED").unwrap_or(1000),
        ),
        Some("reference") => reference(
            arg(args, 1, "SIZE_MIB")?,
            arg(args, 2, "COUNT")?,
            arg(args, 3, "SEED").unwrap_or(1000),
        ),
        Some("concurrent-get") => {
            concurrent_get(arg(args, 1, "ADDR")?, &args[2], arg(args, 3, "N")?)
        }
        Some("mkcache") => mkcache(
            Path::new(&args[1]),
            arg(args, 2, "N")?,
            arg(args, 3, "AC_EVERY").unwrap_or(0),
        ),
        Some("grpc-findmissing") => {
            grpc::find_missing(&args[1], arg(args, 2, "N")?, arg(args, 3, "ROUNDS")?)
        }
        Some("grpc-bytestream") => grpc::bytestream(
            &args[1],
            arg(args, 2, "MIB")?,
            arg(args, 3, "COUNT")?,
            arg(args, 4, "SEED")?,
            if args.len() > 5 {
                arg(args, 5, "CHUNK_KIB")?
            } else {
                1024
            },
        ),
        Some("s3-upload") => s3::upload_throughput(
            arg(args, 1, "ADDR")?,
            arg(args, 2, "SIZE")?,
            arg(args, 3, "COUNT")?,
            arg(args, 4, "SEED")?,
        ),
        Some("s3-put-latency") => s3::put_latency(
            arg(args, 1, "ADDR")?,
            arg(args, 2, "COUNT")?,
            arg(args, 3, "SEED")?,
        ),
        Some("s3-heads") => s3::heads_per_get(
            arg(args, 1, "ADDR_A")?,
            arg(args, 2, "ADDR_B")?,
            arg(args, 3, "ACTIONS")?,
            arg(args, 4, "ROUNDS")?,
        ),
        Some("s3-findmissing") => s3::findmissing_requests(
            arg(args, 1, "ADDR_A")?,
            arg(args, 2, "ADDR_B")?,
            &args[3],
            arg(args, 4, "N")?,
            arg(args, 5, "ROUNDS")?,
        ),
        Some("grpc-batchread") => {
            grpc::batch_read(&args[1], arg(args, 2, "SECS")?, arg(args, 3, "CONC")?)
        }
        Some("grpc-smallread") => {
            grpc::small_reads(&args[1], arg(args, 2, "SECS")?, arg(args, 3, "CONC")?)
        }
        _ => Err("usage: see the doc comment at the top of benches/src/main.rs".into()),
    }
}

/// Deterministic incompressible bytes.
pub(crate) fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Build-output-like bytes: half text-ish, half random, so zstd has work.
pub(crate) fn build_output(n: usize, seed: u64) -> Vec<u8> {
    let mut out = noise(n, seed);
    for (i, b) in out.iter_mut().enumerate() {
        if (i / 4096) % 2 == 0 {
            *b = b"abcdefghijklmnopqrstuvwxyz0123456789 \n"[(*b as usize) % 38];
        }
    }
    out
}

fn gen_blobs(dir: &Path, n: usize, size: usize) -> Res<()> {
    let cas = dir.join("cas");
    std::fs::create_dir_all(&cas)?;
    for i in 0..n {
        let data = noise(size, i as u64 + 1);
        std::fs::write(cas.join(hex::encode(Sha256::digest(&data))), &data)?;
    }
    Ok(())
}

pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Res<(u16, u64)> {
    let mut s = TcpStream::connect(addr)?;
    // One write for the whole head: a real client sends it in one segment.
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut head = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < 12 {
            head.extend_from_slice(&buf[..n.min(400)]);
        }
        total += n as u64;
    }
    let status: u16 = std::str::from_utf8(&head[9..12.min(head.len())])?.parse()?;
    if status != 200 && std::env::var_os("HOARD_BENCH_DEBUG").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&head));
    }
    Ok((status, total))
}

fn upload(addr: SocketAddr, dir: &Path) -> Res<()> {
    let mut n = 0;
    for e in std::fs::read_dir(dir.join("cas"))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(e.path())?;
        let (status, _) = http(addr, "PUT", &format!("/cas/{name}"), &data)?;
        if status != 200 {
            return Err(format!("PUT {name}: {status}").into());
        }
        n += 1;
    }
    println!("uploaded={n}");
    Ok(())
}

fn put(addr: SocketAddr, mib: usize, count: u64, seed: u64) -> Res<()> {
    let size = mib << 20;
    let mut secs = 0.0;
    for i in 0..count {
        let data = build_output(size, seed + i);
        let hash = hex::encode(Sha256::digest(&data));
        let t = Instant::now();
        let (status, _) = http(addr, "PUT", &format!("/cas/{hash}"), &data)?;
        secs += t.elapsed().as_secs_f64();
        if status != 200 {
            return Err(format!("PUT returned {status}").into());
        }
    }
    println!(
        "put_mb_per_s={:.1}",
        (size as f64 * count as f64) / secs / 1e6
    );
    Ok(())
}

/// What any cache must do to a blob it stores compressed: hash it and
/// compress it (zstd level 1, 1 MiB chunks), in one pass, on one core, from
/// memory. No network, no disk.
fn reference(mib: usize, count: u64, seed: u64) -> Res<()> {
    let size = mib << 20;
    let mut secs = 0.0;
    let mut c = zstd::bulk::Compressor::new(1)?;
    let mut sink = 0usize;
    for i in 0..count {
        let data = build_output(size, seed + i);
        let t = Instant::now();
        let mut h = Sha256::new();
        for chunk in data.chunks(1 << 20) {
            h.update(chunk);
            sink += c.compress(chunk)?.len();
        }
        let digest = h.finalize();
        secs += t.elapsed().as_secs_f64();
        sink += digest[0] as usize;
    }
    println!(
        "reference_mb_per_s={:.1}",
        (size as f64 * count as f64) / secs / 1e6
    );
    eprintln!("(compressed bytes: {sink})");
    Ok(())
}

fn concurrent_get(addr: SocketAddr, path: &str, n: usize) -> Res<()> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let t = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let b = barrier.clone();
            let path = path.to_string();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    b.wait();
                    http(addr, "GET", &path, b"")
                })
        })
        .collect::<Result<_, _>>()?;
    let mut ok = 0;
    let mut bytes = 0;
    let mut failures: std::collections::BTreeMap<String, u32> = Default::default();
    for h in handles {
        match h.join() {
            Ok(Ok((200, b))) => {
                ok += 1;
                bytes += b;
            }
            Ok(Ok((status, _))) => *failures.entry(format!("status {status}")).or_default() += 1,
            Ok(Err(e)) => *failures.entry(e.to_string()).or_default() += 1,
            Err(_) => *failures.entry("thread panicked".into()).or_default() += 1,
        }
    }
    for (what, n) in &failures {
        eprintln!("failed: {n} x {what}");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "gets_ok={ok} gets={n} bytes={bytes} seconds={secs:.2} mb_per_s={:.1}",
        bytes as f64 / secs / 1e6
    );
    Ok(())
}

/// N small entries laid out as bazel-remote does: CAS as
/// `cas.v2/<hh>/<hash>-<size>-<random>`, and with `ac_every` > 0 every
/// `ac_every`-th entry an action result, `ac.v2/<hh>/<hash>-<random>`
/// (whose name holds no size, so startup must `stat` it).
/// The files are empty: startup never opens them, it only lists and stats.
fn mkcache(dir: &Path, n: u64, ac_every: u64) -> Res<()> {
    let (cas, ac) = (dir.join("cas.v2"), dir.join("ac.v2"));
    for i in 0..256 {
        std::fs::create_dir_all(cas.join(format!("{i:02x}")))?;
        std::fs::create_dir_all(ac.join(format!("{i:02x}")))?;
    }
    let mut p = PathBuf::new();
    let mut acs = 0;
    for i in 0..n {
        let h = hex::encode(Sha256::digest(i.to_le_bytes()));
        p.clear();
        if ac_every > 0 && i % ac_every == 0 {
            p.push(&ac);
            p.push(&h[..2]);
            p.push(format!("{h}-{:09}", i % 1_000_000_000));
            acs += 1;
        } else {
            p.push(&cas);
            p.push(&h[..2]);
            p.push(format!("{h}-{}-{:09}", 100 + i % 4000, i % 1_000_000_000));
        }
        std::fs::File::create(&p)?;
    }
    println!("entries={n} action_results={acs}");
    Ok(())
}
