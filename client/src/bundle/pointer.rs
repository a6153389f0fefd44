//! `current.json`: which installed bundle runs and which ran before it (the rollback target).
//! It is the one file an install or a rollback changes to switch bundles, written atomically,
//! so after a crash the plant runs either the old bundle or the new one.

use std::io;
use std::path::Path;

use fedinspect_common::fsutil;
use serde::{Deserialize, Serialize};

/// The pointer file's name inside `STATE/bundles`.
pub const POINTER_FILE: &str = "current.json";

/// One installed bundle as the pointer records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    pub id: String,
    pub model_version: u64,
    pub manifest_sha256: String,
    /// RFC 3339 time the bundle became current.
    pub installed_at: String,
    /// Whether its engine was built at this plant (rather than shipped in the bundle).
    pub engine_built_locally: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointer {
    pub current: Option<Slot>,
    pub previous: Option<Slot>,
}

impl Pointer {
    /// Reads `dir/current.json`; an absent file is an empty pointer (nothing installed yet).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(POINTER_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{} is not a bundle pointer ({e}); restore it from a backup or remove it \
                     and install a bundle again",
                    path.display()
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes `dir/current.json` atomically.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        bytes.push(b'\n');
        fsutil::write_bytes_atomic(&dir.join(POINTER_FILE), &bytes)
    }

    /// The ids the pointer keeps (current and previous).
    pub fn kept(&self) -> Vec<&str> {
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .map(|s| s.id.as_str())
            .collect()
    }
}
