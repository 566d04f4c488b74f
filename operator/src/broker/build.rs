//! Pure builders: a validated Broker in, Kubernetes objects out. No API
//! calls here, so every object is unit-tested as plain data.
//!
//! A Broker of one replica is a single broker, built exactly as before
//! clusters existed (no peers, no cluster port, no update strategy). A
//! Broker of more replicas is a cluster: its pods are numbered from 1
//! (`spec.ordinals.start`), so that a pod's ordinal, its
//! `apps.kubernetes.io/pod-index` label and its broker node id are the same
//! number (`warren-2` is node 2; the broker's API uses node 0 for "none"),
//! and every pod gets the full member list through the headless Service.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetOrdinals, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    Lifecycle, LifecycleHandler, LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, SleepAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::core::v1::{KeyToPath, Secret, SecretVolumeSource};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use warren_crds::v1alpha1::{Broker, BrokerConfig, BrokerSpec, ClientAuth, IssuerKind, MIN_ABSOLUTE_WATERMARK, ServiceAccountTokens};

use crate::error::{Error, Result};

/// gRPC port of the broker.
pub const GRPC_PORT: i32 = 5680;
/// HTTP port of the broker: `/metrics`, `/healthz`, `/readyz`.
pub const HTTP_PORT: i32 = 15680;
/// Port of the node-to-node listener of a cluster (Raft, forwarding):
/// only other broker pods of the same Broker may reach it.
pub const CLUSTER_PORT: i32 = 5681;
/// Most pods of a Broker (the CRD refuses more).
pub const MAX_REPLICAS: i32 = 7;
/// The first pod ordinal of a cluster: pod `<name>-1` is node 1.
pub const FIRST_ORDINAL: i32 = 1;
/// The pod label holding a StatefulSet pod's ordinal, set by the
/// StatefulSet controller.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// Annotation on a cluster's StatefulSet carrying a hash of the pod
/// template the operator built, so that it knows when it starts a rollout.
pub const TEMPLATE_HASH_ANNOTATION: &str = "warren.dev/pod-template-hash";
/// Where the administrator's password (the `<name>-admin` Secret) is mounted.
pub const ADMIN_DIR: &str = "/etc/warren-admin";
/// Where the TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/warren-tls";
/// Where a cluster's shared node-to-node secret (the `<name>-cluster-secret`
/// Secret) is mounted.
pub const CLUSTER_SECRET_DIR: &str = "/etc/warren-cluster";
/// The administrator the operator generates and uses.
pub const ADMIN_USER: &str = "admin";
/// Where the data volume is mounted.
pub const VOLUME_DIR: &str = "/var/lib/warren";
/// The broker's data directory: a directory of the volume, not its root
/// (which may hold a file system's `lost+found`).
pub const DATA_DIR: &str = "/var/lib/warren/data";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/warren";
/// The configuration file's name in the ConfigMap.
pub const CONFIG_FILE: &str = "warren.toml";
/// UID and GID the broker runs as (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;
/// Annotation on the pod template carrying the configuration's hash, so a
/// configuration change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "warren.dev/config-hash";
/// The longest Broker name: the StatefulSet's `controller-revision-hash`
/// label (`<name>-<10 chars>`) must fit in 63 characters. The CRD refuses
/// longer names too (a CEL rule on `metadata.name`).
pub const MAX_NAME_LEN: usize = warren_crds::v1alpha1::MAX_BROKER_NAME;

/// A Broker whose spec has been checked; everything downstream reads this,
/// never the raw object.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedBroker {
    /// Name of the Broker (and of the StatefulSet, client Service, PDB,
    /// ServiceAccount).
    pub name: String,
    /// Namespace of the Broker and of everything it owns.
    pub namespace: String,
    /// Controller owner reference pointing at the Broker.
    pub owner: OwnerReference,
    /// `metadata.generation` of the Broker.
    pub generation: Option<i64>,
    /// The image to run.
    pub image: String,
    /// The spec, defaults applied.
    pub spec: BrokerSpec,
    /// The configuration file's settings, checked and in the broker's units.
    pub settings: Vec<(&'static str, Setting)>,
}

