//! The agent's gRPC edge: one mutual-TLS connection to the coordinator and the calls a
//! plant makes on it (bundle downloads and install reports in `bundle`). Only this module and
//! its `bundle`, `from_proto` and `to_proto` children know protobuf; every message becomes a
//! domain type (or an [`RpcError`]) here. Every wait on the coordinator is bounded
//! ([`Bounds`]): connecting (TCP and the TLS handshake), each unary call, each message of a
//! download, the acknowledgement after an upload's last byte; the connection's HTTP/2
//! keepalive notices a silent network on the long-lived task stream.

mod bundle;
mod from_proto;
mod to_proto;

use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::tls::TonicPem;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::federation_client::FederationClient;
use fedinspect_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Status, Streaming};

pub use bundle::DownloadError;

use super::types::{Capabilities, Registration, Task, UpdateHeader, UploadAck, UploadStatus};
use crate::config::CoordinatorConfig;

/// Largest model download accepted (the default detector is about 3.5 MB).
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to the coordinator at {address}: {source}; check the address, the network and that the coordinator runs")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{call} failed ({code:?}): {message}")]
    Status {
        call: &'static str,
        code: Code,
        message: String,
    },
    #[error("the coordinator sent a malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} got no answer from the coordinator within {} s ([agent] {key}); the agent reconnects and retries", after.as_secs_f64())]
    TimedOut {
        what: &'static str,
        after: Duration,
        /// The plant.toml key that sets the bound.
        key: &'static str,
    },
}

/// How long the agent waits on the coordinator; plant.toml `[agent]` sets them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    /// TCP connect and the TLS handshake together (`connect_timeout_secs`).
    pub connect: Duration,
    /// A unary call's answer, and the acknowledgement after an upload's last byte
    /// (`call_timeout_secs`).
    pub call: Duration,
    /// The gap between two chunks of a download (`stream_idle_timeout_secs`).
    pub stream_idle: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            call: Duration::from_secs(60),
            stream_idle: Duration::from_secs(60),
        }
    }
}

/// Awaits `fut` for at most `after`; past it, [`RpcError::TimedOut`].
async fn bounded<T>(
    what: &'static str,
    after: Duration,
    key: &'static str,
    fut: impl std::future::Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(RpcError::TimedOut { what, after, key }))
}

impl RpcError {
    fn status(call: &'static str, s: Status) -> Self {
        RpcError::Status {
            call,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// The gRPC code of a refusal; `None` for connection and protocol failures.
    pub fn code(&self) -> Option<Code> {
        match self {
            RpcError::Status { code, .. } => Some(*code),
            RpcError::Connect { .. } | RpcError::Malformed { .. } | RpcError::TimedOut { .. } => {
                None
            }
        }
    }

    /// Whether the same request may succeed over a new connection: the network or the
    /// coordinator failed, rather than the coordinator refusing the request.
    pub fn is_transient(&self) -> bool {
        match self {
            RpcError::Connect { .. } | RpcError::Malformed { .. } | RpcError::TimedOut { .. } => {
                true
            }
            RpcError::Status { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::DataLoss
                    | Code::Internal
                    | Code::ResourceExhausted
            ),
        }
    }
}

/// An open connection to the coordinator.
pub struct Connection {
    client: FederationClient<Channel>,
    bounds: Bounds,
}

/// The coordinator's task stream.
pub struct TaskStream(Streaming<pb::Task>);

/// Connects over mutual TLS with the plant's certificate, trusting only the configured CA,
/// with the default [`Bounds`].
pub async fn connect(cfg: &CoordinatorConfig, pem: &TonicPem) -> Result<Connection, RpcError> {
    connect_with(cfg, pem, Bounds::default()).await
}

/// [`connect`] with `bounds` on every wait.
pub async fn connect_with(
    cfg: &CoordinatorConfig,
    pem: &TonicPem,
    bounds: Bounds,
) -> Result<Connection, RpcError> {
    let fail = |source| RpcError::Connect {
        address: cfg.address.clone(),
        source,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pem.ca_pem))
        .identity(Identity::from_pem(&pem.cert_pem, &pem.key_pem));
    if let Some(name) = &cfg.server_name {
        tls = tls.domain_name(name.clone());
    }
    let channel = Channel::from_shared(cfg.address.clone())
        .map_err(|e| RpcError::Malformed {
            what: "address",
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(fail)?
        // tonic bounds only the TCP connect with this; the TLS handshake is bounded below.
        .connect_timeout(bounds.connect)
        // A silent network on the long-lived task stream is noticed within a minute.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = bounded(
        "connecting (TCP and TLS handshake)",
        bounds.connect,
        "connect_timeout_secs",
        async { channel.connect().await.map_err(fail) },
    )
    .await?;
    let client = FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Connection { client, bounds })
}

impl Connection {
    pub async fn register(
        &mut self,
        caps: &Capabilities,
        plant_key: &VerifyingKey,
    ) -> Result<Registration, RpcError> {
        let req = to_proto::register(caps, plant_key);
        let client = &mut self.client;
        let resp = self
            .bounds
            .call("Register", async {
                client
                    .register(req)
                    .await
                    .map_err(|s| RpcError::status("Register", s))
            })
            .await?;
        from_proto::registration(resp.into_inner())
    }

    pub async fn tasks(&mut self) -> Result<TaskStream, RpcError> {
        let req = pb::TasksRequest {
            protocol_version: PROTOCOL_VERSION,
        };
        let client = &mut self.client;
        let stream = self
            .bounds
            .call("Tasks", async {
                client
                    .tasks(req)
                    .await
                    .map_err(|s| RpcError::status("Tasks", s))
            })
            .await?;
        Ok(TaskStream(stream.into_inner()))
    }

