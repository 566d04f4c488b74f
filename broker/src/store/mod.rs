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

pub mod counters;
pub mod keys;
pub mod memory;
pub mod rocks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

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
}

impl Cf {
    pub const ALL: [Cf; 10] = [
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
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// An ordered key-value store with column families.
pub trait Engine: Send + Sync + 'static {
    /// Applies `ops` atomically; durable on return when `sync`.
    fn write(&self, ops: &[Op], sync: bool) -> Result<(), StoreError>;
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries with `from <= key < to`, in key order.
    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError>;
    /// Bytes used on disk (0 for memory).
    fn disk_usage(&self) -> u64;
    /// Persists memory tables so that the next start need not replay the WAL.
    fn flush(&self) -> Result<(), StoreError>;
}

/// A write: its ops, whether it must be synced, and what to run once it is
/// durable.
pub struct WriteRequest {
    pub ops: Vec<Op>,
    pub sync: bool,
    pub done: Option<Completion>,
}

pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

enum Request {
    Write(WriteRequest),
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
}

/// Most bytes merged into one batch; the rest wait for the next.
const MAX_BATCH_BYTES: usize = 8 << 20;

impl Store {
    pub fn new(engine: Arc<dyn Engine>, observer: Option<BatchObserver>) -> Store {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let writer = {
            let engine = engine.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("warren-store-writer".into())
                .spawn(move || writer_loop(engine, rx, stats, observer))
                .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))
        };
        let writer = match writer {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(error = %e, "store writer unavailable");
                None
            }
        };
        Store { engine, tx, stats, writer: Arc::new(Mutex::new(writer)) }
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// Queues a write. Its completion (if any) runs on the writer thread once
    /// the batch holding it is applied (and synced when `sync`); keep it short.
    pub fn submit(&self, req: WriteRequest) {
        if let Err(mpsc::SendError(Request::Write(req))) = self.tx.send(Request::Write(req))
            && let Some(done) = req.done
        {
            done(Err(StoreError::Closed));
        }
    }

    /// Writes and waits until durable.
    pub async fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(WriteRequest {
            ops,
            sync,
            done: Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        });
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

fn writer_loop(engine: Arc<dyn Engine>, rx: mpsc::Receiver<Request>, stats: Arc<WriterStats>, observer: Option<BatchObserver>) {
    let mut ops: Vec<Op> = Vec::new();
    let mut dones: Vec<Completion> = Vec::new();
    let mut sync = false;
    let mut requests = 0usize;
    let mut bytes = 0usize;
    let flush = |ops: &mut Vec<Op>, dones: &mut Vec<Completion>, sync: &mut bool, requests: &mut usize, bytes: &mut usize| {
        if *requests == 0 {
            return;
        }
        let started = Instant::now();
        let result = if ops.is_empty() { Ok(()) } else { engine.write(ops, *sync) };
        let took = started.elapsed();
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = ops.len(), "store write failed");
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        if *sync {
            stats.synced_batches.fetch_add(1, Ordering::Relaxed);
        }
        stats.requests.fetch_add(*requests as u64, Ordering::Relaxed);
        stats.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(*bytes as u64, Ordering::Relaxed);
        stats.sync_nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        if let Some(obs) = &observer {
            obs(*requests, *sync, took);
        }
        for done in dones.drain(..) {
            done(result.clone());
        }
        ops.clear();
        *sync = false;
        *requests = 0;
        *bytes = 0;
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Write(w) => {
                    requests += 1;
                    sync |= w.sync;
                    bytes += w.ops.iter().map(Op::approx_bytes).sum::<usize>();
                    ops.extend(w.ops);
                    if let Some(d) = w.done {
                        dones.push(d);
                    }
                    if bytes >= MAX_BATCH_BYTES {
                        flush(&mut ops, &mut dones, &mut sync, &mut requests, &mut bytes);
                    }
                }
                Request::After(f) => {
                    flush(&mut ops, &mut dones, &mut sync, &mut requests, &mut bytes);
                    f();
                }
                Request::Stop => {
                    flush(&mut ops, &mut dones, &mut sync, &mut requests, &mut bytes);
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        flush(&mut ops, &mut dones, &mut sync, &mut requests, &mut bytes);
    }
    flush(&mut ops, &mut dones, &mut sync, &mut requests, &mut bytes);
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
            store.submit(WriteRequest {
                ops: vec![put(b"k", &[i])],
                sync: i % 2 == 0,
                done: Some(Box::new(move |r| {
                    assert!(r.is_ok());
                    done.fetch_add(1, Ordering::SeqCst);
                })),
            });
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
    async fn should_apply_a_request_atomically() {
        let store = Store::new(Arc::new(memory::MemoryEngine::new()), None);
        store.write(vec![put(b"a", b"1"), put(b"b", b"2"), Op::Delete(Cf::Messages, b"a".to_vec())], true).await.unwrap();
        let all = store.engine().scan(Cf::Messages, b"", b"\xff", 10).unwrap();
        assert_eq!(all, vec![(b"b".to_vec(), b"2".to_vec())]);
    }
}
