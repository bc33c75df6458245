//! The cache facade: every rule a request must follow, shared by the HTTP and
//! gRPC front ends. Front ends parse, call one of these methods, and map the
//! result to their wire format; nothing here knows about HTTP or gRPC.
//!
//! Rules enforced here and nowhere else:
//! * namespaces: the request's instance name (or the default) is resolved
//!   and, when the namespace list is restricted, checked;
//! * the empty blob always exists and is never stored;
//! * size limits (`max_blob_size`) and in-flight byte limits;
//! * CAS bytes must hash to their digest (checked by the disk writer while
//!   streaming, before the blob becomes visible);
//! * action results are validated on upload and only served while every
//!   blob they reference is present (completeness); a stale entry is
//!   removed.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use hoard_disk::{Blob, DiskCache, Hash, Kind, NamespaceId, WriteOutcome};
use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, Tree};
pub use hoard_upload::Presence;
use tokio::sync::mpsc;

use crate::budget::{Budget, Permit, Share};

use crate::error::{CacheError, ErrorKind};
use crate::metrics::Metrics;
use crate::validate::{BlobDigest, parse_digest, references, validate_action_result};

/// Told of each refused client upload: namespace name and kind.
pub type RejectionSink = Box<dyn Fn(&str, Kind) + Send + Sync>;

/// Largest zstd window (log2) an upload's frames may use: 8 MiB, well
/// above what Bazel's compressor picks (at most 2^21), far below zstd's own
/// decoding limit of 2^27, which would let a 4 KB body cost 128 MiB.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// The zstd decoder's output buffer.
const DECODE_OUT: usize = 128 * 1024;
/// Largest blob the hot set keeps.
pub const HOT_BLOB_MAX: u64 = 64 * 1024;

/// A blob's identity within the cache.
type BlobKey = (NamespaceId, Kind, Hash);

/// Which namespaces requests may use.
#[derive(Clone, Debug, Default)]
pub struct NamespacePolicy {
    /// Used when a request names no instance.
    pub default: String,
    /// When set, only these instance names (and the default) are served.
    pub allowed: Option<HashSet<String>>,
    /// An authenticated identity's namespace is its name, and it may use
    /// no other; unauthenticated reads see the default namespace only.
    pub bind_to_identity: bool,
    /// What a request's instance name selects.
    pub instance_names: InstanceNames,
}

/// What an instance name (gRPC `instance_name`, HTTP path prefix) selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InstanceNames {
    /// Its own namespace: its own AC and CAS.
    #[default]
    Isolate,
    /// bazel-remote's `enable_ac_key_instance_mangling`: one namespace for
    /// all, with each action key replaced by `hex(sha256(key || instance))`
    /// when the instance is not empty, so action results are per instance
    /// and the CAS is shared.
    MangleAc,
    /// bazel-remote's default: instance names are ignored.
    Ignore,
}

/// Limits the facade enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest blob accepted, in logical bytes.
    pub max_blob_size: u64,
    /// Largest action result accepted, in bytes.
    pub max_action_result_size: u64,
    /// Request and response body bytes held in memory at once, across all
    /// requests (see [`crate::budget`]). Requests wait (backpressure) for
    /// up to `max_inflight_wait`, then fail as busy.
    pub max_inflight_bytes: u64,
    pub max_inflight_wait: std::time::Duration,
    /// How long a client may leave a request body unsent, or a response
    /// unread, before its request fails and gives back what it holds.
    pub client_idle_timeout: std::time::Duration,
    /// bazel-remote's `disable_http_ac_validation`: HTTP `/ac/` entries
    /// are any bytes (ccache stores its own there), kept in the separate
    /// `raw` keyspace that gRPC never sees, so an unvalidated entry can
    /// never reach a Bazel that asks for an action result.
    pub raw_http_ac: bool,
    /// Memory for the hot set (content of small, recently read CAS blobs;
    /// see [`crate::hot`]); 0 turns it off.
    pub hot_set_bytes: u64,
}

/// Content-encoding of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Zstd,
}

/// A CAS read hit.
pub enum Found {
    /// The empty blob, which is never stored.
    Empty,
    Blob(Box<Blob>),
}

/// The shared cache API. Each connection works through its own handle
/// ([`Cache::for_connection`]), which carries the connection's share of the
/// in-flight budget.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
    share: Share,
    /// Who the requests made through this handle come from.
    identity: crate::auth::Identity,
    /// The common name of the connection's verified client certificate.
    certified: Option<Arc<str>>,
}

