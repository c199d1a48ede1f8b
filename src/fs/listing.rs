//! Listings: folders listed from the bucket and merged into the tree with what is known
//! locally, the raw-listing fallback for keys object_store cannot parse, the whole-subtree
//! listing a folder rename needs, the memory bound on listings (an LRU of folders whose
//! entries leave memory when nothing holds them), and the background poll.
//!
//! It owns the LRU, the folders waiting to leave memory, the pause after a failed listing
//! and the keys it warned about. It changes the tree only through the core's locks, never
//! touches file contents, and never queues an upload.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use object_store::ObjectMeta;
use object_store::path::Path;
use tokio::sync::watch;

use super::core::{Core, Locked};
use super::error::{FsError, FsResult};
use super::heads::remote_changed;
use super::kept::Kept;
use super::lock;
use super::object::{etag_same, folder_remote, obj_path, remote_of};
use super::types::{Attr, Ino, Inode, Invalidation, Kind, ROOT_INO, to_ns};
use crate::layout;
use crate::state::Batch;

mod poll;

/// A listing not used for this long leaves memory (when nothing in it is held).
const LISTING_IDLE: Duration = Duration::from_secs(600);

/// How long folders listed before are answered from memory after a listing failed.
const UNREACHABLE_PAUSE: Duration = Duration::from_secs(5);

pub struct Listings {
    core: Arc<Core>,
    /// Folder listings in memory, weighed by their entries, bounded by `max_inodes` and
    /// dropped when idle: what moka evicts lands in `evicted`, and leaves memory there
    /// if nothing in it is held (see [`Listings::evict`]).
    lru: moka::sync::Cache<Ino, u32>,
    evicted: Arc<Mutex<HashSet<Ino>>>,
    /// Folders whose last entry held by the kernel was forgotten.
    recheck: Mutex<HashSet<Ino>>,
    /// After a failed listing: until when folders listed before are not listed again, and
    /// why.
    unreachable: Mutex<Option<(Instant, String)>>,
    /// S3 only: lists folders that hold keys object_store refuses to parse.
    raw_lister: OnceLock<crate::store::s3list::SharedLister>,
    /// Keys that cannot be file names, warned about once each.
    warned: Mutex<HashSet<String>>,
    /// Folders being listed now; the channel closes when the listing is done.
    listing_now: Mutex<HashMap<Ino, watch::Receiver<()>>>,
}

/// A folder's listing under way: others who need the folder listed wait until this is
/// dropped.
struct Turn<'a> {
    listings: &'a Listings,
    ino: Ino,
    _done: watch::Sender<()>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        lock(&self.listings.listing_now).remove(&self.ino);
    }
}

