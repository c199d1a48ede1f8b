//! The fuser adapter: converts kernel requests into `Fs` calls and replies. It decides
//! nothing itself; errno comes from `FsError::errno`, and a panic below becomes EIO instead
//! of hanging every process that uses the mount.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::fs::events::{Caller, as_caller};
use crate::fs::{Attr, Fh, Fs, FsError, FsResult, Ino, Invalidation, Kind, SetAttr, XattrReply};

/// How long the kernel may cache attributes and names before asking again.
const TTL: Duration = Duration::from_secs(1);

/// Sends the filesystem's kernel cache invalidations through FUSE notify calls, from a
/// thread of its own: a notify made while the kernel waits on a request of ours could
/// deadlock. Errors (the kernel no longer holds the inode or name) are of no consequence.
pub fn forward_invalidations(fs: &Fs, notifier: fuser::Notifier) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Invalidation>();
    fs.set_invalidations(tx);
    std::thread::Builder::new().name("fuse-notify".into()).spawn(move || {
        for what in rx {
            let r = match &what {
                Invalidation::Inode(ino) => notifier.inval_inode(INodeNo(ino.0), 0, 0),
                Invalidation::Entry { parent, name } => notifier.inval_entry(INodeNo(parent.0), OsStr::new(name)),
            };
            match r {
                Ok(()) => tracing::trace!(?what, "kernel cache invalidated"),
                Err(e) => tracing::trace!(?what, "kernel cache invalidation: {e}"),
            }
        }
    })?;
    Ok(())
}

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle) -> Self {
        FuseAdapter { fs, rt }
    }

    /// Runs a filesystem call to completion on the runtime, on behalf of the request's
    /// caller (whom the events it causes name), turning panics into EIO.
    fn run<T>(&self, what: &str, req: &Request, f: impl Future<Output = FsResult<T>>) -> Result<T, Errno> {
        let caller = Caller { uid: req.uid(), pid: req.pid() };
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.rt.block_on(as_caller(caller, f)))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                log_error(what, &e);
                Err(Errno::from_i32(e.errno()))
            }
            Err(_) => {
                tracing::error!("{what}: internal error (panic); answering EIO");
                Err(Errno::EIO)
            }
        }
    }
}

fn log_error(what: &str, e: &FsError) {
    match e {
        // Expected answers, not failures.
        FsError::NotFound
        | FsError::Exists
        | FsError::NotEmpty
        | FsError::NotDir
        | FsError::IsDir
        | FsError::NoData
        | FsError::Range
        | FsError::TooBig(_)
        | FsError::NotKept(_) => {
            tracing::debug!("{what}: {e}")
        }
        // Someone else replaced the object under an open file: worth a word, not an alarm.
        FsError::Stale(_) => tracing::warn!("{what}: {e}"),
        FsError::Shared(inner) => log_error(what, inner),
        _ => tracing::error!("{what}: {e}"),
    }
}

