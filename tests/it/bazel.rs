//! Real Bazel against a real hoard over HTTP: a cold build fills the cache,
//! a rebuild after `bazel clean` must take every cacheable action from it,
//! also after hoard restarts on the same directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::Hoard;

struct Bazel {
    workspace: PathBuf,
    user_root: PathBuf,
    /// Startup options (before the command).
    startup: Vec<String>,
}

impl Bazel {
    fn new(tmp: &Path) -> Bazel {
        let ok = Command::new("bazel")
            .arg("--version")
            .output()
            .map(|o| o.status.success());
        assert!(
            matches!(ok, Ok(true)),
            "bazel is not installed (Debian package bazel-bootstrap); run the README's test command, which installs it"
        );
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bazel-workspace");
        let workspace = tmp.join("ws");
        copy_dir(&src, &workspace);
        Bazel {
            workspace,
            user_root: tmp.join("bazel-root"),
            startup: Vec::new(),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let (ok, text) = self.try_run(args);
        assert!(ok, "bazel {args:?} failed:\n{text}");
        text
    }

    /// Runs Bazel; whether it succeeded, and its output.
    fn try_run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.user_root.display()))
            .arg("--max_idle_secs=60")
            .args(&self.startup)
            .args(args)
            .current_dir(&self.workspace)
            .output()
            .expect("running bazel");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Builds everything against `cache` and returns the process summary,
    /// e.g. {"remote cache hit": 11, "internal": 6}.
    fn build(&self, cache: &str) -> BTreeMap<String, u64> {
        let (summary, out) = self.build_with(cache, &[]);
        assert!(
            !out.contains("WARNING: Remote Cache"),
            "Bazel reported cache trouble:\n{out}"
        );
        summary
    }

    /// Like `build`, with more flags, returning Bazel's output too (cache
    /// trouble is for the caller to judge).
    fn build_with(&self, cache: &str, extra: &[&str]) -> (BTreeMap<String, u64>, String) {
        let (ok, out) = self.try_build_with(cache, extra);
        assert!(ok, "bazel build failed:\n{out}");
        (process_summary(&out), out)
    }

    /// A build that may fail: whether it succeeded, and Bazel's output.
    fn try_build_with(&self, cache: &str, extra: &[&str]) -> (bool, String) {
        let flag = format!("--remote_cache={cache}");
        let mut args = vec![
            "build",
            &flag,
            "--nosandbox_debug",
            "--spawn_strategy=local",
            "--symlink_prefix=/",
            "--color=no",
            "--curses=no",
        ];
        args.extend_from_slice(extra);
        args.push("//...");
        self.try_run(&args)
    }

    fn clean(&self) {
        self.run(&["clean"]);
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        let _ = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.user_root.display()))
            .arg("shutdown")
            .current_dir(&self.workspace)
            .output();
    }
}

/// Parses `INFO: 17 processes: 11 remote cache hit, 6 internal.`
fn process_summary(out: &str) -> BTreeMap<String, u64> {
    let line = out
        .lines()
        .find(|l| l.contains(" processes: ") || l.ends_with(" processes."))
        .unwrap_or_else(|| panic!("no process summary in:\n{out}"));
    let mut m = BTreeMap::new();
    if let Some((_, rest)) = line.split_once(" processes: ") {
        for part in rest.trim_end_matches('.').split(", ") {
            if let Some((n, what)) = part.split_once(' ') {
                m.insert(what.to_string(), n.parse().unwrap_or(0));
            }
        }
    }
    m
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn assert_all_cached(summary: &BTreeMap<String, u64>, cacheable: u64, when: &str) {
    let hits = summary.get("remote cache hit").copied().unwrap_or(0);
    let others: Vec<_> = summary
        .iter()
        .filter(|(k, _)| k.as_str() != "remote cache hit" && k.as_str() != "internal")
        .collect();
    assert!(
        others.is_empty() && hits == cacheable,
        "{when}: expected all {cacheable} cacheable actions to be remote cache hits, got {summary:?}"
    );
    eprintln!(
        "{when}: {hits} of {cacheable} cacheable actions were remote cache hits ({summary:?})"
    );
}

#[test]
fn bazel_gets_remote_cache_hits_over_http_before_and_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let bazel = Bazel::new(tmp.path());
    let dir = tmp.path().join("cache");
    let hoard = Hoard::start(&dir, &[]);
    hoard.wait_ready();

    let cold = bazel.build(&hoard.url());
    let cacheable: u64 = cold
        .iter()
        .filter(|(k, _)| k.as_str() != "internal")
        .map(|(_, n)| *n)
        .sum();
    assert!(
        cacheable >= 8,
        "the workspace should have at least 8 cacheable actions: {cold:?}"
    );
    assert_eq!(
        cold.get("remote cache hit"),
        None,
        "cold build hit an empty cache: {cold:?}"
    );

    bazel.clean();
    assert_all_cached(&bazel.build(&hoard.url()), cacheable, "warm build");

    assert_eq!(hoard.stop(), Some(0));
    let hoard = Hoard::start(&dir, &[]);
    hoard.wait_ready();
    bazel.clean();
    assert_all_cached(
        &bazel.build(&hoard.url()),
        cacheable,
        "after a hoard restart",
    );

    // A path prefix selects a namespace: a cold one first, then all hits.
    let ns_url = format!("{}/ci-linux", hoard.url());
    bazel.clean();
    let cold_ns = bazel.build(&ns_url);
    assert_eq!(
        cold_ns.get("remote cache hit"),
        None,
        "namespaces leaked: {cold_ns:?}"
    );
    bazel.clean();
    assert_all_cached(&bazel.build(&ns_url), cacheable, "namespace ci-linux");
}

