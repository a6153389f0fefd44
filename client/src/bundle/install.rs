//! Installing a bundle at the plant: unpack (or copy) into a staging folder, verify signature
//! and hashes there with the pinned coordinator key, optionally build the missing engine,
//! fsync, rename into `STATE/bundles/<id>`, then switch `current.json` atomically, keeping the
//! previous bundle for [`BundleInstaller::rollback`]. Any refusal before the switch removes the
//! staging folder and leaves the running bundle as it was. One installer per state folder.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fedinspect_common::bundle::{
    bundle_id, rfc3339_utc, staging_sibling, sync_tree, unpack, verify_bundle, BundleError,
    EngineEntry, EnginePrecision, EngineTarget, UnpackLimits, VerifiedBundle,
};
use fedinspect_common::fsutil;
use fedinspect_common::signing::VerifyingKey;

use super::local_engines::{load_local, LocalEngine, LocalEngines};
use super::pointer::{Pointer, Slot};

const BUNDLE_DIR: &str = "bundle";
const LOCAL_DIR: &str = "local";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("bundle refused, the running bundle stays: {0}")]
    Refused(#[from] BundleError),
    #[error("cannot {action} {}: {source}; check the state folder's permissions and free space", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Pointer(String),
    #[error("no previous bundle to roll back to; install the wanted bundle instead")]
    NoPrevious,
    #[error("installed bundle {id} is damaged ({reason}); install it again from the coordinator")]
    Damaged { id: String, reason: String },
}

/// How to install.
#[derive(Clone, Copy, Default)]
pub struct InstallOptions<'a> {
    /// The manifest SHA-256 (hex) the install task names; a bundle with another is refused.
    pub expected_manifest_sha256: Option<&'a str>,
    /// Build the engines the bundle lacks for this GPU.
    pub engines: Option<&'a LocalEngines>,
    pub limits: UnpackLimits,
}

/// What an install did (what the plant reports with `ReportInstall`).
#[derive(Clone, Debug)]
pub struct InstallReport {
    pub id: String,
    pub model_version: u64,
    pub manifest_sha256: String,
    /// The bundle that ran before, kept for rollback.
    pub previous: Option<String>,
    /// The bundle was already the current one; nothing changed.
    pub already_current: bool,
    /// An engine for this GPU was built here (or taken from this plant's engine cache).
    pub engine_built_locally: bool,
    pub local_engines: Vec<LocalEngine>,
    /// Engine builds that failed; the bundle is installed with its ONNX files all the same.
    pub engine_problems: Vec<String>,
    /// Old bundles that could not be removed (disk space is not reclaimed, nothing else).
    pub cleanup_problems: Vec<String>,
    /// One line for the coordinator.
    pub message: String,
}

/// A verified installed bundle and the engines built for it here.
#[derive(Clone, Debug)]
pub struct InstalledBundle {
    pub id: String,
    pub bundle: VerifiedBundle,
    pub local_engines: Vec<(LocalEngine, PathBuf)>,
}

impl InstalledBundle {
    /// An engine for `target` and `precision`: shipped in the bundle, else built here.
    pub fn engine(
        &self,
        target: &EngineTarget,
        precision: EnginePrecision,
    ) -> Option<(EngineEntry, PathBuf)> {
        if let Some(e) = self.bundle.manifest.engine_for(target, precision) {
            return Some((e.clone(), self.bundle.path(&e.file)));
        }
        self.local_engines
            .iter()
            .find(|(l, _)| &l.entry.target == target && l.entry.precision == precision)
            .map(|(l, p)| (l.entry.clone(), p.clone()))
    }
}

/// The bundles of one plant's state folder.
pub struct BundleInstaller {
    root: PathBuf,
    key: VerifyingKey,
}

