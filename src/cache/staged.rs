//! Sealed staging files: content not yet in the bucket, kept on local disk in 64 KiB blocks,
//! each sealed with AES-256-GCM. A block is rewritten into the other of its two slots, so a
//! write torn by a crash never destroys the version written before it. Small writes gather
//! in one block kept in memory until another block, a resize or a sync needs it sealed. It
//! knows bytes and offsets, not inodes or objects.

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
/// Bumped when the staging file layout or its AAD changes incompatibly.
pub const STAGE_VERSION: u8 = 1;
/// Plaintext bytes per sealed block.
pub const STAGE_BLOCK: u64 = 64 << 10;

const ID_LEN: usize = 16;
/// magic, version, 3 zero bytes, the file's random id.
const HEAD_LEN: usize = 8 + ID_LEN;
/// The two slots of the length record: nonce, sequence, sealed length (u64), tag.
const LEN_AT: [u64; 2] = [64, 128];
const LEN_SLOT: usize = NONCE_LEN + 8 + 8 + TAG_LEN;
/// Blocks start on the second page.
const DATA_START: u64 = 4096;
/// A block slot: nonce, sequence, sealed block, tag.
const SLOT_HEAD: usize = NONCE_LEN + 8;
const SLOT: usize = SLOT_HEAD + STAGE_BLOCK as usize + TAG_LEN;

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
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(path)?;
        let mut id = [0u8; ID_LEN];
        rand::rng().fill_bytes(&mut id);
        let mut head = [0u8; HEAD_LEN];
        head[..4].copy_from_slice(&STAGE_MAGIC);
        head[4] = STAGE_VERSION;
        head[8..].copy_from_slice(&id);
        file.write_all_at(&head, 0)?;
        let f = SealedFile { file, id, sealer, state: Mutex::new(State::default()) };
        f.write_len(&mut f.lock(), 0)?;
        Ok(f)
    }

    /// Seals the block gathered in memory, if any.
    fn flush_pending(&self, st: &mut State) -> io::Result<()> {
        if let Some(p) = st.pending.take()
            && let Err(e) = self.write_block(st, p.index, p.seq + 1, &p.plain)
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
        if head[..4] != STAGE_MAGIC || head[4] != STAGE_VERSION {
            return Err(invalid(format!("{} is not a staging file of format {STAGE_VERSION}", path.display())));
        }
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&head[8..]);
        let f = SealedFile { file, id, sealer, state: Mutex::new(State::default()) };
        let (len, len_seq) = f.read_len()?;
        {
            let mut st = f.lock();
            st.len = len;
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
                    f.write_block(&mut st, index, seq + 1, &plain)?;
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

    fn aad(&self, kind: u8, index: u64, seq: u64) -> [u8; 5 + ID_LEN + 1 + 16] {
        let mut aad = [0u8; 5 + ID_LEN + 1 + 16];
        aad[..4].copy_from_slice(&STAGE_MAGIC);
        aad[4] = STAGE_VERSION;
        aad[5..5 + ID_LEN].copy_from_slice(&self.id);
        aad[5 + ID_LEN] = kind;
        aad[6 + ID_LEN..14 + ID_LEN].copy_from_slice(&index.to_le_bytes());
        aad[14 + ID_LEN..].copy_from_slice(&seq.to_le_bytes());
        aad
    }

    fn read_len(&self) -> io::Result<(u64, u64)> {
        let mut best: Option<(u64, u64)> = None;
        let mut failed = false;
        for (slot, at) in LEN_AT.iter().enumerate() {
            let mut buf = [0u8; LEN_SLOT];
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
            if best.is_none_or(|(_, s)| seq > s) {
                best = Some((len, seq));
            }
        }
        match best {
            Some(b) => Ok(b),
            None if failed => Err(invalid("a staging file's length record failed its integrity check".into())),
            None => Err(invalid("a staging file has no length record".into())),
        }
    }

    fn write_len(&self, st: &mut State, len: u64) -> io::Result<()> {
        let seq = st.len_seq + 1;
        let mut buf = [0u8; LEN_SLOT];
        buf[NONCE_LEN..NONCE_LEN + 8].copy_from_slice(&seq.to_le_bytes());
        buf[NONCE_LEN + 8..NONCE_LEN + 16].copy_from_slice(&len.to_le_bytes());
        let (nonce, tag) = self
            .sealer
            .seal_parts(&self.aad(b'L', 0, seq), &mut buf[NONCE_LEN + 8..NONCE_LEN + 16])
            .map_err(io::Error::other)?;
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        buf[NONCE_LEN + 16..].copy_from_slice(&tag);
        self.file.write_all_at(&buf, LEN_AT[(seq % 2) as usize])?;
        st.len = len;
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
        seqs.sort_unstable_by(|a, b| b.cmp(a));
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

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut st = self.lock();
        if offset >= st.len {
            return Ok(0);
        }
        let end = (offset + buf.len() as u64).min(st.len);
        for (index, inside, at) in pieces(offset, end) {
            let out = &mut buf[at];
            if let Some(p) = st.pending.as_ref().filter(|p| p.index == index) {
                out.copy_from_slice(&p.plain[inside]);
            } else {
                match self.load_block(&mut st, index)?.1 {
                    Some(plain) => out.copy_from_slice(&plain[inside]),
                    None => out.fill(0),
                }
            }
        }
        Ok((end - offset) as usize)
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
                self.seal_slot(&mut st, index, seq + 1, slot)?;
            } else {
                // A piece of a block: gathered in memory until another block is written.
                let (seq, old) = self.load_block(&mut st, index)?;
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
                self.write_block(&mut st, index, seq + 1, &plain)?;
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

    /// Copies the plaintext into a new staging file at `dst`, returning its length and
    /// blake3 hash (hex). Each block is read whole; callers check for concurrent writes.
    pub fn copy_to(&self, dst: &Path) -> io::Result<(SealedFile, u64, String)> {
        let out = SealedFile::create(dst, Arc::clone(&self.sealer))?;
        let mut hasher = blake3::Hasher::new();
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
        Ok((out, offset, hasher.finalize().to_hex().to_string()))
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
mod tests {
    use super::*;
    use crate::cache::CacheKey;
    use proptest::prelude::*;

    fn sealer(k: u8) -> Arc<Sealer> {
        Arc::new(Sealer::new(&CacheKey::from_bytes([k; 32])))
    }

    fn read(f: &SealedFile) -> Vec<u8> {
        f.read_all().unwrap()
    }

    #[test]
    fn writes_reads_truncates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = SealedFile::create(&p, sealer(1)).unwrap();
        assert_eq!(f.len(), 0);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(b"hello", 70_000).unwrap();
        let mut want = data.clone();
        want[70_000..70_005].copy_from_slice(b"hello");
        assert_eq!(read(&f), want);
        // A write past the end leaves a hole of zeros.
        f.write_all_at(b"end", 400_000).unwrap();
        want.resize(400_000, 0);
        want.extend_from_slice(b"end");
        assert_eq!(read(&f), want);
        f.set_len(100_001).unwrap();
        want.truncate(100_001);
        assert_eq!(read(&f), want);
        // Extending after a truncate reads zeros, not the old bytes.
        f.set_len(150_000).unwrap();
        want.resize(150_000, 0);
        assert_eq!(read(&f), want);
        f.sync_data().unwrap();
        drop(f);
        let f = SealedFile::open(&p, sealer(1)).unwrap();
        assert_eq!(read(&f), want);
        // Another key opens nothing.
        let err = SealedFile::open(&p, sealer(2)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn no_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = SealedFile::create(&p, sealer(1)).unwrap();
        let secret = b"TOP-SECRET-PLAINTEXT-0123456789".repeat(100);
        f.write_all_at(&secret, 10).unwrap();
        f.write_all_at(&secret[..40], 5).unwrap();
        let raw = std::fs::read(&p).unwrap();
        assert!(!raw.windows(10).any(|w| w == &secret[..10]));
    }

    /// A crash in the middle of rewriting a block leaves the version before it readable.
    #[test]
    fn a_torn_rewrite_keeps_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = SealedFile::create(&p, sealer(1)).unwrap();
        f.write_all_at(&[1u8; 100_000], 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[2u8; 10], 500).unwrap();
        f.sync_data().unwrap();
        let seq = f.lock().seqs[&0];
        drop(f);
        // Tear the newest slot of block 0: half of it never reached the disk.
        let raw = OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&vec![0xEE; SLOT / 2], slot_at(0, seq) + (SLOT / 2) as u64).unwrap();
        let f = SealedFile::open(&p, sealer(1)).unwrap();
        assert_eq!(read(&f), vec![1u8; 100_000]);
        // And the next write goes on from there.
        f.write_all_at(&[3u8; 4], 0).unwrap();
        let mut want = vec![1u8; 100_000];
        want[..4].fill(3);
        assert_eq!(read(&f), want);
        drop(f);
        assert_eq!(read(&SealedFile::open(&p, sealer(1)).unwrap()), want);
    }

    /// A crash loses at most what was written after the last sync; what a sync made
    /// durable stays, even in the block being written when the crash came.
    #[test]
    fn a_crash_keeps_what_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = SealedFile::create(&p, sealer(1)).unwrap();
        f.write_all_at(&[1u8; 30_000], 0).unwrap();
        f.write_all_at(b"synced", 10).unwrap();
        f.sync_data().unwrap();
        // Gathered in memory (all in block 0), with the longer length: not on disk yet.
        f.write_all_at(b"lost", 20).unwrap();
        f.write_all_at(b"tail", 29_998).unwrap();
        assert_eq!(f.len(), 30_002);
        // The process dies: nothing in memory reaches the disk.
        std::mem::forget(f);
        let f = SealedFile::open(&p, sealer(1)).unwrap();
        let mut want = vec![1u8; 30_000];
        want[10..16].copy_from_slice(b"synced");
        assert_eq!(read(&f), want);
    }

    #[test]
    fn a_rotted_block_is_an_error_never_wrong_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = SealedFile::create(&p, sealer(1)).unwrap();
        f.write_all_at(&[7u8; 200_000], 0).unwrap();
        drop(f);
        let raw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut b = [0u8; 1];
        let at = slot_at(1, 1) + 1000;
        raw.read_exact_at(&mut b, at).unwrap();
        raw.write_all_at(&[b[0] ^ 1], at).unwrap();
        let f = SealedFile::open(&p, sealer(1)).unwrap();
        let mut buf = vec![0u8; 10];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 10);
        let err = f.read_at(&mut buf, STAGE_BLOCK + 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("integrity"), "{err}");
    }

    #[test]
    fn copies_hash_the_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let f = SealedFile::create(&dir.path().join("a"), sealer(1)).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        let (copy, len, hash) = f.copy_to(&dir.path().join("b")).unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(hash, blake3::hash(&data).to_hex().to_string());
        assert_eq!(read(&copy), data);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any sequence of writes and resizes reads back like a plain Vec, before and
        /// after a reopen.
        #[test]
        fn behaves_like_a_vec(ops in prop::collection::vec(
            (0u8..3, 0u64..300_000, 1usize..140_000, any::<u8>()), 1..12)) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f");
            let f = SealedFile::create(&p, sealer(3)).unwrap();
            let mut model: Vec<u8> = Vec::new();
            for (kind, at, n, byte) in ops {
                if kind < 2 {
                    let data = vec![byte; n];
                    f.write_all_at(&data, at).unwrap();
                    let end = at as usize + n;
                    if model.len() < end { model.resize(end, 0); }
                    model[at as usize..end].copy_from_slice(&data);
                } else {
                    f.set_len(at).unwrap();
                    model.resize(at as usize, 0);
                }
                prop_assert_eq!(f.len(), model.len() as u64);
            }
            prop_assert_eq!(read(&f), model.clone());
            drop(f);
            let f = SealedFile::open(&p, sealer(3)).unwrap();
            prop_assert_eq!(read(&f), model);
        }
    }
}