fn xattr_reply(reply: fuser::ReplyXattr, got: XattrReply) {
    match got {
        XattrReply::Size(n) => reply.size(n),
        XattrReply::Data(d) => reply.data(&d),
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::EINVAL)
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

macro_rules! try_reply {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(errno) => return $reply.error(errno),
        }
    };
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = try_reply!(reply, name_str(name));
        let a = try_reply!(reply, self.run("lookup", req, self.fs.lookup(Ino(parent.0), name)));
        reply.entry(&TTL, &attr(&a), Generation(0));
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let a = try_reply!(reply, self.run("getattr", req, self.fs.getattr(Ino(ino.0))));
        reply.attr(&TTL, &attr(&a));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr { mode, uid, gid, size, atime: atime.map(time), mtime: mtime.map(time) };
        let a = try_reply!(reply, self.run("setattr", req, self.fs.setattr(Ino(ino.0), set)));
        reply.attr(&TTL, &attr(&a));
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let t = try_reply!(reply, self.run("readlink", req, self.fs.readlink(Ino(ino.0))));
        reply.data(t.as_bytes());
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let name = try_reply!(reply, name_str(name));
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            let a = try_reply!(
                reply,
                self.run("mknod", req, self.fs.mknod(Ino(parent.0), name, mode & !umask, rdev, req.uid(), req.gid()))
            );
            return reply.entry(&TTL, &attr(&a), Generation(0));
        }
        let (a, fh) = try_reply!(
            reply,
            self.run("mknod", req, self.fs.create(Ino(parent.0), name, mode & !umask, req.uid(), req.gid()))
        );
        let _ = self.rt.block_on(self.fs.release(fh));
        reply.entry(&TTL, &attr(&a), Generation(0));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let name = try_reply!(reply, name_str(name));
        let a = try_reply!(
            reply,
            self.run("mkdir", req, self.fs.mkdir(Ino(parent.0), name, mode & !umask, req.uid(), req.gid()))
        );
        reply.entry(&TTL, &attr(&a), Generation(0));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = try_reply!(reply, name_str(name));
        try_reply!(reply, self.run("unlink", req, self.fs.unlink(Ino(parent.0), name)));
        reply.ok();
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = try_reply!(reply, name_str(name));
        try_reply!(reply, self.run("rmdir", req, self.fs.rmdir(Ino(parent.0), name)));
        reply.ok();
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let name = try_reply!(reply, name_str(link_name));
        let target = try_reply!(reply, target.to_str().ok_or(Errno::EINVAL));
        let a = try_reply!(
            reply,
            self.run("symlink", req, self.fs.symlink(Ino(parent.0), name, target, req.uid(), req.gid()))
        );
        reply.entry(&TTL, &attr(&a), Generation(0));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let name = try_reply!(reply, name_str(name));
        let newname = try_reply!(reply, name_str(newname));
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        try_reply!(
            reply,
            self.run("rename", req, self.fs.rename(Ino(parent.0), name, Ino(newparent.0), newname, noreplace))
        );
        reply.ok();
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let name = try_reply!(reply, name_str(newname));
        let a = try_reply!(reply, self.run("link", req, self.fs.link(Ino(ino.0), Ino(newparent.0), name)));
        reply.entry(&TTL, &attr(&a), Generation(0));
    }

    fn open(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (fh, keep) = try_reply!(reply, self.run("open", req, self.fs.open(Ino(ino.0))));
        let flags = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
        reply.opened(FileHandle(fh.0), flags);
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let data = try_reply!(reply, self.run("read", req, self.fs.read(Fh(fh.0), offset, size)));
        reply.data(&data);
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let n = try_reply!(reply, self.run("write", req, self.fs.write(Fh(fh.0), offset, data)));
        reply.written(n);
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        try_reply!(reply, self.run("flush", req, self.fs.close(Fh(fh.0))));
        reply.ok();
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        try_reply!(reply, self.run("release", req, self.fs.release(Fh(fh.0))));
        reply.ok();
    }

    fn fsync(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        try_reply!(reply, self.run("fsync", req, self.fs.flush(Fh(fh.0))));
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = try_reply!(reply, self.run("opendir", req, self.fs.opendir(Ino(ino.0))));
        reply.opened(FileHandle(fh.0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = try_reply!(reply, self.fs.readdir(Fh(fh.0), offset).map_err(|e| Errno::from_i32(e.errno())));
        for (i, e) in entries.iter().enumerate() {
            if reply.add(INodeNo(e.ino.0), offset + i as u64 + 1, kind(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let entries = try_reply!(reply, self.fs.readdir(Fh(fh.0), offset).map_err(|e| Errno::from_i32(e.errno())));
        // The kernel holds every entry it was given, but "." and "..".
        let mut given = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if reply.add(INodeNo(e.ino.0), offset + i as u64 + 1, &e.name, &TTL, &attr(&e.attr), Generation(0)) {
                break;
            }
            if e.name != "." && e.name != ".." {
                given.push(e.ino);
            }
        }
        self.fs.entries_replied(&given);
        reply.ok();
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(Ino(ino.0), nlookup);
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(Fh(fh.0));
        reply.ok();
    }

    fn fsyncdir(&self, req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Folder changes are journalled when they happen; make them durable now.
        try_reply!(reply, self.run("fsyncdir", req, async { self.fs.sync_journal() }));
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A bucket has no fixed size: report a large, mostly free volume.
        let blocks = 1u64 << 32;
        reply.statfs(blocks, blocks, blocks, 1 << 30, 1 << 30, 4096, 255, 4096);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        tracing::trace!(ino = ino.0, ?name, size, "getxattr");
        let got = try_reply!(reply, self.run("getxattr", req, self.fs.getxattr(Ino(ino.0), name.as_bytes(), size)));
        xattr_reply(reply, got);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        let got = try_reply!(reply, self.run("listxattr", req, self.fs.listxattr(Ino(ino.0), size)));
        xattr_reply(reply, got);
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        try_reply!(reply, self.run("setxattr", req, self.fs.setxattr(Ino(ino.0), name.as_bytes(), value, flags)));
        reply.ok();
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        try_reply!(reply, self.run("removexattr", req, self.fs.removexattr(Ino(ino.0), name.as_bytes())));
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = try_reply!(reply, name_str(name));
        let (a, fh) = try_reply!(
            reply,
            self.run("create", req, self.fs.create(Ino(parent.0), name, mode & !umask, req.uid(), req.gid()))
        );
        reply.created(&TTL, &attr(&a), Generation(0), FileHandle(fh.0), FopenFlags::empty());
    }
}
