//! Conflicts: a change whose base is no longer what the bucket holds. Detected by the
//! uploader (a refused conditional put, a compare-then-write that found another version, a
//! move whose source changed); here they are resolved by the path's policy (`policy.rs`):
//! a conflict copy next to the file (keep-both, and the loser of the other policies), ours
//! over theirs (local), theirs over ours (remote, discard), or a merge (`merge.rs`). Every
//! conflict is recorded in the state database, logged once, and is an event.
//!
//! It owns the naming of conflict copies. It changes a local file only by installing a
//! merge, and the tree only through the core's locks.

mod merge;
mod policy;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::{GetOptions, ObjectStoreExt};

pub use merge::MERGE_MAX;
pub use policy::{ConflictConfig, ConflictRecord, ConflictRule, Policy, Version};

use crate::fs::error::{FsError, FsResult};
use crate::fs::events::{Event, Kind as EventKind};
use crate::fs::object::{obj_path, remote_of, same_version};
use crate::fs::sparse;
use crate::fs::types::{Ino, Inode, Invalidation, Remote, Seq};
use crate::fs::upload::{Content, PutError, Uploader};
use crate::layout::{self, PosixAttrs};
use crate::state::Batch;

/// The largest file whose cached version a move carries on when its old object changed.
const MOVE_FROM_CACHE_MAX: u64 = 64 << 20;

/// The bucket's version found when a conflict is resolved.
pub(super) struct Theirs {
    pub meta: object_store::ObjectMeta,
    /// Its `autosync-hash`, if an autosync wrote it.
    pub hash: Option<String>,
    /// Its `mtime` metadata, else its Last-Modified (seconds).
    pub modified: i64,
    /// Its `autosync-host`: the machine whose autosync wrote it.
    pub host: Option<String>,
    /// Its `autosync-user`: the user whose autosync wrote it.
    pub user: Option<String>,
}

/// What a merge attempt came to.
pub(super) enum Merged {
    /// Both changes, merged cleanly; with the bucket's version they were merged into.
    Clean { merged: Bytes, theirs: Remote },
    /// Not mergeable (why): keep both instead.
    Fallback(String),
}

