//! openraft's type configuration for Warren: what an entry carries, what a
//! local proposer gets back.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use super::machine::LocalReply;

/// The application data of a normal entry: the leader's clock when it
/// proposed it, and the command, opaque to this layer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub now_ms: u64,
    #[serde(with = "as_bytes")]
    pub data: Vec<u8>,
}

/// A byte vector (de)serialized as bytes rather than as a sequence of
/// numbers: with bincode the encoding is the same (a u64 length, then the
/// bytes), but it is written and read as one copy instead of byte by byte,
/// which was a tenth of the brokers' CPU in a 3-node quorum queue bench
/// (every entry is encoded for the log and for each follower, and decoded
/// on each follower).
mod as_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }

            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }

            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Bounded by the input: each element is read from it.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

impl fmt::Debug for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proposal(now_ms={}, {} bytes)", self.now_ms, self.data.len())
    }
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What applying an entry returned, carried to a proposer on the same
/// node only: it is never serialized (it serializes as nothing and
/// deserializes as `None`).
#[derive(Default)]
pub struct Reply(pub LocalReply);

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Reply(Some)" } else { "Reply(None)" })
    }
}

impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d)?;
        Ok(Reply(None))
    }
}

openraft::declare_raft_types!(
    /// Warren's Raft types: u64 node ids, no per-node payload in the
    /// membership (addresses come from the cluster configuration).
    ///
    /// Standard Raft leader ids (one leader per term), not openraft's
    /// default "advanced" ones, which order leaders of one term by node id:
    /// with those, a node that starts late (or with an empty disk) and
    /// stands for election in the current term outranks the leader elected
    /// in it, and the leader steps down as soon as the newcomer answers its
    /// first append. A healthy leader then loses its queue for an election
    /// for nothing (consumers cancelled, publishes waiting). With standard
    /// ids, a vote granted by a quorum outranks any ungranted vote of the
    /// same term, and pre-vote keeps the newcomer from raising the term.
    pub TypeConfig:
        D = Proposal,
        R = Reply,
        NodeId = u64,
        Node = (),
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachine>;

/// Encodes a value for the store or the wire.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these types into a vector cannot fail (no maps with
    // non-string keys issue in bincode, no I/O).
    bincode::serialize(value).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    bincode::deserialize(bytes).map_err(|e| e.to_string())
}

/// Reads one length-prefixed value written by [`encode`] from a reader.
pub fn decode_from<T: for<'de> Deserialize<'de>>(r: &mut Cursor<&[u8]>) -> Result<T, String> {
    bincode::deserialize_from(r).map_err(|e| e.to_string())
}

/// An I/O error for openraft from anything printable.
pub fn io_error(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry as it was encoded before: the command as a sequence of
    /// numbers.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct SeqProposal {
        now_ms: u64,
        data: Vec<u8>,
    }

    #[test]
    fn should_encode_a_proposal_as_logs_written_before_encoded_it() {
        for data in [Vec::new(), vec![0u8], (0..=255u8).cycle().take(5000).collect::<Vec<u8>>()] {
            let new = Proposal { now_ms: 1_733_000_000_123, data: data.clone() };
            let old = SeqProposal { now_ms: new.now_ms, data };
            let bytes = encode(&new);
            assert_eq!(bytes, encode(&old), "same bytes on disk and on the wire");
            assert_eq!(decode::<Proposal>(&encode(&old)).unwrap(), new, "an old entry reads as it was");
            assert_eq!(decode::<SeqProposal>(&bytes).unwrap(), old, "a new entry reads with the old code");
        }
        // A length beyond the input fails, without allocating it.
        let mut bad = encode(&Proposal { now_ms: 1, data: vec![1, 2, 3] });
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Proposal>(&bad).is_err());
    }
}
