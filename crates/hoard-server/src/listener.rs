//! Accepting connections, for the HTTP and the gRPC front end alike, with
//! the limits a shared host needs (DESIGN §12).
//!
//! * The listen backlog is the kernel's maximum (`net.core.somaxconn`)
//!   unless `listen_backlog` says otherwise: a burst of connects larger
//!   than a library default of 128 overflows the queue, and the SYN
//!   cookies the kernel falls back to lose the first bytes of requests.
//! * At most `max_connections` are open at once. One over the cap is
//!   accepted and closed at once (the client sees the close, not a hang in
//!   the backlog) and counted.
//! * Every connection is a [`Watched`] stream: when hoard waits on the
//!   client (to read or to write) and nothing moves for `idle_timeout`,
//!   the stream fails with `TimedOut`, which ends the connection and drops
//!   everything its requests hold (in-flight bytes, reservations).
//! * A closed connection lingers: hoard half-closes its side, then reads
//!   and discards what the client still sends, for a bounded time and
//!   amount. A client that sent a body hoard refused (413, 400) and only
//!   then reads the answer gets the answer, not a reset.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::Instrument as _;

/// How long a closed connection keeps reading what its client still sends.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// How much a closed connection reads before it gives up on its client.
const LINGER_BYTES: u64 = 64 << 20;
/// The backlog used when the kernel's maximum cannot be read.
const FALLBACK_BACKLOG: u32 = 4096;

/// Limits for accepted connections.
#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// Listen backlog; None: the kernel's maximum.
    pub backlog: Option<u32>,
    /// How long a client may leave hoard waiting, reading or writing.
    /// Zero: forever.
    pub idle_timeout: Duration,
    /// How long a client may take to send a request head (HTTP/1).
    pub header_timeout: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            backlog: None,
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The kernel's largest listen backlog (`/proc/sys/net/core/somaxconn`).
pub fn system_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n > 0)
        .unwrap_or(FALLBACK_BACKLOG)
}

/// The connection cap, shared by both front ends (file descriptors are
/// one pool), and its counts for metrics.
pub struct Connections {
    slots: Arc<Semaphore>,
    max: usize,
    pub open: AtomicU64,
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
}

impl Connections {
    pub fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            slots: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }
}

/// A bound socket drawing on the shared connection cap.
pub struct Listener {
    inner: TcpListener,
    cfg: ListenConfig,
    stats: Arc<Connections>,
}

/// Opens a listening socket on `addr` with the configured backlog.
pub fn bind(addr: SocketAddr, cfg: ListenConfig, stats: Arc<Connections>) -> io::Result<Listener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let backlog = cfg.backlog.unwrap_or_else(system_backlog);
    let inner = socket.listen(backlog)?;
    Ok(Listener { inner, cfg, stats })
}

impl Listener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn config(&self) -> &ListenConfig {
        &self.cfg
    }

    /// The next connection within the cap. Accept errors (out of file
    /// descriptors and the like) back off and retry; connections over the
    /// cap are closed and counted.
    pub async fn accept(&self) -> (Watched, SocketAddr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&self.stats.slots).try_acquire_owned() else {
                let n = self.stats.refused.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        max_connections = self.stats.max,
                        refused = n + 1,
                        "connection cap reached; closing new connections"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            self.stats.open.fetch_add(1, Ordering::Relaxed);
            return (
                Watched {
                    io: Some(stream),
                    peer,
                    idle: self.cfg.idle_timeout,
                    last: Instant::now(),
                    timer: None,
                    slot: Some(slot),
                    stats: Arc::clone(&self.stats),
                },
                peer,
            );
        }
    }
}

/// An accepted connection that fails when its client leaves hoard waiting
/// for longer than the idle timeout, and lingers when dropped.
pub struct Watched {
    /// Taken by the linger task on drop.
    io: Option<TcpStream>,
    peer: SocketAddr,
    idle: Duration,
    /// The last time bytes moved in either direction.
    last: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    slot: Option<OwnedSemaphorePermit>,
    stats: Arc<Connections>,
}

