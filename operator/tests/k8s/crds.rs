//! The CRDs as the API server sees them: every example accepted, each
//! documented rule refusing a bad manifest with its message, `kubectl
//! explain` text, names that `kubectl` resolves.

use crate::harness::*;

fn refused(namespace: &str, yaml: &str) -> String {
    match try_apply(namespace, yaml) {
        Ok(out) => panic!("the API server accepted a bad manifest ({out}):\n{yaml}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn should_accept_every_example() {
    let _serial = serial().await;
    chart();
    let ns = namespace("crd-examples");
    let mut applied = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let file = path.display().to_string();
            kubectl(&["apply", "--dry-run=server", "-n", &ns.0, "-f", &file]);
            applied += 1;
        }
    }
    assert!(applied >= 5, "found {applied} examples");
}

#[tokio::test]
async fn should_refuse_bad_manifests_with_the_rules_message() {
    let _serial = serial().await;
    chart();
    let ns = namespace("crd-rules");
    let n = &ns.0;
    let queue = |spec: &str| {
        format!("apiVersion: warren.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: q\nspec:\n  brokerRef: {{name: warren}}\n{spec}")
    };
    let broker = |name: &str, spec: &str| {
        let spec = if spec.is_empty() { " {}\n".to_string() } else { format!("\n{spec}") };
        format!("apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: {name}\nspec:{spec}")
    };
    let cases: Vec<(String, &str)> = vec![
        (queue("  overflow: reject-publish\n"), "overflow needs maxLength or maxLengthBytes"),
        (queue("  deadLetterRoutingKey: x\n"), "deadLetterRoutingKey needs deadLetterExchange"),
        (queue("  arguments: {x-message-ttl: 5}\n"), "x-message-ttl has a typed field: set spec.messageTtlMs instead"),
        (queue("  name: amq.direct\n"), "must not start with 'amq.'"),
        (queue("  maxPriority: 300\n"), "spec.maxPriority"),
        (queue("  autoscaling: {target: {name: w}, minReplicas: 5, maxReplicas: 2}\n"), "maxReplicas must be at least minReplicas"),
        (queue("  type: quorum\n  autoDelete: true\n"), "a quorum queue cannot be autoDelete"),
        (broker("b", "  replicas: 8\n"), "spec.replicas in body should be less than or equal to 7"),
        (broker("b", "  replicas: 0\n"), "spec.replicas in body should be greater than or equal to 1"),
        (broker("b", "  defaultQueueType: stream\n"), "spec.defaultQueueType: Unsupported value"),
        (broker("b", "  config: {memoryHighWatermark: 16Mi}\n"), "memoryHighWatermark as a quantity must be at least 32Mi"),
        (broker("b", "  config: {diskFreeLimit: -1}\n"), "spec.config.diskFreeLimit in body should be greater than or equal to 0"),
        (broker("b", "  config: {alarmCheckInterval: 2m}\n"), "alarmCheckInterval must be between 10ms and 60s"),
        (broker("b", "  topologyNamespaces: [\"Not_A_Namespace\"]\n"), "spec.topologyNamespaces"),
        (broker("b.with.dots", ""), "a Broker's name must be a DNS-1035 label"),
        (broker("a-broker-name-that-is-far-too-long-for-its-statefulset-labels", ""), "at most 52"),
    ];
    for (yaml, message) in &cases {
        let e = refused(n, yaml);
        assert!(e.contains(message), "expected {message:?} in the refusal of\n{yaml}\ngot:\n{e}");
    }
    eprintln!("k8s: {} bad manifests refused with their messages", cases.len());

    // Transition rules: immutable fields.
    apply(n, &queue("  maxLength: 10\n"));
    let e = refused(n, &queue("  maxLength: 20\n"));
    assert!(e.contains("maxLength is immutable"), "{e}");
    apply(n, &broker("b", "  storage: {size: 1Gi}\n"));
    let e = refused(n, &broker("b", "  storage: {size: 2Gi}\n"));
    assert!(e.contains("storage is immutable"), "{e}");

    // A single broker never becomes a cluster in place, nor the reverse;
    // a cluster resizes.
    let e = refused(n, &broker("b", "  storage: {size: 1Gi}\n  replicas: 3\n"));
    assert!(e.contains("spec.replicas: Forbidden: replicas cannot change between 1 and more than 1"), "{e}");
    apply(n, &broker("c", "  replicas: 3\n"));
    apply(n, &broker("c", "  replicas: 5\n"));
    let e = refused(n, &broker("c", "  replicas: 1\n"));
    assert!(e.contains("create a new Broker of the size you need"), "{e}");
}

/// What the reviewer found: values the API server accepts but the
/// operator could not read. They must be readable now.
#[tokio::test]
async fn should_store_broker_values_the_operator_can_read() {
    let _serial = serial().await;
    chart();
    let ns = namespace("crd-values");
    let n = &ns.0;
    apply(
        n,
        "apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: big\nspec:\n  config:\n    diskFreeLimit: 5368709120\n    memoryHighWatermark: 32Mi\n  storage:\n    size: null\n",
    );
    let stored = kubectl(&["get", "-n", n, "broker/big", "-o", "json"]);
    let broker: warren_crds::v1alpha1::Broker = serde_json::from_str(&stored).unwrap_or_else(|e| panic!("unreadable: {e}\n{stored}"));
    assert_eq!(broker.spec.config.disk_free_limit.map(|q| q.0).as_deref(), Some("5368709120"));
    assert_eq!(broker.spec.storage.size.0, "10Gi", "a null size is defaulted, not stored as null");
}

#[tokio::test]
async fn should_explain_fields_and_resolve_names_with_real_kubectl() {
    let _serial = serial().await;
    chart();
    let explain = kubectl(&["explain", "queue.spec.autoscaling.minReplicas"]);
    assert!(explain.contains("scale to zero"), "{explain}");
    let explain = kubectl(&["explain", "broker.spec.topologyNamespaces"]);
    assert!(explain.contains("NamespaceNotAllowed"), "{explain}");
    // `binding` is also Kubernetes' own (core/v1 Binding): the group or the
    // short name selects Warren's.
    for how in [&["explain", "wbd.spec.routingKey"][..], &["explain", "bindings.spec.routingKey", "--api-version=warren.dev/v1alpha1"][..]]
    {
        let explain = kubectl(how);
        assert!(explain.contains("binding key"), "kubectl {how:?}: {explain}");
    }
    let core = try_kubectl(&["explain", "binding"]).unwrap_or_default();
    assert!(!core.contains("routingKey"), "plain `binding` is Kubernetes' own Binding:\n{core}");
    let ns = namespace("crd-names");
    apply(
        &ns.0,
        "apiVersion: warren.dev/v1alpha1\nkind: Binding\nmetadata:\n  name: b\nspec:\n  brokerRef: {name: warren}\n  source: orders\n  destination: orders\n",
    );
    for name in ["wbd", "bindings.warren.dev", "warren"] {
        let list = kubectl(&["get", name, "-n", &ns.0, "-o", "name"]);
        assert!(list.contains("binding.warren.dev/b"), "kubectl get {name}: {list}");
    }
    assert!(
        !try_kubectl(&["get", "bindings", "-n", &ns.0, "-o", "name"]).unwrap_or_default().contains("warren.dev"),
        "plain `bindings` is not Warren's"
    );
}
