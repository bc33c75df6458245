//! TLS with certificates made by the real openssl: HTTPS and gRPC over TLS
//! on the same ports, nothing in plaintext, mTLS refusing clients without a
//! certificate or with one from another CA, and SIGHUP picking up a new
//! certificate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{Hoard, sha256_hex};

/// Test certificates: a CA, a server certificate for 127.0.0.1, a client
/// certificate from the same CA and one from another CA.
pub(crate) struct Pki {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is not installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub(crate) fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-subj",
                    &format!("/CN=hoard test {ca}"),
                ],
            );
        }
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        pki.leaf(
            "server",
            "ca",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        pki.leaf("client", "ca", "ci", "extendedKeyUsage=clientAuth\n");
        pki.leaf(
            "stranger",
            "other-ca",
            "ci",
            "extendedKeyUsage=clientAuth\n",
        );
        pki
    }

    /// A key and a certificate `name`.pem signed by `ca`.
    pub(crate) fn leaf(&self, name: &str, ca: &str, cn: &str, ext: &str) {
        let ext_file = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext_file), ext).unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &ext_file,
            ],
        );
    }

    pub(crate) fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    /// hoard's TLS flags; with `mutual`, client certificates are required.
    pub(crate) fn flags(&self, mutual: bool) -> Vec<String> {
        let mut v = vec![
            format!("--tls_cert_file={}", self.path("server.pem")),
            format!("--tls_key_file={}", self.path("server.key")),
        ];
        if mutual {
            v.push(format!("--tls_ca_file={}", self.path("ca.pem")));
        }
        v
    }
}