#[test]
fn bazel_gets_remote_cache_hits_over_grpc_and_across_protocols() {
    let tmp = tempfile::tempdir().unwrap();
    let bazel = Bazel::new(tmp.path());
    let hoard = Hoard::start(&tmp.path().join("cache"), &[]);
    hoard.wait_ready();

    let cold = bazel.build(&hoard.grpc_url());
    let cacheable: u64 = cold
        .iter()
        .filter(|(k, _)| k.as_str() != "internal")
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(
        cold.get("remote cache hit"),
        None,
        "cold build hit an empty cache: {cold:?}"
    );
    bazel.clean();
    assert_all_cached(
        &bazel.build(&hoard.grpc_url()),
        cacheable,
        "warm build over gRPC",
    );

    // What Bazel stored over gRPC serves it over HTTP, and the other way round.
    bazel.clean();
    assert_all_cached(
        &bazel.build(&hoard.url()),
        cacheable,
        "HTTP after a gRPC build",
    );
    let hoard2 = Hoard::start(&tmp.path().join("cache2"), &[]);
    hoard2.wait_ready();
    bazel.clean();
    bazel.build(&hoard2.url());
    bazel.clean();
    assert_all_cached(
        &bazel.build(&hoard2.grpc_url()),
        cacheable,
        "gRPC after an HTTP build",
    );
}

