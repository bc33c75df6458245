use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The uploader's metrics.
pub struct Metrics {
    pub jobs: IntCounterVec,
    pub outcomes: IntCounterVec,
    pub bytes: IntCounterVec,
    pub created_bytes: IntCounter,
    pub queue_length: IntGauge,
    pub queue_oldest_seconds: prometheus::Gauge,
    pub s3_seconds: HistogramVec,
    pub s3_hits: IntCounter,
    pub s3_misses: IntCounter,
    pub existence: IntCounterVec,
    pub verify_failed: IntCounter,
    pub ac_skipped: IntCounter,
    pub backfill: IntCounter,
    pub backend_honors_conditional: IntGauge,
}

impl Metrics {
    pub fn register(r: &Registry) -> Result<Metrics, prometheus::Error> {
        let m = Metrics {
            jobs: IntCounterVec::new(
                Opts::new(
                    "hoard_upload_jobs_total",
                    "Upload jobs taken (including those re-queued from the journal); equals the sum of outcomes once the queue is empty.",
                ),
                &["kind"],
            )?,
            outcomes: IntCounterVec::new(
                Opts::new(
                    "hoard_upload_outcomes_total",
                    "Upload jobs by kind and terminal outcome.",
                ),
                &["kind", "status"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "hoard_upload_bytes_total",
                    "Bytes of upload jobs (the object size a PUT sends) by kind and terminal outcome.",
                ),
                &["kind", "status"],
            )?,
            created_bytes: IntCounter::new(
                "bazelre_cache_upload_bytes_created",
                "Bytes of uploads that created a new object in the bucket (object sizes as listed).",
            )?,
            queue_length: IntGauge::new("hoard_upload_queue_length", "Upload jobs waiting.")?,
            queue_oldest_seconds: prometheus::Gauge::new(
                "hoard_upload_queue_oldest_seconds",
                "Age of the oldest waiting upload job.",
            )?,
            s3_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "hoard_s3_request_duration_seconds",
                    "S3 requests by operation and HTTP status.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
                &["op", "code"],
            )?,
            s3_hits: IntCounter::new(
                "bazel_remote_s3_cache_hits",
                "Local misses found in the bucket.",
            )?,
            s3_misses: IntCounter::new(
                "bazel_remote_s3_cache_misses",
                "Local misses not found in the bucket.",
            )?,
            existence: IntCounterVec::new(
                Opts::new(
                    "hoard_existence_cache_lookups_total",
                    "Existence checks answered by the cache (hit: present; absent: a recent \"no such blob\", FindMissingBlobs only) or by the bucket (miss).",
                ),
                &["result"],
            )?,
            verify_failed: IntCounter::new(
                "hoard_readthrough_verify_failures_total",
                "Objects fetched from the bucket that did not match their digest and were refused.",
            )?,
            backfill: IntCounter::new(
                "hoard_upload_backfill_jobs_total",
                "Upload jobs the backfill queued for blobs with no successful upload.",
            )?,
            ac_skipped: IntCounter::new(
                "hoard_upload_ac_skipped_total",
                "Action results not uploaded because a blob they reference is not in the bucket.",
            )?,
            backend_honors_conditional: IntGauge::new(
                "hoard_s3_conditional_put_supported",
                "1 if the startup probe saw the bucket honour If-None-Match, 0 if not, -1 before the probe.",
            )?,
        };
        r.register(Box::new(m.jobs.clone()))?;
        r.register(Box::new(m.outcomes.clone()))?;
        r.register(Box::new(m.bytes.clone()))?;
        r.register(Box::new(m.created_bytes.clone()))?;
        r.register(Box::new(m.queue_length.clone()))?;
        r.register(Box::new(m.queue_oldest_seconds.clone()))?;
        r.register(Box::new(m.s3_seconds.clone()))?;
        r.register(Box::new(m.s3_hits.clone()))?;
        r.register(Box::new(m.s3_misses.clone()))?;
        r.register(Box::new(m.existence.clone()))?;
        r.register(Box::new(m.verify_failed.clone()))?;
        r.register(Box::new(m.ac_skipped.clone()))?;
        r.register(Box::new(m.backfill.clone()))?;
        r.register(Box::new(m.backend_honors_conditional.clone()))?;
        m.backend_honors_conditional.set(-1);
        for kind in ["ac", "cas"] {
            m.jobs.with_label_values(&[kind]);
            for status in ["created", "already_exists", "error", "dropped"] {
                m.outcomes.with_label_values(&[kind, status]);
                m.bytes.with_label_values(&[kind, status]);
            }
        }
        Ok(m)
    }
}
