//! The one stream of events: every change the mount makes or sees, numbered without gaps for
//! the life of the state dir. It owns the numbering (and its file in the state dir), the
//! last events held in memory for listeners that start behind, and the broadcast to the
//! listeners. Emitting never blocks on a listener: one that falls behind is told how many
//! events it missed (a `lagged` event), never silently short.
//!
//! Observers (`autosync events`, and later metrics, the audit trail, the change feed)
//! listen here; they never reach into the core's state. The schema is in docs/FORMAT.md.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events held in memory for `--since`, and the most a listener may fall behind before it
/// is told it lagged.
pub const EVENTS_HELD: usize = 4096;

/// Numbers reserved on disk ahead of use: after a crash of the machine the stream goes on
/// from the reserve, so no number is ever handed out twice.
const RESERVE: u64 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Created,
    /// A handle that wrote was closed (`bytes`: what it wrote since it opened or last closed).
    Written,
    Renamed,
    Deleted,
    AttributesChanged,
    /// A change reached the bucket (`op`: put, move, delete, folder).
    Uploaded,
    UploadFailed,
    Conflict,
    /// A listing, the poll or an open found the bucket changed (`change`: added, changed,
    /// deleted).
    RemoteChanged,
    CacheIntegrity,
    OutOfSpace,
    ReadOnly,
    Mounted,
    Unmounting,
    /// Not part of the stream: this listener missed `missed` events from `seq` on.
    Lagged,
}

/// One event. Fields that do not apply are left out of its JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// RFC 3339, UTC, in milliseconds.
    pub time: String,
    pub kind: Kind,
    /// The path in the mount (without the bucket prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The other path: where a rename came from, or where a conflict put the other version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The file's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The object version (ETag) in the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `written`: bytes written through the handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `uploaded`: put, move, delete or folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// `remote_changed`: added, changed or deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// `conflict`: the policy that decided, and what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// What went wrong, or more about what happened, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `lagged`: how many events this listener missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

impl Event {
    /// An event of `kind` with nothing else set yet (numbered and stamped when emitted).
    pub fn new(kind: Kind) -> Event {
        Event {
            seq: 0,
            time: String::new(),
            kind,
            path: None,
            from: None,
            size: None,
            version: None,
            uid: None,
            pid: None,
            bytes: None,
            op: None,
            change: None,
            policy: None,
            outcome: None,
            message: None,
            missed: None,
        }
    }

    pub fn path(mut self, p: impl Into<String>) -> Event {
        self.path = Some(p.into());
        self
    }
    pub fn from(mut self, p: impl Into<String>) -> Event {
        self.from = Some(p.into());
        self
    }
    pub fn size(mut self, s: u64) -> Event {
        self.size = Some(s);
        self
    }
    pub fn version(mut self, v: Option<String>) -> Event {
        self.version = v;
        self
    }
    pub fn bytes(mut self, b: u64) -> Event {
        self.bytes = Some(b);
        self
    }
    pub fn op(mut self, op: &str) -> Event {
        self.op = Some(op.into());
        self
    }
    pub fn change(mut self, c: &str) -> Event {
        self.change = Some(c.into());
        self
    }
    pub fn message(mut self, m: impl Into<String>) -> Event {
        self.message = Some(m.into());
        self
    }
    pub fn caller(mut self, c: Option<Caller>) -> Event {
        if let Some(c) = c {
            self.uid = Some(c.uid);
            self.pid = Some(c.pid);
        }
        self
    }

    fn lagged(seq: u64, missed: u64) -> Event {
        Event { seq, time: now(), missed: Some(missed), ..Event::new(Kind::Lagged) }
    }
}

/// Who asked, as the kernel told it with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub pid: u32,
}

tokio::task_local! {
    static CALLER: Caller;
}

/// Runs `fut` (one kernel request) with its caller known to the events it causes.
pub async fn as_caller<F: std::future::Future>(caller: Caller, fut: F) -> F::Output {
    CALLER.scope(caller, fut).await
}

