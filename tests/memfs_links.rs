//! Hard links through the `Fs` core over `memory://`, without FUSE: one inode for every
//! name, a write through one name seen through the others, either name removed or moved,
//! every name a full object in the bucket with one link group, the link found again after
//! a restart and by a fresh mount, and a name another tool edits leaving the group.

use std::sync::Arc;

use autosync::fs::{Caps, FsError, Ino};
use autosync::layout::{self, PosixAttrs};
use object_store::path::Path;
use object_store::{GetOptions, ObjectStoreExt};

mod harness;
use harness::*;

async fn link(h: &Harness, from: &str, to: &str) -> Result<u32, FsError> {
    let ino = h.resolve(from).await?;
    let (parent, name) = h.parent_of(to).await?;
    let a = h.fs().link(ino, parent, name).await?;
    assert_eq!(a.ino, ino, "the new name answers the file's inode");
    Ok(a.nlink)
}

async fn nlink(h: &Harness, path: &str) -> (Ino, u32) {
    let ino = h.resolve(path).await.unwrap();
    (ino, h.fs().getattr(ino).await.unwrap().nlink)
}

/// The link group an object carries in the bucket.
async fn group(h: &Harness, key: &str) -> Option<String> {
    let r = h.store.get_opts(&Path::from(key), GetOptions { head: true, ..Default::default() }).await.unwrap();
    let map = layout::metadata_map(&r.attributes);
    assert_eq!(PosixAttrs::from_attributes(&r.attributes).0.link, map.get(layout::META_LINK).cloned());
    map.get(layout::META_LINK).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_name_is_one_inode_and_a_full_object() {
    let h = Harness::memory().await;
    h.mkdir("d").await.unwrap();
    h.write("f", b"first").await.unwrap();
    assert_eq!(link(&h, "f", "d/g").await.unwrap(), 2);
    let (f, n) = nlink(&h, "f").await;
    assert_eq!(nlink(&h, "d/g").await, (f, 2), "both names: one inode, two links");
    assert_eq!(n, 2);
    // A third name, made through the second.
    assert_eq!(link(&h, "d/g", "h").await.unwrap(), 3);

    // A write through one name is seen through the others at once.
    h.overwrite("d/g", b"FIRST").await.unwrap();
    assert_eq!(h.read("f").await.unwrap(), b"FIRST");
    assert_eq!(h.read("h").await.unwrap(), b"FIRST");

    h.flush().await;
    let bucket = h.bucket().await;
    for key in ["f", "d/g", "h"] {
        assert_eq!(bucket.get(key).map(Vec::as_slice), Some(&b"FIRST"[..]), "{key} is a full object: {bucket:?}");
    }
    let g = group(&h, "f").await.expect("the file's object carries its link group");
    assert_eq!(group(&h, "d/g").await.as_deref(), Some(g.as_str()));
    assert_eq!(group(&h, "h").await.as_deref(), Some(g.as_str()));

    // Errors as link(2) gives them.
    let d = h.resolve("d").await.unwrap();
    assert_eq!(h.fs().link(d, Ino::ROOT, "d2").await.unwrap_err().errno(), libc::EPERM, "a folder");
    assert_eq!(h.fs().link(f, Ino::ROOT, "h").await.unwrap_err().errno(), libc::EEXIST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_name_goes_and_the_file_stays_at_the_other() {
    let h = Harness::memory().await;
    h.write("a", b"content").await.unwrap();
    link(&h, "a", "b").await.unwrap();
    link(&h, "a", "c").await.unwrap();
    h.flush().await;
    let (ino, _) = nlink(&h, "a").await;

    // The first name goes: the file lives on at the others, with the same inode.
    h.unlink("a").await.unwrap();
    assert_eq!(nlink(&h, "b").await, (ino, 2));
    assert_eq!(h.resolve("a").await.unwrap_err().errno(), libc::ENOENT);
    // Another name goes.
    h.unlink("c").await.unwrap();
    assert_eq!(nlink(&h, "b").await, (ino, 1));
    assert_eq!(h.read("b").await.unwrap(), b"content");
    h.flush().await;
    assert_eq!(h.bucket().await.keys().collect::<Vec<_>>(), ["b"]);

    // Renamed onto another name of the same file: nothing happens (POSIX).
    link(&h, "b", "b2").await.unwrap();
    h.rename("b", "b2").await.unwrap();
    assert_eq!(nlink(&h, "b").await, (ino, 2));
    // A name moves; the other stays linked and the bucket follows.
    h.rename("b2", "moved").await.unwrap();
    assert_eq!(nlink(&h, "moved").await, (ino, 2));
    h.overwrite("moved", b"CONTENT").await.unwrap();
    h.flush().await;
    let bucket = h.bucket().await;
    assert_eq!(bucket.keys().collect::<Vec<_>>(), ["b", "moved"]);
    assert!(bucket.values().all(|v| v == b"CONTENT"), "{bucket:?}");
    // A file renamed over one name of a linked file takes that name only.
    h.write("other", b"other").await.unwrap();
    h.rename("other", "b").await.unwrap();
    assert_eq!(nlink(&h, "moved").await, (ino, 1));
    assert_eq!(h.read("b").await.unwrap(), b"other");
    h.flush().await;
    assert_eq!(h.bucket().await.get("moved").map(Vec::as_slice), Some(&b"CONTENT"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_is_found_again_after_a_restart_and_by_a_fresh_mount() {
    let mut h = Harness::memory().await;
    h.mkdir("d").await.unwrap();
    h.write("f", b"linked").await.unwrap();
    link(&h, "f", "d/g").await.unwrap();
    h.flush().await;

    h.restart().await;
    let (f, n) = nlink(&h, "f").await;
    assert_eq!((n, nlink(&h, "d/g").await), (2, (f, 2)), "the same state dir");

    // A fresh mount of the bucket ties the names together by their group.
    let fresh = Harness::new(Arc::clone(&h.store), Caps { create: true, update: true }).await;
    let (f2, _) = nlink(&fresh, "f").await;
    assert_eq!(nlink(&fresh, "d/g").await, (f2, 2), "one inode on another mount");
    assert_eq!(nlink(&fresh, "f").await, (f2, 2));
    fresh.overwrite("d/g", b"LINKED").await.unwrap();
    assert_eq!(fresh.read("f").await.unwrap(), b"LINKED");
    fresh.flush().await;
    let bucket = fresh.bucket().await;
    assert_eq!(bucket.get("f"), bucket.get("d/g"));
    assert_eq!(bucket.get("f").map(Vec::as_slice), Some(&b"LINKED"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_another_tool_edits_leaves_the_group() {
    let h = Harness::memory().await;
    h.write("f", b"ours").await.unwrap();
    link(&h, "f", "g").await.unwrap();
    link(&h, "f", "k").await.unwrap();
    h.flush().await;
    let (ino, _) = nlink(&h, "f").await;

    // Another tool rewrites one name (its plain PUT carries no group).
    h.remote_put("g", b"theirs").await;
    assert_eq!(h.read("g").await.unwrap(), b"theirs");
    let (g, n) = nlink(&h, "g").await;
    assert!(g != ino && n == 1, "a file of its own");
    assert_eq!(nlink(&h, "f").await, (ino, 2));
    assert_eq!(h.read("k").await.unwrap(), b"ours");

    // The name the mount shows the file at: the file moves to its other name, with its
    // inode; the edited name is a file of its own.
    h.remote_put("f", b"edited").await;
    assert_eq!(h.read("f").await.unwrap(), b"edited");
    let (f, n) = nlink(&h, "f").await;
    assert!(f != ino && n == 1);
    assert_eq!(nlink(&h, "k").await, (ino, 1));
    assert_eq!(h.read("k").await.unwrap(), b"ours");

    // Another tool deletes a name: the others stay.
    link(&h, "k", "k2").await.unwrap();
    h.flush().await;
    h.store.delete(&Path::from("k")).await.unwrap();
    assert_eq!(h.resolve("k").await.unwrap_err().errno(), libc::ENOENT);
    assert_eq!(nlink(&h, "k2").await, (ino, 1));
    assert_eq!(h.read("k2").await.unwrap(), b"ours");
    h.flush().await;
    let bucket = h.bucket().await;
    assert_eq!(bucket.keys().collect::<Vec<_>>(), ["f", "g", "k2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_removed_before_the_other_names_copy_keeps_the_content() {
    // Nothing goes up until the test flushes: the link's copy is not made when `a` goes.
    let mut h = Harness::with_config(
        Arc::new(object_store::memory::InMemory::new()),
        Caps { create: true, update: true },
        cfg_with_delay(std::time::Duration::from_secs(3600)),
    )
    .await;
    // Another client's file, known here from a listing only (nothing of it local).
    h.remote_put("a", b"only in the bucket").await;
    link(&h, "a", "b").await.unwrap();
    h.unlink("a").await.unwrap();
    assert_eq!(h.read("b").await.unwrap(), b"only in the bucket");
    h.flush().await;
    assert_eq!(h.bucket().await.into_iter().collect::<Vec<_>>(), [("b".to_string(), b"only in the bucket".to_vec())]);

    // The same with a rename onto the file's name.
    h.remote_put("c", b"second").await;
    link(&h, "c", "d").await.unwrap();
    h.write("e", b"over it").await.unwrap();
    h.rename("e", "c").await.unwrap();
    assert_eq!(h.read("d").await.unwrap(), b"second");
    h.flush().await;
    let bucket = h.bucket().await;
    assert_eq!((bucket["c"].as_slice(), bucket["d"].as_slice()), (&b"over it"[..], &b"second"[..]));
    h.restart().await;
    assert_eq!(h.read("d").await.unwrap(), b"second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_deleted_in_the_bucket_leaves_the_names_outside_it() {
    let mut h = Harness::memory().await;
    for d in ["d1", "d2", "d3"] {
        h.mkdir(d).await.unwrap();
    }
    h.write("d1/a", b"lives on").await.unwrap();
    link(&h, "d1/a", "d2/b").await.unwrap();
    h.write("d3/x", b"both go").await.unwrap();
    link(&h, "d3/x", "d3/y").await.unwrap();
    h.flush().await;
    let (ino, _) = nlink(&h, "d2/b").await;

    // Another tool removes d1 whole, and both names in d3.
    for key in ["d1/a", "d1/.autosync-folder", "d3/x", "d3/y"] {
        h.store.delete(&Path::from(key)).await.unwrap();
    }
    assert_eq!(h.resolve("d1").await.unwrap_err().errno(), libc::ENOENT);
    assert_eq!(nlink(&h, "d2/b").await, (ino, 1), "the file lives on at its other name");
    assert_eq!(h.read("d2/b").await.unwrap(), b"lives on");
    assert!(h.tree().await.keys().all(|k| !k.starts_with("d3/")), "both names in d3 are gone");
    h.flush().await;
    h.restart().await;
    assert_eq!(h.read("d2/b").await.unwrap(), b"lives on");
    let tree = h.tree().await;
    assert_eq!(tree.keys().collect::<Vec<_>>(), ["d2", "d2/b", "d3"], "{tree:?}");
}

/// One step of the hard-link model.
#[derive(Debug, Clone)]
enum Step {
    /// Writes the name (a new file if it has none) with content `n`.
    Write(usize, u8),
    Link(usize, usize),
    Unlink(usize),
    Rename(usize, usize),
    Flush,
    Restart,
    /// Once everything is up, another tool rewrites the name (a plain PUT, no group).
    RemoteEdit(usize, u8),
    /// Once everything is up, another tool deletes the name.
    RemoteDelete(usize),
}

const NAMES: [&str; 4] = ["a", "b", "d/c", "d/e"];

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let name = 0..NAMES.len();
    prop_oneof![
        3 => (name.clone(), any::<u8>()).prop_map(|(i, n)| Step::Write(i, n)),
        4 => (name.clone(), name.clone()).prop_map(|(a, b)| Step::Link(a, b)),
        2 => name.clone().prop_map(Step::Unlink),
        2 => (name.clone(), name).prop_map(|(a, b)| Step::Rename(a, b)),
        1 => Just(Step::Flush),
        1 => Just(Step::Restart),
        1 => (0..NAMES.len(), any::<u8>()).prop_map(|(i, n)| Step::RemoteEdit(i, n)),
        1 => (0..NAMES.len()).prop_map(Step::RemoteDelete),
    ]
}

/// Names to files, and each file's content: what the mount must show.
#[derive(Default)]
struct Model {
    names: std::collections::BTreeMap<&'static str, u32>,
    content: std::collections::HashMap<u32, Vec<u8>>,
    next: u32,
}

async fn run_model(steps: Vec<Step>, upload_delay: std::time::Duration) {
    let mut h = Harness::with_config(
        Arc::new(object_store::memory::InMemory::new()),
        Caps { create: true, update: true },
        cfg_with_delay(upload_delay),
    )
    .await;
    h.mkdir("d").await.unwrap();
    let mut m = Model::default();
    let mut done = Vec::new();
    for s in steps {
        done.push(s.clone());
        match s {
            Step::Write(i, n) => {
                let data = format!("{} {n}", NAMES[i]).into_bytes();
                h.write(NAMES[i], &data).await.unwrap();
                let file = *m.names.entry(NAMES[i]).or_insert_with(|| {
                    m.next += 1;
                    m.next
                });
                m.content.insert(file, data);
            }
            Step::Link(a, b) => {
                let r = link(&h, NAMES[a], NAMES[b]).await;
                match (m.names.get(NAMES[a]).copied(), m.names.contains_key(NAMES[b])) {
                    (None, _) => assert_eq!(r.unwrap_err().errno(), libc::ENOENT, "{done:?}"),
                    (Some(_), true) => assert_eq!(r.unwrap_err().errno(), libc::EEXIST, "{done:?}"),
                    (Some(f), false) => {
                        r.unwrap_or_else(|e| panic!("{done:?}: {e}"));
                        m.names.insert(NAMES[b], f);
                    }
                }
            }
            Step::Unlink(a) => {
                let r = h.unlink(NAMES[a]).await;
                match m.names.remove(NAMES[a]) {
                    Some(_) => r.unwrap_or_else(|e| panic!("{done:?}: {e}")),
                    None => assert_eq!(r.unwrap_err().errno(), libc::ENOENT, "{done:?}"),
                }
            }
            Step::Rename(a, b) => {
                let r = h.rename(NAMES[a], NAMES[b]).await;
                match m.names.get(NAMES[a]).copied() {
                    None => assert_eq!(r.unwrap_err().errno(), libc::ENOENT, "{done:?}"),
                    Some(f) => {
                        r.unwrap_or_else(|e| panic!("{done:?}: {e}"));
                        // Two names of one file (or one name): nothing happens.
                        if m.names.get(NAMES[b]) != Some(&f) {
                            m.names.remove(NAMES[a]);
                            m.names.insert(NAMES[b], f);
                        }
                    }
                }
            }
            Step::Flush => h.flush().await,
            Step::Restart => h.restart().await,
            Step::RemoteEdit(i, n) => {
                h.flush().await;
                let data = format!("theirs {n}").into_bytes();
                h.remote_put(NAMES[i], &data).await;
                // The name is a file of its own now (split off from its group, if any).
                m.next += 1;
                m.names.insert(NAMES[i], m.next);
                m.content.insert(m.next, data);
            }
            Step::RemoteDelete(i) => {
                h.flush().await;
                if m.names.remove(NAMES[i]).is_some() {
                    h.store.delete(&Path::from(NAMES[i])).await.unwrap();
                }
            }
        }
        check(&h, &m, &done).await;
    }
    h.flush().await;
    let want: std::collections::BTreeMap<String, Vec<u8>> =
        m.names.iter().map(|(n, f)| (n.to_string(), m.content[f].clone())).collect();
    assert_eq!(h.bucket().await, want, "the bucket after the last flush, {done:?}");
    // A fresh mount of the bucket shows the same files, linked as they are here.
    let fresh = Harness::new(Arc::clone(&h.store), Caps { create: true, update: true }).await;
    check(&fresh, &m, &done).await;
}

/// Every name shows its file's content; names of one file share an inode, and each
/// counts them all; names of no file are not there.
async fn check(h: &Harness, m: &Model, done: &[Step]) {
    // Every folder read first: another tool's change of a name is seen when its folder is.
    for name in NAMES {
        let _ = h.resolve(name).await;
    }
    let mut inos: std::collections::HashMap<u32, Ino> = Default::default();
    for name in NAMES {
        match m.names.get(name) {
            None => assert_eq!(h.resolve(name).await.unwrap_err().errno(), libc::ENOENT, "{name}, {done:?}"),
            Some(f) => {
                assert_eq!(h.read(name).await.unwrap_or_else(|e| panic!("{name}: {e}, {done:?}")), m.content[f]);
                let (ino, n) = nlink(h, name).await;
                let want = m.names.values().filter(|g| *g == f).count() as u32;
                assert_eq!(n, want, "st_nlink of {name}, {done:?}");
                assert_eq!(*inos.entry(*f).or_insert(ino), ino, "one inode for the names of a file, {done:?}");
            }
        }
    }
}

/// Found by the model: a name that took over the file's old object, then took the file
/// itself (the file's name unlinked), was recorded and removed in one commit; the record
/// came back at the next start, a second name of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_removed_in_the_commit_that_recorded_it_stays_removed() {
    use Step::*;
    let steps = vec![Write(3, 0), Flush, Rename(3, 1), Link(1, 3), Unlink(1), Restart];
    for delay in [3600, 0] {
        run_model(steps.clone(), std::time::Duration::from_secs(delay)).await;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48), ..Default::default() })]
    /// Random links, writes, unlinks, renames, flushes and restarts against a model of
    /// names and files; uploads only at flushes, then racing the next steps.
    #[test]
    fn links_follow_the_model(steps in proptest::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_model(steps.clone(), std::time::Duration::from_secs(3600)));
        rt.block_on(run_model(steps, std::time::Duration::ZERO));
    }
}

/// Found by the model: a name is moved away from `a` and a new link made at `a` before
/// the uploads; the new name's copy found the moving name's object still at `a`, took it
/// for another client's, and dropped the link. It now waits for that object to leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_at_a_name_another_name_is_leaving() {
    use Step::*;
    let steps = vec![
        Write(1, 205),
        Restart,
        Link(1, 0),
        Write(3, 84),
        RemoteEdit(2, 220),
        Write(0, 242),
        Rename(0, 3),
        Link(1, 0),
        Unlink(2),
        RemoteDelete(1),
    ];
    for delay in [3600, 0] {
        run_model(steps.clone(), std::time::Duration::from_secs(delay)).await;
    }
}