impl Uploader {
    /// A rename (or attribute change) of a file not changed here, whose object at its old
    /// key is no longer the version this mount shows: changed or deleted in the bucket
    /// before the change from here reached it. If the version shown is cached here (all
    /// its blocks), it is carried on as the content (`Some`): the rename keeps what this
    /// mount showed, and the bucket's newer version stays where it is. Otherwise the
    /// file follows the bucket (`None`, the op is done): a newer version takes its place
    /// here and the change is applied to it next; a deleted one leaves the mount.
    /// Recorded as a conflict either way.
    /// `now` is what the old key holds (its HEAD), if anything.
    pub(in crate::fs) async fn source_moved_on(
        &self,
        seq: Seq,
        node: &Inode,
        src: &Remote,
        now: Option<object_store::ObjectMeta>,
    ) -> FsResult<Option<Content>> {
        if now.as_ref().is_some_and(|m| same_version(m, src)) {
            return Err(FsError::Stale(format!("{}: read again", src.key)));
        }
        if src.size <= MOVE_FROM_CACHE_MAX
            && let Some(data) = self.core.blocks.cached_whole(src).await
        {
            tracing::info!(key = %src.key, "the bucket's object changed before this mount's move of it; moving the version this mount showed, from its cache");
            let hash = blake3::hash(&data).to_hex().to_string();
            return Ok(Some(Content::bytes(data, hash)));
        }
        let path = self.core.rel_path(&src.key);
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
            modified: node.posix_attrs().mtime(),
        };
        let mut batch = Batch::default();
        let mut inval = Vec::new();
        let mut inner = self.core.lock();
        let Ok(n) = inner.get(node.ino) else {
            self.finish(inner, seq, batch)?;
            return Ok(None);
        };
        if n.parent == Ino::NONE || n.generation != node.generation {
            // Deleted here meanwhile, or changed again (its newer op is queued): that
            // decides, not this one.
            self.finish(inner, seq, batch)?;
            return Ok(None);
        }
        if n.open > 0 {
            return Err(FsError::Stale(format!("{path} changed in the bucket; trying again once the file is closed")));
        }
        let (parent, name) = (n.parent, n.name.clone());
        let (policy, _) = self.core.cfg.conflict.for_path(&path);
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
                // A file with other names lives on at one of them.
                inner.remove_name(node.ino, &mut batch)?;
                if let Ok(p) = inner.get_mut(parent) {
                    p.listed_at = None;
                }
                inval.push(Invalidation::Entry { parent, name });
                format!(
                    "{path} was deleted in the bucket before this mount's rename or attribute change of it arrived, and it was not cached here; it is gone here too"
                )
            }
        };
        let record = self.conflict_record(policy, &path, outcome, now.as_ref().map(|_| path.clone()), &theirs, local);
        inner.queue.epoch += 1;
        inner.queue.record_conflict(record, &mut batch)?;
        self.finish(inner, seq, batch)?;
        for what in inval {
            self.core.invalidate(what);
        }
        Ok(None)
    }

    /// Settles a change whose base is no longer what the bucket holds at `key`, by the
    /// path's policy. keep-both (and every fallback to it): the bucket's version keeps the
    /// path; ours is saved next to it as `NAME.conflict-HOST-STAMP.EXT`, and the local
    /// inode becomes that copy.
    pub(in crate::fs) async fn resolve_conflict(
        &self,
        seq: Seq,
        node: &Inode,
        key: &str,
        base: Option<Remote>,
        moved_from: Option<Remote>,
        content: Content,
    ) -> FsResult<()> {
        let content = self.settle_over_base(content).await?;
        // The bucket's version now, with its attributes (for `newest`, and the record).
        let theirs =
            match self.core.store.get_opts(&obj_path(key)?, GetOptions { head: true, ..Default::default() }).await {
                Ok(r) => Some(r),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
        let theirs = theirs.map(|r| {
            let (attrs, hash) = PosixAttrs::from_attributes(&r.attributes);
            let modified = attrs.mtime().unwrap_or(r.meta.last_modified.timestamp());
            let mut meta = layout::metadata_map(&r.attributes);
            let (host, user) = (meta.remove(layout::META_HOST), meta.remove(layout::META_USER));
            Theirs { meta: r.meta, hash, modified, host, user }
        });
        let (policy, discard) = self.core.cfg.conflict.for_path(&self.core.rel_path(key));
        let ours_mtime = node.posix_attrs().mtime().unwrap_or(0);
        let local_wins = match policy {
            Policy::KeepBoth | Policy::Remote | Policy::Merge => false,
            Policy::Local => true,
            // A deleted remote has nothing newer to offer.
            Policy::Newest => theirs.as_ref().is_none_or(|t| ours_mtime > t.modified),
            // Ours wins when this mount ranks above the writer of theirs (a writer that
            // names no listed host or user, another tool, ranks below every listed one).
            Policy::Priority => {
                let ours = self.core.cfg.conflict.rank(Some(&self.core.cfg.host), Some(&self.core.cfg.user));
                ours < theirs
                    .as_ref()
                    .map_or(usize::MAX, |t| self.core.cfg.conflict.rank(t.host.as_deref(), t.user.as_deref()))
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
                let mut inner = self.core.lock();
                // The local file becomes the copy: a name the folder still shows here (an
                // entry gone from the bucket, not listed again since) would leave the file
                // at its old name, pointing at the copy's key.
                let parent = inner.get(node.ino).map_or(node.parent, |n| n.parent);
                if inner.child(parent, &copy_name).is_some() {
                    continue;
                }
                inner.queue.writing(seq, &copy_key);
            }
            match self.conditional_put(node.ino, &copy_key, None, &content, &attrs).await {
                Ok(p) => {
                    found = Some((copy_key, copy_name, p));
                    break;
                }
                Err(PutError::Diverged) => continue,
                Err(PutError::Other(e)) => return Err(e),
            }
        }
        let Some((copy_key, copy_name, put)) = found else { return Err(FsError::Exists) };
        let (path, copy_path) = (self.core.rel_path(key), self.core.rel_path(&copy_key));
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
                modified: node.posix_attrs().mtime(),
            },
        );
        if let Some(old) = &moved_from {
            // Our old location is no longer ours to keep: the content lives in the copy now.
            self.delete_checked(old).await?;
        }
        let mut batch = Batch::default();
        let mut inval = Vec::new();
        let mut inner = self.core.lock();
        let remote =
            Remote { key: copy_key, etag: put.e_tag, version: put.version, size: content.size(), modified: None };
        let alive = inner.get(node.ino).is_ok_and(|n| n.parent != Ino::NONE);
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
            inner.move_to(node.ino, parent, &name_now)?;
            inner.set_remote(node.ino, Some(remote));
            inner.persist(node.ino, &mut batch)?;
            // The file's other names (hard links) copy this version.
            inner.requeue_aliases(node.ino, &mut batch)?;
            if let Ok(p) = inner.get_mut(parent) {
                // Relist so the bucket's version appears at the original name.
                p.listed_at = None;
            }
            // The kernel's entry for the name now names the copy.
            inval.push(Invalidation::Entry { parent, name: old_name });
            inval.push(Invalidation::Inode(parent));
        }
        inner.queue.epoch += 1;
        inner.queue.record_conflict(record, &mut batch)?;
        self.finish(inner, seq, batch)?;
        for what in inval {
            self.core.invalidate(what);
        }
        Ok(())
    }

    /// A snapshot staged over a base that the bucket no longer holds (replaced or deleted
    /// before this upload read it) cannot be read whole any more. The base's blocks this
    /// mount has cached go into it; the bytes neither written nor cached here are taken
    /// from what the base's key holds now (zeros past its end, or where it is gone), said in
    /// one log line. Every byte written here is kept.
    pub(in crate::fs) async fn settle_over_base(&self, mut content: Content) -> FsResult<Content> {
        let Some(base) = content.base().cloned() else { return Ok(content) };
        let now = self.head_source(&base).await?;
        if now.as_ref().is_some_and(|m| same_version(m, &base)) {
            return Ok(content);
        }
        if let Content::File { file, hash, base: slot, .. } = &mut content {
            let left = sparse::fill_cached(&self.core.blocks, file, &base).await?;
            let f = Arc::clone(file);
            let new_base = match (&now, left) {
                (_, 0) => None,
                (Some(m), _) => Some(remote_of(m)),
                (None, _) => None,
            };
            let cut = new_base.as_ref().map_or(0, |b| b.size);
            tokio::task::spawn_blocking(move || f.cut_base(cut).and_then(|()| f.settle_base().map(|_| ())))
                .await
                .map_err(|e| FsError::Io(std::io::Error::other(e)))??;
            if left > 0 {
                let from = match &now {
                    Some(_) => "from the version the bucket holds there now (zeros past its end)",
                    None => "as zeros (the object is gone)",
                };
                tracing::warn!(
                    key = %base.key,
                    blocks = left,
                    "the version this edit started from changed in the bucket before it was uploaded; {left} block(s) of 64 KiB neither written nor cached here are taken {from}; every byte written here is kept"
                );
            }
            *hash = blake3::hash(format!("settled:{hash}:{:?}", new_base.as_ref().map(|b| &b.etag)).as_bytes())
                .to_hex()
                .to_string();
            *slot = new_base;
        }
        Ok(content)
    }

    /// Builds the record of a conflict, counts it and logs it (one warn line).
    pub(in crate::fs) fn conflict_record(
        &self,
        policy: Policy,
        path: &str,
        outcome: String,
        remote_path: Option<String>,
        theirs: &Option<Theirs>,
        local: Version,
    ) -> ConflictRecord {
        self.core.counters().conflicts += 1;
        let policy = policy.name();
        tracing::warn!(
            path,
            policy,
            "conflict: the bucket's version of {path} changed since this file was read; {outcome}"
        );
        let mut event =
            Event::new(EventKind::Conflict).path(path).version(theirs.as_ref().and_then(|t| t.meta.e_tag.clone()));
        event.policy = Some(policy.to_string());
        event.outcome = Some(outcome.clone());
        if let Some(other) =
            local.path.as_deref().filter(|p| *p != path).or(remote_path.as_deref().filter(|p| *p != path))
        {
            event = event.from(other);
        }
        self.core.events.emit(event);
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
        let host = self.core.cfg.host.clone();
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
            match self.core.store.head(&obj_path(&copy_key)?).await {
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
        seq: Seq,
        node: &Inode,
        key: &str,
        moved_from: Option<Remote>,
        content: Content,
        theirs: Option<Theirs>,
        (policy, discard): (Policy, bool),
    ) -> FsResult<()> {
        let path = self.core.rel_path(key);
        let saved = match &theirs {
            Some(_) if !discard => {
                let copy_key = self.free_copy_key(key).await?;
                self.core.queue().writing(seq, &copy_key);
                self.core.store.copy(&obj_path(key)?, &obj_path(&copy_key)?).await?;
                Some(copy_key)
            }
            _ => None,
        };
        let base = theirs.as_ref().map(|t| remote_of(&t.meta));
        let put = match self.conditional_put(node.ino, key, base.as_ref(), &content, &node.posix_attrs()).await {
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
                format!(
                    "this mount's version kept the path; the bucket's version was saved as {}",
                    self.core.rel_path(copy)
                )
            }
            (None, Some(_)) => "this mount's version kept the path; the bucket's version was discarded".to_string(),
            (None, None) => "the file was deleted in the bucket; this mount's version was written again".to_string(),
        };
        let remote_path = saved.as_deref().map(|c| self.core.rel_path(c));
        let local = Version {
            path: Some(path.clone()),
            size: Some(content.size()),
            etag: put.e_tag.clone(),
            hash: Some(content.hash().to_string()),
            modified: node.posix_attrs().mtime(),
        };
        let record = self.conflict_record(policy, &path, outcome, remote_path, &theirs, local);
        if saved.is_some() {
            // Relist so the saved copy shows.
            let mut inner = self.core.lock();
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
        seq: Seq,
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
        let path = self.core.rel_path(key);
        let local = Version {
            path: None,
            size: Some(content.size()),
            etag: None,
            hash: Some(content.hash().to_string()),
            modified: node.posix_attrs().mtime(),
        };
        let outcome = "the bucket's version kept the path; this mount's version was discarded".to_string();
        let record = self.conflict_record(policy, &path, outcome, Some(path.clone()), &theirs, local);
        let mut batch = Batch::default();
        let mut inner = self.core.lock();
        if inner.get(node.ino).is_ok_and(|n| n.parent != Ino::NONE) {
            let n = inner.get_mut(node.ino)?;
            if n.staged {
                n.staged = false;
                self.core.staging.remove(node.ino);
            }
            n.dirty = false;
            n.size = t.meta.size;
            n.attrs_known = false;
            n.overwrites = None;
            inner.set_remote(node.ino, Some(remote_of(&t.meta)));
            inner.persist(node.ino, &mut batch)?;
            inner.requeue_aliases(node.ino, &mut batch)?;
        }
        inner.queue.epoch += 1;
        inner.queue.record_conflict(record, &mut batch)?;
        self.finish(inner, seq, batch)?;
        // The file shows the bucket's version now.
        self.core.invalidate(Invalidation::Inode(node.ino));
        Ok(())
    }
}
