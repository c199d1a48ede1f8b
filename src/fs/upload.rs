//! The background uploader: drains the journal in order, one op at a time, with conditional
//! writes (or compare-then-write where the store ignores them), multipart for large files,
//! conflict copies when the bucket changed underneath, and capped backoff on errors.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::staging::{BlockWriter, Snapshot};
use futures::StreamExt;
use object_store::{
    GetOptions, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};

use super::*;

/// The largest file whose cached version a move carries on when its old object changed.
const MOVE_FROM_CACHE_MAX: u64 = 64 << 20;

/// The largest file (each of the three versions) the merge policy merges.
pub(crate) const MERGE_MAX: u64 = 8 << 20;

/// What a conditional put found.
enum PutError {
    /// The object at the key is not the version we based our change on.
    Diverged,
    Other(FsError),
}

impl From<FsError> for PutError {
    fn from(e: FsError) -> Self {
        PutError::Other(e)
    }
}
impl From<object_store::Error> for PutError {
    fn from(e: object_store::Error) -> Self {
        PutError::Other(e.into())
    }
}
impl From<std::io::Error> for PutError {
    fn from(e: std::io::Error) -> Self {
        PutError::Other(e.into())
    }
}

/// The bucket's version found when a conflict is resolved.
struct Theirs {
    meta: object_store::ObjectMeta,
    /// Its `autosync-hash`, if an autosync wrote it.
    hash: Option<String>,
    /// Its `mtime` metadata, else its Last-Modified (seconds).
    modified: i64,
    /// Its `autosync-host`: the machine whose autosync wrote it.
    host: Option<String>,
    /// Its `autosync-user`: the user whose autosync wrote it.
    user: Option<String>,
}

/// What a merge attempt came to.
enum Merged {
    /// Both changes, merged cleanly; with the bucket's version they were merged into.
    Clean { merged: Bytes, theirs: Remote },
    /// Not mergeable (why): keep both instead.
    Fallback(String),
}

/// Whose the object at a key is, when it is not the version a change was based on.
enum Claim {
    /// It holds exactly our content: the put already happened.
    Same(object_store::PutResult),
    /// Our own unrecorded upload: write over this version.
    Rebase(Remote),
    /// Someone else's change.
    Theirs,
}

/// Where the bytes of an upload come from.
enum Content {
    /// A sealed snapshot in the cache dir's temp folder, removed with this value.
    File {
        path: std::path::PathBuf,
        file: Arc<SealedFile>,
        size: u64,
        hash: String,
    },
    Bytes {
        data: Bytes,
        hash: String,
    },
}

impl Content {
    fn hash(&self) -> &str {
        match self {
            Content::File { hash, .. } | Content::Bytes { hash, .. } => hash,
        }
    }
    fn size(&self) -> u64 {
        match self {
            Content::File { size, .. } => *size,
            Content::Bytes { data, .. } => data.len() as u64,
        }
    }
}

impl Content {
    /// The whole content in memory (for a merge: small files only).
    async fn bytes(&self) -> FsResult<Bytes> {
        match self {
            Content::Bytes { data, .. } => Ok(data.clone()),
            Content::File { file, .. } => {
                let f = Arc::clone(file);
                let data = tokio::task::spawn_blocking(move || f.read_all())
                    .await
                    .map_err(|e| FsError::Io(std::io::Error::other(e)))??;
                Ok(Bytes::from(data))
            }
        }
    }

    fn of(snap: Snapshot, size: u64, hash: String) -> Content {
        match snap {
            Snapshot::Bytes(data) => Content::Bytes { data, hash },
            Snapshot::File { path, file } => Content::File { path, file, size, hash },
        }
    }
}

