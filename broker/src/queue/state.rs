//! A queue's state and its transitions.
//!
//! Everything here is a deterministic function of (state, command): no I/O,
//! no clocks (time is an argument), no channels. Side effects are returned
//! in [`Effects`] for the owner task to carry out: store writes, deliveries,
//! reads. That is what lets the queue be tested without a runtime and
//! replicated later by replaying the same commands.
//!
//! # Memory
//!
//! Ready messages live in one ordered key space, [`MsgKey`] order (priority,
//! then arrival). Only a bounded *window* of them is held in memory:
//!
//! * every ready message with a key below `frontier` is in `window`;
//! * ready messages with a key at or above `frontier` are *disk-only*: in the
//!   store (the `messages` column family when persistent on a durable queue,
//!   else `paged`), counted in `disk_only`, not in memory;
//! * `frontier == None` means every ready message is in memory.
//!
//! When the window runs low a *refill* reads the next keys from the store.
//! The read is ordered after every write the queue submitted before asking
//! (see `Store::read_after_writes`). Messages that would become disk-only
//! while a read is in flight wait in `side` (in memory) and are placed when
//! the read returns, so a read can never skip a message or return one twice.
//!
//! # Counters
//!
//! `ready` counts every ready message (window, side and disk-only). The
//! durable counters (stored messages, bytes, highest sequence) change only
//! through deltas in [`Effects::counters`], written in the same batch as the
//! message records they describe.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;

use crate::error::{Error, Result};
use crate::model::{MessageData, QueueArgs, StoredMessage};
use crate::store::counters::QueueCounters;
use crate::store::keys::{self, MsgKey, QueueId, Record};
use crate::store::{Cf, Op};

pub type ConsumerId = u64;

/// Hands out message sequence numbers, unique across all queues of the node
/// so that any task can mint a key for any queue.
#[derive(Debug, Default)]
pub struct SeqAllocator(AtomicU64);

impl SeqAllocator {
    pub fn starting_at(next: u64) -> Self {
        SeqAllocator(AtomicU64::new(next))
    }

    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// How much of a queue's backlog may be held in memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub window_messages: usize,
    pub window_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { window_messages: 2048, window_bytes: 8 << 20 }
    }
}

/// Where a message's body lives besides memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// Only in memory (transient, or on a non-durable queue).
    Memory,
    /// In the `messages` column family: persistent on a durable queue.
    Stored,
    /// In the `paged` column family: written only to bound memory.
    Paged,
}

/// A message in a queue.
#[derive(Clone, Debug)]
pub struct QMsg {
    pub key: MsgKey,
    pub data: Arc<MessageData>,
    pub size: u64,
    /// Deliveries so far.
    pub delivery_count: u32,
    pub loc: Loc,
    pub enqueued_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

impl QMsg {
    fn stored_form(&self) -> StoredMessage {
        StoredMessage {
            exchange: self.data.exchange.clone(),
            routing_key: self.data.routing_key.clone(),
            properties: Some(self.data.properties.clone()),
            body: self.data.body.clone(),
            enqueued_at_ms: self.enqueued_at_ms,
            expires_at_ms: self.expires_at_ms,
            delivery_count: self.delivery_count,
        }
    }
}

/// A count of messages and their body bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, size: u64) {
        self.count += 1;
        self.bytes += size;
    }

    fn sub(&mut self, size: u64) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }
}

/// A delivery to hand to a consumer.
#[derive(Clone, Debug)]
pub struct OutDelivery {
    pub consumer: ConsumerId,
    pub tag: u64,
    pub redelivered: bool,
    pub msg: QMsg,
}

/// Asks the owner task to read disk-only messages from `from` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefillRequest {
    pub epoch: u64,
    pub from: MsgKey,
    pub max_messages: usize,
    pub max_bytes: u64,
}

/// One message read back from the store.
#[derive(Clone, Debug)]
pub struct RefillEntry {
    pub key: MsgKey,
    pub loc: Loc,
    pub message: StoredMessage,
    pub delivery_count: u32,
}

