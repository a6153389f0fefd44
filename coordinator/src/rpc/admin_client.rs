//! The client side of `coordinator admin`: an [`AdminSession`] connects with an admin
//! certificate over mutual TLS and returns typed views of the answers (status, plants, rounds,
//! models, one round's updates) that serialise to the JSON `--json` prints; [`render_text`]
//! prints them as `key: value` lines. `export-model` streams a version's safetensors file,
//! checks its SHA-256 and writes it atomically.

mod bundle_views;
mod views;

use std::path::{Path, PathBuf};

use fedinspect_common::fsutil;
use fedinspect_common::tls::{self, Role, TlsError, TlsFiles};
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use fedinspect_proto::CHUNK_BYTES;
use serde::Serialize;
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub use bundle_views::{BundleStatusView, PlantInstallView, RolloutView};
use views::{audit, check, model, plant, round, update};
pub use views::{
    AuditView, CheckView, ContributionView, ExportedModel, ModelView, PlantView, RoundDetailView,
    RoundView, StatusView, UpdateView,
};

/// Which audit entries `Audit` lists: `kind` and `plant` empty for all.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditQuery {
    pub kind: String,
    pub plant: String,
    pub limit: u32,
}

/// One admin action.
#[derive(Clone, Debug, PartialEq)]
pub enum AdminCommand {
    Status,
    Plants,
    Rounds {
        limit: u32,
    },
    Models {
        limit: u32,
    },
    Round {
        round: u64,
    },
    ExportModel {
        version: u64,
        out: PathBuf,
    },
    Promote {
        version: u64,
        force: bool,
    },
    Rollback {
        to: u64,
    },
    Revoke {
        plant: String,
        reason: String,
    },
    /// Release a plant's pinned update-signing key (after re-enrolling it).
    ReleaseKey {
        plant: String,
    },
    /// Audit log entries, newest first.
    Audit(AuditQuery),
    /// Check the data directory (blobs re-hashed, indexes cross-checked).
    Check,
    BundleStatus,
    BundleConfirm {
        version: u64,
        force: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("'{0}' is not a coordinator address; use https://HOST:PORT")]
    Address(String),
    #[error("cannot connect to the coordinator at {addr}: {reason}; check the address, that it runs, and that your certificate comes from its CA")]
    Connect { addr: String, reason: String },
    #[error("the coordinator refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the export of version {version} is corrupt ({reason}); export it again")]
    BadExport { version: u64, reason: String },
    #[error("cannot write {}: {source}; check the folder exists and is writable", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<tonic::Status> for AdminClientError {
    fn from(s: tonic::Status) -> Self {
        AdminClientError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// How long `coordinator admin` waits to connect (TCP and TLS handshake).
const ADMIN_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// HTTP/2 keepalive of `coordinator admin`: a ping this often, the connection closed when one
/// is not answered within as long again.
const ADMIN_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(20);

/// A connection to a coordinator's admin service.
pub struct AdminSession {
    client: AdminClient<Channel>,
}

impl AdminSession {
    /// Connects to `addr` (`https://host:port`) with the admin certificate in `files`.
    pub async fn connect(addr: &str, files: &TlsFiles) -> Result<Self, AdminClientError> {
        let pem = tls::tonic_pem(files, Role::Admin)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pem.ca_pem))
            .identity(Identity::from_pem(&pem.cert_pem, &pem.key_pem));
        let connect_err = |e: tonic::transport::Error| AdminClientError::Connect {
            addr: addr.to_string(),
            reason: error_chain(&e),
        };
        let endpoint = Channel::from_shared(addr.to_string())
            .map_err(|_| AdminClientError::Address(addr.to_string()))?
            .tls_config(tls)
            .map_err(connect_err)?
            .connect_timeout(ADMIN_CONNECT_TIMEOUT)
            // A coordinator that vanishes mid-command (a long export or check) is noticed.
            .http2_keep_alive_interval(ADMIN_KEEPALIVE)
            .keep_alive_timeout(ADMIN_KEEPALIVE);
        // tonic's connect timeout covers TCP only; this one covers the TLS handshake too.
        let channel = tokio::time::timeout(ADMIN_CONNECT_TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| AdminClientError::Connect {
                addr: addr.to_string(),
                reason: format!(
                    "no TLS connection within {} s",
                    ADMIN_CONNECT_TIMEOUT.as_secs()
                ),
            })?
            .map_err(connect_err)?;
        Ok(Self {
            client: AdminClient::new(channel),
        })
    }

    pub async fn status(&mut self) -> Result<StatusView, AdminClientError> {
        let s = self.client.status(pb::StatusRequest {}).await?.into_inner();
        Ok(StatusView {
            protocol_version: s.protocol_version,
            current_round: s.current_round,
            round_state: s.round_state,
            latest_version: s.latest_version,
            promoted_version: s.promoted_version,
            plants_registered: s.plants_registered,
            plants_connected: s.plants_connected,
            holding: s.holding,
        })
    }

