//! Reads of remote content by fixed-size blocks: decrypted blocks in memory (moka, bounded by
//! bytes), sealed blocks on disk ([`BlockCache`]), one shared fetch per block however many
//! reads miss it at once, and read-ahead that grows while a handle reads sequentially.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::{GetOptions, GetRange};
use tokio::sync::Semaphore;

use super::error::{FsError, FsResult};
use super::types::Remote;
use super::{CacheReport, etag_same, obj_path, stale};
use crate::cache::{BlockCache, BlockId};
use crate::store::Store;

/// How many blocks read-ahead fetches at once, across the mount.
const PREFETCH_PARALLEL: usize = 8;

/// Where a block comes from: the object, the version its bytes belong to, its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    key: Arc<str>,
    version: Arc<str>,
    index: u64,
}

/// Sizes of the block reader.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    /// Bytes per block (the unit of ranged GETs and of both caches).
    pub block_size: u64,
    /// Largest read-ahead window, in bytes.
    pub readahead_max: u64,
    /// Bytes of decrypted blocks kept in memory.
    pub memory_limit: u64,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig { block_size: 1 << 20, readahead_max: 64 << 20, memory_limit: 128 << 20 }
    }
}

pub(crate) struct BlockReader {
    store: Store,
    disk: Option<Arc<BlockCache>>,
    mem: moka::future::Cache<BlockKey, Bytes>,
    pub(crate) cfg: BlockConfig,
    prefetch: Arc<Semaphore>,
    disk_writes: Arc<Semaphore>,
    /// Reads that reached the mount, and blocks (bytes) fetched from the bucket.
    pub(crate) reads: AtomicU64,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
}

/// The version a remote's bytes are known by: its ETag, else its store version. Without
/// either, versions cannot be told apart, and nothing of it is cached.
pub(crate) fn version_of(remote: &Remote) -> Option<&str> {
    remote.etag.as_deref().or(remote.version.as_deref())
}

/// Background writes of fetched blocks to disk at once; past that, a block is not kept on
/// disk (it stays in memory), so a slow disk cannot pile up blocks in memory.
const DISK_WRITES_PARALLEL: usize = 8;

impl BlockReader {
    pub(crate) fn new(store: Store, disk: Option<Arc<BlockCache>>, cfg: BlockConfig) -> Arc<Self> {
        // LRU, not moka's default admission by frequency: a long sequential read must be able
        // to replace blocks read often with new ones, or its read-ahead is thrown away.
        let mem = moka::future::Cache::builder()
            .weigher(|_: &BlockKey, b: &Bytes| u32::try_from(b.len()).unwrap_or(u32::MAX))
            .max_capacity(cfg.memory_limit)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        // Read-ahead may not push out what it fetched before it is read.
        let cfg = BlockConfig { readahead_max: cfg.readahead_max.min(cfg.memory_limit / 4), ..cfg };
        Arc::new(BlockReader {
            store,
            disk,
            mem,
            cfg,
            prefetch: Arc::new(Semaphore::new(PREFETCH_PARALLEL)),
            disk_writes: Arc::new(Semaphore::new(DISK_WRITES_PARALLEL)),
            reads: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
        })
    }

