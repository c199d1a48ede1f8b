//! The outage harness: a real mount while its bucket is unreachable. Writes keep working and
//! are acknowledged from the journal, cached data still reads, data that is not cached fails
//! with `EIO` within a bounded time, `status` shows the backlog, and once the bucket is back
//! every acknowledged write reaches it, exactly once; a SIGTERM during an outage leaves the
//! rest in the journal for the next mount.
//!
//! A single-node Garage with its data on disk is the bucket. Before the mount, a "cold" file
//! is put there by a second client (its name is looked up through the mount, its data is
//! never read), and a "warm" one, read through the mount so that its blocks are cached. The
//! mount (`--io-timeout 3`) takes a few files, and `autosync flush` puts them in the bucket.
//! Then Garage is SIGKILLed for `AUTOSYNC_OUTAGE_SECS` seconds (default 20). Meanwhile a
//! writer thread creates and rewrites files with `fsync` (paced, self-describing content),
//! recording each acknowledged version in a manifest (in memory and in `manifest.txt`
//! outside the mount); every write and `fsync` must succeed, each within 12 × io-timeout.
//! The test checks the warm and the pre-outage files read back, the cold one fails with
//! `EIO` in less than 3 × io-timeout + 5 s, and `status --json` shows pending changes and a
//! last error. `AUTOSYNC_OUTAGE_MODE=hang` makes the outage a hung server instead of a dead
//! one: a listener on Garage's port accepts connections and never answers, so every request
//! waits for the client's timeouts rather than failing at once.
//!
//! Garage starts again on the same ports with the same data; `autosync flush` must exit 0.
//! Then every manifest entry is in the bucket at its path with its exact content, the
//! bucket holds nothing else but what the test put there, no conflict copy was made, and
//! `status` shows nothing pending and no error. Last, Garage stops again, one more file is
//! written, and the daemon gets SIGTERM (`--shutdown-grace 2`): it must exit within 15 s,
//! unmounted, logging how many changes and bytes stay in the journal; with Garage back, a
//! new mount of the same state dir uploads that file.
//!
//! The summary line (`outage harness ...`: outage seconds, acknowledged fsyncs and bytes
//! during it, the slowest write, how long the cold read took to fail, how long the drain
//! took) is printed to stdout: run with `-- --nocapture`, or `benches/outage.sh`, the
//! full-size run (300 s). The CI size takes about 35 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::servers::{Backend, Other, Server};
use common::{
    Mount, Out, Rng, TestDir, Tier, alive, env_u64, mounted, read, run_ok, tail, try_run, wait_for, write_file,
};

/// A short grace, so that the SIGTERM step ends quickly; a long flush timeout, so that the
/// backlog of a full-size outage drains.
static TIER: Tier = Tier { shutdown_grace: "2", flush_timeout: "900", ..Tier::real_mount("autosync-outage-") };

const IO_TIMEOUT: Duration = Duration::from_secs(3);
const UPLOAD_DELAY: &str = "0.2";
const METADATA_TTL: &str = "1";
/// The writer's pace during the outage: one file every this often (plus the write itself).
const PACE: Duration = Duration::from_millis(40);
/// New paths the writer makes before it only rewrites (bounds the staged bytes of a long
/// outage).
const MAX_PATHS: usize = 300;
const FOLDERS: u64 = 4;
/// The folder marker autosync puts in the bucket for an empty folder (`layout.rs`).
const FOLDER_MARKER: &str = ".autosync-folder";
/// How long one write (mkdir -p, open, write, fsync) may take during the outage. No step
/// needs the bucket, but each name on the path is checked there first once its listing is
/// older than the metadata TTL (1 s, shorter than one check), and each check gives up after
/// `--io-timeout`: for a new file two folders down, up to eight checks (`mkdir -p` looks the
/// folders up twice, `open` once, then the new name, then `create`). A bound, never a hang.
const WRITE_LIMIT: Duration = Duration::from_secs(12 * IO_TIMEOUT.as_secs());
/// How long the first failed upload may take to show in `status`.
const UPLOAD_FAILS_WITHIN: Duration = Duration::from_secs(60);
/// How long the daemon may take to exit after SIGTERM, beyond nothing: grace (2 s) + margin.
const SIGTERM_EXIT: Duration = Duration::from_secs(15);

