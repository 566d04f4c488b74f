//! Keys of the Raft column families: fixed-width big-endian, so that a
//! group's log is one contiguous range in index order.
//!
//! * `raft_log`: group id (8 bytes), index (8 bytes) -> entry.
//! * `raft_state`: group id (8 bytes), kind (1 byte) -> value.

use super::machine::GroupId;

/// The kinds of `raft_state` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StateKind {
    /// The vote (durable before openraft hears it is saved).
    Vote = 1,
    /// The last purged log id (entries up to it are deleted).
    Purged = 2,
    /// The last applied log id, written with the applied batch.
    Applied = 3,
    /// The last applied membership, written with the applied batch.
    Membership = 4,
    /// Present while a snapshot is being installed: a restart finds the
    /// group half installed and starts it over.
    Installing = 5,
}

pub fn log_key(group: GroupId, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn decode_log_key(key: &[u8]) -> Option<(GroupId, u64)> {
    let g: [u8; 8] = key.get(..8)?.try_into().ok()?;
    let i: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    (key.len() == 16).then(|| (u64::from_be_bytes(g), u64::from_be_bytes(i)))
}

/// Keys of `group`'s log entries with `from <= index < to` (`to` = `None`:
/// no upper bound).
pub fn log_range(group: GroupId, from: u64, to: Option<u64>) -> (Vec<u8>, Vec<u8>) {
    let end = match to {
        Some(to) => log_key(group, to),
        None => group_end(group),
    };
    (log_key(group, from), end)
}

/// A key greater than every key of `group` (in both families).
fn group_end(group: GroupId) -> Vec<u8> {
    let mut k = group.to_be_bytes().to_vec();
    k.extend_from_slice(&[0xff; 9]);
    k
}

pub fn state_key(group: GroupId, kind: StateKind) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(kind as u8);
    k
}

/// Every `raft_state` key of `group`.
pub fn state_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    (group.to_be_bytes().to_vec(), group_end(group))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Byte order of log keys is (group, index) order, and every key
        /// of a group falls inside the group's range.
        #[test]
        fn log_key_order_is_group_then_index(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            prop_assert_eq!(log_key(a.0, a.1).cmp(&log_key(b.0, b.1)), a.cmp(&b));
            prop_assert_eq!(decode_log_key(&log_key(a.0, a.1)), Some(a));
            let (from, to) = log_range(a.0, 0, None);
            let k = log_key(a.0, a.1);
            prop_assert!(from <= k && k < to);
            let (sf, st) = state_range(a.0);
            let s = state_key(a.0, StateKind::Applied);
            prop_assert!(sf <= s && s < st);
            if a.0 != b.0 {
                let other = log_key(b.0, b.1);
                prop_assert!(!(from <= other && other < to));
            }
        }
    }
}
