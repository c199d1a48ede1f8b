//! Entries kept aside. When a folder's listing leaves memory (the `--max-inodes` bound), the
//! records of its entries move from the inode table to a table of their own, which startup
//! does not load. When the folder is listed again, an object whose key, ETag and
//! Last-Modified are what its record says takes the record back (attributes, symlink
//! target, inode number) instead of a HEAD; a folder takes back its record whatever, since
//! its own entries kept aside are filed under its inode number. Pure data: the listing reads
//! the records, and drops them all once it merged.

use std::collections::HashMap;

use object_store::ObjectMeta;

use super::object::etag_same;
use super::types::{Ino, Inode, Kind};

#[derive(Debug, Default)]
pub struct Kept {
    by_name: HashMap<String, Inode>,
    /// Whether there were any: then the listing drops them from the database.
    any: bool,
}

impl Kept {
    pub fn new(records: Vec<Inode>) -> Kept {
        let any = !records.is_empty();
        Kept { by_name: records.into_iter().map(|n| (n.name.clone(), n)).collect(), any }
    }

    /// Records that cannot be read (damaged, or sealed with another key): none is taken
    /// back, and the listing drops them.
    pub fn unreadable() -> Kept {
        Kept { by_name: HashMap::new(), any: true }
    }

    pub fn any(&self) -> bool {
        self.any
    }

    /// The record of the folder `name` in folder `dir`, unless its inode number is in use.
    pub fn folder(&mut self, dir: Ino, name: &str, in_use: impl Fn(Ino) -> bool) -> Option<Inode> {
        let mut n = self.by_name.remove(name).filter(|n| n.kind == Kind::Dir && !in_use(n.ino))?;
        n.parent = dir;
        Some(n)
    }

    /// The record of the file or symlink `name` in folder `dir`, if the listing shows the
    /// version of the object it was made from, with its attributes read.
    pub fn file(&mut self, dir: Ino, name: &str, m: &ObjectMeta, in_use: impl Fn(Ino) -> bool) -> Option<Inode> {
        let mut n = self.by_name.remove(name)?;
        let same = n.remote.as_ref().is_some_and(|r| {
            r.key == m.location.as_ref()
                && etag_same(r.etag.as_deref(), m.e_tag.as_deref())
                && r.modified == Some(m.last_modified.timestamp())
        });
        if n.kind == Kind::Dir || !n.attrs_known || n.dirty || !same || in_use(n.ino) {
            return None;
        }
        n.parent = dir;
        n.size = m.size;
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::types::Remote;

    fn meta(key: &str, etag: &str, secs: i64) -> ObjectMeta {
        ObjectMeta {
            location: key.into(),
            last_modified: chrono::DateTime::from_timestamp(secs, 0).unwrap(),
            size: 3,
            e_tag: Some(etag.into()),
            version: None,
        }
    }

    fn file(ino: u64, name: &str, etag: &str, secs: i64) -> Inode {
        let mut n = Inode::new(Ino(ino), Ino(99), name.into(), Kind::File, 0o600, 7, 8);
        n.remote = Some(Remote {
            key: format!("d/{name}"),
            etag: Some(etag.into()),
            version: None,
            size: 3,
            modified: Some(secs),
        });
        n
    }

    #[test]
    fn only_the_same_version_takes_its_record_back() {
        let mut unread = file(12, "c", "e3", 100);
        unread.attrs_known = false;
        let mut k = Kept::new(vec![file(10, "a", "e1", 100), file(11, "b", "e2", 100), unread]);
        assert!(k.any());
        let free = |_| false;
        let a = k.file(Ino(5), "a", &meta("d/a", "e1", 100), free).expect("same version");
        assert_eq!((a.ino, a.parent, a.perm, a.uid), (Ino(10), Ino(5), 0o600, 7));
        assert!(k.file(Ino(5), "b", &meta("d/b", "e9", 100), free).is_none(), "another ETag");
        assert!(k.file(Ino(5), "c", &meta("d/c", "e3", 100), free).is_none(), "attributes never read");
        assert!(k.file(Ino(5), "a", &meta("d/a", "e1", 100), free).is_none(), "taken once");
        let mut k = Kept::new(vec![file(10, "a", "e1", 100), file(11, "b", "e2", 100)]);
        assert!(k.file(Ino(5), "a", &meta("d/a", "e1", 101), free).is_none(), "metadata rewritten");
        assert!(k.file(Ino(5), "b", &meta("d/b", "e2", 100), |i| i == Ino(11)).is_none(), "number in use");
    }

    #[test]
    fn a_folder_takes_its_record_back_with_its_number() {
        let d = Inode::new(Ino(20), Ino(99), "sub".into(), Kind::Dir, 0o700, 1, 2);
        let mut k = Kept::new(vec![d.clone()]);
        assert!(k.file(Ino(5), "sub", &meta("d/sub", "x", 1), |_| false).is_none(), "not a file");
        assert!(Kept::new(vec![d.clone()]).folder(Ino(5), "sub", |i| i == Ino(20)).is_none(), "number in use");
        let mut k = Kept::new(vec![d]);
        let d = k.folder(Ino(5), "sub", |_| false).expect("a folder");
        assert_eq!((d.ino, d.parent, d.perm), (Ino(20), Ino(5), 0o700));
        assert!(Kept::default().folder(Ino(5), "sub", |_| false).is_none());
        assert!(!Kept::default().any());
    }
}
