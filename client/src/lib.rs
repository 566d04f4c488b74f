//! Warren's client: the generated gRPC contract ([`proto`]) and an ergonomic
//! async client on top of it ([`Client`], [`Publisher`], [`Consumer`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_client::Error> {
//! use warren_client::{Client, ExchangeKind, Message, QueueOptions, Subscription};
//!
//! let client = Client::connect("http://127.0.0.1:5680").await?;
//! client.declare_exchange("orders", ExchangeKind::Topic, Default::default()).await?;
//! client.declare_queue("orders.eu", QueueOptions::durable()).await?;
//! client.bind_queue("orders", "orders.eu", "orders.eu.#").await?;
//!
//! let confirm = client.publish(Message::new("orders", "orders.eu.new", "hello").persistent()).await?;
//! assert!(confirm.is_routed());
//!
//! let mut consumer = client.consume(Subscription::new("orders.eu").prefetch(10)).await?;
//! while let Some(delivery) = consumer.next().await? {
//!     println!("{}", String::from_utf8_lossy(&delivery.body));
//!     consumer.ack(delivery.delivery_tag).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Invariants a reader must keep:
//! * Every published message gets exactly one [`proto::Confirm`]; a
//!   [`Publisher`] fails every outstanding confirm with an error when its
//!   stream ends, never leaves one hanging.
//! * A [`Consumer`] is one subscription on one stream; dropping it ends the
//!   subscription and the broker requeues its unacknowledged deliveries.

#![forbid(unsafe_code)]

pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("warren.v1");
    /// The encoded descriptors of `warren.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/warren_descriptor.bin"));
}

mod connect;
mod value;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub use connect::{AuthChannel, ConnectOptions, Credentials, NodeChannel};
pub use proto::{BindingInfo, Confirm, ConfirmStatus, ConsumerInfo, Delivery, ExchangeInfo, Properties, QueueInfo, StatusResponse, Value};
pub use value::{ValueExt, parse_cli_value};

/// The generated gRPC client (with credentials, when the connection has
/// some).
pub type RawClient = proto::warren_client::WarrenClient<AuthChannel>;

/// The generated client of the `Users` service (users, permissions).
pub type UsersClient = proto::users_client::UsersClient<AuthChannel>;

/// The default server address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:5680";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    /// The broker answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// The broker ended a subscription (queue deleted, shutting down).
    #[error("subscription cancelled by the broker: {0}")]
    Cancelled(String),
    /// The stream ended or the broker broke the protocol.
    #[error("{0}")]
    Protocol(String),
}

impl Error {
    /// The gRPC status code, when the broker answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// A gRPC code in its canonical `UPPER_SNAKE` form (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exchange types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn to_proto(self) -> proto::ExchangeType {
        match self {
            ExchangeKind::Direct => proto::ExchangeType::Direct,
            ExchangeKind::Fanout => proto::ExchangeType::Fanout,
            ExchangeKind::Topic => proto::ExchangeType::Topic,
            ExchangeKind::Headers => proto::ExchangeType::Headers,
        }
    }

    /// The kind a wire value names; `None` for unspecified or unknown.
    pub fn from_proto(value: i32) -> Option<ExchangeKind> {
        match proto::ExchangeType::try_from(value) {
            Ok(proto::ExchangeType::Direct) => Some(ExchangeKind::Direct),
            Ok(proto::ExchangeType::Fanout) => Some(ExchangeKind::Fanout),
            Ok(proto::ExchangeType::Topic) => Some(ExchangeKind::Topic),
            Ok(proto::ExchangeType::Headers) => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl std::str::FromStr for ExchangeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(format!("unknown exchange type {other:?}: expected direct, fanout, topic or headers")),
        }
    }
}

/// Exchange properties for [`Client::declare_exchange`].
#[derive(Clone, Debug, Default)]
pub struct ExchangeOptions {
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: BTreeMap<String, Value>,
}

