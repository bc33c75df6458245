//! The bill under fire: two hoards sharing a bucket take concurrent HTTP and
//! gRPC writes (CAS and action results, two namespaces, shared blobs) while
//! one of them is killed with `kill -9` at a random moment each round, and
//! some rounds also take the bucket or ClickHouse away. Afterwards every
//! acknowledged blob reads back byte-exact and is in the bucket, the
//! footprint equals the listing per namespace exactly, `hoard drift` says 0,
//! and every job has its one outcome.
//!
//! `HOARD_CAMPAIGN_ROUNDS` sets the rounds (default 4, what CI runs);
//! `benches/campaign.sh` runs 20.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, OutputFile};

use crate::accounting::bucket_footprint;
use crate::clickhouse::ClickHouse;
use crate::s3::{Bucket, FORWARD, Moto, Proxy, REFUSE};
use crate::support::{Hoard, hoard_bin, noise, sha256_hex, try_request};

/// A small deterministic generator, so a failing campaign can be rerun.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a client was told is stored.
#[derive(Clone)]
struct Acked {
    host: usize,
    prefix: &'static str,
    kind: &'static str,
    hash: String,
    data: Vec<u8>,
}

struct Host {
    dir: std::path::PathBuf,
    args: Vec<String>,
    hoard: Option<Hoard>,
}

impl Host {
    fn start(&mut self) {
        let a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let h = Hoard::start(&self.dir, &a);
        h.wait_ready();
        self.hoard = Some(h);
    }
}

fn metric(h: &Hoard, name: &str) -> f64 {
    h.get("/metrics")
        .text()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One client's writes against one host until `stop`: CAS blobs (some
/// shared between hosts) and action results naming them, in two
/// namespaces, over HTTP and gRPC.
fn writer(
    addr: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
    host: usize,
    seed: u64,
    stop: &AtomicBool,
    acked: &Mutex<Vec<Acked>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let prefix = if rng.below(3) == 0 { "/team" } else { "" };
        // One blob in eight is shared: both hosts write the same bytes.
        let data = if rng.below(8) == 0 {
            noise(3000 + rng.below(5) as usize * 1000, 77 + rng.below(6))
        } else {
            noise(
                500 + rng.below(40_000) as usize,
                seed.wrapping_mul(1000) + n,
            )
        };
        let hash = sha256_hex(&data);
        let ok = if rng.below(2) == 0 {
            let len = data.len().to_string();
            try_request(
                addr,
                "PUT",
                &format!("{prefix}/cas/{hash}"),
                &[("Content-Length", &len)],
                &data,
            )
            .is_some_and(|r| r.status == 200)
        } else {
            rt.block_on(grpc_write(grpc, prefix.trim_start_matches('/'), &data))
        };
        if !ok {
            continue;
        }
        acked.lock().unwrap().push(Acked {
            host,
            prefix,
            kind: "cas",
            hash: hash.clone(),
            data: data.clone(),
        });
        // An action result naming it.
        let ar = ActionResult {
            output_files: vec![OutputFile {
                path: format!("out/{n}"),
                digest: Some(hoard_proto::reapi::Digest {
                    hash,
                    size_bytes: data.len() as i64,
                }),
                ..Default::default()
            }],
            exit_code: (n % 3) as i32,
            ..Default::default()
        };
        let bytes = ar.encode_to_vec();
        let key = sha256_hex(format!("action {seed} {n}").as_bytes());
        let len = bytes.len().to_string();
        if try_request(
            addr,
            "PUT",
            &format!("{prefix}/ac/{key}"),
            &[("Content-Length", &len)],
            &bytes,
        )
        .is_some_and(|r| r.status == 200)
        {
            acked.lock().unwrap().push(Acked {
                host,
                prefix,
                kind: "ac",
                hash: key,
                data: bytes,
            });
        }
    }
}

async fn grpc_write(grpc: std::net::SocketAddr, instance: &str, data: &[u8]) -> bool {
    use hoard_proto::google::bytestream::WriteRequest;
    use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    let instance = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let req = WriteRequest {
        resource_name: format!(
            "{instance}uploads/00000000-0000-4000-8000-{:012}/blobs/{}/{}",
            data.len(),
            sha256_hex(data),
            data.len()
        ),
        write_offset: 0,
        finish_write: true,
        data: data.to_vec().into(),
    };
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        ByteStreamClient::new(ch).write(futures_util::stream::iter([req])),
    )
    .await;
    matches!(r, Ok(Ok(_)))
}

