//! `Broker`: a Warren broker deployment (StatefulSet, Services, ConfigMap,
//! PodDisruptionBudget, ServiceAccount) run by the operator.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::schema::{immutable_fields, push_rules, rule};

/// A Warren message broker. The operator runs it as a StatefulSet with a
/// persistent volume per pod, a client Service and a headless Service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Broker",
    namespaced,
    status = "BrokerStatus",
    shortname = "wb",
    category = "warren",
    doc = "A Warren message broker. The operator runs it as a StatefulSet with a persistent volume per pod, a client Service and a headless Service.",
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = broker_spec_rules)]
pub struct BrokerSpec {
    /// Number of broker pods, 1 to 7. One pod is a single broker: nothing
    /// is replicated and the broker is down while its pod restarts. More
    /// than one is a cluster: every pod holds the metadata (exchanges,
    /// queues, bindings), replicated through Raft among all pods, and each
    /// quorum queue is replicated on 3 of them (2 in a cluster of 2; the
    /// queue argument `x-quorum-initial-group-size` changes it). Each needs
    /// a majority of its members up, so a cluster of 3 keeps working with
    /// one pod down. Use an odd size (3, 5 or 7): an even size
    /// survives no more pods down than the odd size below it (4, like 3,
    /// survives one) and needs more pods for a majority. Changing between 1
    /// and more than 1 is refused (a single broker cannot become a cluster
    /// in place: create a new Broker). Scaling a cluster down is refused
    /// while a queue would keep fewer than a majority of its replicas:
    /// shrink queues off the pods that go first.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 7))]
    pub replicas: i32,
    /// In a cluster (`replicas` > 1), the type of a durable queue declared
    /// without `x-queue-type`: `quorum` (default: replicated, survives a
    /// pod down) or `classic` (held by one pod, unavailable while that pod
    /// is down). Exclusive and auto-delete queues are always classic, and so
    /// is every queue of a single broker (`replicas: 1`).
    #[serde(default)]
    pub default_queue_type: DefaultQueueType,
    /// Broker container image. Defaults to the image the operator was
    /// configured with (the one matching its own version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// When the kubelet pulls the image: `Always`, `IfNotPresent` or `Never`.
    /// Defaults to Kubernetes' rule (`Always` for `:latest`, else
    /// `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Names of Secrets in the Broker's namespace used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<String>,
    /// CPU and memory requests and limits of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The persistent volume of each pod. Immutable: a StatefulSet's volume
    /// claim templates cannot change.
    #[serde(default)]
    pub storage: Storage,
    /// Broker settings, written to the broker's configuration file.
    #[serde(default)]
    pub config: BrokerConfig,
    /// The client Service.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: Metrics,
    /// Seconds a stopping pod gets to finish in-flight work and flush to disk
    /// before it is killed. The broker needs up to about 30 s: 5 s for the
    /// Service to drop the pod, 20 s for open calls to finish, then closing
    /// its database.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 30, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// Node labels the pods must be scheduled on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The address the broker listens on inside its pod: `::` (default:
    /// every IPv6 and IPv4 address, for IPv4, IPv6 and dual-stack clusters)
    /// or `0.0.0.0` (IPv4 only, for nodes whose kernel has IPv6 turned off).
    #[serde(default)]
    pub listen_address: ListenAddress,
    /// Other namespaces whose Exchanges, Queues and Bindings may declare
    /// topology in this Broker through `brokerRef.namespace` (`*`: every
    /// namespace). Objects in the Broker's own namespace always may. An
    /// object from a namespace not listed gets `Ready=False`, reason
    /// `NamespaceNotAllowed`, and the broker is not touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(pattern(TOPOLOGY_NAMESPACE_PATTERN), length(min = 1, max = 63)))]
    pub topology_namespaces: Vec<String>,
    /// TLS of the gRPC listener: a Secret of type `kubernetes.io/tls`, or a
    /// cert-manager issuer the operator asks for a Certificate. Unset:
    /// plain text (inside the cluster's network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Authentication and authorization: on by default. The operator
    /// generates an administrator credential into the Secret
    /// `<name>-admin` and uses it itself.
    #[serde(default)]
    pub auth: BrokerAuth,
}

