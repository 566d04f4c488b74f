//! The load itself: producers and consumers for both brokers, written the
//! same way. A producer keeps up to `confirm_window` messages unconfirmed
//! (optionally paced to a rate); a consumer acknowledges each delivery
//! individually within its prefetch. The first 8 bytes of every body carry
//! the send time (nanoseconds since [`Ctx::epoch`], one clock: producers and
//! consumers share this process), from which the consumer computes the
//! end-to-end latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;

use crate::report::{self, latency_histogram};
use crate::workload::Workload;

/// How often a consumer waiting for messages checks whether to stop.
const POLL: Duration = Duration::from_millis(100);

/// State shared by every client of one run.
pub struct Ctx {
    /// The clock every timestamp is relative to.
    pub epoch: Instant,
    /// Messages sent before this (ns since `epoch`) are warm-up: neither
    /// counted in rates nor recorded in latencies. Set by [`Ctx::start`].
    pub measure_from_ns: AtomicU64,
    /// Producers stop sending at this time (ns since `epoch`; duration mode).
    pub producer_deadline_ns: AtomicU64,
    /// Total deliveries seen by all consumers.
    pub consumed: AtomicU64,
    /// Set once the producers are done: how many deliveries to expect.
    pub expected: AtomicU64,
    pub producers_done: AtomicBool,
    /// Consumers give up at this time (ns since `epoch`; 0 = not yet set).
    pub drain_deadline_ns: AtomicU64,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx::new()
    }
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            epoch: Instant::now(),
            measure_from_ns: AtomicU64::new(0),
            producer_deadline_ns: AtomicU64::new(u64::MAX),
            consumed: AtomicU64::new(0),
            expected: AtomicU64::new(u64::MAX),
            producers_done: AtomicBool::new(false),
            drain_deadline_ns: AtomicU64::new(0),
        }
    }

    /// Marks the start of publishing: the measured window begins after
    /// `warmup`, and producers stop after `duration` (if given). Returns the
    /// start of the measured window (ns since `epoch`).
    pub fn start(&self, warmup: Duration, duration: Option<Duration>) -> u64 {
        let now = self.now_ns();
        let from = now + warmup.as_nanos() as u64;
        self.measure_from_ns.store(from, Ordering::SeqCst);
        if let Some(d) = duration {
            self.producer_deadline_ns.store(now + d.as_nanos() as u64, Ordering::SeqCst);
        }
        from
    }

    fn measure_from(&self) -> u64 {
        self.measure_from_ns.load(Ordering::Relaxed)
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Called once every producer has finished and every confirm is in.
    pub fn producers_finished(&self, expected: u64, drain_timeout: Duration) {
        self.expected.store(expected, Ordering::SeqCst);
        self.drain_deadline_ns.store(self.now_ns() + drain_timeout.as_nanos() as u64, Ordering::SeqCst);
        self.producers_done.store(true, Ordering::SeqCst);
    }

    /// Whether consumers are done: everything expected arrived, or the
    /// drain deadline passed.
    pub fn consumers_should_stop(&self) -> bool {
        if !self.producers_done.load(Ordering::SeqCst) {
            return false;
        }
        if self.consumed.load(Ordering::SeqCst) >= self.expected.load(Ordering::SeqCst) {
            return true;
        }
        let deadline = self.drain_deadline_ns.load(Ordering::SeqCst);
        deadline > 0 && self.now_ns() >= deadline
    }

    fn producer_should_stop(&self, sent: u64, limit: Option<u64>) -> bool {
        match limit {
            Some(n) => sent >= n,
            None => self.now_ns() >= self.producer_deadline_ns.load(Ordering::Relaxed),
        }
    }
}

/// What one producer saw.
pub struct ProducerStats {
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    /// Confirmed messages sent after the warm-up.
    pub measured: u64,
    pub last_confirm_ns: u64,
    pub confirm_latency: Histogram<u64>,
}

impl ProducerStats {
    fn new() -> Self {
        ProducerStats { sent: 0, confirmed: 0, nacked: 0, measured: 0, last_confirm_ns: 0, confirm_latency: latency_histogram() }
    }

    fn on_confirm(&mut self, ctx: &Ctx, sent_ns: u64, ok: bool) {
        let now = ctx.now_ns();
        if !ok {
            self.nacked += 1;
            return;
        }
        self.confirmed += 1;
        self.last_confirm_ns = now;
        if sent_ns >= ctx.measure_from() {
            self.measured += 1;
            report::record(&mut self.confirm_latency, now.saturating_sub(sent_ns) / 1000);
        }
    }
}

