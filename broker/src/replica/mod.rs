//! Replicated (quorum) queues: a queue's commands as a Raft log, applied to
//! the same [`crate::queue::state::QueueState`] on every replica; outward
//! effects on the leader only. See `docs/replication.md`.

pub mod machine;
pub mod meta;
pub mod ops;
pub mod quorum;
pub mod rebalance;

pub use machine::{QueueMachine, QueueReply, ReplicaEvent};
