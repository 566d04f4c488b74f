//! Per-queue counters in the `queue_state` column family, updated with a
//! merge operator: every batch that adds or removes a queue's stored
//! messages merges a *delta* into the queue's record. Deltas commute, so a
//! batch written by another task (a dead-letter move into this queue) and
//! the queue's own batches never overwrite each other, and the record is
//! always consistent with the messages in the same atomic batches.

/// A queue's durable facts: how many persistent messages (and body bytes) it
/// stores ready or unacknowledged, how many it holds delayed, and the highest
/// sequence number it has used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub messages: i64,
    pub bytes: i64,
    pub max_seq: u64,
    pub delayed: i64,
}

pub const ENCODED_LEN: usize = 32;

impl QueueCounters {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.extend_from_slice(&self.messages.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.extend_from_slice(&self.max_seq.to_le_bytes());
        out.extend_from_slice(&self.delayed.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<QueueCounters> {
        if bytes.len() != ENCODED_LEN {
            return None;
        }
        Some(QueueCounters {
            messages: i64::from_le_bytes(bytes[0..8].try_into().ok()?),
            bytes: i64::from_le_bytes(bytes[8..16].try_into().ok()?),
            max_seq: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
            delayed: i64::from_le_bytes(bytes[24..32].try_into().ok()?),
        })
    }

    /// Combines two deltas (or a record and a delta).
    pub fn merge(&self, other: &QueueCounters) -> QueueCounters {
        QueueCounters {
            messages: self.messages + other.messages,
            bytes: self.bytes + other.bytes,
            max_seq: self.max_seq.max(other.max_seq),
            delayed: self.delayed + other.delayed,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == QueueCounters::default()
    }
}

/// The merge function: folds the existing value and every operand. A
/// malformed operand is skipped rather than poisoning the record.
pub fn merge_values<'a>(existing: Option<&[u8]>, operands: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut acc = existing.and_then(QueueCounters::decode).unwrap_or_default();
    for op in operands {
        if let Some(delta) = QueueCounters::decode(op) {
            acc = acc.merge(&delta);
        }
    }
    acc.encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn merging_is_order_independent(deltas in prop::collection::vec((-5i64..5, -500i64..500, 0u64..1000, -3i64..3), 0..20)) {
            let ds: Vec<QueueCounters> = deltas.iter().map(|(m, b, s, d)| QueueCounters { messages: *m, bytes: *b, max_seq: *s, delayed: *d }).collect();
            let enc: Vec<Vec<u8>> = ds.iter().map(QueueCounters::encode).collect();
            let forward = merge_values(None, enc.iter().map(|v| v.as_slice()));
            let backward = merge_values(None, enc.iter().rev().map(|v| v.as_slice()));
            prop_assert_eq!(&forward, &backward);
            // Merging in two steps equals merging at once.
            let half = enc.len() / 2;
            let first = merge_values(None, enc[..half].iter().map(|v| v.as_slice()));
            let second = merge_values(Some(&first), enc[half..].iter().map(|v| v.as_slice()));
            prop_assert_eq!(forward, second);
        }
    }
}
