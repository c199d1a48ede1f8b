//! The harness the real-mount and S3 tiers share: commands run with a deadline, the mount
//! table and daemon processes, a test's temp dir and a live `autosync mount --daemon`.
//!
//! What differs between the tiers (temp dir prefix, shutdown grace, timeouts, the CLI's
//! environment) is a [`Tier`] each test file defines once.

// Each test crate uses its own subset of this module.
#![allow(dead_code)]

use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// For each test function `f(Backend)`, the tests `local::f`, `moto::f`, `garage::f`,
/// `garage3::f` and `azurite::f`. (Not `gcs`: fake-gcs-server cannot take object_store's
/// uploads; the S3 tier tests what works there.) The using file has `Backend` in scope and
/// declares this module with `#[macro_use]`.
#[allow(unused_macros)]
macro_rules! against_every_backend {
    ($($test:ident),* $(,)?) => {
        against_every_backend!(@mod local, Local, $($test),*);
        against_every_backend!(@mod moto, Moto, $($test),*);
        against_every_backend!(@mod garage, Garage, $($test),*);
        against_every_backend!(@mod garage3, Garage3, $($test),*);
        against_every_backend!(@mod azurite, Azurite, $($test),*);
    };
    (@mod $module:ident, $backend:ident, $($test:ident),*) => {
        mod $module {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::$backend)
            })*
        }
    };
}

pub mod fixture;
pub mod servers;
pub mod unquote;

pub const BIN: &str = env!("CARGO_BIN_EXE_autosync");
/// Short delay so that uploads happen within the tests' time.
pub const UPLOAD_DELAY: &str = "0.2";
/// How long a single command may take before the test gives up on it.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// 2021-03-04 05:06:07 UTC.
pub const STAMP: i64 = 1_614_834_367;

/// What differs between the tiers' harnesses.
pub struct Tier {
    /// Prefix of each test's temp dir (the test's name follows).
    pub temp_prefix: &'static str,
    /// `--shutdown-grace` of the mounts.
    pub shutdown_grace: &'static str,
    /// `--timeout` of `autosync flush`.
    pub flush_timeout: &'static str,
    /// How long dropping a live `Mount` waits for `autosync unmount`, then for the daemon to exit.
    pub drop_unmount_timeout: Duration,
    pub drop_exit_timeout: Duration,
    /// Variables removed from the environment of the `autosync` CLI commands of a mount.
    pub cli_env_remove: &'static [&'static str],
    /// A failing test also prints the tails of the other `*.log` files of its temp dir.
    pub show_other_logs: bool,
}

