//! Hard links: a file with several names. The kernel sees one inode (the file); each
//! other name is an alias record in the tree (`link_of`), with its own name and object.
//! Every name is a full object in the bucket, a server-side copy of the file's, and all
//! carry one link-group id (`autosync-link`), which is how a fresh mount ties them
//! together again. Here: link, a name of a linked file going away (the file moves to one
//! of its other names), a name edited by another tool leaving the group, and a name a
//! HEAD finds in a group joining it.

use std::collections::HashSet;
use std::time::Duration;

use super::core::Locked;
use super::error::{FsError, FsResult};
use super::types::{Attr, Ino, Inode, Invalidation, Kind, now_ns};
use crate::state::Batch;

impl Locked<'_> {
    /// link(2): `newname` in `newparent` becomes another name of `ino`'s file. The file's
    /// object gets the group id (its upload is queued), the new name a copy of it.
    pub fn link_node(&mut self, ino: Ino, newparent: Ino, newname: &str) -> FsResult<Attr> {
        let core = self.core();
        let mut batch = Batch::default();
        let ino = self.primary(ino);
        let n = self.get(ino)?;
        if n.kind == Kind::Dir {
            return Err(FsError::NotPermitted("a folder cannot have another name"));
        }
        if n.parent == Ino::NONE {
            return Err(FsError::NotFound);
        }
        if self.get(newparent)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if self.child(newparent, newname).is_some() {
            return Err(FsError::Exists);
        }
        let delay = if n.open > 0 { core.cfg.open_upload_delay } else { core.cfg.upload_delay };
        // A group id the file carries but does not lead (it was split off another file's
        // group, keeping the metadata) is not its own: it gets a new one.
        let own = n.link.clone().filter(|g| self.group_leader(g) == Some(ino));
        let new_group = own.is_none();
        let group = own.unwrap_or_else(|| format!("{}-{ino}", core.writer));
        let a = self.alloc_ino(&mut batch);
        let n = self.get(ino)?;
        let mut alias = Inode::new(a, newparent, newname.to_string(), n.kind, n.perm, n.uid, n.gid);
        alias.size = n.size;
        alias.link = Some(group.clone());
        alias.link_of = Some(ino);
        alias.dirty = true;
        self.join_group(&group, ino);
        self.insert(alias);
        self.changed_in(newparent);
        let f = self.get_mut(ino)?;
        f.ctime_ns = now_ns();
        if new_group {
            // The file's object carries the group id too.
            f.link = Some(group);
            f.dirty = true;
            self.touch(ino, delay, &mut batch)?;
        } else {
            self.persist(ino, &mut batch)?;
        }
        self.touch(a, delay, &mut batch)?;
        let attr = self.attr(ino)?;
        self.commit(batch, false)?;
        self.emit_created(a, attr.size);
        Ok(attr)
    }

    /// The name `x` (a file with other names) sits at goes: the file moves to another of
    /// its names (one whose copy is not under way, if there is one), taking over that
    /// name's record and object. False when it has none. The caller made the file's
    /// content local first when that name's copy is not made yet (it then uploads it).
    pub(super) fn promote(&mut self, x: Ino, batch: &mut Batch) -> FsResult<bool> {
        let names = self.aliases(x);
        let idle = names.iter().copied().find(|&a| !self.queue.is_uploading(a));
        let Some(y) = idle.or(names.first().copied()) else { return Ok(false) };
        self.promote_to(x, y, batch)?;
        Ok(true)
    }

    /// Moves file `x` to the name of its alias `y`, whose record goes.
    fn promote_to(&mut self, x: Ino, y: Ino, batch: &mut Batch) -> FsResult<()> {
        let yn = self.get(y)?.clone();
        self.queue.forget_sync(y);
        self.remove(y);
        batch.remove_inode(y.0);
        self.move_to(x, yn.parent, &yn.name)?;
        self.set_remote(x, yn.remote.clone());
        let delay = self.core().cfg.upload_delay;
        let n = self.get_mut(x)?;
        n.overwrites = yn.overwrites;
        n.ctime_ns = now_ns();
        if yn.dirty {
            // That name's copy was not made yet: the file's own upload writes it.
            n.dirty = true;
            self.touch(x, delay, batch)?;
        } else {
            self.persist(x, batch)?;
        }
        Ok(())
    }

    /// Whether a name of a linked file going away needs the file's content here first:
    /// the name it moves to has no copy of it yet, and its own object goes.
    pub fn needs_content_to_move(&self, x: Ino) -> bool {
        let names = self.aliases(x);
        !names.is_empty() && names.iter().all(|&a| self.get(a).is_ok_and(|n| n.dirty || n.remote.is_none()))
    }

    /// Before `top` and what is below it leave memory: a file in there with a name
    /// outside moves to that name, with its inode and content.
    pub(super) fn keep_linked_outside(&mut self, top: Ino, batch: &mut Batch) {
        if !self.has_links() {
            return;
        }
        let inside: HashSet<Ino> = self.subtree(top).into_iter().collect();
        for &x in &inside {
            if let Some(y) = self.aliases(x).into_iter().find(|a| !inside.contains(a)) {
                let _ = self.promote_to(x, y, batch);
            }
        }
    }

    /// Another tool changed the object at name `c` of a linked file: that name leaves the
    /// group, a file of its own. When `c` is the file the kernel sees, the file (with its
    /// inode number, open handles and content) moves to another of its names first, and
    /// `c`'s name gets that name's record. Returns the inode now at the name, and the
    /// kernel entries to drop; None when no other name is ready to take the file (a copy
    /// under way): the change is taken at a later listing.
    pub(super) fn split_name(&mut self, c: Ino, batch: &mut Batch) -> FsResult<Option<(Ino, Vec<Invalidation>)>> {
        let n = self.get(c)?.clone();
        let mut inval = vec![Invalidation::Entry { parent: n.parent, name: n.name.clone() }];
        if let Some(p) = n.link_of {
            self.unalias(c);
            self.persist(c, batch)?;
            self.persist(p, batch)?;
            inval.push(Invalidation::Inode(p));
            return Ok(Some((c, inval)));
        }
        // A name whose copy is made and not under way takes the file; none yet: later.
        let ready = self.aliases(c).into_iter().find(|&a| self.is_settled(a));
        let Some(y) = ready else { return Ok(None) };
        let yn = self.get(y)?.clone();
        self.unalias(y);
        self.queue.forget_sync(y);
        self.detach(c);
        self.move_to(y, n.parent, &n.name)?;
        self.set_remote(y, n.remote.clone());
        self.move_to(c, yn.parent, &yn.name)?;
        self.set_remote(c, yn.remote.clone());
        let delay = self.core().cfg.upload_delay;
        let f = self.get_mut(c)?;
        f.ctime_ns = now_ns();
        if yn.dirty {
            f.dirty = true;
            self.touch(c, delay, batch)?;
        }
        let s = self.get_mut(y)?;
        s.kind = n.kind;
        s.dirty = false;
        self.persist(c, batch)?;
        self.persist(y, batch)?;
        inval.push(Invalidation::Inode(c));
        Ok(Some((y, inval)))
    }

    /// A HEAD answered `ino`'s object with a link group: if the group's file is in memory
    /// with the same content, this name becomes another name of it (how a fresh mount
    /// finds a hard link again); otherwise it may be the group's file itself. Only a name
    /// nobody holds or changed joins. Returns the kernel entries to drop.
    pub(super) fn adopt_link(&mut self, ino: Ino, batch: &mut Batch) -> Vec<Invalidation> {
        let Ok(n) = self.get(ino) else { return Vec::new() };
        let Some(group) = n.link.clone() else { return Vec::new() };
        if n.link_of.is_some() || n.kind == Kind::Dir || n.parent == Ino::NONE {
            return Vec::new();
        }
        let Some(p) = self.group_leader(&group).filter(|&p| p != ino) else {
            self.join_group(&group, ino);
            return Vec::new();
        };
        let Ok(f) = self.get(p) else { return Vec::new() };
        let same = f.kind == n.kind && f.size == n.size && f.mtime_ns == n.mtime_ns && f.parent != Ino::NONE;
        let free = n.lookups == 0 && n.open == 0 && !n.staged && !self.has_aliases(ino) && self.is_settled(ino);
        if !(same && free) {
            return Vec::new();
        }
        let (parent, name) = (n.parent, n.name.clone());
        self.make_alias(ino, p);
        let _ = self.persist(ino, batch);
        vec![Invalidation::Entry { parent, name }, Invalidation::Inode(p)]
    }

    /// The file's object changed (uploaded): each of its other names gets a fresh copy.
    pub(super) fn requeue_aliases(&mut self, ino: Ino, batch: &mut Batch) -> FsResult<()> {
        for a in self.aliases(ino) {
            if let Ok(n) = self.get_mut(a) {
                n.dirty = true;
            }
            self.touch(a, Duration::ZERO, batch)?;
        }
        Ok(())
    }
}
