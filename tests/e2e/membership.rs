//! Changing quorum queues' replica sets in a running cluster of real
//! broker processes: grow onto a node, shrink a dead node away, rebalance
//! leaders, through `warrenctl` and the API; no confirmed message lost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use warren_client::proto;
use warren_client::{Client, QueueOptions};
use warren_tests::{CtlOutput, TestCluster, eventually, run_warrenctl};

use crate::quorum::{drain, publish_confirmed};

/// Elections take 1-2 s, catching up more; allow for slow, shared machines.
const SETTLE: Duration = Duration::from_secs(60);

fn quorum(size: i64) -> QueueOptions {
    QueueOptions::durable().arg("x-queue-type", "quorum").arg("x-quorum-initial-group-size", size)
}

async fn client(c: &TestCluster, id: u64) -> Client {
    c.node(id).client().await.unwrap_or_else(|e| panic!("client of node {id}: {e}"))
}

/// `warrenctl` against node `via`, off the test's runtime threads.
async fn ctl(c: &TestCluster, via: u64, args: &[&str]) -> CtlOutput {
    let url = c.node(via).url();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_warrenctl(&url, &refs, None)
    })
    .await
    .unwrap()
    .unwrap()
}

/// The queue's voting replicas as node `via` reports them, once they are
/// `want` (and, on a node that holds a replica, once it knows the leader).
async fn wait_members(c: &TestCluster, via: u64, queue: &str, want: &[u64]) {
    let want: Vec<u64> = want.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
    eventually(SETTLE, &format!("{queue}'s members {want:?} seen from node {via}"), || async {
        let info = c.node(via).client().await.ok()?.queue_info(queue).await.ok()?;
        (info.members == want && (info.leader != 0 || !want.contains(&via))).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_grow_onto_a_node_and_shrink_a_dead_one_away_without_losing_a_message() {
    let mut c = TestCluster::start(5).await.unwrap();
    let c1 = client(&c, 1).await;
    c1.declare_queue("orders", quorum(3)).await.unwrap();
    let original = c1.queue_info("orders").await.unwrap().members;
    assert_eq!(original.len(), 3, "{original:?}");
    let outside: Vec<u64> = c.ids().filter(|n| !original.contains(n)).collect();
    let (grown, via) = (outside[0], outside[1]);

    let cv = client(&c, via).await;
    let mut confirmed = BTreeSet::new();
    for i in 0..300 {
        let body = format!("m{i}");
        assert!(publish_confirmed(&cv, "", "orders", body.clone()).await, "{body} never confirmed");
        confirmed.insert(body);
    }

    // Refused before anything changes: a node outside the cluster, a bad
    // pattern, an impossible `below`.
    for (args, want) in [
        (vec!["queue", "grow", "9"], "node: 9"),
        (vec!["queue", "grow", "1", "--pattern", "("], "queue_pattern"),
        (vec!["queue", "grow", "1", "--below", "6"], "below"),
    ] {
        let out = ctl(&c, via, &args).await;
        assert!(!out.ok() && out.stderr.contains(want), "{args:?}: {out:?}");
    }

    // Grow through a node that holds no replica (the change is forwarded
    // to the queue's leader): the new replica catches up and votes.
    let out = ctl(&c, via, &["queue", "grow", &grown.to_string(), "--pattern", "^orders$"]).await;
    assert!(out.ok(), "{out:?}");
    assert!(out.stdout.contains("orders") && out.stdout.contains("changed"), "{out:?}");
    let mut four = original.clone();
    four.push(grown);
    for n in [via, grown, original[0]] {
        wait_members(&c, n, "orders", &four).await;
    }
    // Again: nothing to do, and it says so.
    let out = ctl(&c, via, &["queue", "grow", &grown.to_string()]).await;
    assert!(out.ok() && out.stdout.contains("unchanged"), "{out:?}");
    let status = cv.raw().cluster_status(proto::ClusterStatusRequest {}).await.unwrap().into_inner();
    let q = status.queues.iter().find(|q| q.name == "orders").unwrap();
    assert_eq!(q.members.len(), 4, "{q:?}");

    // Lose an original replica for good (kill -9), shrink it away.
    let dead = original[0];
    c.kill(dead).unwrap();
    let out = ctl(&c, via, &["queue", "shrink", &dead.to_string()]).await;
    assert!(out.ok(), "{out:?}");
    let three: Vec<u64> = four.iter().copied().filter(|n| *n != dead).collect();
    for n in [via, grown] {
        wait_members(&c, n, "orders", &three).await;
    }
    let critical = cv.raw().quorum_critical(proto::QuorumCriticalRequest { node: grown }).await.unwrap().into_inner();
    assert!(critical.queues.is_empty(), "with 3 of 3 replicas up none is critical: {critical:?}");

    // Lose a second original replica: the grown one keeps the majority.
    let second = original[1];
    c.kill(second).unwrap();
    let got = drain(&cv, "orders", Duration::from_secs(3)).await;
    let got: BTreeSet<String> = got.into_iter().collect();
    let missing: Vec<&String> = confirmed.difference(&got).collect();
    assert!(missing.is_empty(), "{} confirmed message(s) lost: {:?}", missing.len(), &missing[..missing.len().min(10)]);

    // The node shrunk away while dead comes back: it learns it holds no
    // replica any more (and drops its copy), and reports the new set.
    c.restart(dead).await.unwrap();
    wait_members(&c, dead, "orders", &three).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_rebalance_leaders_and_refuse_to_shrink_a_last_replica() {
    let mut c = TestCluster::start(3).await.unwrap();
    let c1 = client(&c, 1).await;
    let names: Vec<String> = (0..6).map(|i| format!("q{i}")).collect();
    for n in &names {
        c1.declare_queue(n, quorum(3)).await.unwrap();
    }
    c1.declare_queue("single", quorum(1)).await.unwrap();
    let single_on = c1.queue_info("single").await.unwrap().members;
    assert_eq!(single_on.len(), 1);

    // Uneven: node 1 loses every leadership while it is down, and comes
    // back a follower of all.
    c.kill(1).unwrap();
    let c2 = client(&c, 2).await;
    for n in &names {
        eventually(SETTLE, &format!("{n} led by 2 or 3"), || async {
            let l = c2.queue_info(n).await.ok()?.leader;
            (l == 2 || l == 3).then_some(())
        })
        .await
        .unwrap();
    }
    c.restart(1).await.unwrap();
    c.wait_for_peers(2, &[1, 2, 3], SETTLE).await.unwrap();

    let leaders = |c2: Client, names: Vec<String>| async move {
        let mut per: BTreeMap<u64, u32> = BTreeMap::from([(1, 0), (2, 0), (3, 0)]);
        for n in &names {
            let l = c2.queue_info(n).await.ok()?.leader;
            *per.get_mut(&l)? += 1;
        }
        Some(per)
    };
    // Rebalance (again while node 1 is still catching up, bounded) until
    // every node leads two.
    let deadline = Instant::now() + SETTLE;
    loop {
        let out = ctl(&c, 2, &["queue", "rebalance", "--pattern", "^q"]).await;
        let per = leaders(c2.clone(), names.clone()).await;
        if per.as_ref().is_some_and(|p| p.values().all(|n| *n == 2)) {
            assert!(out.ok(), "{out:?}");
            break;
        }
        assert!(Instant::now() < deadline, "leaders still uneven: {per:?}; last rebalance: {out:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Even already: nothing moves. (An election between two calls, under
    // the load of a full test run, can move a leader meanwhile; the next
    // rebalance then evens it out again, and the one after moves nothing.
    // Seen once in a CI run: two leaders moved from node 1 to node 3.)
    let mut calls = Vec::new();
    let r = loop {
        let r = c2.raw().rebalance_queues(proto::RebalanceQueuesRequest { queue_pattern: "^q".into() }).await.unwrap().into_inner();
        if r.moved == 0 || calls.len() >= 5 {
            break r;
        }
        calls.push(r);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(r.moved, 0, "{r:?}; earlier calls: {calls:?}");
    assert!(r.leaders.values().all(|n| *n == 2), "{r:?}");

    // The last replica of a queue is never removed.
    let out = ctl(&c, 2, &["queue", "shrink", &single_on[0].to_string(), "--pattern", "^single$"]).await;
    assert!(!out.ok() && out.stdout.contains("only replica"), "{out:?}");
    assert_eq!(c2.queue_info("single").await.unwrap().members, single_on);
    let err = c2.raw().shrink_queues(proto::ShrinkQueuesRequest { node: 0, queue_pattern: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}

/// The cluster as node `via` reports it.
async fn cluster_status(c: &TestCluster, via: u64) -> Option<proto::ClusterStatusResponse> {
    Some(c.node(via).client().await.ok()?.raw().cluster_status(proto::ClusterStatusRequest {}).await.ok()?.into_inner())
}

/// Each listed node's part in the metadata group (`voter`, `learner`, or
/// empty) as node `via` reports it.
async fn metadata_parts(c: &TestCluster, via: u64) -> Option<BTreeMap<u64, String>> {
    Some(cluster_status(c, via).await?.members.into_iter().map(|m| (m.id, m.metadata)).collect())
}

/// Waits until node `via` reports exactly `voters` as the metadata group's
/// voters (and no learner).
async fn wait_metadata_voters(c: &TestCluster, via: u64, voters: &[u64]) {
    let want: BTreeSet<u64> = voters.iter().copied().collect();
    eventually(SETTLE, &format!("metadata voters {want:?} seen from node {via}"), || async {
        let parts = metadata_parts(c, via).await?;
        let got: BTreeSet<u64> = parts.iter().filter(|(_, p)| *p == "voter").map(|(id, _)| *id).collect();
        (got == want && !parts.values().any(|p| p == "learner")).then_some(())
    })
    .await
    .unwrap();
}

/// Waits until node `via` knows a metadata leader whose voters include
/// `voters`.
async fn wait_metadata_leader(c: &TestCluster, via: u64, voters: &[u64]) {
    eventually(SETTLE, &format!("a metadata leader seen from node {via}, with voters {voters:?}"), || async {
        let status = cluster_status(c, via).await?;
        let has = |id: &u64| status.members.iter().any(|m| m.id == *id && m.metadata == "voter");
        (status.metadata_leader != 0 && voters.iter().all(has)).then_some(())
    })
    .await
    .unwrap();
}

/// Restarts `nodes` one at a time with the cluster's current `--peers`,
/// as the operator's rolling restart does: each back (`kill -9`, then
/// started on its data) and seeing a metadata leader with `nodes` among
/// its voters before the next goes.
async fn rolling_restart(c: &mut TestCluster, nodes: &[u64]) {
    for id in nodes {
        c.kill(*id).unwrap();
        c.restart(*id).await.unwrap();
        wait_metadata_leader(c, *id, nodes).await;
    }
}

/// A scale-up as the operator makes it: a new pod starts listing every
/// node while the old ones still list only themselves, then the old ones
/// restart one at a time with the longer list. The new node must not form
/// a metadata group of its own; it is added once the leader lists it,
/// holds the definitions, and can take a queue replica. A scale-down as
/// the operator makes it (the pod removed, then the others restarted
/// without it) takes it out of the group again, so the majority is
/// counted over the nodes that exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_add_a_new_node_to_the_metadata_and_remove_it_after_a_scale_down() {
    let mut c = TestCluster::start(3).await.unwrap();
    let c1 = client(&c, 1).await;
    c1.declare_exchange("events", warren_client::ExchangeKind::Topic, warren_client::ExchangeOptions::durable()).await.unwrap();
    c1.declare_queue("orders", quorum(3)).await.unwrap();
    c1.bind_queue("events", "orders", "order.#").await.unwrap();
    wait_metadata_voters(&c, 1, &[1, 2, 3]).await;

    let new = c.add_node().await.unwrap();
    assert_eq!(new, 4);
    // The old nodes do not know it yet: it waits, forms nothing, and
    // refuses what it would answer from an empty copy (after a bounded
    // wait) rather than saying the exchange does not exist.
    let c4 = client(&c, new).await;
    let early = c4.publish(warren_client::Message::new("events", "order.created", "early").persistent()).await;
    let error = early.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("does not hold the cluster's metadata"), "a publish through node 4 before it joined: {error:?}");
    let parts = metadata_parts(&c, new).await.unwrap();
    assert!(parts.values().all(String::is_empty), "node 4 formed or joined a metadata group on its own: {parts:?}");
    assert_eq!(metadata_parts(&c, 1).await.unwrap().get(&4), None, "node 1 does not list node 4 yet");

    // The rolling restart: each old node comes back listing node 4.
    rolling_restart(&mut c, &[1, 2, 3]).await;
    wait_metadata_voters(&c, new, &[1, 2, 3, 4]).await;
    wait_metadata_voters(&c, 1, &[1, 2, 3, 4]).await;

    // It holds the definitions: a publish through it is routed by the
    // binding made before it existed, and it can take a replica.
    let routed = eventually(SETTLE, "a publish routed through node 4", || async {
        let m = warren_client::Message::new("events", "order.created", "from-4").persistent();
        let confirm = c4.publish(m).await.ok()?;
        (confirm.status == proto::ConfirmStatus::Routed as i32).then_some(())
    })
    .await;
    assert!(routed.is_ok(), "{routed:?}");
    let out = ctl(&c, new, &["queue", "grow", "4", "--pattern", "^orders$"]).await;
    assert!(out.ok(), "{out:?}");
    wait_members(&c, new, "orders", &[1, 2, 3, 4]).await;
    let out = ctl(&c, new, &["cluster", "status"]).await;
    assert!(out.ok() && out.stdout.contains("voter"), "{out:?}");

    // Scale back down: its replica moved off first (as the operator
    // does), then the pod goes and the others restart without it.
    let out = ctl(&c, 1, &["queue", "shrink", "4"]).await;
    assert!(out.ok(), "{out:?}");
    wait_members(&c, 1, "orders", &[1, 2, 3]).await;
    c.remove_last_node().unwrap();
    rolling_restart(&mut c, &[1, 2, 3]).await;
    for id in 1..=3u64 {
        wait_metadata_voters(&c, id, &[1, 2, 3]).await;
    }
    // Nothing confirmed was lost on the way (a retried publish may have
    // been stored twice).
    let got = drain(&client(&c, 2).await, "orders", Duration::from_secs(3)).await;
    assert!(!got.is_empty() && got.iter().all(|m| m == "from-4"), "{got:?}");
}

/// A scale-down that keeps the removed pod's volume (the operator retains
/// PVCs), then a scale-up onto it: the node comes back holding the
/// cluster's metadata as of when it left. It must not serve from that
/// stale copy (a publish through it would miss a binding made meanwhile),
/// and the leader adds it back, since its copy names this cluster, so that
/// it catches up and votes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_add_back_a_removed_node_that_kept_its_data_and_serve_nothing_stale_before() {
    let mut c = TestCluster::start(4).await.unwrap();
    let c1 = client(&c, 1).await;
    c1.declare_exchange("events", warren_client::ExchangeKind::Topic, warren_client::ExchangeOptions::durable()).await.unwrap();
    c1.declare_queue("orders", quorum(4)).await.unwrap();
    c1.bind_queue("events", "orders", "order.#").await.unwrap();
    wait_metadata_voters(&c, 1, &[1, 2, 3, 4]).await;
    // Node 4's copy names the cluster before it leaves.
    let named = eventually(SETTLE, "node 4's copy names the cluster", || async {
        let id = cluster_status(&c, 4).await?.cluster_id;
        (!id.is_empty()).then_some(id)
    })
    .await
    .unwrap();
    assert_eq!(cluster_status(&c, 1).await.unwrap().cluster_id, named, "one cluster, one id");

    // Scale down to 3 as the operator does; node 4's data stays.
    let out = ctl(&c, 1, &["queue", "shrink", "4"]).await;
    assert!(out.ok(), "{out:?}");
    wait_members(&c, 1, "orders", &[1, 2, 3]).await;
    assert_eq!(c.remove_last_node().unwrap(), 4);
    rolling_restart(&mut c, &[1, 2, 3]).await;
    wait_metadata_voters(&c, 1, &[1, 2, 3]).await;

    // Changed while it is gone: a new queue bound to the exchange.
    let c1 = client(&c, 1).await;
    c1.declare_queue("audit", quorum(3)).await.unwrap();
    c1.bind_queue("events", "audit", "order.#").await.unwrap();

    // It comes back listing every node, before the others list it again:
    // it reaches no metadata leader, so it holds requests and then says
    // why, rather than routing with the bindings of when it left.
    assert_eq!(c.bring_back_node().await.unwrap(), 4);
    let c4 = client(&c, 4).await;
    let early = c4.publish(warren_client::Message::new("events", "order.created", "early").persistent()).await;
    let error = early.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("not a copy known to be current"), "a publish through node 4 before it was added back: {error:?}");
    let status = cluster_status(&c, 4).await.unwrap();
    assert!(!status.metadata_current && status.cluster_id == named, "{status:?}");

    // The rolling restart lists it again: the leader adds it back.
    rolling_restart(&mut c, &[1, 2, 3]).await;
    wait_metadata_voters(&c, 1, &[1, 2, 3, 4]).await;
    wait_metadata_voters(&c, 4, &[1, 2, 3, 4]).await;

    // It routes with the binding made while it was gone.
    eventually(SETTLE, "a publish through node 4 routed", || async {
        let m = warren_client::Message::new("events", "order.created", "from-4").persistent();
        (c4.publish(m).await.ok()?.status == proto::ConfirmStatus::Routed as i32).then_some(())
    })
    .await
    .unwrap();
    let got = drain(&c1, "audit", Duration::from_secs(3)).await;
    assert!(!got.is_empty() && got.iter().all(|m| m == "from-4"), "{got:?}");
    assert!(cluster_status(&c, 4).await.unwrap().metadata_current);
}
