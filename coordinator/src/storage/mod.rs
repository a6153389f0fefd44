//! Durable state: the sled database behind typed functions, and the blob store on disk. This
//! is the only module that knows sled.
//!
//! # Trees (values are JSON of the `records` types)
//! | tree | key | value |
//! |---|---|---|
//! | `plants` | plant id | [`PlantRecord`] |
//! | `rounds` | round, u64 big-endian | [`RoundRecord`] |
//! | `models` | version, u64 big-endian | [`ModelRecord`] |
//! | `updates` | round (u64 BE) then plant id | [`UpdateRecord`] |
//! | `update_ids` | update id (16 bytes) | the `updates` key |
//! | `audit` | sled-generated id, u64 BE | [`AuditEntry`] |
//! | `meta` | `format_version` | u32 BE, [`FORMAT_VERSION`] |
//! | `meta` | `promoted_history` | JSON list of promoted versions, oldest first |
//! | `meta` | `update_blobs_removed_through` | JSON round number: rounds up to it have no update blobs (`retention`) |
//! | `evaluations` | version, u64 big-endian | [`crate::gate::Evaluation`]: its validation-set scores |
//!
//! Big-endian keys make sled's byte order the numeric order. Changes that must happen
//! together (an update and its id index; a model version and its round's state; a promotion)
//! are one multi-tree transaction. Writes become durable at [`Store::flush`], which callers
//! await before they acknowledge anything.

mod blobs;
pub mod check;
mod delta_file;
mod disk;
pub mod partial;
pub mod retention;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

pub use blobs::{BlobStore, Incoming};
pub use delta_file::{header_bytes, DeltaFile};
pub use disk::{probe_usable, DiskProblem, NotUsable};
pub use partial::{Claim, PartialMark, Partials};

use crate::records::{
    AuditEntry, AuditFilter, ModelRecord, ModelStatus, PlantRecord, RoundRecord, UpdateId,
    UpdateRecord,
};

/// Version of the layout above; a database with another version is refused at open.
pub const FORMAT_VERSION: u32 = 1;

const FORMAT_KEY: &[u8] = b"format_version";
const PROMOTED_KEY: &[u8] = b"promoted_history";
const REMOVED_THROUGH_KEY: &[u8] = b"update_blobs_removed_through";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the database in {} met a {problem} and refuses writes until the coordinator restarts (sled keeps the error); fix the disk: the coordinator restarts itself once the disk is usable again ([storage] restart_when_disk_recovers; otherwise restart it), nothing acknowledged is lost", path.display())]
    DatabaseFailed { path: PathBuf, problem: DiskProblem },
    #[error("database error in {}: {source}; check the disk, and that no other coordinator uses this data_dir", path.display())]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("record {key} in tree '{tree}' is unreadable ({reason}); the database is corrupt, restore data_dir from a backup")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("the database in {} has storage format {found}, this coordinator reads format {supported}; run the coordinator version that wrote it", path.display())]
    FormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "model version {0} already exists with other content; a published version never changes"
    )]
    VersionExists(u64),
    #[error("blob store error at {}: {source}; check the disk and the permissions of data_dir", path.display())]
    Blob {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "blob {0} is missing from the blob store; data_dir is incomplete, restore it from a backup"
    )]
    MissingBlob(String),
}

/// What [`Store::record_update`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordOutcome {
    Inserted,
    /// This update id was recorded before; nothing changed.
    Duplicate(UpdateRecord),
    /// The plant already has another update in this round; nothing changed.
    PlantAlreadyContributed(UpdateRecord),
    /// The update id belongs to another plant's update; nothing changed.
    IdTaken {
        plant_id: String,
    },
}

/// The sled database of a coordinator.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    plants: sled::Tree,
    rounds: sled::Tree,
    models: sled::Tree,
    updates: sled::Tree,
    update_ids: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    /// Set when sled met a full or read-only disk: sled 0.34 keeps that I/O error, and its
    /// next `flush` never returns, even after space comes back. From then on writes and
    /// flushes are refused at once, naming the problem and the cure (a restart), instead of
    /// hanging the request that asked.
    write_failed: Arc<OnceLock<DiskProblem>>,
}

