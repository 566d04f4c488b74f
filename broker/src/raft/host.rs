//! [`RaftHost`]: the Raft groups of one node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use parking_lot::{Mutex, RwLock};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;

use super::keys::{self, StateKind};
use super::log_store::{LogStats, LogStore, Tally};
use super::machine::{GroupId, GroupMachine, LocalReply, NodeId};
use super::network::{NetStats, NetworkFactory, RAFT_CALL, RAFT_SNAPSHOT, Rpc, RpcReply, SnapshotHeader};
use super::quiet::QuietState;
use super::snapshot::SnapshotFile;
use super::state_machine::{Snapshots, StateMachine, WriteGate};
use super::types::{Proposal, Raft, TypeConfig, decode, encode};
use crate::cluster::{Cluster, Duplex};
use crate::store::{Cf, Op, Store};

/// How long a stopping group may take to write what it applied.
const STOP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Timing and log retention of every group on a node.
#[derive(Clone, Debug)]
pub struct RaftOptions {
    /// A leader's heartbeat to its followers.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in
    /// `[election_min, election_max)` starts an election.
    pub election_min: Duration,
    pub election_max: Duration,
    /// A candidate first asks whether it could win (pre-vote), so that a
    /// node cut off for a while does not depose a healthy leader when it
    /// comes back.
    pub pre_vote: bool,
    /// A group builds a snapshot after this many entries since its last
    /// one, then purges its log up to it (minus `logs_to_keep`).
    pub snapshot_after: u64,
    /// Entries kept below a snapshot, so that a follower slightly behind
    /// catches up from the log rather than from a snapshot.
    pub logs_to_keep: u64,
    /// Largest append message to one follower (bigger ones are cut).
    pub max_append_bytes: usize,
    /// A group whose log has not changed for this long goes quiet: no
    /// ticks, no heartbeats, no election timer, the node-pair liveness
    /// heartbeat standing in for them (see `quiet.rs`). `None`: groups
    /// never go quiet.
    pub quiet_after: Option<Duration>,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            heartbeat: Duration::from_millis(250),
            election_min: Duration::from_millis(1000),
            election_max: Duration::from_millis(2000),
            pre_vote: true,
            snapshot_after: 10_000,
            logs_to_keep: 1_000,
            max_append_bytes: 8 << 20,
            quiet_after: Some(Duration::from_secs(3)),
        }
    }
}

impl RaftOptions {
    fn openraft_config(&self) -> Result<openraft::Config, String> {
        let config = openraft::Config {
            cluster_name: "warren".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            enable_pre_vote: Some(self.pre_vote),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            install_snapshot_timeout: 10_000,
            // A node whose disk was lost comes back with an empty log; the
            // leader must then start its replication from scratch rather
            // than treat the follower's shorter log as a bug (by default
            // openraft asserts in debug builds and stalls replication to
            // it). What it lost was committed on a majority elsewhere.
            allow_log_reversion: Some(true),
            ..Default::default()
        };
        config.validate().map_err(|e| e.to_string())
    }
}

/// How a group that has never run gets its first membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Form the group with these voters if this node's copy is pristine.
    /// Every member is started with the same set, all at once if need be:
    /// openraft elects one leader among nodes initialized with identical
    /// memberships (and a node whose log already has entries ignores it).
    Members(BTreeSet<NodeId>),
    /// Wait to be added by the group's leader (a learner, then a voter).
    Join,
}

/// Why a proposal was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the group: propose on `leader` (unknown
    /// while an election runs). Nothing was appended.
    #[error("not the leader of the group; the leader is {leader:?}")]
    ForwardToLeader { leader: Option<NodeId> },
    /// The entry was appended but leadership changed before it committed:
    /// it may or may not be applied. Retry only what is idempotent.
    #[error("leadership changed before the entry committed; it may or may not be applied (leader now {leader:?})")]
    Unknown { leader: Option<NodeId> },
    #[error("group {0} is not running on this node")]
    NoGroup(GroupId),
    #[error("the group is stopping: {0}")]
    Stopped(String),
}

impl ProposeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProposeError::ForwardToLeader { .. } => "forward_to_leader",
            ProposeError::Unknown { .. } => "unknown",
            ProposeError::NoGroup(_) => "no_group",
            ProposeError::Stopped(_) => "stopped",
        }
    }
}

