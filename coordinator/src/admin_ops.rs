//! What the admin service does, without protobuf: status and listings, one round's report,
//! model export, promotion behind an evaluation gate, rollback, and plant revocation. Every
//! change and every export is audited.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::CoreError;
use crate::hub::Hub;
use crate::records::{
    now_unix_ms, AuditKind, ModelRecord, ModelStatus, PlantRecord, Revocation, RoundRecord,
    RoundState, UpdateRecord,
};

/// The metric a version must have, at least as high as the promoted one's, to be promoted
/// without `force`.
pub const GATE_METRIC: &str = "eval_map50";

#[derive(Clone, Debug, PartialEq)]
pub struct StatusSnapshot {
    pub current_round: u64,
    pub round_state: Option<RoundState>,
    pub latest_version: u64,
    pub promoted_version: u64,
    pub plants_registered: u32,
    pub plants_connected: u32,
    /// `round.hold`: the coordinator opens no round.
    pub holding: bool,
}

pub fn status(hub: &Hub) -> Result<StatusSnapshot, CoreError> {
    let round = hub.store.latest_round()?;
    let registered = hub
        .store
        .plants()?
        .iter()
        .filter(|p| p.revoked.is_none())
        .count();
    Ok(StatusSnapshot {
        current_round: round.as_ref().map_or(0, |r| r.round),
        round_state: round.map(|r| r.state),
        latest_version: hub.store.latest_model()?.map_or(0, |m| m.version),
        promoted_version: promoted(hub)?.map_or(0, |m| m.version),
        plants_registered: u32::try_from(registered).unwrap_or(u32::MAX),
        plants_connected: u32::try_from(hub.connected().len()).unwrap_or(u32::MAX),
        holding: hub.policy.hold,
    })
}

/// Every plant with whether its task stream is open.
pub fn plants(hub: &Hub) -> Result<Vec<(PlantRecord, bool)>, CoreError> {
    let connected = hub.connected();
    Ok(hub
        .store
        .plants()?
        .into_iter()
        .map(|p| {
            let c = connected.contains(&p.plant_id);
            (p, c)
        })
        .collect())
}

/// One round as the coordinator recorded it, with what a report of it needs.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundReport {
    pub round: RoundRecord,
    /// Its accepted updates, in plant-id order.
    pub updates: Vec<UpdateRecord>,
    /// Bytes of the base version's safetensors file: what each plant downloads to train.
    pub base_size_bytes: u64,
    /// When the version the round published was stored.
    pub published_unix_ms: Option<i64>,
}

/// The report of round `round`.
pub fn round_report(hub: &Hub, round: u64) -> Result<RoundReport, CoreError> {
    let record = hub
        .store
        .round(round)?
        .ok_or(CoreError::UnknownRound(round))?;
    let updates = hub.store.updates_of_round(round)?;
    let base_size_bytes = hub
        .store
        .model(record.base_version)?
        .map_or(0, |m| m.size_bytes);
    let published_unix_ms = match record.published_version {
        Some(v) => hub.store.model(v)?.map(|m| m.created_unix_ms),
        None => None,
    };
    Ok(RoundReport {
        round: record,
        updates,
        base_size_bytes,
        published_unix_ms,
    })
}

/// The record of `version` and the path of its safetensors blob, for `admin` to export; the
/// export is audited (a model leaving the coordinator is worth a line).
pub fn export_model(
    hub: &Hub,
    admin: &str,
    version: u64,
) -> Result<(ModelRecord, PathBuf), CoreError> {
    if version == 0 {
        return Err(CoreError::AdminRefused(
            "name the version to export; list versions with `coordinator admin models`".into(),
        ));
    }
    let record = hub
        .store
        .model(version)?
        .ok_or(CoreError::UnknownVersion(version))?;
    let path = hub.blobs.path_of(&record.blob_sha256);
    hub.audit_action(
        AuditKind::Export,
        &format!("admin:{admin}"),
        None,
        &format!("version {version} exported ({} bytes)", record.size_bytes),
    );
    Ok((record, path))
}

/// Promotes `version`. Without `force` the version must pass the gate: with `[promotion]`,
/// its `map_50` on the validation set (`crate::gate::admit`); without, [`GATE_METRIC`] at
/// least as high as the promoted version's.
pub async fn promote(
    hub: &Arc<Hub>,
    admin: &str,
    version: u64,
    force: bool,
) -> Result<ModelRecord, CoreError> {
    let mut target = hub
        .store
        .model(version)?
        .ok_or(CoreError::UnknownVersion(version))?;
    let current = promoted(hub)?;
    if current.as_ref().is_some_and(|c| c.version == version) {
        if let Some(push) = hub.bundles.get() {
            push.push_if_not_pushed(hub, version);
        }
        return Ok(target);
    }
    // With `[promotion]`, the validation-set gate (`crate::gate`); without, the metric gate.
    let gate_note = match &hub.policy.promotion_gate {
        Some(g) => crate::gate::admit(hub, g, &target, current.as_ref(), force).await?,
        None => {
            if !force {
                gate(&target, current.as_ref())?;
            }
            String::new()
        }
    };
    let mut changed = Vec::new();
    if let Some(mut c) = current {
        c.status = ModelStatus::Candidate;
        changed.push(c);
    }
    target.status = ModelStatus::Promoted;
    changed.push(target.clone());
    let mut history = hub.store.promotion_history()?;
    history.push(version);
    hub.store.commit_promotion(&changed, &history)?;
    hub.store.flush().await?;
    hub.audit_action(
        AuditKind::Promotion,
        &format!("admin:{admin}"),
        None,
        &format!("version {version} promoted (force: {force}){gate_note}"),
    );
    if let Some(push) = hub.bundles.get() {
        push.push_version(hub, version, crate::bundle::RolloutReason::Promotion);
    }
    Ok(target)
}

