//! The HTTP front end, bazel-remote compatible:
//! `GET|HEAD|PUT /[<instance>/](ac|cas)/<sha256>`, plus `/status`,
//! `/metrics`, `/healthz` and `/readyz`. It parses requests, calls the
//! [`Cache`] facade and maps results to status codes; it holds no cache rule
//! of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use hoard_disk::{Hash, Kind};
use hoard_proto::prost::Message;
use hoard_proto::reapi::ActionResult;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, BodyStream, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::access_log::AccessLog;
use crate::auth::{Access, parse_basic};
use crate::cache::{Cache, Encoding, Found};
use crate::error::CacheError;
use crate::lanes::{self, Mark};
use crate::listener::Listener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Blobs up to this size are read into memory and sent in one piece; larger
/// ones stream chunk by chunk from the blocking pool.
const INLINE_LIMIT: u64 = 256 * 1024;
const STREAM_CHUNK: usize = 1 << 20;
/// Largest read buffer per connection: bounds what a request head (or a
/// client trickling one) can cost.
const MAX_BUF: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// What the HTTP server needs besides the cache.
pub struct HttpState {
    pub cache: Cache,
    pub access_log: Option<AccessLog>,
    pub started: SystemTime,
    pub storage_mode: &'static str,
    pub version: &'static str,
    pub shutting_down: AtomicBool,
    /// Cache requests served so far (for the idle timeout).
    pub cache_requests: AtomicU64,
    /// Both front ends' connections.
    pub connections: Arc<crate::listener::Connections>,
    /// TLS for both listeners, when configured.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The runtime bulk transfers move to ([`crate::lanes`]); None keeps
    /// every connection where it was accepted.
    pub bulk_lane: Option<tokio::runtime::Handle>,
}

/// Serves HTTP on `listener` until `shutdown` fires, then stops accepting,
/// lets in-flight requests finish (up to `drain`), and returns.
///
/// Each connection gets its own handle on the cache (its share of the
/// in-flight budget), a header-read timeout, a bounded read buffer, and
/// half-close support: a client that shuts down its sending side after a
/// request still gets the answer.
pub async fn serve(
    listener: Listener,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(listener.config().header_timeout)
        .max_buf_size(MAX_BUF)
        .max_headers(MAX_HEADERS);
    let header_timeout = listener.config().header_timeout;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let st = Arc::clone(&state);
        let cache = state.cache.for_connection();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        // The handshake (if any) and the connection run in their own task:
        // a slow client never holds up the next accept.
        tokio::spawn(
            async move {
                let Some(io) = crate::listener::handshake(
                    stream,
                    st.tls.as_deref(),
                    crate::tls::Protocol::Http,
                    header_timeout,
                )
                .await
                else {
                    return;
                };
                let cache = cache.with_certificate(io.peer_common_name());
                let mark = Arc::new(Mark::default());
                let bulk_lane = st.bulk_lane.clone();
                let m = Arc::clone(&mark);
                let svc = service_fn(move |req| {
                    let st = Arc::clone(&st);
                    let cache = cache.clone();
                    let mark = Arc::clone(&m);
                    // Boxed: a request's state machine is large, and an idle
                    // connection should not carry its room.
                    Box::pin(async move {
                        Ok::<_, Infallible>(handle(&st, &cache, req, peer, &mark).await)
                    })
                });
                let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc));
                let conn = Box::pin(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
                crate::lanes::run(bulk_lane, mark, conn).await;
            }
            .instrument(tracing::debug_span!("http connection", %peer)),
        );
    }
    state.shutting_down.store(true, Ordering::Relaxed);
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("HTTP requests still running at the shutdown deadline"),
    }
    if let Some(log) = &state.access_log {
        log.flush();
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body: Bytes = body.into();
    let mut r = Response::new(
        Full::new(body)
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut s: String = msg.into();
    s.push('\n');
    let mut r = full(status, s);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn error_response(e: &CacheError) -> Response<Body> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // Bounded: a message may quote what the client sent.
    text(status, crate::grpc::codes::clip(&e.message))
}

async fn handle(
    st: &HttpState,
    cache: &Cache,
    req: Request<Incoming>,
    peer: SocketAddr,
    mark: &Arc<Mark>,
) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // A large upload runs in the bulk lane while its body is read.
    let upload = (method == Method::PUT && lanes::is_bulk(content_length(req.headers())))
        .then(|| mark.bulk());
    let (resp, handler) = route(st, cache, req).await;
    drop(upload);
    // A large download runs in the bulk lane until hyper has written it.
    let resp_len = content_length(resp.headers()).or_else(|| resp.body().size_hint().exact());
    let resp =
        if method == Method::GET && resp.status() == StatusCode::OK && lanes::is_bulk(resp_len) {
            let guard = mark.bulk();
            resp.map(|body| lanes::InBulkLane::new(body, guard).boxed_unsync())
        } else {
            resp
        };
    let code = resp.status().as_u16();
    st.cache
        .metrics()
        .http_duration
        .with_label_values(&[handler, method.as_str(), &code.to_string()])
        .observe(start.elapsed().as_secs_f64());
    if let Some(log) = &st.access_log
        && handler != "metrics"
        && handler != "probe"
    {
        log.record(method.as_str(), code, peer.ip(), &path);
    }
    resp
}

