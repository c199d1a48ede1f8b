//! Real-mount tests of POSIX features legacy programs rely on, beside `real_mount.rs`:
//! extended attributes with `setfattr`/`getfattr`, `cp -a --preserve=all` and `rsync -aX`,
//! kept in the bucket as s3fs's `xattr` metadata and back after a remount and on a fresh
//! mount of the bucket. Each test runs once per backend (`local::NAME`, `moto::NAME`,
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

against_every_backend!(setfattr_getfattr_survive_remount, cp_and_rsync_keep_xattrs);
