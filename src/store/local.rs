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
    Attribute, AttributeValue, Attributes, CopyMode, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    RenameOptions, Result, UploadPart,
};

use crate::layout::{PosixAttrs, RESERVED_PREFIX, metadata_map};

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
    apply_at(&inner.path_to_filesystem(location)?, attributes)
}

fn apply_at(path: &std::path::Path, attributes: &Attributes) -> Result<()> {
    let map: BTreeMap<String, String> = metadata_map(attributes).into_iter().collect();
    if map.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(&map).map_err(generic)?;
    // Filesystems without user xattrs still get mode and mtime below.
    let _ = xattr::set(path, XATTR, &json);
    let (attrs, _) = PosixAttrs::from_attributes(attributes);
    if let Some(mode) = attrs.mode {
        // Keep the owner able to read and replace the backing file whatever the mode says.
        let perm = (mode & 0o7777) | 0o600;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(perm)).map_err(generic)?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        // Only root may give files away; the xattr still carries the owner.
        let _ = std::os::unix::fs::chown(path, attrs.uid, attrs.gid);
    }
    if let Some(t) = attrs.mtime_ns {
        let at = crate::fs::from_ns;
        let times = std::fs::FileTimes::new().set_modified(at(t)).set_accessed(at(attrs.atime_ns.unwrap_or(t)));
        let f = std::fs::File::options().write(true).open(path).map_err(generic)?;
        f.set_times(times).map_err(generic)?;
    }
    Ok(())
}

/// Writes `payload` to a staging file next to `dest` (`NAME#N`, which `LocalFileSystem`
/// leaves out of listings), applies the metadata to it, then publishes it: a rename for
/// `Overwrite`, a hard link for `Create`. So an object never becomes visible without its
/// metadata, whatever kills the process in between: a crashed upload read back by the next
/// mount still carries its `autosync-hash` and is recognised as ours.
fn put_staged(dest: &std::path::Path, payload: &PutPayload, create: bool, attributes: &Attributes) -> Result<()> {
    use std::io::Write;
    let (mut file, staged) = {
        let mut n = 1u32;
        loop {
            let p = staging_path(dest, n);
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => break (f, p),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && n == 1 => {
                    let parent = dest.parent().ok_or_else(|| generic(e))?;
                    std::fs::create_dir_all(parent).map_err(generic)?;
                    n += 1;
                }
                Err(e) => return Err(generic(e)),
            }
        }
    };
    let mut publish = || -> Result<()> {
        payload.iter().try_for_each(|chunk| file.write_all(chunk)).map_err(generic)?;
        apply_at(&staged, attributes)?;
        if !create {
            return std::fs::rename(&staged, dest).map_err(generic);
        }
        match std::fs::hard_link(&staged, dest) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(object_store::Error::AlreadyExists { path: dest.display().to_string(), source: Box::new(e) })
            }
            Err(e) => Err(generic(e)),
        }
    };
    let res = publish();
    if res.is_err() || create {
        let _ = std::fs::remove_file(&staged);
    }
    res
}

/// Where a new version of `dest` is written before it is published: `NAME#N` beside it,
/// which `LocalFileSystem` leaves out of listings. A name too long for that suffix (a
/// 255-byte name is legal) is staged under a short reserved name in the same folder, so
/// the rename that publishes it stays within one filesystem.
fn staging_path(dest: &std::path::Path, n: u32) -> std::path::PathBuf {
    let name = dest.file_name().map_or(0, |f| f.len());
    if name + 1 + n.to_string().len() <= crate::layout::NAME_MAX {
        let mut p = dest.as_os_str().to_owned();
        p.push(format!("#{n}"));
        return p.into();
    }
    dest.with_file_name(format!("{}long-{}#{n}", RESERVED_PREFIX, short_id(dest)))
}

/// The object path a multipart upload of a long name is assembled at (`LocalFileSystem`
/// stages it at `PATH#N`, which would not fit), renamed onto the name at completion.
fn long_upload_path(location: &Path) -> Option<Path> {
    let name = location.filename()?;
    if name.len() + 4 <= crate::layout::NAME_MAX {
        return None;
    }
    let short = format!("{}upload-{:016x}", RESERVED_PREFIX, rand::random::<u64>());
    let parent: Vec<_> = location.parts().collect();
    Some(Path::from_iter(parent[..parent.len() - 1].iter().cloned().chain([short.as_str().into()])))
}