async fn route(
    st: &HttpState,
    cache: &Cache,
    req: Request<Incoming>,
) -> (Response<Body>, &'static str) {
    // Probes are always open; everything else follows the facade's rule:
    // reads (GET, HEAD, /status, /metrics) and writes (PUT).
    let path = req.uri().path();
    if path != "/healthz" && path != "/readyz" {
        let access = if req.method() == Method::PUT {
            Access::Write
        } else {
            Access::Read
        };
        let creds = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| parse_basic(v.as_bytes()));
        let identity = match cache.authorize(creds, access).await {
            Ok(id) => id,
            Err(e) => {
                let mut r = error_response(&e);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"hoard\""),
                );
                let handler = match path {
                    "/status" => "status",
                    "/metrics" => "metrics",
                    _ => "auth",
                };
                return (r, handler);
            }
        };
        let cache = cache.with_identity(identity);
        return serve_route(st, &cache, req).await;
    }
    serve_route(st, cache, req).await
}

async fn serve_route(
    st: &HttpState,
    cache: &Cache,
    req: Request<Incoming>,
) -> (Response<Body>, &'static str) {
    match req.uri().path() {
        "/status" => return (status_page(st, cache), "status"),
        "/metrics" => {
            let m = st.cache.metrics();
            m.inflight_bytes.set(st.cache.inflight_bytes() as i64);
            let c = &st.connections;
            m.open_connections
                .set(c.open.load(Ordering::Relaxed) as i64);
            // The listener counts; the counters catch up to it here.
            let catch_up = |ctr: &prometheus::IntCounter, now: u64| {
                ctr.inc_by(now.saturating_sub(ctr.get()));
            };
            catch_up(&m.refused_connections, c.refused.load(Ordering::Relaxed));
            catch_up(
                &m.idle_closed_connections,
                c.timed_out.load(Ordering::Relaxed),
            );
            if let Some(b) = st.cache.backend() {
                b.refresh_gauges();
            }
            let visible = |ns: &str| cache.may_see(ns);
            let mut r = full(StatusCode::OK, m.render(st.cache.disk(), &visible));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return (r, "metrics");
        }
        "/healthz" => return (text(StatusCode::OK, "ok"), "probe"),
        "/readyz" => {
            let s = st.cache.disk().stats();
            return if st.shutting_down.load(Ordering::Relaxed) {
                (
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
                    "probe",
                )
            } else if s.loaded {
                (text(StatusCode::OK, "ready"), "probe")
            } else {
                let msg = format!(
                    "loading cache index: {:.0}% of directories",
                    s.load_fraction * 100.0
                );
                (text(StatusCode::SERVICE_UNAVAILABLE, msg), "probe")
            };
        }
        _ => {}
    }
    let handler = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        _ => {
            let m = req.method().to_string();
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Method '{m}' not supported."),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, PUT"));
            return (r, "other");
        }
    };
    st.cache_requests.fetch_add(1, Ordering::Relaxed);
    let (instance, kind, hash) = match parse_cache_path(req.uri().path()) {
        Ok(x) => x,
        Err(msg) => return (text(StatusCode::BAD_REQUEST, msg), handler),
    };
    let resp = match cache_request(cache, req, &instance, kind, hash).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    (resp, handler)
}

