//! autosync: a cloud bucket as a local drive (FUSE over object_store), with a write journal
//! that never loses an edit.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cache;
pub mod cli;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod layout;
pub mod mount;
pub mod source;
pub mod state;
pub mod store;
pub mod xattrs;
