//! The store's group commit: synced 1 KiB writes through the writer thread
//! into RocksDB, with 1, 16 and 256 writes outstanding. One outstanding
//! write costs one fsync; with many outstanding the writer merges them into
//! one batch and one fsync, which is what persistent publishing relies on.
//!
//! `cargo bench -p warren-broker --bench group_commit`

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use warren_broker::store::rocks::{RocksEngine, RocksTuning};
use warren_broker::store::{Cf, Op, Store, WriteRequest};

fn bench_group_commit(c: &mut Criterion) {
    let dir = tempfile::Builder::new().prefix("warren-bench-store-").tempdir().expect("temp dir");
    let engine = RocksEngine::open(dir.path(), RocksTuning::default()).expect("open RocksDB");
    let store = Store::new(Arc::new(engine), None);
    let body = vec![7u8; 1024];
    let mut key: u64 = 0;
    let mut g = c.benchmark_group("group_commit_sync_1k");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for outstanding in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(outstanding as u64));
        g.bench_function(format!("{outstanding}_outstanding"), |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    let (tx, rx) = mpsc::channel();
                    for _ in 0..outstanding {
                        key += 1;
                        let tx = tx.clone();
                        store.submit(
                            WriteRequest::new(vec![Op::Put(Cf::Messages, key.to_be_bytes().to_vec(), body.clone())], true).on_done(
                                move |r| {
                                    let _ = tx.send(r.is_ok());
                                },
                            ),
                        );
                    }
                    drop(tx);
                    assert!(rx.iter().take(outstanding).all(|ok| ok), "a write failed");
                }
                started.elapsed()
            })
        });
    }
    g.finish();
    let stats = store.stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed).max(1);
    let requests = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("writer: {requests} requests in {batches} batches ({:.1} per batch)", requests as f64 / batches as f64);
    store.close().expect("close");
}

criterion_group!(benches, bench_group_commit);
criterion_main!(benches);
