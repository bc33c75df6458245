//! Real S3 (moto in server mode) and a scriptable stub S3 for the answers
//! moto never gives (304, 409, an ignored If-None-Match, failing parts).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use crate::support::free_port;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;

/// moto's S3 server, from the venv `tests/run.sh` makes (`$MOTO_SERVER`).
pub struct Moto {
    child: Child,
    pub port: u16,
}

pub fn moto_bin() -> String {
    let p = std::env::var("MOTO_SERVER").unwrap_or_else(|_| {
        format!(
            "{}/../target/e2e-venv/bin/moto_server",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    assert!(
        std::path::Path::new(&p).exists(),
        "moto_server not found at {p}: run the README's test command (tests/run.sh), which installs moto 5.2.5 into a venv"
    );
    p
}

impl Moto {
    pub fn start() -> Moto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Moto {
        // Waited for in kill(), called on drop.
        #[allow(clippy::zombie_processes)]
        let child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Moto { child, port };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("moto_server did not start on port {port}");
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`STOP`, `CONT`) to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A signed S3 client for the tests' own looks into a bucket.
pub struct Bucket {
    client: Client,
    pub name: String,
    rt: tokio::runtime::Runtime,
}

impl Bucket {
    pub fn new(endpoint: &str, name: &str) -> Bucket {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(format!("http://{endpoint}"))
            .force_path_style(true)
            .credentials_provider(Credentials::new("AK", "SK", None, None, "test"))
            .build();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Bucket {
            client: Client::from_conf(conf),
            name: name.into(),
            rt,
        }
    }

    pub fn create(&self) {
        self.rt
            .block_on(self.client.create_bucket().bucket(&self.name).send())
            .expect("creating the bucket");
    }

    /// Every key with its size.
    pub fn objects(&self) -> HashMap<String, i64> {
        self.rt.block_on(async {
            let mut out = HashMap::new();
            let mut token = None;
            loop {
                let r = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.name)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .expect("listing the bucket");
                for o in r.contents() {
                    out.insert(
                        o.key().unwrap_or_default().to_string(),
                        o.size().unwrap_or(0),
                    );
                }
                token = r.next_continuation_token().map(str::to_string);
                if token.is_none() {
                    return out;
                }
            }
        })
    }

    pub fn delete(&self, key: &str) {
        self.rt
            .block_on(
                self.client
                    .delete_object()
                    .bucket(&self.name)
                    .key(key)
                    .send(),
            )
            .expect("deleting an object");
    }

    pub fn put(&self, key: &str, data: &[u8]) {
        self.put_as(key, data, None);
    }

    /// Puts an object as a hoard upload tagged `writer` would have.
    pub fn put_tagged(&self, key: &str, data: &[u8], writer: &str) {
        self.put_as(key, data, Some(writer));
    }

    fn put_as(&self, key: &str, data: &[u8], writer: Option<&str>) {
        let mut put = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .body(ByteStream::from(data.to_vec()));
        if let Some(w) = writer {
            put = put.metadata("hoard-writer", w);
        }
        self.rt.block_on(put.send()).expect("putting an object");
    }

    pub fn multipart_uploads(&self) -> usize {
        self.rt
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.name)
                    .send(),
            )
            .map(|r| r.uploads().len())
            .unwrap_or(0)
    }
}

/// How the stub answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StubMode {
    /// Honours If-None-Match, refusing with this status (412 or 304).
    Conditional(u16),
    /// Refuses existing keys with 409 BlobAlreadyExists (Azure-style).
    AlreadyExists409,
    /// Answers 409 ConditionalRequestConflict to the first `n` PUTs of each
    /// key, then behaves as `Conditional(412)`.
    ConflictFirst(u32),
    /// Ignores If-None-Match: every PUT is 200 and overwrites (Garage).
    Ignoring,
    /// Multipart parts always fail with 500.
    FailingParts,
    /// Ignores If-None-Match (as `Ignoring`) and fails every HEAD with 500.
    IgnoringFailingHeads,
    /// Refuses creates of existing keys with a 409 that does not mean
    /// "exists" (OperationAborted); the probe's own keys get 412.
    OtherConflict,
}

