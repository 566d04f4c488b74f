//! Exchanges and routing: every exchange type, the default exchange,
//! exchange-to-exchange bindings, mandatory returns, alternate exchanges,
//! and publish-time rejections.

use std::collections::BTreeMap;

use warren_client::{ConfirmStatus, ExchangeKind, ExchangeOptions, Message, Value};
use warren_tests::TestBroker;

use crate::{code, drain, queue, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_direct_by_exact_key() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("d", ExchangeKind::Direct, Default::default()).await.unwrap();
    for q in ["a", "b", "c"] {
        queue(&c, q).await;
    }
    c.bind_queue("d", "a", "k1").await.unwrap();
    c.bind_queue("d", "b", "k2").await.unwrap();
    c.bind_queue("d", "c", "k1").await.unwrap();
    let confirm = c.publish(Message::new("d", "k1", "one")).await.unwrap();
    assert_eq!((confirm.status(), confirm.queues), (ConfirmStatus::Routed, 2));
    let confirm = c.publish(Message::new("d", "k3", "lost")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Unroutable);
    assert_eq!(drain(&c, "a").await, vec!["one"]);
    assert!(drain(&c, "b").await.is_empty());
    assert_eq!(drain(&c, "c").await, vec!["one"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_fanout_to_every_bound_queue() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("f", ExchangeKind::Fanout, Default::default()).await.unwrap();
    for q in ["a", "b", "c"] {
        queue(&c, q).await;
        c.bind_queue("f", q, "ignored").await.unwrap();
    }
    let confirm = c.publish(Message::new("f", "any", "all")).await.unwrap();
    assert_eq!(confirm.queues, 3);
    for q in ["a", "b", "c"] {
        assert_eq!(drain(&c, q).await, vec!["all"], "queue {q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_topic_with_star_and_hash() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("t", ExchangeKind::Topic, Default::default()).await.unwrap();
    for (q, pattern) in [("orange", "*.orange.*"), ("rabbit", "*.*.rabbit"), ("lazy", "lazy.#")] {
        queue(&c, q).await;
        c.bind_queue("t", q, pattern).await.unwrap();
    }
    for key in ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox", "lazy", "quick.brown.fox", "orange"] {
        c.publish(Message::new("t", key, key)).await.unwrap();
    }
    assert_eq!(drain(&c, "orange").await, vec!["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"]);
    assert_eq!(drain(&c, "rabbit").await, vec!["quick.orange.rabbit"]);
    assert_eq!(drain(&c, "lazy").await, vec!["lazy.orange.elephant", "lazy.brown.fox", "lazy"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_headers_with_all_and_any() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("h", ExchangeKind::Headers, Default::default()).await.unwrap();
    queue(&c, "all").await;
    queue(&c, "any").await;
    let args = |mode: &str| -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("x-match".to_string(), Value::from(mode)),
            ("format".to_string(), Value::from("pdf")),
            ("type".to_string(), Value::from("report")),
        ])
    };
    c.bind_queue_with("h", "all", "", args("all")).await.unwrap();
    c.bind_queue_with("h", "any", "", args("any")).await.unwrap();
    c.publish(Message::new("h", "", "both").header("format", "pdf").header("type", "report")).await.unwrap();
    c.publish(Message::new("h", "", "one").header("format", "pdf")).await.unwrap();
    c.publish(Message::new("h", "", "none").header("format", "zip")).await.unwrap();
    assert_eq!(drain(&c, "all").await, vec!["both"]);
    assert_eq!(drain(&c, "any").await, vec!["both", "one"]);
    // A bad x-match is refused at bind time.
    let bad = BTreeMap::from([("x-match".to_string(), Value::from("some"))]);
    let (code, msg) = code(c.bind_queue_with("h", "all", "", bad).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("x-match"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_default_exchange_by_queue_name() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "jobs").await;
    send(&c, "jobs", "hello").await;
    let confirm = c.publish(Message::new("", "nope", "x")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Unroutable);
    assert_eq!(drain(&c, "jobs").await, vec!["hello"]);
    // The default exchange cannot be bound.
    let (code, _) = code(c.bind_queue("", "jobs", "k").await);
    assert_eq!(code, tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_follow_exchange_to_exchange_bindings() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("front", ExchangeKind::Topic, Default::default()).await.unwrap();
    c.declare_exchange("back", ExchangeKind::Fanout, Default::default()).await.unwrap();
    queue(&c, "q1").await;
    queue(&c, "q2").await;
    c.bind_exchange("front", "back", "orders.#").await.unwrap();
    c.bind_queue("back", "q1", "").await.unwrap();
    c.bind_queue("back", "q2", "").await.unwrap();
    // A cycle must not loop or duplicate.
    c.bind_exchange("back", "front", "").await.unwrap();
    let confirm = c.publish(Message::new("front", "orders.eu", "o1")).await.unwrap();
    assert_eq!(confirm.queues, 2);
    c.publish(Message::new("front", "users.eu", "u1")).await.unwrap();
    assert_eq!(drain(&c, "q1").await, vec!["o1"]);
    assert_eq!(drain(&c, "q2").await, vec!["o1"]);
    let bindings = c.list_bindings().await.unwrap();
    assert!(bindings.iter().any(|b| b.source == "front" && b.destination == "back"));
    c.unbind("front", "back", true, "orders.#", BTreeMap::new()).await.unwrap();
    let confirm = c.publish(Message::new("front", "orders.eu", "o2")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Unroutable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_return_unroutable_mandatory_messages() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("d", ExchangeKind::Direct, Default::default()).await.unwrap();
    let confirm = c.publish(Message::new("d", "nobody", "x").mandatory()).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Returned);
    assert!(confirm.reason.contains("nobody"), "{}", confirm.reason);
    let confirm = c.publish(Message::new("d", "nobody", "x")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Unroutable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_route_unroutable_messages_to_the_alternate_exchange() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("ae", ExchangeKind::Fanout, Default::default()).await.unwrap();
    c.declare_exchange("main", ExchangeKind::Direct, ExchangeOptions::default().arg("alternate-exchange", "ae")).await.unwrap();
    queue(&c, "routed").await;
    queue(&c, "unrouted").await;
    c.bind_queue("main", "routed", "k").await.unwrap();
    c.bind_queue("ae", "unrouted", "").await.unwrap();
    c.publish(Message::new("main", "k", "normal")).await.unwrap();
    // Mandatory, but the alternate exchange takes it: not returned.
    let confirm = c.publish(Message::new("main", "other", "spill").mandatory()).await.unwrap();
    assert_eq!((confirm.status(), confirm.queues), (ConfirmStatus::Routed, 1));
    assert_eq!(drain(&c, "routed").await, vec!["normal"]);
    assert_eq!(drain(&c, "unrouted").await, vec!["spill"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_reject_publishes_it_cannot_take() {
    let b = TestBroker::start_with(&["--max-message-size", "1024"]).await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let confirm = c.publish(Message::new("missing", "k", "x")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Rejected);
    assert!(confirm.reason.contains("'missing'"), "{}", confirm.reason);
    let confirm = c.publish(Message::new("", "q", vec![0u8; 1025])).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Rejected);
    assert!(confirm.reason.contains("max_message_size"), "{}", confirm.reason);
    c.declare_exchange("inner", ExchangeKind::Fanout, ExchangeOptions { internal: true, ..Default::default() }).await.unwrap();
    let confirm = c.publish(Message::new("inner", "", "x")).await.unwrap();
    assert_eq!(confirm.status(), ConfirmStatus::Rejected);
    assert!(confirm.reason.contains("internal"), "{}", confirm.reason);
    // Nothing above reached the queue; a good message still does.
    send(&c, "q", "ok").await;
    assert_eq!(drain(&c, "q").await, vec!["ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_stream_confirms_with_the_clients_sequence_numbers() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "s").await;
    let p = c.publisher().await.unwrap();
    let mut pending = Vec::new();
    for i in 0..500 {
        pending.push(p.send(Message::new("", "s", format!("m{i}"))).await.unwrap());
    }
    let unroutable = p.send(Message::new("", "nowhere", "x")).await.unwrap();
    for pc in pending {
        let seq = pc.seq();
        let confirm = pc.await.unwrap();
        assert_eq!(confirm.seq, seq);
        assert!(confirm.is_routed());
    }
    assert_eq!(unroutable.await.unwrap().status(), ConfirmStatus::Unroutable);
    p.close().await.unwrap();
    let bodies = drain(&c, "s").await;
    assert_eq!(bodies, (0..500).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

/// Every published message gets its confirm, also when its queue is deleted
/// while the message waits to be enqueued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_confirm_every_message_when_its_queue_is_deleted_mid_stream() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    for round in 0..5 {
        let name = format!("race-{round}");
        queue(&c, &name).await;
        let publisher = c.publisher().await.unwrap();
        let mut pending = Vec::new();
        for i in 0..4000 {
            pending.push(publisher.send(Message::new("", name.as_str(), format!("m{i}"))).await.unwrap());
            if i == 2000 {
                let deleter = b.client().await.unwrap();
                let name = name.clone();
                tokio::spawn(async move { deleter.delete_queue(&name, false, false).await });
            }
        }
        for p in pending {
            let confirm = tokio::time::timeout(crate::SETTLE, p).await.expect("a confirm for every message").unwrap();
            assert!(matches!(confirm.status(), ConfirmStatus::Routed | ConfirmStatus::Unroutable), "{confirm:?}");
        }
        assert_eq!(publisher.in_flight(), 0);
    }
}
