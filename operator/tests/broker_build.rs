//! Pure builder tests: the objects produced from Broker specs, and the
//! Broker status computed from a StatefulSet. No API server involved.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use warren_crds::v1alpha1::{Broker, BrokerStatus};
use warren_operator::broker::build::{self, ValidatedBroker};
use warren_operator::broker::status;

fn broker(spec: serde_json::Value) -> Broker {
    serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": "messaging", "uid": "uid-1", "generation": 3},
        "spec": spec
    }))
    .unwrap()
}

fn validated(spec: serde_json::Value) -> ValidatedBroker {
    build::validate(&broker(spec), "warren/broker:1.0").unwrap()
}

#[test]
fn should_run_a_non_root_read_only_pod_with_probes_and_a_volume_claim() {
    let v = validated(json!({"storage": {"size": "20Gi", "storageClassName": "fast"}, "resources": {"limits": {"memory": "1Gi"}}}));
    let sts = build::stateful_set(&v);
    let spec = &sts.spec;
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("warren-headless"));
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("warren/broker:1.0"));

    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.fs_group, Some(build::RUN_AS));
    assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let csc = c.security_context.as_ref().unwrap();
    assert_eq!(csc.read_only_root_filesystem, Some(true));
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(csc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
    // Its token is mounted: by default the broker validates clients'
    // ServiceAccount tokens with TokenReview.
    assert_eq!(pod.automount_service_account_token, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("warren"));

    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
    assert_eq!(probe_path(&c.liveness_probe), "/healthz");
    assert_eq!(probe_path(&c.readiness_probe), "/readyz");
    assert_eq!(probe_path(&c.startup_probe), "/healthz");
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    assert!(c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap().sleep.is_some());

    let env: Vec<_> = c.env.as_ref().unwrap().iter().map(|e| (e.name.as_str(), e.value.clone())).collect();
    assert!(env.contains(&("WARREN_GRPC_ADDR", Some("[::]:5680".into()))));
    assert!(env.contains(&("WARREN_HTTP_ADDR", Some("[::]:15680".into()))));
    assert!(env.contains(&("WARREN_DATA_DIR", Some("/var/lib/warren/data".into()))), "a directory of the volume, not its root");
    let mounts = c.volume_mounts.as_ref().unwrap();
    assert!(mounts.iter().any(|m| m.name == "data" && m.mount_path == "/var/lib/warren"));
    assert!(env.contains(&("WARREN_CONFIG", Some("/etc/warren/warren.toml".into()))));
    assert!(env.iter().any(|(n, _)| *n == "WARREN_NODE_NAME"));

    let claims = spec.volume_claim_templates.as_ref().unwrap();
    let claim = claims[0].spec.as_ref().unwrap();
    assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(claim.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0, "20Gi");
    let retention = spec.persistent_volume_claim_retention_policy.as_ref().unwrap();
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"), "deleting a Broker never deletes its messages");

    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    assert_eq!(spread[0].topology_key, "kubernetes.io/hostname");
    assert_eq!(c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0, "1Gi");
    assert_eq!(sts.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
}

#[test]
fn should_roll_pods_when_the_configuration_changes() {
    let hash = |spec| {
        let sts = build::stateful_set(&validated(spec));
        sts.spec.template.metadata.unwrap().annotations.unwrap()[build::CONFIG_HASH_ANNOTATION].clone()
    };
    assert_eq!(hash(json!({})), hash(json!({})), "stable across builds");
    assert_ne!(hash(json!({})), hash(json!({"config": {"maxMessageSize": 1024}})));
}

#[test]
fn should_write_the_broker_configuration_file() {
    let v = validated(json!({"config": {"maxMessageSize": 1048576, "queueWindowMessages": 100, "logFormat": "text"}}));
    let cm = build::config_map(&v);
    assert_eq!(cm.metadata.name.as_deref(), Some("warren-config"));
    let toml = &cm.data.as_ref().unwrap()[build::CONFIG_FILE];
    assert!(toml.contains("log_format = \"text\"\n"), "{toml}");
    assert!(toml.contains("max_message_size = 1048576\n"), "{toml}");
    assert!(toml.contains("queue_window_messages = 100\n"), "{toml}");
    assert!(!toml.contains("block_cache_bytes"), "unset settings keep the broker's defaults: {toml}");
    assert!(!toml.contains("memory_high_watermark"), "{toml}");
}

#[test]
fn should_write_resource_alarm_settings_in_the_brokers_units() {
    let v = validated(json!({"config": {
        "memoryHighWatermark": "0.5", "memoryCalculationStrategy": "allocated", "diskFreeLimit": "2Gi",
        "publishBlockTimeout": "30s", "alarmCheckInterval": "250ms"
    }}));
    let toml = build::config_toml(&v);
    assert!(toml.contains("memory_high_watermark = \"0.5\"\n"), "a fraction keeps its decimal point: {toml}");
    assert!(toml.contains("memory_calculation_strategy = \"allocated\"\n"), "{toml}");
    assert!(toml.contains("disk_free_limit = 2147483648\n"), "quantities become plain bytes: {toml}");
    assert!(toml.contains("publish_block_timeout = \"30s\"\n"), "{toml}");
    assert!(toml.contains("alarm_check_interval = \"250ms\"\n"), "{toml}");

    let toml = build::config_toml(&validated(json!({"config": {"memoryHighWatermark": "1.", "diskFreeLimit": 1000}})));
    assert!(toml.contains("memory_high_watermark = \"1.0\"\n"), "{toml}");
    assert!(toml.contains("disk_free_limit = 1000\n"), "{toml}");
    let toml = build::config_toml(&validated(json!({"config": {"memoryHighWatermark": "512Mi"}})));
    assert!(toml.contains("memory_high_watermark = 536870912\n"), "absolute: bytes, no decimal point: {toml}");

    // Every key written is one the broker knows (it refuses the others).
    for line in build::config_toml(&v).lines().filter(|l| !l.starts_with('#')) {
        let key = line.split(" = ").next().unwrap();
        assert!(build::CONFIG_KEYS.contains(&key), "{key} is not a known broker setting");
    }
}

#[test]
fn should_refuse_settings_the_schema_missed_instead_of_crash_looping_the_broker() {
    for (config, want) in [
        (json!({"memoryHighWatermark": "1.5"}), "memoryHighWatermark is 1.5"),
        (json!({"diskFreeLimit": "99999999999999P"}), "diskFreeLimit"),
        (json!({"publishBlockTimeout": "10"}), "publishBlockTimeout is 10"),
    ] {
        let e = build::validate(&broker(json!({"config": config})), "img").unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(build::quantity_bytes("1Ki"), Some(1024));
    assert_eq!(build::quantity_bytes("1G"), Some(1_000_000_000));
    assert_eq!(build::quantity_bytes("1.5Gi"), None);
}

#[test]
fn should_expose_grpc_through_a_client_and_a_headless_service() {
    let v = validated(json!({"service": {"type": "LoadBalancer", "annotations": {"lb": "internal"}}}));
    let client = build::client_service(&v);
    let spec = client.spec.as_ref().unwrap();
    assert_eq!(client.metadata.name.as_deref(), Some("warren"));
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(client.metadata.annotations.as_ref().unwrap()["lb"], "internal");
    let ports: Vec<_> = spec.ports.as_ref().unwrap().iter().map(|p| (p.name.clone().unwrap(), p.port)).collect();
    assert_eq!(ports, [("grpc".to_string(), 5680), ("http".to_string(), 15680)]);
    assert_eq!(spec.selector.as_ref().unwrap()["app.kubernetes.io/instance"], "warren");

    let headless = build::headless_service(&v);
    let spec = headless.spec.as_ref().unwrap();
    assert_eq!(headless.metadata.name.as_deref(), Some("warren-headless"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(v.endpoint(), "warren.messaging.svc:5680");
}

#[test]
fn should_budget_one_voluntary_disruption() {
    let pdb = build::pod_disruption_budget(&validated(json!({})));
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)));
    assert_eq!(spec.selector.unwrap().match_labels.unwrap()["app.kubernetes.io/name"], "warren-broker");
}

#[test]
fn should_refuse_names_too_long_for_statefulset_labels_and_sizes_out_of_range() {
    let mut b = broker(json!({}));
    b.metadata.name = Some("x".repeat(53));
    let e = build::validate(&b, "img").unwrap_err().to_string();
    assert!(e.contains("at most 52"), "{e}");
    for replicas in [0, 8] {
        let mut b = broker(json!({}));
        b.spec.replicas = replicas;
        let e = build::validate(&b, "img").unwrap_err().to_string();
        assert!(e.contains(&format!("spec.replicas is {replicas}; a Broker runs 1 to 7 pods")), "{e}");
    }
    for replicas in 1..=7 {
        assert!(build::validate(&broker(json!({"replicas": replicas})), "img").is_ok());
    }
    let v = build::validate(&broker(json!({"image": "mine:2"})), "img").unwrap();
    assert_eq!(v.image, "mine:2", "spec.image wins over the operator default");
}

fn sts(ready: i32, updated: i32, observed: i64, generation: i64) -> StatefulSet {
    let mut s = StatefulSet::default();
    s.metadata.generation = Some(generation);
    s.status = Some(StatefulSetStatus {
        replicas: 1,
        ready_replicas: Some(ready),
        updated_replicas: Some(updated),
        observed_generation: Some(observed),
        ..StatefulSetStatus::default()
    });
    s
}

fn condition<'a>(s: &'a BrokerStatus, t: &str) -> (&'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn should_report_ready_progressing_and_degraded() {
    let v = validated(json!({}));
    let now = Timestamp::now();
    let s = status::from_stateful_set(&v, &sts(1, 1, 1, 1), &BrokerStatus::default(), now);
    assert_eq!(condition(&s, "Ready"), ("True", "AllReplicasReady"));
    assert_eq!(condition(&s, "Progressing"), ("False", "RolloutComplete"));
    assert_eq!(condition(&s, "Degraded"), ("False", "AsExpected"));
    assert_eq!(s.observed_generation, Some(3));

    let starting = status::from_stateful_set(&v, &sts(0, 1, 1, 1), &BrokerStatus::default(), now);
    assert_eq!(condition(&starting, "Ready"), ("False", "ReplicasNotReady"));
    assert_eq!(condition(&starting, "Progressing"), ("True", "WaitingForReadiness"));
    assert_eq!(condition(&starting, "Degraded").0, "False");

    let rolling = status::from_stateful_set(&v, &sts(1, 0, 1, 2), &s, now);
    assert_eq!(condition(&rolling, "Progressing"), ("True", "RollingOut"));

    // Not ready for longer than the progress deadline: degraded.
    let later = now.checked_add(status::PROGRESS_DEADLINE + SignedDuration::from_secs(1)).unwrap();
    let stuck = status::from_stateful_set(&v, &sts(0, 1, 1, 1), &starting, later);
    assert_eq!(condition(&stuck, "Degraded"), ("True", "ReplicasNotReady"));
    assert_eq!(condition(&stuck, "Progressing").0, "False");
}

