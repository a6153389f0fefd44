//! [`BundlePush`]: what happens to bundles after an admin promotes or rolls back a version.
//!
//! Promotion builds the version's signed bundle (on a blocking thread, one build at a time),
//! stores it and starts a rollout: the install task goes to the configured canary plants
//! first, then to every registered plant once an admin confirms ([`BundlePush::confirm`]) or,
//! if `confirm_after_secs` is set, once that long has passed with at least one canary success
//! and no canary failure. A rollback pushes the bundle of the version rolled back to, to every
//! plant at once (it is already known good). Plants report each install
//! ([`BundlePush::report`]); reports are kept in the rollout record and audited.
//!
//! Builds use the INT8 calibration ranges the round's contributors sent
//! ([`BundlePush::record_calibration`]), merged, when they cover the whole model.
//!
//! Tasks only reach plants whose task stream is open: [`BundlePush::run`] watches the hub and
//! sends the task to a plant when it connects, and again after `resend_secs` without a report.
//! Installing a bundle twice changes nothing at the plant, so a resend is harmless.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedinspect_common::onnx::{qdq, ActivationRanges};
use tokio::sync::watch;

use super::builder::{BuiltBundle, BundleBuilder, BundleSetupError, ModelForBundle};
use super::config::{BundleConfig, PushPolicy};
use super::rollout::{
    InstallReportRecord, PlantInstall, Rollout, RolloutReason, RolloutStage, Rollouts,
};
use super::store::BundleStore;
use crate::error::CoreError;
use crate::hub::{Hub, InstallBundleTask, PlantTask};
use crate::records::{now_unix_ms, AuditKind};
use crate::versions::Versions;

/// How often the push loop looks at the plants even when nothing changes.
const TICK: Duration = Duration::from_secs(1);

/// A plant's result of an install task.
#[derive(Clone, Debug, PartialEq)]
pub struct InstallResult {
    pub bundle_id: String,
    pub ok: bool,
    pub message: String,
    pub engine_built_locally: bool,
}

/// The bundle builder, the rollout record and the push policy.
pub struct BundlePush {
    config: BundleConfig,
    builder: BundleBuilder,
    /// One build at a time (the engine cache is single-writer).
    building: Mutex<()>,
    rollouts: Mutex<Rollouts>,
    /// The last build failure, shown by `coordinator admin bundle status`.
    last_error: Mutex<Option<String>>,
}

impl BundlePush {
    /// Opens the bundle store and the rollout record, and settles the engine policy.
    pub fn start(
        config: BundleConfig,
        path_var: Option<OsString>,
    ) -> Result<Self, BundleSetupError> {
        let builder = BundleBuilder::start(config.build.clone(), path_var)?;
        let rollouts = Rollouts::load(builder.store().root()).map_err(BundleSetupError::Record)?;
        if let Some(note) = builder.engine_note() {
            tracing::info!(note, "bundles carry ONNX only");
        }
        Ok(Self {
            config,
            builder,
            building: Mutex::new(()),
            rollouts: Mutex::new(rollouts),
            last_error: Mutex::new(None),
        })
    }

    pub fn store(&self) -> &BundleStore {
        self.builder.store()
    }

    pub fn policy(&self) -> &PushPolicy {
        &self.config.push
    }

    /// Why bundles carry no engines, when they do not.
    pub fn engine_note(&self) -> Option<&str> {
        self.builder.engine_note()
    }

    /// The rollout in force.
    pub fn current(&self) -> Option<Rollout> {
        lock(&self.rollouts).current().cloned()
    }

