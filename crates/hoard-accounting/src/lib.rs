//! hoard-accounting: the storage footprint customers are billed for.
//!
//! What it owns: counting. Upload outcomes (created, already_exists, error,
//! dropped) and refused client uploads (rejected), each at its position in
//! the outcome ledger (the upload journal), are summed per (minute,
//! namespace, kind, status): a count and bytes, the objects' sizes as the
//! bucket lists them (never rounded to disk blocks). Every
//! `flush_interval` what was counted becomes one batch, named by the ledger
//! positions it covers, which is spooled to disk and then inserted into
//! ClickHouse's `remote_build_cache_operations`.
//!
//! # Exactly once
//!
//! Delivery is at least once: a batch leaves the spool only after
//! ClickHouse acknowledged it, so a lost acknowledgement sends it again.
//! Counting is exactly once because every row carries its batch_id and the
//! table (`deploy/clickhouse/schema.sql`) keeps one row per (batch_id, row
//! key), read with FINAL. The spool keeps order: an older batch is always
//! sent before a newer one.
//!
//! # Crash-proof
//!
//! An event reaches accounting only once it is in the ledger. Counts not
//! yet spooled live in memory for at most one flush interval; after a
//! `kill -9` the ledger hands them over again at start, and events whose
//! position an earlier batch already covers (`accounted_through`: the
//! spooled batches and the cursor of acknowledged ones) are skipped. So no
//! instant loses a count or counts one twice. The ledger keeps events until
//! [`SpooledHook`] says they are spooled.
//!
//! # Limits
//!
//! The hot path is a send on an unbounded lock-free channel. The spool is bounded by
//! `spool_max_bytes`; a batch that does not fit is dropped, logged, and
//! counted in `hoard_accounting_spool_overflow_batches_total`.

mod spool;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntGauge, Registry};
use serde::{Deserialize, Serialize};

use spool::Spool;

/// Where and how often to report.
#[derive(Clone, Debug)]
pub struct AccountingConfig {
    /// ClickHouse HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub clickhouse_url: String,
    pub database: String,
    pub table: String,
    pub user: String,
    pub password: String,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// This host's name in every row.
    pub host: String,
}

/// One counted event, at its position in the outcome ledger: `(epoch,
/// seq)` names it for good, so the same event handed over again (replayed
/// from the ledger after a restart) is recognised.
#[derive(Clone, Debug)]
pub struct Event {
    pub epoch: u64,
    pub seq: u64,
    pub namespace: String,
    pub kind: &'static str,
    pub status: &'static str,
    pub bytes: u64,
    pub at: SystemTime,
}

/// A row of `remote_build_cache_operations` (without `ingested_at`, which
/// the server assigns).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct Row {
    /// The minute, as a Unix time.
    pub created_at: u32,
    pub host: String,
    pub namespace: String,
    pub kind: String,
    pub status: String,
    pub count: u64,
    pub bytes: u64,
    pub batch_id: String,
}

/// Rows sent together under one batch_id: the events of ledger positions
/// `first_seq..=last_seq` of `epoch`, which also make the id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    pub batch_id: String,
    pub rows: Vec<Row>,
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub first_seq: u64,
    #[serde(default)]
    pub last_seq: u64,
}

/// Told `(epoch, seq)` once every event up to `seq` is spooled, so the
/// ledger may drop them.
pub type SpooledHook = Box<dyn Fn(u64, u64) + Send>;

struct Metrics {
    completed: IntCounter,
    failed: IntCounter,
    spool_bytes: IntGauge,
    spool_batches: IntGauge,
    last_success: IntGauge,
    overflow: IntCounter,
}

/// Errors starting accounting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("accounting spool {dir}: {source}")]
    Spool {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the accounting thread: {0}")]
    Spawn(std::io::Error),
}

/// The accounting pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Accounting {
    tx: crossbeam_channel::Sender<Msg>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

enum Msg {
    Event(Event),
    /// Spool everything counted so far; send nothing.
    Spool(crossbeam_channel::Sender<()>),
    /// Spool everything, send until the deadline, stop.
    Stop(crossbeam_channel::Sender<()>, Instant),
}