struct Inner {
    disk: DiskCache,
    policy: NamespacePolicy,
    limits: Limits,
    metrics: Arc<Metrics>,
    budget: Budget,
    auth: crate::auth::Auth,
    /// The bucket behind the disk, if configured.
    backend: std::sync::OnceLock<hoard_upload::Backend>,
    rejections: std::sync::OnceLock<RejectionSink>,
    hot: crate::hot::HotSet,
    /// Read-throughs in progress: concurrent misses of one blob fetch once.
    flights: parking_lot::Mutex<std::collections::HashMap<BlobKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Cache {
    pub fn new(
        disk: DiskCache,
        policy: NamespacePolicy,
        limits: Limits,
        auth: crate::auth::Auth,
        metrics: Arc<Metrics>,
    ) -> Cache {
        let budget = Budget::new(limits.max_inflight_bytes, limits.max_inflight_wait);
        let hot_set_bytes = limits.hot_set_bytes;
        let share = budget.share();
        Cache {
            share,
            identity: crate::auth::Identity::default(),
            certified: None,
            inner: Arc::new(Inner {
                disk,
                policy,
                limits,
                metrics,
                budget,
                auth,
                backend: std::sync::OnceLock::new(),
                rejections: std::sync::OnceLock::new(),
                hot: crate::hot::HotSet::new(hot_set_bytes, HOT_BLOB_MAX),
                flights: parking_lot::Mutex::new(std::collections::HashMap::new()),
            }),
        }
    }

    pub fn disk(&self) -> &DiskCache {
        &self.inner.disk
    }

    /// Puts the bucket behind the disk: misses read through it and
    /// existence checks consult it. Only the first call has an effect.
    pub fn set_backend(&self, backend: hoard_upload::Backend) {
        let _ = self.inner.backend.set(backend);
    }

    pub fn backend(&self) -> Option<&hoard_upload::Backend> {
        self.inner.backend.get()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Decides whether a request with `creds` may have `access` (see
    /// [`crate::auth`]): the one place both front ends ask.
    pub async fn authorize(
        &self,
        creds: Option<crate::auth::Credentials>,
        access: crate::auth::Access,
    ) -> Result<crate::auth::Identity, CacheError> {
        let r = self
            .inner
            .auth
            .check(creds, access, self.certified.as_deref())
            .await;
        if r.is_err() {
            self.inner.metrics.auth_failures.inc();
        }
        r
    }

    /// This handle, acting for `identity` (what [`Cache::authorize`]
    /// found); namespaces are resolved for it.
    pub fn with_identity(&self, identity: crate::auth::Identity) -> Cache {
        Cache {
            inner: Arc::clone(&self.inner),
            share: self.share.clone(),
            identity,
            certified: self.certified.clone(),
        }
    }

    /// This handle, for a connection whose client certificate (verified
    /// in the TLS handshake) names `common_name`.
    pub fn with_certificate(&self, common_name: Option<String>) -> Cache {
        Cache {
            certified: common_name.map(Arc::from),
            ..self.clone()
        }
    }

    /// Whether this handle's identity may see the namespace called `name`
    /// and its figures (`/status`, `/metrics`): with identities bound, only
    /// its own (the default one for unauthenticated reads).
    pub fn may_see(&self, name: &str) -> bool {
        if !self.inner.policy.bind_to_identity {
            return true;
        }
        let own = self
            .identity
            .user
            .as_deref()
            .unwrap_or(self.inner.policy.default.as_str());
        name == own
    }

    /// The namespaces this handle's identity may see, for `/status`.
    pub fn visible_namespaces(&self) -> Vec<String> {
        let mut all = self.inner.disk.namespaces();
        all.retain(|n| self.may_see(n));
        all
    }

    /// Figures of the namespaces this handle's identity may see.
    pub fn namespace_stats(&self) -> Vec<hoard_disk::NamespaceStats> {
        let mut all = self.inner.disk.namespace_stats();
        all.retain(|n| self.may_see(&n.name));
        all
    }

    /// A handle for one new connection: what its requests hold in memory
    /// is drawn from its own share of the budget.
    pub fn for_connection(&self) -> Cache {
        Cache {
            inner: Arc::clone(&self.inner),
            share: self.inner.budget.share(),
            identity: self.identity.clone(),
            certified: self.certified.clone(),
        }
    }

    /// Bytes currently held under the in-flight budget.
    pub fn inflight_bytes(&self) -> u64 {
        self.inner.budget.held()
    }

    /// The most one request may hold at once.
    pub fn inflight_share(&self) -> u64 {
        self.inner.budget.share_bytes()
    }

    /// Waits (bounded) until `n` bytes fit this connection's share and the
    /// in-flight budget. The permit releases them when dropped.
    pub async fn reserve_inflight(&self, n: usize) -> Result<Permit, CacheError> {
        self.inner.budget.acquire(n, &self.share).await
    }

    /// Waits for the client's next piece of body, at most
    /// `client_idle_timeout`.
    pub async fn from_client<F: std::future::Future>(&self, f: F) -> Result<F::Output, CacheError> {
        let t = self.inner.limits.client_idle_timeout;
        tokio::time::timeout(t, f).await.map_err(|_| {
            CacheError::new(
                ErrorKind::Timeout,
                format!("the client sent nothing for {t:?} (client_idle_timeout)"),
            )
        })
    }

    /// The namespace name a request's instance name stands for, if this
    /// server serves it.
    fn namespace_name<'a>(&'a self, instance: &'a str) -> Result<&'a str, CacheError> {
        let policy = &self.inner.policy;
        // Outside `isolate`, an instance name never selects a namespace.
        let instance = match policy.instance_names {
            InstanceNames::Isolate => instance,
            InstanceNames::MangleAc | InstanceNames::Ignore => "",
        };
        if policy.bind_to_identity {
            let own = self
                .identity
                .user
                .as_deref()
                .unwrap_or(policy.default.as_str());
            if !instance.is_empty() && instance != own {
                return Err(CacheError::new(
                    ErrorKind::PermissionDenied,
                    match &self.identity.user {
                        Some(u) => format!(
                            "namespace {:?} is not {u:?}'s: with namespaces.bind_to_identity each user uses only its own",
                            crate::grpc::codes::clip_to(instance, 100)
                        ),
                        None => format!(
                            "namespace {:?} needs credentials: unauthenticated reads see the default namespace only",
                            crate::grpc::codes::clip_to(instance, 100)
                        ),
                    },
                ));
            }
            return Ok(own);
        }
        let name = if instance.is_empty() {
            policy.default.as_str()
        } else {
            instance
        };
        if let Some(allowed) = &policy.allowed
            && name != policy.default
            && !allowed.contains(name)
        {
            return Err(CacheError::new(
                ErrorKind::UnknownNamespace,
                format!(
                    "unknown namespace {:?}: this server only serves the configured namespaces",
                    crate::grpc::codes::clip_to(name, 100)
                ),
            ));
        }
        Ok(name)
    }

    /// Resolves a request's instance name to a namespace for a write,
    /// creating the namespace on first use.
    pub fn namespace(&self, instance: &str) -> Result<NamespaceId, CacheError> {
        let name = self.namespace_name(instance)?;
        self.inner.disk.namespace(name).map_err(CacheError::from)
    }

    /// Resolves a request's instance name for a read. A namespace never
    /// written here is None (a miss) and is not created, unless the bucket
    /// holds `probe`, the blob asked for (another host wrote it): then it
    /// is created, so that the read can go through.
    pub async fn namespace_for_read(
        &self,
        instance: &str,
        probe: Option<(Kind, &Hash)>,
    ) -> Result<Option<NamespaceId>, CacheError> {
        let name = self.namespace_name(instance)?;
        if let Some(id) = self.inner.disk.find_namespace(name) {
            return Ok(Some(id));
        }
        hoard_disk::validate_namespace(name)
            .map_err(|e| CacheError::from(hoard_disk::Error::from(e)))?;
        let (Some(backend), Some((kind, hash))) = (self.backend(), probe) else {
            return Ok(None);
        };
        if backend.exists(name, kind, hash).await != Presence::Present {
            return Ok(None);
        }
        self.inner
            .disk
            .namespace(name)
            .map(Some)
            .map_err(CacheError::from)
    }

    /// The key an action result of `instance` is stored under: `hash`
    /// itself, or with `instance_names: mangle_ac` bazel-remote's mangled
    /// key, `hex(sha256(hex(hash) || instance))`, so a directory adopted
    /// from a bazel-remote with `enable_ac_key_instance_mangling` keeps
    /// its hits.
    pub fn action_key(&self, instance: &str, hash: Hash) -> Hash {
        use sha2::Digest as _;
        if self.inner.policy.instance_names != InstanceNames::MangleAc || instance.is_empty() {
            return hash;
        }
        let mut h = sha2::Sha256::new();
        h.update(hash.to_hex().as_bytes());
        h.update(instance.as_bytes());
        Hash(h.finalize().into())
    }

    /// The keyspace HTTP `/ac/` requests use: validated action results, or
    /// the raw keyspace with `disable_http_ac_validation`.
    pub fn http_ac_kind(&self) -> Kind {
        if self.inner.limits.raw_http_ac {
            Kind::Raw
        } else {
            Kind::Ac
        }
    }

    /// Opens a raw entry (unvalidated HTTP `/ac/` bytes), reading it through
    /// from the bucket on a local miss.
    pub async fn raw_get(&self, ns: NamespaceId, hash: &Hash) -> Result<Option<Blob>, CacheError> {
        let mut found = self.inner.disk.get(ns, Kind::Raw, hash)?;
        if found.is_none() && self.read_through(ns, Kind::Raw, hash).await == Presence::Present {
            found = self.inner.disk.get(ns, Kind::Raw, hash)?;
        }
        self.count("get", Kind::Raw, found.is_some());
        Ok(found)
    }

    /// Checks a declared blob size against `max_blob_size`.
    pub fn check_blob_size(&self, size: u64) -> Result<(), CacheError> {
        let max = self.inner.limits.max_blob_size;
        if size > max {
            return Err(CacheError::new(
                ErrorKind::TooLarge,
                format!("blob size {size} exceeds max_blob_size {max}"),
            ));
        }
        Ok(())
    }

    fn count(&self, method: &str, kind: Kind, hit: bool) {
        self.inner
            .metrics
            .incoming_requests
            .with_label_values(&[method, kind.as_str(), if hit { "hit" } else { "miss" }])
            .inc();
    }

    /// Counts a refused client upload, once, whichever front end it came
    /// through (`hoard_rejected_uploads_total` and accounting's
    /// `rejected`), and hands the error back. The facade's upload methods
    /// call it for every refusal they make; front ends call it only for
    /// what they refuse before reaching the facade (a bad header, a bad
    /// encoding of the body).
    pub fn refuse(&self, ns: NamespaceId, kind: Kind, err: CacheError) -> CacheError {
        self.inner
            .metrics
            .rejected_uploads
            .with_label_values(&[kind.as_str(), err.reason()])
            .inc();
        tracing::info!(%kind, error = %err.message, "upload refused");
        if let Some(sink) = self.inner.rejections.get() {
            sink(&self.inner.disk.namespace_name(ns), kind);
        }
        err
    }

    fn refused<T>(
        &self,
        ns: NamespaceId,
        kind: Kind,
        r: Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        r.map_err(|e| self.refuse(ns, kind, e))
    }

    /// Receives every refused client upload (for accounting's `rejected`).
    /// Only the first call has an effect.
    pub fn set_rejection_sink(&self, sink: RejectionSink) {
        let _ = self.inner.rejections.set(sink);
    }

    /// Opens a CAS blob, reading it through from the bucket on a local
    /// miss. Reads only the header of large local files.
    pub async fn cas_get(&self, ns: NamespaceId, hash: &Hash) -> Result<Option<Found>, CacheError> {
        if hash.is_empty_blob() {
            self.count("get", Kind::Cas, true);
            return Ok(Some(Found::Empty));
        }
        let mut found = self.inner.disk.get(ns, Kind::Cas, hash)?;
        if found.is_none() && self.read_through(ns, Kind::Cas, hash).await == Presence::Present {
            found = self.inner.disk.get(ns, Kind::Cas, hash)?;
        }
        self.count("get", Kind::Cas, found.is_some());
        Ok(found.map(|b| Found::Blob(Box::new(b))))
    }

    /// A small CAS blob's content from the hot set, if it is there and the
    /// disk index still holds the blob (which marks it used there too).
    pub fn cas_hot(&self, ns: NamespaceId, hash: &Hash) -> Option<Bytes> {
        let bytes = self.inner.hot.get(ns, hash)?;
        match self.inner.disk.contains(ns, Kind::Cas, hash) {
            Some(size) if size == bytes.len() as u64 => {
                self.count("get", Kind::Cas, true);
                Some(bytes)
            }
            _ => {
                self.inner.hot.remove(ns, hash);
                None
            }
        }
    }

    /// Reads a CAS blob small enough for the hot set whole (verified, as
    /// every disk read is) and keeps it there; larger blobs, and bytes
    /// that fail verification, are not kept.
    pub fn cas_read_small(
        &self,
        ns: NamespaceId,
        hash: &Hash,
        blob: &mut hoard_disk::Blob,
    ) -> Result<Bytes, hoard_disk::Error> {
        let bytes = Bytes::from(blob.read_to_vec()?);
        if self.inner.hot.admits(bytes.len() as u64) {
            self.inner.hot.insert(ns, *hash, bytes.clone());
        }
        Ok(bytes)
    }

    /// Whether a CAS blob of this digest is available: on local disk (with
    /// that size; the entry is marked used) or in the bucket (by hash: a
    /// HEAD cannot tell the logical size of a compressed object). A bucket
    /// that does not answer counts as "not available": the client uploads
    /// the blob again, which costs bytes, never a build.
    pub async fn cas_has(&self, ns: NamespaceId, hash: &Hash, size: u64) -> bool {
        let d = BlobDigest { hash: *hash, size };
        let found = self.present(ns, &d).await == Presence::Present;
        self.count("contains", Kind::Cas, found);
        found
    }

    /// Which of `digests` are available (locally, or in the bucket): one
    /// answer per digest, in order. Local answers come from one pass over
    /// the index; only local misses ask the bucket, a few at a time. A
    /// bucket that does not answer counts as "not available", as in
    /// [`Cache::cas_has`].
    pub async fn cas_available(&self, ns: NamespaceId, digests: &[BlobDigest]) -> Vec<bool> {
        let hashes: Vec<Hash> = digests.iter().map(|d| d.hash).collect();
        let local = self.inner.disk.contains_many(ns, Kind::Cas, &hashes);
        let mut out: Vec<bool> = digests
            .iter()
            .zip(&local)
            .map(|(d, l)| d.is_empty_blob() || *l == Some(d.size))
            .collect();
        if let Some(backend) = self.backend() {
            let name = self.inner.disk.namespace_name(ns);
            let ask: Vec<usize> = (0..digests.len())
                .filter(|&i| !out[i] && local[i].is_none())
                .collect();
            let answers: Vec<(usize, bool)> = futures_util::stream::iter(ask)
                .map(|i| {
                    let (backend, name) = (backend, &name);
                    async move {
                        let p = backend
                            .exists_or_upload(name, Kind::Cas, &digests[i].hash)
                            .await;
                        (i, p == Presence::Present)
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            for (i, present) in answers {
                out[i] = present;
            }
        }
        let hits = out.iter().filter(|p| **p).count() as u64;
        let m = &self.inner.metrics;
        m.incoming_requests
            .with_label_values(&["contains", "cas", "hit"])
            .inc_by(hits);
        m.incoming_requests
            .with_label_values(&["contains", "cas", "miss"])
            .inc_by(out.len() as u64 - hits);
        out
    }

    /// Where a referenced blob stands: on local disk with this size, else
    /// what the bucket says (`Unknown` when it does not answer).
    async fn present(&self, ns: NamespaceId, d: &BlobDigest) -> Presence {
        if d.is_empty_blob() {
            return Presence::Present;
        }
        match self.inner.disk.contains(ns, Kind::Cas, &d.hash) {
            Some(size) if size == d.size => Presence::Present,
            Some(_) => Presence::Absent,
            None => match self.backend() {
                Some(b) => {
                    b.exists(&self.inner.disk.namespace_name(ns), Kind::Cas, &d.hash)
                        .await
                }
                None => Presence::Absent,
            },
        }
    }

    /// Fetches a blob missing locally from the bucket, verifies it while
    /// storing it, and says whether it is now local (`Present`), the bucket
    /// has none (`Absent`), or that could not be learned (`Unknown`: a slow
    /// or dead bucket, or an object that failed verification, which is
    /// counted and never stored). Concurrent misses of one blob fetch once.
    pub async fn read_through(&self, ns: NamespaceId, kind: Kind, hash: &Hash) -> Presence {
        let Some(backend) = self.backend().cloned() else {
            return Presence::Absent;
        };
        let flight = Arc::clone(
            self.inner
                .flights
                .lock()
                .entry((ns, kind, *hash))
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))),
        );
        let guard = flight.lock().await;
        let done = if self.inner.disk.contains(ns, kind, hash).is_some() {
            Presence::Present // fetched by the flight we waited for
        } else {
            let name = self.inner.disk.namespace_name(ns);
            match self.fetch_and_store(&backend, ns, &name, kind, hash).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%kind, %hash, error = %e.message, "object from the bucket refused");
                    backend.verification_failed(&name, kind, hash);
                    Presence::Unknown
                }
            }
        };
        drop(guard);
        let mut flights = self.inner.flights.lock();
        if Arc::strong_count(&flight) <= 2 {
            flights.remove(&(ns, kind, *hash));
        }
        done
    }

