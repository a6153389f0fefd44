//! The record of bundle pushes: which bundle goes to which plants, at what stage (canary or
//! all), and what each plant reported. Kept as `<data_dir>/bundles/rollouts.json`, written
//! atomically after every change, so a restarted coordinator carries on where it stopped.
//! The newest rollout is the one in force; older ones stay for the audit of who ran what.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use fedinspect_common::fsutil;
use serde::{Deserialize, Serialize};

/// File name of the record inside the bundle store.
pub const ROLLOUTS_FILE: &str = "rollouts.json";
/// Rollouts kept in the record; older ones are dropped (the audit log keeps every event).
const KEPT: usize = 50;

/// Why a bundle is being pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutReason {
    Promotion,
    Rollback,
}

/// Who the install task goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStage {
    /// Only the configured canary plants.
    Canary,
    /// Every registered plant.
    All,
}

/// What one plant reported about one install.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstallReportRecord {
    pub ok: bool,
    pub message: String,
    pub engine_built_locally: bool,
    pub at_unix_ms: i64,
}

/// One plant in a rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlantInstall {
    /// When the install task was last queued for the plant.
    pub sent_unix_ms: Option<i64>,
    /// Sent as a canary.
    pub canary: bool,
    pub report: Option<InstallReportRecord>,
}

/// One bundle pushed to the plants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub bundle_id: String,
    pub model_version: u64,
    pub manifest_sha256: String,
    pub reason: RolloutReason,
    pub stage: RolloutStage,
    pub started_unix_ms: i64,
    /// When the push went to every plant, and who decided it (`admin:<name>` or
    /// `coordinator` after the quiet delay).
    pub all_since_unix_ms: Option<i64>,
    pub confirmed_by: Option<String>,
    pub plants: BTreeMap<String, PlantInstall>,
}

impl Rollout {
    /// Canary plants that reported a failure.
    pub fn canary_failures(&self) -> Vec<&str> {
        self.plants
            .iter()
            .filter(|(_, p)| p.canary && p.report.as_ref().is_some_and(|r| !r.ok))
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Canary plants that reported success.
    pub fn canary_successes(&self) -> usize {
        self.plants
            .values()
            .filter(|p| p.canary && p.report.as_ref().is_some_and(|r| r.ok))
            .count()
    }

    /// Whether `plant` has reported a successful install of this bundle.
    pub fn installed_at(&self, plant: &str) -> bool {
        self.plants
            .get(plant)
            .and_then(|p| p.report.as_ref())
            .is_some_and(|r| r.ok)
    }
}

/// Every rollout, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    pub rollouts: Vec<Rollout>,
}

impl Rollouts {
    /// Reads the record in `dir`; none yet is an empty record.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(ROLLOUTS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{} is damaged ({e}); restore it from a backup or remove it to forget past \
                     bundle pushes",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the record into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let path: PathBuf = dir.join(ROLLOUTS_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        fsutil::write_atomic(&path, |w| w.write_all(&bytes))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The rollout in force.
    pub fn current(&self) -> Option<&Rollout> {
        self.rollouts.last()
    }

    pub fn current_mut(&mut self) -> Option<&mut Rollout> {
        self.rollouts.last_mut()
    }

    /// Starts `rollout`, which replaces the one in force.
    pub fn start(&mut self, rollout: Rollout) {
        self.rollouts.push(rollout);
        if self.rollouts.len() > KEPT {
            let extra = self.rollouts.len() - KEPT;
            self.rollouts.drain(..extra);
        }
    }

    /// The newest rollout of bundle `id`.
    pub fn by_bundle_mut(&mut self, id: &str) -> Option<&mut Rollout> {
        self.rollouts.iter_mut().rev().find(|r| r.bundle_id == id)
    }
}