/// How long one INSERT may take outside shutdown.
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);

impl Accounting {
    /// Starts the aggregating thread; sends what an earlier run left in the
    /// spool first. Must be called inside a tokio runtime (the ClickHouse
    /// client runs on it).
    pub fn start(
        cfg: AccountingConfig,
        registry: &Registry,
        on_spooled: Option<SpooledHook>,
    ) -> Result<Accounting, Error> {
        let metrics = Metrics {
            completed: IntCounter::new(
                "bazelre_cache_accounting_reports_completed",
                "Accounting batches ClickHouse acknowledged.",
            )?,
            failed: IntCounter::new(
                "bazelre_cache_accounting_reports_failed_to_send",
                "Attempts to send an accounting batch that failed (the batch stays spooled).",
            )?,
            spool_bytes: IntGauge::new(
                "hoard_accounting_spool_bytes",
                "Bytes of batches waiting in the spool.",
            )?,
            spool_batches: IntGauge::new(
                "hoard_accounting_spool_batches",
                "Batches waiting in the spool.",
            )?,
            last_success: IntGauge::new(
                "hoard_accounting_last_success_timestamp_seconds",
                "Unix time of the last batch ClickHouse acknowledged.",
            )?,
            overflow: IntCounter::new(
                "hoard_accounting_spool_overflow_batches_total",
                "Batches dropped because the spool was full (their counts are lost).",
            )?,
        };
        registry.register(Box::new(metrics.completed.clone()))?;
        registry.register(Box::new(metrics.failed.clone()))?;
        registry.register(Box::new(metrics.spool_bytes.clone()))?;
        registry.register(Box::new(metrics.spool_batches.clone()))?;
        registry.register(Box::new(metrics.last_success.clone()))?;
        registry.register(Box::new(metrics.overflow.clone()))?;
        let spool = Spool::open(&cfg.spool_dir).map_err(|source| Error::Spool {
            dir: cfg.spool_dir.clone(),
            source,
        })?;
        let client = client(&cfg);
        let (tx, rx) = crossbeam_channel::unbounded();
        let runtime = tokio::runtime::Handle::current();
        let accounted = accounted_through(&cfg.spool_dir, &spool);
        let mut worker = Worker {
            cfg,
            spool,
            client,
            metrics,
            sums: BTreeMap::new(),
            runtime,
            accounted,
            range: None,
            on_spooled,
        };
        let handle = std::thread::Builder::new()
            .name("hoard-accounting".into())
            .spawn(move || worker.run(rx))
            .map_err(Error::Spawn)?;
        Ok(Accounting {
            tx,
            thread: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// Counts one event. Never blocks.
    pub fn record(&self, e: Event) {
        let _ = self.tx.send(Msg::Event(e));
    }

    /// Writes everything counted so far (the current minute too) to the
    /// spool, waiting at most `wait`. Shutdown calls it before the upload
    /// drain, so counts already made survive a stop that is cut short.
    pub fn spool_now(&self, wait: Duration) -> bool {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.tx.send(Msg::Spool(done_tx)).is_ok() && done_rx.recv_timeout(wait).is_ok()
    }

    /// Spools everything counted so far, sends the spool until `wait` has
    /// passed (what is left stays spooled for the next start), and stops the
    /// thread. Returns within about `wait` whatever ClickHouse does.
    pub fn shutdown(&self, wait: Duration) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let deadline = Instant::now() + wait;
        let stopped = self.tx.send(Msg::Stop(done_tx, deadline)).is_ok()
            && done_rx.recv_timeout(wait + Duration::from_secs(1)).is_ok();
        if !stopped {
            tracing::warn!("accounting did not stop in time; what it counted is spooled");
            return;
        }
        if let Ok(mut g) = self.thread.lock()
            && let Some(h) = g.take()
        {
            let _ = h.join();
        }
    }
}

type Key = (u32, String, &'static str, &'static str);

struct Worker {
    cfg: AccountingConfig,
    spool: Spool,
    client: clickhouse::Client,
    metrics: Metrics,
    sums: BTreeMap<Key, (u64, u64)>,
    runtime: tokio::runtime::Handle,
    /// Per ledger epoch, the last position already in a batch (spooled or
    /// sent): events up to it are counted and must not be again.
    accounted: BTreeMap<u64, u64>,
    /// Ledger positions of the events in `sums`: epoch, first, last.
    range: Option<(u64, u64, u64)>,
    on_spooled: Option<SpooledHook>,
}

/// The cursor file: the last ledger position of a batch ClickHouse
/// acknowledged, written before that batch's spool file is deleted.
const CURSOR: &str = "accounted";

/// The cursor file: `<epoch hex> <seq>` lines; anything else is ignored
/// (a torn write loses at most what the spool still holds).
fn parse_cursor(text: &str) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some((e, s)) = line.split_once(' ')
            && let (Ok(e), Ok(s)) = (u64::from_str_radix(e, 16), s.parse::<u64>())
        {
            let v: &mut u64 = out.entry(e).or_default();
            *v = (*v).max(s);
        }
    }
    out
}

