//! One peer: one lazily connected HTTP/2 channel that every call and stream
//! to that peer shares, a bound on what is in flight, and a backoff after
//! failures to reach it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::{Channel, Endpoint};

use super::proto::cluster_client::ClusterClient;
use super::proto::{CallRequest, HeartbeatRequest, StreamFrame};
use super::{CallError, ClusterConfig, Duplex, NodeId, SECRET_HEADER, STREAM_BUFFER};

/// First and longest wait before trying an unreachable peer again.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    last_error: String,
}

pub(super) struct Peer {
    pub(super) id: NodeId,
    addr: String,
    client: Option<ClusterClient<Channel>>,
    calls: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    backoff: Mutex<Backoff>,
    /// The cluster secret every request carries.
    secret: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Peer {
    pub(super) fn new(id: NodeId, addr: String, config: &ClusterConfig) -> Peer {
        let client = match Endpoint::from_shared(format!("http://{addr}")) {
            Ok(endpoint) => {
                let endpoint = endpoint
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    // A peer that stops answering (paused, or gone without a
                    // FIN) is noticed by the heartbeat; keep-alive closes the
                    // dead connection so that the next call dials again.
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .keep_alive_while_idle(true)
                    .initial_stream_window_size(Some(4 << 20))
                    .initial_connection_window_size(Some(32 << 20));
                let channel = match &config.tls {
                    None => endpoint.connect_lazy(),
                    Some(tls) => endpoint.connect_with_connector_lazy(tls_connector(tls.clone(), addr.clone())),
                };
                Some(
                    ClusterClient::new(channel)
                        .max_decoding_message_size(config.max_message_bytes)
                        .max_encoding_message_size(config.max_message_bytes),
                )
            }
            Err(e) => {
                tracing::error!(peer = id, %addr, error = %e, "invalid peer address; calls to it will fail");
                None
            }
        };
        let secret = config.secret.as_ref().and_then(|s| s.as_str().parse().ok());
        Peer {
            id,
            addr,
            client,
            calls: Arc::new(Semaphore::new(config.max_inflight_calls.max(1))),
            streams: Arc::new(Semaphore::new(config.max_streams.max(1))),
            backoff: Mutex::default(),
            secret,
        }
    }

    /// A request carrying the cluster secret, when there is one.
    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(body);
        if let Some(secret) = &self.secret {
            req.metadata_mut().insert(SECRET_HEADER, secret.clone());
        }
        req
    }

    fn client(&self) -> Result<ClusterClient<Channel>, CallError> {
        self.client.clone().ok_or_else(|| CallError::Unreachable { node: self.id, detail: format!("invalid address {}", self.addr) })
    }

    /// Fails fast while the peer is backed off.
    fn check_backoff(&self) -> Result<(), CallError> {
        let b = self.backoff.lock();
        match b.until {
            Some(until) if Instant::now() < until => {
                Err(CallError::Unreachable { node: self.id, detail: format!("{} (retrying shortly)", b.last_error) })
            }
            _ => Ok(()),
        }
    }

    fn succeeded(&self) {
        let mut b = self.backoff.lock();
        if b.failures > 0 {
            *b = Backoff::default();
        }
    }

    fn failed(&self, detail: &str) {
        let mut b = self.backoff.lock();
        b.failures = b.failures.saturating_add(1);
        let wait = BACKOFF_MIN.saturating_mul(1u32 << b.failures.min(8).saturating_sub(1)).min(BACKOFF_MAX);
        b.until = Some(Instant::now() + wait);
        b.last_error = detail.to_string();
    }

    /// Maps a gRPC status; a transport failure backs the peer off.
    fn status_error(&self, status: tonic::Status, kind: &str) -> CallError {
        match status.code() {
            tonic::Code::Unimplemented => CallError::NoHandler { node: self.id, kind: kind.to_string() },
            tonic::Code::Aborted => CallError::Remote(status.message().to_string()),
            tonic::Code::ResourceExhausted => CallError::Busy(self.id),
            tonic::Code::DeadlineExceeded => CallError::Timeout { node: self.id, timeout: Duration::ZERO },
            tonic::Code::Cancelled => CallError::Closed,
            _ => {
                let detail = format!("{}: {}", self.addr, status.message());
                self.failed(&detail);
                CallError::Unreachable { node: self.id, detail }
            }
        }
    }

    async fn permit(&self, pool: &Arc<Semaphore>, deadline: Instant) -> Result<tokio::sync::OwnedSemaphorePermit, CallError> {
        match tokio::time::timeout_at(deadline.into(), pool.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => Err(CallError::Busy(self.id)),
        }
    }

