//! Opening a mount's state: the database (set aside, with its staged contents, when it was
//! sealed with another key), the tree and the queue loaded from it and replayed, staged
//! copies that no longer open or that no close acknowledged, and the event stream's
//! numbering. Runs once, before the parts start; it builds them and hands them over.

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Instant;

use super::blocks::BlockReader;
use super::core::Core;
use super::error::{FsError, FsResult};
use super::events::{Event, Events, Kind as EventKind};
use super::journal::{Journal, Queue};
use super::staging::Staging;
use super::tree::Tree;
use super::types::{Ino, Inode, Kind, Op, ROOT_INO, Seq};
use super::{Caps, FsConfig};
use crate::cache::{CacheKey, Sealer};
use crate::state::{Batch, StateDb, StateError};
use crate::store::Store;

/// The state database and staged contents of another key cannot be opened: they move to
/// `unreadable-STAMP` folders (state dir and cache dir) and the mount starts afresh from the
/// bucket, reported in one line. Nothing is deleted: with the old key they can be put back.
fn set_aside_unreadable(state_dir: &FsPath, cache_dir: &FsPath, pending: u64) -> FsResult<String> {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let state_aside = state_dir.join(format!("unreadable-{stamp}"));
    std::fs::create_dir_all(&state_aside)?;
    std::fs::rename(state_dir.join("state.redb"), state_aside.join("state.redb"))?;
    let staging = cache_dir.join("staging");
    let cache_aside = cache_dir.join(format!("unreadable-{stamp}"));
    let staged = if staging.exists() {
        std::fs::create_dir_all(&cache_aside)?;
        std::fs::rename(&staging, cache_aside.join("staging"))?;
        format!(" and its staged contents to {}", cache_aside.display())
    } else {
        String::new()
    };
    let msg = format!(
        "the mount state was sealed with another key (the key file changed or was lost): {pending} change(s) not yet uploaded cannot be opened and are not in the bucket; the state moved to {}{staged}, and the mount starts afresh from the bucket (to upload them, put those files back and mount with the old --key-file)",
        state_aside.display()
    );
    tracing::error!("{msg}");
    Ok(msg)
}

