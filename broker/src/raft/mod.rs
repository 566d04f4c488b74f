//! Raft for Warren: many groups per node over one store and one connection
//! per peer. The only module that knows openraft (see
//! `docs/replication.md`).
//!
//! * [`machine`]: the contract with what a group replicates
//!   ([`GroupMachine`]); nothing in it names openraft.
//! * [`RaftHost`]: the groups of one node — start and stop them, propose,
//!   watch leadership, change membership, transfer leadership.
//! * Underneath: the log and vote on the store with the shared group
//!   commit ([`log_store`]), the state machine adapter with streamed
//!   snapshots ([`state_machine`], [`snapshot`]), and the network adapter
//!   over `cluster/` ([`network`]).

mod host;
pub mod keys;
pub mod log_store;
pub mod machine;
pub mod network;
mod quiet;
pub mod snapshot;
pub mod state_machine;
pub mod types;

pub use host::{Bootstrap, GroupError, GroupStatus, Lag, LeaderInfo, ProposeError, RaftHost, RaftOptions, Role};
pub use machine::{Applied, GroupId, GroupMachine, LocalReply, NodeId};
pub use types::{decode, encode};

#[cfg(test)]
mod tests;