impl ExchangeOptions {
    pub fn durable() -> Self {
        ExchangeOptions { durable: true, ..Default::default() }
    }

    /// Sets an argument, such as `alternate-exchange`.
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.arguments.insert(key.into(), value.into());
        self
    }
}

/// Queue properties for [`Client::declare_queue`].
#[derive(Clone, Debug, Default)]
pub struct QueueOptions {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: BTreeMap<String, Value>,
}

impl QueueOptions {
    pub fn durable() -> Self {
        QueueOptions { durable: true, ..Default::default() }
    }

    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    pub fn auto_delete(mut self) -> Self {
        self.auto_delete = true;
        self
    }

    /// Sets an argument, such as `x-message-ttl`.
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.arguments.insert(key.into(), value.into());
        self
    }
}

/// A message to publish: a builder over [`proto::Message`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message(pub proto::Message);

impl Message {
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Message(proto::Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties: Some(Properties::default()),
            body: body.into(),
            mandatory: false,
            delay_ms: None,
        })
    }

    fn props(&mut self) -> &mut Properties {
        self.0.properties.get_or_insert_with(Properties::default)
    }

    /// Written to disk before it is confirmed (on durable queues).
    pub fn persistent(mut self) -> Self {
        self.props().persistent = true;
        self
    }

    /// Returned (confirm status RETURNED) when no queue takes it.
    pub fn mandatory(mut self) -> Self {
        self.0.mandatory = true;
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.props().headers.insert(key.into(), value.into());
        self
    }

    pub fn priority(mut self, priority: u32) -> Self {
        self.props().priority = Some(priority);
        self
    }

    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.props().message_id = id.into();
        self
    }

    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.props().correlation_id = id.into();
        self
    }

    pub fn reply_to(mut self, queue: impl Into<String>) -> Self {
        self.props().reply_to = queue.into();
        self
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.props().content_type = content_type.into();
        self
    }

    /// Per-message TTL.
    pub fn expiration(mut self, ttl: Duration) -> Self {
        self.props().expiration_ms = Some(ttl.as_millis() as u64);
        self
    }

    /// Held back for this long before it becomes ready.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.0.delay_ms = Some(delay.as_millis() as u64);
        self
    }

    pub fn properties(mut self, properties: Properties) -> Self {
        self.0.properties = Some(properties);
        self
    }
}

/// A bind and an unbind name a binding the same way.
impl From<proto::BindRequest> for proto::UnbindRequest {
    fn from(b: proto::BindRequest) -> Self {
        proto::UnbindRequest {
            source: b.source,
            destination: b.destination,
            destination_kind: b.destination_kind,
            routing_key: b.routing_key,
            arguments: b.arguments,
        }
    }
}

impl From<proto::UnbindRequest> for proto::BindRequest {
    fn from(u: proto::UnbindRequest) -> Self {
        proto::BindRequest {
            source: u.source,
            destination: u.destination,
            destination_kind: u.destination_kind,
            routing_key: u.routing_key,
            arguments: u.arguments,
        }
    }
}

impl From<Message> for proto::Message {
    fn from(m: Message) -> proto::Message {
        m.0
    }
}

impl Confirm {
    /// Enqueued in at least one queue.
    pub fn is_routed(&self) -> bool {
        self.status() == ConfirmStatus::Routed
    }

    /// The status in lower case words (`routed`, `returned`, ...).
    pub fn status_name(&self) -> &'static str {
        match self.status() {
            ConfirmStatus::Unspecified => "unspecified",
            ConfirmStatus::Routed => "routed",
            ConfirmStatus::Unroutable => "unroutable",
            ConfirmStatus::Returned => "returned",
            ConfirmStatus::Rejected => "rejected",
            ConfirmStatus::Duplicate => "duplicate",
        }
    }
}

/// A subscription request for [`Client::consume`].
#[derive(Clone, Debug, Default)]
pub struct Subscription(pub proto::Subscribe);

