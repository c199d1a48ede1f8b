//! Sealing one block with AES-256-GCM in units of 64 KiB, each bound to the block's
//! identity, its length and the unit's index, and the keyed file name of that identity.
//! Pure functions over bytes: no file I/O here. The one place that calls the cipher
//! (aws-lc-rs, see the README's design notes): every sealed format goes through [`Sealer`].

use std::ops::Range;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rand::RngCore;

use super::CacheError;
use super::key::CacheKey;

/// The first bytes of every sealed block file.
pub const BLOCK_MAGIC: [u8; 4] = *b"ASCB";
/// Bumped when the block file layout, the AAD or the naming changes incompatibly. A block
/// file of another version is a miss (removed, fetched again), never opened.
pub const FORMAT_VERSION: u8 = 2;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Plaintext bytes per sealed unit; the last unit of a block may be shorter.
pub const UNIT: usize = 64 << 10;
/// magic, version.
pub const HEADER_LEN: usize = BLOCK_MAGIC.len() + 1;
/// A unit's entry in the table after the header: its nonce, then its tag.
pub const ENTRY_LEN: usize = NONCE_LEN + TAG_LEN;

/// One block of one version of one object. `version` is the ETag or store version, so a
/// changed object never matches the blocks of the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId<'a> {
    pub key: &'a str,
    pub version: &'a str,
    pub index: u64,
}

impl BlockId<'_> {
    /// The unambiguous encoding hashed into the file name and authenticated as AAD:
    /// `len(key) u64 LE, key, len(version) u64 LE, version, index u64 LE`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.key.len() as u64).to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&(self.version.len() as u64).to_le_bytes());
        out.extend_from_slice(self.version.as_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
    }
}

/// A block's file name: the keyed blake3 hash of its identity.
pub type BlockName = [u8; 32];

/// Why a sealed block did not open. All of them mean: do not use it, fetch it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than its parts, or of a length no sealed block has (torn, truncated).
    Short,
    /// Not our magic.
    Header,
    /// Our magic, another format version: written by another autosync, not damaged.
    Version,
    /// The tag failed: tampered, torn, rotted, or another block's file.
    Tag,
    /// The tag of this unit failed (a block file is opened unit by unit).
    UnitTag(usize),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Short => f.write_str("torn or truncated"),
            OpenError::Header => f.write_str("not a block file"),
            OpenError::Version => f.write_str("another format version"),
            OpenError::Tag => f.write_str("tag failed"),
            OpenError::UnitTag(i) => write!(f, "tag of unit {i} failed"),
        }
    }
}

/// Where the parts of a sealed block lie. The file is the header, a table of one entry
/// (nonce, tag) per unit, then the ciphertext of every unit, back to back, so that the
/// plaintext of consecutive units opens in place into one contiguous range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    plain: usize,
    units: usize,
}

impl Layout {
    /// The layout of a block of `plain` bytes. An empty block has one empty unit, so that
    /// it too carries a tag.
    pub const fn for_plain(plain: usize) -> Layout {
        let units = plain.div_ceil(UNIT);
        Layout { plain, units: if units == 0 { 1 } else { units } }
    }

    /// The layout of a block file of `file_len` bytes, if a sealed block has that length.
    /// The file length alone decides it, and the plaintext length is authenticated with
    /// every unit, so a truncated or extended file fails its tags.
    pub fn for_file(file_len: u64) -> Result<Layout, OpenError> {
        let rest = usize::try_from(file_len).ok().and_then(|n| n.checked_sub(HEADER_LEN)).ok_or(OpenError::Short)?;
        let units = rest.div_ceil(UNIT + ENTRY_LEN).max(1);
        let plain = rest.checked_sub(units * ENTRY_LEN).ok_or(OpenError::Short)?;
        let layout = Layout::for_plain(plain);
        if layout.units == units { Ok(layout) } else { Err(OpenError::Short) }
    }

    /// Plaintext bytes in the block.
    pub fn plain_len(&self) -> usize {
        self.plain
    }

    pub fn units(&self) -> usize {
        self.units
    }

    /// Where the ciphertext starts in the file.
    pub const fn body_start(&self) -> usize {
        HEADER_LEN + self.units * ENTRY_LEN
    }

