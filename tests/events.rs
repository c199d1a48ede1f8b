//! The event stream on a real mount: `autosync events --json` shows what a shell script did
//! in the mounted folder, in order, with the uploads, numbered without gaps (every backend);
//! a listener that reads nothing while 10,000 files are created is told how many events it
//! missed, and the numbers it sees and misses add up to every event (local folder).

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::fixture::Fixture;
use common::servers::Backend;
use common::{BIN, Mount, Tier, run_ok, wait_for};
use serde_json::Value;

static TIER: Tier = Tier::real_mount("autosync-events-");

/// `autosync events --json --since SEQ` in the background; its lines arrive on a channel.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Follower {
    fn start(m: &Mount, since: u64) -> Follower {
        let mut child = m
            .cli("events")
            .args(["--json", "--since", &since.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start autosync events");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// Events until (and with) the first one `last` accepts.
    fn until(&self, what: &str, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut got = Vec::new();
        wait_for(what, Duration::from_secs(60), || {
            while let Ok(v) = self.lines.try_recv() {
                let done = last(&v);
                got.push(v);
                if done {
                    return Some(());
                }
            }
            None
        });
        got
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number the next event of the mount gets, from `status --json`.
fn next_event(m: &Mount) -> u64 {
    let st: Value = serde_json::from_str(&run_ok(m.cli("status").arg("--json")).stdout).expect("status JSON");
    st["next_event"].as_u64().unwrap_or_else(|| panic!("no next_event in {st}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn events_show_a_script_and_its_uploads_in_order(backend: Backend) {
    let fx = Fixture::new(&TIER, "script", backend);
    // Uploads only when flushed: the order of every event is the script's.
    let m = fx.mount_with(&fx.state, &fx.cache, "3600");
    let first = next_event(&m);
    let follower = Follower::start(&m, first);
    let script = format!(
        "cd '{mnt}' && printf hello > a.txt && mv a.txt b.txt && mkdir docs && '{BIN}' flush . --state-dir '{state}' \
         && rm b.txt && '{BIN}' flush . --state-dir '{state}' && mkdir end",
        mnt = fx.dir.mnt.display(),
        state = fx.state.display()
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", &script]);
    for k in TIER.cli_env_remove {
        sh.env_remove(k);
    }
    let out = run_ok(&mut sh);
    let events = follower.until("the script's events", |v| s(v, "kind") == "created" && s(v, "path") == "end");

    let seqs: Vec<u64> = events.iter().map(|v| v["seq"].as_u64().expect("seq")).collect();
    let want_seqs: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(seqs, want_seqs, "numbered without gaps from {first}: {events:#?}");
    // (kind, path, and where a rename came from or what an upload did)
    let mut seen: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|v| (s(v, "kind"), s(v, "path"), if s(v, "kind") == "renamed" { s(v, "from") } else { s(v, "op") }))
        .collect();
    // The two uploads of the first flush are unrelated paths: they run at once and may
    // end in either order.
    if seen.len() > 6 {
        seen[4..6].sort();
    }
    assert_eq!(
        seen,
        [
            ("created", "a.txt", ""),
            ("written", "a.txt", ""),
            ("renamed", "b.txt", "a.txt"),
            ("created", "docs", ""),
            ("uploaded", "b.txt", "put"),
            ("uploaded", "docs", "folder"),
            ("deleted", "b.txt", ""),
            ("uploaded", "b.txt", "delete"),
            ("created", "end", ""),
        ],
        "{events:#?}\nscript: {out}"
    );
    let written = &events[1];
    assert_eq!((written["bytes"].as_u64(), written["size"].as_u64()), (Some(5), Some(5)), "{written}");
    let put = events.iter().find(|v| s(v, "kind") == "uploaded" && s(v, "op") == "put").expect("the put");
    assert_eq!(put["size"].as_u64(), Some(5));
    assert!(put["version"].is_string(), "an upload names the object version: {put}");
    for e in &events {
        let by_caller = !matches!(s(e, "kind"), "uploaded");
        // The script runs as root; the kernel names the process of each request.
        assert_eq!(e["uid"].as_u64().is_some(), by_caller, "{e}");
        assert_eq!(e["pid"].as_u64().is_some_and(|p| p > 0), by_caller, "{e}");
        if by_caller {
            assert_eq!(e["uid"].as_u64(), Some(0), "{e}");
        }
        assert!(s(e, "time").ends_with('Z'), "{e}");
    }

    // --since replays what the mount still holds, then follows.
    let replay = Follower::start(&m, first);
    let again = replay.until("the replay", |v| v["seq"].as_u64() == Some(first + events.len() as u64 - 1));
    assert_eq!(again, events, "the same events again");
    drop(replay);

    // After a restart the numbering goes on; what the last run held is told as missed.
    let end = first + events.len() as u64 - 1;
    drop(follower);
    m.flush(); // `end` goes up (end + 1); the unmount is end + 2
    m.unmount();
    let m = fx.mount_with(&fx.state, &fx.cache, "3600");
    let replay = Follower::start(&m, first);
    let after = replay.until("the events after the restart", |v| s(v, "kind") == "mounted");
    let summary: Vec<(&str, u64, u64)> = after
        .iter()
        .map(|v| (s(v, "kind"), v["seq"].as_u64().unwrap_or(0), v["missed"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(summary, [("lagged", first, end + 3 - first), ("mounted", end + 3, 0)], "{after:#?}");
}

against_every_backend!(events_show_a_script_and_its_uploads_in_order);

/// How many files the stalled listener misses events of.
const FILES: usize = 10_000;

#[test]
fn a_listener_that_reads_nothing_is_told_how_many_events_it_missed() {
    let fx = Fixture::new(&TIER, "lagged", Backend::Local);
    let m = fx.mount_with(&fx.state, &fx.cache, "0.2");
    let first = next_event(&m);
    // A listener on the control socket that reads nothing until the files are made.
    let mut sock = UnixStream::connect(fx.state.join("control.sock")).expect("connect to the control socket");
    writeln!(sock, r#"{{"cmd":"events","since":{first}}}"#).expect("ask for events");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let dir = fx.dir.mnt.join(format!("w{w}"));
            std::fs::create_dir(&dir).expect("mkdir");
            std::thread::spawn(move || {
                for i in 0..FILES / 4 {
                    std::fs::write(dir.join(format!("f{i}")), format!("file {i}\n")).expect("write a file");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    m.flush();
    std::fs::create_dir(fx.dir.mnt.join("end")).expect("mkdir end");

    // Now read: every number from `first` on is either given or counted as missed.
    let mut next = first;
    let (mut lagged, mut missed, mut given) = (0u64, 0u64, 0u64);
    let mut created = 0;
    sock.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    for line in BufReader::new(sock).lines() {
        let line = line.expect("an event line");
        let e: Value = serde_json::from_str(&line).expect("JSON");
        let seq = e["seq"].as_u64().expect("seq");
        assert_eq!(seq, next, "no number skipped or repeated: {e}");
        if s(&e, "kind") == "lagged" {
            let n = e["missed"].as_u64().expect("missed count");
            assert!(n > 0, "{e}");
            lagged += 1;
            missed += n;
            next += n;
            continue;
        }
        given += 1;
        next += 1;
        created += usize::from(s(&e, "kind") == "created");
        if s(&e, "kind") == "created" && s(&e, "path") == "end" {
            break;
        }
    }
    assert!(lagged >= 1, "a listener that read nothing was never told it lagged");
    // Each file is created, written and uploaded: three events each, at least.
    assert!(missed + given >= 3 * FILES as u64, "missed {missed} + given {given}");
    assert_eq!(given + missed, next - first, "the counts add up to every event");
    assert!(created < FILES, "it missed some of the creates ({created} seen)");
    m.flush();
    let status: Value = serde_json::from_str(&run_ok(m.cli("status").arg("--json")).stdout).expect("status");
    assert_eq!(status["pending_ops"].as_u64(), Some(0), "the writes went through: {status}");
    let bucket = fx.dir.root.join("server").join("bkt");
    let files = (0..4).map(|w| std::fs::read_dir(bucket.join(format!("w{w}"))).map_or(0, |d| d.count())).sum::<usize>();
    assert!(files >= FILES, "{files} files in the bucket");
}