impl Subscription {
    /// The prefetch a subscription asks for unless told otherwise: finite,
    /// in the range RabbitMQ's documentation recommends, so that a consumer
    /// that falls behind holds a bounded number of messages.
    pub const DEFAULT_PREFETCH: u32 = 200;

    /// A subscription to `queue` with manual acknowledgements and a
    /// prefetch of [`Subscription::DEFAULT_PREFETCH`].
    pub fn new(queue: impl Into<String>) -> Self {
        Subscription(proto::Subscribe { queue: queue.into(), prefetch: Self::DEFAULT_PREFETCH, ..Default::default() })
    }

    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.0.consumer_tag = tag.into();
        self
    }

    /// Unacknowledged deliveries in flight. 0 asks for the broker's maximum
    /// (`consumer_max_unacked`, 2048 by default), which also caps larger
    /// values.
    pub fn prefetch(mut self, n: u32) -> Self {
        self.0.prefetch = n;
        self
    }

    pub fn auto_ack(mut self) -> Self {
        self.0.auto_ack = true;
        self
    }

    pub fn exclusive(mut self) -> Self {
        self.0.exclusive = true;
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.0.priority = priority;
        self
    }
}

/// A connection to one broker. Cheap to clone: clones share the HTTP/2
/// connection (and so the session that owns exclusive queues).
#[derive(Clone, Debug)]
pub struct Client {
    raw: RawClient,
    users: UsersClient,
    /// With several addresses: keeps the prober that leaves dead nodes out
    /// running while any clone of the client lives.
    _nodes: Option<Arc<()>>,
}

