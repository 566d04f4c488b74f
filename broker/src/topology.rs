//! The broker's metadata: exchanges, queues and bindings, how they are
//! stored, and how they compile into the routing snapshot.
//!
//! Mutations are serialized by the broker (one lock); readers on the publish
//! path only see the [`Snapshot`] it publishes after each change.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use warren_client::proto::{self, Value};

use crate::error::{Error, Result};
use crate::model::args::ExchangeArgs;
use crate::model::{ExchangeKind, QueueArgs};
use crate::queue::QueueRef;
use crate::routing::{Dest, ExchangeRoute, RouteBinding, RoutingTable};
use crate::store::keys::{QueueId, meta};
use crate::store::{Cf, Op, StoreError};

/// Identifies the client connection that owns an exclusive queue.
pub type SessionId = u64;

#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeDef {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: BTreeMap<String, Value>,
    pub args: ExchangeArgs,
    /// Pre-declared (`""`, `amq.*`): cannot be deleted.
    pub builtin: bool,
}

#[derive(Clone, Debug)]
pub struct QueueDef {
    pub id: QueueId,
    pub name: Arc<str>,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: BTreeMap<String, Value>,
    pub args: QueueArgs,
    /// The connection an exclusive queue belongs to.
    pub owner: Option<SessionId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BindingDef {
    pub source: Arc<str>,
    pub dest: Dest,
    pub routing_key: String,
    pub arguments: BTreeMap<String, Value>,
}

impl BindingDef {
    pub fn store_key(&self) -> Vec<u8> {
        let (is_x, name) = match &self.dest {
            Dest::Queue(q) => (false, q),
            Dest::Exchange(x) => (true, x),
        };
        meta::binding(&self.source, is_x, name, &self.routing_key, &canonical_args(&self.arguments))
    }
}

/// A deterministic encoding of an argument map (sorted keys), used to tell
/// bindings apart in storage.
pub fn canonical_args(args: &BTreeMap<String, Value>) -> Vec<u8> {
    let sorted: BTreeMap<&String, &Value> = args.iter().collect();
    let mut out = Vec::new();
    for (k, v) in sorted {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        let enc = v.encode_to_vec();
        out.extend_from_slice(&(enc.len() as u32).to_be_bytes());
        out.extend_from_slice(&enc);
    }
    out
}

// ------------------------------------------------------------ storage form

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExchangeRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(bool, tag = "3")]
    pub auto_delete: bool,
    #[prost(bool, tag = "4")]
    pub internal: bool,
    #[prost(btree_map = "string, message", tag = "5")]
    pub arguments: BTreeMap<String, Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub id: u64,
    #[prost(bool, tag = "3")]
    pub auto_delete: bool,
    #[prost(btree_map = "string, message", tag = "4")]
    pub arguments: BTreeMap<String, Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BindingRecord {
    #[prost(string, tag = "1")]
    pub source: String,
    #[prost(string, tag = "2")]
    pub destination: String,
    #[prost(bool, tag = "3")]
    pub to_exchange: bool,
    #[prost(string, tag = "4")]
    pub routing_key: String,
    #[prost(btree_map = "string, message", tag = "5")]
    pub arguments: BTreeMap<String, Value>,
}

fn corrupt(detail: String) -> Error {
    Error::Store(StoreError::Corrupt { cf: "meta", detail })
}

impl ExchangeDef {
    pub fn put_op(&self) -> Op {
        let rec = ExchangeRecord {
            name: self.name.to_string(),
            kind: self.kind.as_str().to_string(),
            auto_delete: self.auto_delete,
            internal: self.internal,
            arguments: self.arguments.clone(),
        };
        Op::Put(Cf::Meta, meta::exchange(&self.name), rec.encode_to_vec())
    }

    pub fn delete_op(&self) -> Op {
        Op::Delete(Cf::Meta, meta::exchange(&self.name))
    }

