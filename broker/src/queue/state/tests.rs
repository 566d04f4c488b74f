#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;
use warren_client::proto::Properties;

use super::*;
use crate::queue::read::{read_refill, read_timers};
use crate::store::memory::MemoryEngine;
use crate::store::{Engine, Reader, keys};

fn data(id: u64, persistent: bool, priority: Option<u32>) -> Arc<MessageData> {
    Arc::new(MessageData {
        exchange: String::new(),
        routing_key: "q".into(),
        properties: Properties { persistent, priority, ..Default::default() },
        body: Bytes::from(id.to_be_bytes().to_vec()),
    })
}

fn id_of(m: &QMsg) -> u64 {
    u64::from_be_bytes(m.data.body.as_ref().try_into().unwrap())
}

fn spec(tag: &str, prefetch: u32) -> ConsumerSpec {
    ConsumerSpec { tag: tag.into(), prefetch, auto_ack: false, exclusive: false, priority: 0, peer: "test".into(), limits: None }
}

/// A queue plus an in-memory store that the effects are applied to, as the
/// owner task would.
///
/// A refill or timer read runs some time after it is asked for, and sees
/// the store as it is then: anywhere from the moment of the request (every
/// earlier write applied, nothing later) to the moment its result is taken.
/// With `stale_reads` the harness reads as of the request (a copy of the
/// store taken then), else as of completion; the model test runs both.
struct Harness {
    q: QueueState,
    engine: MemoryEngine,
    refill: Option<(RefillRequest, Option<MemoryEngine>)>,
    timer: Option<(TimerRequest, Option<MemoryEngine>)>,
    delivered: Vec<OutDelivery>,
    dead: Vec<DeadLetter>,
    stale_reads: bool,
}

impl Harness {
    fn new(durable: bool, args: QueueArgs, limits: Limits) -> Self {
        Harness {
            q: QueueState::new(7, "q".into(), durable, args, limits, Arc::new(SeqAllocator::default())),
            engine: MemoryEngine::new(),
            refill: None,
            timer: None,
            delivered: Vec::new(),
            dead: Vec::new(),
            stale_reads: false,
        }
    }

    /// The store as a read asked for now will see it, if reads are stale.
    fn read_view(&self) -> Option<MemoryEngine> {
        self.stale_reads.then(|| self.engine.snapshot())
    }

    fn apply(&mut self, mut fx: Effects) {
        if !fx.counters.is_zero() {
            fx.ops.push(Op::Merge(Cf::QueueState, keys::encode_queue_state(self.q.id).to_vec(), fx.counters.encode()));
        }
        self.engine.write(&fx.ops, fx.sync).unwrap();
        self.delivered.extend(fx.deliveries);
        self.dead.extend(fx.dead_letters);
        if let Some(r) = fx.refill {
            assert!(self.refill.is_none(), "two refills in flight");
            self.refill = Some((r, self.read_view()));
        }
        if let Some(t) = fx.timer_read {
            assert!(self.timer.is_none(), "two timer reads in flight");
            self.timer = Some((t, self.read_view()));
        }
        self.q.check_invariants();
    }

    fn run(&mut self, f: impl FnOnce(&mut QueueState, &mut Effects)) {
        let mut fx = Effects::default();
        f(&mut self.q, &mut fx);
        self.apply(fx);
    }

    /// Moves the clock and runs a timer read if one is due.
    fn advance(&mut self, to_ms: u64) {
        self.q.set_now(to_ms);
        self.run(|q, fx| q.poll_timers(fx));
        while self.complete_timer() {}
    }

    fn complete_timer(&mut self) -> bool {
        let Some((t, view)) = self.timer.take() else { return false };
        let result = read_timers(view.as_ref().unwrap_or(&self.engine), self.q.id, &t).unwrap();
        self.run(|q, fx| {
            q.timer_done(t.epoch, result, fx);
            q.poll_timers(fx);
        });
        true
    }

    fn complete_refill(&mut self) -> bool {
        let Some((r, view)) = self.refill.take() else { return false };
        let (entries, exhausted) = read_refill(view.as_ref().unwrap_or(&self.engine), self.q.id, &r).unwrap();
        self.run(|q, fx| q.refilled(r.epoch, entries, exhausted, fx));
        true
    }

    fn publish(&mut self, id: u64, persistent: bool, priority: Option<u32>) {
        self.run(|q, fx| {
            q.enqueue(data(id, persistent, priority), None, fx);
        });
    }

    fn dispatch(&mut self, room: usize) {
        self.run(|q, fx| q.dispatch(fx, &mut |_| Room::messages(room)));
    }

    /// Gets with ack until empty, completing refills as needed.
    fn drain_ids(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let mut fx = Effects::default();
            let got = self.q.get(16, u64::MAX, true, &mut fx);
            self.apply(fx);
            match got {
                GetOutcome::Messages(ms) if ms.is_empty() => break,
                GetOutcome::Messages(ms) => out.extend(ms.iter().map(|d| id_of(&d.msg))),
                GetOutcome::NeedRefill => {
                    assert!(self.complete_refill(), "NeedRefill without a refill in flight");
                }
            }
        }
        out
    }

    fn stored_counters(&self) -> QueueCounters {
        self.engine
            .get(Cf::QueueState, &keys::encode_queue_state(self.q.id))
            .unwrap()
            .and_then(|v| QueueCounters::decode(&v))
            .unwrap_or_default()
    }

    /// Simulates a crash and restart: paged messages vanish, the queue is
    /// rebuilt from its durable counters.
    fn restart(&mut self) {
        self.engine.write(&[Op::DeleteRange(Cf::Paged, vec![0], vec![0xff; 20])], true).unwrap();
        let counters = self.stored_counters();
        let seqs = Arc::new(SeqAllocator::starting_at(counters.max_seq + 1_000_000));
        let dedup: Vec<(String, u64)> = self
            .engine
            .scan(Cf::Dedup, &[], &[0xff; 9], usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (keys::decode_dedup(&k).unwrap().1, u64::from_be_bytes(v.try_into().unwrap())))
            .collect();
        let now = self.q.now();
        self.q = QueueState::recover(self.q.id, "q".into(), self.q.args.clone(), self.q.limits, seqs, counters, dedup);
        self.q.set_now(now);
        self.timer = None;
        self.refill = None;
        self.delivered.clear();
        self.q.check_invariants();
    }
}

