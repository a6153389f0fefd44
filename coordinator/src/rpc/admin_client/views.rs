//! What the admin commands return, as plain types that serialise to the JSON `--json`
//! prints, and their conversions from the protobuf answers.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedinspect_proto::v1 as pb;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub protocol_version: u32,
    pub current_round: u64,
    pub round_state: String,
    pub latest_version: u64,
    pub promoted_version: u64,
    pub plants_registered: u32,
    pub plants_connected: u32,
    /// `round.hold` is set: no round opens until the coordinator restarts without it.
    #[serde(default)]
    pub holding: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlantView {
    pub plant_id: String,
    pub device: String,
    pub num_samples: u64,
    pub connected: bool,
    pub revoked: bool,
    pub last_seen_unix_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundView {
    pub round: u64,
    pub state: String,
    pub base_version: u64,
    /// 0 unless published.
    pub published_version: u64,
    pub participants: u32,
    pub failure: String,
    pub seconds: f64,
    /// Encoded update bytes accepted in the round (set at close).
    #[serde(default)]
    pub bytes_received: u64,
    /// Model bytes streamed to plants while it was open (set at close).
    #[serde(default)]
    pub bytes_sent: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContributionView {
    pub plant_id: String,
    pub num_samples: u64,
    /// Hex.
    pub delta_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    pub version: u64,
    pub parent: u64,
    pub round: u64,
    /// Hex of the model's content hash.
    pub content_hash: String,
    /// Hex of the coordinator's signature over the model manifest.
    pub signature: String,
    pub status: String,
    pub created_unix_ms: i64,
    pub metrics: BTreeMap<String, f64>,
    pub contributions: Vec<ContributionView>,
}

/// An accepted update, as the coordinator recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateView {
    pub plant_id: String,
    /// Hex.
    pub update_id: String,
    pub base_version: u64,
    pub codec: String,
    pub num_samples: u64,
    pub payload_bytes: u64,
    /// Hex.
    pub delta_sha256: String,
    /// Hex.
    pub plant_signature: String,
    pub metrics: BTreeMap<String, f64>,
    pub l2_norm: f64,
    /// 0 unless the delta was scaled down to the norm bound.
    pub clip_scale: f32,
    pub received_unix_ms: i64,
}

/// One round in full (`coordinator admin round N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundDetailView {
    #[serde(flatten)]
    pub round: RoundView,
    pub opened_unix_ms: i64,
    pub deadline_unix_ms: i64,
    /// 0 while the round accepts updates.
    pub closed_unix_ms: i64,
    /// 0 unless published.
    pub published_unix_ms: i64,
    pub base_size_bytes: u64,
    pub updates: Vec<UpdateView>,
    /// Encoded update bytes the coordinator accepted in the round (set at close). The same
    /// as `round.bytes_received`, which is where JSON carries it (once).
    #[serde(skip)]
    pub bytes_received: u64,
    /// Model bytes it streamed to plants while the round was open (set at close); in JSON
    /// as `round.bytes_sent`.
    #[serde(skip)]
    pub bytes_sent: u64,
}

/// One audit log entry (`coordinator admin audit`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    pub at_unix_ms: i64,
    pub kind: String,
    pub actor: String,
    pub action: String,
    /// The plant concerned, empty if none.
    pub plant_id: String,
    pub detail: String,
}

/// What `coordinator admin check` found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckView {
    pub models_checked: u64,
    pub updates_checked: u64,
    /// Update blobs not checked because retention removed them.
    pub update_blobs_removed: u64,
    pub rounds_checked: u64,
    /// Empty when the data directory is consistent.
    pub problems: Vec<String>,
}

/// What `export-model` wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedModel {
    pub version: u64,
    pub path: PathBuf,
    pub bytes: u64,
    /// Hex of the file's SHA-256, as the coordinator sent it and as checked.
    pub sha256: String,
}

pub(super) fn plant(p: &pb::PlantInfo) -> PlantView {
    PlantView {
        plant_id: p.plant_id.clone(),
        device: p.device.clone(),
        num_samples: p.num_samples,
        connected: p.connected,
        revoked: p.revoked,
        last_seen_unix_ms: p.last_seen_unix_ms,
    }
}

pub(super) fn round(r: &pb::RoundInfo) -> RoundView {
    RoundView {
        round: r.round,
        state: r.state.clone(),
        base_version: r.base_version,
        published_version: r.published_version,
        participants: r.participants,
        failure: r.failure.clone(),
        seconds: r.seconds,
        bytes_received: r.bytes_received,
        bytes_sent: r.bytes_sent,
    }
}

pub(super) fn model(m: &pb::ModelInfo) -> ModelView {
    ModelView {
        version: m.version,
        parent: m.parent,
        round: m.round,
        content_hash: hex::encode(&m.content_hash),
        signature: hex::encode(&m.signature),
        status: m.status.clone(),
        created_unix_ms: m.created_unix_ms,
        metrics: m.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        contributions: m
            .contributions
            .iter()
            .map(|c| ContributionView {
                plant_id: c.plant_id.clone(),
                num_samples: c.num_samples,
                delta_sha256: hex::encode(&c.delta_sha256),
            })
            .collect(),
    }
}

pub(super) fn update(u: &pb::UpdateInfo) -> UpdateView {
    UpdateView {
        plant_id: u.plant_id.clone(),
        update_id: hex::encode(&u.update_id),
        base_version: u.base_version,
        codec: u.codec.clone(),
        num_samples: u.num_samples,
        payload_bytes: u.payload_bytes,
        delta_sha256: hex::encode(&u.delta_sha256),
        plant_signature: hex::encode(&u.plant_signature),
        metrics: u.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        l2_norm: u.l2_norm,
        clip_scale: u.clip_scale,
        received_unix_ms: u.received_unix_ms,
    }
}

pub(super) fn audit(e: &pb::AuditInfo) -> AuditView {
    AuditView {
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.clone(),
        actor: e.actor.clone(),
        action: e.action.clone(),
        plant_id: e.plant_id.clone(),
        detail: e.detail.clone(),
    }
}

pub(super) fn check(c: &pb::CheckResponse) -> CheckView {
    CheckView {
        models_checked: c.models_checked,
        updates_checked: c.updates_checked,
        update_blobs_removed: c.update_blobs_removed,
        rounds_checked: c.rounds_checked,
        problems: c.problems.clone(),
    }
}