    /// Downloads model `version` (0: the latest), checking that the chunks are contiguous,
    /// at most 1 MiB, agree on the total, and that the bytes match the final SHA-256.
    pub async fn download(&mut self, version: u64) -> Result<Vec<u8>, RpcError> {
        const CALL: &str = "DownloadModel";
        let req = pb::DownloadModelRequest {
            protocol_version: PROTOCOL_VERSION,
            version,
            offset: 0,
        };
        let client = &mut self.client;
        let mut stream = self
            .bounds
            .call(CALL, async {
                client
                    .download_model(req)
                    .await
                    .map_err(|s| RpcError::status(CALL, s))
            })
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        let mut digest = Vec::new();
        let mut total = None;
        while let Some(chunk) = self.bounds.next_chunk(CALL, &mut stream).await? {
            let chunk = from_proto::chunk(chunk, bytes.len() as u64, &mut total)?;
            bytes.extend_from_slice(&chunk.data);
            digest = chunk.sha256;
        }
        from_proto::stream_end(bytes.len() as u64, total, &sha256(&bytes), &digest).map_err(
            |reason| RpcError::Malformed {
                what: "model download",
                reason,
            },
        )?;
        Ok(bytes)
    }

    /// Sends `header`, then `payload` from byte `from` on (a resume: the bytes before it are
    /// durable at the coordinator) in chunks of at most 1 MiB.
    pub async fn upload(
        &mut self,
        header: &UpdateHeader,
        payload: Arc<[u8]>,
        from: u64,
    ) -> Result<UploadAck, RpcError> {
        let to = payload.len() as u64;
        self.upload_range(header, payload, from, to).await
    }

    /// [`Connection::upload`] whose stream ends after byte `to` (a cut-off upload, for the
    /// fault injection of tests).
    pub async fn upload_range(
        &mut self,
        header: &UpdateHeader,
        payload: Arc<[u8]>,
        from: u64,
        to: u64,
    ) -> Result<UploadAck, RpcError> {
        let total = payload.len() as u64;
        let end = usize::try_from(to.min(total)).unwrap_or(payload.len());
        let from = usize::try_from(from.min(total))
            .unwrap_or(payload.len())
            .min(end);
        let chunks = (end - from).div_ceil(CHUNK_BYTES);
        let first = pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Header(
                to_proto::update_header(header, from as u64),
            )),
        };
        let rest = (0..chunks).map(move |i| {
            let start = from + i * CHUNK_BYTES;
            let end = (start + CHUNK_BYTES).min(end);
            pb::UploadUpdateRequest {
                part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
                    offset: start as u64,
                    data: payload[start..end].to_vec(),
                    total_bytes: total,
                    sha256: Vec::new(),
                })),
            }
        });
        // Signals when tonic took the last part: from then on only the acknowledgement is
        // awaited, and that is bounded; before, the HTTP/2 keepalive and the coordinator's
        // own idle limit bound the stream.
        let (sent_all, all_sent) = tokio::sync::oneshot::channel::<()>();
        let mut sent_all = Some(sent_all);
        let end = std::iter::from_fn(move || {
            if let Some(tx) = sent_all.take() {
                let _ = tx.send(());
            }
            None
        });
        let parts = tokio_stream::iter(std::iter::once(first).chain(rest).chain(end));
        let call = self.client.upload_update(parts);
        let ack_wait = self.bounds.call;
        let ack_timeout = async {
            if all_sent.await.is_ok() {
                tokio::time::sleep(ack_wait).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let resp = tokio::select! {
            r = call => r.map_err(|s| RpcError::status("UploadUpdate", s))?,
            () = ack_timeout => return Err(RpcError::TimedOut {
                what: "UploadUpdate's acknowledgement after the last byte",
                after: ack_wait,
                key: "call_timeout_secs",
            }),
        };
        from_proto::upload_ack(resp.into_inner(), &header.update_id)
    }

    /// How much of update `id` the coordinator holds: accepted, or a durable prefix.
    pub async fn upload_status(&mut self, id: &[u8; 16]) -> Result<UploadStatus, RpcError> {
        let req = pb::UploadStatusRequest {
            protocol_version: PROTOCOL_VERSION,
            update_id: id.to_vec(),
        };
        let client = &mut self.client;
        let pb::UploadStatusResponse {
            durable_bytes,
            accepted,
        } = self
            .bounds
            .call("UploadStatus", async {
                client
                    .upload_status(req)
                    .await
                    .map_err(|s| RpcError::status("UploadStatus", s))
            })
            .await?
            .into_inner();
        Ok(UploadStatus {
            durable_bytes,
            accepted,
        })
    }
}

impl Bounds {
    /// A unary call, or the start of a streaming one, within [`Bounds::call`].
    pub(crate) async fn call<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, RpcError>>,
    ) -> Result<T, RpcError> {
        bounded(what, self.call, "call_timeout_secs", fut).await
    }

    /// The next message of a download stream within [`Bounds::stream_idle`]; `None` when the
    /// coordinator ended the stream.
    pub(crate) async fn next_chunk<T>(
        &self,
        what: &'static str,
        stream: &mut tonic::Streaming<T>,
    ) -> Result<Option<T>, RpcError> {
        bounded(what, self.stream_idle, "stream_idle_timeout_secs", async {
            stream
                .message()
                .await
                .map_err(|s| RpcError::status(what, s))
        })
        .await
    }
}

impl TaskStream {
    /// The next task; `None` when the coordinator ended the stream.
    pub async fn next(&mut self) -> Result<Option<Task>, RpcError> {
        match self.0.message().await {
            Ok(Some(task)) => from_proto::task(task).map(Some),
            Ok(None) => Ok(None),
            Err(s) => Err(RpcError::status("Tasks", s)),
        }
    }
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}
