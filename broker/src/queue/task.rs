//! The owner task of one queue: receives commands, applies them to the
//! [`QueueState`], and carries out the resulting effects — one store batch
//! per round of commands, deliveries to consumer outboxes, replies, refill
//! and timer reads, dead-letter routing.
//!
//! # Outward effects wait for the writes they depend on
//!
//! Each round's writes go to the store as one batch with the next *write
//! ticket* (1, 2, 3, ... per task). A publish is confirmed from the batch's
//! completion, once it is durable. Everything else the outside world sees is
//! released in order once the batches it depends on are durable: a delivery
//! of a stored message waits for the batch that stored it, a duplicate's
//! answer for the batch that stored the first copy, a `Get` or purge reply
//! for its own round's batch. So a client never sees a message, or an
//! answer, that a failed write could take back.
//!
//! # Failures
//!
//! Every write carries the task's [`Fence`]: once one fails, the store
//! refuses the rest, so nothing is built on a change that never happened.
//! The task then *reloads*: its consumers are cancelled (their clients
//! subscribe again), answers still waiting are failed, and the queue is
//! rebuilt from what the store holds, exactly as a restart would rebuild it
//! (persistent messages of a durable queue stay; transient ones are gone).
//! A panic in a round (a bug) is handled the same way. While a reload cannot
//! read the store, the queue answers `UNAVAILABLE` and retries with backoff.
//!
//! The task sleeps until its next command, a write completion, or its
//! state's next deadline (an expiry, a delay, `x-expires`).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::FutureExt;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use warren_client::proto;

use super::deadletter;
use super::read::{clear_transient_ops, read_queue_recovery, read_refill, read_timers};
use super::state::{ConsumerId, DeadLetter, Effects, EnqueueOutcome, GetOutcome, Loc, OutDelivery, QueueState, Room};
use super::{ConsumerEvent, Outbox, QueueCmd, QueueRef, QueueShared};
use crate::confirm::{ConfirmTracker, PartOutcome};
use crate::error::{Error, Result};
use crate::model::{MessageData, StoredMessage, now_ms};
use crate::store::keys;
use crate::store::{Cf, Fence, Op, Store, StoreError, WriteRequest};
use crate::topology::Snapshot;

/// Commands applied per round before effects are flushed: larger rounds mean
/// bigger batches, smaller ones lower latency.
const ROUND: usize = 256;

/// Capacity of a queue's command channel; publishers wait when it is full.
pub const QUEUE_CHANNEL: usize = 4096;

/// First and longest wait between attempts to reload from storage.
const RELOAD_RETRY_MIN: Duration = Duration::from_millis(100);
const RELOAD_RETRY_MAX: Duration = Duration::from_secs(10);

/// What the task tells the broker.
#[derive(Debug)]
pub enum QueueEvent {
    /// An auto-delete queue lost its last consumer.
    AutoDelete { id: u64, name: Arc<str> },
    /// A queue with `x-expires` went unused for that long.
    Expired { id: u64, name: Arc<str> },
}

/// What the task needs from the rest of the broker.
#[derive(Clone)]
pub struct TaskEnv {
    pub store: Store,
    pub events: mpsc::UnboundedSender<QueueEvent>,
    /// The routing snapshot, for dead-lettering.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// True once the broker has recovered every queue and published the
    /// routing snapshot: a recovered queue waits for it before it starts,
    /// so that what expired while the broker was down is dead-lettered
    /// along a complete snapshot (not dropped as routing nowhere).
    pub recovered: tokio::sync::watch::Receiver<bool>,
}

/// A dead-lettered message to hand to another queue once the batch that
/// moves it is durable.
enum Handoff {
    Adopt { tx: mpsc::Sender<QueueCmd>, inbox_key: Vec<u8>, data: Arc<MessageData> },
    Transient { tx: mpsc::Sender<QueueCmd>, data: Arc<MessageData> },
}

impl Handoff {
    async fn send(self) {
        let _ = match self {
            Handoff::Adopt { tx, inbox_key, data } => tx.send(QueueCmd::Adopt { inbox_key: Some(inbox_key), data }).await,
            Handoff::Transient { tx, data } => tx.send(QueueCmd::Adopt { inbox_key: None, data }).await,
        };
    }
}

/// A reply or confirm that may only be given once the writes before it are
/// durable; called with the failure otherwise.
type Reply = Box<dyn FnOnce(Result<()>) + Send>;

/// Something the outside world sees, waiting for a write ticket.
enum Outward {
    Deliver { consumer: ConsumerId, delivery: Box<proto::Delivery>, mem: u64 },
    Reply(Reply),
}

struct Held {
    ticket: u64,
    what: Outward,
}

struct ConsumerSink {
    tag: Arc<str>,
    outbox: Arc<Outbox>,
}

struct PendingGet {
    max: usize,
    max_bytes: u64,
    ack: bool,
    reply: oneshot::Sender<Result<Vec<proto::Delivery>>>,
}

struct PendingDelete {
    count: u64,
    reason: String,
    extra_ops: Vec<Op>,
    reply: oneshot::Sender<Result<u64>>,
}

