//! A Broker of 3 replicas against the real API server and StatefulSet
//! controller: the cluster's StatefulSet (pods numbered from 1, member list,
//! node id from the pod-index label, cluster port), its headless Service
//! and PodDisruptionBudget; a resize that rolls the pods one at a time
//! while the broker says no queue needs the next one; a scale-down that a
//! classic queue forbids, then one that moves quorum queue replicas first.
//! The pods run on kwok (no containers), so the broker's answers come from
//! the fake broker on loopback.

use std::time::Duration;

use warren_client::proto::QueueInfo;

use crate::fake_broker::FakeBroker;
use crate::harness::*;

fn cluster(replicas: i32) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: warren\nspec:\n  replicas: {replicas}\n  \
         storage: {{size: 10Gi}}\n  terminationGracePeriodSeconds: 30\n"
    )
}

fn sts(n: &str, path: &str) -> String {
    jsonpath(n, "statefulset/warren", path)
}

fn env(n: &str, name: &str) -> String {
    sts(n, &format!("{{.spec.template.spec.containers[0].env[?(@.name==\"{name}\")].value}}"))
}

/// Whether the StatefulSet has every pod on its newest template.
fn rolled_out(n: &str, replicas: i32) -> bool {
    let s = sts(
        n,
        "{.status.observedGeneration}/{.metadata.generation} {.status.updatedReplicas} {.status.readyReplicas} {.status.currentRevision} {.status.updateRevision}",
    );
    let f: Vec<&str> = s.split(' ').collect();
    let (generations, updated, ready, current, update) = (f[0], f[1], f[2], f[3], f.get(4).copied().unwrap_or_default());
    let (seen, generation) = generations.split_once('/').unwrap_or_default();
    seen == generation && updated == replicas.to_string() && ready == replicas.to_string() && current == update
}

