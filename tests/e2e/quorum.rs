//! Quorum queues on clusters of real broker processes: replicated with
//! Raft, served from every node, and no confirmed message lost when nodes
//! are killed (`kill -9`) or paused (SIGSTOP).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use warren_client::{Client, ConfirmStatus, ExchangeKind, ExchangeOptions, Message, QueueOptions, Subscription};
use warren_tests::{TestCluster, eventually};

/// Elections take 1-2 s; allow for slow, shared machines.
const FAILOVER: Duration = Duration::from_secs(60);

fn quorum() -> QueueOptions {
    QueueOptions::durable().arg("x-queue-type", "quorum")
}

async fn client(c: &TestCluster, id: u64) -> Client {
    c.node(id).client().await.unwrap_or_else(|e| panic!("client of node {id}: {e}"))
}

/// The queue's leader as node `id` reports it, once it has one.
async fn leader_of(c: &TestCluster, via: u64, queue: &str) -> u64 {
    eventually(FAILOVER, &format!("a leader of {queue} seen from node {via}"), || async {
        let client = c.node(via).client().await.ok()?;
        let info = client.queue_info(queue).await.ok()?;
        (info.leader != 0).then_some(info.leader)
    })
    .await
    .unwrap()
}

/// Publishes `body` until a confirm says the queue has it (a publish that
/// fails while leadership moves is retried: at least once).
pub(crate) async fn publish_confirmed(client: &Client, exchange: &str, key: &str, body: String) -> bool {
    for _ in 0..100 {
        match client.publish(Message::new(exchange, key, body.clone()).persistent()).await {
            Ok(c) if c.status == ConfirmStatus::Routed as i32 => return true,
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    false
}

/// Reads everything in `queue` through `client`, acknowledging; stops after
/// `idle` without a delivery. A subscription that fails or is cancelled
/// (the queue's leader moved) is made again, as an application does.
pub(crate) async fn drain(client: &Client, queue: &str, idle: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    'subscribe: while Instant::now() < deadline {
        let mut consumer = match client.consume(Subscription::new(queue).prefetch(500)).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(idle, consumer.next()).await {
                Ok(Ok(Some(d))) => {
                    let body = String::from_utf8_lossy(&d.body).into_owned();
                    if consumer.ack(d.delivery_tag).await.is_err() {
                        // Not acknowledged: it comes back, and is read again.
                        continue 'subscribe;
                    }
                    out.push(body);
                }
                // Cancelled or broken: subscribe again.
                Ok(Ok(None)) | Ok(Err(_)) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'subscribe;
                }
                // Idle: the queue is drained.
                Err(_) => break 'subscribe,
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_serve_a_quorum_queue_and_its_topology_from_every_node() {
    let c = TestCluster::start(3).await.unwrap();
    let (c1, c2, c3) = (client(&c, 1).await, client(&c, 2).await, client(&c, 3).await);

    // Declared on one node, known on all, with its replicas.
    c1.declare_queue("orders", quorum()).await.unwrap();
    for (id, cl) in [(1, &c1), (2, &c2), (3, &c3)] {
        let info = cl.queue_info("orders").await.unwrap_or_else(|e| panic!("node {id}: {e}"));
        assert_eq!(info.queue_type, "quorum", "node {id}");
        assert_eq!(info.members, vec![1, 2, 3], "node {id}");
    }
    let leader = leader_of(&c, 2, "orders").await;
    assert!((1..=3).contains(&leader));
    // Each node's /metrics shows its view of the queue's Raft group.
    for id in 1..=3u64 {
        let text = c.node(id).metrics().await.unwrap();
        let value = |name: &str| {
            let prefix = format!("{name}{{queue=\"orders\"}} ");
            text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(|v| v.trim().to_string())
        };
        assert_eq!(value("warren_quorum_queue_leader").as_deref(), Some(leader.to_string().as_str()), "node {id}:\n{text}");
        assert_eq!(value("warren_quorum_queue_is_leader").as_deref(), Some(if id == leader { "1" } else { "0" }), "node {id}");
        assert_eq!(value("warren_quorum_queue_members").as_deref(), Some("3"), "node {id}");
        assert!(value("warren_quorum_queue_term").is_some_and(|t| t != "0"), "node {id}");
        assert!(value("warren_quorum_queue_elections_total").is_some_and(|t| t != "0"), "node {id}: at least the first election");
        assert!(value("warren_quorum_queue_commit_index").is_some(), "node {id}");
        if id == leader {
            assert!(text.contains("warren_quorum_queue_replica_lag_entries{queue=\"orders\",node="), "leader {id}:\n{text}");
        }
    }
    // Re-declaring is idempotent from any node; other properties conflict.
    c3.declare_queue("orders", quorum()).await.unwrap();
    // A queue that became a quorum queue by the cluster's default type is
    // re-declared as it was declared (no x-queue-type); classic conflicts.
    c1.declare_queue("by-default", QueueOptions::durable()).await.unwrap();
    assert_eq!(c2.queue_info("by-default").await.unwrap().queue_type, "quorum");
    c3.declare_queue("by-default", QueueOptions::durable()).await.unwrap();
    let err = c2.declare_queue("by-default", QueueOptions::durable().arg("x-queue-type", "classic")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    let err = c2.declare_queue("orders", quorum().arg("x-max-length", 5i64)).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    // Quorum queues must be durable and shared.
    let err = c1.declare_queue("bad", QueueOptions::default().arg("x-queue-type", "quorum")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");

    // Exchanges and bindings, declared anywhere, route everywhere.
    c2.declare_exchange("shop", ExchangeKind::Topic, ExchangeOptions::durable()).await.unwrap();
    c3.bind_queue("shop", "orders", "order.*").await.unwrap();
    for id in 1..=3u64 {
        let cl = client(&c, id).await;
        let bindings = cl.list_bindings().await.unwrap();
        assert!(bindings.iter().any(|b| b.source == "shop" && b.destination == "orders"), "node {id}: {bindings:?}");
    }
    // Publish through each node (the default exchange and the topic one).
    for (i, cl) in [&c1, &c2, &c3].into_iter().enumerate() {
        let confirm = cl.publish(Message::new("", "orders", format!("direct-{i}")).persistent()).await.unwrap();
        assert_eq!(confirm.status, ConfirmStatus::Routed as i32, "{confirm:?}");
        let confirm = cl.publish(Message::new("shop", "order.new", format!("topic-{i}")).persistent()).await.unwrap();
        assert_eq!(confirm.status, ConfirmStatus::Routed as i32, "{confirm:?}");
    }
    eventually(FAILOVER, "6 ready on every node", || async {
        let mut all = true;
        for cl in [&c1, &c2, &c3] {
            all &= cl.queue_info("orders").await.ok()?.ready == 6;
        }
        all.then_some(())
    })
    .await
    .unwrap();

    // Get from a follower, consume through another node; acks settle.
    let follower = (1..=3u64).find(|n| *n != leader).unwrap_or(1);
    let got = client(&c, follower).await.get("orders", 1, true).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(String::from_utf8_lossy(&got[0].body), "direct-0", "FIFO across nodes");
    let other = (1..=3u64).find(|n| *n != leader && *n != follower).unwrap_or(1);
    let rest = drain(&client(&c, other).await, "orders", Duration::from_secs(2)).await;
    assert_eq!(rest, vec!["topic-0", "direct-1", "topic-1", "direct-2", "topic-2"]);
    eventually(FAILOVER, "the queue empty everywhere", || async {
        let mut all = true;
        for cl in [&c1, &c2, &c3] {
            let q = cl.queue_info("orders").await.ok()?;
            all &= q.ready == 0 && q.unacked == 0;
        }
        all.then_some(())
    })
    .await
    .unwrap();

    // Purge and delete from any node.
    c2.publish(Message::new("", "orders", "x").persistent()).await.unwrap();
    assert_eq!(c3.purge_queue("orders").await.unwrap(), 1);
    c1.delete_queue("orders", false, false).await.unwrap();
    for (id, cl) in [(1, &c1), (2, &c2), (3, &c3)] {
        let err = cl.queue_info("orders").await.unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::NotFound), "node {id}: {err}");
    }
}

/// What the checker's consumers saw: (consumer, message id, redelivered),
/// in the order each consumer received them.
/// One delivery the checker's consumers saw.
#[derive(Clone, Debug)]
struct Delivered {
    /// Which checker consumer.
    consumer: usize,
    id: String,
    redelivered: bool,
    count: u32,
    /// The broker's consumer tag and delivery tag, to tell a delivery sent
    /// twice from a message delivered twice.
    consumer_tag: String,
    tag: u64,
}
type Seen = Arc<std::sync::Mutex<Vec<Delivered>>>;

/// A publisher of the checker: ids `p{k}-{seq}` in order, each published
/// (with its id as `message_id`) until a confirm says the queue has it
/// (`ROUTED`, or `DUPLICATE` when an earlier try made it), as an
/// application does after an unknown outcome. Returns the confirmed ids and
/// the number of publish calls.
async fn checker_publisher(client: Client, k: usize, stop: Arc<AtomicBool>) -> (Vec<String>, u64) {
    let (mut confirmed, mut calls) = (Vec::new(), 0u64);
    let mut seq = 0u64;
    // Bounded: the test stops publishers long before this.
    while !stop.load(Ordering::SeqCst) && seq < 1_000_000 {
        let id = format!("p{k}-{seq:07}");
        let (mut tries, first) = (0, Instant::now());
        loop {
            tries += 1;
            calls += 1;
            let publish = client.publish(Message::new("", "jobs", id.clone()).persistent().message_id(id.clone()));
            match tokio::time::timeout(Duration::from_secs(15), publish).await {
                Ok(Ok(c)) if c.status == ConfirmStatus::Routed as i32 || c.status == ConfirmStatus::Duplicate as i32 => break,
                _ => {
                    assert!(first.elapsed() < Duration::from_secs(120), "{id}: no confirm after {tries} tries in 120 s");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        confirmed.push(id);
        seq += 1;
    }
    (confirmed, calls)
}

/// A consumer of the checker: subscribes (again, after the stream ends or
/// fails, on whichever node answers), records every delivery and
/// acknowledges it. Ends once `draining` is set and nothing came for 5 s.
async fn checker_consumer(client: Client, k: usize, draining: Arc<AtomicBool>, seen: Seen) {
    let deadline = Instant::now() + Duration::from_secs(900);
    'subscribe: while Instant::now() < deadline {
        let mut consumer = match client.consume(Subscription::new("jobs").prefetch(50)).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
                Ok(Ok(Some(d))) => {
                    let id = String::from_utf8_lossy(&d.body).into_owned();
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Delivered {
                        consumer: k,
                        id,
                        redelivered: d.redelivered,
                        count: d.delivery_count,
                        consumer_tag: d.consumer_tag.clone(),
                        tag: d.delivery_tag,
                    });
                    if consumer.ack(d.delivery_tag).await.is_err() {
                        // Not acknowledged: it comes back, redelivered.
                        continue 'subscribe;
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'subscribe;
                }
                Err(_) if draining.load(Ordering::SeqCst) => return,
                Err(_) => {}
            }
        }
    }
}

/// The checker, in the style of Jepsen's queue test: two publishers with
/// confirms and unique ids (retrying what was not confirmed, deduplicated
/// by message id), two consumers with manual acks, all with every node's
/// address, while the queue's leader is killed (`kill -9`) and restarted
/// `WARREN_KILL_ROUNDS` times in a row (default 20). At the end everything
/// is drained and checked: every confirmed id consumed at least once, no id
/// consumed that was never published, and each publisher's ids first
/// delivered to each consumer in the order they were published. Second
/// deliveries not marked `redelivered` are counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_lose_no_confirmed_message_when_leaders_are_killed() {
    let rounds: usize = std::env::var("WARREN_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20).min(100);
    let mut c = TestCluster::start(3).await.unwrap();
    let all = c.ids().map(|id| c.node(id).url()).collect::<Vec<_>>().join(",");
    let queue = quorum().arg("x-deduplication-window", 3_600_000i64);
    client(&c, 1).await.declare_queue("jobs", queue).await.unwrap();

    let (stop, draining) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let seen: Seen = Default::default();
    let mut publishers = Vec::new();
    let mut consumers = Vec::new();
    for k in 0..2 {
        publishers.push(tokio::spawn(checker_publisher(Client::connect(&all).await.unwrap(), k, stop.clone())));
        consumers.push(tokio::spawn(checker_consumer(Client::connect(&all).await.unwrap(), k, draining.clone(), seen.clone())));
    }

    let mut failovers = Vec::new();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let leader = leader_of(&c, 1 + (round as u64 % 3), "jobs").await;
        let survivor = (1..=3u64).find(|n| *n != leader).unwrap_or(1);
        let cl = client(&c, survivor).await;
        let killed_at = Instant::now();
        c.kill(leader).unwrap();
        let new_leader = eventually(FAILOVER, "a new leader", || async {
            let info = cl.queue_info("jobs").await.ok()?;
            (info.leader != 0 && info.leader != leader).then_some(info.leader)
        })
        .await
        .unwrap();
        failovers.push(killed_at.elapsed());
        c.restart(leader).await.unwrap();
        // The next kill only once every replica is back (a majority stays).
        eventually(FAILOVER, "every replica online again", || async {
            let info = cl.queue_info("jobs").await.ok()?;
            (info.online.len() == 3).then_some(())
        })
        .await
        .unwrap();
        eprintln!("round {round}: killed leader {leader}, new leader {new_leader} after {:?}", failovers[round]);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut confirmed, mut calls) = (Vec::new(), 0);
    for p in publishers {
        let (ids, n) = p.await.unwrap();
        confirmed.push(ids);
        calls += n;
    }
    draining.store(true, Ordering::SeqCst);
    for consumer in consumers {
        consumer.await.unwrap();
    }
    // The consumers stopped after 5 s without a delivery. Whatever is left
    // (a subscription that stalled) is read by a new consumer, and counted.
    let left = client(&c, 1).await.queue_info("jobs").await.unwrap();
    eprintln!("left after the consumers stopped: ready {}, unacked {}, consumers {}", left.ready, left.unacked, left.consumers);
    let before_final = seen.lock().unwrap_or_else(|e| e.into_inner()).len();
    let stop_final = Arc::new(AtomicBool::new(true));
    checker_consumer(Client::connect(&all).await.unwrap(), 2, stop_final, seen.clone()).await;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // Every id a publisher tried: its confirmed ones and the one it was on.
    let published: BTreeSet<String> =
        confirmed.iter().enumerate().flat_map(|(k, ids)| ids.iter().cloned().chain([format!("p{k}-{:07}", ids.len())])).collect();
    let consumed: BTreeSet<&String> = seen.iter().map(|d| &d.id).collect();
    let lost: Vec<&String> = confirmed.iter().flatten().filter(|id| !consumed.contains(id)).collect();
    let phantom: Vec<&&String> = consumed.iter().filter(|id| !published.contains(id.as_str())).collect();
    // A second (or later) delivery of an id not marked redelivered.
    let mut deliveries: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unmarked = Vec::new();
    for d in &seen {
        let n = deliveries.entry(&d.id).or_default();
        *n += 1;
        if *n > 1 && !d.redelivered {
            unmarked.push(d.id.clone());
        }
    }
    let duplicates: usize = deliveries.values().map(|n| n - 1).sum();
    // Per consumer and publisher, the first delivery of each id comes in
    // publish order (later deliveries of an id are redeliveries).
    let mut first_seen: BTreeSet<&str> = BTreeSet::new();
    let mut last: BTreeMap<(usize, &str), &str> = BTreeMap::new();
    let mut out_of_order = Vec::new();
    for Delivered { consumer: k, id, .. } in &seen {
        if !first_seen.insert(id) {
            continue;
        }
        let publisher = id.split('-').next().unwrap_or("");
        if let Some(prev) = last.insert((*k, publisher), id)
            && prev >= id.as_str()
        {
            out_of_order.push(format!("consumer {k}: {prev} then {id}"));
        }
    }
    let total_confirmed: usize = confirmed.iter().map(Vec::len).sum();
    let final_reads = seen.len() - before_final;
    let mut sorted = failovers.clone();
    sorted.sort();
    eprintln!("failover times: {failovers:?}");
    eprintln!(
        "quorum-figure: {rounds} leader kills; {calls} publish calls, {total_confirmed} confirmed, {} delivered ({} distinct; {final_reads} by the final reader), {duplicates} redelivered duplicate(s), {} lost; failover median {:?}, max {:?}",
        seen.len(),
        consumed.len(),
        lost.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    );
    assert!(lost.is_empty(), "{} confirmed message(s) never consumed, e.g. {:?}", lost.len(), lost.iter().take(5).collect::<Vec<_>>());
    assert!(phantom.is_empty(), "consumed but never published: {:?}", phantom.iter().take(5).collect::<Vec<_>>());
    // Duplicates only as redeliveries: a second delivery of an id without
    // the mark is a message enqueued twice (a retried publish that
    // deduplication missed) or a delivery the queue forgot it made.
    if !unmarked.is_empty() {
        let history = |id: &String| {
            seen.iter()
                .enumerate()
                .filter(|(_, s)| &s.id == id)
                .map(|(at, s)| {
                    format!("#{at} consumer {} {}/{} redelivered={} count={}", s.consumer, s.consumer_tag, s.tag, s.redelivered, s.count)
                })
                .collect::<Vec<_>>()
        };
        panic!(
            "{} duplicate(s) not marked redelivered, e.g. {:?}; deliveries of the first (position, delivery): {:?}",
            unmarked.len(),
            unmarked.iter().take(5).collect::<Vec<_>>(),
            unmarked.first().map(history)
        );
    }
    assert!(out_of_order.is_empty(), "first deliveries out of publish order: {:?}", out_of_order.iter().take(5).collect::<Vec<_>>());
    assert!(total_confirmed > 20 * rounds.max(1), "too few confirmed publishes ({total_confirmed}) for the test to mean anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_return_unacknowledged_messages_when_the_leader_dies_and_keep_going_with_a_paused_follower() {
    let mut c = TestCluster::start(3).await.unwrap();
    client(&c, 1).await.declare_queue("work", quorum()).await.unwrap();
    let leader = leader_of(&c, 1, "work").await;
    let others: Vec<u64> = (1..=3u64).filter(|n| *n != leader).collect();
    let cl = client(&c, others[0]).await;
    for i in 0..20 {
        assert!(publish_confirmed(&cl, "", "work", format!("w{i}")).await);
    }
    // A consumer through the leader takes 5 and acknowledges none.
    let on_leader = client(&c, leader).await;
    let mut consumer = on_leader.consume(Subscription::new("work").prefetch(5)).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 5 {
        let d = consumer.next_timeout(Duration::from_secs(20)).await.unwrap().expect("a delivery");
        held.push(String::from_utf8_lossy(&d.body).into_owned());
    }
    c.kill(leader).unwrap();
    drop(consumer);
    // A follower paused: the last node and the queue still make a majority
    // only with it, so resume it once the failover is under way.
    c.pause(others[1]).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.resume(others[1]).unwrap();
    for _ in 0..10 {
        let q = cl.queue_info("work").await;
        eprintln!("DEBUG {:?}", q.map(|q| (q.leader, q.ready, q.unacked, q.consumers)));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let got = drain(&cl, "work", Duration::from_secs(3)).await;
    let unique: BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), 20, "all 20 back, the 5 held ones included: {got:?}");
    for h in &held {
        assert!(got.contains(h), "{h} came back");
    }
    let counts: BTreeMap<&String, usize> = got.iter().fold(BTreeMap::new(), |mut m, g| {
        *m.entry(g).or_default() += 1;
        m
    });
    assert!(counts.values().all(|n| *n == 1), "each once: {counts:?}");
    c.restart(leader).await.unwrap();
}

/// A client given every node's address keeps working when one dies: its
/// calls go to the nodes that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_let_a_client_of_several_nodes_carry_on_when_one_dies() {
    let mut c = TestCluster::start(3).await.unwrap();
    let all = (1..=3u64).map(|id| c.node(id).url()).collect::<Vec<_>>().join(",");
    let client = Client::connect(&all).await.unwrap();
    client.declare_queue("events", quorum()).await.unwrap();
    assert!(publish_confirmed(&client, "", "events", "before".into()).await);
    let leader = leader_of(&c, 1, "events").await;
    c.kill(leader).unwrap();
    // Once the failover is over, every call succeeds, none goes to the dead
    // node.
    let survivor = (1..=3u64).find(|n| *n != leader).unwrap_or(1);
    let _ = eventually(FAILOVER, "a new leader", || async {
        let info = client_of(&c, survivor).await?.queue_info("events").await.ok()?;
        (info.leader != 0 && info.leader != leader).then_some(())
    })
    .await;
    let mut failures = 0;
    for i in 0..50 {
        match client.publish(Message::new("", "events", format!("after-{i}")).persistent()).await {
            Ok(confirm) if confirm.status == ConfirmStatus::Routed as i32 => {}
            other => {
                failures += 1;
                eprintln!("call {i} failed: {other:?}");
            }
        }
    }
    assert!(failures <= 2, "{failures} of 50 calls failed after the failover");
    let got = drain(&client, "events", Duration::from_secs(3)).await;
    assert!(got.contains(&"before".to_string()));
    assert!(got.len() >= 49, "{got:?}");
}

async fn client_of(c: &TestCluster, id: u64) -> Option<Client> {
    c.node(id).client().await.ok()
}

/// Whether node `node`'s replica of `queue` has everything committed, as
/// the queue's leader reports it (a leader has it by definition).
async fn caught_up(c: &TestCluster, queue: &str, node: u64) -> Option<()> {
    let leader = client_of(c, node).await?.queue_info(queue).await.ok()?.leader;
    if leader == 0 {
        return None;
    }
    if leader == node {
        return Some(());
    }
    let status = client_of(c, leader).await?.raw().cluster_status(warren_client::proto::ClusterStatusRequest {}).await.ok()?.into_inner();
    let q = status.queues.iter().find(|q| q.name == queue)?;
    (q.leader == leader && q.lag.iter().any(|l| l.node == node && l.entries == 0)).then_some(())
}

/// The leader reports what a paused follower lacks in entries, messages
/// and bytes (status and metrics alike), exactly, and nothing once it is
/// back and caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_report_a_paused_followers_lag_in_entries_messages_and_bytes() {
    let c = TestCluster::start(3).await.unwrap();
    client(&c, 1).await.declare_queue("lagging", quorum()).await.unwrap();
    let leader = leader_of(&c, 1, "lagging").await;
    let follower = (1..=3u64).find(|n| *n != leader).unwrap();
    let lc = client(&c, leader).await;
    assert!(publish_confirmed(&lc, "", "lagging", "before".into()).await);
    eventually(FAILOVER, "the follower caught up", || caught_up(&c, "lagging", follower)).await.unwrap();
    c.pause(follower).unwrap();
    let body = "x".repeat(200);
    for _ in 0..50 {
        assert!(publish_confirmed(&lc, "", "lagging", body.clone()).await);
    }
    let lag = replica_status(&c, leader, "lagging").await.unwrap().lag.into_iter().find(|l| l.node == follower).unwrap();
    assert!(lag.exact && lag.entries >= 1, "{lag:?}");
    assert_eq!(lag.messages, 50, "{lag:?}");
    assert!(lag.bytes >= 50 * 200, "{lag:?}");
    let text = c.node(leader).metrics().await.unwrap();
    let metric = |name: &str| {
        let prefix = format!("{name}{{queue=\"lagging\",node=\"{follower}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(|v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!(metric("warren_quorum_queue_replica_lag_messages"), Some(50), "{text}");
    assert_eq!(metric("warren_quorum_queue_replica_lag_bytes"), Some(lag.bytes));
    assert_eq!(metric("warren_quorum_queue_replica_lag_entries"), Some(lag.entries));
    c.resume(follower).unwrap();
    eventually(FAILOVER, "the follower caught up again", || async {
        let lag = replica_status(&c, leader, "lagging").await?.lag.into_iter().find(|l| l.node == follower)?;
        (lag.entries == 0 && lag.messages == 0 && lag.bytes == 0 && lag.exact).then_some(())
    })
    .await
    .unwrap();
}

/// Replicas write what they apply without the store's write-ahead log (the
/// Raft log is what is durable), so `kill -9` of every node at once loses
/// every replica's applied state since the store's last flush. Each must
/// rebuild it from its log: after the restart the queue holds exactly what
/// it held, as two different replicas show in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_rebuild_every_replica_from_its_log_when_every_node_is_killed() {
    let mut c = TestCluster::start(3).await.unwrap();
    let c1 = client(&c, 1).await;
    c1.declare_queue("rebuilt", quorum()).await.unwrap();
    for i in 0..500 {
        assert!(publish_confirmed(&c1, "", "rebuilt", format!("r{i:03}")).await, "r{i:03}");
    }
    // Taken (and so removed) through the log.
    let mut taken = 0;
    while taken < 100 {
        let got = c1.get("rebuilt", (100 - taken) as u32, true).await.unwrap();
        assert!(!got.is_empty(), "the queue ran dry after {taken}");
        taken += got.len();
    }
    assert_eq!(taken, 100);
    // The replicas hold what they applied in memory (a queue writes its
    // applied state to the store now and then): the kill loses it, and the
    // log must bring it back.
    let mut held = Vec::new();
    for id in 1..=3u64 {
        held.push(gauge(&c.node(id).metrics().await.unwrap(), "warren_raft_unwritten_bytes").unwrap_or(0));
    }
    assert!(held.iter().any(|b| *b > 0), "no replica held applied state in memory: {held:?}");
    for id in 1..=3u64 {
        c.kill(id).unwrap();
    }
    for id in 1..=3u64 {
        c.restart(id).await.unwrap();
    }
    let first = leader_of(&c, 1, "rebuilt").await;
    // A new leader may still be applying the entries it rolled back past
    // (its counts climb back through earlier states): the counts must
    // settle at exactly what was confirmed and taken.
    let last = std::cell::Cell::new(None);
    let settled = eventually(FAILOVER, "the queue's counts after the restart", || async {
        let info = client_of(&c, first).await?.queue_info("rebuilt").await.ok()?;
        last.set(Some((info.leader, info.ready, info.unacked)));
        (info.leader == first && (info.ready, info.unacked) == (400, 0)).then_some(())
    })
    .await;
    let last = last.get();
    assert!(
        settled.is_ok(),
        "node {first}'s replica after every node was killed: (leader, ready, unacked) = {last:?}, expected ({first}, 400, 0)"
    );
    // Another replica leads: its state was rebuilt too.
    c.kill(first).unwrap();
    let via = if first == 1 { 2 } else { 1 };
    let second = eventually(FAILOVER, "a new leader", || async {
        let l = client_of(&c, via).await?.queue_info("rebuilt").await.ok()?.leader;
        (l != 0 && l != first).then_some(l)
    })
    .await
    .unwrap();
    let got = drain(&client(&c, second).await, "rebuilt", Duration::from_secs(2)).await;
    let expected: Vec<String> = (100..500).map(|i| format!("r{i:03}")).collect();
    assert_eq!(got, expected, "node {second}'s replica after every node was killed");
    // Once the queue is idle (quiet), every running replica has written
    // what it applied: nothing is held in memory.
    for id in (1..=3u64).filter(|id| *id != first) {
        let last = std::cell::Cell::new(None);
        let written = eventually(Duration::from_secs(60), "the applied state written once the queue is quiet", || async {
            let held = gauge(&c.node(id).metrics().await.ok()?, "warren_raft_unwritten_bytes");
            last.set(held);
            (held == Some(0)).then_some(())
        })
        .await;
        assert!(written.is_ok(), "node {id} still holds {:?} bytes of applied state", last.get());
    }
}

/// A gauge without labels from a Prometheus text scrape.
fn gauge(text: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok())
}

