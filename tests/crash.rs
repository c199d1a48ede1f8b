//! The crash harness: the journal's promise under SIGKILL. Once `fsync` has returned, the
//! change reaches the bucket, whatever happens in between, and no partial object ever
//! becomes visible at a file's path.
//!
//! A writer thread creates and rewrites files through a real mount. Each file's content
//! names its own path, length and blake3 hash in a header line, so any object found at a
//! path can be checked on its own. The writer records a version in the manifest (kept in
//! memory and appended to `manifest.txt` in the test dir, outside the mount) only after its
//! `fsync` returned. Meanwhile the test SIGKILLs the daemon at random moments (a seeded RNG
//! picks short delays: that is the workload, not synchronisation), checks that the dead
//! mount is still in the table and answers `ENOTCONN`, and mounts again with the same state
//! and cache dirs; the new mount must detach the dead one by itself. Writes in flight at a
//! kill fail (ENOTCONN, EIO...): they were never acknowledged, and the writer rewrites those
//! files after the next mount.
//!
//! Checked along the way: every object in the bucket is empty (a file is created or
//! truncated empty first, and that state is committed) or a complete version the writer
//! wrote, sampled while uploads run and in full after every kill; and after each remount a
//! sample of acknowledged files reads back exactly through the mount. At the end, after
//! `autosync flush`, every file of the manifest is in the bucket with its last acknowledged
//! content, read by a second client.
//!
//! Sizes: `AUTOSYNC_CRASH_KILLS` (default 24), `AUTOSYNC_CRASH_SEED` (default fixed),
//! `AUTOSYNC_CRASH_BACKEND` (`local`, the default, or `moto`, `garage`, `garage3`). The
//! summary line (kills, acknowledged fsyncs, bytes lost) is printed to stdout: run with
//! `-- --nocapture` to see it, or `benches/crash.sh`, the full-size run. The CI size takes
//! about 15 s on a local folder; on Garage the full scans make 24 kills take about 4 min.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::servers::{Backend, Other, Server};
use common::{Mount, Rng, TestDir, Tier, alive, daemon_pids, env_u64, mounted, sigkill, wait_for};

static TIER: Tier = Tier::real_mount("autosync-crash-");

/// Short: uploads run between the kills, so kills also land in the middle of uploads.
const UPLOAD_DELAY: &str = "0.1";
const METADATA_TTL: &str = "1";
/// The folders the files spread over.
const FOLDERS: u64 = 4;
/// Beyond this many files, the writer only rewrites: the full scans after each kill stay
/// bounded however many kills a run has.
const MAX_PATHS: usize = 400;
/// The folder marker autosync puts in the bucket for an empty folder (`layout.rs`).
const FOLDER_MARKER: &str = ".autosync-folder";

// ---------------------------------------------------------------------------------------------
// Self-describing contents
// ---------------------------------------------------------------------------------------------

/// One version of a file: `crash1 PATH SEQ LEN HASH\n` then LEN bytes whose blake3 is HASH.
fn version(path: &str, seq: u64, rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(100) {
        0..50 => rng.below(4096),
        50..85 => 4096 + rng.below(124 * 1024),
        _ => 128 * 1024 + rng.below(384 * 1024),
    } as usize;
    let body = rng.bytes(len);
    let mut v = format!("crash1 {path} {seq} {len} {}\n", blake3::hash(&body)).into_bytes();
    v.extend_from_slice(&body);
    v
}

/// Checks that `data`, found at `path`, is a complete version of that path: `Ok(Some(seq))`,
/// or `Ok(None)` for an empty object.
fn check_version(path: &str, data: &[u8]) -> Result<Option<u64>, String> {
    if data.is_empty() {
        return Ok(None);
    }
    let nl = data.iter().position(|&b| b == b'\n').ok_or("no header line")?;
    let header = std::str::from_utf8(&data[..nl]).map_err(|_| "header is not UTF-8")?;
    let f: Vec<&str> = header.split(' ').collect();
    let [magic, p, seq, len, hash] = f[..] else { return Err(format!("bad header {header:?}")) };
    if magic != "crash1" || p != path {
        return Err(format!("header {header:?} does not name {path:?}"));
    }
    let body = &data[nl + 1..];
    let len: usize = len.parse().map_err(|_| format!("bad length in {header:?}"))?;
    if body.len() != len {
        return Err(format!("header {header:?} says {len} bytes, the object has {} (torn)", body.len()));
    }
    if blake3::hash(body).to_string() != hash {
        return Err(format!("header {header:?}: the body's hash differs (torn or mixed)"));
    }
    seq.parse().map(Some).map_err(|_| format!("bad seq in {header:?}"))
}

