//! [`Hub`]: the state the rpc handlers and the round driver share: storage, policy, the open
//! round (with its running mean, [`Preview`]), the connected plants' task channels, and a
//! change counter the driver waits on.

mod preview;
pub mod sampling;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fedinspect_common::delta::Layout;
use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelHash;
use tokio::sync::{mpsc, watch};

use crate::config::{Limits, RoundPolicy};
use crate::error::CoreError;
use crate::metrics::Metrics;
use crate::records::{
    now_unix_ms, AuditEntry, AuditKind, Digest, RoundRecord, TrainPlan, UpdateRecord,
};
use crate::storage::{BlobStore, RecordOutcome, Store};

pub use preview::{Feed, Preview, PreviewCheck, PreviewOutcome, PreviewStatus};

/// Tasks queued per plant before further ones are dropped (a plant reads them as they come).
const TASK_QUEUE: usize = 8;

/// A round that accepts updates, with what checking them needs.
#[derive(Debug)]
pub struct OpenRound {
    pub record: RoundRecord,
    pub base_signature: Vec<u8>,
    /// Names and shapes of the base model: what every delta must match.
    pub layout: Layout,
    /// The running mean of the updates accepted so far.
    pub preview: Preview,
    /// Bytes of the base model streamed to plants while the round was open.
    pub bytes_sent: AtomicU64,
}

/// An instruction for one plant.
#[derive(Clone, Debug, PartialEq)]
pub enum PlantTask {
    Train(TrainTask),
    /// Install a signed inference bundle (`crate::bundle::push`).
    InstallBundle(InstallBundleTask),
}

/// Which bundle a plant is to download and install.
#[derive(Clone, Debug, PartialEq)]
pub struct InstallBundleTask {
    pub bundle_id: String,
    pub model_version: u64,
    /// Hex SHA-256 of the bundle's manifest.json; the plant refuses any other manifest.
    pub manifest_sha256: String,
    /// Sent to the canary plants before everyone else.
    pub canary: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainTask {
    pub round: u64,
    pub base_version: u64,
    pub base_hash: ModelHash,
    pub base_signature: Vec<u8>,
    pub plan: TrainPlan,
    pub deadline_unix_ms: i64,
}

pub struct Hub {
    pub store: Store,
    pub blobs: BlobStore,
    pub policy: RoundPolicy,
    pub limits: Limits,
    pub signer: SigningKey,
    /// Name in the coordinator's certificate.
    pub coordinator_id: String,
    /// Counters for the metrics endpoint.
    pub metrics: Arc<Metrics>,
    open: Mutex<Option<Arc<OpenRound>>>,
    sessions: Mutex<BTreeMap<String, mpsc::Sender<PlantTask>>>,
    events: watch::Sender<u64>,
    /// Update blobs this process hashed as they arrived; aggregation re-hashes only the others
    /// (those read back after a restart).
    hashed_at_intake: Mutex<HashSet<Digest>>,
    /// How the running mean compared with the latest published model.
    last_preview: Mutex<Option<PreviewCheck>>,
    /// Bundle builds and pushes, when `[bundles]` is configured (set once by `node`).
    pub bundles: std::sync::OnceLock<Arc<crate::bundle::push::BundlePush>>,
    /// Permits for upload streams read at once (`limits.max_concurrent_uploads`).
    pub upload_slots: Arc<tokio::sync::Semaphore>,
    /// Permits for model downloads streamed at once (`limits.max_concurrent_downloads`).
    pub download_slots: Arc<tokio::sync::Semaphore>,
}

impl OpenRound {
    pub fn new(
        record: RoundRecord,
        base_signature: Vec<u8>,
        layout: Layout,
        preview: Preview,
    ) -> Self {
        Self {
            record,
            base_signature,
            layout,
            preview,
            bytes_sent: AtomicU64::new(0),
        }
    }