/// What one consumer saw.
pub struct ConsumerStats {
    pub received: u64,
    pub measured: u64,
    pub last_receive_ns: u64,
    pub latency: Histogram<u64>,
}

impl ConsumerStats {
    fn new() -> Self {
        ConsumerStats { received: 0, measured: 0, last_receive_ns: 0, latency: latency_histogram() }
    }

    fn on_delivery(&mut self, ctx: &Ctx, body: &[u8]) {
        let now = ctx.now_ns();
        self.received += 1;
        self.last_receive_ns = now;
        ctx.consumed.fetch_add(1, Ordering::Relaxed);
        if let Some(sent_ns) = read_stamp(body)
            && sent_ns >= ctx.measure_from()
        {
            self.measured += 1;
            report::record(&mut self.latency, now.saturating_sub(sent_ns) / 1000);
        }
    }
}

/// A body of `size` bytes stamped with `sent_ns`.
pub fn stamped_body(size: usize, sent_ns: u64) -> Vec<u8> {
    let mut body = vec![0u8; size.max(8)];
    body[..8].copy_from_slice(&sent_ns.to_le_bytes());
    body
}

pub fn read_stamp(body: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(body.get(..8)?.try_into().ok()?))
}

/// The per-producer send interval for `--rate`.
fn pace(w: &Workload) -> Option<f64> {
    (w.rate > 0).then(|| w.rate as f64 / w.producers as f64)
}

/// Where producer `index` sends its `n`th message: (exchange, routing key).
fn target(w: &Workload, index: usize, n: u64) -> (String, String) {
    let q = (n as usize + index) % w.queues;
    (w.exchange.exchange_name().to_string(), w.exchange.routing_key(q, &w.queue_name(q)))
}

/// How a producer sends one message on one broker.
pub trait PublishOne {
    /// Resolves to whether the broker confirmed the message.
    type Confirm: Future<Output = bool> + Send + 'static;
    /// Sends a message (waiting only for back-pressure); returns its
    /// confirm.
    fn publish(&self, exchange: &str, key: &str, body: Vec<u8>) -> impl Future<Output = Result<Self::Confirm>> + Send;
}

/// The producer loop, the same for both brokers.
async fn produce<P: PublishOne>(w: &Workload, index: usize, ctx: &Ctx, publisher: &P) -> Result<ProducerStats> {
    let mut stats = ProducerStats::new();
    let limit = w.per_producer(index);
    let rate = pace(w);
    let keys: Vec<(String, String)> = (0..w.queues as u64).map(|n| target(w, index, n)).collect();
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    loop {
        let can_send = !ctx.producer_should_stop(stats.sent, limit) && inflight.len() < w.confirm_window;
        if !can_send {
            match inflight.next().await {
                Some((sent_ns, ok)) => stats.on_confirm(ctx, sent_ns, ok),
                None => break,
            }
            continue;
        }
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(stats.sent as f64 / r);
            if due > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    Some((sent_ns, ok)) = inflight.next(), if !inflight.is_empty() => stats.on_confirm(ctx, sent_ns, ok),
                }
                continue;
            }
        }
        let sent_ns = ctx.now_ns();
        let (exchange, key) = &keys[(stats.sent % w.queues as u64) as usize];
        let confirm = publisher.publish(exchange, key, stamped_body(w.size, sent_ns)).await?;
        stats.sent += 1;
        inflight.push(confirm.map(move |ok| (sent_ns, ok)));
        while let Some(Some((sent_ns, ok))) = inflight.next().now_or_never() {
            stats.on_confirm(ctx, sent_ns, ok);
        }
    }
    Ok(stats)
}

// ------------------------------------------------------------------ Warren

pub mod warren {
    use super::*;
    use crate::workload::QueueArg;
    use warren_client::{Client, ExchangeKind, Message, QueueOptions, Subscription};

    fn kind(w: &Workload) -> ExchangeKind {
        match w.exchange {
            crate::workload::ExchangeType::Direct => ExchangeKind::Direct,
            crate::workload::ExchangeType::Fanout => ExchangeKind::Fanout,
            crate::workload::ExchangeType::Topic => ExchangeKind::Topic,
        }
    }

    /// A durable queue with the workload's type arguments.
    pub fn queue_options(w: &Workload) -> QueueOptions {
        let mut o = QueueOptions::durable();
        for (k, v) in w.queue_type.warren_arguments() {
            o = match v {
                QueueArg::Int(i) => o.arg(k, i),
                QueueArg::Str(s) => o.arg(k, s),
            };
        }
        o
    }