/// A batch's outcome, sent back from the store writer.
struct BatchDone {
    incarnation: u64,
    batch: u64,
    result: std::result::Result<(), StoreError>,
}

/// What woke the task.
enum Wake {
    Cmd(QueueCmd),
    Done(BatchDone),
    Timer,
}

pub struct QueueTask {
    state: QueueState,
    auto_delete: bool,
    store: Store,
    rx: mpsc::Receiver<QueueCmd>,
    me: mpsc::WeakSender<QueueCmd>,
    shared: Arc<QueueShared>,
    events: mpsc::UnboundedSender<QueueEvent>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    recovered: tokio::sync::watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
    /// Dead-lettered messages found in the inbox, to adopt at (re)start.
    inbox: Vec<(Vec<u8>, StoredMessage)>,
    /// The `x-expires` event was sent for the current idle period.
    expiry_sent: bool,
    sinks: HashMap<ConsumerId, ConsumerSink>,
    /// What each consumer's outbox had taken when its room was computed.
    marks: HashMap<ConsumerId, u64>,
    /// Consumers whose stream went away, to remove in the next flush.
    closed: Vec<ConsumerId>,
    pending_gets: Vec<PendingGet>,
    deleting: Option<PendingDelete>,
    stopped: bool,
    // ---- writes and what waits for them
    fence: Arc<Fence>,
    /// Counts reloads; completions and reads of an earlier incarnation are
    /// ignored.
    incarnation: u64,
    /// Write tickets: batches submitted, and the highest one known durable
    /// (completions arrive in order).
    submitted: u64,
    durable: u64,
    done_tx: mpsc::UnboundedSender<BatchDone>,
    done_rx: mpsc::UnboundedReceiver<BatchDone>,
    held: VecDeque<Held>,
    /// Outward effects of the round in progress, with their tickets.
    outward: Vec<(u64, Outward)>,
    // ---- failure and reload
    /// Set when a write failed or a round panicked: reload next.
    failure: Option<String>,
    /// Why the queue cannot serve now (reloading).
    unavailable: Option<String>,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
}

