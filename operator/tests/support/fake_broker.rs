//! An in-memory fake of the broker's topology RPCs, served over real gRPC
//! on loopback. It keeps the semantics the operator relies on: passive
//! declares answer NOT_FOUND, a re-declare with other properties answers
//! FAILED_PRECONDITION naming the field, `if_empty` refuses a queue with
//! messages, binding a missing exchange or queue answers NOT_FOUND.
//! `QuorumCritical` answers what the test set with [`FakeBroker::set_critical`]
//! (nothing by default), and counts the calls per node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use ::warren_client::proto::warren_server::{Warren, WarrenServer};
use ::warren_client::proto::*;
use futures::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct State {
    pub exchanges: HashMap<String, DeclareExchangeRequest>,
    pub queues: HashMap<String, QueueInfo>,
    pub bindings: Vec<BindRequest>,
    /// Node → the queues `QuorumCritical` names for it.
    pub critical: HashMap<u64, Vec<String>>,
    /// `QuorumCritical` calls, by node, in order.
    pub critical_asked: Vec<u64>,
    /// `GrowQueues` / `ShrinkQueues` calls, in order.
    pub membership_calls: Vec<String>,
}

#[derive(Clone, Default)]
pub struct FakeBroker {
    pub state: Arc<Mutex<State>>,
}

