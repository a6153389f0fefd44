//! Watching for the one disk fault a running coordinator cannot undo by itself: once sled 0.34
//! met a full or read-only disk it keeps the error, so the `Store` refuses every write from
//! then on (`Store::database_failed`), and only a new process can write again. [`DiskWatch`]
//! notices that (or a task that stopped on a disk problem, noted by `main`), probes the data
//! directory every `storage.disk_probe_interval` (`storage::probe_usable`: free space above the
//! margin, a probe file written, fsynced and removed) and returns once the disk takes writes
//! again, so that `main` restarts the process in place (`node::restart_in_place`). Reads are
//! served all along.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::StorageSettings;
use crate::storage::{probe_usable, DiskProblem, NotUsable, Store};

/// The disk takes writes again after `problem`.
#[derive(Clone, Debug)]
pub struct Recovered {
    pub problem: DiskProblem,
    /// From the first probe that saw the problem to the one that found the disk usable.
    pub waited: Duration,
    /// Free bytes when the disk was found usable.
    pub free_bytes: u64,
}

impl std::fmt::Display for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the database had met a {}; data_dir took writes again after {:.1} s of probing ({} MiB free)",
            self.problem,
            self.waited.as_secs_f64(),
            self.free_bytes >> 20
        )
    }
}

/// A probe that has not returned within this long (a hung file system) is waited for at the
/// next interval instead of being started again.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// Watches the store and the data directory; see the module doc.
pub struct DiskWatch {
    pub store: Store,
    pub data_dir: PathBuf,
    pub settings: StorageSettings,
    /// A disk problem met outside sled by a task that then stopped (the round driver writing a
    /// blob), noted by `main`: the process needs the same restart.
    pub noted: Arc<OnceLock<DiskProblem>>,
}

impl DiskWatch {
    /// Runs until the disk is usable again after a problem (`Some`) or until `stop` (`None`).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Option<Recovered> {
        let mut tick = tokio::time::interval(self.settings.disk_probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since: Option<Instant> = None;
        let mut probe: Option<JoinHandle<Result<u64, NotUsable>>> = None;
        let mut last_reason = String::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
            let Some(problem) = self
                .store
                .database_failed()
                .or_else(|| self.noted.get().copied())
            else {
                continue;
            };
            let started = *since.get_or_insert_with(|| {
                tracing::error!(
                    %problem,
                    data_dir = %self.data_dir.display(),
                    interval_secs = self.settings.disk_probe_interval.as_secs(),
                    "the database met a {problem} and refuses writes (sled keeps the error); reads are \
                     still served; probing data_dir and restarting in place once it takes writes again"
                );
                Instant::now()
            });
            let handle = probe.get_or_insert_with(|| {
                let dir = self.data_dir.clone();
                let margin = self.settings.disk_free_margin_bytes;
                tokio::task::spawn_blocking(move || probe_usable(&dir, margin))
            });
            let result = match tokio::time::timeout(PROBE_WAIT, &mut *handle).await {
                Err(_) => {
                    tracing::warn!(
                        "the data_dir probe has not returned within {PROBE_WAIT:?}; waiting for it"
                    );
                    continue;
                }
                Ok(joined) => {
                    probe = None;
                    joined
                }
            };
            match result {
                Ok(Ok(free_bytes)) => {
                    let recovered = Recovered {
                        problem,
                        waited: started.elapsed(),
                        free_bytes,
                    };
                    tracing::warn!("{recovered}: restarting in place");
                    return Some(recovered);
                }
                Ok(Err(why)) => {
                    // Logged when the reason changes, not every interval.
                    let reason = match &why {
                        NotUsable::LowSpace { .. } => "low space".to_string(),
                        other => other.to_string(),
                    };
                    if reason != last_reason {
                        tracing::warn!(error = %why, "data_dir does not take writes yet");
                        last_reason = reason;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the data_dir probe task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_of(store: &Store, dir: &std::path::Path, margin: u64) -> DiskWatch {
        DiskWatch {
            store: store.clone(),
            data_dir: dir.to_path_buf(),
            settings: StorageSettings {
                disk_probe_interval: Duration::from_millis(10),
                disk_free_margin_bytes: margin,
                ..StorageSettings::default()
            },
            noted: Arc::new(OnceLock::new()),
        }
    }

    #[tokio::test]
    async fn a_healthy_store_is_left_alone_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(watch_of(&store, dir.path(), 0).run(rx));
        // Some twenty probe intervals: a store without a problem is never "recovered".
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished(), "no problem, no recovery");
        stop.send(true).unwrap();
        assert!(task.await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_noted_problem_is_recovered_once_the_disk_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let (_stop, rx) = watch::channel(false);
        // A margin no disk has: the problem is seen, the disk never counts as usable.
        let never = watch_of(&store, dir.path(), u64::MAX);
        let _ = never.noted.set(DiskProblem::Full);
        let waiting = tokio::spawn(never.run(rx.clone()));
        let usable = watch_of(&store, dir.path(), 0);
        let _ = usable.noted.set(DiskProblem::Full);
        let recovered = usable.run(rx).await.expect("recovered");
        assert_eq!(recovered.problem, DiskProblem::Full);
        assert!(recovered.free_bytes > 0);
        assert!(
            !waiting.is_finished(),
            "a disk below the margin is not usable"
        );
        waiting.abort();
    }
}