    /// Counts `n` bytes of the base model sent to a plant.
    pub fn count_sent(&self, n: u64) {
        self.bytes_sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether `plant` was sampled for this round (every plant is when none was sampled).
    pub fn is_sampled(&self, plant: &str) -> bool {
        let sampled = &self.record.sampled;
        sampled.is_empty() || sampled.binary_search_by(|p| p.as_str().cmp(plant)).is_ok()
    }

    pub fn task(&self) -> TrainTask {
        TrainTask {
            round: self.record.round,
            base_version: self.record.base_version,
            base_hash: self.record.base_hash.0,
            base_signature: self.base_signature.clone(),
            plan: self.record.plan.clone(),
            deadline_unix_ms: self.record.deadline_unix_ms,
        }
    }
}

impl Hub {
    pub fn new(
        store: Store,
        blobs: BlobStore,
        policy: RoundPolicy,
        limits: Limits,
        signer: SigningKey,
        coordinator_id: String,
    ) -> Self {
        let upload_slots = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_uploads));
        let download_slots = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_downloads));
        Self {
            upload_slots,
            download_slots,
            store,
            blobs,
            policy,
            limits,
            signer,
            coordinator_id,
            metrics: Arc::new(Metrics::default()),
            open: Mutex::new(None),
            sessions: Mutex::new(BTreeMap::new()),
            events: watch::channel(0).0,
            hashed_at_intake: Mutex::new(HashSet::new()),
            last_preview: Mutex::new(None),
            bundles: std::sync::OnceLock::new(),
        }
    }

    /// Notes that intake hashed the bytes of blob `digest` as they arrived and stored them.
    pub fn hashed_at_intake(&self, digest: Digest) {
        lock(&self.hashed_at_intake).insert(digest);
    }

    /// Whether intake hashed blob `digest` in this process; forgets it.
    pub fn take_hashed_at_intake(&self, digest: &Digest) -> bool {
        lock(&self.hashed_at_intake).remove(digest)
    }

    /// Forgets every blob hashed at intake (a round ended without reading them).
    pub fn forget_hashed_at_intake(&self) {
        lock(&self.hashed_at_intake).clear();
    }

    /// How the running mean compared with the latest published model, if it was compared.
    pub fn last_preview_check(&self) -> Option<PreviewCheck> {
        lock(&self.last_preview).clone()
    }

    pub fn set_preview_check(&self, check: PreviewCheck) {
        *lock(&self.last_preview) = Some(check);
    }

    /// A receiver that sees a change whenever plants connect or updates are accepted.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    fn notify(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn open_round(&self) -> Option<Arc<OpenRound>> {
        lock(&self.open).clone()
    }

    /// Makes `round` the open round and sends its train task to every connected plant sampled
    /// for it that has not contributed to it yet.
    pub fn set_open(&self, round: Arc<OpenRound>) -> Result<(), CoreError> {
        *lock(&self.open) = Some(round.clone());
        let task = PlantTask::Train(round.task());
        let sessions: Vec<(String, mpsc::Sender<PlantTask>)> = lock(&self.sessions)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (plant, tx) in sessions {
            if round.is_sampled(&plant)
                && self.store.update_for(round.record.round, &plant)?.is_none()
            {
                send(&plant, &tx, task.clone());
            }
        }
        Ok(())
    }

    /// Stops accepting updates for `round`; after this returns no update of it is recorded.
    pub fn close(&self, round: u64) {
        let mut open = lock(&self.open);
        if open.as_ref().is_some_and(|o| o.record.round == round) {
            *open = None;
        }
    }

    /// Records an accepted update if its round is still open (atomically with [`Hub::close`]).
    /// The caller makes it durable with `store.flush()` before acknowledging.
    pub fn commit_update(&self, rec: &UpdateRecord) -> Result<RecordOutcome, CoreError> {
        let outcome = {
            let open = lock(&self.open);
            match open.as_ref() {
                Some(o) if o.record.round == rec.round => self.store.record_update(rec)?,
                _ => return Err(CoreError::RoundClosed { round: rec.round }),
            }
        };
        self.notify();
        Ok(outcome)
    }

    /// Opens `plant`'s task channel (replacing an older one) and queues the open round's task
    /// if the plant was sampled for it and has not contributed to it.
    pub fn connect(&self, plant: &str) -> Result<mpsc::Receiver<PlantTask>, CoreError> {
        let (tx, rx) = mpsc::channel(TASK_QUEUE);
        if let Some(open) = self.open_round() {
            if open.is_sampled(plant) && self.store.update_for(open.record.round, plant)?.is_none()
            {
                send(plant, &tx, PlantTask::Train(open.task()));
            }
        }
        lock(&self.sessions).insert(plant.to_string(), tx);
        self.notify();
        Ok(rx)
    }

    /// Queues `task` on `plant`'s task stream; false when the plant has no open stream.
    pub fn send_to(&self, plant: &str, task: PlantTask) -> bool {
        let tx = lock(&self.sessions).get(plant).cloned();
        match tx {
            Some(tx) if !tx.is_closed() => {
                send(plant, &tx, task);
                true
            }
            _ => false,
        }
    }

    /// Ends `plant`'s task stream, if it has one.
    pub fn disconnect(&self, plant: &str) {
        lock(&self.sessions).remove(plant);
        self.notify();
    }

    /// Ends every task stream (at shutdown, so the server can drain).
    pub fn disconnect_all(&self) {
        lock(&self.sessions).clear();
        self.notify();
    }

    /// Plants whose task stream is open, in id order.
    pub fn connected(&self) -> Vec<String> {
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, tx| !tx.is_closed());
        sessions.keys().cloned().collect()
    }

    /// The plants to task in round `round` (see `sampling`); empty when every plant is.
    pub fn draw_sample(&self, round: u64) -> Result<Vec<String>, CoreError> {
        if self.policy.sample_fraction >= 1.0 {
            return Ok(Vec::new());
        }
        let eligible: Vec<String> = self
            .store
            .plants()?
            .into_iter()
            .filter(|p| p.revoked.is_none())
            .map(|p| p.plant_id)
            .collect();
        Ok(sampling::draw(&eligible, round, &self.policy))
    }

    /// Removes the update blobs of rounds older than `round.keep_update_blobs_rounds` ended
    /// rounds, if set (after a round ended). A failure is logged: the round is done, and the
    /// next pass retries.
    pub async fn remove_old_update_blobs(self: &Arc<Self>) {
        let Some(keep) = self.policy.keep_update_blobs_rounds else {
            return;
        };
        let hub = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            crate::storage::retention::remove_old_update_blobs(&hub.store, &hub.blobs, keep)
        })
        .await;
        match result {
            Ok(Ok(r)) if r.files > 0 => tracing::info!(
                through_round = r.through_round,
                files = r.files,
                bytes = r.bytes,
                "removed old update blobs"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove old update blobs"),
            Err(e) => tracing::warn!(error = %e, "the blob retention task failed"),
        }
    }

    /// Audits a refused request: `action` is the call refused, `detail` why. The plant it
    /// concerns is the caller when a plant called.
    pub fn audit(&self, actor: &str, action: &str, detail: &str) {
        let plant = actor.strip_prefix("plant:").map(str::to_string);
        self.write_audit(AuditKind::Refusal, actor, action, plant, detail);
    }

    /// Audits an admin action that changed something or took data out: a revocation (of
    /// `plant`), a promotion, a rollback, an export.
    pub fn audit_action(&self, kind: AuditKind, actor: &str, plant: Option<&str>, detail: &str) {
        let action = match kind {
            AuditKind::Revocation => "revoke",
            AuditKind::Promotion => "promote",
            AuditKind::Rollback => "rollback",
            AuditKind::Export => "export_model",
            AuditKind::Refusal | AuditKind::Other => kind.as_str(),
        };
        self.write_audit(kind, actor, action, plant.map(str::to_string), detail);
    }

    /// Audits an event named by `action` (bundle builds, pushes and install reports).
    pub fn audit_event(
        &self,
        kind: AuditKind,
        actor: &str,
        action: &str,
        plant: Option<&str>,
        detail: &str,
    ) {
        self.write_audit(kind, actor, action, plant.map(str::to_string), detail);
    }

    /// Writes an audit entry; a storage failure is logged, never returned, so that refusing a
    /// request does not turn into a different error.
    fn write_audit(
        &self,
        kind: AuditKind,
        actor: &str,
        action: &str,
        plant: Option<String>,
        detail: &str,
    ) {
        let entry = AuditEntry {
            at_unix_ms: now_unix_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            detail: detail.to_string(),
            kind,
            plant,
        };
        tracing::info!(actor, action, detail, kind = kind.as_str(), "audit");
        if let Err(e) = self.store.audit(&entry) {
            tracing::error!(error = %e, "cannot write audit entry");
        }
    }
}

fn send(plant: &str, tx: &mpsc::Sender<PlantTask>, task: PlantTask) {
    if let Err(e) = tx.try_send(task) {
        tracing::warn!(plant, error = %e, "cannot queue task for plant");
    }
}

/// Locks a mutex; the data stays consistent even if a holder panicked (every critical section
/// here is a single assignment or map operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