fn broker_env(v: &ValidatedBroker) -> Vec<(String, String)> {
    let sts = build::stateful_set(v);
    let c = &sts.spec.template.spec.as_ref().unwrap().containers[0];
    c.env.as_ref().unwrap().iter().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

fn has(env: &[(String, String)], name: &str, value: &str) -> bool {
    env.iter().any(|(n, v)| n == name && v == value)
}

#[test]
fn should_turn_authentication_on_by_default_with_a_generated_admin_secret() {
    let v = validated(json!({}));
    let env = broker_env(&v);
    assert!(has(&env, "WARREN_ADMIN_PASSWORD_FILE", "/etc/warren-admin/password"), "{env:?}");
    assert!(has(&env, "WARREN_KUBERNETES_AUTH", "token-review"), "{env:?}");
    assert!(has(&env, "WARREN_KUBERNETES_AUDIENCE", "warren"), "{env:?}");
    assert!(!env.iter().any(|(n, _)| n == "WARREN_INSECURE"));
    // No secret in the environment or the ConfigMap: only file paths.
    assert!(!env.iter().any(|(n, _)| n.contains("PASSWORD") && !n.ends_with("_FILE")));
    let sts = build::stateful_set(&v);
    let pod = sts.spec.template.spec.as_ref().unwrap();
    let admin = pod.volumes.as_ref().unwrap().iter().find(|vol| vol.name == "admin").unwrap();
    assert_eq!(admin.secret.as_ref().unwrap().secret_name.as_deref(), Some("warren-admin"));
    let cm = build::config_map(&v);
    assert!(!cm.data.as_ref().unwrap().values().any(|t| t.contains("password")), "{cm:?}");

    let secret = build::admin_secret(&v, &build::generate_password());
    assert_eq!(secret.metadata.name.as_deref(), Some("warren-admin"));
    assert_eq!(secret.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
    let data = secret.string_data.as_ref().unwrap();
    assert_eq!(data["username"], "admin");
    assert_eq!(data["password"].len(), 32);
    assert_ne!(build::generate_password(), build::generate_password());

    // Turned off on purpose: the broker is told to run open.
    let open = validated(json!({"auth": {"enabled": false}}));
    let env = broker_env(&open);
    assert!(has(&env, "WARREN_INSECURE", "true"), "{env:?}");
    assert!(!env.iter().any(|(n, _)| n == "WARREN_ADMIN_PASSWORD_FILE"));
    assert_eq!(build::stateful_set(&open).spec.template.spec.unwrap().automount_service_account_token, Some(false));
    let jwks = validated(json!({"auth": {"serviceAccountTokens": "Jwks", "maxConnectionsPerUser": 50, "maxStreamsPerUser": 500}}));
    let env = broker_env(&jwks);
    assert!(has(&env, "WARREN_KUBERNETES_AUTH", "jwks") && has(&env, "WARREN_MAX_CONNECTIONS_PER_USER", "50"), "{env:?}");
    assert!(has(&env, "WARREN_MAX_STREAMS_PER_USER", "500"), "{env:?}");
}

#[test]
fn should_mount_tls_from_a_secret_or_a_cert_manager_certificate() {
    let v = validated(json!({"tls": {"secretName": "broker-tls", "clientAuth": "Required"}}));
    let env = broker_env(&v);
    assert!(has(&env, "WARREN_TLS_CERT", "/etc/warren-tls/tls.crt") && has(&env, "WARREN_TLS_KEY", "/etc/warren-tls/tls.key"), "{env:?}");
    assert!(has(&env, "WARREN_TLS_CLIENT_CA", "/etc/warren-tls/ca.crt") && has(&env, "WARREN_TLS_CLIENT_AUTH", "required"), "{env:?}");
    let sts = build::stateful_set(&v);
    let pod = sts.spec.template.spec.as_ref().unwrap();
    let tls = pod.volumes.as_ref().unwrap().iter().find(|vol| vol.name == "tls").unwrap();
    let source = tls.secret.as_ref().unwrap();
    assert_eq!(source.secret_name.as_deref(), Some("broker-tls"));
    assert!(source.items.is_none(), "mounted whole, so that renewals reach the pod");
    let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "tls").unwrap();
    assert!(mount.sub_path.is_none() && mount.read_only == Some(true));
    assert!(build::certificate(&v).is_none());

    let v = validated(json!({"tls": {"issuerRef": {"name": "cluster-ca", "kind": "ClusterIssuer"}}}));
    let cert = build::certificate(&v).unwrap();
    assert_eq!(cert["kind"], "Certificate");
    assert_eq!(cert["spec"]["secretName"], "warren-tls");
    assert_eq!(cert["spec"]["issuerRef"], json!({"name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}));
    let names = cert["spec"]["dnsNames"].as_array().unwrap();
    assert!(names.contains(&json!("warren.messaging.svc")) && names.contains(&json!("*.warren-headless.messaging.svc")), "{names:?}");
    assert_eq!(cert["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    let env = broker_env(&v);
    assert!(has(&env, "WARREN_TLS_CERT", "/etc/warren-tls/tls.crt"));
    assert!(!env.iter().any(|(n, _)| n == "WARREN_TLS_CLIENT_CA"), "no client certificates unless asked");
}

#[test]
fn should_admit_only_client_and_peer_traffic() {
    let v = validated(json!({}));
    let np = build::network_policy(&v);
    let spec = np.spec.unwrap();
    assert_eq!(spec.pod_selector.as_ref().unwrap().match_labels, Some(v.selector_labels()));
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let rules = spec.ingress.unwrap();
    let ports =
        |i: usize| -> Vec<String> { rules[i].ports.as_ref().unwrap().iter().map(|p| format!("{:?}", p.port.as_ref().unwrap())).collect() };
    assert_eq!(rules.len(), 2);
    assert!(rules[0].from.is_none(), "clients from anywhere");
    assert_eq!(ports(0), ["Int(5680)", "Int(15680)"]);
    let peers = rules[1].from.as_ref().unwrap();
    assert_eq!(peers[0].pod_selector.as_ref().unwrap().match_labels, Some(v.selector_labels()), "peers: this Broker's pods only");
    assert_eq!(ports(1), ["Int(5681)"]);

    let crb = build::token_review_binding(&v, "warren-broker-tokenreview");
    assert_eq!(crb.metadata.name.as_deref(), Some("warren-tokenreview-messaging-warren"));
    assert_eq!(crb.role_ref.name, "warren-broker-tokenreview");
    let subject = &crb.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", "warren", Some("messaging"))
    );
}

/// Every child of a single broker (one replica), serialized, as committed in
/// `tests/fixtures/single-broker.json`: clusters must not change what a
/// single broker runs (no peers, no cluster port, no update strategy, no
/// pod restart on upgrade). `WARREN_UPDATE_FIXTURES=1` rewrites the file
/// after a deliberate change.
#[test]
fn should_build_a_single_broker_exactly_as_before() {
    let v = validated(json!({
        "replicas": 1, "storage": {"size": "20Gi"}, "listenAddress": "0.0.0.0",
        "config": {"maxMessageSize": 1048576, "memoryHighWatermark": "0.4"},
        "service": {"type": "LoadBalancer"}, "nodeSelector": {"disk": "ssd"}
    }));
    let c = build::build(&v);
    let got = serde_json::to_string_pretty(&json!({
        "serviceAccount": c.service_account, "configMap": c.config_map, "headlessService": c.headless_service,
        "clientService": c.client_service, "statefulSet": c.stateful_set, "podDisruptionBudget": c.pod_disruption_budget,
    }))
    .unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-broker.json");
    if std::env::var_os("WARREN_UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, format!("{got}\n")).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert_eq!(got, want.trim_end(), "a single broker's objects changed; if deliberately, run with WARREN_UPDATE_FIXTURES=1");
    let sts = serde_json::to_string(&c.stateful_set).unwrap();
    for absent in ["WARREN_PEERS", "WARREN_NODE_ID", "5681", "updateStrategy", "ordinals", "pod-template-hash"] {
        assert!(!sts.contains(absent), "a single broker's StatefulSet has {absent}");
    }
}

fn env_of(sts: &StatefulSet) -> Vec<(String, String)> {
    let c = &sts.spec.template.spec.as_ref().unwrap().containers[0];
    c.env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => format!("from {}", from.field_ref.as_ref().unwrap().field_path),
                (None, None) => String::new(),
            };
            (e.name.clone(), value)
        })
        .collect()
}

fn env_value(sts: &StatefulSet, name: &str) -> String {
    env_of(sts).into_iter().find(|(n, _)| n == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn should_run_a_cluster_with_node_ids_peers_and_a_cluster_port() {
    let v = validated(json!({"replicas": 3}));
    let sts = build::stateful_set(&v);
    let spec = &sts.spec;
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"), "all pods start at once, so the first election has a quorum");
    assert_eq!(spec.ordinals.as_ref().unwrap().start, Some(1), "pod warren-1 is node 1");
    assert_eq!(spec.service_name.as_deref(), Some("warren-headless"));
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(build::partition(&sts), 0, "a new cluster starts every pod");

    assert_eq!(env_value(&sts, "WARREN_NODE_ID"), "from metadata.labels['apps.kubernetes.io/pod-index']");
    assert_eq!(env_value(&sts, "WARREN_CLUSTER_ADDR"), "[::]:5681");
    assert_eq!(
        env_value(&sts, "WARREN_PEERS"),
        "1=warren-1.warren-headless.messaging.svc:5681,2=warren-2.warren-headless.messaging.svc:5681,\
         3=warren-3.warren-headless.messaging.svc:5681"
    );
    assert_eq!(env_value(&sts, "WARREN_DEFAULT_QUEUE_TYPE"), "quorum");
    assert_eq!(env_value(&sts, "WARREN_GRPC_ADDR"), "[::]:5680", "clients as before");

    let c = &spec.template.spec.as_ref().unwrap().containers[0];
    let ports: Vec<_> = c.ports.as_ref().unwrap().iter().map(|p| (p.name.clone().unwrap(), p.container_port)).collect();
    assert_eq!(ports, [("grpc".to_string(), 5680), ("http".to_string(), 15680), ("cluster".to_string(), 5681)]);

    let pod = spec.template.spec.as_ref().unwrap();
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    assert_eq!(spread[0].topology_key, "kubernetes.io/hostname");
    assert_eq!(spread[0].when_unsatisfiable, "ScheduleAnyway");
    assert_eq!(spread[0].max_skew, 1);
    assert_eq!(spread[0].label_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["app.kubernetes.io/instance"], "warren");

    let headless = build::headless_service(&v);
    let hspec = headless.spec.unwrap();
    assert_eq!(hspec.publish_not_ready_addresses, Some(true), "pods find each other before they are ready");
    assert_eq!(hspec.cluster_ip.as_deref(), Some("None"));
    assert!(hspec.ports.unwrap().iter().any(|p| p.name.as_deref() == Some("cluster") && p.port == 5681));
    let client = build::client_service(&v).spec.unwrap();
    assert!(client.ports.unwrap().iter().all(|p| p.port != 5681), "clients never reach the cluster port");
    let pdb = build::pod_disruption_budget(&v).spec.unwrap();
    assert_eq!(pdb.max_unavailable, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)));

    assert_eq!(v.pod_name(0), "warren-1");
    assert_eq!(ValidatedBroker::node_id(2), 3);
}

#[test]
fn should_authenticate_the_nodes_of_a_cluster_with_a_generated_secret_and_mutual_tls_when_the_ca_is_known() {
    let env_names = |sts: &StatefulSet| env_of(sts).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let v = validated(json!({"replicas": 3}));
    let sts = build::stateful_set(&v);
    assert_eq!(env_value(&sts, "WARREN_CLUSTER_SECRET_FILE"), "/etc/warren-cluster/secret");
    let pod = sts.spec.template.spec.as_ref().unwrap();
    let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "cluster-secret").expect("the cluster secret volume");
    assert_eq!(volume.secret.as_ref().unwrap().secret_name.as_deref(), Some("warren-cluster-secret"));
    let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "cluster-secret").unwrap();
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/warren-cluster", Some(true)));
    assert!(!env_names(&sts).contains(&"WARREN_CLUSTER_TLS_CERT".to_string()), "no TLS without a certificate");

    let secret = build::cluster_secret(&v, "s3cr3t-s3cr3t-s3cr3t");
    assert_eq!(secret.metadata.name.as_deref(), Some("warren-cluster-secret"));
    assert_eq!(secret.metadata.owner_references.as_ref().unwrap()[0].controller, Some(true), "deleted with its Broker");
    assert_eq!(secret.string_data.unwrap()["secret"], "s3cr3t-s3cr3t-s3cr3t");

    // cert-manager issues a certificate for client and server use, with
    // its CA: the nodes speak mutual TLS with it.
    let tls = build::stateful_set(&validated(json!({"replicas": 3, "tls": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}})));
    assert_eq!(env_value(&tls, "WARREN_CLUSTER_TLS_CERT"), "/etc/warren-tls/tls.crt");
    assert_eq!(env_value(&tls, "WARREN_CLUSTER_TLS_KEY"), "/etc/warren-tls/tls.key");
    assert_eq!(env_value(&tls, "WARREN_CLUSTER_TLS_CA"), "/etc/warren-tls/ca.crt");
    assert_eq!(env_value(&tls, "WARREN_CLUSTER_SECRET_FILE"), "/etc/warren-cluster/secret", "the secret as well");
    // A Secret given by name may lack ca.crt unless client certificates
    // are asked for.
    let given = build::stateful_set(&validated(json!({"replicas": 3, "tls": {"secretName": "mine"}})));
    assert!(!env_names(&given).contains(&"WARREN_CLUSTER_TLS_CA".to_string()));
    let given_ca = build::stateful_set(&validated(json!({"replicas": 3, "tls": {"secretName": "mine", "clientAuth": "Optional"}})));
    assert_eq!(env_value(&given_ca, "WARREN_CLUSTER_TLS_CA"), "/etc/warren-tls/ca.crt");

    // A single broker has no node-to-node listener.
    let single = build::stateful_set(&validated(json!({"tls": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}})));
    let names = env_names(&single);
    assert!(!names.iter().any(|n| n.starts_with("WARREN_CLUSTER_")), "{names:?}");
}

