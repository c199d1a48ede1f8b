//! Bringing a mount up and down: checks of the source and the mount point, the state-dir
//! lock, the conditional-write probe, the FUSE session, the uploader and the control socket,
//! and a clean stop on signals or unmount.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nix::fcntl::{Flock, FlockArg};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use tokio::sync::watch;

use crate::cache::{BlockCache, CacheKey};
use crate::control;
use crate::fs::{BlockConfig, Caps, Fs, FsConfig, obj_path};
use crate::fuse::FuseAdapter;
use crate::layout;
use crate::source::{Endpoint, Source};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub source: String,
    pub mountpoint: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    /// Bound of the block cache on disk; `None` picks one from the free space.
    pub cache_size: Option<u64>,
    /// Bound of staged contents; `None`: the disk, less its reserve.
    pub staging_size: Option<u64>,
    pub memory_limit: u64,
    pub block_size: u64,
    pub max_inodes: u64,
    pub io_timeout: Duration,
    pub key_file: Option<PathBuf>,
    pub upload_delay: Duration,
    pub transfers: usize,
    pub metadata_ttl: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    pub conflict: crate::fs::ConflictConfig,
    pub endpoint: Endpoint,
    /// Print `ready` on stdout once live (used by `--daemon`).
    pub announce_ready: bool,
}

/// The kernel reads ahead of a FUSE mount by its backing device's `read_ahead_kb`, 128 by
/// default: sequential reads then reach the daemon in 256 KiB requests. Raising it to
/// the largest request the mount takes (1 MiB) quarters the requests of a big read.
/// Root only (sysfs); anything that fails leaves the default, logged at debug.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    const READ_AHEAD_KB: &str = "1024";
    let Ok(meta) = std::fs::metadata(mountpoint) else { return };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, READ_AHEAD_KB) {
        Ok(()) => tracing::debug!(%knob, "kernel read-ahead raised to {READ_AHEAD_KB} KiB"),
        Err(e) => tracing::debug!(%knob, "kernel read-ahead left at its default: {e}"),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `~/.local/state/autosync` (or `/var/lib/autosync` for root).
pub fn default_state_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/autosync");
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("autosync")
}

/// `~/.cache/autosync` (or `/var/cache/autosync` for root).
pub fn default_cache_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/cache/autosync");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("autosync")
}

fn short_hash(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex()[..16].to_string()
}

/// Where the CLI finds the control socket of the mount at `mountpoint`.
pub fn registry_path(mountpoint: &Path) -> PathBuf {
    let canon = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
    default_state_root().join("mounts").join(format!("{}.sock", short_hash(&canon.to_string_lossy())))
}

/// A dead FUSE mount (daemon killed) answers ENOTCONN: detach it so the path is usable.
/// `stat` may still be answered from the kernel's attribute cache for a moment, so the
/// folder is read too. Says whether there was one.
fn clean_dead_mount(mp: &Path) -> bool {
    let dead = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    let stat_dead = std::fs::metadata(mp).err().is_some_and(|e| dead(&e));
    let read_dead = std::fs::read_dir(mp).err().is_some_and(|e| dead(&e));
    if stat_dead || read_dead {
        tracing::info!(mountpoint = %mp.display(), "cleaning up a dead mount left by a killed daemon");
        let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
    }
    stat_dead || read_dead
}

/// The mount point, canonical, and whether a dead mount was cleaned up there.
fn check_mountpoint(mp: &Path) -> anyhow::Result<(PathBuf, bool)> {
    let mut was_dead = clean_dead_mount(mp);
    // A daemon killed a moment ago may still be exiting: its mount answers from the
    // kernel's caches until the connection drops, then ENOTCONN. Clean up again then.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::read_dir(mp) {
        if e.raw_os_error() != Some(libc::ENOTCONN) || std::time::Instant::now() > deadline {
            break;
        }
        was_dead |= clean_dead_mount(mp);
        std::thread::sleep(Duration::from_millis(50));
    }
    let md = std::fs::metadata(mp).map_err(|_| {
        anyhow!("mount point {} does not exist: create it with `mkdir -p {}`", mp.display(), mp.display())
    })?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory: choose an empty directory", mp.display());
    }
    let mut rd = std::fs::read_dir(mp).with_context(|| format!("cannot read mount point {}", mp.display()))?;
    if rd.next().is_some() {
        bail!(
            "mount point {} is not empty: choose an empty directory (or unmount what is mounted there)",
            mp.display()
        );
    }
    Ok((mp.canonicalize()?, was_dead))
}