/// Normalizes a server address: `host:port` gets `http://`.
pub fn normalize_server(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

impl Client {
    /// Connects to `addr` (`http://host:port`, or `host:port`) without
    /// credentials. A comma-separated list names several nodes of one
    /// cluster: calls are spread over the nodes that answer, and a node
    /// that goes away is left out until it is back (a stream that was on it
    /// ends with an error; open it again and it goes to another node).
    pub async fn connect(addr: impl AsRef<str>) -> Result<Client> {
        Client::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects as [`Client::connect`] does, with TLS (`https://`
    /// addresses, or a CA or client certificate in `options`) and the
    /// credentials in `options`.
    pub async fn connect_with(addr: impl AsRef<str>, options: &ConnectOptions) -> Result<Client> {
        let addrs: Vec<String> = addr
            .as_ref()
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(normalize_server)
            .map(|a| if options.wants_tls() && a.starts_with("http://") { a.replacen("http://", "https://", 1) } else { a })
            .collect();
        let shown = addrs.join(",");
        let connect_err = |detail: String| Error::Connect { addr: shown.clone(), detail };
        let credentials = options.credentials().map_err(connect_err)?;
        let endpoints = addrs
            .iter()
            .map(|a| {
                let e = Endpoint::from_shared(a.clone()).map_err(|e| connect_err(format!("invalid address {a}: {e}")))?;
                let e = e
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .initial_stream_window_size(Some(4 << 20))
                    .initial_connection_window_size(Some(32 << 20));
                options.tls(e, a.starts_with("https://")).map_err(connect_err)
            })
            .collect::<Result<Vec<_>>>()?;
        match endpoints.len() {
            0 => Err(connect_err("no address given".into())),
            1 => {
                let channel = endpoints[0].connect().await.map_err(|e| connect_err(error_chain(&e)))?;
                Ok(Client::from_channel_with(channel, credentials))
            }
            _ => {
                // At least one must answer now, as with a single address.
                let mut last = String::new();
                let mut any = false;
                for e in &endpoints {
                    match e.connect().await {
                        Ok(_) => {
                            any = true;
                            break;
                        }
                        Err(err) => last = error_chain(&err),
                    }
                }
                if !any {
                    return Err(connect_err(last));
                }
                let (channel, changes) = Channel::balance_channel::<usize>(endpoints.len().max(16));
                let alive = Arc::new(());
                let unreachable = Arc::new(tokio::sync::Notify::new());
                tokio::spawn(watch_nodes(endpoints, changes, Arc::downgrade(&alive), unreachable.clone()));
                let mut client = Client::from_service(AuthChannel::new(NodeChannel::watched(channel, unreachable), credentials));
                client._nodes = Some(alive);
                Ok(client)
            }
        }
    }

    pub fn from_channel(channel: Channel) -> Client {
        Client::from_channel_with(channel, Credentials::none())
    }

    /// A client on `channel` that sends `credentials` with every call.
    pub fn from_channel_with(channel: Channel, credentials: Credentials) -> Client {
        Client::from_service(AuthChannel::new(channel.into(), credentials))
    }

    fn from_service(service: AuthChannel) -> Client {
        Client {
            raw: RawClient::new(service.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX),
            users: UsersClient::new(service),
            _nodes: None,
        }
    }

    /// The generated `Users` client: users, permissions, who am I.
    pub fn users(&self) -> UsersClient {
        self.users.clone()
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&self) -> RawClient {
        self.raw.clone()
    }

    // ------------------------------------------------------------ exchanges

    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind, opts: ExchangeOptions) -> Result<ExchangeInfo> {
        let resp = self
            .raw()
            .declare_exchange(proto::DeclareExchangeRequest {
                name: name.to_string(),
                r#type: kind.to_proto() as i32,
                durable: opts.durable,
                auto_delete: opts.auto_delete,
                internal: opts.internal,
                arguments: opts.arguments,
                passive: false,
            })
            .await?;
        resp.into_inner().exchange.ok_or_else(|| missing("exchange"))
    }

    /// Checks that an exchange exists.
    pub async fn exchange_info(&self, name: &str) -> Result<ExchangeInfo> {
        let resp = self
            .raw()
            .declare_exchange(proto::DeclareExchangeRequest { name: name.to_string(), passive: true, ..Default::default() })
            .await?;
        resp.into_inner().exchange.ok_or_else(|| missing("exchange"))
    }

    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        self.raw().delete_exchange(proto::DeleteExchangeRequest { name: name.to_string(), if_unused }).await?;
        Ok(())
    }

    pub async fn list_exchanges(&self) -> Result<Vec<ExchangeInfo>> {
        Ok(self.raw().list_exchanges(proto::ListExchangesRequest {}).await?.into_inner().exchanges)
    }

    // --------------------------------------------------------------- queues

    /// Declares a queue; an empty name asks the broker for a unique one
    /// (returned in the info).
    pub async fn declare_queue(&self, name: &str, opts: QueueOptions) -> Result<QueueInfo> {
        let resp = self
            .raw()
            .declare_queue(proto::DeclareQueueRequest {
                name: name.to_string(),
                durable: opts.durable,
                exclusive: opts.exclusive,
                auto_delete: opts.auto_delete,
                arguments: opts.arguments,
                passive: false,
            })
            .await?;
        resp.into_inner().queue.ok_or_else(|| missing("queue"))
    }

    /// Declares a private reply queue for request / reply (RPC): a
    /// server-named, exclusive, auto-delete queue owned by this connection.
    /// Send requests with `reply_to` set to its name and a `correlation_id`.
    pub async fn declare_reply_queue(&self) -> Result<QueueInfo> {
        self.declare_queue("", QueueOptions::default().exclusive().auto_delete()).await
    }

    /// A queue's properties and counts (a passive declare).
    pub async fn queue_info(&self, name: &str) -> Result<QueueInfo> {
        let resp =
            self.raw().declare_queue(proto::DeclareQueueRequest { name: name.to_string(), passive: true, ..Default::default() }).await?;
        resp.into_inner().queue.ok_or_else(|| missing("queue"))
    }

    /// Deletes a queue; returns how many messages went with it.
    pub async fn delete_queue(&self, name: &str, if_unused: bool, if_empty: bool) -> Result<u64> {
        let resp = self.raw().delete_queue(proto::DeleteQueueRequest { name: name.to_string(), if_unused, if_empty }).await?;
        Ok(resp.into_inner().message_count)
    }

    /// Removes every ready message; returns how many.
    pub async fn purge_queue(&self, name: &str) -> Result<u64> {
        let resp = self.raw().purge_queue(proto::PurgeQueueRequest { name: name.to_string() }).await?;
        Ok(resp.into_inner().message_count)
    }

    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>> {
        Ok(self.raw().list_queues(proto::ListQueuesRequest {}).await?.into_inner().queues)
    }

    // ------------------------------------------------------------- bindings

    pub async fn bind_queue(&self, exchange: &str, queue: &str, routing_key: &str) -> Result<()> {
        self.bind(exchange, queue, false, routing_key, BTreeMap::new()).await
    }

    /// Binds with arguments (for headers exchanges: the headers and `x-match`).
    pub async fn bind_queue_with(&self, exchange: &str, queue: &str, routing_key: &str, args: BTreeMap<String, Value>) -> Result<()> {
        self.bind(exchange, queue, false, routing_key, args).await
    }

    /// An exchange-to-exchange binding: messages from `source` matching the
    /// key also route through `destination`.
    pub async fn bind_exchange(&self, source: &str, destination: &str, routing_key: &str) -> Result<()> {
        self.bind(source, destination, true, routing_key, BTreeMap::new()).await
    }

    pub async fn bind(
        &self,
        source: &str,
        destination: &str,
        to_exchange: bool,
        routing_key: &str,
        arguments: BTreeMap<String, Value>,
    ) -> Result<()> {
        self.raw().bind(binding_request(source, destination, to_exchange, routing_key, arguments)).await?;
        Ok(())
    }

    pub async fn unbind(
        &self,
        source: &str,
        destination: &str,
        to_exchange: bool,
        routing_key: &str,
        arguments: BTreeMap<String, Value>,
    ) -> Result<()> {
        let binding = binding_request(source, destination, to_exchange, routing_key, arguments);
        self.raw().unbind(proto::UnbindRequest::from(binding)).await?;
        Ok(())
    }

    pub async fn list_bindings(&self) -> Result<Vec<BindingInfo>> {
        Ok(self.raw().list_bindings(proto::ListBindingsRequest {}).await?.into_inner().bindings)
    }

    // ----------------------------------------------------------- publishing

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: impl Into<proto::Message>) -> Result<Confirm> {
        let mut confirms = self.publish_batch(vec![message.into()]).await?;
        confirms.pop().ok_or_else(|| missing("confirm"))
    }

    /// Publishes a batch in one call; one confirm per message, in order.
    pub async fn publish_batch(&self, messages: Vec<proto::Message>) -> Result<Vec<Confirm>> {
        let n = messages.len();
        let resp = self.raw().publish(proto::PublishRequest { messages }).await?;
        let confirms = resp.into_inner().confirms;
        if confirms.len() != n {
            return Err(Error::Protocol(format!("sent {n} messages, got {} confirms", confirms.len())));
        }
        Ok(confirms)
    }

    /// Opens a publish stream: many messages in flight, confirms as they
    /// come.
    pub async fn publisher(&self) -> Result<Publisher> {
        Publisher::open(self.raw()).await
    }

    // ------------------------------------------------------------ consuming

    /// Subscribes to a queue.
    pub async fn consume(&self, subscription: Subscription) -> Result<Consumer> {
        Consumer::open(self.raw(), subscription.0).await
    }

    /// Pulls up to `max` messages. With `ack` they are removed; otherwise
    /// they go back to the queue marked redelivered.
    pub async fn get(&self, queue: &str, max: u32, ack: bool) -> Result<Vec<Delivery>> {
        let resp = self.raw().get(proto::GetRequest { queue: queue.to_string(), max_messages: max, ack }).await?;
        Ok(resp.into_inner().deliveries)
    }

    pub async fn list_consumers(&self) -> Result<Vec<ConsumerInfo>> {
        Ok(self.raw().list_consumers(proto::ListConsumersRequest {}).await?.into_inner().consumers)
    }

    /// The node: identity, uptime, alarms, totals.
    pub async fn status(&self) -> Result<StatusResponse> {
        Ok(self.raw().status(proto::StatusRequest {}).await?.into_inner())
    }
}

