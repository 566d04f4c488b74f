//! Pending writes over a store, readable as if applied.
//!
//! A replicated state machine applies a batch of committed entries; each may
//! read what the entries before it wrote (a refill, a timer read). Writing
//! each entry on its own would cost a store write per entry, and writing in
//! the middle of an entry would let a crash leave it half applied. The
//! [`Overlay`] keeps the batch's writes in memory and answers reads as the
//! store would answer them after those writes; the caller writes
//! [`Overlay::into_ops`] (with its applied index) as one atomic batch.
//!
//! Reads equal those of the base store with the ops applied in order: a
//! property test checks exactly that against a store that applies them.

use std::collections::{BTreeMap, VecDeque};

use super::{Cf, KeyValue, Op, Reader, StoreError, counters};

/// A store with writes on top that are not applied yet.
pub struct Overlay<'a> {
    base: &'a dyn Reader,
    /// Per column family: key -> value, or `None` for deleted.
    points: Vec<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Per column family: ranges `[from, to)` deleted in the base (keys
    /// written after the deletion are in `points`).
    ranges: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    ops: Vec<Op>,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a dyn Reader) -> Self {
        Overlay { base, points: vec![BTreeMap::new(); Cf::ALL.len()], ranges: vec![Vec::new(); Cf::ALL.len()], ops: Vec::new() }
    }

    /// Adds writes, in order. A merge is turned into a put of the merged
    /// value, so the ops stay correct whatever the base holds when they are
    /// written again (replaying an entry writes the same values).
    pub fn write(&mut self, ops: impl IntoIterator<Item = Op>) -> Result<(), StoreError> {
        for op in ops {
            match op {
                Op::Put(cf, k, v) => {
                    self.points[cf.index()].insert(k.clone(), Some(v.clone()));
                    self.ops.push(Op::Put(cf, k, v));
                }
                Op::Delete(cf, k) => {
                    self.points[cf.index()].insert(k.clone(), None);
                    self.ops.push(Op::Delete(cf, k));
                }
                Op::Merge(cf, k, delta) => {
                    let current = self.get(cf, &k)?;
                    let merged = counters::merge_values(current.as_deref(), std::iter::once(delta.as_slice()));
                    self.points[cf.index()].insert(k.clone(), Some(merged.clone()));
                    self.ops.push(Op::Put(cf, k, merged));
                }
                Op::DeleteRange(cf, from, to) => {
                    if from < to {
                        let points = &mut self.points[cf.index()];
                        let doomed: Vec<Vec<u8>> = points.range(from.clone()..to.clone()).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            points.remove(&k);
                        }
                        self.ranges[cf.index()].push((from.clone(), to.clone()));
                    }
                    self.ops.push(Op::DeleteRange(cf, from, to));
                }
            }
        }
        Ok(())
    }

    /// The writes, in order, to apply as one batch.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether `key` of the base is hidden by a range deletion.
    fn range_deleted(&self, cf: Cf, key: &[u8]) -> bool {
        self.ranges[cf.index()].iter().any(|(from, to)| from.as_slice() <= key && key < to.as_slice())
    }
}

impl Reader for Overlay<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.points[cf.index()].get(key) {
            return Ok(v.clone());
        }
        if self.range_deleted(cf, key) {
            return Ok(None);
        }
        self.base.get(cf, key)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        let points = &self.points[cf.index()];
        let mut out: Vec<KeyValue> = Vec::new();
        let mut overlay = points.range(from.to_vec()..to.to_vec()).peekable();
        // The base is read in chunks; keys the overlay hides (written or
        // deleted in it) are dropped, so a chunk can yield fewer than it read.
        let mut cursor = from.to_vec();
        let mut base: VecDeque<KeyValue> = VecDeque::new();
        let mut base_done = false;
        while out.len() < limit {
            while base.is_empty() && !base_done {
                let want = limit.saturating_sub(out.len()).max(16);
                let chunk = self.base.scan(cf, &cursor, to, want)?;
                base_done = chunk.len() < want;
                if let Some((last, _)) = chunk.last() {
                    cursor = successor(last);
                }
                base.extend(chunk.into_iter().filter(|(k, _)| !points.contains_key(k) && !self.range_deleted(cf, k)));
            }
            // Base keys present in the overlay were dropped: the two never
            // hold the same key.
            let take_overlay = match (overlay.peek(), base.front()) {
                (Some((ok, _)), Some((bk, _))) => ok.as_slice() < bk.as_slice(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_overlay {
                if let Some((k, Some(v))) = overlay.next() {
                    out.push((k.clone(), v.clone()));
                }
            } else if let Some(kv) = base.pop_front() {
                out.push(kv);
            }
        }
        Ok(out)
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        /// Reads through the overlay equal reads of a store the same ops
        /// were applied to, and its ops turn the base into that store.
        #[test]
        fn overlay_reads_as_the_store_would(base_ops in prop::collection::vec(op(), 0..40),
                                            ops in prop::collection::vec(op(), 0..40),
                                            probes in prop::collection::vec((any::<u8>(), any::<u8>(), 1usize..20), 1..10)) {
            let base = MemoryEngine::new();
            base.write(&base_ops, false).unwrap();
            let expected = base.snapshot();
            let mut overlay = Overlay::new(&base);
            for op in &ops {
                // Apply one at a time to the reference, and check reads at
                // every step.
                expected.write(std::slice::from_ref(op), false).unwrap();
                overlay.write([op.clone()]).unwrap();
                for (a, b, limit) in &probes {
                    for cf in [Cf::Messages, Cf::Expiry, Cf::QueueState] {
                        let (from, to) = (key(*a.min(b)), key(*a.max(b)));
                        prop_assert_eq!(overlay.scan(cf, &from, &to, *limit).unwrap(), expected.scan(cf, &from, &to, *limit).unwrap());
                        prop_assert_eq!(overlay.get(cf, &from).unwrap(), expected.get(cf, &from).unwrap());
                    }
                }
            }
            let written = base.snapshot();
            written.write(&overlay.into_ops(), false).unwrap();
            for cf in [Cf::Messages, Cf::Expiry, Cf::QueueState] {
                prop_assert_eq!(written.scan(cf, &[], &[0xff], usize::MAX).unwrap(), expected.scan(cf, &[], &[0xff], usize::MAX).unwrap());
            }
        }
    }
}
