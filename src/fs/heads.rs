//! Attributes from the bucket's HEAD answers: the mode, owner, mtime and symlink target of
//! inodes known only from a listing, and the close-to-open check of a file that is opened
//! again. Reads the bucket, then applies what came back to the tree, only if the inode
//! still holds the version asked about and has no local change.

use std::time::SystemTime;

use futures::StreamExt;
use object_store::{GetOptions, ObjectStoreExt};

use super::FsError;
use super::FsResult;
use super::core::Core;
use super::events::{Event, Kind as EventKind};
use super::object::{Head, etag_same, obj_path, remote_of};
use super::types::{Ino, Inode, Invalidation, Kind, to_ns};
use crate::layout::{self, PosixAttrs};
use crate::state::Batch;

/// Attribute requests (HEAD) in flight at once for one listing.
const HEADS_AT_ONCE: usize = 32;
/// Answers applied to the tree (and committed) together.
const HEADS_APPLIED_TOGETHER: usize = 512;

impl Core {
    /// Reads object metadata (mode, owner, mtime, symlink) for inodes known only from a
    /// listing. Failures leave the defaults.
    pub async fn fetch_attrs(&self, inos: Vec<Ino>) {
        if inos.is_empty() {
            return;
        }
        // A folder's attributes live on its marker object.
        let keys =
            self.keys_of(&inos, |n, key| Some(if n.kind == Kind::Dir { layout::marker_key(key) } else { key.into() }));
        // Answers are applied in batches as they come, while the next requests are already
        // under way: a folder of 100,000 new files holds a batch of answers at a time, not
        // all of them, and never waits for the slowest answer of a batch to ask further.
        let mut answers = futures::stream::iter(keys)
            .map(|(ino, key)| async move {
                let Ok(path) = obj_path(&key) else { return (ino, None) };
                let opts = GetOptions { head: true, ..Default::default() };
                // Keep the answer, not its body: on the local store that is an open file.
                let head = tokio::time::timeout(self.cfg.io_timeout, self.store.get_opts(&path, opts)).await;
                (ino, head.ok().and_then(|r| r.ok()).map(Head::from))
            })
            .buffer_unordered(HEADS_AT_ONCE)
            .chunks(HEADS_APPLIED_TOGETHER);
        while let Some(batch) = answers.next().await {
            self.apply_heads(batch).await;
        }
    }

    /// Applies the attributes of HEAD answers (`None`: no object) to their inodes, if the
    /// inodes still hold the version answered for and have no local change, and records
    /// every inode asked about: a listing leaves the recording of its new entries to this,
    /// once their attributes are in (an entry whose answer failed is recorded as listed,
    /// and asked about again at the next listing).
    pub async fn apply_heads(&self, results: Vec<(Ino, Option<Head>)>) {
        let mut symlinks = Vec::new();
        let mut inval = Vec::new();
        {
            let mut l = self.lock();
            let mut batch = Batch::default();
            for (ino, r) in results {
                let Ok(n) = l.get_mut(ino) else { continue };
                match r {
                    // A folder without our marker (another tool's bucket): keep the defaults
                    // instead of asking again at every lookup.
                    None if n.kind == Kind::Dir => n.attrs_known = true,
                    None => {}
                    Some(r) => {
                        let applied = apply_head(n, &r);
                        if applied && n.kind == Kind::Symlink && n.target.is_none() {
                            symlinks.push(ino);
                        }
                        if applied && n.link.is_some() {
                            // A name of a hard-linked file: it may join the file.
                            inval.extend(l.adopt_link(ino, &mut batch));
                        }
                    }
                }
                let _ = l.persist(ino, &mut batch);
            }
            let _ = l.commit(batch, false);
        }
        for what in inval {
            self.invalidate(what);
        }
        self.load_symlinks(symlinks).await;
    }

    /// The object keys to ask about for `inos` known from the bucket: `pick` names the key
    /// of each (or leaves it out).
    fn keys_of(&self, inos: &[Ino], pick: impl Fn(&Inode, &str) -> Option<String>) -> Vec<(Ino, String)> {
        let tree = self.tree();
        inos.iter()
            .filter_map(|&i| {
                let n = tree.get(i).ok()?;
                Some((i, pick(n, &n.remote.as_ref()?.key)?))
            })
            .collect()
    }