    /// A heartbeat, even while calls to the peer are backed off: it is what
    /// tells that the peer is back, and its success ends the backoff (a
    /// peer that restarted is reachable again within a heartbeat, not after
    /// a backoff of up to a second).
    pub(super) async fn heartbeat(&self, from: NodeId, incarnation: u64, timeout: Duration) -> Result<u64, CallError> {
        let mut client = self.client()?;
        let mut req = self.request(HeartbeatRequest { from, to: self.id, incarnation });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.heartbeat(req)).await {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                if reply.node != self.id {
                    let detail = format!("{} is node {}, not {}", self.addr, reply.node, self.id);
                    self.failed(&detail);
                    return Err(CallError::Unreachable { node: self.id, detail });
                }
                self.succeeded();
                Ok(reply.incarnation)
            }
            Ok(Err(status)) => Err(self.status_error(status, "heartbeat")),
            Err(_) => Err(CallError::Timeout { node: self.id, timeout }),
        }
    }

    /// A call; `urgent` ones are tried even while the peer is backed off
    /// (votes: a vote that is not sent costs a whole election timeout).
    pub(super) async fn call(&self, from: NodeId, kind: &str, body: Bytes, timeout: Duration, urgent: bool) -> Result<Bytes, CallError> {
        if !urgent {
            self.check_backoff()?;
        }
        let deadline = Instant::now() + timeout;
        let _permit = self.permit(&self.calls, deadline).await?;
        let mut client = self.client()?;
        let mut req = self.request(CallRequest { from, to: self.id, kind: kind.to_string(), body });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout_at(deadline.into(), client.call(req)).await {
            Ok(Ok(reply)) => {
                self.succeeded();
                Ok(reply.into_inner().body)
            }
            Ok(Err(status)) => Err(match self.status_error(status, kind) {
                CallError::Timeout { node, .. } => CallError::Timeout { node, timeout },
                e => e,
            }),
            Err(_) => Err(CallError::Timeout { node: self.id, timeout }),
        }
    }

    /// Opens a stream; `timeout` bounds waiting for the peer to accept it.
    pub(super) async fn open_stream(&self, from: NodeId, kind: &str, timeout: Duration) -> Result<Duplex, CallError> {
        self.check_backoff()?;
        let deadline = Instant::now() + timeout;
        let permit = self.permit(&self.streams, deadline).await?;
        let mut client = self.client()?;
        let (tx, out_rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
        let first = StreamFrame { from, to: self.id, kind: kind.to_string(), data: Bytes::new() };
        let outgoing = futures::stream::once(async move { first })
            .chain(tokio_stream::wrappers::ReceiverStream::new(out_rx).map(|data| StreamFrame { data, ..StreamFrame::default() }));
        let response = tokio::time::timeout_at(deadline.into(), client.stream(self.request(outgoing))).await;
        let mut incoming = match response {
            Ok(Ok(r)) => {
                self.succeeded();
                r.into_inner()
            }
            Ok(Err(status)) => return Err(self.status_error(status, kind)),
            Err(_) => return Err(CallError::Timeout { node: self.id, timeout }),
        };
        let (in_tx, rx) = mpsc::channel(STREAM_BUFFER);
        let node = self.id;
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let item = tokio::select! {
                    item = incoming.next() => item,
                    _ = in_tx.closed() => return,
                };
                let msg = match item {
                    None => return,
                    Some(Ok(frame)) => Ok(frame.data),
                    Some(Err(status)) => Err(match status.code() {
                        tonic::Code::Aborted => CallError::Remote(status.message().to_string()),
                        _ => CallError::Unreachable { node, detail: status.message().to_string() },
                    }),
                };
                let stop = msg.is_err();
                if in_tx.send(msg).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Duplex { tx, rx })
    }
}

/// Dials `addr` (`host:port`) and performs the client side of mutual TLS:
/// this node's certificate, and the cluster CA to verify the peer's server
/// certificate against `host`. The files are read on every connection, so
/// a rotated certificate is used from the next reconnection on.
fn tls_connector(
    tls: crate::tls::ServerTls,
    addr: String,
) -> impl tower::Service<http::Uri, Response = TlsIo, Error = std::io::Error, Future: Send + 'static> + Clone + Send + 'static {
    tower::service_fn(move |_uri: http::Uri| {
        let (tls, addr) = (tls.clone(), addr.clone());
        async move {
            let io_err = |e: String| std::io::Error::other(e);
            let host = server_name(&addr).ok_or_else(|| io_err(format!("{addr} has no host name")))?;
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| io_err(format!("{host}: {e}")))?;
            let config = tls.client_config().map_err(|e| io_err(e.to_string()))?;
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let _ = tcp.set_nodelay(true);
            let stream =
                tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// A TLS connection to a peer, as the HTTP/2 client reads and writes it.
type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The host of `host:port` (an IPv6 address without its brackets).
fn server_name(addr: &str) -> Option<&str> {
    let (host, _port) = addr.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::server_name;

    #[test]
    fn should_take_the_host_of_a_peer_address() {
        assert_eq!(server_name("warren-0.warren-headless.shop.svc:5681"), Some("warren-0.warren-headless.shop.svc"));
        assert_eq!(server_name("127.0.0.1:5681"), Some("127.0.0.1"));
        assert_eq!(server_name("[::1]:5681"), Some("::1"));
        assert_eq!(server_name(":5681"), None);
        assert_eq!(server_name("nohost"), None);
    }
}
