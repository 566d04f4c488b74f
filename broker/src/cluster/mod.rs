//! The nodes of a cluster and the traffic between them.
//!
//! * [`ClusterConfig`]: this node's id, the address it listens on, and every
//!   member with the address its peers dial (on Kubernetes the bind address
//!   and the advertised name differ).
//! * [`Cluster`]: the node-to-node gRPC service on the cluster listener and
//!   **one connection per peer** (a lazily connected HTTP/2 channel) that
//!   multiplexes everything sent to that peer: the liveness heartbeat, the
//!   Raft messages of every group, and the operations the layers above
//!   forward.
//! * Two generic hooks for those layers: a unary [`Cluster::call`] and a
//!   byte stream each way, [`Cluster::open_stream`], each dispatched on the
//!   receiving node to the handler registered under its `kind`.
//! * [`Liveness`]: which peers answer the 250 ms node-pair heartbeat.
//!
//! Invariants a reader must keep:
//! * Everything is bounded: message sizes (`max_message_bytes`), calls in
//!   flight per peer (callers wait, then fail with [`CallError::Busy`]),
//!   streams per peer, every call's deadline, and reconnection attempts (an
//!   unreachable peer is backed off exponentially up to one second; calls
//!   to it fail fast meanwhile).
//! * A call names the node it is meant for; a node refuses calls meant for
//!   another (a stale or wrong address never reaches the wrong node's
//!   handlers).
//! * A call to this node itself runs its handler directly, without the
//!   network.
//! * Nothing here knows Raft: `raft/` registers its handlers like any other
//!   layer.
//! * When configured, peers authenticate each other before any handler
//!   runs: mutual TLS with certificates the cluster CA signed
//!   ([`ClusterConfig::tls`]) and/or the shared [`ClusterSecret`] that every
//!   call carries. The node-to-node service bypasses the client API's
//!   permission checks (a forwarded operation was checked on the node the
//!   client called), so it must never answer an unauthenticated caller.

mod peer;
mod service;

pub mod proto {
    #![allow(clippy::all, clippy::unwrap_used)]
    tonic::include_proto!("warren.cluster.v1");
}

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::peer::Peer;

/// A node of the cluster (the same id Raft uses).
pub type NodeId = u64;

/// How often a node sends the liveness heartbeat to each peer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// The default cluster port.
pub const DEFAULT_PORT: u16 = 5681;

/// Who this node is and who its peers are.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    /// Where the cluster listener binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Every member, this node included: id -> `host:port` its peers dial.
    pub peers: BTreeMap<NodeId, String>,
    /// Largest message sent or received (a Raft batch, a forwarded
    /// operation, a snapshot chunk).
    pub max_message_bytes: usize,
    /// Deadline of a call that gives none.
    pub call_timeout: Duration,
    /// A peer whose heartbeat has not been answered for this long is dead.
    pub dead_after: Duration,
    /// Most calls in flight to one peer.
    pub max_inflight_calls: usize,
    /// Most streams open to one peer.
    pub max_streams: usize,
    /// Mutual TLS: the listener requires a certificate the CA signed, and
    /// this node dials its peers with its certificate.
    pub tls: Option<crate::tls::ServerTls>,
    /// The secret every node-to-node call carries and every node checks.
    pub secret: Option<ClusterSecret>,
}

/// The gRPC metadata key that carries the [`ClusterSecret`].
pub const SECRET_HEADER: &str = "x-warren-cluster-secret";

