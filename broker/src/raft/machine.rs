//! The contract between the Raft glue and what a group replicates (a queue,
//! the metadata). Nothing here names openraft: the glue adapts openraft's
//! state-machine API to [`GroupMachine`], and the machines know only this.
//!
//! # Invariants a machine keeps
//!
//! * **Deterministic.** `apply` is a function of (the machine's state, the
//!   store as earlier entries left it, the entry). Time comes only from
//!   [`Applied::now_ms`]; no randomness, no node-local facts (which node
//!   leads, channel capacities, the wall clock).
//! * **Everything it needs to resume is in the store.** After a restart, or
//!   after a snapshot is installed, [`GroupMachine::restore`] rebuilds the
//!   machine's memory from its store ranges alone and the result equals the
//!   memory of a replica that never stopped (windows and caches aside).
//! * **Reads see earlier writes.** Reads during `apply` go through the
//!   [`crate::store::overlay::Overlay`], which shows the store plus every
//!   write made so far in this apply batch. The glue writes the overlay's
//!   ops and the applied index in one batch when the apply batch ends, so a
//!   crash never leaves an entry half applied.
//! * **No outward effects.** `apply` returns what happened
//!   ([`LocalReply`] for a proposer on this node, and machine-specific
//!   events); the layer above decides, on the leader only, what the outside
//!   world sees.

use crate::store::Cf;
use crate::store::overlay::Overlay;

/// A group: 0 is the metadata group; a queue's group has the queue's id.
pub type GroupId = u64;

/// A node of the cluster.
pub type NodeId = u64;

/// One committed entry as a machine sees it.
#[derive(Clone, Copy, Debug)]
pub struct Applied<'a> {
    /// Its log index (unique and increasing within the group).
    pub index: u64,
    /// The term of the leader that proposed it.
    pub term: u64,
    /// The proposing leader's clock when it proposed the entry. (Only
    /// entries proposed through `RaftHost::propose` reach a machine: Raft's
    /// own blank and membership entries carry no time — openraft creates
    /// the first membership entry on every node at once, so a clock stamp
    /// would differ between replicas — and are not shown to it.)
    pub now_ms: u64,
    /// The command, encoded by the machine's layer.
    pub data: &'a [u8],
}

/// What applying an entry produced for the proposer, if it is on this node.
/// Never serialized: it only travels back to a local `propose` call.
pub type LocalReply = Option<Box<dyn std::any::Any + Send + Sync>>;

/// The application side of one Raft group.
pub trait GroupMachine: Send + 'static {
    /// Applies one committed entry: reads and writes go through `store`.
    /// An error is a storage failure: the group cannot go on applying (the
    /// glue stops it; it restarts from the store).
    fn apply(&mut self, entry: &Applied<'_>, store: &mut Overlay<'_>) -> Result<LocalReply, crate::store::StoreError>;

    /// Rebuilds the machine's memory from its store ranges (at start, and
    /// after a snapshot was installed into them).
    fn restore(&mut self, store: &dyn crate::store::Reader) -> Result<(), crate::store::StoreError>;

    /// The store key ranges `[from, to)` that hold the group's state: a
    /// snapshot is these ranges, read from one consistent store snapshot;
    /// installing one clears them and writes the snapshot's records.
    fn ranges(&self) -> Vec<(Cf, Vec<u8>, Vec<u8>)>;

    /// Whether the glue may write what `apply` produced without the
    /// store's write-ahead log. The log is durable, so a crash then costs
    /// only re-applying the entries since the store's last flush (the
    /// glue flushes before a snapshot, and so before the log is purged);
    /// a machine whose state must be current at start-up, before its
    /// group runs, says no.
    fn apply_unlogged(&self) -> bool {
        false
    }

    /// Counts the messages a command carries, for replica lag in messages
    /// (called on every entry appended: cheap, and never fails; bytes it
    /// cannot read count 0).
    fn weigher(&self) -> fn(&[u8]) -> u64 {
        |_| 0
    }
}
