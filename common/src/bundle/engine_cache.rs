//! Engines already built, keyed by what determines them: the ONNX file's SHA-256, the
//! precision, the target (compute capability, TensorRT version) and the largest batch. An
//! unchanged model is never recompiled, and TensorRT's timing cache is kept per target
//! between builds, so even a changed model builds faster.
//!
//! ```text
//! ROOT/
//!   engines/<onnx sha256>-<precision>-sm<cc>-trt<version>-b<max batch>/
//!       engine.plan   record.json      one entry, installed by renaming a staged folder
//!   timing/sm<cc>-trt<version>.cache   trtexec's --timingCacheFile, one per target
//!   logs/<entry name>.log              trtexec's log of the latest build attempt of an entry
//! ```
//!
//! An entry is used only when its engine still has the size and SHA-256 its record says;
//! otherwise it is rebuilt. One process builds into a cache at a time (trtexec rewrites the
//! timing cache file).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::files::{sha256_file, staging_sibling, sync_tree};
use super::manifest::{EnginePrecision, EngineTarget};
use super::trtexec::{EngineJob, Trtexec, TrtexecError};
use crate::fsutil;

const ENGINE_FILE: &str = "engine.plan";
const RECORD_FILE: &str = "record.json";

/// A cache folder.
#[derive(Clone, Debug)]
pub struct EngineCache {
    root: PathBuf,
}

/// What to build (or find).
#[derive(Clone, Debug)]
pub struct EngineRequest<'a> {
    pub onnx: &'a Path,
    /// Hex SHA-256 of the ONNX file (the bundle manifest has it).
    pub onnx_sha256: &'a str,
    pub precision: EnginePrecision,
    pub target: &'a EngineTarget,
    pub input_name: &'a str,
    pub input_chw: [u64; 3],
    pub max_batch: u32,
    pub timeout: Duration,
}

/// `record.json` of an entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineRecord {
    pub onnx_sha256: String,
    pub precision: EnginePrecision,
    pub target: EngineTarget,
    pub max_batch: u32,
    pub engine_sha256: String,
    pub engine_size: u64,
    pub tensorrt_version: String,
    pub build_seconds: f64,
    pub trtexec: String,
}

/// A usable engine and whether it was just built.
#[derive(Clone, Debug)]
pub struct CachedEngine {
    pub engine: PathBuf,
    pub record: EngineRecord,
    pub log: PathBuf,
    pub outcome: CacheOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheOutcome {
    /// Found in the cache; trtexec did not run.
    Hit,
    /// Built now; `replaced_corrupt` when an entry existed but no longer matched its record.
    Built {
        seconds: f64,
        replaced_corrupt: bool,
    },
}

impl EngineCache {
    /// Opens (creating) the cache at `root`.
    pub fn open(root: &Path) -> Result<Self, TrtexecError> {
        for sub in ["engines", "timing", "logs"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|source| TrtexecError::Io {
                action: "create",
                path: dir,
                source,
            })?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entry folder of `req`.
    pub fn entry_dir(&self, req: &EngineRequest<'_>) -> PathBuf {
        self.root.join("engines").join(entry_name(req))
    }

    /// The timing cache file of `target`.
    pub fn timing_cache(&self, target: &EngineTarget) -> PathBuf {
        self.root
            .join("timing")
            .join(format!("{}.cache", target.slug()))
    }

    /// The log of the latest build attempt of `req`'s entry.
    pub fn log_path(&self, req: &EngineRequest<'_>) -> PathBuf {
        self.root
            .join("logs")
            .join(format!("{}.log", entry_name(req)))
    }

    /// The cached engine of `req`, if present and intact.
    pub fn lookup(&self, req: &EngineRequest<'_>) -> Option<CachedEngine> {
        req.check().ok()?;
        let dir = self.entry_dir(req);
        let record: EngineRecord =
            serde_json::from_slice(&fs::read(dir.join(RECORD_FILE)).ok()?).ok()?;
        let engine = dir.join(ENGINE_FILE);
        let (sha, size) = sha256_file(&engine).ok()?;
        let matches = sha == record.engine_sha256
            && size == record.engine_size
            && record.onnx_sha256 == req.onnx_sha256
            && record.precision == req.precision
            && &record.target == req.target
            && record.max_batch == req.max_batch;
        matches.then(|| CachedEngine {
            engine,
            record,
            log: self.log_path(req),
            outcome: CacheOutcome::Hit,
        })
    }

    /// The cached engine of `req`, built with `trtexec` when absent or damaged.
    pub fn get_or_build(
        &self,
        trtexec: &Trtexec,
        req: &EngineRequest<'_>,
    ) -> Result<CachedEngine, TrtexecError> {
        req.check()?;
        if let Some(hit) = self.lookup(req) {
            return Ok(hit);
        }
        let dir = self.entry_dir(req);
        let replaced_corrupt = dir.exists();
        let staging = staging_sibling(&dir, "staging");
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| TrtexecError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&staging).map_err(io("create", &staging))?;
        let result = self.build_into(trtexec, req, &staging);
        let record = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        if replaced_corrupt {
            let aside = staging_sibling(&dir, "corrupt");
            fs::rename(&dir, &aside).map_err(io("move aside", &dir))?;
            let _ = fs::remove_dir_all(&aside);
        }
        if let Err(source) = fs::rename(&staging, &dir) {
            let _ = fs::remove_dir_all(&staging);
            // Another build of the same entry won the race: use its engine.
            return self.lookup(req).ok_or(TrtexecError::Io {
                action: "install cache entry",
                path: dir,
                source,
            });
        }
        fsutil::sync_dir(&self.root.join("engines")).map_err(io("sync", &self.root))?;
        Ok(CachedEngine {
            engine: dir.join(ENGINE_FILE),
            log: self.log_path(req),
            outcome: CacheOutcome::Built {
                seconds: record.build_seconds,
                replaced_corrupt,
            },
            record,
        })
    }

