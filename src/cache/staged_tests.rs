//! Tests of the sealed staging files: writes, reads and resizes against a plain Vec, crashes
//! and torn writes, damage, copies, and files staged over a base.
#![allow(clippy::single_range_in_vec_init)]
use super::*;
use crate::cache::CacheKey;
use proptest::prelude::*;

fn sealer(k: u8) -> Arc<Sealer> {
    Arc::new(Sealer::new(&CacheKey::from_bytes([k; 32])))
}

fn read(f: &SealedFile) -> Vec<u8> {
    f.read_all().unwrap()
}

#[test]
fn writes_reads_truncates_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let f = SealedFile::create(&p, sealer(1)).unwrap();
    assert_eq!(f.len(), 0);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(b"hello", 70_000).unwrap();
    let mut want = data.clone();
    want[70_000..70_005].copy_from_slice(b"hello");
    assert_eq!(read(&f), want);
    // A write past the end leaves a hole of zeros.
    f.write_all_at(b"end", 400_000).unwrap();
    want.resize(400_000, 0);
    want.extend_from_slice(b"end");
    assert_eq!(read(&f), want);
    f.set_len(100_001).unwrap();
    want.truncate(100_001);
    assert_eq!(read(&f), want);
    // Extending after a truncate reads zeros, not the old bytes.
    f.set_len(150_000).unwrap();
    want.resize(150_000, 0);
    assert_eq!(read(&f), want);
    f.sync_data().unwrap();
    drop(f);
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    assert_eq!(read(&f), want);
    // Another key opens nothing.
    let err = SealedFile::open(&p, sealer(2)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn no_plaintext_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let f = SealedFile::create(&p, sealer(1)).unwrap();
    let secret = b"TOP-SECRET-PLAINTEXT-0123456789".repeat(100);
    f.write_all_at(&secret, 10).unwrap();
    f.write_all_at(&secret[..40], 5).unwrap();
    let raw = std::fs::read(&p).unwrap();
    assert!(!raw.windows(10).any(|w| w == &secret[..10]));
}

/// A crash in the middle of rewriting a block leaves the version before it readable.
#[test]
fn a_torn_rewrite_keeps_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let f = SealedFile::create(&p, sealer(1)).unwrap();
    f.write_all_at(&[1u8; 100_000], 0).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(&[2u8; 10], 500).unwrap();
    f.sync_data().unwrap();
    let seq = f.lock().seqs[&0];
    drop(f);
    // Tear the newest slot of block 0: half of it never reached the disk.
    let raw = OpenOptions::new().write(true).open(&p).unwrap();
    raw.write_all_at(&vec![0xEE; SLOT / 2], slot_at(0, seq) + (SLOT / 2) as u64).unwrap();
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    assert_eq!(read(&f), vec![1u8; 100_000]);
    // And the next write goes on from there.
    f.write_all_at(&[3u8; 4], 0).unwrap();
    let mut want = vec![1u8; 100_000];
    want[..4].fill(3);
    assert_eq!(read(&f), want);
    drop(f);
    assert_eq!(read(&SealedFile::open(&p, sealer(1)).unwrap()), want);
}

/// A crash loses at most what was written after the last sync; what a sync made
/// durable stays, even in the block being written when the crash came.
#[test]
fn a_crash_keeps_what_was_synced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let f = SealedFile::create(&p, sealer(1)).unwrap();
    f.write_all_at(&[1u8; 30_000], 0).unwrap();
    f.write_all_at(b"synced", 10).unwrap();
    f.sync_data().unwrap();
    // Gathered in memory (all in block 0), with the longer length: not on disk yet.
    f.write_all_at(b"lost", 20).unwrap();
    f.write_all_at(b"tail", 29_998).unwrap();
    assert_eq!(f.len(), 30_002);
    // The process dies: nothing in memory reaches the disk.
    std::mem::forget(f);
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    let mut want = vec![1u8; 30_000];
    want[10..16].copy_from_slice(b"synced");
    assert_eq!(read(&f), want);
}

#[test]
fn a_rotted_block_is_an_error_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let f = SealedFile::create(&p, sealer(1)).unwrap();
    f.write_all_at(&[7u8; 200_000], 0).unwrap();
    drop(f);
    let raw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut b = [0u8; 1];
    let at = slot_at(1, 1) + 1000;
    raw.read_exact_at(&mut b, at).unwrap();
    raw.write_all_at(&[b[0] ^ 1], at).unwrap();
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    let mut buf = vec![0u8; 10];
    assert_eq!(f.read_at(&mut buf, 0).unwrap(), 10);
    let err = f.read_at(&mut buf, STAGE_BLOCK + 5).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("integrity"), "{err}");
}

