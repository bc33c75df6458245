//! Black-box tests of the disk cache through its public API.

// Test helpers may panic: a failed expectation is what a test reports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hoard_disk::casblob::{self, CHUNK_SIZE, Header};
use hoard_disk::{Committed, Config, DiskCache, Error, Hash, Kind, NamespaceId, StorageMode};
use sha2::{Digest, Sha256};

fn cfg(dir: &Path, max: u64) -> Config {
    Config {
        dir: dir.to_path_buf(),
        max_size_bytes: max,
        hard_limit_bytes: None,
        storage_mode: StorageMode::Zstd,
        fsync: false,
        max_namespaces: 16,
        quotas: Default::default(),
        load_pause: None,
        sizing_pause: None,
    }
}

fn sha(data: &[u8]) -> Hash {
    Hash(Sha256::digest(data).into())
}

fn put(c: &DiskCache, ns: NamespaceId, kind: Kind, data: &[u8]) -> Result<bool, Error> {
    let h = sha(data);
    let mut w = c.writer(ns, kind, h, data.len() as u64)?;
    for piece in data.chunks(7919) {
        w.write(piece)?;
    }
    Ok(w.commit()?.created)
}

fn read(c: &DiskCache, ns: NamespaceId, kind: Kind, h: &Hash) -> Option<Vec<u8>> {
    c.get(ns, kind, h)
        .unwrap()
        .map(|mut b| b.read_to_vec().unwrap())
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
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

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 31 + seed as usize) % 253) as u8)
        .collect()
}

#[test]
fn blobs_round_trip_in_both_storage_modes_and_survive_a_restart() {
    for mode in [StorageMode::Zstd, StorageMode::Uncompressed] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 1 << 30);
        c.storage_mode = mode;
        let blobs: Vec<Vec<u8>> = vec![data(1, 1), data(4096, 2), data(CHUNK_SIZE * 2 + 5, 3)];
        {
            let cache = DiskCache::open(c.clone()).unwrap();
            for b in &blobs {
                assert!(put(&cache, NamespaceId::DEFAULT, Kind::Cas, b).unwrap());
                assert_eq!(
                    read(&cache, NamespaceId::DEFAULT, Kind::Cas, &sha(b)).unwrap(),
                    *b
                );
            }
            cache.shutdown(std::time::Duration::from_secs(10));
        }
        let cache = DiskCache::open(c).unwrap();
        // Before the load reaches it, a lookup indexes the blob's directory
        // itself: a partial index never answers "absent".
        assert_eq!(
            read(&cache, NamespaceId::DEFAULT, Kind::Cas, &sha(&blobs[0])).as_ref(),
            Some(&blobs[0])
        );
        let report = cache.load();
        assert_eq!(report.entries, 3);
        for b in &blobs {
            let mut blob = cache
                .get(NamespaceId::DEFAULT, Kind::Cas, &sha(b))
                .unwrap()
                .unwrap();
            assert_eq!(blob.logical_size(), b.len() as u64);
            assert_eq!(blob.is_zstd_stream(), mode == StorageMode::Zstd);
            assert_eq!(blob.read_to_vec().unwrap(), *b);
        }
    }
}

#[test]
fn a_directory_written_the_way_bazel_remote_writes_it_loads_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let content = data(CHUNK_SIZE + 100, 9);
    let h = sha(&content);
    // A casblob built from the format's facts, named <hash>-<size>-<random>.
    let hl = casblob::header_len(content.len() as u64);
    let mut body = vec![];
    let mut offsets = vec![];
    for chunk in content.chunks(CHUNK_SIZE) {
        offsets.push((hl + body.len()) as u64);
        body.extend(zstd::bulk::compress(chunk, 1).unwrap());
    }
    offsets.push((hl + body.len()) as u64);
    let mut file = Header::encode(content.len() as u64, &offsets);
    file.extend(&body);
    let hx = h.to_hex();
    let cas_dir = dir.path().join("cas.v2").join(&hx[..2]);
    fs::create_dir_all(&cas_dir).unwrap();
    fs::write(
        cas_dir.join(format!("{hx}-{}-123456789", content.len())),
        &file,
    )
    .unwrap();
    // An uncompressed legacy file and an AC entry.
    let small = b"legacy bytes".to_vec();
    let sh = sha(&small).to_hex();
    let d = dir.path().join("cas.v2").join(&sh[..2]);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(format!("{sh}-987654321.v1")), &small).unwrap();
    let ak = "ab".repeat(32);
    let d = dir.path().join("ac.v2").join("ab");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(format!("{ak}-000000001")), b"\x08\x01").unwrap();
    // Foreign files do not stop the load.
    fs::create_dir_all(dir.path().join("cas.v2/00")).unwrap();
    fs::write(dir.path().join("cas.v2/00/README"), b"x").unwrap();
    fs::create_dir_all(dir.path().join("lost+found")).unwrap();
    fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    // A temp file left by a crash is reaped.
    fs::write(cas_dir.join(format!("{hx}-000000007.tmp")), b"partial").unwrap();

    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let report = cache.load();
    assert_eq!(report.entries, 3);
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(report.foreign_files, 2);
    assert_eq!(
        read(&cache, NamespaceId::DEFAULT, Kind::Cas, &h).unwrap(),
        content
    );
    assert_eq!(
        read(&cache, NamespaceId::DEFAULT, Kind::Cas, &sha(&small)).unwrap(),
        small
    );
    let ac = Hash::parse(&ak).unwrap();
    assert_eq!(
        read(&cache, NamespaceId::DEFAULT, Kind::Ac, &ac).unwrap(),
        b"\x08\x01"
    );
    assert!(!cas_dir.join(format!("{hx}-000000007.tmp")).exists());
}

