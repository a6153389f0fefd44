//! Model versions: storing one (safetensors blob, signature, sled record), loading one back
//! with its hash checked, and the initial version 1. Blocking code; async callers use
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::Path;

use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelState;

use crate::error::CoreError;
use crate::manifest;
use crate::records::{
    now_unix_ms, Contribution, ModelHashText, ModelRecord, ModelStatus, RoundRecord,
};
use crate::storage::{BlobStore, Store};

/// The single safetensors metadata key (one key, so the file bytes never depend on map order).
pub const METADATA_KEY: &str = "fedinspect";

/// Where versions live and who signs them.
#[derive(Clone, Copy)]
pub struct Versions<'a> {
    pub store: &'a Store,
    pub blobs: &'a BlobStore,
    pub signer: &'a SigningKey,
}

/// What a new version is made of.
pub struct NewVersion<'a> {
    pub version: u64,
    pub model: &'a ModelState,
    pub parent: u64,
    pub round: u64,
    pub strategy: &'a str,
    pub contributors: Vec<Contribution>,
    pub metrics: BTreeMap<String, f64>,
    pub status: ModelStatus,
}

impl Versions<'_> {
    /// Stores `new` durably: blob, then the record together with `round` (its round's final
    /// state) in one transaction, then a flush. Storing the same version again after a crash
    /// is a no-op.
    pub fn store(
        &self,
        new: NewVersion<'_>,
        round: Option<&RoundRecord>,
    ) -> Result<ModelRecord, CoreError> {
        let meta = serde_json::json!({
            "version": new.version,
            "parent": new.parent,
            "round": new.round,
            "strategy": new.strategy,
        });
        let metadata = BTreeMap::from([(METADATA_KEY.to_string(), meta.to_string())]);
        // The content hash is a pass of its own over the model: taken on a second thread
        // while the file is serialised, hashed and written.
        let model = new.model;
        let (stored, hash) = std::thread::scope(|s| {
            let hash = s.spawn(|| model.content_hash());
            let stored = model
                .to_safetensors_bytes(&metadata)
                .map_err(CoreError::from)
                .and_then(|bytes| Ok((self.blobs.put_bytes(&bytes)?, bytes.len())));
            let hash = hash
                .join()
                .map_err(|_| CoreError::Internal("hashing the model panicked".into()));
            (stored, hash)
        });
        let (blob_sha256, size) = stored?;
        let hash = hash?;
        crate::failpoint::hit(crate::failpoint::PUBLISH_AFTER_BLOB);
        let record = ModelRecord {
            version: new.version,
            parent: new.parent,
            round: new.round,
            content_hash: ModelHashText(hash),
            blob_sha256,
            size_bytes: size as u64,
            signature: manifest::sign_model(self.signer, new.version, &hash)?,
            strategy: new.strategy.to_string(),
            contributors: new.contributors,
            metrics: new.metrics,
            created_unix_ms: now_unix_ms(),
            status: new.status,
        };
        self.store.insert_model(&record, round)?;
        crate::failpoint::hit(crate::failpoint::PUBLISH_AFTER_RECORD);
        self.store.flush_blocking()?;
        crate::failpoint::hit(crate::failpoint::PUBLISH_AFTER_FLUSH);
        Ok(record)
    }

    /// Loads version `version`, checking the blob's digest and the model's content hash.
    pub fn load(&self, version: u64) -> Result<(ModelRecord, ModelState), CoreError> {
        let record = self
            .store
            .model(version)?
            .ok_or(CoreError::UnknownVersion(version))?;
        let bytes = self.blobs.read(&record.blob_sha256)?;
        let (model, _) = ModelState::from_safetensors_bytes(&bytes)?;
        if model.content_hash() != record.content_hash.0 {
            return Err(CoreError::Internal(format!(
                "version {version} does not match its recorded content hash; restore data_dir from a backup"
            )));
        }
        Ok((record, model))
    }

    /// Stores the checkpoint at `path` as version 1, promoted. Running it again with the same
    /// model is a no-op; with another model, or once rounds produced versions, it is refused.
    pub fn init(&self, path: &Path) -> Result<ModelRecord, CoreError> {
        let (model, _) = ModelState::load_safetensors(path)?;
        if model.is_empty() {
            return Err(CoreError::Malformed(format!(
                "{} holds no tensors; export the model's state dict",
                path.display()
            )));
        }
        if let Some(latest) = self.store.latest_model()? {
            let first = self.store.model(1)?;
            return match first {
                Some(v1) if latest.version == 1 && v1.content_hash.0 == model.content_hash() => {
                    Ok(v1)
                }
                _ => Err(CoreError::AlreadyInitialised(latest.version)),
            };
        }
        let record = self.store(
            NewVersion {
                version: 1,
                model: &model,
                parent: 0,
                round: 0,
                strategy: "initial",
                contributors: Vec::new(),
                metrics: BTreeMap::new(),
                status: ModelStatus::Promoted,
            },
            None,
        )?;
        self.store.commit_promotion(&[], &[1])?;
        self.store.flush_blocking()?;
        Ok(record)
    }
}