/// What a transition asks the outside world to do.
#[derive(Default, Debug)]
pub struct Effects {
    /// Store writes, in order, as one atomic batch.
    pub ops: Vec<Op>,
    /// Whether the batch must be synced before confirms are sent.
    pub sync: bool,
    /// Delta of the durable counters; written with `ops`.
    pub counters: QueueCounters,
    pub deliveries: Vec<OutDelivery>,
    pub refill: Option<RefillRequest>,
    /// Consumers to end with an error (for example an unknown delivery tag).
    pub consumer_errors: Vec<(ConsumerId, Error)>,
}

/// How a published message fared in this queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Enqueued; the confirm must wait for the batch to be synced when
    /// `needs_sync`.
    Enqueued { needs_sync: bool },
}

/// A subscription request, as the queue sees it.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    pub tag: Arc<str>,
    pub prefetch: u32,
    pub auto_ack: bool,
    pub exclusive: bool,
    pub priority: i32,
    pub peer: String,
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    spec: ConsumerSpec,
    next_tag: u64,
    unacked: BTreeMap<u64, QMsg>,
}

impl Consumer {
    /// How many more deliveries prefetch allows.
    fn prefetch_room(&self) -> usize {
        if self.spec.auto_ack || self.spec.prefetch == 0 {
            usize::MAX
        } else {
            (self.spec.prefetch as usize).saturating_sub(self.unacked.len())
        }
    }
}

/// A consumer as listings show it.
#[derive(Clone, Debug)]
pub struct ConsumerView {
    pub id: ConsumerId,
    pub spec: ConsumerSpec,
    pub unacked: u64,
    pub active: bool,
}

/// Counts for listings and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: u64,
    pub ready_bytes: u64,
    pub unacked: u64,
    pub consumers: u32,
    pub delayed: u64,
    /// Enqueue time (ms since the epoch) of the message at the head of the
    /// queue, when one is in memory.
    pub oldest_ready_ms: Option<u64>,
}

/// The result of a `get`.
#[derive(Debug)]
pub enum GetOutcome {
    Messages(Vec<OutDelivery>),
    /// The window is empty but the store holds ready messages: retry once
    /// the refill asked for in the effects has returned.
    NeedRefill,
}

pub struct QueueState {
    pub id: QueueId,
    pub name: Arc<str>,
    pub durable: bool,
    pub args: QueueArgs,
    limits: Limits,
    seqs: Arc<SeqAllocator>,
    window: BTreeMap<MsgKey, QMsg>,
    window_tally: Tally,
    frontier: Option<MsgKey>,
    disk_only: Tally,
    disk_only_stored: Tally,
    side: Vec<QMsg>,
    ready: Tally,
    refill_in_flight: bool,
    epoch: u64,
    consumers: Vec<Consumer>,
    next_consumer: ConsumerId,
    rr: usize,
    unacked: u64,
    had_consumer: bool,
}

/// The next key in key order.
fn successor(k: MsgKey) -> MsgKey {
    match k.seq.checked_add(1) {
        Some(seq) => MsgKey { prio_inv: k.prio_inv, seq },
        None => MsgKey { prio_inv: k.prio_inv.saturating_add(1), seq: 0 },
    }
}

impl QueueState {
    pub fn new(id: QueueId, name: Arc<str>, durable: bool, args: QueueArgs, limits: Limits, seqs: Arc<SeqAllocator>) -> Self {
        QueueState {
            id,
            name,
            durable,
            args,
            limits,
            seqs,
            window: BTreeMap::new(),
            window_tally: Tally::default(),
            frontier: None,
            disk_only: Tally::default(),
            disk_only_stored: Tally::default(),
            side: Vec::new(),
            ready: Tally::default(),
            refill_in_flight: false,
            epoch: 0,
            consumers: Vec::new(),
            next_consumer: 1,
            rr: 0,
            unacked: 0,
            had_consumer: false,
        }
    }

