//! Raft for Warren: many groups per node over one store and one connection
//! per peer. The only module that knows openraft (see
//! `docs/replication.md`).

pub mod machine;

pub use machine::{Applied, GroupId, GroupMachine, LocalReply, NodeId};
