//! Raft groups on three in-process nodes, each with its own store and its
//! own cluster listener on 127.0.0.1, talking over real sockets.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use super::*;
use crate::cluster::{CallError, Cluster, ClusterConfig};
use crate::store::overlay::Overlay;
use crate::store::rocks::{RocksEngine, RocksTuning};
use crate::store::{Cf, Engine, Op, Reader, Store, StoreError};

/// A generous bound for conditions that become true eventually.
const SETTLE: Duration = Duration::from_secs(30);

/// Commands of the test machine.
#[derive(Serialize, Deserialize)]
enum Cmd {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Puts `count` keys `prefix ++ i` with `len`-byte values.
    Fill {
        prefix: Vec<u8>,
        from: u32,
        count: u32,
        len: u32,
    },
}

/// A key-value machine: its keys live in `Cf::Messages` under the group id;
/// it also keeps the greatest `now_ms` it saw and how many entries it
/// applied, so that replicas can be compared byte for byte.
struct Kv {
    group: GroupId,
    applied: u64,
    /// Its applied state may trail the log (as a queue's).
    unlogged: bool,
}

impl Kv {
    fn boxed(group: GroupId) -> Box<dyn GroupMachine> {
        Box::new(Kv { group, applied: 0, unlogged: false })
    }

    fn boxed_unlogged(group: GroupId) -> Box<dyn GroupMachine> {
        Box::new(Kv { group, applied: 0, unlogged: true })
    }

    fn key(group: GroupId, k: &[u8]) -> Vec<u8> {
        let mut v = group.to_be_bytes().to_vec();
        v.push(1);
        v.extend_from_slice(k);
        v
    }

    fn meta_key(group: GroupId, what: u8) -> Vec<u8> {
        let mut v = group.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, what]);
        v
    }
}

impl GroupMachine for Kv {
    fn apply(&mut self, entry: &Applied<'_>, store: &mut Overlay<'_>) -> Result<LocalReply, StoreError> {
        let Ok(cmd) = bincode::deserialize::<Cmd>(entry.data) else { return Ok(None) };
        let mut ops = Vec::new();
        let previous = match &cmd {
            Cmd::Put(k, _) | Cmd::Delete(k) => store.get(Cf::Messages, &Kv::key(self.group, k)).ok().flatten(),
            Cmd::Fill { .. } => None,
        };
        match cmd {
            Cmd::Put(k, v) => ops.push(Op::Put(Cf::Messages, Kv::key(self.group, &k), v)),
            Cmd::Delete(k) => ops.push(Op::Delete(Cf::Messages, Kv::key(self.group, &k))),
            Cmd::Fill { prefix, from, count, len } => {
                for i in from..from + count {
                    let mut k = prefix.clone();
                    k.extend_from_slice(&i.to_be_bytes());
                    let v: Vec<u8> = (0..len).map(|j| (i as u8).wrapping_add(j as u8)).collect();
                    ops.push(Op::Put(Cf::Messages, Kv::key(self.group, &k), v));
                }
            }
        }
        let time = store
            .get(Cf::Messages, &Kv::meta_key(self.group, 1))
            .ok()
            .flatten()
            .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or_default()));
        self.applied += 1;
        ops.push(Op::Put(Cf::Messages, Kv::meta_key(self.group, 1), time.max(entry.now_ms).to_be_bytes().to_vec()));
        ops.push(Op::Put(Cf::Messages, Kv::meta_key(self.group, 2), self.applied.to_be_bytes().to_vec()));
        store.write(ops)?;
        Ok(Some(Box::new(previous)))
    }

    fn restore(&mut self, store: &dyn Reader) -> Result<(), StoreError> {
        self.applied =
            store.get(Cf::Messages, &Kv::meta_key(self.group, 2))?.map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or_default()));
        Ok(())
    }

    fn ranges(&self) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
        vec![(Cf::Messages, self.group.to_be_bytes().to_vec(), (self.group + 1).to_be_bytes().to_vec())]
    }

    fn apply_unlogged(&self) -> bool {
        self.unlogged
    }
}

/// Key-value records of a store range.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn put(k: &str, v: &str) -> Vec<u8> {
    bincode::serialize(&Cmd::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec())).unwrap()
}

/// One node: its store, cluster side and Raft host.
struct Node {
    id: NodeId,
    store: Store,
    cluster: Cluster,
    host: RaftHost,
}

struct TestCluster {
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
    peers: BTreeMap<NodeId, String>,
    nodes: BTreeMap<NodeId, Node>,
    options: RaftOptions,
}

fn fast_options() -> RaftOptions {
    RaftOptions::default()
}