#[test]
fn a_digest_mismatch_or_short_body_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let good = data(10_000, 1);
    let wrong = sha(b"something else");
    let mut w = cache
        .writer(NamespaceId::DEFAULT, Kind::Cas, wrong, good.len() as u64)
        .unwrap();
    w.write(&good).unwrap();
    match w.commit() {
        Err(Error::DigestMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha(&good));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    let mut w = cache
        .writer(
            NamespaceId::DEFAULT,
            Kind::Cas,
            sha(&good),
            good.len() as u64,
        )
        .unwrap();
    w.write(&good[..100]).unwrap();
    assert!(matches!(w.commit(), Err(Error::SizeMismatch { .. })));
    let mut w = cache
        .writer(NamespaceId::DEFAULT, Kind::Cas, sha(&good), 10)
        .unwrap();
    assert!(matches!(w.write(&good), Err(Error::SizeMismatch { .. })));
    drop(w);
    let w = cache
        .writer(
            NamespaceId::DEFAULT,
            Kind::Cas,
            sha(&good),
            good.len() as u64,
        )
        .unwrap();
    drop(w); // a client that went away
    assert_eq!(files_under(dir.path()), Vec::<String>::new());
    assert_eq!(cache.stats().reserved, 0);
    assert_eq!(cache.stats().entries, 0);
}

#[test]
fn concurrent_writers_of_one_blob_leave_one_file_and_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let commits = Arc::new(Mutex::new(Vec::<Committed>::new()));
    let c2 = commits.clone();
    cache.set_commit_hook(Box::new(move |c| c2.lock().unwrap().push(c.clone())));
    let blob = data(300_000, 4);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| put(&cache, NamespaceId::DEFAULT, Kind::Cas, &blob).unwrap());
        }
    });
    assert_eq!(files_under(dir.path()).len(), 1);
    let commits = commits.lock().unwrap();
    assert_eq!(
        commits.iter().filter(|c| c.new).count(),
        1,
        "one write stores it; the others find it present"
    );
    assert_eq!(commits.len(), 16, "the hook hears of every write");
    assert_eq!(
        read(&cache, NamespaceId::DEFAULT, Kind::Cas, &sha(&blob)).unwrap(),
        blob
    );
}