/// A value in the broker's TOML configuration file.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    /// An integer (bytes, counts).
    Int(u64),
    /// A string (durations, enums, fractions).
    Str(String),
}

/// Every key the operator may write into the configuration file. The broker
/// refuses unknown keys (every pod would crash-loop), so each must be one of
/// its settings: the real-broker tests start `warren-broker --config` on a
/// file holding all of them.
pub const CONFIG_KEYS: &[&str] = &[
    "log_format",
    "max_message_size",
    "queue_window_messages",
    "queue_window_bytes",
    "block_cache_bytes",
    "memory_high_watermark",
    "memory_calculation_strategy",
    "disk_free_limit",
    "publish_block_timeout",
    "alarm_check_interval",
];

/// Bytes in a Kubernetes quantity without a fraction (`512Mi`, `2Gi`,
/// `1G`, `1048576`), as the schema's pattern allows; `None` when it is
/// malformed or overflows.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (digits, suffix) = q.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The configuration file's settings from a Broker's `spec.config`, in the
/// broker's units: sizes as plain bytes, a watermark fraction with its
/// decimal point (the broker reads a number without one as bytes).
pub fn settings(c: &BrokerConfig) -> Result<Vec<(&'static str, Setting)>> {
    let invalid =
        |field: &str, value: &dyn std::fmt::Display, why: &str| Error::InvalidSpec(format!("spec.config.{field} is {value}: {why}"));
    let mut out = vec![("log_format", Setting::Str(c.log_format.as_str().into()))];
    let ints = [
        ("max_message_size", c.max_message_size),
        ("queue_window_messages", c.queue_window_messages),
        ("queue_window_bytes", c.queue_window_bytes),
        ("block_cache_bytes", c.block_cache_bytes),
    ];
    for (key, value) in ints {
        if let Some(value) = value {
            let v = u64::try_from(value).map_err(|_| invalid(key, &value, "must not be negative"))?;
            out.push((key, Setting::Int(v)));
        }
    }
    if let Some(w) = &c.memory_high_watermark {
        let setting = if w.contains('.') {
            let f: f64 = w.parse().map_err(|_| invalid("memoryHighWatermark", w, "not a fraction such as \"0.4\""))?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(invalid("memoryHighWatermark", w, "a fraction must be greater than 0 and at most 1.0"));
            }
            let text = f.to_string();
            Setting::Str(if text.contains('.') { text } else { format!("{text}.0") })
        } else {
            match quantity_bytes(w) {
                Some(b) if b >= MIN_ABSOLUTE_WATERMARK => Setting::Int(b),
                Some(_) => {
                    return Err(invalid(
                        "memoryHighWatermark",
                        w,
                        "below 32Mi, which the broker refuses (it would block publishers from the start)",
                    ));
                }
                None => return Err(invalid("memoryHighWatermark", w, "neither a fraction such as \"0.4\" nor a quantity such as 2Gi")),
            }
        };
        out.push(("memory_high_watermark", setting));
    }
    if let Some(s) = c.memory_calculation_strategy {
        out.push(("memory_calculation_strategy", Setting::Str(s.as_str().into())));
    }
    if let Some(limit) = &c.disk_free_limit {
        let bytes = quantity_bytes(&limit.0).ok_or_else(|| invalid("diskFreeLimit", &limit.0, "not a quantity of bytes such as 1Gi"))?;
        out.push(("disk_free_limit", Setting::Int(bytes)));
    }
    for (key, field, value) in [
        ("publish_block_timeout", "publishBlockTimeout", &c.publish_block_timeout),
        ("alarm_check_interval", "alarmCheckInterval", &c.alarm_check_interval),
    ] {
        if let Some(d) = value {
            let unit = d.trim_start_matches(|ch: char| ch.is_ascii_digit());
            if unit.len() == d.len() || !["ms", "s", "m", "h"].contains(&unit) {
                return Err(invalid(field, d, "not a duration such as 250ms, 10s, 5m or 1h"));
            }
            out.push((key, Setting::Str(d.clone())));
        }
    }
    debug_assert!(out.iter().all(|(k, _)| CONFIG_KEYS.contains(k)));
    Ok(out)
}

