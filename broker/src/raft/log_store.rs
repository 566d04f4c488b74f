//! The Raft log and vote of one group, on the node's store.
//!
//! Invariants:
//! * **One group commit for all groups.** `append` submits the entries as
//!   one synced write to the store's writer and returns; the writer merges
//!   it with whatever else waits (other groups' appends, queue writes) into
//!   one batch and one WAL sync, then completes openraft's `IOFlushed`.
//! * **Readable when `append` returns.** Until the writer has applied them,
//!   appended entries are served from a per-group map of pending entries;
//!   a read takes the pending entries first and the store second, so an
//!   entry moving from one to the other is never missed.
//! * **Applied from memory.** Once written, an entry stays in the map until
//!   the group's state machine has applied it (it applies what it reads
//!   back from the log, a moment after the entry is written), within a
//!   node-wide byte budget ([`CACHE_BYTES`]): a read the map covers does not
//!   touch the store. Only reads of a bounded range are answered from the
//!   map alone; the last index is never taken from a written entry there.
//! * **Ordered.** Every write of a group (vote, appends, truncation, purge)
//!   goes through the same first-in-first-out writer, so none overtakes an
//!   earlier one. `save_vote` returns once its write is synced; truncation
//!   and purge return once applied, and never leave a hole: truncation
//!   deletes a suffix, purge a prefix, each as one atomic batch.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::entry::RaftEntry as _;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader};
use parking_lot::Mutex;

use super::keys::{self, StateKind};
use super::machine::GroupId;
use super::types::{Entry, LogId, TypeConfig, Vote, decode, encode, io_error};
use crate::store::{Cf, Op, Store, WriteRequest};

/// Most bytes of written entries a node keeps in memory for its state
/// machines to apply (encoded size), over all groups. Beyond it an entry
/// is read back from the store when applied, as before.
pub const CACHE_BYTES: u64 = 32 << 20;

/// One entry in a group's map.
#[derive(Debug)]
struct Held {
    /// The append that wrote it.
    seq: u64,
    entry: Entry,
    /// Encoded size, counted against [`CACHE_BYTES`] once written.
    bytes: u64,
    /// In the store already: kept only until applied.
    written: bool,
}

/// A group's entries appended but not yet written by the store writer,
/// and written entries kept until applied, by index.
#[derive(Debug)]
struct Pending {
    entries: BTreeMap<u64, Held>,
    /// The next index the state machine will apply.
    applied_next: u64,
    /// The node's counters: written entries count against its budget.
    stats: Arc<LogStats>,
}

impl Pending {
    fn new(stats: Arc<LogStats>) -> Pending {
        Pending { entries: BTreeMap::new(), applied_next: 0, stats }
    }

    /// Drops the entries `keep` refuses, returning written ones' bytes to
    /// the budget.
    fn retain(&mut self, mut keep: impl FnMut(u64, &Held) -> bool) {
        let stats = &self.stats;
        self.entries.retain(|i, h| {
            let kept = keep(*i, h);
            if !kept && h.written {
                stats.cached_bytes.fetch_sub(h.bytes, Ordering::Relaxed);
            }
            kept
        });
    }
}

impl Drop for Pending {
    /// A group that stops (deleted, moved, the node shutting down) gives
    /// back what it held.
    fn drop(&mut self) {
        self.retain(|_, _| false);
    }
}

/// What a group's state machine tells its log: entries it has applied
/// need not be kept in memory any more.
#[derive(Clone)]
pub struct AppliedHook {
    pending: Arc<Mutex<Pending>>,
}

impl AppliedHook {
    pub fn applied_through(&self, index: u64) {
        let mut p = self.pending.lock();
        p.applied_next = p.applied_next.max(index.saturating_add(1));
        p.retain(|i, h| !(h.written && i <= index));
    }
}

/// Counters shared by every group of a node (for tests and metrics).
#[derive(Debug, Default)]
pub struct LogStats {
    /// `append` calls (each one synced write request).
    pub appends: AtomicU64,
    /// Entries appended.
    pub entries: AtomicU64,
    /// Bytes of written entries kept for the state machines (at most
    /// [`CACHE_BYTES`]).
    pub cached_bytes: AtomicU64,
    /// Bytes of applied writes that queues' state machines hold before
    /// writing them to the store (see
    /// [`super::state_machine::UNWRITTEN_NODE_BYTES`]).
    pub unwritten_bytes: AtomicU64,
}