fn small() -> Limits {
    Limits { window_messages: 4, window_bytes: 1 << 20, consumer_max_unacked: u32::MAX, consumer_max_unacked_bytes: u64::MAX }
}

#[test]
fn should_share_messages_round_robin_between_consumers() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    let b = h.q.add_consumer(spec("b", 0)).unwrap();
    for i in 0..6 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    let to: Vec<ConsumerId> = h.delivered.iter().map(|d| d.consumer).collect();
    assert_eq!(to, vec![a, b, a, b, a, b]);
    let ids: Vec<u64> = h.delivered.iter().map(|d| id_of(&d.msg)).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5]);
}

#[test]
fn should_respect_prefetch_and_refill_credit_on_ack() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 2)).unwrap();
    for i in 0..5 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    assert_eq!(h.delivered.len(), 2);
    assert_eq!(h.q.stats().unacked, 2);
    assert_eq!(h.q.stats().ready, 3);
    h.run(|q, fx| q.ack(a, 1, false, fx).unwrap());
    h.dispatch(100);
    assert_eq!(h.delivered.len(), 3);
    // `multiple` acks everything up to the tag.
    h.run(|q, fx| q.ack(a, 3, true, fx).unwrap());
    assert_eq!(h.q.stats().unacked, 0);
    assert_eq!(h.stored_counters().messages, 2);
}

#[test]
fn should_respect_channel_room() {
    let mut h = Harness::new(false, QueueArgs::default(), Limits::default());
    h.q.add_consumer(spec("a", 0)).unwrap();
    for i in 0..5 {
        h.publish(i, false, None);
    }
    h.dispatch(3);
    assert_eq!(h.delivered.len(), 3);
}

#[test]
fn should_requeue_unacked_in_original_order_marked_redelivered() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    for i in 0..4 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    h.run(|q, fx| q.ack(a, 2, false, fx).unwrap());
    h.run(|q, fx| {
        assert!(q.remove_consumer(a, fx));
    });
    assert_eq!(h.q.stats().ready, 3);
    h.delivered.clear();
    h.q.add_consumer(spec("b", 0)).unwrap();
    h.dispatch(100);
    let got: Vec<(u64, bool, u32)> = h.delivered.iter().map(|d| (id_of(&d.msg), d.redelivered, d.msg.delivery_count)).collect();
    assert_eq!(got, vec![(0, true, 2), (2, true, 2), (3, true, 2)]);
}

#[test]
fn should_reject_unknown_delivery_tags() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    h.publish(1, true, None);
    h.dispatch(100);
    let mut fx = Effects::default();
    let e = h.q.ack(a, 9, false, &mut fx).unwrap_err();
    assert!(e.to_string().contains("unknown delivery tag 9"), "{e}");
    h.run(|q, fx| q.ack(a, 1, false, fx).unwrap());
    let e = h.q.ack(a, 1, false, &mut fx).unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed(_)));
}

#[test]
fn should_settle_everything_with_multiple_and_the_largest_tag() {
    // `tag + 1` overflowed here (a panic in debug builds, an empty
    // settlement in release ones); u64::MAX with `multiple` means "all".
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    for i in 0..3 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    assert_eq!(h.q.stats().unacked, 3);
    h.run(|q, fx| q.nack(a, u64::MAX, true, true, fx).unwrap());
    assert_eq!((h.q.stats().unacked, h.q.stats().ready), (0, 3));
    h.dispatch(100);
    h.run(|q, fx| q.ack(a, u64::MAX, true, fx).unwrap());
    assert_eq!((h.q.stats().unacked, h.q.stats().ready), (0, 0));
    assert_eq!(h.stored_counters().messages, 0);
    // Nothing left to settle: an unknown tag, not a crash.
    let mut fx = Effects::default();
    let e = h.q.ack(a, u64::MAX, true, &mut fx).unwrap_err();
    assert!(e.to_string().contains("unknown delivery tag"), "{e}");
    let e = h.q.ack(a, u64::MAX, false, &mut fx).unwrap_err();
    assert!(e.to_string().contains("unknown delivery tag"), "{e}");
}

#[test]
fn should_discard_on_nack_without_requeue_and_requeue_otherwise() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    h.publish(1, true, None);
    h.publish(2, true, None);
    h.dispatch(100);
    h.run(|q, fx| q.nack(a, 1, false, false, fx).unwrap());
    h.run(|q, fx| q.nack(a, 2, false, true, fx).unwrap());
    assert_eq!(h.q.stats().ready, 1);
    assert_eq!(h.q.stats().unacked, 0);
    assert_eq!(h.stored_counters().messages, 1);
}

#[test]
fn should_deliver_higher_priorities_first_and_cap_at_max() {
    let args = QueueArgs { max_priority: Some(5), ..Default::default() };
    let mut h = Harness::new(true, args, Limits::default());
    h.publish(1, true, None);
    h.publish(2, true, Some(3));
    h.publish(3, true, Some(200));
    h.publish(4, true, Some(5));
    h.publish(5, true, Some(3));
    assert_eq!(h.drain_ids(), vec![3, 4, 2, 5, 1]);
}

