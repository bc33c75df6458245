//! The upload journal and outcome ledger: why a restart, or a `kill -9` at
//! any instant, loses no upload and no count, and counts nothing twice.
//!
//! Records, one line each:
//!
//! ```text
//! # <epoch> <next seq>                         header (first line after a compaction)
//! + <ns> <kind> <hash> <bytes> <nonce>           a job was queued
//! = <seq> <ns> <kind> <hash> <status> <bytes> <unix secs> [~<nonce>]
//!                                                the job ended: its outcome; `~nonce`:
//!                                                it ended `error` but may have created the
//!                                                object with that writer nonce
//! ? <ns> <kind> <hash> <nonce>                   such a nonce, still unresolved (after a compaction)
//! ~ <ns> <kind> <hash> <nonce>                   an earlier writer nonce of a key still queued
//!                                                (after a compaction; see below)
//! ! <seq> <ns> <kind> <status> <bytes> <unix secs>
//!                                                a counted event with no job (rejected)
//! - <ns> <kind> <hash>                           a job ended (older journals)
//! ```
//!
//! A job's end and its outcome are one record, written in one `write(2)` on
//! a file opened with `O_APPEND`: once it is in the kernel the job is done
//! *and* its outcome is durable, so there is no instant at which a crash
//! could lose the count (outcome reported, journal not yet updated) or count
//! it twice (job replayed after its outcome was counted). Lines of
//! concurrent writers never interleave. (A power cut can still lose the last
//! records: the journal is not fsynced per record.)
//!
//! Each outcome has a sequence number, increasing over the journal's life;
//! with the journal's random epoch it names the outcome for good, so
//! accounting can build batches whose ids come from ledger positions (a
//! batch rebuilt after a crash has the same id). Outcomes stay in the
//! journal until accounting says it has spooled them ([`Journal::consumed`]).
//!
//! At start the journal is replayed: jobs queued and not ended are queued
//! again, and outcomes are handed back for accounting to pick up what it
//! had not spooled.
//!
//! A key queued twice replays as two jobs with the latest nonce, and an
//! outcome record does not say which of them it ended. So when a key still
//! has jobs queued, every writer nonce it was queued with since its last
//! `created` outcome comes back as unresolved: one of those jobs may have
//! created the object and died before its outcome was written, and the
//! object's writer tag then names that job, not the latest. This cannot
//! count an object twice: a job whose request created an object ends
//! `created` (or `error` with its nonce unresolved), so a nonce whose job
//! ended otherwise is on no object, and a `created` outcome drops the
//! key's nonces. While running, the journal is compacted once it holds
//! many dead records: it is rewritten (temp file + rename) with the header,
//! the pending jobs and the outcomes not yet consumed. When a rewrite cannot
//! be made (a full disk), the journal is kept as it is and appended to, so a
//! full disk delays compaction and never stops the daemon from starting.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// An outcome (or job-less event) as the ledger holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub seq: u64,
    pub namespace: String,
    pub kind: Kind,
    /// `created`, `already_exists`, `error`, `dropped` or `rejected`.
    pub status: String,
    pub bytes: u64,
    /// Unix seconds.
    pub at: u64,
}

/// Compact once this many records were written since the last compaction
/// and most of them are dead.
const COMPACT_AFTER: u64 = 200_000;

pub struct Journal {
    path: PathBuf,
    state: parking_lot::Mutex<State>,
}

/// A live job: first position, bytes, times queued, latest nonce.
type Live = (u64, u64, u32, u64);

struct State {
    file: File,
    epoch: u64,
    next_seq: u64,
    /// Outcomes up to here are spooled by accounting and may be dropped.
    consumed: u64,
    /// Keep outcomes for accounting at all.
    retain: bool,
    /// Live jobs.
    pending: HashMap<JobKey, Live>,
    /// Outcome lines not yet consumed, by seq.
    outcomes: BTreeMap<u64, String>,
    /// Per key, writer nonces of jobs that ended `error` after a request
    /// that may have created the object: a later job that finds the object
    /// with one of these tags counts it `created` (it never was).
    unresolved: HashMap<JobKey, Vec<u64>>,
    /// Per key with jobs queued: every writer nonce it was queued with
    /// since its last `created` outcome (see the module doc).
    writers: HashMap<JobKey, Vec<u64>>,
    order: u64,
    written: u64,
}

