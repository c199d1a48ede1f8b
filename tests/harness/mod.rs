//! The `Fs` core driven without FUSE through a small path-based client, shared by the
//! filesystem test binaries (`memfs`, `failpoints`).
#![allow(dead_code)]

pub mod spy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use autosync::fs::{Caps, Fs, FsConfig, FsError, Ino, Kind, ROOT_INO, SetAttr};
use autosync::store::Store;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::watch;

pub struct Harness {
    pub store: Store,
    pub dir: tempfile::TempDir,
    pub caps: Caps,
    pub fs: Option<Arc<Fs>>,
    /// Every inode looked up, once per lookup: what the kernel would hold.
    pub held: std::sync::Mutex<Vec<Ino>>,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
    pub cfg: FsConfig,
}

pub fn cfg() -> FsConfig {
    cfg_with_delay(Duration::ZERO)
}

/// `upload_delay` zero uploads concurrently with the test's next steps; a long one uploads
/// only when the test flushes, which makes every interleaving deterministic.
pub fn cfg_with_delay(upload_delay: Duration) -> FsConfig {
    FsConfig {
        metadata_ttl: Duration::ZERO,
        upload_delay,
        open_upload_delay: upload_delay,
        host: "testhost".into(),
        ..FsConfig::default()
    }
}

impl Harness {
    pub async fn new(store: Store, caps: Caps) -> Self {
        Self::with_config(store, caps, cfg()).await
    }

    pub async fn with_config(store: Store, caps: Caps, cfg: FsConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (fs, stop, task) = Self::start(&store, &dir, caps, &cfg);
        Harness { store, dir, caps, fs: Some(fs), held: Default::default(), stop, task, cfg }
    }

    pub async fn memory() -> Self {
        Self::new(Arc::new(InMemory::new()), Caps { create: true, update: true }).await
    }

