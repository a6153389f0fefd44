//! The plant's state folder, every file written atomically (`fsutil`):
//!
//! ```text
//! STATE/
//!   plant-signing.key  .pub           the plant's Ed25519 key (config.rs creates it)
//!   models/<content hash>.safetensors the base model of the latest task, checked by hash on use
//!   pending/update.json  update.delta the update being delivered: header (with its update id)
//!                                     and payload, saved before its first byte is sent
//!   residual.safetensors              q8/f16 error feedback: what the coordinator did not get
//!                                     of the deltas already delivered
//!   residual.next.safetensors         the residual after the pending update, made current
//!                                     once the coordinator acknowledges that update
//!   bundles/                          installed inference bundles (`crate::bundle`)
//!   bundle-downloads/<id>.tar         a bundle archive between download and install
//!   engine-cache/                     TensorRT engines built here (`bundle::local_engines`)
//! ```
//!
//! A pending update survives restarts and broken connections: it is sent again with the same
//! update id until the coordinator acknowledges it (or answers that it is a duplicate), or
//! refuses it for good.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedinspect_common::delta::{Codec, Layout};
use fedinspect_common::{fsutil, ModelError, ModelHash, ModelState};
use serde::{Deserialize, Serialize};

use super::rpc::sha256;
use super::types::UpdateHeader;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {}: {source}; check the state folder's permissions and free space", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Model {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
}

/// An update saved before sending.
#[derive(Clone, Debug)]
pub struct Pending {
    pub header: UpdateHeader,
    pub payload: Arc<[u8]>,
}

pub struct StateDir {
    root: PathBuf,
}

/// `pending/update.json` as written.
#[derive(Serialize, Deserialize)]
struct PendingFile {
    update_id: String,
    round: u64,
    base_version: u64,
    base_hash: String,
    codec: String,
    num_samples: u64,
    payload_bytes: u64,
    payload_sha256: String,
    plant_signature: String,
    metrics: BTreeMap<String, f64>,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<Self, StateError> {
        for dir in [root.join("models"), root.join("pending")] {
            std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
                action: "create",
                path: dir,
                source,
            })?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn model_path(&self, hash: &ModelHash) -> PathBuf {
        self.root
            .join("models")
            .join(format!("{}.safetensors", hash.to_hex()))
    }

