//! Wiring for `hoard` (serve): open the disk cache, open the HTTP and gRPC
//! listeners at once, index the cache in the background, serve until
//! SIGTERM/SIGINT or the idle timeout, then stop in order, each step with
//! its own deadline (see `stop_budget`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hoard_disk::{DiskCache, StorageMode};
use hoard_server::access_log::AccessLog;
use hoard_server::grpc::{self, GrpcConfig};
use hoard_server::http::{self, HttpState};
use hoard_server::listener::{self, Connections, ListenConfig};
use hoard_server::{Cache, Limits, Metrics};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How long accounting may take to spool what it counted, before the
/// upload drain.
const SPOOL_WAIT: Duration = Duration::from_secs(5);
/// How long accounting may spend sending its spool at the end.
const ACCOUNTING_SEND_WAIT: Duration = Duration::from_secs(10);
/// Grace the upload workers get after the drain deadline (a job cut off
/// returns at its next await).
const UPLOAD_GRACE: Duration = Duration::from_secs(3);
/// How long the evictor may take to finish deleting what it started.
const EVICTOR_WAIT: Duration = Duration::from_secs(5);
/// systemd's default `TimeoutStopSec`.
const SYSTEMD_STOP_TIMEOUT: Duration = Duration::from_secs(90);

/// The stop, in order: (1) stop accepting, let requests finish
/// (`shutdown_timeout`); (2) spool every count made so far (so a stop cut
/// short loses none); (3) drain uploads (`upload_drain_timeout`; jobs still
/// running are cut off and stay in the journal); (4) spool the drain's
/// outcomes and send the spool; (5) stop the evictor. The sum of the
/// deadlines is the longest a stop can take.
fn stop_budget(cfg: &Config) -> Duration {
    cfg.shutdown_timeout
        + SPOOL_WAIT
        + cfg
            .s3
            .as_ref()
            .map(|(_, u)| u.drain_timeout)
            .unwrap_or_default()
        + UPLOAD_GRACE
        + ACCOUNTING_SEND_WAIT
        + EVICTOR_WAIT
}