    /// Every kept rollout, oldest first.
    pub fn rollouts(&self) -> Vec<Rollout> {
        lock(&self.rollouts).rollouts.clone()
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Builds `version`'s bundle and starts its rollout, in the background: promotion and
    /// rollback return at once. Failures are audited and shown in the bundle status.
    pub fn push_version(
        self: &Arc<Self>,
        hub: &Arc<Hub>,
        version: u64,
        reason: RolloutReason,
    ) -> tokio::task::JoinHandle<()> {
        let (this, hub) = (self.clone(), hub.clone());
        tokio::spawn(async move {
            let built = {
                let (this, hub) = (this.clone(), hub.clone());
                tokio::task::spawn_blocking(move || this.build_version(&hub, version)).await
            };
            let built = match built {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return this.build_failed(&hub, version, &e.to_string()),
                Err(e) => return this.build_failed(&hub, version, &e.to_string()),
            };
            if let Err(e) = this.start_rollout(&hub, &built, reason) {
                this.build_failed(&hub, version, &e.to_string());
            }
        })
    }

    /// Pushes the promoted `version` again when the rollout in force is of another version
    /// (its build failed, or it was promoted before bundles were configured, like version 1).
    pub fn push_if_not_pushed(self: &Arc<Self>, hub: &Arc<Hub>, version: u64) {
        if self.current().map(|r| r.model_version) != Some(version) {
            self.push_version(hub, version, RolloutReason::Promotion);
        }
    }

    fn build_failed(&self, hub: &Hub, version: u64, why: &str) {
        let line = format!(
            "version {version}: no bundle built or pushed: {why}; fix the cause and promote \
             the version again (coordinator admin promote {version})"
        );
        tracing::error!(version, error = why, "bundle build failed");
        hub.audit_event(AuditKind::Other, "coordinator", "bundle_build", None, &line);
        *lock(&self.last_error) = Some(line);
    }

    /// Builds (or finds) the bundle of `version`; blocking.
    pub fn build_version(&self, hub: &Hub, version: u64) -> Result<BuiltBundle, CoreError> {
        let _one_at_a_time = lock(&self.building);
        let versions = Versions {
            store: &hub.store,
            blobs: &hub.blobs,
            signer: &hub.signer,
        };
        let (record, state) = versions.load(version)?;
        let contributors: Vec<&str> = record
            .contributors
            .iter()
            .map(|c| c.plant_id.as_str())
            .collect();
        let calibration = self.merged_calibration(record.round, &contributors);
        let model = ModelForBundle {
            version,
            arch: &self.config.model.arch,
            state: &state,
            class_names: self.config.model.class_names.clone(),
            metrics: record.metrics.clone(),
            calibration: calibration.as_ref(),
        };
        let built = self.builder.build(&model, &hub.signer).map_err(|e| {
            CoreError::Internal(format!("building the bundle of version {version}: {e}"))
        })?;
        let engines: Vec<String> = built
            .engines
            .iter()
            .map(|(e, cache)| format!("{} {} ({cache:?})", e.precision, e.target))
            .collect();
        hub.audit_event(
            AuditKind::Other,
            "coordinator",
            "bundle_build",
            None,
            &format!(
                "version {version}: bundle {} built, archive {} bytes, export {:.2} s, engines: {}",
                built.id,
                built.archive_bytes,
                built.export_seconds,
                if engines.is_empty() {
                    format!("none ({})", built.manifest.engine_note)
                } else {
                    engines.join(", ")
                }
            ),
        );
        *lock(&self.last_error) = None;
        Ok(built)
    }

    /// Records a new rollout of `built` and sends its task to the plants it goes to now.
    pub fn start_rollout(
        &self,
        hub: &Hub,
        built: &BuiltBundle,
        reason: RolloutReason,
    ) -> Result<Rollout, CoreError> {
        let canaries = &self.config.push.canary_plants;
        let now = now_unix_ms();
        let stage = if reason == RolloutReason::Promotion && !canaries.is_empty() {
            RolloutStage::Canary
        } else {
            RolloutStage::All
        };
        let rollout = Rollout {
            bundle_id: built.id.clone(),
            model_version: built.manifest.model_version,
            manifest_sha256: built.manifest_sha256.clone(),
            reason,
            stage,
            started_unix_ms: now,
            all_since_unix_ms: (stage == RolloutStage::All).then_some(now),
            confirmed_by: None,
            plants: Default::default(),
        };
        {
            let mut rollouts = lock(&self.rollouts);
            rollouts.start(rollout);
            self.save(&rollouts)?;
        }
        let to = match stage {
            RolloutStage::Canary => format!("canary plants {}", canaries.join(", ")),
            RolloutStage::All => "every plant".into(),
        };
        hub.audit_event(
            AuditKind::Other,
            "coordinator",
            "bundle_push",
            None,
            &format!(
                "bundle {} (version {}, {reason:?}) pushed to {to}",
                built.id, built.manifest.model_version
            ),
        );
        self.send_due(hub, &BTreeSet::new())?;
        Ok(self.current().expect("just started"))
    }

    /// Sends the rollout of `version` to every plant. Refused when the rollout in force is of
    /// another version, is not at the canary stage, or (without `force`) a canary failed.
    pub fn confirm(
        &self,
        hub: &Hub,
        actor: &str,
        version: u64,
        force: bool,
    ) -> Result<Rollout, CoreError> {
        {
            let mut rollouts = lock(&self.rollouts);
            let Some(r) = rollouts.current_mut() else {
                return Err(CoreError::AdminRefused(
                    "no bundle has been pushed yet; promote a version first".into(),
                ));
            };
            if r.model_version != version {
                return Err(CoreError::AdminRefused(format!(
                    "the bundle being pushed is of version {}, not {version}; see `coordinator \
                     admin bundle status`",
                    r.model_version
                )));
            }
            if r.stage == RolloutStage::All {
                return Err(CoreError::AdminRefused(format!(
                    "bundle {} already goes to every plant",
                    r.bundle_id
                )));
            }
            let failed = r.canary_failures();
            if !failed.is_empty() && !force {
                return Err(CoreError::AdminRefused(format!(
                    "canary plant(s) {} failed to install bundle {}; read their reports in \
                     `coordinator admin bundle status`, or pass --force to push it anyway",
                    failed.join(", "),
                    r.bundle_id
                )));
            }
            r.stage = RolloutStage::All;
            r.all_since_unix_ms = Some(now_unix_ms());
            r.confirmed_by = Some(actor.to_string());
            self.save(&rollouts)?;
        }
        hub.audit_event(
            AuditKind::Other,
            actor,
            "bundle_confirm",
            None,
            &format!("bundle of version {version} pushed to every plant (force: {force})"),
        );
        self.send_due(hub, &BTreeSet::new())?;
        Ok(self.current().expect("a rollout is in force"))
    }

    /// Stores the activation ranges `plant` measured after training in `round` (the caller has
    /// checked that the round accepted the plant's update), as
    /// `<bundles>/calibration/round-<round>/<plant>.json`.
    pub fn record_calibration(
        &self,
        round: u64,
        plant: &str,
        ranges: &ActivationRanges,
    ) -> Result<(), CoreError> {
        let path = self.calibration_dir(round).join(format!("{plant}.json"));
        let bytes = serde_json::to_vec(ranges).map_err(|e| CoreError::Internal(e.to_string()))?;
        fedinspect_common::fsutil::write_bytes_atomic(&path, &bytes)
            .map_err(|e| CoreError::Internal(format!("cannot write {}: {e}", path.display())))
    }

    /// The ranges of `round`'s contributors merged (the union of their extents), if they cover
    /// every activation the INT8 export quantises; `None` otherwise (no INT8 variant).
    fn merged_calibration(&self, round: u64, contributors: &[&str]) -> Option<ActivationRanges> {
        let dir = self.calibration_dir(round);
        let parts: Vec<ActivationRanges> = contributors
            .iter()
            .filter_map(|p| std::fs::read(dir.join(format!("{p}.json"))).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect();
        if parts.is_empty() {
            return None;
        }
        let merged = qdq::merge_ranges(&parts);
        let graph = self.config.model.arch.graph().ok()?;
        let missing: Vec<String> = qdq::calibration_points(&graph)
            .into_iter()
            .filter(|p| !merged.contains_key(p))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                round,
                missing = missing.len(),
                "the plants' calibration ranges miss activations; no INT8 variant"
            );
            return None;
        }
        tracing::info!(
            round,
            plants = parts.len(),
            "INT8 calibration from the plants' ranges"
        );
        Some(merged)
    }

