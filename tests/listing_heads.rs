//! What a folder listing costs in requests, without FUSE: its LIST, plus at most one
//! attribute fetch (HEAD) for each object whose version the mount has not seen. Unchanged
//! objects are not asked about again, neither at the next listing nor after the mount
//! reopens its state; an object that changed is asked about once. Counted by a store
//! wrapper over `memory://`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use autosync::fs::{Attr, Caps, FsConfig, Ino, Kind, ROOT_INO};
use autosync::layout::PosixAttrs;
use autosync::store::Store;
use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutOptions, PutPayload};

mod harness;
use harness::spy::{Hooks, Spy};
use harness::*;

/// The requests a mount made, by kind and key.
#[derive(Debug, Default)]
struct Counts {
    heads: BTreeMap<String, u64>,
    gets: BTreeMap<String, u64>,
    listings: u64,
}

/// Counts attribute fetches (HEADs) and reads per key, and folder listings.
#[derive(Debug)]
struct Counter {
    counts: Arc<Mutex<Counts>>,
    /// How long each folder listing takes to answer.
    list_delay: Duration,
    /// How long each attribute fetch takes to answer.
    head_delay: Duration,
}

impl Hooks for Counter {
    fn get(&self, location: &Path, head: bool) -> Option<object_store::Error> {
        let mut c = self.counts.lock().unwrap();
        let per_key = if head { &mut c.heads } else { &mut c.gets };
        *per_key.entry(location.to_string()).or_default() += 1;
        None
    }

    fn get_delay(&self, _location: &Path, head: bool) -> Duration {
        if head { self.head_delay } else { Duration::ZERO }
    }

    fn list(&self, _prefix: Option<&Path>) -> Duration {
        self.counts.lock().unwrap().listings += 1;
        self.list_delay
    }
}

struct Counted {
    h: Harness,
    /// The bucket itself, not counted (what other clients write through).
    bucket: Store,
    counts: Arc<Mutex<Counts>>,
}

impl Counted {
    /// A mount over a counting `memory://` bucket. Listings are trusted for `ttl`.
    async fn new(ttl: Duration) -> Counted {
        Self::with_list_delay(ttl, Duration::ZERO).await
    }

    /// The same, over a bucket that takes `list_delay` to answer each listing.
    async fn with_list_delay(ttl: Duration, list_delay: Duration) -> Counted {
        let cfg = FsConfig { metadata_ttl: ttl, listing_min_age: Duration::ZERO, ..cfg() };
        Self::with_config(cfg, list_delay).await
    }

    async fn with_config(cfg: FsConfig, list_delay: Duration) -> Counted {
        Self::with_delays(cfg, list_delay, Duration::ZERO).await
    }

    async fn with_delays(cfg: FsConfig, list_delay: Duration, head_delay: Duration) -> Counted {
        let bucket: Store = Arc::new(InMemory::new());
        let counts = Arc::new(Mutex::new(Counts::default()));
        let counter = Counter { counts: Arc::clone(&counts), list_delay, head_delay };
        let store = Spy::store(Arc::clone(&bucket), Arc::new(counter));
        let h = Harness::with_config(store, Caps { create: true, update: true }, cfg).await;
        Counted { h, bucket, counts }
    }

    /// Another client writes `key` with s3fs-style attributes (mode 0600, uid 1234).
    async fn remote_put(&self, key: &str, data: &[u8]) {
        let attrs = PosixAttrs {
            mode: Some(0o100600),
            uid: Some(1234),
            gid: Some(4321),
            mtime_ns: Some(1_700_000_000_000_000_000),
            atime_ns: None,
            rdev: None,
            xattr: None,
            link: None,
        };
        let opts = PutOptions { attributes: attrs.to_attributes(None, None), ..Default::default() };
        self.bucket
            .put_opts(&Path::from(key), PutPayload::from(Bytes::copy_from_slice(data)), opts)
            .await
            .expect("remote put");
    }

    /// The HEADs made since the last call, per key; and the number of listings.
    fn take(&self) -> (BTreeMap<String, u64>, u64) {
        let c = std::mem::take(&mut *self.counts.lock().unwrap());
        (c.heads, c.listings)
    }

    /// The reads (GETs) made since the last call, per key.
    fn take_gets(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.counts.lock().unwrap().gets)
    }

    /// What `ls -l DIR` asks of the filesystem: open the folder, read its entries (with
    /// their attributes, as readdirplus does), then look each one up. Returns the
    /// attributes by name, checking that both answers agree.
    async fn ls_l(&self, dir: &str) -> BTreeMap<String, Attr> {
        let ino: Ino = if dir.is_empty() { ROOT_INO } else { self.h.resolve(dir).await.expect("resolve") };
        let fs = self.h.fs();
        let fh = fs.opendir(ino).await.expect("opendir");
        let mut entries = Vec::new();
        // In pages, as the kernel asks for them.
        loop {
            let page = fs.readdir(fh, entries.len() as u64).expect("readdir");
            if page.is_empty() {
                break;
            }
            entries.extend(page.iter().take(25).cloned());
        }
        fs.releasedir(fh);
        let mut out = BTreeMap::new();
        for e in entries.into_iter().filter(|e| e.name != "." && e.name != "..") {
            let a = fs.lookup(ino, &e.name).await.expect("lookup");
            assert_eq!(a, e.attr, "readdir and lookup disagree about {}", e.name);
            out.insert(e.name, a);
        }
        out
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("f{i:04}")).collect()
}