    /// A durable queue after a restart: everything it stored is ready and
    /// on disk; the first refill loads the window.
    pub fn recover(id: QueueId, name: Arc<str>, args: QueueArgs, limits: Limits, seqs: Arc<SeqAllocator>, counters: QueueCounters) -> Self {
        let mut q = QueueState::new(id, name, true, args, limits, seqs);
        let stored = Tally { count: counters.messages.max(0) as u64, bytes: counters.bytes.max(0) as u64 };
        if stored.count > 0 {
            q.frontier = Some(MsgKey::MIN);
            q.disk_only = stored;
            q.disk_only_stored = stored;
            q.ready = stored;
        }
        q
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.ready.count,
            ready_bytes: self.ready.bytes,
            unacked: self.unacked,
            consumers: self.consumers.len() as u32,
            delayed: 0,
            oldest_ready_ms: self.window.first_key_value().map(|(_, m)| m.enqueued_at_ms),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ready.count == 0 && self.unacked == 0
    }

    pub fn has_consumers(&self) -> bool {
        !self.consumers.is_empty()
    }

    /// Auto-delete queues go when their last consumer leaves.
    pub fn should_auto_delete(&self, auto_delete: bool) -> bool {
        auto_delete && self.had_consumer && self.consumers.is_empty()
    }

    pub fn consumers(&self) -> Vec<ConsumerView> {
        let active = self.active_consumer();
        self.consumers
            .iter()
            .map(|c| ConsumerView {
                id: c.id,
                spec: c.spec.clone(),
                unacked: c.unacked.len() as u64,
                active: active.is_none_or(|a| a == c.id),
            })
            .collect()
    }

    /// Under single-active-consumer, the one consumer that receives: the
    /// earliest subscribed.
    fn active_consumer(&self) -> Option<ConsumerId> {
        if self.args.single_active_consumer { self.consumers.first().map(|c| c.id) } else { None }
    }

    fn msg_key(&self, record: Record, key: MsgKey) -> Vec<u8> {
        keys::encode_msg(self.id, key, record).to_vec()
    }

    // ------------------------------------------------------------ enqueue

    pub fn enqueue(&mut self, data: Arc<MessageData>, now_ms: u64, fx: &mut Effects) -> EnqueueOutcome {
        let priority = match self.args.max_priority {
            Some(max) => data.priority().min(max as u32) as u8,
            None => 0,
        };
        let key = MsgKey::new(priority, self.seqs.next());
        let stored = data.persistent() && self.durable;
        let msg = QMsg {
            key,
            size: data.body.len() as u64,
            data,
            delivery_count: 0,
            loc: if stored { Loc::Stored } else { Loc::Memory },
            enqueued_at_ms: now_ms,
            expires_at_ms: None,
        };
        if stored {
            fx.ops.push(Op::Put(Cf::Messages, self.msg_key(Record::Message, key), msg.stored_form().encode_to_vec()));
            fx.sync = true;
            fx.counters = fx.counters.merge(&QueueCounters { messages: 1, bytes: msg.size as i64, max_seq: key.seq });
        }
        self.ready.add(msg.size);
        self.place(msg, fx);
        EnqueueOutcome::Enqueued { needs_sync: stored }
    }

    /// Puts a ready message where the window invariant says it belongs.
    fn place(&mut self, msg: QMsg, fx: &mut Effects) {
        if self.frontier.is_none_or(|f| msg.key < f) {
            self.window_tally.add(msg.size);
            self.window.insert(msg.key, msg);
            self.enforce_window(fx);
        } else if self.refill_in_flight {
            self.side.push(msg);
        } else {
            self.make_disk_only(msg, fx);
        }
    }

    /// Drops a ready message from memory, writing it to `paged` first when
    /// the store does not have it (or has a stale delivery count).
    fn make_disk_only(&mut self, mut msg: QMsg, fx: &mut Effects) {
        match msg.loc {
            Loc::Memory => {
                fx.ops.push(Op::Put(Cf::Paged, self.msg_key(Record::Message, msg.key), msg.stored_form().encode_to_vec()));
                msg.loc = Loc::Paged;
            }
            Loc::Paged if msg.delivery_count > 0 => {
                fx.ops.push(Op::Put(Cf::Paged, self.msg_key(Record::Message, msg.key), msg.stored_form().encode_to_vec()));
            }
            Loc::Paged | Loc::Stored => {}
        }
        self.disk_only.add(msg.size);
        if msg.loc == Loc::Stored {
            self.disk_only_stored.add(msg.size);
        }
    }

