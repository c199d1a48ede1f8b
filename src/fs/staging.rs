//! Local staging of file contents: one sealed file per inode under `CACHE_DIR/staging/STATE/`
//! (both names keyed hashes), written in place by the mount and snapshotted for uploads. It
//! knows files and bytes, not the bucket.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::types::Ino;
use crate::cache::{STAGE_BLOCK, SealedFile, Sealer};

/// What an upload snapshot holds: the plaintext in memory (small files) or a sealed copy,
/// which, for a file staged over its base, holds only the blocks written here.
pub enum Snapshot {
    Bytes(Bytes),
    File { path: PathBuf, file: Arc<SealedFile>, base_len: u64 },
}

#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    tmp: PathBuf,
    sealer: Arc<Sealer>,
    open: Mutex<Open>,
    usage: Mutex<Usage>,
    /// Staging files were created or moved into place since the folder's last sync began.
    dir_changed: std::sync::atomic::AtomicBool,
    /// Held through a sync of the folder: one that finds nothing to do waits for one under
    /// way, which covers what it would have.
    dir_sync: Mutex<()>,
    /// Inode numbers whose staging files were made ahead, their directory entries synced
    /// (see `made_ahead`).
    ahead: Mutex<std::ops::Range<u64>>,
}

/// Staging files made ahead at once: one sync of the folder for this many new files.
const AHEAD: u64 = 64;

/// The staging files open now (at most [`MAX_OPEN`] that nobody else holds), and the
/// lengths of the staged files closed meanwhile. Two handles of one staging file must never
/// coexist (each keeps its own view of the blocks), so only a file nobody holds is closed.
#[derive(Debug, Default)]
struct Open {
    files: HashMap<Ino, (Arc<SealedFile>, u64)>,
    closed: HashMap<Ino, u64>,
    tick: u64,
}

/// Staging files kept open: one descriptor each (a mount that wrote 20,000 files would
/// otherwise hold 20,000 descriptors and run out of them).
const MAX_OPEN: usize = 256;

impl Open {
    fn get(&mut self, ino: Ino) -> Option<Arc<SealedFile>> {
        self.tick += 1;
        let tick = self.tick;
        self.files.get_mut(&ino).map(|(f, t)| {
            *t = tick;
            Arc::clone(f)
        })
    }

    fn insert(&mut self, ino: Ino, f: Arc<SealedFile>) -> Arc<SealedFile> {
        self.tick += 1;
        self.closed.remove(&ino);
        self.files.insert(ino, (Arc::clone(&f), self.tick));
        if self.files.len() > MAX_OPEN {
            self.close_idle();
        }
        f
    }

    /// Closes the least recently used files nobody holds, down to 3/4 of the bound.
    fn close_idle(&mut self) {
        let mut idle: Vec<(u64, Ino)> =
            self.files.iter().filter(|(_, (f, _))| Arc::strong_count(f) == 1).map(|(i, (_, t))| (*t, *i)).collect();
        idle.sort_unstable();
        let excess = self.files.len().saturating_sub(MAX_OPEN * 3 / 4);
        for (_, ino) in idle.into_iter().take(excess) {
            if let Some((f, _)) = self.files.remove(&ino) {
                self.closed.insert(ino, f.local_len());
            }
        }
    }
}

/// Staged bytes: the sum of the staged files' lengths, taken at `at`, plus what writes
/// added since.
#[derive(Debug)]
struct Usage {
    at: std::time::Instant,
    bytes: u64,
    added: u64,
}

/// How often the staged bytes are summed again.
const USAGE_REFRESH: std::time::Duration = std::time::Duration::from_millis(200);

