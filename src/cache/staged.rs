//! Sealed staging files: content not yet in the bucket, kept on local disk in 64 KiB blocks,
//! each sealed with AES-256-GCM. A block is rewritten into the other of its two slots, so a
//! write torn by a crash never destroys the version written before it. Small writes gather
//! in one block kept in memory until another block, a resize or a sync needs it sealed.
//!
//! A file may be sparse over a base: the first `base_len` bytes of every block never
//! written here are the base's (the bucket's version the edit started from), which this
//! module never holds. Reads report those ranges to the caller (`read_sparse`), and a
//! partial write into such a block needs its base bytes first (`fill_block`). It knows
//! bytes and offsets, not inodes or objects.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::RngCore;

use super::seal::{NONCE_LEN, Sealer, TAG_LEN};

/// The first bytes of every staging file.
pub const STAGE_MAGIC: [u8; 4] = *b"ASST";
/// Bumped when the staging file layout or its AAD changes incompatibly. Version 1 files
/// (no base length in the length record) still open, and never become sparse.
pub const STAGE_VERSION: u8 = 2;
/// Plaintext bytes per sealed block.
pub const STAGE_BLOCK: u64 = 64 << 10;

const ID_LEN: usize = 16;
/// magic, version, 3 zero bytes, the file's random id.
const HEAD_LEN: usize = 8 + ID_LEN;
/// The two slots of the length record: nonce, sequence, sealed length and base length
/// (u64 each; version 1: the length only), tag.
const LEN_AT: [u64; 2] = [64, 128];
const fn len_slot(version: u8) -> usize {
    NONCE_LEN + 8 + len_plain(version) + TAG_LEN
}
const fn len_plain(version: u8) -> usize {
    if version == 1 { 8 } else { 16 }
}
/// Blocks start on the second page.
const DATA_START: u64 = 4096;
/// A block slot: nonce, sequence, sealed block, tag.
const SLOT_HEAD: usize = NONCE_LEN + 8;
const SLOT: usize = SLOT_HEAD + STAGE_BLOCK as usize + TAG_LEN;

/// The top bit of a block's sequence (version 2): the block's bytes below the file's base
/// length are the base's, not the zeros its plaintext holds there (an append into the block
/// the base ends in, which needs nothing of the base). In the AAD with the rest of it, so it
/// cannot be set or cleared without the key.
const BASE_PREFIX: u64 = 1 << 63;

/// A block sequence without its flag.
fn seq_no(raw: u64) -> u64 {
    raw & !BASE_PREFIX
}

/// The next sequence of a block, keeping its flag.
fn next_seq(raw: u64) -> u64 {
    (seq_no(raw) + 1) | (raw & BASE_PREFIX)
}

/// Where the slot of block `index` holding sequence `seq` lives: even sequences in the
/// first slot, odd ones in the second.
fn slot_at(index: u64, seq: u64) -> u64 {
    DATA_START + index * 2 * SLOT as u64 + (seq % 2) * SLOT as u64
}

