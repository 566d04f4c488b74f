//! Idle groups go quiet: a group whose log has not changed for
//! `RaftOptions::quiet_after` stops its ticks on this node (no heartbeats
//! from a leader, no election timer on a follower); the node-pair liveness
//! heartbeat (`cluster::Liveness`) stands in for them.
//!
//! * **Going quiet.** One task per node scans every group (a metrics read,
//!   no message). A follower (or learner) goes quiet once its log, commit
//!   and applied index have not moved for `quiet_after`, it has applied
//!   everything it has, and its leader's node is alive. A leader goes quiet
//!   after `quiet_after` plus four heartbeats, and only once every other
//!   member has matched its last index. The followers therefore go quiet
//!   first (they hear the commit index within a heartbeat of the leader),
//!   and a follower that does not still has its lease plus an election
//!   timeout (3 s and more) before it would stand: a rare late follower
//!   costs at worst one election, never a lost entry.
//! * **Writing what was applied.** A group idle for `quiet_after` (quiet
//!   or not: one with a member down never goes quiet) has its state
//!   machine write what it applied to the store, once per idle stretch
//!   (see `StateMachine::write_applied`).
//! * **Waking.** A quiet group wakes (ticks, heartbeats and elections on)
//!   when this node proposes to it or changes its membership or leadership
//!   (a leader whose lease expired refuses writes, so it first sends a
//!   heartbeat and waits for a majority to answer), when it receives
//!   entries, a vote, a pre-vote or a leadership transfer, when its leader
//!   sees a member come back (so a restarted follower hears its leader
//!   before its election timer fires), and when its leader's node dies.
//!   Heartbeats alone do not wake a follower: followers go quiet while
//!   their leader still sends them.
//! * **A vote to a quiet group** first renews the leader's lease: a quiet
//!   leader sends a heartbeat and waits for a majority; a quiet follower
//!   whose leader is alive asks it to (a `Wake` message), so its own lease
//!   is renewed by that heartbeat. A node that merely restarted then finds
//!   the lease held and cannot depose a healthy leader; a leader that is
//!   really gone cannot renew, and the vote goes ahead.
//! * **Failure.** When the liveness view declares a node dead (its port
//!   refuses connections twice in a row, or no answer for 1 s), every group
//!   here that it led, quiet or not, elects at once: the surviving voter
//!   with the lowest id stands as if the dead leader had handed over to it
//!   (a leadership transfer in the leader's name, which lifts the leader's
//!   lease on the voters); the others lift their lease too and, if no
//!   leader has appeared after a short wait per rank (the chosen one's log
//!   may be shorter than theirs), stand in turn.
//!   A killed process is thus replaced within a heartbeat (250 ms) plus one
//!   election; a vanished host within the liveness delay plus one.
//! * **Partitions.** A quiet leader cut off from its majority cannot renew
//!   its lease, so a write to it is refused (it would not commit anyway:
//!   appends need acknowledgements); when the partition heals, the
//!   returning members wake it, its heartbeat meets the higher term, and
//!   it steps down.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::Instant as _;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver as _;
use parking_lot::Mutex;

use super::host::{Group, Inner, RaftHost};
use super::machine::{GroupId, NodeId};
use super::network::{RAFT_CALL, Rpc};
use super::types::encode;
use crate::cluster::PeerStatus;

/// What the scan compares to tell whether a group moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Mark {
    last: Option<u64>,
    committed: Option<u64>,
    applied: Option<u64>,
    term: u64,
    leader: Option<NodeId>,
    leading: bool,
}

struct Idle {
    mark: Mark,
    since: Instant,
    /// What the group applied was written to the store in this idle
    /// stretch.
    written: bool,
    /// The group was stopped: it must not be counted as quiet again.
    gone: bool,
}

/// A group's quiescence on this node.
pub(crate) struct QuietState {
    quiet: AtomicBool,
    /// Transitions happen under this lock.
    idle: Mutex<Idle>,
}

impl Default for QuietState {
    fn default() -> Self {
        QuietState {
            quiet: AtomicBool::new(false),
            idle: Mutex::new(Idle { mark: Mark::default(), since: Instant::now(), written: false, gone: false }),
        }
    }
}

