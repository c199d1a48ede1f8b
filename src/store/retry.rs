//! Retries for transient failures of requests that are safe to repeat (reads, folder
//! listings, copies), with capped exponential backoff and jitter. Writes are not retried here: a
//! repeated conditional write is ambiguous, and the uploader settles that by reading back.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

use super::Store;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, first_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2) }
    }
}

#[derive(Debug)]
pub struct RetryStore {
    inner: Store,
    policy: RetryPolicy,
}

impl RetryStore {
    pub fn wrap(inner: Store, policy: RetryPolicy) -> Store {
        Arc::new(Self { inner, policy })
    }

    async fn retry<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut delay = self.policy.first_delay;
        let mut attempt = 1;
        loop {
            match f().await {
                Err(e) if attempt < self.policy.attempts && transient(&e) => {
                    tracing::debug!(attempt, "retrying after a transient store error: {e}");
                    let jitter = Duration::from_millis(rand::random::<u64>() % 50);
                    tokio::time::sleep(delay + jitter).await;
                    delay = (delay * 2).min(self.policy.max_delay);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Errors that say something about the object or the request are final; the rest
/// (timeouts, connection resets, 5xx surfaced as Generic) may pass.
pub fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotImplemented { .. }
            | E::NotSupported { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

impl fmt::Display for RetryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Retry({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.retry(|| self.inner.get_opts(location, options.clone())).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.retry(|| self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.retry(|| self.inner.copy_opts(from, to, options.clone())).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faulty::{FaultSwitch, FaultyStore};
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn gives_up_after_the_policy_and_passes_final_errors_through() {
        let sw = FaultSwitch::default();
        let store = RetryStore::wrap(
            FaultyStore::wrap(Arc::new(InMemory::new()), sw.clone()),
            RetryPolicy { attempts: 3, first_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2) },
        );
        sw.set_down(true);
        assert!(store.head(&Path::from("x")).await.is_err());
        assert_eq!(sw.refused(), 3, "three attempts on a transient error");
        sw.set_down(false);
        let e = store.head(&Path::from("x")).await.unwrap_err();
        assert!(matches!(e, object_store::Error::NotFound { .. }));
        assert_eq!(sw.refused(), 3, "NotFound is final: no retry");
    }
}
