//! `manifest.sig`: a detached Ed25519 signature over the exact bytes of `manifest.json`, so an
//! integrator can check a bundle with any Ed25519 library (sign `SIGNATURE_DOMAIN` followed by
//! the file's bytes) without reproducing a canonical JSON form.
//!
//! The file is JSON: `{"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<128 hex>"}`;
//! `key_id` ([`VerifyingKey::key_id`]) tells a wrong key apart from a bad signature.

use serde::{Deserialize, Serialize};

use super::files::sha256_hex;
use crate::signing::{Signature, SigningKey, VerifyingKey};

/// Signed before the manifest bytes, so a bundle signature is valid for nothing else.
pub const SIGNATURE_DOMAIN: &[u8] = b"fedinspect-bundle-manifest-v1\0";
/// The only algorithm written and read.
pub const ALGORITHM: &str = "ed25519";

/// The content of `manifest.sig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    pub algorithm: String,
    pub key_id: String,
    pub signature: String,
}

/// Why a signature was refused (the caller adds the bundle's path).
#[derive(Debug, PartialEq, Eq)]
pub enum SignatureProblem {
    Malformed(String),
    WrongKey { expected: String, found: String },
    BadSignature,
}

/// Signs the bytes of a manifest.
pub fn sign_manifest(manifest_bytes: &[u8], key: &SigningKey) -> ManifestSignature {
    ManifestSignature {
        algorithm: ALGORITHM.to_string(),
        key_id: key.verifying_key().key_id(),
        signature: key.sign(&message(manifest_bytes)).to_hex(),
    }
}

/// Checks `sig` over `manifest_bytes` with the pinned `key`.
pub fn verify_manifest(
    manifest_bytes: &[u8],
    sig: &ManifestSignature,
    key: &VerifyingKey,
) -> Result<(), SignatureProblem> {
    if sig.algorithm != ALGORITHM {
        return Err(SignatureProblem::Malformed(format!(
            "algorithm '{}' is not '{ALGORITHM}'",
            sig.algorithm
        )));
    }
    let expected = key.key_id();
    if sig.key_id != expected {
        return Err(SignatureProblem::WrongKey {
            expected,
            found: sig.key_id.clone(),
        });
    }
    let signature = Signature::from_hex(&sig.signature)
        .map_err(|e| SignatureProblem::Malformed(e.to_string()))?;
    key.verify(&message(manifest_bytes), &signature)
        .map_err(|_| SignatureProblem::BadSignature)
}

/// Hex SHA-256 of the manifest bytes: what an install task names (`manifest_sha256`).
pub fn manifest_sha256(manifest_bytes: &[u8]) -> String {
    sha256_hex(manifest_bytes)
}

fn message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut msg = SIGNATURE_DOMAIN.to_vec();
    msg.extend_from_slice(manifest_bytes);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_binds_the_exact_bytes_and_the_key() {
        let key = SigningKey::generate().unwrap();
        let vk = key.verifying_key();
        let sig = sign_manifest(b"{\"a\":1}", &key);
        verify_manifest(b"{\"a\":1}", &sig, &vk).unwrap();
        // One byte of whitespace is a different manifest.
        assert_eq!(
            verify_manifest(b"{\"a\": 1}", &sig, &vk),
            Err(SignatureProblem::BadSignature)
        );
        let other = SigningKey::generate().unwrap().verifying_key();
        assert!(matches!(
            verify_manifest(b"{\"a\":1}", &sig, &other),
            Err(SignatureProblem::WrongKey { .. })
        ));
        let mut bad = sig.clone();
        bad.signature = "zz".into();
        assert!(matches!(
            verify_manifest(b"{\"a\":1}", &bad, &vk),
            Err(SignatureProblem::Malformed(_))
        ));
    }
}
