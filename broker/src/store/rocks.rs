//! The RocksDB [`Engine`]: one database per node, one column family per
//! [`Cf`], each tuned for its access pattern.

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions,
};

use super::{Cf, Engine, Op, Reader, StoreError};

/// Memory RocksDB may use, split between memtables and the block cache.
#[derive(Clone, Copy, Debug)]
pub struct RocksTuning {
    /// Shared block cache for reads.
    pub block_cache_bytes: usize,
    /// Memtable size of the messages column family.
    pub write_buffer_bytes: usize,
}

impl Default for RocksTuning {
    fn default() -> Self {
        RocksTuning { block_cache_bytes: 32 << 20, write_buffer_bytes: 32 << 20 }
    }
}

pub struct RocksEngine {
    db: DB,
    path: PathBuf,
}

fn io(e: rocksdb::Error) -> StoreError {
    StoreError::Io(e.into_string())
}

impl RocksEngine {
    /// Opens (or creates) the database under `path`. Transient pages left by
    /// an earlier run are discarded.
    pub fn open(path: &Path, tuning: RocksTuning) -> Result<RocksEngine, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Io(format!("cannot create data directory {}: {e}", path.display())))?;
        let cache = Cache::new_lru_cache(tuning.block_cache_bytes);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.increase_parallelism(2);
        // The WAL is shared by every column family; without a cap, a quiet
        // column family would pin old WAL files forever.
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_log_file_size(16 << 20);
        // Raft groups apply their entries without the WAL (the log is what
        // is durable). Every column family is flushed together, so that
        // what a crash leaves of those unlogged writes is one point in
        // time across all of them, never a newer state in one family and
        // an older one in another.
        db_opts.set_atomic_flush(true);
        let descriptors: Vec<ColumnFamilyDescriptor> =
            Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf, &cache, tuning))).collect();
        let mut db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(io)?;
        // Paged messages and transient delays / expiry entries do not
        // survive a restart: start empty.
        for cf in Cf::TRANSIENT {
            db.drop_cf(cf.name()).map_err(io)?;
            db.create_cf(cf.name(), &cf_options(cf, &cache, tuning)).map_err(io)?;
        }
        Ok(RocksEngine { db, path: path.to_path_buf() })
    }

    fn batch(&self, ops: &[Op]) -> Result<WriteBatch, StoreError> {
        // Sized up front: a batch of a thousand message bodies would
        // otherwise be copied again each time its buffer doubles.
        let bytes: usize = ops
            .iter()
            .map(|op| match op {
                Op::Put(_, k, v) | Op::Merge(_, k, v) | Op::DeleteRange(_, k, v) => k.len() + v.len() + 16,
                Op::Delete(_, k) => k.len() + 11,
            })
            .sum();
        let mut batch = WriteBatch::with_capacity_bytes(bytes + 12);
        for op in ops {
            match op {
                Op::Put(cf, k, v) => batch.put_cf(self.cf(*cf)?, k, v),
                Op::Delete(cf, k) => batch.delete_cf(self.cf(*cf)?, k),
                Op::Merge(cf, k, v) => batch.merge_cf(self.cf(*cf)?, k, v),
                Op::DeleteRange(cf, from, to) => batch.delete_range_cf(self.cf(*cf)?, from, to),
            }
        }
        Ok(batch)
    }

    fn cf(&self, cf: Cf) -> Result<&ColumnFamily, StoreError> {
        self.db.cf_handle(cf.name()).ok_or_else(|| StoreError::Io(format!("column family {} is missing", cf.name())))
    }
}

fn cf_options(cf: Cf, cache: &Cache, tuning: RocksTuning) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_block_size(16 << 10);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    match cf {
        Cf::Messages | Cf::Paged => {
            opts.set_write_buffer_size(tuning.write_buffer_bytes);
            opts.set_max_write_buffer_number(2);
            opts.set_compression_type(DBCompressionType::Lz4);
            opts.set_bottommost_compression_type(DBCompressionType::Zstd);
        }
        Cf::QueueState => {
            opts.set_write_buffer_size(4 << 20);
            opts.set_max_write_buffer_number(2);
            opts.set_merge_operator_associative(
                "warren-queue-counters",
                |_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands| {
                    Some(super::counters::merge_values(existing, operands.iter()))
                },
            );
        }
        Cf::RaftLog => {
            // Appended by every group, read back mostly from the tail while
            // replicating, deleted in ranges after snapshots: large
            // memtables so that most entries are purged before they reach
            // a table file.
            opts.set_write_buffer_size(tuning.write_buffer_bytes.max(16 << 20));
            opts.set_max_write_buffer_number(3);
            opts.set_compression_type(DBCompressionType::Lz4);
        }
        _ => {
            opts.set_write_buffer_size(4 << 20);
            opts.set_max_write_buffer_number(2);
            opts.set_compression_type(DBCompressionType::Lz4);
        }
    }
    opts
}

impl Reader for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(cf)?, key).map_err(io)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<super::KeyValue>, StoreError> {
        self.scan_opt(cf, from, to, limit, ReadOptions::default())
    }
}

