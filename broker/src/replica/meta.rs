//! The cluster's metadata: exchanges, quorum queues and the bindings between
//! them, as the log of one Raft group (group 0) over every node.
//!
//! A topology change made on any node is proposed to this group (through
//! its leader); once committed, every node applies it to its own broker, in
//! log order, with the same code a single node runs. The node that took the
//! request answers its client with what applying it did there, after its
//! own broker has applied it: a client that declares a queue on one node
//! and publishes to it next finds it there.
//!
//! The machine keeps the definitions themselves (not just the log), so that
//! a node that restarts, or catches up from a snapshot, brings its broker
//! in line with them ([`MetaEvent::Resync`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use warren_client::proto;

use crate::error::{Error, Result, WireError};
use crate::raft::{Applied, Bootstrap, GroupMachine, LocalReply, NodeId, ProposeError, RaftHost};
use crate::store::keys::{self, QueueId};
use crate::store::overlay::Overlay;
use crate::store::{Cf, Op, Reader, StoreError};

/// The metadata group.
pub const META_GROUP: u64 = 0;
/// Quorum queue ids have this bit set: they come from the metadata's
/// counter, the same on every node, and never meet a node-local classic
/// queue's id.
pub const QUORUM_ID_BIT: u64 = 1 << 63;
/// The call that proposes a metadata change on the group's leader.
const META_PROPOSE: &str = "meta.propose";
/// The call that asks a node what its copy of the metadata group is
/// ([`CopyState`]).
const META_STATE: &str = "meta.state";
/// The call that asks a node which cluster its copy of the metadata
/// belongs to (its [`ClusterId`], if it holds one).
const META_CLUSTER_ID: &str = "meta.cluster_id";
/// How often a node whose metadata copy is pristine asks the others again,
/// and how often the leader checks the membership against `--peers`.
const MEMBERSHIP_TICK: Duration = Duration::from_millis(500);
/// How long a client request waits for this node's copy of the metadata
/// to be known current.
const CURRENT_WAIT: Duration = Duration::from_secs(10);
/// How long one membership step (a learner catching up) may take.
const MEMBERSHIP_STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a read barrier may wait.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a change may wait for a leader, its commit and its application.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Results of applied entries kept for their proposers.
const MAX_RESULTS: usize = 4096;

pub fn is_quorum_id(id: QueueId) -> bool {
    id & QUORUM_ID_BIT != 0
}

/// One metadata change. Requests are kept as their protobuf bytes: every
/// node decodes the same bytes the same way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetaCmd {
    DeclareExchange(Vec<u8>),
    DeleteExchange {
        name: String,
        if_unused: bool,
    },
    /// A quorum queue; its id is assigned when applied.
    DeclareQueue {
        request: Vec<u8>,
        members: Vec<NodeId>,
    },
    DeleteQueue {
        name: String,
        if_unused: bool,
        if_empty: bool,
    },
    Bind(Vec<u8>),
    Unbind(Vec<u8>),
    /// Changes nothing: a node that applied it has applied everything
    /// committed before it (a read barrier).
    Barrier,
    /// `node` holds a replica of quorum queue `name` (id `id`) from now on:
    /// it starts one that waits to be added by the group's leader.
    AddQueueMember {
        name: String,
        id: QueueId,
        node: NodeId,
    },
    /// `node` no longer holds a replica of the queue: it stops its replica
    /// and deletes its data. The last replica is never removed.
    RemoveQueueMember {
        name: String,
        id: QueueId,
        node: NodeId,
    },
    /// Names the cluster (a random id the first metadata leader draws);
    /// only the first one applied counts.
    SetClusterId(ClusterId),
}

/// A cluster's identity: which metadata a node's copy belongs to. A node
/// that was a member, was removed while its pod was gone (a scale-down
/// that kept its volume) and comes back holds this cluster's log, which
/// the leader may extend; a node holding another cluster's log must not
/// be added (the two logs' entries would be taken for one another).
pub type ClusterId = u128;

/// A quorum queue's definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumDef {
    pub id: QueueId,
    /// The `DeclareQueueRequest`.
    pub request: Vec<u8>,
    /// The replicas the queue's group was formed with (never changes).
    pub initial: Vec<NodeId>,
    /// The replicas now: `initial`, plus those grown, minus those shrunk.
    pub members: Vec<NodeId>,
}

/// How definitions were stored before replica sets could change: the
/// formed set was the only one.
#[derive(Deserialize)]
struct QuorumDefV1 {
    id: QueueId,
    request: Vec<u8>,
    members: Vec<NodeId>,
}

impl QuorumDef {
    /// Reads a stored definition, in either format. (bincode is not
    /// self-describing: an old definition lacks the last field and fails
    /// to read as a new one, which is how the two are told apart.)
    pub fn decode(bytes: &[u8]) -> std::result::Result<QuorumDef, String> {
        crate::raft::decode::<QuorumDef>(bytes).or_else(|e| {
            crate::raft::decode::<QuorumDefV1>(bytes)
                .map(|v| QuorumDef { id: v.id, request: v.request, initial: v.members.clone(), members: v.members })
                .map_err(|_| e)
        })
    }