impl FakeBroker {
    /// Serves on a free loopback port; returns the broker and `host:port`.
    pub async fn start() -> (FakeBroker, String) {
        let broker = FakeBroker::default();
        let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = incoming.local_addr().unwrap();
        let service = WarrenServer::new(broker.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await.unwrap();
        });
        (broker, addr.to_string())
    }

    pub fn has_queue(&self, name: &str) -> bool {
        self.state.lock().unwrap().queues.contains_key(name)
    }

    pub fn queue(&self, name: &str) -> Option<QueueInfo> {
        self.state.lock().unwrap().queues.get(name).cloned()
    }

    pub fn set_messages(&self, name: &str, ready: u64, unacked: u64) {
        let mut s = self.state.lock().unwrap();
        let q = s.queues.get_mut(name).unwrap();
        q.ready = ready;
        q.unacked = unacked;
    }

    pub fn remove_queue(&self, name: &str) {
        self.state.lock().unwrap().queues.remove(name);
    }

    pub fn add_queue(&self, info: QueueInfo) {
        self.state.lock().unwrap().queues.insert(info.name.clone(), info);
    }

    pub fn add_exchange(&self, name: &str) {
        let req = DeclareExchangeRequest { name: name.into(), r#type: ExchangeType::Direct as i32, durable: true, ..Default::default() };
        self.state.lock().unwrap().exchanges.insert(name.into(), req);
    }

    /// `GrowQueues` / `ShrinkQueues` calls, in order ("grow NODE PATTERN").
    pub fn membership_calls(&self) -> Vec<String> {
        self.state.lock().unwrap().membership_calls.clone()
    }

    /// Applies a replica change to the quorum queues `pattern` names. The
    /// fake knows only the exact patterns the operator sends (`^name$`,
    /// with `\` escapes) and the empty one (every queue).
    fn change_members(&self, pattern: &str, change: impl Fn(&mut Vec<u64>) -> Result<(), String>) -> Result<Vec<MembershipChange>, Status> {
        let exact = match pattern.strip_prefix('^').and_then(|p| p.strip_suffix('$')) {
            Some(p) => Some(p.replace('\\', "")),
            None if pattern.is_empty() => None,
            None => return Err(Status::invalid_argument(format!("queue_pattern: the fake knows only ^name$, not {pattern}"))),
        };
        let mut s = self.state.lock().unwrap();
        let mut changes = Vec::new();
        for q in s.queues.values_mut().filter(|q| q.queue_type == "quorum" && exact.as_ref().is_none_or(|n| *n == q.name)) {
            let before = q.members.clone();
            let result = change(&mut q.members);
            changes.push(MembershipChange {
                changed: q.members != before,
                queue: q.name.clone(),
                ok: result.is_ok(),
                error: result.err().unwrap_or_default(),
                members: q.members.clone(),
            });
        }
        Ok(changes)
    }

    pub fn bindings(&self) -> Vec<BindRequest> {
        self.state.lock().unwrap().bindings.clone()
    }

    /// Makes `QuorumCritical(node)` name `queues` (empty: safe).
    pub fn set_critical(&self, node: u64, queues: &[&str]) {
        self.state.lock().unwrap().critical.insert(node, queues.iter().map(|q| q.to_string()).collect());
    }

    /// The nodes `QuorumCritical` was asked about, in order.
    pub fn critical_asked(&self) -> Vec<u64> {
        self.state.lock().unwrap().critical_asked.clone()
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Warren for FakeBroker {
    async fn declare_exchange(&self, r: Request<DeclareExchangeRequest>) -> Result<Response<DeclareExchangeResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state.lock().unwrap();
        let info = |x: &DeclareExchangeRequest| ExchangeInfo {
            name: x.name.clone(),
            r#type: x.r#type,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: x.arguments.clone(),
        };
        match s.exchanges.get(&r.name) {
            Some(existing) if r.passive => Ok(Response::new(DeclareExchangeResponse { exchange: Some(info(existing)) })),
            None if r.passive => Err(Status::not_found(format!("no exchange '{}'", r.name))),
            Some(existing) => {
                if existing.r#type != r.r#type {
                    return Err(Status::failed_precondition(format!("exchange '{}' exists with a different type", r.name)));
                }
                if existing.durable != r.durable || existing.arguments != r.arguments {
                    return Err(Status::failed_precondition(format!("exchange '{}' exists with different properties", r.name)));
                }
                Ok(Response::new(DeclareExchangeResponse { exchange: Some(info(existing)) }))
            }
            None => {
                s.exchanges.insert(r.name.clone(), DeclareExchangeRequest { passive: false, ..r.clone() });
                Ok(Response::new(DeclareExchangeResponse { exchange: Some(info(&r)) }))
            }
        }
    }

    async fn delete_exchange(&self, r: Request<DeleteExchangeRequest>) -> Result<Response<DeleteExchangeResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state.lock().unwrap();
        if s.exchanges.remove(&r.name).is_none() {
            return Err(Status::not_found(format!("no exchange '{}'", r.name)));
        }
        s.bindings.retain(|b| b.source != r.name);
        Ok(Response::new(DeleteExchangeResponse {}))
    }

    async fn list_exchanges(&self, _: Request<ListExchangesRequest>) -> Result<Response<ListExchangesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn declare_queue(&self, r: Request<DeclareQueueRequest>) -> Result<Response<DeclareQueueResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state.lock().unwrap();
        match s.queues.get(&r.name) {
            Some(existing) if r.passive => Ok(Response::new(DeclareQueueResponse { queue: Some(existing.clone()) })),
            None if r.passive => Err(Status::not_found(format!("no queue '{}'", r.name))),
            Some(existing) => {
                let mut keys: Vec<_> = r.arguments.keys().collect();
                keys.sort();
                for key in keys {
                    if existing.arguments.get(key) != r.arguments.get(key) {
                        return Err(Status::failed_precondition(format!("queue '{}' exists with a different {key}", r.name)));
                    }
                }
                if existing.arguments.len() != r.arguments.len() {
                    return Err(Status::failed_precondition(format!("queue '{}' exists with different arguments", r.name)));
                }
                if existing.durable != r.durable {
                    return Err(Status::failed_precondition(format!("queue '{}' exists with a different durable", r.name)));
                }
                Ok(Response::new(DeclareQueueResponse { queue: Some(existing.clone()) }))
            }
            None => {
                let info = QueueInfo {
                    name: r.name.clone(),
                    durable: r.durable,
                    exclusive: r.exclusive,
                    auto_delete: r.auto_delete,
                    arguments: r.arguments.clone(),
                    ..QueueInfo::default()
                };
                s.queues.insert(r.name.clone(), info.clone());
                Ok(Response::new(DeclareQueueResponse { queue: Some(info) }))
            }
        }
    }

    async fn delete_queue(&self, r: Request<DeleteQueueRequest>) -> Result<Response<DeleteQueueResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state.lock().unwrap();
        let Some(q) = s.queues.get(&r.name) else {
            return Err(Status::not_found(format!("no queue '{}'", r.name)));
        };
        let count = q.ready + q.unacked;
        if r.if_empty && count > 0 {
            return Err(Status::failed_precondition(format!("queue '{}' is not empty", r.name)));
        }
        s.queues.remove(&r.name);
        s.bindings.retain(|b| b.destination != r.name);
        Ok(Response::new(DeleteQueueResponse { message_count: count }))
    }

    async fn purge_queue(&self, _: Request<PurgeQueueRequest>) -> Result<Response<PurgeQueueResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_queues(&self, _: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        let s = self.state.lock().unwrap();
        Ok(Response::new(ListQueuesResponse { queues: s.queues.values().cloned().collect() }))
    }

    async fn bind(&self, r: Request<BindRequest>) -> Result<Response<BindResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state.lock().unwrap();
        if !s.exchanges.contains_key(&r.source) {
            return Err(Status::not_found(format!("no exchange '{}'", r.source)));
        }
        if !s.queues.contains_key(&r.destination) && !s.exchanges.contains_key(&r.destination) {
            return Err(Status::not_found(format!("no destination '{}'", r.destination)));
        }
        if !s.bindings.contains(&r) {
            s.bindings.push(r);
        }
        Ok(Response::new(BindResponse {}))
    }

    async fn unbind(&self, r: Request<UnbindRequest>) -> Result<Response<UnbindResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state.lock().unwrap();
        s.bindings.retain(|b| {
            !(b.source == r.source && b.destination == r.destination && b.routing_key == r.routing_key && b.arguments == r.arguments)
        });
        Ok(Response::new(UnbindResponse {}))
    }

    async fn list_bindings(&self, _: Request<ListBindingsRequest>) -> Result<Response<ListBindingsResponse>, Status> {
        let s = self.state.lock().unwrap();
        let bindings = s
            .bindings
            .iter()
            .map(|b| BindingInfo {
                source: b.source.clone(),
                destination: b.destination.clone(),
                destination_kind: b.destination_kind,
                routing_key: b.routing_key.clone(),
                arguments: b.arguments.clone(),
            })
            .collect();
        Ok(Response::new(ListBindingsResponse { bindings }))
    }

    async fn publish(&self, _: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type PublishStreamStream = Stream_<Confirm>;
    async fn publish_stream(
        &self,
        _: Request<tonic::Streaming<PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type ConsumeStream = Stream_<ConsumeResponse>;
    async fn consume(&self, _: Request<tonic::Streaming<ConsumeRequest>>) -> Result<Response<Self::ConsumeStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_consumers(&self, _: Request<ListConsumersRequest>) -> Result<Response<ListConsumersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn cluster_status(&self, _: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn quorum_critical(&self, r: Request<QuorumCriticalRequest>) -> Result<Response<QuorumCriticalResponse>, Status> {
        let node = r.into_inner().node;
        let mut s = self.state.lock().unwrap();
        s.critical_asked.push(node);
        Ok(Response::new(QuorumCriticalResponse { queues: s.critical.get(&node).cloned().unwrap_or_default() }))
    }

    async fn grow_queues(&self, r: Request<GrowQueuesRequest>) -> Result<Response<MembershipChangeResponse>, Status> {
        let r = r.into_inner();
        let changes = self.change_members(&r.queue_pattern, |members| {
            if !members.contains(&r.node) {
                members.push(r.node);
            }
            Ok(())
        })?;
        self.state.lock().unwrap().membership_calls.push(format!("grow {} {}", r.node, r.queue_pattern));
        Ok(Response::new(MembershipChangeResponse { changes }))
    }

    async fn shrink_queues(&self, r: Request<ShrinkQueuesRequest>) -> Result<Response<MembershipChangeResponse>, Status> {
        let r = r.into_inner();
        let changes = self.change_members(&r.queue_pattern, |members| {
            if members == &[r.node] {
                return Err("would remove its last replica".to_string());
            }
            members.retain(|m| *m != r.node);
            Ok(())
        })?;
        self.state.lock().unwrap().membership_calls.push(format!("shrink {} {}", r.node, r.queue_pattern));
        Ok(Response::new(MembershipChangeResponse { changes }))
    }

    async fn rebalance_queues(&self, _: Request<RebalanceQueuesRequest>) -> Result<Response<RebalanceQueuesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