    fn build_into(
        &self,
        trtexec: &Trtexec,
        req: &EngineRequest<'_>,
        staging: &Path,
    ) -> Result<EngineRecord, TrtexecError> {
        let engine = staging.join(ENGINE_FILE);
        let timing_cache = self.timing_cache(req.target);
        let log = self.log_path(req);
        let job = EngineJob {
            onnx: req.onnx,
            precision: req.precision,
            target: req.target,
            input_name: req.input_name,
            input_chw: req.input_chw,
            max_batch: req.max_batch,
            engine: &engine,
            timing_cache: &timing_cache,
            log: &log,
            timeout: req.timeout,
        };
        let out = trtexec.build(&job)?;
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| TrtexecError::Io {
                action,
                path,
                source,
            }
        };
        let (engine_sha256, engine_size) = sha256_file(&engine).map_err(io("read", &engine))?;
        let record = EngineRecord {
            onnx_sha256: req.onnx_sha256.to_string(),
            precision: req.precision,
            target: req.target.clone(),
            max_batch: req.max_batch,
            engine_sha256,
            engine_size,
            tensorrt_version: trtexec.version().to_string(),
            build_seconds: out.duration.as_secs_f64(),
            trtexec: trtexec.path().display().to_string(),
        };
        let json = serde_json::to_vec_pretty(&record).expect("a record serialises");
        let record_path = staging.join(RECORD_FILE);
        fsutil::write_bytes_atomic(&record_path, &json).map_err(io("write", &record_path))?;
        sync_tree(staging).map_err(io("sync", staging))?;
        Ok(record)
    }
}

impl EngineRequest<'_> {
    /// The hash and target end up in file names: they must be what they claim to be.
    fn check(&self) -> Result<(), TrtexecError> {
        let hex64 = self.onnx_sha256.len() == 64
            && self
                .onnx_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex64 {
            return Err(TrtexecError::BadRequest(format!(
                "ONNX hash '{}' is not 64 lowercase hex digits",
                self.onnx_sha256
            )));
        }
        if self.max_batch == 0 {
            return Err(TrtexecError::BadRequest("max batch is 0".into()));
        }
        self.target.validate().map_err(TrtexecError::BadRequest)
    }
}

fn entry_name(req: &EngineRequest<'_>) -> String {
    format!(
        "{}-{}-{}-b{}",
        req.onnx_sha256,
        req.precision,
        req.target.slug(),
        req.max_batch
    )
}
