//! The filesystem logic, as plain async Rust over an object store; it knows nothing of
//! fuser (the adapter in `crate::fuse` converts kernel requests into these calls). [`Fs`]
//! is a thin facade: each call composes the parts, which own their state behind locks of
//! their own (docs/ARCHITECTURE.md draws them):
//!
//! - `tree`: inodes, children, the key index, the kernel's held counts (pure data);
//! - `journal`: the ordered queue of changes, its database, the rule of what may run beside
//!   what;
//! - `core`: the store, the configuration, and the shared parts, with the changes that span
//!   the tree and the journal; `names`: those changes for create, unlink, rename, setattr;
//! - `listing`: folders listed and merged, the memory bound on listings, the poll;
//! - `files`: handles, open, read, write, close over staging and the block reader;
//! - `upload` and `conflict`: one change as store calls, and conflicts resolved by policy;
//! - `events`: the one stream of events that observers listen to;
//! - `xattr`: extended attributes, kept in the inode and uploaded as object metadata;
//! - `links`: hard links, a file's other names as alias records, each a copy in the bucket.

mod blocks;
mod conflict;
mod core;
pub mod error;
pub mod events;
mod files;
mod heads;
mod ids;
mod journal;
mod kept;
mod links;
mod listing;
mod names;
mod object;
mod sparse;
mod staging;
mod startup;
mod tree;
pub mod types;
mod upload;
mod xattr;

use std::path::Path as FsPath;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

pub use blocks::BlockConfig;
pub use conflict::{ConflictConfig, ConflictRecord, ConflictRule, Policy, Version};
pub use error::{FsError, FsResult};
pub use events::{Caller, Event, Listener};
pub use object::obj_path;
pub use types::{
    Attr, BlockIndex, DirEntry, DirPage, Fh, Ino, Inode, Invalidation, Kind, Op, ROOT_INO, Remote, Seq, SetAttr,
    from_ns,
};
pub use xattr::XattrReply;

use crate::cache::{BlockCache, CacheKey};
use crate::store::Store;
use core::Core;
use files::Files;
use listing::Listings;
use names::{NewNode, check_name};
use upload::Uploader;

/// How long a read waits for the bucket by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Listing entries kept in memory by default: about 1 KiB each.
pub const DEFAULT_MAX_INODES: u64 = 100_000;
/// A listing stays at least its TTL, and never less than this: a request that just listed
/// a folder is still using its entries.
const LISTING_MIN_AGE: Duration = Duration::from_secs(1);

/// Files above this size go up as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 32 << 20;

#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long a folder listing or attribute is trusted before asking the bucket again.
    pub metadata_ttl: Duration,
    /// How long after the last change an upload starts, for a file nobody holds open (or
    /// a folder, a rename, a removal).
    pub upload_delay: Duration,
    /// How long after its last write the upload of a file still held open waits: a file
    /// being written (a download, a log, a database) would otherwise go up at each pause.
    pub open_upload_delay: Duration,
    /// Owner of objects whose metadata carries none.
    pub uid: u32,
    pub gid: u32,
    /// Names conflict copies.
    pub host: String,
    /// The user this mount writes as (`autosync-user`, ranked by `--conflict-priority`).
    pub user: String,
    /// How often the folders in use are listed again in the background (zero: never).
    pub poll_interval: Duration,
    pub multipart_threshold: u64,
    /// Most changes uploaded at once (`--transfers`).
    pub transfers: usize,
    /// Block size, read-ahead and memory bound of reads from the bucket.
    pub blocks: BlockConfig,
    /// Sealed blocks on local disk, kept across mounts; none keeps blocks in memory only.
    pub disk_cache: Option<Arc<BlockCache>>,
    /// Seals staged contents and journal records; none loads (or generates) the state
    /// dir's key.
    pub key: Option<CacheKey>,
    /// Entries of folder listings kept in memory (and the state database) beyond what the
    /// kernel holds and what has local changes: least recently used listings go first.
    pub max_inodes: u64,
    /// A listing stays at least its TTL and never less than this: a request that just
    /// listed a folder is still using its entries (tests without concurrency use zero).
    pub listing_min_age: Duration,
    /// How long a read waits for the bucket before it fails with EIO.
    pub io_timeout: Duration,
    /// Most bytes of staged contents; past it, copies already in the bucket leave staging,
    /// and writes get ENOSPC if that is not enough. None: bounded by the disk only.
    pub staging_limit: Option<u64>,
    /// How a conflict is resolved.
    pub conflict: ConflictConfig,
}

