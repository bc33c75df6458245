//! An operator switching from bazel-remote by replacing the binary: the
//! defaults, the documentation and the behaviour agree; gRPC requests are
//! in the access log; reserved REAPI words are refused alike everywhere;
//! and the S3 credential sources bazel-remote takes all work.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hoard_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use hoard_proto::google::bytestream::{ReadRequest, WriteRequest};
use hoard_proto::reapi::action_cache_client::ActionCacheClient;
use hoard_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetActionResultRequest, UpdateActionResultRequest, batch_update_blobs_request,
};
use tonic::Code;

use crate::grpc::{digest, rt};
use crate::s3::Proxy;
use crate::support::{Hoard, free_port, hoard_bin, sha256_hex};
use crate::upload::{count, drained, moto_with_bucket, s3_args};

/// One setting as `hoard --help` prints it: yaml key, env vars, default.
#[derive(Debug, PartialEq)]
struct Documented {
    env: Vec<String>,
    default: String,
}

fn from_help() -> BTreeMap<String, Documented> {
    let out = std::process::Command::new(hoard_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("yaml: ") else {
            continue;
        };
        let (key, rest) = rest.split_once("; env: ").unwrap();
        let (env, default) = rest.split_once("; default: ").unwrap();
        m.insert(
            key.to_string(),
            Documented {
                env: env
                    .split(", ")
                    .filter(|e| !e.is_empty())
                    .map(String::from)
                    .collect(),
                default: default.trim_matches('"').to_string(),
            },
        );
    }
    m
}

/// Backticked words of a Markdown cell.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

fn from_readme() -> BTreeMap<String, Documented> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .unwrap();
    let table = text
        .split("| YAML key / flag | Environment | Default | Meaning |")
        .nth(1)
        .expect("README has the configuration table");
    let mut m = BTreeMap::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        // Cells split at unescaped pipes (`a\|b` stays in its cell).
        let row_text = row.replace("\\|", "\u{1}");
        let cells: Vec<String> = row_text
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.replace('\u{1}', "|").trim().to_string())
            .collect();
        assert_eq!(cells.len(), 4, "README row {row:?}");
        let key = ticked(&cells[0]).first().cloned().unwrap_or_default();
        // The default cell starts with the value in backticks, or says
        // "empty" for none.
        let default = if cells[2].is_empty() || cells[2].starts_with("empty") {
            String::new()
        } else {
            assert!(
                cells[2].starts_with('`'),
                "README default of {key} must start with the value in backticks: {row:?}"
            );
            ticked(&cells[2]).first().cloned().unwrap_or_default()
        };
        m.insert(
            key,
            Documented {
                env: ticked(&cells[1]),
                default,
            },
        );
    }
    m
}

