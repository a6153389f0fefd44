//! Verifying a bundle directory against a pinned coordinator key: the signature first (before
//! the manifest is even parsed), then the listing (nothing missing, nothing unlisted, plain files
//! only), then every file's size and SHA-256.

use std::fs;
use std::path::{Path, PathBuf};

use super::files::sha256_file;
use super::manifest::BundleManifest;
use super::signature::{manifest_sha256, verify_manifest, ManifestSignature, SignatureProblem};
use super::{BundleError, FORMAT, MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE};
use crate::signing::VerifyingKey;

/// A bundle whose signature and files were checked.
#[derive(Clone, Debug)]
pub struct VerifiedBundle {
    pub dir: PathBuf,
    pub manifest: BundleManifest,
    /// Hex SHA-256 of `manifest.json`, what install tasks name.
    pub manifest_sha256: String,
    /// Key id of the coordinator key that signed it.
    pub key_id: String,
}

impl VerifiedBundle {
    /// The path of file `name` of the bundle.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Verifies the bundle in `dir` with `key`; every refusal names the file and what to do.
pub fn verify_bundle(dir: &Path, key: &VerifyingKey) -> Result<VerifiedBundle, BundleError> {
    let meta = fs::metadata(dir).map_err(|e| BundleError::NotADirectory {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !meta.is_dir() {
        return Err(BundleError::NotADirectory {
            path: dir.to_path_buf(),
            reason: "not a directory".into(),
        });
    }
    let (bytes, sig) = read_signed(dir)?;
    verify_manifest(&bytes, &sig, key).map_err(|p| match p {
        SignatureProblem::Malformed(reason) => BundleError::SignatureMalformed {
            path: dir.join(SIGNATURE_FILE),
            reason,
        },
        SignatureProblem::WrongKey { expected, found } => BundleError::WrongKey {
            dir: dir.to_path_buf(),
            expected,
            found,
        },
        SignatureProblem::BadSignature => BundleError::BadSignature {
            dir: dir.to_path_buf(),
        },
    })?;
    let manifest = parse_manifest(&dir.join(MANIFEST_FILE), &bytes)?;
    check_listing(dir, &manifest)?;
    check_contents(dir, &manifest)?;
    Ok(VerifiedBundle {
        dir: dir.to_path_buf(),
        manifest,
        manifest_sha256: manifest_sha256(&bytes),
        key_id: sig.key_id,
    })
}

/// Reads `manifest.json` (bounded) and `manifest.sig`.
fn read_signed(dir: &Path) -> Result<(Vec<u8>, ManifestSignature), BundleError> {
    let bytes = read_bounded(dir, MANIFEST_FILE)?;
    let sig_bytes = read_bounded(dir, SIGNATURE_FILE)?;
    let sig: ManifestSignature =
        serde_json::from_slice(&sig_bytes).map_err(|e| BundleError::SignatureMalformed {
            path: dir.join(SIGNATURE_FILE),
            reason: e.to_string(),
        })?;
    Ok((bytes, sig))
}

fn read_bounded(dir: &Path, file: &'static str) -> Result<Vec<u8>, BundleError> {
    let path = dir.join(file);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BundleError::MissingManifest {
                dir: dir.to_path_buf(),
                file,
            })
        }
        Err(e) => return Err(BundleError::io("read", path, e)),
    };
    if !meta.is_file() {
        return Err(BundleError::NotARegularFile {
            dir: dir.to_path_buf(),
            name: file.to_string(),
            kind: kind_of(&meta),
        });
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(BundleError::ManifestTooLarge {
            path,
            size: meta.len(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    fs::read(&path).map_err(|e| BundleError::io("read", path, e))
}

/// Parses signed manifest bytes: the format first, so that a newer bundle is named as such
/// rather than as a malformed one.
pub(crate) fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<BundleManifest, BundleError> {
    let malformed = |reason: String| BundleError::ManifestMalformed {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(BundleError::UnsupportedFormat {
                found: other.to_string(),
            })
        }
        None => return Err(malformed("no 'format' field".into())),
    }
    // From the bytes, not from `value`: a `Value` keeps only the last of duplicate keys, so a
    // signed manifest saying `"size"` twice would mean what this reader picked, not what any
    // other reader picks. The struct parser refuses duplicate fields (found by fuzzing).
    let manifest: BundleManifest =
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    manifest.check().map_err(|p| malformed(p.join("; ")))?;
    Ok(manifest)
}

/// Every entry of `dir` is a plain file the manifest lists (or the manifest and signature), and
/// every listed file is there.
fn check_listing(dir: &Path, manifest: &BundleManifest) -> Result<(), BundleError> {
    let entries = fs::read_dir(dir).map_err(|e| BundleError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| BundleError::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry
            .metadata()
            .map_err(|e| BundleError::io("inspect", entry.path(), e))?;
        let known =
            name == MANIFEST_FILE || name == SIGNATURE_FILE || manifest.file(&name).is_some();
        if !known {
            return Err(BundleError::UnexpectedFile {
                dir: dir.to_path_buf(),
                name,
            });
        }
        if !meta.is_file() {
            return Err(BundleError::NotARegularFile {
                dir: dir.to_path_buf(),
                name,
                kind: kind_of(&meta),
            });
        }
    }
    for f in &manifest.files {
        if !dir.join(&f.name).exists() {
            return Err(BundleError::MissingFile {
                dir: dir.to_path_buf(),
                name: f.name.clone(),
            });
        }
    }
    Ok(())
}

/// Sizes first (cheap, and a truncated download is named as such), then hashes.
fn check_contents(dir: &Path, manifest: &BundleManifest) -> Result<(), BundleError> {
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let len = fs::metadata(&path)
            .map_err(|e| BundleError::io("inspect", &path, e))?
            .len();
        if len != f.size {
            return Err(BundleError::SizeMismatch {
                dir: dir.to_path_buf(),
                name: f.name.clone(),
                expected: f.size,
                found: len,
            });
        }
    }
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let (hash, _) = sha256_file(&path).map_err(|e| BundleError::io("read", &path, e))?;
        if hash != f.sha256 {
            return Err(BundleError::HashMismatch {
                dir: dir.to_path_buf(),
                name: f.name.clone(),
                expected: f.sha256.clone(),
                found: hash,
            });
        }
    }
    Ok(())
}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a file"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{seeds, Target};