/// Splits `/[<instance>/](ac|cas)/<hash>`. The instance is checked as a
/// namespace name, so `..`, empty segments and percent-escapes never reach
/// the filesystem.
pub fn parse_cache_path(path: &str) -> Result<(String, Kind, Hash), String> {
    // Only the start of a long path is echoed back.
    let shown = crate::grpc::codes::clip_to(path, 200);
    let expected = || {
        format!(
            "resource name must be /[<instance>/](ac|cas)/<sha256 as 64 lower-case hex>, got {shown:?}"
        )
    };
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let mut segs: Vec<&str> = trimmed.split('/').collect();
    let hash_s = segs.pop().ok_or_else(expected)?;
    let kind = match segs.pop() {
        Some("ac") => Kind::Ac,
        Some("cas") => Kind::Cas,
        _ => return Err(expected()),
    };
    let hash = Hash::parse(hash_s).map_err(|e| format!("{}: {e}", expected()))?;
    if segs.iter().any(|s| s.is_empty()) {
        return Err(format!("{}: empty path segment", expected()));
    }
    let instance = segs.join("/");
    if !instance.is_empty() {
        hoard_disk::validate_namespace(&instance).map_err(|e| {
            crate::grpc::codes::clip(&format!("bad instance prefix in {shown:?}: {e}"))
        })?;
    }
    Ok((instance, kind, hash))
}

async fn cache_request(
    cache: &Cache,
    req: Request<Incoming>,
    instance: &str,
    kind: Kind,
    hash: Hash,
) -> Result<Response<Body>, CacheError> {
    let (kind, hash) = match kind {
        Kind::Ac => (cache.http_ac_kind(), cache.action_key(instance, hash)),
        other => (other, hash),
    };
    if req.method() == Method::PUT {
        let ns = cache.namespace(instance)?;
        return put(cache, req, ns, kind, hash).await;
    }
    // A read of a namespace never written here is a miss, and creates it
    // only when the bucket has the blob.
    let Some(ns) = cache
        .namespace_for_read(instance, Some((kind, &hash)))
        .await?
    else {
        return Ok(text(StatusCode::NOT_FOUND, "Not found"));
    };
    match (req.method().clone(), kind) {
        (Method::HEAD, Kind::Cas) => Ok(match cache.cas_get(ns, &hash).await? {
            Some(Found::Empty) => with_length(full(StatusCode::OK, Bytes::new()), 0),
            Some(Found::Blob(b)) => {
                with_length(full(StatusCode::OK, Bytes::new()), b.logical_size())
            }
            None => text(StatusCode::NOT_FOUND, "Not found"),
        }),
        (_, Kind::Cas) => get_cas(cache, req.headers(), ns, hash).await,
        (m, Kind::Raw) => {
            let Some(blob) = cache.raw_get(ns, &hash).await? else {
                return Ok(text(StatusCode::NOT_FOUND, "Not found"));
            };
            if m == Method::HEAD {
                let len = blob.logical_size();
                return Ok(with_length(full(StatusCode::OK, Bytes::new()), len));
            }
            serve_blob(cache, req.headers(), None, blob).await
        }
        (m, Kind::Ac) => {
            let Some((bytes, ar)) = cache.ac_get(ns, &hash).await? else {
                return Ok(text(StatusCode::NOT_FOUND, "Not found"));
            };
            if m == Method::HEAD {
                return Ok(with_length(
                    full(StatusCode::OK, Bytes::new()),
                    bytes.len() as u64,
                ));
            }
            if wants_json(req.headers()) {
                let json = serde_json::to_vec(&ar).map_err(|e| {
                    CacheError::internal(format!("encoding ActionResult as JSON: {e}"))
                })?;
                let mut r = full(StatusCode::OK, json);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(r);
            }
            Ok(octets(full(StatusCode::OK, bytes)))
        }
    }
}

fn with_length(mut r: Response<Body>, len: u64) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    octets(r)
}

fn octets(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

fn wants_json(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().starts_with("application/json"))
        })
}

fn accepts_zstd(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().split(';').next() == Some("zstd"))
        })
}