    /// Whether the replica set is still the one the group was formed with.
    pub fn as_formed(&self) -> bool {
        let a: BTreeSet<NodeId> = self.initial.iter().copied().collect();
        let b: BTreeSet<NodeId> = self.members.iter().copied().collect();
        a == b
    }
}

/// A replica-set change applied to a definition: the new definition, or
/// `None` when it changes nothing (already so, or the last replica).
pub fn change_members(def: &QuorumDef, add: Option<NodeId>, remove: Option<NodeId>) -> Option<QuorumDef> {
    let mut next = def.clone();
    if let Some(n) = add
        && !next.members.contains(&n)
    {
        next.members.push(n);
    }
    if let Some(n) = remove
        && next.members.contains(&n)
        && next.members.len() > 1
    {
        next.members.retain(|m| *m != n);
    }
    (next != *def).then_some(next)
}

/// What a node's broker is asked to do, in log order.
#[derive(Debug)]
pub enum MetaEvent {
    Apply {
        index: u64,
        cmd: MetaCmd,
        queue: Option<QuorumDef>,
    },
    /// Bring the broker in line with these definitions (after a restart or
    /// a snapshot).
    Resync(Definitions),
}

/// Every definition the metadata holds.
#[derive(Clone, Debug, Default)]
pub struct Definitions {
    /// `DeclareExchangeRequest`s by name.
    pub exchanges: BTreeMap<String, Vec<u8>>,
    pub queues: BTreeMap<String, QuorumDef>,
    /// `BindRequest`s.
    pub bindings: BTreeSet<Vec<u8>>,
}

const KIND_COUNTER: u8 = 0;
const KIND_EXCHANGE: u8 = 1;
const KIND_QUEUE: u8 = 2;
const KIND_BINDING: u8 = 3;
const KIND_CLUSTER: u8 = 4;

/// Where the cluster's id is stored.
fn cluster_id_key() -> Vec<u8> {
    key(KIND_CLUSTER, b"id")
}

/// The cluster id this store's metadata copy has applied, if any.
pub fn stored_cluster_id(store: &dyn Reader) -> Option<ClusterId> {
    let v = store.get(Cf::Replica, &cluster_id_key()).ok()??;
    Some(ClusterId::from_be_bytes(v.try_into().ok()?))
}

fn key(kind: u8, name: &[u8]) -> Vec<u8> {
    let mut k = keys::queue_start(0).to_vec();
    k.push(kind);
    k.extend_from_slice(name);
    k
}

fn kind_range(kind: u8) -> (Vec<u8>, Vec<u8>) {
    (key(kind, b""), key(kind + 1, b""))
}

/// The metadata group's machine.
pub struct MetaMachine {
    events: mpsc::UnboundedSender<MetaEvent>,
}

impl MetaMachine {
    pub fn new(events: mpsc::UnboundedSender<MetaEvent>) -> MetaMachine {
        MetaMachine { events }
    }

    fn read_definitions(store: &dyn Reader) -> Result<Definitions, StoreError> {
        let mut defs = Definitions::default();
        let (a, b) = kind_range(KIND_EXCHANGE);
        for (k, v) in store.scan(Cf::Replica, &a, &b, usize::MAX)? {
            defs.exchanges.insert(String::from_utf8_lossy(&k[a.len()..]).into_owned(), v);
        }
        let (a, b) = kind_range(KIND_QUEUE);
        for (k, v) in store.scan(Cf::Replica, &a, &b, usize::MAX)? {
            let def = QuorumDef::decode(&v).map_err(|e| StoreError::Corrupt { cf: "replica", detail: e })?;
            defs.queues.insert(String::from_utf8_lossy(&k[a.len()..]).into_owned(), def);
        }
        let (a, b) = kind_range(KIND_BINDING);
        for (k, _) in store.scan(Cf::Replica, &a, &b, usize::MAX)? {
            defs.bindings.insert(k[a.len()..].to_vec());
        }
        Ok(defs)
    }

