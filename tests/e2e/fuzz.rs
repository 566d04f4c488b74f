//! A fuzz target over the gRPC surface: random sequences of requests
//! (declares with arbitrary arguments and names, binds with arbitrary
//! patterns, publishes with arbitrary headers, properties, keys and
//! bodies, gets, consumers that ack, nack and reject arbitrary tags, purges,
//! deletes) against one real broker process.
//!
//! After every call: it returned within a bound, with OK or a well-formed
//! error status (a code a client can act on and a message). After every
//! sequence: the process is alive, never printed a panic, `/healthz`
//! answers, the broker's totals equal the sum of its queues, every
//! unacknowledged delivery returned when its consumer went, every queue
//! can be drained, everything can be deleted, and a plain message still
//! goes through.
//!
//! `WARREN_FUZZ_CASES` sets the number of sequences (default 64, what
//! `./dev test` and CI run); `PROPTEST_RNG_SEED` replays a run. For a long
//! session:
//!
//! ```text
//! WARREN_FUZZ_CASES=10000 cargo test -p warren-tests --test e2e fuzz -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use warren_client::proto::{self, consume_request::Request as CReq, value::Kind};
use warren_client::{Client, RawClient, Value};
use warren_tests::TestBroker;

/// Bound on one call; a call that takes longer is a hang.
const CALL: Duration = Duration::from_secs(15);
/// Bound on the broker settling after a sequence.
const SETTLE: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ strategies

/// Object names: a few valid ones that collide on purpose, and invalid ones.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
        1 => prop::sample::select(vec!["", "amq.direct", "amq.topic", "amq.gen-x", "ünï.cödé", "tab\there"]).prop_map(String::from),
        1 => Just("n".repeat(256)),
        1 => "[a-z.]{0,6}",
    ]
}

/// Routing keys and binding patterns: words, `*`, `#`, runs of `#`, empty
/// words, and keys at and over the length limits.
fn routing_key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(prop::sample::select(vec!["a", "b", "*", "#", ""]), 1..6).prop_map(|w| w.join(".")),
        2 => name(),
        2 => (1usize..40).prop_map(|n| vec!["#"; n].join(".")),
        2 => Just(vec!["w"; 100].join(".")),
        1 => Just(vec!["a"; 65].join(".")),
        1 => Just("k".repeat(256)),
        1 => any::<String>(),
    ]
}

fn edge_int() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -2i64..200,
        1 => prop::sample::select(vec![i64::MIN, i64::MIN + 1, -1, 0, 1, 255, 256, u32::MAX as i64, i64::MAX - 1, i64::MAX]),
        1 => any::<i64>(),
    ]
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..100,
        1 => prop::sample::select(vec![0, 1, u32::MAX as u64, i64::MAX as u64, u64::MAX - 1, u64::MAX]),
        1 => any::<u64>(),
    ]
}

fn int(i: i64) -> Value {
    Value { kind: Some(Kind::Int(i)) }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::String(s.to_string())) }
}

fn list(values: Vec<Value>) -> Value {
    Value { kind: Some(Kind::List(proto::ValueList { values })) }
}

fn map(fields: BTreeMap<String, Value>) -> Value {
    Value { kind: Some(Kind::Map(proto::ValueMap { fields })) }
}

/// Any value, nested up to three levels.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        edge_int().prop_map(int),
        prop_oneof![name(), any::<String>()].prop_map(|s| string(&s)),
        any::<bool>().prop_map(|b| Value { kind: Some(Kind::Bool(b)) }),
        any::<f64>().prop_map(|d| Value { kind: Some(Kind::Double(d)) }),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| Value { kind: Some(Kind::Bytes(b.into())) }),
        Just(Value { kind: None }),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(list),
            prop::collection::btree_map("[a-z-]{0,8}", inner, 0..4).prop_map(map),
        ]
    })
}

/// A known queue argument with a value that takes effect (mostly).
fn plausible_arg() -> impl Strategy<Value = (&'static str, Value)> {
    prop_oneof![
        (0i64..200).prop_map(|v| ("x-message-ttl", int(v))),
        (1i64..3000).prop_map(|v| ("x-expires", int(v))),
        (0i64..5).prop_map(|v| ("x-max-length", int(v))),
        (0i64..300).prop_map(|v| ("x-max-length-bytes", int(v))),
        prop::sample::select(vec!["drop-head", "reject-publish", "reject-publish-dlx", "drop-tail"])
            .prop_map(|v| ("x-overflow", string(v))),
        name().prop_map(|v| ("x-dead-letter-exchange", string(&v))),
        routing_key().prop_map(|v| ("x-dead-letter-routing-key", string(&v))),
        (0i64..12).prop_map(|v| ("x-max-priority", int(v))),
        any::<bool>().prop_map(|v| ("x-single-active-consumer", Value { kind: Some(Kind::Bool(v)) })),
        (0i64..3).prop_map(|v| ("x-delivery-limit", int(v))),
        (1i64..2000).prop_map(|v| ("x-deduplication-window", int(v))),
        prop::sample::select(vec!["classic", "quorum"]).prop_map(|v| ("x-queue-type", string(v))),
    ]
}

