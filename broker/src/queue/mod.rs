//! Queues: each is owned by one task ([`task`]) that applies commands to its
//! state ([`state`]) in order and carries out the resulting effects.

pub mod deadletter;
pub mod read;
pub mod state;
pub mod task;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use warren_client::proto;

use crate::confirm::ConfirmTracker;
use crate::error::Result;
use crate::model::MessageData;
use crate::store::keys::QueueId;
use crate::store::{Op, StoreError};
use state::{ConsumerId, ConsumerSpec, ConsumerView, QueueStats, RefillEntry, Room, TimerResult};

/// What a consumer's stream receives from its queue.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// A delivery and its memory size ([`crate::model::MessageData::mem_size`]).
    Delivery(Box<proto::Delivery>, u64),
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
        /// The task's incarnation that asked (a reload starts a new one).
        incarnation: u64,
        epoch: u64,
        result: std::result::Result<TimerResult, StoreError>,
    },
    Subscribe {
        spec: ConsumerSpec,
        outbox: Arc<Outbox>,
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
        /// Most memory bytes in the reply (one message always fits).
        max_bytes: u64,
        ack: bool,
        reply: oneshot::Sender<Result<Vec<proto::Delivery>>>,
    },
    Purge {
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Deletes the queue if the conditions hold: one batch removes its data
    /// and `extra_ops` (the caller's metadata removal). The reply (the
    /// message count) comes once that batch is durable; the task stops then.
    /// If the write fails the queue stays.
    Delete {
        if_unused: bool,
        if_empty: bool,
        reason: String,
        extra_ops: Vec<Op>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Consumers {
        reply: oneshot::Sender<Vec<ConsumerView>>,
    },
    /// A refill read came back.
    Refilled {
        incarnation: u64,
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
    /// For a quorum queue's task: a command from another node or from
    /// one of its helpers (classic queues ignore it).
    Remote(Box<crate::replica::quorum::RemoteCmd>),
    /// Makes the task panic (tests of the recovery from a bug).
    #[cfg(test)]
    Crash,
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
    /// When the queue's timers are next due (ms since the epoch), 0 for
    /// never: a replicated queue's leader proposes a tick then.
    next_deadline_ms: AtomicU64,
    /// When a replicated queue with `x-expires` will have gone unused for
    /// its period (ms since the epoch), 0 for never: its leader then has
    /// it deleted.
    expires_at_ms: AtomicU64,
    /// A replicated queue marked expired (`x-expires`): its leader has it
    /// deleted.
    expired: AtomicBool,
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

    pub fn set_deadline(&self, at: Option<u64>) {
        self.next_deadline_ms.store(at.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn deadline(&self) -> Option<u64> {
        Some(self.next_deadline_ms.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    pub fn set_expires_at(&self, at: Option<u64>) {
        self.expires_at_ms.store(at.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn expires_at(&self) -> Option<u64> {
        Some(self.expires_at_ms.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    pub fn set_expired(&self, expired: bool) {
        self.expired.store(expired, Ordering::Relaxed);
    }

    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
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

/// A consumer's outgoing buffer: deliveries the queue has handed to the
/// consumer's stream that the stream has not yet written to the connection.
///
/// The queue never hands over more than the room it computes from these
/// counts (see [`Outbox::room`]), so the buffer is bounded although its
/// channel is not. When the queue stops for lack of room it *arms* the
/// outbox; the stream side then wakes the queue (a `Writable` command) as
/// soon as it takes the next delivery. Arming re-checks what was taken since
/// the room was computed, so a wake-up cannot be lost between the two.
///
/// The queue holds the only sender: when it drops the outbox (the
/// subscription ended) the stream ends.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<ConsumerEvent>,
    counts: Arc<OutboxCounts>,
}

#[derive(Debug, Default)]
struct OutboxCounts {
    /// Deliveries counted in (sent or about to be), not yet taken.
    queued: AtomicU64,
    queued_bytes: AtomicU64,
    /// Deliveries taken by the stream, ever.
    taken: AtomicU64,
    waiting: AtomicBool,
    wake: OnceLock<(ConsumerId, mpsc::WeakSender<QueueCmd>)>,
}

impl Outbox {
    pub fn new() -> (Arc<Outbox>, ConsumerStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(OutboxCounts::default());
        (Arc::new(Outbox { tx, counts: counts.clone() }), ConsumerStream { rx, counts })
    }

    /// Tells the outbox which queue task to wake, for which consumer.
    pub fn bind(&self, consumer: ConsumerId, queue: mpsc::WeakSender<QueueCmd>) {
        let _ = self.counts.wake.set((consumer, queue));
    }

    /// What it can take within `max_messages` and `max_bytes`, and a mark
    /// to pass to [`Outbox::arm`].
    pub fn room(&self, max_messages: u32, max_bytes: u64) -> (Room, u64) {
        let c = &self.counts;
        let taken = c.taken.load(Ordering::SeqCst);
        let queued = c.queued.load(Ordering::SeqCst);
        let bytes = c.queued_bytes.load(Ordering::SeqCst);
        let room = Room {
            messages: u64::from(max_messages).saturating_sub(queued) as usize,
            bytes: max_bytes.saturating_sub(bytes),
            empty: queued == 0,
        };
        (room, taken)
    }

    /// Counts a delivery in before it is sent (it may wait for its write).
    pub fn reserve(&self, mem: u64) {
        self.counts.queued.fetch_add(1, Ordering::SeqCst);
        self.counts.queued_bytes.fetch_add(mem, Ordering::SeqCst);
    }

    /// Sends a delivery counted in with [`Outbox::reserve`]; false when the
    /// stream is gone.
    pub fn send_delivery(&self, delivery: Box<proto::Delivery>, mem: u64) -> bool {
        self.tx.send(ConsumerEvent::Delivery(delivery, mem)).is_ok()
    }

    /// Sends a final event (cancel, failure); never blocks.
    pub fn send(&self, event: ConsumerEvent) {
        let _ = self.tx.send(event);
    }

    /// Asks to be woken when the stream takes its next delivery. Returns
    /// false when something was taken since `mark` (the room is larger than
    /// the caller computed): the caller should look again right away.
    pub fn arm(&self, mark: u64) -> bool {
        let c = &self.counts;
        c.waiting.store(true, Ordering::SeqCst);
        if c.taken.load(Ordering::SeqCst) != mark {
            c.waiting.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }
}

impl OutboxCounts {
    fn taken_one(&self, mem: u64) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.queued_bytes.fetch_sub(mem, Ordering::SeqCst);
        self.taken.fetch_add(1, Ordering::SeqCst);
        if self.waiting.swap(false, Ordering::SeqCst)
            && let Some((consumer, queue)) = self.wake.get()
            && let Some(queue) = queue.upgrade()
        {
            let cmd = QueueCmd::Writable { consumer: *consumer };
            if let Err(mpsc::error::TrySendError::Full(cmd)) = queue.try_send(cmd)
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(async move {
                    let _ = queue.send(cmd).await;
                });
            }
        }
    }
}

/// The receiving end of an [`Outbox`]: the consume stream reads its events
/// here, which makes room for more.
#[derive(Debug)]
pub struct ConsumerStream {
    rx: mpsc::UnboundedReceiver<ConsumerEvent>,
    counts: Arc<OutboxCounts>,
}

impl futures::Stream for ConsumerStream {
    type Item = ConsumerEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ConsumerEvent>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(ConsumerEvent::Delivery(_, mem))) = &polled {
            self.counts.taken_one(*mem);
        }
        polled
    }
}
