//! The tree: every inode in memory, each folder's children by name, the index from object
//! key to the inode that owns it, and per folder the count of entries the kernel holds. A
//! plain data structure with its invariants: no I/O, no `async`, no knowledge of the journal
//! or of listings. It records what changed into a state-database batch when asked; it never
//! commits one.
//!
//! Invariants (checked by the unit tests below):
//! - every inode but the root is in its parent's children under its name, unless it was
//!   detached (deleted while open, parent [`Ino::NONE`]);
//! - `by_remote_key[k] == i` only if inode `i`'s `remote` is at key `k`;
//! - `held[d]`, when present, is the number of `d`'s children with `lookups > 0`.

use std::collections::{BTreeMap, HashMap};

use super::error::{FsError, FsResult};
use super::types::{Ino, Inode, Kind, Remote};
use crate::layout;
use crate::state::Batch;

#[derive(Debug)]
pub struct Tree {
    /// The bucket prefix every key is under.
    prefix: String,
    inodes: HashMap<Ino, Inode>,
    children: HashMap<Ino, BTreeMap<String, Ino>>,
    /// Which inode owns the object at a key (its `remote`), so a listing that still shows a
    /// locally renamed file does not bring the old name back.
    by_remote_key: HashMap<String, Ino>,
    /// Per folder, how many of its entries the kernel holds; absent when unknown (a change
    /// in the folder forgets it; it is counted again when needed).
    held: HashMap<Ino, u64>,
    next_ino: u64,
}

impl Tree {
    /// A tree of `nodes` (the root is made if missing) under the bucket prefix `prefix`.
    pub fn new(prefix: &str, next_ino: u64, nodes: Vec<Inode>) -> Tree {
        let mut t = Tree {
            prefix: prefix.to_string(),
            inodes: HashMap::new(),
            children: HashMap::new(),
            by_remote_key: HashMap::new(),
            held: HashMap::new(),
            next_ino: next_ino.max(Ino::ROOT.0 + 1),
        };
        for n in nodes {
            if n.ino == Ino::ROOT {
                t.children.entry(Ino::ROOT).or_default();
                t.inodes.insert(Ino::ROOT, n);
            } else {
                t.insert(n);
            }
        }
        t
    }

    pub fn get(&self, ino: Ino) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    pub fn get_mut(&mut self, ino: Ino) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    pub fn contains(&self, ino: Ino) -> bool {
        self.inodes.contains_key(&ino)
    }

    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    /// Every inode in memory, in no order.
    pub fn nodes(&self) -> impl Iterator<Item = &Inode> {
        self.inodes.values()
    }

    pub fn child(&self, parent: Ino, name: &str) -> Option<Ino> {
        self.children.get(&parent).and_then(|c| c.get(name)).copied()
    }

    /// The children of a folder by name (none for a file or an unknown inode).
    pub fn children(&self, dir: Ino) -> impl Iterator<Item = (&String, Ino)> {
        self.children.get(&dir).into_iter().flat_map(|c| c.iter().map(|(k, v)| (k, *v)))
    }

    pub fn child_count(&self, dir: Ino) -> usize {
        self.children.get(&dir).map_or(0, |c| c.len())
    }

    /// The inode that owns the object at `key` (its `remote` is there), if any.
    pub fn owner_of_key(&self, key: &str) -> Option<Ino> {
        self.by_remote_key.get(key).copied()
    }

