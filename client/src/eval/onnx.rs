//! The onnxruntime worker: a Python process running `scripts/onnx_infer.py` (embedded in the
//! binary and passed to `python -c`, so no checkout is needed at run time) that holds one ONNX
//! model and answers image batches over stdin/stdout. Only the network runs there: loading,
//! letterboxing, decoding and mAP stay this crate's code, so tch and onnxruntime figures share
//! one definition (`client eval-onnx`, `client bench --onnx`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Deserialize;

/// The worker's source, run with `python -c`.
pub const WORKER_SCRIPT: &str = include_str!("../../../scripts/onnx_infer.py");

/// Bytes of the worker's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error("cannot start {python}: {source}; pass --runtime-python (or set FEDINSPECT_PYTHON) to an interpreter with onnxruntime, e.g. the one `scripts/install-torch.sh` prints")]
    Start {
        python: String,
        source: std::io::Error,
    },
    #[error("{python} has no onnxruntime or numpy: {stderr}")]
    MissingRuntime { python: String, stderr: String },
    #[error("the onnxruntime worker stopped ({status}): {stderr}")]
    Exited { status: String, stderr: String },
    #[error("the onnxruntime worker broke the protocol: {0}; check that scripts/onnx_infer.py and the client come from the same build")]
    Protocol(String),
    #[error("onnxruntime: {0}")]
    Run(String),
    #[error("batch of {values} values does not have shape {shape:?}")]
    Shape { values: usize, shape: [usize; 4] },
}

/// How to start a worker.
#[derive(Clone, Debug)]
pub struct OrtOptions {
    /// An interpreter with onnxruntime and numpy.
    pub python: PathBuf,
    /// onnxruntime intra-op threads.
    pub threads: usize,
    /// onnxruntime's graph optimisations (off runs the graph exactly as written).
    pub optimize: bool,
}

impl OrtOptions {
    /// `$FEDINSPECT_PYTHON`, else `python3`, with `threads` threads and optimisations on.
    pub fn from_env(threads: usize) -> Self {
        let python = std::env::var_os("FEDINSPECT_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("python3"));
        Self {
            python,
            threads,
            optimize: true,
        }
    }
}

/// What the worker said when it had loaded the model.
#[derive(Clone, Debug, Deserialize)]
pub struct WorkerInfo {
    pub onnxruntime: String,
    pub input: String,
    pub outputs: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// One output of a run, float32 in C order.
#[derive(Clone, Debug)]
pub struct OrtOutput {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl OrtOutput {
    /// The values as a tch tensor of the output's shape (for `detector::decode`).
    pub fn to_tch(&self) -> Result<tch::Tensor, tch::TchError> {
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        tch::Tensor::f_from_slice(&self.data)?.f_view(shape.as_slice())
    }
}

/// The outputs of one batch and the time `session.run` took inside the worker.
#[derive(Clone, Debug)]
pub struct OrtRun {
    pub outputs: Vec<OrtOutput>,
    pub runtime_seconds: f64,
}

impl OrtRun {
    pub fn output(&self, name: &str) -> Result<&OrtOutput, OrtError> {
        self.outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| OrtError::Protocol(format!("no output '{name}' in the answer")))
    }
}

#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: String,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    outputs: Vec<OutputHeader>,
}

#[derive(Deserialize)]
struct OutputHeader {
    name: String,
    shape: Vec<usize>,
}

/// A running worker holding one model; stopped (end of input, then kill) on drop.
pub struct OrtWorker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    python: String,
    info: WorkerInfo,
}

impl OrtWorker {
    /// Starts a worker on `model` and waits until onnxruntime has loaded it.
    pub fn start(model: &Path, options: &OrtOptions) -> Result<Self, OrtError> {
        let python = options.python.display().to_string();
        let mut command = Command::new(&options.python);
        command
            .arg("-c")
            .arg(WORKER_SCRIPT)
            .arg(model)
            .arg("--threads")
            .arg(options.threads.max(1).to_string());
        if !options.optimize {
            command.arg("--no-optimize");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| OrtError::Start {
                python: python.clone(),
                source,
            })?;
        let (Some(stdin), Some(stdout), Some(mut err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(OrtError::Protocol("the worker's pipes are missing".into()));
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                if s.len() > 2 * STDERR_TAIL {
                    let cut = s.len() - STDERR_TAIL;
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    s.drain(..cut);
                }
            }
        });
        let mut worker = Self {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            stderr,
            stderr_thread: Some(stderr_thread),
            python,
            info: WorkerInfo {
                onnxruntime: String::new(),
                input: String::new(),
                outputs: Vec::new(),
                metadata: BTreeMap::new(),
            },
        };
        let line = worker.read_line()?;
        worker.info = serde_json::from_str(&line)
            .map_err(|e| OrtError::Protocol(format!("ready line {line:?}: {e}")))?;
        Ok(worker)
    }

    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// Runs the model on `images` of `shape` (`[N, C, H, W]`, float32 C order).
    pub fn run(&mut self, images: &[f32], shape: [usize; 4]) -> Result<OrtRun, OrtError> {
        let values = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if values != Some(images.len()) || images.is_empty() {
            return Err(OrtError::Shape {
                values: images.len(),
                shape,
            });
        }
        let mut bytes = Vec::with_capacity(images.len() * 4 + 64);
        bytes.extend_from_slice(format!("{{\"shape\": {shape:?}}}\n").as_bytes());
        for v in images {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(&bytes).and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if written.is_err() {
            return Err(self.exited());
        }
        let line = self.read_line()?;
        let answer: Answer = serde_json::from_str(&line)
            .map_err(|e| OrtError::Protocol(format!("answer {line:?}: {e}")))?;
        if !answer.ok {
            return Err(OrtError::Run(answer.error));
        }
        let mut outputs = Vec::with_capacity(answer.outputs.len());
        for header in answer.outputs {
            let count = header.shape.iter().product::<usize>();
            let mut raw = vec![0u8; count * 4];
            if self.stdout.read_exact(&mut raw).is_err() {
                return Err(self.exited());
            }
            let data = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            outputs.push(OrtOutput {
                name: header.name,
                shape: header.shape,
                data,
            });
        }
        Ok(OrtRun {
            outputs,
            runtime_seconds: answer.seconds,
        })
    }

    fn read_line(&mut self) -> Result<String, OrtError> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(n) if n > 0 => Ok(line),
            _ => Err(self.exited()),
        }
    }

    /// The error for a worker that stopped answering: its exit status and stderr.
    fn exited(&mut self) -> OrtError {
        self.stdin = None;
        let status = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trim()
            .to_string();
        let python = self.python.clone();
        match status {
            Ok(s) if s.code() == Some(3) => OrtError::MissingRuntime { python, stderr },
            Ok(s) => OrtError::Exited {
                status: s.to_string(),
                stderr,
            },
            Err(e) => OrtError::Exited {
                status: e.to_string(),
                stderr,
            },
        }
    }
}

impl Drop for OrtWorker {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"{\"quit\": true}\n");
        }
        // The worker exits on quit; a stuck one is killed rather than waited for forever.
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
    }
}
