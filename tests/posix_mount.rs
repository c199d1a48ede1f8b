//! Real-mount tests of POSIX features legacy programs rely on, beside `real_mount.rs`:
//! extended attributes with `setfattr`/`getfattr`, `cp -a --preserve=all` and `rsync -aX`,
//! kept in the bucket as s3fs's `xattr` metadata and back after a remount and on a fresh
//! mount of the bucket; hard links with `ln`, a maildir delivery, `git gc` and `rsync -H`,
//! every name a full object, linked again after a remount and on a fresh mount. Each test runs once per backend (`local::NAME`, `moto::NAME`,
//! `garage::NAME`, `garage3::NAME`, `azurite::NAME`), with the harness of `tests/common/`.
//!
//! Set `AUTOSYNC_TEST_LOG` (e.g. `debug`) to change the daemons' `RUST_LOG` (default `info`).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use autosync::xattrs;
use common::fixture::Fixture;
use common::servers::Backend;
use common::{Tier, read, run_ok, write_file};

static TIER: Tier = Tier::real_mount("autosync-posix-");

impl Fixture {
    /// The attributes the object at `key` carries in the bucket (its `xattr` metadata).
    fn xattrs_in_bucket(&self, key: &str) -> xattrs::XattrMap {
        let meta = self.bucket.get(key).meta;
        meta.get(xattrs::META_XATTR).map(|v| xattrs::decode(v)).unwrap_or_default()
    }
}

fn cmd(prog: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(prog);
    for a in args {
        c.arg(a.as_ref());
    }
    c
}

