//! The gRPC API through a real connection: REAPI v2 and ByteStream as Bazel
//! and other clients use them, and the bad inputs they must survive.

use bytes::Bytes;
use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use hoard_proto::prost::Message;
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::capabilities_client::CapabilitiesClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode,
    FileNode, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    GetTreeRequest, OutputFile, UpdateActionResultRequest, batch_update_blobs_request, compressor,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Hoard, noise, sha256_hex};

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) fn digest(data: &[u8]) -> Digest {
    Digest {
        hash: sha256_hex(data),
        size_bytes: data.len() as i64,
    }
}

fn start(extra: &[&str]) -> (tempfile::TempDir, Hoard) {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(&dir.path().join("cache"), extra);
    h.wait_ready();
    (dir, h)
}

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

async fn write(
    ch: &Channel,
    resource: &str,
    data: &[u8],
    chunk: usize,
) -> Result<i64, tonic::Status> {
    let mut reqs = Vec::new();
    let mut off = 0;
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(chunk).collect()
    };
    let n = pieces.len();
    for (i, p) in pieces.into_iter().enumerate() {
        reqs.push(WriteRequest {
            resource_name: if i == 0 {
                resource.to_string()
            } else {
                String::new()
            },
            write_offset: off,
            finish_write: i + 1 == n,
            data: Bytes::copy_from_slice(p),
        });
        off += p.len() as i64;
    }
    ByteStreamClient::new(ch.clone())
        .write(futures_util::stream::iter(reqs))
        .await
        .map(|r| r.into_inner().committed_size)
}