    pub const fn file_len(&self) -> usize {
        self.body_start() + self.plain
    }

    /// Where the table entries of `units` lie in the file.
    pub fn entries_of(&self, units: Range<usize>) -> Range<usize> {
        HEADER_LEN + units.start * ENTRY_LEN..HEADER_LEN + units.end * ENTRY_LEN
    }

    /// The units that hold plaintext bytes `range` (which must lie within the block).
    pub fn units_for(&self, range: Range<usize>) -> Range<usize> {
        let first = range.start / UNIT;
        if range.is_empty() { first..first } else { first..range.end.div_ceil(UNIT) }
    }

    /// The plaintext bytes of `units` (offsets in the block; add `body_start` for the file).
    pub fn plain_of(&self, units: Range<usize>) -> Range<usize> {
        (units.start * UNIT).min(self.plain)..(units.end * UNIT).min(self.plain)
    }
}

/// The length of the block file that seals `plain` bytes.
pub const fn sealed_len(plain: usize) -> usize {
    Layout::for_plain(plain).file_len()
}

/// Checks a block file's magic and format version.
pub fn check_header(head: &[u8]) -> Result<(), OpenError> {
    match head {
        [m0, m1, m2, m3, version, ..] if [*m0, *m1, *m2, *m3] == BLOCK_MAGIC => {
            if *version == FORMAT_VERSION {
                Ok(())
            } else {
                Err(OpenError::Version)
            }
        }
        _ if head.len() < HEADER_LEN => Err(OpenError::Short),
        _ => Err(OpenError::Header),
    }
}

/// Seals and opens blocks, and names them; built from the master key's subkeys.
pub struct Sealer {
    cipher: LessSafeKey,
    name_key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(key: &CacheKey) -> Self {
        let seal_key = key.seal_key();
        let cipher = UnboundKey::new(&AES_256_GCM, &seal_key).expect("an AES-256 key is 32 bytes");
        Sealer { cipher: LessSafeKey::new(cipher), name_key: key.name_key() }
    }

    pub fn name(&self, id: &BlockId) -> BlockName {
        let mut buf = Vec::with_capacity(24 + id.key.len() + id.version.len());
        id.encode_into(&mut buf);
        *blake3::keyed_hash(&self.name_key, &buf).as_bytes()
    }

    /// The AAD of the units of block `id` of `plain` bytes, without the unit index that
    /// [`unit_aad`] appends: magic, version, the identity encoding, the plaintext length.
    fn block_aad(id: &BlockId, plain: usize) -> Vec<u8> {
        let mut aad = Vec::with_capacity(5 + 40 + id.key.len() + id.version.len());
        aad.extend_from_slice(&BLOCK_MAGIC);
        aad.push(FORMAT_VERSION);
        id.encode_into(&mut aad);
        aad.extend_from_slice(&(plain as u64).to_le_bytes());
        aad
    }

    /// The complete block file for `plain`: header, table (a fresh random nonce and the tag
    /// of each unit), ciphertext.
    pub fn seal(&self, id: &BlockId, plain: &[u8]) -> Result<Vec<u8>, CacheError> {
        let mut out = vec![0u8; sealed_len(plain.len())];
        self.seal_into(id, plain, &mut out)?;
        Ok(out)
    }

