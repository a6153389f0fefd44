//! The content-addressed blob store: model safetensors files and accepted update payloads,
//! each stored once under the hex of its SHA-256 (`blobs/ab/abcd…`), written to a temporary
//! file, fsynced and renamed into place, so a blob path never holds half a file.
//!
//! An upload arrives over time and its address is known only at its end, so it is written
//! through [`Incoming`] (blocking code, on the upload's own thread) rather than with
//! `fsutil::write_atomic`: the same temp file, fsync, rename and folder fsync, in steps.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use fedinspect_common::delta::{Codec, Layout};
use fedinspect_common::fsutil;
use ring::rand::SecureRandom;

use super::delta_file::DeltaFile;
use super::StorageError;
use crate::records::Digest;

/// Bytes read at a time when a blob is hashed.
const VERIFY_BUF: usize = 1 << 20;

/// Blobs under `root`, uploads in progress under `root/incoming`.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

/// An upload being written to a temporary file while it is hashed; removed unless committed.
pub struct Incoming {
    store: BlobStore,
    path: PathBuf,
    file: Option<File>,
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
            self.shard_dir(&path)?;
            fsutil::write_bytes_atomic(&path, bytes).map_err(|e| blob_err(&path, e))?;
        }
        Ok(digest)
    }

    /// Creates the shard folder of blob `path` if needed, durably (the root is fsynced).
    fn shard_dir(&self, path: &Path) -> Result<(), StorageError> {
        let dir = path.parent().expect("blob paths have a folder");
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| blob_err(dir, e))?;
            fsutil::sync_dir(&self.root).map_err(|e| blob_err(&self.root, e))?;
        }
        Ok(())
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

    /// Checks that the blob's content still hashes to its address, reading it in 1 MiB steps.
    pub fn verify(&self, digest: &Digest) -> Result<(), StorageError> {
        let path = self.path_of(digest);
        let mut file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::MissingBlob(digest.to_hex()),
            _ => blob_err(&path, e),
        })?;
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; VERIFY_BUF];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hash.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(blob_err(&path, e)),
            }
        }
        if hash.finish().as_ref() != digest.0 {
            return Err(StorageError::Blob {
                path,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "content does not match its digest",
                ),
            });
        }
        Ok(())
    }

    /// The stored update payload `digest`, a `codec` delta of `layout`, readable by range.
    pub fn delta(
        &self,
        digest: &Digest,
        layout: &Layout,
        codec: Codec,
    ) -> Result<DeltaFile, StorageError> {
        let path = self.path_of(digest);
        if !path.is_file() {
            return Err(StorageError::MissingBlob(digest.to_hex()));
        }
        DeltaFile::open(&path, layout, codec)
    }

    /// Starts writing an upload to a fresh temporary file (blocking).
    pub fn incoming(&self) -> Result<Incoming, StorageError> {
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
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
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
    /// Appends `bytes` (blocking; unbuffered, so the bytes can be read back at once).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let file = self.file.as_mut().expect("the file is open until sealed");
        file.write_all(bytes).map_err(|e| blob_err(&self.path, e))?;
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

    /// Fsyncs the temporary file (blocking); the file stays readable at [`Incoming::path`].
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(|e| blob_err(&self.path, e))?;
        }
        Ok(())
    }

    /// The temporary file, readable while it is written.
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
        self.store.shard_dir(&target)?;
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