/// A quorum queue's deduplication window is replicated state: it survives
/// every node restarting, so a publish retried after a whole-cluster
/// restart (its first confirm lost) is still recognised as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_remember_deduplicated_ids_when_every_node_restarts() {
    let mut c = TestCluster::start(3).await.unwrap();
    let queue = quorum().arg("x-deduplication-window", 3_600_000i64);
    client(&c, 1).await.declare_queue("once", queue).await.unwrap();
    let publish = |client: Client, id: &'static str| async move {
        let message = Message::new("", "once", id).persistent().message_id(id);
        for _ in 0..100 {
            match client.publish(message.clone()).await {
                Ok(confirm) if confirm.status != ConfirmStatus::Rejected as i32 => return confirm.status,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("{id}: no confirm after 100 tries");
    };
    assert_eq!(publish(client(&c, 1).await, "m-1").await, ConfirmStatus::Routed as i32);
    for id in 1..=3u64 {
        c.kill(id).unwrap();
    }
    for id in 1..=3u64 {
        c.restart(id).await.unwrap();
    }
    for via in 1..=3u64 {
        leader_of(&c, via, "once").await;
        assert_eq!(
            publish(client(&c, via).await, "m-1").await,
            ConfirmStatus::Duplicate as i32,
            "m-1 published again through node {via} after every node restarted"
        );
    }
    assert_eq!(publish(client(&c, 2).await, "m-2").await, ConfirmStatus::Routed as i32);
    let got = drain(&client(&c, 3).await, "once", Duration::from_secs(2)).await;
    assert_eq!(got, vec!["m-1".to_string(), "m-2".to_string()]);
}