    pub fn decode(bytes: &[u8]) -> Result<ExchangeDef> {
        let rec = ExchangeRecord::decode(bytes).map_err(|e| corrupt(format!("exchange record: {e}")))?;
        let kind: ExchangeKind =
            rec.kind.parse().map_err(|_| corrupt(format!("exchange '{}' has unknown type {:?}", rec.name, rec.kind)))?;
        Ok(ExchangeDef {
            name: rec.name.into(),
            kind,
            durable: true,
            auto_delete: rec.auto_delete,
            internal: rec.internal,
            args: ExchangeArgs::parse(&rec.arguments)?,
            arguments: rec.arguments,
            builtin: false,
        })
    }

    pub fn info(&self) -> proto::ExchangeInfo {
        proto::ExchangeInfo {
            name: self.name.to_string(),
            r#type: self.kind.to_proto() as i32,
            durable: self.durable,
            auto_delete: self.auto_delete,
            internal: self.internal,
            arguments: self.arguments.clone(),
        }
    }
}

impl QueueDef {
    pub fn put_op(&self) -> Op {
        let rec =
            QueueRecord { name: self.name.to_string(), id: self.id, auto_delete: self.auto_delete, arguments: self.arguments.clone() };
        Op::Put(Cf::Meta, meta::queue(&self.name), rec.encode_to_vec())
    }

    pub fn delete_op(&self) -> Op {
        Op::Delete(Cf::Meta, meta::queue(&self.name))
    }

    pub fn decode(bytes: &[u8]) -> Result<QueueDef> {
        let rec = QueueRecord::decode(bytes).map_err(|e| corrupt(format!("queue record: {e}")))?;
        Ok(QueueDef {
            id: rec.id,
            name: rec.name.into(),
            durable: true,
            exclusive: false,
            auto_delete: rec.auto_delete,
            args: QueueArgs::parse(&rec.arguments)?,
            arguments: rec.arguments,
            owner: None,
        })
    }
}

impl BindingDef {
    pub fn put_op(&self) -> Op {
        let (to_exchange, destination) = match &self.dest {
            Dest::Queue(q) => (false, q.to_string()),
            Dest::Exchange(x) => (true, x.to_string()),
        };
        let rec = BindingRecord {
            source: self.source.to_string(),
            destination,
            to_exchange,
            routing_key: self.routing_key.clone(),
            arguments: self.arguments.clone(),
        };
        Op::Put(Cf::Meta, self.store_key(), rec.encode_to_vec())
    }

    pub fn delete_op(&self) -> Op {
        Op::Delete(Cf::Meta, self.store_key())
    }

    pub fn decode(bytes: &[u8]) -> Result<BindingDef> {
        let rec = BindingRecord::decode(bytes).map_err(|e| corrupt(format!("binding record: {e}")))?;
        Ok(BindingDef {
            source: rec.source.into(),
            dest: if rec.to_exchange { Dest::Exchange(rec.destination.into()) } else { Dest::Queue(rec.destination.into()) },
            routing_key: rec.routing_key,
            arguments: rec.arguments,
        })
    }

    pub fn info(&self) -> proto::BindingInfo {
        let (kind, destination) = match &self.dest {
            Dest::Queue(q) => (proto::DestinationKind::Queue, q.to_string()),
            Dest::Exchange(x) => (proto::DestinationKind::Exchange, x.to_string()),
        };
        proto::BindingInfo {
            source: self.source.to_string(),
            destination,
            destination_kind: kind as i32,
            routing_key: self.routing_key.clone(),
            arguments: self.arguments.clone(),
        }
    }
}

// --------------------------------------------------------------- topology

/// A running queue: its definition and its task's handle.
#[derive(Clone, Debug)]
pub struct QueueEntry {
    pub def: Arc<QueueDef>,
    pub handle: QueueRef,
}

/// What the publish and consume paths read without locks.
#[derive(Default)]
pub struct Snapshot {
    pub routes: RoutingTable,
    pub queues: imbl::HashMap<Arc<str>, QueueEntry>,
}

