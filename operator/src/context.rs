//! State shared by every reconcile: the Kubernetes client, the event
//! recorder, metrics, broker connections and the autoscaler's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kube::Client;
use kube::core::ApiResource;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use warren_client::{AuthChannel, ConnectOptions, Credentials, RawClient, UsersClient};
use warren_crds::v1alpha1::{Binding, Broker, Exchange, Permission, Queue, User};

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
    /// Give each Broker a NetworkPolicy admitting only client and peer
    /// traffic.
    pub network_policy: bool,
    /// The ClusterRole granting `tokenreviews: create` that Brokers
    /// validating ServiceAccount tokens with TokenReview are bound to (the
    /// chart creates it); none: the operator does not bind it.
    pub token_review_cluster_role: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker_image: format!("ghcr.io/warren-mq/warren-broker:{}", env!("CARGO_PKG_VERSION")),
            resync: Duration::from_secs(30),
            broker_timeout: Duration::from_secs(10),
            broker_endpoints: HashMap::new(),
            concurrency: 16,
            network_policy: true,
            token_review_cluster_role: None,
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
    /// Users.
    pub users: OnceLock<Store<User>>,
    /// Permissions.
    pub permissions: OnceLock<Store<Permission>>,
}

/// How the operator reaches a Broker: TLS (the CA it trusts, the name the
/// certificate carries) and the administrator credential it generated.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct BrokerAccess {
    /// Speak TLS.
    pub tls: bool,
    /// CA certificates (PEM) to trust; none: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The DNS name the broker's certificate carries.
    pub server_name: Option<String>,
    /// A client certificate and key (PEM) to present, for a Broker that
    /// requires client certificates (`spec.tls.clientAuth: Required`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The administrator's user name and password.
    pub admin: Option<(String, String)>,
}

/// Never the password or the key: a `{:?}` must not leak them.
impl std::fmt::Debug for BrokerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAccess")
            .field("tls", &self.tls)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "..."))
            .field("server_name", &self.server_name)
            .field("identity", &self.identity.as_ref().map(|_| "..."))
            .field("admin", &self.admin.as_ref().map(|(user, _)| user))
            .finish()
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
    brokers: Mutex<HashMap<(String, BrokerAccessKey), Channel>>,
    scale_resources: Mutex<HashMap<String, ApiResource>>,
    /// Recent autoscaling recommendations per Queue (by uid).
    pub histories: Mutex<HashMap<String, History>>,
    /// The controllers' caches, once they run.
    pub stores: Stores,
    /// Bindings listed from each broker (by endpoint), shared by every
    /// Binding reconcile for a short while.
    pub binding_lists: crate::topology::binding::ListCache,
    /// How each Broker is reached (`namespace/name/generation`), read from
    /// its Secrets a short while ago.
    pub access: Mutex<HashMap<String, (std::time::Instant, BrokerAccess)>>,
    /// What was last put for each User (by uid): its generation and its
    /// Secret's resourceVersion.
    pub users_applied: Mutex<HashMap<String, (Option<i64>, String)>>,
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
            access: Mutex::default(),
            users_applied: Mutex::default(),
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

    /// gRPC clients (the messaging API and the Users API) for the broker at
    /// `endpoint` (`host:port`), over TLS and with the administrator
    /// credential as `access` says. Channels are created lazily and shared;
    /// a channel reconnects by itself.
    pub fn broker(&self, endpoint: &str, access: &BrokerAccess) -> Result<(RawClient, UsersClient)> {
        let credentials = match &access.admin {
            Some((user, password)) => ConnectOptions::default()
                .basic(user.clone(), password.clone())
                .credentials()
                .map_err(|e| Error::InvalidSpec(format!("the administrator credential is unusable: {e}")))?,
            None => Credentials::none(),
        };
        let key = (endpoint.to_string(), BrokerAccessKey::of(access));
        let mut brokers = self.brokers.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match brokers.get(&key) {
            Some(channel) => channel.clone(),
            None => {
                let scheme = if access.tls { "https" } else { "http" };
                let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("{scheme}://{endpoint}") };
                let mut ep = Endpoint::from_shared(uri)
                    .map_err(|source| Error::Endpoint { endpoint: endpoint.to_string(), source })?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(self.settings.broker_timeout);
                if access.tls {
                    let mut tls = match &access.ca_pem {
                        Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                        None => ClientTlsConfig::new().with_native_roots(),
                    };
                    if let Some(name) = &access.server_name {
                        tls = tls.domain_name(name.clone());
                    }
                    if let Some((cert, key)) = &access.identity {
                        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
                    }
                    ep = ep.tls_config(tls).map_err(|e| Error::InvalidSpec(format!("TLS settings for {endpoint}: {e}")))?;
                }
                let channel = ep.connect_lazy();
                brokers.insert(key, channel.clone());
                channel
            }
        };
        let service = AuthChannel::new(channel.into(), credentials);
        Ok((RawClient::new(service.clone()).max_decoding_message_size(MAX_BROKER_RESPONSE), UsersClient::new(service)))
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

/// What a channel depends on in a [`BrokerAccess`] (not the password: a
/// rotated password reuses the connection).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BrokerAccessKey {
    tls: bool,
    ca: u64,
    server_name: Option<String>,
}

impl BrokerAccessKey {
    fn of(a: &BrokerAccess) -> BrokerAccessKey {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        a.ca_pem.hash(&mut h);
        a.identity.hash(&mut h);
        BrokerAccessKey { tls: a.tls, ca: h.finish(), server_name: a.server_name.clone() }
    }
}
