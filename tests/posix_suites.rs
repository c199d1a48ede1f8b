//! The POSIX test suites other filesystems are judged by, run against a real mount: the
//! crates.io `pjdfstest` (the Rust port of the suite JuiceFS and ZeroFS run), and `fsx`
//! (random reads, writes, truncates and mmaps of one file, checked against a model in
//! memory). Each runs on a local-folder bucket and on moto's S3.
//!
//! pjdfstest must pass but for the patterns of `tests/posix/pjdfstest-exclusions`, each with
//! its reason; a pattern that no longer matches a failure fails the test too, so the list
//! only shrinks. The tools are found at `$AUTOSYNC_PJDFSTEST` / `$AUTOSYNC_FSX`, then in
//! `~/.cargo/bin`, then on `PATH` (`bash .ci/run` installs both with `cargo install`).

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fixture::Fixture;
use common::servers::{Backend, find_exe};
use common::{Mount, Tier, read, try_run};

static TIER: Tier = Tier::real_mount("autosync-posix-");

const SUITE_TIMEOUT: Duration = Duration::from_secs(1200);

/// A mounted bucket of `backend` in its own temp dir, which other users may enter (the
/// permission cases of pjdfstest run as `nobody` and `daemon`).
fn mounted(name: &str, backend: Backend) -> (Fixture, Mount) {
    let fx = Fixture::new(&TIER, name, backend);
    fs::set_permissions(&fx.root, fs::Permissions::from_mode(0o755)).unwrap();
    let m = fx.mount();
    (fx, m)
}

fn tool(var: &str, name: &str) -> PathBuf {
    let install = format!("install it with `cargo install {name} --locked` (or run `bash .ci/run`), or set {var}");
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin").join(name));
    find_exe(var, &home.into_iter().collect::<Vec<_>>(), name, &install)
        .unwrap_or_else(|| panic!("{name} not found (not in {var}, ~/.cargo/bin or PATH): {install}"))
}

fn suite_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/posix").join(name)
}

/// The exclusion patterns, each with its reason.
fn exclusions() -> Vec<(String, String)> {
    parse_exclusions(&fs::read_to_string(suite_file("pjdfstest-exclusions")).unwrap())
}

/// Exclusion lines: `PATTERN REASON`; blank lines and `#` comments skipped.
fn parse_exclusions(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (pattern, reason) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            assert!(!reason.trim().is_empty(), "exclusion `{pattern}` has no reason");
            (pattern.to_string(), reason.trim().to_string())
        })
        .collect()
}

fn matches(pattern: &str, test: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => test.starts_with(prefix),
        None => pattern == test,
    }
}

/// pjdfstest's verdicts: (passed, failed, skipped) test names, from lines `NAME  ok`.
fn verdicts(out: &str) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let (mut ok, mut failed, mut skipped) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(verdict), None) = (words.next(), words.next(), words.next()) else { continue };
        if !name.contains("::") {
            continue;
        }
        match verdict {
            "ok" => ok.insert(name.to_string()),
            "FAILED" => failed.insert(name.to_string()),
            "skipped" => skipped.insert(name.to_string()),
            _ => continue,
        };
    }
    (ok, failed, skipped)
}

fn pjdfstest(backend: Backend) {
    let (fx, m) = mounted("pjdfstest", backend);
    let mut cmd = Command::new(tool("AUTOSYNC_PJDFSTEST", "pjdfstest"));
    cmd.current_dir(&fx.mnt).arg("-c").arg(suite_file("pjdfstest.toml")).arg("-p").arg(&fx.mnt);
    let out = try_run(&mut cmd, SUITE_TIMEOUT, None).unwrap_or_else(|e| panic!("{e}"));
    fs::write(fx.root.join("pjdfstest.out"), format!("{}\n{}", out.stdout, out.stderr)).unwrap();
    let (ok, failed, skipped) = verdicts(&out.stdout);
    let total = ok.len() + failed.len() + skipped.len();
    assert!(total > 300, "pjdfstest ran {total} tests, expected about 400: {out}");

    let excluded = exclusions();
    let unexpected: Vec<_> = failed.iter().filter(|t| !excluded.iter().any(|(p, _)| matches(p, t))).collect();
    let stale: Vec<_> = excluded.iter().filter(|(p, _)| !failed.iter().any(|t| matches(p, t))).collect();
    eprintln!(
        "pjdfstest on {}: {} passed, {} failed ({} expected), {} skipped of {total}",
        backend.name(),
        ok.len(),
        failed.len(),
        failed.len() - unexpected.len(),
        skipped.len()
    );
    assert!(
        unexpected.is_empty(),
        "pjdfstest tests failed that are not in tests/posix/pjdfstest-exclusions: {unexpected:?} \
         (output: {})",
        fx.root.join("pjdfstest.out").display()
    );
    assert!(stale.is_empty(), "these exclusions match no failure any more, remove them: {stale:?}");
    m.unmount();
}

/// fsx on one file of the mount, `ops` operations; then what reached the bucket is the
/// file as fsx left it.
fn fsx(backend: Backend, ops: u32) {
    let (fx, m) = mounted("fsx", backend);
    let artifacts = fx.root.join("fsx");
    fs::create_dir(&artifacts).unwrap();
    let file = fx.m("fsx.bin");
    let mut cmd = Command::new(tool("AUTOSYNC_FSX", "fsx"));
    cmd.arg("-N").arg(ops.to_string()).arg("-S").arg("20261207").arg("-P").arg(&artifacts).arg(&file);
    let out = try_run(&mut cmd, SUITE_TIMEOUT, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.ok() && out.stdout.contains("All operations completed A-OK"), "fsx failed: {out}");
    let local = read(&file);
    m.flush();
    assert!(fx.bucket.data("fsx.bin") == local, "the bucket's fsx.bin differs from the mount's after a flush");
    m.unmount();
}

fn fsx_many(backend: Backend) {
    // 100,000 operations on a local folder, 20,000 on S3 (as the issue asks).
    fsx(backend, if backend == Backend::Local { 100_000 } else { 20_000 });
}

mod local {
    use super::*;

    #[test]
    fn pjdfstest() {
        super::pjdfstest(Backend::Local)
    }

    #[test]
    fn fsx() {
        super::fsx_many(Backend::Local)
    }
}

mod moto {
    use super::*;

    #[test]
    fn pjdfstest() {
        super::pjdfstest(Backend::Moto)
    }

    #[test]
    fn fsx() {
        super::fsx_many(Backend::Moto)
    }
}

#[test]
fn verdict_lines_and_patterns_are_read() {
    let out = "link::a   ok\nlink::b::c     FAILED\n\tassertion failed\nx::y   skipped\n\trequires\nSummary: 1 failed";
    let (ok, failed, skipped) = verdicts(out);
    assert_eq!((ok.len(), failed.len(), skipped.len()), (1, 1, 1));
    assert!(matches("link::b::*", "link::b::c") && !matches("link::b", "link::b::c"));
    let parsed = parse_exclusions("# comment\n\nlink::b::*   why it fails\n");
    assert_eq!(parsed, [("link::b::*".to_string(), "why it fails".to_string())]);
    // The file in the repo reads (every line has a reason; it is empty now).
    assert!(exclusions().len() <= 5, "the issue allows 5 exclusions at most");
}
