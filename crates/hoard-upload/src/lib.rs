//! hoard-upload: the shared S3 tier behind the local disk.
//!
//! What it owns: the bucket. Every blob committed locally by a client is
//! uploaded in the background with a create-if-absent PUT and ends in
//! exactly one [`Status`] (created, already_exists, error, dropped), which
//! is counted and published as an [`Outcome`]. It also answers "is this blob
//! in the bucket?" (with a positive-existence cache) and fetches objects for
//! read-through. What it must not do: decide what a client sees. Verifying
//! fetched bytes and storing them locally is the cache facade's job
//! (`hoard-server`), which streams them through the same digest-checking
//! writer as a client upload.
//!
//! # Invariants
//!
//! * Jobs enqueued = outcomes published: every job taken by
//!   [`Backend::enqueue`] ends in exactly one outcome, in this process or,
//!   after a restart, the next (the journal). The outcome is in the journal
//!   before the sink hears of it, in the same record that ends the job.
//! * A job that may have created its object (an answer lost, then the
//!   bucket away) is never ended as `error`: it waits and tries again, so a
//!   created object is always counted `created` once.
//! * The local cache converges to a subset of the bucket: what no upload
//!   got there is queued again by its next PUT, by the output it waited
//!   for, or by the backfill; each attempt is its own job.
//! * A queued job holds no open file: it names the blob, and the worker
//!   opens it when it starts.
//! * An action result is uploaded only after every CAS blob it references
//!   is known to be in the bucket; otherwise it ends as `error`,
//!   `hoard_upload_ac_skipped_total` counts it, and it is queued again once
//!   the missing blob is up; so another host can never read an action
//!   result whose outputs are absent from the bucket.
//! * `created` means this job's request created the object. A job that may
//!   have created it in an earlier attempt (a timeout, or a process that
//!   died) checks the writer tag it put in the object's metadata before
//!   calling a refused create `already_exists`.

mod config;
mod existence;
mod journal;
#[doc(hidden)]
pub use journal::check_replay as fuzz_journal;
mod keys;
mod metrics;
mod s3;

pub use aws_sdk_s3::primitives::ByteStream;
pub use config::{CredentialSource, S3Config, UploadConfig};
pub use keys::{ObjectFormat, object_key};
pub use s3::PutResult;

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hoard_disk::{Committed, DiskCache, Hash, Kind};
use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, Digest, Tree};
use tokio::sync::watch;

use existence::ExistenceCache;
use journal::{JobKey, Journal};
use metrics::Metrics;
use s3::{Source, Store};

/// The terminal outcome of an upload job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Created,
    AlreadyExists,
    Error,
    Dropped,
    /// Not an upload outcome: a client upload hoard refused, counted in
    /// the same ledger (with no job and no bytes stored).
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::AlreadyExists => "already_exists",
            Status::Error => "error",
            Status::Dropped => "dropped",
            Status::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        [
            Status::Created,
            Status::AlreadyExists,
            Status::Error,
            Status::Dropped,
            Status::Rejected,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One job's terminal outcome (or a refused upload), for accounting. It is
/// in the journal before anyone is told of it; `(epoch, seq)` names it for
/// good (see `journal.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub epoch: u64,
    pub seq: u64,
    pub namespace: String,
    pub kind: Kind,
    /// The blob; `None` for a refused upload replayed from the journal.
    pub hash: Option<Hash>,
    pub status: Status,
    /// The object's size as the PUT sends it (the stored file's length):
    /// the unit of billing.
    pub bytes: u64,
    pub at: SystemTime,
}

/// Receives every terminal outcome as it happens, in sequence order, and at
/// start every outcome the journal still holds (accounting skips those it
/// already spooled).
pub type OutcomeSink = Box<dyn Fn(&Outcome) + Send + Sync>;

/// What the bucket said about an object. Only `Absent` is an answer one may
/// act on by deleting or skipping something: `Unknown` (a timeout, an error)
/// says nothing about the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Present,
    Absent,
    Unknown,
}

/// The result of [`Backend::fetch`].
pub enum Fetch {
    Found(Fetched),
    /// The bucket answered that it has no such object.
    Absent,
    /// The bucket did not answer in time, or failed.
    Unknown,
}

/// What the startup probe learned about the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    /// A second create-if-absent PUT of one key was refused.
    pub honors_if_none_match: bool,
    /// Of two simultaneous creates of a new key, exactly one won.
    pub atomic_create: bool,
    /// HTTP status of the refused second PUT (412, or 304 on older MinIO).
    pub refusal_status: Option<u16>,
}

/// Most missing blobs that skipped action results wait for at once.
const MAX_WAITING_AC: usize = 100_000;

/// How long the backfill waits before trying a blob again whose attempt
/// failed.
const BACKFILL_RETRY: Duration = Duration::from_secs(10);

const MODE_UNKNOWN: u8 = 0;
const MODE_CONDITIONAL: u8 = 1;
const MODE_HEAD_FIRST: u8 = 2;

struct Job {
    key: JobKey,
    /// The object's bytes; 0 until measured for a job queued without them
    /// (a re-PUT or the backfill), which the worker sets from the file.
    bytes: AtomicU64,
    nonce: u64,
    /// Re-queued from the journal: an earlier process may have sent it.
    replayed: bool,
}

