//! openraft's state machine around a [`GroupMachine`].
//!
//! Invariants:
//! * **Applied state goes to the store as one batch.** Committed entries
//!   are applied in batches through an [`Overlay`] over the writes not yet
//!   in the store; those writes, the last applied log id and the
//!   membership go to the store as one atomic batch (unsynced: the Raft
//!   log is what is durable). A crash never leaves an entry half applied,
//!   and the applied log id in the store always matches the machine's
//!   ranges there.
//! * **Applied state may trail the log.** A machine that allows it
//!   ([`GroupMachine::apply_unlogged`]: queues) has its writes written
//!   without the store's write-ahead log, and only now and then: they stay
//!   in memory across batches (each key at its last value, so a message
//!   published and acknowledged in between never reaches the store) until
//!   the group holds [`UNWRITTEN_GROUP_BYTES`] or the node
//!   [`UNWRITTEN_NODE_BYTES`], or the group is idle for a while, stops or builds a
//!   snapshot. A crash rolls its state and applied log id back together
//!   (the store flushes every column family at once) to the last write
//!   that reached a flush, and openraft applies the entries after it
//!   again. The log below a snapshot is purged only after the snapshot was
//!   built, and building one writes and flushes first, so the entries to
//!   apply again are always still in the log. Other machines (the
//!   metadata) write every batch, with the write-ahead log, before the
//!   next one is applied.
//! * **Reads see the state as applied.** The overlay answers the machine's
//!   reads from the unwritten writes first; a reader outside the machine
//!   uses [`StateMachine::read`] (through `RaftHost::read_applied`), which
//!   runs between two batches.
//! * **Snapshots are streamed.** A snapshot is written to a file from one
//!   consistent store view of the machine's ranges and the group's
//!   applied state; installing one clears the ranges and writes the file's
//!   records in bounded batches, then restores the machine from the store.
//!   A restart in the middle of an install finds an `Installing` marker and
//!   starts the group over (its ranges and log cleared) so that the leader
//!   sends the snapshot again.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{Stream, StreamExt as _};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, Snapshot};

use parking_lot::Mutex;

use super::keys::{self, StateKind};
use super::log_store::{AppliedHook, LogStats};
use super::machine::{Applied, GroupId, GroupMachine, LocalReply};
use super::snapshot::{self, SnapshotFile, SnapshotReader};
use super::types::{LogId, Reply, SnapshotMeta, StoredMembership, TypeConfig, decode, encode, io_error};
use crate::store::overlay::{Overlay, Unwritten};
use crate::store::{Cf, Engine, Op, Reader, Store, WriteRequest};

/// Most entries applied through one overlay.
const APPLY_BATCH: usize = 512;
/// Most bytes of entry data applied through one overlay.
const APPLY_BATCH_BYTES: usize = 8 << 20;
/// Bytes of snapshot records written to the store per batch when
/// installing a snapshot.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Most memory a group whose applied state may trail its log
/// ([`GroupMachine::apply_unlogged`]) holds in applied writes not yet in
/// the store; a batch that ends above it writes them.
pub const UNWRITTEN_GROUP_BYTES: usize = 8 << 20;
/// The same over every group of a node: a group whose batch ends while
/// the node is above it writes its own.
pub const UNWRITTEN_NODE_BYTES: u64 = 64 << 20;

/// Closes a state machine's writes of applied state for good: its group is
/// stopping (and may be deleted next, which must not be followed by a late
/// write). Checked and closed under one lock, so a write submitted before
/// `close` returns is in the writer's queue by then.
#[derive(Clone, Default)]
pub struct WriteGate(Arc<Mutex<bool>>);

impl WriteGate {
    pub fn close(&self) {
        *self.0.lock() = true;
    }
}

/// The snapshot files of one group: the newest is the current one.
pub struct Snapshots {
    dir: PathBuf,
    current: Mutex<Option<(SnapshotMeta, PathBuf)>>,
    counter: AtomicU64,
}

