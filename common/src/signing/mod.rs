//! Ed25519 signing: key pairs and their files, detached signatures, and signed JSON manifests.
//!
//! File formats, chosen so an operator can inspect them with standard tools:
//! - private key: PKCS#8 in PEM (`-----BEGIN PRIVATE KEY-----`), file mode 0600. Loading refuses a
//!   file that group or others may access, the way ssh does, and says which `chmod` to run.
//! - public key: the raw 32-byte Ed25519 key as 64 lowercase hex digits and a newline, short
//!   enough to paste into a config file or compare by eye.
//!
//! [`SignedManifest`] signs canonical JSON with these keys.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::fsutil;

mod manifest;

pub use manifest::{canonical_json, SignedManifest};

/// Length of an Ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature in bytes.
pub const SIGNATURE_LEN: usize = 64;

/// Everything that can go wrong with keys, signatures and signed manifests.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{what} file {} does not exist; create keys with `fedinspect-certs init` or fix the path", path.display())]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot access {what} file {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("private key {} may be read by other users (mode {mode:03o}); run `chmod 600 {}`", path.display(), path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("{} is not a valid {what} ({reason}); restore it or generate a new key pair", path.display())]
    Malformed {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("'{text}' is not a valid {what} ({reason})")]
    BadEncoding {
        what: &'static str,
        text: String,
        reason: String,
    },
    #[error("cannot generate an Ed25519 key pair: the system random source failed")]
    KeyGeneration,
    #[error("signature does not verify: the data was altered or signed by another key")]
    BadSignature,
    #[error("manifest was signed by key {found} but key {expected} was expected; check which coordinator public key is configured")]
    WrongKey { expected: String, found: String },
    #[error("manifest is not valid JSON for this type: {0}")]
    Json(String),
}

/// An Ed25519 private key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey([u8; PUBLIC_KEY_LEN]);

/// A detached Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; SIGNATURE_LEN]);

impl SigningKey {
    /// Generates a fresh key pair from the system random source.
    pub fn generate() -> Result<Self, SigningError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| SigningError::KeyGeneration)?;
        Self::from_pkcs8(pkcs8.as_ref()).map_err(|_| SigningError::KeyGeneration)
    }

    /// Reads a PKCS#8 DER key (v1 as written by openssl, or v2 as written by ring).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, SigningError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| {
            SigningError::BadEncoding {
                what: "Ed25519 PKCS#8 key",
                text: format!("<{} bytes>", der.len()),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// Loads a private key file, refusing one that others may read.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        const WHAT: &str = "Ed25519 private key";
        if let Some(mode) = insecure_mode(path).map_err(|e| file_error(WHAT, path, e))? {
            return Err(SigningError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let bytes = std::fs::read(path).map_err(|e| file_error(WHAT, path, e))?;
        let malformed = |reason: String| SigningError::Malformed {
            what: WHAT,
            path: path.to_path_buf(),
            reason,
        };
        let der = match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            Ok(_) => return Err(malformed("a PEM key but not PKCS#8".into())),
            Err(e) => return Err(malformed(format!("no PEM private key: {e}"))),
        };
        Self::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| match e {
            SigningError::BadEncoding { reason, .. } => malformed(reason),
            other => other,
        })
    }

    /// Writes the key as PKCS#8 PEM, atomically, with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), SigningError> {
        let pem = pkcs8_pem(&self.pkcs8)?;
        fsutil::write_atomic_with_mode(path, Some(0o600), |w| w.write_all(pem.as_bytes())).map_err(
            |source| SigningError::Io {
                what: "Ed25519 private key",
                path: path.to_path_buf(),
                source,
            },
        )
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let mut raw = [0u8; PUBLIC_KEY_LEN];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(raw)
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        let mut raw = [0u8; SIGNATURE_LEN];
        raw.copy_from_slice(self.pair.sign(message).as_ref());
        Signature(raw)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.verifying_key().key_id())
    }
}

impl VerifyingKey {
    pub fn from_bytes(raw: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(raw)
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    pub fn from_hex(text: &str) -> Result<Self, SigningError> {
        decode_fixed(text, "hex Ed25519 public key").map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 16 hex digits of SHA-256 over the key: short, stable, safe to log.
    pub fn key_id(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex::encode(&d.as_ref()[..8])
    }

    /// Loads a public key file (64 hex digits, surrounding whitespace ignored).
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        const WHAT: &str = "Ed25519 public key";
        let text = std::fs::read_to_string(path).map_err(|e| file_error(WHAT, path, e))?;
        Self::from_hex(text.trim()).map_err(|e| SigningError::Malformed {
            what: WHAT,
            path: path.to_path_buf(),
            reason: match e {
                SigningError::BadEncoding { reason, .. } => reason,
                other => other.to_string(),
            },
        })
    }

    /// Writes the key as hex and a newline, atomically.
    pub fn save(&self, path: &Path) -> Result<(), SigningError> {
        let text = format!("{}\n", self.to_hex());
        fsutil::write_bytes_atomic(path, text.as_bytes()).map_err(|source| SigningError::Io {
            what: "Ed25519 public key",
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn verify(&self, message: &[u8], sig: &Signature) -> Result<(), SigningError> {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, &sig.0)
            .map_err(|_| SigningError::BadSignature)
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.to_hex())
    }
}

impl Signature {
    pub fn from_bytes(raw: [u8; SIGNATURE_LEN]) -> Self {
        Self(raw)
    }

    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }

    pub fn from_hex(text: &str) -> Result<Self, SigningError> {
        decode_fixed(text, "hex Ed25519 signature").map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_hex())
    }
}