/// TLS of the gRPC listener. Exactly one of `secretName` and `issuerRef`.
/// The certificate is re-read as it rotates, without a restart.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tls_rules)]
pub struct Tls {
    /// A Secret in the Broker's namespace with `tls.crt`, `tls.key` and,
    /// for mutual TLS (and for the operator to verify the broker), `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// A cert-manager Issuer or ClusterIssuer: the operator creates a
    /// Certificate for the broker's Service names, stored in the Secret
    /// `<name>-tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// Client certificates (mutual TLS, against `ca.crt`): `None`
    /// (default), `Optional` (verified when presented; the subject's common
    /// name is the user) or `Required`.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

fn tls_rules(schema: &mut Schema) {
    push_rules(schema, [rule("has(self.secretName) != has(self.issuerRef)", "set exactly one of secretName and issuerRef")]);
}

/// A cert-manager issuer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the Issuer or ClusterIssuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (default: in the Broker's namespace) or `ClusterIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
    /// API group of the issuer (default `cert-manager.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub group: Option<String>,
}

/// cert-manager issuer kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum IssuerKind {
    /// In the Broker's namespace.
    #[default]
    Issuer,
    /// Cluster-wide.
    ClusterIssuer,
}

/// Whether the broker asks clients for certificates.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ClientAuth {
    /// No client certificates.
    #[default]
    None,
    /// Verified when presented.
    Optional,
    /// Every client must present one.
    Required,
}

/// Authentication and authorization of a Broker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerAuth {
    /// Require authentication (default). `false` runs the broker open: anyone
    /// who can reach it may read, publish and delete everything.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How pods authenticate with their ServiceAccount token (audience
    /// `serviceAccountAudience`): `TokenReview` (default: the API server
    /// checks each new token; the operator grants the broker
    /// `tokenreviews: create`), `Jwks` (the cluster's signing keys, no API
    /// call per token) or `Disabled`.
    #[serde(default)]
    pub service_account_tokens: ServiceAccountTokens,
    /// The audience ServiceAccount tokens must be issued for.
    #[serde(default = "default_audience")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_audience: String,
    /// Most connections one user may have open at once (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections_per_user: Option<i32>,
    /// Most publish and consume streams one user may have open at once
    /// (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_streams_per_user: Option<i32>,
}

impl Default for BrokerAuth {
    fn default() -> Self {
        BrokerAuth {
            enabled: true,
            service_account_tokens: ServiceAccountTokens::default(),
            service_account_audience: default_audience(),
            max_connections_per_user: None,
            max_streams_per_user: None,
        }
    }
}

fn default_audience() -> String {
    "warren".into()
}

/// How ServiceAccount tokens are validated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceAccountTokens {
    /// Asked of the API server (TokenReview), answers cached.
    #[default]
    TokenReview,
    /// Checked against the cluster's signing keys.
    Jwks,
    /// Not accepted.
    Disabled,
}

/// In a cluster (`replicas` > 1), the type of a durable queue declared
/// without `x-queue-type`: `quorum` (default: replicated, survives a pod
/// down) or `classic` (held by one pod, unavailable while that pod is
/// down). Exclusive and auto-delete queues are always classic, and so is
/// every queue of a single broker (`replicas: 1`).
// (This doc is the field's `kubectl explain` text.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultQueueType {
    /// Replicated through Raft on a majority of its members.
    #[default]
    Quorum,
    /// Held by one pod, not replicated.
    Classic,
}

impl DefaultQueueType {
    /// The broker's spelling (`--default-queue-type`).
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultQueueType::Quorum => "quorum",
            DefaultQueueType::Classic => "classic",
        }
    }
}

/// The address the broker listens on inside its pod: `::` (default: every
/// IPv6 and IPv4 address, for IPv4, IPv6 and dual-stack clusters) or
/// `0.0.0.0` (IPv4 only, for nodes whose kernel has IPv6 turned off).
// (This doc is the field's `kubectl explain` text.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ListenAddress {
    /// Every IPv6 and IPv4 address.
    #[default]
    #[serde(rename = "::")]
    Any,
    /// Every IPv4 address.
    #[serde(rename = "0.0.0.0")]
    Ipv4Any,
}

impl ListenAddress {
    /// `host:port` for the broker's `--grpc-addr` / `--http-addr`.
    pub fn with_port(self, port: i32) -> String {
        match self {
            ListenAddress::Any => format!("[::]:{port}"),
            ListenAddress::Ipv4Any => format!("0.0.0.0:{port}"),
        }
    }
}

