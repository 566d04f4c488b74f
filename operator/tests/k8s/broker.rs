//! The Broker controller against the real API server, as the chart's
//! ServiceAccount: children with owner references, pods scheduled to the
//! simulated node and Ready, `kubectl wait`, Events, garbage collection;
//! names it must not take over; objects it cannot read; liveness.

use std::time::{Duration, Instant};

use crate::harness::*;

const CHILDREN: &[&str] = &[
    "statefulset/warren",
    "service/warren",
    "service/warren-headless",
    "configmap/warren-config",
    "poddisruptionbudget/warren",
    "serviceaccount/warren",
];

#[tokio::test]
async fn should_run_a_broker_until_ready_and_collect_it_with_the_broker() {
    let _serial = serial().await;
    let ns = namespace("broker-ready");
    let n = &ns.0;
    volume_for(n, "warren");
    let op = Operator::start(&[]);
    op.wait_ready().await;
    let started = Instant::now();
    kubectl(&["apply", "-n", n, "-f", "examples/broker.yaml"]);
    kubectl(&["wait", "-n", n, "--for=condition=Ready", "broker/warren", "--timeout=120s"]);
    figure(&format!("Broker Ready (children applied, pod scheduled on kwok, Ready) in {:.1} s", started.elapsed().as_secs_f64()));

    let uid = jsonpath(n, "broker/warren", "{.metadata.uid}");
    for child in CHILDREN {
        let owner = jsonpath(
            n,
            child,
            "{.metadata.ownerReferences[0].uid} {.metadata.ownerReferences[0].controller} {.metadata.ownerReferences[0].blockOwnerDeletion}",
        );
        assert_eq!(owner, format!("{uid} true true"), "{child} is controlled by the Broker");
    }
    assert_eq!(jsonpath(n, "pod/warren-0", "{.spec.nodeName}"), "kwok-node-0");
    assert_eq!(jsonpath(n, "pod/warren-0", "{.status.conditions[?(@.type==\"Ready\")].status}"), "True");
    assert_eq!(jsonpath(n, "broker/warren", "{.status.readyReplicas} {.status.endpoint}"), format!("1 warren.{n}.svc:5680"));
    let config = jsonpath(n, "configmap/warren-config", "{.data.warren\\.toml}");
    assert!(config.contains("disk_free_limit = 1073741824"), "{config}");
    let env = jsonpath(n, "statefulset/warren", "{.spec.template.spec.containers[0].env[?(@.name==\"WARREN_GRPC_ADDR\")].value}");
    assert_eq!(env, "[::]:5680", "listens on IPv6 and IPv4");
    let events = kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        n,
        "--field-selector",
        "regarding.name=warren",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Ready"), "the Broker controller emits Events: {events}");

    // Garbage collection follows the owner references; the volume stays.
    kubectl(&["delete", "-n", n, "broker/warren", "--wait=true", "--timeout=60s"]);
    eventually("the children garbage-collected", Duration::from_secs(60), || async {
        CHILDREN.iter().all(|c| try_kubectl(&["get", "-n", n, c]).is_err())
    })
    .await;
    kubectl(&["get", "-n", n, "pvc/data-warren-0"]);
    drop(op);
}

#[tokio::test]
async fn should_not_take_over_objects_it_does_not_control() {
    let _serial = serial().await;
    let ns = namespace("broker-adopt");
    let n = &ns.0;
    let op = Operator::start(&[]);
    op.wait_ready().await;
    let before = jsonpath(n, "serviceaccount/default", "{.metadata.uid}");
    assert!(!before.is_empty());
    apply(n, "apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: default\nspec: {}\n");
    wait_condition(n, "broker/default", "Degraded", "True/NameConflict").await;
    let message = jsonpath(n, "broker/default", "{.status.conditions[?(@.type==\"Degraded\")].message}");
    assert!(message.contains(&format!("ServiceAccount {n}/default")), "{message}");
    assert_eq!(jsonpath(n, "serviceaccount/default", "{.metadata.ownerReferences}"), "", "the default ServiceAccount is not adopted");
    assert!(try_kubectl(&["get", "-n", n, "statefulset/default"]).is_err(), "nothing is applied");

    // The API server's own Service.
    let ports = jsonpath("default", "service/kubernetes", "{.spec.ports[0].port}");
    apply("default", "apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: kubernetes\nspec: {}\n");
    wait_condition("default", "broker/kubernetes", "Degraded", "True/NameConflict").await;
    assert_eq!(jsonpath("default", "service/kubernetes", "{.metadata.ownerReferences}"), "");
    assert_eq!(jsonpath("default", "service/kubernetes", "{.spec.ports[0].port}"), ports);
    let events = kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        "default",
        "--field-selector",
        "regarding.name=kubernetes",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("NameConflict"), "{events}");
    kubectl(&["delete", "-n", "default", "broker/kubernetes", "--wait=true"]);
    kubectl(&["delete", "-n", n, "broker/default", "--wait=true"]);
    assert_eq!(jsonpath(n, "serviceaccount/default", "{.metadata.uid}"), before, "still there after the Broker is gone");
}

