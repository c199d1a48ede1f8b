use std::sync::Arc;

use super::*;

const BLOCK: usize = 64 * 1024;
const SEALED: u64 = sealed_len(BLOCK) as u64;

fn key(b: u8) -> CacheKey {
    CacheKey::from_bytes([b; 32])
}

fn id(index: u64) -> BlockId<'static> {
    BlockId { key: "photos/2026/holiday.jpg", version: "\"0123abcd-etag\"", index }
}

fn block(index: u64) -> Vec<u8> {
    let mut v = format!("block {index} of the plaintext; ").into_bytes().repeat(BLOCK / 16);
    v.resize(BLOCK, b'.');
    v
}

/// Every regular file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn block_files(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join(BLOCKS_DIR)).into_iter().filter(|p| !p.ends_with(CHECK_FILE)).collect()
}

fn disk_bytes(dir: &Path) -> u64 {
    // Files may go (evicted, renamed) while this walks: count what is still there.
    block_files(dir).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

#[test]
fn round_trip_and_counters() {
    let d = tempfile::tempdir().unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    assert_eq!(c.get(&id(0)), None);
    c.put(&id(0), &block(0));
    c.put(&id(1), b"");
    assert!(c.contains(&id(0)));
    assert_eq!(c.get(&id(0)).unwrap(), block(0));
    assert_eq!(c.get(&id(1)).unwrap(), b"".as_slice());
    // Another version of the same object is another block.
    assert_eq!(c.get(&BlockId { version: "\"new\"", ..id(0) }), None);
    let s = c.stats();
    assert_eq!(
        s,
        CacheStats {
            hits: 2,
            range_hits: 0,
            misses: 2,
            bytes: SEALED + sealed_len(0) as u64,
            blocks: 2,
            capacity: 1 << 30,
            evictions: 0,
            integrity_failures: 0,
            inserted: 2
        }
    );
    // Putting a block again replaces it, and counts it once.
    c.put(&id(0), &block(7));
    assert_eq!(c.get(&id(0)).unwrap(), block(7));
    assert_eq!(c.stats().bytes, SEALED + sealed_len(0) as u64);
    assert_eq!(disk_bytes(d.path()), c.stats().bytes);
    // The files are in fan-out folders, named by 64 hex digits starting with the folder's.
    for p in block_files(d.path()) {
        let name = p.file_name().unwrap().to_str().unwrap();
        let fan = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
        assert!(unhex(name).is_some() && name.starts_with(fan), "{}", p.display());
    }
}

#[test]
fn block_names_in_hex_round_trip() {
    let name: BlockName = std::array::from_fn(|i| (i * 37 + 5) as u8);
    let h = hex(&name);
    assert_eq!(h, name.iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert_eq!(unhex(&h), Some(name));
}

#[test]
fn flipped_byte_is_an_integrity_failure_and_the_file_goes() {
    let d = tempfile::tempdir().unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    c.put(&id(0), &block(0));
    let files = block_files(d.path());
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&files[0], &bytes).unwrap();

    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = std::sync::Arc::clone(&told);
    c.on_integrity_failure(Box::new(move |key: &str, index: u64, _why: &str| {
        t.lock().unwrap().push((key.to_string(), index));
    }));
    assert_eq!(c.get(&id(0)), None);
    let s = c.stats();
    assert_eq!((s.integrity_failures, s.misses, s.hits, s.blocks, s.bytes), (1, 1, 0, 0, 0));
    assert_eq!(*told.lock().unwrap(), [(id(0).key.to_string(), 0)], "the observer is told");
    assert!(!files[0].exists());
    // Fetched again and put back, it is served again.
    c.put(&id(0), &block(0));
    assert_eq!(c.get(&id(0)).unwrap(), block(0));
}

#[test]
fn torn_short_and_garbage_files_never_crash() {
    let d = tempfile::tempdir().unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    for i in 0..4 {
        c.put(&id(i), &block(i));
    }
    let path = |i| c.path(&c.sealer.name(&id(i)));
    std::fs::write(path(0), b"").unwrap();
    std::fs::write(path(1), b"ASCB\x02short").unwrap();
    let full = std::fs::read(path(2)).unwrap();
    std::fs::write(path(2), &full[..full.len() / 2]).unwrap();
    std::fs::write(path(3), vec![0u8; full.len()]).unwrap();
    for i in 0..4 {
        assert_eq!(c.get(&id(i)), None);
    }
    assert_eq!(c.stats().integrity_failures, 4);
    assert!(block_files(d.path()).is_empty());
    drop(c);

    // At open: stray names are removed, a bad file under a good name fails at get.
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    c.put(&id(5), &block(5));
    let good = c.path(&c.sealer.name(&id(6)));
    drop(c);
    std::fs::write(&good, b"garbage").unwrap();
    let stray = d.path().join(BLOCKS_DIR).join("00").join("not-a-block");
    std::fs::write(&stray, b"x").unwrap();
    std::fs::create_dir(d.path().join(BLOCKS_DIR).join("ff").join("subdir")).unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    assert!(!stray.exists());
    assert_eq!(c.stats().blocks, 2);
    assert_eq!(c.get(&id(6)), None);
    assert_eq!(c.get(&id(5)).unwrap(), block(5));
    assert_eq!(c.stats().integrity_failures, 1);
}

#[test]
fn a_block_under_another_blocks_name_does_not_open() {
    let d = tempfile::tempdir().unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    c.put(&id(0), &block(0));
    c.put(&id(1), &block(1));
    let other = BlockId { key: "other/file", version: "\"0123abcd-etag\"", index: 0 };
    c.put(&other, &block(2));
    let p = |id: &BlockId| c.path(&c.sealer.name(id));
    std::fs::copy(p(&id(0)), p(&id(1))).unwrap();
    std::fs::copy(p(&id(0)), p(&other)).unwrap();
    assert_eq!(c.get(&id(1)), None);
    assert_eq!(c.get(&other), None);
    assert_eq!(c.get(&id(0)).unwrap(), block(0));
    assert_eq!(c.stats().integrity_failures, 2);
}

#[test]
fn no_plaintext_or_object_names_on_disk() {
    let d = tempfile::tempdir().unwrap();
    let secret_key = "Very Secret Folder/quarterly-results-draft.xlsx";
    let secret_version = "\"etag-9f8e7d6c5b4a\"";
    let secret_text = b"KNOWN-PLAINTEXT-4242: the merger closes on Friday. ";
    let data = secret_text.repeat(1000);
    {
        let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
        for index in 0..3 {
            c.put(&BlockId { key: secret_key, version: secret_version, index }, &data);
        }
        c.get(&BlockId { key: secret_key, version: secret_version, index: 1 }).unwrap();
    }
    // Reopened too, so anything written at open or close is looked at.
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    assert_eq!(c.stats().blocks, 3);
    let needles: [&[u8]; 5] =
        [secret_key.as_bytes(), b"quarterly", secret_version.as_bytes(), b"9f8e7d6c5b4a", b"KNOWN-PLAINTEXT"];
    let all = files(d.path());
    assert_eq!(all.len(), 4, "three blocks and the check file: {all:?}");
    for p in all {
        let bytes = std::fs::read(&p).unwrap();
        let shown = p.strip_prefix(d.path()).unwrap().to_string_lossy().into_owned();
        for n in needles {
            assert!(!bytes.windows(n.len()).any(|w| w == n), "{shown} holds {}", String::from_utf8_lossy(n));
            assert!(!shown.contains(std::str::from_utf8(n).unwrap()), "{shown}");
        }
        // Nor the master key.
        assert!(!bytes.windows(32).any(|w| w == [1u8; 32]), "{shown}");
    }
}

#[test]
fn lru_keeps_the_bound_and_evicts_least_recently_used() {
    let d = tempfile::tempdir().unwrap();
    let cap = 8 * SEALED;
    let c = BlockCache::open(d.path(), &key(1), cap).unwrap();
    for i in 0..8 {
        c.put(&id(i), &block(i));
    }
    assert_eq!(c.stats().evictions, 0);
    // Block 0 was put first, but used last: block 1 goes.
    c.get(&id(0)).unwrap();
    c.put(&id(8), &block(8));
    assert!(c.contains(&id(0)) && !c.contains(&id(1)));
    // Twice the capacity in total: the bound holds after every put.
    for i in 9..16 {
        c.put(&id(i), &block(i));
        let s = c.stats();
        assert!(s.bytes <= cap && disk_bytes(d.path()) <= cap, "{s:?}");
    }
    let s = c.stats();
    assert_eq!((s.blocks, s.bytes, s.evictions, s.inserted), (8, cap, 8, 16));
    assert_eq!(disk_bytes(d.path()), cap);
    for i in 8..16 {
        assert_eq!(c.get(&id(i)).unwrap(), block(i));
    }
    // A block bigger than the whole cache is not stored, and evicts nothing.
    c.put(&id(99), &vec![0u8; cap as usize]);
    assert!(!c.contains(&id(99)));
    assert_eq!(c.stats().blocks, 8);
}

#[test]
fn concurrent_puts_and_gets_keep_the_bound() {
    let d = tempfile::tempdir().unwrap();
    let cap = 6 * SEALED;
    let c = Arc::new(BlockCache::open(d.path(), &key(1), cap).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = Arc::clone(&c);
            let dir = d.path().to_path_buf();
            std::thread::spawn(move || {
                for i in 0..12 {
                    let n = t * 100 + i;
                    c.put(&id(n), &block(n));
                    if let Some(b) = c.get(&id(n)) {
                        assert_eq!(b, block(n));
                    }
                    // Temp files being written count too.
                    assert!(disk_bytes(&dir) <= cap + 4 * SEALED);
                    assert!(c.stats().bytes <= cap);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(disk_bytes(d.path()) <= cap);
    assert_eq!(c.stats().integrity_failures, 0);
}

#[test]
fn reopen_with_the_same_key_keeps_blocks_and_their_lru_order() {
    let d = tempfile::tempdir().unwrap();
    let cap = 4 * SEALED;
    {
        let c = BlockCache::open(d.path(), &key(1), cap).unwrap();
        for i in 0..4 {
            c.put(&id(i), &block(i));
        }
        c.get(&id(0)).unwrap();
    }
    let c = BlockCache::open(d.path(), &key(1), cap).unwrap();
    let s = c.stats();
    assert_eq!((s.blocks, s.bytes, s.hits, s.misses), (4, cap, 0, 0));
    c.put(&id(4), &block(4));
    assert!(c.contains(&id(0)), "used last before the remount");
    assert!(!c.contains(&id(1)), "least recently used");
    assert_eq!(c.get(&id(2)).unwrap(), block(2));
    drop(c);

    // A smaller capacity at open evicts down to it, oldest first.
    let c = BlockCache::open(d.path(), &key(1), 2 * SEALED).unwrap();
    assert_eq!(c.stats().blocks, 2);
    assert!(c.contains(&id(2)) && c.contains(&id(4)));
    assert_eq!(disk_bytes(d.path()), 2 * SEALED);
}

#[test]
fn reopen_with_another_key_or_format_discards() {
    let d = tempfile::tempdir().unwrap();
    let staging = d.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("7"), b"not ours").unwrap();
    {
        let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
        c.put(&id(0), &block(0));
    }
    let c = BlockCache::open(d.path(), &key(2), 1 << 30).unwrap();
    assert_eq!(c.stats().blocks, 0);
    assert_eq!(c.get(&id(0)), None);
    assert_eq!(c.stats().integrity_failures, 0);
    assert!(block_files(d.path()).is_empty());
    c.put(&id(0), &block(0));
    drop(c);
    // The rest of the cache dir is not the block cache's.
    assert_eq!(std::fs::read(staging.join("7")).unwrap(), b"not ours");

    // Another format version in the check file: discarded too.
    let check = d.path().join(BLOCKS_DIR).join(CHECK_FILE);
    let mut bytes = std::fs::read(&check).unwrap();
    bytes[4] = CHECK_VERSION + 1;
    std::fs::write(&check, bytes).unwrap();
    let c = BlockCache::open(d.path(), &key(2), 1 << 30).unwrap();
    assert_eq!(c.stats().blocks, 0);
    c.put(&id(0), &block(0));
    drop(c);

    // No check file at all (a crash while it was being made): discarded.
    std::fs::remove_file(&check).unwrap();
    let c = BlockCache::open(d.path(), &key(2), 1 << 30).unwrap();
    assert_eq!(c.stats().blocks, 0);
    drop(c);
    let c = BlockCache::open(d.path(), &key(2), 1 << 30).unwrap();
    c.put(&id(0), &block(0));
    drop(c);
    assert_eq!(BlockCache::open(d.path(), &key(2), 1 << 30).unwrap().stats().blocks, 1);
}

#[test]
fn clear_removes_every_block() {
    let d = tempfile::tempdir().unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    for i in 0..5 {
        c.put(&id(i), &block(i));
    }
    c.get(&id(0)).unwrap();
    c.clear().unwrap();
    let s = c.stats();
    assert_eq!((s.blocks, s.bytes, s.hits, s.inserted), (0, 0, 1, 5));
    assert!(block_files(d.path()).is_empty());
    assert_eq!(c.get(&id(0)), None);
    c.put(&id(0), &block(0));
    assert_eq!(c.get(&id(0)).unwrap(), block(0));
}

#[test]
fn a_block_deleted_behind_our_back_is_a_plain_miss() {
    let d = tempfile::tempdir().unwrap();
    let c = BlockCache::open(d.path(), &key(1), 1 << 30).unwrap();
    c.put(&id(0), &block(0));
    for p in block_files(d.path()) {
        std::fs::remove_file(p).unwrap();
    }
    assert_eq!(c.get(&id(0)), None);
    let s = c.stats();
    assert_eq!((s.misses, s.integrity_failures, s.blocks, s.bytes), (1, 0, 0, 0));
}

#[test]
fn unwritable_dir_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let msg = BlockCache::open(&file.join("cache"), &key(1), 1 << 30).unwrap_err().to_string();
    assert!(msg.contains("--cache-dir") && msg.contains(&file.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn default_capacity_is_clamped() {
    let d = tempfile::tempdir().unwrap();
    for p in [d.path().to_path_buf(), d.path().join("not/yet/made")] {
        let c = default_capacity(&p);
        assert!((MIN_DEFAULT_CAPACITY..=MAX_DEFAULT_CAPACITY).contains(&c), "{c}");
    }
}

#[test]
fn block_files_are_written_whole_with_or_without_o_direct() {
    let d = tempfile::tempdir().unwrap();
    let mut buf = Vec::new();
    for len in [0, 100, DIRECT_ALIGN, DIRECT_ALIGN + 33, sealed_len(1 << 20)] {
        let data = aligned(&mut buf, len);
        assert_eq!(data.as_ptr() as usize % DIRECT_ALIGN, 0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        // O_DIRECT asked for (and dropped if this filesystem refuses it), then not.
        for direct in [true, false] {
            let flag = AtomicBool::new(direct);
            let p = d.path().join(format!("f-{len}-{direct}"));
            drop(write_new(&p, data, &flag).unwrap());
            assert!(std::fs::read(&p).unwrap() == *data, "{len} bytes, O_DIRECT {direct}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Units inside a block, and ranged reads
// ---------------------------------------------------------------------------------------------

/// Five units, the last one short.
const LONG: usize = 4 * UNIT + 1000;

fn long_block(index: u64) -> Vec<u8> {
    (0..LONG).map(|i| ((i / 7) as u8) ^ (index as u8).wrapping_mul(31)).collect()
}

/// A cache holding `long_block(i)` for each of `ids`, and an observer's record of every
/// integrity failure it is told of.
fn long_cache(d: &Path, ids: &[u64]) -> (BlockCache, Arc<std::sync::Mutex<Vec<u64>>>) {
    let c = BlockCache::open(d, &key(1), 1 << 30).unwrap();
    for &i in ids {
        c.put(&id(i), &long_block(i));
    }
    let told = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = Arc::clone(&told);
    c.on_integrity_failure(Box::new(move |_: &str, index: u64, _: &str| t.lock().unwrap().push(index)));
    (c, told)
}

fn file_of(c: &BlockCache, i: u64) -> PathBuf {
    c.path(&c.sealer.name(&id(i)))
}

/// Where unit `u` of a sealed long block lies: its table entry and its ciphertext.
fn unit_parts(u: usize) -> (Range<usize>, Range<usize>) {
    let l = Layout::for_plain(LONG);
    let r = l.plain_of(u..u + 1);
    (l.entries_of(u..u + 1), l.body_start() + r.start..l.body_start() + r.end)
}

/// Replaces unit `to` of `file` with unit `from` of `source` (entry and ciphertext).
fn put_unit(file: &mut [u8], to: usize, source: &[u8], from: usize) {
    let ((e_to, b_to), (e_from, b_from)) = (unit_parts(to), unit_parts(from));
    file[e_to].copy_from_slice(&source[e_from]);
    file[b_to].copy_from_slice(&source[b_from]);
}

/// A block's integrity failure as the cache reports it: `None`, counted, told, file gone.
fn assert_failed(c: &BlockCache, told: &std::sync::Mutex<Vec<u64>>, i: u64, failures: u64, what: &str) {
    let s = c.stats();
    assert_eq!(s.integrity_failures, failures, "{what}: {s:?}");
    assert_eq!(told.lock().unwrap().last(), Some(&i), "{what}: the observer is told");
    assert!(!c.contains(&id(i)) && !file_of(c, i).exists(), "{what}: the block is dropped");
}

#[test]
fn ranged_gets_return_the_bytes_of_whole_gets() {
    let d = tempfile::tempdir().unwrap();
    let (c, told) = long_cache(d.path(), &[0]);
    let want = long_block(0);
    let len = LONG as u64;
    let u = UNIT as u64;
    for r in [0..1, 0..4096, 4096..8192, u - 10..u + 10, u..2 * u, 3 * u + 5..len, 0..len, len - 1..len, 1..len - 1] {
        let got = c.get_range(&id(0), r.clone(), len).unwrap_or_else(|| panic!("{r:?} missed"));
        assert!(got == want[r.start as usize..r.end as usize], "{r:?}");
    }
    assert!(c.get(&id(0)).unwrap() == want);
    assert_eq!(c.get_range(&id(0), 7..7, len).unwrap(), Bytes::new());
    let s = c.stats();
    assert_eq!((s.hits, s.range_hits, s.misses, s.integrity_failures), (10, 9, 0, 0));
    // Not cached; a range past the end; a block of another length: misses, nothing dropped.
    assert_eq!(c.get_range(&id(1), 0..10, len), None);
    assert_eq!(c.get_range(&id(0), len - 1..len + 1, len), None);
    assert_eq!(c.get_range(&id(0), 0..10, len + 1), None);
    assert_eq!(c.get_range(&id(0), 0..10, len - 1), None);
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.integrity_failures, s.blocks), (10, 3, 0, 1), "{s:?}");
    assert!(told.lock().unwrap().is_empty());
    assert!(c.get(&id(0)).unwrap() == want);
}

#[test]
fn a_flipped_bit_in_any_unit_fails_whole_and_ranged_gets() {
    let d = tempfile::tempdir().unwrap();
    let (c, told) = long_cache(d.path(), &[]);
    let len = LONG as u64;
    let mut failures = 0;
    for unit in 0..5 {
        for (what, ranged) in [("get", false), ("get_range", true)] {
            c.put(&id(0), &long_block(0));
            let p = file_of(&c, 0);
            let mut bytes = std::fs::read(&p).unwrap();
            // The nonce, the tag, and a byte of the ciphertext, in turn.
            let (entry, body) = unit_parts(unit);
            let at = [entry.start, entry.end - 1, body.start + (body.len() / 3)][failures % 3];
            bytes[at] ^= 0x08;
            std::fs::write(&p, &bytes).unwrap();
            let r = unit as u64 * UNIT as u64;
            let got = if ranged { c.get_range(&id(0), r + 1..r + 2, len) } else { c.get(&id(0)) };
            assert_eq!(got, None, "{what}: unit {unit}, byte {at}");
            failures += 1;
            assert_failed(&c, &told, 0, failures as u64, &format!("{what}, unit {unit}"));
        }
    }
    // Put back, it is served again.
    c.put(&id(0), &long_block(0));
    assert!(c.get(&id(0)).unwrap() == long_block(0));
}

#[test]
fn a_ranged_get_opens_only_the_units_it_needs() {
    let d = tempfile::tempdir().unwrap();
    let (c, told) = long_cache(d.path(), &[0]);
    let (len, u) = (LONG as u64, UNIT as u64);
    let p = file_of(&c, 0);
    let mut bytes = std::fs::read(&p).unwrap();
    let (_, body) = unit_parts(3);
    bytes[body.start + 5] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    // Units 0 to 2, and 4: not the damaged one, so they open.
    let want = long_block(0);
    for r in [0..4096, u + 7..3 * u, 4 * u..len] {
        assert!(c.get_range(&id(0), r.clone(), len).unwrap() == want[r.start as usize..r.end as usize], "{r:?}");
    }
    assert_eq!(c.stats().integrity_failures, 0);
    // A range that ends in unit 3: it fails, and the block goes.
    assert_eq!(c.get_range(&id(0), 3 * u - 4096..3 * u + 1, len), None);
    assert_failed(&c, &told, 0, 1, "a range into the damaged unit");
    assert_eq!(c.get_range(&id(0), 0..4096, len), None, "dropped: a miss now");
    assert_eq!(c.stats().integrity_failures, 1);
}

#[test]
fn truncated_files_fail_at_a_unit_boundary_and_inside_a_unit() {
    let d = tempfile::tempdir().unwrap();
    let (c, told) = long_cache(d.path(), &[]);
    let len = LONG as u64;
    let sealed = sealed_len(LONG);
    let l4 = Layout::for_plain(4 * UNIT);
    let mut failures = 0;
    // Cut inside the last unit, at the end of the one before it, inside the first one.
    let cuts = [sealed - 1, sealed - 500, sealed - 1000, sealed - 1000 - UNIT / 2, 100];
    for (n, cut) in cuts.into_iter().enumerate() {
        for ranged in [false, true] {
            c.put(&id(0), &long_block(0));
            let p = file_of(&c, 0);
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let got = if ranged { c.get_range(&id(0), 0..10, len) } else { c.get(&id(0)) };
            assert_eq!(got, None, "cut at {cut}");
            failures += 1;
            assert_failed(&c, &told, 0, failures, &format!("cut {n} at {cut}, ranged {ranged}"));
        }
    }
    // The last unit removed cleanly, table entry and ciphertext: a well-formed file of four
    // units, whose length is not the one its units were sealed with.
    for ranged in [false, true] {
        c.put(&id(0), &long_block(0));
        let p = file_of(&c, 0);
        let bytes = std::fs::read(&p).unwrap();
        let mut four = bytes[..l4.entries_of(0..4).end].to_vec();
        let old = Layout::for_plain(LONG);
        four.extend_from_slice(&bytes[old.body_start()..old.body_start() + 4 * UNIT]);
        assert_eq!(four.len(), l4.file_len());
        std::fs::write(&p, &four).unwrap();
        let got = if ranged { c.get_range(&id(0), 0..10, 4 * UNIT as u64) } else { c.get(&id(0)) };
        assert_eq!(got, None, "ranged {ranged}");
        failures += 1;
        assert_failed(&c, &told, 0, failures, &format!("last unit removed, ranged {ranged}"));
    }
}

#[test]
fn swapped_units_and_units_of_another_block_fail() {
    let d = tempfile::tempdir().unwrap();
    let (c, told) = long_cache(d.path(), &[]);
    let (len, u) = (LONG as u64, UNIT as u64);
    let mut failures = 0;
    for ranged in [false, true] {
        c.put(&id(0), &long_block(0));
        c.put(&id(1), &long_block(1));
        let (p0, p1) = (file_of(&c, 0), file_of(&c, 1));
        let (a, b) = (std::fs::read(&p0).unwrap(), std::fs::read(&p1).unwrap());
        // Units 1 and 2 of block 0 swapped.
        let mut swapped = a.clone();
        put_unit(&mut swapped, 1, &a, 2);
        put_unit(&mut swapped, 2, &a, 1);
        std::fs::write(&p0, &swapped).unwrap();
        // Unit 2 of block 1 taken from block 0's file, same index, same length.
        let mut moved = b.clone();
        put_unit(&mut moved, 2, &a, 2);
        std::fs::write(&p1, &moved).unwrap();
        for (i, r) in [(0, u + 1..u + 2), (1, 2 * u..2 * u + 4096)] {
            let got = if ranged { c.get_range(&id(i), r.clone(), len) } else { c.get(&id(i)) };
            assert_eq!(got, None, "block {i}, ranged {ranged}");
            failures += 1;
            assert_failed(&c, &told, i, failures, &format!("block {i}, ranged {ranged}"));
        }
    }
}

#[test]
fn a_block_file_of_the_old_format_is_a_plain_miss() {
    let d = tempfile::tempdir().unwrap();
    let (c, told) = long_cache(d.path(), &[0, 1]);
    // What format 1 wrote under the same names: magic, version 1, a nonce, the whole
    // block's ciphertext, a tag.
    let paths = [file_of(&c, 0), file_of(&c, 1)];
    drop(c);
    for p in &paths {
        let mut v1 = b"ASCB\x01".to_vec();
        v1.extend(std::iter::repeat_n(0x5a, 12 + LONG + 16));
        std::fs::write(p, v1).unwrap();
    }
    let (c, told2) = long_cache(d.path(), &[]);
    assert_eq!(c.stats().blocks, 2, "old files are kept at open");
    assert_eq!(c.get(&id(0)), None);
    assert_eq!(c.get_range(&id(1), 0..10, LONG as u64), None);
    let s = c.stats();
    assert_eq!((s.misses, s.integrity_failures, s.blocks, s.bytes), (2, 0, 0, 0), "{s:?}");
    assert!(told.lock().unwrap().is_empty() && told2.lock().unwrap().is_empty(), "not an integrity failure");
    assert!(!file_of(&c, 0).exists() && !file_of(&c, 1).exists(), "old files are removed");
    // Fetched again and put, in the new format.
    c.put(&id(0), &long_block(0));
    assert!(c.get(&id(0)).unwrap() == long_block(0));
    assert_eq!(&std::fs::read(file_of(&c, 0)).unwrap()[..5], b"ASCB\x02");
}
