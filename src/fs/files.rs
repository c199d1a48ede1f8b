//! Open files and folders: the handle table, and open, read, write, close and release over
//! the staging files (local contents) and the block reader (the bucket's copy). It owns the
//! handles, the lock that lets one download into staging run at a time, and the flag of an
//! out-of-space episode. It marks inodes changed and makes a close durable through the
//! core; it never talks to the bucket except to fill staging or read blocks, and never
//! decides how an upload is made.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use object_store::GetOptions;

use super::blocks::{Readahead, version_of};
use super::core::Core;
use super::error::{FsError, FsResult};
use super::events::{Event, Kind as EventKind};
use super::lock;
use super::object::{obj_path, stale};
use super::sparse;
use super::staging::BlockWriter;
use super::types::{BlockIndex, ContentId, DirEntry, DirPage, Fh, Ino, Kind, Policy, now_ns};
use super::upload::MERGE_MAX;
use crate::cache::SealedFile;
use crate::state::Batch;

#[derive(Debug)]
struct Handle {
    ino: Ino,
    /// Written since the last flush (the next close or fsync makes it durable).
    wrote: bool,
    /// Bytes written since the last close reported them (a `written` event).
    unreported: u64,
    /// Read-ahead of reads of the bucket's copy.
    readahead: Readahead,
    /// Directory snapshot taken at opendir.
    dir: Option<Arc<[DirEntry]>>,
}

impl Handle {
    fn new(ino: Ino, dir: Option<Arc<[DirEntry]>>) -> Handle {
        Handle { ino, wrote: false, unreported: 0, readahead: Readahead::default(), dir }
    }
}

pub struct Files {
    core: Arc<Core>,
    handles: Mutex<HashMap<Fh, Handle>>,
    next_fh: AtomicU64,
    /// Downloads into staging, one file at a time.
    fill_lock: tokio::sync::Mutex<()>,
    /// Writes are being refused for lack of space (logged once per episode).
    out_of_space: AtomicBool,
}

impl Files {
    pub fn new(core: Arc<Core>) -> Files {
        Files {
            core,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            fill_lock: tokio::sync::Mutex::new(()),
            out_of_space: AtomicBool::new(false),
        }
    }