/// The authoritative metadata. Mutated under the broker's lock.
#[derive(Default)]
pub struct Topology {
    pub exchanges: BTreeMap<Arc<str>, ExchangeDef>,
    pub queues: BTreeMap<Arc<str>, QueueEntry>,
    /// Bindings by source exchange.
    pub bindings: BTreeMap<Arc<str>, Vec<BindingDef>>,
    pub next_queue_id: QueueId,
}

/// Exchanges every broker has (as in AMQP 0-9-1).
pub const BUILTIN_EXCHANGES: [(&str, ExchangeKind); 6] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

impl Topology {
    pub fn add_builtins(&mut self) {
        for (name, kind) in BUILTIN_EXCHANGES {
            self.exchanges.entry(name.into()).or_insert_with(|| ExchangeDef {
                name: name.into(),
                kind,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: BTreeMap::new(),
                args: ExchangeArgs::default(),
                builtin: true,
            });
        }
    }

    /// Every binding leading to `dest`.
    pub fn bindings_to<'a>(&'a self, dest: &'a Dest) -> impl Iterator<Item = &'a BindingDef> + 'a {
        self.bindings.values().flatten().filter(move |b| &b.dest == dest)
    }

    /// Removes every binding leading to `dest`, adding their store
    /// deletions to `ops`; returns the source exchanges that changed.
    pub fn remove_bindings_to(&mut self, dest: &Dest, ops: &mut Vec<Op>) -> Vec<Arc<str>> {
        let mut changed = Vec::new();
        for (source, list) in self.bindings.iter_mut() {
            let before = list.len();
            list.retain(|b| {
                let hit = &b.dest == dest;
                if hit {
                    ops.push(b.delete_op());
                }
                !hit
            });
            if list.len() != before {
                changed.push(source.clone());
            }
        }
        self.bindings.retain(|_, l| !l.is_empty());
        changed
    }

    pub fn binding_count(&self) -> usize {
        self.bindings.values().map(Vec::len).sum()
    }

    pub fn all_bindings(&self) -> impl Iterator<Item = &BindingDef> {
        self.bindings.values().flatten()
    }

    /// Compiles one exchange for the router.
    pub fn route_for(&self, name: &str) -> Option<Arc<ExchangeRoute>> {
        let def = self.exchanges.get(name)?;
        let bindings: Vec<RouteBinding> = self
            .bindings
            .get(name)
            .map(|bs| {
                bs.iter()
                    .map(|b| RouteBinding { routing_key: b.routing_key.clone(), arguments: b.arguments.clone(), dest: b.dest.clone() })
                    .collect()
            })
            .unwrap_or_default();
        Some(Arc::new(ExchangeRoute::new(
            def.name.clone(),
            def.kind,
            def.internal,
            def.args.alternate_exchange.as_deref().map(Into::into),
            &bindings,
        )))
    }

    /// A new snapshot from `old`, recompiling the exchanges named in
    /// `changed` and updating the queues named in `queues` (added or
    /// removed). The maps are persistent: a change costs O(log n), not a
    /// copy of every queue, so declaring many queues stays linear.
    pub fn snapshot(&self, old: &Snapshot, changed: &[Arc<str>], queues: &[Arc<str>]) -> Snapshot {
        let mut routes = old.routes.clone();
        for name in changed {
            match self.route_for(name) {
                Some(r) => {
                    routes.exchanges.insert(name.clone(), r);
                }
                None => {
                    routes.exchanges.remove(name);
                }
            }
        }
        let mut queue_map = old.queues.clone();
        for name in queues {
            match self.queues.get(name) {
                Some(entry) => {
                    queue_map.insert(name.clone(), entry.clone());
                }
                None => {
                    queue_map.remove(name);
                }
            }
        }
        Snapshot { routes, queues: queue_map }
    }

    /// A snapshot built from scratch.
    pub fn full_snapshot(&self) -> Snapshot {
        let names: Vec<Arc<str>> = self.exchanges.keys().cloned().collect();
        let queues: Vec<Arc<str>> = self.queues.keys().cloned().collect();
        self.snapshot(&Snapshot::default(), &names, &queues)
    }
}
