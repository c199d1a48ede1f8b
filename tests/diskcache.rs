//! Filesystem tests of reads from the encrypted disk cache, without FUSE: the `Fs` core over
//! `memory://` with a block cache on local disk, mounted again so that blocks are found only
//! there. Random reads open the sealed units they cover; sequential ones load whole blocks.

use std::sync::Arc;
use std::time::Duration;

use autosync::cache::{BlockCache, CacheKey, CacheStats, Layout};
use autosync::fs::events::Kind as EventKind;
use autosync::fs::{BlockConfig, Caps, FsConfig};
use object_store::memory::InMemory;

mod harness;
use harness::*;

const MIB: u64 = 1 << 20;
const UNIT: u64 = 64 << 10;

/// Bytes that differ from offset to offset, so a read from the wrong place shows.
fn content(len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn open_cache(dir: &std::path::Path) -> Arc<BlockCache> {
    Arc::new(BlockCache::open(dir, &CacheKey::from_bytes([3; 32]), 1 << 30).expect("open the block cache"))
}

/// Waits (up to 20 s) until the disk writer, which works behind the reads, has put `n`
/// blocks since the cache was opened.
async fn written(cache: &BlockCache, n: u64) {
    for _ in 0..2000 {
        if cache.stats().inserted >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the disk writer put {} blocks of {n}", cache.stats().inserted);
}

fn disk(h: &Harness) -> CacheStats {
    h.fs().status().cache.disk.expect("a disk cache")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_after_a_remount_come_from_the_disk_cache_by_units() {
    let blocks = tempfile::tempdir().unwrap();
    let cache = open_cache(blocks.path());
    // No read-ahead: what is in memory is exactly what the reads themselves loaded.
    let blocks_cfg = BlockConfig { readahead_max: 0, ..BlockConfig::default() };
    let cfg = FsConfig { disk_cache: Some(Arc::clone(&cache)), blocks: blocks_cfg, ..cfg() };
    let mut h = Harness::with_config(Arc::new(InMemory::new()), Caps { create: true, update: true }, cfg).await;
    let data = content((5 * MIB + 12_345) as usize);
    let len = data.len() as u64;
    h.remote_put("big.bin", &data).await;
    assert!(h.read("big.bin").await.unwrap() == data);
    written(&cache, 6).await;
    drop(cache);

    // Mounted again, with the block cache opened again from its folder: nothing in memory.
    let cache = open_cache(blocks.path());
    assert_eq!(cache.stats().blocks, 6);
    h.cfg.disk_cache = Some(cache);
    h.restart().await;
    let ino = h.resolve("big.bin").await.unwrap();
    let (fh, _) = h.fs().open(ino).await.unwrap();
    let read = |off: u64, size: u32| {
        let fs = Arc::clone(h.fs());
        async move { fs.read(fh, off, size).await.unwrap() }
    };
    let want = |off: u64, size: u32| &data[off as usize..(off + u64::from(size)).min(len) as usize];

    // Each read more than a block away from where the last one ended: random. Across a unit
    // boundary, across a block boundary (two blocks, two ranged reads), the short tail, a
    // read over three units, one byte.
    let mut reads = vec![(3 * MIB + 7 * 4096, 4096), (UNIT - 100, 4096), (2 * MIB - 2000, 4096), (len - 100, 4096)];
    reads.extend([(MIB + 5 * UNIT + 3, 130 << 10), (4 * MIB + 1, 1)]);
    let mut end = 4 * MIB + 2;
    let mut x = 7u64;
    while reads.len() < 30 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let off = (x >> 20) % (len / 4096) * 4096;
        if off.abs_diff(end) > MIB {
            reads.push((off, 4096));
            end = off + 4096;
        }
    }
    let spans_two = reads.iter().filter(|(o, s)| o / MIB != (o + u64::from(*s) - 1).min(len - 1) / MIB).count();
    assert_eq!(spans_two, 1);
    for &(off, size) in &reads {
        assert!(read(off, size).await == want(off, size), "read of {size} at {off}");
    }
    let st = h.fs().status().cache;
    let d = st.disk.clone().unwrap();
    assert_eq!(st.fetched_blocks, 0, "fetched from the bucket after a remount: {st:?}");
    assert_eq!((d.range_hits, d.hits, d.misses, d.integrity_failures), (31, 31, 0, 0), "{d:?}");

    // A sequential read: its first read is a jump (ranged), the ones after it load whole
    // blocks into memory, and a random read of a block in memory is answered from there.
    for off in (0..2 * MIB).step_by(128 << 10) {
        assert!(read(off, 128 << 10).await == want(off, 128 << 10), "sequential read at {off}");
    }
    let d = disk(&h);
    assert_eq!((d.range_hits, d.hits), (32, 34), "then blocks 0 and 1 whole: {d:?}");
    assert!(read(4 * MIB, 4096).await == want(4 * MIB, 4096));
    assert!(read(UNIT + 10, 4096).await == want(UNIT + 10, 4096), "block 0, in memory");
    let d = disk(&h);
    assert_eq!((d.range_hits, d.hits), (33, 35), "block 0 came from memory: {d:?}");
    h.fs().release(fh).await.unwrap();

    // A flipped byte in the first unit of every block file: a random read into that unit of
    // a block not in memory is an integrity failure (said in an event), the block is fetched
    // again and the right bytes come back; a read of another unit of a damaged block still
    // opens from disk.
    for p in block_files(&blocks.path().join("blocks")) {
        let mut b = std::fs::read(&p).unwrap();
        let at = Layout::for_file(b.len() as u64).unwrap().body_start() + 100;
        b[at] ^= 0x20;
        std::fs::write(&p, b).unwrap();
    }
    let mut events = h.fs().events(None);
    let (fh, _) = h.fs().open(ino).await.unwrap();
    let read = |off: u64, size: u32| {
        let fs = Arc::clone(h.fs());
        async move { fs.read(fh, off, size).await.unwrap() }
    };
    assert!(read(4 * MIB + 9 * UNIT, 4096).await == want(4 * MIB + 9 * UNIT, 4096), "undamaged unit");
    assert_eq!(disk(&h).integrity_failures, 0);
    assert!(read(3 * MIB + 10, 4096).await == want(3 * MIB + 10, 4096), "damaged unit");
    let st = h.fs().status().cache;
    let d = st.disk.clone().unwrap();
    assert_eq!((d.integrity_failures, st.fetched_blocks), (1, 1), "{st:?}");
    let told = events.held();
    assert!(
        told.iter().any(|e| e.kind == EventKind::CacheIntegrity && e.path.as_deref() == Some("big.bin")),
        "{told:?}"
    );
    h.fs().release(fh).await.unwrap();
}

/// The sealed block files under a block cache's folder.
fn block_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(root).unwrap().flatten().filter(|e| e.file_name().len() == 2) {
        out.extend(std::fs::read_dir(fan.path()).unwrap().flatten().map(|e| e.path()));
    }
    assert_eq!(out.len(), 6, "{out:?}");
    out
}