async fn get_cas(
    cache: &Cache,
    headers: &HeaderMap,
    ns: hoard_disk::NamespaceId,
    hash: Hash,
) -> Result<Response<Body>, CacheError> {
    // A hot blob costs no file at all. (A client accepting zstd would get
    // the stored frames from the file; identity is acceptable to it too.)
    if let Some(bytes) = cache.cas_hot(ns, &hash) {
        let size = bytes.len() as u64;
        let permit = cache.reserve_inflight(bytes.len()).await?;
        return Ok(with_length(
            full(StatusCode::OK, permit.hold_shared(bytes)),
            size,
        ));
    }
    let blob = match cache.cas_get(ns, &hash).await? {
        None => return Ok(text(StatusCode::NOT_FOUND, "Not found")),
        Some(Found::Empty) => return Ok(with_length(full(StatusCode::OK, Bytes::new()), 0)),
        Some(Found::Blob(b)) => *b,
    };
    serve_blob(cache, headers, Some((ns, hash)), blob).await
}

/// Sends a stored blob's content: whole when small, else streamed; the
/// stored zstd stream as is to a client accepting zstd. `cas`: the CAS
/// blob's key, for the hot set (raw entries never go there).
async fn serve_blob(
    cache: &Cache,
    headers: &HeaderMap,
    cas: Option<(hoard_disk::NamespaceId, Hash)>,
    blob: hoard_disk::Blob,
) -> Result<Response<Body>, CacheError> {
    if accepts_zstd(headers) && blob.is_zstd_stream() {
        let len = blob.stored_len();
        let mut r = with_length(stream_blob(cache.clone(), blob, true), len);
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        return Ok(r);
    }
    let size = blob.logical_size();
    if size <= INLINE_LIMIT {
        let permit = cache.reserve_inflight(size as usize).await?;
        let mut blob = blob;
        // A small file was already read whole when it was opened; this only
        // decompresses it (and keeps it in the hot set if small enough).
        let read = match cas {
            Some((ns, hash)) => cache.cas_read_small(ns, &hash, &mut blob),
            None => blob.read_to_vec().map(Bytes::from),
        };
        return match read {
            Ok(data) => Ok(with_length(
                full(StatusCode::OK, permit.hold_shared(data)),
                size,
            )),
            Err(hoard_disk::Error::Corrupt { .. }) => Ok(text(StatusCode::NOT_FOUND, "Not found")),
            Err(e) => Err(e.into()),
        };
    }
    Ok(with_length(stream_blob(cache.clone(), blob, false), size))
}

/// Streams a blob from the blocking pool: at most one chunk waits in the
/// channel and one is being written, each counted in the in-flight budget.
/// A read error mid-body is passed to hyper as a body error, which aborts
/// the connection, so a client can never take a truncated body for a whole
/// one. Chunks go out a slice at a time ([`crate::pace`]).
fn stream_blob(cache: Cache, blob: hoard_disk::Blob, stored: bool) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(1);
    tokio::spawn(async move {
        let mut blob = blob;
        let size = blob.logical_size();
        if stored {
            blob.seek_stored(0);
        }
        let mut blob = Some(blob);
        loop {
            // Decoding (and, for stored frames, verifying) needs a stored
            // chunk and a decoded one at once.
            let mut permit = match cache.reserve_inflight(2 * STREAM_CHUNK).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let Some(mut b) = blob.take() else { return };
            let read = tokio::task::spawn_blocking(move || {
                let _bulk = hoard_disk::bulk_work(size);
                let mut buf = Vec::new();
                let r = if stored {
                    b.next_stored(&mut buf)
                } else {
                    b.next_chunk(&mut buf)
                };
                (b, r, buf)
            })
            .await;
            let (b, r, buf) = match read {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            match r {
                Ok(true) => {
                    blob = Some(b);
                    // Only the chunk itself waits for the client.
                    permit.shrink_to(buf.len());
                    if tx.send(Ok(permit.hold(buf))).await.is_err() {
                        return; // client went away
                    }
                }
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "read failed mid-response; aborting it");
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    });
    let mut rx = rx;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let stream = crate::pace::Paced::new(stream).map_ok(Frame::data);
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    *r.status_mut() = StatusCode::OK;
    r
}

/// The Content-Length of a request or response, if it has a valid one.
fn content_length(h: &HeaderMap) -> Option<u64> {
    header_u64(h, "content-length").ok().flatten()
}

/// A header holding a decimal number, if present.
fn header_u64(h: &HeaderMap, name: &str) -> Result<Option<u64>, CacheError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                let shown = String::from_utf8_lossy(v.as_bytes());
                CacheError::invalid(format!(
                    "invalid {name} header: {:?}",
                    crate::grpc::codes::clip_to(&shown, 100)
                ))
            }),
    }
}

