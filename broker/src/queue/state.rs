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
//! # Time
//!
//! The owner task sets the clock ([`QueueState::set_now`]) before each round;
//! every transition reads time from there, never from the system.
//!
//! * Expiry: a message with a TTL gets an entry in the queue's expiry index
//!   (`expiry` when the message is stored, else `expiry_transient`). An
//!   expired message is never delivered: the head is checked when a message
//!   is taken, and a *timer read* of the index finds due messages anywhere
//!   in the queue, on disk or in memory, so they leave the ready count with
//!   nobody consuming.
//! * Delays: a delayed message lives only in the `delays` (or
//!   `delays_transient`) index, keyed by due time, with its body; no memory
//!   per message. The timer read returns due ones and they are enqueued in
//!   the same batch that removes them from the index.
//! * A timer read, like a refill, is ordered after the queue's earlier
//!   writes. Messages consumed while it is in flight are remembered so that a
//!   stale result cannot resurrect them; messages expired from disk while a
//!   refill is in flight are remembered so the refill cannot return them.
//!
//! # Dead-lettering
//!
//! A message that is rejected without requeue, expires, is dropped by a
//! length limit or exceeds the delivery limit is removed from the queue and,
//! when the queue has a dead-letter exchange, handed to the owner task in
//! [`Effects::dead_letters`]: the task routes it and writes it into the
//! target queues' inboxes in the same batch as the removal, so that a crash
//! neither loses nor duplicates it.
//!
//! # Counters
//!
//! `ready` counts every ready message (window, side and disk-only). The
//! durable counters (stored messages, bytes, highest sequence) change only
//! through deltas in [`Effects::counters`], written in the same batch as the
//! message records they describe.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;

use crate::error::{Error, Result};
use crate::model::{MessageData, Overflow, QueueArgs, StoredMessage};
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

    /// The number the next call to [`SeqAllocator::next`] returns.
    pub fn peek(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// How much a queue may hold in memory. Byte limits count
/// [`MessageData::mem_size`] (body, headers and properties).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Ready messages held in memory; the rest of a backlog stays on disk.
    pub window_messages: usize,
    pub window_bytes: u64,
    /// Most unacknowledged deliveries per consumer: what `prefetch: 0`
    /// means, and the cap on a larger prefetch. Auto-ack consumers are held
    /// to it for deliveries not yet written to their stream.
    pub consumer_max_unacked: u32,
    /// Most bytes of unacknowledged (or not yet sent) deliveries per
    /// consumer; a single larger message is still delivered.
    pub consumer_max_unacked_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { window_messages: 2048, window_bytes: 8 << 20, consumer_max_unacked: 2048, consumer_max_unacked_bytes: 16 << 20 }
    }
}

/// What a consumer's outgoing buffer (deliveries handed to its stream but
/// not yet written to the connection) can take now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    pub messages: usize,
    pub bytes: u64,
    /// Nothing is waiting in it: one message of any size may go.
    pub empty: bool,
}

impl Room {
    /// No limit from the buffer (tests, or a consumer that is not there).
    pub const UNLIMITED: Room = Room { messages: usize::MAX, bytes: u64::MAX, empty: true };
    pub const NONE: Room = Room { messages: 0, bytes: 0, empty: false };

    pub fn messages(n: usize) -> Room {
        Room { messages: n, bytes: u64::MAX, empty: true }
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
    /// Body bytes (what `x-max-length-bytes` counts, as in RabbitMQ).
    pub size: u64,
    /// Memory bytes ([`MessageData::mem_size`]): what memory limits count.
    pub mem: u64,
    /// The owner task's write ticket of the round that stored it: a
    /// delivery of a stored message waits until that write is durable.
    /// 0 when it came from the store.
    pub ticket: u64,
    /// Deliveries so far.
    pub delivery_count: u32,
    pub loc: Loc,
    pub enqueued_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

impl QMsg {
    /// Where its expiry index entry lives (when it has an expiry).
    fn expiry_cf(&self) -> Cf {
        if self.loc == Loc::Stored { Cf::Expiry } else { Cf::ExpiryTransient }
    }

    /// Expired at `now` (a TTL of 0 allows delivery within the same
    /// millisecond, as RabbitMQ delivers such a message to a waiting
    /// consumer).
    fn is_expired(&self, now: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t < now)
    }

    pub fn stored_form(&self) -> StoredMessage {
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
    /// Messages removed from the queue to be dead-lettered; the task routes
    /// them and adds their writes to `ops`.
    pub dead_letters: Vec<DeadLetter>,
    pub timer_read: Option<TimerRequest>,
    /// Messages that expired in this round.
    pub expired: u64,
    /// Messages dropped (not dead-lettered) in this round, by reason.
    pub dropped: Vec<DeathReason>,
}

/// How a published message fared in this queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Enqueued (or held back by a delay); the confirm must wait for the
    /// batch to be synced when `needs_sync`.
    Enqueued { needs_sync: bool },
    /// Its message id is within the deduplication window: not enqueued.
    /// The first copy was stored under write `ticket` (0: already durable);
    /// the duplicate answer waits for it, and shares its fate.
    Duplicate { ticket: u64 },
    /// Refused (a full queue with `x-overflow: reject-publish`).
    Rejected(String),
}

/// Why a message left its queue without being acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeathReason {
    /// Rejected or nacked without requeue.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Dropped or refused by a length limit.
    Maxlen,
    /// Delivered more times than `x-delivery-limit`.
    DeliveryLimit,
}

impl DeathReason {
    /// The reason as RabbitMQ's `x-death` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// A message leaving the queue for its dead-letter exchange. Its removal
/// from this queue is already in the effects' ops.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub data: Arc<MessageData>,
    pub reason: DeathReason,
}

/// Asks the owner task to read the queue's due timers: expiry index entries
/// and delayed messages due at or before `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerRequest {
    pub epoch: u64,
    pub now: u64,
    pub limit: usize,
}

/// A due expiry index entry, as read.
#[derive(Clone, Debug)]
pub struct DueExpiry {
    pub cf: Cf,
    pub due: u64,
    pub key: MsgKey,
}

/// A due delayed message, as read.
#[derive(Clone, Debug)]
pub struct DueDelay {
    pub cf: Cf,
    pub index_key: Vec<u8>,
    pub message: StoredMessage,
}

