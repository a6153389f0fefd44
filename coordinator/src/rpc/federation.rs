//! The plant-facing `Federation` service: registration, the task stream, model downloads,
//! update uploads, and bundle downloads and install reports (`bundles`). Every refusal is audited and returned with the code `status` gives it.

use std::pin::Pin;
use std::sync::Arc;

use fedinspect_common::tls::Role;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::federation_server::Federation;
use fedinspect_proto::CHUNK_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::from_proto::{self, FromProtoError};
use super::{auth, bundles, status, to_proto};
use crate::error::CoreError;
use crate::hub::{Hub, OpenRound};
use crate::intake::{self, Admission, UpdateHeader};
use crate::records::{now_unix_ms, ModelRecord, PlantRecord};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Chunks of a model download read ahead of the plant: one is enough to keep the stream busy,
/// and with many plants downloading at once each queued chunk costs 1 MiB of memory.
const DOWNLOAD_QUEUE: usize = 1;

pub struct FederationService {
    hub: Arc<Hub>,
}

impl FederationService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// Audits a refusal and turns it into its status.
    fn refuse(&self, actor: &str, action: &str, e: CoreError) -> Status {
        self.hub.audit(actor, action, &e.to_string());
        status::to_status(&e)
    }

    /// The calling plant, which must be registered and not revoked.
    fn registered_plant(&self, plant: &str) -> Result<PlantRecord, CoreError> {
        let record = self
            .hub
            .store
            .plant(plant)?
            .ok_or_else(|| CoreError::NotRegistered(plant.to_string()))?;
        if let Some(r) = &record.revoked {
            return Err(CoreError::Revoked {
                plant: plant.to_string(),
                reason: r.reason.clone(),
            });
        }
        Ok(record)
    }

    async fn register_inner(
        &self,
        plant: &str,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, CoreError> {
        let pb::RegisterRequest {
            protocol_version,
            capabilities,
            plant_public_key,
        } = req;
        intake::check_protocol(protocol_version)?;
        from_proto::plant_public_key(&plant_public_key)?;
        let now = now_unix_ms();
        let record = match self.hub.store.plant(plant)? {
            Some(existing) if existing.revoked.is_some() => {
                return Err(CoreError::Revoked {
                    plant: plant.to_string(),
                    reason: existing.revoked.map(|r| r.reason).unwrap_or_default(),
                })
            }
            // The first key a plant registers is pinned: otherwise any holder of the plant's
            // certificate could register another key (or none, switching the signature check
            // off) and sign updates in its name. Only an admin releases it.
            Some(existing)
                if !existing.plant_public_key.is_empty()
                    && existing.plant_public_key != plant_public_key =>
            {
                return Err(CoreError::PlantKeyChanged {
                    plant: plant.to_string(),
                })
            }
            Some(existing) => PlantRecord {
                capabilities: capabilities.map(Into::into).unwrap_or_default(),
                last_seen_unix_ms: now,
                plant_public_key,
                ..existing
            },
            None => PlantRecord {
                plant_id: plant.to_string(),
                capabilities: capabilities.map(Into::into).unwrap_or_default(),
                registered_unix_ms: now,
                last_seen_unix_ms: now,
                revoked: None,
                plant_public_key,
            },
        };
        self.hub.store.put_plant(&record)?;
        self.hub.store.flush().await?;
        tracing::info!(plant, "plant registered");
        Ok(pb::RegisterResponse {
            protocol_version: fedinspect_proto::PROTOCOL_VERSION,
            plant_id: plant.to_string(),
            coordinator_id: self.hub.coordinator_id.clone(),
            coordinator_public_key: self.hub.signer.verifying_key().as_bytes().to_vec(),
        })
    }

    async fn download_inner(
        &self,
        plant: &str,
        req: pb::DownloadModelRequest,
    ) -> Result<BoxStream<pb::Chunk>, CoreError> {
        let pb::DownloadModelRequest {
            protocol_version,
            version,
            offset,
        } = req;
        intake::check_protocol(protocol_version)?;
        self.registered_plant(plant)?;
        let record = if version == 0 {
            self.hub
                .store
                .latest_usable_model()?
                .ok_or(CoreError::NoModel)?
        } else {
            self.hub
                .store
                .model(version)?
                .ok_or(CoreError::UnknownVersion(version))?
        };
        if offset > record.size_bytes {
            return Err(CoreError::Malformed(format!(
                "offset {offset} is beyond the {} bytes of version {}",
                record.size_bytes, record.version
            )));
        }
        let path = self.hub.blobs.path_of(&record.blob_sha256);
        let file = std::fs::File::open(&path).map_err(|e| {
            CoreError::Internal(format!("cannot open model blob {}: {e}", path.display()))
        })?;
        let (tx, rx) = mpsc::channel(DOWNLOAD_QUEUE);
        // Bytes of the open round's base model count towards that round's traffic.
        let round = self
            .hub
            .open_round()
            .filter(|r| r.record.base_version == record.version);
        let span = tracing::info_span!("download", plant, version = record.version);
        let metrics = self.hub.metrics.clone();
        // Past `limits.max_concurrent_downloads`, a download waits for a slot before its
        // first chunk is read, so queued chunks do not grow with the number of plants.
        let slots = self.hub.download_slots.clone();
        let idle = self.hub.policy.stream_idle_timeout;
        tokio::spawn(
            async move {
                let _slot = slots.acquire_owned().await;
                send_file(file, offset, record, round, tx, metrics, idle).await
            }
            .instrument(span),
        );
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn upload_inner(
        &self,
        plant: &str,
        mut stream: Streaming<pb::UploadUpdateRequest>,
    ) -> Result<pb::UploadUpdateResponse, CoreError> {
        let header = match next_part(&mut stream, self.hub.policy.stream_idle_timeout).await? {
            Some(pb::upload_update_request::Part::Header(h)) => UpdateHeader::try_from(h)?,
            Some(pb::upload_update_request::Part::Chunk(_)) | None => {
                return Err(FromProtoError::HeaderFirst.into())
            }
        };
        let mut receiving = match intake::admit(&self.hub, plant, header).await? {
            Admission::Duplicate(existing) => {
                tracing::info!(plant, update = %existing.update_id, "duplicate update acknowledged again");
                return Ok(response(&existing, true));
            }
            Admission::Fresh(r) => r,
        };
        while let Some(part) = next_part(&mut stream, self.hub.policy.stream_idle_timeout).await? {
            match part {
                pb::upload_update_request::Part::Chunk(c) => {
                    let pb::Chunk {
                        offset,
                        data,
                        total_bytes: _,
                        sha256: _,
                    } = c;
                    receiving.chunk(offset, data).await?;
                }
                pb::upload_update_request::Part::Header(_) => {
                    return Err(FromProtoError::SecondHeader.into())
                }
            }
        }
        let accepted = receiving.finish().await?;
        crate::failpoint::hit_deferred(crate::failpoint::UPLOAD_AFTER_ACK);
        tracing::info!(
            plant,
            round = accepted.record.round,
            update = %accepted.record.update_id,
            norm = accepted.record.l2_norm,
            duplicate = accepted.duplicate,
            "update accepted"
        );
        Ok(response(&accepted.record, accepted.duplicate))
    }

    fn upload_status_inner(
        &self,
        plant: &str,
        req: pb::UploadStatusRequest,
    ) -> Result<pb::UploadStatusResponse, CoreError> {
        let pb::UploadStatusRequest {
            protocol_version,
            update_id,
        } = req;
        intake::check_protocol(protocol_version)?;
        self.registered_plant(plant)?;
        let id = from_proto::update_id(&update_id)?;
        // Accepted: all of it. Otherwise the durable prefix a broken stream of this plant left
        // for the open round (0 for another plant's id).
        Ok(match self.hub.store.update_by_id(&id)? {
            Some(u) if u.plant_id == plant => pb::UploadStatusResponse {
                durable_bytes: u.payload_bytes,
                accepted: true,
            },
            Some(_) => pb::UploadStatusResponse {
                durable_bytes: 0,
                accepted: false,
            },
            None => pb::UploadStatusResponse {
                durable_bytes: intake::resume::durable_bytes(&self.hub, plant, &id),
                accepted: false,
            },
        })
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "register", e))?;
        let actor = format!("plant:{}", who.id);
        self.register_inner(&who.id, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.refuse(&actor, "register", e))
    }

    type TasksStream = BoxStream<pb::Task>;

    async fn tasks(
        &self,
        request: Request<pb::TasksRequest>,
    ) -> Result<Response<Self::TasksStream>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "tasks", e))?;
        let actor = format!("plant:{}", who.id);
        let pb::TasksRequest { protocol_version } = request.into_inner();
        let rx = intake::check_protocol(protocol_version)
            .and_then(|()| self.registered_plant(&who.id))
            .and_then(|_| self.hub.connect(&who.id))
            .map_err(|e| self.refuse(&actor, "tasks", e))?;
        tracing::info!(plant = %who.id, "task stream open");
        let stream = ReceiverStream::new(rx).map(|t| Ok(to_proto::task(&t)));
        Ok(Response::new(Box::pin(stream)))
    }

    type DownloadModelStream = BoxStream<pb::Chunk>;

    async fn download_model(
        &self,
        request: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "download_model", e))?;
        let actor = format!("plant:{}", who.id);
        self.download_inner(&who.id, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.refuse(&actor, "download_model", e))
    }

    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadUpdateResponse>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "upload_update", e))?;
        let actor = format!("plant:{}", who.id);
        // Past `limits.max_concurrent_uploads` streams, a plant waits here with its stream
        // unread: HTTP/2 flow control holds it back, so memory does not grow with plants.
        let _slot = self.hub.upload_slots.clone().acquire_owned().await;
        self.upload_inner(&who.id, request.into_inner())
            .instrument(tracing::info_span!("upload", plant = %who.id))
            .await
            .inspect(|r| self.hub.metrics.update_accepted(r.duplicate))
            .inspect_err(|e| self.hub.metrics.update_refused(e))
            .map(Response::new)
            .map_err(|e| self.refuse(&actor, "upload_update", e))
    }

    async fn upload_status(
        &self,
        request: Request<pb::UploadStatusRequest>,
    ) -> Result<Response<pb::UploadStatusResponse>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "upload_status", e))?;
        let actor = format!("plant:{}", who.id);
        self.upload_status_inner(&who.id, request.into_inner())
            .map(Response::new)
            .map_err(|e| self.refuse(&actor, "upload_status", e))
    }

    type DownloadBundleStream = BoxStream<pb::Chunk>;

    async fn download_bundle(
        &self,
        request: Request<pb::DownloadBundleRequest>,
    ) -> Result<Response<Self::DownloadBundleStream>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "download_bundle", e))?;
        let actor = format!("plant:{}", who.id);
        // Revoked or unknown plants are refused (and audited) before anything else.
        self.registered_plant(&who.id)
            .map_err(|e| self.refuse(&actor, "download_bundle", e))?;
        let push = bundles::push(&self.hub)?;
        bundles::download(
            push,
            request.into_inner(),
            self.hub.policy.stream_idle_timeout,
        )
        .await
        .map(Response::new)
        .map_err(|e| self.refuse(&actor, "download_bundle", e))
    }

    async fn report_install(
        &self,
        request: Request<pb::ReportInstallRequest>,
    ) -> Result<Response<pb::ReportInstallResponse>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "report_install", e))?;
        let actor = format!("plant:{}", who.id);
        self.registered_plant(&who.id)
            .map_err(|e| self.refuse(&actor, "report_install", e))?;
        let push = bundles::push(&self.hub)?;
        bundles::report(&push, &self.hub, &who.id, request.into_inner())
            .map(|()| Response::new(pb::ReportInstallResponse {}))
            .map_err(|e| self.refuse(&actor, "report_install", e))
    }

    async fn report_calibration(
        &self,
        request: Request<pb::ReportCalibrationRequest>,
    ) -> Result<Response<pb::ReportCalibrationResponse>, Status> {
        let who = auth::caller(&request, Role::Plant)
            .map_err(|e| self.refuse(&auth::actor(&request), "report_calibration", e))?;
        let actor = format!("plant:{}", who.id);
        // The plant first: a revoked plant is refused and audited whether or not this
        // coordinator builds bundles.
        self.registered_plant(&who.id)
            .map_err(|e| self.refuse(&actor, "report_calibration", e))?;
        let push = bundles::push(&self.hub)?;
        bundles::calibration(&push, &self.hub, &who.id, request.into_inner())
            .map(|()| Response::new(pb::ReportCalibrationResponse {}))
            .map_err(|e| self.refuse(&actor, "report_calibration", e))
    }
}