/// Waits until the evictor has brought the cache under `max` and deleted
/// what it took.
fn settle(cache: &DiskCache, max: u64) {
    for _ in 0..500 {
        let st = cache.stats();
        if st.size_on_disk <= max && st.pending_deletion == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("eviction did not settle: {:?}", cache.stats());
}

/// The hashes of the cache's CAS entries, found without marking any of
/// them used (nothing in these tests is uploaded).
fn present(cache: &DiskCache) -> Vec<Hash> {
    cache
        .not_uploaded(Kind::Cas, 10_000)
        .into_iter()
        .map(|(_, h)| h)
        .collect()
}

#[test]
fn eviction_keeps_the_size_under_max_and_takes_what_was_used_longest_ago() {
    let dir = tempfile::tempdir().unwrap();
    // Room for four 16 KiB blobs of incompressible data, not five.
    let max = 70 * 1024;
    let cache = DiskCache::open(cfg(dir.path(), max)).unwrap();
    let blobs: Vec<Vec<u8>> = (0..6u32).map(|i| noise(16_000, i)).collect();
    for b in &blobs[..5] {
        put(&cache, NamespaceId::DEFAULT, Kind::Cas, b).unwrap();
    }
    // All five were new, so their clock counts were full: the hand took
    // every count down to zero on its way round to the one victim.
    settle(&cache, max);
    let st = cache.stats();
    assert_eq!(st.entries, 4, "{st:?}");
    assert!(st.evicted_bytes_total > 0, "{st:?}");
    let survivors = present(&cache);
    let hot = survivors[0];
    assert!(
        cache
            .contains(NamespaceId::DEFAULT, Kind::Cas, &hot)
            .is_some()
    );
    // The next victim is one of the three not used since: never `hot`,
    // never the new blob.
    put(&cache, NamespaceId::DEFAULT, Kind::Cas, &blobs[5]).unwrap();
    settle(&cache, max);
    let now = present(&cache);
    assert_eq!(now.len(), 4, "{now:?}");
    assert!(
        now.contains(&hot),
        "the entry used since the hand passed stays"
    );
    assert!(now.contains(&sha(&blobs[5])), "the new entry stays");
}

/// `n` bytes of noise from `seed` (zstd cannot shrink them).
fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as u8
        })
        .collect()
}

