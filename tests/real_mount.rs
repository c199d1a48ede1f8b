//! Real-mount integration tests: the built `autosync` binary mounts a bucket through FUSE and
//! ordinary programs (cp, diff, git, sqlite3, mv, chmod...) work in it. Every test runs once
//! against each backend ([`Backend`]: a local folder, moto's S3 server, Garage as a single node
//! and as a 3-node cluster with replication factor 3), as `local::NAME`, `moto::NAME`,
//! `garage::NAME`, `garage3::NAME`; a second client (object_store) checks the bucket from
//! outside.
//!
//! Every test has its own temp dir holding the server's data and log (or the bucket folder),
//! the mount point, the state and cache dirs and the daemon's log (`daemon.log`). A failing test keeps its temp dir and prints
//! where it is. Mounts are always taken down, even by a failing test: `Mount`'s `Drop` runs
//! `autosync unmount`, falls back to `umount -l`, and kills the daemon it started as a last
//! resort. Nothing waits by sleeping: conditions are polled with a deadline.
//!
//! Set `AUTOSYNC_TEST_LOG` (e.g. `debug`) to change the daemons' `RUST_LOG` (default `info`).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fixture::{Fixture, METADATA_TTL};
use common::servers::{Backend, Other, Server};
use common::{
    BIN, Mount, MountSpec, Rng, STAMP, StrayGuard, TestDir, Tier, UPLOAD_DELAY, mounted, read, run, run_ok, try_run,
    wait_for, write_file,
};

static TIER: Tier = Tier::real_mount("autosync-");

fn sh(prog: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(prog);
    for a in args {
        c.arg(a.as_ref());
    }
    c
}

impl Mount {
    /// SIGKILLs the daemon, leaving its dead mount behind.
    fn kill9(mut self) {
        self.live = false;
        let pid = self.pid;
        common::sigkill(pid);
        wait_for("the killed daemon to die", Duration::from_secs(10), || (!common::alive(pid)).then_some(()));
    }
}

fn hash_file(path: &Path) -> blake3::Hash {
    blake3::hash(&read(path))
}

