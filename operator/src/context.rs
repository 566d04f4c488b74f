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
use warren_crds::v1alpha1::Queue;

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker_image: format!("ghcr.io/warren-mq/warren-broker:{}", env!("CARGO_PKG_VERSION")),
            resync: Duration::from_secs(30),
            broker_timeout: Duration::from_secs(10),
        }
    }
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
    /// The Queue controller's cache, once it runs (for autoscaling
    /// conflicts between Queues).
    queues: OnceLock<Store<Queue>>,
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
            queues: OnceLock::new(),
        })
    }

    /// Gives the autoscaler the Queue controller's cache.
    pub fn set_queues(&self, store: Store<Queue>) {
        let _ = self.queues.set(store);
    }

    /// The Queue controller's cache, when it runs.
    pub fn queues(&self) -> Option<&Store<Queue>> {
        self.queues.get()
    }

    /// A gRPC client for the broker at `endpoint` (`host:port`). Channels
    /// are created lazily and shared; a channel reconnects by itself.
    pub fn broker(&self, endpoint: &str) -> Result<WarrenClient<Channel>> {
        let mut brokers = self.brokers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = brokers.get(endpoint) {
            return Ok(WarrenClient::new(channel.clone()));
        }
        let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|source| Error::Endpoint { endpoint: endpoint.to_string(), source })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.settings.broker_timeout)
            .connect_lazy();
        brokers.insert(endpoint.to_string(), channel.clone());
        Ok(WarrenClient::new(channel))
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
