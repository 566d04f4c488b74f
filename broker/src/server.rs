//! The gRPC edge: decode a request, call the broker, map the result. No
//! broker logic lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use warren_client::proto::{self, warren_server::Warren};

use crate::auth::authz::{self, Operation, Resource};
use crate::auth::{self, Connection};
use crate::broker::{Broker, Session, Subscription};
use crate::confirm::{self, ConfirmSink};
use crate::error::Error;
use crate::queue::{ConsumerEvent, QueueCmd};

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::NotFound { .. } => Status::not_found(msg),
            Error::PreconditionFailed(_) => Status::failed_precondition(msg),
            Error::AccessRefused(_) => Status::permission_denied(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::ShuttingDown | Error::Unavailable(_) => Status::unavailable(msg),
            Error::Store(_) => Status::internal(msg),
        }
    }
}

/// Most confirms one publish stream may have outstanding; past it the
/// broker stops reading the stream (HTTP/2 flow control pushes back).
const MAX_IN_FLIGHT_PER_STREAM: usize = 8192;

/// A connection (TCP, or TLS over TCP) carrying its [`Session`] and its
/// authentication state: every request on it sees the same session, and
/// when the connection closes the session ends.
pub struct SessionIo {
    io: crate::tls::Stream,
    info: ConnInfo,
}

/// What every request on a connection carries in its extensions.
#[derive(Clone)]
pub struct ConnInfo {
    pub session: Session,
    pub conn: Arc<Connection>,
}

impl Connected for SessionIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepted connections (handshakes done, see [`crate::tls::accept_loop`]),
/// each with a new session.
pub fn incoming(accepted: mpsc::Receiver<crate::tls::Accepted>, broker: Broker) -> impl Stream<Item = Result<SessionIo, std::io::Error>> {
    futures::stream::unfold((accepted, broker), |(mut accepted, broker)| async move {
        let a = accepted.recv().await?;
        let session = broker.open_session(a.peer.to_string());
        let conn = Arc::new(Connection::new(a.peer, a.stream.peer_certificate()));
        Some((Ok(SessionIo { io: a.stream, info: ConnInfo { session, conn } }), (accepted, broker)))
    })
}

/// The `warren.v1.Warren` service.
pub struct WarrenService {
    broker: Broker,
    shutdown: CancellationToken,
    data_dir: String,
    grpc_addr: String,
    /// How long a unary publish waits while a resource alarm blocks
    /// publishers.
    publish_block_timeout: std::time::Duration,
    /// How long a consume stream may stay open without its Subscribe.
    consume_subscribe_timeout: std::time::Duration,
}

impl WarrenService {
    pub fn new(broker: Broker, shutdown: CancellationToken, data_dir: String, grpc_addr: String) -> Self {
        WarrenService {
            broker,
            shutdown,
            data_dir,
            grpc_addr,
            publish_block_timeout: std::time::Duration::from_secs(10),
            consume_subscribe_timeout: std::time::Duration::from_secs(10),
        }
    }