/// The next part of an upload; a broken stream, or one that sends nothing for `idle`
/// (a plant that answers HTTP/2 pings but stalls), counts as a cut-off upload.
async fn next_part(
    stream: &mut Streaming<pb::UploadUpdateRequest>,
    idle: std::time::Duration,
) -> Result<Option<pb::upload_update_request::Part>, CoreError> {
    let Ok(message) = tokio::time::timeout(idle, stream.message()).await else {
        return Err(CoreError::Malformed(format!(
            "no upload data for {} s (round.stream_idle_timeout_secs); ask UploadStatus and resume the update from its durable bytes",
            idle.as_secs()
        )));
    };
    match message {
        Ok(Some(pb::UploadUpdateRequest { part: Some(part) })) => Ok(Some(part)),
        Ok(Some(pb::UploadUpdateRequest { part: None })) => Err(FromProtoError::EmptyPart.into()),
        Ok(None) => Ok(None),
        Err(s) => Err(CoreError::Malformed(format!(
            "the upload stream failed ({}); ask UploadStatus and resume the update from its durable bytes",
            s.message()
        ))),
    }
}

fn response(u: &crate::records::UpdateRecord, duplicate: bool) -> pb::UploadUpdateResponse {
    pb::UploadUpdateResponse {
        update_id: u.update_id.0.to_vec(),
        duplicate,
        delta_sha256: u.delta_sha256.0.to_vec(),
    }
}

