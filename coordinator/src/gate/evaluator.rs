//! Running the configured evaluator on one exported candidate: its own process group, stdout
//! and stderr into files of the evaluation's work folder (no pipe can fill up and stall it),
//! a time limit and a cancel flag that kill the whole group (a wrapper script's children
//! too), and errors that carry the tail of its stderr.

use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::config::MODEL_PLACEHOLDER;
use super::report::{parse_scores, tail, Scores};

/// Why an evaluation gave no scores.
#[derive(Debug, thiserror::Error)]
pub enum EvaluatorError {
    #[error("cannot start the evaluator {program}: {source}; check promotion.eval_command (the program must exist and be executable)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the evaluator failed ({status}); its stderr ended with: {stderr_tail}")]
    Failed { status: String, stderr_tail: String },
    #[error("the evaluator did not finish within promotion.timeout_secs = {} and was killed; its stderr ended with: {stderr_tail}", .timeout.as_secs())]
    TimedOut {
        timeout: Duration,
        stderr_tail: String,
    },
    #[error("the evaluation was cancelled (the request ended or the coordinator is stopping)")]
    Cancelled,
    #[error(
        "the evaluator exited successfully but {reason}; its stderr ended with: {stderr_tail}"
    )]
    Output { reason: String, stderr_tail: String },
    #[error("cannot {action} {}: {source}; check the temporary folder's disk space and permissions", path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `command` (the program, then arguments with `{model}` replaced by `model`) in
/// `workdir`, which receives `stdout.txt` and `stderr.txt`; kills it after `timeout` or once
/// `cancel` is set. Blocking: run it on a blocking thread.
pub fn run(
    command: &[String],
    model: &Path,
    workdir: &Path,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Scores, EvaluatorError> {
    let (program, args) = command
        .split_first()
        .expect("a resolved eval_command names a program");
    let model_text = model.to_string_lossy();
    let args: Vec<OsString> = args
        .iter()
        .map(|a| OsString::from(a.replace(MODEL_PLACEHOLDER, &model_text)))
        .collect();
    let stdout_path = workdir.join("stdout.txt");
    let stderr_path = workdir.join("stderr.txt");
    let create = |path: &Path| {
        File::create(path).map_err(|source| EvaluatorError::Io {
            action: "create",
            path: path.to_path_buf(),
            source,
        })
    };
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(create(&stdout_path)?))
        .stderr(Stdio::from(create(&stderr_path)?));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(|source| EvaluatorError::Spawn {
        program: program.clone(),
        source,
    })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if cancel.load(Ordering::Relaxed) => {
                kill_group(&mut child);
                break Err(EvaluatorError::Cancelled);
            }
            Ok(None) if started.elapsed() >= timeout => {
                kill_group(&mut child);
                break Err(EvaluatorError::TimedOut {
                    timeout,
                    stderr_tail: String::new(),
                });
            }
            Ok(None) => std::thread::sleep(poll_interval(started.elapsed())),
            Err(source) => {
                kill_group(&mut child);
                break Err(EvaluatorError::Spawn {
                    program: program.clone(),
                    source,
                });
            }
        }
    };
    let stderr_tail = tail(&read_lossy(&stderr_path));
    match status {
        Err(EvaluatorError::TimedOut { timeout, .. }) => Err(EvaluatorError::TimedOut {
            timeout,
            stderr_tail,
        }),
        Err(e) => Err(e),
        Ok(status) if !status.success() => Err(EvaluatorError::Failed {
            status: describe(status),
            stderr_tail,
        }),
        Ok(_) => parse_scores(&read_lossy(&stdout_path)).map_err(|reason| EvaluatorError::Output {
            reason,
            stderr_tail,
        }),
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Short polls while a quick evaluator may be done, then at most 4 per second.
fn poll_interval(elapsed: Duration) -> Duration {
    (elapsed / 10).clamp(Duration::from_millis(5), Duration::from_millis(250))
}

/// Kills the child's whole process group, then reaps the child.
fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; the group was
            // created for this child by `process_group(0)` and the child is not reaped yet,
            // so its id cannot have been reused.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => "no exit status".to_string(),
    }
}