    async fn fetch_and_store(
        &self,
        backend: &hoard_upload::Backend,
        ns: NamespaceId,
        name: &str,
        kind: Kind,
        hash: &Hash,
    ) -> Result<Presence, CacheError> {
        let fetched = match backend.fetch(name, kind, hash).await {
            hoard_upload::Fetch::Found(f) => f,
            hoard_upload::Fetch::Absent => return Ok(Presence::Absent),
            hoard_upload::Fetch::Unknown => return Ok(Presence::Unknown),
        };
        let timeout = backend.read_timeout();
        let mut body = fetched.body;
        // A casblob names its logical size in its header; a raw object is
        // its own size.
        let mut head = bytes::BytesMut::new();
        let (size, encoding) = match fetched.format {
            hoard_upload::ObjectFormat::Casblob => {
                while head.len() < hoard_disk::casblob::Header::FIXED_LEN {
                    match next_chunk(&mut body, timeout).await? {
                        Some(c) => head.extend_from_slice(&c),
                        None => {
                            return Err(CacheError::invalid(
                                "object shorter than a casblob header",
                            ));
                        }
                    }
                }
                let logical = hoard_disk::casblob::logical_size_of(&head)
                    .ok_or_else(|| CacheError::invalid("object is not a casblob"))?;
                (logical, Encoding::Zstd)
            }
            hoard_upload::ObjectFormat::Raw => (fetched.stored_len, Encoding::Identity),
        };
        if kind == Kind::Ac {
            // Action results are stored in the bucket as they are (raw).
            if encoding != Encoding::Identity {
                return Err(CacheError::invalid("action result object is a casblob"));
            }
            return self
                .store_fetched_action_result(ns, *hash, size, body, timeout)
                .await;
        }
        let mut upload = self
            .open_upload(ns, kind, *hash, size, encoding, false)
            .await?;
        upload.set_from_backend();
        let first = head.freeze();
        let rest = futures_util::stream::unfold(body, move |mut body| async move {
            match next_chunk(&mut body, timeout).await {
                Ok(Some(c)) => Some((Ok(c), body)),
                Ok(None) => None,
                Err(e) => Some((Err(e), body)),
            }
        });
        let stream = futures_util::stream::iter([Ok(first)]).chain(rest);
        self.put_upload(upload, Box::pin(stream)).await?;
        Ok(Presence::Present)
    }