impl Snapshots {
    /// Opens (creating) the group's snapshot directory and finds its
    /// newest complete snapshot; leftovers are removed.
    pub fn open(dir: PathBuf) -> io::Result<Snapshots> {
        std::fs::create_dir_all(&dir)?;
        let mut best: Option<(SnapshotMeta, PathBuf)> = None;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let is_snapshot = path.extension().is_some_and(|e| e == "snap");
            if !is_snapshot {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match snapshot::read_meta(&path) {
                Ok(meta) if best.as_ref().is_none_or(|(b, _)| meta.last_log_id > b.last_log_id) => {
                    if let Some((_, old)) = best.replace((meta, path)) {
                        let _ = std::fs::remove_file(old);
                    }
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(Snapshots { dir, current: Mutex::new(best), counter: AtomicU64::new(0) })
    }

    /// A new file name in the directory (`.snap` once complete).
    fn new_path(&self, meta: &SnapshotMeta, what: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let index = meta.last_log_id.as_ref().map_or(0, |l| l.index);
        self.dir.join(format!("{what}-{index:020}-{}-{n}.snap", std::process::id()))
    }

    /// A file to receive a snapshot into.
    pub fn incoming_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("incoming-{}-{n}.part", std::process::id()))
    }

    /// Makes `path` the current snapshot if it is newer than the current
    /// one (a build that finishes after an install of a newer snapshot
    /// must not win), removing the loser.
    fn offer(&self, meta: SnapshotMeta, path: PathBuf) -> bool {
        let mut cur = self.current.lock();
        if cur.as_ref().is_some_and(|(m, _)| m.last_log_id >= meta.last_log_id) {
            drop(cur);
            let _ = std::fs::remove_file(&path);
            return false;
        }
        if let Some((_, old)) = cur.replace((meta, path)) {
            let _ = std::fs::remove_file(old);
        }
        true
    }

    pub fn current(&self) -> Option<(SnapshotMeta, PathBuf)> {
        self.current.lock().clone()
    }

    /// Removes every file (the group is deleted).
    pub fn remove_all(&self) {
        self.current.lock().take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// openraft's state machine for one group.
pub struct StateMachine {
    group: GroupId,
    store: Store,
    machine: Arc<Mutex<Box<dyn GroupMachine>>>,
    snapshots: Arc<Snapshots>,
    /// Batches are written without the write-ahead log.
    unlogged: bool,
    /// Tells the group's log what is applied (it keeps entries in memory
    /// until then).
    applied: Option<AppliedHook>,
    /// Applied writes not in the store yet (kept across batches only when
    /// `unlogged`), and the applied state they bring the store to.
    writes: Unwritten,
    unwritten: AppliedState,
    /// Writes on their way to the store (`unlogged` only), readable until
    /// they are there.
    writing: Option<Writing>,
    /// The writer `writing` goes through: not the one the Raft logs of the
    /// node append through (a large batch of applied writes must not hold
    /// up their appends), but one like it.
    state_writer: Store,
    /// The node's counters: `unwritten_bytes` counts `writes` and
    /// `writing`.
    stats: Option<Arc<LogStats>>,
    /// What this group adds to `unwritten_bytes` now.
    counted: u64,
    /// Applying or writing failed: the group must stop (a restart applies
    /// again from what the store holds); nothing applied is written any
    /// more.
    failed: bool,
    /// Closed when the group stops.
    gate: WriteGate,
}

/// The applied log id and membership the unwritten writes bring the store
/// to.
#[derive(Default)]
struct AppliedState {
    last: Option<LogId>,
    membership: Option<StoredMembership>,
}

impl AppliedState {
    /// The puts that record it (none for what did not change).
    fn ops(&self, group: GroupId) -> Vec<Op> {
        let mut ops = Vec::new();
        if let Some(last) = &self.last {
            ops.push(Op::Put(Cf::RaftState, keys::state_key(group, StateKind::Applied), encode(last)));
        }
        if let Some(m) = &self.membership {
            ops.push(Op::Put(Cf::RaftState, keys::state_key(group, StateKind::Membership), encode(m)));
        }
        ops
    }
}

/// A batch of applied writes submitted to the store and not yet written.
struct Writing {
    writes: Unwritten,
    applied: AppliedState,
    done: tokio::sync::oneshot::Receiver<Result<(), crate::store::StoreError>>,
}

impl StateMachine {
    /// Reports what it applies to the group's log (see [`AppliedHook`]).
    pub fn with_applied_hook(mut self, hook: AppliedHook) -> StateMachine {
        self.applied = Some(hook);
        self
    }

    /// Counts the group's unwritten writes in the node's
    /// `unwritten_bytes`, and keeps the node under
    /// [`UNWRITTEN_NODE_BYTES`].
    pub fn with_stats(mut self, stats: Arc<LogStats>) -> StateMachine {
        self.stats = Some(stats);
        self
    }

    /// Sends the applied writes that go to the store in the background
    /// through `writer` (a store over the same engine with a writer of its
    /// own).
    pub fn with_state_writer(mut self, writer: Store) -> StateMachine {
        self.state_writer = writer;
        self
    }

    /// Writes applied state only while `gate` is open.
    pub fn with_write_gate(mut self, gate: WriteGate) -> StateMachine {
        self.gate = gate;
        self
    }

    /// Wraps `machine`; finishes or undoes an interrupted snapshot install
    /// and restores the machine from the store.
    pub async fn open(group: GroupId, store: Store, machine: Box<dyn GroupMachine>, snapshots: Arc<Snapshots>) -> io::Result<StateMachine> {
        let unlogged = machine.apply_unlogged();
        let sm = StateMachine {
            group,
            store: store.clone(),
            machine: Arc::new(Mutex::new(machine)),
            snapshots,
            unlogged,
            applied: None,
            writes: Unwritten::default(),
            unwritten: AppliedState::default(),
            writing: None,
            state_writer: store.clone(),
            stats: None,
            counted: 0,
            failed: false,
            gate: WriteGate::default(),
        };
        if sm.store.engine().get(Cf::RaftState, &keys::state_key(group, StateKind::Installing)).map_err(io_error)?.is_some() {
            tracing::warn!(group, "a snapshot install was interrupted; clearing the group so that its leader sends it again");
            let mut ops = sm.clear_ops();
            let (a, b) = keys::log_range(group, 0, None);
            ops.push(Op::DeleteRange(Cf::RaftLog, a, b));
            for kind in [StateKind::Purged, StateKind::Applied, StateKind::Membership, StateKind::Installing] {
                ops.push(Op::Delete(Cf::RaftState, keys::state_key(group, kind)));
            }
            sm.store.write(ops, true).await.map_err(io_error)?;
            sm.snapshots.remove_all();
            std::fs::create_dir_all(&sm.snapshots.dir)?;
        }
        sm.restore()?;
        Ok(sm)
    }

    pub fn machine(&self) -> &Arc<Mutex<Box<dyn GroupMachine>>> {
        &self.machine
    }

    fn restore(&self) -> io::Result<()> {
        let engine = self.store.engine().clone();
        let reader: &dyn Reader = engine.as_ref();
        self.machine.lock().restore(reader).map_err(io_error)
    }

    /// Deletes of the machine's ranges.
    fn clear_ops(&self) -> Vec<Op> {
        self.machine.lock().ranges().into_iter().map(|(cf, from, to)| Op::DeleteRange(cf, from, to)).collect()
    }

    fn read_state<T: for<'de> serde::Deserialize<'de>>(reader: &dyn Reader, group: GroupId, kind: StateKind) -> io::Result<Option<T>> {
        match reader.get(Cf::RaftState, &keys::state_key(group, kind)).map_err(io_error)? {
            Some(v) => decode(&v).map(Some).map_err(io_error),
            None => Ok(None),
        }
    }

    /// Applies one batch through an overlay on top of the writes not in
    /// the store yet, adding its writes and applied state to them; returns
    /// the replies, in entry order.
    fn apply_batch(&mut self, batch: &[EntryResponder<TypeConfig>]) -> io::Result<Vec<LocalReply>> {
        let engine: Arc<dyn Engine> = self.store.engine().clone();
        let lower;
        let base: &dyn Reader = match &self.writing {
            Some(w) => {
                lower = w.writes.over(engine.as_ref());
                &lower
            }
            None => engine.as_ref(),
        };
        let mut overlay = Overlay::new(base, &mut self.writes);
        let mut machine = self.machine.lock();
        let mut replies = Vec::with_capacity(batch.len());
        for (entry, _) in batch {
            let log_id = entry.log_id;
            let reply = match &entry.payload {
                EntryPayload::Normal(p) => {
                    let applied = Applied { index: log_id.index, term: log_id.leader_id.term, now_ms: p.now_ms, data: &p.data };
                    machine.apply(&applied, &mut overlay).map_err(io_error)?
                }
                EntryPayload::Membership(m) => {
                    self.unwritten.membership = Some(StoredMembership::new(Some(log_id), m.clone()));
                    None
                }
                EntryPayload::Blank => None,
            };
            replies.push(reply);
            self.unwritten.last = Some(log_id);
        }
        Ok(replies)
    }

    /// Whether a machine whose applied state may trail its log should
    /// write what it applied now: once the group or the node holds too
    /// much.
    fn should_write(&self) -> bool {
        self.writes.bytes() >= UNWRITTEN_GROUP_BYTES
            || self.stats.as_ref().is_some_and(|s| s.unwritten_bytes.load(Ordering::Relaxed) > UNWRITTEN_NODE_BYTES)
    }

    /// Brings the node's count of unwritten bytes up to date.
    fn recount(&mut self) {
        let now = (self.writes.bytes() + self.writing.as_ref().map_or(0, |w| w.writes.bytes())) as u64;
        if let Some(stats) = &self.stats {
            if now >= self.counted {
                stats.unwritten_bytes.fetch_add(now - self.counted, Ordering::Relaxed);
            } else {
                stats.unwritten_bytes.fetch_sub(self.counted - now, Ordering::Relaxed);
            }
        }
        self.counted = now;
    }

    /// A failed write of applied state: the store lacks what the machine
    /// believes applied, so the group must not go on (its state would
    /// diverge from the log's once a later write succeeds).
    fn fail(&mut self, what: impl std::fmt::Display) -> io::Error {
        self.failed = true;
        io_error(format!("writing the applied state failed: {what}"))
    }

    /// Waits until the writes on their way are in the store.
    async fn finish_writing(&mut self) -> io::Result<()> {
        if let Some(w) = self.writing.take() {
            let result = w.done.await;
            self.recount();
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.fail(e)),
                Err(_) => return Err(self.fail("the store writer stopped")),
            }
        }
        Ok(())
    }

    /// Drops the writes on their way once they are in the store.
    fn check_writing(&mut self) -> io::Result<()> {
        let Some(w) = self.writing.as_mut() else { return Ok(()) };
        let result = match w.done.try_recv() {
            Ok(result) => result,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(()),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Err(crate::store::StoreError::Closed),
        };
        self.writing = None;
        self.recount();
        result.map_err(|e| self.fail(e))
    }

    /// Whether there is anything applied and not written.
    fn has_unwritten(&self) -> bool {
        !self.writes.is_empty() || self.unwritten.last.is_some() || self.unwritten.membership.is_some()
    }

    /// Submits what is applied but not in the store yet, with the applied
    /// log id and membership, as one batch to the state writer, unless the
    /// gate is closed (then it stays in memory: the group is stopping).
    /// With `keep_readable`, the writes stay readable as `writing` until
    /// they are written (a copy of what is left of them is sent); without,
    /// they are moved into the batch (the caller waits for it before
    /// anything reads). Returns the write's completion in that last case
    /// only.
    fn submit_unwritten(&mut self, keep_readable: bool) -> Option<tokio::sync::oneshot::Receiver<Result<(), crate::store::StoreError>>> {
        let gate = self.gate.clone();
        let closed = gate.0.lock();
        if *closed || !self.has_unwritten() {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = |ops| {
            WriteRequest::unlogged(ops).on_done(move |r| {
                let _ = tx.send(r);
            })
        };
        if keep_readable {
            let writes = std::mem::take(&mut self.writes);
            let applied = std::mem::take(&mut self.unwritten);
            let mut ops = writes.ops();
            ops.extend(applied.ops(self.group));
            self.state_writer.submit(request(ops));
            self.writing = Some(Writing { writes, applied, done: rx });
            drop(closed);
            self.recount();
            None
        } else {
            let ops = self.take_unwritten_ops();
            self.state_writer.submit(request(ops));
            drop(closed);
            Some(rx)
        }
    }

    /// What is applied and not in the store, with the applied log id and
    /// membership, as one batch, taken.
    fn take_unwritten_ops(&mut self) -> Vec<Op> {
        let mut ops = self.writes.take_ops();
        ops.extend(std::mem::take(&mut self.unwritten).ops(self.group));
        self.recount();
        ops
    }

    /// Sends what is applied but not in the store yet to the store and
    /// goes on without waiting: the writes stay readable until they are
    /// written (one such batch at a time). Costs a copy of what is left of
    /// the writes, far less than a stall of the applying while they are
    /// written.
    async fn write_behind(&mut self) -> io::Result<()> {
        self.finish_writing().await?;
        self.refuse_if_failed()?;
        self.submit_unwritten(true);
        Ok(())
    }

    /// Forgets the writes not in the store (and not on their way there).
    fn forget_unwritten(&mut self) {
        self.writes = Unwritten::default();
        self.unwritten = AppliedState::default();
        self.recount();
    }

    /// Forgets the writes not in the store, once those on their way are
    /// there (a snapshot replaces them).
    async fn discard_unwritten(&mut self) -> io::Result<()> {
        self.finish_writing().await?;
        self.forget_unwritten();
        Ok(())
    }

    /// An earlier write failed: nothing more is applied or written.
    fn refuse_if_failed(&self) -> io::Result<()> {
        if self.failed {
            return Err(io_error("the applied state could not be written: the group stops"));
        }
        Ok(())
    }

    /// Writes what is applied but not yet in the store, with the applied
    /// log id and membership, as one batch, and waits until it is there. A
    /// group whose machine allows it does this only now and then (see
    /// [`UNWRITTEN_GROUP_BYTES`]): when it is idle, when it stops and
    /// before it builds a snapshot; a crash before then costs re-applying
    /// the entries since the last write. Once the group's gate is closed
    /// it writes nothing.
    pub async fn write_applied(&mut self) -> io::Result<()> {
        self.finish_writing().await?;
        self.refuse_if_failed()?;
        if self.unlogged {
            let Some(done) = self.submit_unwritten(false) else { return Ok(()) };
            return match done.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.fail(e)),
                Err(_) => Err(self.fail("the store writer stopped")),
            };
        }
        let ops = self.take_unwritten_ops();
        if ops.is_empty() {
            return Ok(());
        }
        self.store.write(ops, false).await.map_err(io_error)
    }

