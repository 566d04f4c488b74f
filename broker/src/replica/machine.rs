//! A quorum queue's state machine: applies committed [`QueueEntry`]s to a
//! replicated [`QueueState`], on every replica alike.
//!
//! What the outside world sees is not done here: deliveries, dead letters
//! and consumers that leave are sent as [`ReplicaEvent`]s, which the queue's
//! leader acts on and followers drop; the proposer on this node gets a
//! [`QueueReply`].

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::mpsc;

use super::ops::{QueueEntry, QueueOp};
use crate::error::Error;
use crate::model::{MessageData, QueueArgs, StoredMessage};
use crate::queue::QueueShared;
use crate::queue::deadletter;
use crate::queue::read::{read_refill, read_timers};
use crate::queue::state::{
    ConsumerId, ConsumerLimits, ConsumerSpec, DeathReason, Effects, EnqueueOutcome, GetOutcome, Limits, OutDelivery, QueueState, Room,
};
use crate::raft::{Applied, GroupMachine, LocalReply};
use crate::store::keys::{self, QueueId, replica};
use crate::store::overlay::Overlay;
use crate::store::{Cf, Op, Reader, StoreError};

/// What an applied entry asks the leader to do.
#[derive(Debug)]
pub enum ReplicaEvent {
    /// Hand a message to a consumer.
    Deliver(OutDelivery),
    /// A consumer left: dropped for a new leader, or failed (an unknown
    /// delivery tag).
    ConsumerGone { consumer: ConsumerId, error: Option<String> },
    /// A dead-lettered message waits in the outbox under `seq`: route it,
    /// hand it over, then propose `DeadLettered`.
    DeadLetter { seq: u64, data: Arc<MessageData> },
    /// For metrics (counted by the leader only).
    Counted { expired: u64, dropped: Vec<DeathReason>, dead_lettered: Vec<DeathReason> },
}

/// What the proposer of an entry gets back.
#[derive(Debug)]
pub enum QueueReply {
    Enqueued(Vec<EnqueueOutcome>),
    Subscribed(Result<ConsumerId, Error>),
    Done(Result<(), Error>),
    /// Deliveries, and the ready count after them.
    Got(Vec<OutDelivery>, u64),
    Purged(u64),
    /// The replies of a batch's commands, in order.
    Batch(Vec<QueueReply>),
    /// A command that could not be read or was not allowed where it was.
    Skipped,
}

/// Most read-and-apply rounds one entry may need (a refill, a timer read,
/// a refill after it...). Far above what any entry needs; a bound so that
/// a bug cannot loop.
const MAX_READ_ROUNDS: usize = 10_000;

pub struct QueueMachine {
    pub state: QueueState,
    events: mpsc::UnboundedSender<ReplicaEvent>,
    shared: Arc<QueueShared>,
}

impl QueueMachine {
    pub fn new(state: QueueState, events: mpsc::UnboundedSender<ReplicaEvent>, shared: Arc<QueueShared>) -> QueueMachine {
        shared.publish(state.stats());
        QueueMachine { state, events, shared }
    }

    /// Publishes the figures and deadlines that the queue's task and
    /// listings read without asking the machine.
    fn publish(&self) {
        self.shared.publish(self.state.stats());
        // x-expires apart from the timers: the leader deletes the queue
        // then, it does not propose a tick.
        self.shared.set_deadline(self.state.timer_deadline());
        self.shared.set_expires_at(self.state.expires_at());
        self.shared.set_expired(self.state.is_expired());
    }

    fn id(&self) -> QueueId {
        self.state.id
    }

    fn emit(&self, event: ReplicaEvent) {
        let _ = self.events.send(event);
    }