    /// Declares the exchange and the durable queues (purged) and binds them.
    pub async fn setup(addr: &str, w: &Workload) -> Result<()> {
        let client = Client::connect(addr).await?;
        let exchange = w.exchange.exchange_name();
        client.declare_exchange(exchange, kind(w), warren_client::ExchangeOptions::durable()).await?;
        for (i, q) in w.queue_names().iter().enumerate() {
            client.declare_queue(q, queue_options(w)).await?;
            client.purge_queue(q).await?;
            client.bind_queue(exchange, q, &w.exchange.binding_key(i, q)).await?;
        }
        Ok(())
    }

    /// Deletes the queues and the exchange.
    pub async fn cleanup(addr: &str, w: &Workload) -> Result<()> {
        let client = Client::connect(addr).await?;
        for q in w.queue_names() {
            client.delete_queue(&q, false, false).await?;
        }
        client.delete_exchange(w.exchange.exchange_name(), false).await?;
        Ok(())
    }

    /// Ready messages in the workload's queues.
    pub async fn ready(addr: &str, w: &Workload) -> Result<u64> {
        let client = Client::connect(addr).await?;
        let mut n = 0;
        for q in w.queue_names() {
            n += client.queue_info(&q).await?.ready;
        }
        Ok(n)
    }

    struct Pub {
        publisher: warren_client::Publisher,
        persistent: bool,
    }

    fn routed(r: warren_client::Result<warren_client::Confirm>) -> bool {
        r.is_ok_and(|c| c.is_routed())
    }

    type RoutedFn = fn(warren_client::Result<warren_client::Confirm>) -> bool;

    impl PublishOne for Pub {
        type Confirm = futures::future::Map<warren_client::PendingConfirm, RoutedFn>;

        async fn publish(&self, exchange: &str, key: &str, body: Vec<u8>) -> Result<Self::Confirm> {
            let mut m = Message::new(exchange, key, body);
            if self.persistent {
                m = m.persistent();
            }
            let pending = self.publisher.send(m).await?;
            Ok(pending.map(routed as RoutedFn))
        }
    }

    pub async fn producer(addr: String, w: Arc<Workload>, index: usize, ctx: Arc<Ctx>) -> Result<ProducerStats> {
        let client = Client::connect(&addr).await?;
        let p = Pub { publisher: client.publisher().await?, persistent: w.persistent() };
        let stats = produce(&w, index, &ctx, &p).await?;
        p.publisher.close().await?;
        Ok(stats)
    }

    /// Subscribes to queue `index % queues`; `ready` is told once the
    /// subscription is active.
    pub async fn consumer(
        addr: String,
        w: Arc<Workload>,
        index: usize,
        ctx: Arc<Ctx>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Result<ConsumerStats> {
        let client = Client::connect(&addr).await?;
        let queue = w.queue_name(index % w.queues);
        let mut consumer = client.consume(Subscription::new(&queue).prefetch(w.prefetch)).await?;
        let _ = ready.send(());
        let mut stats = ConsumerStats::new();
        while !ctx.consumers_should_stop() {
            if let Some(d) = consumer.next_timeout(POLL).await? {
                stats.on_delivery(&ctx, &d.body);
                consumer.ack(d.delivery_tag).await?;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), consumer.cancel()).await;
        Ok(stats)
    }
}

// ---------------------------------------------------------------- RabbitMQ

pub mod rabbit {
    use super::*;
    use crate::workload::{QueueArg, QueueType};
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

    fn kind(w: &Workload) -> ExchangeKind {
        match w.exchange {
            crate::workload::ExchangeType::Direct => ExchangeKind::Direct,
            crate::workload::ExchangeType::Fanout => ExchangeKind::Fanout,
            crate::workload::ExchangeType::Topic => ExchangeKind::Topic,
        }
    }

    pub async fn connect(uri: &str) -> Result<Connection> {
        Connection::connect(uri, ConnectionProperties::default()).await.with_context(|| format!("cannot connect to RabbitMQ at {uri}"))
    }

    /// A durable queue (of the type `queue_arguments` says).
    fn durable() -> QueueDeclareOptions {
        QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
    }

    /// The declare arguments of the workload's queue type
    /// (`x-queue-version`, `x-queue-type`).
    pub fn queue_arguments(t: QueueType) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in t.rabbitmq_arguments() {
            let v = match v {
                QueueArg::Int(i) => AMQPValue::LongLongInt(i),
                QueueArg::Str(s) => AMQPValue::LongString(s.into()),
            };
            table.insert(k.into(), v);
        }
        table
    }

    /// Declares one durable queue of type `t`.
    pub async fn declare_queue(ch: &lapin::Channel, name: &str, t: QueueType) -> Result<()> {
        ch.queue_declare(name.into(), durable(), queue_arguments(t)).await?;
        Ok(())
    }

