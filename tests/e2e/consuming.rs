//! Consumers: prefetch and fair dispatch, acknowledgements, redelivery,
//! cancellation, exclusive consumers, get.

use std::time::Duration;

use warren_client::{Error, Subscription};
use warren_tests::{TestBroker, eventually};

use crate::{SETTLE, code, drain, queue, send, text};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_respect_prefetch_and_share_fairly_between_two_consumers() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "work").await;
    for i in 0..10 {
        send(&c, "work", &format!("m{i}")).await;
    }
    let mut c1 = c.consume(Subscription::new("work").prefetch(2)).await.unwrap();
    let mut c2 = b.client().await.unwrap().consume(Subscription::new("work").prefetch(2)).await.unwrap();
    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    for _ in 0..2 {
        got1.push(c1.next_timeout(SETTLE).await.unwrap().unwrap());
        got2.push(c2.next_timeout(SETTLE).await.unwrap().unwrap());
    }
    // Prefetch 2: nothing more until an ack.
    assert!(c1.next_timeout(QUIET).await.unwrap().is_none());
    assert!(c2.next_timeout(QUIET).await.unwrap().is_none());
    let info = c.queue_info("work").await.unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers), (6, 4, 2));
    // Acking frees exactly that much credit.
    c1.ack(got1[0].delivery_tag).await.unwrap();
    got1.push(c1.next_timeout(SETTLE).await.unwrap().unwrap());
    assert!(c1.next_timeout(QUIET).await.unwrap().is_none());
    // Everything delivered once, in order within each consumer.
    let mut all: Vec<String> = got1.iter().chain(&got2).map(text).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 5);
    let consumers = c.list_consumers().await.unwrap();
    assert_eq!(consumers.len(), 2);
    assert!(consumers.iter().all(|x| x.queue == "work" && x.prefetch == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_round_robin_between_consumers() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "rr").await;
    let mut c1 = c.consume(Subscription::new("rr").prefetch(100)).await.unwrap();
    let mut c2 = c.consume(Subscription::new("rr").prefetch(100)).await.unwrap();
    for i in 0..20 {
        send(&c, "rr", &format!("m{i}")).await;
    }
    let mut n1 = 0;
    let mut n2 = 0;
    while n1 + n2 < 20 {
        tokio::select! {
            d = c1.next() => { c1.ack(d.unwrap().unwrap().delivery_tag).await.unwrap(); n1 += 1; }
            d = c2.next() => { c2.ack(d.unwrap().unwrap().delivery_tag).await.unwrap(); n2 += 1; }
            _ = tokio::time::sleep(SETTLE) => panic!("deliveries stopped at {n1} + {n2}"),
        }
    }
    assert_eq!((n1, n2), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_redeliver_in_order_after_a_consumer_disconnects() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for i in 0..5 {
        send(&c, "q", &format!("m{i}")).await;
    }
    {
        let other = b.client().await.unwrap();
        let mut first = other.consume(Subscription::new("q").prefetch(3)).await.unwrap();
        for i in 0..3 {
            let d = first.next_timeout(SETTLE).await.unwrap().unwrap();
            assert_eq!(text(&d), format!("m{i}"));
            assert!(!d.redelivered);
            assert_eq!(d.delivery_count, 1);
        }
        // Dropped without acking: the connection goes too.
    }
    eventually(SETTLE, "the unacked messages to return", || async {
        let q = c.queue_info("q").await.unwrap();
        (q.ready == 5 && q.unacked == 0).then_some(())
    })
    .await
    .unwrap();
    let mut second = c.consume(Subscription::new("q").prefetch(10)).await.unwrap();
    for i in 0..5 {
        let d = second.next_timeout(SETTLE).await.unwrap().unwrap();
        assert_eq!(text(&d), format!("m{i}"), "original order");
        assert_eq!(d.redelivered, i < 3, "m{i}");
        assert_eq!(d.delivery_count, if i < 3 { 2 } else { 1 });
        second.ack(d.delivery_tag).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_nack_and_reject_with_and_without_requeue() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for body in ["a", "b", "c", "d"] {
        send(&c, "q", body).await;
    }
    let mut con = c.consume(Subscription::new("q").prefetch(1)).await.unwrap();
    let a = con.next_timeout(SETTLE).await.unwrap().unwrap();
    con.nack(a.delivery_tag, false, true).await.unwrap();
    let a2 = con.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!((text(&a2).as_str(), a2.redelivered), ("a", true));
    con.reject(a2.delivery_tag, true).await.unwrap();
    let a3 = con.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!((text(&a3).as_str(), a3.delivery_count), ("a", 3));
    con.reject(a3.delivery_tag, false).await.unwrap();
    let b_ = con.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!(text(&b_), "b");
    con.nack(b_.delivery_tag, false, false).await.unwrap();
    let c_ = con.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!(text(&c_), "c");
    con.ack(c_.delivery_tag).await.unwrap();
    let d = con.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!(text(&d), "d");
    con.ack(d.delivery_tag).await.unwrap();
    eventually(SETTLE, "an empty queue", || async {
        let q = c.queue_info("q").await.unwrap();
        (q.ready == 0 && q.unacked == 0).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_ack_and_nack_multiple() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for i in 0..6 {
        send(&c, "q", &format!("m{i}")).await;
    }
    let mut con = c.consume(Subscription::new("q").prefetch(6)).await.unwrap();
    let mut tags = Vec::new();
    for _ in 0..6 {
        tags.push(con.next_timeout(SETTLE).await.unwrap().unwrap().delivery_tag);
    }
    con.ack_multiple(tags[2], true).await.unwrap();
    con.nack(tags[5], true, true).await.unwrap();
    // m3..m5 come back, redelivered, in order.
    for i in 3..6 {
        let d = con.next_timeout(SETTLE).await.unwrap().unwrap();
        assert_eq!(text(&d), format!("m{i}"));
        assert!(d.redelivered);
        con.ack(d.delivery_tag).await.unwrap();
    }
    eventually(SETTLE, "an empty queue", || async { (c.queue_info("q").await.unwrap().unacked == 0).then_some(()) }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_end_a_subscription_on_an_unknown_delivery_tag() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let mut con = c.consume(Subscription::new("q")).await.unwrap();
    con.ack(42).await.unwrap();
    let e = con.next_timeout(SETTLE).await.unwrap_err();
    assert!(matches!(&e, Error::Status(s) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("42")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_tell_consumers_their_queue_was_deleted() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "doomed").await;
    let mut con = c.consume(Subscription::new("doomed")).await.unwrap();
    c.delete_queue("doomed", false, false).await.unwrap();
    match con.next_timeout(SETTLE).await {
        Err(Error::Cancelled(reason)) => assert!(reason.contains("deleted"), "{reason}"),
        other => panic!("expected a cancellation, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_refuse_a_second_consumer_next_to_an_exclusive_one() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let _solo = c.consume(Subscription::new("q").exclusive()).await.unwrap();
    let (code, msg) = code(c.consume(Subscription::new("q")).await.map(|_| ()));
    assert_eq!(code, tonic::Code::AlreadyExists);
    assert!(msg.contains("exclusive"), "{msg}");
    let _tagged = c.consume(Subscription::new("missing")).await.map(|_| ()).unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_auto_ack_when_asked() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for i in 0..3 {
        send(&c, "q", &format!("m{i}")).await;
    }
    let mut con = c.consume(Subscription::new("q").auto_ack()).await.unwrap();
    for i in 0..3 {
        assert_eq!(text(&con.next_timeout(SETTLE).await.unwrap().unwrap()), format!("m{i}"));
    }
    drop(con);
    eventually(SETTLE, "the consumer to go", || async {
        let q = c.queue_info("q").await.unwrap();
        (q.consumers == 0).then_some(q)
    })
    .await
    .map(|q| assert_eq!((q.ready, q.unacked), (0, 0)))
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_get_with_and_without_ack() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    assert!(c.get("q", 1, true).await.unwrap().is_empty());
    send(&c, "q", "a").await;
    send(&c, "q", "b").await;
    let peek = c.get("q", 1, false).await.unwrap();
    assert_eq!((text(&peek[0]).as_str(), peek[0].redelivered, peek[0].message_count), ("a", false, 2));
    let taken = c.get("q", 10, true).await.unwrap();
    assert_eq!(taken.iter().map(text).collect::<Vec<_>>(), vec!["a", "b"]);
    assert!(!taken[0].redelivered, "a peek does not count as a delivery");
    assert!(drain(&c, "q").await.is_empty());
    let (code, _) = code(c.get("nope", 1, true).await);
    assert_eq!(code, tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_apply_acks_before_a_cancel_and_requeue_the_rest() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for i in 0..3 {
        send(&c, "q", &format!("m{i}")).await;
    }
    let mut con = c.consume(Subscription::new("q").prefetch(3)).await.unwrap();
    let first = con.next_timeout(SETTLE).await.unwrap().unwrap();
    con.ack(first.delivery_tag).await.unwrap();
    con.cancel().await.unwrap();
    let q = c.queue_info("q").await.unwrap();
    assert_eq!((q.ready, q.unacked, q.consumers), (2, 0, 0));
    assert_eq!(drain(&c, "q").await, vec!["m1", "m2"]);
}
