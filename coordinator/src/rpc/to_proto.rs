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
        lr_span_start: p.lr_span.map_or(0.0, |s| s.start),
        lr_span_end: p.lr_span.map_or(0.0, |s| s.end),
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

/// Most bytes of versions one `ListModels` answer carries: under the 4 MiB a gRPC client
/// accepts by default, with room for framing. Each version lists its contributors (their
/// hashes and signatures), about 120 bytes a plant: at 256 plants a round, 141 versions
/// made 4.2 MB and `simulate` failed on the listing.
pub const MODELS_PAGE_BYTES: usize = 3 << 20;

/// The versions of `models` (newest first) that fit in `budget` bytes, at least one, and
/// where the next page starts when they did not all fit.
pub fn models_page(models: &[ModelRecord], budget: usize) -> pb::ListModelsResponse {
    use prost::Message;
    let mut page = pb::ListModelsResponse::default();
    let mut size = 0;
    for m in models {
        let info = model_info(m);
        // The field tag and length prefix of a repeated message: at most 11 bytes.
        let len = info.encoded_len() + 11;
        if !page.models.is_empty() && size + len > budget {
            page.next_below_version = page.models.last().map_or(0, |m| m.version);
            break;
        }
        size += len;
        page.models.push(info);
    }
    page
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
        holding: s.holding,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedinspect_common::ModelHash;
    use prost::Message;

    use super::*;
    use crate::records::{Contribution, Digest, ModelHashText, ModelStatus};

    /// Version `version` with `plants` contributors, newest-first lists as the store gives.
    fn version(version: u64, plants: usize) -> ModelRecord {
        ModelRecord {
            version,
            parent: version - 1,
            round: version - 1,
            content_hash: ModelHashText(ModelHash([7; 32])),
            blob_sha256: Digest([7; 32]),
            size_bytes: 10,
            signature: vec![1; 64],
            strategy: "fedavg".into(),
            contributors: (0..plants)
                .map(|i| Contribution {
                    plant_id: format!("plant-{i:03}"),
                    num_samples: 2,
                    delta_sha256: Digest([3; 32]),
                    plant_signature: vec![9; 64],
                })
                .collect(),
            metrics: BTreeMap::new(),
            created_unix_ms: 5,
            status: ModelStatus::Candidate,
        }
    }

    #[test]
    fn a_listing_is_cut_into_pages_that_fit_a_grpc_message() {
        // The listing that failed had 141 versions of 256 contributors (and their metrics).
        let models: Vec<ModelRecord> = (2..=160).rev().map(|v| version(v, 256)).collect();
        let all: usize = models.iter().map(|m| model_info(m).encoded_len()).sum();
        assert!(all > 4 << 20, "{all} bytes in one message would be refused");
        let mut pages = Vec::new();
        let mut rest = &models[..];
        loop {
            let page = models_page(rest, MODELS_PAGE_BYTES);
            let bytes = page.encoded_len();
            assert!(bytes <= MODELS_PAGE_BYTES, "a page of {bytes} bytes");
            pages.push(page.models.len());
            if page.next_below_version == 0 {
                break;
            }
            let next = page.next_below_version;
            assert_eq!(page.models.last().unwrap().version, next);
            rest = &rest[rest.iter().position(|m| m.version < next).unwrap()..];
        }
        println!("pages of {pages:?} versions for {all} bytes");
        assert!(pages.len() >= 2);
        assert_eq!(pages.iter().sum::<usize>(), models.len());
    }

    #[test]
    fn a_page_holds_at_least_one_version_and_says_nothing_more_when_all_fit() {
        let models: Vec<ModelRecord> = (2..=4).rev().map(|v| version(v, 3)).collect();
        let page = models_page(&models, MODELS_PAGE_BYTES);
        assert_eq!(page.models.len(), 3);
        assert_eq!(page.next_below_version, 0);
        let tiny = models_page(&models, 1);
        assert_eq!(tiny.models.len(), 1);
        assert_eq!(tiny.models[0].version, 4);
        assert_eq!(tiny.next_below_version, 4);
        assert_eq!(models_page(&[], 1).models.len(), 0);
    }
}