impl QuietState {
    pub(super) fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }

    /// The group stopped: returns whether it was counted as quiet.
    pub(super) fn forget(&self) -> bool {
        let mut idle = self.idle.lock();
        idle.gone = true;
        self.quiet.swap(false, Ordering::AcqRel)
    }
}

/// How long the next surviving voter waits for the chosen one to win an
/// election (two round trips and a vote's fsync, with room to spare)
/// before it stands itself.
const STAND_IN_AFTER: Duration = Duration::from_millis(400);

/// How long a stand-in waits before standing again, and how many times it
/// stands in all, while no leader appears. A stand-in's first election
/// can tie with the chosen one's: a voter that refuses a candidate for its
/// shorter log does not take the candidate's term, so both stand in the
/// same term, each with its own vote, and neither wins. The second stands
/// in the next term, which the first (a candidate, no lease) grants.
const STAND_IN_RETRY: Duration = Duration::from_millis(200);
const STAND_IN_ATTEMPTS: u32 = 3;

/// How long a quiet follower waits for its leader to renew the lease
/// before it answers a vote.
const WAKE_TIMEOUT: Duration = Duration::from_millis(500);

impl RaftHost {
    /// Wakes `group` if it is quiet; returns whether it was.
    pub(super) fn wake(&self, group: GroupId, g: &Group, why: &str) -> bool {
        if !g.quiet.is_quiet() {
            return false;
        }
        let mut idle = g.quiet.idle.lock();
        if !g.quiet.quiet.swap(false, Ordering::AcqRel) {
            return false;
        }
        let rc = g.raft.runtime_config();
        rc.elect(true);
        rc.heartbeat(true);
        rc.tick(true);
        idle.since = Instant::now();
        self.inner.quiet_groups.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(group, why, "raft group awake");
        true
    }

    fn quiesce(&self, group: GroupId, g: &Group, role: ServerState) {
        let idle = g.quiet.idle.lock();
        if idle.gone || g.quiet.quiet.swap(true, Ordering::AcqRel) {
            return;
        }
        let rc = g.raft.runtime_config();
        rc.tick(false);
        rc.heartbeat(false);
        rc.elect(false);
        self.inner.quiet_groups.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(group, ?role, idle_for = ?idle.since.elapsed(), "raft group quiet");
    }

    /// On a leader whose lease has expired (or is about to): sends a
    /// heartbeat and waits, at most `max_wait`, until a majority answered
    /// it. A leader whose lease expired refuses writes and grants votes.
    pub(super) async fn renew_lease_if_stale(&self, group: GroupId, g: &Group, max_wait: Duration) {
        let options = &self.inner.options;
        let stale = {
            let rx = g.raft.metrics();
            let m = rx.borrow_watched();
            m.state == ServerState::Leader
                && m.membership_config.membership().voter_ids().nth(1).is_some()
                && m.last_quorum_acked.as_ref().is_none_or(|t| t.elapsed() + options.heartbeat >= options.election_max)
        };
        if !stale {
            return;
        }
        let started = Instant::now();
        if g.raft.trigger().heartbeat().await.is_err() {
            return;
        }
        let renewed = g
            .raft
            .wait(Some(max_wait))
            .metrics(
                move |m| m.state != ServerState::Leader || m.last_quorum_acked.as_ref().is_some_and(|t| t.elapsed() <= started.elapsed()),
                "lease renewed",
            )
            .await;
        if renewed.is_err() {
            tracing::debug!(group, "a majority did not answer the leader's heartbeat in time");
        }
    }