/// Queue arguments: every known one, with plausible values (that take
/// effect) and arbitrary ones (that must be refused or ignored cleanly).
fn queue_args() -> impl Strategy<Value = BTreeMap<String, Value>> {
    let known = prop::sample::select(vec![
        "x-message-ttl",
        "x-expires",
        "x-max-length",
        "x-max-length-bytes",
        "x-overflow",
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-max-priority",
        "x-single-active-consumer",
        "x-delivery-limit",
        "x-deduplication-window",
        "x-queue-type",
        "x-custom",
    ]);
    let entry = prop_oneof![3 => plausible_arg(), 1 => (known, value())];
    prop::collection::vec(entry, 0..4).prop_map(|v| v.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Exchange and binding arguments.
fn other_args() -> impl Strategy<Value = BTreeMap<String, Value>> {
    let entry = prop_oneof![
        name().prop_map(|v| ("alternate-exchange".to_string(), string(&v))),
        prop::sample::select(vec!["all", "any", "all-with-x", "any-with-x", "some"]).prop_map(|v| ("x-match".to_string(), string(v))),
        ("[a-z-]{1,6}", value()),
    ];
    prop::collection::vec(entry, 0..4).prop_map(|v| v.into_iter().collect())
}

/// A made-up death history.
fn x_death() -> impl Strategy<Value = Value> {
    let count = prop_oneof![2 => prop::sample::select(vec![i64::MAX, i64::MIN, -1, 0]), 1 => edge_int()];
    let entry = (name(), prop::sample::select(vec!["rejected", "expired", "maxlen", "delivery_limit", "junk"]), count).prop_map(
        |(queue, reason, count)| {
            map(BTreeMap::from([
                ("queue".to_string(), string(&queue)),
                ("reason".to_string(), string(reason)),
                ("count".to_string(), int(count)),
            ]))
        },
    );
    prop_oneof![3 => prop::collection::vec(entry, 0..3).prop_map(list), 1 => value()]
}

fn headers() -> impl Strategy<Value = BTreeMap<String, Value>> {
    let entry = prop_oneof![
        3 => ("[a-z-]{0,8}", value()),
        1 => x_death().prop_map(|v| ("x-death".to_string(), v)),
        1 => prop_oneof![edge_int().prop_map(int), "[0-9]{0,21}".prop_map(|s| string(&s)), value()].prop_map(|v| ("x-delay".to_string(), v)),
        1 => prop_oneof![name(), "00-[0-9a-f]{32}-[0-9a-f]{16}-01"].prop_map(|v| ("traceparent".to_string(), string(&v))),
    ];
    prop_oneof![
        8 => prop::collection::vec(entry, 0..4).prop_map(|v| v.into_iter().collect()),
        // Over the header count and header bytes limits the broker runs with.
        1 => (17usize..40).prop_map(|n| (0..n).map(|i| (format!("h{i}"), int(i as i64))).collect()),
        1 => Just(BTreeMap::from([("big".to_string(), string(&"v".repeat(5000)))])),
    ]
}

fn properties() -> impl Strategy<Value = Option<proto::Properties>> {
    let props = (
        headers(),
        any::<bool>(),
        prop_oneof![Just(None), (0u32..12).prop_map(Some), any::<u32>().prop_map(Some)],
        prop_oneof![Just(None), (0u64..150).prop_map(Some), edge_u64().prop_map(Some)],
        prop::sample::select(vec!["", "", "m1", "m2"]),
        prop::option::of(edge_int()),
        prop_oneof![Just(String::new()), any::<String>()],
    )
        .prop_map(|(headers, persistent, priority, expiration_ms, message_id, timestamp_ms, correlation_id)| proto::Properties {
            headers,
            persistent,
            priority,
            expiration_ms,
            message_id: message_id.to_string(),
            timestamp_ms,
            correlation_id,
            ..Default::default()
        });
    prop_oneof![1 => Just(None), 6 => props.prop_map(Some)]
}

fn message() -> impl Strategy<Value = proto::Message> {
    let body = prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (60_000usize..70_000).prop_map(|n| vec![b'x'; n]),
    ];
    let delay = prop_oneof![4 => Just(None), 2 => (0u64..60).prop_map(Some), 1 => edge_u64().prop_map(Some)];
    let target = prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "c"]).prop_map(|q| (String::new(), q.to_string())),
        3 => (prop::sample::select(vec!["a", "b", "c", "amq.topic", "amq.fanout"]), routing_key()).prop_map(|(x, k)| (x.to_string(), k)),
        1 => (name(), routing_key()),
    ];
    (target, properties(), body, any::<bool>(), delay).prop_map(|((exchange, routing_key), properties, body, mandatory, delay_ms)| {
        proto::Message { exchange, routing_key, properties, body: body.into(), mandatory, delay_ms }
    })
}