impl Drop for Content {
    fn drop(&mut self) {
        if let Content::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Fs {
    /// Runs until `stop` resolves, then returns (whatever is left stays in the journal).
    pub async fn run_uploader(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if *stop.borrow() {
                return;
            }
            let next = {
                let inner = lock(&self.inner);
                inner.queue.iter().next().map(|(seq, q)| (*seq, q.op.clone(), q.ready_at))
            };
            let Some((seq, op, ready_at)) = next else {
                tokio::select! {
                    _ = self.wake.notified() => {},
                    _ = stop.changed() => {},
                }
                continue;
            };
            let urgent = self.urgent.load(Ordering::SeqCst) > 0;
            if !urgent && ready_at > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(ready_at.into()) => {},
                    _ = self.wake.notified() => {},
                    _ = stop.changed() => {},
                }
                continue;
            }
            match self.process(seq, &op).await {
                Err(FsError::Halted(at)) => {
                    tracing::warn!(at, "uploader stopped at a failpoint");
                    return;
                }
                Ok(_) => {
                    backoff = Duration::from_millis(500);
                    lock(&self.counters).last_error = None;
                }
                Err(e) => {
                    {
                        let mut inner = lock(&self.inner);
                        inner.uploading = None;
                        inner.in_flight.clear();
                        inner.upload_epoch += 1;
                        // The op stays first in line and takes a fresh snapshot when retried:
                        // changes made meanwhile join it instead of queueing another upload.
                        if let Op::Sync { ino } = op
                            && inner.queue.contains_key(&seq)
                        {
                            inner.queued_sync.entry(ino).or_insert(seq);
                        }
                    }
                    self.upload_done.notify_waiters();
                    let what = self.describe(&op);
                    tracing::error!(path = %what, "upload failed, will retry: {e}");
                    lock(&self.counters).last_error = Some(format!("{what}: {e}"));
                    // Capped exponential backoff with jitter; a flush request cuts it short.
                    let jitter = Duration::from_millis(rand::random::<u64>() % 250);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff + jitter) => {},
                        _ = self.flush_kick.notified() => {},
                        _ = stop.changed() => {},
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn describe(&self, op: &Op) -> String {
        match op {
            Op::Sync { ino } => {
                let inner = lock(&self.inner);
                inner.key_of(&self.prefix, *ino).unwrap_or_else(|_| format!("inode {ino}"))
            }
            Op::Delete { remote } => remote.key.clone(),
            Op::FolderMoved { from } => from.clone(),
        }
    }

    /// Removes a finished op from the journal, durably.
    fn finish(&self, seq: u64, mut batch: Batch) -> FsResult<()> {
        // Counted before the op leaves the queue, so a flush waiter sees it.
        lock(&self.counters).uploads_done += 1;
        let mut inner = lock(&self.inner);
        inner.upload_epoch += 1;
        inner.uploading = None;
        inner.in_flight.clear();
        self.upload_done.notify_waiters();
        if let Some(q) = inner.queue.remove(&seq) {
            match q.op {
                Op::Sync { ino } => {
                    if inner.queued_sync.get(&ino) == Some(&seq) {
                        inner.queued_sync.remove(&ino);
                    }
                }
                op @ (Op::Delete { .. } | Op::FolderMoved { .. }) => {
                    for k in hidden_keys(&op) {
                        inner.unhide(&k);
                    }
                }
            }
        }
        batch.del_ops.push(seq);
        self.commit(&inner, batch, true)
    }

    async fn process(&self, seq: u64, op: &Op) -> FsResult<()> {
        tracing::debug!(seq, ?op, "uploading");
        match op {
            Op::Sync { ino } => self.sync_inode(seq, *ino).await,
            Op::FolderMoved { from } => {
                let below = format!("{from}/");
                let mut batch = Batch::default();
                {
                    let mut inner = lock(&self.inner);
                    // Moves of the folder's contents may have queued deletes of old keys
                    // behind us: stay hidden (and last) until they are done.
                    let busy = inner.queue.iter().any(|(&s, q)| {
                        s != seq
                            && match &q.op {
                                Op::Delete { remote } => remote.key.starts_with(&below),
                                Op::Sync { ino } => inner.inodes.get(ino).is_some_and(|n| {
                                    [&n.remote, &n.overwrites].into_iter().flatten().any(|r| r.key.starts_with(&below))
                                }),
                                Op::FolderMoved { .. } => false,
                            }
                    });
                    if busy {
                        inner.push_op(Op::FolderMoved { from: from.clone() }, Duration::ZERO, &mut batch)?;
                    }
                }
                if !batch.is_empty() {
                    self.finish(seq, batch)?;
                    return Ok(());
                }
                let marker =
                    Remote { key: layout::marker_key(from), etag: None, version: None, size: 0, modified: None };
                self.delete_checked(&marker).await?;
                self.finish(seq, Batch::default())?;
                Ok(())
            }
            Op::Delete { remote } => {
                self.delete_checked(remote).await?;
                self.finish(seq, Batch::default())?;
                Ok(())
            }
        }
    }

    /// Deletes an object unless it changed since we saw it (then the other edit survives).
    async fn delete_checked(&self, remote: &Remote) -> FsResult<()> {
        if let Some(dir) = remote.key.strip_suffix(layout::FOLDER_MARKER) {
            // A folder that lives at that key again (made after the delete was queued)
            // owns the marker now.
            let inner = lock(&self.inner);
            let now = inner.ino_at_key(&self.prefix, dir.trim_end_matches('/'));
            if now.and_then(|i| inner.inodes.get(&i)).is_some_and(|n| n.kind == Kind::Dir) {
                return Ok(());
            }
        }
        let path = obj_path(&remote.key)?;
        match self.store.head(&path).await {
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(m) => {
                if remote.etag.is_some() && !etag_same(remote.etag.as_deref(), m.e_tag.as_deref()) {
                    tracing::warn!(key = %remote.key, "not deleting: the object changed in the bucket since it was read; the other edit survives");
                    return Ok(());
                }
            }
        }
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn sync_inode(&self, seq: u64, ino: u64) -> FsResult<()> {
        // Plan under the lock: where the inode lives now, what it is based on, a snapshot.
        let plan = {
            let mut inner = lock(&self.inner);
            let Some(n) = inner.inodes.get(&ino).cloned() else {
                drop(inner);
                self.finish(seq, Batch::default())?;
                return Ok(());
            };
            if n.parent == 0 || ino == ROOT_INO {
                drop(inner);
                self.finish(seq, Batch::default())?;
                return Ok(());
            }
            // Changes from here on queue a fresh op; this one covers the state snapshotted now.
            if inner.queued_sync.get(&ino) == Some(&seq) {
                inner.queued_sync.remove(&ino);
            }
            let key = inner.key_of(&self.prefix, ino)?;
            // Already in the bucket as it is (an earlier op of the same inode took in the
            // changes this one was queued for): nothing to write again.
            let in_sync = n.kind != Kind::Dir
                && !n.dirty
                && n.overwrites.is_none()
                && n.remote.as_ref().is_some_and(|r| r.key == key);
            if in_sync {
                drop(inner);
                self.finish(seq, Batch::default())?;
                return Ok(());
            }
            inner.uploading = Some(ino);
            let content = match n.kind {
                Kind::Dir => None,
                Kind::Symlink => {
                    let data = Bytes::from(n.target.clone().unwrap_or_default().into_bytes());
                    let hash = blake3::hash(&data).to_hex().to_string();
                    Some(Content::Bytes { data, hash })
                }
                Kind::File => None,
            };
            (n, key, content)
        };
        let (mut node, key, mut content) = plan;
        if node.kind == Kind::File && node.staged {
            match self.snapshot(seq, ino).await? {
                Some((c, generation)) => {
                    content = Some(c);
                    // The attributes go up with the content: take them as of the same state
                    // (a chmod between the plan and the copy bumped the generation too).
                    match lock(&self.inner).inodes.get(&ino) {
                        Some(now) if now.generation == generation && now.parent == node.parent => {
                            node = now.clone();
                        }
                        _ => node.generation = generation,
                    }
                }
                None => {
                    // Deleted while we copied it.
                    self.finish(seq, Batch::default())?;
                    return Ok(());
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
            let mut inner = lock(&self.inner);
            let owner = inner.by_remote_key.get(&key).copied().filter(|&o| o != ino);
            let moving = owner.filter(|o| {
                inner.queued_sync.contains_key(o) && inner.key_of(&self.prefix, *o).is_ok_and(|k| k != key)
            });
            if moving.is_some() {
                let mut batch = Batch::default();
                inner.requeue(ino, Duration::ZERO, &mut batch)?;
                // `requeue` bumped the generation; the file itself did not change.
                if let Ok(n) = inner.get_mut(ino) {
                    n.generation = node.generation;
                }
                drop(inner);
                self.finish(seq, batch)?;
                return Ok(());
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
                        .put_and_record(seq, &node, &key, base, moved_from, Content::Bytes { data, hash }, attrs)
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
    async fn snapshot(&self, seq: u64, ino: u64) -> FsResult<Option<(Content, u64)>> {
        let state = |fs: &Self| lock(&fs.inner).inodes.get(&ino).map(|n| (n.generation, n.writing));
        let name = format!("up-{seq}");
        for _ in 0..4 {
            let Some(before) = state(self) else { return Ok(None) };
            if before.1 > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let job = self.staging.snapshot_job(ino, &name, self.cfg.multipart_threshold);
            let copied = tokio::task::spawn_blocking(job).await.map_err(|e| FsError::Io(std::io::Error::other(e)))?;
            let (snap, size, hash) = match copied {
                Ok(c) => c,
                Err(_) if state(self).is_none() => return Ok(None),
                // A big file's copy needs room in the cache dir: make some from copies of
                // files already in the bucket, and try again (else the upload waits and
                // retries until there is room, shown in `status`).
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && self.drop_clean_copies() > 0 => continue,
                Err(e) => return Err(e.into()),
            };
            // No write started or was under way while we copied: the copy is one state.
            if state(self) == Some(before) {
                return Ok(Some((Content::of(snap, size, hash), before.0)));
            }
        }
        // Still busy: copy under the lock once no write is in its pwrite (a new one cannot
        // start without the lock).
        loop {
            {
                let inner = lock(&self.inner);
                let Some(n) = inner.inodes.get(&ino) else { return Ok(None) };
                if n.writing == 0 {
                    let generation = n.generation;
                    let (snap, size, hash) = self.staging.snapshot_job(ino, &name, self.cfg.multipart_threshold)()?;
                    return Ok(Some((Content::of(snap, size, hash), generation)));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A folder lives in the bucket as its marker (carrying its attributes); a moved folder
    /// writes the marker at its new key (`FolderMoved` retires the old one).
    async fn sync_dir(&self, seq: u64, mut node: Inode, key: &str) -> FsResult<()> {
        if !node.attrs_known && node.remote.is_some() {
            // Keep the attributes the old marker carries.
            self.fetch_attrs(vec![node.ino]).await;
            if let Ok(n) = lock(&self.inner).get(node.ino) {
                node = Inode { generation: node.generation, ..n.clone() };
            }
        }
        let attrs = node.posix_attrs();
        let marker = obj_path(&layout::marker_key(key))?;
        lock(&self.inner).in_flight.insert(key.to_string());
        let opts = PutOptions { attributes: attrs.to_attributes(None, None), ..Default::default() };
        self.store.put_opts(&marker, PutPayload::new(), opts).await?;
        let mut batch = Batch::default();
        {
            let mut inner = lock(&self.inner);
            if inner.inodes.contains_key(&node.ino) {
                // A folder moved with its parent leaves its old marker behind.
                if let Some(old) = inner.get(node.ino)?.remote.clone().filter(|o| o.key != key) {
                    let old_marker = Remote {
                        key: layout::marker_key(&old.key),
                        etag: None,
                        version: None,
                        size: 0,
                        modified: None,
                    };
                    inner.push_op(Op::Delete { remote: old_marker }, Duration::ZERO, &mut batch)?;
                }
                inner.set_remote(
                    node.ino,
                    Some(Remote { key: key.to_string(), etag: None, version: None, size: 0, modified: None }),
                );
                let n = inner.get_mut(node.ino)?;
                if n.generation == node.generation {
                    n.dirty = false;
                }
                n.attrs_known = true;
                inner.persist(node.ino, &mut batch)?;
            }
        }
        self.finish(seq, batch)?;
        Ok(())
    }

    async fn download_snapshot(&self, seq: u64, src: &Remote) -> FsResult<Content> {
        let opts = GetOptions { if_match: src.etag.clone(), ..Default::default() };
        let res = self.store.get_opts(&obj_path(&src.key)?, opts).await.map_err(stale)?;
        let mut stream = res.into_stream();
        if src.size <= self.cfg.multipart_threshold {
            let mut data = Vec::with_capacity(src.size as usize);
            while let Some(chunk) = stream.next().await {
                data.extend_from_slice(&chunk?);
            }
            let hash = blake3::hash(&data).to_hex().to_string();
            return Ok(Content::Bytes { data: data.into(), hash });
        }
        let (path, file) = self.staging.temp(&format!("up-{seq}"))?;
        let mut out = BlockWriter::new(&file);
        while let Some(chunk) = stream.next().await {
            out.write(&chunk?)?;
        }
        let (size, hash) = out.finish()?;
        Ok(Content::File { path, file: Arc::new(file), size, hash })
    }

    /// What the key of `src` holds now (its HEAD), or None.
    async fn head_source(&self, src: &Remote) -> FsResult<Option<object_store::ObjectMeta>> {
        match self.store.head(&obj_path(&src.key)?).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A rename of an unchanged file: server-side copy, then delete of the old key.
    async fn move_object(&self, seq: u64, node: &Inode, key: &str, src: &Remote) -> FsResult<()> {
        let dest = obj_path(key)?;
        // The copy takes whatever the old key holds: it must still be the version this
        // mount shows (one HEAD; a change in the moment between it and the copy is not seen).
        let now = self.head_source(src).await?;
        if !now.as_ref().is_some_and(|m| same_version(m, src)) {
            let Some(content) = self.source_moved_on(seq, node, src, now).await? else { return Ok(()) };
            return self.put_and_record(seq, node, key, None, Some(src.clone()), content, node.posix_attrs()).await;
        }
        match self.store.head(&dest).await {
            Err(object_store::Error::NotFound { .. }) => {}
            Ok(_) => {
                // Someone else created this path meanwhile: keep theirs, ours becomes a copy.
                let content = self.download_snapshot(seq, src).await?;
                return self.resolve_conflict(seq, node, key, None, Some(src.clone()), content).await;
            }
            Err(e) => return Err(e.into()),
        }
        lock(&self.inner).in_flight.insert(key.to_string());
        self.store.copy(&obj_path(&src.key)?, &dest).await?;
        let meta = self.store.head(&dest).await?;
        let mut batch = Batch::default();
        {
            let mut inner = lock(&self.inner);
            // The old key goes through the queue: hidden at once, so readers and listings
            // never see it missing while the inode still points at it.
            if inner.inodes.contains_key(&node.ino) {
                inner.set_remote(node.ino, Some(remote_of(&meta)));
                let left_behind = inner.get_mut(node.ino)?.overwrites.take_if(|o| o.key != key);
                inner.persist(node.ino, &mut batch)?;
                if let Some(o) = left_behind {
                    inner.retire(&self.prefix, o, Duration::ZERO, &mut batch)?;
                }
            } else {
                // Deleted while we moved it.
                inner.retire(&self.prefix, remote_of(&meta), Duration::ZERO, &mut batch)?;
            }
            // After recording the new key, so a file now at the old key can claim it.
            inner.retire(&self.prefix, src.clone(), Duration::ZERO, &mut batch)?;
            inner.upload_epoch += 1;
        }
        self.finish(seq, batch)?;
        Ok(())
    }

    /// A rename (or attribute change) of a file not changed here, whose object at its old
    /// key is no longer the version this mount shows: changed or deleted in the bucket
    /// before the change from here reached it. If the version shown is cached here (all
    /// its blocks), it is carried on as the content (`Some`): the rename keeps what this
    /// mount showed, and the bucket's newer version stays where it is. Otherwise the
    /// file follows the bucket (`None`, the op is done): a newer version takes its place
    /// here and the change is applied to it next; a deleted one leaves the mount.
    /// Recorded as a conflict either way.
    /// `now` is what the old key holds (its HEAD), if anything.
    async fn source_moved_on(
        &self,
        seq: u64,
        node: &Inode,
        src: &Remote,
        now: Option<object_store::ObjectMeta>,
    ) -> FsResult<Option<Content>> {
        if now.as_ref().is_some_and(|m| same_version(m, src)) {
            return Err(FsError::Stale(format!("{}: read again", src.key)));
        }
        if src.size <= MOVE_FROM_CACHE_MAX
            && let Some(data) = self.blocks.cached_whole(src).await
        {
            tracing::info!(key = %src.key, "the bucket's object changed before this mount's move of it; moving the version this mount showed, from its cache");
            let hash = blake3::hash(&data).to_hex().to_string();
            return Ok(Some(Content::Bytes { data, hash }));
        }
        let path = self.rel_path(&src.key);
        let theirs = now.as_ref().map(|m| Theirs {
            meta: m.clone(),
            hash: None,
            modified: m.last_modified.timestamp(),
            host: None,
            user: None,
        });
        let local = Version {
            path: None,
            size: Some(src.size),
            etag: src.etag.clone(),
            hash: None,
            modified: node.posix_attrs().mtime,
        };
        let mut batch = Batch::default();
        let mut inval = Vec::new();
        {
            let mut inner = lock(&self.inner);
            let Ok(n) = inner.get(node.ino) else {
                drop(inner);
                self.finish(seq, batch)?;
                return Ok(None);
            };
            if n.parent == 0 || n.generation != node.generation {
                // Deleted here meanwhile, or changed again (its newer op is queued): that
                // decides, not this one.
                drop(inner);
                self.finish(seq, batch)?;
                return Ok(None);
            }
            if n.open > 0 {
                return Err(FsError::Stale(format!(
                    "{path} changed in the bucket; trying again once the file is closed"
                )));
            }
            let (parent, name) = (n.parent, n.name.clone());
            let (policy, _) = self.cfg.conflict.for_path(&path);
            let outcome = match &now {
                Some(_) => {
                    let n = inner.get_mut(node.ino)?;
                    n.size = now.as_ref().map_or(0, |m| m.size);
                    n.staged = false;
                    inner.set_remote(node.ino, now.as_ref().map(remote_of));
                    inner.touch(node.ino, Duration::ZERO, &mut batch)?;
                    inval.push(Invalidation::Inode(node.ino));
                    format!(
                        "{path} changed in the bucket before this mount's rename or attribute change of it arrived; that change is applied to the bucket's version"
                    )
                }
                None => {
                    // Whatever it was to replace stays: nothing of it was touched yet.
                    inner.get_mut(node.ino)?.overwrites = None;
                    self.remove_tree(&mut inner, node.ino, &mut batch)?;
                    if let Ok(p) = inner.get_mut(parent) {
                        p.listed_at = None;
                    }
                    inval.push(Invalidation::Entry { parent, name });
                    format!(
                        "{path} was deleted in the bucket before this mount's rename or attribute change of it arrived, and it was not cached here; it is gone here too"
                    )
                }
            };
            let record =
                self.conflict_record(policy, &path, outcome, now.as_ref().map(|_| path.clone()), &theirs, local);
            inner.upload_epoch += 1;
            inner.record_conflict(record, &mut batch)?;
        }
        self.finish(seq, batch)?;
        for what in inval {
            self.invalidate(what);
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_and_record(
        &self,
        seq: u64,
        node: &Inode,
        key: &str,
        base: Option<Remote>,
        moved_from: Option<Remote>,
        content: Content,
        attrs: PosixAttrs,
    ) -> FsResult<()> {
        lock(&self.inner).in_flight.insert(key.to_string());
        tracing::debug!(key, ?base, ?moved_from, "put");
        let result = self.conditional_put(node.ino, key, base.as_ref(), &content, attrs).await;
        let put = match result {
            Ok(p) => p,
            Err(PutError::Diverged) => {
                return self.resolve_conflict(seq, node, key, base, moved_from, content).await;
            }
            Err(PutError::Other(e)) => return Err(e),
        };
        fail::fail_point!("upload-before-commit", |_| Err(FsError::Halted("upload-before-commit")));
        self.keep_merge_base(key, &put, &content).await;
        self.record_put(seq, node, key, moved_from, &content, put, None)
    }

    /// Records a put of `content` at `key` (and a conflict record, if given), ends the op.
    #[allow(clippy::too_many_arguments)]
    fn record_put(
        &self,
        seq: u64,
        node: &Inode,
        key: &str,
        moved_from: Option<Remote>,
        content: &Content,
        put: object_store::PutResult,
        conflict: Option<ConflictRecord>,
    ) -> FsResult<()> {
        let mut batch = Batch::default();
        {
            let mut inner = lock(&self.inner);
            let remote = Remote {
                key: key.to_string(),
                etag: put.e_tag,
                version: put.version,
                size: content.size(),
                modified: None,
            };
            if inner.inodes.contains_key(&node.ino) && inner.get(node.ino)?.parent != 0 {
                inner.set_remote(node.ino, Some(remote));
                let n = inner.get_mut(node.ino)?;
                // Only the replaced object we just wrote over is used up; a rename made
                // during the upload may have set a new one.
                // The replaced object we just wrote over is used up; one at another key was
                // left behind by a later move (a rename during the upload sets a new one).
                let left_behind = match n.overwrites.take() {
                    Some(o) if o.key == key => None,
                    Some(o) if n.generation == node.generation => Some(o),
                    other => {
                        n.overwrites = other;
                        None
                    }
                };
                if n.generation == node.generation {
                    n.dirty = false;
                }
                inner.persist(node.ino, &mut batch)?;
                if let Some(o) = left_behind {
                    inner.retire(&self.prefix, o, Duration::ZERO, &mut batch)?;
                }
            } else {
                // Deleted while it was uploading.
                inner.retire(&self.prefix, remote, Duration::ZERO, &mut batch)?;
            }
            // After recording the new key, so a file now at the old key can claim it.
            if let Some(old) = moved_from {
                inner.retire(&self.prefix, old, Duration::ZERO, &mut batch)?;
            }
            inner.upload_epoch += 1;
            if let Some(record) = conflict {
                inner.record_conflict(record, &mut batch)?;
            }
        }
        self.finish(seq, batch)?;
        Ok(())
    }

    /// Writes `content` at `key` only if the object there is still `base` (or absent when
    /// `base` is None). Uses the store's conditional writes where the probe found them, and
    /// compare-then-write elsewhere (a race window: see docs/SEMANTICS.md). An object there
    /// that is our own upload which a crash kept us from recording is written over.
    async fn conditional_put(
        &self,
        ino: u64,
        key: &str,
        base: Option<&Remote>,
        content: &Content,
        attrs: PosixAttrs,
    ) -> Result<object_store::PutResult, PutError> {
        let mut base = base.cloned();
        // Each rebase follows one more object of ours; a bucket that keeps changing under
        // us ends as a conflict.
        for _ in 0..3 {
            match self.try_put(ino, key, base.as_ref(), content, attrs).await {
                Err(PutError::Diverged) => {}
                other => return other,
            }
            match self.claim(ino, &obj_path(key)?, content).await? {
                Claim::Same(put) => return Ok(put),
                Claim::Rebase(current) => {
                    tracing::info!(key, "the object is this mount's own upload from before a restart; writing over it");
                    base = Some(current);
                }
                Claim::Theirs => return Err(PutError::Diverged),
            }
        }
        Err(PutError::Diverged)
    }

    async fn try_put(
        &self,
        ino: u64,
        key: &str,
        base: Option<&Remote>,
        content: &Content,
        attrs: PosixAttrs,
    ) -> Result<object_store::PutResult, PutError> {
        let path = obj_path(key)?;
        let origin = format!("{}:{ino}", self.writer);
        let mut attributes = attrs.to_attributes(Some(content.hash()), Some(&origin));
        attributes.insert(
            object_store::Attribute::Metadata(layout::META_HOST.into()),
            object_store::AttributeValue::from(self.cfg.host.clone()),
        );
        if !self.cfg.user.is_empty() {
            attributes.insert(
                object_store::Attribute::Metadata(layout::META_USER.into()),
                object_store::AttributeValue::from(self.cfg.user.clone()),
            );
        }
        let multipart = content.size() > self.cfg.multipart_threshold;
        let native = match base {
            None => self.caps.create,
            Some(b) => self.caps.update && (b.etag.is_some() || b.version.is_some()),
        };
        if !native || multipart {
            // Compare, then write.
            let current = match self.store.head(&path).await {
                Ok(m) => Some(m),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let matches = match (base, &current) {
                (None, None) => true,
                (Some(b), Some(m)) => etag_same(b.etag.as_deref(), m.e_tag.as_deref()),
                _ => false,
            };
            if !matches {
                return Err(PutError::Diverged);
            }
        }
        let mode = if native && !multipart {
            match base {
                None => PutMode::Create,
                Some(b) => PutMode::Update(UpdateVersion { e_tag: b.etag.clone(), version: b.version.clone() }),
            }
        } else {
            PutMode::Overwrite
        };
        let res = if multipart {
            let opts = PutMultipartOptions { attributes, ..Default::default() };
            let upload = self.store.put_multipart_opts(&path, opts).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
            match content {
                Content::Bytes { data, .. } => writer.put(data.clone()),
                Content::File { file, .. } => {
                    let mut offset = 0u64;
                    loop {
                        let f = Arc::clone(file);
                        let chunk = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; 8 << 20];
                            let n = f.read_at(&mut buf, offset)?;
                            buf.truncate(n);
                            Ok::<_, std::io::Error>(buf)
                        })
                        .await
                        .map_err(|e| FsError::Io(std::io::Error::other(e)))??;
                        if chunk.is_empty() {
                            break;
                        }
                        offset += chunk.len() as u64;
                        writer.wait_for_capacity(4).await?;
                        writer.put(chunk.into());
                        if offset > 16 << 20 {
                            // At least one part has gone up; the upload is never completed.
                            fail::fail_point!("upload-multipart-middle", |_| {
                                Err(PutError::Other(FsError::Halted("upload-multipart-middle")))
                            });
                        }
                    }
                }
            }
            writer.finish().await
        } else {
            let payload = match content {
                Content::Bytes { data, .. } => PutPayload::from_bytes(data.clone()),
                Content::File { file, .. } => {
                    let f = Arc::clone(file);
                    let data = tokio::task::spawn_blocking(move || f.read_all())
                        .await
                        .map_err(|e| FsError::Io(std::io::Error::other(e)))??;
                    PutPayload::from_bytes(Bytes::from(data))
                }
            };
            let opts = PutOptions { mode, attributes, ..Default::default() };
            self.store.put_opts(&path, payload, opts).await
        };
        match res {
            Ok(r) => Ok(r),
            // Ambiguous after a retry or a crash: the caller reads back to settle it.
            Err(object_store::Error::Precondition { .. }) | Err(object_store::Error::AlreadyExists { .. }) => {
                Err(PutError::Diverged)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whose is the object at `path`, which is not the version our change was based on.
    async fn claim(&self, ino: u64, path: &Path, content: &Content) -> Result<Claim, PutError> {
        let opts = GetOptions { head: true, ..Default::default() };
        let r = match self.store.get_opts(path, opts).await {
            Ok(r) => r,
            // Deleted by someone else since we read it: a conflict, like an edit.
            Err(object_store::Error::NotFound { .. }) => return Ok(Claim::Theirs),
            Err(e) => return Err(e.into()),
        };
        let (_, hash) = PosixAttrs::from_attributes(&r.attributes);
        let meta = r.meta;
        if hash.as_deref() == Some(content.hash()) && meta.size == content.size() {
            // Exactly this content: our own earlier attempt, after a retry or a crash.
            let put = object_store::PutResult {
                e_tag: meta.e_tag.clone(),
                version: meta.version.clone(),
                extensions: Default::default(),
            };
            return Ok(Claim::Same(put));
        }
        let ours = PosixAttrs::origin(&r.attributes).and_then(|o| {
            let (writer, of) = o.rsplit_once(':')?;
            (writer == self.writer).then(|| of.parse::<u64>().ok()).flatten()
        });
        let Some(of) = ours else { return Ok(Claim::Theirs) };
        // Written by this mount state for this inode: an upload a crash kept us from
        // recording, which nobody changed since. Not one written for another of our inodes:
        // a server-side copy (another mount's rename of our object) keeps our origin.
        if of == ino {
            return Ok(Claim::Rebase(remote_of(&meta)));
        }
        Ok(Claim::Theirs)
    }

    /// Settles a change whose base is no longer what the bucket holds at `key`, by the
    /// path's policy. keep-both (and every fallback to it): the bucket's version keeps the
    /// path; ours is saved next to it as `NAME.conflict-HOST-STAMP.EXT`, and the local
    /// inode becomes that copy.
    async fn resolve_conflict(
        &self,
        seq: u64,
        node: &Inode,
        key: &str,
        base: Option<Remote>,
        moved_from: Option<Remote>,
        content: Content,
    ) -> FsResult<()> {
        // The bucket's version now, with its attributes (for `newest`, and the record).
        let theirs = match self.store.get_opts(&obj_path(key)?, GetOptions { head: true, ..Default::default() }).await {
            Ok(r) => Some(r),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let theirs = theirs.map(|r| {
            let (attrs, hash) = PosixAttrs::from_attributes(&r.attributes);
            let modified = attrs.mtime.unwrap_or(r.meta.last_modified.timestamp());
            let mut meta = layout::metadata_map(&r.attributes);
            let (host, user) = (meta.remove(layout::META_HOST), meta.remove(layout::META_USER));
            Theirs { meta: r.meta, hash, modified, host, user }
        });
        let (policy, discard) = self.cfg.conflict.for_path(&self.rel_path(key));
        let ours_mtime = node.posix_attrs().mtime.unwrap_or(0);
        let local_wins = match policy {
            Policy::KeepBoth | Policy::Remote | Policy::Merge => false,
            Policy::Local => true,
            // A deleted remote has nothing newer to offer.
            Policy::Newest => theirs.as_ref().is_none_or(|t| ours_mtime > t.modified),
            // Ours wins when this mount ranks above the writer of theirs (a writer that
            // names no listed host or user, another tool, ranks below every listed one).
            Policy::Priority => {
                let ours = self.cfg.conflict.rank(Some(&self.cfg.host), Some(&self.cfg.user));
                ours < theirs
                    .as_ref()
                    .map_or(usize::MAX, |t| self.cfg.conflict.rank(t.host.as_deref(), t.user.as_deref()))
            }
        };
        if local_wins {
            return self.local_wins(seq, node, key, moved_from, content, theirs, (policy, discard)).await;
        }
        // The edit of a file deleted in the bucket always survives (as a copy).
        if discard && !policy.keeps_both() && theirs.is_some() {
            return self.discard_local(seq, node, key, moved_from, &content, theirs, policy).await;
        }
        let mut why_not_merged = None;
        if policy == Policy::Merge {
            match self.try_merge(node, base.as_ref(), moved_from.is_some(), &content, theirs.as_ref()).await? {
                Merged::Clean { merged, theirs: their_remote } => {
                    return self.apply_merge(seq, node, key, &content, merged, their_remote, &theirs).await;
                }
                Merged::Fallback(why) => why_not_merged = Some(why),
            }
        }
        let attrs = node.posix_attrs();
        let mut found = None;
        for (copy_key, copy_name) in self.copy_candidates(key) {
            {
                let mut inner = lock(&self.inner);
                // The local file becomes the copy: a name the folder still shows here (an
                // entry gone from the bucket, not listed again since) would leave the file
                // at its old name, pointing at the copy's key.
                let parent = inner.get(node.ino).map_or(node.parent, |n| n.parent);
                if inner.child(parent, &copy_name).is_some() {
                    continue;
                }
                inner.in_flight.insert(copy_key.clone());
            }
            match self.conditional_put(node.ino, &copy_key, None, &content, attrs).await {
                Ok(p) => {
                    found = Some((copy_key, copy_name, p));
                    break;
                }
                Err(PutError::Diverged) => continue,
                Err(PutError::Other(e)) => return Err(e),
            }
        }
        let Some((copy_key, copy_name, put)) = found else { return Err(FsError::Exists) };
        let (path, copy_path) = (self.rel_path(key), self.rel_path(&copy_key));
        let mut outcome = match &theirs {
            Some(_) => format!("the bucket's version kept the path; this mount's version was saved as {copy_path}"),
            None => format!("the file was deleted in the bucket; this mount's version was saved as {copy_path}"),
        };
        if let Some(why) = why_not_merged {
            outcome = format!("not merged ({why}): {outcome}");
        }
        let record = self.conflict_record(
            policy,
            &path,
            outcome,
            theirs.as_ref().map(|_| path.clone()),
            &theirs,
            Version {
                path: Some(copy_path),
                size: Some(content.size()),
                etag: put.e_tag.clone(),
                hash: Some(content.hash().to_string()),
                modified: node.posix_attrs().mtime,
            },
        );
        if let Some(old) = &moved_from {
            // Our old location is no longer ours to keep: the content lives in the copy now.
            self.delete_checked(old).await?;
        }
        let mut batch = Batch::default();
        let mut inval = Vec::new();
        {
            let mut inner = lock(&self.inner);
            let remote =
                Remote { key: copy_key, etag: put.e_tag, version: put.version, size: content.size(), modified: None };
            let alive = inner.get(node.ino).is_ok_and(|n| n.parent != 0);
            if alive {
                let (parent, old_name) = inner.get(node.ino).map(|n| (n.parent, n.name.clone()))?;
                inner.detach(node.ino);
                let free = inner.child(parent, &copy_name).is_none();
                let n = inner.get_mut(node.ino)?;
                if free {
                    n.name = copy_name.clone();
                }
                if n.overwrites.as_ref().is_some_and(|o| o.key == key) {
                    n.overwrites = None;
                }
                if n.generation == node.generation {
                    n.dirty = false;
                }
                n.attrs_known = true;
                let name_now = n.name.clone();
                inner.held.remove(&parent);
                inner.children.entry(parent).or_default().insert(name_now, node.ino);
                inner.set_remote(node.ino, Some(remote));
                inner.persist(node.ino, &mut batch)?;
                if let Ok(p) = inner.get_mut(parent) {
                    // Relist so the bucket's version appears at the original name.
                    p.listed_at = None;
                }
                // The kernel's entry for the name now names the copy.
                inval.push(Invalidation::Entry { parent, name: old_name });
                inval.push(Invalidation::Inode(parent));
            }
            inner.upload_epoch += 1;
            inner.record_conflict(record, &mut batch)?;
        }
        self.finish(seq, batch)?;
        for what in inval {
            self.invalidate(what);
        }
        Ok(())
    }

    /// A three-way merge of ours and the bucket's version, from the base both came from,
    /// as it is kept in the block cache. Text files up to [`MERGE_MAX`] only; anything else
    /// says why it falls back to keep-both.
    async fn try_merge(
        &self,
        node: &Inode,
        base: Option<&Remote>,
        moved: bool,
        content: &Content,
        theirs: Option<&Theirs>,
    ) -> FsResult<Merged> {
        let fallback = |why: &str| Ok(Merged::Fallback(why.to_string()));
        let Some(theirs) = theirs else { return fallback("the file was deleted in the bucket") };
        if moved {
            return fallback("the file was renamed here");
        }
        let Some(base) = base else { return fallback("both created the file: there is no common version") };
        if [base.size, content.size(), theirs.meta.size].iter().any(|&s| s > MERGE_MAX) {
            return fallback("larger than the 8 MiB a merge takes");
        }
        let open = lock(&self.inner).get(node.ino).is_ok_and(|n| n.open > 0);
        if open {
            return fallback("the file is open here");
        }
        let base_bytes = match self.blocks.cached_whole(base).await {
            Some(b) => b,
            None => match self.fetch_version(base).await {
                Some(b) => b,
                None => return fallback("the version both started from is not in the cache"),
            },
        };
        let their_remote = remote_of(&theirs.meta);
        let opts = GetOptions { if_match: their_remote.etag.clone(), ..Default::default() };
        let their_bytes =
            self.store.get_opts(&obj_path(&their_remote.key)?, opts).await.map_err(stale)?.bytes().await?;
        let ours = content.bytes().await?;
        let text = |b: &Bytes| std::str::from_utf8(b).ok().filter(|t| !t.contains('\0')).map(str::to_owned);
        let (Some(b), Some(o), Some(t)) = (text(&base_bytes), text(&ours), text(&their_bytes)) else {
            return fallback("not a text file");
        };
        // The bucket's version is the base of the merged file: keep it for the next merge.
        self.blocks.keep_whole(&their_remote, their_bytes).await;
        match diffy::merge(&b, &o, &t) {
            Ok(merged) => Ok(Merged::Clean { merged: Bytes::from(merged), theirs: their_remote }),
            Err(_) => fallback("both changed the same lines"),
        }
    }

    /// A base version that is not cached, from a store that keeps old versions (S3 with
    /// versioning, GCS generations, Azure version ids).
    async fn fetch_version(&self, base: &Remote) -> Option<Bytes> {
        let version = base.version.clone()?;
        let opts = GetOptions { version: Some(version), ..Default::default() };
        let r = self.store.get_opts(&obj_path(&base.key).ok()?, opts).await.ok()?;
        let data = r.bytes().await.ok()?;
        (data.len() as u64 == base.size).then_some(data)
    }

    /// The merge replaces the local file, based now on the bucket's version it took in, and
    /// goes up as the file's next change (conditional, like any other: a bucket that changed
    /// again meanwhile is merged again).
    #[allow(clippy::too_many_arguments)]
    async fn apply_merge(
        &self,
        seq: u64,
        node: &Inode,
        key: &str,
        content: &Content,
        merged: Bytes,
        their_remote: Remote,
        theirs: &Option<Theirs>,
    ) -> FsResult<()> {
        let ino = node.ino;
        let (tmp, file) = self.staging.temp(&format!("merge-{ino}"))?;
        let mut out = BlockWriter::new(&file);
        out.write(&merged)?;
        out.finish()?;
        // Durable before it replaces the staged copy: it holds this mount's edit now.
        file.sync_data()?;
        let path = self.rel_path(key);
        let outcome = format!(
            "merged: both changes are in {path} ({} bytes), which goes up as this mount's next change",
            merged.len()
        );
        let local = Version {
            path: Some(path.clone()),
            size: Some(content.size()),
            etag: None,
            hash: Some(content.hash().to_string()),
            modified: node.posix_attrs().mtime,
        };
        let mut batch = Batch::default();
        {
            let mut inner = lock(&self.inner);
            let unchanged = inner
                .get(ino)
                .is_ok_and(|n| n.parent != 0 && n.generation == node.generation && n.open == 0 && n.writing == 0);
            if !unchanged {
                drop(inner);
                let _ = std::fs::remove_file(&tmp);
                return Err(FsError::Stale(format!("{path} changed here while it was merged; merging again")));
            }
            let record = self.conflict_record(Policy::Merge, &path, outcome, Some(path.clone()), theirs, local);
            self.staging.install(ino, &tmp, file)?;
            self.staging.sync_dir()?;
            let n = inner.get_mut(ino)?;
            n.staged = true;
            n.size = merged.len() as u64;
            n.mtime_ns = now_ns();
            n.ctime_ns = n.mtime_ns;
            n.dirty = true;
            n.overwrites = None;
            inner.set_remote(ino, Some(their_remote));
            inner.touch(ino, Duration::ZERO, &mut batch)?;
            inner.upload_epoch += 1;
            inner.record_conflict(record, &mut batch)?;
        }
        self.finish(seq, batch)?;
        self.invalidate(Invalidation::Inode(ino));
        Ok(())
    }

    /// After an upload of a file the merge policy covers, its content stays in the block
    /// cache as the base of a later merge.
    async fn keep_merge_base(&self, key: &str, put: &object_store::PutResult, content: &Content) {
        if content.size() > MERGE_MAX || self.cfg.conflict.for_path(&self.rel_path(key)).0 != Policy::Merge {
            return;
        }
        let remote = Remote {
            key: key.to_string(),
            etag: put.e_tag.clone(),
            version: put.version.clone(),
            size: content.size(),
            modified: None,
        };
        if let Ok(data) = content.bytes().await {
            self.blocks.keep_whole(&remote, data).await;
        }
    }

    /// Builds the record of a conflict, counts it and logs it (one warn line).
    fn conflict_record(
        &self,
        policy: Policy,
        path: &str,
        outcome: String,
        remote_path: Option<String>,
        theirs: &Option<Theirs>,
        local: Version,
    ) -> ConflictRecord {
        lock(&self.counters).conflicts += 1;
        let policy = policy.name();
        tracing::warn!(
            path,
            policy,
            "conflict: the bucket's version of {path} changed since this file was read; {outcome}"
        );
        ConflictRecord {
            time: chrono::Utc::now().timestamp(),
            path: path.to_string(),
            policy: policy.to_string(),
            outcome,
            remote: Version {
                path: remote_path,
                size: theirs.as_ref().map(|t| t.meta.size),
                etag: theirs.as_ref().and_then(|t| t.meta.e_tag.clone()),
                hash: theirs.as_ref().and_then(|t| t.hash.clone()),
                modified: theirs.as_ref().map(|t| t.modified),
            },
            local,
        }
    }

    /// Up to 20 names for a conflict copy of `key`, as (key, file name):
    /// `NAME.conflict-HOST-STAMP.EXT`, then with `-2`, `-3`... after the stamp.
    fn copy_candidates(&self, key: &str) -> impl Iterator<Item = (String, String)> + use<> {
        let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
        let (dir_key, name) = match key.rfind('/') {
            Some(i) => (key[..i].to_string(), key[i + 1..].to_string()),
            None => (String::new(), key.to_string()),
        };
        let host = self.cfg.host.clone();
        (1..=20).map(move |attempt| {
            let stamp = if attempt == 1 { stamp.clone() } else { format!("{stamp}-{attempt}") };
            let copy_name = layout::conflict_name(&name, &host, &stamp);
            let copy_key = if dir_key.is_empty() { copy_name.clone() } else { format!("{dir_key}/{copy_name}") };
            (copy_key, copy_name)
        })
    }

    /// A free `NAME.conflict-HOST-STAMP.EXT` key next to `key`.
    async fn free_copy_key(&self, key: &str) -> FsResult<String> {
        for (copy_key, _) in self.copy_candidates(key) {
            match self.store.head(&obj_path(&copy_key)?).await {
                Err(object_store::Error::NotFound { .. }) => return Ok(copy_key),
                Ok(_) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Exists)
    }

    /// `local` (or `newest` with ours newer): the bucket's version is saved as a conflict
    /// copy (unless `--conflict-loser discard`), then ours is written at the path,
    /// conditional on the version just saved.
    #[allow(clippy::too_many_arguments)]
    async fn local_wins(
        &self,
        seq: u64,
        node: &Inode,
        key: &str,
        moved_from: Option<Remote>,
        content: Content,
        theirs: Option<Theirs>,
        (policy, discard): (Policy, bool),
    ) -> FsResult<()> {
        let path = self.rel_path(key);
        let saved = match &theirs {
            Some(_) if !discard => {
                let copy_key = self.free_copy_key(key).await?;
                lock(&self.inner).in_flight.insert(copy_key.clone());
                self.store.copy(&obj_path(key)?, &obj_path(&copy_key)?).await?;
                Some(copy_key)
            }
            _ => None,
        };
        let base = theirs.as_ref().map(|t| remote_of(&t.meta));
        let put = match self.conditional_put(node.ino, key, base.as_ref(), &content, node.posix_attrs()).await {
            Ok(p) => p,
            Err(PutError::Diverged) => {
                // Changed again meanwhile: the op is retried and decides again.
                return Err(FsError::Stale(format!(
                    "{path} changed again in the bucket while a conflict was resolved"
                )));
            }
            Err(PutError::Other(e)) => return Err(e),
        };
        let outcome = match (&saved, &theirs) {
            (Some(copy), _) => {
                format!("this mount's version kept the path; the bucket's version was saved as {}", self.rel_path(copy))
            }
            (None, Some(_)) => "this mount's version kept the path; the bucket's version was discarded".to_string(),
            (None, None) => "the file was deleted in the bucket; this mount's version was written again".to_string(),
        };
        let remote_path = saved.as_deref().map(|c| self.rel_path(c));
        let local = Version {
            path: Some(path.clone()),
            size: Some(content.size()),
            etag: put.e_tag.clone(),
            hash: Some(content.hash().to_string()),
            modified: node.posix_attrs().mtime,
        };
        let record = self.conflict_record(policy, &path, outcome, remote_path, &theirs, local);
        if saved.is_some() {
            // Relist so the saved copy shows.
            let mut inner = lock(&self.inner);
            if let Some(parent) = inner.get(node.ino).ok().map(|n| n.parent)
                && let Ok(p) = inner.get_mut(parent)
            {
                p.listed_at = None;
            }
        }
        self.record_put(seq, node, key, moved_from, &content, put, Some(record))
    }

    /// `remote` (or `newest` with theirs newer) with `--conflict-loser discard`: this
    /// mount's version is dropped and the file shows the bucket's.
    #[allow(clippy::too_many_arguments)]
    async fn discard_local(
        &self,
        seq: u64,
        node: &Inode,
        key: &str,
        moved_from: Option<Remote>,
        content: &Content,
        theirs: Option<Theirs>,
        policy: Policy,
    ) -> FsResult<()> {
        let Some(t) = &theirs else { return Err(FsError::NotFound) };
        if let Some(old) = &moved_from {
            // We moved away from there: that old object goes, as the move said.
            self.delete_checked(old).await?;
        }
        let path = self.rel_path(key);
        let local = Version {
            path: None,
            size: Some(content.size()),
            etag: None,
            hash: Some(content.hash().to_string()),
            modified: node.posix_attrs().mtime,
        };
        let outcome = "the bucket's version kept the path; this mount's version was discarded".to_string();
        let record = self.conflict_record(policy, &path, outcome, Some(path.clone()), &theirs, local);
        let mut batch = Batch::default();
        {
            let mut inner = lock(&self.inner);
            if inner.get(node.ino).is_ok_and(|n| n.parent != 0) {
                let n = inner.get_mut(node.ino)?;
                if n.staged {
                    n.staged = false;
                    self.staging.remove(node.ino);
                }
                n.dirty = false;
                n.size = t.meta.size;
                n.attrs_known = false;
                n.overwrites = None;
                inner.set_remote(node.ino, Some(remote_of(&t.meta)));
                inner.persist(node.ino, &mut batch)?;
            }
            inner.upload_epoch += 1;
            inner.record_conflict(record, &mut batch)?;
        }
        self.finish(seq, batch)?;
        // The file shows the bucket's version now.
        self.invalidate(Invalidation::Inode(node.ino));
        Ok(())
    }
}

/// Whether `m` is the version `src` records.
fn same_version(m: &object_store::ObjectMeta, src: &Remote) -> bool {
    etag_same(m.e_tag.as_deref(), src.etag.as_deref()) && m.size == src.size
}
