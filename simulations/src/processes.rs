//! Child processes of a federation on this machine: the `coordinator` and `client` binaries
//! ([`Binaries`]), each started ([`Process`]) in its own process group with its output in its
//! own log file, and stopped with SIGTERM, then SIGKILL after a grace period. A `Process` that
//! is dropped while running is stopped the same way, so a run that fails or panics leaves no
//! process behind; on Linux a child is also sent SIGTERM if this program dies outright.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a dropped, still running process gets between SIGTERM and SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(10);
/// How often a stopping process is checked.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the {name} binary is not in {}; build it with `{build}`", dir.display())]
    MissingBinary {
        name: &'static str,
        dir: PathBuf,
        build: String,
    },
    #[error("cannot find the folder of this program: {0}")]
    CurrentExe(io::Error),
    #[error("cannot create the log file {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {name} ({}): {source}", program.display())]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The federation's binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub coordinator: PathBuf,
    pub client: PathBuf,
}

impl Binaries {
    /// The binaries in `dir` (a cargo profile folder such as `target/release`); a missing one
    /// is named with the command that builds it.
    pub fn in_dir(dir: &Path) -> Result<Self, ProcessError> {
        let find = |name: &'static str| {
            let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            if path.is_file() {
                Ok(path)
            } else {
                let release = if dir.ends_with("release") {
                    " --release"
                } else {
                    ""
                };
                Err(ProcessError::MissingBinary {
                    name,
                    dir: dir.to_path_buf(),
                    build: format!(
                        "scripts/cargo build{release} -p fedinspect-coordinator -p fedinspect-client"
                    ),
                })
            }
        };
        Ok(Self {
            coordinator: find("coordinator")?,
            client: find("client")?,
        })
    }

    /// The binaries beside the running program (`simulate` in `target/release` finds
    /// `target/release/coordinator` and `target/release/client`).
    pub fn beside_current_exe() -> Result<Self, ProcessError> {
        let exe = std::env::current_exe().map_err(ProcessError::CurrentExe)?;
        let dir = exe.parent().ok_or_else(|| {
            ProcessError::CurrentExe(io::Error::other("the program path has no folder"))
        })?;
        Self::in_dir(dir)
    }
}

/// A running child process and its log file.
pub struct Process {
    name: String,
    log: PathBuf,
    child: Child,
    /// Set once the process was waited for.
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `program args` as `name`, its stdout and stderr appended to `log`.
    pub fn spawn<I, S>(
        name: &str,
        program: &Path,
        args: I,
        log: &Path,
    ) -> Result<Self, ProcessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log_err = |source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        };
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).map_err(log_err)?;
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Plain text in the log files (tracing's terminal colours honour NO_COLOR).
            .env("NO_COLOR", "1");
        detach_from_terminal_signals(&mut cmd);
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_string(),
            program: program.to_path_buf(),
            source,
        })?;
        Ok(Self {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status once the process has ended, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // An error here means the child was already reaped, which only `wait` does.
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.exited() {
            return s;
        }
        let _ = self.child.kill();
        self.reap()
    }

    /// Sends SIGTERM (a clean stop) unless the process has ended.
    pub fn terminate(&mut self) {
        if self.exited().is_none() {
            signal(self.child.id(), libc::SIGTERM);
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL if it is still running after `grace`.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        stop_all(&mut [self], grace)[0]
    }

    /// The last `lines` lines of the log, to show why a process ended.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn reap(&mut self) -> ExitStatus {
        let status = self
            .child
            .wait()
            .expect("a spawned child can be waited for");
        self.status = Some(status);
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.stop(DROP_GRACE);
        }
    }
}

/// Stops every process together: SIGTERM to all, then SIGKILL to those still running after
/// `grace`. Returns the exit statuses in order.
pub fn stop_all(procs: &mut [&mut Process], grace: Duration) -> Vec<ExitStatus> {
    for p in procs.iter_mut() {
        p.terminate();
    }
    let until = Instant::now() + grace;
    while Instant::now() < until && procs.iter_mut().any(|p| p.exited().is_none()) {
        std::thread::sleep(POLL);
    }
    procs
        .iter_mut()
        .map(|p| match p.exited() {
            Some(s) => s,
            None => p.kill(),
        })
        .collect()
}

/// Describes how a process ended, e.g. "exit code 1" or "signal 9".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory effects; the pid is our own unreaped child's.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Puts the child in its own process group, so a Ctrl-C at the terminal reaches only this
/// program, which then stops its children in order; on Linux the child also gets SIGTERM
/// when this program dies without stopping it.
fn detach_from_terminal_signals(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is async-signal-safe.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other(
                        "the parent exited before the child started",
                    ));
                }
                Ok(())
            });
        }
    }
}
