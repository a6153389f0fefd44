//! The evaluation gate of promotion. The coordinator links no LibTorch and holds no images, so
//! it scores a model version by exporting it to a temporary safetensors checkpoint and running
//! the operator's evaluator command (`[promotion] eval_command`, e.g. `client eval --json` on
//! central IT's validation set). Scores are stored in sled per version and evaluator command,
//! so nothing is evaluated twice; promotion is refused when the candidate's `map_50` is more
//! than `max_map50_drop` below the promoted version's, or when the evaluator fails or times
//! out. Without `[promotion]`, `admin_ops` keeps the plant-reported metric gate.

mod config;
mod evaluator;
mod record;
mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fedinspect_common::ModelState;
use tokio::sync::watch;

pub use config::{PromotionGate, RawPromotion, DEFAULT_TIMEOUT, MODEL_PLACEHOLDER};
pub use evaluator::EvaluatorError;
pub use record::Evaluation;
pub use report::{parse_scores, Scores};

use crate::error::CoreError;
use crate::hub::Hub;
use crate::records::{now_unix_ms, ModelRecord, ModelStatus};

/// How often the publish watcher looks for a new version.
const PUBLISH_POLL: Duration = Duration::from_secs(1);

/// Float slack on the drop comparison, so that a drop of exactly `max_map50_drop` passes.
const DROP_SLACK: f64 = 1e-9;

/// One evaluation at a time in this process: an evaluator takes the machine's cores, and the
/// queue means a version is never evaluated twice at once (the second caller finds the first's
/// stored result).
fn evaluation_queue() -> &'static tokio::sync::Mutex<()> {
    static QUEUE: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    QUEUE.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// The evaluation of `model` under `gate`'s command: the stored one, or one made now, stored
/// and flushed before it is returned.
pub async fn evaluation(
    hub: &Arc<Hub>,
    gate: &PromotionGate,
    model: &ModelRecord,
) -> Result<Evaluation, EvaluationError> {
    if let Some(e) = stored(hub, gate, model.version)? {
        return Ok(e);
    }
    let _turn = evaluation_queue().lock().await;
    if let Some(e) = stored(hub, gate, model.version)? {
        return Ok(e);
    }
    let blob = hub.blobs.path_of(&model.blob_sha256);
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = cancel.0.clone();
    let job = gate.clone();
    let version = model.version;
    tracing::info!(version, "evaluating on the validation set");
    let started = Instant::now();
    let scores = tokio::task::spawn_blocking(move || evaluate_blob(&job, version, &blob, &flag))
        .await
        .map_err(|e| EvaluationError::Internal(format!("the evaluation task failed: {e}")))??;
    let record = Evaluation {
        version,
        map_50: scores.map_50,
        map_33: scores.map_33,
        command: gate.eval_command.clone(),
        evaluated_unix_ms: now_unix_ms(),
        seconds: started.elapsed().as_secs_f64(),
    };
    hub.store.put_evaluation(&record)?;
    hub.store.flush().await?;
    tracing::info!(version, map_50 = record.map_50, map_33 = ?record.map_33, seconds = record.seconds, "evaluated");
    Ok(record)
}

/// The stored evaluation of `version` if it was made with `gate`'s command.
fn stored(
    hub: &Hub,
    gate: &PromotionGate,
    version: u64,
) -> Result<Option<Evaluation>, EvaluationError> {
    Ok(hub
        .store
        .evaluation(version)?
        .filter(|e| e.command == gate.eval_command))
}

/// Exports the model in `blob` to a temporary checkpoint, runs the evaluator on it, and
/// removes the temporary folder whatever happens.
fn evaluate_blob(
    gate: &PromotionGate,
    version: u64,
    blob: &Path,
    cancel: &AtomicBool,
) -> Result<Scores, EvaluationError> {
    let workdir = WorkDir::create(version)?;
    let model = workdir.0.join(format!("model-v{version}.safetensors"));
    export(gate, blob, &model)?;
    Ok(evaluator::run(
        &gate.eval_command,
        &model,
        &workdir.0,
        gate.timeout,
        cancel,
    )?)
}

/// Writes the version's tensors to `out` as a checkpoint `client eval` loads: with the model
/// description of `initial_model`, or as the stored file when there is none.
fn export(gate: &PromotionGate, blob: &Path, out: &Path) -> Result<(), EvaluationError> {
    if gate.checkpoint_metadata.is_empty() {
        std::fs::copy(blob, out).map_err(|source| EvaluationError::Export {
            path: out.to_path_buf(),
            reason: source.to_string(),
        })?;
        return Ok(());
    }
    let export_err = |reason: String| EvaluationError::Export {
        path: out.to_path_buf(),
        reason,
    };
    let (model, _) = ModelState::load_safetensors(blob).map_err(|e| export_err(e.to_string()))?;
    model
        .save_safetensors(out, &gate.checkpoint_metadata)
        .map_err(|e| export_err(e.to_string()))
}

