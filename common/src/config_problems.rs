//! Collecting every problem of a configuration file at once (the two-phase RawConfig →
//! Config resolution of the coordinator and the client), with messages that say what to do;
//! reading such a file ([`load_config`]) and the `[tls]` section both files share.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::tls::TlsFiles;

/// The `[tls]` section of `coordinator.toml` and `plant.toml` as written: the CA to trust, the
/// node's certificate and its key.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML for {for_what}: {message}", path.display())]
    Parse {
        path: PathBuf,
        /// Whose file it is, e.g. "a plant".
        for_what: &'static str,
        message: String,
    },
    #[error("config file {} has {} problem(s):\n  - {}", path.display(), problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// Reads `path`, parses it as the raw, all-optional `R` and resolves it with `resolve`,
/// relative paths taken against the file's folder. `for_what` names whose file it is in a
/// parse error ("a plant", "the coordinator").
pub fn load_config<R: DeserializeOwned, T>(
    path: &Path,
    for_what: &'static str,
    resolve: impl FnOnce(R, &Path) -> Result<T, Vec<String>>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let raw: R = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        for_what,
        message: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    resolve(raw, base).map_err(|problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    })
}

/// Problems found while resolving a config file; reported together, never one at a time.
pub struct Problems {
    list: Vec<String>,
    /// The commented example file a user is pointed to, e.g. `plant.example.toml`.
    example: &'static str,
    /// What to do about a configured file that does not exist.
    missing_file_hint: &'static str,
}

impl Problems {
    pub fn new(example: &'static str, missing_file_hint: &'static str) -> Self {
        Self {
            list: Vec::new(),
            example,
            missing_file_hint,
        }
    }

    pub fn push(&mut self, problem: String) {
        self.list.push(problem);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.list
    }

    /// Records a missing required field; returns `None` so callers can `return` it.
    pub fn missing<T>(&mut self, field: &str, what: &str) -> Option<T> {
        self.push(format!("{field}: missing; set it to {what}"));
        None
    }

    /// The three files of `[tls]`, resolved against `base`, if all are set and exist (each
    /// missing one reported as `tls.ca`, `tls.cert` or `tls.key`).
    pub fn tls_files(&mut self, base: &Path, raw: RawTls) -> Option<TlsFiles> {
        let ca_cert = self.existing_file(base, "tls.ca", raw.ca);
        let cert = self.existing_file(base, "tls.cert", raw.cert);
        let key = self.existing_file(base, "tls.key", raw.key);
        Some(TlsFiles {
            ca_cert: ca_cert?,
            cert: cert?,
            key: key?,
        })
    }

    /// The path of a required file, resolved against `base`, if it is set and exists.
    pub fn existing_file(
        &mut self,
        base: &Path,
        field: &str,
        value: Option<PathBuf>,
    ) -> Option<PathBuf> {
        let Some(value) = value else {
            let what = format!("a file path (see {})", self.example);
            return self.missing(field, &what);
        };
        let path = resolve(base, &value);
        if path.is_file() {
            Some(path)
        } else {
            self.push(format!(
                "{field}: {} does not exist; {}",
                path.display(),
                self.missing_file_hint
            ));
            None
        }
    }
}

/// `path` relative to the config file's folder `base`, unless it is absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}
