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
//! - `held[d]`, when present, is the number of `d`'s children with `lookups > 0`;
//! - `subdirs[d]` is the number of `d`'s children that are folders;
//! - `aliases[p]` holds exactly the inodes whose `link_of` is `p` (the other names of a
//!   hard-linked file), and `p` itself is no alias.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::error::{FsError, FsResult};
use super::types::{Attr, Ino, Inode, Kind, Remote};
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
    /// Per folder, how many of its children are folders (its `st_nlink` is 2 more).
    subdirs: HashMap<Ino, u32>,
    /// The other names of each hard-linked file (their inodes' `link_of` is the key).
    aliases: HashMap<Ino, BTreeSet<Ino>>,
    /// Per link group id, the inode the kernel sees for it.
    groups: HashMap<String, Ino>,
    /// Aliases whose `link_of` changed when their file's inode left (persisted by
    /// `remove_tree`).
    relinked: Vec<Ino>,
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
            subdirs: HashMap::new(),
            aliases: HashMap::new(),
            groups: HashMap::new(),
            relinked: Vec::new(),
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

    /// The inode the kernel sees for a name's inode: the file an alias is a name of.
    pub fn primary(&self, ino: Ino) -> Ino {
        self.inodes.get(&ino).and_then(|n| n.link_of).unwrap_or(ino)
    }

    /// The other names of a hard-linked file (inodes whose `link_of` is `ino`).
    pub fn aliases(&self, ino: Ino) -> Vec<Ino> {
        self.aliases.get(&ino).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Whether any file has another name (hard links) in memory.
    pub fn has_links(&self) -> bool {
        !self.aliases.is_empty()
    }

    pub fn has_aliases(&self, ino: Ino) -> bool {
        self.aliases.get(&ino).is_some_and(|s| !s.is_empty())
    }

    /// A name of a file with several (a hard link, or the file it names).
    pub fn in_link_group(&self, ino: Ino) -> bool {
        self.has_aliases(ino) || self.inodes.get(&ino).is_some_and(|n| n.link_of.is_some())
    }

    /// The inode the kernel sees for link group `group`, if one is in memory.
    pub fn group_leader(&self, group: &str) -> Option<Ino> {
        self.groups.get(group).copied().filter(|i| self.inodes.contains_key(i))
    }

    /// Makes `group`'s leader `ino` when it has none in memory.
    pub fn join_group(&mut self, group: &str, ino: Ino) {
        if self.group_leader(group).is_none() {
            self.groups.insert(group.to_string(), ino);
        }
    }

    /// Makes `ino` another name of `primary` (which the kernel sees for it from now on).
    pub fn make_alias(&mut self, ino: Ino, primary: Ino) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.link_of = Some(primary);
            self.aliases.entry(primary).or_default().insert(ino);
        }
    }

    /// `ino` stops being a name of another file: a file of its own.
    pub fn unalias(&mut self, ino: Ino) {
        let Some(n) = self.inodes.get_mut(&ino) else { return };
        n.link = None;
        if let Some(p) = n.link_of.take() {
            self.drop_alias(p, ino);
        }
    }

    /// Takes `ino` out of the names indexed under file `p`.
    fn drop_alias(&mut self, p: Ino, ino: Ino) {
        if let Some(set) = self.aliases.get_mut(&p) {
            set.remove(&ino);
            if set.is_empty() {
                self.aliases.remove(&p);
            }
        }
    }

    /// The attributes the kernel gets for a name's inode: those of the file an alias names,
    /// with one link per name.
    pub fn attr(&self, ino: Ino) -> FsResult<Attr> {
        let p = self.primary(ino);
        let mut a = self.get(p)?.attr();
        match a.kind {
            // A folder's `..` entries: one link from each folder in it.
            Kind::Dir => a.nlink += self.subdirs.get(&p).copied().unwrap_or(0),
            _ if a.nlink == 1 => a.nlink += self.aliases.get(&p).map_or(0, |s| s.len() as u32),
            _ => {}
        }
        Ok(a)
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
        let was = self.children.entry(node.parent).or_default().insert(node.name.clone(), node.ino);
        if let Some(w) = was {
            self.uncount(node.parent, w);
        }
        if node.kind == Kind::Dir {
            self.children.entry(node.ino).or_default();
            *self.subdirs.entry(node.parent).or_default() += 1;
        }
        if let Some(r) = &node.remote {
            self.by_remote_key.insert(r.key.clone(), node.ino);
        }
        match (node.link_of, &node.link) {
            (Some(p), _) => {
                self.aliases.entry(p).or_default().insert(node.ino);
            }
            (None, Some(g)) => {
                self.groups.entry(g.clone()).or_insert(node.ino);
            }
            (None, None) => {}
        }
        self.inodes.insert(node.ino, node);
    }

    /// Takes an inode out of its parent's children (it stays in memory).
    pub fn detach(&mut self, ino: Ino) {
        let Some(n) = self.inodes.get(&ino) else { return };
        let parent = n.parent;
        self.held.remove(&parent);
        if let Some(c) = self.children.get_mut(&parent)
            && c.get(&n.name) == Some(&ino)
        {
            c.remove(&n.name);
            self.uncount(parent, ino);
        }
    }

    /// `ino` left folder `dir`'s children: one folder fewer in it, if it is one.
    fn uncount(&mut self, dir: Ino, ino: Ino) {
        if self.inodes.get(&ino).is_some_and(|n| n.kind == Kind::Dir)
            && let Some(k) = self.subdirs.get_mut(&dir)
        {
            *k = k.saturating_sub(1);
        }
    }

    /// Removes one inode (not its children) from memory.
    pub fn remove(&mut self, ino: Ino) -> Option<Inode> {
        self.detach(ino);
        self.children.remove(&ino);
        self.held.remove(&ino);
        self.subdirs.remove(&ino);
        let n = self.inodes.remove(&ino)?;
        if let Some(r) = &n.remote
            && self.by_remote_key.get(&r.key) == Some(&ino)
        {
            self.by_remote_key.remove(&r.key);
        }
        if let Some(p) = n.link_of {
            self.drop_alias(p, ino);
        }
        if let Some(g) = &n.link
            && self.groups.get(g) == Some(&ino)
        {
            self.groups.remove(g);
        }
        // The file's other names stay, one of them the file now.
        if let Some(set) = self.aliases.remove(&ino) {
            let mut names = set.into_iter();
            if let Some(lead) = names.next() {
                for a in names {
                    self.make_alias(a, lead);
                    self.relinked.push(a);
                }
                if let Some(l) = self.inodes.get_mut(&lead) {
                    l.link_of = None;
                }
                if let Some(g) = &n.link {
                    self.groups.insert(g.clone(), lead);
                }
                self.relinked.push(lead);
            }
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
                batch.remove_inode(k.0);
            }
        }
        for r in std::mem::take(&mut self.relinked) {
            let _ = self.persist(r, batch);
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
        let was = self.children.entry(newparent).or_default().insert(newname.to_string(), ino);
        if let Some(w) = was {
            self.uncount(newparent, w);
        }
        if self.inodes.get(&ino).is_some_and(|n| n.kind == Kind::Dir) {
            *self.subdirs.entry(newparent).or_default() += 1;
        }
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
        for (p, set) in &t.aliases {
            assert!(t.get(*p).unwrap().link_of.is_none(), "{p} names no other file");
            for a in set {
                assert_eq!(t.get(*a).unwrap().link_of, Some(*p), "{a} is a name of {p}");
            }
        }
        for n in t.nodes() {
            if let Some(p) = n.link_of {
                assert!(t.aliases.get(&p).is_some_and(|s| s.contains(&n.ino)), "{} is indexed", n.ino);
            }
        }
        for n in t.nodes().filter(|n| n.kind == Kind::Dir) {
            let dirs = t.children(n.ino).filter(|(_, c)| t.get(*c).unwrap().kind == Kind::Dir).count() as u32;
            assert_eq!(t.subdirs.get(&n.ino).copied().unwrap_or(0), dirs, "folders in {}", n.ino);
            assert_eq!(t.attr(n.ino).unwrap().nlink, 2 + dirs);
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
    fn hard_links_answer_as_one_inode_and_outlive_the_first_name() {
        let mut t = sample("");
        let mut a = node(5, 2, "f2", Kind::File);
        a.link_of = Some(Ino(4));
        t.insert(a);
        t.insert(node(6, 1, "f3", Kind::File));
        t.make_alias(Ino(6), Ino(4));
        check(&t);
        assert_eq!(t.attr(Ino(4)).unwrap().nlink, 3);
        let through_alias = t.attr(Ino(6)).unwrap();
        assert_eq!((through_alias.ino, through_alias.nlink), (Ino(4), 3), "a name answers its file's inode");
        assert!(t.in_link_group(Ino(5)) && t.in_link_group(Ino(4)) && !t.in_link_group(Ino(3)));
        t.unalias(Ino(6));
        assert_eq!(t.attr(Ino(6)).unwrap().ino, Ino(6), "split off: a file of its own");
        assert_eq!(t.attr(Ino(4)).unwrap().nlink, 2);
        check(&t);
        // The file's inode leaves: its other name is the file now, and persisted as such.
        let mut batch = Batch::default();
        t.remove_tree(Ino(4), &mut batch);
        assert_eq!(t.get(Ino(5)).unwrap().link_of, None);
        assert_eq!(t.attr(Ino(5)).unwrap().nlink, 1);
        assert!(batch.put_inodes.iter().any(|(i, _)| *i == 5), "the new leader is recorded");
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
