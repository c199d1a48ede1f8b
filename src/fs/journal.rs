//! The journal: the ordered log of changes not yet in the bucket. It owns the in-memory
//! queue (behind its own lock), the state database the queue is durable in, the keys that
//! pending deletes and moves hide from listings, what the uploader is working on right now,
//! and the rule that says which queued change may run beside which ([`Footprint`]).
//!
//! It knows ops and keys, not inodes' contents: a change that spans the tree and the queue
//! takes the tree's lock first, then this one (`Core::lock`), and commits its batch while it
//! holds both, so the database records the queue and the inodes in the order they changed.
//! Nothing here does I/O to the bucket.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::error::{FsError, FsResult};
use super::types::{ConflictRecord, Ino, Op, Seq};
use crate::layout;
use crate::state::{Batch, StateDb, StateError};

#[derive(Debug)]
pub struct Queued {
    pub op: Op,
    /// Not before: the upload delay pushes it back while a file keeps changing.
    pub ready_at: Instant,
    /// Failed attempts in a row, the last one's error, and when to try again (capped
    /// exponential backoff, per change: a change that keeps failing holds up only the
    /// changes that overlap it).
    pub tries: u32,
    pub last_error: Option<String>,
    pub retry_at: Option<Instant>,
}

/// A change the uploader is working on.
#[derive(Debug, Default)]
pub struct Running {
    /// The inode a `Sync` uploads.
    pub ino: Option<Ino>,
    /// Its keys when it started, and those [`Queue::refit`] added when it planned (a rename
    /// may move them meanwhile).
    pub footprint: Footprint,
    /// Keys it is writing right now: a listing may already show them, but they are not
    /// someone else's new objects.
    pub writing: HashSet<String>,
}

/// The queue and what goes with it: the state behind the journal's lock.
#[derive(Debug)]
pub struct Queue {
    ops: BTreeMap<Seq, Queued>,
    /// The queued `Sync` of each inode (one at most).
    syncs: HashMap<Ino, Seq>,
    /// Keys (and `prefix/` folder keys) with a pending delete or move: hidden from listings.
    hidden: HashMap<String, u32>,
    /// Keys hidden until an op that completed at the given epoch (the last few): a listing
    /// taken before then may still show what that op removed.
    unhidden: std::collections::VecDeque<(u64, String)>,
    next_seq: u64,
    next_conflict: u64,
    /// Bumped when an upload lands, so a listing taken before it does not delete its file.
    pub epoch: u64,
    /// The changes the uploader is working on.
    running: BTreeMap<Seq, Running>,
}

