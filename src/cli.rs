//! Command-line interface: argument definitions and the small glue that runs each command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};

use crate::control::{self, Request};
use crate::mount::{self, MountOptions};
use crate::source::Endpoint;

#[derive(Debug, Parser)]
#[command(name = "autosync", version, about = "Mount a cloud bucket (or a local folder) as a local drive")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum Command {
    /// Mount SOURCE (s3://, gs://, az://, file://, a local path, memory://) at MOUNTPOINT.
    Mount {
        source: String,
        mountpoint: PathBuf,
        /// This mount's state dir (database, journal, lock, control socket).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// This mount's cache dir (staged file contents, and the encrypted block cache).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Bound of the block cache on disk, e.g. 10G or 512M [default: 10% of the free
        /// space of the cache dir's filesystem, within 256M..20G].
        #[arg(long, value_parser = size)]
        cache_size: Option<u64>,
        /// Bound of staged file contents (changes not yet uploaded, and local copies of
        /// files written here), e.g. 20G. Past it, copies already in the bucket leave the
        /// cache dir, and writes get ENOSPC if that is not enough [default: the disk, less
        /// a reserve of 1/16 of it, at most 64M].
        #[arg(long, value_parser = size)]
        staging_size: Option<u64>,
        /// Bound of the daemon's buffers of file contents: half for decrypted blocks kept in
        /// memory (read-ahead windows of at most a quarter each fill it), half for uploads in
        /// flight (at least one 8 MiB part), and an eighth more for blocks on their way to
        /// the disk cache.
        #[arg(long, value_parser = size, default_value = "64M")]
        memory_limit: u64,
        /// Bytes per block: the unit of ranged reads and of the caches (64K to 64M).
        #[arg(long, value_parser = block_size, default_value = "1M")]
        block_size: u64,
        /// Folder entries kept in memory beyond those the kernel holds or with changes
        /// not yet uploaded (about 1 KiB each): least recently used folders go first.
        #[arg(long, default_value_t = crate::fs::DEFAULT_MAX_INODES)]
        max_inodes: u64,
        /// Seconds a read waits for the bucket (data not cached) before it fails with EIO.
        #[arg(long, default_value = "30")]
        io_timeout: f64,
        /// The 32-byte key that seals the cache (raw, or 64 hex digits) [default:
        /// $CREDENTIALS_DIRECTORY/autosync.key, else STATE_DIR/cache.key, made on first use].
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Return once the mount is live, leaving it running in the background.
        #[arg(long)]
        daemon: bool,
        /// Seconds between the last change to a file and its upload, once no process holds
        /// it open; a file held open waits at least 2 s after its last write.
        #[arg(long, default_value_t = 0.2)]
        upload_delay: f64,
        /// Most changes uploaded at once. Changes to one path, or to paths above or below
        /// each other, still go in the order they were made.
        #[arg(long, default_value_t = crate::fs::DEFAULT_TRANSFERS)]
        transfers: usize,
        /// Seconds a folder listing is trusted before asking the bucket again.
        #[arg(long, default_value_t = 5.0)]
        metadata_ttl: f64,
        /// Seconds between background listings of the folders in use (open, or holding
        /// files the kernel looked up), which show others' changes and drop the kernel's
        /// caches of them; 0 turns the poll off.
        #[arg(long, default_value_t = 15.0)]
        poll_interval: f64,
        /// What decides a conflict (the bucket changed since this mount read the file):
        /// keep-both (the bucket's version keeps the path, ours becomes a conflict copy),
        /// newest (the later mtime wins), local (ours wins), remote (the bucket's wins),
        /// priority (the host or user ranked higher in --conflict-priority wins), merge (a
        /// three-way merge of text files; keep-both when that is not possible).
        #[arg(long, value_parser = policy, default_value = "keep-both")]
        conflict: crate::fs::Policy,
        /// What happens to the losing version with --conflict newest, local or remote:
        /// keep (saved as a conflict copy) or discard.
        #[arg(long, value_parser = ["keep", "discard"], default_value = "keep")]
        conflict_loser: String,
        /// Per-path conflict rules: a file of `PATTERN POLICY [keep|discard]` lines (`#`
        /// comments); the first pattern that matches a file's path decides for it.
        #[arg(long)]
        conflict_rules: Option<PathBuf>,
        /// For --conflict priority (or a rule using it): host names and @USER names (the
        /// user running the writer's autosync), highest rank first, comma-separated. A
        /// version ranks by the better of its host and its user; one written by an unlisted
        /// host and user, or by another tool, ranks below every listed one; a tie goes to
        /// the bucket's version.
        #[arg(long, value_delimiter = ',')]
        conflict_priority: Vec<String>,
        /// Seconds to keep uploading after SIGTERM/Ctrl-C before unmounting.
        #[arg(long, default_value_t = 30.0)]
        shutdown_grace: f64,
        /// Endpoint URL: an S3-compatible server (MinIO, Garage...), the GCS base URL, or the
        /// Azure account's blob URL (with AZURE_STORAGE_USE_EMULATOR, Azurite's address).
        #[arg(long)]
        endpoint: Option<String>,
        /// S3 region.
        #[arg(long)]
        region: Option<String>,
        /// Allow plain http:// endpoints.
        #[arg(long)]
        allow_http: bool,
    },
    /// Unmount, after uploading what can be uploaded within the mount's grace period.
    Unmount {
        mountpoint: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Wait until every local change is in the bucket.
    Flush {
        mountpoint: PathBuf,
        /// Give up after this many seconds (exit 1, saying what is pending).
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The block cache: counters, prefetching, emptying.
    Cache {
        #[command(subcommand)]
        action: CacheCommand,
    },
    /// List the conflicts this mount met: when, which file, both versions, the policy and
    /// what it did.
    Conflicts {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Follow what the mount does and sees, one line per event, like `tail -f`: changes
    /// made here, uploads, conflicts, changes found in the bucket (schema: docs/FORMAT.md).
    Events {
        mountpoint: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Start at this sequence number: first what the mount still holds (a `lagged` line
        /// says how many it no longer has), then what comes.
        #[arg(long)]
        since: Option<u64>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Show pending uploads, the last error and cache use.
    Status {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn policy(s: &str) -> Result<crate::fs::Policy, String> {
    s.parse()
}

/// A size such as 512M, 10G or 4096 (K, M, G, T: powers of 1024).
fn size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{e}: give a size such as 512M or 10G (K, M, G, T are powers of 1024)"))
}

fn block_size(s: &str) -> Result<u64, String> {
    let v = size(s)?;
    if !(64 << 10..=64 << 20).contains(&v) {
        return Err(format!("{v} bytes is out of range: give a block size from 64K to 64M"));
    }
    Ok(v)
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Hits, misses, bytes, evictions and integrity failures of the mount's block cache.
    Stats {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Read files (folders: everything in them) through the mount, so that their blocks are
    /// in the cache; a progress bar on a terminal.
    Warm {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Empty the mount's block cache, in memory and on disk (staged changes stay).
    Clear {
        mountpoint: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    if !v.is_finite() || v < 0.0 {
        bail!("--{what} must be a number of seconds, 0 or more");
    }
    Ok(Duration::from_secs_f64(v))
}

fn socket_for(mountpoint: &Path, state_dir: Option<&Path>) -> PathBuf {
    match state_dir {
        Some(d) => d.join("control.sock"),
        None => mount::registry_path(mountpoint),
    }
}

fn call(mountpoint: &Path, state_dir: Option<&Path>, req: Request) -> anyhow::Result<control::Reply> {
    let socket = socket_for(mountpoint, state_dir);
    if !socket.exists() {
        bail!("no autosync mount at {}: mount it first (or pass the mount's --state-dir)", mountpoint.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(control::call(&socket, &req))
}

/// `events`: prints the mount's event stream until the mount goes away.
fn events(mountpoint: &Path, state_dir: Option<&Path>, json: bool, since: Option<u64>) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let socket = socket_for(mountpoint, state_dir);
    if !socket.exists() {
        bail!("no autosync mount at {}: mount it first (or pass the mount's --state-dir)", mountpoint.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut lines = control::events(&socket, since).await?.lines();
        let mut out = std::io::stdout().lock();
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            let line = tokio::select! {
                l = lines.next_line() => l?,
                _ = check.tick() => {
                    // The reader of our output went away (`| head`): stop now, not at the
                    // next event.
                    if stdout_closed() {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(line) = line else { break };
            let text = if json {
                line
            } else {
                match serde_json::from_str::<crate::fs::Event>(&line) {
                    Ok(e) => describe_event(&e),
                    Err(_) => line,
                }
            };
            // A closed pipe (`| head`) ends the command quietly.
            if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
        }
        Ok(())
    })
}

/// Whether standard output is a pipe whose reader is gone.
fn stdout_closed() -> bool {
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let mut fds = [nix::poll::PollFd::new(stdout.as_fd(), nix::poll::PollFlags::empty())];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| r.intersects(nix::poll::PollFlags::POLLERR | nix::poll::PollFlags::POLLHUP))
}

/// One event as a line for people: number, time, kind, path, and what else it carries.
fn describe_event(e: &crate::fs::Event) -> String {
    let kind = serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let mut line = format!("{:>6} {} {kind:<18}", e.seq, e.time);
    if let Some(p) = &e.path {
        line.push_str(&format!(" {p}"));
    }
    if let Some(f) = &e.from {
        line.push_str(&format!(" (from {f})"));
    }
    let extra = [
        e.op.as_ref().map(|o| format!("op={o}")),
        e.change.as_ref().map(|c| format!("change={c}")),
        e.bytes.map(|b| format!("bytes={b}")),
        e.size.map(|s| format!("size={s}")),
        e.uid.map(|u| format!("uid={u}")),
        e.pid.map(|p| format!("pid={p}")),
        e.missed.map(|m| format!("missed={m}")),
        e.policy.as_ref().map(|p| format!("policy={p}")),
    ];
    for x in extra.into_iter().flatten() {
        line.push_str(&format!(" {x}"));
    }
    for m in [&e.outcome, &e.message].into_iter().flatten() {
        line.push_str(&format!(": {m}"));
    }
    line
}

/// `flush` on a terminal: a progress bar of the changes and bytes sent (from the mount's
/// status, asked every 200 ms while the flush runs), then one summary line.
fn flush_with_progress(mountpoint: &Path, state_dir: Option<&Path>, req: Request) -> anyhow::Result<control::Reply> {
    let socket = socket_for(mountpoint, state_dir);
    if !socket.exists() {
        bail!("no autosync mount at {}: mount it first (or pass the mount's --state-dir)", mountpoint.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let status =
            || async { control::call(&socket, &Request::Status).await.ok().and_then(|r| r.status).unwrap_or_default() };
        let start = status().await;
        let started = std::time::Instant::now();
        let bar = indicatif::ProgressBar::new(start.pending_bytes).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let (mut len, mut files_done) = (start.pending_bytes, 0);
        let mut show = |st: &crate::fs::Status| {
            files_done = st.uploads_done.saturating_sub(start.uploads_done);
            len = len.max(bar.position() + st.pending_bytes);
            bar.set_length(len);
            bar.set_position(len - st.pending_bytes);
            bar.set_message(format!("{files_done}/{} changes", files_done + st.pending_ops as u64));
        };
        show(&start);
        let flush = control::call(&socket, &req);
        tokio::pin!(flush);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let reply = loop {
            tokio::select! {
                r = &mut flush => break r?,
                _ = tick.tick() => show(&status().await),
            }
        };
        if let Some(st) = &reply.status {
            show(st);
        }
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        let sent = bar.position();
        eprintln!(
            "flushed {files_done} change(s), {sent} bytes in {secs:.1} s ({:.1} MiB/s)",
            sent as f64 / secs.max(1e-3) / (1 << 20) as f64
        );
        Ok(reply)
    })
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount {
            source,
            mountpoint,
            state_dir,
            cache_dir,
            cache_size,
            staging_size,
            memory_limit,
            block_size,
            max_inodes,
            io_timeout,
            key_file,
            daemon,
            upload_delay,
            transfers,
            metadata_ttl,
            poll_interval,
            conflict,
            conflict_loser,
            conflict_rules,
            conflict_priority,
            shutdown_grace,
            endpoint,
            region,
            allow_http,
        } => {
            let discard_loser = conflict_loser == "discard";
            if discard_loser && conflict.keeps_both() {
                bail!(
                    "--conflict-loser discard needs --conflict newest, local, remote or priority ({} keeps both versions)",
                    conflict.name()
                );
            }
            let rules = match &conflict_rules {
                None => Vec::new(),
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .map_err(|e| anyhow!("--conflict-rules {}: cannot read it: {e}", p.display()))?;
                    crate::fs::ConflictConfig::parse_rules(&text)
                        .map_err(|e| anyhow!("--conflict-rules {}: {e}", p.display()))?
                }
            };
            let uses_priority = conflict == crate::fs::Policy::Priority
                || rules.iter().any(|r| r.policy == crate::fs::Policy::Priority);
            if uses_priority && conflict_priority.is_empty() {
                bail!("--conflict priority needs --conflict-priority HOST|@USER[,...] (highest rank first)");
            }
            if transfers == 0 {
                bail!("--transfers must be at least 1, e.g. 16");
            }
            let opts = MountOptions {
                source,
                mountpoint,
                state_dir,
                cache_dir,
                cache_size,
                staging_size,
                memory_limit,
                block_size,
                max_inodes,
                io_timeout: match secs(io_timeout, "io-timeout")? {
                    d if d.is_zero() => bail!("--io-timeout must be more than 0 seconds, e.g. 30"),
                    d => d,
                },
                key_file,
                upload_delay: secs(upload_delay, "upload-delay")?,
                transfers,
                metadata_ttl: secs(metadata_ttl, "metadata-ttl")?,
                poll_interval: secs(poll_interval, "poll-interval")?,
                shutdown_grace: secs(shutdown_grace, "shutdown-grace")?,
                conflict: crate::fs::ConflictConfig {
                    policy: conflict,
                    discard_loser,
                    rules: std::sync::Arc::new(rules),
                    priority: std::sync::Arc::new(conflict_priority),
                },
                endpoint: Endpoint { endpoint, region, allow_http },
                announce_ready: std::env::var_os("AUTOSYNC_ANNOUNCE_READY").is_some(),
            };
            if daemon {
                let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--daemon").collect();
                return mount::daemonize(args);
            }
            mount::run(opts)
        }
        Command::Unmount { mountpoint, state_dir } => {
            // The state dir's lock, found before the daemon removes the registry entry.
            let lock = std::fs::canonicalize(socket_for(&mountpoint, state_dir.as_deref()))
                .ok()
                .and_then(|s| s.parent().map(|d| d.join("lock")));
            match call(&mountpoint, state_dir.as_deref(), Request::Unmount) {
                Ok(_) => {
                    // The daemon flushes, then unmounts itself; wait for the mount to go, then
                    // for the daemon to release the state dir (so a new mount can take it).
                    let deadline = std::time::Instant::now() + Duration::from_secs(600);
                    while is_mounted(&mountpoint) {
                        if std::time::Instant::now() > deadline {
                            bail!("{} is still mounted after 10 minutes", mountpoint.display());
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if let Some(lock) = lock {
                        wait_released(&lock, Duration::from_secs(30));
                    }
                    Ok(())
                }
                Err(e) if is_mounted(&mountpoint) => {
                    // No daemon answers (killed?): detach the dead mount.
                    nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH)
                        .map_err(|errno| anyhow!("cannot unmount {}: {errno} ({e})", mountpoint.display()))
                }
                Err(e) => Err(e),
            }
        }
        Command::Flush { mountpoint, timeout, state_dir } => {
            let timeout = secs(timeout, "timeout")?;
            let req = Request::Flush { timeout_secs: timeout.as_secs_f64() };
            let reply = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                flush_with_progress(&mountpoint, state_dir.as_deref(), req)?
            } else {
                call(&mountpoint, state_dir.as_deref(), req)?
            };
            if reply.ok {
                return Ok(());
            }
            let st = reply.status.unwrap_or_default();
            let why = st.last_error.map(|e| format!("; last error: {e}")).unwrap_or_default();
            bail!(
                "flush timed out after {:.0} s: {} changes ({} bytes) still pending{why}",
                timeout.as_secs_f64(),
                st.pending_ops,
                st.pending_bytes
            )
        }
        Command::Cache { action: CacheCommand::Stats { mountpoint, json, state_dir } } => {
            let reply = call(&mountpoint, state_dir.as_deref(), Request::Status)?;
            let c = reply.status.ok_or_else(|| anyhow!("the mount sent no status"))?.cache;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
                return Ok(());
            }
            match &c.disk {
                Some(d) => {
                    println!("disk:               {} of {} bytes in {} blocks", d.bytes, d.capacity, d.blocks);
                    println!("hits:               {} ({} of them parts of blocks)", d.hits, d.range_hits);
                    println!("misses:             {}", d.misses);
                    println!("evictions:          {}", d.evictions);
                    println!("integrity failures: {}", d.integrity_failures);
                }
                None => println!("disk:               none (blocks are kept in memory only)"),
            }
            println!("memory:             {} of {} bytes", c.memory_bytes, c.memory_limit);
            println!("block size:         {} bytes", c.block_size);
            println!("fetched:            {} blocks, {} bytes", c.fetched_blocks, c.fetched_bytes);
            Ok(())
        }
        Command::Cache { action: CacheCommand::Clear { mountpoint, state_dir } } => {
            let reply = call(&mountpoint, state_dir.as_deref(), Request::CacheClear)?;
            if !reply.ok {
                bail!("cannot clear the cache: {}", reply.error.unwrap_or_default());
            }
            Ok(())
        }
        Command::Cache { action: CacheCommand::Warm { paths } } => warm(&paths),
        Command::Conflicts { mountpoint, json, state_dir } => {
            let reply = call(&mountpoint, state_dir.as_deref(), Request::Conflicts)?;
            if !reply.ok {
                bail!("the mount could not read its conflict records: {}", reply.error.unwrap_or_default());
            }
            let list = reply.conflicts.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("no conflicts");
            }
            for c in list {
                let when = chrono::DateTime::from_timestamp(c.time, 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_else(|| c.time.to_string());
                println!("{when}  {}  [{}] {}", c.path, c.policy, c.outcome);
            }
            Ok(())
        }
        Command::Events { mountpoint, json, since, state_dir } => {
            events(&mountpoint, state_dir.as_deref(), json, since)
        }
        Command::Status { mountpoint, json, state_dir } => {
            let reply = call(&mountpoint, state_dir.as_deref(), Request::Status)?;
            let st = reply.status.ok_or_else(|| anyhow!("the mount sent no status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "pending uploads: {} ({} bytes, {} under way)",
                    st.pending_ops, st.pending_bytes, st.uploading
                );
                println!("uploaded:        {}", st.uploads_done);
                println!("uploaded bytes:  {} sent, {} copied in the bucket", st.bytes_sent, st.bytes_copied);
                println!("conflicts:       {}", st.conflicts);
                println!("staged on disk:  {} bytes", st.staged_bytes);
                println!("last error:      {}", st.last_error.as_deref().unwrap_or("none"));
                for f in &st.failing {
                    println!("failing:         {} (after {} attempts)", f.error, f.tries);
                }
                let cw = match (st.conditional_create, st.conditional_update) {
                    (true, true) => "conditional writes: enforced by the store".to_string(),
                    (c, u) => format!(
                        "conditional writes: not fully enforced by the store (create: {}, update: {}); using compare-then-write",
                        yes(c),
                        yes(u)
                    ),
                };
                println!("{cw}");
                if let Some(d) = &st.cache.disk {
                    println!(
                        "block cache:     {} blocks, {} of {} bytes on disk, {} bytes in memory",
                        d.blocks, d.bytes, d.capacity, st.cache.memory_bytes
                    );
                }
                if let Some(ro) = st.read_only {
                    println!("READ-ONLY:       {ro}");
                }
            }
            Ok(())
        }
    }
}

/// Waits until no process holds the lock file `lock` (or `timeout` passes).
fn wait_released(lock: &Path, timeout: Duration) {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let Ok(f) = std::fs::File::open(lock) else { return };
        if Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads every file under `paths` to the end, discarding the bytes: reading through the mount
/// is what fills its cache.
fn warm(paths: &[PathBuf]) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Read};
    let mut files = Vec::new();
    let mut todo: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = todo.pop() {
        let md = std::fs::symlink_metadata(&p).with_context(|| format!("cannot warm {}", p.display()))?;
        if md.is_dir() {
            for e in std::fs::read_dir(&p).with_context(|| format!("cannot list {}", p.display()))? {
                todo.push(e?.path());
            }
        } else if md.is_file() {
            files.push((p, md.len()));
        }
    }
    let total: u64 = files.iter().map(|(_, l)| l).sum();
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut buf = vec![0u8; 1 << 20];
    for (p, _) in &files {
        bar.set_message(p.display().to_string());
        let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        loop {
            let n = f.read(&mut buf).with_context(|| format!("cannot read {}", p.display()))?;
            if n == 0 {
                break;
            }
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    println!("warmed {} files, {} bytes", files.len(), total);
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn is_mounted(mountpoint: &Path) -> bool {
    let canon = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(&*canon.to_string_lossy())))
        .unwrap_or(false)
}