    pub(crate) fn report(&self) -> CacheReport {
        CacheReport {
            disk: self.disk.as_ref().map(|d| d.stats()),
            memory_bytes: self.mem.weighted_size(),
            memory_limit: self.cfg.memory_limit,
            block_size: self.cfg.block_size,
            reads: self.reads.load(Ordering::Relaxed),
            fetched_blocks: self.fetched.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn disk(&self) -> Option<&Arc<BlockCache>> {
        self.disk.as_ref()
    }

    /// Drops the decrypted blocks kept in memory.
    pub(crate) fn clear_memory(&self) {
        self.mem.invalidate_all();
    }

    /// The block's name in both caches. The block size is part of the version, so blocks
    /// cached with another `--block-size` never match.
    fn key(&self, remote: &Remote, index: u64) -> Option<BlockKey> {
        let version = format!("{}:{}", self.cfg.block_size, version_of(remote)?);
        Some(BlockKey { key: remote.key.as_str().into(), version: version.into(), index })
    }

    /// The byte range of block `index` of `remote`.
    fn bounds(&self, remote: &Remote, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.cfg.block_size);
        start..start.saturating_add(self.cfg.block_size).min(remote.size).max(start)
    }

    /// The blocks a range of `size` bytes of content spans.
    pub(crate) fn span(&self, range: Range<u64>) -> Range<u64> {
        let bs = self.cfg.block_size;
        if range.is_empty() {
            return 0..0;
        }
        range.start / bs..(range.end - 1) / bs + 1
    }

    /// Block `index` of `remote`: from memory, else from the disk cache, else fetched (one
    /// fetch shared by every caller that misses it meanwhile).
    pub(crate) async fn block(self: &Arc<Self>, remote: &Remote, index: u64) -> FsResult<Bytes> {
        let Some(key) = self.key(remote, index) else { return self.fetch(remote, index).await };
        let this = Arc::clone(self);
        let remote = remote.clone();
        let version = Arc::clone(&key.version);
        self.mem
            .try_get_with(key, async move { this.load(&remote, &version, index).await })
            .await
            .map_err(FsError::shared)
    }

    async fn load(&self, remote: &Remote, version: &Arc<str>, index: u64) -> FsResult<Bytes> {
        let want = self.bounds(remote, index);
        if let Some(disk) = &self.disk {
            let (disk, key, version) = (Arc::clone(disk), remote.key.clone(), Arc::clone(version));
            let hit = tokio::task::spawn_blocking(move || disk.get(&BlockId { key: &key, version: &version, index }))
                .await
                .ok()
                .flatten();
            // A block of another length is not this one (whatever wrote it): fetch it.
            if let Some(b) = hit.filter(|b| b.len() as u64 == want.end - want.start) {
                return Ok(b);
            }
        }
        let data = self.fetch(remote, index).await?;
        if let Some(disk) = &self.disk
            && let Ok(permit) = Arc::clone(&self.disk_writes).try_acquire_owned()
        {
            // Kept in the background: the reader has its bytes already.
            let (disk, key, version, data) = (Arc::clone(disk), remote.key.clone(), Arc::clone(version), data.clone());
            drop(tokio::task::spawn_blocking(move || {
                disk.put(&BlockId { key: &key, version: &version, index }, &data);
                drop(permit);
            }));
        }
        Ok(data)
    }

    /// Block `index` of `remote` from the bucket: a ranged GET conditional on the ETag, whose
    /// answer must carry that ETag too (a store that ignores `If-Match` answers `ESTALE`).
    async fn fetch(&self, remote: &Remote, index: u64) -> FsResult<Bytes> {
        let Range { start, end } = self.bounds(remote, index);
        if start >= end {
            return Ok(Bytes::new());
        }
        let opts = GetOptions {
            if_match: remote.etag.clone(),
            range: Some(GetRange::Bounded(start..end)),
            ..Default::default()
        };
        let res = self.store.get_opts(&obj_path(&remote.key)?, opts).await.map_err(stale)?;
        if remote.etag.is_some() && !etag_same(remote.etag.as_deref(), res.meta.e_tag.as_deref()) {
            return Err(FsError::Stale(remote.key.clone()));
        }
        let data = res.bytes().await.map_err(stale)?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Starts fetching `blocks` of `remote` in the background, as far as the read-ahead
    /// slots allow; blocks already in memory are skipped.
    pub(crate) fn prefetch(self: &Arc<Self>, remote: &Remote, blocks: Range<u64>) {
        for index in blocks {
            match self.key(remote, index) {
                Some(key) if !self.mem.contains_key(&key) => {}
                _ => continue,
            }
            let Ok(permit) = Arc::clone(&self.prefetch).try_acquire_owned() else { return };
            let (this, remote) = (Arc::clone(self), remote.clone());
            tokio::spawn(async move {
                if let Err(e) = this.block(&remote, index).await {
                    tracing::debug!(key = %remote.key, index, "read-ahead failed: {e}");
                }
                drop(permit);
            });
        }
    }
}

/// Read-ahead state of one handle: where the next sequential read would start, and how far
/// ahead to fetch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Readahead {
    next: u64,
    window: u64,
}

impl Readahead {
    /// Notes a read of `range`; returns how many bytes past its end to fetch ahead. The window
    /// starts at two blocks on the second sequential read and doubles up to `max`; a jump
    /// elsewhere resets it. A read that starts up to a block away from where the last one
    /// ended and goes past it is sequential. One that stays within a block behind that end
    /// (the kernel sends its read-ahead requests out of order, and programs re-read) changes
    /// nothing and fetches nothing more.
    pub(crate) fn advance(&mut self, range: Range<u64>, block: u64, max: u64) -> u64 {
        if range.end <= self.next && self.next - range.start <= block {
            return 0;
        }
        if range.start.abs_diff(self.next) <= block {
            self.window = match self.window {
                0 if range.start == 0 && self.next == 0 => 0,
                0 => 2 * block,
                w => (w * 2).min(max),
            };
            self.next = self.next.max(range.end);
        } else {
            self.window = 0;
            self.next = range.end;
        }
        self.window.min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_grows_while_sequential_and_resets_on_a_jump() {
        let (bs, max) = (1 << 20, 8 << 20);
        let mut r = Readahead::default();
        let step = 128 << 10;
        let mut windows = Vec::new();
        for i in 0..200u64 {
            windows.push(r.advance(i * step..(i + 1) * step, bs, max));
        }
        assert_eq!(windows[0], 0, "the first read of a file is not a pattern yet");
        assert_eq!(windows[1], 2 * bs);
        assert_eq!(*windows.last().unwrap(), max, "the window grows up to its maximum");
        assert!(windows.windows(2).all(|w| w[1] >= w[0]), "the window never shrinks while sequential");
        assert_eq!(r.advance(900 << 20..(900 << 20) + step, bs, max), 0, "a jump resets it");
        assert_eq!(r.advance((900 << 20) + step..(900 << 20) + 2 * step, bs, max), 2 * bs);
        // Stragglers and re-reads within a block behind: nothing more, and the window stays.
        let again = (900 << 20) + step..(900 << 20) + 2 * step;
        assert_eq!(r.advance(again.clone(), bs, max), 0);
        assert_eq!(r.advance((900 << 20)..(900 << 20) + step, bs, max), 0);
        assert_eq!(r.advance((900 << 20) + 2 * step..(900 << 20) + 3 * step, bs, max), 4 * bs);
    }

    #[test]
    fn span_covers_the_blocks_of_a_range() {
        let r = BlockReader::new(
            Arc::new(object_store::memory::InMemory::new()),
            None,
            BlockConfig { block_size: 10, ..Default::default() },
        );
        assert_eq!(r.span(0..10), 0..1);
        assert_eq!(r.span(5..25), 0..3);
        assert_eq!(r.span(10..11), 1..2);
        assert_eq!(r.span(3..3), 0..0);
    }
}