    /// Applies one command; returns the proposer's reply.
    fn command(&mut self, op: QueueOp, fx: &mut Effects, store: &mut Overlay<'_>) -> Result<QueueReply, StoreError> {
        Ok(match op {
            QueueOp::Enqueue(e) => {
                let mut outcomes = Vec::with_capacity(e.messages.len());
                for m in e.messages {
                    let (mut data, delay) = m.into_data();
                    // Quorum queues store every message, as RabbitMQ's do.
                    data.properties.persistent = true;
                    outcomes.push(self.state.enqueue(Arc::new(data), delay, fx));
                }
                QueueReply::Enqueued(outcomes)
            }
            QueueOp::Adopt(m) => {
                let (mut data, _) = m.into_data();
                data.properties.persistent = true;
                self.state.adopt(None, Arc::new(data), fx);
                QueueReply::Done(Ok(()))
            }
            QueueOp::Subscribe(s) => {
                let spec = ConsumerSpec {
                    tag: s.tag.as_str().into(),
                    prefetch: s.prefetch,
                    auto_ack: s.auto_ack,
                    exclusive: s.exclusive,
                    priority: s.priority,
                    peer: s.peer,
                    limits: Some(ConsumerLimits { max_unacked: s.max_unacked.max(1), max_unacked_bytes: s.max_unacked_bytes.max(1) }),
                };
                QueueReply::Subscribed(self.state.add_consumer(spec))
            }
            QueueOp::Unsubscribe(c) => {
                self.state.remove_consumer(c.consumer, fx);
                QueueReply::Done(Ok(()))
            }
            QueueOp::Ack(a) => {
                let r = self.state.ack(a.consumer, a.tag, a.multiple, fx);
                self.fail_consumer_on(a.consumer, &r, fx);
                QueueReply::Done(r)
            }
            QueueOp::Nack(n) => {
                let r = self.state.nack(n.consumer, n.tag, n.multiple, n.requeue, fx);
                self.fail_consumer_on(n.consumer, &r, fx);
                QueueReply::Done(r)
            }
            QueueOp::Qos(q) => {
                self.state.set_prefetch(q.consumer, q.prefetch);
                QueueReply::Done(Ok(()))
            }
            QueueOp::Settle(s) => {
                self.state.settle(s.consumer, &s.tags, fx);
                QueueReply::Done(Ok(()))
            }
            QueueOp::Get(g) => {
                // One message at a time, reading from the store between
                // takes as the window needs: what a get returns depends on
                // the queue, never on how much of it a replica holds in
                // memory. A peek (no ack) shows the head only.
                let max = if g.ack { (g.max as usize).max(1) } else { 1 };
                let mut out: Vec<OutDelivery> = Vec::new();
                let mut bytes = 0u64;
                let mut rounds = 0;
                while out.len() < max {
                    let budget = if out.is_empty() { g.max_bytes.max(1) } else { g.max_bytes.saturating_sub(bytes) };
                    if budget == 0 {
                        break;
                    }
                    match self.state.get(1, budget, g.ack, fx) {
                        GetOutcome::Messages(ds) => {
                            let Some(mut d) = ds.into_iter().next() else { break };
                            bytes = bytes.saturating_add(d.msg.data.mem_size());
                            d.tag = out.len() as u64 + 1;
                            out.push(d);
                        }
                        GetOutcome::NeedRefill => {}
                    }
                    // Read what the queue needs now before the next take.
                    let pending = std::mem::take(fx);
                    *fx = self.carry_out(pending, store)?;
                    rounds += 1;
                    if rounds > MAX_READ_ROUNDS {
                        return Err(StoreError::Corrupt { cf: "messages", detail: "a get found no end to its reads".into() });
                    }
                }
                QueueReply::Got(out, self.state.stats().ready)
            }
            QueueOp::Purge(_) => QueueReply::Purged(self.state.purge(fx)),
            QueueOp::Touch(_) => {
                self.state.touch();
                QueueReply::Done(Ok(()))
            }
            QueueOp::Expire(_) => QueueReply::Done(self.state.expire()),
            QueueOp::Tick(_) => {
                self.state.poll_timers(fx);
                QueueReply::Done(Ok(()))
            }
            QueueOp::DropConsumers(_) => {
                for consumer in self.state.drop_consumers(fx) {
                    self.emit(ReplicaEvent::ConsumerGone { consumer, error: None });
                }
                QueueReply::Done(Ok(()))
            }
            QueueOp::Batch(b) => {
                let mut replies = Vec::with_capacity(b.entries.len());
                for e in b.entries {
                    match e.op {
                        // Batches do not nest.
                        Some(QueueOp::Batch(_)) | None => replies.push(QueueReply::Skipped),
                        Some(op) => {
                            let reply = self.command(op, fx, store)?;
                            // Each command sees the dispatch of the ones
                            // before it, as if proposed one by one.
                            self.state.dispatch(fx, &mut |_| Room::UNLIMITED);
                            let pending = std::mem::take(fx);
                            *fx = self.carry_out(pending, store)?;
                            replies.push(reply);
                        }
                    }
                }
                QueueReply::Batch(replies)
            }
            QueueOp::DeadLettered(d) => {
                for seq in d.seqs {
                    fx.ops.push(Op::Delete(Cf::Replica, replica::dead_letter(self.id(), seq)));
                }
                QueueReply::Done(Ok(()))
            }
        })
    }

