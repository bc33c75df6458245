//! Authentication over both front ends: every method, with no credentials,
//! a wrong password, an unknown user and a valid user, with and without
//! `allow_unauthenticated_reads`. Every refused attempt gets the right
//! status and stores nothing; every allowed one works.

// tonic::Status is large; the matrix passes it around as is.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::capabilities_client::CapabilitiesClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetActionResultRequest, GetCapabilitiesRequest, GetTreeRequest, UpdateActionResultRequest,
    batch_update_blobs_request,
};
use tonic::Code;

use crate::bazel::htpasswd_file;
use crate::grpc::{digest, rt};
use crate::support::{Hoard, sha256_hex};

/// `Authorization` values for the credential cases.
fn cases() -> Vec<(&'static str, Option<String>)> {
    let b64 = |s: &str| {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    vec![
        ("no credentials", None),
        ("wrong password", Some(b64("ann:nope"))),
        ("unknown user", Some(b64("zed:pw-ann"))),
        ("valid user", Some(b64("ann:pw-ann"))),
    ]
}

fn start(dir: &std::path::Path, open_reads: bool) -> Hoard {
    let pw = dir.join("htpasswd");
    htpasswd_file(&pw, &[("ann", "pw-ann"), ("bob", "pw-bob")]);
    let mut args = vec![format!("--htpasswd_file={}", pw.display())];
    if open_reads {
        args.push("--allow_unauthenticated_reads=true".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Hoard::start(&dir.join("cache"), &args);
    h.wait_ready();
    h
}

#[test]
fn http_requests_need_credentials_and_refused_writes_store_nothing() {
    let mut attempts = 0;
    let mut refused = 0;
    for open_reads in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let h = start(tmp.path(), open_reads);
        let blob = format!("blob for open_reads={open_reads}").into_bytes();
        let hx = sha256_hex(&blob);
        let ar = hoard_proto::prost::Message::encode_to_vec(&ActionResult::default());
        let ahx = sha256_hex(b"action");
        for (who, auth) in cases() {
            let valid = who == "valid user";
            let headers = |extra: &[(&'static str, String)]| {
                let mut v: Vec<(&str, String)> = extra.to_vec();
                if let Some(a) = &auth {
                    v.push(("Authorization", a.clone()));
                }
                v
            };
            let ops: Vec<(&str, &str, String, Vec<u8>, bool)> = vec![
                ("PUT", "cas", format!("/cas/{hx}"), blob.clone(), true),
                ("PUT", "ac", format!("/ac/{ahx}"), ar.clone(), true),
                ("GET", "cas", format!("/cas/{hx}"), vec![], false),
                ("HEAD", "cas", format!("/cas/{hx}"), vec![], false),
                ("GET", "ac", format!("/ac/{ahx}"), vec![], false),
                ("HEAD", "ac", format!("/ac/{ahx}"), vec![], false),
                ("GET", "status", "/status".into(), vec![], false),
                ("GET", "metrics", "/metrics".into(), vec![], false),
            ];
            for (method, what, path, body, write) in ops {
                let len = body.len().to_string();
                let hs = headers(&[("Content-Length", len)]);
                let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let r = h.request(method, &path, &hs, &body);
                attempts += 1;
                let allowed = valid || (auth.is_none() && open_reads && !write);
                if allowed {
                    assert!(
                        r.status == 200 || r.status == 404,
                        "{who}, open_reads={open_reads}: {method} {what} got {}",
                        r.status
                    );
                } else {
                    refused += 1;
                    assert_eq!(
                        r.status, 401,
                        "{who}, open_reads={open_reads}: {method} {what}"
                    );
                    if method != "HEAD" {
                        assert_eq!(
                            r.header("www-authenticate"),
                            Some("Basic realm=\"hoard\""),
                            "{method} {what}"
                        );
                    }
                }
            }
            // What a refused PUT sent was not stored: only the valid user's
            // PUTs (the last case) may have stored anything.
            if !valid {
                let auth = cases().pop().unwrap().1.unwrap();
                let r = h.request(
                    "GET",
                    &format!("/cas/{hx}"),
                    &[("Authorization", &auth)],
                    b"",
                );
                assert_eq!(r.status, 404, "{who}: a refused PUT stored the blob");
            }
        }
        // Probes stay open.
        assert_eq!(h.get("/healthz").status, 200);
        assert_eq!(h.get("/readyz").status, 200);
    }
    println!(
        "HTTP auth matrix: {attempts} attempts, {refused} refused with 401, {} allowed",
        attempts - refused
    );
}

/// A tonic request carrying `auth` as the authorization metadata.
fn with<T>(msg: T, auth: &Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", a.parse().unwrap());
    }
    r
}

#[test]
fn every_grpc_method_needs_credentials_and_refused_writes_store_nothing() {
    let runtime = rt();
    let mut attempts = 0;
    let mut refused = 0;
    for open_reads in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let h = start(tmp.path(), open_reads);
        let ch = runtime.block_on(h.channel());
        for (i, (who, auth)) in cases().into_iter().enumerate() {
            let valid = who == "valid user";
            let data = format!("grpc blob {who} {open_reads}").into_bytes();
            let d = digest(&data);
            let upload = format!(
                "uploads/{:08x}-0000-4000-8000-000000000000/blobs/{}/{}",
                i, d.hash, d.size_bytes
            );
            let results: Vec<(&str, bool, Result<(), tonic::Status>)> = runtime.block_on(async {
                let mut cas = ContentAddressableStorageClient::new(ch.clone());
                let mut ac = ActionCacheClient::new(ch.clone());
                let mut bs = ByteStreamClient::new(ch.clone());
                let mut caps = CapabilitiesClient::new(ch.clone());
                let ok = |r: Result<(), tonic::Status>| match r {
                    Err(s) if s.code() == Code::NotFound => Ok(()),
                    other => other,
                };
                vec![
                    (
                        "GetCapabilities",
                        false,
                        caps.get_capabilities(with(GetCapabilitiesRequest::default(), &auth))
                            .await
                            .map(|_| ()),
                    ),
                    (
                        "FindMissingBlobs",
                        false,
                        cas.find_missing_blobs(with(
                            FindMissingBlobsRequest {
                                blob_digests: vec![d.clone()],
                                ..Default::default()
                            },
                            &auth,
                        ))
                        .await
                        .map(|_| ()),
                    ),
                    (
                        "BatchReadBlobs",
                        false,
                        cas.batch_read_blobs(with(
                            BatchReadBlobsRequest {
                                digests: vec![d.clone()],
                                ..Default::default()
                            },
                            &auth,
                        ))
                        .await
                        .map(|_| ()),
                    ),
                    (
                        "GetTree",
                        false,
                        ok(cas
                            .get_tree(with(
                                GetTreeRequest {
                                    root_digest: Some(d.clone()),
                                    ..Default::default()
                                },
                                &auth,
                            ))
                            .await
                            .map(|_| ())),
                    ),
                    (
                        "GetActionResult",
                        false,
                        ok(ac
                            .get_action_result(with(
                                GetActionResultRequest {
                                    action_digest: Some(d.clone()),
                                    ..Default::default()
                                },
                                &auth,
                            ))
                            .await
                            .map(|_| ())),
                    ),
                    (
                        "Read",
                        false,
                        match bs
                            .read(with(
                                ReadRequest {
                                    resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
                                    ..Default::default()
                                },
                                &auth,
                            ))
                            .await
                        {
                            Err(s) => ok(Err(s)),
                            Ok(r) => ok(r.into_inner().message().await.map(|_| ())),
                        },
                    ),
                    (
                        "QueryWriteStatus",
                        false,
                        bs.query_write_status(with(
                            QueryWriteStatusRequest {
                                resource_name: upload.clone(),
                            },
                            &auth,
                        ))
                        .await
                        .map(|_| ()),
                    ),
                    (
                        "BatchUpdateBlobs",
                        true,
                        cas.batch_update_blobs(with(
                            BatchUpdateBlobsRequest {
                                requests: vec![batch_update_blobs_request::Request {
                                    digest: Some(d.clone()),
                                    data: Bytes::from(data.clone()),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            },
                            &auth,
                        ))
                        .await
                        .map(|_| ()),
                    ),
                    (
                        "Write",
                        true,
                        bs.write(with(
                            futures_util::stream::iter([WriteRequest {
                                resource_name: upload.clone(),
                                write_offset: 0,
                                finish_write: true,
                                data: Bytes::from(data.clone()),
                            }]),
                            &auth,
                        ))
                        .await
                        .map(|_| ()),
                    ),
                    (
                        "UpdateActionResult",
                        true,
                        ac.update_action_result(with(
                            UpdateActionResultRequest {
                                action_digest: Some(digest(who.as_bytes())),
                                action_result: Some(ActionResult::default()),
                                ..Default::default()
                            },
                            &auth,
                        ))
                        .await
                        .map(|_| ()),
                    ),
                ]
            });
            for (method, write, r) in results {
                attempts += 1;
                let allowed = valid || (auth.is_none() && open_reads && !write);
                if allowed {
                    assert!(r.is_ok(), "{who}, open_reads={open_reads}: {method}: {r:?}");
                } else {
                    refused += 1;
                    let code = r.err().map(|s| s.code());
                    assert_eq!(
                        code,
                        Some(Code::Unauthenticated),
                        "{who}, open_reads={open_reads}: {method}"
                    );
                }
            }
            // Nothing a refused write sent was stored.
            if !valid {
                let r = h.request(
                    "GET",
                    &format!("/cas/{}", d.hash),
                    &[("Authorization", cases().pop().unwrap().1.unwrap().as_str())],
                    b"",
                );
                assert_eq!(r.status, 404, "{who}: a refused gRPC write stored the blob");
            }
        }
        // Health stays open.
        let r = runtime.block_on(async {
            tonic_health::pb::health_client::HealthClient::new(ch.clone())
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
        });
        assert!(r.is_ok(), "{r:?}");
    }
    println!(
        "gRPC auth matrix: {attempts} attempts, {refused} refused with UNAUTHENTICATED, {} allowed",
        attempts - refused
    );
}

#[test]
fn an_htpasswd_file_with_a_non_bcrypt_entry_is_refused_at_start_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("htpasswd");
    htpasswd_file(&pw, &[("ann", "pw")]);
    let mut text = std::fs::read_to_string(&pw).unwrap();
    text.push_str("old:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n");
    std::fs::write(&pw, text).unwrap();
    let r = Hoard::try_start(
        &tmp.path().join("cache"),
        &[&format!("--htpasswd_file={}", pw.display())],
    );
    let e = r.err().expect("hoard started with a SHA entry");
    assert!(e.contains("line 2") && e.contains("bcrypt"), "{e}");
    assert!(!e.contains("W6ph5"), "the error shows the hash: {e}");
}

#[test]
fn bound_identities_use_only_their_own_namespace() {
    use base64::Engine as _;
    let basic = |u: &str, p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    let (ann, bob) = (basic("ann", "pw-ann"), basic("bob", "pw-bob"));
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("htpasswd");
    htpasswd_file(&pw, &[("ann", "pw-ann"), ("bob", "pw-bob")]);
    let h = Hoard::start(
        &tmp.path().join("cache"),
        &[
            &format!("--htpasswd_file={}", pw.display()),
            "--allow_unauthenticated_reads=true",
            "--namespaces.bind_to_identity=true",
        ],
    );
    h.wait_ready();
    let blob = b"ann's output".to_vec();
    let hx = sha256_hex(&blob);
    let len = blob.len().to_string();
    let put = |path: &str, auth: &str| {
        h.request(
            "PUT",
            path,
            &[("Authorization", auth), ("Content-Length", &len)],
            &blob,
        )
        .status
    };
    let get = |path: &str, auth: Option<&str>| {
        let hs: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        h.request("GET", path, &hs, b"").status
    };
    let mut table = Vec::new();
    let mut check = |what: &str, got: u16, want: u16| {
        table.push(format!("{what}: {got}"));
        assert_eq!(got, want, "{what}");
    };
    check(
        "ann PUT /cas (her namespace)",
        put(&format!("/cas/{hx}"), &ann),
        200,
    );
    check(
        "ann PUT /ann/cas (named, hers)",
        put(&format!("/ann/cas/{hx}"), &ann),
        200,
    );
    check("ann GET /cas", get(&format!("/cas/{hx}"), Some(&ann)), 200);
    check(
        "bob GET /cas (his own: empty)",
        get(&format!("/cas/{hx}"), Some(&bob)),
        404,
    );
    check(
        "bob GET /ann/cas",
        get(&format!("/ann/cas/{hx}"), Some(&bob)),
        403,
    );
    check(
        "bob PUT /ann/cas",
        put(&format!("/ann/cas/{hx}"), &bob),
        403,
    );
    check(
        "anonymous GET /cas (default namespace)",
        get(&format!("/cas/{hx}"), None),
        404,
    );
    check(
        "anonymous GET /ann/cas",
        get(&format!("/ann/cas/{hx}"), None),
        403,
    );
    // bob's refused PUT into ann's namespace stored nothing of bob's; ann's
    // entry is untouched.
    check(
        "ann GET /ann/cas after bob's attempt",
        get(&format!("/ann/cas/{hx}"), Some(&ann)),
        200,
    );
    // /status shows bob only his own namespace.
    let r = h.request("GET", "/status", &[("Authorization", &bob)], b"");
    let status: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let names = status["Namespaces"].as_array().unwrap().clone();
    assert!(names.iter().all(|n| n == "bob"), "bob sees {names:?}");
    let figures = status["NamespaceStats"].as_array().unwrap().clone();
    assert!(
        figures.iter().all(|n| n["Name"] == "bob"),
        "bob sees {figures:?}"
    );
    let r = h.request("GET", "/status", &[("Authorization", &ann)], b"");
    let status: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let figures = status["NamespaceStats"].as_array().unwrap().clone();
    assert_eq!(figures.len(), 1, "ann sees {figures:?}");
    assert_eq!(figures[0]["Name"], "ann");
    assert_eq!(figures[0]["NumFiles"], 1);
    // /metrics: per-namespace series only for the caller's namespace.
    let metrics = |auth: Option<&str>| {
        let hs: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        h.request("GET", "/metrics", &hs, b"").text()
    };
    let m = metrics(Some(&ann));
    assert!(
        m.contains("hoard_namespace_entries{namespace=\"ann\"} 1"),
        "{m}"
    );
    for (who, text) in [("bob", metrics(Some(&bob))), ("anonymous", metrics(None))] {
        assert!(
            !text.contains("namespace=\"ann\""),
            "{who} sees ann's figures"
        );
        assert!(text.contains("bazel_remote_disk_cache_size_bytes"), "{who}");
    }
    // gRPC: the instance name and the resource name are checked the same way.
    let runtime = rt();
    runtime.block_on(async {
        let ch = h.channel().await;
        let auth = |who: &str| {
            if who == "ann" {
                Some(ann.clone())
            } else {
                Some(bob.clone())
            }
        };
        let d = digest(&blob);
        let r = ContentAddressableStorageClient::new(ch.clone())
            .find_missing_blobs(with(
                FindMissingBlobsRequest {
                    instance_name: "ann".into(),
                    blob_digests: vec![d.clone()],
                    ..Default::default()
                },
                &auth("bob"),
            ))
            .await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
        let r = ContentAddressableStorageClient::new(ch.clone())
            .find_missing_blobs(with(
                FindMissingBlobsRequest {
                    instance_name: String::new(),
                    blob_digests: vec![d.clone()],
                    ..Default::default()
                },
                &auth("ann"),
            ))
            .await
            .unwrap();
        assert!(
            r.get_ref().missing_blob_digests.is_empty(),
            "ann's blob is in her namespace"
        );
        let r = ByteStreamClient::new(ch.clone())
            .read(with(
                ReadRequest {
                    resource_name: format!("ann/blobs/{}/{}", d.hash, d.size_bytes),
                    ..Default::default()
                },
                &auth("bob"),
            ))
            .await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
        let r = ActionCacheClient::new(ch.clone())
            .update_action_result(with(
                UpdateActionResultRequest {
                    instance_name: "ann".into(),
                    action_digest: Some(digest(b"poison")),
                    action_result: Some(ActionResult::default()),
                    ..Default::default()
                },
                &auth("bob"),
            ))
            .await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    });
    println!(
        "bound identities: {}; gRPC: another's instance and resource names PERMISSION_DENIED",
        table.join("; ")
    );
}