impl Store {
    /// Opens (or creates) the database in `dir`, checking its format version.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let path = dir.to_path_buf();
        let sled_err = |source| StorageError::Sled {
            path: path.clone(),
            source,
        };
        let db = open_sled(dir).map_err(sled_err)?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err);
        let store = Store {
            plants: tree("plants")?,
            rounds: tree("rounds")?,
            models: tree("models")?,
            updates: tree("updates")?,
            update_ids: tree("update_ids")?,
            audit: tree("audit")?,
            meta: tree("meta")?,
            db: db.clone(),
            path: path.clone(),
            write_failed: Arc::new(OnceLock::new()),
        };
        match store.meta.get(FORMAT_KEY).map_err(sled_err)? {
            None => {
                store
                    .meta
                    .insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                    .map_err(sled_err)?;
                db.flush().map_err(sled_err)?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                if found != FORMAT_VERSION {
                    return Err(StorageError::FormatVersion {
                        path,
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
            }
        }
        Ok(store)
    }

    /// Makes every write so far durable (fsync).
    ///
    /// Runs sled's blocking `flush` on the blocking pool: sled 0.34's `flush_async` never wakes
    /// some of its callers when several await it at once (sled issue #1308), which hung every
    /// handler of a coordinator that many plants registered with at the same moment.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.writable()?;
        let db = self.db.clone();
        let flush = move || {
            let flushed = db.flush();
            release_deferred();
            flushed
        };
        match tokio::task::spawn_blocking(flush).await {
            Ok(result) => result.map(|_| ()).map_err(|e| self.err(e)),
            Err(e) => Err(self.err(sled::Error::Io(std::io::Error::other(format!(
                "the flush task failed: {e}"
            ))))),
        }
    }

    /// [`Store::flush`] for blocking code.
    pub fn flush_blocking(&self) -> Result<(), StorageError> {
        self.writable()?;
        let flushed = self.db.flush();
        release_deferred();
        flushed.map_err(|e| self.err(e))?;
        Ok(())
    }

    // ---- plants

    pub fn put_plant(&self, rec: &PlantRecord) -> Result<(), StorageError> {
        self.put(&self.plants, rec.plant_id.as_bytes(), rec)
    }

    pub fn plant(&self, plant_id: &str) -> Result<Option<PlantRecord>, StorageError> {
        self.get(&self.plants, "plants", plant_id.as_bytes())
    }

    /// Every plant, in id order.
    pub fn plants(&self) -> Result<Vec<PlantRecord>, StorageError> {
        self.all(&self.plants, "plants", false, usize::MAX)
    }

    // ---- rounds

    pub fn put_round(&self, rec: &RoundRecord) -> Result<(), StorageError> {
        self.put(&self.rounds, &rec.round.to_be_bytes(), rec)
    }

    pub fn round(&self, round: u64) -> Result<Option<RoundRecord>, StorageError> {
        self.get(&self.rounds, "rounds", &round.to_be_bytes())
    }

    pub fn latest_round(&self) -> Result<Option<RoundRecord>, StorageError> {
        Ok(self.all(&self.rounds, "rounds", true, 1)?.pop())
    }

    /// Up to `limit` rounds, newest first.
    pub fn rounds(&self, limit: usize) -> Result<Vec<RoundRecord>, StorageError> {
        self.all(&self.rounds, "rounds", true, limit)
    }

    // ---- models

    pub fn model(&self, version: u64) -> Result<Option<ModelRecord>, StorageError> {
        self.get(&self.models, "models", &version.to_be_bytes())
    }

    /// Up to `limit` versions, newest first.
    pub fn models(&self, limit: usize) -> Result<Vec<ModelRecord>, StorageError> {
        self.all(&self.models, "models", true, limit)
    }

    /// Up to `limit` versions below `below`, newest first: the next page of a listing.
    pub fn models_below(&self, below: u64, limit: usize) -> Result<Vec<ModelRecord>, StorageError> {
        self.models
            .range(..below.to_be_bytes())
            .rev()
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(|e| self.err(e))?;
                decode("models", &k, &v)
            })
            .collect()
    }

    pub fn latest_model(&self) -> Result<Option<ModelRecord>, StorageError> {
        Ok(self.models(1)?.pop())
    }

    /// The newest version that was not rolled back: the base of the next round.
    pub fn latest_usable_model(&self) -> Result<Option<ModelRecord>, StorageError> {
        for item in self.models.iter().rev() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let rec: ModelRecord = decode("models", &k, &v)?;
            if rec.status != ModelStatus::RolledBack {
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }

    /// Stores a new model version and, in the same transaction, `round` (its round's state),
    /// if given. Storing the same record again is a no-op; another record under an existing
    /// version is refused, since a published version never changes.
    pub fn insert_model(
        &self,
        model: &ModelRecord,
        round: Option<&RoundRecord>,
    ) -> Result<(), StorageError> {
        self.writable()?;
        let key = model.version.to_be_bytes();
        let value = encode(model);
        let round_kv = round.map(|r| (r.round.to_be_bytes(), encode(r)));
        let result = (&self.models, &self.rounds).transaction(|(models, rounds)| {
            if let Some(old) = models.get(key)? {
                let old: ModelRecord =
                    decode("models", &key, &old).map_err(ConflictableTransactionError::Abort)?;
                if !same_content(&old, model) {
                    return Err(ConflictableTransactionError::Abort(
                        StorageError::VersionExists(model.version),
                    ));
                }
            } else {
                models.insert(&key, value.as_slice())?;
            }
            if let Some((k, v)) = &round_kv {
                rounds.insert(k, v.as_slice())?;
            }
            Ok(())
        });
        self.tx(result)
    }

    /// Changes the status of `changed` versions and the promotion history, together.
    pub fn commit_promotion(
        &self,
        changed: &[ModelRecord],
        history: &[u64],
    ) -> Result<(), StorageError> {
        self.writable()?;
        let history = serde_json::to_vec(history).expect("a list of integers serialises");
        let result = (&self.models, &self.meta).transaction(|(models, meta)| {
            for m in changed {
                models.insert(&m.version.to_be_bytes(), encode(m))?;
            }
            meta.insert(PROMOTED_KEY, history.as_slice())?;
            Ok(())
        });
        self.tx(result)
    }

    /// Promoted versions, oldest first.
    pub fn promotion_history(&self) -> Result<Vec<u64>, StorageError> {
        Ok(self
            .get(&self.meta, "meta", PROMOTED_KEY)?
            .unwrap_or_default())
    }

    // ---- updates

    /// Records an accepted update with its id index, unless its id or its (round, plant) slot
    /// is taken; see [`RecordOutcome`].
    pub fn record_update(&self, rec: &UpdateRecord) -> Result<RecordOutcome, StorageError> {
        self.writable()?;
        let key = update_key(rec.round, &rec.plant_id);
        let value = encode(rec);
        let result = (&self.updates, &self.update_ids).transaction(|(updates, ids)| {
            let abort = ConflictableTransactionError::Abort;
            if let Some(existing_key) = ids.get(rec.update_id.0)? {
                let existing = updates.get(&existing_key)?.ok_or_else(|| {
                    abort(corrupt("update_ids", &existing_key, "points at no update"))
                })?;
                let existing: UpdateRecord =
                    decode("updates", &existing_key, &existing).map_err(abort)?;
                return Ok(if existing.plant_id == rec.plant_id {
                    RecordOutcome::Duplicate(existing)
                } else {
                    RecordOutcome::IdTaken {
                        plant_id: existing.plant_id,
                    }
                });
            }
            if let Some(existing) = updates.get(&key)? {
                let existing: UpdateRecord = decode("updates", &key, &existing).map_err(abort)?;
                return Ok(RecordOutcome::PlantAlreadyContributed(existing));
            }
            updates.insert(key.as_slice(), value.as_slice())?;
            ids.insert(&rec.update_id.0, key.as_slice())?;
            Ok(RecordOutcome::Inserted)
        });
        self.tx(result)
    }

    pub fn update_by_id(&self, id: &UpdateId) -> Result<Option<UpdateRecord>, StorageError> {
        let Some(key) = self.update_ids.get(id.0).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        self.get(&self.updates, "updates", &key)
    }

    pub fn update_for(
        &self,
        round: u64,
        plant_id: &str,
    ) -> Result<Option<UpdateRecord>, StorageError> {
        self.get(&self.updates, "updates", &update_key(round, plant_id))
    }

    /// The accepted updates of `round`, in plant-id order.
    pub fn updates_of_round(&self, round: u64) -> Result<Vec<UpdateRecord>, StorageError> {
        self.updates
            .scan_prefix(round.to_be_bytes())
            .map(|item| {
                let (k, v) = item.map_err(|e| self.err(e))?;
                decode("updates", &k, &v)
            })
            .collect()
    }

    // ---- audit

    pub fn audit(&self, entry: &AuditEntry) -> Result<(), StorageError> {
        self.writable()?;
        let id = self.db.generate_id().map_err(|e| self.err(e))?;
        self.put(&self.audit, &id.to_be_bytes(), entry)
    }

    /// Up to `limit` audit entries, newest first.
    pub fn audit_entries(&self, limit: usize) -> Result<Vec<AuditEntry>, StorageError> {
        self.all(&self.audit, "audit", true, limit)
    }

    /// Up to `limit` audit entries that `filter` matches, newest first.
    pub fn audit_matching(
        &self,
        filter: &AuditFilter,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        let mut out = Vec::new();
        for item in self.audit.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.err(e))?;
            let entry: AuditEntry = decode("audit", &k, &v)?;
            if filter.matches(&entry) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    // ---- retention

    /// Rounds up to this one have had their update blobs removed (0: none have).
    pub fn update_blobs_removed_through(&self) -> Result<u64, StorageError> {
        Ok(self
            .get(&self.meta, "meta", REMOVED_THROUGH_KEY)?
            .unwrap_or(0))
    }

    pub fn set_update_blobs_removed_through(&self, round: u64) -> Result<(), StorageError> {
        self.put(&self.meta, REMOVED_THROUGH_KEY, &round)
    }

    /// Every update record, in (round, plant id) order.
    pub fn all_updates(&self) -> Result<Vec<UpdateRecord>, StorageError> {
        self.all(&self.updates, "updates", false, usize::MAX)
    }

    /// Every entry of the update id index: (update id, the `updates` key it points at, the
    /// record there if any).
    pub fn update_id_index(&self) -> Result<Vec<(UpdateId, Option<UpdateRecord>)>, StorageError> {
        let mut out = Vec::new();
        for item in self.update_ids.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let id = UpdateId::from_slice(&k)
                .ok_or_else(|| corrupt("update_ids", &k, "the key is not a 16-byte update id"))?;
            out.push((id, self.get(&self.updates, "updates", &v)?));
        }
        Ok(out)
    }

    // ---- evaluations (`crate::gate`)

    /// Stores `version`'s validation-set scores, replacing older ones (made with another
    /// evaluator command).
    pub fn put_evaluation(&self, e: &crate::gate::Evaluation) -> Result<(), StorageError> {
        let tree = self.db.open_tree("evaluations").map_err(|e| self.err(e))?;
        self.put(&tree, &e.version.to_be_bytes(), e)
    }

    pub fn evaluation(
        &self,
        version: u64,
    ) -> Result<Option<crate::gate::Evaluation>, StorageError> {
        let tree = self.db.open_tree("evaluations").map_err(|e| self.err(e))?;
        self.get(&tree, "evaluations", &version.to_be_bytes())
    }

    // ---- helpers

    fn err(&self, source: sled::Error) -> StorageError {
        let e = StorageError::Sled {
            path: self.path.clone(),
            source,
        };
        if let Some(problem) = e.disk_problem() {
            let _ = self.write_failed.set(problem);
        }
        e
    }

    /// The disk problem sled met, if it did: from then on this store refuses writes, and only
    /// a new process can write again (`node::disk_recovery` restarts the coordinator in place
    /// once the disk is usable).
    pub fn database_failed(&self) -> Option<DiskProblem> {
        self.write_failed.get().copied()
    }

    /// Refuses a write once sled met a disk problem (see `write_failed`).
    fn writable(&self) -> Result<(), StorageError> {
        match self.write_failed.get() {
            Some(&problem) => Err(StorageError::DatabaseFailed {
                path: self.path.clone(),
                problem,
            }),
            None => Ok(()),
        }
    }

    fn tx<T>(&self, result: Result<T, TransactionError<StorageError>>) -> Result<T, StorageError> {
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => self.err(e),
        })
    }

    fn put<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        rec: &T,
    ) -> Result<(), StorageError> {
        self.writable()?;
        tree.insert(key, encode(rec)).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match tree.get(key).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => decode(name, key, &v).map(Some),
        }
    }

    fn all<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<T>, StorageError> {
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if newest_first
        {
            Box::new(tree.iter().rev())
        } else {
            Box::new(tree.iter())
        };
        iter.take(limit)
            .map(|item| {
                let (k, v) = item.map_err(|e| self.err(e))?;
                decode(name, &k, &v)
            })
            .collect()
    }
}

