//! Restart tests at each journal step: a failpoint (the `fail` crate, compiled in only by
//! `cargo test`) stops the work there as a crash would, the mount is opened again from its
//! state dir, and the change must be in the bucket exactly once: not lost, not uploaded
//! twice, no conflict copy of our own change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use autosync::fs::{Caps, FsConfig, FsError};
use autosync::store::faulty::{FaultSwitch, FaultyStore};
use object_store::memory::InMemory;

mod harness;
use harness::*;

/// The failpoints are process-wide: each test holds the scenario lock from start to end,
/// which keeps these tests apart.
fn scenario() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

fn on(name: &str) {
    fail::cfg(name, "return").expect("failpoint");
}

fn off(name: &str) {
    fail::remove(name);
}

const CAPS: [Caps; 2] = [Caps { create: true, update: true }, Caps { create: false, update: false }];

/// A mount over a store that counts its writes; uploads only when flushed (or right away
/// with `delay` zero).
async fn harness(caps: Caps, delay: Duration, cfg: FsConfig) -> (Harness, FaultSwitch) {
    let sw = FaultSwitch::default();
    let store = FaultyStore::wrap(Arc::new(InMemory::new()), sw.clone());
    let cfg = FsConfig { upload_delay: delay, open_upload_delay: delay, ..cfg };
    (Harness::with_config(store, caps, cfg).await, sw)
}