/// curl against hoard; its exit status and what it printed.
fn curl(pki: &Pki, args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &pki.path("ca.pem")])
        .args(args)
        .output()
        .expect("curl is not installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn wait_ready_tls(h: &Hoard, pki: &Pki, extra: &[&str]) {
    let url = format!("https://{}/readyz", h.addr);
    for _ in 0..200 {
        let mut args = vec![url.as_str()];
        args.extend_from_slice(extra);
        if curl(pki, &args).1.contains("ready") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("hoard never became ready over HTTPS");
}

/// The subject of the certificate the server presents now.
fn served_subject(addr: std::net::SocketAddr) -> String {
    let s = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -subject"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&s.stdout).trim().to_string()
}

#[test]
fn https_serves_only_tls_and_sighup_swaps_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let flags = pki.flags(false);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let h = Hoard::start(&tmp.path().join("cache"), &args);
    wait_ready_tls(&h, &pki, &[]);
    let blob = tmp.path().join("blob");
    std::fs::write(&blob, b"over tls").unwrap();
    let url = format!("https://{}/cas/{}", h.addr, sha256_hex(b"over tls"));
    let (ok, out) = curl(&pki, &["-f", "-T", &blob.display().to_string(), &url]);
    assert!(ok, "PUT over HTTPS: {out}");
    let (ok, out) = curl(&pki, &["-f", &url]);
    assert!(ok && out == "over tls", "GET over HTTPS: {out}");
    // Plaintext on the TLS port gets nothing served.
    let plain = crate::support::try_request(h.addr, "GET", "/healthz", &[], b"");
    assert!(
        !matches!(&plain, Some(r) if r.status == 200),
        "plaintext HTTP was served on the TLS port"
    );
    let grpc = h.grpc.unwrap();
    let plain = crate::support::try_request(grpc, "GET", "/healthz", &[], b"");
    assert!(!matches!(&plain, Some(r) if r.status == 200));
    // A new certificate, then SIGHUP: new connections get it, and a
    // connection opened before keeps being served.
    assert!(served_subject(h.addr).contains("localhost"));
    let python = std::env::var("E2E_PYTHON").expect(
        "E2E_PYTHON (a python with grpcio) is not set: run the README's test command, which installs it",
    );
    let mut held = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tls/keepalive.py"))
        .arg("127.0.0.1")
        .arg(h.addr.port().to_string())
        .arg(pki.path("ca.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_out = std::io::BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut held_out, &mut line).unwrap();
    assert_eq!(line.trim(), "200 localhost", "before the reload");
    pki.leaf(
        "server",
        "ca",
        "renewed",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let kill = Command::new("kill")
        .args(["-HUP", &h.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut subject = String::new();
    for _ in 0..50 {
        subject = served_subject(h.addr);
        if subject.contains("renewed") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(subject.contains("renewed"), "after SIGHUP: {subject}");
    std::io::Write::write_all(held.stdin.as_mut().unwrap(), b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut held_out, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "200 localhost",
        "the connection opened before the reload"
    );
    assert!(held.wait().unwrap().success());
    let (ok, out) = curl(&pki, &["-f", &url]);
    assert!(ok && out == "over tls", "GET after the reload: {out}");
    // A reload that fails keeps the certificate in use.
    std::fs::write(pki.dir.join("server.pem"), b"not a certificate").unwrap();
    Command::new("kill")
        .args(["-HUP", &h.pid().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(served_subject(h.addr).contains("renewed"));
    println!(
        "TLS: HTTPS PUT+GET ok, plaintext refused on both ports, SIGHUP swapped the certificate and kept an open connection served, a bad reload kept it"
    );
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let flags = pki.flags(true);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let h = Hoard::start(&tmp.path().join("cache"), &args);
    let client = [
        "--cert",
        &pki.path("client.pem"),
        "--key",
        &pki.path("client.key"),
    ]
    .map(String::from);
    let client: Vec<&str> = client.iter().map(String::as_str).collect();
    wait_ready_tls(&h, &pki, &client);
    let url = format!("https://{}/status", h.addr);
    let (ok, out) = curl(&pki, &["-f", &url]);
    assert!(!ok, "no client certificate was accepted: {out}");
    let stranger = [
        "-f",
        "--cert",
        &pki.path("stranger.pem"),
        "--key",
        &pki.path("stranger.key"),
        &url,
    ]
    .map(String::from);
    let stranger: Vec<&str> = stranger.iter().map(String::as_str).collect();
    let (ok, out) = curl(&pki, &stranger);
    assert!(!ok, "a certificate from another CA was accepted: {out}");
    let mut good = client.clone();
    good.insert(0, "-f");
    good.push(&url);
    let (ok, out) = curl(&pki, &good);
    assert!(
        ok && out.contains("NumFiles"),
        "the CA's client was refused: {out}"
    );
    println!("mTLS: no certificate refused, another CA's refused, the CA's client served");
}

#[test]
fn grpc_over_mutual_tls_with_a_stock_client() {
    let python = std::env::var("E2E_PYTHON").expect(
        "E2E_PYTHON (a python with grpcio) is not set: run the README's test command, which installs it",
    );
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let pw = tmp.path().join("htpasswd");
    crate::bazel::htpasswd_file(&pw, &[("ci", "s3cret")]);
    let mut flags = pki.flags(true);
    flags.push(format!("--htpasswd_file={}", pw.display()));
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let h = Hoard::start(&tmp.path().join("cache"), &args);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tls/grpc_tls.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(h.grpc.unwrap().to_string())
        .arg(&pki.dir)
        .arg("Basic Y2k6czNjcmV0") // ci:s3cret
        .output()
        .expect("running the grpcio client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    println!("gRPC over mTLS (grpcio): {v}");
    let get = |who: &str, what: &str| v[who][what].as_str().unwrap_or("?").to_string();
    assert_eq!(get("client certificate, credentials", "capabilities"), "OK");
    assert_eq!(get("client certificate, credentials", "health"), "OK");
    assert_eq!(
        get("client certificate, no credentials", "capabilities"),
        "UNAUTHENTICATED"
    );
    assert_eq!(get("client certificate, no credentials", "health"), "OK");
    for who in ["no client certificate", "another CA's certificate"] {
        for what in ["capabilities", "health"] {
            assert_eq!(get(who, what), "UNAVAILABLE", "{who}: {what}");
        }
    }
}

#[test]
fn client_certificate_names_are_identities_bound_to_their_namespaces() {
    use hoard_proto::prost::Message;
    use hoard_proto::reapi::{Digest, FindMissingBlobsRequest, GetActionResultRequest};
    let python = std::env::var("E2E_PYTHON").expect(
        "E2E_PYTHON (a python with grpcio) is not set: run the README's test command, which installs it",
    );
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    for team in ["team-a", "team-b"] {
        pki.leaf(team, "ca", team, "extendedKeyUsage=clientAuth\n");
    }
    let mut flags = pki.flags(true);
    flags.push("--namespaces.bind_to_identity=true".into());
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let h = Hoard::start(&tmp.path().join("cache"), &args);
    let cert = |team: &str| {
        vec![
            "--cert".to_string(),
            pki.path(&format!("{team}.pem")),
            "--key".to_string(),
            pki.path(&format!("{team}.key")),
        ]
    };
    let a = cert("team-a");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    wait_ready_tls(&h, &pki, &a);
    let blob = b"team a's output";
    let hx = sha256_hex(blob);
    let body = tmp.path().join("blob");
    std::fs::write(&body, blob).unwrap();
    let status = |team: &str, method: &str, path: &str| {
        let c = cert(team);
        let mut args: Vec<&str> = c.iter().map(String::as_str).collect();
        let url = format!("https://{}{path}", h.addr);
        let upload = format!("@{}", body.display());
        args.extend(["-o", "/dev/null", "-w", "%{http_code}", "-X", method]);
        if method == "PUT" {
            args.extend(["--data-binary", &upload]);
        }
        args.push(&url);
        curl(&pki, &args).1
    };
    let mut seen = Vec::new();
    let mut check = |what: &str, got: String, want: &str| {
        seen.push(format!("{what}: {got}"));
        assert_eq!(got, want, "{what}");
    };
    check(
        "team-a PUT /cas",
        status("team-a", "PUT", &format!("/cas/{hx}")),
        "200",
    );
    check(
        "team-a GET /cas",
        status("team-a", "GET", &format!("/cas/{hx}")),
        "200",
    );
    check(
        "team-a GET /team-a/cas",
        status("team-a", "GET", &format!("/team-a/cas/{hx}")),
        "200",
    );
    check(
        "team-b GET /cas",
        status("team-b", "GET", &format!("/cas/{hx}")),
        "404",
    );
    check(
        "team-b GET /team-a/cas",
        status("team-b", "GET", &format!("/team-a/cas/{hx}")),
        "403",
    );
    check(
        "team-b PUT /team-a/cas",
        status("team-b", "PUT", &format!("/team-a/cas/{hx}")),
        "403",
    );
    assert!(
        crate::support::files_under(&h.dir)
            .iter()
            .any(|f| f.starts_with("ns.v1/team-a/cas.v2/")),
        "team-a's blob is in its own namespace"
    );
    // gRPC: the certificate names the identity the same way.
    let call = |team: &str, method: &str, req: Vec<u8>| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tls/grpc_call.py");
        let hex: String = req.iter().map(|b| format!("{b:02x}")).collect();
        let out = Command::new(&python)
            .arg(&script)
            .arg(h.grpc.unwrap().to_string())
            .arg(&pki.dir)
            .arg(team)
            .arg(method)
            .arg(hex)
            .output()
            .expect("running the grpcio client");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let find = |instance: &str| {
        FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: vec![Digest {
                hash: hx.clone(),
                size_bytes: blob.len() as i64,
            }],
            ..Default::default()
        }
        .encode_to_vec()
    };
    let fmb = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    check(
        "gRPC team-a FindMissingBlobs",
        call("team-a", fmb, find("")),
        "OK",
    );
    check(
        "gRPC team-b FindMissingBlobs team-a",
        call("team-b", fmb, find("team-a")),
        "PERMISSION_DENIED",
    );
    let gar = GetActionResultRequest {
        instance_name: "team-a".into(),
        action_digest: Some(Digest {
            hash: hx.clone(),
            size_bytes: 1,
        }),
        ..Default::default()
    }
    .encode_to_vec();
    check(
        "gRPC team-b GetActionResult team-a",
        call(
            "team-b",
            "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
            gar.clone(),
        ),
        "PERMISSION_DENIED",
    );
    check(
        "gRPC team-a GetActionResult team-a",
        call(
            "team-a",
            "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
            gar,
        ),
        "NOT_FOUND",
    );
    println!("certificate identities: {}", seen.join("; "));
}