/// What a PUT's headers declare.
#[derive(Debug, PartialEq, Eq)]
pub struct PutHead {
    pub encoding: Encoding,
    /// Logical size of the blob.
    pub size: u64,
    pub content_length: Option<u64>,
    /// An action result sent as JSON.
    pub json: bool,
}

/// The most bytes a zstd encoding of `size` bytes can take (zstd's own
/// bound is below it).
pub fn zstd_bound(size: u64) -> u64 {
    size.saturating_add(size / 128).saturating_add(1024)
}

/// Reads and cross-checks a PUT's headers, before anything is allocated
/// or reserved for its body.
pub fn put_head(h: &HeaderMap, kind: Kind) -> Result<PutHead, CacheError> {
    let encoding = match h
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None | Some("identity") | Some("") => Encoding::Identity,
        Some("zstd") => Encoding::Zstd,
        Some(other) => {
            return Err(CacheError::invalid(format!(
                "Unsupported content-encoding: {:?} (use identity or zstd)",
                crate::grpc::codes::clip_to(other, 100)
            )));
        }
    };
    let content_length = header_u64(h, "content-length")?;
    let digest_size = header_u64(h, "x-digest-sizebytes")?;
    let size = match (encoding, digest_size, content_length) {
        (Encoding::Identity, Some(s), Some(c)) if s != c => {
            return Err(CacheError::invalid(format!(
                "Content-Length {c} does not match X-Digest-SizeBytes {s}"
            )));
        }
        (_, Some(s), _) => s,
        (Encoding::Identity, None, Some(c)) => c,
        (Encoding::Zstd, None, _) => {
            return Err(CacheError::invalid(
                "a zstd-encoded PUT needs X-Digest-SizeBytes with the uncompressed size",
            ));
        }
        (Encoding::Identity, None, None) => {
            return Err(CacheError::invalid("PUT without Content-Length"));
        }
    };
    if encoding == Encoding::Zstd
        && let Some(c) = content_length
        && c > zstd_bound(size)
    {
        return Err(CacheError::invalid(format!(
            "size mismatch: Content-Length {c} is larger than any zstd encoding of {size} bytes"
        )));
    }
    let json = kind == Kind::Ac
        && h.get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
    Ok(PutHead {
        encoding,
        size,
        content_length,
        json,
    })
}

