//! Core types into protobuf messages.

use fedinspect_proto::v1 as pb;

use crate::admin_ops::StatusSnapshot;
use crate::hub::{InstallBundleTask, PlantTask, TrainTask};
use crate::records::{ModelRecord, PlantRecord, RoundRecord, TrainPlan};
use fedinspect_common::delta::Codec;

pub fn task(t: &PlantTask) -> pb::Task {
    let kind = match t {
        PlantTask::Train(t) => pb::task::Kind::Train(train_task(t)),
        PlantTask::InstallBundle(t) => pb::task::Kind::InstallBundle(install_task(t)),
    };
    pb::Task { kind: Some(kind) }
}

fn install_task(t: &InstallBundleTask) -> pb::InstallBundleTask {
    pb::InstallBundleTask {
        bundle_id: t.bundle_id.clone(),
        model_version: t.model_version,
        // The id and manifest hash come from our own store: always 64 hex digits.
        manifest_sha256: hex::decode(&t.manifest_sha256).unwrap_or_default(),
        canary: t.canary,
    }
}

fn train_task(t: &TrainTask) -> pb::TrainTask {
    pb::TrainTask {
        round: t.round,
        base_version: t.base_version,
        base_hash: t.base_hash.0.to_vec(),
        base_signature: t.base_signature.clone(),
        plan: Some(plan(&t.plan)),
        deadline_unix_ms: t.deadline_unix_ms,
    }
}

fn plan(p: &TrainPlan) -> pb::TrainPlan {
    let (codec, q8_block) = match p.codec {
        Codec::F32 => (pb::Codec::F32, 0),
        Codec::F16 => (pb::Codec::F16, 0),
        Codec::Q8 { block } => (pb::Codec::Q8, block),
    };
    pb::TrainPlan {
        local_epochs: p.local_epochs,
        learning_rate: p.learning_rate,
        fedprox_mu: p.fedprox_mu,
        codec: codec.into(),
        q8_block,
        batch_size: p.batch_size,
    }
}

pub fn model_info(m: &ModelRecord) -> pb::ModelInfo {
    pb::ModelInfo {
        version: m.version,
        parent: m.parent,
        round: m.round,
        content_hash: m.content_hash.0 .0.to_vec(),
        signature: m.signature.clone(),
        status: m.status.as_str().to_string(),
        created_unix_ms: m.created_unix_ms,
        metrics: m.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        contributions: m
            .contributors
            .iter()
            .map(|c| pb::Contribution {
                plant_id: c.plant_id.clone(),
                num_samples: c.num_samples,
                delta_sha256: c.delta_sha256.0.to_vec(),
                plant_signature: c.plant_signature.clone(),
            })
            .collect(),
    }
}

pub fn round_info(r: &RoundRecord, now_unix_ms: i64) -> pb::RoundInfo {
    let end = r.closed_unix_ms.unwrap_or(now_unix_ms);
    pb::RoundInfo {
        round: r.round,
        state: r.state.as_str().to_string(),
        base_version: r.base_version,
        published_version: r.published_version.unwrap_or(0),
        participants: r.participants,
        failure: r.failure.clone().unwrap_or_default(),
        seconds: end.saturating_sub(r.opened_unix_ms) as f64 / 1000.0,
        bytes_received: r.bytes_received,
        bytes_sent: r.bytes_sent,
    }
}

pub fn plant_info(p: &PlantRecord, connected: bool) -> pb::PlantInfo {
    pb::PlantInfo {
        plant_id: p.plant_id.clone(),
        device: p.capabilities.device.clone(),
        num_samples: p.capabilities.num_samples,
        connected,
        revoked: p.revoked.is_some(),
        last_seen_unix_ms: p.last_seen_unix_ms,
    }
}

pub fn status(s: &StatusSnapshot) -> pb::StatusResponse {
    pb::StatusResponse {
        protocol_version: fedinspect_proto::PROTOCOL_VERSION,
        current_round: s.current_round,
        round_state: s
            .round_state
            .map(|r| r.as_str().to_string())
            .unwrap_or_default(),
        latest_version: s.latest_version,
        promoted_version: s.promoted_version,
        plants_registered: s.plants_registered,
        plants_connected: s.plants_connected,
    }
}

pub fn audit_info(e: &crate::records::AuditEntry) -> pb::AuditInfo {
    pb::AuditInfo {
        at_unix_ms: e.at_unix_ms,
        actor: e.actor.clone(),
        action: e.action.clone(),
        detail: e.detail.clone(),
        kind: e.kind.as_str().to_string(),
        plant_id: e.plant.clone().unwrap_or_default(),
    }
}

pub fn check_report(r: &crate::storage::check::CheckReport) -> pb::CheckResponse {
    pb::CheckResponse {
        models_checked: r.models_checked,
        updates_checked: r.updates_checked,
        update_blobs_removed: r.update_blobs_removed,
        rounds_checked: r.rounds_checked,
        problems: r.problems.clone(),
    }
}
