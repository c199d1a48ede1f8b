//! The merge policy: a three-way merge (diff3 by lines) of this mount's version and the
//! bucket's, from the version both started from as the block cache keeps it, for text files
//! up to [`MERGE_MAX`]. A clean merge replaces the local file and goes up as its next change;
//! anything else says why it falls back to keep-both.

use std::time::Duration;

use bytes::Bytes;
use object_store::GetOptions;

use super::{Merged, Policy, Theirs, Version};
use crate::fs::error::{FsError, FsResult};
use crate::fs::object::{obj_path, remote_of, stale};
use crate::fs::staging::BlockWriter;
use crate::fs::types::{Ino, Inode, Invalidation, Remote, Seq, now_ns};
use crate::fs::upload::{Content, Uploader};
use crate::state::Batch;

/// The largest file (each of the three versions) the merge policy merges.
pub const MERGE_MAX: u64 = 8 << 20;

impl Uploader {
    /// A three-way merge of ours and the bucket's version, from the base both came from,
    /// as it is kept in the block cache. Text files up to [`MERGE_MAX`] only; anything else
    /// says why it falls back to keep-both.
    pub(in crate::fs) async fn try_merge(
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
        let open = self.core.lock().get(node.ino).is_ok_and(|n| n.open > 0);
        if open {
            return fallback("the file is open here");
        }
        let base_bytes = match self.core.blocks.cached_whole(base).await {
            Some(b) => b,
            None => match self.fetch_version(base).await {
                Some(b) => b,
                None => return fallback("the version both started from is not in the cache"),
            },
        };
        let their_remote = remote_of(&theirs.meta);
        let opts = GetOptions { if_match: their_remote.etag.clone(), ..Default::default() };
        let their_bytes =
            self.core.store.get_opts(&obj_path(&their_remote.key)?, opts).await.map_err(stale)?.bytes().await?;
        let ours = self.content_bytes(content).await?;
        let text = |b: &Bytes| std::str::from_utf8(b).ok().filter(|t| !t.contains('\0')).map(str::to_owned);
        let (Some(b), Some(o), Some(t)) = (text(&base_bytes), text(&ours), text(&their_bytes)) else {
            return fallback("not a text file");
        };
        // The bucket's version is the base of the merged file: keep it for the next merge.
        self.core.blocks.keep_whole(&their_remote, their_bytes).await;
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
        let r = self.core.store.get_opts(&obj_path(&base.key).ok()?, opts).await.ok()?;
        let data = r.bytes().await.ok()?;
        (data.len() as u64 == base.size).then_some(data)
    }

    /// The merge replaces the local file, based now on the bucket's version it took in, and
    /// goes up as the file's next change (conditional, like any other: a bucket that changed
    /// again meanwhile is merged again).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::fs) async fn apply_merge(
        &self,
        seq: Seq,
        node: &Inode,
        key: &str,
        content: &Content,
        merged: Bytes,
        their_remote: Remote,
        theirs: &Option<Theirs>,
    ) -> FsResult<()> {
        let ino = node.ino;
        let (tmp, file) = self.core.staging.temp(&format!("merge-{ino}"))?;
        let mut out = BlockWriter::new(&file);
        out.write(&merged)?;
        out.finish()?;
        // Durable before it replaces the staged copy: it holds this mount's edit now.
        file.sync_data()?;
        let path = self.core.rel_path(key);
        let outcome = format!(
            "merged: both changes are in {path} ({} bytes), which goes up as this mount's next change",
            merged.len()
        );
        let local = Version {
            path: Some(path.clone()),
            size: Some(content.size()),
            etag: None,
            hash: Some(content.hash().to_string()),
            modified: node.posix_attrs().mtime(),
        };
        let mut batch = Batch::default();
        let mut inner = self.core.lock();
        let unchanged = inner
            .get(ino)
            .is_ok_and(|n| n.parent != Ino::NONE && n.generation == node.generation && n.open == 0 && n.writing == 0);
        if !unchanged {
            drop(inner);
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::Stale(format!("{path} changed here while it was merged; merging again")));
        }
        let record = self.conflict_record(Policy::Merge, &path, outcome, Some(path.clone()), theirs, local);
        self.core.staging.install(ino, &tmp, file)?;
        self.core.staging.sync_dir()?;
        let n = inner.get_mut(ino)?;
        n.staged = true;
        n.size = merged.len() as u64;
        n.mtime_ns = now_ns();
        n.ctime_ns = n.mtime_ns;
        n.dirty = true;
        n.overwrites = None;
        inner.set_remote(ino, Some(their_remote));
        inner.touch(ino, Duration::ZERO, &mut batch)?;
        inner.queue.epoch += 1;
        inner.queue.record_conflict(record, &mut batch)?;
        self.finish(inner, seq, batch)?;
        self.core.invalidate(Invalidation::Inode(ino));
        Ok(())
    }

    /// After an upload of a file the merge policy covers, its content stays in the block
    /// cache as the base of a later merge.
    pub(in crate::fs) async fn keep_merge_base(&self, key: &str, put: &object_store::PutResult, content: &Content) {
        if content.size() > MERGE_MAX || self.core.cfg.conflict.for_path(&self.core.rel_path(key)).0 != Policy::Merge {
            return;
        }
        let remote = Remote {
            key: key.to_string(),
            etag: put.e_tag.clone(),
            version: put.version.clone(),
            size: content.size(),
            modified: None,
        };
        if let Ok(data) = self.content_bytes(content).await {
            self.core.blocks.keep_whole(&remote, data).await;
        }
    }
}