    /// A consumer whose acknowledgement named an unknown tag leaves, as in
    /// a classic queue.
    fn fail_consumer_on(&mut self, consumer: ConsumerId, r: &Result<(), Error>, fx: &mut Effects) {
        if let Err(e) = r
            && self.state.remove_consumer(consumer, fx)
        {
            self.emit(ReplicaEvent::ConsumerGone { consumer, error: Some(e.to_string()) });
        }
    }

    /// Writes a round's effects into the overlay and emits its events; the
    /// reads it asks for are done at once and applied, until none is left.
    /// Returns the effects of the last round (empty) for the caller to go on.
    fn carry_out(&mut self, mut fx: Effects, store: &mut Overlay<'_>) -> Result<Effects, StoreError> {
        // A round may ask for both reads; each is done in turn, none is
        // dropped (a dropped timer read would leave the queue waiting for it
        // forever).
        let mut timer = None;
        for _ in 0..MAX_READ_ROUNDS {
            let refill = fx.refill.take();
            if let Some(t) = fx.timer_read.take() {
                timer = Some(t);
            }
            self.write(fx, store)?;
            fx = Effects::default();
            if let Some(req) = refill {
                let (entries, exhausted) = read_refill(&*store, self.id(), &req)?;
                self.state.refilled(req.epoch, entries, exhausted, &mut fx);
                self.state.dispatch(&mut fx, &mut |_| Room::UNLIMITED);
                continue;
            }
            if let Some(req) = timer.take() {
                let result = read_timers(&*store, self.id(), &req)?;
                self.state.timer_done(req.epoch, result, &mut fx);
                self.state.dispatch(&mut fx, &mut |_| Room::UNLIMITED);
                continue;
            }
            return Ok(fx);
        }
        Err(StoreError::Corrupt { cf: "messages", detail: "an entry found no end to its reads".into() })
    }

    /// Writes one round's effects and emits its events.
    fn write(&mut self, mut fx: Effects, store: &mut Overlay<'_>) -> Result<(), StoreError> {
        let mut dead_lettered = Vec::new();
        for dl in std::mem::take(&mut fx.dead_letters) {
            dead_lettered.push(dl.reason);
            let Some(dlx) = self.state.args.dead_letter_exchange.clone() else { continue };
            let data = deadletter::dead_lettered(
                &dl.data,
                &self.state.name,
                dl.reason,
                self.state.now(),
                &dlx,
                self.state.args.dead_letter_routing_key.as_deref(),
            );
            let seq = self.state.next_seq();
            let record = StoredMessage::from_data(&data, self.state.now());
            fx.ops.push(Op::Put(Cf::Replica, replica::dead_letter(self.id(), seq), record.encode_to_vec()));
            self.emit(ReplicaEvent::DeadLetter { seq, data: Arc::new(data) });
        }
        if !fx.counters.is_zero() {
            fx.ops.push(Op::Merge(Cf::QueueState, keys::encode_queue_state(self.id()).to_vec(), fx.counters.encode()));
        }
        store.write(std::mem::take(&mut fx.ops))?;
        for d in fx.deliveries {
            self.emit(ReplicaEvent::Deliver(d));
        }
        if fx.expired > 0 || !fx.dropped.is_empty() || !dead_lettered.is_empty() {
            self.emit(ReplicaEvent::Counted { expired: fx.expired, dropped: fx.dropped, dead_lettered });
        }
        Ok(())
    }

    /// Applies a decoded entry (the [`GroupMachine`] without decoding).
    pub fn apply_op(&mut self, now_ms: u64, op: QueueOp, store: &mut Overlay<'_>) -> Result<QueueReply, StoreError> {
        self.state.set_now(now_ms);
        let mut fx = Effects::default();
        let reply = self.command(op, &mut fx, store)?;
        self.state.dispatch(&mut fx, &mut |_| Room::UNLIMITED);
        let mut rest = self.carry_out(fx, store)?;
        self.state.write_replica_records(&mut rest);
        self.write(rest, store)?;
        self.publish();
        Ok(reply)
    }
}

impl GroupMachine for QueueMachine {
    fn apply(&mut self, entry: &Applied<'_>, store: &mut Overlay<'_>) -> Result<LocalReply, StoreError> {
        let op = match QueueEntry::decode(entry.data) {
            Ok(QueueEntry { op: Some(op) }) => op,
            // Every replica decodes the same bytes the same way: an entry
            // this version cannot read changes nothing, anywhere.
            Ok(QueueEntry { op: None }) | Err(_) => {
                tracing::error!(queue = %self.state.name, index = entry.index, "cannot decode a log entry; skipped");
                self.state.set_now(entry.now_ms);
                return Ok(None);
            }
        };
        let reply = self.apply_op(entry.now_ms, op, store)?;
        Ok(Some(Box::new(reply)))
    }