    /// [`Sealer::seal`] into `out`, which must be exactly [`sealed_len`] of `plain` bytes long
    /// (so a caller can keep one buffer, aligned as it needs, for every block).
    pub fn seal_into(&self, id: &BlockId, plain: &[u8], out: &mut [u8]) -> Result<(), CacheError> {
        let layout = Layout::for_plain(plain.len());
        if out.len() != layout.file_len() {
            return Err(CacheError::TooLarge { len: plain.len() });
        }
        let (head, rest) = out.split_at_mut(HEADER_LEN);
        let (table, body) = rest.split_at_mut(layout.units * ENTRY_LEN);
        head[..4].copy_from_slice(&BLOCK_MAGIC);
        head[4] = FORMAT_VERSION;
        body.copy_from_slice(plain);
        let mut aad = Self::block_aad(id, plain.len());
        let base = aad.len();
        let mut rng = rand::rng();
        for (i, entry) in table.chunks_exact_mut(ENTRY_LEN).enumerate() {
            let (nonce, tag_out) = entry.split_at_mut(NONCE_LEN);
            rng.fill_bytes(nonce);
            let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().expect("an entry starts with a nonce");
            unit_aad(&mut aad, base, i);
            let tag = self
                .cipher
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad[..]),
                    &mut body[layout.plain_of(i..i + 1)],
                )
                .map_err(|_| CacheError::TooLarge { len: plain.len() })?;
            tag_out.copy_from_slice(tag.as_ref());
        }
        Ok(())
    }

    /// Opens a whole block file in place and returns the plaintext's range within `file`.
    pub fn open_in_place(&self, id: &BlockId, file: &mut [u8]) -> Result<Range<usize>, OpenError> {
        check_header(file)?;
        let layout = Layout::for_file(file.len() as u64)?;
        let (head, body) = file.split_at_mut(layout.body_start());
        self.open_units(id, &layout, 0..layout.units, &head[HEADER_LEN..], body)?;
        Ok(layout.body_start()..layout.file_len())
    }

    /// Opens `units` of a block of `layout` in place: `entries` are their table entries and
    /// `body` their ciphertext, which holds their plaintext when this returns `Ok`. Each
    /// unit's AAD names the block, its length and the unit, so a unit moved to another
    /// place, block or length fails its tag.
    pub fn open_units(
        &self,
        id: &BlockId,
        layout: &Layout,
        units: Range<usize>,
        entries: &[u8],
        body: &mut [u8],
    ) -> Result<(), OpenError> {
        let span = layout.plain_of(units.clone());
        if units.end > layout.units || entries.len() != units.len() * ENTRY_LEN || body.len() != span.len() {
            return Err(OpenError::Short);
        }
        let mut aad = Self::block_aad(id, layout.plain);
        let base = aad.len();
        for (i, entry) in units.zip(entries.chunks_exact(ENTRY_LEN)) {
            let (nonce, tag) = entry.split_at(NONCE_LEN);
            let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError::Short)?;
            let r = layout.plain_of(i..i + 1);
            unit_aad(&mut aad, base, i);
            self.cipher
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad[..]),
                    tag,
                    &mut body[r.start - span.start..r.end - span.start],
                )
                .map_err(|_| OpenError::UnitTag(i))?;
        }
        Ok(())
    }
    /// Seals `buf` in place under a fresh random nonce, authenticating `aad` with it; for
    /// the other sealed formats (staging files, state records), which lay out nonce and tag
    /// themselves.
    pub(crate) fn seal_parts(
        &self,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN]), CacheError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| CacheError::TooLarge { len: buf.len() })?;
        let tag: [u8; TAG_LEN] = tag.as_ref().try_into().expect("a GCM tag is 16 bytes");
        Ok((nonce, tag))
    }

    /// Opens what [`Sealer::seal_parts`] sealed, in place: `sealed` is the ciphertext with
    /// its tag right after it, and holds the plaintext, then the tag, when it returns.
    pub(crate) fn open_parts(&self, aad: &[u8], nonce: &[u8], sealed: &mut [u8]) -> Result<(), OpenError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError::Short)?;
        if sealed.len() < TAG_LEN {
            return Err(OpenError::Short);
        }
        self.cipher
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed)
            .map(|_| ())
            .map_err(|_| OpenError::Tag)
    }

    /// A keyed hash naming something on disk (in hex) without revealing what: `domain`
    /// keeps the names of different kinds of files apart.
    pub(crate) fn hidden_name(&self, domain: &str, what: &[u8]) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.name_key);
        h.update(&(domain.len() as u64).to_le_bytes());
        h.update(domain.as_bytes());
        h.update(what);
        h.finalize().to_hex().to_string()
    }

    /// [`Sealer::open_in_place`] that hands back the plaintext.
    pub fn open(&self, id: &BlockId, mut file: Vec<u8>) -> Result<Vec<u8>, OpenError> {
        let r = self.open_in_place(id, &mut file)?;
        file.truncate(r.end);
        file.drain(..r.start);
        Ok(file)
    }
}

