//! gRPC load generators: FindMissingBlobs latency, ByteStream throughput,
//! BatchReadBlobs rate.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::google::bytestream::{ReadRequest, WriteRequest};
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    batch_update_blobs_request,
};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

use crate::{Res, build_output, noise};

fn digest(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

async fn connect(addr: &str) -> Res<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    )
}

async fn upload_small(
    cas: &mut ContentAddressableStorageClient<Channel>,
    blobs: &[Vec<u8>],
) -> Res<()> {
    for batch in blobs.chunks(500) {
        let requests = batch
            .iter()
            .map(|b| batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: Bytes::copy_from_slice(b),
                compressor: 0,
            })
            .collect();
        let resp = cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await?
            .into_inner();
        if resp
            .responses
            .iter()
            .any(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
        {
            return Err("BatchUpdateBlobs refused a blob".into());
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// FindMissingBlobs over `n` digests, all present, `rounds` times.
pub fn find_missing(addr: &str, n: usize, rounds: usize) -> Res<()> {
    runtime()?.block_on(async {
        let mut cas = ContentAddressableStorageClient::new(connect(addr).await?);
        let blobs: Vec<Vec<u8>> = (0..n).map(|i| noise(64, 50_000 + i as u64)).collect();
        upload_small(&mut cas, &blobs).await?;
        let digests: Vec<Digest> = blobs.iter().map(|b| digest(b)).collect();
        let mut lat = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let missing = cas
                .find_missing_blobs(FindMissingBlobsRequest {
                    blob_digests: digests.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .missing_blob_digests;
            lat.push(t.elapsed());
            if !missing.is_empty() {
                return Err(format!("{} digests reported missing", missing.len()).into());
            }
        }
        lat.sort();
        println!(
            "findmissing_digests={n} calls={rounds} client_p50_ms={:.2} client_p99_ms={:.2}",
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3
        );
        Ok(())
    })
}

/// ByteStream writes of `count` fresh blobs of `mib` MiB in messages of
/// `chunk_kib` KiB, then reads of the same blobs.
pub fn bytestream(addr: &str, mib: usize, count: u64, seed: u64, chunk_kib: usize) -> Res<()> {
    let chunk = chunk_kib.max(1) << 10;
    runtime()?.block_on(async {
        let mut bs = ByteStreamClient::new(connect(addr).await?)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20);
        let size = mib << 20;
        let (mut wsecs, mut rsecs) = (0.0, 0.0);
        for i in 0..count {
            let data = Bytes::from(build_output(size, seed + i));
            let d = digest(&data);
            let name = format!("uploads/bench-{seed}-{i}/blobs/{}/{}", d.hash, d.size_bytes);
            let n = size.div_ceil(chunk);
            let reqs: Vec<WriteRequest> = (0..n)
                .map(|c| WriteRequest {
                    resource_name: if c == 0 { name.clone() } else { String::new() },
                    write_offset: (c * chunk) as i64,
                    finish_write: c + 1 == n,
                    data: data.slice(c * chunk..((c + 1) * chunk).min(size)),
                })
                .collect();
            let t = Instant::now();
            bs.write(futures_util::stream::iter(reqs)).await?;
            wsecs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let got = read_whole(&mut bs, format!("blobs/{}/{}", d.hash, d.size_bytes)).await?;
            rsecs += t.elapsed().as_secs_f64();
            if got != size {
                return Err(format!("read {got} of {size} bytes").into());
            }
        }
        let total = (size as u64 * count) as f64;
        println!(
            "bytestream_write_mb_per_s={:.1} bytestream_read_mb_per_s={:.1}",
            total / wsecs / 1e6,
            total / rsecs / 1e6
        );
        Ok(())
    })
}

/// Reads a whole blob over ByteStream; returns the bytes received.
async fn read_whole(bs: &mut ByteStreamClient<Channel>, resource_name: String) -> Res<usize> {
    let mut s = bs
        .read(ReadRequest {
            resource_name,
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut got = 0;
    while let Some(m) = s.message().await? {
        got += m.data.len();
    }
    Ok(got)
}

/// Uploads 1,000 distinct 4 KiB blobs made from `seed` on.
async fn small_blobs(ch: &Channel, seed: u64) -> Res<Vec<Vec<u8>>> {
    let blobs: Vec<Vec<u8>> = (0..1000).map(|i| noise(4096, seed + i)).collect();
    upload_small(
        &mut ContentAddressableStorageClient::new(ch.clone()),
        &blobs,
    )
    .await?;
    Ok(blobs)
}

/// Runs `caller(w, deadline)` for callers `w` in `0..conc` at once; each
/// returns how many blobs it read before `deadline`, `secs` from now.
/// Gives the blobs read per second by all of them.
async fn per_second<F, Fut>(secs: u64, conc: usize, mut caller: F) -> Res<f64>
where
    F: FnMut(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Res<u64>> + Send + 'static,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conc)
        .map(|w| tokio::spawn(caller(w, deadline)))
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / secs as f64)
}

/// BatchReadBlobs of 100 distinct 4 KiB blobs per call, for `secs` seconds,
/// from `conc` concurrent callers.
pub fn batch_read(addr: &str, secs: u64, conc: usize) -> Res<()> {
    runtime()?.block_on(async {
        let ch = connect(addr).await?;
        let blobs = small_blobs(&ch, 90_000).await?;
        let digests: Vec<Digest> = blobs.iter().map(|b| digest(b)).collect();
        let rate = per_second(secs, conc, |w, deadline| {
            let mut cas = ContentAddressableStorageClient::new(ch.clone());
            let digests = digests.clone();
            async move {
                let mut n = 0u64;
                let mut i = w * 100;
                while Instant::now() < deadline {
                    let batch: Vec<Digest> = (0..100)
                        .map(|k| digests[(i + k) % digests.len()].clone())
                        .collect();
                    i += 100;
                    let r = cas
                        .batch_read_blobs(BatchReadBlobsRequest {
                            digests: batch,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    if r.responses
                        .iter()
                        .any(|x| x.status.as_ref().is_some_and(|s| s.code != 0))
                    {
                        return Err("a read failed".into());
                    }
                    n += r.responses.len() as u64;
                }
                Ok(n)
            }
        })
        .await?;
        println!("batchread_blobs_per_s={rate:.0}");
        Ok(())
    })
}

/// ByteStream reads of distinct 4 KiB blobs, one blob per call (as Bazel
/// downloads outputs), for `secs` seconds from `conc` concurrent callers.
pub fn small_reads(addr: &str, secs: u64, conc: usize) -> Res<()> {
    runtime()?.block_on(async {
        let ch = connect(addr).await?;
        let blobs = small_blobs(&ch, 95_000).await?;
        let names: Vec<String> = blobs
            .iter()
            .map(|b| {
                let d = digest(b);
                format!("blobs/{}/{}", d.hash, d.size_bytes)
            })
            .collect();
        let rate = per_second(secs, conc, |w, deadline| {
            let mut bs = ByteStreamClient::new(ch.clone());
            let names = names.clone();
            async move {
                let mut n = 0u64;
                let mut i = w * 250;
                while Instant::now() < deadline {
                    let got = read_whole(&mut bs, names[i % names.len()].clone()).await?;
                    if got != 4096 {
                        return Err(format!("read {got} of 4096 bytes").into());
                    }
                    i += 1;
                    n += 1;
                }
                Ok(n)
            }
        })
        .await?;
        println!("bytestream_small_reads_per_s={rate:.0}");
        Ok(())
    })
}