    /// The object key of an inode's current path, with the bucket prefix.
    pub fn key_of(&self, ino: Ino) -> FsResult<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        let mut guard = 0;
        while cur != Ino::ROOT {
            let n = self.get(cur)?;
            parts.push(n.name.as_str());
            cur = n.parent;
            guard += 1;
            if guard > 4096 {
                return Err(FsError::Invalid("path too deep"));
            }
        }
        parts.reverse();
        Ok(layout::join_key(&self.prefix, &parts.join("/")))
    }

    /// A key as a path in the mount (without the bucket prefix).
    pub fn rel_path(&self, key: &str) -> String {
        rel_path(&self.prefix, key)
    }

    /// The path of an inode in the mount, if it is in a folder.
    pub fn path_of(&self, ino: Ino) -> Option<String> {
        self.key_of(ino).ok().map(|k| self.rel_path(&k))
    }

    /// The inode now at an object key, if any.
    pub fn ino_at_key(&self, key: &str) -> Option<Ino> {
        let rel = if self.prefix.is_empty() { key } else { key.strip_prefix(&self.prefix)?.strip_prefix('/')? };
        rel.split('/').try_fold(Ino::ROOT, |dir, name| self.child(dir, name))
    }

    /// How many entries of `dir` the kernel holds, counted when not known.
    pub fn held_in(&mut self, dir: Ino) -> u64 {
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

    /// Adds an inode under its parent (a folder gets an empty child map).
    pub fn insert(&mut self, node: Inode) {
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

    /// Takes an inode out of its parent's children (it stays in memory).
    pub fn detach(&mut self, ino: Ino) {
        let Some(n) = self.inodes.get(&ino) else { return };
        self.held.remove(&n.parent);
        if let Some(c) = self.children.get_mut(&n.parent)
            && c.get(&n.name) == Some(&ino)
        {
            c.remove(&n.name);
        }
    }

    /// Removes one inode (not its children) from memory.
    pub fn remove(&mut self, ino: Ino) -> Option<Inode> {
        self.detach(ino);
        self.children.remove(&ino);
        self.held.remove(&ino);
        let n = self.inodes.remove(&ino)?;
        if let Some(r) = &n.remote
            && self.by_remote_key.get(&r.key) == Some(&ino)
        {
            self.by_remote_key.remove(&r.key);
        }
        Some(n)
    }

    /// Removes an inode and everything below it, recording the deletions in `batch`.
    /// Returns the removed inodes whose contents were staged (the caller removes their
    /// staging files).
    pub fn remove_tree(&mut self, ino: Ino, batch: &mut Batch) -> Vec<Ino> {
        let mut staged = Vec::new();
        for k in self.subtree(ino).into_iter().rev() {
            if let Some(n) = self.remove(k) {
                if n.staged {
                    staged.push(k);
                }
                if n.kind == Kind::Dir {
                    // Entries it kept aside when its listing left memory go with it.
                    batch.del_evicted.push(k.0);
                }
                batch.del_inodes.push(k.0);
            }
        }
        staged
    }

    /// An inode and every inode below it, parents before their children.
    pub fn subtree(&self, ino: Ino) -> Vec<Ino> {
        let mut out = vec![ino];
        let mut i = 0;
        while i < out.len() {
            if let Some(c) = self.children.get(&out[i]) {
                out.extend(c.values().copied());
            }
            i += 1;
        }
        out
    }

    /// Moves an inode to `newparent` under `newname` (the caller made sure the name is free).
    pub fn move_to(&mut self, ino: Ino, newparent: Ino, newname: &str) -> FsResult<()> {
        self.detach(ino);
        let n = self.get_mut(ino)?;
        n.parent = newparent;
        n.name = newname.to_string();
        self.held.remove(&newparent);
        self.children.entry(newparent).or_default().insert(newname.to_string(), ino);
        Ok(())
    }

    /// Sets the object an inode is based on, keeping the key index in step.
    pub fn set_remote(&mut self, ino: Ino, remote: Option<Remote>) {
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

    /// A new inode number (the next one is recorded in `batch`).
    pub fn alloc_ino(&mut self, batch: &mut Batch) -> Ino {
        let ino = Ino(self.next_ino);
        self.next_ino += 1;
        batch.set_meta("next_ino", self.next_ino);
        ino
    }

    /// Records the inode's current state in `batch`.
    pub fn persist(&self, ino: Ino, batch: &mut Batch) -> FsResult<()> {
        if let Some(n) = self.inodes.get(&ino) {
            batch.inode(ino.0, n)?;
        }
        Ok(())
    }

    /// The kernel holds these entries (replied by `lookup`, `create`, `readdirplus`...).
    pub fn entries_replied(&mut self, inos: &[Ino]) {
        for &ino in inos {
            let Some(n) = self.inodes.get_mut(&ino) else { continue };
            n.lookups += 1;
            let (first, parent) = (n.lookups == 1, n.parent);
            if first && let Some(h) = self.held.get_mut(&parent) {
                *h += 1;
            }
        }
    }

    /// The kernel forgot `n` lookups of `ino`. Returns its folder when that was the last
    /// entry of the folder the kernel held.
    pub fn forget(&mut self, ino: Ino, n: u64) -> Option<Ino> {
        let node = self.inodes.get_mut(&ino)?;
        let was = node.lookups;
        node.lookups = node.lookups.saturating_sub(n);
        if was == 0 || node.lookups > 0 {
            return None;
        }
        let parent = node.parent;
        let now = match self.held.get_mut(&parent) {
            Some(h) => {
                *h = h.saturating_sub(1);
                *h
            }
            None => 0,
        };
        (now == 0 && parent != Ino::NONE).then_some(parent)
    }
}

/// A key as a path in the mount: the key without the bucket prefix.
pub fn rel_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        return key.to_string();
    }
    key.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')).unwrap_or(key).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ino: u64, parent: u64, name: &str, kind: Kind) -> Inode {
        Inode::new(Ino(ino), Ino(parent), name.into(), kind, 0o644, 0, 0)
    }

    fn remote(key: &str) -> Remote {
        Remote { key: key.into(), etag: Some("e".into()), version: None, size: 1, modified: None }
    }

    /// root/{d/{f}, g}
    fn sample(prefix: &str) -> Tree {
        let root = node(1, 1, "", Kind::Dir);
        let mut f = node(4, 2, "f", Kind::File);
        f.remote = Some(remote(&layout::join_key(prefix, "d/f")));
        Tree::new(prefix, 5, vec![root, node(2, 1, "d", Kind::Dir), f, node(3, 1, "g", Kind::File)])
    }

    /// The invariants of the module's opening, checked over the whole tree.
    fn check(t: &Tree) {
        for n in t.nodes() {
            if n.ino != Ino::ROOT && n.parent != Ino::NONE {
                assert_eq!(t.child(n.parent, &n.name), Some(n.ino), "{} is in its folder", n.name);
            }
        }
        for (k, i) in &t.by_remote_key {
            assert_eq!(t.get(*i).unwrap().remote.as_ref().map(|r| r.key.as_str()), Some(k.as_str()));
        }
        for (d, h) in &t.held {
            let counted = t.children(*d).filter(|(_, c)| t.get(*c).unwrap().lookups > 0).count() as u64;
            assert_eq!(*h, counted, "held count of {d}");
        }
    }

    #[test]
    fn keys_paths_and_lookups_by_key() {
        let t = sample("pre/fix");
        assert_eq!(t.key_of(Ino(4)).unwrap(), "pre/fix/d/f");
        assert_eq!(t.path_of(Ino(4)).as_deref(), Some("d/f"));
        assert_eq!(t.ino_at_key("pre/fix/d/f"), Some(Ino(4)));
        assert_eq!(t.ino_at_key("other/d/f"), None);
        assert_eq!(t.owner_of_key("pre/fix/d/f"), Some(Ino(4)));
        assert_eq!(t.subtree(Ino(2)), [Ino(2), Ino(4)]);
        check(&t);
    }

    #[test]
    fn moves_and_remote_changes_keep_the_indexes_in_step() {
        let mut t = sample("");
        t.move_to(Ino(4), Ino::ROOT, "f2").unwrap();
        assert_eq!(t.child(Ino(2), "f"), None);
        assert_eq!(t.child(Ino::ROOT, "f2"), Some(Ino(4)));
        // The object stays owned by the moved inode until its upload moves it.
        assert_eq!(t.owner_of_key("d/f"), Some(Ino(4)));
        t.set_remote(Ino(4), Some(remote("f2")));
        assert_eq!(t.owner_of_key("d/f"), None);
        assert_eq!(t.owner_of_key("f2"), Some(Ino(4)));
        check(&t);
    }

    #[test]
    fn removing_a_folder_removes_what_is_below_it() {
        let mut t = sample("");
        t.get_mut(Ino(4)).unwrap().staged = true;
        let mut batch = Batch::default();
        let staged = t.remove_tree(Ino(2), &mut batch);
        assert_eq!(staged, [Ino(4)]);
        assert_eq!(batch.del_inodes.len(), 2);
        assert!(!t.contains(Ino(2)) && !t.contains(Ino(4)));
        assert_eq!(t.owner_of_key("d/f"), None);
        assert_eq!(t.child(Ino::ROOT, "d"), None);
        check(&t);
    }

    #[test]
    fn held_counts_follow_replies_and_forgets() {
        let mut t = sample("");
        assert_eq!(t.held_in(Ino::ROOT), 0);
        t.entries_replied(&[Ino(2), Ino(3), Ino(3)]);
        assert_eq!(t.held_in(Ino::ROOT), 2);
        check(&t);
        assert_eq!(t.forget(Ino(3), 1), None, "still held once");
        assert_eq!(t.forget(Ino(3), 1), None, "the folder still holds d");
        assert_eq!(t.forget(Ino(2), 1), Some(Ino::ROOT), "the folder's last held entry");
        assert_eq!(t.held_in(Ino::ROOT), 0);
        check(&t);
    }

    #[test]
    fn new_inode_numbers_are_recorded() {
        let mut t = sample("");
        let mut batch = Batch::default();
        assert_eq!(t.alloc_ino(&mut batch), Ino(5));
        assert_eq!(t.alloc_ino(&mut batch), Ino(6));
        assert_eq!(batch.meta, [("next_ino", 7)], "the last number given, once");
    }
}