/// Which delivery tag a settlement names.
#[derive(Clone, Debug)]
enum Tag {
    /// One the consumer received (by index, modulo their number).
    Received(usize),
    Raw(u64),
}

#[derive(Clone, Debug)]
enum Op {
    DeclareExchange {
        conn: usize,
        req: proto::DeclareExchangeRequest,
    },
    DeleteExchange {
        conn: usize,
        name: String,
        if_unused: bool,
    },
    DeclareQueue {
        conn: usize,
        req: proto::DeclareQueueRequest,
    },
    DeleteQueue {
        conn: usize,
        name: String,
        if_unused: bool,
        if_empty: bool,
    },
    Purge {
        conn: usize,
        name: String,
    },
    Bind {
        conn: usize,
        req: proto::BindRequest,
        unbind: bool,
    },
    Publish {
        conn: usize,
        messages: Vec<proto::Message>,
        stream: bool,
    },
    Get {
        conn: usize,
        queue: String,
        max: u32,
        ack: bool,
    },
    Consume {
        conn: usize,
        sub: proto::Subscribe,
    },
    /// A consume stream that does not open with a subscribe.
    ConsumeWrongly {
        conn: usize,
        first: Option<proto::ConsumeRequest>,
    },
    Settle {
        consumer: usize,
        how: u8,
        tag: Tag,
        multiple: bool,
        requeue: bool,
    },
    Qos {
        consumer: usize,
        prefetch: u32,
    },
    Cancel {
        consumer: usize,
    },
    List {
        conn: usize,
    },
}

