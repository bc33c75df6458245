//! ByteStream: reads with offset and limit (compressed reads reuse the
//! stored zstd frames), and writes that verify the digest, return early when
//! the blob exists, and can be resumed after an interruption.
//!
//! # Resumable writes
//!
//! A write is identified by its resource name up to the size (the upload
//! UUID included). If its stream ends or breaks before `finish_write`, the
//! upload is kept, paused, for `resumable_upload_ttl`: `QueryWriteStatus`
//! reports the bytes accepted so far, and a new `Write` with the same name
//! continues from exactly that `write_offset`. Nothing is visible in the
//! CAS until `finish_write` and a verified digest. Paused uploads are
//! bounded in number; the oldest is dropped (its temp file removed) first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hoard_disk::Kind;
use hoard_proto::google::bytestream::byte_stream_server::ByteStream;
use hoard_proto::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::resource::{BlobResource, parse_read, parse_write};
use super::{BoxStream, Shared, to_status};
use crate::cache::{Encoding, Found, HOT_BLOB_MAX, Upload};
use crate::error::CacheError;

pub(crate) struct ByteStreamService(pub Shared);

const SERVICE: &str = "google.bytestream.ByteStream";
/// Largest data field in one ReadResponse.
const READ_CHUNK: usize = 1 << 20;

/// One upload's state, kept between Write calls while it is paused.
struct Slot {
    upload: Option<Upload>,
    /// Bytes accepted from the client (compressed bytes for zstd uploads).
    committed: u64,
    touched: Instant,
}

/// Paused and running uploads by upload key.
pub struct Uploads {
    slots: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    ttl: Duration,
    max: usize,
}

impl Uploads {
    pub fn new(ttl: Duration, max: usize) -> Uploads {
        Uploads {
            slots: parking_lot::Mutex::new(HashMap::new()),
            ttl,
            max: max.max(1),
        }
    }

    fn get_or_create(&self, key: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(key) {
            return Arc::clone(s);
        }
        if slots.len() >= self.max {
            // Drop the least recently touched idle upload.
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| s.try_lock().ok().map(|g| (k.clone(), g.touched)))
                .min_by_key(|(_, t)| *t)
                .map(|(k, _)| k);
            if let Some(k) = oldest {
                slots.remove(&k);
            }
        }
        let s = Arc::new(tokio::sync::Mutex::new(Slot {
            upload: None,
            committed: 0,
            touched: Instant::now(),
        }));
        slots.insert(key.to_string(), Arc::clone(&s));
        s
    }

    fn get(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<Slot>>> {
        self.slots.lock().get(key).cloned()
    }

    fn remove(&self, key: &str) {
        self.slots.lock().remove(key);
    }

    /// Drops paused uploads idle for longer than the TTL.
    pub fn reap_expired(&self) {
        let now = Instant::now();
        self.slots.lock().retain(|_, s| match s.try_lock() {
            Ok(g) => now.duration_since(g.touched) < self.ttl,
            Err(_) => true, // a Write is using it
        });
    }
}

/// The next message of a Write stream: a client that sends nothing for
/// `client_idle_timeout` fails it (DEADLINE_EXCEEDED); a message that does
/// not decode or is too large gets the client-error code.
async fn next_message(
    cache: &crate::Cache,
    stream: &mut Streaming<WriteRequest>,
) -> Result<Option<WriteRequest>, Status> {
    match cache.from_client(stream.message()).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(s)) => Err(super::codes::from_request_stream(s)),
        Err(e) => Err(to_status(e)),
    }
}

/// Where one Write call's stream of messages stands.
struct Feed {
    name: String,
    /// The write_offset the next message must have.
    expected: u64,
    finished: bool,
    /// Why the stream ended early, for the client.
    end: Option<Status>,
}

impl Feed {
    fn check(&self, msg: &WriteRequest) -> Result<(), Status> {
        if !msg.resource_name.is_empty() && msg.resource_name != self.name {
            return Err(Status::invalid_argument(super::codes::clip(&format!(
                "resource name changed within one Write: {:?} then {:?}",
                super::codes::clip_to(&self.name, 200),
                super::codes::clip_to(&msg.resource_name, 200)
            ))));
        }
        if msg.write_offset < 0 || msg.write_offset as u64 != self.expected {
            return Err(Status::invalid_argument(format!(
                "write_offset {} is not contiguous: {} bytes are committed",
                msg.write_offset, self.expected
            )));
        }
        Ok(())
    }
}

