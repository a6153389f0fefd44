//! What `coordinator admin bundle status` and `bundle confirm` print: the bundle push in
//! force and each plant's install report, as plain types serialised for `--json`.

use fedinspect_proto::v1 as pb;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleStatusView {
    /// `None` before the first push.
    pub current: Option<RolloutView>,
    /// The last failed build; empty after a success.
    pub last_error: String,
    pub engine_note: String,
    pub canary_plants: Vec<String>,
    /// 0: only an admin confirms.
    pub confirm_after_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub bundle_id: String,
    pub model_version: u64,
    pub manifest_sha256: String,
    pub reason: String,
    pub stage: String,
    pub started_unix_ms: i64,
    pub all_since_unix_ms: i64,
    pub confirmed_by: String,
    pub plants: Vec<PlantInstallView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlantInstallView {
    pub plant_id: String,
    pub canary: bool,
    pub sent_unix_ms: i64,
    /// `pending`, `installed` or `failed`.
    pub result: String,
    pub message: String,
    pub engine_built_locally: bool,
    pub reported_unix_ms: i64,
}

pub fn bundle_status(s: pb::BundleStatusResponse) -> BundleStatusView {
    let pb::BundleStatusResponse {
        current,
        last_error,
        engine_note,
        canary_plants,
        confirm_after_secs,
    } = s;
    BundleStatusView {
        current: current.map(rollout),
        last_error,
        engine_note,
        canary_plants,
        confirm_after_secs,
    }
}

fn rollout(r: pb::BundleRollout) -> RolloutView {
    let pb::BundleRollout {
        bundle_id,
        model_version,
        manifest_sha256,
        reason,
        stage,
        started_unix_ms,
        all_since_unix_ms,
        confirmed_by,
        plants,
    } = r;
    RolloutView {
        bundle_id,
        model_version,
        manifest_sha256,
        reason,
        stage,
        started_unix_ms,
        all_since_unix_ms,
        confirmed_by,
        plants: plants.into_iter().map(plant).collect(),
    }
}

fn plant(p: pb::BundlePlantStatus) -> PlantInstallView {
    let pb::BundlePlantStatus {
        plant_id,
        canary,
        sent_unix_ms,
        result,
        message,
        engine_built_locally,
        reported_unix_ms,
    } = p;
    PlantInstallView {
        plant_id,
        canary,
        sent_unix_ms,
        result,
        message,
        engine_built_locally,
        reported_unix_ms,
    }
}
