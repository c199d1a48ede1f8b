//! A bucket wrapper for tests that watch or refuse requests: every call goes through to
//! the inner store, after the test's [`Hooks`] saw it.
#![allow(dead_code)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use autosync::store::Store;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// What a test does with the requests it sees.
pub trait Hooks: Send + Sync + fmt::Debug + 'static {
    /// Before a GET (or a HEAD, `head`): an error to answer instead, if any.
    fn get(&self, _location: &Path, _head: bool) -> Option<object_store::Error> {
        None
    }

    /// Before a GET or HEAD that goes through: how long it takes to answer.
    fn get_delay(&self, _location: &Path, _head: bool) -> Duration {
        Duration::ZERO
    }

    /// Before a folder listing: how long it takes to answer.
    fn list(&self, _prefix: Option<&Path>) -> Duration {
        Duration::ZERO
    }
}

#[derive(Debug)]
pub struct Spy<H> {
    pub inner: Store,
    pub hooks: Arc<H>,
}

impl<H: Hooks> Spy<H> {
    pub fn store(inner: Store, hooks: Arc<H>) -> Store {
        Arc::new(Spy { inner, hooks })
    }
}

impl<H> fmt::Display for Spy<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Spy({})", self.inner)
    }
}

#[async_trait]
impl<H: Hooks> ObjectStore for Spy<H> {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if let Some(e) = self.hooks.get(location, options.head) {
            return Err(e);
        }
        let delay = self.hooks.get_delay(location, options.head);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let delay = self.hooks.list(prefix);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