    /// Before a quiet group answers a vote or pre-vote: wake it and have
    /// its leader, if alive, renew the lease (see the module's doc).
    pub(super) async fn before_vote(&self, group: GroupId, g: &Group, candidate: NodeId) {
        if !g.quiet.is_quiet() {
            return;
        }
        let leader = g.leader.borrow().leader;
        self.wake(group, g, "vote requested");
        match leader {
            Some(l) if l == self.node_id() => self.renew_lease_if_stale(group, g, WAKE_TIMEOUT).await,
            Some(l) if l != candidate && self.inner.cluster.liveness().is_alive(l) => {
                let body = Bytes::from(encode(&(group, Rpc::Wake)));
                if let Err(e) = self.inner.cluster.call_with_timeout(l, RAFT_CALL, body, WAKE_TIMEOUT).await {
                    tracing::debug!(group, leader = l, error = %e, "the leader did not wake");
                }
            }
            _ => {}
        }
    }

    /// One pass over the groups: quiet the idle ones, wake quiet ones that
    /// lost their leader.
    fn scan(&self, view: &BTreeMap<NodeId, PeerStatus>) {
        let Some(after) = self.inner.options.quiet_after else { return };
        let leader_after = after + self.inner.options.heartbeat * 4;
        let me = self.node_id();
        let alive = |n: NodeId| n == me || view.get(&n).is_some_and(|s| s.alive);
        for (id, g) in self.all_groups() {
            let (mark, ready, role) = {
                let rx = g.raft.metrics();
                let m = rx.borrow_watched();
                let last = m.last_log_index;
                let committed = m.local_committed.as_ref().map(|l| l.index);
                let applied = m.last_applied.as_ref().map(|l| l.index);
                let mark = Mark {
                    last,
                    committed,
                    applied,
                    term: m.current_term,
                    leader: m.current_leader,
                    leading: m.state == ServerState::Leader,
                };
                let ready = match m.state {
                    ServerState::Leader => {
                        committed == last
                            && m.replication
                                .as_ref()
                                .is_some_and(|r| r.iter().all(|(n, matched)| *n == me || matched.as_ref().map(|l| l.index) == last))
                    }
                    ServerState::Follower | ServerState::Learner => {
                        committed == last && applied == last && m.current_leader.is_some_and(|l| l != me && alive(l))
                    }
                    _ => false,
                };
                (mark, ready, m.state)
            };
            if g.quiet.is_quiet() {
                // A quiet replica that no longer knows a leader (or is
                // standing for election) must not stay quiet.
                if role == ServerState::Candidate || (role != ServerState::Leader && mark.leader.is_none()) {
                    self.wake(id, &g, "no leader");
                }
                continue;
            }
            let idle_for = {
                let mut idle = g.quiet.idle.lock();
                if idle.mark != mark {
                    idle.mark = mark;
                    idle.since = Instant::now();
                    idle.written = false;
                    continue;
                }
                // Idle for a while (quiet or not: a group with a member
                // down never goes quiet): what it applied goes to the
                // store rather than wait in memory.
                if !idle.written && idle.since.elapsed() >= after {
                    idle.written = true;
                    self.write_applied_soon(id, &g);
                }
                idle.since.elapsed()
            };
            let wait = if role == ServerState::Leader { leader_after } else { after };
            if ready && idle_for >= wait {
                self.quiesce(id, &g, role);
            }
        }
    }

