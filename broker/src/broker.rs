//! The broker core: topology changes, publishing, consuming. Transport-free:
//! the gRPC layer decodes a request, calls one method here and maps the
//! result.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::{Mutex, mpsc, oneshot};
use warren_client::proto::{self, ConfirmStatus, Value};

use crate::confirm::{self, ConfirmSink, ConfirmTracker, PartOutcome};
use crate::error::{Error, Result, WireError};
use crate::model::StoredMessage;
use crate::model::args::{ExchangeArgs, validate_binding_args};
use crate::model::{self, ExchangeKind, MessageData, QueueArgs, validate_name, validate_routing_key};
use crate::queue::state::{ConsumerId, ConsumerSpec, Limits, QueueState, SeqAllocator};
use crate::queue::task::{self, QueueEvent, TaskEnv};
use crate::queue::{ConsumerStream, Outbox, QueueCmd, QueueRef};
use crate::raft::NodeId;
use crate::replica::meta::{Definitions, Meta, MetaCmd, MetaEvent, QuorumDef, is_quorum_id};
use crate::replica::quorum::{CAUGHT_UP_ENTRIES, DeadLetterFn, ExpireFn, MembersOp, MembersReply, ReplicaCtx, call_members_op};
use crate::replica::rebalance::Leadership;
use crate::routing::Dest;
use crate::store::counters::QueueCounters;
use crate::store::keys::{self, QueueId, meta};
use crate::store::{Cf, Op, Store};
use crate::topology::{BindingDef, ExchangeDef, QueueDef, QueueEntry, SessionId, Snapshot, Topology};
use prost::Message as _;

/// Settings of the broker core.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub node_name: String,
    /// Largest message accepted, in bytes: body plus encoded properties.
    pub max_message_size: usize,
    /// Per-queue in-memory window and per-consumer bounds.
    pub limits: Limits,
    /// Most headers one message may carry.
    pub max_message_headers: usize,
    /// Most bytes of headers (names and encoded values) one message may carry.
    pub max_message_header_bytes: usize,
    /// Most bytes of messages one `Get` reply carries (the rest stay in the
    /// queue): below the server's encoding limit, so a reply always fits.
    pub max_reply_bytes: u64,
}

impl BrokerConfig {
    /// The `Get` reply budget that fits a gRPC encoding limit of
    /// `encoding_limit` bytes, leaving room for framing.
    pub fn reply_budget(encoding_limit: usize) -> u64 {
        (encoding_limit as u64).saturating_sub(64 << 10).max(1)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_name: "warren".into(),
            max_message_size: 16 << 20,
            limits: Limits::default(),
            max_reply_bytes: BrokerConfig::reply_budget(33 << 20),
            max_message_headers: crate::config::DEFAULT_MAX_MESSAGE_HEADERS,
            max_message_header_bytes: crate::config::DEFAULT_MAX_MESSAGE_HEADER_BYTES,
        }
    }
}

/// Node-wide counters.
#[derive(Debug, Default)]
pub struct Totals {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
}

/// A client connection. Exclusive queues belong to one; when the last
/// handle on it drops (the connection closed), they are deleted.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: SessionId,
    pub peer: Arc<str>,
    _guard: Arc<SessionGuard>,
}

#[derive(Debug)]
struct SessionGuard {
    id: SessionId,
    tx: mpsc::UnboundedSender<SessionId>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(self.id);
    }
}

/// An active subscription.
pub struct Subscription {
    pub queue: QueueRef,
    pub consumer: ConsumerId,
    pub tag: Arc<str>,
    pub events: ConsumerStream,
}

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: BrokerConfig,
    store: Store,
    seqs: Arc<SeqAllocator>,
    topo: Mutex<Topology>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// What new queue tasks get.
    env: TaskEnv,
    session_events: mpsc::UnboundedSender<SessionId>,
    next_session: AtomicU64,
    open_sessions: AtomicU64,
    shutting_down: AtomicBool,
    started: Instant,
    totals: Totals,
    /// In a cluster: the metadata group and the quorum queues' context.
    cluster: std::sync::OnceLock<ClusterParts>,
    /// Replica-set changes and rebalances through this node, one at a time.
    membership: Mutex<()>,
    /// Dead letters that classic queues of this node sent to quorum queues
    /// and that were still in the inbox when the node stopped: handed to
    /// each quorum queue when it starts here.
    quorum_inbox: parking_lot::Mutex<InboxRecords>,
}

/// Inbox records (key, message) by target queue.
type InboxRecords = HashMap<QueueId, Vec<(Vec<u8>, StoredMessage)>>;

/// A node's cluster parts the broker uses.
pub struct ClusterParts {
    pub meta: Arc<Meta>,
    pub replicas: Arc<ReplicaCtx>,
    /// Every node of the cluster.
    pub nodes: BTreeSet<NodeId>,
    /// Whether a durable, shared queue declared without `x-queue-type` is a
    /// quorum queue.
    pub default_quorum: bool,
}

fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..22)
        .map(|_| {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            ALPHABET[rng.random_range(0..ALPHABET.len())] as char
        })
        .collect()
}

