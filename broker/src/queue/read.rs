//! Reading a queue's disk-only messages back (refill), merging the
//! `messages` and `paged` column families in key order.

use bytes::Bytes;

use super::state::{Loc, RefillEntry, RefillRequest};
use crate::model::StoredMessage;
use crate::store::keys::{self, QueueId, Record};
use crate::store::{Cf, Engine, StoreError};

/// Reads up to `req.max_messages` messages (and about `req.max_bytes` body
/// bytes, at least one message) from `req.from` on. Returns them in key
/// order, and whether the read reached the end of the queue's range.
pub fn read_refill(engine: &dyn Engine, queue: QueueId, req: &RefillRequest) -> Result<(Vec<RefillEntry>, bool), StoreError> {
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
        bytes += e.message.body.len() as u64;
        keep += 1;
    }
    if keep < merged.len() {
        merged.truncate(keep);
        exhausted = false;
    }
    Ok((merged, exhausted))
}

fn read_cf(engine: &dyn Engine, cf: Cf, queue: QueueId, req: &RefillRequest) -> Result<(Vec<RefillEntry>, bool), StoreError> {
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
                bytes += message.body.len() as u64;
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