    fn apply_cmd(&mut self, index: u64, cmd: MetaCmd, store: &mut Overlay<'_>) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        let mut queue = None;
        match &cmd {
            MetaCmd::DeclareExchange(req) => {
                if let Ok(r) = proto::DeclareExchangeRequest::decode(req.as_slice())
                    && !r.passive
                    && store.get(Cf::Replica, &key(KIND_EXCHANGE, r.name.as_bytes()))?.is_none()
                {
                    ops.push(Op::Put(Cf::Replica, key(KIND_EXCHANGE, r.name.as_bytes()), req.clone()));
                }
            }
            MetaCmd::DeleteExchange { name, .. } => {
                ops.push(Op::Delete(Cf::Replica, key(KIND_EXCHANGE, name.as_bytes())));
                ops.extend(self.bindings_touching(store, |b| b.source == *name || b.destination_exchange() == Some(name))?);
            }
            MetaCmd::DeclareQueue { request, members } => {
                if let Ok(r) = proto::DeclareQueueRequest::decode(request.as_slice()) {
                    let k = key(KIND_QUEUE, r.name.as_bytes());
                    match store.get(Cf::Replica, &k)? {
                        Some(existing) => {
                            queue = QuorumDef::decode(&existing).ok();
                        }
                        None => {
                            let ck = key(KIND_COUNTER, b"");
                            let next = store.get(Cf::Replica, &ck)?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(1);
                            let def = QuorumDef {
                                id: QUORUM_ID_BIT | next,
                                request: request.clone(),
                                initial: members.clone(),
                                members: members.clone(),
                            };
                            ops.push(Op::Put(Cf::Replica, ck, (next + 1).to_be_bytes().to_vec()));
                            ops.push(Op::Put(Cf::Replica, k, crate::raft::encode(&def)));
                            queue = Some(def);
                        }
                    }
                }
            }
            MetaCmd::DeleteQueue { name, .. } => {
                let k = key(KIND_QUEUE, name.as_bytes());
                queue = store.get(Cf::Replica, &k)?.and_then(|v| QuorumDef::decode(&v).ok());
                ops.push(Op::Delete(Cf::Replica, k));
                ops.extend(self.bindings_touching(store, |b| b.destination_queue() == Some(name))?);
            }
            MetaCmd::Barrier => {}
            MetaCmd::SetClusterId(id) => {
                if store.get(Cf::Replica, &cluster_id_key())?.is_none() {
                    ops.push(Op::Put(Cf::Replica, cluster_id_key(), id.to_be_bytes().to_vec()));
                }
            }
            MetaCmd::AddQueueMember { name, id, node } | MetaCmd::RemoveQueueMember { name, id, node } => {
                let k = key(KIND_QUEUE, name.as_bytes());
                if let Some(def) = store.get(Cf::Replica, &k)?.and_then(|v| QuorumDef::decode(&v).ok()).filter(|d| d.id == *id) {
                    let (add, remove) =
                        if matches!(cmd, MetaCmd::AddQueueMember { .. }) { (Some(*node), None) } else { (None, Some(*node)) };
                    match change_members(&def, add, remove) {
                        Some(next) => {
                            ops.push(Op::Put(Cf::Replica, k, crate::raft::encode(&next)));
                            queue = Some(next);
                        }
                        None => queue = Some(def),
                    }
                }
            }
            MetaCmd::Bind(req) => ops.push(Op::Put(Cf::Replica, key(KIND_BINDING, req), Vec::new())),
            MetaCmd::Unbind(req) => {
                // An unbind names the same fields as its bind.
                if let Ok(u) = proto::UnbindRequest::decode(req.as_slice()) {
                    let b: proto::BindRequest = u.into();
                    ops.push(Op::Delete(Cf::Replica, key(KIND_BINDING, &b.encode_to_vec())));
                }
            }
        }
        store.write(ops)?;
        let _ = self.events.send(MetaEvent::Apply { index, cmd, queue });
        Ok(())
    }

    fn bindings_touching(&self, store: &Overlay<'_>, pred: impl Fn(&Binding) -> bool) -> Result<Vec<Op>, StoreError> {
        let (a, b) = kind_range(KIND_BINDING);
        let mut ops = Vec::new();
        for (k, _) in store.scan(Cf::Replica, &a, &b, usize::MAX)? {
            if let Ok(req) = proto::BindRequest::decode(&k[a.len()..])
                && pred(&Binding(req))
            {
                ops.push(Op::Delete(Cf::Replica, k));
            }
        }
        Ok(ops)
    }
}

struct Binding(proto::BindRequest);

impl std::ops::Deref for Binding {
    type Target = proto::BindRequest;
    fn deref(&self) -> &proto::BindRequest {
        &self.0
    }
}

impl Binding {
    fn destination_queue(&self) -> Option<&String> {
        (self.0.destination_kind() != proto::DestinationKind::Exchange).then_some(&self.0.destination)
    }

    fn destination_exchange(&self) -> Option<&String> {
        (self.0.destination_kind() == proto::DestinationKind::Exchange).then_some(&self.0.destination)
    }
}

impl GroupMachine for MetaMachine {
    fn apply(&mut self, entry: &Applied<'_>, store: &mut Overlay<'_>) -> Result<LocalReply, StoreError> {
        match crate::raft::decode::<MetaCmd>(entry.data) {
            Ok(cmd) => self.apply_cmd(entry.index, cmd, store)?,
            Err(e) => tracing::error!(index = entry.index, error = %e, "cannot decode a metadata entry; skipped"),
        }
        Ok(None)
    }

    fn restore(&mut self, store: &dyn Reader) -> Result<(), StoreError> {
        let defs = Self::read_definitions(store)?;
        let _ = self.events.send(MetaEvent::Resync(defs));
        Ok(())
    }

    fn ranges(&self) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
        vec![(Cf::Replica, keys::queue_start(0).to_vec(), keys::queue_end(0))]
    }
}

/// What a node's copy of the metadata group is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyState {
    /// The group is not running on it yet.
    Starting,
    /// Running, with no membership: it never formed the group and no
    /// leader reached it.
    Pristine,
    /// It has a membership: the cluster exists.
    Formed,
}

