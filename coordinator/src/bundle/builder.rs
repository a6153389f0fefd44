//! Building the signed bundle of a model version on the coordinator: trtexec is located and
//! probed once at start-up ([`BundleBuilder::start`]); each build exports the model, compiles
//! an engine per configured target and precision (through the engine cache, so an unchanged
//! model is not recompiled) or, without trtexec, ships the ONNX files only and says why in the
//! manifest; then it verifies the result with the coordinator's own public key and writes the
//! tar archive that plants download.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::bundle::engine_cache::{CacheOutcome, EngineCache};
use fedinspect_common::bundle::trtexec::{locate_in, Trtexec, TrtexecError};
use fedinspect_common::bundle::{
    build_bundle, pack, rfc3339_utc, staging_sibling, verify_bundle, BundleError, BundleInputs,
    BundleManifest, BundleMetadata, EngineEntry, EngineStep, NoEngines, TrtexecEngines,
};
use fedinspect_common::fsutil;
use fedinspect_common::onnx::ActivationRanges;
use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelState;

use super::settings::{BundleSettings, TrtexecChoice};
use super::store::BundleStore;

/// Why the builder could not start: a configured trtexec that is missing or is not trtexec.
#[derive(Debug, thiserror::Error)]
pub enum BundleSetupError {
    #[error("bundles.trtexec: {0}")]
    Trtexec(#[from] TrtexecError),
    #[error("bundles: {0}")]
    Store(#[from] BundleError),
    #[error("bundles: {0}")]
    Record(String),
}

/// The model version to bundle.
pub struct ModelForBundle<'a> {
    pub version: u64,
    pub arch: &'a ArchConfig,
    pub state: &'a ModelState,
    pub class_names: Vec<String>,
    /// Metrics of this version (e.g. the evaluation at promotion).
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Merged calibration ranges from the plants; without them no INT8 variant is made.
    pub calibration: Option<&'a ActivationRanges>,
}

/// A stored bundle and what its build did.
#[derive(Clone, Debug)]
pub struct BuiltBundle {
    pub id: String,
    pub dir: PathBuf,
    pub archive: PathBuf,
    pub archive_bytes: u64,
    pub manifest_sha256: String,
    pub manifest: BundleManifest,
    /// Each engine and whether the cache had it.
    pub engines: Vec<(EngineEntry, CacheOutcome)>,
    pub export_seconds: f64,
    pub engine_seconds: f64,
}

enum Engines {
    Ready {
        trtexec: Trtexec,
        cache: EngineCache,
    },
    Unavailable {
        note: String,
    },
}

/// Builds and stores bundles with the settings' engine policy.
pub struct BundleBuilder {
    settings: BundleSettings,
    engines: Engines,
    store: BundleStore,
}

impl BundleBuilder {
    /// Opens the bundle store and settles the engine policy: trtexec from the settings (a
    /// configured path must work), or searched in `path_var` (the process's `PATH`).
    pub fn start(
        settings: BundleSettings,
        path_var: Option<OsString>,
    ) -> Result<Self, BundleSetupError> {
        let store = BundleStore::open(&settings.root)?;
        let engines = Self::engines(&settings, path_var)?;
        Ok(Self {
            settings,
            engines,
            store,
        })
    }

    fn engines(
        settings: &BundleSettings,
        path_var: Option<OsString>,
    ) -> Result<Engines, BundleSetupError> {
        let unavailable = |note: String| Ok(Engines::Unavailable { note });
        let path = match &settings.trtexec {
            TrtexecChoice::Off => {
                return unavailable(
                    "engine builds are off in the coordinator config (bundles.trtexec = \"off\"); \
                     the bundle carries ONNX only, plants with TensorRT build their engine on install"
                        .into(),
                )
            }
            TrtexecChoice::Path(p) => {
                locate_in(Some(p), None)?.expect("a configured path is returned or refused")
            }
            TrtexecChoice::Auto => match locate_in(None, path_var)? {
                Some(p) => p,
                None => {
                    return unavailable(
                        "trtexec not found on the coordinator's PATH; the bundle carries ONNX \
                         only, plants with TensorRT build their engine on install"
                            .into(),
                    )
                }
            },
        };
        let cache = EngineCache::open(&settings.engine_cache)?;
        let trtexec = Trtexec::probe(&path, &cache.root().join("logs/probe.log"))?;
        if settings.targets.is_empty() {
            return unavailable(format!(
                "trtexec (TensorRT {}) found but no bundles.targets configured; the bundle \
                 carries ONNX only, plants with TensorRT build their engine on install",
                trtexec.version()
            ));
        }
        Ok(Engines::Ready { trtexec, cache })
    }