/// The file length that holds every block of `len` plaintext bytes.
fn physical_len(len: u64) -> u64 {
    DATA_START + len.div_ceil(STAGE_BLOCK) * 2 * SLOT as u64
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A read or write reached bytes of the base, which this file does not hold: the caller
/// brings them (`fill_block`, or the bucket's copy for a read).
#[derive(Debug, thiserror::Error)]
#[error("staged block {0} is the base's and not here yet")]
pub struct NeedsBase(pub u64);

fn needs_base(index: u64) -> io::Error {
    io::Error::other(NeedsBase(index))
}

/// The block a [`NeedsBase`] error names, if it is one.
pub fn needed_block(e: &io::Error) -> Option<u64> {
    e.get_ref().and_then(|i| i.downcast_ref::<NeedsBase>()).map(|n| n.0)
}

/// A copy of a staging file (`copy_to`).
pub struct Copied {
    pub file: SealedFile,
    pub len: u64,
    /// The copy's base length: 0 when it holds all of its content.
    pub base_len: u64,
    /// blake3 (hex) of the content when it is all here; of the length, the base length and
    /// the blocks held here (each with its index) otherwise.
    pub hash: String,
}

/// A block being written in small pieces: its plaintext, sealed when left.
#[derive(Debug)]
struct Pending {
    index: u64,
    /// The sequence of the block's valid slot (0: none yet).
    seq: u64,
    plain: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    /// The plaintext length, with writes not yet recorded on disk.
    len: u64,
    /// Bytes from the start that blocks never written here take from the base; never more
    /// than `len`. Recorded with the length.
    base_len: u64,
    /// `len` differs from the length record on disk.
    len_dirty: bool,
    len_seq: u64,
    pending: Option<Pending>,
    /// The sequence of the valid slot of each block read or written since open; 0 for a
    /// block never written (a hole, read as zeros).
    seqs: HashMap<u64, u64>,
}

/// One staging file, opened read-write. Calls are blocking file I/O.
pub struct SealedFile {
    file: File,
    id: [u8; ID_LEN],
    /// The file's format version (1 or [`STAGE_VERSION`]), in its AAD.
    version: u8,
    sealer: Arc<Sealer>,
    state: Mutex<State>,
}

impl std::fmt::Debug for SealedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedFile").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl SealedFile {
    /// Creates an empty staging file at `path`, replacing any file there.
    pub fn create(path: &Path, sealer: Arc<Sealer>) -> io::Result<SealedFile> {
        Self::create_sparse(path, sealer, 0)
    }

    /// Creates a staging file of `len` bytes, all of them the base's until written here.
    pub fn create_sparse(path: &Path, sealer: Arc<Sealer>, len: u64) -> io::Result<SealedFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(path)?;
        let mut id = [0u8; ID_LEN];
        rand::rng().fill_bytes(&mut id);
        let mut head = [0u8; HEAD_LEN];
        head[..4].copy_from_slice(&STAGE_MAGIC);
        head[4] = STAGE_VERSION;
        head[8..].copy_from_slice(&id);
        file.write_all_at(&head, 0)?;
        let f = SealedFile { file, id, version: STAGE_VERSION, sealer, state: Mutex::new(State::default()) };
        {
            let mut st = f.lock();
            st.base_len = len;
            f.write_len(&mut st, len)?;
        }
        Ok(f)
    }

    /// Seals the block gathered in memory, if any.
    fn flush_pending(&self, st: &mut State) -> io::Result<()> {
        if let Some(p) = st.pending.take()
            && let Err(e) = self.write_block(st, p.index, next_seq(p.seq), &p.plain)
        {
            // Kept for the next flush (a full disk may have room again): a later `fsync`
            // must not report these bytes durable when they never reached the disk.
            st.pending = Some(p);
            return Err(e);
        }
        Ok(())
    }

    /// Writes what is only in memory: the gathered block, then the length.
    fn flush(&self, st: &mut State) -> io::Result<()> {
        self.flush_pending(st)?;
        if st.len_dirty {
            self.write_len(st, st.len)?;
        }
        Ok(())
    }

    /// Opens an existing staging file. After a crash it drops blocks past the recorded
    /// length and zeroes the tail of the last block, so a later extension reads zeros there.
    pub fn open(path: &Path, sealer: Arc<Sealer>) -> io::Result<SealedFile> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut head = [0u8; HEAD_LEN];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| invalid(format!("{} is not a staging file (too short)", path.display())))?;
        let version = head[4];
        if head[..4] != STAGE_MAGIC || !(1..=STAGE_VERSION).contains(&version) {
            return Err(invalid(format!("{} is not a staging file of format {STAGE_VERSION}", path.display())));
        }
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&head[8..]);
        let f = SealedFile { file, id, version, sealer, state: Mutex::new(State::default()) };
        let (len, base_len, len_seq) = f.read_len()?;
        {
            let mut st = f.lock();
            st.len = len;
            st.base_len = base_len.min(len);
            st.len_seq = len_seq;
            if f.file.metadata()?.len() > physical_len(len) {
                f.file.set_len(physical_len(len))?;
            }
            let tail = (len % STAGE_BLOCK) as usize;
            if tail != 0 {
                let index = len / STAGE_BLOCK;
                if let (seq, Some(mut plain)) = f.load_block(&mut st, index)?
                    && plain[tail..].iter().any(|&b| b != 0)
                {
                    plain[tail..].fill(0);
                    f.write_block(&mut st, index, next_seq(seq), &plain)?;
                }
            }
        }
        Ok(f)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plaintext length.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes from the start that blocks not written here take from the base.
    pub fn base_len(&self) -> u64 {
        self.lock().base_len
    }

    /// The length less the bytes the base holds: about what the file holds here.
    pub fn local_len(&self) -> u64 {
        let st = self.lock();
        st.len - st.base_len
    }

    fn aad(&self, kind: u8, index: u64, seq: u64) -> [u8; 5 + ID_LEN + 1 + 16] {
        let mut aad = [0u8; 5 + ID_LEN + 1 + 16];
        aad[..4].copy_from_slice(&STAGE_MAGIC);
        aad[4] = self.version;
        aad[5..5 + ID_LEN].copy_from_slice(&self.id);
        aad[5 + ID_LEN] = kind;
        aad[6 + ID_LEN..14 + ID_LEN].copy_from_slice(&index.to_le_bytes());
        aad[14 + ID_LEN..].copy_from_slice(&seq.to_le_bytes());
        aad
    }

    /// The recorded length, base length and the record's sequence.
    fn read_len(&self) -> io::Result<(u64, u64, u64)> {
        let mut best: Option<(u64, u64, u64)> = None;
        let mut failed = false;
        for (slot, at) in LEN_AT.iter().enumerate() {
            let mut buf = vec![0u8; len_slot(self.version)];
            if self.file.read_exact_at(&mut buf, *at).is_err() {
                continue;
            }
            let seq = u64::from_le_bytes(buf[NONCE_LEN..NONCE_LEN + 8].try_into().unwrap_or_default());
            if buf.iter().all(|&b| b == 0) {
                continue;
            }
            let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
            let sealed = &mut rest[8..];
            let ok = seq % 2 == slot as u64 && self.sealer.open_parts(&self.aad(b'L', 0, seq), nonce, sealed).is_ok();
            if !ok {
                failed = true;
                continue;
            }
            let len = u64::from_le_bytes(sealed[..8].try_into().unwrap_or_default());
            let base_len = match self.version {
                1 => 0,
                _ => u64::from_le_bytes(sealed[8..16].try_into().unwrap_or_default()),
            };
            if best.is_none_or(|(_, _, s)| seq > s) {
                best = Some((len, base_len, seq));
            }
        }
        match best {
            Some(b) => Ok(b),
            None if failed => Err(invalid("a staging file's length record failed its integrity check".into())),
            None => Err(invalid("a staging file has no length record".into())),
        }
    }

    /// Records `len` (and `st.base_len`, cut to `len`).
    fn write_len(&self, st: &mut State, len: u64) -> io::Result<()> {
        let seq = st.len_seq + 1;
        let base_len = st.base_len.min(len);
        let plain = len_plain(self.version);
        let mut buf = vec![0u8; len_slot(self.version)];
        let body = NONCE_LEN + 8..NONCE_LEN + 8 + plain;
        buf[NONCE_LEN..NONCE_LEN + 8].copy_from_slice(&seq.to_le_bytes());
        buf[body.start..body.start + 8].copy_from_slice(&len.to_le_bytes());
        if plain == 16 {
            buf[body.start + 8..body.end].copy_from_slice(&base_len.to_le_bytes());
        }
        let (nonce, tag) =
            self.sealer.seal_parts(&self.aad(b'L', 0, seq), &mut buf[body.clone()]).map_err(io::Error::other)?;
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        buf[body.end..].copy_from_slice(&tag);
        self.file.write_all_at(&buf, LEN_AT[(seq % 2) as usize])?;
        st.len = len;
        st.base_len = base_len;
        st.len_dirty = false;
        st.len_seq = seq;
        Ok(())
    }

    /// Reads and opens one slot; `None` if its tag fails or it is not the slot of `seq`.
    fn open_slot(&self, index: u64, seq: u64) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; SLOT];
        let n = read_full_at(&self.file, &mut buf, slot_at(index, seq))?;
        if n < SLOT {
            return Ok(None);
        }
        let found = u64::from_le_bytes(buf[NONCE_LEN..SLOT_HEAD].try_into().unwrap_or_default());
        if found != seq {
            return Ok(None);
        }
        let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
        if self.sealer.open_parts(&self.aad(b'B', index, seq), nonce, &mut rest[8..]).is_err() {
            return Ok(None);
        }
        buf.truncate(SLOT_HEAD + STAGE_BLOCK as usize);
        buf.drain(..SLOT_HEAD);
        Ok(Some(buf))
    }

    /// The block's current sequence and plaintext (`None`: a hole, all zeros). A torn
    /// newer slot falls back to the older one; if no slot opens, the block is lost.
    fn load_block(&self, st: &mut State, index: u64) -> io::Result<(u64, Option<Vec<u8>>)> {
        if let Some(p) = st.pending.as_ref().filter(|p| p.index == index) {
            return Ok((p.seq, Some(p.plain.clone())));
        }
        if index >= st.len.div_ceil(STAGE_BLOCK) && !st.seqs.contains_key(&index) {
            return Ok((0, None));
        }
        if let Some(&seq) = st.seqs.get(&index) {
            if seq == 0 {
                return Ok((0, None));
            }
            if let Some(plain) = self.open_slot(index, seq)? {
                return Ok((seq, Some(plain)));
            }
        }
        let mut seqs = Vec::with_capacity(2);
        for slot in 0..2u64 {
            let mut head = [0u8; SLOT_HEAD];
            let n = read_full_at(&self.file, &mut head, slot_at(index, slot))?;
            if n < SLOT_HEAD || head.iter().all(|&b| b == 0) {
                continue;
            }
            seqs.push(u64::from_le_bytes(head[NONCE_LEN..].try_into().unwrap_or_default()));
        }
        seqs.sort_unstable_by_key(|&s| std::cmp::Reverse(seq_no(s)));
        let written = !seqs.is_empty();
        for seq in seqs {
            if let Some(plain) = self.open_slot(index, seq)? {
                st.seqs.insert(index, seq);
                return Ok((seq, Some(plain)));
            }
        }
        if written {
            return Err(invalid(format!(
                "staged block {index} failed its integrity check (tampered with, or rotted on disk)"
            )));
        }
        st.seqs.insert(index, 0);
        Ok((0, None))
    }

    /// Seals `plain` (one whole block) into the slot of `seq`.
    fn write_block(&self, st: &mut State, index: u64, seq: u64, plain: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; SLOT];
        buf[SLOT_HEAD..SLOT_HEAD + plain.len()].copy_from_slice(plain);
        self.seal_slot(st, index, seq, buf)
    }

    /// `buf` is a whole slot with the plaintext in place; seals and writes it.
    fn seal_slot(&self, st: &mut State, index: u64, seq: u64, mut buf: Vec<u8>) -> io::Result<()> {
        let body_end = SLOT_HEAD + STAGE_BLOCK as usize;
        let (nonce, tag) = self
            .sealer
            .seal_parts(&self.aad(b'B', index, seq), &mut buf[SLOT_HEAD..body_end])
            .map_err(io::Error::other)?;
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        buf[NONCE_LEN..SLOT_HEAD].copy_from_slice(&seq.to_le_bytes());
        buf[body_end..].copy_from_slice(&tag);
        self.file.write_all_at(&buf, slot_at(index, seq))?;
        st.seqs.insert(index, seq);
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file. Bytes
    /// of the base are an error ([`NeedsBase`]): see `read_sparse`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let (n, base) = self.read_sparse(buf, offset)?;
        match base.first() {
            Some(r) => Err(needs_base(r.start / STAGE_BLOCK)),
            None => Ok(n),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset` (fewer only at the end of the file), and
    /// returns, in file offsets, the ranges that are the base's: left as zeros in `buf`,
    /// for the caller to fill from the base.
    pub fn read_sparse(&self, buf: &mut [u8], offset: u64) -> io::Result<(usize, Vec<Range<u64>>)> {
        let mut st = self.lock();
        if offset >= st.len {
            return Ok((0, Vec::new()));
        }
        let end = (offset + buf.len() as u64).min(st.len);
        let mut base: Vec<Range<u64>> = Vec::new();
        for (index, inside, at) in pieces(offset, end) {
            let out = &mut buf[at.clone()];
            let from_base = if let Some(p) = st.pending.as_ref().filter(|p| p.index == index) {
                out.copy_from_slice(&p.plain[inside]);
                p.seq & BASE_PREFIX != 0
            } else {
                match self.load_block(&mut st, index)? {
                    (seq, Some(plain)) => {
                        out.copy_from_slice(&plain[inside]);
                        seq & BASE_PREFIX != 0
                    }
                    (_, None) => {
                        out.fill(0);
                        true
                    }
                }
            };
            let from = offset + at.start as u64;
            let to = (offset + at.end as u64).min(st.base_len);
            if from_base && from < to {
                match base.last_mut() {
                    Some(last) if last.end == from => last.end = to,
                    _ => base.push(from..to),
                }
            }
        }
        Ok(((end - offset) as usize, base))
    }

    /// Whether block `index` is held here (written, or filled from the base).
    fn held(&self, st: &mut State, index: u64) -> io::Result<bool> {
        if st.pending.as_ref().is_some_and(|p| p.index == index) {
            return Ok(true);
        }
        if let Some(&seq) = st.seqs.get(&index) {
            return Ok(seq > 0);
        }
        for slot in 0..2u64 {
            let mut head = [0u8; SLOT_HEAD];
            let n = read_full_at(&self.file, &mut head, slot_at(index, slot))?;
            if n == SLOT_HEAD && head.iter().any(|&b| b != 0) {
                return Ok(true);
            }
        }
        st.seqs.insert(index, 0);
        Ok(false)
    }

    /// The blocks held here, in order: those whose slots hold data (found through the
    /// file's holes, where the filesystem tells them) and the block gathered in memory.
    fn held_blocks(&self, st: &mut State) -> io::Result<Vec<u64>> {
        use nix::unistd::{Whence, lseek};
        let blocks = st.len.div_ceil(STAGE_BLOCK);
        let span = 2 * SLOT as u64;
        let fd = &self.file;
        let mut candidates = Vec::new();
        let mut pos = DATA_START as i64;
        let end = physical_len(st.len) as i64;
        while pos < end {
            let Ok(data) = lseek(fd, pos, Whence::SeekData) else { break };
            if data >= end {
                break;
            }
            let hole = lseek(fd, data, Whence::SeekHole).unwrap_or(end).min(end);
            let first = (data as u64 - DATA_START) / span;
            let last = (hole as u64 - DATA_START).div_ceil(span);
            let from = candidates.last().map_or(first, |&l: &u64| first.max(l + 1));
            candidates.extend(from..last.min(blocks));
            pos = hole.max(data + 1);
        }
        if let Some(p) = &st.pending {
            candidates.push(p.index);
            candidates.sort_unstable();
            candidates.dedup();
        }
        let mut held = Vec::with_capacity(candidates.len());
        for i in candidates {
            if self.held(st, i)? {
                held.push(i);
            }
        }
        Ok(held)
    }

    /// The blocks that still take bytes from the base: not held here, or held with their
    /// bytes below the base length the base's, within the base length.
    pub fn base_blocks(&self) -> io::Result<Vec<u64>> {
        let mut st = self.lock();
        let held: std::collections::HashSet<u64> = self.held_blocks(&mut st)?.into_iter().collect();
        let mut out = Vec::new();
        for i in 0..st.base_len.div_ceil(STAGE_BLOCK) {
            if !held.contains(&i) || self.load_block(&mut st, i)?.0 & BASE_PREFIX != 0 {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The ranges (file offsets, in order, merged) whose bytes are the base's.
    pub fn base_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let mut st = self.lock();
        let base_len = st.base_len;
        let held: std::collections::HashSet<u64> = self.held_blocks(&mut st)?.into_iter().collect();
        let mut out: Vec<Range<u64>> = Vec::new();
        for i in 0..base_len.div_ceil(STAGE_BLOCK) {
            let from_base = match held.contains(&i) {
                false => true,
                true => {
                    let known = match &st.pending {
                        Some(p) if p.index == i => Some(p.seq),
                        _ => st.seqs.get(&i).copied(),
                    };
                    let seq = match known {
                        Some(seq) => seq,
                        None => self.load_block(&mut st, i)?.0,
                    };
                    seq & BASE_PREFIX != 0
                }
            };
            let r = i * STAGE_BLOCK..((i + 1) * STAGE_BLOCK).min(base_len);
            match out.last_mut() {
                Some(last) if from_base && last.end == r.start => last.end = r.end,
                _ if from_base => out.push(r),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Block `index` takes its bytes from the base: `base` holds the base's bytes from the
    /// block's start (at least up to the base length or the block's end). Written here as
    /// the block's first version; nothing happens if the block is held already.
    pub fn fill_block(&self, index: u64, base: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let start = index * STAGE_BLOCK;
        if start >= st.base_len {
            return Ok(());
        }
        self.flush_pending(&mut st)?;
        let (seq, plain) = match self.load_block(&mut st, index)? {
            (_, None) => (0, vec![0u8; STAGE_BLOCK as usize]),
            (seq, Some(plain)) if seq & BASE_PREFIX != 0 => (seq, plain),
            _ => return Ok(()),
        };
        let need = (st.base_len - start).min(STAGE_BLOCK) as usize;
        if base.len() < need {
            return Err(invalid(format!("{} bytes of the base for block {index}, {need} needed", base.len())));
        }
        let mut plain = plain;
        plain[..need].copy_from_slice(&base[..need]);
        self.write_block(&mut st, index, seq_no(seq) + 1, &plain)
    }

    /// From here on, bytes from `base_len` on that are not held here read as zeros, not as
    /// the base's (a base that turned out shorter, or gone).
    pub fn cut_base(&self, base_len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if base_len < st.base_len {
            st.base_len = base_len;
            let len = st.len;
            self.write_len(&mut st, len)?;
        }
        Ok(())
    }

    /// Every block within the base length is held here: the file no longer needs its base.
    /// Returns whether it is so now.
    pub fn settle_base(&self) -> io::Result<bool> {
        let mut st = self.lock();
        if st.base_len == 0 {
            return Ok(true);
        }
        for i in 0..st.base_len.div_ceil(STAGE_BLOCK) {
            if !self.held(&mut st, i)? || self.load_block(&mut st, i)?.0 & BASE_PREFIX != 0 {
                return Ok(false);
            }
        }
        self.flush_pending(&mut st)?;
        st.base_len = 0;
        let len = st.len;
        self.write_len(&mut st, len)?;
        Ok(true)
    }

    /// Writes all of `data` at `offset`, extending the file if it ends past the end.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        let end = offset + data.len() as u64;
        for (index, inside, at) in pieces(offset, end) {
            let (from, to) = (inside.start, inside.end);
            let whole = from == 0 && to == STAGE_BLOCK as usize;
            let src = &data[at];
            if let Some(p) = st.pending.as_mut().filter(|p| p.index == index) {
                p.plain[inside].copy_from_slice(src);
                continue;
            }
            self.flush_pending(&mut st)?;
            if whole {
                // A whole block over a known slot needs nothing of the old content.
                let seq = match st.seqs.get(&index) {
                    Some(&seq) => seq,
                    None => self.load_block(&mut st, index)?.0,
                };
                let mut slot = vec![0u8; SLOT];
                slot[SLOT_HEAD..SLOT_HEAD + STAGE_BLOCK as usize].copy_from_slice(src);
                self.seal_slot(&mut st, index, seq_no(seq) + 1, slot)?;
            } else {
                // A piece of a block: gathered in memory until another block is written.
                let (mut seq, old) = self.load_block(&mut st, index)?;
                let start = index * STAGE_BLOCK;
                let below_base = start + (from as u64) < st.base_len;
                match &old {
                    // Past the base's end in the block it ends in: its bytes stay the base's.
                    None if start < st.base_len && !below_base && self.version >= 2 => seq = BASE_PREFIX,
                    None if start < st.base_len => return Err(needs_base(index)),
                    Some(_) if seq & BASE_PREFIX != 0 && below_base => return Err(needs_base(index)),
                    _ => {}
                }
                let mut plain = old.unwrap_or_else(|| vec![0u8; STAGE_BLOCK as usize]);
                plain[from..to].copy_from_slice(src);
                st.pending = Some(Pending { index, seq, plain });
            }
        }
        if end > st.len {
            st.len = end;
            st.len_dirty = true;
        }
        Ok(())
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.flush(&mut st)?;
        if len > st.len {
            // The tail of the last block is zeros already, and blocks past it are holes.
            return self.write_len(&mut st, len);
        }
        if len == st.len {
            return Ok(());
        }
        let tail = (len % STAGE_BLOCK) as usize;
        if tail != 0 {
            let index = len / STAGE_BLOCK;
            if let (seq, Some(mut plain)) = self.load_block(&mut st, index)? {
                plain[tail..].fill(0);
                self.write_block(&mut st, index, next_seq(seq), &plain)?;
            }
        }
        self.write_len(&mut st, len)?;
        let blocks = len.div_ceil(STAGE_BLOCK);
        st.seqs.retain(|&i, _| i < blocks);
        self.file.set_len(physical_len(len))
    }

    /// Makes every write so far durable.
    pub fn sync_data(&self) -> io::Result<()> {
        self.flush(&mut self.lock())?;
        self.file.sync_data()
    }

    /// Copies the file into a new staging file at `dst`: all of the plaintext, or, for a
    /// file that takes bytes from its base, the blocks held here (the copy has the same base
    /// length). Each block is read whole; callers check for concurrent writes.
    pub fn copy_to(&self, dst: &Path) -> io::Result<Copied> {
        let (len, base_len) = {
            let mut st = self.lock();
            self.flush_pending(&mut st)?;
            (st.len, st.base_len)
        };
        let out = SealedFile::create_sparse(dst, Arc::clone(&self.sealer), len)?;
        let mut hasher = blake3::Hasher::new();
        if base_len == 0 {
            out.lock().base_len = 0;
            let mut buf = vec![0u8; 16 * STAGE_BLOCK as usize];
            let mut offset = 0u64;
            loop {
                let n = self.read_at(&mut buf, offset)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all_at(&buf[..n], offset)?;
                offset += n as u64;
            }
            out.flush(&mut out.lock())?;
            let hash = hasher.finalize().to_hex().to_string();
            return Ok(Copied { file: out, len: offset, base_len: 0, hash });
        }
        hasher.update(b"autosync-sparse-1");
        hasher.update(&len.to_le_bytes());
        hasher.update(&base_len.to_le_bytes());
        let mut st = self.lock();
        let held = self.held_blocks(&mut st)?;
        let mut ost = out.lock();
        ost.base_len = base_len;
        for index in held {
            let (seq, Some(plain)) = self.load_block(&mut st, index)? else { continue };
            let flag = seq & BASE_PREFIX;
            hasher.update(&(index | flag).to_le_bytes());
            hasher.update(&plain);
            out.write_block(&mut ost, index, 1 | flag, &plain)?;
        }
        out.write_len(&mut ost, len)?;
        drop(ost);
        Ok(Copied { file: out, len, base_len, hash: hasher.finalize().to_hex().to_string() })
    }

    /// The whole plaintext.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.len() as usize];
        let n = self.read_at(&mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    }
}

impl Drop for SealedFile {
    /// What is only in memory goes to disk (not synced): a file closed without `fsync`
    /// keeps its writes, as on a local disk.
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.flush(&mut st) {
            tracing::warn!("a staging file could not write its last block: {e}");
        }
    }
}

/// `offset..end` cut at block boundaries: each piece's block index, its range within the
/// block, and its range within a buffer that starts at `offset`.
fn pieces(offset: u64, end: u64) -> impl Iterator<Item = (u64, Range<usize>, Range<usize>)> {
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / STAGE_BLOCK;
        let start = index * STAGE_BLOCK;
        let from = (pos - start) as usize;
        let to = ((end - start) as usize).min(STAGE_BLOCK as usize);
        let at = (pos - offset) as usize;
        pos = start + to as u64;
        Some((index, from..to, at..at + (to - from)))
    })
}

/// `read_at` until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
#[path = "staged_tests.rs"]
mod tests;