    /// Reads the machine's state as applied (the store with the writes not
    /// in it yet on top).
    pub fn read<T>(&self, f: impl FnOnce(&dyn Reader) -> T) -> T {
        let engine = self.store.engine().clone();
        match &self.writing {
            Some(w) => {
                let lower = w.writes.over(engine.as_ref());
                f(&self.writes.over(&lower))
            }
            None => f(&self.writes.over(engine.as_ref())),
        }
    }
}

impl Drop for StateMachine {
    /// A group that stops gives its unwritten bytes back to the node's
    /// count.
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            stats.unwritten_bytes.fetch_sub(self.counted, Ordering::Relaxed);
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let engine = self.store.engine().clone();
        let reader: &dyn Reader = engine.as_ref();
        // The newest of: applied since the last write, on its way to the
        // store, in it.
        let writing = self.writing.as_ref().map(|w| &w.applied);
        let applied = match self.unwritten.last.or(writing.and_then(|a| a.last)) {
            Some(last) => Some(last),
            None => Self::read_state(reader, self.group, StateKind::Applied)?,
        };
        let membership = match self.unwritten.membership.as_ref().or(writing.and_then(|a| a.membership.as_ref())) {
            Some(m) => m.clone(),
            None => Self::read_state(reader, self.group, StateKind::Membership)?.unwrap_or_default(),
        };
        Ok((applied, membership))
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        loop {
            let mut batch: Vec<EntryResponder<TypeConfig>> = Vec::new();
            let mut bytes = 0usize;
            while batch.len() < APPLY_BATCH && bytes < APPLY_BATCH_BYTES {
                match entries.next().await {
                    Some(item) => {
                        let item = item?;
                        if let EntryPayload::Normal(p) = &item.0.payload {
                            bytes += p.data.len();
                        }
                        batch.push(item);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            self.refuse_if_failed()?;
            let replies = match self.apply_batch(&batch) {
                Ok(replies) => replies,
                Err(e) => {
                    // An entry may be half applied: nothing of this group's
                    // unwritten state may reach the store any more (the
                    // group stops; a restart applies again from the store).
                    self.failed = true;
                    self.forget_unwritten();
                    return Err(e);
                }
            };
            self.check_writing()?;
            self.recount();
            if !self.unlogged {
                self.write_applied().await?;
            } else if self.should_write() {
                self.write_behind().await?;
            }
            if let (Some(hook), Some((last, _))) = (&self.applied, batch.last()) {
                hook.applied_through(last.log_id.index);
            }
            for ((_, responder), reply) in batch.into_iter().zip(replies) {
                if let Some(r) = responder {
                    r.send(Reply(reply));
                }
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // The snapshot is read from the store: everything applied goes
        // there first. (If that fails, the snapshot is built from what the
        // store holds, consistent with its own applied log id, and the
        // group stops at its next batch.)
        if let Err(e) = self.write_applied().await {
            tracing::error!(group = self.group, error = %e, "cannot write the applied state before a snapshot");
        }
        SnapshotBuilder {
            group: self.group,
            engine: self.store.engine().clone(),
            ranges: self.machine.lock().ranges(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> io::Result<()> {
        let group = self.group;
        tracing::info!(group, last_log_id = ?meta.last_log_id, "installing a snapshot");
        let started = std::time::Instant::now();
        self.discard_unwritten().await?;
        // Clear the ranges and mark the install, in one batch.
        let mut ops = self.clear_ops();
        ops.push(Op::Put(Cf::RaftState, keys::state_key(group, StateKind::Installing), Vec::new()));
        self.store.write(ops, false).await.map_err(io_error)?;
        // Records in bounded batches, read on a blocking thread.
        let path = snapshot.path.clone();
        let store = self.store.clone();
        let gate = self.gate.clone();
        let handle = tokio::runtime::Handle::current();
        let records = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut reader = SnapshotReader::open(&path)?;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let mut count = 0u64;
            loop {
                let record = reader.next_record()?;
                let end = record.is_none();
                if let Some((cf, k, v)) = record {
                    bytes += k.len() + v.len();
                    batch.push(Op::Put(cf, k, v));
                    count += 1;
                }
                if (end && !batch.is_empty()) || bytes >= INSTALL_BATCH_BYTES {
                    // A group stopped meanwhile (and maybe deleted) takes
                    // no more records.
                    if *gate.0.lock() {
                        return Err(io_error("the group stopped during a snapshot install"));
                    }
                    handle.block_on(store.write(std::mem::take(&mut batch), false)).map_err(io_error)?;
                    bytes = 0;
                }
                if end {
                    return Ok(count);
                }
            }
        })
        .await
        .map_err(io_error)??;
        // The applied state, and the end of the install, in one synced
        // batch.
        let mut ops = Vec::new();
        match &meta.last_log_id {
            Some(l) => ops.push(Op::Put(Cf::RaftState, keys::state_key(group, StateKind::Applied), encode(l))),
            None => ops.push(Op::Delete(Cf::RaftState, keys::state_key(group, StateKind::Applied))),
        }
        ops.push(Op::Put(Cf::RaftState, keys::state_key(group, StateKind::Membership), encode(&meta.last_membership)));
        ops.push(Op::Delete(Cf::RaftState, keys::state_key(group, StateKind::Installing)));
        self.store.write(ops, true).await.map_err(io_error)?;
        self.restore()?;
        // Keep the file as the current snapshot (it is what this node
        // sends if it leads later). At start-up openraft installs the
        // current snapshot itself when the applied state trails it (a
        // crash between building it and the store's next flush): that
        // file stays where it is.
        if self.snapshots.current().is_some_and(|(_, p)| p == snapshot.path) {
            tracing::info!(group, records, took_ms = started.elapsed().as_millis() as u64, "state restored from the current snapshot");
            return Ok(());
        }
        let kept = self.snapshots.new_path(meta, "installed");
        match std::fs::rename(&snapshot.path, &kept) {
            Ok(()) => {
                self.snapshots.offer(meta.clone(), kept);
            }
            Err(e) => tracing::warn!(group, error = %e, "cannot keep the installed snapshot file"),
        }
        tracing::info!(group, records, took_ms = started.elapsed().as_millis() as u64, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>>> {
        Ok(self.snapshots.current().map(|(meta, path)| Snapshot { meta, snapshot: SnapshotFile { path } }))
    }
}

/// Builds a snapshot file from a consistent view of the store.
pub struct SnapshotBuilder {
    group: GroupId,
    engine: Arc<dyn Engine>,
    ranges: Vec<(Cf, Vec<u8>, Vec<u8>)>,
    snapshots: Arc<Snapshots>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>> {
        let group = self.group;
        let engine = self.engine.clone();
        let ranges = self.ranges.clone();
        let snapshots = self.snapshots.clone();
        let started = std::time::Instant::now();
        let (meta, path, records) = tokio::task::spawn_blocking(move || -> io::Result<(SnapshotMeta, PathBuf, u64)> {
            let mut result: Option<io::Result<(SnapshotMeta, PathBuf, u64)>> = None;
            engine
                .with_view(&mut |view| {
                    let r = (|| {
                        let last_log_id: Option<LogId> = StateMachine::read_state(view, group, StateKind::Applied)?;
                        let last_membership: StoredMembership =
                            StateMachine::read_state(view, group, StateKind::Membership)?.unwrap_or_default();
                        let meta = SnapshotMeta { last_log_id, last_membership };
                        // Everything applied up to the view's log id (and
                        // more) survives a crash from here on: the log up
                        // to it may be purged once this snapshot exists.
                        engine.flush().map_err(io_error)?;
                        let path = snapshots.new_path(&meta, "built");
                        let records = snapshot::write(&path, &meta, view, &ranges)?;
                        Ok((meta, path, records))
                    })();
                    result = Some(r);
                    Ok(())
                })
                .map_err(io_error)?;
            result.unwrap_or_else(|| Err(io_error("the store view was never read")))
        })
        .await
        .map_err(io_error)??;
        tracing::info!(group, last_log_id = ?meta.last_log_id, records, took_ms = started.elapsed().as_millis() as u64, "snapshot built");
        self.snapshots.offer(meta.clone(), path);
        // Whichever is newest is the current one (ours, or one installed
        // meanwhile).
        let (meta, path) = self.snapshots.current().ok_or_else(|| io_error("no current snapshot after building one"))?;
        Ok(Snapshot { meta, snapshot: SnapshotFile { path } })
    }
}
