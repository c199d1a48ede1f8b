//! Per-backend adjustments, so that the rest of autosync can treat every cloud store alike:
//!
//! - [`AzureMetaNames`]: Azure metadata names must be C# identifiers, so `autosync-hash`
//!   is stored as `autosync_hash` and read back under its usual name.
//! - [`GcsGeneration`]: a conditional update on GCS matches the object's generation, which
//!   a listing does not give; it is looked up when missing.

use std::fmt;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UpdateVersion,
};

use super::Store;
use crate::layout;

/// Renames every metadata name with `f`, leaving other attributes alone.
fn rename_metadata(a: Attributes, f: impl Fn(&str) -> String) -> Attributes {
    a.iter()
        .map(|(k, v)| match k {
            Attribute::Metadata(name) => (Attribute::Metadata(f(name).into()), v.clone()),
            other => (other.clone(), v.clone()),
        })
        .collect()
}

/// Azure refuses a metadata name that is not a C# identifier (`InvalidMetadata`): writes
/// `_` for each `-` in a name, and reads `_` back as `-`. autosync's own names hold no `_`.
#[derive(Debug)]
pub struct AzureMetaNames {
    inner: Store,
}

impl AzureMetaNames {
    pub fn wrap(inner: Store) -> Store {
        std::sync::Arc::new(Self { inner })
    }
}

fn to_azure(a: Attributes) -> Attributes {
    rename_metadata(a, |n| n.replace('-', "_"))
}

impl fmt::Display for AzureMetaNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AzureMetaNames({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for AzureMetaNames {
    async fn put_opts(&self, location: &Path, payload: PutPayload, mut opts: PutOptions) -> Result<PutResult> {
        opts.attributes = to_azure(std::mem::take(&mut opts.attributes));
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        mut opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        opts.attributes = to_azure(std::mem::take(&mut opts.attributes));
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let mut r = self.inner.get_opts(location, options).await?;
        r.attributes = rename_metadata(std::mem::take(&mut r.attributes), |n| n.replace('_', "-"));
        Ok(r)
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// object_store's GCS client makes `PutMode::Update` conditional on the generation
/// (`x-goog-if-generation-match`) and fails outright without one, but a listing gives only
/// ETags. For an update that carries an ETag and no generation, this reads the object's
/// current generation with a HEAD: if the ETag still matches, the put is made conditional on
/// that generation, so a change after the HEAD is still refused by the store; otherwise the
/// object has changed and the put fails with `Precondition`, as the store itself would. When
/// the HEAD gives no generation, the put goes ahead unconditionally (compare-then-write).
#[derive(Debug)]
pub struct GcsGeneration {
    inner: Store,
}

impl GcsGeneration {
    pub fn wrap(inner: Store) -> Store {
        std::sync::Arc::new(Self { inner })
    }
}

impl fmt::Display for GcsGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcsGeneration({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for GcsGeneration {
    async fn put_opts(&self, location: &Path, payload: PutPayload, mut opts: PutOptions) -> Result<PutResult> {
        if let PutMode::Update(UpdateVersion { e_tag: Some(etag), version: None }) = &opts.mode {
            let precondition =
                |why: String| object_store::Error::Precondition { path: location.to_string(), source: why.into() };
            let current = match self.inner.head(location).await {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(precondition(format!("the object is gone; expected ETag {etag}")));
                }
                Err(e) => return Err(e),
            };
            if !current.e_tag.as_deref().is_some_and(|t| layout::etag_eq(t, etag)) {
                let now = current.e_tag.unwrap_or_default();
                return Err(precondition(format!("ETag {now} does not match {etag}")));
            }
            opts.mode = match current.version {
                Some(generation) => {
                    PutMode::Update(UpdateVersion { e_tag: Some(etag.clone()), version: Some(generation) })
                }
                // No generation in the answer (an emulator or a proxy): the ETag matched just
                // now, so this is compare-then-write, as on stores without conditional writes.
                None => PutMode::Overwrite,
            };
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::{AttributeValue, ObjectStoreExt};

    use super::*;

    #[tokio::test]
    async fn azure_names_round_trip() {
        let bucket: Store = Arc::new(InMemory::new());
        let store = AzureMetaNames::wrap(Arc::clone(&bucket));
        let mut attrs = Attributes::new();
        attrs.insert(Attribute::Metadata("autosync-hash".into()), AttributeValue::from("abc"));
        attrs.insert(Attribute::Metadata("mode".into()), AttributeValue::from("33188"));
        let p = Path::from("f");
        store
            .put_opts(&p, PutPayload::from_static(b"x"), PutOptions { attributes: attrs, ..Default::default() })
            .await
            .unwrap();
        let raw = bucket.get(&p).await.unwrap().attributes;
        let raw = layout::metadata_map(&raw);
        assert_eq!(raw.get("autosync_hash").map(String::as_str), Some("abc"));
        assert!(!raw.contains_key("autosync-hash"));
        let back = layout::metadata_map(&store.get(&p).await.unwrap().attributes);
        assert_eq!(back.get("autosync-hash").map(String::as_str), Some("abc"));
        assert_eq!(back.get("mode").map(String::as_str), Some("33188"));
    }

    #[tokio::test]
    async fn gcs_update_without_generation_checks_the_etag() {
        let store = GcsGeneration::wrap(Arc::new(InMemory::new()));
        let p = Path::from("f");
        let first = store.put(&p, PutPayload::from_static(b"1")).await.unwrap();
        let update = |etag: &str| PutOptions {
            mode: PutMode::Update(UpdateVersion { e_tag: Some(etag.to_string()), version: None }),
            ..Default::default()
        };
        let stale = store.put_opts(&p, PutPayload::from_static(b"2"), update("\"other\"")).await.unwrap_err();
        assert!(matches!(stale, object_store::Error::Precondition { .. }), "{stale}");
        let etag = first.e_tag.unwrap();
        store.put_opts(&p, PutPayload::from_static(b"3"), update(&etag)).await.unwrap();
        let gone = store.put_opts(&Path::from("g"), PutPayload::from_static(b"4"), update(&etag)).await.unwrap_err();
        assert!(matches!(gone, object_store::Error::Precondition { .. }), "{gone}");
    }
}
