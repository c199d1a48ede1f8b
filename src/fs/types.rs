//! Records of the filesystem: inodes as stored in the state database, journal operations,
//! and the attribute struct handed to the FUSE adapter.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use super::conflict::{ConflictConfig, ConflictRecord, ConflictRule, Policy, Version};
pub use super::ids::{BlockIndex, Fh, Ino, Seq};

/// The root folder's inode.
pub const ROOT_INO: Ino = Ino::ROOT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Special files: in the bucket as an empty object whose `mode` carries the type (and
    /// `rdev` the device), as s3fs stores them; the kernel serves them locally.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// The kind named by the type bits of `mode`; anything unknown is a regular file.
    pub fn of_mode(mode: u32) -> Kind {
        use crate::layout as l;
        match mode & l::S_IFMT {
            l::S_IFDIR => Kind::Dir,
            l::S_IFLNK => Kind::Symlink,
            l::S_IFIFO => Kind::Fifo,
            l::S_IFSOCK => Kind::Socket,
            l::S_IFCHR => Kind::CharDevice,
            l::S_IFBLK => Kind::BlockDevice,
            _ => Kind::File,
        }
    }

    /// The type bits of a mode of this kind.
    pub fn type_bits(self) -> u32 {
        use crate::layout as l;
        match self {
            Kind::File => l::S_IFREG,
            Kind::Dir => l::S_IFDIR,
            Kind::Symlink => l::S_IFLNK,
            Kind::Fifo => l::S_IFIFO,
            Kind::Socket => l::S_IFSOCK,
            Kind::CharDevice => l::S_IFCHR,
            Kind::BlockDevice => l::S_IFBLK,
        }
    }

    /// A FIFO, socket or device node: no content of its own.
    pub fn is_special(self) -> bool {
        matches!(self, Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice)
    }
}

/// A version of an object in the bucket that a local inode is based on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub key: String,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub size: u64,
    /// The object's Last-Modified, in whole seconds since the epoch, when a listing or a HEAD
    /// told it (an upload does not). Another client that changes only the metadata (a copy
    /// of the object onto itself) leaves the ETag as it was; this is how that shows.
    #[serde(default)]
    pub modified: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inode {
    pub ino: Ino,
    pub parent: Ino,
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Last access, set by `utimensat` (the mount is `noatime`); none follows `mtime_ns`.
    #[serde(default)]
    pub atime_ns: Option<i64>,
    pub target: Option<String>,
    /// The object this inode's content came from (or was last uploaded to).
    pub remote: Option<Remote>,
    /// An object at this inode's current path that it replaced by a rename, and may overwrite.
    pub overwrites: Option<Remote>,
    /// Content lives in the staging file.
    pub staged: bool,
    /// Local content or attributes differ from `remote`.
    pub dirty: bool,
    /// Attributes were read from the object's metadata (not defaults from a listing).
    pub attrs_known: bool,
    /// The folder's content has been seen (listed, or created here) at least once, so a
    /// name missing locally can be answered without the bucket while it is unreachable.
    #[serde(default)]
    pub listed: bool,
    /// The device a device node names (`rdev` in the object's metadata, as s3fs).
    #[serde(default)]
    pub rdev: u32,
    /// Extended attributes as the object's `xattr` metadata carries them (s3fs's layout,
    /// `crate::xattrs`); None when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xattr: Option<String>,
    /// The link group of a file with several names (hard links), as its object's
    /// `autosync-link` metadata carries it; None for a file with one name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Another name of the file `link_of` (a hard link): its own name and object, the
    /// content and attributes of that inode, which the kernel only ever sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_of: Option<Ino>,
    /// In-memory only: when the folder was last listed from the bucket.
    #[serde(skip)]
    pub listed_at: Option<Instant>,
    /// In-memory only: bumped by every local change, to tell whether an upload is current.
    #[serde(skip)]
    pub generation: u64,
    #[serde(skip)]
    pub open: u32,
    /// In-memory only: the kernel's lookup count (entries replied minus forgotten). Only
    /// an inode the kernel has forgotten may leave memory.
    #[serde(skip)]
    pub lookups: u64,
    /// In-memory only: writes between their generation bump and the end of their pwrite.
    #[serde(skip)]
    pub writing: u32,
    /// In-memory only: open handles of this folder (`opendir`); `open` counts a file's.
    #[serde(skip)]
    pub dir_open: u32,
    /// In-memory only: what the file's content was at its last open (see `Files::open`).
    #[serde(skip)]
    pub opened_as: Option<ContentId>,
}

