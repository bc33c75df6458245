//! bazel-remote-compatible access log: one line per request on stdout,
//! `YYYY/MM/DD HH:MM:SS METHOD STATUS CLIENT PATH`, timestamps in UTC.
//!
//! Lines are buffered and flushed every 100 ms (and at shutdown) so that a
//! busy server does not pay a `write` system call per request.

use std::io::{BufWriter, Stdout, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

#[derive(Clone)]
pub struct AccessLog {
    out: Arc<Mutex<BufWriter<Stdout>>>,
}

impl AccessLog {
    /// Creates the log and starts its flusher on the current runtime.
    pub fn start() -> AccessLog {
        let log = AccessLog {
            out: Arc::new(Mutex::new(BufWriter::with_capacity(
                64 * 1024,
                std::io::stdout(),
            ))),
        };
        let flusher = log.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                flusher.flush();
            }
        });
        log
    }

    pub fn record(&self, method: &str, status: u16, client: IpAddr, path: &str) {
        let ts = format_utc(SystemTime::now());
        let mut out = self.out.lock();
        let _ = writeln!(
            out,
            "{ts} {method:>4} {status} {:>15} {path}",
            client.to_string()
        );
    }

    pub fn flush(&self) {
        let _ = self.out.lock().flush();
    }
}

/// `YYYY/MM/DD HH:MM:SS` in UTC, as Go's default logger prints it.
pub fn format_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go_log() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(format_utc(t), "2026/11/18 11:06:40");
        assert_eq!(format_utc(UNIX_EPOCH), "1970/01/01 00:00:00");
    }
}