/// The secret all nodes of a cluster share (RabbitMQ's Erlang cookie): a
/// node-to-node call without it is refused with UNAUTHENTICATED. It never
/// appears in logs (`Debug` prints a placeholder).
#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// Shortest and longest secret accepted.
    pub const MIN_LEN: usize = 16;
    pub const MAX_LEN: usize = 1024;

    /// A secret from its text (surrounding whitespace ignored); the error
    /// says what is wrong without showing it.
    pub fn new(text: &str) -> Result<ClusterSecret, String> {
        let t = text.trim();
        if t.len() < Self::MIN_LEN || t.len() > Self::MAX_LEN {
            return Err(format!("the cluster secret has {} characters; it must have {} to {}", t.len(), Self::MIN_LEN, Self::MAX_LEN));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the cluster secret must be printable ASCII without spaces".into());
        }
        Ok(ClusterSecret(t.into()))
    }

    /// Reads a secret from a file (a mounted Secret).
    pub fn read(path: &std::path::Path) -> Result<ClusterSecret, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| format!("{}: the cluster secret must be printable ASCII", path.display()))?;
        ClusterSecret::new(text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the secret, in time independent of where
    /// they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != presented.len() {
            return false;
        }
        mine.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl ClusterConfig {
    pub fn new(node_id: NodeId, listen: SocketAddr, peers: BTreeMap<NodeId, String>) -> ClusterConfig {
        ClusterConfig {
            node_id,
            listen,
            peers,
            max_message_bytes: 64 << 20,
            call_timeout: Duration::from_secs(5),
            dead_after: Duration::from_millis(1000),
            max_inflight_calls: 1024,
            max_streams: 256,
            tls: None,
            secret: None,
        }
    }
}

/// What a node answers a caller it does not list in its `--peers` (the
/// caller sees it in the error's detail).
pub const NOT_A_MEMBER: &str = "is not a member of this cluster";

/// Why a call to another node failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("node {node} is unreachable: {detail}")]
    Unreachable { node: NodeId, detail: String },
    #[error("node {node} did not answer within {timeout:?}")]
    Timeout { node: NodeId, timeout: Duration },
    #[error("too many calls in flight to node {0}")]
    Busy(NodeId),
    #[error("node {node} has no handler for '{kind}'")]
    NoHandler { node: NodeId, kind: String },
    #[error("message of {0} bytes is larger than the cluster's limit")]
    TooLarge(usize),
    /// The handler on the other node failed.
    #[error("{0}")]
    Remote(String),
    #[error("the cluster connection is shutting down")]
    Closed,
}

impl CallError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CallError::UnknownNode(_) => "unknown_node",
            CallError::Unreachable { .. } => "unreachable",
            CallError::Timeout { .. } => "timeout",
            CallError::Busy(_) => "busy",
            CallError::NoHandler { .. } => "no_handler",
            CallError::TooLarge(_) => "too_large",
            CallError::Remote(_) => "remote",
            CallError::Closed => "closed",
        }
    }
}

/// Handles a unary call: (calling node, body) -> reply, or an error text
/// the caller gets as [`CallError::Remote`].
pub type CallHandler = Arc<dyn Fn(NodeId, Bytes) -> BoxFuture<'static, Result<Bytes, String>> + Send + Sync>;

/// Handles a stream opened by another node: (calling node, its end).
/// The stream ends when the handler drops its `tx` (and the caller's
/// `rx` then yields `None`).
pub type StreamHandler = Arc<dyn Fn(NodeId, Duplex) -> BoxFuture<'static, ()> + Send + Sync>;

/// Frames buffered each way on a stream.
pub const STREAM_BUFFER: usize = 32;

/// One end of a byte stream between two nodes.
pub struct Duplex {
    /// Frames to the other end. Dropping it ends this direction.
    pub tx: mpsc::Sender<Bytes>,
    /// Frames from the other end; `None` once it ended its direction, an
    /// error if the connection failed.
    pub rx: mpsc::Receiver<Result<Bytes, CallError>>,
}

impl Duplex {
    /// Two ends connected to each other (for a stream to this node itself).
    pub fn pair() -> (Duplex, Duplex) {
        let (a_tx, a_rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
        let (b_tx, b_rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
        let a = Duplex { tx: a_tx, rx: forward_ok(b_rx) };
        let b = Duplex { tx: b_tx, rx: forward_ok(a_rx) };
        (a, b)
    }
}

fn forward_ok(mut rx: mpsc::Receiver<Bytes>) -> mpsc::Receiver<Result<Bytes, CallError>> {
    let (tx, out) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
    });
    out
}

