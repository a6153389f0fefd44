//! Admission of one plant update, in the order that keeps bad data out of the round: the
//! header is checked against the plant's registered signing key, the open round and the
//! limits ([`admit`]); the payload streams chunk by chunk into a temporary blob and through the
//! decoder at the same time ([`Receiving::chunk`], see `payload`), which checks names, shapes,
//! codec, finite values and the trailing checksum and feeds the round's running mean; at the
//! end its length, SHA-256 and norm are checked, and only then is it fsynced, moved into the
//! blob store, recorded, flushed and acknowledged ([`Receiving::finish`]).
//!
//! A stream that breaks leaves its received prefix durable (fsynced, checksummed, keyed by
//! plant and update id, see `storage::partial`); a new stream of the same update resumes at
//! that prefix (`resume`), and the whole payload is decoded and hashed again from byte 0, so
//! nothing half-written is ever counted.

mod payload;
pub mod resume;
mod settle;

use std::collections::BTreeMap;
use std::sync::Arc;

use fedinspect_common::delta::{self, Codec};
use fedinspect_common::manifests::{UpdateManifest, UPDATE_KIND};
use fedinspect_common::signing::{VerifyingKey, PUBLIC_KEY_LEN};
use fedinspect_common::ModelHash;

use crate::aggregation::clip_scale;
use crate::config::NormAction;
use crate::error::CoreError;
use crate::hub::{Feed, Hub, OpenRound};
use crate::records::{now_unix_ms, Digest, UpdateId, UpdateRecord};
use crate::storage::{Incoming, RecordOutcome};
use payload::{Decoded, PayloadTask};
use settle::{settle, settle_stored, Settle};

/// Largest payload chunk accepted, as in the protocol.
pub const CHUNK_BYTES: usize = fedinspect_proto::CHUNK_BYTES;

/// The codec family a header names; the q8 block size is checked in the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireCodec {
    F32,
    F16,
    Q8,
}

/// An update's header, checked for shape by `rpc::from_proto`.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateHeader {
    pub protocol_version: u32,
    pub update_id: UpdateId,
    pub round: u64,
    pub base_version: u64,
    pub base_hash: ModelHash,
    pub codec: WireCodec,
    pub num_samples: u64,
    pub payload_bytes: u64,
    pub payload_sha256: Digest,
    pub plant_signature: Vec<u8>,
    pub metrics: BTreeMap<String, f64>,
    pub resume_offset: u64,
}

/// What [`admit`] decided.
pub enum Admission {
    /// Receive the payload.
    Fresh(Box<Receiving>),
    /// This update was accepted before; acknowledge it again, count nothing.
    Duplicate(UpdateRecord),
}

/// An admitted update whose payload is arriving.
pub struct Receiving {
    hub: Arc<Hub>,
    plant: String,
    header: UpdateHeader,
    round: Arc<OpenRound>,
    payload: PayloadTask,
    /// Payload bytes received so far, counting a resumed upload's durable prefix.
    received: u64,
}

/// An acknowledged update.
#[derive(Debug)]
pub struct Accepted {
    pub record: UpdateRecord,
    pub duplicate: bool,
}

impl WireCodec {
    pub fn name(self) -> &'static str {
        match self {
            WireCodec::F32 => "f32",
            WireCodec::F16 => "f16",
            WireCodec::Q8 => "q8",
        }
    }

    fn family_of(codec: Codec) -> Self {
        match codec {
            Codec::F32 => WireCodec::F32,
            Codec::F16 => WireCodec::F16,
            Codec::Q8 { .. } => WireCodec::Q8,
        }
    }
}

/// Checks `header` from `plant` against its registration, the open round and the limits.
pub async fn admit(
    hub: &Arc<Hub>,
    plant: &str,
    header: UpdateHeader,
) -> Result<Admission, CoreError> {
    check_protocol(header.protocol_version)?;
    let record = hub
        .store
        .plant(plant)?
        .ok_or_else(|| CoreError::NotRegistered(plant.to_string()))?;
    if let Some(r) = record.revoked {
        return Err(CoreError::Revoked {
            plant: plant.to_string(),
            reason: r.reason,
        });
    }
    if let Some(existing) = hub.store.update_by_id(&header.update_id)? {
        if existing.plant_id == plant {
            return Ok(Admission::Duplicate(existing));
        }
        return Err(CoreError::UpdateIdTaken {
            id: header.update_id.to_hex(),
        });
    }
    check_plant_signature(plant, &record.plant_public_key, &header)?;
    let round = hub.open_round().ok_or(CoreError::NoRoundOpen)?;
    check_against_round(hub, plant, &header, &round)?;
    let start = resume::prepare(hub, plant, &header, &round).await?;
    let received = start.mark.durable_bytes;
    let feed = round.feed(plant, header.num_samples);
    let payload = PayloadTask::spawn(hub.blobs.clone(), round.clone(), feed, start);
    Ok(Admission::Fresh(Box::new(Receiving {
        hub: hub.clone(),
        plant: plant.to_string(),
        header,
        round,
        payload,
        received,
    })))
}

