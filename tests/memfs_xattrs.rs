//! Extended attributes through the `Fs` core over `memory://`, without FUSE: the answers
//! a program gets (flags, sizes, errors), and what reaches the bucket (s3fs's `xattr`
//! metadata) and comes back from it, after a restart and on a fresh mount.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use autosync::fs::{Caps, FsError, Ino, XattrReply};
use autosync::layout::PosixAttrs;
use autosync::store::Store;
use autosync::xattrs;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, PutOptions, PutPayload};

mod harness;
use harness::spy::{Hooks, Spy};
use harness::*;

const CREATE: i32 = libc::XATTR_CREATE;
const REPLACE: i32 = libc::XATTR_REPLACE;

async fn get(h: &Harness, ino: Ino, name: &str) -> Result<Vec<u8>, FsError> {
    let XattrReply::Size(n) = h.fs().getxattr(ino, name.as_bytes(), 0).await? else { panic!("size asked") };
    match h.fs().getxattr(ino, name.as_bytes(), n.max(1)).await? {
        XattrReply::Data(d) => {
            assert_eq!(d.len(), n as usize, "the size told is the value's");
            Ok(d)
        }
        other => panic!("{other:?}"),
    }
}

async fn list(h: &Harness, ino: Ino) -> Vec<String> {
    let XattrReply::Size(n) = h.fs().listxattr(ino, 0).await.unwrap() else { panic!("size asked") };
    if n == 0 {
        return Vec::new();
    }
    let XattrReply::Data(d) = h.fs().listxattr(ino, n).await.unwrap() else { panic!("data asked") };
    assert_eq!(d.last(), Some(&0), "each name ends with a NUL");
    d.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8(s.to_vec()).unwrap()).collect()
}