/// A node that lost its disk comes back empty and copies what it held from
/// the others (the metadata and its quorum queue replicas). Each of the
/// three nodes loses its data directory in turn, so at the end no original
/// copy is left: every confirmed message is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_rebuild_a_node_that_lost_its_disk_from_the_others() {
    let mut c = TestCluster::start(3).await.unwrap();
    let c1 = client(&c, 1).await;
    c1.declare_queue("ledger", quorum()).await.unwrap();
    let mut confirmed = BTreeSet::new();
    for i in 0..200 {
        let body = format!("l{i}");
        assert!(publish_confirmed(&c1, "", "ledger", body.clone()).await, "{body}");
        confirmed.insert(body);
    }
    for lost in [3u64, 1, 2] {
        c.kill(lost).unwrap();
        let dir = c.node(lost).data_dir().to_path_buf();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        c.restart(lost).await.unwrap();
        eventually(FAILOVER, &format!("node {lost} rebuilt from the others"), || caught_up(&c, "ledger", lost)).await.unwrap();
        // Every replica runs on (none stopped at the shorter log): all
        // three report the same leader and term.
        eventually(FAILOVER, "every node agreeing on the queue's leader and term", || async {
            let mut views = BTreeSet::new();
            for id in 1..=3u64 {
                let status = client_of(&c, id).await?.raw().cluster_status(warren_client::proto::ClusterStatusRequest {}).await.ok()?;
                let q = status.into_inner().queues.into_iter().find(|q| q.name == "ledger")?;
                views.insert((q.leader, q.term));
            }
            (views.len() == 1 && views.iter().all(|(leader, _)| *leader != 0)).then_some(())
        })
        .await
        .unwrap();
        let info = client(&c, lost).await.queue_info("ledger").await.unwrap();
        assert_eq!((info.queue_type.as_str(), info.members.clone()), ("quorum", vec![1, 2, 3]), "node {lost} knows the queue again");
        eprintln!("node {lost}: data directory lost, rebuilt");
    }
    let got = drain(&client(&c, 2).await, "ledger", Duration::from_secs(3)).await;
    let unique: BTreeSet<String> = got.into_iter().collect();
    let missing: Vec<&String> = confirmed.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed message(s) lost with the disks, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}

