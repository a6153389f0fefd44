//! Partial uploads kept for resumption, keyed by (plant, update id). A stream in flight writes
//! `blobs/incoming/<stem>.part`; every [`SYNC_EVERY`] bytes, and when the stream breaks, the
//! received prefix is fsynced and a mark `blobs/partial/<stem>.json` records its length, its
//! SHA-256 and the header it came with. A broken stream's file then moves to
//! `blobs/partial/<stem>.part`, where a resumed stream takes it back. Whatever a mark does not
//! cover (bytes written after the last fsync) is cut off at start-up, so the held prefix is
//! always one that was fsynced and checksummed. Accepting an update is not done here: the
//! file still goes through `Incoming::commit` (fsync, rename, record).
//!
//! `<stem>` is the hex SHA-256 of the plant id, a zero byte and the update id, so two plants
//! that chose the same update id never share a file, and plant ids need no escaping.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fedinspect_common::fsutil;
use serde::{Deserialize, Serialize};

use super::StorageError;
use crate::records::UpdateId;

/// Received bytes between two fsyncs of an upload in flight: often enough that a coordinator
/// killed mid-upload keeps most of a large payload, rarely enough that an fsync (a few
/// milliseconds) costs little next to receiving 8 MiB. A broken stream is synced at once.
pub const SYNC_EVERY: u64 = 8 << 20;

/// Bytes read at a time when a held prefix is checked.
const READ_BUF: usize = 1 << 16;

/// The partial-upload folders of one blob store, and the streams writing to them now.
#[derive(Clone, Debug)]
pub struct Partials {
    incoming: PathBuf,
    held: PathBuf,
    active: Arc<Mutex<HashSet<String>>>,
}

/// What a mark records: whose upload, for which round, announced with which header, and how
/// many bytes of it are durable with which SHA-256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialMark {
    pub plant: String,
    pub update_id: String,
    pub round: u64,
    /// Every header field but the resume offset, as text (`intake::resume` writes them).
    pub header: BTreeMap<String, String>,
    pub durable_bytes: u64,
    pub prefix_sha256: String,
}

/// The right to write one (plant, update id) upload; released on drop. At most one stream
/// holds it, so a second stream of the same update cannot interleave its bytes.
#[derive(Debug)]
pub struct Claim {
    partials: Partials,
    stem: String,
}

/// A resumable upload's bookkeeping inside `Incoming`: its claim, its mark template and how
/// much of its file is fsynced.
#[derive(Debug)]
pub struct Resumable {
    pub(super) claim: Claim,
    pub(super) mark: PartialMark,
    pub(super) synced: u64,
}

impl Partials {
    /// The folders under the blob store `root`; recovers what a crash left (see
    /// [`Partials::recover`]).
    pub(super) fn open(root: &Path) -> Result<Self, StorageError> {
        let partials = Self {
            incoming: root.join("incoming"),
            held: root.join("partial"),
            active: Arc::default(),
        };
        for dir in [&partials.incoming, &partials.held] {
            std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        }
        partials.recover()?;
        Ok(partials)
    }

    /// After a crash: a file in flight whose mark exists moves to `partial/`; everything else
    /// in `incoming/` goes; a held file is cut to its mark's length (bytes after the last
    /// fsync are not trusted); a file without a mark, or a mark without its file, goes.
    fn recover(&self) -> Result<(), StorageError> {
        for path in list(&self.incoming)? {
            let stem = stem_of(&path, "part");
            let keep = stem
                .as_ref()
                .is_some_and(|s| self.held.join(format!("{s}.json")).is_file());
            match stem {
                Some(s) if keep => {
                    let to = self.held.join(format!("{s}.part"));
                    std::fs::rename(&path, &to).map_err(|e| err(&to, e))?;
                }
                _ => std::fs::remove_file(&path).map_err(|e| err(&path, e))?,
            }
        }
        for path in list(&self.held)? {
            let remove = match (stem_of(&path, "json"), stem_of(&path, "part")) {
                (Some(stem), _) => !self.recover_one(&stem)?,
                (None, Some(stem)) => !self.held.join(format!("{stem}.json")).is_file(),
                (None, None) => true,
            };
            if remove {
                remove_quietly(&path);
            }
        }
        fsutil::sync_dir(&self.held).map_err(|e| err(&self.held, e))
    }