/// The S3 tier. Cheap to clone.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: UploadConfig,
    prefix: String,
    store: Store,
    metrics: Metrics,
    disk: DiskCache,
    tx: crossbeam_channel::Sender<Job>,
    rx: crossbeam_channel::Receiver<Job>,
    queued_at: parking_lot::Mutex<VecDeque<Instant>>,
    journal: Journal,
    existence: ExistenceCache,
    pending_cas: parking_lot::Mutex<HashMap<JobKey, watch::Sender<Option<Status>>>>,
    /// Every key with a job queued or running: a re-PUT or the backfill
    /// never queues a second one.
    queued: parking_lot::Mutex<std::collections::HashSet<JobKey>>,
    /// Action results skipped because this (namespace, CAS blob) was not in
    /// the bucket; queued again once it is.
    waiting_ac: parking_lot::Mutex<HashMap<(String, Hash), Vec<JobKey>>>,
    mode: AtomicU8,
    probe: parking_lot::Mutex<Option<ProbeReport>>,
    outcomes: Option<OutcomeSink>,
    runtime: tokio::runtime::Handle,
    stop_after: parking_lot::Mutex<Option<Instant>>,
    stopping: AtomicBool,
    /// Cancelled when the drain deadline passes: jobs still running are
    /// abandoned (no outcome; they stay in the journal for the next start).
    cancel: tokio_util::sync::CancellationToken,
    workers: parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>,
    random: std::hash::RandomState,
}

/// Errors starting the backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upload journal {path}: {source}")]
    Journal {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting upload workers: {0}")]
    Spawn(std::io::Error),
}

impl Backend {
    /// Opens the journal, re-queues what it holds, starts the workers and
    /// the probe (workers wait for the probe before their first upload).
    /// Must be called inside a tokio runtime.
    pub async fn start(
        cfg: UploadConfig,
        s3: S3Config,
        disk: DiskCache,
        registry: &prometheus::Registry,
        outcomes: Option<OutcomeSink>,
    ) -> Result<Backend, Error> {
        let metrics = Metrics::register(registry)?;
        let (journal, pending, recorded) = Journal::open(&cfg.journal_path, outcomes.is_some())
            .map_err(|source| Error::Journal {
                path: cfg.journal_path.clone(),
                source,
            })?;
        let capacity = cfg.max_queued_uploads.max(pending.len()).max(1);
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let store = Store::new(&s3, Duration::from_secs(60)).await;
        let inner = Arc::new(Inner {
            prefix: s3.prefix.clone(),
            existence: ExistenceCache::with_absence(
                cfg.existence_ttl,
                cfg.existence_capacity,
                cfg.absence_ttl,
            ),
            cfg,
            store,
            metrics,
            disk,
            tx,
            rx,
            queued_at: parking_lot::Mutex::new(VecDeque::new()),
            journal,
            pending_cas: parking_lot::Mutex::new(HashMap::new()),
            queued: parking_lot::Mutex::new(std::collections::HashSet::new()),
            waiting_ac: parking_lot::Mutex::new(HashMap::new()),
            mode: AtomicU8::new(MODE_UNKNOWN),
            probe: parking_lot::Mutex::new(None),
            outcomes,
            runtime: tokio::runtime::Handle::current(),
            stop_after: parking_lot::Mutex::new(None),
            stopping: AtomicBool::new(false),
            cancel: tokio_util::sync::CancellationToken::new(),
            workers: parking_lot::Mutex::new(Vec::new()),
            random: std::hash::RandomState::new(),
        });
        let b = Backend { inner };
        // Outcomes the journal still holds go to accounting again; it keeps
        // those it had not spooled before the last stop or crash.
        if let Some(sink) = &b.inner.outcomes {
            let epoch = b.inner.journal.epoch();
            for r in recorded {
                let Some(status) = Status::parse(&r.status) else {
                    continue;
                };
                sink(&Outcome {
                    epoch,
                    seq: r.seq,
                    namespace: r.namespace,
                    kind: r.kind,
                    hash: None,
                    status,
                    bytes: r.bytes,
                    at: UNIX_EPOCH + Duration::from_secs(r.at),
                });
            }
        }
        if !pending.is_empty() {
            tracing::info!(jobs = pending.len(), "re-queuing uploads from the journal");
        }
        for (key, bytes, nonce) in pending {
            b.push(Job {
                key,
                bytes: AtomicU64::new(bytes),
                nonce,
                replayed: true,
            });
        }
        let prober = b.clone();
        b.inner
            .runtime
            .spawn(async move { prober.probe_until_done().await });
        if b.inner.cfg.backfill_rate > 0 && b.inner.cfg.num_uploaders > 0 {
            let w = b.clone();
            let h = std::thread::Builder::new()
                .name("hoard-backfill".into())
                .spawn(move || w.backfill())
                .map_err(Error::Spawn)?;
            b.inner.workers.lock().push(h);
        }
        for i in 0..b.inner.cfg.num_uploaders {
            let w = b.clone();
            let h = std::thread::Builder::new()
                .name(format!("hoard-upload-{i}"))
                .spawn(move || w.worker())
                .map_err(Error::Spawn)?;
            b.inner.workers.lock().push(h);
        }
        Ok(b)
    }

    /// The probe's findings, once it has run.
    pub fn probe_report(&self) -> Option<ProbeReport> {
        self.inner.probe.lock().clone()
    }