/// The `user.*` attributes of `path` as `getfattr -d` prints them (values as hex).
fn getfattr(path: &Path) -> BTreeMap<String, String> {
    let out = run_ok(cmd("getfattr", &[&"--absolute-names", &"-d", &"-e", &"hex", &path])).stdout;
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn hex(v: &[u8]) -> String {
    format!("0x{}", v.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn expect(entries: &[(&str, &[u8])]) -> BTreeMap<String, String> {
    entries.iter().map(|(k, v)| (k.to_string(), hex(v))).collect()
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// `setfattr`/`getfattr` on a file and a folder: the values come back, the errors are
/// those of a Linux filesystem, and the attributes are in the bucket as s3fs's `xattr`
/// metadata, after an unmount and remount, and in a fresh mount of the bucket.
fn setfattr_getfattr_survive_remount(backend: Backend) {
    let fx = Fixture::new(&TIER, "xattr", backend);
    let m = fx.mount_as(1);
    let (d, f) = (fx.m("d"), fx.m("d/f.txt"));
    fs::create_dir(&d).unwrap();
    write_file(&f, b"with attributes\n");
    run_ok(cmd("setfattr", &[&"-n", &"user.color", &"-v", &"blue", &f]));
    run_ok(cmd("setfattr", &[&"-n", &"user.bin", &"-v", &"0x00ff0a22", &f]));
    run_ok(cmd("setfattr", &[&"-n", &"user.gone", &"-v", &"soon", &f]));
    run_ok(cmd("setfattr", &[&"-x", &"user.gone", &f]));
    run_ok(cmd("setfattr", &[&"-n", &"user.folder", &"-v", &"yes", &d]));
    let want_f = expect(&[("user.bin", &[0, 0xff, 0x0a, 0x22]), ("user.color", b"blue")]);
    let want_d = expect(&[("user.folder", b"yes")]);
    assert_eq!(getfattr(&f), want_f, "in the mount");
    assert_eq!(getfattr(&d), want_d, "in the mount");

    // Errors as Linux filesystems give them.
    assert_eq!(xattr::get(&f, "user.missing").unwrap(), None, "a missing name is ENODATA");
    assert_eq!(errno(xattr::remove(&f, "user.missing")), Some(libc::ENODATA));
    assert_eq!(errno(xattr::set(&f, "user.big", &[b'x'; 2000])), Some(libc::E2BIG), "over the metadata budget");
    assert_eq!(errno(xattr::set(&f, "system.posix_acl_access", &[2, 0, 0, 0])), Some(libc::EOPNOTSUPP));
    assert_eq!(errno(xattr::get(&f, "security.selinux")), Some(libc::EOPNOTSUPP));
    let mut small = [0u8; 2];
    let r = unsafe { libc::getxattr(cstr(&f).as_ptr(), c"user.color".as_ptr(), small.as_mut_ptr().cast(), 2) };
    assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ERANGE)), "a small buffer");
    // `ls -l` asks for ACLs and labels: it lists without complaint.
    let ls = run_ok(cmd("ls", &[&"-l", &d]));
    assert!(ls.stdout.contains("f.txt") && ls.stderr.is_empty(), "{ls}");

    m.flush();
    let want = |w: &[(&str, &[u8])]| w.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect::<xattrs::XattrMap>();
    assert_eq!(fx.xattrs_in_bucket("d/f.txt"), want(&[("user.bin", &[0, 0xff, 0x0a, 0x22]), ("user.color", b"blue")]));
    assert_eq!(fx.xattrs_in_bucket("d/.autosync-folder"), want(&[("user.folder", b"yes")]));
    assert_eq!(fx.bucket.data("d/f.txt"), b"with attributes\n");
    m.unmount();

    let m = fx.mount_as(1);
    assert_eq!(getfattr(&f), want_f, "after unmount + remount");
    assert_eq!(getfattr(&d), want_d, "after unmount + remount");
    m.unmount();

    let m = fx.mount_as(2);
    assert_eq!(getfattr(&f), want_f, "in a fresh mount of the bucket");
    assert_eq!(getfattr(&d), want_d, "in a fresh mount of the bucket");
    assert_eq!(read(&f), b"with attributes\n");
    m.unmount();
}

fn cstr(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// A local tree with attributes on files and a folder, for the copies.
fn tree_with_xattrs(root: &Path) -> Vec<(PathBuf, BTreeMap<String, String>)> {
    let files = [
        ("a.txt", &b"alpha\n"[..], &[("user.a", &b"1"[..]), ("user.mime_type", b"text/plain")][..]),
        ("sub/b.bin", &[0u8, 1, 2][..], &[("user.b", &[0u8, 255][..])][..]),
        ("sub/plain", &b"no attributes\n"[..], &[][..]),
    ];
    let mut out = Vec::new();
    for (rel, data, attrs) in files {
        let p = root.join(rel);
        write_file(&p, data);
        for (k, v) in attrs {
            xattr::set(&p, k, v).unwrap();
        }
        out.push((PathBuf::from(rel), expect(attrs)));
    }
    xattr::set(root.join("sub"), "user.dir", b"d").unwrap();
    out.push((PathBuf::from("sub"), expect(&[("user.dir", b"d")])));
    out
}

fn check_copy(root: &Path, want: &[(PathBuf, BTreeMap<String, String>)], what: &str) {
    for (rel, attrs) in want {
        assert_eq!(&getfattr(&root.join(rel)), attrs, "{what}: {}", rel.display());
    }
    assert_eq!(read(&root.join("a.txt")), b"alpha\n", "{what}");
}

/// `cp -a --preserve=all` and `rsync -aX` (and `-aHAX`) into the mount keep the
/// attributes, `cp -a` within it and `cp --preserve=xattr` out of it too, and they are in
/// the bucket for a fresh mount.
fn cp_and_rsync_keep_xattrs(backend: Backend) {
    let fx = Fixture::new(&TIER, "xcopy", backend);
    let src = fx.root.join("src");
    let want = tree_with_xattrs(&src);
    let m = fx.mount_as(1);
    run_ok(cmd("cp", &[&"-a", &"--preserve=all", &src, &fx.m("cp")]));
    check_copy(&fx.m("cp"), &want, "cp -a --preserve=all");
    run_ok(cmd("rsync", &[&"-aX", &format!("{}/", src.display()), &fx.m("rs")]));
    check_copy(&fx.m("rs"), &want, "rsync -aX");
    // With ACLs too (-A): the mount has none to keep, and rsync goes on without them.
    run_ok(cmd("rsync", &[&"-aHAX", &format!("{}/", src.display()), &fx.m("rsh")]));
    check_copy(&fx.m("rsh"), &want, "rsync -aHAX");
    // Within the mount.
    run_ok(cmd("cp", &[&"-a", &"--preserve=all", &fx.m("cp"), &fx.m("cp2")]));
    check_copy(&fx.m("cp2"), &want, "cp -a --preserve=all within the mount");
    // An rsync again finds nothing to change (the attributes read back are the same).
    let again = run_ok(cmd("rsync", &[&"-aXi", &format!("{}/", src.display()), &fx.m("rs")]));
    assert!(again.stdout.trim().is_empty(), "rsync -aX again changed: {again}");
    // Out of the mount, with the attributes.
    let out = fx.root.join("out");
    run_ok(cmd("cp", &[&"-r", &"--preserve=xattr", &fx.m("cp"), &out]));
    check_copy(&out, &want, "cp --preserve=xattr out of the mount");
    m.flush();
    m.unmount();

    let m = fx.mount_as(2);
    check_copy(&fx.m("cp"), &want, "cp copy in a fresh mount of the bucket");
    check_copy(&fx.m("rs"), &want, "rsync copy in a fresh mount of the bucket");
    m.unmount();
}

/// Inode and link count of a name.
fn ino_nlink(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.ino(), m.nlink())
}

fn git_in(fx: &Fixture, dir: &Path) -> Command {
    let home = fx.root.join("home");
    fs::create_dir_all(&home).unwrap();
    let mut c = Command::new("git");
    c.arg("-C").arg(dir).env("HOME", &home).env("GIT_CONFIG_NOSYSTEM", "1");
    for (k, v) in [("NAME", "Test"), ("EMAIL", "test@example.com")] {
        c.env(format!("GIT_AUTHOR_{k}"), v).env(format!("GIT_COMMITTER_{k}"), v);
    }
    c
}

/// The names that are linked together in the mount (and must stay so after a remount and
/// on a fresh mount): `ln`'s pair and `rsync -H`'s pair.
fn check_links(fx: &Fixture, what: &str) {
    // A fresh mount counts the names it has seen: each pair is looked at whole first.
    let b = ino_nlink(&fx.m("d/b"));
    assert_eq!((ino_nlink(&fx.m("a")), b), (b, b), "{what}: ln a d/b, one inode");
    assert_eq!(b.1, 2, "{what}");
    assert_eq!(read(&fx.m("d/b")), b"one\ntwo\n", "{what}");
    let y = ino_nlink(&fx.m("rs/sub/y"));
    assert_eq!((ino_nlink(&fx.m("rs/x")), y.1), (y, 2), "{what}: rsync -H kept the link");
    let x = y.0;
    assert_eq!(ino_nlink(&fx.m("rs/z")).1, 1, "{what}");
    assert_ne!(ino_nlink(&fx.m("rs/z")).0, x, "{what}");
    let fsck = run_ok(git_in(fx, &fx.m("repo")).args(["fsck", "--full", "--no-progress"]));
    assert!(fsck.stderr.trim().is_empty(), "{what}: {fsck}");
}

/// Hard links as programs make them: `ln`, then a write through one name seen through the
/// other; a maildir delivery (link into new/, unlink from tmp/); `git` (which links each
/// object file into place) through `git gc`; `rsync -aH` of a tree with a hard link. Every
/// name is a full object with the same link group in the bucket; the links hold after an
/// unmount and remount, and on a fresh mount of the bucket.
fn hard_links_with_ln_maildir_git_and_rsync(backend: Backend) {
    let fx = Fixture::new(&TIER, "links", backend);
    let src = fx.root.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    write_file(&src.join("x"), b"linked by rsync\n");
    fs::hard_link(src.join("x"), src.join("sub/y")).unwrap();
    write_file(&src.join("z"), b"alone\n");
    let m = fx.mount_as(1);

    fs::create_dir(fx.m("d")).unwrap();
    write_file(&fx.m("a"), b"one\n");
    run_ok(cmd("ln", &[&fx.m("a"), &fx.m("d/b")]));
    run_ok(cmd("sh", &[&"-c", &format!("echo two >> {}", fx.m("d/b").display())]));
    assert_eq!(read(&fx.m("a")), b"one\ntwo\n", "a write through one name is seen through the other");
    assert_eq!(errno(fs::hard_link(fx.m("d"), fx.m("d2"))), Some(libc::EPERM), "a folder");

    // A maildir delivery: written in tmp/, linked into new/, unlinked from tmp/.
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(fx.m(&format!("Maildir/{sub}"))).unwrap();
    }
    write_file(&fx.m("Maildir/tmp/1.host"), b"Subject: hi\n\nbody\n");
    fs::hard_link(fx.m("Maildir/tmp/1.host"), fx.m("Maildir/new/1.host")).unwrap();
    fs::remove_file(fx.m("Maildir/tmp/1.host")).unwrap();
    assert_eq!(ino_nlink(&fx.m("Maildir/new/1.host")).1, 1);

    // git links every object file into place; gc packs and prunes them.
    let repo = fx.m("repo");
    fs::create_dir(&repo).unwrap();
    run_ok(git_in(&fx, &repo).args(["init", "-q", "-b", "main"]));
    for i in 0..3 {
        write_file(&repo.join(format!("f{i}.txt")), format!("file {i}\n").as_bytes());
        run_ok(git_in(&fx, &repo).args(["add", "-A"]));
        run_ok(git_in(&fx, &repo).args(["commit", "-q", "-m", &format!("commit {i}")]));
    }
    run_ok(git_in(&fx, &repo).args(["gc", "-q", "--prune=now"]));
    let count = run_ok(git_in(&fx, &repo).args(["count-objects", "-v"]));
    assert!(count.stdout.contains("count: 0\n") && count.stdout.contains("in-pack: 9\n"), "{count}");

    run_ok(cmd("rsync", &[&"-aH", &format!("{}/", src.display()), &fx.m("rs")]));
    check_links(&fx, "in the mount");
    m.flush();

    // In the bucket: every name a full object, the linked ones with one group.
    // (Azure names it `autosync_link`: its metadata names are identifiers.)
    let group = |key: &str| {
        let meta = fx.bucket.get(key).meta;
        meta.get("autosync-link").or(meta.get("autosync_link")).cloned()
    };
    assert_eq!(fx.bucket.data("a"), b"one\ntwo\n");
    assert_eq!(fx.bucket.data("d/b"), b"one\ntwo\n");
    assert!(group("a").is_some() && group("a") == group("d/b"), "{:?} {:?}", group("a"), group("d/b"));
    assert_eq!(fx.bucket.data("rs/sub/y"), b"linked by rsync\n");
    assert!(group("rs/x").is_some() && group("rs/x") == group("rs/sub/y"));
    assert_eq!(group("rs/z"), None);
    assert_eq!(fx.bucket.data("Maildir/new/1.host"), b"Subject: hi\n\nbody\n");
    assert!(fx.bucket.try_get("Maildir/tmp/1.host").is_none(), "the tmp/ name is gone");
    m.unmount();

    let m = fx.mount_as(1);
    check_links(&fx, "after unmount + remount");
    m.unmount();
    let m = fx.mount_as(2);
    check_links(&fx, "in a fresh mount of the bucket");
    assert_eq!(read(&fx.m("Maildir/new/1.host")), b"Subject: hi\n\nbody\n");
    m.unmount();
}

against_every_backend!(
    setfattr_getfattr_survive_remount,
    cp_and_rsync_keep_xattrs,
    hard_links_with_ln_maildir_git_and_rsync
);
