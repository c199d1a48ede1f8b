//! Extended attributes: get, list, set and remove of `user.*` names, kept in the inode as
//! the object's `xattr` metadata (`crate::xattrs`, s3fs's layout) and uploaded with the
//! object like a chmod. Other namespaces (`security.*`, `system.posix_acl_*`, `trusted.*`)
//! are not kept: refused at once with `ENOTSUP`, without a lock or the bucket, since they
//! are asked for often. `ls -l` asks for `security.selinux` and the ACL of every file, but
//! stops asking for a device after one `ENOTSUP` (coreutils caches it; `ENODATA` would be
//! asked again for each file). The kernel asks for `security.capability` before each
//! write, to drop it (FUSE_HANDLE_KILLPRIV_V2 would stop that, but moves the clearing of
//! set-uid bits on truncate and open into the daemon, which fuser 0.18 does not tell).

use super::Fs;
use super::core::Locked;
use super::error::{FsError, FsResult};
use super::types::Ino;
use crate::xattrs::{self, XattrMap};

/// The only namespace kept.
const USER: &[u8] = b"user.";

/// The answer to a get or a list: the size asked for (a `size` of 0), or the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

impl XattrReply {
    /// What a caller with a buffer of `size` bytes gets (0: only the size).
    fn sized(data: Vec<u8>, size: u32) -> FsResult<XattrReply> {
        let len = u32::try_from(data.len()).map_err(|_| FsError::Range)?;
        match size {
            0 => Ok(XattrReply::Size(len)),
            s if s < len => Err(FsError::Range),
            _ => Ok(XattrReply::Data(data)),
        }
    }
}

/// A name of the kept namespace, as text; other namespaces are not supported.
fn user_name(name: &[u8]) -> FsResult<&str> {
    if !name.starts_with(USER) {
        return Err(FsError::NotKept("only user.* extended attributes are kept"));
    }
    std::str::from_utf8(name).map_err(|_| FsError::Invalid("extended attribute names must be UTF-8"))
}

/// A name to look up: one that cannot be stored is not there (`ENODATA`).
fn stored_name(name: &[u8]) -> FsResult<&str> {
    match user_name(name) {
        Err(FsError::Invalid(_)) => Err(FsError::NoData),
        other => other,
    }
}

impl Fs {
    /// Reads the object's metadata if only a listing knows the inode. An answer missing
    /// then (the bucket failed the HEAD) is an error: attributes taken as none would be
    /// shown, or written over the object's, as if they were.
    async fn attrs_read(&self, ino: Ino) -> FsResult<()> {
        self.core.ensure_attrs(ino).await;
        let tree = self.core.tree();
        let n = tree.get(ino)?;
        match n.attrs_known || n.remote.is_none() {
            true => Ok(()),
            false => Err(FsError::AttrsUnread),
        }
    }

    /// The attributes of `ino`.
    async fn xattrs_of(&self, ino: Ino) -> FsResult<XattrMap> {
        self.attrs_read(ino).await?;
        let tree = self.core.tree();
        Ok(tree.get(ino)?.xattr.as_deref().map(xattrs::decode).unwrap_or_default())
    }

    pub async fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> FsResult<XattrReply> {
        let name = stored_name(name)?;
        let mut map = self.xattrs_of(ino).await?;
        let value = map.remove(name).ok_or(FsError::NoData)?;
        XattrReply::sized(value, size)
    }

    pub async fn listxattr(&self, ino: Ino, size: u32) -> FsResult<XattrReply> {
        let map = self.xattrs_of(ino).await?;
        let mut names = Vec::new();
        // Names of other namespaces another tool stored (s3fs keeps ACLs there) are kept
        // in the bucket but not shown: they are not honoured here.
        for name in map.keys().filter(|n| n.as_bytes().starts_with(USER)) {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        XattrReply::sized(names, size)
    }

    /// Sets `name`; `flags` are those of `setxattr(2)`: `XATTR_CREATE` fails with `EEXIST`
    /// if the name exists, `XATTR_REPLACE` with `ENODATA` if it does not.
    pub async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        let name = user_name(name)?;
        if !xattrs::storable_name(name) {
            return Err(FsError::Invalid("extended attribute names with `\"` or `,` cannot be stored"));
        }
        // With both flags the name must be new and exist: that fails either way, as on
        // Linux filesystems.
        let (create, replace) = (flags & libc::XATTR_CREATE != 0, flags & libc::XATTR_REPLACE != 0);
        self.attrs_read(ino).await?;
        self.core.lock().change_xattrs(ino, |map| {
            let exists = map.contains_key(name);
            if create && exists {
                return Err(FsError::Exists);
            }
            if replace && !exists {
                return Err(FsError::NoData);
            }
            map.insert(name.to_string(), value.to_vec());
            Ok(())
        })
    }

    pub async fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        let name = stored_name(name)?;
        self.attrs_read(ino).await?;
        self.core.lock().change_xattrs(ino, |map| map.remove(name).map(|_| ()).ok_or(FsError::NoData))
    }
}

impl Locked<'_> {
    /// Changes an inode's attributes as `change` says, within the metadata budget, and
    /// queues the upload that carries them (a change of metadata, like a chmod).
    fn change_xattrs(&mut self, ino: Ino, change: impl FnOnce(&mut XattrMap) -> FsResult<()>) -> FsResult<()> {
        let n = self.get(ino)?;
        let mut map = n.xattr.as_deref().map(xattrs::decode).unwrap_or_default();
        change(&mut map)?;
        let encoded = xattrs::encode(&map);
        if !xattrs::fits(encoded.as_deref()) {
            return Err(FsError::TooBig("extended attributes over the object metadata budget"));
        }
        self.get_mut(ino)?.xattr = encoded;
        self.attributes_changed(ino, false).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_names_are_kept() {
        assert_eq!(user_name(b"user.x").unwrap(), "user.x");
        assert_eq!(user_name(b"security.selinux").unwrap_err().errno(), libc::ENOTSUP);
        assert_eq!(user_name(b"system.posix_acl_access").unwrap_err().errno(), libc::ENOTSUP);
        assert_eq!(user_name(b"user.\xff").unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn a_small_buffer_gets_erange_and_a_zero_one_the_size() {
        assert_eq!(XattrReply::sized(b"abc".to_vec(), 0).unwrap(), XattrReply::Size(3));
        assert_eq!(XattrReply::sized(b"abc".to_vec(), 2).unwrap_err().errno(), libc::ERANGE);
        assert_eq!(XattrReply::sized(b"abc".to_vec(), 3).unwrap(), XattrReply::Data(b"abc".to_vec()));
        assert_eq!(XattrReply::sized(Vec::new(), 0).unwrap(), XattrReply::Size(0));
    }
}