/// Dead letters from a classic queue into a quorum queue are never lost:
/// while the quorum queue has no majority they wait in the classic queue's
/// node (its inbox) and are handed over once it has one again, also when
/// that node was killed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_hand_dead_letters_from_a_classic_queue_to_a_quorum_queue_that_lost_its_majority() {
    let mut c = TestCluster::start(3).await.unwrap();
    let c1 = client(&c, 1).await;
    c1.declare_queue("parked", quorum()).await.unwrap();
    let work = QueueOptions::durable()
        .arg("x-queue-type", "classic")
        .arg("x-message-ttl", 200i64)
        .arg("x-dead-letter-exchange", "")
        .arg("x-dead-letter-routing-key", "parked");
    c1.declare_queue("work", work).await.unwrap();
    let mut expected = Vec::new();
    for (round, kill_source) in [(0, false), (1, true)] {
        // No majority for the quorum queue: only node 1 runs.
        c.kill(2).unwrap();
        c.kill(3).unwrap();
        let c1 = client(&c, 1).await;
        for i in 0..20 {
            let body = format!("r{round}-{i:02}");
            let confirm = c1.publish(Message::new("", "work", body.clone()).persistent()).await.unwrap();
            assert_eq!(confirm.status, ConfirmStatus::Routed as i32, "{body} into the classic queue");
            expected.push(body);
        }
        // They expire and are dead-lettered: the quorum queue cannot take
        // them yet.
        eventually(FAILOVER, "the classic queue emptied by expiry", || async {
            let info = client_of(&c, 1).await?.queue_info("work").await.ok()?;
            (info.ready == 0 && info.unacked == 0).then_some(())
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if kill_source {
            c.kill(1).unwrap();
            c.restart(1).await.unwrap();
        }
        c.restart(2).await.unwrap();
        c.restart(3).await.unwrap();
        leader_of(&c, 2, "parked").await;
    }
    let mut got = drain(&client(&c, 3).await, "parked", Duration::from_secs(3)).await;
    got.sort();
    got.dedup();
    assert_eq!(got, expected, "every dead letter reached the quorum queue");
}

/// The queue features of classic queues work on quorum queues too, through
/// any node: TTL and dead-lettering into another quorum queue, length
/// limits, priorities, delays, delivery limits, deduplication and single
/// active consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_keep_every_queue_feature_on_quorum_queues() {
    let c = TestCluster::start(3).await.unwrap();
    let (c1, c2, c3) = (client(&c, 1).await, client(&c, 2).await, client(&c, 3).await);

    // TTL + dead-lettering between two quorum queues (through an exchange).
    c1.declare_exchange("dlx", ExchangeKind::Fanout, ExchangeOptions::durable()).await.unwrap();
    c1.declare_queue("dead", quorum()).await.unwrap();
    c2.bind_queue("dlx", "dead", "").await.unwrap();
    c2.declare_queue("short", quorum().arg("x-message-ttl", 200i64).arg("x-dead-letter-exchange", "dlx")).await.unwrap();
    for i in 0..5 {
        assert!(publish_confirmed(&c3, "", "short", format!("ttl-{i}")).await);
    }
    let dead = eventually(FAILOVER, "5 expired messages dead-lettered", || async {
        let q = c3.queue_info("dead").await.ok()?;
        (q.ready == 5).then_some(q)
    })
    .await
    .unwrap();
    assert_eq!(dead.ready, 5);
    let got = c1.get("dead", 5, true).await.unwrap();
    let bodies: Vec<String> = got.iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
    assert_eq!(bodies, vec!["ttl-0", "ttl-1", "ttl-2", "ttl-3", "ttl-4"], "in order");
    let death = got[0].properties.as_ref().and_then(|p| p.headers.get("x-first-death-reason")).cloned();
    assert_eq!(death, Some("expired".into()));
    assert_eq!(c2.queue_info("short").await.unwrap().ready, 0);

    // Max length with drop-head, and with reject-publish.
    c1.declare_queue("capped", quorum().arg("x-max-length", 3i64)).await.unwrap();
    for i in 0..5 {
        assert!(publish_confirmed(&c2, "", "capped", format!("cap-{i}")).await);
    }
    let bodies: Vec<String> =
        c3.get("capped", 10, true).await.unwrap().iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
    assert_eq!(bodies, vec!["cap-2", "cap-3", "cap-4"], "the oldest dropped");
    c1.declare_queue("full", quorum().arg("x-max-length", 1i64).arg("x-overflow", "reject-publish")).await.unwrap();
    let first = c3.publish(Message::new("", "full", "first").persistent()).await.unwrap();
    assert_eq!(first.status, ConfirmStatus::Routed as i32, "{first:?}");
    let refused = c2.publish(Message::new("", "full", "second").persistent()).await.unwrap();
    assert_eq!(refused.status, ConfirmStatus::Rejected as i32, "{refused:?}");

    // Priorities.
    c1.declare_queue("prio", quorum().arg("x-max-priority", 5i64)).await.unwrap();
    for (body, p) in [("low", 1u32), ("high", 5), ("mid", 3)] {
        let m = Message::new("", "prio", body).persistent().priority(p);
        assert_eq!(c2.publish(m).await.unwrap().status, ConfirmStatus::Routed as i32);
    }
    let bodies: Vec<String> =
        c3.get("prio", 3, true).await.unwrap().iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
    assert_eq!(bodies, vec!["high", "mid", "low"]);

    // Delays: held back, then ready.
    c1.declare_queue("later", quorum()).await.unwrap();
    let m = Message::new("", "later", "delayed").persistent().delay(Duration::from_millis(800));
    assert_eq!(c3.publish(m).await.unwrap().status, ConfirmStatus::Routed as i32);
    assert!(c1.get("later", 1, true).await.unwrap().is_empty(), "not ready yet");
    let got = eventually(FAILOVER, "the delayed message", || async {
        let got = c2.get("later", 1, true).await.ok()?;
        (!got.is_empty()).then_some(got)
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&got[0].body), "delayed");

    // Deduplication by message id.
    c1.declare_queue("once", quorum().arg("x-deduplication-window", 60_000i64)).await.unwrap();
    let first = c2.publish(Message::new("", "once", "a").persistent().message_id("id-1")).await.unwrap();
    let again = c3.publish(Message::new("", "once", "a").persistent().message_id("id-1")).await.unwrap();
    assert_eq!(first.status, ConfirmStatus::Routed as i32);
    assert_eq!(again.status, ConfirmStatus::Duplicate as i32, "a retry through another node is recognised");
    assert_eq!(c1.queue_info("once").await.unwrap().ready, 1);

    // Delivery limit: a message rejected with requeue too often is dropped.
    c1.declare_queue("poison", quorum().arg("x-delivery-limit", 2i64)).await.unwrap();
    assert!(publish_confirmed(&c2, "", "poison", "bad".into()).await);
    let mut consumer = c3.consume(Subscription::new("poison").prefetch(1)).await.unwrap();
    let mut deliveries = 0;
    while let Ok(Some(d)) = consumer.next_timeout(Duration::from_secs(3)).await {
        deliveries += 1;
        consumer.nack(d.delivery_tag, false, true).await.unwrap();
        assert!(deliveries < 10, "the delivery limit stops redeliveries");
    }
    assert!((2..=3).contains(&deliveries), "{deliveries} deliveries with x-delivery-limit 2");
    drop(consumer);

    // Single active consumer: the second waits until the first leaves.
    c1.declare_queue("single", quorum().arg("x-single-active-consumer", true)).await.unwrap();
    for i in 0..4 {
        assert!(publish_confirmed(&c1, "", "single", format!("s{i}")).await);
    }
    let mut first = c2.consume(Subscription::new("single").prefetch(1).consumer_tag("first")).await.unwrap();
    let mut second = c3.consume(Subscription::new("single").prefetch(1).consumer_tag("second")).await.unwrap();
    let d = first.next_timeout(Duration::from_secs(10)).await.unwrap().expect("the active consumer gets a delivery");
    assert!(second.next_timeout(Duration::from_millis(500)).await.unwrap().is_none(), "the other one waits");
    first.ack(d.delivery_tag).await.unwrap();
    // The ack is applied (s1 went to the active consumer) before it leaves.
    eventually(FAILOVER, "the ack applied", || async { (c1.queue_info("single").await.ok()?.ready == 2).then_some(()) }).await.unwrap();
    drop(first);
    let d = second.next_timeout(Duration::from_secs(10)).await.unwrap().expect("the waiting consumer takes over");
    assert_eq!(String::from_utf8_lossy(&d.body), "s1");
}