/// What this node knows of a peer's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// It answered a heartbeat within `dead_after`.
    pub alive: bool,
    /// Changes when the peer restarts (`None` until it first answered).
    pub incarnation: Option<u64>,
}

/// The liveness of every peer, as the heartbeat sees it. Cheap to clone.
#[derive(Clone)]
pub struct Liveness {
    rx: watch::Receiver<BTreeMap<NodeId, PeerStatus>>,
}

impl Liveness {
    /// Whether `node` answered a heartbeat lately (always true for this
    /// node itself).
    pub fn is_alive(&self, node: NodeId) -> bool {
        self.rx.borrow().get(&node).is_some_and(|s| s.alive)
    }

    /// Every member's status.
    pub fn current(&self) -> BTreeMap<NodeId, PeerStatus> {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes whenever a peer's status changes.
    pub fn watch(&self) -> watch::Receiver<BTreeMap<NodeId, PeerStatus>> {
        self.rx.clone()
    }

    /// Waits until `check` holds for the view, at most `timeout`.
    pub async fn wait_for(&self, timeout: Duration, mut check: impl FnMut(&BTreeMap<NodeId, PeerStatus>) -> bool) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|v| check(v))).await.is_ok_and(|r| r.is_ok())
    }
}

struct Shared {
    config: ClusterConfig,
    incarnation: u64,
    calls: RwLock<HashMap<String, CallHandler>>,
    streams: RwLock<HashMap<String, StreamHandler>>,
    peers: BTreeMap<NodeId, Arc<Peer>>,
    liveness: watch::Sender<BTreeMap<NodeId, PeerStatus>>,
    stop: CancellationToken,
}