#[test]
fn a_namespace_over_its_quota_evicts_only_its_own_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 64 << 20);
    c.quotas.default = Some(200 * 1024);
    c.quotas.by_name.insert("big".into(), 1 << 20);
    let cache = DiskCache::open(c).unwrap();
    let quiet = cache.namespace("quiet").unwrap();
    let noisy = cache.namespace("noisy").unwrap();
    let big = cache.namespace("big").unwrap();
    // The quiet tenant's entries are the oldest of all and never used
    // again: a global eviction would take them first.
    let quiet_blobs: Vec<Vec<u8>> = (0..5).map(|i| noise(16_000, 1000 + i)).collect();
    for b in &quiet_blobs {
        put(&cache, quiet, Kind::Cas, b).unwrap();
    }
    let noisy_blobs: Vec<Vec<u8>> = (0..200).map(|i| noise(16_000, i)).collect();
    let noisy_settled = || {
        let s = cache.namespace_stats();
        let n = s.iter().find(|n| n.name == "noisy").unwrap();
        n.size_on_disk <= 200 * 1024 && cache.stats().pending_deletion == 0
    };
    // Each write waits for its eviction, as on a cache whose evictor
    // keeps up: one behind by a dozen writes would see them all as new as
    // `hot`, and two bits of age cannot tell them apart.
    let settle_noisy = || {
        for _ in 0..500 {
            if noisy_settled() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("noisy did not settle: {:?}", cache.namespace_stats());
    };
    // Over its quota once: every entry is new, so the first victims are
    // whichever the hand reaches first. One that survived is used from
    // then on, after each further write.
    for b in &noisy_blobs[..20] {
        put(&cache, noisy, Kind::Cas, b).unwrap();
    }
    settle_noisy();
    let hot = (0..20)
        .find(|&i| {
            cache
                .contains(noisy, Kind::Cas, &sha(&noisy_blobs[i]))
                .is_some()
        })
        .unwrap();
    for b in &noisy_blobs[20..] {
        put(&cache, noisy, Kind::Cas, b).unwrap();
        settle_noisy();
        assert!(
            cache
                .contains(noisy, Kind::Cas, &sha(&noisy_blobs[hot]))
                .is_some()
        );
    }
    for b in noisy_blobs.iter().take(30) {
        put(&cache, big, Kind::Cas, b).unwrap();
    }
    let settled = || {
        let s = cache.namespace_stats();
        let noisy = s.iter().find(|n| n.name == "noisy").unwrap();
        noisy.size_on_disk <= 200 * 1024 && cache.stats().pending_deletion == 0
    };
    for _ in 0..500 {
        if settled() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(settled(), "{:?}", cache.namespace_stats());
    let stats = cache.namespace_stats();
    let of = |name: &str| stats.iter().find(|n| n.name == name).unwrap().clone();
    assert_eq!(of("quiet").entries, 5, "{stats:?}");
    assert_eq!(of("quiet").evicted_bytes_total, 0);
    assert_eq!(of("big").entries, 30, "its own override (1 MiB) holds 30");
    assert_eq!(of("noisy").quota, Some(200 * 1024));
    assert!(of("noisy").evicted_bytes_total > 0);
    for b in &quiet_blobs {
        assert_eq!(
            read(&cache, quiet, Kind::Cas, &sha(b)).as_deref(),
            Some(&b[..])
        );
    }
    // Its old entries went; its hot entry stayed.
    assert!(
        cache
            .contains(noisy, Kind::Cas, &sha(&noisy_blobs[hot]))
            .is_some()
    );
    for (i, b) in noisy_blobs[..50].iter().enumerate() {
        if i != hot {
            assert!(cache.contains(noisy, Kind::Cas, &sha(b)).is_none());
        }
    }
    assert!(
        cache
            .contains(noisy, Kind::Cas, &sha(&noisy_blobs[199]))
            .is_some()
    );
    // A blob larger than the quota can never fit it.
    let huge = noise(300 * 1024, 7);
    match put(&cache, noisy, Kind::Cas, &huge) {
        Err(Error::OverQuota { quota, .. }) => assert_eq!(quota, 200 * 1024),
        other => panic!("{other:?}"),
    }
    // After a restart the load registers each namespace with its quota,
    // and a smaller quota is enforced on what was there.
    cache.shutdown(std::time::Duration::from_secs(10));
    drop(cache);
    let mut c = cfg(dir.path(), 64 << 20);
    c.quotas.default = Some(100 * 1024);
    let cache = DiskCache::open(c).unwrap();
    cache.load();
    let shrunk = || {
        let s = cache.namespace_stats();
        let of = |name: &str| s.iter().find(|n| n.name == name).unwrap().clone();
        (
            of("noisy").size_on_disk,
            of("big").size_on_disk,
            of("quiet").size_on_disk,
        )
    };
    for _ in 0..500 {
        let (n, b, q) = shrunk();
        if n <= 100 * 1024 && b <= 100 * 1024 && q <= 100 * 1024 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (n, b, q) = shrunk();
    assert!(
        n <= 100 * 1024 && b <= 100 * 1024 && q <= 100 * 1024,
        "{n} {b} {q}"
    );
    assert!(n > 0 && b > 0 && q > 0, "each keeps what fits: {n} {b} {q}");
}

#[test]
fn a_corrupt_file_is_a_miss_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let blob = data(50_000, 5);
    put(&cache, NamespaceId::DEFAULT, Kind::Cas, &blob).unwrap();
    let path = dir.path().join(&files_under(dir.path())[0]);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff; // inside the compressed chunk
    fs::write(&path, &bytes).unwrap();
    let mut b = cache
        .get(NamespaceId::DEFAULT, Kind::Cas, &sha(&blob))
        .unwrap()
        .unwrap();
    assert!(matches!(b.read_to_vec(), Err(Error::Corrupt { .. })));
    assert!(
        cache
            .get(NamespaceId::DEFAULT, Kind::Cas, &sha(&blob))
            .unwrap()
            .is_none()
    );

    put(&cache, NamespaceId::DEFAULT, Kind::Cas, &blob).unwrap();
    let path = dir.path().join(&files_under(dir.path())[0]);
    fs::write(&path, b"truncated").unwrap();
    assert!(
        cache
            .get(NamespaceId::DEFAULT, Kind::Cas, &sha(&blob))
            .unwrap()
            .is_none()
    );
    assert_eq!(cache.stats().entries, 0);
}

#[test]
fn namespaces_are_isolated_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1000, 6);
    {
        let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
        let ns = cache.namespace("team/a").unwrap();
        put(&cache, ns, Kind::Cas, &blob).unwrap();
        assert!(read(&cache, NamespaceId::DEFAULT, Kind::Cas, &sha(&blob)).is_none());
        assert!(cache.namespace("../x").is_err());
        cache.shutdown(std::time::Duration::from_secs(10));
    }
    assert!(dir.path().join("ns.v1/team+a/cas.v2").is_dir());
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    cache.load();
    let ns = cache.namespace("team/a").unwrap();
    assert_eq!(read(&cache, ns, Kind::Cas, &sha(&blob)).unwrap(), blob);
}

#[test]
fn the_hard_limit_refuses_writes_and_a_blob_larger_than_the_cache_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1 << 20);
    c.hard_limit_bytes = Some(64 * 1024);
    let cache = DiskCache::open(c).unwrap();
    let h = sha(b"x");
    assert!(matches!(
        cache.writer(NamespaceId::DEFAULT, Kind::Cas, h, 2 << 20),
        Err(Error::TooLarge { .. })
    ));
    let _w = cache
        .writer(NamespaceId::DEFAULT, Kind::Cas, h, 40 * 1024)
        .unwrap();
    assert!(matches!(
        cache.writer(NamespaceId::DEFAULT, Kind::Cas, h, 40 * 1024),
        Err(Error::HardLimit { .. })
    ));
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _a = DiskCache::open(cfg(dir.path(), 1 << 20)).unwrap();
    assert!(matches!(
        DiskCache::open(cfg(dir.path(), 1 << 20)),
        Err(Error::Locked { .. })
    ));
}