/// The least `open_upload_delay` of a mount (the CLI's `--upload-delay` is for closed files).
pub const OPEN_UPLOAD_DELAY: Duration = Duration::from_secs(2);

/// Changes uploaded at once by default (rclone's and s3fs's knobs are in this range).
pub const DEFAULT_TRANSFERS: usize = 16;

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            metadata_ttl: Duration::from_secs(5),
            upload_delay: Duration::from_secs(2),
            open_upload_delay: Duration::from_secs(2),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            host: hostname(),
            user: username(),
            poll_interval: Duration::ZERO,
            multipart_threshold: MULTIPART_THRESHOLD,
            transfers: DEFAULT_TRANSFERS,
            blocks: BlockConfig::default(),
            disk_cache: None,
            key: None,
            max_inodes: DEFAULT_MAX_INODES,
            listing_min_age: LISTING_MIN_AGE,
            io_timeout: DEFAULT_IO_TIMEOUT,
            staging_limit: None,
            conflict: ConflictConfig::default(),
        }
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect())
        .unwrap_or_else(|| "host".to_string())
}

/// The login name of the user running the mount (empty if it has none).
pub fn username() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name).unwrap_or_default()
}

/// Which conditional writes the store honours, found by probing at mount time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Caps {
    /// `PutMode::Create` (If-None-Match: *) is enforced.
    pub create: bool,
    /// `PutMode::Update` (If-Match) is enforced.
    pub update: bool,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Status {
    pub pending_ops: usize,
    pub pending_bytes: u64,
    pub staged_bytes: u64,
    pub uploads_done: u64,
    /// Content bytes sent to the bucket by uploads.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Content bytes the bucket copied server-side into uploads instead.
    #[serde(default)]
    pub bytes_copied: u64,
    pub conflicts: u64,
    pub last_error: Option<String>,
    pub conditional_create: bool,
    pub conditional_update: bool,
    pub read_only: Option<String>,
    #[serde(default)]
    pub cache: CacheReport,
    /// Inodes in memory (entries of folder listings, the kernel's, local changes).
    #[serde(default)]
    pub inodes: usize,
    /// The number the next event gets.
    #[serde(default)]
    pub next_event: u64,
    /// Changes being uploaded right now.
    #[serde(default)]
    pub uploading: usize,
    /// Changes whose last attempt failed, oldest first: what each is about and its error.
    #[serde(default)]
    pub failing: Vec<Failing>,
}

/// A change that keeps failing, as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Failing {
    /// The journal sequence number of the change.
    pub seq: u64,
    /// `path: error` of its last attempt.
    pub error: String,
    /// Attempts that failed in a row.
    pub tries: u32,
}

/// What `autosync cache stats` shows: the disk cache's counters, and reads in memory.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct CacheReport {
    /// The sealed blocks on disk (none when the mount keeps no disk cache).
    pub disk: Option<crate::cache::CacheStats>,
    /// Bytes of decrypted blocks in memory, and their bound.
    pub memory_bytes: u64,
    pub memory_limit: u64,
    pub block_size: u64,
    /// Reads of the bucket's copy that reached the mount (the kernel's page cache answers
    /// the others), and the blocks fetched from the bucket.
    pub reads: u64,
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later request into a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A mounted bucket: the calls the FUSE adapter makes, each composing the parts.
pub struct Fs {
    core: Arc<Core>,
    listings: Listings,
    files: Files,
    uploader: Uploader,
}

