//! Key encodings. Every key is fixed-width big-endian so that RocksDB's byte
//! order is the logical order: iterating a queue's prefix yields its messages
//! in delivery order (priority first, then arrival).
//!
//! Each encoding has one `encode` and one `decode` function; the tests assert
//! that byte order equals logical order.

/// A queue's numeric identity. Names map to ids in the metadata; ids are never
/// reused, so a deleted queue's keys can never be confused with a new one's.
pub type QueueId = u64;

/// Where a message sits in its queue's delivery order: higher priority first,
/// then lower sequence number (arrival order) first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgKey {
    /// `255 - priority`, so that higher priorities sort first.
    pub prio_inv: u8,
    pub seq: u64,
}

impl MsgKey {
    /// The smallest key: the start of any queue.
    pub const MIN: MsgKey = MsgKey { prio_inv: 0, seq: 0 };

    pub fn new(priority: u8, seq: u64) -> Self {
        MsgKey { prio_inv: 255 - priority, seq }
    }

    pub fn priority(&self) -> u8 {
        255 - self.prio_inv
    }
}

/// What a key in the messages column family holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Record {
    /// The message itself.
    Message = 0,
    /// Its delivery count (written when a stored message is delivered, so
    /// that a restart marks it redelivered).
    Deliveries = 1,
}

/// Length of a message key: queue id, inverted priority, sequence, record.
pub const MSG_KEY_LEN: usize = 8 + 1 + 8 + 1;

pub fn encode_msg(queue: QueueId, key: MsgKey, record: Record) -> [u8; MSG_KEY_LEN] {
    let mut out = [0u8; MSG_KEY_LEN];
    out[..8].copy_from_slice(&queue.to_be_bytes());
    out[8] = key.prio_inv;
    out[9..17].copy_from_slice(&key.seq.to_be_bytes());
    out[17] = record as u8;
    out
}

pub fn decode_msg(bytes: &[u8]) -> Option<(QueueId, MsgKey, Record)> {
    if bytes.len() != MSG_KEY_LEN {
        return None;
    }
    let queue = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let prio_inv = bytes[8];
    let seq = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
    let record = match bytes[17] {
        0 => Record::Message,
        1 => Record::Deliveries,
        _ => return None,
    };
    Some((queue, MsgKey { prio_inv, seq }, record))
}

/// The first key of a queue's messages.
pub fn queue_start(queue: QueueId) -> [u8; 8] {
    queue.to_be_bytes()
}

/// The first key after every key of a queue (exclusive upper bound), for
/// any key that starts with the queue id: the next queue id, or for the last
/// id a run of `0xff` longer than any key.
pub fn queue_end(queue: QueueId) -> Vec<u8> {
    match queue.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 64],
    }
}

/// Key of a queue's state record (counters, next sequence number).
pub fn encode_queue_state(queue: QueueId) -> [u8; 8] {
    queue.to_be_bytes()
}

pub fn decode_queue_state(bytes: &[u8]) -> Option<QueueId> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Key of a per-queue time index (delayed messages, expiry): the queue, a
/// time in milliseconds since the Unix epoch, then the message key. A
/// queue's entries sort by time, so "everything due by now" is one prefix
/// scan.
pub const TIME_KEY_LEN: usize = 8 + 8 + 1 + 8;

pub fn encode_time(queue: QueueId, due_ms: u64, key: MsgKey) -> [u8; TIME_KEY_LEN] {
    let mut out = [0u8; TIME_KEY_LEN];
    out[..8].copy_from_slice(&queue.to_be_bytes());
    out[8..16].copy_from_slice(&due_ms.to_be_bytes());
    out[16] = key.prio_inv;
    out[17..25].copy_from_slice(&key.seq.to_be_bytes());
    out
}

pub fn decode_time(bytes: &[u8]) -> Option<(QueueId, u64, MsgKey)> {
    if bytes.len() != TIME_KEY_LEN {
        return None;
    }
    let queue = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let due = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
    let prio_inv = bytes[16];
    let seq = u64::from_be_bytes(bytes[17..25].try_into().ok()?);
    Some((queue, due, MsgKey { prio_inv, seq }))
}

/// The first time-index key after every entry of `queue` due at or before
/// `due_ms` (exclusive upper bound of "due by then").
pub fn time_bound(queue: QueueId, due_ms: u64) -> Vec<u8> {
    match due_ms.checked_add(1) {
        Some(next) => {
            let mut out = Vec::with_capacity(16);
            out.extend_from_slice(&queue.to_be_bytes());
            out.extend_from_slice(&next.to_be_bytes());
            out
        }
        None => queue_end(queue),
    }
}

/// Key of a deduplication record: the queue, then the message id.
pub fn encode_dedup(queue: QueueId, message_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + message_id.len());
    out.extend_from_slice(&queue.to_be_bytes());
    out.extend_from_slice(message_id.as_bytes());
    out
}