/// Flips one byte of content (or truncates) in every stored file of `hash`.
fn damage(dir: &Path, hash: &Hash, truncate: bool) {
    let hex = hash.to_hex();
    for f in files_under(dir).iter().filter(|f| f.contains(&hex)) {
        let p = dir.join(f);
        let mut bytes = fs::read(&p).unwrap();
        if truncate {
            bytes.truncate(bytes.len() - 7);
        } else {
            let at = bytes.len() - bytes.len() / 3;
            bytes[at] ^= 0x40;
        }
        fs::write(&p, bytes).unwrap();
    }
}

#[test]
fn damaged_files_never_read_back_whole_in_either_mode_or_form() {
    for mode in [StorageMode::Zstd, StorageMode::Uncompressed] {
        for truncate in [false, true] {
            for size in [5000, CHUNK_SIZE * 2 + 77] {
                let dir = tempfile::tempdir().unwrap();
                let mut c = cfg(dir.path(), 1 << 30);
                c.storage_mode = mode;
                let cache = DiskCache::open(c).unwrap();
                cache.load();
                // Random-looking bytes, so a flipped byte lands in real
                // compressed data.
                let mut s = 0x9E37_79B9u32 ^ size as u32;
                let b: Vec<u8> = (0..size)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 17;
                        s ^= s << 5;
                        (s % 7) as u8
                    })
                    .collect();
                let h = sha(&b);
                assert!(put(&cache, NamespaceId::DEFAULT, Kind::Cas, &b).unwrap());
                damage(dir.path(), &h, truncate);
                let what = format!("{mode:?} truncate={truncate} size={size}");
                // Content form: every piece, then the end; never all of it.
                let whole = cache
                    .get(NamespaceId::DEFAULT, Kind::Cas, &h)
                    .unwrap()
                    .map(|mut blob| blob.read_to_vec());
                assert!(
                    !matches!(&whole, Some(Ok(v)) if v.len() == size),
                    "{what}: damaged content read back whole"
                );
                assert!(
                    cache
                        .get(NamespaceId::DEFAULT, Kind::Cas, &h)
                        .unwrap()
                        .is_none(),
                    "{what}: the damaged entry is dropped"
                );
                // Stored form (pass-through zstd): same damage, fresh copy.
                if mode == StorageMode::Zstd {
                    assert!(put(&cache, NamespaceId::DEFAULT, Kind::Cas, &b).unwrap());
                    damage(dir.path(), &h, truncate);
                    let stored =
                        cache
                            .get(NamespaceId::DEFAULT, Kind::Cas, &h)
                            .unwrap()
                            .map(|mut blob| {
                                blob.seek_stored(0);
                                let mut all = Vec::new();
                                let mut piece = Vec::new();
                                loop {
                                    match blob.next_stored(&mut piece) {
                                        Ok(true) => all.extend_from_slice(&piece),
                                        Ok(false) => return Ok(all),
                                        Err(e) => return Err(e),
                                    }
                                }
                            });
                    assert!(
                        !matches!(&stored, Some(Ok(_))),
                        "{what}: damaged stored frames read back whole"
                    );
                    assert!(
                        cache
                            .get(NamespaceId::DEFAULT, Kind::Cas, &h)
                            .unwrap()
                            .is_none(),
                        "{what}: dropped after a stored read"
                    );
                }
            }
        }
    }
}

