//! The uploader: takes changes from the journal (up to `--transfers` at once; changes
//! that touch one key, or keys above or below each other, keep their order: see
//! [`Footprint`](super::journal::Footprint)) and turns each into store calls: a folder's
//! marker, a snapshot of a file put conditionally (`put.rs`), a server-side move, a
//! checked delete. A change whose base is no longer what the bucket holds goes to the
//! conflicts part (`super::conflict`). Errors keep the change in its place in line,
//! retried with capped backoff; it holds up only the changes that overlap it.
//!
//! It owns the flush requests and the signal of a finished attempt. It never changes what a
//! local file contains (but for a merge, which the conflicts part installs), and it applies
//! what the bucket answered through the core's locks.

mod parts;
mod put;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use object_store::{ObjectStoreExt, PutOptions, PutPayload};
use tokio::sync::{Notify, watch};

use super::core::{Core, Locked};
use super::error::{FsError, FsResult};
use super::events::{Event, Kind as EventKind};
use super::journal::Footprint;
use super::object::{etag_same, folder_remote, obj_path};
use super::tree::Tree;
use super::types::{Ino, Inode, Kind, Op, ROOT_INO, Remote, Seq};
use crate::layout;
use crate::state::Batch;

pub use super::conflict::MERGE_MAX;
pub(crate) use put::{Content, PutError};

pub struct Uploader {
    pub(super) core: Arc<Core>,
    /// Wakes the uploader out of an error backoff when a flush is requested.
    flush_kick: Notify,
    /// Flush requests: while non-zero the uploader ignores `upload_delay`.
    urgent: AtomicU64,
    /// Multipart parts held in memory, in MiB, shared by every upload under way.
    part_budget: Arc<tokio::sync::Semaphore>,
}

impl Uploader {
    pub fn new(core: Arc<Core>) -> Uploader {
        let part_budget = Arc::new(tokio::sync::Semaphore::new((parts::part_budget(&core.cfg) >> 20) as usize));
        Uploader { core, flush_kick: Notify::new(), urgent: AtomicU64::new(0), part_budget }
    }

    /// Runs until `stop` resolves, then lets the uploads under way end and returns
    /// (whatever is left stays in the journal). Up to `transfers` changes run at once: what
    /// [`Queue::startable`](super::journal::Queue::startable) allows.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let core = &*self.core;
        let transfers = core.cfg.transfers.max(1);
        let mut running = FuturesUnordered::new();
        loop {
            if *stop.borrow() {
                break;
            }
            let urgent = self.urgent.load(Ordering::SeqCst) > 0;
            let next_ready = {
                let mut l = core.lock();
                let Locked { tree, queue, .. } = &mut l;
                let found = queue.startable(transfers - running.len(), Instant::now(), urgent, |op| {
                    Footprint::of(op, |ino| sync_keys(tree, ino))
                });
                for (seq, op, footprint) in found.start {
                    queue.start(seq, footprint);
                    running.push(self.attempt(seq, op));
                }
                found.next_ready
            };
            let ready = async {
                match next_ready {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(halted) = running.next(), if !running.is_empty() => {
                    if halted {
                        return;
                    }
                },
                _ = core.journal.wake.notified() => {},
                _ = ready => {},
                _ = self.flush_kick.notified() => {},
                _ = stop.changed() => {},
            }
        }
        while let Some(halted) = running.next().await {
            if halted {
                return;
            }
        }
    }

    /// One attempt at `seq`; true when a failpoint halted the uploader.
    async fn attempt(&self, seq: Seq, op: Op) -> bool {
        let core = &*self.core;
        let result = self.process(seq, &op).await;
        let halted = matches!(result, Err(FsError::Halted(_)));
        match result {
            Err(FsError::Halted(at)) => tracing::warn!(at, "uploader stopped at a failpoint"),
            Ok(()) => {
                let none_failing = {
                    let mut q = core.queue();
                    q.ended(seq);
                    q.failing().next().is_none()
                };
                if none_failing {
                    core.counters().last_error = None;
                }
            }
            Err(e) => {
                let what = self.describe(&op);
                let msg = format!("{what}: {e}");
                let tries = core.queue().attempt_failed(seq, &op, msg.clone());
                self.core.upload_done.notify_waiters();
                tracing::error!(path = %what, tries, "upload failed, will retry: {e}");
                core.counters().last_error = Some(msg);
                core.events.emit(Event::new(EventKind::UploadFailed).path(core.rel_path(&what)).message(e.to_string()));
            }
        }
        halted
    }