async fn put(
    cache: &Cache,
    req: Request<Incoming>,
    ns: hoard_disk::NamespaceId,
    kind: Kind,
    hash: Hash,
) -> Result<Response<Body>, CacheError> {
    // What the head says is refused here, before the facade sees the
    // body; everything after is the facade's to refuse (and count).
    let PutHead {
        encoding,
        size,
        content_length,
        json,
    } = put_head(req.headers(), kind).map_err(|e| cache.refuse(ns, kind, e))?;
    let body = BodyStream::new(req.into_body()).filter_map(|frame| async move {
        match frame {
            Ok(f) => f.into_data().ok().map(Ok),
            Err(e) => Some(Err(CacheError::invalid(format!(
                "reading request body: {e}"
            )))),
        }
    });
    let mut body = Box::pin(body);
    if kind != Kind::Ac {
        // CAS bytes are checked against their digest; raw entries are
        // stored as they come.
        cache.put(ns, kind, hash, size, encoding, &mut body).await?;
        return Ok(full(StatusCode::OK, Bytes::new()));
    }
    let mut bytes = cache
        .receive_action_result(ns, size, encoding, content_length, &mut body)
        .await?;
    if json {
        let ar: ActionResult = serde_json::from_slice(&bytes).map_err(|e| {
            cache.refuse(
                ns,
                kind,
                CacheError::invalid(format!("invalid ActionResult JSON: {e}")),
            )
        })?;
        bytes = ar.encode_to_vec().into();
    }
    cache.ac_put(ns, hash, bytes).await?;
    Ok(full(StatusCode::OK, Bytes::new()))
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct Status {
    curr_size: u64,
    uncompressed_size: u64,
    reserved_size: u64,
    max_size: u64,
    num_files: u64,
    server_time: u64,
    git_commit: &'static str,
    git_tags: &'static str,
    num_goroutines: usize,
    version: &'static str,
    storage_mode: &'static str,
    index_loaded: bool,
    index_load_progress: f64,
    /// False while a start after a crash is still reading the stored sizes
    /// of the files it indexed by name: `CurrSize` counts those sized.
    index_sizes_known: bool,
    index_heap_bytes: u64,
    evicted_bytes: u64,
    pending_deletion_bytes: u64,
    hard_limit: Option<u64>,
    in_flight_bytes: u64,
    namespaces: Vec<String>,
    /// Per-namespace figures, of the namespaces the caller may see.
    namespace_stats: Vec<NamespaceStatus>,
    uptime_seconds: u64,
    /// The S3 tier, when configured.
    backend: Option<BackendStatus>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct NamespaceStatus {
    name: String,
    num_files: u64,
    curr_size: u64,
    /// `namespaces.max_size` (or its override), if any.
    max_size: Option<u64>,
    evicted_bytes: u64,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct BackendStatus {
    /// None until the startup probe has run.
    honors_if_none_match: Option<bool>,
    atomic_create: Option<bool>,
    /// How uploads are classified: conditional PUT, or HEAD before PUT on a
    /// bucket that ignores If-None-Match.
    upload_mode: &'static str,
    upload_queue_length: usize,
}

fn status_page(st: &HttpState, cache: &Cache) -> Response<Body> {
    let s = st.cache.disk().stats();
    let now = SystemTime::now();
    let status = Status {
        curr_size: s.size_on_disk,
        uncompressed_size: s.logical_bytes,
        reserved_size: s.reserved,
        max_size: s.max_size,
        num_files: s.entries,
        server_time: now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        git_commit: option_env!("HOARD_GIT_COMMIT").unwrap_or(""),
        git_tags: "",
        num_goroutines: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        version: st.version,
        storage_mode: st.storage_mode,
        index_loaded: s.loaded,
        index_load_progress: s.load_fraction,
        index_sizes_known: s.sizes_known,
        index_heap_bytes: s.index_heap_bytes,
        evicted_bytes: s.evicted_bytes_total,
        pending_deletion_bytes: s.pending_deletion,
        hard_limit: s.hard_limit,
        in_flight_bytes: st.cache.inflight_bytes(),
        namespaces: cache.visible_namespaces(),
        namespace_stats: cache
            .namespace_stats()
            .into_iter()
            .map(|n| NamespaceStatus {
                name: n.name,
                num_files: n.entries,
                curr_size: n.size_on_disk,
                max_size: n.quota,
                evicted_bytes: n.evicted_bytes_total,
            })
            .collect(),
        uptime_seconds: now
            .duration_since(st.started)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        backend: st.cache.backend().map(|b| {
            let probe = b.probe_report();
            BackendStatus {
                honors_if_none_match: probe.as_ref().map(|p| p.honors_if_none_match),
                atomic_create: probe.as_ref().map(|p| p.atomic_create),
                upload_mode: match &probe {
                    None => "waiting for the probe",
                    Some(p) if p.honors_if_none_match => "conditional PUT (If-None-Match: *)",
                    Some(_) => "HEAD before PUT (the bucket ignores If-None-Match)",
                },
                upload_queue_length: b.queue_len(),
            }
        }),
    };
    let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
    let mut r = full(StatusCode::OK, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_parse_and_traversal_is_refused() {
        let h = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let (i, k, _) = parse_cache_path(&format!("/cas/{h}")).unwrap();
        assert_eq!((i.as_str(), k), ("", Kind::Cas));
        let (i, k, _) = parse_cache_path(&format!("/team/x/ac/{h}")).unwrap();
        assert_eq!((i.as_str(), k), ("team/x", Kind::Ac));
        for bad in [
            format!("/cas/{}", &h[..10]),
            format!("/cas/{}", h.to_uppercase()),
            format!("/../cas/{h}"),
            format!("/%2e%2e/cas/{h}"),
            format!("//cas/{h}"),
            format!("/a//cas/{h}"),
            "/etc/passwd".to_string(),
            format!("/cas.v2/{h}"),
            format!("/cas/{h}/"),
        ] {
            assert!(parse_cache_path(&bad).is_err(), "{bad} accepted");
        }
    }
}
