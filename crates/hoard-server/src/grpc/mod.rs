//! The gRPC front end: REAPI v2 (Capabilities, ActionCache,
//! ContentAddressableStorage), ByteStream and grpc.health.v1 over tonic.
//! Like the HTTP front end it only parses requests, calls the [`Cache`]
//! facade and maps results to gRPC codes.

// tonic's service traits return `tonic::Status`, a large type; helpers
// return it too rather than converting at every call.
#![allow(clippy::result_large_err)]

mod ac;
mod bytestream;
mod capabilities;
mod cas;
pub mod codes;
pub mod resource;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use hoard_proto::build::bazel::semver::SemVer;
use hoard_proto::google::bytestream::byte_stream_server::ByteStreamServer;
use hoard_proto::reapi::action_cache_server::ActionCacheServer;
use hoard_proto::reapi::capabilities_server::CapabilitiesServer;
use hoard_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument as _;

use crate::access_log::AccessLog;
use crate::cache::Cache;
use crate::error::CacheError;
use crate::listener::{ConnectInfo, GrpcConn, Listener};

pub use bytestream::Uploads;

/// Largest total of blob bytes in one BatchUpdateBlobs or BatchReadBlobs
/// call, and what Capabilities advertises. gRPC messages may be this plus
/// [`MESSAGE_OVERHEAD`] (digests, field tags).
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 4 << 20;
const MESSAGE_OVERHEAD: usize = 1 << 20;
/// Concurrent calls on one HTTP/2 connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// HTTP/2 receive window of a connection and of each of its streams.
pub const RECEIVE_WINDOW: u32 = 1 << 20;
/// Largest HTTP/2 frame a client may send. At the default 16 KiB a 1 MiB
/// ByteStream chunk arrives as 64 DATA frames, each parsed, woken for and
/// copied on its own; on two cores that cost 10-15% of the write rate. A
/// larger frame delays another stream of the same connection by at most
/// one frame's transfer (well under a millisecond on a LAN).
const MAX_FRAME: u32 = 256 << 10;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What every service needs.
#[derive(Clone)]
pub(crate) struct Shared {
    pub cache: Cache,
    pub max_batch: u64,
    pub uploads: Arc<Uploads>,
    pub access_log: Option<AccessLog>,
}

impl Shared {
    /// Writes one access-log line (built only when the log is on).
    pub fn log(&self, line: impl FnOnce() -> String) {
        if let Some(log) = &self.access_log {
            log.grpc(&line());
        }
    }

    /// The services' state for one request: the cache handle of the
    /// request's connection, so that what the call holds in memory counts
    /// against that connection's share of the budget.
    /// The identity the auth layer found goes with it.
    pub fn for_request<T>(&self, req: &tonic::Request<T>) -> Shared {
        let cache = req
            .extensions()
            .get::<ConnectInfo>()
            .and_then(|i| i.cache.clone())
            .unwrap_or_else(|| self.cache.clone());
        let cache = match req.extensions().get::<crate::auth::Identity>() {
            Some(id) => cache.with_identity(id.clone()),
            None => cache,
        };
        Shared {
            cache,
            ..self.clone()
        }
    }

    /// See [`Cache::namespace_for_read`]: None for a namespace never
    /// written here (nothing is created for it).
    pub async fn namespace_for_read(
        &self,
        instance: &str,
        probe: Option<(hoard_disk::Kind, &hoard_disk::Hash)>,
    ) -> Result<Option<hoard_disk::NamespaceId>, Status> {
        self.cache
            .namespace_for_read(instance, probe)
            .await
            .map_err(to_status)
    }

    pub fn namespace(&self, instance: &str) -> Result<hoard_disk::NamespaceId, Status> {
        self.cache.namespace(instance).map_err(to_status)
    }

    /// Records `grpc_server_handled_total` and `grpc_server_handling_seconds`.
    pub fn observe<T>(
        &self,
        kind: &str,
        service: &str,
        method: &str,
        start: Instant,
        r: &Result<T, Status>,
    ) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        let m = self.cache.metrics();
        m.grpc_handled
            .with_label_values(&[kind, service, method, code_name(code)])
            .inc();
        m.grpc_seconds
            .with_label_values(&[kind, service, method])
            .observe(start.elapsed().as_secs_f64());
    }
}

/// The gRPC code for a facade error.
pub fn to_status(e: CacheError) -> Status {
    Status::new(e.grpc_code(), codes::clip(&e.message))
}

pub(crate) fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

pub(crate) fn semver(major: i32, minor: i32) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

