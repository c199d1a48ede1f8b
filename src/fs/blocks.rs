//! Reads of remote content by fixed-size blocks: decrypted blocks in memory (moka, bounded by
//! bytes), sealed blocks on disk ([`BlockCache`]), one shared fetch per block however many
//! reads miss it at once, and read-ahead that grows while a handle reads sequentially and
//! fetches several consecutive blocks per ranged GET. Fetched blocks reach the disk cache
//! through one writer thread at the lowest CPU priority, off the path of the read.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use object_store::{GetOptions, GetRange};
use tokio::sync::{Semaphore, mpsc};

use super::CacheReport;
use super::error::{FsError, FsResult};
use super::object::{etag_same, obj_path, stale};
use super::types::{BlockIndex, Remote};
use crate::cache::{BlockCache, BlockId};
use crate::store::Store;

/// How many read-ahead fetches (runs of blocks, or blocks from disk) run at once, across the
/// mount.
const PREFETCH_PARALLEL: usize = 8;

/// Read-ahead fetches up to this many bytes of consecutive blocks in one ranged GET: fewer,
/// larger requests cost the server (and the daemon) less CPU per byte than one GET per block.
const PREFETCH_RUN: u64 = 8 << 20;

/// How `--memory-limit` (M) is shared out among the buffers of reads (uploads take the other
/// half: `upload::parts`). Decrypted blocks in memory: M/2. Read-ahead: a window of at most
/// M/4 per handle (its blocks go into memory as they arrive). Fetched blocks waiting for the
/// disk writer: M/8 (at least one block); a read-ahead run waits for room there, so
/// read-ahead slows down to what the disk cache can take; a block fetched by a read itself is
/// handed over by a waiting task, up to M/16 of them, and past that not kept on disk.
fn memory_share(limit: u64, share: u64) -> u64 {
    limit / share
}

/// Where a block comes from: the object, the version its bytes belong to, its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    key: Arc<str>,
    version: Arc<str>,
    index: BlockIndex,
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

/// A block a read-ahead run is fetching: resolves to its bytes, or `Err` if the run failed
/// before delivering it (the reader then fetches the block itself).
type Pending = Shared<oneshot::Receiver<Bytes>>;

/// Blocks on their way into memory.
#[derive(Default)]
struct Inflight {
    /// Registered by a read-ahead run that has not delivered them yet.
    pending: HashMap<BlockKey, Pending>,
    /// Being loaded one by one (from disk, or by a GET of their own), with how many callers
    /// wait for each: read-ahead leaves them out of its runs.
    loading: HashMap<BlockKey, usize>,
}

/// A fetched block on its way to the disk cache.
struct DiskJob {
    key: String,
    version: Arc<str>,
    index: BlockIndex,
    data: Bytes,
}

pub(crate) struct BlockReader {
    store: Store,
    disk: Option<Arc<BlockCache>>,
    mem: moka::future::Cache<BlockKey, Bytes>,
    pub(crate) cfg: BlockConfig,
    prefetch: Arc<Semaphore>,
    /// Blocks on their way into memory; one lock, so a block is never fetched twice.
    inflight: Mutex<Inflight>,
    /// The disk writer's queue (`None` without a disk cache, or if its thread did not start).
    disk_tx: Option<mpsc::Sender<DiskJob>>,
    disk_writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    disk_overflow: Arc<Semaphore>,
    /// Reads that reached the mount, and blocks (bytes) fetched from the bucket.
    pub(crate) reads: AtomicU64,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    /// GETs sent for blocks (a run is one).
    gets: AtomicU64,
}

/// The version a remote's bytes are known by: its ETag, else its store version. Without
/// either, versions cannot be told apart, and nothing of it is cached.
pub(crate) fn version_of(remote: &Remote) -> Option<&str> {
    remote.etag.as_deref().or(remote.version.as_deref())
}