/// Starts the owner task of `state`; returns its handle. `inbox` holds
/// dead-lettered messages a crash left in the queue's inbox.
pub fn spawn(state: QueueState, auto_delete: bool, env: TaskEnv, inbox: Vec<(Vec<u8>, StoredMessage)>) -> QueueRef {
    let (tx, rx) = mpsc::channel(QUEUE_CHANNEL);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(QueueShared::default());
    shared.publish(state.stats());
    let handle = QueueRef { id: state.id, name: state.name.clone(), tx: tx.clone(), shared: shared.clone() };
    let task = QueueTask {
        state,
        auto_delete,
        store: env.store,
        rx,
        me: tx.downgrade(),
        shared,
        events: env.events,
        snapshot: env.snapshot,
        recovered: env.recovered,
        runtime: tokio::runtime::Handle::current(),
        inbox,
        expiry_sent: false,
        sinks: HashMap::new(),
        marks: HashMap::new(),
        closed: Vec::new(),
        pending_gets: Vec::new(),
        deleting: None,
        stopped: false,
        fence: Fence::new(),
        incarnation: 0,
        submitted: 0,
        durable: 0,
        done_tx,
        done_rx,
        held: VecDeque::new(),
        outward: Vec::new(),
        failure: None,
        unavailable: None,
        retry_at: None,
        retry_delay: RELOAD_RETRY_MIN,
    };
    tokio::spawn(task.run());
    handle
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl QueueTask {
    async fn run(mut self) {
        // Err only if the broker was dropped before it finished recovering.
        let _ = self.recovered.wait_for(|done| *done).await;
        if let Err(panic) = AssertUnwindSafe(self.start()).catch_unwind().await {
            self.failure = Some(format!("internal error while starting: {}", panic_message(panic.as_ref())));
        }
        loop {
            if let Some(reason) = self.failure.take() {
                self.fail(reason);
            }
            if self.unavailable.is_some() && self.retry_at.is_some_and(|t| t <= tokio::time::Instant::now()) {
                if let Err(panic) = AssertUnwindSafe(self.reload()).catch_unwind().await {
                    // A bug in recovery: keep the queue unavailable and try
                    // again later rather than lose the task.
                    tracing::error!(queue = %self.state.name, panic = %panic_message(panic.as_ref()), "reloading the queue failed");
                    self.retry_later();
                }
                continue;
            }
            let sleep = self.sleep_duration();
            let wake = tokio::select! {
                biased;
                Some(done) = self.done_rx.recv() => Wake::Done(done),
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => Wake::Cmd(cmd),
                    None => break,
                },
                _ = tokio::time::sleep(sleep.unwrap_or(Duration::MAX)), if sleep.is_some() => Wake::Timer,
            };
            if let Err(panic) = AssertUnwindSafe(self.round(wake)).catch_unwind().await {
                let reason = format!("internal error: {}", panic_message(panic.as_ref()));
                tracing::error!(queue = %self.state.name, %reason, "a round of the queue panicked");
                self.failure = Some(reason);
                continue;
            }
            if self.stopped {
                break;
            }
        }
        self.fail_pending();
    }

    /// A (re)started queue takes what its inbox holds, loads its window and
    /// looks at its timers right away.
    async fn start(&mut self) {
        self.state.set_now(now_ms());
        self.state.set_ticket(self.submitted + 1);
        let mut fx = Effects::default();
        for (key, stored) in std::mem::take(&mut self.inbox) {
            self.state.adopt(Some(key), Arc::new(stored.into_data()), &mut fx);
        }
        self.state.dispatch(&mut fx, &mut |_| Room::NONE);
        self.state.poll_timers(&mut fx);
        self.flush(fx, Vec::new()).await;
    }

    async fn round(&mut self, wake: Wake) {
        self.state.set_now(now_ms());
        self.state.set_ticket(self.submitted + 1);
        let mut fx = Effects::default();
        let mut synced: Vec<Arc<ConfirmTracker>> = Vec::new();
        match wake {
            Wake::Cmd(cmd) => self.handle(cmd, &mut fx, &mut synced),
            Wake::Done(done) => self.batch_done(done),
            Wake::Timer => {}
        }
        while let Ok(done) = self.done_rx.try_recv() {
            self.batch_done(done);
        }
        let mut n = 1;
        while n < ROUND && !self.stopped && self.deleting.is_none() {
            match self.rx.try_recv() {
                Ok(cmd) => self.handle(cmd, &mut fx, &mut synced),
                Err(_) => break,
            }
            n += 1;
        }
        if self.serving() && !self.stopped {
            self.dispatch(&mut fx);
            self.state.poll_timers(&mut fx);
            self.check_expires();
        }
        self.flush(fx, synced).await;
        if let Some(delete) = self.deleting.take() {
            self.finish_delete(delete).await;
        }
    }

    /// Neither failed nor reloading.
    fn serving(&self) -> bool {
        self.failure.is_none() && self.unavailable.is_none()
    }

    fn dispatch(&mut self, fx: &mut Effects) {
        let limits = *self.state.limits();
        let sinks = &self.sinks;
        let marks = &mut self.marks;
        marks.clear();
        self.state.dispatch(fx, &mut |id| match sinks.get(&id) {
            Some(s) => {
                let (room, mark) = s.outbox.room(limits.consumer_max_unacked, limits.consumer_max_unacked_bytes);
                marks.insert(id, mark);
                room
            }
            None => Room::NONE,
        });
    }

    /// The task is stopping: commands already queued to it get an answer
    /// instead of vanishing. A publish waiting here is confirmed as not
    /// taken by this queue (so the publisher's confirm still arrives); the
    /// other commands' replies are dropped, which their callers see as
    /// "queue not found".
    fn fail_pending(&mut self) {
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let QueueCmd::Enqueue { confirm: Some(c), .. } = cmd {
                c.part_done(PartOutcome::Dropped);
            }
        }
        for h in self.held.drain(..) {
            if let Outward::Reply(reply) = h.what {
                reply(Err(Error::ShuttingDown));
            }
        }
    }

    /// How long to sleep before the state's next deadline (or the next
    /// reload attempt), if there is one.
    fn sleep_duration(&self) -> Option<Duration> {
        if self.unavailable.is_some() {
            return self.retry_at.map(|t| t.saturating_duration_since(tokio::time::Instant::now()));
        }
        let deadline = if self.expiry_sent && self.state.unused_too_long() {
            // The x-expires event is out; only expiry and delays matter.
            self.state.timer_deadline()
        } else {
            self.state.next_deadline()
        }?;
        // Wake a millisecond late so that `now > deadline` holds.
        Some(Duration::from_millis(deadline.saturating_sub(now_ms()).saturating_add(1)))
    }

    /// Tells the broker once when an `x-expires` queue has gone unused too
    /// long; it deletes the queue unless it is in use again.
    fn check_expires(&mut self) {
        if !self.state.unused_too_long() {
            self.expiry_sent = false;
        } else if !self.expiry_sent {
            self.expiry_sent = true;
            let _ = self.events.send(QueueEvent::Expired { id: self.state.id, name: self.state.name.clone() });
        }
    }

    // ------------------------------------------------------------ commands

    fn handle(&mut self, cmd: QueueCmd, fx: &mut Effects, synced: &mut Vec<Arc<ConfirmTracker>>) {
        if !self.serving() {
            self.refuse(cmd);
            return;
        }
        match cmd {
            QueueCmd::Enqueue { data, confirm, delay_ms } => {
                let _span = crate::telemetry::enqueue_span(&data.properties, &self.state.name);
                let outcome = self.state.enqueue(data, delay_ms, fx);
                if let Some(c) = confirm {
                    match outcome {
                        EnqueueOutcome::Enqueued { needs_sync: true } => synced.push(c),
                        EnqueueOutcome::Enqueued { needs_sync: false } => c.part_done(PartOutcome::Enqueued),
                        // The first copy may not be durable yet: the answer
                        // waits for its write, and is a rejection if that
                        // write fails (the retry must then be taken).
                        EnqueueOutcome::Duplicate { ticket } => self.outward.push((
                            ticket,
                            Outward::Reply(Box::new(move |r: Result<()>| match r {
                                Ok(()) => c.part_done(PartOutcome::Duplicate),
                                Err(e) => c.part_done(PartOutcome::Rejected(e.to_string())),
                            })),
                        )),
                        EnqueueOutcome::Rejected(reason) => c.part_done(PartOutcome::Rejected(reason)),
                    }
                }
            }
            QueueCmd::Adopt { inbox_key, data } => self.state.adopt(inbox_key, data, fx),
            QueueCmd::Touch => self.state.touch(),
            QueueCmd::TimerDone { incarnation, epoch, result } => {
                if incarnation != self.incarnation {
                    return;
                }
                match result {
                    Ok(result) => self.state.timer_done(epoch, result, fx),
                    Err(e) => {
                        tracing::error!(queue = %self.state.name, error = %e, "reading due timers failed; retrying");
                        self.state.timer_failed();
                    }
                }
            }
            QueueCmd::Subscribe { spec, outbox, reply } => {
                let tag = spec.tag.clone();
                match self.state.add_consumer(spec) {
                    Ok(id) => {
                        outbox.bind(id, self.me.clone());
                        self.sinks.insert(id, ConsumerSink { tag, outbox });
                        let _ = reply.send(Ok(id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            QueueCmd::Ack { consumer, tag, multiple } => {
                let unacked = self.state.stats().unacked;
                match self.state.ack(consumer, tag, multiple, fx) {
                    Ok(()) => crate::metrics::global().acked(unacked.saturating_sub(self.state.stats().unacked)),
                    Err(e) => self.fail_consumer(consumer, e, fx),
                }
            }
            QueueCmd::Nack { consumer, tag, multiple, requeue } => {
                let unacked = self.state.stats().unacked;
                match self.state.nack(consumer, tag, multiple, requeue, fx) {
                    Ok(()) => crate::metrics::global().nacked(unacked.saturating_sub(self.state.stats().unacked)),
                    Err(e) => self.fail_consumer(consumer, e, fx),
                }
            }
            QueueCmd::Qos { consumer, prefetch } => self.state.set_prefetch(consumer, prefetch),
            QueueCmd::Unsubscribe { consumer } => self.remove_consumer(consumer, fx),
            QueueCmd::Get { max, max_bytes, ack, reply } => self.get(PendingGet { max, max_bytes, ack, reply }, fx),
            QueueCmd::Purge { reply } => {
                let n = self.state.purge(fx);
                // Reported once the removal is durable.
                self.outward.push((
                    self.state_ticket(),
                    Outward::Reply(Box::new(move |r: Result<()>| {
                        let _ = reply.send(r.map(|()| n));
                    })),
                ));
            }
            QueueCmd::Delete { if_unused, if_empty, reason, extra_ops, reply } => {
                if if_unused && self.state.has_consumers() {
                    let n = self.state.stats().consumers;
                    let _ = reply.send(Err(Error::PreconditionFailed(format!("queue '{}' is in use ({n} consumer(s))", self.state.name))));
                    return;
                }
                // Delayed messages are messages too: an "if empty" delete
                // must not destroy them.
                let count = self.state.message_count() + self.state.stats().delayed;
                if if_empty && count > 0 {
                    let _ = reply
                        .send(Err(Error::PreconditionFailed(format!("queue '{}' is not empty ({count} message(s))", self.state.name))));
                    return;
                }
                self.deleting = Some(PendingDelete { count, reason, extra_ops, reply });
            }
            QueueCmd::Consumers { reply } => {
                let _ = reply.send(self.state.consumers());
            }
            QueueCmd::Refilled { incarnation, epoch, result } => {
                if incarnation != self.incarnation {
                    return;
                }
                match result {
                    Ok((entries, exhausted)) => {
                        self.state.refilled(epoch, entries, exhausted, fx);
                        for g in std::mem::take(&mut self.pending_gets) {
                            self.get(g, fx);
                        }
                    }
                    Err(e) => {
                        tracing::error!(queue = %self.state.name, error = %e, "reading the backlog failed; retrying in a second");
                        self.state.refill_failed(fx);
                        let me = self.me.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            if let Some(me) = me.upgrade() {
                                let _ = me.send(QueueCmd::Tick).await;
                            }
                        });
                    }
                }
            }
            QueueCmd::Tick | QueueCmd::Writable { .. } => {}
            QueueCmd::CancelConsumers { reason, reply } => {
                self.cancel_all(&reason, fx);
                let _ = reply.send(());
            }
            QueueCmd::Shutdown { reply } => {
                self.cancel_all("broker is shutting down", fx);
                let _ = reply.send(());
                self.stopped = true;
            }
            QueueCmd::Remote(_) => {}
            #[cfg(test)]
            QueueCmd::Crash => panic!("injected crash"),
        }
    }

    /// The ticket of the round in progress.
    fn state_ticket(&self) -> u64 {
        self.submitted + 1
    }

    /// Answers a command while the queue is failed or reloading.
    fn refuse(&mut self, cmd: QueueCmd) {
        let reason = self.unavailable.clone().or_else(|| self.failure.clone()).unwrap_or_default();
        let unavailable = || Error::Unavailable(format!("queue '{}' is unavailable: {reason}", self.state.name));
        match cmd {
            QueueCmd::Enqueue { confirm: Some(c), .. } => c.part_done(PartOutcome::Rejected(unavailable().to_string())),
            QueueCmd::Subscribe { reply, .. } => {
                let _ = reply.send(Err(unavailable()));
            }
            QueueCmd::Get { reply, .. } => {
                let _ = reply.send(Err(unavailable()));
            }
            QueueCmd::Purge { reply } => {
                let _ = reply.send(Err(unavailable()));
            }
            QueueCmd::Delete { reply, .. } => {
                let _ = reply.send(Err(unavailable()));
            }
            QueueCmd::Consumers { reply } => {
                let _ = reply.send(Vec::new());
            }
            QueueCmd::CancelConsumers { reply, .. } => {
                let _ = reply.send(());
            }
            QueueCmd::Shutdown { reply } => {
                let _ = reply.send(());
                self.stopped = true;
            }
            // A persistent dead letter stays in the inbox, which the reload
            // reads; a transient one is lost, as in a restart.
            QueueCmd::Enqueue { confirm: None, .. }
            | QueueCmd::Adopt { .. }
            | QueueCmd::Touch
            | QueueCmd::TimerDone { .. }
            | QueueCmd::Ack { .. }
            | QueueCmd::Nack { .. }
            | QueueCmd::Qos { .. }
            | QueueCmd::Unsubscribe { .. }
            | QueueCmd::Refilled { .. }
            | QueueCmd::Writable { .. }
            | QueueCmd::Remote(_)
            | QueueCmd::Tick => {}
            #[cfg(test)]
            QueueCmd::Crash => {}
        }
    }

    fn get(&mut self, g: PendingGet, fx: &mut Effects) {
        match self.state.get(g.max.max(1), g.max_bytes, g.ack, fx) {
            GetOutcome::Messages(ds) => {
                crate::metrics::global().deliveries(&ds);
                let left = self.state.stats().ready;
                // Stored messages are returned once their write is durable;
                // taking them (ack) once the removal is.
                let mut ticket = ds.iter().filter(|d| d.msg.loc == Loc::Stored).map(|d| d.msg.ticket).max().unwrap_or(0);
                if g.ack && !ds.is_empty() {
                    ticket = ticket.max(self.state_ticket());
                }
                let out: Vec<proto::Delivery> = ds
                    .iter()
                    .map(|d| {
                        let mut p = to_proto(d, "");
                        p.message_count = left;
                        p
                    })
                    .collect();
                let reply = g.reply;
                self.outward.push((
                    ticket,
                    Outward::Reply(Box::new(move |r: Result<()>| {
                        let _ = reply.send(r.map(|()| out));
                    })),
                ));
            }
            GetOutcome::NeedRefill => self.pending_gets.push(g),
        }
    }

    fn remove_consumer(&mut self, consumer: ConsumerId, fx: &mut Effects) {
        self.sinks.remove(&consumer);
        if self.state.remove_consumer(consumer, fx) && self.state.should_auto_delete(self.auto_delete) {
            let _ = self.events.send(QueueEvent::AutoDelete { id: self.state.id, name: self.state.name.clone() });
        }
    }

    fn fail_consumer(&mut self, consumer: ConsumerId, error: Error, fx: &mut Effects) {
        if let Some(sink) = self.sinks.get(&consumer) {
            sink.outbox.send(ConsumerEvent::Failed(error));
        }
        self.remove_consumer(consumer, fx);
    }

    /// Ends every subscription; unacknowledged messages return to the queue.
    fn cancel_all(&mut self, reason: &str, fx: &mut Effects) {
        for (id, sink) in std::mem::take(&mut self.sinks) {
            sink.outbox.send(ConsumerEvent::Cancelled(reason.to_string()));
            self.state.remove_consumer(id, fx);
        }
    }

    // -------------------------------------------------------------- writes

    /// A batch completed. Completions arrive in submission order.
    fn batch_done(&mut self, done: BatchDone) {
        if done.incarnation != self.incarnation {
            return;
        }
        match done.result {
            Ok(()) => {
                self.durable = self.durable.max(done.batch);
                self.release_held();
            }
            Err(e) => {
                if self.serving() {
                    self.failure = Some(format!("a write failed: {e}"));
                }
            }
        }
    }

    /// Carries out held effects whose writes are durable, in order.
    fn release_held(&mut self) {
        while self.held.front().is_some_and(|h| h.ticket <= self.durable) {
            if let Some(h) = self.held.pop_front() {
                self.carry_out(h.what);
            }
        }
    }

    fn carry_out(&mut self, what: Outward) {
        match what {
            Outward::Deliver { consumer, delivery, mem } => {
                if let Some(sink) = self.sinks.get(&consumer)
                    && !sink.outbox.send_delivery(delivery, mem)
                {
                    // The stream went away: the subscription ends and its
                    // unacknowledged messages (this one included) return.
                    self.closed.push(consumer);
                }
            }
            Outward::Reply(reply) => reply(Ok(())),
        }
    }

    /// Queues an outward effect behind those already waiting, or carries it
    /// out now when nothing waits and its write is durable.
    fn push_outward(&mut self, ticket: u64, what: Outward) {
        if self.held.is_empty() && ticket <= self.durable {
            self.carry_out(what);
        } else {
            self.held.push_back(Held { ticket, what });
        }
    }

    /// Routes a dead-lettered message through the queue's dead-letter
    /// exchange. Persistent messages bound for durable queues are written to
    /// the targets' inboxes in `ops` (the batch that removes them here);
    /// the rest is handed over directly.
    fn route_dead_letter(&self, dl: DeadLetter, ops: &mut Vec<Op>, handoffs: &mut Vec<Handoff>) {
        let Some(dlx) = self.state.args.dead_letter_exchange.as_deref() else { return };
        let data = deadletter::dead_lettered(
            &dl.data,
            &self.state.name,
            dl.reason,
            self.state.now(),
            dlx,
            self.state.args.dead_letter_routing_key.as_deref(),
        );
        let snap = self.snapshot.load();
        let targets: Vec<Arc<str>> = if dlx.is_empty() {
            snap.queues.get(data.routing_key.as_str()).map(|e| vec![e.def.name.clone()]).unwrap_or_default()
        } else {
            snap.routes.route(dlx, &data.routing_key, &data.properties.headers).queues
        };
        if targets.is_empty() {
            tracing::debug!(queue = %self.state.name, dlx, routing_key = %data.routing_key, "dead-lettered message routes nowhere; dropped");
            return;
        }
        let data = Arc::new(data);
        for target in targets {
            let Some(entry) = snap.queues.get(&target) else { continue };
            if deadletter::is_cycle(&data, &target) {
                tracing::debug!(queue = %self.state.name, target = %target, "dead-letter cycle; dropped for that queue");
                continue;
            }
            let tx = entry.handle.tx.clone();
            if entry.def.durable && !entry.def.exclusive && data.persistent() {
                let inbox_key = keys::encode_inbox(entry.def.id, self.state.next_seq()).to_vec();
                ops.push(Op::Put(Cf::Inbox, inbox_key.clone(), StoredMessage::from_data(&data, self.state.now()).encode_to_vec()));
                handoffs.push(Handoff::Adopt { tx, inbox_key, data: data.clone() });
            } else {
                handoffs.push(Handoff::Transient { tx, data: data.clone() });
            }
        }
    }

    /// Carries out a round's effects: one write, then what the outside world
    /// sees (in order, each once its write is durable), then reads.
    async fn flush(&mut self, fx: Effects, synced: Vec<Arc<ConfirmTracker>>) {
        let mut fx = fx;
        let mut synced = synced;
        // Removing consumers whose stream went away requeues their messages:
        // more effects, flushed in turn (bounded: each pass removes
        // consumers, and there are finitely many).
        for _ in 0..64 {
            self.flush_once(fx, std::mem::take(&mut synced)).await;
            if self.closed.is_empty() {
                break;
            }
            fx = Effects::default();
            for id in std::mem::take(&mut self.closed) {
                self.remove_consumer(id, &mut fx);
            }
            // Requeued messages go to the remaining consumers.
            if self.serving() {
                self.dispatch(&mut fx);
            }
        }
        self.arm_outboxes();
        self.shared.publish(self.state.stats());
    }

    async fn flush_once(&mut self, mut fx: Effects, synced: Vec<Arc<ConfirmTracker>>) {
        let metrics = crate::metrics::global();
        if fx.expired > 0 {
            metrics.expired(fx.expired);
        }
        for reason in &fx.dropped {
            metrics.dropped(reason.as_str());
        }
        let mut handoffs: Vec<Handoff> = Vec::new();
        for dl in std::mem::take(&mut fx.dead_letters) {
            metrics.dead_lettered(dl.reason.as_str());
            self.route_dead_letter(dl, &mut fx.ops, &mut handoffs);
        }
        if !handoffs.is_empty() {
            fx.sync = true;
        }
        if !fx.counters.is_zero() {
            fx.ops.push(Op::Merge(Cf::QueueState, keys::encode_queue_state(self.state.id).to_vec(), fx.counters.encode()));
        }
        if !fx.ops.is_empty() {
            self.submitted += 1;
            let batch = self.submitted;
            let done_tx = self.done_tx.clone();
            let incarnation = self.incarnation;
            let runtime = self.runtime.clone();
            let name = self.state.name.clone();
            let done = move |result: std::result::Result<(), StoreError>| {
                let outcome = match &result {
                    Ok(()) => PartOutcome::Enqueued,
                    Err(e) => PartOutcome::Rejected(format!("storage failure: {e}")),
                };
                for c in synced {
                    c.part_done(outcome.clone());
                }
                match &result {
                    // Hand dead letters over only once their move is
                    // durable; the targets may be this very queue.
                    Ok(()) if !handoffs.is_empty() => {
                        runtime.spawn(async move {
                            for h in handoffs {
                                h.send().await;
                            }
                        });
                    }
                    Ok(()) => {}
                    Err(e) if !handoffs.is_empty() => {
                        tracing::error!(queue = %name, error = %e, "a batch with dead-lettered messages failed")
                    }
                    Err(_) => {}
                }
                let _ = done_tx.send(BatchDone { incarnation, batch, result });
            };
            let req = WriteRequest::new(fx.ops, fx.sync).on_done(done).fenced(self.fence.clone());
            self.store.submit_with_room(req).await;
        } else {
            // Nothing to write: confirms of this round need no write of their
            // own, but must not overtake earlier writes still in flight.
            let ticket = self.submitted;
            for c in synced {
                self.outward.push((
                    ticket,
                    Outward::Reply(Box::new(move |r: Result<()>| match r {
                        Ok(()) => c.part_done(PartOutcome::Enqueued),
                        Err(e) => c.part_done(PartOutcome::Rejected(e.to_string())),
                    })),
                ));
            }
            // Transient dead letters from transient messages: nothing to
            // write first.
            if !handoffs.is_empty() {
                self.runtime.spawn(async move {
                    for h in handoffs {
                        h.send().await;
                    }
                });
            }
        }
        // What this round decided reaches the outside world in order, each
        // once the writes it depends on are durable. A ticket past the last
        // submitted batch (a round that wrote nothing) waits for that batch.
        let last = self.submitted;
        for (ticket, what) in std::mem::take(&mut self.outward) {
            self.push_outward(ticket.min(last), what);
        }
        crate::metrics::global().deliveries(&fx.deliveries);
        for d in fx.deliveries {
            let Some(sink) = self.sinks.get(&d.consumer) else {
                self.closed.push(d.consumer);
                continue;
            };
            let ticket = if d.msg.loc == Loc::Stored { d.msg.ticket.min(last) } else { 0 };
            sink.outbox.reserve(d.msg.mem);
            let delivery = Box::new(to_proto(&d, &sink.tag));
            self.push_outward(ticket, Outward::Deliver { consumer: d.consumer, delivery, mem: d.msg.mem });
        }
        for (id, error) in fx.consumer_errors {
            if let Some(sink) = self.sinks.get(&id) {
                sink.outbox.send(ConsumerEvent::Failed(error));
            }
            self.closed.push(id);
        }
        if let Some(req) = fx.timer_read {
            let store = self.store.clone();
            let me = self.me.clone();
            let queue = self.state.id;
            let incarnation = self.incarnation;
            tokio::spawn(async move {
                let result = store.read_after_writes(move |engine| read_timers(engine, queue, &req)).await;
                if let Some(tx) = me.upgrade() {
                    let _ = tx.send(QueueCmd::TimerDone { incarnation, epoch: req.epoch, result }).await;
                }
            });
        }
        if fx.expired > 0 || !fx.dropped.is_empty() {
            tracing::debug!(queue = %self.state.name, expired = fx.expired, dropped = fx.dropped.len(), "messages left the queue");
        }
        if let Some(req) = fx.refill {
            let store = self.store.clone();
            let me = self.me.clone();
            let queue = self.state.id;
            let incarnation = self.incarnation;
            tokio::spawn(async move {
                let result = store.read_after_writes(move |engine| read_refill(engine, queue, &req)).await;
                if let Some(tx) = me.upgrade() {
                    let _ = tx.send(QueueCmd::Refilled { incarnation, epoch: req.epoch, result }).await;
                }
            });
        }
    }

    /// Consumers that stopped for lack of room in their outbox while
    /// messages wait ask to be woken when their stream takes the next
    /// delivery. If it took one since the room was computed, look again now.
    fn arm_outboxes(&mut self) {
        if !self.serving() || !self.state.has_window() {
            // Nothing in memory to hand out: a publish or a refill wakes us.
            return;
        }
        let mut again = false;
        for (id, sink) in &self.sinks {
            let Some(mark) = self.marks.get(id) else { continue };
            if !self.state.wants_more(*id) {
                continue;
            }
            let (room, _) = sink.outbox.room(u32::MAX, u64::MAX);
            if room.empty {
                // Its outbox is empty: dispatch was not short of room.
                continue;
            }
            if !sink.outbox.arm(*mark) {
                again = true;
            }
        }
        if again && let Some(me) = self.me.upgrade() {
            // A full channel means commands are waiting: a round comes anyway.
            let _ = me.try_send(QueueCmd::Tick);
        }
    }

    /// Deletes the queue's data (and the caller's metadata) in one batch
    /// after everything it wrote before; stops the task once it is durable.
    async fn finish_delete(&mut self, delete: PendingDelete) {
        let mut ops = self.state.delete_ops();
        ops.extend(delete.extra_ops);
        let (tx, rx) = oneshot::channel();
        let req = WriteRequest::new(ops, true)
            .on_done(move |r| {
                let _ = tx.send(r);
            })
            .fenced(self.fence.clone());
        self.store.submit_with_room(req).await;
        match rx.await.unwrap_or(Err(StoreError::Closed)) {
            Ok(()) => {
                // Every earlier batch is applied too: release what waited
                // for them, then end the subscriptions. Nothing is written
                // for this queue any more.
                while let Ok(done) = self.done_rx.try_recv() {
                    self.batch_done(done);
                }
                for (_, sink) in std::mem::take(&mut self.sinks) {
                    sink.outbox.send(ConsumerEvent::Cancelled(delete.reason.clone()));
                }
                for g in std::mem::take(&mut self.pending_gets) {
                    let _ = g.reply.send(Err(Error::not_found("queue", self.state.name.to_string())));
                }
                self.stopped = true;
                let _ = delete.reply.send(Ok(delete.count));
            }
            Err(e) => {
                let _ = delete.reply.send(Err(Error::Store(e.clone())));
                if self.serving() {
                    self.failure = Some(format!("deleting the queue failed: {e}"));
                }
            }
        }
    }

    // ------------------------------------------------------ failure, reload

    /// The queue's memory can no longer be trusted to match its storage:
    /// refuse what its incarnation has not written yet, cancel consumers,
    /// fail waiting answers, and schedule a reload.
    fn fail(&mut self, reason: String) {
        tracing::error!(
            queue = %self.state.name,
            %reason,
            "the queue's memory no longer matches its storage: cancelling its consumers and reloading it from storage"
        );
        crate::metrics::global().queue_reloaded();
        self.fence.break_with(reason.clone());
        let message = format!("queue '{}' is reloading from storage after a failure ({reason})", self.state.name);
        for h in std::mem::take(&mut self.held) {
            if let Outward::Reply(reply) = h.what {
                reply(Err(Error::Unavailable(message.clone())));
            }
        }
        for (_, what) in std::mem::take(&mut self.outward) {
            if let Outward::Reply(reply) = what {
                reply(Err(Error::Unavailable(message.clone())));
            }
        }
        for (_, sink) in std::mem::take(&mut self.sinks) {
            sink.outbox.send(ConsumerEvent::Cancelled(message.clone()));
        }
        for g in std::mem::take(&mut self.pending_gets) {
            let _ = g.reply.send(Err(Error::Unavailable(message.clone())));
        }
        if let Some(d) = self.deleting.take() {
            let _ = d.reply.send(Err(Error::Unavailable(message.clone())));
        }
        self.closed.clear();
        self.marks.clear();
        self.incarnation += 1;
        self.unavailable = Some(message);
        self.retry_at = Some(tokio::time::Instant::now());
        self.retry_delay = RELOAD_RETRY_MIN;
    }

    fn retry_later(&mut self) {
        self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RELOAD_RETRY_MAX);
    }

    /// Rebuilds the queue from the store, as a restart would: persistent
    /// messages of a durable queue come back (unacknowledged ones as
    /// redelivered), transient data is dropped.
    async fn reload(&mut self) {
        let id = self.state.id;
        let now = now_ms();
        // Ordered after every write this queue submitted: each is applied
        // or refused by now.
        let read = self.store.read_after_writes(move |engine| read_queue_recovery(engine, id, now)).await;
        let recovered = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(queue = %self.state.name, error = %e, retry_in = ?self.retry_delay, "reading the queue back from storage failed");
                self.retry_later();
                return;
            }
        };
        let fence = Fence::new();
        let (tx, rx) = oneshot::channel();
        self.store.submit(
            WriteRequest::new(clear_transient_ops(id), true)
                .on_done(move |r| {
                    let _ = tx.send(r);
                })
                .fenced(fence.clone()),
        );
        if let Err(e) = rx.await.unwrap_or(Err(StoreError::Closed)) {
            tracing::error!(queue = %self.state.name, error = %e, retry_in = ?self.retry_delay, "clearing the queue's transient data failed");
            self.retry_later();
            return;
        }
        let old = &self.state;
        let (name, args, limits, seqs) = (old.name.clone(), old.args.clone(), *old.limits(), old.seqs().clone());
        let mut state = if old.durable {
            QueueState::recover(id, name, args, limits, seqs, recovered.counters, recovered.dedup)
        } else {
            QueueState::new(id, name, false, args, limits, seqs)
        };
        state.set_next_consumer_id(old.next_consumer_id());
        self.state = state;
        self.inbox = if self.state.durable { recovered.inbox } else { Vec::new() };
        self.fence = fence;
        self.unavailable = None;
        self.retry_at = None;
        self.retry_delay = RELOAD_RETRY_MIN;
        self.expiry_sent = false;
        tracing::info!(queue = %self.state.name, ready = self.state.stats().ready, "queue reloaded from storage");
        self.start().await;
    }
}

#[cfg(test)]
#[path = "task_tests.rs"]
mod tests;

fn to_proto(d: &OutDelivery, consumer_tag: &str) -> proto::Delivery {
    proto::Delivery {
        delivery_tag: d.tag,
        redelivered: d.redelivered,
        delivery_count: d.msg.delivery_count,
        exchange: d.msg.data.exchange.clone(),
        routing_key: d.msg.data.routing_key.clone(),
        properties: Some(d.msg.data.properties.clone()),
        body: d.msg.data.body.clone(),
        consumer_tag: consumer_tag.to_string(),
        message_count: 0,
    }
}