/// Why starting, changing or stopping a group failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("group {0} is running already")]
    AlreadyRunning(GroupId),
    #[error("group {0} is not running on this node")]
    NoGroup(GroupId),
    #[error("not the leader of the group; the leader is {leader:?}")]
    ForwardToLeader { leader: Option<NodeId> },
    #[error("{0}")]
    Failed(String),
}

/// A group's role on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Candidate,
    Follower,
    Learner,
    Shutdown,
}

/// Who leads a group, as this node knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderInfo {
    pub leader: Option<NodeId>,
    pub term: u64,
}

/// What a follower lacks of the leader's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    pub entries: u64,
    /// Bytes of those entries as stored.
    pub bytes: u64,
    /// Messages they carry (published or dead-lettered into the queue).
    pub messages: u64,
    /// False when the follower is older than the entries the leader still
    /// counts (far behind, or in need of a snapshot): `bytes` and
    /// `messages` are then lower bounds.
    pub exact: bool,
}

/// A group's state on this node, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupId,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    /// Index up to which the current snapshot reaches.
    pub snapshot: Option<u64>,
    /// Index up to which the log is purged.
    pub purged: Option<u64>,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// On the leader: what each other member lacks.
    pub lag: BTreeMap<NodeId, Lag>,
    /// Leaders this node has seen elected in the group since it started it.
    pub elections: u64,
}

pub(super) struct Group {
    pub(super) raft: Raft,
    snapshots: Arc<Snapshots>,
    pub(super) leader: watch::Receiver<LeaderInfo>,
    watcher: tokio::task::JoinHandle<()>,
    /// Membership changes of this group from this node, one at a time.
    changing: tokio::sync::Mutex<()>,
    /// Whether the group is quiet on this node, and since when its log
    /// has not changed.
    pub(super) quiet: QuietState,
    /// Leaders elected in the group, as this node saw them.
    elections: Arc<AtomicU64>,
    /// Bytes and messages of the entries a member may still lack.
    tally: Arc<Mutex<Tally>>,
    /// Closed when the group stops: its state machine writes nothing more.
    gate: WriteGate,
}

pub(super) struct Inner {
    pub(super) cluster: Cluster,
    store: Store,
    /// A second writer over the same store, for the queues' applied state
    /// (see `StateMachine::with_state_writer`).
    state_writer: Store,
    dir: PathBuf,
    pub(super) options: RaftOptions,
    config: Arc<openraft::Config>,
    groups: RwLock<HashMap<GroupId, Arc<Group>>>,
    /// Groups being started (so that two starts of one group race safely).
    starting: Mutex<BTreeSet<GroupId>>,
    stats: Arc<LogStats>,
    /// Raft messages this node sent, by kind.
    net: Arc<NetStats>,
    /// Groups quiet on this node (the `warren_raft_groups_quiet` gauge).
    pub(super) quiet_groups: Arc<AtomicU64>,
}

/// The Raft groups of one node, over its store and its cluster
/// connections. Cheap to clone.
#[derive(Clone)]
pub struct RaftHost {
    pub(super) inner: Arc<Inner>,
}