    /// Evicts the highest keys while the window is over its limits.
    fn enforce_window(&mut self, fx: &mut Effects) {
        if self.refill_in_flight {
            return;
        }
        while self.window.len() > 1
            && (self.window.len() > self.limits.window_messages || self.window_tally.bytes > self.limits.window_bytes)
        {
            let Some((key, msg)) = self.window.pop_last() else { break };
            self.window_tally.sub(msg.size);
            self.frontier = Some(key);
            self.make_disk_only(msg, fx);
        }
    }

    fn maybe_refill(&mut self, fx: &mut Effects) {
        if self.refill_in_flight || self.disk_only.count == 0 {
            return;
        }
        if self.window.len() * 2 > self.limits.window_messages || self.window_tally.bytes * 2 > self.limits.window_bytes {
            return;
        }
        let Some(from) = self.frontier else {
            // Disk-only messages always sit at or above the frontier; if the
            // invariant broke, forget them rather than loop.
            tracing::error!(queue = %self.name, count = self.disk_only.count, "disk-only messages without a frontier; dropping the count");
            self.ready.count = self.ready.count.saturating_sub(self.disk_only.count);
            self.ready.bytes = self.ready.bytes.saturating_sub(self.disk_only.bytes);
            self.disk_only = Tally::default();
            self.disk_only_stored = Tally::default();
            return;
        };
        self.refill_in_flight = true;
        fx.refill = Some(RefillRequest {
            epoch: self.epoch,
            from,
            max_messages: self.limits.window_messages.saturating_sub(self.window.len()).max(1),
            max_bytes: self.limits.window_bytes.saturating_sub(self.window_tally.bytes).max(1),
        });
    }

    /// Takes the result of a refill. `exhausted` says the read reached the end
    /// of the queue's key range.
    pub fn refilled(&mut self, epoch: u64, entries: Vec<RefillEntry>, exhausted: bool, fx: &mut Effects) {
        self.refill_in_flight = false;
        if epoch == self.epoch {
            // The store also holds messages that are not ready: unacknowledged
            // deliveries of stored messages keep their record until acked.
            let skip: HashSet<MsgKey> =
                self.side.iter().map(|m| m.key).chain(self.consumers.iter().flat_map(|c| c.unacked.values().map(|m| m.key))).collect();
            let last = entries.last().map(|e| e.key);
            for e in entries {
                if self.window.contains_key(&e.key) || skip.contains(&e.key) {
                    continue;
                }
                let size = e.message.body.len() as u64;
                self.disk_only.sub(size);
                if e.loc == Loc::Stored {
                    self.disk_only_stored.sub(size);
                }
                let msg = QMsg {
                    key: e.key,
                    size,
                    delivery_count: e.delivery_count,
                    loc: e.loc,
                    enqueued_at_ms: e.message.enqueued_at_ms,
                    expires_at_ms: e.message.expires_at_ms,
                    data: Arc::new(e.message.into_data()),
                };
                self.window_tally.add(size);
                self.window.insert(msg.key, msg);
            }
            if exhausted {
                if self.disk_only.count > 0 {
                    tracing::warn!(queue = %self.name, missing = self.disk_only.count, "store holds fewer ready messages than counted; correcting the count");
                    self.ready.count = self.ready.count.saturating_sub(self.disk_only.count);
                    self.ready.bytes = self.ready.bytes.saturating_sub(self.disk_only.bytes);
                    self.disk_only = Tally::default();
                    self.disk_only_stored = Tally::default();
                }
                self.frontier = None;
            } else if let Some(last) = last {
                self.frontier = Some(successor(last));
            }
        }
        for msg in std::mem::take(&mut self.side) {
            self.place(msg, fx);
        }
        self.enforce_window(fx);
        self.maybe_refill(fx);
    }