    /// An action result from the bucket is checked like one a client sent
    /// (size limit, decodable, valid) before it is stored: another host,
    /// or whoever can write to the bucket, is no more trusted than a
    /// client. The object is at most `max_action_result_size`, so it is
    /// read whole.
    async fn store_fetched_action_result(
        &self,
        ns: NamespaceId,
        hash: Hash,
        size: u64,
        mut body: hoard_upload::ByteStream,
        timeout: std::time::Duration,
    ) -> Result<Presence, CacheError> {
        self.check_action_result_size(size)?;
        let _permit = self.reserve_inflight(size as usize).await?;
        let mut buf = bytes::BytesMut::with_capacity(size as usize);
        while let Some(c) = next_chunk(&mut body, timeout).await? {
            if (buf.len() + c.len()) as u64 > size {
                return Err(CacheError::invalid(format!(
                    "action result object is longer than its listed {size} bytes"
                )));
            }
            buf.extend_from_slice(&c);
        }
        let bytes = buf.freeze();
        if bytes.len() as u64 != size {
            return Err(CacheError::invalid(format!(
                "action result object holds {} bytes, not {size}",
                bytes.len()
            )));
        }
        let ar = ActionResult::decode(bytes.as_ref())
            .map_err(|e| CacheError::invalid(format!("invalid ActionResult: {e}")))?;
        self.check_action_result(&ar, size)?;
        self.store_whole(ns, Kind::Ac, hash, bytes, true).await?;
        Ok(Presence::Present)
    }

