//! An in-memory [`Engine`] for tests: ordered maps under one lock, so a
//! batch is atomic just as in RocksDB.
//!
//! It can fail on demand (the next N writes or reads, or every write a rule
//! picks), so that tests can show what the broker does when storage fails:
//! a failed write applies nothing, as a failed RocksDB batch.

use std::collections::BTreeMap;

use parking_lot::{Mutex, RwLock};

use super::{Cf, Engine, Op, Reader, StoreError};

type Data = Vec<BTreeMap<Vec<u8>, Vec<u8>>>;

/// A rule that picks the writes to fail.
pub type FaultRule = Box<dyn Fn(&[Op]) -> bool + Send + Sync>;

#[derive(Default)]
struct Faults {
    fail_writes: u64,
    fail_reads: u64,
    rule: Option<FaultRule>,
    failed_writes: u64,
}

#[derive(Default)]
pub struct MemoryEngine {
    cfs: RwLock<Data>,
    faults: Mutex<Faults>,
}

impl MemoryEngine {
    pub fn new() -> Self {
        MemoryEngine { cfs: RwLock::new(vec![BTreeMap::new(); Cf::ALL.len()]), faults: Mutex::default() }
    }

    /// A copy of the data as it is now (no faults).
    pub fn snapshot(&self) -> MemoryEngine {
        MemoryEngine { cfs: RwLock::new(self.cfs.read().clone()), faults: Mutex::default() }
    }

    /// The next `n` writes fail (and apply nothing).
    pub fn fail_next_writes(&self, n: u64) {
        self.faults.lock().fail_writes = n;
    }

    /// The next `n` reads (gets and scans) fail.
    pub fn fail_next_reads(&self, n: u64) {
        self.faults.lock().fail_reads = n;
    }

    /// Every write for which `rule` says true fails, until [`Self::heal`].
    pub fn fail_writes_when(&self, rule: impl Fn(&[Op]) -> bool + Send + Sync + 'static) {
        self.faults.lock().rule = Some(Box::new(rule));
    }

    /// No more injected faults.
    pub fn heal(&self) {
        let mut f = self.faults.lock();
        f.fail_writes = 0;
        f.fail_reads = 0;
        f.rule = None;
    }

    /// Writes failed by injection so far.
    pub fn failed_writes(&self) -> u64 {
        self.faults.lock().failed_writes
    }

    fn read_fault(&self) -> Result<(), StoreError> {
        let mut f = self.faults.lock();
        if f.fail_reads > 0 {
            f.fail_reads -= 1;
            return Err(StoreError::Io("injected read failure".into()));
        }
        Ok(())
    }
}

impl Reader for MemoryEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_fault()?;
        Ok(self.cfs.read()[cf.index()].get(key).cloned())
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<super::KeyValue>, StoreError> {
        self.read_fault()?;
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self.cfs.read()[cf.index()].range(from.to_vec()..to.to_vec()).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

impl Engine for MemoryEngine {
    fn write(&self, ops: &[Op], _sync: bool) -> Result<(), StoreError> {
        {
            let mut f = self.faults.lock();
            let fail = if f.fail_writes > 0 {
                f.fail_writes -= 1;
                true
            } else {
                f.rule.as_ref().is_some_and(|rule| rule(ops))
            };
            if fail {
                f.failed_writes += 1;
                return Err(StoreError::Io("injected write failure".into()));
            }
        }
        let mut cfs = self.cfs.write();
        for op in ops {
            match op {
                Op::Put(cf, k, v) => {
                    cfs[cf.index()].insert(k.clone(), v.clone());
                }
                Op::Delete(cf, k) => {
                    cfs[cf.index()].remove(k);
                }
                Op::Merge(cf, k, v) => {
                    let map = &mut cfs[cf.index()];
                    let merged = super::counters::merge_values(map.get(k).map(Vec::as_slice), std::iter::once(v.as_slice()));
                    map.insert(k.clone(), merged);
                }
                Op::DeleteRange(cf, from, to) => {
                    if from < to {
                        let map = &mut cfs[cf.index()];
                        let doomed: Vec<Vec<u8>> = map.range(from.clone()..to.clone()).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            map.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn disk_usage(&self) -> u64 {
        0
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<super::KeyValue>, StoreError> {
        self.read_fault()?;
        if from >= to {
            return Ok(None);
        }
        Ok(self.cfs.read()[cf.index()].range(from.to_vec()..to.to_vec()).next_back().map(|(k, v)| (k.clone(), v.clone())))
    }

    fn with_view(&self, read: &mut dyn FnMut(&dyn Reader) -> Result<(), StoreError>) -> Result<(), StoreError> {
        read(&self.snapshot())
    }
}
