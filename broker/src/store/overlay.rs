//! Pending writes over a store, readable as if applied.
//!
//! A replicated state machine applies a batch of committed entries; each may
//! read what the entries before it wrote (a refill, a timer read). Writing
//! each entry on its own would cost a store write per entry, and writing in
//! the middle of an entry would let a crash leave it half applied. The
//! [`Overlay`] keeps the writes in memory ([`Unwritten`]) and answers reads
//! as the store would answer them after those writes; the caller writes
//! [`Unwritten::take_ops`] (with its applied index) as one atomic batch.
//!
//! The writes may outlive a batch: a machine whose applied state may trail
//! its log keeps them across batches and writes them later, so that a key
//! written and deleted in between (a message published and acknowledged)
//! never reaches the store with its value. Only the last write of each key
//! is kept; [`Unwritten::take_ops`] gives the range deletions first, then
//! one put or delete per key, which leaves the store as the writes in
//! their order would have.
//!
//! Reads equal those of the base store with the ops applied in order: a
//! property test checks exactly that against a store that applies them,
//! with the writes taken and written to the base at random points.

use std::collections::{BTreeMap, VecDeque};

use super::{Cf, KeyValue, Op, Reader, StoreError, counters};

/// What a point or range costs in memory beyond its key and value (map
/// node, vectors), for [`Unwritten::bytes`].
const ENTRY_OVERHEAD: usize = 64;

/// Writes not yet in the store: the last value (or deletion) of each key
/// and the ranges deleted, per column family.
pub struct Unwritten {
    /// Per column family: key -> value, or `None` for deleted.
    points: Vec<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Per column family: ranges `[from, to)` deleted in the base (keys
    /// written after the deletion are in `points`).
    ranges: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Memory held, roughly (keys, values, per-entry overhead).
    bytes: usize,
}

impl Default for Unwritten {
    fn default() -> Self {
        Unwritten { points: vec![BTreeMap::new(); Cf::ALL.len()], ranges: vec![Vec::new(); Cf::ALL.len()], bytes: 0 }
    }
}

fn point_bytes(key_len: usize, value: &Option<Vec<u8>>) -> usize {
    key_len + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
}

impl Unwritten {
    pub fn is_empty(&self) -> bool {
        self.points.iter().all(BTreeMap::is_empty) && self.ranges.iter().all(Vec::is_empty)
    }

    /// Memory the writes hold, roughly.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The writes as one batch (range deletions, then each key's last put
    /// or delete), leaving none behind.
    pub fn take_ops(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        for (cf, ranges) in Cf::ALL.iter().zip(self.ranges.iter_mut()) {
            ops.extend(ranges.drain(..).map(|(from, to)| Op::DeleteRange(*cf, from, to)));
        }
        for (cf, points) in Cf::ALL.iter().zip(self.points.iter_mut()) {
            ops.extend(std::mem::take(points).into_iter().map(|(k, v)| match v {
                Some(v) => Op::Put(*cf, k, v),
                None => Op::Delete(*cf, k),
            }));
        }
        self.bytes = 0;
        ops
    }

    /// The writes as [`Unwritten::take_ops`] gives them, copied (the
    /// writes stay, readable until the batch is in the store).
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        for (cf, ranges) in Cf::ALL.iter().zip(&self.ranges) {
            ops.extend(ranges.iter().map(|(from, to)| Op::DeleteRange(*cf, from.clone(), to.clone())));
        }
        for (cf, points) in Cf::ALL.iter().zip(&self.points) {
            ops.extend(points.iter().map(|(k, v)| match v {
                Some(v) => Op::Put(*cf, k.clone(), v.clone()),
                None => Op::Delete(*cf, k.clone()),
            }));
        }
        ops
    }

    /// Reads of `base` with these writes on top.
    pub fn over<'a>(&'a self, base: &'a dyn Reader) -> View<'a> {
        View { base, writes: self }
    }

    fn set(&mut self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
        let key_len = key.len();
        self.bytes += point_bytes(key_len, &value);
        if let Some(old) = self.points[cf.index()].insert(key, value) {
            self.bytes = self.bytes.saturating_sub(point_bytes(key_len, &old));
        }
    }