impl Watched {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn io(&mut self) -> io::Result<&mut TcpStream> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection closed"))
    }

    /// Called when the inner stream is not ready: fails once nothing has
    /// moved for the idle timeout, else makes sure a timer will wake us.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.idle.is_zero() {
            return Poll::Pending;
        }
        let due = self.last + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        ready!(timer.as_mut().poll(cx));
        self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client idle for {:?}", self.idle),
        ))
    }

    fn moved(&mut self) {
        self.last = Instant::now();
    }

    /// What a poll of the inner stream means for the idle clock: bytes
    /// moved (or an error) restart it; not ready checks it.
    fn track<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.moved();
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let io = self.io()?;
        let r = Pin::new(io).poll_read(cx, buf);
        self.track(cx, r)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let io = self.io()?;
        let r = Pin::new(io).poll_write(cx, data);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let io = self.io()?;
        let r = Pin::new(io).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = self.io()?;
        match Pin::new(io).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = self.io()?;
        match Pin::new(io).poll_shutdown(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let (Some(io), Ok(rt)) = (self.io.take(), tokio::runtime::Handle::try_current()) else {
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        // The slot stays taken while the connection lingers: its file
        // descriptor is still open.
        let slot = self.slot.take();
        let stats = Arc::clone(&self.stats);
        let peer = self.peer;
        rt.spawn(
            async move {
                linger(io).await;
                drop(slot);
                stats.open.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(tracing::debug_span!("linger", %peer)),
        );
    }
}

/// Half-closes, then reads until the client closes too (or the linger
/// bounds are reached), so that unread request bytes do not turn the close
/// into a reset that destroys the response in flight.
async fn linger(mut io: TcpStream) {
    let _ = io.shutdown().await;
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 4096];
    let mut read = 0u64;
    while read < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => read += n as u64,
            _ => break,
        }
    }
}

/// A connection as the protocol sees it: plain, or TLS over the watched
/// stream (the idle timeout applies under TLS as well).
pub enum ClientIo {
    Plain(Watched),
    Tls(Box<tokio_rustls::server::TlsStream<Watched>>),
}

/// Makes `io` what `tls` asks for: a TLS handshake, bounded by `timeout`
/// (a client that opens a connection and sends nothing holds it no
/// longer), or the plain stream. A failed handshake is logged (debug: a
/// port scanner is not news) and ends the connection: None.
pub async fn handshake(
    io: Watched,
    tls: Option<&crate::tls::Tls>,
    protocol: crate::tls::Protocol,
    timeout: Duration,
) -> Option<ClientIo> {
    let Some(tls) = tls else {
        return Some(ClientIo::Plain(io));
    };
    let peer = io.peer();
    let accept = tls.acceptor(protocol).accept(io);
    match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(s)) => Some(ClientIo::Tls(Box::new(s))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %peer, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

impl ClientIo {
    /// The common name (CN) of the client certificate the TLS handshake
    /// verified, if any. A certificate whose subject has no CN, or more
    /// than one, or one that is not UTF-8, names nobody.
    pub fn peer_common_name(&self) -> Option<String> {
        let ClientIo::Tls(s) = self else {
            return None;
        };
        let der = s.get_ref().1.peer_certificates()?.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let mut names = cert.subject().iter_common_name();
        let cn = names.next()?.as_str().ok()?.to_string();
        names.next().is_none().then_some(cn)
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ClientIo::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ClientIo::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_shutdown(cx))
    }
}

/// What gRPC handlers find in a request's extensions: the peer, and the
/// connection's handle on the cache (its share of the budget).
#[derive(Clone)]
pub struct ConnectInfo {
    pub peer: SocketAddr,
    pub cache: Option<crate::Cache>,
}

/// A connection carrying what its requests need to know.
pub struct GrpcConn {
    pub io: ClientIo,
    pub info: ConnectInfo,
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