    pub async fn setup(uri: &str, w: &Workload) -> Result<()> {
        let conn = connect(uri).await?;
        let ch = conn.create_channel().await?;
        let exchange = w.exchange.exchange_name();
        ch.exchange_declare(
            exchange.into(),
            kind(w),
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
        for (i, q) in w.queue_names().iter().enumerate() {
            declare_queue(&ch, q, w.queue_type).await?;
            ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()).await?;
            ch.queue_bind(
                q.as_str().into(),
                exchange.into(),
                w.exchange.binding_key(i, q).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        conn.close(200, "bye".into()).await?;
        Ok(())
    }

    pub async fn cleanup(uri: &str, w: &Workload) -> Result<()> {
        let conn = connect(uri).await?;
        let ch = conn.create_channel().await?;
        for q in w.queue_names() {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        ch.exchange_delete(w.exchange.exchange_name().into(), ExchangeDeleteOptions::default()).await?;
        conn.close(200, "bye".into()).await?;
        Ok(())
    }

    /// Ready messages in the workload's queues (a passive declare each).
    pub async fn ready(uri: &str, w: &Workload) -> Result<u64> {
        let conn = connect(uri).await?;
        let ch = conn.create_channel().await?;
        let mut n = 0u64;
        for q in w.queue_names() {
            let info =
                ch.queue_declare(q.as_str().into(), QueueDeclareOptions { passive: true, ..durable() }, FieldTable::default()).await?;
            n += u64::from(info.message_count());
        }
        conn.close(200, "bye".into()).await?;
        Ok(n)
    }

    struct Pub {
        ch: lapin::Channel,
        props: BasicProperties,
    }

    fn acked(r: lapin::Result<lapin::Confirmation>) -> bool {
        r.is_ok_and(|c| c.is_ack())
    }

    type AckedFn = fn(lapin::Result<lapin::Confirmation>) -> bool;

    impl PublishOne for Pub {
        type Confirm = futures::future::Map<lapin::PublisherConfirm, AckedFn>;

        async fn publish(&self, exchange: &str, key: &str, body: Vec<u8>) -> Result<Self::Confirm> {
            let confirm =
                self.ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), &body, self.props.clone()).await?;
            Ok(confirm.map(acked as AckedFn))
        }
    }

    pub async fn producer(uri: String, w: Arc<Workload>, index: usize, ctx: Arc<Ctx>) -> Result<ProducerStats> {
        let conn = connect(&uri).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let props = if w.persistent() { BasicProperties::default().with_delivery_mode(2) } else { BasicProperties::default() };
        let stats = produce(&w, index, &ctx, &Pub { ch, props }).await?;
        let _ = conn.close(200, "bye".into()).await;
        Ok(stats)
    }

    pub async fn consumer(
        uri: String,
        w: Arc<Workload>,
        index: usize,
        ctx: Arc<Ctx>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Result<ConsumerStats> {
        let conn = connect(&uri).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(w.prefetch.min(u32::from(u16::MAX)) as u16, BasicQosOptions::default()).await?;
        let queue = w.queue_name(index % w.queues);
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                format!("warren-bench-{index}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = ready.send(());
        let mut stats = ConsumerStats::new();
        while !ctx.consumers_should_stop() {
            match tokio::time::timeout(POLL, consumer.next()).await {
                Err(_) => {}
                Ok(None) => bail!("the RabbitMQ consumer stream ended"),
                Ok(Some(d)) => {
                    let d = d?;
                    stats.on_delivery(&ctx, &d.data);
                    d.acker.ack(BasicAckOptions::default()).await?;
                }
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_round_trip_the_send_stamp() {
        let body = stamped_body(1024, 123_456_789);
        assert_eq!(body.len(), 1024);
        assert_eq!(read_stamp(&body), Some(123_456_789));
        assert_eq!(read_stamp(&[1, 2, 3]), None);
    }

    #[test]
    fn should_spread_messages_over_queues() {
        let w = Workload { queues: 3, ..Workload::default() };
        let keys: Vec<String> = (0..3).map(|n| target(&w, 1, n).1).collect();
        assert_eq!(keys, vec!["warren-bench-1", "warren-bench-2", "warren-bench-0"]);
    }

    #[test]
    fn should_stop_consumers_only_after_producers_and_all_messages() {
        let ctx = Ctx::new();
        assert!(!ctx.consumers_should_stop());
        ctx.producers_finished(2, Duration::from_secs(60));
        assert!(!ctx.consumers_should_stop());
        ctx.consumed.fetch_add(2, Ordering::SeqCst);
        assert!(ctx.consumers_should_stop());
    }
}
