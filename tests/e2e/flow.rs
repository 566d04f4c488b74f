//! Flow control end to end: slow consumers get every message, a consumer
//! never holds more than its bound, one consumer's pace never holds back
//! another's, and a `Get` never takes more than it can return.

use std::time::{Duration, Instant};

use warren_client::{Client, Message, QueueOptions, Subscription};
use warren_tests::{TestBroker, eventually};

use crate::SETTLE;

/// Publishes `n` persistent messages of `size` bytes to `queue` (durable),
/// up to 500 (and about 1 MiB) per call; the first 8 bytes of each body are its index.
async fn fill(c: &Client, queue: &str, n: u64, size: usize) {
    c.declare_queue(queue, QueueOptions::durable()).await.unwrap();
    let per_call = ((1 << 20) / size.max(1)).clamp(1, 500) as u64;
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..n.min(i + per_call))
            .map(|k| {
                let mut body = vec![b'x'; size.max(8)];
                body[..8].copy_from_slice(&k.to_be_bytes());
                Message::new("", queue, body).persistent().into()
            })
            .collect();
        i += batch.len() as u64;
        for confirm in c.publish_batch(batch).await.unwrap() {
            assert!(confirm.is_routed(), "{confirm:?}");
        }
    }
    assert_eq!(c.queue_info(queue).await.unwrap().ready, n);
}

/// Reads `n` deliveries in bursts, sleeping `pause` after every 37 (acking
/// each unless `auto_ack`), the way a client in a slower runtime reads: the
/// broker's sends come in bursts as the connection's windows open. Fails if
/// the stream ends, or if no delivery comes for `SETTLE` while some are
/// still expected (the stall this guards against).
async fn read_slowly(c: &Client, queue: &str, n: u64, auto_ack: bool, pause: Duration) -> Vec<u64> {
    let sub = Subscription::new(queue).prefetch(0);
    let sub = if auto_ack { sub.auto_ack() } else { sub };
    let mut con = c.consume(sub).await.unwrap();
    let mut ids = Vec::new();
    while (ids.len() as u64) < n {
        let d = con
            .next_timeout(SETTLE)
            .await
            .unwrap_or_else(|e| panic!("after {} of {n} deliveries: {e}", ids.len()))
            .unwrap_or_else(|| panic!("no delivery for {SETTLE:?} after {} of {n}: the consumer stalled", ids.len()));
        ids.push(u64::from_be_bytes(d.body[..8].try_into().unwrap()));
        if !auto_ack {
            con.ack(d.delivery_tag).await.unwrap();
        }
        if ids.len() % 37 == 0 {
            tokio::time::sleep(pause).await;
        }
    }
    ids
}

/// A consumer that reads slowly, with auto-ack and prefetch 0, against a
/// backlog larger than every buffer and window, gets every message in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_deliver_every_message_to_a_slow_auto_ack_consumer() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    fill(&c, "slow", 20_000, 1024).await;
    let ids = read_slowly(&c, "slow", 20_000, true, Duration::from_millis(3)).await;
    assert_eq!(ids, (0..20_000).collect::<Vec<_>>());
    eventually(SETTLE, "the queue to be empty", || async { (c.queue_info("slow").await.unwrap().ready == 0).then_some(()) }).await.unwrap();
}

/// The same with manual acknowledgements and prefetch 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_deliver_every_message_to_a_slow_prefetch_0_consumer() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    fill(&c, "slow", 20_000, 1024).await;
    let ids = read_slowly(&c, "slow", 20_000, false, Duration::from_millis(3)).await;
    assert_eq!(ids, (0..20_000).collect::<Vec<_>>());
}

/// Prefetch 0 means the broker's maximum (`consumer_max_unacked`): a
/// consumer that never acknowledges holds exactly that many, the listing
/// says so, and acknowledging makes room for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_cap_unacknowledged_deliveries_and_show_the_cap() {
    let b = TestBroker::start_with(&["--consumer-max-unacked", "100"]).await.unwrap();
    let c = b.client().await.unwrap();
    fill(&c, "capped", 1000, 100).await;
    let mut con = c.consume(Subscription::new("capped").prefetch(0)).await.unwrap();
    let mut last = 0;
    for _ in 0..100 {
        last = con.next_timeout(SETTLE).await.unwrap().unwrap().delivery_tag;
    }
    assert!(con.next_timeout(Duration::from_millis(500)).await.unwrap().is_none(), "more than the cap was delivered");
    let listed = c.list_consumers().await.unwrap();
    assert_eq!((listed[0].prefetch, listed[0].effective_prefetch, listed[0].unacked), (0, 100, 100), "{listed:?}");
    // A larger prefetch is capped too.
    let mut big = c.consume(Subscription::new("capped").prefetch(5000)).await.unwrap();
    let listed = c.list_consumers().await.unwrap();
    assert!(listed.iter().any(|l| l.prefetch == 5000 && l.effective_prefetch == 100), "{listed:?}");
    for _ in 0..100 {
        big.next_timeout(SETTLE).await.unwrap().unwrap();
    }
    con.ack_multiple(last, true).await.unwrap();
    for _ in 0..100 {
        con.next_timeout(SETTLE).await.unwrap().unwrap();
    }
    let q = c.queue_info("capped").await.unwrap();
    assert_eq!((q.unacked, q.ready), (200, 700));
}