/// A recorded request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// A minimal in-memory S3 that answers what hoard sends, as told.
pub struct StubS3 {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub objects: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl StubS3 {
    pub fn start(mode: StubMode) -> StubS3 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let objects: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::new(Mutex::new(HashMap::new()));
        let conflicts: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
        let (s2, o2) = (seen.clone(), objects.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s3, o3, c3) = (s2.clone(), o2.clone(), conflicts.clone());
                std::thread::spawn(move || serve_stub(conn, mode, &s3, &o3, &c3));
            }
        });
        StubS3 {
            port,
            seen,
            objects,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn respond(s: &mut TcpStream, status: u16, reason: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn s3_error(code: &str) -> Vec<u8> {
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>").into_bytes()
}

fn serve_stub(
    conn: TcpStream,
    mode: StubMode,
    seen: &Mutex<Vec<Seen>>,
    objects: &Mutex<HashMap<String, Vec<u8>>>,
    conflicts: &Mutex<HashMap<String, u32>>,
) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let path = path.to_string();
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
        });
        let has = |k: &str| headers.iter().any(|(h, _)| h == k);
        let exists = objects.lock().unwrap().contains_key(&path);
        match method.as_str() {
            "PUT" if query.contains("partNumber") => {
                if mode == StubMode::FailingParts {
                    respond(
                        &mut w,
                        500,
                        "Internal Server Error",
                        &[],
                        &s3_error("InternalError"),
                    );
                } else {
                    respond(&mut w, 200, "OK", &[("ETag", "\"part\"".into())], b"");
                }
            }
            "PUT" => {
                let conditional = has("if-none-match");
                if let StubMode::ConflictFirst(n) = mode {
                    let mut c = conflicts.lock().unwrap();
                    let k = c.entry(path.clone()).or_insert(0);
                    if *k < n {
                        *k += 1;
                        respond(
                            &mut w,
                            409,
                            "Conflict",
                            &[],
                            &s3_error("ConditionalRequestConflict"),
                        );
                        continue;
                    }
                }
                if conditional
                    && exists
                    && !matches!(mode, StubMode::Ignoring | StubMode::IgnoringFailingHeads)
                {
                    match mode {
                        StubMode::OtherConflict if !path.contains("/_hoard/") => {
                            respond(&mut w, 409, "Conflict", &[], &s3_error("OperationAborted"))
                        }
                        StubMode::Conditional(304) => {
                            respond(&mut w, 304, "Not Modified", &[], b"")
                        }
                        StubMode::AlreadyExists409 => {
                            respond(&mut w, 409, "Conflict", &[], &s3_error("BlobAlreadyExists"))
                        }
                        _ => respond(
                            &mut w,
                            412,
                            "Precondition Failed",
                            &[],
                            &s3_error("PreconditionFailed"),
                        ),
                    }
                    continue;
                }
                objects.lock().unwrap().insert(path, body);
                respond(&mut w, 200, "OK", &[("ETag", "\"x\"".into())], b"");
            }
            "POST" if query.starts_with("uploads") => {
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>stub-upload</UploadId></InitiateMultipartUploadResult>";
                respond(&mut w, 200, "OK", &[], xml.as_bytes());
            }
            "DELETE" => {
                objects.lock().unwrap().remove(&path);
                respond(&mut w, 204, "No Content", &[], b"");
            }
            "HEAD" if mode == StubMode::IgnoringFailingHeads => {
                respond(&mut w, 500, "Internal Server Error", &[], b"");
            }
            "HEAD" | "GET" => {
                let obj = objects.lock().unwrap().get(&path).cloned();
                match obj {
                    Some(data) if method == "GET" => respond(&mut w, 200, "OK", &[], &data),
                    Some(data) => {
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
                        let _ = w.write_all(head.as_bytes());
                    }
                    None if method == "HEAD" => {
                        let _ = w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    }
                    None => respond(&mut w, 404, "Not Found", &[], &s3_error("NoSuchKey")),
                }
            }
            _ => respond(&mut w, 400, "Bad Request", &[], &s3_error("BadRequest")),
        }
    }
}

/// A TCP proxy in front of the bucket that can forward, hang (take bytes,
/// answer nothing) or refuse (close every connection), and that notes the
/// access key id each signed request names.
pub struct Proxy {
    pub port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    keys: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

pub const FORWARD: u8 = 0;
pub const HANG: u8 = 1;
pub const REFUSE: u8 = 2;
/// Forwards each request [`SLOW_BY`] late: a bucket that answers, but
/// just inside a 2 s read timeout.
pub const SLOW: u8 = 3;
pub const SLOW_BY: Duration = Duration::from_millis(1200);

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(FORWARD));
        let keys = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let (m, k) = (Arc::clone(&mode), Arc::clone(&keys));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if m.load(std::sync::atomic::Ordering::Relaxed) == REFUSE {
                    drop(conn);
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (to_up, from_up) = (up.try_clone().unwrap(), conn.try_clone().unwrap());
                let (m1, m2, k1) = (Arc::clone(&m), Arc::clone(&m), Arc::clone(&k));
                std::thread::spawn(move || pump(conn, to_up, &m1, Some(&k1)));
                std::thread::spawn(move || pump(up, from_up, &m2, None));
            }
        });
        Proxy { port, mode, keys }
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
    }

    /// Access key ids seen in `Authorization: AWS4-HMAC-SHA256 Credential=...`.
    pub fn access_keys(&self) -> Vec<String> {
        self.keys.lock().unwrap().iter().cloned().collect()
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: &std::sync::atomic::AtomicU8,
    keys: Option<&Mutex<std::collections::BTreeSet<String>>>,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match mode.load(std::sync::atomic::Ordering::Relaxed) {
            REFUSE => break,
            HANG => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            _ => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if keys.is_some() && mode.load(std::sync::atomic::Ordering::Relaxed) == SLOW {
                    std::thread::sleep(SLOW_BY);
                }
                if let Some(keys) = keys {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    for part in text.split("Credential=").skip(1) {
                        if let Some((id, _)) = part.split_once('/') {
                            keys.lock().unwrap().insert(id.to_string());
                        }
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
