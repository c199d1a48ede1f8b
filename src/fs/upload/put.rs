//! One change as store calls: the snapshot of a file put conditionally on the version it
//! is based on (single or multipart), compare-then-write where the store does not enforce
//! conditions, the read-back that tells our own earlier upload from someone else's, a
//! server-side move of an unchanged file, and the recording of what landed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, UpdateVersion};

use super::Uploader;
use crate::cache::SealedFile;
use crate::fs::error::{FsError, FsResult};
use crate::fs::object::{etag_same, obj_path, remote_of, same_version, stale};
use crate::fs::staging::{BlockWriter, Snapshot};
use crate::fs::types::{ConflictRecord, Ino, Inode, Remote, Seq};
use crate::layout::{self, PosixAttrs};
use crate::state::Batch;

/// The smallest multipart part (S3 wants 5 MiB for every part but the last).
pub const MIN_PART: u64 = 8 << 20;
/// Parts in memory at once, across every upload under way (in MiB-sized permits).
pub const PART_BUDGET: u64 = 64 << 20;

/// A failure of this process's own machinery (a task, the part budget), not the store's.
fn local(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> PutError {
    PutError::Other(FsError::Io(std::io::Error::other(e)))
}

/// S3's largest part.
const MAX_PART: u64 = 5 << 30;

/// The part size for a file of `size` bytes: [`MIN_PART`], or larger (in whole MiB) for
/// files so big that 8 MiB parts would pass S3's limit of 10,000 parts. A part larger than
/// the budget takes all of it.
pub fn part_size(size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    size.div_ceil(9_000).div_ceil(MIB).saturating_mul(MIB).clamp(MIN_PART, MAX_PART)
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
    /// The whole content in memory (for a merge: small files only).
    pub async fn bytes(&self) -> FsResult<Bytes> {
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

    pub fn of(snap: Snapshot, size: u64, hash: String) -> Content {
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

impl Uploader {
    pub(super) async fn download_snapshot(&self, seq: Seq, src: &Remote) -> FsResult<Content> {
        let opts = GetOptions { if_match: src.etag.clone(), ..Default::default() };
        let res = self.core.store.get_opts(&obj_path(&src.key)?, opts).await.map_err(stale)?;
        let mut stream = res.into_stream();
        if src.size <= self.core.cfg.multipart_threshold {
            let mut data = Vec::with_capacity(src.size as usize);
            while let Some(chunk) = stream.next().await {
                data.extend_from_slice(&chunk?);
            }
            let hash = blake3::hash(&data).to_hex().to_string();
            return Ok(Content::Bytes { data: data.into(), hash });
        }
        let (path, file) = self.core.staging.temp(&format!("up-{seq}"))?;
        let mut out = BlockWriter::new(&file);
        while let Some(chunk) = stream.next().await {
            out.write(&chunk?)?;
        }
        let (size, hash) = out.finish()?;
        Ok(Content::File { path, file: Arc::new(file), size, hash })
    }

    /// What the key of `src` holds now (its HEAD), or None.
    pub(super) async fn head_source(&self, src: &Remote) -> FsResult<Option<object_store::ObjectMeta>> {
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
            }
            inner.persist(node.ino, &mut batch)?;
            if let Some(o) = left_behind {
                inner.retire(o, Duration::ZERO, &mut batch)?;
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

    /// A multipart upload of `content` at `path`: parts of [`part_size`] read one after
    /// another and sent while the next are read, as many at once as the shared part
    /// budget has room for (so 16 large files going up together hold at most
    /// [`PART_BUDGET`] of parts in memory, or one part, for files whose parts are larger).
    /// Any part failing aborts the whole upload.
    async fn put_parts(
        &self,
        path: &Path,
        opts: PutMultipartOptions,
        content: &Content,
    ) -> Result<object_store::PutResult, PutError> {
        let size = content.size();
        let part = part_size(size);
        let mut upload = self.core.store.put_multipart_opts(path, opts).await?;
        // Parts run as tasks of their own, so they go on while the next part is read (and
        // while it waits for room); the set aborts them if it is dropped.
        let mut in_flight = tokio::task::JoinSet::new();
        let joined = |r: Result<object_store::Result<()>, tokio::task::JoinError>| -> Result<(), PutError> {
            r.map_err(local)?.map_err(PutError::from)
        };
        let mut offset = 0u64;
        let result: Result<(), PutError> = async {
            while offset < size {
                let len = part.min(size - offset);
                let permit = Arc::clone(&self.part_budget)
                    .acquire_many_owned(len.div_ceil(1 << 20).min(PART_BUDGET >> 20) as u32)
                    .await
                    .map_err(local)?;
                let data = match content {
                    Content::Bytes { data, .. } => data.slice(offset as usize..(offset + len) as usize),
                    Content::File { file, .. } => {
                        let f = Arc::clone(file);
                        let at = offset;
                        tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; len as usize];
                            let n = f.read_at(&mut buf, at)?;
                            if n as u64 != len {
                                return Err(std::io::Error::other(format!(
                                    "the snapshot ended at {} bytes, {size} expected",
                                    at + n as u64
                                )));
                            }
                            Ok(Bytes::from(buf))
                        })
                        .await
                        .map_err(local)?
                        .map_err(FsError::Io)?
                    }
                };
                offset += len;
                let put = upload.put_part(data.into());
                in_flight.spawn(async move {
                    let r = put.await;
                    drop(permit);
                    r
                });
                // Reap what has finished, without waiting for what has not.
                while let Some(r) = in_flight.try_join_next() {
                    joined(r)?;
                }
                let cut_short = offset < size
                    && (|| {
                        fail::fail_point!("upload-multipart-middle", |_| true);
                        false
                    })();
                if cut_short {
                    // A part goes up first; the upload is never completed.
                    if let Some(r) = in_flight.join_next().await {
                        joined(r)?;
                    }
                    return Err(PutError::Other(FsError::Halted("upload-multipart-middle")));
                }
            }
            while let Some(r) = in_flight.join_next().await {
                joined(r)?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(upload.complete().await?),
            // Stopped at a failpoint, as by a crash: nothing is cleaned up.
            Err(e @ PutError::Other(FsError::Halted(_))) => Err(e),
            Err(e) => {
                drop(in_flight);
                if let Err(abort) = upload.abort().await {
                    tracing::debug!(%path, "aborting a failed multipart upload: {abort}");
                }
                Err(e)
            }
        }
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
        ino: Ino,
        key: &str,
        base: Option<&Remote>,
        content: &Content,
        attrs: PosixAttrs,
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
            let opts = PutMultipartOptions { attributes, ..Default::default() };
            return self.put_parts(&path, opts, content).await;
        }
        let res = {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_whole_mib_at_least_the_minimum_and_at_most_10000() {
        assert_eq!(part_size(33 << 20), MIN_PART);
        assert_eq!(part_size(70 << 30), MIN_PART);
        for size in [1u64 << 20, 300 << 20, 71 << 30, 100 << 30, 640 << 30, 5 << 40] {
            let p = part_size(size);
            assert!((MIN_PART..=MAX_PART).contains(&p) && p.is_multiple_of(1 << 20), "{size}: {p}");
            assert!(size.div_ceil(p) <= 10_000, "{size} in {} parts of {p}", size.div_ceil(p));
        }
        assert_eq!(part_size(100 << 30), 12 << 20);
        assert_eq!(part_size(1 << 50), MAX_PART);
    }
}