#[test]
fn should_ignore_priority_without_max_priority() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    h.publish(1, true, None);
    h.publish(2, true, Some(9));
    assert_eq!(h.drain_ids(), vec![1, 2]);
}

#[test]
fn should_keep_only_a_window_in_memory_and_read_the_rest_back() {
    let mut h = Harness::new(true, QueueArgs::default(), small());
    for i in 0..50 {
        h.publish(i, i % 2 == 0, None);
    }
    assert!(h.q.window.len() <= 4);
    assert_eq!(h.q.stats().ready, 50);
    // Transient messages beyond the window were paged.
    let paged = h.engine.scan(Cf::Paged, &[0], &[0xff; 20], 1000).unwrap();
    assert!(!paged.is_empty());
    assert_eq!(h.drain_ids(), (0..50).collect::<Vec<_>>());
    assert!(h.engine.scan(Cf::Paged, &[0], &[0xff; 20], 1000).unwrap().is_empty());
    assert!(h.engine.scan(Cf::Messages, &[0], &[0xff; 20], 1000).unwrap().is_empty());
    assert_eq!(h.stored_counters().messages, 0);
}

#[test]
fn should_place_arrivals_during_a_refill_without_loss() {
    let mut h = Harness::new(true, QueueArgs::default(), small());
    for i in 0..20 {
        h.publish(i, true, None);
    }
    h.dispatch(0);
    // Drain the window so a refill is requested, then publish while it is
    // in flight.
    let mut fx = Effects::default();
    let _ = h.q.get(4, u64::MAX, true, &mut fx);
    h.apply(fx);
    assert!(h.refill.is_some());
    for i in 20..30 {
        h.publish(i, i % 3 == 0, None);
    }
    h.complete_refill();
    let rest = h.drain_ids();
    assert_eq!(rest, (4..30).collect::<Vec<_>>());
}

#[test]
fn should_recover_persistent_messages_as_redelivered_after_restart() {
    let mut h = Harness::new(true, QueueArgs::default(), small());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    for i in 0..10 {
        h.publish(i, i != 5, None);
    }
    h.dispatch(2);
    h.run(|q, fx| q.ack(a, 1, false, fx).unwrap());
    h.restart();
    assert_eq!(h.q.stats().ready, 8);
    h.q.add_consumer(spec("b", 0)).unwrap();
    h.dispatch(0);
    assert!(h.refill.is_some());
    // The window holds 4: refill and dispatch until the backlog is read.
    while h.complete_refill() {
        h.dispatch(100);
    }
    let got: Vec<(u64, bool)> = h.delivered.iter().map(|d| (id_of(&d.msg), d.redelivered)).collect();
    assert_eq!(got[0], (1, true));
    assert!(got[1..].iter().all(|(_, r)| !r));
    let ids: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 6, 7, 8, 9]);
}

#[test]
fn should_peek_with_get_without_ack() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    h.publish(1, true, None);
    let mut fx = Effects::default();
    let GetOutcome::Messages(first) = h.q.get(1, u64::MAX, false, &mut fx) else { panic!() };
    h.apply(fx);
    assert!(!first[0].redelivered);
    assert_eq!(first[0].msg.delivery_count, 1);
    // A peek leaves the message as it was: not redelivered, not counted.
    let mut fx = Effects::default();
    let GetOutcome::Messages(second) = h.q.get(1, u64::MAX, true, &mut fx) else { panic!() };
    h.apply(fx);
    assert!(!second[0].redelivered);
    assert_eq!(second[0].msg.delivery_count, 1);
    assert_eq!(h.q.stats().ready, 0);
}

#[test]
fn should_report_the_oldest_ready_message_across_priorities() {
    let mut h = Harness::new(true, args(|a| a.max_priority = Some(5)), Limits::default());
    h.q.set_now(1000);
    h.publish(1, true, Some(0));
    h.q.set_now(4000);
    h.publish(2, true, Some(5));
    h.publish(3, true, Some(2));
    assert_eq!(h.q.stats().oldest_ready_ms, Some(1000), "the low-priority message waits longest");
    assert_eq!(h.drain_ids(), vec![2, 3, 1]);
    assert_eq!(h.q.stats().oldest_ready_ms, None);
}

#[test]
fn should_not_count_peeks_toward_the_delivery_limit() {
    let mut h = Harness::new(true, with_dlx(|a| a.delivery_limit = Some(1)), Limits::default());
    h.publish(1, true, None);
    for _ in 0..5 {
        let mut fx = Effects::default();
        let GetOutcome::Messages(got) = h.q.get(1, u64::MAX, false, &mut fx) else { panic!() };
        h.apply(fx);
        assert_eq!(got.len(), 1);
    }
    assert!(h.dead.is_empty());
    assert_eq!(h.drain_ids(), vec![1]);
}

#[test]
fn should_purge_ready_but_keep_unacked() {
    let mut h = Harness::new(true, QueueArgs::default(), small());
    let a = h.q.add_consumer(spec("a", 2)).unwrap();
    for i in 0..30 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    let purged = {
        let mut fx = Effects::default();
        let n = h.q.purge(&mut fx);
        h.apply(fx);
        n
    };
    assert_eq!(purged, 28);
    assert_eq!(h.stored_counters().messages, 2);
    h.run(|q, fx| {
        q.remove_consumer(a, fx);
    });
    assert_eq!(h.drain_ids(), vec![0, 1]);
}

#[test]
fn should_refuse_conflicting_exclusive_consumers_and_duplicate_tags() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    h.q.add_consumer(spec("a", 0)).unwrap();
    let mut ex = spec("x", 0);
    ex.exclusive = true;
    assert!(matches!(h.q.add_consumer(ex.clone()), Err(Error::AlreadyExists(_))));
    assert!(matches!(h.q.add_consumer(spec("a", 0)), Err(Error::AlreadyExists(_))));
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    h.q.add_consumer(ex).unwrap();
    assert!(matches!(h.q.add_consumer(spec("b", 0)), Err(Error::AlreadyExists(_))));
}