    /// [`Cache::is_complete`], waiting on the bucket at most one
    /// `read_timeout` in all: a bucket that answers each question just in
    /// time must not cost a timeout per referenced blob. Past it the answer
    /// is `Unknown`.
    async fn is_complete_within(
        &self,
        ns: NamespaceId,
        ar: &ActionResult,
    ) -> Result<Presence, CacheError> {
        let Some(limit) = self.backend().map(|b| b.read_timeout()) else {
            return self.is_complete(ns, ar).await;
        };
        match tokio::time::timeout(limit, self.is_complete(ns, ar)).await {
            Ok(r) => r,
            Err(_) => Ok(Presence::Unknown),
        }
    }

    /// Whether every blob `ar` references is present (locally or in the
    /// bucket): output files, stdout, stderr, each output directory's tree
    /// and every file in it. `Absent` when one is known to be missing;
    /// `Unknown` when the bucket could not say (the check stops there, so a
    /// dead bucket costs one timeout, not one per blob).
    pub async fn is_complete(
        &self,
        ns: NamespaceId,
        ar: &ActionResult,
    ) -> Result<Presence, CacheError> {
        let refs = match references(ar) {
            Ok(r) => r,
            Err(_) => return Ok(Presence::Absent),
        };
        for d in &refs.files {
            match self.present(ns, d).await {
                Presence::Present => {}
                other => return Ok(other),
            }
        }
        for t in &refs.trees {
            if t.is_empty_blob() {
                continue;
            }
            let mut blob = self.inner.disk.get(ns, Kind::Cas, &t.hash)?;
            if blob.is_none() {
                match self.read_through(ns, Kind::Cas, &t.hash).await {
                    Presence::Present => blob = self.inner.disk.get(ns, Kind::Cas, &t.hash)?,
                    other => return Ok(other),
                }
            }
            let Some(mut blob) = blob else {
                return Ok(Presence::Absent);
            };
            if blob.logical_size() != t.size {
                return Ok(Presence::Absent);
            }
            let bytes = match blob.read_to_vec() {
                Ok(b) => b,
                Err(hoard_disk::Error::Corrupt { .. }) => return Ok(Presence::Absent),
                Err(e) => return Err(e.into()),
            };
            let Ok(tree) = Tree::decode(bytes.as_slice()) else {
                return Ok(Presence::Absent);
            };
            for dir in tree.root.iter().chain(&tree.children) {
                for f in &dir.files {
                    let Some(d) = f.digest.as_ref().and_then(|d| parse_digest(d).ok()) else {
                        return Ok(Presence::Absent);
                    };
                    match self.present(ns, &d).await {
                        Presence::Present => {}
                        other => return Ok(other),
                    }
                }
            }
        }
        Ok(Presence::Present)
    }