impl BundleInstaller {
    /// Opens `STATE/bundles` (creating it) and removes installs a crash interrupted. `key` is
    /// the pinned coordinator key.
    pub fn open(state_dir: &Path, key: VerifyingKey) -> Result<Self, InstallError> {
        let root = state_dir.join("bundles");
        fs::create_dir_all(&root).map_err(|e| io("create", &root, e))?;
        for entry in fs::read_dir(&root).map_err(|e| io("list", &root, e))? {
            let entry = entry.map_err(|e| io("list", &root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && entry.path().is_dir() {
                fs::remove_dir_all(entry.path())
                    .map_err(|e| io("remove unfinished install", &entry.path(), e))?;
            }
        }
        Ok(Self { root, key })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What `current.json` says.
    pub fn pointer(&self) -> Result<Pointer, InstallError> {
        Pointer::load(&self.root).map_err(InstallError::Pointer)
    }

    /// Installs the bundle in a tar stream (what `DownloadBundle` sends).
    pub fn install_archive(
        &self,
        input: impl Read,
        opts: &InstallOptions<'_>,
    ) -> Result<InstallReport, InstallError> {
        self.install_with(opts, |dest| unpack(input, dest, &opts.limits).map(|_| ()))
    }

    /// Installs a bundle folder (a copy is verified, not the folder itself).
    pub fn install_dir(
        &self,
        src: &Path,
        opts: &InstallOptions<'_>,
    ) -> Result<InstallReport, InstallError> {
        self.install_with(opts, |dest| copy_flat(src, dest))
    }

    /// The running bundle, verified again, or `None` before the first install.
    pub fn current(&self) -> Result<Option<InstalledBundle>, InstallError> {
        match self.pointer()?.current {
            Some(slot) => self.open_installed(&slot.id).map(Some),
            None => Ok(None),
        }
    }

    /// Installed bundle `id`, verified (signature, hashes, engines built here).
    pub fn open_installed(&self, id: &str) -> Result<InstalledBundle, InstallError> {
        let damaged = |reason: String| InstallError::Damaged {
            id: id.to_string(),
            reason,
        };
        if !fedinspect_common::bundle::is_valid_file_name(id) {
            return Err(damaged("not a bundle id".into()));
        }
        let dir = self.root.join(id);
        let bundle =
            verify_bundle(&dir.join(BUNDLE_DIR), &self.key).map_err(|e| damaged(e.to_string()))?;
        let local_engines = load_local(&dir.join(LOCAL_DIR)).map_err(damaged)?;
        Ok(InstalledBundle {
            id: id.to_string(),
            bundle,
            local_engines,
        })
    }

    /// Makes the previous bundle current again (after verifying it); the bundle rolled back
    /// from becomes the previous one. Returns the new current slot.
    pub fn rollback(&self) -> Result<Slot, InstallError> {
        let pointer = self.pointer()?;
        let Some(previous) = pointer.previous.clone() else {
            return Err(InstallError::NoPrevious);
        };
        self.open_installed(&previous.id)?;
        let next = Pointer {
            current: Some(previous.clone()),
            previous: pointer.current,
        };
        next.save(&self.root)
            .map_err(|e| io("write", &self.root.join("current.json"), e))?;
        Ok(previous)
    }

    fn install_with(
        &self,
        opts: &InstallOptions<'_>,
        fill: impl FnOnce(&Path) -> Result<(), BundleError>,
    ) -> Result<InstallReport, InstallError> {
        let staging = staging_sibling(&self.root.join("install"), "staging");
        let result = (|| {
            let bundle_dir = staging.join(BUNDLE_DIR);
            fs::create_dir_all(&bundle_dir).map_err(|e| io("create", &bundle_dir, e))?;
            fill(&bundle_dir)?;
            let bundle = verify_bundle(&bundle_dir, &self.key)?;
            if let Some(expected) = opts.expected_manifest_sha256 {
                if !expected.eq_ignore_ascii_case(&bundle.manifest_sha256) {
                    return Err(BundleError::ManifestHashMismatch {
                        expected: expected.to_string(),
                        found: bundle.manifest_sha256.clone(),
                    }
                    .into());
                }
            }
            self.place(&staging, &bundle, opts)
        })();
        if staging.exists() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Moves the verified staged bundle into place (building engines first) and switches the
    /// pointer.
    fn place(
        &self,
        staging: &Path,
        bundle: &VerifiedBundle,
        opts: &InstallOptions<'_>,
    ) -> Result<InstallReport, InstallError> {
        let m = &bundle.manifest;
        let id = bundle_id(m.model_version, &bundle.manifest_sha256);
        let pointer = self.pointer()?;
        let mut report = InstallReport {
            id: id.clone(),
            model_version: m.model_version,
            manifest_sha256: bundle.manifest_sha256.clone(),
            previous: pointer.current.as_ref().map(|s| s.id.clone()),
            already_current: false,
            engine_built_locally: false,
            local_engines: Vec::new(),
            engine_problems: Vec::new(),
            cleanup_problems: Vec::new(),
            message: String::new(),
        };
        let dest = self.root.join(&id);
        if pointer.current.as_ref().is_some_and(|s| s.id == id) {
            report.already_current = true;
            report.previous = pointer.previous.as_ref().map(|s| s.id.clone());
            report.message = format!(
                "bundle {id} (model version {}) is already installed and current",
                m.model_version
            );
            return Ok(report);
        }
        if dest.exists() {
            // Installed before (the previous bundle, or a crash before the switch): reuse it.
            let existing = self.open_installed(&id)?;
            report.engine_built_locally = !existing.local_engines.is_empty();
        } else {
            if let Some(engines) = opts.engines {
                let local = engines
                    .build_missing(bundle, &staging.join(LOCAL_DIR))
                    .map_err(|e| io("write engines into", staging, e))?;
                report.engine_built_locally = !local.engines.is_empty();
                report.local_engines = local.engines;
                report.engine_problems = local.problems;
            }
            for sub in [BUNDLE_DIR, LOCAL_DIR] {
                let dir = staging.join(sub);
                if dir.exists() {
                    sync_tree(&dir).map_err(|e| io("sync", &dir, e))?;
                }
            }
            fsutil::sync_dir(staging).map_err(|e| io("sync", staging, e))?;
            fs::rename(staging, &dest).map_err(|e| io("rename into place", &dest, e))?;
            fsutil::sync_dir(&self.root).map_err(|e| io("sync", &self.root, e))?;
        }
        let slot = Slot {
            id: id.clone(),
            model_version: m.model_version,
            manifest_sha256: bundle.manifest_sha256.clone(),
            installed_at: rfc3339_utc(SystemTime::now()),
            engine_built_locally: report.engine_built_locally,
        };
        let next = Pointer {
            current: Some(slot),
            previous: pointer.current,
        };
        next.save(&self.root)
            .map_err(|e| io("write", &self.root.join("current.json"), e))?;
        report.cleanup_problems = self.prune(&next);
        report.message = describe(&report);
        Ok(report)
    }

    /// Removes installed bundles the pointer no longer keeps; returns what failed.
    fn prune(&self, pointer: &Pointer) -> Vec<String> {
        let kept = pointer.kept();
        let mut problems = Vec::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return vec![format!("cannot list {}", self.root.display())];
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() || kept.contains(&name.as_str()) {
                continue;
            }
            // Renamed to a dot name first: a crash mid-removal leaves what `open` cleans.
            let aside = staging_sibling(&entry.path(), "old");
            let removed =
                fs::rename(entry.path(), &aside).and_then(|()| fs::remove_dir_all(&aside));
            if let Err(e) = removed {
                problems.push(format!("cannot remove old bundle {name}: {e}"));
            }
        }
        problems
    }
}

fn describe(r: &InstallReport) -> String {
    let mut msg = format!(
        "installed bundle {} (model version {})",
        r.id, r.model_version
    );
    if let Some(prev) = &r.previous {
        msg.push_str(&format!("; previous {prev} kept for rollback"));
    }
    if r.engine_built_locally {
        let built: Vec<String> = r
            .local_engines
            .iter()
            .map(|l| {
                let how = if l.from_cache {
                    "from the plant's cache"
                } else {
                    "built"
                };
                format!("{} {} {how}", l.entry.precision, l.entry.target.slug())
            })
            .collect();
        if built.is_empty() {
            msg.push_str("; engine built locally earlier");
        } else {
            msg.push_str(&format!("; engine built locally: {}", built.join(", ")));
        }
    }
    for p in &r.engine_problems {
        msg.push_str(&format!("; engine build failed, running ONNX: {p}"));
    }
    msg
}

/// Copies the regular files directly in `src` to `dest`; anything else is refused.
fn copy_flat(src: &Path, dest: &Path) -> Result<(), BundleError> {
    let entries = fs::read_dir(src).map_err(|e| BundleError::NotADirectory {
        path: src.to_path_buf(),
        reason: e.to_string(),
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| io_b("list", src, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry
            .file_type()
            .map_err(|e| io_b("inspect", &entry.path(), e))?;
        if !kind.is_file() {
            return Err(BundleError::NotARegularFile {
                dir: src.to_path_buf(),
                name,
                kind: if kind.is_symlink() {
                    "a symbolic link"
                } else if kind.is_dir() {
                    "a directory"
                } else {
                    "a special file"
                },
            });
        }
        let to = dest.join(&name);
        fs::copy(entry.path(), &to).map_err(|e| io_b("copy", &to, e))?;
        fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_b("sync", &to, e))?;
    }
    Ok(())
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> InstallError {
    InstallError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn io_b(action: &'static str, path: &Path, source: std::io::Error) -> BundleError {
    BundleError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