impl ByteStreamService {
    /// `resource` is set to the (printable) resource name once it is known,
    /// for the access log.
    async fn write(
        &self,
        mut stream: Streaming<WriteRequest>,
        resource: &mut String,
    ) -> Result<Response<WriteResponse>, Status> {
        let Some(first) = next_message(&self.0.cache, &mut stream).await? else {
            return Err(Status::invalid_argument(
                "empty Write stream: no WriteRequest received",
            ));
        };
        *resource = crate::access_log::printable(&first.resource_name);
        let res = parse_write(&first.resource_name)?;
        let ns = self.0.namespace(&res.instance)?;
        let cache = &self.0.cache;
        cache
            .check_blob_size(res.size)
            .map_err(|e| to_status(cache.refuse(ns, Kind::Cas, e)))?;
        let key = res.upload_key();
        let done = |res: &BlobResource| WriteResponse {
            committed_size: if res.compressed { -1 } else { res.size as i64 },
        };
        if self.0.cache.cas_has(ns, &res.hash, res.size).await {
            // Already stored (perhaps by another client): the spec's early return.
            self.0.uploads.remove(&key);
            return Ok(Response::new(done(&res)));
        }
        let slot_arc = self.0.uploads.get_or_create(&key);
        let Ok(mut slot) = slot_arc.try_lock() else {
            return Err(Status::aborted(format!(
                "another Write of {key} is in progress; retry after it ends"
            )));
        };
        slot.touched = Instant::now();
        if slot.upload.is_none() {
            if first.write_offset != 0 {
                let e = CacheError::invalid(format!(
                    "write_offset {} for an upload that has received nothing; QueryWriteStatus says 0",
                    first.write_offset
                ));
                return Err(to_status(cache.refuse(ns, Kind::Cas, e)));
            }
            let encoding = if res.compressed {
                Encoding::Zstd
            } else {
                Encoding::Identity
            };
            let up = self
                .0
                .cache
                .begin_upload(ns, Kind::Cas, res.hash, res.size, encoding)
                .await
                .map_err(to_status)?;
            slot.upload = Some(up);
            slot.committed = 0;
        }
        let Some(up) = slot.upload.take() else {
            return Err(Status::internal("upload state lost"));
        };
        // The messages go to the disk writer as they come (the facade's
        // pump holds each only until the writer has it). The stream of
        // them ends at finish_write, at the client's end, or at the first
        // bad message, whose error is kept for after the pump.
        let feed = Arc::new(parking_lot::Mutex::new(Feed {
            name: first.resource_name.clone(),
            expected: slot.committed,
            finished: false,
            end: None,
        }));
        let messages = futures_util::stream::unfold(
            (Some(first), stream, Arc::clone(&feed), self.0.cache.clone()),
            |(first, mut stream, feed, cache)| async move {
                let msg = match first {
                    Some(m) => m,
                    None => {
                        {
                            let f = feed.lock();
                            if f.finished || f.end.is_some() {
                                return None;
                            }
                        }
                        match next_message(&cache, &mut stream).await {
                            Ok(Some(m)) => m,
                            Ok(None) => return None,
                            Err(status) => {
                                feed.lock().end = Some(status);
                                return None;
                            }
                        }
                    }
                };
                {
                    let mut f = feed.lock();
                    if let Err(status) = f.check(&msg) {
                        f.end = Some(status);
                        return None;
                    }
                    f.expected += msg.data.len() as u64;
                    f.finished = msg.finish_write;
                }
                Some((Ok(msg.data), (None, stream, feed, cache)))
            },
        );
        let pumped = self.0.cache.pump(up, Box::pin(messages)).await;
        let up = match pumped {
            Ok((up, Ok(()))) => up,
            Ok((_, Err(e))) | Err(e) => {
                // The writer failed, or the client stalled or could not be
                // given memory: what it sent is dropped with the upload.
                self.0.uploads.remove(&key);
                return Err(to_status(e));
            }
        };
        let (expected, finished, end) = {
            let mut f = feed.lock();
            (f.expected, f.finished, f.end.take())
        };
        slot.committed = expected;
        slot.touched = Instant::now();
        if finished {
            self.0.uploads.remove(&key);
            let committed = slot.committed;
            cache.commit(up).await.map_err(to_status)?;
            return Ok(Response::new(WriteResponse {
                committed_size: committed as i64,
            }));
        }
        // Ended or broken without finish_write: nothing is stored; the
        // upload waits, paused, to be resumed from `committed`.
        slot.upload = Some(up);
        match end {
            Some(status) => Err(status),
            None => Ok(Response::new(WriteResponse {
                committed_size: slot.committed as i64,
            })),
        }
    }