/// What tells a file's content apart: the bucket's version, the size, the local generation,
/// and whether it is staged.
pub type ContentId = (Option<String>, u64, u64, bool);

impl Inode {
    pub fn new(ino: Ino, parent: Ino, name: String, kind: Kind, perm: u16, uid: u32, gid: u32) -> Self {
        let now = now_ns();
        Inode {
            ino,
            parent,
            name,
            kind,
            size: 0,
            perm,
            uid,
            gid,
            mtime_ns: now,
            ctime_ns: now,
            atime_ns: None,
            target: None,
            remote: None,
            overwrites: None,
            staged: false,
            dirty: false,
            attrs_known: true,
            listed: false,
            rdev: 0,
            xattr: None,
            link: None,
            link_of: None,
            listed_at: None,
            generation: 0,
            open: 0,
            writing: 0,
            lookups: 0,
            dir_open: 0,
            opened_as: None,
        }
    }

    pub fn attr(&self) -> Attr {
        Attr {
            ino: self.ino,
            kind: self.kind,
            size: if self.kind == Kind::Dir { 4096 } else { self.size },
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            atime: from_ns(self.atime_ns.unwrap_or(self.mtime_ns)),
            mtime: from_ns(self.mtime_ns),
            ctime: from_ns(self.ctime_ns),
            nlink: match self.kind {
                Kind::Dir => 2,
                // Unlinked while open: no name left.
                _ if self.parent == Ino::NONE => 0,
                _ => 1,
            },
            rdev: self.rdev,
        }
    }

    pub fn is_listed_fresh(&self, ttl: Duration) -> bool {
        self.listed_at.is_some_and(|t| t.elapsed() < ttl)
    }

    /// The attributes as they travel on the object.
    pub fn posix_attrs(&self) -> crate::layout::PosixAttrs {
        crate::layout::PosixAttrs {
            mode: Some(self.file_mode()),
            uid: Some(self.uid),
            gid: Some(self.gid),
            mtime_ns: Some(self.mtime_ns),
            atime_ns: self.atime_ns.filter(|&a| a != self.mtime_ns),
            rdev: matches!(self.kind, Kind::CharDevice | Kind::BlockDevice).then_some(self.rdev),
            xattr: self.xattr.clone(),
            link: self.link.clone(),
        }
    }

    pub fn file_mode(&self) -> u32 {
        self.kind.type_bits() | u32::from(self.perm)
    }
}

/// Attributes as the adapter reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub nlink: u32,
    /// The device a device node names (0 for anything else).
    pub rdev: u32,
}

/// What setattr may change.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// One change waiting for the bucket. Ops name inodes, not paths: the uploader works out
/// where a file lives when it uploads it, so renames before an upload cost nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Bring the inode's object (content, attributes, location) in line with the inode.
    Sync { ino: Ino },
    /// Remove an object, unless it changed since `remote` (then the edit survives).
    Delete { remote: Remote },
    /// Queued after the uploads that move a folder's contents: the old folder key stays
    /// hidden until then, and its marker goes last.
    FolderMoved { from: String },
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    pub name: String,
    pub kind: Kind,
    pub attr: Attr,
}

/// A folder handle's entries from an offset on: a view of the snapshot taken at `opendir`,
/// shared rather than copied.
#[derive(Debug, Clone)]
pub struct DirPage {
    entries: Arc<[DirEntry]>,
    start: usize,
}

impl DirPage {
    pub fn new(entries: Arc<[DirEntry]>, offset: u64) -> DirPage {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(entries.len());
        DirPage { entries, start }
    }
}

impl std::ops::Deref for DirPage {
    type Target = [DirEntry];

    fn deref(&self) -> &[DirEntry] {
        &self.entries[self.start..]
    }
}

pub fn now_ns() -> i64 {
    to_ns(SystemTime::now())
}

pub fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

pub fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// A kernel cache entry to drop, because the bucket changed behind the kernel's back (sent
/// through FUSE's notify calls by the adapter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The attributes and cached pages of an inode (of a folder: its listing).
    Inode(Ino),
    /// A name in a folder.
    Entry { parent: Ino, name: String },
}
