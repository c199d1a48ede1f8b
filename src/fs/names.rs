//! Changes to names and attributes, as they apply to the tree and the journal at once:
//! create, unlink, rmdir, rename and setattr, each made under the core's locks with the
//! ops it queues and the event it is, then committed. What they need from the bucket first
//! (a fresh listing, the whole subtree of a moved folder, a staged copy) the facade gets
//! before it calls these; nothing here waits.

use std::time::Instant;

use super::core::Locked;
use super::error::{FsError, FsResult};
use super::events::{Event, Kind as EventKind};
use super::object::folder_remote;
use super::types::{Attr, Ino, Inode, Kind, Op, ROOT_INO, SetAttr, now_ns, to_ns};
use crate::layout;
use crate::state::Batch;

/// A name a new entry may take: short enough, storable as a key, not reserved.
pub fn check_name(name: &str) -> FsResult<()> {
    if name.len() > layout::NAME_MAX {
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

const SET_GID: u16 = 0o2000;

/// What a new entry is.
pub struct NewNode<'a> {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<&'a str>,
    /// The device of a device node.
    pub rdev: u32,
}

impl Locked<'_> {
    /// Adds a file, folder, symlink or special file (held by the kernel once) and queues
    /// its upload.
    pub fn add_node(&mut self, parent: Ino, name: &str, new: NewNode<'_>) -> FsResult<Attr> {
        let core = self.core();
        let mut batch = Batch::default();
        let p = self.get(parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        // In a set-group-ID folder, a new entry takes the folder's group, and a new folder
        // the set-group-ID bit too (as on Linux filesystems; the kernel leaves it to us).
        let (mut perm, mut gid) = (new.perm, new.gid);
        if p.perm & SET_GID != 0 {
            gid = p.gid;
            if new.kind == Kind::Dir {
                perm |= SET_GID;
            }
        }
        if self.child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let ino = self.alloc_ino(&mut batch);
        let mut n = Inode::new(ino, parent, name.to_string(), new.kind, perm, new.uid, gid);
        n.dirty = true;
        // The kernel gets an entry for it.
        n.lookups = 1;
        match new.kind {
            Kind::Dir => {
                n.listed_at = Some(Instant::now());
                n.listed = true;
            }
            Kind::Symlink => {
                n.size = new.target.map_or(0, |t| t.len() as u64);
                n.target = new.target.map(str::to_string);
            }
            Kind::File => {
                core.staging.create_new(ino)?;
                n.staged = true;
            }
            Kind::CharDevice | Kind::BlockDevice => n.rdev = new.rdev,
            Kind::Fifo | Kind::Socket => {}
        }
        self.insert(n);
        self.changed_in(parent);
        // A new file is open (create): its upload waits as for a write.
        let delay = if new.kind == Kind::File { core.cfg.open_upload_delay } else { core.cfg.upload_delay };
        self.touch(ino, delay, &mut batch)?;
        let attr = self.attr(ino)?;
        self.commit(batch, false)?;
        self.emit_created(ino, attr.size);
        Ok(attr)
    }

    /// A `created` event for the name of inode `at` (a new entry, or a hard link).
    pub(super) fn emit_created(&self, at: Ino, size: u64) {
        let mut e = Event::new(EventKind::Created).size(size);
        if let Some(p) = self.path_of(at) {
            e = e.path(p);
        }
        self.emit(e);
    }

    /// Removes a file or symlink. One still open stays readable (its staging copy, made by
    /// the caller) until its last release.
    pub fn unlink_node(&mut self, parent: Ino, ino: Ino) -> FsResult<()> {
        let delay = self.core().cfg.upload_delay;
        let mut batch = Batch::default();
        let n = self.get(ino)?;
        if n.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let node = n.clone();
        let path = self.path_of(ino);
        self.drop_remote(&node, None, delay, &mut batch)?;
        self.remove_name(ino, &mut batch)?;
        self.changed_in(parent);
        self.commit(batch, false)?;
        self.emit_deleted(path);
        Ok(())
    }

    /// A file or symlink lost its name (unlinked, or renamed over; its objects are dealt
    /// with by the caller). One still open keeps its inode and staging, with no name and
    /// nothing more to upload, until its last release.
    pub(super) fn remove_name(&mut self, ino: Ino, batch: &mut Batch) -> FsResult<()> {
        let now = now_ns();
        if let Some(p) = self.get(ino)?.link_of {
            // One name of a file with others: the file stays.
            self.queue.forget_sync(ino);
            self.remove_tree(ino, batch);
            if let Ok(f) = self.get_mut(p) {
                f.ctime_ns = now;
            }
            return self.persist(p, batch);
        }
        if self.promote(ino, batch)? {
            return Ok(());
        }
        self.queue.forget_sync(ino);
        if self.get(ino).is_ok_and(|n| n.open == 0) {
            self.remove_tree(ino, batch);
            return Ok(());
        }
        self.detach(ino);
        self.set_remote(ino, None);
        if let Ok(n) = self.get_mut(ino) {
            n.overwrites = None;
            n.dirty = false;
            n.parent = Ino::NONE;
            n.ctime_ns = now;
        }
        batch.remove_inode(ino.0);
        Ok(())
    }

    fn emit_deleted(&self, path: Option<String>) {
        let mut e = Event::new(EventKind::Deleted);
        if let Some(p) = path {
            e = e.path(p);
        }
        self.emit(e);
    }

    /// Removes an empty folder (the caller listed it from the bucket first).
    pub fn rmdir_node(&mut self, ino: Ino) -> FsResult<()> {
        let delay = self.core().cfg.upload_delay;
        let mut batch = Batch::default();
        if self.child_count(ino) > 0 {
            return Err(FsError::NotEmpty);
        }
        let key = self.key_of(ino)?;
        let path = self.path_of(ino);
        let parent = self.get(ino)?.parent;
        // Even a folder never uploaded may sit on a marker it took over by a rename.
        self.push_op(Op::Delete { remote: folder_remote(layout::marker_key(&key)) }, delay, &mut batch)?;
        self.queue.forget_sync(ino);
        self.remove_tree(ino, &mut batch);
        self.changed_in(parent);
        self.commit(batch, false)?;
        self.emit_deleted(path);
        Ok(())
    }

    /// A folder's entries changed: its mtime and ctime are now (POSIX, for `creat`,
    /// `mkdir`, `unlink`, `rmdir`, `rename`). Kept in memory: a folder's times in the
    /// bucket are its marker's, written when the folder itself changes.
    pub(super) fn changed_in(&mut self, dir: Ino) {
        if let Ok(p) = self.get_mut(dir) {
            p.mtime_ns = now_ns();
            p.ctime_ns = p.mtime_ns;
        }
    }

    /// Moves `ino` from `parent` to `newname` in `newparent`, replacing `target` (checked
    /// by the caller: same kind, an empty folder). Every object under a moved folder moves
    /// by itself, through the same conditional path as any other change.
    pub fn rename_node(
        &mut self,
        ino: Ino,
        parent: Ino,
        target: Option<Ino>,
        newparent: Ino,
        newname: &str,
    ) -> FsResult<()> {
        let delay = self.core().cfg.upload_delay;
        let mut batch = Batch::default();
        if self.get(newparent)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        // Re-check under the lock: the target may have changed while we listed.
        if self.child(newparent, newname) != target {
            return Err(FsError::Exists);
        }
        let is_dir = self.get(ino)?.kind == Kind::Dir;
        let old_key = self.key_of(ino)?;
        // A file leaving a path it had taken over leaves that object behind: delete it.
        if let Some(prev) = self.get_mut(ino)?.overwrites.take() {
            self.push_op(Op::Delete { remote: prev }, delay, &mut batch)?;
        }
        // The target's objects, but the one at the new key (the moved file takes that over;
        // a moved folder needs a marker there), go once the source has left its key: a
        // source still at one of those keys would take it over (see `retire`).
        let mut replaced = None;
        if let Some(t) = target {
            let tnode = self.get(t)?.clone();
            let new_key = self.key_of(t)?;
            if !is_dir {
                // The moved file may overwrite the version of the target's object.
                let takeover =
                    [&tnode.remote, &tnode.overwrites].into_iter().flatten().find(|r| r.key == new_key).cloned();
                if let Some(r) = takeover {
                    self.get_mut(ino)?.overwrites = Some(r);
                }
            }
            if is_dir {
                self.queue.forget_sync(t);
                self.remove_tree(t, &mut batch);
            } else {
                self.remove_name(t, &mut batch)?;
            }
            replaced = Some((tnode, new_key));
        }
        self.move_to(ino, newparent, newname)?;
        if let Some((tnode, new_key)) = replaced {
            self.drop_remote(&tnode, Some(new_key.as_str()), delay, &mut batch)?;
        }
        let file = self.primary(ino);
        self.get_mut(file)?.ctime_ns = now_ns();
        for p in [parent, newparent] {
            self.changed_in(p);
        }
        // Folder first (its marker), then what is inside.
        for m in self.subtree(ino) {
            self.requeue(m, delay, &mut batch)?;
        }
        if is_dir {
            self.push_op(Op::FolderMoved { from: old_key.clone() }, delay, &mut batch)?;
        }
        self.commit(batch, false)?;
        let mut e = Event::new(EventKind::Renamed).from(self.rel_path(&old_key));
        if let Some(p) = self.path_of(ino) {
            e = e.path(p);
        }
        self.emit(e);
        Ok(())
    }

    /// Applies what setattr changes (a new size is already in the staging file) and queues
    /// the upload; a truncation is made durable at once, since close() may never follow.
    pub fn set_attrs(&mut self, ino: Ino, set: SetAttr) -> FsResult<Attr> {
        let n = self.get_mut(ino)?;
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
        if let Some(t) = set.atime {
            n.atime_ns = Some(to_ns(t));
        } else if set.mtime.is_some() && n.atime_ns.is_none() {
            // The access time stays where it was when only the modification time moves.
            n.atime_ns = Some(n.mtime_ns);
        }
        if let Some(t) = set.mtime {
            n.mtime_ns = to_ns(t);
        }
        self.attributes_changed(ino, set.size.is_some())
    }

    /// An inode's attributes were changed in memory (mode, owner, times, size, extended
    /// attributes): its ctime is now, its upload is queued as for any change (the top
    /// folder has no object: it is only persisted), the batch is committed (`durable`:
    /// synced at once) and the change told as an event.
    pub(super) fn attributes_changed(&mut self, ino: Ino, durable: bool) -> FsResult<Attr> {
        let cfg = &self.core().cfg;
        let mut batch = Batch::default();
        let n = self.get_mut(ino)?;
        let delay = if n.open > 0 { cfg.open_upload_delay } else { cfg.upload_delay };
        n.ctime_ns = now_ns();
        if ino != ROOT_INO {
            n.dirty = true;
            self.touch(ino, delay, &mut batch)?;
        } else {
            self.persist(ino, &mut batch)?;
        }
        let attr = self.attr(ino)?;
        self.commit(batch, durable)?;
        let mut e = Event::new(EventKind::AttributesChanged).size(attr.size);
        if let Some(p) = self.path_of(ino) {
            e = e.path(p);
        }
        self.emit(e);
        Ok(attr)
    }
}
