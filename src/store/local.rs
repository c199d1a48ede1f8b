//! Local-folder bucket: object_store's `LocalFileSystem` refuses user metadata, so this
//! wrapper keeps POSIX attributes faithful on the backing files themselves (mode, owner and
//! mtime applied to the file, the full metadata map in a `user.` xattr) and reads them back,
//! deriving them from `stat` for files that other programs put in the folder.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};

use crate::layout::{PosixAttrs, metadata_map};

const XATTR: &str = "user.autosync.meta";

#[derive(Debug)]
pub struct LocalAttrStore {
    inner: Arc<LocalFileSystem>,
}

impl LocalAttrStore {
    pub fn new(root: &std::path::Path) -> Result<Self> {
        let inner = LocalFileSystem::new_with_prefix(root)?.with_automatic_cleanup(true);
        Ok(Self { inner: Arc::new(inner) })
    }
}

impl fmt::Display for LocalAttrStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalAttr({})", self.inner)
    }
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic { store: "local", source: Box::new(e) }
}

/// Applies the metadata to the backing file; the xattr keeps the exact values (including a
/// symlink's type bits) while mode/owner/mtime make the folder itself look right.
fn apply(inner: &LocalFileSystem, location: &Path, attributes: &Attributes) -> Result<()> {
    let path = inner.path_to_filesystem(location)?;
    let map: BTreeMap<String, String> = metadata_map(attributes).into_iter().collect();
    if map.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(&map).map_err(generic)?;
    // Filesystems without user xattrs still get mode and mtime below.
    let _ = xattr::set(&path, XATTR, &json);
    let (attrs, _) = PosixAttrs::from_attributes(attributes);
    if let Some(mode) = attrs.mode {
        // Keep the owner able to read and replace the backing file whatever the mode says.
        let perm = (mode & 0o7777) | 0o600;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(perm)).map_err(generic)?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        // Only root may give files away; the xattr still carries the owner.
        let _ = std::os::unix::fs::chown(&path, attrs.uid, attrs.gid);
    }
    if let Some(t) = attrs.mtime {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
        let f = std::fs::File::options().write(true).open(&path).map_err(generic)?;
        f.set_modified(when).map_err(generic)?;
    }
    Ok(())
}

/// Reads the attributes back: the xattr when autosync wrote the file, `stat` otherwise.
fn read_back(inner: &LocalFileSystem, location: &Path) -> Attributes {
    let mut out = Attributes::new();
    let Ok(path) = inner.path_to_filesystem(location) else { return out };
    let mut map: BTreeMap<String, String> =
        xattr::get(&path, XATTR).ok().flatten().and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default();
    if let Ok(md) = std::fs::metadata(&path) {
        map.entry("mode".into()).or_insert_with(|| md.mode().to_string());
        map.entry("uid".into()).or_insert_with(|| md.uid().to_string());
        map.entry("gid".into()).or_insert_with(|| md.gid().to_string());
        map.entry("mtime".into()).or_insert_with(|| md.mtime().to_string());
    }
    for (k, v) in map {
        out.insert(Attribute::Metadata(k.into()), AttributeValue::from(v));
    }
    out
}

async fn finish_put(inner: &LocalFileSystem, location: &Path, attributes: &Attributes) -> Result<PutResult> {
    apply(inner, location, attributes)?;
    // Setting mtime changes the local ETag, so report the one the file has now.
    let meta = inner.head(location).await?;
    Ok(PutResult { e_tag: meta.e_tag, version: meta.version, extensions: Default::default() })
}

#[async_trait]
impl ObjectStore for LocalAttrStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, mut opts: PutOptions) -> Result<PutResult> {
        let attributes = std::mem::take(&mut opts.attributes);
        self.inner.put_opts(location, payload, opts).await?;
        finish_put(&self.inner, location, &attributes).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        mut opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let attributes = std::mem::take(&mut opts.attributes);
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(LocalUpload { upload, inner: Arc::clone(&self.inner), location: location.clone(), attributes }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let mut r = self.inner.get_opts(location, options).await?;
        r.attributes = read_back(&self.inner, location);
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
        self.inner.copy_opts(from, to, options).await?;
        let attrs = read_back(&self.inner, from);
        apply(&self.inner, to, &attrs)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        // A rename keeps the inode, and with it the xattr, mode and mtime.
        self.inner.rename_opts(from, to, options).await
    }
}

#[derive(Debug)]
struct LocalUpload {
    upload: Box<dyn MultipartUpload>,
    inner: Arc<LocalFileSystem>,
    location: Path,
    attributes: Attributes,
}

#[async_trait]
impl MultipartUpload for LocalUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.upload.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.upload.complete().await?;
        finish_put(&self.inner, &self.location, &self.attributes).await
    }

    async fn abort(&mut self) -> Result<()> {
        self.upload.abort().await
    }
}
