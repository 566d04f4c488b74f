//! openraft's state machine around a [`GroupMachine`].
//!
//! Invariants:
//! * **One store batch per applied batch.** Committed entries are applied
//!   in batches through one [`Overlay`]; the overlay's writes, the last
//!   applied log id and the membership are then written as one atomic
//!   batch (unsynced: the Raft log is what is durable; the write is applied
//!   before the next batch is, so the next batch reads it). A crash never
//!   leaves an entry half applied, and the applied log id always matches
//!   the machine's ranges.
//! * **Applied state may trail the log after a crash.** A machine that
//!   allows it ([`GroupMachine::apply_unlogged`]: queues) has its batches
//!   written without the store's write-ahead log: a crash rolls its state
//!   and applied log id back together (the store flushes every column
//!   family at once) to the last flush, and openraft applies the entries
//!   after it again. The log below a snapshot is purged only after the
//!   snapshot was built, and building one flushes the store first, so the
//!   entries to apply again are always still in the log.
//! * **Replies after the write.** A local proposer hears the reply once its
//!   entry's batch is in the store, so what it reads next reflects it.
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
use super::log_store::AppliedHook;
use super::machine::{Applied, GroupId, GroupMachine, LocalReply};
use super::snapshot::{self, SnapshotFile, SnapshotReader};
use super::types::{LogId, Reply, SnapshotMeta, StoredMembership, TypeConfig, decode, encode, io_error};
use crate::store::overlay::Overlay;
use crate::store::{Cf, Engine, Op, Reader, Store};

/// Most entries applied through one overlay.
const APPLY_BATCH: usize = 512;
/// Most bytes of entry data applied through one overlay.
const APPLY_BATCH_BYTES: usize = 8 << 20;
/// Bytes of snapshot records written to the store per batch when
/// installing a snapshot.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

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
}

impl StateMachine {
    /// Reports what it applies to the group's log (see [`AppliedHook`]).
    pub fn with_applied_hook(mut self, hook: AppliedHook) -> StateMachine {
        self.applied = Some(hook);
        self
    }

    /// Wraps `machine`; finishes or undoes an interrupted snapshot install
    /// and restores the machine from the store.
    pub async fn open(group: GroupId, store: Store, machine: Box<dyn GroupMachine>, snapshots: Arc<Snapshots>) -> io::Result<StateMachine> {
        let unlogged = machine.apply_unlogged();
        let sm = StateMachine { group, store, machine: Arc::new(Mutex::new(machine)), snapshots, unlogged, applied: None };
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

    /// Applies one batch through an overlay; returns the writes (with the
    /// applied state) and the replies, in entry order.
    fn apply_batch(&self, batch: &[EntryResponder<TypeConfig>]) -> io::Result<(Vec<Op>, Vec<LocalReply>)> {
        let engine: Arc<dyn Engine> = self.store.engine().clone();
        let base: &dyn Reader = engine.as_ref();
        let mut overlay = Overlay::new(base);
        let mut machine = self.machine.lock();
        let mut replies = Vec::with_capacity(batch.len());
        let mut last: Option<LogId> = None;
        let mut membership: Option<StoredMembership> = None;
        for (entry, _) in batch {
            let log_id = entry.log_id;
            let reply = match &entry.payload {
                EntryPayload::Normal(p) => {
                    let applied = Applied { index: log_id.index, term: log_id.leader_id.term, now_ms: p.now_ms, data: &p.data };
                    machine.apply(&applied, &mut overlay).map_err(io_error)?
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m.clone()));
                    None
                }
                EntryPayload::Blank => None,
            };
            replies.push(reply);
            last = Some(log_id);
        }
        drop(machine);
        let mut ops = overlay.into_ops();
        if let Some(last) = last {
            ops.push(Op::Put(Cf::RaftState, keys::state_key(self.group, StateKind::Applied), encode(&last)));
        }
        if let Some(m) = membership {
            ops.push(Op::Put(Cf::RaftState, keys::state_key(self.group, StateKind::Membership), encode(&m)));
        }
        Ok((ops, replies))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let engine = self.store.engine().clone();
        let reader: &dyn Reader = engine.as_ref();
        let applied = Self::read_state(reader, self.group, StateKind::Applied)?;
        let membership = Self::read_state(reader, self.group, StateKind::Membership)?.unwrap_or_default();
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
            let (ops, replies) = self.apply_batch(&batch)?;
            if self.unlogged {
                self.store.write_unlogged(ops).await.map_err(io_error)?;
            } else {
                self.store.write(ops, false).await.map_err(io_error)?;
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
        // Clear the ranges and mark the install, in one batch.
        let mut ops = self.clear_ops();
        ops.push(Op::Put(Cf::RaftState, keys::state_key(group, StateKind::Installing), Vec::new()));
        self.store.write(ops, false).await.map_err(io_error)?;
        // Records in bounded batches, read on a blocking thread.
        let path = snapshot.path.clone();
        let store = self.store.clone();
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