    /// The cached model with content hash `hash`; a file that does not hash to its name is
    /// removed (and reported as absent) so that it is downloaded again.
    pub fn cached_model(&self, hash: &ModelHash) -> Option<ModelState> {
        let path = self.model_path(hash);
        let bytes = std::fs::read(&path).ok()?;
        match ModelState::from_safetensors_bytes(&bytes) {
            Ok((model, _)) if model.content_hash() == *hash => Some(model),
            outcome => {
                let why = match outcome {
                    Ok(_) => "its content hash differs from its name".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(path = %path.display(), reason = %why, "cached model is corrupt; downloading it again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores downloaded model bytes under their content hash and drops every other cached
    /// model (only the latest base is ever trained from).
    pub fn store_model(&self, hash: &ModelHash, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.model_path(hash);
        fsutil::write_bytes_atomic(&path, bytes).map_err(|source| StateError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        if let Ok(entries) = std::fs::read_dir(self.root.join("models")) {
            for entry in entries.flatten() {
                if entry.path() != path {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// The pending update, if a complete and intact one is saved; a damaged one is removed.
    pub fn pending(&self) -> Option<Pending> {
        let json = self.pending_json();
        let text = std::fs::read_to_string(&json).ok()?;
        match parse_pending(&text).and_then(|header| {
            let payload = std::fs::read(self.pending_payload()).map_err(|e| e.to_string())?;
            if sha256(&payload) != header.payload_sha256
                || payload.len() as u64 != header.payload_bytes
            {
                return Err("the payload does not match its header".into());
            }
            Ok(Pending {
                header,
                payload: payload.into(),
            })
        }) {
            Ok(p) => Some(p),
            Err(why) => {
                tracing::warn!(reason = %why, "the saved pending update is damaged; dropping it");
                self.drop_pending();
                None
            }
        }
    }

    /// Saves an update and the residual that follows from it, before anything is sent: the
    /// residual, then the payload, then the header, which makes the update pending.
    pub fn save_pending(&self, pending: &Pending, residual: &ModelState) -> Result<(), StateError> {
        let next = self.residual_next();
        residual
            .save_safetensors(&next, &BTreeMap::new())
            .map_err(|source| StateError::Model { path: next, source })?;
        let payload = self.pending_payload();
        fsutil::write_bytes_atomic(&payload, &pending.payload).map_err(|source| {
            StateError::Io {
                action: "write",
                path: payload,
                source,
            }
        })?;
        let json = self.pending_json();
        let text = serde_json::to_vec_pretty(&pending_file(&pending.header))
            .expect("a pending header serialises to JSON");
        fsutil::write_bytes_atomic(&json, &text).map_err(|source| StateError::Io {
            action: "write",
            path: json,
            source,
        })
    }

    /// The coordinator holds the pending update: its residual becomes current.
    pub fn delivered(&self) -> Result<(), StateError> {
        let next = self.residual_next();
        if next.exists() {
            let current = self.residual_path();
            std::fs::rename(&next, &current).map_err(|source| StateError::Io {
                action: "rename",
                path: next,
                source,
            })?;
            let _ = fsutil::sync_dir(&self.root);
        }
        self.drop_pending();
        Ok(())
    }

    /// Forgets the pending update and its residual (refused for good, or damaged); the
    /// current residual stays, as nothing of it was delivered.
    pub fn drop_pending(&self) {
        // The header goes first: without it nothing is pending, whatever else is left.
        for path in [
            self.pending_json(),
            self.pending_payload(),
            self.residual_next(),
        ] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove");
                }
            }
        }
    }

    /// The current residual, if it fits `layout` (after an architecture change it does not,
    /// and is dropped).
    pub fn residual(&self, layout: &Layout) -> Option<ModelState> {
        let path = self.residual_path();
        let (model, _) = ModelState::load_safetensors(&path).ok()?;
        if Layout::of(&model) == *layout {
            Some(model)
        } else {
            tracing::warn!(path = %path.display(), "the residual does not fit the model's layout; dropping it");
            let _ = std::fs::remove_file(&path);
            None
        }
    }

    fn residual_path(&self) -> PathBuf {
        self.root.join("residual.safetensors")
    }

    fn residual_next(&self) -> PathBuf {
        self.root.join("residual.next.safetensors")
    }

    fn pending_json(&self) -> PathBuf {
        self.root.join("pending").join("update.json")
    }

    fn pending_payload(&self) -> PathBuf {
        self.root.join("pending").join("update.delta")
    }
}

fn pending_file(h: &UpdateHeader) -> PendingFile {
    PendingFile {
        update_id: hex::encode(h.update_id),
        round: h.round,
        base_version: h.base_version,
        base_hash: h.base_hash.to_hex(),
        codec: h.codec.to_string(),
        num_samples: h.num_samples,
        payload_bytes: h.payload_bytes,
        payload_sha256: hex::encode(h.payload_sha256),
        plant_signature: hex::encode(&h.plant_signature),
        metrics: h.metrics.clone(),
    }
}

fn parse_pending(text: &str) -> Result<UpdateHeader, String> {
    let f: PendingFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let fixed = |what: &str, text: &str, out: &mut [u8]| {
        hex::decode_to_slice(text, out).map_err(|e| format!("{what}: {e}"))
    };
    let mut update_id = [0u8; 16];
    fixed("update_id", &f.update_id, &mut update_id)?;
    let mut payload_sha256 = [0u8; 32];
    fixed("payload_sha256", &f.payload_sha256, &mut payload_sha256)?;
    Ok(UpdateHeader {
        update_id,
        round: f.round,
        base_version: f.base_version,
        base_hash: ModelHash::from_hex(&f.base_hash).map_err(|e| e.to_string())?,
        codec: f.codec.parse::<Codec>().map_err(|e| e.to_string())?,
        num_samples: f.num_samples,
        payload_bytes: f.payload_bytes,
        payload_sha256,
        plant_signature: hex::decode(&f.plant_signature).map_err(|e| e.to_string())?,
        metrics: f.metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedinspect_common::Tensor;

    fn model(v: f32) -> ModelState {
        let mut m = ModelState::new();
        m.insert("w", Tensor::new(vec![2], vec![v, -v]).unwrap())
            .unwrap();
        m
    }

    fn header(payload: &[u8]) -> UpdateHeader {
        UpdateHeader {
            update_id: [3; 16],
            round: 2,
            base_version: 2,
            base_hash: ModelHash([4; 32]),
            codec: Codec::q8(),
            num_samples: 8,
            payload_bytes: payload.len() as u64,
            payload_sha256: sha256(payload).try_into().unwrap(),
            plant_signature: vec![5; 64],
            metrics: BTreeMap::from([("train_loss".to_string(), 1.5)]),
        }
    }

    #[test]
    fn model_cache_detects_corruption_and_keeps_only_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let (a, b) = (model(1.0), model(2.0));
        let bytes = |m: &ModelState| m.to_safetensors_bytes(&BTreeMap::new()).unwrap();
        state.store_model(&a.content_hash(), &bytes(&a)).unwrap();
        assert_eq!(state.cached_model(&a.content_hash()), Some(a.clone()));
        // A file whose content does not hash to its name is removed.
        std::fs::write(state.model_path(&b.content_hash()), bytes(&a)).unwrap();
        assert_eq!(state.cached_model(&b.content_hash()), None);
        assert!(!state.model_path(&b.content_hash()).exists());
        state.store_model(&b.content_hash(), &bytes(&b)).unwrap();
        assert!(!state.model_path(&a.content_hash()).exists());
        assert_eq!(state.cached_model(&b.content_hash()), Some(b));
    }

    #[test]
    fn pending_update_round_trips_and_commits_its_residual() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let layout = Layout::of(&model(0.0));
        assert!(state.pending().is_none());
        let payload: Arc<[u8]> = vec![9u8; 100].into();
        let p = Pending {
            header: header(&payload),
            payload: payload.clone(),
        };
        state.save_pending(&p, &model(0.25)).unwrap();
        // Reopened (a restart): the same update id and bytes, the residual not yet current.
        let state = StateDir::open(dir.path()).unwrap();
        let back = state.pending().unwrap();
        assert_eq!(back.header, p.header);
        assert_eq!(&*back.payload, &*payload);
        assert_eq!(state.residual(&layout), None);
        state.delivered().unwrap();
        assert!(state.pending().is_none());
        assert_eq!(state.residual(&layout), Some(model(0.25)));

        // A refused update leaves the current residual alone.
        state.save_pending(&p, &model(0.5)).unwrap();
        state.drop_pending();
        assert!(state.pending().is_none());
        assert_eq!(state.residual(&layout), Some(model(0.25)));
    }

    #[test]
    fn damaged_pending_update_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let payload: Arc<[u8]> = vec![1u8; 10].into();
        let p = Pending {
            header: header(&payload),
            payload,
        };
        state.save_pending(&p, &model(0.0)).unwrap();
        std::fs::write(dir.path().join("pending/update.delta"), [2u8; 10]).unwrap();
        assert!(state.pending().is_none());
        assert!(!dir.path().join("pending/update.json").exists());
    }
}