pub async fn run(cfg: Config, bulk_lane: Option<tokio::runtime::Handle>) -> anyhow::Result<()> {
    let disk = DiskCache::open(hoard_disk::Config {
        dir: cfg.dir.clone(),
        max_size_bytes: cfg.max_size_bytes,
        hard_limit_bytes: cfg.hard_limit_bytes,
        storage_mode: cfg.storage_mode,
        fsync: cfg.fsync,
        max_namespaces: cfg.max_namespaces,
        quotas: cfg.quotas.clone(),
        // Fault injection for the test suite only: slows the background
        // index load so that requests meet a partial index.
        load_pause: std::env::var("HOARD_TEST_INDEX_LOAD_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        sizing_pause: std::env::var("HOARD_TEST_INDEX_SIZING_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
    })
    .with_context(|| format!("opening cache directory {}", cfg.dir.display()))?;
    let budget = stop_budget(&cfg);
    if budget > SYSTEMD_STOP_TIMEOUT {
        tracing::warn!(
            seconds = budget.as_secs(),
            "shutdown_timeout + upload_drain_timeout and the fixed stop steps exceed systemd's default 90 s stop timeout; raise TimeoutStopSec or lower them"
        );
    }
    let tls = match cfg.tls.clone() {
        Some(files) => {
            let t = hoard_server::tls::Tls::load(files).map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(mutual = t.mutual(), "TLS on (both listeners)");
            Some(Arc::new(t))
        }
        None => None,
    };
    let connections = Connections::new(connection_cap(cfg.max_connections));
    let listen = ListenConfig {
        backlog: cfg.listen_backlog,
        idle_timeout: cfg.client_idle_timeout,
        header_timeout: cfg.request_header_timeout,
    };
    let listener = listener::bind(cfg.http_address, listen.clone(), Arc::clone(&connections))
        .with_context(|| format!("http_address: cannot listen on {}", cfg.http_address))?;
    let local = listener.local_addr()?;
    tracing::info!(
        address = %local,
        dir = %disk.dir().display(),
        backlog = cfg.listen_backlog.unwrap_or_else(listener::system_backlog),
        "serving HTTP"
    );
    let grpc_listener = match cfg.grpc_address {
        Some(addr) => {
            let l = listener::bind(addr, listen.clone(), Arc::clone(&connections))
                .with_context(|| format!("grpc_address: cannot listen on {addr}"))?;
            tracing::info!(address = %l.local_addr()?, "serving gRPC");
            Some(l)
        }
        None => None,
    };

    // The index loads while requests are already served; /readyz says when
    // it is done.
    let loader = disk.clone();
    std::thread::Builder::new()
        .name("hoard-index-load".into())
        .spawn(move || loader.load())
        .context("starting the index loader")?;

    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    // Accounting tells the ledger (the upload journal) what it has spooled;
    // the backend it tells is started next.
    let ledger: Arc<std::sync::OnceLock<hoard_upload::Backend>> = Arc::default();
    let accounting = match cfg.accounting.clone() {
        Some(a) => {
            tracing::info!(url = %a.clickhouse_url, table = %a.table, "storage accounting on");
            let l = Arc::clone(&ledger);
            let on_spooled: hoard_accounting::SpooledHook = Box::new(move |epoch, seq| {
                if let Some(b) = l.get() {
                    b.outcomes_consumed(epoch, seq);
                }
            });
            Some(
                hoard_accounting::Accounting::start(a, &metrics.registry, Some(on_spooled))
                    .context("starting accounting")?,
            )
        }
        None => None,
    };
    let backend = match cfg.s3.clone() {
        Some((s3, upload)) => {
            tracing::info!(endpoint = %s3.endpoint_url(), bucket = %s3.bucket, "S3 tier on");
            let sink: Option<hoard_upload::OutcomeSink> = accounting.clone().map(|acc| {
                Box::new(move |o: &hoard_upload::Outcome| {
                    acc.record(hoard_accounting::Event {
                        epoch: o.epoch,
                        seq: o.seq,
                        namespace: o.namespace.clone(),
                        kind: o.kind.as_str(),
                        status: o.status.as_str(),
                        bytes: o.bytes,
                        at: o.at,
                    })
                }) as hoard_upload::OutcomeSink
            });
            let b = hoard_upload::Backend::start(upload, s3, disk.clone(), &metrics.registry, sink)
                .await
                .context("starting the S3 uploader")?;
            let _ = ledger.set(b.clone());
            let hook_backend = b.clone();
            let hook_disk = disk.clone();
            disk.set_commit_hook(Box::new(move |c| {
                hook_backend.enqueue(c, &hook_disk.namespace_name(c.namespace));
            }));
            Some(b)
        }
        None => None,
    };
    let cache = Cache::new(
        disk.clone(),
        cfg.namespaces.clone(),
        Limits {
            max_blob_size: cfg.max_blob_size,
            max_action_result_size: cfg.max_action_result_size,
            max_inflight_bytes: cfg.max_inflight_bytes,
            max_inflight_wait: cfg.max_inflight_wait,
            client_idle_timeout: if cfg.client_idle_timeout.is_zero() {
                Duration::from_secs(u32::MAX as u64)
            } else {
                cfg.client_idle_timeout
            },
            raw_http_ac: cfg.disable_http_ac_validation,
            hot_set_bytes: cfg.hot_set_bytes,
        },
        hoard_server::auth::Auth::new(cfg.htpasswd.clone(), cfg.allow_unauthenticated_reads),
        metrics,
    );
    if let Some(h) = &cfg.htpasswd {
        tracing::info!(
            users = h.len(),
            unauthenticated_reads = cfg.allow_unauthenticated_reads,
            "authentication on (htpasswd)"
        );
    }
    if let Some(b) = &backend {
        cache.set_backend(b.clone());
    }
    // Refused uploads are counted through the same ledger as outcomes.
    if let (Some(b), Some(_)) = (&backend, &accounting) {
        let b = b.clone();
        cache.set_rejection_sink(Box::new(move |ns: &str, kind: hoard_disk::Kind| {
            b.record_rejection(ns, kind)
        }));
    }
    let state = Arc::new(HttpState {
        cache,
        access_log: cfg.access_log.then(AccessLog::start),
        started: SystemTime::now(),
        storage_mode: match cfg.storage_mode {
            StorageMode::Zstd => "zstd",
            StorageMode::Uncompressed => "uncompressed",
        },
        version: env!("CARGO_PKG_VERSION"),
        shutting_down: AtomicBool::new(false),
        cache_requests: AtomicU64::new(0),
        connections,
        tls: tls.clone(),
        bulk_lane,
    });
    if let Some(t) = &tls {
        spawn_reload_on_hangup(Arc::clone(t))?;
    }

    if let (Some(every), Some((s3, _)), Some(acc)) = (cfg.drift_interval, &cfg.s3, &cfg.accounting)
    {
        let gauges = hoard_accounting::DriftGauges::register(&state.cache.metrics().registry)
            .context("registering drift metrics")?;
        crate::drift::spawn_periodic(s3.clone(), acc.clone(), gauges, every);
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    if let Some(idle) = cfg.idle_timeout {
        spawn_idle_timer(Arc::clone(&state), idle, shutdown.clone());
    }
    let grpc_task = grpc_listener.map(|l| {
        tokio::spawn(grpc::serve(
            l,
            state.cache.clone(),
            tls.clone(),
            GrpcConfig::default(),
            state.access_log.clone(),
            shutdown.clone(),
            cfg.shutdown_timeout,
        ))
    });
    http::serve(listener, Arc::clone(&state), shutdown, cfg.shutdown_timeout).await;
    if let Some(t) = grpc_task {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC server failed"),
            Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
        }
    }
    if let Some(acc) = accounting.clone() {
        let spooled = tokio::task::spawn_blocking(move || acc.spool_now(SPOOL_WAIT)).await;
        if !matches!(spooled, Ok(true)) {
            tracing::warn!("accounting did not spool in time");
        }
    }
    if let Some(b) = backend {
        tracing::info!(queued = b.queue_len(), "servers stopped; draining uploads");
        let _ = tokio::task::spawn_blocking(move || b.shutdown()).await;
    }
    if let Some(acc) = accounting {
        tracing::info!("spooling and sending accounting");
        let _ = tokio::task::spawn_blocking(move || acc.shutdown(ACCOUNTING_SEND_WAIT)).await;
    }
    tracing::info!("stopping the disk cache");
    let d = disk.clone();
    let _ = tokio::task::spawn_blocking(move || d.shutdown(EVICTOR_WAIT)).await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// File descriptors kept for the cache itself (journal, spool, blobs being
/// read and written, the bucket's connections).
const RESERVED_FDS: u64 = 1024;

/// Raises the open-file limit to its hard maximum and fits `wanted`
/// connections into it.
fn connection_cap(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            return wanted;
        }
    };
    let fit = limit.saturating_sub(RESERVED_FDS).max(64) as usize;
    if fit < wanted {
        tracing::warn!(
            max_connections = wanted,
            open_file_limit = limit,
            using = fit,
            "max_connections lowered to fit the open-file limit; raise LimitNOFILE"
        );
        return fit;
    }
    wanted
}

/// SIGHUP reads the TLS files again; new connections get the new
/// certificate, open ones keep theirs, a failed reload keeps the old one.
fn spawn_reload_on_hangup(tls: Arc<hoard_server::tls::Tls>) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the certificate in use")
                }
            }
        }
    });
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Cancel first: nothing (not even logging) may stand between the
        // signal and the stop.
        shutdown.cancel();
        tracing::info!(signal = name, "shutting down");
    });
    Ok(())
}

/// Cancels `shutdown` once no cache request has arrived for `idle`.
fn spawn_idle_timer(state: Arc<HttpState>, idle: std::time::Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let count = |s: &HttpState| s.cache_requests.load(Ordering::Relaxed);
        let mut last = count(&state);
        let mut quiet = std::time::Duration::ZERO;
        let step = std::time::Duration::from_secs(1);
        loop {
            tokio::time::sleep(step).await;
            let now = count(&state);
            if now == last {
                quiet += step;
                if quiet >= idle {
                    tracing::info!(?idle, "idle timeout: shutting down");
                    shutdown.cancel();
                    return;
                }
            } else {
                quiet = std::time::Duration::ZERO;
                last = now;
            }
        }
    });
}
