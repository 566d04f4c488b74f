//! An in-memory [`Engine`] for tests: ordered maps under one lock, so a
//! batch is atomic just as in RocksDB.

use std::collections::BTreeMap;

use parking_lot::RwLock;

use super::{Cf, Engine, Op, StoreError};

#[derive(Default)]
pub struct MemoryEngine {
    cfs: RwLock<Vec<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemoryEngine {
    pub fn new() -> Self {
        MemoryEngine { cfs: RwLock::new(vec![BTreeMap::new(); Cf::ALL.len()]) }
    }
}

impl Engine for MemoryEngine {
    fn write(&self, ops: &[Op], _sync: bool) -> Result<(), StoreError> {
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

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.cfs.read()[cf.index()].get(key).cloned())
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<super::KeyValue>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self.cfs.read()[cf.index()].range(from.to_vec()..to.to_vec()).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn disk_usage(&self) -> u64 {
        0
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
