//! Edits of big files without downloading them, without FUSE: the first write to a file
//! already in the bucket stages only the blocks it touches, reads take the rest from the
//! bucket, uploads bring it in, and a base that changes in the bucket meanwhile costs no
//! byte written here.

use std::sync::Arc;
use std::time::Duration;

use autosync::fs::{Caps, FsConfig, SetAttr};
use autosync::store::Store;
use autosync::store::faulty::{FaultSwitch, FaultyStore};
use object_store::memory::InMemory;

mod harness;
use harness::*;

/// A 3 MiB file counts as big here (the threshold is 1 MiB), over a store that counts the
/// bytes its reads return.
async fn mount(upload_delay: Duration) -> (Harness, FaultSwitch) {
    let switch = FaultSwitch::default();
    let store: Store = FaultyStore::wrap(Arc::new(InMemory::new()), switch.clone());
    let cfg = FsConfig { multipart_threshold: 1 << 20, ..cfg_with_delay(upload_delay) };
    (Harness::with_config(store, Caps { create: true, update: true }, cfg).await, switch)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

const SIZE: usize = 3 << 20;

/// Writes `data` at `offset` of `path` and closes it.
async fn write_at(h: &Harness, path: &str, offset: u64, data: &[u8]) {
    let ino = h.resolve(path).await.unwrap();
    let (fh, _) = h.fs().open(ino).await.unwrap();
    assert_eq!(h.fs().write(fh, offset, data).await.unwrap(), data.len() as u32);
    h.fs().flush(fh).await.unwrap();
    h.fs().release(fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_to_a_big_file_reads_nothing_of_it() {
    let (h, switch) = mount(Duration::from_secs(3600)).await;
    // Not a whole number of blocks: the append goes into the block the file ends in.
    let size = SIZE + 1000;
    let mut want = pattern(size, 1);
    h.remote_put("big.log", &want).await;
    let before = switch.read_bytes();
    write_at(&h, "big.log", size as u64, b"one more line\n").await;
    assert_eq!(switch.read_bytes() - before, 0, "the append read bytes of the file");
    want.extend_from_slice(b"one more line\n");
    assert_eq!(h.read("big.log").await.unwrap(), want);
    h.flush().await;
    assert_eq!(h.bucket().await["big.log"], want);
    // Still staged over the version just uploaded: it reads the same after a remount.
    let mut h = h;
    h.restart().await;
    assert_eq!(h.read("big.log").await.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_the_middle_reads_one_block_of_the_base() {
    let (mut h, switch) = mount(Duration::from_secs(3600)).await;
    let mut want = pattern(SIZE, 2);
    h.remote_put("big.bin", &want).await;
    let before = switch.read_bytes();
    write_at(&h, "big.bin", 1_500_000, b"edited").await;
    let read = switch.read_bytes() - before;
    assert!(read <= 1 << 20, "a write of 6 bytes read {read} bytes of the base");
    want[1_500_000..1_500_006].copy_from_slice(b"edited");
    // Written but not uploaded: the local copy holds the edit, the rest comes from the bucket.
    let status = h.fs().status();
    assert!(status.staged_bytes < 1 << 20, "staged {} bytes on disk", status.staged_bytes);
    h.restart().await;
    assert_eq!(h.read("big.bin").await.unwrap(), want);
    h.flush().await;
    assert_eq!(h.bucket().await["big.bin"], want);
    assert_eq!(h.fs().status().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_and_an_extension_of_a_big_file_read_nothing_of_it() {
    let (h, switch) = mount(Duration::from_secs(3600)).await;
    let base = pattern(SIZE, 3);
    h.remote_put("big.bin", &base).await;
    let ino = h.resolve("big.bin").await.unwrap();
    let before = switch.read_bytes();
    h.fs().setattr(ino, SetAttr { size: Some(2_000_000), ..Default::default() }).await.unwrap();
    h.fs().setattr(ino, SetAttr { size: Some(2_500_000), ..Default::default() }).await.unwrap();
    assert_eq!(switch.read_bytes() - before, 0);
    let mut want = base[..2_000_000].to_vec();
    want.resize(2_500_000, 0);
    assert_eq!(h.read("big.bin").await.unwrap(), want);
    h.flush().await;
    assert_eq!(h.bucket().await["big.bin"], want);
}

/// A file open here, staged over its base, then deleted: its handle still reads all of it
/// after the object is gone from the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_big_file_deleted_stays_readable_through_its_handle() {
    let (h, _) = mount(Duration::ZERO).await;
    let mut want = pattern(SIZE, 4);
    h.remote_put("big.bin", &want).await;
    let ino = h.resolve("big.bin").await.unwrap();
    let (fh, _) = h.fs().open(ino).await.unwrap();
    h.fs().write(fh, 10, b"mine").await.unwrap();
    want[10..14].copy_from_slice(b"mine");
    h.unlink("big.bin").await.unwrap();
    h.flush().await;
    assert!(h.bucket().await.is_empty());
    let mut got = Vec::new();
    while got.len() < SIZE {
        let b = h.fs().read(fh, got.len() as u64, 1 << 20).await.unwrap();
        assert!(!b.is_empty());
        got.extend_from_slice(&b);
    }
    assert_eq!(got, want);
    h.fs().release(fh).await.unwrap();
}

/// Another client replaces the file before this mount's edit of it is uploaded. The edit
/// is kept as a conflict copy: every byte written here, the base's bytes this mount had
/// cached, and the rest (never read here) from the bucket's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_replaced_before_the_upload_keeps_every_byte_written_here() {
    let (h, _) = mount(Duration::from_secs(3600)).await;
    let base = pattern(SIZE, 5);
    h.remote_put("big.bin", &base).await;
    // A write inside block 1 (1 MiB to 2 MiB) of the base: that block is read and cached.
    write_at(&h, "big.bin", 1_500_000, b"mine").await;
    let theirs = pattern(SIZE, 6);
    h.remote_put("big.bin", &theirs).await;
    h.flush().await;
    let bucket = h.bucket().await;
    assert_eq!(bucket["big.bin"], theirs, "the bucket's version keeps the path");
    let copies: Vec<&String> = bucket.keys().filter(|k| k.contains(".conflict-")).collect();
    assert_eq!(copies.len(), 1, "{:?}", bucket.keys());
    let mut want = theirs.clone();
    want[1 << 20..2 << 20].copy_from_slice(&base[1 << 20..2 << 20]);
    want[1_500_000..1_500_004].copy_from_slice(b"mine");
    assert_eq!(bucket[copies[0]], want);
    assert_eq!(h.fs().status().conflicts, 1);
    // The local file is the copy now, and reads as it.
    assert_eq!(h.read(copies[0]).await.unwrap(), want);
}