impl Fs {
    /// Opens (or creates) the state of a mount and replays nothing yet: call
    /// [`Fs::run_uploader`] to drain the journal.
    pub fn open_state(
        store: Store,
        prefix: &str,
        state_dir: &FsPath,
        cache_dir: &FsPath,
        cfg: FsConfig,
        caps: Caps,
    ) -> FsResult<Arc<Self>> {
        let core = Arc::new(startup::open_core(store, prefix, state_dir, cache_dir, cfg, caps)?);
        if let Some(disk) = core.blocks.disk() {
            // Weak: the cache lives inside the core, and must not keep it alive.
            let weak = Arc::downgrade(&core);
            disk.on_integrity_failure(Box::new(move |key: &str, index: u64, why: &str| {
                let Some(events) = weak.upgrade() else { return };
                let e = Event::new(events::Kind::CacheIntegrity)
                    .path(events.rel_path(key))
                    .message(format!("block {index} failed its integrity check ({why}); it is fetched again"));
                events.events.emit(e);
            }));
        }
        Ok(Arc::new(Fs {
            listings: Listings::new(Arc::clone(&core)),
            files: Files::new(Arc::clone(&core)),
            uploader: Uploader::new(Arc::clone(&core)),
            core,
        }))
    }

    /// Drains the journal until `stop` (whatever is left stays in the journal).
    pub async fn run_uploader(self: Arc<Self>, stop: watch::Receiver<bool>) {
        self.uploader.run(stop).await
    }

    /// Lists the folders in use again every `--poll-interval`, until `stop`.
    pub async fn run_poller(self: Arc<Self>, stop: watch::Receiver<bool>) {
        self.listings.run_poller(stop).await
    }

    /// One round of the poll; returns how many folders it listed.
    pub async fn poll_once(&self) -> usize {
        self.listings.poll_once().await
    }

    /// Where to send kernel cache invalidations from now on (once per mount).
    pub fn set_invalidations(&self, tx: std::sync::mpsc::Sender<Invalidation>) {
        self.core.set_invalidations(tx);
    }

    pub fn set_raw_lister(&self, lister: crate::store::s3list::SharedLister) {
        self.listings.set_raw_lister(lister);
    }

    /// Multipart uploads copy the unchanged ranges of a file through `copier` (S3).
    pub fn set_part_copier(&self, copier: std::sync::Arc<crate::store::s3parts::S3Parts>) {
        self.core.set_part_copier(copier);
    }

    /// Shows `msg` as the last error in `status` until an upload succeeds.
    pub fn note_error(&self, msg: String) {
        self.core.note_error(msg);
    }

    // ---- names ----------------------------------------------------------------------

