//! Sealing one block with AES-256-GCM, bound to its identity, and the keyed file name of
//! that identity. Pure functions over bytes: no file I/O here. The one place that calls
//! the cipher (aws-lc-rs, see the README's design notes): every sealed format goes
//! through [`Sealer`].

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rand::RngCore;

use super::CacheError;
use super::key::CacheKey;

/// The first bytes of every sealed block file.
pub const BLOCK_MAGIC: [u8; 4] = *b"ASCB";
/// Bumped when the block file layout, the AAD or the naming changes incompatibly. A cache
/// dir of another version is discarded at open.
pub const FORMAT_VERSION: u8 = 1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// magic, version, nonce.
pub const HEADER_LEN: usize = BLOCK_MAGIC.len() + 1 + NONCE_LEN;
/// What sealing adds to a block's size on disk.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

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

/// Why a sealed block did not open. All of them mean: drop it and fetch again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than a header and a tag.
    Short,
    /// Not our magic or not our format version.
    Header,
    /// The tag failed: tampered, torn, rotted, or another block's file.
    Tag,
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

    fn aad(id: &BlockId) -> Vec<u8> {
        let mut aad = Vec::with_capacity(5 + 24 + id.key.len() + id.version.len());
        aad.extend_from_slice(&BLOCK_MAGIC);
        aad.push(FORMAT_VERSION);
        id.encode_into(&mut aad);
        aad
    }

    /// The complete block file for `plain`: header, fresh random nonce, ciphertext, tag.
    pub fn seal(&self, id: &BlockId, plain: &[u8]) -> Result<Vec<u8>, CacheError> {
        let mut out = vec![0u8; OVERHEAD + plain.len()];
        self.seal_into(id, plain, &mut out)?;
        Ok(out)
    }

    /// [`Sealer::seal`] into `out`, which must be exactly `OVERHEAD + plain.len()` bytes long
    /// (so a caller can keep one buffer, aligned as it needs, for every block).
    pub fn seal_into(&self, id: &BlockId, plain: &[u8], out: &mut [u8]) -> Result<(), CacheError> {
        if out.len() != OVERHEAD + plain.len() {
            return Err(CacheError::TooLarge { len: plain.len() });
        }
        let (head, rest) = out.split_at_mut(HEADER_LEN);
        let (body, tag_out) = rest.split_at_mut(plain.len());
        head[..4].copy_from_slice(&BLOCK_MAGIC);
        head[4] = FORMAT_VERSION;
        rand::rng().fill_bytes(&mut head[5..]);
        body.copy_from_slice(plain);
        let nonce: [u8; NONCE_LEN] = head[5..].try_into().expect("the header ends with the nonce");
        let tag = self
            .cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(Self::aad(id)), body)
            .map_err(|_| CacheError::TooLarge { len: plain.len() })?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens a block file in place and returns the plaintext's range within `file`.
    pub fn open_in_place(&self, id: &BlockId, file: &mut [u8]) -> Result<std::ops::Range<usize>, OpenError> {
        if file.len() < OVERHEAD {
            return Err(OpenError::Short);
        }
        if file[..4] != BLOCK_MAGIC || file[4] != FORMAT_VERSION {
            return Err(OpenError::Header);
        }
        let end = file.len() - TAG_LEN;
        let (head, sealed) = file.split_at_mut(HEADER_LEN);
        self.open_parts(&Self::aad(id), &head[5..], sealed)?;
        Ok(HEADER_LEN..end)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u64) -> BlockId<'static> {
        BlockId { key: "dir/file.bin", version: "\"etag-1\"", index }
    }

    #[test]
    fn seal_open_round_trip_and_layout() {
        let s = Sealer::new(&CacheKey::from_bytes([1; 32]));
        let plain = b"hello block".to_vec();
        let sealed = s.seal(&id(0), &plain).unwrap();
        assert_eq!(sealed.len(), plain.len() + OVERHEAD);
        assert_eq!(&sealed[..5], b"ASCB\x01");
        assert_eq!(s.open(&id(0), sealed.clone()).unwrap(), plain);
        // A fresh nonce per seal.
        assert_ne!(s.seal(&id(0), &plain).unwrap(), sealed);
        // Empty blocks work too.
        let empty = s.seal(&id(1), b"").unwrap();
        assert_eq!(s.open(&id(1), empty).unwrap(), b"");
    }

    #[test]
    fn identity_is_bound() {
        let s = Sealer::new(&CacheKey::from_bytes([1; 32]));
        let sealed = s.seal(&id(0), b"data").unwrap();
        for other in [
            id(1),
            BlockId { key: "dir/file.bin", version: "\"etag-2\"", index: 0 },
            BlockId { key: "dir/file.bim", version: "\"etag-1\"", index: 0 },
            // Same concatenation, other split: the length prefixes tell them apart.
            BlockId { key: "dir/file.bin\"", version: "etag-1\"", index: 0 },
        ] {
            assert_eq!(s.open(&other, sealed.clone()), Err(OpenError::Tag), "{other:?}");
            assert_ne!(s.name(&other), s.name(&id(0)));
        }
        let other_key = Sealer::new(&CacheKey::from_bytes([2; 32]));
        assert_eq!(other_key.open(&id(0), sealed.clone()), Err(OpenError::Tag));
        assert_ne!(other_key.name(&id(0)), s.name(&id(0)));
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let s = Sealer::new(&CacheKey::from_bytes([1; 32]));
        let sealed = s.seal(&id(0), b"data").unwrap();
        assert_eq!(s.open(&id(0), Vec::new()), Err(OpenError::Short));
        assert_eq!(s.open(&id(0), sealed[..OVERHEAD - 1].to_vec()), Err(OpenError::Short));
        let mut v2 = sealed.clone();
        v2[4] = 2;
        assert_eq!(s.open(&id(0), v2), Err(OpenError::Header));
        for i in 0..sealed.len() {
            let mut f = sealed.clone();
            f[i] ^= 0x40;
            assert!(s.open(&id(0), f).is_err(), "flip at {i}");
        }
        assert!(s.open(&id(0), sealed[..sealed.len() - 1].to_vec()).is_err());
    }

    /// The same bytes as the `aes-gcm` crate, the cipher these formats were first written
    /// with: what it sealed opens here, and the other way round.
    #[test]
    fn same_bytes_as_the_aes_gcm_crate() {
        use aes_gcm::aead::generic_array::GenericArray;
        use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};
        let key = CacheKey::from_bytes([9; 32]);
        let s = Sealer::new(&key);
        let other = Aes256Gcm::new(GenericArray::from_slice(&key.seal_key()));
        let plain: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let sealed = s.seal(&id(3), &plain).unwrap();
        let (head, rest) = sealed.split_at(HEADER_LEN);
        let (body, tag) = rest.split_at(plain.len());
        let mut opened = body.to_vec();
        other
            .decrypt_in_place_detached(
                GenericArray::from_slice(&head[5..]),
                &Sealer::aad(&id(3)),
                &mut opened,
                GenericArray::from_slice(tag),
            )
            .unwrap();
        assert_eq!(opened, plain);
        let mut theirs = sealed[..HEADER_LEN].to_vec();
        let mut body = plain.clone();
        let tag = other
            .encrypt_in_place_detached(GenericArray::from_slice(&head[5..]), &Sealer::aad(&id(3)), &mut body)
            .unwrap();
        theirs.extend_from_slice(&body);
        theirs.extend_from_slice(&tag);
        assert_eq!(theirs, sealed, "same nonce, same bytes");
        assert_eq!(s.open(&id(3), theirs).unwrap(), plain);
    }
}