impl RocksEngine {
    fn scan_opt(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize, mut ro: ReadOptions) -> Result<Vec<super::KeyValue>, StoreError> {
        let mut out = Vec::new();
        if from >= to || limit == 0 {
            return Ok(out);
        }
        ro.set_iterate_upper_bound(to.to_vec());
        // Scans of a queue's backlog read each block once: keep them from
        // evicting the hot blocks.
        ro.fill_cache(false);
        for item in self.db.iterator_cf_opt(self.cf(cf)?, ro, IteratorMode::From(from, Direction::Forward)) {
            let (k, v) = item.map_err(io)?;
            out.push((k.into_vec(), v.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// A consistent view of the database: reads through one RocksDB snapshot.
struct RocksView<'a> {
    engine: &'a RocksEngine,
    snapshot: rocksdb::Snapshot<'a>,
}

impl Reader for RocksView<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.snapshot.get_cf(self.engine.cf(cf)?, key).map_err(io)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<super::KeyValue>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snapshot);
        self.engine.scan_opt(cf, from, to, limit, ro)
    }
}

impl Engine for RocksEngine {
    fn write(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        let batch = self.batch(ops)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(io)
    }

    fn write_unlogged(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(self.batch(ops)?, &wo).map_err(io)
    }

    fn disk_usage(&self) -> u64 {
        dir_size(&self.path)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(io)?;
        let handles: Vec<&ColumnFamily> = Cf::ALL.iter().filter_map(|cf| self.db.cf_handle(cf.name())).collect();
        self.db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default()).map_err(io)
    }

    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<super::KeyValue>, StoreError> {
        if from >= to {
            return Ok(None);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from.to_vec());
        ro.set_iterate_upper_bound(to.to_vec());
        let mut it = self.db.iterator_cf_opt(self.cf(cf)?, ro, IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (k, v) = item.map_err(io)?;
                Ok(Some((k.into_vec(), v.into_vec())))
            }
            None => Ok(None),
        }
    }

    fn with_view(&self, read: &mut dyn FnMut(&dyn Reader) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let view = RocksView { engine: self, snapshot: self.db.snapshot() };
        read(&view)
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_persist_across_reopen_and_drop_pages() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = RocksEngine::open(dir.path(), RocksTuning::default()).unwrap();
            e.write(
                &[
                    Op::Put(Cf::Messages, b"m1".to_vec(), b"v1".to_vec()),
                    Op::Put(Cf::Paged, b"p1".to_vec(), b"v2".to_vec()),
                    Op::Put(Cf::Meta, b"x".to_vec(), b"y".to_vec()),
                ],
                true,
            )
            .unwrap();
        }
        let e = RocksEngine::open(dir.path(), RocksTuning::default()).unwrap();
        assert_eq!(e.get(Cf::Messages, b"m1").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(e.get(Cf::Meta, b"x").unwrap(), Some(b"y".to_vec()));
        assert_eq!(e.get(Cf::Paged, b"p1").unwrap(), None);
    }

    #[test]
    fn should_merge_queue_counters_across_batches_and_reopen() {
        use super::super::counters::QueueCounters;
        let dir = tempfile::tempdir().unwrap();
        let delta = |m, b, s| QueueCounters { messages: m, bytes: b, max_seq: s, delayed: 0 }.encode();
        {
            let e = RocksEngine::open(dir.path(), RocksTuning::default()).unwrap();
            e.write(&[Op::Merge(Cf::QueueState, b"q".to_vec(), delta(3, 30, 7))], true).unwrap();
            e.write(&[Op::Merge(Cf::QueueState, b"q".to_vec(), delta(-1, -10, 5))], true).unwrap();
        }
        let e = RocksEngine::open(dir.path(), RocksTuning::default()).unwrap();
        let v = e.get(Cf::QueueState, b"q").unwrap().unwrap();
        assert_eq!(QueueCounters::decode(&v), Some(QueueCounters { messages: 2, bytes: 20, max_seq: 7, delayed: 0 }));
    }

    #[test]
    fn should_scan_within_bounds_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), RocksTuning::default()).unwrap();
        let ops: Vec<Op> = [3u8, 1, 2, 9].iter().map(|i| Op::Put(Cf::Messages, vec![*i], vec![*i])).collect();
        e.write(&ops, false).unwrap();
        let got: Vec<u8> = e.scan(Cf::Messages, &[1], &[9], 10).unwrap().into_iter().map(|(k, _)| k[0]).collect();
        assert_eq!(got, vec![1, 2, 3]);
        let got = e.scan(Cf::Messages, &[1], &[9], 2).unwrap();
        assert_eq!(got.len(), 2);
        e.write(&[Op::DeleteRange(Cf::Messages, vec![2], vec![4])], false).unwrap();
        let got: Vec<u8> = e.scan(Cf::Messages, &[0], &[255], 10).unwrap().into_iter().map(|(k, _)| k[0]).collect();
        assert_eq!(got, vec![1, 9]);
    }
}