impl Listings {
    pub fn new(core: Arc<Core>) -> Listings {
        let evicted = Arc::new(Mutex::new(HashSet::new()));
        let lru = {
            let evicted = Arc::clone(&evicted);
            moka::sync::Cache::builder()
                .max_capacity(core.cfg.max_inodes)
                .weigher(|_, w: &u32| *w)
                .time_to_idle(LISTING_IDLE)
                .eviction_listener(move |dir: Arc<Ino>, _, cause| {
                    if cause.was_evicted() {
                        lock(&evicted).insert(*dir);
                    }
                })
                .build()
        };
        Listings {
            core,
            lru,
            evicted,
            recheck: Mutex::new(HashSet::new()),
            unreachable: Mutex::new(None),
            raw_lister: OnceLock::new(),
            warned: Mutex::new(HashSet::new()),
            listing_now: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_raw_lister(&self, lister: crate::store::s3list::SharedLister) {
        let _ = self.raw_lister.set(lister);
    }

    /// A listing failed: for [`UNREACHABLE_PAUSE`], folders listed before are answered from
    /// what is known without asking the bucket (each failed listing costs retries, or up to
    /// `--io-timeout`, and an outage would make every path step pay it).
    fn set_unreachable(&self, e: &FsError) {
        *lock(&self.unreachable) = Some((Instant::now() + UNREACHABLE_PAUSE, e.to_string()));
    }

    /// Whether a folder's listing is recent enough to answer from (ENOTDIR for a file).
    pub fn fresh(&self, dir: Ino) -> FsResult<bool> {
        let tree = self.core.tree();
        let n = tree.get(dir)?;
        if n.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(n.is_listed_fresh(self.core.cfg.metadata_ttl))
    }

    /// Finds `name` in `parent`, listing the folder from the bucket when its listing is
    /// older than the TTL.
    pub async fn find(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        self.evict();
        if name.len() > layout::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        if layout::is_reserved(name) {
            return Err(FsError::NotFound);
        }
        let fresh = self.fresh(parent)?;
        // Recently used, for the listings' LRU order.
        let _ = self.lru.get(&parent);
        // Past the TTL, ask the bucket again: names and versions may have changed there.
        if !fresh && let Err(e) = self.refresh(parent).await {
            // Unreachable bucket: answer from what we know, fail only what we don't.
            let tree = self.core.tree();
            if tree.child(parent, name).is_none() && !tree.get(parent)?.listed {
                return Err(e);
            }
            tracing::debug!("lookup of {name}: listing failed, using the local entry: {e}");
        }
        let ino = self.core.tree().child(parent, name).ok_or(FsError::NotFound)?;
        self.core.ensure_attrs(ino).await;
        self.core.tree().attr(ino)
    }

    /// A folder about to be read: listed again if its listing is older than the TTL; a
    /// folder seen before is served as last seen when the bucket does not answer.
    pub async fn ensure_listed(&self, ino: Ino) -> FsResult<()> {
        self.evict();
        let fresh = self.fresh(ino)?;
        let _ = self.lru.get(&ino);
        if fresh {
            // A listing merged a moment ago may still be fetching its new entries'
            // attributes: a reply before them would tell the kernel a symlink is a file.
            self.wait_under_way(ino).await;
        } else if let Err(e) = self.refresh(ino).await {
            if !self.core.tree().get(ino)?.listed {
                return Err(e);
            }
            tracing::debug!("listing failed, serving the folder as last seen: {e}");
        }
        Ok(())
    }

    /// Waits for the listing of `ino` under way, if any, to finish (merge and attributes).
    async fn wait_under_way(&self, ino: Ino) {
        let under_way = lock(&self.listing_now).get(&ino).cloned();
        if let Some(mut rx) = under_way {
            let _ = rx.changed().await;
        }
    }

    /// Lists a folder from the bucket and merges it with what is known locally. A folder
    /// being listed already is not listed twice at once: this waits for that listing (and
    /// its attribute fetches), and is answered by it if it is within the TTL. Two listings
    /// at once cost their pages twice, and the second would fetch again every attribute
    /// the first is still fetching.
    pub async fn refresh(&self, ino: Ino) -> FsResult<()> {
        self.refresh_after(ino, true).await
    }

    /// Lists a folder now (after any listing of it under way), whatever the TTL: `rmdir`
    /// and a rename onto a folder must see what the bucket holds in it.
    pub async fn refresh_now(&self, ino: Ino) -> FsResult<()> {
        self.refresh_after(ino, false).await
    }

    async fn refresh_after(&self, ino: Ino, reuse: bool) -> FsResult<()> {
        let _turn = loop {
            let mut under_way = {
                let mut now = lock(&self.listing_now);
                match now.get(&ino) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (done, rx) = watch::channel(());
                        now.insert(ino, rx);
                        break Turn { listings: self, ino, _done: done };
                    }
                }
            };
            // Returns once that listing's turn is dropped: merged, attributes in, or failed.
            let _ = under_way.changed().await;
            if reuse && self.fresh(ino)? {
                return Ok(());
            }
        };
        self.list_and_merge(ino).await
    }