/// A binding as the wire names it (for bind, and through `From` for unbind).
fn binding_request(
    source: &str,
    destination: &str,
    to_exchange: bool,
    routing_key: &str,
    arguments: BTreeMap<String, Value>,
) -> proto::BindRequest {
    proto::BindRequest {
        source: source.to_string(),
        destination: destination.to_string(),
        destination_kind: dest_kind(to_exchange) as i32,
        routing_key: routing_key.to_string(),
        arguments,
    }
}

fn dest_kind(to_exchange: bool) -> proto::DestinationKind {
    if to_exchange { proto::DestinationKind::Exchange } else { proto::DestinationKind::Queue }
}

fn missing(what: &str) -> Error {
    Error::Protocol(format!("the broker's response carries no {what}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------- publisher

type Waiters = Arc<parking_lot::Mutex<PublisherState>>;

#[derive(Default)]
struct PublisherState {
    waiting: HashMap<u64, oneshot::Sender<Result<Confirm>>>,
    /// Set once the confirm stream has ended; later sends fail with it.
    closed: Option<String>,
}

/// A publish stream. Many messages may be in flight; each [`Publisher::send`]
/// returns a [`PendingConfirm`] that resolves when the broker confirms that
/// message. Confirms may arrive in any order.
pub struct Publisher {
    tx: mpsc::Sender<proto::PublishStreamRequest>,
    next_seq: AtomicU64,
    state: Waiters,
    reader: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn open(mut raw: RawClient) -> Result<Publisher> {
        let (tx, rx) = mpsc::channel(1024);
        let mut confirms = raw.publish_stream(ReceiverStream::new(rx)).await?.into_inner();
        let state: Waiters = Arc::default();
        let reader = {
            let state = state.clone();
            tokio::spawn(async move {
                let end = loop {
                    match confirms.message().await {
                        Ok(Some(c)) => {
                            if let Some(w) = state.lock().waiting.remove(&c.seq) {
                                let _ = w.send(Ok(c));
                            }
                        }
                        Ok(None) => break "the publish stream ended".to_string(),
                        Err(status) => {
                            break format!("the publish stream failed: {}: {}", code_name(status.code()), status.message());
                        }
                    }
                };
                let mut s = state.lock();
                s.closed = Some(end.clone());
                for (_, w) in s.waiting.drain() {
                    let _ = w.send(Err(Error::Protocol(format!("{end} before the message was confirmed"))));
                }
            })
        };
        Ok(Publisher { tx, next_seq: AtomicU64::new(1), state, reader })
    }

    /// Sends a message; waits only while the stream is full (back-pressure).
    pub async fn send(&self, message: impl Into<proto::Message>) -> Result<PendingConfirm> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.state.lock();
            if let Some(end) = &s.closed {
                return Err(Error::Protocol(end.clone()));
            }
            s.waiting.insert(seq, tx);
        }
        let req = proto::PublishStreamRequest { seq, message: Some(message.into()) };
        if self.tx.send(req).await.is_err() {
            self.state.lock().waiting.remove(&seq);
            return Err(Error::Protocol("the publish stream is closed".into()));
        }
        Ok(PendingConfirm { seq, rx })
    }

    /// Sends a message and waits for its confirm.
    pub async fn publish(&self, message: impl Into<proto::Message>) -> Result<Confirm> {
        self.send(message).await?.await
    }

    /// Messages sent and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.state.lock().waiting.len()
    }

    /// Ends the stream after every outstanding confirm has arrived.
    pub async fn close(self) -> Result<()> {
        let Publisher { tx, reader, .. } = self;
        drop(tx);
        reader.await.map_err(|e| Error::Protocol(format!("confirm reader failed: {e}")))
    }
}

