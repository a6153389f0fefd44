//! Running NVIDIA's `trtexec` to compile an ONNX file into a TensorRT engine: finding the
//! executable (a configured path or the PATH), reading its TensorRT version, building with a
//! time limit (the whole process group is killed when it runs over), and turning a non-zero
//! exit, a missing engine or a mismatched version into an error that carries the tail of
//! trtexec's log and where the full log is.
//!
//! The arguments ([`engine_args`]) are those of a build-only run:
//! `--onnx=<file> --saveEngine=<file> --timingCacheFile=<file> --skipInference`, the input's
//! `--minShapes`/`--optShapes`/`--maxShapes` (batch 1, 1 and `max_batch`), and `--fp16` for an
//! FP16 engine from the FP32 ONNX, or `--int8 --fp16` for an INT8 engine from the QDQ ONNX (the
//! QDQ nodes fix what runs in INT8; `--fp16` lets the layers left in float, the attention's
//! matrix products and softmax, run in FP16 instead of FP32). `--skipInference` needs
//! TensorRT 8.6, which the ONNX opset (17) needs anyway.
//!
//! Nothing here knows the coordinator or the plant: both use it (the coordinator when it
//! builds a bundle, a plant when it builds its engine on install).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::manifest::{EnginePrecision, EngineTarget};

mod parse;
mod run;

pub use parse::{dotted_tensorrt_version, parse_compute_capability, parse_tensorrt_version};
pub use run::log_tail;
use run::{describe, is_executable, read_log, run_logged, RunOutcome};

/// The executable's name on the PATH.
pub const TRTEXEC: &str = "trtexec";
/// How long `trtexec --help` may take to print its banner.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of trtexec's log quoted in an error.
pub const LOG_TAIL_LINES: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum TrtexecError {
    #[error("invalid engine request: {0}")]
    BadRequest(String),
    #[error("trtexec configured at {} does not exist; fix the trtexec path in the config or remove it to search the PATH", path.display())]
    NotFound { path: PathBuf },
    #[error("{} is not an executable file; point the trtexec setting at TensorRT's bin/trtexec", path.display())]
    NotExecutable { path: PathBuf },
    #[error("cannot start {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} {}: {source}; check the folder's permissions and free space", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} printed no TensorRT version banner ('[TensorRT vNNNN]'); is it NVIDIA's trtexec? Output ends with:\n{tail}", path.display())]
    NoVersion { path: PathBuf, tail: String },
    #[error("this trtexec is TensorRT {found} but the target needs TensorRT {wanted}; an engine only runs on the TensorRT version that built it, so build it where TensorRT {wanted} is installed (a plant with it builds on install)")]
    WrongTensorRt { wanted: String, found: String },
    #[error("trtexec ran on a GPU of compute capability {found} but the target is {wanted}; an engine only runs on the GPU generation that built it, so build it on a matching GPU. Full log: {}", log.display())]
    WrongDevice {
        wanted: String,
        found: String,
        log: PathBuf,
    },
    #[error("trtexec did not finish within {seconds} s and was killed; raise the build timeout if the GPU is busy or slow. Full log: {}; it ends with:\n{tail}", log.display())]
    Timeout {
        seconds: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("trtexec failed ({status}). Full log: {}; it ends with:\n{tail}", log.display())]
    Failed {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("trtexec exited successfully but wrote no engine at {} (or an empty one). Full log: {}; it ends with:\n{tail}", engine.display(), log.display())]
    NoEngine {
        engine: PathBuf,
        log: PathBuf,
        tail: String,
    },
}

/// A located, probed `trtexec`.
#[derive(Clone, Debug)]
pub struct Trtexec {
    path: PathBuf,
    version: String,
}

/// One engine to build.
#[derive(Clone, Debug)]
pub struct EngineJob<'a> {
    pub onnx: &'a Path,
    pub precision: EnginePrecision,
    pub target: &'a EngineTarget,
    /// The ONNX input's name (`images`).
    pub input_name: &'a str,
    /// Channels, height and width of the input.
    pub input_chw: [u64; 3],
    pub max_batch: u32,
    pub engine: &'a Path,
    pub timing_cache: &'a Path,
    /// trtexec's stdout and stderr, written to a temporary sibling while it runs and renamed
    /// here when it ends (whatever the outcome).
    pub log: &'a Path,
    pub timeout: Duration,
}

/// What a successful build reports.
#[derive(Clone, Debug)]
pub struct BuildOutput {
    pub duration: Duration,
    /// The compute capability trtexec's device report named, when it printed one.
    pub compute_capability: Option<String>,
}

/// Finds trtexec: `configured` when given (it must exist and be executable), else the first
/// `trtexec` on the PATH; `Ok(None)` when there is none.
pub fn locate(configured: Option<&Path>) -> Result<Option<PathBuf>, TrtexecError> {
    locate_in(configured, std::env::var_os("PATH"))
}

/// [`locate`] with the search path given (a `PATH`-style list).
pub fn locate_in(
    configured: Option<&Path>,
    path_var: Option<OsString>,
) -> Result<Option<PathBuf>, TrtexecError> {
    if let Some(path) = configured {
        if !path.exists() {
            return Err(TrtexecError::NotFound {
                path: path.to_path_buf(),
            });
        }
        if !is_executable(path) {
            return Err(TrtexecError::NotExecutable {
                path: path.to_path_buf(),
            });
        }
        return Ok(Some(path.to_path_buf()));
    }
    let Some(paths) = path_var else {
        return Ok(None);
    };
    Ok(std::env::split_paths(&paths)
        .map(|dir| dir.join(TRTEXEC))
        .find(|p| is_executable(p)))
}

