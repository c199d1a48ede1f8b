//! The encrypted, bounded block cache on local disk: sealed blocks of remote objects under
//! `CACHE_DIR/blocks/`, named by keyed hashes, evicted least-recently-used. It stores
//! plaintext blocks by identity and returns them whole or by ranges (opening only the
//! sealed units a range covers); it does not fetch, and it never returns bytes whose tag
//! failed. Every call is blocking file I/O: async callers use `spawn_blocking`.

mod key;
mod seal;
mod staged;

use std::collections::{BTreeMap, HashMap};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;

pub use key::{CREDENTIAL_NAME, CacheKey, KeySource, STATE_KEY_FILE};
pub use seal::{BlockId, BlockName, FORMAT_VERSION, Layout, OpenError, Sealer, UNIT, sealed_len};
pub use staged::{Copied, STAGE_BLOCK, STAGE_VERSION, SealedFile, needed_block};

/// The folder of the block cache inside the mount's cache dir.
pub const BLOCKS_DIR: &str = "blocks";
const CHECK_FILE: &str = "check";
const TMP_DIR: &str = "tmp";
const CHECK_MAGIC: [u8; 4] = *b"ASCK";
/// The version of the folder's layout, its naming and the check file. Block files carry
/// their own format version ([`FORMAT_VERSION`]): a file of another one is a miss.
const CHECK_VERSION: u8 = 1;

pub const MIN_DEFAULT_CAPACITY: u64 = 256 << 20;
pub const MAX_DEFAULT_CAPACITY: u64 = 20 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read key file {path}: {source}: make it readable by this user, or pass another --key-file")]
    KeyRead { path: PathBuf, source: std::io::Error },
    #[error(
        "key file {path} holds {len} bytes that are not a key: it must hold 32 raw bytes or 64 hex digits; \
         write a new one with `head -c 32 /dev/urandom > {path}` (the block cache is then rebuilt)"
    )]
    KeyFormat { path: PathBuf, len: usize },
    #[error("cannot write a new cache key to {path}: {source}: make the state dir writable, or pass --key-file")]
    KeyWrite { path: PathBuf, source: std::io::Error },
    #[error("the system's random number generator failed: {0}: check that getrandom(2) works here")]
    Random(String),
    #[error("block cache dir {path}: {source}: make it writable by this user, or pass another --cache-dir")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("block cache write to {path}: {source}: free space on that disk, or lower --cache-size")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("a block of {len} bytes is too large to seal with AES-GCM: use a smaller block size")]
    TooLarge { len: usize },
}

/// Counters since open, plus what is on disk now (`bytes`, `blocks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub hits: u64,
    /// The hits of `get_range`: parts of blocks, not whole ones.
    #[serde(default)]
    pub range_hits: u64,
    /// Every `get` that returned `None`, integrity failures included.
    pub misses: u64,
    /// Sealed bytes on disk (block files only).
    pub bytes: u64,
    pub blocks: u64,
    pub capacity: u64,
    pub evictions: u64,
    pub integrity_failures: u64,
    pub inserted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    /// Position in the LRU order; refreshed on every hit.
    tick: u64,
    /// Which put wrote the file; tells a failed read of an old file from a newer put.
    generation: u64,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<BlockName, Entry>,
    lru: BTreeMap<u64, BlockName>,
    next_tick: u64,
    /// Sealed sizes of the files in `entries`.
    bytes: u64,
    /// Sizes of puts writing their temp file now: counted against the capacity too.
    reserved: u64,
    stats: CacheStats,
}

impl Index {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn insert(&mut self, name: BlockName, size: u64) {
        let tick = self.tick();
        if let Some(old) = self.entries.insert(name, Entry { size, tick, generation: tick }) {
            self.lru.remove(&old.tick);
            self.bytes -= old.size;
        }
        self.lru.insert(tick, name);
        self.bytes += size;
    }

    fn touch(&mut self, name: &BlockName, generation: u64) {
        let tick = self.tick();
        if let Some(e) = self.entries.get_mut(name)
            && e.generation == generation
        {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, *name);
        }
    }

    /// Forgets `name` if it is still the file written by `generation`.
    fn forget(&mut self, name: &BlockName, generation: u64) -> bool {
        match self.entries.get(name) {
            Some(e) if e.generation == generation => {
                self.lru.remove(&e.tick);
                self.bytes -= e.size;
                self.entries.remove(name);
                true
            }
            _ => false,
        }
    }
}