impl Queue {
    pub fn new(next_seq: u64, next_conflict: u64) -> Queue {
        Queue {
            ops: BTreeMap::new(),
            syncs: HashMap::new(),
            hidden: HashMap::new(),
            unhidden: std::collections::VecDeque::new(),
            next_seq: next_seq.max(1),
            next_conflict: next_conflict.max(1),
            epoch: 0,
            running: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The queued ops, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (Seq, &Queued)> {
        self.ops.iter().map(|(s, q)| (*s, q))
    }

    /// The oldest op.
    #[cfg(test)]
    pub fn head(&self) -> Option<(Seq, Op, Instant)> {
        self.ops.iter().next().map(|(s, q)| (*s, q.op.clone(), q.ready_at))
    }

    /// Whether the uploader is in the middle of uploading `ino`.
    pub fn is_uploading(&self, ino: Ino) -> bool {
        self.running.values().any(|r| r.ino == Some(ino))
    }

    /// The inodes being uploaded right now.
    pub fn uploading(&self) -> impl Iterator<Item = Ino> + '_ {
        self.running.values().filter_map(|r| r.ino)
    }

    /// Whether any change is being uploaded right now.
    pub fn any_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// How many changes are being uploaded right now.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// The uploader started on `seq`, which touches `footprint` (its keys may move while
    /// it runs: a scan blocks both what it started with and what it touches now).
    pub fn start(&mut self, seq: Seq, footprint: Footprint) {
        self.running.insert(seq, Running { footprint, ..Running::default() });
    }

    /// The running `seq` is about to plan its work, and `now` is what it touches as the
    /// tree stands (a change made between its start and now may have moved its keys). Keys
    /// it did not start with join its footprint when they overlap no other running change
    /// and no change queued before it: true. Otherwise it stops running, with no attempt
    /// counted, and waits its turn again: false.
    pub fn refit(&mut self, seq: Seq, now: Footprint, footprint: impl Fn(&Op) -> Footprint) -> bool {
        let Some(r) = self.running.get(&seq) else { return true };
        let new: Vec<String> = now.0.into_iter().filter(|k| !r.footprint.0.contains(k)).collect();
        if new.is_empty() {
            return true;
        }
        let new = Footprint(new);
        let mut blocked = Blocked::default();
        for (s, r) in &self.running {
            if *s != seq {
                blocked.add(&r.footprint);
            }
        }
        for q in self.ops.range(..seq).take(SCAN_WINDOW).map(|(_, q)| q) {
            blocked.add(&footprint(&q.op));
        }
        if blocked.overlaps(&new) {
            self.running.remove(&seq);
            return false;
        }
        let r = self.running.get_mut(&seq).expect("checked above");
        r.footprint.0.extend(new.0);
        r.footprint.0.sort();
        r.footprint.0.dedup();
        true
    }

    /// `seq` is the upload of `ino`.
    pub fn set_uploading(&mut self, seq: Seq, ino: Ino) {
        self.running.entry(seq).or_default().ino = Some(ino);
    }

    /// `seq` is writing the object at `key` right now.
    pub fn writing(&mut self, seq: Seq, key: &str) {
        self.running.entry(seq).or_default().writing.insert(key.to_string());
    }

    /// Whether an upload under way is writing the object at `key`.
    pub fn is_being_written(&self, key: &str) -> bool {
        self.running.values().any(|r| r.writing.contains(key))
    }

    /// The changes that keep failing, oldest first: the key or inode each is about, with
    /// its last error and how many attempts failed.
    pub fn failing(&self) -> impl Iterator<Item = (Seq, &Queued)> {
        self.ops.iter().filter(|(_, q)| q.last_error.is_some()).map(|(s, q)| (*s, q))
    }

    /// Any change waiting out a backoff may be tried again at once (a flush was asked for).
    pub fn retry_now(&mut self) {
        for q in self.ops.values_mut() {
            q.retry_at = None;
        }
    }

    /// The queued `Sync` of an inode.
    #[cfg(test)]
    pub fn sync_of(&self, ino: Ino) -> Option<Seq> {
        self.syncs.get(&ino).copied()
    }

    pub fn has_sync(&self, ino: Ino) -> bool {
        self.syncs.contains_key(&ino)
    }

    /// The inodes with a queued `Sync`.
    pub fn synced_inodes(&self) -> impl Iterator<Item = Ino> + '_ {
        self.syncs.keys().copied()
    }

    /// Appends an op, ready after `delay`, and records it in `batch`.
    pub fn push(&mut self, op: Op, delay: Duration, batch: &mut Batch) -> FsResult<Seq> {
        let seq = Seq(self.next_seq);
        self.next_seq += 1;
        batch.op(seq.0, &op)?;
        batch.set_meta("next_seq", self.next_seq);
        self.register(seq, op, Instant::now() + delay);
        Ok(seq)
    }

    /// Puts an op in the queue (a new one, or one replayed from the database), hiding what
    /// it removes from listings meanwhile.
    pub fn register(&mut self, seq: Seq, op: Op, ready_at: Instant) {
        for k in hidden_keys(&op) {
            *self.hidden.entry(k).or_default() += 1;
        }
        if let Op::Sync { ino } = op {
            self.syncs.insert(ino, seq);
        }
        self.ops.insert(seq, Queued { op, ready_at, tries: 0, last_error: None, retry_at: None });
    }

    /// Pushes an inode's queued upload back to `delay` from now, if one is queued.
    pub fn postpone(&mut self, ino: Ino, delay: Duration) -> bool {
        let Some(seq) = self.syncs.get(&ino) else { return false };
        if let Some(q) = self.ops.get_mut(seq) {
            q.ready_at = Instant::now() + delay;
        }
        true
    }

