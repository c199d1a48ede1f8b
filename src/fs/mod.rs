//! The filesystem logic: inodes, folder listings, file handles and the write journal, as
//! plain async Rust over an object store. It knows nothing of fuser; the adapter in
//! `crate::fuse` converts kernel requests into these calls.

mod blocks;
pub mod error;
mod staging;
pub mod types;
mod upload;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetResult, ObjectMeta, ObjectStoreExt};
use serde::Serialize;
use tokio::sync::{Notify, watch};

pub use blocks::BlockConfig;
use blocks::{BlockReader, Readahead};
pub use error::{FsError, FsResult};
use staging::{BlockWriter, Staging};
pub use types::{
    Attr, ConflictConfig, ConflictRecord, DirEntry, Inode, Invalidation, Kind, Op, Policy, ROOT_INO, Remote, SetAttr,
    Version,
};
use types::{now_ns, to_ns};

use crate::cache::{BlockCache, CacheKey, SealedFile, Sealer};
use crate::layout::{self, PosixAttrs};
use crate::state::{Batch, StateDb, StateError};
use crate::store::Store;

/// How long a read waits for the bucket by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Listing entries kept in memory by default: about 1 KiB each.
pub const DEFAULT_MAX_INODES: u64 = 100_000;
/// A listing not used for this long leaves memory (when nothing in it is held).
const LISTING_IDLE: Duration = Duration::from_secs(600);
/// A listing stays at least its TTL, and never less than this: a request that just listed
/// a folder is still using its entries.
const LISTING_MIN_AGE: Duration = Duration::from_secs(1);

/// Files above this size go up as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 32 << 20;

/// Most folders a background poll lists in one round.
const POLL_FOLDERS: usize = 256;

/// How long folders listed before are answered from memory after a listing failed.
const UNREACHABLE_PAUSE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long a folder listing or attribute is trusted before asking the bucket again.
    pub metadata_ttl: Duration,
    /// How long after the last change an upload starts.
    pub upload_delay: Duration,
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
    /// Longest file name accepted (the local-folder store needs room for its temp suffix).
    pub max_name_len: usize,
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

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            metadata_ttl: Duration::from_secs(5),
            upload_delay: Duration::from_secs(2),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            host: hostname(),
            user: username(),
            poll_interval: Duration::ZERO,
            multipart_threshold: MULTIPART_THRESHOLD,
            max_name_len: 255,
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

/// What a HEAD answered: the object's metadata and attributes, without its body.
struct Head {
    meta: ObjectMeta,
    attributes: object_store::Attributes,
}

impl From<GetResult> for Head {
    fn from(r: GetResult) -> Self {
        Head { meta: r.meta, attributes: r.attributes }
    }
}

