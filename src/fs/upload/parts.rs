//! Multipart uploads: a content cut into parts, sent several at once within a memory budget
//! shared by every upload. For a file staged over its base, on a store that copies byte
//! ranges server-side (S3's UploadPartCopy), the parts follow a plan in which the ranges
//! still the base's are copied by the bucket and only the rest is sent: an append to a big
//! file sends the appended bytes. Elsewhere the base's bytes are read from the bucket (or
//! the block cache) into the parts as they go, without a whole copy on local disk.

use std::ops::Range;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{Attributes, ObjectStoreExt, PutMultipartOptions};

use super::Uploader;
use super::put::{Content, PutError, local};
use crate::fs::error::{FsError, FsResult};
use crate::fs::object::{obj_path, same_version, stale};
use crate::fs::types::Remote;
use crate::store::s3parts::{MAX_COPY_PART, S3Parts};

/// The smallest multipart part we send (S3 wants 5 MiB for every part but the last).
pub const MIN_PART: u64 = 8 << 20;
/// Bytes of uploads in memory at once, across every upload under way (parts, and single
/// puts): half of `--memory-limit` (reads hold the other half), and room for one part at
/// least.
pub fn part_budget(cfg: &crate::fs::FsConfig) -> u64 {
    (cfg.blocks.memory_limit / 2).max(MIN_PART)
}
/// S3's smallest part but the last.
const S3_MIN_PART: u64 = 5 << 20;
/// S3's largest part.
const MAX_PART: u64 = 5 << 30;
/// S3's most parts in one upload.
const MAX_PARTS: usize = 10_000;
/// Parts copied by the store at once, for one upload.
const COPIES_AT_ONCE: usize = 16;

/// The part size for a file of `size` bytes: [`MIN_PART`], or larger (in whole MiB) for
/// files so big that 8 MiB parts would pass S3's limit of 10,000 parts. A part larger than
/// the budget takes all of it.
pub fn part_size(size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    size.div_ceil(9_000).div_ceil(MIB).saturating_mul(MIB).clamp(MIN_PART, MAX_PART)
}

/// One part of an upload: bytes sent from here, or a range of the base copied by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    Send(Range<u64>),
    Copy(Range<u64>),
}

/// The parts of a content of `size` bytes whose `base` ranges (in order, merged) are its
/// base's. A run of the base is copied when it is long enough to be a part of its own (or
/// ends the content), in pieces of about `part` bytes (at least `part`, below twice it, at
/// most 5 GiB), copied several at once as the AWS CLI does: one copy of a long run is the
/// store copying it alone, at one disk's or one stream's pace. Everything else is sent, in parts of
/// `part` bytes, cut short where a long run of the base begins, but never below S3's
/// smallest part unless it is the last.
pub(crate) fn plan(size: u64, base: &[Range<u64>], part: u64) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut pos = 0;
    while pos < size {
        let run_end = base.iter().find(|r| r.start <= pos && pos < r.end).map(|r| r.end.min(size));
        if let Some(run_end) = run_end.filter(|&e| e - pos >= S3_MIN_PART || e == size) {
            let len = run_end - pos;
            let pieces = (len / part).max(len.div_ceil(MAX_COPY_PART)).max(1);
            let each = len.div_ceil(pieces);
            while pos < run_end {
                let end = (pos + each).min(run_end);
                parts.push(Part::Copy(pos..end));
                pos = end;
            }
            continue;
        }
        let mut end = (pos + part).min(size);
        let long_run = base
            .iter()
            .find(|r| r.start > pos && r.start < end && (r.end - r.start >= part || r.end >= size))
            .map(|r| r.start);
        if let Some(start) = long_run {
            end = start.max((pos + S3_MIN_PART).min(size));
        }
        parts.push(Part::Send(pos..end));
        pos = end;
    }
    parts
}

impl Uploader {
    /// A multipart upload of `content` at `path`, with `attributes`: copying what is still
    /// the base's where the store can, else sending everything.
    pub(super) async fn put_multipart(
        &self,
        path: &Path,
        attributes: Attributes,
        content: &Content,
    ) -> Result<object_store::PutResult, PutError> {
        if let (Some(base), Some(copier)) = (content.base(), self.core.part_copier())
            && let Content::File { file, .. } = content
        {
            let f = Arc::clone(file);
            let ranges = tokio::task::spawn_blocking(move || f.base_ranges()).await.map_err(local)??;
            let parts = plan(content.size(), &ranges, part_size(content.size()));
            if parts.len() <= MAX_PARTS && parts.iter().any(|p| matches!(p, Part::Copy(_))) {
                return self.put_planned(copier, path, attributes, content, base, parts).await;
            }
        }
        let opts = PutMultipartOptions { attributes, ..Default::default() };
        self.put_parts(path, opts, content).await
    }

    /// Takes room for `len` bytes of an upload in the shared budget (all of it, for more).
    pub(super) async fn part_room(&self, len: u64) -> FsResult<tokio::sync::OwnedSemaphorePermit> {
        let all = part_budget(&self.core.cfg) >> 20;
        let wanted = len.div_ceil(1 << 20).min(all) as u32;
        Arc::clone(&self.part_budget).acquire_many_owned(wanted).await.map_err(super::put::local_io)
    }