/// The block cache of one mount. `Send + Sync`; share it behind an `Arc`.
pub struct BlockCache {
    root: PathBuf,
    sealer: Sealer,
    capacity: u64,
    index: Mutex<Index>,
    warned_write: AtomicBool,
    /// Whether block files are still written with `O_DIRECT` (cleared when the filesystem
    /// refuses it).
    direct: AtomicBool,
    /// Told of every integrity failure (the object key, the block, what failed).
    on_failure: std::sync::OnceLock<IntegrityObserver>,
}

/// What a read of a block file came to.
enum Outcome {
    Hit(Bytes),
    /// Not on disk (any more).
    Gone,
    /// Authentic, but not the block asked for (another length).
    Unwanted,
    /// A block file of another format version: not opened.
    OtherFormat,
    /// An integrity failure, and why.
    Failed(String),
}

/// What hears of a block that failed its integrity check.
pub type IntegrityObserver = Box<dyn Fn(&str, u64, &str) + Send + Sync>;

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").field("root", &self.root).field("capacity", &self.capacity).finish()
    }
}

/// A block name in lowercase hex. Every read computes its file's path: a `format!` per byte
/// showed in the profile of a 4 KiB ranged read.
fn hex(name: &BlockName) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in name {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<BlockName> {
    let b = s.as_bytes();
    if b.len() != 64 || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn mkdir(p: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(p)
}

impl BlockCache {
    /// Opens (creating) the cache in `DIR/blocks`, keyed by `key`, bounded by `capacity`
    /// bytes of sealed block files. Existing blocks are kept, in LRU order by their mtime
    /// (a hit sets it). A dir written with another key or format version is emptied, with
    /// one warning.
    pub fn open(dir: &Path, key: &CacheKey, capacity: u64) -> Result<BlockCache, CacheError> {
        let root = dir.join(BLOCKS_DIR);
        let derr = |p: &Path| {
            let p = p.to_path_buf();
            move |e| CacheError::Dir { path: p, source: e }
        };
        mkdir(dir).map_err(derr(dir))?;
        let check = Self::check_bytes(key);
        let check_path = root.join(CHECK_FILE);
        let keep = match std::fs::read(&check_path) {
            Ok(found) if found == check => true,
            Ok(_) => {
                tracing::warn!(
                    "block cache {} was written with another key or format version: discarding it",
                    root.display()
                );
                false
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let has_blocks = std::fs::read_dir(&root)
                    .map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != TMP_DIR)))
                    .unwrap_or(false);
                if has_blocks {
                    tracing::warn!("block cache {} has no key check file: discarding it", root.display());
                }
                false
            }
            Err(e) => return Err(CacheError::Dir { path: check_path, source: e }),
        };
        if !keep {
            match std::fs::remove_dir_all(&root) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(derr(&root)(e)),
                _ => {}
            }
            mkdir(&root).map_err(derr(&root))?;
            // The check file goes in last-but-first: a dir without it is discarded next time.
            let tmp = root.join(".check.tmp");
            let res = (|| {
                let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
                f.write_all(&check)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &check_path)
            })();
            res.map_err(derr(&check_path))?;
        }
        let tmp = root.join(TMP_DIR);
        match std::fs::remove_dir_all(&tmp) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(derr(&tmp)(e)),
            _ => {}
        }
        mkdir(&tmp).map_err(derr(&tmp))?;
        for i in 0..=255u8 {
            let p = root.join(format!("{i:02x}"));
            mkdir(&p).map_err(derr(&p))?;
        }

        let cache = BlockCache {
            sealer: Sealer::new(key),
            capacity,
            index: Mutex::new(Index::default()),
            warned_write: AtomicBool::new(false),
            direct: AtomicBool::new(true),
            on_failure: std::sync::OnceLock::new(),
            root,
        };
        let mut found = cache.scan();
        found.sort();
        let mut ix = cache.lock();
        for (_, name, size) in found {
            ix.insert(name, size);
        }
        while ix.bytes > capacity {
            cache.evict_one(&mut ix);
        }
        drop(ix);
        Ok(cache)
    }

    fn check_bytes(key: &CacheKey) -> Vec<u8> {
        let mut v = CHECK_MAGIC.to_vec();
        v.push(CHECK_VERSION);
        v.extend_from_slice(&key.check_value());
        v
    }

    /// The block files on disk: (mtime, name, size). Anything in a fan-out folder that is
    /// not a block file name is removed; unreadable entries are skipped.
    fn scan(&self) -> Vec<(SystemTime, BlockName, u64)> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let fan = format!("{i:02x}");
            let Ok(rd) = std::fs::read_dir(self.root.join(&fan)) else { continue };
            for ent in rd.flatten() {
                let Ok(meta) = ent.metadata() else { continue };
                let name = ent.file_name();
                let parsed = name.to_str().filter(|n| n.starts_with(&fan)).and_then(unhex);
                match parsed {
                    Some(n) if meta.is_file() => {
                        out.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), n, meta.len()))
                    }
                    _ if meta.is_file() || meta.is_symlink() => {
                        let _ = std::fs::remove_file(ent.path());
                    }
                    _ => {}
                }
            }
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, name: &BlockName) -> PathBuf {
        let h = hex(name);
        self.root.join(&h[..2]).join(h)
    }

    fn evict_one(&self, ix: &mut Index) -> bool {
        let Some((_, name)) = ix.lru.pop_first() else { return false };
        if let Some(e) = ix.entries.remove(&name) {
            ix.bytes -= e.size;
        }
        ix.stats.evictions += 1;
        if let Err(e) = std::fs::remove_file(self.path(&name))
            && e.kind() != ErrorKind::NotFound
        {
            tracing::debug!("block cache: evicting {}: {e}", hex(&name));
        }
        true
    }

    /// Whether a block is cached, without reading it or counting anything.
    pub fn contains(&self, id: &BlockId) -> bool {
        self.lock().entries.contains_key(&self.sealer.name(id))
    }

    /// The plaintext of a cached block, or `None`. A block whose tag fails (tampered, torn,
    /// rotted, another block's file) is counted in `integrity_failures`, deleted, and
    /// `None` is returned: never wrong bytes. A block file of another format version is a
    /// plain miss, deleted too.
    pub fn get(&self, id: &BlockId) -> Option<Bytes> {
        let (name, generation) = self.lookup(id)?;
        let path = self.path(&name);
        let read = self.read_whole(id, &path);
        self.settle(id, &name, generation, &path, read, false)
    }

    /// Bytes `range` of a cached block of `len` bytes, reading and opening only the sealed
    /// units that cover them, or `None`. `None` too if the cached block has another length
    /// (it is not the block the caller means) or `range` does not lie within `len`. A unit
    /// that fails its tag is an integrity failure of the whole block, as in
    /// [`BlockCache::get`]; units outside the range are not looked at. An empty range is
    /// answered without reading.
    pub fn get_range(&self, id: &BlockId, range: Range<u64>, len: u64) -> Option<Bytes> {
        if range.start > range.end || range.end > len {
            return None;
        }
        if range.is_empty() {
            return self.contains(id).then(Bytes::new);
        }
        let (name, generation) = self.lookup(id)?;
        let path = self.path(&name);
        let read = self.read_range(id, &path, range, len);
        self.settle(id, &name, generation, &path, read, true)
    }

    /// The name of a block and the put that wrote it, if cached; a miss is counted.
    fn lookup(&self, id: &BlockId) -> Option<(BlockName, u64)> {
        let name = self.sealer.name(id);
        let mut ix = self.lock();
        match ix.entries.get(&name) {
            Some(e) => Some((name, e.generation)),
            None => {
                ix.stats.misses += 1;
                None
            }
        }
    }

    fn read_whole(&self, id: &BlockId, path: &Path) -> Outcome {
        match read_touch(path) {
            Ok(mut buf) => match self.sealer.open_in_place(id, &mut buf) {
                Ok(range) => Outcome::Hit(Bytes::from(buf).slice(range)),
                Err(OpenError::Version) => Outcome::OtherFormat,
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => Outcome::Gone,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Two `pread`s: the header with the table entries up to the last unit needed, then the
    /// ciphertext of the units that cover `range`, contiguous in the file, which open in
    /// place into contiguous plaintext: the answer is a slice of that buffer.
    fn read_range(&self, id: &BlockId, path: &Path, range: Range<u64>, len: u64) -> Outcome {
        let io = |e: std::io::Error| match e.kind() {
            ErrorKind::NotFound => Outcome::Gone,
            _ => Outcome::Failed(e.to_string()),
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) => return io(e),
        };
        let size = match f.metadata() {
            Ok(m) => m.len(),
            Err(e) => return io(e),
        };
        let layout = Layout::for_file(size);
        let (start, end) = (range.start as usize, range.end as usize);
        let units = match layout {
            Ok(l) if l.plain_len() as u64 == len => l.units_for(start..end),
            // The header says whether it is ours at all; then the length decides.
            _ => 0..0,
        };
        let head_len = layout.map_or(seal::HEADER_LEN, |l| l.entries_of(units.clone()).end).min(size as usize);
        let mut head = vec![0u8; head_len];
        if let Err(e) = f.read_exact_at(&mut head, 0) {
            return io(e);
        }
        match seal::check_header(&head) {
            Ok(()) => {}
            Err(OpenError::Version) => return Outcome::OtherFormat,
            Err(e) => return Outcome::Failed(e.to_string()),
        }
        let layout = match layout {
            Ok(l) => l,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if layout.plain_len() as u64 != len {
            // Another length: an authentic block of another length (not the one asked for),
            // or a damaged file. Only the whole file tells which.
            drop(f);
            return match self.read_whole(id, path) {
                Outcome::Hit(_) => Outcome::Unwanted,
                other => other,
            };
        }
        let span = layout.plain_of(units.clone());
        let mut body = vec![0u8; span.len()];
        if let Err(e) = f.read_exact_at(&mut body, (layout.body_start() + span.start) as u64) {
            return io(e);
        }
        let entries = &head[layout.entries_of(units.clone())];
        if let Err(e) = self.sealer.open_units(id, &layout, units, entries, &mut body) {
            return Outcome::Failed(e.to_string());
        }
        let _ = f.set_modified(SystemTime::now());
        Outcome::Hit(Bytes::from(body).slice(start - span.start..end - span.start))
    }

    /// Counts a read of block `name` (written by put `generation`; `ranged`: a part of it)
    /// and acts on its outcome.
    fn settle(
        &self,
        id: &BlockId,
        name: &BlockName,
        generation: u64,
        path: &Path,
        read: Outcome,
        ranged: bool,
    ) -> Option<Bytes> {
        let mut ix = self.lock();
        let failure = match read {
            Outcome::Hit(b) => {
                ix.stats.hits += 1;
                ix.stats.range_hits += u64::from(ranged);
                ix.touch(name, generation);
                return Some(b);
            }
            Outcome::Unwanted => {
                ix.stats.misses += 1;
                return None;
            }
            Outcome::Gone | Outcome::OtherFormat => {
                // Removed behind our back (or evicted meanwhile), or left by another version
                // of autosync: a plain miss. The block is fetched and written again.
                ix.stats.misses += 1;
                if ix.forget(name, generation) && matches!(read, Outcome::OtherFormat) {
                    let _ = std::fs::remove_file(path);
                }
                return None;
            }
            Outcome::Failed(why) => why,
        };
        ix.stats.misses += 1;
        ix.stats.integrity_failures += 1;
        if ix.forget(name, generation) {
            let _ = std::fs::remove_file(path);
        }
        drop(ix);
        tracing::warn!(
            "block cache: block {} of {} failed its integrity check ({failure}); dropped, it will be fetched again",
            id.index,
            id.key
        );
        if let Some(tell) = self.on_failure.get() {
            tell(id.key, id.index, &failure);
        }
        None
    }

    /// Tells `observer` of every block that fails its integrity check from now on (once per
    /// cache; a second observer is ignored).
    pub fn on_integrity_failure(&self, observer: IntegrityObserver) {
        let _ = self.on_failure.set(observer);
    }

    /// Seals and stores a block, evicting least-recently-used blocks first so that the block
    /// files (those being written included) never exceed the capacity. A failure is logged
    /// (the first one as a warning) and otherwise ignored: the cache is only a cache.
    pub fn put(&self, id: &BlockId, data: &[u8]) {
        if let Err(e) = self.try_put(id, data) {
            if self.warned_write.swap(true, Ordering::Relaxed) {
                tracing::debug!("{e}");
            } else {
                tracing::warn!("{e}");
            }
        }
    }

    /// [`BlockCache::put`] that returns its error. `Ok` also when the block was not stored
    /// because it cannot fit (larger than the capacity, or the rest is being written now).
    pub fn try_put(&self, id: &BlockId, data: &[u8]) -> Result<(), CacheError> {
        let name = self.sealer.name(id);
        let size = sealed_len(data.len()) as u64;
        if size > self.capacity {
            return Ok(());
        }
        SEAL_BUF.with_borrow_mut(|buf| self.put_sealed(id, name, data, aligned(buf, size as usize)))
    }

    fn put_sealed(&self, id: &BlockId, name: BlockName, data: &[u8], sealed: &mut [u8]) -> Result<(), CacheError> {
        self.sealer.seal_into(id, data, sealed)?;
        let size = sealed.len() as u64;
        {
            let mut ix = self.lock();
            while ix.bytes + ix.reserved + size > self.capacity && self.evict_one(&mut ix) {}
            if ix.bytes + ix.reserved + size > self.capacity {
                return Ok(());
            }
            ix.reserved += size;
        }
        let tmp = self.root.join(TMP_DIR).join(format!("{}-{:016x}", hex(&name), rand::random::<u64>()));
        let written = write_new(&tmp, sealed, &self.direct).and_then(|f| {
            // The LRU order after a remount comes from mtimes; set it at full precision.
            f.set_modified(SystemTime::now())
        });
        let mut ix = self.lock();
        ix.reserved -= size;
        let dest = self.path(&name);
        let res = written.and_then(|()| match std::fs::rename(&tmp, &dest) {
            Err(e) if e.kind() == ErrorKind::NotFound && !tmp.exists() => Err(e),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // The fan-out folder went missing: make it again.
                if let Some(parent) = dest.parent() {
                    mkdir(parent)?;
                }
                std::fs::rename(&tmp, &dest)
            }
            other => other,
        });
        if let Err(e) = res {
            drop(ix);
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError::Write { path: dest, source: e });
        }
        ix.insert(name, size);
        ix.stats.inserted += 1;
        Ok(())
    }

    pub fn stats(&self) -> CacheStats {
        let ix = self.lock();
        CacheStats { bytes: ix.bytes, blocks: ix.entries.len() as u64, capacity: self.capacity, ..ix.stats.clone() }
    }

    /// Deletes every block. The counters keep counting.
    pub fn clear(&self) -> Result<(), CacheError> {
        let mut ix = self.lock();
        for name in ix.entries.keys() {
            let p = self.path(name);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(CacheError::Dir { path: p, source: e }),
                _ => {}
            }
        }
        ix.entries.clear();
        ix.lru.clear();
        ix.bytes = 0;
        Ok(())
    }
}

