//! Storage: the only code that touches the database.
//!
//! * [`Engine`] is an ordered key-value store with column families. It has a
//!   RocksDB implementation ([`rocks::RocksEngine`]) and an in-memory one
//!   ([`memory::MemoryEngine`]) for fast tests. Nothing above this module
//!   knows which one it runs on.
//! * [`Store`] is the handle the broker uses. All writes go through one
//!   writer thread that merges whatever requests are waiting into one
//!   atomic batch and one WAL sync (group commit): a burst of N concurrent
//!   persistent publishes costs one fsync, not N.
//!
//! Invariants:
//! * Requests are applied in the order they were submitted; a request's
//!   completion runs only after its batch is durable (synced when the request
//!   asked for it).
//! * A multi-key change is one [`WriteRequest`], hence one atomic batch: a
//!   crash never applies half of it.
//! * [`Store::read_after_writes`] runs a read that observes every write
//!   submitted before it.
//! * A request carrying a [`Fence`] is never applied once an earlier request
//!   with the same fence failed: a writer (a queue) whose write failed knows
//!   that nothing it submitted afterwards reached the disk either, so it can
//!   rebuild its memory from what the store holds. Only one thread applies
//!   writes, so "afterwards" is exact.
//! * Memory held by submitted, not yet applied writes is bounded: callers
//!   that can wait use [`Store::submit_with_room`], which waits while the
//!   writer's backlog exceeds the write buffer.

pub mod counters;
pub mod keys;
pub mod memory;
pub mod overlay;
pub mod rocks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// Column families: one per kind of data, each with its own tuning. The
/// `*Transient` families (and `Paged`) hold what must not survive a restart
/// and are emptied when the database opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Exchanges, queues, bindings, id counters.
    Meta,
    /// Persistent messages of durable queues (and their delivery counts).
    Messages,
    /// Messages that need not survive a restart, written only to keep a
    /// queue's memory bounded.
    Paged,
    /// Per-queue counters and next sequence number.
    QueueState,
    /// Delayed persistent messages of durable queues: queue, due time,
    /// sequence -> message.
    Delays,
    /// Delayed messages that need not survive a restart.
    DelaysTransient,
    /// Expiry index of stored messages: queue, expiry time, message key.
    Expiry,
    /// Expiry index of messages that need not survive a restart.
    ExpiryTransient,
    /// Deduplication windows: queue, message id -> time the window ends.
    Dedup,
    /// Dead-lettered persistent messages on their way into a durable queue:
    /// written atomically with their removal from the source queue, moved
    /// into the target queue atomically by its owner.
    Inbox,
    /// What a replicated queue's state machine keeps besides its messages:
    /// its state record, consumers, checked-out messages and dead-letter
    /// outbox (see `keys::replica`).
    Replica,
    /// Raft log entries of every group on the node: group id, index ->
    /// entry (see `raft::keys`).
    RaftLog,
    /// Raft metadata per group: group id, kind -> vote, last purged log id,
    /// last applied log id and membership (see `raft::keys`).
    RaftState,
}

impl Cf {
    pub const ALL: [Cf; 13] = [
        Cf::Meta,
        Cf::Messages,
        Cf::Paged,
        Cf::QueueState,
        Cf::Delays,
        Cf::DelaysTransient,
        Cf::Expiry,
        Cf::ExpiryTransient,
        Cf::Dedup,
        Cf::Inbox,
        Cf::Replica,
        Cf::RaftLog,
        Cf::RaftState,
    ];

    /// Emptied at open: their content never outlives the process.
    pub const TRANSIENT: [Cf; 3] = [Cf::Paged, Cf::DelaysTransient, Cf::ExpiryTransient];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Messages => "messages",
            Cf::Paged => "paged",
            Cf::QueueState => "queue_state",
            Cf::Delays => "delays",
            Cf::DelaysTransient => "delays_transient",
            Cf::Expiry => "expiry",
            Cf::ExpiryTransient => "expiry_transient",
            Cf::Dedup => "dedup",
            Cf::Inbox => "inbox",
            Cf::Replica => "replica",
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Cf::Meta => 0,
            Cf::Messages => 1,
            Cf::Paged => 2,
            Cf::QueueState => 3,
            Cf::Delays => 4,
            Cf::DelaysTransient => 5,
            Cf::Expiry => 6,
            Cf::ExpiryTransient => 7,
            Cf::Dedup => 8,
            Cf::Inbox => 9,
            Cf::Replica => 10,
            Cf::RaftLog => 11,
            Cf::RaftState => 12,
        }
    }
}

