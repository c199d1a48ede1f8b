//! The per-mount embedded database (redb): inode table, remote versions and the journal of
//! changes not yet in the bucket, each record sealed with AES-256-GCM so the file reveals no
//! names. It stores what it is given in one transaction per batch; it does not decide what
//! the records mean.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use crate::cache::{CacheKey, Sealer};

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The record of every conflict, by sequence number.
const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("conflicts");
/// Records of folder entries that left memory with their folder's listing, by folder and
/// inode (`folder << 64 | inode`): not loaded at startup, read back when the folder is
/// listed again.
const EVICTED: TableDefinition<u128, &[u8]> = TableDefinition::new("evicted");

/// Bumped when the record encoding changes incompatibly. 2: sealed records.
pub const FORMAT_VERSION: u64 = 2;
/// redb's page cache.
const DB_CACHE_BYTES: usize = 16 << 20;
const RECORD_MAGIC: [u8; 4] = *b"ASDB";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const INODE_TABLE: u8 = b'I';
const JOURNAL_TABLE: u8 = b'J';
const CONFLICT_TABLE: u8 = b'C';
const EVICTED_TABLE: u8 = b'E';

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    #[error("state database record: {0}")]
    Record(#[from] serde_json::Error),
    #[error("state database has format {found}, this autosync reads {FORMAT_VERSION}: use a new --state-dir")]
    Format { found: u64 },
    #[error("state database was sealed with another key ({pending} change(s) not yet uploaded in it)")]
    OtherKey { pending: u64 },
    #[error(
        "a state database record failed its integrity check (tampered with, or rotted on disk): use a new --state-dir"
    )]
    Sealed,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self { StateError::Db(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// One atomic change to the database.
#[derive(Debug, Default)]
pub struct Batch {
    pub put_inodes: Vec<(u64, Vec<u8>)>,
    pub del_inodes: Vec<u64>,
    pub put_ops: Vec<(u64, Vec<u8>)>,
    pub del_ops: Vec<u64>,
    pub meta: Vec<(&'static str, u64)>,
    pub put_conflicts: Vec<(u64, Vec<u8>)>,
    /// Records kept aside under a folder: (folder, inode, record).
    pub put_evicted: Vec<(u64, u64, Vec<u8>)>,
    /// Folders whose records kept aside go (before `put_evicted` are added).
    pub del_evicted: Vec<u64>,
}

fn evicted_key(dir: u64, ino: u64) -> u128 {
    (u128::from(dir) << 64) | u128::from(ino)
}

fn evicted_of(dir: u64) -> std::ops::RangeInclusive<u128> {
    evicted_key(dir, 0)..=evicted_key(dir, u64::MAX)
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.put_inodes.is_empty()
            && self.del_inodes.is_empty()
            && self.put_ops.is_empty()
            && self.del_ops.is_empty()
            && self.meta.is_empty()
            && self.put_conflicts.is_empty()
            && self.put_evicted.is_empty()
            && self.del_evicted.is_empty()
    }
    /// Sets a counter: only the last value of a key is written (a listing of 50,000 new
    /// names allocates as many inode numbers, and would otherwise write each one).
    pub fn set_meta(&mut self, key: &'static str, value: u64) {
        match self.meta.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.meta.push((key, value)),
        }
    }
    /// Deletes an inode's record, and any record of it put earlier in this batch (deletes
    /// are applied before puts: a later put of it still wins).
    pub fn remove_inode(&mut self, ino: u64) {
        self.put_inodes.retain(|(i, _)| *i != ino);
        self.del_inodes.push(ino);
    }
    pub fn inode<T: Serialize>(&mut self, ino: u64, rec: &T) -> Result<(), StateError> {
        self.put_inodes.push((ino, serde_json::to_vec(rec)?));
        Ok(())
    }
    pub fn op<T: Serialize>(&mut self, seq: u64, op: &T) -> Result<(), StateError> {
        self.put_ops.push((seq, serde_json::to_vec(op)?));
        Ok(())
    }
    /// Keeps the record of inode `ino` aside under folder `dir` (see [`StateDb::evicted`]).
    pub fn evicted<T: Serialize>(&mut self, dir: u64, ino: u64, rec: &T) -> Result<(), StateError> {
        self.put_evicted.push((dir, ino, serde_json::to_vec(rec)?));
        Ok(())
    }
    pub fn conflict<T: Serialize>(&mut self, seq: u64, rec: &T) -> Result<(), StateError> {
        self.put_conflicts.push((seq, serde_json::to_vec(rec)?));
        Ok(())
    }
}

pub struct Loaded<I, O> {
    pub inodes: Vec<I>,
    pub ops: Vec<(u64, O)>,
    pub meta: Vec<(String, u64)>,
}

#[derive(Debug)]
pub struct StateDb {
    db: Database,
    sealer: Arc<Sealer>,
}

/// What the database remembers of its key: a public check value, not the key.
fn key_check(key: &CacheKey) -> u64 {
    let v = key.check_value();
    u64::from_le_bytes(v[..8].try_into().unwrap_or_default())
}

fn aad(table: u8, id: u64) -> [u8; 14] {
    let mut a = [0u8; 14];
    a[..4].copy_from_slice(&RECORD_MAGIC);
    a[4] = FORMAT_VERSION as u8;
    a[5] = table;
    a[6..].copy_from_slice(&id.to_le_bytes());
    a
}

impl StateDb {
    /// Opens (creating) the database sealed with `key`. One written with another key is
    /// left untouched and reported as [`StateError::OtherKey`].
    pub fn open(path: &Path, key: &CacheKey) -> Result<Self, StateError> {
        // redb caches up to 1 GiB of pages by default; the inode table in memory is what
        // answers requests, so the database's own cache stays small.
        let db = Database::builder().set_cache_size(DB_CACHE_BYTES).create(path)?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            tx.open_table(INODES)?;
            tx.open_table(CONFLICTS)?;
            tx.open_table(EVICTED)?;
            let journal = tx.open_table(JOURNAL)?;
            let mut meta = tx.open_table(META)?;
            let found = meta.get("format")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(found) => return Err(StateError::Format { found }),
            }
            let check = meta.get("key_check")?.map(|v| v.value());
            match check {
                None => {
                    meta.insert("key_check", key_check(key))?;
                }
                Some(c) if c == key_check(key) => {}
                Some(_) => return Err(StateError::OtherKey { pending: journal.len()? }),
            }
        }
        tx.commit()?;
        Ok(Self { db, sealer: Arc::new(Sealer::new(key)) })
    }

    fn seal(&self, table: u8, id: u64, plain: &[u8]) -> Result<Vec<u8>, StateError> {
        let mut out = vec![0u8; NONCE_LEN + plain.len() + TAG_LEN];
        out[NONCE_LEN..NONCE_LEN + plain.len()].copy_from_slice(plain);
        let (nonce, tag) = self
            .sealer
            .seal_parts(&aad(table, id), &mut out[NONCE_LEN..NONCE_LEN + plain.len()])
            .map_err(|_| StateError::Sealed)?;
        out[..NONCE_LEN].copy_from_slice(&nonce);
        out[NONCE_LEN + plain.len()..].copy_from_slice(&tag);
        Ok(out)
    }

    fn open_record<T: DeserializeOwned>(&self, table: u8, id: u64, sealed: &[u8]) -> Result<T, StateError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(StateError::Sealed);
        }
        let mut buf = sealed.to_vec();
        let (nonce, sealed) = buf.split_at_mut(NONCE_LEN);
        self.sealer.open_parts(&aad(table, id), nonce, sealed).map_err(|_| StateError::Sealed)?;
        Ok(serde_json::from_slice(&sealed[..sealed.len() - TAG_LEN])?)
    }

    pub fn load<I: DeserializeOwned, O: DeserializeOwned>(&self) -> Result<Loaded<I, O>, StateError> {
        let tx = self.db.begin_read()?;
        let mut inodes = Vec::new();
        for row in tx.open_table(INODES)?.iter()? {
            let (k, v) = row?;
            inodes.push(self.open_record(INODE_TABLE, k.value(), v.value())?);
        }
        let mut ops = Vec::new();
        for row in tx.open_table(JOURNAL)?.iter()? {
            let (k, v) = row?;
            ops.push((k.value(), self.open_record(JOURNAL_TABLE, k.value(), v.value())?));
        }
        let mut meta = Vec::new();
        for row in tx.open_table(META)?.iter()? {
            let (k, v) = row?;
            meta.push((k.value().to_string(), v.value()));
        }
        Ok(Loaded { inodes, ops, meta })
    }

    /// Applies a batch atomically. `durable` commits are on disk when this returns; the
    /// others become durable with the next durable commit (redb `Durability::None`).
    pub fn commit(&self, batch: &Batch, durable: bool) -> Result<(), StateError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(if durable { Durability::Immediate } else { Durability::None })?;
        {
            let mut inodes = tx.open_table(INODES)?;
            for ino in &batch.del_inodes {
                inodes.remove(ino)?;
            }
            for (ino, v) in &batch.put_inodes {
                inodes.insert(ino, self.seal(INODE_TABLE, *ino, v)?.as_slice())?;
            }
            let mut journal = tx.open_table(JOURNAL)?;
            for seq in &batch.del_ops {
                journal.remove(seq)?;
            }
            for (seq, v) in &batch.put_ops {
                journal.insert(seq, self.seal(JOURNAL_TABLE, *seq, v)?.as_slice())?;
            }
            let mut meta = tx.open_table(META)?;
            for (k, v) in &batch.meta {
                meta.insert(*k, v)?;
            }
            if !batch.put_evicted.is_empty() || !batch.del_evicted.is_empty() {
                let mut evicted = tx.open_table(EVICTED)?;
                for dir in &batch.del_evicted {
                    evicted.retain_in(evicted_of(*dir), |_, _| false)?;
                }
                for (dir, ino, v) in &batch.put_evicted {
                    evicted.insert(evicted_key(*dir, *ino), self.seal(EVICTED_TABLE, *ino, v)?.as_slice())?;
                }
            }
            if !batch.put_conflicts.is_empty() {
                let mut conflicts = tx.open_table(CONFLICTS)?;
                for (seq, v) in &batch.put_conflicts {
                    conflicts.insert(seq, self.seal(CONFLICT_TABLE, *seq, v)?.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The records kept aside under folder `dir` when its listing left memory.
    pub fn evicted<T: DeserializeOwned>(&self, dir: u64) -> Result<Vec<T>, StateError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in tx.open_table(EVICTED)?.range(evicted_of(dir))? {
            let (k, v) = row?;
            // The low half of the key is the inode the record was sealed for.
            out.push(self.open_record(EVICTED_TABLE, k.value() as u64, v.value())?);
        }
        Ok(out)
    }

    /// Every conflict record, oldest first.
    pub fn conflicts<T: DeserializeOwned>(&self) -> Result<Vec<(u64, T)>, StateError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in tx.open_table(CONFLICTS)?.iter()? {
            let (k, v) = row?;
            out.push((k.value(), self.open_record(CONFLICT_TABLE, k.value(), v.value())?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_reopen_and_deletes_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key = CacheKey::from_bytes([5; 32]);
        {
            let db = StateDb::open(&path, &key).unwrap();
            let mut b = Batch::default();
            b.inode(2, &"two").unwrap();
            b.inode(3, &"three").unwrap();
            b.op(1, &"op1").unwrap();
            b.meta.push(("next_ino", 4));
            db.commit(&b, false).unwrap();
            let mut b = Batch::default();
            b.remove_inode(3);
            // Put, then removed, in one batch: removed; removed, then put again: kept.
            b.inode(4, &"four").unwrap();
            b.remove_inode(4);
            b.remove_inode(5);
            b.inode(5, &"five").unwrap();
            db.commit(&b, true).unwrap();
        }
        let db = StateDb::open(&path, &key).unwrap();
        let l: Loaded<String, String> = db.load().unwrap();
        assert_eq!(l.inodes, vec!["two".to_string(), "five".to_string()]);
        assert_eq!(l.ops, vec![(1, "op1".to_string())]);
        assert!(l.meta.contains(&("next_ino".to_string(), 4)));
    }

    #[test]
    fn records_kept_aside_are_read_back_by_folder_and_dropped_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey::from_bytes([5; 32]);
        let db = StateDb::open(&dir.path().join("s.redb"), &key).unwrap();
        let mut b = Batch::default();
        for (folder, ino) in [(7, 10), (7, 11), (8, 12), (6, 13)] {
            b.evicted(folder, ino, &format!("{folder}/{ino}")).unwrap();
        }
        db.commit(&b, false).unwrap();
        assert_eq!(db.evicted::<String>(7).unwrap(), ["7/10", "7/11"]);
        assert_eq!(db.evicted::<String>(9).unwrap(), Vec::<String>::new());
        let mut b = Batch::default();
        b.del_evicted.push(7);
        db.commit(&b, false).unwrap();
        assert_eq!(db.evicted::<String>(7).unwrap(), Vec::<String>::new());
        assert_eq!(db.evicted::<String>(8).unwrap(), ["8/12"], "other folders keep theirs");
        assert_eq!(db.evicted::<String>(6).unwrap(), ["6/13"]);
    }

    #[test]
    fn records_are_sealed_and_bound_to_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key = CacheKey::from_bytes([5; 32]);
        {
            let db = StateDb::open(&path, &key).unwrap();
            let mut b = Batch::default();
            b.inode(2, &"secret-file-name.txt").unwrap();
            b.op(7, &"journal-op-for-secret-file-name.txt").unwrap();
            db.commit(&b, true).unwrap();
        }
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(11).any(|w| w == b"secret-file"), "a name is in the database file in plaintext");
        match StateDb::open(&path, &CacheKey::from_bytes([6; 32])) {
            Err(StateError::OtherKey { pending }) => assert_eq!(pending, 1),
            other => panic!("opened with another key: {other:?}"),
        }
        // Still there for the right key.
        let l: Loaded<String, String> = StateDb::open(&path, &key).unwrap().load().unwrap();
        assert_eq!(l.inodes, vec!["secret-file-name.txt".to_string()]);
    }
}