fn no_conflict_copies(b: &BTreeMap<String, Vec<u8>>) {
    assert!(!b.keys().any(|k| k.contains(".conflict-")), "a conflict copy of our own change: {:?}", b.keys());
}

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_cut_short_after_the_staging_write() {
    let _scenario = scenario();
    for caps in CAPS {
        let (mut h, sw) = harness(caps, WEEK, cfg()).await;
        h.write("f", b"version one").await.unwrap();
        h.flush().await;
        {
            on("fsync-after-staging");
            let err = h.overwrite("f", b"VERSION TWO").await.unwrap_err();
            assert!(matches!(err, FsError::Halted(_)), "{err:?}");
            off("fsync-after-staging");
        }
        h.restart().await;
        // The fsync never returned: the file is what the last acknowledged one left, and
        // the mount shows what the bucket holds.
        assert_eq!(h.read("f").await.unwrap(), b"version one");
        h.flush().await;
        let b = h.bucket().await;
        assert_eq!(b["f"], b"version one");
        no_conflict_copies(&b);
        assert_eq!(sw.writes()["f"], 1, "uploaded again without need");
        // The next acknowledged write goes up as usual.
        h.overwrite("f", b"version 3!!").await.unwrap();
        h.flush().await;
        assert_eq!(h.bucket().await["f"], b"version 3!!");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_cut_short_after_the_commit() {
    let _scenario = scenario();
    for caps in CAPS {
        let (mut h, sw) = harness(caps, WEEK, cfg()).await;
        h.write("f", b"version one").await.unwrap();
        h.flush().await;
        {
            on("fsync-after-commit");
            assert!(matches!(h.overwrite("f", b"VERSION TWO").await, Err(FsError::Halted(_))));
            off("fsync-after-commit");
        }
        h.restart().await;
        // Committed: the change is the mount's, and goes up once.
        assert_eq!(h.read("f").await.unwrap(), b"VERSION TWO");
        h.flush().await;
        let b = h.bucket().await;
        assert_eq!(b["f"], b"VERSION TWO");
        no_conflict_copies(&b);
        assert_eq!(sw.writes()["f"], 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_cut_short() {
    let _scenario = scenario();
    let data: Vec<u8> = (0..40u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for caps in CAPS {
        let cfg = FsConfig { multipart_threshold: 8 << 20, ..cfg() };
        let (mut h, sw) = harness(caps, WEEK, cfg).await;
        {
            on("upload-multipart-middle");
            h.write("big", &data).await.unwrap();
            h.flush_until_halted().await;
            off("upload-multipart-middle");
        }
        // Parts went up, but no partial object is ever visible at the path.
        assert!(h.bucket().await.is_empty());
        assert_eq!(sw.writes()["big"], 1, "the upload had started");
        h.restart().await;
        h.flush().await;
        let b = h.bucket().await;
        assert_eq!(b.len(), 1, "{:?}", b.keys());
        assert!(b["big"] == data, "the bucket's copy differs");
        assert_eq!(sw.writes()["big"], 2, "one cut-short upload, one complete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_short_before_its_commit() {
    let _scenario = scenario();
    for caps in CAPS {
        let (mut h, sw) = harness(caps, WEEK, cfg()).await;
        {
            on("upload-before-commit");
            h.write("f", b"landed").await.unwrap();
            h.flush_until_halted().await;
            off("upload-before-commit");
        }
        assert_eq!(h.bucket().await["f"], b"landed", "the put landed before the stop");
        assert_eq!(sw.writes()["f"], 1);
        h.restart().await;
        h.flush().await;
        let b = h.bucket().await;
        assert_eq!(b, BTreeMap::from([("f".to_string(), b"landed".to_vec())]));
        // Recognised by its hash: settled without a second put.
        assert_eq!(sw.writes()["f"], 1);
        assert_eq!(h.fs().status().conflicts, 0);
    }
}

/// The replayed upload now carries newer content than the object the cut-short put left:
/// that object is recognised as this mount's own (its `autosync-origin`) and written over,
/// not taken for someone else's edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_short_before_its_commit_then_edited_again() {
    let _scenario = scenario();
    for caps in CAPS {
        let (mut h, sw) = harness(caps, WEEK, cfg()).await;
        h.write("f", b"version one").await.unwrap();
        h.flush().await;
        {
            on("upload-before-commit");
            h.overwrite("f", b"VERSION TWO").await.unwrap();
            h.flush_until_halted().await;
            off("upload-before-commit");
        }
        assert_eq!(h.bucket().await["f"], b"VERSION TWO");
        assert_eq!(sw.writes()["f"], 2);
        h.restart().await;
        h.overwrite("f", b"version 3!!").await.unwrap();
        h.flush().await;
        let b = h.bucket().await;
        assert_eq!(b, BTreeMap::from([("f".to_string(), b"version 3!!".to_vec())]));
        assert_eq!(h.fs().status().conflicts, 0);
        assert_eq!(sw.writes()["f"], 3);
        assert_eq!(h.read("f").await.unwrap(), b"version 3!!");
    }
}

/// Someone else's edit is still a conflict: the origin check only claims our own objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writers_edit_after_a_cut_short_upload_is_still_a_conflict() {
    let _scenario = scenario();
    let (mut h, _sw) = harness(CAPS[0], WEEK, cfg()).await;
    h.write("f", b"version one").await.unwrap();
    h.flush().await;
    {
        on("upload-before-commit");
        h.overwrite("f", b"VERSION TWO").await.unwrap();
        h.flush_until_halted().await;
        off("upload-before-commit");
    }
    h.remote_put("f", b"their edit").await;
    h.restart().await;
    h.overwrite("f", b"version 3!!").await.unwrap();
    h.flush().await;
    let b = h.bucket().await;
    assert_eq!(b["f"], b"their edit");
    let copies: Vec<_> = b.iter().filter(|(k, _)| k.contains(".conflict-")).collect();
    assert_eq!(copies.len(), 1, "{:?}", b.keys());
    assert_eq!(copies[0].1, b"version 3!!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_write_error_turns_the_mount_read_only() {
    let _scenario = scenario();
    let (mut h, _sw) = harness(CAPS[0], WEEK, cfg()).await;
    h.write("kept", b"acknowledged").await.unwrap();
    {
        on("journal-write-error");
        let err = h.write("new", b"never acknowledged").await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err:?}");
        off("journal-write-error");
    }
    // Sticky: the journal works again, but the mount no longer trusts it.
    let why = h.fs().status().read_only.expect("read-only after a journal error");
    assert!(why.contains("journal write failed") && !why.contains('\n'), "{why}");
    let events = h.fs().events(Some(1)).held();
    let gone = events.iter().filter(|e| e.kind == autosync::fs::events::Kind::ReadOnly).collect::<Vec<_>>();
    assert_eq!(gone.len(), 1, "one read_only event: {events:?}");
    assert_eq!(gone[0].message.as_deref(), Some(why.as_str()));
    let err = h.write("later", b"x").await.unwrap_err();
    assert_eq!(err.errno(), libc::EROFS, "{err:?}");
    assert_eq!(h.read("kept").await.unwrap(), b"acknowledged", "reads go on");
    // A new mount starts writable, with everything acknowledged before.
    h.restart().await;
    assert!(h.fs().status().read_only.is_none());
    h.flush().await;
    assert_eq!(h.bucket().await["kept"], b"acknowledged");
    h.write("later", b"x").await.unwrap();
}

/// A listing answered before this mount's deletes landed and merged after them does not
/// bring back what they removed: the folder they emptied stays gone. (Held between its
/// answer and its merge by a failpoint; before the fix the folder showed again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_listing_older_than_our_deletes_does_not_bring_back_what_they_removed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _scenario = scenario();
    let (h, _sw) = harness(CAPS[0], WEEK, cfg()).await;
    h.mkdir("d1").await.unwrap();
    h.write("d1/b", b"xyz").await.unwrap();
    h.flush().await;
    h.rename("d1/b", "a").await.unwrap();
    h.rmdir("d1").await.unwrap();
    let (reached, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (r, go) = (Arc::clone(&reached), Arc::clone(&release));
    fail::cfg_callback("listing-before-merge", move || {
        r.store(true, Ordering::SeqCst);
        while !go.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .expect("failpoint");
    // A listing of the root, answered now (d1/b and d1's marker are still there).
    let fs = Arc::clone(h.fs());
    let late = tokio::spawn(async move {
        let fh = fs.opendir(autosync::fs::ROOT_INO).await?;
        let names: Vec<String> =
            fs.readdir(fh, 0)?.iter().map(|e| e.name.clone()).filter(|n| !n.starts_with('.')).collect();
        fs.releasedir(fh);
        Ok::<_, FsError>(names)
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while !reached.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the listing is answered and held before its merge");
    off("listing-before-merge");
    // Meanwhile the move and the deletes land.
    h.flush().await;
    assert_eq!(h.bucket().await, BTreeMap::from([("a".to_string(), b"xyz".to_vec())]));
    release.store(true, Ordering::SeqCst);
    let names = late.await.unwrap().unwrap();
    assert_eq!(names, ["a"], "the late listing brought the emptied folder back");
    assert_eq!(h.tree().await, BTreeMap::from([("a".to_string(), Some(b"xyz".to_vec()))]));
}