/// What a node with a pristine copy heard from another member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Its copy's state.
    Copy(CopyState),
    /// It refused: it does not list this node in its `--peers` (a cluster
    /// exists that this node is not part of yet).
    Refused,
    /// No answer (down, unreachable, or it could not authenticate us).
    Silent,
}

/// What a node with a pristine copy does, given the other members'
/// answers (`members` counts every listed node, this one included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Formation {
    /// A majority of the members (this one included) are pristine and none
    /// holds or guards a cluster: form the group with every listed node.
    Form,
    /// Some member holds the metadata or refuses this node: a cluster
    /// exists; this node is new (or lost its disk) and waits for the
    /// group's leader to bring it in.
    Join { formed: Vec<NodeId>, refused: Vec<NodeId> },
    /// Too few members answered: wait and ask again.
    Wait { silent: Vec<NodeId> },
}

/// Forms on a majority, so that a new cluster forms while a pod is still
/// pending or one node is misconfigured; any two majorities share a node,
/// and nodes that form at once use the same member list, which openraft
/// treats as one group. A single "formed" or "refused" answer means a
/// cluster exists and stops it: a scale-up from 3 to 7 starts 4 pristine
/// nodes, a majority of 7, while the 3 old nodes (which do not list the
/// new ones yet) refuse them. Had the new nodes formed a group, its
/// leader would have overwritten the old nodes' committed log once they
/// listed the new nodes. (If the old nodes are all down during such a
/// scale-up, nothing tells the new ones that a cluster exists.)
pub fn formation(members: usize, answers: &BTreeMap<NodeId, Answer>) -> Formation {
    let formed: Vec<NodeId> = answers.iter().filter(|(_, a)| **a == Answer::Copy(CopyState::Formed)).map(|(n, _)| *n).collect();
    let refused: Vec<NodeId> = answers.iter().filter(|(_, a)| **a == Answer::Refused).map(|(n, _)| *n).collect();
    if !formed.is_empty() || !refused.is_empty() {
        return Formation::Join { formed, refused };
    }
    let pristine = answers.values().filter(|a| **a == Answer::Copy(CopyState::Pristine)).count();
    if (pristine + 1) * 2 > members {
        return Formation::Form;
    }
    let silent = answers.iter().filter(|(_, a)| **a != Answer::Copy(CopyState::Pristine)).map(|(n, _)| *n).collect();
    Formation::Wait { silent }
}

/// One step the metadata leader takes to bring the group's membership in
/// line with its `--peers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberStep {
    /// A listed node that runs a pristine copy, or a copy of this cluster
    /// (a member removed while it was gone): add it as a learner (it
    /// catches up from the log or a snapshot).
    AddLearner(NodeId),
    /// A listed learner (caught up): make it a voter.
    Promote(NodeId),
    /// A member no longer listed and not reachable (its pod was removed
    /// by a scale-down): remove it, so that the majority is counted over
    /// the nodes that exist.
    Remove(NodeId),
}

/// The next membership step, if any: promotions first (a learner added
/// before a leader change), then additions, then removals; one at a time.
/// A reachable member that is no longer listed is kept (a node started
/// with a shorter `--peers` by mistake must not shrink the cluster), and
/// so is the last voter.
pub fn next_member_step(
    listed: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    addable: &BTreeSet<NodeId>,
    alive: impl Fn(NodeId) -> bool,
) -> Option<MemberStep> {
    if let Some(n) = learners.iter().find(|n| listed.contains(n)) {
        return Some(MemberStep::Promote(*n));
    }
    if let Some(n) = learners.iter().find(|n| !alive(**n)) {
        return Some(MemberStep::Remove(*n));
    }
    if let Some(n) = listed.iter().find(|n| !voters.contains(n) && !learners.contains(n) && addable.contains(n)) {
        return Some(MemberStep::AddLearner(*n));
    }
    if voters.len() > 1
        && let Some(n) = voters.iter().find(|n| !listed.contains(n) && !alive(**n))
    {
        return Some(MemberStep::Remove(*n));
    }
    None
}

/// The result of applying one entry on this node: an encoded response.
pub type Applied2 = std::result::Result<Vec<u8>, WireError>;

/// This node's side of the metadata group.
pub struct Meta {
    host: RaftHost,
    /// Highest entry this node's broker has applied.
    applied: watch::Sender<u64>,
    results: Mutex<BTreeMap<u64, Applied2>>,
    /// This node's copy is known current: it has a membership and has
    /// applied a read barrier committed through the group's leader since
    /// the node started. Until then it serves nothing: a new node holds
    /// no definitions, and a restarted one (or one removed while it was
    /// down) only those of when it stopped.
    current: watch::Sender<bool>,
}

