//! TensorRT engines built at the plant when a bundle ships none for this GPU: the plant's
//! trtexec compiles the bundle's (verified) ONNX files through the plant's engine cache, so
//! reinstalling or rolling back never recompiles, and the install reports that it built them.
//! The runner is `fedinspect_common::bundle::trtexec`, the one the coordinator uses.
//!
//! Engines built here sit in `<bundle id>/local/` beside the signed bundle (which stays as
//! signed), listed in `local.json` with their SHA-256, checked when the bundle is opened.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::bundle::engine_cache::{CacheOutcome, EngineCache, EngineRequest};
use fedinspect_common::bundle::trtexec::{locate, Trtexec, TrtexecError};
use fedinspect_common::bundle::{
    engine_file_name, sha256_file, EngineEntry, EnginePrecision, EngineTarget, VerifiedBundle,
};
use fedinspect_common::fsutil;
use serde::{Deserialize, Serialize};

/// The record of engines built here, inside `<bundle id>/local/`.
pub const LOCAL_RECORD: &str = "local.json";

/// The plant's engine builder: its trtexec, its cache and its GPU.
pub struct LocalEngines {
    trtexec: Trtexec,
    cache: EngineCache,
    target: EngineTarget,
    precisions: Vec<EnginePrecision>,
    timeout: Duration,
}

/// One engine built (or taken from the cache) here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalEngine {
    pub entry: EngineEntry,
    pub sha256: String,
    pub size: u64,
    /// Taken from the plant's engine cache rather than compiled during this install.
    pub from_cache: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRecord {
    engines: Vec<LocalEngine>,
}

/// What building the missing engines did: the engines, and the builds that failed (the
/// install goes on with the ONNX files; the report carries these).
#[derive(Clone, Debug, Default)]
pub struct LocalBuild {
    pub engines: Vec<LocalEngine>,
    pub problems: Vec<String>,
}

impl LocalEngines {
    /// The plant's builder if trtexec is configured (`configured`, which must work) or on the
    /// PATH, `None` otherwise. `compute_capability` is this GPU's (`nvidia-smi`).
    pub fn detect(
        configured: Option<&Path>,
        compute_capability: &str,
        cache_dir: &Path,
        precisions: Vec<EnginePrecision>,
        timeout: Duration,
    ) -> Result<Option<Self>, TrtexecError> {
        let Some(path) = locate(configured)? else {
            return Ok(None);
        };
        let cache = EngineCache::open(cache_dir)?;
        let trtexec = Trtexec::probe(&path, &cache.root().join("logs/probe.log"))?;
        Self::new(trtexec, cache, compute_capability, precisions, timeout).map(Some)
    }

    /// A builder for this GPU from a probed trtexec.
    pub fn new(
        trtexec: Trtexec,
        cache: EngineCache,
        compute_capability: &str,
        precisions: Vec<EnginePrecision>,
        timeout: Duration,
    ) -> Result<Self, TrtexecError> {
        let target = EngineTarget {
            compute_capability: compute_capability.to_string(),
            tensorrt_version: trtexec.version().to_string(),
        };
        target.validate().map_err(TrtexecError::BadRequest)?;
        Ok(Self {
            trtexec,
            cache,
            target,
            precisions,
            timeout,
        })
    }

    /// This plant's engine target.
    pub fn target(&self) -> &EngineTarget {
        &self.target
    }

    /// Builds into `out_dir` each configured precision the bundle has an ONNX source for but
    /// no engine for this target, and writes `local.json` there.
    pub fn build_missing(
        &self,
        bundle: &VerifiedBundle,
        out_dir: &Path,
    ) -> std::io::Result<LocalBuild> {
        let m = &bundle.manifest;
        let mut build = LocalBuild::default();
        for &precision in &self.precisions {
            if m.engine_for(&self.target, precision).is_some() {
                continue;
            }
            let Some(source) = m.file_with_role(precision.source_role()) else {
                continue;
            };
            let Some(dims) = m.input.chw() else {
                build
                    .problems
                    .push("the manifest's input is not [batch, C, H, W] with fixed sizes".into());
                continue;
            };
            let onnx = bundle.path(&source.name);
            let req = EngineRequest {
                onnx: &onnx,
                onnx_sha256: &source.sha256,
                precision,
                target: &self.target,
                input_name: &m.input.name,
                input_chw: dims,
                max_batch: m.input.max_batch,
                timeout: self.timeout,
            };
            let cached = match self.cache.get_or_build(&self.trtexec, &req) {
                Ok(c) => c,
                Err(e) => {
                    build
                        .problems
                        .push(format!("{precision} engine for {}: {e}", self.target));
                    continue;
                }
            };
            let entry = EngineEntry {
                file: engine_file_name(precision, &self.target),
                precision,
                target: self.target.clone(),
                tensorrt_version: cached.record.tensorrt_version.clone(),
                source: source.name.clone(),
                max_batch: m.input.max_batch,
            };
            fs::create_dir_all(out_dir)?;
            let dest = out_dir.join(&entry.file);
            fs::copy(&cached.engine, &dest)?;
            build.engines.push(LocalEngine {
                entry,
                sha256: cached.record.engine_sha256.clone(),
                size: cached.record.engine_size,
                from_cache: cached.outcome == CacheOutcome::Hit,
            });
        }
        if !build.engines.is_empty() {
            let record = LocalRecord {
                engines: build.engines.clone(),
            };
            let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
            fsutil::write_bytes_atomic(&out_dir.join(LOCAL_RECORD), &bytes)?;
        }
        Ok(build)
    }
}

/// The engines of `local_dir` (absent folder: none), each checked against its recorded
/// size and SHA-256; returns them with their paths.
pub fn load_local(local_dir: &Path) -> Result<Vec<(LocalEngine, PathBuf)>, String> {
    let record_path = local_dir.join(LOCAL_RECORD);
    let bytes = match fs::read(&record_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", record_path.display())),
    };
    let record: LocalRecord = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not an engine record: {e}", record_path.display()))?;
    let mut out = Vec::new();
    for engine in record.engines {
        if !fedinspect_common::bundle::is_valid_file_name(&engine.entry.file) {
            return Err(format!(
                "{} names file '{}'",
                record_path.display(),
                engine.entry.file
            ));
        }
        let path = local_dir.join(&engine.entry.file);
        let (sha, size) =
            sha256_file(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if sha != engine.sha256 || size != engine.size {
            return Err(format!(
                "locally built engine {} no longer matches its record (damaged); reinstall the \
                 bundle to rebuild it",
                path.display()
            ));
        }
        out.push((engine, path));
    }
    Ok(out)
}