/// This node's side of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl Cluster {
    /// Binds the cluster listener, starts serving peers and sending
    /// heartbeats. Returns the bound address (the port is chosen when the
    /// configured one is 0).
    pub async fn start(config: ClusterConfig) -> std::io::Result<(Cluster, SocketAddr)> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let cluster = Cluster::with_listener(config, listener);
        Ok((cluster, addr))
    }

    /// Starts on a listener bound already.
    pub fn with_listener(config: ClusterConfig, listener: TcpListener) -> Cluster {
        let incarnation =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
                ^ u64::from(std::process::id());
        let peers: BTreeMap<NodeId, Arc<Peer>> = config
            .peers
            .iter()
            .filter(|(id, _)| **id != config.node_id)
            .map(|(id, addr)| (*id, Arc::new(Peer::new(*id, addr.clone(), &config))))
            .collect();
        let mut initial: BTreeMap<NodeId, PeerStatus> =
            peers.keys().map(|id| (*id, PeerStatus { alive: false, incarnation: None })).collect();
        initial.insert(config.node_id, PeerStatus { alive: true, incarnation: Some(incarnation) });
        let (liveness, _) = watch::channel(initial);
        let shared = Arc::new(Shared {
            config,
            incarnation,
            calls: RwLock::default(),
            streams: RwLock::default(),
            peers,
            liveness,
            stop: CancellationToken::new(),
        });
        let cluster = Cluster { shared };
        tokio::spawn(service::serve(cluster.clone(), listener, cluster.shared.stop.clone()));
        for peer in cluster.shared.peers.values() {
            tokio::spawn(heartbeat_loop(cluster.clone(), peer.clone()));
        }
        tracing::info!(node = cluster.node_id(), peers = ?cluster.shared.config.peers, "cluster started");
        cluster
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.config.node_id
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.shared.config
    }

    /// Every member's id, this node included.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.shared.config.peers.keys().copied()
    }

    pub fn liveness(&self) -> Liveness {
        Liveness { rx: self.shared.liveness.subscribe() }
    }

    /// Registers the handler of unary calls of `kind` (replacing any
    /// earlier one).
    pub fn register_call(&self, kind: &str, handler: CallHandler) {
        self.shared.calls.write().insert(kind.to_string(), handler);
    }

    /// Registers the handler of streams of `kind`.
    pub fn register_stream(&self, kind: &str, handler: StreamHandler) {
        self.shared.streams.write().insert(kind.to_string(), handler);
    }

    fn call_handler(&self, kind: &str) -> Option<CallHandler> {
        self.shared.calls.read().get(kind).cloned()
    }

    fn stream_handler(&self, kind: &str) -> Option<StreamHandler> {
        self.shared.streams.read().get(kind).cloned()
    }

    /// Calls the handler of `kind` on `node` with the default deadline.
    pub async fn call(&self, node: NodeId, kind: &str, body: Bytes) -> Result<Bytes, CallError> {
        self.call_with_timeout(node, kind, body, self.shared.config.call_timeout).await
    }

    /// Calls the handler of `kind` on `node`; fails after `timeout`.
    pub async fn call_with_timeout(&self, node: NodeId, kind: &str, body: Bytes, timeout: Duration) -> Result<Bytes, CallError> {
        self.call_inner(node, kind, body, timeout, false).await
    }

    /// A call that is tried even while `node` is backed off after failed
    /// calls (for elections: a vote request that is not sent costs a whole
    /// election timeout).
    pub async fn call_urgent(&self, node: NodeId, kind: &str, body: Bytes, timeout: Duration) -> Result<Bytes, CallError> {
        self.call_inner(node, kind, body, timeout, true).await
    }

    async fn call_inner(&self, node: NodeId, kind: &str, body: Bytes, timeout: Duration, urgent: bool) -> Result<Bytes, CallError> {
        if body.len() > self.shared.config.max_message_bytes {
            return Err(CallError::TooLarge(body.len()));
        }
        if node == self.node_id() {
            let handler = self.call_handler(kind).ok_or_else(|| CallError::NoHandler { node, kind: kind.to_string() })?;
            return match tokio::time::timeout(timeout, handler(node, body)).await {
                Ok(r) => r.map_err(CallError::Remote),
                Err(_) => Err(CallError::Timeout { node, timeout }),
            };
        }
        let peer = self.shared.peers.get(&node).ok_or(CallError::UnknownNode(node))?;
        peer.call(self.node_id(), kind, body, timeout, urgent).await
    }

    /// Opens a stream to the handler of `kind` on `node`.
    pub async fn open_stream(&self, node: NodeId, kind: &str) -> Result<Duplex, CallError> {
        if node == self.node_id() {
            let handler = self.stream_handler(kind).ok_or_else(|| CallError::NoHandler { node, kind: kind.to_string() })?;
            let (mine, theirs) = Duplex::pair();
            tokio::spawn(handler(node, theirs));
            return Ok(mine);
        }
        let peer = self.shared.peers.get(&node).ok_or(CallError::UnknownNode(node))?;
        peer.open_stream(self.node_id(), kind, self.shared.config.call_timeout).await
    }

    /// Stops serving and sending heartbeats; calls in flight fail.
    pub fn stop(&self) {
        self.shared.stop.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stop.is_cancelled()
    }

    fn set_status(&self, node: NodeId, status: PeerStatus) {
        self.shared.liveness.send_if_modified(|view| {
            let old = view.insert(node, status);
            if old != Some(status) {
                if old.map(|o| o.alive) != Some(status.alive) {
                    if status.alive {
                        tracing::info!(peer = node, "peer is alive");
                    } else {
                        tracing::warn!(peer = node, "peer is not answering heartbeats");
                    }
                }
                true
            } else {
                false
            }
        });
    }
}

