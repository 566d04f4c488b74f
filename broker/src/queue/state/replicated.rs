//! A queue state as a replicated state machine.
//!
//! The same [`QueueState`] serves classic and replicated (quorum) queues. A
//! replicated one differs in three ways:
//!
//! * **Everything logical is in the store.** Besides messages, counters,
//!   delivery counts and deduplication ids (which every durable queue
//!   stores), it writes its state record (sequence counter, consumer ids,
//!   round-robin position, last use, clock), one record per consumer and one
//!   per checked-out message, in the batch of the entry that changed them.
//!   So [`QueueState::restore_replicated`] rebuilds, from the store alone,
//!   the state of a replica that never stopped: a restart or a snapshot
//!   install never makes replicas disagree.
//! * **Auto-ack deliveries are held until settled**, bounded like
//!   unacknowledged ones; the leader settles them once written to the
//!   consumer's stream. Nothing depends on a node-local buffer.
//! * **Reads are synchronous** (the replica reads through an overlay of the
//!   batch being applied), so the in-memory window never changes a decision.
//!
//! Memory that is not logical (the window, the frontier, timer hints) is
//! rebuilt by reading.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;

use super::{Consumer, ConsumerId, ConsumerLimits, ConsumerSpec, Effects, Limits, Loc, QMsg, QueueState, SeqAllocator, Tally};
use crate::model::{QueueArgs, StoredMessage};
use crate::store::counters::QueueCounters;
use crate::store::keys::{self, MsgKey, QueueId, Record, replica};
use crate::store::{Cf, Op, Reader, StoreError};

/// The state record of a replicated queue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateRecord {
    #[prost(uint64, tag = "1")]
    pub next_seq: u64,
    #[prost(uint64, tag = "2")]
    pub next_consumer: u64,
    #[prost(uint64, tag = "3")]
    pub rr: u64,
    #[prost(bool, tag = "4")]
    pub had_consumer: bool,
    #[prost(uint64, tag = "5")]
    pub last_used: u64,
    #[prost(uint64, tag = "6")]
    pub now: u64,
    /// `x-expires` ran out: the queue is being deleted.
    #[prost(bool, tag = "7")]
    pub expired: bool,
}

/// A consumer of a replicated queue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConsumerRecord {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(uint32, tag = "2")]
    pub prefetch: u32,
    #[prost(bool, tag = "3")]
    pub auto_ack: bool,
    #[prost(bool, tag = "4")]
    pub exclusive: bool,
    #[prost(int32, tag = "5")]
    pub priority: i32,
    #[prost(string, tag = "6")]
    pub peer: String,
    #[prost(uint64, tag = "7")]
    pub next_tag: u64,
    #[prost(uint32, tag = "8")]
    pub max_unacked: u32,
    #[prost(uint64, tag = "9")]
    pub max_unacked_bytes: u64,
}

/// Who holds a checked-out message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckoutRecord {
    #[prost(uint64, tag = "1")]
    pub consumer: u64,
    #[prost(uint64, tag = "2")]
    pub tag: u64,
}

fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { cf: Cf::Replica.name(), detail: detail.into() }
}

impl QueueState {
    /// A new replicated queue (always durable: its messages are stored).
    pub fn new_replicated(id: QueueId, name: Arc<str>, args: QueueArgs, limits: Limits) -> QueueState {
        let mut q = QueueState::new(id, name, true, args, limits, Arc::new(SeqAllocator::starting_at(1)));
        q.replicated = true;
        q
    }

    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    pub(crate) fn record_checkout(&self, key: MsgKey, consumer: ConsumerId, tag: u64, fx: &mut Effects) {
        fx.ops.push(Op::Put(Cf::Replica, replica::checkout(self.id, key), CheckoutRecord { consumer, tag }.encode_to_vec()));
    }

    pub(crate) fn forget_checkout(&self, key: MsgKey, fx: &mut Effects) {
        fx.ops.push(Op::Delete(Cf::Replica, replica::checkout(self.id, key)));
    }

    pub(crate) fn forget_consumer(&mut self, id: ConsumerId, fx: &mut Effects) {
        self.dirty_consumers.remove(&id);
        fx.ops.push(Op::Delete(Cf::Replica, replica::consumer(self.id, id)));
    }

    /// Writes what the entry just applied changed besides messages: the
    /// state record, and the records of consumers it touched. Called once
    /// per applied entry.
    pub fn write_replica_records(&mut self, fx: &mut Effects) {
        if !self.replicated {
            return;
        }
        let record = StateRecord {
            next_seq: self.seqs.peek(),
            next_consumer: self.next_consumer,
            rr: self.rr as u64,
            had_consumer: self.had_consumer,
            last_used: self.last_used,
            now: self.now,
            expired: self.expired,
        };
        fx.ops.push(Op::Put(Cf::Replica, replica::state(self.id), record.encode_to_vec()));
        for id in std::mem::take(&mut self.dirty_consumers) {
            let Some(c) = self.consumers.iter().find(|c| c.id == id) else { continue };
            let limits = c.spec.limits.unwrap_or_else(|| self.limits.consumer());
            let record = ConsumerRecord {
                tag: c.spec.tag.to_string(),
                prefetch: c.spec.prefetch,
                auto_ack: c.spec.auto_ack,
                exclusive: c.spec.exclusive,
                priority: c.spec.priority,
                peer: c.spec.peer.clone(),
                next_tag: c.next_tag,
                max_unacked: limits.max_unacked,
                max_unacked_bytes: limits.max_unacked_bytes,
            };
            fx.ops.push(Op::Put(Cf::Replica, replica::consumer(self.id, id), record.encode_to_vec()));
        }
    }