#[test]
fn uncompressed_ranges_are_proved_by_the_whole_digest() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1 << 30);
    c.storage_mode = StorageMode::Uncompressed;
    let cache = DiskCache::open(c).unwrap();
    cache.load();
    let b = data(CHUNK_SIZE * 3, 9);
    let h = sha(&b);
    assert!(put(&cache, NamespaceId::DEFAULT, Kind::Cas, &b).unwrap());
    // A good blob: a range from the middle reads and verifies.
    let mut blob = cache
        .get(NamespaceId::DEFAULT, Kind::Cas, &h)
        .unwrap()
        .unwrap();
    blob.seek(CHUNK_SIZE as u64 + 10);
    let mut piece = Vec::new();
    assert!(blob.next_chunk(&mut piece).unwrap());
    let from = CHUNK_SIZE + 10;
    assert!(
        piece[..] == b[from..from + piece.len()],
        "the range's bytes"
    );
    blob.verify_all().unwrap();
    drop(blob);
    // Damage after the range: the range alone must not pass.
    damage(dir.path(), &h, false);
    let mut blob = cache
        .get(NamespaceId::DEFAULT, Kind::Cas, &h)
        .unwrap()
        .unwrap();
    assert!(blob.next_chunk(&mut piece).unwrap());
    assert!(blob.verify_all().is_err());
    assert!(
        cache
            .get(NamespaceId::DEFAULT, Kind::Cas, &h)
            .unwrap()
            .is_none()
    );
}

/// Every third blob of the snapshot test lives in `team`, the rest in the
/// default namespace.
fn ns_of(i: usize, team: NamespaceId) -> NamespaceId {
    if i.is_multiple_of(3) {
        team
    } else {
        NamespaceId::DEFAULT
    }
}

#[test]
fn a_clean_stop_leaves_a_snapshot_that_the_next_start_trusts_only_where_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..300).map(|i| noise(500 + i as usize, i)).collect();
    let ac = b"an action result".to_vec();
    {
        let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
        cache.load();
        let team = cache.namespace("team").unwrap();
        for (i, b) in blobs.iter().enumerate() {
            put(&cache, ns_of(i, team), Kind::Cas, b).unwrap();
        }
        put(&cache, team, Kind::Ac, &ac).unwrap();
        cache.shutdown(std::time::Duration::from_secs(10));
    }
    assert!(dir.path().join("index.snapshot").is_file());
    // Behind hoard's back: one blob of the default namespace is deleted,
    // so its directory's time changes.
    let gone = &blobs[1];
    let gone_dir = dir.path().join("cas.v2").join(&sha(gone).to_hex()[..2]);
    let gone_file = fs::read_dir(&gone_dir)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&sha(gone).to_hex())
        })
        .unwrap()
        .path();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::remove_file(&gone_file).unwrap();
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let report = cache.load();
    assert!(
        !dir.path().join("index.snapshot").exists(),
        "a snapshot serves one start"
    );
    assert_eq!(report.entries, 300, "{report:?}");
    let parts = 2 * 3 * 256;
    assert_eq!(report.parts_from_snapshot, parts - 1, "{report:?}");
    // Every entry but those of the changed directory came from the
    // snapshot; those were listed.
    let listed = blobs
        .iter()
        .enumerate()
        .filter(|(i, b)| i % 3 != 0 && b[..] != gone[..] && sha(b).0[0] == sha(gone).0[0])
        .count() as u64;
    assert_eq!(report.from_snapshot, 300 - listed, "{report:?}");
    let team = cache.namespace("team").unwrap();
    for (i, b) in blobs.iter().enumerate() {
        let got = read(&cache, ns_of(i, team), Kind::Cas, &sha(b));
        if b[..] == gone[..] {
            assert!(got.is_none());
        } else {
            assert_eq!(got.as_deref(), Some(&b[..]), "blob {i}");
        }
    }
    assert_eq!(
        read(&cache, team, Kind::Ac, &sha(&ac)).as_deref(),
        Some(&ac[..])
    );
    // A crash now would write no snapshot, and the one read is gone: the
    // next start lists every directory. (The process is simulated by a
    // stop whose snapshot is then removed.)
    cache.shutdown(std::time::Duration::from_secs(10));
    drop(cache);
    fs::remove_file(dir.path().join("index.snapshot")).unwrap();
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let report = cache.load();
    assert_eq!(
        (report.entries, report.from_snapshot),
        (300, 0),
        "{report:?}"
    );
    // A damaged snapshot is not used, and loses nothing.
    cache.shutdown(std::time::Duration::from_secs(10));
    drop(cache);
    let snap = dir.path().join("index.snapshot");
    let mut bytes = fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&snap, &bytes).unwrap();
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let report = cache.load();
    assert_eq!(
        (report.entries, report.from_snapshot),
        (300, 0),
        "{report:?}"
    );
    assert!(!snap.exists());
}