/// Counts the messages in one of a group's commands (for lag in
/// messages); a group whose commands carry none counts 0.
pub type Weigher = fn(&[u8]) -> u64;

/// Bytes and messages of log entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Weight {
    pub bytes: u64,
    pub messages: u64,
}

/// Running totals of the bytes and messages of a group's log entries, by
/// index, from the oldest entry a member may still lack to the last one
/// appended: what a follower lacks is the difference between the totals at
/// the last index and at the follower's. Pruned from the front as members
/// catch up and as the log is purged, so it holds at most the unpurged log
/// (one pair of counters per entry), and next to nothing while every
/// member keeps up.
#[derive(Debug, Default)]
pub struct Tally {
    /// Index of `totals[0]` (of the next entry when `totals` is empty).
    first: u64,
    /// Totals through `first - 1`.
    base: Weight,
    totals: VecDeque<Weight>,
}

impl Tally {
    fn next(&self) -> u64 {
        self.first.saturating_add(self.totals.len() as u64)
    }

    /// Counts entry `index`. An index below the next one replaces the
    /// entries from it on (a truncated log); one above it starts over (a
    /// snapshot was installed).
    pub fn push(&mut self, index: u64, weight: Weight) {
        if index < self.first || index > self.next() {
            self.totals.clear();
            self.first = index;
        } else if index < self.next() {
            self.totals.truncate((index - self.first) as usize);
        }
        let last = self.totals.back().copied().unwrap_or(self.base);
        self.totals
            .push_back(Weight { bytes: last.bytes.saturating_add(weight.bytes), messages: last.messages.saturating_add(weight.messages) });
    }

    /// Forgets entries up to and including `index` (no member lacks them,
    /// or they are purged).
    pub fn prune_through(&mut self, index: u64) {
        while self.first <= index {
            let Some(w) = self.totals.pop_front() else { break };
            self.base = w;
            self.first += 1;
        }
    }

    /// Totals through `index`, if the tally still knows them.
    fn at(&self, index: u64) -> Option<Weight> {
        if index.checked_add(1) == Some(self.first) {
            return Some(self.base);
        }
        let i = usize::try_from(index.checked_sub(self.first)?).ok()?;
        self.totals.get(i).copied()
    }

    /// What a member whose log ends at `matched` lacks of the entries
    /// counted. `exact` is false when `matched` is older than the tally (the
    /// member is far behind, or needs a snapshot): the figure is then what
    /// the tally holds, a lower bound.
    pub fn lacking(&self, matched: Option<u64>) -> (Weight, bool) {
        let last = self.totals.back().copied().unwrap_or(self.base);
        let (from, exact) = match matched.and_then(|m| self.at(m)) {
            Some(w) => (w, true),
            // Past the last entry counted: lacks nothing.
            None if matched.is_some_and(|m| m >= self.next()) => (last, true),
            None => (self.base, false),
        };
        let lacking = Weight { bytes: last.bytes.saturating_sub(from.bytes), messages: last.messages.saturating_sub(from.messages) };
        (lacking, exact)
    }

    /// Entries counted.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.totals.len()
    }
}

/// The log and vote of one group. Cloning shares it (openraft's log
/// readers are clones).
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    store: Store,
    pending: Arc<Mutex<Pending>>,
    seq: Arc<AtomicU64>,
    stats: Arc<LogStats>,
    tally: Arc<Mutex<Tally>>,
    weigh: Weigher,
}

impl LogStore {
    pub fn new(group: GroupId, store: Store, stats: Arc<LogStats>, tally: Arc<Mutex<Tally>>, weigh: Weigher) -> LogStore {
        let pending = Arc::new(Mutex::new(Pending::new(stats.clone())));
        LogStore { group, store, pending, seq: Arc::default(), stats, tally, weigh }
    }

    /// For the group's state machine.
    pub fn applied_hook(&self) -> AppliedHook {
        AppliedHook { pending: self.pending.clone() }
    }