/// What every sequence starts from: queues `a`, `b`, `c` with arguments
/// that take effect, exchanges `a`, `b`, `c` of every kind, a few bindings.
fn setup() -> impl Strategy<Value = Vec<Op>> {
    let dlx = prop::option::of(prop::sample::select(vec!["", "a", "b"]).prop_map(|x| ("x-dead-letter-exchange", string(x))));
    let queues = prop::collection::vec((any::<bool>(), prop::collection::vec(plausible_arg(), 0..3), dlx), 3).prop_map(|qs| {
        qs.into_iter()
            .zip(["a", "b", "c"])
            .map(|((durable, mut args, dlx), name)| {
                args.retain(|(k, _)| *k != "x-dead-letter-exchange");
                args.extend(dlx);
                (durable, args, name)
            })
            .map(|(durable, args, name)| Op::DeclareQueue {
                conn: 0,
                req: proto::DeclareQueueRequest {
                    name: name.to_string(),
                    durable,
                    arguments: args.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    ..Default::default()
                },
            })
            .collect::<Vec<_>>()
    });
    let exchanges = prop::collection::vec(1i32..5, 3).prop_map(|kinds| {
        kinds
            .into_iter()
            .zip(["a", "b", "c"])
            .map(|(kind, name)| Op::DeclareExchange {
                conn: 0,
                req: proto::DeclareExchangeRequest { name: name.to_string(), r#type: kind, ..Default::default() },
            })
            .collect::<Vec<_>>()
    });
    let pick = || prop::sample::select(vec!["a", "b", "c"]);
    let binds = prop::collection::vec((pick(), pick(), 1i32..3, routing_key()), 0..6).prop_map(|bs| {
        bs.into_iter()
            .map(|(source, destination, destination_kind, routing_key)| Op::Bind {
                conn: 0,
                req: proto::BindRequest {
                    source: source.to_string(),
                    destination: destination.to_string(),
                    destination_kind,
                    routing_key,
                    arguments: BTreeMap::new(),
                },
                unbind: false,
            })
            .collect::<Vec<_>>()
    });
    (queues, exchanges, binds).prop_map(|(q, x, b)| q.into_iter().chain(x).chain(b).collect())
}

/// A sequence: the setup, then up to 40 arbitrary requests.
fn sequence() -> impl Strategy<Value = Vec<Op>> {
    (setup(), prop::collection::vec(op(), 1..40)).prop_map(|(mut ops, more)| {
        ops.extend(more);
        ops
    })
}

fn op() -> impl Strategy<Value = Op> {
    let conn = || 0usize..2;
    let declare_exchange = (conn(), name(), -1i32..6, any::<bool>(), any::<bool>(), any::<bool>(), other_args(), any::<bool>()).prop_map(
        |(conn, name, kind, durable, auto_delete, internal, arguments, passive)| Op::DeclareExchange {
            conn,
            req: proto::DeclareExchangeRequest {
                name,
                r#type: kind,
                durable,
                auto_delete,
                internal: internal && auto_delete, // rarely internal
                arguments,
                passive: passive && durable,
            },
        },
    );
    let declare_queue = (conn(), name(), any::<bool>(), any::<bool>(), any::<bool>(), queue_args(), any::<u8>()).prop_map(
        |(conn, name, durable, exclusive, auto_delete, arguments, flags)| Op::DeclareQueue {
            conn,
            req: proto::DeclareQueueRequest {
                name,
                durable,
                exclusive: exclusive && flags % 3 == 0,
                auto_delete: auto_delete && flags % 2 == 0,
                arguments,
                passive: flags % 7 == 0,
            },
        },
    );
    let bind = (conn(), name(), name(), -1i32..4, routing_key(), other_args(), any::<bool>(), any::<u8>()).prop_map(
        |(conn, source, destination, destination_kind, routing_key, arguments, unbind, pick)| Op::Bind {
            conn,
            req: proto::BindRequest { source, destination, destination_kind, routing_key, arguments },
            unbind: unbind && pick % 3 == 0,
        },
    );
    let publish = (conn(), prop::collection::vec(message(), 1..4), any::<bool>()).prop_map(|(conn, messages, stream)| Op::Publish {
        conn,
        messages,
        stream,
    });
    let get = (conn(), name(), prop_oneof![0u32..4, Just(u32::MAX), any::<u32>()], any::<bool>())
        .prop_map(|(conn, queue, max, ack)| Op::Get { conn, queue, max, ack });
    let consume = (
        conn(),
        name(),
        prop_oneof![Just(String::new()), name()],
        prop_oneof![0u32..4, Just(u32::MAX), any::<u32>()],
        any::<bool>(),
        any::<u8>(),
        prop_oneof![-2i32..3, any::<i32>()],
        other_args(),
    )
        .prop_map(|(conn, queue, consumer_tag, prefetch, auto_ack, flags, priority, arguments)| Op::Consume {
            conn,
            sub: proto::Subscribe { queue, consumer_tag, prefetch, auto_ack, exclusive: flags % 5 == 0, priority, arguments },
        });
    let wrong_first = prop_oneof![
        Just(None),
        edge_u64().prop_map(|t| Some(proto::ConsumeRequest { request: Some(CReq::Ack(proto::Ack { delivery_tag: t, multiple: true })) })),
        Just(Some(proto::ConsumeRequest { request: Some(CReq::Cancel(proto::Cancel {})) })),
        Just(Some(proto::ConsumeRequest { request: None })),
    ];
    let tag = prop_oneof![
        4 => any::<usize>().prop_map(Tag::Received),
        1 => prop::sample::select(vec![0, u64::MAX - 1, u64::MAX]).prop_map(Tag::Raw),
        1 => edge_u64().prop_map(Tag::Raw),
    ];
    let settle = (any::<usize>(), 0u8..3, tag, any::<bool>(), any::<bool>())
        .prop_map(|(consumer, how, tag, multiple, requeue)| Op::Settle { consumer, how, tag, multiple, requeue });
    prop_oneof![
        2 => declare_exchange,
        1 => (conn(), name(), any::<bool>()).prop_map(|(conn, name, if_unused)| Op::DeleteExchange { conn, name, if_unused }),
        3 => declare_queue,
        1 => (conn(), name(), any::<bool>(), any::<bool>())
            .prop_map(|(conn, name, if_unused, if_empty)| Op::DeleteQueue { conn, name, if_unused, if_empty }),
        1 => (conn(), name()).prop_map(|(conn, name)| Op::Purge { conn, name }),
        3 => bind,
        6 => publish,
        2 => get,
        2 => consume,
        1 => (conn(), wrong_first).prop_map(|(conn, first)| Op::ConsumeWrongly { conn, first }),
        4 => settle,
        1 => (any::<usize>(), prop_oneof![0u32..4, any::<u32>()]).prop_map(|(consumer, prefetch)| Op::Qos { consumer, prefetch }),
        1 => any::<usize>().prop_map(|consumer| Op::Cancel { consumer }),
        1 => conn().prop_map(|conn| Op::List { conn }),
    ]
}

// ------------------------------------------------------------- execution

/// Outcomes by call and status code, for the summary.
#[derive(Default)]
struct Tally {
    cases: u64,
    calls: u64,
    outcomes: BTreeMap<String, u64>,
}

type Shared<T> = Arc<Mutex<T>>;

/// Codes a client can act on. UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS and
/// UNIMPLEMENTED mean a bug: a panic in a handler, a broken stream, an
/// unmapped error.
fn well_formed(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::OutOfRange
    ) && !s.message().is_empty()
}