/// A consumer that reads slowly does not hold back a fast one on the same
/// queue, nor consumers of other queues: it holds at most its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_not_let_a_slow_consumer_hold_back_others() {
    let b = TestBroker::start_with(&["--consumer-max-unacked", "20"]).await.unwrap();
    let c = b.client().await.unwrap();
    fill(&c, "shared", 1000, 8 << 10).await;
    fill(&c, "other", 1000, 8 << 10).await;
    // The slow consumer takes (and acknowledges) one message every 100 ms;
    // with prefetch 0 it holds at most the broker's bound (20 here).
    let slow_client = b.client().await.unwrap();
    let mut slow = slow_client.consume(Subscription::new("shared").prefetch(0)).await.unwrap();
    let slow_count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let slow_task = {
        let slow_count = slow_count.clone();
        tokio::spawn(async move {
            while let Ok(Some(d)) = slow.next_timeout(Duration::from_secs(5)).await {
                slow_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                if slow.ack(d.delivery_tag).await.is_err() {
                    break;
                }
            }
        })
    };
    let fast_client = b.client().await.unwrap();
    let mut fast = fast_client.consume(Subscription::new("shared").prefetch(0).auto_ack()).await.unwrap();
    let other_client = b.client().await.unwrap();
    let mut other = other_client.consume(Subscription::new("other").prefetch(0).auto_ack()).await.unwrap();
    // Another queue's consumer gets all of its messages while the slow one
    // crawls.
    let started = Instant::now();
    for i in 0..1000 {
        other.next_timeout(SETTLE).await.unwrap().unwrap_or_else(|| panic!("the other queue's consumer stalled after {i}"));
    }
    // The fast consumer gets everything the slow one does not hold.
    let mut fast_count = 0u64;
    while let Ok(Some(_)) = fast.next_timeout(Duration::from_secs(2)).await {
        fast_count += 1;
    }
    let slow_seen = slow_count.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("flow: fast consumer {fast_count}, slow consumer {slow_seen} so far, after {:?}", started.elapsed());
    assert!(
        fast_count + slow_seen + 20 >= 1000,
        "the fast consumer got only {fast_count} of 1000 while the slow one read {slow_seen} and holds at most 20"
    );
    slow_task.abort();
}

/// A `Get` never removes more than its reply can carry: with a 1 MiB
/// message size limit, 8 messages of 1 MiB come back in several replies
/// (warrenctl asks again), and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_not_lose_messages_a_get_reply_cannot_carry() {
    let b = TestBroker::start_with(&["--max-message-size", "1MiB"]).await.unwrap();
    let c = b.client().await.unwrap();
    // Leave room for the headers and properties in the limit.
    fill(&c, "big", 8, (1 << 20) - 1024).await;
    let first = c.get("big", 8, true).await.unwrap();
    assert!(!first.is_empty() && first.len() < 8, "one reply carried {} messages of 1 MiB", first.len());
    let left = c.queue_info("big").await.unwrap().ready;
    assert_eq!(left, 8 - first.len() as u64, "a Get removed more than it returned");
    let out = b.warrenctl(&["get", "--queue", "big", "--ack", "--count", "8"]).unwrap();
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stdout.lines().count() as u64, left, "warrenctl returned every remaining message");
    assert_eq!(c.queue_info("big").await.unwrap().ready, 0);
}

/// A publisher that stops reading its confirms and then disconnects leaves
/// nothing behind: its connection's exclusive queues are deleted and the
/// connection count drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_end_the_session_of_a_publisher_that_stopped_reading_confirms() {
    let b = TestBroker::start().await.unwrap();
    let observer = b.client().await.unwrap();
    {
        // A small receive window: the confirms it does not read soon fill
        // it, and then the broker's in-flight bound (8192).
        let channel =
            tonic::transport::Endpoint::from_shared(b.url()).unwrap().initial_stream_window_size(Some(1024)).connect().await.unwrap();
        let c = Client::from_channel(channel);
        c.declare_queue("mine", QueueOptions::default().exclusive()).await.unwrap();
        let requests = futures::stream::iter(
            (0..30_000u64)
                .map(|seq| warren_client::proto::PublishStreamRequest { seq, message: Some(Message::new("", "nowhere", "x").into()) }),
        );
        let response = c.raw().publish_stream(requests).await.unwrap();
        // Wait until the broker stops reading the stream (its confirms fill
        // the connection and its in-flight bound).
        let mut last = 0;
        for _ in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let published = observer.status().await.unwrap().totals.unwrap().published;
            if published == last && published > 8192 {
                break;
            }
            last = published;
        }
        assert!(last > 8192 && last < 30_000, "the broker read {last} messages of a stream whose confirms nobody reads");
        assert_eq!(observer.status().await.unwrap().totals.unwrap().connections, 2);
        drop(response);
        drop(c);
    }
    eventually(SETTLE, "the exclusive queue to go with its connection", || async {
        observer.list_queues().await.unwrap().iter().all(|q| q.name != "mine").then_some(())
    })
    .await
    .unwrap();
    eventually(SETTLE, "the connection count to drop", || async {
        (observer.status().await.unwrap().totals.unwrap().connections == 1).then_some(())
    })
    .await
    .unwrap();
}