    /// Looks up an action result and returns it (stored bytes and parsed
    /// form) only if it is complete. An entry known to be incomplete or
    /// unreadable is removed and answers a miss; one whose completeness is
    /// unknown (the bucket does not answer) answers a miss and stays. While
    /// the index loads nothing is removed.
    pub async fn ac_get(
        &self,
        ns: NamespaceId,
        hash: &Hash,
    ) -> Result<Option<(Vec<u8>, ActionResult)>, CacheError> {
        let mut blob = self.inner.disk.get(ns, Kind::Ac, hash)?;
        if blob.is_none() && self.read_through(ns, Kind::Ac, hash).await == Presence::Present {
            blob = self.inner.disk.get(ns, Kind::Ac, hash)?;
        }
        let Some(mut blob) = blob else {
            self.count("get", Kind::Ac, false);
            return Ok(None);
        };
        // The entry and its parsed form are body memory while checked.
        let _permit = self.reserve_inflight(blob.logical_size() as usize).await?;
        let bytes = match blob.read_to_vec() {
            Ok(b) => b,
            Err(hoard_disk::Error::Corrupt { .. }) => {
                self.count("get", Kind::Ac, false);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let completeness = match ActionResult::decode(bytes.as_slice()) {
            Ok(ar) => match self.is_complete_within(ns, &ar).await? {
                Presence::Present => {
                    self.count("get", Kind::Ac, true);
                    return Ok(Some((bytes, ar)));
                }
                other => other,
            },
            Err(_) => Presence::Absent,
        };
        self.count("get", Kind::Ac, false);
        self.inner.metrics.ac_completeness_misses.inc();
        if completeness == Presence::Unknown {
            tracing::info!(action = %hash, "action result not served: the bucket did not say whether its outputs exist; kept");
        } else if !self.inner.disk.is_loaded() {
            tracing::info!(action = %hash, "action result references missing blobs; kept until the index is loaded");
        } else {
            tracing::info!(action = %hash, "action result references missing blobs; removed");
            self.inner.disk.remove(ns, Kind::Ac, hash);
        }
        Ok(None)
    }

    /// Checks an action result a client (or the bucket) offers: no larger
    /// than `max_action_result_size` when encoded, and valid
    /// ([`validate_action_result`]).
    fn check_action_result(&self, ar: &ActionResult, encoded_len: u64) -> Result<(), CacheError> {
        self.check_action_result_size(encoded_len)?;
        validate_action_result(ar)
    }

    /// Checks an action result's size against `max_action_result_size`
    /// (before its bytes are read, where the size is declared).
    fn check_action_result_size(&self, size: u64) -> Result<(), CacheError> {
        let limit = self.inner.limits.max_action_result_size;
        if size > limit {
            return Err(CacheError::new(
                ErrorKind::TooLarge,
                format!("action result of {size} bytes exceeds the limit of {limit}"),
            ));
        }
        Ok(())
    }

    /// Stores bytes already whole in memory, uncounted (see
    /// [`Cache::open_upload`]): inlined contents, a checked action result,
    /// an object from the bucket (`from_backend`: not uploaded back).
    async fn store_whole(
        &self,
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        bytes: Bytes,
        from_backend: bool,
    ) -> Result<WriteOutcome, CacheError> {
        let size = bytes.len() as u64;
        let mut upload = self
            .open_upload(ns, kind, hash, size, Encoding::Identity, false)
            .await?;
        if from_backend {
            upload.set_from_backend();
        }
        self.put_upload(upload, futures_util::stream::iter([Ok(bytes)]))
            .await
    }

    /// Receives an action result's body as a client sends it (HTTP), of
    /// `size` bytes once decoded: refused before anything is read if `size`
    /// or the declared `content_length` is over what an action result may
    /// be, read no further than that bound (a declared size of 1 never
    /// buffers more), and decoded from zstd if so encoded. Refusals are
    /// counted.
    pub async fn receive_action_result<S>(
        &self,
        ns: NamespaceId,
        size: u64,
        encoding: Encoding,
        content_length: Option<u64>,
        body: S,
    ) -> Result<Bytes, CacheError>
    where
        S: Stream<Item = Result<Bytes, CacheError>> + Unpin,
    {
        let r = self
            .collect_action_result(size, encoding, content_length, body)
            .await;
        self.refused(ns, Kind::Ac, r)
    }

    async fn collect_action_result<S>(
        &self,
        size: u64,
        encoding: Encoding,
        content_length: Option<u64>,
        mut body: S,
    ) -> Result<Bytes, CacheError>
    where
        S: Stream<Item = Result<Bytes, CacheError>> + Unpin,
    {
        self.check_action_result_size(size)?;
        let wire_limit = match encoding {
            Encoding::Identity => size,
            Encoding::Zstd => crate::http::zstd_bound(size),
        };
        if let Some(c) = content_length
            && c > wire_limit
        {
            return Err(CacheError::invalid(format!(
                "Content-Length {c} is larger than an action result of {size} bytes can be"
            )));
        }
        let decoded = if encoding == Encoding::Zstd { size } else { 0 };
        let _permit = self
            .reserve_inflight((wire_limit + decoded) as usize)
            .await?;
        let mut buf = bytes::BytesMut::with_capacity(wire_limit.min(1 << 20) as usize);
        while let Some(chunk) = self.from_client(body.next()).await? {
            let chunk = chunk?;
            if (buf.len() + chunk.len()) as u64 > wire_limit {
                return Err(CacheError::invalid(format!(
                    "action result body is larger than the declared {size} bytes"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        let mut bytes = buf.freeze();
        if encoding == Encoding::Zstd {
            bytes = zstd::bulk::decompress(&bytes, size as usize)
                .map_err(|e| CacheError::invalid(format!("corrupt zstd body: {e}")))?
                .into();
        }
        if bytes.len() as u64 != size {
            return Err(CacheError::invalid(format!(
                "size mismatch: expected {size} bytes, received {}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Validates and stores an action result given in binary form. The
    /// bytes are stored as received, so fields this server does not know
    /// survive the round trip. Refusals are counted.
    pub async fn ac_put(
        &self,
        ns: NamespaceId,
        hash: Hash,
        bytes: Bytes,
    ) -> Result<(), CacheError> {
        let checked = ActionResult::decode(bytes.as_ref())
            .map_err(|e| CacheError::invalid(format!("invalid ActionResult: {e}")))
            .and_then(|ar| self.check_action_result(&ar, bytes.len() as u64));
        self.refused(ns, Kind::Ac, checked)?;
        let size = bytes.len() as u64;
        let body = futures_util::stream::iter([Ok(bytes)]);
        self.put(ns, Kind::Ac, hash, size, Encoding::Identity, body)
            .await
            .map(|_| ())
    }

    /// Stores an action result given as a message (gRPC's
    /// UpdateActionResult): inlined contents (output files, stdout,
    /// stderr) are checked against the digests they come with and moved
    /// into the CAS, then the result is checked once and stored. Returns
    /// what was stored. Refusals are counted once, as the action result's.
    pub async fn update_action_result(
        &self,
        ns: NamespaceId,
        hash: Hash,
        ar: ActionResult,
    ) -> Result<ActionResult, CacheError> {
        let r = self.store_action_result(ns, hash, ar).await;
        self.refused(ns, Kind::Ac, r)
    }

    async fn store_action_result(
        &self,
        ns: NamespaceId,
        hash: Hash,
        mut ar: ActionResult,
    ) -> Result<ActionResult, CacheError> {
        for f in ar.output_files.iter_mut() {
            if !f.contents.is_empty() {
                let data = std::mem::take(&mut f.contents);
                let what = format!("output file {:?}", f.path);
                f.digest = Some(
                    self.store_inlined(ns, &what, f.digest.as_ref(), data)
                        .await?,
                );
            }
        }
        if !ar.stdout_raw.is_empty() {
            let data = std::mem::take(&mut ar.stdout_raw);
            ar.stdout_digest = Some(
                self.store_inlined(ns, "stdout", ar.stdout_digest.as_ref(), data)
                    .await?,
            );
        }
        if !ar.stderr_raw.is_empty() {
            let data = std::mem::take(&mut ar.stderr_raw);
            ar.stderr_digest = Some(
                self.store_inlined(ns, "stderr", ar.stderr_digest.as_ref(), data)
                    .await?,
            );
        }
        let bytes = Bytes::from(ar.encode_to_vec());
        self.check_action_result(&ar, bytes.len() as u64)?;
        self.store_whole(ns, Kind::Ac, hash, bytes, false).await?;
        Ok(ar)
    }

    /// Stores inlined bytes in the CAS and returns the digest naming them.
    /// A digest sent with them must be theirs.
    async fn store_inlined(
        &self,
        ns: NamespaceId,
        what: &str,
        digest: Option<&hoard_proto::reapi::Digest>,
        data: Bytes,
    ) -> Result<hoard_proto::reapi::Digest, CacheError> {
        use sha2::Digest as _;
        let actual = Hash(sha2::Sha256::digest(&data).into());
        let size = data.len() as u64;
        if let Some(d) = digest {
            let d = parse_digest(d)
                .map_err(|e| CacheError::invalid(format!("{what}: {}", e.message)))?;
            if d.hash != actual || d.size != size {
                return Err(CacheError::invalid(format!(
                    "{what}: inlined contents hash to {actual}/{size}, not {}/{}",
                    d.hash, d.size
                )));
            }
        }
        self.store_whole(ns, Kind::Cas, actual, data, false).await?;
        Ok(hoard_proto::reapi::Digest {
            hash: actual.to_hex(),
            size_bytes: size as i64,
        })
    }

    /// Starts a client's upload of `size` logical bytes. Writing and
    /// finishing are blocking (hashing, compressing, disk I/O): call them
    /// from the blocking pool, or use [`Cache::pump`] and
    /// [`Cache::commit`]. Dropping an unfinished upload stores nothing.
    /// Refusals, here and in `pump` and `commit`, are counted.
    pub async fn begin_upload(
        &self,
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        size: u64,
        encoding: Encoding,
    ) -> Result<Upload, CacheError> {
        let r = self.open_upload(ns, kind, hash, size, encoding, true).await;
        self.refused(ns, kind, r)
    }

    /// Starts an upload; `counted`: its refusals count as a client's
    /// rejected upload (not for read-throughs, nor for parts of a larger
    /// upload that is counted as a whole).
    async fn open_upload(
        &self,
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        size: u64,
        encoding: Encoding,
        counted: bool,
    ) -> Result<Upload, CacheError> {
        self.check_blob_size(size)?;
        let writer = if kind == Kind::Cas && size == 0 {
            if !hash.is_empty_blob() {
                return Err(CacheError::invalid(format!(
                    "invalid empty blob hash {hash}: a blob of size 0 has hash {}",
                    hoard_disk::EMPTY_SHA256
                )));
            }
            None
        } else {
            Some(self.inner.disk.writer(ns, kind, hash, size)?)
        };
        let (decoder, window) = match encoding {
            Encoding::Identity => (None, None),
            Encoding::Zstd => {
                // The decoder's window is body memory like any other: a
                // frame may ask for at most 2^ZSTD_WINDOW_LOG_MAX, and never
                // needs more than the blob itself.
                let window = (1u64 << ZSTD_WINDOW_LOG_MAX).min(size) as usize + DECODE_OUT;
                let permit = self.reserve_inflight(window).await?;
                let mut d = zstd::stream::raw::Decoder::new()
                    .map_err(|e| CacheError::internal(format!("zstd decoder: {e}")))?;
                d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))
                .map_err(|e| CacheError::internal(format!("zstd decoder: {e}")))?;
                (Some(d), Some(permit))
            }
        };
        Ok(Upload {
            writer,
            decoder,
            _window: window,
            ns,
            kind,
            counted,
            size,
            out: Vec::new(),
            wire_received: 0,
            frame_open: false,
        })
    }

    /// A client's blob, streamed into the cache. The bytes are hashed (CAS)
    /// and written on the blocking pool while the body still arrives;
    /// memory use is bounded by the in-flight budget. Nothing becomes
    /// visible unless the whole body arrived and matched. Dropping the
    /// future (client gone) aborts the write and removes its temp file.
    /// Refusals are counted.
    pub async fn put<S>(
        &self,
        ns: NamespaceId,
        kind: Kind,
        hash: Hash,
        size: u64,
        encoding: Encoding,
        body: S,
    ) -> Result<WriteOutcome, CacheError>
    where
        S: Stream<Item = Result<Bytes, CacheError>> + Unpin,
    {
        let upload = self.begin_upload(ns, kind, hash, size, encoding).await?;
        self.put_upload(upload, body).await
    }

    /// Streams `body` into `upload` and commits it (see [`Cache::put`]).
    pub async fn put_upload<S>(&self, upload: Upload, body: S) -> Result<WriteOutcome, CacheError>
    where
        S: Stream<Item = Result<Bytes, CacheError>> + Unpin,
    {
        let (upload, r) = self.pump(upload, body).await?;
        r?;
        self.commit(upload).await
    }

    /// Verifies and commits a fully received upload, on the blocking pool.
    pub async fn commit(&self, upload: Upload) -> Result<WriteOutcome, CacheError> {
        let (ns, kind, counted) = (upload.ns, upload.kind, upload.counted);
        let r = tokio::task::spawn_blocking(move || {
            let _bulk = hoard_disk::bulk_work(upload.size);
            upload.finish()
        })
        .await
        .map_err(|e| CacheError::internal(format!("write task failed: {e}")))
        .and_then(|r| r);
        if counted {
            self.refused(ns, kind, r)
        } else {
            r
        }
    }

    /// Feeds `body` to `upload` on the blocking pool while it arrives, and
    /// hands the upload back (for a commit, or for a resumable write to
    /// continue later) with the first error met, if any. The outer error
    /// means the writer itself failed and the upload is lost. Either error
    /// is counted as a refusal.
    ///
    /// Each chunk holds its bytes under the budget only until the writer
    /// has taken it: while hoard waits for the client's next chunk it
    /// holds nothing, so a client that stops sending costs no memory, and
    /// it loses the request after `client_idle_timeout`.
    pub async fn pump<S>(
        &self,
        upload: Upload,
        body: S,
    ) -> Result<(Upload, Result<(), CacheError>), CacheError>
    where
        S: Stream<Item = Result<Bytes, CacheError>> + Unpin,
    {
        let (ns, kind, counted) = (upload.ns, upload.kind, upload.counted);
        match self.pump_inner(upload, body).await {
            Ok((upload, Err(e))) if counted => Ok((upload, Err(self.refuse(ns, kind, e)))),
            Err(e) if counted => Err(self.refuse(ns, kind, e)),
            other => other,
        }
    }

    async fn pump_inner<S>(
        &self,
        upload: Upload,
        mut body: S,
    ) -> Result<(Upload, Result<(), CacheError>), CacheError>
    where
        S: Stream<Item = Result<Bytes, CacheError>> + Unpin,
    {
        let (tx, mut rx) = mpsc::channel::<(Vec<Bytes>, Permit)>(4);
        let size = upload.size;
        let task = tokio::task::spawn_blocking(move || {
            let _bulk = hoard_disk::bulk_work(size);
            let mut upload = upload;
            while let Some((batch, _permit)) = rx.blocking_recv() {
                for b in &batch {
                    if let Err(e) = upload.write(b) {
                        return (upload, Err(e));
                    }
                }
            }
            (upload, Ok(()))
        });
        let mut first_err = None;
        let mut pacer = crate::pace::Pacer::default();
        let mut ended = false;
        while !ended && first_err.is_none() {
            let first = match self.from_client(body.next()).await {
                Ok(Some(Ok(b))) => b,
                Ok(Some(Err(e))) | Err(e) => {
                    first_err = Some(e);
                    break;
                }
                Ok(None) => break,
            };
            // What the client has already sent goes with it, up to a
            // slice: one budget reservation, one hand-off and one wake of
            // the writer per slice instead of per message (Bazel writes
            // ByteStream data in 16 KiB messages, which cost twice the
            // hashing and compressing in per-message overhead).
            let mut n = first.len();
            let mut batch = vec![first];
            while n < crate::pace::SLICE {
                match body.next().now_or_never() {
                    Some(Some(Ok(b))) => {
                        n += b.len();
                        batch.push(b);
                    }
                    Some(Some(Err(e))) => {
                        first_err = Some(e);
                        break;
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            if n == 0 {
                continue;
            }
            let permit = match self.reserve_inflight(n).await {
                Ok(p) => p,
                Err(e) => {
                    first_err.get_or_insert(e);
                    break;
                }
            };
            if tx.send((batch, permit)).await.is_err() {
                break; // the writer already failed; its error wins
            }
            pacer.moved(n).await;
        }
        drop(tx);
        let (upload, r) = task
            .await
            .map_err(|e| CacheError::internal(format!("write task failed: {e}")))?;
        let r = match (r, first_err) {
            (Err(e), _) | (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        };
        Ok((upload, r))
    }
}

/// The next chunk of an object from the bucket, waiting at most `timeout`.
async fn next_chunk(
    body: &mut hoard_upload::ByteStream,
    timeout: std::time::Duration,
) -> Result<Option<Bytes>, CacheError> {
    match tokio::time::timeout(timeout, body.try_next()).await {
        Ok(Ok(chunk)) => Ok(chunk),
        Ok(Err(e)) => Err(CacheError::internal(format!(
            "reading from the bucket: {e}"
        ))),
        Err(_) => Err(CacheError::internal("reading from the bucket timed out")),
    }
}

/// An upload in progress: bytes as they come off the wire (zstd-decoded if
/// needed) go to the disk writer, which hashes and stores them.
pub struct Upload {
    /// None for the empty blob, which is never stored.
    writer: Option<hoard_disk::Writer>,
    decoder: Option<zstd::stream::raw::Decoder<'static>>,
    /// The decoder's window and output buffer, under the budget.
    _window: Option<Permit>,
    ns: NamespaceId,
    kind: Kind,
    /// Refusals count as a client's rejected upload.
    counted: bool,
    size: u64,
    out: Vec<u8>,
    wire_received: u64,
    /// A zstd frame has started and not yet ended.
    frame_open: bool,
}

impl Upload {
    /// Bytes received from the client so far (compressed bytes for a zstd
    /// upload).
    pub fn wire_received(&self) -> u64 {
        self.wire_received
    }

    /// Logical size of the blob.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Marks the bytes as coming from the bucket (no upload back to it).
    pub fn set_from_backend(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            w.set_from_backend();
        }
    }

    /// Takes more bytes. Blocking.
    pub fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        self.wire_received += data.len() as u64;
        let Some(mut dec) = self.decoder.take() else {
            return self.store(data);
        };
        let mut input = InBuffer::around(data);
        let mut out = std::mem::take(&mut self.out);
        out.resize(DECODE_OUT, 0);
        let res = loop {
            let mut output = OutBuffer::around(&mut out[..]);
            let hint = match dec.run(&mut input, &mut output) {
                Ok(h) => h,
                Err(e) => break Err(CacheError::invalid(format!("corrupt zstd body: {e}"))),
            };
            let produced = output.pos();
            self.frame_open = hint != 0;
            if produced > 0
                && let Err(e) = self.store(&out[..produced])
            {
                break Err(e);
            }
            if input.pos() == data.len() && produced < out.len() {
                break Ok(());
            }
        };
        self.out = out;
        self.decoder = Some(dec);
        res
    }

    fn store(&mut self, data: &[u8]) -> Result<(), CacheError> {
        match self.writer.as_mut() {
            Some(w) => w.write(data).map_err(CacheError::from),
            None if data.is_empty() => Ok(()),
            None => Err(CacheError::invalid(format!(
                "size mismatch: expected 0 bytes, received {}",
                data.len()
            ))),
        }
    }

    /// Verifies and commits. Blocking.
    pub fn finish(self) -> Result<WriteOutcome, CacheError> {
        if self.frame_open {
            return Err(CacheError::invalid(
                "corrupt zstd body: the stream ends inside a frame",
            ));
        }
        match self.writer {
            Some(w) => w.commit().map_err(CacheError::from),
            None => Ok(WriteOutcome {
                created: false,
                size_on_disk: 0,
            }),
        }
    }
}
