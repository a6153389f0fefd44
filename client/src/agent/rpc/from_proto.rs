//! Protobuf messages from the coordinator into the agent's types, by exhaustive destructuring
//! (a new field breaks the build here instead of being ignored).

use fedinspect_common::delta::Codec;
use fedinspect_common::lr_cycle::LrSpan;
use fedinspect_common::ModelHash;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::{CHUNK_BYTES, PROTOCOL_VERSION};

use super::{RpcError, MAX_MODEL_BYTES};
use crate::agent::types::{InstallBundleTask, Registration, Task, TrainPlan, TrainTask, UploadAck};

fn malformed(what: &'static str, reason: impl Into<String>) -> RpcError {
    RpcError::Malformed {
        what,
        reason: reason.into(),
    }
}

pub fn registration(r: pb::RegisterResponse) -> Result<Registration, RpcError> {
    let pb::RegisterResponse {
        protocol_version,
        plant_id,
        coordinator_id,
        coordinator_public_key,
    } = r;
    if protocol_version != PROTOCOL_VERSION {
        return Err(malformed(
            "registration",
            format!("protocol version {protocol_version}, this plant speaks {PROTOCOL_VERSION}; upgrade the older side"),
        ));
    }
    Ok(Registration {
        plant_id,
        coordinator_id,
        coordinator_public_key,
    })
}

pub fn task(t: pb::Task) -> Result<Task, RpcError> {
    let pb::Task { kind } = t;
    match kind {
        Some(pb::task::Kind::Train(t)) => train_task(t).map(Task::Train),
        Some(pb::task::Kind::InstallBundle(t)) => install_task(t).map(Task::InstallBundle),
        Some(pb::task::Kind::Wait(_)) => Ok(Task::Other("wait")),
        None => Err(malformed("task", "no kind set")),
    }
}

fn install_task(t: pb::InstallBundleTask) -> Result<InstallBundleTask, RpcError> {
    let pb::InstallBundleTask {
        bundle_id,
        model_version,
        manifest_sha256,
        canary,
    } = t;
    if manifest_sha256.len() != 32 {
        return Err(malformed(
            "install task",
            format!("manifest_sha256 of {} bytes", manifest_sha256.len()),
        ));
    }
    if !fedinspect_common::bundle::is_valid_file_name(&bundle_id) {
        return Err(malformed(
            "install task",
            format!("'{bundle_id}' is not a bundle id"),
        ));
    }
    Ok(InstallBundleTask {
        bundle_id,
        model_version,
        manifest_sha256: hex::encode(manifest_sha256),
        canary,
    })
}

fn train_task(t: pb::TrainTask) -> Result<TrainTask, RpcError> {
    let pb::TrainTask {
        round,
        base_version,
        base_hash,
        base_signature,
        plan,
        deadline_unix_ms,
    } = t;
    let base_hash = ModelHash(base_hash.as_slice().try_into().map_err(|_| {
        malformed(
            "train task",
            format!("base_hash of {} bytes", base_hash.len()),
        )
    })?);
    let plan = plan.ok_or_else(|| malformed("train task", "no plan"))?;
    Ok(TrainTask {
        round,
        base_version,
        base_hash,
        base_signature,
        plan: train_plan(plan)?,
        deadline_unix_ms,
    })
}