/// Buffers larger than a block (an upload's content, a snapshot's copy) get memory of their
/// own from the kernel, given back when freed. glibc otherwise raises its threshold for that
/// to the size of the last such buffer freed, after which 30 MiB buffers come from its
/// per-thread arenas and stay there: 16 uploads of 30 MiB files held 440 MiB after they
/// were done instead of 60. Blocks (1 MiB) stay below it, reused from the arenas, whose
/// size the memory bound keeps down.
fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
    }
}

/// Checks that the bucket answers, turning the store's errors into one line with a fix.
async fn check_bucket(store: &Store, source: &Source, ep: &Endpoint) -> anyhow::Result<()> {
    let prefix = if source.prefix().is_empty() { None } else { Some(obj_path(source.prefix())?) };
    let id = source.identity();
    let r = tokio::time::timeout(Duration::from_secs(30), store.list_with_delimiter(prefix.as_ref())).await;
    let err = match r {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => bail!("cannot reach {id}: no answer within 30 s; check --endpoint and the network"),
    };
    let text = err.to_string();
    let endpoint = ep.endpoint.clone().unwrap_or_else(|| "the default endpoint".into());
    let credentials = match source {
        Source::Gcs { .. } => {
            "check GOOGLE_SERVICE_ACCOUNT / GOOGLE_SERVICE_ACCOUNT_KEY / GOOGLE_APPLICATION_CREDENTIALS"
        }
        Source::Azure { .. } => {
            "check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or the SAS token / service principal)"
        }
        _ => "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    };
    match err {
        // "no bucket named": fake-gcs-server's answer (a 500) for a missing bucket.
        _ if text.contains("NoSuchBucket")
            || text.contains("ContainerNotFound")
            || text.contains("no bucket named") =>
        {
            bail!("bucket of {id} does not exist: create it first, or fix the name")
        }
        object_store::Error::NotFound { .. } => {
            bail!("bucket of {id} does not exist: create it first, or fix the name")
        }
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            bail!("{id} refused the credentials: {credentials}")
        }
        // reqwest refuses a plain-http URL unless it is allowed.
        _ if !ep.allow_http && text.contains("builder error") && text.contains(" http://") => {
            bail!("cannot reach {id} at {endpoint}: the URL is plain http://, which needs --allow-http")
        }
        // Transport failures first: their text carries timings and ids where a bare "403"
        // can appear by chance.
        _ if text.contains("error sending request")
            || text.contains("onnect")
            || text.contains("dns")
            || text.contains("timed out") =>
        {
            bail!("cannot reach {id} at {endpoint}: check --endpoint, --allow-http and that the server runs")
        }
        _ if text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || text.contains("AccessDenied")
            || text.contains("AuthenticationFailed")
            || text.contains("403 Forbidden") =>
        {
            bail!("{id} refused the credentials: {credentials}")
        }
        // Azure: the URL names no account the server knows (Azurite wants the account as the
        // first path component).
        _ if matches!(source, Source::Azure { .. }) && text.contains("ResourceNotFound") => bail!(
            "{id}: {endpoint} has no such account or container: check --endpoint (for Azurite, http://HOST:PORT/devstoreaccount1), AZURE_STORAGE_ACCOUNT_NAME and the container name"
        ),
        _ => bail!("cannot list {id}: {}", short_error(&text)),
    }
}

