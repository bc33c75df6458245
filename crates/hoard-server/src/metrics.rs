//! Prometheus metrics. Names follow bazel-remote where the meaning is the
//! same, so existing dashboards keep working; `hoard_*` names cover what
//! bazel-remote does not measure.

use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use hoard_disk::DiskCache;

/// Every metric hoard-server exports, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    pub incoming_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub rejected_uploads: IntCounterVec,
    pub ac_completeness_misses: IntCounter,
    pub auth_failures: IntCounter,
    disk_size: IntGauge,
    disk_logical: IntGauge,
    disk_evicted: IntCounter,
    disk_limit: GaugeVec,
    index_entries: IntGauge,
    index_bytes: IntGauge,
    index_progress: Gauge,
    index_sizes_known: IntGauge,
    corrupt_dropped: IntCounter,
    bulk_rested: Counter,
    pub inflight_bytes: IntGauge,
    pub open_connections: IntGauge,
    pub refused_connections: IntCounter,
    pub idle_closed_connections: IntCounter,
    pub grpc_handled: IntCounterVec,
    pub grpc_seconds: HistogramVec,
    ns_size: IntGaugeVec,
    ns_entries: IntGaugeVec,
    ns_quota: IntGaugeVec,
    ns_evicted: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Registration only fails on a duplicate name, which is a programming
    // error caught by the metrics tests; the metric then still counts.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            20.0, 40.0, 80.0, 160.0, 320.0,
        ];
        let m = Metrics {
            incoming_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "bazel_remote_incoming_requests_total",
                        "Cache requests by method (get, contains, put), kind and status.",
                    ),
                    &["method", "kind", "status"],
                )?,
            ),
            http_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "http_request_duration_seconds",
                        "HTTP request latency; handler is the method for cache requests.",
                    )
                    .buckets(buckets),
                    &["handler", "method", "code"],
                )?,
            ),
            rejected_uploads: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hoard_rejected_uploads_total",
                        "Client uploads refused, by kind and reason.",
                    ),
                    &["kind", "reason"],
                )?,
            ),
            ac_completeness_misses: reg(
                &r,
                IntCounter::new(
                    "hoard_ac_completeness_misses_total",
                    "Action results not served because a referenced blob was missing.",
                )?,
            ),
            disk_size: reg(
                &r,
                IntGauge::new(
                    "bazel_remote_disk_cache_size_bytes",
                    "SizeOnDisk of all cached blobs (4 KiB blocks).",
                )?,
            ),
            disk_logical: reg(
                &r,
                IntGauge::new(
                    "bazel_remote_disk_cache_logical_bytes",
                    "Uncompressed size of all cached blobs, 4 KiB rounded.",
                )?,
            ),
            disk_evicted: reg(
                &r,
                IntCounter::new(
                    "bazel_remote_disk_cache_evicted_bytes_total",
                    "SizeOnDisk evicted since start.",
                )?,
            ),
            disk_limit: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "bazel_remote_disk_cache_size_bytes_limit",
                        "max_size (type=evict) and max_size_hard_limit (type=reject).",
                    ),
                    &["type"],
                )?,
            ),
            index_entries: reg(
                &r,
                IntGauge::new("hoard_index_entries", "Blobs in the disk index.")?,
            ),
            index_bytes: reg(
                &r,
                IntGauge::new("hoard_index_heap_bytes", "Heap held by the disk index.")?,
            ),
            index_progress: reg(
                &r,
                Gauge::new(
                    "hoard_index_load_progress",
                    "Fraction of cache directories indexed at startup (1 = ready).",
                )?,
            ),
            index_sizes_known: reg(
                &r,
                IntGauge::new(
                    "hoard_index_sizes_known",
                    "1 once the stored size of every file indexed at startup is known; until then the disk size figures count only the files sized.",
                )?,
            ),
            corrupt_dropped: reg(
                &r,
                IntCounter::new(
                    "hoard_corrupt_blobs_dropped_total",
                    "Stored files that failed format checks and were dropped.",
                )?,
            ),
            bulk_rested: reg(
                &r,
                Counter::new(
                    "hoard_bulk_rest_seconds_total",
                    "Time bulk hashing and (de)compression waited for a turn or rested while small requests kept the main runtime busy.",
                )?,
            ),
            auth_failures: reg(
                &r,
                IntCounter::new(
                    "hoard_auth_failures_total",
                    "Requests refused for missing or wrong credentials (HTTP and gRPC).",
                )?,
            ),
            inflight_bytes: reg(
                &r,
                IntGauge::new(
                    "hoard_inflight_bytes",
                    "Request body bytes held in memory right now.",
                )?,
            ),
            open_connections: reg(
                &r,
                IntGauge::new(
                    "hoard_open_connections",
                    "Client connections open now (HTTP and gRPC), lingering ones included.",
                )?,
            ),
            refused_connections: reg(
                &r,
                IntCounter::new(
                    "hoard_refused_connections_total",
                    "Connections closed at accept because max_connections was reached.",
                )?,
            ),
            idle_closed_connections: reg(
                &r,
                IntCounter::new(
                    "hoard_idle_closed_connections_total",
                    "Connections closed because their client left hoard waiting past client_idle_timeout.",
                )?,
            ),
            grpc_handled: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "grpc_server_handled_total",
                        "gRPC calls completed, by service, method and status code.",
                    ),
                    &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
                )?,
            ),
            grpc_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "grpc_server_handling_seconds",
                        "gRPC handling time (until the response, or the stream, starts).",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
                    ]),
                    &["grpc_type", "grpc_service", "grpc_method"],
                )?,
            ),
            ns_size: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hoard_namespace_size_bytes",
                        "SizeOnDisk of each namespace's blobs.",
                    ),
                    &["namespace"],
                )?,
            ),
            ns_entries: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("hoard_namespace_entries", "Blobs in each namespace."),
                    &["namespace"],
                )?,
            ),
            ns_quota: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hoard_namespace_quota_bytes",
                        "Each namespace's quota (namespaces.max_size), where it has one.",
                    ),
                    &["namespace"],
                )?,
            ),
            ns_evicted: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hoard_namespace_evicted_bytes_total",
                        "SizeOnDisk evicted from each namespace since start (by max_size or its quota).",
                    ),
                    &["namespace"],
                )?,
            ),
            registry: r,
        };
        for kind in ["ac", "cas"] {
            for status in ["hit", "miss"] {
                m.incoming_requests
                    .with_label_values(&["get", kind, status]);
            }
        }
        for status in ["hit", "miss"] {
            m.incoming_requests
                .with_label_values(&["contains", "cas", status]);
        }
        Ok(m)
    }

    /// Refreshes the disk gauges and renders everything as Prometheus text.
    /// Series labelled with a namespace that `visible` refuses are left
    /// out: one tenant's figures are not another's to read.
    pub fn render(&self, disk: &DiskCache, visible: &dyn Fn(&str) -> bool) -> Vec<u8> {
        for n in disk.namespace_stats() {
            let label = [n.name.as_str()];
            self.ns_size
                .with_label_values(&label)
                .set(n.size_on_disk as i64);
            self.ns_entries
                .with_label_values(&label)
                .set(n.entries as i64);
            if let Some(q) = n.quota {
                self.ns_quota.with_label_values(&label).set(q as i64);
            }
            catch_up(
                &self.ns_evicted.with_label_values(&label),
                n.evicted_bytes_total,
            );
        }
        let s = disk.stats();
        self.disk_size.set(s.size_on_disk as i64);
        self.disk_logical.set(s.logical_bytes as i64);
        catch_up(&self.disk_evicted, s.evicted_bytes_total);
        self.disk_limit
            .with_label_values(&["evict"])
            .set(s.max_size as f64);
        if let Some(h) = s.hard_limit {
            self.disk_limit.with_label_values(&["reject"]).set(h as f64);
        }
        self.index_entries.set(s.entries as i64);
        self.index_bytes.set(s.index_heap_bytes as i64);
        self.index_progress.set(s.load_fraction);
        self.index_sizes_known.set(s.sizes_known as i64);
        catch_up(&self.corrupt_dropped, s.corrupt_dropped_total);
        catch_up(&self.bulk_rested, hoard_disk::turns::rested().as_secs_f64());
        let mut out = Vec::new();
        let mut families = self.registry.gather();
        for f in &mut families {
            let kept: Vec<_> = f
                .take_metric()
                .into_iter()
                .filter(|m| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == "namespace")
                        .is_none_or(|l| visible(l.value()))
                })
                .collect();
            f.set_metric(kept);
        }
        families.retain(|f| !f.get_metric().is_empty());
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Advances a counter mirrored from a monotonic source to the source's value.
fn catch_up<P: prometheus::core::Atomic>(c: &prometheus::core::GenericCounter<P>, now: P::T) {
    let cur = c.get();
    if now > cur {
        let mut by = now;
        by -= cur;
        c.inc_by(by);
    }
}