// ------------------------------------------------------------ model test

// ------------------------------------------------------------ semantics

fn args(f: impl FnOnce(&mut QueueArgs)) -> QueueArgs {
    let mut a = QueueArgs::default();
    f(&mut a);
    a
}

fn with_dlx(f: impl FnOnce(&mut QueueArgs)) -> QueueArgs {
    args(|a| {
        a.dead_letter_exchange = Some("dlx".into());
        f(a);
    })
}

fn ttl_data(id: u64, persistent: bool, expiration_ms: Option<u64>) -> Arc<MessageData> {
    let mut d = (*data(id, persistent, None)).clone();
    d.properties.expiration_ms = expiration_ms;
    d.properties.message_id = format!("m{id}");
    Arc::new(d)
}

impl Harness {
    fn publish_data(&mut self, d: Arc<MessageData>, delay: Option<u64>) -> EnqueueOutcome {
        let mut out = None;
        self.run(|q, fx| out = Some(q.enqueue(d, delay, fx)));
        out.unwrap()
    }

    fn dead_ids(&self) -> Vec<(u64, DeathReason)> {
        self.dead.iter().map(|d| (u64::from_be_bytes(d.data.body.as_ref().try_into().unwrap()), d.reason)).collect()
    }
}

#[test]
fn should_expire_messages_with_no_consumer_and_dead_letter_them() {
    let mut h = Harness::new(true, with_dlx(|a| a.message_ttl_ms = Some(1000)), Limits::default());
    h.q.set_now(10_000);
    h.publish_data(ttl_data(1, true, None), None);
    h.publish_data(ttl_data(2, true, Some(200)), None);
    h.publish_data(ttl_data(3, false, Some(5000)), None);
    assert_eq!(h.q.stats().ready, 3);
    assert_eq!(h.q.next_deadline(), Some(10_201), "the earliest expiry, once passed");
    h.advance(10_201);
    assert_eq!(h.dead_ids(), vec![(2, DeathReason::Expired)]);
    h.advance(11_001);
    // The queue TTL (1000) is below message 3's own (5000): the lower wins.
    assert_eq!(h.dead_ids(), vec![(2, DeathReason::Expired), (1, DeathReason::Expired), (3, DeathReason::Expired)]);
    assert_eq!(h.q.stats().ready, 0);
    assert_eq!(h.stored_counters().messages, 0);
    assert!(h.engine.scan(Cf::Expiry, &[], &[0xff; 30], 10).unwrap().is_empty(), "index entries go with their messages");
}

#[test]
fn should_never_deliver_an_expired_message() {
    let mut h = Harness::new(false, args(|a| a.message_ttl_ms = Some(100)), Limits::default());
    h.q.set_now(1000);
    h.publish_data(ttl_data(1, false, None), None);
    h.publish_data(ttl_data(2, false, Some(1000)), None);
    // Time passes without a timer read: the head check still refuses it.
    h.q.set_now(1101);
    let c = h.q.add_consumer(spec("c", 0)).unwrap();
    let _ = c;
    h.dispatch(10);
    assert!(h.delivered.is_empty(), "{:?}", h.delivered.iter().map(|d| id_of(&d.msg)).collect::<Vec<_>>());
    assert_eq!(h.q.stats().ready, 0);
}

#[test]
fn should_expire_a_disk_only_backlog_without_reading_it_into_memory() {
    let mut h = Harness::new(true, args(|a| a.message_ttl_ms = Some(50)), small());
    h.q.set_now(100);
    for i in 0..20 {
        h.publish_data(ttl_data(i, i % 2 == 0, None), None);
    }
    assert_eq!(h.q.stats().ready, 20);
    h.advance(151);
    assert_eq!(h.q.stats().ready, 0);
    assert_eq!(h.stored_counters().messages, 0);
    assert!(h.engine.scan(Cf::Paged, &[], &[0xff; 30], 10).unwrap().is_empty());
    assert!(h.drain_ids().is_empty());
}

#[test]
fn should_expire_returned_messages_and_recheck_unacked_ones() {
    let mut h = Harness::new(true, with_dlx(|_| {}), Limits::default());
    h.q.set_now(1000);
    h.publish_data(ttl_data(1, true, Some(100)), None);
    let c = h.q.add_consumer(spec("c", 0)).unwrap();
    h.dispatch(10);
    assert_eq!(h.delivered.len(), 1);
    // Due while unacked: not expired under the consumer's feet.
    h.advance(1200);
    assert!(h.dead.is_empty());
    assert_eq!(h.q.stats().unacked, 1);
    // Returned after its TTL: expired instead of requeued.
    h.run(|q, fx| q.nack(c, 1, false, true, fx).unwrap());
    assert_eq!(h.dead_ids(), vec![(1, DeathReason::Expired)]);
    assert_eq!(h.q.stats().ready, 0);
    // The re-check entry left behind is cleaned up by the next sweep.
    h.advance(2300);
    assert!(h.engine.scan(Cf::Expiry, &[], &[0xff; 30], 10).unwrap().is_empty());
}

#[test]
fn should_hold_back_delayed_messages_and_release_them_in_due_order() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    h.q.set_now(1000);
    h.publish_data(ttl_data(1, true, None), Some(500));
    h.publish_data(ttl_data(2, false, None), Some(100));
    h.publish_data(ttl_data(3, true, None), None);
    assert_eq!(h.q.stats().delayed, 2);
    assert_eq!(h.q.stats().ready, 1);
    assert_eq!(h.stored_counters().delayed, 1, "only the persistent delayed message is counted durably");
    h.advance(1100);
    assert_eq!((h.q.stats().delayed, h.q.stats().ready), (1, 2));
    h.advance(1499);
    assert_eq!(h.q.stats().delayed, 1);
    h.advance(1500);
    assert_eq!((h.q.stats().delayed, h.q.stats().ready), (0, 3));
    assert_eq!(h.drain_ids(), vec![3, 2, 1]);
    assert_eq!(h.stored_counters().delayed, 0);
}