/// The first line of an error, without the XML or JSON body a server sent, plus the
/// server's error code or message when the body names one.
fn short_error(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    let cut = ["<?xml", "<Error", "<errorResponse", "{\""].iter().filter_map(|m| line.find(m)).min();
    let head = cut.map_or(line, |i| &line[..i]).trim_end().trim_end_matches(':');
    let between = |open: &str, close: &str| {
        s.split_once(open).and_then(|(_, rest)| rest.split_once(close)).map(|(c, _)| c.trim().to_string())
    };
    let code = between("<Code>", "</Code>").or_else(|| between("\"message\":\"", "\""));
    match code {
        Some(c) if !c.is_empty() && !head.contains(&c) => format!("{head} ({c})"),
        _ => head.to_string(),
    }
}

/// Finds out which conditional writes the store enforces, with a throwaway object. Also
/// returns why the store refused to write at all, if it did.
pub async fn probe_caps(store: &Store, prefix: &str) -> (Caps, Option<String>) {
    let key = layout::join_key(prefix, &format!("{}probe-{:016x}", layout::RESERVED_PREFIX, rand::random::<u64>()));
    let Ok(path) = obj_path(&key) else { return (Caps::default(), None) };
    let put = |mode: PutMode| {
        let path = path.clone();
        async move {
            store.put_opts(&path, PutPayload::from_static(b"probe"), PutOptions { mode, ..Default::default() }).await
        }
    };
    let mut caps = Caps::default();
    if let Err(e) = put(PutMode::Create).await {
        let _ = store.delete(&path).await;
        return (caps, Some(e.to_string()));
    }
    caps.create = matches!(put(PutMode::Create).await, Err(object_store::Error::AlreadyExists { .. }));
    // S3 and Azure match the ETag, GCS the generation (a number): both are wrong here.
    let bogus = UpdateVersion { e_tag: Some("\"autosync-probe-mismatch\"".into()), version: Some("1".into()) };
    caps.update = matches!(put(PutMode::Update(bogus)).await, Err(object_store::Error::Precondition { .. }));
    let _ = store.delete(&path).await;
    (caps, None)
}

/// Holds the state dir for one mount; dropped when the mount ends.
struct StateLock {
    _lock: Flock<File>,
}

/// Takes the state dir's lock. After a killed daemon's mount was cleaned up, waits up to
/// `patience` for it: the killed process's last threads (one in a FUSE request the cleanup
/// aborted, one in an fsync) can hold its files a moment after it is reported dead.
fn lock_state_dir(dir: &Path, patience: Duration) -> anyhow::Result<StateLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create state dir {}", dir.display()))?;
    let mut f = File::options().create(true).truncate(false).write(true).open(dir.join("lock"))?;
    let until = std::time::Instant::now() + patience;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(StateLock { _lock: l }),
            Err((back, _)) if std::time::Instant::now() < until => {
                f = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => break,
        }
    }
    bail!(
        "state dir {} is in use by another mount: unmount that one first, or pass a different --state-dir",
        dir.display()
    )
}

fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let path = path.to_string_lossy().into_owned();
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let res = if let Some(abs) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = res {
        tracing::warn!("could not notify systemd: {e}");
    }
}