impl BrokerSpec {
    /// Whether objects in `namespace` may declare topology in this Broker,
    /// which lives in `own`.
    pub fn allows_topology_from(&self, own: &str, namespace: &str) -> bool {
        namespace == own || self.topology_namespaces.iter().any(|n| n == "*" || n == namespace)
    }
}

fn broker_spec_rules(schema: &mut Schema) {
    let mut rules = immutable_fields(
        &["storage"],
        "a StatefulSet's volume claim templates cannot change; create a new Broker (or delete and re-create this one)",
    );
    rules.push(serde_json::json!({
        "rule": "(self.replicas == 1) == (oldSelf.replicas == 1)",
        "message": "replicas cannot change between 1 and more than 1: a single broker keeps its queues unreplicated on one volume and \
                    cannot become a cluster in place (nor a cluster a single broker); create a new Broker of the size you need and \
                    move the messages to it",
        "fieldPath": ".replicas",
        "reason": "FieldValueForbidden",
    }));
    push_rules(schema, rules);
}

/// A Kubernetes quantity of bytes without a fraction: `1073741824`, `512Mi`,
/// `2Gi`, `1G`.
pub const BYTES_PATTERN: &str = r"^[0-9]{1,15}(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$";
/// An entry of `topologyNamespaces`: a namespace name, or `*`.
pub const TOPOLOGY_NAMESPACE_PATTERN: &str = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$";
/// The longest Broker name: the StatefulSet's `controller-revision-hash`
/// pod label (`<name>-<10 characters>`) must fit in 63 characters.
pub const MAX_BROKER_NAME: usize = 52;
/// A Broker's name becomes the name of its Services, so it must be a
/// DNS-1035 label (a letter first), and at most [`MAX_BROKER_NAME`] long.
pub const BROKER_NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// The lowest absolute memory watermark the broker accepts (32 MiB): an
/// idle broker already holds more than a few MiB. The CRD refuses less.
pub const MIN_ABSOLUTE_WATERMARK: u64 = 32 << 20;
/// The memory high watermark: a fraction above 0 and at most 1 written with
/// a decimal point (`0.4`), or a quantity of bytes (`2Gi`, at least
/// [`MIN_ABSOLUTE_WATERMARK`], which a CEL rule checks).
pub const WATERMARK_PATTERN: &str = r"^(0?\.[0-9]{0,6}[1-9][0-9]{0,6}|1\.0{0,6}|[1-9][0-9]{0,14}(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?)$";
/// A duration the broker reads: a whole number and one unit (`250ms`,
/// `10s`, `5m`, `1h`); also a valid Go / CEL duration.
pub const DURATION_PATTERN: &str = r"^[0-9]{1,7}(ms|s|m|h)$";

fn bytes_schema(_: &mut SchemaGenerator) -> Schema {
    // `pattern` checks strings, `minimum` integers (any size: bytes above
    // 2^31 are common).
    json_schema!({ "x-kubernetes-int-or-string": true, "pattern": BYTES_PATTERN, "minimum": 0 })
}

fn watermark_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "pattern": WATERMARK_PATTERN })
}

fn duration_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "pattern": DURATION_PATTERN })
}

fn config_rules(schema: &mut Schema) {
    push_rules(
        schema,
        [
            rule(
                "!has(self.publishBlockTimeout) || duration(self.publishBlockTimeout) <= duration('1h')",
                "publishBlockTimeout must be at most 1h",
            ),
            rule(
                "!has(self.alarmCheckInterval) || (duration(self.alarmCheckInterval) >= duration('10ms') && duration(self.alarmCheckInterval) <= duration('60s'))",
                "alarmCheckInterval must be between 10ms and 60s",
            ),
            rule(
                format!(
                    "!has(self.memoryHighWatermark) || self.memoryHighWatermark.contains('.') || \
                     quantity(self.memoryHighWatermark).compareTo(quantity('{MIN_ABSOLUTE_WATERMARK}')) >= 0"
                ),
                "memoryHighWatermark as a quantity must be at least 32Mi (the broker refuses less: it would block publishers from the start); \
                 for a fraction of the memory limit write it with a decimal point, such as \"0.4\"",
            ),
        ],
    );
}