impl Meta {
    /// Starts the metadata group on this node; returns the events its
    /// broker must apply, in order.
    pub async fn start(
        host: RaftHost,
        members: BTreeSet<NodeId>,
    ) -> std::result::Result<(Arc<Meta>, mpsc::UnboundedReceiver<MetaEvent>), String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let meta = Arc::new(Meta {
            host: host.clone(),
            applied: watch::channel(0).0,
            results: Mutex::new(BTreeMap::new()),
            current: watch::channel(false).0,
        });
        serve(&meta, META_PROPOSE, |meta, body| {
            Box::pin(async move {
                let cmd: MetaCmd = crate::raft::decode(&body)?;
                let r: std::result::Result<u64, (Option<NodeId>, String)> =
                    match meta.host.propose(META_GROUP, crate::raft::encode(&cmd)).await {
                        Ok((index, _)) => Ok(index),
                        Err(ProposeError::ForwardToLeader { leader }) => Err((leader, "not the leader".into())),
                        Err(e) => Err((None, e.to_string())),
                    };
                Ok(Bytes::from(crate::raft::encode(&r)))
            })
        });
        serve(&meta, META_CLUSTER_ID, |meta, _| Box::pin(async move { Ok(Bytes::from(crate::raft::encode(&meta.cluster_id()))) }));
        serve(&meta, META_STATE, |meta, _| Box::pin(async move { Ok(Bytes::from(crate::raft::encode(&meta.copy_state().await))) }));
        // Started without a membership: whether this node forms the group
        // or waits to be brought in depends on what the others hold.
        host.start_group(META_GROUP, Box::new(MetaMachine::new(tx)), Bootstrap::Join)
            .await
            .map_err(|e| format!("cannot start the metadata group: {e}"))?;
        if meta.copy_state().await == CopyState::Formed {
            tokio::spawn(become_current(Arc::downgrade(&meta)));
        } else {
            tokio::spawn(form_or_join(Arc::downgrade(&meta), members));
        }
        tokio::spawn(keep_members(Arc::downgrade(&meta)));
        Ok((meta, rx))
    }

    /// Waits (at most [`CURRENT_WAIT`]) until this node's copy of the
    /// metadata is known current: a new node, or one that lost its disk,
    /// serves nothing from an empty copy (a publish would find no
    /// exchange), and a restarted or returning one nothing from a stale
    /// one.
    pub async fn wait_current(&self) -> Result<()> {
        if *self.current.borrow() {
            return Ok(());
        }
        let mut current = self.current.subscribe();
        match tokio::time::timeout(CURRENT_WAIT, current.wait_for(|c| *c)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(
                "this node does not hold the cluster's metadata yet, or not a copy known to be current (it is new, lost its disk, \
                 or was removed from the cluster, and waits for the metadata leader to add it; or it restarted and reaches no \
                 metadata leader: a new cluster forms, and an existing one serves, once a majority of its nodes is up): use \
                 another node or retry"
                    .into(),
            )),
        }
    }

    /// Whether this node's copy is known current (it serves requests).
    pub fn is_current(&self) -> bool {
        *self.current.borrow()
    }

    /// The cluster this node's copy belongs to, once its leader named it.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        stored_cluster_id(&**self.host.store().engine())
    }

    async fn copy_state(&self) -> CopyState {
        match self.host.is_initialized(META_GROUP).await {
            None => CopyState::Starting,
            Some(false) => CopyState::Pristine,
            Some(true) => CopyState::Formed,
        }
    }

    /// Records what applying entry `index` did here.
    pub fn record(&self, index: u64, result: Applied2) {
        let mut r = self.results.lock();
        r.insert(index, result);
        while r.len() > MAX_RESULTS {
            r.pop_first();
        }
        drop(r);
        self.applied.send_if_modified(|a| {
            let moved = index > *a;
            *a = (*a).max(index);
            moved
        });
    }

    /// Waits until this node's broker has applied every change committed
    /// before now (a change made through another node a moment ago is then
    /// visible here): an empty entry through the log, applied here. Bounded;
    /// without a quorum it gives up (the caller answers from what it has)
    /// and says why.
    pub async fn barrier(&self) -> Result<()> {
        match tokio::time::timeout(BARRIER_TIMEOUT, self.change(MetaCmd::Barrier)).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(Error::Unavailable("no read barrier through the metadata leader in time".into())),
        }
    }

    /// Proposes a change and returns what applying it did on this node.
    pub async fn change(&self, cmd: MetaCmd) -> Result<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        let index = self.propose(&cmd, deadline).await?;
        let mut applied = self.applied.subscribe();
        let wait = applied.wait_for(|a| *a >= index);
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(_)) => {}
            _ => return Err(Error::Unavailable("the change committed but this node has not applied it yet; retry".into())),
        }
        match self.results.lock().remove(&index) {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(e)) => Err(e.into()),
            None => {
                Err(Error::Unavailable("the change's result on this node is unknown (too many changes at once); check and retry".into()))
            }
        }
    }

    async fn propose(&self, cmd: &MetaCmd, deadline: tokio::time::Instant) -> Result<u64> {
        let data = crate::raft::encode(cmd);
        let mut last = String::new();
        for attempt in 0..200u32 {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let leader = self.host.leader(META_GROUP).and_then(|l| l.leader);
            let outcome = match leader {
                Some(l) if l == self.host.node_id() => match self.host.propose(META_GROUP, data.clone()).await {
                    Ok((index, _)) => return Ok(index),
                    Err(ProposeError::Unknown { .. }) => {
                        return Err(Error::Unavailable(
                            "the metadata leader changed while the change was committing: it may or may not be applied; check and retry"
                                .into(),
                        ));
                    }
                    Err(e) => e.to_string(),
                },
                Some(l) => match self.host.cluster().call_with_timeout(l, META_PROPOSE, Bytes::from(data.clone()), CHANGE_TIMEOUT).await {
                    Ok(reply) => match crate::raft::decode::<std::result::Result<u64, (Option<NodeId>, String)>>(&reply) {
                        Ok(Ok(index)) => return Ok(index),
                        Ok(Err((_, e))) => e,
                        Err(e) => e,
                    },
                    Err(e) => e.to_string(),
                },
                None => "no metadata leader yet".to_string(),
            };
            last = outcome;
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(10) + 1))).await;
        }
        Err(Error::Unavailable(format!("the cluster's metadata cannot take changes now (no quorum?): {last}")))
    }
}

