//! The filesystem's error kinds, and the one place where each becomes an errno.

use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or folder")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a folder")]
    NotDir,
    #[error("is a folder")]
    IsDir,
    #[error("folder not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("name too long")]
    NameTooLong,
    /// Not allowed for this kind of entry (a hard link to a folder).
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// An extended attribute of a namespace the mount does not keep (only `user.*`).
    #[error("not kept: {0}")]
    NotKept(&'static str),
    /// No extended attribute of that name.
    #[error("no such extended attribute")]
    NoData,
    /// The caller's buffer is smaller than the value or list asked for.
    #[error("buffer too small")]
    Range,
    /// A set would take the object's metadata over what the bucket keeps.
    #[error("too big: {0}")]
    TooBig(&'static str),
    /// The object's metadata, needed for the answer, could not be read from the bucket.
    #[error("the object's attributes could not be read from the bucket")]
    AttrsUnread,
    #[error("bad file handle")]
    BadHandle,
    #[error("the remote object changed while reading it: {0}")]
    Stale(String),
    #[error("bucket: {0}")]
    Remote(#[from] object_store::Error),
    #[error("local disk: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the mount is read-only: {0}")]
    ReadOnly(String),
    #[error("the bucket did not answer within --io-timeout ({0:?})")]
    TimedOut(std::time::Duration),
    /// A listing failed moments ago: folders known before are answered from memory.
    #[error("the bucket did not answer a listing moments ago ({0}); answering from what is known")]
    Unreachable(String),
    /// Staging is at `--staging-size`, or the cache dir's disk is down to its reserve.
    #[error("no space for staged changes: {0}")]
    NoSpace(String),
    /// A failpoint stopped the work here, as a crash would (tests only: failpoints are
    /// compiled in only by `cargo test`).
    #[error("stopped at failpoint {0}")]
    Halted(&'static str),
    /// The error of a fetch several reads waited for.
    #[error("{0}")]
    Shared(std::sync::Arc<FsError>),
}

impl FsError {
    /// The errno the kernel gets. Every unsupported operation is listed in docs/SEMANTICS.md.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Unsupported(_) => libc::ENOTSUP,
            FsError::NotKept(_) => libc::ENOTSUP,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig(_) => libc::E2BIG,
            FsError::AttrsUnread => libc::EIO,
            FsError::BadHandle => libc::EBADF,
            FsError::Stale(_) => libc::ESTALE,
            FsError::Remote(object_store::Error::NotFound { .. }) => libc::ENOENT,
            FsError::Remote(object_store::Error::PermissionDenied { .. })
            | FsError::Remote(object_store::Error::Unauthenticated { .. }) => libc::EACCES,
            FsError::Remote(_) => libc::EIO,
            FsError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::EDQUOT,
                _ => libc::EIO,
            },
            FsError::State(_) => libc::EIO,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::TimedOut(_) | FsError::Halted(_) => libc::EIO,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Unreachable(_) => libc::EIO,
            FsError::Shared(e) => e.errno(),
        }
    }

    /// The error of a shared fetch, as this caller's own when no other holds it.
    pub fn shared(e: std::sync::Arc<FsError>) -> FsError {
        std::sync::Arc::try_unwrap(e).unwrap_or_else(FsError::Shared)
    }

    /// The object read is gone or has changed (its key or version no longer holds it).
    pub fn is_gone(&self) -> bool {
        match self {
            FsError::Remote(object_store::Error::NotFound { .. }) | FsError::Stale(_) => true,
            FsError::Shared(e) => e.is_gone(),
            _ => false,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_is_deliberate() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(FsError::Unsupported("hard links").errno(), libc::ENOTSUP);
        assert_eq!(FsError::NotKept("security.*").errno(), libc::ENOTSUP);
        assert_eq!(FsError::NoData.errno(), libc::ENODATA);
        assert_eq!(FsError::Range.errno(), libc::ERANGE);
        assert_eq!(FsError::TooBig("xattrs").errno(), libc::E2BIG);
        assert_eq!(FsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)).errno(), libc::ENOSPC);
        let nf = object_store::Error::NotFound { path: "x".into(), source: "gone".into() };
        assert_eq!(FsError::Remote(nf).errno(), libc::ENOENT);
    }
}