pub fn decode_dedup(bytes: &[u8]) -> Option<(QueueId, String)> {
    let queue = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let id = String::from_utf8(bytes.get(8..)?.to_vec()).ok()?;
    Some((queue, id))
}

/// Key of an inbox record (a dead-lettered message on its way into a
/// queue): the target queue, then a sequence number.
pub fn encode_inbox(queue: QueueId, seq: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&queue.to_be_bytes());
    out[8..].copy_from_slice(&seq.to_be_bytes());
    out
}

pub fn decode_inbox(bytes: &[u8]) -> Option<(QueueId, u64)> {
    if bytes.len() != 16 {
        return None;
    }
    Some((u64::from_be_bytes(bytes[..8].try_into().ok()?), u64::from_be_bytes(bytes[8..].try_into().ok()?)))
}

/// Keys of a replicated queue's state records (column family `replica`):
/// the queue id, a one-byte kind, then the record's identity. A queue's
/// records are one contiguous range (`queue_start..queue_end`).
pub mod replica {
    use super::{MsgKey, QueueId};

    /// The state record: sequence counter, consumer ids, round-robin
    /// position, last use, clock.
    pub const STATE: u8 = b's';
    /// A consumer: queue, kind, consumer id.
    pub const CONSUMER: u8 = b'c';
    /// A checked-out (unacknowledged) message: queue, kind, message key ->
    /// consumer id and delivery tag.
    pub const CHECKOUT: u8 = b'u';
    /// A dead-lettered message waiting to reach its target queues: queue,
    /// kind, sequence.
    pub const DEAD_LETTER: u8 = b'd';

    pub fn state(queue: QueueId) -> Vec<u8> {
        let mut out = queue.to_be_bytes().to_vec();
        out.push(STATE);
        out
    }

    pub fn consumer(queue: QueueId, id: u64) -> Vec<u8> {
        let mut out = queue.to_be_bytes().to_vec();
        out.push(CONSUMER);
        out.extend_from_slice(&id.to_be_bytes());
        out
    }

    pub fn checkout(queue: QueueId, key: MsgKey) -> Vec<u8> {
        let mut out = queue.to_be_bytes().to_vec();
        out.push(CHECKOUT);
        out.push(key.prio_inv);
        out.extend_from_slice(&key.seq.to_be_bytes());
        out
    }

    pub fn dead_letter(queue: QueueId, seq: u64) -> Vec<u8> {
        let mut out = queue.to_be_bytes().to_vec();
        out.push(DEAD_LETTER);
        out.extend_from_slice(&seq.to_be_bytes());
        out
    }

    /// The range `[from, to)` of one kind of record of a queue.
    pub fn kind_range(queue: QueueId, kind: u8) -> (Vec<u8>, Vec<u8>) {
        let mut from = queue.to_be_bytes().to_vec();
        from.push(kind);
        let mut to = queue.to_be_bytes().to_vec();
        to.push(kind + 1);
        (from, to)
    }

    /// The trailing u64 of a consumer or dead-letter key.
    pub fn decode_id(key: &[u8]) -> Option<u64> {
        if key.len() != 17 {
            return None;
        }
        Some(u64::from_be_bytes(key[9..17].try_into().ok()?))
    }

    pub fn decode_checkout(key: &[u8]) -> Option<MsgKey> {
        if key.len() != 18 || key[8] != CHECKOUT {
            return None;
        }
        Some(MsgKey { prio_inv: key[9], seq: u64::from_be_bytes(key[10..18].try_into().ok()?) })
    }
}

/// Metadata keys: a one-byte kind tag, then the object's identity.
pub mod meta {
    pub const EXCHANGE: u8 = b'x';
    pub const QUEUE: u8 = b'q';
    pub const BINDING: u8 = b'b';
    pub const COUNTER: u8 = b'n';
    /// Users and their permissions (`auth::users`).
    pub const USER: u8 = b'u';

    /// The counter that hands out queue ids.
    pub const NEXT_QUEUE_ID: &[u8] = b"nqueue-id";

    pub fn exchange(name: &str) -> Vec<u8> {
        tagged(EXCHANGE, name.as_bytes())
    }

    pub fn queue(name: &str) -> Vec<u8> {
        tagged(QUEUE, name.as_bytes())
    }

    pub fn user(name: &str) -> Vec<u8> {
        tagged(USER, name.as_bytes())
    }

