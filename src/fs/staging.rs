//! Local staging of file contents: one file per inode under the cache dir, written in place
//! by the mount and snapshotted for uploads. It knows files and bytes, not the bucket.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    tmp: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
}

impl Staging {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        let dir = root.join("staging");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&dir)?;
        // Snapshots from a previous run are never needed again: the journal re-snapshots.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        Ok(Self { dir, tmp, open: Mutex::new(HashMap::new()) })
    }

    fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<File>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The staging file of `ino`, opened read-write.
    pub fn file(&self, ino: u64) -> std::io::Result<Arc<File>> {
        if let Some(f) = self.lock().get(&ino) {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(OpenOptions::new().read(true).write(true).open(self.path(ino))?);
        self.lock().insert(ino, Arc::clone(&f));
        Ok(f)
    }

    pub fn create_empty(&self, ino: u64) -> std::io::Result<Arc<File>> {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(self.path(ino))?;
        let f = Arc::new(f);
        self.lock().insert(ino, Arc::clone(&f));
        Ok(f)
    }

    /// A temp file to fill; `install` moves it into place as the staging file of `ino`.
    pub fn temp(&self, name: &str) -> std::io::Result<(PathBuf, File)> {
        let p = self.tmp.join(name);
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p)?;
        Ok((p, f))
    }

    pub fn install(&self, ino: u64, tmp: &Path) -> std::io::Result<()> {
        std::fs::rename(tmp, self.path(ino))?;
        self.lock().remove(&ino);
        Ok(())
    }

    pub fn exists(&self, ino: u64) -> bool {
        self.path(ino).exists()
    }

    pub fn remove(&self, ino: u64) {
        self.lock().remove(&ino);
        let _ = std::fs::remove_file(self.path(ino));
    }

    /// Copies the staging file to a snapshot for upload, hashing it on the way.
    pub fn snapshot(&self, ino: u64, name: &str) -> std::io::Result<(PathBuf, u64, String)> {
        self.snapshot_job(ino, name)()
    }

    /// The same copy as a job that can run on a blocking thread.
    pub fn snapshot_job(
        &self,
        ino: u64,
        name: &str,
    ) -> impl FnOnce() -> std::io::Result<(PathBuf, u64, String)> + Send + 'static {
        let src = self.path(ino);
        let dst = self.tmp.join(name);
        move || {
            let mut src = File::open(src)?;
            let mut out = OpenOptions::new().write(true).create(true).truncate(true).open(&dst)?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                total += n as u64;
            }
            Ok((dst, total, hasher.finalize().to_hex().to_string()))
        }
    }

    /// Makes file creations and renames in the staging folder durable.
    pub fn sync_dir(&self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Bytes held in staging, for `status`.
    pub fn bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0)
    }
}