    fn calibration_dir(&self, round: u64) -> std::path::PathBuf {
        self.store()
            .root()
            .join("calibration")
            .join(format!("round-{round}"))
    }

    /// Records `plant`'s result; a report of a bundle no rollout names is refused.
    pub fn report(&self, hub: &Hub, plant: &str, result: &InstallResult) -> Result<(), CoreError> {
        {
            let mut rollouts = lock(&self.rollouts);
            let Some(r) = rollouts.by_bundle_mut(&result.bundle_id) else {
                return Err(CoreError::Malformed(format!(
                    "bundle {} was never pushed by this coordinator; report only installs it \
                     asked for",
                    result.bundle_id
                )));
            };
            let entry = r.plants.entry(plant.to_string()).or_default();
            entry.report = Some(InstallReportRecord {
                ok: result.ok,
                message: result.message.clone(),
                engine_built_locally: result.engine_built_locally,
                at_unix_ms: now_unix_ms(),
            });
            self.save(&rollouts)?;
        }
        hub.audit_event(
            AuditKind::Other,
            &format!("plant:{plant}"),
            "install_report",
            Some(plant),
            &format!(
                "bundle {}: {} (engine built locally: {}): {}",
                result.bundle_id,
                if result.ok { "installed" } else { "FAILED" },
                if result.engine_built_locally {
                    "yes"
                } else {
                    "no"
                },
                result.message
            ),
        );
        Ok(())
    }