    /// A valid manifest as a coordinator writes it (pretty JSON).
    fn valid_manifest() -> String {
        let seed = seeds()
            .into_iter()
            .find(|s| s.target == Target::BundleManifest && s.name == "minimal")
            .expect("the fuzz seeds hold a minimal manifest");
        String::from_utf8(seed.bytes).expect("a manifest is UTF-8")
    }

    /// Fuzzing found that duplicate keys were read as the last value (through a JSON `Value`):
    /// a signed manifest must mean one thing to every reader, so they are refused.
    #[test]
    fn duplicate_keys_in_a_signed_manifest_are_refused() {
        let path = Path::new(MANIFEST_FILE);
        let valid = valid_manifest();
        parse_manifest(path, valid.as_bytes()).expect("the seed manifest parses");
        let twice = [
            (
                "\"model_version\": 3,",
                "\"model_version\": 3,\n  \"model_version\": 4,",
            ),
            (
                "\"role\": \"weights-safetensors\",",
                "\"role\": \"weights-safetensors\",\n      \"size\": 17,",
            ),
        ];
        for (once, duplicated) in twice {
            assert_eq!(valid.matches(once).count(), 1, "{once}");
            let bytes = valid.replacen(once, duplicated, 1);
            match parse_manifest(path, bytes.as_bytes()) {
                Err(BundleError::ManifestMalformed { reason, .. }) => {
                    assert!(reason.contains("duplicate field"), "{reason}")
                }
                other => panic!("{duplicated}: {other:?}"),
            }
        }
    }
}