/// Whether `target` may be promoted over `current`: `Ok` with a note for the audit entry, or
/// the refusal. With `force` nothing is evaluated; the note says what stored evaluations the
/// promotion overrides.
pub async fn admit(
    hub: &Arc<Hub>,
    gate: &PromotionGate,
    target: &ModelRecord,
    current: Option<&ModelRecord>,
    force: bool,
) -> Result<String, CoreError> {
    let v = target.version;
    if force {
        return Ok(override_note(hub, gate, target, current));
    }
    if target.status == ModelStatus::RolledBack {
        return Err(CoreError::AdminRefused(format!(
            "version {v} was rolled back; pass --force to promote it again"
        )));
    }
    let refused = |of: u64, e: EvaluationError| {
        CoreError::AdminRefused(format!(
            "version {v} cannot be promoted: evaluating version {of} on the validation set failed: {e}. Fix the evaluator ([promotion] eval_command) and promote again, or pass --force to promote without the gate"
        ))
    };
    let candidate = evaluation(hub, gate, target)
        .await
        .map_err(|e| refused(v, e))?;
    let Some(current) = current else {
        return Ok(format!(
            "; validation map_50 {:.4}, nothing promoted before",
            candidate.map_50
        ));
    };
    let promoted = evaluation(hub, gate, current)
        .await
        .map_err(|e| refused(current.version, e))?;
    let drop = promoted.map_50 - candidate.map_50;
    if drop > gate.max_map50_drop + DROP_SLACK {
        return Err(CoreError::AdminRefused(format!(
            "version {v} scores map_50 {:.4} on the validation set, {drop:.4} below the promoted version {}'s {:.4}; promotion.max_map50_drop allows {}; pass --force to promote it anyway",
            candidate.map_50, current.version, promoted.map_50, gate.max_map50_drop
        )));
    }
    Ok(format!(
        "; validation map_50 {:.4} against version {}'s {:.4}",
        candidate.map_50, current.version, promoted.map_50
    ))
}

/// What a forced promotion overrides, from the stored evaluations only.
fn override_note(
    hub: &Hub,
    gate: &PromotionGate,
    target: &ModelRecord,
    current: Option<&ModelRecord>,
) -> String {
    let score = |version: u64| stored(hub, gate, version).ok().flatten().map(|e| e.map_50);
    match (score(target.version), current.map(|c| (c.version, score(c.version)))) {
        (Some(c), Some((p, Some(b)))) => format!(
            "; evaluation gate overridden: validation map_50 {c:.4} against version {p}'s {b:.4} (drop {:.4}, promotion.max_map50_drop {})",
            b - c,
            gate.max_map50_drop
        ),
        (Some(c), _) => format!("; evaluation gate overridden: validation map_50 {c:.4}"),
        (None, _) => "; evaluation gate overridden: not evaluated".to_string(),
    }
}

/// Evaluates each newly published version (`[promotion] evaluate_on_publish`) until `stop`;
/// a failure is logged and the version is evaluated again when it is promoted. When several
/// versions are published during one evaluation, the latest is evaluated next.
pub async fn evaluate_published(
    hub: Arc<Hub>,
    gate: PromotionGate,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = 0;
    loop {
        match hub.store.latest_model() {
            Ok(Some(latest)) if latest.version > seen => {
                seen = latest.version;
                tokio::select! {
                    r = evaluation(&hub, &gate, &latest) => if let Err(e) = r {
                        tracing::warn!(version = latest.version, "evaluation after publishing failed: {e}");
                    },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read the latest version to evaluate it: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PUBLISH_POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Why a version has no evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvaluationError {
    #[error(transparent)]
    Evaluator(#[from] EvaluatorError),
    #[error("cannot export the model to {}: {reason}; check the temporary folder's disk space", path.display())]
    Export { path: PathBuf, reason: String },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Internal(String),
}

/// Sets the cancel flag when the evaluation's future is dropped (the admin's request ended,
/// the coordinator stops), so the blocking runner kills the evaluator.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A fresh folder under the system's temporary folder, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(version: u64) -> Result<Self, EvaluationError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "fedinspect-eval-v{version}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).map_err(|source| EvaluatorError::Io {
            action: "create",
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
