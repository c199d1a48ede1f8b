//! Object stores as composed for a mount: the backend from `source`, wrapped by the layers
//! here (attribute emulation for local folders, Azure/GCS adjustments, fault injection for
//! tests).

pub mod compat;
pub mod faulty;
pub mod local;
pub mod retry;
pub mod s3list;

use std::sync::Arc;

use object_store::ObjectStore;

/// The store every other module talks to.
pub type Store = Arc<dyn ObjectStore>;