    /// Lists a folder from the bucket and merges it with what is known locally.
    async fn list_and_merge(&self, ino: Ino) -> FsResult<()> {
        let core = &*self.core;
        let started = Instant::now();
        let paused = lock(&self.unreachable).clone().filter(|(until, _)| Instant::now() < *until);
        if let Some((_, why)) = paused
            && core.tree().get(ino)?.listed
        {
            return Err(FsError::Unreachable(why));
        }
        // A listing taken while an upload landed may predate it: list again (a few times)
        // rather than let an old listing undo our own upload.
        let mut attempt = 0;
        let (listing, key, listed_epoch) = loop {
            let (key, epoch) = {
                let l = core.lock();
                let n = l.get(ino)?;
                if n.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                (l.key_of(ino)?, l.queue.epoch)
            };
            let prefix = if key.is_empty() { None } else { Some(obj_path(&key)?) };
            let list = async {
                match core.store.list_with_delimiter(prefix.as_ref()).await {
                    Ok(l) => Ok(l),
                    // A key object_store cannot parse fails its whole listing: list raw, skip it.
                    Err(object_store::Error::InvalidPath { .. }) if self.raw_lister.get().is_some() => {
                        self.raw_listing(&key).await
                    }
                    // A folder that exists only locally (pending upload) lists as empty.
                    Err(object_store::Error::NotFound { .. }) => Ok(object_store::ListResult {
                        common_prefixes: vec![],
                        objects: vec![],
                        extensions: Default::default(),
                    }),
                    Err(e) => Err(e.into()),
                }
            };
            // An unresponsive bucket: give up after --io-timeout (nothing is changed before
            // the listing is in); lookups and creates then go on from what is known.
            let listing = match tokio::time::timeout(core.cfg.io_timeout, list).await {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    self.set_unreachable(&e);
                    return Err(e);
                }
                Err(_) => {
                    tracing::warn!(
                        folder = %key,
                        "a listing from the bucket took longer than --io-timeout ({:?})",
                        core.cfg.io_timeout
                    );
                    let e = FsError::TimedOut(core.cfg.io_timeout);
                    self.set_unreachable(&e);
                    return Err(e);
                }
            };
            *lock(&self.unreachable) = None;
            attempt += 1;
            let changed = core.queue().epoch != epoch;
            if !changed || attempt >= 4 {
                break (listing, key, epoch);
            }
        };
        let listed = Instant::now();
        let mut new_files = Vec::new();
        // What the kernel may hold that changed: names gone, contents replaced, and whether
        // the folder's own listing changed.
        let mut inval = Vec::new();
        let mut names_changed = false;
        // Entries kept aside when this folder's listing left memory (a folder listed
        // since has none): those still the same take their records back, without a HEAD.
        let mut kept = Kept::default();
        if !core.tree().get(ino)?.listed {
            match core.journal.db().evicted::<Inode>(ino.0) {
                Ok(records) => kept = Kept::new(records),
                Err(e) => {
                    tracing::warn!(folder = %key, "entries kept aside cannot be read, asking the bucket: {e}");
                    kept = Kept::unreadable();
                }
            }
        }
        // Tests hold a listing here, between its answer and its merge.
        fail::fail_point!("listing-before-merge");
        {
            let mut l = core.lock();
            let mut batch = Batch::default();
            let Ok(dir) = l.get(ino) else { return Ok(()) };
            // Changes in a folder seen before are events; a first listing only discovers.
            let seen_before = dir.listed;
            let mut events = Vec::new();
            // Checked under the lock that merges: an upload that landed after the listing
            // was taken makes it too old to delete or update anything.
            let epoch_changed = l.queue.epoch != listed_epoch || l.queue.any_running();
            let mut seen: HashSet<String> = HashSet::new();
            let mut vacating: Option<HashSet<String>> = None;
            for p in &listing.common_prefixes {
                let Some(name) = p.filename().map(str::to_string) else { continue };
                let full = p.as_ref().to_string();
                if l.queue.is_being_written(&full) {
                    seen.insert(name); // a folder of ours being written right now
                    continue;
                }
                if !self.acceptable(&l, &full, &name, listed_epoch) {
                    continue;
                }
                // New here, and holding what we are moving or deleting: not a folder to
                // show (once those ops are done, a listing shows it if anything is left).
                if l.child(ino, &name).is_none()
                    && vacating.get_or_insert_with(|| l.vacating_folders(listed_epoch)).contains(&full)
                {
                    continue;
                }
                seen.insert(name.clone());
                if l.child(ino, &name).is_none() {
                    // A folder kept aside takes its record back: its entries kept aside are
                    // filed under its number.
                    let mut n = kept.folder(ino, &name, |i| l.contains(i)).unwrap_or_else(|| {
                        let c = l.alloc_ino(&mut batch);
                        let mut n = Inode::new(c, ino, name, Kind::Dir, 0o755, core.cfg.uid, core.cfg.gid);
                        n.attrs_known = false;
                        n
                    });
                    let c = n.ino;
                    names_changed = true;
                    n.remote = Some(folder_remote(full.clone()));
                    l.insert(n);
                    l.persist(c, &mut batch)?;
                    if seen_before {
                        events.push(remote_changed(&core.rel_path(&full), "added", &folder_meta(p)));
                    }
                }
            }
            let prefixes: HashSet<&str> = listing.common_prefixes.iter().filter_map(|p| p.filename()).collect();
            for m in &listing.objects {
                let full = m.location.as_ref().to_string();
                if full == key {
                    continue; // an s3fs-style `dir/` marker of this folder itself
                }
                let Some(name) = m.location.filename().map(str::to_string) else { continue };
                if name == layout::FOLDER_MARKER {
                    if let Ok(n) = l.get_mut(ino) {
                        n.attrs_known = n.attrs_known || n.ino == ROOT_INO;
                    }
                    continue;
                }
                if l.queue.is_being_written(&full) {
                    seen.insert(name); // ours, landing right now: the uploader records it
                    continue;
                }
                if !self.acceptable(&l, &full, &name, listed_epoch) {
                    continue;
                }
                if seen.contains(&name) {
                    continue; // a folder and a file of one name: the folder wins
                }
                seen.insert(name.clone());
                // A folder of ours that the bucket no longer has, where it now has a file.
                if let Some(c) = l.child(ino, &name) {
                    let stale_dir = l.get(c)?.kind == Kind::Dir
                        && !prefixes.contains(name.as_str())
                        && !epoch_changed
                        && l.get(c)?.remote.is_some()
                        && !l.has_pending_below(c);
                    if stale_dir {
                        l.remove_tree(c, &mut batch);
                        inval.push(Invalidation::Entry { parent: ino, name: name.clone() });
                        names_changed = true;
                    }
                }
                match l.child(ino, &name) {
                    Some(c) => {
                        let clean = !epoch_changed && l.is_settled(c) && l.get(c)?.kind != Kind::Dir;
                        let n = l.get(c)?;
                        let changed = n
                            .remote
                            .as_ref()
                            .is_none_or(|r| r.key != full || !etag_same(r.etag.as_deref(), m.e_tag.as_deref()));
                        // Same content, but maybe other attributes: a copy onto itself with new
                        // metadata (how s3fs and rclone chmod, chown or touch) keeps the ETag and
                        // moves Last-Modified. Without a Last-Modified on record (our own upload),
                        // the attributes are read once. `fetch_attrs` records the Last-Modified
                        // with what it read. A failed read is tried again at the next listing.
                        let modified = Some(m.last_modified.timestamp());
                        let retouched = n.remote.as_ref().is_some_and(|r| r.modified != modified);
                        if clean && !changed && (retouched || !n.attrs_known) {
                            new_files.push(c);
                        }
                        if clean && changed {
                            // A name of a hard-linked file that another tool changed
                            // leaves the group: a file of its own.
                            let c = match l.in_link_group(c) {
                                true => match l.split_name(c, &mut batch)? {
                                    Some((now, drop)) => {
                                        inval.extend(drop);
                                        now
                                    }
                                    None => continue,
                                },
                                false => c,
                            };
                            let n = l.get_mut(c)?;
                            n.size = m.size;
                            n.mtime_ns = to_ns(SystemTime::from(m.last_modified));
                            n.attrs_known = false;
                            let was_staged = n.staged;
                            n.staged = false;
                            if was_staged {
                                core.staging.remove(c);
                            }
                            l.set_remote(c, Some(remote_of(m)));
                            l.persist(c, &mut batch)?;
                            new_files.push(c);
                            inval.push(Invalidation::Inode(c));
                            events.push(remote_changed(&core.rel_path(&full), "changed", m));
                        }
                    }
                    // The version it was when the folder's listing left memory: its record
                    // back, attributes included.
                    None if let Some(n) = kept.file(ino, &name, m, |i| l.contains(i)) => {
                        let c = n.ino;
                        names_changed = true;
                        l.insert(n);
                        l.persist(c, &mut batch)?;
                    }
                    None => {
                        let c = l.alloc_ino(&mut batch);
                        let mut n = Inode::new(c, ino, name, Kind::File, 0o644, core.cfg.uid, core.cfg.gid);
                        names_changed = true;
                        n.size = m.size;
                        n.mtime_ns = to_ns(SystemTime::from(m.last_modified));
                        n.ctime_ns = n.mtime_ns;
                        n.attrs_known = false;
                        n.remote = Some(remote_of(m));
                        l.insert(n);
                        // Recorded once its attributes are in (`apply_heads`), not twice.
                        new_files.push(c);
                        if seen_before {
                            events.push(remote_changed(&core.rel_path(&full), "added", m));
                        }
                    }
                }
            }
            // Local entries the bucket no longer has: deleted by someone else, unless they
            // are ours and still on their way up.
            if !epoch_changed {
                let local: Vec<(String, Ino)> = l.children(ino).map(|(k, v)| (k.clone(), v)).collect();
                for (name, _) in local {
                    if seen.contains(&name) {
                        continue;
                    }
                    // What is at the name now: a file with other names may have moved to
                    // one of them (another name gone before it).
                    let Some(c) = l.child(ino, &name) else { continue };
                    let Ok(n) = l.get(c) else { continue };
                    // Only what still sits at the key it came from can have been deleted there.
                    let child_key = l.key_of(c)?;
                    // A key with a pending delete or move is missing on purpose.
                    let in_place =
                        n.remote.as_ref().is_some_and(|r| r.key == child_key) && !l.queue.is_hidden(&child_key);
                    let gone = in_place
                        && match n.kind {
                            Kind::Dir => !l.has_pending_below(c),
                            _ => l.is_settled(c),
                        };
                    if gone {
                        let event = super::events::Event::new(super::events::Kind::RemoteChanged)
                            .path(core.rel_path(&child_key))
                            .change("deleted");
                        if l.in_link_group(c) {
                            // One name of a file with others: the file stays.
                            let file = l.primary(c);
                            l.remove_name(c, &mut batch)?;
                            inval.push(Invalidation::Inode(file));
                        } else {
                            l.remove_tree(c, &mut batch);
                        }
                        inval.push(Invalidation::Entry { parent: ino, name });
                        names_changed = true;
                        events.push(event);
                    }
                }
            }
            if kept.any() {
                // Taken back, or stale: the folder's entries are in the inode table again.
                batch.del_evicted.push(ino.0);
            }
            if let Ok(n) = l.get_mut(ino) {
                n.listed_at = Some(Instant::now());
                if !n.listed {
                    n.listed = true;
                    l.persist(ino, &mut batch)?;
                }
            }
            l.commit(batch, false)?;
            for e in events {
                l.emit(e);
            }
        }
        if names_changed {
            inval.push(Invalidation::Inode(ino));
        }
        for what in inval {
            core.invalidate(what);
        }
        let merged = Instant::now();
        let fetched = new_files.len();
        // On the runtime's own threads, where the requests and their connections wake each
        // other, rather than across to the FUSE thread waiting for this listing: that
        // thread's wake-ups were a large share of a cold listing's CPU.
        let fetcher = Arc::clone(&self.core);
        if let Err(e) = tokio::spawn(async move { fetcher.fetch_attrs(new_files).await }).await {
            tracing::error!(folder = %key, "fetching attributes failed: {e}");
        }
        self.note(ino);
        tracing::debug!(
            folder = %key,
            entries = listing.objects.len() + listing.common_prefixes.len(),
            fetched,
            list_ms = (listed - started).as_millis() as u64,
            merge_ms = (merged - listed).as_millis() as u64,
            attrs_ms = merged.elapsed().as_millis() as u64,
            "folder listed"
        );
        Ok(())
    }

    /// The raw listing of a folder, without the keys that cannot be paths (one warning each).
    async fn raw_listing(&self, key: &str) -> FsResult<object_store::ListResult> {
        let Some(lister) = self.raw_lister.get() else { return Err(FsError::Unsupported("raw listing")) };
        let prefix = if key.is_empty() { String::new() } else { format!("{key}/") };
        let raw = lister
            .list_dir(&prefix)
            .await
            .map_err(|e| FsError::Remote(object_store::Error::Generic { store: "S3", source: e.into() }))?;
        let mut out =
            object_store::ListResult { common_prefixes: vec![], objects: vec![], extensions: Default::default() };
        let mut skipped = Vec::new();
        for p in raw.prefixes {
            let folder = p.strip_suffix('/').unwrap_or(&p);
            // Path::parse would quietly drop a trailing slash: `a//` must not become `a`.
            let clean = !folder.is_empty() && folder.split('/').all(|part| !part.is_empty());
            match Path::parse(folder) {
                Ok(path) if clean => out.common_prefixes.push(path),
                _ => skipped.push(p),
            }
        }
        for o in raw.objects {
            match Path::parse(&o.key) {
                Ok(location) if !o.key.ends_with('/') || o.key == prefix => {
                    let last_modified = o
                        .last_modified
                        .as_deref()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .unwrap_or_else(chrono::Utc::now);
                    out.objects.push(ObjectMeta {
                        location,
                        last_modified,
                        size: o.size,
                        e_tag: o.etag,
                        version: None,
                    });
                }
                _ => skipped.push(o.key),
            }
        }
        let mut warned = lock(&self.warned);
        for k in skipped {
            if warned.insert(k.clone()) {
                tracing::warn!(key = %k, "skipping object whose key cannot be a file name");
            }
        }
        Ok(out)
    }

    /// Lists everything under a folder (recursively, one paginated listing) and adds what
    /// is not known yet as inodes.
    pub async fn populate_tree(&self, ino: Ino) -> FsResult<()> {
        let core = &*self.core;
        let (key, epoch) = {
            let l = core.lock();
            (l.key_of(ino)?, l.queue.epoch)
        };
        let prefix = if key.is_empty() { None } else { Some(obj_path(&key)?) };
        let objects: Vec<ObjectMeta> = core.store.list(prefix.as_ref()).try_collect().await?;
        let mut l = core.lock();
        let mut batch = Batch::default();
        for m in &objects {
            let full = m.location.as_ref();
            let Some(rel) =
                (if key.is_empty() { Some(full) } else { full.strip_prefix(&key).and_then(|r| r.strip_prefix('/')) })
            else {
                continue;
            };
            let parts: Vec<&str> = rel.split('/').collect();
            let mut dir = ino;
            let mut dir_key = key.clone();
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let part_key = layout::join_key(&dir_key, part);
                if last && (*part == layout::FOLDER_MARKER || l.queue.is_being_written(&part_key)) {
                    break;
                }
                if !self.acceptable(&l, &part_key, part, epoch) {
                    break;
                }
                match l.child(dir, part) {
                    Some(c) => {
                        if !last && l.get(c)?.kind != Kind::Dir {
                            break;
                        }
                        dir = c;
                    }
                    None => {
                        let c = l.alloc_ino(&mut batch);
                        let kind = if last { Kind::File } else { Kind::Dir };
                        let perm = if last { 0o644 } else { 0o755 };
                        let mut n = Inode::new(c, dir, part.to_string(), kind, perm, core.cfg.uid, core.cfg.gid);
                        n.attrs_known = false;
                        if last {
                            n.size = m.size;
                            n.mtime_ns = to_ns(SystemTime::from(m.last_modified));
                            n.remote = Some(remote_of(m));
                        } else {
                            n.remote = Some(folder_remote(part_key.clone()));
                        }
                        l.insert(n);
                        l.persist(c, &mut batch)?;
                        dir = c;
                    }
                }
                dir_key = part_key;
            }
        }
        l.commit(batch, false)
    }

    /// Whether a listed key can appear in the mount (valid name, not hidden by a pending
    /// change or one done since the listing was taken at `epoch`, not owned by an inode
    /// that was renamed locally).
    fn acceptable(&self, l: &Locked<'_>, full: &str, name: &str, epoch: u64) -> bool {
        if layout::is_reserved(name) {
            return false;
        }
        if let Some(why) = layout::invalid_name(name) {
            if lock(&self.warned).insert(full.to_string()) {
                tracing::warn!(key = full, "skipping object whose key cannot be a file name: {why}");
            }
            return false;
        }
        if l.queue.is_hidden_since(full, epoch) {
            return false;
        }
        if let Some(owner) = l.owner_of_key(full) {
            // Owned by an inode that now lives elsewhere: the old name is on its way out.
            if l.key_of(owner).ok().as_deref() != Some(full) {
                return false;
            }
        }
        true
    }

    /// The kernel forgot `n` lookups of `ino`. Once it holds none, the inode may leave
    /// memory with its folder's listing: the folder becomes a candidate again.
    pub fn forget(&self, ino: Ino, n: u64) {
        let dir = self.core.tree().forget(ino, n);
        if let Some(dir) = dir {
            lock(&self.recheck).insert(dir);
        }
    }

    /// Records (or refreshes) a folder's listing in the LRU, weighed by its entries.
    fn note(&self, dir: Ino) {
        let weight = self.core.tree().child_count(dir);
        self.lru.insert(dir, u32::try_from(weight.max(1)).unwrap_or(u32::MAX));
    }

    /// Drops from memory (and the state database) the entries of the folders that moka
    /// evicted, where nothing is held: no entry the kernel holds, no local change, no
    /// open handle, no listing still in memory below it, and the listing older than the TTL.
    /// A folder too young or open is tried again later; one with entries still held
    /// stays as it is until its next listing, or until the kernel forgets one of them.
    /// Runs at the start of lookups, opendir and forgets, never between a listing and
    /// its use.
    pub fn evict(&self) {
        // Folders whose last held entry was forgotten: back into the LRU, where the bound
        // may push them (or others) out.
        let recheck = std::mem::take(&mut *lock(&self.recheck));
        for dir in recheck {
            if self.lru.get(&dir).is_none() {
                self.note(dir);
            }
        }
        self.lru.run_pending_tasks();
        let dirs = std::mem::take(&mut *lock(&self.evicted));
        if dirs.is_empty() {
            return;
        }
        let cfg = &self.core.cfg;
        let mut later = Vec::new();
        let mut dropped = 0usize;
        let mut l = self.core.lock();
        let mut batch = Batch::default();
        for dir in dirs {
            let Ok(d) = l.get(dir) else { continue };
            if d.kind != Kind::Dir {
                continue;
            }
            // A listing within its TTL stays: a folder larger than the bound is not listed
            // again for every lookup of a first `ls -l`.
            if d.dir_open > 0 || d.is_listed_fresh(cfg.metadata_ttl.max(cfg.listing_min_age)) {
                later.push(dir);
                continue;
            }
            if l.held_in(dir) > 0 {
                tracing::debug!(dir = %dir, "listing evicted from memory's LRU, but entries are held");
                continue;
            }
            let kids: Vec<Ino> = l.children(dir).map(|(_, c)| c).collect();
            // None is held by the kernel (counted above); none is busy here.
            let idle = |l: &Locked<'_>, c: Ino| {
                l.get(c).is_ok_and(|n| n.writing == 0 && n.dir_open == 0)
                    && l.is_settled(c)
                    && l.child_count(c) == 0
                    // A file's other names (hard links) stay with it in memory.
                    && !l.in_link_group(c)
            };
            if kids.is_empty() || !kids.iter().all(|&c| idle(&l, c)) {
                tracing::debug!(dir = %dir, entries = kids.len(), "listing evicted from memory's LRU, but entries are in use");
                continue;
            }
            tracing::debug!(dir = %dir, entries = kids.len(), "listing leaves memory");
            dropped += kids.len();
            for c in kids {
                if let Some(mut n) = l.remove(c) {
                    if n.staged {
                        self.core.staging.remove(c);
                        n.staged = false;
                    }
                    // Kept aside, for the next listing of the folder to take back.
                    let _ = batch.evicted(dir.0, c.0, &n);
                }
                batch.remove_inode(c.0);
            }
            if let Ok(d) = l.get_mut(dir) {
                d.listed_at = None;
                d.listed = false;
            }
            let _ = l.persist(dir, &mut batch);
        }
        let _ = l.commit(batch, false);
        drop(l);
        lock(&self.evicted).extend(later);
        if dropped >= 10_000 {
            // The allocator keeps freed memory for reuse; hand a large release back.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free memory; no pointer is touched.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// A folder prefix as the metadata of a `remote_changed` event (folders have no version).
fn folder_meta(p: &Path) -> ObjectMeta {
    ObjectMeta { location: p.clone(), last_modified: chrono::Utc::now(), size: 0, e_tag: None, version: None }
}
