//! Starting the real `hoard` binary and talking to it over real sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A thread draining `r` (a full pipe would block the process writing to
/// it), handing over its lines.
fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The hoard binary under test: `$HOARD_BIN`, else the workspace's debug
/// build. The README's test command builds it first.
pub fn hoard_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HOARD_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/hoard");
    assert!(
        p.exists(),
        "hoard binary not found at {}: run `cargo build -p hoard` first or set HOARD_BIN",
        p.display()
    );
    p
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A running hoard on 127.0.0.1 with a port the OS picked.
pub struct Hoard {
    child: Child,
    pub addr: SocketAddr,
    /// The gRPC address, unless started with `--grpc_address=none`.
    pub grpc: Option<SocketAddr>,
    pub dir: PathBuf,
    /// Keeps the reader thread draining hoard's stderr (a full pipe would
    /// block hoard's logging).
    _stderr: mpsc::Receiver<String>,
    /// The access log (hoard's stdout), line by line.
    stdout: mpsc::Receiver<String>,
}

impl Hoard {
    pub fn start(dir: &Path, extra: &[&str]) -> Hoard {
        Self::try_start(dir, extra).unwrap_or_else(|e| panic!("hoard did not start: {e}"))
    }

    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<Hoard, String> {
        Self::try_start_env(dir, extra, &[])
    }

    /// Like [`Hoard::start`], with extra environment variables.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Hoard {
        Self::try_start_env(dir, extra, env).unwrap_or_else(|e| panic!("hoard did not start: {e}"))
    }

    pub fn try_start_env(
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Hoard, String> {
        let mut cmd = Command::new(hoard_bin());
        cmd.envs(env.iter().copied());
        let want_grpc = !extra.iter().any(|a| a.starts_with("--grpc_address"));
        cmd.arg(format!("--dir={}", dir.display()))
            .arg("--http_address=127.0.0.1:0")
            .args(want_grpc.then_some("--grpc_address=127.0.0.1:0"))
            .arg("--fsync=false")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("HOARD_LOG", "info");
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let out_rx = lines_of(child.stdout.take().ok_or("no stdout")?);
        let rx = lines_of(child.stderr.take().ok_or("no stderr")?);
        let mut seen = Vec::new();
        let mut http = None;
        let mut grpc = None;
        loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    let addr = line
                        .split("address=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                    if line.contains("serving HTTP") {
                        http = addr;
                    } else if line.contains("serving gRPC") {
                        grpc = addr;
                    }
                    seen.push(line);
                    if let Some(addr) = http
                        && (grpc.is_some() || !want_grpc)
                    {
                        return Ok(Hoard {
                            child,
                            addr,
                            grpc,
                            dir: dir.to_path_buf(),
                            _stderr: rx,
                            stdout: out_rx,
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(format!(
                        "exited ({status:?}) or timed out; stderr:\n{}",
                        seen.join("\n")
                    ));
                }
            }
        }
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        for _ in 0..400 {
            if self.get("/readyz").status == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("hoard never became ready");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("grpc://{}", self.grpc.expect("started without gRPC"))
    }

    /// A tonic channel to the gRPC port.
    pub async fn channel(&self) -> tonic::transport::Channel {
        let addr = self.grpc.expect("started without gRPC");
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.addr, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    pub fn put(&self, path: &str, body: &[u8]) -> Resp {
        let len = body.len().to_string();
        self.request("PUT", path, &[("Content-Length", &len)], body)
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..200 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        None
    }

    /// Access-log lines written since the last call, waiting up to `wait`
    /// for the first one.
    pub fn access_log(&self, wait: Duration) -> Vec<String> {
        let mut out: Vec<String> = self.stdout.recv_timeout(wait).into_iter().collect();
        std::thread::sleep(Duration::from_millis(300));
        out.extend(self.stdout.try_iter());
        out
    }

    /// What hoard logged to stderr since the last call.
    pub fn logs(&self) -> Vec<String> {
        self._stderr.try_iter().collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Hoard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Like [`request`], but `None` when the server is gone or answers nothing
/// (for clients of a server that may be killed at any moment).
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let mut c = std::io::Cursor::new(raw);
    Some(parse_response(&mut c, method == "HEAD"))
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    read_response(&mut s, method == "HEAD")
}

pub fn read_response(s: &mut TcpStream, head_only: bool) -> Resp {
    parse_response(s, head_only)
}

fn parse_response(s: &mut impl Read, head_only: bool) -> Resp {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked && !head_only {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let start = eol + 2;
        if b.len() < start + n {
            out.extend_from_slice(&b[start..]);
            break;
        }
        out.extend_from_slice(&b[start..start + n]);
        b = &b[(start + n + 2).min(b.len())..];
    }
    out
}

/// Every file under `dir` (relative paths), except the lock file.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.retain(|p| p != ".hoard.lock");
    out.sort();
    out
}

/// Pseudo-random bytes that zstd cannot shrink.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// A port nothing listens on right now (a server started on it next will
/// almost always get it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
