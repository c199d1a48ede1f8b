//! Object stores as composed for a mount: the backend from `source`, wrapped by the layers
//! here (attribute emulation for local folders, Azure/GCS adjustments, fault injection for
//! tests).

pub mod compat;
pub mod faulty;
pub mod local;
pub mod retry;
pub mod s3list;
pub mod s3parts;
pub mod s3raw;

use std::sync::Arc;

use object_store::ObjectStore;

/// The store every other module talks to.
pub type Store = Arc<dyn ObjectStore>;

/// What an S3 store offers beyond object_store's calls, through signed requests of our own.
#[derive(Debug)]
pub struct S3Extras {
    /// Folder listings that skip the keys object_store refuses.
    pub lister: s3list::SharedLister,
    /// Multipart uploads with parts copied server-side.
    pub parts: Arc<s3parts::S3Parts>,
}