impl BlockReader {
    pub(crate) fn new(store: Store, disk: Option<Arc<BlockCache>>, cfg: BlockConfig) -> Arc<Self> {
        // LRU, not moka's default admission by frequency: a long sequential read must be able
        // to replace blocks read often with new ones, or its read-ahead is thrown away.
        let mem = moka::future::Cache::builder()
            .weigher(|_: &BlockKey, b: &Bytes| u32::try_from(b.len()).unwrap_or(u32::MAX))
            .max_capacity(memory_share(cfg.memory_limit, 2))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        // Read-ahead may not push out what it fetched before it is read.
        let cfg = BlockConfig { readahead_max: cfg.readahead_max.min(memory_share(cfg.memory_limit, 4)), ..cfg };
        let blocks_in = |bytes: u64| usize::try_from((bytes / cfg.block_size.max(1)).max(1)).unwrap_or(1);
        let (disk_tx, disk_writer) = match &disk {
            Some(d) => match spawn_disk_writer(Arc::clone(d), blocks_in(memory_share(cfg.memory_limit, 8))) {
                Ok((tx, handle)) => (Some(tx), Some(handle)),
                Err(e) => {
                    tracing::warn!(
                        "block cache: cannot start the disk writer thread ({e}): blocks are not kept on disk"
                    );
                    (None, None)
                }
            },
            None => (None, None),
        };
        Arc::new(BlockReader {
            store,
            disk,
            mem,
            cfg,
            prefetch: Arc::new(Semaphore::new(PREFETCH_PARALLEL)),
            inflight: Mutex::new(Inflight::default()),
            disk_tx,
            disk_writer: Mutex::new(disk_writer),
            disk_overflow: Arc::new(Semaphore::new(blocks_in(memory_share(cfg.memory_limit, 16)))),
            reads: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        })
    }

    pub(crate) fn report(&self) -> CacheReport {
        CacheReport {
            disk: self.disk.as_ref().map(|d| d.stats()),
            memory_bytes: self.mem.weighted_size(),
            memory_limit: memory_share(self.cfg.memory_limit, 2),
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
    fn key(&self, remote: &Remote, index: BlockIndex) -> Option<BlockKey> {
        let version = format!("{}:{}", self.cfg.block_size, version_of(remote)?);
        Some(BlockKey { key: remote.key.as_str().into(), version: version.into(), index })
    }

    /// The whole content of `remote` if every block of it is cached (in memory or on
    /// disk), without asking the bucket: a merge's base version.
    pub(crate) async fn cached_whole(&self, remote: &Remote) -> Option<Bytes> {
        let mut out = BytesMut::with_capacity(usize::try_from(remote.size).ok()?);
        for index in BlockIndex::each(BlockIndex(0)..BlockIndex(remote.size.div_ceil(self.cfg.block_size))) {
            out.extend_from_slice(&self.cached(remote, index).await?);
        }
        Some(out.freeze())
    }

    /// Block `index` of `remote` if it is cached (in memory or on disk), without asking the
    /// bucket.
    pub(crate) async fn cached(&self, remote: &Remote, index: BlockIndex) -> Option<Bytes> {
        let key = self.key(remote, index)?;
        let want = self.bounds(remote, index);
        let block = match self.mem.get(&key).await {
            Some(b) => b,
            None => {
                let disk = Arc::clone(self.disk.as_ref()?);
                let (k, version) = (remote.key.clone(), Arc::clone(&key.version));
                tokio::task::spawn_blocking(move || disk.get(&BlockId { key: &k, version: &version, index: index.0 }))
                    .await
                    .ok()
                    .flatten()?
            }
        };
        (block.len() as u64 == want.end - want.start).then_some(block)
    }

    /// Keeps the whole content of `remote` in both caches (the disk's written now, off the
    /// async threads), so a later merge finds it as its base.
    pub(crate) async fn keep_whole(&self, remote: &Remote, data: Bytes) {
        if data.len() as u64 != remote.size {
            return;
        }
        let blocks: Vec<(Arc<str>, BlockIndex, Range<u64>)> =
            BlockIndex::each(BlockIndex(0)..BlockIndex(remote.size.div_ceil(self.cfg.block_size)))
                .filter_map(|i| Some((self.key(remote, i)?.version, i, self.bounds(remote, i))))
                .collect();
        for (_, index, r) in &blocks {
            if let Some(k) = self.key(remote, *index) {
                self.mem.insert(k, data.slice(r.start as usize..r.end as usize)).await;
            }
        }
        let Some(disk) = self.disk.clone() else { return };
        let key = remote.key.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (version, index, r) in blocks {
                let (start, end) = (r.start as usize, r.end as usize);
                disk.put(&BlockId { key: &key, version: &version, index: index.0 }, &data[start..end]);
            }
        })
        .await;
    }

