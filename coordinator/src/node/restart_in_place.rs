//! Restarting the coordinator in place after its disk recovered (`node::disk_recovery`): the
//! process execs its own binary (`/proc/self/exe`) with the same argv, working directory and
//! environment, so it keeps its PID (and its supervisor's view of it). exec ends every thread
//! at once and closes every close-on-exec descriptor, which releases sled's file lock and the
//! listening sockets; for the data that is exactly a SIGKILL followed by a start, which the crash
//! suite shows loses nothing. A [`Marker`] in an environment variable tells the new process
//! why it started, so that it audits the restart and counts it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use crate::hub::Hub;
use crate::records::AuditKind;

/// The environment variable that carries the [`Marker`] through exec; read and removed at
/// start, so no child process inherits it.
pub const MARKER_ENV: &str = "FEDINSPECT_RESTARTED_IN_PLACE";

/// Why this process was started by a restart in place, and how many there were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Restarts in place of this PID so far, this one included.
    pub count: u64,
    pub reason: String,
}

impl Marker {
    fn encode(&self) -> String {
        format!("{} {}", self.count, self.reason)
    }

    fn decode(text: &str) -> Option<Self> {
        let (count, reason) = text.split_once(' ')?;
        Some(Self {
            count: count.parse().ok()?,
            reason: reason.to_string(),
        })
    }

    /// The marker of the next restart in place after this process, started by `previous`.
    pub fn next(previous: Option<&Marker>, reason: String) -> Self {
        Self {
            count: previous.map_or(0, |m| m.count) + 1,
            reason,
        }
    }
}

/// Reads and removes [`MARKER_ENV`]. Call at the start of `main`, before any thread starts
/// (removing an environment variable is not safe while other threads read the environment).
pub fn take_marker() -> Option<Marker> {
    let value = std::env::var(MARKER_ENV).ok()?;
    std::env::remove_var(MARKER_ENV);
    let marker = Marker::decode(&value);
    if marker.is_none() {
        tracing::warn!(%value, "ignoring a malformed {MARKER_ENV}");
    }
    marker
}

/// Audits and counts the restart in place that started this process.
pub fn record(hub: &Hub, marker: &Marker) {
    tracing::warn!(
        restarts = marker.count,
        "restarted in place (same PID {}): {}",
        std::process::id(),
        marker.reason
    );
    hub.metrics.restarted_in_place(marker.count);
    hub.audit_event(
        AuditKind::Other,
        "coordinator",
        "restart_in_place",
        None,
        &format!(
            "the coordinator restarted itself in place (PID {}, restart {} of this process): {}",
            std::process::id(),
            marker.count,
            marker.reason
        ),
    );
}

/// Replaces this process by a new run of the same binary with the same arguments and
/// environment plus `marker`. Returns only if exec failed.
pub fn exec(marker: &Marker) -> std::io::Error {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("coordinator"));
    tracing::warn!(
        restart = marker.count,
        "exec /proc/self/exe {:?} (restart in place)",
        std::env::args_os().skip(1).collect::<Vec<_>>()
    );
    std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(MARKER_ENV, marker.encode())
        .exec()
}

/// Starts a thread that [`exec`]s after `delay` whatever the rest of the process is doing: a
/// restart in place must not wait on a drain that a stuck storage call holds up.
pub fn exec_after(delay: std::time::Duration, marker: Marker) {
    let started = std::thread::Builder::new()
        .name("restart-watchdog".into())
        .spawn(move || {
            std::thread::sleep(delay);
            tracing::warn!("the drain has not ended within {delay:?}: restarting in place now");
            let e = exec(&marker);
            tracing::error!(error = %e, "cannot restart in place (exec /proc/self/exe); restart the coordinator");
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the restart watchdog; relying on the drain's deadline");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_survives_its_text_and_counts_up() {
        let first = Marker::next(None, "the database had met a full disk".into());
        assert_eq!(first.count, 1);
        let read = Marker::decode(&first.encode()).unwrap();
        assert_eq!(read, first);
        assert_eq!(Marker::next(Some(&read), "again".into()).count, 2);
        assert_eq!(Marker::decode("x why"), None);
        assert_eq!(Marker::decode("3"), None);
    }
}
