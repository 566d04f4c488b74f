//! Reading a queue's disk-only messages back (refill), merging the
//! `messages` and `paged` column families in key order.

use bytes::Bytes;

use super::state::{DueDelay, DueExpiry, Loc, RefillEntry, RefillRequest, TimerRequest, TimerResult};
use crate::model::StoredMessage;
use crate::store::counters::QueueCounters;
use crate::store::keys::{self, QueueId, Record};
use crate::store::{Cf, Reader, StoreError};

/// Reads up to `req.max_messages` messages (and about `req.max_bytes` body
/// bytes, at least one message) from `req.from` on. Returns them in key
/// order, and whether the read reached the end of the queue's range.
pub fn read_refill(engine: &dyn Reader, queue: QueueId, req: &RefillRequest) -> Result<(Vec<RefillEntry>, bool), StoreError> {
    let (stored, stored_done) = read_cf(engine, Cf::Messages, queue, req)?;
    let (paged, paged_done) = read_cf(engine, Cf::Paged, queue, req)?;
    // A list that stopped early only vouches for keys up to its last one.
    let bound = [(&stored, stored_done), (&paged, paged_done)]
        .iter()
        .filter(|(list, done)| !done && !list.is_empty())
        .filter_map(|(list, _)| list.last().map(|e| e.key))
        .min();
    let mut merged: Vec<RefillEntry> = stored.into_iter().chain(paged).filter(|e| bound.is_none_or(|b| e.key <= b)).collect();
    merged.sort_by_key(|e| e.key);
    let mut exhausted = stored_done && paged_done;
    let mut bytes = 0u64;
    let mut keep = 0;
    for e in &merged {
        if keep >= req.max_messages || (keep > 0 && bytes >= req.max_bytes) {
            break;
        }
        bytes += e.message.mem_size();
        keep += 1;
    }
    if keep < merged.len() {
        merged.truncate(keep);
        exhausted = false;
    }
    Ok((merged, exhausted))
}

fn read_cf(engine: &dyn Reader, cf: Cf, queue: QueueId, req: &RefillRequest) -> Result<(Vec<RefillEntry>, bool), StoreError> {
    let from = keys::encode_msg(queue, req.from, Record::Message);
    let to = keys::queue_end(queue);
    // Each message has at most two records (itself and its delivery count).
    let want = req.max_messages.saturating_mul(2).saturating_add(2);
    let rows = engine.scan(cf, &from, &to, want)?;
    let scanned_all = rows.len() < want;
    let mut out: Vec<RefillEntry> = Vec::new();
    let mut bytes = 0u64;
    let mut stopped = false;
    for (k, v) in rows {
        let Some((q, key, record)) = keys::decode_msg(&k) else {
            return Err(StoreError::Corrupt { cf: cf.name(), detail: format!("malformed message key {k:02x?}") });
        };
        if q != queue {
            break;
        }
        match record {
            Record::Message => {
                if out.len() >= req.max_messages || (!out.is_empty() && bytes >= req.max_bytes) {
                    stopped = true;
                    break;
                }
                let message = StoredMessage::decode_bytes(Bytes::from(v))?;
                bytes += message.mem_size();
                let delivery_count = if cf == Cf::Paged { message.delivery_count } else { 0 };
                out.push(RefillEntry { key, loc: if cf == Cf::Paged { Loc::Paged } else { Loc::Stored }, message, delivery_count });
            }
            Record::Deliveries => {
                if let Some(last) = out.last_mut()
                    && last.key == key
                    && let Ok(raw) = <[u8; 4]>::try_from(v.as_slice())
                {
                    last.delivery_count = u32::from_le_bytes(raw);
                }
            }
        }
    }
    Ok((out, scanned_all && !stopped))
}