    /// The kernel's lookup: the entry counts as held by the kernel until it forgets it.
    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        let a = self.listings.find(parent, name).await?;
        self.entries_replied(&[a.ino]);
        Ok(a)
    }

    /// Lists the top folder once the mount is up, with the attributes of the objects the
    /// state database has not seen, so that the first command in the mount finds its names
    /// known (over a 40 ms link, a lookup that lists costs two round trips or more). A
    /// lookup that comes during it waits for it rather than listing again.
    pub async fn warm_root(&self) {
        if let Err(e) = self.listings.ensure_listed(types::ROOT_INO).await {
            tracing::debug!("listing the top folder at mount failed: {e}");
        }
    }

    /// The kernel holds these entries (replied by `lookup` or `readdirplus`).
    pub fn entries_replied(&self, inos: &[Ino]) {
        self.core.tree().entries_replied(inos);
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        self.listings.forget(ino, n);
    }

    /// Drops from memory the folder listings the LRU evicted, where nothing is held.
    pub fn evict_listings(&self) {
        self.listings.evict();
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        self.core.tree().attr(ino)
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<String> {
        if self.core.tree().get(ino)?.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        self.core.load_symlink(ino).await
    }

    /// Checks for mkdir, create and symlink: the name is valid and free in the bucket too.
    async fn prepare_new(&self, parent: Ino, name: &str) -> FsResult<()> {
        check_name(name)?;
        // Make sure the name is free in the bucket too, not only in what we have seen.
        if !self.listings.fresh(parent)?
            && let Err(e) = self.listings.refresh(parent).await
        {
            // Offline: go ahead; the upload is conditional and settles a clash later.
            tracing::debug!("creating {name} without checking the bucket: {e}");
        }
        let tree = self.core.tree();
        if tree.get(parent)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if tree.child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    pub async fn mkdir(&self, parent: Ino, name: &str, mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.prepare_new(parent, name).await?;
        let new = NewNode { kind: Kind::Dir, perm: (mode & 0o7777) as u16, uid, gid, target: None, rdev: 0 };
        self.core.lock().add_node(parent, name, new)
    }

    pub async fn symlink(&self, parent: Ino, name: &str, target: &str, uid: u32, gid: u32) -> FsResult<Attr> {
        self.prepare_new(parent, name).await?;
        let new = NewNode { kind: Kind::Symlink, perm: 0o777, uid, gid, target: Some(target), rdev: 0 };
        self.core.lock().add_node(parent, name, new)
    }

    /// A FIFO, socket or device node (`mode` carries its type; `rdev` a device's number).
    /// A regular file's `mknod` is a `create` whose handle the caller releases.
    pub async fn mknod(&self, parent: Ino, name: &str, mode: u32, rdev: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        let kind = Kind::of_mode(mode);
        if !kind.is_special() {
            return Err(FsError::Invalid("mknod of a type that is not a FIFO, socket or device"));
        }
        self.prepare_new(parent, name).await?;
        let new = NewNode { kind, perm: (mode & 0o7777) as u16, uid, gid, target: None, rdev };
        self.core.lock().add_node(parent, name, new)
    }

    pub async fn create(&self, parent: Ino, name: &str, mode: u32, uid: u32, gid: u32) -> FsResult<(Attr, Fh)> {
        self.prepare_new(parent, name).await?;
        let new = NewNode { kind: Kind::File, perm: (mode & 0o7777) as u16, uid, gid, target: None, rdev: 0 };
        let attr = self.core.lock().add_node(parent, name, new)?;
        Ok((attr, self.files.new_handle(attr.ino)))
    }

    /// link(2): another name for a file (the caller's entry is held by the kernel).
    pub async fn link(&self, ino: Ino, newparent: Ino, newname: &str) -> FsResult<Attr> {
        self.prepare_new(newparent, newname).await?;
        let a = self.core.lock().link_node(ino, newparent, newname)?;
        self.entries_replied(&[a.ino]);
        Ok(a)
    }

    /// Looks a name up, listing the folder when it is not known yet: the inode of the name
    /// itself (for a hard link, its own record, not the file's).
    async fn resolve(&self, parent: Ino, name: &str) -> FsResult<Ino> {
        if let Some(i) = self.core.tree().child(parent, name) {
            return Ok(i);
        }
        self.listings.find(parent, name).await?;
        self.core.tree().child(parent, name).ok_or(FsError::NotFound)
    }

    pub async fn unlink(&self, parent: Ino, name: &str) -> FsResult<()> {
        let ino = self.resolve(parent, name).await?;
        self.keep_content(ino).await?;
        self.core.lock().unlink_node(parent, ino)
    }

    /// A file's name is about to go (unlink, or a rename onto it): its content is made
    /// local first when it would have nowhere else to be read from: the file is still open,
    /// or it moves to another of its names (hard links) whose copy is not made yet.
    async fn keep_content(&self, ino: Ino) -> FsResult<()> {
        let needed = {
            let l = self.core.lock();
            let n = l.get(ino)?;
            n.kind == Kind::File && (n.open > 0 || l.needs_content_to_move(ino))
        };
        if needed {
            self.files.ensure_staged(ino).await?;
        }
        Ok(())
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        let ino = self.resolve(parent, name).await?;
        if self.core.tree().get(ino)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        // The bucket may hold files we have not listed yet.
        self.listings.refresh_now(ino).await?;
        self.core.lock().rmdir_node(ino)
    }

    pub async fn rename(
        &self,
        parent: Ino,
        name: &str,
        newparent: Ino,
        newname: &str,
        noreplace: bool,
    ) -> FsResult<()> {
        check_name(newname)?;
        let ino = self.resolve(parent, name).await?;
        let target = match self.resolve(newparent, newname).await {
            Ok(t) => Some(t),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        // Two names of one file: nothing to do (POSIX).
        let file = |i: Ino| self.core.tree().primary(i);
        if target.is_some_and(|t| file(t) == file(ino)) {
            return Ok(());
        }
        let is_dir = self.core.tree().get(ino)?.kind == Kind::Dir;
        if let Some(t) = target {
            if noreplace {
                return Err(FsError::Exists);
            }
            // The object the target is uploading right now is what we replace: let it land.
            self.uploader.wait_not_uploading(t).await;
            let tkind = self.core.tree().get(t)?.kind;
            // Still open, or living on at another name: its content stays readable.
            self.keep_content(t).await?;
            match (is_dir, tkind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    self.listings.refresh_now(t).await?;
                    if self.core.tree().child_count(t) > 0 {
                        return Err(FsError::NotEmpty);
                    }
                }
                (false, false) => {}
            }
        }
        if is_dir {
            // Moving a folder moves every object under it: know them all first, so the
            // folder reads complete at its new name while the move is uploading.
            if let Err(e) = self.listings.populate_tree(ino).await
                && self.core.tree().get(ino)?.remote.is_some()
            {
                return Err(e);
            }
        }
        self.core.lock().rename_node(ino, parent, target, newparent, newname)
    }

    pub async fn setattr(&self, ino: Ino, set: SetAttr) -> FsResult<Attr> {
        if let Some(size) = set.size {
            if self.core.tree().get(ino)?.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let file = if size == 0 { self.files.restage_empty(ino)? } else { self.files.stage_for_write(ino).await? };
            // Counted like a write, so an upload snapshot never straddles it.
            {
                let mut tree = self.core.tree();
                let n = tree.get_mut(ino)?;
                n.generation += 1;
                n.writing += 1;
            }
            let resized = file.set_len(size);
            if let Ok(n) = self.core.tree().get_mut(ino) {
                n.writing = n.writing.saturating_sub(1);
            }
            resized?;
            file.sync_data()?;
            self.core.staging.sync_dir()?;
        }
        self.core.lock().set_attrs(ino, set)
    }

    // ---- contents -------------------------------------------------------------------

    /// Opens a file. Returns the handle and whether the kernel may keep its page cache.
    pub async fn open(&self, ino: Ino) -> FsResult<(Fh, bool)> {
        self.files.open(ino).await
    }

    pub async fn read(&self, fh: Fh, offset: u64, size: u32) -> FsResult<Bytes> {
        self.files.read(fh, offset, size).await
    }

    pub async fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.files.write(fh, offset, data).await
    }

    /// fsync(): the change is durable on local disk when this returns.
    pub async fn flush(&self, fh: Fh) -> FsResult<()> {
        self.files.flush(fh, false).await
    }

    /// close(): durable like `flush`, and what the handle wrote is reported (an event).
    pub async fn close(&self, fh: Fh) -> FsResult<()> {
        self.files.flush(fh, true).await
    }

    pub async fn release(&self, fh: Fh) -> FsResult<()> {
        self.files.release(fh).await
    }

    // ---- folders --------------------------------------------------------------------

    pub async fn opendir(&self, ino: Ino) -> FsResult<Fh> {
        self.listings.ensure_listed(ino).await?;
        self.files.open_dir(ino)
    }

    /// Entries from `offset` on; the offset of entry i is i + 1.
    pub fn readdir(&self, fh: Fh, offset: u64) -> FsResult<DirPage> {
        self.files.readdir(fh, offset)
    }

    pub fn releasedir(&self, fh: Fh) {
        self.files.release_dir(fh);
    }

    // ---- the whole mount ------------------------------------------------------------

    pub fn status(&self) -> Status {
        let core = &*self.core;
        let (pending_ops, pending_bytes, inodes, uploading, failing) = {
            let l = core.lock();
            let bytes = l
                .queue
                .iter()
                .filter_map(|(_, q)| match q.op {
                    Op::Sync { ino } => l.get(ino).ok().filter(|n| n.dirty).map(|n| n.size),
                    _ => None,
                })
                .sum();
            let failing = l
                .queue
                .failing()
                .map(|(seq, q)| Failing { seq: seq.0, error: q.last_error.clone().unwrap_or_default(), tries: q.tries })
                .collect();
            (l.queue.len(), bytes, l.len(), l.queue.running_count(), failing)
        };
        let c = core.counters();
        Status {
            pending_ops,
            pending_bytes,
            staged_bytes: core.staging.bytes(),
            inodes,
            uploads_done: c.uploads_done,
            bytes_sent: c.bytes_sent,
            bytes_copied: c.bytes_copied,
            conflicts: c.conflicts,
            last_error: c.last_error.clone(),
            conditional_create: core.caps.create,
            conditional_update: core.caps.update,
            read_only: core.journal.read_only(),
            cache: core.blocks.report(),
            next_event: core.events.next_seq(),
            uploading,
            failing,
        }
    }

    /// Every conflict this mount state met, oldest first.
    pub fn conflicts(&self) -> FsResult<Vec<ConflictRecord>> {
        Ok(self.core.journal.db().conflicts::<ConflictRecord>()?.into_iter().map(|(_, r)| r).collect())
    }

    /// A listener of the event stream: from `since` (what is still held), or from now.
    pub fn events(&self, since: Option<u64>) -> Listener {
        self.core.events.subscribe(since)
    }

    /// The mount is going down (an event).
    pub fn unmounting(&self) {
        self.core.events.emit(Event::new(events::Kind::Unmounting));
    }

    /// Empties the block caches, in memory and on disk.
    pub async fn clear_cache(&self) -> FsResult<()> {
        self.core.blocks.clear_memory();
        if let Some(disk) = self.core.blocks.disk().cloned() {
            tokio::task::spawn_blocking(move || disk.clear())
                .await
                .map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?
                .map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?;
        }
        Ok(())
    }

    /// Waits until every local change is in the bucket, or the timeout passes. Returns the
    /// number of changes still pending.
    pub async fn flush_all(&self, timeout: Duration) -> usize {
        self.uploader.flush_all(timeout).await
    }

    /// Makes every journalled change durable (fsyncdir).
    pub fn sync_journal(&self) -> FsResult<()> {
        let queue = self.core.queue();
        self.core.commit(&queue, crate::state::Batch::default(), true)
    }

    /// The last commit of a mount, once the kernel let go of it: everything is durable, and
    /// the next mount may trust the staged copies of files without pending changes. The
    /// event stream's numbering is saved exactly.
    pub fn close_state(&self) -> FsResult<()> {
        let queue = self.core.queue();
        let mut batch = crate::state::Batch::default();
        batch.meta.push(("clean", 1));
        self.core.commit(&queue, batch, true)?;
        self.core.events.close()?;
        Ok(())
    }
}