/// Alignment of the buffer and length of `O_DIRECT` writes: a multiple of the logical block
/// size of the disks this runs on (512 or 4096 bytes).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// The buffer a thread seals blocks into, kept between puts: a fresh megabyte for every
    /// block costs page faults, and on a VM first touches of memory are slow.
    static SEAL_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `len` bytes of `buf` starting at an address aligned for `O_DIRECT`.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    let off = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    &mut buf[off..off + len]
}

/// Writes a new file holding `data`. The aligned bulk goes with `O_DIRECT`, past the page
/// cache: copying a sealed block into fresh page-cache pages costs more CPU than sealing it
/// (here), and the cache's own readers are the next mount. The unaligned tail goes through
/// the page cache. A filesystem that refuses `O_DIRECT` (EINVAL) gets plain writes from then
/// on.
fn write_new(path: &Path, data: &[u8], direct: &AtomicBool) -> std::io::Result<File> {
    use std::os::unix::fs::FileExt;
    let bulk = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let create = || {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true).mode(0o600);
        o
    };
    if direct.load(Ordering::Relaxed) && bulk > 0 && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        let einval = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
        match create().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => match f.write_at(&data[..bulk], 0) {
                Ok(n) if n == bulk => {
                    let tail = OpenOptions::new().write(true).open(path)?;
                    tail.write_all_at(&data[bulk..], bulk as u64)?;
                    return Ok(tail);
                }
                Ok(_) => return Err(std::io::Error::new(ErrorKind::WriteZero, "short O_DIRECT write")),
                Err(e) if einval(&e) => {
                    drop(f);
                    std::fs::remove_file(path)?;
                    direct.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            },
            Err(e) if einval(&e) => direct.store(false, Ordering::Relaxed),
            Err(e) => return Err(e),
        }
    }
    let mut f = create().open(path)?;
    f.write_all(data)?;
    Ok(f)
}

/// Reads a whole file and sets its mtime to now (its place in the LRU order after a
/// remount). Failing to set the mtime is not an error.
fn read_touch(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let mut buf = Vec::with_capacity(len);
    f.read_to_end(&mut buf)?;
    let _ = f.set_modified(SystemTime::now());
    Ok(buf)
}

/// A default capacity: 10% of the free space of the filesystem holding `dir` (or its
/// nearest existing parent), clamped to [256 MiB, 20 GiB]; 256 MiB if that cannot be read.
pub fn default_capacity(dir: &Path) -> u64 {
    let mut p = dir;
    loop {
        if let Ok(st) = nix::sys::statvfs::statvfs(p) {
            #[allow(clippy::unnecessary_cast)]
            let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
            return (free / 10).clamp(MIN_DEFAULT_CAPACITY, MAX_DEFAULT_CAPACITY);
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return MIN_DEFAULT_CAPACITY,
        }
    }
}

#[cfg(test)]
mod tests;