    /// A refill read failed: forget it and place what waited for it; the
    /// next round asks again.
    pub fn refill_failed(&mut self, fx: &mut Effects) {
        self.refill_in_flight = false;
        self.epoch += 1;
        for msg in std::mem::take(&mut self.side) {
            self.place(msg, fx);
        }
        self.enforce_window(fx);
    }

    // ----------------------------------------------------------- consumers

    pub fn add_consumer(&mut self, spec: ConsumerSpec) -> Result<ConsumerId> {
        if let Some(c) = self.consumers.iter().find(|c| c.spec.exclusive) {
            return Err(Error::AlreadyExists(format!("queue '{}' has an exclusive consumer ('{}')", self.name, c.spec.tag)));
        }
        if spec.exclusive && !self.consumers.is_empty() {
            return Err(Error::AlreadyExists(format!(
                "queue '{}' has {} consumer(s); an exclusive consumer must be the only one",
                self.name,
                self.consumers.len()
            )));
        }
        if self.consumers.iter().any(|c| c.spec.tag == spec.tag) {
            return Err(Error::AlreadyExists(format!("consumer tag '{}' is already in use on queue '{}'", spec.tag, self.name)));
        }
        let id = self.next_consumer;
        self.next_consumer += 1;
        self.consumers.push(Consumer { id, spec, next_tag: 1, unacked: BTreeMap::new() });
        self.had_consumer = true;
        Ok(id)
    }

    /// Removes a consumer; its unacknowledged messages return to the queue in
    /// their original order, to be redelivered. Returns whether it existed.
    pub fn remove_consumer(&mut self, id: ConsumerId, fx: &mut Effects) -> bool {
        let Some(pos) = self.consumers.iter().position(|c| c.id == id) else {
            return false;
        };
        let consumer = self.consumers.remove(pos);
        if self.rr > pos {
            self.rr -= 1;
        }
        for (_, msg) in consumer.unacked {
            self.unacked -= 1;
            self.requeue(msg, fx);
        }
        true
    }