/// The confirm of one message sent on a [`Publisher`].
pub struct PendingConfirm {
    seq: u64,
    rx: oneshot::Receiver<Result<Confirm>>,
}

impl PendingConfirm {
    /// The sequence number the message was sent with.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Future for PendingConfirm {
    type Output = Result<Confirm>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(Error::Protocol("the publisher was dropped before the confirm arrived".into()))))
    }
}

// ----------------------------------------------------------------- consumer

/// Sends acknowledgements for a [`Consumer`]; cheap to clone, so deliveries
/// can be acknowledged from other tasks.
#[derive(Clone, Debug)]
pub struct Acker {
    tx: mpsc::Sender<proto::ConsumeRequest>,
}

impl Acker {
    async fn send(&self, request: proto::consume_request::Request) -> Result<()> {
        self.tx
            .send(proto::ConsumeRequest { request: Some(request) })
            .await
            .map_err(|_| Error::Protocol("the subscription has ended".into()))
    }

    pub async fn ack(&self, delivery_tag: u64) -> Result<()> {
        self.ack_multiple(delivery_tag, false).await
    }

    /// With `multiple`, acknowledges every delivery up to `delivery_tag`.
    pub async fn ack_multiple(&self, delivery_tag: u64, multiple: bool) -> Result<()> {
        self.send(proto::consume_request::Request::Ack(proto::Ack { delivery_tag, multiple })).await
    }