pub fn check_protocol(found: u32) -> Result<(), CoreError> {
    let supported = fedinspect_proto::PROTOCOL_VERSION;
    if found != supported {
        return Err(CoreError::ProtocolVersion { found, supported });
    }
    Ok(())
}

/// Checks the header's signature over its [`UpdateManifest`] when the plant registered a key.
fn check_plant_signature(plant: &str, key: &[u8], h: &UpdateHeader) -> Result<(), CoreError> {
    let Ok(key) = <[u8; PUBLIC_KEY_LEN]>::try_from(key) else {
        return Ok(()); // registered without a key (checked to be empty or 32 bytes)
    };
    let manifest = UpdateManifest {
        kind: UPDATE_KIND.to_string(),
        plant_id: plant.to_string(),
        update_id: h.update_id.to_hex(),
        round: h.round,
        base_version: h.base_version,
        base_hash: h.base_hash.to_hex(),
        codec: h.codec.name().to_string(),
        num_samples: h.num_samples,
        payload_sha256: h.payload_sha256.to_hex(),
    };
    manifest
        .verify(&VerifyingKey::from_bytes(key), &h.plant_signature)
        .map_err(|e| CoreError::PlantSignature {
            plant: plant.to_string(),
            reason: e.to_string(),
        })
}

fn check_against_round(
    hub: &Hub,
    plant: &str,
    h: &UpdateHeader,
    round: &OpenRound,
) -> Result<(), CoreError> {
    let r = &round.record;
    if h.round != r.round {
        return Err(CoreError::WrongRound {
            sent: h.round,
            open: r.round,
        });
    }
    if !round.is_sampled(plant) {
        return Err(CoreError::NotSampled {
            plant: plant.to_string(),
            round: r.round,
        });
    }
    if let Some(existing) = hub.store.update_for(r.round, plant)? {
        return Err(CoreError::AlreadyContributed {
            plant: plant.to_string(),
            round: r.round,
            existing: existing.update_id.to_hex(),
        });
    }
    if h.base_version != r.base_version {
        return Err(CoreError::StaleBase {
            sent: h.base_version,
            expected: r.base_version,
            round: r.round,
        });
    }
    if h.base_hash != r.base_hash.0 {
        return Err(CoreError::BaseHashMismatch {
            version: r.base_version,
        });
    }
    let codec = r.plan.codec;
    if h.codec != WireCodec::family_of(codec) {
        return Err(CoreError::WrongCodec {
            found: h.codec.name(),
            expected: codec,
            round: r.round,
        });
    }
    let limits = &hub.limits;
    if h.num_samples == 0 {
        return Err(CoreError::ZeroSamples);
    }
    if h.num_samples > limits.max_samples_per_plant {
        return Err(CoreError::TooManySamples {
            found: h.num_samples,
            limit: limits.max_samples_per_plant,
        });
    }
    if h.payload_bytes > limits.max_update_bytes {
        return Err(CoreError::PayloadTooLarge {
            found: h.payload_bytes,
            limit: limits.max_update_bytes,
        });
    }
    let expected = delta::encoded_len(&round.layout, codec);
    if h.payload_bytes != expected {
        return Err(CoreError::PayloadLength {
            declared: h.payload_bytes,
            expected,
            codec,
        });
    }
    Ok(())
}

impl Receiving {
    /// Appends one chunk, which must start where the previous one ended. Returns the
    /// decoder's refusal as soon as it has one.
    pub async fn chunk(&mut self, offset: u64, data: Vec<u8>) -> Result<(), CoreError> {
        if data.len() > CHUNK_BYTES {
            return Err(CoreError::ChunkTooLarge(data.len()));
        }
        let expected = self.received;
        if offset != expected {
            return Err(CoreError::ChunkOutOfOrder { offset, expected });
        }
        if expected + data.len() as u64 > self.header.payload_bytes {
            return Err(CoreError::PayloadOverrun {
                declared: self.header.payload_bytes,
            });
        }
        self.received += data.len() as u64;
        self.hub.metrics.update_bytes_received(data.len() as u64);
        self.payload.push(data).await
    }

    /// Checks the complete payload, stores it and records the update. Runs as its own task,
    /// so that a plant hanging up now cannot interrupt the durable writes half-way.
    pub async fn finish(self) -> Result<Accepted, CoreError> {
        tokio::spawn(self.complete())
            .await
            .map_err(|e| CoreError::Internal(format!("storing an update failed: {e}")))?
    }