/// Has a group's state machine write what it applied to the store (see
/// `StateMachine::write_applied`), between two applied batches.
async fn write_applied(raft: &Raft) -> Result<std::io::Result<()>, openraft::error::Fatal<TypeConfig>> {
    raft.with_state_machine(|sm: &mut StateMachine| Box::pin(async move { sm.write_applied().await })).await
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

impl RaftHost {
    /// A host for this node's groups; snapshot files live under `dir`.
    /// Registers the Raft handlers on `cluster`.
    pub fn new(cluster: Cluster, store: Store, dir: PathBuf, options: RaftOptions) -> Result<RaftHost, String> {
        let config = Arc::new(options.openraft_config()?);
        let host = RaftHost {
            inner: Arc::new(Inner {
                cluster,
                state_writer: Store::new(store.engine().clone(), None),
                store,
                dir,
                options,
                config,
                groups: RwLock::default(),
                starting: Mutex::default(),
                stats: Arc::default(),
                net: Arc::default(),
                quiet_groups: Arc::default(),
            }),
        };
        let weak = Arc::downgrade(&host.inner);
        host.inner.cluster.register_call(
            RAFT_CALL,
            Arc::new(move |_from, body| {
                let weak = weak.clone();
                Box::pin(async move {
                    let Some(inner) = weak.upgrade() else { return Err("the node is stopping".to_string()) };
                    let reply = RaftHost { inner }.handle_rpc(body).await;
                    Ok(Bytes::from(encode(&reply)))
                })
            }),
        );
        let weak = Arc::downgrade(&host.inner);
        host.inner.cluster.register_stream(
            RAFT_SNAPSHOT,
            Arc::new(move |from, duplex| {
                let weak = weak.clone();
                Box::pin(async move {
                    if let Some(inner) = weak.upgrade() {
                        RaftHost { inner }.receive_snapshot(from, duplex).await;
                    }
                })
            }),
        );
        tokio::spawn(super::quiet::run(Arc::downgrade(&host.inner)));
        Ok(host)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.cluster.node_id()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    pub fn options(&self) -> &RaftOptions {
        &self.inner.options
    }

    /// Counters of log appends across every group (appends, entries).
    pub fn log_stats(&self) -> &Arc<LogStats> {
        &self.inner.stats
    }

    /// Counters of Raft messages this node sent (appends, heartbeats, votes).
    pub fn net_stats(&self) -> &Arc<NetStats> {
        &self.inner.net
    }

    /// How many groups are quiet on this node (shared with `/metrics`).
    pub fn quiet_groups(&self) -> Arc<AtomicU64> {
        self.inner.quiet_groups.clone()
    }

    /// Whether `group` is quiet on this node.
    pub fn is_quiet(&self, group: GroupId) -> bool {
        self.group(group).is_some_and(|g| g.quiet.is_quiet())
    }

    pub(super) fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.inner.groups.read().get(&group).cloned()
    }

    /// The groups running on this node.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut v: Vec<GroupId> = self.inner.groups.read().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Every running group with its state (for the quiescence scan).
    pub(super) fn all_groups(&self) -> Vec<(GroupId, Arc<Group>)> {
        self.inner.groups.read().iter().map(|(id, g)| (*id, g.clone())).collect()
    }

    /// Starts `group` on this node with `machine` as its state. A group
    /// that ran here before resumes from the store (its log, vote and
    /// applied state); `bootstrap` matters only to a pristine one.
    pub async fn start_group(&self, group: GroupId, machine: Box<dyn GroupMachine>, bootstrap: Bootstrap) -> Result<(), GroupError> {
        if self.group(group).is_some() || !self.inner.starting.lock().insert(group) {
            return Err(GroupError::AlreadyRunning(group));
        }
        let result = self.start_inner(group, machine, bootstrap).await;
        self.inner.starting.lock().remove(&group);
        result
    }

    async fn start_inner(&self, group: GroupId, machine: Box<dyn GroupMachine>, bootstrap: Bootstrap) -> Result<(), GroupError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| GroupError::Failed(format!("starting group {group}: {what}: {e}"));
        let snapshots = Arc::new(Snapshots::open(self.snapshot_dir(group)).map_err(|e| failed("snapshot directory", &e))?);
        let tally = Arc::new(Mutex::new(Tally::default()));
        let log = LogStore::new(group, self.inner.store.clone(), self.inner.stats.clone(), tally.clone(), machine.weigher());
        let gate = WriteGate::default();
        let sm = StateMachine::open(group, self.inner.store.clone(), machine, snapshots.clone())
            .await
            .map_err(|e| failed("state", &e))?
            .with_applied_hook(log.applied_hook())
            .with_stats(self.inner.stats.clone())
            .with_state_writer(self.inner.state_writer.clone())
            .with_write_gate(gate.clone());
        let network = NetworkFactory {
            cluster: self.inner.cluster.clone(),
            group,
            max_append_bytes: self.inner.options.max_append_bytes,
            stats: self.inner.net.clone(),
        };
        let raft = Raft::new(self.node_id(), self.inner.config.clone(), network, log, sm).await.map_err(|e| failed("raft", &e))?;
        if let Bootstrap::Members(members) = bootstrap {
            form(group, &raft, members).await?;
        }
        let (tx, rx) = watch::channel(LeaderInfo::default());
        let elections = Arc::new(AtomicU64::new(0));
        let watcher = tokio::spawn(watch_group(group, self.node_id(), raft.clone(), tx, elections.clone(), tally.clone()));
        let g = Arc::new(Group {
            raft,
            snapshots,
            leader: rx,
            watcher,
            changing: tokio::sync::Mutex::new(()),
            quiet: QuietState::default(),
            elections,
            tally,
            gate,
        });
        self.inner.groups.write().insert(group, g);
        Ok(())
    }

    /// Whether this node's copy of `group` has a membership (it formed the
    /// group or a leader reached it); `None` when the group is not running
    /// here.
    pub async fn is_initialized(&self, group: GroupId) -> Option<bool> {
        let g = self.group(group)?;
        g.raft.is_initialized().await.ok()
    }

    /// Forms a running `group` with `members` as its voters, unless this
    /// node's copy has a membership already (as [`Bootstrap::Members`] at
    /// start-up).
    pub async fn form(&self, group: GroupId, members: BTreeSet<NodeId>) -> Result<(), GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        form(group, &g.raft, members).await
    }

    fn snapshot_dir(&self, group: GroupId) -> PathBuf {
        self.inner.dir.join(format!("{group:016x}"))
    }

    /// Stops `group` on this node; its state stays in the store.
    pub async fn stop_group(&self, group: GroupId) -> Result<(), GroupError> {
        self.stop(group, true).await
    }

    /// Stops `group`; with `write`, what it applied goes to the store first
    /// (so that a restart need not apply it again; a failure costs only
    /// that). Either way its state machine writes nothing afterwards.
    async fn stop(&self, group: GroupId, write: bool) -> Result<(), GroupError> {
        let g = self.inner.groups.write().remove(&group).ok_or(GroupError::NoGroup(group))?;
        g.watcher.abort();
        if g.quiet.forget() {
            self.inner.quiet_groups.fetch_sub(1, Ordering::Relaxed);
        }
        if write {
            match tokio::time::timeout(STOP_WRITE_TIMEOUT, write_applied(&g.raft)).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(group, error = %e, "cannot write the applied state of a stopping group"),
                Ok(Err(e)) => tracing::debug!(group, error = %e, "the group stopped before its applied state was written"),
                Err(_) => tracing::warn!(group, "the applied state of a stopping group was not written in time"),
            }
        }
        g.gate.close();
        if let Err(e) = g.raft.shutdown().await {
            tracing::warn!(group, error = %e, "group did not stop cleanly");
        }
        Ok(())
    }

    /// Stops `group` and deletes everything this node holds of it: log,
    /// vote, applied state, its machine's ranges (`ranges`, as the machine
    /// reports them) and snapshot files. For a replica moved away or a
    /// deleted queue.
    pub async fn delete_group(&self, group: GroupId, ranges: Vec<(Cf, Vec<u8>, Vec<u8>)>) -> Result<(), GroupError> {
        let snapshots = self.group(group).map(|g| g.snapshots.clone());
        let _ = self.stop(group, false).await;
        // The state machine writes nothing from here on; what it sent
        // before must land before the deletion, not after it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.state_writer.after_writes(move || {
            let _ = tx.send(());
        });
        let _ = rx.await;
        let mut ops: Vec<Op> = ranges.into_iter().map(|(cf, a, b)| Op::DeleteRange(cf, a, b)).collect();
        let (a, b) = keys::log_range(group, 0, None);
        ops.push(Op::DeleteRange(Cf::RaftLog, a, b));
        let (a, b) = keys::state_range(group);
        ops.push(Op::DeleteRange(Cf::RaftState, a, b));
        self.inner.store.write(ops, true).await.map_err(|e| GroupError::Failed(e.to_string()))?;
        match snapshots {
            Some(s) => s.remove_all(),
            None => {
                let _ = std::fs::remove_dir_all(self.snapshot_dir(group));
            }
        }
        Ok(())
    }

    /// Runs `f` over the state `group` has applied on this node (its
    /// store ranges with the writes not in the store yet on top), between
    /// two applied batches.
    pub async fn read_applied<T: Send + 'static>(
        &self,
        group: GroupId,
        f: impl FnOnce(&dyn crate::store::Reader) -> T + Send + 'static,
    ) -> Result<T, GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        g.raft
            .with_state_machine(move |sm: &mut StateMachine| {
                let value = sm.read(f);
                Box::pin(async move { value })
            })
            .await
            .map_err(|e| GroupError::Failed(e.to_string()))
    }

    /// Has `group` write what it applied to the store, in the background
    /// (an idle group: it may stay so for long).
    pub(super) fn write_applied_soon(&self, group: GroupId, g: &Group) {
        let raft = g.raft.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = write_applied(&raft).await {
                tracing::warn!(group, error = %e, "cannot write the applied state of an idle group");
            }
        });
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        for group in self.groups() {
            let _ = self.stop_group(group).await;
        }
    }

    /// Proposes `data` to `group`: returns once the entry is committed (on
    /// a majority, synced) and applied here, with its log index and what
    /// applying it returned. Only the leader accepts proposals.
    pub async fn propose(&self, group: GroupId, data: Vec<u8>) -> Result<(u64, LocalReply), ProposeError> {
        let g = self.group(group).ok_or(ProposeError::NoGroup(group))?;
        // A quiet leader wakes its group, and renews its lease first if it
        // expired (a leader whose lease expired refuses writes).
        self.wake(group, &g, "proposal");
        self.renew_lease_if_stale(group, &g, self.inner.options.election_max).await;
        match g.raft.client_write(Proposal { now_ms: now_ms(), data }).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data.0)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ProposeError::ForwardToLeader { leader: f.leader_id }),
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => Err(ProposeError::Unknown { leader: f.leader_id }),
            Err(RaftError::APIError(e)) => Err(ProposeError::Stopped(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ProposeError::Stopped(e.to_string())),
        }
    }

    /// Who leads `group`, as this node knows it.
    pub fn leader(&self, group: GroupId) -> Option<LeaderInfo> {
        self.group(group).map(|g| *g.leader.borrow())
    }

    /// A receiver that wakes on every change of `group`'s leader or term.
    pub fn watch_leader(&self, group: GroupId) -> Option<watch::Receiver<LeaderInfo>> {
        self.group(group).map(|g| g.leader.clone())
    }

    /// `group`'s state on this node.
    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let g = self.group(group)?;
        let m = g.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let last = m.last_log_index.unwrap_or(0);
        let lag = m
            .replication
            .as_ref()
            .map(|r| {
                let tally = g.tally.lock();
                r.iter()
                    .filter(|(id, _)| **id != m.id)
                    .map(|(id, matched)| {
                        let matched = matched.as_ref().map(|l| l.index);
                        let (weight, exact) = tally.lacking(matched);
                        let entries = last.saturating_sub(matched.unwrap_or(0));
                        (*id, Lag { entries, bytes: weight.bytes, messages: weight.messages, exact })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(GroupStatus {
            group,
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Candidate => Role::Candidate,
                ServerState::Follower => Role::Follower,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed: m.cluster_committed.as_ref().map(|l| l.index),
            applied: m.last_applied.as_ref().map(|l| l.index),
            snapshot: m.snapshot.as_ref().map(|l| l.index),
            purged: m.purged.as_ref().map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            lag,
            elections: g.elections.load(Ordering::Relaxed),
        })
    }

    fn membership_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> GroupError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => GroupError::ForwardToLeader { leader: f.leader_id },
            e => GroupError::Failed(e.to_string()),
        }
    }

    /// On the leader: adds `node` to `group` as a learner and waits until
    /// it has caught up (from the log, or a snapshot).
    pub async fn add_learner(&self, group: GroupId, node: NodeId) -> Result<(), GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        let _one = g.changing.lock().await;
        self.wake(group, &g, "membership change");
        self.renew_lease_if_stale(group, &g, self.inner.options.election_max).await;
        g.raft.add_learner(node, (), true).await.map(|_| ()).map_err(Self::membership_error)
    }

    /// On the leader: makes the learner `node` a voter.
    pub async fn promote(&self, group: GroupId, node: NodeId) -> Result<(), GroupError> {
        self.change(group, ChangeMembers::AddVoterIds(BTreeSet::from([node]))).await
    }

    /// On the leader: removes `node` from `group` (voter or learner).
    pub async fn remove_member(&self, group: GroupId, node: NodeId) -> Result<(), GroupError> {
        let status = self.status(group).ok_or(GroupError::NoGroup(group))?;
        if status.voters.contains(&node) {
            self.change(group, ChangeMembers::RemoveVoters(BTreeSet::from([node]))).await?;
        }
        let status = self.status(group).ok_or(GroupError::NoGroup(group))?;
        if status.learners.contains(&node) {
            self.change(group, ChangeMembers::RemoveNodes(BTreeSet::from([node]))).await?;
        }
        Ok(())
    }

    async fn change(&self, group: GroupId, change: ChangeMembers<NodeId, ()>) -> Result<(), GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        let _one = g.changing.lock().await;
        self.wake(group, &g, "membership change");
        self.renew_lease_if_stale(group, &g, self.inner.options.election_max).await;
        g.raft.change_membership(change, false).await.map(|_| ()).map_err(Self::membership_error)
    }

    /// On the leader: hands leadership of `group` to `to` (which must be
    /// a voter that is up to date); returns once asked, not once done:
    /// watch [`Self::watch_leader`].
    pub async fn transfer_leader(&self, group: GroupId, to: NodeId) -> Result<(), GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        self.wake(group, &g, "leadership transfer");
        g.raft.trigger().transfer_leader(to).await.map_err(|e| GroupError::Failed(e.to_string()))
    }

    /// Builds a snapshot of `group` now (the log is purged after it, down
    /// to `logs_to_keep` entries).
    pub async fn snapshot(&self, group: GroupId) -> Result<(), GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        g.raft.trigger().snapshot().await.map_err(|e| GroupError::Failed(e.to_string()))
    }

    /// Starts an election of `group` now (a follower that knows its leader
    /// is gone need not wait for its election timeout).
    pub async fn elect(&self, group: GroupId) -> Result<(), GroupError> {
        let g = self.group(group).ok_or(GroupError::NoGroup(group))?;
        self.wake(group, &g, "election requested");
        g.raft.trigger().elect(self.inner.options.pre_vote).await.map_err(|e| GroupError::Failed(e.to_string()))
    }

    async fn handle_rpc(&self, body: Bytes) -> Result<RpcReply, String> {
        let (group, rpc): (GroupId, Rpc) = decode(&body)?;
        let g = self.group(group).ok_or_else(|| format!("group {group} is not running on node {}", self.node_id()))?;
        let raft = &g.raft;
        match rpc {
            Rpc::Append(r) => {
                // Entries wake a quiet follower (a heartbeat alone does not:
                // a follower goes quiet before its leader stops sending
                // them). It wakes once the append has renewed its lease.
                let entries = !r.entries.is_empty();
                let reply = raft.append_entries(r).await.map(RpcReply::Append).map_err(|e| e.to_string());
                if entries {
                    self.wake(group, &g, "entries received");
                }
                reply
            }
            Rpc::Vote(r) => {
                let candidate = r.vote.leader_id().voted_for;
                self.before_vote(group, &g, candidate).await;
                raft.vote(r).await.map(RpcReply::Vote).map_err(|e| e.to_string())
            }
            Rpc::PreVote(r) => {
                let candidate = r.vote.leader_id().voted_for;
                self.before_vote(group, &g, candidate).await;
                raft.pre_vote(r).await.map(RpcReply::Vote).map_err(|e| e.to_string())
            }
            Rpc::TransferLeader(r) => {
                self.wake(group, &g, "leadership transfer");
                raft.handle_transfer_leader(r).await.map(RpcReply::TransferLeader).map_err(|e| e.to_string())
            }
            Rpc::Wake => {
                self.wake(group, &g, "asked by a follower");
                self.renew_lease_if_stale(group, &g, self.inner.options.heartbeat * 2).await;
                Ok(RpcReply::Woken)
            }
        }
    }

    /// Receives a snapshot into a file, installs it, answers once.
    async fn receive_snapshot(&self, from: NodeId, mut duplex: Duplex) {
        let reply = self.receive_snapshot_inner(from, &mut duplex.rx).await;
        if let Err(e) = &reply {
            tracing::warn!(from, error = %e, "snapshot not installed");
        }
        let _ = duplex.tx.send(Bytes::from(encode(&reply))).await;
    }

    async fn receive_snapshot_inner(
        &self,
        from: NodeId,
        rx: &mut tokio::sync::mpsc::Receiver<Result<Bytes, crate::cluster::CallError>>,
    ) -> Result<openraft::raft::SnapshotResponse<TypeConfig>, String> {
        let first = rx.recv().await.ok_or("empty snapshot stream")?.map_err(|e| e.to_string())?;
        let header: SnapshotHeader = decode(&first)?;
        let group = header.group;
        let g = self.group(group).ok_or_else(|| format!("group {group} is not running on node {}", self.node_id()))?;
        let path = g.snapshots.incoming_path();
        tracing::info!(group, from, bytes = header.bytes, "receiving a snapshot");
        let received = async {
            let mut file = tokio::fs::File::create(&path).await.map_err(|e| e.to_string())?;
            let mut got = 0u64;
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                got += chunk.len() as u64;
                if got > header.bytes {
                    return Err(format!("snapshot larger than the announced {} bytes", header.bytes));
                }
                file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            if got != header.bytes {
                return Err(format!("snapshot stream ended after {got} of {} bytes", header.bytes));
            }
            file.sync_all().await.map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        if let Err(e) = received {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let snapshot = openraft::Snapshot { meta: header.meta, snapshot: SnapshotFile { path: path.clone() } };
        let result = g.raft.install_full_snapshot(header.vote, snapshot).await.map_err(|e| e.to_string());
        // Installed snapshots are renamed; one refused (stale) is not.
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Whether this node still holds state of `group` (for tests and
    /// diagnostics).
    pub fn has_state(&self, group: GroupId) -> bool {
        self.inner.store.engine().get(Cf::RaftState, &keys::state_key(group, StateKind::Vote)).ok().flatten().is_some()
    }
}

/// Initializes `raft` with `members` unless it has a membership.
async fn form(group: GroupId, raft: &Raft, members: BTreeSet<NodeId>) -> Result<(), GroupError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| GroupError::Failed(format!("forming group {group}: {what}: {e}"));
    if raft.is_initialized().await.map_err(|e| failed("raft", &e))? {
        return Ok(());
    }
    match raft.initialize(members.clone()).await {
        Ok(()) => tracing::info!(group, ?members, "group formed"),
        Err(RaftError::APIError(e)) => tracing::debug!(group, error = %e, "group formed already"),
        Err(e) => return Err(failed("initialize", &e)),
    }
    Ok(())
}

/// Keeps a group's [`LeaderInfo`] current from openraft's metrics, logs
/// every change of leadership, and prunes the lag tally to what a member
/// may still lack (on the leader, the slowest follower's entries; on a
/// follower, what it has not applied).
async fn watch_group(
    group: GroupId,
    me: NodeId,
    raft: Raft,
    tx: watch::Sender<LeaderInfo>,
    elections: Arc<AtomicU64>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut metrics = raft.metrics();
    loop {
        let (info, floor) = {
            let m = metrics.borrow_watched();
            let floor = match (&m.state, &m.replication) {
                (ServerState::Leader, Some(r)) => r.values().map(|matched| matched.as_ref().map(|l| l.index)).min().flatten(),
                _ => m.last_applied.as_ref().map(|l| l.index),
            };
            (LeaderInfo { leader: m.current_leader, term: m.current_term }, floor)
        };
        if let Some(floor) = floor {
            tally.lock().prune_through(floor);
        }
        let old = *tx.borrow();
        if info != old {
            if info.leader != old.leader {
                if info.leader.is_some() {
                    elections.fetch_add(1, Ordering::Relaxed);
                }
                match info.leader {
                    Some(l) if l == me => tracing::info!(group, term = info.term, "leadership: this node was elected leader"),
                    Some(l) => {
                        tracing::info!(group, term = info.term, leader = l, previous = ?old.leader, "leadership: following a new leader")
                    }
                    None => tracing::info!(group, term = info.term, previous = ?old.leader, "leadership: no leader (election in progress)"),
                }
            }
            tx.send_replace(info);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
