//! The spool: batches waiting for ClickHouse, one file each, sent in order.
//!
//! A batch is written here (temp file, fsync, rename) before any attempt to
//! send it, and its file is deleted only after ClickHouse acknowledged the
//! INSERT. So a batch is sent at least once whatever fails; its batch_id
//! (kept in the file) lets the table count it once.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::Batch;

pub struct Spool {
    dir: PathBuf,
    next_seq: u64,
}

impl Spool {
    pub fn open(dir: &Path) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut next_seq = 0;
        for e in fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
                continue;
            }
            if let Some(seq) = name
                .strip_suffix(".batch")
                .and_then(|s| s.parse::<u64>().ok())
            {
                next_seq = next_seq.max(seq + 1);
            }
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            next_seq,
        })
    }

    /// Bytes the spooled batches take.
    pub fn bytes(&self) -> u64 {
        self.files()
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Spooled batch files, oldest first.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let seq = name.strip_suffix(".batch")?.parse::<u64>().ok()?;
                        Some((seq, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Writes a batch durably; returns its size in bytes.
    pub fn push(&mut self, batch: &Batch) -> io::Result<u64> {
        let text = serde_json::to_vec(batch).map_err(io::Error::other)?;
        let name = format!("{:020}.batch", self.next_seq);
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(&name))?;
        // The rename is what makes the batch exist: persist the directory.
        fs::File::open(&self.dir)?.sync_all()?;
        self.next_seq += 1;
        Ok(text.len() as u64)
    }

    pub fn read(path: &Path) -> io::Result<Batch> {
        let text = fs::read(path)?;
        serde_json::from_slice(&text).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Row;

    fn batch(id: &str) -> Batch {
        Batch {
            batch_id: id.into(),
            rows: vec![Row {
                created_at: 60,
                host: "h".into(),
                namespace: String::new(),
                kind: "cas".into(),
                status: "created".into(),
                count: 1,
                bytes: 4096,
                batch_id: id.into(),
            }],
            epoch: 1,
            first_seq: 1,
            last_seq: 1,
        }
    }

    #[test]
    fn batches_come_back_in_order_after_a_reopen_and_temp_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path()).unwrap();
            for id in ["a", "b", "c"] {
                s.push(&batch(id)).unwrap();
            }
        }
        fs::write(dir.path().join("00000000000000000009.batch.tmp"), b"torn").unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let ids: Vec<String> = s
            .files()
            .iter()
            .map(|p| Spool::read(p).unwrap().batch_id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        fs::remove_file(&s.files()[0]).unwrap();
        s.push(&batch("d")).unwrap();
        let ids: Vec<String> = s
            .files()
            .iter()
            .map(|p| Spool::read(p).unwrap().batch_id)
            .collect();
        assert_eq!(ids, ["b", "c", "d"]);
        assert!(s.bytes() > 0);
    }
}
