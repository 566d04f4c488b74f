//! The HTTP server for operators: Prometheus `/metrics` (OpenMetrics or the
//! Prometheus text format, as the scraper's `Accept` asks), liveness
//! `/healthz` and readiness `/readyz`.
//!
//! It starts before storage is recovered, so that a liveness (or startup)
//! probe sees the process alive during a long recovery while readiness says
//! 503 until the node serves gRPC, and again from the moment it begins to
//! stop. It stops last, after storage is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::tls::ServerTls;

/// Where the node is in its life, as readiness reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Opening storage and recovering queues.
    Starting = 0,
    /// Serving gRPC.
    Ready = 1,
    /// Shutting down: no new connections.
    Stopping = 2,
}

/// What the handlers share.
pub struct HttpState {
    registry: Registry,
    phase: AtomicU8,
}

impl HttpState {
    pub fn new(registry: Registry) -> Arc<HttpState> {
        Arc::new(HttpState { registry, phase: AtomicU8::new(Phase::Starting as u8) })
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Ready,
            2 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }
}

/// The routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new().route("/metrics", get(metrics_handler)).route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(state)
}

/// Serves until `shutdown` is cancelled; HTTPS when `tls` is set.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ServerTls>,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let accepted = Accepting { rx: crate::tls::accept_loop("http", listener, tls), local };
    axum::serve(accepted, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Connections whose TLS handshake (if any) is done, for axum.
struct Accepting {
    rx: tokio::sync::mpsc::Receiver<crate::tls::Accepted>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for Accepting {
    type Io = crate::tls::Stream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(a) => (a.stream, a.peer),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn metrics_handler(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let format = metrics::Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    // Encoding thousands of queues is CPU work: keep it off the I/O threads.
    let encoded = tokio::task::spawn_blocking(move || metrics::encode_as(&state.registry, format)).await;
    match encoded {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Ok(Err(_)) | Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    match state.phase() {
        Phase::Ready => (StatusCode::OK, "ready\n").into_response(),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "not ready: recovering storage\n").into_response(),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn fetch(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        fetch_with(addr, path, "").await
    }

    async fn fetch_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, out)
    }

    #[tokio::test]
    async fn should_report_liveness_readiness_and_metrics() {
        let state = HttpState::new(metrics::registry(metrics::BrokerCollector::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, None, state.clone(), stop.clone()));
        assert_eq!(fetch(addr, "/healthz").await.0, 200);
        assert_eq!(fetch(addr, "/readyz").await.0, 503);
        state.set_phase(Phase::Ready);
        assert_eq!(fetch(addr, "/readyz").await.0, 200);
        state.set_phase(Phase::Stopping);
        let (code, body) = fetch(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("shutting down"));
        let (code, body) = fetch_with(addr, "/metrics", "Accept: application/openmetrics-text; version=1.0.0\r\n").await;
        assert_eq!(code, 200);
        assert!(body.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{body}");
        assert!(body.contains("warren_alarm{resource=\"disk\"}"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let (code, body) = fetch(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("warren_alarm{resource=\"disk\"}"), "{body}");
        assert!(!body.contains("# EOF"), "{body}");
        assert_eq!(fetch(addr, "/nope").await.0, 404);
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