/// The attributes another client's object carries, as the mount shows them.
fn assert_remote_attrs(a: &Attr, what: &str) {
    assert_eq!((a.kind, a.perm, a.uid, a.gid), (Kind::File, 0o600, 1234, 4321), "attributes of {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_fetches_each_new_object_once_and_unchanged_ones_never_again() {
    const N: usize = 300;
    let mut c = Counted::new(Duration::from_millis(50)).await;
    for n in names(N) {
        c.remote_put(&format!("big/{n}"), n.as_bytes()).await;
    }
    c.remote_put("top.txt", b"top").await;

    // The way there: the root's new entries, the file and the folder (its marker).
    c.h.resolve("big").await.expect("resolve");
    let (heads, _) = c.take();
    let want = BTreeMap::from([("big/.autosync-folder".to_string(), 1), ("top.txt".to_string(), 1)]);
    assert_eq!(heads, want, "attribute fetches on the way to the folder");

    // A first `ls -l`: one fetch for each of the N new objects, none twice.
    let first = c.ls_l("big").await;
    assert_eq!(first.len(), N);
    for (name, a) in &first {
        assert_remote_attrs(a, name);
    }
    let (heads, _) = c.take();
    assert_eq!(heads.len(), N, "one attribute fetch per new object: {heads:?}");
    assert!(heads.values().all(|&n| n == 1), "an object's attributes were fetched twice: {heads:?}");
    assert!(heads.keys().all(|k| k.starts_with("big/f")), "fetched outside the folder listed: {heads:?}");

    // Again after the TTL: the folder is listed again, but nothing is fetched.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(c.ls_l("big").await, first);
    let (heads, listings) = c.take();
    assert!(listings >= 1, "the folder was not listed again after its TTL");
    assert_eq!(heads, BTreeMap::new(), "unchanged objects fetched again");

    // After the mount reopens its state (a remount): listed again, nothing fetched.
    c.h.restart().await;
    let again = c.ls_l("big").await;
    let (heads, listings) = c.take();
    assert!(listings >= 1, "the folder was not listed after the remount");
    assert_eq!(heads, BTreeMap::new(), "unchanged objects fetched again after a remount");
    assert_eq!(again.len(), N);
    for (name, a) in &again {
        assert_remote_attrs(a, name);
        assert_eq!((a.size, a.mtime), (first[name].size, first[name].mtime), "{name} after the remount");
    }

    // One object changes in the bucket: exactly one fetch, for it.
    c.remote_put("big/f0007", b"a new version, longer").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let after = c.ls_l("big").await;
    let (heads, _) = c.take();
    assert_eq!(heads, BTreeMap::from([("big/f0007".to_string(), 1)]), "one fetch for the changed object");
    assert_eq!(after["f0007"].size, 21);
    assert_remote_attrs(&after["f0007"], "the changed object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_of_a_listing_are_read_once_and_known_after_a_remount() {
    const N: usize = 40;
    let mut c = Counted::new(Duration::ZERO).await;
    let link = PosixAttrs {
        mode: Some(0o120777),
        uid: Some(1),
        gid: Some(2),
        mtime_ns: Some(1_700_000_000_000_000_000),
        atime_ns: None,
        rdev: None,
        xattr: None,
        link: None,
    };
    for i in 0..N {
        let target = format!("../target/number-{i}");
        let opts = PutOptions { attributes: link.to_attributes(None, None), ..Default::default() };
        let payload = PutPayload::from(Bytes::from(target.into_bytes()));
        c.bucket.put_opts(&Path::from(format!("links/l{i:02}")), payload, opts).await.expect("put a symlink");
    }
    for round in ["first listing", "after a remount"] {
        let listed = c.ls_l("links").await;
        assert_eq!(listed.len(), N, "{round}");
        for (name, a) in &listed {
            let i: usize = name[1..].parse().unwrap();
            assert_eq!(a.kind, Kind::Symlink, "{round}: {name}");
            // The size of a symlink is its target's length: known before any readlink.
            assert_eq!(a.size, format!("../target/number-{i}").len() as u64, "{round}: {name}");
        }
        let gets = c.take_gets();
        let (heads, _) = c.take();
        if round == "first listing" {
            assert_eq!(gets.len(), N, "{round}: each target read once: {gets:?}");
            assert!(gets.values().all(|&n| n == 1), "{round}: a target read twice: {gets:?}");
            assert_eq!(heads.keys().filter(|k| k.starts_with("links/l")).count(), N, "{round}: {heads:?}");
        } else {
            assert_eq!(gets, BTreeMap::new(), "{round}: targets read again");
            assert_eq!(heads, BTreeMap::new(), "{round}: attributes fetched again");
        }
        let ino = c.h.resolve("links/l07").await.expect("resolve");
        assert_eq!(c.h.fs().readlink(ino).await.expect("readlink"), "../target/number-7", "{round}");
        c.h.restart().await;
        c.take();
        c.take_gets();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_need_a_folder_listed_at_once_share_one_listing() {
    const N: usize = 200;
    let c = Arc::new(Counted::with_list_delay(Duration::from_secs(3600), Duration::from_millis(200)).await);
    for n in names(N) {
        c.remote_put(&format!("big/{n}"), n.as_bytes()).await;
    }
    c.h.resolve("big").await.expect("resolve");
    c.take();
    // Four `ls -l` at once, while the folder's first listing is slow to answer.
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.ls_l("big").await })
        })
        .collect();
    for r in runs {
        assert_eq!(r.await.expect("ls -l").len(), N);
    }
    let (heads, listings) = c.take();
    assert_eq!(listings, 1, "the folder was listed more than once");
    assert_eq!(heads.len(), N, "one attribute fetch per new object: {heads:?}");
    assert!(heads.values().all(|&n| n == 1), "an object's attributes were fetched twice: {heads:?}");
}