    async fn complete(self) -> Result<Accepted, CoreError> {
        let Receiving {
            hub,
            plant,
            header: h,
            round,
            payload,
            received,
        } = self;
        if received < h.payload_bytes {
            // Ending the stream makes the decoder stop and clean up.
            drop(payload);
            return Err(CoreError::Truncated {
                got: received,
                expected: h.payload_bytes,
            });
        }
        let Decoded {
            incoming,
            l2_norm,
            feed,
        } = payload.finish().await?;
        let checked = check_payload(&hub, &h, &incoming, l2_norm);
        let clip = match checked {
            Ok(clip) => clip,
            Err(e) => {
                settle(feed, &round, incoming, Settle::Discard).await;
                return Err(e);
            }
        };
        let (stored, feed) = store_blob(incoming, feed, &round).await?;
        crate::failpoint::hit(crate::failpoint::INTAKE_AFTER_FSYNC);
        let record = UpdateRecord {
            update_id: h.update_id,
            round: h.round,
            plant_id: plant.clone(),
            base_version: h.base_version,
            codec: round.record.plan.codec,
            num_samples: h.num_samples,
            payload_bytes: h.payload_bytes,
            delta_sha256: stored,
            plant_signature: h.plant_signature,
            metrics: h.metrics,
            l2_norm,
            clip_scale: clip,
            received_unix_ms: now_unix_ms(),
        };
        record_update(&hub, &round, record, feed).await
    }
}

/// Records an update whose blob is stored, settles its running-mean entry (counted only if
/// the record landed), makes the record durable and says what the plant is told.
async fn record_update(
    hub: &Hub,
    round: &Arc<OpenRound>,
    record: UpdateRecord,
    feed: Option<Feed>,
) -> Result<Accepted, CoreError> {
    let stored = record.delta_sha256;
    let outcome = hub.commit_update(&record);
    let counted = matches!(outcome, Ok(RecordOutcome::Inserted));
    let how = match (counted, record.clip_scale) {
        (true, Some(scale)) => Settle::CommitScaled(scale),
        (true, None) => Settle::Commit,
        (false, _) => Settle::Discard,
    };
    settle_stored(feed, round, hub.blobs.path_of(&stored), how).await;
    match outcome? {
        RecordOutcome::Inserted => {
            hub.hashed_at_intake(stored);
            hub.store.flush().await?;
            crate::failpoint::hit(crate::failpoint::INTAKE_AFTER_FLUSH);
            Ok(Accepted {
                record,
                duplicate: false,
            })
        }
        RecordOutcome::Duplicate(existing) => Ok(Accepted {
            record: existing,
            duplicate: true,
        }),
        RecordOutcome::PlantAlreadyContributed(existing) => Err(CoreError::AlreadyContributed {
            plant: record.plant_id,
            round: record.round,
            existing: existing.update_id.to_hex(),
        }),
        RecordOutcome::IdTaken { .. } => Err(CoreError::UpdateIdTaken {
            id: record.update_id.to_hex(),
        }),
    }
}

/// The checks that need the whole payload: its SHA-256 against the header, then the norm
/// bound. `Ok(Some(scale))` when the delta is to be clipped.
fn check_payload(
    hub: &Hub,
    h: &UpdateHeader,
    incoming: &Incoming,
    l2_norm: f64,
) -> Result<Option<f32>, CoreError> {
    let digest = incoming.digest();
    if digest != h.payload_sha256 {
        return Err(CoreError::PayloadDigest {
            declared: h.payload_sha256.to_hex(),
            found: digest.to_hex(),
        });
    }
    let Some(bound) = hub.limits.delta_norm_bound else {
        return Ok(None);
    };
    match (clip_scale(l2_norm, bound), hub.limits.norm_action) {
        (None, _) => Ok(None),
        (Some(_), NormAction::Reject) => Err(CoreError::NormExceeded {
            norm: l2_norm,
            bound,
        }),
        (Some(scale), NormAction::Clip) => Ok(Some(scale)),
    }
}

/// Fsyncs the payload and moves it into the blob store. On failure the attempt is taken out
/// of the running mean first (while its file still exists).
async fn store_blob(
    mut incoming: Incoming,
    feed: Option<Feed>,
    round: &Arc<OpenRound>,
) -> Result<(Digest, Option<Feed>), CoreError> {
    let round = round.clone();
    blocking(move || {
        crate::failpoint::hit(crate::failpoint::INTAKE_BEFORE_FSYNC);
        if let Err(e) = incoming.sync() {
            if let Some(feed) = feed {
                payload::take_out(feed, incoming.path(), &round);
            }
            return Err(e.into());
        }
        // A failed rename drops the file, and the feed with it: the preview is then marked
        // incomplete rather than wrong.
        let digest = incoming.commit()?;
        Ok((digest, feed))
    })
    .await
}

/// Runs blocking work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoreError::Internal(format!("a blocking task failed: {e}")))?
}
