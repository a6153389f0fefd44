//! The content-addressed blob store: model safetensors files and accepted update payloads,
//! each stored once under the hex of its SHA-256 (`blobs/ab/abcd…`), written to a temporary
//! file, fsynced and renamed into place, so a blob path never holds half a file.

use std::io;
use std::path::{Path, PathBuf};

use fedinspect_common::fsutil;
use ring::rand::SecureRandom;
use tokio::io::AsyncWriteExt;

use super::StorageError;
use crate::records::Digest;

/// Blobs under `root`, uploads in progress under `root/incoming`.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

/// An upload being written to a temporary file while it is hashed; removed unless committed.
pub struct Incoming {
    store: BlobStore,
    path: PathBuf,
    file: Option<tokio::fs::File>,
    hash: ring::digest::Context,
    len: u64,
}

impl BlobStore {
    /// Opens the store in `root`, creating it, and deletes uploads a crash left behind.
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        let store = Self {
            root: root.to_path_buf(),
        };
        let incoming = store.incoming_dir();
        std::fs::create_dir_all(&incoming).map_err(|e| blob_err(&incoming, e))?;
        for entry in std::fs::read_dir(&incoming).map_err(|e| blob_err(&incoming, e))? {
            let path = entry.map_err(|e| blob_err(&incoming, e))?.path();
            std::fs::remove_file(&path).map_err(|e| blob_err(&path, e))?;
        }
        Ok(store)
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).is_file()
    }

    /// Stores `bytes` (blocking) and returns their digest; a blob already there is kept.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StorageError> {
        let digest = Digest::of(bytes);
        let path = self.path_of(&digest);
        if !path.is_file() {
            fsutil::write_bytes_atomic(&path, bytes).map_err(|e| blob_err(&path, e))?;
        }
        Ok(digest)
    }

    /// Reads a whole blob (blocking), checking its digest.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StorageError> {
        let path = self.path_of(digest);
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::MissingBlob(digest.to_hex()),
            _ => blob_err(&path, e),
        })?;
        if Digest::of(&bytes) != *digest {
            return Err(StorageError::Blob {
                path,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "content does not match its digest",
                ),
            });
        }
        Ok(bytes)
    }

    /// Starts writing an upload to a fresh temporary file.
    pub async fn incoming(&self) -> Result<Incoming, StorageError> {
        let mut tag = [0u8; 12];
        ring::rand::SystemRandom::new()
            .fill(&mut tag)
            .map_err(|_| StorageError::Blob {
                path: self.incoming_dir(),
                source: io::Error::other("the system random source failed"),
            })?;
        let path = self
            .incoming_dir()
            .join(format!("{}.part", hex::encode(tag)));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| blob_err(&path, e))?;
        Ok(Incoming {
            store: self.clone(),
            path,
            file: Some(file),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            len: 0,
        })
    }

    fn incoming_dir(&self) -> PathBuf {
        self.root.join("incoming")
    }
}

impl Incoming {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let file = self.file.as_mut().expect("the file is open until sealed");
        file.write_all(bytes)
            .await
            .map_err(|e| blob_err(&self.path, e))?;
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// SHA-256 of the bytes written so far.
    pub fn digest(&self) -> Digest {
        let d = self.hash.clone().finish();
        Digest::from_slice(d.as_ref()).expect("SHA-256 has 32 bytes")
    }

    /// Flushes and fsyncs the temporary file; the file stays readable at [`Incoming::path`].
    pub async fn sync(&mut self) -> Result<(), StorageError> {
        if let Some(mut file) = self.file.take() {
            file.flush().await.map_err(|e| blob_err(&self.path, e))?;
            file.sync_all().await.map_err(|e| blob_err(&self.path, e))?;
        }
        Ok(())
    }

    /// The temporary file, for reading it back after [`Incoming::sync`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the synced file into the store under its digest (blocking: rename and a
    /// directory fsync). An identical blob already there is kept.
    pub fn commit(mut self) -> Result<Digest, StorageError> {
        assert!(self.file.is_none(), "commit after sync");
        let digest = self.digest();
        let target = self.store.path_of(&digest);
        let dir = target
            .parent()
            .expect("blob paths have a folder")
            .to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| blob_err(&dir, e))?;
        std::fs::rename(&self.path, &target).map_err(|e| blob_err(&target, e))?;
        fsutil::sync_dir(&dir).map_err(|e| blob_err(&dir, e))?;
        self.path = PathBuf::new();
        Ok(digest)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            // Best effort: a leftover is removed at the next start anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn blob_err(path: &Path, source: io::Error) -> StorageError {
    StorageError::Blob {
        path: path.to_path_buf(),
        source,
    }
}
