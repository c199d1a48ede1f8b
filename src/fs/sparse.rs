//! Files staged over their base. The first write to a big file already in the bucket stages
//! only the blocks it touches; every other byte stays the base's: the bucket's version the
//! edit started from, which the inode's `remote` names (or, after an upload from here, a
//! version with the same bytes there). This part brings base bytes where they are needed:
//! into a read of such a file, into a block a write changes only in part, into an upload's
//! parts, and into all of a file that must outlive its base (open, then deleted).
//!
//! It reads the base only through the block reader (memory, disk cache, ranged GETs
//! conditional on the base's ETag), and never decides what is staged or uploaded.

use std::ops::Range;
use std::sync::Arc;

use super::blocks::BlockReader;
use super::error::{FsError, FsResult};
use super::types::{BlockIndex, Remote};
use crate::cache::{STAGE_BLOCK, SealedFile};

/// Whether a file of `size` bytes whose bucket version is `remote` is staged over it at its
/// first write, instead of downloaded whole: big files (above `threshold`, the size whose
/// upload is multipart anyway), with a version that ranged reads can be held to.
pub(crate) fn stages_over_base(remote: &Remote, size: u64, threshold: u64) -> bool {
    remote.size == size && size > threshold && (remote.etag.is_some() || remote.version.is_some())
}

fn blocking_failed(e: tokio::task::JoinError) -> FsError {
    FsError::Io(std::io::Error::other(e))
}

/// Fills `ranges` (file offsets, within `buf`'s span) of `buf`, which holds the file's bytes
/// from `offset`, with the bytes of `base`.
pub(crate) async fn fill_ranges(
    blocks: &Arc<BlockReader>,
    base: &Remote,
    buf: &mut [u8],
    offset: u64,
    ranges: &[Range<u64>],
) -> FsResult<()> {
    let bs = blocks.cfg.block_size;
    for r in ranges {
        if r.end > base.size {
            return Err(FsError::Stale(format!("{}: the base is shorter than the staged file says", base.key)));
        }
        for index in BlockIndex::each(blocks.span(r.clone())) {
            let b = blocks.block(base, index).await?;
            let start = index.0 * bs;
            let (from, to) = (r.start.max(start), r.end.min(start + b.len() as u64));
            if from >= to {
                return Err(FsError::Stale(format!("{}: a block of the base is shorter than its size", base.key)));
            }
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&b[(from - start) as usize..(to - start) as usize]);
        }
    }
    Ok(())
}

/// `indexes` (staging blocks, in order) in groups: each group lies in the block of the base
/// that holds its first (a staging block may run into the next one).
fn by_base_block<'a>(blocks: &BlockReader, mut rest: &'a [u64]) -> impl Iterator<Item = (BlockIndex, &'a [u64])> {
    let bs = blocks.cfg.block_size;
    std::iter::from_fn(move || {
        let &first = rest.first()?;
        let block = BlockIndex(first * STAGE_BLOCK / bs);
        let end = (block.0 + 1) * bs;
        let n = rest.iter().take_while(|&&i| i * STAGE_BLOCK < end).count().max(1);
        let (these, after) = rest.split_at(n);
        rest = after;
        Some((block, these))
    })
}

/// Writes into staging blocks `these` of `file` the base's bytes `data`, which start at
/// offset `start` of the file.
async fn put_base(
    file: &Arc<SealedFile>,
    these: &[u64],
    start: u64,
    data: impl AsRef<[u8]> + Send + 'static,
) -> FsResult<()> {
    let (f, these) = (Arc::clone(file), these.to_vec());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let data = data.as_ref();
        for i in these {
            let at = (i * STAGE_BLOCK - start) as usize;
            f.fill_block(i, &data[at.min(data.len())..])?;
        }
        Ok(())
    })
    .await
    .map_err(blocking_failed)??;
    Ok(())
}

/// Brings the base's bytes of staging blocks `indexes` (in order) into `file`, reading each
/// block of the base once. Blocks held meanwhile are left as they are.
pub(crate) async fn fill_blocks(
    blocks: &Arc<BlockReader>,
    file: &Arc<SealedFile>,
    base: &Remote,
    indexes: &[u64],
) -> FsResult<()> {
    let base_len = file.base_len();
    let groups: Vec<_> = by_base_block(blocks, indexes).collect();
    for (_, these) in groups {
        let start = these[0] * STAGE_BLOCK;
        let end = ((these[these.len() - 1] + 1) * STAGE_BLOCK).min(base_len);
        if start >= end {
            continue;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        fill_ranges(blocks, base, &mut buf, start, std::slice::from_ref(&(start..end))).await?;
        put_base(file, these, start, buf).await?;
    }
    Ok(())
}

/// Brings every byte `file` still takes from `base` into it: it then holds all of its
/// content, and no longer needs the base.
pub(crate) async fn fill_all(blocks: &Arc<BlockReader>, file: &Arc<SealedFile>, base: &Remote) -> FsResult<()> {
    loop {
        let f = Arc::clone(file);
        let missing = tokio::task::spawn_blocking(move || f.base_blocks()).await.map_err(blocking_failed)??;
        fill_blocks(blocks, file, base, &missing).await?;
        let f = Arc::clone(file);
        // A block may have been cut and grown again meanwhile: look once more.
        if tokio::task::spawn_blocking(move || f.settle_base()).await.map_err(blocking_failed)?? {
            return Ok(());
        }
    }
}

/// Brings into `file` the base's bytes of its blocks that the cache holds (memory or disk),
/// without asking the bucket. Returns how many of its blocks still take bytes from `base`.
pub(crate) async fn fill_cached(blocks: &Arc<BlockReader>, file: &Arc<SealedFile>, base: &Remote) -> FsResult<usize> {
    let f = Arc::clone(file);
    let missing = tokio::task::spawn_blocking(move || f.base_blocks()).await.map_err(blocking_failed)??;
    let bs = blocks.cfg.block_size;
    let mut left = 0;
    for (index, these) in by_base_block(blocks, &missing).collect::<Vec<_>>() {
        let (start, end) = (index.0 * bs, (index.0 + 1) * bs);
        // Staging blocks that cross into the next block of the base are left to the bucket.
        let whole = these.iter().all(|m| (m + 1) * STAGE_BLOCK <= end || (m + 1) * STAGE_BLOCK >= base.size);
        match blocks.cached(base, index).await.filter(|_| whole) {
            Some(b) => put_base(file, these, start, b).await?,
            None => left += these.len(),
        }
    }
    Ok(left)
}