/// Whether every node of the cluster that answers lists `queue`.
async fn listed_anywhere(c: &TestCluster, queue: &str) -> Option<bool> {
    let mut any = false;
    for id in c.ids() {
        let list = c.node(id).client().await.ok()?.list_queues().await.ok()?;
        any |= list.iter().any(|q| q.name == queue);
    }
    Some(any)
}

/// `x-expires` on quorum queues: the last use is replicated state (stamped
/// by the leader), so the period runs on across a leader's death; gets and
/// re-declares through any node are uses, publishes are not, a consumer
/// keeps the queue; the expired queue goes from every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_delete_a_quorum_queue_unused_for_its_x_expires_period_on_every_node() {
    let mut c = TestCluster::start(3).await.unwrap();
    let (c1, c2, c3) = (client(&c, 1).await, client(&c, 2).await, client(&c, 3).await);

    // Unused but for a publish; its leader is killed and comes back.
    c1.declare_queue("idle", quorum().arg("x-expires", 1500i64)).await.unwrap();
    assert!(publish_confirmed(&c2, "", "idle", "m".into()).await);
    let leader = leader_of(&c, 1, "idle").await;
    c.kill(leader).unwrap();
    c.restart(leader).await.unwrap();
    eventually(FAILOVER, "the unused queue deleted on every node", || async { (!listed_anywhere(&c, "idle").await?).then_some(()) })
        .await
        .unwrap();

    // Gets and re-declares through other nodes are uses: each well within
    // the 5 s period, together past it.
    let polled = || quorum().arg("x-expires", 5000i64);
    c1.declare_queue("polled", polled()).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c2.get("polled", 1, true).await.unwrap();
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c3.declare_queue("polled", polled()).await.unwrap();
    }
    assert_eq!(listed_anywhere(&c, "polled").await, Some(true), "gets and declares keep it in use");
    eventually(FAILOVER, "the queue deleted once the uses stop", || async { (!listed_anywhere(&c, "polled").await?).then_some(()) })
        .await
        .unwrap();

    // A consumer keeps it, however long; its leaving starts the period.
    c1.declare_queue("consumed", quorum().arg("x-expires", 500i64)).await.unwrap();
    let consumer = c3.consume(Subscription::new("consumed")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listed_anywhere(&c, "consumed").await, Some(true), "a queue with a consumer is in use");
    drop(consumer);
    eventually(FAILOVER, "the queue deleted after its consumer left", || async { (!listed_anywhere(&c, "consumed").await?).then_some(()) })
        .await
        .unwrap();
}

