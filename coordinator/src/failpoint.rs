//! A test hook, not a feature: named crash points. When the environment variable
//! `FEDINSPECT_TEST_CRASH_AT=<name>[:<nth>]` names a point, the process kills itself with
//! SIGKILL the `nth` time (default 1) it passes that point: no destructor runs, nothing is
//! flushed, exactly like `kill -9` from outside. The fault tests
//! (`tests/fault_kill_rounds.rs`, `scripts/fault_soak.sh`) use it to stop the coordinator at a
//! chosen step of an upload or a publish; see docs/reliability.md, "Faults: crashes".
//!
//! The variable is read once, at the first point passed; unset, each point costs one load of an
//! initialised `OnceLock` and a branch. Never set it in production.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that arms one point.
pub const ENV: &str = "FEDINSPECT_TEST_CRASH_AT";

/// A whole upload received and checked, its temporary file not yet fsynced.
pub const INTAKE_BEFORE_FSYNC: &str = "intake.before_fsync";
/// An upload fsynced and renamed into the blob store, its sled record not yet written.
pub const INTAKE_AFTER_FSYNC: &str = "intake.after_fsync";
/// An update's sled record written and flushed, the acknowledgement not yet returned.
pub const INTAKE_AFTER_FLUSH: &str = "intake.after_flush";
/// An acknowledgement handed to gRPC: the process dies [`ACK_GRACE`] later, once the reply
/// is on its way (or the next step has started).
pub const UPLOAD_AFTER_ACK: &str = "upload.after_ack";
/// One range of a stored update read back (every tile an aggregation reads, per update and
/// tensor; also the running mean's rebuild after a restart).
pub const AGGREGATE_READ_TILE: &str = "aggregate.read_tile";
/// A new version's model blob written, its sled record not yet (also version 1 at init).
pub const PUBLISH_AFTER_BLOB: &str = "publish.after_blob";
/// A new version's record and its round's published state written (one sled transaction,
/// so there is no point between the two), not yet flushed.
pub const PUBLISH_AFTER_RECORD: &str = "publish.after_record";
/// A new version flushed; retention and the next round not yet started.
pub const PUBLISH_AFTER_FLUSH: &str = "publish.after_flush";
/// Retention's mark written and flushed, the old update blobs not yet removed.
pub const RETENTION_AFTER_MARK: &str = "retention.after_mark";

/// Every point, in the order a round passes them.
pub const POINTS: &[&str] = &[
    INTAKE_BEFORE_FSYNC,
    INTAKE_AFTER_FSYNC,
    INTAKE_AFTER_FLUSH,
    UPLOAD_AFTER_ACK,
    AGGREGATE_READ_TILE,
    PUBLISH_AFTER_BLOB,
    PUBLISH_AFTER_RECORD,
    PUBLISH_AFTER_FLUSH,
    RETENTION_AFTER_MARK,
];

/// How long [`hit_deferred`] waits before the kill.
pub const ACK_GRACE: Duration = Duration::from_millis(30);

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Kills the process here if [`ENV`] names `point` and this is its `nth` pass.
#[inline]
pub fn hit(point: &str) {
    if armed_for(point) {
        die(point);
    }
}

/// As [`hit`], but the kill comes [`ACK_GRACE`] later from another thread, so that what the
/// caller returns next (a reply) can leave first.
#[inline]
pub fn hit_deferred(point: &'static str) {
    if armed_for(point) {
        std::thread::spawn(move || {
            std::thread::sleep(ACK_GRACE);
            die(point);
        });
    }
}

fn armed_for(point: &str) -> bool {
    let Some(a) = ARMED.get_or_init(read_env) else {
        return false;
    };
    a.name == point && a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.nth
}

fn read_env() -> Option<Armed> {
    let value = std::env::var(ENV).ok()?;
    match parse(&value) {
        Ok((name, nth)) => Some(Armed {
            name,
            nth,
            hits: AtomicU64::new(0),
        }),
        Err(why) => {
            eprintln!("{ENV}={value} ignored: {why}");
            None
        }
    }
}

/// `<name>[:<nth>]` with a known name and nth ≥ 1.
fn parse(value: &str) -> Result<(String, u64), String> {
    let (name, nth) = match value.split_once(':') {
        Some((name, n)) => (
            name,
            n.parse::<u64>()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or(format!("'{n}' is not a count of 1 or more"))?,
        ),
        None => (value, 1),
    };
    if !POINTS.contains(&name) {
        return Err(format!(
            "'{name}' is not a crash point; use one of {}",
            POINTS.join(", ")
        ));
    }
    Ok((name.to_string(), nth))
}

fn die(point: &str) -> ! {
    // One unbuffered line, so that a test log shows why the process ended.
    eprintln!("{ENV}: killing this process at {point}");
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_counts_are_checked() {
        assert_eq!(
            parse("publish.after_blob"),
            Ok(("publish.after_blob".into(), 1))
        );
        assert_eq!(
            parse("aggregate.read_tile:4"),
            Ok(("aggregate.read_tile".into(), 4))
        );
        assert!(parse("publish.after_blob:0").unwrap_err().contains("count"));
        assert!(parse("intake.typo")
            .unwrap_err()
            .contains("intake.before_fsync"));
    }
}
