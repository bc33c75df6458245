//! The upload journal: why a restart, or a `kill -9`, loses no upload.
//!
//! Each job is recorded (`+ ns kind hash bytes nonce`) before it is queued
//! and marked done (`- ns kind hash`) when it reaches its terminal outcome.
//! Each record is one `write(2)` on a file opened with `O_APPEND`, so once
//! `enqueue` returns the record is in the kernel and survives the process
//! being killed; the lines of concurrent writers never interleave. (A power
//! cut can still lose the last records: the journal is not fsynced per job.)
//!
//! At start the journal is replayed: jobs added and not done are queued
//! again, and the file is rewritten with just those (temp file + rename).
//! When the rewrite cannot be made (a full disk), the journal is kept as it
//! is and appended to: replay reads it the same way, so a full disk delays
//! compaction and never stops the daemon from starting.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use hoard_disk::{Hash, Kind};

/// A job as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub namespace: String,
    pub kind: Kind,
    pub hash: Hash,
}

/// A job the journal holds: its key, object bytes and nonce.
pub type Pending = (JobKey, u64, u64);

pub struct Journal {
    file: parking_lot::Mutex<File>,
}

fn kind_code(k: Kind) -> &'static str {
    k.as_str()
}

fn parse_kind(s: &str) -> Option<Kind> {
    match s {
        "ac" => Some(Kind::Ac),
        "cas" => Some(Kind::Cas),
        "raw" => Some(Kind::Raw),
        _ => None,
    }
}

fn ns_field(ns: &str) -> &str {
    if ns.is_empty() { "." } else { ns }
}

impl Journal {
    /// Opens the journal, returning the jobs it holds that never finished,
    /// with their bytes and nonce, in the order they were first queued.
    pub fn open(path: &Path) -> io::Result<(Journal, Vec<Pending>)> {
        let pending = match fs::read_to_string(path) {
            Ok(text) => replay(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        if let Err(e) = compact(path, &pending) {
            tracing::warn!(path = %path.display(), error = %e, "cannot compact the upload journal; appending to it as it is");
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok((
            Journal {
                file: parking_lot::Mutex::new(file),
            },
            pending,
        ))
    }

    pub fn added(&self, k: &JobKey, bytes: u64, nonce: u64) -> io::Result<()> {
        self.write(&add_line(k, bytes, nonce))
    }

    pub fn done(&self, k: &JobKey) -> io::Result<()> {
        self.write(&format!(
            "- {} {} {}\n",
            ns_field(&k.namespace),
            kind_code(k.kind),
            k.hash
        ))
    }

    fn write(&self, line: &str) -> io::Result<()> {
        // One write call per record (see the module doc).
        self.file.lock().write_all(line.as_bytes())
    }
}

/// Rewrites the journal with only what is pending, so the file stays small.
/// On failure the old journal is untouched and the temp file removed.
fn compact(path: &Path, pending: &[Pending]) -> io::Result<()> {
    let tmp = path.with_extension("journal.tmp");
    let written = (|| {
        let mut f = File::create(&tmp)?;
        let mut text = String::new();
        for (k, size, nonce) in pending {
            text.push_str(&add_line(k, *size, *nonce));
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn add_line(k: &JobKey, size: u64, nonce: u64) -> String {
    format!(
        "+ {} {} {} {} {:x}\n",
        ns_field(&k.namespace),
        kind_code(k.kind),
        k.hash,
        size,
        nonce
    )
}

fn replay(text: &str) -> Vec<Pending> {
    let mut open: HashMap<JobKey, (usize, u64, u32, u64)> = HashMap::new();
    let mut seq = 0usize;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let parsed = match f.as_slice() {
            [op, ns, kind, hash, rest @ ..] => {
                let ns = if *ns == "." {
                    String::new()
                } else {
                    ns.to_string()
                };
                match (parse_kind(kind), Hash::parse(hash)) {
                    (Some(kind), Ok(hash)) => Some((
                        *op,
                        JobKey {
                            namespace: ns,
                            kind,
                            hash,
                        },
                        rest.first().and_then(|s| s.parse::<u64>().ok()),
                        rest.get(1).and_then(|s| u64::from_str_radix(s, 16).ok()),
                    )),
                    _ => None,
                }
            }
            _ => None,
        };
        // A torn last line (a crash mid-write) or garbage is skipped.
        let Some((op, key, size, nonce)) = parsed else {
            continue;
        };
        match op {
            "+" => {
                // A record cut short by a crash has no nonce: skip it.
                let Some(nonce) = nonce else { continue };
                seq += 1;
                let e = open.entry(key).or_insert((seq, 0, 0, nonce));
                e.1 = size.unwrap_or(e.1);
                e.2 += 1;
                // The latest attempt's nonce: its writer tag is the one an
                // object this job may have created carries.
                e.3 = nonce;
            }
            "-" => {
                if let Some(e) = open.get_mut(&key) {
                    e.2 = e.2.saturating_sub(1);
                    if e.2 == 0 {
                        open.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }
    let mut v: Vec<(usize, JobKey, u64, u64)> = open
        .into_iter()
        .map(|(k, (s, size, _, nonce))| (s, k, size, nonce))
        .collect();
    v.sort_by_key(|(s, _, _, _)| *s);
    v.into_iter()
        .map(|(_, k, size, nonce)| (k, size, nonce))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8, kind: Kind) -> JobKey {
        JobKey {
            namespace: if i.is_multiple_of(2) {
                String::new()
            } else {
                "team".into()
            },
            kind,
            hash: Hash([i; 32]),
        }
    }

    #[test]
    fn pending_jobs_survive_reopen_and_done_jobs_do_not() {
        let dir = std::env::temp_dir().join(format!("hoard-journal-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("upload.journal");
        {
            let (j, pending) = Journal::open(&path).unwrap();
            assert!(pending.is_empty());
            for i in 0..5 {
                j.added(&key(i, Kind::Cas), 4096 * i as u64, 7).unwrap();
            }
            j.done(&key(1, Kind::Cas)).unwrap();
            j.done(&key(3, Kind::Cas)).unwrap();
            j.added(&key(9, Kind::Ac), 4096, 8).unwrap();
        }
        // A torn final record is ignored.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"+ . cas 12")
            .unwrap();
        // A key added again (a re-PUT) replays with its latest nonce.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(format!("\n{}", add_line(&key(4, Kind::Cas), 4096 * 4, 0x99)).as_bytes())
            .unwrap();
        let (j, pending) = Journal::open(&path).unwrap();
        let keys: Vec<JobKey> = pending.iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(
            keys,
            vec![
                key(0, Kind::Cas),
                key(2, Kind::Cas),
                key(4, Kind::Cas),
                key(9, Kind::Ac)
            ]
        );
        assert_eq!(
            (pending[2].1, pending[2].2, pending[3].2),
            (4096 * 4, 0x99, 8)
        );
        j.done(&key(0, Kind::Cas)).unwrap();
        drop(j);
        let (_j, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending.len(), 3);
        let _ = fs::remove_dir_all(&dir);
    }
}