fn gate(target: &ModelRecord, current: Option<&ModelRecord>) -> Result<(), CoreError> {
    let v = target.version;
    if target.status == ModelStatus::RolledBack {
        return Err(CoreError::AdminRefused(format!(
            "version {v} was rolled back; pass --force to promote it again"
        )));
    }
    let Some(score) = target.metrics.get(GATE_METRIC) else {
        return Err(CoreError::AdminRefused(format!(
            "version {v} has no {GATE_METRIC} evaluation yet; evaluate it first or pass --force"
        )));
    };
    if let Some(best) = current.and_then(|c| c.metrics.get(GATE_METRIC)) {
        if score < best {
            return Err(CoreError::AdminRefused(format!(
                "version {v} has {GATE_METRIC} {score}, below the promoted version's {best}; pass --force to promote it anyway"
            )));
        }
    }
    Ok(())
}

/// Rolls the promoted version back to `to`, or with `to == 0` to the previous promoted
/// version that was not rolled back.
pub async fn rollback(hub: &Arc<Hub>, admin: &str, to: u64) -> Result<ModelRecord, CoreError> {
    let mut current = promoted(hub)?.ok_or_else(|| {
        CoreError::AdminRefused("no version is promoted, so there is nothing to roll back".into())
    })?;
    let history = hub.store.promotion_history()?;
    let mut target = if to != 0 {
        hub.store.model(to)?.ok_or(CoreError::UnknownVersion(to))?
    } else {
        previous_promoted(hub, &history, current.version)?.ok_or_else(|| {
            CoreError::AdminRefused(format!(
                "version {} is the only version ever promoted; name a version with --to",
                current.version
            ))
        })?
    };
    if target.version == current.version {
        return Err(CoreError::AdminRefused(format!(
            "version {} is the promoted version already; name another with --to",
            target.version
        )));
    }
    current.status = ModelStatus::RolledBack;
    target.status = ModelStatus::Promoted;
    let mut history = history;
    history.push(target.version);
    hub.store
        .commit_promotion(&[current.clone(), target.clone()], &history)?;
    hub.store.flush().await?;
    hub.audit_action(
        AuditKind::Rollback,
        &format!("admin:{admin}"),
        None,
        &format!(
            "version {} rolled back to {}",
            current.version, target.version
        ),
    );
    if let Some(push) = hub.bundles.get() {
        push.push_version(hub, target.version, crate::bundle::RolloutReason::Rollback);
    }
    Ok(target)
}

fn previous_promoted(
    hub: &Hub,
    history: &[u64],
    current: u64,
) -> Result<Option<ModelRecord>, CoreError> {
    for &v in history.iter().rev() {
        if v == current {
            continue;
        }
        if let Some(m) = hub.store.model(v)? {
            if m.status != ModelStatus::RolledBack {
                return Ok(Some(m));
            }
        }
    }
    Ok(None)
}

/// Revokes `plant`: its stream ends and every later call of it is refused. Updates it had
/// already sent stay accepted.
pub async fn revoke(
    hub: &Arc<Hub>,
    admin: &str,
    plant: &str,
    reason: &str,
) -> Result<(), CoreError> {
    let mut record = hub
        .store
        .plant(plant)?
        .ok_or_else(|| CoreError::UnknownPlant(plant.to_string()))?;
    record.revoked = Some(Revocation {
        reason: reason.to_string(),
        by: admin.to_string(),
        at_unix_ms: now_unix_ms(),
    });
    hub.store.put_plant(&record)?;
    hub.store.flush().await?;
    hub.disconnect(plant);
    hub.audit_action(
        AuditKind::Revocation,
        &format!("admin:{admin}"),
        Some(plant),
        &format!("plant {plant} revoked: {reason}"),
    );
    Ok(())
}

/// Releases `plant`'s pinned update-signing key, so that its next registration pins the key it
/// presents (after the plant was re-enrolled with a new key). Audited.
pub async fn release_key(hub: &Arc<Hub>, admin: &str, plant: &str) -> Result<(), CoreError> {
    let mut record = hub
        .store
        .plant(plant)?
        .ok_or_else(|| CoreError::UnknownPlant(plant.to_string()))?;
    record.plant_public_key.clear();
    hub.store.put_plant(&record)?;
    hub.store.flush().await?;
    hub.disconnect(plant);
    hub.audit_action(
        AuditKind::Other,
        &format!("admin:{admin}"),
        Some(plant),
        &format!("plant {plant}: pinned update-signing key released"),
    );
    Ok(())
}

/// The promoted version: the last of the promotion history.
fn promoted(hub: &Hub) -> Result<Option<ModelRecord>, CoreError> {
    match hub.store.promotion_history()?.last() {
        Some(&v) => Ok(hub.store.model(v)?),
        None => Ok(None),
    }
}

/// Checks the data directory (see `storage::check`) on a blocking thread: it reads every blob.
pub async fn check(hub: &Arc<Hub>) -> Result<crate::storage::check::CheckReport, CoreError> {
    let hub = hub.clone();
    crate::intake::blocking(move || Ok(crate::storage::check::check(&hub.store, &hub.blobs)?)).await
}