/// Messages published while the follower of the catch-up test is down.
const BACKLOG: usize = 100_000;
/// Publishes in flight at once in the catch-up test. The queue's leader
/// commits one Raft entry at a time and puts what arrives meanwhile into
/// the next, so two consecutive entries hold at most this many messages
/// (the second's were sent before the first's confirms came back):
/// 100,000 messages make at least 12,500 entries, past the 10,000 after
/// which a group snapshots and compacts its log. More in flight would
/// publish faster, in entries too few to compact.
const PUBLISH_WINDOW: usize = 16;
/// Bytes of each message body in the catch-up test.
const BODY_BYTES: usize = 1024;

/// `queue` as node `node` reports it in its cluster status (its own
/// replica's last log, snapshot and purged indexes among the rest).
async fn replica_status(c: &TestCluster, node: u64, queue: &str) -> Option<warren_client::proto::QueueReplicas> {
    let status = client_of(c, node).await?.raw().cluster_status(warren_client::proto::ClusterStatusRequest {}).await.ok()?.into_inner();
    status.queues.into_iter().find(|q| q.name == queue)
}

/// The value of `key=` on the first line of `log` that contains `what`.
fn log_field(log: &str, what: &str, key: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(what))?;
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Catch-up from a snapshot, across broker processes: a follower of a
/// quorum queue is killed (`kill -9`) while 100,000 messages (1 KiB,
/// persistent, confirmed) are published and the two other replicas compact
/// their logs past everything it holds. Restarted, it cannot be sent the
/// entries it lacks, so it installs a snapshot streamed from the leader
/// (its log says so, and its own snapshot index is past the leader's purge
/// point), and catches up. Then it leads: the other two replicas are shrunk
/// away (the leader hands its leadership to it) and grown back from it (it
/// sends them the snapshot it installed), and it serves every one of the
/// 100,000 confirmed messages exactly once, nothing else, plus messages
/// published after it took over. Its peak memory is printed next to the
/// snapshot's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_catch_up_a_restarted_follower_from_a_snapshot_and_serve_everything_as_leader() {
    let started = Instant::now();
    let log = [("RUST_LOG", "warn,warren_broker::raft=info")];
    let mut c = TestCluster::start_with_options(3, &[], &log, true).await.unwrap();
    let queue = quorum().arg("x-deduplication-window", 3_600_000i64);
    client(&c, 1).await.declare_queue("backlog", queue).await.unwrap();
    let leader = leader_of(&c, 1, "backlog").await;
    let down = (1..=3u64).rev().find(|n| *n != leader).unwrap_or(1);
    let others: Vec<u64> = (1..=3u64).filter(|n| *n != down).collect();
    eventually(FAILOVER, "the follower caught up before it goes down", || caught_up(&c, "backlog", down)).await.unwrap();
    let held = replica_status(&c, down, "backlog").await.unwrap().last_log_index;
    c.kill(down).unwrap();

    // 100,000 messages through the leader, a window of them in flight.
    // Any without a ROUTED confirm is published again (its id makes a
    // second copy a duplicate the queue drops).
    let body = |i: usize| format!("m{i:06}.{}", ".".repeat(BODY_BYTES - 8));
    let message = |i: usize| Message::new("", "backlog", body(i)).persistent().message_id(format!("m{i:06}"));
    let publishing = Instant::now();
    let via = client(&c, leader).await;
    let mut publisher = via.publisher().await.unwrap();
    let mut window = std::collections::VecDeque::new();
    let mut retry = Vec::new();
    for i in 0..BACKLOG {
        if window.len() == PUBLISH_WINDOW {
            let (n, pending): (usize, warren_client::PendingConfirm) = window.pop_front().unwrap();
            match tokio::time::timeout(Duration::from_secs(30), pending).await {
                Ok(Ok(confirm)) if confirm.is_routed() => {}
                _ => retry.push(n),
            }
        }
        match publisher.send(message(i)).await {
            Ok(pending) => window.push_back((i, pending)),
            Err(_) => {
                retry.push(i);
                publisher = via.publisher().await.unwrap();
            }
        }
    }
    for (n, pending) in window {
        match tokio::time::timeout(Duration::from_secs(30), pending).await {
            Ok(Ok(confirm)) if confirm.is_routed() => {}
            _ => retry.push(n),
        }
    }
    let retried = retry.len();
    for n in retry {
        let mut tries = 0;
        loop {
            tries += 1;
            match via.publish(message(n)).await {
                Ok(confirm) if confirm.is_routed() || confirm.status == ConfirmStatus::Duplicate as i32 => break,
                other => assert!(tries < 100, "m{n:06}: no confirm after {tries} tries: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let published_in = publishing.elapsed();
    let set_up_in = started.elapsed() - published_in;

    // Both replicas that stayed up compacted their logs past the last
    // entry the follower holds: it cannot catch up from a log.
    let compacted = eventually(FAILOVER, "both live replicas' logs compacted past the follower's", || async {
        let mut out = BTreeMap::new();
        for n in &others {
            let q = replica_status(&c, *n, "backlog").await?;
            if q.purged_index <= held {
                return None;
            }
            out.insert(*n, (q.last_log_index, q.snapshot_index, q.purged_index));
        }
        Some(out)
    })
    .await
    .unwrap();
    let purged_before = compacted.values().map(|(_, _, p)| *p).min().unwrap_or(0);
    let compacted_after = publishing.elapsed() - published_in;

    // Restarted, it installs a snapshot and catches up.
    let restarting = Instant::now();
    c.restart(down).await.unwrap();
    eventually(Duration::from_secs(180), "the restarted follower caught up", || caught_up(&c, "backlog", down)).await.unwrap();
    let caught_up_in = restarting.elapsed();
    let stderr = c.node(down).stderr();
    assert!(stderr.contains("installing a snapshot"), "node {down} installed no snapshot; its log:\n{stderr}");
    let installed = log_field(&stderr, "snapshot installed", "records");
    let took_ms = log_field(&stderr, "snapshot installed", "took_ms");
    let snapshot_bytes = log_field(&stderr, "receiving a snapshot", "bytes");
    assert!(installed.is_some_and(|r| r > 0), "node {down} never finished installing a snapshot; its log:\n{stderr}");
    let q = replica_status(&c, down, "backlog").await.unwrap();
    let (last, snapshot, purged) = (q.last_log_index, q.snapshot_index, q.purged_index);
    assert!(
        snapshot >= purged_before && snapshot > held,
        "node {down}'s snapshot reaches {snapshot}: not past the leader's purge point {purged_before} (it held up to {held})"
    );
    let peak_rss = c.node(down).peak_rss_bytes().unwrap_or(0);
    let (leader_rss, leader_peak) = (c.node(leader).rss_bytes().unwrap_or(0), c.node(leader).peak_rss_bytes().unwrap_or(0));

    // It leads: the other replicas are removed (the leader's last, so that
    // it hands its leadership to the only other voter), then added back.
    let moving = Instant::now();
    let current = leader_of(&c, down, "backlog").await;
    let mut order: Vec<u64> = others.iter().copied().filter(|n| *n != current).collect();
    order.extend(others.iter().copied().filter(|n| *n == current));
    let cd = client(&c, down).await;
    for n in &order {
        let r = cd
            .raw()
            .shrink_queues(warren_client::proto::ShrinkQueuesRequest { node: *n, queue_pattern: "^backlog$".into() })
            .await
            .unwrap()
            .into_inner();
        assert!(r.changes.len() == 1 && r.changes[0].ok, "shrinking node {n} away: {r:?}");
    }
    let new_leader = leader_of(&c, down, "backlog").await;
    assert_eq!(new_leader, down, "the only replica left leads");
    let led_in = moving.elapsed();
    for n in &others {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let r = cd
                .raw()
                .grow_queues(warren_client::proto::GrowQueuesRequest { node: *n, queue_pattern: "^backlog$".into(), below: 0 })
                .await
                .unwrap()
                .into_inner();
            if r.changes.len() == 1 && r.changes[0].ok {
                break;
            }
            assert!(Instant::now() < deadline, "growing onto node {n}: {r:?}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        eventually(Duration::from_secs(180), &format!("node {n} caught up from node {down}"), || caught_up(&c, "backlog", *n))
            .await
            .unwrap();
    }
    let regrown_in = moving.elapsed() - led_in;
    // Its log holds nothing below the snapshot it installed: what it sent
    // them was that snapshot.
    let stderr = c.node(down).stderr();
    for n in &others {
        let sent = stderr.lines().any(|l| l.contains("snapshot sent") && l.split_whitespace().any(|w| w == format!("target={n}")));
        assert!(sent, "node {down} sent node {n} no snapshot; its log:\n{stderr}");
    }
    let info = cd.queue_info("backlog").await.unwrap();
    assert_eq!((info.leader, info.members.clone()), (down, vec![1, 2, 3]), "{info:?}");

    // Everything confirmed, served by it, once; and what comes after.
    let after = client(&c, others[0]).await;
    for i in 0..10 {
        assert!(publish_confirmed(&after, "", "backlog", format!("after-{i}")).await, "after-{i}");
    }
    let term = replica_status(&c, down, "backlog").await.unwrap().term;
    let draining = Instant::now();
    let got = crate::drain(&cd, "backlog").await;
    let drained_in = draining.elapsed();
    let q = replica_status(&c, down, "backlog").await.unwrap();
    assert_eq!((q.leader, q.term), (down, term), "it led throughout the drain, in one term");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for b in &got {
        *counts.entry(b.split('.').next().unwrap_or_default().to_string()).or_default() += 1;
    }
    let expected: BTreeSet<String> = (0..BACKLOG).map(|i| format!("m{i:06}")).chain((0..10).map(|i| format!("after-{i}"))).collect();
    let lost: Vec<&String> = expected.iter().filter(|id| !counts.contains_key(*id)).collect();
    let phantom: Vec<&String> = counts.keys().filter(|id| !expected.contains(*id)).collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "{} confirmed message(s) lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    assert!(phantom.is_empty(), "served but never published: {:?}", &phantom[..phantom.len().min(5)]);
    assert!(twice.is_empty(), "served more than once: {:?}", &twice[..twice.len().min(5)]);
    assert_eq!(got.len(), BACKLOG + 10);
    for b in got.iter().filter(|b| b.starts_with('m')) {
        assert_eq!(b.len(), BODY_BYTES, "a body came back altered: {:?}", &b[..b.len().min(40)]);
    }
    eventually(FAILOVER, "the queue empty on every node", || async {
        for n in 1..=3u64 {
            let q = client_of(&c, n).await?.queue_info("backlog").await.ok()?;
            if q.ready != 0 || q.unacked != 0 {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    for n in 1..=3u64 {
        let log = c.node(n).stderr();
        assert!(!log.contains("panicked"), "node {n} panicked:\n{log}");
    }
    eprintln!(
        "catchup-figure: cluster up in {set_up_in:?}; {BACKLOG} messages of {BODY_BYTES} B published in {published_in:?} ({retried} republished); \
         follower held up to index {held}, the others compacted to {compacted:?} (last, snapshot, purged), seen {compacted_after:?} after the last confirm; \
         restarted follower caught up in {caught_up_in:?}: snapshot of {snapshot_bytes:?} bytes, {installed:?} records installed in {took_ms:?} ms, \
         its replica then (last {last}, snapshot {snapshot}, purged {purged}); its peak RSS {} MiB (the leader's: {} MiB, peak {} MiB); \
         it led {led_in:?} after the shrinks began, the others were grown back in {regrown_in:?}; \
         drained {} as leader in {drained_in:?}; whole test {:?}",
        peak_rss >> 20,
        leader_rss >> 20,
        leader_peak >> 20,
        got.len(),
        started.elapsed()
    );
}
