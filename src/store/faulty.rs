//! Fault injection for tests: a store wrapper that refuses every request while switched off,
//! or leaves reads and listings unanswered while stalled, so outages can be simulated without stopping a
//! server; it can also refuse writes below one prefix only, and slow writes down so that
//! uploads overlap.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

use super::Store;

/// Shared switch: tests keep a clone and flip it while the mount runs.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch {
    down: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    holding: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    /// Writes to keys starting with this are refused (one change that keeps failing).
    refuse_prefix: Arc<std::sync::Mutex<Option<String>>>,
    /// Each write waits up to this many microseconds (random) before it reaches the store.
    write_latency_us: Arc<AtomicU64>,
    /// Writes that reached the store, per key: single puts that succeeded, and multipart
    /// uploads started.
    writes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    /// Bytes that reads (`get`) returned.
    read_bytes: Arc<AtomicU64>,
}

impl FaultSwitch {
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// While stalled, reads (`get`) and folder listings wait without an answer, like a
    /// server that stopped responding; they go on once it is lifted.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
    /// While held, folder listings are answered (as the bucket is when they are asked) but
    /// their answers wait to be returned: a listing that arrives late.
    pub fn set_listings_held(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }
    async fn hold(&self) {
        self.holding.fetch_add(1, Ordering::SeqCst);
        while self.held.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.holding.fetch_sub(1, Ordering::SeqCst);
    }
    /// How many listings are answered and waiting to be returned.
    pub fn listings_held(&self) -> u64 {
        self.holding.load(Ordering::SeqCst)
    }
    async fn stall(&self) {
        while self.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    /// While set, writes (puts, copies, moves, deletes) whose key starts with `prefix` are
    /// refused, and everything else goes through.
    pub fn refuse_writes_under(&self, prefix: Option<&str>) {
        *self.refuse_prefix.lock().unwrap_or_else(|e| e.into_inner()) = prefix.map(str::to_string);
    }
    /// Each write waits a random time up to `max` first, so that uploads overlap and finish
    /// in any order.
    pub fn set_write_latency(&self, max: std::time::Duration) {
        self.write_latency_us.store(max.as_micros() as u64, Ordering::SeqCst);
    }
    async fn write(&self, location: &Path) -> Result<()> {
        self.check()?;
        let max = self.write_latency_us.load(Ordering::SeqCst);
        if max > 0 {
            tokio::time::sleep(std::time::Duration::from_micros(rand::random::<u64>() % max)).await;
        }
        let refused = self
            .refuse_prefix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|p| location.as_ref().starts_with(p.as_str()));
        if refused {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: format!("injected refusal of {location}").into(),
            });
        }
        Ok(())
    }
    /// Bytes that reads returned so far.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::SeqCst)
    }
    /// How many requests were refused (while down, or below the refused prefix).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
    /// Writes that reached the store, per key (see the field).
    pub fn writes(&self) -> std::collections::BTreeMap<String, u64> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn wrote(&self, location: &Path) {
        *self.writes.lock().unwrap_or_else(|e| e.into_inner()).entry(location.to_string()).or_default() += 1;
    }
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic { store: "faulty", source: "injected outage".into() });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: Store,
    switch: FaultSwitch,
}

impl FaultyStore {
    pub fn wrap(inner: Store, switch: FaultSwitch) -> Store {
        Arc::new(Self { inner, switch })
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.switch.write(location).await?;
        let r = self.inner.put_opts(location, payload, opts).await;
        if r.is_ok() {
            self.switch.wrote(location);
        }
        r
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.switch.write(location).await?;
        let r = self.inner.put_multipart_opts(location, opts).await;
        if r.is_ok() {
            self.switch.wrote(location);
        }
        r
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.switch.check()?;
        self.switch.stall().await;
        let head = options.head;
        let r = self.inner.get_opts(location, options).await?;
        if !head {
            self.switch.read_bytes.fetch_add(r.range.end - r.range.start, Ordering::SeqCst);
        }
        Ok(r)
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        if let Err(e) = self.switch.check() {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        let switch = self.switch.clone();
        let locations = locations
            .then(move |l| {
                let switch = switch.clone();
                async move {
                    let l = l?;
                    switch.write(&l).await?;
                    Ok(l)
                }
            })
            .boxed();
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Err(e) = self.switch.check() {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.switch.check()?;
        self.switch.stall().await;
        let answer = self.inner.list_with_delimiter(prefix).await;
        self.switch.hold().await;
        answer
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.switch.write(to).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.switch.write(from).await?;
        self.switch.write(to).await?;
        self.inner.rename_opts(from, to, options).await
    }
}
