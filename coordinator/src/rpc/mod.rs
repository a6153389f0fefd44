//! The gRPC edge: the plant-facing `Federation` and operator-facing `Admin` services on one
//! mutual-TLS port, and the admin command-line client. Only the modules under `rpc` know
//! protobuf types; they convert at the edge (`from_proto`, `to_proto`) and map errors to gRPC
//! codes in one place (`status`).

pub mod admin;
mod admin_bundles;
pub mod admin_client;
mod auth;
mod bundles;
pub mod federation;
mod from_proto;
mod health;
mod status;
mod to_proto;

use std::future::Future;
use std::sync::Arc;

use fedinspect_proto::v1::admin_server::AdminServer;
use fedinspect_proto::v1::federation_server::FederationServer;
use fedinspect_proto::MAX_MESSAGE_BYTES;
use tonic::transport::Server;

use crate::hub::Hub;

/// Serves both services on connections whose TLS handshake the coordinator's own acceptor
/// finished (`node::accept`, which audits refused client certificates), until `shutdown`
/// completes. A connection that does not answer an HTTP/2 ping within `idle` (pinged every
/// `idle / 2`, closed `idle / 2` later) is closed, so a stalled or vanished plant cannot hold
/// an upload open: its handler sees the stream fail.
pub async fn serve_accepted<I, IO>(
    hub: Arc<Hub>,
    incoming: I,
    idle: std::time::Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = Result<IO, std::io::Error>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    let federation = FederationServer::new(federation::FederationService::new(hub.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServer::new(admin::AdminService::new(hub))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (health, shutdown) = health::health(shutdown).await;
    Server::builder()
        .http2_keepalive_interval(Some(idle / 2))
        .http2_keepalive_timeout(Some(idle / 2))
        .add_service(health)
        .add_service(federation)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