/// gRPC settings.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    pub max_batch_bytes: u64,
    /// How long an interrupted ByteStream write stays resumable.
    pub resumable_upload_ttl: Duration,
    /// Most interrupted writes kept for resumption at once.
    pub max_paused_uploads: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            resumable_upload_ttl: Duration::from_secs(600),
            max_paused_uploads: 256,
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` fires, then lets in-flight
/// calls finish (up to `drain`).
pub async fn serve(
    listener: Listener,
    cache: Cache,
    tls: Option<Arc<crate::tls::Tls>>,
    cfg: GrpcConfig,
    access_log: Option<AccessLog>,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    let uploads = Arc::new(Uploads::new(
        cfg.resumable_upload_ttl,
        cfg.max_paused_uploads,
    ));
    let reaper = Arc::clone(&uploads);
    let reaper_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = reaper_stop.cancelled() => return,
                _ = tick.tick() => reaper.reap_expired(),
            }
        }
    });
    let shared = Shared {
        cache: cache.clone(),
        max_batch: cfg.max_batch_bytes,
        uploads,
        access_log,
    };
    let limit = cfg.max_batch_bytes as usize + MESSAGE_OVERHEAD;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // A live client answers pings, so its connection never looks idle to
    // the listener's idle timeout, and a call it stalls is ended by the
    // call's own timeout with a status the client can read. A dead or
    // unreading client fails to answer and loses the connection.
    let idle = listener.config().idle_timeout;
    let ping = (!idle.is_zero()).then(|| (idle / 3).max(Duration::from_secs(1)));
    // The answer may take the whole idle timeout: a busy client is not a
    // dead one.
    let ping_answer = (!idle.is_zero()).then_some(idle.max(Duration::from_secs(1)));
    let incoming = accepted(listener, cache.clone(), tls, shutdown.clone());
    let stop = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // HTTP/2's default 64 KiB windows make a client wait for a window
        // update every 64 KiB: a 64 MiB ByteStream write, or a 700 KB
        // FindMissingBlobs, crosses a thousand or a dozen round trips.
        // Data the client may send before hoard reads it is buffered by h2,
        // outside the in-flight budget: at most RECEIVE_WINDOW per
        // connection (the connection window bounds all its streams).
        .initial_connection_window_size(RECEIVE_WINDOW)
        .initial_stream_window_size(RECEIVE_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(ping)
        .http2_keepalive_timeout(ping_answer)
        .layer(codes::StatusFixLayer)
        .layer(codes::AuthLayer(cache.clone()))
        .add_service(health)
        .add_service(
            CapabilitiesServer::new(capabilities::CapabilitiesService(shared.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            ActionCacheServer::new(ac::ActionCacheService(shared.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            ContentAddressableStorageServer::new(cas::CasService(shared.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            ByteStreamServer::new(bytestream::ByteStreamService(shared.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await });
    let mut server = Box::pin(server);
    tokio::select! {
        r = &mut server => return r,
        _ = shutdown.cancelled() => {}
    }
    // Shutdown was asked for: tonic stops accepting and drains; bound it.
    match tokio::time::timeout(drain, server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("gRPC calls still running at the shutdown deadline");
            Ok(())
        }
    }
}

/// Accepted connections as the stream tonic wants, each with its own
/// handle on the cache. TLS handshakes run in their own tasks (bounded by
/// the header timeout), so a slow one never holds up the next accept.
fn accepted(
    listener: Listener,
    cache: Cache,
    tls: Option<Arc<crate::tls::Tls>>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<GrpcConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<GrpcConn>(64);
    let timeout = listener.config().header_timeout;
    tokio::spawn(
        async move {
            loop {
                let (io, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    c = listener.accept() => c,
                };
                let tx = tx.clone();
                let cache = cache.clone();
                let tls = tls.clone();
                tokio::spawn(
                    async move {
                        let Some(io) = crate::listener::handshake(
                            io,
                            tls.as_deref(),
                            crate::tls::Protocol::Grpc,
                            timeout,
                        )
                        .await
                        else {
                            return;
                        };
                        let cache = cache
                            .for_connection()
                            .with_certificate(io.peer_common_name());
                        let info = ConnectInfo {
                            peer,
                            cache: Some(cache),
                        };
                        let _ = tx.send(GrpcConn { io, info }).await;
                    }
                    .instrument(tracing::debug_span!("grpc handshake", %peer)),
                );
            }
        }
        .instrument(tracing::debug_span!("grpc accept")),
    );
    let mut rx = rx;
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok)))
}