#[test]
fn help_readme_and_behaviour_agree_on_every_setting() {
    let help = from_help();
    let readme = from_readme();
    assert!(help.len() > 40, "{} settings in --help", help.len());
    let only_help: Vec<&String> = help.keys().filter(|k| !readme.contains_key(*k)).collect();
    let only_readme: Vec<&String> = readme.keys().filter(|k| !help.contains_key(*k)).collect();
    assert!(
        only_help.is_empty() && only_readme.is_empty(),
        "--help only: {only_help:?}; README only: {only_readme:?}"
    );
    for (key, h) in &help {
        assert_eq!(&readme[key], h, "README and --help disagree on {key}");
    }
    println!(
        "settings: {} in --help, all {} README rows agree",
        help.len(),
        readme.len()
    );
    assert_eq!(help["grpc_address"].default, ":9092");

    // The defaults are what hoard does: gRPC listens on :9092 unasked.
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(hoard_bin())
        .arg(format!("--dir={}", tmp.path().join("c").display()))
        .arg(format!("--http_address=127.0.0.1:{}", free_port()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut grpc_line = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("serving gRPC") {
            grpc_line = Some(line);
            break;
        }
    }
    let line = grpc_line.expect("hoard logged no gRPC listener");
    assert!(line.contains("0.0.0.0:9092"), "{line}");
    let status = rt().block_on(async {
        let ch = tonic::transport::Endpoint::from_static("http://127.0.0.1:9092")
            .connect()
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status.unwrap(), 1, "SERVING on the default gRPC port");
}

#[test]
fn grpc_requests_leave_access_log_lines_in_bazel_remotes_format() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start(&tmp.path().join("c"), &[]);
    h.wait_ready();
    let data = b"logged blob".to_vec();
    let d = digest(&data);
    let action = digest(b"logged action");
    let missing = digest(b"not here");
    let resource_w = format!(
        "uploads/00000000-0000-4000-8000-000000000001/blobs/{}/{}",
        d.hash, d.size_bytes
    );
    let resource_r = format!("blobs/{}/{}", d.hash, d.size_bytes);
    rt().block_on(async {
        let ch = h.channel().await;
        let mut cas = ContentAddressableStorageClient::new(ch.clone());
        let mut ac = ActionCacheClient::new(ch.clone());
        let mut bs = ByteStreamClient::new(ch.clone());
        cas.batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: data.clone().into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        cas.find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![d.clone(), missing.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        cas.batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![d.clone(), missing.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(ActionResult {
                stdout_digest: Some(d.clone()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        ac.get_action_result(GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        let miss = ac
            .get_action_result(GetActionResultRequest {
                action_digest: Some(missing.clone()),
                ..Default::default()
            })
            .await;
        assert_eq!(miss.unwrap_err().code(), Code::NotFound);
        let req = WriteRequest {
            resource_name: resource_w.clone(),
            write_offset: 0,
            finish_write: true,
            data: data.clone().into(),
        };
        bs.write(futures_util::stream::iter([req])).await.unwrap();
        let mut s = bs
            .read(ReadRequest {
                resource_name: resource_r.clone(),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
    });
    let lines = h.access_log(Duration::from_secs(5));
    let expected = [
        format!("GRPC CAS PUT {} OK", d.hash),
        format!("GRPC CAS HEAD {} OK", d.hash),
        format!("GRPC CAS HEAD {} NOT FOUND", missing.hash),
        format!("GRPC CAS GET {} OK", d.hash),
        format!("GRPC CAS GET {} NOT FOUND", missing.hash),
        format!("GRPC AC PUT {} OK", action.hash),
        format!("GRPC AC GET {} OK", action.hash),
        format!("GRPC AC GET {} NOT FOUND", missing.hash),
        format!("GRPC BYTESTREAM WRITE COMPLETED: {resource_w}"),
        format!("GRPC BYTESTREAM READ COMPLETED {resource_r}"),
    ];
    for e in &expected {
        let line = lines
            .iter()
            .find(|l| l.ends_with(e.as_str()))
            .unwrap_or_else(|| panic!("no access-log line {e:?} in {lines:#?}"));
        // `YYYY/MM/DD HH:MM:SS ` as bazel-remote's logger writes it.
        let ts = &line[..20];
        assert!(
            ts.as_bytes()[4] == b'/' && ts.as_bytes()[13] == b':' && ts.ends_with(' '),
            "{line}"
        );
    }
    println!("access log: {} gRPC lines checked", expected.len());

    // access_log_level none: no gRPC lines either.
    let quiet = Hoard::start(&tmp.path().join("q"), &["--access_log_level=none"]);
    quiet.wait_ready();
    rt().block_on(async {
        let mut cas = ContentAddressableStorageClient::new(quiet.channel().await);
        cas.find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![d.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert!(quiet.access_log(Duration::from_secs(1)).is_empty());
}

#[test]
fn reserved_instance_words_are_refused_alike_over_http_and_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start(&tmp.path().join("c"), &[]);
    h.wait_ready();
    let data = b"reserved".to_vec();
    let d = digest(&data);
    let mut refused = 0;
    for word in [
        "blobs",
        "uploads",
        "compressed-blobs",
        "actions",
        "actionResults",
        "operations",
        "capabilities",
    ] {
        let r = h.put(&format!("/{word}/cas/{}", d.hash), &data);
        assert_eq!(r.status, 400, "HTTP {word}: {}", r.text());
        assert!(
            r.text().contains("reserved word"),
            "HTTP {word}: {}",
            r.text()
        );
        refused += 1;
        rt().block_on(async {
            let ch = h.channel().await;
            let write = ByteStreamClient::new(ch.clone())
                .write(futures_util::stream::iter([WriteRequest {
                    resource_name: format!(
                        "{word}/uploads/00000000-0000-4000-8000-000000000002/blobs/{}/{}",
                        d.hash, d.size_bytes
                    ),
                    write_offset: 0,
                    finish_write: true,
                    data: data.clone().into(),
                }]))
                .await
                .unwrap_err();
            let read = ByteStreamClient::new(ch.clone())
                .read(ReadRequest {
                    resource_name: format!("{word}/blobs/{}/{}", d.hash, d.size_bytes),
                    read_offset: 0,
                    read_limit: 0,
                })
                .await
                .unwrap_err();
            let find = ContentAddressableStorageClient::new(ch.clone())
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: word.into(),
                    blob_digests: vec![d.clone()],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            for (what, e) in [("write", write), ("read", read), ("find", find)] {
                assert_eq!(e.code(), Code::InvalidArgument, "{word} {what}: {e}");
                assert!(e.message().contains("reserved word"), "{word} {what}: {e}");
            }
        });
        refused += 3;
    }
    let stored: Vec<String> = crate::support::files_under(&h.dir)
        .into_iter()
        .filter(|f| f.contains(&d.hash))
        .collect();
    assert!(stored.is_empty(), "{stored:?}");
    println!("reserved words: {refused} attempts over HTTP and gRPC refused, nothing stored");
}

/// An instance metadata service (IMDSv2) on loopback handing out one role's
/// credentials; it counts what it served.
struct Imds {
    addr: SocketAddr,
    served: Arc<Mutex<Vec<String>>>,
}

impl Imds {
    fn start(access_key: &'static str) -> Imds {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let served = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&served);
        std::thread::spawn(move || {
            for mut conn in l.incoming().flatten() {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                }
                let mut parts = first.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                log.lock().unwrap().push(format!("{method} {path}"));
                let body = match (method, path.trim_end_matches('/')) {
                    ("PUT", "/latest/api/token") => "imds-session-token".to_string(),
                    ("GET", "/latest/meta-data/iam/security-credentials")
                    | ("GET", "/latest/meta-data/iam/security-credentials-extended") => {
                        "hoard-role".to_string()
                    }
                    ("GET", p) if p.ends_with("/hoard-role") => format!(
                        "{{\"Code\":\"Success\",\"LastUpdated\":\"2026-01-01T00:00:00Z\",\"Type\":\"AWS-HMAC\",\
                         \"AccessKeyId\":\"{access_key}\",\"SecretAccessKey\":\"imds-secret\",\
                         \"Token\":\"imds-token\",\"Expiration\":\"2099-01-01T00:00:00Z\"}}"
                    ),
                    _ => {
                        let _ = conn.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                        continue;
                    }
                };
                // A session token says how long it lives.
                let ttl = if method == "PUT" {
                    "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"
                } else {
                    ""
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\n{ttl}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Imds { addr, served }
    }
}

/// Starts hoard against moto through a proxy that notes the access key of
/// each signed request, uploads one blob, and returns the keys seen.
fn upload_with(args: &[String], env: &[(&str, &str)], tag: &str) -> Vec<String> {
    let (moto, bucket) = moto_with_bucket(tag);
    let proxy = Proxy::start(moto.port);
    let tmp = tempfile::tempdir().unwrap();
    let mut all = s3_args(&format!("127.0.0.1:{}", proxy.port), tag, "host-cred");
    // Drop the static keys s3_args sets; the source under test provides them.
    all.retain(|a| !a.starts_with("--s3.access_key_id") && !a.starts_with("--s3.secret"));
    all.extend(args.iter().cloned());
    let a: Vec<&str> = all.iter().map(String::as_str).collect();
    let h = Hoard::start_env(&tmp.path().join("c"), &a, env);
    h.wait_ready();
    let blob = crate::support::noise(3000, tag.len() as u64);
    assert_eq!(
        h.put(&format!("/cas/{}", sha256_hex(&blob)), &blob).status,
        200
    );
    let o = drained(&h);
    assert_eq!(count(&o, "cas", "created"), 1.0, "{tag}: {o:?}");
    assert!(
        bucket
            .objects()
            .keys()
            .any(|k| k.contains(&sha256_hex(&blob))),
        "{tag}: the blob reached the bucket"
    );
    proxy.access_keys()
}

#[test]
fn s3_credentials_come_from_instance_metadata_a_profile_file_and_the_default_chain() {
    // iam_role: the instance metadata service, at iam_role_endpoint.
    let imds = Imds::start("AKIAFROMIMDS");
    let keys = upload_with(
        &[
            "--s3.auth_method=iam_role".into(),
            format!("--s3.iam_role_endpoint=http://{}", imds.addr),
        ],
        &[],
        "imds",
    );
    let served = imds.served.lock().unwrap().clone();
    println!("credentials: iam_role signed with {keys:?}; metadata requests {served:?}");
    assert_eq!(keys, ["AKIAFROMIMDS"]);
    assert!(
        served.iter().any(|r| r == "PUT /latest/api/token"),
        "{served:?}"
    );

    // aws_credentials_file: a named profile of a credentials file.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIANOTTHISONE\naws_secret_access_key = x\n\n\
         [ci]\naws_access_key_id = AKIAFROMPROFILE\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    let keys = upload_with(
        &[
            "--s3.auth_method=aws_credentials_file".into(),
            "--s3.aws_profile=ci".into(),
            format!("--s3.aws_shared_credentials_file={}", file.display()),
        ],
        &[],
        "profile",
    );
    println!("credentials: aws_credentials_file signed with {keys:?}");
    assert_eq!(keys, ["AKIAFROMPROFILE"]);

    // default: the SDK's chain, here from the environment.
    let keys = upload_with(
        &["--s3.auth_method=default".into()],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAFROMENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
        "chain",
    );
    println!("credentials: default chain signed with {keys:?}");
    assert_eq!(keys, ["AKIAFROMENV"]);
}
