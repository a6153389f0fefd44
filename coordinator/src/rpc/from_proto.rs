//! Protobuf messages into core types, by exhaustive destructuring (a new field breaks the
//! build here instead of being ignored), with [`FromProtoError`] for every malformed field.

use std::collections::BTreeMap;

use fedinspect_common::ModelHash;
use fedinspect_proto::v1 as pb;

use crate::error::CoreError;
use crate::intake::{UpdateHeader, WireCodec};
use crate::records::{Capabilities, Digest, UpdateId};

#[derive(Debug, thiserror::Error)]
pub enum FromProtoError {
    #[error("{field} must hold {expected} bytes, it holds {found}")]
    Length {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("codec {0} is not one of CODEC_F32, CODEC_F16, CODEC_Q8")]
    Codec(i32),
    #[error("metric '{0}' is not a finite number")]
    Metric(String),
    #[error("the first message of an upload must be an UpdateHeader")]
    HeaderFirst,
    #[error("an upload carries one UpdateHeader, then only chunks")]
    SecondHeader,
    #[error("an empty message; set its part")]
    EmptyPart,
}

impl From<FromProtoError> for CoreError {
    fn from(e: FromProtoError) -> Self {
        CoreError::Malformed(e.to_string())
    }
}

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = FromProtoError;

    fn try_from(h: pb::UpdateHeader) -> Result<Self, FromProtoError> {
        let pb::UpdateHeader {
            protocol_version,
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
            resume_offset,
        } = h;
        Ok(UpdateHeader {
            protocol_version,
            update_id: UpdateId(fixed("update_id", &update_id)?),
            round,
            base_version,
            base_hash: ModelHash(fixed("base_hash", &base_hash)?),
            codec: wire_codec(codec)?,
            num_samples,
            payload_bytes,
            payload_sha256: Digest(fixed("payload_sha256", &payload_sha256)?),
            plant_signature,
            metrics: finite_metrics(metrics)?,
            resume_offset,
        })
    }
}

impl From<pb::Capabilities> for Capabilities {
    fn from(c: pb::Capabilities) -> Self {
        let pb::Capabilities {
            device,
            gpu_name,
            compute_capability,
            tensorrt_version,
            samples_per_class,
            num_samples,
            client_version,
        } = c;
        Capabilities {
            device,
            gpu_name,
            compute_capability,
            tensorrt_version,
            samples_per_class: samples_per_class.into_iter().collect(),
            num_samples,
            client_version,
        }
    }
}

/// A registered plant key: empty (no key) or an Ed25519 public key.
pub fn plant_public_key(bytes: &[u8]) -> Result<(), FromProtoError> {
    if bytes.is_empty() {
        return Ok(());
    }
    fixed::<{ fedinspect_common::signing::PUBLIC_KEY_LEN }>("plant_public_key", bytes).map(|_| ())
}

pub fn update_id(bytes: &[u8]) -> Result<UpdateId, FromProtoError> {
    fixed("update_id", bytes).map(UpdateId)
}

fn wire_codec(codec: i32) -> Result<WireCodec, FromProtoError> {
    match pb::Codec::try_from(codec) {
        Ok(pb::Codec::F32) => Ok(WireCodec::F32),
        Ok(pb::Codec::F16) => Ok(WireCodec::F16),
        Ok(pb::Codec::Q8) => Ok(WireCodec::Q8),
        Ok(pb::Codec::Unspecified) | Err(_) => Err(FromProtoError::Codec(codec)),
    }
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], FromProtoError> {
    bytes.try_into().map_err(|_| FromProtoError::Length {
        field,
        expected: N,
        found: bytes.len(),
    })
}

fn finite_metrics(
    metrics: std::collections::HashMap<String, f64>,
) -> Result<BTreeMap<String, f64>, FromProtoError> {
    metrics
        .into_iter()
        .map(|(k, v)| {
            if v.is_finite() {
                Ok((k, v))
            } else {
                Err(FromProtoError::Metric(k))
            }
        })
        .collect()
}

/// The filter of a `ListAudit` request: empty strings match everything.
pub fn audit_filter(kind: &str, plant_id: &str) -> Result<crate::records::AuditFilter, CoreError> {
    use crate::records::AuditKind;
    let kind = match kind {
        "" => None,
        name => Some(AuditKind::parse(name).ok_or_else(|| {
            let names: Vec<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
            CoreError::Malformed(format!(
                "'{name}' is not an audit kind; use one of {}",
                names.join(", ")
            ))
        })?),
    };
    Ok(crate::records::AuditFilter {
        kind,
        plant: (!plant_id.is_empty()).then(|| plant_id.to_string()),
    })
}
