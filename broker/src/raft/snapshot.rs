//! Snapshot files: a group's state as a stream of records, never whole in
//! memory.
//!
//! Layout: the magic `WRNSNAP1`, the metadata (a `u32` length, then the
//! encoded [`SnapshotMeta`]), then records — column family (one byte, its
//! [`Cf::index`]), key length (`u32`), key, value length (`u32`), value —
//! and an end marker (`0xff`) followed by the record count (`u64`). All
//! integers are big-endian.
//!
//! A snapshot is written from one consistent store view (so the records
//! and the applied log id in its metadata agree), to a temporary name, then
//! synced and renamed: a file under its final name is always complete.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::types::{SnapshotMeta, decode, encode, io_error};
use crate::store::{Cf, Reader};

const MAGIC: &[u8; 8] = b"WRNSNAP1";
const END: u8 = 0xff;
/// Records read from the store per scan while writing a snapshot.
const SCAN_CHUNK: usize = 1024;
/// Largest key or value accepted when reading a snapshot.
const MAX_FIELD: u32 = 1 << 30;

/// A snapshot file: what openraft hands between the state machine and the
/// network.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// Writes the records of `ranges` read from `view`, with `meta`, to
/// `path`. Returns the number of records.
pub fn write(path: &Path, meta: &SnapshotMeta, view: &dyn Reader, ranges: &[(Cf, Vec<u8>, Vec<u8>)]) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    out.write_all(MAGIC)?;
    let meta_bytes = encode(meta);
    out.write_all(&(meta_bytes.len() as u32).to_be_bytes())?;
    out.write_all(&meta_bytes)?;
    let mut count = 0u64;
    for (cf, from, to) in ranges {
        let mut cursor = from.clone();
        loop {
            let chunk = view.scan(*cf, &cursor, to, SCAN_CHUNK).map_err(io_error)?;
            let n = chunk.len();
            for (k, v) in &chunk {
                out.write_all(&[cf.index() as u8])?;
                out.write_all(&(k.len() as u32).to_be_bytes())?;
                out.write_all(k)?;
                out.write_all(&(v.len() as u32).to_be_bytes())?;
                out.write_all(v)?;
                count += 1;
            }
            match chunk.last() {
                Some((k, _)) if n == SCAN_CHUNK => {
                    cursor = k.clone();
                    cursor.push(0);
                }
                _ => break,
            }
        }
    }
    out.write_all(&[END])?;
    out.write_all(&count.to_be_bytes())?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(count)
}

/// One record: column family, key, value.
pub type Record = (Cf, Vec<u8>, Vec<u8>);

/// Reads a snapshot file record by record.
pub struct SnapshotReader {
    input: BufReader<File>,
    meta: SnapshotMeta,
    read: u64,
    done: bool,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_field(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = read_u32(r)?;
    if len > MAX_FIELD {
        return Err(io_error(format!("snapshot record field of {len} bytes")));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

impl SnapshotReader {
    pub fn open(path: &Path) -> io::Result<SnapshotReader> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(io_error(format!("{} is not a Warren snapshot", path.display())));
        }
        let meta = read_field(&mut input)?;
        let meta = decode(&meta).map_err(io_error)?;
        Ok(SnapshotReader { input, meta, read: 0, done: false })
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// The next record, or `None` after the last (checking the count).
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.input.read_exact(&mut tag)?;
        if tag[0] == END {
            let mut b = [0u8; 8];
            self.input.read_exact(&mut b)?;
            let count = u64::from_be_bytes(b);
            if count != self.read {
                return Err(io_error(format!("snapshot holds {} records, its trailer says {count}", self.read)));
            }
            self.done = true;
            return Ok(None);
        }
        let cf = *Cf::ALL.get(tag[0] as usize).ok_or_else(|| io_error(format!("snapshot record of unknown column family {}", tag[0])))?;
        let k = read_field(&mut self.input)?;
        let v = read_field(&mut self.input)?;
        self.read += 1;
        Ok(Some((cf, k, v)))
    }
}

/// Reads only the metadata of a snapshot file.
pub fn read_meta(path: &Path) -> io::Result<SnapshotMeta> {
    Ok(SnapshotReader::open(path)?.meta)
}
