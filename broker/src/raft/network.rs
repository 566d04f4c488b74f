//! openraft's network over `cluster/`: every group's messages to a peer go
//! through the node's one connection to it.
//!
//! * Append, vote, pre-vote and leadership transfer are unary calls of kind
//!   [`RAFT_CALL`]; the body is the group id and the request, encoded with
//!   bincode.
//! * A snapshot is a stream of kind [`RAFT_SNAPSHOT`]: a header (group,
//!   vote, metadata), then the file in chunks; the receiver writes the
//!   chunks to a file and installs it, then answers with one frame. Memory
//!   on both sides is bounded by the stream's buffer, whatever the size of
//!   the snapshot.
//! * An append larger than the message limit is cut: the prefix that fits
//!   is sent and openraft hears `PartialSuccess`, then sends the rest.

use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use openraft::OptionalSend;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::machine::GroupId;
use super::snapshot::SnapshotFile;
use super::types::{SnapshotMeta, TypeConfig, Vote, decode, encode};
use crate::cluster::{CallError, Cluster, NodeId};

pub const RAFT_CALL: &str = "raft";
pub const RAFT_SNAPSHOT: &str = "raft.snapshot";

/// Bytes of a snapshot file per stream frame.
pub const SNAPSHOT_CHUNK: usize = 256 << 10;
/// How long one snapshot frame may wait for the receiver.
const SNAPSHOT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the receiver may take to install a snapshot once received.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
pub enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// Not openraft's: a quiet follower asked to vote asks its leader to
    /// wake the group and renew its lease first (see `quiet.rs`).
    Wake,
}

#[derive(Serialize, Deserialize)]
pub enum RpcReply {
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    Woken,
}

/// Raft messages a node sent, by kind (every group together).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Appends that carried entries.
    pub appends: AtomicU64,
    /// Appends without entries: heartbeats (and commit-index updates).
    pub heartbeats: AtomicU64,
    /// Votes and pre-votes.
    pub votes: AtomicU64,
}

impl NetStats {
    /// Every Raft message sent so far.
    pub fn total(&self) -> u64 {
        self.appends.load(Ordering::Relaxed) + self.heartbeats.load(Ordering::Relaxed) + self.votes.load(Ordering::Relaxed)
    }
}

/// The first frame of a snapshot stream.
#[derive(Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub group: GroupId,
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub bytes: u64,
}

/// Makes the clients of one group.
pub struct NetworkFactory {
    pub(super) cluster: Cluster,
    pub(super) group: GroupId,
    pub(super) max_append_bytes: usize,
    pub(super) stats: Arc<NetStats>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, _node: &()) -> Network {
        Network {
            cluster: self.cluster.clone(),
            group: self.group,
            target,
            max_append_bytes: self.max_append_bytes,
            stats: self.stats.clone(),
        }
    }
}

/// One group's messages to one peer.
pub struct Network {
    cluster: Cluster,
    group: GroupId,
    target: NodeId,
    max_append_bytes: usize,
    stats: Arc<NetStats>,
}