    /// Brings an inode's queued `Sync` forward to `delay` from now, if it was due later;
    /// says whether it did (the uploader, asleep until the old time, needs a wake-up).
    pub fn hasten(&mut self, ino: Ino, delay: Duration) -> bool {
        let Some(seq) = self.syncs.get(&ino) else { return false };
        let at = Instant::now() + delay;
        match self.ops.get_mut(seq) {
            Some(q) if q.ready_at > at => {
                q.ready_at = at;
                true
            }
            _ => false,
        }
    }

    /// Drops an inode's queued `Sync` from the queue and the database (it is queued again
    /// behind everything, or its inode went).
    pub fn drop_sync(&mut self, ino: Ino, batch: &mut Batch) {
        if let Some(seq) = self.syncs.remove(&ino) {
            self.ops.remove(&seq);
            batch.del_ops.push(seq.0);
        }
    }

    /// Forgets that an inode has a queued `Sync`, leaving the op in the queue: it runs and
    /// finds nothing to do, or covers the state snapshotted when it started.
    pub fn forget_sync(&mut self, ino: Ino) {
        self.syncs.remove(&ino);
    }

    /// The uploader takes `seq` (a `Sync` of `ino`): changes from now on queue a fresh op.
    pub fn take_sync(&mut self, seq: Seq, ino: Ino) {
        if self.syncs.get(&ino) == Some(&seq) {
            self.syncs.remove(&ino);
        }
    }

    /// An attempt at `seq` failed with `error`: it keeps its place in line, is tried again
    /// after a backoff that doubles with each failure (capped at [`BACKOFF_MAX`]), and takes
    /// a fresh snapshot then, so changes made meanwhile join it instead of queueing another
    /// upload. Returns how many attempts failed in a row.
    pub fn attempt_failed(&mut self, seq: Seq, op: &Op, error: String) -> u32 {
        self.attempt_ended(seq);
        if let Op::Sync { ino } = op
            && self.ops.contains_key(&seq)
        {
            self.syncs.entry(*ino).or_insert(seq);
        }
        let Some(q) = self.ops.get_mut(&seq) else { return 0 };
        q.tries += 1;
        let backoff = BACKOFF_FIRST.saturating_mul(1 << (q.tries - 1).min(16)).min(BACKOFF_MAX);
        let jitter = Duration::from_millis(rand::random::<u64>() % 250);
        q.retry_at = Some(Instant::now() + backoff + jitter);
        q.last_error = Some(error);
        q.tries
    }

    /// An attempt at `seq` ended without completing it or failing (it requeued itself).
    pub fn ended(&mut self, seq: Seq) {
        if self.running.remove(&seq).is_some() {
            self.epoch += 1;
        }
    }

    fn attempt_ended(&mut self, seq: Seq) {
        self.running.remove(&seq);
        self.epoch += 1;
    }

    /// `seq` is done: out of the queue (and of `batch`'s database), its keys shown again.
    pub fn complete(&mut self, seq: Seq, batch: &mut Batch) {
        self.attempt_ended(seq);
        if let Some(q) = self.ops.remove(&seq) {
            match q.op {
                Op::Sync { ino } => {
                    if self.syncs.get(&ino) == Some(&seq) {
                        self.syncs.remove(&ino);
                    }
                }
                op @ (Op::Delete { .. } | Op::FolderMoved { .. }) => {
                    for k in hidden_keys(&op) {
                        self.unhide(&k);
                        if self.unhidden.len() == UNHIDDEN_KEPT {
                            self.unhidden.pop_front();
                        }
                        self.unhidden.push_back((self.epoch, k));
                    }
                }
            }
        }
        batch.del_ops.push(seq.0);
    }

    fn unhide(&mut self, key: &str) {
        if let Some(c) = self.hidden.get_mut(key) {
            *c -= 1;
            if *c == 0 {
                self.hidden.remove(key);
            }
        }
    }

    /// The keys pending deletes and moves hide (a key, or `prefix/` for a folder), and
    /// those hidden by ops that completed after `since` (the epoch a listing was taken at).
    pub fn hidden(&self, since: u64) -> impl Iterator<Item = &str> {
        self.hidden.keys().map(String::as_str).chain(self.unhidden_since(since).map(|(_, k)| k.as_str()))
    }