    /// Why bundles carry no engines, when they do not.
    pub fn engine_note(&self) -> Option<&str> {
        match &self.engines {
            Engines::Ready { .. } => None,
            Engines::Unavailable { note } => Some(note),
        }
    }

    pub fn store(&self) -> &BundleStore {
        &self.store
    }

    /// Builds, verifies and archives the bundle of `model`, signed with `key`.
    pub fn build(
        &self,
        model: &ModelForBundle<'_>,
        key: &SigningKey,
    ) -> Result<BuiltBundle, BundleError> {
        let mut metadata = BundleMetadata::new(
            model.version,
            model.class_names.clone(),
            self.settings.score_threshold,
            rfc3339_utc(SystemTime::now()),
        );
        metadata.model_name = self.settings.model_name.clone();
        metadata.max_batch = self.settings.max_batch;
        metadata.metrics = model.metrics.clone();
        let inputs = BundleInputs {
            arch: model.arch,
            state: model.state,
            calibration: model.calibration,
            metadata,
        };
        let fresh = staging_sibling(
            &self.store.root().join(format!("v{}", model.version)),
            "new",
        );
        let (report, engines) = match &self.engines {
            Engines::Ready { trtexec, cache } => {
                let mut step = TrtexecEngines::new(
                    trtexec,
                    cache,
                    self.settings.targets.clone(),
                    self.settings.precisions.clone(),
                    self.settings.build_timeout,
                );
                let report = build_bundle(&fresh, &inputs, key, &mut step as &mut dyn EngineStep)?;
                (report, step.built)
            }
            Engines::Unavailable { note } => {
                let mut step = NoEngines {
                    reason: note.clone(),
                };
                (build_bundle(&fresh, &inputs, key, &mut step)?, Vec::new())
            }
        };
        let result = self.install(&fresh, model.version, &report.manifest_sha256, key);
        if result.is_err() {
            let _ = fs::remove_dir_all(&fresh);
        }
        let (id, dir, archive, archive_bytes) = result?;
        Ok(BuiltBundle {
            id,
            dir,
            archive,
            archive_bytes,
            manifest_sha256: report.manifest_sha256,
            manifest: report.manifest,
            engines,
            export_seconds: report.export_seconds,
            engine_seconds: report.engine_seconds,
        })
    }

    /// Verifies the fresh bundle with our own public key, writes its archive, renames it to its
    /// id: (id, folder, archive, archive bytes).
    fn install(
        &self,
        fresh: &Path,
        version: u64,
        manifest_sha256: &str,
        key: &SigningKey,
    ) -> Result<(String, PathBuf, PathBuf, u64), BundleError> {
        let id = BundleStore::id_for(version, manifest_sha256);
        let dir = self.store.dir(&id)?;
        let archive = self.store.archive(&id)?;
        if dir.exists() {
            // The same manifest was built before (same model, settings and second): its
            // bundle is this one. Keep it and drop the fresh copy.
            let existing = verify_bundle(&dir, &key.verifying_key())?;
            if existing.manifest_sha256 == manifest_sha256 && archive.exists() {
                fs::remove_dir_all(fresh).map_err(|e| io("remove", fresh, e))?;
                let bytes = self.store.archive_len(&id)?;
                return Ok((id, dir, archive, bytes));
            }
            return Err(BundleError::DestinationExists { path: dir });
        }
        let bundle = verify_bundle(fresh, &key.verifying_key())?;
        let mut archive_bytes = 0;
        fsutil::write_atomic(&archive, |w| {
            archive_bytes = pack(&bundle, w).map_err(std::io::Error::other)?;
            Ok(())
        })
        .map_err(|e| io("write", &archive, e))?;
        let renamed = fs::rename(fresh, &dir)
            .and_then(|()| fsutil::sync_dir(self.store.root()))
            .map_err(|e| io("rename into place", &dir, e));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&archive);
            return Err(e);
        }
        Ok((id, dir, archive, archive_bytes))
    }
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> BundleError {
    BundleError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