/// Hands what sled deferred on this thread to crossbeam-epoch's global queue, where any thread
/// can free it.
///
/// sled 0.34 frees replaced pages, superseded node versions and its sealed log buffers (one
/// segment, 512 KiB, each) through crossbeam-epoch's deferred functions, which wait in a bag of
/// the deferring thread until 64 have gathered. A flush runs on one of tokio's blocking threads,
/// and with many plants uploading at once there are a hundred of them, each of which deferred a
/// few items and then idled or did other work: what they held stayed resident. At 256 plants
/// this was tens of MiB and followed the rounds (docs/benchmarks.md, "Coordinator memory over
/// rounds"). Called after every flush, on the flushing thread; it costs a pin and, when the bag
/// is not empty, handing it on.
pub(crate) fn release_deferred() {
    crossbeam_epoch::pin().flush();
}

fn update_key(round: u64, plant_id: &str) -> Vec<u8> {
    let mut key = round.to_be_bytes().to_vec();
    key.extend_from_slice(plant_id.as_bytes());
    key
}

fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    // The records hold only strings, numbers, maps with string keys and lists.
    serde_json::to_vec(rec).expect("records serialise to JSON")
}

fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    value: &[u8],
) -> Result<T, StorageError> {
    serde_json::from_slice(value).map_err(|e| corrupt(tree, key, &e.to_string()))
}

fn corrupt(tree: &'static str, key: &[u8], reason: &str) -> StorageError {
    StorageError::Corrupt {
        tree,
        key: hex::encode(key),
        reason: reason.to_string(),
    }
}

/// Two records of one version with the same content (status and creation time aside), as a
/// recomputation after a crash produces.
fn same_content(a: &ModelRecord, b: &ModelRecord) -> bool {
    a.version == b.version
        && a.parent == b.parent
        && a.round == b.round
        && a.content_hash == b.content_hash
        && a.blob_sha256 == b.blob_sha256
        && a.contributors == b.contributors
}

/// Opens the sled database, waiting up to [`LOCK_WAIT`] for its file lock: a previous `Store`
/// of this process (a restart in place) or a coordinator that is still shutting down releases
/// the lock only when sled's background flusher has stopped, shortly after the drop.
fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// sled's page cache. Its default (1 GiB) let the coordinator's resident memory climb round
/// after round as the trees grew; the metadata a coordinator reads back is small (records,
/// indexes, the audit log), so a few tens of MiB keep the hot pages.
const SLED_CACHE_BYTES: u64 = 32 << 20;

/// How long [`Store::open`] waits for another holder of the database lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