    /// An upload of `parts` through the store's own multipart calls, the copies done by the
    /// store (each held to the base's ETag, and the base checked once they are done), the
    /// rest sent as several at once as the part budget allows. Any part failing aborts the
    /// whole upload; a copy whose source changed is the base gone (`Stale`).
    async fn put_planned(
        &self,
        copier: Arc<S3Parts>,
        path: &Path,
        attributes: Attributes,
        content: &Content,
        base: &Remote,
        parts: Vec<Part>,
    ) -> Result<object_store::PutResult, PutError> {
        let id = copier.create(path, attributes).await?;
        let mut in_flight = tokio::task::JoinSet::new();
        let mut done: Vec<Option<object_store::multipart::PartId>> = vec![None; parts.len()];
        let result: Result<(), PutError> = async {
            for (index, part) in parts.iter().enumerate() {
                let (c, p, id) = (Arc::clone(&copier), path.clone(), id.clone());
                match part {
                    Part::Copy(r) => {
                        // Copies hold no memory; their number in flight is bounded instead.
                        while in_flight.len() >= COPIES_AT_ONCE {
                            let Some(r) = in_flight.join_next().await else { break };
                            let (i, part) = r.map_err(local)?;
                            done[i] = Some(part?);
                        }
                        let (key, etag, r) = (base.key.clone(), base.etag.clone(), r.clone());
                        self.core.counters().bytes_copied += r.end - r.start;
                        in_flight.spawn(async move {
                            let copied = c.copy_part(&p, &id, index, &key, r, etag.as_deref()).await;
                            (index, copied.map_err(|e| PutError::Other(stale(e))))
                        });
                    }
                    Part::Send(r) => {
                        let permit = self.part_room(r.end - r.start).await?;
                        let data = self.content_range(content, r.start, r.end - r.start).await?;
                        self.core.counters().bytes_sent += r.end - r.start;
                        in_flight.spawn(async move {
                            let sent = c.put_part(&p, &id, index, data.into()).await;
                            drop(permit);
                            (index, sent.map_err(PutError::from))
                        });
                    }
                }
                while let Some(r) = in_flight.try_join_next() {
                    let (i, part) = r.map_err(local)?;
                    done[i] = Some(part?);
                }
            }
            while let Some(r) = in_flight.join_next().await {
                let (i, part) = r.map_err(local)?;
                done[i] = Some(part?);
            }
            // Some stores (moto) copy whatever the source holds, whatever
            // `x-amz-copy-source-if-match` says: the source must still be the base once every
            // copy is done (versions only move on, so it was the base all along).
            match self.core.store.head(&obj_path(&base.key)?).await {
                Ok(m) if same_version(&m, base) => Ok(()),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {
                    Err(PutError::Other(FsError::Stale(base.key.clone())))
                }
                Err(e) => Err(e.into()),
            }
        }
        .await;
        let failed = match result {
            Ok(()) => match done.into_iter().collect::<Option<Vec<_>>>() {
                Some(all) => return Ok(copier.complete(path, &id, all).await?),
                None => local("a part of a multipart upload went missing"),
            },
            Err(e) => e,
        };
        drop(in_flight);
        if let Err(abort) = copier.abort(path, &id).await {
            tracing::debug!(%path, "aborting a failed multipart upload: {abort}");
        }
        Err(failed)
    }