    pub async fn plants(&mut self) -> Result<Vec<PlantView>, AdminClientError> {
        let r = self.client.list_plants(pb::ListPlantsRequest {}).await?;
        Ok(r.into_inner().plants.iter().map(plant).collect())
    }

    /// Up to `limit` rounds (0: the coordinator's default), newest first.
    pub async fn rounds(&mut self, limit: u32) -> Result<Vec<RoundView>, AdminClientError> {
        let r = self
            .client
            .list_rounds(pb::ListRoundsRequest { limit })
            .await?;
        Ok(r.into_inner().rounds.iter().map(round).collect())
    }

    /// Up to `limit` versions (0: the coordinator's default, 50), newest first, asked for page
    /// by page when they do not fit in one message.
    pub async fn models(&mut self, limit: u32) -> Result<Vec<ModelView>, AdminClientError> {
        let want = if limit == 0 { 50 } else { limit };
        let mut out: Vec<ModelView> = Vec::new();
        let mut below_version = 0;
        loop {
            let left = want - u32::try_from(out.len()).unwrap_or(want);
            let page = self
                .client
                .list_models(pb::ListModelsRequest {
                    limit: left,
                    version: 0,
                    below_version,
                })
                .await?
                .into_inner();
            out.extend(page.models.iter().map(model));
            if page.next_below_version == 0 || page.models.is_empty() || out.len() >= want as usize
            {
                return Ok(out);
            }
            below_version = page.next_below_version;
        }
    }

    /// Version `version` alone.
    pub async fn model(&mut self, version: u64) -> Result<ModelView, AdminClientError> {
        let page = self
            .client
            .list_models(pb::ListModelsRequest {
                limit: 1,
                version,
                below_version: 0,
            })
            .await?
            .into_inner();
        page.models
            .first()
            .map(model)
            .ok_or_else(|| AdminClientError::Refused {
                code: tonic::Code::NotFound,
                message: format!("the coordinator listed no version {version}"),
            })
    }

    /// Round `round` with its accepted updates.
    pub async fn round(&mut self, round: u64) -> Result<RoundDetailView, AdminClientError> {
        let d = self
            .client
            .get_round(pb::GetRoundRequest { round })
            .await?
            .into_inner();
        let info = d.round.ok_or_else(|| AdminClientError::Refused {
            code: tonic::Code::Internal,
            message: "the round detail carries no round".into(),
        })?;
        Ok(RoundDetailView {
            round: self::round(&info),
            opened_unix_ms: d.opened_unix_ms,
            deadline_unix_ms: d.deadline_unix_ms,
            closed_unix_ms: d.closed_unix_ms,
            published_unix_ms: d.published_unix_ms,
            base_size_bytes: d.base_size_bytes,
            updates: d.updates.iter().map(update).collect(),
            bytes_received: d.bytes_received,
            bytes_sent: d.bytes_sent,
        })
    }

    /// The safetensors bytes of `version`, their offsets, sizes and SHA-256 checked.
    pub async fn export_model_bytes(&mut self, version: u64) -> Result<Vec<u8>, AdminClientError> {
        let mut stream = self
            .client
            .export_model(pb::ExportModelRequest { version, offset: 0 })
            .await?
            .into_inner();
        let bad = |reason: String| AdminClientError::BadExport { version, reason };
        let mut bytes = Vec::new();
        let mut total = None;
        let mut digest = Vec::new();
        while let Some(c) = stream.message().await? {
            let pb::Chunk {
                offset,
                data,
                total_bytes,
                sha256,
            } = c;
            if offset != bytes.len() as u64 {
                return Err(bad(format!(
                    "a chunk starts at byte {offset} after {} bytes",
                    bytes.len()
                )));
            }
            if data.len() > CHUNK_BYTES {
                return Err(bad(format!("a chunk of {} bytes", data.len())));
            }
            if *total.get_or_insert(total_bytes) != total_bytes {
                return Err(bad("the announced size changed".into()));
            }
            bytes.extend_from_slice(&data);
            digest = sha256;
        }
        if Some(bytes.len() as u64) != total {
            return Err(bad(format!(
                "{} bytes arrived of {} announced",
                bytes.len(),
                total.unwrap_or(0)
            )));
        }
        let found = ring::digest::digest(&ring::digest::SHA256, &bytes);
        if found.as_ref() != digest.as_slice() {
            return Err(bad(format!(
                "SHA-256 {} but the coordinator sent {}",
                hex::encode(found.as_ref()),
                hex::encode(&digest)
            )));
        }
        Ok(bytes)
    }

