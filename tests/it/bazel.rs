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
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.user_root.display()))
            .arg("--max_idle_secs=60")
            .args(args)
            .current_dir(&self.workspace)
            .output()
            .expect("running bazel");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "bazel {args:?} failed:\n{text}");
        text
    }

    /// Builds everything against `cache` and returns the process summary,
    /// e.g. {"remote cache hit": 11, "internal": 6}.
    fn build(&self, cache: &str) -> BTreeMap<String, u64> {
        let flag = format!("--remote_cache={cache}");
        let out = self.run(&[
            "build",
            &flag,
            "--nosandbox_debug",
            "--spawn_strategy=local",
            "--symlink_prefix=/",
            "--color=no",
            "--curses=no",
            "//...",
        ]);
        assert!(
            !out.contains("WARNING: Remote Cache"),
            "Bazel reported cache trouble:\n{out}"
        );
        process_summary(&out)
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