/// A folder over `--max-inodes` leaves memory once the kernel lets go of its entries, and
/// its entries' records are kept aside: listed again, or after a remount, the objects still
/// the same take them back (same attributes, same inode numbers) without a HEAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_that_left_memory_takes_its_attributes_back() {
    const N: usize = 300;
    let ttl = Duration::from_millis(50);
    let cfg = FsConfig { metadata_ttl: ttl, listing_min_age: Duration::ZERO, max_inodes: 50, ..cfg() };
    let mut c = Counted::with_config(cfg, Duration::ZERO).await;
    for n in names(N) {
        c.remote_put(&format!("big/{n}"), n.as_bytes()).await;
    }
    c.h.resolve("big").await.expect("resolve");
    let first = c.ls_l("big").await;
    c.take();
    // The kernel forgets every entry; past the TTL the folder leaves memory.
    let leave = |c: &Counted, listed: &BTreeMap<String, Attr>| {
        for a in listed.values() {
            c.h.fs().forget(a.ino, 1);
        }
        c.h.fs().evict_listings();
        c.h.fs().status().inodes
    };
    tokio::time::sleep(ttl + Duration::from_millis(10)).await;
    let left = leave(&c, &first);
    assert!(left < 10, "{left} inodes in memory after the folder's listing left");

    // Meanwhile another client changes one object and deletes another.
    c.remote_put("big/f0003", b"changed while out of memory").await;
    c.bucket.delete(&Path::from("big/f0004")).await.expect("delete");
    let again = c.ls_l("big").await;
    let (heads, _) = c.take();
    assert_eq!(heads, BTreeMap::from([("big/f0003".to_string(), 1)]), "only the changed object is asked about");
    assert_eq!(again.len(), N - 1);
    assert!(!again.contains_key("f0004"), "the deleted object came back");
    assert_eq!(again["f0003"].size, 27);
    for (name, a) in again.iter().filter(|(n, _)| n.as_str() != "f0003") {
        assert_eq!(a, &first[name], "{name} took its record back");
    }

    // Out of memory again, then a remount: nothing is asked about.
    tokio::time::sleep(ttl + Duration::from_millis(10)).await;
    leave(&c, &again);
    c.h.restart().await;
    let after = c.ls_l("big").await;
    let (heads, _) = c.take();
    assert_eq!(heads, BTreeMap::new(), "attributes fetched again after a remount");
    assert_eq!(after, again);
}

/// A folder read while its listing still fetches its new entries' attributes waits for
/// them: a symlink is never answered as a file (the kernel would keep it a file, and
/// `readlink` would fail with EINVAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_read_during_its_listing_waits_for_the_attributes() {
    let cfg = FsConfig { metadata_ttl: Duration::from_secs(60), listing_min_age: Duration::ZERO, ..cfg() };
    let c = Counted::with_delays(cfg, Duration::ZERO, Duration::from_millis(300)).await;
    let link = PosixAttrs { mode: Some(0o120777), ..Default::default() };
    let opts = PutOptions { attributes: link.to_attributes(None, None), ..Default::default() };
    c.bucket.put_opts(&Path::from("d/link"), PutPayload::from_static(b"target"), opts).await.expect("put");
    let d = c.h.resolve("d").await.expect("resolve d");
    c.take();

    let fs = Arc::clone(c.h.fs());
    let first = tokio::spawn(async move { fs.opendir(d).await });
    // The first listing is merged once its attribute fetch has started.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c.counts.lock().unwrap().heads.contains_key("d/link") {
        assert!(std::time::Instant::now() < deadline, "the listing never fetched d/link's attributes");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for fh in [c.h.fs().opendir(d).await.expect("second opendir"), first.await.unwrap().expect("first opendir")] {
        let page = c.h.fs().readdir(fh, 0).expect("readdir");
        let kinds: Vec<_> = page.iter().filter(|e| e.name == "link").map(|e| e.kind).collect();
        assert_eq!(kinds, [Kind::Symlink]);
        c.h.fs().releasedir(fh);
    }
}
