//! The operator's HTTP endpoints: `/metrics` (Prometheus), `/healthz`
//! (the process runs and no watch has been failing for longer than its
//! limit: a stuck watch makes the kubelet restart the operator), `/readyz`
//! (the CRDs were found and the controllers started, or this replica is a
//! standby waiting for the lease).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::watch::Watches;

/// Shared state of the HTTP server.
pub struct Health {
    /// Metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once start-up checks passed.
    pub ready: AtomicBool,
    /// Health of the watches.
    pub watches: Arc<Watches>,
}

/// The router.
pub fn router(health: Arc<Health>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(health)
}

async fn healthz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    match h.watches.check() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(stuck) => (StatusCode::SERVICE_UNAVAILABLE, stuck),
    }
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

/// Binds `addr`; the unspecified IPv6 address (`[::]`, both IPv6 and IPv4
/// on Linux) falls back to `0.0.0.0` on a host without IPv6.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::warn!(%addr, error = %e, "cannot listen on IPv6; listening on {v4}");
            tokio::net::TcpListener::bind(v4).await
        }
        other => other,
    }
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let listener = bind(addr).await?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(health)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    async fn get(health: &Arc<Health>, path: &str) -> (StatusCode, String) {
        let response = router(health.clone()).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn should_serve_health_readiness_and_metrics() {
        let health = Arc::new(Health {
            metrics: Arc::new(Metrics::default()),
            ready: AtomicBool::new(false),
            watches: Watches::new(Duration::ZERO),
        });
        assert_eq!(get(&health, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::OK);
        drop(health.metrics.reconcile("queue"));
        let (status, body) = get(&health, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("warren_operator_reconciles_total{controller=\"queue\"} 1"), "{body}");
        health.watches.record("queues", Some(&kube::runtime::watcher::Error::NoResourceVersion));
        let (status, body) = get(&health, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "a stuck watch fails the liveness check");
        assert!(body.contains("queues watch"), "{body}");
    }
}
