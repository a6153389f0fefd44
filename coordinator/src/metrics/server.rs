//! The metrics endpoint: plain HTTP (no TLS: bind it to a management address) serving
//! `GET /metrics` in Prometheus' text format, stopped with the coordinator. A connection that
//! sends nothing for [`idle_io::IDLE_TIMEOUT`] is closed ([`idle_io`]).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::exposition::CONTENT_TYPE;
use super::idle_io::{self, IdleTimeoutListener};
use super::scrape;
use crate::hub::Hub;

/// Serves `/metrics` of `hub` on `listener` until `shutdown` completes.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(hub);
    axum::serve(
        IdleTimeoutListener::new(listener, idle_io::IDLE_TIMEOUT),
        app,
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    let text = tokio::task::spawn_blocking(move || scrape::render(&hub)).await;
    match text {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot render metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the coordinator's state: {e}\n"),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the metrics task failed: {e}\n"),
        )
            .into_response(),
    }
}
