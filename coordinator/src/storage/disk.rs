//! Which storage errors mean the disk itself refuses writes (full, or read-only), so that
//! `CoreError` can tell a plant "the coordinator's disk is full, retry later" and an operator
//! what to fix, instead of a generic internal error. The one place that looks inside sled's
//! and the blob store's I/O errors.

use std::io;

use super::StorageError;

/// A disk condition an operator must fix; the work refused for it can be retried afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskProblem {
    /// ENOSPC or EDQUOT: no space (or quota) left.
    Full,
    /// EROFS: the file system is mounted read-only.
    ReadOnly,
}

impl std::fmt::Display for DiskProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskProblem::Full => "full disk",
            DiskProblem::ReadOnly => "read-only file system",
        })
    }
}

impl DiskProblem {
    /// The problem behind an I/O error, if it is one.
    pub fn of_io(e: &io::Error) -> Option<Self> {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => return Some(DiskProblem::Full),
            Some(libc::EROFS) => return Some(DiskProblem::ReadOnly),
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Some(DiskProblem::Full),
            io::ErrorKind::ReadOnlyFilesystem => Some(DiskProblem::ReadOnly),
            _ => None,
        }
    }
}

impl StorageError {
    /// Whether this error is the disk refusing writes (see [`DiskProblem`]).
    pub fn disk_problem(&self) -> Option<DiskProblem> {
        match self {
            StorageError::Blob { source, .. } => DiskProblem::of_io(source),
            StorageError::DatabaseFailed { problem, .. } => Some(*problem),
            StorageError::Sled {
                source: sled::Error::Io(e),
                ..
            } => DiskProblem::of_io(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_read_only_are_told_apart_from_other_errors() {
        let blob = |code| StorageError::Blob {
            path: "/data/blobs/x".into(),
            source: io::Error::from_raw_os_error(code),
        };
        assert_eq!(blob(libc::ENOSPC).disk_problem(), Some(DiskProblem::Full));
        assert_eq!(blob(libc::EDQUOT).disk_problem(), Some(DiskProblem::Full));
        assert_eq!(
            blob(libc::EROFS).disk_problem(),
            Some(DiskProblem::ReadOnly)
        );
        assert_eq!(blob(libc::EACCES).disk_problem(), None);
        let sled = StorageError::Sled {
            path: "/data/db".into(),
            source: sled::Error::Io(io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        assert_eq!(sled.disk_problem(), Some(DiskProblem::Full));
        assert_eq!(StorageError::MissingBlob("x".into()).disk_problem(), None);
    }
}