    fn next_fh(&self) -> Fh {
        Fh(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    /// A handle of a file just created (counted open).
    pub fn new_handle(&self, ino: Ino) -> Fh {
        let fh = self.next_fh();
        lock(&self.handles).insert(fh, Handle::new(ino, None));
        if let Ok(n) = self.core.tree().get_mut(ino) {
            n.open += 1;
        }
        fh
    }

    /// Opens a file. Returns the handle and whether the kernel may keep its page cache.
    pub async fn open(&self, ino: Ino) -> FsResult<(Fh, bool)> {
        let core = &*self.core;
        let kind = core.tree().get(ino)?.kind;
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        core.revalidate(ino).await;
        if !core.tree().get(ino)?.attrs_known {
            core.fetch_attrs(vec![ino]).await;
        }
        // The kernel keeps the file's cached pages (FOPEN_KEEP_CACHE) when its content is
        // what it was at the last open here; otherwise it drops them. Decided and counted
        // open under one lock, so no new version can slip in between. Without an ETag or
        // version the content cannot be told apart: never kept.
        let fh = self.next_fh();
        let keep = {
            let mut tree = core.tree();
            let n = tree.get_mut(ino)?;
            n.open += 1;
            let version = n.remote.as_ref().and_then(|r| version_of(r).map(String::from));
            let known = version.is_some() || n.staged;
            let id: ContentId = (version, n.size, n.generation, n.staged);
            n.opened_as.replace(id.clone()) == Some(id) && known
        };
        lock(&self.handles).insert(fh, Handle::new(ino, None));
        Ok((fh, keep))
    }

    /// A folder handle over a snapshot of its entries.
    pub fn open_dir(&self, ino: Ino) -> FsResult<Fh> {
        let entries = {
            let mut tree = self.core.tree();
            let n = tree.get(ino)?;
            let parent = n.parent.max(Ino::ROOT);
            let mut entries = vec![
                DirEntry { ino, name: ".".into(), kind: Kind::Dir, attr: n.attr() },
                DirEntry {
                    ino: parent,
                    name: "..".into(),
                    kind: Kind::Dir,
                    attr: tree.get(parent).map(|p| p.attr()).unwrap_or(n.attr()),
                },
            ];
            for (name, ci) in tree.children(ino) {
                // A hard link answers its file's inode.
                if let Ok(attr) = tree.attr(ci) {
                    entries.push(DirEntry { ino: attr.ino, name: name.clone(), kind: attr.kind, attr });
                }
            }
            tree.get_mut(ino)?.dir_open += 1;
            entries
        };
        let fh = self.next_fh();
        lock(&self.handles).insert(fh, Handle::new(ino, Some(entries.into())));
        Ok(fh)
    }

    /// Entries from `offset` on; the offset of entry i is i + 1. A view of the snapshot,
    /// not a copy: the kernel pages through a folder a few dozen entries at a time, and a
    /// copy of the rest at each page made a big folder's listing quadratic.
    pub fn readdir(&self, fh: Fh, offset: u64) -> FsResult<DirPage> {
        let hs = lock(&self.handles);
        let h = hs.get(&fh).ok_or(FsError::BadHandle)?;
        let d = h.dir.as_ref().ok_or(FsError::NotDir)?;
        Ok(DirPage::new(Arc::clone(d), offset))
    }

    pub fn release_dir(&self, fh: Fh) {
        let Some(h) = lock(&self.handles).remove(&fh) else { return };
        if let Ok(n) = self.core.tree().get_mut(h.ino) {
            n.dir_open = n.dir_open.saturating_sub(1);
        }
    }

    fn handle_ino(&self, fh: Fh) -> FsResult<Ino> {
        lock(&self.handles).get(&fh).map(|h| h.ino).ok_or(FsError::BadHandle)
    }

    pub async fn read(&self, fh: Fh, offset: u64, size: u32) -> FsResult<Bytes> {
        let core = &*self.core;
        let ino = self.handle_ino(fh)?;
        let (staged, file_size, remote, kind) = {
            let tree = core.tree();
            let n = tree.get(ino)?;
            (n.staged, n.size, n.remote.clone(), n.kind)
        };
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if offset >= file_size {
            return Ok(Bytes::new());
        }
        let len = (size as u64).min(file_size - offset) as usize;
        if staged {
            match read_staged(&*core.staging.file(ino)?, offset, len) {
                Ok((b, base)) if base.is_empty() => return Ok(b.into()),
                Ok((mut b, base)) => {
                    self.fill_from_base(ino, remote, &mut b, offset, &base).await?;
                    return Ok(b.into());
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => self.drop_damaged_staging(ino, e)?,
                Err(e) => return Err(e.into()),
            }
        }
        let Some(mut remote) = remote else { return Ok(Bytes::from(vec![0u8; len])) };
        let range = offset..offset + len as u64;
        let blocks = &core.blocks;
        blocks.reads.fetch_add(1, Ordering::Relaxed);
        let (ahead, random) = {
            let mut handles = lock(&self.handles);
            let h = handles.get_mut(&fh).ok_or(FsError::BadHandle)?;
            let ahead = h.readahead.advance(range.clone(), blocks.cfg.block_size, blocks.cfg.readahead_max);
            (ahead, h.readahead.random())
        };
        let span = blocks.span(range.clone());
        if ahead > 0 {
            let ahead_end = range.end.saturating_add(ahead).min(remote.size);
            blocks.prefetch(&remote, span.end..blocks.span(range.start..ahead_end).end);
        }
        // A read within one block is answered with a slice of it, without a copy.
        let single = span.end.0 - span.start.0 == 1;
        let mut out = Vec::with_capacity(if single { 0 } else { len });
        for index in BlockIndex::each(span) {
            let block_start = index.0 * blocks.cfg.block_size;
            let within = range.start.max(block_start) - block_start..range.end - block_start;
            let b = match core.bounded(blocks.part(&remote, index, within.clone(), random)).await {
                // The uploader moved the object meanwhile: read it where it is now.
                Err(e) if e.is_gone() => {
                    let now = core.tree().get(ino)?.remote.clone();
                    match now {
                        Some(now) if now != remote => {
                            let b = core.bounded(blocks.part(&now, index, within, random)).await?;
                            remote = now;
                            b
                        }
                        _ => return Err(e),
                    }
                }
                other => other?,
            };
            if b.is_empty() {
                break;
            }
            if single {
                return Ok(b);
            }
            out.extend_from_slice(&b);
        }
        Ok(out.into())
    }

    pub async fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> FsResult<u32> {
        let core = &*self.core;
        let ino = self.handle_ino(fh)?;
        // Refuse before downloading anything into staging.
        core.check_writable()?;
        let grow = {
            let tree = core.tree();
            let n = tree.get(ino)?;
            let fill = match &n.remote {
                Some(r) if !n.staged && !self.over_base(r, n.size) => r.size,
                _ => 0,
            };
            (offset + data.len() as u64).saturating_sub(n.size) + fill
        };
        self.make_room(grow)?;
        let file = self.stage_for_write(ino).await?;
        // The generation moves before and after the write, and `writing` counts it while
        // its bytes go in, so an upload snapshot that overlaps it is always seen as stale.
        {
            let mut tree = core.tree();
            let n = tree.get_mut(ino)?;
            n.generation += 1;
            n.writing += 1;
        }
        let written = self.write_over_base(ino, &file, data, offset).await;
        {
            let mut l = core.lock();
            let n = l.get_mut(ino)?;
            n.writing = n.writing.saturating_sub(1);
            written?;
            n.size = n.size.max(offset + data.len() as u64);
            n.mtime_ns = now_ns();
            n.ctime_ns = n.mtime_ns;
            n.dirty = true;
            n.generation += 1;
            // Push a queued upload back while the file keeps changing.
            l.queue.postpone(ino, core.cfg.open_upload_delay);
        }
        if let Some(h) = lock(&self.handles).get_mut(&fh) {
            h.wrote = true;
            h.unreported += data.len() as u64;
        }
        Ok(data.len() as u32)
    }

    /// close() (`closing`) and fsync(): the change is durable on local disk when this
    /// returns. A close reports what the handle wrote (a `written` event).
    pub async fn flush(&self, fh: Fh, closing: bool) -> FsResult<()> {
        let core = &*self.core;
        let (ino, wrote, unreported) = {
            let mut hs = lock(&self.handles);
            let h = hs.get_mut(&fh).ok_or(FsError::BadHandle)?;
            let unreported = if closing { std::mem::take(&mut h.unreported) } else { 0 };
            (h.ino, std::mem::take(&mut h.wrote), unreported)
        };
        let (staged, dirty) = {
            let tree = core.tree();
            match tree.get(ino) {
                Ok(n) => (n.staged, n.dirty),
                Err(_) => return Ok(()),
            }
        };
        // A close makes durable what its handle wrote (a close of a descriptor that wrote
        // nothing, such as the one a shell's `>` duplicates, has nothing to sync); an fsync,
        // whatever the file holds that is not yet.
        if !wrote && (closing || !dirty) {
            self.report_written(ino, unreported);
            return Ok(());
        }
        if staged {
            core.staging.file(ino)?.sync_data()?;
            // A staging file created since the last sync needs its directory entry too.
            core.staging.sync_dir()?;
        }
        fail::fail_point!("fsync-after-staging", |_| Err(FsError::Halted("fsync-after-staging")));
        {
            let mut l = core.lock();
            let mut batch = Batch::default();
            if let Ok(n) = l.get(ino)
                && n.parent != Ino::NONE
            {
                // The last close of a file starts its upload soon; an fsync, or a close
                // while other handles hold the file, waits as a write does.
                let last_close = closing && n.open <= 1;
                let delay = if last_close { core.cfg.upload_delay } else { core.cfg.open_upload_delay };
                l.touch(ino, delay, &mut batch)?;
            }
            l.commit(batch, true)?;
        }
        self.report_written(ino, unreported);
        fail::fail_point!("fsync-after-commit", |_| Err(FsError::Halted("fsync-after-commit")));
        Ok(())
    }

    fn report_written(&self, ino: Ino, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let l = self.core.lock();
        let Ok(n) = l.get(ino) else { return };
        let mut e = Event::new(EventKind::Written).bytes(bytes).size(n.size);
        if let Some(p) = l.path_of(ino).filter(|_| n.parent != Ino::NONE) {
            e = e.path(p);
        }
        l.emit(e);
    }

    pub async fn release(&self, fh: Fh) -> FsResult<()> {
        let h = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if h.dir.is_some() {
            return Ok(());
        }
        // Written and never closed through flush: reported now, once.
        self.report_written(h.ino, h.unreported);
        let core = &*self.core;
        let mut tree = core.tree();
        let (orphan, last) = match tree.get_mut(h.ino) {
            Ok(n) => {
                n.open = n.open.saturating_sub(1);
                (n.open == 0 && n.parent == Ino::NONE, n.open == 0 && n.dirty)
            }
            Err(_) => (false, false),
        };
        if orphan {
            tree.remove(h.ino);
            core.staging.remove(h.ino);
        }
        // The last handle gone (one that wrote was closed while another held the file): its
        // upload waits the upload delay, no longer the open-file delay.
        if last && core.queue().hasten(h.ino, core.cfg.upload_delay) {
            core.journal.wake.notify_one();
        }
        Ok(())
    }

    /// The staged copy of `ino` failed its integrity check (`err`). A copy of what the
    /// bucket already holds is dropped, and the bucket's version is read instead (as for
    /// cache blocks); one with changes not yet uploaded answers EIO, said in the log, in
    /// `status` and in the events (its changes cannot be read back).
    fn drop_damaged_staging(&self, ino: Ino, err: std::io::Error) -> FsResult<()> {
        let core = &*self.core;
        let mut l = core.lock();
        let path = l.key_of(ino).unwrap_or_else(|_| format!("inode {ino}"));
        let uploading = l.queue.is_uploading(ino);
        let n = l.get_mut(ino)?;
        let clean = !n.dirty && n.remote.as_ref().is_some_and(|r| r.size == n.size);
        if !clean || uploading {
            let msg = format!(
                "{path}: the staged copy, with changes not yet uploaded, failed its integrity check ({err}): reads of it answer EIO"
            );
            tracing::error!("{msg}");
            l.emit(Event::new(EventKind::CacheIntegrity).path(core.rel_path(&path)).message(msg.clone()));
            drop(l);
            core.note_error(msg);
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        n.staged = false;
        let mut batch = Batch::default();
        l.tree.persist(ino, &mut batch)?;
        l.commit(batch, false)?;
        core.staging.remove(ino);
        let msg = format!("the staged copy failed its integrity check ({err}); the bucket's version is read instead");
        tracing::warn!(path = %path, "{msg}");
        l.emit(Event::new(EventKind::CacheIntegrity).path(core.rel_path(&path)).message(msg));
        Ok(())
    }

    /// Fills the `base` ranges of `buf` (a staged file's bytes from `offset`) from the
    /// bucket's version the file is staged over, `remote` (or where the uploader moved it).
    async fn fill_from_base(
        &self,
        ino: Ino,
        remote: Option<super::types::Remote>,
        buf: &mut [u8],
        offset: u64,
        base: &[std::ops::Range<u64>],
    ) -> FsResult<()> {
        let core = &*self.core;
        let Some(mut remote) = remote else {
            return Err(FsError::Io(std::io::Error::other("a staged file takes bytes from a base it does not name")));
        };
        let deadline = tokio::time::Instant::now() + core.cfg.io_timeout;
        loop {
            let e = match core.bounded(sparse::fill_ranges(&core.blocks, &remote, buf, offset, base)).await {
                Err(e) if e.is_gone() => e,
                other => return other,
            };
            // The version read is gone: our own upload of this file may have just replaced
            // it (with the same bytes there), or moved it. Follow the inode to the version
            // it records, waiting for an upload of it under way to be recorded.
            loop {
                let notified = core.upload_done.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let now = core.tree().get(ino)?.remote.clone();
                match now {
                    Some(now) if now != remote => {
                        remote = now;
                        break;
                    }
                    _ if !core.queue().is_uploading(ino) => return Err(e),
                    _ => {}
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(e);
                }
            }
        }
    }

    /// Whether the first write to a file whose bucket version is `remote` stages it over
    /// that version, instead of downloading it.
    fn over_base(&self, remote: &super::types::Remote, size: u64) -> bool {
        sparse::stages_over_base(remote, size, self.core.cfg.multipart_threshold)
    }

    /// The staging file to write `ino` into: a big file already in the bucket is staged over
    /// its version there (nothing downloaded: writes bring in the blocks they change in
    /// part), a smaller one is downloaded whole.
    pub async fn stage_for_write(&self, ino: Ino) -> FsResult<Arc<SealedFile>> {
        {
            let mut tree = self.core.tree();
            let n = tree.get_mut(ino)?;
            if n.staged {
                return Ok(self.core.staging.file(ino)?);
            }
            if n.remote.as_ref().is_some_and(|r| self.over_base(r, n.size)) {
                let f = self.core.staging.create_sparse(ino, n.size)?;
                n.staged = true;
                return Ok(f);
            }
        }
        self.ensure_staged(ino).await
    }

    /// Writes `data` at `offset` into `file`, the staging file of `ino`: a block it changes
    /// only in part and that is still the base's gets the base's bytes first.
    async fn write_over_base(&self, ino: Ino, file: &Arc<SealedFile>, data: &[u8], offset: u64) -> FsResult<()> {
        loop {
            match file.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let Some(index) = crate::cache::needed_block(&e) else { return Err(e.into()) };
                    let remote = self.core.tree().get(ino)?.remote.clone();
                    let Some(remote) = remote else { return Err(e.into()) };
                    let indexes = [index];
                    self.core.bounded(sparse::fill_blocks(&self.core.blocks, file, &remote, &indexes)).await?;
                }
            }
        }
    }

    /// Replaces the staging file with an empty one (truncate to zero needs no download).
    pub fn restage_empty(&self, ino: Ino) -> FsResult<Arc<SealedFile>> {
        let mut tree = self.core.tree();
        let n = tree.get_mut(ino)?;
        if n.staged {
            return Ok(self.core.staging.file(ino)?);
        }
        let f = self.core.staging.create_empty(ino)?;
        n.staged = true;
        Ok(f)
    }

    /// Makes sure all of the file's content is in staging: the remote copy downloaded once,
    /// or, for a file staged over its base, the base's bytes brought in.
    pub async fn ensure_staged(&self, ino: Ino) -> FsResult<Arc<SealedFile>> {
        let core = &*self.core;
        let (staged, remote) = {
            let tree = core.tree();
            let n = tree.get(ino)?;
            (n.staged, n.remote.clone())
        };
        if staged {
            let f = core.staging.file(ino)?;
            if f.base_len() > 0 {
                let Some(remote) = remote else {
                    return Err(FsError::Io(std::io::Error::other(
                        "a staged file takes bytes from a base it does not name",
                    )));
                };
                sparse::fill_all(&core.blocks, &f, &remote).await?;
            }
            return Ok(f);
        }
        let _fill = self.fill_lock.lock().await;
        let remote = {
            let tree = core.tree();
            let n = tree.get(ino)?;
            if n.staged {
                return Ok(core.staging.file(ino)?);
            }
            n.remote.clone()
        };
        let (tmp, file) = core.staging.temp(&format!("fill-{ino}"))?;
        if let Some(r) = &remote
            && r.size > 0
        {
            let opts = GetOptions { if_match: r.etag.clone(), ..Default::default() };
            let path = obj_path(&r.key)?;
            // The answer is bounded by --io-timeout; the body of a big file may take longer.
            let res = core.bounded(async { core.store.get_opts(&path, opts).await.map_err(stale) }).await?;
            let mut out = BlockWriter::new(&file);
            let mut stream = res.into_stream();
            // A file the merge policy covers keeps the version its edits start from in the
            // block cache: the base of a merge, should the bucket's version move meanwhile.
            let merges = r.size <= MERGE_MAX && core.cfg.conflict.for_path(&core.rel_path(&r.key)).0 == Policy::Merge;
            let mut base = bytes::BytesMut::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(stale)?;
                if merges {
                    base.extend_from_slice(&chunk);
                }
                out.write(&chunk)?;
            }
            out.finish()?;
            if merges {
                core.blocks.keep_whole(r, base.freeze()).await;
            }
        }
        let mut tree = core.tree();
        let n = tree.get_mut(ino)?;
        let f = core.staging.install(ino, &tmp, file)?;
        n.staged = true;
        Ok(f)
    }

    /// Room for `grow` more staged bytes, within `--staging-size` and with the cache dir's
    /// disk keeping a reserve (for the journal, and for rewrites, which go to a block's
    /// other slot). Short of it, copies of files already in the bucket leave staging; if
    /// that is not enough, ENOSPC, and nothing staged is touched.
    pub fn make_room(&self, grow: u64) -> FsResult<()> {
        let core = &*self.core;
        let short = |recount: bool| -> Option<String> {
            if let Some(limit) = core.cfg.staging_limit {
                let used = core.staging.used(recount);
                if used.saturating_add(grow) > limit {
                    return Some(format!("staging holds {used} bytes of its --staging-size {limit}"));
                }
            }
            let (free, total) = core.staging.disk_space()?;
            let reserve = (total / 16).min(64 << 20);
            (free < grow.saturating_add(reserve))
                .then(|| format!("the cache dir's disk has {free} bytes free and keeps {reserve} in reserve"))
        };
        if short(false).is_some() {
            let freed = core.drop_clean_copies();
            if let Some(why) = short(true) {
                if !self.out_of_space.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "writes get ENOSPC: {why}; they resume once uploads finish (their local copies can then go) or files are removed"
                    );
                    core.events.emit(Event::new(EventKind::OutOfSpace).message(why.clone()));
                }
                return Err(FsError::NoSpace(why));
            }
            tracing::info!(freed, "made room in staging: local copies of files already in the bucket left it");
        }
        if self.out_of_space.swap(false, Ordering::SeqCst) {
            tracing::info!("there is room for staged changes again");
        }
        core.staging.grow(grow);
        Ok(())
    }
}

/// Up to `len` bytes of a staged file from `offset`, and the ranges of them that are its
/// base's (zeros in the buffer, for the caller to fill).
fn read_staged(f: &SealedFile, offset: u64, len: usize) -> std::io::Result<(Vec<u8>, Vec<std::ops::Range<u64>>)> {
    let mut buf = vec![0u8; len];
    let (n, base) = f.read_sparse(&mut buf, offset)?;
    buf.truncate(n);
    Ok((buf, base))
}