#[test]
fn should_keep_persistent_delayed_messages_across_a_restart() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    h.q.set_now(1000);
    h.publish_data(ttl_data(1, true, None), Some(90 * 24 * 3600 * 1000));
    h.publish_data(ttl_data(2, false, None), Some(10));
    h.engine.write(&[Op::DeleteRange(Cf::DelaysTransient, vec![0], vec![0xff; 30])], true).unwrap();
    h.restart();
    assert_eq!(h.q.stats().delayed, 1);
    h.advance(2000);
    assert_eq!(h.q.stats().ready, 0);
    h.advance(1000 + 90 * 24 * 3600 * 1000);
    assert_eq!(h.drain_ids(), vec![1]);
}

#[test]
fn should_drop_the_head_over_max_length() {
    let mut h = Harness::new(true, with_dlx(|a| a.max_length = Some(2)), Limits::default());
    for i in 0..5 {
        assert!(matches!(h.publish_data(ttl_data(i, true, None), None), EnqueueOutcome::Enqueued { .. }));
    }
    assert_eq!(h.dead_ids(), vec![(0, DeathReason::Maxlen), (1, DeathReason::Maxlen), (2, DeathReason::Maxlen)]);
    assert_eq!(h.drain_ids(), vec![3, 4]);
    assert_eq!(h.stored_counters().messages, 0);
}

#[test]
fn should_drop_by_bytes_too() {
    let mut h = Harness::new(false, args(|a| a.max_length_bytes = Some(16)), Limits::default());
    for i in 0..4 {
        h.publish_data(ttl_data(i, false, None), None);
    }
    // Each body is 8 bytes: two fit.
    assert_eq!(h.drain_ids(), vec![2, 3]);
}

#[test]
fn should_reject_publishes_when_full_with_reject_publish() {
    for (overflow, dead) in [(Overflow::RejectPublish, false), (Overflow::RejectPublishDlx, true)] {
        let mut h = Harness::new(
            true,
            with_dlx(|a| {
                a.max_length = Some(1);
                a.overflow = overflow;
            }),
            Limits::default(),
        );
        assert!(matches!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Enqueued { .. }));
        match h.publish_data(ttl_data(2, true, None), None) {
            EnqueueOutcome::Rejected(reason) => assert!(reason.contains("x-max-length"), "{reason}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(h.dead_ids(), if dead { vec![(2, DeathReason::Maxlen)] } else { vec![] });
        assert_eq!(h.drain_ids(), vec![1]);
    }
}

#[test]
fn should_dead_letter_rejected_messages() {
    let mut h = Harness::new(true, with_dlx(|_| {}), Limits::default());
    h.publish(1, true, None);
    let c = h.q.add_consumer(spec("c", 0)).unwrap();
    h.dispatch(10);
    h.run(|q, fx| q.nack(c, 1, false, false, fx).unwrap());
    assert_eq!(h.dead_ids(), vec![(1, DeathReason::Rejected)]);
    assert_eq!(h.stored_counters().messages, 0);
}

#[test]
fn should_dead_letter_after_delivery_limit() {
    let mut h = Harness::new(true, with_dlx(|a| a.delivery_limit = Some(2)), Limits::default());
    h.publish(1, true, None);
    let c = h.q.add_consumer(spec("c", 0)).unwrap();
    let mut counts = Vec::new();
    for _ in 0..5 {
        let before = h.delivered.len();
        h.dispatch(10);
        let Some(d) = h.delivered.get(before).cloned() else { break };
        counts.push(d.msg.delivery_count);
        h.run(|q, fx| q.nack(c, d.tag, false, true, fx).unwrap());
    }
    assert_eq!(counts, vec![1, 2, 3], "delivered limit + 1 times");
    assert_eq!(h.dead_ids(), vec![(1, DeathReason::DeliveryLimit)]);
    assert_eq!(h.q.stats().ready, 0);
}

#[test]
fn should_deduplicate_within_the_window_across_a_restart() {
    let mut h = Harness::new(true, args(|a| a.deduplication_window_ms = Some(1000)), Limits::default());
    h.q.set_now(5000);
    assert!(matches!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Enqueued { .. }));
    assert_eq!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Duplicate { ticket: 0 });
    h.restart();
    h.q.set_now(5999);
    assert_eq!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Duplicate { ticket: 0 }, "the window survives a restart");
    h.q.set_now(6000);
    assert!(matches!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Enqueued { .. }), "the window has passed");
    assert_eq!(h.drain_ids(), vec![1, 1]);
    // Messages without an id are never duplicates.
    let mut anon = (*data(9, true, None)).clone();
    anon.properties.message_id.clear();
    let anon = Arc::new(anon);
    for _ in 0..2 {
        assert!(matches!(h.publish_data(anon.clone(), None), EnqueueOutcome::Enqueued { .. }));
    }
}

#[test]
fn should_tie_a_duplicate_to_the_write_of_its_first_copy() {
    let mut h = Harness::new(true, args(|a| a.deduplication_window_ms = Some(1000)), Limits::default());
    h.q.set_now(5000);
    h.q.set_ticket(7);
    assert!(matches!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Enqueued { needs_sync: true }));
    h.q.set_ticket(8);
    // Until write 7 is durable the duplicate's answer must wait for it.
    assert_eq!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Duplicate { ticket: 7 });
    h.restart();
    assert_eq!(h.publish_data(ttl_data(1, true, None), None), EnqueueOutcome::Duplicate { ticket: 0 }, "read back: durable");
}

