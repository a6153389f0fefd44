//! Running trtexec as a child process: its own process group, stdout and stderr into a log
//! that is renamed into place when it ends, a time limit that kills the whole group, and the
//! tail of a log for error messages.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::TrtexecError;

/// The last `lines` lines of the file at `path` (at most the last 64 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = File::open(path) else {
        return format!("(log {} unreadable)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(super) fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

pub(super) enum RunOutcome {
    Exited(ExitStatus),
    TimedOut,
}

/// Runs `program args` in its own process group with stdout and stderr going to a temporary
/// sibling of `log`, renamed to `log` when it ends; kills the group at `timeout`.
pub(super) fn run_logged(
    program: &Path,
    args: &[OsString],
    log: &Path,
    timeout: Duration,
) -> Result<RunOutcome, TrtexecError> {
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| TrtexecError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let partial = partial_log(log);
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(io_err("create", &partial))?;
    let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
    writeln!(
        out,
        "# fedinspect ran: {} {}",
        program.display(),
        shown.join(" ")
    )
    .map_err(io_err("write", &partial))?;
    let err = out.try_clone().map_err(io_err("write", &partial))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(source) => {
            let _ = fs::remove_file(&partial);
            return Err(TrtexecError::Spawn {
                path: program.to_path_buf(),
                source,
            });
        }
    };
    let started = Instant::now();
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => break RunOutcome::Exited(status),
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(poll_interval(timeout)),
            Ok(None) => {
                kill_group(&mut child);
                break RunOutcome::TimedOut;
            }
            Err(source) => {
                kill_group(&mut child);
                return Err(TrtexecError::Spawn {
                    path: program.to_path_buf(),
                    source,
                });
            }
        }
    };
    if let RunOutcome::TimedOut = outcome {
        let note = format!(
            "\n# fedinspect: killed after {:.1} s (time limit)\n",
            timeout.as_secs_f64()
        );
        let _ = OpenOptions::new()
            .append(true)
            .open(&partial)
            .and_then(|mut f| f.write_all(note.as_bytes()));
    }
    File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", &partial))?;
    fs::rename(&partial, log).map_err(io_err("rename", log))?;
    Ok(outcome)
}

fn partial_log(log: &Path) -> PathBuf {
    let name = log
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "trtexec.log".into());
    log.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(5), Duration::from_millis(100))
}

/// Kills the child's whole process group (a wrapper script's children too), then reaps it.
fn kill_group(child: &mut std::process::Child) {
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

pub(super) fn describe(status: ExitStatus) -> String {
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

pub(super) fn is_executable(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}