/// Streams a model blob from `offset` in chunks of at most [`CHUNK_BYTES`]; the last chunk
/// carries the SHA-256 of the whole file. A plant that takes no chunk for `idle`
/// (`round.stream_idle_timeout_secs`) while its connection answers pings loses the download,
/// so it cannot hold a download slot for ever.
async fn send_file(
    file: std::fs::File,
    mut offset: u64,
    record: ModelRecord,
    round: Option<Arc<OpenRound>>,
    tx: mpsc::Sender<Result<pb::Chunk, Status>>,
    metrics: Arc<crate::metrics::Metrics>,
    idle: std::time::Duration,
) {
    use std::os::unix::fs::FileExt;

    let file = Arc::new(file);
    let total = record.size_bytes;
    loop {
        let want = usize::try_from((total - offset).min(CHUNK_BYTES as u64)).unwrap_or(CHUNK_BYTES);
        // Read straight into the message's buffer on the blocking pool: one copy from the
        // page cache, none between file and chunk.
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut data = vec![0u8; want];
            f.read_exact_at(&mut data, offset).map(|()| data)
        })
        .await;
        let data = match read {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => return fail_download(&tx, &e.to_string()).await,
            Err(e) => return fail_download(&tx, &e.to_string()).await,
        };
        let last = offset + want as u64 == total;
        let chunk = pb::Chunk {
            offset,
            data,
            total_bytes: total,
            sha256: if last {
                record.blob_sha256.0.to_vec()
            } else {
                Vec::new()
            },
        };
        match tokio::time::timeout(idle, tx.send(Ok(chunk))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return, // the plant went away
            Err(_) => {
                tracing::warn!(
                    offset,
                    "the plant took no model chunk for {} s (round.stream_idle_timeout_secs); ending its download",
                    idle.as_secs()
                );
                return;
            }
        }
        if let Some(r) = &round {
            r.count_sent(want as u64);
        }
        metrics.model_bytes_sent(want as u64);
        offset += want as u64;
        if last {
            return;
        }
    }
}

async fn fail_download(tx: &mpsc::Sender<Result<pb::Chunk, Status>>, error: &str) {
    tracing::error!(error, "cannot read model blob");
    let _ = tx
        .send(Err(Status::internal(
            "cannot read the model file; try again later",
        )))
        .await;
}