    /// Exports `version` into the file `out` (written atomically, never half a file).
    pub async fn export_model(
        &mut self,
        version: u64,
        out: &Path,
    ) -> Result<ExportedModel, AdminClientError> {
        let bytes = self.export_model_bytes(version).await?;
        fsutil::write_bytes_atomic(out, &bytes).map_err(|source| AdminClientError::Write {
            path: out.to_path_buf(),
            source,
        })?;
        Ok(ExportedModel {
            version,
            path: out.to_path_buf(),
            bytes: bytes.len() as u64,
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes)),
        })
    }

    /// The bundle push in force.
    pub async fn bundle_status(&mut self) -> Result<BundleStatusView, AdminClientError> {
        let r = self
            .client
            .bundle_status(pb::BundleStatusRequest {})
            .await?;
        Ok(bundle_views::bundle_status(r.into_inner()))
    }

    /// Sends the bundle of `version` to every plant.
    pub async fn bundle_confirm(
        &mut self,
        version: u64,
        force: bool,
    ) -> Result<BundleStatusView, AdminClientError> {
        let r = self
            .client
            .confirm_bundle(pb::ConfirmBundleRequest { version, force })
            .await?;
        Ok(bundle_views::bundle_status(r.into_inner()))
    }

    /// Up to `limit` audit entries (0: the coordinator's default), newest first, of `kind`
    /// and about `plant` when those are not empty.
    pub async fn audit(
        &mut self,
        kind: &str,
        plant: &str,
        limit: u32,
    ) -> Result<Vec<AuditView>, AdminClientError> {
        let r = self
            .client
            .list_audit(pb::ListAuditRequest {
                kind: kind.to_string(),
                plant_id: plant.to_string(),
                limit,
            })
            .await?;
        Ok(r.into_inner().entries.iter().map(audit).collect())
    }

    /// Checks the coordinator's data directory.
    pub async fn check(&mut self) -> Result<CheckView, AdminClientError> {
        let r = self.client.check(pb::CheckRequest {}).await?;
        Ok(check(&r.into_inner()))
    }

    /// Runs `cmd` and returns its answer as the JSON `--json` prints.
    pub async fn run(&mut self, cmd: AdminCommand) -> Result<Value, AdminClientError> {
        fn json<T: Serialize>(v: T) -> Value {
            serde_json::to_value(v).expect("admin views serialise to JSON")
        }
        Ok(match cmd {
            AdminCommand::Status => json(self.status().await?),
            AdminCommand::Audit(q) => json(self.audit(&q.kind, &q.plant, q.limit).await?),
            AdminCommand::Check => json(self.check().await?),
            AdminCommand::Plants => json(self.plants().await?),
            AdminCommand::Rounds { limit } => json(self.rounds(limit).await?),
            AdminCommand::Models { limit } => json(self.models(limit).await?),
            AdminCommand::Round { round } => json(self.round(round).await?),
            AdminCommand::ExportModel { version, out } => {
                json(self.export_model(version, &out).await?)
            }
            AdminCommand::Promote { version, force } => json(model(
                &self
                    .client
                    .promote(pb::PromoteRequest { version, force })
                    .await?
                    .into_inner(),
            )),
            AdminCommand::Rollback { to } => json(model(
                &self
                    .client
                    .rollback(pb::RollbackRequest { to_version: to })
                    .await?
                    .into_inner(),
            )),
            AdminCommand::Revoke { plant, reason } => {
                self.client
                    .revoke(pb::RevokeRequest {
                        plant_id: plant.clone(),
                        reason,
                    })
                    .await?;
                serde_json::json!({ "revoked": plant })
            }
            AdminCommand::ReleaseKey { plant } => {
                self.client
                    .release_plant_key(pb::ReleasePlantKeyRequest {
                        plant_id: plant.clone(),
                    })
                    .await?;
                serde_json::json!({ "key_released": plant })
            }
            AdminCommand::BundleStatus => json(self.bundle_status().await?),
            AdminCommand::BundleConfirm { version, force } => {
                json(self.bundle_confirm(version, force).await?)
            }
        })
    }
}

/// Connects to `addr` and runs `cmd` (one connection per command).
pub async fn run(
    addr: &str,
    files: &TlsFiles,
    cmd: AdminCommand,
) -> Result<Value, AdminClientError> {
    AdminSession::connect(addr, files).await?.run(cmd).await
}

/// Human-readable lines: an object as `key: value`, a list as one block per item.
pub fn render_text(v: &Value) -> String {
    match v {
        Value::Array(items) if items.is_empty() => "(none)\n".to_string(),
        Value::Array(items) => items.iter().map(render_text).collect::<Vec<_>>().join("\n"),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}: {s}\n"),
                other => format!("{k}: {other}\n"),
            })
            .collect(),
        other => format!("{other}\n"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