/// The caller of the request being served, if this runs inside one.
pub fn caller() -> Option<Caller> {
    CALLER.try_with(|c| *c).ok()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

struct Numbering {
    next: u64,
    /// Numbers below this are reserved on disk.
    reserved: u64,
    /// Where `next` is written at every event (not synced: it survives a crash of the
    /// process, whose writes the kernel keeps).
    next_file: Option<File>,
    held: VecDeque<Arc<Event>>,
}

pub struct Events {
    state: Mutex<Numbering>,
    tx: broadcast::Sender<Arc<Event>>,
    dir: Option<PathBuf>,
    /// Set when the mount started after a crash of the machine: the numbers skipped.
    skipped: Option<(u64, u64)>,
}

/// `events.reserve` holds `RESERVED BOOT` (or `RESERVED clean` after a clean stop, when
/// RESERVED is the exact next number); `events.next` holds the next number, 8 bytes LE.
fn reserve_path(dir: &Path) -> PathBuf {
    dir.join("events.reserve")
}
fn next_path(dir: &Path) -> PathBuf {
    dir.join("events.next")
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn write_reserve(dir: &Path, reserved: u64, tag: &str) -> std::io::Result<()> {
    let tmp = dir.join("events.reserve.tmp");
    std::fs::write(&tmp, format!("{reserved} {tag}\n"))?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, reserve_path(dir))?;
    File::open(dir)?.sync_all()
}

impl Events {
    /// The stream of the state dir `dir`, numbered on from where it stopped (none: numbered
    /// from 1 in memory only).
    pub fn open(dir: Option<&Path>) -> std::io::Result<Events> {
        let (tx, _) = broadcast::channel(EVENTS_HELD);
        let Some(dir) = dir else {
            let state = Numbering { next: 1, reserved: u64::MAX, next_file: None, held: VecDeque::new() };
            return Ok(Events { state: Mutex::new(state), tx, dir: None, skipped: None });
        };
        let saved = std::fs::read_to_string(reserve_path(dir)).ok().and_then(|s| {
            let (n, tag) = s.trim().split_once(' ')?;
            Some((n.parse::<u64>().ok()?, tag.to_string()))
        });
        let next_file = File::options().read(true).write(true).create(true).truncate(false).open(next_path(dir))?;
        let mut buf = [0u8; 8];
        let written = next_file.read_exact_at(&mut buf, 0).ok().map(|_| u64::from_le_bytes(buf));
        let boot = boot_id();
        let (next, skipped) = match saved {
            None => (written.unwrap_or(1).max(1), None),
            Some((n, tag)) if tag == "clean" => (n, None),
            // The process stopped without a clean close, the machine did not: the kernel
            // kept every number written.
            Some((r, tag)) if tag == boot && written.is_some_and(|w| w >= 1 && w <= r) => (written.unwrap_or(r), None),
            // The machine went down: numbers written since the reserve may be lost; go on
            // from the reserve, so none is used twice.
            Some((r, _)) => (r, Some((written.unwrap_or(1), r))),
        };
        let reserved = next + RESERVE;
        write_reserve(dir, reserved, &boot)?;
        next_file.write_all_at(&next.to_le_bytes(), 0)?;
        let state = Numbering { next, reserved, next_file: Some(next_file), held: VecDeque::new() };
        Ok(Events { state: Mutex::new(state), tx, dir: Some(dir.to_path_buf()), skipped })
    }

    /// After a crash of the machine: the numbers from the last one known on disk up to the
    /// reserve, which were skipped (some may have been used before the crash).
    pub fn skipped(&self) -> Option<(u64, u64)> {
        self.skipped
    }

    /// Numbers, stamps and sends an event; returns its number. Never waits for a listener.
    pub fn emit(&self, mut event: Event) -> u64 {
        if event.uid.is_none() {
            event = event.caller(caller());
        }
        let mut st = super::lock(&self.state);
        if st.next >= st.reserved
            && let Some(dir) = &self.dir
        {
            let reserved = st.next + RESERVE;
            match write_reserve(dir, reserved, &boot_id()) {
                Ok(()) => st.reserved = reserved,
                // Go on in memory: a crash of the machine now could repeat numbers.
                Err(e) => tracing::warn!("events: cannot reserve numbers in {}: {e}", dir.display()),
            }
        }
        event.seq = st.next;
        st.next += 1;
        if let Some(f) = &st.next_file {
            let _ = f.write_all_at(&st.next.to_le_bytes(), 0);
        }
        event.time = now();
        let event = Arc::new(event);
        if st.held.len() == EVENTS_HELD {
            st.held.pop_front();
        }
        st.held.push_back(Arc::clone(&event));
        // Sent under the lock, so listeners see the events in their order.
        let _ = self.tx.send(event);
        st.next - 1
    }

    /// The number the next event gets.
    pub fn next_seq(&self) -> u64 {
        super::lock(&self.state).next
    }

    /// A listener: from `since` (what is still held, then what comes), or from the next
    /// event on.
    pub fn subscribe(&self, since: Option<u64>) -> Listener {
        let st = super::lock(&self.state);
        // Subscribed under the lock: the backlog ends where the live events begin.
        let rx = self.tx.subscribe();
        let mut backlog = VecDeque::new();
        let mut last = st.next - 1;
        if let Some(since) = since.filter(|&s| s < st.next) {
            let since = since.max(1);
            let first_held = st.held.front().map_or(st.next, |e| e.seq);
            if since < first_held {
                backlog.push_back(Arc::new(Event::lagged(since, first_held - since)));
            }
            backlog.extend(st.held.iter().filter(|e| e.seq >= since).cloned());
            last = since - 1;
        }
        Listener { rx, backlog, last }
    }

    /// A clean stop: the next number is written exactly, so the next mount goes on from it.
    pub fn close(&self) -> std::io::Result<()> {
        let st = super::lock(&self.state);
        let Some(dir) = &self.dir else { return Ok(()) };
        if let Some(f) = &st.next_file {
            f.write_all_at(&st.next.to_le_bytes(), 0)?;
            f.sync_all()?;
        }
        write_reserve(dir, st.next, "clean")
    }
}

/// One listener of the stream.
pub struct Listener {
    rx: broadcast::Receiver<Arc<Event>>,
    backlog: VecDeque<Arc<Event>>,
    /// The last number this listener was given (or told it missed).
    last: u64,
}

impl Listener {
    /// What is there now, without waiting: the events held and sent so far (a `lagged`
    /// event where some were missed).
    pub fn held(&mut self) -> Vec<Arc<Event>> {
        let mut out: Vec<Arc<Event>> = Vec::new();
        loop {
            if let Some(e) = self.backlog.pop_front() {
                self.last = e.seq + e.missed.map_or(0, |m| m.saturating_sub(1));
                out.push(e);
                continue;
            }
            match self.rx.try_recv() {
                Ok(e) if e.seq <= self.last => continue,
                Ok(e) => {
                    self.last = e.seq;
                    out.push(e);
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    out.push(Arc::new(Event::lagged(self.last + 1, n)));
                    self.last += n;
                }
                Err(_) => return out,
            }
        }
    }

    /// The next event, or a `lagged` event when this listener fell behind; None once the
    /// mount is gone.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                self.last = e.seq + e.missed.map_or(0, |m| m.saturating_sub(1));
                return Some(e);
            }
            match self.rx.recv().await {
                // Already given from the backlog.
                Ok(e) if e.seq <= self.last => continue,
                Ok(e) => {
                    self.last = e.seq;
                    return Some(e);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let e = Event::lagged(self.last + 1, n);
                    self.last += n;
                    return Some(Arc::new(e));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(path: &str) -> Event {
        Event::new(Kind::Created).path(path)
    }

    #[tokio::test]
    async fn numbers_go_on_across_a_clean_stop_and_a_crash_of_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let ev = Events::open(Some(dir.path())).unwrap();
        assert_eq!(ev.emit(created("a")), 1);
        assert_eq!(ev.emit(created("b")), 2);
        ev.close().unwrap();
        drop(ev);
        let ev = Events::open(Some(dir.path())).unwrap();
        assert_eq!(ev.emit(created("c")), 3, "after a clean stop");
        // Dropped without close: a crash of the process (the machine stays up).
        drop(ev);
        let ev = Events::open(Some(dir.path())).unwrap();
        assert_eq!(ev.emit(created("d")), 4, "after a crash of the process");
        assert_eq!(ev.skipped(), None);
        drop(ev);
        // A crash of the machine (another boot): on from the reserve, never a number twice.
        std::fs::write(reserve_path(dir.path()), format!("{} other-boot\n", 5 + RESERVE)).unwrap();
        let ev = Events::open(Some(dir.path())).unwrap();
        assert_eq!(ev.emit(created("e")), 5 + RESERVE);
        assert_eq!(ev.skipped(), Some((5, 5 + RESERVE)));
    }

    #[tokio::test]
    async fn a_listener_replays_what_is_held_then_follows() {
        let ev = Events::open(None).unwrap();
        for i in 0..5 {
            ev.emit(created(&format!("f{i}")));
        }
        let mut l = ev.subscribe(Some(3));
        ev.emit(created("f5"));
        let mut seqs = Vec::new();
        for _ in 0..4 {
            seqs.push(l.next().await.unwrap().seq);
        }
        assert_eq!(seqs, [3, 4, 5, 6], "held ones, then the live one, none twice");
        let mut fresh = ev.subscribe(None);
        ev.emit(created("f6"));
        assert_eq!(fresh.next().await.unwrap().seq, 7, "without --since: from the next event");
        let now: Vec<u64> = ev.subscribe(Some(5)).held().iter().map(|e| e.seq).collect();
        assert_eq!(now, [5, 6, 7], "what is there now, without waiting");
    }

    #[tokio::test]
    async fn a_listener_that_falls_behind_is_told_how_many_it_missed() {
        let ev = Events::open(None).unwrap();
        let mut l = ev.subscribe(None);
        let n = EVENTS_HELD as u64 + 100;
        for i in 0..n {
            ev.emit(created(&format!("f{i}")));
        }
        let first = l.next().await.unwrap();
        assert_eq!((first.kind, first.seq, first.missed), (Kind::Lagged, 1, Some(100)));
        let next = l.next().await.unwrap();
        assert_eq!(next.seq, 101, "on from the first event still held");
        // --since before what is held: told the count, then given the rest.
        let mut late = ev.subscribe(Some(50));
        let e = late.next().await.unwrap();
        assert_eq!((e.kind, e.seq, e.missed), (Kind::Lagged, 50, Some(101 - 50)));
        assert_eq!(late.next().await.unwrap().seq, 101);
    }

    #[test]
    fn events_serialize_without_the_fields_that_do_not_apply() {
        let e = Event { seq: 3, time: "t".into(), ..Event::new(Kind::Renamed).path("b").from("a") };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"seq":3,"time":"t","kind":"renamed","path":"b","from":"a"}"#
        );
    }
}
