//! The owner task of one queue: receives commands, applies them to the
//! [`QueueState`], and carries out the effects — one store batch per round
//! of commands, confirms after the batch is durable, deliveries to consumer
//! channels, refill and timer reads, dead-letter routing.
//!
//! The task sleeps until its next command or its state's next deadline
//! (an expiry, a delay, `x-expires`), whichever comes first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use warren_client::proto;

use super::deadletter;
use super::read::{read_refill, read_timers};
use super::state::{ConsumerId, DeadLetter, Effects, EnqueueOutcome, GetOutcome, OutDelivery, QueueState};
use super::{ConsumerEvent, QueueCmd, QueueRef, QueueShared};
use crate::confirm::{ConfirmTracker, PartOutcome};
use crate::error::Error;
use crate::model::{MessageData, StoredMessage, now_ms};
use crate::store::keys;
use crate::store::{Cf, Op, Store, WriteRequest};
use crate::topology::Snapshot;

/// Commands applied per round before effects are flushed: larger rounds mean
/// bigger batches, smaller ones lower latency.
const ROUND: usize = 256;

/// Capacity of a queue's command channel; publishers wait when it is full.
pub const QUEUE_CHANNEL: usize = 4096;

/// What the task tells the broker.
#[derive(Debug)]
pub enum QueueEvent {
    /// An auto-delete queue lost its last consumer.
    AutoDelete { id: u64, name: Arc<str> },
    /// A queue with `x-expires` went unused for that long.
    Expired { id: u64, name: Arc<str> },
}

/// What the task needs from the rest of the broker.
#[derive(Clone)]
pub struct TaskEnv {
    pub store: Store,
    pub events: mpsc::UnboundedSender<QueueEvent>,
    /// The routing snapshot, for dead-lettering.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
}

/// A dead-lettered message to hand to another queue once the batch that
/// moves it is durable.
enum Handoff {
    Adopt { tx: mpsc::Sender<QueueCmd>, inbox_key: Vec<u8>, data: Arc<MessageData> },
    Transient { tx: mpsc::Sender<QueueCmd>, data: Arc<MessageData> },
}

impl Handoff {
    async fn send(self) {
        let _ = match self {
            Handoff::Adopt { tx, inbox_key, data } => tx.send(QueueCmd::Adopt { inbox_key: Some(inbox_key), data }).await,
            Handoff::Transient { tx, data } => tx.send(QueueCmd::Adopt { inbox_key: None, data }).await,
        };
    }
}

/// Where a delete's outcome goes: the message count and the writes that
/// remove the queue's data.
type DeleteReply = oneshot::Sender<crate::error::Result<(u64, Vec<Op>)>>;

struct ConsumerSink {
    tag: Arc<str>,
    tx: mpsc::Sender<ConsumerEvent>,
    waiting: bool,
}

pub struct QueueTask {
    state: QueueState,
    auto_delete: bool,
    store: Store,
    rx: mpsc::Receiver<QueueCmd>,
    me: mpsc::WeakSender<QueueCmd>,
    shared: Arc<QueueShared>,
    events: mpsc::UnboundedSender<QueueEvent>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    runtime: tokio::runtime::Handle,
    /// Dead-lettered messages found in the inbox at recovery.
    inbox: Vec<(Vec<u8>, StoredMessage)>,
    /// The `x-expires` event was sent for the current idle period.
    expiry_sent: bool,
    sinks: HashMap<ConsumerId, ConsumerSink>,
    pending_gets: Vec<(usize, bool, oneshot::Sender<Vec<proto::Delivery>>)>,
    stopped: bool,
    /// A delete's reply, sent once this round's writes are submitted so
    /// that the caller's removal batch is ordered after them.
    delete_reply: Option<(DeleteReply, u64)>,
}

/// Starts the owner task of `state`; returns its handle. `inbox` holds
/// dead-lettered messages a crash left in the queue's inbox.
pub fn spawn(state: QueueState, auto_delete: bool, env: TaskEnv, inbox: Vec<(Vec<u8>, StoredMessage)>) -> QueueRef {
    let (tx, rx) = mpsc::channel(QUEUE_CHANNEL);
    let shared = Arc::new(QueueShared::default());
    shared.publish(state.stats());
    let handle = QueueRef { id: state.id, name: state.name.clone(), tx: tx.clone(), shared: shared.clone() };
    let task = QueueTask {
        state,
        auto_delete,
        store: env.store,
        rx,
        me: tx.downgrade(),
        shared,
        events: env.events,
        snapshot: env.snapshot,
        runtime: tokio::runtime::Handle::current(),
        inbox,
        expiry_sent: false,
        sinks: HashMap::new(),
        pending_gets: Vec::new(),
        stopped: false,
        delete_reply: None,
    };
    tokio::spawn(task.run());
    handle
}