impl Broker {
    /// Recovers the broker's state from `store` and starts its queues.
    pub async fn open(store: Store, config: BrokerConfig) -> Result<Broker> {
        let engine = store.engine().clone();
        let Recovered { mut topo, queues, counters, mut dedup, mut inbox, max_inbox_seq, garbage } =
            tokio::task::spawn_blocking(move || load(engine.as_ref()))
                .await
                .map_err(|e| Error::Store(crate::store::StoreError::Io(format!("recovery task failed: {e}"))))??;
        if !garbage.is_empty() {
            store.write(garbage, true).await?;
        }
        let max_seq = counters.values().map(|c| c.max_seq).max().unwrap_or(0).max(max_inbox_seq);
        let seqs = Arc::new(SeqAllocator::starting_at(max_seq + 1));
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (session_tx, session_rx) = mpsc::unbounded_channel();
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let (recovered_tx, recovered) = tokio::sync::watch::channel(false);
        let env = TaskEnv { store: store.clone(), events: queue_tx.clone(), snapshot: snapshot.clone(), recovered };
        // Start the recovered queues.
        for def in queues {
            let c = counters.get(&def.id).copied().unwrap_or_default();
            let window = dedup.remove(&def.id).unwrap_or_default();
            let state = QueueState::recover(def.id, def.name.clone(), def.args.clone(), config.limits, seqs.clone(), c, window);
            let handle = task::spawn(state, def.auto_delete, env.clone(), inbox.remove(&def.id).unwrap_or_default());
            topo.queues.insert(def.name.clone(), QueueEntry { def: Arc::new(def), handle });
        }
        snapshot.store(Arc::new(topo.full_snapshot()));
        // The recovered queues start now, along the complete snapshot.
        recovered_tx.send_replace(true);
        // What is left belongs to quorum queues.
        let quorum_inbox = parking_lot::Mutex::new(inbox);
        let broker = Broker {
            inner: Arc::new(Inner {
                config,
                store,
                seqs,
                topo: Mutex::new(topo),
                snapshot,
                env,
                session_events: session_tx,
                next_session: AtomicU64::new(1),
                open_sessions: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
                started: Instant::now(),
                totals: Totals::default(),
                cluster: std::sync::OnceLock::new(),
                membership: Mutex::new(()),
                quorum_inbox,
            }),
        };
        tokio::spawn(broker.clone().event_loop(queue_rx, session_rx));
        Ok(broker)
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn totals(&self) -> &Totals {
        &self.inner.totals
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.inner.started.elapsed()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Registers a client connection.
    pub fn open_session(&self, peer: impl Into<Arc<str>>) -> Session {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        self.inner.open_sessions.fetch_add(1, Ordering::Relaxed);
        Session { id, peer: peer.into(), _guard: Arc::new(SessionGuard { id, tx: self.inner.session_events.clone() }) }
    }

    pub fn open_sessions(&self) -> u64 {
        self.inner.open_sessions.load(Ordering::Relaxed)
    }

    async fn event_loop(self, mut queues: mpsc::UnboundedReceiver<QueueEvent>, mut sessions: mpsc::UnboundedReceiver<SessionId>) {
        loop {
            tokio::select! {
                Some(ev) = queues.recv() => match ev {
                    QueueEvent::AutoDelete { id, name } => {
                        if let Err(e) = self.delete_queue_if(&name, Some(id), true, false, "queue was auto-deleted").await {
                            tracing::debug!(queue = %name, error = %e, "auto-delete skipped");
                        } else {
                            tracing::info!(queue = %name, "auto-deleted queue after its last consumer left");
                        }
                    }
                    QueueEvent::Expired { id, name } => {
                        if let Err(e) = self.delete_queue_if(&name, Some(id), true, false, "queue expired (x-expires)").await {
                            tracing::debug!(queue = %name, error = %e, "queue expiry skipped");
                        } else {
                            tracing::info!(queue = %name, "deleted queue unused for its x-expires period");
                        }
                    }
                },
                Some(session) = sessions.recv() => {
                    self.inner.open_sessions.fetch_sub(1, Ordering::Relaxed);
                    self.session_closed(session).await;
                }
                else => break,
            }
        }
    }

    async fn session_closed(&self, session: SessionId) {
        let owned: Vec<(Arc<str>, u64)> = {
            let topo = self.inner.topo.lock().await;
            topo.queues.values().filter(|e| e.def.owner == Some(session)).map(|e| (e.def.name.clone(), e.def.id)).collect()
        };
        for (name, id) in owned {
            match self.delete_queue_if(&name, Some(id), false, false, "its exclusive connection closed").await {
                Ok(_) => tracing::info!(queue = %name, "deleted exclusive queue: its connection closed"),
                Err(e) => tracing::warn!(queue = %name, error = %e, "could not delete exclusive queue"),
            }
        }
    }

    fn publish_snapshot(&self, topo: &Topology, changed: &[Arc<str>], queues: &[Arc<str>]) {
        let old = self.inner.snapshot.load();
        self.inner.snapshot.store(Arc::new(topo.snapshot(&old, changed, queues)));
    }

    fn ensure_running(&self) -> Result<()> {
        if self.is_shutting_down() { Err(Error::ShuttingDown) } else { Ok(()) }
    }

    // ---------------------------------------------------------- exchanges

    pub async fn declare_exchange(&self, req: proto::DeclareExchangeRequest) -> Result<proto::ExchangeInfo> {
        if req.passive && self.cluster().is_some() {
            match self.declare_exchange_local(req.clone()).await {
                Err(Error::NotFound { .. }) => {
                    self.sync_meta().await;
                }
                other => return other,
            }
        }
        if let Some(c) = self.cluster()
            && !req.passive
        {
            self.ensure_running()?;
            validate_name("exchange", &req.name, false)?;
            let bytes = c.meta.change(MetaCmd::DeclareExchange(req.encode_to_vec())).await?;
            return proto::ExchangeInfo::decode(bytes.as_slice()).map_err(|e| Error::Unavailable(e.to_string()));
        }
        self.declare_exchange_local(req).await
    }

    async fn declare_exchange_local(&self, req: proto::DeclareExchangeRequest) -> Result<proto::ExchangeInfo> {
        self.ensure_running()?;
        validate_name("exchange", &req.name, req.passive)?;
        let mut topo = self.inner.topo.lock().await;
        if req.passive {
            return topo.exchanges.get(req.name.as_str()).map(ExchangeDef::info).ok_or_else(|| Error::not_found("exchange", &req.name));
        }
        let Some(kind) = ExchangeKind::from_proto(req.r#type) else {
            return Err(Error::InvalidArgument(format!("exchange '{}': type must be direct, fanout, topic or headers", req.name)));
        };
        let args = ExchangeArgs::parse(&req.arguments)?;
        if let Some(existing) = topo.exchanges.get(req.name.as_str()) {
            let mismatch = if existing.kind != kind {
                Some(("type".to_string(), existing.kind.as_str().to_string(), kind.as_str().to_string()))
            } else if existing.durable != req.durable {
                Some(("durable".to_string(), existing.durable.to_string(), req.durable.to_string()))
            } else if existing.auto_delete != req.auto_delete {
                Some(("auto_delete".to_string(), existing.auto_delete.to_string(), req.auto_delete.to_string()))
            } else if existing.internal != req.internal {
                Some(("internal".to_string(), existing.internal.to_string(), req.internal.to_string()))
            } else {
                arguments_mismatch(&existing.arguments, &req.arguments)
            };
            if let Some((field, current, requested)) = mismatch {
                return Err(Error::PreconditionFailed(format!(
                    "exchange '{}' exists with {field} = {current}; cannot re-declare it with {field} = {requested}",
                    req.name
                )));
            }
            return Ok(existing.info());
        }
        if req.name.starts_with("amq.") {
            return Err(Error::AccessRefused(format!(
                "exchange name '{}' is reserved: names starting with 'amq.' belong to the broker",
                req.name
            )));
        }
        let def = ExchangeDef {
            name: req.name.as_str().into(),
            kind,
            durable: req.durable,
            auto_delete: req.auto_delete,
            internal: req.internal,
            arguments: req.arguments,
            args,
            builtin: false,
        };
        if def.durable {
            self.inner.store.write(vec![def.put_op()], true).await?;
        }
        let info = def.info();
        let name = def.name.clone();
        topo.exchanges.insert(name.clone(), def);
        self.publish_snapshot(&topo, &[name], &[]);
        Ok(info)
    }

    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        if let Some(c) = self.cluster() {
            self.ensure_running()?;
            validate_name("exchange", name, true)?;
            c.meta.change(MetaCmd::DeleteExchange { name: name.to_string(), if_unused }).await?;
            return Ok(());
        }
        self.delete_exchange_local(name, if_unused).await
    }

    async fn delete_exchange_local(&self, name: &str, if_unused: bool) -> Result<()> {
        self.ensure_running()?;
        validate_name("exchange", name, true)?;
        let mut topo = self.inner.topo.lock().await;
        let Some(def) = topo.exchanges.get(name) else {
            return Err(Error::not_found("exchange", name));
        };
        if def.builtin {
            return Err(Error::AccessRefused(format!("exchange '{name}' is built in and cannot be deleted")));
        }
        let outgoing = topo.bindings.get(name).map_or(0, Vec::len);
        if if_unused && outgoing > 0 {
            return Err(Error::PreconditionFailed(format!("exchange '{name}' is in use ({outgoing} binding(s))")));
        }
        let changed = self.remove_exchange_locked(&mut topo, name).await?;
        self.auto_delete_exchanges_locked(&mut topo, changed).await;
        Ok(())
    }

    /// Removes an exchange with the bindings from and to it; returns the
    /// other exchanges that lost a binding (candidates for auto-delete).
    async fn remove_exchange_locked(&self, topo: &mut Topology, name: &str) -> Result<Vec<Arc<str>>> {
        let Some(def) = topo.exchanges.get(name).cloned() else {
            return Ok(Vec::new());
        };
        let mut ops = Vec::new();
        if def.durable {
            ops.push(def.delete_op());
        }
        // Bindings from it and to it go with it: written first, then taken
        // out of memory, so that a failed write changes nothing.
        let dest = Dest::Exchange(def.name.clone());
        ops.extend(topo.bindings.get(name).into_iter().flatten().map(BindingDef::delete_op));
        ops.extend(topo.bindings_to(&dest).map(BindingDef::delete_op));
        if !ops.is_empty() {
            self.inner.store.write(ops, true).await?;
        }
        let mut changed: Vec<Arc<str>> = vec![def.name.clone()];
        topo.bindings.remove(name);
        changed.extend(topo.remove_bindings_to(&dest, &mut Vec::new()));
        topo.exchanges.remove(name);
        self.publish_snapshot(topo, &changed, &[]);
        Ok(changed.into_iter().filter(|x| **x != *name).collect())
    }

    pub async fn list_exchanges(&self) -> Vec<proto::ExchangeInfo> {
        // In a cluster: include what was changed through other nodes.
        self.sync_meta().await;
        self.inner.topo.lock().await.exchanges.values().map(ExchangeDef::info).collect()
    }

    // -------------------------------------------------------------- queues

    pub async fn declare_queue(&self, session: &Session, req: proto::DeclareQueueRequest) -> Result<proto::QueueInfo> {
        if req.passive && self.cluster().is_some() {
            match self.declare_queue_local(session, req.clone()).await {
                Err(Error::NotFound { .. }) => {
                    self.sync_meta().await;
                }
                other => return other,
            }
        }
        if let Some(c) = self.cluster()
            && !req.passive
        {
            self.ensure_running()?;
            validate_name("queue", &req.name, true)?;
            let args = QueueArgs::parse(&req.arguments)?;
            let classic = req.arguments.contains_key("x-queue-type") && !args.quorum;
            // In a cluster, durable shared queues are quorum queues unless
            // declared classic (node-local) explicitly.
            let quorum =
                args.quorum || (c.default_quorum && req.durable && !req.exclusive && !req.auto_delete && !classic && !req.name.is_empty());
            let exists = self.inner.topo.lock().await.queues.contains_key(req.name.as_str());
            if quorum && !exists {
                check_quorum_declare(&req)?;
                if req.name.is_empty() {
                    return Err(Error::InvalidArgument("a quorum queue needs a name (server-named queues are exclusive)".into()));
                }
                if req.name.starts_with("amq.") {
                    return Err(Error::AccessRefused(format!(
                        "queue name '{}' is reserved: names starting with 'amq.' belong to the broker",
                        req.name
                    )));
                }
                let mut request = req.clone();
                request.arguments.insert("x-queue-type".into(), Value { kind: Some(proto::value::Kind::String("quorum".into())) });
                let members = choose_members(&c.nodes, args.quorum_initial_group_size, &req.name);
                let bytes = c.meta.change(MetaCmd::DeclareQueue { request: request.encode_to_vec(), members }).await?;
                return proto::QueueInfo::decode(bytes.as_slice()).map_err(|e| Error::Unavailable(e.to_string()));
            }
        }
        self.declare_queue_local(session, req).await
    }

    async fn declare_queue_local(&self, session: &Session, req: proto::DeclareQueueRequest) -> Result<proto::QueueInfo> {
        self.ensure_running()?;
        validate_name("queue", &req.name, true)?;
        // Bad arguments are INVALID_ARGUMENT whether or not the queue exists.
        let args = if req.passive { QueueArgs::default() } else { QueueArgs::parse(&req.arguments)? };
        if args.quorum {
            check_quorum_declare(&req)?;
        }
        let mut topo = self.inner.topo.lock().await;
        if let Some(entry) = topo.queues.get(req.name.as_str()) {
            check_owner(&entry.def, session)?;
            if !req.passive {
                let d = &entry.def;
                let flag = |name: &str, a: bool, b: bool| (a != b).then(|| (name.to_string(), a.to_string(), b.to_string()));
                let mismatch = flag("durable", d.durable, req.durable)
                    .or_else(|| flag("exclusive", d.exclusive, req.exclusive))
                    .or_else(|| flag("auto_delete", d.auto_delete, req.auto_delete))
                    .or_else(|| {
                        // A quorum queue made by the cluster's default type
                        // is re-declared without `x-queue-type` as it was
                        // declared: the type it got is implied.
                        let mut requested = req.arguments.clone();
                        if is_quorum_id(d.id) && !requested.contains_key("x-queue-type") {
                            requested.insert("x-queue-type".into(), Value { kind: Some(proto::value::Kind::String("quorum".into())) });
                        }
                        arguments_mismatch(&canonical_queue_args(&d.arguments), &canonical_queue_args(&requested))
                    });
                if let Some((field, current, requested)) = mismatch {
                    return Err(Error::PreconditionFailed(format!(
                        "queue '{}' exists with {field} = {current}; cannot re-declare it with {field} = {requested}",
                        req.name
                    )));
                }
            }
            // A declare counts as a use (x-expires).
            let _ = entry.handle.tx.try_send(QueueCmd::Touch);
            let mut info = queue_info(entry);
            self.fill_replicas(&mut info, entry.def.id);
            return Ok(info);
        }
        if req.passive {
            return Err(Error::not_found("queue", &req.name));
        }
        let name: Arc<str> = if req.name.is_empty() {
            format!("amq.gen-{}", random_suffix()).into()
        } else if req.name.starts_with("amq.") {
            return Err(Error::AccessRefused(format!(
                "queue name '{}' is reserved: names starting with 'amq.' belong to the broker",
                req.name
            )));
        } else {
            req.name.as_str().into()
        };
        let id = topo.next_queue_id;
        topo.next_queue_id += 1;
        // Exclusive queues live and die with their connection: never stored.
        let durable = req.durable && !req.exclusive;
        let def = QueueDef {
            id,
            name: name.clone(),
            durable: req.durable,
            exclusive: req.exclusive,
            auto_delete: req.auto_delete,
            arguments: req.arguments,
            args: args.clone(),
            owner: req.exclusive.then_some(session.id),
        };
        // Only durable queues leave data keyed by their id behind a restart
        // (a non-durable queue's pages, transient delays and expiry entries
        // are dropped at open), so only they need the id counter stored: a
        // non-durable declare writes nothing.
        if durable {
            let counter = Op::Put(Cf::Meta, meta::NEXT_QUEUE_ID.to_vec(), topo.next_queue_id.to_be_bytes().to_vec());
            self.inner.store.write(vec![counter, def.put_op()], true).await?;
        }
        let state = QueueState::new(id, name.clone(), durable, args, self.inner.config.limits, self.inner.seqs.clone());
        let handle = task::spawn(state, def.auto_delete, self.inner.env.clone(), Vec::new());
        let entry = QueueEntry { def: Arc::new(def), handle };
        let info = queue_info(&entry);
        topo.queues.insert(name.clone(), entry);
        self.publish_snapshot(&topo, &[], &[name]);
        Ok(info)
    }

    /// Deletes a queue. `id` guards against deleting a newer queue of the
    /// same name (for deletions decided asynchronously).
    pub async fn delete_queue(&self, session: &Session, name: &str, if_unused: bool, if_empty: bool) -> Result<u64> {
        self.ensure_running()?;
        validate_name("queue", name, false)?;
        if self.cluster().is_some() && !self.inner.topo.lock().await.queues.contains_key(name) {
            self.sync_meta().await;
        }
        let quorum = {
            let topo = self.inner.topo.lock().await;
            let entry = topo.queues.get(name).ok_or_else(|| Error::not_found("queue", name))?;
            check_owner(&entry.def, session)?;
            is_quorum_id(entry.def.id).then(|| entry.handle.shared.stats())
        };
        if let (Some(stats), Some(c)) = (quorum, self.cluster()) {
            // The conditions are checked here, on this node's view; the
            // deletion itself then happens on every node.
            if if_unused && stats.consumers > 0 {
                return Err(Error::PreconditionFailed(format!("queue '{name}' is in use ({} consumer(s))", stats.consumers)));
            }
            if if_empty && stats.ready + stats.unacked > 0 {
                return Err(Error::PreconditionFailed(format!("queue '{name}' is not empty ({} message(s))", stats.ready + stats.unacked)));
            }
            let bytes = c.meta.change(MetaCmd::DeleteQueue { name: name.to_string(), if_unused: false, if_empty: false }).await?;
            return Ok(bytes.try_into().map(u64::from_be_bytes).unwrap_or(stats.ready));
        }
        self.delete_queue_if(name, None, if_unused, if_empty, "queue was deleted").await
    }

    /// `x-expires` on a quorum queue: its leader asks for the deletion
    /// once its replicas have marked the queue expired (which no consumer
    /// attaches to). Checked again here (the queue may have been replaced
    /// by another of the same name), then deleted through the metadata, on
    /// every node.
    async fn expire_quorum_queue(&self, name: &str, id: QueueId) {
        let Some(c) = self.cluster() else { return };
        let still_due = {
            let topo = self.inner.topo.lock().await;
            topo.queues.get(name).is_some_and(|e| e.def.id == id && e.handle.shared.expired())
        };
        if !still_due {
            return;
        }
        match c.meta.change(MetaCmd::DeleteQueue { name: name.to_string(), if_unused: false, if_empty: false }).await {
            Ok(_) => tracing::info!(queue = %name, "deleted quorum queue unused for its x-expires period"),
            Err(e) => {
                tracing::warn!(queue = %name, error = %e, "could not delete quorum queue unused for its x-expires period; will retry")
            }
        }
    }

    // ---------------------------------------------------------- cluster

    fn cluster(&self) -> Option<&ClusterParts> {
        self.inner.cluster.get()
    }

    /// In a cluster: waits (bounded) until this node's copy of the
    /// metadata is known current, so that a request is not answered from
    /// an empty or stale copy.
    pub async fn wait_current(&self) -> Result<()> {
        match self.cluster() {
            Some(c) => c.meta.wait_current().await,
            None => Ok(()),
        }
    }

    /// In a cluster: catches up with the metadata's latest changes (after
    /// a lookup missed: the object may have been declared through another
    /// node a moment ago). True when it waited, so a retry may find it.
    async fn sync_meta(&self) -> bool {
        match self.cluster() {
            Some(c) => {
                // Without a quorum the lookup answers from this copy.
                let _ = c.meta.barrier().await;
                true
            }
            None => false,
        }
    }

    /// [`Broker::queue_for`], after catching up with the cluster's metadata
    /// if the queue is not known here yet.
    async fn queue_for_synced(&self, session: &Session, name: &str) -> Result<QueueEntry> {
        match self.queue_for(session, name) {
            Err(Error::NotFound { .. }) if self.sync_meta().await => self.queue_for(session, name),
            other => other,
        }
    }

    /// Joins the broker to its cluster: topology changes go through the
    /// metadata group from now on; `events` are that group's changes, which
    /// this node applies in order.
    pub fn attach_cluster(&self, parts: ClusterParts, mut events: mpsc::UnboundedReceiver<MetaEvent>) {
        let weak = Arc::downgrade(&self.inner);
        let dead_letter: DeadLetterFn = Arc::new(move |data: MessageData| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(inner) = weak.upgrade() else { return false };
                let broker = Broker { inner };
                let msg = proto::Message {
                    exchange: data.exchange,
                    routing_key: data.routing_key,
                    properties: Some(data.properties),
                    body: data.body,
                    mandatory: false,
                    delay_ms: None,
                };
                let c = broker.publish_one(msg, 0).await;
                c.status != ConfirmStatus::Rejected as i32
            })
        });
        let _ = parts.replicas.dead_letter.set(dead_letter);
        let weak = Arc::downgrade(&self.inner);
        let expire: ExpireFn = Arc::new(move |name: Arc<str>, id: QueueId| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(inner) = weak.upgrade() else { return };
                Broker { inner }.expire_quorum_queue(&name, id).await;
            })
        });
        let _ = parts.replicas.expire.set(expire);
        if self.inner.cluster.set(parts).is_err() {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            let session = broker.open_session("cluster");
            while let Some(event) = events.recv().await {
                match event {
                    MetaEvent::Apply { index, cmd, queue } => {
                        let r = broker.apply_meta(&session, cmd, queue).await;
                        if let Err(e) = &r {
                            tracing::debug!(index, error = %e.message, "a metadata change did not apply on this node");
                        }
                        if let Some(c) = broker.cluster() {
                            c.meta.record(index, r);
                        }
                    }
                    MetaEvent::Resync(defs) => broker.resync(&session, defs).await,
                }
            }
        });
    }

    async fn apply_meta(&self, session: &Session, cmd: MetaCmd, queue: Option<QuorumDef>) -> std::result::Result<Vec<u8>, WireError> {
        let bad = |e: prost::DecodeError| Error::InvalidArgument(format!("a metadata entry cannot be read: {e}"));
        let r: Result<Vec<u8>> = async {
            match cmd {
                MetaCmd::DeclareExchange(b) => {
                    let req = proto::DeclareExchangeRequest::decode(b.as_slice()).map_err(bad)?;
                    Ok(self.declare_exchange_local(req).await?.encode_to_vec())
                }
                MetaCmd::DeleteExchange { name, if_unused } => self.delete_exchange_local(&name, if_unused).await.map(|_| Vec::new()),
                MetaCmd::DeclareQueue { .. } => {
                    let def = queue.ok_or_else(|| Error::InvalidArgument("a quorum queue declaration without a definition".into()))?;
                    Ok(self.create_quorum_queue(def).await?.encode_to_vec())
                }
                MetaCmd::DeleteQueue { name, .. } => {
                    let id = queue.map(|q| q.id);
                    Ok(self.delete_quorum_queue(&name, id).await?.to_be_bytes().to_vec())
                }
                MetaCmd::Bind(b) => {
                    let req = proto::BindRequest::decode(b.as_slice()).map_err(bad)?;
                    self.bind_local(session, req).await.map(|_| Vec::new())
                }
                MetaCmd::Unbind(b) => {
                    let req = proto::UnbindRequest::decode(b.as_slice()).map_err(bad)?;
                    self.unbind_local(session, req).await.map(|_| Vec::new())
                }
                MetaCmd::Barrier | MetaCmd::SetClusterId(_) => Ok(Vec::new()),
                MetaCmd::AddQueueMember { name, .. } | MetaCmd::RemoveQueueMember { name, .. } => {
                    let def = queue.ok_or_else(|| Error::not_found("queue", name))?;
                    self.create_quorum_queue(def.clone()).await?;
                    Ok(crate::raft::encode(&def.members))
                }
            }
        }
        .await;
        r.map_err(|e| WireError::from(&e))
    }

    /// Brings this node's replicated topology in line with `defs`.
    async fn resync(&self, session: &Session, defs: Definitions) {
        for req in defs.exchanges.values() {
            if let Ok(req) = proto::DeclareExchangeRequest::decode(req.as_slice())
                && let Err(e) = self.declare_exchange_local(req).await
            {
                tracing::warn!(error = %e, "could not restore an exchange from the cluster's metadata");
            }
        }
        let stale: Vec<Arc<str>> = {
            let topo = self.inner.topo.lock().await;
            topo.queues
                .values()
                .filter(|e| is_quorum_id(e.def.id) && defs.queues.get(&*e.def.name).is_none_or(|d| d.id != e.def.id))
                .map(|e| e.def.name.clone())
                .collect()
        };
        for name in stale {
            let _ = self.delete_quorum_queue(&name, None).await;
        }
        for def in defs.queues.values() {
            if let Err(e) = self.create_quorum_queue(def.clone()).await {
                tracing::warn!(error = %e, "could not restore a quorum queue from the cluster's metadata");
            }
        }
        for b in &defs.bindings {
            if let Ok(req) = proto::BindRequest::decode(b.as_slice())
                && let Err(e) = self.bind_local(session, req).await
            {
                tracing::debug!(error = %e, "could not restore a binding from the cluster's metadata");
            }
        }
    }

    /// Starts this node's part of a quorum queue (idempotent).
    async fn create_quorum_queue(&self, def: QuorumDef) -> Result<proto::QueueInfo> {
        let req = proto::DeclareQueueRequest::decode(def.request.as_slice())
            .map_err(|e| Error::InvalidArgument(format!("a quorum queue definition cannot be read: {e}")))?;
        let Some(c) = self.cluster() else { return Err(Error::Unavailable("not in a cluster".into())) };
        let mut topo = self.inner.topo.lock().await;
        if let Some(entry) = topo.queues.get(req.name.as_str()) {
            if entry.def.id == def.id {
                // Known here: bring its replica set in line (a restart or
                // a snapshot of the metadata may bring a changed one).
                let bootstrap = crate::replica::quorum::bootstrap_for(c.replicas.node(), &def.initial, def.as_formed());
                crate::replica::quorum::set_members(&c.replicas, &entry.handle, entry.def.args.clone(), &def.members, bootstrap).await?;
                return Ok(queue_info(entry));
            }
            return Err(Error::PreconditionFailed(format!(
                "queue '{}' exists on this node as a {} queue; a quorum queue of that name cannot be added here",
                req.name,
                if is_quorum_id(entry.def.id) { "different quorum" } else { "classic" }
            )));
        }
        let args = QueueArgs::parse(&req.arguments)?;
        let name: Arc<str> = req.name.as_str().into();
        let members: BTreeSet<NodeId> = def.members.iter().copied().collect();
        let bootstrap = crate::replica::quorum::bootstrap_for(c.replicas.node(), &def.initial, def.as_formed());
        let handle = crate::replica::quorum::spawn(&c.replicas, def.id, name.clone(), args.clone(), members, bootstrap).await?;
        let qdef = QueueDef {
            id: def.id,
            name: name.clone(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: req.arguments,
            args,
            owner: None,
        };
        let adoptions = self.inner.quorum_inbox.lock().remove(&def.id).unwrap_or_default();
        if !adoptions.is_empty() {
            tracing::info!(queue = %name, count = adoptions.len(), "handing dead letters left in the inbox to the quorum queue");
            let tx = handle.tx.clone();
            tokio::spawn(async move {
                for (key, message) in adoptions {
                    let cmd = QueueCmd::Adopt { inbox_key: Some(key), data: Arc::new(message.into_data()) };
                    if tx.send(cmd).await.is_err() {
                        break;
                    }
                }
            });
        }
        let entry = QueueEntry { def: Arc::new(qdef), handle };
        let info = queue_info(&entry);
        topo.queues.insert(name.clone(), entry);
        self.publish_snapshot(&topo, &[], &[name]);
        Ok(info)
    }

    /// Removes this node's part of a quorum queue: its task, its replica
    /// and its data, and the bindings to it.
    async fn delete_quorum_queue(&self, name: &str, id: Option<QueueId>) -> Result<u64> {
        let mut topo = self.inner.topo.lock().await;
        let Some(entry) = topo.queues.get(name).cloned() else { return Err(Error::not_found("queue", name)) };
        if !is_quorum_id(entry.def.id) || id.is_some_and(|id| id != entry.def.id) {
            return Err(Error::not_found("queue", name));
        }
        let count = entry.handle.shared.stats().ready;
        let (reply, rx) = oneshot::channel();
        let cmd = QueueCmd::Delete { if_unused: false, if_empty: false, reason: "queue was deleted".into(), extra_ops: Vec::new(), reply };
        if entry.handle.tx.send(cmd).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(c) = self.cluster() {
            let ranges = crate::replica::machine::queue_ranges(entry.def.id);
            if let Err(e) = c.replicas.host.delete_group(entry.def.id, ranges).await {
                tracing::debug!(queue = name, error = %e, "removing the queue's replica");
            }
            // Dead letters this node's classic queues sent it go with it.
            self.inner.quorum_inbox.lock().remove(&entry.def.id);
            let inbox = vec![Op::DeleteRange(Cf::Inbox, keys::queue_start(entry.def.id).to_vec(), keys::queue_end(entry.def.id))];
            if let Err(e) = self.inner.store.write(inbox, false).await {
                tracing::debug!(queue = name, error = %e, "removing the queue's inbox");
            }
        }
        let dest = Dest::Queue(entry.def.name.clone());
        let changed = topo.remove_bindings_to(&dest, &mut Vec::new());
        let removed = topo.queues.remove(name).map(|e| e.def.name.clone());
        self.publish_snapshot(&topo, &changed, removed.as_slice());
        self.auto_delete_exchanges_locked(&mut topo, changed).await;
        Ok(count)
    }

    /// Whether a binding request goes through the cluster's metadata: its
    /// destination is an exchange or a quorum queue.
    async fn replicated_binding(&self, kind: proto::DestinationKind, destination: &str) -> bool {
        if self.cluster().is_none() {
            return false;
        }
        if kind == proto::DestinationKind::Exchange {
            return true;
        }
        if !self.inner.topo.lock().await.queues.contains_key(destination) {
            self.sync_meta().await;
        }
        self.inner.topo.lock().await.queues.get(destination).is_some_and(|e| is_quorum_id(e.def.id))
    }

    async fn delete_queue_if(&self, name: &str, id: Option<u64>, if_unused: bool, if_empty: bool, reason: &str) -> Result<u64> {
        let mut topo = self.inner.topo.lock().await;
        let Some(entry) = topo.queues.get(name).cloned() else {
            return Err(Error::not_found("queue", name));
        };
        if id.is_some_and(|id| id != entry.def.id) {
            return Err(Error::not_found("queue", name));
        }
        // The queue's task deletes its data, its definition and the bindings
        // to it in one batch, after everything it wrote before; memory
        // changes only once that batch is durable.
        let dest = Dest::Queue(entry.def.name.clone());
        let mut ops: Vec<Op> = topo.bindings_to(&dest).map(BindingDef::delete_op).collect();
        if entry.def.durable && !entry.def.exclusive {
            ops.push(entry.def.delete_op());
        }
        let (reply, rx) = oneshot::channel();
        let cmd = QueueCmd::Delete { if_unused, if_empty, reason: reason.to_string(), extra_ops: ops, reply };
        let count = match entry.handle.tx.send(cmd).await {
            Ok(()) => rx.await.map_err(|_| Error::ShuttingDown)??,
            // The task is gone (it stopped): remove what is left.
            Err(mpsc::error::SendError(cmd)) => {
                let QueueCmd::Delete { extra_ops, .. } = cmd else { return Err(Error::ShuttingDown) };
                let mut ops = crate::queue::state::delete_queue_ops(entry.def.id);
                ops.extend(extra_ops);
                self.inner.store.write(ops, true).await?;
                0
            }
        };
        // Bindings to the queue go with it; auto-delete exchanges that lose
        // their last binding go too.
        let changed = topo.remove_bindings_to(&dest, &mut Vec::new());
        let removed = topo.queues.remove(name).map(|e| e.def.name.clone());
        self.publish_snapshot(&topo, &changed, removed.as_slice());
        self.auto_delete_exchanges_locked(&mut topo, changed).await;
        Ok(count)
    }

    /// Deletes the auto-delete exchanges among `candidates` that have no
    /// binding left, and in turn those that this leaves without one.
    async fn auto_delete_exchanges_locked(&self, topo: &mut Topology, candidates: Vec<Arc<str>>) {
        let mut work = candidates;
        while let Some(name) = work.pop() {
            let unused = topo.bindings.get(&*name).is_none_or(Vec::is_empty);
            let auto = topo.exchanges.get(&*name).is_some_and(|x| x.auto_delete && !x.builtin);
            if !(unused && auto) {
                continue;
            }
            match self.remove_exchange_locked(topo, &name).await {
                Ok(more) => {
                    tracing::info!(exchange = %name, "auto-deleted exchange after its last binding was removed");
                    work.extend(more);
                }
                Err(e) => tracing::warn!(exchange = %name, error = %e, "could not auto-delete exchange"),
            }
        }
    }

    pub async fn purge_queue(&self, session: &Session, name: &str) -> Result<u64> {
        self.ensure_running()?;
        let entry = self.queue_for_synced(session, name).await?;
        let (reply, rx) = oneshot::channel();
        entry.handle.tx.send(QueueCmd::Purge { reply }).await.map_err(|_| Error::not_found("queue", name))?;
        rx.await.map_err(|_| Error::not_found("queue", name))?
    }

    pub fn list_queues(&self) -> Vec<proto::QueueInfo> {
        let snap = self.snapshot();
        let mut out: Vec<proto::QueueInfo> = snap
            .queues
            .values()
            .map(|e| {
                let mut info = queue_info(e);
                self.fill_replicas(&mut info, e.def.id);
                info
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// A quorum queue's leader and replicas, as this node knows them.
    fn fill_replicas(&self, info: &mut proto::QueueInfo, id: QueueId) {
        let Some(c) = self.cluster() else { return };
        if !is_quorum_id(id) {
            return;
        }
        info.queue_type = "quorum".into();
        let status = c.replicas.host.status(id);
        let mut members: Vec<NodeId> = status.as_ref().map(|s| s.voters.iter().copied().collect()).unwrap_or_default();
        if members.is_empty() {
            members = c.replicas.members.read().get(&id).cloned().unwrap_or_default();
        }
        members.sort_unstable();
        info.leader = status.and_then(|s| s.leader).unwrap_or(0);
        let alive = c.replicas.host.cluster().liveness();
        let me = c.replicas.host.node_id();
        info.online = members.iter().copied().filter(|n| *n == me || alive.is_alive(*n)).collect();
        info.members = members;
    }

    /// Looks a queue up for use by `session` (exclusive queues only by their
    /// owner).
    fn queue_for(&self, session: &Session, name: &str) -> Result<QueueEntry> {
        validate_name("queue", name, false)?;
        let snap = self.snapshot();
        let entry = snap.queues.get(name).ok_or_else(|| Error::not_found("queue", name))?;
        check_owner(&entry.def, session)?;
        Ok(entry.clone())
    }

    // ------------------------------------------------------------ bindings

    /// Validates a bind / unbind request into a binding.
    fn binding_def(&self, topo: &Topology, session: &Session, req: proto::BindRequest) -> Result<BindingDef> {
        let dest_exchange = match proto::DestinationKind::try_from(req.destination_kind) {
            Ok(proto::DestinationKind::Exchange) => true,
            Ok(proto::DestinationKind::Queue | proto::DestinationKind::Unspecified) => false,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "destination_kind {} is not a destination kind (1 = queue, 2 = exchange)",
                    req.destination_kind
                )));
            }
        };
        let (source, dest, key, args) = (req.source.as_str(), req.destination.as_str(), req.routing_key.as_str(), req.arguments);
        validate_name("exchange", source, true)?;
        validate_name(if dest_exchange { "exchange" } else { "queue" }, dest, false)?;
        validate_routing_key(key)?;
        validate_binding_args(&args)?;
        if source.is_empty() {
            return Err(Error::AccessRefused(
                "the default exchange cannot be bound to or unbound from: it routes to every queue by name".into(),
            ));
        }
        let Some(source_def) = topo.exchanges.get(source) else {
            return Err(Error::not_found("exchange", source));
        };
        if source_def.kind == ExchangeKind::Topic {
            validate_topic_pattern(source, key)?;
        }
        let dest = if dest_exchange {
            if !topo.exchanges.contains_key(dest) {
                return Err(Error::not_found("exchange", dest));
            }
            Dest::Exchange(dest.into())
        } else {
            let entry = topo.queues.get(dest).ok_or_else(|| Error::not_found("queue", dest))?;
            check_owner(&entry.def, session)?;
            Dest::Queue(entry.def.name.clone())
        };
        Ok(BindingDef { source: source.into(), dest, routing_key: key.to_string(), arguments: args })
    }

    /// A binding survives a restart when both its ends do.
    fn binding_durable(topo: &Topology, b: &BindingDef) -> bool {
        let source = topo.exchanges.get(&*b.source).is_some_and(|x| x.durable);
        // Bindings to quorum queues live in the cluster's metadata.
        let dest = match &b.dest {
            Dest::Queue(q) => topo.queues.get(&**q).is_some_and(|e| e.def.durable && !e.def.exclusive && !is_quorum_id(e.def.id)),
            Dest::Exchange(x) => topo.exchanges.get(&**x).is_some_and(|x| x.durable),
        };
        source && dest
    }

    pub async fn bind(&self, session: &Session, req: proto::BindRequest) -> Result<()> {
        if self.replicated_binding(req.destination_kind(), &req.destination).await
            && let Some(c) = self.cluster()
        {
            self.ensure_running()?;
            c.meta.change(MetaCmd::Bind(req.encode_to_vec())).await?;
            return Ok(());
        }
        self.bind_local(session, req).await
    }

    async fn bind_local(&self, session: &Session, req: proto::BindRequest) -> Result<()> {
        self.ensure_running()?;
        let mut topo = self.inner.topo.lock().await;
        let b = self.binding_def(&topo, session, req)?;
        if topo.bindings.get(&*b.source).is_some_and(|l| l.contains(&b)) {
            return Ok(());
        }
        if Self::binding_durable(&topo, &b) {
            self.inner.store.write(vec![b.put_op()], true).await?;
        }
        let source = b.source.clone();
        topo.bindings.entry(source.clone()).or_default().push(b);
        self.publish_snapshot(&topo, &[source], &[]);
        Ok(())
    }

    /// Removes a binding; removing one that does not exist succeeds (the
    /// exchange and destination must exist).
    pub async fn unbind(&self, session: &Session, req: proto::UnbindRequest) -> Result<()> {
        if self.replicated_binding(req.destination_kind(), &req.destination).await
            && let Some(c) = self.cluster()
        {
            self.ensure_running()?;
            c.meta.change(MetaCmd::Unbind(req.encode_to_vec())).await?;
            return Ok(());
        }
        self.unbind_local(session, req).await
    }

    async fn unbind_local(&self, session: &Session, req: proto::UnbindRequest) -> Result<()> {
        self.ensure_running()?;
        let mut topo = self.inner.topo.lock().await;
        let b = self.binding_def(&topo, session, req.into())?;
        let Some(list) = topo.bindings.get_mut(&*b.source) else {
            return Ok(());
        };
        let Some(pos) = list.iter().position(|x| *x == b) else {
            return Ok(());
        };
        // Written first: a failed write leaves the binding in place.
        self.inner.store.write(vec![b.delete_op()], true).await?;
        let Some(list) = topo.bindings.get_mut(&*b.source) else {
            return Ok(());
        };
        list.remove(pos);
        if list.is_empty() {
            topo.bindings.remove(&*b.source);
        }
        self.publish_snapshot(&topo, std::slice::from_ref(&b.source), &[]);
        self.auto_delete_exchanges_locked(&mut topo, vec![b.source.clone()]).await;
        Ok(())
    }

    pub async fn list_bindings(&self) -> Vec<proto::BindingInfo> {
        // In a cluster: include what was changed through other nodes.
        self.sync_meta().await;
        let topo = self.inner.topo.lock().await;
        topo.all_bindings().map(BindingDef::info).collect()
    }

    // ----------------------------------------------------------- publish

    /// Routes and enqueues one message; the confirm goes to `sink`.
    pub async fn publish(&self, msg: proto::Message, seq: u64, sink: ConfirmSink) {
        self.inner.totals.published.fetch_add(1, Ordering::Relaxed);
        let delay_ms = match message_delay(&msg) {
            Ok(d) => d,
            Err(reason) => return sink.send(confirm::immediate(seq, ConfirmStatus::Rejected, reason)),
        };
        let span = crate::telemetry::route_span(&msg);
        let mut routed = self.route(&msg);
        // Nothing to route to here yet: in a cluster the exchange, queue or
        // binding may have been made through another node a moment ago.
        if (matches!(&routed, Ok((q, _)) if q.is_empty()) || routed.is_err()) && self.sync_meta().await {
            routed = self.route(&msg);
        }
        crate::telemetry::end_route(span, routed.as_ref().map_or(0, |(queues, _)| queues.len()));
        match routed {
            Err(reason) => sink.send(confirm::immediate(seq, ConfirmStatus::Rejected, reason)),
            Ok((queues, _via_alternate)) if queues.is_empty() => {
                let (status, reason) = if msg.mandatory {
                    (ConfirmStatus::Returned, format!("no queue is bound to '{}' for routing key '{}'", msg.exchange, msg.routing_key))
                } else {
                    (ConfirmStatus::Unroutable, String::new())
                };
                sink.send(confirm::immediate(seq, status, reason));
            }
            Ok((queues, _)) => {
                let tracker = ConfirmTracker::new(seq, msg.mandatory, queues.len(), sink);
                let data = Arc::new(MessageData {
                    exchange: msg.exchange,
                    routing_key: msg.routing_key,
                    properties: msg.properties.unwrap_or_default(),
                    body: msg.body,
                });
                for q in queues {
                    let cmd = QueueCmd::Enqueue { data: data.clone(), confirm: Some(tracker.clone()), delay_ms };
                    if q.tx.send(cmd).await.is_err() {
                        tracker.part_done(PartOutcome::Dropped);
                    }
                }
            }
        }
    }

    /// Publishes and waits for the confirm.
    pub async fn publish_one(&self, msg: proto::Message, seq: u64) -> proto::Confirm {
        let (tx, rx) = oneshot::channel();
        self.publish(msg, seq, ConfirmSink::Oneshot(tx)).await;
        rx.await.unwrap_or_else(|_| confirm::immediate(seq, ConfirmStatus::Rejected, "the broker stopped before confirming"))
    }

    /// The queues a message goes to (and whether an alternate exchange took
    /// it), or why it is rejected.
    fn route(&self, msg: &proto::Message) -> std::result::Result<(Vec<QueueRef>, bool), String> {
        let reject = |reason: String| reason;
        if self.is_shutting_down() {
            return Err(reject("the broker is shutting down".into()));
        }
        check_message_size(msg, &self.inner.config).map_err(reject)?;
        for (field, value) in [("exchange", &msg.exchange), ("routing_key", &msg.routing_key)] {
            if value.len() > model::MAX_NAME_BYTES {
                return Err(reject(format!("{field} is {} bytes long; the limit is {} bytes", value.len(), model::MAX_NAME_BYTES)));
            }
        }
        let snap = self.inner.snapshot.load();
        if msg.exchange.is_empty() {
            let queues = snap.queues.get(msg.routing_key.as_str()).map(|e| vec![e.handle.clone()]).unwrap_or_default();
            return Ok((queues, false));
        }
        let Some(ex) = snap.routes.exchange(&msg.exchange) else {
            return Err(reject(format!("exchange '{}' not found", msg.exchange)));
        };
        if ex.internal {
            return Err(reject(format!("exchange '{}' is internal: it cannot be published to directly", msg.exchange)));
        }
        let empty = BTreeMap::new();
        let headers = msg.properties.as_ref().map_or(&empty, |p| &p.headers);
        let routed = snap.routes.route(&msg.exchange, &msg.routing_key, headers);
        let queues = routed.queues.iter().filter_map(|q| snap.queues.get(q).map(|e| e.handle.clone())).collect();
        Ok((queues, routed.via_alternate))
    }

    // ----------------------------------------------------------- consume

    pub async fn subscribe(&self, session: &Session, sub: proto::Subscribe) -> Result<Subscription> {
        self.ensure_running()?;
        let entry = self.queue_for_synced(session, &sub.queue).await?;
        let tag: Arc<str> = if sub.consumer_tag.is_empty() {
            format!("amq.ctag-{}", random_suffix()).into()
        } else {
            validate_name("consumer tag", &sub.consumer_tag, false)?;
            sub.consumer_tag.as_str().into()
        };
        let (outbox, events) = Outbox::new();
        let (reply, rx) = oneshot::channel();
        let spec = ConsumerSpec {
            tag: tag.clone(),
            prefetch: sub.prefetch,
            auto_ack: sub.auto_ack,
            exclusive: sub.exclusive,
            priority: sub.priority,
            peer: session.peer.to_string(),
            limits: None,
        };
        entry.handle.tx.send(QueueCmd::Subscribe { spec, outbox, reply }).await.map_err(|_| Error::not_found("queue", &sub.queue))?;
        let consumer = rx.await.map_err(|_| Error::not_found("queue", &sub.queue))??;
        Ok(Subscription { queue: entry.handle, consumer, tag, events })
    }

    pub async fn get(&self, session: &Session, req: proto::GetRequest) -> Result<Vec<proto::Delivery>> {
        self.ensure_running()?;
        let entry = self.queue_for_synced(session, &req.queue).await?;
        let (reply, rx) = oneshot::channel();
        entry
            .handle
            .tx
            .send(QueueCmd::Get {
                max: req.max_messages.clamp(1, MAX_GET_MESSAGES) as usize,
                max_bytes: self.inner.config.max_reply_bytes,
                ack: req.ack,
                reply,
            })
            .await
            .map_err(|_| Error::not_found("queue", &req.queue))?;
        let out = rx.await.map_err(|_| Error::not_found("queue", &req.queue))??;
        self.inner.totals.delivered.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    pub async fn list_consumers(&self) -> Vec<proto::ConsumerInfo> {
        let snap = self.snapshot();
        let mut out = Vec::new();
        for entry in snap.queues.values() {
            if entry.handle.shared.stats().consumers == 0 {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            if entry.handle.tx.send(QueueCmd::Consumers { reply }).await.is_err() {
                continue;
            }
            if let Ok(views) = rx.await {
                out.extend(views.into_iter().map(|v| proto::ConsumerInfo {
                    queue: entry.def.name.to_string(),
                    consumer_tag: v.spec.tag.to_string(),
                    prefetch: v.spec.prefetch,
                    auto_ack: v.spec.auto_ack,
                    exclusive: v.spec.exclusive,
                    priority: v.spec.priority,
                    unacked: v.unacked,
                    peer: v.spec.peer,
                    active: v.active,
                    effective_prefetch: v.effective_prefetch,
                }));
            }
        }
        out.sort_by(|a, b| (&a.queue, &a.consumer_tag).cmp(&(&b.queue, &b.consumer_tag)));
        out
    }

    // ------------------------------------------------------------- status

    pub async fn status(&self) -> proto::StatusResponse {
        let (exchanges, bindings) = {
            let topo = self.inner.topo.lock().await;
            (topo.exchanges.len() as u64, topo.binding_count() as u64)
        };
        let snap = self.snapshot();
        let mut totals = proto::Totals {
            exchanges,
            queues: snap.queues.len() as u64,
            bindings,
            connections: self.open_sessions(),
            published: self.inner.totals.published.load(Ordering::Relaxed),
            delivered: self.inner.totals.delivered.load(Ordering::Relaxed),
            // Messages, not acknowledgement frames (one with `multiple` counts each).
            acked: crate::metrics::global().acked_total(),
            ..Default::default()
        };
        for e in snap.queues.values() {
            let s = e.handle.shared.stats();
            totals.consumers += s.consumers as u64;
            totals.messages_ready += s.ready;
            totals.messages_unacked += s.unacked;
            totals.messages_delayed += s.delayed;
        }
        proto::StatusResponse {
            node: self.inner.config.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.uptime().as_secs(),
            alarms: crate::alarms::global().active(),
            totals: Some(totals),
            data_dir: String::new(),
            grpc_addr: String::new(),
        }
    }

    // ------------------------------------------------------------ cluster

    /// The cluster as this node sees it. A single node is a cluster of one
    /// (node 0) with no replicated queues.
    pub async fn cluster_status(&self) -> proto::ClusterStatusResponse {
        let Some(c) = self.cluster() else {
            return proto::ClusterStatusResponse {
                node_id: 0,
                members: vec![proto::ClusterMember {
                    id: 0,
                    address: String::new(),
                    alive: true,
                    leaders: 0,
                    replicas: 0,
                    metadata: String::new(),
                }],
                metadata_leader: 0,
                queues: Vec::new(),
                queues_without_quorum: 0,
                cluster_id: String::new(),
                metadata_current: true,
            };
        };
        let host = &c.replicas.host;
        let me = host.node_id();
        let alive = host.cluster().liveness();
        let mut queues = Vec::new();
        let mut leaders: BTreeMap<NodeId, u32> = BTreeMap::new();
        let mut replicas: BTreeMap<NodeId, u32> = BTreeMap::new();
        let mut without_quorum = 0;
        for info in self.list_queues().into_iter().filter(|q| q.queue_type == "quorum") {
            let id = self.snapshot().queues.get(info.name.as_str()).map(|e| e.def.id).unwrap_or(0);
            let status = host.status(id);
            for m in &info.members {
                *replicas.entry(*m).or_default() += 1;
            }
            if info.leader != 0 {
                *leaders.entry(info.leader).or_default() += 1;
            }
            if info.online.len() <= info.members.len() / 2 {
                without_quorum += 1;
            }
            queues.push(proto::QueueReplicas {
                name: info.name,
                leader: info.leader,
                members: info.members,
                online: info.online,
                term: status.as_ref().map_or(0, |s| s.term),
                commit_index: status.as_ref().and_then(|s| s.committed).unwrap_or(0),
                lag: status
                    .as_ref()
                    .map(|s| {
                        s.lag
                            .iter()
                            .map(|(node, l)| proto::ReplicaLag {
                                node: *node,
                                entries: l.entries,
                                bytes: l.bytes,
                                messages: l.messages,
                                exact: l.exact,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                elections: status.as_ref().map_or(0, |s| s.elections),
                last_log_index: status.as_ref().and_then(|s| s.last_log_index).unwrap_or(0),
                snapshot_index: status.as_ref().and_then(|s| s.snapshot).unwrap_or(0),
                purged_index: status.as_ref().and_then(|s| s.purged).unwrap_or(0),
            });
        }
        let meta = host.status(crate::replica::meta::META_GROUP);
        let part = |id: &NodeId| match &meta {
            Some(m) if m.voters.contains(id) => "voter",
            Some(m) if m.learners.contains(id) => "learner",
            _ => "",
        };
        let peers = &host.cluster().config().peers;
        let unlisted = meta.iter().flat_map(|m| m.voters.iter().chain(&m.learners)).filter(|id| !peers.contains_key(id));
        let listed = peers.iter().map(|(id, addr)| (*id, addr.clone()));
        let members = listed
            .chain(unlisted.map(|id| (*id, String::new())))
            .map(|(id, address)| proto::ClusterMember {
                id,
                address,
                alive: id == me || alive.is_alive(id),
                leaders: leaders.get(&id).copied().unwrap_or(0),
                replicas: replicas.get(&id).copied().unwrap_or(0),
                metadata: part(&id).to_string(),
            })
            .collect();
        proto::ClusterStatusResponse {
            node_id: me,
            members,
            metadata_leader: host.leader(crate::replica::meta::META_GROUP).and_then(|l| l.leader).unwrap_or(0),
            queues,
            queues_without_quorum: without_quorum,
            cluster_id: c.meta.cluster_id().map(|id| format!("{id:032x}")).unwrap_or_default(),
            metadata_current: c.meta.is_current(),
        }
    }

    /// Quorum queues that would lose their majority if `node` stopped: those
    /// it holds a replica of whose other replicas that are up are not a
    /// majority.
    pub async fn quorum_critical(&self, node: u64) -> Result<Vec<String>> {
        let Some(c) = self.cluster() else { return Ok(Vec::new()) };
        if !c.nodes.contains(&node) {
            return Err(Error::InvalidArgument(format!("node {node} is not a member of the cluster ({:?})", c.nodes)));
        }
        let mut out = Vec::new();
        for info in self.list_queues().into_iter().filter(|q| q.queue_type == "quorum") {
            if !info.members.contains(&node) {
                continue;
            }
            let others_up = info.online.iter().filter(|n| **n != node).count();
            if others_up <= info.members.len() / 2 {
                out.push(info.name);
            }
        }
        Ok(out)
    }

    /// The cluster, for a replica-set change: refused on a single node.
    fn membership_cluster(&self, node: Option<u64>) -> Result<&ClusterParts> {
        let Some(c) = self.cluster() else {
            return Err(Error::PreconditionFailed(match node {
                Some(n) => format!("node {n} is not a member: this broker runs as a single node (no --peers)"),
                None => "this broker runs as a single node (no --peers): it has no quorum queues".into(),
            }));
        };
        if let Some(n) = node
            && !c.nodes.contains(&n)
        {
            return Err(Error::InvalidArgument(format!("node: {n} is not a member of the cluster (members: {:?})", c.nodes)));
        }
        Ok(c)
    }

    /// The quorum queues whose name matches `pattern` (empty: all), with
    /// their id and replica set as the metadata has it, after catching up
    /// with it.
    async fn quorum_queues_matching(&self, c: &ClusterParts, pattern: &str) -> Result<Vec<(String, QueueId, Vec<NodeId>)>> {
        let re = compile_queue_pattern(pattern)?;
        let _ = c.meta.barrier().await;
        let members = c.replicas.members.read().clone();
        let mut out: Vec<(String, QueueId, Vec<NodeId>)> = self
            .snapshot()
            .queues
            .values()
            .filter(|e| is_quorum_id(e.def.id) && re.as_ref().is_none_or(|re| re.is_match(&e.def.name)))
            .filter_map(|e| members.get(&e.def.id).map(|m| (e.def.name.to_string(), e.def.id, m.clone())))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Adds `req.node` as a replica of every matching quorum queue that
    /// lacks it: recorded in the metadata first (the node starts a replica
    /// that waits), then added to the queue's group by its leader as a
    /// learner, made a voter once it has caught up. Running it again
    /// finishes what an earlier run left undone.
    pub async fn grow_queues(&self, req: proto::GrowQueuesRequest) -> Result<proto::MembershipChangeResponse> {
        let c = self.membership_cluster(Some(req.node))?;
        if req.below as usize > c.nodes.len() {
            return Err(Error::InvalidArgument(format!(
                "below: {} is more than the cluster's {} nodes (0: every matching queue)",
                req.below,
                c.nodes.len()
            )));
        }
        let host = &c.replicas.host;
        if req.node != host.node_id() && !host.cluster().liveness().is_alive(req.node) {
            return Err(Error::Unavailable(format!("node {} is not up: a new replica must catch up from a live node", req.node)));
        }
        let _one = self.inner.membership.lock().await;
        let mut changes = Vec::new();
        for (name, id, members) in self.quorum_queues_matching(c, &req.queue_pattern).await? {
            if req.below > 0 && members.len() >= req.below as usize && !members.contains(&req.node) {
                continue;
            }
            let mut change = proto::MembershipChange { queue: name.clone(), ..Default::default() };
            let mut all = members.clone();
            if !members.contains(&req.node) {
                match c.meta.change(MetaCmd::AddQueueMember { name: name.clone(), id, node: req.node }).await {
                    Ok(_) => {
                        change.changed = true;
                        all.push(req.node);
                    }
                    Err(e) => {
                        change.error = format!("recording the new replica in the cluster's metadata: {e}");
                        change.members = members;
                        changes.push(change);
                        continue;
                    }
                }
            }
            let others: Vec<NodeId> = all.iter().copied().filter(|m| *m != req.node).collect();
            match call_members_op(host, id, &others, MembersOp::Add(req.node)).await {
                MembersReply::Done { changed, view } => {
                    change.ok = true;
                    change.changed |= changed;
                    change.members = view.voters;
                }
                MembersReply::NotLeader(_) => {
                    change.error = "the queue has no leader (no majority of its replicas up?); run grow again".into();
                    change.members = all;
                }
                MembersReply::Failed(e) => {
                    change.error = e;
                    change.members = all;
                }
            }
            changes.push(change);
        }
        Ok(proto::MembershipChangeResponse { changes })
    }

    /// Removes `req.node` from every matching quorum queue's replicas: from
    /// the queue's group first (by its leader, which hands leadership away
    /// first if it is the one removed), then from the metadata (the node
    /// stops its replica and deletes its copy, now or when it comes back).
    /// Works while the node is down. Never removes a queue's last replica.
    pub async fn shrink_queues(&self, req: proto::ShrinkQueuesRequest) -> Result<proto::MembershipChangeResponse> {
        let c = self.membership_cluster(Some(req.node))?;
        let host = &c.replicas.host;
        let _one = self.inner.membership.lock().await;
        let mut changes = Vec::new();
        for (name, id, members) in self.quorum_queues_matching(c, &req.queue_pattern).await? {
            if !members.contains(&req.node) {
                continue;
            }
            let mut change = proto::MembershipChange { queue: name.clone(), members: members.clone(), ..Default::default() };
            if members.len() == 1 {
                change.error = format!(
                    "node {} holds the queue's only replica: removing it would lose the queue (grow it onto another node first, or delete the queue)",
                    req.node
                );
                changes.push(change);
                continue;
            }
            let others: Vec<NodeId> = members.iter().copied().filter(|m| *m != req.node).collect();
            let mut targets = others.clone();
            if host.node_id() != req.node && host.cluster().liveness().is_alive(req.node) {
                // It may lead: it is asked too (and hands leadership away).
                targets.push(req.node);
            }
            match call_members_op(host, id, &targets, MembersOp::Remove(req.node)).await {
                MembersReply::Done { changed, view } => {
                    change.changed = changed;
                    change.members = view.voters;
                }
                MembersReply::NotLeader(_) => {
                    change.error = "the queue has no leader (no majority of its replicas up?); run shrink again".into();
                    changes.push(change);
                    continue;
                }
                MembersReply::Failed(e) => {
                    change.error = e;
                    changes.push(change);
                    continue;
                }
            }
            match c.meta.change(MetaCmd::RemoveQueueMember { name: name.clone(), id, node: req.node }).await {
                Ok(_) => {
                    change.ok = true;
                    change.changed = true;
                }
                Err(e) => {
                    change.error = format!("removed from the queue's group, but not yet from the cluster's metadata: {e}; run shrink again")
                }
            }
            changes.push(change);
        }
        Ok(proto::MembershipChangeResponse { changes })
    }

    /// Moves quorum queue leaderships so that every live node leads about
    /// as many (only to voters that are up and caught up).
    pub async fn rebalance_queues(&self, req: proto::RebalanceQueuesRequest) -> Result<proto::RebalanceQueuesResponse> {
        let c = self.membership_cluster(None)?;
        let host = &c.replicas.host;
        let _one = self.inner.membership.lock().await;
        let me = host.node_id();
        let alive = host.cluster().liveness();
        let live: Vec<NodeId> = c.nodes.iter().copied().filter(|n| *n == me || alive.is_alive(*n)).collect();
        let mut current = Vec::new();
        let mut ids = BTreeMap::new();
        for (name, id, members) in self.quorum_queues_matching(c, &req.queue_pattern).await? {
            let MembersReply::Done { view, .. } = call_members_op(host, id, &members, MembersOp::Status).await else { continue };
            if view.leader == 0 {
                continue;
            }
            let lag: BTreeMap<NodeId, u64> = view.lag.iter().copied().collect();
            let candidates = view
                .voters
                .iter()
                .copied()
                .filter(|v| live.contains(v) && (*v == view.leader || lag.get(v).is_some_and(|l| *l <= CAUGHT_UP_ENTRIES)))
                .collect();
            ids.insert(name.clone(), (id, view.voters.clone()));
            current.push(Leadership { queue: name, leader: view.leader, candidates });
        }
        let moves = crate::replica::rebalance::plan(&current, &live);
        let mut out = Vec::new();
        for m in moves {
            let (id, voters) = ids[&m.queue].clone();
            let mut lm = proto::LeaderMove { queue: m.queue.clone(), from: m.from, to: m.to, ok: false, error: String::new() };
            match call_members_op(host, id, &voters, MembersOp::Transfer(m.to)).await {
                MembersReply::Done { .. } => {
                    lm.ok = true;
                    if let Some(q) = current.iter_mut().find(|q| q.queue == m.queue) {
                        q.leader = m.to;
                    }
                }
                MembersReply::NotLeader(_) => lm.error = "the queue has no leader right now".into(),
                MembersReply::Failed(e) => lm.error = e,
            }
            out.push(lm);
        }
        let leaders = crate::replica::rebalance::leaders_per_node(&current, &live).into_iter().collect();
        Ok(proto::RebalanceQueuesResponse { leaders, moved: out.iter().filter(|m| m.ok).count() as u32, moves: out })
    }

    // ----------------------------------------------------------- shutdown

    /// Refuses new work from now on.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
    }

    /// Ends every subscription with `reason`; queues keep running.
    pub async fn cancel_consumers(&self, reason: &str) {
        let queues: Vec<QueueRef> = self.snapshot().queues.values().map(|e| e.handle.clone()).collect();
        for q in queues {
            let (reply, rx) = oneshot::channel();
            let cmd = QueueCmd::CancelConsumers { reason: reason.to_string(), reply };
            if q.tx.send(cmd).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Stops every queue (ending its subscriptions) and closes storage after
    /// every accepted write is applied.
    pub async fn shutdown(&self) -> Result<()> {
        self.begin_shutdown();
        let queues: Vec<QueueRef> = self.snapshot().queues.values().map(|e| e.handle.clone()).collect();
        for q in queues {
            let (reply, rx) = oneshot::channel();
            if q.tx.send(QueueCmd::Shutdown { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| Error::Store(crate::store::StoreError::Io(format!("closing storage failed: {e}"))))??;
        Ok(())
    }

    pub fn count_deliveries(&self, n: u64) {
        self.inner.totals.delivered.fetch_add(n, Ordering::Relaxed);
    }
}

/// Most messages one `Get` asks for; larger counts are served up to this.
pub const MAX_GET_MESSAGES: u32 = 10_000;

/// Checks a message against the size limits: its header count and header
/// bytes, and its total size (body plus encoded properties, headers
/// included). The error names the limit.
fn check_message_size(msg: &proto::Message, config: &BrokerConfig) -> std::result::Result<(), String> {
    use prost::Message as _;
    let empty = BTreeMap::new();
    let (properties, headers) = match &msg.properties {
        Some(p) => (p.encoded_len(), &p.headers),
        None => (0, &empty),
    };
    if headers.len() > config.max_message_headers {
        return Err(format!("message has {} headers; the limit (max_message_headers) is {}", headers.len(), config.max_message_headers));
    }
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len().saturating_add(v.encoded_len())).fold(0, usize::saturating_add);
    if header_bytes > config.max_message_header_bytes {
        return Err(format!(
            "message headers are {header_bytes} bytes; the limit (max_message_header_bytes) is {}",
            config.max_message_header_bytes
        ));
    }
    let size = msg.body.len().saturating_add(properties);
    if size > config.max_message_size {
        return Err(format!(
            "message is {size} bytes (body {}, properties {properties}); the limit (max_message_size) is {}",
            msg.body.len(),
            config.max_message_size
        ));
    }
    Ok(())
}

/// Checks a binding key of a topic exchange: at most
/// [`MAX_PATTERN_WORDS`](crate::routing::topic::MAX_PATTERN_WORDS) words.
fn validate_topic_pattern(exchange: &str, key: &str) -> Result<()> {
    let max = crate::routing::topic::MAX_PATTERN_WORDS;
    let words = key.split('.').count();
    if words > max {
        return Err(Error::InvalidArgument(format!(
            "routing_key of a binding to topic exchange '{exchange}' has {words} words; the limit is {max} words"
        )));
    }
    Ok(())
}

/// The delay a message asks for: the `delay_ms` field, else the `x-delay`
/// header (milliseconds, as RabbitMQ's delayed-message exchange reads it).
fn message_delay(msg: &proto::Message) -> std::result::Result<Option<u64>, String> {
    if msg.delay_ms.is_some() {
        return Ok(msg.delay_ms);
    }
    let Some(v) = msg.properties.as_ref().and_then(|p| p.headers.get("x-delay")) else { return Ok(None) };
    match &v.kind {
        Some(proto::value::Kind::Int(ms)) if *ms >= 0 => Ok(Some(*ms as u64)),
        Some(proto::value::Kind::String(s)) if s.parse::<u64>().is_ok() => Ok(s.parse().ok()),
        _ => Err(format!("header 'x-delay' must be a non-negative integer (milliseconds), got {}", show_value(Some(v)))),
    }
}

/// A quorum queue is durable, shared and long-lived (RabbitMQ's rules).
fn check_quorum_declare(req: &proto::DeclareQueueRequest) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::InvalidArgument(format!("queue '{}': a quorum queue (x-queue-type \"quorum\") cannot be {what}", req.name)))
    };
    if !req.durable {
        return refuse("non-durable");
    }
    if req.exclusive {
        return refuse("exclusive");
    }
    if req.auto_delete {
        return refuse("auto-delete");
    }
    Ok(())
}

/// Longest `queue_pattern` a replica-set change takes.
const MAX_QUEUE_PATTERN: usize = 1024;

/// A replica-set change's `queue_pattern` (empty: every queue), bounded in
/// length and in the size of its compiled form.
fn compile_queue_pattern(pattern: &str) -> Result<Option<regex::Regex>> {
    if pattern.is_empty() {
        return Ok(None);
    }
    if pattern.len() > MAX_QUEUE_PATTERN {
        return Err(Error::InvalidArgument(format!("queue_pattern: longer than {MAX_QUEUE_PATTERN} bytes")));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("queue_pattern: not a valid regular expression: {e}")))
}

/// Replicas of a quorum queue when `x-quorum-initial-group-size` is not given
/// (fewer in a smaller cluster).
const DEFAULT_QUORUM_SIZE: usize = 3;

/// The replicas of a new quorum queue: `size` nodes (3 by default, all of
/// them in a smaller cluster), starting at a place that depends on the
/// name, so that queues spread over the nodes.
fn choose_members(nodes: &BTreeSet<NodeId>, size: Option<u32>, name: &str) -> Vec<NodeId> {
    let all: Vec<NodeId> = nodes.iter().copied().collect();
    let n = size.map_or(DEFAULT_QUORUM_SIZE, |s| s as usize).clamp(1, all.len().max(1));
    let start = name.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize)) % all.len().max(1);
    (0..n).map(|i| all[(start + i) % all.len()]).collect()
}

fn check_owner(def: &QueueDef, session: &Session) -> Result<()> {
    match def.owner {
        Some(owner) if owner != session.id => Err(Error::AccessRefused(format!("queue '{}' is exclusive to another connection", def.name))),
        _ => Ok(()),
    }
}

fn queue_info(entry: &QueueEntry) -> proto::QueueInfo {
    let s = entry.handle.shared.stats();
    proto::QueueInfo {
        name: entry.def.name.to_string(),
        durable: entry.def.durable,
        exclusive: entry.def.exclusive,
        auto_delete: entry.def.auto_delete,
        arguments: entry.def.arguments.clone(),
        ready: s.ready,
        unacked: s.unacked,
        delayed: s.delayed,
        consumers: s.consumers,
        ready_bytes: s.ready_bytes,
        queue_type: if entry.def.args.quorum { "quorum" } else { "classic" }.to_string(),
        leader: 0,
        members: Vec::new(),
        online: Vec::new(),
    }
}

fn show_value(v: Option<&Value>) -> String {
    match v.and_then(|v| v.kind.as_ref()) {
        None => "(absent)".into(),
        Some(proto::value::Kind::String(s)) => format!("{s:?}"),
        Some(proto::value::Kind::Int(i)) => i.to_string(),
        Some(proto::value::Kind::Bool(b)) => b.to_string(),
        Some(proto::value::Kind::Double(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
    }
}

/// The first argument that differs, as (field, current, requested).
fn arguments_mismatch(current: &BTreeMap<String, Value>, requested: &BTreeMap<String, Value>) -> Option<(String, String, String)> {
    let mut names: Vec<&String> = current.keys().chain(requested.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let (a, b) = (current.get(name), requested.get(name));
        if a != b {
            return Some((format!("argument '{name}'"), show_value(a), show_value(b)));
        }
    }
    None
}

/// Queue arguments with the ones that state a default left out, so that
/// `x-queue-type: classic`, `x-single-active-consumer: false` or
/// `x-overflow: drop-head` compare equal to their absence on re-declare.
fn canonical_queue_args(args: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    use proto::value::Kind;
    args.iter()
        .filter(|(k, v)| {
            let default = match (k.as_str(), &v.kind) {
                ("x-queue-type", Some(Kind::String(s))) => s == "classic",
                ("x-single-active-consumer", Some(Kind::Bool(b))) => !b,
                ("x-overflow", Some(Kind::String(s))) => s == "drop-head",
                _ => false,
            };
            !default
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What recovery reads before the queues start.
struct Recovered {
    topo: Topology,
    queues: Vec<QueueDef>,
    counters: HashMap<u64, QueueCounters>,
    /// Deduplication windows by queue: (message id, window end).
    dedup: HashMap<u64, Vec<(String, u64)>>,
    /// Dead-lettered messages a crash left in inboxes, by target queue.
    inbox: HashMap<u64, Vec<(Vec<u8>, StoredMessage)>>,
    max_inbox_seq: u64,
    /// Writes that remove leftovers of queues that no longer exist.
    garbage: Vec<Op>,
}

/// Reads the metadata and queue counters.
fn load(engine: &dyn crate::store::Engine) -> Result<Recovered> {
    let mut topo = Topology::default();
    let (from, to) = meta::range(meta::EXCHANGE);
    for (_, v) in engine.scan(Cf::Meta, &from, &to, usize::MAX)? {
        let def = ExchangeDef::decode(&v)?;
        topo.exchanges.insert(def.name.clone(), def);
    }
    topo.add_builtins();
    let mut queue_defs = Vec::new();
    let (from, to) = meta::range(meta::QUEUE);
    for (_, v) in engine.scan(Cf::Meta, &from, &to, usize::MAX)? {
        queue_defs.push(QueueDef::decode(&v)?);
    }
    let (from, to) = meta::range(meta::BINDING);
    for (_, v) in engine.scan(Cf::Meta, &from, &to, usize::MAX)? {
        let b = BindingDef::decode(&v)?;
        topo.bindings.entry(b.source.clone()).or_default().push(b);
    }
    topo.next_queue_id = match engine.get(Cf::Meta, meta::NEXT_QUEUE_ID)? {
        Some(v) => u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| Error::Store(crate::store::StoreError::Corrupt { cf: "meta", detail: "queue id counter".into() }))?,
        ),
        None => 1,
    };
    let mut counters = HashMap::new();
    for (k, v) in engine.scan(Cf::QueueState, &[], &[0xff; 9], usize::MAX)? {
        if let (Some(id), Some(c)) = (keys::decode_queue_state(&k), QueueCounters::decode(&v)) {
            counters.insert(id, c);
        }
    }
    for def in &queue_defs {
        topo.next_queue_id = topo.next_queue_id.max(def.id + 1);
    }
    let known: std::collections::HashSet<u64> = queue_defs.iter().map(|d| d.id).collect();
    let now = model::now_ms();
    let mut dedup: HashMap<u64, Vec<(String, u64)>> = HashMap::new();
    let mut garbage = Vec::new();
    for (k, v) in engine.scan(Cf::Dedup, &[], &[0xff; 9], usize::MAX)? {
        let until = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).unwrap_or(0);
        match keys::decode_dedup(&k) {
            // A quorum queue's window is its replicated state's, restored
            // and pruned by its state machine (and by every replica alike):
            // not this node's to collect.
            Some((queue, _)) if crate::replica::meta::is_quorum_id(queue) => {}
            Some((queue, id)) if known.contains(&queue) && until > now => dedup.entry(queue).or_default().push((id, until)),
            _ => garbage.push(Op::Delete(Cf::Dedup, k)),
        }
    }
    let mut inbox: HashMap<u64, Vec<(Vec<u8>, StoredMessage)>> = HashMap::new();
    let mut max_inbox_seq = 0;
    for (queue, k, message) in crate::queue::read::read_inboxes(engine)? {
        max_inbox_seq = max_inbox_seq.max(keys::decode_inbox(&k).map_or(0, |(_, seq)| seq));
        // A quorum queue's records wait for its replica to start here.
        if known.contains(&queue) || crate::replica::meta::is_quorum_id(queue) {
            inbox.entry(queue).or_default().push((k, message));
        } else {
            garbage.push(Op::Delete(Cf::Inbox, k));
        }
    }
    Ok(Recovered { topo, queues: queue_defs, counters, dedup, inbox, max_inbox_seq, garbage })
}
