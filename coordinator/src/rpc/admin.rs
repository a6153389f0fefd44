//! The operator-facing `Admin` service: only admin certificates get in; the work is in
//! `admin_ops`.

use std::sync::Arc;

use fedinspect_common::tls::Role;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::{auth, status, to_proto};
use crate::admin_ops;
use crate::error::CoreError;
use crate::hub::Hub;
use crate::records::now_unix_ms;

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
        let pb::ListModelsRequest { limit: n } = request.into_inner();
        let models = self
            .hub
            .store
            .models(limit(n))
            .map_err(|e| status::to_status(&e.into()))?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(to_proto::model_info).collect(),
        }))
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
}