    /// Cuts a held file to its mark; false when the pair is unusable.
    fn recover_one(&self, stem: &str) -> Result<bool, StorageError> {
        let (mark_path, data) = (self.mark_path(stem), self.held_path(stem));
        let Some(mark) = read_mark(&mark_path) else {
            return Ok(false);
        };
        let len = match std::fs::metadata(&data) {
            Ok(m) => m.len(),
            Err(_) => return Ok(false),
        };
        if len < mark.durable_bytes {
            remove_quietly(&data);
            return Ok(false);
        }
        if len > mark.durable_bytes {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&data)
                .map_err(|e| err(&data, e))?;
            file.set_len(mark.durable_bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| err(&data, e))?;
        }
        Ok(true)
    }

    /// Claims (plant, id) for one stream; `None` while another stream holds it.
    pub fn claim(&self, plant: &str, id: &UpdateId) -> Option<Claim> {
        let stem = stem(plant, id);
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.insert(stem.clone()).then(|| Claim {
            partials: self.clone(),
            stem,
        })
    }

    /// The mark of `plant`'s upload `id`, if a prefix of it is held (or in flight).
    pub fn mark(&self, plant: &str, id: &UpdateId) -> Option<PartialMark> {
        read_mark(&self.mark_path(&stem(plant, id)))
            .filter(|m| m.plant == plant && m.update_id == id.to_hex())
    }

    /// Whether the held prefix still has the length and SHA-256 its mark records (blocking;
    /// reads it once).
    pub fn verify(&self, claim: &Claim, mark: &PartialMark) -> Result<bool, StorageError> {
        let path = self.held_path(&claim.stem);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(err(&path, e)),
        };
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; READ_BUF];
        let mut left = mark.durable_bytes;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
            match file.read(&mut buf[..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    hash.update(&buf[..n]);
                    left -= n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(&path, e)),
            }
        }
        Ok(hex::encode(hash.finish()) == mark.prefix_sha256)
    }

    /// Removes the held prefix and mark of the claimed upload (blocking).
    pub fn discard(&self, claim: &Claim) {
        for path in [
            self.mark_path(&claim.stem),
            self.held_path(&claim.stem),
            self.incoming_path(&claim.stem),
        ] {
            remove_quietly(&path);
        }
    }

    /// Opens the claimed upload's file in `incoming/` (blocking): the held prefix of
    /// `mark.durable_bytes` bytes taken back when `mark.durable_bytes > 0`, else a new file.
    /// Returns the file, positioned at its end, and the bookkeeping for `Incoming`.
    pub(super) fn open_file(
        &self,
        claim: Claim,
        mark: PartialMark,
    ) -> Result<(PathBuf, File, Resumable), StorageError> {
        let path = self.incoming_path(&claim.stem);
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true);
        if mark.durable_bytes > 0 {
            let held = self.held_path(&claim.stem);
            std::fs::rename(&held, &path).map_err(|e| err(&held, e))?;
        } else {
            self.discard(&claim);
            opts.create_new(true);
        }
        let file = opts.open(&path).map_err(|e| err(&path, e))?;
        file.set_len(mark.durable_bytes)
            .map_err(|e| err(&path, e))?;
        let mut file = file;
        io::Seek::seek(&mut file, io::SeekFrom::End(0)).map_err(|e| err(&path, e))?;
        let synced = mark.durable_bytes;
        Ok((
            path,
            file,
            Resumable {
                claim,
                mark,
                synced,
            },
        ))
    }

    /// Drops every held upload of another round than `keep` that no stream is writing;
    /// returns how many went. Called when a round closes and when the driver starts.
    pub fn retain_round(&self, keep: Option<u64>) -> usize {
        let Ok(paths) = list(&self.held) else {
            return 0;
        };
        let active = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut dropped = 0;
        for path in paths {
            let Some(stem) = stem_of(&path, "json") else {
                continue;
            };
            let current = read_mark(&path).is_some_and(|m| Some(m.round) == keep);
            if current || active.contains(&stem) {
                continue;
            }
            remove_quietly(&self.held_path(&stem));
            remove_quietly(&path);
            dropped += 1;
        }
        dropped
    }

    fn mark_path(&self, stem: &str) -> PathBuf {
        self.held.join(format!("{stem}.json"))
    }

    fn held_path(&self, stem: &str) -> PathBuf {
        self.held.join(format!("{stem}.part"))
    }

    fn incoming_path(&self, stem: &str) -> PathBuf {
        self.incoming.join(format!("{stem}.part"))
    }
}