    /// Jobs waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.inner.rx.len()
    }

    /// Brings the queue gauges up to date (called when metrics are read, so
    /// a stalled queue shows its age growing).
    pub fn refresh_gauges(&self) {
        let i = &self.inner;
        let q = i.queued_at.lock();
        i.metrics.queue_length.set(i.rx.len() as i64);
        let oldest = q.front().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        i.metrics.queue_oldest_seconds.set(oldest);
    }

    /// The hook for newly committed blobs: queues an upload unless the blob
    /// came from the bucket, uploads are off (`num_uploaders: 0`), or it is
    /// larger than `max_proxy_blob_size`.
    pub fn enqueue(&self, c: &Committed, namespace: &str) {
        let i = &self.inner;
        if c.from_backend {
            i.existence
                .insert(namespace, c.kind, &c.hash, c.stored_bytes);
            i.disk.mark_uploaded(c.namespace, c.kind, &c.hash);
            return;
        }
        if i.cfg.num_uploaders == 0 || c.logical_size > i.cfg.max_proxy_blob_size {
            return;
        }
        // A re-PUT of a stored blob: upload it again only if no upload of it
        // succeeded (it ended error or dropped, or came with an adopted
        // directory) and none is queued.
        if !c.new && i.disk.is_uploaded(c.namespace, c.kind, &c.hash) {
            return;
        }
        self.queue_new(
            JobKey {
                namespace: namespace.to_string(),
                kind: c.kind,
                hash: c.hash,
            },
            c.stored_bytes,
        );
    }

    /// Journals and queues a new job for `key` unless one is queued already.
    /// `bytes` 0 means "measure the file".
    fn queue_new(&self, key: JobKey, bytes: u64) -> bool {
        let i = &self.inner;
        if !i.queued.lock().insert(key.clone()) {
            return false;
        }
        let nonce = i.random.hash_one((&key.hash, Instant::now()));
        if let Err(e) = i.journal.added(&key, bytes, nonce) {
            tracing::error!(error = %e, "writing the upload journal failed; this upload will not survive a restart");
        }
        self.push(Job {
            key,
            bytes: AtomicU64::new(bytes),
            nonce,
            replayed: false,
        });
        true
    }

    fn push(&self, job: Job) {
        let i = &self.inner;
        i.queued.lock().insert(job.key.clone());
        i.metrics
            .jobs
            .with_label_values(&[job.key.kind.as_str()])
            .inc();
        if job.key.kind == Kind::Cas {
            let (wtx, _) = watch::channel(None);
            i.pending_cas.lock().insert(job.key.clone(), wtx);
        }
        let mut q = i.queued_at.lock();
        match i.tx.try_send(job) {
            Ok(()) => {
                q.push_back(Instant::now());
                i.metrics.queue_length.set(i.rx.len() as i64);
            }
            Err(crossbeam_channel::TrySendError::Full(job))
            | Err(crossbeam_channel::TrySendError::Disconnected(job)) => {
                drop(q);
                tracing::warn!(kind = %job.key.kind, hash = %job.key.hash, "upload queue full; upload dropped");
                self.finish(&job, Status::Dropped, None);
            }
        }
    }

    /// Records a terminal outcome: metrics, existence, waiters, journal,
    /// outcome channel. Called exactly once per job.
    fn finish(&self, job: &Job, status: Status, maybe_created: Option<u64>) {
        let i = &self.inner;
        let kind = job.key.kind.as_str();
        let bytes = job.bytes.load(Ordering::Relaxed);
        i.metrics
            .outcomes
            .with_label_values(&[kind, status.as_str()])
            .inc();
        i.metrics
            .bytes
            .with_label_values(&[kind, status.as_str()])
            .inc_by(bytes);
        if status == Status::Created {
            i.metrics.created_bytes.inc_by(bytes);
        }
        let uploaded = matches!(status, Status::Created | Status::AlreadyExists);
        if uploaded {
            i.existence
                .insert(&job.key.namespace, job.key.kind, &job.key.hash, bytes);
            if let Ok(ns) = i.disk.namespace(&job.key.namespace) {
                i.disk.mark_uploaded(ns, job.key.kind, &job.key.hash);
            }
        }
        if let Some(w) = i.pending_cas.lock().remove(&job.key) {
            let _ = w.send(Some(status));
        }
        i.queued.lock().remove(&job.key);
        // The job's end and its outcome are one journal record; accounting
        // hears of it only once it is there.
        let at = SystemTime::now();
        let epoch = i.journal.epoch();
        let written = i
            .journal
            .done(&job.key, status.as_str(), bytes, at, maybe_created, |seq| {
                if let Some(sink) = &i.outcomes {
                    sink(&Outcome {
                        epoch,
                        seq,
                        namespace: job.key.namespace.clone(),
                        kind: job.key.kind,
                        hash: Some(job.key.hash),
                        status,
                        bytes,
                        at,
                    });
                }
            });
        if let Err(e) = written {
            tracing::error!(error = %e, "writing the upload journal failed; this outcome will not survive a restart");
        }
        // Action results skipped because this blob was not up yet get
        // another try, each as a new job.
        if uploaded && job.key.kind == Kind::Cas {
            let waiting = i
                .waiting_ac
                .lock()
                .remove(&(job.key.namespace.clone(), job.key.hash))
                .unwrap_or_default();
            for ac in waiting {
                self.queue_new(ac, 0);
            }
        }
    }

    /// Counts a client upload hoard refused, in the same ledger as upload
    /// outcomes, so a crash loses it no more than an outcome.
    pub fn record_rejection(&self, namespace: &str, kind: Kind) {
        let i = &self.inner;
        let at = SystemTime::now();
        let epoch = i.journal.epoch();
        let written = i
            .journal
            .event(namespace, kind, Status::Rejected.as_str(), 0, at, |seq| {
                if let Some(sink) = &i.outcomes {
                    sink(&Outcome {
                        epoch,
                        seq,
                        namespace: namespace.to_string(),
                        kind,
                        hash: None,
                        status: Status::Rejected,
                        bytes: 0,
                        at,
                    });
                }
            });
        if let Err(e) = written {
            tracing::error!(error = %e, "writing the upload journal failed; this count will not survive a restart");
        }
    }

    /// Accounting has spooled every outcome of `epoch` up to `seq`: the
    /// journal need not keep them.
    pub fn outcomes_consumed(&self, epoch: u64, seq: u64) {
        if self.inner.journal.epoch() == epoch {
            self.inner.journal.consumed(seq);
        }
    }

    fn worker(&self) {
        let i = &self.inner;
        loop {
            if i.stopping.load(Ordering::Relaxed) {
                let past = i.stop_after.lock().is_some_and(|d| Instant::now() >= d);
                if past || i.rx.is_empty() {
                    return;
                }
            }
            // Until the probe has said how the bucket answers, and until the
            // index is whole (a replayed job must find its blob, not a part
            // of the directory not yet indexed), jobs stay in the queue
            // where the gauges and the journal can see them.
            if i.mode.load(Ordering::Acquire) == MODE_UNKNOWN || !i.disk.is_loaded() {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            let job = match i.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(j) => j,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            {
                let mut q = i.queued_at.lock();
                q.pop_front();
                i.metrics.queue_length.set(i.rx.len() as i64);
                let oldest = q.front().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                i.metrics.queue_oldest_seconds.set(oldest);
            }
            let status = i.runtime.block_on(async {
                tokio::select! {
                    s = outcome_of(self.process(&job)) => Some(s),
                    () = i.cancel.cancelled() => None,
                }
            });
            match status {
                Some(Some(s)) => self.finish(&job, s, None),
                // It may have created the object: `error`, and the journal
                // keeps its nonce until a later job settles the key.
                Some(None) => self.finish(&job, Status::Error, Some(job.nonce)),
                None => self.abandon(&job),
            }
        }
    }

    /// A job cut off by the shutdown deadline: no outcome in this process;
    /// its journal record stays, so the next start queues it again.
    fn abandon(&self, job: &Job) {
        self.inner.pending_cas.lock().remove(&job.key);
        self.inner.queued.lock().remove(&job.key);
        tracing::debug!(kind = %job.key.kind, hash = %job.key.hash, "upload interrupted by shutdown; kept in the journal");
    }

    /// Queues uploads of blobs no upload of which succeeded, at
    /// `backfill_rate` per second: CAS and raw blobs before action results
    /// (which go up only after their outputs). A blob whose attempt failed
    /// is tried again after [`BACKFILL_RETRY`]. The queue keeps room for
    /// client uploads: the backfill waits while it is half full.
    fn backfill(&self) {
        let i = &self.inner;
        let rate = f64::from(i.cfg.backfill_rate);
        let mut budget = 0.0f64;
        let mut tried: HashMap<JobKey, Instant> = HashMap::new();
        loop {
            for _ in 0..10 {
                if i.stopping.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if i.mode.load(Ordering::Acquire) == MODE_UNKNOWN
                || !i.disk.is_loaded()
                || i.rx.len() * 2 > i.cfg.max_queued_uploads
            {
                continue;
            }
            budget = (budget + rate).min(2.0 * rate);
            tried.retain(|_, at| at.elapsed() < BACKFILL_RETRY);
            for kind in [Kind::Cas, Kind::Raw, Kind::Ac] {
                if budget < 1.0 {
                    break;
                }
                let want = budget as usize + tried.len();
                for (ns, hash) in i.disk.not_uploaded(kind, want) {
                    if budget < 1.0 {
                        break;
                    }
                    let key = JobKey {
                        namespace: i.disk.namespace_name(ns),
                        kind,
                        hash,
                    };
                    if tried.contains_key(&key) {
                        continue;
                    }
                    tried.insert(key.clone(), Instant::now());
                    if self.queue_new(key, 0) {
                        i.metrics.backfill.inc();
                        budget -= 1.0;
                    }
                }
            }
        }
    }

    fn key_for(&self, ns: &str, kind: Kind, hash: &Hash, format: ObjectFormat) -> String {
        object_key(&self.inner.prefix, ns, kind, hash, format)
    }

    async fn process(&self, job: &Job) -> Option<Status> {
        let i = &self.inner;
        let k = &job.key;
        let blob = match i
            .disk
            .namespace(&k.namespace)
            .and_then(|ns| i.disk.get(ns, k.kind, &k.hash))
        {
            Ok(Some(b)) => b,
            Ok(None) => {
                tracing::warn!(kind = %k.kind, hash = %k.hash, "blob left the local cache before its upload");
                return self.without_blob(job).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a blob to upload it");
                return self.without_blob(job).await;
            }
        };
        let format = if blob.is_casblob() {
            ObjectFormat::Casblob
        } else {
            ObjectFormat::Raw
        };
        let key = self.key_for(&k.namespace, k.kind, &k.hash, format);
        let len = blob.stored_len();
        // The outcome counts what is sent: this file's length.
        job.bytes.store(len, Ordering::Relaxed);
        if k.kind == Kind::Ac {
            let mut blob = blob;
            let bytes = match blob.read_to_vec() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read an action result to upload it");
                    return Some(Status::Error);
                }
            };
            if let Err(missing) = self.references_in_bucket(&k.namespace, &bytes).await {
                i.metrics.ac_skipped.inc();
                tracing::warn!(action = %k.hash, "action result not uploaded: a blob it references is not in the bucket");
                // Try again once that blob is up (its upload, a re-PUT or
                // the backfill).
                // Bounded: beyond it the backfill still brings them.
                let mut waiting = i.waiting_ac.lock();
                if let Some(h) = missing
                    && waiting.len() < MAX_WAITING_AC
                {
                    waiting
                        .entry((k.namespace.clone(), h))
                        .or_default()
                        .push(k.clone());
                }
                // A replayed job's attempt before the restart may have
                // created the object: its nonce stays open for the job
                // queued once that blob is up.
                return if job.replayed {
                    None
                } else {
                    Some(Status::Error)
                };
            }
            return self
                .put_with_retries(job, &key, Source::Bytes(bytes.into()), len)
                .await;
        }
        // The upload reads the file by path, afresh for each attempt.
        let path = blob.path();
        drop(blob);
        self.put_with_retries(job, &key, Source::File(path), len)
            .await
    }

    /// `None`: an attempt may have created the object and the bucket would
    /// not say; the job is tried again later rather than ended, since an
    /// `error` would leave a created object uncounted.
    async fn put_with_retries(
        &self,
        job: &Job,
        key: &str,
        src: Source,
        len: u64,
    ) -> Option<Status> {
        let i = &self.inner;
        let writer = format!("{}/{:x}", i.cfg.host_id, job.nonce);
        let mut maybe_sent = job.replayed;
        if i.mode.load(Ordering::Acquire) == MODE_HEAD_FIRST {
            // The bucket ignores If-None-Match: ask before writing, so the
            // outcome stays truthful (though not race-free between hosts).
            // Without an answer there is no PUT: on such a bucket it would
            // overwrite and be counted `created` whether or not it was new.
            let mut tries = 0;
            loop {
                tries += 1;
                match i.store.head(&i.metrics, key).await {
                    Ok(Some(h)) => {
                        let earlier = i.journal.unresolved(&job.key);
                        let ours = (maybe_sent || !earlier.is_empty())
                            && self.written_by_us(&h, &writer, &earlier);
                        return Some(if ours {
                            Status::Created
                        } else {
                            Status::AlreadyExists
                        });
                    }
                    Ok(None) => break,
                    Err(e) if tries >= i.cfg.max_attempts => {
                        tracing::warn!(key, error = %e, attempts = tries, "HEAD before PUT failed; not uploading blind");
                        // An earlier attempt may have created it: undecided.
                        return if maybe_sent {
                            None
                        } else {
                            Some(Status::Error)
                        };
                    }
                    Err(e) => {
                        tracing::debug!(key, error = %e, "HEAD before PUT failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100 << tries.min(5))).await;
                    }
                }
            }
        }
        let mut attempt = 0;
        let mut last = String::new();
        loop {
            attempt += 1;
            let result = if len >= i.cfg.multipart_threshold {
                i.store
                    .multipart_if_absent(&i.metrics, key, &src, len, i.cfg.part_size, &writer)
                    .await
            } else {
                match src.body(len).await {
                    Ok(body) => {
                        i.store
                            .put_if_absent(&i.metrics, key, body, len, &writer)
                            .await
                    }
                    Err(e) => PutResult::Failed(e),
                }
            };
            match result {
                PutResult::Created => return Some(Status::Created),
                PutResult::Exists(_) => {
                    let earlier = i.journal.unresolved(&job.key);
                    if !maybe_sent && earlier.is_empty() {
                        return Some(Status::AlreadyExists);
                    }
                    // An attempt of this job, or an earlier job of this host
                    // that ended `error`, may have created it: the writer
                    // tag says whether it was us (and never counted).
                    return match i.store.head(&i.metrics, key).await {
                        Ok(Some(h)) if self.written_by_us(&h, &writer, &earlier) => {
                            Some(Status::Created)
                        }
                        Ok(_) => Some(Status::AlreadyExists),
                        // Cannot tell: `error`, the question stays open.
                        Err(_) if maybe_sent => None,
                        Err(_) => Some(Status::Error),
                    };
                }
                PutResult::Failed(e) if maybe_sent => {
                    // An earlier attempt may have created it: `error`, and
                    // a later attempt's writer-tag check settles it.
                    tracing::warn!(key, error = %e, "upload failed after an attempt whose answer was lost; it may have created the object");
                    return None;
                }
                PutResult::Failed(e) => {
                    tracing::warn!(key, error = %e, "upload failed");
                    return Some(Status::Error);
                }
                PutResult::Conflict if attempt >= i.cfg.max_attempts && maybe_sent => return None,
                PutResult::Conflict if attempt >= i.cfg.max_attempts => {
                    tracing::warn!(
                        key,
                        attempts = attempt,
                        "upload failed after retries: concurrent create conflicts"
                    );
                    return Some(Status::Error);
                }
                PutResult::Transient(e) if attempt >= i.cfg.max_attempts => {
                    if maybe_sent {
                        tracing::warn!(key, attempts = attempt, error = %e, "upload failed after retries; an attempt may have created the object");
                        return None;
                    }
                    tracing::warn!(key, attempts = attempt, error = %e, previous = %last, "upload failed after retries");
                    return Some(Status::Error);
                }
                PutResult::Conflict => {}
                PutResult::Transient(e) => {
                    maybe_sent = true;
                    tracing::debug!(key, error = %e, attempt, "upload attempt failed; retrying");
                    last = e;
                }
            }
            // Exponential backoff with full jitter: 100 ms, 200 ms, ... 5 s.
            let cap = (100u64 << attempt.min(6)).min(5_000);
            let jitter = i.random.hash_one((key, attempt, Instant::now())) % cap.max(1);
            tokio::time::sleep(Duration::from_millis(jitter.max(20))).await;
        }
    }

    /// The outcome of a job whose blob cannot be read. A fresh job sent
    /// nothing: `error`. A replayed one may have created the object before
    /// the restart, and with its blob gone no later job of the key may
    /// ever ask, so the bucket is asked now: an object with this host's tag
    /// is `created` and counted at the object's length; without an answer
    /// the outcome stays open.
    async fn without_blob(&self, job: &Job) -> Option<Status> {
        if !job.replayed {
            return Some(Status::Error);
        }
        let i = &self.inner;
        let k = &job.key;
        let writer = format!("{}/{:x}", i.cfg.host_id, job.nonce);
        let earlier = i.journal.unresolved(k);
        for &format in formats_of(k.kind) {
            let key = self.key_for(&k.namespace, k.kind, &k.hash, format);
            match i.store.head(&i.metrics, &key).await {
                Ok(Some(h)) if self.written_by_us(&h, &writer, &earlier) => {
                    job.bytes.store(h.len, Ordering::Relaxed);
                    return Some(Status::Created);
                }
                Ok(Some(_)) => return Some(Status::AlreadyExists),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot ask the bucket about a replayed upload whose blob is gone");
                    return None;
                }
            }
        }
        Some(Status::Error)
    }

    /// Whether an object's writer tag is this job's or that of an earlier
    /// job of this host that ended `error` without knowing.
    fn written_by_us(&self, h: &s3::HeadInfo, writer: &str, earlier: &[u64]) -> bool {
        let Some(tag) = h.writer.as_deref() else {
            return false;
        };
        tag == writer
            || earlier
                .iter()
                .any(|n| tag == format!("{}/{n:x}", self.inner.cfg.host_id))
    }

    /// Whether every blob an action result references is in the bucket,
    /// waiting for this host's own uploads of them to finish first.
    async fn references_in_bucket(&self, ns: &str, ac_bytes: &[u8]) -> Result<(), Option<Hash>> {
        let Ok(ar) = ActionResult::decode(ac_bytes) else {
            return Err(None);
        };
        let mut digests: Vec<Digest> = ar
            .output_files
            .iter()
            .filter_map(|f| f.digest.clone())
            .collect();
        digests.extend(ar.stdout_digest.clone());
        digests.extend(ar.stderr_digest.clone());
        for d in ar
            .output_directories
            .iter()
            .filter_map(|d| d.tree_digest.as_ref())
        {
            digests.push(d.clone());
            // The tree's files too, read from the local copy of the tree.
            let Ok(h) = Hash::parse(&d.hash) else {
                return Err(None);
            };
            let tree = self
                .inner
                .disk
                .namespace(ns)
                .ok()
                .and_then(|id| self.inner.disk.get(id, Kind::Cas, &h).ok().flatten())
                .and_then(|mut b| b.read_to_vec().ok())
                .and_then(|bytes| Tree::decode(bytes.as_slice()).ok());
            let Some(tree) = tree else {
                return Err(Hash::parse(&d.hash).ok());
            };
            for dir in tree.root.iter().chain(&tree.children) {
                digests.extend(dir.files.iter().filter_map(|f| f.digest.clone()));
            }
        }
        for d in digests {
            let Ok(h) = Hash::parse(&d.hash) else {
                return Err(None);
            };
            if d.size_bytes == 0 && h.is_empty_blob() {
                continue;
            }
            if !self.cas_uploaded(ns, &h).await {
                return Err(Some(h));
            }
        }
        Ok(())
    }

    async fn cas_uploaded(&self, ns: &str, hash: &Hash) -> bool {
        let i = &self.inner;
        if i.existence.get(ns, Kind::Cas, hash).is_some() {
            return true;
        }
        let key = JobKey {
            namespace: ns.to_string(),
            kind: Kind::Cas,
            hash: *hash,
        };
        let waiter = i.pending_cas.lock().get(&key).map(|w| w.subscribe());
        if let Some(mut rx) = waiter {
            let done =
                tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|s| s.is_some())).await;
            return matches!(done, Ok(Ok(s)) if matches!(*s, Some(Status::Created | Status::AlreadyExists)));
        }
        self.exists(ns, Kind::Cas, hash).await == Presence::Present
    }

    /// Whether an object is in the bucket: the existence cache, else a HEAD
    /// bounded by `read_timeout`. A slow or failing bucket is `Unknown`.
    pub async fn exists(&self, ns: &str, kind: Kind, hash: &Hash) -> Presence {
        let i = &self.inner;
        if i.existence.get(ns, kind, hash).is_some() {
            i.metrics.existence.with_label_values(&["hit"]).inc();
            return Presence::Present;
        }
        i.metrics.existence.with_label_values(&["miss"]).inc();
        for f in formats_of(kind) {
            let key = self.key_for(ns, kind, hash, *f);
            match tokio::time::timeout(i.cfg.read_timeout, i.store.head(&i.metrics, &key)).await {
                Ok(Ok(Some(h))) => {
                    i.existence.insert(ns, kind, hash, h.len);
                    return Presence::Present;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(key, error = %e, "HEAD failed");
                    return Presence::Unknown;
                }
                Err(_) => return Presence::Unknown,
            }
        }
        Presence::Absent
    }

    /// [`Backend::exists`] for a question where a wrong "absent" only
    /// costs the client a re-upload (FindMissingBlobs): a recent "absent"
    /// is believed without asking again (`absence_ttl`), and a fresh one
    /// is remembered.
    pub async fn exists_or_upload(&self, ns: &str, kind: Kind, hash: &Hash) -> Presence {
        let i = &self.inner;
        if i.existence.known_absent(ns, kind, hash) {
            i.metrics.existence.with_label_values(&["absent"]).inc();
            return Presence::Absent;
        }
        let p = self.exists(ns, kind, hash).await;
        if p == Presence::Absent {
            i.existence.note_absent(ns, kind, hash);
        }
        p
    }

    /// Fetches an object for read-through: its body, stored length and
    /// format; `Absent` when the bucket says it has none; `Unknown` when it
    /// does not answer within `read_timeout`, fails, or the object is over
    /// `max_proxy_blob_size`. The caller must verify the bytes.
    pub async fn fetch(&self, ns: &str, kind: Kind, hash: &Hash) -> Fetch {
        let i = &self.inner;
        for f in formats_of(kind) {
            let key = self.key_for(ns, kind, hash, *f);
            match tokio::time::timeout(i.cfg.read_timeout, i.store.get(&i.metrics, &key)).await {
                Ok(Ok(Some((body, len)))) => {
                    if len > i.cfg.max_proxy_blob_size {
                        return Fetch::Unknown;
                    }
                    i.metrics.s3_hits.inc();
                    return Fetch::Found(Fetched {
                        body,
                        stored_len: len,
                        format: *f,
                    });
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(key, error = %e, "read-through GET failed; answering a miss");
                    return Fetch::Unknown;
                }
                Err(_) => {
                    tracing::warn!(key, "read-through GET timed out; answering a miss");
                    return Fetch::Unknown;
                }
            }
        }
        i.metrics.s3_misses.inc();
        i.existence.remove(ns, kind, hash);
        Fetch::Absent
    }

    /// Counts a fetched object that failed verification and forgets that it
    /// exists.
    pub fn verification_failed(&self, ns: &str, kind: Kind, hash: &Hash) {
        self.inner.metrics.verify_failed.inc();
        self.inner.existence.remove(ns, kind, hash);
    }

    /// The read timeout, for callers that bound their own waits.
    pub fn read_timeout(&self) -> Duration {
        self.inner.cfg.read_timeout
    }

    /// Stops the workers after the queue drains or `drain_timeout` passes,
    /// whichever is first; at the deadline, uploads still running are cut
    /// off (a multipart upload is aborted). What has no outcome stays in
    /// the journal. Returns within `drain_timeout` plus a few seconds
    /// whatever the bucket does.
    pub fn shutdown(&self) {
        let i = &self.inner;
        // A bucket that never answered the probe takes no uploads: there is
        // nothing to drain, so do not wait for it.
        let deadline = if i.mode.load(Ordering::Acquire) == MODE_UNKNOWN {
            Instant::now()
        } else {
            Instant::now() + i.cfg.drain_timeout
        };
        *i.stop_after.lock() = Some(deadline);
        i.stopping.store(true, Ordering::Relaxed);
        let workers = std::mem::take(&mut *i.workers.lock());
        let all_done = |ws: &[std::thread::JoinHandle<()>]| ws.iter().all(|w| w.is_finished());
        while !all_done(&workers) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        i.cancel.cancel();
        // A cancelled job returns at its next await; a worker stuck in a
        // blocking call is left behind rather than waited for.
        let grace = Instant::now() + Duration::from_secs(3);
        while !all_done(&workers) && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut stuck = 0;
        for w in workers {
            if w.is_finished() {
                let _ = w.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            tracing::warn!(
                workers = stuck,
                "upload workers did not stop in time; leaving them"
            );
        }
        let left = i.rx.len();
        if left > 0 {
            tracing::warn!(
                jobs = left,
                "uploads still queued at shutdown; kept in the journal for the next start"
            );
        }
    }

    async fn probe_until_done(&self) {
        loop {
            match self.probe().await {
                Ok(r) => {
                    let i = &self.inner;
                    if r.honors_if_none_match {
                        tracing::info!(atomic = r.atomic_create, refusal = ?r.refusal_status, "bucket honours create-if-absent PUTs");
                        i.metrics.backend_honors_conditional.set(1);
                        i.mode.store(MODE_CONDITIONAL, Ordering::Release);
                    } else {
                        tracing::error!(
                            "THE BUCKET IGNORES If-None-Match: a second create-if-absent PUT of one key succeeded and overwrote it. \
                             Uploads will HEAD before PUT to keep outcomes truthful; concurrent hosts can still both count `created`."
                        );
                        i.metrics.backend_honors_conditional.set(0);
                        i.mode.store(MODE_HEAD_FIRST, Ordering::Release);
                    }
                    if !r.atomic_create && r.honors_if_none_match {
                        tracing::warn!(
                            "two simultaneous creates of one key both succeeded: the bucket's conditional PUT is not atomic"
                        );
                    }
                    *i.probe.lock() = Some(r);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bucket probe failed; uploads wait for it; retrying in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    async fn probe(&self) -> Result<ProbeReport, String> {
        let i = &self.inner;
        let base = format!(
            "{}_hoard/probe/{}-{:x}",
            if i.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", i.prefix.trim_end_matches('/'))
            },
            i.cfg.host_id,
            i.random.hash_one(Instant::now())
        );
        let put = |key: String| async move {
            let body = ByteStream::from_static(b"hoard probe");
            i.store
                .put_if_absent(&i.metrics, &key, body, 11, "probe")
                .await
        };
        let (k1, k2) = (format!("{base}-a"), format!("{base}-b"));
        let first = put(k1.clone()).await;
        if let PutResult::Transient(e) | PutResult::Failed(e) = &first {
            return Err(format!("probe PUT failed: {e}"));
        }
        let second = put(k1.clone()).await;
        let (honors, refusal) = match second {
            PutResult::Exists(s) => (true, Some(s)),
            PutResult::Created => (false, None),
            PutResult::Conflict => (true, Some(409)),
            PutResult::Transient(e) | PutResult::Failed(e) => {
                return Err(format!("probe PUT failed: {e}"));
            }
        };
        let (a, b) = tokio::join!(put(k2.clone()), put(k2.clone()));
        let winners = [a, b].iter().filter(|r| **r == PutResult::Created).count();
        for k in [k1, k2] {
            let _ = i.store.delete(&i.metrics, &k).await;
        }
        Ok(ProbeReport {
            honors_if_none_match: honors,
            atomic_create: winners == 1,
            refusal_status: refusal,
        })
    }
}

/// Runs one job to its outcome. A panic inside it (a bug) still ends the
/// job, as `error`, and leaves the worker running: every job gets exactly
/// one outcome and the pool never shrinks.
async fn outcome_of(job: impl std::future::Future<Output = Option<Status>>) -> Option<Status> {
    use futures_util::FutureExt as _;
    match std::panic::AssertUnwindSafe(job).catch_unwind().await {
        Ok(s) => s,
        Err(_) => {
            tracing::error!("an upload job panicked; it ends as error");
            Some(Status::Error)
        }
    }
}

/// What the bucket holds per namespace: the objects' sizes as listed,
/// summed (the unit of billing). hoard's own probe keys are left out.
pub async fn bucket_footprint(
    cfg: &S3Config,
) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let store = Store::new(cfg, Duration::from_secs(60)).await;
    let prefix = if cfg.prefix.is_empty() {
        String::new()
    } else {
        format!("{}/", cfg.prefix.trim_end_matches('/'))
    };
    let mut out = std::collections::BTreeMap::new();
    for (key, size) in store.list(&prefix).await? {
        let rel = &key[prefix.len().min(key.len())..];
        if rel.starts_with("_hoard/") {
            continue;
        }
        // `ns.v1/<name>/<kind dir>/<hh>/<hash>`; names may hold '/'.
        let ns = match rel.strip_prefix("ns.v1/") {
            Some(rest) => {
                let parts: Vec<&str> = rest.split('/').collect();
                parts[..parts.len().saturating_sub(3)].join("/")
            }
            None => String::new(),
        };
        *out.entry(ns).or_insert(0) += size;
    }
    Ok(out)
}

/// The forms an object of `kind` may take in the bucket, most likely
/// first: CAS blobs are casblobs (`cas.v2/`) unless a host stored them
/// uncompressed (`cas/`).
fn formats_of(kind: Kind) -> &'static [ObjectFormat] {
    if kind == Kind::Cas {
        &[ObjectFormat::Casblob, ObjectFormat::Raw]
    } else {
        &[ObjectFormat::Raw]
    }
}

/// An object fetched for read-through.
pub struct Fetched {
    pub body: ByteStream,
    pub stored_len: u64,
    pub format: ObjectFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_job_still_ends_in_exactly_one_outcome() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        #[allow(clippy::panic)]
        let panicking = async { panic!("a bug in a job") };
        assert_eq!(rt.block_on(outcome_of(panicking)), Some(Status::Error));
        assert_eq!(
            rt.block_on(outcome_of(async { Some(Status::Created) })),
            Some(Status::Created)
        );
    }
}
