//! A quorum queue on one node: the task behind its [`QueueRef`].
//!
//! The broker talks to a quorum queue exactly as to a classic one (the same
//! [`QueueCmd`]s on the same kind of handle). The task turns commands into
//! entries of the queue's Raft group:
//!
//! - on the group's **leader** it proposes them, many commands to an entry
//!   (what arrives while one entry commits goes into the next: group
//!   commit), one entry in flight, so commands apply in arrival order;
//!   confirms, replies and deliveries follow from what applying returns.
//! - on any other node it **forwards**: publishes, gets and purges as calls
//!   to the leader, consumers as a stream from the leader (deliveries one
//!   way, acknowledgements the other). The client never needs to know
//!   where the leader is.
//!
//! Consumers live on the leader: when leadership moves, every consumer of
//! the queue is cancelled (its client subscribes again, on any node) and the
//! new leader's first entry returns their unacknowledged messages.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use warren_client::proto;

use super::machine::{self, QueueReply, ReplicaEvent};
use super::ops::{self, QueueEntry, QueueOp};
use crate::cluster::{CallError, Duplex};
use crate::confirm::{ConfirmTracker, PartOutcome};
use crate::error::{Error, WireError};
use crate::model::{MessageData, QueueArgs};
use crate::queue::state::{ConsumerId, ConsumerLimits, ConsumerSpec, ConsumerView, EnqueueOutcome, Limits, OutDelivery};
use crate::queue::{ConsumerEvent, Outbox, QueueCmd, QueueRef, QueueShared};
use crate::raft::{Bootstrap, LeaderInfo, NodeId, ProposeError, RaftHost};
use crate::store::keys::QueueId;

/// The call that carries a queue command to the leader.
pub const QQ_OP: &str = "qq.op";
/// The stream of a consumer attached through another node.
pub const QQ_CONSUME: &str = "qq.consume";
/// The call that changes a queue group's membership or leadership on its
/// leader (or reads its state there).
pub const QQ_MEMBERS: &str = "qq.members";

/// Most commands in one entry.
const MAX_BATCH_COMMANDS: usize = 4096;
/// Most message bytes in one entry (a bigger single message goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Commands waiting for the entry in flight, beyond which the task stops
/// reading its channel (publishers wait: back-pressure, not memory).
const MAX_PENDING_COMMANDS: usize = 16_384;
/// Hops a consumer's subscribe may take to find the leader.
const MAX_HOPS: u8 = 3;
/// How long a forwarded command keeps looking for the leader (an election
/// takes 1-2 s).
const FORWARD_PATIENCE: Duration = Duration::from_secs(10);
/// How long one forwarded attempt may take before another replica is tried
/// (a leader behind a partition does not answer at all).
const FORWARD_ATTEMPT: Duration = Duration::from_secs(3);
/// How often a leader looks for expired and due messages.
const TICK: Duration = Duration::from_millis(500);
/// How long a forwarded call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new replica may take to catch up (from the log, or a
/// snapshot) before it is made a voter; beyond it, it stays a learner
/// and the change is reported as unfinished (running it again finishes it).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a leadership transfer may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a membership call keeps looking for the leader.
const MEMBERS_PATIENCE: Duration = Duration::from_secs(20);
/// A follower this many entries behind the leader or fewer counts as
/// caught up (for a leadership transfer).
pub const CAUGHT_UP_ENTRIES: u64 = 64;

/// Routes a dead-lettered message like a publish; true once every target
/// queue has it.
pub type DeadLetterFn = Arc<dyn Fn(MessageData) -> BoxFuture<'static, bool> + Send + Sync>;

/// Deletes quorum queue `name` (id `id`) through the metadata if it is
/// still marked expired (`x-expires`).
pub type ExpireFn = Arc<dyn Fn(Arc<str>, QueueId) -> BoxFuture<'static, ()> + Send + Sync>;

/// How long a leader waits before proposing `Expire` again, or asking
/// again to delete an expired queue (the first attempt failed, e.g. no
/// metadata majority).
const EXPIRE_RETRY: Duration = Duration::from_secs(5);

/// Where a leader is in expiring a queue (`x-expires`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpireStep {
    /// Unused past its period, which ended at `at`: propose `Expire`.
    Propose { at: u64 },
    /// Marked expired: have it deleted.
    Delete,
}

/// What every quorum queue on a node shares.
pub struct ReplicaCtx {
    pub host: RaftHost,
    pub limits: Limits,
    /// The queue handles on this node by id, for calls from other nodes.
    pub queues: parking_lot::RwLock<HashMap<QueueId, QueueRef>>,
    /// Each quorum queue's replicas, as defined.
    pub members: parking_lot::RwLock<HashMap<QueueId, Vec<NodeId>>>,
    pub dead_letter: std::sync::OnceLock<DeadLetterFn>,
    pub expire: std::sync::OnceLock<ExpireFn>,
}

impl ReplicaCtx {
    pub fn new(host: RaftHost, limits: Limits) -> Arc<ReplicaCtx> {
        let ctx = Arc::new(ReplicaCtx {
            host,
            limits,
            queues: Default::default(),
            members: Default::default(),
            dead_letter: Default::default(),
            expire: Default::default(),
        });
        let weak = Arc::downgrade(&ctx);
        ctx.host.cluster().register_call(
            QQ_OP,
            Arc::new(move |from, body| {
                let weak = weak.clone();
                Box::pin(async move { handle_op(weak, from, body).await })
            }),
        );
        let weak = Arc::downgrade(&ctx);
        ctx.host.cluster().register_call(
            QQ_MEMBERS,
            Arc::new(move |_from, body| {
                let weak = weak.clone();
                Box::pin(async move {
                    let call: MembersCall = crate::raft::decode(&body)?;
                    let ctx = weak.upgrade().ok_or("the node is stopping")?;
                    let host = ctx.host.clone();
                    drop(ctx);
                    Ok(enc(&leader_members_op(&host, call.queue, call.op).await))
                })
            }),
        );
        let weak = Arc::downgrade(&ctx);
        ctx.host.cluster().register_stream(
            QQ_CONSUME,
            Arc::new(move |from, duplex| {
                let weak = weak.clone();
                Box::pin(async move { serve_consumer(weak, from, duplex).await })
            }),
        );
        ctx
    }

    pub fn node(&self) -> NodeId {
        self.host.node_id()
    }

    fn queue(&self, id: QueueId) -> Option<QueueRef> {
        self.queues.read().get(&id).cloned()
    }
}

/// A command from another node, or from a helper task of this queue.
#[allow(clippy::large_enum_variant)] // boxed in `QueueCmd`
pub enum RemoteCmd {
    /// Apply `op` if this node leads; the reply goes back to the caller.
    Op { op: QueueOp, reply: oneshot::Sender<WireReply> },
    /// A dead letter reached its targets: drop it from the outbox.
    DeadLettered(u64),
    /// A consumer attached through a stream from the leader.
    Consumer { consumer: ConsumerId, spec: ConsumerSpec, tx: mpsc::Sender<Bytes>, done: oneshot::Sender<()> },
    /// The queue's replica set changed in the metadata.
    Members { members: Vec<NodeId>, replica: ReplicaChange, done: oneshot::Sender<()> },
    /// A dead letter from a classic queue on this node, in this node's
    /// inbox under `key`: proposed again after a failed attempt.
    Adopt(Adoption),
    /// The dead letters a new leader found in the outbox (read in `term`).
    Outbox { term: u64, letters: Vec<(u64, MessageData)> },
}

/// A persistent message dead-lettered into a quorum queue by a classic
/// queue of this node: the source wrote it to this node's inbox (`key`) in
/// the batch that removed it, so it stays there until the quorum queue has
/// committed it; then the record goes. A failed proposal is tried again
/// (with backoff, `MAX_ADOPT_ATTEMPTS` times; after that, or if the node
/// stops first, the record is handed over again when the node starts).
/// At least once: a crash between the commit and the record's deletion
/// adopts it twice.
pub struct Adoption {
    key: Vec<u8>,
    data: Arc<MessageData>,
    attempt: u32,
}

/// Attempts to have a quorum queue adopt one dead letter (about 10 minutes
/// with the backoff).
const MAX_ADOPT_ATTEMPTS: u32 = 600;

/// What a replica-set change means for this node's replica.
pub enum ReplicaChange {
    Keep,
    /// This node now holds a replica: its events and leadership.
    Joined {
        events: mpsc::UnboundedReceiver<ReplicaEvent>,
        leader: watch::Receiver<LeaderInfo>,
    },
    /// This node no longer holds one.
    Left,
}