    /// Goes to every plant when the quiet delay has passed; sends the task where it is due.
    /// `connected_now` are plants whose stream opened since the last call (they get it again).
    pub fn tick(&self, hub: &Hub, connected_now: &BTreeSet<String>) -> Result<(), CoreError> {
        if let Some(after) = self.config.push.confirm_after {
            let due = lock(&self.rollouts).current().is_some_and(|r| {
                r.stage == RolloutStage::Canary
                    && r.canary_failures().is_empty()
                    && r.canary_successes() > 0
                    && now_unix_ms() - r.started_unix_ms >= after.as_millis() as i64
            });
            if due {
                let version = self.current().map_or(0, |r| r.model_version);
                self.confirm(hub, "coordinator", version, false)?;
            }
        }
        self.send_due(hub, connected_now)
    }

    /// Queues the install task for each connected target plant without a report that has not
    /// had it yet, has just connected, or had it longer than `resend_secs` ago.
    fn send_due(&self, hub: &Hub, connected_now: &BTreeSet<String>) -> Result<(), CoreError> {
        let connected: BTreeSet<String> = hub.connected().into_iter().collect();
        let targets: Vec<String> = {
            let rollouts = lock(&self.rollouts);
            let Some(r) = rollouts.current() else {
                return Ok(());
            };
            match r.stage {
                RolloutStage::Canary => self.config.push.canary_plants.clone(),
                RolloutStage::All => hub
                    .store
                    .plants()?
                    .into_iter()
                    .filter(|p| p.revoked.is_none())
                    .map(|p| p.plant_id)
                    .collect(),
            }
        };
        let resend_ms = self.config.push.resend_after.as_millis() as i64;
        let now = now_unix_ms();
        let mut rollouts = lock(&self.rollouts);
        let Some(r) = rollouts.current_mut() else {
            return Ok(());
        };
        let canary = r.stage == RolloutStage::Canary;
        let mut changed = false;
        for plant in targets.iter().filter(|p| connected.contains(*p)) {
            let entry = r
                .plants
                .entry(plant.clone())
                .or_insert_with(|| PlantInstall {
                    canary,
                    ..PlantInstall::default()
                });
            if entry.report.is_some() {
                continue;
            }
            let due = match entry.sent_unix_ms {
                None => true,
                Some(at) => connected_now.contains(plant) || now - at >= resend_ms,
            };
            if !due {
                continue;
            }
            let task = PlantTask::InstallBundle(InstallBundleTask {
                bundle_id: r.bundle_id.clone(),
                model_version: r.model_version,
                manifest_sha256: r.manifest_sha256.clone(),
                canary,
            });
            if hub.send_to(plant, task) {
                tracing::info!(plant, bundle = %r.bundle_id, canary, "install task sent");
                entry.sent_unix_ms = Some(now);
                changed = true;
            }
        }
        if changed {
            self.save(&rollouts)?;
        }
        Ok(())
    }

    /// Follows the plants' connections until `shutdown`, sending tasks as they fall due.
    pub async fn run(self: Arc<Self>, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
        let mut events = hub.subscribe();
        let mut known: BTreeSet<String> = BTreeSet::new();
        loop {
            let connected: BTreeSet<String> = hub.connected().into_iter().collect();
            let fresh: BTreeSet<String> = connected.difference(&known).cloned().collect();
            known = connected;
            if let Err(e) = self.tick(&hub, &fresh) {
                tracing::error!(error = %e, "bundle push step failed; trying again");
            }
            tokio::select! {
                _ = events.changed() => {}
                () = tokio::time::sleep(TICK) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    fn save(&self, rollouts: &Rollouts) -> Result<(), CoreError> {
        rollouts
            .save(self.store().root())
            .map_err(CoreError::Internal)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