fn assert_gone(path: &Path) {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("{} should not exist, but stat fails with {e} instead of ENOENT", path.display()),
        Ok(_) => panic!("{} should not exist, but it does", path.display()),
    }
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Relative paths of everything under `root` (not following symlinks), sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                go(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

/// Keys that are autosync's own (folder markers, probes).
fn is_reserved(key: &str) -> bool {
    key.rsplit('/').next().is_some_and(|n| n.starts_with(".autosync-"))
}

/// The keys under the folder `prefix`, without autosync's own.
fn user_keys(bucket: &Other, prefix: &str) -> Vec<String> {
    bucket.keys_under(prefix).into_iter().filter(|k| !is_reserved(k)).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. cp -r of a tree, diff -r against the mount and the bucket folder
// ---------------------------------------------------------------------------------------------

/// A tree with nested folders, 300 small text files, binary files of a few sizes, an empty
/// file, an empty folder, odd names and two symlinks.
fn make_tree(root: &Path) {
    let mut rng = Rng(1);
    let dirs = ["", "a", "a/b", "a/b/c", "d", "d/deeper/still"];
    for i in 0..300usize {
        let dir = dirs[i % dirs.len()];
        let body = format!("line {i} of a small text file\n").repeat(i % 23 + 1);
        write_file(&root.join(dir).join(format!("file-{i:03}.txt")), body.as_bytes());
    }
    for (name, len) in [("bin/small.bin", 4097), ("bin/one-mib-plus.bin", (1 << 20) + 123), ("bin/big.bin", 5 << 19)] {
        write_file(&root.join(name), &rng.bytes(len));
    }
    write_file(&root.join("empty-file"), b"");
    write_file(&root.join("with space.txt"), b"spaces in names\n");
    write_file(&root.join("ünïcödé ñame.txt"), "non-ascii name\n".as_bytes());
    fs::create_dir_all(root.join("e/empty-dir")).unwrap();
    std::os::unix::fs::symlink("a/file-001.txt", root.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink("../../d", root.join("a/b/link-to-dir")).unwrap();
}

fn cp_tree_then_diff_mount_and_bucket(backend: Backend) {
    let fx = Fixture::new(&TIER, "cp", backend);
    let src = fx.root.join("src");
    make_tree(&src);
    let m = fx.mount();

    run_ok(sh("cp", &[&"-r", &src, &fx.mnt]));
    let in_mount = fx.m("src");
    let out = run(sh("diff", &[&"-r", &"--no-dereference", &src, &in_mount]));
    assert!(out.ok() && out.stdout.is_empty(), "source and mount differ: {out}");
    assert_eq!(fs::read_link(in_mount.join("link-to-file")).unwrap(), Path::new("a/file-001.txt"));

    m.flush();
    // Every regular file and symlink is an object at the same relative path, same bytes, and
    // every folder holds some key.
    let keys = fx.bucket.keys_under("src");
    let src_entries = walk(&src);
    for rel in &src_entries {
        let s = src.join(rel);
        let key = format!("src/{}", rel.display());
        let md = fs::symlink_metadata(&s).unwrap();
        if md.is_file() {
            assert!(keys.contains(&key), "{key} missing from the bucket");
            assert!(read(&s) == fx.bucket.data(&key), "object {key} differs from {}", s.display());
        } else if md.is_dir() {
            assert!(keys.iter().any(|k| k.starts_with(&format!("{key}/"))), "no key under folder {key} in the bucket");
        } else {
            assert_eq!(fx.bucket.data(&key), fs::read_link(&s).unwrap().as_os_str().as_bytes(), "symlink {key}");
        }
    }
    // ...and nothing else, apart from autosync's folder markers.
    for key in &keys {
        let rel = key.strip_prefix("src/").unwrap();
        assert!(is_reserved(key) || src_entries.contains(&PathBuf::from(rel)), "unexpected {key} in the bucket");
    }
    assert!(keys.contains("src/e/empty-dir/.autosync-folder"), "the empty folder has no .autosync-folder marker");
    m.unmount();

    // A mount with fresh state and cache (another machine) sees the same tree.
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    let out = run(sh("diff", &[&"-r", &"--no-dereference", &src, &in_mount]));
    assert!(out.ok() && out.stdout.is_empty(), "source and a fresh mount of the bucket differ: {out}");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 2. git clone, status, log, commit
// ---------------------------------------------------------------------------------------------

fn git(fx: &Fixture, dir: &Path) -> Command {
    let home = fx.root.join("home");
    fs::create_dir_all(&home).unwrap();
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    c
}

fn git_clone_status_log_commit(backend: Backend) {
    let fx = Fixture::new(&TIER, "git", backend);
    let origin = fx.root.join("origin");
    fs::create_dir(&origin).unwrap();
    run_ok(git(&fx, &origin).args(["init", "-q", "-b", "main"]));
    for i in 0..3 {
        write_file(&origin.join("README"), format!("version {i}\n").as_bytes());
        write_file(&origin.join(format!("src/mod{i}.rs")), format!("pub fn f{i}() -> u32 {{ {i} }}\n").as_bytes());
        write_file(&origin.join("data/blob.bin"), &Rng(i).bytes(50_000));
        run_ok(git(&fx, &origin).args(["add", "-A"]));
        run_ok(git(&fx, &origin).args(["commit", "-q", "-m", &format!("commit {i}")]));
    }

    let m = fx.mount();
    let clone = fx.m("clone");
    run_ok(git(&fx, &fx.mnt).arg("clone").arg("-q").arg(&origin).arg(&clone));
    let st = run_ok(git(&fx, &clone).args(["status", "--porcelain"]));
    assert_eq!(st.stdout, "", "a fresh clone in the mount is not clean");
    let log = run_ok(git(&fx, &clone).args(["log", "--format=%s"]));
    assert_eq!(log.stdout, "commit 2\ncommit 1\ncommit 0\n");
    run_ok(git(&fx, &clone).args(["fsck", "--full", "--no-progress"]));

    write_file(&clone.join("README"), b"changed in the mount\n");
    write_file(&clone.join("src/new.rs"), b"// new file\n");
    fs::remove_file(clone.join("src/mod0.rs")).unwrap();
    run_ok(git(&fx, &clone).args(["add", "-A"]));
    run_ok(git(&fx, &clone).args(["commit", "-q", "-m", "commit in the mount"]));
    let st = run_ok(git(&fx, &clone).args(["status", "--porcelain"]));
    assert_eq!(st.stdout, "", "not clean after a commit in the mount");
    let log = run_ok(git(&fx, &clone).args(["log", "--format=%s"]));
    assert_eq!(log.stdout, "commit in the mount\ncommit 2\ncommit 1\ncommit 0\n");
    let show = run_ok(git(&fx, &clone).args(["show", "--name-status", "--format=", "HEAD"]));
    assert_eq!(show.stdout, "M\tREADME\nD\tsrc/mod0.rs\nA\tsrc/new.rs\n");
    m.unmount();

    // After a remount the repository is intact and still clean.
    let m = fx.mount();
    let st = run_ok(git(&fx, &clone).args(["status", "--porcelain"]));
    assert_eq!(st.stdout, "", "not clean after a remount");
    let log = run_ok(git(&fx, &clone).args(["log", "--format=%s"]));
    assert_eq!(log.stdout, "commit in the mount\ncommit 2\ncommit 1\ncommit 0\n");
    run_ok(git(&fx, &clone).args(["fsck", "--full", "--no-progress"]));
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 3. sqlite3
// ---------------------------------------------------------------------------------------------

fn sqlite(db: &Path, sql: &str) -> String {
    run_ok(Command::new("sqlite3").arg(db).arg(sql)).stdout.trim_end().to_string()
}

fn sqlite_database_in_the_mount(backend: Backend) {
    let fx = Fixture::new(&TIER, "sqlite", backend);
    let m = fx.mount();
    let db = fx.m("app.db");
    let mut sql = String::from("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, s TEXT);\nBEGIN;\n");
    for i in 1..=1000 {
        sql.push_str(&format!("INSERT INTO t(v, s) VALUES ({i}, 'row number {i}');\n"));
    }
    sql.push_str("COMMIT;\n");
    sqlite(&db, &sql);
    let query = "SELECT count(*), sum(v), max(s) FROM t;";
    let expected = "1000|500500|row number 999";
    assert_eq!(sqlite(&db, query), expected);
    assert_eq!(sqlite(&db, "PRAGMA integrity_check;"), "ok");

    m.flush();
    // The bucket holds a plain, valid database file.
    let in_bucket = fx.root.join("from-bucket.db");
    fs::write(&in_bucket, fx.bucket.data("app.db")).unwrap();
    assert_eq!(sqlite(&in_bucket, &format!("PRAGMA query_only=1; {query}")), expected);
    m.unmount();

    let m = fx.mount();
    assert_eq!(sqlite(&db, query), expected, "different result after unmount + remount");
    assert_eq!(sqlite(&db, "PRAGMA integrity_check;"), "ok");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 4. random writes into a 64 MiB file
// ---------------------------------------------------------------------------------------------

fn random_writes_into_a_64_mib_file(backend: Backend) {
    let fx = Fixture::new(&TIER, "pwrite", backend);
    let m = fx.mount();
    let path = fx.m("big.bin");
    let mut rng = Rng(4);
    let mut expected = rng.bytes(64 << 20);
    write_file(&path, &expected);

    let f = OpenOptions::new().write(true).open(&path).unwrap();
    for i in 0..200 {
        let len = 1 + rng.below(64 << 10) as usize;
        // The last write runs past the end and grows the file.
        let off = if i == 199 { expected.len() - 100 } else { rng.below((expected.len() - len) as u64 + 1) as usize };
        let data = rng.bytes(len);
        f.write_all_at(&data, off as u64).unwrap_or_else(|e| panic!("pwrite of {len} bytes at {off}: {e}"));
        if off + len > expected.len() {
            expected.resize(off + len, 0);
        }
        expected[off..off + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    drop(f);
    let want = blake3::hash(&expected);
    assert_eq!(fs::metadata(&path).unwrap().len(), expected.len() as u64);
    assert_eq!(hash_file(&path), want, "the mount file differs from the expected buffer");

    m.flush();
    let object = fx.bucket.data("big.bin");
    assert_eq!(object.len(), expected.len());
    assert_eq!(blake3::hash(&object), want, "the object differs from the expected buffer");
    m.unmount();

    let m = fx.mount();
    assert_eq!(hash_file(&path), want, "the mount file differs after unmount + remount");
    m.unmount();

    // Read back from the bucket alone (fresh state and cache).
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    assert_eq!(hash_file(&path), want, "the file differs in a fresh mount of the bucket");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 4b. edits of a big file already in the bucket
// ---------------------------------------------------------------------------------------------

fn status_json(m: &Mount) -> serde_json::Value {
    serde_json::from_str(&run_ok(m.cli("status").arg("--json")).stdout).expect("status JSON")
}

/// A 40 MiB file that another tool put into the bucket, edited through the mount: an append
/// (`>>`), writes into it, a truncate. None of it is downloaded whole: the local copy holds
/// the blocks written, and on S3 the bucket copies the unchanged ranges into the upload.
fn edits_of_a_big_file_already_in_the_bucket(backend: Backend) {
    let fx = Fixture::new(&TIER, "overbase", backend);
    let mut rng = Rng(14);
    let mut expected = rng.bytes((40 << 20) + 12_345);
    fx.bucket.put("big.log", &expected);
    // Uploads wait for the flush: one upload of all the edits, whose parts are known.
    let m = fx.mount_with(&fx.state, &fx.cache, "3600");
    let path = fx.m("big.log");
    let append = format!("echo 'one more line' >> '{}'", path.display());
    run_ok(sh("sh", &[&"-c", &append]));
    expected.extend_from_slice(b"one more line\n");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    for (off, len) in [(1_000u64, 10usize), (20 << 20, 5_000)] {
        let data = rng.bytes(len);
        f.write_all_at(&data, off).unwrap();
        expected[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    drop(f);
    let staged = status_json(&m)["staged_bytes"].as_u64().unwrap();
    assert!(staged < 4 << 20, "{staged} bytes staged for edits of a few KiB");
    assert_eq!(hash_file(&path), blake3::hash(&expected), "the mount shows the edits over the bucket's bytes");
    m.flush();
    assert_eq!(blake3::hash(&fx.bucket.data("big.log")), blake3::hash(&expected), "the object after the edits");
    let st = status_json(&m);
    let (sent, copied) = (st["bytes_sent"].as_u64().unwrap(), st["bytes_copied"].as_u64().unwrap());
    if matches!(backend, Backend::Moto | Backend::Garage | Backend::Garage3) {
        // Two parts of 5 MiB around the writes (S3's smallest), the appended line, and the
        // rest copied.
        assert!(copied >= 29 << 20 && sent <= 11 << 20, "S3: {sent} bytes sent, {copied} copied in the bucket");
    } else {
        assert_eq!(copied, 0);
    }
    // A truncate needs nothing of the file either; then a fresh mount reads the result.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(30 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    expected.truncate(30 << 20);
    m.flush();
    m.unmount();
    assert_eq!(blake3::hash(&fx.bucket.data("big.log")), blake3::hash(&expected), "the object after the truncate");
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    assert_eq!(hash_file(&path), blake3::hash(&expected), "a fresh mount of the bucket");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 5. renaming a folder of 1,000 files
// ---------------------------------------------------------------------------------------------

/// The names of the 1,000 files (and `sub/nested.txt`) of the folder, and their content.
fn renamed_dir_want() -> Vec<(String, Vec<u8>)> {
    let mut want: Vec<(String, Vec<u8>)> =
        (0..1000).map(|i| (format!("f{i:04}"), format!("content of file {i}\n").into_bytes())).collect();
    want.push(("sub/nested.txt".into(), b"nested\n".to_vec()));
    want
}

/// Checks the objects of the folder `prefix` in the bucket.
fn check_renamed_dir_in_bucket(bucket: &Other, prefix: &str) {
    let want = renamed_dir_want();
    let keys = user_keys(bucket, prefix);
    let want_keys: Vec<String> = want.iter().map(|(n, _)| format!("{prefix}/{n}")).collect();
    assert_eq!(keys, want_keys, "keys under {prefix}/");
    for (name, data) in want {
        assert_eq!(bucket.data(&format!("{prefix}/{name}")), data, "{prefix}/{name}");
    }
}

/// Checks the 1,000 files (and `sub/nested.txt`) of `dir` in the mount.
fn check_renamed_dir(dir: &Path) {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut want: Vec<String> = (0..1000).map(|i| format!("f{i:04}")).collect();
    want.push("sub".into());
    assert_eq!(names.len(), want.len(), "{} holds {} entries", dir.display(), names.len());
    assert_eq!(names, want);
    for i in 0..1000 {
        let p = dir.join(format!("f{i:04}"));
        assert_eq!(read(&p), format!("content of file {i}\n").into_bytes(), "{}", p.display());
    }
    assert_eq!(read(&dir.join("sub/nested.txt")), b"nested\n");
}

fn rename_a_folder_of_1000_files(backend: Backend) {
    let fx = Fixture::new(&TIER, "mvdir", backend);
    let m = fx.mount();
    let dir = fx.m("dir");
    fs::create_dir(&dir).unwrap();
    for i in 0..1000 {
        fs::write(dir.join(format!("f{i:04}")), format!("content of file {i}\n")).unwrap();
    }
    write_file(&dir.join("sub/nested.txt"), b"nested\n");
    // Get the files into the bucket first, so the rename moves objects there.
    m.flush();
    assert_eq!(user_keys(&fx.bucket, "dir").len(), 1001);

    run_ok(sh("mv", &[&dir, &fx.m("dir2")]));
    assert_gone(&dir);
    check_renamed_dir(&fx.m("dir2"));

    m.flush();
    let left = fx.bucket.keys_under("dir");
    assert!(left.is_empty(), "keys left under dir/ after the rename: {left:?}");
    check_renamed_dir_in_bucket(&fx.bucket, "dir2");
    m.unmount();

    let m = fx.mount();
    assert_gone(&dir);
    check_renamed_dir(&fx.m("dir2"));
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 6. chmod, chown, touch -d survive a remount
// ---------------------------------------------------------------------------------------------

fn check_attrs(path: &Path, perm: u32, when: &str) {
    let md = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    let got = (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime());
    assert_eq!(got, (perm, 1234, 5678, STAMP), "{} (mode, uid, gid, mtime) {when}", path.display());
}

fn chmod_chown_touch_survive_remount(backend: Backend) {
    let fx = Fixture::new(&TIER, "attrs", backend);
    let m = fx.mount();
    let (d, f) = (fx.m("d"), fx.m("d/f.txt"));
    fs::create_dir(&d).unwrap();
    write_file(&f, b"attributes\n");
    run_ok(sh("chmod", &[&"640", &f]));
    run_ok(sh("chmod", &[&"750", &d]));
    run_ok(sh("chown", &[&"1234:5678", &f, &d]));
    for p in [&f, &d] {
        run_ok(sh("touch", &[&"-d", &"2021-03-04 05:06:07", p]).env("TZ", "UTC"));
    }
    check_attrs(&f, 0o640, "in the mount");
    check_attrs(&d, 0o750, "in the mount");

    m.flush();
    // The objects carry them as user metadata (s3fs's names): the file's, and the folder's on
    // its marker.
    let want = |mode: u32| {
        [("mode", mode.to_string()), ("uid", "1234".into()), ("gid", "5678".into()), ("mtime", STAMP.to_string())]
    };
    for (key, mode) in [("d/f.txt", libc::S_IFREG | 0o640), ("d/.autosync-folder", libc::S_IFDIR | 0o750)] {
        let meta = fx.bucket.get(key).meta;
        for (name, value) in want(mode) {
            assert_eq!(meta.get(name), Some(&value), "metadata `{name}` of {key}: {meta:?}");
        }
    }
    // In a local folder, the backing file carries them too (and the metadata xattr, which the
    // other client read above).
    if let Some(root) = fx.local_bucket() {
        let bf = root.join("d/f.txt");
        let md = fs::metadata(&bf).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mtime()), (1234, 5678, STAMP), "backing file {}", bf.display());
        assert_eq!(md.mode() & 0o777, 0o640, "backing file mode");
        assert!(xattr::get(&bf, "user.autosync.meta").unwrap().is_some(), "no metadata xattr on {}", bf.display());
    }
    m.unmount();

    let m = fx.mount();
    check_attrs(&f, 0o640, "after unmount + remount");
    check_attrs(&d, 0o750, "after unmount + remount");
    m.unmount();

    // From the bucket alone (fresh state and cache, as on another machine).
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    check_attrs(&f, 0o640, "in a fresh mount of the bucket");
    check_attrs(&d, 0o750, "in a fresh mount of the bucket");
    m.unmount();
}

/// Names of 255 bytes (the most Linux allows) work everywhere, the local folder included,
/// and times keep their nanoseconds and a separate access time past 2106.
fn long_names_and_exact_times(backend: Backend) {
    let fx = Fixture::new(&TIER, "names", backend);
    let m = fx.mount();
    let long = |c: &str| c.repeat(255);
    let (dir, file, moved) = (fx.m(&long("d")), fx.m(&format!("{}/{}", long("d"), long("f"))), fx.m(&long("m")));
    fs::create_dir(&dir).unwrap();
    write_file(&file, b"a long name\n");
    write_file(&fx.m("short"), b"renamed to a long name\n");
    fs::rename(fx.m("short"), &moved).unwrap();
    for (what, r) in [
        ("create", fs::write(fx.m(&(long("x") + "x")), b"").err()),
        ("mkdir", fs::create_dir(fx.m(&(long("y") + "y"))).err()),
    ] {
        assert_eq!(r.and_then(|e| e.raw_os_error()), Some(libc::ENAMETOOLONG), "{what} of a 256-byte name");
    }
    // touch -d takes nanoseconds; -a and -m set one time each.
    run_ok(sh("touch", &[&"-m", &"-d", &"@1600000000.123456789", &file]));
    run_ok(sh("touch", &[&"-a", &"-d", &"@4294967296", &file]));
    let times = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        (md.mtime(), md.mtime_nsec(), md.atime(), md.atime_nsec())
    };
    let want = (1_600_000_000, 123_456_789, 4_294_967_296, 0);
    assert_eq!(times(&file), want, "in the mount");
    m.flush();
    let key = format!("{}/{}", long("d"), long("f"));
    let meta = fx.bucket.get(&key).meta;
    assert_eq!(meta.get("mtime").map(String::as_str), Some("1600000000.123456789"), "{meta:?}");
    assert_eq!(meta.get("atime").map(String::as_str), Some("4294967296"), "{meta:?}");
    assert_eq!(fx.bucket.data(&long("m")), b"renamed to a long name\n");
    m.unmount();

    // From the bucket alone (fresh state and cache, as on another machine).
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    assert_eq!(read(&file), b"a long name\n");
    assert_eq!(read(&moved), b"renamed to a long name\n");
    assert_eq!(times(&file), want, "in a fresh mount of the bucket");
    m.unmount();
}

/// A FIFO, a socket and two device nodes: made with the usual tools, served by the kernel
/// (a FIFO passes data from a writer to a reader), in the bucket as empty objects whose
/// `mode` (and `rdev`) metadata say what they are, as s3fs stores them, and the same after
/// a fresh mount of the bucket.
fn special_files_fifo_socket_and_devices(backend: Backend) {
    use std::os::unix::fs::FileTypeExt;
    let fx = Fixture::new(&TIER, "special", backend);
    let check = |when: &str| {
        let kind = |name: &str| {
            let md = fs::symlink_metadata(fx.m(name)).unwrap_or_else(|e| panic!("stat {name} {when}: {e}"));
            let t = md.file_type();
            let k = [t.is_fifo(), t.is_socket(), t.is_char_device(), t.is_block_device()];
            (k, md.rdev(), md.len(), md.mode() & 0o7777)
        };
        assert_eq!(kind("fifo"), ([true, false, false, false], 0, 0, 0o640), "fifo {when}");
        assert_eq!(kind("sock").0, [false, true, false, false], "socket {when}");
        assert_eq!(kind("cdev"), ([false, false, true, false], libc::makedev(4, 5), 0, 0o600), "cdev {when}");
        assert_eq!(kind("bdev"), ([false, false, false, true], libc::makedev(7, 3), 0, 0o600), "bdev {when}");
        // The kernel serves the FIFO: what a writer puts in, a reader gets.
        let fifo = fx.m("fifo");
        let writer = std::thread::spawn(move || fs::write(fifo, b"through the fifo\n"));
        assert_eq!(read(&fx.m("fifo")), b"through the fifo\n", "fifo {when}");
        writer.join().unwrap().unwrap();
    };
    let m = fx.mount();
    run_ok(sh("mkfifo", &[&"-m", &"640", &fx.m("fifo")]));
    run_ok(sh("mknod", &[&"-m", &"600", &fx.m("cdev"), &"c", &"4", &"5"]));
    run_ok(sh("mknod", &[&"-m", &"600", &fx.m("bdev"), &"b", &"7", &"3"]));
    let listener = std::os::unix::net::UnixListener::bind(fx.m("sock")).expect("bind a socket in the mount");
    drop(listener);
    check("in the mount");

    m.flush();
    for (key, mode, rdev) in [
        ("fifo", libc::S_IFIFO | 0o640, None),
        ("cdev", libc::S_IFCHR | 0o600, Some(libc::makedev(4, 5))),
        ("bdev", libc::S_IFBLK | 0o600, Some(libc::makedev(7, 3))),
    ] {
        let o = fx.bucket.get(key);
        assert!(o.data.is_empty(), "{key} holds {} bytes in the bucket", o.data.len());
        assert_eq!(o.meta.get("mode"), Some(&mode.to_string()), "mode of {key}: {:?}", o.meta);
        assert_eq!(o.meta.get("rdev"), rdev.map(|d| d.to_string()).as_ref(), "rdev of {key}: {:?}", o.meta);
    }
    let sock = fx.bucket.get("sock").meta.get("mode").and_then(|m| m.parse::<u32>().ok());
    assert_eq!(sock.map(|m| m & libc::S_IFMT), Some(libc::S_IFSOCK));
    m.unmount();

    // From the bucket alone (fresh state and cache, as on another machine).
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    check("in a fresh mount of the bucket");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 7. crash: SIGKILL the daemon, remount with the same state, the journal is replayed
// ---------------------------------------------------------------------------------------------

fn sigkill_then_remount_replays_the_journal(backend: Backend) {
    let fx = Fixture::new(&TIER, "crash", backend);
    // A long upload delay: at the kill, the files are only in the local journal.
    let m = fx.mount_with(&fx.state, &fx.cache, "600");
    let big: Vec<u8> = Rng(7).bytes(300_000);
    write_file(&fx.m("crash.bin"), &big);
    write_file(&fx.m("sub/inner.txt"), b"written just before the crash\n");
    fx.bucket.assert_gone("crash.bin");
    fx.bucket.assert_gone("sub/inner.txt");

    // Someone looks at the mount (`ls -ld`) just before the crash: the kernel may keep
    // answering stat of the mount point from its attribute cache for a while afterwards.
    assert!(fs::metadata(&fx.mnt).unwrap().is_dir());
    m.kill9();
    assert!(mounted(&fx.mnt), "the killed daemon's mount should still be in the mount table");

    // The next mount, started right away (as systemd's Restart= would), cleans the dead
    // mount up by itself.
    let m = fx.mount();
    m.flush();
    assert!(fx.bucket.data("crash.bin") == big, "crash.bin in the bucket differs");
    assert_eq!(fx.bucket.data("sub/inner.txt"), b"written just before the crash\n");
    assert!(read(&fx.m("crash.bin")) == big, "crash.bin in the mount differs");
    assert_eq!(read(&fx.m("sub/inner.txt")), b"written just before the crash\n");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 8. bad input: one-line messages, nothing mounted
// ---------------------------------------------------------------------------------------------

fn bad_input_fails_with_one_line_and_mounts_nothing(backend: Backend) {
    let fx = Fixture::new(&TIER, "bad", backend);
    let m = fx.mount();
    write_file(&fx.m("keep.txt"), b"the good mount keeps working\n");

    let nonempty = fx.root.join("nonempty");
    write_file(&nonempty.join("something"), b"x");
    let cases: Vec<(&str, String, PathBuf, PathBuf)> = vec![
        // (what, source, mount point, state dir)
        ("missing mount point", fx.root.join("b1").display().to_string(), fx.root.join("nope"), fx.root.join("s1")),
        ("non-empty mount point", fx.root.join("b2").display().to_string(), nonempty.clone(), fx.root.join("s2")),
        ("malformed source", "ftp://x".into(), fx.root.join("mp3"), fx.root.join("s3")),
        ("state dir in use", fx.root.join("b4").display().to_string(), fx.root.join("mp4"), fx.state.clone()),
    ];
    for (_, _, mp, _) in &cases[2..] {
        fs::create_dir_all(mp).unwrap();
    }
    let mut failures = Vec::new();
    for (what, source, mp, state) in &cases {
        for daemon in [false, true] {
            let _guard = StrayGuard(mp.clone());
            let mut cmd = Command::new(BIN);
            cmd.arg("mount").arg(source).arg(mp).arg("--state-dir").arg(state);
            cmd.arg("--cache-dir").arg(fx.root.join("c-bad")).env_remove("RUST_LOG");
            if daemon {
                cmd.arg("--daemon");
            }
            let out = try_run(&mut cmd, Duration::from_secs(30), None)
                .unwrap_or_else(|e| panic!("{what}: the mount should have failed at once: {e}"));
            let mode = if daemon { "with --daemon" } else { "in the foreground" };
            assert!(!out.ok(), "{what} {mode}: mount succeeded: {out}");
            assert!(!mounted(mp), "{what} {mode}: something is mounted at {}", mp.display());
            let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() != 1 || !lines[0].starts_with("autosync: ") {
                failures.push(format!("{what} {mode}: stderr is not one `autosync: ...` line:\n{}", out.stderr));
            }
        }
    }
    // The mount whose state dir was reused is untouched.
    assert_eq!(read(&fx.m("keep.txt")), b"the good mount keeps working\n");
    m.flush();
    assert_eq!(fx.bucket.data("keep.txt"), b"the good mount keeps working\n");
    m.unmount();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The files at the top of a mount, with their contents.
fn top_files(mnt: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(mnt)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), read(&e.path())))
        .collect()
}

/// Two machines on one bucket (two mounts, each with its own state and cache dirs): an
/// edit–edit, a delete–edit and a create–create conflict, under keep-both. Every version
/// written survives somewhere, and both mounts converge to the bucket's view.
fn two_mounts_of_one_bucket_keep_every_version_and_converge(backend: Backend) {
    let fx = Fixture::new(&TIER, "twomounts", backend);
    let dir_b = TestDir::new(&TIER, &format!("twomounts-b-{}", backend.name()));
    // Uploads only on flush, so the order of events is the test's.
    let a = fx.mount_with(&fx.state, &fx.cache, "3600");
    let creds = fx.server.creds();
    let b = fx.server.mount(
        &dir_b,
        &fx.source,
        (&dir_b.root.join("state"), &dir_b.root.join("cache")),
        ("3600", METADATA_TTL),
        creds,
    );
    let (fa, fb) = (|n: &str| fx.m(n), |n: &str| dir_b.m(n));
    write_file(&fa("edit.txt"), b"v1 from A\n");
    write_file(&fa("gone.txt"), b"to be deleted by A\n");
    a.flush();
    wait_for("B sees A's files", Duration::from_secs(20), || (top_files(&dir_b.mnt).len() == 2).then_some(()));
    assert_eq!(read(&fb("edit.txt")), b"v1 from A\n");

    // edit–edit: B saves v3 (based on v1, not uploaded yet), then A saves v2 and uploads it.
    write_file(&fb("edit.txt"), b"v3 from B\n");
    write_file(&fa("edit.txt"), b"v2 from A, longer\n");
    a.flush();
    // delete–edit: A deletes (queued), B edits; B's edit goes up first, and A's delete then
    // finds a version it never saw and leaves it.
    fs::remove_file(fa("gone.txt")).unwrap();
    write_file(&fb("gone.txt"), b"edited by B after A's delete\n");
    // create–create: both create new.txt; B's goes up first.
    write_file(&fa("new.txt"), b"new from A\n");
    write_file(&fb("new.txt"), b"new from B\n");
    b.flush();
    a.flush();

    let host = conflict_host_name();
    let in_bucket = bucket_files(&fx.bucket);
    assert_eq!(in_bucket["edit.txt"], b"v2 from A, longer\n", "{:?}", in_bucket.keys());
    assert_eq!(in_bucket["gone.txt"], b"edited by B after A's delete\n", "the edit survives the delete");
    assert_eq!(in_bucket["new.txt"], b"new from B\n");
    let copy_of = |stem: &str, want: &[u8]| {
        let found: Vec<_> = in_bucket
            .iter()
            .filter(|(k, v)| k.starts_with(&format!("{stem}.conflict-{host}-")) && v.as_slice() == want)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "no single conflict copy of {stem} holding {:?}: {:?}",
            String::from_utf8_lossy(want),
            in_bucket.keys()
        );
    };
    copy_of("edit", b"v3 from B\n");
    copy_of("new", b"new from A\n");
    assert_eq!(in_bucket.len(), 5, "{:?}", in_bucket.keys());
    // Both mounts converge to the bucket's view (after their metadata TTL).
    for (name, mnt) in [("A", &fx.dir.mnt), ("B", &dir_b.mnt)] {
        wait_for(&format!("mount {name} shows the bucket's view"), Duration::from_secs(20), || {
            (top_files(mnt) == in_bucket).then_some(())
        });
    }
    // Each side recorded the conflicts it met.
    let recs = |m: &Mount| -> serde_json::Value {
        serde_json::from_str(&run_ok(m.cli("conflicts").arg("--json")).stdout).unwrap()
    };
    let (ra, rb) = (recs(&a), recs(&b));
    assert_eq!(ra.as_array().map(Vec::len), Some(1), "A: {ra}");
    assert_eq!(ra[0]["path"], "new.txt");
    assert_eq!(rb.as_array().map(Vec::len), Some(1), "B: {rb}");
    assert_eq!(rb[0]["path"], "edit.txt");
    a.unmount();
    b.unmount();
}

/// `--conflict merge` with two mounts: edits of different lines of a text file end as one
/// file holding both, on both mounts and in the bucket. And the background poll: mount B
/// trusts its listings for an hour, yet shows A's new and changed files within seconds.
fn two_mounts_merge_text_and_the_poll_shows_changes(backend: Backend) {
    let fx = Fixture::new(&TIER, "merge", backend);
    let dir_b = TestDir::new(&TIER, &format!("merge-b-{}", backend.name()));
    let creds = fx.server.creds();
    let merge = |extra: &[&str]| {
        let mut o = fx.server.mount_opts();
        o.extend(["--conflict", "merge"].iter().chain(extra).map(|s| s.to_string()));
        o
    };
    // Uploads only on flush, so the order of events is the test's.
    let a = fx.server.mount_with_opts(
        &fx.dir,
        &fx.source,
        (&fx.state, &fx.cache),
        ("3600", METADATA_TTL),
        creds,
        merge(&[]),
    );
    let b = fx.server.mount_with_opts(
        &dir_b,
        &fx.source,
        (&dir_b.root.join("state"), &dir_b.root.join("cache")),
        ("3600", "3600"),
        creds,
        merge(&["--poll-interval", "1"]),
    );
    let (fa, fb) = (|n: &str| fx.m(n), |n: &str| dir_b.m(n));
    write_file(&fa("notes.txt"), b"one\ntwo\nthree\n");
    write_file(&fa("shared.txt"), b"first\n");
    a.flush();
    wait_for("B sees A's files", Duration::from_secs(20), || (top_files(&dir_b.mnt).len() == 2).then_some(()));
    assert_eq!(read(&fb("notes.txt")), b"one\ntwo\nthree\n");

    // B edits the last line (kept back), A the first (uploaded first): B's upload merges.
    write_file(&fb("notes.txt"), b"one\ntwo\nthree, said B\n");
    write_file(&fa("notes.txt"), b"ONE, said A\ntwo\nthree\n");
    a.flush();
    b.flush();
    let merged = b"ONE, said A\ntwo\nthree, said B\n";
    assert_eq!(fx.bucket.data("notes.txt"), merged);
    assert_eq!(read(&fb("notes.txt")), merged, "B shows the merged file");
    let in_bucket = bucket_files(&fx.bucket);
    assert_eq!(in_bucket.len(), 2, "no conflict copy: {:?}", in_bucket.keys());
    wait_for("A shows the merged file", Duration::from_secs(20), || (read(&fa("notes.txt")) == merged).then_some(()));
    let recs: serde_json::Value = serde_json::from_str(&run_ok(b.cli("conflicts").arg("--json")).stdout).unwrap();
    assert_eq!((recs[0]["path"].as_str(), recs[0]["policy"].as_str()), (Some("notes.txt"), Some("merge")), "{recs}");

    // The poll: B's listings are an hour old at most, yet A's changes show.
    assert_eq!(read(&fb("shared.txt")), b"first\n");
    write_file(&fa("shared.txt"), b"second, and longer\n");
    write_file(&fa("added.txt"), b"added by A\n");
    a.flush();
    wait_for("B's poll shows A's changes", Duration::from_secs(20), || {
        let seen = fb("added.txt").exists() && read(&fb("shared.txt")) == b"second, and longer\n";
        seen.then_some(())
    });
    assert_eq!(top_files(&dir_b.mnt), bucket_files(&fx.bucket));
    a.unmount();
    b.unmount();
}

/// Every file under `root` (recursively, autosync's folder markers left out), with its
/// contents.
fn all_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walk(root)
        .into_iter()
        .filter(|p| root.join(p).is_file() && !p.ends_with(".autosync-folder"))
        .map(|p| (p.to_string_lossy().into_owned(), read(&root.join(&p))))
        .collect()
}

/// Two machines again: a rename on one while the other edits the file, and a folder
/// renamed on one while the other adds a file inside it. Nothing written is lost, and
/// both mounts converge to the bucket's view.
fn two_mounts_rename_edit_and_folder_rename_add(backend: Backend) {
    let fx = Fixture::new(&TIER, "tworename", backend);
    let dir_b = TestDir::new(&TIER, &format!("tworename-b-{}", backend.name()));
    let a = fx.mount_with(&fx.state, &fx.cache, "3600");
    let b = fx.server.mount(
        &dir_b,
        &fx.source,
        (&dir_b.root.join("state"), &dir_b.root.join("cache")),
        ("3600", METADATA_TTL),
        fx.server.creds(),
    );
    write_file(&fx.m("f.txt"), b"v1\n");
    write_file(&fx.m("d/one"), b"one\n");
    a.flush();
    wait_for("B sees A's files", Duration::from_secs(20), || (all_files(&dir_b.mnt).len() == 2).then_some(()));

    // rename–edit: A renames f.txt to g.txt and uploads; B had edited f.txt (based on v1).
    write_file(&dir_b.m("f.txt"), b"v2 from B\n");
    fs::rename(fx.m("f.txt"), fx.m("g.txt")).unwrap();
    // folder rename–add: A renames d to e; B adds d/two; A's rename goes up first.
    write_file(&dir_b.m("d/two"), b"two from B\n");
    fs::rename(fx.m("d"), fx.m("e")).unwrap();
    a.flush();
    b.flush();

    let in_bucket = bucket_files(&fx.bucket);
    eprintln!("bucket after both uploads: {:?}", in_bucket.keys());
    let has = |want: &[u8]| in_bucket.values().filter(|v| v.as_slice() == want).count();
    assert_eq!(in_bucket.get("g.txt").map(Vec::as_slice), Some(&b"v1\n"[..]), "{:?}", in_bucket.keys());
    assert_eq!(has(b"v2 from B\n"), 1, "B's edit is kept once: {:?}", in_bucket.keys());
    assert_eq!(in_bucket.get("e/one").map(Vec::as_slice), Some(&b"one\n"[..]), "{:?}", in_bucket.keys());
    assert_eq!(has(b"two from B\n"), 1, "B's new file is kept once: {:?}", in_bucket.keys());
    assert!(!in_bucket.contains_key("d/one") && !in_bucket.contains_key("f.txt"), "{:?}", in_bucket.keys());
    for (name, mnt) in [("A", &fx.dir.mnt), ("B", &dir_b.mnt)] {
        wait_for(&format!("mount {name} shows the bucket's view"), Duration::from_secs(20), || {
            (all_files(mnt) == in_bucket).then_some(())
        });
    }
    a.unmount();
    b.unmount();
}

/// Every object in the bucket (autosync's folder markers left out), with its contents.
fn bucket_files(bucket: &Other) -> BTreeMap<String, Vec<u8>> {
    bucket
        .keys()
        .into_iter()
        .filter(|k| !k.ends_with(".autosync-folder"))
        .map(|k| (k.clone(), bucket.data(&k)))
        .collect()
}

/// The `HOST` part of conflict copy names, as autosync derives it from the hostname.
fn conflict_host_name() -> String {
    let h = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
    h.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

/// Conflict flags are checked before anything is mounted.
#[test]
fn bad_conflict_flags_are_refused_before_mounting() {
    let fx = Fixture::new(&TIER, "badflags", Backend::Local);
    let rules = fx.root.join("rules");
    fs::write(&rules, "*.docx newest\nshared/** whoever\n").unwrap();
    let rules_flag = rules.display().to_string();
    let missing = fx.root.join("no-such-rules").display().to_string();
    let bad_rules = format!("--conflict-rules {rules_flag}: line 2: unknown conflict policy \"whoever\"");
    let no_rules = format!("--conflict-rules {missing}: cannot read it");
    let cases: [(&[&str], &str); 6] = [
        (&["--conflict-rules", &rules_flag], &bad_rules),
        (&["--conflict-rules", &missing], &no_rules),
        (&["--conflict", "bogus"], "unknown conflict policy \"bogus\": use one of keep-both, newest, local, remote"),
        (
            &["--conflict-loser", "discard"],
            "--conflict-loser discard needs --conflict newest, local, remote or priority",
        ),
        (&["--conflict", "merge", "--conflict-loser", "discard"], "(merge keeps both versions)"),
        (&["--conflict", "local", "--conflict-loser", "maybe"], "invalid value 'maybe' for '--conflict-loser"),
    ];
    for (flags, want) in cases {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(fx.root.join("b")).arg(&fx.dir.mnt).arg("--state-dir").arg(&fx.state);
        cmd.arg("--cache-dir").arg(&fx.cache).args(flags).env_remove("RUST_LOG");
        let out = try_run(&mut cmd, Duration::from_secs(30), None).unwrap();
        assert!(!out.ok() && out.stderr.contains(want), "{flags:?}: {out}");
        assert!(!mounted(&fx.dir.mnt), "{flags:?}: something got mounted");
    }
}

// ---------------------------------------------------------------------------------------------
// 9. rename and link semantics
// ---------------------------------------------------------------------------------------------

fn renameat2_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes()).unwrap();
    let to = CString::new(to.as_os_str().as_bytes()).unwrap();
    // SAFETY: two valid NUL-terminated paths, resolved against the cwd.
    let r =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn rename_rmdir_noreplace_and_link_semantics(backend: Backend) {
    let fx = Fixture::new(&TIER, "rename", backend);
    let m = fx.mount();
    let (a, b) = (fx.m("a.txt"), fx.m("b.txt"));
    write_file(&a, b"old content of a\n");
    write_file(&b, b"new content, from b\n");
    m.flush();
    assert_eq!(fx.bucket.data("a.txt"), b"old content of a\n");

    // rename(2) onto an existing file replaces it.
    fs::rename(&b, &a).unwrap();
    assert_eq!(read(&a), b"new content, from b\n");
    assert_gone(&b);
    m.flush();
    assert_eq!(fx.bucket.data("a.txt"), b"new content, from b\n");
    fx.bucket.assert_gone("b.txt");

    // rmdir of a non-empty folder: ENOTEMPTY, before and after its content is uploaded.
    let d = fx.m("d");
    write_file(&d.join("x"), b"x\n");
    assert_eq!(errno_of(fs::remove_dir(&d)), Some(libc::ENOTEMPTY));
    m.flush();
    assert_eq!(errno_of(fs::remove_dir(&d)), Some(libc::ENOTEMPTY));
    assert_eq!(read(&d.join("x")), b"x\n");

    // RENAME_NOREPLACE onto an existing file: EEXIST, both files unchanged; same with mv -n.
    let (c, e) = (fx.m("c.txt"), fx.m("e.txt"));
    write_file(&c, b"c\n");
    write_file(&e, b"e\n");
    assert_eq!(errno_of(renameat2_noreplace(&c, &e)), Some(libc::EEXIST));
    run(sh("mv", &[&"-n", &c, &e]));
    assert_eq!((read(&c), read(&e)), (b"c\n".to_vec(), b"e\n".to_vec()));
    // ...and onto a free name it renames.
    renameat2_noreplace(&c, &fx.m("c2.txt")).unwrap();
    assert_gone(&c);
    assert_eq!(read(&fx.m("c2.txt")), b"c\n");

    // A hard link to a folder is refused with EPERM; `ln` fails and creates nothing (hard
    // links of files: posix_mount.rs).
    let h = fx.m("hard");
    assert_eq!(errno_of(fs::hard_link(&d, &h)), Some(libc::EPERM));
    let out = run(sh("ln", &[&d, &h]));
    assert!(!out.ok(), "ln should fail: {out}");
    assert_gone(&h);

    m.flush();
    fx.bucket.assert_gone("c.txt");
    assert_eq!(fx.bucket.data("c2.txt"), b"c\n");
    assert_eq!(fx.bucket.data("e.txt"), b"e\n");
    fx.bucket.assert_gone("hard");
    m.unmount();
}

/// A file unlinked, or renamed over, while open keeps its content for its descriptors until
/// the last close (st_nlink 0 once it has no name), and nothing written to it afterwards
/// reaches the bucket.
fn open_files_outlive_unlink_and_rename_over(backend: Backend) {
    let fx = Fixture::new(&TIER, "orphan", backend);
    let m = fx.mount();
    let (gone, over, other) = (fx.m("gone.txt"), fx.m("over.txt"), fx.m("other.txt"));
    write_file(&gone, b"unlinked while open\n");
    write_file(&over, b"renamed over while open\n");
    write_file(&other, b"the file that took the name\n");
    m.flush();

    let g = OpenOptions::new().read(true).write(true).open(&gone).unwrap();
    let o = OpenOptions::new().read(true).write(true).open(&over).unwrap();
    fs::remove_file(&gone).unwrap();
    fs::rename(&other, &over).unwrap();
    assert_eq!(g.metadata().unwrap().nlink(), 0, "an unlinked open file has no name");
    for (f, text) in [(&g, &b"unlinked while open\n"[..]), (&o, b"renamed over while open\n")] {
        f.write_all_at(b"AFTER", text.len() as u64).unwrap();
        let mut buf = vec![0; text.len() + 5];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..text.len()], text);
        assert_eq!(&buf[text.len()..], b"AFTER");
    }
    assert_gone(&gone);
    assert_eq!(read(&over), b"the file that took the name\n");
    drop((g, o));
    m.flush();
    fx.bucket.assert_gone("gone.txt");
    fx.bucket.assert_gone("other.txt");
    assert_eq!(fx.bucket.data("over.txt"), b"the file that took the name\n");
    m.unmount();
    // Nothing of them comes back from the bucket either.
    let m = fx.mount_with(&fx.root.join("state2"), &fx.root.join("cache2"), UPLOAD_DELAY);
    assert_gone(&gone);
    assert_eq!(read(&over), b"the file that took the name\n");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// An executable written in the mount runs from it
// ---------------------------------------------------------------------------------------------

fn executable_script_runs_from_the_mount(backend: Backend) {
    let fx = Fixture::new(&TIER, "perm", backend);
    let m = fx.mount();
    let p = fx.m("x.sh");
    write_file(&p, b"#!/bin/sh\necho hi\n");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o755);
    let out = run_ok(&mut Command::new(&p));
    assert_eq!(out.stdout, "hi\n");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// The encrypted block cache
// ---------------------------------------------------------------------------------------------

impl Fixture {
    /// Mounts with this fixture's state and cache dirs and `extra` options.
    fn mount_extra(&self, extra: &[&str]) -> Mount {
        let mut opts = self.server.mount_opts();
        opts.extend(extra.iter().map(|s| s.to_string()));
        let dirs = (&*self.state, &*self.cache);
        self.server.mount_with_opts(
            &self.dir,
            &self.source,
            dirs,
            (UPLOAD_DELAY, METADATA_TTL),
            self.server.creds(),
            opts,
        )
    }

    /// Every block file of the disk cache, with its size.
    fn block_files(&self) -> Vec<(PathBuf, u64)> {
        walk(&self.cache.join("blocks"))
            .into_iter()
            .map(|rel| self.cache.join("blocks").join(rel))
            .filter(|p| p.parent().and_then(|d| d.file_name()).is_some_and(|d| d.len() == 2) && p.is_file())
            .map(|p| {
                let len = fs::metadata(&p).unwrap().len();
                (p, len)
            })
            .collect()
    }
}

impl Mount {
    /// `autosync cache stats --json`.
    fn cache_stats(&self) -> serde_json::Value {
        let mut cmd = Command::new(BIN);
        cmd.args(["cache", "stats"]).arg(&self.mnt).arg("--state-dir").arg(&self.state).arg("--json");
        let out = run_ok(&mut cmd);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("cache stats --json is not JSON ({e}): {out}"))
    }
}

/// Content with a recognisable plaintext, so that the cache can be searched for it.
fn marked_content(len: usize, seed: u64) -> Vec<u8> {
    let mut data = Rng(seed).bytes(len);
    for chunk in data.chunks_mut(4096) {
        let mark = b"KNOWN-PLAINTEXT-autosync";
        chunk[..mark.len()].copy_from_slice(mark);
    }
    data
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn block_cache_survives_remount_and_refetches_tampered_blocks() {
    let fx = Fixture::new(&TIER, "blockcache", Backend::Local);
    let data = marked_content(5 << 20, 11);
    let name = "secret-report-name.bin";
    fx.bucket.put(name, &data);
    let m = fx.mount_extra(&[]);
    assert!(read(&fx.m(name)) == data, "first read differs");
    let st = m.cache_stats();
    assert_eq!(st["fetched_blocks"], 5, "a cold read of 5 MiB fetches 5 blocks of 1 MiB: {st}");
    wait_for("the 5 blocks on disk", Duration::from_secs(10), || (fx.block_files().len() == 5).then_some(()));

    // Nothing under the cache dir holds the plaintext or the name, in content or file names.
    for rel in walk(&fx.cache) {
        let p = fx.cache.join(&rel);
        assert!(!rel.to_string_lossy().contains("secret"), "{} reveals a name", p.display());
        if p.is_file() {
            let bytes = fs::read(&p).unwrap();
            assert!(!contains(&bytes, b"KNOWN-PLAINTEXT"), "{} holds plaintext", p.display());
            assert!(!contains(&bytes, name.as_bytes()), "{} holds the file name", p.display());
        }
    }
    m.unmount();

    // After a remount every block comes from the disk cache: nothing is fetched.
    let m = fx.mount_extra(&[]);
    assert!(read(&fx.m(name)) == data, "read from the disk cache differs");
    let st = m.cache_stats();
    assert_eq!(st["fetched_blocks"], 0, "blocks fetched again after a remount: {st}");
    assert!(st["disk"]["hits"].as_u64().unwrap() >= 5, "{st}");
    m.unmount();

    // A flipped byte in every block: each fails its tag, is dropped and fetched again, and
    // the reader gets the right bytes.
    for (p, _) in fx.block_files() {
        let mut b = fs::read(&p).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x40;
        fs::write(&p, b).unwrap();
    }
    let m = fx.mount_extra(&[]);
    assert!(read(&fx.m(name)) == data, "read after tampering differs");
    let st = m.cache_stats();
    assert_eq!(st["disk"]["integrity_failures"], 5, "{st}");
    assert_eq!(st["fetched_blocks"], 5, "{st}");
    m.unmount();
}

/// Every file under `root` (names and contents) is free of the marker and of `names`.
fn assert_nothing_readable(root: &Path, names: &[&str]) -> usize {
    let mut files = 0;
    for rel in walk(root) {
        let p = root.join(&rel);
        for n in names {
            assert!(!rel.to_string_lossy().contains(n), "{} reveals the name {n}", p.display());
        }
        if p.is_file() {
            files += 1;
            let bytes = fs::read(&p).unwrap();
            assert!(!contains(&bytes, b"KNOWN-PLAINTEXT"), "{} holds plaintext", p.display());
            for n in names {
                assert!(!contains(&bytes, n.as_bytes()), "{} holds the name {n}", p.display());
            }
        }
    }
    files
}

/// Staged (not yet uploaded or kept as the local copy) contents, the journal and the inode
/// table are sealed too: neither the cache dir nor the state dir shows names or plaintext.
#[test]
fn no_plaintext_or_names_under_the_cache_and_state_dirs() {
    let fx = Fixture::new(&TIER, "sealed", Backend::Local);
    let m = fx.mount();
    let names = ["secret-folder-qz", "secret-report-qz.txt", "secret-big-qz.bin", "secret-renamed-qz.txt"];
    let dir = fx.m(names[0]);
    fs::create_dir(&dir).unwrap();
    let small = marked_content(10_000, 3);
    let big = marked_content(3 << 20, 4);
    write_file(&dir.join(names[1]), &small);
    write_file(&fx.m(names[2]), &big);
    // A random write into the middle rewrites a sealed block in place.
    {
        let f = fs::OpenOptions::new().write(true).open(fx.m(names[2])).unwrap();
        f.write_all_at(b"KNOWN-PLAINTEXT-in-place", 1_000_000).unwrap();
        f.sync_all().unwrap();
    }
    fs::rename(dir.join(names[1]), dir.join(names[3])).unwrap();
    let staged = walk(&fx.cache.join("staging")).len();
    assert!(staged >= 2, "the written files are not in staging ({staged} files): this test would check nothing");
    assert!(assert_nothing_readable(&fx.state, &names) >= 2, "the state dir holds no files");
    assert_nothing_readable(&fx.cache, &names);
    m.flush();
    m.unmount();
    // Read through the block cache after a remount from a fresh state: blocks on disk.
    let m = fx.mount_with(&fx.root.join("state2"), &fx.cache, UPLOAD_DELAY);
    let mut want = big.clone();
    want[1_000_000..1_000_024].copy_from_slice(b"KNOWN-PLAINTEXT-in-place");
    assert!(read(&fx.m(names[2])) == want, "the big file differs after a remount");
    assert_eq!(read(&dir.join(names[3])), small);
    wait_for("blocks on disk", Duration::from_secs(10), || (!fx.block_files().is_empty()).then_some(()));
    m.unmount();
    assert_nothing_readable(&fx.cache, &names);
    assert_nothing_readable(&fx.root.join("state2"), &names);
    assert_nothing_readable(&fx.state, &names);
}

/// A first `ls -l` of a big folder asks for every file's attributes. On the local store a
/// HEAD answer holds the file open: with the answers kept until all had come, 3,000 files
/// held 3,000 descriptors (100,000 ran out of them and the listing hung).
#[test]
fn listing_a_big_folder_holds_few_files_open() {
    let fx = Fixture::new(&TIER, "nofile", Backend::Local);
    let root = fx.local_bucket().unwrap().join("big");
    fs::create_dir_all(&root).unwrap();
    for i in 0..3000 {
        fs::write(root.join(format!("f{i:04}")), b"x").unwrap();
    }
    let opts = fx.server.mount_opts();
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let spec = MountSpec {
        source: fx.source.as_ref(),
        state: &fx.state,
        cache: &fx.cache,
        opts: &opts,
        upload_delay: UPLOAD_DELAY,
        metadata_ttl: METADATA_TTL,
    };
    let m = Mount::start(&fx.dir, &spec, |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 4096, rlim_max: 4096 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    // Watch the daemon's open descriptors while `ls -l` runs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, pid) = (done.clone(), m.pid);
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let out = run_ok(sh("ls", &[&"-l", &fx.m("big")]));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert_eq!(out.stdout.lines().filter(|l| l.contains(" f")).count(), 3000, "ls -l listed the wrong count");
    assert!(peak < 300, "the daemon held up to {peak} open files while listing");
    assert_eq!(read(&fx.m("big/f2999")), b"x");
    m.unmount();
}

#[test]
fn remount_right_after_unmount() {
    let fx = Fixture::new(&TIER, "remount", Backend::Local);
    for i in 0..3 {
        let mut m = fx.mount_extra(&[]);
        write_file(&fx.m(&format!("f{i}")), b"x");
        // `autosync unmount` returns once the state dir is free: the next mount takes it.
        run_ok(&mut m.cli("unmount"));
        m.live = false;
    }
    let m = fx.mount_extra(&[]);
    assert_eq!(read(&fx.m("f2")), b"x");
    m.flush();
    m.unmount();
}

#[test]
fn another_block_size_never_reads_old_blocks() {
    let fx = Fixture::new(&TIER, "blocksize", Backend::Local);
    let data = Rng(41).bytes((5 << 20) + 12345);
    fx.bucket.put("f.bin", &data);
    let m = fx.mount_extra(&[]);
    assert!(read(&fx.m("f.bin")) == data);
    wait_for("the 6 blocks on disk", Duration::from_secs(10), || (fx.block_files().len() == 6).then_some(()));
    m.unmount();
    let m = fx.mount_extra(&["--block-size", "4M"]);
    assert!(read(&fx.m("f.bin")) == data, "a remount with 4M blocks reads wrong bytes");
    assert_eq!(m.cache_stats()["fetched_blocks"], 2, "4M blocks are fetched, not taken from the 1M ones");
    m.unmount();
}

#[test]
fn cache_warm_and_clear_commands() {
    let fx = Fixture::new(&TIER, "cachecmds", Backend::Local);
    let (a, b) = (Rng(31).bytes(3 << 20), Rng(32).bytes(2 << 20));
    fx.bucket.put("d/a.bin", &a);
    fx.bucket.put("d/sub/b.bin", &b);
    let m = fx.mount_extra(&[]);
    let out = run_ok(Command::new(BIN).args(["cache", "warm"]).arg(fx.m("d")));
    assert_eq!(out.stdout.trim(), "warmed 2 files, 5242880 bytes", "{out}");
    wait_for("the 5 warmed blocks on disk", Duration::from_secs(10), || (fx.block_files().len() == 5).then_some(()));
    assert_eq!(m.cache_stats()["fetched_blocks"], 5);

    let mut clear = Command::new(BIN);
    clear.args(["cache", "clear"]).arg(&fx.mnt).arg("--state-dir").arg(&fx.state);
    run_ok(&mut clear);
    assert!(fx.block_files().is_empty(), "block files left after `cache clear`");
    let st = m.cache_stats();
    assert_eq!(st["disk"]["bytes"], 0, "{st}");
    // The kernel may still hold the pages of a.bin; b.bin is read through a new handle.
    assert!(read(&fx.m("d/sub/b.bin")) == b);
    assert!(m.cache_stats()["fetched_blocks"].as_u64().unwrap() >= 5, "nothing fetched after clear");
    m.unmount();
}

#[test]
fn block_cache_stays_under_its_bound() {
    let fx = Fixture::new(&TIER, "cachebound", Backend::Local);
    let data = Rng(12).bytes(12 << 20);
    fx.bucket.put("big.bin", &data);
    let m = fx.mount_extra(&["--cache-size", "4M"]);
    // Read twice the bound... three times, then once more.
    assert!(read(&fx.m("big.bin")) == data);
    wait_for("evictions", Duration::from_secs(10), || {
        (m.cache_stats()["disk"]["evictions"].as_u64().unwrap() >= 8).then_some(())
    });
    let total: u64 = fx.block_files().iter().map(|(_, l)| l).sum();
    assert!(total <= 4 << 20, "{total} bytes of blocks on disk with --cache-size 4M");
    let st = m.cache_stats();
    assert!(st["disk"]["bytes"].as_u64().unwrap() <= 4 << 20, "{st}");
    m.unmount();
}

/// `autosync flush` on a terminal (a pty from `script`) draws a progress bar of changes and
/// bytes, then prints one summary line.
#[test]
fn flush_on_a_terminal_shows_progress_and_a_summary() {
    let fx = Fixture::new(&TIER, "flushbar", Backend::Local);
    let m = fx.mount_with(&fx.state, &fx.cache, "3600");
    for i in 0..3 {
        write_file(&fx.m(&format!("f{i}")), &Rng(40 + i).bytes(4 << 20));
    }
    let cmd = format!("{BIN} flush {} --state-dir {}", fx.dir.mnt.display(), fx.state.display());
    let out = run_ok(sh("script", &[&"-qec", &cmd, &"/dev/null"]));
    let screen = out.stdout.replace('\r', "\n");
    assert!(screen.contains("3/3 changes") && screen.contains("12.00 MiB/12.00 MiB"), "no progress bar:\n{screen}");
    assert!(screen.contains("flushed 3 change(s), 12582912 bytes in"), "no summary:\n{screen}");
    for i in 0..3 {
        assert!(fx.bucket.get(&format!("f{i}")).data == Rng(40 + i).bytes(4 << 20));
    }
    // Not on a terminal: nothing but the exit status.
    write_file(&fx.m("f0"), b"again");
    let out = run_ok(m.cli("flush"));
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    m.unmount();
}

/// Unmounts a tmpfs (lazily, so a failed test cannot leave it busy) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        run_ok(sh("mount", &[&"-t", &"tmpfs", &"-o", &format!("size={size}"), &"autosync-test", &at]));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The cache dir's disk fills up: writes get ENOSPC, what was acknowledged stays intact,
/// and once the uploads are done their local copies make room, so writing works again.
#[test]
fn a_full_cache_disk_gives_enospc_and_writes_resume_after_uploads() {
    let fx = Fixture::new(&TIER, "enospc", Backend::Local);
    let _tmpfs = Tmpfs::mount(&fx.cache, "64m");
    // Nothing uploads (so nothing leaves staging) until the flush.
    let mut opts = fx.server.mount_opts();
    opts.extend(["--cache-size", "1M"].map(String::from));
    let m = fx.server.mount_with_opts(
        &fx.dir,
        &fx.source,
        (&fx.state, &fx.cache),
        ("3600", METADATA_TTL),
        fx.server.creds(),
        opts,
    );
    let a = Rng(31).bytes(24 << 20);
    write_file(&fx.m("a.bin"), &a);
    let out = run(sh(
        "dd",
        &[&"if=/dev/urandom", &format!("of={}", fx.m("b.bin").display()), &"bs=1M", &"count=80", &"conv=fsync"],
    ));
    assert!(!out.ok() && out.stderr.contains("No space left on device"), "{out}");
    assert!(read(&fx.m("a.bin")) == a, "acknowledged data changed");
    assert!(fs::read_to_string(&fx.dir.log).unwrap().contains("writes get ENOSPC"), "nothing in the log");
    m.flush();
    // b holds what went in before the disk filled; both are in the bucket now.
    let b = read(&fx.m("b.bin"));
    assert!(b.len() >= 8 << 20 && b.len() < 80 << 20, "{} bytes of b", b.len());
    let c = Rng(32).bytes(24 << 20);
    write_file(&fx.m("c.bin"), &c);
    m.flush();
    assert!(fx.bucket.get("a.bin").data == a && fx.bucket.get("b.bin").data == b && fx.bucket.get("c.bin").data == c);
    assert!(read(&fx.m("c.bin")) == c);
    m.unmount();
}

#[test]
fn a_remote_change_invalidates_cached_blocks_and_the_page_cache() {
    let fx = Fixture::new(&TIER, "cacheinval", Backend::Local);
    let v1 = marked_content(3 << 20, 21);
    let v2 = marked_content(3 << 20, 22);
    fx.bucket.put("f.bin", &v1);
    let m = fx.mount_extra(&[]);
    let path = fx.m("f.bin");
    assert!(read(&path) == v1);
    // Opened again unchanged: the kernel keeps its cached pages, so no read reaches the mount.
    let reads = m.cache_stats()["reads"].as_u64().unwrap();
    assert!(read(&path) == v1);
    assert_eq!(m.cache_stats()["reads"].as_u64().unwrap(), reads, "an unchanged file was read again");

    // Another client replaces it with the same size: once the metadata TTL has passed, an
    // open sees the new version, and neither the page cache nor the block cache serves v1.
    fx.bucket.put("f.bin", &v2);
    wait_for("the new version in the mount", Duration::from_secs(20), || (read(&path) == v2).then_some(()));
    m.unmount();
    let m = fx.mount_extra(&[]);
    assert!(read(&path) == v2, "the disk cache served the old version after a remount");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// GCS: what the emulator supports
// ---------------------------------------------------------------------------------------------

/// fake-gcs-server (the only GCS emulator the registries have) refuses the XML API uploads
/// object_store sends, so the suite above cannot run on it. This test covers what it does take:
/// objects put through its JSON API are listed, read (whole and by range) with their attributes,
/// new ones appear after the metadata TTL, deletes in the mount reach the bucket, a write in the
/// mount is kept (and stays pending, with the refusal in `status`).
#[test]
fn gcs_lists_reads_and_deletes() {
    let fx = Fixture::new(&TIER, "gcs", Backend::Gcs);
    let Server::Gcs(gcs) = &fx.server else { unreachable!() };
    let attrs = |mode: u32| {
        vec![("mode", mode.to_string()), ("uid", "1234".into()), ("gid", "5678".into()), ("mtime", STAMP.to_string())]
    };
    let big = Rng(9).bytes(3 << 20);
    gcs.gcs_put("bkt", "docs/a.txt", b"seeded through the JSON API\n", &attrs(libc::S_IFREG | 0o640));
    gcs.gcs_put("bkt", "docs/sub/big.bin", &big, &[]);
    gcs.gcs_put("bkt", "top.txt", b"top\n", &[]);
    gcs.gcs_put("bkt", "link", b"docs/a.txt", &attrs(libc::S_IFLNK | 0o777));
    let m = fx.mount();

    let names = |rel: &str| {
        let mut v: Vec<String> =
            fs::read_dir(fx.m(rel)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(""), ["docs", "link", "top.txt"]);
    assert_eq!(names("docs"), ["a.txt", "sub"]);
    assert_eq!(read(&fx.m("docs/a.txt")), b"seeded through the JSON API\n");
    check_attrs(&fx.m("docs/a.txt"), 0o640, "from GCS metadata");
    assert_eq!(fs::read_link(fx.m("link")).unwrap(), Path::new("docs/a.txt"));
    assert_eq!(read(&fx.m("link")), b"seeded through the JSON API\n");
    let f = fs::File::open(fx.m("docs/sub/big.bin")).unwrap();
    let mut part = vec![0u8; 4096];
    f.read_exact_at(&mut part, 2_000_000).unwrap();
    assert!(part == big[2_000_000..2_000_000 + 4096], "a range read of big.bin differs");
    assert!(read(&fx.m("docs/sub/big.bin")) == big, "big.bin differs");

    // Another client's new object appears once the metadata TTL has passed.
    gcs.gcs_put("bkt", "docs/later.txt", b"later\n", &[]);
    wait_for("docs/later.txt to appear in the mount", Duration::from_secs(20), || {
        (names("docs") == ["a.txt", "later.txt", "sub"]).then_some(())
    });
    assert_eq!(read(&fx.m("docs/later.txt")), b"later\n");

    // A delete in the mount reaches the bucket.
    fs::remove_file(fx.m("top.txt")).unwrap();
    wait_for("top.txt to leave the bucket", Duration::from_secs(30), || {
        fx.bucket.try_get("top.txt").is_none().then_some(())
    });
    assert_eq!(fx.bucket.data("docs/a.txt"), b"seeded through the JSON API\n");

    // A write is kept in the mount while the emulator refuses its upload.
    write_file(&fx.m("new.txt"), b"kept locally\n");
    assert_eq!(read(&fx.m("new.txt")), b"kept locally\n");
    let status = wait_for("status to show the refused upload", Duration::from_secs(20), || {
        let out = run_ok(&mut m.cli("status")).stdout;
        out.lines()
            .any(|l| l.starts_with("last error:") && l.contains("new.txt") && l.contains("invalid uploadType"))
            .then_some(out)
    });
    assert!(status.contains("pending uploads: 1 "), "status:\n{status}");
    m.kill9();
}

// ---------------------------------------------------------------------------------------------
// Every test against every backend
// ---------------------------------------------------------------------------------------------

against_every_backend!(
    two_mounts_of_one_bucket_keep_every_version_and_converge,
    two_mounts_rename_edit_and_folder_rename_add,
    two_mounts_merge_text_and_the_poll_shows_changes,
    cp_tree_then_diff_mount_and_bucket,
    git_clone_status_log_commit,
    sqlite_database_in_the_mount,
    random_writes_into_a_64_mib_file,
    edits_of_a_big_file_already_in_the_bucket,
    rename_a_folder_of_1000_files,
    chmod_chown_touch_survive_remount,
    long_names_and_exact_times,
    sigkill_then_remount_replays_the_journal,
    bad_input_fails_with_one_line_and_mounts_nothing,
    rename_rmdir_noreplace_and_link_semantics,
    open_files_outlive_unlink_and_rename_over,
    executable_script_runs_from_the_mount,
    special_files_fifo_socket_and_devices,
);
