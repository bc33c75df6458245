//! A real ClickHouse server (Debian's clickhouse-server, installed by
//! tests/run.sh) on loopback, with hoard's schema applied.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use crate::support::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct ClickHouse {
    child: Option<Child>,
    pub http_port: u16,
    dir: PathBuf,
}

const SERVER: &str = "/usr/sbin/clickhouse-server";

impl ClickHouse {
    /// Starts a server with its data in `dir` and creates hoard's table.
    pub fn start(dir: &Path) -> ClickHouse {
        assert!(
            Path::new(SERVER).exists(),
            "{SERVER} not found: run the README's test command (tests/run.sh), which installs clickhouse-server"
        );
        std::fs::create_dir_all(dir.join("data/tmp")).unwrap();
        let (http_port, tcp_port) = (free_port(), free_port());
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/data/tmp/</tmp_path>
  <user_files_path>{d}/data/user_files/</user_files_path>
  <mark_cache_size>536870912</mark_cache_size>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <profiles><default></default></profiles>
  <quotas><default></default></quotas>
</yandex>
"#,
            d = dir.display()
        );
        std::fs::write(dir.join("config.xml"), config).unwrap();
        let mut ch = ClickHouse {
            child: None,
            http_port,
            dir: dir.to_path_buf(),
        };
        ch.restart();
        let schema = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/clickhouse/schema.sql"),
        )
        .unwrap();
        ch.query(&schema);
        ch
    }

    /// (Re)starts the server on the same ports and data.
    pub fn restart(&mut self) {
        #[allow(clippy::zombie_processes)] // waited for in stop()
        let child = Command::new(SERVER)
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting clickhouse-server");
        self.child = Some(child);
        for _ in 0..200 {
            if http(self.http_port, "GET", "/ping", b"").is_some_and(|r| r.contains("Ok.")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "clickhouse-server did not answer /ping; see {}/error.log",
            self.dir.display()
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Runs a query; panics on an error answer.
    pub fn query(&self, sql: &str) -> String {
        let r =
            http(self.http_port, "POST", "/", sql.as_bytes()).expect("ClickHouse answered nothing");
        let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "query failed: {sql}\n{r}");
        body.to_string()
    }

    /// Net-new bytes per namespace, read the documented way (queries.sql).
    pub fn footprint(&self) -> std::collections::BTreeMap<String, u64> {
        let sql = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/clickhouse/queries.sql"),
        )
        .unwrap();
        let body = self.query(&format!("{sql} FORMAT TSV"));
        body.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((f.first()?.to_string(), f.get(1)?.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 request, Connection: close; the whole raw answer.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: ch\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    Some(dechunk_body(&text))
}

fn dechunk_body(raw: &str) -> String {
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        return raw.to_string();
    };
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return raw.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    format!("{head}\r\n\r\n{out}")
}

/// A TCP proxy in front of ClickHouse that lets the first INSERT reach the
/// server and then cuts the connection before the answer gets back: the
/// insert happened, but its sender never hears so.
pub struct LosingProxy {
    pub port: u16,
    pub dropped: Arc<AtomicBool>,
}

impl LosingProxy {
    pub fn start(target: u16) -> LosingProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let dropped = Arc::new(AtomicBool::new(false));
        let d2 = dropped.clone();
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let d3 = d2.clone();
                std::thread::spawn(move || relay(client, server, &d3));
            }
        });
        LosingProxy { port, dropped }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn relay(mut client: TcpStream, mut server: TcpStream, dropped: &AtomicBool) {
    let mut first = [0u8; 4096];
    let Ok(n) = client.read(&mut first) else {
        return;
    };
    let is_insert = String::from_utf8_lossy(&first[..n])
        .to_ascii_uppercase()
        .contains("INSERT");
    let lose = is_insert && !dropped.swap(true, Ordering::SeqCst);
    if server.write_all(&first[..n]).is_err() {
        return;
    }
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Write);
    });
    if lose {
        // Wait for the server's answer (the insert is done), then drop it.
        let mut buf = [0u8; 1];
        let _ = server.read(&mut buf);
        let _ = client.shutdown(std::net::Shutdown::Both);
        let _ = server.shutdown(std::net::Shutdown::Both);
    } else {
        let _ = std::io::copy(&mut server, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
    }
    let _ = up.join();
}