/// Mounts and serves until unmounted or signalled. Blocks the calling thread.
pub fn run(opts: MountOptions) -> anyhow::Result<()> {
    bound_allocator();
    let source = Source::parse(&opts.source)?;
    let (mountpoint, was_dead) = check_mountpoint(&opts.mountpoint)?;
    let source = source.prepare()?;
    let id = short_hash(&source.identity());
    let state_dir = opts.state_dir.clone().unwrap_or_else(|| default_state_root().join(&id));
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| default_cache_root().join(&id));
    let patience = if was_dead { Duration::from_secs(5) } else { Duration::ZERO };
    let _lock = lock_state_dir(&state_dir, patience)?;
    std::fs::create_dir_all(&cache_dir).with_context(|| format!("cannot create cache dir {}", cache_dir.display()))?;
    // Absolute paths: the control socket is found through a symlink, and --daemon may cd.
    let state_dir = state_dir.canonicalize()?;
    let cache_dir = cache_dir.canonicalize()?;
    let _ = std::fs::set_permissions(&cache_dir, std::fs::Permissions::from_mode(0o700));

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("autosync").build()?;
    let (store, s3_extras) = source.build(&opts.endpoint)?;
    let store = crate::store::retry::RetryStore::wrap(store, Default::default());
    rt.block_on(check_bucket(&store, &source, &opts.endpoint))?;
    let (caps, write_error) = rt.block_on(probe_caps(&store, source.prefix()));
    if let Some(e) = &write_error {
        tracing::warn!(
            "the bucket refused a test write: {}; uploads will fail (and stay in the journal) until it accepts writes",
            short_error(e)
        );
    }
    if !caps.update || !caps.create {
        tracing::info!(
            create = caps.create,
            update = caps.update,
            "the store does not enforce every conditional write; using compare-then-write where it does not"
        );
    }
    let (key, key_source) = CacheKey::load(&state_dir, opts.key_file.as_deref())?;
    tracing::debug!(?key_source, "cache key");
    let capacity = opts.cache_size.unwrap_or_else(|| crate::cache::default_capacity(&cache_dir));
    let disk_cache = BlockCache::open(&cache_dir, &key, capacity)?;
    let cfg = FsConfig {
        metadata_ttl: opts.metadata_ttl,
        poll_interval: opts.poll_interval,
        upload_delay: opts.upload_delay,
        open_upload_delay: opts.upload_delay.max(crate::fs::OPEN_UPLOAD_DELAY),
        transfers: opts.transfers,
        blocks: BlockConfig { block_size: opts.block_size, memory_limit: opts.memory_limit, ..BlockConfig::default() },
        disk_cache: Some(Arc::new(disk_cache)),
        key: Some(key),
        max_inodes: opts.max_inodes,
        io_timeout: opts.io_timeout,
        staging_limit: opts.staging_size,
        conflict: opts.conflict,
        ..FsConfig::default()
    };
    let fs = Fs::open_state(store, source.prefix(), &state_dir, &cache_dir, cfg, caps)
        .map_err(|e| anyhow!("cannot open the mount state in {}: {e}", state_dir.display()))?;

    if let Some(x) = s3_extras {
        fs.set_raw_lister(x.lister);
        fs.set_part_copier(x.parts);
    }
    if let Some(e) = write_error {
        fs.note_error(format!("test write at mount refused: {}", short_error(&e)));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let uploader = rt.spawn(Arc::clone(&fs).run_uploader(stop_rx.clone()));
    rt.spawn(Arc::clone(&fs).run_poller(stop_rx));
    let warm = Arc::clone(&fs);
    rt.spawn(async move { warm.warm_root().await });
    let (unmount_tx, mut unmount_rx) = tokio::sync::mpsc::channel::<()>(1);
    let socket = state_dir.join("control.sock");
    let registry = registry_path(&mountpoint);
    let _guard = rt.enter();
    let control = control::serve(Arc::clone(&fs), &socket, unmount_tx)?;
    // To remove at the end only the socket this mount made.
    let socket_ino = std::fs::metadata(&socket).map(|m| m.ino()).ok();
    if let Some(parent) = registry.parent() {
        std::fs::create_dir_all(parent)?;
        // Entries of mounts that were killed point at sockets that are gone.
        for e in std::fs::read_dir(parent)?.flatten() {
            if std::fs::metadata(e.path()).is_err() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_file(&registry);
    std::os::unix::fs::symlink(&socket, &registry)?;

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("autosync:{}", source.identity())),
        fuser::MountOption::Subtype("autosync".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
        fuser::MountOption::NoAtime,
    ];
    if is_root() {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(8);
    let adapter = FuseAdapter::new(Arc::clone(&fs), rt.handle().clone());
    let mut session = fuser::Session::new(adapter, &mountpoint, &config)
        .map_err(|e| anyhow!("cannot mount at {}: {e}", mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    crate::fuse::forward_invalidations(&fs, session.notifier())?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("fuse-session".into()).spawn(move || {
        let r = session.run();
        let _ = done_tx.send(r);
    })?;
    tracing::info!(mountpoint = %mountpoint.display(), source = %source.identity(), "mounted");
    raise_readahead(&mountpoint);
    sd_notify("READY=1");
    if opts.announce_ready {
        println!("ready");
        // Detach from the parent's pipe so its exit cannot hurt us.
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null);
        }
    }

    let grace = opts.shutdown_grace;
    let result = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut done_rx = done_rx;
        let unmounted_externally = tokio::select! {
            _ = term.recv() => false,
            _ = int.recv() => false,
            _ = unmount_rx.recv() => false,
            r = &mut done_rx => {
                if let Ok(Err(e)) = r { tracing::error!("FUSE session ended: {e}"); }
                true
            }
        };
        sd_notify("STOPPING=1");
        fs.unmounting();
        let left = fs.flush_all(grace).await;
        if left > 0 {
            let st = fs.status();
            let why = st.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            tracing::warn!(
                pending = left,
                bytes = st.pending_bytes,
                "stopping after the {grace:?} shutdown grace with {left} change(s) ({} bytes) not yet in the bucket{why}; they stay in the journal and upload at the next mount",
                st.pending_bytes
            );
        } else {
            tracing::info!("every change is in the bucket");
        }
        let mut ended = unmounted_externally;
        if !unmounted_externally {
            if let Err(e) = unmounter.unmount() {
                // Busy (a program still has files open): detach, so the path is free and
                // the kernel finishes the unmount when the last file closes.
                tracing::warn!("unmount: {e}; detaching the mount instead");
                let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
            ended = tokio::time::timeout(Duration::from_secs(10), done_rx).await.is_ok();
        }
        anyhow::Ok(ended)
    });
    let _ = stop_tx.send(true);
    let _ = rt.block_on(uploader);
    control.abort();
    // Only remove the registry entry if it is still ours (a new mount may have taken it).
    if std::fs::read_link(&registry).is_ok_and(|t| t == socket) {
        let _ = std::fs::remove_file(&registry);
    }
    if std::fs::metadata(&socket).ok().map(|m| m.ino()) == socket_ino {
        let _ = std::fs::remove_file(&socket);
    }
    // A session still running (files open on a detached mount) may write on: only a mount
    // the kernel let go of is closed clean.
    if matches!(result, Ok(true)) {
        let _ = fs.close_state();
    } else {
        let _ = fs.sync_journal();
    }
    drop(_guard);
    rt.shutdown_timeout(Duration::from_secs(2));
    result.map(|_| ())
}

/// `--daemon`: re-runs this command in the background and returns once it is mounted.
pub fn daemonize(args: Vec<String>) -> anyhow::Result<()> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).env("AUTOSYNC_ANNOUNCE_READY", "1").stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no pipe to the daemon"))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(());
    }
    // The daemon has already printed its one-line error to our stderr.
    let status = child.wait()?;
    std::process::exit(status.code().filter(|&c| c != 0).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::short_error;

    #[test]
    fn short_errors_drop_the_body_and_keep_the_code() {
        let azure = "Generic MicrosoftAzure error: Error performing GET http://h/a/c in 2ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\n<Error>\n  <Code>ResourceNotFound</Code>\n  <Message>The specified resource does not exist.\n</Message></Error>";
        assert_eq!(
            short_error(azure),
            "Generic MicrosoftAzure error: Error performing GET http://h/a/c in 2ms - Server returned non-2xx status code: 404 Not Found (ResourceNotFound)"
        );
        let gcs = "Generic GCS error: Error performing PUT http://h/b/k in 1ms - Server returned non-2xx status code: 400 Bad Request: {\"error\":{\"code\":400,\"message\":\"invalid uploadType\",\"errors\":[]}}\n";
        assert_eq!(
            short_error(gcs),
            "Generic GCS error: Error performing PUT http://h/b/k in 1ms - Server returned non-2xx status code: 400 Bad Request (invalid uploadType)"
        );
        assert_eq!(short_error("plain error"), "plain error");
    }
}