fn train_plan(p: pb::TrainPlan) -> Result<TrainPlan, RpcError> {
    let pb::TrainPlan {
        local_epochs,
        learning_rate,
        fedprox_mu,
        codec,
        q8_block,
        batch_size,
        lr_span_start,
        lr_span_end,
    } = p;
    let codec = match pb::Codec::try_from(codec) {
        Ok(pb::Codec::F32) => Codec::F32,
        Ok(pb::Codec::F16) => Codec::F16,
        Ok(pb::Codec::Q8) => Codec::Q8 { block: q8_block }
            .validate()
            .map_err(|e| malformed("train plan", e.to_string()))?,
        Ok(pb::Codec::Unspecified) | Err(_) => {
            return Err(malformed("train plan", format!("codec {codec}")))
        }
    };
    if local_epochs == 0 {
        return Err(malformed("train plan", "0 local epochs"));
    }
    if !(learning_rate.is_finite() && learning_rate > 0.0) {
        return Err(malformed(
            "train plan",
            format!("learning rate {learning_rate}"),
        ));
    }
    if !(fedprox_mu.is_finite() && fedprox_mu >= 0.0) {
        return Err(malformed("train plan", format!("FedProx mu {fedprox_mu}")));
    }
    let lr_span = if (lr_span_start, lr_span_end) == (0.0, 0.0) {
        None
    } else {
        Some(
            LrSpan::new(lr_span_start, lr_span_end)
                .map_err(|e| malformed("train plan", e.to_string()))?,
        )
    };
    Ok(TrainPlan {
        local_epochs,
        learning_rate,
        fedprox_mu,
        codec,
        batch_size,
        lr_span,
    })
}

/// A download chunk, checked against the bytes received so far and the total seen so far.
pub fn chunk(c: pb::Chunk, received: u64, total: &mut Option<u64>) -> Result<pb::Chunk, RpcError> {
    checked_chunk("model download", MAX_MODEL_BYTES, c, received, total)
}

/// Largest bundle archive accepted: the unpack limit on all files (8 GiB) and its headers.
pub const MAX_BUNDLE_BYTES: u64 = (8 << 30) + (1 << 20);

/// A chunk of a bundle download, checked like a model chunk with the bundle size limit.
pub fn bundle_chunk(
    c: pb::Chunk,
    received: u64,
    total: &mut Option<u64>,
) -> Result<pb::Chunk, RpcError> {
    checked_chunk("bundle download", MAX_BUNDLE_BYTES, c, received, total)
}

/// The end of a download stream, checked the same way for models and bundles: it delivered
/// the total its chunks announced, and its bytes hash (`computed`) to the SHA-256 its last
/// chunk carries (`announced`). Otherwise the reason, for the caller's error.
pub fn stream_end(
    received: u64,
    total: Option<u64>,
    computed: &[u8],
    announced: &[u8],
) -> Result<(), String> {
    if Some(received) != total {
        return Err(format!(
            "the stream ended after {received} of {} bytes; download it again",
            total.map_or("an unknown number of".into(), |t| t.to_string())
        ));
    }
    if computed != announced {
        return Err(
            "the bytes do not match the SHA-256 of the last chunk; download it again".into(),
        );
    }
    Ok(())
}

/// A chunk of the download `what`: at the offset reached, no larger than a chunk, its total
/// within `max_total` and the same as the chunks before it, and not past that total.
fn checked_chunk(
    what: &'static str,
    max_total: u64,
    c: pb::Chunk,
    received: u64,
    total: &mut Option<u64>,
) -> Result<pb::Chunk, RpcError> {
    if c.offset != received {
        return Err(malformed(
            what,
            format!("a chunk at byte {} after {received} bytes", c.offset),
        ));
    }
    if c.data.len() > CHUNK_BYTES {
        return Err(malformed(
            what,
            format!("a chunk of {} bytes", c.data.len()),
        ));
    }
    if c.total_bytes > max_total {
        return Err(malformed(
            what,
            format!("{} bytes, over the {max_total} byte limit", c.total_bytes),
        ));
    }
    match *total {
        Some(t) if t != c.total_bytes => {
            return Err(malformed(
                what,
                format!("the total changed from {t} to {}", c.total_bytes),
            ))
        }
        _ => *total = Some(c.total_bytes),
    }
    if received + c.data.len() as u64 > c.total_bytes {
        return Err(malformed(what, "more bytes than the announced total"));
    }
    Ok(c)
}