/// Opens (or creates) the state of a mount, and builds the core over it.
pub fn open_core(
    store: Store,
    prefix: &str,
    state_dir: &FsPath,
    cache_dir: &FsPath,
    cfg: FsConfig,
    caps: Caps,
) -> FsResult<Core> {
    std::fs::create_dir_all(state_dir)?;
    let key = match &cfg.key {
        Some(k) => k.clone(),
        None => CacheKey::load(state_dir, None).map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?.0,
    };
    let db_path = state_dir.join("state.redb");
    // What went wrong at startup, for `status` as well as the log.
    let mut startup_error = None;
    let db = match StateDb::open(&db_path, &key) {
        Err(StateError::OtherKey { pending }) => {
            startup_error = Some(set_aside_unreadable(state_dir, cache_dir, pending)?);
            StateDb::open(&db_path, &key)?
        }
        other => other?,
    };
    let sealer = Arc::new(Sealer::new(&key));
    let loaded = db.load::<Inode, Op>()?;
    let meta: HashMap<String, u64> = loaded.meta.into_iter().collect();
    // Staged files live in a folder of this state dir's own, so two state dirs sharing
    // a cache dir never mix their inodes.
    let state_id = meta.get("state_id").copied().unwrap_or_else(rand::random);
    let staging = Staging::new(cache_dir, Arc::clone(&sealer), state_id)?;
    let writer_id = meta.get("writer_id").copied().unwrap_or_else(rand::random);
    let mut batch = Batch::default();
    batch.meta.push(("state_id", state_id));
    batch.meta.push(("writer_id", writer_id));
    let mut nodes = loaded.inodes;
    if !nodes.iter().any(|n: &Inode| n.ino == ROOT_INO) {
        let mut root = Inode::new(ROOT_INO, ROOT_INO, String::new(), Kind::Dir, 0o755, cfg.uid, cfg.gid);
        root.attrs_known = true;
        batch.inode(ROOT_INO.0, &root)?;
        nodes.push(root);
    }
    let prefix = prefix.trim_matches('/').to_string();
    let mut tree = Tree::new(&prefix, meta.get("next_ino").copied().unwrap_or(ROOT_INO.0 + 1), nodes);
    let mut queue =
        Queue::new(meta.get("next_seq").copied().unwrap_or(1), meta.get("next_conflict").copied().unwrap_or(1));
    if let Some(msg) = check_staged(&mut tree, &staging, &mut batch)? {
        startup_error = Some(msg);
    }
    // Replayed changes wait the upload delay like new ones (a flush overrides it).
    let ready = Instant::now() + cfg.upload_delay;
    for (seq, op) in loaded.ops {
        queue.register(Seq(seq), op, ready);
    }
    // After a crash, the staged copy of a file with no change pending may hold writes
    // that no `fsync` or `close` acknowledged (and that will never upload): the bucket's
    // copy is the file's content. A clean stop leaves nothing unacknowledged.
    // A state dir made just now has nothing to distrust.
    let clean = meta.get("clean").is_none_or(|&c| c == 1);
    if !clean {
        let unacked: Vec<Ino> =
            tree.nodes().filter(|n| n.staged && !n.dirty && !queue.has_sync(n.ino)).map(|n| n.ino).collect();
        for ino in unacked {
            if let Ok(n) = tree.get_mut(ino) {
                n.staged = false;
                n.size = n.remote.as_ref().map_or(0, |r| r.size);
                batch.inode(ino.0, n)?;
                staging.remove(ino);
            }
        }
    }
    batch.meta.push(("clean", 0));
    db.commit(&batch, true)?;
    let pending = queue.len();
    if pending > 0 {
        tracing::info!(pending, "replaying journal: changes from an earlier run are still to upload");
    }
    let events = Events::open(Some(state_dir))?;
    let blocks = BlockReader::new(Arc::clone(&store), cfg.disk_cache.clone(), cfg.blocks);
    let journal = Journal::new(db, queue);
    let core = Core::new(
        store,
        prefix,
        cfg,
        caps,
        format!("{writer_id:016x}"),
        tree,
        journal,
        staging,
        blocks,
        events,
        startup_error.clone(),
    );
    let mut mounted = Event::new(EventKind::Mounted).size(pending as u64);
    let mut said = Vec::new();
    if !clean {
        said.push("the last mount did not stop cleanly".to_string());
    }
    if let Some((from, to)) = core.events.skipped() {
        said.push(format!("after a crash of the machine, numbers {from} to {} are not used", to - 1));
    }
    said.extend(startup_error);
    if !said.is_empty() {
        mounted = mounted.message(said.join("; "));
    }
    core.events.emit(mounted);
    Ok(core)
}

/// Inodes whose staging file vanished (cache wiped) or no longer opens (another key,
/// damage) fall back to the remote copy, reported in one line; staging files no inode
/// refers to go.
fn check_staged(tree: &mut Tree, staging: &Staging, batch: &mut Batch) -> FsResult<Option<String>> {
    let mut lost: Vec<(Ino, String)> = Vec::new();
    let mut keep = std::collections::HashSet::new();
    for n in tree.nodes().filter(|n| n.staged) {
        match staging.file(n.ino) {
            Ok(_) => {
                keep.insert(n.ino);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => lost.push((n.ino, "missing".into())),
            Err(e) => lost.push((n.ino, e.to_string())),
        }
    }
    let stray = staging.remove_others(&keep);
    if stray > 0 {
        tracing::info!(stray, "removed staging files that no file of this mount refers to");
    }
    if lost.is_empty() {
        return Ok(None);
    }
    let mut names: Vec<String> = Vec::new();
    for (ino, why) in &lost {
        if let Ok(n) = tree.get_mut(*ino) {
            if names.len() < 5 {
                names.push(format!("{} ({why})", n.name));
            }
            n.staged = false;
            n.dirty = false;
            n.size = n.remote.as_ref().map_or(0, |r| r.size);
            batch.inode(ino.0, n)?;
        }
    }
    let more = if lost.len() > names.len() { format!(" and {} more", lost.len() - names.len()) } else { String::new() };
    let msg = format!(
        "{} file(s) with changes not yet uploaded cannot be opened in the cache dir's staging folder, so those changes are lost and the files show the bucket's copy: {}{more}",
        lost.len(),
        names.join(", ")
    );
    tracing::error!("{msg}");
    Ok(Some(msg))
}