    fn read_state<T: for<'de> serde::Deserialize<'de>>(&self, kind: StateKind) -> io::Result<Option<T>> {
        match self.store.engine().get(Cf::RaftState, &keys::state_key(self.group, kind)).map_err(io_error)? {
            Some(v) => decode(&v).map(Some).map_err(io_error),
            None => Ok(None),
        }
    }

    fn last_purged(&self) -> io::Result<Option<LogId>> {
        self.read_state(StateKind::Purged)
    }

    /// Entries with indexes in `[from, to)`, pending ones included.
    fn read_range(&self, from: u64, to: Option<u64>) -> io::Result<Vec<Entry>> {
        // Pending first: an entry that leaves the map after this is in the
        // store by the time the store is read.
        let pending: Vec<(u64, Entry)> = {
            let p = self.pending.lock();
            let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
            p.entries.range((Bound::Included(from), upper)).map(|(i, h)| (*i, h.entry.clone())).collect()
        };
        // A bounded range the map holds whole (the map's indexes are
        // distinct and in range): nothing to read.
        if let Some(to) = to
            && pending.first().is_some_and(|(i, _)| *i == from)
            && pending.len() as u64 == to - from
        {
            return Ok(pending.into_iter().map(|(_, e)| e).collect());
        }
        let (a, b) = keys::log_range(self.group, from, to);
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        let mut cursor = a;
        loop {
            let chunk = self.store.engine().scan(Cf::RaftLog, &cursor, &b, 1024).map_err(io_error)?;
            let n = chunk.len();
            for (k, v) in chunk {
                let (_, index) = keys::decode_log_key(&k).ok_or_else(|| io_error(format!("malformed raft log key {k:02x?}")))?;
                out.insert(index, decode(&v).map_err(io_error)?);
                cursor = keys::log_key(self.group, index.saturating_add(1));
            }
            if n < 1024 {
                break;
            }
        }
        out.extend(pending);
        // Only a contiguous run is an answer (a gap would mean entries
        // purged or truncated meanwhile): it starts at the first entry
        // present, which is later than `from` when the log was purged.
        let mut expected: Option<u64> = None;
        let mut entries = Vec::with_capacity(out.len());
        for (i, e) in out {
            if expected.is_some_and(|x| x != i) {
                break;
            }
            entries.push(e);
            expected = Some(i + 1);
        }
        Ok(entries)
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId>> {
        // An entry not yet written is the last one (the writer is first in,
        // first out); once the last is written, the store has it.
        if let Some((_, h)) = self.pending.lock().entries.last_key_value()
            && !h.written
        {
            return Ok(Some(h.entry.log_id()));
        }
        let (a, b) = keys::log_range(self.group, 0, None);
        match self.store.engine().last_in(Cf::RaftLog, &a, &b).map_err(io_error)? {
            Some((_, v)) => Ok(Some(decode::<Entry>(&v).map_err(io_error)?.log_id())),
            None => Ok(None),
        }
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let from = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(i) => Some(i.saturating_add(1)),
        Bound::Excluded(i) => Some(*i),
        Bound::Unbounded => None,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> io::Result<Vec<Entry>> {
        let (from, to) = bounds(&range);
        if to.is_some_and(|t| t <= from) {
            return Ok(Vec::new());
        }
        self.read_range(from, to)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.read_state(StateKind::Vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let op = Op::Put(Cf::RaftState, keys::state_key(self.group, StateKind::Vote), encode(vote));
        self.store.write(vec![op], true).await.map_err(io_error)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut ops = Vec::new();
        let mut indexes = Vec::new();
        {
            let mut pending = self.pending.lock();
            let mut tally = self.tally.lock();
            for e in entries {
                let index = e.index();
                let value = encode(&e);
                let messages = match &e.payload {
                    EntryPayload::Normal(p) => (self.weigh)(&p.data),
                    _ => 0,
                };
                let bytes = value.len() as u64;
                tally.push(index, Weight { bytes, messages });
                ops.push(Op::Put(Cf::RaftLog, keys::log_key(self.group, index), value));
                if let Some(old) = pending.entries.insert(index, Held { seq, entry: e, bytes, written: false })
                    && old.written
                {
                    self.stats.cached_bytes.fetch_sub(old.bytes, Ordering::Relaxed);
                }
                indexes.push(index);
            }
        }
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.stats.entries.fetch_add(indexes.len() as u64, Ordering::Relaxed);
        let pending = self.pending.clone();
        let stats = self.stats.clone();
        let req = WriteRequest::new(ops, true).on_done(move |result| {
            {
                let mut p = pending.lock();
                let applied_next = p.applied_next;
                for i in indexes {
                    // A later append may have replaced the entry (after a
                    // truncation): leave that one.
                    let Some(h) = p.entries.get_mut(&i).filter(|h| h.seq == seq) else { continue };
                    // Kept for the state machine if it has not applied it
                    // yet and the budget allows; a failed write is not kept.
                    let keep = result.is_ok()
                        && i >= applied_next
                        && stats
                            .cached_bytes
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_add(h.bytes).filter(|n| *n <= CACHE_BYTES))
                            .is_ok();
                    if keep {
                        h.written = true;
                    } else {
                        p.entries.remove(&i);
                    }
                }
            }
            callback.io_completed(result.map_err(io_error));
        });
        self.store.submit_with_room(req).await;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.as_ref().map_or(0, |l| l.index() + 1);
        self.pending.lock().retain(|i, _| i < from);
        let (a, b) = keys::log_range(self.group, from, None);
        self.store.write(vec![Op::DeleteRange(Cf::RaftLog, a, b)], false).await.map_err(io_error)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let upto = log_id.index();
        self.pending.lock().retain(|i, _| i > upto);
        self.tally.lock().prune_through(upto);
        let (a, b) = keys::log_range(self.group, 0, Some(upto.saturating_add(1)));
        // The purge marker and the deletion are one batch: no state in
        // which entries are gone but the marker says otherwise.
        let ops = vec![
            Op::Put(Cf::RaftState, keys::state_key(self.group, StateKind::Purged), encode(&log_id)),
            Op::DeleteRange(Cf::RaftLog, a, b),
        ];
        self.store.write(ops, false).await.map_err(io_error)
    }
}

#[cfg(test)]
mod tally_tests {
    use super::{Tally, Weight};

    fn w(bytes: u64, messages: u64) -> Weight {
        Weight { bytes, messages }
    }

    #[test]
    fn should_count_what_a_member_lacks_from_its_matched_index() {
        let mut t = Tally::default();
        for i in 1..=10 {
            t.push(i, w(100, 2));
        }
        assert_eq!(t.lacking(Some(10)), (w(0, 0), true));
        assert_eq!(t.lacking(Some(7)), (w(300, 6), true));
        assert_eq!(t.lacking(Some(0)), (w(1000, 20), true));
        // A member whose matched index is not known yet: everything
        // counted, as a lower bound.
        assert_eq!(t.lacking(None), (w(1000, 20), false));
    }

    #[test]
    fn should_forget_pruned_entries_and_call_older_indexes_a_lower_bound() {
        let mut t = Tally::default();
        for i in 1..=10 {
            t.push(i, w(10, 1));
        }
        t.prune_through(6);
        assert_eq!(t.len(), 4);
        assert_eq!(t.lacking(Some(6)), (w(40, 4), true), "the pruned index itself is still known");
        assert_eq!(t.lacking(Some(2)), (w(40, 4), false), "older: only what the tally holds, flagged");
        assert_eq!(t.lacking(None), (w(40, 4), false));
        t.prune_through(100);
        assert_eq!(t.len(), 0);
        assert_eq!(t.lacking(Some(10)), (w(0, 0), true));
        t.push(11, w(5, 1));
        assert_eq!(t.lacking(Some(10)), (w(5, 1), true), "counting goes on after pruning everything");
    }

    #[test]
    fn should_replace_a_truncated_suffix_and_start_over_after_a_gap() {
        let mut t = Tally::default();
        for i in 1..=5 {
            t.push(i, w(10, 1));
        }
        // Entries 4 and 5 replaced by a new leader's.
        t.push(4, w(1, 0));
        assert_eq!(t.len(), 4);
        assert_eq!(t.lacking(Some(3)), (w(1, 0), true));
        // A snapshot installed up to 99: the next entry is 100.
        t.push(100, w(7, 7));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lacking(Some(99)), (w(7, 7), true));
        assert_eq!(t.lacking(Some(50)), (w(7, 7), false));
    }
}
