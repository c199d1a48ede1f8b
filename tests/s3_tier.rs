//! Real S3 tests: the built `autosync` binary mounts buckets of real S3 servers, and a second
//! S3 client (object_store, plus raw requests for keys object_store cannot send) looks at the
//! bucket from outside. Every test runs once against each server ([`Backend`]), as
//! `moto::NAME` and `garage::NAME`:
//!
//! - **moto's S3 server**, which, like AWS S3, enforces `If-Match`/`If-None-Match` on PUT. It
//!   is found at `$AUTOSYNC_MOTO_SERVER`, then at `.ci/venv/bin/moto_server`, then on `PATH`.
//! - **Garage** (single node), a real distributed object store that ignores both headers, so
//!   autosync falls back to compare-then-write there. It is found at `$AUTOSYNC_GARAGE`, then at
//!   `~/.cargo/bin/garage`, then on `PATH`.
//!
//! Two more tests run against Garage as a 3-node cluster with replication factor 3: one kills a
//! node autosync does not talk to in the middle of a workload, the other kills the node it talks
//! to and starts it again.
//!
//! Without a server, its tests fail with a one-line message saying how to install it (`.ci/run`
//! installs both). One test also reads and writes the bucket with rclone and s3fs (Debian
//! packages `rclone` and `s3fs`, found at `$AUTOSYNC_RCLONE` and `$AUTOSYNC_S3FS`, then on
//! `PATH`), and fails the same way without them. Each test starts its own server on free
//! loopback ports and kills it in `Drop`, even when the test fails. Raw requests to Garage
//! (which checks every signature) go through boto3, from the Python environment moto runs in.
//!
//! Every test has its own temp dir holding the mount point, the state and cache dirs, the
//! daemon's log (`daemon.log`) and the server's log. A failing test keeps it and prints where it
//! is. Nothing waits by sleeping: conditions are polled with a deadline.
//!
//! Set `AUTOSYNC_TEST_LOG` (e.g. `debug`) to change the daemons' `RUST_LOG` (default `info`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::Deref;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::servers::{Backend, KEY_ID, Moto, SECRET, Server, find_exe, s3_env};
use common::unquote::{Unquote, UnquotingProxy};
use common::{
    BIN, Mount, Rng, STAMP, StrayGuard, TestDir, Tier, UPLOAD_DELAY, mounted, read, run, run_ok, tail, try_run,
    wait_for, write_file,
};

static TIER: Tier = Tier {
    temp_prefix: "autosync-s3-",
    shutdown_grace: "10",
    flush_timeout: "60",
    drop_unmount_timeout: Duration::from_secs(30),
    drop_exit_timeout: Duration::from_secs(20),
    cli_env_remove: &["AWS_CA_BUNDLE"],
    show_other_logs: true,
};

// ---------------------------------------------------------------------------------------------
// Mounts, processes and the mount table
// ---------------------------------------------------------------------------------------------

/// One test's temp dir: mount point, state and cache dirs, the daemon's and the servers' logs.
struct Fixture {
    dir: TestDir,
    backend: Backend,
}

impl Fixture {
    /// The temp dir of test `name` run against `backend`.
    fn new(name: &str, backend: Backend) -> Self {
        Fixture { dir: TestDir::new(&TIER, &format!("{name}-{}", backend.name())), backend }
    }

    /// A server of this fixture's backend, logging to `NAME.log` in this fixture.
    fn server(&self, name: &str) -> Server {
        Server::start(self.backend, &self.root, name)
    }

    /// Mounts `source` of `server` at `mnt`, with state dir `state-TAG` and cache dir `cache-TAG`.
    fn mount(&self, server: &Server, source: &str, metadata_ttl: &str, tag: &str) -> Mount {
        self.mount_with(server, source, metadata_ttl, tag, server.creds())
    }

    /// Mounts `source` of `server` reached through `endpoint` (a proxy in front of it).
    fn mount_via(&self, server: &Server, endpoint: &str, source: &str, ttl: &str, tag: &str) -> Mount {
        let dirs = (&*self.root.join(format!("state-{tag}")), &*self.root.join(format!("cache-{tag}")));
        server.mount_with_opts(
            &self.dir,
            source,
            dirs,
            (UPLOAD_DELAY, ttl),
            server.creds(),
            server.mount_opts_via(endpoint),
        )
    }

    /// Mounts `source` of `server` with the credentials `creds`; the region is given by
    /// `--region`.
    fn mount_with(&self, server: &Server, source: &str, ttl: &str, tag: &str, creds: (&str, &str)) -> Mount {
        let dirs = (&*self.root.join(format!("state-{tag}")), &*self.root.join(format!("cache-{tag}")));
        server.mount(&self.dir, source, dirs, (UPLOAD_DELAY, ttl), creds)
    }
}

impl Deref for Fixture {
    type Target = TestDir;

    fn deref(&self) -> &TestDir {
        &self.dir
    }
}