/// A command's reply as it crosses between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireReply {
    /// Per message: `None` enqueued, `Some(None)` a duplicate, `Some(reason)`
    /// refused.
    Enqueued(Vec<WireOutcome>),
    Done(Result<(), WireError>),
    /// Encoded `proto::Delivery`s.
    Got(Vec<Vec<u8>>),
    Purged(u64),
    /// This node does not lead the queue; the leader it knows of.
    NotLeader(Option<NodeId>),
    /// The queue could not take the command (no quorum, stopping).
    Unavailable(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum WireOutcome {
    Enqueued,
    Duplicate,
    Rejected(String),
}

#[derive(Serialize, Deserialize)]
struct OpCall {
    queue: QueueId,
    hops: u8,
    /// A prost `QueueEntry`.
    entry: Vec<u8>,
}

/// Frames of a consumer stream, from the consumer's node.
#[derive(Serialize, Deserialize)]
enum ToLeader {
    Subscribe { queue: QueueId, tag: String, prefetch: u32, auto_ack: bool, exclusive: bool, priority: i32, peer: String },
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool, requeue: bool },
    Qos { prefetch: u32 },
}

/// Frames of a consumer stream, from the leader.
#[derive(Serialize, Deserialize)]
enum FromLeader {
    Subscribed(Result<ConsumerId, WireError>),
    /// An encoded `proto::Delivery` and its memory size.
    Delivery(Vec<u8>, u64),
    Cancelled(String),
    Failed(WireError),
}

fn enc<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(crate::raft::encode(v))
}

/// How a replica that has never run joins its group: a node of the set
/// the group was formed with forms it (as every other node of that set
/// does) while the set is unchanged; any other (added later, or its copy
/// lost after the set changed) waits for the leader to add it.
pub fn bootstrap_for(node: NodeId, initial: &[NodeId], as_formed: bool) -> Bootstrap {
    if as_formed && initial.contains(&node) { Bootstrap::Members(initial.iter().copied().collect()) } else { Bootstrap::Join }
}

/// Starts a node's part of a quorum queue: its replica when this node is
/// among `members`, and the task behind the returned handle. (A node
/// removed while it was down starts its replica from its older metadata
/// and deletes it when it applies the removal: never on the word of
/// metadata that may be older than its replica's state.)
pub async fn spawn(
    ctx: &Arc<ReplicaCtx>,
    id: QueueId,
    name: Arc<str>,
    args: QueueArgs,
    members: BTreeSet<NodeId>,
    bootstrap: Bootstrap,
) -> Result<QueueRef, Error> {
    let shared = Arc::new(QueueShared::default());
    let member = members.contains(&ctx.node());
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    if member && !ctx.host.groups().contains(&id) {
        let fresh = !ctx.host.has_state(id);
        let forms = matches!(bootstrap, Bootstrap::Members(_));
        let m = machine::machine(id, name.clone(), args.clone(), ctx.limits, events_tx, shared.clone());
        match ctx.host.start_group(id, Box::new(m), bootstrap).await {
            Ok(()) | Err(crate::raft::GroupError::AlreadyRunning(_)) => {}
            Err(e) => return Err(Error::Unavailable(format!("cannot start the replica of queue '{name}': {e}"))),
        }
        // A new queue's first replica stands for election at once rather
        // than after an election timeout: the queue takes publishes sooner,
        // and leaders spread as the first replicas do.
        if fresh && forms && members.first() == Some(&ctx.node()) {
            let host = ctx.host.clone();
            tokio::spawn(async move {
                let _ = host.elect(id).await;
            });
        }
    }
    let (tx, rx) = mpsc::channel(1024);
    let handle = QueueRef { id, name: name.clone(), tx: tx.clone(), shared };
    ctx.queues.write().insert(id, handle.clone());
    ctx.members.write().insert(id, members.iter().copied().collect());
    let leader = if member { ctx.host.watch_leader(id) } else { None };
    let task = Task {
        ctx: Arc::downgrade(ctx),
        host: ctx.host.clone(),
        node: ctx.node(),
        id,
        name,
        members: members.into_iter().collect(),
        rx,
        me: tx.downgrade(),
        events: member.then_some(events_rx),
        leader,
        leading_term: None,
        pending: VecDeque::new(),
        inflight: None,
        inflight_forward: None,
        backoff: None,
        consumers: HashMap::new(),
        early: HashMap::new(),
        remote: HashMap::new(),
        fwd_next: 0,
        dead_letters_sent: BTreeSet::new(),
        dead_letter_tx: None,
        settle: HashMap::new(),
        stopping: false,
        shared: handle.shared.clone(),
        expires: args.expires_ms.is_some(),
        expire_asked: None,
    };
    tokio::spawn(task.run());
    Ok(handle)
}

/// Who waits for a proposed command.
enum Waiter {
    None,
    /// Publishes: one tracker per message of the `Enqueue`.
    Confirms(Vec<Option<Arc<ConfirmTracker>>>),
    Subscribe {
        tag: Arc<str>,
        spec: ConsumerSpec,
        outbox: Arc<Outbox>,
        reply: oneshot::Sender<crate::error::Result<ConsumerId>>,
    },
    Get {
        reply: oneshot::Sender<crate::error::Result<Vec<proto::Delivery>>>,
    },
    Purge {
        reply: oneshot::Sender<crate::error::Result<u64>>,
    },
    Remote(oneshot::Sender<WireReply>),
    /// A dead letter from this node's inbox (see [`Adoption`]).
    Adopted {
        adoption: Adoption,
        me: mpsc::WeakSender<QueueCmd>,
        store: crate::store::Store,
    },
}

impl Adoption {
    /// The adoption went through: its inbox record goes.
    fn done(self, store: crate::store::Store) {
        tokio::spawn(async move {
            let delete = vec![crate::store::Op::Delete(crate::store::Cf::Inbox, self.key)];
            if let Err(e) = store.write(delete, false).await {
                tracing::warn!(error = %e, "cannot delete an adopted dead letter from the inbox (adopted again at the next start)");
            }
        });
    }

    /// The adoption failed: again after a backoff.
    fn again(self, me: mpsc::WeakSender<QueueCmd>, reason: &str) {
        let attempt = self.attempt.saturating_add(1);
        if attempt >= MAX_ADOPT_ATTEMPTS {
            tracing::error!(
                reason,
                attempts = attempt,
                "a dead letter could not be handed to its quorum queue; it stays in the inbox until the node starts again"
            );
            return;
        }
        tracing::debug!(reason, attempt, "a dead letter was not adopted yet; trying again");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50u64.saturating_mul(u64::from(attempt.min(20))))).await;
            if let Some(me) = me.upgrade() {
                let _ = me.send(QueueCmd::Remote(Box::new(RemoteCmd::Adopt(Adoption { attempt, ..self })))).await;
            }
        });
    }
}

struct LocalConsumer {
    tag: Arc<str>,
    spec: ConsumerSpec,
    outbox: Arc<Outbox>,
    unacked: u64,
}

struct RemoteConsumer {
    spec: ConsumerSpec,
    tx: mpsc::Sender<Bytes>,
}

/// The one entry in flight: proposed here, or forwarded to the leader.
#[allow(clippy::large_enum_variant)] // one per queue, in flight
enum Done {
    Proposed(Vec<Waiter>, Result<QueueReply, String>),
    /// Nothing was appended (Raft does not take writes here yet, or any
    /// more): the commands go back to the head of the queue.
    NotAppended(Vec<(QueueOp, Waiter)>),
    /// The command (to propose here if this node took over meanwhile), who
    /// waits for it, and the leader's answer.
    Forwarded(QueueOp, Waiter, Result<WireReply, String>),
}

type Inflight = BoxFuture<'static, Done>;

struct Task {
    ctx: Weak<ReplicaCtx>,
    host: RaftHost,
    node: NodeId,
    id: QueueId,
    name: Arc<str>,
    members: Vec<NodeId>,
    rx: mpsc::Receiver<QueueCmd>,
    me: mpsc::WeakSender<QueueCmd>,
    events: Option<mpsc::UnboundedReceiver<ReplicaEvent>>,
    leader: Option<watch::Receiver<LeaderInfo>>,
    /// The term this node leads in (its consumers belong to it).
    leading_term: Option<u64>,
    pending: VecDeque<(QueueOp, Waiter)>,
    inflight: Option<Inflight>,
    /// The leader the entry in flight was forwarded to, when it was sent
    /// to a known leader (not proposed here, not while looking for one).
    inflight_forward: Option<NodeId>,
    /// A pause before proposing again.
    backoff: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    consumers: HashMap<ConsumerId, LocalConsumer>,
    /// Deliveries applied before their consumer's subscribe reply came.
    early: HashMap<ConsumerId, Vec<OutDelivery>>,
    remote: HashMap<ConsumerId, RemoteConsumer>,
    /// Which member to try next when the leader is unknown.
    fwd_next: usize,
    dead_letters_sent: BTreeSet<u64>,
    /// The worker that routes this queue's dead letters, in order.
    dead_letter_tx: Option<mpsc::UnboundedSender<(u64, MessageData)>>,
    /// Deliveries to auto-ack consumers handed to their stream, to settle.
    settle: HashMap<ConsumerId, Vec<u64>>,
    stopping: bool,
    /// The queue's figures and next timer deadline, as its machine
    /// publishes them.
    shared: Arc<QueueShared>,
    /// The queue has `x-expires`: a declare is a use, proposed as `Touch`.
    expires: bool,
    /// What this node, leading, last did to expire the queue (`x-expires`),
    /// and when.
    expire_asked: Option<(ExpireStep, tokio::time::Instant)>,
}