    /// Settles deliveries of an auto-ack consumer once the leader has sent
    /// them: they leave the queue, as acknowledged.
    pub fn settle(&mut self, consumer: ConsumerId, tags: &[u64], fx: &mut Effects) {
        for tag in tags {
            // A tag settled twice (a resend) or of a consumer that left is
            // already gone: nothing to do.
            let _ = self.ack(consumer, *tag, false, fx);
        }
    }

    /// Every consumer leaves; their unacknowledged messages return to the
    /// queue, to be redelivered. Returns who left.
    pub fn drop_consumers(&mut self, fx: &mut Effects) -> Vec<ConsumerId> {
        let ids: Vec<ConsumerId> = self.consumer_ids();
        for id in &ids {
            self.remove_consumer(*id, fx);
        }
        ids
    }

    /// A replicated queue rebuilt from its store ranges alone: equal, in
    /// everything but memory windows, to a replica that applied the same
    /// entries without stopping.
    pub fn restore_replicated(
        id: QueueId,
        name: Arc<str>,
        args: QueueArgs,
        limits: Limits,
        store: &dyn Reader,
    ) -> Result<QueueState, StoreError> {
        let counters = match store.get(Cf::QueueState, &keys::encode_queue_state(id))? {
            Some(v) => QueueCounters::decode(&v).ok_or_else(|| corrupt(format!("queue {id} counters")))?,
            None => QueueCounters::default(),
        };
        let record = match store.get(Cf::Replica, &replica::state(id))? {
            Some(v) => StateRecord::decode(v.as_slice()).map_err(|e| corrupt(format!("queue {id} state record: {e}")))?,
            None => StateRecord { next_seq: 1, next_consumer: 1, ..Default::default() },
        };
        let (start, end) = (keys::queue_start(id), keys::queue_end(id));
        let mut dedup = Vec::new();
        for (k, v) in store.scan(Cf::Dedup, &start, &end, usize::MAX)? {
            let until = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).map_err(|_| corrupt("dedup record"))?;
            if let Some((_, msg_id)) = keys::decode_dedup(&k) {
                dedup.push((msg_id, until));
            }
        }
        let seqs = Arc::new(SeqAllocator::starting_at(record.next_seq.max(1)));
        let mut q = QueueState::recover(id, name, args, limits, seqs, counters, dedup);
        q.replicated = true;
        q.now = record.now;
        q.next_consumer = record.next_consumer.max(1);
        q.rr = record.rr as usize;
        q.had_consumer = record.had_consumer;
        q.last_used = record.last_used;
        q.expired = record.expired;

        // Consumers, then what they hold.
        let (from, to) = replica::kind_range(id, replica::CONSUMER);
        let mut consumers: BTreeMap<ConsumerId, Consumer> = BTreeMap::new();
        for (k, v) in store.scan(Cf::Replica, &from, &to, usize::MAX)? {
            let cid = replica::decode_id(&k).ok_or_else(|| corrupt("consumer key"))?;
            let r = ConsumerRecord::decode(v.as_slice()).map_err(|e| corrupt(format!("consumer record: {e}")))?;
            let spec = ConsumerSpec {
                tag: r.tag.as_str().into(),
                prefetch: r.prefetch,
                auto_ack: r.auto_ack,
                exclusive: r.exclusive,
                priority: r.priority,
                peer: r.peer,
                limits: Some(ConsumerLimits { max_unacked: r.max_unacked, max_unacked_bytes: r.max_unacked_bytes }),
            };
            consumers.insert(cid, Consumer { id: cid, spec, next_tag: r.next_tag, unacked: BTreeMap::new(), unacked_mem: 0 });
        }
        let (from, to) = replica::kind_range(id, replica::CHECKOUT);
        let mut held = Tally::default();
        for (k, v) in store.scan(Cf::Replica, &from, &to, usize::MAX)? {
            let key = replica::decode_checkout(&k).ok_or_else(|| corrupt("checkout key"))?;
            let r = CheckoutRecord::decode(v.as_slice()).map_err(|e| corrupt(format!("checkout record: {e}")))?;
            let Some(c) = consumers.get_mut(&r.consumer) else {
                return Err(corrupt(format!("checkout of queue {id} held by unknown consumer {}", r.consumer)));
            };
            let raw = store
                .get(Cf::Messages, &keys::encode_msg(id, key, Record::Message))?
                .ok_or_else(|| corrupt(format!("checked-out message {key:?} of queue {id} is missing")))?;
            let stored = StoredMessage::decode_bytes(bytes::Bytes::from(raw))?;
            let delivery_count = match store.get(Cf::Messages, &keys::encode_msg(id, key, Record::Deliveries))? {
                Some(v) => <[u8; 4]>::try_from(v.as_slice()).map(u32::from_le_bytes).unwrap_or(0),
                None => 0,
            };
            let (enqueued_at_ms, expires_at_ms) = (stored.enqueued_at_ms, stored.expires_at_ms);
            let data = stored.into_data();
            let msg = QMsg {
                key,
                size: data.body.len() as u64,
                mem: data.mem_size(),
                ticket: 0,
                data: Arc::new(data),
                delivery_count,
                loc: Loc::Stored,
                enqueued_at_ms,
                expires_at_ms,
            };
            held.add(msg.size);
            c.unacked_mem = c.unacked_mem.saturating_add(msg.mem);
            c.unacked.insert(r.tag, msg);
            q.unacked_keys.insert(key, r.consumer);
            q.unacked += 1;
        }
        // The store's message count includes the checked-out ones; the rest
        // are ready, on disk.
        q.remove_from_backlog(held);
        q.consumers = consumers.into_values().collect();
        Ok(q)
    }
}
