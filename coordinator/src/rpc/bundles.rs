//! The plant-facing bundle calls: `DownloadBundle` streams a stored bundle's tar archive from
//! an offset in chunks of at most [`CHUNK_BYTES`] (every chunk carries the total, the last one
//! the SHA-256 of the whole archive), and `ReportInstall` records a plant's result with
//! `bundle::push`. Protobuf stops here; the federation service calls these after it has
//! identified and checked the plant.

use std::pin::Pin;
use std::sync::Arc;

use fedinspect_proto::v1 as pb;
use fedinspect_proto::CHUNK_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;

use crate::bundle::{BundlePush, BundleStore, InstallResult};
use crate::error::CoreError;
use crate::hub::Hub;
use crate::intake;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The hub's bundle push, or the refusal of a coordinator without `[bundles]`.
pub fn push(hub: &Hub) -> Result<Arc<BundlePush>, Status> {
    hub.bundles.get().cloned().ok_or_else(|| {
        Status::unimplemented(
            "this coordinator has no [bundles] section in its config, so it serves no \
             inference bundles; ask central IT to configure bundles",
        )
    })
}

/// Streams bundle `bundle_id`'s archive from `offset`; a plant that takes no chunk for `idle`
/// (`round.stream_idle_timeout_secs`) loses the download.
pub async fn download(
    push: Arc<BundlePush>,
    req: pb::DownloadBundleRequest,
    idle: std::time::Duration,
) -> Result<BoxStream<pb::Chunk>, CoreError> {
    let pb::DownloadBundleRequest {
        protocol_version,
        bundle_id,
        offset,
    } = req;
    intake::check_protocol(protocol_version)?;
    if !BundleStore::is_valid_id(&bundle_id) {
        return Err(CoreError::Malformed(format!(
            "'{bundle_id}' is not a bundle id (v<version>-<16 hex>); use the id of the install task"
        )));
    }
    let (total, digest) = {
        let (push, id) = (push.clone(), bundle_id.clone());
        tokio::task::spawn_blocking(move || archive_digest(push.store(), &id))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??
    };
    if offset > total {
        return Err(CoreError::Malformed(format!(
            "offset {offset} is beyond the {total} bytes of bundle {bundle_id}'s archive"
        )));
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(send_archive(
        push, bundle_id, offset, total, digest, tx, idle,
    ));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Records the plant's report.
pub fn report(
    push: &BundlePush,
    hub: &Hub,
    plant: &str,
    req: pb::ReportInstallRequest,
) -> Result<(), CoreError> {
    let pb::ReportInstallRequest {
        protocol_version,
        bundle_id,
        ok,
        message,
        engine_built_locally,
    } = req;
    intake::check_protocol(protocol_version)?;
    let message: String = message.chars().take(4000).collect();
    push.report(
        hub,
        plant,
        &InstallResult {
            bundle_id,
            ok,
            message,
            engine_built_locally,
        },
    )
}

/// Most activation ranges one report may carry (the default detector has about 60).
const MAX_RANGES: usize = 4096;

/// Stores the ranges `plant` measured in `round`; refused unless the round accepted the
/// plant's update, or when a range is malformed.
pub fn calibration(
    push: &BundlePush,
    hub: &Hub,
    plant: &str,
    req: pb::ReportCalibrationRequest,
) -> Result<(), CoreError> {
    let pb::ReportCalibrationRequest {
        protocol_version,
        round,
        ranges,
    } = req;
    intake::check_protocol(protocol_version)?;
    if hub.store.update_for(round, plant)?.is_none() {
        return Err(CoreError::Malformed(format!(
            "round {round} has no accepted update of plant '{plant}'; send calibration ranges \
             after the round's update is acknowledged"
        )));
    }
    if ranges.len() > MAX_RANGES {
        return Err(CoreError::Malformed(format!(
            "{} ranges, over the limit of {MAX_RANGES}",
            ranges.len()
        )));
    }
    let mut out = fedinspect_common::onnx::ActivationRanges::new();
    for pb::ActivationRange { node, min, max } in ranges {
        if node.is_empty()
            || node.len() > 256
            || !(min.is_finite() && max.is_finite() && min <= max)
        {
            return Err(CoreError::Malformed(format!(
                "calibration range of '{node}' is [{min}, {max}]; send finite ranges with \
                 min <= max for named nodes"
            )));
        }
        out.insert(node, fedinspect_common::onnx::ActivationRange { min, max });
    }
    push.record_calibration(round, plant, &out)
}

/// Length and SHA-256 of a stored archive; an id not stored is refused.
fn archive_digest(store: &BundleStore, id: &str) -> Result<(u64, Vec<u8>), CoreError> {
    use std::io::Read;
    let path = store
        .archive(id)
        .map_err(|e| CoreError::Malformed(e.to_string()))?;
    let mut file = std::fs::File::open(&path).map_err(|_| {
        CoreError::Malformed(format!(
            "bundle {id} is not stored on this coordinator; install the bundle the latest \
             install task names"
        ))
    })?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| CoreError::Internal(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, ctx.finish().as_ref().to_vec()))
}

async fn send_archive(
    push: Arc<BundlePush>,
    id: String,
    mut offset: u64,
    total: u64,
    digest: Vec<u8>,
    tx: mpsc::Sender<Result<pb::Chunk, Status>>,
    idle: std::time::Duration,
) {
    loop {
        let read = {
            let (push, id) = (push.clone(), id.clone());
            tokio::task::spawn_blocking(move || push.store().read_chunk(&id, offset, CHUNK_BYTES))
                .await
        };
        let data = match read {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return fail(&tx, &e.to_string()).await,
            Err(e) => return fail(&tx, &e.to_string()).await,
        };
        let end = offset + data.len() as u64;
        if data.is_empty() && offset < total {
            return fail(&tx, "the archive shrank while it was sent").await;
        }
        let last = end >= total;
        let chunk = pb::Chunk {
            offset,
            data,
            total_bytes: total,
            sha256: if last { digest.clone() } else { Vec::new() },
        };
        match tokio::time::timeout(idle, tx.send(Ok(chunk))).await {
            Ok(Ok(())) if !last => {}
            Ok(_) => return, // sent the last chunk, or the plant went away
            Err(_) => {
                tracing::warn!(
                    bundle = %id,
                    offset,
                    "the plant took no bundle chunk for {} s (round.stream_idle_timeout_secs); ending its download",
                    idle.as_secs()
                );
                return;
            }
        }
        offset = end;
    }
}

async fn fail(tx: &mpsc::Sender<Result<pb::Chunk, Status>>, error: &str) {
    tracing::error!(error, "cannot read bundle archive");
    let _ = tx
        .send(Err(Status::internal(
            "cannot read the bundle archive; try again later",
        )))
        .await;
}
