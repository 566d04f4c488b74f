#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;
use warren_client::proto::Properties;

use super::*;
use crate::queue::read::{read_refill, read_timers};
use crate::store::memory::MemoryEngine;
use crate::store::{Engine, keys};

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
    ConsumerSpec { tag: tag.into(), prefetch, auto_ack: false, exclusive: false, priority: 0, peer: "test".into() }
}

/// A queue plus an in-memory store that the effects are applied to, as the
/// owner task would.
struct Harness {
    q: QueueState,
    engine: MemoryEngine,
    refill: Option<RefillRequest>,
    timer: Option<TimerRequest>,
    delivered: Vec<OutDelivery>,
    dead: Vec<DeadLetter>,
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
        }
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
            self.refill = Some(r);
        }
        if let Some(t) = fx.timer_read {
            assert!(self.timer.is_none(), "two timer reads in flight");
            self.timer = Some(t);
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
        let Some(t) = self.timer.take() else { return false };
        let result = read_timers(&self.engine, self.q.id, &t).unwrap();
        self.run(|q, fx| {
            q.timer_done(t.epoch, result, fx);
            q.poll_timers(fx);
        });
        true
    }

    fn complete_refill(&mut self) -> bool {
        let Some(r) = self.refill.take() else { return false };
        let (entries, exhausted) = read_refill(&self.engine, self.q.id, &r).unwrap();
        self.run(|q, fx| q.refilled(r.epoch, entries, exhausted, fx));
        true
    }

    fn publish(&mut self, id: u64, persistent: bool, priority: Option<u32>) {
        self.run(|q, fx| {
            q.enqueue(data(id, persistent, priority), None, fx);
        });
    }

    fn dispatch(&mut self, room: usize) {
        self.run(|q, fx| q.dispatch(fx, &mut |_| room));
    }

    /// Gets with ack until empty, completing refills as needed.
    fn drain_ids(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let mut fx = Effects::default();
            let got = self.q.get(16, true, &mut fx);
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
    Limits { window_messages: 4, window_bytes: 1 << 20 }
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
    let _ = h.q.get(4, true, &mut fx);
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
    let GetOutcome::Messages(first) = h.q.get(1, false, &mut fx) else { panic!() };
    h.apply(fx);
    assert!(!first[0].redelivered);
    let mut fx = Effects::default();
    let GetOutcome::Messages(second) = h.q.get(1, true, &mut fx) else { panic!() };
    h.apply(fx);
    assert!(second[0].redelivered);
    assert_eq!(second[0].msg.delivery_count, 2);
    assert_eq!(h.q.stats().ready, 0);
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

#[derive(Clone, Debug)]
enum Step {
    Publish { persistent: bool, priority: u8 },
    Subscribe { prefetch: u32 },
    Unsubscribe(usize),
    Dispatch(usize),
    Ack { consumer: usize, pick: usize, multiple: bool },
    Nack { consumer: usize, pick: usize, requeue: bool },
    Get { max: usize, ack: bool },
    Refill,
    Purge,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (any::<bool>(), 0u8..4).prop_map(|(persistent, priority)| Step::Publish { persistent, priority }),
        1 => (0u32..4).prop_map(|prefetch| Step::Subscribe { prefetch }),
        1 => (0usize..3).prop_map(Step::Unsubscribe),
        3 => (0usize..5).prop_map(Step::Dispatch),
        3 => (0usize..3, 0usize..8, any::<bool>()).prop_map(|(consumer, pick, multiple)| Step::Ack { consumer, pick, multiple }),
        2 => (0usize..3, 0usize..8, any::<bool>()).prop_map(|(consumer, pick, requeue)| Step::Nack { consumer, pick, requeue }),
        2 => (1usize..4, any::<bool>()).prop_map(|(max, ack)| Step::Get { max, ack }),
        3 => Just(Step::Refill),
        1 => prop_oneof![19 => Just(Step::Refill), 1 => Just(Step::Purge)],
        1 => prop_oneof![9 => Just(Step::Refill), 1 => Just(Step::Restart)],
    ]
}

/// The reference model: which message ids are ready (in delivery order) and
/// which each consumer holds.
/// A delivery the model holds: (priority key, sequence), id, persistent.
type Held = ((u8, u64), u64, bool);

#[derive(Default)]
struct Model {
    ready: BTreeMap<(u8, u64), (u64, bool)>,
    unacked: HashMap<ConsumerId, BTreeMap<u64, Held>>,
    next_id: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Across any sequence of publish / deliver / ack / nack / requeue / get /
    /// purge / restart, the queue delivers exactly the messages the model
    /// says are ready, in delivery order, and loses or duplicates none.
    #[test]
    fn queue_agrees_with_the_model(steps in prop::collection::vec(step(), 1..120)) {
        let args = QueueArgs { max_priority: Some(3), ..Default::default() };
        let mut h = Harness::new(true, args, small());
        let mut m = Model::default();
        let mut consumers: Vec<ConsumerId> = Vec::new();
        let mut tags = 0u32;
        for s in steps {
            match s {
                Step::Publish { persistent, priority } => {
                    let id = m.next_id;
                    m.next_id += 1;
                    h.publish(id, persistent, Some(priority as u32));
                    // Keys use the queue's allocator; the model orders by id,
                    // which is the same order since ids and seqs grow together.
                    m.ready.insert((255 - priority, id), (id, persistent));
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
                        for (_, (key, id, p)) in m.unacked.remove(&c).unwrap_or_default() {
                            m.ready.insert(key, (id, p));
                        }
                    }
                }
                Step::Dispatch(room) => {
                    let before = h.delivered.len();
                    h.dispatch(room);
                    for d in h.delivered[before..].iter().cloned() {
                        let id = id_of(&d.msg);
                        let (&key, &(mid, p)) = m.ready.iter().next().expect("delivered from an empty model");
                        prop_assert_eq!(mid, id, "delivered out of order");
                        m.ready.remove(&key);
                        m.unacked.get_mut(&d.consumer).unwrap().insert(d.tag, (key, id, p));
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
                        let (key, id, p) = held.remove(&tag).unwrap();
                        if requeue { m.ready.insert(key, (id, p)); }
                    }
                }
                Step::Get { max, ack } => {
                    let mut fx = Effects::default();
                    let got = h.q.get(max, ack, &mut fx);
                    h.apply(fx);
                    if let GetOutcome::Messages(ds) = got {
                        // Up to `max`, from what the window holds: a prefix of
                        // the model's ready messages, empty only when none is.
                        let expected: Vec<u64> = m.ready.values().take(max).map(|(id, _)| *id).collect();
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
                Step::Restart => {
                    h.restart();
                    consumers.clear();
                    // Unacked come back; transient messages are gone.
                    for (_, held) in m.unacked.drain() {
                        for (_, (key, id, p)) in held { m.ready.insert(key, (id, p)); }
                    }
                    m.ready.retain(|_, (_, p)| *p);
                }
            }
            prop_assert_eq!(h.q.stats().ready, m.ready.len() as u64);
        }
        // Nothing lost, nothing duplicated.
        for c in consumers.drain(..) {
            h.run(|q, fx| { q.remove_consumer(c, fx); });
            for (_, (key, id, p)) in m.unacked.remove(&c).unwrap_or_default() {
                m.ready.insert(key, (id, p));
            }
        }
        h.complete_refill();
        let drained = h.drain_ids();
        let expected: Vec<u64> = m.ready.values().map(|(id, _)| *id).collect();
        prop_assert_eq!(drained, expected);
        prop_assert_eq!(h.stored_counters().messages, 0);
    }
}