/// An htpasswd file with `user:password` entries, made by Apache's
/// `htpasswd -B` (installed by the README's test command).
pub(crate) fn htpasswd_file(path: &Path, users: &[(&str, &str)]) {
    let mut text = String::new();
    for (u, p) in users {
        let out = Command::new("htpasswd")
            .args(["-nbB", "-C", "5", u, p])
            .output()
            .expect("htpasswd (apache2-utils) is not installed; run the README's test command");
        assert!(out.status.success(), "htpasswd failed");
        text.push_str(String::from_utf8_lossy(&out.stdout).trim());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn bazel_with_credentials_gets_hits_and_a_wrong_password_gets_none() {
    let tmp = tempfile::tempdir().unwrap();
    let bazel = Bazel::new(tmp.path());
    let pw = tmp.path().join("htpasswd");
    htpasswd_file(&pw, &[("ci", "s3cret")]);
    let hoard = Hoard::start(
        &tmp.path().join("cache"),
        &[&format!("--htpasswd_file={}", pw.display())],
    );
    hoard.wait_ready();
    let url = format!("http://ci:s3cret@{}", hoard.addr);
    bazel.build(&url);
    bazel.clean();
    assert_all_cached(&bazel.build(&url), 11, "HTTP with credentials");
    // gRPC with the authorization header.
    let header = "--remote_header=authorization=Basic Y2k6czNjcmV0"; // ci:s3cret
    bazel.clean();
    let (warm, _) = bazel.build_with(&hoard.grpc_url(), &[header]);
    assert_all_cached(&warm, 11, "gRPC with the authorization header");
    // A wrong password, and gRPC without credentials: Bazel is refused
    // and says so; the build fails or gets no hits.
    for (what, cache, extra) in [
        (
            "HTTP, wrong password",
            format!("http://ci:wrong@{}", hoard.addr),
            None,
        ),
        ("gRPC, no credentials", hoard.grpc_url(), None),
        (
            "gRPC, wrong password",
            hoard.grpc_url(),
            Some("--remote_header=authorization=Basic Y2k6d3Jvbmc="),
        ),
    ] {
        bazel.clean();
        let (ok, out) = bazel.try_build_with(&cache, extra.as_slice());
        let hits = if ok {
            process_summary(&out)
                .get("remote cache hit")
                .copied()
                .unwrap_or(0)
        } else {
            0
        };
        assert_eq!(hits, 0, "{what}: got remote cache hits");
        assert!(
            out.contains("401") || out.contains("Unauthorized") || out.contains("UNAUTHENTICATED"),
            "{what}: Bazel did not report the refusal:\n{out}"
        );
        eprintln!(
            "{what}: build {}, 0 remote cache hits, Bazel reported the refusal",
            if ok { "succeeded locally" } else { "failed" }
        );
    }
}

#[test]
fn bazel_over_https_with_credentials_gets_hits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bazel = Bazel::new(tmp.path());
    let pki = crate::tls::Pki::new(&tmp.path().join("pki"));
    // Bazel 4's HTTP cache client trusts only its JVM's trust store
    // (--tls_certificate is for gRPC): give it one holding the test CA, as
    // an operator would, with the JDK's keytool.
    let store = tmp.path().join("truststore.jks");
    let ok = Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-storepass",
            "changeit",
            "-alias",
            "hoard-test-ca",
        ])
        .arg("-file")
        .arg(pki.path("ca.pem"))
        .arg("-keystore")
        .arg(&store)
        .output()
        .map(|o| o.status.success());
    assert!(
        matches!(ok, Ok(true)),
        "keytool (from the JDK Bazel runs on) failed"
    );
    bazel.startup = vec![
        format!(
            "--host_jvm_args=-Djavax.net.ssl.trustStore={}",
            store.display()
        ),
        "--host_jvm_args=-Djavax.net.ssl.trustStorePassword=changeit".into(),
    ];
    let pw = tmp.path().join("htpasswd");
    htpasswd_file(&pw, &[("ci", "s3cret")]);
    let start = |mutual: bool, dir: &str| -> Hoard {
        let mut flags = pki.flags(mutual);
        flags.push(format!("--htpasswd_file={}", pw.display()));
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let h = Hoard::start(&tmp.path().join(dir), &args);
        // Readiness over TLS is checked by the builds themselves.
        std::thread::sleep(std::time::Duration::from_millis(500));
        h
    };
    let ca = format!("--tls_certificate={}", pki.path("ca.pem"));
    // HTTPS with the credentials in the URL.
    let hoard = start(false, "cache-https");
    let https = format!("https://ci:s3cret@{}", hoard.addr);
    let (_, out) = bazel.build_with(&https, &[&ca]);
    assert!(!out.contains("Remote Cache:"), "{out}");
    bazel.clean();
    let (warm, out) = bazel.build_with(&https, &[&ca]);
    assert!(!out.contains("Remote Cache:"), "{out}");
    assert_all_cached(&warm, 11, "https with credentials");
    // Debian's Bazel 4.2.3 cannot speak grpcs at all: its JDK TLS provider
    // has no ALPN ("Failed to init TLS infrastructure: JDK provider does
    // not support ALPN protocol", and the Bazel server exits). gRPC over
    // TLS and mTLS are tested with grpcio in tls.rs.
    // A wrong password over HTTPS gets no hits.
    bazel.clean();
    let wrong = format!("https://ci:wrong@{}", hoard.addr);
    let (summary, out) = bazel.build_with(&wrong, &[&ca]);
    assert_eq!(summary.get("remote cache hit"), None, "{summary:?}");
    assert!(out.contains("401") || out.contains("Unauthorized"), "{out}");
    eprintln!("https, wrong password: 0 remote cache hits, Bazel reported the 401");
}