/// An object the operator's types cannot read (stored under a looser
/// schema) is reported on its status and skipped; the others reconcile.
#[tokio::test]
async fn should_reconcile_the_others_when_one_object_cannot_be_read() {
    let _serial = serial().await;
    chart();
    let ns = namespace("broker-undecodable");
    let n = &ns.0;
    // An older, looser CRD accepted any exchange type.
    kubectl(&[
        "patch",
        "crd",
        "exchanges.warren.dev",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/type/enum"}]"#,
    ]);
    let bad = try_apply(
        n,
        "apiVersion: warren.dev/v1alpha1\nkind: Exchange\nmetadata:\n  name: bad\nspec:\n  brokerRef: {name: warren}\n  type: bogus\n",
    );
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", "charts/warren/crds/exchanges.warren.dev.yaml"]);
    bad.unwrap();
    apply(
        n,
        "apiVersion: warren.dev/v1alpha1\nkind: Exchange\nmetadata:\n  name: good\nspec:\n  brokerRef: {name: warren}\n  type: topic\n",
    );

    let op = Operator::start(&["--watch-stuck-seconds", "2"]);
    op.wait_ready().await;
    // Reconciled: no Broker, so Ready=False/BrokerNotFound, written by the operator.
    wait_condition(n, "exchange/good", "Ready", "False/BrokerNotFound").await;
    wait_condition(n, "exchange/bad", "Ready", "False/Undecodable").await;
    assert!(jsonpath(n, "exchange/bad", "{.status.conditions[0].message}").contains("bogus"));
    assert!(matches!(op.get("/healthz").await, Some((200, _))), "one bad object is not a stuck watch");
    kubectl(&["delete", "-n", n, "exchange/bad", "exchange/good", "--wait=true", "--timeout=30s"]);
}

/// A watch that keeps failing (here: RBAC without exchanges) makes
/// `/healthz` fail, so the kubelet restarts a stuck operator.
#[tokio::test]
async fn should_fail_liveness_while_a_watch_is_stuck() {
    let _serial = serial().await;
    chart();
    let ns = namespace("broker-liveness");
    let n = &ns.0;
    kubectl(&["create", "serviceaccount", "limited", "-n", n]);
    kubectl(&[
        "create",
        "clusterrole",
        "warren-test-limited",
        "--verb=get,list,watch,patch",
        "--resource=brokers.warren.dev,queues.warren.dev,bindings.warren.dev",
    ]);
    kubectl(&[
        "create",
        "clusterrolebinding",
        "warren-test-limited",
        "--clusterrole=warren-test-limited",
        &format!("--serviceaccount={n}:limited"),
    ]);
    let op = Operator::start_as(&token_kubeconfig(n, "limited"), "limited", &["--watch-stuck-seconds", "2"]);
    op.wait_ready().await;
    let took =
        eventually("/healthz failing", Duration::from_secs(30), || async { matches!(op.get("/healthz").await, Some((503, _))) }).await;
    let (_, body) = op.get("/healthz").await.unwrap();
    assert!(body.contains("watch has failed for more than 2s") && body.contains("forbidden"), "{body}");
    figure(&format!("/healthz failed {:.1} s after start with a forbidden watch (limit 2 s)", took.as_secs_f64()));
    let _ = try_kubectl(&["delete", "clusterrolebinding", "warren-test-limited"]);
    let _ = try_kubectl(&["delete", "clusterrole", "warren-test-limited"]);
}

/// Without `update` on brokers/finalizers (as the chart had it), the API
/// server refuses children whose owner reference blocks the Broker's
/// deletion: the reason the chart's ClusterRole has it.
#[tokio::test]
async fn should_need_update_on_brokers_finalizers_for_its_owner_references() {
    let _serial = serial().await;
    chart();
    let ns = namespace("broker-finalizers-rbac");
    let n = &ns.0;
    let mut role: serde_json::Value = serde_json::from_str(&kubectl(&["get", "clusterrole", "warren-operator", "-o", "json"])).unwrap();
    let rules = role["rules"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|r| !r["resources"].as_array().unwrap().iter().any(|x| x == "brokers/finalizers"));
    assert_eq!(rules.len(), before - 1, "the chart grants brokers/finalizers");
    let stripped = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "warren-test-no-finalizers"}, "rules": role["rules"],
    });
    apply("default", &stripped.to_string());
    kubectl(&["create", "serviceaccount", "old-chart", "-n", n]);
    let binding = ["create", "clusterrolebinding", "warren-test-no-finalizers", "--clusterrole=warren-test-no-finalizers"];
    let mut args = binding.to_vec();
    let subject = format!("--serviceaccount={n}:old-chart");
    args.push(&subject);
    kubectl(&args);
    let op = Operator::start_as(&token_kubeconfig(n, "old-chart"), "old-chart", &[]);
    op.wait_ready().await;
    apply(n, "apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: warren\nspec: {}\n");
    wait_condition(n, "broker/warren", "Degraded", "True/ApplyFailed").await;
    let message = jsonpath(n, "broker/warren", "{.status.conditions[?(@.type==\"Degraded\")].message}");
    assert!(message.contains("blockOwnerDeletion"), "{message}");
    drop(op);
    let _ = try_kubectl(&["delete", "clusterrolebinding", "warren-test-no-finalizers"]);
    let _ = try_kubectl(&["delete", "clusterrole", "warren-test-no-finalizers"]);
}
