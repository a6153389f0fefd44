//! The client side of `coordinator admin`: connects with an admin certificate over mutual TLS,
//! runs one [`AdminCommand`] and returns its result as JSON (printed as is with `--json`, or
//! as `key: value` lines by [`render_text`]).

use fedinspect_common::tls::{self, Role, TlsError, TlsFiles};
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// One admin action.
#[derive(Clone, Debug, PartialEq)]
pub enum AdminCommand {
    Status,
    Plants,
    Rounds { limit: u32 },
    Models { limit: u32 },
    Promote { version: u64, force: bool },
    Rollback { to: u64 },
    Revoke { plant: String, reason: String },
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
}

impl From<tonic::Status> for AdminClientError {
    fn from(s: tonic::Status) -> Self {
        AdminClientError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Connects to `addr` (`https://host:port`) with the admin certificate in `files`.
pub async fn connect(
    addr: &str,
    files: &TlsFiles,
) -> Result<AdminClient<Channel>, AdminClientError> {
    let pem = tls::tonic_pem(files, Role::Admin)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pem.ca_pem))
        .identity(Identity::from_pem(&pem.cert_pem, &pem.key_pem));
    let connect_err = |e: tonic::transport::Error| AdminClientError::Connect {
        addr: addr.to_string(),
        reason: error_chain(&e),
    };
    let channel = Channel::from_shared(addr.to_string())
        .map_err(|_| AdminClientError::Address(addr.to_string()))?
        .tls_config(tls)
        .map_err(connect_err)?
        .connect()
        .await
        .map_err(connect_err)?;
    Ok(AdminClient::new(channel))
}

/// Runs `cmd` against the coordinator at `addr`.
pub async fn run(
    addr: &str,
    files: &TlsFiles,
    cmd: AdminCommand,
) -> Result<Value, AdminClientError> {
    let mut client = connect(addr, files).await?;
    Ok(match cmd {
        AdminCommand::Status => {
            let s = client.status(pb::StatusRequest {}).await?.into_inner();
            json!({
                "protocol_version": s.protocol_version,
                "current_round": s.current_round,
                "round_state": s.round_state,
                "latest_version": s.latest_version,
                "promoted_version": s.promoted_version,
                "plants_registered": s.plants_registered,
                "plants_connected": s.plants_connected,
            })
        }
        AdminCommand::Plants => {
            let r = client
                .list_plants(pb::ListPlantsRequest {})
                .await?
                .into_inner();
            Value::Array(r.plants.iter().map(plant).collect())
        }
        AdminCommand::Rounds { limit } => {
            let r = client
                .list_rounds(pb::ListRoundsRequest { limit })
                .await?
                .into_inner();
            Value::Array(r.rounds.iter().map(round).collect())
        }
        AdminCommand::Models { limit } => {
            let r = client
                .list_models(pb::ListModelsRequest { limit })
                .await?
                .into_inner();
            Value::Array(r.models.iter().map(model).collect())
        }
        AdminCommand::Promote { version, force } => model(
            &client
                .promote(pb::PromoteRequest { version, force })
                .await?
                .into_inner(),
        ),
        AdminCommand::Rollback { to } => model(
            &client
                .rollback(pb::RollbackRequest { to_version: to })
                .await?
                .into_inner(),
        ),
        AdminCommand::Revoke { plant, reason } => {
            client
                .revoke(pb::RevokeRequest {
                    plant_id: plant.clone(),
                    reason,
                })
                .await?;
            json!({ "revoked": plant })
        }
    })
}

fn plant(p: &pb::PlantInfo) -> Value {
    json!({
        "plant_id": p.plant_id,
        "device": p.device,
        "num_samples": p.num_samples,
        "connected": p.connected,
        "revoked": p.revoked,
        "last_seen_unix_ms": p.last_seen_unix_ms,
    })
}

fn round(r: &pb::RoundInfo) -> Value {
    json!({
        "round": r.round,
        "state": r.state,
        "base_version": r.base_version,
        "published_version": r.published_version,
        "participants": r.participants,
        "failure": r.failure,
        "seconds": r.seconds,
    })
}

fn model(m: &pb::ModelInfo) -> Value {
    let metrics: serde_json::Map<String, Value> = m
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "version": m.version,
        "parent": m.parent,
        "round": m.round,
        "content_hash": hex::encode(&m.content_hash),
        "signature": hex::encode(&m.signature),
        "status": m.status,
        "created_unix_ms": m.created_unix_ms,
        "metrics": metrics,
        "contributions": m.contributions.iter().map(|c| json!({
            "plant_id": c.plant_id,
            "num_samples": c.num_samples,
            "delta_sha256": hex::encode(&c.delta_sha256),
        })).collect::<Vec<_>>(),
    })
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