impl Trtexec {
    /// Runs `path --help` and reads the TensorRT version from its banner. The output goes to
    /// `log` (replaced).
    pub fn probe(path: &Path, log: &Path) -> Result<Self, TrtexecError> {
        let args = [OsString::from("--help")];
        match run_logged(path, &args, log, PROBE_TIMEOUT)? {
            RunOutcome::Exited(_) => {}
            RunOutcome::TimedOut => {
                return Err(TrtexecError::Timeout {
                    seconds: PROBE_TIMEOUT.as_secs(),
                    log: log.to_path_buf(),
                    tail: log_tail(log, LOG_TAIL_LINES),
                })
            }
        }
        let text = read_log(log);
        match parse_tensorrt_version(&text) {
            Some(version) => Ok(Self {
                path: path.to_path_buf(),
                version,
            }),
            None => Err(TrtexecError::NoVersion {
                path: path.to_path_buf(),
                tail: log_tail(log, LOG_TAIL_LINES),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Dotted TensorRT version (`10.3.0`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Builds one engine. The engine file is removed again on any failure.
    pub fn build(&self, job: &EngineJob<'_>) -> Result<BuildOutput, TrtexecError> {
        if job.target.tensorrt_version != self.version {
            return Err(TrtexecError::WrongTensorRt {
                wanted: job.target.tensorrt_version.clone(),
                found: self.version.clone(),
            });
        }
        let _ = fs::remove_file(job.engine);
        let started = Instant::now();
        let outcome = run_logged(&self.path, &engine_args(job), job.log, job.timeout);
        let result = self.judge(job, outcome?, started.elapsed());
        if result.is_err() {
            let _ = fs::remove_file(job.engine);
        }
        result
    }

    fn judge(
        &self,
        job: &EngineJob<'_>,
        outcome: RunOutcome,
        duration: Duration,
    ) -> Result<BuildOutput, TrtexecError> {
        let tail = || log_tail(job.log, LOG_TAIL_LINES);
        let log = job.log.to_path_buf();
        match outcome {
            RunOutcome::TimedOut => {
                return Err(TrtexecError::Timeout {
                    seconds: job.timeout.as_secs(),
                    log,
                    tail: tail(),
                })
            }
            RunOutcome::Exited(status) if !status.success() => {
                return Err(TrtexecError::Failed {
                    status: describe(status),
                    log,
                    tail: tail(),
                })
            }
            RunOutcome::Exited(_) => {}
        }
        let size = fs::metadata(job.engine).map(|m| m.len()).unwrap_or(0);
        if size == 0 {
            return Err(TrtexecError::NoEngine {
                engine: job.engine.to_path_buf(),
                log,
                tail: tail(),
            });
        }
        let text = read_log(job.log);
        if let Some(found) = parse_tensorrt_version(&text) {
            if found != self.version {
                return Err(TrtexecError::WrongTensorRt {
                    wanted: self.version.clone(),
                    found,
                });
            }
        }
        let compute_capability = parse_compute_capability(&text);
        if let Some(found) = &compute_capability {
            if found != &job.target.compute_capability {
                return Err(TrtexecError::WrongDevice {
                    wanted: job.target.compute_capability.clone(),
                    found: found.clone(),
                    log,
                });
            }
        }
        Ok(BuildOutput {
            duration,
            compute_capability,
        })
    }
}

/// trtexec's arguments for `job` (see the module doc).
pub fn engine_args(job: &EngineJob<'_>) -> Vec<OsString> {
    let [c, h, w] = job.input_chw;
    let shape = |batch: u32| format!("{}:{batch}x{c}x{h}x{w}", job.input_name);
    let mut args = vec![
        arg("--onnx=", job.onnx),
        arg("--saveEngine=", job.engine),
        arg("--timingCacheFile=", job.timing_cache),
        OsString::from("--skipInference"),
        OsString::from(format!("--minShapes={}", shape(1))),
        OsString::from(format!("--optShapes={}", shape(1))),
        OsString::from(format!("--maxShapes={}", shape(job.max_batch))),
    ];
    match job.precision {
        EnginePrecision::Fp16 => args.push("--fp16".into()),
        EnginePrecision::Int8 => {
            args.push("--int8".into());
            args.push("--fp16".into());
        }
    }
    args
}

fn arg(flag: &str, path: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push(path.as_os_str());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_of_an_int8_build() {
        let target = EngineTarget {
            compute_capability: "8.6".into(),
            tensorrt_version: "10.3.0".into(),
        };
        let job = EngineJob {
            onnx: Path::new("/b/model-int8-qdq.onnx"),
            precision: EnginePrecision::Int8,
            target: &target,
            input_name: "images",
            input_chw: [2, 640, 640],
            max_batch: 8,
            engine: Path::new("/c/engine.plan"),
            timing_cache: Path::new("/c/timing.cache"),
            log: Path::new("/c/build.log"),
            timeout: Duration::from_secs(1),
        };
        let args: Vec<String> = engine_args(&job)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--onnx=/b/model-int8-qdq.onnx",
                "--saveEngine=/c/engine.plan",
                "--timingCacheFile=/c/timing.cache",
                "--skipInference",
                "--minShapes=images:1x2x640x640",
                "--optShapes=images:1x2x640x640",
                "--maxShapes=images:8x2x640x640",
                "--int8",
                "--fp16",
            ]
        );
    }
}
