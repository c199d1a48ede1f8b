//! One change as store calls: the snapshot of a file put conditionally on the version it
//! is based on (single or multipart), compare-then-write where the store does not enforce
//! conditions, the read-back that tells our own earlier upload from someone else's, a
//! server-side move of an unchanged file, and the recording of what landed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::Uploader;
use crate::cache::SealedFile;
use crate::fs::error::{FsError, FsResult};
use crate::fs::object::{etag_same, obj_path, remote_of, same_version, stale};
use crate::fs::sparse;
use crate::fs::staging::{BlockWriter, Snapshot};
use crate::fs::types::{ConflictRecord, Ino, Inode, Invalidation, Remote, Seq};
use crate::layout::{self, PosixAttrs};
use crate::state::Batch;

/// A failure of this process's own machinery (a task, the part budget), not the store's.
pub(super) fn local(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> PutError {
    PutError::Other(local_io(e))
}

pub(super) fn local_io(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> FsError {
    FsError::Io(std::io::Error::other(e))
}

/// What a conditional put found.
pub(crate) enum PutError {
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

/// Whose the object at a key is, when it is not the version a change was based on.
pub(crate) enum Claim {
    /// It holds exactly our content: the put already happened.
    Same(object_store::PutResult),
    /// Our own unrecorded upload: write over this version.
    Rebase(Remote),
    /// Someone else's change.
    Theirs,
}

/// Where the bytes of an upload come from.
pub(crate) enum Content {
    /// A sealed snapshot in the cache dir's temp folder, removed with this value. With a
    /// `base`, it holds only the blocks written here, and the rest is the base's: read
    /// from the bucket (or copied there, server-side) as the upload goes.
    File { path: std::path::PathBuf, file: Arc<SealedFile>, size: u64, hash: String, base: Option<Remote> },
    Bytes {
        data: Bytes,
        hash: String,
        /// Its room in the budget of uploads in flight, if it took some (a snapshot): held,
        /// not read, and given back with the content.
        #[allow(dead_code)]
        room: Option<tokio::sync::OwnedSemaphorePermit>,
    },
}

impl Content {
    pub fn hash(&self) -> &str {
        match self {
            Content::File { hash, .. } | Content::Bytes { hash, .. } => hash,
        }
    }
    pub fn size(&self) -> u64 {
        match self {
            Content::File { size, .. } => *size,
            Content::Bytes { data, .. } => data.len() as u64,
        }
    }
}

impl Content {
    /// The content of a snapshot of a file whose bucket version is `base`. The hash names
    /// the content: of a snapshot over its base, it covers the base's version too.
    pub fn of(
        snap: Snapshot,
        size: u64,
        hash: String,
        base: Option<&Remote>,
        room: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Content {
        match snap {
            Snapshot::Bytes(data) => Content::Bytes { data, hash, room },
            Snapshot::File { path, file, base_len } => {
                let base = base.filter(|_| base_len > 0).cloned();
                let hash = match &base {
                    Some(b) => over_base_hash(&hash, b),
                    None => hash,
                };
                Content::File { path, file, size, hash, base }
            }
        }
    }

    /// Content in memory, outside the budget of uploads in flight (small, or already held).
    pub fn bytes(data: Bytes, hash: String) -> Content {
        Content::Bytes { data, hash, room: None }
    }

    /// The base, if the content takes bytes from one.
    pub fn base(&self) -> Option<&Remote> {
        match self {
            Content::File { base, .. } => base.as_ref(),
            Content::Bytes { .. } => None,
        }
    }
}

/// The name of a content made of the blocks named by `hash` over the version `base`.
fn over_base_hash(hash: &str, base: &Remote) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"autosync-over-base-1\0");
    h.update(hash.as_bytes());
    for part in [&base.etag, &base.version] {
        h.update(&[part.is_some() as u8]);
        h.update(part.as_deref().unwrap_or_default().as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

impl Drop for Content {
    fn drop(&mut self) {
        if let Content::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Uploader {
    /// `len` bytes of `content` from `offset`, the base's bytes read from the bucket (or
    /// the block cache).
    pub(in crate::fs) async fn content_range(&self, content: &Content, offset: u64, len: u64) -> FsResult<Bytes> {
        let (file, size, base) = match content {
            Content::Bytes { data, .. } => return Ok(data.slice(offset as usize..(offset + len) as usize)),
            Content::File { file, size, base, .. } => (Arc::clone(file), *size, base),
        };
        let (mut buf, ranges) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            let (n, ranges) = file.read_sparse(&mut buf, offset)?;
            if n as u64 != len {
                return Err(std::io::Error::other(format!(
                    "the snapshot ended at {} bytes, {size} expected",
                    offset + n as u64
                )));
            }
            Ok((buf, ranges))
        })
        .await
        .map_err(local_io)??;
        if !ranges.is_empty() {
            let Some(base) = base else {
                return Err(FsError::Io(std::io::Error::other("a snapshot takes bytes from a base it does not name")));
            };
            sparse::fill_ranges(&self.core.blocks, base, &mut buf, offset, &ranges).await?;
        }
        Ok(Bytes::from(buf))
    }

    /// The whole content in memory (a merge's: small files only).
    pub(in crate::fs) async fn content_bytes(&self, content: &Content) -> FsResult<Bytes> {
        self.content_range(content, 0, content.size()).await
    }

    /// The content of `src` as it is in the bucket, for an upload that changes only its
    /// name or attributes: downloaded, or for a big file, a snapshot over it with nothing
    /// written (its bytes read, or copied server-side, as the upload goes).
    pub(super) async fn download_snapshot(&self, seq: Seq, src: &Remote) -> FsResult<Content> {
        if sparse::stages_over_base(src, src.size, self.core.cfg.multipart_threshold) {
            let (path, file) = self.core.staging.temp_over_base(&format!("up-{seq}"), src.size)?;
            let snap = Snapshot::File { path, file: Arc::new(file), base_len: src.size };
            return Ok(Content::of(snap, src.size, "nothing written".into(), Some(src), None));
        }
        let opts = GetOptions { if_match: src.etag.clone(), ..Default::default() };
        let res = self.core.store.get_opts(&obj_path(&src.key)?, opts).await.map_err(stale)?;
        let mut stream = res.into_stream();
        if src.size <= self.core.cfg.multipart_threshold {
            let room = self.part_room(src.size).await?;
            let mut data = Vec::with_capacity(src.size as usize);
            while let Some(chunk) = stream.next().await {
                data.extend_from_slice(&chunk?);
            }
            let hash = blake3::hash(&data).to_hex().to_string();
            return Ok(Content::Bytes { data: data.into(), hash, room: Some(room) });
        }
        let (path, file) = self.core.staging.temp(&format!("up-{seq}"))?;
        let mut out = BlockWriter::new(&file);
        while let Some(chunk) = stream.next().await {
            out.write(&chunk?)?;
        }
        let (size, hash) = out.finish()?;
        Ok(Content::File { path, file: Arc::new(file), size, hash, base: None })
    }

    /// What the key of `src` holds now (its HEAD), or None.
    pub(in crate::fs) async fn head_source(&self, src: &Remote) -> FsResult<Option<object_store::ObjectMeta>> {
        match self.core.store.head(&obj_path(&src.key)?).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A rename of an unchanged file: server-side copy, then delete of the old key.
    pub(super) async fn move_object(&self, seq: Seq, node: &Inode, key: &str, src: &Remote) -> FsResult<()> {
        let dest = obj_path(key)?;
        // The copy takes whatever the old key holds: it must still be the version this
        // mount shows (one HEAD; a change in the moment between it and the copy is not seen).
        let now = self.head_source(src).await?;
        if !now.as_ref().is_some_and(|m| same_version(m, src)) {
            let Some(content) = self.source_moved_on(seq, node, src, now).await? else { return Ok(()) };
            return self.put_and_record(seq, node, key, None, Some(src.clone()), content, node.posix_attrs()).await;
        }
        match self.core.store.head(&dest).await {
            Err(object_store::Error::NotFound { .. }) => {}
            Ok(_) => {
                // Someone else created this path meanwhile: keep theirs, ours becomes a copy.
                let content = self.download_snapshot(seq, src).await?;
                return self.resolve_conflict(seq, node, key, None, Some(src.clone()), content).await;
            }
            Err(e) => return Err(e.into()),
        }
        self.core.queue().writing(seq, key);
        self.core.store.copy(&obj_path(&src.key)?, &dest).await?;
        let meta = self.core.store.head(&dest).await?;
        let mut batch = Batch::default();
        let mut inner = self.core.lock();
        // The old key goes through the queue: hidden at once, so readers and listings
        // never see it missing while the inode still points at it.
        if inner.contains(node.ino) {
            inner.set_remote(node.ino, Some(remote_of(&meta)));
            let left_behind = inner.get_mut(node.ino)?.overwrites.take_if(|o| o.key != key);
            inner.persist(node.ino, &mut batch)?;
            if let Some(o) = left_behind {
                inner.retire(o, Duration::ZERO, &mut batch)?;
            }
        } else {
            // Deleted while we moved it.
            inner.retire(remote_of(&meta), Duration::ZERO, &mut batch)?;
        }
        // After recording the new key, so a file now at the old key can claim it.
        inner.retire(src.clone(), Duration::ZERO, &mut batch)?;
        inner.queue.epoch += 1;
        self.finish(inner, seq, batch)?;
        self.uploaded("move", key, Some(meta.size), meta.e_tag.clone());
        Ok(())
    }

    /// Another name of a file (a hard link) becomes a server-side copy of the file's
    /// object `src`, group id and attributes included. An object another client put at the
    /// name meanwhile stays: the name leaves this mount (the file keeps its other names).
    pub(super) async fn copy_alias(&self, seq: Seq, node: Inode, key: String, src: Remote) -> FsResult<()> {
        let dest = obj_path(&key)?;
        let ours = [&node.remote, &node.overwrites].into_iter().flatten().find(|r| r.key == key).cloned();
        match self.core.store.head(&dest).await {
            Err(object_store::Error::NotFound { .. }) => {}
            Ok(m) if ours.as_ref().is_some_and(|r| etag_same(r.etag.as_deref(), m.e_tag.as_deref())) => {}
            Ok(_) => {
                tracing::warn!(
                    key,
                    "another client wrote an object at a hard link's name: it stays, and the link goes"
                );
                let mut batch = Batch::default();
                let mut l = self.core.lock();
                if let Ok(n) = l.get(node.ino).cloned()
                    && n.link_of.is_some()
                {
                    l.drop_remote(&n, Some(&key), Duration::ZERO, &mut batch)?;
                    l.remove_name(node.ino, &mut batch)?;
                    self.core.invalidate(Invalidation::Entry { parent: n.parent, name: n.name });
                }
                return self.finish(l, seq, batch);
            }
            Err(e) => return Err(e.into()),
        }
        self.core.queue().writing(seq, &key);
        self.core.store.copy(&obj_path(&src.key)?, &dest).await?;
        let meta = self.core.store.head(&dest).await?;
        let mut batch = Batch::default();
        let mut l = self.core.lock();
        if l.get(node.ino).is_ok_and(|n| n.link_of.is_some() && n.parent != Ino::NONE) {
            let moved_from = l.get(node.ino)?.remote.clone().filter(|r| r.key != key);
            l.set_remote(node.ino, Some(remote_of(&meta)));
            let n = l.get_mut(node.ino)?;
            // The object it replaced at its key is used up; one at another key is left behind.
            let left_behind = n.overwrites.take().filter(|o| o.key != key);
            if n.generation == node.generation {
                n.dirty = false;
            }
            l.persist(node.ino, &mut batch)?;
            // After recording the new key, so a file now at an old key can claim it.
            for old in [moved_from, left_behind].into_iter().flatten() {
                l.retire(old, Duration::ZERO, &mut batch)?;
            }
        } else {
            // The file itself moved to this name meanwhile (its name there went, or another
            // tool's edit split it off): this copy of its content is its object now.
            let file = l.ino_at_key(&key).filter(|&o| Some(o) == node.link_of);
            match file {
                Some(f) if l.get(f).is_ok_and(|n| n.remote.as_ref().is_some_and(|r| r.key == key)) => {
                    l.set_remote(f, Some(remote_of(&meta)));
                    l.persist(f, &mut batch)?;
                }
                // Removed (or split off) while we copied.
                _ => l.retire(remote_of(&meta), Duration::ZERO, &mut batch)?,
            }
        }
        l.queue.epoch += 1;
        self.finish(l, seq, batch)?;
        self.uploaded("link", &key, Some(meta.size), meta.e_tag.clone());
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn put_and_record(
        &self,
        seq: Seq,
        node: &Inode,
        key: &str,
        base: Option<Remote>,
        moved_from: Option<Remote>,
        content: Content,
        attrs: PosixAttrs,
    ) -> FsResult<()> {
        self.core.queue().writing(seq, key);
        tracing::debug!(key, ?base, ?moved_from, "put");
        let mut content = content;
        let mut result = self.conditional_put(node.ino, key, base.as_ref(), &content, &attrs).await;
        if matches!(&result, Err(PutError::Other(e)) if e.is_gone()) && content.base().is_some() {
            // The version the file is staged over is gone from the bucket: what this mount
            // has of it goes in, and the rest comes from the bucket's version now.
            content = self.settle_over_base(content).await?;
            result = self.conditional_put(node.ino, key, base.as_ref(), &content, &attrs).await;
        }
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
    pub(in crate::fs) fn record_put(
        &self,
        seq: Seq,
        node: &Inode,
        key: &str,
        moved_from: Option<Remote>,
        content: &Content,
        put: object_store::PutResult,
        conflict: Option<ConflictRecord>,
    ) -> FsResult<()> {
        let mut batch = Batch::default();
        let version = put.e_tag.clone();
        let mut inner = self.core.lock();
        let remote = Remote {
            key: key.to_string(),
            etag: put.e_tag,
            version: put.version,
            size: content.size(),
            modified: None,
        };
        if inner.contains(node.ino) && inner.get(node.ino)?.parent != Ino::NONE {
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
                // A copy staged over its base holds the blocks written here, which are
                // now the bucket's: nothing to keep (the next edit stages afresh, and
                // sends only what it writes).
                if content.base().is_some() && n.open == 0 && n.writing == 0 {
                    n.staged = false;
                    self.core.staging.remove(node.ino);
                }
            }
            inner.persist(node.ino, &mut batch)?;
            if let Some(o) = left_behind {
                inner.retire(o, Duration::ZERO, &mut batch)?;
            }
            // The file's other names (hard links) copy this version.
            if !inner.get(node.ino)?.dirty {
                inner.requeue_aliases(node.ino, &mut batch)?;
            }
        } else {
            // Deleted while it was uploading. A file that took over the version this put
            // wrote over (a rename onto it meanwhile) takes over this one instead: it is the
            // same file's next version, ours, not another client's.
            let replaced = [&node.remote, &node.overwrites].into_iter().flatten().find(|r| r.key == key);
            inner.retire_successor(remote, replaced, Duration::ZERO, &mut batch)?;
        }
        // After recording the new key, so a file now at the old key can claim it.
        if let Some(old) = moved_from {
            inner.retire(old, Duration::ZERO, &mut batch)?;
        }
        inner.queue.epoch += 1;
        if let Some(record) = conflict {
            inner.queue.record_conflict(record, &mut batch)?;
        }
        self.finish(inner, seq, batch)?;
        self.uploaded("put", key, Some(content.size()), version);
        Ok(())
    }

    /// Writes `content` at `key` only if the object there is still `base` (or absent when
    /// `base` is None). Uses the store's conditional writes where the probe found them, and
    /// compare-then-write elsewhere (a race window: see docs/SEMANTICS.md). An object there
    /// that is our own upload which a crash kept us from recording is written over.
    pub(in crate::fs) async fn conditional_put(
        &self,
        ino: Ino,
        key: &str,
        base: Option<&Remote>,
        content: &Content,
        attrs: &PosixAttrs,
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
        ino: Ino,
        key: &str,
        base: Option<&Remote>,
        content: &Content,
        attrs: &PosixAttrs,
    ) -> Result<object_store::PutResult, PutError> {
        let path = obj_path(key)?;
        let origin = format!("{}:{ino}", self.core.writer);
        let mut attributes = attrs.to_attributes(Some(content.hash()), Some(&origin));
        attributes.insert(
            object_store::Attribute::Metadata(layout::META_HOST.into()),
            object_store::AttributeValue::from(self.core.cfg.host.clone()),
        );
        if !self.core.cfg.user.is_empty() {
            attributes.insert(
                object_store::Attribute::Metadata(layout::META_USER.into()),
                object_store::AttributeValue::from(self.core.cfg.user.clone()),
            );
        }
        let multipart = content.size() > self.core.cfg.multipart_threshold;
        let native = match base {
            None => self.core.caps.create,
            Some(b) => self.core.caps.update && (b.etag.is_some() || b.version.is_some()),
        };
        if !native || multipart {
            // Compare, then write.
            let current = match self.core.store.head(&path).await {
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
        if multipart {
            return self.put_multipart(&path, attributes, content).await;
        }
        let res = {
            // In memory while it goes up: within the budget of uploads in flight (a snapshot
            // in memory took its room when it was taken).
            let _room = match content {
                Content::Bytes { .. } => None,
                Content::File { .. } => Some(self.part_room(content.size()).await?),
            };
            let payload = PutPayload::from_bytes(self.content_range(content, 0, content.size()).await?);
            self.core.counters().bytes_sent += content.size();
            let opts = PutOptions { mode, attributes, ..Default::default() };
            self.core.store.put_opts(&path, payload, opts).await
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
    async fn claim(&self, ino: Ino, path: &Path, content: &Content) -> Result<Claim, PutError> {
        let opts = GetOptions { head: true, ..Default::default() };
        let r = match self.core.store.get_opts(path, opts).await {
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
            (writer == self.core.writer).then(|| of.parse::<u64>().ok()).flatten()
        });
        let Some(of) = ours else { return Ok(Claim::Theirs) };
        // Written by this mount state for this inode: an upload a crash kept us from
        // recording, which nobody changed since. Not one written for another of our inodes:
        // a server-side copy (another mount's rename of our object) keeps our origin.
        if of == ino.0 {
            return Ok(Claim::Rebase(remote_of(&meta)));
        }
        Ok(Claim::Theirs)
    }
}