    pub fn with_publish_block_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.publish_block_timeout = timeout;
        self
    }

    pub fn with_consume_subscribe_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.consume_subscribe_timeout = timeout;
        self
    }

    fn session<T>(&self, req: &Request<T>) -> Session {
        req.extensions().get::<ConnInfo>().map(|c| c.session.clone()).unwrap_or_else(|| self.broker.open_session("unknown"))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Warren for WarrenService {
    async fn declare_exchange(
        &self,
        req: Request<proto::DeclareExchangeRequest>,
    ) -> Result<Response<proto::DeclareExchangeResponse>, Status> {
        let r = req.get_ref();
        let alternate_exchange = string_arg(&r.arguments, "alternate-exchange");
        authz::check(&req, Operation::DeclareExchange { name: &r.name, passive: r.passive, alternate_exchange })?;
        self.broker.wait_current().await?;
        let exchange = self.broker.declare_exchange(req.into_inner()).await?;
        Ok(Response::new(proto::DeclareExchangeResponse { exchange: Some(exchange) }))
    }

    async fn delete_exchange(&self, req: Request<proto::DeleteExchangeRequest>) -> Result<Response<proto::DeleteExchangeResponse>, Status> {
        authz::check(&req, Operation::DeleteExchange { name: &req.get_ref().name })?;
        self.broker.wait_current().await?;
        let r = req.into_inner();
        self.broker.delete_exchange(&r.name, r.if_unused).await?;
        Ok(Response::new(proto::DeleteExchangeResponse {}))
    }

    async fn list_exchanges(&self, req: Request<proto::ListExchangesRequest>) -> Result<Response<proto::ListExchangesResponse>, Status> {
        let who = authz::caller(&req);
        let mut exchanges = self.broker.list_exchanges().await;
        exchanges.retain(|x| authz::visible(&who, Resource::Exchange(&x.name)));
        Ok(Response::new(proto::ListExchangesResponse { exchanges }))
    }

    async fn declare_queue(&self, req: Request<proto::DeclareQueueRequest>) -> Result<Response<proto::DeclareQueueResponse>, Status> {
        let r = req.get_ref();
        let dead_letter_exchange = string_arg(&r.arguments, "x-dead-letter-exchange");
        authz::check(&req, Operation::DeclareQueue { name: &r.name, passive: r.passive, dead_letter_exchange })?;
        self.broker.wait_current().await?;
        let session = self.session(&req);
        let queue = self.broker.declare_queue(&session, req.into_inner()).await?;
        Ok(Response::new(proto::DeclareQueueResponse { queue: Some(queue) }))
    }

    async fn delete_queue(&self, req: Request<proto::DeleteQueueRequest>) -> Result<Response<proto::DeleteQueueResponse>, Status> {
        authz::check(&req, Operation::DeleteQueue { name: &req.get_ref().name })?;
        self.broker.wait_current().await?;
        let session = self.session(&req);
        let r = req.into_inner();
        let message_count = self.broker.delete_queue(&session, &r.name, r.if_unused, r.if_empty).await?;
        Ok(Response::new(proto::DeleteQueueResponse { message_count }))
    }

    async fn purge_queue(&self, req: Request<proto::PurgeQueueRequest>) -> Result<Response<proto::PurgeQueueResponse>, Status> {
        authz::check(&req, Operation::PurgeQueue { name: &req.get_ref().name })?;
        self.broker.wait_current().await?;
        let session = self.session(&req);
        let message_count = self.broker.purge_queue(&session, &req.into_inner().name).await?;
        Ok(Response::new(proto::PurgeQueueResponse { message_count }))
    }

    async fn list_queues(&self, req: Request<proto::ListQueuesRequest>) -> Result<Response<proto::ListQueuesResponse>, Status> {
        let who = authz::caller(&req);
        let mut queues = self.broker.list_queues();
        queues.retain(|q| authz::visible(&who, Resource::Queue(&q.name)));
        Ok(Response::new(proto::ListQueuesResponse { queues }))
    }

    async fn bind(&self, req: Request<proto::BindRequest>) -> Result<Response<proto::BindResponse>, Status> {
        let r = req.get_ref();
        let to_exchange = r.destination_kind == proto::DestinationKind::Exchange as i32;
        authz::check(&req, Operation::Bind { source: &r.source, destination: &r.destination, to_exchange, routing_key: &r.routing_key })?;
        self.broker.wait_current().await?;
        let session = self.session(&req);
        self.broker.bind(&session, req.into_inner()).await?;
        Ok(Response::new(proto::BindResponse {}))
    }

    async fn unbind(&self, req: Request<proto::UnbindRequest>) -> Result<Response<proto::UnbindResponse>, Status> {
        let r = req.get_ref();
        let to_exchange = r.destination_kind == proto::DestinationKind::Exchange as i32;
        authz::check(&req, Operation::Unbind { source: &r.source, destination: &r.destination, to_exchange, routing_key: &r.routing_key })?;
        self.broker.wait_current().await?;
        let session = self.session(&req);
        self.broker.unbind(&session, req.into_inner()).await?;
        Ok(Response::new(proto::UnbindResponse {}))
    }

    async fn list_bindings(&self, req: Request<proto::ListBindingsRequest>) -> Result<Response<proto::ListBindingsResponse>, Status> {
        let who = authz::caller(&req);
        let mut bindings = self.broker.list_bindings().await;
        bindings.retain(|b| {
            let dest = if b.destination_kind == proto::DestinationKind::Exchange as i32 {
                Resource::Exchange(&b.destination)
            } else {
                Resource::Queue(&b.destination)
            };
            authz::visible(&who, Resource::Exchange(&b.source)) || authz::visible(&who, dest)
        });
        Ok(Response::new(proto::ListBindingsResponse { bindings }))
    }

    async fn publish(&self, req: Request<proto::PublishRequest>) -> Result<Response<proto::PublishResponse>, Status> {
        if self.broker.is_shutting_down() {
            return Err(Error::ShuttingDown.into());
        }
        self.broker.wait_current().await?;
        // While a resource alarm is raised, wait (bounded) for it to clear.
        let alarms = crate::alarms::global();
        if alarms.blocked() {
            tokio::select! {
                cleared = alarms.wait_clear_for(self.publish_block_timeout) => cleared?,
                _ = self.shutdown.cancelled() => return Err(Error::ShuttingDown.into()),
            }
        }
        // Every message is checked before any is published: a batch is
        // refused whole.
        let (who, peer) = auth::authenticated(&req);
        for m in &req.get_ref().messages {
            authz::authorize(&who, &peer, &Operation::Publish { exchange: &m.exchange, routing_key: &m.routing_key })?;
        }
        let messages = req.into_inner().messages;
        let mut pending = Vec::with_capacity(messages.len());
        for (i, mut msg) in messages.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _span = crate::telemetry::publish_span(&mut msg);
            self.broker.publish(msg, i as u64, ConfirmSink::Oneshot(tx)).await;
            pending.push((i as u64, rx));
        }
        let mut confirms = Vec::with_capacity(pending.len());
        for (seq, rx) in pending {
            confirms.push(
                rx.await
                    .unwrap_or_else(|_| confirm::immediate(seq, proto::ConfirmStatus::Rejected, "the broker stopped before confirming")),
            );
        }
        Ok(Response::new(proto::PublishResponse { confirms }))
    }

    type PublishStreamStream = BoxStream<proto::Confirm>;

    async fn publish_stream(
        &self,
        req: Request<Streaming<proto::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        if self.broker.is_shutting_down() {
            return Err(Error::ShuttingDown.into());
        }
        self.broker.wait_current().await?;
        let session = self.session(&req);
        let (who, peer) = auth::authenticated(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel::<proto::Confirm>();
        // A message the user may not publish ends the stream with
        // PERMISSION_DENIED after the confirms already owed (AMQP closes
        // the channel).
        let (denied_tx, denied_rx) = tokio::sync::oneshot::channel::<Status>();
        let window = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
        let broker = self.broker.clone();
        let shutdown = self.shutdown.clone();
        let alarms = crate::alarms::global();
        {
            let window = window.clone();
            tokio::spawn(async move {
                let _session = session;
                let mut denied_tx = Some(denied_tx);
                // The last (exchange, routing key) allowed: a stream usually
                // publishes to one place.
                let mut allowed: Option<(String, String)> = None;
                loop {
                    // Wait for room before reading: a publisher that does not
                    // read its confirms is slowed down, not buffered.
                    // A client that stops reading its confirms and then goes
                    // away must not leave this task (and its session) behind:
                    // its response stream closing ends the wait too.
                    let permit = tokio::select! {
                        p = window.acquire() => match p { Ok(p) => p, Err(_) => break },
                        _ = tx.closed() => break,
                        _ = shutdown.cancelled() => break,
                    };
                    // While a resource alarm is raised the stream is not
                    // read: HTTP/2 flow control pushes back on the client.
                    if !alarms.wait_clear_unless(&shutdown).await {
                        break;
                    }
                    let next = tokio::select! {
                        m = inbound.message() => m,
                        _ = shutdown.cancelled() => break,
                    };
                    match next {
                        Ok(Some(req)) => {
                            permit.forget();
                            // A message that arrived as an alarm was raised
                            // waits for it to clear as well.
                            if !alarms.wait_clear_unless(&shutdown).await {
                                break;
                            }
                            match req.message {
                                Some(msg)
                                    if !allowed.as_ref().is_some_and(|(x, k)| *x == msg.exchange && *k == msg.routing_key)
                                        && authz::authorize(
                                            &who,
                                            &peer,
                                            &Operation::Publish { exchange: &msg.exchange, routing_key: &msg.routing_key },
                                        )
                                        .map(|()| allowed = Some((msg.exchange.clone(), msg.routing_key.clone())))
                                        .map_err(|status| {
                                            if let Some(d) = denied_tx.take() {
                                                let _ = d.send(status);
                                            }
                                        })
                                        .is_err() =>
                                {
                                    break;
                                }
                                Some(mut msg) => {
                                    let _span = crate::telemetry::publish_span(&mut msg);
                                    broker.publish(msg, req.seq, ConfirmSink::Stream(tx.clone())).await
                                }
                                None => {
                                    let _ =
                                        tx.send(confirm::immediate(req.seq, proto::ConfirmStatus::Rejected, "request carries no message"));
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "publish stream ended with an error");
                            break;
                        }
                    }
                }
                // Dropping our sender: the response ends once every
                // outstanding confirm has been sent.
            });
        }
        let out = UnboundedReceiverStream::new(rx).map(move |c| {
            window.add_permits(1);
            Ok(c)
        });
        let denied = futures::stream::once(denied_rx).filter_map(|d| futures::future::ready(d.ok().map(Err)));
        Ok(Response::new(Box::pin(out.chain(denied))))
    }

    type ConsumeStream = BoxStream<proto::ConsumeResponse>;

    async fn consume(&self, req: Request<Streaming<proto::ConsumeRequest>>) -> Result<Response<Self::ConsumeStream>, Status> {
        self.broker.wait_current().await?;
        let session = self.session(&req);
        let (who, peer) = auth::authenticated(&req);
        let mut inbound = req.into_inner();
        // A stream that never subscribes would hold its slot (and the
        // connection's stream limit) forever: it gets a bounded wait.
        let limit = self.consume_subscribe_timeout;
        let first = tokio::select! {
            first = tokio::time::timeout(limit, inbound.message()) => first.map_err(|_| {
                Status::resource_exhausted(format!(
                    "no subscribe request within {} of opening the consume stream (consume_subscribe_timeout)",
                    crate::config::show_duration(limit)
                ))
            })??,
            _ = self.shutdown.cancelled() => return Err(Error::ShuttingDown.into()),
        };
        let first = first.ok_or_else(|| Status::invalid_argument("the stream closed before a subscribe request"))?;
        let Some(proto::consume_request::Request::Subscribe(sub)) = first.request else {
            return Err(Status::invalid_argument("the first request on a consume stream must be subscribe"));
        };
        authz::authorize(&who, &peer, &Operation::Consume { queue: &sub.queue })?;
        let traces = crate::telemetry::ConsumeTraces::new(&sub.queue, sub.auto_ack);
        let Subscription { queue, consumer, tag, events } = self.broker.subscribe(&session, sub).await?;
        let guard = Arc::new(Unsubscribe { tx: queue.tx.clone(), consumer });
        // Client → queue: acknowledgements.
        {
            let guard = guard.clone();
            let shutdown = self.shutdown.clone();
            let traces = traces.clone();
            tokio::spawn(async move {
                let _session = session;
                loop {
                    let next = tokio::select! {
                        m = inbound.message() => m,
                        _ = shutdown.cancelled() => return,
                    };
                    let cmd = match next {
                        Ok(Some(r)) => match r.request {
                            Some(proto::consume_request::Request::Ack(a)) => {
                                if let Some(t) = &traces {
                                    t.settle("ack", a.delivery_tag, a.multiple, None);
                                }
                                QueueCmd::Ack { consumer, tag: a.delivery_tag, multiple: a.multiple }
                            }
                            Some(proto::consume_request::Request::Nack(n)) => {
                                if let Some(t) = &traces {
                                    t.settle("nack", n.delivery_tag, n.multiple, Some(n.requeue));
                                }
                                QueueCmd::Nack { consumer, tag: n.delivery_tag, multiple: n.multiple, requeue: n.requeue }
                            }
                            Some(proto::consume_request::Request::Reject(n)) => {
                                if let Some(t) = &traces {
                                    t.settle("reject", n.delivery_tag, n.multiple, Some(n.requeue));
                                }
                                QueueCmd::Nack { consumer, tag: n.delivery_tag, multiple: n.multiple, requeue: n.requeue }
                            }
                            Some(proto::consume_request::Request::Qos(q)) => QueueCmd::Qos { consumer, prefetch: q.prefetch },
                            Some(proto::consume_request::Request::Cancel(_)) => break,
                            Some(proto::consume_request::Request::Subscribe(_)) | None => {
                                // One subscription per stream: end it.
                                tracing::debug!("protocol error on a consume stream: second subscribe or empty request");
                                break;
                            }
                        },
                        // Half-closed: the client may still read deliveries
                        // (auto-ack, grpcurl); the response side decides.
                        Ok(None) => return,
                        Err(_) => break,
                    };
                    if guard.tx.send(cmd).await.is_err() {
                        return;
                    }
                }
                guard.send();
            });
        }
        // Queue → client: deliveries. Dropping this stream (the call ended)
        // unsubscribes.
        let ok_tag = tag.to_string();
        let first = futures::stream::once(async move {
            Ok(proto::ConsumeResponse {
                response: Some(proto::consume_response::Response::SubscribeOk(proto::SubscribeOk { consumer_tag: ok_tag })),
            })
        });
        let broker = self.broker.clone();
        let rest = events.map(move |ev| {
            let _keep = &guard;
            match ev {
                ConsumerEvent::Delivery(d, _) => {
                    broker.count_deliveries(1);
                    if let Some(t) = &traces {
                        t.deliver(&d);
                    }
                    Ok(proto::ConsumeResponse { response: Some(proto::consume_response::Response::Delivery(*d)) })
                }
                ConsumerEvent::Cancelled(reason) => Ok(proto::ConsumeResponse {
                    response: Some(proto::consume_response::Response::Cancelled(proto::Cancelled {
                        consumer_tag: tag.to_string(),
                        reason,
                    })),
                }),
                ConsumerEvent::Failed(e) => Err(Status::from(e)),
            }
        });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }

    async fn get(&self, req: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        authz::check(&req, Operation::Get { queue: &req.get_ref().queue })?;
        self.broker.wait_current().await?;
        let session = self.session(&req);
        let req = req.into_inner();
        let queue = req.queue.clone();
        let deliveries = self.broker.get(&session, req).await?;
        crate::telemetry::get_spans(&queue, &deliveries);
        Ok(Response::new(proto::GetResponse { deliveries }))
    }

    async fn list_consumers(&self, req: Request<proto::ListConsumersRequest>) -> Result<Response<proto::ListConsumersResponse>, Status> {
        let who = authz::caller(&req);
        let mut consumers = self.broker.list_consumers().await;
        consumers.retain(|c| authz::visible(&who, Resource::Queue(&c.queue)));
        Ok(Response::new(proto::ListConsumersResponse { consumers }))
    }

    async fn status(&self, req: Request<proto::StatusRequest>) -> Result<Response<proto::StatusResponse>, Status> {
        authz::check(&req, Operation::Status)?;
        let mut status = self.broker.status().await;
        status.data_dir = self.data_dir.clone();
        status.grpc_addr = self.grpc_addr.clone();
        Ok(Response::new(status))
    }

    async fn cluster_status(&self, req: Request<proto::ClusterStatusRequest>) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        authz::check(&req, Operation::ClusterStatus)?;
        Ok(Response::new(self.broker.cluster_status().await))
    }

    async fn quorum_critical(&self, req: Request<proto::QuorumCriticalRequest>) -> Result<Response<proto::QuorumCriticalResponse>, Status> {
        authz::check(&req, Operation::QuorumCritical)?;
        let queues = self.broker.quorum_critical(req.into_inner().node).await?;
        Ok(Response::new(proto::QuorumCriticalResponse { queues }))
    }

    async fn grow_queues(&self, req: Request<proto::GrowQueuesRequest>) -> Result<Response<proto::MembershipChangeResponse>, Status> {
        authz::check(&req, Operation::GrowQueues)?;
        Ok(Response::new(self.broker.grow_queues(req.into_inner()).await?))
    }

    async fn shrink_queues(&self, req: Request<proto::ShrinkQueuesRequest>) -> Result<Response<proto::MembershipChangeResponse>, Status> {
        authz::check(&req, Operation::ShrinkQueues)?;
        Ok(Response::new(self.broker.shrink_queues(req.into_inner()).await?))
    }

    async fn rebalance_queues(
        &self,
        req: Request<proto::RebalanceQueuesRequest>,
    ) -> Result<Response<proto::RebalanceQueuesResponse>, Status> {
        authz::check(&req, Operation::RebalanceQueues)?;
        Ok(Response::new(self.broker.rebalance_queues(req.into_inner()).await?))
    }
}

/// A string argument (`alternate-exchange`, `x-dead-letter-exchange`), for
/// the permission check.
fn string_arg<'a>(args: &'a std::collections::BTreeMap<String, proto::Value>, key: &str) -> Option<&'a str> {
    match args.get(key).and_then(|v| v.kind.as_ref()) {
        Some(proto::value::Kind::String(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// Unsubscribes a consumer when the last handle on it goes (the response
/// stream was dropped, or the request stream failed).
struct Unsubscribe {
    tx: mpsc::Sender<QueueCmd>,
    consumer: u64,
}

impl Unsubscribe {
    fn send(&self) {
        let cmd = QueueCmd::Unsubscribe { consumer: self.consumer };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let tx = self.tx.clone();
            rt.spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        self.send();
    }
}