/// Checks a Broker and resolves its defaults (the image comes from the
/// operator's configuration unless the spec sets one).
pub fn validate(broker: &Broker, default_image: &str) -> Result<ValidatedBroker> {
    let name = broker.metadata.name.clone().ok_or(Error::MissingObjectKey("name"))?;
    let namespace = broker.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidSpec(format!(
            "metadata.name is {} characters; a Broker name may have at most {MAX_NAME_LEN} (the StatefulSet's pod labels must fit in 63)",
            name.len()
        )));
    }
    let mut owner = broker.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("uid"))?;
    // Foreground deletion of the Broker waits for its children (this needs
    // `update` on brokers/finalizers where OwnerReferencesPermission-
    // Enforcement is on: the chart grants it).
    owner.block_owner_deletion = Some(true);
    let image = broker.spec.image.clone().unwrap_or_else(|| default_image.to_string());
    if image.trim().is_empty() {
        return Err(Error::InvalidSpec("spec.image is empty and the operator has no default broker image (--broker-image)".into()));
    }
    if !(1..=MAX_REPLICAS).contains(&broker.spec.replicas) {
        return Err(Error::InvalidSpec(format!("spec.replicas is {}; a Broker runs 1 to {MAX_REPLICAS} pods", broker.spec.replicas)));
    }
    let settings = settings(&broker.spec.config)?;
    Ok(ValidatedBroker { name, namespace, owner, generation: broker.metadata.generation, image, spec: broker.spec.clone(), settings })
}

impl ValidatedBroker {
    /// Whether this Broker runs as a cluster (more than one pod).
    pub fn is_cluster(&self) -> bool {
        self.spec.replicas > 1
    }

    /// The broker node id of the pod at `index` (0 for the first pod) of a
    /// cluster: its ordinal.
    pub fn node_id(index: i32) -> u64 {
        u64::try_from(index + FIRST_ORDINAL).unwrap_or(0)
    }

    /// The name of the pod at `index` of a cluster.
    pub fn pod_name(&self, index: i32) -> String {
        format!("{}-{}", self.name, index + FIRST_ORDINAL)
    }

    /// The cluster's members as the broker reads them (`--peers`): every
    /// pod's node id and its stable DNS name under the headless Service.
    pub fn peers(&self) -> String {
        (0..self.spec.replicas)
            .map(|i| {
                format!("{}={}.{}.{}.svc:{CLUSTER_PORT}", Self::node_id(i), self.pod_name(i), self.headless_service_name(), self.namespace)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Name of the headless Service that gives each pod a DNS name.
    pub fn headless_service_name(&self) -> String {
        format!("{}-headless", self.name)
    }

    /// Name of the ConfigMap holding the broker configuration.
    pub fn config_map_name(&self) -> String {
        format!("{}-config", self.name)
    }

    /// Name of the Secret with the secret a cluster's nodes share (key
    /// `secret`), which the operator generates for a cluster.
    pub fn cluster_secret_name(&self) -> String {
        format!("{}-cluster-secret", self.name)
    }

    /// Whether the nodes of a cluster speak mutual TLS to each other: with
    /// the Broker's TLS certificate when it certainly comes with the CA
    /// that signed it (`ca.crt`), that is when cert-manager issues it (the
    /// Certificate asks for client and server use) or when the Broker asks
    /// for client certificates anyway.
    pub fn cluster_tls(&self) -> bool {
        self.is_cluster() && self.spec.tls.as_ref().is_some_and(|t| t.issuer_ref.is_some() || t.client_auth != ClientAuth::None)
    }

    /// Name of the Secret with the administrator credential the operator
    /// generates (keys `username`, `password`).
    pub fn admin_secret_name(&self) -> String {
        format!("{}-admin", self.name)
    }

    /// Name of the Secret with the TLS certificate, when TLS is on: the one
    /// given, or the one the cert-manager Certificate writes.
    pub fn tls_secret_name(&self) -> Option<String> {
        let tls = self.spec.tls.as_ref()?;
        Some(tls.secret_name.clone().unwrap_or_else(|| format!("{}-tls", self.name)))
    }

    /// Whether the broker needs its ServiceAccount token (to validate
    /// clients' ServiceAccount tokens).
    pub fn needs_api_token(&self) -> bool {
        self.spec.auth.enabled && self.spec.auth.service_account_tokens != ServiceAccountTokens::Disabled
    }

    /// The DNS names clients and peers reach the broker by.
    pub fn dns_names(&self) -> Vec<String> {
        let (n, ns) = (&self.name, &self.namespace);
        let headless = self.headless_service_name();
        vec![
            n.clone(),
            format!("{n}.{ns}"),
            format!("{n}.{ns}.svc"),
            format!("{n}.{ns}.svc.cluster.local"),
            format!("*.{headless}.{ns}.svc"),
            format!("*.{headless}.{ns}.svc.cluster.local"),
        ]
    }

    /// The address clients use: the client Service's gRPC port.
    pub fn endpoint(&self) -> String {
        format!("{}.{}.svc:{GRPC_PORT}", self.name, self.namespace)
    }

    /// Labels on every object of this Broker.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.insert("app.kubernetes.io/component".into(), "broker".into());
        labels.insert("app.kubernetes.io/part-of".into(), "warren".into());
        labels.insert("app.kubernetes.io/managed-by".into(), "warren-operator".into());
        labels
    }

    /// The labels selecting this Broker's pods (immutable in a StatefulSet).
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "warren-broker".to_string()),
            ("app.kubernetes.io/instance".to_string(), self.name.clone()),
        ])
    }

    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The broker's TOML configuration. Listen addresses, the data directory and
