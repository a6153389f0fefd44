//! Signed JSON manifests: a value, the id of the key that signed it, and an Ed25519 signature
//! over its canonical JSON form ([`canonical_json`]: object keys sorted, no whitespace),
//! prefixed with a domain tag so a manifest signature is never valid for anything else.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Signature, SigningError, SigningKey, VerifyingKey};

/// Signed before the canonical JSON of every manifest (domain separation).
const MANIFEST_DOMAIN: &[u8] = b"fedinspect-manifest-v1\0";

/// A JSON manifest with the signature over its canonical form and the id of the signing key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedManifest {
    pub manifest: Value,
    /// [`VerifyingKey::key_id`] of the signer, so a wrong key is told apart from a bad signature.
    pub key_id: String,
    /// Hex of the 64-byte signature over the domain tag and [`canonical_json`] of `manifest`.
    pub signature: String,
}

impl SignedManifest {
    /// Signs the canonical JSON form of `manifest`.
    pub fn sign<T: Serialize>(manifest: &T, key: &SigningKey) -> Result<Self, SigningError> {
        let manifest =
            serde_json::to_value(manifest).map_err(|e| SigningError::Json(e.to_string()))?;
        let signature = key.sign(&manifest_message(&manifest)).to_hex();
        Ok(Self {
            manifest,
            key_id: key.verifying_key().key_id(),
            signature,
        })
    }

    /// Checks the signature with `key` and returns the manifest.
    pub fn verify(&self, key: &VerifyingKey) -> Result<&Value, SigningError> {
        let expected = key.key_id();
        if self.key_id != expected {
            return Err(SigningError::WrongKey {
                expected,
                found: self.key_id.clone(),
            });
        }
        let sig = Signature::from_hex(&self.signature)?;
        key.verify(&manifest_message(&self.manifest), &sig)?;
        Ok(&self.manifest)
    }

    /// Checks the signature with `key` and decodes the manifest into `T`.
    pub fn verify_into<T: DeserializeOwned>(&self, key: &VerifyingKey) -> Result<T, SigningError> {
        let value = self.verify(key)?;
        T::deserialize(value).map_err(|e| SigningError::Json(e.to_string()))
    }
}

/// The canonical JSON bytes of `value`: object keys in byte order, no whitespace, numbers and
/// strings as serde_json writes them. Independent of serde_json's `preserve_order` feature.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Writing a scalar into a Vec cannot fail.
    serde_json::to_writer(out, value).expect("serialising a JSON scalar into memory");
}

fn manifest_message(manifest: &Value) -> Vec<u8> {
    let mut msg = MANIFEST_DOMAIN.to_vec();
    msg.extend_from_slice(&canonical_json(manifest));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"z":[3,{"y":true,"x":null}],"c":"é"}}"#).unwrap();
        let text = String::from_utf8(canonical_json(&v)).unwrap();
        assert_eq!(text, r#"{"a":{"c":"é","z":[3,{"x":null,"y":true}]},"b":1}"#);
    }

    #[test]
    fn signed_manifest_round_trip_tamper_and_wrong_key() {
        let key = SigningKey::generate().unwrap();
        let mut m = BTreeMap::new();
        m.insert("model_hash".to_string(), "ab".repeat(32));
        m.insert("version".to_string(), "7".to_string());
        let signed = SignedManifest::sign(&m, &key).unwrap();
        let back: BTreeMap<String, String> = signed.verify_into(&key.verifying_key()).unwrap();
        assert_eq!(back, m);

        // Survives a JSON round trip with keys in another order.
        let json = serde_json::to_string(&signed).unwrap();
        let reread: SignedManifest = serde_json::from_str(&json).unwrap();
        reread.verify(&key.verifying_key()).unwrap();

        let mut tampered = signed.clone();
        tampered.manifest["version"] = Value::String("8".into());
        let err = tampered.verify(&key.verifying_key()).unwrap_err();
        assert!(matches!(err, SigningError::BadSignature), "{err}");

        let other = SigningKey::generate().unwrap();
        let err = signed.verify(&other.verifying_key()).unwrap_err();
        assert!(matches!(err, SigningError::WrongKey { .. }), "{err}");

        // A forged key id does not let another key's signature through.
        let mut forged = SignedManifest::sign(&m, &other).unwrap();
        forged.key_id = key.verifying_key().key_id();
        let err = forged.verify(&key.verifying_key()).unwrap_err();
        assert!(matches!(err, SigningError::BadSignature), "{err}");
    }
}