#[test]
fn copies_hash_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let f = SealedFile::create(&dir.path().join("a"), sealer(1)).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    f.write_all_at(&data, 0).unwrap();
    let Copied { file: copy, len, base_len, hash } = f.copy_to(&dir.path().join("b")).unwrap();
    assert_eq!(base_len, 0);
    assert_eq!(len, data.len() as u64);
    assert_eq!(hash, blake3::hash(&data).to_hex().to_string());
    assert_eq!(read(&copy), data);
}

/// The bytes of base block `index` (what a caller brings from the bucket).
fn base_of(base: &[u8], index: u64) -> &[u8] {
    let start = (index * STAGE_BLOCK) as usize;
    &base[start.min(base.len())..(start + STAGE_BLOCK as usize).min(base.len())]
}

/// Writes like a caller: a write that needs base bytes gets them, then goes again.
fn write_over(f: &SealedFile, base: &[u8], data: &[u8], at: u64) {
    loop {
        match f.write_all_at(data, at) {
            Ok(()) => return,
            Err(e) => {
                let i = needed_block(&e).unwrap_or_else(|| panic!("{e}"));
                f.fill_block(i, base_of(base, i)).unwrap();
            }
        }
    }
}

/// The whole content, the base's ranges taken from `base`.
fn read_over(f: &SealedFile, base: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; f.len() as usize];
    let (n, ranges) = f.read_sparse(&mut buf, 0).unwrap();
    assert_eq!(n, buf.len());
    for r in ranges {
        buf[r.start as usize..r.end as usize].copy_from_slice(&base[r.start as usize..r.end as usize]);
    }
    buf
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

#[test]
fn a_sparse_file_holds_only_the_blocks_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let base = pattern(300_000);
    let f = SealedFile::create_sparse(&p, sealer(1), base.len() as u64).unwrap();
    let mut buf = vec![0u8; 10];
    let (_, ranges) = f.read_sparse(&mut buf, 5).unwrap();
    assert_eq!(ranges, [5..15]);
    assert_eq!(needed_block(&f.read_at(&mut buf, 5).unwrap_err()), Some(0));
    // A piece of a block of the base needs that block first.
    let e = f.write_all_at(b"hello", 70_000).unwrap_err();
    assert_eq!(needed_block(&e), Some(1));
    f.fill_block(1, base_of(&base, 1)).unwrap();
    f.write_all_at(b"hello", 70_000).unwrap();
    // A whole block needs nothing of it.
    f.write_all_at(&[9u8; STAGE_BLOCK as usize], 2 * STAGE_BLOCK).unwrap();
    let mut want = base.clone();
    want[70_000..70_005].copy_from_slice(b"hello");
    want[2 * STAGE_BLOCK as usize..3 * STAGE_BLOCK as usize].fill(9);
    assert_eq!(read_over(&f, &base), want);
    assert_eq!(f.base_blocks().unwrap(), [0, 3, 4]);
    f.sync_data().unwrap();
    drop(f);
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    assert_eq!(f.base_len(), base.len() as u64);
    assert_eq!(read_over(&f, &base), want);
    // Only the blocks written are on disk: three of five.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 4 * SLOT as u64);
    for i in f.base_blocks().unwrap() {
        f.fill_block(i, base_of(&base, i)).unwrap();
    }
    assert!(f.settle_base().unwrap());
    assert_eq!(f.base_len(), 0);
    assert_eq!(read(&f), want);
}

/// `echo line >> big.log`: a write past the base's end, in the block the base ends in,
/// needs none of the base; the block's first bytes stay the base's.
#[test]
fn an_append_needs_nothing_of_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let base = pattern(100_000);
    let f = SealedFile::create_sparse(&p, sealer(1), base.len() as u64).unwrap();
    f.write_all_at(b"appended\n", 100_000).unwrap();
    let mut want = base.clone();
    want.extend_from_slice(b"appended\n");
    assert_eq!(read_over(&f, &base), want);
    let mut buf = vec![0u8; want.len()];
    assert_eq!(f.read_sparse(&mut buf, 0).unwrap().1, [0..100_000]);
    f.sync_data().unwrap();
    drop(f);
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    assert_eq!(read_over(&f, &base), want);
    // A write below the base's end in that block needs the base's bytes there.
    let e = f.write_all_at(b"X", 99_999).unwrap_err();
    assert_eq!(needed_block(&e), Some(1));
    assert_eq!(f.base_blocks().unwrap(), [0, 1]);
    write_over(&f, &base, b"X", 99_999);
    want[99_999] = b'X';
    assert_eq!(read_over(&f, &base), want);
    assert_eq!(f.base_blocks().unwrap(), [0]);
}

#[test]
fn a_truncate_cuts_the_base_and_an_extension_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let base = pattern(200_000);
    let f = SealedFile::create_sparse(&dir.path().join("f"), sealer(1), base.len() as u64).unwrap();
    f.set_len(50_000).unwrap();
    assert_eq!(f.base_len(), 50_000);
    f.set_len(80_000).unwrap();
    let mut want = base[..50_000].to_vec();
    want.resize(80_000, 0);
    assert_eq!(read_over(&f, &base), want);
}