/// the node name are passed as environment variables (they are per pod);
/// the file holds the tuning. Keys are the broker's flag names in snake case.
pub fn config_toml(v: &ValidatedBroker) -> String {
    let mut out = String::from("# Warren broker configuration, written by warren-operator from the Broker spec.\n");
    for (key, value) in &v.settings {
        match value {
            Setting::Int(i) => out.push_str(&format!("{key} = {i}\n")),
            // A JSON string is a valid TOML basic string.
            Setting::Str(s) => out.push_str(&format!("{key} = {}\n", serde_json::Value::String(s.clone()))),
        }
    }
    out
}

/// FNV-1a, 64 bits: a hash that is stable across operator builds (unlike
/// std's `DefaultHasher`), so upgrading the operator does not roll pods.
pub fn stable_hash(data: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The ConfigMap with the broker configuration file.
pub fn config_map(v: &ValidatedBroker) -> ConfigMap {
    ConfigMap {
        metadata: v.meta(v.config_map_name()),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), config_toml(v))])),
        ..ConfigMap::default()
    }
}

/// The broker pods' ServiceAccount. Its token is mounted (by the pod spec)
/// only when the broker validates ServiceAccount tokens.
pub fn service_account(v: &ValidatedBroker) -> ServiceAccount {
    ServiceAccount { metadata: v.meta(v.name.clone()), automount_service_account_token: Some(false), ..ServiceAccount::default() }
}

