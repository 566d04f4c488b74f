//! Network partitions between the nodes of a cluster (every node-to-node
//! link through a fault-injecting proxy), with publishers on every node and
//! a checker in the style of Jepsen's queue test: every message whose publish
//! was confirmed is read back at the end; duplicates are counted, not lost
//! messages.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use warren_client::{Client, ConfirmStatus, Message, QueueOptions, Subscription};
use warren_tests::{PartitionedCluster, eventually};

/// The confirmed ids, shared by the publishers.
type Confirmed = Arc<std::sync::Mutex<Vec<String>>>;

const PATIENCE: Duration = Duration::from_secs(60);

async fn leader(c: &PartitionedCluster, via: u64, queue: &str, not: Option<u64>) -> u64 {
    eventually(PATIENCE, &format!("a leader of {queue} other than {not:?}, seen from node {via}"), || async {
        let info = c.node(via).client().await.ok()?.queue_info(queue).await.ok()?;
        (info.leader != 0 && Some(info.leader) != not).then_some(info.leader)
    })
    .await
    .unwrap()
}

/// Publishes ids `node-N-i` through node `node` until `stop`; records the
/// confirmed ones. A publish without a confirm is not retried: it is simply
/// not counted (the checker only asks that confirmed ones survive).
async fn publisher(client: Client, node: u64, stop: Arc<AtomicBool>, confirmed: Confirmed) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let id = format!("node-{node}-{i}");
        i += 1;
        let publish = client.publish(Message::new("", "ledger", id.clone()).persistent());
        match tokio::time::timeout(Duration::from_secs(15), publish).await {
            Ok(Ok(c)) if c.status == ConfirmStatus::Routed as i32 => {
                ok += 1;
                confirmed.lock().unwrap_or_else(|e| e.into_inner()).push(id);
            }
            _ => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn should_lose_no_confirmed_message_across_partitions() {
    let c = PartitionedCluster::start(3).await.unwrap();
    let first = c.node(1).client().await.unwrap();
    first.declare_queue("ledger", QueueOptions::durable().arg("x-queue-type", "quorum")).await.unwrap();
    let _ = leader(&c, 1, "ledger", None).await;

    let stop = Arc::new(AtomicBool::new(false));
    let confirmed: Confirmed = Default::default();
    let mut publishers = Vec::new();
    for node in 1..=3u64 {
        let client = c.node(node).client().await.unwrap();
        publishers.push(tokio::spawn(publisher(client, node, stop.clone(), confirmed.clone())));
    }

    // Three rounds: cut the current leader off from the other two, let the
    // majority elect and go on, heal.
    let started = Instant::now();
    let mut isolated = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let via = if round % 2 == 0 { 1 } else { 2 };
        let old = leader(&c, via, "ledger", None).await;
        c.isolate(&[old]);
        let majority = (1..=3u64).find(|n| *n != old).unwrap_or(1);
        let new = leader(&c, majority, "ledger", Some(old)).await;
        eprintln!("partition round {round}: isolated leader {old}; the majority elected {new}");
        isolated.push(old);
        // The majority keeps confirming while the old leader is cut off.
        let before = confirmed.lock().unwrap_or_else(|e| e.into_inner()).len();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = confirmed.lock().unwrap_or_else(|e| e.into_inner()).len();
        assert!(after > before, "round {round}: no publish confirmed by the majority while node {old} was cut off");
        c.heal();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let mut attempts = (0, 0);
    for p in publishers {
        let (ok, failed) = p.await.unwrap();
        attempts = (attempts.0 + ok, attempts.1 + failed);
    }
    let confirmed: BTreeSet<String> = confirmed.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();

    // The checker: read everything back through one node.
    let reader = c.node(3).client().await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    'read: while Instant::now() < deadline {
        let Ok(mut consumer) = reader.consume(Subscription::new("ledger").prefetch(1000)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
                Ok(Ok(Some(d))) => {
                    if consumer.ack(d.delivery_tag).await.is_err() {
                        continue 'read;
                    }
                    got.push(String::from_utf8_lossy(&d.body).into_owned());
                }
                Ok(_) => continue 'read,
                Err(_) => break 'read,
            }
        }
    }
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    let lost: Vec<&String> = confirmed.difference(&unique).collect();
    eprintln!(
        "partition-figure: {:.0} s, 3 leader partitions (isolated {isolated:?}); {} publishes confirmed, {} not; read back {} ({} unique, {} duplicate(s)); lost {}",
        started.elapsed().as_secs_f64(),
        attempts.0,
        attempts.1,
        got.len(),
        unique.len(),
        got.len() - unique.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "{} confirmed message(s) lost, e.g. {:?}", lost.len(), lost.iter().take(5).collect::<Vec<_>>());
    assert!(confirmed.len() > 100, "too few confirmed publishes ({}) for the test to mean anything", confirmed.len());
}