fn quorum(name: &str, members: &[u64]) -> QueueInfo {
    QueueInfo { name: name.into(), durable: true, queue_type: "quorum".into(), members: members.to_vec(), ..QueueInfo::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_run_a_three_node_cluster_and_resize_it_one_safe_pod_at_a_time() {
    let _serial = serial().await;
    let ns = namespace("broker-cluster");
    let n = &ns.0;
    let (fake, addr) = FakeBroker::start().await;
    cluster_volumes_for(n, "warren", 1..=5);
    let mapping = format!("{n}/warren={addr}");
    let op = Operator::start(&["--broker-endpoint", &mapping]);
    op.wait_ready().await;

    apply(n, &cluster(3));
    kubectl(&["wait", "-n", n, "--for=condition=Ready", "broker/warren", "--timeout=120s"]);

    // The StatefulSet: pods 1..3 started together, the member list, the
    // node id from the pod-index label, the cluster port.
    assert_eq!(
        sts(n, "{.spec.replicas} {.spec.ordinals.start} {.spec.podManagementPolicy} {.spec.updateStrategy.rollingUpdate.partition}"),
        "3 1 Parallel 0"
    );
    let peers = (1..=3).map(|i| format!("{i}=warren-{i}.warren-headless.{n}.svc:5681")).collect::<Vec<_>>().join(",");
    assert_eq!(env(n, "WARREN_PEERS"), peers);
    assert_eq!(env(n, "WARREN_CLUSTER_ADDR"), "[::]:5681");
    assert_eq!(env(n, "WARREN_DEFAULT_QUEUE_TYPE"), "quorum");
    assert_eq!(
        sts(n, "{.spec.template.spec.containers[0].env[?(@.name==\"WARREN_NODE_ID\")].valueFrom.fieldRef.fieldPath}"),
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    assert_eq!(sts(n, "{.spec.template.spec.containers[0].ports[?(@.name==\"cluster\")].containerPort}"), "5681");
    for i in 1..=3 {
        // What WARREN_NODE_ID reads: the ordinal, which is the node id in WARREN_PEERS.
        let label = jsonpath(n, &format!("pod/warren-{i}"), "{.metadata.labels.apps\\.kubernetes\\.io/pod-index}");
        assert_eq!(label, i.to_string(), "pod warren-{i}");
        assert_eq!(jsonpath(n, &format!("pod/warren-{i}"), "{.status.conditions[?(@.type==\"Ready\")].status}"), "True");
    }
    assert!(try_kubectl(&["get", "-n", n, "pod/warren-0"]).is_err(), "ordinals start at 1");
    assert_eq!(
        jsonpath(
            n,
            "service/warren-headless",
            "{.spec.clusterIP} {.spec.publishNotReadyAddresses} {.spec.ports[?(@.name==\"cluster\")].port}"
        ),
        "None true 5681"
    );
    assert_eq!(jsonpath(n, "poddisruptionbudget/warren", "{.spec.maxUnavailable}"), "1");
    assert_eq!(
        sts(
            n,
            "{.spec.template.spec.topologySpreadConstraints[0].topologyKey} {.spec.template.spec.topologySpreadConstraints[0].whenUnsatisfiable}"
        ),
        "kubernetes.io/hostname ScheduleAnyway"
    );
    assert!(fake.critical_asked().is_empty(), "a new cluster starts every pod at once, without asking");

    // Grow to 5 while node 3 holds the only up-to-date replica of a queue:
    // the new pods start, the old ones wait.
    fake.set_critical(3, &["orders"]);
    let old_revision = sts(n, "{.status.currentRevision}");
    kubectl(&["patch", "broker/warren", "-n", n, "--type=merge", "-p", r#"{"spec":{"replicas":5}}"#]);
    wait_condition(n, "broker/warren", "Progressing", "True/QuorumCritical").await;
    let message = jsonpath(n, "broker/warren", "{.status.conditions[?(@.type==\"Progressing\")].message}");
    assert!(message.contains("pod warren-3 (node 3)") && message.contains("orders"), "{message}");
    let peers = (1..=5).map(|i| format!("{i}=warren-{i}.warren-headless.{n}.svc:5681")).collect::<Vec<_>>().join(",");
    assert_eq!(env(n, "WARREN_PEERS"), peers);
    assert_eq!(sts(n, "{.spec.replicas} {.spec.updateStrategy.rollingUpdate.partition}"), "5 3");
    let update_revision = sts(n, "{.status.updateRevision}");
    assert_ne!(update_revision, old_revision);
    eventually("pods warren-4 and warren-5 on the new template", Duration::from_secs(60), || async {
        (4..=5).all(|i| jsonpath(n, &format!("pod/warren-{i}"), "{.metadata.labels.controller-revision-hash}") == update_revision)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 1..=3 {
        let revision = jsonpath(n, &format!("pod/warren-{i}"), "{.metadata.labels.controller-revision-hash}");
        assert_eq!(revision, old_revision, "pod warren-{i} is not restarted while node 3 is critical");
    }

    // The queue caught up: pods 3, 2, 1 restart one at a time, each after
    // the broker was asked about it.
    fake.set_critical(3, &[]);
    let took = eventually("the resize rolled out", Duration::from_secs(120), || async { rolled_out(n, 5) }).await;
    figure(&format!(
        "3 -> 5 pods: the 3 old pods restarted one at a time, each after a QuorumCritical check, in {:.1} s",
        took.as_secs_f64()
    ));
    let asked = fake.critical_asked();
    let order: Vec<u64> = asked.iter().copied().fold(Vec::new(), |mut v, x| {
        if v.last() != Some(&x) {
            v.push(x);
        }
        v
    });
    assert_eq!(order, [3, 2, 1], "asked about each old pod, from the top: {asked:?}");
    assert_eq!(sts(n, "{.spec.updateStrategy.rollingUpdate.partition}"), "0");
    wait_condition(n, "broker/warren", "Progressing", "False/RolloutComplete").await;

    // Scaling down to 3 while a durable classic queue lives on node 4 (its
    // only copy): refused, nothing changes, no replica moves.
    fake.add_queue(quorum("payments", &[3, 4, 5]));
    fake.add_queue(QueueInfo { name: "sessions".into(), durable: true, queue_type: "classic".into(), leader: 4, ..QueueInfo::default() });
    kubectl(&["patch", "broker/warren", "-n", n, "--type=merge", "-p", r#"{"spec":{"replicas":3}}"#]);
    wait_condition(n, "broker/warren", "Degraded", "True/ScaleDownRefused").await;
    let message = jsonpath(n, "broker/warren", "{.status.conditions[?(@.type==\"Degraded\")].message}");
    assert!(message.contains("removes nodes 4, 5") && message.contains("sessions (classic, on node 4)"), "{message}");
    assert_eq!(sts(n, "{.spec.replicas}"), "5");
    assert_eq!(fake.membership_calls(), Vec::<String>::new(), "nothing moved while the scale-down is refused");
    assert_eq!(jsonpath(n, "broker/warren", "{.status.conditions[?(@.type==\"Ready\")].status}"), "True", "the cluster runs on");

    // The classic queue gone, the operator moves the quorum queue's replicas
    // off nodes 4 and 5 itself (each an add on a node that stays, then a
    // remove: the queue never has fewer than 3), then scales down (checked
    // again within 30 s); the 3 pods that stay get the 3-member list.
    fake.remove_queue("sessions");
    eventually("the scale-down applied", Duration::from_secs(60), || async { sts(n, "{.spec.replicas}") == "3" }).await;
    let mut members = fake.queue("payments").unwrap().members;
    members.sort();
    assert_eq!(members, [1, 2, 3], "payments moved to the nodes that stay");
    let calls = fake.membership_calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    for (i, gone) in [4, 5].into_iter().enumerate() {
        assert!(calls[2 * i].starts_with("grow ") && calls[2 * i].ends_with(" ^payments$"), "{calls:?}");
        assert_eq!(calls[2 * i + 1], format!("shrink {gone} ^payments$"), "{calls:?}");
    }
    eventually("the scale-down rolled out", Duration::from_secs(120), || async { rolled_out(n, 3) }).await;
    let peers = (1..=3).map(|i| format!("{i}=warren-{i}.warren-headless.{n}.svc:5681")).collect::<Vec<_>>().join(",");
    assert_eq!(env(n, "WARREN_PEERS"), peers);
    eventually("pods warren-4 and warren-5 gone", Duration::from_secs(60), || async {
        (4..=5).all(|i| try_kubectl(&["get", "-n", n, &format!("pod/warren-{i}")]).is_err())
    })
    .await;
    kubectl(&["get", "-n", n, "pvc/data-warren-5"]);
    wait_condition(n, "broker/warren", "Degraded", "False/*").await;
    drop(op);
}