    fn write(&mut self, base: &dyn Reader, op: Op) -> Result<(), StoreError> {
        match op {
            Op::Put(cf, k, v) => self.set(cf, k, Some(v)),
            Op::Delete(cf, k) => self.set(cf, k, None),
            Op::Merge(cf, k, delta) => {
                // A merge becomes a put of the merged value, so the ops stay
                // correct whatever the base holds when they are written
                // again (replaying an entry writes the same values).
                let current = self.get(base, cf, &k)?;
                let merged = counters::merge_values(current.as_deref(), std::iter::once(delta.as_slice()));
                self.set(cf, k, Some(merged));
            }
            Op::DeleteRange(cf, from, to) => {
                if from < to {
                    let points = &mut self.points[cf.index()];
                    let doomed: Vec<Vec<u8>> = points.range(from.clone()..to.clone()).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        if let Some(v) = points.remove(&k) {
                            self.bytes = self.bytes.saturating_sub(point_bytes(k.len(), &v));
                        }
                    }
                    self.bytes += from.len() + to.len() + ENTRY_OVERHEAD;
                    self.ranges[cf.index()].push((from, to));
                }
            }
        }
        Ok(())
    }

    /// Whether `key` of the base is hidden by a range deletion.
    fn range_deleted(&self, cf: Cf, key: &[u8]) -> bool {
        self.ranges[cf.index()].iter().any(|(from, to)| from.as_slice() <= key && key < to.as_slice())
    }

    fn get(&self, base: &dyn Reader, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.points[cf.index()].get(key) {
            return Ok(v.clone());
        }
        if self.range_deleted(cf, key) {
            return Ok(None);
        }
        base.get(cf, key)
    }

    fn scan(&self, base: &dyn Reader, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        let points = &self.points[cf.index()];
        let mut out: Vec<KeyValue> = Vec::new();
        let mut written = points.range(from.to_vec()..to.to_vec()).peekable();
        // The base is read in chunks; keys the writes hide (written or
        // deleted in them) are dropped, so a chunk can yield fewer than it
        // read.
        let mut cursor = from.to_vec();
        let mut stored: VecDeque<KeyValue> = VecDeque::new();
        let mut base_done = false;
        while out.len() < limit {
            while stored.is_empty() && !base_done {
                let want = limit.saturating_sub(out.len()).max(16);
                let chunk = base.scan(cf, &cursor, to, want)?;
                base_done = chunk.len() < want;
                if let Some((last, _)) = chunk.last() {
                    cursor = successor(last);
                }
                stored.extend(chunk.into_iter().filter(|(k, _)| !points.contains_key(k) && !self.range_deleted(cf, k)));
            }
            // Base keys present in the writes were dropped: the two never
            // hold the same key.
            let take_written = match (written.peek(), stored.front()) {
                (Some((wk, _)), Some((sk, _))) => wk.as_slice() < sk.as_slice(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_written {
                if let Some((k, Some(v))) = written.next() {
                    out.push((k.clone(), v.clone()));
                }
            } else if let Some(kv) = stored.pop_front() {
                out.push(kv);
            }
        }
        Ok(out)
    }
}

/// A store with writes on top that are not in it yet; new writes go on
/// top.
pub struct Overlay<'a> {
    base: &'a dyn Reader,
    writes: &'a mut Unwritten,
}

impl<'a> Overlay<'a> {
    /// Reads `base` with `writes` on top; new writes are added to them.
    pub fn new(base: &'a dyn Reader, writes: &'a mut Unwritten) -> Self {
        Overlay { base, writes }
    }

    /// Adds writes, in order.
    pub fn write(&mut self, ops: impl IntoIterator<Item = Op>) -> Result<(), StoreError> {
        for op in ops {
            self.writes.write(self.base, op)?;
        }
        Ok(())
    }
}

impl Reader for Overlay<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.writes.get(self.base, cf, key)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.writes.scan(self.base, cf, from, to, limit)
    }
}

/// Read-only: a store with writes on top that are not in it yet.
pub struct View<'a> {
    base: &'a dyn Reader,
    writes: &'a Unwritten,
}

impl Reader for View<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.writes.get(self.base, cf, key)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.writes.scan(self.base, cf, from, to, limit)
    }
}