    /// The targets of symlinks known only from a listing, read at once and recorded in
    /// one commit.
    async fn load_symlinks(&self, inos: Vec<Ino>) {
        if inos.is_empty() {
            return;
        }
        let keys = self.keys_of(&inos, |n, key| n.target.is_none().then(|| key.into()));
        let targets: Vec<(Ino, String)> = futures::stream::iter(keys)
            .map(|(ino, key)| async move {
                let bytes = self.store.get(&obj_path(&key).ok()?).await.ok()?.bytes().await.ok()?;
                Some((ino, String::from_utf8_lossy(&bytes).into_owned()))
            })
            .buffer_unordered(HEADS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        let mut l = self.lock();
        let mut batch = Batch::default();
        for (ino, target) in targets {
            let Ok(n) = l.get_mut(ino) else { continue };
            n.size = target.len() as u64;
            n.target = Some(target);
            let _ = l.persist(ino, &mut batch);
        }
        let _ = l.commit(batch, false);
    }

    pub async fn load_symlink(&self, ino: Ino) -> FsResult<String> {
        let key = {
            let tree = self.tree();
            let n = tree.get(ino)?;
            if let Some(t) = &n.target {
                return Ok(t.clone());
            }
            n.remote.as_ref().ok_or(FsError::NotFound)?.key.clone()
        };
        let bytes = self.store.get(&obj_path(&key)?).await?.bytes().await?;
        let target = String::from_utf8_lossy(&bytes).into_owned();
        let mut l = self.lock();
        let mut batch = Batch::default();
        let n = l.get_mut(ino)?;
        n.target = Some(target.clone());
        n.size = target.len() as u64;
        l.persist(ino, &mut batch)?;
        l.commit(batch, false)?;
        Ok(target)
    }

    /// Attributes (and a symlink's target) of an inode known only from a listing.
    pub async fn ensure_attrs(&self, ino: Ino) {
        let (known, symlink_unloaded) = {
            let tree = self.tree();
            match tree.get(ino) {
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

    /// Close-to-open: once the folder's listing is older than the TTL, an unchanged local
    /// copy is checked against the bucket (one HEAD) and follows a newer remote version.
    /// A file with local changes keeps them; the upload settles any clash.
    pub async fn revalidate(&self, ino: Ino) {
        let remote = {
            let l = self.lock();
            let Ok(n) = l.get(ino) else { return };
            let fresh = l.get(n.parent).is_ok_and(|p| p.is_listed_fresh(self.cfg.metadata_ttl));
            match &n.remote {
                // A file with other names (hard links) follows the bucket through listings,
                // where a name another tool changed leaves the group.
                Some(r) if !fresh && l.is_settled(ino) && !l.has_aliases(ino) => r.clone(),
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
            // Only the attributes may have changed (see `Listings::refresh`); the content
            // stays, and the attributes come with this same answer.
            if remote.modified.is_some_and(|t| t != meta.last_modified.timestamp()) {
                self.apply_heads(vec![(ino, Some(Head::from(head)))]).await;
            }
            return;
        }
        let mut l = self.lock();
        let mut batch = Batch::default();
        if !l.is_settled(ino) || l.get(ino).ok().and_then(|n| n.remote.as_ref()) != Some(&remote) {
            return;
        }
        if let Ok(n) = l.get_mut(ino) {
            n.size = meta.size;
            n.mtime_ns = to_ns(SystemTime::from(meta.last_modified));
            n.attrs_known = false;
            if n.staged {
                n.staged = false;
                self.staging.remove(ino);
            }
        }
        l.set_remote(ino, Some(remote_of(&meta)));
        let _ = l.persist(ino, &mut batch);
        let _ = l.commit(batch, false);
        l.emit(remote_changed(&l.rel_path(&remote.key), "changed", &meta));
        drop(l);
        self.invalidate(Invalidation::Inode(ino));
    }
}

/// A `remote_changed` event for an object a listing, the poll or an open found.
pub fn remote_changed(path: &str, change: &str, meta: &object_store::ObjectMeta) -> Event {
    Event::new(EventKind::RemoteChanged).path(path).change(change).size(meta.size).version(meta.e_tag.clone())
}

/// Applies what a HEAD answered to an inode, if it still holds the version answered for
/// and has no local change. Returns whether it did.
fn apply_head(n: &mut Inode, r: &Head) -> bool {
    let current = n.kind == Kind::Dir
        || n.remote.as_ref().is_some_and(|rem| etag_same(rem.etag.as_deref(), r.meta.e_tag.as_deref()));
    if n.dirty || !current {
        return false;
    }
    let (attrs, _) = PosixAttrs::from_attributes(&r.attributes);
    if attrs.mtime_ns.is_none() && n.kind != Kind::Dir {
        // Another tool's object: its mtime is the object's Last-Modified.
        n.mtime_ns = to_ns(SystemTime::from(r.meta.last_modified));
    }
    apply_posix(n, attrs);
    if n.kind != Kind::Dir
        && let Some(rem) = n.remote.as_mut()
    {
        // What the attributes were read at, and the generation the store gives this
        // version now (a copy onto itself changes it on GCS).
        rem.modified = Some(r.meta.last_modified.timestamp());
        if r.meta.version.is_some() {
            rem.version = r.meta.version.clone();
        }
    }
    true
}

/// Applies the POSIX attributes an object carries to its inode.
pub fn apply_posix(n: &mut Inode, a: PosixAttrs) {
    if let Some(mode) = a.mode {
        n.perm = (mode & 0o7777) as u16;
        // An object is a file, a symlink or a special file as its mode says; a folder
        // only by its key (a marker).
        if n.kind != Kind::Dir {
            n.kind = match Kind::of_mode(mode) {
                Kind::Dir => Kind::File,
                k => k,
            };
            n.rdev = if matches!(n.kind, Kind::CharDevice | Kind::BlockDevice) { a.rdev.unwrap_or(0) } else { 0 };
        }
    }
    if let Some(u) = a.uid {
        n.uid = u;
    }
    if let Some(g) = a.gid {
        n.gid = g;
    }
    if let Some(t) = a.mtime_ns {
        // Whole seconds (as s3fs writes them) keep a sub-second part known here.
        if t.rem_euclid(1_000_000_000) != 0 || n.mtime_ns.div_euclid(1_000_000_000) != t.div_euclid(1_000_000_000) {
            n.mtime_ns = t;
        }
    }
    n.atime_ns = a.atime_ns;
    n.xattr = a.xattr;
    n.link = a.link;
    n.attrs_known = true;
}
