//! The engine step of a bundle build: given the staged ONNX files, put TensorRT engines next to
//! them and say why the bundle has the engines it has. [`NoEngines`] is the step where no
//! trtexec exists; [`TrtexecEngines`] compiles per target and precision through an
//! [`EngineCache`], so an unchanged model is not recompiled.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::engine_cache::{CacheOutcome, EngineCache, EngineRequest};
use super::manifest::{
    engine_file_name, EngineEntry, EnginePrecision, EngineTarget, FileRole, InputSpec,
};
use super::trtexec::Trtexec;
use super::BundleError;

/// An ONNX file already written into the staging folder.
#[derive(Clone, Debug)]
pub struct StagedOnnx {
    pub role: FileRole,
    /// Its file name in the bundle.
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// Engines written into the staging folder, and the manifest's `engine_note`.
#[derive(Clone, Debug, Default)]
pub struct EngineOutcome {
    pub engines: Vec<EngineEntry>,
    pub note: String,
}

/// Builds the engines of a bundle being staged.
pub trait EngineStep {
    /// Writes engine files into `dir` (the staging folder) from `onnx` and describes them.
    fn build(
        &mut self,
        onnx: &[StagedOnnx],
        input: &InputSpec,
        dir: &Path,
    ) -> Result<EngineOutcome, BundleError>;
}

/// No engines; `reason` becomes the manifest's `engine_note`.
#[derive(Clone, Debug)]
pub struct NoEngines {
    pub reason: String,
}

impl EngineStep for NoEngines {
    fn build(
        &mut self,
        _: &[StagedOnnx],
        _: &InputSpec,
        _: &Path,
    ) -> Result<EngineOutcome, BundleError> {
        Ok(EngineOutcome {
            engines: Vec::new(),
            note: self.reason.clone(),
        })
    }
}

/// Compiles an engine per target and precision with trtexec, through a cache. A precision
/// whose ONNX file the bundle lacks (INT8 without calibration) is skipped and the note says so.
/// Any failed build fails the step: the error names the target and carries trtexec's log tail.
pub struct TrtexecEngines<'a> {
    pub trtexec: &'a Trtexec,
    pub cache: &'a EngineCache,
    pub targets: Vec<EngineTarget>,
    pub precisions: Vec<EnginePrecision>,
    pub timeout: Duration,
    /// Filled by [`EngineStep::build`]: each engine and whether it came from the cache.
    pub built: Vec<(EngineEntry, CacheOutcome)>,
}

impl<'a> TrtexecEngines<'a> {
    pub fn new(
        trtexec: &'a Trtexec,
        cache: &'a EngineCache,
        targets: Vec<EngineTarget>,
        precisions: Vec<EnginePrecision>,
        timeout: Duration,
    ) -> Self {
        Self {
            trtexec,
            cache,
            targets,
            precisions,
            timeout,
            built: Vec::new(),
        }
    }
}

impl EngineStep for TrtexecEngines<'_> {
    fn build(
        &mut self,
        onnx: &[StagedOnnx],
        input: &InputSpec,
        dir: &Path,
    ) -> Result<EngineOutcome, BundleError> {
        let chw = input_chw(input)?;
        let mut outcome = EngineOutcome::default();
        let mut skipped = Vec::new();
        for target in &self.targets {
            for &precision in &self.precisions {
                let Some(source) = onnx.iter().find(|o| o.role == precision.source_role()) else {
                    skipped.push(precision);
                    continue;
                };
                let req = EngineRequest {
                    onnx: &source.path,
                    onnx_sha256: &source.sha256,
                    precision,
                    target,
                    input_name: &input.name,
                    input_chw: chw,
                    max_batch: input.max_batch,
                    timeout: self.timeout,
                };
                let cached = self.cache.get_or_build(self.trtexec, &req)?;
                let name = engine_file_name(precision, target);
                let dest = dir.join(&name);
                fs::copy(&cached.engine, &dest).map_err(|e| BundleError::io("copy", &dest, e))?;
                let entry = EngineEntry {
                    file: name,
                    precision,
                    target: target.clone(),
                    tensorrt_version: cached.record.tensorrt_version.clone(),
                    source: source.name.clone(),
                    max_batch: input.max_batch,
                };
                outcome.engines.push(entry.clone());
                self.built.push((entry, cached.outcome));
            }
        }
        let built: Vec<String> = outcome
            .engines
            .iter()
            .map(|e| format!("{} {}", e.precision, e.target.slug()))
            .collect();
        outcome.note = format!(
            "built with trtexec (TensorRT {}) for: {}",
            self.trtexec.version(),
            if built.is_empty() {
                "nothing".to_string()
            } else {
                built.join(", ")
            }
        );
        skipped.sort();
        skipped.dedup();
        for p in skipped {
            outcome.note.push_str(&format!(
                "; no {p} engine: the bundle has no {} ONNX file",
                p.source_role().as_str()
            ));
        }
        Ok(outcome)
    }
}

/// `[C, H, W]` of the input, which engines need fixed.
fn input_chw(input: &InputSpec) -> Result<[u64; 3], BundleError> {
    input.chw().ok_or_else(|| {
        BundleError::Metadata(format!(
            "engines need a fixed [batch, C, H, W] input, not {:?}",
            input.shape
        ))
    })
}
