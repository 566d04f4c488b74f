//! Messages in memory and on disk.

use bytes::Bytes;
use prost::Message as _;
use warren_client::proto::Properties;

use crate::store::StoreError;

/// A published message, immutable once routed. Queues share it through an
/// `Arc`, so fan-out to N queues holds one copy of the body.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageData {
    pub exchange: String,
    pub routing_key: String,
    pub properties: Properties,
    pub body: Bytes,
}

impl MessageData {
    pub fn persistent(&self) -> bool {
        self.properties.persistent
    }

    pub fn priority(&self) -> u32 {
        self.properties.priority.unwrap_or(0)
    }

    /// What holding the message costs in memory and on the wire: body,
    /// headers and properties, names, and a fixed overhead. Every memory
    /// bound (queue windows, unacknowledged and in-flight deliveries, `Get`
    /// replies) counts this, so that large headers cannot slip past them.
    pub fn mem_size(&self) -> u64 {
        (self.body.len() + self.properties.encoded_len() + self.exchange.len() + self.routing_key.len()) as u64 + MESSAGE_OVERHEAD
    }
}

/// Bytes counted for each message besides its content (keys, counters,
/// framing).
pub const MESSAGE_OVERHEAD: u64 = 64;

/// A message as stored in the `messages` and `paged` column families. The
/// per-queue facts (enqueue time, expiry) live beside the published ones.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMessage {
    #[prost(string, tag = "1")]
    pub exchange: String,
    #[prost(string, tag = "2")]
    pub routing_key: String,
    #[prost(message, optional, tag = "3")]
    pub properties: Option<Properties>,
    #[prost(bytes = "bytes", tag = "4")]
    pub body: Bytes,
    #[prost(uint64, tag = "5")]
    pub enqueued_at_ms: u64,
    #[prost(uint64, optional, tag = "6")]
    pub expires_at_ms: Option<u64>,
    /// Deliveries so far. Written for paged messages; stored messages keep
    /// their count in a separate `Deliveries` record so that a delivery does
    /// not rewrite the body.
    #[prost(uint32, tag = "7")]
    pub delivery_count: u32,
}

impl StoredMessage {
    pub fn decode_bytes(bytes: Bytes) -> Result<StoredMessage, StoreError> {
        StoredMessage::decode(bytes).map_err(|e| StoreError::Corrupt { cf: "messages", detail: e.to_string() })
    }

    /// A message as first stored (enqueued at `now_ms`, never delivered).
    pub fn from_data(data: &MessageData, now_ms: u64) -> StoredMessage {
        StoredMessage {
            exchange: data.exchange.clone(),
            routing_key: data.routing_key.clone(),
            properties: Some(data.properties.clone()),
            body: data.body.clone(),
            enqueued_at_ms: now_ms,
            expires_at_ms: None,
            delivery_count: 0,
        }
    }

    /// [`MessageData::mem_size`] of the message this record holds.
    pub fn mem_size(&self) -> u64 {
        let props = self.properties.as_ref().map_or(0, |p| p.encoded_len());
        (self.body.len() + props + self.exchange.len() + self.routing_key.len()) as u64 + MESSAGE_OVERHEAD
    }

    pub fn into_data(self) -> MessageData {
        MessageData {
            exchange: self.exchange,
            routing_key: self.routing_key,
            properties: self.properties.unwrap_or_default(),
            body: self.body,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_round_trip_a_stored_message() {
        let m = StoredMessage {
            exchange: "x".into(),
            routing_key: "k".into(),
            properties: Some(Properties { persistent: true, priority: Some(3), message_id: "m1".into(), ..Default::default() }),
            body: Bytes::from_static(b"hello"),
            enqueued_at_ms: 42,
            expires_at_ms: Some(99),
            delivery_count: 2,
        };
        let bytes = Bytes::from(m.encode_to_vec());
        assert_eq!(StoredMessage::decode_bytes(bytes).unwrap(), m);
        assert!(StoredMessage::decode_bytes(Bytes::from_static(&[0xff, 0xff])).is_err());
    }
}