    pub fn set_prefetch(&mut self, id: ConsumerId, prefetch: u32) {
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
            c.spec.prefetch = prefetch;
        }
    }

    fn requeue(&mut self, msg: QMsg, fx: &mut Effects) {
        self.ready.add(msg.size);
        self.place(msg, fx);
    }

    /// Removes a message for good: acked, auto-acked, discarded.
    fn consume(&mut self, msg: &QMsg, fx: &mut Effects) {
        match msg.loc {
            Loc::Stored => {
                fx.ops.push(Op::Delete(Cf::Messages, self.msg_key(Record::Message, msg.key)));
                if msg.delivery_count > 0 {
                    fx.ops.push(Op::Delete(Cf::Messages, self.msg_key(Record::Deliveries, msg.key)));
                }
                fx.counters = fx.counters.merge(&QueueCounters { messages: -1, bytes: -(msg.size as i64), max_seq: 0 });
            }
            Loc::Paged => fx.ops.push(Op::Delete(Cf::Paged, self.msg_key(Record::Message, msg.key))),
            Loc::Memory => {}
        }
    }

    /// Takes the first ready message out of the window.
    fn pop_ready(&mut self) -> Option<QMsg> {
        let (_, msg) = self.window.pop_first()?;
        self.window_tally.sub(msg.size);
        self.ready.sub(msg.size);
        Some(msg)
    }

    /// Counts a delivery: bumps the count and, for a stored message that
    /// stays in the store, records it so a restart marks it redelivered.
    fn count_delivery(&mut self, msg: &mut QMsg, record: bool, fx: &mut Effects) -> bool {
        let redelivered = msg.delivery_count > 0;
        msg.delivery_count = msg.delivery_count.saturating_add(1);
        if record && msg.loc == Loc::Stored {
            fx.ops.push(Op::Put(Cf::Messages, self.msg_key(Record::Deliveries, msg.key), msg.delivery_count.to_le_bytes().to_vec()));
        }
        redelivered
    }

    /// Hands ready messages to consumers with room: highest consumer
    /// priority first, round-robin among equals, within prefetch and within
    /// `room(consumer)` (what its outgoing channel can take now).
    pub fn dispatch(&mut self, fx: &mut Effects, room: &mut dyn FnMut(ConsumerId) -> usize) {
        if self.consumers.is_empty() {
            self.maybe_refill(fx);
            return;
        }
        let active = self.active_consumer();
        let mut credit: Vec<usize> =
            self.consumers.iter().map(|c| if active.is_some_and(|a| a != c.id) { 0 } else { room(c.id).min(c.prefetch_room()) }).collect();
        loop {
            if self.window.is_empty() {
                break;
            }
            let n = self.consumers.len();
            let Some(best) = (0..n).filter(|i| credit[*i] > 0).map(|i| self.consumers[i].spec.priority).max() else {
                break;
            };
            let Some(idx) = (0..n).map(|k| (self.rr + k) % n).find(|i| credit[*i] > 0 && self.consumers[*i].spec.priority == best) else {
                break;
            };
            let Some(mut msg) = self.pop_ready() else { break };
            let auto_ack = self.consumers[idx].spec.auto_ack;
            let redelivered = self.count_delivery(&mut msg, !auto_ack, fx);
            let consumer_id = self.consumers[idx].id;
            let tag = {
                let c = &mut self.consumers[idx];
                let tag = c.next_tag;
                c.next_tag += 1;
                tag
            };
            if auto_ack {
                self.consume(&msg, fx);
            } else {
                self.consumers[idx].unacked.insert(tag, msg.clone());
                self.unacked += 1;
            }
            credit[idx] -= 1;
            self.rr = (idx + 1) % n;
            fx.deliveries.push(OutDelivery { consumer: consumer_id, tag, redelivered, msg });
        }
        self.maybe_refill(fx);
    }

    fn take_unacked(&mut self, id: ConsumerId, tag: u64, multiple: bool) -> Result<Vec<QMsg>> {
        let name = self.name.clone();
        let c = self
            .consumers
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| Error::PreconditionFailed(format!("consumer is no longer subscribed to queue '{name}'")))?;
        let taken: Vec<QMsg> = if multiple {
            let keep = if tag == 0 { BTreeMap::new() } else { c.unacked.split_off(&(tag + 1)) };
            let taken = std::mem::replace(&mut c.unacked, keep);
            if taken.is_empty() && tag != 0 {
                return Err(Error::PreconditionFailed(format!("unknown delivery tag {tag}")));
            }
            taken.into_values().collect()
        } else {
            match c.unacked.remove(&tag) {
                Some(m) => vec![m],
                None => return Err(Error::PreconditionFailed(format!("unknown delivery tag {tag}"))),
            }
        };
        self.unacked -= taken.len() as u64;
        Ok(taken)
    }

    pub fn ack(&mut self, id: ConsumerId, tag: u64, multiple: bool, fx: &mut Effects) -> Result<()> {
        for msg in self.take_unacked(id, tag, multiple)? {
            self.consume(&msg, fx);
        }
        Ok(())
    }

    /// Negative acknowledgement (nack and reject): requeue, or discard.
    pub fn nack(&mut self, id: ConsumerId, tag: u64, multiple: bool, requeue: bool, fx: &mut Effects) -> Result<()> {
        for msg in self.take_unacked(id, tag, multiple)? {
            if requeue {
                self.requeue(msg, fx);
            } else {
                self.consume(&msg, fx);
            }
        }
        Ok(())
    }

    // --------------------------------------------------------- get, purge

    /// Pulls up to `max` messages. With `ack` they are removed; without, they
    /// are counted as delivered and returned to the queue (a peek).
    pub fn get(&mut self, max: usize, ack: bool, fx: &mut Effects) -> GetOutcome {
        if self.window.is_empty() && (self.disk_only.count > 0 || !self.side.is_empty()) {
            self.maybe_refill(fx);
            return GetOutcome::NeedRefill;
        }
        let mut out = Vec::new();
        let mut back = Vec::new();
        while out.len() < max {
            let Some(mut msg) = self.pop_ready() else { break };
            let redelivered = self.count_delivery(&mut msg, !ack, fx);
            if ack {
                self.consume(&msg, fx);
            } else {
                back.push(msg.clone());
            }
            out.push(OutDelivery { consumer: 0, tag: out.len() as u64 + 1, redelivered, msg });
        }
        for msg in back {
            self.requeue(msg, fx);
        }
        self.maybe_refill(fx);
        GetOutcome::Messages(out)
    }

    /// Removes every ready message; unacknowledged ones stay. Returns how
    /// many were removed.
    pub fn purge(&mut self, fx: &mut Effects) -> u64 {
        let purged = self.ready.count;
        let in_memory: Vec<QMsg> = std::mem::take(&mut self.window).into_values().chain(std::mem::take(&mut self.side)).collect();
        for msg in &in_memory {
            self.consume(msg, fx);
        }
        self.window_tally = Tally::default();
        if let Some(from) = self.frontier.take()
            && self.disk_only.count > 0
        {
            let start = self.msg_key(Record::Message, from);
            let end = keys::queue_end(self.id).to_vec();
            fx.ops.push(Op::DeleteRange(Cf::Messages, start.clone(), end.clone()));
            fx.ops.push(Op::DeleteRange(Cf::Paged, start, end));
            fx.counters = fx.counters.merge(&QueueCounters {
                messages: -(self.disk_only_stored.count as i64),
                bytes: -(self.disk_only_stored.bytes as i64),
                max_seq: 0,
            });
            // Unacknowledged messages above the frontier were caught by the
            // range delete: write them back.
            let rewrite: Vec<QMsg> =
                self.consumers.iter().flat_map(|c| c.unacked.values()).filter(|m| m.key >= from && m.loc != Loc::Memory).cloned().collect();
            for m in rewrite {
                let cf = if m.loc == Loc::Stored { Cf::Messages } else { Cf::Paged };
                fx.ops.push(Op::Put(cf, self.msg_key(Record::Message, m.key), m.stored_form().encode_to_vec()));
                if m.loc == Loc::Stored && m.delivery_count > 0 {
                    fx.ops.push(Op::Put(Cf::Messages, self.msg_key(Record::Deliveries, m.key), m.delivery_count.to_le_bytes().to_vec()));
                }
            }
        }
        self.disk_only = Tally::default();
        self.disk_only_stored = Tally::default();
        self.ready = Tally::default();
        // A refill in flight now reads a stale range: ignore its result.
        self.epoch += 1;
        purged
    }

    /// The writes that delete the queue's data; the caller adds its metadata
    /// removal to the same batch.
    pub fn delete_ops(&self) -> Vec<Op> {
        let start = keys::queue_start(self.id).to_vec();
        let end = keys::queue_end(self.id).to_vec();
        vec![
            Op::DeleteRange(Cf::Messages, start.clone(), end.clone()),
            Op::DeleteRange(Cf::Paged, start, end),
            Op::Delete(Cf::QueueState, keys::encode_queue_state(self.id).to_vec()),
        ]
    }

    /// Everything held: ready and unacknowledged.
    pub fn message_count(&self) -> u64 {
        self.ready.count + self.unacked
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let window_bytes: u64 = self.window.values().map(|m| m.size).sum();
        assert_eq!(self.window_tally.count, self.window.len() as u64);
        assert_eq!(self.window_tally.bytes, window_bytes);
        let side_count = self.side.len() as u64;
        assert_eq!(self.ready.count, self.window_tally.count + side_count + self.disk_only.count);
        if let Some(f) = self.frontier {
            assert!(self.window.keys().all(|k| *k < f), "window key above frontier");
        }
        if self.disk_only.count > 0 {
            assert!(self.frontier.is_some());
        }
        let unacked: u64 = self.consumers.iter().map(|c| c.unacked.len() as u64).sum();
        assert_eq!(unacked, self.unacked);
    }
}

#[cfg(test)]
mod tests;
