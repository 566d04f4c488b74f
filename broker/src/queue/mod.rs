//! Queues: each is owned by one task ([`task`]) that applies commands to its
//! state ([`state`]) in order and carries out the resulting effects.

pub mod deadletter;
pub mod read;
pub mod state;
pub mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use warren_client::proto;

use crate::confirm::ConfirmTracker;
use crate::error::Result;
use crate::model::MessageData;
use crate::store::keys::QueueId;
use crate::store::{Op, StoreError};
use state::{ConsumerId, ConsumerSpec, ConsumerView, QueueStats, RefillEntry, TimerResult};

/// What a consumer's stream receives from its queue.
#[derive(Debug)]
pub enum ConsumerEvent {
    Delivery(Box<proto::Delivery>),
    /// The queue ended the subscription (deleted, shutting down).
    Cancelled(String),
    /// The subscription failed (for example an unknown delivery tag).
    Failed(crate::error::Error),
}

/// Commands a queue's owner task accepts.
pub enum QueueCmd {
    Enqueue {
        data: Arc<MessageData>,
        confirm: Option<Arc<ConfirmTracker>>,
        /// Hold the message back this long before it becomes ready.
        delay_ms: Option<u64>,
    },
    /// A dead-lettered message: already written to this queue's inbox
    /// (`inbox_key`), or transient and handed over in memory.
    Adopt {
        inbox_key: Option<Vec<u8>>,
        data: Arc<MessageData>,
    },
    /// A use of the queue (a declare), for `x-expires`.
    Touch,
    /// A timer read came back.
    TimerDone {
        epoch: u64,
        result: std::result::Result<TimerResult, StoreError>,
    },
    Subscribe {
        spec: ConsumerSpec,
        sink: mpsc::Sender<ConsumerEvent>,
        reply: oneshot::Sender<Result<ConsumerId>>,
    },
    Ack {
        consumer: ConsumerId,
        tag: u64,
        multiple: bool,
    },
    Nack {
        consumer: ConsumerId,
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
    Qos {
        consumer: ConsumerId,
        prefetch: u32,
    },
    Unsubscribe {
        consumer: ConsumerId,
    },
    Get {
        max: usize,
        ack: bool,
        reply: oneshot::Sender<Vec<proto::Delivery>>,
    },
    Purge {
        reply: oneshot::Sender<u64>,
    },
    /// Deletes the queue if the conditions hold; the reply carries the
    /// message count and the writes that delete its data (the caller adds
    /// its metadata removal to the same batch). The task stops after an Ok.
    Delete {
        if_unused: bool,
        if_empty: bool,
        reason: String,
        reply: oneshot::Sender<Result<(u64, Vec<Op>)>>,
    },
    Consumers {
        reply: oneshot::Sender<Vec<ConsumerView>>,
    },
    /// A refill read came back.
    Refilled {
        epoch: u64,
        result: std::result::Result<(Vec<RefillEntry>, bool), StoreError>,
    },
    /// A consumer's outgoing channel has room again.
    Writable {
        consumer: ConsumerId,
    },
    /// Ends every subscription with `reason`; the queue keeps running.
    CancelConsumers {
        reason: String,
        reply: oneshot::Sender<()>,
    },
    /// Runs a round (dispatch, refill) with nothing else to do.
    Tick,
    /// Ends every subscription and stops the task.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Counts a queue publishes for listings and metrics, readable without
/// asking its task.
#[derive(Debug, Default)]
pub struct QueueShared {
    ready: AtomicU64,
    ready_bytes: AtomicU64,
    unacked: AtomicU64,
    consumers: AtomicU64,
    delayed: AtomicU64,
    /// `QueueStats::oldest_ready_ms`, 0 for none.
    oldest_ready_ms: AtomicU64,
}

impl QueueShared {
    pub fn publish(&self, s: QueueStats) {
        self.ready.store(s.ready, Ordering::Relaxed);
        self.ready_bytes.store(s.ready_bytes, Ordering::Relaxed);
        self.unacked.store(s.unacked, Ordering::Relaxed);
        self.consumers.store(s.consumers as u64, Ordering::Relaxed);
        self.delayed.store(s.delayed, Ordering::Relaxed);
        match s.oldest_ready_ms {
            Some(t) => self.oldest_ready_ms.store(t, Ordering::Relaxed),
            // The head is on disk for a moment (a refill is reading it): the
            // last known age stands.
            None if s.ready > 0 => {}
            None => self.oldest_ready_ms.store(0, Ordering::Relaxed),
        }
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.ready.load(Ordering::Relaxed),
            ready_bytes: self.ready_bytes.load(Ordering::Relaxed),
            unacked: self.unacked.load(Ordering::Relaxed),
            consumers: self.consumers.load(Ordering::Relaxed) as u32,
            delayed: self.delayed.load(Ordering::Relaxed),
            oldest_ready_ms: Some(self.oldest_ready_ms.load(Ordering::Relaxed)).filter(|t| *t != 0),
        }
    }
}

/// A handle on a running queue.
#[derive(Clone, Debug)]
pub struct QueueRef {
    pub id: QueueId,
    pub name: Arc<str>,
    pub tx: mpsc::Sender<QueueCmd>,
    pub shared: Arc<QueueShared>,
}
