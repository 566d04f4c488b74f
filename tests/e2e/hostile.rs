//! What one client may ask of the broker: inputs that used to hang or crash
//! it (exponential topic patterns, overflowing numbers) and the limits on
//! what a client can hold (streams per connection, a consume stream that
//! never subscribes, message headers). Every wait here is bounded; a
//! broker that hangs fails the test instead of hanging it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use warren_client::proto::{self, value::Kind};
use warren_client::{ConfirmStatus, ExchangeKind, Message, QueueOptions, Subscription, Value};
use warren_tests::TestBroker;

use crate::{SETTLE, code, drain, queue, send, text};

/// A bound for one call that must return.
const CALL: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(CALL, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {CALL:?}"),
    }
}

async fn healthz(b: &TestBroker) -> u16 {
    within("GET /healthz", b.http_get("/healthz")).await.unwrap().0
}

fn int(i: i64) -> Value {
    Value { kind: Some(Kind::Int(i)) }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::String(s.into())) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_a_run_of_hashes_against_a_long_key_and_keep_answering() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("t", ExchangeKind::Topic, Default::default()).await.unwrap();
    let hashes = vec!["#"; 20].join(".");
    queue(&c, "all").await;
    queue(&c, "none").await;
    c.bind_queue("t", "all", &hashes).await.unwrap();
    c.bind_queue("t", "none", &format!("{hashes}.nope.{hashes}")).await.unwrap();
    // 100 words, 199 bytes: within the 255-byte routing key limit.
    let key = vec!["w"; 100].join(".");
    // As many concurrent publishes as the broker has workers, and more:
    // with exponential matching each pinned a worker for good.
    let publishes = (0..4).map(|i| {
        let c = c.clone();
        let key = key.clone();
        async move { within("a publish to the pathological pattern", c.publish(Message::new("t", key, format!("m{i}")))).await }
    });
    for confirm in futures::future::join_all(publishes).await {
        let confirm = confirm.unwrap();
        assert_eq!((confirm.status(), confirm.queues), (ConfirmStatus::Routed, 1), "{confirm:?}");
    }
    assert_eq!(healthz(&b).await, 200);
    let mut got = drain(&c, "all").await;
    got.sort();
    assert_eq!(got, vec!["m0", "m1", "m2", "m3"]);
    assert!(drain(&c, "none").await.is_empty());

    // What a client can send into routing is bounded, with errors that name
    // the field and the limit.
    let (code_, msg) = code(c.bind_queue("t", "all", &vec!["a"; 65].join(".")).await);
    assert_eq!(code_, tonic::Code::InvalidArgument);
    assert!(msg.contains("routing_key") && msg.contains("65 words") && msg.contains("64"), "{msg}");
    c.bind_queue("t", "all", &vec!["a"; 64].join(".")).await.unwrap();
    // A direct exchange's binding key is not a pattern: only its length counts.
    c.declare_exchange("d", ExchangeKind::Direct, Default::default()).await.unwrap();
    c.bind_queue("d", "all", &vec!["a"; 65].join(".")).await.unwrap();
    let (code_, msg) = code(c.bind_queue("t", "all", &"k".repeat(256)).await);
    assert_eq!(code_, tonic::Code::InvalidArgument);
    assert!(msg.contains("routing key") && msg.contains("256") && msg.contains("255"), "{msg}");
    let confirm = c.publish(Message::new("t", "k".repeat(256), "long")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Rejected);
    assert!(confirm.reason.contains("routing_key") && confirm.reason.contains("255"), "{}", confirm.reason);
    assert_eq!(healthz(&b).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_dead_letter_a_message_whose_x_death_count_is_at_its_maximum() {
    let b = TestBroker::start_capturing_stderr(&[]).await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("dead", QueueOptions::default()).await.unwrap();
    let opts = QueueOptions::default().arg("x-dead-letter-exchange", "").arg("x-dead-letter-routing-key", "dead");
    c.declare_queue("work", opts).await.unwrap();
    // A history the client made up: a count at i64::MAX for the very
    // (queue, reason) this message is about to die for, beside odd entries.
    let entry = |count: Value| Value {
        kind: Some(Kind::Map(proto::ValueMap {
            fields: BTreeMap::from([
                ("queue".to_string(), string("work")),
                ("reason".to_string(), string("rejected")),
                ("count".to_string(), count),
            ]),
        })),
    };
    let history = Value { kind: Some(Kind::List(proto::ValueList { values: vec![entry(int(i64::MAX)), int(3), string("junk")] })) };
    send(&c, "work", "ok-before").await;
    let confirm = c.publish(Message::new("", "work", "poison").header("x-death", history)).await.unwrap();
    assert!(confirm.is_routed(), "{confirm:?}");
    let mut consumer = c.consume(Subscription::new("work").prefetch(10)).await.unwrap();
    for _ in 0..2 {
        let d = within("a delivery", consumer.next()).await.unwrap().unwrap();
        if text(&d) == "poison" {
            consumer.nack(d.delivery_tag, false, false).await.unwrap();
        } else {
            consumer.ack(d.delivery_tag).await.unwrap();
        }
    }
    let dead = warren_tests::eventually(SETTLE, "the dead-lettered message", || async {
        c.get("dead", 1, true).await.ok().and_then(|mut v| v.pop())
    })
    .await
    .unwrap();
    assert_eq!(text(&dead), "poison");
    let deaths = match dead.properties.as_ref().and_then(|p| p.headers.get("x-death")).and_then(|v| v.kind.as_ref()) {
        Some(Kind::List(l)) => l.values.clone(),
        other => panic!("no x-death list: {other:?}"),
    };
    let count = match deaths.first().and_then(|v| v.kind.as_ref()) {
        Some(Kind::Map(m)) => m.fields.get("count").cloned(),
        other => panic!("x-death[0] is not a table: {other:?}"),
    };
    assert_eq!(count, Some(int(i64::MAX)), "the count saturates");
    // The queue's task is alive: it still takes and delivers messages.
    send(&c, "work", "ok-after").await;
    let d = within("a delivery after the dead-lettering", consumer.next()).await.unwrap().unwrap();
    assert_eq!(text(&d), "ok-after");
    consumer.ack(d.delivery_tag).await.unwrap();
    warren_tests::eventually(SETTLE, "the queue empty", || async {
        let info = c.queue_info("work").await.ok()?;
        (info.ready + info.unacked == 0).then_some(())
    })
    .await
    .unwrap();
    drop(consumer);
    assert!(!b.stderr().contains("panicked"), "{}", b.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_settle_every_delivery_with_multiple_and_the_largest_tag() {
    let b = TestBroker::start_capturing_stderr(&[]).await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("q", QueueOptions::durable()).await.unwrap();
    for i in 0..3 {
        c.publish(Message::new("", "q", format!("m{i}")).persistent()).await.unwrap();
    }
    let mut consumer = c.consume(Subscription::new("q").prefetch(10)).await.unwrap();
    for _ in 0..3 {
        within("a delivery", consumer.next()).await.unwrap().unwrap();
    }
    consumer.nack(u64::MAX, true, true).await.unwrap();
    for _ in 0..3 {
        let d = within("a redelivery", consumer.next()).await.unwrap().unwrap();
        assert!(d.redelivered);
    }
    consumer.ack_multiple(u64::MAX, true).await.unwrap();
    warren_tests::eventually(SETTLE, "every delivery acknowledged", || async {
        let info = c.queue_info("q").await.ok()?;
        (info.ready == 0 && info.unacked == 0).then_some(())
    })
    .await
    .unwrap();
    // The subscription and the queue carry on.
    send(&c, "q", "next").await;
    let d = within("a delivery after the ack", consumer.next()).await.unwrap().unwrap();
    assert_eq!(text(&d), "next");
    assert!(!b.stderr().contains("panicked"), "{}", b.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_limit_the_calls_open_on_one_connection() {
    let b = TestBroker::start_with(&["--max-concurrent-streams", "4"]).await.unwrap();
    assert!(b.stdout.iter().any(|l| l.contains("max_concurrent_streams = 4")), "{:?}", b.stdout);
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(within("a consume within the limit", c.consume(Subscription::new("q"))).await.unwrap());
    }
    // The fifth call on this connection waits for a free stream.
    let fifth = {
        let c = c.clone();
        tokio::spawn(async move { c.consume(Subscription::new("q")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fifth.is_finished(), "a fifth stream was opened on a connection limited to four");
    // Another connection has its own four.
    let other = b.client().await.unwrap();
    let elsewhere = within("a consume on another connection", other.consume(Subscription::new("q"))).await.unwrap();
    // When one call ends, the waiting one goes through.
    drop(open.pop());
    let fifth = within("the waiting consume", fifth).await.unwrap().unwrap();
    let consumers = within("queue info", other.queue_info("q")).await.unwrap().consumers;
    assert_eq!(consumers, 5, "three and the fifth on the first connection, one on the other");
    drop(fifth);
    drop(open);
    drop(elsewhere);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_end_a_consume_stream_that_never_subscribes() {
    let b = TestBroker::start_with(&["--consume-subscribe-timeout", "300ms"]).await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    // A request stream that never sends anything.
    let silent = futures::stream::pending::<proto::ConsumeRequest>();
    let mut raw = c.raw();
    let Err(status) = within("a silent consume stream", raw.consume(silent)).await else { panic!("the silent stream was accepted") };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("consume_subscribe_timeout") && status.message().contains("300ms"), "{status:?}");
    // A stream that subscribes at once is not affected, and neither is the
    // connection.
    let mut consumer = c.consume(Subscription::new("q")).await.unwrap();
    send(&c, "q", "hello").await;
    let d = within("a delivery", consumer.next()).await.unwrap().unwrap();
    assert_eq!(text(&d), "hello");
    // A first request that is not a subscribe is refused at once.
    let ack =
        proto::ConsumeRequest { request: Some(proto::consume_request::Request::Ack(proto::Ack { delivery_tag: 1, multiple: false })) };
    let wrong = futures::stream::iter(vec![ack]).chain(futures::stream::pending());
    let Err(status) = within("a consume stream opening with an ack", raw.consume(wrong)).await else { panic!("accepted") };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_reject_messages_over_the_header_limits() {
    let b = TestBroker::start_with_env(
        &["--max-message-headers", "3", "--max-message-size", "4KiB"],
        &[("WARREN_MAX_MESSAGE_HEADER_BYTES", "1KiB")],
    )
    .await
    .unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let rejected = |confirm: proto::Confirm, limit: &str| {
        assert_eq!(confirm.status(), ConfirmStatus::Rejected, "{confirm:?}");
        assert!(confirm.reason.contains(limit), "{limit}: {}", confirm.reason);
    };
    let with_headers = |n: usize| (0..n).fold(Message::new("", "q", "x"), |m, i| m.header(format!("h{i}"), i as i64));
    assert!(c.publish(with_headers(3)).await.unwrap().is_routed());
    rejected(c.publish(with_headers(4)).await.unwrap(), "max_message_headers");
    // Header bytes count names and values, nested ones included.
    let nested = Value { kind: Some(Kind::List(proto::ValueList { values: vec![string(&"v".repeat(300)); 4] })) };
    rejected(c.publish(Message::new("", "q", "x").header("big", nested)).await.unwrap(), "max_message_header_bytes");
    assert!(c.publish(Message::new("", "q", "x").header("fits", "v".repeat(900))).await.unwrap().is_routed());
    // The message size counts headers and properties with the body.
    let body = vec![b'b'; 3500];
    assert!(c.publish(Message::new("", "q", body.clone())).await.unwrap().is_routed());
    let confirm = c.publish(Message::new("", "q", body.clone()).header("fits", "v".repeat(900))).await.unwrap();
    rejected(confirm.clone(), "max_message_size");
    assert!(confirm.reason.contains("body 3500"), "{}", confirm.reason);
    let confirm = c.publish(Message::new("", "q", body).correlation_id("c".repeat(700))).await.unwrap();
    rejected(confirm, "max_message_size");
    // The same limits on a publish stream; the stream carries on.
    let publisher = c.publisher().await.unwrap();
    rejected(within("a streamed publish", publisher.publish(with_headers(5))).await.unwrap(), "max_message_headers");
    assert!(within("a streamed publish", publisher.publish(with_headers(1))).await.unwrap().is_routed());
    publisher.close().await.unwrap();
    assert_eq!(c.queue_info("q").await.unwrap().ready, 4, "only the messages within the limits were enqueued");
}
