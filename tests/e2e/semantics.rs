//! Queue semantics end to end: TTL, queue expiry, length limits,
//! dead-lettering, priorities, delays, delivery limits, deduplication,
//! single active consumer, consumer priority, RPC — with restart and
//! `kill -9` checks where state must survive.

use std::collections::HashMap;
use std::time::Duration;

use warren_client::proto::value::Kind;
use warren_client::{Client, ConfirmStatus, Delivery, ExchangeKind, Message, QueueOptions, Subscription, Value, ValueExt};
use warren_tests::{TestBroker, eventually};

use crate::{SETTLE, code, drain, queue, send, text};

/// A fanout dead-letter exchange `dlx` feeding the durable queue `dead`.
async fn dead_letter_setup(c: &Client) {
    c.declare_exchange("dlx", ExchangeKind::Fanout, warren_client::ExchangeOptions::durable()).await.unwrap();
    c.declare_queue("dead", QueueOptions::durable()).await.unwrap();
    c.bind_queue("dlx", "dead", "").await.unwrap();
}

/// The `x-death` entries of a delivery, as (queue, reason, count).
fn deaths(d: &Delivery) -> Vec<(String, String, i64)> {
    let headers = &d.properties.as_ref().unwrap().headers;
    let Some(Kind::List(list)) = headers.get("x-death").and_then(|v| v.kind.as_ref()) else { return Vec::new() };
    list.values
        .iter()
        .filter_map(|v| match &v.kind {
            Some(Kind::Map(m)) => Some((
                m.fields["queue"].as_str().unwrap_or_default().to_string(),
                m.fields["reason"].as_str().unwrap_or_default().to_string(),
                m.fields["count"].as_i64().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

async fn ready(c: &Client, q: &str) -> u64 {
    c.queue_info(q).await.unwrap().ready
}

async fn wait_ready(c: &Client, q: &str, n: u64) {
    eventually(SETTLE, &format!("{n} ready in {q}"), || async { (ready(c, q).await == n).then_some(()) }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_expire_messages_with_no_consumer_and_dead_letter_them() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    dead_letter_setup(&c).await;
    let q = QueueOptions::durable().arg("x-message-ttl", 300i64).arg("x-dead-letter-exchange", "dlx");
    c.declare_queue("short", q).await.unwrap();
    c.publish(Message::new("", "short", "queue-ttl").persistent()).await.unwrap();
    c.publish(Message::new("", "short", "own-ttl").persistent().expiration(Duration::from_millis(100))).await.unwrap();
    c.publish(Message::new("", "short", "longer-own-ttl").expiration(Duration::from_secs(60))).await.unwrap();
    // Nobody consumes: the messages still leave the ready count. (A dead
    // letter reaches its target's inbox in the batch that removes it, and
    // the target takes it in a moment later.)
    wait_ready(&c, "short", 0).await;
    wait_ready(&c, "dead", 3).await;
    let dead = c.get("dead", 10, true).await.unwrap();
    let mut bodies: Vec<String> = dead.iter().map(text).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["longer-own-ttl", "own-ttl", "queue-ttl"], "the lower of the queue and message TTL wins");
    for d in &dead {
        assert_eq!(deaths(d), vec![("short".to_string(), "expired".to_string(), 1)]);
        assert!(d.properties.as_ref().unwrap().expiration_ms.is_none(), "the TTL is not carried into the dead-letter queue");
    }
    // The expiry lag, printed (not asserted): a message with a 200 ms TTL
    // behind 5,000 others, beyond the in-memory window.
    queue(&c, "deep").await;
    let publisher = c.publisher().await.unwrap();
    let mut waiting = Vec::new();
    for i in 0..5000 {
        waiting.push(publisher.send(Message::new("", "deep", vec![b'x'; 4096]).header("n", i as i64)).await.unwrap());
    }
    for w in waiting {
        w.await.unwrap();
    }
    let sent = std::time::Instant::now();
    c.publish(Message::new("", "deep", "short-lived").expiration(Duration::from_millis(200))).await.unwrap();
    wait_ready(&c, "deep", 5000).await;
    eprintln!("expiry: a 200 ms TTL message behind 5,000 others left the ready count after {:?}", sent.elapsed());
    // Without a dead-letter exchange, expired messages are dropped.
    c.declare_queue("drop", QueueOptions::default().arg("x-message-ttl", 0i64)).await.unwrap();
    send(&c, "drop", "gone").await;
    wait_ready(&c, "drop", 0).await;
    assert!(c.get("dead", 1, true).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_expire_after_a_crash_what_fell_due_while_down() {
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    dead_letter_setup(&c).await;
    let q = QueueOptions::durable().arg("x-message-ttl", 1500i64).arg("x-dead-letter-exchange", "dlx");
    c.declare_queue("ttl", q).await.unwrap();
    for i in 0..20 {
        c.publish(Message::new("", "ttl", format!("m{i}")).persistent()).await.unwrap();
    }
    b.kill();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    b.restart().await.unwrap();
    let c = b.client().await.unwrap();
    wait_ready(&c, "ttl", 0).await;
    wait_ready(&c, "dead", 20).await;
    let mut ids: Vec<String> = drain(&c, "dead").await;
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "each expired message dead-lettered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_delete_a_queue_unused_for_its_x_expires_period() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("ephemeral", QueueOptions::durable().arg("x-expires", 300i64)).await.unwrap();
    send(&c, "ephemeral", "m").await;
    eventually(SETTLE, "the idle queue to be deleted", || async {
        c.list_queues().await.unwrap().iter().all(|q| q.name != "ephemeral").then_some(())
    })
    .await
    .unwrap();
    // Gets and re-declares count as uses; publishing does not.
    // (Each use comes well within the 2 s period; together they span more.)
    c.declare_queue("polled", QueueOptions::default().arg("x-expires", 2000i64)).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.get("polled", 1, true).await.unwrap();
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.declare_queue("polled", QueueOptions::default().arg("x-expires", 2000i64)).await.unwrap();
    }
    assert!(c.list_queues().await.unwrap().iter().any(|q| q.name == "polled"), "gets and declares keep it in use");
    // A consumer keeps it alive.
    c.declare_queue("used", QueueOptions::default().arg("x-expires", 200i64)).await.unwrap();
    let con = c.consume(Subscription::new("used")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(c.list_queues().await.unwrap().iter().any(|q| q.name == "used"), "a queue with a consumer is in use");
    drop(con);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_enforce_length_limits_with_each_overflow_mode() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    dead_letter_setup(&c).await;
    let limited =
        |overflow: &str| QueueOptions::durable().arg("x-max-length", 2i64).arg("x-overflow", overflow).arg("x-dead-letter-exchange", "dlx");
    c.declare_queue("head", limited("drop-head")).await.unwrap();
    c.declare_queue("refuse", limited("reject-publish")).await.unwrap();
    c.declare_queue("refuse-dlx", limited("reject-publish-dlx")).await.unwrap();
    for i in 0..4 {
        for q in ["head", "refuse", "refuse-dlx"] {
            let confirm = c.publish(Message::new("", q, format!("{q}-{i}")).persistent()).await.unwrap();
            let expected = if q != "head" && i >= 2 { ConfirmStatus::Rejected } else { ConfirmStatus::Routed };
            assert_eq!(confirm.status(), expected, "{q} message {i}: {confirm:?}");
            if expected == ConfirmStatus::Rejected {
                assert!(confirm.reason.contains("x-max-length"), "{}", confirm.reason);
            }
        }
    }
    assert_eq!(drain(&c, "head").await, vec!["head-2", "head-3"]);
    assert_eq!(drain(&c, "refuse").await, vec!["refuse-0", "refuse-1"]);
    assert_eq!(drain(&c, "refuse-dlx").await, vec!["refuse-dlx-0", "refuse-dlx-1"]);
    wait_ready(&c, "dead", 4).await;
    let dead = c.get("dead", 10, true).await.unwrap();
    let got: Vec<(String, String)> = dead.iter().map(|d| (text(d), deaths(d)[0].1.clone())).collect();
    let expected: Vec<(String, String)> =
        ["head-0", "head-1", "refuse-dlx-2", "refuse-dlx-3"].iter().map(|s| (s.to_string(), "maxlen".to_string())).collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, expected);

    c.declare_queue("bytes", QueueOptions::default().arg("x-max-length-bytes", 10i64)).await.unwrap();
    for body in ["aaaa", "bbbb", "cccc"] {
        send(&c, "bytes", body).await;
    }
    assert_eq!(drain(&c, "bytes").await, vec!["bbbb", "cccc"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_dead_letter_rejected_messages_with_their_history_and_routing_key() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("retry", ExchangeKind::Direct, Default::default()).await.unwrap();
    c.declare_queue("parked", QueueOptions::default()).await.unwrap();
    c.bind_queue("retry", "parked", "to-park").await.unwrap();
    let q = QueueOptions::default().arg("x-dead-letter-exchange", "retry").arg("x-dead-letter-routing-key", "to-park");
    c.declare_queue("work", q).await.unwrap();
    c.publish(Message::new("", "work", "poison").correlation_id("c-1")).await.unwrap();
    let mut con = c.consume(Subscription::new("work")).await.unwrap();
    let d = con.next_timeout(SETTLE).await.unwrap().unwrap();
    con.reject(d.delivery_tag, false).await.unwrap();
    wait_ready(&c, "parked", 1).await;
    let parked = c.get("parked", 1, true).await.unwrap();
    let p = &parked[0];
    assert_eq!((p.exchange.as_str(), p.routing_key.as_str()), ("retry", "to-park"));
    assert_eq!(deaths(p), vec![("work".to_string(), "rejected".to_string(), 1)]);
    let props = p.properties.as_ref().unwrap();
    assert_eq!(props.correlation_id, "c-1", "properties are carried untouched");
    assert_eq!(props.headers.get("x-first-death-reason").and_then(|v| v.as_str()), Some("rejected"));
    let x_death = &props.headers["x-death"];
    let Some(Kind::List(list)) = &x_death.kind else { panic!() };
    let Some(Kind::Map(entry)) = &list.values[0].kind else { panic!() };
    assert_eq!(entry.fields["exchange"].as_str(), Some(""), "the exchange it was published to");
    assert_eq!(entry.fields["routing-keys"].to_json(), serde_json::json!(["work"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_break_dead_letter_cycles() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    // a expires into b, b expires into a: without cycle detection the
    // message would circle forever.
    let a = QueueOptions::default().arg("x-message-ttl", 50i64).arg("x-dead-letter-exchange", "").arg("x-dead-letter-routing-key", "b");
    let bq = QueueOptions::default().arg("x-message-ttl", 50i64).arg("x-dead-letter-exchange", "").arg("x-dead-letter-routing-key", "a");
    c.declare_queue("a", a).await.unwrap();
    c.declare_queue("b", bq).await.unwrap();
    send(&c, "a", "loop").await;
    eventually(SETTLE, "the message to be dropped", || async {
        let (qa, qb) = (c.queue_info("a").await.unwrap(), c.queue_info("b").await.unwrap());
        (qa.ready + qb.ready == 0).then_some(())
    })
    .await
    .unwrap();
    // And it stays gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready(&c, "a").await + ready(&c, "b").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_move_dead_letters_exactly_once_across_kill_9() {
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    dead_letter_setup(&c).await;
    c.declare_queue("src", QueueOptions::durable().arg("x-dead-letter-exchange", "dlx")).await.unwrap();
    let n = 300;
    for i in 0..n {
        c.publish(Message::new("", "src", format!("m{i}")).persistent()).await.unwrap();
    }
    // Reject everything without requeue, then crash in the middle of it.
    let mut con = c.consume(Subscription::new("src").prefetch(50)).await.unwrap();
    let mut rejected = 0;
    while rejected < n / 2 {
        let d = con.next_timeout(SETTLE).await.unwrap().unwrap();
        con.reject(d.delivery_tag, false).await.unwrap();
        rejected += 1;
    }
    b.kill();
    b.restart().await.unwrap();
    let c = b.client().await.unwrap();
    let left = drain(&c, "src").await;
    let dead = drain(&c, "dead").await;
    let mut all: Vec<String> = left.iter().chain(&dead).cloned().collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a message is in both queues or twice in one");
    assert_eq!(all.len(), n, "every message is in exactly one of the two queues");
    assert!(!dead.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_deliver_higher_priorities_first_and_cap_at_the_maximum() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("prio", QueueOptions::durable().arg("x-max-priority", 5i64)).await.unwrap();
    c.publish(Message::new("", "prio", "none")).await.unwrap();
    c.publish(Message::new("", "prio", "p1").priority(1)).await.unwrap();
    c.publish(Message::new("", "prio", "p9-capped").priority(9)).await.unwrap();
    c.publish(Message::new("", "prio", "p5").priority(5)).await.unwrap();
    c.publish(Message::new("", "prio", "p0").priority(0)).await.unwrap();
    assert_eq!(drain(&c, "prio").await, vec!["p9-capped", "p5", "p1", "none", "p0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_hold_back_delayed_messages_and_count_them() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "later").await;
    c.publish(Message::new("", "later", "by-field").delay(Duration::from_millis(400))).await.unwrap();
    c.publish(Message::new("", "later", "by-header").header("x-delay", 200i64)).await.unwrap();
    send(&c, "later", "now").await;
    let info = c.queue_info("later").await.unwrap();
    assert_eq!((info.ready, info.delayed), (1, 2));
    assert_eq!(c.status().await.unwrap().totals.unwrap().messages_delayed, 2);
    assert_eq!(drain(&c, "later").await, vec!["now"]);
    wait_ready(&c, "later", 2).await;
    assert_eq!(c.queue_info("later").await.unwrap().delayed, 0);
    assert_eq!(drain(&c, "later").await, vec!["by-header", "by-field"]);
    let bad = c.publish(Message::new("", "later", "x").header("x-delay", "soon")).await.unwrap();
    assert_eq!(bad.status(), ConfirmStatus::Rejected);
    assert!(bad.reason.contains("x-delay"), "{}", bad.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_keep_delayed_messages_across_kill_9_and_support_long_delays() {
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("later", QueueOptions::durable()).await.unwrap();
    c.publish(Message::new("", "later", "soon").persistent().delay(Duration::from_millis(1500))).await.unwrap();
    let ninety_days = Duration::from_secs(90 * 24 * 3600);
    c.publish(Message::new("", "later", "next-quarter").persistent().delay(ninety_days)).await.unwrap();
    c.publish(Message::new("", "later", "transient").delay(Duration::from_millis(100))).await.unwrap();
    b.kill();
    b.restart().await.unwrap();
    let c = b.client().await.unwrap();
    assert_eq!(c.queue_info("later").await.unwrap().delayed, 2, "persistent delayed messages survive; the transient one does not");
    wait_ready(&c, "later", 1).await;
    assert_eq!(drain(&c, "later").await, vec!["soon"]);
    assert_eq!(c.queue_info("later").await.unwrap().delayed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_support_the_classic_ttl_and_dead_letter_delay_pattern() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "work").await;
    let wait =
        QueueOptions::default().arg("x-message-ttl", 200i64).arg("x-dead-letter-exchange", "").arg("x-dead-letter-routing-key", "work");
    c.declare_queue("wait", wait).await.unwrap();
    send(&c, "wait", "retry-me").await;
    assert_eq!(ready(&c, "work").await, 0);
    wait_ready(&c, "work", 1).await;
    assert_eq!(drain(&c, "work").await, vec!["retry-me"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_dead_letter_after_the_delivery_limit() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    dead_letter_setup(&c).await;
    c.declare_queue("flaky", QueueOptions::durable().arg("x-delivery-limit", 2i64).arg("x-dead-letter-exchange", "dlx")).await.unwrap();
    c.publish(Message::new("", "flaky", "poison").persistent()).await.unwrap();
    let mut con = c.consume(Subscription::new("flaky").prefetch(1)).await.unwrap();
    let mut counts = Vec::new();
    while let Some(d) = con.next_timeout(Duration::from_millis(800)).await.unwrap() {
        counts.push(d.delivery_count);
        con.nack(d.delivery_tag, false, true).await.unwrap();
        assert!(counts.len() < 10, "looping forever");
    }
    assert_eq!(counts, vec![1, 2, 3], "delivered once plus twice more, then dead-lettered");
    wait_ready(&c, "dead", 1).await;
    let dead = c.get("dead", 1, true).await.unwrap();
    assert_eq!(deaths(&dead[0]), vec![("flaky".to_string(), "delivery_limit".to_string(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_deduplicate_by_message_id_across_kill_9() {
    let mut b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("once", QueueOptions::durable().arg("x-deduplication-window", 60_000i64)).await.unwrap();
    let first = c.publish(Message::new("", "once", "a").persistent().message_id("order-17")).await.unwrap();
    let again = c.publish(Message::new("", "once", "a").persistent().message_id("order-17")).await.unwrap();
    assert_eq!((first.status(), again.status()), (ConfirmStatus::Routed, ConfirmStatus::Duplicate));
    b.kill();
    b.restart().await.unwrap();
    let c = b.client().await.unwrap();
    let after = c.publish(Message::new("", "once", "a").persistent().message_id("order-17")).await.unwrap();
    assert_eq!(after.status(), ConfirmStatus::Duplicate, "the window survives a crash");
    c.publish(Message::new("", "once", "b").persistent().message_id("order-18")).await.unwrap();
    assert_eq!(drain(&c, "once").await, vec!["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_hand_over_to_the_next_single_active_consumer() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("sac", QueueOptions::durable().arg("x-single-active-consumer", true)).await.unwrap();
    let mut first = c.consume(Subscription::new("sac").prefetch(2).consumer_tag("first")).await.unwrap();
    let mut second = c.consume(Subscription::new("sac").prefetch(10).consumer_tag("second")).await.unwrap();
    for i in 0..4 {
        send(&c, "sac", &format!("m{i}")).await;
    }
    let a = first.next_timeout(SETTLE).await.unwrap().unwrap();
    let _b = first.next_timeout(SETTLE).await.unwrap().unwrap();
    assert!(second.next_timeout(Duration::from_millis(300)).await.unwrap().is_none(), "only the active consumer receives");
    let listed = c.list_consumers().await.unwrap();
    let active: HashMap<String, bool> = listed.iter().map(|x| (x.consumer_tag.clone(), x.active)).collect();
    assert_eq!(active, HashMap::from([("first".to_string(), true), ("second".to_string(), false)]));
    first.ack(a.delivery_tag).await.unwrap();
    // The ack frees room for m2.
    let c2 = first.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!(text(&c2), "m2");
    first.cancel().await.unwrap();
    // The next in subscription order takes over, unacked messages first.
    let got: Vec<(String, bool)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let d = second.next_timeout(SETTLE).await.unwrap().unwrap();
            v.push((text(&d), d.redelivered));
        }
        v
    };
    assert_eq!(got, vec![("m1".into(), true), ("m2".into(), true), ("m3".into(), false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_prefer_higher_priority_consumers_while_they_have_capacity() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let mut low = c.consume(Subscription::new("q").prefetch(10)).await.unwrap();
    let mut high = c.consume(Subscription::new("q").prefetch(2).priority(10)).await.unwrap();
    for i in 0..5 {
        send(&c, "q", &format!("m{i}")).await;
    }
    let h1 = high.next_timeout(SETTLE).await.unwrap().unwrap();
    let h2 = high.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!((text(&h1).as_str(), text(&h2).as_str()), ("m0", "m1"));
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(text(&low.next_timeout(SETTLE).await.unwrap().unwrap()));
    }
    assert_eq!(rest, vec!["m2", "m3", "m4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_support_request_reply_over_a_server_named_reply_queue() {
    let b = TestBroker::start().await.unwrap();
    let server = b.client().await.unwrap();
    queue(&server, "rpc").await;
    // The server: answers every request on its reply_to, echoing the
    // correlation id.
    let mut requests = server.consume(Subscription::new("rpc")).await.unwrap();
    let responder = tokio::spawn(async move {
        for _ in 0..2 {
            let req = requests.next_timeout(SETTLE).await.unwrap().unwrap();
            let props = req.properties.clone().unwrap();
            let reply = Message::new("", props.reply_to.clone(), format!("echo:{}", text(&req))).correlation_id(props.correlation_id);
            assert!(server.publish(reply).await.unwrap().is_routed());
            requests.ack(req.delivery_tag).await.unwrap();
        }
    });
    // The client: one call declares its private reply queue.
    let client = b.client().await.unwrap();
    let reply_queue = client.declare_reply_queue().await.unwrap();
    assert!(reply_queue.name.starts_with("amq.gen-") && reply_queue.exclusive && reply_queue.auto_delete);
    let mut replies = client.consume(Subscription::new(&reply_queue.name).auto_ack()).await.unwrap();
    for (corr, body) in [("c-1", "ping"), ("c-2", "pong")] {
        let req = Message::new("", "rpc", body).reply_to(&reply_queue.name).correlation_id(corr);
        client.publish(req).await.unwrap();
        let reply = replies.next_timeout(SETTLE).await.unwrap().unwrap();
        assert_eq!(reply.properties.as_ref().unwrap().correlation_id, corr);
        assert_eq!(text(&reply), format!("echo:{body}"));
    }
    responder.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_reject_invalid_arguments_naming_them() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    for (arg, value) in [
        ("x-message-ttl", Value::from(-1i64)),
        ("x-expires", Value::from(0i64)),
        ("x-max-length", Value::from("ten")),
        ("x-overflow", Value::from("drop-tail")),
        ("x-max-priority", Value::from(256i64)),
        ("x-single-active-consumer", Value::from("yes")),
        ("x-delivery-limit", Value::from(-5i64)),
        ("x-deduplication-window", Value::from(0i64)),
        ("x-dead-letter-exchange", Value::from(7i64)),
    ] {
        let (code_, msg) = code(c.declare_queue("bad", QueueOptions::default().arg(arg, value)).await);
        assert_eq!(code_, tonic::Code::InvalidArgument, "{arg}");
        assert!(msg.contains(arg), "{arg}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_take_delays_and_ttls_from_warrenctl() {
    let b = TestBroker::start().await.unwrap();
    let ok = |args: &[&str]| {
        let out = b.warrenctl(args).unwrap();
        assert!(out.ok(), "warrenctl {args:?}: {out:?}");
        out.stdout
    };
    ok(&["queue", "declare", "q", "--arg", "x-max-priority=3"]);
    ok(&["publish", "--routing-key", "q", "--delay-ms", "300", "delayed"]);
    ok(&["publish", "--routing-key", "q", "--header", "x-delay=300", "delayed-too"]);
    ok(&["publish", "--routing-key", "q", "--property", "expiration=1", "expires"]);
    ok(&["publish", "--routing-key", "q", "--property", "priority=3", "urgent"]);
    let c = b.client().await.unwrap();
    let info = c.queue_info("q").await.unwrap();
    assert_eq!(info.delayed, 2);
    eventually(SETTLE, "delays to pass and the TTL to expire", || async {
        let i = c.queue_info("q").await.unwrap();
        (i.delayed == 0 && i.ready == 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(ok(&["get", "--queue", "q", "--ack", "--count", "5"]), "urgent\ndelayed\ndelayed-too\n");
}
