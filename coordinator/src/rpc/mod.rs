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

use fedinspect_common::tls::TonicPem;
use fedinspect_proto::v1::admin_server::AdminServer;
use fedinspect_proto::v1::federation_server::FederationServer;
use fedinspect_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::hub::Hub;

/// A server TLS config that requires a client certificate issued by the CA.
pub fn server_tls(pem: &TonicPem) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(Identity::from_pem(&pem.cert_pem, &pem.key_pem))
        .client_ca_root(Certificate::from_pem(&pem.ca_pem))
        .client_auth_optional(false)
}

/// Serves both services on `listener` until `shutdown` completes, then drains connections.
pub async fn serve(
    hub: Arc<Hub>,
    tls: ServerTlsConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let federation = FederationServer::new(federation::FederationService::new(hub.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServer::new(admin::AdminService::new(hub))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (health, shutdown) = health::health(shutdown).await;
    Server::builder()
        .tls_config(tls)?
        .add_service(health)
        .add_service(federation)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
