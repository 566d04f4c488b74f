//! Durability: clean restarts, `kill -9` crashes (also in the middle of a
//! publish stream), redelivery of unacknowledged messages, and a backlog
//! that stays on disk instead of in memory.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren_client::{Client, ConfirmStatus, ExchangeKind, ExchangeOptions, Message, QueueOptions, Subscription};
use warren_tests::{TestBroker, eventually};

use crate::{SETTLE, drain, text};

async fn declare_durable_topology(c: &Client) {
    c.declare_exchange("events", ExchangeKind::Topic, ExchangeOptions::durable()).await.unwrap();
    c.declare_exchange("scratch", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    c.declare_queue("kept", QueueOptions::durable().arg("x-max-priority", 5i64)).await.unwrap();
    c.declare_queue("lost", QueueOptions::default()).await.unwrap();
    c.bind_queue("events", "kept", "order.*").await.unwrap();
    c.bind_queue("events", "lost", "#").await.unwrap();
    for (i, persistent) in [(0, true), (1, false), (2, true), (3, true)] {
        let mut m = Message::new("events", "order.new", format!("m{i}"));
        if persistent {
            m = m.persistent();
        }
        assert_eq!(c.publish(m).await.unwrap().queues, 2);
    }
}

async fn check_durable_topology(c: &Client) {
    let exchanges = c.list_exchanges().await.unwrap();
    assert!(exchanges.iter().any(|x| x.name == "events" && x.durable));
    assert!(!exchanges.iter().any(|x| x.name == "scratch"), "transient exchange came back");
    let queues = c.list_queues().await.unwrap();
    assert_eq!(queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), vec!["kept"], "only the durable queue survives");
    assert_eq!(queues[0].arguments.len(), 1, "arguments survive");
    let bindings = c.list_bindings().await.unwrap();
    assert_eq!(bindings.len(), 1);
    assert_eq!((bindings[0].source.as_str(), bindings[0].destination.as_str()), ("events", "kept"));
    // Persistent messages are back, in order; the transient one is not.
    assert_eq!(drain(c, "kept").await, vec!["m0", "m2", "m3"]);
    // And routing works again.
    assert!(c.publish(Message::new("events", "order.x", "after")).await.unwrap().is_routed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_restore_durable_objects_and_persistent_messages_after_a_clean_restart() {
    let mut b = TestBroker::start().await.unwrap();
    declare_durable_topology(&b.client().await.unwrap()).await;
    assert!(b.stop().unwrap(), "the broker should exit 0 on SIGTERM");
    b.restart().await.unwrap();
    check_durable_topology(&b.client().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_restore_durable_objects_and_persistent_messages_after_kill_9() {
    let mut b = TestBroker::start().await.unwrap();
    declare_durable_topology(&b.client().await.unwrap()).await;
    b.kill();
    b.restart().await.unwrap();
    check_durable_topology(&b.client().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_bring_back_unacked_messages_as_redelivered_after_a_crash() {
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("q", QueueOptions::durable()).await.unwrap();
    for i in 0..4 {
        c.publish(Message::new("", "q", format!("m{i}")).persistent()).await.unwrap();
    }
    let mut con = c.consume(Subscription::new("q").prefetch(2)).await.unwrap();
    let d0 = con.next_timeout(SETTLE).await.unwrap().unwrap();
    let d1 = con.next_timeout(SETTLE).await.unwrap().unwrap();
    con.ack(d0.delivery_tag).await.unwrap();
    // Prefetch 2: the ack lets m2 out too.
    let d2 = con.next_timeout(SETTLE).await.unwrap().unwrap();
    eventually(SETTLE, "the ack to land", || async {
        let q = c.queue_info("q").await.unwrap();
        (q.ready == 1 && q.unacked == 2).then_some(())
    })
    .await
    .unwrap();
    assert_eq!((text(&d1).as_str(), text(&d2).as_str()), ("m1", "m2"));
    b.kill();
    b.restart().await.unwrap();
    let c = b.client().await.unwrap();
    assert_eq!(c.queue_info("q").await.unwrap().ready, 3);
    let got = c.get("q", 10, true).await.unwrap();
    let summary: Vec<(String, bool)> = got.iter().map(|d| (text(d), d.redelivered)).collect();
    assert_eq!(summary, vec![("m1".into(), true), ("m2".into(), true), ("m3".into(), false)]);
}

/// Streams persistent messages and kills the broker with SIGKILL in the
/// middle, several times; every message whose confirm arrived must be in
/// the queue exactly once after recovery, and nothing is duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_keep_every_confirmed_message_exactly_once_across_kill_9_mid_stream() {
    let mut b = TestBroker::start().await.unwrap();
    b.client().await.unwrap().declare_queue("crash", QueueOptions::durable()).await.unwrap();
    let confirmed = Arc::new(confirmed_ids::Set::default());
    let mut next_id = 0u64;
    for round in 0..4 {
        let client = b.client().await.unwrap();
        let publisher = client.publisher().await.unwrap();
        let start_id = next_id;
        let target = 300 + round * 200;
        let sender = {
            let confirmed = confirmed.clone();
            tokio::spawn(async move {
                let mut id = start_id;
                let mut waiting = Vec::new();
                // Bounded: stops when the broker dies or after 200k messages.
                while id < start_id + 200_000 {
                    let Ok(pending) = publisher.send(Message::new("", "crash", id.to_string()).persistent()).await else { break };
                    let confirmed = confirmed.clone();
                    waiting.push(tokio::spawn(async move {
                        if let Ok(c) = pending.await {
                            assert_eq!(c.status(), ConfirmStatus::Routed, "{c:?}");
                            confirmed.insert(c.seq);
                        }
                    }));
                    id += 1;
                }
                for w in waiting {
                    let _ = w.await;
                }
                id
            })
        };
        // The publisher's sequence numbers start at 1 per stream: map them to
        // ids through the offset below.
        let before = confirmed.len();
        eventually(Duration::from_secs(120), "confirms to arrive", || async {
            (confirmed.len() >= before + target as usize).then_some(())
        })
        .await
        .unwrap();
        b.kill();
        let sent_until =
            tokio::time::timeout(Duration::from_secs(60), sender).await.expect("sender stops once the broker is gone").unwrap();
        confirmed.rebase(start_id);
        next_id = sent_until;
        b.restart().await.unwrap();
    }
    let c = b.client().await.unwrap();
    let bodies = drain(&c, "crash").await;
    let ids: Vec<u64> = bodies.iter().map(|s| s.parse().unwrap()).collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a message was duplicated");
    let confirmed = confirmed.ids();
    let missing: Vec<&u64> = confirmed.difference(&unique).take(10).collect();
    assert!(missing.is_empty(), "{} confirmed messages lost, e.g. {missing:?}", confirmed.difference(&unique).count());
    assert!(confirmed.len() >= 2000, "the test confirmed too little to mean anything: {}", confirmed.len());
}

/// Confirmed ids, collected from concurrent tasks. A stream's confirms carry
/// its sequence numbers (1, 2, ...); `rebase` turns the latest stream's
/// numbers into message ids.
mod confirmed_ids {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Set {
        inner: Mutex<(BTreeSet<u64>, Vec<u64>)>,
    }

    impl Set {
        pub fn insert(&self, seq: u64) {
            self.inner.lock().unwrap().1.push(seq);
        }

        pub fn len(&self) -> usize {
            let g = self.inner.lock().unwrap();
            g.0.len() + g.1.len()
        }

        pub fn rebase(&self, start_id: u64) {
            let mut g = self.inner.lock().unwrap();
            let seqs = std::mem::take(&mut g.1);
            g.0.extend(seqs.into_iter().map(|seq| start_id + seq - 1));
        }

        pub fn ids(&self) -> BTreeSet<u64> {
            self.inner.lock().unwrap().0.clone()
        }
    }
}

/// A backlog lives on disk: the broker's memory stays bounded by its window,
/// not by the number of messages. `WARREN_BACKLOG_MESSAGES` sets the size
/// (1,000,000 for the figure in docs/durability.md; CI uses the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_keep_a_large_backlog_on_disk_with_bounded_memory() {
    let n: u64 = std::env::var("WARREN_BACKLOG_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("backlog", QueueOptions::durable()).await.unwrap();
    let started = Instant::now();
    let publisher = c.publisher().await.unwrap();
    let body = vec![b'x'; 1024];
    let mut waiting = std::collections::VecDeque::new();
    for i in 0..n {
        let mut payload = body.clone();
        payload[..8].copy_from_slice(&i.to_be_bytes());
        waiting.push_back(publisher.send(Message::new("", "backlog", payload).persistent()).await.unwrap());
        while waiting.len() > 4096 {
            assert!(waiting.pop_front().unwrap().await.unwrap().is_routed());
        }
    }
    for w in waiting {
        assert!(w.await.unwrap().is_routed());
    }
    let publish_secs = started.elapsed().as_secs_f64();
    assert_eq!(c.queue_info("backlog").await.unwrap().ready, n);
    let rss = b.rss_bytes().unwrap();
    eprintln!("backlog: {n} x 1 KiB persistent messages queued in {publish_secs:.1}s; broker RSS {:.1} MiB", rss as f64 / (1 << 20) as f64);
    // Memory bounded by the window and RocksDB's caches, not the backlog.
    assert!(rss < 300 << 20, "RSS {rss} bytes with {n} messages queued");

    b.stop().unwrap();
    let restarted = Instant::now();
    b.restart().await.unwrap();
    eprintln!(
        "backlog: restart to ready with {n} messages took {:.2}s; RSS after restart {:.1} MiB",
        restarted.elapsed().as_secs_f64(),
        b.rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
    );
    let c = b.client().await.unwrap();
    assert_eq!(c.queue_info("backlog").await.unwrap().ready, n);
    // Delivered in order from disk.
    let first = c.get("backlog", 3, true).await.unwrap();
    let ids: Vec<u64> = first.iter().map(|d| u64::from_be_bytes(d.body[..8].try_into().unwrap())).collect();
    assert_eq!(ids, vec![0, 1, 2]);

    // A consumer with prefetch 0 that reads everything it is sent and never
    // acknowledges holds the broker's per-consumer maximum, not the backlog.
    let before = b.rss_bytes().unwrap();
    let mut greedy = c.consume(Subscription::new("backlog").prefetch(0)).await.unwrap();
    let mut held = 0u64;
    while greedy.next_timeout(Duration::from_secs(2)).await.unwrap().is_some() {
        held += 1;
        assert!(held <= 2048, "a consumer that never acknowledges was sent more than consumer_max_unacked");
    }
    let after = b.rss_bytes().unwrap();
    eprintln!(
        "backlog: a prefetch-0 consumer that never acks holds {held} of {n} messages; broker RSS {:.1} MiB before, {:.1} MiB after",
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64
    );
    assert_eq!(held, 2048.min(n - 3));
    // Bounded by the queue's window (8 MiB) and the consumer's bound
    // (16 MiB), whatever the backlog: allow that plus allocator slack.
    assert!(after < before + (48 << 20), "RSS grew from {before} to {after} bytes");
    drop(greedy);
    eventually(SETTLE, "the held messages to return", || async { (c.queue_info("backlog").await.unwrap().unacked == 0).then_some(()) })
        .await
        .unwrap();
    assert_eq!(c.purge_queue("backlog").await.unwrap(), n - 3);
}

/// SIGTERM with a publish stream and a consumer open: the consumer is told,
/// every confirm the publisher got stands after the restart, the broker
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_drain_cleanly_on_sigterm_with_streams_open() {
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("drain", QueueOptions::durable()).await.unwrap();
    c.declare_queue("watched", QueueOptions::durable()).await.unwrap();
    let mut consumer = c.consume(Subscription::new("watched")).await.unwrap();
    let publisher = b.client().await.unwrap().publisher().await.unwrap();
    let sender = tokio::spawn(async move {
        let mut pending = Vec::new();
        for i in 0..200_000u64 {
            match publisher.send(Message::new("", "drain", i.to_string()).persistent()).await {
                Ok(p) => pending.push((i, p)),
                Err(_) => break,
            }
        }
        let mut confirmed = Vec::new();
        for (i, p) in pending {
            if let Ok(confirm) = p.await
                && confirm.is_routed()
            {
                confirmed.push(i);
            }
        }
        confirmed
    });
    eventually(SETTLE, "publishing to be under way", || async { (c.queue_info("drain").await.ok()?.ready > 1000).then_some(()) })
        .await
        .unwrap();
    assert!(b.stop().unwrap(), "the broker should exit 0 on SIGTERM");
    match consumer.next_timeout(SETTLE).await {
        Err(warren_client::Error::Cancelled(reason)) => assert!(reason.contains("shutting down"), "{reason}"),
        Ok(None) => {}
        other => panic!("the consumer should be told: {other:?}"),
    }
    let confirmed = tokio::time::timeout(SETTLE, sender).await.expect("the publisher ends with the broker").unwrap();
    assert!(!confirmed.is_empty());
    b.restart().await.unwrap();
    let c = b.client().await.unwrap();
    let stored: BTreeSet<u64> = drain(&c, "drain").await.iter().map(|s| s.parse().unwrap()).collect();
    let missing: Vec<&u64> = confirmed.iter().filter(|i| !stored.contains(i)).take(5).collect();
    assert!(missing.is_empty(), "confirmed but gone after a clean stop: {missing:?}");
}

/// Delayed messages live in an on-disk time index: memory does not grow with
/// their number. `WARREN_DELAYED_MESSAGES` sets how many (1,000,000 for the
/// figure in docs/queues.md; CI uses the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_hold_many_delayed_messages_with_bounded_memory() {
    let n: u64 = std::env::var("WARREN_DELAYED_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("later", QueueOptions::durable()).await.unwrap();
    let idle = b.rss_bytes().unwrap();
    let publisher = c.publisher().await.unwrap();
    let mut waiting = std::collections::VecDeque::new();
    for i in 0..n {
        let m = Message::new("", "later", vec![b'd'; 256]).persistent().delay(Duration::from_secs(30 * 24 * 3600 + i % 1000));
        waiting.push_back(publisher.send(m).await.unwrap());
        while waiting.len() > 4096 {
            assert!(waiting.pop_front().unwrap().await.unwrap().is_routed());
        }
    }
    for w in waiting {
        assert!(w.await.unwrap().is_routed());
    }
    let info = c.queue_info("later").await.unwrap();
    assert_eq!((info.delayed, info.ready), (n, 0));
    let rss = b.rss_bytes().unwrap();
    eprintln!(
        "delayed: {n} delayed messages (256 B, due in 30 days); broker RSS {:.1} MiB (idle {:.1} MiB)",
        rss as f64 / (1 << 20) as f64,
        idle as f64 / (1 << 20) as f64
    );
    assert!(rss < 300 << 20, "RSS {rss} bytes with {n} delayed messages");
}