impl TestCluster {
    async fn start(n: u64, options: RaftOptions) -> TestCluster {
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(id, l);
        }
        let peers: BTreeMap<NodeId, String> = listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap().to_string())).collect();
        let mut c = TestCluster { dirs: BTreeMap::new(), peers, nodes: BTreeMap::new(), options };
        for (id, l) in listeners {
            c.dirs.insert(id, tempfile::tempdir().unwrap());
            let node = c.open_node(id, l).await;
            c.nodes.insert(id, node);
        }
        c
    }

    async fn open_node(&self, id: NodeId, listener: TcpListener) -> Node {
        let dir = self.dirs[&id].path().to_path_buf();
        let deadline = Instant::now() + SETTLE;
        // A stopped node's database may be released a moment after.
        let engine = loop {
            match RocksEngine::open(&dir.join("db"), RocksTuning { block_cache_bytes: 8 << 20, write_buffer_bytes: 8 << 20 }) {
                Ok(e) => break e,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "database still locked");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot reopen node {id}'s database: {e}"),
            }
        };
        let store = Store::new(Arc::new(engine), None);
        let cluster = Cluster::with_listener(ClusterConfig::new(id, listener.local_addr().unwrap(), self.peers.clone()), listener);
        let host = RaftHost::new(cluster.clone(), store.clone(), dir.join("snapshots"), self.options.clone()).unwrap();
        Node { id, store, cluster, host }
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[&id]
    }

    /// Stops a node: its groups, its listener and its store.
    async fn stop(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        node.host.shutdown().await;
        node.cluster.stop();
        node.store.close().unwrap();
    }

    /// Starts a stopped node again on the same port and data.
    async fn restart(&mut self, id: NodeId) {
        let addr: std::net::SocketAddr = self.peers[&id].parse().unwrap();
        let deadline = Instant::now() + SETTLE;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "port still taken");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {addr} again: {e}"),
            }
        };
        let node = self.open_node(id, listener).await;
        self.nodes.insert(id, node);
    }

    async fn start_group(&self, group: GroupId, members: &[NodeId]) {
        let set: BTreeSet<NodeId> = members.iter().copied().collect();
        for id in members {
            if let Some(n) = self.nodes.get(id) {
                n.host.start_group(group, Kv::boxed(group), Bootstrap::Members(set.clone())).await.unwrap();
            }
        }
    }

    /// Waits until the running nodes among `members` agree on one leader
    /// of `group`, and returns it.
    async fn leader(&self, group: GroupId, members: &[NodeId]) -> NodeId {
        let deadline = Instant::now() + SETTLE;
        loop {
            let seen: BTreeSet<Option<NodeId>> =
                members.iter().filter_map(|id| self.nodes.get(id)).map(|n| n.host.leader(group).and_then(|l| l.leader)).collect();
            if let [Some(l)] = seen.iter().copied().collect::<Vec<_>>()[..]
                && self.nodes.contains_key(&l)
                && self.nodes[&l].host.status(group).is_some_and(|s| s.role == Role::Leader)
            {
                return l;
            }
            assert!(Instant::now() < deadline, "no agreed leader of group {group} within {SETTLE:?}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `expected` leads `group`.
    async fn wait_leader(&self, group: GroupId, members: &[NodeId], expected: NodeId) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.leader(group, members).await == expected {
                return;
            }
            assert!(Instant::now() < deadline, "node {expected} never led group {group}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes through whichever node leads, following redirects.
    async fn propose(&self, group: GroupId, data: Vec<u8>) -> (u64, LocalReply) {
        let deadline = Instant::now() + SETTLE;
        let mut target = *self.nodes.keys().next().unwrap();
        loop {
            let result = match self.nodes.get(&target) {
                Some(n) => n.host.propose(group, data.clone()).await,
                None => Err(ProposeError::ForwardToLeader { leader: None }),
            };
            match result {
                Ok(r) => return r,
                Err(ProposeError::ForwardToLeader { leader: Some(l) }) if self.nodes.contains_key(&l) => target = l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "proposal not accepted within {SETTLE:?}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                    target = ids[(ids.iter().position(|i| *i == target).unwrap_or(0) + 1) % ids.len()];
                }
            }
        }
    }

    /// Waits until every running node in `members` has applied `index`.
    async fn applied(&self, group: GroupId, members: &[NodeId], index: u64) {
        let deadline = Instant::now() + SETTLE * 4;
        for id in members {
            let Some(n) = self.nodes.get(id) else { continue };
            loop {
                let applied = n.host.status(group).and_then(|s| s.applied).unwrap_or(0);
                if applied >= index {
                    break;
                }
                assert!(Instant::now() < deadline, "node {id} applied {applied} of group {group}, expected {index}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The group's machine records on a node (after its writer drained).
    async fn records(&self, id: NodeId, group: GroupId) -> Vec<(Vec<u8>, Vec<u8>)> {
        let n = self.node(id);
        let (a, b) = (group.to_be_bytes().to_vec(), (group + 1).to_be_bytes().to_vec());
        n.store.read_after_writes(move |e| e.scan(Cf::Messages, &a, &b, usize::MAX)).await.unwrap()
    }

    /// Asserts that every running member holds identical records. A
    /// replica that applied an entry may not have written all of its
    /// records yet when asked: compare again until they agree, for a bounded
    /// time, and fail with the last difference.
    async fn assert_identical(&self, group: GroupId, members: &[NodeId]) -> usize {
        let deadline = Instant::now() + SETTLE * 4;
        loop {
            match self.compare(group, members).await {
                Ok(n) => return n,
                Err(difference) if Instant::now() >= deadline => panic!("{difference}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The number of records every running member holds, or how two differ.
    async fn compare(&self, group: GroupId, members: &[NodeId]) -> Result<usize, String> {
        let mut reference: Option<(NodeId, Records)> = None;
        for id in members {
            if !self.nodes.contains_key(id) {
                continue;
            }
            let records = self.records(*id, group).await;
            match &reference {
                None => reference = Some((*id, records)),
                Some((rid, r)) => {
                    if r.len() != records.len() {
                        return Err(format!("nodes {rid} and {id} hold different numbers of records: {} and {}", r.len(), records.len()));
                    }
                    if *r != records {
                        return Err(format!("nodes {rid} and {id} hold different records"));
                    }
                }
            }
        }
        Ok(reference.map_or(0, |(_, r)| r.len()))
    }

    async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_elect_a_leader_and_apply_proposals_identically_on_every_replica() {
    let c = TestCluster::start(3, fast_options()).await;
    c.start_group(7, &[1, 2, 3]).await;
    let leader = c.leader(7, &[1, 2, 3]).await;
    let mut last = 0;
    for i in 0..50 {
        let (index, reply) = c.propose(7, put(&format!("k{}", i % 10), &format!("v{i}"))).await;
        assert!(index > last, "indexes increase");
        last = index;
        // The reply is the previous value, computed by the machine.
        let previous = reply.and_then(|r| r.downcast::<Option<Vec<u8>>>().ok()).map(|b| *b);
        let expected = (i >= 10).then(|| format!("v{}", i - 10).into_bytes());
        assert_eq!(previous, Some(expected), "entry {i}");
    }
    // A follower refuses proposals and names the leader.
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    match c.node(follower).host.propose(7, put("x", "y")).await {
        Err(ProposeError::ForwardToLeader { leader: Some(l) }) => assert_eq!(l, leader),
        other => panic!("a follower accepted a proposal: {:?}", other.map(|(i, _)| i)),
    }
    c.applied(7, &[1, 2, 3], last).await;
    assert_eq!(c.assert_identical(7, &[1, 2, 3]).await, 12, "10 keys and the machine's 2 records");
    let status = c.node(leader).host.status(7).unwrap();
    assert_eq!(status.voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(status.role, Role::Leader);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_fail_over_when_the_leader_stops_and_catch_up_from_the_log_when_it_returns() {
    let mut c = TestCluster::start(3, fast_options()).await;
    c.start_group(1, &[1, 2, 3]).await;
    let old = c.leader(1, &[1, 2, 3]).await;
    for i in 0..20 {
        c.propose(1, put(&format!("a{i}"), "1")).await;
    }
    let stopped = Instant::now();
    c.stop(old).await;
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let new = c.leader(1, &rest).await;
    let elected = stopped.elapsed();
    assert_ne!(new, old);
    // The first proposal the new leader commits marks the failover's end.
    let (index, _) = c.propose(1, put("after", "failover")).await;
    println!("failover: new leader {new} after {elected:?}, first commit after {:?}", stopped.elapsed());
    for i in 0..20 {
        c.propose(1, put(&format!("b{i}"), "2")).await;
    }
    c.restart(old).await;
    c.start_group(1, &[old]).await;
    let (last, _) = c.propose(1, put("back", "again")).await;
    assert!(last > index);
    c.applied(1, &[1, 2, 3], last).await;
    c.assert_identical(1, &[1, 2, 3]).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_change_membership_one_step_at_a_time() {
    let c = TestCluster::start(3, fast_options()).await;
    c.start_group(3, &[1, 2]).await;
    let leader = c.leader(3, &[1, 2]).await;
    c.node(3).host.start_group(3, Kv::boxed(3), Bootstrap::Join).await.unwrap();
    for i in 0..10 {
        c.propose(3, put(&format!("m{i}"), "x")).await;
    }
    let host = &c.node(leader).host;
    host.add_learner(3, 3).await.unwrap();
    assert_eq!(host.status(3).unwrap().learners, BTreeSet::from([3]));
    host.promote(3, 3).await.unwrap();
    assert_eq!(host.status(3).unwrap().voters, BTreeSet::from([1, 2, 3]));
    let (index, _) = c.propose(3, put("after", "grow")).await;
    c.applied(3, &[1, 2, 3], index).await;
    c.assert_identical(3, &[1, 2, 3]).await;
    // Shrink: remove a follower; the rest carry on.
    let gone = [1, 2].into_iter().find(|i| *i != leader).unwrap();
    host.remove_member(3, gone).await.unwrap();
    let status = host.status(3).unwrap();
    assert!(!status.voters.contains(&gone) && !status.learners.contains(&gone), "{status:?}");
    let (index, _) = c.propose(3, put("after", "shrink")).await;
    let remaining: Vec<NodeId> = [1, 2, 3].into_iter().filter(|i| *i != gone).collect();
    c.applied(3, &remaining, index).await;
    // A non-leader cannot change the membership.
    let follower = remaining.iter().copied().find(|i| *i != leader).unwrap();
    assert!(matches!(c.node(follower).host.promote(3, gone).await, Err(GroupError::ForwardToLeader { .. })));
    // Leadership moves on request.
    host.transfer_leader(3, follower).await.unwrap();
    c.wait_leader(3, &remaining, follower).await;
    c.shutdown().await;
}

/// Resident set size of this process.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_catch_up_a_follower_from_a_streamed_snapshot_after_the_log_was_purged() {
    let options = RaftOptions { snapshot_after: 50, logs_to_keep: 10, ..fast_options() };
    let mut c = TestCluster::start(3, options).await;
    c.start_group(9, &[1, 2, 3]).await;
    let leader = c.leader(9, &[1, 2, 3]).await;
    let behind = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    c.stop(behind).await;
    // 120,000 keys of 256 bytes (about 30 MiB) in 120 entries.
    let (keys, per_entry) = (120_000u32, 1_000u32);
    let mut last = 0;
    for e in 0..keys / per_entry {
        let fill = Cmd::Fill { prefix: b"f".to_vec(), from: e * per_entry, count: per_entry, len: 256 };
        last = c.propose(9, bincode::serialize(&fill).unwrap()).await.0;
    }
    c.node(leader).host.snapshot(9).await.unwrap();
    let deadline = Instant::now() + SETTLE * 2;
    loop {
        let s = c.node(leader).host.status(9).unwrap();
        if s.purged.unwrap_or(0) > 20 && s.snapshot.unwrap_or(0) >= last.saturating_sub(50) {
            break;
        }
        assert!(Instant::now() < deadline, "the leader never purged its log: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_before = rss_bytes();
    let started = Instant::now();
    c.restart(behind).await;
    c.start_group(9, &[behind]).await;
    // Sample memory while the follower installs.
    let mut peak = rss_before;
    let deadline = Instant::now() + SETTLE * 4;
    loop {
        peak = peak.max(rss_bytes());
        let applied = c.node(behind).host.status(9).and_then(|s| s.applied).unwrap_or(0);
        if applied >= last {
            break;
        }
        assert!(Instant::now() < deadline, "the follower applied {applied} of {last}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = c.node(behind).host.status(9).unwrap();
    assert!(status.snapshot.is_some(), "caught up through a snapshot: {status:?}");
    println!(
        "snapshot catch-up: {keys} keys in {:?}; process RSS before {} MiB, peak {} MiB (+{} MiB)",
        started.elapsed(),
        rss_before >> 20,
        peak >> 20,
        peak.saturating_sub(rss_before) >> 20
    );
    let n = c.assert_identical(9, &[1, 2, 3]).await;
    assert_eq!(n, keys as usize + 2);
    // And it serves as leader afterwards.
    c.node(c.leader(9, &[1, 2, 3]).await).host.transfer_leader(9, behind).await.unwrap();
    c.wait_leader(9, &[1, 2, 3], behind).await;
    let (index, _) = c.propose(9, put("led", "by the caught-up node")).await;
    c.applied(9, &[1, 2, 3], index).await;
    c.assert_identical(9, &[1, 2, 3]).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_share_wal_syncs_between_many_groups() {
    let c = TestCluster::start(3, fast_options()).await;
    // 40 groups x 3 replicas in one process: enough appends arriving
    // together to share syncs, few enough that a busy 2-core machine still
    // holds its elections.
    let groups: Vec<GroupId> = (100..140).collect();
    for g in &groups {
        c.start_group(*g, &[1, 2, 3]).await;
    }
    for g in &groups {
        c.leader(*g, &[1, 2, 3]).await;
    }
    let counts = |n: &Node| {
        use std::sync::atomic::Ordering::Relaxed;
        let log = n.host.log_stats();
        (n.store.stats().synced_batches.load(Relaxed), log.appends.load(Relaxed), log.entries.load(Relaxed))
    };
    let before: Vec<(u64, u64, u64)> = [1, 2, 3].iter().map(|id| counts(c.node(*id))).collect();
    let c = Arc::new(c);
    let mut tasks = Vec::new();
    for g in groups.clone() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                c.propose(g, put(&format!("k{i}"), "v")).await;
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(SETTLE * 4, t).await.unwrap().unwrap();
    }
    let (mut total_syncs, mut total_appends, mut total_entries) = (0, 0, 0);
    for (i, id) in [1u64, 2, 3].iter().enumerate() {
        let (syncs, appends, entries) = counts(c.node(*id));
        let (syncs, appends, entries) = (syncs - before[i].0, appends - before[i].1, entries - before[i].2);
        println!("node {id}: {entries} entries in {appends} log appends in {syncs} synced batches");
        total_syncs += syncs;
        total_appends += appends;
        total_entries += entries;
    }
    // Committed means appended on a majority (the third may still lag).
    assert!(total_entries >= groups.len() as u64 * 10 * 2, "every proposal was appended on a majority");
    assert!(total_syncs < total_appends, "appends of different groups shared WAL syncs ({total_syncs} syncs for {total_appends} appends)");
    println!(
        "{} groups: {total_appends} appends, {total_syncs} WAL syncs ({:.2} appends per sync)",
        groups.len(),
        total_appends as f64 / total_syncs.max(1) as f64
    );
    for g in &groups {
        // Committed on a majority; the third replica applies it a moment
        // later: wait until every replica has applied what the leader has.
        let leader = c.leader(*g, &[1, 2, 3]).await;
        let last = c.node(leader).host.status(*g).and_then(|st| st.applied).unwrap_or(0);
        c.applied(*g, &[1, 2, 3], last).await;
        c.assert_identical(*g, &[1, 2, 3]).await;
    }
    match Arc::try_unwrap(c) {
        Ok(c) => c.shutdown().await,
        Err(_) => panic!("cluster still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_forward_calls_and_streams_between_nodes() {
    let c = TestCluster::start(3, fast_options()).await;
    let (one, two, three) = (&c.node(1).cluster, &c.node(2).cluster, &c.node(3).cluster);
    two.register_call(
        "echo",
        Arc::new(|from, body: Bytes| {
            Box::pin(async move {
                if body.as_ref() == b"fail" {
                    return Err("refused".to_string());
                }
                Ok(Bytes::from(format!("{from}:{}", String::from_utf8_lossy(&body))))
            })
        }),
    );
    three.register_stream(
        "upper",
        Arc::new(|_from, mut duplex: crate::cluster::Duplex| {
            Box::pin(async move {
                while let Some(Ok(frame)) = duplex.rx.recv().await {
                    if duplex.tx.send(Bytes::from(frame.to_ascii_uppercase())).await.is_err() {
                        return;
                    }
                }
            })
        }),
    );
    assert_eq!(one.call(2, "echo", Bytes::from_static(b"hi")).await.unwrap(), Bytes::from_static(b"1:hi"));
    assert_eq!(one.call(2, "echo", Bytes::from_static(b"fail")).await, Err(CallError::Remote("refused".into())));
    assert!(matches!(one.call(3, "echo", Bytes::new()).await, Err(CallError::NoHandler { .. })));
    assert_eq!(one.call(9, "echo", Bytes::new()).await, Err(CallError::UnknownNode(9)));
    assert_eq!(two.call(2, "echo", Bytes::from_static(b"me")).await.unwrap(), Bytes::from_static(b"2:me"), "a call to itself");
    let mut s = one.open_stream(3, "upper").await.unwrap();
    for word in ["alpha", "beta", "gamma"] {
        s.tx.send(Bytes::from(word)).await.unwrap();
        let got = tokio::time::timeout(SETTLE, s.rx.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, Bytes::from(word.to_uppercase()));
    }
    drop(s.tx);
    assert!(tokio::time::timeout(SETTLE, s.rx.recv()).await.unwrap().is_none(), "the stream ends when the caller ends it");
    // Liveness: everyone sees everyone.
    for n in c.nodes.values() {
        assert!(
            n.cluster.liveness().wait_for(SETTLE, |v| v.values().all(|s| s.alive)).await,
            "node {} sees {:?}",
            n.id,
            n.cluster.liveness().current()
        );
    }
    let mut c = c;
    c.stop(3).await;
    assert!(c.node(1).cluster.liveness().wait_for(SETTLE, |v| !v[&3].alive).await, "a stopped node is seen dead");
    assert!(matches!(
        c.node(1).cluster.call(3, "upper", Bytes::new()).await,
        Err(CallError::Unreachable { .. } | CallError::Timeout { .. })
    ));
    c.shutdown().await;
}

/// Groups go quiet after half a second without a new entry.
fn quiet_options() -> RaftOptions {
    RaftOptions { quiet_after: Some(Duration::from_millis(500)), ..fast_options() }
}

impl TestCluster {
    /// Waits until `group` is quiet on every running member.
    async fn wait_quiet(&self, group: GroupId, members: &[NodeId]) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let loud: Vec<NodeId> =
                members.iter().copied().filter(|id| self.nodes.get(id).is_some_and(|n| !n.host.is_quiet(group))).collect();
            if loud.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "group {group} never went quiet on {loud:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Raft messages every running node sent so far.
    fn sent(&self) -> u64 {
        self.nodes.values().map(|n| n.host.net_stats().total()).sum()
    }

    fn term(&self, group: GroupId, id: NodeId) -> u64 {
        self.node(id).host.status(group).map_or(0, |s| s.term)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_send_nothing_for_a_quiet_group_and_wake_it_for_a_proposal() {
    // Without quiescence an idle group sends heartbeats (the counter counts).
    let c = TestCluster::start(3, RaftOptions { quiet_after: None, ..fast_options() }).await;
    c.start_group(20, &[1, 2, 3]).await;
    c.leader(20, &[1, 2, 3]).await;
    let before = c.sent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let awake = c.sent() - before;
    assert!(awake >= 4, "an idle group that never goes quiet heartbeats: {awake} messages in 1 s");
    c.shutdown().await;

    let c = TestCluster::start(3, quiet_options()).await;
    c.start_group(21, &[1, 2, 3]).await;
    let leader = c.leader(21, &[1, 2, 3]).await;
    for i in 0..5 {
        c.propose(21, put(&format!("k{i}"), "v")).await;
    }
    c.wait_quiet(21, &[1, 2, 3]).await;
    for id in [1, 2, 3] {
        assert_eq!(c.node(id).host.quiet_groups().load(std::sync::atomic::Ordering::Relaxed), 1, "node {id}'s gauge");
    }
    let term = c.term(21, leader);
    let before = c.sent();
    // Longer than an election timeout and a lease: a follower whose timer
    // still ran would stand for election.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.sent() - before, 0, "a quiet group sends no Raft message (awake: {awake} per second)");
    assert_eq!(c.leader(21, &[1, 2, 3]).await, leader, "the leader stays");
    assert_eq!(c.term(21, leader), term, "no election while quiet");
    for id in [1, 2, 3] {
        assert!(c.node(id).host.is_quiet(21), "node {id} stayed quiet");
    }

    // A proposal wakes it (the leader renews its expired lease first),
    // commits and is applied everywhere.
    let started = Instant::now();
    let (index, _) = c.propose(21, put("woken", "yes")).await;
    println!("first proposal on a quiet group committed after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2), "a quiet leader wakes at once: {:?}", started.elapsed());
    c.applied(21, &[1, 2, 3], index).await;
    assert_eq!(c.assert_identical(21, &[1, 2, 3]).await, 8, "6 keys and the machine's 2 records");
    assert_eq!(c.term(21, leader), term, "waking needs no election");
    // And it goes quiet again.
    c.wait_quiet(21, &[1, 2, 3]).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_elect_a_new_leader_soon_after_a_quiet_leaders_node_stops() {
    let mut c = TestCluster::start(3, quiet_options()).await;
    c.start_group(22, &[1, 2, 3]).await;
    let old = c.leader(22, &[1, 2, 3]).await;
    c.propose(22, put("before", "1")).await;
    c.wait_quiet(22, &[1, 2, 3]).await;
    // Quiet for longer than a lease, so that nothing is left of the
    // leader's last heartbeats.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = Instant::now();
    c.stop(old).await;
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let new = c.leader(22, &rest).await;
    let elected = stopped.elapsed();
    assert_ne!(new, old);
    println!("quiet group failover: new leader {new} after {elected:?}");
    assert!(elected < Duration::from_secs(5), "a quiet group's new leader took {elected:?}");
    let (index, _) = c.propose(22, put("after", "2")).await;
    c.applied(22, &rest, index).await;
    c.assert_identical(22, &rest).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_keep_the_leader_of_a_quiet_group_when_a_follower_restarts_and_catch_it_up() {
    let mut c = TestCluster::start(3, quiet_options()).await;
    c.start_group(23, &[1, 2, 3]).await;
    let leader = c.leader(23, &[1, 2, 3]).await;
    c.propose(23, put("a", "1")).await;
    c.wait_quiet(23, &[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();

    // A follower restarts while the group is quiet: it hears its leader
    // (or finds the lease held) and does not take over.
    c.stop(follower).await;
    assert!(c.node(leader).cluster.liveness().wait_for(SETTLE, |v| !v[&follower].alive).await);
    c.restart(follower).await;
    c.start_group(23, &[follower]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.leader(23, &[1, 2, 3]).await, leader, "a restarted follower does not depose a quiet group's leader");

    // It goes down again and misses entries: it catches up when back.
    c.wait_quiet(23, &[1, 2, 3]).await;
    c.stop(follower).await;
    let mut last = 0;
    for i in 0..20 {
        last = c.propose(23, put(&format!("b{i}"), "2")).await.0;
    }
    c.restart(follower).await;
    c.start_group(23, &[follower]).await;
    c.applied(23, &[1, 2, 3], last).await;
    assert_eq!(c.assert_identical(23, &[1, 2, 3]).await, 23, "21 keys and the machine's 2 records");
    c.wait_quiet(23, &[1, 2, 3]).await;
    c.shutdown().await;
}

/// openraft's own storage test suite against the log store and the state
/// machine adapter (on the in-memory engine).
mod suite {
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;
    use crate::raft::log_store::LogStore;
    use crate::raft::state_machine::{Snapshots, StateMachine};
    use crate::raft::types::TypeConfig;
    use crate::store::memory::MemoryEngine;

    struct Builder {
        /// The machine's applied state may trail the log.
        unlogged: bool,
    }

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(Arc::new(MemoryEngine::new()), None);
            let snapshots = Arc::new(Snapshots::open(dir.path().join("snap")).unwrap());
            let log = LogStore::new(5, store.clone(), Arc::default(), Arc::default(), |_| 0);
            let machine = if self.unlogged { Kv::boxed_unlogged(5) } else { Kv::boxed(5) };
            let sm = StateMachine::open(5, store, machine, snapshots).await.unwrap().with_applied_hook(log.applied_hook());
            Ok((dir, log, sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn should_pass_openraft_storage_suite() {
        Suite::test_all(Builder { unlogged: false }).await.unwrap();
    }

    /// The same with a machine whose applied writes stay in memory until
    /// written (as a queue's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn should_pass_openraft_storage_suite_with_applied_writes_kept_in_memory() {
        Suite::test_all(Builder { unlogged: true }).await.unwrap();
    }

    /// A queue-like machine's applied writes stay in memory (readable as
    /// applied, not in the store, counted in the node's budget) until the
    /// group holds too much or is asked to write them; a crash before then
    /// loses them together with the applied log id, and applying the same
    /// entries again rebuilds the same state.
    #[tokio::test]
    async fn should_keep_applied_writes_until_written_and_apply_them_again_after_a_crash() {
        use openraft::entry::RaftEntry as _;
        use openraft::storage::RaftStateMachine as _;

        use crate::raft::log_store::LogStats;
        use crate::raft::state_machine::{UNWRITTEN_GROUP_BYTES, WriteGate};
        use crate::raft::types::{Entry, LogId, Proposal};

        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(MemoryEngine::new());
        let stats = Arc::new(LogStats::default());
        let unwritten = || stats.unwritten_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let open = || async {
            let snapshots = Arc::new(Snapshots::open(dir.path().join("snap")).unwrap());
            let store = Store::new(engine.clone(), None);
            StateMachine::open(5, store, Kv::boxed_unlogged(5), snapshots).await.unwrap().with_stats(stats.clone())
        };
        let entry = |index: u64, cmd: Cmd| {
            let log_id: LogId = openraft::testing::log_id::<TypeConfig>(1, 1, index);
            Entry::new_normal(log_id, Proposal { now_ms: 1000 + index, data: bincode::serialize(&cmd).unwrap() })
        };
        async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) {
            sm.apply(futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await.unwrap();
        }
        let (a, b) = (5u64.to_be_bytes().to_vec(), 6u64.to_be_bytes().to_vec());
        let stored = || engine.scan(Cf::Messages, &a, &b, usize::MAX).unwrap();
        let applied = |sm: &StateMachine| sm.read(|r| r.scan(Cf::Messages, &a, &b, usize::MAX).unwrap());
        let batch = |from: u64| {
            vec![
                entry(from, Cmd::Put(b"k1".to_vec(), format!("v{from}").into_bytes())),
                entry(from + 1, Cmd::Put(b"gone".to_vec(), b"x".to_vec())),
                entry(from + 2, Cmd::Delete(b"gone".to_vec())),
            ]
        };

        let mut sm = open().await;
        apply(&mut sm, batch(1)).await;
        let expected = applied(&sm);
        assert_eq!(expected.len(), 3, "k1 and the machine's two records: {expected:?}");
        assert!(stored().is_empty(), "nothing written yet: {:?}", stored());
        assert_eq!(sm.applied_state().await.unwrap().0.map(|l| l.index), Some(3), "openraft sees what is applied");
        assert!(unwritten() > 0);
        // A crash: the state machine goes without writing.
        drop(sm);
        assert_eq!(unwritten(), 0, "a group that stops gives its bytes back");
        let mut sm = open().await;
        assert_eq!(sm.applied_state().await.unwrap().0, None, "the applied log id went with the writes");
        apply(&mut sm, batch(1)).await;
        assert_eq!(applied(&sm), expected, "applied again from the log: the same state");
        // Asked to write (quiet, stopping, before a snapshot): all of it
        // goes, with the applied log id, and a key written and deleted in
        // between is only a deletion.
        sm.write_applied().await.unwrap();
        assert_eq!(stored(), expected);
        assert_eq!(unwritten(), 0);
        drop(sm);
        let mut sm = open().await;
        assert_eq!(sm.applied_state().await.unwrap().0.map(|l| l.index), Some(3));
        // Over the group's budget, a batch is written in the background and
        // stays readable until it is.
        let len = 64 << 10;
        let count = (UNWRITTEN_GROUP_BYTES / len + 1) as u32;
        apply(&mut sm, vec![entry(4, Cmd::Fill { prefix: b"f".to_vec(), from: 0, count, len: len as u32 })]).await;
        assert_eq!(applied(&sm).len(), 3 + count as usize);
        let deadline = Instant::now() + SETTLE;
        while stored().len() < 3 + count as usize {
            assert!(Instant::now() < deadline, "the batch over the budget was never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        apply(&mut sm, batch(5)).await;
        assert!(unwritten() > 0 && unwritten() < UNWRITTEN_GROUP_BYTES as u64, "only the last batch is held: {}", unwritten());
        drop(sm);
        let sm = open().await;
        assert_eq!(sm.read(|r| r.scan(Cf::Messages, &a, &b, usize::MAX).unwrap()).len(), 3 + count as usize);
        drop(sm);
        // A stopped group (its gate closed) writes nothing more, so that a
        // deletion after it is never followed by a late write.
        let gate = WriteGate::default();
        let mut sm = open().await.with_write_gate(gate.clone());
        apply(&mut sm, batch(5)).await;
        let before = stored();
        gate.close();
        sm.write_applied().await.unwrap();
        assert_eq!(stored(), before, "nothing written once the gate is closed");
        assert_eq!(sm.applied_state().await.unwrap().0.map(|l| l.index), Some(7), "still applied in memory");
    }

    /// Written entries are kept in memory until applied, within the
    /// budget, and a bounded read they cover does not touch the store.
    #[tokio::test]
    async fn should_serve_written_entries_from_memory_until_applied() {
        use openraft::storage::{IOFlushed, RaftLogStorage};
        use openraft::type_config::TypeConfigExt as _;
        use openraft::{RaftLogReader, testing::blank_ent};

        use crate::raft::log_store::{CACHE_BYTES, LogStats};
        use crate::store::Engine as _;

        let engine = Arc::new(MemoryEngine::new());
        let store = Store::new(engine.clone(), None);
        let stats = Arc::new(LogStats::default());
        let cached = || stats.cached_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut log = LogStore::new(5, store, stats.clone(), Arc::default(), |_| 0);
        let hook = log.applied_hook();
        let (tx, rx) = TypeConfig::oneshot();
        log.append((1..=4).map(|i| blank_ent::<TypeConfig>(1, 1, i)), IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        assert!(cached() > 0 && cached() <= CACHE_BYTES, "{}", cached());
        // Gone from the store underneath: a read the map covers still has them.
        let (a, b) = crate::raft::keys::log_range(5, 0, None);
        engine.write(&[Op::DeleteRange(Cf::RaftLog, a, b)], false).unwrap();
        let indexes = |es: Vec<crate::raft::types::Entry>| es.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        assert_eq!(indexes(log.try_get_log_entries(2..4).await.unwrap()), vec![2, 3]);
        // The last index comes from the store once everything is written.
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, None);
        hook.applied_through(2);
        assert_eq!(indexes(log.try_get_log_entries(1..3).await.unwrap()), Vec::<u64>::new(), "1 and 2 applied: read from the store");
        assert_eq!(indexes(log.try_get_log_entries(3..5).await.unwrap()), vec![3, 4]);
        hook.applied_through(4);
        assert_eq!(cached(), 0, "every byte back to the budget");
        // A group that stops gives back what it held.
        let (tx, rx) = TypeConfig::oneshot();
        log.append([blank_ent::<TypeConfig>(1, 1, 5)], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        assert!(cached() > 0);
        drop((log, hook));
        assert_eq!(cached(), 0, "a stopped group holds nothing");
        let mut log = LogStore::new(5, Store::new(engine.clone(), None), stats.clone(), Arc::default(), |_| 0);
        let hook = log.applied_hook();
        // Written after being applied (a follower may apply what the
        // leader committed before its own write completes): not kept.
        let (tx, rx) = TypeConfig::oneshot();
        hook.applied_through(6);
        log.append([blank_ent::<TypeConfig>(1, 1, 6)], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(cached(), 0);
    }
}

#[test]
fn engine_views_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let e = RocksEngine::open(dir.path(), RocksTuning::default()).unwrap();
    e.write(&[Op::Put(Cf::Messages, b"a".to_vec(), b"1".to_vec())], false).unwrap();
    e.with_view(&mut |view| {
        e.write(&[Op::Put(Cf::Messages, b"b".to_vec(), b"2".to_vec()), Op::Delete(Cf::Messages, b"a".to_vec())], false).unwrap();
        assert_eq!(view.get(Cf::Messages, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(view.scan(Cf::Messages, b"", b"\xff", 10).unwrap().len(), 1);
        Ok(())
    })
    .unwrap();
    assert_eq!(e.last_in(Cf::Messages, b"", b"\xff").unwrap().map(|(k, _)| k), Some(b"b".to_vec()));
    assert_eq!(e.last_in(Cf::Messages, b"", b"b").unwrap(), None);
}