    fn unhidden_since(&self, since: u64) -> impl Iterator<Item = &(u64, String)> {
        self.unhidden.iter().rev().take_while(move |(e, _)| *e > since)
    }

    /// Whether a key a listing taken at epoch `since` shows is hidden: by a pending delete
    /// or move, or by one that completed after the listing was taken (the listing may show
    /// what it removed).
    pub fn is_hidden_since(&self, key: &str, since: u64) -> bool {
        self.is_hidden(key) || self.unhidden_since(since).any(|(_, k)| hides(k, key))
    }

    /// Whether a listed key is hidden by a pending delete or move (of it, or of a folder
    /// above it, or of its own folder marker).
    pub fn is_hidden(&self, key: &str) -> bool {
        // Called for every listed key: skip the per-ancestor lookups when nothing is pending.
        if self.hidden.is_empty() {
            return false;
        }
        if self.hidden.contains_key(key) {
            return true;
        }
        let mut k = key;
        while let Some(i) = k.rfind('/') {
            k = &k[..i];
            if self.hidden.contains_key(&format!("{k}/")) {
                return true;
            }
        }
        self.hidden.contains_key(&format!("{key}/"))
    }

    /// Adds a conflict record to `batch` under the next conflict number.
    pub fn record_conflict(&mut self, record: ConflictRecord, batch: &mut Batch) -> FsResult<()> {
        let n = self.next_conflict;
        self.next_conflict += 1;
        batch.set_meta("next_conflict", self.next_conflict);
        batch.conflict(n, &record)?;
        Ok(())
    }
}

/// The wait before the first retry of a failed change, and the most it grows to.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How many keys of completed deletes and moves stay known to listings taken before them.
const UNHIDDEN_KEPT: usize = 4096;

/// Whether the hidden key `hidden` (a key, or `prefix/`) hides the listed `key`.
fn hides(hidden: &str, key: &str) -> bool {
    match hidden.strip_suffix('/') {
        Some(dir) => key == dir || key.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')),
        None => key == hidden,
    }
}

/// What a pending op hides from listings: a deleted key (and the folder of a deleted
/// folder marker), or a moved folder.
pub fn hidden_keys(op: &Op) -> Vec<String> {
    match op {
        Op::Delete { remote } => {
            let mut keys = vec![remote.key.clone()];
            if let Some(dir) = remote.key.strip_suffix(layout::FOLDER_MARKER) {
                keys.push(dir.trim_end_matches('/').to_string());
            }
            keys
        }
        Op::FolderMoved { from } => vec![format!("{from}/")],
        Op::Sync { .. } => vec![],
    }
}

/// What an op touches in the bucket: keys, each standing for the object at it and for
/// everything below it (a folder). The rule of which change may run beside which:
/// two changes whose footprints [overlap](Footprint::overlaps), at one key or at keys above
/// or below each other (a folder and what is in it, a rename and its source), keep their
/// journal order; changes that do not overlap may run at once, in any order. The uploader
/// starts what [`Queue::startable`] gives it, up to `--transfers` at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Footprint(Vec<String>);

impl Footprint {
    /// The footprint of an op. For a `Sync`, `keys` are the inode's keys: where it lives
    /// now, where its object is (before a move lands), and the object it replaces.
    pub fn of(op: &Op, sync_keys: impl FnOnce(Ino) -> Vec<String>) -> Footprint {
        let keys = match op {
            Op::Sync { ino } => sync_keys(*ino),
            // A folder marker stands for its folder: a folder deleted, then made again.
            Op::Delete { remote } => match remote.key.strip_suffix(layout::FOLDER_MARKER) {
                Some(dir) => vec![dir.trim_end_matches('/').to_string()],
                None => vec![remote.key.clone()],
            },
            Op::FolderMoved { from } => vec![from.clone()],
        };
        let mut keys: Vec<String> = keys.into_iter().map(|k| k.trim_end_matches('/').to_string()).collect();
        keys.sort();
        keys.dedup();
        Footprint(keys)
    }