struct Consumer {
    tx: mpsc::Sender<proto::ConsumeRequest>,
    tags: Shared<Vec<u64>>,
    reader: tokio::task::JoinHandle<()>,
}

struct Case<'a> {
    raws: Vec<RawClient>,
    clients: Vec<Client>,
    consumers: Vec<Consumer>,
    tally: &'a Shared<Tally>,
    /// Problems seen by consumer stream readers.
    problems: Shared<Vec<String>>,
}

impl Case<'_> {
    fn record(&self, call: &str, outcome: &str) {
        let mut t = self.tally.lock().unwrap();
        t.calls += 1;
        *t.outcomes.entry(format!("{call} {outcome}")).or_default() += 1;
    }

    /// Bounds a call and checks its outcome.
    async fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<Option<T>, String> {
        match tokio::time::timeout(CALL, f).await {
            Err(_) => Err(format!("{what} did not return within {CALL:?}")),
            Ok(Ok(r)) => {
                self.record(what, "OK");
                Ok(Some(r.into_inner()))
            }
            Ok(Err(s)) if well_formed(&s) => {
                self.record(what, &format!("{:?}", s.code()));
                Ok(None)
            }
            Ok(Err(s)) => Err(format!("{what} failed with a status no client can act on: {s:?}")),
        }
    }

    fn check_confirms(&self, sent: usize, confirms: &[proto::Confirm]) -> Result<(), String> {
        if confirms.len() != sent {
            return Err(format!("{sent} messages published, {} confirms", confirms.len()));
        }
        for c in confirms {
            let status = proto::ConfirmStatus::try_from(c.status).map_err(|_| format!("confirm with an unknown status: {c:?}"))?;
            if status == proto::ConfirmStatus::Unspecified {
                return Err(format!("confirm without a status: {c:?}"));
            }
            if matches!(status, proto::ConfirmStatus::Rejected) && c.reason.is_empty() {
                return Err(format!("a rejection without a reason: {c:?}"));
            }
            self.record("confirm", status.as_str_name());
        }
        Ok(())
    }

    async fn apply(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::DeclareExchange { conn, req } => {
                let mut raw = self.raws[conn].clone();
                self.call("declare_exchange", raw.declare_exchange(req)).await?;
            }
            Op::DeleteExchange { conn, name, if_unused } => {
                let mut raw = self.raws[conn].clone();
                self.call("delete_exchange", raw.delete_exchange(proto::DeleteExchangeRequest { name, if_unused })).await?;
            }
            Op::DeclareQueue { conn, req } => {
                let mut raw = self.raws[conn].clone();
                self.call("declare_queue", raw.declare_queue(req)).await?;
            }
            Op::DeleteQueue { conn, name, if_unused, if_empty } => {
                let mut raw = self.raws[conn].clone();
                self.call("delete_queue", raw.delete_queue(proto::DeleteQueueRequest { name, if_unused, if_empty })).await?;
            }
            Op::Purge { conn, name } => {
                let mut raw = self.raws[conn].clone();
                self.call("purge_queue", raw.purge_queue(proto::PurgeQueueRequest { name })).await?;
            }
            Op::Bind { conn, req, unbind } => {
                let mut raw = self.raws[conn].clone();
                if unbind {
                    self.call("unbind", raw.unbind(proto::UnbindRequest::from(req))).await?;
                } else {
                    self.call("bind", raw.bind(req)).await?;
                }
            }
            Op::Publish { conn, messages, stream: false } => {
                let mut raw = self.raws[conn].clone();
                let sent = messages.len();
                if let Some(r) = self.call("publish", raw.publish(proto::PublishRequest { messages })).await? {
                    self.check_confirms(sent, &r.confirms)?;
                }
            }
            Op::Publish { conn, messages, stream: true } => {
                let sent = messages.len();
                let publish = async {
                    let publisher = self.clients[conn].publisher().await?;
                    let mut confirms = Vec::new();
                    for m in messages {
                        confirms.push(publisher.publish(m).await?);
                    }
                    publisher.close().await?;
                    Ok::<_, warren_client::Error>(confirms)
                };
                match tokio::time::timeout(CALL, publish).await {
                    Err(_) => return Err(format!("a publish stream did not finish within {CALL:?}")),
                    Ok(Ok(confirms)) => {
                        self.record("publish_stream", "OK");
                        self.check_confirms(sent, &confirms)?;
                    }
                    Ok(Err(warren_client::Error::Status(s))) if well_formed(&s) => {
                        self.record("publish_stream", &format!("{:?}", s.code()))
                    }
                    Ok(Err(e)) => return Err(format!("a publish stream failed: {e:?}")),
                }
            }
            Op::Get { conn, queue, max, ack } => {
                let mut raw = self.raws[conn].clone();
                if let Some(r) = self.call("get", raw.get(proto::GetRequest { queue, max_messages: max, ack })).await?
                    && r.deliveries.len() > max.clamp(1, 10_000) as usize
                {
                    return Err(format!("get of at most {max} returned {}", r.deliveries.len()));
                }
            }
            Op::Consume { conn, sub } => {
                let (tx, rx) = mpsc::channel(64);
                let first = proto::ConsumeRequest { request: Some(CReq::Subscribe(sub)) };
                let _ = tx.send(first).await;
                let mut raw = self.raws[conn].clone();
                if let Some(mut stream) = self.call("consume", raw.consume(ReceiverStream::new(rx))).await? {
                    let tags: Shared<Vec<u64>> = Arc::default();
                    let problems = self.problems.clone();
                    let seen = tags.clone();
                    let reader = tokio::spawn(async move {
                        loop {
                            match stream.message().await {
                                Ok(Some(proto::ConsumeResponse { response: Some(proto::consume_response::Response::Delivery(d)) })) => {
                                    seen.lock().unwrap().push(d.delivery_tag);
                                }
                                Ok(Some(_)) => {}
                                Ok(None) => return,
                                Err(s) if well_formed(&s) => return,
                                Err(s) => {
                                    problems.lock().unwrap().push(format!("a consume stream ended with {s:?}"));
                                    return;
                                }
                            }
                        }
                    });
                    self.consumers.push(Consumer { tx, tags, reader });
                }
            }
            Op::ConsumeWrongly { conn, first } => {
                let mut raw = self.raws[conn].clone();
                let requests = futures::stream::iter(first);
                match tokio::time::timeout(CALL, raw.consume(requests)).await {
                    Err(_) => return Err(format!("a consume stream opened wrongly did not end within {CALL:?}")),
                    Ok(Ok(_)) => return Err("a consume stream without a subscribe was accepted".into()),
                    Ok(Err(s)) if s.code() == Code::InvalidArgument => self.record("consume_wrongly", "InvalidArgument"),
                    Ok(Err(s)) => return Err(format!("a consume stream without a subscribe ended with {s:?}")),
                }
            }
            Op::Settle { consumer, how, tag, multiple, requeue } => {
                let Some(c) = pick(&self.consumers, consumer) else { return Ok(()) };
                let delivery_tag = match tag {
                    Tag::Raw(t) => t,
                    Tag::Received(i) => {
                        let tags = c.tags.lock().unwrap();
                        if tags.is_empty() { 1 } else { tags[i % tags.len()] }
                    }
                };
                let request = match how {
                    0 => CReq::Ack(proto::Ack { delivery_tag, multiple }),
                    1 => CReq::Nack(proto::Nack { delivery_tag, multiple, requeue }),
                    _ => CReq::Reject(proto::Reject { delivery_tag, multiple, requeue }),
                };
                // A closed subscription (ended by an unknown tag, a deleted
                // queue) no longer takes requests: that is fine.
                let _ = c.tx.try_send(proto::ConsumeRequest { request: Some(request) });
                self.record("settle", "sent");
            }
            Op::Qos { consumer, prefetch } => {
                if let Some(c) = pick(&self.consumers, consumer) {
                    let request = CReq::Qos(proto::Qos { prefetch });
                    let _ = c.tx.try_send(proto::ConsumeRequest { request: Some(request) });
                }
            }
            Op::Cancel { consumer } => {
                if let Some(c) = pick(&self.consumers, consumer) {
                    let request = CReq::Cancel(proto::Cancel {});
                    let _ = c.tx.try_send(proto::ConsumeRequest { request: Some(request) });
                }
            }
            Op::List { conn } => {
                let mut raw = self.raws[conn].clone();
                self.call("list_exchanges", raw.list_exchanges(proto::ListExchangesRequest {})).await?;
                self.call("list_queues", raw.list_queues(proto::ListQueuesRequest {})).await?;
                self.call("list_bindings", raw.list_bindings(proto::ListBindingsRequest {})).await?;
                self.call("list_consumers", raw.list_consumers(proto::ListConsumersRequest {})).await?;
                self.call("status", raw.status(proto::StatusRequest {})).await?;
            }
        }
        Ok(())
    }
}