fn short_id(p: &std::path::Path) -> String {
    blake3::hash(p.as_os_str().as_encoded_bytes()).to_hex()[..16].to_string()
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
        let mtime = md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec());
        map.entry("mtime".into()).or_insert_with(|| crate::layout::format_time(mtime));
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
        let create = match opts.mode {
            PutMode::Overwrite => false,
            PutMode::Create => true,
            // `LocalFileSystem` answers NotImplemented, which the probe relies on.
            PutMode::Update(_) => return self.inner.put_opts(location, payload, opts).await,
        };
        let dest = self.inner.path_to_filesystem(location)?;
        tokio::task::spawn_blocking(move || put_staged(&dest, &payload, create, &attributes))
            .await
            .map_err(generic)??;
        // The mtime set before publishing is part of the local ETag: report the one it has.
        let meta = self.inner.head(location).await?;
        Ok(PutResult { e_tag: meta.e_tag, version: meta.version, extensions: Default::default() })
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        mut opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let attributes = std::mem::take(&mut opts.attributes);
        let assembled_at = long_upload_path(location);
        let upload = self.inner.put_multipart_opts(assembled_at.as_ref().unwrap_or(location), opts).await?;
        Ok(Box::new(LocalUpload {
            upload,
            inner: Arc::clone(&self.inner),
            location: location.clone(),
            assembled_at,
            attributes,
        }))
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
        let long = to.filename().is_some_and(|n| n.len() + 4 > crate::layout::NAME_MAX);
        if long && matches!(options.mode, CopyMode::Overwrite) {
            // `LocalFileSystem` stages an overwriting copy at `TO#N`: too long here.
            let (src, dest) = (self.inner.path_to_filesystem(from)?, self.inner.path_to_filesystem(to)?);
            tokio::task::spawn_blocking(move || copy_long(&src, &dest)).await.map_err(generic)??;
        } else {
            self.inner.copy_opts(from, to, options).await?;
        }
        let attrs = read_back(&self.inner, from);
        apply(&self.inner, to, &attrs)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        // A rename keeps the inode, and with it the xattr, mode and mtime.
        self.inner.rename_opts(from, to, options).await
    }
}

/// An overwriting copy onto a long name: a hard link at a short staging name, renamed into
/// place (as `LocalFileSystem` does with `TO#N`).
fn copy_long(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let mut n = 1;
    loop {
        let staged = staging_path(to, n);
        match std::fs::hard_link(from, &staged) {
            Ok(()) => break std::fs::rename(&staged, to).map_err(generic),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && from.exists() && n == 1 => {
                std::fs::create_dir_all(to.parent().ok_or_else(|| generic(e))?).map_err(generic)?;
                n += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                break Err(object_store::Error::NotFound { path: from.display().to_string(), source: Box::new(e) });
            }
            Err(e) => break Err(generic(e)),
        }
    }
}

#[derive(Debug)]
struct LocalUpload {
    upload: Box<dyn MultipartUpload>,
    inner: Arc<LocalFileSystem>,
    location: Path,
    /// Where a long name's upload is assembled before it is renamed onto `location`.
    assembled_at: Option<Path>,
    attributes: Attributes,
}

