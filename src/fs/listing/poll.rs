//! The background poll: the folders in use are listed again every `--poll-interval`,
//! through the same merge as any listing, so that others' changes show (and the kernel's
//! caches of them are dropped) without waiting for a lookup past the TTL.

use std::collections::HashSet;

use futures::StreamExt;
use tokio::sync::watch;

use super::Listings;
use crate::fs::types::{Ino, Kind, ROOT_INO};

/// Most folders a background poll lists in one round.
const POLL_FOLDERS: usize = 256;

impl Listings {
    /// Lists the folders in use again, every `poll_interval`, until `stop`: changes made
    /// in the bucket by others show without waiting for a lookup past the TTL, and the
    /// kernel's caches of what changed are dropped.
    pub async fn run_poller(&self, mut stop: watch::Receiver<bool>) {
        let every = self.core.cfg.poll_interval;
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            self.poll_once().await;
        }
    }

    /// One round of the poll: the folders in use that were listed before and not within
    /// the last half interval, at most [`POLL_FOLDERS`] of them: open folders and those
    /// holding open files first, then folders the kernel holds, or holds entries of.
    pub async fn poll_once(&self) -> usize {
        let every = self.core.cfg.poll_interval;
        let dirs: Vec<Ino> = {
            let tree = self.core.tree();
            let busy = tree.nodes().filter_map(|n| {
                if n.dir_open > 0 {
                    Some(n.ino)
                } else if n.open > 0 {
                    Some(n.parent)
                } else {
                    None
                }
            });
            let held = tree.nodes().filter(|n| n.lookups > 0).flat_map(|n| {
                let own = (n.kind == Kind::Dir).then_some(n.ino);
                own.into_iter().chain(std::iter::once(n.parent))
            });
            let mut seen = HashSet::new();
            let busy: Vec<Ino> = busy.collect();
            busy.into_iter()
                .chain(std::iter::once(ROOT_INO))
                .chain(held)
                .filter(|&d| seen.insert(d))
                .filter(|&d| {
                    tree.get(d).is_ok_and(|n| n.kind == Kind::Dir && n.listed && !n.is_listed_fresh(every / 2))
                })
                .take(POLL_FOLDERS)
                .collect()
        };
        let n = dirs.len();
        futures::stream::iter(dirs)
            .for_each_concurrent(4, |d| async move {
                if let Err(e) = self.refresh(d).await {
                    tracing::debug!(dir = %d, "poll: listing failed: {e}");
                }
            })
            .await;
        n
    }
}
