//! bazel-remote-compatible access log: one line per request on stdout,
//! `YYYY/MM/DD HH:MM:SS METHOD STATUS CLIENT PATH`, timestamps in UTC.
//!
//! Lines go through a [`LineSink`], so a slow or closed stdout never
//! blocks or fails a request; it only loses lines.

use std::io::Write;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::log_sink::LineSink;

#[derive(Clone)]
pub struct AccessLog {
    out: LineSink,
}

impl AccessLog {
    /// Creates the log on stdout.
    pub fn start() -> AccessLog {
        AccessLog {
            out: LineSink::spawn("hoard-access-log", std::io::stdout(), 64 * 1024),
        }
    }

    pub fn record(&self, method: &str, status: u16, client: IpAddr, path: &str) {
        let ts = format_utc(SystemTime::now());
        let mut w = self.out.writer();
        let _ = writeln!(
            w,
            "{ts} {method:>4} {status} {:>15} {path}",
            client.to_string()
        );
    }

    /// A gRPC line in bazel-remote's form (`GRPC AC GET <hash> OK`), after
    /// the same timestamp. Client-supplied text in `msg` must have gone
    /// through [`printable`].
    pub fn grpc(&self, msg: &str) {
        let ts = format_utc(SystemTime::now());
        let mut w = self.out.writer();
        let _ = writeln!(w, "{ts} {msg}");
    }

    /// Many gRPC lines of one call (FindMissingBlobs: one per digest), as
    /// one message with one timestamp: ten thousand lines cost one queue
    /// slot, not ten thousand.
    pub fn grpc_batch(&self, write: impl FnOnce(&mut LineBatch)) {
        let mut b = LineBatch {
            ts: format_utc(SystemTime::now()),
            buf: Vec::new(),
        };
        write(&mut b);
        if !b.buf.is_empty() {
            self.out.send(b.buf);
        }
    }

    /// Gives queued lines a moment to reach stdout (at shutdown).
    pub fn flush(&self) {
        self.out.drain(std::time::Duration::from_millis(500));
    }
}

/// Lines collected for [`AccessLog::grpc_batch`].
pub struct LineBatch {
    ts: String,
    buf: Vec<u8>,
}

impl LineBatch {
    /// Adds `<timestamp> <msg>`; client-supplied text in `msg` must have
    /// gone through [`printable`].
    pub fn line(&mut self, msg: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.buf, "{} {msg}", self.ts);
    }
}

/// Client-supplied text as it may appear in a log line: control characters
/// escaped (no forged lines), at most 256 characters.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(256).flat_map(char::escape_default).collect();
    if s.chars().count() > 256 {
        out.push_str("...");
    }
    out
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
    use std::time::Duration;

    #[test]
    fn client_text_cannot_forge_lines() {
        assert_eq!(printable("a\nGRPC AC GET x OK"), "a\\nGRPC AC GET x OK");
        assert!(printable(&"x".repeat(20_000)).len() < 300);
    }

    #[test]
    fn formats_like_go_log() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(format_utc(t), "2026/11/18 11:06:40");
        assert_eq!(format_utc(UNIX_EPOCH), "1970/01/01 00:00:00");
    }
}