    /// Whether the two changes must keep their order: a key of one is a key of the other,
    /// or above or below it (the definition [`Blocked`] implements for many at once).
    #[cfg(test)]
    pub fn overlaps(&self, other: &Footprint) -> bool {
        self.0.iter().any(|a| other.0.iter().any(|b| a == b || below(a, b) || below(b, a)))
    }
}

/// Whether `key` is below the folder key `dir` (everything is below the bucket root, "").
#[cfg(test)]
fn below(key: &str, dir: &str) -> bool {
    dir.is_empty() || key.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// The keys of the changes a scan has passed without starting them (or that run): a
/// later change that overlaps one waits. Lookups walk a key's folders and the range of
/// keys below it, so a scan of n changes costs n·depth·log n, not n².
#[derive(Default)]
struct Blocked(BTreeSet<String>);

impl Blocked {
    fn add(&mut self, f: &Footprint) {
        self.0.extend(f.0.iter().cloned());
    }

    fn overlaps(&self, f: &Footprint) -> bool {
        f.0.iter().any(|k| {
            if self.0.contains(k.as_str()) || self.0.contains("") {
                return true;
            }
            if k.is_empty() {
                return !self.0.is_empty();
            }
            let mut up = k.as_str();
            while let Some(i) = up.rfind('/') {
                up = &up[..i];
                if self.0.contains(up) {
                    return true;
                }
            }
            // Keys below k: from "k/" up to (not including) "k0" ('0' follows '/').
            let from = format!("{k}/");
            let to = format!("{k}0");
            self.0.range::<str, _>((Bound::Included(from.as_str()), Bound::Excluded(to.as_str()))).next().is_some()
        })
    }
}

/// How far past the oldest queued change a scan looks for one that may start.
const SCAN_WINDOW: usize = 4096;

/// What [`Queue::startable`] found.
pub struct Startable {
    /// Changes that may start now, oldest first, with their footprints.
    pub start: Vec<(Seq, Op, Footprint)>,
    /// When a change passed over because it was not ready (the upload delay, a backoff)
    /// becomes ready.
    pub next_ready: Option<Instant>,
}

impl Queue {
    /// The changes that may start now, oldest first, at most `slots` of them: each is
    /// ready (past its upload delay, unless `urgent`, and its backoff), not running, and
    /// its footprint overlaps neither a running change's nor that of any change queued
    /// before it (which must go first).
    pub fn startable(
        &self,
        slots: usize,
        now: Instant,
        urgent: bool,
        footprint: impl Fn(&Op) -> Footprint,
    ) -> Startable {
        let mut blocked = Blocked::default();
        for r in self.running.values() {
            blocked.add(&r.footprint);
        }
        let mut out = Startable { start: Vec::new(), next_ready: None };
        for (seq, q) in self.ops.iter().take(SCAN_WINDOW) {
            if out.start.len() >= slots {
                break;
            }
            let mine = footprint(&q.op);
            let not_before = [(!urgent).then_some(q.ready_at), q.retry_at].into_iter().flatten().max();
            let waiting = not_before.filter(|&t| t > now);
            if self.running.contains_key(seq) || waiting.is_some() || blocked.overlaps(&mine) {
                if let Some(t) = waiting {
                    out.next_ready = Some(out.next_ready.map_or(t, |n| n.min(t)));
                }
                blocked.add(&mine);
                continue;
            }
            blocked.add(&mine);
            out.start.push((*seq, q.op.clone(), mine));
        }
        out
    }

    /// The definition [`startable`](Self::startable) implements, one change at a time.
    #[cfg(test)]
    pub fn may_start(&self, seq: Seq, running: &[Seq], footprint: impl Fn(&Op) -> Footprint) -> bool {
        let Some(q) = self.ops.get(&seq) else { return false };
        let mine = footprint(&q.op);
        let earlier = self.ops.range(..seq).map(|(s, _)| *s);
        !earlier
            .chain(running.iter().copied())
            .filter(|&s| s != seq)
            .any(|s| self.ops.get(&s).is_some_and(|other| footprint(&other.op).overlaps(&mine)))
    }
}

/// The journal: the queue behind its lock, and the database it is durable in.
pub struct Journal {
    db: StateDb,
    queue: Mutex<Queue>,
    /// Wakes the uploader: new work, or a flush request.
    pub wake: Notify,
    /// Number of pending ops, for flush waiters.
    pending: watch::Sender<usize>,
    /// Why the journal stopped taking writes (a database write failed), if it did.
    read_only: Mutex<Option<String>>,
}

impl Journal {
    pub fn new(db: StateDb, queue: Queue) -> Journal {
        let (pending, _) = watch::channel(queue.len());
        Journal { db, queue: Mutex::new(queue), wake: Notify::new(), pending, read_only: Mutex::new(None) }
    }

    /// The queue's lock. Taken after the tree's when both are needed, never before it.
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        super::lock(&self.queue)
    }

    pub fn db(&self) -> &StateDb {
        &self.db
    }

    /// Why writes are refused, once the journal could not be written.
    pub fn read_only(&self) -> Option<String> {
        super::lock(&self.read_only).clone()
    }

    /// Ops not yet in the bucket, as flush waiters see them.
    pub fn pending(&self) -> watch::Receiver<usize> {
        self.pending.subscribe()
    }

    /// Writes `batch` to the database (fsynced when `durable`), under the lock of `queue`,
    /// so that records land in the order the queue changed; wakes the uploader. A write that
    /// fails makes the mount read-only: returns the reason then, for the caller to report.
    pub fn commit(&self, queue: &Queue, batch: Batch, durable: bool) -> Result<(), Committed> {
        if let Some(why) = self.read_only() {
            return Err(Committed::Refused(FsError::ReadOnly(why)));
        }
        let written = || -> Result<(), StateError> {
            fail::fail_point!("journal-write-error", |_| Err(StateError::Db(redb::Error::Io(
                std::io::Error::from_raw_os_error(libc::EIO)
            ))));
            self.db.commit(&batch, durable)
        };
        if (!batch.is_empty() || durable)
            && let Err(e) = written()
        {
            // A journal that cannot be written must not pretend: stop taking writes.
            let why = format!("journal write failed: {e}");
            tracing::error!("{why}; the mount is now read-only");
            *super::lock(&self.read_only) = Some(why.clone());
            return Err(Committed::WentReadOnly(e.into(), why));
        }
        self.pending.send_replace(queue.len());
        self.wake.notify_one();
        Ok(())
    }
}

