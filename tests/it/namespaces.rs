//! Namespaces as operators configure them: per-namespace quotas, and what
//! instance names select (`namespaces.instance_names`, bazel-remote's
//! `enable_ac_key_instance_mangling`).

use hoard_proto::prost::Message;
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};

use crate::grpc::{digest, rt};
use crate::support::{Hoard, files_under, noise, sha256_hex};
use crate::upload::metric;

fn status(h: &Hoard) -> serde_json::Value {
    serde_json::from_slice(&h.get("/status").body).unwrap()
}

fn figures(h: &Hoard, name: &str) -> serde_json::Value {
    status(h)["NamespaceStats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["Name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no figures for {name:?}"))
}

#[test]
fn a_namespace_filling_far_past_its_quota_costs_another_no_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = tmp.path().join("hoard.yaml");
    // 2 MiB for every namespace; "roomy" gets 8 MiB. max_size (1 GiB)
    // is far away: only the quotas evict.
    std::fs::write(
        &yaml,
        "namespaces:\n  max_size: 0.001953125\n  max_size_overrides:\n    roomy: 0.0078125\n",
    )
    .unwrap();
    let h = Hoard::start(
        &tmp.path().join("cache"),
        &[&format!("--config_file={}", yaml.display()), "--max_size=1"],
    );
    h.wait_ready();
    // The quiet tenant writes first, so its entries are the least recently
    // used of the whole cache, over HTTP and gRPC.
    let quiet: Vec<Vec<u8>> = (0..20).map(|i| noise(40_000, 500 + i)).collect();
    for b in &quiet[..10] {
        assert_eq!(
            h.put(&format!("/quiet/cas/{}", sha256_hex(b)), b).status,
            200
        );
    }
    let rt = rt();
    let ch = rt.block_on(h.channel());
    let mut cas = ContentAddressableStorageClient::new(ch.clone());
    let mut batch_put = |instance: &str, b: &[u8]| {
        let req = hoard_proto::reapi::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: vec![hoard_proto::reapi::batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: b.to_vec().into(),
                compressor: 0,
            }],
            ..Default::default()
        };
        let r = rt
            .block_on(cas.batch_update_blobs(req))
            .unwrap()
            .into_inner();
        assert_eq!(r.responses[0].status.as_ref().unwrap().code, 0);
    };
    for b in &quiet[10..] {
        batch_put("quiet", b);
    }
    // The noisy tenant writes 20 MiB, ten times its quota, both ways.
    for i in 0..500u64 {
        let b = noise(40_000, 10_000 + i);
        if i % 2 == 0 {
            assert_eq!(
                h.put(&format!("/noisy/cas/{}", sha256_hex(&b)), &b).status,
                200
            );
        } else {
            batch_put("noisy", &b);
        }
    }
    for i in 0..150u64 {
        let b = noise(40_000, 50_000 + i);
        assert_eq!(
            h.put(&format!("/roomy/cas/{}", sha256_hex(&b)), &b).status,
            200
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while figures(&h, "noisy")["CurrSize"].as_u64().unwrap() > 2 << 20
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (noisy, roomy, q) = (
        figures(&h, "noisy"),
        figures(&h, "roomy"),
        figures(&h, "quiet"),
    );
    eprintln!("quotas: noisy {noisy}, roomy {roomy}, quiet {q}");
    assert!(noisy["CurrSize"].as_u64().unwrap() <= 2 << 20, "{noisy}");
    assert_eq!(noisy["MaxSize"].as_u64(), Some(2 << 20));
    assert!(
        noisy["EvictedBytes"].as_u64().unwrap() >= 15 << 20,
        "{noisy}"
    );
    assert!(roomy["CurrSize"].as_u64().unwrap() <= 8 << 20, "{roomy}");
    assert!(roomy["CurrSize"].as_u64().unwrap() > 2 << 20, "{roomy}");
    assert_eq!(q["NumFiles"], 20, "{q}");
    assert_eq!(q["EvictedBytes"], 0, "{q}");
    // Every quiet entry is still served, over both front ends.
    for b in &quiet {
        let r = h.get(&format!("/quiet/cas/{}", sha256_hex(b)));
        assert_eq!(r.status, 200);
        assert_eq!(&r.body, b);
    }
    let missing = rt
        .block_on(cas.find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "quiet".into(),
            blob_digests: quiet.iter().map(|b| digest(b)).collect(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(missing.missing_blob_digests.is_empty());
    // The figures are in /metrics too.
    let evicted = metric(&h, "hoard_namespace_evicted_bytes_total");
    assert!(evicted["{namespace=\"noisy\"}"] >= (15 << 20) as f64);
    assert_eq!(evicted["{namespace=\"quiet\"}"], 0.0);
    assert_eq!(
        metric(&h, "hoard_namespace_quota_bytes")["{namespace=\"roomy\"}"],
        (8 << 20) as f64
    );
    // A blob larger than a quota is refused before its body is read.
    let huge = noise(3 << 20, 1);
    let r = h.put(&format!("/noisy/cas/{}", sha256_hex(&huge)), &huge);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("quota"), "{}", r.text());
}

fn result_naming(out: &[u8]) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out/x".into(),
            digest: Some(digest(out)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// bazel-remote's mangled action key: hex(sha256(hex key || instance)).
fn mangled(key: &str, instance: &str) -> String {
    sha256_hex(format!("{key}{instance}").as_bytes())
}

#[test]
fn instance_names_isolate_mangle_or_are_ignored_as_configured() {
    let out = noise(5000, 3);
    let ar = result_naming(&out);
    let key = sha256_hex(b"the action");
    let cas_path = |instance: &str| format!("{instance}/cas/{}", sha256_hex(&out));
    let rt = rt();
    for mode in ["mangle_ac", "ignore", "isolate", "legacy"] {
        let tmp = tempfile::tempdir().unwrap();
        let args: Vec<String> = match mode {
            "legacy" => vec!["--enable_ac_key_instance_mangling=true".into()],
            m => vec![format!("--namespaces.instance_names={m}")],
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let h = Hoard::start(&tmp.path().join("cache"), &args);
        h.wait_ready();
        // One output, written through instance "a" over HTTP; the action
        // result of "a" over HTTP, the one of "b" over gRPC.
        assert_eq!(h.put(&format!("/{}", cas_path("a")), &out).status, 200);
        assert_eq!(
            h.put(&format!("/a/ac/{key}"), &ar.encode_to_vec()).status,
            200
        );
        let ch = rt.block_on(h.channel());
        let mut ac = ActionCacheClient::new(ch.clone());
        let get = |ac: &mut ActionCacheClient<_>, instance: &str| {
            rt.block_on(ac.get_action_result(GetActionResultRequest {
                instance_name: instance.into(),
                action_digest: Some(hoard_proto::reapi::Digest {
                    hash: key.clone(),
                    size_bytes: 10,
                }),
                ..Default::default()
            }))
            .map(|r| r.into_inner())
            .map_err(|s| s.code())
        };
        let files = files_under(&h.dir);
        let has = |prefix: &str, name: &str| {
            files
                .iter()
                .any(|f| f.starts_with(prefix) && f.contains(name))
        };
        let out_hex = sha256_hex(&out);
        match mode {
            "mangle_ac" | "legacy" => {
                // bazel-remote's layout: the default namespace, the
                // action result under the mangled key, one shared CAS.
                assert!(has("ac.v2/", &mangled(&key, "a")), "{files:?}");
                assert!(!has("ac.v2/", &key), "{files:?}");
                assert!(has("cas.v2/", &out_hex), "{files:?}");
                assert!(!files.iter().any(|f| f.starts_with("ns.v1/")), "{files:?}");
                assert_eq!(get(&mut ac, "a"), Ok(ar.clone()));
                assert_eq!(get(&mut ac, "b"), Err(tonic::Code::NotFound));
                assert_eq!(h.get(&format!("/b/ac/{key}")).status, 404);
                // The CAS is shared: "b" sees the output.
                assert_eq!(h.get(&format!("/{}", cas_path("b"))).status, 200);
                // An entry without an instance is stored under its own key.
                rt.block_on(ac.update_action_result(UpdateActionResultRequest {
                    action_digest: Some(hoard_proto::reapi::Digest {
                        hash: key.clone(),
                        size_bytes: 10,
                    }),
                    action_result: Some(ar.clone()),
                    ..Default::default()
                }))
                .unwrap();
                assert_eq!(h.get(&format!("/ac/{key}")).status, 200);
                assert_eq!(h.get(&format!("/b/ac/{key}")).status, 404);
            }
            "ignore" => {
                assert!(has("ac.v2/", &key), "{files:?}");
                assert!(!files.iter().any(|f| f.starts_with("ns.v1/")), "{files:?}");
                assert_eq!(get(&mut ac, "b"), Ok(ar.clone()));
                assert_eq!(get(&mut ac, ""), Ok(ar.clone()));
                assert_eq!(h.get(&format!("/zzz/ac/{key}")).status, 200);
            }
            _ => {
                assert!(has("ns.v1/a/ac.v2/", &key), "{files:?}");
                assert_eq!(get(&mut ac, "a"), Ok(ar.clone()));
                assert_eq!(get(&mut ac, "b"), Err(tonic::Code::NotFound));
                assert_eq!(h.get(&format!("/{}", cas_path("b"))).status, 404);
            }
        }
    }
    // The two spellings may not contradict each other.
    let tmp = tempfile::tempdir().unwrap();
    let e = Hoard::try_start(
        &tmp.path().join("cache"),
        &[
            "--enable_ac_key_instance_mangling=true",
            "--namespaces.instance_names=isolate",
        ],
    )
    .err()
    .expect("a contradiction is refused");
    assert!(e.contains("enable_ac_key_instance_mangling"), "{e}");
}