/// gRPC and HTTP, and with `cluster` the cluster port.
fn ports(cluster: bool) -> Vec<ServicePort> {
    let mut ports = vec![
        ServicePort {
            name: Some("grpc".into()),
            port: GRPC_PORT,
            target_port: Some(IntOrString::String("grpc".into())),
            app_protocol: Some("kubernetes.io/h2c".into()),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        },
        ServicePort {
            name: Some("http".into()),
            port: HTTP_PORT,
            target_port: Some(IntOrString::String("http".into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        },
    ];
    if cluster {
        ports.push(ServicePort {
            name: Some("cluster".into()),
            port: CLUSTER_PORT,
            target_port: Some(IntOrString::String("cluster".into())),
            app_protocol: Some("kubernetes.io/h2c".into()),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        });
    }
    ports
}

/// The headless Service: stable DNS names for the pods (peers find each
/// other through it), including pods that are not ready yet: a cluster's
/// pods must reach each other to elect leaders before any is ready. A
/// cluster's headless Service also names the cluster port.
pub fn headless_service(v: &ValidatedBroker) -> Service {
    Service {
        metadata: v.meta(v.headless_service_name()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(v.selector_labels()),
            ports: Some(ports(v.is_cluster())),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client Service: gRPC (and the metrics port) of the ready pods. In a
/// cluster any pod serves any client: it forwards to queue leaders.
pub fn client_service(v: &ValidatedBroker) -> Service {
    let mut meta = v.meta(v.name.clone());
    if !v.spec.service.annotations.is_empty() {
        meta.annotations = Some(v.spec.service.annotations.clone());
    }
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(v.spec.service.type_.as_str().into()),
            selector: Some(v.selector_labels()),
            ports: Some(ports(false)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The PodDisruptionBudget: voluntary disruptions (node drains) take at
/// most one broker pod at a time.
pub fn pod_disruption_budget(v: &ValidatedBroker) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: v.meta(v.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(v.selector_labels()), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

/// An environment variable from a field of the pod (the downward API).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field_path.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction { path: Some(path.into()), port: IntOrString::String("http".into()), ..HTTPGetAction::default() }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The StatefulSet running the broker.
pub fn stateful_set(v: &ValidatedBroker) -> StatefulSet {
    let spec = &v.spec;
    let config_hash = stable_hash(&config_toml(v));
    let mut pod_annotations = BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), config_hash)]);
    if spec.metrics.enabled {
        pod_annotations.insert("prometheus.io/scrape".into(), "true".into());
        pod_annotations.insert("prometheus.io/port".into(), HTTP_PORT.to_string());
        pod_annotations.insert("prometheus.io/path".into(), "/metrics".into());
    }
    let mut pod_labels = v.labels();
    pod_labels.extend(v.selector_labels());

    let mut vars = vec![
        field_env("WARREN_NODE_NAME", "metadata.name"),
        env("WARREN_DATA_DIR", DATA_DIR),
        env("WARREN_GRPC_ADDR", &spec.listen_address.with_port(GRPC_PORT)),
        env("WARREN_HTTP_ADDR", &spec.listen_address.with_port(HTTP_PORT)),
        env("WARREN_CONFIG", &format!("{CONFIG_DIR}/{CONFIG_FILE}")),
    ];
    let mut ports = vec![
        ContainerPort { name: Some("grpc".into()), container_port: GRPC_PORT, protocol: Some("TCP".into()), ..ContainerPort::default() },
        ContainerPort { name: Some("http".into()), container_port: HTTP_PORT, protocol: Some("TCP".into()), ..ContainerPort::default() },
    ];
    if v.is_cluster() {
        // The node id is the pod's ordinal, read from the label the
        // StatefulSet controller sets (no shell in the image to compute it).
        vars.push(field_env("WARREN_NODE_ID", &format!("metadata.labels['{POD_INDEX_LABEL}']")));
        vars.push(env("WARREN_CLUSTER_ADDR", &spec.listen_address.with_port(CLUSTER_PORT)));
        vars.push(env("WARREN_PEERS", &v.peers()));
        vars.push(env("WARREN_DEFAULT_QUEUE_TYPE", spec.default_queue_type.as_str()));
        // The nodes authenticate each other: the shared secret always, and
        // mutual TLS with the Broker's certificate when it has its CA.
        vars.push(env("WARREN_CLUSTER_SECRET_FILE", &format!("{CLUSTER_SECRET_DIR}/secret")));
        if v.cluster_tls() {
            vars.push(env("WARREN_CLUSTER_TLS_CERT", &format!("{TLS_DIR}/tls.crt")));
            vars.push(env("WARREN_CLUSTER_TLS_KEY", &format!("{TLS_DIR}/tls.key")));
            vars.push(env("WARREN_CLUSTER_TLS_CA", &format!("{TLS_DIR}/ca.crt")));
        }
        ports.push(ContainerPort {
            name: Some("cluster".into()),
            container_port: CLUSTER_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }

    let container = Container {
        name: "broker".into(),
        image: Some(v.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        env: Some(vars.into_iter().chain(security_env(v)).collect()),
        ports: Some(ports),
        // Opening a large RocksDB can take a while: up to 5 minutes before
        // liveness applies.
        startup_probe: Some(http_probe("/healthz", 5, 60)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        // Leave time for the Service endpoints to drop the pod before the
        // broker stops accepting connections.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler { sleep: Some(SleepAction { seconds: 5 }), ..LifecycleHandler::default() }),
            ..Lifecycle::default()
        }),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(
            vec![
                VolumeMount { name: "data".into(), mount_path: VOLUME_DIR.into(), ..VolumeMount::default() },
                VolumeMount { name: "config".into(), mount_path: CONFIG_DIR.into(), read_only: Some(true), ..VolumeMount::default() },
                VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
            ]
            .into_iter()
            .chain(security_mounts(v))
            .collect(),
        ),
        ..Container::default()
    };

    let spread = |key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector { match_labels: Some(v.selector_labels()), ..LabelSelector::default() }),
        ..TopologySpreadConstraint::default()
    };

    let pod = PodSpec {
        service_account_name: Some(v.name.clone()),
        // The token only when the broker asks the API server about clients'
        // ServiceAccount tokens.
        automount_service_account_token: Some(v.needs_api_token()),
        termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            fs_group_change_policy: Some("OnRootMismatch".into()),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(
            vec![
                Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource { name: v.config_map_name(), ..ConfigMapVolumeSource::default() }),
                    ..Volume::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity("64Mi".into())), ..EmptyDirVolumeSource::default() }),
                    ..Volume::default()
                },
            ]
            .into_iter()
            .chain(security_volumes(v))
            .collect(),
        ),
        topology_spread_constraints: Some(vec![spread("kubernetes.io/hostname"), spread("topology.kubernetes.io/zone")]),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty())
            .then(|| spec.image_pull_secrets.iter().map(|name| LocalObjectReference { name: name.clone() }).collect()),
        ..PodSpec::default()
    };

    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some("data".into()), labels: Some(v.selector_labels()), ..ObjectMeta::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), spec.storage.size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };

    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(pod_labels), annotations: Some(pod_annotations), ..ObjectMeta::default() }),
        spec: Some(pod),
    };
    let mut metadata = v.meta(v.name.clone());
    let (ordinals, update_strategy) = if v.is_cluster() {
        let hash = stable_hash(&serde_json::to_string(&template).unwrap_or_default());
        metadata.annotations = Some(BTreeMap::from([(TEMPLATE_HASH_ANNOTATION.to_string(), hash)]));
        // Restarts go one pod at a time and only as far down as the
        // partition, which the operator lowers pod by pod once the broker
        // says no queue would lose its majority (see `rollout`).
        let strategy = StatefulSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateStatefulSetStrategy { partition: Some(0), ..RollingUpdateStatefulSetStrategy::default() }),
        };
        (Some(StatefulSetOrdinals { start: Some(FIRST_ORDINAL) }), Some(strategy))
    } else {
        (None, None)
    };

    StatefulSet {
        metadata,
        spec: StatefulSetSpec {
            replicas: Some(spec.replicas),
            ordinals,
            update_strategy,
            service_name: Some(v.headless_service_name()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector { match_labels: Some(v.selector_labels()), ..LabelSelector::default() },
            template,
            volume_claim_templates: Some(vec![claim]),
            // Messages outlive the Broker object: deleting or scaling the
            // Broker never deletes a volume.
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".into()),
                when_scaled: Some("Retain".into()),
            }),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// Security settings of the broker container, as `WARREN_*` variables:
/// file paths and modes, never a secret.
pub fn security_env(v: &ValidatedBroker) -> Vec<EnvVar> {
    let auth = &v.spec.auth;
    let mut out = Vec::new();
    if auth.enabled {
        out.push(env("WARREN_ADMIN_USER", ADMIN_USER));
        out.push(env("WARREN_ADMIN_PASSWORD_FILE", &format!("{ADMIN_DIR}/password")));
        let mode = match auth.service_account_tokens {
            ServiceAccountTokens::TokenReview => "token-review",
            ServiceAccountTokens::Jwks => "jwks",
            ServiceAccountTokens::Disabled => "off",
        };
        out.push(env("WARREN_KUBERNETES_AUTH", mode));
        out.push(env("WARREN_KUBERNETES_AUDIENCE", &auth.service_account_audience));
        if let Some(n) = auth.max_connections_per_user {
            out.push(env("WARREN_MAX_CONNECTIONS_PER_USER", &n.max(0).to_string()));
        }
        if let Some(n) = auth.max_streams_per_user {
            out.push(env("WARREN_MAX_STREAMS_PER_USER", &n.max(0).to_string()));
        }
    } else {
        // Asked for explicitly in the Broker: the broker refuses to listen
        // beyond loopback without authentication otherwise.
        out.push(env("WARREN_INSECURE", "true"));
    }
    if let Some(tls) = &v.spec.tls {
        out.push(env("WARREN_TLS_CERT", &format!("{TLS_DIR}/tls.crt")));
        out.push(env("WARREN_TLS_KEY", &format!("{TLS_DIR}/tls.key")));
        match tls.client_auth {
            ClientAuth::None => {}
            ClientAuth::Optional | ClientAuth::Required => {
                out.push(env("WARREN_TLS_CLIENT_CA", &format!("{TLS_DIR}/ca.crt")));
                out.push(env("WARREN_TLS_CLIENT_AUTH", if tls.client_auth == ClientAuth::Required { "required" } else { "optional" }));
            }
        }
    }
    out
}

fn security_mounts(v: &ValidatedBroker) -> Vec<VolumeMount> {
    let mut out = Vec::new();
    if v.spec.auth.enabled {
        out.push(VolumeMount { name: "admin".into(), mount_path: ADMIN_DIR.into(), read_only: Some(true), ..VolumeMount::default() });
    }
    if v.spec.tls.is_some() {
        out.push(VolumeMount { name: "tls".into(), mount_path: TLS_DIR.into(), read_only: Some(true), ..VolumeMount::default() });
    }
    if v.is_cluster() {
        out.push(VolumeMount {
            name: "cluster-secret".into(),
            mount_path: CLUSTER_SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    out
}

fn security_volumes(v: &ValidatedBroker) -> Vec<Volume> {
    let mut out = Vec::new();
    if v.spec.auth.enabled {
        out.push(secret_key_volume("admin", v.admin_secret_name(), "password"));
    }
    if let Some(secret) = v.tls_secret_name() {
        // Mounted whole (not subPath): the kubelet updates it in place when
        // cert-manager renews it, and the broker reloads it.
        out.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret), default_mode: Some(0o440), ..SecretVolumeSource::default() }),
            ..Volume::default()
        });
    }
    if v.is_cluster() {
        out.push(secret_key_volume("cluster-secret", v.cluster_secret_name(), "secret"));
    }
    out
}