/// Parses any bytes as a spool batch and any text as the cursor file, as
/// a start would. For the fuzz targets.
#[doc(hidden)]
pub fn fuzz_spool_records(batch: &[u8], cursor: &str) -> bool {
    let parsed: Result<Batch, _> = serde_json::from_slice(batch);
    let through = parse_cursor(cursor);
    if let Ok(b) = &parsed {
        // A batch that parses writes back to one that parses the same.
        let again: Option<Batch> = serde_json::to_vec(b)
            .ok()
            .and_then(|v| serde_json::from_slice(&v).ok());
        assert!(
            again.is_some_and(|a| a.batch_id == b.batch_id && a.rows.len() == b.rows.len()),
            "a parsed batch does not round-trip"
        );
    }
    parsed.is_ok() || !through.is_empty()
}

/// What was already counted, per epoch: the cursor, and every batch still
/// in the spool.
fn accounted_through(dir: &std::path::Path, spool: &Spool) -> BTreeMap<u64, u64> {
    let mut out = std::fs::read_to_string(dir.join(CURSOR))
        .map(|text| parse_cursor(&text))
        .unwrap_or_default();
    for path in spool.files() {
        if let Ok(b) = Spool::read(&path)
            && b.last_seq > 0
        {
            let v = out.entry(b.epoch).or_default();
            *v = (*v).max(b.last_seq);
        }
    }
    out
}

fn minute_of(t: SystemTime) -> u32 {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (secs - secs % 60).min(u32::MAX as u64) as u32
}

impl Worker {
    fn run(&mut self, rx: crossbeam_channel::Receiver<Msg>) {
        self.update_spool_gauges();
        self.send_spooled(None);
        let mut next_flush = Instant::now() + self.cfg.flush_interval;
        loop {
            let wait = next_flush.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Event(e)) => self.count(e),
                Ok(Msg::Spool(done)) => {
                    self.flush();
                    let _ = done.send(());
                }
                Ok(Msg::Stop(done, deadline)) => {
                    self.flush();
                    self.send_spooled(Some(deadline));
                    let _ = done.send(());
                    return;
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.flush();
                    self.send_spooled(None);
                    next_flush = Instant::now() + self.cfg.flush_interval;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
        }
    }

    /// Adds one event to the sums, unless an earlier batch holds it.
    fn count(&mut self, e: Event) {
        if self.accounted.get(&e.epoch).is_some_and(|s| e.seq <= *s) {
            return; // replayed from the ledger: already spooled or sent
        }
        if let Some((epoch, _, _)) = self.range
            && epoch != e.epoch
        {
            // A new ledger (the journal was replaced): close the old batch.
            self.flush();
        }
        self.range = Some(match self.range {
            Some((epoch, first, last)) => (epoch, first.min(e.seq), last.max(e.seq)),
            None => (e.epoch, e.seq, e.seq),
        });
        let key = (minute_of(e.at), e.namespace, e.kind, e.status);
        let s = self.sums.entry(key).or_insert((0, 0));
        s.0 += 1;
        s.1 += e.bytes;
    }