async fn read(
    ch: &Channel,
    resource: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = ByteStreamClient::new(ch.clone())
        .read(ReadRequest {
            resource_name: resource.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

#[test]
fn capabilities_advertise_what_is_enforced() {
    let (_d, h) = start(&["--max_blob_size=100000000"]);
    rt().block_on(async {
        let caps = CapabilitiesClient::new(h.channel().await)
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let c = caps.cache_capabilities.unwrap();
        assert_eq!(c.digest_functions, vec![1]); // SHA256
        assert!(c.action_cache_update_capabilities.unwrap().update_enabled);
        assert_eq!(c.max_batch_total_size_bytes, 4 << 20);
        assert_eq!(
            c.supported_compressors,
            vec![compressor::Value::Zstd as i32]
        );
        assert_eq!(
            c.supported_batch_update_compressors,
            vec![compressor::Value::Zstd as i32]
        );
        assert_eq!(c.max_cas_blob_size_bytes, 100_000_000);
        let (lo, hi) = (
            caps.low_api_version.unwrap(),
            caps.high_api_version.unwrap(),
        );
        assert_eq!((lo.major, lo.minor, hi.major, hi.minor), (2, 0, 2, 3));

        // The advertised limit is the enforced one.
        let ch = h.channel().await;
        let mut cas = ContentAddressableStorageClient::new(ch.clone());
        let big = noise((4 << 20) + 1, 1);
        let err = cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(digest(&big)),
                    data: big.clone().into(),
                    compressor: 0,
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(
            err.message().contains("max_batch_total_size_bytes"),
            "{err}"
        );
        let err = cas
            .batch_read_blobs(BatchReadBlobsRequest {
                digests: vec![digest(&big)],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, 1); // SERVING
    });
}

#[test]
fn bytestream_round_trips_plain_and_zstd_with_offsets_and_interops_with_http() {
    let (_d, h) = start(&[]);
    rt().block_on(async {
        let ch = h.channel().await;
        let blob = noise(3 * (1 << 20) + 777, 2); // four casblob chunks
        let hx = sha256_hex(&blob);
        let size = blob.len();
        let res = format!("uploads/{}/blobs/{hx}/{size}", uuid(1));
        assert_eq!(
            write(&ch, &res, &blob, 16 * 1024).await.unwrap(),
            size as i64
        );
        let rname = format!("blobs/{hx}/{size}");
        assert_eq!(read(&ch, &rname, 0, 0).await.unwrap(), blob);
        assert_eq!(
            read(&ch, &rname, 1000, 5000).await.unwrap(),
            &blob[1000..6000]
        );
        assert_eq!(read(&ch, &rname, size as i64, 0).await.unwrap(), b"");
        // Compressed reads: whole, from a chunk boundary, from mid-chunk.
        let cname = format!("compressed-blobs/zstd/{hx}/{size}");
        for off in [0usize, 1 << 20, (1 << 20) + 12345] {
            let z = read(&ch, &cname, off as i64, 0).await.unwrap();
            assert_eq!(
                zstd::decode_all(&z[..]).unwrap(),
                &blob[off..],
                "offset {off}"
            );
        }
        let err = read(&ch, &cname, 0, 10).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = read(&ch, &rname, size as i64 + 1, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
        // A wrong size is a different digest: not found.
        let err = read(&ch, &format!("blobs/{hx}/{}", size - 1), 0, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);

        // Compressed upload, read back over HTTP.
        let text = b"compressible text ".repeat(50_000);
        let tx = sha256_hex(&text);
        let z = zstd::encode_all(&text[..], 3).unwrap();
        let res = format!(
            "uploads/{}/compressed-blobs/zstd/{tx}/{}",
            uuid(2),
            text.len()
        );
        assert_eq!(
            write(&ch, &res, &z, 16 * 1024).await.unwrap(),
            z.len() as i64
        );
        assert_eq!(h.get(&format!("/cas/{tx}")).body, text);
        // Written again: returns early, whatever was sent.
        assert_eq!(write(&ch, &res, &z[..100], 100).await.unwrap(), -1);

        // HTTP upload, read over gRPC; a namespace is the same on both.
        let small = b"put over http".to_vec();
        assert_eq!(
            h.put(&format!("/team/cas/{}", sha256_hex(&small)), &small)
                .status,
            200
        );
        let name = format!("team/blobs/{}/{}", sha256_hex(&small), small.len());
        assert_eq!(read(&ch, &name, 0, 0).await.unwrap(), small);
        assert_eq!(
            read(
                &ch,
                &format!("blobs/{}/{}", sha256_hex(&small), small.len()),
                0,
                0
            )
            .await
            .unwrap_err()
            .code(),
            Code::NotFound
        );

        // The empty blob exists in every form.
        let e = sha256_hex(b"");
        assert_eq!(read(&ch, &format!("blobs/{e}/0"), 0, 0).await.unwrap(), b"");
        let z = read(&ch, &format!("compressed-blobs/zstd/{e}/0"), 0, 0)
            .await
            .unwrap();
        assert_eq!(zstd::decode_all(&z[..]).unwrap(), b"");
    });
}

#[test]
fn an_interrupted_write_resumes_from_query_write_status_and_commits_nothing_before() {
    let (_d, h) = start(&[]);
    rt().block_on(async {
        let ch = h.channel().await;
        let blob = noise(3 << 20, 3);
        let hx = sha256_hex(&blob);
        let res = format!("uploads/{}/blobs/{hx}/{}", uuid(3), blob.len());
        let half = 1_500_000usize;
        // First attempt: the stream ends without finish_write.
        let reqs = vec![
            WriteRequest {
                resource_name: res.clone(),
                write_offset: 0,
                finish_write: false,
                data: Bytes::copy_from_slice(&blob[..1_000_000]),
            },
            WriteRequest {
                resource_name: String::new(),
                write_offset: 1_000_000,
                finish_write: false,
                data: Bytes::copy_from_slice(&blob[1_000_000..half]),
            },
        ];
        let r = ByteStreamClient::new(ch.clone())
            .write(futures_util::stream::iter(reqs))
            .await
            .unwrap();
        assert_eq!(r.into_inner().committed_size, half as i64);
        // Nothing is visible yet.
        assert_eq!(h.get(&format!("/cas/{hx}")).status, 404);
        let mut bs = ByteStreamClient::new(ch.clone());
        let q = bs
            .query_write_status(QueryWriteStatusRequest {
                resource_name: res.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((q.committed_size, q.complete), (half as i64, false));
        // A non-contiguous offset is refused and changes nothing.
        let bad = vec![WriteRequest {
            resource_name: res.clone(),
            write_offset: 10,
            finish_write: true,
            data: Bytes::from_static(b"x"),
        }];
        let err = bs.write(futures_util::stream::iter(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(
            err.message().contains("not contiguous") || err.message().contains("write_offset"),
            "{err}"
        );
        // Resume from the committed size.
        let rest = vec![WriteRequest {
            resource_name: res.clone(),
            write_offset: half as i64,
            finish_write: true,
            data: Bytes::copy_from_slice(&blob[half..]),
        }];
        let r = bs.write(futures_util::stream::iter(rest)).await.unwrap();
        assert_eq!(r.into_inner().committed_size, blob.len() as i64);
        assert_eq!(h.get(&format!("/cas/{hx}")).body, blob);
        let q = bs
            .query_write_status(QueryWriteStatusRequest { resource_name: res })
            .await
            .unwrap()
            .into_inner();
        assert!(q.complete);
    });
}

#[test]
fn a_cancelled_write_commits_nothing() {
    let (_d, h) = start(&[]);
    rt().block_on(async {
        let ch = h.channel().await;
        let blob = noise(2 << 20, 4);
        let hx = sha256_hex(&blob);
        let res = format!("uploads/{}/blobs/{hx}/{}", uuid(4), blob.len());
        let (tx2, mut rx2) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let body = futures_util::stream::poll_fn(move |cx| rx2.poll_recv(cx));
        let mut client = ByteStreamClient::new(ch.clone());
        let call = tokio::spawn(async move { client.write(body).await });
        tx2.send(WriteRequest {
            resource_name: res.clone(),
            write_offset: 0,
            finish_write: false,
            data: Bytes::copy_from_slice(&blob[..1 << 20]),
        })
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        call.abort(); // the client goes away mid-write: the HTTP/2 stream is reset
        drop(tx2);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(h.get(&format!("/cas/{hx}")).status, 404);
        let mut cas = ContentAddressableStorageClient::new(ch);
        let missing = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![digest(&blob)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert_eq!(missing.len(), 1);
    });
    assert!(
        !crate::support::files_under(&h.dir)
            .iter()
            .any(|f| f.contains("cas.v2/") && !f.ends_with(".tmp"))
    );
}

#[test]
fn malformed_digests_resource_names_and_unknown_compressors_are_invalid_arguments() {
    let (_d, h) = start(&[]);
    rt().block_on(async {
        let ch = h.channel().await;
        let mut cas = ContentAddressableStorageClient::new(ch.clone());
        let good = digest(b"x");
        for bad in [
            Digest {
                hash: "abc".into(),
                size_bytes: 1,
            },
            Digest {
                hash: good.hash.to_uppercase(),
                size_bytes: 1,
            },
            Digest {
                hash: good.hash.clone(),
                size_bytes: -1,
            },
            Digest {
                hash: good.hash.clone(),
                size_bytes: 0,
            },
        ] {
            let err = cas
                .find_missing_blobs(FindMissingBlobsRequest {
                    blob_digests: vec![good.clone(), bad.clone()],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
            assert!(
                err.message().contains(&bad.hash) || err.message().contains("size"),
                "{err}"
            );
        }
        // The empty digest is never missing.
        let missing = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![digest(b""), good.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert_eq!(missing, vec![good.clone()]);

        for name in [
            format!("../blobs/{}/1", good.hash),
            format!("a//blobs/{}/1", good.hash),
            format!("compressed-blobs/gzip/{}/1", good.hash),
            format!("blobs/{}/1", &good.hash[..20]),
            format!("blobs/{}/x", good.hash),
        ] {
            assert_eq!(
                read(&ch, &name, 0, 0).await.unwrap_err().code(),
                Code::InvalidArgument,
                "{name}"
            );
        }
        for name in [
            format!(
                "uploads/{}/compressed-blobs/brotli/{}/1",
                uuid(5),
                good.hash
            ),
            format!("../uploads/{}/blobs/{}/1", uuid(5), good.hash),
            format!("uploads//blobs/{}/1", good.hash),
        ] {
            let err = write(&ch, &name, b"x", 1).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err}");
        }
        // A write that does not match its digest.
        let err = write(
            &ch,
            &format!("uploads/{}/blobs/{}/1", uuid(6), good.hash),
            b"y",
            1,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(&good.hash), "{err}");
        // A write longer than its declared size.
        let err = write(
            &ch,
            &format!("uploads/{}/blobs/{}/1", uuid(7), good.hash),
            b"xx",
            2,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        // Batch updates: per-blob statuses.
        let zdata = zstd::encode_all(&b"zstd body"[..], 1).unwrap();
        let resp = cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests: vec![
                    batch_update_blobs_request::Request {
                        digest: Some(digest(b"ok")),
                        data: Bytes::from_static(b"ok"),
                        compressor: 0,
                    },
                    batch_update_blobs_request::Request {
                        digest: Some(digest(b"wrong")),
                        data: Bytes::from_static(b"other"),
                        compressor: 0,
                    },
                    batch_update_blobs_request::Request {
                        digest: Some(digest(b"brotli")),
                        data: Bytes::from_static(b"brotli"),
                        compressor: compressor::Value::Brotli as i32,
                    },
                    batch_update_blobs_request::Request {
                        digest: Some(digest(b"zstd body")),
                        data: zdata.into(),
                        compressor: compressor::Value::Zstd as i32,
                    },
                    batch_update_blobs_request::Request {
                        digest: Some(Digest {
                            hash: "nope".into(),
                            size_bytes: 1,
                        }),
                        data: Bytes::from_static(b"x"),
                        compressor: 0,
                    },
                ],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let codes: Vec<i32> = resp
            .responses
            .iter()
            .map(|r| r.status.as_ref().unwrap().code)
            .collect();
        assert_eq!(codes, vec![0, 3, 3, 0, 3]);
        assert_eq!(
            h.get(&format!("/cas/{}", sha256_hex(b"zstd body"))).body,
            b"zstd body"
        );
        assert_eq!(h.get(&format!("/cas/{}", sha256_hex(b"wrong"))).status, 404);

        // Batch reads, with and without zstd.
        for (acceptable, want) in [(vec![], 0), (vec![compressor::Value::Zstd as i32], 1)] {
            let resp = cas
                .batch_read_blobs(BatchReadBlobsRequest {
                    digests: vec![digest(b"ok"), digest(b"absent"), digest(b"")],
                    acceptable_compressors: acceptable,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let r = &resp.responses;
            assert_eq!(r[0].status.as_ref().unwrap().code, 0);
            assert_eq!(r[0].compressor, want);
            let data = if want == 1 {
                zstd::decode_all(&r[0].data[..]).unwrap()
            } else {
                r[0].data.to_vec()
            };
            assert_eq!(data, b"ok");
            assert_eq!(r[1].status.as_ref().unwrap().code, Code::NotFound as i32);
            assert_eq!(r[2].status.as_ref().unwrap().code, 0);
        }
    });
}

#[test]
fn action_results_are_complete_or_not_found_and_inline_on_request() {
    let (_d, h) = start(&[]);
    rt().block_on(async {
        let ch = h.channel().await;
        let mut ac = ActionCacheClient::new(ch.clone());
        let out = b"an output".to_vec();
        let key = digest(b"action");
        // Inlined contents are stored into the CAS by UpdateActionResult.
        let ar = ActionResult {
            output_files: vec![OutputFile {
                path: "out/a".into(),
                contents: out.clone().into(),
                ..Default::default()
            }],
            stdout_raw: Bytes::from_static(b"hello stdout"),
            ..Default::default()
        };
        let stored = ac
            .update_action_result(UpdateActionResultRequest {
                action_digest: Some(key.clone()),
                action_result: Some(ar),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.output_files[0].digest, Some(digest(&out)));
        assert!(stored.stdout_raw.is_empty());
        assert_eq!(h.get(&format!("/cas/{}", sha256_hex(&out))).body, out);
        let got = ac
            .get_action_result(GetActionResultRequest {
                action_digest: Some(key.clone()),
                inline_stdout: true,
                inline_output_files: vec!["out/a".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.stdout_raw[..], b"hello stdout");
        assert_eq!(&got.output_files[0].contents[..], &out[..]);
        let plain = ac
            .get_action_result(GetActionResultRequest {
                action_digest: Some(key.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(plain.stdout_raw.is_empty());

        // A result whose output is missing is not found, and is removed.
        let key2 = digest(b"action 2");
        let ar = ActionResult {
            output_files: vec![OutputFile {
                path: "out/b".into(),
                digest: Some(digest(b"never uploaded")),
                ..Default::default()
            }],
            ..Default::default()
        };
        ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(key2.clone()),
            action_result: Some(ar),
            ..Default::default()
        })
        .await
        .unwrap();
        let err = ac
            .get_action_result(GetActionResultRequest {
                action_digest: Some(key2.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(h.get(&format!("/ac/{}", key2.hash)).status, 404);

        // Absolute and '..' paths and bad digests are refused.
        for path in ["/abs/path", "a/../../b"] {
            let ar = ActionResult {
                output_files: vec![OutputFile {
                    path: path.into(),
                    digest: Some(digest(&out)),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let err = ac
                .update_action_result(UpdateActionResultRequest {
                    action_digest: Some(key.clone()),
                    action_result: Some(ar),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{path}");
        }
        let err = ac
            .get_action_result(GetActionResultRequest {
                action_digest: Some(Digest {
                    hash: "zz".into(),
                    size_bytes: 1,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    });
}

#[test]
fn get_tree_pages_and_omits_missing_subdirectories() {
    let (_d, h) = start(&[]);
    rt().block_on(async {
        let ch = h.channel().await;
        let mut cas = ContentAddressableStorageClient::new(ch.clone());
        let leaf = |name: &str| Directory {
            files: vec![FileNode {
                name: name.into(),
                digest: Some(digest(name.as_bytes())),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (a, b) = (leaf("a"), leaf("b"));
        let missing = leaf("missing");
        let (ab, bb, mb) = (
            a.encode_to_vec(),
            b.encode_to_vec(),
            missing.encode_to_vec(),
        );
        let root = Directory {
            directories: vec![
                DirectoryNode {
                    name: "a".into(),
                    digest: Some(digest(&ab)),
                },
                DirectoryNode {
                    name: "b".into(),
                    digest: Some(digest(&bb)),
                },
                DirectoryNode {
                    name: "gone".into(),
                    digest: Some(digest(&mb)),
                },
            ],
            ..Default::default()
        };
        let rb = root.encode_to_vec();
        for blob in [&ab, &bb, &rb] {
            assert_eq!(
                h.put(&format!("/cas/{}", sha256_hex(blob)), blob).status,
                200
            );
        }
        let all = |page_size: i32, token: String| {
            let mut cas = cas.clone();
            let root = digest(&rb);
            async move {
                let mut s = cas
                    .get_tree(GetTreeRequest {
                        root_digest: Some(root),
                        page_size,
                        page_token: token,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let mut pages = Vec::new();
                while let Some(p) = s.message().await? {
                    pages.push(p);
                }
                Ok::<_, tonic::Status>(pages)
            }
        };
        let pages = all(0, String::new()).await.unwrap();
        let dirs: Vec<Directory> = pages.iter().flat_map(|p| p.directories.clone()).collect();
        assert_eq!(dirs, vec![root.clone(), a.clone(), b.clone()]);
        // One directory per page; resuming from a token gives the rest.
        let pages = all(1, String::new()).await.unwrap();
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[0].directories, vec![root.clone()]);
        let token = pages[0].next_page_token.clone();
        assert!(!token.is_empty());
        let rest = all(1, token).await.unwrap();
        let dirs: Vec<Directory> = rest.iter().flat_map(|p| p.directories.clone()).collect();
        assert_eq!(dirs, vec![a, b]);
        assert_eq!(
            all(0, "garbage".into()).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let err = cas
            .get_tree(GetTreeRequest {
                root_digest: Some(digest(b"no such root")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    });
}

#[test]
fn unknown_instance_names_are_refused_when_namespaces_are_restricted() {
    let (_d, h) = start(&["--namespaces.allowed=ci,release"]);
    rt().block_on(async {
        let ch = h.channel().await;
        let mut cas = ContentAddressableStorageClient::new(ch.clone());
        let ok = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: "ci".into(),
                blob_digests: vec![digest(b"x")],
                ..Default::default()
            })
            .await;
        assert!(ok.is_ok());
        let err = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: "intruder".into(),
                blob_digests: vec![digest(b"x")],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("intruder"), "{err}");
        let err = read(&ch, &format!("intruder/blobs/{}/1", sha256_hex(b"x")), 0, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    });
    assert_eq!(
        h.get(&format!("/intruder/cas/{}", sha256_hex(b"x"))).status,
        400
    );
}