/// An acknowledgement that arrives while a refill is reading the store must
/// not let the refill bring the acknowledged message back: the read may
/// have been taken before the acknowledgement's delete was written.
#[test]
fn should_not_bring_back_a_message_acked_while_a_refill_read_it() {
    let args = QueueArgs { max_priority: Some(3), ..Default::default() };
    let mut h = Harness::new(true, args, small());
    h.stale_reads = true;
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    // Two low-priority messages, delivered and unacknowledged.
    h.publish(0, true, Some(0));
    h.publish(1, true, Some(0));
    h.dispatch(2);
    assert_eq!(h.q.stats().unacked, 2);
    // Six high-priority ones: their keys sort first, the window holds four,
    // the rest go to disk below the unacknowledged ones.
    for i in 10..16 {
        h.publish(i, true, Some(3));
    }
    assert!(h.q.frontier.is_some());
    // Emptying the window asks for a refill, which reads the store now.
    let mut fx = Effects::default();
    let GetOutcome::Messages(got) = h.q.get(4, u64::MAX, true, &mut fx) else { panic!("expected messages") };
    h.apply(fx);
    assert_eq!(got.len(), 4);
    assert!(h.refill.is_some(), "a refill is in flight");
    // Message 0 is acknowledged while the read is in flight.
    h.run(|q, fx| q.ack(a, 1, false, fx).unwrap());
    h.complete_refill();
    let rest = h.drain_ids();
    assert_eq!(rest, vec![14, 15], "the acknowledged message came back");
    h.run(|q, fx| {
        q.remove_consumer(a, fx);
    });
    assert_eq!(h.drain_ids(), vec![1]);
    assert_eq!(h.stored_counters().messages, 0);
}

/// A `Get` that finds only expired messages in memory reads on from disk
/// instead of reporting the queue empty.
#[test]
fn should_get_from_disk_when_every_message_in_memory_expired() {
    let mut h = Harness::new(true, QueueArgs::default(), small());
    h.q.set_now(1000);
    for i in 0..4 {
        h.publish_data(ttl_data(i, true, Some(10)), None);
    }
    for i in 4..10 {
        h.publish(i, true, None);
    }
    assert_eq!(h.q.window.len(), 4, "the window holds the four that will expire");
    h.q.set_now(2000);
    let mut fx = Effects::default();
    let got = h.q.get(1, u64::MAX, true, &mut fx);
    h.apply(fx);
    assert!(matches!(got, GetOutcome::NeedRefill), "{got:?}");
    h.complete_refill();
    let mut fx = Effects::default();
    let GetOutcome::Messages(got) = h.q.get(1, u64::MAX, true, &mut fx) else { panic!("expected messages") };
    h.apply(fx);
    assert_eq!(got.iter().map(|d| id_of(&d.msg)).collect::<Vec<_>>(), vec![4]);
}

/// A `Get` takes no more than its reply can carry; one message always.
#[test]
fn should_bound_a_get_by_bytes() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    for i in 0..5 {
        h.publish(i, true, None);
    }
    let mem = h.q.window.values().next().unwrap().mem;
    let mut fx = Effects::default();
    let GetOutcome::Messages(got) = h.q.get(5, 2 * mem + 1, true, &mut fx) else { panic!() };
    h.apply(fx);
    assert_eq!(got.len(), 2);
    assert_eq!(h.q.stats().ready, 3, "nothing beyond the reply left the queue");
    let mut fx = Effects::default();
    let GetOutcome::Messages(got) = h.q.get(5, 1, true, &mut fx) else { panic!() };
    h.apply(fx);
    assert_eq!(got.len(), 1, "one message always fits");
}

/// Headers count toward the window's bytes, not only bodies.
#[test]
fn should_count_headers_toward_the_window() {
    let limits = Limits { window_bytes: 8 << 10, ..Limits::default() };
    let mut h = Harness::new(true, QueueArgs::default(), limits);
    for i in 0..10 {
        let mut d = (*data(i, true, None)).clone();
        d.properties.headers.insert("pad".into(), warren_client::proto::Value::from("x".repeat(3000)));
        h.publish_data(Arc::new(d), None);
    }
    assert!(h.q.window.len() <= 2, "the window holds {} messages of 3 KiB headers within 8 KiB", h.q.window.len());
    assert_eq!(h.drain_ids(), (0..10).collect::<Vec<_>>());
}

/// Prefetch 0 means the broker's maximum, which also caps larger values;
/// the bytes a consumer holds are bounded too, one message always fits.
#[test]
fn should_bound_what_a_consumer_holds() {
    let limits = Limits { consumer_max_unacked: 3, ..Limits::default() };
    let mut h = Harness::new(true, QueueArgs::default(), limits);
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    let b = h.q.add_consumer(spec("b", 50)).unwrap();
    for i in 0..20 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    let held = |h: &Harness, c| h.delivered.iter().filter(|d| d.consumer == c).count();
    assert_eq!((held(&h, a), held(&h, b)), (3, 3));
    let views = h.q.consumers();
    assert_eq!(views.iter().map(|v| v.effective_prefetch).collect::<Vec<_>>(), vec![3, 3]);

    let mem = h.q.window.values().next().unwrap().mem;
    let limits = Limits { consumer_max_unacked_bytes: mem * 5 / 2, ..Limits::default() };
    let mut h = Harness::new(true, QueueArgs::default(), limits);
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    for i in 0..20 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    assert_eq!(h.delivered.len(), 2, "two messages fit in 2.5 messages' bytes");
    let mut big = (*data(99, true, None)).clone();
    big.body = Bytes::from(vec![0u8; 4096]);
    let limits = Limits { consumer_max_unacked_bytes: 100, ..Limits::default() };
    let mut h = Harness::new(true, QueueArgs::default(), limits);
    h.q.add_consumer(spec("a", 0)).unwrap();
    h.publish_data(Arc::new(big), None);
    h.dispatch(100);
    assert_eq!(h.delivered.len(), 1, "a message larger than the bound goes to a consumer holding nothing");
    let _ = a;
}

