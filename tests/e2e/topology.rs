//! Declaring, re-declaring, deleting and listing exchanges and queues;
//! exclusive and auto-delete queues; name validation.

use warren_client::{ExchangeKind, ExchangeOptions, QueueOptions, Subscription};
use warren_tests::{TestBroker, eventually};

use crate::{SETTLE, code, queue, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_refuse_a_redeclare_with_other_properties_naming_the_field() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    let opts = QueueOptions::durable().arg("x-max-length", 10i64);
    c.declare_queue("q", opts.clone()).await.unwrap();
    // Identical: fine (idempotent).
    c.declare_queue("q", opts.clone()).await.unwrap();
    let (code_, msg) = code(c.declare_queue("q", QueueOptions::default().arg("x-max-length", 10i64)).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    assert!(msg.contains("durable"), "{msg}");
    let (code_, msg) = code(c.declare_queue("q", QueueOptions::durable().arg("x-max-length", 20i64)).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    assert!(msg.contains("x-max-length") && msg.contains("10") && msg.contains("20"), "{msg}");

    c.declare_exchange("x", ExchangeKind::Topic, ExchangeOptions::durable()).await.unwrap();
    let (code_, msg) = code(c.declare_exchange("x", ExchangeKind::Direct, ExchangeOptions::durable()).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    assert!(msg.contains("type") && msg.contains("topic") && msg.contains("direct"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_report_counts_on_a_passive_declare() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for i in 0..3 {
        send(&c, "q", &format!("m{i}")).await;
    }
    let mut con = c.consume(Subscription::new("q").prefetch(1)).await.unwrap();
    con.next_timeout(SETTLE).await.unwrap().unwrap();
    let info = eventually(SETTLE, "counts to settle", || async {
        let i = c.queue_info("q").await.unwrap();
        (i.unacked == 1).then_some(i)
    })
    .await
    .unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers), (2, 1, 1));
    let (code_, msg) = code(c.queue_info("missing").await);
    assert_eq!(code_, tonic::Code::NotFound);
    assert!(msg.contains("'missing'"), "{msg}");
    let (code_, _) = code(c.exchange_info("missing").await);
    assert_eq!(code_, tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_delete_only_when_unused_or_empty_if_asked() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    send(&c, "q", "m").await;
    let (code_, msg) = code(c.delete_queue("q", false, true).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    assert!(msg.contains("not empty"), "{msg}");
    let con = c.consume(Subscription::new("q").prefetch(1)).await.unwrap();
    let (code_, msg) = code(c.delete_queue("q", true, false).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    assert!(msg.contains("in use"), "{msg}");
    drop(con);
    eventually(SETTLE, "the consumer to go", || async { (c.queue_info("q").await.unwrap().consumers == 0).then_some(()) }).await.unwrap();
    assert_eq!(c.delete_queue("q", true, false).await.unwrap(), 1);
    let (code_, _) = code(c.delete_queue("q", false, false).await);
    assert_eq!(code_, tonic::Code::NotFound);

    c.declare_exchange("x", ExchangeKind::Fanout, Default::default()).await.unwrap();
    queue(&c, "q2").await;
    c.bind_queue("x", "q2", "").await.unwrap();
    let (code_, _) = code(c.delete_exchange("x", true).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    c.delete_exchange("x", false).await.unwrap();
    assert!(c.list_bindings().await.unwrap().is_empty(), "bindings go with their exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_purge_ready_messages() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    for i in 0..4 {
        send(&c, "q", &format!("m{i}")).await;
    }
    assert_eq!(c.purge_queue("q").await.unwrap(), 4);
    assert_eq!(c.queue_info("q").await.unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_keep_exclusive_queues_to_their_connection_and_delete_them_with_it() {
    let b = TestBroker::start().await.unwrap();
    let owner = b.client().await.unwrap();
    let other = b.client().await.unwrap();
    let info = owner.declare_queue("", QueueOptions::default().exclusive()).await.unwrap();
    assert!(info.name.starts_with("amq.gen-"), "{}", info.name);
    let (code_, msg) = code(other.get(&info.name, 1, true).await);
    assert_eq!(code_, tonic::Code::PermissionDenied);
    assert!(msg.contains("exclusive"), "{msg}");
    send(&owner, &info.name, "mine").await;
    drop(owner);
    eventually(SETTLE, "the exclusive queue to be deleted", || async {
        other.list_queues().await.unwrap().iter().all(|q| q.name != info.name).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_auto_delete_a_queue_after_its_last_consumer() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("temp", QueueOptions::default().auto_delete()).await.unwrap();
    let con = c.consume(Subscription::new("temp")).await.unwrap();
    assert!(c.list_queues().await.unwrap().iter().any(|q| q.name == "temp"));
    drop(con);
    eventually(SETTLE, "the auto-delete queue to go", || async {
        c.list_queues().await.unwrap().iter().all(|q| q.name != "temp").then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_validate_names_and_reserve_amq() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    let long = "x".repeat(256);
    let (code_, msg) = code(c.declare_queue(&long, QueueOptions::default()).await);
    assert_eq!(code_, tonic::Code::InvalidArgument);
    assert!(msg.contains("256") && msg.contains("255"), "{msg}");
    let (code_, _) = code(c.declare_exchange("", ExchangeKind::Direct, Default::default()).await);
    assert_eq!(code_, tonic::Code::InvalidArgument);
    let (code_, _) = code(c.declare_exchange("amq.mine", ExchangeKind::Direct, Default::default()).await);
    assert_eq!(code_, tonic::Code::PermissionDenied);
    c.declare_queue(&"y".repeat(255), QueueOptions::default()).await.unwrap();
    let (code_, msg) = code(c.declare_queue("q", QueueOptions::default().arg("x-max-priority", 300i64)).await);
    assert_eq!(code_, tonic::Code::InvalidArgument);
    assert!(msg.contains("x-max-priority"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_list_everything() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_exchange("logs", ExchangeKind::Fanout, ExchangeOptions::durable()).await.unwrap();
    queue(&c, "a").await;
    c.bind_queue("logs", "a", "").await.unwrap();
    let exchanges = c.list_exchanges().await.unwrap();
    for name in ["", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "logs"] {
        assert!(exchanges.iter().any(|x| x.name == name), "exchange {name:?} missing");
    }
    let queues = c.list_queues().await.unwrap();
    assert_eq!(queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), vec!["a"]);
    let bindings = c.list_bindings().await.unwrap();
    assert_eq!(bindings.len(), 1);
    let status = c.status().await.unwrap();
    let totals = status.totals.unwrap();
    assert_eq!((totals.queues, totals.bindings), (1, 1));
    assert!(!status.node.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_auto_delete_exchanges_that_lose_their_last_binding() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    let auto = ExchangeOptions { auto_delete: true, ..Default::default() };
    c.declare_exchange("front", ExchangeKind::Fanout, auto.clone()).await.unwrap();
    c.declare_exchange("middle", ExchangeKind::Fanout, auto.clone()).await.unwrap();
    c.declare_exchange("back", ExchangeKind::Fanout, Default::default()).await.unwrap();
    c.declare_exchange("lonely", ExchangeKind::Fanout, auto).await.unwrap();
    queue(&c, "q").await;
    c.bind_exchange("front", "middle", "").await.unwrap();
    c.bind_exchange("middle", "back", "").await.unwrap();
    c.bind_queue("back", "q", "").await.unwrap();
    let names = |xs: Vec<warren_client::ExchangeInfo>| xs.into_iter().map(|x| x.name).collect::<Vec<_>>();
    // Deleting "back" removes middle's only binding, then front's.
    c.delete_exchange("back", false).await.unwrap();
    let left = names(c.list_exchanges().await.unwrap());
    for gone in ["back", "middle", "front"] {
        assert!(!left.iter().any(|x| x == gone), "{gone} still listed: {left:?}");
    }
    assert!(left.iter().any(|x| x == "lonely"), "never bound: not auto-deleted");
    // Unbinding a queue from an auto-delete exchange deletes it.
    c.declare_exchange("ad", ExchangeKind::Direct, ExchangeOptions { auto_delete: true, ..Default::default() }).await.unwrap();
    c.bind_queue("ad", "q", "k").await.unwrap();
    c.unbind("ad", "q", false, "k", Default::default()).await.unwrap();
    assert!(!names(c.list_exchanges().await.unwrap()).iter().any(|x| x == "ad"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_refuse_an_unknown_destination_kind() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "q").await;
    let req = warren_client::proto::BindRequest {
        source: "amq.direct".into(),
        destination: "q".into(),
        destination_kind: 7,
        routing_key: "k".into(),
        arguments: Default::default(),
    };
    let (code_, msg) = code(c.raw().bind(req).await.map(|_| ()).map_err(warren_client::Error::from));
    assert_eq!(code_, tonic::Code::InvalidArgument);
    assert!(msg.contains("destination_kind"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_compare_arguments_by_meaning_on_redeclare() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    c.declare_queue("q", QueueOptions::durable()).await.unwrap();
    // Stating a default is the same queue.
    let explicit =
        QueueOptions::durable().arg("x-queue-type", "classic").arg("x-single-active-consumer", false).arg("x-overflow", "drop-head");
    c.declare_queue("q", explicit).await.unwrap();
    // An invalid value is INVALID_ARGUMENT, existing queue or not.
    let (code_, msg) = code(c.declare_queue("q", QueueOptions::durable().arg("x-max-priority", 0i64)).await);
    assert_eq!(code_, tonic::Code::InvalidArgument, "{msg}");
    let (code_, msg) = code(c.declare_queue("q", QueueOptions::durable().arg("x-max-length", 5i64)).await);
    assert_eq!(code_, tonic::Code::FailedPrecondition);
    assert!(msg.contains("argument 'x-max-length' = (absent)") && msg.ends_with("= 5"), "{msg}");
}
