//! The operator's HTTP endpoints: `/metrics` (Prometheus), `/healthz`
//! (the process runs), `/readyz` (the CRDs were found and the controllers
//! started, or this replica is a standby waiting for the lease).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared state of the HTTP server.
pub struct Health {
    /// Metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once start-up checks passed.
    pub ready: AtomicBool,
}

/// The router.
pub fn router(health: Arc<Health>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz)).with_state(health)
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    match h.metrics.encode() {
        Ok(body) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(health)).await
}