#[test]
fn should_listen_for_peers_on_the_brokers_listen_address_and_pass_the_default_queue_type() {
    let sts = build::stateful_set(&validated(json!({"replicas": 5, "listenAddress": "0.0.0.0", "defaultQueueType": "classic"})));
    assert_eq!(env_value(&sts, "WARREN_CLUSTER_ADDR"), "0.0.0.0:5681");
    assert_eq!(env_value(&sts, "WARREN_DEFAULT_QUEUE_TYPE"), "classic");
    let peers = env_value(&sts, "WARREN_PEERS");
    assert_eq!(peers.split(',').count(), 5);
    assert!(peers.ends_with(",5=warren-5.warren-headless.messaging.svc:5681"), "{peers}");
}

#[test]
fn should_record_a_template_hash_that_changes_with_the_members() {
    let hash = |spec| build::template_hash(&build::stateful_set(&validated(spec))).unwrap().to_string();
    assert_eq!(hash(json!({"replicas": 3})), hash(json!({"replicas": 3})), "stable across builds");
    assert_ne!(hash(json!({"replicas": 3})), hash(json!({"replicas": 5})), "new peers roll the pods");
    assert_ne!(hash(json!({"replicas": 3})), hash(json!({"replicas": 3, "config": {"maxMessageSize": 1024}})));
    assert_ne!(hash(json!({"replicas": 3})), hash(json!({"replicas": 3, "image": "other:2"})));
    assert!(build::template_hash(&build::stateful_set(&validated(json!({})))).is_none(), "not on a single broker");

    let mut sts = build::stateful_set(&validated(json!({"replicas": 3})));
    build::set_partition(&mut sts, 2);
    assert_eq!(build::partition(&sts), 2);
    let mut single = build::stateful_set(&validated(json!({})));
    build::set_partition(&mut single, 2);
    assert!(single.spec.update_strategy.is_none(), "a single broker has no partition to set");
}

#[test]
fn should_show_a_rollout_waiting_for_the_broker_and_a_refused_scale_down() {
    let v = validated(json!({"replicas": 3}));
    let now = Timestamp::now();
    let rolling = status::from_stateful_set(&v, &sts(3, 1, 1, 1), &BrokerStatus::default(), now);
    let waiting = status::rollout_waiting(&rolling, Some(3), "QuorumCritical", "pod warren-2 (node 2) restarts next, but orders");
    assert_eq!(condition(&waiting, "Progressing"), ("True", "QuorumCritical"));
    assert_eq!(condition(&waiting, "Ready"), condition(&rolling, "Ready"), "only Progressing changes");

    let refused = status::scale_down_refused(&rolling, Some(4), "scaling down from 5 to 3 pods removes nodes 4, 5");
    assert_eq!(condition(&refused, "Degraded"), ("True", "ScaleDownRefused"));
    assert_eq!(condition(&refused, "Progressing"), ("False", "ScaleDownRefused"));
    assert_eq!(condition(&refused, "Ready"), condition(&rolling, "Ready"), "the running pods are as they were");
    assert_eq!(refused.observed_generation, Some(4));
}
