//! The standard gRPC health service (`grpc.health.v1.Health`) on the coordinator's mTLS port:
//! the server as a whole (`""`) and each service (`fedinspect.v1.Federation`,
//! `fedinspect.v1.Admin`) report SERVING while the coordinator serves and NOT_SERVING once it
//! starts to stop, so a load balancer or probe stops sending plants to a draining coordinator.
//! Any certificate of the federation's CA may ask (the TLS layer checks it).

use std::future::Future;

use fedinspect_proto::v1::admin_server::AdminServer;
use fedinspect_proto::v1::federation_server::FederationServer;
use tonic::server::NamedService;
use tonic_health::server::{health_reporter, HealthReporter};
use tonic_health::ServingStatus;

use super::admin::AdminService;
use super::federation::FederationService;

/// The health service to add to the server, and `shutdown` extended to report NOT_SERVING
/// before the server drains.
pub async fn health(
    shutdown: impl Future<Output = ()>,
) -> (
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    impl Future<Output = ()>,
) {
    let (reporter, service) = health_reporter();
    set_all(&reporter, ServingStatus::Serving).await;
    let shutdown = async move {
        shutdown.await;
        set_all(&reporter, ServingStatus::NotServing).await;
    };
    (service, shutdown)
}

/// Sets the status of the server as a whole and of each service.
async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    let services = [
        "",
        FederationServer::<FederationService>::NAME,
        AdminServer::<AdminService>::NAME,
    ];
    for name in services {
        reporter.set_service_status(name, status).await;
    }
}