impl Tier {
    /// The settings of the real-mount test binaries, with temp dirs named `temp_prefix...`.
    pub const fn real_mount(temp_prefix: &'static str) -> Tier {
        Tier {
            temp_prefix,
            shutdown_grace: "20",
            flush_timeout: "90",
            drop_unmount_timeout: Duration::from_secs(60),
            drop_exit_timeout: Duration::from_secs(30),
            cli_env_remove: &["AWS_CA_BUNDLE"],
            show_other_logs: true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline
// ---------------------------------------------------------------------------------------------

pub struct Out {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.what, self.status, self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it after `timeout`. Its stderr goes to `stderr_log`
/// (appended) when given, so that a daemon it leaves behind keeps logging there; `Out.stderr`
/// then holds what was appended while the command ran.
pub fn try_run(cmd: &mut Command, timeout: Duration, stderr_log: Option<&Path>) -> Result<Out, String> {
    let what = format!("{cmd:?}");
    let mut out = tempfile::tempfile().map_err(|e| e.to_string())?;
    let (mut err, start) = match stderr_log {
        Some(p) => {
            let f = OpenOptions::new().create(true).append(true).open(p).map_err(|e| e.to_string())?;
            let len = f.metadata().map_err(|e| e.to_string())?.len();
            (OpenOptions::new().read(true).open(p).map_err(|e| e.to_string())?, (f, len))
        }
        None => {
            let f = tempfile::tempfile().map_err(|e| e.to_string())?;
            (f.try_clone().map_err(|e| e.to_string())?, (f, 0))
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(start.0.try_clone().map_err(|e| e.to_string())?);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = Vec::new();
    out.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    out.read_to_end(&mut stdout).map_err(|e| e.to_string())?;
    let mut stderr = Vec::new();
    err.seek(SeekFrom::Start(start.1)).map_err(|e| e.to_string())?;
    err.read_to_end(&mut stderr).map_err(|e| e.to_string())?;
    Ok(Out {
        what,
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

pub fn run(mut cmd: impl BorrowMut<Command>) -> Out {
    try_run(cmd.borrow_mut(), CMD_TIMEOUT, None).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd` and fails the test unless it exits 0.
pub fn run_ok(cmd: impl BorrowMut<Command>) -> Out {
    let out = run(cmd);
    assert!(out.ok(), "command failed: {out}");
    out
}

/// Polls `f` until it gives a value, failing the test after `timeout`.
/// A number from the environment (a harness's size or seed), or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Mounts, processes and the mount table
// ---------------------------------------------------------------------------------------------

/// Is something mounted exactly at `p` (an absolute, canonical path)?
pub fn mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str())))
        .unwrap_or(false)
}

/// Running (not zombie) `autosync mount` daemons with `needle` as one of their arguments.
pub fn daemon_pids(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_bytes();
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return pids };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"autosync"))
            && args.contains(&&b"mount"[..])
            && args.contains(&needle)
            && !args.contains(&&b"--daemon"[..]);
        if is_daemon && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn sigkill(pid: u32) {
    // SAFETY: plain kill(2) on a pid this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// `umount -l` of `mnt`, if something is mounted there.
fn lazy_umount(mnt: &Path) {
    if mounted(mnt) {
        let _ = try_run(Command::new("umount").arg("-l").arg(mnt), Duration::from_secs(10), None);
    }
}

pub fn log_level() -> String {
    std::env::var("AUTOSYNC_TEST_LOG").unwrap_or_else(|_| "info".into())
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One test's temp dir: the mount point `mnt`, the daemon's log `daemon.log`, and whatever the
/// tier keeps there. A failing test keeps it and prints where it is.
pub struct TestDir {
    tmp: Option<TempDir>,
    pub tier: &'static Tier,
    pub root: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl TestDir {
    pub fn new(tier: &'static Tier, name: &str) -> Self {
        let tmp = tempfile::Builder::new().prefix(&format!("{}{name}-", tier.temp_prefix)).tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical temp dir");
        let mnt = root.join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        TestDir { tier, log: root.join("daemon.log"), mnt, root, tmp: Some(tmp) }
    }

    /// A path inside the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Last line of defence (e.g. a test failing right after killing a daemon): nothing of
        // this test stays mounted or running.
        lazy_umount(&self.mnt);
        for pid in daemon_pids(&self.mnt) {
            sigkill(pid);
        }
        if std::thread::panicking()
            && let Some(tmp) = self.tmp.take()
        {
            let kept = tmp.keep();
            eprintln!("test failed: keeping {} (daemon log: {})", kept.display(), self.log.display());
            eprintln!("--- last lines of the daemon log ---\n{}", tail(&self.log, 40));
            if !self.tier.show_other_logs {
                return;
            }
            for e in fs::read_dir(&kept).into_iter().flatten().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") && p != self.log {
                    eprintln!("--- last lines of {} ---\n{}", p.display(), tail(&p, 15));
                }
            }
        }
    }
}

/// How to start one `autosync mount --daemon` at a test dir's `mnt`.
pub struct MountSpec<'a> {
    pub source: &'a OsStr,
    pub state: &'a Path,
    pub cache: &'a Path,
    /// Options given between `--cache-dir` and `--daemon` (e.g. the S3 endpoint).
    pub opts: &'a [&'a str],
    pub upload_delay: &'a str,
    pub metadata_ttl: &'a str,
}

/// A live mount, started with `--daemon`. Dropping it unmounts, whatever happened.
pub struct Mount {
    pub mnt: PathBuf,
    pub state: PathBuf,
    pub pid: u32,
    pub live: bool,
    pub tier: &'static Tier,
}

impl Mount {
    /// Mounts `spec` at `dir.mnt`, the daemon logging to `dir.log`; `env` adds to the command's
    /// environment (after `RUST_LOG`).
    pub fn start(dir: &TestDir, spec: &MountSpec, env: impl FnOnce(&mut Command)) -> Mount {
        let state = spec.state;
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg(spec.source)
            .arg(&dir.mnt)
            .arg("--state-dir")
            .arg(state)
            .arg("--cache-dir")
            .arg(spec.cache)
            .args(spec.opts)
            .arg("--daemon")
            .args(["--upload-delay", spec.upload_delay, "--metadata-ttl", spec.metadata_ttl])
            .args(["--shutdown-grace", dir.tier.shutdown_grace])
            .env("RUST_LOG", log_level());
        env(&mut cmd);
        let out = try_run(&mut cmd, Duration::from_secs(60), Some(&dir.log)).unwrap_or_else(|e| panic!("{e}"));
        // Whatever happened, make sure a daemon that did start is taken down on failure.
        let pid = daemon_pids(state).first().copied();
        let mut m = Mount {
            mnt: dir.mnt.clone(),
            state: state.to_path_buf(),
            pid: pid.unwrap_or(0),
            live: true,
            tier: dir.tier,
        };
        assert!(out.ok(), "mount failed: {out}\n--- daemon log ---\n{}", tail(&dir.log, 40));
        assert!(mounted(&dir.mnt), "`mount --daemon` returned but {} is not in the mount table", dir.mnt.display());
        if m.pid == 0 {
            m.pid = wait_for("the daemon's pid", Duration::from_secs(10), || daemon_pids(state).first().copied());
        }
        m
    }

    pub fn cli(&self, sub: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg(sub).arg(&self.mnt).arg("--state-dir").arg(&self.state);
        for k in self.tier.cli_env_remove {
            c.env_remove(k);
        }
        c
    }

    /// `autosync flush`: returns once every change is in the bucket.
    pub fn flush(&self) {
        let out = run(self.cli("flush").args(["--timeout", self.tier.flush_timeout]));
        assert!(out.ok(), "flush failed: {out}");
    }

    /// `autosync unmount`, then waits for the daemon to exit (it releases the state dir).
    pub fn unmount(mut self) {
        let out = run(&mut self.cli("unmount"));
        assert!(out.ok(), "unmount failed: {out}");
        assert!(!mounted(&self.mnt), "`autosync unmount` returned but {} is still mounted", self.mnt.display());
        self.live = false;
        let pid = self.pid;
        wait_for("the daemon to exit after unmount", Duration::from_secs(30), || (!alive(pid)).then_some(()));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        let _ = try_run(&mut self.cli("unmount"), self.tier.drop_unmount_timeout, None);
        lazy_umount(&self.mnt);
        let deadline = Instant::now() + self.tier.drop_exit_timeout;
        while self.pid != 0 && alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.pid != 0 && alive(self.pid) {
            sigkill(self.pid);
        }
    }
}

/// Takes down anything a command that should have failed mounted at `mnt` after all.
pub struct StrayGuard(pub PathBuf);

impl Drop for StrayGuard {
    fn drop(&mut self) {
        let pids = daemon_pids(&self.0);
        lazy_umount(&self.0);
        for pid in pids {
            sigkill(pid);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

/// splitmix64: deterministic, fast pseudo-random data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
    }
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