/// Sends the heartbeat to one peer every [`HEARTBEAT_INTERVAL`] and keeps
/// its status current.
async fn heartbeat_loop(cluster: Cluster, peer: Arc<Peer>) {
    let stop = cluster.shared.stop.clone();
    let dead_after = cluster.shared.config.dead_after;
    let mut last_ok: Option<Instant> = None;
    let mut incarnation: Option<u64> = None;
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let timeout = HEARTBEAT_INTERVAL.max(Duration::from_millis(100));
        let mut result = peer.heartbeat(cluster.node_id(), cluster.shared.incarnation, timeout).await;
        if let Err(e @ CallError::Unreachable { .. }) = &result
            && last_ok.is_some()
        {
            // The connection failed rather than timed out: a peer whose
            // process died (its sockets closed, the port refuses) is
            // declared dead now rather than after `dead_after`, so that the
            // groups it led elect at once. A second attempt on a fresh
            // connection first, so that one broken connection to a live
            // peer is not taken for its death.
            tracing::debug!(peer = peer.id, error = %e, "heartbeat connection failed; trying once more");
            result = peer.heartbeat(cluster.node_id(), cluster.shared.incarnation, timeout).await;
            if let Err(e @ CallError::Unreachable { .. }) = &result {
                tracing::debug!(peer = peer.id, error = %e, "peer refuses connections");
                last_ok = None;
            }
        }
        match result {
            Ok(inc) => {
                last_ok = Some(Instant::now());
                incarnation = Some(inc);
            }
            Err(e) => tracing::trace!(peer = peer.id, error = %e, "heartbeat failed"),
        }
        let alive = last_ok.is_some_and(|t| t.elapsed() < dead_after);
        cluster.set_status(peer.id, PeerStatus { alive, incarnation });
    }
}

#[cfg(test)]
mod tests {
    //! Peers authenticating each other: the shared secret and mutual TLS,
    //! two nodes in one process on loopback.