    /// A binding's key is its identity: source, destination kind and name,
    /// routing key and a digest of its arguments, each length-prefixed so
    /// that no two bindings share a key.
    pub fn binding(source: &str, dest_is_exchange: bool, dest: &str, key: &str, args_digest: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 12 + source.len() + dest.len() + key.len() + args_digest.len());
        out.push(BINDING);
        for part in [source.as_bytes(), dest.as_bytes(), key.as_bytes(), args_digest] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.push(dest_is_exchange as u8);
        out
    }

    fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + body.len());
        out.push(tag);
        out.extend_from_slice(body);
        out
    }

    /// The range of all keys with a tag: `[tag, tag + 1)`.
    pub fn range(tag: u8) -> (Vec<u8>, Vec<u8>) {
        (vec![tag], vec![tag + 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_key() -> impl Strategy<Value = (QueueId, MsgKey, u8)> {
        (any::<u64>(), any::<u8>(), any::<u64>(), 0u8..2).prop_map(|(q, p, s, r)| (q, MsgKey { prio_inv: p, seq: s }, r))
    }

    fn record(r: u8) -> Record {
        if r == 0 { Record::Message } else { Record::Deliveries }
    }

    #[test]
    fn should_bound_the_last_queue_and_priority_zero() {
        let last = encode_msg(u64::MAX, MsgKey { prio_inv: 255, seq: u64::MAX }, Record::Deliveries);
        assert!(last.as_slice() < queue_end(u64::MAX).as_slice());
        // Priority 0 (the common case) has the highest priority byte.
        let k = encode_msg(7, MsgKey::new(0, u64::MAX), Record::Deliveries);
        assert!(k.as_slice() < queue_end(7).as_slice());
    }

    proptest! {
        #[test]
        fn message_key_byte_order_is_logical_order(a in arb_key(), b in arb_key()) {
            let ka = encode_msg(a.0, a.1, record(a.2));
            let kb = encode_msg(b.0, b.1, record(b.2));
            let logical = (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2));
            prop_assert_eq!(ka.cmp(&kb), logical);
        }

        #[test]
        fn message_key_round_trips(a in arb_key()) {
            let k = encode_msg(a.0, a.1, record(a.2));
            prop_assert_eq!(decode_msg(&k), Some((a.0, a.1, record(a.2))));
        }

        #[test]
        fn queue_bounds_enclose_exactly_the_queue(a in arb_key(), other in any::<u64>()) {
            let k = encode_msg(a.0, a.1, record(a.2));
            prop_assert!(k.as_slice() >= queue_start(a.0).as_slice());
            prop_assert!(k.as_slice() < queue_end(a.0).as_slice());
            prop_assert!(queue_end(a.0).as_slice() <= queue_start(a.0.wrapping_add(1)).as_slice() || a.0 == u64::MAX);
            if other != a.0 {
                let inside = k.as_slice() >= queue_start(other).as_slice() && k.as_slice() < queue_end(other).as_slice();
                prop_assert!(!inside);
            }
        }

        #[test]
        fn time_key_byte_order_is_logical_order(
            a in (any::<u64>(), any::<u64>(), any::<u8>(), any::<u64>()),
            b in (any::<u64>(), any::<u64>(), any::<u8>(), any::<u64>()),
        ) {
            let ka = encode_time(a.0, a.1, MsgKey { prio_inv: a.2, seq: a.3 });
            let kb = encode_time(b.0, b.1, MsgKey { prio_inv: b.2, seq: b.3 });
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(decode_time(&ka), Some((a.0, a.1, MsgKey { prio_inv: a.2, seq: a.3 })));
            // "Due by b's time" includes a exactly when a is b's queue and not later.
            let due = ka.as_slice() >= queue_start(b.0).as_slice() && ka.as_slice() < time_bound(b.0, b.1).as_slice();
            prop_assert_eq!(due, a.0 == b.0 && a.1 <= b.1);
        }

        #[test]
        fn dedup_and_inbox_keys_round_trip(q in any::<u64>(), id in "[a-z0-9-]{0,40}", seq in any::<u64>()) {
            prop_assert_eq!(decode_dedup(&encode_dedup(q, &id)), Some((q, id.clone())));
            prop_assert_eq!(decode_inbox(&encode_inbox(q, seq)), Some((q, seq)));
            prop_assert!(encode_dedup(q, &id).as_slice() < queue_end(q).as_slice());
        }

        #[test]
        fn higher_priority_sorts_first(p1 in any::<u8>(), p2 in any::<u8>(), s1 in any::<u64>(), s2 in any::<u64>()) {
            let k1 = MsgKey::new(p1, s1);
            let k2 = MsgKey::new(p2, s2);
            if p1 > p2 { prop_assert!(k1 < k2); }
            if p1 == p2 { prop_assert_eq!(k1.cmp(&k2), s1.cmp(&s2)); }
            prop_assert_eq!(k1.priority(), p1);
        }

        #[test]
        fn binding_keys_are_injective(
            a in ("[a-c.]{0,4}", any::<bool>(), "[a-c.]{0,4}", "[a-c.]{0,4}"),
            b in ("[a-c.]{0,4}", any::<bool>(), "[a-c.]{0,4}", "[a-c.]{0,4}"),
        ) {
            let ka = meta::binding(&a.0, a.1, &a.2, &a.3, b"");
            let kb = meta::binding(&b.0, b.1, &b.2, &b.3, b"");
            prop_assert_eq!(ka == kb, a == b);
        }
    }
}