    /// The liveness view changed from `old` to `new`.
    fn peers_changed(&self, old: &BTreeMap<NodeId, PeerStatus>, new: &BTreeMap<NodeId, PeerStatus>) {
        let me = self.node_id();
        let was = |n: &NodeId| old.get(n).copied();
        // Dead now, or restarted (its groups lost any leadership they held).
        let lost: BTreeSet<NodeId> = new
            .iter()
            .filter(|(n, s)| {
                **n != me
                    && match was(n) {
                        Some(o) if o.alive && !s.alive => true,
                        Some(o) => s.alive && o.incarnation.is_some() && s.incarnation.is_some() && o.incarnation != s.incarnation,
                        None => false,
                    }
            })
            .map(|(n, _)| *n)
            .collect();
        let back: BTreeSet<NodeId> = new
            .iter()
            .filter(|(n, s)| **n != me && s.alive && was(n).is_none_or(|o| !o.alive || o.incarnation != s.incarnation))
            .map(|(n, _)| *n)
            .collect();
        if lost.is_empty() && back.is_empty() {
            return;
        }
        let alive = |n: NodeId| n == me || new.get(&n).is_some_and(|s| s.alive);
        for (id, g) in self.all_groups() {
            let (role, leader, voters, members, vote) = {
                let rx = g.raft.metrics();
                let m = rx.borrow_watched();
                let membership = m.membership_config.membership();
                let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
                let members: BTreeSet<NodeId> = voters.iter().copied().chain(membership.learner_ids()).collect();
                (m.state, m.current_leader, voters, members, m.vote)
            };
            if role == ServerState::Leader {
                if members.iter().any(|n| back.contains(n)) {
                    self.wake(id, &g, "a member came back");
                }
                continue;
            }
            let Some(l) = leader.filter(|l| *l != me && lost.contains(l)) else { continue };
            if !voters.contains(&me) {
                continue;
            }
            // The lowest-id surviving voter stands at once, as if the dead
            // leader had handed over to it: a leadership transfer in the
            // leader's name lifts the leader's lease here (a follower
            // otherwise refuses votes for `election_max` after the last
            // heartbeat it heard), and the candidate's vote requests are
            // marked as a transfer, which lifts it on the voters they reach.
            // Raft's safety does not rest on the lease (an up-to-date log
            // still wins the vote), only a healthy leader's peace: which a
            // false "dead" could cost one election, no entry. The others
            // lift their lease too and keep their timers, in case the
            // chosen one cannot win.
            let survivors: Vec<NodeId> = voters.iter().copied().filter(|v| *v != l && alive(*v)).collect();
            let Some(&chosen) = survivors.first() else { continue };
            if chosen == me {
                self.wake(id, &g, "the leader's node is gone; standing for election");
                tracing::info!(group = id, leader = l, "the leader's node is gone; standing for election at once");
            }
            let raft = g.raft.clone();
            tokio::spawn(async move {
                let _ = raft.handle_transfer_leader(openraft::raft::TransferLeaderRequest::new(vote, chosen, None)).await;
            });
            // The chosen one loses if its log is shorter than a voter's
            // (the dead leader had reached some followers and not
            // others), or if its vote requests were lost: then the next
            // survivor stands, one short wait per rank, and after every
            // rank the chosen one again, rather than after a whole
            // election timeout.
            let rank = survivors.iter().position(|v| *v == me).unwrap_or(survivors.len()) as u32;
            let wait = if rank == 0 { STAND_IN_AFTER * survivors.len() as u32 } else { STAND_IN_AFTER * rank };
            let host = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                for attempt in 0..STAND_IN_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(STAND_IN_RETRY).await;
                    }
                    let m = g.raft.metrics().borrow_watched().clone();
                    if m.state == ServerState::Leader || m.current_leader.is_some_and(|now| now != l) {
                        return;
                    }
                    host.wake(id, &g, "the leader's node is gone and no one took over");
                    tracing::info!(group = id, leader = l, attempt, "no new leader yet; standing for election");
                    let _ = g.raft.handle_transfer_leader(openraft::raft::TransferLeaderRequest::new(m.vote, me, None)).await;
                }
            });
        }
    }
}

/// How often the scan runs.
fn scan_period(after: Duration) -> Duration {
    (after / 3).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// The quiescence task of one node: scans the groups and follows the
/// liveness view, until the host is dropped.
pub(super) async fn run(weak: Weak<Inner>) {
    let (period, mut view_rx) = {
        let Some(inner) = weak.upgrade() else { return };
        // Without quiescence the scan does nothing, but the liveness view
        // is still followed: it is what makes failover fast.
        (inner.options.quiet_after.map_or(Duration::from_secs(1), scan_period), inner.cluster.liveness().watch())
    };
    let mut seen = view_rx.borrow_and_update().clone();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(inner) = weak.upgrade() else { return };
                if inner.cluster.is_stopped() {
                    return;
                }
                RaftHost { inner }.scan(&seen);
            }
            changed = view_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let view = view_rx.borrow_and_update().clone();
                let Some(inner) = weak.upgrade() else { return };
                RaftHost { inner }.peers_changed(&seen, &view);
                seen = view;
            }
        }
    }
}