    use super::*;
    use crate::tls::{ClientAuth, ServerTls, TlsFiles};

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Two nodes, each with its own settings; returns them once both listen.
    async fn pair(setup: impl Fn(NodeId, &mut ClusterConfig)) -> (Cluster, Cluster) {
        let listeners = [ok(TcpListener::bind("127.0.0.1:0").await), ok(TcpListener::bind("127.0.0.1:0").await)];
        let peers: BTreeMap<NodeId, String> =
            listeners.iter().enumerate().map(|(i, l)| (i as NodeId + 1, ok(l.local_addr()).to_string())).collect();
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = i as NodeId + 1;
            let mut config = ClusterConfig::new(id, ok(listener.local_addr()), peers.clone());
            setup(id, &mut config);
            let c = Cluster::with_listener(config, listener);
            c.register_call("echo", Arc::new(|_from, body| Box::pin(async move { Ok(body) })));
            nodes.push(c);
        }
        let b = nodes.pop().unwrap_or_else(|| panic!("two nodes"));
        let a = nodes.pop().unwrap_or_else(|| panic!("two nodes"));
        (a, b)
    }

    async fn echo(from: &Cluster, to: NodeId) -> Result<Bytes, CallError> {
        from.call_with_timeout(to, "echo", Bytes::from_static(b"hello"), Duration::from_secs(2)).await
    }

    /// Calls until one succeeds (the first connection may still be dialing),
    /// at most 5 s.
    async fn echo_eventually(from: &Cluster, to: NodeId) -> Result<Bytes, CallError> {
        let mut last = Err(CallError::Closed);
        for _ in 0..50 {
            last = echo(from, to).await;
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    }

    #[test]
    fn should_accept_only_a_reasonable_secret_and_compare_it_whole() {
        assert!(ClusterSecret::new("short").is_err());
        assert!(ClusterSecret::new(&"x".repeat(ClusterSecret::MAX_LEN + 1)).is_err());
        assert!(ClusterSecret::new("has a space inside it").is_err());
        let s = ok(ClusterSecret::new("  0123456789abcdef\n"));
        assert!(s.matches(b"0123456789abcdef"));
        assert!(!s.matches(b"0123456789abcdeF"));
        assert!(!s.matches(b"0123456789abcdef0"));
        assert!(!s.matches(b""));
        assert!(!format!("{s:?}").contains("0123"), "Debug must not show the secret");
        let e = ClusterSecret::new("tiny-secret").err().unwrap_or_default();
        assert!(!e.contains("tiny"), "errors must not show the secret: {e}");
    }

    #[tokio::test]
    async fn should_refuse_calls_without_the_cluster_secret() {
        let good = ok(ClusterSecret::new("the-cluster-secret-0123"));
        let other = ok(ClusterSecret::new("another-secret-456789"));
        // Node 2 knows the secret, node 1 has a different one.
        let (a, b) = pair(|id, c| c.secret = Some(if id == 2 { good.clone() } else { other.clone() })).await;
        let before = crate::auth::metrics::global().cluster_refused_count();
        let err = echo(&a, 2).await.err().unwrap_or_else(|| panic!("a wrong secret must be refused"));
        assert!(err.to_string().contains("secret"), "{err}");
        assert!(crate::auth::metrics::global().cluster_refused_count() > before, "refusals are counted");
        a.stop();
        b.stop();
        // The same secret on both: calls pass.
        let (a, b) = pair(|_, c| c.secret = Some(good.clone())).await;
        assert_eq!(ok(echo_eventually(&a, 2).await), Bytes::from_static(b"hello"));
        assert_eq!(ok(echo_eventually(&b, 1).await), Bytes::from_static(b"hello"));
        a.stop();
        b.stop();
        // A node without a secret is refused by one that has it.
        let (a, b) = pair(|id, c| c.secret = (id == 2).then(|| good.clone())).await;
        assert!(echo(&a, 2).await.is_err());
        a.stop();
        b.stop();
    }

    /// A CA and, per node, a certificate for 127.0.0.1 usable as server and
    /// client; written to `dir`.
    fn pki(dir: &std::path::Path, name: &str, nodes: &[NodeId]) -> Vec<TlsFiles> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let mut ca_params = ok(CertificateParams::new(Vec::<String>::new()));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca_key = ok(KeyPair::generate());
        let ca = ok(ca_params.self_signed(&ca_key));
        let ca_path = dir.join(format!("{name}-ca.crt"));
        ok(std::fs::write(&ca_path, ca.pem()));
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        nodes
            .iter()
            .map(|id| {
                let mut p = ok(CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]));
                p.distinguished_name.push(DnType::CommonName, format!("node-{id}"));
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
                let key = ok(KeyPair::generate());
                let cert = ok(p.signed_by(&key, &issuer));
                let files = TlsFiles {
                    cert: dir.join(format!("{name}-{id}.crt")),
                    key: dir.join(format!("{name}-{id}.key")),
                    client_ca: Some(ca_path.clone()),
                    client_auth: ClientAuth::Required,
                };
                ok(std::fs::write(&files.cert, cert.pem()));
                ok(std::fs::write(&files.key, key.serialize_pem()));
                files
            })
            .collect()
    }

    #[tokio::test]
    async fn should_speak_mutual_tls_between_nodes_and_refuse_a_foreign_certificate() {
        let dir = ok(tempfile::tempdir());
        let ours = pki(dir.path(), "cluster", &[1, 2]);
        let theirs = pki(dir.path(), "intruder", &[1]);
        let load = |f: &TlsFiles| ok(ServerTls::load("cluster", f.clone(), &[b"h2"]));
        let (a, b) = pair(|id, c| c.tls = Some(load(&ours[id as usize - 1]))).await;
        assert_eq!(ok(echo_eventually(&a, 2).await), Bytes::from_static(b"hello"));
        assert_eq!(ok(echo_eventually(&b, 1).await), Bytes::from_static(b"hello"));
        a.stop();
        b.stop();
        // Node 1's certificate comes from another CA: neither side accepts
        // the other.
        let (a, b) = pair(|id, c| c.tls = Some(load(if id == 1 { &theirs[0] } else { &ours[1] }))).await;
        assert!(echo(&a, 2).await.is_err(), "a certificate from another CA must not get in");
        assert!(echo(&b, 1).await.is_err(), "a peer with a certificate from another CA must not be trusted");
        a.stop();
        b.stop();
        // A node speaking plain text to a TLS node gets nowhere.
        let (a, b) = pair(|id, c| c.tls = (id == 2).then(|| load(&ours[1]))).await;
        assert!(echo(&a, 2).await.is_err());
        a.stop();
        b.stop();
    }
}