/// `multiple` with the largest tag acknowledges everything (no overflow).
#[test]
fn should_ack_everything_up_to_the_largest_tag() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let a = h.q.add_consumer(spec("a", 0)).unwrap();
    for i in 0..3 {
        h.publish(i, true, None);
    }
    h.dispatch(100);
    h.run(|q, fx| q.ack(a, u64::MAX, true, fx).unwrap());
    assert_eq!(h.q.stats().unacked, 0);
    assert_eq!(h.stored_counters().messages, 0);
}

#[test]
fn should_hand_over_to_the_next_single_active_consumer_unacked_first() {
    let mut h = Harness::new(true, args(|a| a.single_active_consumer = true), Limits::default());
    let a = h.q.add_consumer(spec("a", 2)).unwrap();
    let b = h.q.add_consumer(spec("b", 2)).unwrap();
    for i in 0..4 {
        h.publish(i, true, None);
    }
    h.dispatch(10);
    assert!(h.delivered.iter().all(|d| d.consumer == a));
    assert_eq!(h.delivered.len(), 2);
    h.run(|q, fx| {
        q.remove_consumer(a, fx);
    });
    h.dispatch(10);
    let to_b: Vec<(u64, bool)> = h.delivered[2..].iter().map(|d| (id_of(&d.msg), d.redelivered)).collect();
    assert_eq!(to_b, vec![(0, true), (1, true)]);
    assert!(h.delivered[2..].iter().all(|d| d.consumer == b));
}

#[test]
fn should_prefer_higher_priority_consumers_while_they_have_room() {
    let mut h = Harness::new(true, QueueArgs::default(), Limits::default());
    let low = h.q.add_consumer(spec("low", 10)).unwrap();
    let mut high_spec = spec("high", 2);
    high_spec.priority = 5;
    let high = h.q.add_consumer(high_spec).unwrap();
    for i in 0..5 {
        h.publish(i, true, None);
    }
    h.dispatch(10);
    let to: Vec<ConsumerId> = h.delivered.iter().map(|d| d.consumer).collect();
    assert_eq!(to, vec![high, high, low, low, low]);
}

#[derive(Clone, Debug)]
enum Step {
    Publish {
        persistent: bool,
        priority: u8,
        ttl: Option<u64>,
    },
    Subscribe {
        prefetch: u32,
    },
    Unsubscribe(usize),
    Dispatch(usize),
    Ack {
        consumer: usize,
        pick: usize,
        multiple: bool,
    },
    Nack {
        consumer: usize,
        pick: usize,
        requeue: bool,
    },
    Get {
        max: usize,
        ack: bool,
    },
    Refill,
    Purge,
    /// Time passes; due timers run.
    Advance(u64),
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (any::<bool>(), 0u8..4, prop_oneof![3 => Just(None), 1 => (0u64..300).prop_map(Some)])
            .prop_map(|(persistent, priority, ttl)| Step::Publish { persistent, priority, ttl }),
        1 => (0u32..4).prop_map(|prefetch| Step::Subscribe { prefetch }),
        1 => (0usize..3).prop_map(Step::Unsubscribe),
        3 => (0usize..5).prop_map(Step::Dispatch),
        3 => (0usize..3, 0usize..8, any::<bool>()).prop_map(|(consumer, pick, multiple)| Step::Ack { consumer, pick, multiple }),
        2 => (0usize..3, 0usize..8, any::<bool>()).prop_map(|(consumer, pick, requeue)| Step::Nack { consumer, pick, requeue }),
        2 => (1usize..4, any::<bool>()).prop_map(|(max, ack)| Step::Get { max, ack }),
        3 => Just(Step::Refill),
        2 => (0u64..200).prop_map(Step::Advance),
        1 => prop_oneof![19 => Just(Step::Refill), 1 => Just(Step::Purge)],
        1 => prop_oneof![9 => Just(Step::Refill), 1 => Just(Step::Restart)],
    ]
}

/// A message as the model sees it: id, persistent, expiry time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelMsg {
    id: u64,
    persistent: bool,
    expires_at: Option<u64>,
}

impl ModelMsg {
    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t < now)
    }
}

/// A delivery the model holds: its delivery-order key and the message.
type Held = ((u8, u64), ModelMsg);

/// The reference model: which messages are ready (in delivery order), which
/// each consumer holds, and the clock.
#[derive(Default)]
struct Model {
    ready: BTreeMap<(u8, u64), ModelMsg>,
    unacked: HashMap<ConsumerId, BTreeMap<u64, Held>>,
    next_id: u64,
    now: u64,
}