    pub async fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        self.send(proto::consume_request::Request::Nack(proto::Nack { delivery_tag, multiple, requeue })).await
    }

    pub async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<()> {
        self.send(proto::consume_request::Request::Reject(proto::Reject { delivery_tag, multiple: false, requeue })).await
    }

    pub async fn set_prefetch(&self, prefetch: u32) -> Result<()> {
        self.send(proto::consume_request::Request::Qos(proto::Qos { prefetch })).await
    }
}

/// One subscription. Dropping it ends the subscription.
pub struct Consumer {
    acker: Acker,
    stream: Mutex<tonic::Streaming<proto::ConsumeResponse>>,
    tag: String,
}

impl Consumer {
    async fn open(mut raw: RawClient, subscribe: proto::Subscribe) -> Result<Consumer> {
        let (tx, rx) = mpsc::channel(1024);
        let first = proto::ConsumeRequest { request: Some(proto::consume_request::Request::Subscribe(subscribe)) };
        tx.send(first).await.map_err(|_| Error::Protocol("cannot send the subscribe request".into()))?;
        let mut stream = raw.consume(ReceiverStream::new(rx)).await?.into_inner();
        let tag = match stream.message().await? {
            Some(proto::ConsumeResponse { response: Some(proto::consume_response::Response::SubscribeOk(ok)) }) => ok.consumer_tag,
            Some(other) => {
                return Err(Error::Protocol(format!("expected subscribe_ok, got {other:?}")));
            }
            None => {
                return Err(Error::Protocol("the consume stream ended before subscribe_ok".into()));
            }
        };
        Ok(Consumer { acker: Acker { tx }, stream: Mutex::new(stream), tag })
    }

    /// The consumer tag (generated by the broker when none was asked for).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The next delivery. `Ok(None)` when the stream ended cleanly;
    /// [`Error::Cancelled`] when the broker ended the subscription.
    pub async fn next(&mut self) -> Result<Option<Delivery>> {
        let mut stream = self.stream.lock().await;
        loop {
            match stream.message().await? {
                None => return Ok(None),
                Some(proto::ConsumeResponse { response }) => match response {
                    Some(proto::consume_response::Response::Delivery(d)) => return Ok(Some(d)),
                    Some(proto::consume_response::Response::Cancelled(c)) => {
                        return Err(Error::Cancelled(c.reason));
                    }
                    Some(proto::consume_response::Response::SubscribeOk(_)) | None => continue,
                },
            }
        }
    }

