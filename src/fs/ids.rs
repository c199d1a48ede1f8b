//! The numbers that are easy to mix up, each a type of its own: inode numbers, journal
//! sequence numbers, file handles and block indexes. They become bare `u64`s only at the
//! edges: the FUSE adapter, the state database's keys, the block cache's file names. Their
//! serialized form is the bare number, so records written before these types read the same.

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// An inode number: how the kernel and the tree name a file or folder.
    Ino
);
id!(
    /// A journal sequence number: the order changes were made in, and their record's key.
    Seq
);
id!(
    /// A file or folder handle, as `open`, `create` and `opendir` hand it to the kernel.
    Fh
);
id!(
    /// The index of a block of an object (its offset divided by the block size).
    BlockIndex
);

impl Ino {
    /// The root folder.
    pub const ROOT: Ino = Ino(1);
    /// The parent of an inode that is in no folder: deleted while still open.
    pub const NONE: Ino = Ino(0);
}

impl BlockIndex {
    /// The blocks `range` spans, in order.
    pub fn each(range: std::ops::Range<BlockIndex>) -> impl Iterator<Item = BlockIndex> + Clone {
        (range.start.0..range.end.0).map(BlockIndex)
    }

    pub fn next(self) -> BlockIndex {
        BlockIndex(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_serialize_as_bare_numbers() {
        // Journal records written before these types existed (`{"Sync":{"ino":7}}`) read the same.
        assert_eq!(serde_json::to_string(&Ino(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<Seq>("42").unwrap(), Seq(42));
        assert_eq!(Ino::ROOT.to_string(), "1");
        let blocks: Vec<_> = BlockIndex::each(BlockIndex(2)..BlockIndex(5)).collect();
        assert_eq!(blocks, [BlockIndex(2), BlockIndex(3), BlockIndex(4)]);
    }
}