/// One version of a file: `outage1 PATH SEQ LEN\n` then LEN pseudo-random bytes.
fn version(path: &str, seq: u64, rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(100) {
        0..60 => rng.below(8 * 1024),
        60..95 => 8 * 1024 + rng.below(120 * 1024),
        _ => 128 * 1024 + rng.below(384 * 1024),
    } as usize;
    let mut v = format!("outage1 {path} {seq} {len}\n").into_bytes();
    v.extend_from_slice(&rng.bytes(len));
    v
}

/// The header line of a version, to name what was found in a failure message.
fn header(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len()).min(120);
    String::from_utf8_lossy(&data[..end]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The writer and its manifest
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Ledger {
    /// Each path's last acknowledged version: (seq, length, blake3).
    acked: BTreeMap<String, (u64, u64, blake3::Hash)>,
    seq: u64,
    fsyncs: u64,
    bytes: u64,
    slowest: Duration,
    /// The slowest step of any write: (mkdir -p, open, write, fsync).
    phases: [Duration; 4],
    /// Failed writes (must stay empty: the mount was alive all along).
    errors: Vec<String>,
}

struct Writer {
    mnt: PathBuf,
    manifest: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// Until `stop`: a new path in one of the outage's folders (up to MAX_PATHS), or a
    /// rewrite (O_TRUNC) of an acknowledged one, each fsynced; paced by PACE.
    fn run(&self, seed: u64) {
        let mut rng = Rng(seed);
        while !self.stop.load(Ordering::SeqCst) {
            let (path, seq) = {
                let mut l = self.ledger.lock().unwrap();
                l.seq += 1;
                let path = if l.acked.len() < MAX_PATHS && (l.acked.is_empty() || rng.below(100) < 70) {
                    format!("out/d{}/f{:05}", rng.below(FOLDERS), l.seq)
                } else {
                    let i = rng.below(l.acked.len() as u64) as usize;
                    l.acked.keys().nth(i).cloned().unwrap_or_default()
                };
                (path, l.seq)
            };
            let data = version(&path, seq, &mut rng);
            let t = Instant::now();
            let mut phases = [Duration::ZERO; 4];
            let r = self.write(&path, &data, &mut phases);
            let took = t.elapsed();
            let mut l = self.ledger.lock().unwrap();
            for (slowest, p) in l.phases.iter_mut().zip(phases) {
                *slowest = (*slowest).max(p);
            }
            match r {
                Ok(()) => {
                    let hash = blake3::hash(&data);
                    let mut m = OpenOptions::new().create(true).append(true).open(&self.manifest).unwrap();
                    writeln!(m, "{path} {seq} {} {hash}", data.len()).unwrap();
                    l.acked.insert(path, (seq, data.len() as u64, hash));
                    l.fsyncs += 1;
                    l.bytes += data.len() as u64;
                    l.slowest = l.slowest.max(took);
                }
                Err(e) => l.errors.push(format!("{path} (seq {seq}) after {took:?}: {e}")),
            }
            drop(l);
            std::thread::sleep(PACE);
        }
    }

    /// Create (or truncate), write, fsync: `Ok` is the acknowledgement.
    /// `phases` gets how long each step took.
    fn write(&self, path: &str, data: &[u8], phases: &mut [Duration; 4]) -> std::io::Result<()> {
        let p = self.mnt.join(path);
        let t = Instant::now();
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        phases[0] = t.elapsed();
        let t = Instant::now();
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&p)?;
        phases[1] = t.elapsed();
        let t = Instant::now();
        f.write_all(data)?;
        phases[2] = t.elapsed();
        let t = Instant::now();
        let r = f.sync_all();
        phases[3] = t.elapsed();
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn status_json(m: &Mount) -> serde_json::Value {
    let out = run_ok(m.cli("status").arg("--json"));
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

/// `autosync flush` with the tier's timeout (the command's own deadline is a minute more);
/// returns its output and how long it took.
fn flush(m: &Mount) -> (Out, Duration) {
    let secs: u64 = TIER.flush_timeout.parse().unwrap();
    let t = Instant::now();
    let out = try_run(m.cli("flush").args(["--timeout", TIER.flush_timeout]), Duration::from_secs(secs + 60), None)
        .unwrap_or_else(|e| panic!("{e}"));
    (out, t.elapsed())
}

/// Drops the kernel's cached pages of `p`, so that the next read reaches the daemon.
fn drop_page_cache(p: &Path) {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    // SAFETY: posix_fadvise on a file descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) of {}: errno {r}", p.display());
}

/// Every key of the bucket but folder markers; fails on any conflict copy.
fn bucket_keys(bucket: &Other, when: &str) -> BTreeSet<String> {
    let keys: BTreeSet<String> = bucket.keys().into_iter().filter(|k| !k.ends_with(FOLDER_MARKER)).collect();
    let conflicts: Vec<&String> = keys.iter().filter(|k| k.contains(".conflict-")).collect();
    assert!(conflicts.is_empty(), "{when}: conflict copies in the bucket (one writer): {conflicts:?}");
    keys
}

/// How the bucket goes away.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Garage is killed: connections are refused at once.
    Down,
    /// Garage is killed and a listener on its port accepts connections and never answers, as
    /// a hung server (or a proxy in front of a dead one) does: every request waits for the
    /// client's timeouts.
    Hang,
}

fn mode() -> Mode {
    match std::env::var("AUTOSYNC_OUTAGE_MODE").as_deref() {
        Err(_) | Ok("down") => Mode::Down,
        Ok("hang") => Mode::Hang,
        Ok(other) => panic!("AUTOSYNC_OUTAGE_MODE={other:?}: one of down, hang"),
    }
}

/// A listener that accepts connections on a loopback port and never answers; dropping it
/// closes them and frees the port.
struct Tarpit {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tarpit {
    fn start(port: u16) -> Tarpit {
        // The dead server's side of its connections may hold the port for a moment.
        let l = wait_for("the dead server's port to be free", Duration::from_secs(30), || {
            std::net::TcpListener::bind(("127.0.0.1", port)).ok()
        });
        l.set_nonblocking(true).expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Tarpit { stop, thread: Some(thread) }
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends SIGTERM to `pid`.
fn sigterm(pid: u32) {
    // SAFETY: plain kill(2) on a pid this test started.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0, "kill(SIGTERM) of the daemon {pid}");
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// The bucket goes away for `AUTOSYNC_OUTAGE_SECS` (default 20) and comes back.
#[test]
fn bucket_outage_loses_nothing_and_fails_cold_reads_fast() {
    let outage_secs = env_u64("AUTOSYNC_OUTAGE_SECS", 20);
    let mode = mode();
    let started = Instant::now();
    let mut rng = Rng(0x07A6_E5EE_D000_0001);

    let dir = TestDir::new(&TIER, "garage");
    let mut server = Server::start(Backend::Garage, &dir.root, "garage");
    server.create_bucket("bkt");
    let bucket = server.client("bkt");
    let cold = rng.bytes(300_000);
    let warm = rng.bytes(700_000);
    bucket.put("seed/cold.bin", &cold);
    bucket.put("seed/warm.bin", &warm);

    let source = server.source("bkt", "");
    let (state, cache) = (dir.root.join("state"), dir.root.join("cache"));
    let mut opts = server.mount_opts();
    opts.extend(["--io-timeout".into(), IO_TIMEOUT.as_secs().to_string()]);
    let mount = |server: &Server| {
        server.mount_with_opts(
            &dir,
            &source,
            (&state, &cache),
            (UPLOAD_DELAY, METADATA_TTL),
            server.creds(),
            opts.clone(),
        )
    };
    let m = mount(&server);

    // Before the outage: a few files through the mount, the warm file read (cached), the
    // cold one only looked up.
    let mut before = BTreeMap::new();
    for i in 0..5 {
        let path = format!("pre/p{i}");
        let data = version(&path, 0, &mut rng);
        write_file(&dir.m(&path), &data);
        before.insert(path, data);
    }
    assert!(read(&dir.m("seed/warm.bin")) == warm, "seed/warm.bin reads wrong before the outage");
    let cold_len = fs::metadata(dir.m("seed/cold.bin")).expect("stat seed/cold.bin").len();
    assert_eq!(cold_len, cold.len() as u64, "seed/cold.bin's size");
    let (out, _) = flush(&m);
    assert!(out.ok(), "flush before the outage: {out}");
    for (path, data) in &before {
        assert!(bucket.data(path) == *data, "{path} is not in the bucket after the first flush");
    }
    let fetched_before = status_json(&m)["cache"]["fetched_blocks"].as_u64().expect("cache.fetched_blocks");

    // The outage.
    let Server::Garage(garage) = &mut server else { unreachable!("a Garage backend") };
    garage.nodes()[0].kill();
    let port = garage.s3_port;
    let tarpit = (mode == Mode::Hang).then(|| Tarpit::start(port));
    let outage_start = Instant::now();
    let outage_end = outage_start + Duration::from_secs(outage_secs);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        mnt: dir.mnt.clone(),
        manifest: dir.root.join("manifest.txt"),
        ledger: ledger.clone(),
        stop: stop.clone(),
    };
    let wseed = rng.next();
    let handle = std::thread::spawn(move || writer.run(wseed));

    // Cached data reads back: the warm file (its kernel pages dropped, so the daemon answers
    // from its block cache) and the files written before.
    let t = Instant::now();
    drop_page_cache(&dir.m("seed/warm.bin"));
    assert!(read(&dir.m("seed/warm.bin")) == warm, "seed/warm.bin reads wrong during the outage");
    let warm_read = t.elapsed();
    for (path, data) in &before {
        assert!(read(&dir.m(path)) == *data, "{path} reads wrong during the outage");
    }
    // Data never read fails with EIO, in bounded time.
    let t = Instant::now();
    let err = fs::read(dir.m("seed/cold.bin")).map(|_| ()).expect_err("reading seed/cold.bin with the bucket down");
    let cold_fail = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "reading seed/cold.bin during the outage: {err}");
    let cold_limit = IO_TIMEOUT * 3 + Duration::from_secs(5);
    assert!(cold_fail < cold_limit, "the failed cold read took {cold_fail:?} (limit {cold_limit:?})");
    // `status` shows the backlog and why it waits. (Against a hung server the first upload
    // fails only after the store's retry timeout, 20 s: the outage lasts at least this long.)
    let (pending_during, error_during) =
        wait_for("pending changes and a last error in `status`", UPLOAD_FAILS_WITHIN, || {
            let st = status_json(&m);
            let pending = st["pending_ops"].as_u64().unwrap_or(0);
            let err = st["last_error"].as_str().map(String::from);
            (pending > 0).then_some(()).and(err).map(|e| (pending, e))
        });
    let st = status_json(&m);
    assert_eq!(
        st["cache"]["fetched_blocks"].as_u64(),
        Some(fetched_before),
        "blocks fetched from a bucket that is down: {st}"
    );

    // The rest of the outage is the writer's: a deliberate wall-clock wait.
    std::thread::sleep(outage_end.saturating_duration_since(Instant::now()));
    let st_end = status_json(&m);
    stop.store(true, Ordering::SeqCst);
    handle.join().expect("the writer thread panicked");
    let outage_len = outage_start.elapsed();
    {
        let l = ledger.lock().unwrap();
        assert!(l.errors.is_empty(), "writes failed during the outage:\n{}", l.errors.join("\n"));
        assert!(l.fsyncs > 0, "no write was acknowledged during the outage");
        assert!(
            l.slowest < WRITE_LIMIT,
            "a write took {:?} during the outage (limit {WRITE_LIMIT:?}; slowest mkdir -p, open, write, fsync: {:?})",
            l.slowest,
            l.phases
        );
    }
    let pending_end = st_end["pending_ops"].as_u64().unwrap_or(0);
    assert!(pending_end > 0, "nothing pending at the end of the outage: {st_end}");

    // Recovery: the same node, ports and data.
    drop(tarpit);
    let Server::Garage(garage) = &mut server else { unreachable!("a Garage backend") };
    garage.nodes_mut()[0].restart();
    let (out, drain) = flush(&m);
    assert!(out.ok(), "flush after the outage: {out}");
    let keys = bucket_keys(&bucket, "after the drain");
    let l = ledger.lock().unwrap();
    let mut wrong = Vec::new();
    for (path, (seq, len, hash)) in &l.acked {
        match bucket.try_get(path) {
            Some(o) if blake3::hash(&o.data) == *hash => {}
            Some(o) => wrong
                .push(format!("{path}: acknowledged version {seq} ({len} bytes), bucket has {:?}", header(&o.data))),
            None => wrong.push(format!("{path}: acknowledged version {seq} ({len} bytes), no object")),
        }
    }
    assert!(wrong.is_empty(), "acknowledged writes not in the bucket after the drain:\n{}", wrong.join("\n"));
    for (path, data) in &before {
        assert!(bucket.data(path) == *data, "{path} changed in the bucket");
    }
    let expected: BTreeSet<String> = l
        .acked
        .keys()
        .chain(before.keys())
        .cloned()
        .chain(["seed/cold.bin".to_string(), "seed/warm.bin".to_string()])
        .collect();
    let extra: Vec<&String> = keys.difference(&expected).collect();
    let missing: Vec<&String> = expected.difference(&keys).collect();
    assert!(extra.is_empty() && missing.is_empty(), "the bucket's keys: extra {extra:?}, missing {missing:?}");
    let st = status_json(&m);
    assert_eq!(
        (st["pending_ops"].as_u64(), st["last_error"].as_str()),
        (Some(0), None),
        "status after the drain: {st}"
    );
    // The cold file reads now, and a sample of the outage's files reads back through the mount.
    assert!(read(&dir.m("seed/cold.bin")) == cold, "seed/cold.bin reads wrong after the outage");
    for (path, (_, _, hash)) in l.acked.iter().take(20) {
        assert!(blake3::hash(&read(&dir.m(path))) == *hash, "{path} reads back wrong through the mount");
    }
    let (fsyncs, bytes, files, slowest, phases) = (l.fsyncs, l.bytes, l.acked.len(), l.slowest, l.phases);
    drop(l);

    // SIGTERM during an outage: the daemon stops after its grace and keeps the change.
    let Server::Garage(garage) = &mut server else { unreachable!("a Garage backend") };
    garage.nodes()[0].kill();
    let last = version("pre/after-sigterm", 0, &mut rng);
    write_file(&dir.m("pre/after-sigterm"), &last);
    let mut m = m;
    m.live = false;
    let pid = m.pid;
    drop(m);
    let log_before = fs::read_to_string(&dir.log).unwrap_or_default().len();
    let t = Instant::now();
    sigterm(pid);
    wait_for("the daemon to exit after SIGTERM", SIGTERM_EXIT, || (!alive(pid)).then_some(()));
    let term_exit = t.elapsed();
    assert!(!mounted(&dir.mnt), "the daemon exited after SIGTERM but {} is still mounted", dir.mnt.display());
    let log = fs::read_to_string(&dir.log).unwrap_or_default();
    let line = log[log_before.min(log.len())..]
        .lines()
        .find(|l| l.contains("shutdown grace with") && l.contains("not yet in the bucket"))
        .unwrap_or_else(|| {
            panic!(
                "no `... shutdown grace with N change(s) (B bytes) not yet in the bucket` line in the daemon log:\n{}",
                tail(&dir.log, 30)
            )
        })
        .to_string();
    let left = line.split("grace with ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok());
    let left_bytes =
        line.split(" change(s) (").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok());
    assert_eq!(left, Some(1), "the change left in the journal: {line}");
    assert_eq!(left_bytes, Some(last.len() as u64), "the bytes left in the journal: {line}");

    // The next mount of the same state dir uploads it.
    let Server::Garage(garage) = &mut server else { unreachable!("a Garage backend") };
    garage.nodes_mut()[0].restart();
    let m = mount(&server);
    let (out, _) = flush(&m);
    assert!(out.ok(), "flush after the remount: {out}");
    assert!(bucket.data("pre/after-sigterm") == last, "pre/after-sigterm is not in the bucket after the remount");
    assert!(read(&dir.m("pre/after-sigterm")) == last, "pre/after-sigterm reads back wrong after the remount");
    bucket_keys(&bucket, "after the remount");
    let st = status_json(&m);
    assert_eq!(
        (st["pending_ops"].as_u64(), st["last_error"].as_str()),
        (Some(0), None),
        "status after the remount: {st}"
    );
    m.unmount();
    // No FUSE request, upload or shutdown panicked along the way.
    let log = fs::read_to_string(&dir.log).unwrap_or_default();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "the daemon panicked:\n{}", panics.join("\n"));

    println!(
        "outage harness (garage, {mode:?}): {:.1} s outage, {fsyncs} acknowledged fsyncs ({bytes} bytes, {files} files) during \
         it, slowest write {:.3} s (slowest mkdir -p {:.3} s, open {:.3} s, write {:.3} s, fsync {:.3} s), {pending_during}..{pending_end} changes pending (last error: {error_during:?}), \
         warm read {:.3} s, cold read EIO after {:.3} s, drain after recovery {:.1} s, SIGTERM exit {:.1} s leaving \
         {} change(s) ({} bytes) in the journal, {:.1} s in all",
        outage_len.as_secs_f64(),
        slowest.as_secs_f64(),
        phases[0].as_secs_f64(),
        phases[1].as_secs_f64(),
        phases[2].as_secs_f64(),
        phases[3].as_secs_f64(),
        warm_read.as_secs_f64(),
        cold_fail.as_secs_f64(),
        drain.as_secs_f64(),
        term_exit.as_secs_f64(),
        left.unwrap_or(0),
        left_bytes.unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
}
