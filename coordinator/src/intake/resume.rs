//! Where an admitted upload starts: from byte 0, or from the durable prefix a broken stream of
//! the same (plant, update id) left (`storage::partial`). A resume must send exactly the header
//! the prefix came with and start exactly at its durable length; the prefix is checked against
//! its recorded SHA-256 before anything is appended. `resume_offset = 0` starts over, so a plant
//! that never resumes is never stuck behind a partial it cannot see.
//!
//! The whole-payload SHA-256 is recomputed by replaying the prefix from disk (`payload`), not
//! kept as hash state: ring cannot serialise a hash in progress, and the decoder must see the
//! prefix again anyway (names, shapes, finite values, norm, the running mean), so one read
//! serves both.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{blocking, UpdateHeader};
use crate::error::CoreError;
use crate::hub::{Hub, OpenRound};
use crate::records::UpdateId;
use crate::storage::{Claim, PartialMark};

/// A claimed upload and the mark it starts from (`durable_bytes` = the first byte to receive).
pub struct Start {
    pub claim: Claim,
    pub mark: PartialMark,
}

/// Claims `plant`'s upload of `h.update_id` for this stream and checks its resume offset and
/// header against the held prefix, if any.
pub async fn prepare(
    hub: &Arc<Hub>,
    plant: &str,
    h: &UpdateHeader,
    round: &OpenRound,
) -> Result<Start, CoreError> {
    let id = h.update_id.to_hex();
    let partials = hub.blobs.partials().clone();
    let claim = partials
        .claim(plant, &h.update_id)
        .ok_or_else(|| CoreError::UploadInProgress { id: id.clone() })?;
    let fields = header_fields(h);
    let held = partials
        .mark(plant, &h.update_id)
        .filter(|m| m.round == round.record.round);
    let fresh = PartialMark {
        plant: plant.to_string(),
        update_id: id.clone(),
        round: round.record.round,
        header: fields.clone(),
        durable_bytes: 0,
        prefix_sha256: String::new(),
    };
    let Some(mark) = held else {
        if h.resume_offset != 0 {
            return Err(CoreError::ResumeOffset {
                id,
                sent: h.resume_offset,
                durable: 0,
            });
        }
        return Ok(Start { claim, mark: fresh });
    };
    let changed: Vec<&str> = differing(&mark.header, &fields);
    if !changed.is_empty() {
        return Err(CoreError::ResumeHeaderChanged {
            id,
            fields: changed.join(", "),
        });
    }
    if h.resume_offset == 0 {
        tracing::info!(update = %id, held = mark.durable_bytes, "upload starts over; the held prefix is dropped");
        return Ok(Start { claim, mark: fresh });
    }
    if h.resume_offset != mark.durable_bytes {
        return Err(CoreError::ResumeOffset {
            id,
            sent: h.resume_offset,
            durable: mark.durable_bytes,
        });
    }
    let (claim, intact) = blocking(move || {
        let intact = partials.verify(&claim, &mark)?;
        if !intact {
            partials.discard(&claim);
        }
        Ok((claim, intact.then_some(mark)))
    })
    .await?;
    match intact {
        Some(mark) => {
            tracing::info!(update = %id, from = mark.durable_bytes, "upload resumes");
            Ok(Start { claim, mark })
        }
        None => {
            tracing::warn!(update = %id, "the held prefix does not match its checksum; dropped");
            drop(claim);
            Err(CoreError::ResumeOffset {
                id,
                sent: h.resume_offset,
                durable: 0,
            })
        }
    }
}

/// Durable bytes of `plant`'s partial upload `id` for the open round (0 when none is held, for
/// another plant's id, or for a round that is not open).
pub fn durable_bytes(hub: &Hub, plant: &str, id: &UpdateId) -> u64 {
    let open = hub.open_round().map(|r| r.record.round);
    hub.blobs
        .partials()
        .mark(plant, id)
        .filter(|m| Some(m.round) == open)
        .map_or(0, |m| m.durable_bytes)
}

/// Drops the held partial uploads of every round but `keep` (the round driver calls this with
/// `None` when a round closes: none of its partials can be completed any more).
pub fn drop_partials(hub: &Hub, keep: Option<u64>) {
    let dropped = hub.blobs.partials().retain_round(keep);
    if dropped > 0 {
        tracing::info!(dropped, "partial uploads of ended rounds removed");
    }
}

/// At start-up: keeps the partial uploads of the latest round only if it is still collecting.
pub fn drop_partials_at_start(hub: &Hub) -> Result<(), CoreError> {
    use crate::records::RoundState;
    let collecting = hub
        .store
        .latest_round()?
        .filter(|r| matches!(r.state, RoundState::Open | RoundState::Collecting))
        .map(|r| r.round);
    drop_partials(hub, collecting);
    Ok(())
}

/// Every header field but `resume_offset`, as text: what a resumed stream must repeat.
fn header_fields(h: &UpdateHeader) -> BTreeMap<String, String> {
    let UpdateHeader {
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
        resume_offset: _,
    } = h;
    let metrics: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    [
        ("protocol_version", protocol_version.to_string()),
        ("update_id", update_id.to_hex()),
        ("round", round.to_string()),
        ("base_version", base_version.to_string()),
        ("base_hash", base_hash.to_hex()),
        ("codec", codec.name().to_string()),
        ("num_samples", num_samples.to_string()),
        ("payload_bytes", payload_bytes.to_string()),
        ("payload_sha256", payload_sha256.to_hex()),
        ("plant_signature", hex::encode(plant_signature)),
        ("metrics", metrics.join(";")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Names of the fields whose values differ (or that only one side has).
fn differing<'a>(
    held: &'a BTreeMap<String, String>,
    sent: &'a BTreeMap<String, String>,
) -> Vec<&'a str> {
    let mut names: Vec<&str> = held
        .iter()
        .filter(|(k, v)| sent.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    names.extend(
        sent.keys()
            .filter(|k| !held.contains_key(*k))
            .map(String::as_str),
    );
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_names_every_changed_or_missing_field() {
        let held: BTreeMap<String, String> = [("a", "1"), ("b", "2"), ("c", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut sent = held.clone();
        assert!(differing(&held, &sent).is_empty());
        sent.insert("b".into(), "9".into());
        sent.remove("c");
        sent.insert("d".into(), "4".into());
        assert_eq!(differing(&held, &sent), ["b", "c", "d"]);
    }
}
