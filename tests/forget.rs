//! The daemon's memory follows what the kernel holds: entries of a big folder stay while
//! the kernel has them, and leave (down to `--max-inodes`) once it forgets them. A test
//! binary of its own, because making the kernel forget (`drop_caches`) is global: it would
//! disturb the page-cache checks of tests running next to it.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::servers::{Backend, Server};
use common::{Mount, MountSpec, TestDir, Tier, UPLOAD_DELAY, read, run_ok, wait_for};

static TIER: Tier = Tier::real_mount("autosync-forget-");

fn inodes(m: &Mount) -> u64 {
    let out = run_ok(m.cli("status").arg("--json"));
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {out}"));
    v["inodes"].as_u64().unwrap_or_else(|| panic!("no inode count in {v}"))
}

fn drop_kernel_caches() {
    let out = run_ok(Command::new("sh").args(["-c", "sync; echo 2 > /proc/sys/vm/drop_caches"]));
    assert!(out.ok(), "{out}");
}

#[test]
fn entries_leave_memory_once_the_kernel_forgets_them() {
    let dir = TestDir::new(&TIER, "local");
    let server = Server::start(Backend::Local, &dir.root, "server");
    server.create_bucket("bkt");
    let Server::Local(root) = &server else { unreachable!() };
    let big = root.join("bkt/big");
    fs::create_dir_all(&big).unwrap();
    for i in 0..3000 {
        fs::write(big.join(format!("f{i:04}")), format!("{i}")).unwrap();
    }
    let (state, cache) = (dir.root.join("state"), dir.root.join("cache"));
    let mut opts = server.mount_opts();
    opts.extend(["--max-inodes".to_string(), "1000".to_string()]);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let source = server.source("bkt", "");
    let spec = MountSpec {
        source: source.as_ref(),
        state: &state,
        cache: &cache,
        opts: &opts,
        upload_delay: UPLOAD_DELAY,
        metadata_ttl: "1",
    };
    let m = Mount::start(&dir, &spec, |_| {});
    let out = run_ok(Command::new("ls").arg("-l").arg(dir.mnt.join("big")));
    assert_eq!(out.stdout.lines().filter(|l| l.contains(" f")).count(), 3000);
    // The kernel holds all 3,000: they stay, over the bound.
    assert!(inodes(&m) >= 3000, "{} inodes while the kernel holds 3,000", inodes(&m));
    // Once it forgets them, they leave at the next request (a listing stays at least its TTL).
    drop_kernel_caches();
    let left = wait_for("the forgotten entries to leave memory", Duration::from_secs(30), || {
        run_ok(Command::new("ls").arg(&dir.mnt));
        let n = inodes(&m);
        (n < 1000).then_some(n)
    });
    assert!(left < 1000, "{left}");
    // What left is listed again when asked for.
    assert_eq!(read(&dir.mnt.join("big/f2999")), b"2999");
    assert_eq!(run_ok(Command::new("ls").arg(dir.mnt.join("big"))).stdout.lines().count(), 3000);
    m.unmount();
}