// ---------------------------------------------------------------------------------------------
// The writer and its manifest
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Ledger {
    /// The next version number (over all files).
    seq: u64,
    /// Every version each path was ever given (acknowledged or not), by seq: its hash.
    attempted: HashMap<String, HashMap<u64, blake3::Hash>>,
    /// The manifest: each path's last acknowledged version (seq, length, hash).
    acked: BTreeMap<String, (u64, u64, blake3::Hash)>,
    /// Paths whose last write was not acknowledged: rewritten first after the next mount.
    pending: BTreeSet<String>,
    /// Acknowledged fsyncs, and the bytes they covered.
    fsyncs: u64,
    acked_bytes: u64,
    /// Writes that failed because of a kill.
    failed: u64,
    /// Errors while the daemon was alive (must stay empty).
    live_errors: Vec<String>,
}

struct Writer {
    mnt: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
    manifest: PathBuf,
    /// Set just before the SIGKILL: an error after it is expected.
    killed: Arc<AtomicBool>,
    /// Set when the writer should return after its current file.
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// Writes files until `stop` or the first error (the daemon died). Pending paths go
    /// first; then a new path, or a rewrite (O_TRUNC, in place) of an acknowledged one.
    /// With `drain`, returns once nothing is pending.
    fn run(&self, seed: u64, drain: bool) {
        let mut rng = Rng(seed);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let (path, seq) = {
                let mut l = self.ledger.lock().unwrap();
                let path = match l.pending.first().cloned() {
                    Some(p) => p,
                    None if drain => return,
                    None if !l.acked.is_empty() && (l.acked.len() >= MAX_PATHS || rng.below(100) < 40) => {
                        let i = rng.below(l.acked.len() as u64) as usize;
                        l.acked.keys().nth(i).cloned().unwrap_or_default()
                    }
                    None => format!("d{}/f{:05}", rng.below(FOLDERS), l.seq),
                };
                l.seq += 1;
                (path, l.seq)
            };
            let data = version(&path, seq, &mut rng);
            {
                let mut l = self.ledger.lock().unwrap();
                l.attempted.entry(path.clone()).or_default().insert(seq, blake3::hash(&data));
                l.pending.insert(path.clone());
            }
            match self.write(&path, &data) {
                Ok(()) => {
                    let hash = blake3::hash(&data);
                    let mut m = OpenOptions::new().create(true).append(true).open(&self.manifest).unwrap();
                    writeln!(m, "{path} {seq} {} {hash}", data.len()).unwrap();
                    let mut l = self.ledger.lock().unwrap();
                    l.acked.insert(path.clone(), (seq, data.len() as u64, hash));
                    l.pending.remove(&path);
                    l.fsyncs += 1;
                    l.acked_bytes += data.len() as u64;
                }
                Err(e) => {
                    let mut l = self.ledger.lock().unwrap();
                    l.failed += 1;
                    if !self.killed.load(Ordering::SeqCst) {
                        l.live_errors.push(format!("{path} (seq {seq}): {e}"));
                    }
                    return;
                }
            }
        }
    }

    /// Create (or truncate), write, fsync: `Ok` is the acknowledgement.
    fn write(&self, path: &str, data: &[u8]) -> std::io::Result<()> {
        let p = self.mnt.join(path);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&p)?;
        f.write_all(data)?;
        f.sync_all()
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Every object in the bucket (or a sample of `sample` of them) is empty or a complete
/// version its path was given. A conflict copy (`PATH.conflict-HOST-STAMP`; the harness's
/// names have no extension) must hold a complete version of `PATH`; its key goes into
/// `conflicts` (the test fails on any at the end). Returns the number of objects checked.
fn check_bucket(
    bucket: &Other,
    ledger: &Mutex<Ledger>,
    sample: Option<(usize, &mut Rng)>,
    conflicts: &mut BTreeSet<String>,
    when: &str,
) -> usize {
    let mut keys: Vec<String> = bucket.keys().into_iter().filter(|k| !k.ends_with(FOLDER_MARKER)).collect();
    if let Some((n, rng)) = sample {
        while keys.len() > n {
            let i = rng.below(keys.len() as u64) as usize;
            keys.swap_remove(i);
        }
    }
    let mut checked = 0;
    for key in &keys {
        // Listed, then gone: nothing in this workload deletes, but a racing replace may.
        let Some(obj) = bucket.try_get(key) else { continue };
        let path = match key.split_once(".conflict-") {
            Some((p, _)) => {
                conflicts.insert(key.clone());
                p
            }
            None => key.as_str(),
        };
        let seq = check_version(path, &obj.data).unwrap_or_else(|e| panic!("{when}: partial object at {key:?}: {e}"));
        if let Some(seq) = seq {
            let l = ledger.lock().unwrap();
            let known = l.attempted.get(path).and_then(|v| v.get(&seq));
            assert!(
                known == Some(&blake3::hash(&obj.data)),
                "{when}: the object at {key:?} claims version {seq} of {path:?}, which the writer never wrote"
            );
        }
        checked += 1;
    }
    checked
}