/// When the kubelet pulls the image: `Always`, `IfNotPresent` or `Never`.
/// Defaults to Kubernetes' rule (`Always` for `:latest`, else
/// `IfNotPresent`).
// (This doc is the field's `kubectl explain` text: optional enums take
// their description from the type.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the node does not have the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The persistent volume of each broker pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Size of the volume, such as `10Gi`.
    #[serde(default = "default_storage_size")]
    #[schemars(schema_with = "storage_size_schema")]
    pub size: Quantity,
    /// StorageClass of the volume. Defaults to the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

impl Default for Storage {
    fn default() -> Self {
        Self { size: default_storage_size(), storage_class_name: None }
    }
}

/// Broker settings, written to the broker's configuration file. Unset
/// fields keep the broker's defaults. Every value is checked here, so a bad
/// one is refused by the API server instead of stopping the broker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = config_rules)]
pub struct BrokerConfig {
    /// Memory high watermark: publishers are blocked (back-pressure, never a
    /// crash or a drop) while the broker uses more memory than this. Either
    /// a fraction of the container's memory limit, quoted and written with a
    /// decimal point, such as `"0.4"` (the broker's default), or an absolute
    /// quantity such as `2Gi`. Set a memory limit in `resources` for a
    /// fraction to be of the container rather than of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "watermark_schema")]
    pub memory_high_watermark: Option<String>,
    /// What the memory alarm measures: `rss` (the broker's default: resident
    /// memory, everything the process holds) or `allocated` (bytes held by
    /// the broker's heap allocator, without RocksDB's fixed-size caches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_calculation_strategy: Option<MemoryCalculationStrategy>,
    /// Disk free limit: publishers are blocked while the data volume has
    /// less free space than this (a quantity such as `1Gi`, or bytes; the
    /// broker's default is 50Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bytes_schema")]
    pub disk_free_limit: Option<Quantity>,
    /// How long a unary publish waits while an alarm blocks publishers before
    /// it fails with RESOURCE_EXHAUSTED: a whole number and a unit (`ms`,
    /// `s`, `m`, `h`), at most `1h` (broker default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub publish_block_timeout: Option<String>,
    /// How often memory and disk are checked, between `10ms` and `60s`
    /// (broker default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub alarm_check_interval: Option<String>,
    /// Largest message body accepted, in bytes (broker default 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 536870912))]
    pub max_message_size: Option<i64>,
    /// Ready messages per queue held in memory; the rest of a backlog stays on
    /// disk (broker default 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub queue_window_messages: Option<i64>,
    /// Body bytes per queue held in memory (broker default 8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub queue_window_bytes: Option<i64>,
    /// RocksDB block cache, in bytes (broker default 32 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub block_cache_bytes: Option<i64>,
    /// Log format: `json` (default here, for log collectors) or `text`.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// What the memory alarm measures: `rss` (the broker's default: resident
/// memory, everything the process holds) or `allocated` (bytes held by the
/// broker's heap allocator, without RocksDB's fixed-size caches).
// (This doc is the field's `kubectl explain` text: optional enums take
// their description from the type.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryCalculationStrategy {
    /// Resident set size.
    Rss,
    /// Bytes allocated by the broker's heap allocator.
    Allocated,
}

impl MemoryCalculationStrategy {
    /// The broker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryCalculationStrategy::Rss => "rss",
            MemoryCalculationStrategy::Allocated => "allocated",
        }
    }
}

/// Broker log formats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

impl LogFormat {
    /// The broker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

/// The client Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type: `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations of the Service, for cloud load balancers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Service types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Prometheus metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    /// Annotate the pods with `prometheus.io/scrape`, `prometheus.io/port`
    /// and `prometheus.io/path` for annotation-based scraping.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Status of a Broker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pods passing their readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Address clients use (`host:port` of the client Service's gRPC port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`, following Kubernetes
    /// conventions (`kubectl wait --for=condition=Ready broker/NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

fn default_replicas() -> i32 {
    1
}
fn default_grace() -> i64 {
    60
}
fn default_true() -> bool {
    true
}
fn storage_size_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        // Never null: the operator needs a size (and an explicit null would
        // otherwise be stored as it is instead of defaulted).
        "nullable": false,
        "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        "default": "10Gi",
    })
}
fn default_storage_size() -> Quantity {
    Quantity("10Gi".into())
}
