//! `hoard drift`: compare what the bucket holds with the footprint reported
//! to ClickHouse, per namespace, and (in the daemon) export it as metrics.

use std::process::ExitCode;
use std::time::Duration;

use hoard_accounting::{AccountingConfig, Drift, DriftGauges, compare, reported_footprint};
use hoard_upload::{S3Config, bucket_footprint};

use crate::config::Config;

pub async fn measure(s3: &S3Config, acc: &AccountingConfig) -> Result<Vec<Drift>, String> {
    let actual = bucket_footprint(s3)
        .await
        .map_err(|e| format!("listing the bucket: {e}"))?;
    let reported = reported_footprint(acc).await?;
    Ok(compare(&actual, &reported))
}

/// Prints the table and exits 1 when a namespace drifts past the threshold.
pub fn main(cfg: &Config) -> ExitCode {
    let (Some((s3, _)), Some(acc)) = (&cfg.s3, &cfg.accounting) else {
        eprintln!("hoard drift: needs s3_proxy.bucket and accounting.clickhouse_url");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hoard drift: {e}");
            return ExitCode::from(2);
        }
    };
    let drifts = match rt.block_on(measure(s3, acc)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hoard drift: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{:<24} {:>16} {:>16} {:>14} {:>9}",
        "namespace", "actual", "reported", "drift", "drift %"
    );
    let mut over = false;
    for d in &drifts {
        let name = if d.namespace.is_empty() {
            "(default)"
        } else {
            d.namespace.as_str()
        };
        println!(
            "{name:<24} {:>16} {:>16} {:>14} {:>8.2}%",
            d.actual,
            d.reported,
            d.bytes(),
            d.percent()
        );
        over |= d.percent().abs() > cfg.drift_threshold_percent as f64;
    }
    if over {
        eprintln!(
            "hoard drift: drift above {}% (drift.threshold_percent)",
            cfg.drift_threshold_percent
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// Measures drift every `every` and updates the drift gauges.
pub fn spawn_periodic(s3: S3Config, acc: AccountingConfig, gauges: DriftGauges, every: Duration) {
    tokio::spawn(async move {
        loop {
            match measure(&s3, &acc).await {
                Ok(d) => gauges.set(&d),
                Err(e) => tracing::warn!(error = %e, "drift check failed"),
            }
            tokio::time::sleep(every).await;
        }
    });
}
