//! State shared by every reconcile: the Kubernetes client, the event
//! recorder, metrics, broker connections and the autoscaler's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kube::Client;
use kube::core::ApiResource;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use tonic::transport::{Channel, Endpoint};
use warren_client::proto::warren_client::WarrenClient;
use warren_crds::v1alpha1::{Binding, Broker, Exchange, Queue};

use crate::autoscaler::History;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The one field manager for every server-side apply.
pub const FIELD_MANAGER: &str = "warren-operator";

/// Operator settings the reconcilers need.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image for Brokers that do not set `spec.image`.
    pub broker_image: String,
    /// How often topology is re-checked against the broker (drift repair).
    pub resync: Duration,
    /// Timeout of one gRPC call to a broker.
    pub broker_timeout: Duration,
    /// Addresses to reach Brokers at instead of their in-cluster Service,
    /// by `namespace/name` (an operator running outside the cluster, or
    /// tests with a broker on loopback).
    pub broker_endpoints: HashMap<String, String>,
    /// Most reconciles at once, per controller.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker_image: format!("ghcr.io/warren-mq/warren-broker:{}", env!("CARGO_PKG_VERSION")),
            resync: Duration::from_secs(30),
            broker_timeout: Duration::from_secs(10),
            broker_endpoints: HashMap::new(),
            concurrency: 16,
        }
    }
}

/// Parses `NAMESPACE/NAME=HOST:PORT` (a `--broker-endpoint` value).
pub fn parse_broker_endpoint(s: &str) -> std::result::Result<(String, String), String> {
    let (key, endpoint) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAMESPACE/NAME=HOST:PORT"))?;
    let (ns, name) = key.split_once('/').ok_or_else(|| format!("{key:?} is not NAMESPACE/NAME"))?;
    if ns.is_empty() || name.is_empty() || endpoint.is_empty() {
        return Err(format!("{s:?} is not NAMESPACE/NAME=HOST:PORT"));
    }
    Ok((format!("{ns}/{name}"), endpoint.to_string()))
}

/// The reflector caches of the four Warren kinds, once their controllers
/// run: reconcilers read Brokers and look for other claimants here instead
/// of asking the API server.
#[derive(Default)]
pub struct Stores {
    /// Brokers.
    pub brokers: OnceLock<Store<Broker>>,
    /// Exchanges.
    pub exchanges: OnceLock<Store<Exchange>>,
    /// Queues.
    pub queues: OnceLock<Store<Queue>>,
    /// Bindings.
    pub bindings: OnceLock<Store<Binding>>,
}

/// Shared reconcile context.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub settings: Settings,
    brokers: Mutex<HashMap<String, Channel>>,
    scale_resources: Mutex<HashMap<String, ApiResource>>,
    /// Recent autoscaling recommendations per Queue (by uid).
    pub histories: Mutex<HashMap<String, History>>,
    /// The controllers' caches, once they run.
    pub stores: Stores,
    /// Bindings listed from each broker (by endpoint), shared by every
    /// Binding reconcile for a short while.
    pub binding_lists: crate::topology::binding::ListCache,
}

impl Context {
    /// A context reporting Events as `warren-operator` (instance `identity`).
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings, identity: Option<String>) -> Arc<Self> {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: identity };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            brokers: Mutex::default(),
            scale_resources: Mutex::default(),
            histories: Mutex::default(),
            stores: Stores::default(),
            binding_lists: Default::default(),
        })
    }

    /// The Queue controller's cache, when it runs.
    pub fn queues(&self) -> Option<&Store<Queue>> {
        self.stores.queues.get()
    }

    /// Where to reach the Broker `namespace/name`, whose status says
    /// `endpoint`: the configured override, else the status.
    pub fn broker_endpoint(&self, namespace: &str, name: &str, endpoint: Option<&str>) -> Option<String> {
        self.settings.broker_endpoints.get(&format!("{namespace}/{name}")).cloned().or_else(|| endpoint.map(str::to_string))
    }

    /// A gRPC client for the broker at `endpoint` (`host:port`). Channels
    /// are created lazily and shared; a channel reconnects by itself.
    pub fn broker(&self, endpoint: &str) -> Result<WarrenClient<Channel>> {
        let mut brokers = self.brokers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = brokers.get(endpoint) {
            return Ok(client(channel.clone()));
        }
        let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|source| Error::Endpoint { endpoint: endpoint.to_string(), source })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.settings.broker_timeout)
            .connect_lazy();
        brokers.insert(endpoint.to_string(), channel.clone());
        Ok(client(channel))
    }

    /// Cached API resource of a scale target's `apiVersion` + `kind`.
    pub fn cached_scale_resource(&self, key: &str) -> Option<ApiResource> {
        self.scale_resources.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Remembers the API resource of a scale target.
    pub fn cache_scale_resource(&self, key: String, ar: ApiResource) {
        self.scale_resources.lock().unwrap_or_else(|p| p.into_inner()).insert(key, ar);
    }
}

/// Largest gRPC response the operator reads from a broker: a list of every
/// binding of a large broker is far more than tonic's 4 MiB default.
pub const MAX_BROKER_RESPONSE: usize = 256 << 20;

fn client(channel: Channel) -> WarrenClient<Channel> {
    WarrenClient::new(channel).max_decoding_message_size(MAX_BROKER_RESPONSE)
}
