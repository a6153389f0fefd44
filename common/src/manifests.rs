//! The two manifests the federation signs, as canonical JSON ([`crate::signing`]): the
//! coordinator's [`ModelManifest`] for every model version, and a plant's [`UpdateManifest`]
//! for every update it uploads. Each holds only what the verifier already knows from the
//! protocol, so either side can rebuild the manifest and check a bare 64-byte signature.

use serde::{Deserialize, Serialize};

use crate::signing::{Signature, SignedManifest, SigningError, SigningKey, VerifyingKey};
use crate::ModelHash;

/// The `kind` of a model manifest.
pub const MODEL_KIND: &str = "fedinspect-model";
/// The `kind` of an update manifest.
pub const UPDATE_KIND: &str = "fedinspect-update";

/// What the coordinator signs for version `version`: a plant learns both fields from a train
/// task and checks the signature with the coordinator key it pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub kind: String,
    pub version: u64,
    /// Hex of the model's [`ModelHash`].
    pub content_hash: String,
}

/// What a plant signs for one update: who sent it, what it was trained from and the exact
/// payload bytes. Metrics are not covered: they are reports, not weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateManifest {
    pub kind: String,
    /// The plant id of the sender's certificate.
    pub plant_id: String,
    /// Hex of the 16-byte update id.
    pub update_id: String,
    pub round: u64,
    pub base_version: u64,
    /// Hex of the base model's [`ModelHash`].
    pub base_hash: String,
    /// Codec family: `f32`, `f16` or `q8` (a q8 block size travels inside the payload).
    pub codec: String,
    pub num_samples: u64,
    /// Hex of the SHA-256 of the encoded delta.
    pub payload_sha256: String,
}

impl ModelManifest {
    pub fn new(version: u64, hash: &ModelHash) -> Self {
        Self {
            kind: MODEL_KIND.to_string(),
            version,
            content_hash: hash.to_hex(),
        }
    }
}

/// The 64-byte signature of version `version` with content `hash`.
pub fn sign_model(
    key: &SigningKey,
    version: u64,
    hash: &ModelHash,
) -> Result<Vec<u8>, SigningError> {
    sign_bare(&ModelManifest::new(version, hash), key)
}

/// Checks `signature` over version `version` with content `hash`.
pub fn verify_model(
    key: &VerifyingKey,
    version: u64,
    hash: &ModelHash,
    signature: &[u8],
) -> Result<(), SigningError> {
    verify_bare(&ModelManifest::new(version, hash), key, signature)
}

impl UpdateManifest {
    /// The 64-byte signature of this manifest.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, SigningError> {
        sign_bare(self, key)
    }

    /// Checks a bare signature over this manifest.
    pub fn verify(&self, key: &VerifyingKey, signature: &[u8]) -> Result<(), SigningError> {
        verify_bare(self, key, signature)
    }
}

fn sign_bare<T: Serialize>(manifest: &T, key: &SigningKey) -> Result<Vec<u8>, SigningError> {
    let signed = SignedManifest::sign(manifest, key)?;
    Ok(Signature::from_hex(&signed.signature)?.as_bytes().to_vec())
}

fn verify_bare<T: Serialize>(
    manifest: &T,
    key: &VerifyingKey,
    signature: &[u8],
) -> Result<(), SigningError> {
    let manifest = serde_json::to_value(manifest).map_err(|e| SigningError::Json(e.to_string()))?;
    let signed = SignedManifest {
        manifest,
        key_id: key.key_id(),
        signature: hex::encode(signature),
    };
    signed.verify(key).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_signature_binds_version_and_hash() {
        let key = SigningKey::generate().unwrap();
        let vk = key.verifying_key();
        let hash = ModelHash([7; 32]);
        let sig = sign_model(&key, 3, &hash).unwrap();
        assert_eq!(sig.len(), 64);
        verify_model(&vk, 3, &hash, &sig).unwrap();
        assert!(verify_model(&vk, 4, &hash, &sig).is_err());
        assert!(verify_model(&vk, 3, &ModelHash([8; 32]), &sig).is_err());
        let other = SigningKey::generate().unwrap().verifying_key();
        assert!(verify_model(&other, 3, &hash, &sig).is_err());
    }

    #[test]
    fn update_signature_binds_every_field() {
        let key = SigningKey::generate().unwrap();
        let m = UpdateManifest {
            kind: UPDATE_KIND.into(),
            plant_id: "plant-1".into(),
            update_id: "00".repeat(16),
            round: 2,
            base_version: 2,
            base_hash: "ab".repeat(32),
            codec: "q8".into(),
            num_samples: 8,
            payload_sha256: "cd".repeat(32),
        };
        let sig = m.sign(&key).unwrap();
        m.verify(&key.verifying_key(), &sig).unwrap();
        let tampered = UpdateManifest {
            num_samples: 9,
            ..m.clone()
        };
        let err = tampered.verify(&key.verifying_key(), &sig).unwrap_err();
        assert!(matches!(err, SigningError::BadSignature), "{err}");
        // A model signature never passes as an update signature (kinds differ).
        let model_sig = sign_model(&key, 2, &ModelHash([0xab; 32])).unwrap();
        assert!(m.verify(&key.verifying_key(), &model_sig).is_err());
    }
}