/// Files the writer left behind in a local bucket folder outside object_store's view
/// (`KEY#N`: the temp file of a put cut short by a kill).
fn stray_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(stray_files(&p));
        } else if p.file_name().is_some_and(|n| n.to_string_lossy().contains('#')) {
            out.push(p);
        }
    }
    out
}

/// The errno of `stat(p)`, if it fails.
fn stat_errno(p: &Path) -> Option<i32> {
    fs::metadata(p).err().and_then(|e| e.raw_os_error())
}

fn kill_daemon(mut m: Mount) {
    m.live = false;
    let pid = m.pid;
    drop(m);
    sigkill(pid);
    wait_for("the killed daemon to die", Duration::from_secs(10), || (!alive(pid)).then_some(()));
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

fn backend() -> Backend {
    match std::env::var("AUTOSYNC_CRASH_BACKEND").as_deref() {
        Err(_) | Ok("local") => Backend::Local,
        Ok("moto") => Backend::Moto,
        Ok("garage") => Backend::Garage,
        Ok("garage3") => Backend::Garage3,
        Ok(other) => panic!("AUTOSYNC_CRASH_BACKEND={other:?}: one of local, moto, garage, garage3"),
    }
}

/// The journal's promise under SIGKILL: 24 kills at CI size, `benches/crash.sh` for more.
#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let kills = env_u64("AUTOSYNC_CRASH_KILLS", 24);
    let seed = env_u64("AUTOSYNC_CRASH_SEED", 0x5EED_C4A5);
    let backend = backend();
    let started = Instant::now();

    let dir = TestDir::new(&TIER, &format!("kill-{}", backend.name()));
    let server = Server::start(backend, &dir.root, "server");
    server.create_bucket("bkt");
    let bucket = server.client("bkt");
    let source = server.source("bkt", "");
    let (state, cache) = (dir.root.join("state"), dir.root.join("cache"));
    let mount = || server.mount(&dir, &source, (&state, &cache), (UPLOAD_DELAY, METADATA_TTL), server.creds());

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = Arc::new(Writer {
        mnt: dir.mnt.clone(),
        ledger: ledger.clone(),
        manifest: dir.root.join("manifest.txt"),
        killed: killed.clone(),
        stop: stop.clone(),
    });
    let mut rng = Rng(seed);
    let mut scanned = 0;
    // Conflict copies seen: with one writer, each is a change duplicated by a crash.
    let mut conflicts = BTreeSet::new();

    for round in 0..kills {
        let m = mount();
        // Acknowledged files survive the kill: a sample of those not written since reads
        // back exactly through the new mount (the rest is checked at the end).
        {
            let l = ledger.lock().unwrap();
            let settled: Vec<_> = l.acked.iter().filter(|(p, _)| !l.pending.contains(*p)).collect();
            for _ in 0..settled.len().min(16) {
                let (p, (seq, _, hash)) = settled[rng.below(settled.len() as u64) as usize];
                let data = fs::read(dir.m(p)).unwrap_or_else(|e| panic!("round {round}: read {p} after remount: {e}"));
                assert!(
                    blake3::hash(&data) == *hash,
                    "round {round}: {p} reads back as {:?}, not its acknowledged version {seq}",
                    check_version(p, &data)
                );
            }
        }
        killed.store(false, Ordering::SeqCst);
        stop.store(false, Ordering::SeqCst);
        let w = writer.clone();
        let wseed = rng.next();
        let handle = std::thread::spawn(move || w.run(wseed, false));

        // The kill lands anywhere from the replay right after the mount to the middle of
        // writes and uploads; in between, a sample of the bucket is checked while it changes.
        let first = Duration::from_millis(rng.below(400));
        std::thread::sleep(first);
        scanned +=
            check_bucket(&bucket, &ledger, Some((32, &mut rng)), &mut conflicts, &format!("round {round}, mounted"));
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        killed.store(true, Ordering::SeqCst);
        kill_daemon(m);
        stop.store(true, Ordering::SeqCst);
        handle.join().expect("the writer thread panicked");

        // The dead mount stays in the table and answers ENOTCONN until the next mount
        // detaches it.
        assert!(mounted(&dir.mnt), "round {round}: the killed daemon's mount left the table");
        // (A name never looked up: the kernel may answer the mount point's own stat from its
        // attribute cache.)
        let probe = dir.m(&format!("never-looked-up-{round}"));
        // ENOTCONN, or ECONNABORTED when the request raced with the kernel aborting the
        // connection: both say the daemon is gone.
        let errno = stat_errno(&probe);
        assert!(
            matches!(errno, Some(libc::ENOTCONN | libc::ECONNABORTED)),
            "round {round}: stat in the dead mount gave errno {errno:?}"
        );
        assert!(daemon_pids(&state).is_empty(), "round {round}: a daemon survived SIGKILL");
        scanned += check_bucket(&bucket, &ledger, None, &mut conflicts, &format!("round {round}, after the kill"));
    }

    // The last mount: rewrite what the last kill cut short, flush, and compare.
    let m = mount();
    stop.store(false, Ordering::SeqCst);
    killed.store(false, Ordering::SeqCst);
    writer.run(rng.next(), true);
    m.flush();
    scanned += check_bucket(&bucket, &ledger, None, &mut conflicts, "after the final flush");

    let l = ledger.lock().unwrap();
    assert!(l.live_errors.is_empty(), "writes failed while the daemon was alive:\n{}", l.live_errors.join("\n"));
    assert!(l.pending.is_empty(), "still pending after the final mount: {:?}", l.pending);
    let mut lost = Vec::new();
    let mut lost_bytes = 0;
    for (path, (seq, len, hash)) in &l.acked {
        let got = bucket.try_get(path).map(|o| o.data);
        let ok = got.as_deref().is_some_and(|d| blake3::hash(d) == *hash);
        if !ok {
            lost_bytes += len;
            let what = match &got {
                None => "no object".to_string(),
                Some(d) => format!("{:?}", check_version(path, d)),
            };
            let copy = conflicts.iter().find(|k| {
                k.starts_with(&format!("{path}.conflict-"))
                    && bucket.try_get(k).is_some_and(|o| blake3::hash(&o.data) == *hash)
            });
            let moved =
                copy.map(|k| format!("; the acknowledged content is in the conflict copy {k}")).unwrap_or_default();
            lost.push(format!("{path}: acknowledged version {seq} ({len} bytes), bucket has {what}{moved}"));
        } else {
            let data = fs::read(dir.m(path)).unwrap_or_else(|e| panic!("read {path} through the mount: {e}"));
            assert!(blake3::hash(&data) == *hash, "{path} reads back differently through the mount");
        }
    }
    let strays = match &server {
        Server::Local(root) => stray_files(&root.join("bkt")),
        _ => Vec::new(),
    };
    println!(
        "crash harness ({}, seed {seed:#x}): {kills} kills, {} acknowledged fsyncs ({} bytes), {} files, \
         {} writes cut short by a kill, {scanned} objects checked, {} bytes lost, {} conflict copies, {} stray temp files, {:.1} s",
        backend.name(),
        l.fsyncs,
        l.acked_bytes,
        l.acked.len(),
        l.failed,
        lost_bytes,
        conflicts.len(),
        strays.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(lost.is_empty(), "{lost_bytes} acknowledged bytes lost:\n{}", lost.join("\n"));
    // With one writer, a conflict copy is a change a crash duplicated: our own upload, cut
    // short before the journal recorded it, not recognised by the next mount.
    assert!(conflicts.is_empty(), "conflict copies made by crashes (one writer): {conflicts:?}");
    assert!(l.fsyncs >= kills, "too few acknowledged fsyncs ({}) for {kills} kills", l.fsyncs);
    drop(l);
    m.unmount();
}