fn decode_fixed<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], SigningError> {
    let bad = |reason: String| SigningError::BadEncoding {
        what,
        text: text.chars().take(80).collect(),
        reason,
    };
    let bytes = hex::decode(text).map_err(|e| bad(e.to_string()))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| bad(format!("{len} bytes, expected {N}")))
}

fn pkcs8_pem(der: &[u8]) -> Result<String, SigningError> {
    // rcgen already writes our TLS keys; reuse its PEM encoder rather than carry a second one.
    let key = PrivatePkcs8KeyDer::from(der.to_vec());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
        .map(|k| k.serialize_pem())
        .map_err(|e| SigningError::BadEncoding {
            what: "Ed25519 PKCS#8 key",
            text: format!("<{} bytes>", der.len()),
            reason: e.to_string(),
        })
}

fn file_error(what: &'static str, path: &Path, e: io::Error) -> SigningError {
    if e.kind() == io::ErrorKind::NotFound {
        SigningError::Missing {
            what,
            path: path.to_path_buf(),
        }
    } else {
        SigningError::Io {
            what,
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// The permission bits of a private-key file if group or others may access it, `None` if only
/// its owner may (always `None` off unix, where the check does not apply).
pub(crate) fn insecure_mode(path: &Path) -> io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        Ok((mode & 0o077 != 0).then_some(mode))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let (kp, pp) = (dir.path().join("s.key"), dir.path().join("s.pub"));
        let key = SigningKey::generate().unwrap();
        key.save(&kp).unwrap();
        key.verifying_key().save(&pp).unwrap();
        let key2 = SigningKey::load(&kp).unwrap();
        let vk = VerifyingKey::load(&pp).unwrap();
        assert_eq!(vk, key.verifying_key());
        assert_eq!(key2.verifying_key(), vk);
        let sig = key2.sign(b"hello");
        vk.verify(b"hello", &sig).unwrap();
        assert_eq!(Signature::from_hex(&sig.to_hex()).unwrap(), sig);
        let text = std::fs::read_to_string(&kp).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        assert_eq!(std::fs::read_to_string(&pp).unwrap().trim().len(), 64);
    }

    #[test]
    fn accepts_openssl_style_pkcs8_v1_keys() {
        // `openssl genpkey -algorithm ed25519` writes PKCS#8 v1: a fixed prefix and the seed.
        let mut der = hex::decode("302e020100300506032b657004220420").unwrap();
        der.extend_from_slice(&[7u8; 32]);
        let key = SigningKey::from_pkcs8(&der).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.key");
        key.save(&path).unwrap();
        let back = SigningKey::load(&path).unwrap();
        assert_eq!(back.verifying_key(), key.verifying_key());
        back.verifying_key().verify(b"m", &key.sign(b"m")).unwrap();
    }

    #[test]
    fn tampered_message_and_wrong_key_fail() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let sig = key.sign(b"weights v1");
        let err = key.verifying_key().verify(b"weights v2", &sig).unwrap_err();
        assert!(matches!(err, SigningError::BadSignature), "{err}");
        let err = other
            .verifying_key()
            .verify(b"weights v1", &sig)
            .unwrap_err();
        assert!(matches!(err, SigningError::BadSignature), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn refuses_group_readable_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kp = dir.path().join("s.key");
        SigningKey::generate().unwrap().save(&kp).unwrap();
        let mode = std::fs::metadata(&kp).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = SigningKey::load(&kp).unwrap_err();
        assert!(
            matches!(err, SigningError::InsecurePermissions { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn missing_and_malformed_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.key");
        let err = SigningKey::load(&missing).unwrap_err();
        assert!(matches!(err, SigningError::Missing { .. }), "{err}");
        let err = VerifyingKey::load(&missing).unwrap_err();
        assert!(matches!(err, SigningError::Missing { .. }), "{err}");

        let bad = dir.path().join("bad.key");
        fsutil::write_atomic_with_mode(&bad, Some(0o600), |w| w.write_all(b"not a key")).unwrap();
        let err = SigningKey::load(&bad).unwrap_err();
        assert!(matches!(err, SigningError::Malformed { .. }), "{err}");
        let bad_pub = dir.path().join("bad.pub");
        std::fs::write(&bad_pub, "abcd\n").unwrap();
        let err = VerifyingKey::load(&bad_pub).unwrap_err();
        assert!(matches!(err, SigningError::Malformed { .. }), "{err}");
    }
}