    /// The byte range of block `index` of `remote`.
    fn bounds(&self, remote: &Remote, index: BlockIndex) -> Range<u64> {
        let start = index.0.saturating_mul(self.cfg.block_size);
        start..start.saturating_add(self.cfg.block_size).min(remote.size).max(start)
    }

    /// The blocks a range of `size` bytes of content spans.
    pub(crate) fn span(&self, range: Range<u64>) -> Range<BlockIndex> {
        let bs = self.cfg.block_size;
        if range.is_empty() {
            return BlockIndex(0)..BlockIndex(0);
        }
        BlockIndex(range.start / bs)..BlockIndex((range.end - 1) / bs + 1)
    }

    /// Block `index` of `remote`: from memory, else from the read-ahead run fetching it, else
    /// from the disk cache, else fetched (one fetch shared by every caller that misses it
    /// meanwhile).
    pub(crate) async fn block(self: &Arc<Self>, remote: &Remote, index: BlockIndex) -> FsResult<Bytes> {
        let Some(key) = self.key(remote, index) else { return self.fetch(remote, index).await };
        if let Some(b) = self.mem.get(&key).await {
            return Ok(b);
        }
        // A run delivers into memory before it unregisters, and no run takes a block that is
        // loading: a block neither pending nor in memory (looked up again through moka) is
        // fetched once, here or by whoever loads it already.
        let _loading = match Loading::register(&self.inflight, &key) {
            Ok(l) => l,
            Err(p) => match p.await {
                Ok(b) => return Ok(b),
                // The run failed before this block: load it here.
                Err(_) => Loading::new(&self.inflight, key.clone()),
            },
        };
        let this = Arc::clone(self);
        let remote = remote.clone();
        let version = Arc::clone(&key.version);
        let loaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&loaded);
        let block = self
            .mem
            .try_get_with(key, async move {
                flag.store(true, Ordering::Relaxed);
                this.load(&remote, &version, index).await
            })
            .await
            .map_err(FsError::shared)?;
        if loaded.load(Ordering::Relaxed) {
            // A block came in: what it replaces leaves memory now (see `Run::deliver`).
            self.mem.run_pending_tasks().await;
        }
        Ok(block)
    }

    /// Bytes `within` (offsets in the block) of block `index` of `remote`. A `random` read
    /// (see [`Readahead::random`]) of a block that is on disk and neither in memory nor on its
    /// way there reads and opens only the sealed units that cover it, and keeps nothing in
    /// memory (the kernel keeps the pages it asked for): a 4 KiB read opens 64 KiB, not a
    /// block. Otherwise the whole block is loaded, as [`BlockReader::block`] does, and sliced.
    pub(crate) async fn part(
        self: &Arc<Self>,
        remote: &Remote,
        index: BlockIndex,
        within: Range<u64>,
        random: bool,
    ) -> FsResult<Bytes> {
        if random && let Some(b) = self.disk_part(remote, index, within.clone()).await {
            return Ok(b);
        }
        let b = self.block(remote, index).await?;
        let end = usize::try_from(within.end).unwrap_or(usize::MAX).min(b.len());
        let start = usize::try_from(within.start).unwrap_or(usize::MAX).min(end);
        Ok(b.slice(start..end))
    }

    /// [`BlockReader::part`] from the disk cache by units, if the block is there and not in
    /// memory or coming into it.
    async fn disk_part(&self, remote: &Remote, index: BlockIndex, within: Range<u64>) -> Option<Bytes> {
        let disk = Arc::clone(self.disk.as_ref()?);
        let key = self.key(remote, index)?;
        if self.mem.contains_key(&key) {
            return None;
        }
        {
            let inflight = lock(&self.inflight);
            if inflight.pending.contains_key(&key) || inflight.loading.contains_key(&key) {
                return None;
            }
        }
        if !disk.contains(&BlockId { key: &remote.key, version: &key.version, index: index.0 }) {
            return None;
        }
        let bounds = self.bounds(remote, index);
        let len = bounds.end - bounds.start;
        let within = within.start.min(len)..within.end.min(len);
        let (name, version) = (remote.key.clone(), Arc::clone(&key.version));
        tokio::task::spawn_blocking(move || {
            disk.get_range(&BlockId { key: &name, version: &version, index: index.0 }, within, len)
        })
        .await
        .ok()
        .flatten()
    }

    async fn load(&self, remote: &Remote, version: &Arc<str>, index: BlockIndex) -> FsResult<Bytes> {
        let want = self.bounds(remote, index);
        if let Some(disk) = &self.disk {
            let (disk, key, version) = (Arc::clone(disk), remote.key.clone(), Arc::clone(version));
            let hit = tokio::task::spawn_blocking(move || {
                disk.get(&BlockId { key: &key, version: &version, index: index.0 })
            })
            .await
            .ok()
            .flatten();
            // A block of another length is not this one (whatever wrote it): fetch it.
            if let Some(b) = hit.filter(|b| b.len() as u64 == want.end - want.start) {
                return Ok(b);
            }
        }
        let data = self.fetch(remote, index).await?;
        // The reader has its bytes already; a task waits for room in the writer's queue.
        if let Some(tx) = &self.disk_tx
            && let Ok(permit) = Arc::clone(&self.disk_overflow).try_acquire_owned()
        {
            let (tx, job) = (
                tx.clone(),
                DiskJob { key: remote.key.clone(), version: Arc::clone(version), index, data: data.clone() },
            );
            tokio::spawn(async move {
                let _ = tx.send(job).await;
                drop(permit);
            });
        }
        Ok(data)
    }

    /// Block `index` of `remote` from the bucket: a ranged GET conditional on the ETag, whose
    /// answer must carry that ETag too (a store that ignores `If-Match` answers `ESTALE`).
    async fn fetch(&self, remote: &Remote, index: BlockIndex) -> FsResult<Bytes> {
        let Range { start, end } = self.bounds(remote, index);
        if start >= end {
            return Ok(Bytes::new());
        }
        let opts = GetOptions {
            if_match: remote.etag.clone(),
            range: Some(GetRange::Bounded(start..end)),
            ..Default::default()
        };
        self.gets.fetch_add(1, Ordering::Relaxed);
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
    /// slots allow; blocks already in memory or being fetched are skipped. Blocks on disk are
    /// loaded one by one; the others are fetched in runs of consecutive blocks, one ranged GET
    /// per run. A run shorter than [`PREFETCH_RUN`] waits for more of the window to open
    /// unless it ends the object or starts within a run of `blocks.start` (the next read
    /// needs it soon).
    pub(crate) fn prefetch(self: &Arc<Self>, remote: &Remote, blocks: Range<BlockIndex>) {
        let run_blocks = (PREFETCH_RUN / self.cfg.block_size.max(1)).max(1);
        let last = self.span(0..remote.size).end;
        let mut run: Vec<BlockKey> = Vec::new();
        // Held throughout: what is pending or loading cannot change between the look and the
        // registration of a run.
        let mut inflight = lock(&self.inflight);
        for index in BlockIndex::each(blocks.clone()) {
            let Some(key) = self.key(remote, index) else { return };
            let skip = self.mem.contains_key(&key)
                || inflight.pending.contains_key(&key)
                || inflight.loading.contains_key(&key);
            let on_disk = !skip
                && self
                    .disk
                    .as_ref()
                    .is_some_and(|d| d.contains(&BlockId { key: &remote.key, version: &key.version, index: index.0 }));
            if skip || on_disk {
                let run = std::mem::take(&mut run);
                if !self.start_run(&mut inflight, remote, run, &blocks, run_blocks, last) {
                    return;
                }
                if on_disk && !self.start_block(remote, index) {
                    return;
                }
                continue;
            }
            run.push(key);
            if run.len() as u64 >= run_blocks {
                let run = std::mem::take(&mut run);
                if !self.start_run(&mut inflight, remote, run, &blocks, run_blocks, last) {
                    return;
                }
            }
        }
        self.start_run(&mut inflight, remote, run, &blocks, run_blocks, last);
    }

    /// Loads one block in the background (from disk, as a rule). False when no slot is free.
    fn start_block(self: &Arc<Self>, remote: &Remote, index: BlockIndex) -> bool {
        let Ok(permit) = Arc::clone(&self.prefetch).try_acquire_owned() else { return false };
        let (this, remote) = (Arc::clone(self), remote.clone());
        tokio::spawn(async move {
            if let Err(e) = this.block(&remote, index).await {
                tracing::debug!(key = %remote.key, %index, "read-ahead failed: {e}");
            }
            drop(permit);
        });
        true
    }

    /// Starts fetching a run of consecutive missing blocks with one GET, if it is worth a
    /// request now (see [`BlockReader::prefetch`]). False when no slot is free.
    fn start_run(
        self: &Arc<Self>,
        inflight: &mut Inflight,
        remote: &Remote,
        run: Vec<BlockKey>,
        window: &Range<BlockIndex>,
        run_blocks: u64,
        last: BlockIndex,
    ) -> bool {
        let (Some(first), Some(end)) = (run.first().map(|k| k.index), run.last().map(|k| k.index.next())) else {
            return true;
        };
        let urgent = first.0 < window.start.0.saturating_add(run_blocks);
        if (run.len() as u64) < run_blocks && end < last && !urgent {
            return true;
        }
        let Ok(permit) = Arc::clone(&self.prefetch).try_acquire_owned() else { return false };
        let mut senders = Vec::with_capacity(run.len());
        for key in &run {
            let (tx, rx) = oneshot::channel();
            inflight.pending.insert(key.clone(), rx.shared());
            senders.push(Some(tx));
        }
        let (this, remote) = (Arc::clone(self), remote.clone());
        tokio::spawn(async move {
            let mut run = Run { reader: &this, keys: run, senders, delivered: 0 };
            if let Err(e) = run.fetch(&remote).await {
                tracing::debug!(key = %remote.key, %first, %end, "read-ahead failed: {e}");
            }
            drop(run);
            drop(permit);
        });
        true
    }
}