/// Sets the unit index at the end of a block's AAD (the part after `base` bytes).
fn unit_aad(aad: &mut Vec<u8>, base: usize, index: usize) {
    aad.truncate(base);
    aad.extend_from_slice(&(index as u64).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u64) -> BlockId<'static> {
        BlockId { key: "dir/file.bin", version: "\"etag-1\"", index }
    }

    fn plain(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    fn sealer() -> Sealer {
        Sealer::new(&CacheKey::from_bytes([1; 32]))
    }

    /// A block file rebuilt from its parts: the header, the given table entries and unit
    /// ciphertexts of `files` (each `(file index, unit index)`), in that order.
    fn splice(files: &[&[u8]], units: &[(usize, usize)]) -> Vec<u8> {
        let parts = |f: &[u8]| {
            let l = Layout::for_file(f.len() as u64).unwrap();
            (l, f.to_vec())
        };
        let mut out = files[0][..HEADER_LEN].to_vec();
        for &(f, u) in units {
            let (l, bytes) = parts(files[f]);
            out.extend_from_slice(&bytes[l.entries_of(u..u + 1)]);
        }
        for &(f, u) in units {
            let (l, bytes) = parts(files[f]);
            let r = l.plain_of(u..u + 1);
            out.extend_from_slice(&bytes[l.body_start() + r.start..l.body_start() + r.end]);
        }
        out
    }

    #[test]
    fn seal_open_round_trip_and_layout() {
        let s = sealer();
        for len in [0, 1, 11, UNIT - 1, UNIT, UNIT + 1, 3 * UNIT + 17, 1 << 20, (1 << 20) + 5] {
            let p = plain(len, 0);
            let sealed = s.seal(&id(0), &p).unwrap();
            let units = len.div_ceil(UNIT).max(1);
            assert_eq!(sealed.len(), HEADER_LEN + units * ENTRY_LEN + len, "{len}");
            assert_eq!(sealed.len(), sealed_len(len));
            assert_eq!(&sealed[..5], b"ASCB\x02");
            assert_eq!(Layout::for_file(sealed.len() as u64), Ok(Layout::for_plain(len)));
            assert!(s.open(&id(0), sealed.clone()).unwrap() == p, "{len}");
            // A fresh nonce for every unit of every seal.
            let again = s.seal(&id(0), &p).unwrap();
            let nonces = |f: &[u8]| -> Vec<Vec<u8>> {
                f[HEADER_LEN..HEADER_LEN + units * ENTRY_LEN]
                    .chunks(ENTRY_LEN)
                    .map(|e| e[..NONCE_LEN].to_vec())
                    .collect()
            };
            let mut all = nonces(&sealed);
            all.extend(nonces(&again));
            all.sort();
            all.dedup();
            assert_eq!(all.len(), 2 * units, "{len}: a nonce used twice");
        }
    }

    #[test]
    fn file_lengths_map_back_to_one_plaintext_length_or_none() {
        let mut seen = std::collections::HashSet::new();
        for plain in (0..3 * UNIT + 100).filter(|n| n % 61 == 0 || n % UNIT < 3 || n % UNIT > UNIT - 3) {
            let file = sealed_len(plain) as u64;
            assert_eq!(Layout::for_file(file).map(|l| l.plain_len()), Ok(plain));
            seen.insert(file);
        }
        // Every other length is not a block file: those of the gaps a new unit opens.
        for file in 0..(3 * (UNIT + ENTRY_LEN) + 200) as u64 {
            if let Ok(l) = Layout::for_file(file) {
                assert_eq!(l.file_len() as u64, file);
            }
        }
        for k in 1..4 {
            let full = sealed_len(k * UNIT) as u64;
            for gap in 1..=ENTRY_LEN as u64 {
                assert_eq!(Layout::for_file(full + gap), Err(OpenError::Short), "{k} units + {gap}");
            }
            assert_eq!(Layout::for_file(full + ENTRY_LEN as u64 + 1).map(|l| l.units()), Ok(k + 1));
        }
        for file in 0..(HEADER_LEN + ENTRY_LEN) as u64 {
            assert_eq!(Layout::for_file(file), Err(OpenError::Short));
        }
    }

    #[test]
    fn units_for_a_range() {
        let l = Layout::for_plain(3 * UNIT + 10);
        assert_eq!(l.units(), 4);
        assert_eq!(l.units_for(0..1), 0..1);
        assert_eq!(l.units_for(UNIT - 1..UNIT + 1), 0..2);
        assert_eq!(l.units_for(UNIT..2 * UNIT), 1..2);
        assert_eq!(l.units_for(3 * UNIT..3 * UNIT + 10), 3..4);
        assert_eq!(l.plain_of(3..4), 3 * UNIT..3 * UNIT + 10);
        assert_eq!(l.plain_of(1..3), UNIT..3 * UNIT);
    }

    #[test]
    fn identity_is_bound() {
        let s = sealer();
        let sealed = s.seal(&id(0), b"data").unwrap();
        for other in [
            id(1),
            BlockId { key: "dir/file.bin", version: "\"etag-2\"", index: 0 },
            BlockId { key: "dir/file.bim", version: "\"etag-1\"", index: 0 },
            // Same concatenation, other split: the length prefixes tell them apart.
            BlockId { key: "dir/file.bin\"", version: "etag-1\"", index: 0 },
        ] {
            assert_eq!(s.open(&other, sealed.clone()), Err(OpenError::UnitTag(0)), "{other:?}");
            assert_ne!(s.name(&other), s.name(&id(0)));
        }
        let other_key = Sealer::new(&CacheKey::from_bytes([2; 32]));
        assert_eq!(other_key.open(&id(0), sealed.clone()), Err(OpenError::UnitTag(0)));
        assert_ne!(other_key.name(&id(0)), s.name(&id(0)));
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let s = sealer();
        let sealed = s.seal(&id(0), &plain(2 * UNIT + 300, 0)).unwrap();
        assert_eq!(s.open(&id(0), Vec::new()), Err(OpenError::Short));
        assert_eq!(s.open(&id(0), sealed[..HEADER_LEN + ENTRY_LEN - 1].to_vec()), Err(OpenError::Short));
        let mut v1 = sealed.clone();
        v1[4] = 1;
        assert_eq!(s.open(&id(0), v1), Err(OpenError::Version));
        let mut magic = sealed.clone();
        magic[0] = b'X';
        assert_eq!(s.open(&id(0), magic), Err(OpenError::Header));
        // A flipped bit anywhere: every byte of the header and the table, and bytes of each
        // unit's ciphertext (its first, last, and every 997th).
        let body = Layout::for_file(sealed.len() as u64).unwrap().body_start();
        let mut at: Vec<usize> = (0..body).chain((body..sealed.len()).step_by(997)).collect();
        for u in 0..3 {
            at.extend([body + u * UNIT, (body + (u + 1) * UNIT - 1).min(sealed.len() - 1)]);
        }
        for i in at {
            let mut f = sealed.clone();
            f[i] ^= 0x40;
            assert!(s.open(&id(0), f).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn units_cannot_be_swapped_moved_or_cut_off() {
        let s = sealer();
        let a = s.seal(&id(0), &plain(4 * UNIT, 1)).unwrap();
        let b = s.seal(&id(1), &plain(4 * UNIT, 2)).unwrap();
        let same_block_again = s.seal(&id(0), &plain(4 * UNIT, 1)).unwrap();
        let whole = [(0, 0), (0, 1), (0, 2), (0, 3)];
        assert!(s.open(&id(0), splice(&[&a], &whole)).is_ok(), "splice rebuilds the file");
        // Two units swapped: a well-formed file, each unit intact, in the wrong places.
        let swapped = splice(&[&a], &[(0, 0), (0, 2), (0, 1), (0, 3)]);
        assert_eq!(s.open(&id(0), swapped), Err(OpenError::UnitTag(1)));
        // A unit of another block, at the same index.
        let moved = splice(&[&a, &b], &[(0, 0), (1, 1), (0, 2), (0, 3)]);
        assert_eq!(s.open(&id(0), moved), Err(OpenError::UnitTag(1)));
        // The last unit dropped, or the first: a shorter block, whose length is not the one
        // its units were sealed with.
        assert_eq!(s.open(&id(0), splice(&[&a], &whole[..3])), Err(OpenError::UnitTag(0)));
        assert_eq!(s.open(&id(0), splice(&[&a], &whole[1..])), Err(OpenError::UnitTag(0)));
        // A unit appended.
        let longer = splice(&[&a, &b], &[(0, 0), (0, 1), (0, 2), (0, 3), (1, 3)]);
        assert_eq!(s.open(&id(0), longer), Err(OpenError::UnitTag(0)));
        // Cut inside a unit, or at the end of one's ciphertext: no longer a block file, or
        // one of another length.
        for cut in [1, 100, UNIT - 1, UNIT, UNIT + 1] {
            assert!(s.open(&id(0), a[..a.len() - cut].to_vec()).is_err(), "cut {cut}");
        }
        // Mixing units of two seals of the same block is harmless (same identity, same
        // bytes), and opens: each unit stands for itself.
        let mixed = splice(&[&a, &same_block_again], &[(0, 0), (1, 1), (0, 2), (1, 3)]);
        assert!(s.open(&id(0), mixed).unwrap() == plain(4 * UNIT, 1));
    }

    #[test]
    fn open_units_opens_only_what_it_is_given() {
        let s = sealer();
        let p = plain(3 * UNIT + 5, 3);
        let mut sealed = s.seal(&id(0), &p).unwrap();
        let l = Layout::for_file(sealed.len() as u64).unwrap();
        // Unit 0 damaged: units 1..3 still open, unit 0 does not.
        sealed[l.body_start() + 10] ^= 1;
        let entries = sealed[l.entries_of(1..3)].to_vec();
        let r = l.plain_of(1..3);
        let mut body = sealed[l.body_start() + r.start..l.body_start() + r.end].to_vec();
        s.open_units(&id(0), &l, 1..3, &entries, &mut body).unwrap();
        assert!(body == p[r]);
        let mut first = sealed[l.body_start()..l.body_start() + UNIT].to_vec();
        let e0 = sealed[l.entries_of(0..1)].to_vec();
        assert_eq!(s.open_units(&id(0), &l, 0..1, &e0, &mut first), Err(OpenError::UnitTag(0)));
        // Parts of the wrong size are refused, not opened.
        assert_eq!(s.open_units(&id(0), &l, 1..3, &entries[1..], &mut body), Err(OpenError::Short));
        assert_eq!(s.open_units(&id(0), &l, 3..5, &entries, &mut body), Err(OpenError::Short));
    }

    /// The same AES-256-GCM as the `aes-gcm` crate, the cipher these formats were first
    /// written with: a unit it seals (with the unit's AAD) opens here, and the other way round.
    #[test]
    fn each_unit_is_plain_aes_256_gcm() {
        use aes_gcm::aead::generic_array::GenericArray;
        use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};
        let key = CacheKey::from_bytes([9; 32]);
        let s = Sealer::new(&key);
        let other = Aes256Gcm::new(GenericArray::from_slice(&key.seal_key()));
        let p = plain(UNIT + 4464, 0);
        let mut sealed = s.seal(&id(3), &p).unwrap();
        let l = Layout::for_file(sealed.len() as u64).unwrap();
        let mut aad = Sealer::block_aad(&id(3), p.len());
        let base = aad.len();
        for u in 0..l.units() {
            unit_aad(&mut aad, base, u);
            let (entry, r) = (l.entries_of(u..u + 1), l.plain_of(u..u + 1));
            let (nonce, tag) = sealed[entry.clone()].split_at(NONCE_LEN);
            let (nonce, tag) = (nonce.to_vec(), tag.to_vec());
            let mut opened = sealed[l.body_start() + r.start..l.body_start() + r.end].to_vec();
            other
                .decrypt_in_place_detached(
                    GenericArray::from_slice(&nonce),
                    &aad,
                    &mut opened,
                    GenericArray::from_slice(&tag),
                )
                .unwrap();
            assert!(opened == p[r.clone()], "unit {u}");
            // Sealed again by aes-gcm under the same nonce: the same bytes.
            let mut body = p[r.clone()].to_vec();
            let tag = other.encrypt_in_place_detached(GenericArray::from_slice(&nonce), &aad, &mut body).unwrap();
            assert!(body == sealed[l.body_start() + r.start..l.body_start() + r.end], "unit {u}");
            sealed[entry.start + NONCE_LEN..entry.end].copy_from_slice(&tag);
        }
        assert!(s.open(&id(3), sealed).unwrap() == p);
    }
}