impl Mount {
    fn status_json(&self) -> serde_json::Value {
        let out = run_ok(self.cli("status").arg("--json"));
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

/// Names in a folder of the mount, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Fails unless `got` holds exactly the names `want` (sorted), each once; names only the first
/// few differences (the lists can be thousands long).
fn assert_names(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let mut seen = BTreeSet::new();
    let dups: Vec<&String> = got.iter().filter(|n| !seen.insert(*n)).take(10).collect();
    let wanted: BTreeSet<&String> = want.iter().collect();
    let missing: Vec<&&String> = wanted.difference(&seen).take(10).collect();
    let extra: Vec<&&String> = seen.difference(&wanted).take(10).collect();
    panic!(
        "{what}: {} names, expected {}; first duplicates {dups:?}, first missing {missing:?}, first unexpected {extra:?}",
        got.len(),
        want.len()
    );
}

/// `ls -1 DIR`, which must succeed silently: the names, in `ls`'s (C locale) order.
fn ls(dir: &Path) -> Vec<String> {
    let out = run(Command::new("ls").arg("-1").arg(dir).env("LC_ALL", "C"));
    assert!(out.ok() && out.stderr.is_empty(), "ls {}: {out}", dir.display());
    out.stdout.lines().map(String::from).collect()
}

fn is_marker(key: &str) -> bool {
    key.rsplit('/').next() == Some(".autosync-folder")
}

/// A clean run logs no warning or error: each one is a failed request or a conflict.
fn assert_no_warnings(fx: &Fixture) {
    let log = fs::read_to_string(&fx.log).unwrap_or_default();
    let bad: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(bad.is_empty(), "the daemon logged warnings or errors:\n{}", bad.join("\n"));
}

/// This machine's hostname as conflict copies spell it (SEMANTICS.md: every character other
/// than ASCII letters, digits and `-` becomes `_`).
fn conflict_host() -> String {
    let h = nix::unistd::gethostname().expect("gethostname").to_string_lossy().into_owned();
    h.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn utc_stamp() -> String {
    chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip under a prefix: content, attributes as user metadata, conditional writes
// ---------------------------------------------------------------------------------------------

fn round_trip_under_a_prefix(backend: Backend) {
    let fx = Fixture::new("roundtrip", backend);
    let server = fx.server("server");
    server.create_bucket("round");
    let other = server.client("round");
    let m = fx.mount(&server, "s3://round/some/prefix", "1", "a");

    let data = Rng(1).bytes(200_000);
    write_file(&fx.m("hello.txt"), b"hello from the mount\n");
    write_file(&fx.m("nested/deeper/data.bin"), &data);
    write_file(&fx.m("empty"), b"");
    fs::create_dir(fx.m("emptydir")).unwrap();
    std::os::unix::fs::symlink("nested/deeper/data.bin", fx.m("link")).unwrap();
    run_ok(Command::new("chmod").arg("640").arg(fx.m("hello.txt")));
    run_ok(Command::new("chmod").arg("750").arg(fx.m("nested")));
    run_ok(Command::new("chown").arg("1234:5678").arg(fx.m("hello.txt")));
    for p in ["hello.txt", "nested"] {
        run_ok(Command::new("touch").args(["-d", "2021-03-04 05:06:07"]).arg(fx.m(p)).env("TZ", "UTC"));
    }
    m.flush();

    // Every key is under the prefix; the files are exactly these, plus folder markers.
    let keys = other.keys();
    assert!(keys.iter().all(|k| k.starts_with("some/prefix/")), "keys outside the prefix: {keys:?}");
    let files: BTreeSet<&str> =
        keys.iter().filter(|k| !is_marker(k)).map(|k| k.strip_prefix("some/prefix/").unwrap()).collect();
    let want: BTreeSet<&str> = ["empty", "hello.txt", "link", "nested/deeper/data.bin"].into();
    assert_eq!(files, want, "files in the bucket (all keys: {keys:?})");
    assert!(keys.contains("some/prefix/emptydir/.autosync-folder"), "no marker for the empty folder: {keys:?}");

    // Content and attributes match what the mount shows, for every file.
    for rel in &want {
        let o = other.get(&format!("some/prefix/{rel}"));
        let md = fs::symlink_metadata(fx.m(rel)).unwrap();
        let content = if md.file_type().is_symlink() {
            fs::read_link(fx.m(rel)).unwrap().as_os_str().as_bytes().to_vec()
        } else {
            read(&fx.m(rel))
        };
        assert!(o.data == content, "{rel}: the object's content differs from the file in the mount");
        let got = (o.meta.get("mode"), o.meta.get("uid"), o.meta.get("gid"), o.meta.get("mtime"));
        // The mtime to the nanosecond, as rclone writes it.
        let mtime = autosync::layout::format_time(md.mtime() * 1_000_000_000 + md.mtime_nsec());
        let (mode, uid, gid) = (md.mode().to_string(), md.uid().to_string(), md.gid().to_string());
        assert_eq!(got, (Some(&mode), Some(&uid), Some(&gid), Some(&mtime)), "{rel}: metadata {:?}", o.meta);
        assert_eq!(o.meta.get("autosync-hash"), Some(&blake3::hash(&content).to_hex().to_string()), "{rel}");
    }
    // ...and they are the values that were set.
    let hello = other.get("some/prefix/hello.txt");
    assert_eq!(hello.data, b"hello from the mount\n");
    assert_eq!(hello.meta["mode"], (libc::S_IFREG | 0o640).to_string());
    assert_eq!((hello.meta["uid"].as_str(), hello.meta["gid"].as_str()), ("1234", "5678"));
    assert_eq!(hello.meta["mtime"], STAMP.to_string());
    let link = other.get("some/prefix/link");
    assert_eq!(link.data, b"nested/deeper/data.bin");
    assert_eq!(link.meta["mode"], (libc::S_IFLNK | 0o777).to_string(), "a symlink's mode has the S_IFLNK bits");
    let marker = other.get("some/prefix/nested/.autosync-folder");
    assert_eq!(marker.meta.get("mode"), Some(&(libc::S_IFDIR | 0o750).to_string()), "folder marker: {:?}", marker.meta);
    assert_eq!(marker.meta.get("mtime"), Some(&STAMP.to_string()), "folder marker: {:?}", marker.meta);

    // moto enforces both kinds of conditional write and Garage neither, and the probe found
    // that out; `status` says so in one line.
    let st = m.status_json();
    let (create, update) = backend.conditional_writes();
    assert_eq!(st["conditional_create"], create, "status: {st}");
    assert_eq!(st["conditional_update"], update, "status: {st}");
    assert_eq!((st["pending_ops"].as_u64(), st["conflicts"].as_u64()), (Some(0), Some(0)), "status: {st}");
    let out = run_ok(&mut m.cli("status"));
    let lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains("conditional")).collect();
    assert_eq!(lines, [backend.status_line()], "status: {out}");
    m.unmount();

    // A fresh mount (another machine: new state and cache) shows the same tree and attributes.
    let m = fx.mount(&server, "s3://round/some/prefix", "1", "b");
    assert_eq!(read(&fx.m("hello.txt")), b"hello from the mount\n");
    assert!(read(&fx.m("nested/deeper/data.bin")) == data, "data.bin differs in a fresh mount");
    assert_eq!(read(&fx.m("empty")), b"");
    assert_eq!(fs::read_link(fx.m("link")).unwrap(), Path::new("nested/deeper/data.bin"));
    assert_eq!(names(&fx.m("emptydir")), Vec::<String>::new());
    let md = fs::metadata(fx.m("hello.txt")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()), (0o640, 1234, 5678, STAMP), "hello.txt");
    let md = fs::metadata(fx.m("nested")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o750, STAMP), "nested/");
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// 2. Objects written by another client, with awkward key characters, show up in the mount
// ---------------------------------------------------------------------------------------------

fn objects_from_another_client_appear_with_their_names(backend: Backend) {
    let fx = Fixture::new("names", backend);
    let server = fx.server("server");
    server.create_bucket("names");
    let other = server.client("names");
    let m = fx.mount(&server, "s3://names", "0.5", "a");
    // The empty root is listed (and that listing cached) before the objects exist.
    assert_eq!(names(&fx.mnt), Vec::<String>::new());

    let objects: Vec<(&str, Vec<u8>)> = [
        "with space.txt",
        "ünïcödé ñame.txt",
        "a+b=c.txt",
        "100%.txt",
        "50%25 literal.txt",
        "a%2Fb.txt",
        "issue#12.txt",
        "q?x&y=z.txt",
        "folder with space/x+y%z#w ü.txt",
    ]
    .iter()
    .map(|&k| (k, format!("content of {k}\n").into_bytes()))
    .collect();
    for (k, data) in &objects {
        other.put(k, data);
    }

    let top: BTreeSet<String> = objects.iter().map(|(k, _)| k.split('/').next().unwrap().to_string()).collect();
    let top: Vec<String> = top.into_iter().collect();
    wait_for("the other client's objects to appear in the mount", Duration::from_secs(20), || {
        (names(&fx.mnt) == top).then_some(())
    });
    assert_eq!(names(&fx.m("folder with space")), vec!["x+y%z#w ü.txt".to_string()]);
    for (k, data) in &objects {
        assert_eq!(&read(&fx.m(k)), data, "{k} in the mount");
        assert_eq!(fs::metadata(fx.m(k)).unwrap().len(), data.len() as u64, "size of {k}");
    }

    // Their later changes show too: a replaced object (new size) and a deleted one.
    let replaced = b"replaced by the other client, with a different size\n";
    other.put("a+b=c.txt", replaced);
    other.delete("100%.txt");
    // (Polled by `stat`: reading the file before the mount re-lists its folder would read
    // the version it knows, which answers ESTALE now that it is gone.)
    wait_for("the replaced object's new size in the mount", Duration::from_secs(20), || {
        (fs::metadata(fx.m("a+b=c.txt")).ok()?.len() == replaced.len() as u64).then_some(())
    });
    assert_eq!(read(&fx.m("a+b=c.txt")), replaced);
    wait_for("the deleted object to leave the mount", Duration::from_secs(20), || {
        (!names(&fx.mnt).iter().any(|n| n == "100%.txt")).then_some(())
    });
    let objects: Vec<(&str, Vec<u8>)> = objects
        .into_iter()
        .filter(|(k, _)| *k != "100%.txt")
        .map(|(k, d)| if k == "a+b=c.txt" { (k, replaced.to_vec()) } else { (k, d) })
        .collect();

    // The other way round: names written in the mount are the keys, byte for byte.
    let mine = ["from mount + % # ü.txt", "sub dir/50%25 b+c.txt"];
    for k in mine {
        write_file(&fx.m(k), format!("mine: {k}\n").as_bytes());
    }
    m.flush();
    for k in mine {
        assert_eq!(other.get(k).data, format!("mine: {k}\n").into_bytes(), "key {k:?} as read by the other client");
    }
    let keys: BTreeSet<String> = other.keys().into_iter().filter(|k| !is_marker(k)).collect();
    let want: BTreeSet<String> = objects.iter().map(|(k, _)| k.to_string()).chain(mine.map(String::from)).collect();
    assert_eq!(keys, want, "keys in the bucket");
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// 3. Keys that cannot be file names are skipped with a warning; the rest lists fine
// ---------------------------------------------------------------------------------------------

fn keys_that_cannot_be_paths_are_skipped(backend: Backend) {
    let fx = Fixture::new("badkeys", backend);
    let server = fx.server("server");
    server.create_bucket("odd");
    server.put_raw("odd", "bad//x", b"empty component\n");
    server.put_raw("odd", "bad/ok", b"ok\n");
    server.put_raw("odd", "dir/../y", b"dot-dot\n");
    server.put_raw("odd", "dir/fine.txt", b"fine\n");
    let m = fx.mount(&server, "s3://odd", "1", "a");

    let ls = |rel: &str| {
        let out = run(Command::new("ls").arg(fx.m(rel)));
        assert!(out.ok() && out.stderr.is_empty(), "ls {rel}: {out}");
        out.stdout
    };
    assert_eq!(ls(""), "bad\ndir\n");
    assert_eq!(ls("bad"), "ok\n");
    assert_eq!(ls("dir"), "fine.txt\n");
    assert_eq!(read(&fx.m("bad/ok")), b"ok\n");
    assert_eq!(read(&fx.m("dir/fine.txt")), b"fine\n");

    // One warning names each skipped key.
    let log = fs::read_to_string(&fx.log).unwrap();
    let warned =
        |key: &str| log.lines().any(|l| l.contains("WARN") && l.contains("cannot be a file name") && l.contains(key));
    assert!(warned("bad//"), "no warning about `bad//x` in the daemon log:\n{log}");
    assert!(warned("dir/../"), "no warning about `dir/../y` in the daemon log:\n{log}");

    // The folder stays usable: a new file in it goes up, and the odd objects are untouched.
    write_file(&fx.m("bad/new.txt"), b"new\n");
    m.flush();
    assert_eq!(ls("bad"), "new.txt\nok\n");
    let other = server.client("odd");
    assert_eq!(other.get("bad/new.txt").data, b"new\n");
    let listing = server.raw_keys("odd", "bad/");
    assert!(listing.iter().any(|k| k == "bad//x"), "bad//x is gone from the bucket: {listing:?}");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 4. A conflict: the bucket keeps the other client's edit, ours becomes a conflict copy
// ---------------------------------------------------------------------------------------------

/// On moto the conflict shows as a 412 to the conditional upload; on Garage, which ignores the
/// condition, through compare-then-write.
fn concurrent_edit_becomes_a_conflict_copy(backend: Backend) {
    let fx = Fixture::new("conflict", backend);
    let server = fx.server("server");
    server.create_bucket("conf");
    let other = server.client("conf");
    // A long metadata TTL: the mount does not notice the other client's write before its own.
    let m = fx.mount(&server, "s3://conf/team", "600", "a");
    let f = fx.m("f.txt");
    write_file(&f, b"ours, first version\n");
    m.flush();
    assert_eq!(other.get("team/f.txt").data, b"ours, first version\n");

    let theirs = b"theirs: written by another client\n";
    let their_etag = other.put("team/f.txt", theirs);
    let before = utc_stamp();
    let ours = b"ours, second version, longer than the first\n";
    {
        let mut h = OpenOptions::new().write(true).open(&f).unwrap();
        h.write_all(ours).unwrap();
    }
    m.flush();
    let after = utc_stamp();

    // The bucket keeps their version at the path...
    let at_path = other.get("team/f.txt");
    assert_eq!(at_path.data, theirs, "the other client's edit was overwritten");
    assert_eq!(at_path.etag, their_etag);
    // ...and ours is next to it as f.conflict-HOST-YYYYMMDD-HHMMSS.txt.
    let prefix = format!("team/f.conflict-{}-", conflict_host());
    let keys = other.keys();
    let copies: Vec<&String> = keys.iter().filter(|k| k.starts_with(&prefix)).collect();
    assert_eq!(copies.len(), 1, "expected one conflict copy `{prefix}YYYYMMDD-HHMMSS.txt`; keys: {keys:?}");
    let stamp = copies[0].strip_prefix(&prefix).unwrap().strip_suffix(".txt").unwrap_or_else(|| {
        panic!("conflict copy {} does not keep the .txt extension", copies[0]);
    });
    let well_formed = stamp.len() == 15
        && stamp.bytes().enumerate().all(|(i, b)| if i == 8 { b == b'-' } else { b.is_ascii_digit() });
    assert!(well_formed, "stamp {stamp:?} of {} is not YYYYMMDD-HHMMSS", copies[0]);
    assert!(before.as_str() <= stamp && stamp <= after.as_str(), "stamp {stamp} not within [{before}, {after}] UTC");
    assert_eq!(other.get(copies[0]).data, ours, "the conflict copy does not hold our version");
    assert_eq!(keys.iter().filter(|k| !is_marker(k)).count(), 2, "keys: {keys:?}");

    // status counts it.
    let out = run_ok(&mut m.cli("status"));
    let line = out.stdout.lines().find(|l| l.starts_with("conflicts:")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line.split_once(':').unwrap().1.trim(), "1", "status: {out}");
    assert_eq!(m.status_json()["conflicts"], 1);
    let log = fs::read_to_string(&fx.log).unwrap();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("conflict")), "no conflict warning in:\n{log}");
    // `autosync conflicts` lists it, with both versions (the path is the mount's: no prefix).
    let out = run_ok(&mut m.cli("conflicts"));
    let copy_rel = copies[0].strip_prefix("team/").unwrap();
    assert!(
        out.stdout.contains("f.txt") && out.stdout.contains("[keep-both]") && out.stdout.contains(copy_rel),
        "{out}"
    );
    let out = run_ok(m.cli("conflicts").arg("--json"));
    let recs: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(recs.as_array().map(Vec::len), Some(1), "{recs}");
    assert_eq!(recs[0]["path"], "f.txt");
    assert_eq!(recs[0]["local"]["path"], copy_rel);
    assert_eq!(recs[0]["local"]["size"], ours.len());
    assert_eq!(recs[0]["remote"]["size"], theirs.len());
    assert_eq!(recs[0]["remote"]["etag"], their_etag.as_str());

    // In the mount: their version at the path, ours as the conflict copy.
    let copy_name = copies[0].strip_prefix("team/").unwrap().to_string();
    let mut want_names = vec!["f.txt".to_string(), copy_name.clone()];
    want_names.sort();
    let want = (want_names, Some(theirs.to_vec()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = (names(&fx.mnt), fs::read(&f).ok());
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s the mount shows {:?} with f.txt = {:?}; expected {:?} with f.txt = {:?}",
            seen.0,
            seen.1.as_deref().map(String::from_utf8_lossy),
            want.0,
            String::from_utf8_lossy(theirs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(read(&fx.m(&copy_name)), ours);
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 5. Bad setups: one line on stderr, a non-zero exit, nothing mounted
// ---------------------------------------------------------------------------------------------

/// A mount that must fail: the `--endpoint`, the source, the credentials, and a part of the
/// one line it must print.
struct BadSetup<'a> {
    what: &'a str,
    endpoint: String,
    source: &'a str,
    creds: (&'a str, &'a str),
    says: &'a str,
}

fn bad_setups_fail_with_one_line_and_mount_nothing(backend: Backend) {
    let fx = Fixture::new("bad", backend);
    let server = fx.server("server");
    server.create_bucket("exists");
    // A server that checks signatures, with a bucket `guarded` and the one key pair allowed on
    // it. moto checks them only when told to: a second moto server where one IAM user is
    // allowed everything. Garage always does: the same server, with its key.
    let moto_auth;
    let (guarded, key_id, secret) = match &server {
        Server::Moto(_) => {
            let m = Moto::start(fx.root.join("moto-auth.log"));
            let (key_id, secret) = m.iam_user("alice");
            m.create_bucket("guarded");
            m.enforce_auth();
            moto_auth = Server::Moto(m);
            (&moto_auth, key_id, secret)
        }
        Server::Garage(g) => {
            server.create_bucket("guarded");
            (&server, g.key_id.clone(), g.secret.clone())
        }
        _ => unreachable!("an S3 test"),
    };
    // A port below 1024 that nothing listens on: a port picked free at run time could be
    // taken by a server another test starts meanwhile (seen: it answered 403).
    let closed = 1;

    let case = |what, endpoint, source, creds, says| BadSetup { what, endpoint, source, creds, says };
    let cases = [
        case("missing bucket", server.endpoint(), "s3://nosuchbucket/p", server.creds(), "does not exist"),
        case(
            "unreachable endpoint",
            format!("http://127.0.0.1:{closed}"),
            "s3://exists",
            server.creds(),
            "cannot reach",
        ),
        case("unknown access key", guarded.endpoint(), "s3://guarded", (KEY_ID, SECRET), "refused the credentials"),
        case(
            "wrong secret",
            guarded.endpoint(),
            "s3://guarded",
            (&key_id, "not-the-secret"),
            "refused the credentials",
        ),
    ];
    let mut failures = Vec::new();
    for (i, BadSetup { what, endpoint, source, creds, says }) in cases.iter().enumerate() {
        for daemon in [false, true] {
            let mp = fx.root.join(format!("mp{i}-{daemon}"));
            fs::create_dir(&mp).unwrap();
            let _guard = StrayGuard(mp.clone());
            let mut cmd = Command::new(BIN);
            cmd.arg("mount").arg(source).arg(&mp);
            cmd.arg("--state-dir").arg(fx.root.join(format!("s{i}-{daemon}")));
            cmd.arg("--cache-dir").arg(fx.root.join(format!("c{i}-{daemon}")));
            cmd.args(["--endpoint", endpoint, "--allow-http"]).env_remove("RUST_LOG");
            // The region from the environment here, from `--region` in `Fixture::mount`.
            s3_env(&mut cmd, creds.0, creds.1, backend.region());
            if daemon {
                cmd.arg("--daemon");
            }
            let mode = if daemon { "with --daemon" } else { "in the foreground" };
            let out = try_run(&mut cmd, Duration::from_secs(60), None)
                .unwrap_or_else(|e| panic!("{what} {mode}: the mount should have failed: {e}"));
            assert!(!out.ok(), "{what} {mode}: mount succeeded: {out}");
            assert!(!mounted(&mp), "{what} {mode}: something is mounted at {}", mp.display());
            let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() != 1 || !lines[0].starts_with("autosync: ") || !lines[0].contains(says) {
                failures
                    .push(format!("{what} {mode}: stderr is not one `autosync: ...{says}...` line:\n{}", out.stderr));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The same guarded bucket mounts with the right credentials, and takes writes.
    let m = fx.mount_with(guarded, "s3://guarded", "1", "ok", (&key_id, &secret));
    write_file(&fx.m("signed.txt"), b"written with valid credentials\n");
    m.flush();
    assert_eq!(
        guarded.client_with_keys("guarded", &key_id, &secret).get("signed.txt").data,
        b"written with valid credentials\n"
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 6. A folder of 5,000 objects: listings come in pages of at most 1,000 keys
// ---------------------------------------------------------------------------------------------

/// S3 answers a listing 1,000 keys at a time, so every listing of this folder takes five
/// pages: first through object_store, then, once a key object_store refuses is in the folder,
/// through autosync's own raw lister (`src/store/s3list.rs`) and its continuation tokens.
fn five_thousand_objects_list_across_pages(backend: Backend) {
    const N: usize = 5_000;
    let fx = Fixture::new("many", backend);
    let server = fx.server("server");
    server.create_bucket("many");
    let other = server.client("many");
    let name = |i: usize| format!("obj-{i:04}.txt");
    let body = |i: usize| format!("object number {i}\n").into_bytes();
    other.put_many((0..N).map(|i| (format!("big/{}", name(i)), body(i))));
    other.put("top.txt", b"top\n");

    let m = fx.mount(&server, "s3://many", "1", "a");
    let big = fx.m("big");
    let mut want: Vec<String> = (0..N).map(name).collect();
    assert_eq!(ls(&fx.mnt), ["big", "top.txt"]);
    assert_names(&ls(&big), &want, "ls of the folder");
    // read_dir (readdir in pages of entries, sorted here): each name once.
    assert_names(&names(&big), &want, "readdir of the folder");
    for i in [0, 999, 1000, N / 2, N - 1] {
        let p = big.join(name(i));
        let md = fs::metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        assert_eq!((md.len(), md.mode()), (body(i).len() as u64, libc::S_IFREG | 0o644), "stat {}", name(i));
        assert_eq!(read(&p), body(i), "content of {}", name(i));
    }

    // A rename, a delete and a new file in the big folder reach the bucket...
    fs::rename(big.join(name(1)), big.join("renamed.txt")).unwrap();
    fs::remove_file(big.join(name(N / 2))).unwrap();
    write_file(&big.join("zz-new.txt"), b"new in the mount\n");
    m.flush();
    want.retain(|n| *n != name(1) && *n != name(N / 2));
    want.extend(["renamed.txt".to_string(), "zz-new.txt".to_string()]);
    want.sort();
    let in_bucket: Vec<String> =
        other.keys_under("big").into_iter().map(|k| k.strip_prefix("big/").unwrap().to_string()).collect();
    assert_names(&in_bucket, &want, "keys in the bucket after a rename, a delete and a create");
    assert_eq!(other.get("big/renamed.txt").data, body(1));
    assert_names(&ls(&big), &want, "ls of the folder after a rename, a delete and a create");

    // A key object_store refuses (`big//odd`) moves the folder's listings to the raw lister.
    // The other client's changes on the first and the last page show through it.
    server.put_raw("many", "big//odd", b"an empty path component\n");
    other.delete(&format!("big/{}", name(0)));
    other.put("big/zzz-late.txt", b"late\n");
    want.retain(|n| *n != name(0));
    want.push("zzz-late.txt".to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = ls(&big);
        if seen == want || Instant::now() > deadline {
            assert_names(&seen, &want, "ls of the folder, 30 s after the other client's changes");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::read_to_string(&fx.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("cannot be a file name") && l.contains("big//")),
        "the listing did not go through the raw lister (no warning about `big//`):\n{}",
        common::tail(&fx.log, 20)
    );
    assert_names(&names(&big), &want, "readdir of the folder listed raw");
    assert_eq!(read(&big.join("zzz-late.txt")), b"late\n");
    assert_eq!(read(&big.join(name(N - 1))), body(N - 1));
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 7. A 300 MiB file goes up as a multipart upload, and reads back whole from everywhere
// ---------------------------------------------------------------------------------------------

/// Writes `size` pseudo-random bytes to `path` in 8 MiB writes and fsyncs it; returns their hash.
fn write_big(path: &Path, size: u64, seed: u64) -> blake3::Hash {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let (mut rng, mut hasher, mut left) = (Rng(seed), blake3::Hasher::new(), size);
    while left > 0 {
        let chunk = rng.bytes(left.min(8 << 20) as usize);
        hasher.update(&chunk);
        f.write_all(&chunk).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= chunk.len() as u64;
    }
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    hasher.finalize()
}

/// The size and blake3 hash of a file, read as a stream.
fn hash_file(path: &Path) -> (u64, blake3::Hash) {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(f).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (hasher.count(), hasher.finalize())
}

/// How many GETs of `/BUCKET/KEY` the server has logged (both log one line per request).
fn gets_logged(fx: &Fixture, bucket_key: &str) -> usize {
    let log = fs::read_to_string(fx.root.join("server.log")).unwrap_or_default();
    let path = format!("/{bucket_key}");
    log.lines().filter(|l| l.contains("GET /") && l.split_whitespace().any(|w| w == path)).count()
}

/// Above 32 MiB autosync uploads in 8 MiB parts: 300 MiB is 37 full parts and one of 4 MiB.
/// The mount that wrote it reads its staged copy; a mount with fresh state reads the object
/// in ranged GETs of 1 MiB, each chunk once although the kernel sends several reads at a time.
/// (moto copies the whole object for each ranged GET, so that read takes most of a minute
/// there.)
fn three_hundred_mib_file_goes_up_in_38_parts(backend: Backend) {
    const SIZE: u64 = 300 << 20;
    let fx = Fixture::new("big", backend);
    let server = fx.server("server");
    server.create_bucket("big");
    let other = server.client("big");
    let m = fx.mount(&server, "s3://big/data", "1", "a");
    let f = fx.m("big.bin");
    let want = write_big(&f, SIZE, 6);
    run_ok(Command::new("chmod").arg("600").arg(&f));
    run_ok(Command::new("touch").args(["-d", "2021-03-04 05:06:07"]).arg(&f).env("TZ", "UTC"));
    m.flush();

    // The other client reads what was written, with the attributes set in the mount. S3 gives
    // a multipart object the ETag `"HASH-PARTS"`.
    let o = other.digest("data/big.bin");
    assert_eq!((o.size, o.hash), (SIZE, want), "size and blake3 hash of the object as another client reads it");
    assert!(o.etag.trim_matches('"').ends_with("-38"), "ETag {} is not that of a 38-part upload", o.etag);
    assert_eq!(o.meta.get("mode"), Some(&(libc::S_IFREG | 0o600).to_string()), "{:?}", o.meta);
    assert_eq!(o.meta.get("mtime"), Some(&STAMP.to_string()), "{:?}", o.meta);
    assert_eq!(o.meta.get("autosync-hash"), Some(&want.to_hex().to_string()), "{:?}", o.meta);
    assert_eq!(hash_file(&f), (SIZE, want), "the file as the mount that wrote it reads it");
    m.unmount();

    let m = fx.mount(&server, "s3://big/data", "1", "b");
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.len(), md.mode(), md.mtime()), (SIZE, libc::S_IFREG | 0o600, STAMP), "stat in a fresh mount");
    let before = gets_logged(&fx, "big/data/big.bin");
    assert_eq!(hash_file(&f), (SIZE, want), "the file as a mount with fresh state reads it");
    // Every 1 MiB block comes from the bucket exactly once, in ranged GETs of runs of
    // blocks (read-ahead asks for up to 8 at a time).
    let chunks = (SIZE >> 20) as usize;
    let mut cmd = Command::new(BIN);
    cmd.args(["cache", "stats"]).arg(&m.mnt).arg("--state-dir").arg(&m.state).arg("--json");
    let out = run_ok(&mut cmd);
    let st: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(st["fetched_blocks"], chunks, "blocks fetched reading {chunks} MiB: {st}");
    assert_eq!(st["fetched_bytes"], SIZE, "{st}");
    let gets = wait_for("the server to log the reads", Duration::from_secs(10), || {
        Some(gets_logged(&fx, "big/data/big.bin") - before).filter(|&n| n >= chunks / 8)
    });
    assert!(gets <= chunks, "reading {chunks} MiB took {gets} GETs, more than one per block");
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// 8. A node of a 3-node Garage cluster dies in the middle of a workload
// ---------------------------------------------------------------------------------------------

/// Size of the `i`th file of a workload: from empty to a few MiB.
fn varied_size(i: usize) -> usize {
    const SIZES: [usize; 10] = [0, 1, 100, 4096, 65_536, 100_000, 1 << 20, 3 << 20, 5_000, 300_000];
    SIZES[i % SIZES.len()]
}

/// How the steps of a workload thread that ran after the kill went.
#[derive(Debug, Default)]
struct AfterKill {
    steps: usize,
    slowest: Duration,
}

impl AfterKill {
    fn record(&mut self, killed: &AtomicBool, started: Instant) {
        if killed.load(Ordering::SeqCst) {
            self.steps += 1;
            self.slowest = self.slowest.max(started.elapsed());
        }
    }
}

/// The longest a step of the workload may take once the node is dead: writes land in the
/// cache, reads of an object take one GET, and Garage answers with two nodes of three.
const STEP_LIMIT: Duration = Duration::from_secs(10);

/// One node of three, not the one autosync talks to, is SIGKILLed while uploads are queued and
/// in flight (normally in the middle of a 36 MiB multipart upload) and while the mount writes,
/// overwrites, renames and deletes files and reads objects it has never read. With replication
/// factor 3 a write needs two nodes of three, so the workload goes on; the flush, the checks
/// from other clients and a fresh mount all run with the node still dead.
#[test]
fn garage3_a_node_dies_in_the_middle_of_a_workload() {
    const SEEDS: usize = 60;
    const STEPS: usize = 90;
    // The writer and the reader each wait at this point of their work until the node is dead,
    // so that most of the workload runs on the degraded cluster however fast the machine is.
    const WRITER_KILL_AT: usize = 30;
    const READER_KILL_AT: usize = SEEDS / 3;

    let fx = Fixture::new("node-failure", Backend::Garage3);
    let server = fx.server("garage");
    let Server::Garage(cluster) = &server else { unreachable!("Garage3 is a Garage cluster") };
    assert_eq!(cluster.nodes().len(), 3, "a 3-node cluster");
    let (autosync_node, victim, survivor) = (&cluster.nodes()[0], &cluster.nodes()[2], &cluster.nodes()[1]);
    assert_eq!(server.endpoint(), autosync_node.endpoint(), "autosync talks to the first node");
    let victim_id = victim.id();
    server.create_bucket("quorum");
    let other = server.client("quorum");

    // Objects written by another client, which the mount has never read: reading one is a GET.
    let mut rng = Rng(71);
    let seeds: Vec<(String, Vec<u8>)> =
        (0..SEEDS).map(|j| (format!("seed/{j:03}.bin"), rng.bytes(varied_size(j + 3)))).collect();
    for (k, data) in &seeds {
        other.put(k, data);
    }
    let seed_names: Vec<String> = seeds.iter().map(|(k, _)| k.strip_prefix("seed/").unwrap().to_string()).collect();

    let m = fx.mount(&server, "s3://quorum", "1", "a");
    let killed = AtomicBool::new(false);
    let (writer_at, reader_at) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let pending_at_kill_point = std::sync::Mutex::new(None);
    let wait_for_kill =
        || wait_for("the node to be killed", Duration::from_secs(120), || killed.load(Ordering::SeqCst).then_some(()));
    let started = Instant::now();
    let (want, writes_after, reads_after, (pending_at_kill, multipart_cut), kill_time) = std::thread::scope(|s| {
        // Writes new files of varied sizes (a 36 MiB one, a multipart upload, just before the
        // kill), overwrites, renames and deletes some, reads some back.
        let writer = s.spawn(|| {
            let mut rng = Rng(72);
            let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut after = AfterKill::default();
            for i in 0..STEPS {
                if i == WRITER_KILL_AT {
                    wait_for_kill();
                }
                let t = Instant::now();
                let (key, data) = if i == WRITER_KILL_AT - 1 {
                    ("new/big.bin".to_string(), rng.bytes(36 << 20))
                } else {
                    (format!("new/{i:03}.bin"), rng.bytes(varied_size(i)))
                };
                write_file(&fx.m(&key), &data);
                want.insert(key, data);
                let earlier = |back: usize| format!("new/{:03}.bin", i - back);
                if i % 6 == 5 && want.contains_key(&earlier(3)) {
                    let data = rng.bytes(varied_size(i + 4));
                    write_file(&fx.m(&earlier(3)), &data);
                    want.insert(earlier(3), data);
                }
                if i % 9 == 8 && want.remove(&earlier(5)).is_some() {
                    fs::remove_file(fx.m(&earlier(5))).unwrap_or_else(|e| panic!("rm {}: {e}", earlier(5)));
                }
                if i % 15 == 14
                    && let Some(data) = want.remove(&earlier(2))
                {
                    let to = format!("moved/{:03}.bin", i - 2);
                    fs::create_dir_all(fx.m("moved")).unwrap();
                    fs::rename(fx.m(&earlier(2)), fx.m(&to)).unwrap_or_else(|e| panic!("mv {}: {e}", earlier(2)));
                    want.insert(to, data);
                }
                if i % 10 == 9
                    && let Some(data) = want.get(&earlier(7))
                {
                    assert!(read(&fx.m(&earlier(7))) == *data, "{} reads back wrong", earlier(7));
                }
                after.record(&killed, t);
                if i + 1 == WRITER_KILL_AT {
                    // big.bin just closed: its upload waits out the upload delay.
                    *pending_at_kill_point.lock().unwrap() = m.status_json()["pending_ops"].as_u64();
                }
                writer_at.store(i + 1, Ordering::SeqCst);
            }
            (want, after)
        });
        // Reads the other client's objects one by one, and lists their folder now and then.
        let reader = s.spawn(|| {
            let mut after = AfterKill::default();
            for (j, (k, data)) in seeds.iter().enumerate() {
                if j == READER_KILL_AT {
                    wait_for_kill();
                }
                let t = Instant::now();
                assert!(read(&fx.m(k)) == *data, "{k}: the content read in the mount differs from the object");
                if j % 10 == 0 {
                    assert_eq!(names(&fx.m("seed")), seed_names, "the listing of seed/");
                }
                after.record(&killed, t);
                reader_at.store(j + 1, Ordering::SeqCst);
            }
            after
        });

        // The kill comes once both threads are there and the multipart upload of big.bin has
        // begun, as the log of the node autosync talks to shows. What is pending is taken by
        // the writer when it gets there: uploads run in parallel, and while the reader is on
        // its way the rest may reach the bucket before the kill.
        let garage_log = || fs::read_to_string(&autosync_node.log).unwrap_or_default();
        wait_for("the workload to reach the kill point", Duration::from_secs(120), || {
            let there = writer_at.load(Ordering::SeqCst) >= WRITER_KILL_AT
                && reader_at.load(Ordering::SeqCst) >= READER_KILL_AT;
            (there || writer.is_finished() || reader.is_finished()).then_some(())
        });
        let pending = *pending_at_kill_point.lock().unwrap();
        wait_for("the multipart upload of big.bin", Duration::from_secs(120), || {
            garage_log().contains("POST /quorum/new/big.bin?uploads").then_some(())
        });
        victim.kill();
        let kill_time = started.elapsed();
        killed.store(true, Ordering::SeqCst);
        // (Reported, not asserted: a fast machine may finish the upload before the kill.)
        let multipart_cut = !garage_log().contains("POST /quorum/new/big.bin?uploadId=");
        let (want, writes_after) = writer.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        let reads_after = reader.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (want, writes_after, reads_after, (pending, multipart_cut), kill_time)
    });
    let workload_time = started.elapsed();
    // The kill came in the middle: uploads were queued at the kill point, and the rest of the
    // work came after.
    assert!(pending_at_kill.is_some_and(|n| n > 0), "no upload was pending when the node died: {pending_at_kill:?}");
    assert_eq!(writes_after.steps, STEPS - WRITER_KILL_AT, "writer steps after the kill");
    assert_eq!(reads_after.steps, SEEDS - READER_KILL_AT, "reader steps after the kill");
    for (what, a) in [("write", &writes_after), ("read", &reads_after)] {
        assert!(a.slowest < STEP_LIMIT, "a {what} step took {:?} with a node dead", a.slowest);
    }
    // Garage itself sees the node as failed.
    let status = cluster.cli(&["status"]).stdout;
    assert!(
        status.split_once("FAILED NODES").is_some_and(|(_, failed)| failed.contains(&victim_id[..16])),
        "`garage status` does not list {victim_id} as failed:\n{status}"
    );

    // Everything goes up with the node still dead.
    let t = Instant::now();
    m.flush();
    let flush_time = t.elapsed();
    let st = m.status_json();
    assert_eq!((st["pending_ops"].as_u64(), st["conflicts"].as_u64()), (Some(0), Some(0)), "status: {st}");

    // Nothing is missing and every object holds the right content, seen through the node
    // autosync talks to and through the other live node.
    let mut all = want.clone();
    all.extend(seeds.iter().cloned());
    let (key_id, secret) = server.creds();
    let via_survivor = server.client_at(&survivor.endpoint(), "quorum", key_id, secret);
    for (who, client) in [("first node", &other), ("second node", &via_survivor)] {
        let keys: BTreeSet<String> = client.keys().into_iter().filter(|k| !is_marker(k)).collect();
        assert_eq!(keys, all.keys().cloned().collect::<BTreeSet<_>>(), "keys in the bucket through the {who}");
    }
    for (k, data) in &all {
        assert!(via_survivor.data(k) == *data, "{k}: the object's content is wrong");
    }
    m.unmount();

    // A fresh mount (new state and cache dirs) sees all of it.
    let m = fx.mount(&server, "s3://quorum", "1", "b");
    for dir in ["new", "moved", "seed"] {
        let want_names: Vec<String> =
            all.keys().filter_map(|k| k.strip_prefix(&format!("{dir}/")).map(String::from)).collect();
        assert_eq!(names(&fx.m(dir)), want_names, "{dir}/ in a fresh mount");
    }
    for (k, data) in &all {
        assert!(read(&fx.m(k)) == *data, "{k} differs in a fresh mount");
    }
    m.unmount();

    // What the outage looked like from autosync's side (shown with --nocapture): nothing. No
    // request failed and none was retried (object_store logs its retries at INFO, "backing
    // off"): Garage answered every one with the two live nodes.
    let log = fs::read_to_string(&fx.log).unwrap_or_default();
    let noticed: Vec<&str> =
        log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("backing off")).collect();
    eprintln!(
        "node failure: killed after {kill_time:?} with {pending_at_kill:?} ops pending (multipart upload cut: \
         {multipart_cut}); workload {workload_time:?}; after the kill {} writer steps (slowest {:?}) and {} reads \
         (slowest {:?}); flush {flush_time:?}; {} failed or retried requests in the daemon log",
        writes_after.steps,
        writes_after.slowest,
        reads_after.steps,
        reads_after.slowest,
        noticed.len(),
    );
    assert!(noticed.is_empty(), "the daemon saw failed or retried requests:\n{}", noticed.join("\n"));
}

/// The node autosync talks to is SIGKILLed, then started again. Meanwhile the mount takes
/// writes and serves the files written here; reading other files fails with EIO after the
/// store's retries; the upload fails, is retried with backoff, and `status` says why. Once the
/// node is back, a flush puts everything in the bucket.
#[test]
fn garage3_the_node_autosync_talks_to_dies_and_comes_back() {
    let fx = Fixture::new("endpoint-failure", Backend::Garage3);
    let mut server = fx.server("garage");
    server.create_bucket("quorum");
    let other = server.client("quorum");
    let seeds: Vec<Vec<u8>> = (0..3).map(|j| Rng(80 + j).bytes(100_000)).collect();
    for (j, data) in seeds.iter().enumerate() {
        other.put(&format!("seed/{j}.bin"), data);
    }
    let m = fx.mount(&server, "s3://quorum", "1", "a");
    write_file(&fx.m("before.txt"), b"written before the outage\n");
    assert!(read(&fx.m("seed/0.bin")) == seeds[0], "seed/0.bin reads wrong");
    m.flush();

    let Server::Garage(cluster) = &mut server else { unreachable!("Garage3 is a Garage cluster") };
    let peers: Vec<String> = cluster.nodes()[1..].iter().map(|n| n.peer()).collect();
    cluster.nodes()[0].kill();

    // Writes land in the cache, and files written here read back from it, at once.
    let t = Instant::now();
    let during = b"written while the node autosync talks to is dead\n";
    write_file(&fx.m("during.txt"), during);
    assert_eq!(read(&fx.m("before.txt")), b"written before the outage\n");
    assert!(t.elapsed() < STEP_LIMIT, "writing and reading local files took {:?}", t.elapsed());
    // A file read before the outage comes from the block cache; one never read fails with
    // EIO, once the store's retries are spent.
    let t = Instant::now();
    assert!(read(&fx.m("seed/0.bin")) == seeds[0], "seed/0.bin from the cache reads wrong");
    assert!(t.elapsed() < STEP_LIMIT, "reading a cached file took {:?}", t.elapsed());
    let t = Instant::now();
    let err = fs::read(fx.m("seed/1.bin")).map(|_| ()).expect_err("reading a file from a dead endpoint");
    let eio_after = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "reading seed/1.bin: {err}");
    assert!(eio_after < Duration::from_secs(30), "a failed read took {eio_after:?}");
    // The folder still lists, from what the mount knows.
    assert_eq!(names(&fx.m("seed")), ["0.bin", "1.bin", "2.bin"]);
    // The uploader fails, says why in `status`, and keeps the change.
    let why = wait_for("the failed upload in `status`", Duration::from_secs(60), || {
        let st = m.status_json();
        st["last_error"].as_str().filter(|e| e.contains("during.txt")).map(String::from)
    });
    assert_eq!(m.status_json()["pending_ops"], 1, "the write waits in the journal");

    // The node comes back. (Garage's own peering retry takes about 15 s: connect at once.)
    let node = &mut cluster.nodes_mut()[0];
    node.restart();
    for peer in &peers {
        node.cli(&["node", "connect", peer]);
    }
    let t = Instant::now();
    m.flush();
    let flush_time = t.elapsed();
    assert_eq!(other.data("during.txt"), during);
    assert_eq!(other.data("before.txt"), b"written before the outage\n");
    assert!(read(&fx.m("seed/1.bin")) == seeds[1], "seed/1.bin reads wrong after the outage");
    let st = m.status_json();
    assert_eq!((st["pending_ops"].as_u64(), st["last_error"].as_str()), (Some(0), None), "status: {st}");
    m.unmount();

    // The daemon's log shows the failed upload and the store's retries.
    let log = fs::read_to_string(&fx.log).unwrap_or_default();
    let failed = log.lines().filter(|l| l.contains(" ERROR ") && l.contains("upload failed, will retry")).count();
    let retries = log.lines().filter(|l| l.contains("backing off")).count();
    assert!(failed > 0, "no `upload failed, will retry` in the daemon log:\n{}", tail(&fx.log, 30));
    assert!(retries > 0, "no retry of the store in the daemon log:\n{}", tail(&fx.log, 30));
    eprintln!(
        "endpoint failure: EIO after {eio_after:?}; status said: {why}; {failed} failed uploads and {retries} \
         retried requests logged; flush after the restart {flush_time:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Other tools read what autosync writes, and the reverse: rclone and s3fs
// ---------------------------------------------------------------------------------------------

/// `name` from `$VAR` or `PATH`, or a one-line failure saying how to install it.
fn tool(var: &str, name: &str) -> PathBuf {
    let install = format!("install it with `apt-get install {name}` (or run `bash .ci/run`), or set {var} to its path");
    find_exe(var, &[], name, &install).unwrap_or_else(|| panic!("{name} not found (not in {var} or PATH): {install}"))
}

/// `rclone ARGS...` with the remote `other:` pointing at `server` (set up through the
/// environment, over an empty config file), which must succeed. Times print in UTC.
fn rclone(fx: &Fixture, server: &Server, args: &[&dyn AsRef<OsStr>]) -> common::Out {
    let conf = fx.root.join("rclone.conf");
    if !conf.exists() {
        fs::write(&conf, "").unwrap();
    }
    let mut cmd = Command::new(tool("AUTOSYNC_RCLONE", "rclone"));
    cmd.arg("--config").arg(&conf).args(args.iter().map(|a| a.as_ref()));
    let (key_id, secret) = server.creds();
    s3_env(&mut cmd, key_id, secret, server.region());
    for (k, v) in [
        ("TYPE", "s3"),
        ("PROVIDER", "Other"),
        ("ENDPOINT", &server.endpoint()),
        ("ACCESS_KEY_ID", key_id),
        ("SECRET_ACCESS_KEY", secret),
        ("REGION", server.region()),
        ("FORCE_PATH_STYLE", "true"),
        ("NO_CHECK_BUCKET", "true"),
    ] {
        cmd.env(format!("RCLONE_CONFIG_OTHER_{k}"), v);
    }
    run_ok(cmd.env("TZ", "UTC"))
}

/// s3fs mounting a bucket of `server` at `s3fs-mnt` in the test dir, run in the foreground as
/// a child (logging to `s3fs.log`). Dropping it unmounts and stops it, even when the test fails.
struct S3fs {
    child: std::process::Child,
    mnt: PathBuf,
}

impl S3fs {
    fn mount(fx: &Fixture, server: &Server, bucket: &str) -> S3fs {
        Self::mount_opts(fx, server, bucket, "")
    }

    /// With more `-o` options (`,`-separated, each starting with `,`).
    fn mount_opts(fx: &Fixture, server: &Server, bucket: &str, more: &str) -> S3fs {
        let exe = tool("AUTOSYNC_S3FS", "s3fs");
        let mnt = fx.root.join("s3fs-mnt");
        fs::create_dir(&mnt).unwrap();
        let (key_id, secret) = server.creds();
        let passwd = fx.root.join("s3fs.passwd");
        fs::write(&passwd, format!("{key_id}:{secret}\n")).unwrap();
        fs::set_permissions(&passwd, fs::Permissions::from_mode(0o600)).unwrap();
        let log_path = fx.root.join("s3fs.log");
        let log = fs::File::create(&log_path).unwrap();
        let opts = format!(
            "url={},use_path_request_style,endpoint={},passwd_file={}{more}",
            server.endpoint(),
            server.region(),
            passwd.display()
        );
        let mut cmd = Command::new(&exe);
        cmd.arg(bucket).arg(&mnt).args(["-f", "-o", &opts]);
        s3_env(&mut cmd, key_id, secret, server.region());
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut s3fs = S3fs { child, mnt };
        wait_for("s3fs to mount the bucket", Duration::from_secs(30), || {
            if let Ok(Some(status)) = s3fs.child.try_wait() {
                panic!("s3fs exited ({status}) instead of mounting; its log:\n{}", common::tail(&log_path, 20));
            }
            mounted(&s3fs.mnt).then_some(())
        });
        s3fs
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        for flags in [&[][..], &["-l"][..]] {
            if mounted(&self.mnt) {
                let _ = try_run(Command::new("umount").args(flags).arg(&self.mnt), Duration::from_secs(20), None);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("a clock after 1970").as_secs()
}

/// (type and permission bits, uid, gid, mtime in seconds, size): what both tools must agree on.
fn attrs(path: &Path) -> (u32, u32, u32, i64, u64) {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    (md.mode(), md.uid(), md.gid(), md.mtime(), md.len())
}

/// autosync stores mode, uid, gid and mtime under the metadata names s3fs uses (and rclone
/// shows): each tool reads what the other wrote.
fn attributes_interoperate_with_rclone_and_s3fs(backend: Backend) {
    // Missing tools fail the test before anything starts.
    tool("AUTOSYNC_RCLONE", "rclone");
    tool("AUTOSYNC_S3FS", "s3fs");
    let fx = Fixture::new("interop", backend);
    let server = fx.server("server");
    server.create_bucket("interop");
    let m = fx.mount(&server, "s3://interop", "0.5", "a");

    let data = Rng(3).bytes(100_000);
    write_file(&fx.m("hello.txt"), b"hello from autosync\n");
    write_file(&fx.m("dir/data.bin"), &data);
    std::os::unix::fs::symlink("dir/data.bin", fx.m("link")).unwrap();
    run_ok(Command::new("chmod").arg("640").arg(fx.m("hello.txt")));
    run_ok(Command::new("chown").arg("1234:5678").arg(fx.m("hello.txt")));
    run_ok(Command::new("touch").args(["-d", "2021-03-04 05:06:07"]).arg(fx.m("hello.txt")).env("TZ", "UTC"));
    run_ok(Command::new("chmod").arg("600").arg(fx.m("dir/data.bin")));
    m.flush();
    let files = ["hello.txt", "dir/data.bin", "link"];
    let ours: BTreeMap<&str, _> = files.iter().map(|&f| (f, attrs(&fx.m(f)))).collect();
    assert_eq!(ours["hello.txt"], (libc::S_IFREG | 0o640, 1234, 5678, STAMP, 20), "hello.txt in autosync");

    // rclone: the sizes and mtimes autosync set, and the attributes as metadata.
    let out = rclone(&fx, &server, &[&"lsjson", &"-R", &"--metadata", &"--files-only", &"other:interop"]);
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("rclone lsjson is not JSON ({e}): {out}"));
    let by_path: BTreeMap<&str, &serde_json::Value> =
        listed.iter().map(|e| (e["Path"].as_str().unwrap_or_default(), e)).collect();
    let paths: Vec<&str> = by_path.keys().copied().collect();
    assert_eq!(paths, ["dir/.autosync-folder", "dir/data.bin", "hello.txt", "link"], "rclone lsjson: {out}");
    for f in files {
        let (e, (mode, uid, gid, mtime, size)) = (by_path[f], ours[f]);
        let mod_time = e["ModTime"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let seen = (e["Size"].as_u64(), mod_time.map(|t| t.timestamp()));
        assert_eq!(seen, (Some(size), Some(mtime)), "{f}: size and mtime in rclone lsjson: {e}");
        let meta = |k: &str| e["Metadata"][k].as_str().map(str::to_string);
        let seen = (meta("mode"), meta("uid"), meta("gid"));
        let want = (Some(mode.to_string()), Some(uid.to_string()), Some(gid.to_string()));
        assert_eq!(seen, want, "{f}: mode, uid and gid in rclone's metadata: {e}");
    }
    assert_eq!(rclone(&fx, &server, &[&"cat", &"other:interop/hello.txt"]).stdout, "hello from autosync\n");

    // s3fs: the same files, with the same type, mode, owner, mtime, size and content.
    let s3fs = S3fs::mount(&fx, &server, "interop");
    assert_eq!(names(&s3fs.mnt), ["dir", "hello.txt", "link"]);
    assert_eq!(names(&s3fs.m("dir")), [".autosync-folder", "data.bin"]);
    for f in files {
        assert_eq!(attrs(&s3fs.m(f)), ours[f], "{f}: (mode, uid, gid, mtime, size) in s3fs vs autosync");
    }
    assert_eq!(read(&s3fs.m("hello.txt")), b"hello from autosync\n");
    assert!(read(&s3fs.m("dir/data.bin")) == data, "dir/data.bin differs in s3fs");
    assert_eq!(fs::read_link(s3fs.m("link")).unwrap(), Path::new("dir/data.bin"));

    // The other way round: a file and a symlink written through s3fs, and a file copied by
    // rclone (whose mtime has nanoseconds), appear in autosync with their attributes.
    write_file(&s3fs.m("from-s3fs.txt"), b"written through s3fs\n");
    run_ok(Command::new("chmod").arg("604").arg(s3fs.m("from-s3fs.txt")));
    run_ok(Command::new("chown").arg("4321:8765").arg(s3fs.m("from-s3fs.txt")));
    run_ok(Command::new("touch").args(["-d", "2020-01-02 03:04:05"]).arg(s3fs.m("from-s3fs.txt")).env("TZ", "UTC"));
    std::os::unix::fs::symlink("from-s3fs.txt", s3fs.m("s3fs-link")).unwrap();
    let local = fx.root.join("local.txt");
    write_file(&local, b"copied by rclone\n");
    run_ok(Command::new("touch").args(["-d", "2019-05-06 07:08:09.123456789"]).arg(&local).env("TZ", "UTC"));
    rclone(&fx, &server, &[&"copyto", &local, &"other:interop/from-rclone.txt"]);
    wait_for("the files from s3fs and rclone in autosync", Duration::from_secs(20), || {
        ["from-s3fs.txt", "s3fs-link", "from-rclone.txt"]
            .iter()
            .all(|f| fx.m(f).symlink_metadata().is_ok())
            .then_some(())
    });
    assert_eq!(attrs(&fx.m("from-s3fs.txt")), (libc::S_IFREG | 0o604, 4321, 8765, 1_577_934_245, 21));
    assert_eq!(read(&fx.m("from-s3fs.txt")), b"written through s3fs\n");
    assert_eq!(fs::read_link(fx.m("s3fs-link")).unwrap(), Path::new("from-s3fs.txt"));
    let rc = attrs(&fx.m("from-rclone.txt"));
    assert_eq!((rc.0, rc.3, rc.4), (libc::S_IFREG | 0o644, 1_557_126_489, 17), "from-rclone.txt: mode, mtime, size");
    assert_eq!(read(&fx.m("from-rclone.txt")), b"copied by rclone\n");

    // A later chmod through s3fs (a copy onto itself with new metadata, same ETag) shows in
    // autosync too, through the object's Last-Modified. That counts whole seconds: the chmod
    // starts in a later second than the writes above.
    let second = unix_seconds();
    wait_for("the next second", Duration::from_secs(2), || (unix_seconds() > second).then_some(()));
    run_ok(Command::new("chmod").arg("640").arg(s3fs.m("from-s3fs.txt")));
    wait_for("the chmod made through s3fs in autosync", Duration::from_secs(20), || {
        (attrs(&fx.m("from-s3fs.txt")).0 == libc::S_IFREG | 0o640).then_some(())
    });
    drop(s3fs);
    m.unmount();
    assert_no_warnings(&fx);
}

/// Extended attributes in s3fs's `use_xattr` layout: what `setfattr` sets in autosync,
/// s3fs mounted with `-o use_xattr` reads, and the reverse.
fn xattrs_interoperate_with_s3fs(backend: Backend) {
    tool("AUTOSYNC_S3FS", "s3fs");
    let fx = Fixture::new("xinterop", backend);
    let server = fx.server("server");
    server.create_bucket("xinterop");
    let m = fx.mount(&server, "s3://xinterop", "0.5", "a");
    write_file(&fx.m("f.txt"), b"attributes\n");
    xattr::set(fx.m("f.txt"), "user.from_autosync", &[0, 1, 2, 255]).unwrap();
    xattr::set(fx.m("f.txt"), "user.note", b"hello").unwrap();
    m.flush();

    let s3fs = S3fs::mount_opts(&fx, &server, "xinterop", ",use_xattr");
    let f = s3fs.m("f.txt");
    assert_eq!(xattr::get(&f, "user.from_autosync").unwrap(), Some(vec![0, 1, 2, 255]), "in s3fs");
    assert_eq!(xattr::get(&f, "user.note").unwrap().as_deref(), Some(&b"hello"[..]), "in s3fs");
    // Set through s3fs (a copy of the object onto itself with the new metadata), in a later
    // second than the upload, so the new Last-Modified shows it to autosync.
    let second = unix_seconds();
    wait_for("the next second", Duration::from_secs(2), || (unix_seconds() > second).then_some(()));
    xattr::set(&f, "user.from_s3fs", b"s3fs was here").unwrap();
    wait_for("the attribute set through s3fs in autosync", Duration::from_secs(20), || {
        xattr::get(fx.m("f.txt"), "user.from_s3fs").ok().flatten()
    });
    assert_eq!(xattr::get(fx.m("f.txt"), "user.from_s3fs").unwrap().as_deref(), Some(&b"s3fs was here"[..]));
    assert_eq!(xattr::get(fx.m("f.txt"), "user.note").unwrap().as_deref(), Some(&b"hello"[..]));
    drop(s3fs);
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// 10. ETags without quotes: conditional writes and compare-then-write still tell edits apart
// ---------------------------------------------------------------------------------------------

/// S3 quotes its ETags (`"abc"`); some S3-compatible servers do not. A proxy between the mount
/// and the server takes the quotes off the ETags it answers: everywhere (a server that never
/// quotes: the mount only sees bare ones, and sends them back bare in `If-Match`), then only in
/// listings (a server whose listings and headers disagree). A normal edit of a file listed
/// from the bucket, and of one written here, goes up; a concurrent edit still becomes a
/// conflict copy (a 412 on moto, compare-then-write on Garage).
fn unquoted_etags_still_tell_edits_from_conflicts(backend: Backend) {
    let fx = Fixture::new("unquoted", backend);
    let server = fx.server("server");
    server.create_bucket("unq");
    for (mode, prefix) in [(Unquote::Everywhere, "everywhere"), (Unquote::InXmlOnly, "xml-only")] {
        edit_then_conflict_through_proxy(&fx, &server, mode, prefix);
    }
    // The conflicts are the only things worth a warning.
    let log = fs::read_to_string(&fx.log).unwrap_or_default();
    let bad: Vec<&str> =
        log.lines().filter(|l| (l.contains(" WARN ") && !l.contains("conflict")) || l.contains(" ERROR ")).collect();
    assert!(bad.is_empty(), "the daemon logged warnings or errors:\n{}", bad.join("\n"));
}

fn edit_then_conflict_through_proxy(fx: &Fixture, server: &Server, mode: Unquote, prefix: &str) {
    let other = server.client("unq");
    other.put(&format!("{prefix}/listed.txt"), b"theirs, before the mount\n");
    let proxy = UnquotingProxy::start(server.port(), mode);
    let m = fx.mount_via(server, &proxy.endpoint(), &format!("s3://unq/{prefix}"), "600", prefix);
    let status = m.status_json();
    let probed = (status["conditional_create"].as_bool(), status["conditional_update"].as_bool());
    let (create, update) = server.backend().conditional_writes();
    assert_eq!(probed, (Some(create), Some(update)), "{mode:?}: the probe through the proxy: {status}");

    // A file known from a listing: read it, then edit it.
    assert_eq!(read(&fx.m("listed.txt")), b"theirs, before the mount\n");
    append(&fx.m("listed.txt"), b"ours, appended\n");
    // A file written here, then edited again: its ETag came from the PUT's answer.
    write_file(&fx.m("f.txt"), b"ours, first version\n");
    m.flush();
    write_file(&fx.m("f.txt"), b"ours, second version\n");
    m.flush();
    let key = |name: &str| format!("{prefix}/{name}");
    assert_eq!(other.get(&key("listed.txt")).data, b"theirs, before the mount\nours, appended\n", "{mode:?}");
    assert_eq!(other.get(&key("f.txt")).data, b"ours, second version\n", "{mode:?}");
    assert_eq!(m.status_json()["conflicts"], 0, "{mode:?}: a normal edit was taken for a conflict");
    let (in_headers, in_xml) = proxy.unquoted();
    let headers_expected = mode == Unquote::Everywhere;
    assert!(
        (in_headers > 0) == headers_expected && in_xml > 0,
        "{mode:?}: the proxy unquoted {in_headers} ETag headers and {in_xml} in XML"
    );

    // Another client replaces f.txt; our next edit must not overwrite it.
    let theirs = b"theirs: written by another client\n";
    let their_etag = other.put(&key("f.txt"), theirs);
    append(&fx.m("f.txt"), b"ours, third version\n");
    m.flush();
    let at_path = other.get(&key("f.txt"));
    assert_eq!((&at_path.data[..], &at_path.etag), (&theirs[..], &their_etag), "{mode:?}: their edit was overwritten");
    let copy_prefix = format!("{prefix}/f.conflict-{}-", conflict_host());
    let keys = other.keys();
    let copies: Vec<&String> = keys.iter().filter(|k| k.starts_with(&copy_prefix)).collect();
    assert_eq!(copies.len(), 1, "{mode:?}: expected one conflict copy `{copy_prefix}...`; keys: {keys:?}");
    assert_eq!(other.get(copies[0]).data, b"ours, second version\nours, third version\n", "{mode:?}");
    assert_eq!(m.status_json()["conflicts"], 1, "{mode:?}");
    m.unmount();
}

fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(data).unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// parts copied by the bucket
// ---------------------------------------------------------------------------------------------

/// UploadPartCopy as autosync sends it (`store/s3parts.rs`): a range of an object copied
/// into a multipart upload beside a part sent makes exactly those bytes. A copy held to an
/// ETag the source no longer has is refused by Garage (as by AWS S3); moto copies the newer
/// bytes, which is why the uploader checks the source again once its copies are done.
fn parts_copied_by_the_bucket_are_held_to_the_source_version(backend: Backend) {
    use autosync::store::s3parts::S3Parts;
    use autosync::store::s3raw::RawS3;
    use object_store::aws::AmazonS3Builder;
    use object_store::{Attributes, ObjectStoreExt, PutPayload, path::Path as Key};
    let fx = Fixture::new("copyparts", backend);
    let server = fx.server("server");
    server.create_bucket("bkt");
    let (key_id, secret) = server.creds();
    let b = AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_bucket_name("bkt")
        .with_region(server.region())
        .with_access_key_id(key_id)
        .with_secret_access_key(secret);
    let s3 = std::sync::Arc::new(b.clone().build().unwrap());
    let parts =
        S3Parts::new(std::sync::Arc::clone(&s3), RawS3::new(&b, std::sync::Arc::clone(s3.credentials())).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let src = Rng(9).bytes(12 << 20);
        let etag = s3.put(&Key::from("odd key/src+1"), src.clone().into()).await.unwrap().e_tag.unwrap();
        let dest = Key::from("dest");
        let range = 1_000..(6 << 20) + 1_000;
        let id = parts.create(&dest, Attributes::new()).await.unwrap();
        let p0 = parts.copy_part(&dest, &id, 0, "odd key/src+1", range.clone(), Some(&etag)).await.unwrap();
        let p1 = parts.put_part(&dest, &id, 1, PutPayload::from_static(b"tail")).await.unwrap();
        parts.complete(&dest, &id, vec![p0, p1]).await.unwrap();
        let got = s3.get(&dest).await.unwrap().bytes().await.unwrap();
        let mut want = src[range.start as usize..range.end as usize].to_vec();
        want.extend_from_slice(b"tail");
        assert!(got == want, "the copied range and the part sent");
        // The source changes: a copy held to its old ETag is refused.
        s3.put(&Key::from("odd key/src+1"), Rng(10).bytes(12 << 20).into()).await.unwrap();
        let id = parts.create(&dest, Attributes::new()).await.unwrap();
        let copied = parts.copy_part(&dest, &id, 0, "odd key/src+1", 0..(6 << 20), Some(&etag)).await;
        match backend {
            Backend::Moto => assert!(copied.is_ok(), "moto now honours x-amz-copy-source-if-match: {copied:?}"),
            _ => assert!(matches!(copied, Err(object_store::Error::Precondition { .. })), "{copied:?}"),
        }
        parts.abort(&dest, &id).await.unwrap();
        // A source that is gone is `NotFound`.
        let id = parts.create(&dest, Attributes::new()).await.unwrap();
        let e = parts.copy_part(&dest, &id, 0, "gone", 0..10, None).await.unwrap_err();
        assert!(matches!(e, object_store::Error::NotFound { .. }), "{e}");
        parts.abort(&dest, &id).await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// Every test against every server
// ---------------------------------------------------------------------------------------------

/// For each test function `f(Backend)`, the tests `moto::f` and `garage::f`.
macro_rules! against_every_backend {
    ($($test:ident),* $(,)?) => {
        mod moto {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::Moto)
            })*
        }
        mod garage {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::Garage)
            })*
        }
    };
}

against_every_backend!(
    round_trip_under_a_prefix,
    objects_from_another_client_appear_with_their_names,
    keys_that_cannot_be_paths_are_skipped,
    concurrent_edit_becomes_a_conflict_copy,
    bad_setups_fail_with_one_line_and_mount_nothing,
    three_hundred_mib_file_goes_up_in_38_parts,
    five_thousand_objects_list_across_pages,
    attributes_interoperate_with_rclone_and_s3fs,
    xattrs_interoperate_with_s3fs,
    unquoted_etags_still_tell_edits_from_conflicts,
    parts_copied_by_the_bucket_are_held_to_the_source_version,
);