/// The attributes the object at `key` carries in the bucket.
async fn in_bucket(h: &Harness, key: &str) -> xattrs::XattrMap {
    let r = h.store.get_opts(&Path::from(key), GetOptions { head: true, ..Default::default() }).await.unwrap();
    let (attrs, _) = PosixAttrs::from_attributes(&r.attributes);
    attrs.xattr.as_deref().map(xattrs::decode).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_list_remove_with_flags_and_errors() {
    let h = Harness::memory().await;
    h.write("f", b"content").await.unwrap();
    let ino = h.resolve("f").await.unwrap();
    let fs = h.fs();
    assert!(list(&h, ino).await.is_empty());
    assert_eq!(fs.getxattr(ino, b"user.a", 0).await.unwrap_err().errno(), libc::ENODATA);

    let ctime = fs.getattr(ino).await.unwrap().ctime;
    fs.setxattr(ino, b"user.a", b"one", 0).await.unwrap();
    assert!(fs.getattr(ino).await.unwrap().ctime > ctime, "a set is a change of the inode");
    fs.setxattr(ino, b"user.empty", b"", CREATE).await.unwrap();
    fs.setxattr(ino, b"user.bin", &[0, 255, b'"', b','], 0).await.unwrap();
    assert_eq!(get(&h, ino, "user.a").await.unwrap(), b"one");
    assert_eq!(get(&h, ino, "user.empty").await.unwrap(), b"");
    assert_eq!(get(&h, ino, "user.bin").await.unwrap(), [0, 255, b'"', b',']);
    assert_eq!(list(&h, ino).await, ["user.a", "user.bin", "user.empty"]);

    // XATTR_CREATE on an existing name, XATTR_REPLACE on a missing one.
    assert_eq!(fs.setxattr(ino, b"user.a", b"x", CREATE).await.unwrap_err().errno(), libc::EEXIST);
    assert_eq!(fs.setxattr(ino, b"user.new", b"x", REPLACE).await.unwrap_err().errno(), libc::ENODATA);
    fs.setxattr(ino, b"user.a", b"two", REPLACE).await.unwrap();
    assert_eq!(get(&h, ino, "user.a").await.unwrap(), b"two");

    // A buffer too small for the value or the list.
    assert_eq!(fs.getxattr(ino, b"user.a", 2).await.unwrap_err().errno(), libc::ERANGE);
    assert_eq!(fs.listxattr(ino, 5).await.unwrap_err().errno(), libc::ERANGE);

    fs.removexattr(ino, b"user.a").await.unwrap();
    assert_eq!(fs.removexattr(ino, b"user.a").await.unwrap_err().errno(), libc::ENODATA);
    assert_eq!(fs.getxattr(ino, b"user.a", 0).await.unwrap_err().errno(), libc::ENODATA);

    // Other namespaces are not kept: ACLs, security labels, capabilities, trusted.
    for name in ["system.posix_acl_access", "system.posix_acl_default", "security.selinux", "security.capability"] {
        assert_eq!(fs.getxattr(ino, name.as_bytes(), 0).await.unwrap_err().errno(), libc::ENOTSUP, "{name}");
        assert_eq!(fs.setxattr(ino, name.as_bytes(), b"v", 0).await.unwrap_err().errno(), libc::ENOTSUP, "{name}");
        assert_eq!(fs.removexattr(ino, name.as_bytes()).await.unwrap_err().errno(), libc::ENOTSUP, "{name}");
    }
    assert_eq!(fs.setxattr(ino, b"trusted.x", b"v", 0).await.unwrap_err().errno(), libc::ENOTSUP);
    // Names s3fs's format cannot hold.
    assert_eq!(fs.setxattr(ino, b"user.a,b", b"v", 0).await.unwrap_err().errno(), libc::EINVAL);
    assert_eq!(fs.setxattr(ino, b"user.\"q\"", b"v", 0).await.unwrap_err().errno(), libc::EINVAL);
    assert_eq!(list(&h, ino).await, ["user.bin", "user.empty"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_over_the_metadata_budget_is_e2big_and_changes_nothing() {
    let h = Harness::memory().await;
    h.write("f", b"x").await.unwrap();
    let ino = h.resolve("f").await.unwrap();
    let fs = h.fs();
    fs.setxattr(ino, b"user.small", b"kept", 0).await.unwrap();
    fs.setxattr(ino, b"user.big", &[b'a'; 900], 0).await.unwrap();
    let e = fs.setxattr(ino, b"user.more", &[b'b'; 300], 0).await.unwrap_err();
    assert_eq!(e.errno(), libc::E2BIG);
    // Replacing within the budget still works, and nothing of the refused set stayed.
    fs.setxattr(ino, b"user.big", &[b'c'; 800], 0).await.unwrap();
    assert_eq!(list(&h, ino).await, ["user.big", "user.small"]);
    h.flush().await;
    let meta = in_bucket(&h, "f").await;
    assert_eq!(meta["user.big"], vec![b'c'; 800]);
    assert_eq!(meta["user.small"], b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_reach_the_bucket_and_come_back_on_a_fresh_mount() {
    let mut h = Harness::memory().await;
    h.mkdir("d").await.unwrap();
    h.write("d/f", b"content").await.unwrap();
    h.flush().await;
    // A metadata-only change of a file already in the bucket, and one of a folder.
    let f = h.resolve("d/f").await.unwrap();
    let d = h.resolve("d").await.unwrap();
    h.fs().setxattr(f, b"user.mime_type", b"text/plain", 0).await.unwrap();
    h.fs().setxattr(d, b"user.folder", b"yes", 0).await.unwrap();
    h.flush().await;
    assert_eq!(in_bucket(&h, "d/f").await, [("user.mime_type".to_string(), b"text/plain".to_vec())].into());
    assert_eq!(in_bucket(&h, "d/.autosync-folder").await, [("user.folder".to_string(), b"yes".to_vec())].into());
    assert_eq!(h.read("d/f").await.unwrap(), b"content");
    assert_eq!(h.bucket().await["d/f"], b"content", "the content went up unchanged");

    // The same state dir after a restart.
    h.restart().await;
    let f = h.resolve("d/f").await.unwrap();
    assert_eq!(get(&h, f, "user.mime_type").await.unwrap(), b"text/plain");

    // A fresh mount of the bucket: a state dir of its own.
    let fresh = Harness::new(Arc::clone(&h.store), Caps { create: true, update: true }).await;
    let f = fresh.resolve("d/f").await.unwrap();
    let d = fresh.resolve("d").await.unwrap();
    assert_eq!(get(&fresh, f, "user.mime_type").await.unwrap(), b"text/plain");
    assert_eq!(list(&fresh, d).await, ["user.folder"]);
    assert_eq!(get(&fresh, d, "user.folder").await.unwrap(), b"yes");

    // A removal there reaches the bucket too; a rename keeps the attributes.
    fresh.fs().removexattr(f, b"user.mime_type").await.unwrap();
    fresh.fs().setxattr(f, b"user.other", b"1", 0).await.unwrap();
    fresh.rename("d/f", "d/g").await.unwrap();
    fresh.flush().await;
    assert_eq!(in_bucket(&fresh, "d/g").await, [("user.other".to_string(), b"1".to_vec())].into());
    // A rename of a file with no other change is a server-side copy: it keeps them too.
    fresh.rename("d/g", "d/h").await.unwrap();
    fresh.flush().await;
    assert_eq!(in_bucket(&fresh, "d/h").await, [("user.other".to_string(), b"1".to_vec())].into());
    assert_eq!(fresh.bucket().await.keys().collect::<Vec<_>>(), ["d/h"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_during_writes_goes_up_with_the_content() {
    let h = Harness::memory().await;
    h.write("f", b"v1").await.unwrap();
    let ino = h.resolve("f").await.unwrap();
    h.fs().setxattr(ino, b"user.v", b"1", 0).await.unwrap();
    h.write("f", b"v2").await.unwrap();
    h.flush().await;
    assert_eq!(h.bucket().await["f"], b"v2");
    assert_eq!(in_bucket(&h, "f").await, [("user.v".to_string(), b"1".to_vec())].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_s3fs_wrote_are_read_and_kept() {
    let h = Harness::memory().await;
    // As s3fs -o use_xattr writes them, with an ACL among them.
    let header = "%7B%22user.from_s3fs%22%3A%22aGVsbG8%3D%22%2C%22system.posix_acl_access%22%3A%22AgAAAA%3D%3D%22%7D";
    let attrs = PosixAttrs { mode: Some(0o100644), xattr: Some(header.into()), ..Default::default() };
    let opts = PutOptions { attributes: attrs.to_attributes(None, None), ..Default::default() };
    h.store.put_opts(&Path::from("s"), PutPayload::from(Bytes::from_static(b"s3fs")), opts).await.unwrap();
    let ino = h.resolve("s").await.unwrap();
    assert_eq!(get(&h, ino, "user.from_s3fs").await.unwrap(), b"hello");
    // The ACL is not honoured here: not listed, not read, but not lost either.
    assert_eq!(list(&h, ino).await, ["user.from_s3fs"]);
    assert_eq!(h.fs().getxattr(ino, b"system.posix_acl_access", 0).await.unwrap_err().errno(), libc::ENOTSUP);
    h.fs().setxattr(ino, b"user.ours", b"x", 0).await.unwrap();
    h.flush().await;
    let meta = in_bucket(&h, "s").await;
    assert_eq!(meta.keys().collect::<Vec<_>>(), ["system.posix_acl_access", "user.from_s3fs", "user.ours"]);
    assert_eq!(meta["system.posix_acl_access"], [2, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_change_of_the_attributes_shows_after_a_listing() {
    let h = Harness::memory().await;
    h.write("f", b"data").await.unwrap();
    let ino = h.resolve("f").await.unwrap();
    h.fs().setxattr(ino, b"user.v", b"ours", 0).await.unwrap();
    h.flush().await;
    // Another tool writes the object again with new metadata.
    let map: xattrs::XattrMap = [("user.v".to_string(), b"theirs".to_vec())].into();
    let attrs = PosixAttrs { mode: Some(0o100644), xattr: xattrs::encode(&map), ..Default::default() };
    let opts = PutOptions { attributes: attrs.to_attributes(None, None), ..Default::default() };
    h.store.put_opts(&Path::from("f"), PutPayload::from(Bytes::from_static(b"data")), opts).await.unwrap();
    let ino = h.resolve("f").await.unwrap();
    assert_eq!(get(&h, ino, "user.v").await.unwrap(), b"theirs");
}

/// HEADs fail while `fail` is set; listings and everything else go through.
#[derive(Debug)]
struct HeadsFail {
    fail: AtomicBool,
}

impl Hooks for HeadsFail {
    fn get(&self, _location: &Path, head: bool) -> Option<object_store::Error> {
        (head && self.fail.load(Ordering::SeqCst))
            .then(|| object_store::Error::Generic { store: "test", source: "HEAD refused".into() })
    }
}

/// An object changed by another client whose metadata the mount then cannot read: its
/// attributes are not answered from the version before, nor written over, until they
/// can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_that_cannot_be_read_are_an_error_not_none() {
    let hooks = Arc::new(HeadsFail { fail: AtomicBool::new(false) });
    let bucket: Store = Arc::new(object_store::memory::InMemory::new());
    let store = Spy::store(Arc::clone(&bucket), Arc::clone(&hooks));
    let h = Harness::new(store, Caps { create: true, update: true }).await;
    let theirs: xattrs::XattrMap = [("user.theirs".to_string(), b"kept".to_vec())].into();
    let attrs = PosixAttrs { mode: Some(0o100644), xattr: xattrs::encode(&theirs), ..Default::default() };
    let put = |data: &'static [u8]| {
        let opts = PutOptions { attributes: attrs.to_attributes(None, None), ..Default::default() };
        let bucket = Arc::clone(&bucket);
        async move { bucket.put_opts(&Path::from("f"), PutPayload::from(Bytes::from_static(data)), opts).await }
    };
    put(b"v1").await.unwrap();
    let ino = h.resolve("f").await.unwrap();
    assert_eq!(list(&h, ino).await, ["user.theirs"]);
    // Changed in the bucket, then listed again while HEADs fail.
    put(b"v2").await.unwrap();
    hooks.fail.store(true, Ordering::SeqCst);
    let ino = h.resolve("f").await.unwrap();
    let fs = h.fs();
    assert_eq!(fs.listxattr(ino, 0).await.unwrap_err().errno(), libc::EIO);
    assert_eq!(fs.getxattr(ino, b"user.theirs", 0).await.unwrap_err().errno(), libc::EIO);
    assert_eq!(fs.setxattr(ino, b"user.ours", b"x", 0).await.unwrap_err().errno(), libc::EIO);
    // Once the bucket answers, the set keeps theirs.
    hooks.fail.store(false, Ordering::SeqCst);
    fs.setxattr(ino, b"user.ours", b"x", 0).await.unwrap();
    h.flush().await;
    assert_eq!(in_bucket(&h, "f").await.keys().collect::<Vec<_>>(), ["user.ours", "user.theirs"]);
}