    fn start(
        store: &Store,
        dir: &tempfile::TempDir,
        caps: Caps,
        cfg: &FsConfig,
    ) -> (Arc<Fs>, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
        let fs = Fs::open_state(Arc::clone(store), "", &state, &cache, cfg.clone(), caps).expect("open fs");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&fs).run_uploader(rx));
        (fs, stop, task)
    }

    /// Stops the mount without flushing (like a crash after every close returned) and
    /// opens it again from its state dir.
    pub async fn restart(&mut self) {
        let _ = self.stop.send(true);
        (&mut self.task).await.expect("uploader task");
        // The old instance must be gone before its database can be opened again.
        self.fs = None;
        self.held.lock().unwrap().clear();
        let (fs, stop, task) = Self::start(&self.store, &self.dir, self.caps, &self.cfg);
        self.fs = Some(fs);
        self.stop = stop;
        self.task = task;
    }

    pub fn fs(&self) -> &Arc<Fs> {
        self.fs.as_ref().expect("mounted")
    }

    pub async fn flush(&self) {
        let left = self.fs().flush_all(Duration::from_secs(20)).await;
        assert_eq!(left, 0, "flush left changes pending: {:?}", self.fs().status());
    }

    pub async fn resolve(&self, path: &str) -> Result<Ino, FsError> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.fs().lookup(ino, part).await?.ino;
            self.held.lock().unwrap().push(ino);
        }
        Ok(ino)
    }

    pub async fn parent_of<'a>(&self, path: &'a str) -> Result<(Ino, &'a str), FsError> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        Ok((self.resolve(dir).await?, name))
    }

    pub async fn write(&self, path: &str, data: &[u8]) -> Result<(), FsError> {
        let (parent, name) = self.parent_of(path).await?;
        let (fh, existing) = match self.fs().lookup(parent, name).await {
            Ok(a) => (self.fs().open(a.ino).await?.0, Some(a.ino)),
            Err(FsError::NotFound) => (self.fs().create(parent, name, 0o644, 0, 0).await?.1, None),
            Err(e) => return Err(e),
        };
        // Closed whatever happened, as the kernel closes a program's file.
        let written = async {
            if let Some(ino) = existing {
                self.fs().setattr(ino, SetAttr { size: Some(0), ..Default::default() }).await?;
            }
            if !data.is_empty() {
                assert_eq!(self.fs().write(fh, 0, data).await?, data.len() as u32);
            }
            self.fs().flush(fh).await
        }
        .await;
        self.fs().release(fh).await?;
        written
    }

    /// Writes `data` over the start of an existing file, in place (no truncate), then
    /// closes it: like a program that rewrites a record and calls `fsync`.
    pub async fn overwrite(&self, path: &str, data: &[u8]) -> Result<(), FsError> {
        let ino = self.resolve(path).await?;
        let (fh, _) = self.fs().open(ino).await?;
        let written = async {
            self.fs().write(fh, 0, data).await?;
            self.fs().flush(fh).await
        }
        .await;
        self.fs().release(fh).await?;
        written
    }

    /// Waits until the uploader has stopped by itself (at a failpoint), as a crashed
    /// process would have.
    pub async fn halted(&mut self) {
        tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .expect("the uploader stops at the failpoint")
            .expect("uploader task");
        self.task = tokio::spawn(async {});
    }

    /// Asks for a flush and waits until the uploader stops at a failpoint on the way.
    pub async fn flush_until_halted(&mut self) {
        let fs = Arc::clone(self.fs());
        let flush = tokio::spawn(async move { fs.flush_all(Duration::from_secs(60)).await });
        self.halted().await;
        flush.abort();
        // Gone (with its hold on the mount) before the mount can be opened again.
        let _ = flush.await;
    }

    /// Reads a whole file, and closes it whatever happened, as the kernel does when a
    /// program's read fails (a handle left open would hold the file open for ever).
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, FsError> {
        let ino = self.resolve(path).await?;
        let (fh, _) = self.fs().open(ino).await?;
        let mut out = Vec::new();
        let read = async {
            loop {
                let b = self.fs().read(fh, out.len() as u64, 128 * 1024).await?;
                if b.is_empty() {
                    return Ok(());
                }
                out.extend_from_slice(&b);
            }
        }
        .await;
        self.fs().release(fh).await?;
        read.map(|()| out)
    }

    pub async fn mkdir(&self, path: &str) -> Result<(), FsError> {
        let (parent, name) = self.parent_of(path).await?;
        self.fs().mkdir(parent, name, 0o755, 0, 0).await.map(|_| ())
    }

    pub async fn unlink(&self, path: &str) -> Result<(), FsError> {
        let (parent, name) = self.parent_of(path).await?;
        self.fs().unlink(parent, name).await
    }

    pub async fn rmdir(&self, path: &str) -> Result<(), FsError> {
        let (parent, name) = self.parent_of(path).await?;
        self.fs().rmdir(parent, name).await
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<(), FsError> {
        let (p1, n1) = self.parent_of(from).await?;
        let (p2, n2) = self.parent_of(to).await?;
        self.fs().rename(p1, n1, p2, n2, false).await
    }

    /// Every file (with content) and folder (None) the mount shows.
    pub async fn tree(&self) -> BTreeMap<String, Option<Vec<u8>>> {
        self.try_tree().await.expect("read the whole tree")
    }

    pub async fn try_tree(&self) -> Result<BTreeMap<String, Option<Vec<u8>>>, FsError> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((ino, prefix)) = stack.pop() {
            let fh = self.fs().opendir(ino).await?;
            let entries = self.fs().readdir(fh, 0)?;
            self.fs().releasedir(fh);
            for e in entries.iter().filter(|e| e.name != "." && e.name != "..") {
                let path = if prefix.is_empty() { e.name.clone() } else { format!("{prefix}/{}", e.name) };
                match e.kind {
                    Kind::Dir => {
                        out.insert(path.clone(), None);
                        // As the kernel does: an entry of a plain readdir is used only
                        // after a lookup (which the kernel then holds).
                        let child = self.fs().lookup(ino, &e.name).await?.ino;
                        self.held.lock().unwrap().push(child);
                        stack.push((child, path));
                    }
                    _ => {
                        let data = self.read(&path).await?;
                        out.insert(path, Some(data));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Files in the bucket (markers left out).
    pub async fn bucket(&self) -> BTreeMap<String, Vec<u8>> {
        let metas: Vec<_> = self.store.list(None).try_collect().await.expect("list");
        let mut out = BTreeMap::new();
        for m in metas {
            let key = m.location.as_ref().to_string();
            if key.ends_with(".autosync-folder") {
                continue;
            }
            let data = self.store.get(&m.location).await.expect("get").bytes().await.expect("bytes");
            out.insert(key, data.to_vec());
        }
        out
    }

    pub async fn remote_put(&self, key: &str, data: &[u8]) {
        self.store.put(&Path::from(key), PutPayload::from(Bytes::copy_from_slice(data))).await.expect("remote put");
    }
}

pub fn files(tree: &BTreeMap<String, Option<Vec<u8>>>) -> BTreeMap<String, Vec<u8>> {
    tree.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect()
}
