//! The fixture of the real-mount test files: one test's temp dir (mount point, state and
//! cache dirs, daemon log), its server with one bucket, and another client of that bucket.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use super::servers::{Backend, Other, Server};
use super::{Mount, TestDir, Tier, UPLOAD_DELAY};

/// Short re-listing delay so that re-listings happen within the tests' time.
pub const METADATA_TTL: &str = "1";

pub struct Fixture {
    pub dir: TestDir,
    pub server: Server,
    /// The other client, looking at the bucket from outside.
    pub bucket: Other,
    pub source: String,
    pub state: PathBuf,
    pub cache: PathBuf,
}

impl Fixture {
    /// A temp dir named after the tier, the test and the backend, with a server of
    /// `backend` holding the bucket `bkt`.
    pub fn new(tier: &'static Tier, name: &str, backend: Backend) -> Self {
        let dir = TestDir::new(tier, &format!("{name}-{}", backend.name()));
        let server = Server::start(backend, &dir.root, "server");
        server.create_bucket("bkt");
        Fixture {
            bucket: server.client("bkt"),
            source: server.source("bkt", ""),
            server,
            state: dir.root.join("state"),
            cache: dir.root.join("cache"),
            dir,
        }
    }

    /// Mounts the bucket at `mnt` with this fixture's state and cache dirs.
    pub fn mount(&self) -> Mount {
        self.mount_with(&self.state, &self.cache, UPLOAD_DELAY)
    }

    /// Mounts the bucket at `mnt` with the given state and cache dirs and upload delay.
    pub fn mount_with(&self, state: &Path, cache: &Path, upload_delay: &str) -> Mount {
        let creds = self.server.creds();
        self.server.mount(&self.dir, &self.source, (state, cache), (upload_delay, METADATA_TTL), creds)
    }

    /// A mount with state and cache dirs of its own (`stateN`, `cacheN`): a fresh mount of
    /// the bucket, as on another machine, for each new `n`.
    pub fn mount_as(&self, n: u32) -> Mount {
        let (state, cache) = (self.root.join(format!("state{n}")), self.root.join(format!("cache{n}")));
        self.mount_with(&state, &cache, UPLOAD_DELAY)
    }

    /// The bucket folder, for a local-folder backend.
    pub fn local_bucket(&self) -> Option<PathBuf> {
        match &self.server {
            Server::Local(root) => Some(root.join("bkt")),
            _ => None,
        }
    }
}

impl Deref for Fixture {
    type Target = TestDir;

    fn deref(&self) -> &TestDir {
        &self.dir
    }
}
