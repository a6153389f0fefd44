//! The `[storage]` section: what the coordinator does after its database met a full or
//! read-only disk (sled 0.34 keeps such an error, so only a new process can write again), and
//! how it watches the data directory for the disk to be usable again.
//!
//! ```toml
//! [storage]
//! restart_when_disk_recovers = true   # restart in place (same PID) once the disk is usable
//! disk_probe_interval_secs = 5        # how often the data directory is probed meanwhile
//! disk_free_margin_mib = 64           # free space needed before the disk counts as usable
//! restart_grace_secs = 5              # in-flight transfers get this long before the restart
//! ```

use std::time::Duration;

use fedinspect_common::config_problems::Problems;
use serde::Deserialize;

/// `[storage]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub restart_when_disk_recovers: Option<bool>,
    pub disk_probe_interval_secs: Option<u64>,
    pub disk_free_margin_mib: Option<u64>,
    pub restart_grace_secs: Option<u64>,
}

/// The checked `[storage]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageSettings {
    /// After the database met a disk problem, restart the process in place (exec of the same
    /// binary, argv and environment) once the data directory is usable again. Off: writes are
    /// refused until an operator restarts the coordinator.
    pub restart_when_disk_recovers: bool,
    /// How often the data directory is probed while the database refuses writes.
    pub disk_probe_interval: Duration,
    /// Free space (for unprivileged users, as `statvfs` reports it) the data directory's file
    /// system needs before it counts as usable again.
    pub disk_free_margin_bytes: u64,
    /// How long transfers in flight may finish before the restart.
    pub restart_grace: Duration,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            restart_when_disk_recovers: true,
            disk_probe_interval: Duration::from_secs(5),
            disk_free_margin_bytes: 64 << 20,
            restart_grace: Duration::from_secs(5),
        }
    }
}

/// Resolves `[storage]`, pushing every problem to `p`.
pub fn storage_settings(raw: RawStorage, p: &mut Problems) -> StorageSettings {
    let d = StorageSettings::default();
    let interval = raw
        .disk_probe_interval_secs
        .unwrap_or(d.disk_probe_interval.as_secs());
    if interval == 0 {
        p.push("storage.disk_probe_interval_secs: must be at least 1".into());
    }
    let margin_mib = raw
        .disk_free_margin_mib
        .unwrap_or(d.disk_free_margin_bytes >> 20);
    let margin = margin_mib.checked_mul(1 << 20).unwrap_or_else(|| {
        p.push(format!(
            "storage.disk_free_margin_mib: {margin_mib} is too large; give MiB, e.g. 64"
        ));
        d.disk_free_margin_bytes
    });
    StorageSettings {
        restart_when_disk_recovers: raw
            .restart_when_disk_recovers
            .unwrap_or(d.restart_when_disk_recovers),
        disk_probe_interval: Duration::from_secs(interval.max(1)),
        disk_free_margin_bytes: margin,
        restart_grace: raw
            .restart_grace_secs
            .map(Duration::from_secs)
            .unwrap_or(d.restart_grace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> (StorageSettings, Vec<String>) {
        let raw: RawStorage = toml::from_str(text).unwrap();
        let mut p = Problems::new("coordinator.example.toml", "");
        let s = storage_settings(raw, &mut p);
        (s, p.into_vec())
    }

    #[test]
    fn defaults_restart_in_place() {
        let (s, problems) = resolve("");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s, StorageSettings::default());
        assert!(s.restart_when_disk_recovers);
    }

    #[test]
    fn values_are_read_and_checked() {
        let (s, problems) = resolve(
            "restart_when_disk_recovers = false\ndisk_probe_interval_secs = 2\n\
             disk_free_margin_mib = 1\nrestart_grace_secs = 0",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!s.restart_when_disk_recovers);
        assert_eq!(s.disk_probe_interval, Duration::from_secs(2));
        assert_eq!(s.disk_free_margin_bytes, 1 << 20);
        assert_eq!(s.restart_grace, Duration::ZERO);
        let (_, problems) =
            resolve("disk_probe_interval_secs = 0\ndisk_free_margin_mib = 17592186044416");
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