/// The smallest key greater than `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::store::Engine;
    use crate::store::memory::MemoryEngine;

    fn key(k: u8) -> Vec<u8> {
        vec![k / 16, k % 16]
    }

    fn op() -> impl Strategy<Value = Op> {
        let cf = prop_oneof![Just(Cf::Messages), Just(Cf::Expiry)];
        prop_oneof![
            4 => (cf.clone(), any::<u8>(), any::<u8>()).prop_map(|(cf, k, v)| Op::Put(cf, key(k), vec![v])),
            2 => (cf.clone(), any::<u8>()).prop_map(|(cf, k)| Op::Delete(cf, key(k))),
            1 => (cf, any::<u8>(), any::<u8>()).prop_map(|(cf, a, b)| Op::DeleteRange(cf, key(a.min(b)), key(a.max(b)))),
            1 => (any::<u8>(), -3i64..3).prop_map(|(k, d)| {
                let delta = crate::store::counters::QueueCounters { messages: d, bytes: d * 10, max_seq: 0, delayed: 0 };
                Op::Merge(Cf::QueueState, key(k), delta.encode())
            }),
        ]
    }

    fn reads_match(reader: &dyn Reader, expected: &MemoryEngine, probes: &[(u8, u8, usize)]) -> Result<(), TestCaseError> {
        for (a, b, limit) in probes {
            for cf in [Cf::Messages, Cf::Expiry, Cf::QueueState] {
                let (from, to) = (key(*a.min(b)), key(*a.max(b)));
                prop_assert_eq!(reader.scan(cf, &from, &to, *limit).unwrap(), expected.scan(cf, &from, &to, *limit).unwrap());
                prop_assert_eq!(reader.get(cf, &from).unwrap(), expected.get(cf, &from).unwrap());
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        /// Reads through the overlay (and the read-only view) equal reads
        /// of a store the same ops were applied to, at every step, whether
        /// or not the writes were taken and written to the base in
        /// between; the writes left at the end turn the base into that
        /// store.
        #[test]
        fn overlay_reads_as_the_store_would(base_ops in prop::collection::vec(op(), 0..40),
                                            ops in prop::collection::vec((op(), any::<bool>()), 0..40),
                                            probes in prop::collection::vec((any::<u8>(), any::<u8>(), 1usize..20), 1..10)) {
            let base = MemoryEngine::new();
            base.write(&base_ops, false).unwrap();
            let expected = base.snapshot();
            let mut writes = Unwritten::default();
            for (op, flush) in &ops {
                // Apply one at a time to the reference, and check reads at
                // every step.
                expected.write(std::slice::from_ref(op), false).unwrap();
                Overlay::new(&base, &mut writes).write([op.clone()]).unwrap();
                if *flush {
                    let copied = writes.ops();
                    let taken = writes.take_ops();
                    prop_assert_eq!(&copied, &taken);
                    base.write(&taken, false).unwrap();
                    prop_assert!(writes.is_empty());
                    prop_assert_eq!(writes.bytes(), 0);
                }
                reads_match(&Overlay::new(&base, &mut writes), &expected, &probes)?;
                reads_match(&writes.over(&base), &expected, &probes)?;
            }
            base.write(&writes.take_ops(), false).unwrap();
            for cf in [Cf::Messages, Cf::Expiry, Cf::QueueState] {
                prop_assert_eq!(base.scan(cf, &[], &[0xff], usize::MAX).unwrap(), expected.scan(cf, &[], &[0xff], usize::MAX).unwrap());
            }
        }

        /// The memory count follows what is held: each key once, at its
        /// last value, and each range.
        #[test]
        fn unwritten_bytes_count_each_key_once(ops in prop::collection::vec(op(), 0..60)) {
            let base = MemoryEngine::new();
            let mut writes = Unwritten::default();
            Overlay::new(&base, &mut writes).write(ops).unwrap();
            let points: usize = writes.points.iter().flat_map(|m| m.iter()).map(|(k, v)| point_bytes(k.len(), v)).sum();
            let ranges: usize = writes.ranges.iter().flatten().map(|(a, b)| a.len() + b.len() + ENTRY_OVERHEAD).sum();
            prop_assert_eq!(writes.bytes(), points + ranges);
        }
    }
}