    /// Moves everything counted into one spooled batch, named by the
    /// ledger positions it covers: a batch rebuilt after a crash from the
    /// same positions has the same id, so ClickHouse counts it once.
    fn flush(&mut self) {
        let Some((epoch, first, last)) = self.range.take() else {
            return;
        };
        let keys: Vec<Key> = self.sums.keys().cloned().collect();
        let batch_id = format!("{epoch:016x}-{first}-{last}");
        let rows: Vec<Row> = keys
            .iter()
            .filter_map(|k| {
                let (count, bytes) = self.sums.remove(k)?;
                Some(Row {
                    created_at: k.0,
                    host: self.cfg.host.clone(),
                    namespace: k.1.clone(),
                    kind: k.2.to_string(),
                    status: k.3.to_string(),
                    count,
                    bytes,
                    batch_id: batch_id.clone(),
                })
            })
            .collect();
        let batch = Batch {
            batch_id,
            rows,
            epoch,
            first_seq: first,
            last_seq: last,
        };
        let size = serde_json::to_vec(&batch)
            .map(|v| v.len() as u64)
            .unwrap_or(0);
        if self.spool.bytes() + size > self.cfg.spool_max_bytes {
            self.metrics.overflow.inc();
            tracing::error!(
                batch = %batch.batch_id,
                rows = batch.rows.len(),
                "accounting spool is full (spool_max_bytes); this batch is dropped and its counts are lost"
            );
            return;
        }
        if let Err(e) = self.spool.push(&batch) {
            self.metrics.overflow.inc();
            tracing::error!(error = %e, "cannot write the accounting spool; this batch is dropped");
            return;
        }
        let through = self.accounted.entry(epoch).or_default();
        *through = (*through).max(last);
        if let Some(hook) = &self.on_spooled {
            hook(epoch, last);
        }
        self.update_spool_gauges();
    }

    /// Sends spooled batches oldest first; stops at the first failure so
    /// order is kept.
    fn send_spooled(&mut self, deadline: Option<Instant>) {
        for path in self.spool.files() {
            let timeout = match deadline {
                None => INSERT_TIMEOUT,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(INSERT_TIMEOUT),
                    _ => break,
                },
            };
            let batch = match Spool::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable accounting batch; set aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    continue;
                }
            };
            match self
                .runtime
                .block_on(insert(&self.client, &self.cfg.table, &batch.rows, timeout))
            {
                Ok(()) => {
                    // The cursor first: once the file is gone, only it says
                    // these positions are counted.
                    if batch.last_seq > 0
                        && let Err(e) = self.write_cursor(batch.epoch, batch.last_seq)
                    {
                        tracing::error!(error = %e, "cannot write the accounting cursor; keeping the sent batch spooled");
                        break;
                    }
                    let _ = std::fs::remove_file(&path);
                    self.metrics.completed.inc();
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    self.metrics.last_success.set(now as i64);
                }
                Err(e) => {
                    self.metrics.failed.inc();
                    tracing::warn!(error = %e, spooled = self.spool.files().len(), "sending accounting to ClickHouse failed; batches stay spooled");
                    break;
                }
            }
        }
        self.update_spool_gauges();
    }

    /// Records durably that ledger positions of `epoch` up to `seq` were
    /// acknowledged by ClickHouse.
    fn write_cursor(&mut self, epoch: u64, seq: u64) -> std::io::Result<()> {
        use std::io::Write as _;
        let dir = &self.cfg.spool_dir;
        let tmp = dir.join(format!("{CURSOR}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{epoch:x} {seq}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(CURSOR))?;
        std::fs::File::open(dir)?.sync_all()
    }

    fn update_spool_gauges(&self) {
        self.metrics
            .spool_batches
            .set(self.spool.files().len() as i64);
        self.metrics.spool_bytes.set(self.spool.bytes() as i64);
    }
}

fn client(cfg: &AccountingConfig) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&cfg.clickhouse_url)
        .with_database(&cfg.database)
        .with_user(&cfg.user)
        .with_password(&cfg.password)
        // ClickHouse 18.16 knows neither the validation queries nor
        // RowBinaryWithNamesAndTypes; compression stays off for it too.
        .with_validation(false)
        .with_compression(clickhouse::Compression::None)
}

