//! The core the parts work on: the store and the configuration, and the shared parts, each
//! behind a lock of its own: the tree, the journal, staging, the block reader, the events,
//! and the counters `status` shows. It also holds the changes that span the tree and the
//! journal ([`Locked`]): queueing an inode's upload, retiring an object no inode owns,
//! telling whether an inode is settled. Those take the tree's lock, then the journal's
//! (always in that order), and commit their batch before letting go of either.
//!
//! Nothing here waits on the bucket with a lock held; the parts that talk to the bucket
//! (listings, open files, the uploader) take a lock, decide, let go, do their I/O, then take
//! it again to apply what came back.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::blocks::BlockReader;
use super::error::{FsError, FsResult};
use super::events::{Event, Events, Kind as EventKind};
use super::journal::{Committed, Journal, Queue};
use super::staging::Staging;
use super::tree::Tree;
use super::types::{Ino, Inode, Invalidation, Kind, Op, Remote, Seq};
use super::{Caps, FsConfig, lock};
use crate::state::Batch;
use crate::store::Store;
use crate::store::s3parts::S3Parts;

/// What `status` counts.
#[derive(Debug, Default)]
pub struct Counters {
    pub uploads_done: u64,
    /// Content bytes sent to the bucket by uploads (attempts that failed included).
    pub bytes_sent: u64,
    /// Content bytes the bucket copied server-side into uploads, instead of their being sent.
    pub bytes_copied: u64,
    pub conflicts: u64,
    pub last_error: Option<String>,
}

pub struct Core {
    pub store: Store,
    /// The bucket prefix the mount shows (no slashes around it).
    pub prefix: String,
    pub cfg: FsConfig,
    pub caps: Caps,
    /// This state dir's writer id, stamped on every object it uploads (`autosync-origin`), so
    /// an upload cut short by a crash is recognised as ours after the next mount.
    pub writer: String,
    tree: Mutex<Tree>,
    pub journal: Journal,
    pub staging: Staging,
    /// Reads of the bucket's copy, by blocks.
    pub blocks: Arc<BlockReader>,
    pub events: Events,
    counters: Mutex<Counters>,
    /// Where kernel cache invalidations go (the FUSE adapter's notifier thread).
    invalidations: OnceLock<std::sync::mpsc::Sender<Invalidation>>,
    /// Multipart uploads with parts copied by the store (S3 only).
    part_copier: OnceLock<Arc<S3Parts>>,
    /// Signalled whenever the uploader finishes (or gives up on) an attempt.
    pub upload_done: tokio::sync::Notify,
}

/// The tree and the queue, both locked (in that order): what a change that spans them holds
/// until its batch is committed. Derefs to the tree.
pub struct Locked<'a> {
    pub tree: MutexGuard<'a, Tree>,
    pub queue: MutexGuard<'a, Queue>,
    core: &'a Core,
}