    /// A multipart upload of `content` at `path`: parts of [`part_size`] read one after
    /// another and sent while the next are read, as many at once as the shared part
    /// budget has room for (so 16 large files going up together hold at most
    /// [`part_budget`] of parts in memory, or one part, for files whose parts are larger).
    /// Any part failing aborts the whole upload.
    async fn put_parts(
        &self,
        path: &Path,
        opts: PutMultipartOptions,
        content: &Content,
    ) -> Result<object_store::PutResult, PutError> {
        let size = content.size();
        let part = part_size(size);
        let mut upload = self.core.store.put_multipart_opts(path, opts).await?;
        // Parts run as tasks of their own, so they go on while the next part is read (and
        // while it waits for room); the set aborts them if it is dropped.
        let mut in_flight = tokio::task::JoinSet::new();
        let joined = |r: Result<object_store::Result<()>, tokio::task::JoinError>| -> Result<(), PutError> {
            r.map_err(local)?.map_err(PutError::from)
        };
        let mut offset = 0u64;
        let result: Result<(), PutError> = async {
            while offset < size {
                let len = part.min(size - offset);
                let permit = self.part_room(len).await?;
                let data = self.content_range(content, offset, len).await?;
                self.core.counters().bytes_sent += len;
                offset += len;
                let put = upload.put_part(data.into());
                in_flight.spawn(async move {
                    let r = put.await;
                    drop(permit);
                    r
                });
                // Reap what has finished, without waiting for what has not.
                while let Some(r) = in_flight.try_join_next() {
                    joined(r)?;
                }
                let cut_short = offset < size
                    && (|| {
                        fail::fail_point!("upload-multipart-middle", |_| true);
                        false
                    })();
                if cut_short {
                    // A part goes up first; the upload is never completed.
                    if let Some(r) = in_flight.join_next().await {
                        joined(r)?;
                    }
                    return Err(PutError::Other(FsError::Halted("upload-multipart-middle")));
                }
            }
            while let Some(r) = in_flight.join_next().await {
                joined(r)?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(upload.complete().await?),
            // Stopped at a failpoint, as by a crash: nothing is cleaned up.
            Err(e @ PutError::Other(FsError::Halted(_))) => Err(e),
            Err(e) => {
                drop(in_flight);
                if let Err(abort) = upload.abort().await {
                    tracing::debug!(%path, "aborting a failed multipart upload: {abort}");
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn parts_are_whole_mib_at_least_the_minimum_and_at_most_10000() {
        assert_eq!(part_size(33 << 20), MIN_PART);
        assert_eq!(part_size(70 << 30), MIN_PART);
        for size in [1u64 << 20, 300 << 20, 71 << 30, 100 << 30, 640 << 30, 5 << 40] {
            let p = part_size(size);
            assert!((MIN_PART..=MAX_PART).contains(&p) && p.is_multiple_of(1 << 20), "{size}: {p}");
            assert!(size.div_ceil(p) <= 10_000, "{size} in {} parts of {p}", size.div_ceil(p));
        }
        assert_eq!(part_size(100 << 30), 12 << 20);
        assert_eq!(part_size(1 << 50), MAX_PART);
    }

    #[test]
    fn an_append_copies_the_base_and_sends_the_new_bytes() {
        let base = 64 * MIB;
        let copies: Vec<Part> = (0..8).map(|i| Part::Copy(i * MIN_PART..(i + 1) * MIN_PART)).collect();
        let mut append = copies.clone();
        append.push(Part::Send(base..base + 10));
        assert_eq!(plan(base + 10, &[0..base], MIN_PART), append);
        // Unchanged: copies only (a rename, or an attribute change).
        assert_eq!(plan(base, &[0..base], MIN_PART), copies);
        // A run not a whole number of parts: pieces of at least a part, below two.
        assert_eq!(plan(20 * MIB, &[0..20 * MIB], MIN_PART), [Part::Copy(0..10 * MIB), Part::Copy(10 * MIB..20 * MIB)]);
        // Copies are at most 5 GiB, whatever the part size.
        let big = 12 << 30;
        let p = plan(big + 1, &[0..big], MAX_PART);
        assert_eq!(p.len(), 4);
        assert!(p[..3].iter().all(|x| matches!(x, Part::Copy(r) if r.end - r.start == 4 << 30)));
        // A base too short for a part of its own is sent.
        assert_eq!(plan(3 * MIB, &[0..2 * MIB], MIN_PART), [Part::Send(0..3 * MIB)]);
    }

    #[test]
    fn an_edit_in_the_middle_sends_at_least_the_smallest_part() {
        let size = 100 * MIB;
        let edited = 50 * MIB..50 * MIB + 64 * 1024;
        let p = plan(size, &[0..edited.start, edited.end..size], MIN_PART);
        assert_eq!(
            p.iter().filter(|p| matches!(p, Part::Send(_))).collect::<Vec<_>>(),
            [&Part::Send(50 * MIB..55 * MIB)]
        );
        assert_eq!(p.iter().filter(|p| matches!(p, Part::Copy(_))).count(), 6 + 5);
    }

    proptest! {
        /// Every plan covers the content in order, copies only the base's ranges, keeps
        /// every part but the last at S3's smallest size or more, and no part too large.
        #[test]
        fn plans_are_valid(size in 1u64..(200 * MIB), cuts in prop::collection::vec(0u64..(200 * MIB), 0..12)) {
            let mut cuts: Vec<u64> = cuts.into_iter().map(|c| c % size).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let base: Vec<Range<u64>> = cuts.chunks(2).filter(|c| c.len() == 2 && c[0] < c[1]).map(|c| c[0]..c[1]).collect();
            let parts = plan(size, &base, MIN_PART);
            let mut pos = 0;
            for (i, part) in parts.iter().enumerate() {
                let (r, copy) = match part { Part::Send(r) => (r, false), Part::Copy(r) => (r, true) };
                prop_assert_eq!(r.start, pos);
                prop_assert!(r.end > r.start);
                if i + 1 < parts.len() {
                    prop_assert!(r.end - r.start >= S3_MIN_PART, "{:?}", parts);
                }
                if copy {
                    prop_assert!(base.iter().any(|b| b.start <= r.start && r.end <= b.end), "{:?}", parts);
                    prop_assert!(r.end - r.start <= MAX_COPY_PART);
                    prop_assert!(r.end - r.start < 2 * MIN_PART, "{:?}", parts);
                } else {
                    prop_assert!(r.end - r.start <= MIN_PART);
                }
                pos = r.end;
            }
            prop_assert_eq!(pos, size);
        }
    }
}