#[test]
fn the_snapshot_keeps_the_clock_counts() {
    let dir = tempfile::tempdir().unwrap();
    // Room for sixteen 16 KiB blobs, not seventeen.
    let max = 260 * 1024;
    let blobs: Vec<Vec<u8>> = (0..17).map(|i| noise(16_000, 77 + i)).collect();
    let hot: Vec<Hash>;
    {
        let cache = DiskCache::open(cfg(dir.path(), max)).unwrap();
        cache.load();
        for b in &blobs {
            put(&cache, NamespaceId::DEFAULT, Kind::Cas, b).unwrap();
        }
        // One eviction took every clock count to zero; half the survivors
        // are used again before the stop.
        settle(&cache, max);
        let survivors = present(&cache);
        assert_eq!(survivors.len(), 16);
        hot = survivors.iter().step_by(2).copied().collect();
        for h in &hot {
            assert!(read(&cache, NamespaceId::DEFAULT, Kind::Cas, h).is_some());
        }
        cache.shutdown(std::time::Duration::from_secs(10));
    }
    // Restarted with room for eight: the eight not used go, the eight used
    // stay. Without the counts the chance of that is 1 in 12,870.
    let max = 130 * 1024;
    let cache = DiskCache::open(cfg(dir.path(), max)).unwrap();
    let report = cache.load();
    assert_eq!(report.from_snapshot, 16);
    settle(&cache, max);
    let mut now = present(&cache);
    let mut want = hot.clone();
    now.sort();
    want.sort();
    assert_eq!(now, want, "the used ones stay, the others go");
}

/// Opens the cache, runs its load on a thread and returns once the cache
/// is ready (every directory listed), with the thread still sizing.
fn load_until_ready(c: Config) -> (DiskCache, std::thread::JoinHandle<hoard_disk::LoadReport>) {
    let cache = DiskCache::open(c).unwrap();
    let loader = {
        let cache = cache.clone();
        std::thread::spawn(move || cache.load())
    };
    while !cache.is_loaded() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    (cache, loader)
}

#[test]
fn a_start_after_a_crash_serves_from_names_first_and_counts_every_size_after() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..40)
        .map(|i| noise(3000 + 997 * i as usize, 500 + i))
        .collect();
    let acs: Vec<Vec<u8>> = (0..5).map(|i| data(200 + i, i as u8)).collect();
    let team_usage = |c: &DiskCache| {
        c.namespace_stats()
            .into_iter()
            .find(|n| n.name == "team")
            .map(|n| (n.entries, n.size_on_disk))
            .unwrap()
    };
    let (size, team) = {
        let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
        cache.load();
        let team = cache.namespace("team").unwrap();
        for (i, b) in blobs.iter().enumerate() {
            put(&cache, ns_of(i, team), Kind::Cas, b).unwrap();
        }
        for a in &acs {
            put(&cache, team, Kind::Ac, a).unwrap();
        }
        let out = (cache.stats().size_on_disk, team_usage(&cache));
        cache.shutdown(std::time::Duration::from_secs(10));
        out
    };
    // A crash leaves no snapshot.
    fs::remove_file(dir.path().join("index.snapshot")).unwrap();
    let mut c = cfg(dir.path(), 1 << 30);
    c.sizing_pause = Some(std::time::Duration::from_millis(30));
    let (cache, loader) = load_until_ready(c);
    // Ready, with the casblobs indexed from their names alone: about 20
    // parts at 30 ms each are left to size.
    assert!(!cache.sizes_known(), "{:?}", cache.stats());
    let early = cache.stats();
    assert!(!early.sizes_known && early.size_on_disk < size, "{early:?}");
    assert_eq!(early.entries, 45, "{early:?}");
    let team_id = cache.namespace("team").unwrap();
    for (i, b) in blobs.iter().enumerate() {
        let got = read(&cache, ns_of(i, team_id), Kind::Cas, &sha(b));
        assert_eq!(got.as_deref(), Some(&b[..]), "blob {i} while sizing");
    }
    for a in &acs {
        assert_eq!(
            read(&cache, team_id, Kind::Ac, &sha(a)).as_deref(),
            Some(&a[..])
        );
    }
    let report = loader.join().unwrap();
    assert!(cache.sizes_known());
    assert_eq!(report.sizes_deferred, 40, "{report:?}");
    assert!(report.ready_after < report.elapsed, "{report:?}");
    assert_eq!(report.size_on_disk, size, "{report:?}");
    assert_eq!(cache.stats().size_on_disk, size);
    assert_eq!(team_usage(&cache), team);
}