fn pick<T>(v: &[T], i: usize) -> Option<&T> {
    if v.is_empty() { None } else { v.get(i % v.len()) }
}

/// Polls `check` until it says `Ok(true)`, failing after [`SETTLE`] with the
/// last reason it gave.
async fn settle<F, Fut>(what: &str, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let last = match tokio::time::timeout(CALL, check()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => format!("a check did not return within {CALL:?}"),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what}: not settled after {SETTLE:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn status_error(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

/// The broker's totals against the sum of its queues; no consumer and no
/// unacknowledged message left.
async fn consistent(admin: &Client) -> Result<(), String> {
    let queues = admin.list_queues().await.map_err(status_error)?;
    let status = admin.status().await.map_err(status_error)?;
    let totals = status.totals.unwrap_or_default();
    let sum = |f: fn(&proto::QueueInfo) -> u64| queues.iter().map(f).sum::<u64>();
    let listed = (queues.len() as u64, sum(|q| q.ready), sum(|q| q.unacked), sum(|q| q.delayed), sum(|q| q.consumers as u64));
    let reported = (totals.queues, totals.messages_ready, totals.messages_unacked, totals.messages_delayed, totals.consumers);
    if listed != reported {
        return Err(format!("status totals (queues, ready, unacked, delayed, consumers) {reported:?} but the queues sum to {listed:?}"));
    }
    if let Some(q) = queues.iter().find(|q| q.consumers > 0 || q.unacked > 0) {
        return Err(format!("queue '{}' has {} consumer(s) and {} unacked after every consumer went", q.name, q.consumers, q.unacked));
    }
    let exchanges = admin.list_exchanges().await.map_err(status_error)?.len() as u64;
    let bindings = admin.list_bindings().await.map_err(status_error)?.len() as u64;
    if (exchanges, bindings) != (totals.exchanges, totals.bindings) {
        return Err(format!(
            "status reports {} exchanges and {} bindings; the lists hold {exchanges} and {bindings}",
            totals.exchanges, totals.bindings
        ));
    }
    Ok(())
}

/// Every queue drains: gets with ack until no ready message is left (delayed
/// messages that fall due meanwhile are taken as they come).
async fn drained(admin: &Client) -> Result<(), String> {
    for q in admin.list_queues().await.map_err(status_error)? {
        for _ in 0..1000 {
            match admin.get(&q.name, 500, true).await {
                Ok(batch) if batch.is_empty() => break,
                Ok(_) => {}
                // Deleted meanwhile (x-expires, auto-delete): nothing to drain.
                Err(e) if e.code() == Some(Code::NotFound) => break,
                Err(e) => return Err(format!("draining '{}': {e:?}", q.name)),
            }
        }
    }
    let queues = admin.list_queues().await.map_err(status_error)?;
    match queues.iter().find(|q| q.ready > 0) {
        Some(q) => Err(format!("queue '{}' still has {} ready after draining", q.name, q.ready)),
        None => Ok(()),
    }
}

/// Deletes every queue and every exchange that is not built in.
async fn emptied(admin: &Client) -> Result<(), String> {
    for q in admin.list_queues().await.map_err(status_error)? {
        let _ = admin.delete_queue(&q.name, false, false).await;
    }
    for x in admin.list_exchanges().await.map_err(status_error)? {
        if !x.name.is_empty() && !x.name.starts_with("amq.") {
            let _ = admin.delete_exchange(&x.name, false).await;
        }
    }
    let queues = admin.list_queues().await.map_err(status_error)?;
    let exchanges: Vec<String> = admin
        .list_exchanges()
        .await
        .map_err(status_error)?
        .into_iter()
        .map(|x| x.name)
        .filter(|n| !n.is_empty() && !n.starts_with("amq."))
        .collect();
    if queues.is_empty() && exchanges.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "left after deleting everything: queues {:?}, exchanges {exchanges:?}",
            queues.iter().map(|q| &q.name).collect::<Vec<_>>()
        ))
    }
}

