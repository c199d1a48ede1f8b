//! Small translations between the bucket's answers and the core's records: keys as object
//! paths, ETag comparison, a `Remote` from a listing or a HEAD, and the error of a read
//! conditional on a version. Pure functions, no I/O.

use object_store::path::Path;
use object_store::{GetResult, ObjectMeta};

use super::error::{FsError, FsResult};
use super::types::Remote;
use crate::layout;

pub fn obj_path(key: &str) -> FsResult<Path> {
    Path::parse(key).map_err(|_| FsError::Invalid("name cannot be stored as an object key"))
}

/// What a HEAD answered: the object's metadata and attributes, without its body.
pub struct Head {
    pub meta: ObjectMeta,
    pub attributes: object_store::Attributes,
}

impl From<GetResult> for Head {
    fn from(r: GetResult) -> Self {
        Head { meta: r.meta, attributes: r.attributes }
    }
}

pub fn remote_of(m: &ObjectMeta) -> Remote {
    Remote {
        key: m.location.as_ref().to_string(),
        etag: m.e_tag.clone(),
        version: m.version.clone(),
        size: m.size,
        modified: Some(m.last_modified.timestamp()),
    }
}

/// A remote record of a folder (or folder marker) key: folders have no version.
pub fn folder_remote(key: String) -> Remote {
    Remote { key, etag: None, version: None, size: 0, modified: None }
}

pub fn etag_same(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => layout::etag_eq(a, b),
        _ => false,
    }
}

/// Whether `m` is the version `src` records.
pub fn same_version(m: &ObjectMeta, src: &Remote) -> bool {
    etag_same(m.e_tag.as_deref(), src.etag.as_deref()) && m.size == src.size
}

/// A read conditional on the version we know failed because the object changed.
pub fn stale(e: object_store::Error) -> FsError {
    match e {
        object_store::Error::Precondition { path, .. } | object_store::Error::NotModified { path, .. } => {
            FsError::Stale(path)
        }
        other => FsError::Remote(other),
    }
}
