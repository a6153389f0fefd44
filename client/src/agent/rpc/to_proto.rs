//! The agent's types into protobuf messages for the coordinator.

use fedinspect_common::delta::Codec;
use fedinspect_common::signing::VerifyingKey;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::PROTOCOL_VERSION;

use crate::agent::types::{Capabilities, UpdateHeader};

pub fn register(c: &Capabilities, plant_key: &VerifyingKey) -> pb::RegisterRequest {
    let Capabilities {
        device,
        gpu_name,
        compute_capability,
        tensorrt_version,
        samples_per_class,
        num_samples,
        client_version,
    } = c;
    pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Some(pb::Capabilities {
            device: device.clone(),
            gpu_name: gpu_name.clone(),
            compute_capability: compute_capability.clone(),
            tensorrt_version: tensorrt_version.clone(),
            samples_per_class: samples_per_class
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            num_samples: *num_samples,
            client_version: client_version.clone(),
        }),
        plant_public_key: plant_key.as_bytes().to_vec(),
    }
}

/// The header of an upload whose stream carries the payload from byte `resume_offset` on.
pub fn update_header(h: &UpdateHeader, resume_offset: u64) -> pb::UpdateHeader {
    let UpdateHeader {
        update_id,
        round,
        base_version,
        base_hash,
        codec,
        num_samples,
        payload_bytes,
        payload_sha256,
        plant_signature,
        metrics,
    } = h;
    let codec = match codec {
        Codec::F32 => pb::Codec::F32,
        Codec::F16 => pb::Codec::F16,
        Codec::Q8 { .. } => pb::Codec::Q8,
    };
    pb::UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        update_id: update_id.to_vec(),
        round: *round,
        base_version: *base_version,
        base_hash: base_hash.0.to_vec(),
        codec: codec.into(),
        num_samples: *num_samples,
        payload_bytes: *payload_bytes,
        payload_sha256: payload_sha256.to_vec(),
        plant_signature: plant_signature.clone(),
        metrics: metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        resume_offset,
    }
}