impl Deref for Locked<'_> {
    type Target = Tree;
    fn deref(&self) -> &Tree {
        &self.tree
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Tree {
        &mut self.tree
    }
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        prefix: String,
        cfg: FsConfig,
        caps: Caps,
        writer: String,
        tree: Tree,
        journal: Journal,
        staging: Staging,
        blocks: Arc<BlockReader>,
        events: Events,
        last_error: Option<String>,
    ) -> Core {
        Core {
            store,
            prefix,
            cfg,
            caps,
            writer,
            tree: Mutex::new(tree),
            journal,
            staging,
            blocks,
            events,
            counters: Mutex::new(Counters { last_error, ..Counters::default() }),
            invalidations: OnceLock::new(),
            part_copier: OnceLock::new(),
            upload_done: tokio::sync::Notify::new(),
        }
    }

    /// The tree and the queue, for a change that spans both.
    pub fn lock(&self) -> Locked<'_> {
        let tree = lock(&self.tree);
        let queue = self.journal.lock();
        Locked { tree, queue, core: self }
    }

    /// The tree alone. The journal's lock may be taken while holding it, not the reverse.
    pub fn tree(&self) -> MutexGuard<'_, Tree> {
        lock(&self.tree)
    }

    /// The queue alone: never take the tree's lock while holding it.
    pub fn queue(&self) -> MutexGuard<'_, Queue> {
        self.journal.lock()
    }

    pub fn counters(&self) -> MutexGuard<'_, Counters> {
        lock(&self.counters)
    }

    /// Shows `msg` as the last error in `status` until an upload succeeds.
    pub fn note_error(&self, msg: String) {
        self.counters().last_error = Some(msg);
    }

    /// Writes `batch` under the journal's lock (`queue`); a failed write turns the mount
    /// read-only, which is an event.
    pub fn commit(&self, queue: &Queue, batch: Batch, durable: bool) -> FsResult<()> {
        match self.journal.commit(queue, batch, durable) {
            Ok(()) => Ok(()),
            Err(Committed::Refused(e)) => Err(e),
            Err(Committed::WentReadOnly(e, why)) => {
                self.events.emit(Event::new(EventKind::ReadOnly).message(why));
                Err(e)
            }
        }
    }

    /// Refuses a change up front once the journal went read-only.
    pub fn check_writable(&self) -> FsResult<()> {
        match self.journal.read_only() {
            Some(why) => Err(FsError::ReadOnly(why)),
            None => Ok(()),
        }
    }

    /// A key as a path in the mount (without the mount's prefix).
    pub fn rel_path(&self, key: &str) -> String {
        super::tree::rel_path(&self.prefix, key)
    }

    pub fn set_invalidations(&self, tx: std::sync::mpsc::Sender<Invalidation>) {
        let _ = self.invalidations.set(tx);
    }

    /// Multipart uploads may copy parts through `copier` from now on (once per mount).
    pub fn set_part_copier(&self, copier: Arc<S3Parts>) {
        let _ = self.part_copier.set(copier);
    }

    pub fn part_copier(&self) -> Option<Arc<S3Parts>> {
        self.part_copier.get().cloned()
    }

    /// Drops a kernel cache entry (sent by the adapter's notifier thread, outside requests).
    pub fn invalidate(&self, what: Invalidation) {
        if let Some(tx) = self.invalidations.get() {
            let _ = tx.send(what);
        }
    }

    /// `fut`, or [`FsError::TimedOut`] (EIO) once `--io-timeout` passed without it: a
    /// read of data that is not cached never hangs on an unresponsive bucket.
    pub async fn bounded<T>(&self, fut: impl std::future::Future<Output = FsResult<T>>) -> FsResult<T> {
        match tokio::time::timeout(self.cfg.io_timeout, fut).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("a read from the bucket took longer than --io-timeout ({:?}): EIO", self.cfg.io_timeout);
                Err(FsError::TimedOut(self.cfg.io_timeout))
            }
        }
    }

    /// Drops the staged copies of files whose content is in the bucket as it is (no local
    /// change, nothing open): their reads go to the bucket and the block cache. Returns
    /// the bytes freed.
    pub fn drop_clean_copies(&self) -> u64 {
        let mut l = self.lock();
        let clean: Vec<Ino> = l
            .nodes()
            .filter(|n| n.staged && n.remote.as_ref().is_some_and(|r| r.size == n.size))
            .map(|n| n.ino)
            .collect();
        let mut batch = Batch::default();
        let mut freed = 0;
        for ino in clean {
            if !l.is_settled(ino) {
                continue;
            }
            if let Ok(n) = l.get_mut(ino) {
                n.staged = false;
                freed += n.size;
                self.staging.remove(ino);
                let _ = l.persist(ino, &mut batch);
            }
        }
        let _ = l.commit(batch, false);
        freed
    }
}