impl Model {
    /// A message comes back: ready again, unless it expired meanwhile.
    fn requeue(&mut self, key: (u8, u64), m: ModelMsg) {
        if !m.expired(self.now) {
            self.ready.insert(key, m);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Across any sequence of publish / deliver / ack / nack / requeue / get /
    /// purge / expiry / restart, the queue delivers exactly the messages the
    /// model says are ready, in delivery order, never an expired one, and
    /// loses or duplicates none.
    #[test]
    fn queue_agrees_with_the_model(steps in prop::collection::vec(step(), 1..120), stale_reads in any::<bool>()) {
        let args = QueueArgs { max_priority: Some(3), ..Default::default() };
        let mut h = Harness::new(true, args, small());
        h.stale_reads = stale_reads;
        let mut m = Model { now: 1000, ..Default::default() };
        h.q.set_now(m.now);
        let mut consumers: Vec<ConsumerId> = Vec::new();
        let mut tags = 0u32;
        for s in steps {
            match s {
                Step::Publish { persistent, priority, ttl } => {
                    let id = m.next_id;
                    m.next_id += 1;
                    let mut d = (*data(id, persistent, Some(priority as u32))).clone();
                    d.properties.expiration_ms = ttl;
                    h.publish_data(Arc::new(d), None);
                    // Keys use the queue's allocator; the model orders by id,
                    // which is the same order since ids and seqs grow together.
                    m.ready.insert((255 - priority, id), ModelMsg { id, persistent, expires_at: ttl.map(|t| m.now + t) });
                }
                Step::Subscribe { prefetch } => {
                    if consumers.len() < 3 {
                        tags += 1;
                        let c = h.q.add_consumer(spec(&format!("c{tags}"), prefetch)).unwrap();
                        consumers.push(c);
                        m.unacked.insert(c, BTreeMap::new());
                    }
                }
                Step::Unsubscribe(i) => {
                    if i < consumers.len() {
                        let c = consumers.remove(i);
                        h.run(|q, fx| { q.remove_consumer(c, fx); });
                        for (_, (key, msg)) in m.unacked.remove(&c).unwrap_or_default() {
                            m.requeue(key, msg);
                        }
                    }
                }
                Step::Dispatch(room) => {
                    let before = h.delivered.len();
                    h.dispatch(room);
                    for d in h.delivered[before..].iter().cloned() {
                        let id = id_of(&d.msg);
                        let (&key, &msg) = m.ready.iter().next().expect("delivered from an empty model");
                        prop_assert_eq!(msg.id, id, "delivered out of order");
                        prop_assert!(!msg.expired(m.now), "delivered an expired message");
                        m.ready.remove(&key);
                        m.unacked.get_mut(&d.consumer).unwrap().insert(d.tag, (key, msg));
                    }
                }
                Step::Ack { consumer, pick, multiple } | Step::Nack { consumer, pick, requeue: multiple } if consumers.get(consumer).is_none() => {
                    let _ = (pick, multiple);
                }
                Step::Ack { consumer, pick, multiple } => {
                    let c = consumers[consumer];
                    let held = m.unacked.get_mut(&c).unwrap();
                    if let Some(&tag) = held.keys().nth(pick % held.len().max(1)) {
                        h.run(|q, fx| q.ack(c, tag, multiple, fx).unwrap());
                        if multiple { held.retain(|t, _| *t > tag); } else { held.remove(&tag); }
                    }
                }
                Step::Nack { consumer, pick, requeue } => {
                    let c = consumers[consumer];
                    let held = m.unacked.get_mut(&c).unwrap();
                    if let Some(&tag) = held.keys().nth(pick % held.len().max(1)) {
                        h.run(|q, fx| q.nack(c, tag, false, requeue, fx).unwrap());
                        let (key, msg) = held.remove(&tag).unwrap();
                        if requeue { m.requeue(key, msg); }
                    }
                }
                Step::Get { max, ack } => {
                    let mut fx = Effects::default();
                    let got = h.q.get(max, u64::MAX, ack, &mut fx);
                    h.apply(fx);
                    if let GetOutcome::Messages(ds) = got {
                        // Up to `max`, from what the window holds: a prefix of
                        // the model's ready messages, empty only when none is.
                        let expected: Vec<u64> = m.ready.values().take(max).map(|msg| msg.id).collect();
                        let ids: Vec<u64> = ds.iter().map(|d| id_of(&d.msg)).collect();
                        prop_assert_eq!(&ids[..], &expected[..ids.len().min(expected.len())]);
                        prop_assert_eq!(ids.is_empty(), m.ready.is_empty());
                        if ack {
                            let doomed: Vec<(u8, u64)> = m.ready.keys().take(ids.len()).copied().collect();
                            for k in doomed { m.ready.remove(&k); }
                        }
                    }
                }
                Step::Refill => { h.complete_refill(); }
                Step::Purge => {
                    let mut fx = Effects::default();
                    let n = h.q.purge(&mut fx);
                    h.apply(fx);
                    prop_assert_eq!(n, m.ready.len() as u64);
                    m.ready.clear();
                }
                Step::Advance(ms) => {
                    m.now += ms;
                    h.advance(m.now);
                    let now = m.now;
                    m.ready.retain(|_, msg| !msg.expired(now));
                }
                Step::Restart => {
                    h.restart();
                    consumers.clear();
                    // Unacked come back (expired ones do not); transient
                    // messages are gone.
                    let held: Vec<Held> = m.unacked.drain().flat_map(|(_, held)| held.into_values()).collect();
                    for (key, msg) in held { m.requeue(key, msg); }
                    m.ready.retain(|_, msg| msg.persistent);
                    // An unacked message that expired before the crash is
                    // found by the sweep within a second.
                    m.now += 1001;
                    h.advance(m.now);
                    let now = m.now;
                    m.ready.retain(|_, msg| !msg.expired(now));
                }
            }
            prop_assert_eq!(h.q.stats().ready, m.ready.len() as u64);
        }
        // Nothing lost, nothing duplicated.
        for c in consumers.drain(..) {
            h.run(|q, fx| { q.remove_consumer(c, fx); });
            for (_, (key, msg)) in m.unacked.remove(&c).unwrap_or_default() {
                m.requeue(key, msg);
            }
        }
        h.complete_refill();
        let drained = h.drain_ids();
        let expected: Vec<u64> = m.ready.values().map(|msg| msg.id).collect();
        prop_assert_eq!(drained, expected);
        prop_assert_eq!(h.stored_counters().messages, 0);
    }
}
