//! The node-to-node gRPC service: answers heartbeats and dispatches calls
//! and streams to the handlers the layers above registered.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::proto::cluster_server::{Cluster as ClusterRpc, ClusterServer};
use super::proto::{CallReply, CallRequest, HeartbeatReply, HeartbeatRequest, StreamFrame};
use super::{CallError, Cluster, ClusterSecret, Duplex, NodeId, SECRET_HEADER, STREAM_BUFFER};

struct Service {
    cluster: Cluster,
}

impl Service {
    fn check_to(&self, from: NodeId, to: NodeId) -> Result<(), Status> {
        let me = self.cluster.node_id();
        if to != me {
            return Err(Status::failed_precondition(format!("this is node {me}, not node {to}: check the peers setting")));
        }
        if !self.cluster.config().peers.contains_key(&from) {
            return Err(Status::permission_denied(format!("node {from} {}", super::NOT_A_MEMBER)));
        }
        Ok(())
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<StreamFrame, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ClusterRpc for Service {
    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let req = request.into_inner();
        self.check_to(req.from, req.to)?;
        Ok(Response::new(HeartbeatReply { node: self.cluster.node_id(), incarnation: self.cluster.shared.incarnation }))
    }

    async fn call(&self, request: Request<CallRequest>) -> Result<Response<CallReply>, Status> {
        let req = request.into_inner();
        self.check_to(req.from, req.to)?;
        let handler =
            self.cluster.call_handler(&req.kind).ok_or_else(|| Status::unimplemented(format!("no handler for '{}'", req.kind)))?;
        match handler(req.from, req.body).await {
            Ok(body) => Ok(Response::new(CallReply { body })),
            Err(e) => Err(Status::aborted(e)),
        }
    }

    type StreamStream = FrameStream;

    async fn stream(&self, request: Request<Streaming<StreamFrame>>) -> Result<Response<Self::StreamStream>, Status> {
        let mut incoming = request.into_inner();
        let first = match tokio::time::timeout(Duration::from_secs(10), incoming.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) => return Err(Status::invalid_argument("empty stream")),
            Err(_) => return Err(Status::deadline_exceeded("no first frame")),
        };
        self.check_to(first.from, first.to)?;
        let handler =
            self.cluster.stream_handler(&first.kind).ok_or_else(|| Status::unimplemented(format!("no handler for '{}'", first.kind)))?;
        let from = first.from;
        let (in_tx, in_rx) = mpsc::channel(STREAM_BUFFER);
        let (out_tx, out_rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = incoming.next() => item,
                    _ = in_tx.closed() => return,
                };
                let msg = match item {
                    None => return,
                    Some(Ok(frame)) => Ok(frame.data),
                    Some(Err(status)) => Err(CallError::Unreachable { node: from, detail: status.message().to_string() }),
                };
                let stop = msg.is_err();
                if in_tx.send(msg).await.is_err() || stop {
                    return;
                }
            }
        });
        tokio::spawn(handler(from, Duplex { tx: out_tx, rx: in_rx }));
        // Streams end when the node stops, so that stopping never waits for
        // a long-lived stream.
        let stop = self.cluster.shared.stop.clone().cancelled_owned();
        let out = tokio_stream::wrappers::ReceiverStream::new(out_rx)
            .map(|data| Ok(StreamFrame { data, ..StreamFrame::default() }))
            .take_until(stop);
        Ok(Response::new(Box::pin(out)))
    }
}

/// When a refused call was last logged (seconds since the Unix epoch): a
/// misconfigured node retries several times a second, one line per ten
/// seconds is enough.
static LAST_REFUSAL_LOG: AtomicU64 = AtomicU64::new(0);

/// Refuses a call that does not carry the cluster secret.
fn check_secret(secret: &Option<ClusterSecret>, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(secret) = secret else { return Ok(req) };
    let presented = req.metadata().get(SECRET_HEADER);
    if presented.is_some_and(|v| secret.matches(v.as_bytes())) {
        return Ok(req);
    }
    crate::auth::metrics::global().cluster_refused();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST_REFUSAL_LOG.load(Ordering::Relaxed);
    if now >= last.saturating_add(10) && LAST_REFUSAL_LOG.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        let from = req.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let what = if presented.is_some() { "a wrong cluster secret" } else { "no cluster secret" };
        tracing::warn!(target: "warren::audit", %from, "node-to-node call refused: it carries {what} (check that every node has the same cluster secret)");
    }
    Err(Status::unauthenticated("node-to-node calls must carry this cluster's secret"))
}

/// Serves the cluster service on `listener` until `stop`: through a TLS
/// handshake that requires a certificate the cluster CA signed when mutual
/// TLS is configured, then the secret check on every call when a secret is.
pub(super) async fn serve(cluster: Cluster, listener: TcpListener, stop: CancellationToken) {
    let max = cluster.config().max_message_bytes;
    let max_calls = cluster.config().max_inflight_calls + cluster.config().max_streams;
    let tls = cluster.config().tls.clone();
    let secret = cluster.config().secret.clone();
    let service = ClusterServer::new(Service { cluster }).max_decoding_message_size(max).max_encoding_message_size(max);
    let service = tonic::service::interceptor::InterceptedService::new(service, move |req| check_secret(&secret, req));
    let accepted = crate::tls::accept_loop("cluster", listener, tls);
    let incoming = tokio_stream::wrappers::ReceiverStream::new(accepted).map(|a| Ok::<_, std::io::Error>(a.stream));
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(max_calls)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "cluster listener failed");
    }
}