    /// Waits until every local change is in the bucket, or the timeout passes. Returns the
    /// number of changes still pending.
    pub async fn flush_all(&self, timeout: Duration) -> usize {
        self.urgent.fetch_add(1, Ordering::SeqCst);
        self.core.queue().retry_now();
        self.core.journal.wake.notify_one();
        self.flush_kick.notify_one();
        let mut rx = self.core.journal.pending();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|&n| n == 0)).await;
        self.urgent.fetch_sub(1, Ordering::SeqCst);
        self.core.queue().len()
    }

    /// Waits (bounded) until the uploader is not in the middle of uploading `ino`.
    pub async fn wait_not_uploading(&self, ino: Ino) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.core.upload_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.core.queue().is_uploading(ino) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// What the uploader is about: a key, or an inode not in the tree any more.
    fn describe(&self, op: &Op) -> String {
        match op {
            Op::Sync { ino } => self.core.tree().key_of(*ino).unwrap_or_else(|_| format!("inode {ino}")),
            Op::Delete { remote } => remote.key.clone(),
            Op::FolderMoved { from } => from.clone(),
        }
    }

    /// Removes a finished op from the journal, durably, with what its end changed (`batch`),
    /// under the same locks `batch` was made under: a batch committed after its locks were
    /// let go could write an inode's record over a newer one (a rename made meanwhile).
    pub(super) fn finish(&self, mut l: Locked<'_>, seq: Seq, mut batch: Batch) -> FsResult<()> {
        // Counted (and the last error cleared, when nothing else is failing) before the op
        // leaves the queue, so a flush waiter sees both.
        {
            let mut c = self.core.counters();
            c.uploads_done += 1;
            if l.queue.failing().all(|(s, _)| s == seq) {
                c.last_error = None;
            }
        }
        l.queue.complete(seq, &mut batch);
        self.core.upload_done.notify_waiters();
        l.commit(batch, true)
    }

    /// An `uploaded` event: `op` reached the bucket at `key`.
    pub(super) fn uploaded(&self, op: &str, key: &str, size: Option<u64>, version: Option<String>) {
        // A folder marker stands for its folder.
        let key = key.strip_suffix(layout::FOLDER_MARKER).map_or(key, |k| k.trim_end_matches('/'));
        let mut e = Event::new(EventKind::Uploaded).op(op).path(self.core.rel_path(key)).version(version);
        if let Some(s) = size {
            e = e.size(s);
        }
        self.core.events.emit(e);
    }

    async fn process(&self, seq: Seq, op: &Op) -> FsResult<()> {
        tracing::debug!(%seq, ?op, "uploading");
        match op {
            Op::Sync { ino } => self.sync_inode(seq, *ino).await,
            Op::FolderMoved { from } => {
                let below = format!("{from}/");
                let mut batch = Batch::default();
                {
                    let mut l = self.core.lock();
                    // Moves of the folder's contents may have queued deletes of old keys
                    // behind us: stay hidden (and last) until they are done.
                    let busy = l.queue.iter().any(|(s, q)| {
                        s != seq
                            && match &q.op {
                                Op::Delete { remote } => remote.key.starts_with(&below),
                                Op::Sync { ino } => l.get(*ino).is_ok_and(|n| {
                                    [&n.remote, &n.overwrites].into_iter().flatten().any(|r| r.key.starts_with(&below))
                                }),
                                Op::FolderMoved { .. } => false,
                            }
                    });
                    if busy {
                        l.push_op(Op::FolderMoved { from: from.clone() }, Duration::ZERO, &mut batch)?;
                        return self.finish(l, seq, batch);
                    }
                }
                let marker = folder_remote(layout::marker_key(from));
                self.delete_checked(&marker).await?;
                self.finish(self.core.lock(), seq, Batch::default())?;
                self.uploaded("delete", &marker.key, None, None);
                Ok(())
            }
            Op::Delete { remote } => {
                let gone = self.delete_checked(remote).await?;
                let mut l = self.core.lock();
                let mut batch = Batch::default();
                // A file made under that name since, queued to replace the object just
                // deleted, now creates the key: the object is gone by our own hand, not
                // another client's (left, its put would be taken for a conflict).
                if gone && let Some(ino) = l.ino_at_key(&remote.key) {
                    let n = l.get_mut(ino)?;
                    if n.overwrites.as_ref().is_some_and(|o| o.key == remote.key && o.etag == remote.etag) {
                        n.overwrites = None;
                        l.persist(ino, &mut batch)?;
                    }
                }
                self.finish(l, seq, batch)?;
                self.uploaded("delete", &remote.key, None, None);
                Ok(())
            }
        }
    }

    /// Deletes an object unless it changed since we saw it (then the other edit survives).
    /// True when the key no longer holds that object.
    pub(super) async fn delete_checked(&self, remote: &Remote) -> FsResult<bool> {
        let core = &*self.core;
        if let Some(dir) = remote.key.strip_suffix(layout::FOLDER_MARKER) {
            // A folder that lives at that key again (made after the delete was queued)
            // owns the marker now.
            let tree = core.tree();
            let now = tree.ino_at_key(dir.trim_end_matches('/'));
            if now.and_then(|i| tree.get(i).ok()).is_some_and(|n| n.kind == Kind::Dir) {
                return Ok(false);
            }
        }
        let path = obj_path(&remote.key)?;
        match core.store.head(&path).await {
            Err(object_store::Error::NotFound { .. }) => return Ok(true),
            Err(e) => return Err(e.into()),
            Ok(m) => {
                if remote.etag.is_some() && !etag_same(remote.etag.as_deref(), m.e_tag.as_deref()) {
                    tracing::warn!(key = %remote.key, "not deleting: the object changed in the bucket since it was read; the other edit survives");
                    return Ok(false);
                }
            }
        }
        match core.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    async fn sync_inode(&self, seq: Seq, ino: Ino) -> FsResult<()> {
        let core = &*self.core;
        // Plan under the lock: where the inode lives now, what it is based on, a snapshot.
        let plan = {
            let mut l = core.lock();
            let Some(n) = l.get(ino).ok().cloned() else {
                return self.finish(l, seq, Batch::default());
            };
            if n.parent == Ino::NONE || ino == ROOT_INO {
                return self.finish(l, seq, Batch::default());
            }
            // A rename since the uploader started this op may have given it keys another
            // upload is writing: then it waits for that one.
            {
                let Locked { tree, queue, .. } = &mut l;
                let now = Footprint::of(&Op::Sync { ino }, |i| sync_keys(tree, i));
                if !queue.refit(seq, now, |op| Footprint::of(op, |i| sync_keys(tree, i))) {
                    return Ok(());
                }
            }
            // Changes from here on queue a fresh op; this one covers the state snapshotted now.
            l.queue.take_sync(seq, ino);
            let key = l.key_of(ino)?;
            // Already in the bucket as it is (an earlier op of the same inode took in the
            // changes this one was queued for): nothing to write again.
            let in_sync = n.kind != Kind::Dir
                && !n.dirty
                && n.overwrites.is_none()
                && n.remote.as_ref().is_some_and(|r| r.key == key);
            if in_sync {
                return self.finish(l, seq, Batch::default());
            }
            if let Some(file) = n.link_of {
                // The object at this name still belongs to another of our files, moving
                // away: go after it, and take that object over when it is retired.
                let owner = l.owner_of_key(&key).filter(|&o| o != ino);
                if owner.is_some_and(|o| l.key_of(o).is_ok_and(|k| k != key)) {
                    let mut batch = Batch::default();
                    l.requeue(ino, Duration::ZERO, &mut batch)?;
                    return self.finish(l, seq, batch);
                }
                // Another name of a file (a hard link): a copy of the file's object, once
                // that holds the file as it is (its upload queues this name again).
                let Some(src) = l.get(file).ok().filter(|f| !f.dirty).and_then(|f| f.remote.clone()) else {
                    return self.finish(l, seq, Batch::default());
                };
                l.queue.set_uploading(seq, ino);
                (n, key, None, Some(src))
            } else {
                l.queue.set_uploading(seq, ino);
                let content = match n.kind {
                    Kind::Symlink => {
                        let data = Bytes::from(n.target.clone().unwrap_or_default().into_bytes());
                        let hash = blake3::hash(&data).to_hex().to_string();
                        Some(Content::bytes(data, hash))
                    }
                    // A special file is an empty object; its mode says what it is.
                    k if k.is_special() => Some(Content::bytes(Bytes::new(), blake3::hash(b"").to_hex().to_string())),
                    _ => None,
                };
                (n, key, content, None)
            }
        };
        let (mut node, key, mut content, alias_of) = plan;
        if let Some(src) = alias_of {
            return self.copy_alias(seq, node, key, src).await;
        }
        if node.kind == Kind::File && node.staged {
            match self.snapshot(seq, ino, node.remote.clone()).await? {
                Some((c, generation)) => {
                    content = Some(c);
                    // The attributes go up with the content: take them as of the same state
                    // (a chmod between the plan and the copy bumped the generation too),
                    // unless a rename since moved it away from the key planned for.
                    match core.tree().get(ino) {
                        Ok(now)
                            if now.generation == generation && now.parent == node.parent && now.name == node.name =>
                        {
                            node = now.clone();
                        }
                        _ => node.generation = generation,
                    }
                }
                None => {
                    // Deleted while we copied it.
                    return self.finish(self.core.lock(), seq, Batch::default());
                }
            }
        }
        let attrs = node.posix_attrs();

        if node.kind == Kind::Dir {
            return self.sync_dir(seq, node, &key).await;
        }

        // The object at our key still belongs to a file that is moving away and has not
        // been uploaded yet: go after it, and take that object over when it is retired.
        {
            let mut l = core.lock();
            let owner = l.owner_of_key(&key).filter(|&o| o != ino);
            let moving = owner.filter(|o| l.queue.has_sync(*o) && l.key_of(*o).is_ok_and(|k| k != key));
            if moving.is_some() {
                let mut batch = Batch::default();
                l.requeue(ino, Duration::ZERO, &mut batch)?;
                // `requeue` bumped the generation; the file itself did not change.
                if let Ok(n) = l.get_mut(ino) {
                    n.generation = node.generation;
                }
                return self.finish(l, seq, batch);
            }
        }
        let moved_from = node.remote.as_ref().filter(|r| r.key != key).cloned();
        let base = match &node.remote {
            Some(r) if r.key == key => Some(r.clone()),
            _ => node.overwrites.clone().filter(|r| r.key == key),
        };
        // Nothing staged: either a pure move, or an attribute change that needs the content.
        let content = match content {
            Some(c) => c,
            None => {
                let Some(src) = node.remote.clone() else {
                    // A file that never had content anywhere: upload it empty.
                    let data = Bytes::new();
                    let hash = blake3::hash(&data).to_hex().to_string();
                    return self
                        .put_and_record(seq, &node, &key, base, moved_from, Content::bytes(data, hash), attrs)
                        .await;
                };
                if !node.dirty && moved_from.is_some() && base.is_none() {
                    return self.move_object(seq, &node, &key, &src).await;
                }
                match self.download_snapshot(seq, &src).await {
                    Ok(c) => c,
                    Err(FsError::Stale(_) | FsError::Remote(object_store::Error::NotFound { .. })) => {
                        let now = self.head_source(&src).await?;
                        match self.source_moved_on(seq, &node, &src, now).await? {
                            Some(c) => c,
                            None => return Ok(()),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        self.put_and_record(seq, &node, &key, base, moved_from, content, attrs).await
    }

    /// Copies the staging file for upload without holding up writers; a copy that a write
    /// overlapped is thrown away and taken again, so a torn state is never uploaded.
    /// `base` is the bucket's version the file is staged over, if it is (the inode's
    /// `remote` as planned: no other change of the inode runs meanwhile).
    async fn snapshot(&self, seq: Seq, ino: Ino, base: Option<Remote>) -> FsResult<Option<(Content, u64)>> {
        let core = &*self.core;
        let state = || core.tree().get(ino).ok().map(|n| (n.generation, n.writing));
        let name = format!("up-{seq}");
        let threshold = core.cfg.multipart_threshold;
        // A snapshot in memory takes its room in the budget of uploads in flight first, and
        // keeps it until the upload ends.
        let size = core.tree().get(ino).map(|n| n.size).unwrap_or(0);
        let mut room = match size <= threshold {
            true => Some(self.part_room(size).await?),
            false => None,
        };
        for _ in 0..4 {
            let Some(before) = state() else { return Ok(None) };
            if before.1 > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let job = core.staging.snapshot_job(ino, &name, threshold);
            let copied = tokio::task::spawn_blocking(job).await.map_err(|e| FsError::Io(std::io::Error::other(e)))?;
            let (snap, size, hash) = match copied {
                Ok(c) => c,
                Err(_) if state().is_none() => return Ok(None),
                // A big file's copy needs room in the cache dir: make some from copies of
                // files already in the bucket, and try again (else the upload waits and
                // retries until there is room, shown in `status`).
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && core.drop_clean_copies() > 0 => continue,
                Err(e) => return Err(e.into()),
            };
            // No write started or was under way while we copied: the copy is one state.
            if state() == Some(before) {
                return Ok(Some((Content::of(snap, size, hash, base.as_ref(), room.take()), before.0)));
            }
        }
        // Still busy: copy under the lock once no write is in its pwrite (a new one cannot
        // start without the lock).
        loop {
            {
                let tree = core.tree();
                let Ok(n) = tree.get(ino) else { return Ok(None) };
                if n.writing == 0 {
                    let generation = n.generation;
                    let (snap, size, hash) = core.staging.snapshot_job(ino, &name, threshold)()?;
                    return Ok(Some((Content::of(snap, size, hash, base.as_ref(), room.take()), generation)));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A folder lives in the bucket as its marker (carrying its attributes); a moved folder
    /// writes the marker at its new key (`FolderMoved` retires the old one).
    async fn sync_dir(&self, seq: Seq, mut node: Inode, key: &str) -> FsResult<()> {
        let core = &*self.core;
        if !node.attrs_known && node.remote.is_some() {
            // Keep the attributes the old marker carries.
            core.fetch_attrs(vec![node.ino]).await;
            if let Ok(n) = core.tree().get(node.ino) {
                node = Inode { generation: node.generation, ..n.clone() };
            }
        }
        let attrs = node.posix_attrs();
        let marker = obj_path(&layout::marker_key(key))?;
        core.queue().writing(seq, key);
        let opts = PutOptions { attributes: attrs.to_attributes(None, None), ..Default::default() };
        core.store.put_opts(&marker, PutPayload::new(), opts).await?;
        let mut batch = Batch::default();
        let mut l = core.lock();
        if l.contains(node.ino) {
            // A folder moved with its parent leaves its old marker behind.
            if let Some(old) = l.get(node.ino)?.remote.clone().filter(|o| o.key != key) {
                l.push_op(
                    Op::Delete { remote: folder_remote(layout::marker_key(&old.key)) },
                    Duration::ZERO,
                    &mut batch,
                )?;
            }
            l.set_remote(node.ino, Some(folder_remote(key.to_string())));
            let n = l.get_mut(node.ino)?;
            if n.generation == node.generation {
                n.dirty = false;
            }
            n.attrs_known = true;
            l.persist(node.ino, &mut batch)?;
        }
        self.finish(l, seq, batch)?;
        self.uploaded("folder", key, None, None);
        Ok(())
    }
}

/// The keys a `Sync` of `ino` touches: where it lives now, where its object is (before a
/// move lands) and the object it replaces.
fn sync_keys(tree: &Tree, ino: Ino) -> Vec<String> {
    let mut keys: Vec<String> = tree.key_of(ino).into_iter().collect();
    if let Ok(n) = tree.get(ino) {
        keys.extend([&n.remote, &n.overwrites].into_iter().flatten().map(|r| r.key.clone()));
    }
    keys
}
