//! The model manifest the coordinator signs for every version: `{kind, version,
//! content_hash}` as canonical JSON (common `signing`). It holds only what a plant learns from
//! a train task (version, base hash), so a plant can check a base model's signature with the
//! coordinator's public key from `Register` and nothing else.

use fedinspect_common::signing::{Signature, SignedManifest, SigningError, SigningKey, VerifyingKey};
use fedinspect_common::ModelHash;
use serde::{Deserialize, Serialize};

/// The `kind` of a model manifest.
pub const MODEL_KIND: &str = "fedinspect-model";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub kind: String,
    pub version: u64,
    /// Hex of the model's [`ModelHash`].
    pub content_hash: String,
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
pub fn sign_model(key: &SigningKey, version: u64, hash: &ModelHash) -> Result<Vec<u8>, SigningError> {
    let signed = SignedManifest::sign(&ModelManifest::new(version, hash), key)?;
    Ok(Signature::from_hex(&signed.signature)?.as_bytes().to_vec())
}

/// Checks `signature` over version `version` with content `hash`.
pub fn verify_model(
    key: &VerifyingKey,
    version: u64,
    hash: &ModelHash,
    signature: &[u8],
) -> Result<(), SigningError> {
    let manifest = serde_json::to_value(ModelManifest::new(version, hash))
        .map_err(|e| SigningError::Json(e.to_string()))?;
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
    fn signature_binds_version_and_hash() {
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
}