impl Resumable {
    /// Records that the first `len` bytes of `file` (hashing to `sha256`) are durable:
    /// fsync, then the mark (itself written atomically).
    pub(super) fn checkpoint(
        &mut self,
        file: &File,
        path: &Path,
        len: u64,
        sha256: &[u8],
    ) -> Result<(), StorageError> {
        file.sync_data().map_err(|e| err(path, e))?;
        self.mark.durable_bytes = len;
        self.mark.prefix_sha256 = hex::encode(sha256);
        let partials = &self.claim.partials;
        let mark_path = partials.mark_path(&self.claim.stem);
        let json = serde_json::to_vec_pretty(&self.mark).map_err(|e| err(&mark_path, e.into()))?;
        fsutil::write_bytes_atomic(&mark_path, &json).map_err(|e| err(&mark_path, e))?;
        self.synced = len;
        Ok(())
    }

    /// Moves the (checkpointed) file in flight to `partial/`, where a resumed stream finds it.
    pub(super) fn park(&self, path: &Path) -> Result<(), StorageError> {
        let partials = &self.claim.partials;
        let to = partials.held_path(&self.claim.stem);
        std::fs::rename(path, &to).map_err(|e| err(&to, e))?;
        fsutil::sync_dir(&partials.held).map_err(|e| err(&partials.held, e))
    }

    /// Removes the mark once the upload was stored or refused (best effort: a mark without
    /// its file is removed at the next start).
    pub(super) fn forget(&self) {
        let partials = &self.claim.partials;
        remove_quietly(&partials.mark_path(&self.claim.stem));
        remove_quietly(&partials.held_path(&self.claim.stem));
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut active = self
            .partials
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        active.remove(&self.stem);
    }
}

fn stem(plant: &str, id: &UpdateId) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(plant.as_bytes());
    ctx.update(&[0]);
    ctx.update(&id.0);
    hex::encode(ctx.finish())
}

/// The stem of `<64 hex>.<ext>`; `None` for any other name.
fn stem_of(path: &Path, ext: &str) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    (stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit())).then(|| stem.to_string())
}

fn read_mark(path: &Path) -> Option<PartialMark> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let entries = std::fs::read_dir(dir).map_err(|e| err(dir, e))?;
    entries
        .map(|e| e.map(|e| e.path()).map_err(|e| err(dir, e)))
        .collect()
}

fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_file(path);
}

fn err(path: &Path, source: io::Error) -> StorageError {
    StorageError::Blob {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(plant: &str, id: &UpdateId, durable: u64) -> PartialMark {
        PartialMark {
            plant: plant.into(),
            update_id: id.to_hex(),
            round: 1,
            header: BTreeMap::new(),
            durable_bytes: durable,
            prefix_sha256: hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                &vec![7u8; durable as usize],
            )),
        }
    }

    /// A kill lands before or after a broken stream's file moves from `incoming/` to
    /// `partial/` (its mark is written first): either way start-up keeps the checkpointed
    /// prefix in `partial/`, cut to the mark, and drops what no mark covers.
    #[test]
    fn recovery_keeps_the_marked_prefix_wherever_the_kill_left_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let p = Partials::open(root).unwrap();
        let (in_flight, parked) = (UpdateId([1; 16]), UpdateId([2; 16]));
        for (id, folder) in [(&in_flight, &p.incoming), (&parked, &p.held)] {
            let stem = stem("plant-1", id);
            let json = serde_json::to_vec(&mark("plant-1", id, 64)).unwrap();
            std::fs::write(p.mark_path(&stem), json).unwrap();
            // 64 checkpointed bytes and 10 written after the last fsync.
            let mut bytes = vec![7u8; 64];
            bytes.extend_from_slice(b"unsynced!!");
            std::fs::write(folder.join(format!("{stem}.part")), bytes).unwrap();
        }
        let orphan = stem("plant-2", &UpdateId([3; 16]));
        std::fs::write(p.incoming.join(format!("{orphan}.part")), b"no mark").unwrap();
        std::fs::write(p.held.join(format!("{orphan}.part")), b"no mark").unwrap();
        drop(p);

        let p = Partials::open(root).unwrap();
        assert_eq!(list(&p.incoming).unwrap(), Vec::<PathBuf>::new());
        for id in [&in_flight, &parked] {
            let m = p.mark("plant-1", id).expect("the mark survives");
            let claim = p.claim("plant-1", id).unwrap();
            assert_eq!(
                std::fs::metadata(p.held_path(&claim.stem)).unwrap().len(),
                64
            );
            assert!(
                p.verify(&claim, &m).unwrap(),
                "the prefix its mark describes"
            );
        }
        assert!(!p.held_path(&orphan).exists());
    }
}