impl Task {
    fn leader_info(&self) -> LeaderInfo {
        self.leader.as_ref().map(|l| *l.borrow()).unwrap_or_default()
    }

    fn is_leader(&self) -> bool {
        self.leading_term.is_some()
    }

    /// Where to forward: the leader as known here, else the members in turn.
    fn forward_target(&mut self) -> Option<NodeId> {
        if let Some(l) = self.leader_info().leader.filter(|l| *l != self.node) {
            return Some(l);
        }
        let others: Vec<NodeId> = self.members.iter().copied().filter(|m| *m != self.node).collect();
        if others.is_empty() {
            return None;
        }
        self.fwd_next = (self.fwd_next + 1) % others.len();
        Some(others[self.fwd_next])
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.on_leader_change();
        loop {
            let room = self.pending.len() < MAX_PENDING_COMMANDS;
            tokio::select! {
                cmd = self.rx.recv(), if room => match cmd {
                    Some(cmd) => {
                        if !self.command(cmd) {
                            break;
                        }
                        // Take what else is waiting before proposing.
                        while self.pending.len() < MAX_PENDING_COMMANDS {
                            match self.rx.try_recv() {
                                Ok(cmd) => if !self.command(cmd) { return self.stop("the queue stopped") },
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                Some(event) = recv_event(&mut self.events) => self.event(event),
                changed = changed(&mut self.leader) => {
                    if changed { self.on_leader_change() } else { self.leader = None }
                }
                done = poll_inflight(&mut self.inflight) => self.finished(done),
                _ = wait_backoff(&mut self.backoff) => self.backoff = None,
                // Only a leader with a timer due some day looks: an idle
                // queue's task does not wake at all.
                _ = tick.tick(), if self.is_leader() && (self.shared.deadline().is_some() || self.shared.expires_at().is_some()) => self.on_tick(),
            }
            self.flush_settles();
            self.propose_next();
        }
        self.stop("the queue stopped");
    }

    fn stop(&mut self, reason: &str) {
        self.cancel_all(reason);
        if let Some(ctx) = self.ctx.upgrade() {
            ctx.queues.write().remove(&self.id);
            ctx.members.write().remove(&self.id);
        }
    }

    fn on_leader_change(&mut self) {
        let info = self.leader_info();
        if let Some(to) = self.inflight_forward
            && self.inflight.is_some()
            && info.leader.is_some_and(|l| l != to)
        {
            // A command forwarded to a leader that is no longer one may never
            // be answered (a partition): give it up. Its waiter learns that
            // the outcome is unknown (the publish is rejected and
            // republished); the commands behind it go to the new leader.
            self.inflight = None;
            self.inflight_forward = None;
        }
        let leads = info.leader == Some(self.node);
        match (self.leading_term, leads) {
            (Some(t), true) if t == info.term => {}
            (prev, true) => {
                if prev.is_some() {
                    self.cancel_all("the queue's leader changed; subscribe again");
                }
                tracing::info!(queue = %self.name, node = self.node, term = info.term, "this node leads the queue");
                self.leading_term = Some(info.term);
                // Consumers of the previous leader are gone with it: their
                // messages return to the queue before anything else.
                self.pending.push_front((QueueOp::DropConsumers(ops::Empty {}), Waiter::None));
                self.dead_letters_sent.clear();
                self.dead_letter_tx = None;
                self.resend_dead_letters();
            }
            (Some(_), false) => {
                tracing::info!(queue = %self.name, node = self.node, leader = ?info.leader, "this node no longer leads the queue");
                self.leading_term = None;
                self.cancel_all("the queue's leader moved to another node; subscribe again");
                // Commands waiting to be proposed go to the new leader,
                // except those of this node's consumers, which are gone.
                self.pending.retain(|(op, _)| {
                    !matches!(
                        op,
                        QueueOp::Ack(_)
                            | QueueOp::Nack(_)
                            | QueueOp::Qos(_)
                            | QueueOp::Settle(_)
                            | QueueOp::Unsubscribe(_)
                            | QueueOp::DropConsumers(_)
                            | QueueOp::Tick(_)
                            | QueueOp::Expire(_)
                    )
                });
            }
            (None, false) => {}
        }
    }

    /// Ends every subscription on this node.
    fn cancel_all(&mut self, reason: &str) {
        for (_, c) in self.consumers.drain() {
            c.outbox.send(ConsumerEvent::Cancelled(reason.to_string()));
        }
        self.early.clear();
        self.settle.clear();
        // Dropping a remote consumer's sender ends its stream; the node
        // that serves it cancels its client.
        self.remote.clear();
    }

    /// Takes one command; false to stop the task.
    fn command(&mut self, cmd: QueueCmd) -> bool {
        match cmd {
            QueueCmd::Enqueue { data, confirm, delay_ms } => {
                let publish = ops::Publish::from_data(&data, delay_ms);
                self.submit(QueueOp::Enqueue(ops::Enqueue { messages: vec![publish] }), Waiter::Confirms(vec![confirm]));
            }
            QueueCmd::Adopt { data, inbox_key: Some(key) } => self.adopt(Adoption { key, data, attempt: 0 }),
            QueueCmd::Adopt { data, inbox_key: None } => {
                self.submit(QueueOp::Adopt(ops::Publish::from_data(&data, None)), Waiter::None);
            }
            QueueCmd::Subscribe { spec, outbox, reply } => self.subscribe(spec, outbox, reply),
            QueueCmd::Ack { consumer, tag, multiple } => {
                self.settle_cmd(consumer, QueueOp::Ack(ops::Settle { consumer, tag, multiple }), ToLeader::Ack { tag, multiple })
            }
            QueueCmd::Nack { consumer, tag, multiple, requeue } => self.settle_cmd(
                consumer,
                QueueOp::Nack(ops::Nack { consumer, tag, multiple, requeue }),
                ToLeader::Nack { tag, multiple, requeue },
            ),
            QueueCmd::Qos { consumer, prefetch } => {
                self.settle_cmd(consumer, QueueOp::Qos(ops::Qos { consumer, prefetch }), ToLeader::Qos { prefetch })
            }
            QueueCmd::Unsubscribe { consumer } => {
                if self.remote.remove(&consumer).is_some() {
                    // Dropping the stream's sender unsubscribes on the leader.
                } else if self.consumers.remove(&consumer).is_some() {
                    self.early.remove(&consumer);
                    self.settle.remove(&consumer);
                    self.submit(QueueOp::Unsubscribe(ops::ConsumerRef { consumer }), Waiter::None);
                }
            }
            QueueCmd::Get { max, max_bytes, ack, reply } => {
                let op = QueueOp::Get(ops::Get { max: max.min(u32::MAX as usize) as u32, max_bytes, ack });
                self.submit(op, Waiter::Get { reply });
            }
            QueueCmd::Purge { reply } => self.submit(QueueOp::Purge(ops::Empty {}), Waiter::Purge { reply }),
            QueueCmd::Delete { reply, .. } => {
                // Quorum queues are deleted through the cluster's metadata
                // (every node stops its part); this is its last step here.
                let _ = reply.send(Ok(self.ctx_stats_ready()));
                self.stopping = true;
                return false;
            }
            QueueCmd::Consumers { reply } => {
                let mut views: Vec<ConsumerView> = self
                    .consumers
                    .iter()
                    .map(|(id, c)| ConsumerView {
                        id: *id,
                        spec: c.spec.clone(),
                        unacked: c.unacked,
                        effective_prefetch: effective_prefetch(&c.spec, &self.ctx_limits()),
                        active: true,
                    })
                    .collect();
                views.extend(self.remote.iter().map(|(id, c)| ConsumerView {
                    id: *id,
                    spec: c.spec.clone(),
                    unacked: 0,
                    effective_prefetch: effective_prefetch(&c.spec, &self.ctx_limits()),
                    active: true,
                }));
                let _ = reply.send(views);
            }
            QueueCmd::CancelConsumers { reason, reply } => {
                let ids: Vec<ConsumerId> = self.consumers.keys().copied().collect();
                self.cancel_all(&reason);
                for consumer in ids {
                    self.submit(QueueOp::Unsubscribe(ops::ConsumerRef { consumer }), Waiter::None);
                }
                let _ = reply.send(());
            }
            QueueCmd::Shutdown { reply } => {
                self.cancel_all("the broker is shutting down");
                let _ = reply.send(());
                return false;
            }
            // A declare uses the queue: at the entry's time, on every
            // replica, so that the x-expires clock survives a new leader.
            QueueCmd::Touch if self.expires => self.submit(QueueOp::Touch(ops::Empty {}), Waiter::None),
            QueueCmd::Touch | QueueCmd::Tick | QueueCmd::Writable { .. } | QueueCmd::TimerDone { .. } | QueueCmd::Refilled { .. } => {}
            QueueCmd::Remote(remote) => self.remote_cmd(*remote),
            #[cfg(test)]
            QueueCmd::Crash => {}
        }
        true
    }

    fn remote_cmd(&mut self, cmd: RemoteCmd) {
        match cmd {
            RemoteCmd::Op { op, reply } => {
                if self.is_leader() {
                    self.pending.push_back((op, Waiter::Remote(reply)));
                } else {
                    let _ = reply.send(WireReply::NotLeader(self.leader_info().leader));
                }
            }
            RemoteCmd::Consumer { consumer, spec, tx, done } => {
                self.remote.insert(consumer, RemoteConsumer { spec, tx });
                let _ = done.send(());
            }
            RemoteCmd::Adopt(adoption) => self.adopt(adoption),
            RemoteCmd::DeadLettered(seq) => {
                self.submit(QueueOp::DeadLettered(ops::DeadLettered { seqs: vec![seq] }), Waiter::None);
            }
            RemoteCmd::Outbox { term, letters } => {
                // Only the leadership that asked sends them (each once).
                if self.leading_term == Some(term) {
                    for (seq, data) in letters {
                        self.send_dead_letter(seq, data);
                    }
                }
            }
            RemoteCmd::Members { members, replica, done } => {
                self.members = members;
                match replica {
                    ReplicaChange::Keep => {}
                    ReplicaChange::Joined { events, leader } => {
                        self.events = Some(events);
                        self.leader = Some(leader);
                        self.on_leader_change();
                    }
                    ReplicaChange::Left => {
                        self.events = None;
                        self.leader = None;
                        // No leader known here any more: consumers of this
                        // node's leadership end, commands go to the others.
                        self.on_leader_change();
                    }
                }
                let _ = done.send(());
            }
        }
    }

    /// Proposes a dead letter from this node's inbox (see [`Adoption`]).
    fn adopt(&mut self, adoption: Adoption) {
        let op = QueueOp::Adopt(ops::Publish::from_data(&adoption.data, None));
        self.submit(op, Waiter::Adopted { adoption, me: self.me.clone(), store: self.host.store().clone() });
    }

    fn ctx_limits(&self) -> Limits {
        self.ctx.upgrade().map(|c| c.limits).unwrap_or_default()
    }

    fn ctx_stats_ready(&self) -> u64 {
        self.ctx.upgrade().and_then(|c| c.queue(self.id)).map(|q| q.shared.stats().ready).unwrap_or(0)
    }

    /// Queues a command: proposed here if this node leads, forwarded to
    /// the leader otherwise, in arrival order either way.
    fn submit(&mut self, op: QueueOp, waiter: Waiter) {
        self.pending.push_back((op, waiter));
    }

    fn settle_cmd(&mut self, consumer: ConsumerId, op: QueueOp, frame: ToLeader) {
        // A consumer this node's state knows is settled here while it
        // leads, even if it also came in through a stream: a consumer
        // attached while this node was being elected goes through a stream
        // to this node itself, and sending its acknowledgements down that
        // stream would only bring them back here, round and round, never
        // settled (the consumer would stall at its prefetch).
        if self.consumers.contains_key(&consumer) && self.is_leader() {
            if let QueueOp::Ack(a) = &op
                && let Some(c) = self.consumers.get_mut(&consumer)
            {
                c.unacked = c.unacked.saturating_sub(if a.multiple { c.unacked } else { 1 });
            }
            self.pending.push_back((op, Waiter::None));
        } else if let Some(r) = self.remote.get(&consumer) {
            // Bounded: a consumer's acknowledgements never outnumber its
            // deliveries, which its prefetch bounds.
            let tx = r.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(enc(&frame)).await;
            });
        }
        // Otherwise the consumer is gone (its leader moved): its messages
        // return to the queue; the acknowledgement has nothing to settle.
    }

    fn subscribe(&mut self, spec: ConsumerSpec, outbox: Arc<Outbox>, reply: oneshot::Sender<crate::error::Result<ConsumerId>>) {
        if self.is_leader() {
            let limits = self.ctx_limits().consumer();
            let op = QueueOp::Subscribe(ops::Subscribe {
                tag: spec.tag.to_string(),
                prefetch: spec.prefetch,
                auto_ack: spec.auto_ack,
                exclusive: spec.exclusive,
                priority: spec.priority,
                peer: spec.peer.clone(),
                max_unacked: limits.max_unacked,
                max_unacked_bytes: limits.max_unacked_bytes,
            });
            self.pending.push_back((op, Waiter::Subscribe { tag: spec.tag.clone(), spec, outbox, reply }));
            return;
        }
        self.attach(spec, outbox, reply);
    }

    /// Attaches a consumer through a stream from the leader.
    fn attach(&mut self, spec: ConsumerSpec, outbox: Arc<Outbox>, reply: oneshot::Sender<crate::error::Result<ConsumerId>>) {
        let Some(target) = self.forward_target() else {
            let _ = reply.send(Err(Error::Unavailable(format!("queue '{}' has no reachable replica", self.name))));
            return;
        };
        let (host, id, me, name) = (self.host.clone(), self.id, self.me.clone(), self.name.clone());
        let members: Vec<NodeId> = self.members.iter().copied().filter(|m| *m != self.node).collect();
        tokio::spawn(async move {
            // While there is no leader (an election), try again for a while.
            let deadline = tokio::time::Instant::now() + FORWARD_PATIENCE;
            let mut target = target;
            let mut attempt = 0u32;
            let attached = loop {
                match attach_remote(host.clone(), id, target, spec.clone(), outbox.clone()).await {
                    Err(Error::Unavailable(m)) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(queue = %name, reason = %m, "no leader to attach a consumer to yet");
                        attempt += 1;
                        target = host
                            .leader(id)
                            .and_then(|l| l.leader)
                            .filter(|l| *l != host.node_id())
                            .or_else(|| members.get(attempt as usize % members.len().max(1)).copied())
                            .unwrap_or(target);
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(10) + 1))).await;
                    }
                    other => break other,
                }
            };
            match attached {
                Ok((consumer, tx)) => {
                    let Some(me) = me.upgrade() else { return };
                    // Registered before the client learns its id, so that
                    // its first acknowledgement finds the stream.
                    let (done, registered) = oneshot::channel();
                    let _ = me.send(QueueCmd::Remote(Box::new(RemoteCmd::Consumer { consumer, spec, tx, done }))).await;
                    let _ = registered.await;
                    let _ = reply.send(Ok(consumer));
                }
                Err(e) => {
                    tracing::debug!(queue = %name, error = %e, "attaching a consumer through the leader failed");
                    let _ = reply.send(Err(e));
                }
            }
        });
    }

    fn propose_next(&mut self) {
        if self.inflight.is_some() || self.pending.is_empty() || self.backoff.is_some() {
            return;
        }
        if !self.is_leader() {
            self.forward_next();
            return;
        }
        let mut entries = Vec::new();
        let mut ops = Vec::new();
        let mut waiters = Vec::new();
        let mut bytes = 0usize;
        while let Some((op, _)) = self.pending.front() {
            let size = op_size(op);
            if !entries.is_empty() && (entries.len() >= MAX_BATCH_COMMANDS || bytes + size > MAX_BATCH_BYTES) {
                break;
            }
            bytes += size;
            let Some((op, w)) = self.pending.pop_front() else { break };
            entries.push(QueueEntry::of(op.clone()));
            ops.push(op);
            waiters.push(w);
        }
        let entry =
            if entries.len() == 1 { entries.pop().unwrap_or_default() } else { QueueEntry::of(QueueOp::Batch(ops::Batch { entries })) };
        let host = self.host.clone();
        let id = self.id;
        let single = waiters.len() == 1;
        self.inflight = Some(Box::pin(async move {
            let r = match tokio::time::timeout(CALL_TIMEOUT, host.propose(id, entry.encode_to_vec())).await {
                Ok(Err(ProposeError::ForwardToLeader { .. })) => return Done::NotAppended(ops.into_iter().zip(waiters).collect()),
                Ok(Ok((_, Some(reply)))) => match reply.downcast::<QueueReply>() {
                    Ok(r) => Ok(*r),
                    Err(_) => Err("the queue's state machine replied with something else".to_string()),
                },
                Ok(Ok((_, None))) => Err("the entry could not be applied".to_string()),
                Ok(Err(e)) => Err(propose_error_text(&e)),
                Err(_) => Err("the entry did not commit in time (no quorum?): it may or may not be applied; retry".to_string()),
            };
            let r = match r {
                Ok(reply) if single => Ok(QueueReply::Batch(vec![reply])),
                other => other,
            };
            Done::Proposed(waiters, r)
        }));
    }

    /// Sends the next commands to the leader: consecutive publishes as one
    /// call, anything else alone.
    fn forward_next(&mut self) {
        let Some((op, waiter)) = self.pending.pop_front() else { return };
        let (op, waiter) = match (op, waiter) {
            (QueueOp::Enqueue(mut e), Waiter::Confirms(mut trackers)) => {
                let mut bytes = 0usize;
                while let Some((QueueOp::Enqueue(_), Waiter::Confirms(_))) = self.pending.front() {
                    if e.messages.len() >= MAX_BATCH_COMMANDS || bytes > MAX_BATCH_BYTES {
                        break;
                    }
                    let Some((QueueOp::Enqueue(more), Waiter::Confirms(ts))) = self.pending.pop_front() else { break };
                    bytes += more.messages.iter().map(|m| m.body.len()).sum::<usize>();
                    e.messages.extend(more.messages);
                    trackers.extend(ts);
                }
                (QueueOp::Enqueue(e), Waiter::Confirms(trackers))
            }
            (QueueOp::Subscribe(_), Waiter::Subscribe { spec, outbox, reply, .. }) => {
                // Leadership moved while it waited: attach through the leader.
                self.attach(spec, outbox, reply);
                return;
            }
            other => other,
        };
        let Some(target) = self.forward_target() else {
            fail_waiter(waiter, &format!("queue '{}' has no reachable replica", self.name));
            return;
        };
        let host = self.host.clone();
        let id = self.id;
        let members: Vec<NodeId> = self.members.iter().copied().filter(|m| *m != self.node).collect();
        self.inflight_forward = self.leader_info().leader.filter(|l| *l == target);
        self.inflight = Some(Box::pin(async move {
            let r = call_op(&host, id, target, &members, QueueEntry::of(op.clone())).await;
            Done::Forwarded(op, waiter, r)
        }));
    }

    fn finished(&mut self, done: Done) {
        self.inflight = None;
        self.inflight_forward = None;
        let (waiters, result) = match done {
            Done::Proposed(w, r) => (w, r),
            Done::NotAppended(back) => {
                for item in back.into_iter().rev() {
                    self.pending.push_front(item);
                }
                // Again shortly: a new leader takes writes once its first
                // entry commits; a deposed one learns who leads.
                self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
                return;
            }
            Done::Forwarded(op, waiter, r) => {
                match r {
                    Ok(WireReply::NotLeader(_)) if self.is_leader() => {
                        // This node took over meanwhile: propose it here.
                        self.pending.push_front((op, waiter));
                    }
                    Ok(WireReply::NotLeader(Some(l))) if l == self.node => {
                        // The others see this node as the leader before it
                        // does: wait for it to notice.
                        self.pending.push_front((op, waiter));
                        self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
                    }
                    Ok(reply) => deliver_wire(waiter, reply, &self.name),
                    Err(e) => fail_waiter(waiter, &e),
                }
                return;
            }
        };
        let replies = match result {
            Ok(QueueReply::Batch(replies)) => replies,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::debug!(queue = %self.name, error = %e, "a proposal failed");
                for w in waiters {
                    fail_waiter(w, &format!("queue '{}': {e}", self.name));
                }
                return;
            }
        };
        let mut replies = replies.into_iter();
        for w in waiters {
            let reply = replies.next().unwrap_or(QueueReply::Skipped);
            self.answer(w, reply);
        }
    }

    fn answer(&mut self, waiter: Waiter, reply: QueueReply) {
        match (waiter, reply) {
            (Waiter::None, _) => {}
            (Waiter::Confirms(trackers), QueueReply::Enqueued(outcomes)) => {
                let mut outcomes = outcomes.into_iter();
                for t in trackers {
                    let outcome = outcomes.next();
                    if let Some(t) = t {
                        t.part_done(match outcome {
                            Some(EnqueueOutcome::Enqueued { .. }) => PartOutcome::Enqueued,
                            Some(EnqueueOutcome::Duplicate { .. }) => PartOutcome::Duplicate,
                            Some(EnqueueOutcome::Rejected(r)) => PartOutcome::Rejected(r),
                            None => PartOutcome::Dropped,
                        });
                    }
                }
            }
            (Waiter::Subscribe { tag, spec, outbox, reply }, QueueReply::Subscribed(r)) => match r {
                Ok(consumer) => {
                    outbox.bind(consumer, self.me.clone());
                    self.consumers.insert(consumer, LocalConsumer { tag, spec, outbox, unacked: 0 });
                    let _ = reply.send(Ok(consumer));
                    for d in self.early.remove(&consumer).unwrap_or_default() {
                        self.deliver(d);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            (Waiter::Get { reply }, QueueReply::Got(ds, ready)) => {
                let _ = reply.send(Ok(ds.iter().map(|d| get_delivery(d, ready)).collect()));
            }
            (Waiter::Purge { reply }, QueueReply::Purged(n)) => {
                let _ = reply.send(Ok(n));
            }
            (Waiter::Remote(reply), r) => {
                let _ = reply.send(to_wire(r));
            }
            (Waiter::Adopted { adoption, store, .. }, QueueReply::Done(Ok(()))) => adoption.done(store),
            (w, r) => fail_waiter(w, &format!("unexpected reply {r:?}")),
        }
    }

    fn event(&mut self, event: ReplicaEvent) {
        if !self.is_leader() {
            return;
        }
        match event {
            ReplicaEvent::Deliver(d) => {
                if self.consumers.contains_key(&d.consumer) {
                    self.deliver(d);
                } else {
                    tracing::trace!(queue = %self.name, node = self.node, consumer = d.consumer, seq = d.msg.key.seq, "delivery held for a consumer not attached yet");
                    // Its subscribe reply is on the way (applying ran ahead
                    // of it), or the consumer is gone and a later entry
                    // returns the message.
                    let early = self.early.entry(d.consumer).or_default();
                    if early.len() < 1 << 16 {
                        early.push(d);
                    }
                }
            }
            ReplicaEvent::ConsumerGone { consumer, error } => {
                self.early.remove(&consumer);
                self.settle.remove(&consumer);
                if let Some(c) = self.consumers.remove(&consumer) {
                    c.outbox.send(match error {
                        Some(e) => ConsumerEvent::Failed(Error::PreconditionFailed(e)),
                        None => ConsumerEvent::Cancelled("the consumer was dropped".into()),
                    });
                }
            }
            ReplicaEvent::DeadLetter { seq, data } => self.send_dead_letter(seq, (*data).clone()),
            ReplicaEvent::Counted { .. } => {}
        }
    }

    fn deliver(&mut self, d: OutDelivery) {
        tracing::trace!(
            queue = %self.name,
            node = self.node,
            term = ?self.leading_term,
            consumer = d.consumer,
            tag = d.tag,
            seq = d.msg.key.seq,
            count = d.msg.delivery_count,
            message_id = %d.msg.data.properties.message_id,
            "deliver"
        );
        let Some(c) = self.consumers.get_mut(&d.consumer) else { return };
        let mem = d.msg.data.mem_size();
        let delivery = Box::new(to_proto(&d, &c.tag));
        c.outbox.reserve(mem);
        if !c.outbox.send_delivery(delivery, mem) {
            return;
        }
        if c.spec.auto_ack {
            self.settle.entry(d.consumer).or_default().push(d.tag);
        } else {
            c.unacked += 1;
        }
    }

    fn flush_settles(&mut self) {
        if self.settle.is_empty() || !self.is_leader() {
            return;
        }
        for (consumer, tags) in std::mem::take(&mut self.settle) {
            self.pending.push_back((QueueOp::Settle(ops::SettleTags { consumer, tags }), Waiter::None));
        }
    }

    fn on_tick(&mut self) {
        if !self.is_leader() {
            return;
        }
        let now = crate::model::now_ms();
        self.expire_if_unused(now);
        if self.inflight.is_some() || !self.pending.is_empty() {
            return;
        }
        let due = self.shared.deadline();
        if due.is_some_and(|t| t <= now) {
            // Expiry and delays apply at the entry's time, on every replica.
            self.pending.push_back((QueueOp::Tick(ops::Empty {}), Waiter::None));
        }
    }

    /// `x-expires`: the leader has a queue unused for its period deleted,
    /// through the metadata as a client's delete would be (the period and
    /// the last use are in the replicated state: a new leader carries on).
    /// First it proposes `Expire`, which marks the queue expired on every
    /// replica only if it is still unused at the entry's time, so that a
    /// consumer attaching meanwhile keeps it (and none attaches after);
    /// then, once the queue is marked, the deletion, retried until it is
    /// gone.
    fn expire_if_unused(&mut self, now: u64) {
        let step = if self.shared.expired() {
            ExpireStep::Delete
        } else {
            match self.shared.expires_at().filter(|at| *at <= now) {
                Some(at) => ExpireStep::Propose { at },
                None => return,
            }
        };
        if self.expire_asked.is_some_and(|(s, t)| s == step && t.elapsed() < EXPIRE_RETRY) {
            return;
        }
        self.expire_asked = Some((step, tokio::time::Instant::now()));
        match step {
            ExpireStep::Propose { .. } => self.submit(QueueOp::Expire(ops::Empty {}), Waiter::None),
            ExpireStep::Delete => {
                let Some(f) = self.ctx.upgrade().and_then(|c| c.expire.get().cloned()) else { return };
                tokio::spawn(f(self.name.clone(), self.id));
            }
        }
    }

    fn send_dead_letter(&mut self, seq: u64, data: MessageData) {
        if !self.dead_letters_sent.insert(seq) {
            return;
        }
        if self.dead_letter_tx.as_ref().is_none_or(|tx| tx.is_closed()) {
            let Some(f) = self.ctx.upgrade().and_then(|c| c.dead_letter.get().cloned()) else { return };
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(dead_letter_worker(f, rx, self.me.clone()));
            self.dead_letter_tx = Some(tx);
        }
        if let Some(tx) = &self.dead_letter_tx {
            let _ = tx.send((seq, data));
        }
    }

    /// Sends again the dead letters waiting in the outbox: read from the
    /// state as applied (between two applied batches, so none is missed
    /// that the store does not hold yet), then handed back to this task,
    /// which sends them if it still leads in the same term (each once:
    /// those applied meanwhile came as events too).
    fn resend_dead_letters(&mut self) {
        let Some(term) = self.leading_term else { return };
        let (host, id, me) = (self.host.clone(), self.id, self.me.clone());
        tokio::spawn(async move {
            let read = host.read_applied(id, move |store| machine::pending_dead_letters(id, store)).await;
            let letters = match read {
                Ok(Ok(letters)) => letters,
                Ok(Err(e)) => return tracing::warn!(queue = id, error = %e, "cannot read the dead-letter outbox"),
                Err(e) => return tracing::debug!(queue = id, error = %e, "the dead-letter outbox was not read"),
            };
            if letters.is_empty() {
                return;
            }
            let Some(queue) = me.upgrade() else { return };
            let _ = queue.send(QueueCmd::Remote(Box::new(RemoteCmd::Outbox { term, letters }))).await;
        });
    }
}

/// Routes a queue's dead letters one after the other (so that they arrive
/// in the order they died), each retried until its targets have it; then
/// tells the queue, which drops it from its outbox.
async fn dead_letter_worker(f: DeadLetterFn, mut rx: mpsc::UnboundedReceiver<(u64, MessageData)>, me: mpsc::WeakSender<QueueCmd>) {
    while let Some((seq, data)) = rx.recv().await {
        let mut attempt = 0u32;
        while !f(data.clone()).await {
            attempt += 1;
            if attempt > 20 || me.upgrade().is_none() {
                // Left in the outbox: the next leader sends it again.
                return;
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
        }
        let Some(queue) = me.upgrade() else { return };
        let _ = queue.send(QueueCmd::Remote(Box::new(RemoteCmd::DeadLettered(seq)))).await;
    }
}

fn effective_prefetch(spec: &ConsumerSpec, limits: &Limits) -> u32 {
    let max = spec.limits.unwrap_or(ConsumerLimits { max_unacked: limits.consumer_max_unacked, max_unacked_bytes: 0 }).max_unacked;
    match spec.prefetch {
        _ if spec.auto_ack => 0,
        0 => max,
        p => p.min(max),
    }
}

fn op_size(op: &QueueOp) -> usize {
    match op {
        QueueOp::Enqueue(e) => e.messages.iter().map(|m| m.body.len() + 64).sum(),
        QueueOp::Adopt(m) => m.body.len() + 64,
        _ => 32,
    }
}

async fn recv_event(events: &mut Option<mpsc::UnboundedReceiver<ReplicaEvent>>) -> Option<ReplicaEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for a leader change: false when the group is gone.
async fn changed(leader: &mut Option<watch::Receiver<LeaderInfo>>) -> bool {
    match leader {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn wait_backoff(backoff: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match backoff {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn poll_inflight(inflight: &mut Option<Inflight>) -> Done {
    match inflight {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn propose_error_text(e: &ProposeError) -> String {
    match e {
        ProposeError::ForwardToLeader { .. } => "leadership moved before the command was proposed; retry".into(),
        ProposeError::Unknown { .. } => "leadership moved before the command committed: it may or may not have been applied; retry".into(),
        other => other.to_string(),
    }
}

fn fail_waiter(waiter: Waiter, reason: &str) {
    match waiter {
        Waiter::None => {}
        Waiter::Confirms(ts) => {
            for t in ts.into_iter().flatten() {
                t.part_done(PartOutcome::Rejected(reason.to_string()));
            }
        }
        Waiter::Subscribe { reply, .. } => {
            let _ = reply.send(Err(Error::Unavailable(reason.to_string())));
        }
        Waiter::Get { reply } => {
            let _ = reply.send(Err(Error::Unavailable(reason.to_string())));
        }
        Waiter::Purge { reply } => {
            let _ = reply.send(Err(Error::Unavailable(reason.to_string())));
        }
        Waiter::Remote(reply) => {
            let _ = reply.send(WireReply::Unavailable(reason.to_string()));
        }
        Waiter::Adopted { adoption, me, .. } => adoption.again(me, reason),
    }
}

/// Answers a local waiter with a reply from the leader.
fn deliver_wire(waiter: Waiter, reply: WireReply, name: &str) {
    match (waiter, reply) {
        (Waiter::Confirms(ts), WireReply::Enqueued(outcomes)) => {
            let mut outcomes = outcomes.into_iter();
            for t in ts {
                let o = outcomes.next();
                if let Some(t) = t {
                    t.part_done(match o {
                        Some(WireOutcome::Enqueued) => PartOutcome::Enqueued,
                        Some(WireOutcome::Duplicate) => PartOutcome::Duplicate,
                        Some(WireOutcome::Rejected(r)) => PartOutcome::Rejected(r),
                        None => PartOutcome::Dropped,
                    });
                }
            }
        }
        (Waiter::Get { reply }, WireReply::Got(ds)) => {
            let out = ds.iter().filter_map(|d| proto::Delivery::decode(d.as_slice()).ok()).collect();
            let _ = reply.send(Ok(out));
        }
        (Waiter::Get { reply }, WireReply::Done(Err(e))) => {
            let _ = reply.send(Err(e.into()));
        }
        (Waiter::Purge { reply }, WireReply::Purged(n)) => {
            let _ = reply.send(Ok(n));
        }
        (Waiter::None, _) => {}
        (Waiter::Adopted { adoption, store, .. }, WireReply::Done(Ok(()))) => adoption.done(store),
        (w, WireReply::Unavailable(r)) => fail_waiter(w, &r),
        (w, WireReply::NotLeader(l)) => fail_waiter(w, &format!("queue '{name}' has no leader right now (last known: {l:?}); retry")),
        (w, WireReply::Done(Err(e))) => fail_waiter(w, &e.message),
        (w, other) => fail_waiter(w, &format!("unexpected reply from the leader of queue '{name}': {other:?}")),
    }
}

fn to_wire(reply: QueueReply) -> WireReply {
    match reply {
        QueueReply::Enqueued(os) => WireReply::Enqueued(
            os.into_iter()
                .map(|o| match o {
                    EnqueueOutcome::Enqueued { .. } => WireOutcome::Enqueued,
                    EnqueueOutcome::Duplicate { .. } => WireOutcome::Duplicate,
                    EnqueueOutcome::Rejected(r) => WireOutcome::Rejected(r),
                })
                .collect(),
        ),
        QueueReply::Done(r) => WireReply::Done(r.map_err(|e| WireError::from(&e))),
        QueueReply::Got(ds, ready) => WireReply::Got(ds.iter().map(|d| get_delivery(d, ready).encode_to_vec()).collect()),
        QueueReply::Purged(n) => WireReply::Purged(n),
        QueueReply::Subscribed(_) | QueueReply::Batch(_) | QueueReply::Skipped => {
            WireReply::Unavailable("this command cannot be forwarded".into())
        }
    }
}

fn to_proto(d: &OutDelivery, consumer_tag: &str) -> proto::Delivery {
    proto::Delivery {
        delivery_tag: d.tag,
        redelivered: d.redelivered,
        delivery_count: d.msg.delivery_count,
        exchange: d.msg.data.exchange.clone(),
        routing_key: d.msg.data.routing_key.clone(),
        properties: Some(d.msg.data.properties.clone()),
        body: d.msg.data.body.clone(),
        consumer_tag: consumer_tag.to_string(),
        message_count: 0,
    }
}

fn get_delivery(d: &OutDelivery, ready: u64) -> proto::Delivery {
    let mut p = to_proto(d, "");
    p.message_count = ready;
    p
}

/// Sends a command to the queue's leader: to `target` first, then to whom
/// the answers name, or the other members in turn while there is no leader
/// (an election), for a bounded time.
async fn call_op(host: &RaftHost, queue: QueueId, target: NodeId, members: &[NodeId], entry: QueueEntry) -> Result<WireReply, String> {
    let entry = entry.encode_to_vec();
    let deadline = tokio::time::Instant::now() + FORWARD_PATIENCE;
    let mut target = target;
    let mut next = 0usize;
    let mut last = String::new();
    for attempt in 0..200u32 {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let body = enc(&OpCall { queue, hops: 0, entry: entry.clone() });
        let reply = match host.cluster().call_with_timeout(target, QQ_OP, body, FORWARD_ATTEMPT).await {
            Ok(reply) => crate::raft::decode::<WireReply>(&reply)?,
            Err(e) => {
                last = call_error_text(&e);
                WireReply::NotLeader(None)
            }
        };
        match reply {
            WireReply::NotLeader(Some(l)) if l == host.node_id() => return Ok(WireReply::NotLeader(Some(l))),
            WireReply::NotLeader(Some(l)) if l != target => target = l,
            WireReply::NotLeader(_) => {
                if let Some(m) = members.get(next % members.len().max(1)) {
                    target = *m;
                }
                next += 1;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(10) + 1))).await;
            }
            other => return Ok(other),
        }
    }
    Err(if last.is_empty() { "the queue has no leader (an election is under way, or no majority is up); retry".to_string() } else { last })
}

fn call_error_text(e: &CallError) -> String {
    format!("the queue's leader could not be reached: {e}")
}

/// A command from another node.
async fn handle_op(ctx: Weak<ReplicaCtx>, _from: NodeId, body: Bytes) -> Result<Bytes, String> {
    let call: OpCall = crate::raft::decode(&body)?;
    let ctx = ctx.upgrade().ok_or("the node is stopping")?;
    let Some(queue) = ctx.queue(call.queue) else {
        // Not created here yet (this node is applying the metadata behind
        // the caller), or gone: the caller tries elsewhere, for a while.
        return Ok(enc(&WireReply::NotLeader(None)));
    };
    let op = match QueueEntry::decode(call.entry.as_slice()) {
        Ok(QueueEntry { op: Some(op) }) => op,
        _ => return Err("a queue command that cannot be read".into()),
    };
    let (reply, rx) = oneshot::channel();
    if queue.tx.send(QueueCmd::Remote(Box::new(RemoteCmd::Op { op, reply }))).await.is_err() {
        return Ok(enc(&WireReply::Unavailable("the queue stopped".into())));
    }
    let reply = rx.await.unwrap_or(WireReply::Unavailable("the queue stopped before answering".into()));
    Ok(enc(&reply))
}

/// The leader's side of a consumer attached through another node.
async fn serve_consumer(ctx: Weak<ReplicaCtx>, _from: NodeId, mut duplex: Duplex) {
    let Some(Ok(first)) = duplex.rx.recv().await else { return };
    let Ok(ToLeader::Subscribe { queue, tag, prefetch, auto_ack, exclusive, priority, peer }) = crate::raft::decode(&first) else {
        return;
    };
    let Some(ctx) = ctx.upgrade() else { return };
    let leads = ctx.host.leader(queue).and_then(|l| l.leader) == Some(ctx.node());
    let handle = ctx.queue(queue).filter(|_| leads);
    drop(ctx);
    let Some(handle) = handle else {
        let e = Error::Unavailable(format!("this node does not lead queue {queue}"));
        let _ = duplex.tx.send(enc(&FromLeader::Subscribed(Err(WireError::from(&e))))).await;
        return;
    };
    let spec = ConsumerSpec { tag: tag.as_str().into(), prefetch, auto_ack, exclusive, priority, peer, limits: None };
    let (outbox, mut events) = Outbox::new();
    let (reply, rx) = oneshot::channel();
    if handle.tx.send(QueueCmd::Subscribe { spec, outbox, reply }).await.is_err() {
        return;
    }
    let consumer = match rx.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _ = duplex.tx.send(enc(&FromLeader::Subscribed(Err(WireError::from(&e))))).await;
            return;
        }
        Err(_) => return,
    };
    if duplex.tx.send(enc(&FromLeader::Subscribed(Ok(consumer)))).await.is_err() {
        let _ = handle.tx.send(QueueCmd::Unsubscribe { consumer }).await;
        return;
    }
    use futures::StreamExt as _;
    loop {
        tokio::select! {
            ev = events.next() => {
                let frame = match ev {
                    Some(ConsumerEvent::Delivery(d, mem)) => FromLeader::Delivery(d.encode_to_vec(), mem),
                    Some(ConsumerEvent::Cancelled(r)) => FromLeader::Cancelled(r),
                    Some(ConsumerEvent::Failed(e)) => FromLeader::Failed(WireError::from(&e)),
                    None => FromLeader::Cancelled("the queue's leader moved; subscribe again".into()),
                };
                let last = !matches!(frame, FromLeader::Delivery(..));
                if duplex.tx.send(enc(&frame)).await.is_err() || last {
                    break;
                }
            }
            frame = duplex.rx.recv() => {
                let cmd = match frame.and_then(|f| f.ok()).map(|f| crate::raft::decode::<ToLeader>(&f)) {
                    Some(Ok(ToLeader::Ack { tag, multiple })) => QueueCmd::Ack { consumer, tag, multiple },
                    Some(Ok(ToLeader::Nack { tag, multiple, requeue })) => QueueCmd::Nack { consumer, tag, multiple, requeue },
                    Some(Ok(ToLeader::Qos { prefetch })) => QueueCmd::Qos { consumer, prefetch },
                    _ => break,
                };
                if handle.tx.send(cmd).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = handle.tx.send(QueueCmd::Unsubscribe { consumer }).await;
}

/// The consumer's side: opens the stream, subscribes, and pumps deliveries
/// into `outbox`. Returns the consumer id and the sender for its
/// acknowledgements.
async fn attach_remote(
    host: RaftHost,
    queue: QueueId,
    target: NodeId,
    spec: ConsumerSpec,
    outbox: Arc<Outbox>,
) -> Result<(ConsumerId, mpsc::Sender<Bytes>), Error> {
    let mut target = target;
    for _ in 0..=MAX_HOPS {
        let mut duplex = host
            .cluster()
            .open_stream(target, QQ_CONSUME)
            .await
            .map_err(|e| Error::Unavailable(format!("the queue's leader could not be reached: {e}")))?;
        let sub = ToLeader::Subscribe {
            queue,
            tag: spec.tag.to_string(),
            prefetch: spec.prefetch,
            auto_ack: spec.auto_ack,
            exclusive: spec.exclusive,
            priority: spec.priority,
            peer: spec.peer.clone(),
        };
        duplex.tx.send(enc(&sub)).await.map_err(|_| Error::Unavailable("the queue's leader closed the stream".into()))?;
        let first = tokio::time::timeout(CALL_TIMEOUT, duplex.rx.recv())
            .await
            .map_err(|_| Error::Unavailable("the queue's leader did not answer the subscribe".into()))?;
        let Some(Ok(first)) = first else { return Err(Error::Unavailable("the queue's leader closed the stream".into())) };
        let consumer = match crate::raft::decode::<FromLeader>(&first) {
            Ok(FromLeader::Subscribed(Ok(c))) => c,
            Ok(FromLeader::Subscribed(Err(e))) => {
                let e: Error = e.into();
                // The node was not the leader (a stale view): try the one it
                // names, if it named one.
                if let Error::Unavailable(m) = &e
                    && let Some(next) = host.leader(queue).and_then(|l| l.leader).filter(|l| *l != target)
                {
                    tracing::debug!(reason = %m, next, "retrying the subscribe on the leader");
                    target = next;
                    continue;
                }
                return Err(e);
            }
            _ => return Err(Error::Unavailable("an unexpected answer to a subscribe".into())),
        };
        let Duplex { tx, mut rx } = duplex;
        tokio::spawn(async move {
            while let Some(Ok(frame)) = rx.recv().await {
                match crate::raft::decode::<FromLeader>(&frame) {
                    Ok(FromLeader::Delivery(d, mem)) => {
                        let Ok(d) = proto::Delivery::decode(d.as_slice()) else { break };
                        outbox.reserve(mem);
                        if !outbox.send_delivery(Box::new(d), mem) {
                            return;
                        }
                    }
                    Ok(FromLeader::Cancelled(r)) => {
                        outbox.send(ConsumerEvent::Cancelled(r));
                        return;
                    }
                    Ok(FromLeader::Failed(e)) => {
                        outbox.send(ConsumerEvent::Failed(e.into()));
                        return;
                    }
                    _ => break,
                }
            }
            outbox.send(ConsumerEvent::Cancelled("the connection to the queue's leader ended; subscribe again".into()));
        });
        return Ok((consumer, tx));
    }
    Err(Error::Unavailable("the queue's leader could not be found".into()))
}

/// Brings this node's part of a quorum queue in line with its replica set
/// as the metadata now has it: starts a replica here when this node was
/// added (it waits for the leader to add it), stops and deletes the one
/// here when this node was removed, and tells the queue's task where the
/// replicas are.
pub async fn set_members(
    ctx: &Arc<ReplicaCtx>,
    handle: &QueueRef,
    args: QueueArgs,
    members: &[NodeId],
    bootstrap: Bootstrap,
) -> Result<(), Error> {
    let id = handle.id;
    let me = ctx.node();
    let member = members.contains(&me);
    let running = ctx.host.groups().contains(&id);
    ctx.members.write().insert(id, members.to_vec());
    let replica = if member && !running {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let m = machine::machine(id, handle.name.clone(), args, ctx.limits, events_tx, handle.shared.clone());
        match ctx.host.start_group(id, Box::new(m), bootstrap).await {
            Ok(()) | Err(crate::raft::GroupError::AlreadyRunning(_)) => {}
            Err(e) => return Err(Error::Unavailable(format!("cannot start the replica of queue '{}': {e}", handle.name))),
        }
        tracing::info!(queue = %handle.name, "this node now holds a replica of the queue");
        match ctx.host.watch_leader(id) {
            Some(leader) => ReplicaChange::Joined { events: events_rx, leader },
            None => ReplicaChange::Keep,
        }
    } else if !member && running {
        ReplicaChange::Left
    } else {
        ReplicaChange::Keep
    };
    let left = matches!(replica, ReplicaChange::Left);
    let (done, rx) = oneshot::channel();
    let cmd = QueueCmd::Remote(Box::new(RemoteCmd::Members { members: members.to_vec(), replica, done }));
    if handle.tx.send(cmd).await.is_ok() {
        let _ = rx.await;
    }
    if left {
        tracing::info!(queue = %handle.name, "this node no longer holds a replica of the queue: deleting its copy");
        ctx.host.delete_group(id, machine::queue_ranges(id)).await.map_err(|e| Error::Unavailable(e.to_string()))?;
    }
    Ok(())
}

/// A change of a queue group's membership or leadership, made on its
/// leader.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum MembersOp {
    /// Add the node as a learner, wait (bounded) until it has caught up,
    /// make it a voter.
    Add(NodeId),
    /// Remove the node (handing leadership away first if it leads).
    Remove(NodeId),
    /// Hand leadership to this voter.
    Transfer(NodeId),
    /// Only report the group's state.
    Status,
}

#[derive(Serialize, Deserialize)]
struct MembersCall {
    queue: QueueId,
    op: MembersOp,
}

/// The group's state on its leader.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupView {
    pub leader: NodeId,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Entries each follower is behind the leader.
    pub lag: Vec<(NodeId, u64)>,
}

/// What the leader answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum MembersReply {
    /// Done (`changed`: false when it was so already); the group now.
    Done {
        changed: bool,
        view: GroupView,
    },
    /// This node does not lead the group; the leader it knows of.
    NotLeader(Option<NodeId>),
    Failed(String),
}

fn view_of(host: &RaftHost, queue: QueueId) -> Option<GroupView> {
    let s = host.status(queue)?;
    Some(GroupView {
        leader: s.leader.unwrap_or(0),
        voters: s.voters.iter().copied().collect(),
        learners: s.learners.iter().copied().collect(),
        lag: s.lag.iter().map(|(n, l)| (*n, l.entries)).collect(),
    })
}

/// Runs `op` on this node if it leads `queue`'s group.
pub async fn leader_members_op(host: &RaftHost, queue: QueueId, op: MembersOp) -> MembersReply {
    let me = host.node_id();
    let Some(status) = host.status(queue) else { return MembersReply::NotLeader(None) };
    if status.leader != Some(me) || status.role != crate::raft::Role::Leader {
        return MembersReply::NotLeader(status.leader.filter(|l| *l != me));
    }
    let not_leader = |e: crate::raft::GroupError| match e {
        crate::raft::GroupError::ForwardToLeader { leader } => MembersReply::NotLeader(leader),
        e => MembersReply::Failed(e.to_string()),
    };
    let done = |changed: bool| MembersReply::Done { changed, view: view_of(host, queue).unwrap_or_default() };
    match op {
        MembersOp::Status => done(false),
        MembersOp::Add(node) => {
            if status.voters.contains(&node) {
                return done(false);
            }
            // Blocking: returns once the learner has the log up to its own
            // addition (a big backlog may come as a snapshot).
            match tokio::time::timeout(CATCH_UP_TIMEOUT, host.add_learner(queue, node)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return not_leader(e),
                Err(_) => {
                    let lag = host.status(queue).and_then(|s| s.lag.get(&node).map(|l| l.entries));
                    return MembersReply::Failed(format!(
                        "node {node} was added as a learner and had not caught up after {} s ({} entries behind); \
                         it goes on catching up: run grow again to make it a voter",
                        CATCH_UP_TIMEOUT.as_secs(),
                        lag.map_or("an unknown number of".to_string(), |l| l.to_string())
                    ));
                }
            }
            match host.promote(queue, node).await {
                Ok(()) => done(true),
                Err(e) => not_leader(e),
            }
        }
        MembersOp::Remove(node) => {
            if !status.voters.contains(&node) && !status.learners.contains(&node) {
                return done(false);
            }
            if node == me {
                // Hand leadership to the follower furthest ahead first; the
                // caller asks the new leader to remove this node.
                let Some(to) =
                    status.voters.iter().copied().filter(|v| *v != me).min_by_key(|v| status.lag.get(v).map_or(u64::MAX, |l| l.entries))
                else {
                    return MembersReply::Failed(format!("node {node} holds the queue's only voting replica"));
                };
                return match transfer(host, queue, to).await {
                    Ok(()) => MembersReply::NotLeader(Some(to)),
                    Err(e) => MembersReply::Failed(e),
                };
            }
            match host.remove_member(queue, node).await {
                Ok(()) => done(true),
                Err(e) => not_leader(e),
            }
        }
        MembersOp::Transfer(to) => {
            if to == me {
                return done(false);
            }
            if !status.voters.contains(&to) {
                return MembersReply::Failed(format!("node {to} is not a voting replica of the queue"));
            }
            match transfer(host, queue, to).await {
                Ok(()) => done(true),
                Err(e) => MembersReply::Failed(e),
            }
        }
    }
}

/// Hands leadership of `queue` to `to` and waits (bounded) until this node
/// no longer leads.
async fn transfer(host: &RaftHost, queue: QueueId, to: NodeId) -> Result<(), String> {
    let me = host.node_id();
    let mut watch = host.watch_leader(queue).ok_or("the queue's group stopped here")?;
    host.transfer_leader(queue, to).await.map_err(|e| e.to_string())?;
    let moved = tokio::time::timeout(TRANSFER_TIMEOUT, watch.wait_for(|l| l.leader.is_some_and(|l| l != me))).await;
    match moved {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!("leadership did not move to node {to} within {} s", TRANSFER_TIMEOUT.as_secs())),
    }
}

/// Runs `op` on `queue`'s leader, wherever it is: this node, the leader it
/// knows of, or the live `members` in turn while the answers name none
/// (an election), for a bounded time.
pub async fn call_members_op(host: &RaftHost, queue: QueueId, members: &[NodeId], op: MembersOp) -> MembersReply {
    let me = host.node_id();
    let alive = host.cluster().liveness();
    let candidates: Vec<NodeId> = members.iter().copied().filter(|m| *m == me || alive.is_alive(*m)).collect();
    if candidates.is_empty() {
        return MembersReply::Failed("none of the queue's replicas is up".into());
    }
    let deadline = tokio::time::Instant::now() + MEMBERS_PATIENCE;
    let mut target = host.leader(queue).and_then(|l| l.leader).unwrap_or(candidates[0]);
    let mut next = 0usize;
    let mut last = String::from("the queue has no leader (an election is under way, or no majority of its replicas is up)");
    let call_timeout = CATCH_UP_TIMEOUT + TRANSFER_TIMEOUT + Duration::from_secs(10);
    for attempt in 0..100u32 {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let reply = if target == me {
            leader_members_op(host, queue, op).await
        } else {
            let body = enc(&MembersCall { queue, op });
            match host.cluster().call_with_timeout(target, QQ_MEMBERS, body, call_timeout).await {
                Ok(r) => crate::raft::decode::<MembersReply>(&r).unwrap_or_else(MembersReply::Failed),
                Err(e) => {
                    last = format!("node {target} could not be reached: {e}");
                    MembersReply::NotLeader(None)
                }
            }
        };
        match reply {
            MembersReply::NotLeader(Some(l)) if l != target => target = l,
            MembersReply::NotLeader(_) => {
                target = candidates[next % candidates.len()];
                next += 1;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(10) + 1))).await;
            }
            other => return other,
        }
    }
    MembersReply::Failed(last)
}
