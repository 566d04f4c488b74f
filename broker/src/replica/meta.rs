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
}

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

/// The result of applying one entry on this node: an encoded response.
pub type Applied2 = std::result::Result<Vec<u8>, WireError>;

/// This node's side of the metadata group.
pub struct Meta {
    host: RaftHost,
    /// Highest entry this node's broker has applied.
    applied: watch::Sender<u64>,
    results: Mutex<BTreeMap<u64, Applied2>>,
}

impl Meta {
    /// Starts the metadata group on this node; returns the events its
    /// broker must apply, in order.
    pub async fn start(
        host: RaftHost,
        members: BTreeSet<NodeId>,
    ) -> std::result::Result<(Arc<Meta>, mpsc::UnboundedReceiver<MetaEvent>), String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let meta = Arc::new(Meta { host: host.clone(), applied: watch::channel(0).0, results: Mutex::new(BTreeMap::new()) });
        let weak = Arc::downgrade(&meta);
        host.cluster().register_call(
            META_PROPOSE,
            Arc::new(move |_from, body: Bytes| {
                let weak = weak.clone();
                Box::pin(async move {
                    let meta = weak.upgrade().ok_or("the node is stopping")?;
                    let cmd: MetaCmd = crate::raft::decode(&body)?;
                    let r: std::result::Result<u64, (Option<NodeId>, String)> =
                        match meta.host.propose(META_GROUP, crate::raft::encode(&cmd)).await {
                            Ok((index, _)) => Ok(index),
                            Err(ProposeError::ForwardToLeader { leader }) => Err((leader, "not the leader".into())),
                            Err(e) => Err((None, e.to_string())),
                        };
                    Ok(Bytes::from(crate::raft::encode(&r)))
                })
            }),
        );
        host.start_group(META_GROUP, Box::new(MetaMachine::new(tx)), Bootstrap::Members(members))
            .await
            .map_err(|e| format!("cannot start the metadata group: {e}"))?;
        Ok((meta, rx))
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
    /// without a quorum it gives up (the caller answers from what it has).
    pub async fn barrier(&self) {
        let _ = tokio::time::timeout(BARRIER_TIMEOUT, self.change(MetaCmd::Barrier)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

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
