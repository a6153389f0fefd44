//! The Admin service's bundle calls: `BundleStatus` (the rollout in force with each plant's
//! report) and `ConfirmBundle` (canary → every plant), converted to protobuf here so that
//! `bundle::push` never sees it.

use fedinspect_proto::v1 as pb;

use crate::bundle::{BundlePush, PlantInstall, Rollout, RolloutReason, RolloutStage};
use crate::error::CoreError;
use crate::hub::Hub;

/// The push's state as the admin sees it.
pub fn status(push: &BundlePush) -> pb::BundleStatusResponse {
    let policy = push.policy();
    pb::BundleStatusResponse {
        current: push.current().as_ref().map(rollout),
        last_error: push.last_error().unwrap_or_default(),
        engine_note: push.engine_note().unwrap_or_default().to_string(),
        canary_plants: policy.canary_plants.clone(),
        confirm_after_secs: policy.confirm_after.map_or(0, |d| d.as_secs()),
    }
}

/// Confirms the rollout of `req.version` for `admin`.
pub fn confirm(
    push: &BundlePush,
    hub: &Hub,
    admin: &str,
    req: pb::ConfirmBundleRequest,
) -> Result<pb::BundleStatusResponse, CoreError> {
    let pb::ConfirmBundleRequest { version, force } = req;
    push.confirm(hub, &format!("admin:{admin}"), version, force)?;
    Ok(status(push))
}

fn rollout(r: &Rollout) -> pb::BundleRollout {
    pb::BundleRollout {
        bundle_id: r.bundle_id.clone(),
        model_version: r.model_version,
        manifest_sha256: r.manifest_sha256.clone(),
        reason: match r.reason {
            RolloutReason::Promotion => "promotion",
            RolloutReason::Rollback => "rollback",
        }
        .into(),
        stage: match r.stage {
            RolloutStage::Canary => "canary",
            RolloutStage::All => "all",
        }
        .into(),
        started_unix_ms: r.started_unix_ms,
        all_since_unix_ms: r.all_since_unix_ms.unwrap_or(0),
        confirmed_by: r.confirmed_by.clone().unwrap_or_default(),
        plants: r.plants.iter().map(|(id, p)| plant(id, p)).collect(),
    }
}

fn plant(id: &str, p: &PlantInstall) -> pb::BundlePlantStatus {
    let report = p.report.as_ref();
    pb::BundlePlantStatus {
        plant_id: id.to_string(),
        canary: p.canary,
        sent_unix_ms: p.sent_unix_ms.unwrap_or(0),
        result: match report {
            None => "pending",
            Some(r) if r.ok => "installed",
            Some(_) => "failed",
        }
        .into(),
        message: report.map(|r| r.message.clone()).unwrap_or_default(),
        engine_built_locally: report.is_some_and(|r| r.engine_built_locally),
        reported_unix_ms: report.map_or(0, |r| r.at_unix_ms),
    }
}