/// Answers calls of `kind` from other nodes with `answer`, given this
/// node's [`Meta`] (while the node runs).
fn serve<F>(meta: &Arc<Meta>, kind: &str, answer: F)
where
    F: Fn(Arc<Meta>, Bytes) -> BoxFuture<'static, std::result::Result<Bytes, String>> + Send + Sync + 'static,
{
    let weak = Arc::downgrade(meta);
    let answer = Arc::new(answer);
    meta.host.cluster().register_call(
        kind,
        Arc::new(move |_from, body: Bytes| {
            let (weak, answer) = (weak.clone(), answer.clone());
            Box::pin(async move {
                let meta = weak.upgrade().ok_or("the node is stopping")?;
                answer(meta, body).await
            })
        }),
    );
}

/// Asks node `n` what its copy of the metadata group is (`meta.state`).
async fn ask_copy_state(host: &RaftHost, n: NodeId) -> Answer {
    match host.cluster().call_with_timeout(n, META_STATE, Bytes::new(), MEMBERSHIP_TICK * 2).await {
        Ok(b) => crate::raft::decode::<CopyState>(&b).map_or(Answer::Silent, Answer::Copy),
        Err(crate::cluster::CallError::Unreachable { detail, .. }) if detail.contains(crate::cluster::NOT_A_MEMBER) => Answer::Refused,
        Err(_) => Answer::Silent,
    }
}

/// Asks every other member what it holds until this node's copy is formed:
/// by this node when a majority is pristine and no cluster exists (see
/// [`formation`]), or by the leader's replication otherwise (a new node,
/// or one that lost its disk).
async fn form_or_join(meta: std::sync::Weak<Meta>, members: BTreeSet<NodeId>) {
    let Some(host) = meta.upgrade().map(|m| m.host.clone()) else { return };
    let me = host.node_id();
    let mut said = None;
    let mut rounds = 0u64;
    while !host.cluster().is_stopped() {
        match host.is_initialized(META_GROUP).await {
            Some(true) => {
                tracing::info!("this node's copy of the cluster metadata is formed");
                return become_current(meta).await;
            }
            None => return,
            Some(false) => {}
        }
        let asks = members.iter().filter(|n| **n != me).map(|n| async { (*n, ask_copy_state(&host, *n).await) });
        let answers: BTreeMap<NodeId, Answer> = futures::future::join_all(asks).await.into_iter().collect();
        let decision = formation(members.len(), &answers);
        match &decision {
            Formation::Form => match host.form(META_GROUP, members.clone()).await {
                Ok(()) => {
                    tracing::info!(
                        ?members,
                        ?answers,
                        "a majority of the members is new and no cluster exists: formed the cluster metadata"
                    );
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "forming the cluster metadata failed; trying again"),
            },
            // Said once, and again every minute while it lasts.
            Formation::Join { formed, refused } if said.as_ref() != Some(&decision) || rounds.is_multiple_of(120) => tracing::info!(
                ?formed,
                ?refused,
                "a cluster exists (these members hold its metadata, or do not list this node yet): waiting for its leader to add this \
                 node (every member must list it in --peers)"
            ),
            Formation::Wait { silent } if said.as_ref() != Some(&decision) || rounds.is_multiple_of(120) => {
                tracing::info!(?silent, "waiting for these members: a new cluster forms once a majority of the members in --peers is up")
            }
            _ => {}
        }
        said = Some(decision);
        rounds += 1;
        tokio::time::sleep(MEMBERSHIP_TICK).await;
    }
}

/// Waits until this node's formed copy is current: a read barrier proposed
/// through the group's leader and applied here (everything committed
/// before it is then applied here too). Tried until it works: a node
/// removed from the group while it was down reaches no leader until the
/// leader adds it back.
async fn become_current(meta: std::sync::Weak<Meta>) {
    let mut attempts = 0u64;
    loop {
        let Some(m) = meta.upgrade() else { return };
        if m.host.cluster().is_stopped() {
            return;
        }
        match m.barrier().await {
            Ok(()) => {
                m.current.send_replace(true);
                tracing::info!("this node's copy of the cluster metadata is current: serving requests");
                return;
            }
            Err(e) if attempts.is_multiple_of(12) => tracing::info!(
                error = %e,
                "this node's copy of the cluster metadata is not known to be current yet (no metadata leader reachable, or this \
                 node waits to be added back to the cluster): holding requests"
            ),
            Err(_) => {}
        }
        drop(m);
        attempts += 1;
        tokio::time::sleep(MEMBERSHIP_TICK).await;
    }
}

