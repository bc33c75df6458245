//! ccache, a client nobody here wrote, against hoard's HTTP cache with the
//! Bazel layout: with `disable_http_ac_validation` its own bytes live in the
//! raw keyspace (`/ac/` over HTTP, invisible to gRPC), as bazel-remote keeps
//! them.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::support::{Hoard, files_under};

fn stats(ccache_dir: &Path) -> HashMap<String, u64> {
    let out = Command::new("ccache")
        .arg("--print-stats")
        .env("CCACHE_DIR", ccache_dir)
        .output()
        .expect("ccache is missing: the README's test command installs Debian's ccache");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Compiles every `.c` file under `src` through ccache with `ccache_dir`
/// as its local cache and hoard as its remote storage.
fn build(src: &Path, ccache_dir: &Path, remote: &str) {
    for i in 0..40 {
        let st = Command::new("ccache")
            .args(["gcc", "-O1", "-c"])
            .arg(src.join(format!("unit{i}.c")))
            .arg("-o")
            .arg(src.join(format!("unit{i}.o")))
            .env("CCACHE_DIR", ccache_dir)
            .env("CCACHE_REMOTE_STORAGE", remote)
            .env("CCACHE_BASEDIR", src)
            .status()
            .expect("running ccache gcc");
        assert!(st.success(), "compiling unit{i}.c");
    }
}

#[test]
fn ccache_gets_every_result_from_hoard_after_its_local_cache_is_wiped() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start(
        &tmp.path().join("cache"),
        &["--disable_http_ac_validation=true"],
    );
    h.wait_ready();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40 {
        std::fs::write(
            src.join(format!("unit{i}.c")),
            format!(
                "#include <string.h>\nint unit{i}(const char *s) {{ return (int)strlen(s) * {i} + {}; }}\n",
                i * 7 + 3
            ),
        )
        .unwrap();
    }
    let remote = format!("http://{}|layout=bazel", h.addr);
    let cold = tmp.path().join("ccache-cold");
    build(&src, &cold, &remote);
    let s = stats(&cold);
    println!(
        "ccache cold: {} remote writes, {} remote misses, {} remote errors",
        s["remote_storage_write"], s["remote_storage_miss"], s["remote_storage_error"]
    );
    assert_eq!(s["remote_storage_error"], 0, "{s:?}");
    assert!(s["remote_storage_write"] >= 40, "{s:?}");

    // A fresh machine: no local cache at all.
    let warm = tmp.path().join("ccache-warm");
    build(&src, &warm, &remote);
    let s = stats(&warm);
    println!(
        "ccache warm: {} of 40 compilations were remote hits ({} misses, {} errors)",
        s["remote_storage_hit"], s["remote_storage_miss"], s["remote_storage_error"]
    );
    assert_eq!(s["remote_storage_hit"], 40, "{s:?}");
    assert_eq!(s["remote_storage_error"], 0, "{s:?}");
    // ccache's bytes are raw entries, not action results.
    let files = files_under(&h.dir);
    assert!(files.iter().any(|f| f.starts_with("raw.v2/")), "{files:?}");
    assert!(!files.iter().any(|f| f.starts_with("ac.v2/")), "{files:?}");
}

#[test]
fn raw_entries_are_invisible_to_grpc_and_refused_without_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let key = crate::support::sha256_hex(b"a ccache key");
    let body = b"not an ActionResult at all \xff\xfe";
    // Without the setting: /ac/ bodies must be ActionResults.
    let strict = Hoard::start(&tmp.path().join("strict"), &[]);
    strict.wait_ready();
    let r = strict.put(&format!("/ac/{key}"), body);
    assert_eq!(r.status, 400, "{}", r.text());
    drop(strict);

    // With it, and a bucket: stored raw, uploaded like any blob under
    // bazel-remote's `raw/` key.
    let (_moto, bucket) = crate::upload::moto_with_bucket("raw");
    let mut args: Vec<String> = crate::upload::s3_args(&_moto.endpoint(), "raw", "host-raw")
        .into_iter()
        .filter(|a| !a.starts_with("--grpc_address"))
        .collect();
    args.push("--disable_http_ac_validation=true".into());
    let h = crate::upload::start(&tmp.path().join("raw"), &args);
    assert_eq!(h.put(&format!("/ac/{key}"), body).status, 200);
    let o = crate::upload::drained(&h);
    assert_eq!(crate::upload::count(&o, "raw", "created"), 1.0, "{o:?}");
    let raw_key = format!("raw/{}/{key}", &key[..2]);
    assert!(
        bucket.objects().contains_key(&raw_key),
        "{:?}",
        bucket.objects()
    );
    let r = h.get(&format!("/ac/{key}"));
    assert_eq!((r.status, &r.body[..]), (200, &body[..]));
    assert_eq!(
        h.request("HEAD", &format!("/ac/{key}"), &[], b"")
            .header("content-length"),
        Some(body.len().to_string().as_str())
    );
    // gRPC's action cache never sees it.
    let found = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut ac =
                hoard_proto::reapi::action_cache_client::ActionCacheClient::new(h.channel().await);
            ac.get_action_result(hoard_proto::reapi::GetActionResultRequest {
                action_digest: Some(hoard_proto::reapi::Digest {
                    hash: key.clone(),
                    size_bytes: 12,
                }),
                ..Default::default()
            })
            .await
        });
    assert_eq!(found.unwrap_err().code(), tonic::Code::NotFound);
}