/// One change in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Merges a [`counters::QueueCounters`] delta (only in [`Cf::QueueState`]).
    Merge(Cf, Vec<u8>, Vec<u8>),
    /// Deletes `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

impl Op {
    fn approx_bytes(&self) -> usize {
        match self {
            Op::Put(_, k, v) | Op::Merge(_, k, v) => k.len() + v.len(),
            Op::Delete(_, k) => k.len(),
            Op::DeleteRange(_, a, b) => a.len() + b.len(),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("corrupt record in column family {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    #[error("storage is closed")]
    Closed,
    /// Not applied: an earlier write of the same writer failed.
    #[error("not written: an earlier write of this queue failed ({0})")]
    Fenced(String),
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Reading an ordered key-value store with column families: a store, or a
/// store with pending writes on top ([`overlay::Overlay`]).
pub trait Reader {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries with `from <= key < to`, in key order.
    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError>;
}

/// An ordered key-value store with column families.
pub trait Engine: Reader + Send + Sync + 'static {
    /// Applies `ops` atomically; durable on return when `sync`.
    fn write(&self, ops: &[Op], sync: bool) -> Result<(), StoreError>;
    /// Applies `ops` atomically without logging them: a crash loses them
    /// unless a flush (see [`Engine::flush`]) persisted them first. For
    /// state that can be rebuilt from elsewhere (a Raft group's applied
    /// state, from its log). The engine keeps every column family
    /// consistent with every other across such a loss: what survives is
    /// the store as of one point in time, plus the logged writes after it.
    fn write_unlogged(&self, ops: &[Op]) -> Result<(), StoreError> {
        self.write(ops, false)
    }
    /// Bytes used on disk (0 for memory).
    fn disk_usage(&self) -> u64;
    /// Persists memory tables so that the next start need not replay the WAL.
    fn flush(&self) -> Result<(), StoreError>;
    /// The entry with the greatest key in `[from, to)`, if any.
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<KeyValue>, StoreError>;
    /// Runs `read` against one consistent view of the whole store: writes
    /// made while it runs are not visible to it (RocksDB: a snapshot;
    /// memory: a copy). For reading a large state without holding it in
    /// memory (Raft snapshots are streamed from one).
    fn with_view(&self, read: &mut dyn FnMut(&dyn Reader) -> Result<(), StoreError>) -> Result<(), StoreError>;
}

/// A write: its ops, whether it must be synced, and what to run once it is
/// durable.
pub struct WriteRequest {
    pub ops: Vec<Op>,
    pub sync: bool,
    /// Written without the write-ahead log ([`Engine::write_unlogged`]).
    pub unlogged: bool,
    pub done: Option<Completion>,
    /// Refuse this write once an earlier write with the same fence failed.
    pub fence: Option<Arc<Fence>>,
}

impl WriteRequest {
    pub fn new(ops: Vec<Op>, sync: bool) -> WriteRequest {
        WriteRequest { ops, sync, unlogged: false, done: None, fence: None }
    }

    /// A write that may be lost at a crash ([`Engine::write_unlogged`]);
    /// it is still applied in order with every other write.
    pub fn unlogged(ops: Vec<Op>) -> WriteRequest {
        WriteRequest { ops, sync: false, unlogged: true, done: None, fence: None }
    }

    pub fn on_done(mut self, done: impl FnOnce(Result<(), StoreError>) + Send + 'static) -> WriteRequest {
        self.done = Some(Box::new(done));
        self
    }

    pub fn fenced(mut self, fence: Arc<Fence>) -> WriteRequest {
        self.fence = Some(fence);
        self
    }

    fn bytes(&self) -> usize {
        self.ops.iter().map(Op::approx_bytes).sum()
    }
}

/// Shared by the writes of one writer (a queue incarnation): once one of
/// them fails, the store refuses the rest, so that the writer's later
/// writes cannot build on a change that never happened.
#[derive(Debug, Default)]
pub struct Fence {
    broken: Mutex<Option<String>>,
}

impl Fence {
    pub fn new() -> Arc<Fence> {
        Arc::new(Fence::default())
    }

    /// Why the fence is broken, if it is.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().clone()
    }

    /// Refuses every write not yet applied.
    pub fn break_with(&self, reason: impl Into<String>) {
        let mut b = self.broken.lock();
        if b.is_none() {
            *b = Some(reason.into());
        }
    }
}

pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

enum Request {
    /// A write and the write-buffer bytes it holds until applied.
    Write(WriteRequest, u32),
    /// Runs on the writer thread after every earlier write is applied.
    After(Box<dyn FnOnce() + Send>),
    /// Applies every earlier write, then stops the writer.
    Stop,
}

/// Counters the writer keeps; read by metrics.
#[derive(Default, Debug)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub synced_batches: AtomicU64,
    pub requests: AtomicU64,
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub sync_nanos: AtomicU64,
}

/// A hook the writer calls after each batch: (requests in the batch, whether
/// it was synced, how long the write took).
pub type BatchObserver = Arc<dyn Fn(usize, bool, Duration) + Send + Sync>;

/// The broker's handle on storage. Cloning shares the writer.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn Engine>,
    tx: mpsc::Sender<Request>,
    stats: Arc<WriterStats>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Bytes of submitted writes the writer has not applied yet may use;
    /// [`Store::submit_with_room`] waits for room.
    budget: Arc<Semaphore>,
    budget_bytes: u32,
}