/// Asks node `n` which cluster its copy of the metadata belongs to (`None`:
/// none named yet, or no answer).
async fn ask_cluster_id(host: &RaftHost, n: NodeId) -> Option<ClusterId> {
    let b = host.cluster().call_with_timeout(n, META_CLUSTER_ID, Bytes::new(), MEMBERSHIP_TICK * 2).await.ok()?;
    crate::raft::decode::<Option<ClusterId>>(&b).ok().flatten()
}

/// On the metadata leader: names the cluster if it has no id yet, adds
/// nodes listed in `--peers` that run a pristine copy or a copy of this
/// cluster (a member removed while it was gone), and removes members no
/// longer listed that are gone, one step at a time (see
/// [`next_member_step`]).
async fn keep_members(meta: std::sync::Weak<Meta>) {
    loop {
        tokio::time::sleep(MEMBERSHIP_TICK * 4).await;
        let Some(meta) = meta.upgrade() else { return };
        let host = meta.host.clone();
        if host.cluster().is_stopped() {
            return;
        }
        let Some(status) = host.status(META_GROUP) else { continue };
        if status.role != crate::raft::Role::Leader {
            continue;
        }
        let ours = meta.cluster_id();
        if ours.is_none() {
            let id: ClusterId = rand::random();
            match meta.change(MetaCmd::SetClusterId(id)).await {
                Ok(_) => tracing::info!(cluster_id = %format!("{:032x}", meta.cluster_id().unwrap_or(id)), "named the cluster"),
                Err(e) => tracing::warn!(error = %e, "naming the cluster failed; trying again"),
            }
            continue;
        }
        drop(meta);
        let listed: BTreeSet<NodeId> = host.cluster().members().collect();
        let (voters, learners) = (status.voters, status.learners);
        let mut addable = BTreeSet::new();
        for n in listed.iter().filter(|n| !voters.contains(n) && !learners.contains(n)) {
            match ask_copy_state(&host, *n).await {
                Answer::Copy(CopyState::Pristine) => {
                    addable.insert(*n);
                }
                Answer::Copy(CopyState::Formed) => {
                    let theirs = ask_cluster_id(&host, *n).await;
                    if theirs.is_some() && theirs == ours {
                        addable.insert(*n);
                    } else {
                        tracing::warn!(
                            node = n,
                            theirs = %theirs.map_or("none".to_string(), |id| format!("{id:032x}")),
                            "a listed node holds metadata of another cluster (or of this one from before it was named); it is not \
                             added: wipe its data directory to add it"
                        )
                    }
                }
                _ => {}
            }
        }
        let liveness = host.cluster().liveness();
        let Some(step) = next_member_step(&listed, &voters, &learners, &addable, |n| liveness.is_alive(n)) else { continue };
        tracing::info!(?step, ?voters, ?learners, "changing the cluster metadata's membership");
        let done = tokio::time::timeout(MEMBERSHIP_STEP_TIMEOUT, async {
            match step {
                MemberStep::AddLearner(n) => host.add_learner(META_GROUP, n).await,
                MemberStep::Promote(n) => host.promote(META_GROUP, n).await,
                MemberStep::Remove(n) => host.remove_member(META_GROUP, n).await,
            }
        })
        .await;
        match done {
            Ok(Ok(())) => tracing::info!(?step, "the cluster metadata's membership changed"),
            Ok(Err(e)) => tracing::warn!(?step, error = %e, "changing the cluster metadata's membership failed; trying again"),
            Err(_) => tracing::warn!(?step, "changing the cluster metadata's membership took too long; trying again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(a: &[(NodeId, Answer)]) -> BTreeMap<NodeId, Answer> {
        a.iter().copied().collect()
    }

    #[test]
    fn should_form_on_a_majority_unless_a_cluster_exists() {
        use Answer::*;
        use CopyState::*;
        assert_eq!(formation(1, &answers(&[])), Formation::Form, "a cluster of one");
        assert_eq!(formation(3, &answers(&[(2, Copy(Pristine)), (3, Copy(Pristine))])), Formation::Form);
        // A pod still pending, or a node with another cluster's secret:
        // the other two are a majority.
        assert_eq!(formation(3, &answers(&[(2, Copy(Pristine)), (3, Silent)])), Formation::Form);
        assert_eq!(formation(3, &answers(&[(2, Copy(Starting)), (3, Silent)])), Formation::Wait { silent: vec![2, 3] });
        assert_eq!(formation(4, &answers(&[(2, Copy(Pristine)), (3, Silent), (4, Silent)])), Formation::Wait { silent: vec![3, 4] });
        // A scale-up from 3 to 7: the old nodes refuse the new ones (they
        // do not list them yet); the 4 new ones are a majority of 7, yet
        // no group is formed.
        let scale_up = answers(&[(1, Refused), (2, Refused), (3, Silent), (5, Copy(Pristine)), (6, Copy(Pristine)), (7, Copy(Pristine))]);
        assert_eq!(formation(7, &scale_up), Formation::Join { formed: vec![], refused: vec![1, 2] });
        // A node that lost its disk, or a new one the others list already.
        assert_eq!(formation(3, &answers(&[(1, Copy(Formed)), (3, Copy(Pristine))])), Formation::Join { formed: vec![1], refused: vec![] });
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn should_add_listed_pristine_nodes_as_learners_then_voters() {
        let alive = |_| true;
        let step = next_member_step(&set(&[1, 2, 3, 4, 5]), &set(&[1, 2, 3]), &set(&[]), &set(&[4, 5]), alive);
        assert_eq!(step, Some(MemberStep::AddLearner(4)));
        let step = next_member_step(&set(&[1, 2, 3, 4, 5]), &set(&[1, 2, 3]), &set(&[4]), &set(&[5]), alive);
        assert_eq!(step, Some(MemberStep::Promote(4)), "a learner is promoted before the next node is added");
        // A listed node that did not say it is pristine (down, or holding
        // another group's state) is not added.
        assert_eq!(next_member_step(&set(&[1, 2, 3, 4]), &set(&[1, 2, 3]), &set(&[]), &set(&[]), alive), None);
    }

    #[test]
    fn should_keep_the_first_cluster_id_applied() {
        let engine = crate::store::memory::MemoryEngine::new();
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut m = MetaMachine::new(tx);
        assert_eq!(stored_cluster_id(&engine), None);
        for (index, id) in [(1, 7u128 << 100), (2, 9)] {
            let mut writes = crate::store::overlay::Unwritten::default();
            m.apply_cmd(index, MetaCmd::SetClusterId(id), &mut Overlay::new(&engine, &mut writes)).unwrap();
            crate::store::Engine::write(&engine, &writes.take_ops(), false).unwrap();
        }
        // Two leaders may each draw one (a leader change in between): every
        // replica keeps the first in the log.
        assert_eq!(stored_cluster_id(&engine), Some(7u128 << 100));
    }

    #[test]
    fn should_remove_only_unlisted_members_that_are_gone() {
        let listed = set(&[1, 2, 3]);
        let step = next_member_step(&listed, &set(&[1, 2, 3, 4, 5]), &set(&[]), &set(&[]), |n| n <= 3);
        assert_eq!(step, Some(MemberStep::Remove(4)));
        // Still up: kept (a node started with a shorter --peers by mistake
        // does not shrink the cluster).
        assert_eq!(next_member_step(&listed, &set(&[1, 2, 3, 4]), &set(&[]), &set(&[]), |_| true), None);
        // A learner that went away before its promotion is removed.
        assert_eq!(next_member_step(&listed, &set(&[1, 2, 3]), &set(&[7]), &set(&[]), |n| n != 7), Some(MemberStep::Remove(7)));
        // The last voter stays.
        assert_eq!(next_member_step(&set(&[9]), &set(&[1]), &set(&[]), &set(&[]), |_| false), None);
    }

    fn def(members: &[NodeId]) -> QuorumDef {
        QuorumDef { id: QUORUM_ID_BIT | 7, request: vec![1, 2, 3], initial: members.to_vec(), members: members.to_vec() }
    }

    #[test]
    fn should_add_a_member_once() {
        let d = def(&[1, 2, 3]);
        let grown = change_members(&d, Some(4), None).unwrap();
        assert_eq!(grown.members, vec![1, 2, 3, 4]);
        assert_eq!(grown.initial, vec![1, 2, 3], "the formed set never changes");
        assert!(!grown.as_formed());
        assert_eq!(change_members(&grown, Some(4), None), None, "adding again changes nothing");
    }

    #[test]
    fn should_remove_a_member_but_never_the_last() {
        let d = def(&[1, 2]);
        let shrunk = change_members(&d, None, Some(1)).unwrap();
        assert_eq!(shrunk.members, vec![2]);
        assert_eq!(change_members(&shrunk, None, Some(1)), None, "removing again changes nothing");
        assert_eq!(change_members(&shrunk, None, Some(2)), None, "the last replica stays");
        // Back to the formed set: as formed again.
        let back = change_members(&change_members(&d, Some(3), None).unwrap(), None, Some(3)).unwrap();
        assert!(back.as_formed());
    }

    #[test]
    fn should_read_definitions_stored_before_replica_sets_could_change() {
        #[derive(Serialize)]
        struct Old {
            id: QueueId,
            request: Vec<u8>,
            members: Vec<NodeId>,
        }
        let old = crate::raft::encode(&Old { id: QUORUM_ID_BIT | 9, request: vec![9; 40], members: vec![2, 3, 1] });
        let d = QuorumDef::decode(&old).unwrap();
        assert_eq!((d.id, d.request.len()), (QUORUM_ID_BIT | 9, 40));
        assert_eq!((d.initial.clone(), d.members.clone()), (vec![2, 3, 1], vec![2, 3, 1]));
        let new = def(&[1, 2, 3]);
        let grown = change_members(&new, Some(5), None).unwrap();
        assert_eq!(QuorumDef::decode(&crate::raft::encode(&grown)).unwrap(), grown);
    }
}