#[test]
fn kill_9_and_outages_leave_the_bill_equal_to_the_bucket() {
    let rounds: usize = std::env::var("HOARD_CAMPAIGN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let tmp = tempfile::tempdir().unwrap();
    let mut ch = ClickHouse::start(&tmp.path().join("ch"));
    let moto = Moto::start();
    let bucket = Bucket::new(&moto.endpoint(), "campaign");
    bucket.create();
    let proxy = Proxy::start(moto.port);
    let mut hosts: Vec<Host> = (0..2)
        .map(|i| Host {
            dir: tmp.path().join(format!("host{i}")),
            args: vec![
                format!("--s3.endpoint=127.0.0.1:{}", proxy.port),
                "--s3.disable_ssl".into(),
                "--s3.bucket=campaign".into(),
                "--s3.access_key_id=AK".into(),
                "--s3.secret_access_key=SK".into(),
                "--s3.read_timeout=1s".into(),
                "--s3.backfill=true".into(),
                "--s3.backfill_rate=200".into(),
                format!("--host_id=campaign-{i}"),
                format!("--accounting.clickhouse_url={}", ch.url()),
                "--accounting.flush_interval=1s".into(),
            ],
            hoard: None,
        })
        .collect();
    for h in &mut hosts {
        h.start();
    }
    let acked = Mutex::new(Vec::<Acked>::new());
    let mut rng = Rng(0x5eed_cafe);
    let mut kills = 0;
    let (mut bucket_outages, mut clickhouse_outages) = (0, 0);
    let t0 = Instant::now();
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let victim = rng.below(2) as usize;
        // Every fourth round from the second takes the bucket away, every
        // fourth from the third ClickHouse.
        let outage = match round % 4 {
            1 => 0,
            2 => 1,
            _ => 2,
        };
        std::thread::scope(|s| {
            for (i, h) in hosts.iter().enumerate() {
                let hd = h.hoard.as_ref().unwrap();
                let (addr, grpc) = (hd.addr, hd.grpc.unwrap());
                for c in 0..2 {
                    let (stop, acked) = (Arc::clone(&stop), &acked);
                    let seed = (round as u64) * 100 + (i as u64) * 10 + c;
                    s.spawn(move || writer(addr, grpc, i, seed, &stop, acked));
                }
            }
            match outage {
                0 => {
                    proxy.set(REFUSE);
                    bucket_outages += 1;
                }
                1 => {
                    ch.stop();
                    clickhouse_outages += 1;
                }
                _ => {}
            }
            // A random moment, then kill -9 with the writers still going.
            std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
            if let Some(h) = hosts[victim].hoard.take() {
                h.kill9();
                kills += 1;
            }
            std::thread::sleep(Duration::from_millis(200 + rng.below(500)));
            stop.store(true, Ordering::Relaxed);
        });
        proxy.set(FORWARD);
        if outage == 1 {
            ch.restart();
        }
        hosts[victim].start();
        println!(
            "campaign round {}: killed host {victim}, outage {}, {} acknowledged so far",
            round + 1,
            ["bucket", "clickhouse", "none"][outage],
            acked.lock().unwrap().len()
        );
    }
    let acked = acked.into_inner().unwrap();

    // Quiescence: every job has its outcome, the backfill has nothing left,
    // and accounting has sent everything.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let settled = hosts.iter().all(|h| {
            let h = h.hoard.as_ref().unwrap();
            let jobs = metric(h, "hoard_upload_jobs_total");
            let outcomes = metric(h, "hoard_upload_outcomes_total");
            jobs == outcomes
                && metric(h, "hoard_upload_queue_length") == 0.0
                && metric(h, "hoard_accounting_spool_batches") == 0.0
        });
        let objects = bucket.objects();
        let all_up = acked
            .iter()
            .all(|a| objects.keys().any(|k| k.ends_with(&a.hash)));
        if settled && all_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never settled: {} of {} acknowledged entries in the bucket",
            acked
                .iter()
                .filter(|a| objects.keys().any(|k| k.ends_with(&a.hash)))
                .count(),
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // One more flush interval for the last outcomes to be sent.
    std::thread::sleep(Duration::from_secs(3));

    // Every acknowledged blob reads back byte-exact where it was written.
    for a in &acked {
        let h = hosts[a.host].hoard.as_ref().unwrap();
        let r = h.get(&format!("{}/{}/{}", a.prefix, a.kind, a.hash));
        assert_eq!(r.status, 200, "{} {} {}", a.prefix, a.kind, a.hash);
        assert!(
            r.body == a.data,
            "{} {} reads back byte-exact",
            a.kind,
            a.hash
        );
    }
    let footprint = ch.footprint();
    let listing = bucket_footprint(&bucket);
    let mut jobs = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let h = h.hoard.as_ref().unwrap();
        jobs.insert(
            i,
            (
                metric(h, "hoard_upload_jobs_total"),
                metric(h, "hoard_upload_outcomes_total"),
            ),
        );
    }
    println!(
        "campaign: {rounds} rounds, {kills} kills, {bucket_outages} bucket and {clickhouse_outages} ClickHouse outages, {} acknowledged ({} CAS, {} AC) in {:.0} s; footprint {footprint:?} vs listing {listing:?}; jobs/outcomes since the last start {jobs:?}",
        acked.len(),
        acked.iter().filter(|a| a.kind == "cas").count(),
        acked.iter().filter(|a| a.kind == "ac").count(),
        t0.elapsed().as_secs_f64()
    );
    assert!(kills >= rounds, "a kill each round");
    assert!(
        acked.len() > 20 * rounds,
        "the workload ran: {}",
        acked.len()
    );
    if footprint != listing {
        // Keep the evidence: the hosts' journals name every outcome.
        let kept = tmp.keep();
        let objects = bucket.objects();
        let mut sizes: Vec<(String, i64)> = objects.into_iter().collect();
        sizes.sort();
        std::fs::write(
            kept.join("listing.txt"),
            sizes
                .iter()
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect::<String>(),
        )
        .unwrap();
        panic!(
            "footprint {footprint:?} != listing {listing:?}; evidence kept in {}",
            kept.display()
        );
    }
    for (j, o) in jobs.values() {
        assert_eq!(j, o, "every job has exactly one outcome");
    }
    // hoard drift agrees.
    let out = std::process::Command::new(hoard_bin())
        .arg("drift")
        .args(&hosts[0].args)
        .arg(format!("--dir={}", hosts[0].dir.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("campaign drift:\n{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("(default)") || l.starts_with("team"))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for line in rows {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[3], "0", "drift: {line}");
    }
}
