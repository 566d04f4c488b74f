//! Publisher confirms. A message routed to N queues is confirmed once all N
//! have taken it (and, where it must be, written it to disk); the outcome
//! combines what each queue said.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use warren_client::proto::{Confirm, ConfirmStatus};

/// What one queue did with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartOutcome {
    Enqueued,
    Duplicate,
    Rejected(String),
    /// The queue went away before taking the message.
    Dropped,
}

/// Where the final confirm goes.
pub enum ConfirmSink {
    Oneshot(oneshot::Sender<Confirm>),
    Stream(mpsc::UnboundedSender<Confirm>),
}

impl ConfirmSink {
    pub fn send(self, confirm: Confirm) {
        crate::metrics::global().confirmed(confirm.status());
        match self {
            ConfirmSink::Oneshot(tx) => {
                let _ = tx.send(confirm);
            }
            ConfirmSink::Stream(tx) => {
                let _ = tx.send(confirm);
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    enqueued: u32,
    duplicates: u32,
    rejected: Option<String>,
}

/// Collects the parts of one message's confirm.
pub struct ConfirmTracker {
    seq: u64,
    mandatory: bool,
    remaining: AtomicUsize,
    tally: Mutex<Tally>,
    sink: Mutex<Option<ConfirmSink>>,
    /// When the message was routed, for the confirm latency.
    started: Instant,
}

impl ConfirmTracker {
    pub fn new(seq: u64, mandatory: bool, parts: usize, sink: ConfirmSink) -> Arc<ConfirmTracker> {
        Arc::new(ConfirmTracker {
            seq,
            mandatory,
            remaining: AtomicUsize::new(parts),
            tally: Mutex::new(Tally::default()),
            sink: Mutex::new(Some(sink)),
            started: Instant::now(),
        })
    }

    /// Records one queue's outcome; the last part sends the confirm.
    pub fn part_done(&self, outcome: PartOutcome) {
        {
            let mut t = self.tally.lock();
            match outcome {
                PartOutcome::Enqueued => t.enqueued += 1,
                PartOutcome::Duplicate => t.duplicates += 1,
                PartOutcome::Rejected(reason) => {
                    t.rejected.get_or_insert(reason);
                }
                PartOutcome::Dropped => {}
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let confirm = self.finish();
            crate::metrics::global().confirm_latency(self.started);
            if let Some(sink) = self.sink.lock().take() {
                sink.send(confirm);
            }
        }
    }

    fn finish(&self) -> Confirm {
        let t = self.tally.lock();
        let (status, reason) = if let Some(reason) = &t.rejected {
            (ConfirmStatus::Rejected, reason.clone())
        } else if t.enqueued > 0 {
            (ConfirmStatus::Routed, String::new())
        } else if t.duplicates > 0 {
            (ConfirmStatus::Duplicate, "message id already seen within the deduplication window".to_string())
        } else if self.mandatory {
            (ConfirmStatus::Returned, "no queue took the message".to_string())
        } else {
            (ConfirmStatus::Unroutable, String::new())
        };
        Confirm { seq: self.seq, status: status as i32, reason, queues: t.enqueued }
    }
}

impl Drop for ConfirmTracker {
    /// A tracker dropped before every part was done (a queue failed with
    /// the message in hand) still answers its publisher: rejected, so that
    /// it publishes again.
    fn drop(&mut self) {
        if let Some(sink) = self.sink.get_mut().take() {
            sink.send(immediate(self.seq, ConfirmStatus::Rejected, "a queue failed before it could confirm the message; publish it again"));
        }
    }
}

/// A confirm decided without any queue (unroutable, rejected up front).
pub fn immediate(seq: u64, status: ConfirmStatus, reason: impl Into<String>) -> Confirm {
    Confirm { seq, status: status as i32, reason: reason.into(), queues: 0 }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(mandatory: bool, parts: Vec<PartOutcome>) -> Confirm {
        let (tx, mut rx) = oneshot::channel();
        let t = ConfirmTracker::new(7, mandatory, parts.len(), ConfirmSink::Oneshot(tx));
        for p in parts {
            assert!(rx.try_recv().is_err(), "confirmed before every part was done");
            t.part_done(p);
        }
        rx.try_recv().unwrap()
    }

    #[test]
    fn should_combine_part_outcomes() {
        let c = run(false, vec![PartOutcome::Enqueued, PartOutcome::Enqueued]);
        assert_eq!((c.seq, c.status, c.queues), (7, ConfirmStatus::Routed as i32, 2));
        let c = run(false, vec![PartOutcome::Enqueued, PartOutcome::Rejected("full".into())]);
        assert_eq!(c.status, ConfirmStatus::Rejected as i32);
        assert_eq!(c.reason, "full");
        let c = run(false, vec![PartOutcome::Duplicate, PartOutcome::Dropped]);
        assert_eq!(c.status, ConfirmStatus::Duplicate as i32);
        let c = run(true, vec![PartOutcome::Dropped]);
        assert_eq!(c.status, ConfirmStatus::Returned as i32);
        let c = run(false, vec![PartOutcome::Dropped]);
        assert_eq!(c.status, ConfirmStatus::Unroutable as i32);
    }

    #[test]
    fn should_reject_when_dropped_before_every_part_is_done() {
        let (tx, mut rx) = oneshot::channel();
        let t = ConfirmTracker::new(9, false, 2, ConfirmSink::Oneshot(tx));
        t.part_done(PartOutcome::Enqueued);
        drop(t);
        let c = rx.try_recv().unwrap();
        assert_eq!((c.seq, c.status), (9, ConfirmStatus::Rejected as i32));
    }
}