/// What a timer read found.
#[derive(Clone, Debug, Default)]
pub struct TimerResult {
    pub expired: Vec<DueExpiry>,
    /// Stored messages of the due expiry entries that are not in memory,
    /// by key, with their location and delivery count.
    pub bodies: HashMap<MsgKey, (Loc, StoredMessage, u32)>,
    pub delayed: Vec<DueDelay>,
    /// The earliest entries after `now`.
    pub next_expiry: Option<u64>,
    pub next_delay: Option<u64>,
    /// The read stopped at its limit: more may be due.
    pub more: bool,
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
    /// The per-consumer bounds, when they travel with the consumer (a
    /// replicated queue: every replica must apply the leader's, not its
    /// own configuration). `None`: the queue's [`Limits`].
    pub limits: Option<ConsumerLimits>,
}

/// The bounds on what one consumer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerLimits {
    pub max_unacked: u32,
    pub max_unacked_bytes: u64,
}

impl Limits {
    pub fn consumer(&self) -> ConsumerLimits {
        ConsumerLimits { max_unacked: self.consumer_max_unacked, max_unacked_bytes: self.consumer_max_unacked_bytes }
    }
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    spec: ConsumerSpec,
    next_tag: u64,
    unacked: BTreeMap<u64, QMsg>,
    /// Memory bytes of `unacked`.
    unacked_mem: u64,
}

impl Consumer {
    fn limits(&self, queue: &Limits) -> ConsumerLimits {
        self.spec.limits.unwrap_or_else(|| queue.consumer())
    }

    /// The most unacknowledged deliveries it may hold: its prefetch, capped
    /// at the broker's limit (which is also what prefetch 0 means).
    fn effective_prefetch(&self, limits: &Limits) -> u32 {
        let max = self.limits(limits).max_unacked;
        match self.spec.prefetch {
            0 => max,
            p => p.min(max),
        }
        .max(1)
    }

    /// How many more deliveries, and bytes, its prefetch and the memory
    /// bound allow. A classic queue's auto-ack consumers hold nothing
    /// unacknowledged; a replicated queue's hold their deliveries until
    /// they are settled, bounded like unacknowledged ones.
    fn credit(&self, limits: &Limits, room: Room, replicated: bool) -> Room {
        if self.spec.auto_ack && !replicated {
            return room;
        }
        let max = self.limits(limits);
        let prefetch = if self.spec.auto_ack { max.max_unacked.max(1) } else { self.effective_prefetch(limits) };
        let prefetch = (prefetch as usize).saturating_sub(self.unacked.len());
        Room {
            messages: prefetch.min(room.messages),
            bytes: max.max_unacked_bytes.saturating_sub(self.unacked_mem).min(room.bytes),
            empty: room.empty && self.unacked.is_empty(),
        }
    }
}

/// A consumer as listings show it.
#[derive(Clone, Debug)]
pub struct ConsumerView {
    pub id: ConsumerId,
    pub spec: ConsumerSpec,
    pub unacked: u64,
    /// The prefetch that applies (the broker caps it); 0 for auto-ack.
    pub effective_prefetch: u32,
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
    /// The clock, set by the owner task before each round.
    now: u64,
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
    /// Which consumer holds each unacknowledged message.
    unacked_keys: HashMap<MsgKey, ConsumerId>,
    /// The owner task's write ticket for this round (see [`QMsg::ticket`]).
    ticket: u64,
    /// A replicated queue's state machine: every logical change is also
    /// written to the store (see `replicated.rs`), auto-ack deliveries are
    /// held until settled, and reads are synchronous.
    replicated: bool,
    /// Consumers whose record must be rewritten (replicated queues).
    dirty_consumers: std::collections::BTreeSet<ConsumerId>,
    had_consumer: bool,
    /// Delayed messages (in the delay index, not ready).
    delayed: u64,
    /// The earliest known expiry / delay due time, if any.
    next_expiry: Option<u64>,
    next_delay: Option<u64>,
    timer_in_flight: bool,
    timer_epoch: u64,
    /// Keys consumed while a timer read was in flight: its result may still
    /// list them.
    consumed_during_timer: HashSet<MsgKey>,
    /// Keys that left the queue (acknowledged, expired, dropped) while a
    /// refill was in flight: its result, read before they left, may still
    /// return them.
    gone_during_refill: HashSet<MsgKey>,
    /// Deduplication window: message id -> (end of its window, write ticket
    /// of its first copy), and the ids in window-end order for pruning.
    dedup: HashMap<String, (u64, u64)>,
    dedup_order: VecDeque<(u64, String)>,
    /// When the queue was last used (consumer, get, declare), for `x-expires`.
    last_used: u64,
    /// A replicated queue unused for its `x-expires` period, about to be
    /// deleted: no consumer attaches any more.
    expired: bool,
}

/// The writes that delete everything stored for queue `id`.
pub fn delete_queue_ops(id: QueueId) -> Vec<Op> {
    let start = keys::queue_start(id).to_vec();
    let end = keys::queue_end(id);
    let mut ops: Vec<Op> =
        [Cf::Messages, Cf::Paged, Cf::Delays, Cf::DelaysTransient, Cf::Expiry, Cf::ExpiryTransient, Cf::Dedup, Cf::Inbox, Cf::Replica]
            .into_iter()
            .map(|cf| Op::DeleteRange(cf, start.clone(), end.clone()))
            .collect();
    ops.push(Op::Delete(Cf::QueueState, keys::encode_queue_state(id).to_vec()));
    ops
}

/// Due timer entries handled per read.
pub const TIMER_BATCH: usize = 1024;