/// A volume `name` holding one key of the Secret `secret` as a file of the
/// same name, readable by the pod's group only.
fn secret_key_volume(name: &str, secret: String, key: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items: Some(vec![KeyToPath { key: key.into(), path: key.into(), ..KeyToPath::default() }]),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The secret a cluster's nodes share, generated once like the
/// administrator credential (changing it under running nodes would split
/// them).
pub fn cluster_secret(v: &ValidatedBroker, secret: &str) -> Secret {
    Secret {
        metadata: v.meta(v.cluster_secret_name()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([("secret".to_string(), secret.to_string())])),
        ..Secret::default()
    }
}

/// The administrator credential, generated once (the reconciler creates it
/// only when it does not exist, so the password never changes under the
/// broker).
pub fn admin_secret(v: &ValidatedBroker, password: &str) -> Secret {
    Secret {
        metadata: v.meta(v.admin_secret_name()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            ("username".to_string(), ADMIN_USER.to_string()),
            ("password".to_string(), password.to_string()),
        ])),
        ..Secret::default()
    }
}

/// A random password: 32 characters of [A-Za-z0-9] (190 bits).
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// The NetworkPolicy of a Broker's pods: gRPC and HTTP (metrics, health)
/// from anywhere, the node-to-node port only from the Broker's own pods;
/// every other port refused.
pub fn network_policy(v: &ValidatedBroker) -> NetworkPolicy {
    let port = |p: i32| NetworkPolicyPort { port: Some(IntOrString::Int(p)), protocol: Some("TCP".into()), ..NetworkPolicyPort::default() };
    NetworkPolicy {
        metadata: v.meta(v.name.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(v.selector_labels()), ..LabelSelector::default() }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule { ports: Some(vec![port(GRPC_PORT), port(HTTP_PORT)]), ..NetworkPolicyIngressRule::default() },
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector { match_labels: Some(v.selector_labels()), ..LabelSelector::default() }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![port(CLUSTER_PORT)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The cert-manager Certificate for a Broker with `spec.tls.issuerRef`: its
/// Service names (clients) and per-pod names (peers), server and client
/// usages (the same certificate serves the node-to-node mutual TLS).
pub fn certificate(v: &ValidatedBroker) -> Option<serde_json::Value> {
    let tls = v.spec.tls.as_ref()?;
    let issuer = tls.issuer_ref.as_ref()?;
    let kind = match issuer.kind {
        IssuerKind::Issuer => "Issuer",
        IssuerKind::ClusterIssuer => "ClusterIssuer",
    };
    Some(serde_json::json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {
            "name": format!("{}-tls", v.name),
            "namespace": v.namespace,
            "labels": v.labels(),
            "ownerReferences": [v.owner],
        },
        "spec": {
            "secretName": format!("{}-tls", v.name),
            "commonName": format!("{}.{}.svc", v.name, v.namespace),
            "dnsNames": v.dns_names(),
            "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
            "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
            "issuerRef": { "name": issuer.name, "kind": kind, "group": issuer.group.clone().unwrap_or_else(|| "cert-manager.io".into()) },
        },
    }))
}

/// The ClusterRoleBinding letting a Broker's ServiceAccount create
/// TokenReviews (`role`: the chart's ClusterRole). Cluster-scoped, so no
/// owner reference: the reconciler removes bindings whose Broker is gone.
pub fn token_review_binding(v: &ValidatedBroker, role: &str) -> ClusterRoleBinding {
    let mut labels = v.labels();
    labels.insert(TOKEN_REVIEW_NAMESPACE_LABEL.into(), v.namespace.clone());
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(token_review_binding_name(&v.namespace, &v.name)),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef { api_group: Some("rbac.authorization.k8s.io".into()), kind: "ClusterRole".into(), name: role.into() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: v.name.clone(),
            namespace: Some(v.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// Label on a TokenReview ClusterRoleBinding naming its Broker's namespace
/// (`app.kubernetes.io/instance` names the Broker).
pub const TOKEN_REVIEW_NAMESPACE_LABEL: &str = "warren.dev/broker-namespace";

/// The name of a Broker's TokenReview ClusterRoleBinding.
pub fn token_review_binding_name(namespace: &str, name: &str) -> String {
    format!("warren-tokenreview-{namespace}-{name}")
}

/// The rolling update partition of a StatefulSet: pods at this index and
/// above run the newest template; 0 when it sets none.
pub fn partition(sts: &StatefulSet) -> i32 {
    sts.spec.update_strategy.as_ref().and_then(|u| u.rolling_update.as_ref()).and_then(|r| r.partition).unwrap_or(0)
}

/// Sets the rolling update partition of a cluster's StatefulSet (a
/// single broker's has no update strategy and is left alone).
pub fn set_partition(sts: &mut StatefulSet, partition: i32) {
    if let Some(r) = sts.spec.update_strategy.as_mut().and_then(|u| u.rolling_update.as_mut()) {
        r.partition = Some(partition);
    }
}

/// The pod template hash the operator recorded on a StatefulSet.
pub fn template_hash(sts: &StatefulSet) -> Option<&str> {
    sts.metadata.annotations.as_ref()?.get(TEMPLATE_HASH_ANNOTATION).map(String::as_str)
}

/// Every object a Broker owns, in the order they are applied.
pub struct Children {
    /// The pods' ServiceAccount.
    pub service_account: ServiceAccount,
    /// The configuration.
    pub config_map: ConfigMap,
    /// Per-pod DNS.
    pub headless_service: Service,
    /// Client access.
    pub client_service: Service,
    /// The pods.
    pub stateful_set: StatefulSet,
    /// Disruption budget.
    pub pod_disruption_budget: PodDisruptionBudget,
}

/// Builds every child of a Broker.
pub fn build(v: &ValidatedBroker) -> Children {
    Children {
        service_account: service_account(v),
        config_map: config_map(v),
        headless_service: headless_service(v),
        client_service: client_service(v),
        stateful_set: stateful_set(v),
        pod_disruption_budget: pod_disruption_budget(v),
    }
}
