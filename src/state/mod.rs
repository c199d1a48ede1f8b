//! The per-mount embedded database (redb): inode table, remote versions and the journal of
//! changes not yet in the bucket. It stores what it is given in one transaction per batch;
//! it does not decide what the records mean.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Bumped when the record encoding changes incompatibly.
pub const FORMAT_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    #[error("state database record: {0}")]
    Record(#[from] serde_json::Error),
    #[error("state database has format {found}, this autosync reads {FORMAT_VERSION}: use a new --state-dir")]
    Format { found: u64 },
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
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.put_inodes.is_empty()
            && self.del_inodes.is_empty()
            && self.put_ops.is_empty()
            && self.del_ops.is_empty()
            && self.meta.is_empty()
    }
    pub fn inode<T: Serialize>(&mut self, ino: u64, rec: &T) -> Result<(), StateError> {
        self.put_inodes.push((ino, serde_json::to_vec(rec)?));
        Ok(())
    }
    pub fn op<T: Serialize>(&mut self, seq: u64, op: &T) -> Result<(), StateError> {
        self.put_ops.push((seq, serde_json::to_vec(op)?));
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
}

impl StateDb {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = Database::create(path)?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            tx.open_table(INODES)?;
            tx.open_table(JOURNAL)?;
            let mut meta = tx.open_table(META)?;
            let found = meta.get("format")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(found) => return Err(StateError::Format { found }),
            }
        }
        tx.commit()?;
        Ok(Self { db })
    }

    pub fn load<I: DeserializeOwned, O: DeserializeOwned>(&self) -> Result<Loaded<I, O>, StateError> {
        let tx = self.db.begin_read()?;
        let mut inodes = Vec::new();
        for row in tx.open_table(INODES)?.iter()? {
            let (_, v) = row?;
            inodes.push(serde_json::from_slice(v.value())?);
        }
        let mut ops = Vec::new();
        for row in tx.open_table(JOURNAL)?.iter()? {
            let (k, v) = row?;
            ops.push((k.value(), serde_json::from_slice(v.value())?));
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
                inodes.insert(ino, v.as_slice())?;
            }
            let mut journal = tx.open_table(JOURNAL)?;
            for seq in &batch.del_ops {
                journal.remove(seq)?;
            }
            for (seq, v) in &batch.put_ops {
                journal.insert(seq, v.as_slice())?;
            }
            let mut meta = tx.open_table(META)?;
            for (k, v) in &batch.meta {
                meta.insert(*k, v)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_reopen_and_deletes_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let db = StateDb::open(&path).unwrap();
            let mut b = Batch::default();
            b.inode(2, &"two").unwrap();
            b.inode(3, &"three").unwrap();
            b.op(1, &"op1").unwrap();
            b.meta.push(("next_ino", 4));
            db.commit(&b, false).unwrap();
            let mut b = Batch::default();
            b.del_inodes.push(3);
            db.commit(&b, true).unwrap();
        }
        let db = StateDb::open(&path).unwrap();
        let l: Loaded<String, String> = db.load().unwrap();
        assert_eq!(l.inodes, vec!["two".to_string()]);
        assert_eq!(l.ops, vec![(1, "op1".to_string())]);
        assert!(l.meta.contains(&("next_ino".to_string(), 4)));
    }
}