fn rpc_error(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::Unreachable { .. } | CallError::UnknownNode(_) | CallError::NoHandler { .. } | CallError::Closed => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl Network {
    async fn send(&self, rpc: Rpc, option: &RPCOption) -> Result<RpcReply, RPCError<TypeConfig>> {
        let urgent = matches!(rpc, Rpc::Vote(_) | Rpc::PreVote(_) | Rpc::TransferLeader(_));
        let counter = match &rpc {
            Rpc::Append(r) if r.entries.is_empty() => &self.stats.heartbeats,
            Rpc::Append(_) => &self.stats.appends,
            Rpc::Vote(_) | Rpc::PreVote(_) => &self.stats.votes,
            Rpc::TransferLeader(_) | Rpc::Wake => &self.stats.votes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let body = Bytes::from(encode(&(self.group, rpc)));
        let timeout = option.hard_ttl().max(Duration::from_millis(100));
        let reply = if urgent {
            self.cluster.call_urgent(self.target, RAFT_CALL, body, timeout).await
        } else {
            self.cluster.call_with_timeout(self.target, RAFT_CALL, body, timeout).await
        }
        .map_err(rpc_error)?;
        let reply: Result<RpcReply, String> = decode(&reply).map_err(|e| rpc_error(CallError::Remote(e)))?;
        // The group is not running there (not created yet, or stopping):
        // openraft retries later.
        reply.map_err(|e| rpc_error(CallError::Unreachable { node: self.target, detail: e }))
    }

    fn unexpected(&self) -> RPCError<TypeConfig> {
        rpc_error(CallError::Remote(format!("node {} answered a different kind of Raft message", self.target)))
    }
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Cut what does not fit in one message; the first entry always goes.
        let mut size = 0usize;
        let mut keep = rpc.entries.len();
        for (i, e) in rpc.entries.iter().enumerate() {
            size += bincode::serialized_size(e).unwrap_or(0) as usize;
            if i > 0 && size > self.max_append_bytes {
                keep = i;
                break;
            }
        }
        let cut = keep < rpc.entries.len();
        if cut {
            rpc.entries.truncate(keep);
        }
        let last = rpc.entries.last().map(|e| e.log_id);
        match self.send(Rpc::Append(rpc), &option).await? {
            RpcReply::Append(AppendEntriesResponse::Success) if cut => Ok(AppendEntriesResponse::PartialSuccess(last)),
            RpcReply::Append(r) => Ok(r),
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.send(Rpc::Vote(rpc), &option).await? {
            RpcReply::Vote(r) => Ok(r),
            _ => Err(self.unexpected()),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.send(Rpc::PreVote(rpc), &option).await? {
            RpcReply::Vote(r) => Ok(r),
            _ => Err(self.unexpected()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.send(Rpc::TransferLeader(req), &option).await? {
            RpcReply::TransferLeader(r) => Ok(r),
            _ => Err(self.unexpected()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let send = send_snapshot(self.cluster.clone(), self.target, self.group, vote, snapshot);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r,
        }
    }
}

fn streaming_error(e: CallError) -> StreamingError<TypeConfig> {
    match rpc_error(e) {
        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
        RPCError::Network(n) => StreamingError::Network(n),
        other => StreamingError::Network(NetworkError::new(&other)),
    }
}

async fn send_snapshot(
    cluster: Cluster,
    target: NodeId,
    group: GroupId,
    vote: Vote,
    snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>,
) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
    let path = snapshot.snapshot.path.clone();
    let bytes = std::fs::metadata(&path).map(|m| m.len()).map_err(|e| streaming_error(CallError::Remote(e.to_string())))?;
    tracing::info!(group, target, bytes, last_log_id = ?snapshot.meta.last_log_id, "sending a snapshot");
    let mut duplex = cluster.open_stream(target, RAFT_SNAPSHOT).await.map_err(streaming_error)?;
    let header = SnapshotHeader { group, vote, meta: snapshot.meta, bytes };
    let send = |tx: &tokio::sync::mpsc::Sender<Bytes>, frame: Bytes| {
        let tx = tx.clone();
        async move {
            match tokio::time::timeout(SNAPSHOT_FRAME_TIMEOUT, tx.send(frame)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(streaming_error(CallError::Unreachable { node: target, detail: "snapshot stream closed".into() })),
                Err(_) => Err(streaming_error(CallError::Timeout { node: target, timeout: SNAPSHOT_FRAME_TIMEOUT })),
            }
        }
    };
    send(&duplex.tx, Bytes::from(encode(&header))).await?;
    // The file is read on a blocking thread, one chunk at a time; the
    // bounded stream holds back the reader when the receiver is slow.
    let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
    let reader = tokio::task::spawn_blocking(move || {
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = chunk_tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if chunk_tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = chunk_tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    while let Some(chunk) = chunk_rx.recv().await {
        let chunk = chunk.map_err(|e| streaming_error(CallError::Remote(format!("reading the snapshot file: {e}"))))?;
        send(&duplex.tx, chunk).await?;
    }
    let _ = reader.await;
    // End of our direction: the receiver installs, then answers.
    drop(duplex.tx);
    let reply = match tokio::time::timeout(SNAPSHOT_INSTALL_TIMEOUT, duplex.rx.recv()).await {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(e))) => return Err(streaming_error(e)),
        Ok(None) => {
            return Err(streaming_error(CallError::Unreachable { node: target, detail: "snapshot stream ended without an answer".into() }));
        }
        Err(_) => return Err(streaming_error(CallError::Timeout { node: target, timeout: SNAPSHOT_INSTALL_TIMEOUT })),
    };
    let reply: Result<SnapshotResponse<TypeConfig>, String> = decode(&reply).map_err(|e| streaming_error(CallError::Remote(e)))?;
    let reply = reply.map_err(|e| streaming_error(CallError::Unreachable { node: target, detail: e }))?;
    tracing::info!(group, target, "snapshot sent");
    Ok(reply)
}