/// One namespace's reported net-new bytes.
#[derive(Debug, Deserialize, clickhouse::Row)]
struct Reported {
    namespace: String,
    bytes: u64,
}

/// The footprint ClickHouse reports per namespace: the bytes of every
/// upload that created an object, each batch counted once (FINAL).
pub async fn reported_footprint(cfg: &AccountingConfig) -> Result<BTreeMap<String, u64>, String> {
    let client = client(cfg);
    let sql = format!(
        "SELECT namespace, sum(bytes) AS bytes FROM {} FINAL WHERE status = 'created' GROUP BY namespace",
        cfg.table
    );
    let rows: Vec<Reported> = client
        .query(&sql)
        .fetch_all()
        .await
        .map_err(|e| format!("querying {}: {e}", cfg.clickhouse_url))?;
    Ok(rows.into_iter().map(|r| (r.namespace, r.bytes)).collect())
}

/// One line of a drift report.
#[derive(Clone, Debug, PartialEq)]
pub struct Drift {
    pub namespace: String,
    pub actual: u64,
    pub reported: u64,
}

impl Drift {
    pub fn bytes(&self) -> i64 {
        self.actual as i64 - self.reported as i64
    }

    /// Drift relative to what the bucket holds (100% when it holds nothing
    /// yet something was reported).
    pub fn percent(&self) -> f64 {
        match (self.actual, self.reported) {
            (0, 0) => 0.0,
            (0, _) => 100.0,
            (a, _) => self.bytes() as f64 * 100.0 / a as f64,
        }
    }
}

/// Pairs actual and reported footprints, every namespace either side knows.
pub fn compare(actual: &BTreeMap<String, u64>, reported: &BTreeMap<String, u64>) -> Vec<Drift> {
    let mut names: Vec<&String> = actual.keys().chain(reported.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| Drift {
            namespace: n.clone(),
            actual: actual.get(n).copied().unwrap_or(0),
            reported: reported.get(n).copied().unwrap_or(0),
        })
        .collect()
}

/// The drift gauges a daemon exports when it checks drift periodically.
pub struct DriftGauges {
    actual: prometheus::IntGaugeVec,
    reported: prometheus::IntGaugeVec,
    drift: prometheus::IntGaugeVec,
    percent: prometheus::GaugeVec,
}

impl DriftGauges {
    pub fn register(r: &Registry) -> Result<DriftGauges, prometheus::Error> {
        let opts = |n: &str, h: &str| prometheus::Opts::new(n, h);
        let g = DriftGauges {
            actual: prometheus::IntGaugeVec::new(
                opts(
                    "bazelre_cache_actual_storage_bytes",
                    "Bytes the bucket holds (object sizes as listed).",
                ),
                &["namespace"],
            )?,
            reported: prometheus::IntGaugeVec::new(
                opts(
                    "bazelre_cache_reported_storage_bytes",
                    "Net-new bytes reported to ClickHouse.",
                ),
                &["namespace"],
            )?,
            drift: prometheus::IntGaugeVec::new(
                opts(
                    "bazelre_cache_storage_drift_bytes",
                    "Actual minus reported bytes.",
                ),
                &["namespace"],
            )?,
            percent: prometheus::GaugeVec::new(
                opts(
                    "bazelre_cache_storage_drift_percent",
                    "Drift as a percentage of the actual bytes.",
                ),
                &["namespace"],
            )?,
        };
        r.register(Box::new(g.actual.clone()))?;
        r.register(Box::new(g.reported.clone()))?;
        r.register(Box::new(g.drift.clone()))?;
        r.register(Box::new(g.percent.clone()))?;
        Ok(g)
    }