    async fn query(
        &self,
        req: QueryWriteStatusRequest,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let res = parse_write(&req.resource_name)?;
        let ns = self
            .0
            .namespace_for_read(&res.instance, Some((Kind::Cas, &res.hash)))
            .await?;
        if let Some(ns) = ns
            && self.0.cache.cas_has(ns, &res.hash, res.size).await
        {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: res.size as i64,
                complete: true,
            }));
        }
        let committed = match self.0.uploads.get(&res.upload_key()) {
            Some(slot) => slot.lock().await.committed,
            None => 0,
        };
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete: false,
        }))
    }

    async fn read(&self, req: ReadRequest) -> Result<BoxStream<ReadResponse>, Status> {
        let res = parse_read(&req.resource_name)?;
        let Some(ns) = self
            .0
            .namespace_for_read(&res.instance, Some((Kind::Cas, &res.hash)))
            .await?
        else {
            return Err(Status::not_found(format!(
                "blob {}/{} not found",
                res.hash, res.size
            )));
        };
        if req.read_offset < 0 || req.read_limit < 0 {
            return Err(Status::out_of_range(format!(
                "read_offset {} and read_limit {} must not be negative",
                req.read_offset, req.read_limit
            )));
        }
        if res.compressed && req.read_limit != 0 {
            return Err(Status::invalid_argument(
                "read_limit must be 0 when reading compressed-blobs",
            ));
        }
        let offset = req.read_offset as u64;
        if offset > res.size {
            return Err(Status::out_of_range(format!(
                "read_offset {offset} is past the end of a {}-byte blob",
                res.size
            )));
        }
        let not_found = || Status::not_found(format!("blob {}/{} not found", res.hash, res.size));
        // A hot blob costs no file at all; compressed reads want frames,
        // so they go to the file.
        let hot = match res.compressed {
            false => self.0.cache.cas_hot(ns, &res.hash),
            true => None,
        };
        let source = match hot {
            Some(bytes) if bytes.len() as u64 == res.size => Source::Hot(bytes),
            Some(_) => return Err(not_found()),
            None => match self
                .0
                .cache
                .cas_get(ns, &res.hash)
                .await
                .map_err(to_status)?
            {
                Some(Found::Empty) if res.size == 0 => Source::Empty,
                Some(Found::Blob(b)) if b.logical_size() == res.size => Source::Blob(b),
                _ => return Err(not_found()),
            },
        };
        let limit = match req.read_limit {
            0 => res.size - offset,
            n => (n as u64).min(res.size - offset),
        };
        let range = offset as usize..(offset + limit) as usize;
        let (tx, mut rx) = mpsc::channel::<Result<ReadResponse, Status>>(1);
        let cache = self.0.cache.clone();
        let log = self.0.access_log.clone();
        let name = crate::access_log::printable(&req.resource_name);
        // The stream ends as a success only when the producer says it
        // finished: a producer that failed (or was cut off) without handing
        // over its error still ends the stream with one, so a partial read
        // never looks complete.
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finished_tx = Arc::clone(&finished);
        tokio::spawn(async move {
            let r = match source {
                Source::Empty if res.compressed => {
                    let frame = zstd::bulk::compress(&[], 1).unwrap_or_default();
                    send(&cache, &tx, frame.into()).await
                }
                Source::Empty => Ok(()),
                Source::Hot(bytes) => send_whole(&cache, &tx, bytes.slice(range)).await,
                // A small file was read whole when it was opened: this
                // decompresses it and keeps it in the hot set.
                Source::Blob(mut b) if !res.compressed && res.size <= HOT_BLOB_MAX => {
                    match cache.reserve_inflight(res.size as usize).await {
                        Ok(permit) => match cache.cas_read_small(ns, &res.hash, &mut b) {
                            Ok(_) if range.is_empty() => Ok(()),
                            Ok(bytes) => {
                                send(&cache, &tx, permit.hold_shared(bytes.slice(range))).await
                            }
                            Err(e) => Err(data_loss(e)),
                        },
                        Err(e) => Err(to_status(e)),
                    }
                }
                Source::Blob(b) => {
                    produce(cache.clone(), *b, res.compressed, offset, limit, &tx).await
                }
            };
            if r.is_ok() {
                finished_tx.store(true, std::sync::atomic::Ordering::Release);
            }
            if let Some(log) = &log {
                log.grpc(&match &r {
                    Ok(()) => format!("GRPC BYTESTREAM READ COMPLETED {name}"),
                    Err(s) => format!(
                        "GRPC BYTESTREAM READ FAILED: {name} {}",
                        crate::access_log::printable(s.message())
                    ),
                });
            }
            if let Err(status) = r {
                // Wait for a reader that stopped reading no longer than
                // the idle timeout; the end-of-stream check covers the rest.
                let _ = cache.from_client(tx.send(Err(status))).await;
            }
        });
        let mut ended = false;
        Ok(Box::pin(futures_util::stream::poll_fn(move |cx| {
            if ended {
                return std::task::Poll::Ready(None);
            }
            match std::task::ready!(rx.poll_recv(cx)) {
                Some(item) => std::task::Poll::Ready(Some(item)),
                None => {
                    ended = true;
                    if finished.load(std::sync::atomic::Ordering::Acquire) {
                        std::task::Poll::Ready(None)
                    } else {
                        std::task::Poll::Ready(Some(Err(Status::aborted(
                            "the read ended before the blob did",
                        ))))
                    }
                }
            }
        })))
    }
}

