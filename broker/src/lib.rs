//! Warren's broker: exchanges, queues and bindings with AMQP 0-9-1
//! semantics, served over gRPC and stored in RocksDB.
//!
//! Layers, each knowing only the ones below it:
//! * [`server`]: the gRPC edge (tonic) — decode, call, map.
//! * [`broker`]: topology changes, publishing, consuming.
//! * [`queue`]: one owner task per queue applying commands to a
//!   deterministic state machine; [`routing`]: exchange matching.
//! * [`store`]: the only code that touches the database.
//!
//! Operability sits beside them: [`config`] (flags, environment, file),
//! [`metrics`] (Prometheus), [`alarms`] (memory and disk limits that block
//! publishers), [`http`] (`/metrics`, `/healthz`, `/readyz`) and
//! [`telemetry`] (OpenTelemetry traces). Security sits at the edge: [`tls`]
//! (certificates for any listener, reloaded as they rotate) and [`auth`]
//! (authentication in a tower layer, authorization hooks per RPC, users).
//!
//! In a cluster: [`cluster`] (peers, the node-to-node service, liveness)
//! and [`raft`] (replication groups over the store; the only module that
//! knows openraft).

#![forbid(unsafe_code)]

pub mod alarms;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod confirm;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod raft;
pub mod replica;
pub mod routing;
pub mod run;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topology;

pub use broker::{Broker, BrokerConfig};
pub use config::Config;
pub use error::{Error, Result};