/// Reads a queue's due timers: expiry index entries and delayed messages due
/// at or before `req.now` (up to `req.limit` of each kind), the stored
/// bodies of the due expiry entries, and the next due times.
pub fn read_timers(engine: &dyn Reader, queue: QueueId, req: &TimerRequest) -> Result<TimerResult, StoreError> {
    let start = keys::queue_start(queue);
    // A message expires once its expiry time has passed (`at < now`); a
    // delayed message is due at its time (`at <= now`).
    let expired_end = if req.now == 0 { start.to_vec() } else { keys::time_bound(queue, req.now - 1) };
    let due_end = keys::time_bound(queue, req.now);
    let end = keys::queue_end(queue);
    let corrupt = |cf: Cf, k: &[u8]| StoreError::Corrupt { cf: cf.name(), detail: format!("malformed time key {k:02x?}") };
    let next_due = |cf: Cf, from: &[u8]| -> Result<Option<u64>, StoreError> {
        match engine.scan(cf, from, &end, 1)?.first() {
            Some((k, _)) => keys::decode_time(k).map(|(_, due, _)| Some(due)).ok_or_else(|| corrupt(cf, k)),
            None => Ok(None),
        }
    };
    let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    let mut out = TimerResult::default();
    for cf in [Cf::Expiry, Cf::ExpiryTransient] {
        let rows = engine.scan(cf, &start, &expired_end, req.limit)?;
        out.more |= rows.len() >= req.limit;
        for (k, _) in rows {
            let (_, due, key) = keys::decode_time(&k).ok_or_else(|| corrupt(cf, &k))?;
            out.expired.push(DueExpiry { cf, due, key });
        }
        out.next_expiry = min(out.next_expiry, next_due(cf, &expired_end)?);
    }
    for e in &out.expired {
        let mk = keys::encode_msg(queue, e.key, Record::Message);
        if let Some(v) = engine.get(Cf::Messages, &mk)? {
            let message = StoredMessage::decode_bytes(Bytes::from(v))?;
            let count = engine
                .get(Cf::Messages, &keys::encode_msg(queue, e.key, Record::Deliveries))?
                .and_then(|raw| <[u8; 4]>::try_from(raw.as_slice()).ok())
                .map_or(0, u32::from_le_bytes);
            out.bodies.insert(e.key, (Loc::Stored, message, count));
        } else if let Some(v) = engine.get(Cf::Paged, &mk)? {
            let message = StoredMessage::decode_bytes(Bytes::from(v))?;
            let count = message.delivery_count;
            out.bodies.insert(e.key, (Loc::Paged, message, count));
        }
    }
    for cf in [Cf::Delays, Cf::DelaysTransient] {
        let rows = engine.scan(cf, &start, &due_end, req.limit)?;
        out.more |= rows.len() >= req.limit;
        for (k, v) in rows {
            let message = StoredMessage::decode_bytes(Bytes::from(v))?;
            out.delayed.push(DueDelay { cf, index_key: k, message });
        }
        out.next_delay = min(out.next_delay, next_due(cf, &due_end)?);
    }
    Ok(out)
}

/// Dead-lettered messages waiting in queues' inboxes (left by a crash
/// between the two halves of a move), by queue.
pub fn read_inboxes(engine: &dyn Reader) -> Result<Vec<(QueueId, Vec<u8>, StoredMessage)>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in engine.scan(Cf::Inbox, &[], &[0xff; 17], usize::MAX)? {
        let (queue, _) = keys::decode_inbox(&k)
            .ok_or_else(|| StoreError::Corrupt { cf: Cf::Inbox.name(), detail: format!("malformed inbox key {k:02x?}") })?;
        out.push((queue, k, StoredMessage::decode_bytes(Bytes::from(v))?));
    }
    Ok(out)
}

/// What a queue needs to start again from the store alone (after a storage
/// failure left its memory out of step with the disk).
pub struct QueueRecovery {
    pub counters: QueueCounters,
    /// Deduplication window: (message id, window end).
    pub dedup: Vec<(String, u64)>,
    /// Dead-lettered messages waiting in its inbox.
    pub inbox: Vec<(Vec<u8>, StoredMessage)>,
}

/// Reads one queue's counters, deduplication window and inbox.
pub fn read_queue_recovery(engine: &dyn Reader, queue: QueueId, now_ms: u64) -> Result<QueueRecovery, StoreError> {
    let counters = engine
        .get(Cf::QueueState, &keys::encode_queue_state(queue))?
        .map(|v| {
            QueueCounters::decode(&v)
                .ok_or_else(|| StoreError::Corrupt { cf: Cf::QueueState.name(), detail: format!("queue {queue} counters") })
        })
        .transpose()?
        .unwrap_or_default();
    let (start, end) = (keys::queue_start(queue), keys::queue_end(queue));
    let mut dedup = Vec::new();
    for (k, v) in engine.scan(Cf::Dedup, &start, &end, usize::MAX)? {
        let until = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).unwrap_or(0);
        if let Some((_, id)) = keys::decode_dedup(&k)
            && until > now_ms
        {
            dedup.push((id, until));
        }
    }
    let mut inbox = Vec::new();
    for (k, v) in engine.scan(Cf::Inbox, &start, &end, usize::MAX)? {
        inbox.push((k, StoredMessage::decode_bytes(Bytes::from(v))?));
    }
    Ok(QueueRecovery { counters, dedup, inbox })
}

/// The writes that drop a queue's data that never outlives a restart
/// (paged messages, transient delays and expiry entries): what a restart
/// does at open, for one queue.
pub fn clear_transient_ops(queue: QueueId) -> Vec<crate::store::Op> {
    let (start, end) = (keys::queue_start(queue).to_vec(), keys::queue_end(queue));
    Cf::TRANSIENT.iter().map(|cf| crate::store::Op::DeleteRange(*cf, start.clone(), end.clone())).collect()
}