/// Notes that `key` was queued with `nonce`.
fn add_writer(writers: &mut HashMap<JobKey, Vec<u64>>, key: &JobKey, nonce: u64) {
    let w = writers.entry(key.clone()).or_default();
    if !w.contains(&nonce) {
        w.push(nonce);
    }
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

fn ns_of(field: &str) -> String {
    if field == "." {
        String::new()
    } else {
        field.to_string()
    }
}

impl Journal {
    /// Opens the journal. Returns it, the jobs it holds that never ended
    /// (with their bytes and latest nonce, in the order first queued), and
    /// every outcome it still holds, in sequence order. With `retain`
    /// false (no accounting), outcomes are not kept past compaction.
    pub fn open(path: &Path, retain: bool) -> io::Result<(Journal, Vec<Pending>, Vec<Recorded>)> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let replayed = replay(&text);
        let epoch = replayed
            .epoch
            .unwrap_or_else(|| std::hash::RandomState::new().hash_one(SystemTime::now()) | 1);
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut st = State {
            file,
            epoch,
            next_seq: replayed.next_seq,
            consumed: 0,
            retain,
            pending: replayed.pending.clone(),
            outcomes: replayed
                .outcomes
                .iter()
                .map(|(r, line)| (r.seq, line.clone()))
                .collect(),
            order: replayed.order,
            written: 0,
            unresolved: replayed.unresolved.clone(),
            writers: replayed.writers.clone(),
        };
        if !retain {
            st.outcomes.clear();
        }
        let journal = Journal {
            path: path.to_path_buf(),
            state: parking_lot::Mutex::new(st),
        };
        // Rewrite now, so the file starts small and carries its header.
        {
            let mut st = journal.state.lock();
            if let Err(e) = journal.compact(&mut st) {
                tracing::warn!(path = %path.display(), error = %e, "cannot compact the upload journal; appending to it as it is");
                if replayed.epoch.is_none() {
                    // Without a header the epoch would change at the next
                    // start; write one as an ordinary record.
                    let h = header(epoch, st.next_seq);
                    let _ = st.file.write_all(h.as_bytes());
                }
            }
        }
        let mut pending: Vec<(u64, Pending)> = replayed
            .pending
            .into_iter()
            .flat_map(|(k, (order, bytes, count, nonce))| {
                (0..count).map(move |_| (order, (k.clone(), bytes, nonce)))
            })
            .collect();
        pending.sort_by_key(|(o, _)| *o);
        let outcomes = replayed.outcomes.into_iter().map(|(r, _)| r).collect();
        Ok((
            journal,
            pending.into_iter().map(|(_, p)| p).collect(),
            outcomes,
        ))
    }

    /// The journal's epoch: with a sequence number it names an outcome
    /// uniquely, across restarts and across a journal that was deleted.
    pub fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    pub fn added(&self, k: &JobKey, bytes: u64, nonce: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let line = format!(
            "+ {} {} {} {} {:x}\n",
            ns_field(&k.namespace),
            k.kind.as_str(),
            k.hash,
            bytes,
            nonce
        );
        st.file.write_all(line.as_bytes())?;
        st.order += 1;
        let order = st.order;
        let e = st
            .pending
            .entry(k.clone())
            .or_insert((order, bytes, 0, nonce));
        e.1 = bytes;
        e.2 += 1;
        e.3 = nonce;
        add_writer(&mut st.writers, k, nonce);
        self.after_write(&mut st);
        Ok(())
    }

    /// Writer nonces of earlier jobs for `k` that may have created the
    /// object without counting it.
    pub fn unresolved(&self, k: &JobKey) -> Vec<u64> {
        self.state
            .lock()
            .unresolved
            .get(k)
            .cloned()
            .unwrap_or_default()
    }

    /// Ends a job with its outcome, durably, and runs `then` with the
    /// outcome's sequence number while no other record can be written, so
    /// whoever `then` reports to sees outcomes in sequence order. Returns
    /// the sequence number; on a write error the outcome still gets one
    /// (and `then` runs) but will not survive a restart.
    ///
    /// `maybe_created`: the job ends `error` although a request of it, with
    /// this writer nonce, may have created the object. A `created` or
    /// `already_exists` outcome settles the key's unresolved nonces.
    pub fn done(
        &self,
        k: &JobKey,
        status: &str,
        bytes: u64,
        at: SystemTime,
        maybe_created: Option<u64>,
        then: impl FnOnce(u64),
    ) -> io::Result<u64> {
        let mut st = self.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let tail = maybe_created
            .map(|n| format!(" ~{n:x}"))
            .unwrap_or_default();
        let line = format!(
            "= {seq} {} {} {} {status} {bytes} {}{tail}\n",
            ns_field(&k.namespace),
            k.kind.as_str(),
            k.hash,
            unix(at)
        );
        if matches!(status, "created" | "already_exists") {
            st.unresolved.remove(k);
        }
        if let Some(n) = maybe_created {
            st.unresolved.entry(k.clone()).or_default().push(n);
        }
        let written = st.file.write_all(line.as_bytes());
        if status == "created" {
            st.writers.remove(k);
        }
        if let Some(e) = st.pending.get_mut(k) {
            e.2 = e.2.saturating_sub(1);
            if e.2 == 0 {
                st.pending.remove(k);
                st.writers.remove(k);
            }
        }
        if st.retain && written.is_ok() {
            st.outcomes.insert(seq, line);
        }
        then(seq);
        self.after_write(&mut st);
        written.map(|()| seq)
    }

    /// Records a counted event that belongs to no job (a refused client
    /// upload), like [`Journal::done`].
    pub fn event(
        &self,
        namespace: &str,
        kind: Kind,
        status: &str,
        bytes: u64,
        at: SystemTime,
        then: impl FnOnce(u64),
    ) -> io::Result<u64> {
        let mut st = self.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let line = format!(
            "! {seq} {} {} {status} {bytes} {}\n",
            ns_field(namespace),
            kind.as_str(),
            unix(at)
        );
        let written = st.file.write_all(line.as_bytes());
        if st.retain && written.is_ok() {
            st.outcomes.insert(seq, line);
        }
        then(seq);
        self.after_write(&mut st);
        written.map(|()| seq)
    }

    /// Accounting has spooled every outcome up to `seq`: they need not be
    /// kept any longer.
    pub fn consumed(&self, seq: u64) {
        let mut st = self.state.lock();
        st.consumed = st.consumed.max(seq);
        let keep = st.outcomes.split_off(&(seq + 1));
        st.outcomes = keep;
    }

    fn after_write(&self, st: &mut State) {
        st.written += 1;
        let live = st.pending.len() as u64 + st.outcomes.len() as u64;
        if st.written >= COMPACT_AFTER && st.written > 2 * live {
            if let Err(e) = self.compact(st) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot compact the upload journal; appending to it as it is");
            }
            st.written = 0;
        }
    }

    /// Rewrites the journal with only what is live. On failure the old
    /// journal is untouched (and still appended to); the temp file is
    /// removed.
    fn compact(&self, st: &mut State) -> io::Result<()> {
        let tmp = self.path.with_extension("journal.tmp");
        let written = (|| {
            let mut text = header(st.epoch, st.next_seq);
            // Outcomes first: replayed after the live jobs, an outcome of an
            // earlier job of the same key would end a live one, and a
            // `created` or `already_exists` would settle nonces still open.
            for line in st.outcomes.values() {
                text.push_str(line);
            }
            let mut live: Vec<(&JobKey, &Live)> = st.pending.iter().collect();
            live.sort_by_key(|(_, v)| v.0);
            for (k, (_, bytes, count, nonce)) in live {
                for _ in 0..*count {
                    text.push_str(&format!(
                        "+ {} {} {} {bytes} {nonce:x}\n",
                        ns_field(&k.namespace),
                        k.kind.as_str(),
                        k.hash
                    ));
                }
                for n in st.writers.get(k).into_iter().flatten() {
                    if n != nonce {
                        text.push_str(&format!(
                            "~ {} {} {} {n:x}\n",
                            ns_field(&k.namespace),
                            k.kind.as_str(),
                            k.hash
                        ));
                    }
                }
            }
            for (k, nonces) in &st.unresolved {
                for n in nonces {
                    text.push_str(&format!(
                        "? {} {} {} {n:x}\n",
                        ns_field(&k.namespace),
                        k.kind.as_str(),
                        k.hash
                    ));
                }
            }
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            OpenOptions::new().append(true).open(&self.path)
        })();
        match written {
            Ok(file) => {
                st.file = file;
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

fn header(epoch: u64, next_seq: u64) -> String {
    format!("# {epoch:x} {next_seq}\n")
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Default)]
struct Replayed {
    epoch: Option<u64>,
    next_seq: u64,
    pending: HashMap<JobKey, Live>,
    outcomes: Vec<(Recorded, String)>,
    order: u64,
    unresolved: HashMap<JobKey, Vec<u64>>,
    /// As `State::writers`.
    writers: HashMap<JobKey, Vec<u64>>,
}

/// Replays any text as a journal and checks what the replay promises: it
/// never panics, and what it finds pending or recorded is the same when the
/// text is replayed again. For the fuzz targets.
pub fn check_replay(text: &str) -> (usize, usize) {
    let a = replay(text);
    let b = replay(text);
    assert_eq!(a.pending, b.pending, "replay is not deterministic");
    assert_eq!(a.outcomes.len(), b.outcomes.len());
    (a.pending.len(), a.outcomes.len())
}

fn replay(text: &str) -> Replayed {
    let mut r = Replayed {
        next_seq: 1,
        ..Default::default()
    };
    let mut outcomes: BTreeMap<u64, (Recorded, String)> = BTreeMap::new();
    for line in text.split_inclusive('\n') {
        // A torn last line (a crash mid-write) has no newline: skip it.
        let Some(body) = line.strip_suffix('\n') else {
            continue;
        };
        let f: Vec<&str> = body.split(' ').collect();
        match f.as_slice() {
            ["#", epoch, next] => {
                if let (Ok(e), Ok(n)) = (u64::from_str_radix(epoch, 16), next.parse::<u64>()) {
                    r.epoch.get_or_insert(e);
                    r.next_seq = r.next_seq.max(n);
                }
            }
            ["+", ns, kind, hash, bytes, nonce] => {
                let (Some(kind), Ok(hash), Ok(bytes), Ok(nonce)) = (
                    parse_kind(kind),
                    Hash::parse(hash),
                    bytes.parse::<u64>(),
                    u64::from_str_radix(nonce, 16),
                ) else {
                    continue;
                };
                r.order += 1;
                let key = JobKey {
                    namespace: ns_of(ns),
                    kind,
                    hash,
                };
                add_writer(&mut r.writers, &key, nonce);
                let e = r.pending.entry(key).or_insert((r.order, bytes, 0, nonce));
                e.1 = bytes;
                e.2 += 1;
                // The latest attempt's nonce: its writer tag is the one an
                // object this job may have created carries.
                e.3 = nonce;
            }
            ["=", seq, ns, kind, hash, status, bytes, at, rest @ ..] => {
                let maybe = rest
                    .first()
                    .and_then(|t| t.strip_prefix('~'))
                    .and_then(|n| u64::from_str_radix(n, 16).ok());
                let (Ok(seq), Some(kind), Ok(hash), Ok(bytes), Ok(at)) = (
                    seq.parse::<u64>(),
                    parse_kind(kind),
                    Hash::parse(hash),
                    bytes.parse::<u64>(),
                    at.parse::<u64>(),
                ) else {
                    continue;
                };
                let key = JobKey {
                    namespace: ns_of(ns),
                    kind,
                    hash,
                };
                end_job(&mut r.pending, &key);
                if matches!(*status, "created" | "already_exists") {
                    r.unresolved.remove(&key);
                }
                if *status == "created" || !r.pending.contains_key(&key) {
                    r.writers.remove(&key);
                }
                if let Some(n) = maybe {
                    r.unresolved.entry(key.clone()).or_default().push(n);
                }
                r.next_seq = r.next_seq.max(seq + 1);
                let rec = Recorded {
                    seq,
                    namespace: key.namespace,
                    kind,
                    status: status.to_string(),
                    bytes,
                    at,
                };
                outcomes.insert(seq, (rec, line.to_string()));
            }
            ["!", seq, ns, kind, status, bytes, at] => {
                let (Ok(seq), Some(kind), Ok(bytes), Ok(at)) = (
                    seq.parse::<u64>(),
                    parse_kind(kind),
                    bytes.parse::<u64>(),
                    at.parse::<u64>(),
                ) else {
                    continue;
                };
                r.next_seq = r.next_seq.max(seq + 1);
                let rec = Recorded {
                    seq,
                    namespace: ns_of(ns),
                    kind,
                    status: status.to_string(),
                    bytes,
                    at,
                };
                outcomes.insert(seq, (rec, line.to_string()));
            }
            [tag @ ("?" | "~"), ns, kind, hash, nonce] => {
                if let (Some(kind), Ok(hash), Ok(n)) = (
                    parse_kind(kind),
                    Hash::parse(hash),
                    u64::from_str_radix(nonce, 16),
                ) {
                    let key = JobKey {
                        namespace: ns_of(ns),
                        kind,
                        hash,
                    };
                    if *tag == "?" {
                        r.unresolved.entry(key).or_default().push(n);
                    } else {
                        add_writer(&mut r.writers, &key, n);
                    }
                }
            }
            ["-", ns, kind, hash] => {
                if let (Some(kind), Ok(hash)) = (parse_kind(kind), Hash::parse(hash)) {
                    let key = JobKey {
                        namespace: ns_of(ns),
                        kind,
                        hash,
                    };
                    end_job(&mut r.pending, &key);
                    if !r.pending.contains_key(&key) {
                        r.writers.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }
    // Keys still queued: each of their writer nonces may be on an object
    // whose outcome was never written (see the module doc).
    r.writers.retain(|k, _| r.pending.contains_key(k));
    for (k, nonces) in &r.writers {
        let latest = r.pending.get(k).map(|e| e.3);
        let u = r.unresolved.entry(k.clone()).or_default();
        for n in nonces {
            if Some(*n) != latest && !u.contains(n) {
                u.push(*n);
            }
        }
    }
    r.outcomes = outcomes.into_values().collect();
    r
}

fn end_job(pending: &mut HashMap<JobKey, Live>, key: &JobKey) {
    if let Some(e) = pending.get_mut(key) {
        e.2 = e.2.saturating_sub(1);
        if e.2 == 0 {
            pending.remove(key);
        }
    }
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

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hoard-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    const T: SystemTime = UNIX_EPOCH;

    /// A key queued twice replays as two jobs with the latest nonce; the
    /// object an earlier one may have created carries the earlier nonce,
    /// so that nonce must come back unresolved, whatever else happened to
    /// the key, and only while it may be on an uncounted object.
    #[test]
    fn earlier_writers_of_a_key_still_queued_come_back_unresolved() {
        let d = dir("writers");
        let path = d.join("upload.journal");
        let (k, other, third) = (key(1, Kind::Ac), key(2, Kind::Ac), key(3, Kind::Ac));
        {
            let (j, _, _) = Journal::open(&path, true).unwrap();
            // Two jobs of `k`; the first may have created the object and
            // died before its outcome, the second found it and said so.
            j.added(&k, 83, 0xa).unwrap();
            j.added(&k, 83, 0xb).unwrap();
            j.done(&k, "already_exists", 0, T, None, |_| {}).unwrap();
            // `other` was created and counted, then queued again.
            j.added(&other, 83, 0xc).unwrap();
            j.done(&other, "created", 83, T, None, |_| {}).unwrap();
            j.added(&other, 83, 0xd).unwrap();
            // `third`: both jobs ended, nothing queued.
            j.added(&third, 83, 0xe).unwrap();
            j.added(&third, 83, 0xf).unwrap();
            j.done(&third, "already_exists", 0, T, None, |_| {})
                .unwrap();
            j.done(&third, "already_exists", 0, T, None, |_| {})
                .unwrap();
        }
        let (j, pending, _) = Journal::open(&path, true).unwrap();
        assert_eq!(pending.len(), 2, "{pending:?}");
        assert_eq!(j.unresolved(&k), vec![0xa]);
        assert!(j.unresolved(&other).is_empty(), "counted: nothing open");
        assert!(j.unresolved(&third).is_empty(), "nothing queued");
        // Across the compaction `open` makes, and another start.
        drop(j);
        let (j, _, _) = Journal::open(&path, true).unwrap();
        assert_eq!(j.unresolved(&k), vec![0xa]);
        // A compaction while both jobs are live keeps the earlier nonce.
        let k2 = key(4, Kind::Cas);
        j.added(&k2, 4096, 0x11).unwrap();
        j.added(&k2, 4096, 0x12).unwrap();
        j.compact(&mut j.state.lock()).unwrap();
        drop(j);
        let (j, _, _) = Journal::open(&path, true).unwrap();
        assert_eq!(j.unresolved(&k2), vec![0x11]);
        // Once one job counts it `created`, the question is settled.
        j.done(&k2, "created", 4096, T, None, |_| {}).unwrap();
        drop(j);
        let (j, _, _) = Journal::open(&path, true).unwrap();
        assert!(j.unresolved(&k2).is_empty());
    }

    #[test]
    fn pending_jobs_and_outcomes_survive_reopen() {
        let d = dir("reopen");
        let path = d.join("upload.journal");
        let epoch;
        {
            let (j, pending, outcomes) = Journal::open(&path, true).unwrap();
            assert!(pending.is_empty() && outcomes.is_empty());
            epoch = j.epoch();
            for i in 0..5 {
                j.added(&key(i, Kind::Cas), 4096 * i as u64, 7).unwrap();
            }
            assert_eq!(
                j.done(&key(1, Kind::Cas), "created", 11, T, None, |_| {})
                    .unwrap(),
                1
            );
            assert_eq!(
                j.done(&key(3, Kind::Cas), "error", 12, T, Some(0xabc), |_| {})
                    .unwrap(),
                2
            );
            assert_eq!(
                j.event("team", Kind::Ac, "rejected", 0, T, |_| {}).unwrap(),
                3
            );
            j.added(&key(9, Kind::Ac), 4096, 8).unwrap();
            // A key queued again (a re-PUT) replays with its latest nonce.
            j.added(&key(4, Kind::Cas), 4096 * 4, 0x99).unwrap();
        }
        // A torn final record is ignored.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"= 4 . cas 12")
            .unwrap();
        let (j, pending, outcomes) = Journal::open(&path, true).unwrap();
        assert_eq!(j.epoch(), epoch, "the epoch survives");
        let keys: Vec<JobKey> = pending.iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(
            keys,
            vec![
                key(0, Kind::Cas),
                key(2, Kind::Cas),
                key(4, Kind::Cas),
                key(4, Kind::Cas),
                key(9, Kind::Ac),
            ]
        );
        assert_eq!(pending[2].2, 0x99);
        // An error that may have created the object stays unresolved.
        assert_eq!(j.unresolved(&key(3, Kind::Cas)), vec![0xabc]);
        let seqs: Vec<(u64, &str)> = outcomes
            .iter()
            .map(|o| (o.seq, o.status.as_str()))
            .collect();
        assert_eq!(seqs, vec![(1, "created"), (2, "error"), (3, "rejected")]);
        // Sequence numbers go on; consumed outcomes are dropped at the next
        // compaction.
        assert_eq!(
            j.done(&key(0, Kind::Cas), "created", 5, T, None, |_| {})
                .unwrap(),
            4
        );
        j.consumed(3);
        {
            let mut st = j.state.lock();
            j.compact(&mut st).unwrap();
        }
        drop(j);
        let (_j, pending, outcomes) = Journal::open(&path, true).unwrap();
        assert_eq!(pending.len(), 4);
        let seqs: Vec<u64> = outcomes.iter().map(|o| o.seq).collect();
        assert_eq!(seqs, vec![4], "only the unconsumed outcome is kept");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_journal_is_compacted_while_running_and_keeps_what_is_live() {
        let d = dir("compact");
        let path = d.join("upload.journal");
        let (j, _, _) = Journal::open(&path, true).unwrap();
        let n = COMPACT_AFTER as usize;
        for i in 0..n {
            let k = JobKey {
                namespace: String::new(),
                kind: Kind::Cas,
                hash: Hash([(i % 251) as u8; 32]),
            };
            j.added(&k, 1, i as u64).unwrap();
            j.done(&k, "created", 1, T, None, |_| {}).unwrap();
            j.consumed(i as u64 + 1);
        }
        j.added(&key(7, Kind::Cas), 3, 3).unwrap();
        let len = fs::metadata(&path).unwrap().len();
        assert!(len < 10_000_000, "compacted while running: {len} bytes");
        drop(j);
        let (_j, pending, outcomes) = Journal::open(&path, true).unwrap();
        assert_eq!(pending.len(), 1);
        assert!(outcomes.len() < 10, "{} outcomes kept", outcomes.len());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn older_journals_replay() {
        let d = dir("old");
        let path = d.join("upload.journal");
        let h = Hash([5; 32]);
        fs::write(
            &path,
            format!(
                "+ . cas {h} 10 a\n+ . cas {} 10 b\n- . cas {h}\n",
                Hash([6; 32])
            ),
        )
        .unwrap();
        let (_j, pending, outcomes) = Journal::open(&path, false).unwrap();
        assert_eq!(pending.len(), 1);
        assert!(outcomes.is_empty());
        let _ = fs::remove_dir_all(&d);
    }
}