    pub fn set(&self, drifts: &[Drift]) {
        for d in drifts {
            let ns = [d.namespace.as_str()];
            self.actual.with_label_values(&ns).set(d.actual as i64);
            self.reported.with_label_values(&ns).set(d.reported as i64);
            self.drift.with_label_values(&ns).set(d.bytes());
            self.percent.with_label_values(&ns).set(d.percent());
        }
    }
}

async fn insert(
    client: &clickhouse::Client,
    table: &str,
    rows: &[Row],
    timeout: Duration,
) -> Result<(), clickhouse::error::Error> {
    let fut = async {
        let mut insert = client.insert::<Row>(table).await?;
        for r in rows {
            insert.write(r).await?;
        }
        insert.end().await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(clickhouse::error::Error::Custom("insert timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(dir: &std::path::Path, max: u64, rt: &tokio::runtime::Runtime) -> Worker {
        let r = Registry::new();
        let m = Metrics {
            completed: IntCounter::new("c", "c").unwrap(),
            failed: IntCounter::new("f", "f").unwrap(),
            spool_bytes: IntGauge::new("sb", "sb").unwrap(),
            spool_batches: IntGauge::new("sn", "sn").unwrap(),
            last_success: IntGauge::new("l", "l").unwrap(),
            overflow: IntCounter::new("o", "o").unwrap(),
        };
        let _ = r;
        Worker {
            cfg: AccountingConfig {
                clickhouse_url: "http://127.0.0.1:9".into(),
                database: "default".into(),
                table: "t".into(),
                user: "default".into(),
                password: String::new(),
                flush_interval: Duration::from_secs(60),
                spool_dir: dir.to_path_buf(),
                spool_max_bytes: max,
                host: "h".into(),
            },
            spool: Spool::open(dir).unwrap(),
            client: clickhouse::Client::default(),
            metrics: m,
            sums: BTreeMap::new(),
            runtime: rt.handle().clone(),
            accounted: BTreeMap::new(),
            range: None,
            on_spooled: None,
        }
    }

    fn event(seq: u64, at: SystemTime, bytes: u64) -> Event {
        Event {
            epoch: 7,
            seq,
            namespace: String::new(),
            kind: "cas",
            status: "created",
            bytes,
            at,
        }
    }

    #[test]
    fn batches_are_named_by_ledger_positions_and_replayed_events_count_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let earlier = now - Duration::from_secs(120);
        let mut w = worker(dir.path(), 1 << 20, &rt);
        for (seq, at, bytes) in [(1, earlier, 4096), (2, earlier, 8192), (3, now, 100)] {
            w.count(event(seq, at, bytes));
        }
        w.flush();
        let files = w.spool.files();
        assert_eq!(files.len(), 1);
        let b = Spool::read(&files[0]).unwrap();
        assert_eq!(b.batch_id, "0000000000000007-1-3");
        let mut rows: Vec<(u64, u64)> = b.rows.iter().map(|r| (r.count, r.bytes)).collect();
        rows.sort();
        assert_eq!(rows, vec![(1, 100), (2, 12288)], "one row per minute");
        // A restart: the ledger hands over 1..=5; 1..=3 are in the spool.
        drop(w);
        let mut w = worker(dir.path(), 1 << 20, &rt);
        w.accounted = accounted_through(dir.path(), &w.spool);
        for seq in 1..=5 {
            w.count(event(seq, now, 10));
        }
        w.flush();
        let files = w.spool.files();
        let b = Spool::read(&files[1]).unwrap();
        assert_eq!(b.batch_id, "0000000000000007-4-5");
        assert_eq!((b.rows[0].count, b.rows[0].bytes), (2, 20));
        // Acknowledged batches leave the cursor behind.
        w.write_cursor(7, 5).unwrap();
        for f in &files {
            std::fs::remove_file(f).unwrap();
        }
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(accounted_through(dir.path(), &spool).get(&7), Some(&5));
    }

    #[test]
    fn a_full_spool_counts_what_it_drops() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker(dir.path(), 10, &rt);
        w.count(event(1, SystemTime::now(), 4096));
        w.flush();
        assert_eq!(w.metrics.overflow.get(), 1);
        assert!(w.spool.files().is_empty());
    }
}