/// The state database and staged contents of another key cannot be opened: they move to
/// `unreadable-STAMP` folders (state dir and cache dir) and the mount starts afresh from the
/// bucket, reported in one line. Nothing is deleted: with the old key they can be put back.
fn set_aside_unreadable(state_dir: &FsPath, cache_dir: &FsPath, pending: u64) -> FsResult<String> {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let state_aside = state_dir.join(format!("unreadable-{stamp}"));
    std::fs::create_dir_all(&state_aside)?;
    std::fs::rename(state_dir.join("state.redb"), state_aside.join("state.redb"))?;
    let staging = cache_dir.join("staging");
    let cache_aside = cache_dir.join(format!("unreadable-{stamp}"));
    let staged = if staging.exists() {
        std::fs::create_dir_all(&cache_aside)?;
        std::fs::rename(&staging, cache_aside.join("staging"))?;
        format!(" and its staged contents to {}", cache_aside.display())
    } else {
        String::new()
    };
    let msg = format!(
        "the mount state was sealed with another key (the key file changed or was lost): {pending} change(s) not yet uploaded cannot be opened and are not in the bucket; the state moved to {}{staged}, and the mount starts afresh from the bucket (to upload them, put those files back and mount with the old --key-file)",
        state_aside.display()
    );
    tracing::error!("{msg}");
    Ok(msg)
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

#[derive(Debug)]
struct Queued {
    op: Op,
    ready_at: Instant,
}

#[derive(Debug)]
struct Inner {
    inodes: HashMap<u64, Inode>,
    children: HashMap<u64, BTreeMap<String, u64>>,
    /// Which inode owns the object at a key (its `remote`), so a listing that still shows a
    /// locally renamed file does not bring the old name back.
    by_remote_key: HashMap<String, u64>,
    queue: BTreeMap<u64, Queued>,
    queued_sync: HashMap<u64, u64>,
    /// Keys (and `prefix/` folder keys) with a pending delete or move: hidden from listings.
    hidden: HashMap<String, u32>,
    next_ino: u64,
    next_seq: u64,
    /// Bumped when an upload lands, so a listing taken before it does not delete its file.
    upload_epoch: u64,
    /// The inode the uploader is working on.
    uploading: Option<u64>,
    /// Keys the uploader is writing right now: a listing may already show them, but they
    /// are not someone else's new objects.
    in_flight: HashSet<String>,
    warned: HashSet<String>,
    /// What each file's content was at its last open (see [`Fs::open`]).
    last_open: HashMap<u64, ContentId>,
    /// Per folder, how many of its entries the kernel holds; absent when unknown (a change
    /// in the folder forgets it; it is counted again when needed).
    held: HashMap<u64, u64>,
    /// Sequence number of the next conflict record.
    next_conflict: u64,
}

/// What tells a file's content apart: the bucket's version, and local changes since.
type ContentId = (Option<String>, u64, u64, bool);

#[derive(Debug)]
struct Handle {
    ino: u64,
    wrote: bool,
    /// Read-ahead of reads of the bucket's copy.
    readahead: Readahead,
    /// Directory snapshot taken at opendir.
    dir: Option<Vec<DirEntry>>,
}

#[derive(Debug, Default)]
struct Counters {
    uploads_done: u64,
    conflicts: u64,
    last_error: Option<String>,
    read_only: Option<String>,
}

pub struct Fs {
    store: Store,
    prefix: String,
    cfg: FsConfig,
    caps: Caps,
    /// This state dir's writer id, stamped on every object it uploads (`autosync-origin`), so
    /// an upload cut short by a crash is recognised as ours after the next mount.
    writer: String,
    db: StateDb,
    staging: Staging,
    inner: Mutex<Inner>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    fill_lock: tokio::sync::Mutex<()>,
    /// Reads of the bucket's copy, by blocks.
    blocks: Arc<BlockReader>,
    counters: Mutex<Counters>,
    /// Wakes the uploader: new work, or a flush request.
    wake: Notify,
    /// Signalled whenever the uploader finishes (or gives up on) an attempt.
    upload_done: Notify,
    /// Number of pending journal ops, for flush waiters.
    pending: watch::Sender<usize>,
    /// S3 only: lists folders that hold keys object_store refuses to parse.
    raw_lister: std::sync::OnceLock<crate::store::s3list::SharedLister>,
    /// Wakes the uploader out of an error backoff when a flush is requested.
    flush_kick: Notify,
    /// Flush requests: while non-zero the uploader ignores `upload_delay`.
    urgent: AtomicU64,
    /// Folder listings in memory, weighed by their entries, bounded by `max_inodes` and
    /// dropped when idle: what moka evicts lands in `evicted`, and leaves memory there
    /// if nothing in it is held (see [`Fs::evict_listings`]).
    listings: moka::sync::Cache<u64, u32>,
    evicted: Arc<Mutex<HashSet<u64>>>,
    /// Folders whose last entry held by the kernel was forgotten.
    recheck: Mutex<HashSet<u64>>,
    /// After a failed listing: until when folders listed before are not listed again, and
    /// why.
    unreachable: Mutex<Option<(Instant, String)>>,
    /// Writes are being refused for lack of space (logged once per episode).
    out_of_space: std::sync::atomic::AtomicBool,
    /// Where kernel cache invalidations go (the FUSE adapter's notifier thread).
    invalidations: std::sync::OnceLock<std::sync::mpsc::Sender<Invalidation>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later request into a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn obj_path(key: &str) -> FsResult<Path> {
    Path::parse(key).map_err(|_| FsError::Invalid("name cannot be stored as an object key"))
}

fn check_name(name: &str, max_len: usize) -> FsResult<()> {
    if name.len() > max_len {
        return Err(FsError::NameTooLong);
    }
    if layout::is_local_temp_name(name) {
        return Err(FsError::Invalid("names ending in #DIGITS are reserved by the local-folder store"));
    }
    if layout::invalid_name(name).is_some() || name.chars().any(|c| c.is_ascii_control()) {
        return Err(FsError::Invalid("name cannot be stored as an object key"));
    }
    if layout::is_reserved(name) {
        return Err(FsError::Invalid("names starting with .autosync- are reserved"));
    }
    Ok(())
}

impl Inner {
    fn get(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn get_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&parent).and_then(|c| c.get(name)).copied()
    }

    /// The object key of an inode's current path, relative to the bucket root.
    fn key_of(&self, prefix: &str, ino: u64) -> FsResult<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        let mut guard = 0;
        while cur != ROOT_INO {
            let n = self.get(cur)?;
            parts.push(n.name.as_str());
            cur = n.parent;
            guard += 1;
            if guard > 4096 {
                return Err(FsError::Invalid("path too deep"));
            }
        }
        parts.reverse();
        Ok(layout::join_key(prefix, &parts.join("/")))
    }

    /// How many entries of `dir` the kernel holds, counted when not known.
    fn held_in(&mut self, dir: u64) -> u64 {
        if let Some(&n) = self.held.get(&dir) {
            return n;
        }
        let n = self
            .children
            .get(&dir)
            .map_or(0, |c| c.values().filter(|i| self.inodes.get(i).is_some_and(|n| n.lookups > 0)).count() as u64);
        self.held.insert(dir, n);
        n
    }

    /// The inode now at an object key, if any.
    fn ino_at_key(&self, prefix: &str, key: &str) -> Option<u64> {
        let rel = if prefix.is_empty() { key } else { key.strip_prefix(prefix)?.strip_prefix('/')? };
        rel.split('/').try_fold(ROOT_INO, |dir, name| self.child(dir, name))
    }

    fn insert(&mut self, node: Inode) {
        self.held.remove(&node.parent);
        self.children.entry(node.parent).or_default().insert(node.name.clone(), node.ino);
        if node.kind == Kind::Dir {
            self.children.entry(node.ino).or_default();
        }
        if let Some(r) = &node.remote {
            self.by_remote_key.insert(r.key.clone(), node.ino);
        }
        self.inodes.insert(node.ino, node);
    }

    fn detach(&mut self, ino: u64) {
        if let Some(n) = self.inodes.get(&ino) {
            self.held.remove(&n.parent);
        }
        if let Some(n) = self.inodes.get(&ino)
            && let Some(c) = self.children.get_mut(&n.parent)
            && c.get(&n.name) == Some(&ino)
        {
            c.remove(&n.name);
        }
    }

    fn remove(&mut self, ino: u64) -> Option<Inode> {
        self.detach(ino);
        self.children.remove(&ino);
        self.last_open.remove(&ino);
        self.held.remove(&ino);
        let n = self.inodes.remove(&ino)?;
        if let Some(r) = &n.remote
            && self.by_remote_key.get(&r.key) == Some(&ino)
        {
            self.by_remote_key.remove(&r.key);
        }
        Some(n)
    }

    fn set_remote(&mut self, ino: u64, remote: Option<Remote>) {
        let Some(n) = self.inodes.get_mut(&ino) else { return };
        if let Some(old) = n.remote.take()
            && self.by_remote_key.get(&old.key) == Some(&ino)
        {
            self.by_remote_key.remove(&old.key);
        }
        if let Some(r) = &remote {
            self.by_remote_key.insert(r.key.clone(), ino);
        }
        n.remote = remote;
    }

    fn alloc_ino(&mut self, batch: &mut Batch) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        batch.meta.push(("next_ino", self.next_ino));
        ino
    }

    fn persist(&self, ino: u64, batch: &mut Batch) -> FsResult<()> {
        if let Some(n) = self.inodes.get(&ino) {
            batch.inode(ino, n)?;
        }
        Ok(())
    }

    fn hide(&mut self, key: String) {
        *self.hidden.entry(key).or_default() += 1;
    }

    fn unhide(&mut self, key: &str) {
        if let Some(c) = self.hidden.get_mut(key) {
            *c -= 1;
            if *c == 0 {
                self.hidden.remove(key);
            }
        }
    }

    /// Folder keys that hold objects this mount is moving or deleting (pending or under
    /// way): a folder the bucket shows only because of them is on its way out, and a
    /// listing must not bring it back.
    fn vacating_folders(&self, prefix: &str) -> HashSet<String> {
        let mut keys: Vec<&str> = self.hidden.keys().map(String::as_str).collect();
        for &ino in self.queued_sync.keys().chain(self.uploading.iter()) {
            if let Some(r) = self.inodes.get(&ino).and_then(|n| n.remote.as_ref())
                && self.key_of(prefix, ino).ok().as_deref() != Some(r.key.as_str())
            {
                keys.push(&r.key);
            }
        }
        let mut out = HashSet::new();
        for k in keys {
            let mut k = k.trim_end_matches('/');
            while let Some(i) = k.rfind('/') {
                k = &k[..i];
                out.insert(k.to_string());
            }
        }
        out
    }

    fn is_hidden(&self, key: &str) -> bool {
        // Called for every listed key: skip the per-ancestor lookups when nothing is pending.
        if self.hidden.is_empty() {
            return false;
        }
        if self.hidden.contains_key(key) {
            return true;
        }
        let mut k = key;
        while let Some(i) = k.rfind('/') {
            k = &k[..i];
            if self.hidden.contains_key(&format!("{k}/")) {
                return true;
            }
        }
        self.hidden.contains_key(&format!("{key}/"))
    }

    fn push_op(&mut self, op: Op, delay: Duration, batch: &mut Batch) -> FsResult<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        batch.op(seq, &op)?;
        batch.meta.push(("next_seq", self.next_seq));
        self.register(seq, op, Instant::now() + delay);
        Ok(seq)
    }

    /// Puts an op in the in-memory queue, hiding what it removes from listings meanwhile.
    fn register(&mut self, seq: u64, op: Op, ready_at: Instant) {
        for k in hidden_keys(&op) {
            self.hide(k);
        }
        if let Op::Sync { ino } = op {
            self.queued_sync.insert(ino, seq);
        }
        self.queue.insert(seq, Queued { op, ready_at });
    }

    /// Marks an inode changed: queues its upload once, and pushes the upload back while it
    /// keeps changing (coalescing).
    fn touch(&mut self, ino: u64, delay: Duration, batch: &mut Batch) -> FsResult<()> {
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.generation += 1;
        }
        match self.queued_sync.get(&ino) {
            Some(seq) => {
                if let Some(q) = self.queue.get_mut(seq) {
                    q.ready_at = Instant::now() + delay;
                }
            }
            None => {
                self.push_op(Op::Sync { ino }, delay, batch)?;
            }
        }
        self.persist(ino, batch)
    }

    /// Like `touch`, but moves the inode's upload behind every op queued so far: a rename
    /// must not reach the bucket before the deletes that came before it.
    fn requeue(&mut self, ino: u64, delay: Duration, batch: &mut Batch) -> FsResult<()> {
        if let Some(seq) = self.queued_sync.remove(&ino) {
            self.queue.remove(&seq);
            batch.del_ops.push(seq);
        }
        self.touch(ino, delay, batch)
    }

    /// Schedules removal of whatever the bucket holds for a removed inode.
    fn drop_remote(
        &mut self,
        prefix: &str,
        node: &Inode,
        keep_key: Option<&str>,
        delay: Duration,
        batch: &mut Batch,
    ) -> FsResult<()> {
        for r in [&node.remote, &node.overwrites].into_iter().flatten() {
            if Some(r.key.as_str()) != keep_key {
                self.retire(prefix, r.clone(), delay, batch)?;
            }
        }
        Ok(())
    }

    /// An object of ours that no inode owns any more (its inode was deleted, or moved away
    /// from it): a newer file at the same path takes it over (and may overwrite it);
    /// otherwise it is deleted through the queue.
    fn retire(&mut self, prefix: &str, remote: Remote, delay: Duration, batch: &mut Batch) -> FsResult<()> {
        if let Some(ino) = self.ino_at_key(prefix, &remote.key) {
            let n = self.get_mut(ino)?;
            if n.kind != Kind::Dir && n.overwrites.is_none() && n.remote.as_ref().is_none_or(|r| r.key != remote.key) {
                n.overwrites = Some(remote);
                return self.persist(ino, batch);
            }
        }
        self.push_op(Op::Delete { remote }, delay, batch)?;
        Ok(())
    }

    /// Adds a conflict record to `batch` under the next sequence number.
    fn record_conflict(&mut self, record: ConflictRecord, batch: &mut Batch) -> FsResult<()> {
        let n = self.next_conflict;
        self.next_conflict += 1;
        batch.meta.push(("next_conflict", self.next_conflict));
        batch.conflict(n, &record)?;
        Ok(())
    }

    /// No local change of this inode is pending or in flight: the bucket's word is final.
    fn is_settled(&self, ino: u64) -> bool {
        self.inodes.get(&ino).is_some_and(|n| {
            !n.dirty
                && n.open == 0
                && n.overwrites.is_none()
                && !self.queued_sync.contains_key(&ino)
                && self.uploading != Some(ino)
        })
    }

    fn has_pending_below(&self, ino: u64) -> bool {
        if !self.is_settled(ino) {
            return true;
        }
        self.children.get(&ino).is_some_and(|c| c.values().any(|&k| self.has_pending_below(k)))
    }
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
        std::fs::create_dir_all(state_dir)?;
        let key = match &cfg.key {
            Some(k) => k.clone(),
            None => CacheKey::load(state_dir, None).map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?.0,
        };
        let db_path = state_dir.join("state.redb");
        // What went wrong at startup, for `status` as well as the log.
        let mut startup_error = None;
        let db = match StateDb::open(&db_path, &key) {
            Err(StateError::OtherKey { pending }) => {
                startup_error = Some(set_aside_unreadable(state_dir, cache_dir, pending)?);
                StateDb::open(&db_path, &key)?
            }
            other => other?,
        };
        let sealer = Arc::new(Sealer::new(&key));
        let loaded = db.load::<Inode, Op>()?;
        let meta: HashMap<String, u64> = loaded.meta.into_iter().collect();
        // Staged files live in a folder of this state dir's own, so two state dirs sharing
        // a cache dir never mix their inodes.
        let state_id = meta.get("state_id").copied().unwrap_or_else(rand::random);
        let staging = Staging::new(cache_dir, Arc::clone(&sealer), state_id)?;
        let writer_id = meta.get("writer_id").copied().unwrap_or_else(rand::random);
        let mut inner = Inner {
            inodes: HashMap::new(),
            children: HashMap::new(),
            by_remote_key: HashMap::new(),
            queue: BTreeMap::new(),
            queued_sync: HashMap::new(),
            hidden: HashMap::new(),
            next_ino: meta.get("next_ino").copied().unwrap_or(ROOT_INO + 1),
            next_seq: meta.get("next_seq").copied().unwrap_or(1),
            upload_epoch: 0,
            uploading: None,
            in_flight: HashSet::new(),
            warned: HashSet::new(),
            last_open: HashMap::new(),
            held: HashMap::new(),
            next_conflict: meta.get("next_conflict").copied().unwrap_or(1),
        };
        let mut batch = Batch::default();
        batch.meta.push(("state_id", state_id));
        batch.meta.push(("writer_id", writer_id));
        let mut nodes = loaded.inodes;
        if !nodes.iter().any(|n: &Inode| n.ino == ROOT_INO) {
            let mut root = Inode::new(ROOT_INO, ROOT_INO, String::new(), Kind::Dir, 0o755, cfg.uid, cfg.gid);
            root.attrs_known = true;
            batch.inode(ROOT_INO, &root)?;
            nodes.push(root);
        }
        for n in nodes {
            if n.ino == ROOT_INO {
                inner.children.entry(ROOT_INO).or_default();
                inner.inodes.insert(ROOT_INO, n);
            } else {
                inner.insert(n);
            }
        }
        // Inodes whose staging file vanished (cache wiped) or no longer opens (another key,
        // damage) fall back to the remote copy, reported in one line.
        let mut lost: Vec<(u64, String)> = Vec::new();
        let mut keep = HashSet::new();
        for n in inner.inodes.values().filter(|n| n.staged) {
            match staging.file(n.ino) {
                Ok(_) => {
                    keep.insert(n.ino);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => lost.push((n.ino, "missing".into())),
                Err(e) => lost.push((n.ino, e.to_string())),
            }
        }
        if !lost.is_empty() {
            let mut names: Vec<String> = Vec::new();
            for (ino, why) in &lost {
                if let Some(n) = inner.inodes.get_mut(ino) {
                    if names.len() < 5 {
                        names.push(format!("{} ({why})", n.name));
                    }
                    n.staged = false;
                    n.dirty = false;
                    n.size = n.remote.as_ref().map_or(0, |r| r.size);
                    batch.inode(*ino, n)?;
                }
            }
            let more = if lost.len() > names.len() {
                format!(" and {} more", lost.len() - names.len())
            } else {
                String::new()
            };
            let msg = format!(
                "{} file(s) with changes not yet uploaded cannot be opened in the cache dir's staging folder, so those changes are lost and the files show the bucket's copy: {}{more}",
                lost.len(),
                names.join(", ")
            );
            tracing::error!("{msg}");
            startup_error = Some(msg);
        }
        let stray = staging.remove_others(&keep);
        if stray > 0 {
            tracing::info!(stray, "removed staging files that no file of this mount refers to");
        }
        // Replayed changes wait the upload delay like new ones (a flush overrides it).
        let ready = Instant::now() + cfg.upload_delay;
        for (seq, op) in loaded.ops {
            inner.register(seq, op, ready);
        }
        // After a crash, the staged copy of a file with no change pending may hold writes
        // that no `fsync` or `close` acknowledged (and that will never upload): the bucket's
        // copy is the file's content. A clean stop leaves nothing unacknowledged.
        if meta.get("clean") != Some(&1) {
            let unacked: Vec<u64> = inner
                .inodes
                .values()
                .filter(|n| n.staged && !n.dirty && !inner.queued_sync.contains_key(&n.ino))
                .map(|n| n.ino)
                .collect();
            for ino in unacked {
                if let Some(n) = inner.inodes.get_mut(&ino) {
                    n.staged = false;
                    n.size = n.remote.as_ref().map_or(0, |r| r.size);
                    batch.inode(ino, n)?;
                    staging.remove(ino);
                }
            }
        }
        batch.meta.push(("clean", 0));
        db.commit(&batch, true)?;
        let pending = inner.queue.len();
        let (tx, _) = watch::channel(pending);
        if pending > 0 {
            tracing::info!(pending, "replaying journal: changes from an earlier run are still to upload");
        }
        let blocks = BlockReader::new(Arc::clone(&store), cfg.disk_cache.clone(), cfg.blocks);
        let evicted = Arc::new(Mutex::new(HashSet::new()));
        let listings = {
            let evicted = Arc::clone(&evicted);
            moka::sync::Cache::builder()
                .max_capacity(cfg.max_inodes)
                .weigher(|_, w: &u32| *w)
                .time_to_idle(LISTING_IDLE)
                .eviction_listener(move |dir: Arc<u64>, _, cause| {
                    if cause.was_evicted() {
                        lock(&evicted).insert(*dir);
                    }
                })
                .build()
        };
        Ok(Arc::new(Fs {
            listings,
            evicted,
            recheck: Mutex::new(HashSet::new()),
            out_of_space: std::sync::atomic::AtomicBool::new(false),
            invalidations: std::sync::OnceLock::new(),
            unreachable: Mutex::new(None),
            blocks,
            store,
            prefix: prefix.trim_matches('/').to_string(),
            cfg,
            caps,
            writer: format!("{writer_id:016x}"),
            db,
            staging,
            inner: Mutex::new(inner),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            fill_lock: tokio::sync::Mutex::new(()),
            counters: Mutex::new(Counters { last_error: startup_error, ..Counters::default() }),
            wake: Notify::new(),
            upload_done: Notify::new(),
            flush_kick: Notify::new(),
            raw_lister: std::sync::OnceLock::new(),
            pending: tx,
            urgent: AtomicU64::new(0),
        }))
    }

    fn commit(&self, inner: &Inner, batch: Batch, durable: bool) -> FsResult<()> {
        if let Some(why) = &lock(&self.counters).read_only {
            return Err(FsError::ReadOnly(why.clone()));
        }
        let written = || -> Result<(), StateError> {
            fail::fail_point!("journal-write-error", |_| Err(StateError::Db(redb::Error::Io(
                std::io::Error::from_raw_os_error(libc::EIO)
            ))));
            self.db.commit(&batch, durable)
        };
        if (!batch.is_empty() || durable)
            && let Err(e) = written()
        {
            // A journal that cannot be written must not pretend: stop taking writes.
            let why = format!("journal write failed: {e}");
            tracing::error!("{why}; the mount is now read-only");
            lock(&self.counters).read_only = Some(why);
            return Err(e.into());
        }
        self.pending.send_replace(inner.queue.len());
        self.wake.notify_one();
        Ok(())
    }

    // ---- metadata -------------------------------------------------------------------

    /// Lists a folder from the bucket and merges it with what is known locally.
    /// A listing failed: for [`UNREACHABLE_PAUSE`], folders listed before are answered from
    /// what is known without asking the bucket (each failed listing costs retries, or up to
    /// `--io-timeout`, and an outage would make every path step pay it).
    fn set_unreachable(&self, e: &FsError) {
        *lock(&self.unreachable) = Some((Instant::now() + UNREACHABLE_PAUSE, e.to_string()));
    }

    async fn refresh_dir(&self, ino: u64) -> FsResult<()> {
        let paused = lock(&self.unreachable).clone().filter(|(until, _)| Instant::now() < *until);
        if let Some((_, why)) = paused
            && lock(&self.inner).get(ino)?.listed
        {
            return Err(FsError::Unreachable(why));
        }
        // A listing taken while an upload landed may predate it: list again (a few times)
        // rather than let an old listing undo our own upload.
        let mut attempt = 0;
        let (listing, key, listed_epoch) = loop {
            let (key, epoch) = {
                let inner = lock(&self.inner);
                let n = inner.get(ino)?;
                if n.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                (inner.key_of(&self.prefix, ino)?, inner.upload_epoch)
            };
            let prefix = if key.is_empty() { None } else { Some(obj_path(&key)?) };
            let list = async {
                match self.store.list_with_delimiter(prefix.as_ref()).await {
                    Ok(l) => Ok(l),
                    // A key object_store cannot parse fails its whole listing: list raw, skip it.
                    Err(object_store::Error::InvalidPath { .. }) if self.raw_lister.get().is_some() => {
                        self.raw_listing(&key).await
                    }
                    // A folder that exists only locally (pending upload) lists as empty.
                    Err(object_store::Error::NotFound { .. }) => Ok(object_store::ListResult {
                        common_prefixes: vec![],
                        objects: vec![],
                        extensions: Default::default(),
                    }),
                    Err(e) => Err(e.into()),
                }
            };
            // An unresponsive bucket: give up after --io-timeout (nothing is changed before
            // the listing is in); lookups and creates then go on from what is known.
            let listing = match tokio::time::timeout(self.cfg.io_timeout, list).await {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    self.set_unreachable(&e);
                    return Err(e);
                }
                Err(_) => {
                    tracing::warn!(
                        folder = %key,
                        "a listing from the bucket took longer than --io-timeout ({:?})",
                        self.cfg.io_timeout
                    );
                    let e = FsError::TimedOut(self.cfg.io_timeout);
                    self.set_unreachable(&e);
                    return Err(e);
                }
            };
            *lock(&self.unreachable) = None;
            attempt += 1;
            let changed = lock(&self.inner).upload_epoch != epoch;
            if !changed || attempt >= 4 {
                break (listing, key, epoch);
            }
        };
        let mut new_files = Vec::new();
        // What the kernel may hold that changed: names gone, contents replaced, and whether
        // the folder's own listing changed.
        let mut inval = Vec::new();
        let mut names_changed = false;
        {
            let mut inner = lock(&self.inner);
            let mut batch = Batch::default();
            if inner.get(ino).is_err() {
                return Ok(());
            }
            // Checked under the lock that merges: an upload that landed after the listing
            // was taken makes it too old to delete or update anything.
            let epoch_changed = inner.upload_epoch != listed_epoch || inner.uploading.is_some();
            let mut seen: HashSet<String> = HashSet::new();
            let mut vacating: Option<HashSet<String>> = None;
            for p in &listing.common_prefixes {
                let Some(name) = p.filename().map(str::to_string) else { continue };
                let full = p.as_ref().to_string();
                if inner.in_flight.contains(&full) {
                    seen.insert(name); // a folder of ours being written right now
                    continue;
                }
                if !self.acceptable(&mut inner, &full, &name) {
                    continue;
                }
                // New here, and holding what we are moving or deleting: not a folder to
                // show (once those ops are done, a listing shows it if anything is left).
                if inner.child(ino, &name).is_none()
                    && vacating.get_or_insert_with(|| inner.vacating_folders(&self.prefix)).contains(&full)
                {
                    continue;
                }
                seen.insert(name.clone());
                match inner.child(ino, &name) {
                    Some(_) => {}
                    None => {
                        let c = inner.alloc_ino(&mut batch);
                        let mut n = Inode::new(c, ino, name, Kind::Dir, 0o755, self.cfg.uid, self.cfg.gid);
                        n.attrs_known = false;
                        names_changed = true;
                        n.remote = Some(Remote { key: full, etag: None, version: None, size: 0, modified: None });
                        inner.insert(n);
                        inner.persist(c, &mut batch)?;
                    }
                }
            }
            let prefixes: HashSet<&str> = listing.common_prefixes.iter().filter_map(|p| p.filename()).collect();
            for m in &listing.objects {
                let full = m.location.as_ref().to_string();
                if full == key {
                    continue; // an s3fs-style `dir/` marker of this folder itself
                }
                let Some(name) = m.location.filename().map(str::to_string) else { continue };
                if name == layout::FOLDER_MARKER {
                    if let Ok(n) = inner.get_mut(ino) {
                        n.attrs_known = n.attrs_known || n.ino == ROOT_INO;
                    }
                    continue;
                }
                if inner.in_flight.contains(&full) {
                    seen.insert(name); // ours, landing right now: the uploader records it
                    continue;
                }
                if !self.acceptable(&mut inner, &full, &name) {
                    continue;
                }
                if seen.contains(&name) {
                    continue; // a folder and a file of one name: the folder wins
                }
                seen.insert(name.clone());
                // A folder of ours that the bucket no longer has, where it now has a file.
                if let Some(c) = inner.child(ino, &name) {
                    let stale_dir = inner.get(c)?.kind == Kind::Dir
                        && !prefixes.contains(name.as_str())
                        && !epoch_changed
                        && inner.get(c)?.remote.is_some()
                        && !inner.has_pending_below(c);
                    if stale_dir {
                        self.remove_tree(&mut inner, c, &mut batch)?;
                        inval.push(Invalidation::Entry { parent: ino, name: name.clone() });
                        names_changed = true;
                    }
                }
                match inner.child(ino, &name) {
                    Some(c) => {
                        let clean = !epoch_changed && inner.is_settled(c) && inner.get(c)?.kind != Kind::Dir;
                        let n = inner.get(c)?;
                        let changed = n
                            .remote
                            .as_ref()
                            .is_none_or(|r| r.key != full || !etag_same(r.etag.as_deref(), m.e_tag.as_deref()));
                        // Same content, but maybe other attributes: a copy onto itself with new
                        // metadata (how s3fs and rclone chmod, chown or touch) keeps the ETag and
                        // moves Last-Modified. Without a Last-Modified on record (our own upload),
                        // the attributes are read once. `fetch_attrs` records the Last-Modified
                        // with what it read, so a failed read is tried again at the next listing.
                        let modified = Some(m.last_modified.timestamp());
                        let retouched = n.remote.as_ref().is_some_and(|r| r.modified != modified);
                        if clean && !changed && retouched {
                            new_files.push(c);
                        }
                        if clean && changed {
                            let n = inner.get_mut(c)?;
                            n.size = m.size;
                            n.mtime_ns = to_ns(SystemTime::from(m.last_modified));
                            n.attrs_known = false;
                            let was_staged = n.staged;
                            n.staged = false;
                            if was_staged {
                                self.staging.remove(c);
                            }
                            inner.set_remote(c, Some(remote_of(m)));
                            inner.persist(c, &mut batch)?;
                            new_files.push(c);
                            inval.push(Invalidation::Inode(c));
                        }
                    }
                    None => {
                        let c = inner.alloc_ino(&mut batch);
                        let mut n = Inode::new(c, ino, name, Kind::File, 0o644, self.cfg.uid, self.cfg.gid);
                        names_changed = true;
                        n.size = m.size;
                        n.mtime_ns = to_ns(SystemTime::from(m.last_modified));
                        n.ctime_ns = n.mtime_ns;
                        n.attrs_known = false;
                        n.remote = Some(remote_of(m));
                        inner.insert(n);
                        inner.persist(c, &mut batch)?;
                        new_files.push(c);
                    }
                }
            }
            // Local entries the bucket no longer has: deleted by someone else, unless they
            // are ours and still on their way up.
            if !epoch_changed {
                let local: Vec<(String, u64)> = inner
                    .children
                    .get(&ino)
                    .map(|c| c.iter().map(|(k, v)| (k.clone(), *v)).collect())
                    .unwrap_or_default();
                for (name, c) in local {
                    if seen.contains(&name) {
                        continue;
                    }
                    let n = inner.get(c)?;
                    // Only what still sits at the key it came from can have been deleted there.
                    let child_key = inner.key_of(&self.prefix, c)?;
                    // A key with a pending delete or move is missing on purpose.
                    let in_place =
                        n.remote.as_ref().is_some_and(|r| r.key == child_key) && !inner.is_hidden(&child_key);
                    let gone = in_place
                        && match n.kind {
                            Kind::Dir => !inner.has_pending_below(c),
                            _ => inner.is_settled(c),
                        };
                    if gone {
                        self.remove_tree(&mut inner, c, &mut batch)?;
                        inval.push(Invalidation::Entry { parent: ino, name });
                        names_changed = true;
                    }
                }
            }
            if let Ok(n) = inner.get_mut(ino) {
                n.listed_at = Some(Instant::now());
                if !n.listed {
                    n.listed = true;
                    inner.persist(ino, &mut batch)?;
                }
            }
            self.commit(&inner, batch, false)?;
        }
        if names_changed {
            inval.push(Invalidation::Inode(ino));
        }
        for what in inval {
            self.invalidate(what);
        }
        self.fetch_attrs(new_files).await;
        self.note_listing(ino);
        Ok(())
    }

    /// Where to send kernel cache invalidations from now on (once per mount).
    pub fn set_invalidations(&self, tx: std::sync::mpsc::Sender<Invalidation>) {
        let _ = self.invalidations.set(tx);
    }

    fn invalidate(&self, what: Invalidation) {
        if let Some(tx) = self.invalidations.get() {
            let _ = tx.send(what);
        }
    }

    /// Lists the folders in use again, every `poll_interval`, until `stop`: changes made
    /// in the bucket by others show without waiting for a lookup past the TTL, and the
    /// kernel's caches of what changed are dropped.
    pub async fn run_poller(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = self.cfg.poll_interval;
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            self.poll_once().await;
        }
    }

    /// One round of the poll: the folders in use that were listed before and not within
    /// the last half interval, at most [`POLL_FOLDERS`] of them: open folders and those
    /// holding open files first, then folders the kernel holds, or holds entries of.
    pub async fn poll_once(&self) -> usize {
        let open: Vec<(u64, bool)> = lock(&self.handles).values().map(|h| (h.ino, h.dir.is_some())).collect();
        let dirs: Vec<u64> = {
            let inner = lock(&self.inner);
            let busy = open
                .iter()
                .filter_map(|&(ino, dir)| if dir { Some(ino) } else { inner.get(ino).ok().map(|n| n.parent) });
            let held = inner.inodes.values().filter(|n| n.lookups > 0).flat_map(|n| {
                let own = (n.kind == Kind::Dir).then_some(n.ino);
                own.into_iter().chain(std::iter::once(n.parent))
            });
            let mut seen = HashSet::new();
            busy.chain(std::iter::once(ROOT_INO))
                .chain(held)
                .filter(|&d| seen.insert(d))
                .filter(|&d| {
                    inner.get(d).is_ok_and(|n| {
                        n.kind == Kind::Dir && n.listed && !n.is_listed_fresh(self.cfg.poll_interval / 2)
                    })
                })
                .take(POLL_FOLDERS)
                .collect()
        };
        let n = dirs.len();
        futures::stream::iter(dirs)
            .for_each_concurrent(4, |d| async move {
                if let Err(e) = self.refresh_dir(d).await {
                    tracing::debug!(dir = d, "poll: listing failed: {e}");
                }
            })
            .await;
        n
    }

    pub fn set_raw_lister(&self, lister: crate::store::s3list::SharedLister) {
        let _ = self.raw_lister.set(lister);
    }

    /// The raw listing of a folder, without the keys that cannot be paths (one warning each).
    async fn raw_listing(&self, key: &str) -> FsResult<object_store::ListResult> {
        let Some(lister) = self.raw_lister.get() else { return Err(FsError::Unsupported("raw listing")) };
        let prefix = if key.is_empty() { String::new() } else { format!("{key}/") };
        let raw = lister
            .list_dir(&prefix)
            .await
            .map_err(|e| FsError::Remote(object_store::Error::Generic { store: "S3", source: e.into() }))?;
        let mut out =
            object_store::ListResult { common_prefixes: vec![], objects: vec![], extensions: Default::default() };
        let mut skipped = Vec::new();
        for p in raw.prefixes {
            let folder = p.strip_suffix('/').unwrap_or(&p);
            // Path::parse would quietly drop a trailing slash: `a//` must not become `a`.
            let clean = !folder.is_empty() && folder.split('/').all(|part| !part.is_empty());
            match Path::parse(folder) {
                Ok(path) if clean => out.common_prefixes.push(path),
                _ => skipped.push(p),
            }
        }
        for o in raw.objects {
            match Path::parse(&o.key) {
                Ok(location) if !o.key.ends_with('/') || o.key == prefix => {
                    let last_modified = o
                        .last_modified
                        .as_deref()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .unwrap_or_else(chrono::Utc::now);
                    out.objects.push(ObjectMeta {
                        location,
                        last_modified,
                        size: o.size,
                        e_tag: o.etag,
                        version: None,
                    });
                }
                _ => skipped.push(o.key),
            }
        }
        let mut inner = lock(&self.inner);
        for k in skipped {
            if inner.warned.insert(k.clone()) {
                tracing::warn!(key = %k, "skipping object whose key cannot be a file name");
            }
        }
        Ok(out)
    }

    /// Lists everything under a folder (recursively, one paginated listing) and adds what
    /// is not known yet as inodes.
    async fn populate_tree(&self, ino: u64) -> FsResult<()> {
        let key = lock(&self.inner).key_of(&self.prefix, ino)?;
        let prefix = if key.is_empty() { None } else { Some(obj_path(&key)?) };
        let objects: Vec<ObjectMeta> = self.store.list(prefix.as_ref()).try_collect().await?;
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        for m in &objects {
            let full = m.location.as_ref();
            let Some(rel) =
                (if key.is_empty() { Some(full) } else { full.strip_prefix(&key).and_then(|r| r.strip_prefix('/')) })
            else {
                continue;
            };
            let parts: Vec<&str> = rel.split('/').collect();
            let mut dir = ino;
            let mut dir_key = key.clone();
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let part_key = layout::join_key(&dir_key, part);
                if last && (*part == layout::FOLDER_MARKER || inner.in_flight.contains(&part_key)) {
                    break;
                }
                if !self.acceptable(&mut inner, &part_key, part) {
                    break;
                }
                match inner.child(dir, part) {
                    Some(c) => {
                        if !last && inner.get(c)?.kind != Kind::Dir {
                            break;
                        }
                        dir = c;
                    }
                    None => {
                        let c = inner.alloc_ino(&mut batch);
                        let kind = if last { Kind::File } else { Kind::Dir };
                        let perm = if last { 0o644 } else { 0o755 };
                        let mut n = Inode::new(c, dir, part.to_string(), kind, perm, self.cfg.uid, self.cfg.gid);
                        n.attrs_known = false;
                        if last {
                            n.size = m.size;
                            n.mtime_ns = to_ns(SystemTime::from(m.last_modified));
                            n.remote = Some(remote_of(m));
                        } else {
                            n.remote = Some(Remote {
                                key: part_key.clone(),
                                etag: None,
                                version: None,
                                size: 0,
                                modified: None,
                            });
                        }
                        inner.insert(n);
                        inner.persist(c, &mut batch)?;
                        dir = c;
                    }
                }
                dir_key = part_key;
            }
        }
        self.commit(&inner, batch, false)
    }

    fn remove_tree(&self, inner: &mut Inner, ino: u64, batch: &mut Batch) -> FsResult<()> {
        let kids: Vec<u64> = inner.children.get(&ino).map(|c| c.values().copied().collect()).unwrap_or_default();
        for k in kids {
            self.remove_tree(inner, k, batch)?;
        }
        if let Some(n) = inner.remove(ino) {
            if n.staged {
                self.staging.remove(ino);
            }
            batch.del_inodes.push(ino);
        }
        Ok(())
    }

    /// Whether a listed key can appear in the mount (valid name, not hidden by a pending
    /// change, not owned by an inode that was renamed locally).
    fn acceptable(&self, inner: &mut Inner, full: &str, name: &str) -> bool {
        if layout::is_reserved(name) {
            return false;
        }
        if let Some(why) = layout::invalid_name(name) {
            if inner.warned.insert(full.to_string()) {
                tracing::warn!(key = full, "skipping object whose key cannot be a file name: {why}");
            }
            return false;
        }
        if inner.is_hidden(full) {
            return false;
        }
        if let Some(&owner) = inner.by_remote_key.get(full) {
            // Owned by an inode that now lives elsewhere: the old name is on its way out.
            if inner.key_of(&self.prefix, owner).ok().as_deref() != Some(full) {
                return false;
            }
        }
        true
    }

    /// Reads object metadata (mode, owner, mtime, symlink) for inodes known only from a
    /// listing. Failures leave the defaults.
    async fn fetch_attrs(&self, inos: Vec<u64>) {
        if inos.is_empty() {
            return;
        }
        let keys: Vec<(u64, String)> = {
            let inner = lock(&self.inner);
            inos.iter()
                .filter_map(|&i| {
                    let n = inner.get(i).ok()?;
                    let key = &n.remote.as_ref()?.key;
                    // A folder's attributes live on its marker object.
                    Some((i, if n.kind == Kind::Dir { layout::marker_key(key) } else { key.clone() }))
                })
                .collect()
        };
        // In chunks, each applied before the next is asked for: a folder of 100,000 new
        // files holds 1,024 answers at a time, not all of them.
        for chunk in keys.chunks(1024) {
            let results: Vec<_> = futures::stream::iter(chunk.iter().cloned())
                .map(|(ino, key)| async move {
                    let Ok(path) = obj_path(&key) else { return (ino, None) };
                    let opts = GetOptions { head: true, ..Default::default() };
                    // Keep the answer, not its body: on the local store that is an open file.
                    let head = tokio::time::timeout(self.cfg.io_timeout, self.store.get_opts(&path, opts)).await;
                    (ino, head.ok().and_then(|r| r.ok()).map(Head::from))
                })
                .buffer_unordered(32)
                .collect()
                .await;
            self.apply_heads(results).await;
        }
    }

    /// Applies the attributes of HEAD answers (`None`: no object) to their inodes, if the
    /// inodes still hold the version answered for and have no local change.
    async fn apply_heads(&self, results: Vec<(u64, Option<Head>)>) {
        let mut symlinks = Vec::new();
        {
            let mut inner = lock(&self.inner);
            let mut batch = Batch::default();
            for (ino, r) in results {
                let Some(r) = r else {
                    // A folder without our marker (another tool's bucket): keep the defaults
                    // instead of asking again at every lookup.
                    if let Ok(n) = inner.get_mut(ino)
                        && n.kind == Kind::Dir
                    {
                        n.attrs_known = true;
                    }
                    continue;
                };
                let Ok(n) = inner.get_mut(ino) else { continue };
                let current = n.kind == Kind::Dir
                    || n.remote.as_ref().is_some_and(|rem| etag_same(rem.etag.as_deref(), r.meta.e_tag.as_deref()));
                if n.dirty || !current {
                    continue;
                }
                let (attrs, _) = PosixAttrs::from_attributes(&r.attributes);
                if attrs.mtime.is_none() && n.kind != Kind::Dir {
                    // Another tool's object: its mtime is the object's Last-Modified.
                    n.mtime_ns = to_ns(SystemTime::from(r.meta.last_modified));
                }
                self.apply_posix(n, attrs);
                if n.kind != Kind::Dir
                    && let Some(rem) = n.remote.as_mut()
                {
                    // What the attributes were read at, and the generation the store gives
                    // this version now (a copy onto itself changes it on GCS).
                    rem.modified = Some(r.meta.last_modified.timestamp());
                    if r.meta.version.is_some() {
                        rem.version = r.meta.version.clone();
                    }
                }
                if n.kind == Kind::Symlink && n.target.is_none() {
                    symlinks.push(ino);
                }
                let _ = inner.persist(ino, &mut batch);
            }
            let _ = self.commit(&inner, batch, false);
        }
        for ino in symlinks {
            let _ = self.load_symlink(ino).await;
        }
    }

    fn apply_posix(&self, n: &mut Inode, a: PosixAttrs) {
        if let Some(mode) = a.mode {
            n.perm = (mode & 0o7777) as u16;
            if n.kind != Kind::Dir {
                n.kind = if a.is_symlink() { Kind::Symlink } else { Kind::File };
            }
        }
        if let Some(u) = a.uid {
            n.uid = u;
        }
        if let Some(g) = a.gid {
            n.gid = g;
        }
        if let Some(t) = a.mtime {
            // Keep sub-second precision when the seconds agree.
            if n.mtime_ns.div_euclid(1_000_000_000) != t {
                n.mtime_ns = t.saturating_mul(1_000_000_000);
            }
        }
        n.attrs_known = true;
    }

    async fn load_symlink(&self, ino: u64) -> FsResult<String> {
        let key = {
            let inner = lock(&self.inner);
            let n = inner.get(ino)?;
            if let Some(t) = &n.target {
                return Ok(t.clone());
            }
            n.remote.as_ref().ok_or(FsError::NotFound)?.key.clone()
        };
        let bytes = self.store.get(&obj_path(&key)?).await?.bytes().await?;
        let target = String::from_utf8_lossy(&bytes).into_owned();
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        let n = inner.get_mut(ino)?;
        n.target = Some(target.clone());
        n.size = target.len() as u64;
        inner.persist(ino, &mut batch)?;
        self.commit(&inner, batch, false)?;
        Ok(target)
    }

    /// Whether a folder's listing is recent enough to answer from (ENOTDIR for a file).
    fn listing_fresh(&self, dir: u64) -> FsResult<bool> {
        let inner = lock(&self.inner);
        let n = inner.get(dir)?;
        if n.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(n.is_listed_fresh(self.cfg.metadata_ttl))
    }

    /// The kernel's lookup: [`Fs::find`], and the entry counts as held by the kernel until
    /// it forgets it.
    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let a = self.find(parent, name).await?;
        self.entries_replied(&[a.ino]);
        Ok(a)
    }

    /// The kernel holds these entries (replied by `lookup` or `readdirplus`).
    pub fn entries_replied(&self, inos: &[u64]) {
        let mut inner = lock(&self.inner);
        for &ino in inos {
            let Ok(n) = inner.get_mut(ino) else { continue };
            n.lookups += 1;
            let (first, parent) = (n.lookups == 1, n.parent);
            if first && let Some(h) = inner.held.get_mut(&parent) {
                *h += 1;
            }
        }
    }

    /// The kernel forgot `n` lookups of `ino`. Once it holds none, the inode may leave
    /// memory with its folder's listing: the folder becomes a candidate again.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut inner = lock(&self.inner);
        let Ok(node) = inner.get_mut(ino) else { return };
        let was = node.lookups;
        node.lookups = node.lookups.saturating_sub(n);
        if was == 0 || node.lookups > 0 {
            return;
        }
        let parent = node.parent;
        let now = match inner.held.get_mut(&parent) {
            Some(h) => {
                *h = h.saturating_sub(1);
                *h
            }
            None => 0,
        };
        if now == 0 && parent != 0 {
            drop(inner);
            lock(&self.recheck).insert(parent);
        }
    }

    /// Records (or refreshes) a folder's listing in `listings`, weighed by its entries.
    fn note_listing(&self, dir: u64) {
        let weight = lock(&self.inner).children.get(&dir).map_or(0, |c| c.len());
        self.listings.insert(dir, u32::try_from(weight.max(1)).unwrap_or(u32::MAX));
    }

    /// Drops from memory (and the state database) the entries of the folders that moka
    /// evicted, where nothing is held: no entry the kernel holds, no local change, no
    /// open handle, no listing still in memory below it, and the listing older than the TTL.
    /// A folder too young or open is tried again later; one with entries still held
    /// stays as it is until its next listing, or until the kernel forgets one of them.
    /// Runs at the start of lookups, opendir and forgets, never between a listing and
    /// its use.
    pub fn evict_listings(&self) {
        // Folders whose last held entry was forgotten: back into the LRU, where the bound
        // may push them (or others) out.
        let recheck = std::mem::take(&mut *lock(&self.recheck));
        for dir in recheck {
            if self.listings.get(&dir).is_none() {
                self.note_listing(dir);
            }
        }
        self.listings.run_pending_tasks();
        let dirs = std::mem::take(&mut *lock(&self.evicted));
        if dirs.is_empty() {
            return;
        }
        let mut later = Vec::new();
        let mut dropped = 0usize;
        let open_dirs: HashSet<u64> = lock(&self.handles).values().map(|h| h.ino).collect();
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        for dir in dirs {
            let Ok(d) = inner.get(dir) else { continue };
            if d.kind != Kind::Dir {
                continue;
            }
            // A listing within its TTL stays: a folder larger than the bound is not listed
            // again for every lookup of a first `ls -l`.
            if open_dirs.contains(&dir) || d.is_listed_fresh(self.cfg.metadata_ttl.max(self.cfg.listing_min_age)) {
                later.push(dir);
                continue;
            }
            if inner.held_in(dir) > 0 {
                tracing::debug!(dir, "listing evicted from memory's LRU, but entries are held");
                continue;
            }
            let kids: Vec<u64> = inner.children.get(&dir).map(|c| c.values().copied().collect()).unwrap_or_default();
            // None is held by the kernel (counted above); none is busy here.
            let idle = |inner: &Inner, c: u64| {
                inner.get(c).is_ok_and(|n| n.writing == 0)
                    && inner.is_settled(c)
                    && inner.children.get(&c).is_none_or(|g| g.is_empty())
                    && !open_dirs.contains(&c)
            };
            if kids.is_empty() || !kids.iter().all(|&c| idle(&inner, c)) {
                tracing::debug!(dir, entries = kids.len(), "listing evicted from memory's LRU, but entries are in use");
                continue;
            }
            tracing::debug!(dir, entries = kids.len(), "listing leaves memory");
            dropped += kids.len();
            for c in kids {
                if let Some(n) = inner.remove(c)
                    && n.staged
                {
                    self.staging.remove(c);
                }
                batch.del_inodes.push(c);
            }
            if let Ok(d) = inner.get_mut(dir) {
                d.listed_at = None;
                d.listed = false;
            }
            let _ = inner.persist(dir, &mut batch);
        }
        let _ = self.commit(&inner, batch, false);
        drop(inner);
        lock(&self.evicted).extend(later);
        if dropped >= 10_000 {
            // The allocator keeps freed memory for reuse; hand a large release back.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free memory; no pointer is touched.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Finds `name` in `parent`, listing the folder from the bucket when its listing is
    /// older than the TTL.
    pub async fn find(&self, parent: u64, name: &str) -> FsResult<Attr> {
        self.evict_listings();
        if name.len() > 255 {
            return Err(FsError::NameTooLong);
        }
        if layout::is_reserved(name) {
            return Err(FsError::NotFound);
        }
        let fresh = self.listing_fresh(parent)?;
        // Recently used, for the listings' LRU order.
        let _ = self.listings.get(&parent);
        // Past the TTL, ask the bucket again: names and versions may have changed there.
        if !fresh && let Err(e) = self.refresh_dir(parent).await {
            // Unreachable bucket: answer from what we know, fail only what we don't.
            let inner = lock(&self.inner);
            if inner.child(parent, name).is_none() && !inner.get(parent)?.listed {
                return Err(e);
            }
            tracing::debug!("lookup of {name}: listing failed, using the local entry: {e}");
        }
        let ino = lock(&self.inner).child(parent, name).ok_or(FsError::NotFound)?;
        self.ensure_attrs(ino).await;
        Ok(lock(&self.inner).get(ino)?.attr())
    }

    async fn ensure_attrs(&self, ino: u64) {
        let (known, symlink_unloaded) = {
            let inner = lock(&self.inner);
            match inner.get(ino) {
                Ok(n) => (n.attrs_known, n.kind == Kind::Symlink && n.target.is_none()),
                Err(_) => return,
            }
        };
        if !known {
            self.fetch_attrs(vec![ino]).await;
        } else if symlink_unloaded {
            let _ = self.load_symlink(ino).await;
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(lock(&self.inner).get(ino)?.attr())
    }

    pub async fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        if let Some(size) = set.size {
            let kind = lock(&self.inner).get(ino)?.kind;
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let file = if size == 0 { self.restage_empty(ino)? } else { self.ensure_staged(ino).await? };
            // Counted like a write, so an upload snapshot never straddles it.
            {
                let mut inner = lock(&self.inner);
                let n = inner.get_mut(ino)?;
                n.generation += 1;
                n.writing += 1;
            }
            let resized = file.set_len(size);
            if let Ok(n) = lock(&self.inner).get_mut(ino) {
                n.writing = n.writing.saturating_sub(1);
            }
            resized?;
            file.sync_data()?;
            self.staging.sync_dir()?;
        }
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        let n = inner.get_mut(ino)?;
        if let Some(size) = set.size {
            n.size = size;
            n.mtime_ns = now_ns();
        }
        if let Some(mode) = set.mode {
            n.perm = (mode & 0o7777) as u16;
        }
        if let Some(u) = set.uid {
            n.uid = u;
        }
        if let Some(g) = set.gid {
            n.gid = g;
        }
        if let Some(t) = set.mtime {
            n.mtime_ns = to_ns(t);
        }
        n.ctime_ns = now_ns();
        if n.ino != ROOT_INO {
            n.dirty = true;
            inner.touch(ino, self.cfg.upload_delay, &mut batch)?;
        } else {
            inner.persist(ino, &mut batch)?;
        }
        let attr = inner.get(ino)?.attr();
        // Truncation is a content change that close() may never follow: make it durable.
        self.commit(&inner, batch, set.size.is_some())?;
        Ok(attr)
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let kind = lock(&self.inner).get(ino)?.kind;
        if kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        self.load_symlink(ino).await
    }

    /// Checks for mkdir, create and symlink: the name is valid and free in the bucket too.
    async fn prepare_new(&self, parent: u64, name: &str) -> FsResult<()> {
        check_name(name, self.cfg.max_name_len)?;
        // Make sure the name is free in the bucket too, not only in what we have seen.
        let fresh = self.listing_fresh(parent)?;
        if !fresh && let Err(e) = self.refresh_dir(parent).await {
            // Offline: go ahead; the upload is conditional and settles a clash later.
            tracing::debug!("creating {name} without checking the bucket: {e}");
        }
        let inner = lock(&self.inner);
        let p = inner.get(parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if inner.child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_node(
        &self,
        parent: u64,
        name: &str,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
        target: Option<String>,
    ) -> FsResult<Attr> {
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        if inner.get(parent)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if inner.child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let ino = inner.alloc_ino(&mut batch);
        let mut n = Inode::new(ino, parent, name.to_string(), kind, perm, uid, gid);
        n.dirty = true;
        // The kernel gets an entry for it.
        n.lookups = 1;
        match kind {
            Kind::Dir => {
                n.listed_at = Some(Instant::now());
                n.listed = true;
            }
            Kind::Symlink => {
                n.size = target.as_ref().map_or(0, |t| t.len() as u64);
                n.target = target;
            }
            Kind::File => {
                self.staging.create_empty(ino)?;
                n.staged = true;
            }
        }
        inner.insert(n);
        if let Ok(p) = inner.get_mut(parent) {
            p.mtime_ns = now_ns();
            p.ctime_ns = p.mtime_ns;
        }
        inner.touch(ino, self.cfg.upload_delay, &mut batch)?;
        let attr = inner.get(ino)?.attr();
        self.commit(&inner, batch, false)?;
        Ok(attr)
    }

    pub async fn mkdir(&self, parent: u64, name: &str, mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.prepare_new(parent, name).await?;
        self.add_node(parent, name, Kind::Dir, (mode & 0o7777) as u16, uid, gid, None)
    }

    pub async fn symlink(&self, parent: u64, name: &str, target: &str, uid: u32, gid: u32) -> FsResult<Attr> {
        self.prepare_new(parent, name).await?;
        self.add_node(parent, name, Kind::Symlink, 0o777, uid, gid, Some(target.to_string()))
    }

    pub async fn create(&self, parent: u64, name: &str, mode: u32, uid: u32, gid: u32) -> FsResult<(Attr, u64)> {
        self.prepare_new(parent, name).await?;
        let attr = self.add_node(parent, name, Kind::File, (mode & 0o7777) as u16, uid, gid, None)?;
        let fh = self.new_handle(attr.ino);
        // A fresh file is written by whoever created it: make the upload wait for close.
        Ok((attr, fh))
    }

    /// Looks a name up, listing the folder when it is not known yet.
    async fn resolve(&self, parent: u64, name: &str) -> FsResult<u64> {
        if let Some(i) = lock(&self.inner).child(parent, name) {
            return Ok(i);
        }
        self.find(parent, name).await.map(|a| a.ino)
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let ino = self.resolve(parent, name).await?;
        let (open, staged, kind) = {
            let inner = lock(&self.inner);
            let n = inner.get(ino)?;
            (n.open, n.staged, n.kind)
        };
        if open > 0 && !staged && kind == Kind::File {
            // Still open: keep the content readable after the object is gone.
            self.ensure_staged(ino).await?;
        }
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        let n = inner.get(ino)?;
        if n.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let node = n.clone();
        inner.drop_remote(&self.prefix, &node, None, self.cfg.upload_delay, &mut batch)?;
        if node.open > 0 {
            // Still open: keep the inode (and its staging) until the last release.
            inner.detach(ino);
            inner.set_remote(ino, None);
            if let Ok(n) = inner.get_mut(ino) {
                n.overwrites = None;
                n.dirty = false;
                n.parent = 0;
            }
            inner.queued_sync.remove(&ino);
            batch.del_inodes.push(ino);
        } else {
            self.remove_tree(&mut inner, ino, &mut batch)?;
            inner.queued_sync.remove(&ino);
        }
        if let Ok(p) = inner.get_mut(parent) {
            p.mtime_ns = now_ns();
        }
        self.commit(&inner, batch, false)
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        let ino = self.resolve(parent, name).await?;
        if lock(&self.inner).get(ino)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        // The bucket may hold files we have not listed yet.
        self.refresh_dir(ino).await?;
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        if inner.children.get(&ino).is_some_and(|c| !c.is_empty()) {
            return Err(FsError::NotEmpty);
        }
        let key = inner.key_of(&self.prefix, ino)?;
        // Even a folder never uploaded may sit on a marker it took over by a rename.
        let marker = Remote { key: layout::marker_key(&key), etag: None, version: None, size: 0, modified: None };
        inner.push_op(Op::Delete { remote: marker }, self.cfg.upload_delay, &mut batch)?;
        inner.queued_sync.remove(&ino);
        self.remove_tree(&mut inner, ino, &mut batch)?;
        self.commit(&inner, batch, false)
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
    ) -> FsResult<()> {
        check_name(newname, self.cfg.max_name_len)?;
        let ino = self.resolve(parent, name).await?;
        let target = match self.resolve(newparent, newname).await {
            Ok(t) => Some(t),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if target == Some(ino) {
            return Ok(());
        }
        let is_dir = lock(&self.inner).get(ino)?.kind == Kind::Dir;
        if let Some(t) = target {
            if noreplace {
                return Err(FsError::Exists);
            }
            // The object the target is uploading right now is what we replace: let it land.
            self.wait_not_uploading(t).await;
            let tkind = lock(&self.inner).get(t)?.kind;
            match (is_dir, tkind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    self.refresh_dir(t).await?;
                    if lock(&self.inner).children.get(&t).is_some_and(|c| !c.is_empty()) {
                        return Err(FsError::NotEmpty);
                    }
                }
                (false, false) => {}
            }
        }
        if is_dir {
            // Moving a folder moves every object under it: know them all first, so the
            // folder reads complete at its new name while the move is uploading.
            if let Err(e) = self.populate_tree(ino).await
                && lock(&self.inner).get(ino)?.remote.is_some()
            {
                return Err(e);
            }
        }
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        if inner.get(newparent)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        // Re-check under the lock: the target may have changed while we listed.
        if inner.child(newparent, newname) != target {
            return Err(FsError::Exists);
        }
        let old_key = inner.key_of(&self.prefix, ino)?;
        let delay = self.cfg.upload_delay;
        // A file leaving a path it had taken over leaves that object behind: delete it.
        if let Some(prev) = inner.get_mut(ino)?.overwrites.take() {
            inner.push_op(Op::Delete { remote: prev }, delay, &mut batch)?;
        }
        if let Some(t) = target {
            let tnode = inner.get(t)?.clone();
            let new_key = inner.key_of(&self.prefix, t)?;
            if is_dir {
                // The empty target's marker stays: the moved folder needs one at that key.
                inner.drop_remote(&self.prefix, &tnode, Some(new_key.as_str()), delay, &mut batch)?;
            } else {
                // The moved file takes over the target's object: it may overwrite that version.
                let takeover =
                    [&tnode.remote, &tnode.overwrites].into_iter().flatten().find(|r| r.key == new_key).cloned();
                inner.drop_remote(&self.prefix, &tnode, Some(new_key.as_str()), delay, &mut batch)?;
                if let Some(r) = takeover {
                    inner.get_mut(ino)?.overwrites = Some(r);
                }
            }
            inner.queued_sync.remove(&t);
            self.remove_tree(&mut inner, t, &mut batch)?;
        }
        inner.detach(ino);
        {
            let n = inner.get_mut(ino)?;
            n.parent = newparent;
            n.name = newname.to_string();
            n.ctime_ns = now_ns();
        }
        inner.held.remove(&newparent);
        inner.children.entry(newparent).or_default().insert(newname.to_string(), ino);
        for p in [parent, newparent] {
            if let Ok(p) = inner.get_mut(p) {
                p.mtime_ns = now_ns();
            }
        }
        // Every object under a moved folder moves by itself, through the same conditional
        // path as any other change: folder first (its marker), then what is inside.
        let mut moved = vec![ino];
        let mut i = 0;
        while i < moved.len() {
            if let Some(c) = inner.children.get(&moved[i]) {
                moved.extend(c.values().copied());
            }
            i += 1;
        }
        for m in moved {
            inner.requeue(m, delay, &mut batch)?;
        }
        if is_dir {
            inner.push_op(Op::FolderMoved { from: old_key }, delay, &mut batch)?;
        }
        self.commit(&inner, batch, false)
    }

    /// Waits (bounded) until the uploader is not in the middle of uploading `ino`.
    async fn wait_not_uploading(&self, ino: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.upload_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.inner).uploading != Some(ino) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    // ---- file contents --------------------------------------------------------------

    fn new_handle(&self, ino: u64) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Handle { ino, wrote: false, readahead: Readahead::default(), dir: None });
        if let Ok(n) = lock(&self.inner).get_mut(ino) {
            n.open += 1;
        }
        fh
    }

    /// Opens a file. Returns the handle and whether the kernel may keep its page cache.
    pub async fn open(&self, ino: u64) -> FsResult<(u64, bool)> {
        let n = lock(&self.inner).get(ino)?.clone();
        if n.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        self.revalidate(ino).await;
        if !lock(&self.inner).get(ino)?.attrs_known {
            self.fetch_attrs(vec![ino]).await;
        }
        // The kernel keeps the file's cached pages (FOPEN_KEEP_CACHE) when its content is
        // what it was at the last open here; otherwise it drops them. Decided and counted
        // open under one lock, so no new version can slip in between. Without an ETag or
        // version the content cannot be told apart: never kept.
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let keep = {
            let mut inner = lock(&self.inner);
            let n = inner.get_mut(ino)?;
            n.open += 1;
            let version = n.remote.as_ref().and_then(|r| blocks::version_of(r).map(String::from));
            let known = version.is_some() || n.staged;
            let id: ContentId = (version, n.size, n.generation, n.staged);
            inner.last_open.insert(ino, id.clone()) == Some(id) && known
        };
        lock(&self.handles).insert(fh, Handle { ino, wrote: false, readahead: Readahead::default(), dir: None });
        Ok((fh, keep))
    }

    /// Close-to-open: once the folder's listing is older than the TTL, an unchanged local
    /// copy is checked against the bucket (one HEAD) and follows a newer remote version.
    /// A file with local changes keeps them; the upload settles any clash.
    async fn revalidate(&self, ino: u64) {
        let remote = {
            let inner = lock(&self.inner);
            let Ok(n) = inner.get(ino) else { return };
            let fresh = inner.get(n.parent).is_ok_and(|p| p.is_listed_fresh(self.cfg.metadata_ttl));
            match &n.remote {
                Some(r) if !fresh && inner.is_settled(ino) => r.clone(),
                _ => return,
            }
        };
        let Ok(path) = obj_path(&remote.key) else { return };
        let opts = GetOptions { head: true, ..Default::default() };
        // An unresponsive bucket: open with what is known, after --io-timeout at most.
        let head = tokio::time::timeout(self.cfg.io_timeout, self.store.get_opts(&path, opts)).await;
        let Ok(Ok(head)) = head else { return };
        let meta = head.meta.clone();
        if etag_same(remote.etag.as_deref(), meta.e_tag.as_deref()) {
            // Only the attributes may have changed (see `refresh_dir`); the content stays,
            // and the attributes come with this same answer.
            if remote.modified.is_some_and(|t| t != meta.last_modified.timestamp()) {
                self.apply_heads(vec![(ino, Some(Head::from(head)))]).await;
            }
            return;
        }
        let mut inner = lock(&self.inner);
        let mut batch = Batch::default();
        if !inner.is_settled(ino) || inner.get(ino).ok().and_then(|n| n.remote.as_ref()) != Some(&remote) {
            return;
        }
        if let Ok(n) = inner.get_mut(ino) {
            n.size = meta.size;
            n.mtime_ns = to_ns(SystemTime::from(meta.last_modified));
            n.attrs_known = false;
            if n.staged {
                n.staged = false;
                self.staging.remove(ino);
            }
        }
        inner.set_remote(ino, Some(remote_of(&meta)));
        let _ = inner.persist(ino, &mut batch);
        let _ = self.commit(&inner, batch, false);
        drop(inner);
        self.invalidate(Invalidation::Inode(ino));
    }

    fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        lock(&self.handles).get(&fh).map(|h| h.ino).ok_or(FsError::BadHandle)
    }

    /// Replaces the staging file with an empty one (truncate to zero needs no download).
    fn restage_empty(&self, ino: u64) -> FsResult<Arc<SealedFile>> {
        let mut inner = lock(&self.inner);
        let n = inner.get_mut(ino)?;
        if n.staged {
            return Ok(self.staging.file(ino)?);
        }
        let f = self.staging.create_empty(ino)?;
        n.staged = true;
        Ok(f)
    }

    /// Makes sure the file's content is in staging, downloading the remote copy once.
    async fn ensure_staged(&self, ino: u64) -> FsResult<Arc<SealedFile>> {
        if lock(&self.inner).get(ino)?.staged {
            return Ok(self.staging.file(ino)?);
        }
        let _fill = self.fill_lock.lock().await;
        let remote = {
            let inner = lock(&self.inner);
            let n = inner.get(ino)?;
            if n.staged {
                return Ok(self.staging.file(ino)?);
            }
            n.remote.clone()
        };
        let (tmp, file) = self.staging.temp(&format!("fill-{ino}"))?;
        if let Some(r) = &remote
            && r.size > 0
        {
            let opts = GetOptions { if_match: r.etag.clone(), ..Default::default() };
            let path = obj_path(&r.key)?;
            // The answer is bounded by --io-timeout; the body of a big file may take longer.
            let res = self.bounded(async { self.store.get_opts(&path, opts).await.map_err(stale) }).await?;
            let mut out = BlockWriter::new(&file);
            let mut stream = res.into_stream();
            // A file the merge policy covers keeps the version its edits start from in the
            // block cache: the base of a merge, should the bucket's version move meanwhile.
            let merges =
                r.size <= upload::MERGE_MAX && self.cfg.conflict.for_path(&self.rel_path(&r.key)).0 == Policy::Merge;
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
                self.blocks.keep_whole(r, base.freeze()).await;
            }
        }
        let mut inner = lock(&self.inner);
        let n = inner.get_mut(ino)?;
        let f = self.staging.install(ino, &tmp, file)?;
        n.staged = true;
        Ok(f)
    }

    /// Room for `grow` more staged bytes, within `--staging-size` and with the cache dir's
    /// disk keeping a reserve (for the journal, and for rewrites, which go to a block's
    /// other slot). Short of it, copies of files already in the bucket leave staging; if
    /// that is not enough, ENOSPC, and nothing staged is touched.
    fn make_room(&self, grow: u64) -> FsResult<()> {
        let short = |recount: bool| -> Option<String> {
            if let Some(limit) = self.cfg.staging_limit {
                let used = self.staging.used(recount);
                if used.saturating_add(grow) > limit {
                    return Some(format!("staging holds {used} bytes of its --staging-size {limit}"));
                }
            }
            let (free, total) = self.staging.disk_space()?;
            let reserve = (total / 16).min(64 << 20);
            (free < grow.saturating_add(reserve))
                .then(|| format!("the cache dir's disk has {free} bytes free and keeps {reserve} in reserve"))
        };
        if short(false).is_some() {
            let freed = self.drop_clean_copies();
            if let Some(why) = short(true) {
                if !self.out_of_space.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "writes get ENOSPC: {why}; they resume once uploads finish (their local copies can then go) or files are removed"
                    );
                }
                return Err(FsError::NoSpace(why));
            }
            tracing::info!(freed, "made room in staging: local copies of files already in the bucket left it");
        }
        if self.out_of_space.swap(false, Ordering::SeqCst) {
            tracing::info!("there is room for staged changes again");
        }
        self.staging.grow(grow);
        Ok(())
    }

    /// Drops the staged copies of files whose content is in the bucket as it is (no local
    /// change, nothing open): their reads go to the bucket and the block cache. Returns
    /// the bytes freed.
    pub(super) fn drop_clean_copies(&self) -> u64 {
        let mut inner = lock(&self.inner);
        let clean: Vec<u64> = inner
            .inodes
            .values()
            .filter(|n| n.staged && n.remote.as_ref().is_some_and(|r| r.size == n.size))
            .map(|n| n.ino)
            .filter(|&ino| inner.is_settled(ino))
            .collect();
        let mut batch = Batch::default();
        let mut freed = 0;
        for ino in clean {
            if let Ok(n) = inner.get_mut(ino) {
                n.staged = false;
                freed += n.size;
                self.staging.remove(ino);
                let _ = inner.persist(ino, &mut batch);
            }
        }
        let _ = self.commit(&inner, batch, false);
        freed
    }

    /// `fut`, or [`FsError::TimedOut`] (EIO) once `--io-timeout` passed without it: a
    /// read of data that is not cached never hangs on an unresponsive bucket.
    async fn bounded<T>(&self, fut: impl std::future::Future<Output = FsResult<T>>) -> FsResult<T> {
        match tokio::time::timeout(self.cfg.io_timeout, fut).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("a read from the bucket took longer than --io-timeout ({:?}): EIO", self.cfg.io_timeout);
                Err(FsError::TimedOut(self.cfg.io_timeout))
            }
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let ino = self.handle_ino(fh)?;
        let (staged, file_size, remote, kind) = {
            let inner = lock(&self.inner);
            let n = inner.get(ino)?;
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
            let f = self.staging.file(ino)?;
            let mut buf = vec![0u8; len];
            let mut done = 0;
            while done < len {
                let n = f.read_at(&mut buf[done..], offset + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            buf.truncate(done);
            return Ok(buf.into());
        }
        let Some(mut remote) = remote else { return Ok(Bytes::from(vec![0u8; len])) };
        let range = offset..offset + len as u64;
        let blocks = &self.blocks;
        blocks.reads.fetch_add(1, Ordering::Relaxed);
        let ahead = {
            let mut handles = lock(&self.handles);
            let h = handles.get_mut(&fh).ok_or(FsError::BadHandle)?;
            h.readahead.advance(range.clone(), blocks.cfg.block_size, blocks.cfg.readahead_max)
        };
        let span = blocks.span(range.clone());
        if ahead > 0 {
            let ahead_end = range.end.saturating_add(ahead).min(remote.size);
            blocks.prefetch(&remote, span.end..blocks.span(range.start..ahead_end).end);
        }
        // A read within one block is answered with a slice of it, without a copy.
        let single = span.end - span.start == 1;
        let mut out = Vec::with_capacity(if single { 0 } else { len });
        for index in span {
            let b = match self.bounded(blocks.block(&remote, index)).await {
                // The uploader moved the object meanwhile: read it where it is now.
                Err(e) if e.is_gone() => {
                    let now = lock(&self.inner).get(ino)?.remote.clone();
                    match now {
                        Some(now) if now != remote => {
                            let b = self.bounded(blocks.block(&now, index)).await?;
                            remote = now;
                            b
                        }
                        _ => return Err(e),
                    }
                }
                other => other?,
            };
            let block_start = index * blocks.cfg.block_size;
            let from = (range.start.max(block_start) - block_start) as usize;
            let to = ((range.end - block_start) as usize).min(b.len());
            if from >= to {
                break;
            }
            if single {
                return Ok(b.slice(from..to));
            }
            out.extend_from_slice(&b[from..to]);
        }
        Ok(out.into())
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let ino = self.handle_ino(fh)?;
        // Refuse before downloading anything into staging.
        if let Some(why) = &lock(&self.counters).read_only {
            return Err(FsError::ReadOnly(why.clone()));
        }
        let grow = {
            let inner = lock(&self.inner);
            let n = inner.get(ino)?;
            let fill = if n.staged { 0 } else { n.remote.as_ref().map_or(0, |r| r.size) };
            (offset + data.len() as u64).saturating_sub(n.size) + fill
        };
        self.make_room(grow)?;
        let file = self.ensure_staged(ino).await?;
        // The generation moves before and after the write, and `writing` counts it while
        // its bytes go in, so an upload snapshot that overlaps it is always seen as stale.
        {
            let mut inner = lock(&self.inner);
            let n = inner.get_mut(ino)?;
            n.generation += 1;
            n.writing += 1;
        }
        let written = file.write_all_at(data, offset);
        {
            let mut inner = lock(&self.inner);
            let n = inner.get_mut(ino)?;
            n.writing = n.writing.saturating_sub(1);
            written?;
            n.size = n.size.max(offset + data.len() as u64);
            n.mtime_ns = now_ns();
            n.ctime_ns = n.mtime_ns;
            n.dirty = true;
            n.generation += 1;
            // Push a queued upload back while the file keeps changing.
            if let Some(&seq) = inner.queued_sync.get(&ino)
                && let Some(q) = inner.queue.get_mut(&seq)
            {
                q.ready_at = Instant::now() + self.cfg.upload_delay;
            }
        }
        if let Some(h) = lock(&self.handles).get_mut(&fh) {
            h.wrote = true;
        }
        Ok(data.len() as u32)
    }

    /// close() and fsync(): the change is durable on local disk when this returns.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let (ino, wrote) = {
            let mut hs = lock(&self.handles);
            let h = hs.get_mut(&fh).ok_or(FsError::BadHandle)?;
            (h.ino, std::mem::take(&mut h.wrote))
        };
        let (staged, dirty) = {
            let inner = lock(&self.inner);
            match inner.get(ino) {
                Ok(n) => (n.staged, n.dirty),
                Err(_) => return Ok(()),
            }
        };
        if !wrote && !dirty {
            return Ok(());
        }
        if staged {
            self.staging.file(ino)?.sync_data()?;
            // A staging file created since the last sync needs its directory entry too.
            self.staging.sync_dir()?;
        }
        fail::fail_point!("fsync-after-staging", |_| Err(FsError::Halted("fsync-after-staging")));
        {
            let mut inner = lock(&self.inner);
            let mut batch = Batch::default();
            if inner.get(ino).is_ok_and(|n| n.parent != 0) {
                inner.touch(ino, self.cfg.upload_delay, &mut batch)?;
            }
            self.commit(&inner, batch, true)?;
        }
        fail::fail_point!("fsync-after-commit", |_| Err(FsError::Halted("fsync-after-commit")));
        Ok(())
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let h = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if h.dir.is_some() {
            return Ok(());
        }
        let mut inner = lock(&self.inner);
        let orphan = match inner.get_mut(h.ino) {
            Ok(n) => {
                n.open = n.open.saturating_sub(1);
                n.open == 0 && n.parent == 0
            }
            Err(_) => false,
        };
        if orphan {
            inner.remove(h.ino);
            self.staging.remove(h.ino);
        }
        Ok(())
    }

    // ---- folders --------------------------------------------------------------------

    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        self.evict_listings();
        let fresh = self.listing_fresh(ino)?;
        let _ = self.listings.get(&ino);
        if !fresh && let Err(e) = self.refresh_dir(ino).await {
            if !lock(&self.inner).get(ino)?.listed {
                return Err(e);
            }
            tracing::debug!("listing failed, serving the folder as last seen: {e}");
        }
        let inner = lock(&self.inner);
        let n = inner.get(ino)?;
        let mut entries = vec![
            DirEntry { ino, name: ".".into(), kind: Kind::Dir, attr: n.attr() },
            DirEntry {
                ino: n.parent.max(ROOT_INO),
                name: "..".into(),
                kind: Kind::Dir,
                attr: inner.get(n.parent.max(ROOT_INO)).map(|p| p.attr()).unwrap_or(n.attr()),
            },
        ];
        if let Some(c) = inner.children.get(&ino) {
            for (name, &ci) in c {
                if let Ok(cn) = inner.get(ci) {
                    entries.push(DirEntry { ino: ci, name: name.clone(), kind: cn.kind, attr: cn.attr() });
                }
            }
        }
        drop(inner);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles)
            .insert(fh, Handle { ino, wrote: false, readahead: Readahead::default(), dir: Some(entries) });
        Ok(fh)
    }

    /// Entries from `offset` on; the offset of entry i is i + 1.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let hs = lock(&self.handles);
        let h = hs.get(&fh).ok_or(FsError::BadHandle)?;
        let d = h.dir.as_ref().ok_or(FsError::NotDir)?;
        Ok(d.iter().skip(offset as usize).cloned().collect())
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    // ---- the whole mount ------------------------------------------------------------

    /// Shows `msg` as the last error in `status` until an upload succeeds.
    pub fn note_error(&self, msg: String) {
        lock(&self.counters).last_error = Some(msg);
    }

    pub fn status(&self) -> Status {
        let inner = lock(&self.inner);
        let pending_bytes = inner
            .queue
            .values()
            .filter_map(|q| match q.op {
                Op::Sync { ino } => inner.inodes.get(&ino).filter(|n| n.dirty).map(|n| n.size),
                _ => None,
            })
            .sum();
        let c = lock(&self.counters);
        Status {
            pending_ops: inner.queue.len(),
            pending_bytes,
            staged_bytes: self.staging.bytes(),
            inodes: inner.inodes.len(),
            uploads_done: c.uploads_done,
            conflicts: c.conflicts,
            last_error: c.last_error.clone(),
            conditional_create: self.caps.create,
            conditional_update: self.caps.update,
            read_only: c.read_only.clone(),
            cache: self.blocks.report(),
        }
    }

    /// Every conflict this mount state met, oldest first.
    pub fn conflicts(&self) -> FsResult<Vec<ConflictRecord>> {
        Ok(self.db.conflicts::<ConflictRecord>()?.into_iter().map(|(_, r)| r).collect())
    }

    /// A key as a path in the mount (without the mount's prefix).
    fn rel_path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            return key.to_string();
        }
        key.strip_prefix(&self.prefix).and_then(|k| k.strip_prefix('/')).unwrap_or(key).to_string()
    }

    /// Empties the block caches, in memory and on disk.
    pub async fn clear_cache(&self) -> FsResult<()> {
        self.blocks.clear_memory();
        if let Some(disk) = self.blocks.disk().cloned() {
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
        self.urgent.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
        self.flush_kick.notify_one();
        let mut rx = self.pending.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|&n| n == 0)).await;
        self.urgent.fetch_sub(1, Ordering::SeqCst);

        lock(&self.inner).queue.len()
    }

    /// Makes every journalled change durable (fsyncdir).
    pub fn sync_journal(&self) -> FsResult<()> {
        let inner = lock(&self.inner);
        self.commit(&inner, Batch::default(), true)
    }

    /// The last commit of a mount, once the kernel let go of it: everything is durable, and
    /// the next mount may trust the staged copies of files without pending changes.
    pub fn close_state(&self) -> FsResult<()> {
        let inner = lock(&self.inner);
        let mut batch = Batch::default();
        batch.meta.push(("clean", 1));
        self.commit(&inner, batch, true)
    }
}

/// What a pending op hides from listings: a deleted key (and the folder of a deleted
/// folder marker), or a moved folder.
fn hidden_keys(op: &Op) -> Vec<String> {
    match op {
        Op::Delete { remote } => {
            let mut keys = vec![remote.key.clone()];
            if let Some(dir) = remote.key.strip_suffix(layout::FOLDER_MARKER) {
                keys.push(dir.trim_end_matches('/').to_string());
            }
            keys
        }
        Op::FolderMoved { from } => vec![format!("{from}/")],
        Op::Sync { .. } => vec![],
    }
}

fn remote_of(m: &ObjectMeta) -> Remote {
    Remote {
        key: m.location.as_ref().to_string(),
        etag: m.e_tag.clone(),
        version: m.version.clone(),
        size: m.size,
        modified: Some(m.last_modified.timestamp()),
    }
}

fn etag_same(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => layout::etag_eq(a, b),
        _ => false,
    }
}

/// A read conditional on the version we know failed because the object changed.
fn stale(e: object_store::Error) -> FsError {
    match e {
        object_store::Error::Precondition { path, .. } | object_store::Error::NotModified { path, .. } => {
            FsError::Stale(path)
        }
        other => FsError::Remote(other),
    }
}
