//! The owner task of one queue: receives commands, applies them to the
//! [`QueueState`], and carries out the effects — one store batch per round
//! of commands, confirms after the batch is durable, deliveries to consumer
//! channels, refill reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use warren_client::proto;

use super::read::read_refill;
use super::state::{ConsumerId, Effects, GetOutcome, OutDelivery, QueueState};
use super::{ConsumerEvent, QueueCmd, QueueRef, QueueShared};
use crate::confirm::{ConfirmTracker, PartOutcome};
use crate::error::Error;
use crate::model::now_ms;
use crate::store::keys;
use crate::store::{Cf, Op, Store, WriteRequest};

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
    sinks: HashMap<ConsumerId, ConsumerSink>,
    pending_gets: Vec<(usize, bool, oneshot::Sender<Vec<proto::Delivery>>)>,
    stopped: bool,
    /// A delete's reply, sent once this round's writes are submitted so
    /// that the caller's removal batch is ordered after them.
    delete_reply: Option<(DeleteReply, u64)>,
}

/// Starts the owner task of `state`; returns its handle.
pub fn spawn(state: QueueState, auto_delete: bool, store: Store, events: mpsc::UnboundedSender<QueueEvent>) -> QueueRef {
    let (tx, rx) = mpsc::channel(QUEUE_CHANNEL);
    let shared = Arc::new(QueueShared::default());
    shared.publish(state.stats());
    let handle = QueueRef { id: state.id, name: state.name.clone(), tx: tx.clone(), shared: shared.clone() };
    let task = QueueTask {
        state,
        auto_delete,
        store,
        rx,
        me: tx.downgrade(),
        shared,
        events,
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
        // A recovered queue loads its window right away.
        let mut fx = Effects::default();
        self.state.dispatch(&mut fx, &mut |_| 0);
        self.flush(fx, Vec::new());
        while let Some(cmd) = self.rx.recv().await {
            let mut fx = Effects::default();
            let mut synced: Vec<Arc<ConfirmTracker>> = Vec::new();
            self.handle(cmd, &mut fx, &mut synced);
            let mut n = 1;
            while n < ROUND && !self.stopped {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd, &mut fx, &mut synced),
                    Err(_) => break,
                }
                n += 1;
            }
            if !self.stopped {
                let sinks = &self.sinks;
                self.state.dispatch(&mut fx, &mut |id| sinks.get(&id).map_or(0, |s| s.tx.capacity()));
            }
            self.flush(fx, synced);
            if let Some((reply, count)) = self.delete_reply.take() {
                let _ = reply.send(Ok((count, self.state.delete_ops())));
            }
            if self.stopped {
                break;
            }
        }
    }

    fn handle(&mut self, cmd: QueueCmd, fx: &mut Effects, synced: &mut Vec<Arc<ConfirmTracker>>) {
        match cmd {
            QueueCmd::Enqueue { data, confirm } => {
                let _span = crate::telemetry::enqueue_span(&data.properties, &self.state.name);
                let super::state::EnqueueOutcome::Enqueued { needs_sync } = self.state.enqueue(data, now_ms(), fx);
                if let Some(c) = confirm {
                    if needs_sync {
                        synced.push(c);
                    } else {
                        c.part_done(PartOutcome::Enqueued);
                    }
                }
            }
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
                let count = self.state.message_count();
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

    fn flush(&mut self, mut fx: Effects, synced: Vec<Arc<ConfirmTracker>>) {
        if !fx.counters.is_zero() {
            fx.ops.push(Op::Merge(Cf::QueueState, keys::encode_queue_state(self.state.id).to_vec(), fx.counters.encode()));
        }
        if !fx.ops.is_empty() {
            let done: Option<crate::store::Completion> = if synced.is_empty() {
                None
            } else {
                Some(Box::new(move |result| {
                    let outcome = match result {
                        Ok(()) => PartOutcome::Enqueued,
                        Err(e) => PartOutcome::Rejected(format!("storage failure: {e}")),
                    };
                    for c in synced {
                        c.part_done(outcome.clone());
                    }
                }))
            };
            self.store.submit(WriteRequest { ops: fx.ops, sync: fx.sync, done });
        } else {
            for c in synced {
                c.part_done(PartOutcome::Enqueued);
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
