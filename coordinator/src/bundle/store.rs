//! The folder of built bundles: `<data_dir>/bundles/<bundle id>/` (the verified bundle) and
//! `<bundle id>.tar` beside it (the archive `DownloadBundle` streams, read at an offset so a
//! broken download resumes). A bundle id is `v<model version>-<first 16 hex digits of the
//! manifest's SHA-256>`; names starting with a dot are builds in progress.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use fedinspect_common::bundle::{is_valid_file_name, verify_bundle, BundleError, VerifiedBundle};
use fedinspect_common::signing::VerifyingKey;

#[derive(Clone, Debug)]
pub struct BundleStore {
    root: PathBuf,
}

impl BundleStore {
    /// Opens (creating) the folder and removes builds a crash interrupted.
    pub fn open(root: &Path) -> Result<Self, BundleError> {
        fs::create_dir_all(root).map_err(|e| io("create", root, e))?;
        for entry in fs::read_dir(root).map_err(|e| io("list", root, e))? {
            let entry = entry.map_err(|e| io("list", root, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                let path = entry.path();
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                removed.map_err(|e| io("remove unfinished build", &path, e))?;
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The id of a bundle of `version` whose manifest hashes to `manifest_sha256`.
    pub fn id_for(version: u64, manifest_sha256: &str) -> String {
        fedinspect_common::bundle::bundle_id(version, manifest_sha256)
    }

    /// Whether `id` has the shape of a bundle id (so it can name a path).
    pub fn is_valid_id(id: &str) -> bool {
        is_valid_file_name(id) && id.starts_with('v') && !id.ends_with(".tar")
    }

    pub fn dir(&self, id: &str) -> Result<PathBuf, BundleError> {
        self.checked(id).map(|_| self.root.join(id))
    }

    pub fn archive(&self, id: &str) -> Result<PathBuf, BundleError> {
        self.checked(id)
            .map(|_| self.root.join(format!("{id}.tar")))
    }

    /// Verifies the stored bundle `id` with the coordinator's own public key.
    pub fn open_bundle(&self, id: &str, key: &VerifyingKey) -> Result<VerifiedBundle, BundleError> {
        verify_bundle(&self.dir(id)?, key)
    }

    /// Length of `id`'s archive in bytes.
    pub fn archive_len(&self, id: &str) -> Result<u64, BundleError> {
        let path = self.archive(id)?;
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| io("read", &path, e))
    }

    /// Up to `max` bytes of `id`'s archive from `offset` (empty at or past the end).
    pub fn read_chunk(&self, id: &str, offset: u64, max: usize) -> Result<Vec<u8>, BundleError> {
        let path = self.archive(id)?;
        let mut f = File::open(&path).map_err(|e| io("read", &path, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| io("read", &path, e))?;
        let mut buf = Vec::with_capacity(max);
        f.take(max as u64)
            .read_to_end(&mut buf)
            .map_err(|e| io("read", &path, e))?;
        Ok(buf)
    }

    /// Ids of the stored bundles, sorted.
    pub fn ids(&self) -> Result<Vec<String>, BundleError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| io("list", &self.root, e))? {
            let entry = entry.map_err(|e| io("list", &self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if Self::is_valid_id(&name) && entry.path().is_dir() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn checked(&self, id: &str) -> Result<(), BundleError> {
        if Self::is_valid_id(id) {
            Ok(())
        } else {
            Err(BundleError::ArchiveEntry {
                entry: id.to_string(),
                reason: "not a bundle id (v<version>-<hex>)".into(),
            })
        }
    }
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> BundleError {
    BundleError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