#[test]
fn a_snapshot_written_before_the_sizes_are_in_sends_the_next_start_to_list_those_parts() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..40).map(|i| noise(5000 + i as usize, 700 + i)).collect();
    let size = {
        let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
        cache.load();
        for b in &blobs {
            put(&cache, NamespaceId::DEFAULT, Kind::Cas, b).unwrap();
        }
        let size = cache.stats().size_on_disk;
        cache.shutdown(std::time::Duration::from_secs(10));
        size
    };
    fs::remove_file(dir.path().join("index.snapshot")).unwrap();
    let mut c = cfg(dir.path(), 1 << 30);
    c.sizing_pause = Some(std::time::Duration::from_millis(50));
    {
        let (cache, loader) = load_until_ready(c);
        // A clean stop while sizing: the snapshot holds entries without
        // their sizes, and says their directories changed.
        assert!(!cache.sizes_known());
        cache.shutdown(std::time::Duration::from_secs(10));
        assert!(cache.stats().size_on_disk < size);
        loader.join().unwrap();
        assert!(!cache.sizes_known(), "the stop cut the sizing short");
    }
    let cache = DiskCache::open(cfg(dir.path(), 1 << 30)).unwrap();
    let report = cache.load();
    assert!(report.parts_from_snapshot > 0, "{report:?}");
    assert!(report.sizes_deferred > 0, "{report:?}");
    assert_eq!(report.entries, 40, "{report:?}");
    assert_eq!(cache.stats().size_on_disk, size, "{report:?}");
}

/// 300 files of 16,000 bytes in `cas.v2/00` as a crash leaves them (no
/// snapshot): every other one last used a day ago. Their bytes are not a
/// casblob and are never read. Returns the names of the old ones.
fn crashed_directory(dir: &Path) -> std::collections::HashSet<String> {
    {
        let cache = DiskCache::open(cfg(dir, 1 << 30)).unwrap();
        cache.load();
        cache.shutdown(std::time::Duration::from_secs(10));
    }
    let _ = fs::remove_file(dir.join("index.snapshot"));
    let part = dir.join("cas.v2").join("00");
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    let mut old = std::collections::HashSet::new();
    for i in 0..300u32 {
        let mut hash = sha(&i.to_le_bytes()).0;
        hash[0] = 0;
        let name = format!("{}-16000-{i:09}", Hash(hash).to_hex());
        let path = part.join(&name);
        fs::write(&path, vec![7u8; 16_000]).unwrap();
        if i % 2 == 0 {
            fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_times(fs::FileTimes::new().set_accessed(day_ago))
                .unwrap();
            old.insert(name);
        }
    }
    old
}

#[test]
fn after_a_crash_the_sizes_come_in_and_the_files_used_longest_ago_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let old = crashed_directory(dir.path());
    let part = dir.path().join("cas.v2").join("00");
    // Room for 250 of them (4 blocks each).
    let max = 250 * 16 * 1024;
    let cache = DiskCache::open(cfg(dir.path(), max)).unwrap();
    let report = cache.load();
    assert_eq!((report.entries, report.sizes_deferred), (300, 300));
    settle(&cache, max);
    let left: std::collections::HashSet<String> = fs::read_dir(&part)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 250);
    assert_eq!(cache.stats().size_on_disk, 250 * 16 * 1024);
    let gone: Vec<&String> = old.iter().filter(|n| !left.contains(*n)).collect();
    assert_eq!(
        gone.len(),
        50,
        "only files last used a day ago were evicted"
    );
}

#[test]
fn while_sizes_are_unknown_the_hard_limit_counts_those_files_at_their_logical_size() {
    let dir = tempfile::tempdir().unwrap();
    crashed_directory(dir.path());
    // 300 files of 4 blocks: 4,915,200 bytes, which the limit leaves
    // 84,800 bytes beside.
    let mut c = cfg(dir.path(), 1 << 30);
    c.hard_limit_bytes = Some(5_000_000);
    c.sizing_pause = Some(std::time::Duration::from_millis(500));
    let (cache, loader) = load_until_ready(c);
    assert_eq!(cache.stats().size_on_disk, 0, "nothing sized yet");
    let big = noise(200_000, 1);
    match put(&cache, NamespaceId::DEFAULT, Kind::Cas, &big) {
        Err(Error::HardLimit { .. }) => {}
        other => panic!("expected the hard limit, got {other:?}"),
    }
    let small = noise(40_000, 2);
    assert!(put(&cache, NamespaceId::DEFAULT, Kind::Cas, &small).unwrap());
    assert!(!cache.sizes_known(), "both writes ran while sizing");
    loader.join().unwrap();
    assert_eq!(cache.stats().size_on_disk, 4_915_200 + 40 * 1024);
}
