//! The operator-facing `Admin` service: only admin certificates get in; the work is in
//! `admin_ops`. `ExportModel` streams a version's safetensors blob in chunks.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use fedinspect_common::tls::Role;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_server::Admin;
use fedinspect_proto::CHUNK_BYTES;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{auth, from_proto, status, to_proto};
use crate::admin_ops::{self, RoundReport};
use crate::error::CoreError;
use crate::hub::Hub;
use crate::records::{now_unix_ms, Digest, UpdateRecord};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Listings without a limit return this many entries.
const DEFAULT_LIMIT: usize = 50;

pub struct AdminService {
    hub: Arc<Hub>,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// The calling admin's name; anyone else is refused and audited.
    fn admin<T>(&self, request: &Request<T>, action: &str) -> Result<String, Status> {
        auth::caller(request, Role::Admin)
            .map(|id| id.id)
            .map_err(|e| self.refuse(&auth::actor(request), action, e))
    }

    fn refuse(&self, actor: &str, action: &str, e: CoreError) -> Status {
        self.hub.audit(actor, action, &e.to_string());
        status::to_status(&e)
    }
}

fn limit(n: u32) -> usize {
    if n == 0 {
        DEFAULT_LIMIT
    } else {
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.admin(&request, "status")?;
        let s = admin_ops::status(&self.hub).map_err(|e| status::to_status(&e))?;
        Ok(Response::new(to_proto::status(&s)))
    }

    async fn list_plants(
        &self,
        request: Request<pb::ListPlantsRequest>,
    ) -> Result<Response<pb::ListPlantsResponse>, Status> {
        self.admin(&request, "list_plants")?;
        let plants = admin_ops::plants(&self.hub).map_err(|e| status::to_status(&e))?;
        Ok(Response::new(pb::ListPlantsResponse {
            plants: plants
                .iter()
                .map(|(p, c)| to_proto::plant_info(p, *c))
                .collect(),
        }))
    }

    async fn list_rounds(
        &self,
        request: Request<pb::ListRoundsRequest>,
    ) -> Result<Response<pb::ListRoundsResponse>, Status> {
        self.admin(&request, "list_rounds")?;
        let pb::ListRoundsRequest { limit: n } = request.into_inner();
        let rounds = self
            .hub
            .store
            .rounds(limit(n))
            .map_err(|e| status::to_status(&e.into()))?;
        let now = now_unix_ms();
        Ok(Response::new(pb::ListRoundsResponse {
            rounds: rounds
                .iter()
                .map(|r| to_proto::round_info(r, now))
                .collect(),
        }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.admin(&request, "list_models")?;
        let pb::ListModelsRequest {
            limit: n,
            version,
            below_version,
        } = request.into_inner();
        let store_err = |e: crate::storage::StorageError| status::to_status(&e.into());
        if version != 0 {
            let m = self.hub.store.model(version).map_err(store_err)?.ok_or_else(|| {
                Status::not_found(format!(
                    "model version {version} does not exist; `coordinator admin models` lists the versions"
                ))
            })?;
            return Ok(Response::new(pb::ListModelsResponse {
                models: vec![to_proto::model_info(&m)],
                next_below_version: 0,
            }));
        }
        let below = if below_version == 0 {
            u64::MAX
        } else {
            below_version
        };
        let models = self
            .hub
            .store
            .models_below(below, limit(n))
            .map_err(store_err)?;
        Ok(Response::new(to_proto::models_page(
            &models,
            to_proto::MODELS_PAGE_BYTES,
        )))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let admin = self.admin(&request, "promote")?;
        let pb::PromoteRequest { version, force } = request.into_inner();
        admin_ops::promote(&self.hub, &admin, version, force)
            .await
            .map(|m| Response::new(to_proto::model_info(&m)))
            .map_err(|e| self.refuse(&format!("admin:{admin}"), "promote", e))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let admin = self.admin(&request, "rollback")?;
        let pb::RollbackRequest { to_version } = request.into_inner();
        admin_ops::rollback(&self.hub, &admin, to_version)
            .await
            .map(|m| Response::new(to_proto::model_info(&m)))
            .map_err(|e| self.refuse(&format!("admin:{admin}"), "rollback", e))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let admin = self.admin(&request, "revoke")?;
        let pb::RevokeRequest { plant_id, reason } = request.into_inner();
        admin_ops::revoke(&self.hub, &admin, &plant_id, &reason)
            .await
            .map(|()| Response::new(pb::RevokeResponse {}))
            .map_err(|e| self.refuse(&format!("admin:{admin}"), "revoke", e))
    }

    async fn release_plant_key(
        &self,
        request: Request<pb::ReleasePlantKeyRequest>,
    ) -> Result<Response<pb::ReleasePlantKeyResponse>, Status> {
        let admin = self.admin(&request, "release_plant_key")?;
        let pb::ReleasePlantKeyRequest { plant_id } = request.into_inner();
        admin_ops::release_key(&self.hub, &admin, &plant_id)
            .await
            .map(|()| Response::new(pb::ReleasePlantKeyResponse {}))
            .map_err(|e| self.refuse(&format!("admin:{admin}"), "release_plant_key", e))
    }

    async fn get_round(
        &self,
        request: Request<pb::GetRoundRequest>,
    ) -> Result<Response<pb::RoundDetail>, Status> {
        self.admin(&request, "get_round")?;
        let pb::GetRoundRequest { round } = request.into_inner();
        let report =
            admin_ops::round_report(&self.hub, round).map_err(|e| status::to_status(&e))?;
        Ok(Response::new(round_detail(&report, now_unix_ms())))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.admin(&request, "list_audit")?;
        let pb::ListAuditRequest {
            kind,
            plant_id,
            limit: n,
        } = request.into_inner();
        let filter =
            from_proto::audit_filter(&kind, &plant_id).map_err(|e| status::to_status(&e))?;
        let entries = self
            .hub
            .store
            .audit_matching(&filter, limit(n))
            .map_err(|e| status::to_status(&e.into()))?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries.iter().map(to_proto::audit_info).collect(),
        }))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let admin = self.admin(&request, "check")?;
        let report = admin_ops::check(&self.hub)
            .await
            .map_err(|e| status::to_status(&e))?;
        tracing::info!(admin = %admin, problems = report.problems.len(), "data directory checked");
        Ok(Response::new(to_proto::check_report(&report)))
    }

    type ExportModelStream = BoxStream<pb::Chunk>;

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let admin = self.admin(&request, "export_model")?;
        let actor = format!("admin:{admin}");
        let pb::ExportModelRequest { version, offset } = request.into_inner();
        let (record, path) = admin_ops::export_model(&self.hub, &admin, version)
            .map_err(|e| self.refuse(&actor, "export_model", e))?;
        if offset > record.size_bytes {
            let e = CoreError::Malformed(format!(
                "offset {offset} is beyond the {} bytes of version {version}",
                record.size_bytes
            ));
            return Err(self.refuse(&actor, "export_model", e));
        }
        let file = open_at(&path, offset)
            .await
            .map_err(|e| self.refuse(&actor, "export_model", e))?;
        let (tx, rx) = mpsc::channel(4);
        let span = tracing::info_span!("export", admin = %admin, version);
        let blob = Blob {
            size: record.size_bytes,
            sha256: record.blob_sha256,
        };
        tokio::spawn(send_blob(file, offset, blob, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn bundle_status(
        &self,
        request: Request<pb::BundleStatusRequest>,
    ) -> Result<Response<pb::BundleStatusResponse>, Status> {
        self.admin(&request, "bundle_status")?;
        let push = super::bundles::push(&self.hub)?;
        Ok(Response::new(super::admin_bundles::status(&push)))
    }

    async fn confirm_bundle(
        &self,
        request: Request<pb::ConfirmBundleRequest>,
    ) -> Result<Response<pb::BundleStatusResponse>, Status> {
        let admin = self.admin(&request, "bundle_confirm")?;
        let push = super::bundles::push(&self.hub)?;
        super::admin_bundles::confirm(&push, &self.hub, &admin, request.into_inner())
            .map(Response::new)
            .map_err(|e| self.refuse(&format!("admin:{admin}"), "bundle_confirm", e))
    }
}

fn round_detail(r: &RoundReport, now_unix_ms: i64) -> pb::RoundDetail {
    pb::RoundDetail {
        round: Some(to_proto::round_info(&r.round, now_unix_ms)),
        opened_unix_ms: r.round.opened_unix_ms,
        deadline_unix_ms: r.round.deadline_unix_ms,
        closed_unix_ms: r.round.closed_unix_ms.unwrap_or(0),
        published_unix_ms: r.published_unix_ms.unwrap_or(0),
        base_size_bytes: r.base_size_bytes,
        updates: r.updates.iter().map(update_info).collect(),
        bytes_received: r.round.bytes_received,
        bytes_sent: r.round.bytes_sent,
    }
}

fn update_info(u: &UpdateRecord) -> pb::UpdateInfo {
    pb::UpdateInfo {
        plant_id: u.plant_id.clone(),
        update_id: u.update_id.0.to_vec(),
        base_version: u.base_version,
        codec: u.codec.to_string(),
        num_samples: u.num_samples,
        payload_bytes: u.payload_bytes,
        delta_sha256: u.delta_sha256.0.to_vec(),
        plant_signature: u.plant_signature.clone(),
        metrics: u.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        l2_norm: u.l2_norm,
        clip_scale: u.clip_scale.unwrap_or(0.0),
        received_unix_ms: u.received_unix_ms,
    }
}

/// A stored blob's size and digest, as its record gives them.
struct Blob {
    size: u64,
    sha256: Digest,
}

async fn open_at(path: &Path, offset: u64) -> Result<tokio::fs::File, CoreError> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| {
        CoreError::Internal(format!("cannot open model blob {}: {e}", path.display()))
    })?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| CoreError::Internal(format!("cannot seek model blob: {e}")))?;
    Ok(file)
}

/// Streams `blob` from `offset` in chunks of at most [`CHUNK_BYTES`]; the last chunk carries
/// the SHA-256 of the whole file. An empty remainder is one empty last chunk.
async fn send_blob(
    mut file: tokio::fs::File,
    mut offset: u64,
    blob: Blob,
    tx: mpsc::Sender<Result<pb::Chunk, Status>>,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let want =
            usize::try_from((blob.size - offset).min(CHUNK_BYTES as u64)).unwrap_or(CHUNK_BYTES);
        if let Err(e) = file.read_exact(&mut buf[..want]).await {
            tracing::error!(error = %e, "cannot read model blob");
            let _ = tx
                .send(Err(Status::internal(
                    "cannot read the model file; check the coordinator's data_dir",
                )))
                .await;
            return;
        }
        let last = offset + want as u64 == blob.size;
        let chunk = pb::Chunk {
            offset,
            data: buf[..want].to_vec(),
            total_bytes: blob.size,
            sha256: if last {
                blob.sha256.0.to_vec()
            } else {
                Vec::new()
            },
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return; // the admin went away
        }
        offset += want as u64;
        if last {
            return;
        }
    }
}
