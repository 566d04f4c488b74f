//! The commands of a replicated queue's log, as stored in its entries
//! (protobuf, like every record Warren stores). An entry's time is not here:
//! the Raft glue carries the leader's clock beside the command.

use warren_client::proto::Properties;

use crate::model::MessageData;

/// One log entry's command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueEntry {
    #[prost(oneof = "QueueOp", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16")]
    pub op: Option<QueueOp>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
#[allow(clippy::large_enum_variant)] // as prost generates it
pub enum QueueOp {
    /// Published messages, in order.
    #[prost(message, tag = "1")]
    Enqueue(Enqueue),
    /// A dead-lettered message from another queue.
    #[prost(message, tag = "2")]
    Adopt(Publish),
    #[prost(message, tag = "3")]
    Subscribe(Subscribe),
    #[prost(message, tag = "4")]
    Unsubscribe(ConsumerRef),
    #[prost(message, tag = "5")]
    Ack(Settle),
    #[prost(message, tag = "6")]
    Nack(Nack),
    #[prost(message, tag = "7")]
    Qos(Qos),
    /// Deliveries to an auto-ack consumer that the leader has sent.
    #[prost(message, tag = "8")]
    Settle(SettleTags),
    #[prost(message, tag = "9")]
    Get(Get),
    #[prost(message, tag = "10")]
    Purge(Empty),
    /// Expiry and delays due at the entry's time.
    #[prost(message, tag = "11")]
    Tick(Empty),
    /// Every consumer leaves (a new leader: consumers of the old one are
    /// gone); their unacknowledged messages return.
    #[prost(message, tag = "12")]
    DropConsumers(Empty),
    /// Dead letters the target queues have confirmed.
    #[prost(message, tag = "13")]
    DeadLettered(DeadLettered),
    /// Several commands in one entry, applied in order (a leader's group
    /// commit: what arrived while the previous entry was committing).
    #[prost(message, tag = "14")]
    Batch(Batch),
    /// A use of the queue for `x-expires` (a declare), at the entry's time.
    #[prost(message, tag = "15")]
    Touch(Empty),
    /// `x-expires`: the leader found the queue unused for its period. If
    /// it still is at the entry's time, it is marked expired on every
    /// replica (no consumer may attach from then on) and the leader has it
    /// deleted; otherwise nothing changes.
    #[prost(message, tag = "16")]
    Expire(Empty),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<QueueEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Publish {
    #[prost(string, tag = "1")]
    pub exchange: String,
    #[prost(string, tag = "2")]
    pub routing_key: String,
    #[prost(message, optional, tag = "3")]
    pub properties: Option<Properties>,
    #[prost(bytes = "bytes", tag = "4")]
    pub body: bytes::Bytes,
    #[prost(uint64, optional, tag = "5")]
    pub delay_ms: Option<u64>,
}

impl Publish {
    pub fn from_data(data: &MessageData, delay_ms: Option<u64>) -> Publish {
        Publish {
            exchange: data.exchange.clone(),
            routing_key: data.routing_key.clone(),
            properties: Some(data.properties.clone()),
            body: data.body.clone(),
            delay_ms,
        }
    }

    pub fn into_data(self) -> (MessageData, Option<u64>) {
        let data = MessageData {
            exchange: self.exchange,
            routing_key: self.routing_key,
            properties: self.properties.unwrap_or_default(),
            body: self.body,
        };
        (data, self.delay_ms)
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Enqueue {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<Publish>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Subscribe {
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
    /// The leader's consumer bounds, which every replica applies.
    #[prost(uint32, tag = "7")]
    pub max_unacked: u32,
    #[prost(uint64, tag = "8")]
    pub max_unacked_bytes: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ConsumerRef {
    #[prost(uint64, tag = "1")]
    pub consumer: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Settle {
    #[prost(uint64, tag = "1")]
    pub consumer: u64,
    #[prost(uint64, tag = "2")]
    pub tag: u64,
    #[prost(bool, tag = "3")]
    pub multiple: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Nack {
    #[prost(uint64, tag = "1")]
    pub consumer: u64,
    #[prost(uint64, tag = "2")]
    pub tag: u64,
    #[prost(bool, tag = "3")]
    pub multiple: bool,
    #[prost(bool, tag = "4")]
    pub requeue: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Qos {
    #[prost(uint64, tag = "1")]
    pub consumer: u64,
    #[prost(uint32, tag = "2")]
    pub prefetch: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SettleTags {
    #[prost(uint64, tag = "1")]
    pub consumer: u64,
    #[prost(uint64, repeated, tag = "2")]
    pub tags: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Get {
    #[prost(uint32, tag = "1")]
    pub max: u32,
    #[prost(uint64, tag = "2")]
    pub max_bytes: u64,
    #[prost(bool, tag = "3")]
    pub ack: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLettered {
    #[prost(uint64, repeated, tag = "1")]
    pub seqs: Vec<u64>,
}

impl QueueEntry {
    pub fn of(op: QueueOp) -> QueueEntry {
        QueueEntry { op: Some(op) }
    }
}