    /// The next delivery, or `None` when none arrives within `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Delivery>> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(r) => r,
            Err(_) => Ok(None),
        }
    }

    /// A handle for acknowledging from elsewhere.
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    pub async fn ack(&self, delivery_tag: u64) -> Result<()> {
        self.acker.ack(delivery_tag).await
    }

    pub async fn ack_multiple(&self, delivery_tag: u64, multiple: bool) -> Result<()> {
        self.acker.ack_multiple(delivery_tag, multiple).await
    }

    pub async fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        self.acker.nack(delivery_tag, multiple, requeue).await
    }

    pub async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<()> {
        self.acker.reject(delivery_tag, requeue).await
    }

    pub async fn set_prefetch(&self, prefetch: u32) -> Result<()> {
        self.acker.set_prefetch(prefetch).await
    }

    /// Ends the subscription cleanly: acknowledgements sent before are
    /// applied, unacknowledged deliveries (including any that arrive
    /// meanwhile) return to the queue. Waits (bounded) for the broker to
    /// close the stream.
    pub async fn cancel(self) -> Result<()> {
        self.acker.send(proto::consume_request::Request::Cancel(proto::Cancel {})).await?;
        let mut stream = self.stream.lock().await;
        let drain = async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(s) if s.code() == tonic::Code::Cancelled => return Ok(()),
                    Err(s) => return Err(Error::Status(s)),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), drain)
            .await
            .map_err(|_| Error::Protocol("the broker did not end the subscription within 30s".into()))?
    }

    /// Turns the consumer into a stream of deliveries. The stream ends after
    /// the first error (a cancellation included), which it yields.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Delivery>> {
        futures::stream::unfold(Some(self), |state| async move {
            let mut c = state?;
            match c.next().await {
                Ok(Some(d)) => Some((Ok(d), Some(c))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

/// How often a client of several nodes checks which of them answer.
const NODE_PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Least time between two such checks.
const NODE_PROBE_MIN_GAP: Duration = Duration::from_millis(50);

/// Keeps the nodes that accept connections in `changes`' balance set and
/// the others out, until the client is dropped (`alive` gone).
async fn watch_nodes(
    endpoints: Vec<Endpoint>,
    changes: tokio::sync::mpsc::Sender<tonic::transport::channel::Change<usize, Endpoint>>,
    alive: std::sync::Weak<()>,
    unreachable: Arc<tokio::sync::Notify>,
) {
    use tonic::transport::channel::Change;
    let mut up = vec![false; endpoints.len()];
    loop {
        if alive.strong_count() == 0 {
            return;
        }
        for (i, e) in endpoints.iter().enumerate() {
            let uri = e.uri();
            let target = format!("{}:{}", uri.host().unwrap_or("127.0.0.1"), uri.port_u16().unwrap_or(80));
            let ok =
                matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(target.as_str())).await, Ok(Ok(_)));
            if ok != up[i] {
                let change = if ok { Change::Insert(i, e.clone()) } else { Change::Remove(i) };
                if changes.send(change).await.is_err() {
                    return;
                }
                up[i] = ok;
            }
        }
        // Again after the interval, or soon when a call could not reach its
        // node (a burst of failed calls is one check, and checks are spaced
        // by at least `NODE_PROBE_MIN_GAP`, however fast calls fail).
        let checked = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(NODE_PROBE_INTERVAL) => {}
            _ = unreachable.notified() => tokio::time::sleep_until(checked + NODE_PROBE_MIN_GAP).await,
        }
    }
}
