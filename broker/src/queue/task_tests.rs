//! The broker over a store that fails on demand: after a failed write the
//! broker's memory equals what is on disk, no client sees a message or an
//! answer that the failed write took back, and a queue whose task panics
//! comes back from storage.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::{Condvar, Mutex};
use warren_client::proto::{self, ConfirmStatus};

use super::ConsumerEvent;
use crate::broker::{Broker, BrokerConfig, Session};
use crate::error::Error;
use crate::queue::QueueCmd;
use crate::store::memory::MemoryEngine;
use crate::store::{Cf, Engine, KeyValue, Op, Reader, Store, StoreError};

/// An engine whose writes can be held at a gate and that can fail on demand.
struct TestEngine {
    inner: MemoryEngine,
    /// (gate open, a write is waiting at the gate)
    gate: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl TestEngine {
    fn new() -> Arc<TestEngine> {
        Arc::new(TestEngine { inner: MemoryEngine::new(), gate: Mutex::new((true, false)), cv: Condvar::new() })
    }

    fn close_gate(&self) {
        *self.gate.lock() = (false, false);
    }

    fn open_gate(&self) {
        self.gate.lock().0 = true;
        self.cv.notify_all();
    }

    /// Waits (at most 10 s) until a write waits at the closed gate.
    async fn wait_for_writer(&self) {
        for _ in 0..1000 {
            if self.gate.lock().1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no write reached the store");
    }
}

impl Reader for TestEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(cf, key)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(cf, from, to, limit)
    }
}

impl Engine for TestEngine {
    fn write(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        let mut g = self.gate.lock();
        g.1 = true;
        self.cv.notify_all();
        while !g.0 {
            self.cv.wait(&mut g);
        }
        drop(g);
        self.inner.write(ops, sync)
    }
    fn disk_usage(&self) -> u64 {
        0
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.inner.last_in(cf, from, to)
    }
    fn with_view(&self, read: &mut dyn FnMut(&dyn Reader) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.with_view(read)
    }
}

async fn open(engine: &Arc<TestEngine>) -> (Broker, Session) {
    let broker = Broker::open(Store::new(engine.clone(), None), BrokerConfig::default()).await.unwrap();
    let session = broker.open_session("test");
    (broker, session)
}

async fn durable_queue(b: &Broker, s: &Session, name: &str, args: &[(&str, proto::Value)]) {
    let req = proto::DeclareQueueRequest {
        name: name.into(),
        durable: true,
        arguments: args.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ..Default::default()
    };
    b.declare_queue(s, req).await.unwrap();
}

fn message(exchange: &str, key: &str, body: &str, id: &str) -> proto::Message {
    proto::Message {
        exchange: exchange.into(),
        routing_key: key.into(),
        body: body.to_string().into(),
        properties: Some(proto::Properties { persistent: true, message_id: id.into(), ..Default::default() }),
        ..Default::default()
    }
}

async fn publish(b: &Broker, exchange: &str, key: &str, body: &str) -> proto::Confirm {
    tokio::time::timeout(Duration::from_secs(10), b.publish_one(message(exchange, key, body, ""), 0)).await.unwrap()
}

fn ready(b: &Broker, queue: &str) -> u64 {
    b.list_queues().into_iter().find(|q| q.name == queue).map_or(0, |q| q.ready)
}

/// Polls `check` every 20 ms for at most 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 10 s");
}

async fn get_bodies(b: &Broker, s: &Session, queue: &str) -> Result<Vec<String>, Error> {
    let got = b.get(s, proto::GetRequest { queue: queue.into(), max_messages: 100, ack: true }).await?;
    Ok(got.iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect())
}