/// A read-ahead run being fetched: its blocks, and the senders that wake the reads waiting for
/// them. Dropping it (done, failed or cancelled) unregisters what it did not deliver.
struct Run<'a> {
    reader: &'a Arc<BlockReader>,
    keys: Vec<BlockKey>,
    senders: Vec<Option<oneshot::Sender<Bytes>>>,
    delivered: usize,
}

impl Run<'_> {
    /// One ranged GET for the whole run (conditional on the ETag, like [`BlockReader::fetch`]);
    /// each block is delivered as soon as its last byte arrives.
    async fn fetch(&mut self, remote: &Remote) -> FsResult<()> {
        let r = self.reader;
        let (Some(first), Some(last)) = (self.keys.first(), self.keys.last()) else { return Ok(()) };
        let range = r.bounds(remote, first.index).start..r.bounds(remote, last.index).end;
        let opts = GetOptions {
            if_match: remote.etag.clone(),
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        r.gets.fetch_add(1, Ordering::Relaxed);
        let res = r.store.get_opts(&obj_path(&remote.key)?, opts).await.map_err(stale)?;
        if remote.etag.is_some() && !etag_same(remote.etag.as_deref(), res.meta.e_tag.as_deref()) {
            return Err(FsError::Stale(remote.key.clone()));
        }
        if res.range != range {
            return Err(FsError::Stale(remote.key.clone()));
        }
        let mut body = res.into_stream();
        let sizes: Vec<usize> =
            self.keys.iter().map(|k| r.bounds(remote, k.index)).map(|b| (b.end - b.start) as usize).collect();
        let want = |i: usize| sizes.get(i).copied().unwrap_or(0);
        // Each block gets an allocation of exactly its size: a chunk that straddles two blocks
        // is split, so no block holds (and hides from the memory bound) the next one's bytes.
        let mut buf = BytesMut::with_capacity(want(0));
        while self.delivered < self.keys.len() {
            let Some(chunk) = body.next().await else { return Err(FsError::Stale(remote.key.clone())) };
            let mut chunk = chunk.map_err(stale)?;
            while !chunk.is_empty() && self.delivered < self.keys.len() {
                let take = (want(self.delivered) - buf.len()).min(chunk.len());
                buf.extend_from_slice(&chunk.split_to(take));
                if buf.len() == want(self.delivered) {
                    let block = std::mem::replace(&mut buf, BytesMut::with_capacity(want(self.delivered + 1))).freeze();
                    self.deliver(block).await;
                }
            }
        }
        Ok(())
    }

    /// Hands the next block of the run to memory, to the reads waiting for it, and to the disk
    /// writer (waiting for room there: this holds a read-ahead slot, which slows read-ahead
    /// down to what the disk cache takes).
    async fn deliver(&mut self, block: Bytes) {
        let r = self.reader;
        let i = self.delivered;
        let key = self.keys[i].clone();
        r.fetched.fetch_add(1, Ordering::Relaxed);
        r.fetched_bytes.fetch_add(block.len() as u64, Ordering::Relaxed);
        // In memory before it leaves `pending`: a load that misses `pending` finds it there.
        r.mem.insert(key.clone(), block.clone()).await;
        // moka evicts in batches; blocks of a megabyte each must leave as they are replaced,
        // or memory runs well past its bound during a long read.
        r.mem.run_pending_tasks().await;
        if let Some(tx) = self.senders.get_mut(i).and_then(Option::take) {
            let _ = tx.send(block.clone());
        }
        lock(&r.inflight).pending.remove(&key);
        self.delivered += 1;
        if let Some(tx) = &r.disk_tx {
            let job = DiskJob { key: key.key.to_string(), version: key.version, index: key.index, data: block };
            let _ = tx.send(job).await;
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.reader.inflight);
        for key in &self.keys[self.delivered.min(self.keys.len())..] {
            inflight.pending.remove(key);
        }
    }
}