/// Why a commit did not happen.
pub enum Committed {
    /// The journal was read-only already.
    Refused(FsError),
    /// This write failed, and the journal went read-only (the reason).
    WentReadOnly(FsError, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::types::Remote;

    fn delete(key: &str) -> Op {
        Op::Delete { remote: Remote { key: key.into(), etag: None, version: None, size: 0, modified: None } }
    }

    #[test]
    fn ops_queue_in_order_and_hide_what_they_remove() {
        let mut q = Queue::new(1, 1);
        let mut batch = Batch::default();
        let a = q.push(Op::Sync { ino: Ino(5) }, Duration::ZERO, &mut batch).unwrap();
        let b = q.push(delete("d/.autosync-folder"), Duration::ZERO, &mut batch).unwrap();
        let c = q.push(Op::FolderMoved { from: "old".into() }, Duration::ZERO, &mut batch).unwrap();
        assert_eq!((a, b, c), (Seq(1), Seq(2), Seq(3)));
        assert_eq!(batch.meta.last(), Some(&("next_seq", 4)));
        assert_eq!(q.head().map(|h| h.0), Some(a));
        assert_eq!(q.sync_of(Ino(5)), Some(a));
        // The marker's delete hides its folder; a moved folder hides everything below it.
        assert!(q.is_hidden("d/.autosync-folder") && q.is_hidden("d"));
        assert!(q.is_hidden("old/x/y") && q.is_hidden("old"));
        assert!(!q.is_hidden("older") && !q.is_hidden("dd"));
        let listed = q.epoch;
        q.complete(b, &mut batch);
        assert!(!q.is_hidden("d"));
        assert!(q.is_hidden_since("d", listed), "a listing taken before the delete may show it");
        assert!(!q.is_hidden_since("d", q.epoch), "one taken after it does not");
        q.take_sync(a, Ino(5));
        assert_eq!(q.sync_of(Ino(5)), None, "changes from now on queue a fresh op");
        q.start(a, Footprint::default());
        assert!(q.any_running());
        assert_eq!(q.attempt_failed(a, &Op::Sync { ino: Ino(5) }, "a: refused".into()), 1);
        assert_eq!(q.sync_of(Ino(5)), Some(a), "a failed attempt takes in later changes");
        assert!(!q.any_running());
        let failing: Vec<_> = q.failing().map(|(s, f)| (s, f.last_error.clone(), f.tries)).collect();
        assert_eq!(failing, [(a, Some("a: refused".to_string()), 1)]);
    }

    /// Random queues over a few nested keys: the scan starts exactly what the
    /// definition allows, oldest first.
    #[test]
    fn the_scan_starts_what_the_rule_allows() {
        use proptest::prelude::*;
        const KEYS: [&str; 8] = ["a", "a/b", "a/b/c", "a/bc", "ab", "b", "b/a", "c"];
        let op = (0..3u8, 0..KEYS.len(), 0..KEYS.len());
        proptest!(ProptestConfig::with_cases(512), |(ops in proptest::collection::vec(op, 1..24), run in proptest::collection::vec(any::<bool>(), 24))| {
            // Sync of inode i: its keys are KEYS[i] and (a move) KEYS[j].
            let mut keys: HashMap<Ino, Vec<String>> = HashMap::new();
            let mut q = Queue::new(1, 1);
            let mut batch = Batch::default();
            for (n, (kind, i, j)) in ops.iter().enumerate() {
                let op = match kind {
                    0 => {
                        let ino = Ino(100 + n as u64);
                        keys.insert(ino, vec![KEYS[*i].to_string(), KEYS[*j].to_string()]);
                        Op::Sync { ino }
                    }
                    1 => delete(KEYS[*i]),
                    _ => Op::FolderMoved { from: KEYS[*i].to_string() },
                };
                q.push(op, Duration::ZERO, &mut batch).unwrap();
            }
            let fp = |op: &Op| Footprint::of(op, |ino| keys[&ino].clone());
            // Start some of what may start, as the uploader would.
            let mut running = Vec::new();
            for (seq, op, f) in q.startable(usize::MAX, Instant::now(), false, fp).start {
                if run[seq.0 as usize % run.len()] {
                    running.push(seq);
                    q.start(seq, f);
                }
                let _ = op;
            }
            let want: Vec<Seq> = q
                .iter()
                .map(|(s, _)| s)
                .filter(|s| !running.contains(s) && q.may_start(*s, &running, fp))
                .collect();
            let got: Vec<Seq> = q.startable(usize::MAX, Instant::now(), false, fp).start.iter().map(|s| s.0).collect();
            prop_assert_eq!(&got, &want);
            let two: Vec<Seq> = q.startable(2, Instant::now(), false, fp).start.iter().map(|s| s.0).collect();
            prop_assert_eq!(&two[..], &want[..want.len().min(2)], "at most the free slots");
        });
    }

    /// A change not ready yet (its upload delay, a backoff after failures) holds up the
    /// changes that overlap it, and nothing else.
    #[test]
    fn a_change_waiting_holds_up_only_what_overlaps_it() {
        let keys: HashMap<Ino, Vec<String>> = HashMap::from([
            (Ino(2), vec!["docs/a".to_string()]),
            (Ino(3), vec!["docs/a".to_string()]),
            (Ino(4), vec!["other".to_string()]),
        ]);
        let fp = |op: &Op| Footprint::of(op, |ino| keys[&ino].clone());
        let mut q = Queue::new(1, 1);
        let mut batch = Batch::default();
        let failing = q.push(Op::Sync { ino: Ino(2) }, Duration::ZERO, &mut batch).unwrap();
        let same = q.push(Op::Sync { ino: Ino(3) }, Duration::ZERO, &mut batch).unwrap();
        let unrelated = q.push(Op::Sync { ino: Ino(4) }, Duration::ZERO, &mut batch).unwrap();
        let folder = q.push(Op::FolderMoved { from: "docs".into() }, Duration::ZERO, &mut batch).unwrap();
        let starts = |q: &Queue, urgent| -> Vec<Seq> {
            q.startable(16, Instant::now(), urgent, fp).start.iter().map(|s| s.0).collect()
        };
        assert_eq!(starts(&q, false), [failing, unrelated]);
        q.start(failing, fp(&Op::Sync { ino: Ino(2) }));
        assert_eq!(starts(&q, false), [unrelated], "not the running one, nor what overlaps it");
        q.attempt_failed(failing, &Op::Sync { ino: Ino(2) }, "docs/a: refused".into());
        let found = q.startable(16, Instant::now(), false, fp);
        assert_eq!(found.start.iter().map(|s| s.0).collect::<Vec<_>>(), [unrelated], "backing off");
        let retry = found.next_ready.expect("the backoff's end is when to look again");
        assert!(retry > Instant::now() + Duration::from_millis(400), "{retry:?}");
        q.retry_now();
        assert_eq!(starts(&q, false), [failing, unrelated], "a flush cuts the backoff short");
        // The upload delay: not ready, unless a flush asks for everything now.
        let late = q.push(Op::Sync { ino: Ino(4) }, Duration::from_secs(60), &mut batch).unwrap();
        assert!(!starts(&q, false).contains(&late));
        assert_eq!(starts(&q, true), [failing, unrelated], "the earlier change to `other` goes first");
        let _ = (same, folder);
    }

    #[test]
    fn changes_above_or_below_each_other_keep_their_order() {
        let keys: HashMap<Ino, Vec<String>> = HashMap::from([
            (Ino(2), vec!["docs".to_string()]),             // a folder
            (Ino(3), vec!["docs/a.txt".to_string()]),       // a file in it
            (Ino(4), vec!["b.txt".into(), "tmp/b".into()]), // a rename from tmp/b to b.txt
            (Ino(5), vec!["c.txt".to_string()]),
        ]);
        let fp = |op: &Op| Footprint::of(op, |ino| keys[&ino].clone());
        let mut q = Queue::new(1, 1);
        let mut batch = Batch::default();
        let mut push = |op| q.push(op, Duration::ZERO, &mut batch).unwrap();
        let folder = push(Op::Sync { ino: Ino(2) });
        let file = push(Op::Sync { ino: Ino(3) });
        let rename = push(Op::Sync { ino: Ino(4) });
        let other = push(Op::Sync { ino: Ino(5) });
        let old = push(delete("tmp/b"));
        let moved = push(Op::FolderMoved { from: "docs".into() });
        let marker = push(delete("docs/.autosync-folder"));

        assert!(q.may_start(folder, &[], fp), "the oldest starts");
        assert!(!q.may_start(file, &[], fp), "a file waits for its folder");
        assert!(q.may_start(rename, &[folder], fp), "unrelated to the folder");
        assert!(q.may_start(other, &[folder, rename], fp));
        assert!(!q.may_start(old, &[], fp), "the old key's delete waits for the rename");
        assert!(!q.may_start(moved, &[], fp), "a folder move waits for what is in it");
        assert!(!q.may_start(marker, &[], fp), "a marker stands for its folder");
        // Unrelated keys that share a beginning are not above or below each other.
        assert!(!Footprint(vec!["docs".into()]).overlaps(&Footprint(vec!["docs2/a".into()])));
        assert!(Footprint(vec!["".into()]).overlaps(&Footprint(vec!["any/key".into()])));
    }

    #[test]
    fn conflict_numbers_are_recorded() {
        let mut q = Queue::new(9, 4);
        let mut batch = Batch::default();
        let record = ConflictRecord {
            time: 0,
            path: "f".into(),
            policy: "keep-both".into(),
            outcome: String::new(),
            remote: Default::default(),
            local: Default::default(),
        };
        q.record_conflict(record, &mut batch).unwrap();
        assert_eq!(batch.meta, [("next_conflict", 5)]);
        assert_eq!(batch.put_conflicts[0].0, 4);
    }
}