/// Most bytes merged into one batch; the rest wait for the next.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Default bound on the bytes of writes waiting for the writer.
pub const DEFAULT_WRITE_BUFFER: u32 = 64 << 20;

impl Store {
    pub fn new(engine: Arc<dyn Engine>, observer: Option<BatchObserver>) -> Store {
        Store::with_write_buffer(engine, observer, DEFAULT_WRITE_BUFFER)
    }

    /// A store whose pending writes hold at most `write_buffer` bytes (for
    /// writers that wait for room).
    pub fn with_write_buffer(engine: Arc<dyn Engine>, observer: Option<BatchObserver>, write_buffer: u32) -> Store {
        let write_buffer = write_buffer.max(1);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let budget = Arc::new(Semaphore::new(write_buffer as usize));
        let writer = {
            let engine = engine.clone();
            let stats = stats.clone();
            let budget = budget.clone();
            std::thread::Builder::new()
                .name("warren-store-writer".into())
                .spawn(move || writer_loop(engine, rx, stats, observer, budget))
                .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))
        };
        let writer = match writer {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(error = %e, "store writer unavailable");
                None
            }
        };
        Store { engine, tx, stats, writer: Arc::new(Mutex::new(writer)), budget, budget_bytes: write_buffer }
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// Queues a write without waiting for room in the write buffer (for
    /// small metadata writes). Its completion (if any) runs on the writer
    /// thread once the batch holding it is applied (and synced when `sync`);
    /// keep it short.
    pub fn submit(&self, req: WriteRequest) {
        self.send(req, 0);
    }

    /// Queues a write once the write buffer has room for it: a writer that
    /// outruns the disk waits here instead of growing memory. A write larger
    /// than the whole buffer waits for an empty buffer.
    pub async fn submit_with_room(&self, req: WriteRequest) {
        let want = u32::try_from(req.bytes()).unwrap_or(u32::MAX).clamp(1, self.budget_bytes);
        match self.budget.acquire_many(want).await {
            Ok(permit) => {
                permit.forget();
                self.send(req, want);
            }
            // The semaphore is never closed; should it be, write anyway.
            Err(_) => self.send(req, 0),
        }
    }

    /// Bytes of the write buffer in use.
    pub fn write_buffer_used(&self) -> u64 {
        u64::from(self.budget_bytes).saturating_sub(self.budget.available_permits() as u64)
    }

    fn send(&self, req: WriteRequest, charge: u32) {
        if let Err(mpsc::SendError(Request::Write(req, charge))) = self.tx.send(Request::Write(req, charge)) {
            self.budget.add_permits(charge as usize);
            if let Some(done) = req.done {
                done(Err(StoreError::Closed));
            }
        }
    }

    /// Writes and waits until durable.
    pub async fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(WriteRequest::new(ops, sync).on_done(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Writes without logging ([`WriteRequest::unlogged`]) and waits until
    /// applied.
    pub async fn write_unlogged(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(WriteRequest::unlogged(ops).on_done(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs `f` on the writer thread once every write submitted before this
    /// call is applied. `f` must not block: spawn the actual read elsewhere.
    pub fn after_writes(&self, f: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Request::After(Box::new(f)));
    }

    /// Reads with `read` on a blocking thread, after every write submitted
    /// before this call is applied, and returns its result.
    pub async fn read_after_writes<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Engine) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let engine = self.engine.clone();
        let handle = tokio::runtime::Handle::current();
        self.after_writes(move || {
            handle.spawn_blocking(move || {
                let _ = tx.send(read(engine.as_ref()));
            });
        });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Applies everything submitted so far, flushes memory tables and stops
    /// the writer. Later writes fail with [`StoreError::Closed`].
    pub fn close(&self) -> Result<(), StoreError> {
        // Dropping our sender is not enough (clones may live on): the writer
        // stops when told to, after applying everything sent before.
        let _ = self.tx.send(Request::Stop);
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        self.engine.flush()
    }
}

fn writer_loop(
    engine: Arc<dyn Engine>,
    rx: mpsc::Receiver<Request>,
    stats: Arc<WriterStats>,
    observer: Option<BatchObserver>,
    budget: Arc<Semaphore>,
) {
    let mut batch = Batch::default();
    let flush = |b: &mut Batch| {
        if b.requests == 0 {
            return;
        }
        let started = Instant::now();
        // Runs of logged and unlogged requests, in submission order; the
        // last logged run carries the sync, which covers the runs before
        // it. A run that fails fails its requests and every later one
        // (never applied); earlier runs stand.
        let last_logged = b.runs.iter().rposition(|r| !r.unlogged);
        let mut failed: Option<StoreError> = None;
        let mut results = Vec::with_capacity(b.runs.len());
        for (i, run) in b.runs.iter().enumerate() {
            let result = match &failed {
                Some(e) => Err(e.clone()),
                None if run.ops.is_empty() => Ok(()),
                None if run.unlogged => engine.write_unlogged(&run.ops),
                None => engine.write(&run.ops, b.sync && Some(i) == last_logged),
            };
            if let Err(e) = &result
                && failed.is_none()
            {
                tracing::error!(error = %e, ops = run.ops.len(), "store write failed");
                failed = Some(e.clone());
            }
            if let Err(e) = &result {
                // Every writer with a request here has lost it: refuse
                // what they sent after it.
                for fence in &run.fences {
                    fence.break_with(e.to_string());
                }
            }
            results.push(result);
        }
        let took = started.elapsed();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        if b.sync {
            stats.synced_batches.fetch_add(1, Ordering::Relaxed);
        }
        stats.requests.fetch_add(b.requests as u64, Ordering::Relaxed);
        stats.ops.fetch_add(b.runs.iter().map(|r| r.ops.len() as u64).sum(), Ordering::Relaxed);
        stats.bytes.fetch_add(b.bytes as u64, Ordering::Relaxed);
        stats.sync_nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        if let Some(obs) = &observer {
            obs(b.requests, b.sync, took);
        }
        for (run, result) in b.runs.iter_mut().zip(results) {
            for done in run.dones.drain(..) {
                done(result.clone());
            }
        }
        budget.add_permits(b.charge);
        b.clear();
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Write(w, charge) => {
                    if let Some(reason) = w.fence.as_ref().and_then(|f| f.broken()) {
                        // An earlier write of this writer failed: this one
                        // must not be applied on top of a change that never
                        // happened.
                        budget.add_permits(charge as usize);
                        if let Some(done) = w.done {
                            done(Err(StoreError::Fenced(reason)));
                        }
                    } else {
                        batch.add(w, charge);
                        if batch.bytes >= MAX_BATCH_BYTES {
                            flush(&mut batch);
                        }
                    }
                }
                Request::After(f) => {
                    flush(&mut batch);
                    f();
                }
                Request::Stop => {
                    flush(&mut batch);
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        flush(&mut batch);
    }
    flush(&mut batch);
}

/// Consecutive requests of one kind (logged or not), merged into one
/// atomic write.
#[derive(Default)]
struct Run {
    unlogged: bool,
    ops: Vec<Op>,
    dones: Vec<Completion>,
    fences: Vec<Arc<Fence>>,
}

/// Requests merged into one write per run, and one sync.
#[derive(Default)]
struct Batch {
    runs: Vec<Run>,
    sync: bool,
    requests: usize,
    bytes: usize,
    /// Write-buffer bytes to release once applied.
    charge: usize,
}

impl Batch {
    fn add(&mut self, w: WriteRequest, charge: u32) {
        self.requests += 1;
        self.sync |= w.sync;
        self.bytes += w.bytes();
        self.charge += charge as usize;
        if self.runs.last().is_none_or(|r| r.unlogged != w.unlogged) {
            self.runs.push(Run { unlogged: w.unlogged, ..Run::default() });
        }
        let Some(run) = self.runs.last_mut() else { return };
        run.ops.extend(w.ops);
        if let Some(d) = w.done {
            run.dones.push(d);
        }
        if let Some(f) = w.fence
            && !run.fences.iter().any(|x| Arc::ptr_eq(x, &f))
        {
            run.fences.push(f);
        }
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.sync = false;
        self.requests = 0;
        self.bytes = 0;
        self.charge = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn put(k: &[u8], v: &[u8]) -> Op {
        Op::Put(Cf::Messages, k.to_vec(), v.to_vec())
    }

    #[tokio::test]
    async fn should_apply_writes_in_order_and_complete_each() {
        let store = Store::new(Arc::new(memory::MemoryEngine::new()), None);
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..100u8 {
            let done = done.clone();
            store.submit(WriteRequest::new(vec![put(b"k", &[i])], i % 2 == 0).on_done(move |r| {
                assert!(r.is_ok());
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        let v = store.read_after_writes(|e| e.get(Cf::Messages, b"k")).await.unwrap();
        assert_eq!(v, Some(vec![99]));
        assert_eq!(done.load(Ordering::SeqCst), 100);
        // Group commit: fewer batches than requests is allowed, never more.
        assert!(store.stats().batches.load(Ordering::SeqCst) <= 100);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn should_fail_writes_after_close() {
        let store = Store::new(Arc::new(memory::MemoryEngine::new()), None);
        store.close().unwrap();
        let r = store.write(vec![put(b"a", b"b")], true).await;
        assert!(matches!(r, Err(StoreError::Closed)));
    }

    #[tokio::test]
    async fn should_refuse_later_writes_of_a_writer_whose_write_failed() {
        let gate = Gate::closed();
        let store = Store::new(gate.clone(), None);
        let (a, b) = (Fence::new(), Fence::new());
        let results = Arc::new(Mutex::new(Vec::new()));
        let submit = |name: &'static str, fence: Option<&Arc<Fence>>, key: &str| {
            let results = results.clone();
            let mut req = WriteRequest::new(vec![put(key.as_bytes(), b"v")], true).on_done(move |r| results.lock().push((name, r)));
            if let Some(f) = fence {
                req = req.fenced(f.clone());
            }
            store.submit(req);
        };
        // The first write fails while the others already wait behind it in
        // the writer's queue: the failure must still stop a's second write.
        gate.inner.fail_next_writes(1);
        submit("a1", Some(&a), "1");
        gate.wait_for_writer();
        submit("a2", Some(&a), "2");
        submit("none", None, "3");
        submit("b", Some(&b), "4");
        gate.open();
        store.read_after_writes(|_| Ok(())).await.unwrap();
        let results = results.lock();
        assert!(matches!(results[0], ("a1", Err(StoreError::Io(_)))), "{results:?}");
        assert!(matches!(results[1], ("a2", Err(StoreError::Fenced(_)))), "{results:?}");
        assert!(matches!(results[2], ("none", Ok(()))), "{results:?}");
        assert!(matches!(results[3], ("b", Ok(()))), "{results:?}");
        let keys: Vec<Vec<u8>> = store.engine().scan(Cf::Messages, b"", b"\xff", 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"3".to_vec(), b"4".to_vec()], "only the unfenced and the other writer's writes applied");
        assert!(a.broken().is_some() && b.broken().is_none());
        store.close().unwrap();
    }

    #[tokio::test]
    async fn should_keep_logged_and_unlogged_writes_in_order_and_sync_the_last_logged_run() {
        let gate = Gate::closed();
        let store = Store::new(gate.clone(), None);
        // Hold the writer so that the rest merges into one batch.
        store.submit(WriteRequest::new(vec![put(b"k", b"0")], false));
        gate.wait_for_writer();
        let done = Arc::new(AtomicUsize::new(0));
        let plan: [(&[u8], bool, bool); 5] =
            [(b"1", false, true), (b"2", false, false), (b"3", true, false), (b"4", false, false), (b"5", true, false)];
        for (v, unlogged, sync) in plan {
            let done = done.clone();
            let req = if unlogged { WriteRequest::unlogged(vec![put(b"k", v)]) } else { WriteRequest::new(vec![put(b"k", v)], sync) };
            store.submit(req.on_done(move |r| {
                assert!(r.is_ok());
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        gate.open();
        let v = store.read_after_writes(|e| e.get(Cf::Messages, b"k")).await.unwrap();
        assert_eq!(v, Some(b"5".to_vec()), "the last write wins, whatever its kind");
        assert_eq!(done.load(Ordering::SeqCst), 5);
        let calls = gate.calls.lock().clone();
        let k = |s: &[u8]| vec![s.to_vec()];
        let merged = vec![b"1".to_vec(), b"2".to_vec()];
        assert_eq!(
            calls,
            vec![(false, false, k(b"0")), (false, false, merged), (true, false, k(b"3")), (false, true, k(b"4")), (true, false, k(b"5"))],
            "runs in order; the sync asked for by the first run is carried by the last logged one"
        );
        store.close().unwrap();
    }

    /// One engine write as the gate saw it: (unlogged, synced, values put).
    type Call = (bool, bool, Vec<Vec<u8>>);

    /// An engine whose writes wait until it is opened, to hold the writer
    /// busy.
    struct Gate {
        inner: memory::MemoryEngine,
        /// (open, a write is waiting)
        state: parking_lot::Mutex<(bool, bool)>,
        cv: parking_lot::Condvar,
        calls: parking_lot::Mutex<Vec<Call>>,
    }

    impl Gate {
        fn closed() -> Arc<Gate> {
            Arc::new(Gate {
                inner: memory::MemoryEngine::new(),
                state: parking_lot::Mutex::new((false, false)),
                cv: parking_lot::Condvar::new(),
                calls: parking_lot::Mutex::default(),
            })
        }

        fn open(&self) {
            self.state.lock().0 = true;
            self.cv.notify_all();
        }

        /// Waits (at most 10 s) until the writer is blocked in a write.
        fn wait_for_writer(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut st = self.state.lock();
            while !st.1 && Instant::now() < deadline {
                self.cv.wait_until(&mut st, deadline);
            }
            assert!(st.1, "the writer never reached the engine");
        }
    }

    impl Reader for Gate {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(cf, key)
        }

        fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
            self.inner.scan(cf, from, to, limit)
        }
    }

    impl Gate {
        fn pass(&self, ops: &[Op], unlogged: bool, sync: bool) {
            let mut st = self.state.lock();
            st.1 = true;
            self.cv.notify_all();
            while !st.0 {
                self.cv.wait(&mut st);
            }
            drop(st);
            let values = ops.iter().map(|op| if let Op::Put(_, _, v) = op { v.clone() } else { Vec::new() }).collect();
            self.calls.lock().push((unlogged, sync, values));
        }
    }

    impl Engine for Gate {
        fn write(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
            self.pass(ops, false, sync);
            self.inner.write(ops, sync)
        }
        fn write_unlogged(&self, ops: &[Op]) -> Result<(), StoreError> {
            self.pass(ops, true, false);
            self.inner.write(ops, false)
        }
        fn disk_usage(&self) -> u64 {
            0
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<KeyValue>, StoreError> {
            self.inner.last_in(cf, from, to)
        }
        fn with_view(&self, read: &mut dyn FnMut(&dyn Reader) -> Result<(), StoreError>) -> Result<(), StoreError> {
            self.inner.with_view(read)
        }
    }

    #[tokio::test]
    async fn should_make_writers_wait_while_the_write_buffer_is_full() {
        let gate = Gate::closed();
        let store = Store::with_write_buffer(gate.clone(), None, 100);
        // 60 bytes: fits.
        store.submit_with_room(WriteRequest::new(vec![put(&[1; 30], &[0; 30])], false)).await;
        assert_eq!(store.write_buffer_used(), 60);
        // Another 60 do not fit while the first is not applied.
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move { store.submit_with_room(WriteRequest::new(vec![put(&[2; 30], &[0; 30])], false)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a writer went past a full write buffer");
        gate.open();
        tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        store.read_after_writes(|_| Ok(())).await.unwrap();
        assert_eq!(store.write_buffer_used(), 0, "applied writes give their room back");
        // A write larger than the whole buffer still goes through.
        store.submit_with_room(WriteRequest::new(vec![put(&[3; 300], b"")], false)).await;
        store.read_after_writes(|_| Ok(())).await.unwrap();
        store.close().unwrap();
    }

    #[tokio::test]
    async fn should_apply_a_request_atomically() {
        let store = Store::new(Arc::new(memory::MemoryEngine::new()), None);
        store.write(vec![put(b"a", b"1"), put(b"b", b"2"), Op::Delete(Cf::Messages, b"a".to_vec())], true).await.unwrap();
        let all = store.engine().scan(Cf::Messages, b"", b"\xff", 10).unwrap();
        assert_eq!(all, vec![(b"b".to_vec(), b"2".to_vec())]);
    }
}