    fn restore(&mut self, store: &dyn Reader) -> Result<(), StoreError> {
        let (id, name, args, limits) = (self.state.id, self.state.name.clone(), self.state.args.clone(), *self.state.limits());
        self.state = QueueState::restore_replicated(id, name, args, limits, store)?;
        self.publish();
        Ok(())
    }

    fn ranges(&self) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
        queue_ranges(self.id())
    }

    /// A queue's messages are in its log until they are in a snapshot:
    /// writing them a second time through the write-ahead log would double
    /// the bytes every replica logs and syncs.
    fn apply_unlogged(&self) -> bool {
        true
    }

    fn weigher(&self) -> fn(&[u8]) -> u64 {
        messages_in
    }
}

/// Messages a [`QueueEntry`] brings into the queue (published and adopted
/// ones, batches included), read from the wire format without decoding the
/// messages: this runs for every entry appended, on every replica.
pub fn messages_in(entry: &[u8]) -> u64 {
    /// `QueueOp` tags that carry messages, and the batch.
    const ENQUEUE: u32 = 1;
    const ADOPT: u32 = 2;
    const BATCH: u32 = 14;
    /// `Enqueue.messages` and `Batch.entries`.
    const REPEATED: u32 = 1;
    fn walk(buf: &[u8], depth: u8) -> u64 {
        let mut n = 0u64;
        for (tag, value) in fields(buf) {
            n = n.saturating_add(match tag {
                ENQUEUE => fields(value).filter(|(t, _)| *t == REPEATED).count() as u64,
                ADOPT => 1,
                // Batches do not nest: a batch inside a batch is skipped by
                // the machine, and counted as nothing here.
                BATCH if depth == 0 => fields(value).filter(|(t, _)| *t == REPEATED).map(|(_, e)| walk(e, 1)).fold(0, u64::saturating_add),
                _ => 0,
            });
        }
        n
    }
    walk(entry, 0)
}

/// The length-delimited fields of a protobuf message, as (tag, bytes);
/// other wire types are skipped. Stops at the first malformed byte.
fn fields(mut buf: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    std::iter::from_fn(move || {
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf).ok()?;
            match wire {
                WireType::LengthDelimited => {
                    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                    let value = buf.get(..len)?;
                    buf = &buf[len..];
                    return Some((tag, value));
                }
                WireType::Varint => {
                    decode_varint(&mut buf).ok()?;
                }
                WireType::SixtyFourBit => buf = buf.get(8..)?,
                WireType::ThirtyTwoBit => buf = buf.get(4..)?,
                WireType::StartGroup | WireType::EndGroup => return None,
            }
        }
        None
    })
}

/// The store ranges that hold a replicated queue's state.
pub fn queue_ranges(id: QueueId) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
    let (start, end) = (keys::queue_start(id).to_vec(), keys::queue_end(id));
    [Cf::Messages, Cf::QueueState, Cf::Delays, Cf::Expiry, Cf::Dedup, Cf::Replica]
        .into_iter()
        .map(|cf| (cf, start.clone(), end.clone()))
        .collect()
}

/// The dead letters still waiting in a queue's outbox (a new leader sends
/// them again).
pub fn pending_dead_letters(id: QueueId, store: &dyn Reader) -> Result<Vec<(u64, MessageData)>, StoreError> {
    let (from, to) = replica::kind_range(id, replica::DEAD_LETTER);
    let mut out = Vec::new();
    for (k, v) in store.scan(Cf::Replica, &from, &to, usize::MAX)? {
        if let Some(seq) = replica::decode_id(&k) {
            out.push((seq, StoredMessage::decode_bytes(bytes::Bytes::from(v))?.into_data()));
        }
    }
    Ok(out)
}

/// Builds the machine of a new or recovered replica.
pub fn machine(
    id: QueueId,
    name: Arc<str>,
    args: QueueArgs,
    limits: Limits,
    events: mpsc::UnboundedSender<ReplicaEvent>,
    shared: Arc<QueueShared>,
) -> QueueMachine {
    QueueMachine::new(QueueState::new_replicated(id, name, args, limits), events, shared)
}

#[cfg(test)]
mod tests;