impl Staging {
    /// The staging folder of the state dir `state_id` under the cache dir `root`.
    pub fn new(root: &Path, sealer: Arc<Sealer>, state_id: u64) -> std::io::Result<Self> {
        let dir = root.join("staging").join(sealer.hidden_name("state", &state_id.to_le_bytes()));
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&dir)?;
        // Snapshots from a previous run are never needed again: the journal re-snapshots.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let usage = Usage { at: std::time::Instant::now() - USAGE_REFRESH, bytes: 0, added: 0 };
        Ok(Self {
            dir,
            tmp,
            sealer,
            open: Mutex::new(Open::default()),
            usage: Mutex::new(usage),
            dir_changed: std::sync::atomic::AtomicBool::new(true),
            dir_sync: Mutex::new(()),
            ahead: Mutex::new(0..0),
        })
    }

    fn path(&self, ino: Ino) -> PathBuf {
        self.dir.join(self.sealer.hidden_name("staging", &ino.0.to_le_bytes()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The staging file of `ino`, opened read-write.
    pub fn file(&self, ino: Ino) -> std::io::Result<Arc<SealedFile>> {
        if let Some(f) = self.lock().get(ino) {
            return Ok(f);
        }
        let f = Arc::new(SealedFile::open(&self.path(ino), Arc::clone(&self.sealer))?);
        let mut open = self.lock();
        // Opened by another caller meanwhile: theirs is the one handle.
        if let Some(f) = open.get(ino) {
            return Ok(f);
        }
        Ok(open.insert(ino, f))
    }

    fn dir_changed(&self) {
        self.dir_changed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn create_empty(&self, ino: Ino) -> std::io::Result<Arc<SealedFile>> {
        self.create_sparse(ino, 0)
    }

    /// The staging file of a file just created here, `ino` a number just handed out.
    pub fn create_new(&self, ino: Ino) -> std::io::Result<Arc<SealedFile>> {
        let ahead = self.made_ahead(ino);
        let f = Arc::new(SealedFile::create(&self.path(ino), Arc::clone(&self.sealer))?);
        if !ahead {
            self.dir_changed();
        }
        Ok(self.lock().insert(ino, f))
    }

    /// A staging file of `len` bytes that are all the base's (the bucket's version) until
    /// written here: nothing is downloaded.
    pub fn create_sparse(&self, ino: Ino, len: u64) -> std::io::Result<Arc<SealedFile>> {
        let f = Arc::new(SealedFile::create_sparse(&self.path(ino), Arc::clone(&self.sealer), len)?);
        self.dir_changed();
        Ok(self.lock().insert(ino, f))
    }

    /// Whether the staging file of `ino` has a directory entry made durable ahead: inode
    /// numbers are handed out in order, so new files get theirs in batches of [`AHEAD`],
    /// with one sync of the folder for the batch instead of one per file (a file made
    /// ahead is empty until created; the first sync of its own makes its content durable).
    /// Files made ahead for numbers that go to other inodes are removed at the next mount.
    fn made_ahead(&self, ino: Ino) -> bool {
        let mut ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        if ahead.contains(&ino.0) {
            return true;
        }
        let batch = ino.0..ino.0.saturating_add(AHEAD);
        for i in batch.clone() {
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(self.path(Ino(i)));
            if made.is_err() {
                return false;
            }
        }
        let synced = File::open(&self.dir).and_then(|d| d.sync_all());
        if synced.is_err() {
            return false;
        }
        *ahead = batch;
        true
    }

    /// A temp file to fill; `install` moves it into place as the staging file of `ino`.
    pub fn temp(&self, name: &str) -> std::io::Result<(PathBuf, SealedFile)> {
        let p = self.tmp.join(self.sealer.hidden_name("tmp", name.as_bytes()));
        let f = SealedFile::create(&p, Arc::clone(&self.sealer))?;
        Ok((p, f))
    }

    /// A temp file of `len` bytes, all of them its base's.
    pub fn temp_over_base(&self, name: &str, len: u64) -> std::io::Result<(PathBuf, SealedFile)> {
        let p = self.tmp.join(self.sealer.hidden_name("tmp", name.as_bytes()));
        let f = SealedFile::create_sparse(&p, Arc::clone(&self.sealer), len)?;
        Ok((p, f))
    }

    pub fn install(&self, ino: Ino, tmp: &Path, file: SealedFile) -> std::io::Result<Arc<SealedFile>> {
        std::fs::rename(tmp, self.path(ino))?;
        self.dir_changed();
        let f = Arc::new(file);
        Ok(self.lock().insert(ino, f))
    }

    pub fn remove(&self, ino: Ino) {
        let mut open = self.lock();
        open.files.remove(&ino);
        open.closed.remove(&ino);
        drop(open);
        let _ = std::fs::remove_file(self.path(ino));
    }

    /// Removes this state's staging files that belong to none of `keep` (left by an
    /// interrupted cleanup); returns how many.
    pub fn remove_others(&self, keep: &HashSet<Ino>) -> usize {
        let wanted: HashSet<std::ffi::OsString> =
            keep.iter().filter_map(|&ino| self.path(ino).file_name().map(|n| n.to_owned())).collect();
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut removed = 0;
        for e in rd.flatten() {
            if !wanted.contains(&e.file_name()) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// A copy of the staging file of `ino`, as a job that can run on a blocking thread: up
    /// to `in_memory` bytes come back as plaintext, larger files (and every file staged over
    /// its base) as a sealed copy in the temp folder; with the length and the hash of the
    /// state copied (`Copied::hash`).
    pub fn snapshot_job(
        &self,
        ino: Ino,
        name: &str,
        in_memory: u64,
    ) -> impl FnOnce() -> std::io::Result<(Snapshot, u64, String)> + Send + 'static {
        let src = self.file(ino);
        let dst = self.tmp.join(self.sealer.hidden_name("tmp", name.as_bytes()));
        move || {
            let src = src?;
            if src.len() <= in_memory && src.base_len() == 0 {
                let data = src.read_all()?;
                let hash = blake3::hash(&data).to_hex().to_string();
                let len = data.len() as u64;
                return Ok((Snapshot::Bytes(data.into()), len, hash));
            }
            let c = src.copy_to(&dst)?;
            Ok((Snapshot::File { path: dst, file: Arc::new(c.file), base_len: c.base_len }, c.len, c.hash))
        }
    }

    /// Makes file creations and renames in the staging folder durable: one fsync of the
    /// folder, skipped when none was made since the last (a file written and synced again
    /// and again, a database's, costs its own fdatasync only). Removals need none: a file
    /// left by a crash belongs to no inode and goes at the next start.
    pub fn sync_dir(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let _one = self.dir_sync.lock().unwrap_or_else(|e| e.into_inner());
        if self.dir_changed.swap(false, SeqCst)
            && let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all())
        {
            self.dir_changed.store(true, SeqCst);
            return Err(e);
        }
        Ok(())
    }

    /// Bytes of staged contents (the files' lengths, less what they take from their base;
    /// on disk, each block takes two slots at most). Summed again every 200 ms; writes in
    /// between add what they grow by.
    pub fn used(&self, recount: bool) -> u64 {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if recount || u.at.elapsed() >= USAGE_REFRESH {
            let open = self.lock();
            u.bytes = open.files.values().map(|(f, _)| f.local_len()).sum::<u64>() + open.closed.values().sum::<u64>();
            u.added = 0;
            u.at = std::time::Instant::now();
        }
        u.bytes + u.added
    }

    /// A write is about to add `bytes` to the staged contents.
    pub fn grow(&self, bytes: u64) {
        self.usage.lock().unwrap_or_else(|e| e.into_inner()).added += bytes;
    }

    /// Bytes the staging folder's filesystem still has for us, and its size.
    pub fn disk_space(&self) -> Option<(u64, u64)> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        let unit = st.fragment_size() as u64;
        Some((st.blocks_available() as u64 * unit, st.blocks() as u64 * unit))
    }

    /// Disk space the staging files take (allocated blocks: a block's second slot is a
    /// hole until it is first rewritten), for `status`.
    pub fn bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.blocks() * 512).sum())
            .unwrap_or(0)
    }
}

