//! Rules the facade decides once, tried through both front ends: the same
//! refusal over HTTP and over gRPC, counted the same way.

// tonic::Status is the error of every client call here.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use hoard_proto::google::bytestream::WriteRequest;
use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::prost::Message;
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    ActionResult, BatchUpdateBlobsRequest, Digest, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest, batch_update_blobs_request,
};
use tonic::Code;

use crate::grpc::{digest, rt};
use crate::support::{Hoard, files_under, noise, sha256_hex};
use crate::upload::metric;

fn rejected(h: &Hoard, kind: &str, reason: &str) -> f64 {
    metric(h, "hoard_rejected_uploads_total")
        .get(&format!("{{kind=\"{kind}\",reason=\"{reason}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

fn ac_files(h: &Hoard) -> usize {
    files_under(&h.dir)
        .iter()
        .filter(|f| f.starts_with("ac.v2/"))
        .count()
}

/// An action result with `n` output files, all naming `blob`.
fn result_with_files(blob: &[u8], n: usize) -> ActionResult {
    ActionResult {
        output_files: (0..n)
            .map(|i| OutputFile {
                path: format!("out/file-{i:04}"),
                digest: Some(digest(blob)),
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        ..Default::default()
    }
}

#[test]
fn refusals_are_the_same_and_counted_once_over_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hoard::start(
        &dir.path().join("cache"),
        &["--max_action_result_size=2000"],
    );
    h.wait_ready();
    let blob = noise(3000, 1);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let rt = rt();
    let ch = rt.block_on(h.channel());
    let mut ac = ActionCacheClient::new(ch.clone());
    let mut cas = ContentAddressableStorageClient::new(ch.clone());
    let update = |ac: &mut ActionCacheClient<_>, key: &[u8], ar: ActionResult| {
        rt.block_on(ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(digest(key)),
            action_result: Some(ar),
            ..Default::default()
        }))
    };

    // The action-result size limit: 100 output files encode to well over
    // 2,000 bytes.
    let big = result_with_files(&blob, 100);
    assert!(big.encoded_len() > 2000);
    let r = h.put(&format!("/ac/{}", sha256_hex(b"big")), &big.encode_to_vec());
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("exceeds the limit of 2000"),
        "{}",
        r.text()
    );
    let e = update(&mut ac, b"big", big.clone()).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("exceeds the limit of 2000"), "{e:?}");
    assert_eq!(rejected(&h, "ac", "too_large"), 2.0);
    // Inlined contents move into the CAS and are counted in the limit
    // after they moved: small once they are digests.
    let mut inlined = result_with_files(&blob, 1);
    inlined.output_files[0].digest = None;
    inlined.output_files[0].contents = Bytes::from(vec![7u8; 5000]);
    let stored = update(&mut ac, b"inlined", inlined).unwrap().into_inner();
    assert_eq!(
        stored.output_files[0].digest,
        Some(digest(&[7u8; 5000])),
        "inlined contents are replaced by their digest"
    );
    assert!(
        h.get(&format!("/cas/{}", sha256_hex(&[7u8; 5000]))).status == 200,
        "and stored in the CAS"
    );

    // An invalid action result (an absolute output path).
    let mut bad = result_with_files(&blob, 1);
    bad.output_files[0].path = "/etc/passwd".into();
    let r = h.put(&format!("/ac/{}", sha256_hex(b"bad")), &bad.encode_to_vec());
    assert_eq!(r.status, 400, "{}", r.text());
    let e = update(&mut ac, b"bad", bad).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(rejected(&h, "ac", "invalid"), 2.0);
    // Inlined stdout that is not what its digest says: the action
    // result is refused, counted once (not also as a CAS refusal), and
    // the stdout bytes are not stored.
    let mut lying = result_with_files(&blob, 1);
    lying.stdout_raw = Bytes::from_static(b"not what the digest says");
    lying.stdout_digest = Some(digest(b"something else"));
    let e = update(&mut ac, b"lying", lying).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("inlined contents hash to"), "{e:?}");
    assert_eq!(rejected(&h, "ac", "invalid"), 3.0);
    assert_eq!(rejected(&h, "cas", "invalid"), 0.0);
    assert_eq!(
        h.get(&format!("/cas/{}", sha256_hex(b"not what the digest says")))
            .status,
        404
    );
    // A missing action_result is a refusal too.
    let e = rt
        .block_on(ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(digest(b"none")),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(rejected(&h, "ac", "invalid"), 4.0);

    // A CAS blob that is not what its digest says, by each way in.
    let claimed = sha256_hex(b"claimed");
    let r = h.put(&format!("/cas/{claimed}"), b"different");
    assert_eq!(r.status, 400);
    let resp = rt
        .block_on(cas.batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(Digest {
                    hash: claimed.clone(),
                    size_bytes: 9,
                }),
                data: Bytes::from_static(b"different"),
                compressor: 0,
            }],
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
    let e = rt
        .block_on(
            ByteStreamClient::new(ch.clone()).write(futures_util::stream::iter([WriteRequest {
                resource_name: format!(
                    "uploads/00000000-0000-4000-8000-000000000001/blobs/{claimed}/9"
                ),
                write_offset: 0,
                finish_write: true,
                data: Bytes::from_static(b"different"),
            }])),
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(rejected(&h, "cas", "invalid"), 3.0);
    assert_eq!(h.get(&format!("/cas/{claimed}")).status, 404);

    // Only what was valid was stored: one action result, readable both ways.
    assert_eq!(ac_files(&h), 1);
    let small = result_with_files(&blob, 2);
    assert_eq!(
        h.put(
            &format!("/ac/{}", sha256_hex(b"small")),
            &small.encode_to_vec()
        )
        .status,
        200
    );
    let got = rt
        .block_on(ac.get_action_result(GetActionResultRequest {
            action_digest: Some(digest(b"small")),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(got, small);
    assert_eq!(ac_files(&h), 2);
}