#[test]
fn copies_of_a_sparse_file_hold_its_blocks_and_name_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let base = pattern(500_000);
    let f = SealedFile::create_sparse(&dir.path().join("f"), sealer(1), base.len() as u64).unwrap();
    write_over(&f, &base, b"edit", 200_000);
    f.write_all_at(b"tail", 500_000).unwrap();
    let a = f.copy_to(&dir.path().join("a")).unwrap();
    let b = f.copy_to(&dir.path().join("b")).unwrap();
    assert_eq!((a.len, a.base_len), (500_004, 500_000));
    assert_eq!(a.hash, b.hash, "the same state has the same name");
    assert_eq!(read_over(&a.file, &base), read_over(&f, &base));
    assert_eq!(a.file.base_blocks().unwrap(), f.base_blocks().unwrap());
    write_over(&f, &base, b"more", 10);
    assert_ne!(f.copy_to(&dir.path().join("c")).unwrap().hash, a.hash);
}

#[test]
fn version_1_files_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let id = SealedFile::create(&p, sealer(1)).unwrap().id;
    // Written as version 1 would have: its version byte, a length record of the length
    // alone, blocks sealed with version 1 in their AAD.
    let raw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    raw.write_all_at(&[1], 4).unwrap();
    raw.write_all_at(&[0u8; 128], LEN_AT[0]).unwrap();
    let v1 = SealedFile { file: raw, id, version: 1, sealer: sealer(1), state: Default::default() };
    {
        let mut st = v1.lock();
        v1.write_len(&mut st, 10).unwrap();
        let mut block = vec![0u8; STAGE_BLOCK as usize];
        block[..10].copy_from_slice(b"old format");
        v1.write_block(&mut st, 0, 1, &block).unwrap();
    }
    drop(v1);
    let f = SealedFile::open(&p, sealer(1)).unwrap();
    assert_eq!((f.len(), f.base_len()), (10, 0));
    assert_eq!(read(&f), b"old format");
    f.write_all_at(b"!", 10).unwrap();
    f.sync_data().unwrap();
    drop(f);
    assert_eq!(read(&SealedFile::open(&p, sealer(1)).unwrap()), b"old format!");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Any sequence of writes and resizes reads back like a plain Vec, before and
    /// after a reopen.
    #[test]
    fn behaves_like_a_vec(ops in prop::collection::vec(
        (0u8..3, 0u64..300_000, 1usize..140_000, any::<u8>()), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = SealedFile::create(&p, sealer(3)).unwrap();
        let mut model: Vec<u8> = Vec::new();
        for (kind, at, n, byte) in ops {
            if kind < 2 {
                let data = vec![byte; n];
                f.write_all_at(&data, at).unwrap();
                let end = at as usize + n;
                if model.len() < end { model.resize(end, 0); }
                model[at as usize..end].copy_from_slice(&data);
            } else {
                f.set_len(at).unwrap();
                model.resize(at as usize, 0);
            }
            prop_assert_eq!(f.len(), model.len() as u64);
        }
        prop_assert_eq!(read(&f), model.clone());
        drop(f);
        let f = SealedFile::open(&p, sealer(3)).unwrap();
        prop_assert_eq!(read(&f), model);
    }

    /// The same over a base: writes that need the base's bytes get them, and the file,
    /// with its base's ranges filled in, reads like the model, before and after a
    /// reopen.
    #[test]
    fn a_sparse_file_behaves_like_a_vec(base_len in 0usize..400_000, ops in prop::collection::vec(
        (0u8..4, 0u64..450_000, 1usize..140_000, any::<u8>()), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let base = pattern(base_len);
        let f = SealedFile::create_sparse(&p, sealer(3), base_len as u64).unwrap();
        let mut model = base.clone();
        for (kind, at, n, byte) in ops {
            match kind {
                0 | 1 => {
                    let data = vec![byte; n];
                    write_over(&f, &base, &data, at);
                    let end = at as usize + n;
                    if model.len() < end { model.resize(end, 0); }
                    model[at as usize..end].copy_from_slice(&data);
                }
                2 => {
                    f.set_len(at).unwrap();
                    model.resize(at as usize, 0);
                }
                _ => {
                    let c = f.copy_to(&dir.path().join("copy")).unwrap();
                    prop_assert_eq!(read_over(&c.file, &base), model.clone());
                }
            }
            prop_assert_eq!(f.len(), model.len() as u64);
        }
        prop_assert_eq!(read_over(&f, &base), model.clone());
        drop(f);
        let f = SealedFile::open(&p, sealer(3)).unwrap();
        prop_assert_eq!(read_over(&f, &base), model.clone());
        for i in f.base_blocks().unwrap() {
            f.fill_block(i, base_of(&base, i)).unwrap();
        }
        prop_assert!(f.settle_base().unwrap());
        prop_assert_eq!(read(&f), model);
    }
}