impl QueueTask {
    async fn run(mut self) {
        // A recovered queue takes what its inbox holds, loads its window and
        // looks at its timers right away.
        let mut fx = Effects::default();
        self.state.set_now(now_ms());
        for (key, stored) in std::mem::take(&mut self.inbox) {
            self.state.adopt(Some(key), Arc::new(stored.into_data()), &mut fx);
        }
        self.state.dispatch(&mut fx, &mut |_| 0);
        self.state.poll_timers(&mut fx);
        self.flush(fx, Vec::new());
        loop {
            let sleep = self.sleep_duration();
            let first = tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => Some(cmd),
                    None => break,
                },
                _ = tokio::time::sleep(sleep.unwrap_or(Duration::MAX)), if sleep.is_some() => None,
            };
            self.state.set_now(now_ms());
            let mut fx = Effects::default();
            let mut synced: Vec<Arc<ConfirmTracker>> = Vec::new();
            if let Some(cmd) = first {
                self.handle(cmd, &mut fx, &mut synced);
                let mut n = 1;
                while n < ROUND && !self.stopped {
                    match self.rx.try_recv() {
                        Ok(cmd) => self.handle(cmd, &mut fx, &mut synced),
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            if !self.stopped {
                let sinks = &self.sinks;
                self.state.dispatch(&mut fx, &mut |id| sinks.get(&id).map_or(0, |s| s.tx.capacity()));
                self.state.poll_timers(&mut fx);
                self.check_expires();
            }
            self.flush(fx, synced);
            if let Some((reply, count)) = self.delete_reply.take() {
                let _ = reply.send(Ok((count, self.state.delete_ops())));
            }
            if self.stopped {
                break;
            }
        }
        self.fail_pending();
    }

    /// The task is stopping: commands already queued to it get an answer
    /// instead of vanishing. A publish waiting here is confirmed as not
    /// taken by this queue (so the publisher's confirm still arrives); the
    /// other commands' replies are dropped, which their callers see as
    /// "queue not found".
    fn fail_pending(&mut self) {
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let QueueCmd::Enqueue { confirm: Some(c), .. } = cmd {
                c.part_done(PartOutcome::Dropped);
            }
        }
    }

    /// How long to sleep before the state's next deadline, if it has one.
    fn sleep_duration(&self) -> Option<Duration> {
        let deadline = if self.expiry_sent {
            // The x-expires event is out; only expiry and delays matter.
            let mut s = self.state.next_deadline();
            if self.state.unused_too_long() {
                s = None;
            }
            s
        } else {
            self.state.next_deadline()
        }?;
        // Wake a millisecond late so that `now > deadline` holds.
        Some(Duration::from_millis(deadline.saturating_sub(now_ms()).saturating_add(1)))
    }

    /// Tells the broker once when an `x-expires` queue has gone unused too
    /// long; it deletes the queue unless it is in use again.
    fn check_expires(&mut self) {
        if !self.state.unused_too_long() {
            self.expiry_sent = false;
        } else if !self.expiry_sent {
            self.expiry_sent = true;
            let _ = self.events.send(QueueEvent::Expired { id: self.state.id, name: self.state.name.clone() });
        }
    }