#[async_trait]
impl MultipartUpload for LocalUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.upload.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.upload.complete().await?;
        if let Some(at) = &self.assembled_at {
            apply(&self.inner, at, &self.attributes)?;
            self.inner.rename(at, &self.location).await?;
            let meta = self.inner.head(&self.location).await?;
            return Ok(PutResult { e_tag: meta.e_tag, version: meta.version, extensions: Default::default() });
        }
        finish_put(&self.inner, &self.location, &self.attributes).await
    }

    async fn abort(&mut self) -> Result<()> {
        self.upload.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(hash: &str) -> Attributes {
        let mut a = Attributes::new();
        a.insert(Attribute::Metadata("autosync-hash".into()), AttributeValue::from(hash.to_string()));
        a.insert(Attribute::Metadata("mtime".into()), AttributeValue::from("1614834367".to_string()));
        a
    }

    /// A put publishes the object with its metadata already on it (a crash can no longer
    /// leave our own upload without its `autosync-hash`), leaves no staging file, and keeps
    /// `Create` exclusive and `Update` unsupported.
    #[tokio::test]
    async fn put_publishes_the_object_with_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalAttrStore::new(dir.path()).unwrap();
        let key = Path::from("a/b/file");
        let opts = |mode, a| PutOptions { mode, attributes: a, ..Default::default() };
        let r = store.put_opts(&key, PutPayload::from_static(b"one"), opts(PutMode::Create, attrs("h1"))).await;
        let etag = r.unwrap().e_tag;
        let file = dir.path().join("a/b/file");
        let meta: BTreeMap<String, String> =
            serde_json::from_slice(&xattr::get(&file, XATTR).unwrap().unwrap()).unwrap();
        assert_eq!(meta.get("autosync-hash").map(String::as_str), Some("h1"));
        assert_eq!(store.head(&key).await.unwrap().e_tag, etag, "the ETag reported is the object's");

        let again = store.put_opts(&key, PutPayload::from_static(b"two"), opts(PutMode::Create, attrs("h2"))).await;
        assert!(matches!(again, Err(object_store::Error::AlreadyExists { .. })), "{again:?}");
        let r = store.put_opts(&key, PutPayload::from_static(b"three"), opts(PutMode::Overwrite, attrs("h3"))).await;
        r.unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"three");
        let got = store.get_opts(&key, GetOptions::default()).await.unwrap();
        let (_, hash) = PosixAttrs::from_attributes(&got.attributes);
        assert_eq!(hash.as_deref(), Some("h3"));
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("a/b")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["file"], "no staging file stays behind");

        let update = PutMode::Update(object_store::UpdateVersion { e_tag: None, version: None });
        let r = store.put_opts(&key, PutPayload::from_static(b"four"), opts(update, Attributes::new())).await;
        assert!(matches!(r, Err(object_store::Error::NotImplemented { .. })), "{r:?}");
    }

    /// Extended attributes travel in the one `xattr` value (URL-encoded JSON): it comes
    /// back byte for byte through the backing file's `user.autosync.meta`, and a copy
    /// keeps it.
    #[tokio::test]
    async fn extended_attributes_round_trip_and_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalAttrStore::new(dir.path()).unwrap();
        let map: crate::xattrs::XattrMap =
            [("user.a".to_string(), vec![0u8, 1, 255, b'"']), ("user.b".to_string(), b"x".to_vec())].into();
        let attrs = PosixAttrs { mode: Some(0o100644), xattr: crate::xattrs::encode(&map), ..Default::default() };
        let opts = PutOptions { attributes: attrs.to_attributes(Some("h"), None), ..Default::default() };
        store.put_opts(&Path::from("f"), PutPayload::from_static(b"1"), opts).await.unwrap();
        store.copy(&Path::from("f"), &Path::from("g")).await.unwrap();
        for key in ["f", "g"] {
            let got = store.get_opts(&Path::from(key), GetOptions { head: true, ..Default::default() }).await.unwrap();
            let (back, _) = PosixAttrs::from_attributes(&got.attributes);
            assert_eq!(back.xattr, attrs.xattr, "{key}");
            assert_eq!(crate::xattrs::decode(back.xattr.as_deref().unwrap()), map);
        }
    }

    /// A 255-byte name (legal on Linux, too long for `NAME#N`) is written whole, in parts,
    /// and by a copy, and leaves no staging file behind.
    #[tokio::test]
    async fn names_of_255_bytes_are_written_every_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalAttrStore::new(dir.path()).unwrap();
        let long = |c: &str| Path::from(format!("d/{}", c.repeat(255)));
        let (a, b, c) = (long("a"), long("b"), long("c"));
        let opts = PutOptions { attributes: attrs("h1"), ..Default::default() };
        store.put_opts(&a, PutPayload::from_static(b"whole"), opts).await.unwrap();
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let again = store.put_opts(&a, PutPayload::from_static(b"x"), create).await;
        assert!(matches!(again, Err(object_store::Error::AlreadyExists { .. })), "{again:?}");

        let opts = PutMultipartOptions { attributes: attrs("h2"), ..Default::default() };
        let mut up = store.put_multipart_opts(&b, opts).await.unwrap();
        up.put_part(PutPayload::from_static(b"in ")).await.unwrap();
        up.put_part(PutPayload::from_static(b"parts")).await.unwrap();
        up.complete().await.unwrap();
        store.copy(&a, &c).await.unwrap();

        for (key, want, hash) in [(&a, &b"whole"[..], "h1"), (&b, b"in parts", "h2"), (&c, b"whole", "h1")] {
            let got = store.get_opts(key, GetOptions::default()).await.unwrap();
            let (_, h) = PosixAttrs::from_attributes(&got.attributes);
            assert_eq!(got.bytes().await.unwrap().as_ref(), want);
            assert_eq!(h.as_deref(), Some(hash), "metadata of {key}");
        }
        let mut names: Vec<_> =
            std::fs::read_dir(dir.path().join("d")).unwrap().flatten().map(|e| e.file_name()).collect();
        names.sort();
        let want: Vec<std::ffi::OsString> = ["a", "b", "c"].iter().map(|c| c.repeat(255).into()).collect();
        assert_eq!(names, want, "no staging file stays behind");
        let listed = store.list_with_delimiter(Some(&Path::from("d"))).await.unwrap();
        assert_eq!(listed.objects.len(), 3);
    }
}