impl<'a> Locked<'a> {
    pub fn core(&self) -> &'a Core {
        self.core
    }

    /// Commits `batch` (fsynced when `durable`) while both locks are held.
    pub fn commit(&self, batch: Batch, durable: bool) -> FsResult<()> {
        self.core.commit(&self.queue, batch, durable)
    }

    /// Sends an event, numbered in the order of the changes made under these locks.
    pub fn emit(&self, event: Event) {
        self.core.events.emit(event);
    }

    pub fn push_op(&mut self, op: Op, delay: Duration, batch: &mut Batch) -> FsResult<Seq> {
        self.queue.push(op, delay, batch)
    }

    /// Marks an inode changed: queues its upload once, and pushes the upload back while it
    /// keeps changing (coalescing).
    pub fn touch(&mut self, ino: Ino, delay: Duration, batch: &mut Batch) -> FsResult<()> {
        if let Ok(n) = self.tree.get_mut(ino) {
            n.generation += 1;
        }
        if !self.queue.postpone(ino, delay) {
            self.queue.push(Op::Sync { ino }, delay, batch)?;
        }
        self.tree.persist(ino, batch)
    }

    /// Like `touch`, but moves the inode's upload behind every op queued so far: a rename
    /// must not reach the bucket before the deletes that came before it.
    pub fn requeue(&mut self, ino: Ino, delay: Duration, batch: &mut Batch) -> FsResult<()> {
        self.queue.drop_sync(ino, batch);
        self.touch(ino, delay, batch)
    }

    /// Removes an inode and what is below it, with their staging files.
    pub fn remove_tree(&mut self, ino: Ino, batch: &mut Batch) {
        // A file in it with another name outside lives on there (hard links).
        self.keep_linked_outside(ino, batch);
        for staged in self.tree.remove_tree(ino, batch) {
            self.core.staging.remove(staged);
        }
    }

    /// Schedules removal of whatever the bucket holds for a removed inode.
    pub fn drop_remote(
        &mut self,
        node: &Inode,
        keep_key: Option<&str>,
        delay: Duration,
        batch: &mut Batch,
    ) -> FsResult<()> {
        for r in [&node.remote, &node.overwrites].into_iter().flatten() {
            if Some(r.key.as_str()) != keep_key {
                self.retire(r.clone(), delay, batch)?;
            }
        }
        Ok(())
    }

    /// An object of ours that no inode owns any more (its inode was deleted, or moved away
    /// from it): a newer file at the same path takes it over (and may overwrite it);
    /// otherwise it is deleted through the queue.
    pub fn retire(&mut self, remote: Remote, delay: Duration, batch: &mut Batch) -> FsResult<()> {
        if let Some(ino) = self.tree.ino_at_key(&remote.key) {
            let n = self.tree.get_mut(ino)?;
            if n.kind != Kind::Dir && n.overwrites.is_none() && n.remote.as_ref().is_none_or(|r| r.key != remote.key) {
                n.overwrites = Some(remote);
                return self.tree.persist(ino, batch);
            }
        }
        self.queue.push(Op::Delete { remote }, delay, batch)?;
        Ok(())
    }

    /// [`retire`](Self::retire) of `remote`, our own write over `replaced`: a file that was
    /// to overwrite `replaced` overwrites `remote` instead.
    pub fn retire_successor(
        &mut self,
        remote: Remote,
        replaced: Option<&Remote>,
        delay: Duration,
        batch: &mut Batch,
    ) -> FsResult<()> {
        if let Some(old) = replaced
            && let Some(ino) = self.tree.ino_at_key(&remote.key)
        {
            let n = self.tree.get_mut(ino)?;
            if n.overwrites.as_ref().is_some_and(|o| o.key == old.key && o.etag == old.etag) {
                n.overwrites = Some(remote);
                return self.tree.persist(ino, batch);
            }
        }
        self.retire(remote, delay, batch)
    }

    /// No local change of this inode is pending or in flight: the bucket's word is final.
    pub fn is_settled(&self, ino: Ino) -> bool {
        self.tree.get(ino).is_ok_and(|n| {
            !n.dirty
                && n.open == 0
                && n.overwrites.is_none()
                && !self.queue.has_sync(ino)
                && !self.queue.is_uploading(ino)
        })
    }

    pub fn has_pending_below(&self, ino: Ino) -> bool {
        if !self.is_settled(ino) {
            return true;
        }
        self.tree.children(ino).any(|(_, k)| self.has_pending_below(k))
    }

    /// Folder keys that hold objects this mount is moving or deleting (pending, under way,
    /// or done since `since`, the epoch a listing was taken at): a folder the bucket shows
    /// only because of them is on its way out, and a listing must not bring it back.
    pub fn vacating_folders(&self, since: u64) -> std::collections::HashSet<String> {
        let mut keys: Vec<&str> = self.queue.hidden(since).collect();
        for ino in self.queue.synced_inodes().chain(self.queue.uploading()) {
            if let Some(r) = self.tree.get(ino).ok().and_then(|n| n.remote.as_ref())
                && self.tree.key_of(ino).ok().as_deref() != Some(r.key.as_str())
            {
                keys.push(&r.key);
            }
        }
        let mut out = std::collections::HashSet::new();
        for k in keys {
            let mut k = k.trim_end_matches('/');
            while let Some(i) = k.rfind('/') {
                k = &k[..i];
                out.insert(k.to_string());
            }
        }
        out
    }
}