    fn handle(&mut self, cmd: QueueCmd, fx: &mut Effects, synced: &mut Vec<Arc<ConfirmTracker>>) {
        match cmd {
            QueueCmd::Enqueue { data, confirm, delay_ms } => {
                let _span = crate::telemetry::enqueue_span(&data.properties, &self.state.name);
                let outcome = self.state.enqueue(data, delay_ms, fx);
                if let Some(c) = confirm {
                    match outcome {
                        EnqueueOutcome::Enqueued { needs_sync: true } => synced.push(c),
                        EnqueueOutcome::Enqueued { needs_sync: false } => c.part_done(PartOutcome::Enqueued),
                        EnqueueOutcome::Duplicate => c.part_done(PartOutcome::Duplicate),
                        EnqueueOutcome::Rejected(reason) => c.part_done(PartOutcome::Rejected(reason)),
                    }
                }
            }
            QueueCmd::Adopt { inbox_key, data } => self.state.adopt(inbox_key, data, fx),
            QueueCmd::Touch => self.state.touch(),
            QueueCmd::TimerDone { epoch, result } => match result {
                Ok(result) => self.state.timer_done(epoch, result, fx),
                Err(e) => {
                    tracing::error!(queue = %self.state.name, error = %e, "reading due timers failed; retrying");
                    self.state.timer_failed();
                }
            },
            QueueCmd::Subscribe { spec, sink, reply } => {
                let tag = spec.tag.clone();
                match self.state.add_consumer(spec) {
                    Ok(id) => {
                        self.sinks.insert(id, ConsumerSink { tag, tx: sink, waiting: false });
                        let _ = reply.send(Ok(id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            QueueCmd::Ack { consumer, tag, multiple } => {
                let unacked = self.state.stats().unacked;
                match self.state.ack(consumer, tag, multiple, fx) {
                    Ok(()) => crate::metrics::global().acked(unacked.saturating_sub(self.state.stats().unacked)),
                    Err(e) => self.fail_consumer(consumer, e, fx),
                }
            }
            QueueCmd::Nack { consumer, tag, multiple, requeue } => {
                let unacked = self.state.stats().unacked;
                match self.state.nack(consumer, tag, multiple, requeue, fx) {
                    Ok(()) => crate::metrics::global().nacked(unacked.saturating_sub(self.state.stats().unacked)),
                    Err(e) => self.fail_consumer(consumer, e, fx),
                }
            }
            QueueCmd::Qos { consumer, prefetch } => self.state.set_prefetch(consumer, prefetch),
            QueueCmd::Unsubscribe { consumer } => self.remove_consumer(consumer, fx),
            QueueCmd::Get { max, ack, reply } => self.get(max, ack, reply, fx),
            QueueCmd::Purge { reply } => {
                let n = self.state.purge(fx);
                let _ = reply.send(n);
            }
            QueueCmd::Delete { if_unused, if_empty, reason, reply } => {
                if if_unused && self.state.has_consumers() {
                    let n = self.state.stats().consumers;
                    let _ = reply.send(Err(Error::PreconditionFailed(format!("queue '{}' is in use ({n} consumer(s))", self.state.name))));
                    return;
                }
                // Delayed messages are messages too: an "if empty" delete
                // must not destroy them.
                let count = self.state.message_count() + self.state.stats().delayed;
                if if_empty && count > 0 {
                    let _ = reply
                        .send(Err(Error::PreconditionFailed(format!("queue '{}' is not empty ({count} message(s))", self.state.name))));
                    return;
                }
                self.cancel_all(&reason, fx);
                self.delete_reply = Some((reply, count));
                self.stopped = true;
            }
            QueueCmd::Consumers { reply } => {
                let _ = reply.send(self.state.consumers());
            }
            QueueCmd::Refilled { epoch, result } => match result {
                Ok((entries, exhausted)) => {
                    self.state.refilled(epoch, entries, exhausted, fx);
                    let gets = std::mem::take(&mut self.pending_gets);
                    for (max, ack, reply) in gets {
                        self.get(max, ack, reply, fx);
                    }
                }
                Err(e) => {
                    tracing::error!(queue = %self.state.name, error = %e, "reading the backlog failed; retrying in a second");
                    self.state.refill_failed(fx);
                    let me = self.me.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Some(me) = me.upgrade() {
                            let _ = me.send(QueueCmd::Tick).await;
                        }
                    });
                }
            },
            QueueCmd::Tick => {}
            QueueCmd::CancelConsumers { reason, reply } => {
                self.cancel_all(&reason, fx);
                let _ = reply.send(());
            }
            QueueCmd::Writable { consumer } => {
                if let Some(s) = self.sinks.get_mut(&consumer) {
                    s.waiting = false;
                }
            }
            QueueCmd::Shutdown { reply } => {
                self.cancel_all("broker is shutting down", fx);
                let _ = reply.send(());
                self.stopped = true;
            }
        }
    }

    fn get(&mut self, max: usize, ack: bool, reply: oneshot::Sender<Vec<proto::Delivery>>, fx: &mut Effects) {
        match self.state.get(max.max(1), ack, fx) {
            GetOutcome::Messages(ds) => {
                crate::metrics::global().deliveries(&ds);
                let left = self.state.stats().ready;
                let out = ds
                    .iter()
                    .map(|d| {
                        let mut p = to_proto(d, "");
                        p.message_count = left;
                        p
                    })
                    .collect();
                let _ = reply.send(out);
            }
            GetOutcome::NeedRefill => self.pending_gets.push((max, ack, reply)),
        }
    }

    fn remove_consumer(&mut self, consumer: ConsumerId, fx: &mut Effects) {
        self.sinks.remove(&consumer);
        if self.state.remove_consumer(consumer, fx) && self.state.should_auto_delete(self.auto_delete) {
            let _ = self.events.send(QueueEvent::AutoDelete { id: self.state.id, name: self.state.name.clone() });
        }
    }

    fn fail_consumer(&mut self, consumer: ConsumerId, error: Error, fx: &mut Effects) {
        if let Some(sink) = self.sinks.get(&consumer) {
            send_last(&sink.tx, ConsumerEvent::Failed(error));
        }
        self.remove_consumer(consumer, fx);
    }

    /// Ends every subscription; unacknowledged messages return to the queue.
    fn cancel_all(&mut self, reason: &str, fx: &mut Effects) {
        for (id, sink) in std::mem::take(&mut self.sinks) {
            send_last(&sink.tx, ConsumerEvent::Cancelled(reason.to_string()));
            self.state.remove_consumer(id, fx);
        }
    }

    /// Routes a dead-lettered message through the queue's dead-letter
    /// exchange. Persistent messages bound for durable queues are written to
    /// the targets' inboxes in `ops` (the batch that removes them here);
    /// the rest is handed over directly.
    fn route_dead_letter(&self, dl: DeadLetter, ops: &mut Vec<Op>, handoffs: &mut Vec<Handoff>) {
        let Some(dlx) = self.state.args.dead_letter_exchange.as_deref() else { return };
        let data = deadletter::dead_lettered(
            &dl.data,
            &self.state.name,
            dl.reason,
            self.state.now(),
            dlx,
            self.state.args.dead_letter_routing_key.as_deref(),
        );
        let snap = self.snapshot.load();
        let targets: Vec<Arc<str>> = if dlx.is_empty() {
            snap.queues.get(data.routing_key.as_str()).map(|e| vec![e.def.name.clone()]).unwrap_or_default()
        } else {
            snap.routes.route(dlx, &data.routing_key, &data.properties.headers).queues
        };
        if targets.is_empty() {
            tracing::debug!(queue = %self.state.name, dlx, routing_key = %data.routing_key, "dead-lettered message routes nowhere; dropped");
            return;
        }
        let data = Arc::new(data);
        for target in targets {
            let Some(entry) = snap.queues.get(&target) else { continue };
            if deadletter::is_cycle(&data, &target) {
                tracing::debug!(queue = %self.state.name, target = %target, "dead-letter cycle; dropped for that queue");
                continue;
            }
            let tx = entry.handle.tx.clone();
            if entry.def.durable && !entry.def.exclusive && data.persistent() {
                let inbox_key = keys::encode_inbox(entry.def.id, self.state.next_seq()).to_vec();
                ops.push(Op::Put(Cf::Inbox, inbox_key.clone(), StoredMessage::from_data(&data, self.state.now()).encode_to_vec()));
                handoffs.push(Handoff::Adopt { tx, inbox_key, data: data.clone() });
            } else {
                handoffs.push(Handoff::Transient { tx, data: data.clone() });
            }
        }
    }

    fn flush(&mut self, mut fx: Effects, synced: Vec<Arc<ConfirmTracker>>) {
        let mut handoffs: Vec<Handoff> = Vec::new();
        let metrics = crate::metrics::global();
        if fx.expired > 0 {
            metrics.expired(fx.expired);
        }
        for reason in &fx.dropped {
            metrics.dropped(reason.as_str());
        }
        for dl in std::mem::take(&mut fx.dead_letters) {
            metrics.dead_lettered(dl.reason.as_str());
            self.route_dead_letter(dl, &mut fx.ops, &mut handoffs);
        }
        if !handoffs.is_empty() {
            fx.sync = true;
        }
        if !fx.counters.is_zero() {
            fx.ops.push(Op::Merge(Cf::QueueState, keys::encode_queue_state(self.state.id).to_vec(), fx.counters.encode()));
        }
        if !fx.ops.is_empty() {
            let runtime = self.runtime.clone();
            let name = self.state.name.clone();
            let done: Option<crate::store::Completion> = if synced.is_empty() && handoffs.is_empty() {
                None
            } else {
                Some(Box::new(move |result| {
                    let outcome = match &result {
                        Ok(()) => PartOutcome::Enqueued,
                        Err(e) => PartOutcome::Rejected(format!("storage failure: {e}")),
                    };
                    for c in synced {
                        c.part_done(outcome.clone());
                    }
                    match result {
                        // Hand dead letters over only once their move is
                        // durable; the targets may be this very queue.
                        Ok(()) if !handoffs.is_empty() => {
                            runtime.spawn(async move {
                                for h in handoffs {
                                    h.send().await;
                                }
                            });
                        }
                        Ok(()) => {}
                        Err(e) => tracing::error!(queue = %name, error = %e, "a batch with dead-lettered messages failed"),
                    }
                }))
            };
            self.store.submit(WriteRequest { ops: fx.ops, sync: fx.sync, done });
        } else {
            for c in synced {
                c.part_done(PartOutcome::Enqueued);
            }
            // Transient dead letters from transient messages: nothing to
            // write first.
            if !handoffs.is_empty() {
                self.runtime.spawn(async move {
                    for h in handoffs {
                        h.send().await;
                    }
                });
            }
        }
        let mut gone: Vec<ConsumerId> = Vec::new();
        crate::metrics::global().deliveries(&fx.deliveries);
        for d in fx.deliveries {
            let Some(sink) = self.sinks.get(&d.consumer) else {
                continue;
            };
            let event = ConsumerEvent::Delivery(Box::new(to_proto(&d, &sink.tag)));
            if sink.tx.try_send(event).is_err() {
                // Closed (the consumer went away) or, against our own
                // accounting, full: either way the subscription ends and its
                // unacked messages (this one included) are requeued.
                gone.push(d.consumer);
            }
        }
        for (id, error) in fx.consumer_errors {
            if let Some(sink) = self.sinks.get(&id) {
                send_last(&sink.tx, ConsumerEvent::Failed(error));
            }
            gone.push(id);
        }
        if let Some(req) = fx.timer_read {
            let store = self.store.clone();
            let me = self.me.clone();
            let queue = self.state.id;
            tokio::spawn(async move {
                let result = store.read_after_writes(move |engine| read_timers(engine, queue, &req)).await;
                if let Some(tx) = me.upgrade() {
                    let _ = tx.send(QueueCmd::TimerDone { epoch: req.epoch, result }).await;
                }
            });
        }
        if fx.expired > 0 || !fx.dropped.is_empty() {
            tracing::debug!(queue = %self.state.name, expired = fx.expired, dropped = fx.dropped.len(), "messages left the queue");
        }
        if let Some(req) = fx.refill {
            let store = self.store.clone();
            let me = self.me.clone();
            let queue = self.state.id;
            tokio::spawn(async move {
                let result = store.read_after_writes(move |engine| read_refill(engine, queue, &req)).await;
                if let Some(tx) = me.upgrade() {
                    let _ = tx.send(QueueCmd::Refilled { epoch: req.epoch, result }).await;
                }
            });
        }
        if !gone.is_empty() {
            let mut fx = Effects::default();
            for id in gone {
                self.remove_consumer(id, &mut fx);
            }
            self.flush(fx, Vec::new());
            // Requeued messages go to the remaining consumers next round.
            if let Some(tx) = self.me.upgrade() {
                let _ = tx.try_send(QueueCmd::Tick);
            }
        }
        self.watch_full_consumers();
        self.shared.publish(self.state.stats());
    }

    /// For consumers whose channel is full while messages wait, wake the task
    /// when room frees up.
    fn watch_full_consumers(&mut self) {
        if self.state.stats().ready == 0 {
            return;
        }
        for (id, sink) in self.sinks.iter_mut() {
            if sink.waiting || sink.tx.capacity() > 0 {
                continue;
            }
            sink.waiting = true;
            let tx = sink.tx.clone();
            let me = self.me.clone();
            let id = *id;
            tokio::spawn(async move {
                if let Ok(permit) = tx.reserve().await {
                    drop(permit);
                }
                if let Some(me) = me.upgrade() {
                    let _ = me.send(QueueCmd::Writable { consumer: id }).await;
                }
            });
        }
    }
}

/// Sends a final event without blocking the task; if the channel is full it
/// is delivered when room frees up.
fn send_last(tx: &mpsc::Sender<ConsumerEvent>, event: ConsumerEvent) {
    if let Err(mpsc::error::TrySendError::Full(event)) = tx.try_send(event) {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(event).await;
        });
    }
}

fn to_proto(d: &OutDelivery, consumer_tag: &str) -> proto::Delivery {
    proto::Delivery {
        delivery_tag: d.tag,
        redelivered: d.redelivered,
        delivery_count: d.msg.delivery_count,
        exchange: d.msg.data.exchange.clone(),
        routing_key: d.msg.data.routing_key.clone(),
        properties: Some(d.msg.data.properties.clone()),
        body: d.msg.data.body.clone(),
        consumer_tag: consumer_tag.to_string(),
        message_count: 0,
    }
}
