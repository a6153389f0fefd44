//! The content-addressed blob store: model safetensors files and accepted update payloads,
//! each stored once under the hex of its SHA-256 (`blobs/ab/abcd…`), written to a temporary
//! file, fsynced and renamed into place, so a blob path never holds half a file.
//!
//! An upload arrives over time and its address is known only at its end, so it is written
//! through [`Incoming`] (blocking code, on the upload's own thread) rather than with
//! `fsutil::write_atomic`: the same temp file, fsync, rename and folder fsync, in steps. An
//! upload that can be resumed ([`BlobStore::resumable`]) is one whose file and durable prefix
//! are managed by `partial` as well: a broken stream leaves its checkpointed prefix there
//! ([`Incoming::hold`]) instead of deleting it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fedinspect_common::delta::{Codec, Layout};
use fedinspect_common::fsutil;
use ring::rand::SecureRandom;

use super::delta_file::DeltaFile;
use super::partial::{Claim, PartialMark, Partials, Resumable, SYNC_EVERY};
use super::StorageError;
use crate::records::Digest;

/// Bytes read at a time when a blob is hashed.
const VERIFY_BUF: usize = 1 << 20;

/// Blobs under `root`, uploads in progress under `root/incoming`, held partial uploads under
/// `root/partial`.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
    partials: Partials,
}

/// An upload being written to a temporary file while it is hashed; removed unless committed.
pub struct Incoming {
    store: BlobStore,
    path: PathBuf,
    file: Option<File>,
    hash: ring::digest::Context,
    len: u64,
    /// Bytes already in the file when it was opened (a resumed upload's durable prefix); the
    /// first `held` bytes are replayed ([`Incoming::replay`]) before anything is written.
    held: u64,
    /// Set for uploads that can be resumed after a broken stream.
    resumable: Option<Resumable>,
}

impl BlobStore {
    /// Opens the store in `root`, creating it; deletes uploads a crash left behind except the
    /// checkpointed prefixes of resumable ones, cut to their last checkpoint (`partial`).
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        let partials = Partials::open(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            partials,
        })
    }

    /// The held partial uploads.
    pub fn partials(&self) -> &Partials {
        &self.partials
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
            held: 0,
            resumable: None,
        })
    }

    /// Starts or resumes the claimed upload (blocking): with `mark.durable_bytes > 0` its held
    /// prefix (checked with `Partials::verify` by the caller) is taken back and must be
    /// replayed first; otherwise a new file. Fsynced and marked every `SYNC_EVERY` bytes.
    pub fn resumable(&self, claim: Claim, mark: PartialMark) -> Result<Incoming, StorageError> {
        let held = mark.durable_bytes;
        let (path, file, resumable) = self.partials.open_file(claim, mark)?;
        Ok(Incoming {
            store: self.clone(),
            path,
            file: Some(file),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            len: 0,
            held,
            resumable: Some(resumable),
        })
    }

    fn incoming_dir(&self) -> PathBuf {
        self.root.join("incoming")
    }
}

impl Incoming {
    /// Appends `bytes` (blocking; unbuffered, so the bytes can be read back at once). A
    /// resumable upload is checkpointed once `SYNC_EVERY` bytes arrived since the last one.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        assert!(self.len >= self.held, "replay the held prefix first");
        let file = self.file.as_mut().expect("the file is open until sealed");
        file.write_all(bytes).map_err(|e| blob_err(&self.path, e))?;
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        if let Some(r) = self.resumable.as_mut() {
            if self.len - r.synced >= SYNC_EVERY {
                let digest = self.hash.clone().finish();
                r.checkpoint(file, &self.path, self.len, digest.as_ref())?;
            }
        }
        Ok(())
    }

    /// Bytes of a resumed upload's held prefix not replayed yet.
    pub fn to_replay(&self) -> u64 {
        self.held.saturating_sub(self.len)
    }

    /// Reads the next bytes of the held prefix into `buf` (at most `limit`), hashing them as
    /// if they had just been written; 0 once the prefix is replayed.
    pub fn replay(&mut self, buf: &mut [u8], limit: usize) -> Result<usize, StorageError> {
        let left = usize::try_from(self.to_replay()).unwrap_or(usize::MAX);
        let want = buf.len().min(limit).min(left);
        if want == 0 {
            return Ok(0);
        }
        let file = self.file.as_ref().expect("the file is open until sealed");
        let n = file
            .read_at(&mut buf[..want], self.len)
            .map_err(|e| blob_err(&self.path, e))?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the held prefix is short");
            return Err(blob_err(&self.path, e));
        }
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    /// Keeps what a broken stream delivered for a later resume (blocking): fsync, mark, and
    /// move to `partial/`. Returns the durable byte count; 0 (and nothing kept) for an upload
    /// that is not resumable or received nothing.
    pub fn hold(mut self) -> Result<u64, StorageError> {
        let (Some(r), Some(file)) = (self.resumable.as_mut(), self.file.as_ref()) else {
            return Ok(0);
        };
        if self.len == 0 {
            return Ok(0);
        }
        let digest = self.hash.clone().finish();
        r.checkpoint(file, &self.path, self.len, digest.as_ref())?;
        r.park(&self.path)?;
        self.path = PathBuf::new();
        self.resumable = None; // keeps the mark; releases the claim
        Ok(self.len)
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
        if let Some(r) = self.resumable.take() {
            r.forget();
        }
        Ok(digest)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            // Best effort: a leftover is removed at the next start anyway.
            let _ = std::fs::remove_file(&self.path);
        }
        // A resumable upload dropped without `hold` was refused or failed: nothing is kept.
        if let Some(r) = self.resumable.take() {
            r.forget();
        }
    }
}

fn blob_err(path: &Path, source: io::Error) -> StorageError {
    StorageError::Blob {
        path: path.to_path_buf(),
        source,
    }
}