/// Collects a stream's chunks into whole sealed blocks, so a network chunk of a few KiB
/// does not rewrite a block each time.
pub struct BlockWriter<'a> {
    file: &'a SealedFile,
    buf: Vec<u8>,
    offset: u64,
    hasher: blake3::Hasher,
}

impl<'a> BlockWriter<'a> {
    const CHUNK: usize = 16 * STAGE_BLOCK as usize;

    pub fn new(file: &'a SealedFile) -> Self {
        BlockWriter { file, buf: Vec::with_capacity(Self::CHUNK), offset: 0, hasher: blake3::Hasher::new() }
    }

    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        self.hasher.update(data);
        while !data.is_empty() {
            let n = (Self::CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == Self::CHUNK {
                self.spill()?;
            }
        }
        Ok(())
    }

    fn spill(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&self.buf, self.offset)?;
        self.offset += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is left; returns the length and the blake3 hash (hex) of all of it.
    pub fn finish(mut self) -> std::io::Result<(u64, String)> {
        self.spill()?;
        Ok((self.offset, self.hasher.finalize().to_hex().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheKey;

    #[test]
    fn many_staged_files_keep_few_descriptors_and_their_bytes_counted() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Arc::new(Sealer::new(&CacheKey::from_bytes([7; 32])));
        let st = Staging::new(dir.path(), sealer, 1).unwrap();
        let n = MAX_OPEN as u64 * 3;
        let held = st.create_empty(Ino(2)).unwrap();
        for i in 2..2 + n {
            let f = if i == 2 { Arc::clone(&held) } else { st.create_empty(Ino(i)).unwrap() };
            f.write_all_at(format!("file {i}").as_bytes(), 0).unwrap();
        }
        let open = st.lock().files.len();
        assert!(open <= MAX_OPEN, "{open} staging files open");
        // A file someone holds is never closed (two handles of one file must not coexist).
        assert!(Arc::ptr_eq(&held, &st.file(Ino(2)).unwrap()));
        let want: u64 = (2..2 + n).map(|i| format!("file {i}").len() as u64).sum();
        assert_eq!(st.used(true), want, "closed files still count");
        // A closed file opens again with its content.
        assert_eq!(st.file(Ino(3)).unwrap().read_all().unwrap(), b"file 3");
        st.remove(Ino(3));
        assert_eq!(st.used(true), want - 6);
    }
}
