//! Which storage errors mean the disk itself refuses writes (full, or read-only), so that
//! `CoreError` can tell a plant "the coordinator's disk is full, retry later" and an operator
//! what to fix, instead of a generic internal error. The one place that looks inside sled's
//! and the blob store's I/O errors, and that probes whether the data directory takes writes
//! again ([`probe_usable`]).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

/// Why the data directory does not count as usable yet.
#[derive(Debug, thiserror::Error)]
pub enum NotUsable {
    #[error("{} has {free} bytes free, below the margin of {margin} bytes (storage.disk_free_margin_mib); free space under data_dir", dir.display())]
    LowSpace {
        dir: PathBuf,
        free: u64,
        margin: u64,
    },
    #[error("cannot {step} the probe file {}: {source}; make data_dir writable", path.display())]
    Probe {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Bytes of the probe file: enough to need a fresh block, small enough to fit any margin.
const PROBE_BYTES: usize = 64 * 1024;

/// Whether `dir` takes writes again: its file system has at least `margin` bytes free for
/// unprivileged users (`statvfs`), and a probe file can be written, fsynced and removed there.
/// Returns the free bytes.
pub fn probe_usable(dir: &Path, margin: u64) -> Result<u64, NotUsable> {
    let free = free_bytes(dir).map_err(|source| NotUsable::Probe {
        step: "measure free space for",
        path: dir.to_path_buf(),
        source,
    })?;
    if free < margin {
        return Err(NotUsable::LowSpace {
            dir: dir.to_path_buf(),
            free,
            margin,
        });
    }
    let path = dir.join(format!(".disk-probe-{}", std::process::id()));
    let probe = |step, source| NotUsable::Probe {
        step,
        path: path.clone(),
        source,
    };
    let written = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(&[0x5A; PROBE_BYTES])?;
            f.sync_all()
        })
        .map_err(|e| probe("write", e));
    // Removed even when writing failed half-way, so a failed probe leaves nothing behind.
    let removed = std::fs::remove_file(&path);
    written?;
    removed.map_err(|e| probe("remove", e))?;
    Ok(free)
}

/// Free bytes of the file system under `dir`, for unprivileged users.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable memory
    // of the right type; statvfs fills it when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    // The field types are u64 on Linux but narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
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

    #[test]
    fn a_writable_dir_is_usable_and_the_probe_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let free = probe_usable(dir.path(), 0).unwrap();
        assert!(free > 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        match probe_usable(dir.path(), u64::MAX) {
            Err(NotUsable::LowSpace { margin, .. }) => assert_eq!(margin, u64::MAX),
            other => panic!("a margin no disk has was accepted: {other:?}"),
        }
        match probe_usable(&dir.path().join("missing"), 0) {
            Err(NotUsable::Probe { .. }) => {}
            other => panic!("a missing data_dir was usable: {other:?}"),
        }
    }
}