async fn run_case(b: &mut TestBroker, ops: Vec<Op>, tally: &Shared<Tally>) -> Result<(), String> {
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(Client::connect(b.url()).await.map_err(|e| format!("connect: {e:?}"))?);
    }
    let mut case =
        Case { raws: clients.iter().map(Client::raw).collect(), clients, consumers: Vec::new(), tally, problems: Arc::default() };
    let mut result = Ok(());
    for op in ops {
        if let Err(e) = case.apply(op.clone()).await {
            result = Err(format!("{e}\n  during {op:?}"));
            break;
        }
    }
    // Every consumer goes (its stream is dropped), then the connections.
    for c in case.consumers.drain(..) {
        c.reader.abort();
        drop(c.tx);
    }
    let problems = std::mem::take(&mut *case.problems.lock().unwrap());
    drop(case);
    result?;
    if let Some(p) = problems.first() {
        return Err(p.clone());
    }
    let admin = Client::connect(b.url()).await.map_err(|e| format!("connect: {e:?}"))?;
    settle("totals and queues agree, no consumer left", || consistent(&admin)).await?;
    settle("every queue drains", || drained(&admin)).await?;
    settle("everything can be deleted", || emptied(&admin)).await?;
    // Still serving: health, and a plain message round trip.
    let (code, _) = b.http_get("/healthz").await.map_err(status_error)?;
    if code != 200 {
        return Err(format!("/healthz answered {code}"));
    }
    admin.declare_queue("sanity", Default::default()).await.map_err(status_error)?;
    let confirm = admin.publish(warren_client::Message::new("", "sanity", "ping")).await.map_err(status_error)?;
    let got = admin.get("sanity", 1, true).await.map_err(status_error)?;
    if !confirm.is_routed() || got.len() != 1 || got[0].body.as_ref() != b"ping" {
        return Err(format!("a plain round trip failed: {confirm:?}, {got:?}"));
    }
    admin.delete_queue("sanity", false, false).await.map_err(status_error)?;
    if !b.is_running() {
        return Err("the broker process exited".into());
    }
    if b.stderr().contains("panicked") {
        return Err("the broker panicked".into());
    }
    tally.lock().unwrap().cases += 1;
    Ok(())
}