/// Hands one response to tonic; a reader that takes nothing for
/// `client_idle_timeout` ends the read.
async fn send(
    cache: &crate::Cache,
    tx: &mpsc::Sender<Result<ReadResponse, Status>>,
    data: Bytes,
) -> Result<(), Status> {
    match cache.from_client(tx.send(Ok(ReadResponse { data }))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Status::cancelled("reader went away")),
        Err(e) => Err(to_status(e)),
    }
}

/// What a ByteStream read serves from.
enum Source {
    Empty,
    /// The whole content, from the hot set.
    Hot(Bytes),
    Blob(Box<hoard_disk::Blob>),
}

/// Sends `data` (at most [`HOT_BLOB_MAX`] bytes) as one message, counted
/// against the in-flight budget until it is sent; nothing for no bytes.
async fn send_whole(
    cache: &crate::Cache,
    tx: &mpsc::Sender<Result<ReadResponse, Status>>,
    data: Bytes,
) -> Result<(), Status> {
    if data.is_empty() {
        return Ok(());
    }
    let permit = cache
        .reserve_inflight(data.len())
        .await
        .map_err(to_status)?;
    send(cache, tx, permit.hold_shared(data)).await
}

/// Streams a blob's content. `compressed` reads send zstd frames: the stored
/// ones from the chunk at or after `offset`, and a freshly compressed frame
/// for a partial first chunk.
async fn produce(
    cache: crate::Cache,
    blob: hoard_disk::Blob,
    compressed: bool,
    offset: u64,
    limit: u64,
    tx: &mpsc::Sender<Result<ReadResponse, Status>>,
) -> Result<(), Status> {
    let blocking_err =
        |e: tokio::task::JoinError| Status::internal(format!("read task failed: {e}"));
    let mut blob = blob;
    let size = blob.logical_size();
    if compressed && blob.is_zstd_stream() {
        let chunk = blob.chunk_size().unwrap_or(1 << 20) as u64;
        let mut first_stored = (offset / chunk) as usize;
        if !offset.is_multiple_of(chunk) {
            // Recompress the tail of the first chunk; stored frames follow.
            let _permit = cache
                .reserve_inflight(2 * READ_CHUNK)
                .await
                .map_err(to_status)?;
            let (b, r) = tokio::task::spawn_blocking(move || {
                let _bulk = hoard_disk::bulk_work(size);
                blob.seek(offset);
                let mut out = Vec::new();
                let r = blob.next_chunk(&mut out).map(|_| out);
                (blob, r)
            })
            .await
            .map_err(blocking_err)?;
            blob = b;
            let tail = r.map_err(data_loss)?;
            let frame =
                zstd::bulk::compress(&tail, 1).map_err(|e| Status::internal(e.to_string()))?;
            send(&cache, tx, frame.into()).await?;
            first_stored += 1;
        }
        // From offset 0 the stored file is sent whole (its header is a
        // skippable frame); each stored frame is verified before it goes.
        blob.seek_stored(first_stored);
        loop {
            let mut permit = cache
                .reserve_inflight(2 * READ_CHUNK)
                .await
                .map_err(to_status)?;
            let (b, r) = tokio::task::spawn_blocking(move || {
                let _bulk = hoard_disk::bulk_work(size);
                let mut buf = Vec::new();
                let r = blob.next_stored(&mut buf).map(|more| (more, buf));
                (blob, r)
            })
            .await
            .map_err(blocking_err)?;
            blob = b;
            let (more, data) = r.map_err(data_loss)?;
            if !more {
                break;
            }
            permit.shrink_to(data.len());
            send(&cache, tx, permit.hold(data)).await?;
        }
        return Ok(());
    }
    blob.seek(offset);
    let mut remaining = limit;
    while remaining > 0 {
        let mut permit = cache
            .reserve_inflight(2 * READ_CHUNK)
            .await
            .map_err(to_status)?;
        let (b, r) = tokio::task::spawn_blocking(move || {
            let _bulk = hoard_disk::bulk_work(size);
            let mut out = Vec::new();
            let r = blob.next_chunk(&mut out).map(|more| (more, out));
            (blob, r)
        })
        .await
        .map_err(blocking_err)?;
        blob = b;
        let (more, mut data) = r.map_err(data_loss)?;
        if !more {
            break;
        }
        if data.len() as u64 >= remaining {
            data.truncate(remaining as usize);
            // A range that ends before the blob does is proved by the
            // digest of the whole, when its chunks carry no checksum.
            let (b, r) = tokio::task::spawn_blocking(move || {
                let _bulk = hoard_disk::bulk_work(size);
                let r = blob.verify_all();
                (blob, r)
            })
            .await
            .map_err(blocking_err)?;
            blob = b;
            r.map_err(data_loss)?;
        }
        remaining -= data.len() as u64;
        let data = if compressed {
            zstd::bulk::compress(&data, 1).map_err(|e| Status::internal(e.to_string()))?
        } else {
            data
        };
        permit.shrink_to(data.len());
        send(&cache, tx, permit.hold(data)).await?;
    }
    Ok(())
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = BoxStream<ReadResponse>;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let req = req.into_inner();
        let name = crate::access_log::printable(&req.resource_name);
        let r = ByteStreamService::read(&this, req).await;
        self.0.observe("server_stream", SERVICE, "Read", start, &r);
        if let Err(s) = &r {
            self.0.log(|| match s.code() {
                tonic::Code::NotFound => format!("GRPC BYTESTREAM READ BLOB NOT FOUND: {name}"),
                _ => format!(
                    "GRPC BYTESTREAM READ FAILED: {name} {}",
                    crate::access_log::printable(s.message())
                ),
            });
        }
        r.map(Response::new)
    }

    async fn write(
        &self,
        req: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let start = Instant::now();
        let mut resource = String::new();
        let this = Self(self.0.for_request(&req));
        let r = ByteStreamService::write(&this, req.into_inner(), &mut resource).await;
        self.0.observe("client_stream", SERVICE, "Write", start, &r);
        self.0.log(|| match &r {
            Ok(_) => format!("GRPC BYTESTREAM WRITE COMPLETED: {resource}"),
            Err(s) => format!(
                "GRPC BYTESTREAM WRITE FAILED: {resource} {}",
                crate::access_log::printable(s.message())
            ),
        });
        r
    }

    async fn query_write_status(
        &self,
        req: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let r = this.query(req.into_inner()).await;
        self.0
            .observe("unary", SERVICE, "QueryWriteStatus", start, &r);
        r
    }
}

/// A read that failed mid-stream: DATA_LOSS, with the client's message
/// (never a server path).
fn data_loss(e: hoard_disk::Error) -> Status {
    Status::data_loss(crate::error::CacheError::from(e).message)
}