pub fn upload_ack(r: pb::UploadUpdateResponse, sent_id: &[u8; 16]) -> Result<UploadAck, RpcError> {
    let pb::UploadUpdateResponse {
        update_id,
        duplicate,
        delta_sha256,
    } = r;
    if update_id != sent_id {
        return Err(malformed(
            "upload acknowledgement",
            "it names another update id",
        ));
    }
    Ok(UploadAck {
        duplicate,
        delta_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(lr_span_start: f64, lr_span_end: f64) -> pb::TrainPlan {
        pb::TrainPlan {
            local_epochs: 1,
            learning_rate: 1e-3,
            fedprox_mu: 0.0,
            codec: pb::Codec::F32.into(),
            q8_block: 0,
            batch_size: 8,
            lr_span_start,
            lr_span_end,
        }
    }

    #[test]
    fn a_plan_carries_its_stretch_of_a_learning_rate_cycle_or_none() {
        assert_eq!(train_plan(plan(0.0, 0.0)).unwrap().lr_span, None);
        let span = train_plan(plan(0.25, 0.5)).unwrap().lr_span.unwrap();
        assert_eq!((span.start, span.end), (0.25, 0.5));
        for (a, b) in [(0.5, 0.25), (0.0, 1.5), (-0.5, 0.5), (f64::NAN, 1.0)] {
            let err = train_plan(plan(a, b)).unwrap_err().to_string();
            assert!(err.contains("learning-rate span"), "[{a}, {b}]: {err}");
        }
    }

    fn piece(offset: u64, len: usize, total_bytes: u64) -> pb::Chunk {
        pb::Chunk {
            offset,
            data: vec![7; len],
            total_bytes,
            sha256: Vec::new(),
        }
    }

    #[test]
    fn download_chunks_are_refused_naming_the_download_and_what_is_wrong() {
        let mut total = None;
        assert!(chunk(piece(0, 4, 10), 0, &mut total).is_ok());
        assert_eq!(total, Some(10));
        assert!(chunk(piece(4, 6, 10), 4, &mut total).is_ok());
        let cases = [
            (piece(5, 4, 10), 4, "a chunk at byte 5 after 4 bytes"),
            (piece(4, CHUNK_BYTES + 1, u64::MAX >> 8), 4, "a chunk of"),
            (piece(4, 4, 12), 4, "the total changed from 10 to 12"),
            (piece(8, 4, 10), 8, "more bytes than the announced total"),
        ];
        for (c, received, want) in cases {
            let err = chunk(c, received, &mut Some(10)).unwrap_err().to_string();
            assert!(
                err.contains("model download") && err.contains(want),
                "{err}"
            );
        }
        // Each download kind has its own size limit.
        let over_model = MAX_MODEL_BYTES + 1;
        let err = chunk(piece(0, 1, over_model), 0, &mut None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("over the") && err.contains("byte limit"),
            "{err}"
        );
        assert!(over_model <= MAX_BUNDLE_BYTES);
        assert!(bundle_chunk(piece(0, 1, over_model), 0, &mut None).is_ok());
        let err = bundle_chunk(piece(0, 1, MAX_BUNDLE_BYTES + 1), 0, &mut None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bundle download") && err.contains("byte limit"),
            "{err}"
        );
    }

    #[test]
    fn a_download_that_ends_short_or_hashes_wrong_is_refused_saying_which() {
        let good = [1u8; 32];
        assert!(stream_end(10, Some(10), &good, &good).is_ok());
        let short = stream_end(6, Some(10), &good, &good).unwrap_err();
        assert!(short.contains("after 6 of 10 bytes"), "{short}");
        let empty = stream_end(0, None, &good, &good).unwrap_err();
        assert!(
            empty.contains("after 0 of an unknown number of bytes"),
            "{empty}"
        );
        let wrong = stream_end(10, Some(10), &good, &[2u8; 32]).unwrap_err();
        assert!(wrong.contains("do not match the SHA-256"), "{wrong}");
        let none = stream_end(10, Some(10), &good, &[]).unwrap_err();
        assert!(none.contains("do not match the SHA-256"), "{none}");
    }
}