#[test]
fn fuzz_the_grpc_surface() {
    let cases: u32 = std::env::var("WARREN_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Small limits, so that sequences reach them: a window of 8 messages
    // (paging), 16 headers, 4 KiB of headers, 64 KiB messages.
    let args = [
        "--queue-window-messages",
        "8",
        "--max-message-headers",
        "16",
        "--max-message-header-bytes",
        "4KiB",
        "--max-message-size",
        "64KiB",
        "--consume-subscribe-timeout",
        "2s",
    ];
    // One broker for every sequence that passes; after a failure (a hang,
    // a panic) the next sequence, a shrinking step included, gets a new one.
    let broker: Mutex<Option<TestBroker>> = Mutex::new(None);
    let failed_stderr: Mutex<String> = Mutex::default();
    let tally: Shared<Tally> = Arc::default();
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 32, max_shrink_time: 180_000, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let started = std::time::Instant::now();
    let result = runner.run(&sequence(), |ops| {
        let mut slot = broker.lock().unwrap();
        if slot.is_none() {
            let started = rt.block_on(TestBroker::start_capturing_stderr(&args));
            *slot = Some(started.map_err(|e| TestCaseError::fail(format!("starting a broker: {e}")))?);
        }
        let b = slot.as_mut().unwrap();
        let outcome = rt.block_on(run_case(b, ops, &tally));
        if outcome.is_err() {
            *failed_stderr.lock().unwrap() = slot.take().map(|b| b.stderr()).unwrap_or_default();
        }
        outcome.map_err(TestCaseError::fail)
    });
    let t = tally.lock().unwrap();
    let summary: Vec<String> = t.outcomes.iter().map(|(k, v)| format!("  {k}: {v}")).collect();
    eprintln!(
        "fuzz: {} sequences passed, {} calls in {:.1}s; outcomes:\n{}",
        t.cases,
        t.calls,
        started.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    if let Err(e) = result {
        let stderr = failed_stderr.lock().unwrap().clone();
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        panic!("{e}\nbroker stderr (last lines):\n{}", tail.join("\n"));
    }
}