/// How soon the expiry of an unacknowledged message is looked at again.
const UNACKED_RECHECK_MS: u64 = 1000;

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
            unacked_keys: HashMap::new(),
            ticket: 0,
            replicated: false,
            dirty_consumers: std::collections::BTreeSet::new(),
            had_consumer: false,
            now: 0,
            delayed: 0,
            next_expiry: None,
            next_delay: None,
            timer_in_flight: false,
            timer_epoch: 0,
            consumed_during_timer: HashSet::new(),
            gone_during_refill: HashSet::new(),
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            last_used: 0,
            expired: false,
        }
    }

    /// Sets the clock (milliseconds since the Unix epoch) for the next
    /// transitions. Time never goes backwards here.
    pub fn set_now(&mut self, now_ms: u64) {
        if self.last_used == 0 {
            self.last_used = now_ms;
        }
        self.now = self.now.max(now_ms);
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Sets the write ticket of the round about to run: messages stored in
    /// it carry the ticket, so their deliveries can wait for the write.
    pub fn set_ticket(&mut self, ticket: u64) {
        self.ticket = ticket;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn seqs(&self) -> &Arc<SeqAllocator> {
        &self.seqs
    }

    /// The id the next consumer gets. A queue rebuilt from storage goes on
    /// from its predecessor's, so that a late command for a consumer of the
    /// old state never reaches a new one.
    pub fn next_consumer_id(&self) -> ConsumerId {
        self.next_consumer
    }

    pub fn set_next_consumer_id(&mut self, id: ConsumerId) {
        self.next_consumer = self.next_consumer.max(id);
    }

    /// Whether ready messages are in memory, waiting for consumer credit.
    pub fn has_window(&self) -> bool {
        !self.window.is_empty()
    }

    /// Whether consumer `id` could take more if its buffer had room: it is
    /// within its prefetch (and is the active one under single active
    /// consumer).
    pub fn wants_more(&self, id: ConsumerId) -> bool {
        if self.active_consumer().is_some_and(|a| a != id) {
            return false;
        }
        self.consumers.iter().find(|c| c.id == id).is_some_and(|c| c.credit(&self.limits, Room::UNLIMITED, self.replicated).messages > 0)
    }

    /// A durable queue after a restart: everything it stored is ready and
    /// on disk; the first refill loads the window.
    ///
    /// `dedup` is the stored deduplication window (message id, window end).
    /// The first timer read finds what expired or fell due while the broker
    /// was down.
    pub fn recover(
        id: QueueId,
        name: Arc<str>,
        args: QueueArgs,
        limits: Limits,
        seqs: Arc<SeqAllocator>,
        counters: QueueCounters,
        dedup: Vec<(String, u64)>,
    ) -> Self {
        let mut q = QueueState::new(id, name, true, args, limits, seqs);
        let stored = Tally { count: counters.messages.max(0) as u64, bytes: counters.bytes.max(0) as u64 };
        if stored.count > 0 {
            q.frontier = Some(MsgKey::MIN);
            q.disk_only = stored;
            q.disk_only_stored = stored;
            q.ready = stored;
            q.next_expiry = Some(0);
        }
        q.delayed = counters.delayed.max(0) as u64;
        if q.delayed > 0 {
            q.next_delay = Some(0);
        }
        let mut dedup = dedup;
        dedup.sort_by_key(|(_, until)| *until);
        for (id, until) in dedup {
            q.dedup.insert(id.clone(), (until, 0));
            q.dedup_order.push_back((until, id));
        }
        q
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.ready.count,
            ready_bytes: self.ready.bytes,
            unacked: self.unacked,
            consumers: self.consumers.len() as u32,
            delayed: self.delayed,
            oldest_ready_ms: self.oldest_ready_ms(),
        }
    }

    /// When the oldest ready message in memory was enqueued. Within a
    /// priority level key order is arrival order, so the oldest is the first
    /// key of one of the levels: at most one lookup per level present.
    fn oldest_ready_ms(&self) -> Option<u64> {
        if self.args.max_priority.is_none() {
            return self.window.first_key_value().map(|(_, m)| m.enqueued_at_ms);
        }
        let mut oldest: Option<u64> = None;
        let mut from = MsgKey::MIN;
        while let Some((key, msg)) = self.window.range(from..).next() {
            oldest = Some(oldest.map_or(msg.enqueued_at_ms, |o| o.min(msg.enqueued_at_ms)));
            let Some(next) = key.prio_inv.checked_add(1) else { break };
            from = MsgKey { prio_inv: next, seq: 0 };
        }
        oldest
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
                effective_prefetch: if c.spec.auto_ack { 0 } else { c.effective_prefetch(&self.limits) },
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

    /// Takes a published message: deduplication, delay, length limits, TTL,
    /// then into the ready set. `delay_ms` holds it back that long.
    pub fn enqueue(&mut self, data: Arc<MessageData>, delay_ms: Option<u64>, fx: &mut Effects) -> EnqueueOutcome {
        let dedup_id = self.args.deduplication_window_ms.and_then(|_| {
            let id = &data.properties.message_id;
            (!id.is_empty()).then(|| id.clone())
        });
        if let Some(id) = &dedup_id {
            self.prune_dedup(fx);
            if let Some((_, ticket)) = self.dedup.get(id) {
                return EnqueueOutcome::Duplicate { ticket: *ticket };
            }
        }
        let stored = data.persistent() && self.durable;
        if let Some(delay) = delay_ms.filter(|d| *d > 0) {
            self.remember_dedup(dedup_id, fx);
            self.hold_back(data, delay, fx);
            return EnqueueOutcome::Enqueued { needs_sync: stored };
        }
        if let Some(reason) = self.refuses(&data) {
            if self.args.overflow == Overflow::RejectPublishDlx {
                self.dead_letter(data, DeathReason::Maxlen, fx);
            }
            return EnqueueOutcome::Rejected(reason);
        }
        self.remember_dedup(dedup_id, fx);
        self.admit(data, fx);
        EnqueueOutcome::Enqueued { needs_sync: stored }
    }

    /// Takes a dead-lettered message from another queue: when persistent,
    /// written to this queue's inbox in the source's batch and moved out of
    /// it in this batch. Subject to this queue's length limits, not to
    /// deduplication (it was deduplicated when first published).
    pub fn adopt(&mut self, inbox_key: Option<Vec<u8>>, data: Arc<MessageData>, fx: &mut Effects) {
        if let Some(key) = inbox_key {
            fx.ops.push(Op::Delete(Cf::Inbox, key));
            fx.sync = true;
        }
        if self.refuses(&data).is_some() {
            if self.args.overflow == Overflow::RejectPublishDlx {
                self.dead_letter(data, DeathReason::Maxlen, fx);
            } else {
                fx.dropped.push(DeathReason::Maxlen);
            }
            return;
        }
        self.admit(data, fx);
    }

    /// Why a full queue refuses a message (`reject-publish` overflow).
    fn refuses(&self, data: &MessageData) -> Option<String> {
        if self.args.overflow == Overflow::DropHead {
            return None;
        }
        let size = data.body.len() as u64;
        if let Some(max) = self.args.max_length
            && self.ready.count >= max
        {
            return Some(format!("queue '{}' is full: x-max-length is {max} (x-overflow {})", self.name, self.args.overflow.as_str()));
        }
        if let Some(max) = self.args.max_length_bytes
            && self.ready.bytes + size > max
        {
            return Some(format!(
                "queue '{}' is full: x-max-length-bytes is {max} (x-overflow {})",
                self.name,
                self.args.overflow.as_str()
            ));
        }
        None
    }

    /// Makes a message ready: a new key, the store when it must survive, the
    /// expiry index when it has a TTL, then the length limits.
    fn admit(&mut self, data: Arc<MessageData>, fx: &mut Effects) {
        let priority = match self.args.max_priority {
            Some(max) => data.priority().min(max as u32) as u8,
            None => 0,
        };
        let key = MsgKey::new(priority, self.seqs.next());
        let stored = data.persistent() && self.durable;
        let ttl = match (self.args.message_ttl_ms, data.properties.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let msg = QMsg {
            key,
            size: data.body.len() as u64,
            mem: data.mem_size(),
            ticket: self.ticket,
            data,
            delivery_count: 0,
            loc: if stored { Loc::Stored } else { Loc::Memory },
            enqueued_at_ms: self.now,
            expires_at_ms: ttl.map(|t| self.now.saturating_add(t)),
        };
        if stored {
            fx.ops.push(Op::Put(Cf::Messages, self.msg_key(Record::Message, key), msg.stored_form().encode_to_vec()));
            fx.sync = true;
            fx.counters = fx.counters.merge(&QueueCounters { messages: 1, bytes: msg.size as i64, max_seq: key.seq, delayed: 0 });
        }
        self.index_expiry(&msg, fx);
        self.ready.add(msg.size);
        self.place(msg, fx);
        self.enforce_limits(fx);
    }

    /// Writes a message's expiry index entry, if it has a TTL.
    fn index_expiry(&mut self, msg: &QMsg, fx: &mut Effects) {
        if let Some(at) = msg.expires_at_ms {
            fx.ops.push(Op::Put(msg.expiry_cf(), keys::encode_time(self.id, at, msg.key).to_vec(), Vec::new()));
            self.next_expiry = Some(self.next_expiry.map_or(at, |n| n.min(at)));
        }
    }

    /// Stores a delayed message in the delay index until it is due.
    fn hold_back(&mut self, data: Arc<MessageData>, delay: u64, fx: &mut Effects) {
        let stored = data.persistent() && self.durable;
        let due = self.now.saturating_add(delay);
        let seq = self.seqs.next();
        let record = StoredMessage {
            exchange: data.exchange.clone(),
            routing_key: data.routing_key.clone(),
            properties: Some(data.properties.clone()),
            body: data.body.clone(),
            enqueued_at_ms: self.now,
            expires_at_ms: None,
            delivery_count: 0,
        };
        let cf = if stored { Cf::Delays } else { Cf::DelaysTransient };
        fx.ops.push(Op::Put(cf, keys::encode_time(self.id, due, MsgKey { prio_inv: 0, seq }).to_vec(), record.encode_to_vec()));
        if stored {
            fx.sync = true;
            fx.counters = fx.counters.merge(&QueueCounters { messages: 0, bytes: 0, max_seq: seq, delayed: 1 });
        }
        self.delayed += 1;
        self.next_delay = Some(self.next_delay.map_or(due, |n| n.min(due)));
    }

    fn remember_dedup(&mut self, id: Option<String>, fx: &mut Effects) {
        let (Some(id), Some(window)) = (id, self.args.deduplication_window_ms) else { return };
        let until = self.now.saturating_add(window);
        // The id is remembered in the batch that stores the message; until
        // that batch is durable a duplicate's answer waits for it.
        let ticket = if self.durable { self.ticket } else { 0 };
        if self.durable {
            fx.ops.push(Op::Put(Cf::Dedup, keys::encode_dedup(self.id, &id), until.to_be_bytes().to_vec()));
        }
        self.dedup.insert(id.clone(), (until, ticket));
        self.dedup_order.push_back((until, id));
    }

    /// Forgets message ids whose window has passed.
    fn prune_dedup(&mut self, fx: &mut Effects) {
        while let Some((until, _)) = self.dedup_order.front() {
            if *until > self.now {
                break;
            }
            let Some((until, id)) = self.dedup_order.pop_front() else { break };
            if self.dedup.get(&id).is_some_and(|(u, _)| *u == until) {
                self.dedup.remove(&id);
                if self.durable {
                    fx.ops.push(Op::Delete(Cf::Dedup, keys::encode_dedup(self.id, &id)));
                }
            }
        }
    }

    /// A sequence number for a key in another queue's space (an inbox).
    pub fn next_seq(&self) -> u64 {
        self.seqs.next()
    }

    /// Message ids remembered for deduplication.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Drops (and dead-letters) the oldest ready messages while the queue
    /// is over a length limit with `drop-head` overflow. Only the window's
    /// head can be dropped; a head still on disk is dropped once read.
    fn enforce_limits(&mut self, fx: &mut Effects) {
        if self.args.overflow != Overflow::DropHead {
            return;
        }
        let over = |q: &QueueState| {
            q.args.max_length.is_some_and(|m| q.ready.count > m) || q.args.max_length_bytes.is_some_and(|m| q.ready.bytes > m)
        };
        while over(self) {
            let Some(msg) = self.pop_ready() else { break };
            self.remove_and_dead_letter(msg, DeathReason::Maxlen, fx);
        }
    }

    /// Removes a message for good and hands it to the dead-letter exchange,
    /// if the queue has one.
    fn remove_and_dead_letter(&mut self, msg: QMsg, reason: DeathReason, fx: &mut Effects) {
        self.consume(&msg, fx);
        if reason == DeathReason::Expired {
            fx.expired += 1;
        }
        self.dead_letter(msg.data, reason, fx);
    }

    fn dead_letter(&mut self, data: Arc<MessageData>, reason: DeathReason, fx: &mut Effects) {
        if self.args.dead_letter_exchange.is_some() {
            fx.dead_letters.push(DeadLetter { data, reason });
        } else {
            fx.dropped.push(reason);
        }
    }

    /// Puts a ready message where the window invariant says it belongs.
    fn place(&mut self, msg: QMsg, fx: &mut Effects) {
        if self.frontier.is_none_or(|f| msg.key < f) {
            self.window_tally.add(msg.mem);
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
            self.window_tally.sub(msg.mem);
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
        // Keys that left the queue after the read was asked for: the read
        // may still have seen them.
        let gone = std::mem::take(&mut self.gone_during_refill);
        if epoch == self.epoch {
            // The store also holds messages that are not ready:
            // unacknowledged deliveries of stored messages keep their record
            // until acked, and messages that arrived during the read wait in
            // `side`.
            let side: HashSet<MsgKey> = self.side.iter().map(|m| m.key).collect();
            let last = entries.last().map(|e| e.key);
            for e in entries {
                if self.window.contains_key(&e.key)
                    || side.contains(&e.key)
                    || self.unacked_keys.contains_key(&e.key)
                    || gone.contains(&e.key)
                {
                    continue;
                }
                let size = e.message.body.len() as u64;
                self.disk_only.sub(size);
                if e.loc == Loc::Stored {
                    self.disk_only_stored.sub(size);
                }
                let (enqueued_at_ms, expires_at_ms) = (e.message.enqueued_at_ms, e.message.expires_at_ms);
                let data = e.message.into_data();
                let msg = QMsg {
                    key: e.key,
                    size,
                    mem: data.mem_size(),
                    ticket: 0,
                    delivery_count: e.delivery_count,
                    loc: e.loc,
                    enqueued_at_ms,
                    expires_at_ms,
                    data: Arc::new(data),
                };
                self.window_tally.add(msg.mem);
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
        // A head that was on disk can now be dropped by a length limit.
        self.enforce_limits(fx);
        self.maybe_refill(fx);
    }

    /// A refill read failed: forget it and place what waited for it; the
    /// next round asks again.
    pub fn refill_failed(&mut self, fx: &mut Effects) {
        self.refill_in_flight = false;
        self.gone_during_refill.clear();
        self.epoch += 1;
        for msg in std::mem::take(&mut self.side) {
            self.place(msg, fx);
        }
        self.enforce_window(fx);
    }

    // -------------------------------------------------------------- timers

    /// When the queue next needs its timers looked at (expiry, delays,
    /// `x-expires`), for the owner task's sleep.
    pub fn next_deadline(&self) -> Option<u64> {
        [self.timer_deadline(), self.expires_at()].into_iter().flatten().min()
    }

    /// When a message expiry or a delay is next due (not `x-expires`).
    pub fn timer_deadline(&self) -> Option<u64> {
        if self.timer_in_flight {
            return None;
        }
        // An expiry is due once its time has passed.
        [self.next_expiry.map(|t| t.saturating_add(1)), self.next_delay].into_iter().flatten().min()
    }

    /// `x-expires`: when the queue will have gone unused for its period,
    /// if nothing uses it before (none while it has consumers, nor before
    /// its clock starts: a replicated queue's starts with its first entry).
    pub fn expires_at(&self) -> Option<u64> {
        let expires = self.args.expires_ms?;
        (self.consumers.is_empty() && self.last_used != 0).then(|| self.last_used.saturating_add(expires))
    }

    /// Asks for a timer read when an expiry or a delay is due.
    pub fn poll_timers(&mut self, fx: &mut Effects) {
        if self.timer_in_flight {
            return;
        }
        if self.next_expiry.is_some_and(|t| t < self.now) || self.next_delay.is_some_and(|t| t <= self.now) {
            self.timer_in_flight = true;
            self.consumed_during_timer.clear();
            // What arrives while the read is in flight sets these again.
            self.next_expiry = None;
            self.next_delay = None;
            fx.timer_read = Some(TimerRequest { epoch: self.timer_epoch, now: self.now, limit: TIMER_BATCH });
        }
    }

    /// `x-expires`: unused (no consumers, no get, no declare) for its period.
    pub fn unused_too_long(&self) -> bool {
        self.expires_at().is_some_and(|at| self.now >= at)
    }

    /// Counts as a use for `x-expires` (a declare).
    pub fn touch(&mut self) {
        self.last_used = self.now;
    }

    /// `x-expires` on a replicated queue: marks it expired if, at the
    /// current time, it has gone unused for its period (no consumer since,
    /// nothing else used it). From then on no consumer attaches, and the
    /// queue is deleted; a use that came first keeps it.
    pub fn expire(&mut self) -> Result<()> {
        if self.expired {
            return Ok(());
        }
        match self.expires_at() {
            Some(at) if at <= self.now => {
                self.expired = true;
                Ok(())
            }
            _ => Err(Error::PreconditionFailed(format!("queue '{}' is in use: it does not expire", self.name))),
        }
    }

    /// Whether [`QueueState::expire`] marked the queue expired.
    pub fn is_expired(&self) -> bool {
        self.expired
    }

    /// A timer read failed: ask again on the next poll.
    pub fn timer_failed(&mut self) {
        self.timer_in_flight = false;
        self.consumed_during_timer.clear();
        self.next_expiry = Some(self.now);
        self.next_delay = Some(self.now);
    }

    /// Takes a timer read: expires what is due, wherever it is, and makes
    /// due delayed messages ready.
    pub fn timer_done(&mut self, epoch: u64, mut result: TimerResult, fx: &mut Effects) {
        self.timer_in_flight = false;
        let consumed = std::mem::take(&mut self.consumed_during_timer);
        if epoch == self.timer_epoch {
            for e in std::mem::take(&mut result.expired) {
                self.expire_due(e, &consumed, &mut result.bodies, fx);
            }
        }
        for d in result.delayed {
            fx.ops.push(Op::Delete(d.cf, d.index_key));
            self.delayed = self.delayed.saturating_sub(1);
            if d.cf == Cf::Delays {
                fx.counters = fx.counters.merge(&QueueCounters { delayed: -1, ..Default::default() });
                fx.sync = true;
            }
            let data = Arc::new(d.message.into_data());
            if self.refuses(&data).is_some() {
                if self.args.overflow == Overflow::RejectPublishDlx {
                    self.dead_letter(data, DeathReason::Maxlen, fx);
                } else {
                    fx.dropped.push(DeathReason::Maxlen);
                }
            } else {
                self.admit(data, fx);
            }
        }
        let merge = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        self.next_expiry = merge(self.next_expiry, result.next_expiry);
        self.next_delay = merge(self.next_delay, result.next_delay);
        if result.more {
            self.next_expiry = Some(self.now);
            self.next_delay = Some(self.now);
        }
        self.maybe_refill(fx);
    }

    /// One due expiry index entry.
    fn expire_due(
        &mut self,
        e: DueExpiry,
        consumed: &HashSet<MsgKey>,
        bodies: &mut HashMap<MsgKey, (Loc, StoredMessage, u32)>,
        fx: &mut Effects,
    ) {
        let index_key = keys::encode_time(self.id, e.due, e.key).to_vec();
        if consumed.contains(&e.key) {
            // Consumed since the read: its entry went with it.
            return;
        }
        let now = self.now;
        let stale = |at: Option<u64>| at.is_none_or(|t| t >= now);
        if let Some(msg) = self.window.get(&e.key) {
            if stale(msg.expires_at_ms) {
                fx.ops.push(Op::Delete(e.cf, index_key));
                return;
            }
            if let Some(msg) = self.window.remove(&e.key) {
                self.window_tally.sub(msg.mem);
                self.ready.sub(msg.size);
                self.remove_and_dead_letter(msg, DeathReason::Expired, fx);
            }
            return;
        }
        if let Some(pos) = self.side.iter().position(|m| m.key == e.key) {
            if stale(self.side[pos].expires_at_ms) {
                fx.ops.push(Op::Delete(e.cf, index_key));
                return;
            }
            let msg = self.side.remove(pos);
            self.ready.sub(msg.size);
            self.remove_and_dead_letter(msg, DeathReason::Expired, fx);
            return;
        }
        let unacked = self.unacked_keys.contains_key(&e.key);
        let disk_only = !unacked && self.frontier.is_some_and(|f| e.key >= f);
        match bodies.remove(&e.key) {
            Some((loc, stored, delivery_count)) if disk_only && !stale(stored.expires_at_ms) => {
                let (enqueued_at_ms, expires_at_ms) = (stored.enqueued_at_ms, stored.expires_at_ms);
                let data = stored.into_data();
                let msg = QMsg {
                    key: e.key,
                    size: data.body.len() as u64,
                    mem: data.mem_size(),
                    ticket: 0,
                    delivery_count,
                    loc,
                    enqueued_at_ms,
                    expires_at_ms,
                    data: Arc::new(data),
                };
                self.disk_only.sub(msg.size);
                if loc == Loc::Stored {
                    self.disk_only_stored.sub(msg.size);
                }
                self.ready.sub(msg.size);
                self.remove_and_dead_letter(msg, DeathReason::Expired, fx);
            }
            // Unacknowledged: it expires when it comes back (requeue checks),
            // but a crash brings it back without that check. Look again in a
            // second, so that the sweep never stalls on it.
            _ if unacked => {
                let later = self.now.saturating_add(UNACKED_RECHECK_MS);
                fx.ops.push(Op::Delete(e.cf, index_key));
                fx.ops.push(Op::Put(e.cf, keys::encode_time(self.id, later, e.key).to_vec(), Vec::new()));
                self.next_expiry = Some(self.next_expiry.map_or(later, |n| n.min(later)));
            }
            // Already gone: the entry has done its job.
            _ => fx.ops.push(Op::Delete(e.cf, index_key)),
        }
    }

    // ----------------------------------------------------------- consumers

    pub fn add_consumer(&mut self, spec: ConsumerSpec) -> Result<ConsumerId> {
        if self.expired {
            // Unused for its x-expires period: as good as deleted.
            return Err(Error::not_found("queue", self.name.to_string()));
        }
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
        self.consumers.push(Consumer { id, spec, next_tag: 1, unacked: BTreeMap::new(), unacked_mem: 0 });
        if self.replicated {
            self.dirty_consumers.insert(id);
        }
        self.had_consumer = true;
        self.last_used = self.now;
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
        self.last_used = self.now;
        if self.replicated {
            self.forget_consumer(consumer.id, fx);
        }
        for (_, msg) in consumer.unacked {
            self.unacked -= 1;
            self.unacked_keys.remove(&msg.key);
            if self.replicated {
                self.forget_checkout(msg.key, fx);
            }
            self.requeue(msg, fx);
        }
        true
    }

    pub fn set_prefetch(&mut self, id: ConsumerId, prefetch: u32) {
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
            c.spec.prefetch = prefetch;
            if self.replicated {
                self.dirty_consumers.insert(id);
            }
        }
    }

    /// Returns a delivered message to the ready set, unless it expired
    /// meanwhile or has used up its delivery limit.
    fn requeue(&mut self, msg: QMsg, fx: &mut Effects) {
        if msg.is_expired(self.now) {
            self.remove_and_dead_letter(msg, DeathReason::Expired, fx);
            return;
        }
        if self.over_delivery_limit(&msg) {
            self.remove_and_dead_letter(msg, DeathReason::DeliveryLimit, fx);
            return;
        }
        // Its index entry may have been consumed while it was out (a due
        // entry of an unacked message is dropped); writing it again is
        // idempotent.
        self.index_expiry(&msg, fx);
        self.ready.add(msg.size);
        self.place(msg, fx);
        self.enforce_limits(fx);
    }

    /// Delivered more times than `x-delivery-limit` allows.
    fn over_delivery_limit(&self, msg: &QMsg) -> bool {
        self.args.delivery_limit.is_some_and(|limit| msg.delivery_count > limit)
    }

    /// Removes a message for good: acked, auto-acked, discarded, expired,
    /// dead-lettered.
    fn consume(&mut self, msg: &QMsg, fx: &mut Effects) {
        match msg.loc {
            Loc::Stored => {
                fx.ops.push(Op::Delete(Cf::Messages, self.msg_key(Record::Message, msg.key)));
                if msg.delivery_count > 0 {
                    fx.ops.push(Op::Delete(Cf::Messages, self.msg_key(Record::Deliveries, msg.key)));
                }
                fx.counters = fx.counters.merge(&QueueCounters { messages: -1, bytes: -(msg.size as i64), max_seq: 0, delayed: 0 });
                fx.sync = true;
            }
            Loc::Paged => fx.ops.push(Op::Delete(Cf::Paged, self.msg_key(Record::Message, msg.key))),
            Loc::Memory => {}
        }
        if let Some(at) = msg.expires_at_ms {
            fx.ops.push(Op::Delete(msg.expiry_cf(), keys::encode_time(self.id, at, msg.key).to_vec()));
        }
        if self.timer_in_flight {
            self.consumed_during_timer.insert(msg.key);
        }
        if self.refill_in_flight && msg.loc != Loc::Memory {
            self.gone_during_refill.insert(msg.key);
        }
    }

    /// Takes the first ready message out of the window.
    fn pop_ready(&mut self) -> Option<QMsg> {
        let (_, msg) = self.window.pop_first()?;
        self.window_tally.sub(msg.mem);
        self.ready.sub(msg.size);
        Some(msg)
    }

    /// Takes the first ready message that may be delivered: expired ones and
    /// ones over the delivery limit leave the queue on the way.
    fn pop_deliverable(&mut self, fx: &mut Effects) -> Option<QMsg> {
        loop {
            let msg = self.pop_ready()?;
            if msg.is_expired(self.now) {
                self.remove_and_dead_letter(msg, DeathReason::Expired, fx);
            } else if self.over_delivery_limit(&msg) {
                self.remove_and_dead_letter(msg, DeathReason::DeliveryLimit, fx);
            } else {
                return Some(msg);
            }
        }
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
    /// priority first, round-robin among equals, within each consumer's
    /// prefetch and memory bound and within `room(consumer)` (what its
    /// outgoing buffer can take now).
    pub fn dispatch(&mut self, fx: &mut Effects, room: &mut dyn FnMut(ConsumerId) -> Room) {
        if self.consumers.is_empty() {
            self.maybe_refill(fx);
            return;
        }
        let active = self.active_consumer();
        let limits = self.limits;
        let mut credit: Vec<Room> = self
            .consumers
            .iter()
            .map(|c| if active.is_some_and(|a| a != c.id) { Room::NONE } else { c.credit(&limits, room(c.id), self.replicated) })
            .collect();
        while let Some(next_mem) = self.window.first_key_value().map(|(_, m)| m.mem) {
            let fits = |r: &Room| r.messages > 0 && (r.bytes >= next_mem || r.empty);
            let n = self.consumers.len();
            let Some(best) = (0..n).filter(|i| fits(&credit[*i])).map(|i| self.consumers[i].spec.priority).max() else {
                break;
            };
            let Some(idx) = (0..n).map(|k| (self.rr + k) % n).find(|i| fits(&credit[*i]) && self.consumers[*i].spec.priority == best)
            else {
                break;
            };
            let Some(mut msg) = self.pop_deliverable(fx) else { break };
            if msg.mem != next_mem && !(credit[idx].bytes >= msg.mem || credit[idx].empty) {
                // Expired messages left the head on the way and the new head
                // does not fit this consumer: it stays the head; choose again.
                self.ready.add(msg.size);
                self.window_tally.add(msg.mem);
                self.window.insert(msg.key, msg);
                continue;
            }
            // A replicated queue holds auto-ack deliveries until settled.
            let settles_now = self.consumers[idx].spec.auto_ack && !self.replicated;
            let redelivered = self.count_delivery(&mut msg, !settles_now, fx);
            let consumer_id = self.consumers[idx].id;
            let tag = {
                let c = &mut self.consumers[idx];
                let tag = c.next_tag;
                c.next_tag = c.next_tag.saturating_add(1);
                tag
            };
            if settles_now {
                self.consume(&msg, fx);
            } else {
                let c = &mut self.consumers[idx];
                c.unacked_mem = c.unacked_mem.saturating_add(msg.mem);
                c.unacked.insert(tag, msg.clone());
                self.unacked_keys.insert(msg.key, consumer_id);
                self.unacked += 1;
                if self.replicated {
                    self.record_checkout(msg.key, consumer_id, tag, fx);
                    self.dirty_consumers.insert(consumer_id);
                }
            }
            let r = &mut credit[idx];
            r.messages -= 1;
            r.bytes = r.bytes.saturating_sub(msg.mem);
            r.empty = false;
            self.rr = (idx + 1) % n;
            fx.deliveries.push(OutDelivery { consumer: consumer_id, tag, redelivered, msg });
        }
        self.maybe_refill(fx);
    }

    fn take_unacked(&mut self, id: ConsumerId, tag: u64, multiple: bool, fx: &mut Effects) -> Result<Vec<QMsg>> {
        let name = self.name.clone();
        let c = self
            .consumers
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| Error::PreconditionFailed(format!("consumer is no longer subscribed to queue '{name}'")))?;
        let taken: Vec<QMsg> = if multiple {
            // Everything up to and including `tag`; 0 (and u64::MAX) mean
            // everything.
            let keep = match tag.checked_add(1) {
                Some(above) if tag != 0 => c.unacked.split_off(&above),
                _ => BTreeMap::new(),
            };
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
        for m in &taken {
            c.unacked_mem = c.unacked_mem.saturating_sub(m.mem);
            self.unacked_keys.remove(&m.key);
        }
        self.unacked -= taken.len() as u64;
        if self.replicated {
            for m in &taken {
                self.forget_checkout(m.key, fx);
            }
        }
        Ok(taken)
    }

    pub fn ack(&mut self, id: ConsumerId, tag: u64, multiple: bool, fx: &mut Effects) -> Result<()> {
        for msg in self.take_unacked(id, tag, multiple, fx)? {
            self.consume(&msg, fx);
        }
        Ok(())
    }

    /// Negative acknowledgement (nack and reject): requeue, or discard
    /// (dead-letter with reason `rejected`).
    pub fn nack(&mut self, id: ConsumerId, tag: u64, multiple: bool, requeue: bool, fx: &mut Effects) -> Result<()> {
        for msg in self.take_unacked(id, tag, multiple, fx)? {
            if requeue {
                self.requeue(msg, fx);
            } else {
                self.remove_and_dead_letter(msg, DeathReason::Rejected, fx);
            }
        }
        Ok(())
    }

    // --------------------------------------------------------- get, purge

    /// Pulls up to `max` messages holding at most `max_bytes` memory bytes
    /// (one message always, whatever its size), so that the reply can be
    /// sent: nothing is taken that cannot be returned. With `ack` they are
    /// removed; without, they stay in the queue unchanged (a peek: not
    /// counted as a delivery).
    pub fn get(&mut self, max: usize, max_bytes: u64, ack: bool, fx: &mut Effects) -> GetOutcome {
        if self.window.is_empty() && self.backlog_on_disk() {
            self.maybe_refill(fx);
            return GetOutcome::NeedRefill;
        }
        self.last_used = self.now;
        let mut out: Vec<OutDelivery> = Vec::new();
        let mut back = Vec::new();
        let mut bytes = 0u64;
        while out.len() < max {
            if let Some((_, head)) = self.window.first_key_value()
                && !out.is_empty()
                && bytes.saturating_add(head.mem) > max_bytes
            {
                break;
            }
            let Some(mut msg) = self.pop_deliverable(fx) else { break };
            if !out.is_empty() && bytes.saturating_add(msg.mem) > max_bytes {
                // Expired heads went on the way and this one does not fit:
                // it stays at the head.
                self.ready.add(msg.size);
                self.window_tally.add(msg.mem);
                self.window.insert(msg.key, msg);
                break;
            }
            bytes = bytes.saturating_add(msg.mem);
            let redelivered = if ack {
                let r = self.count_delivery(&mut msg, false, fx);
                self.consume(&msg, fx);
                r
            } else {
                // A peek is read-only: the message goes back unchanged and
                // does not count as a delivery (nor toward x-delivery-limit).
                back.push(msg.clone());
                let seen = msg.delivery_count > 0;
                // What the caller sees counts this look.
                msg.delivery_count = msg.delivery_count.saturating_add(1);
                seen
            };
            out.push(OutDelivery { consumer: 0, tag: out.len() as u64 + 1, redelivered, msg });
        }
        for msg in back {
            self.requeue(msg, fx);
        }
        if out.is_empty() && self.window.is_empty() && self.backlog_on_disk() {
            // Every message in memory had expired; ready ones remain on disk.
            self.maybe_refill(fx);
            return GetOutcome::NeedRefill;
        }
        self.maybe_refill(fx);
        GetOutcome::Messages(out)
    }

    /// Ready messages that are not in the window: on disk, or waiting for a
    /// refill to place them.
    fn backlog_on_disk(&self) -> bool {
        self.disk_only.count > 0 || !self.side.is_empty()
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
        let mut cut_from = None;
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
                delayed: 0,
            });
            fx.sync = true;
            cut_from = Some(from);
        }
        // The expiry index of the purged messages goes too, whole (so that
        // the index after a purge is the same whatever was in memory), and
        // the entries of unacknowledged messages are written back; so are
        // unacknowledged messages above the frontier, which the range
        // deletes caught.
        let (start, end) = (keys::queue_start(self.id).to_vec(), keys::queue_end(self.id));
        fx.ops.push(Op::DeleteRange(Cf::Expiry, start.clone(), end.clone()));
        fx.ops.push(Op::DeleteRange(Cf::ExpiryTransient, start, end));
        let unacked: Vec<QMsg> = self.consumers.iter().flat_map(|c| c.unacked.values()).cloned().collect();
        for m in unacked {
            if let Some(from) = cut_from
                && m.key >= from
                && m.loc != Loc::Memory
            {
                let cf = if m.loc == Loc::Stored { Cf::Messages } else { Cf::Paged };
                let mut record = m.stored_form();
                if m.loc == Loc::Stored {
                    // As first written: a stored message's count is in its
                    // own `Deliveries` record.
                    record.delivery_count = 0;
                }
                fx.ops.push(Op::Put(cf, self.msg_key(Record::Message, m.key), record.encode_to_vec()));
                if m.loc == Loc::Stored && m.delivery_count > 0 {
                    fx.ops.push(Op::Put(Cf::Messages, self.msg_key(Record::Deliveries, m.key), m.delivery_count.to_le_bytes().to_vec()));
                }
            }
            self.index_expiry(&m, fx);
        }
        self.disk_only = Tally::default();
        self.disk_only_stored = Tally::default();
        self.ready = Tally::default();
        // A refill or timer read in flight now reads a stale range: ignore
        // what it says about ready messages.
        self.epoch += 1;
        self.timer_epoch += 1;
        purged
    }

    /// The writes that delete the queue's data; the caller adds its metadata
    /// removal to the same batch.
    pub fn delete_ops(&self) -> Vec<Op> {
        delete_queue_ops(self.id)
    }

    /// The delivery tags consumer `id` holds unacknowledged, in order.
    pub fn held_tags(&self, id: ConsumerId) -> Vec<u64> {
        self.consumers.iter().find(|c| c.id == id).map(|c| c.unacked.keys().copied().collect()).unwrap_or_default()
    }

    /// The ids of the consumers, in subscription order.
    pub fn consumer_ids(&self) -> Vec<ConsumerId> {
        self.consumers.iter().map(|c| c.id).collect()
    }

    /// Takes stored messages that are not ready (checked out) out of a
    /// recovered backlog that counted them as ready and on disk.
    fn remove_from_backlog(&mut self, held: Tally) {
        self.ready.count = self.ready.count.saturating_sub(held.count);
        self.ready.bytes = self.ready.bytes.saturating_sub(held.bytes);
        self.disk_only.count = self.disk_only.count.saturating_sub(held.count);
        self.disk_only.bytes = self.disk_only.bytes.saturating_sub(held.bytes);
        self.disk_only_stored.count = self.disk_only_stored.count.saturating_sub(held.count);
        self.disk_only_stored.bytes = self.disk_only_stored.bytes.saturating_sub(held.bytes);
    }

    /// Everything held: ready and unacknowledged.
    pub fn message_count(&self) -> u64 {
        self.ready.count + self.unacked
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let window_bytes: u64 = self.window.values().map(|m| m.mem).sum();
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

mod replicated;
pub use replicated::{CheckoutRecord, ConsumerRecord, StateRecord};

#[cfg(test)]
mod tests;