/// Gets until the queue answers (it may be reloading).
async fn get_when_available(b: &Broker, s: &Session, queue: &str) -> Vec<String> {
    for _ in 0..500 {
        match get_bodies(b, s, queue).await {
            Ok(bodies) => return bodies,
            Err(Error::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("get failed: {e}"),
        }
    }
    panic!("queue '{queue}' stayed unavailable");
}

#[tokio::test]
async fn should_reject_and_forget_a_publish_whose_write_failed() {
    let engine = TestEngine::new();
    let (b, s) = open(&engine).await;
    durable_queue(&b, &s, "q", &[]).await;
    let mut sub = b.subscribe(&s, proto::Subscribe { queue: "q".into(), prefetch: 10, ..Default::default() }).await.unwrap();
    engine.inner.fail_next_writes(1);
    let c = publish(&b, "", "q", "lost").await;
    assert_eq!(c.status(), ConfirmStatus::Rejected, "{c:?}");
    assert!(c.reason.contains("storage"), "{c:?}");
    // The consumer never sees the message: its subscription ends instead.
    let ev = tokio::time::timeout(Duration::from_secs(10), sub.events.next()).await.unwrap();
    assert!(matches!(ev, Some(ConsumerEvent::Cancelled(_))), "{ev:?}");
    // Memory equals the disk: nothing is ready.
    eventually("the queue to reload empty", || ready(&b, "q") == 0).await;
    let c = loop {
        let c = publish(&b, "", "q", "kept").await;
        if !c.reason.contains("unavailable") {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(c.status(), ConfirmStatus::Routed, "{c:?}");
    assert_eq!(get_when_available(&b, &s, "q").await, vec!["kept"]);
}

#[tokio::test]
async fn should_answer_a_duplicate_only_once_its_first_copy_is_durable() {
    let engine = TestEngine::new();
    let (b, s) = open(&engine).await;
    durable_queue(&b, &s, "dedup", &[("x-deduplication-window", proto::Value::from(60_000i64))]).await;
    engine.close_gate();
    let first = {
        let b = b.clone();
        tokio::spawn(async move { b.publish_one(message("", "dedup", "one", "id-1"), 1).await })
    };
    engine.wait_for_writer().await;
    // A retry while the first copy's write is in flight: its answer waits.
    let retry = {
        let b = b.clone();
        tokio::spawn(async move { b.publish_one(message("", "dedup", "one", "id-1"), 2).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!retry.is_finished(), "a duplicate was answered before its first copy was durable");
    // The first copy's write fails: both are refused, nothing is stored.
    engine.inner.fail_next_writes(1);
    engine.open_gate();
    let first = tokio::time::timeout(Duration::from_secs(10), first).await.unwrap().unwrap();
    let retry = tokio::time::timeout(Duration::from_secs(10), retry).await.unwrap().unwrap();
    assert_eq!(first.status(), ConfirmStatus::Rejected, "{first:?}");
    assert_eq!(retry.status(), ConfirmStatus::Rejected, "{retry:?}");
    // A later retry is taken: the id was never recorded.
    let again = loop {
        let c = tokio::time::timeout(Duration::from_secs(10), b.publish_one(message("", "dedup", "one", "id-1"), 3)).await.unwrap();
        if !c.reason.contains("unavailable") {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(again.status(), ConfirmStatus::Routed, "{again:?}");
    let dup = b.publish_one(message("", "dedup", "one", "id-1"), 4).await;
    assert_eq!(dup.status(), ConfirmStatus::Duplicate, "{dup:?}");
    assert_eq!(get_when_available(&b, &s, "dedup").await, vec!["one"]);
}

#[tokio::test]
async fn should_leave_topology_unchanged_when_its_write_fails() {
    let engine = TestEngine::new();
    let (b, s) = open(&engine).await;
    b.declare_exchange(proto::DeclareExchangeRequest {
        name: "x".into(),
        r#type: proto::ExchangeType::Topic as i32,
        durable: true,
        ..Default::default()
    })
    .await
    .unwrap();
    durable_queue(&b, &s, "q", &[]).await;
    let bind = proto::BindRequest { source: "x".into(), destination: "q".into(), routing_key: "k".into(), ..Default::default() };
    b.bind(&s, bind.clone()).await.unwrap();

    engine.inner.fail_next_writes(1);
    assert!(b.unbind(&s, bind.clone().into()).await.is_err());
    assert_eq!(b.list_bindings().await.iter().filter(|x| x.source == "x").count(), 1, "the binding must still be listed");
    assert_eq!(publish(&b, "x", "k", "after unbind").await.status(), ConfirmStatus::Routed, "the binding must still route");

    engine.inner.fail_next_writes(1);
    assert!(b.delete_exchange("x", false).await.is_err());
    assert!(b.list_exchanges().await.iter().any(|x| x.name == "x"));
    assert_eq!(b.list_bindings().await.iter().filter(|x| x.source == "x").count(), 1, "its bindings must still be listed");
    assert_eq!(publish(&b, "x", "k", "after exchange delete").await.status(), ConfirmStatus::Routed);

    engine.inner.fail_next_writes(1);
    assert!(b.delete_queue(&s, "q", false, false).await.is_err());
    // Still there and working (it reloads from storage after the failure).
    let mut bodies = get_when_available(&b, &s, "q").await;
    bodies.sort();
    assert_eq!(bodies, vec!["after exchange delete", "after unbind"]);
    assert_eq!(publish(&b, "x", "k", "still routed").await.status(), ConfirmStatus::Routed);
    // And deleting works once the store does.
    b.delete_queue(&s, "q", false, false).await.unwrap();
    assert!(b.list_queues().is_empty() || b.list_queues().iter().all(|q| q.name != "q"));
}

#[tokio::test]
async fn should_restart_a_queue_from_storage_after_its_task_panicked() {
    let engine = TestEngine::new();
    let (b, s) = open(&engine).await;
    durable_queue(&b, &s, "q", &[]).await;
    for body in ["a", "b", "c"] {
        assert_eq!(publish(&b, "", "q", body).await.status(), ConfirmStatus::Routed);
    }
    let mut sub = b.subscribe(&s, proto::Subscribe { queue: "q".into(), prefetch: 1, ..Default::default() }).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.events.next()).await.unwrap();
    assert!(matches!(first, Some(ConsumerEvent::Delivery(..))), "{first:?}");
    let handle = b.snapshot().queues.get("q").unwrap().handle.clone();
    handle.tx.send(QueueCmd::Crash).await.unwrap();
    // The consumer is told; the queue comes back with every message (the
    // delivered one unacknowledged, so it returns too).
    let mut cancelled = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(10), sub.events.next()).await {
        if let ConsumerEvent::Cancelled(reason) = ev {
            assert!(reason.contains("internal error"), "{reason}");
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "the consumer was not told");
    assert_eq!(get_when_available(&b, &s, "q").await, vec!["a", "b", "c"]);
    // Publishes after the restart are taken, not reported unroutable.
    assert_eq!(publish(&b, "", "q", "d").await.status(), ConfirmStatus::Routed);
    assert_eq!(get_when_available(&b, &s, "q").await, vec!["d"]);
}

#[tokio::test]
async fn should_answer_unavailable_until_storage_can_be_read_again() {
    let engine = TestEngine::new();
    let (b, s) = open(&engine).await;
    durable_queue(&b, &s, "q", &[]).await;
    assert_eq!(publish(&b, "", "q", "kept").await.status(), ConfirmStatus::Routed);
    // A failed write, then reads that fail: the queue cannot reload yet.
    engine.inner.fail_next_reads(3);
    engine.inner.fail_next_writes(1);
    assert_eq!(publish(&b, "", "q", "lost").await.status(), ConfirmStatus::Rejected);
    let err = get_bodies(&b, &s, "q").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("queue 'q' is"), "{err}");
    // Retried with backoff: it comes back with what was durable.
    assert_eq!(get_when_available(&b, &s, "q").await, vec!["kept"]);
}