/// Starts the thread that seals and writes fetched blocks to the disk cache, at the lowest CPU
/// priority: sealing costs about as much CPU as receiving the block, and while a cold read
/// keeps the CPUs busy, the read (and the server it reads from) should have them first. The
/// thread ends when the queue's senders are gone and the queue is empty.
fn spawn_disk_writer(
    disk: Arc<BlockCache>,
    queue: usize,
) -> std::io::Result<(mpsc::Sender<DiskJob>, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<DiskJob>(queue);
    let handle = std::thread::Builder::new().name("autosync-cache-write".into()).spawn(move || {
        lower_priority();
        while let Some(job) = rx.blocking_recv() {
            disk.put(&BlockId { key: &job.key, version: &job.version, index: job.index.0 }, &job.data);
        }
    })?;
    Ok((tx, handle))
}

/// Gives the calling thread the lowest scheduling priority (nice 19). Only this thread is
/// affected: on Linux each thread has its own nice value. Failing is harmless.
fn lower_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let res = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if res != 0 {
        tracing::debug!("block cache writer keeps its priority: {}", std::io::Error::last_os_error());
    }
}

impl Drop for BlockReader {
    /// Lets the writer finish the blocks queued for disk before the reader goes away (at
    /// unmount), so that what was read is normally on disk for the next mount. Not inside the
    /// runtime: a task that still holds a sender could need this very thread to finish.
    fn drop(&mut self) {
        self.disk_tx = None;
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        let handle = self.disk_writer.get_mut().map(Option::take).unwrap_or_else(|e| e.into_inner().take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Marks a block as being loaded while it lives: from before its moka lookup until the
/// value is in memory (or the load failed).
struct Loading<'a> {
    inflight: &'a Mutex<Inflight>,
    key: BlockKey,
}

impl<'a> Loading<'a> {
    fn new(inflight: &'a Mutex<Inflight>, key: BlockKey) -> Self {
        *lock(inflight).loading.entry(key.clone()).or_insert(0) += 1;
        Loading { inflight, key }
    }

    /// Marks `key` as loading, unless a run is fetching it: then the run's pending delivery.
    fn register(inflight: &'a Mutex<Inflight>, key: &BlockKey) -> Result<Self, Pending> {
        let mut i = lock(inflight);
        if let Some(p) = i.pending.get(key) {
            return Err(p.clone());
        }
        *i.loading.entry(key.clone()).or_insert(0) += 1;
        Ok(Loading { inflight, key: key.clone() })
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(self.inflight);
        if let Some(n) = inflight.loading.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                inflight.loading.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-ahead state of one handle: where the next sequential read would start, and how far
/// ahead to fetch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Readahead {
    next: u64,
    window: u64,
    /// The last read that moved `next` jumped there from elsewhere.
    jumped: bool,
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
            self.jumped = false;
        } else {
            self.window = 0;
            self.next = range.end;
            self.jumped = true;
        }
        self.window.min(max)
    }

    /// Whether the last read noted was a jump, not part of a sequential run: such a read
    /// that misses memory is served from the disk cache by the units it covers
    /// ([`BlockReader::part`]). The first read of a handle is a jump unless it starts within
    /// the first block.
    pub(crate) fn random(&self) -> bool {
        self.jumped
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
    fn readahead_tells_jumps_from_sequential_reads() {
        let (bs, max) = (1 << 20, 8 << 20);
        let mut r = Readahead::default();
        r.advance(0..4096, bs, max);
        assert!(!r.random(), "the start of a file");
        r.advance(4096..8192, bs, max);
        assert!(!r.random());
        r.advance(50 << 20..(50 << 20) + 4096, bs, max);
        assert!(r.random(), "a jump");
        r.advance((50 << 20) - 4096..50 << 20, bs, max);
        assert!(r.random(), "a straggler changes nothing");
        r.advance((50 << 20) + 4096..(50 << 20) + 8192, bs, max);
        assert!(!r.random(), "on from where the last read ended");
        let mut fresh = Readahead::default();
        fresh.advance(10 << 20..(10 << 20) + 4096, bs, max);
        assert!(fresh.random(), "a handle's first read, in the middle of the file");
    }

    /// Reads `data` of `remote` from start to end in `step`-byte reads, the way `Fs::read`
    /// drives the reader: note the read, start the read-ahead, then take the blocks it spans.
    async fn read_sequentially(r: &Arc<BlockReader>, remote: &Remote, step: u64) -> Vec<u8> {
        let (bs, max) = (r.cfg.block_size, r.cfg.readahead_max);
        let mut ra = Readahead::default();
        let mut out = Vec::new();
        let mut off = 0;
        while off < remote.size {
            let range = off..(off + step).min(remote.size);
            let ahead = ra.advance(range.clone(), bs, max);
            let span = r.span(range.clone());
            if ahead > 0 {
                let end = range.end.saturating_add(ahead).min(remote.size);
                r.prefetch(remote, span.end..r.span(range.start..end).end);
            }
            for index in BlockIndex::each(span) {
                let b = r.block(remote, index).await.unwrap();
                let start = index.0 * bs;
                let from = (range.start.max(start) - start) as usize;
                let to = ((range.end - start) as usize).min(b.len());
                out.extend_from_slice(&b[from..to]);
            }
            off = range.end;
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_reads_fetch_each_block_once_in_runs() {
        use object_store::{ObjectStoreExt, PutPayload};
        let store: Store = Arc::new(object_store::memory::InMemory::new());
        let data: Vec<u8> = (0..(40u32 << 20) + 12345).map(|i| (i % 251) as u8).collect();
        let put = store.put(&"f.bin".into(), PutPayload::from(data.clone())).await.unwrap();
        let remote =
            Remote { key: "f.bin".into(), etag: put.e_tag, version: None, size: data.len() as u64, modified: None };
        let r = BlockReader::new(store, None, BlockConfig::default());
        assert!(read_sequentially(&r, &remote, 256 << 10).await == data);
        let blocks = r.span(0..remote.size).end.0;
        assert_eq!(r.fetched.load(Ordering::Relaxed), blocks, "a block fetched twice, or not at all");
        let gets = r.gets.load(Ordering::Relaxed);
        // Runs of up to 8 blocks once the window is open: far fewer GETs than blocks.
        assert!(gets <= blocks / 4, "{gets} GETs for {blocks} blocks");
    }

    #[test]
    fn span_covers_the_blocks_of_a_range() {
        let r = BlockReader::new(
            Arc::new(object_store::memory::InMemory::new()),
            None,
            BlockConfig { block_size: 10, ..Default::default() },
        );
        let span = |a: u64, b: u64| r.span(a..b).start.0..r.span(a..b).end.0;
        assert_eq!(span(0, 10), 0..1);
        assert_eq!(span(5, 25), 0..3);
        assert_eq!(span(10, 11), 1..2);
        assert_eq!(span(3, 3), 0..0);
    }
}
