//! Autoscaling a consumer Deployment from a real broker's backlog: up,
//! Ready pods on the simulated node, down to zero; and never frozen
//! silently when the queue cannot be declared as specified.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use warren_client::proto::{DeclareQueueRequest, Message, PublishRequest, PurgeQueueRequest, value::Kind};

use crate::harness::*;

fn worker(name: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 0\n  selector:\n    matchLabels: {{app: {name}}}\n  \
         template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: worker\n        image: registry.invalid/worker:1\n"
    )
}

fn autoscaled(name: &str, target: &str, window: u32) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: {name}\nspec:\n  brokerRef: {{name: warren}}\n  autoscaling:\n    \
         target: {{name: {target}}}\n    maxReplicas: 5\n    messagesPerReplica: 10\n    pollingSeconds: 1\n    scaleDownStabilizationSeconds: {window}\n"
    )
}

async fn publish(addr: &str, queue: &str, count: usize) {
    let messages = (0..count).map(|i| Message { routing_key: queue.into(), body: format!("{i}").into(), ..Message::default() }).collect();
    grpc(addr).await.publish(PublishRequest { messages }).await.unwrap();
}

#[tokio::test]
async fn should_scale_a_consumer_deployment_with_the_backlog_and_to_zero() {
    let _serial = serial().await;
    let ns = namespace("autoscale");
    let n = &ns.0;
    let (real, _op) = ready_broker(n, &[]).await;
    apply(n, &worker("worker"));
    apply(n, &autoscaled("jobs", "worker", 3));
    wait_ready(n, &["queue/jobs"]);
    wait_condition(n, "queue/jobs", "AutoscalingActive", "True/*").await;
    let deployments: Api<Deployment> = Api::namespaced(admin().await, n);

    // Reaction time: from the publish confirm to the scale request landing
    // in the API server (the Deployment's spec.replicas), polled every 20 ms.
    publish(&real.addr, "jobs", 25).await;
    let published = Instant::now();
    let mut up = None;
    while published.elapsed() < Duration::from_secs(30) {
        if deployments.get_scale("worker").await.unwrap().spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
            up = Some(published.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up = up.expect("the Deployment did not scale up within 30 s");
    figure(&format!("autoscaler reaction (backlog published -> Deployment scaled from 0) {:.2} s (pollingSeconds 1)", up.as_secs_f64()));
    eventually("3 replicas, Ready on the simulated node", Duration::from_secs(30), || async {
        jsonpath(n, "deployment/worker", "{.spec.replicas}/{.status.readyReplicas}") == "3/3"
    })
    .await;
    assert_eq!(jsonpath(n, "queue/jobs", "{.status.autoscaling.desiredReplicas}"), "3");

    // Drained: to zero after the 3 s stabilization window.
    grpc(&real.addr).await.purge_queue(PurgeQueueRequest { name: "jobs".into() }).await.unwrap();
    let drained = Instant::now();
    eventually("scaled to zero", Duration::from_secs(30), || async { jsonpath(n, "deployment/worker", "{.spec.replicas}") == "0" }).await;
    figure(&format!("drained -> scaled to zero in {:.2} s (stabilization window 3 s)", drained.elapsed().as_secs_f64()));
    let events =
        kubectl(&["get", "events.events.k8s.io", "-n", n, "--field-selector", "regarding.name=jobs", "-o", "jsonpath={.items[*].reason}"]);
    assert!(events.contains("ScaledUp") && events.contains("ScaledDown"), "{events}");
    kubectl(&["delete", "-n", n, "queue/jobs", "--timeout=30s"]);
}

/// The queue exists on the broker with other arguments: the Queue is not
/// Ready (PropertiesMismatch), but its consumers keep scaling from the
/// counts the broker reports, and the status says so.
#[tokio::test]
async fn should_keep_scaling_when_the_broker_refuses_the_declared_properties() {
    let _serial = serial().await;
    let ns = namespace("autoscale-mismatch");
    let n = &ns.0;
    let (real, _op) = ready_broker(n, &[]).await;
    let arguments = BTreeMap::from([("x-max-length".to_string(), warren_client::proto::Value { kind: Some(Kind::Int(1000)) })]);
    grpc(&real.addr)
        .await
        .declare_queue(DeclareQueueRequest { name: "jobs".into(), durable: true, arguments, ..DeclareQueueRequest::default() })
        .await
        .unwrap();
    apply(n, &worker("worker"));
    apply(n, &autoscaled("jobs", "worker", 60));
    wait_condition(n, "queue/jobs", "Ready", "False/PropertiesMismatch").await;
    publish(&real.addr, "jobs", 15).await;
    eventually("scaled up despite the mismatch", Duration::from_secs(30), || async {
        jsonpath(n, "deployment/worker", "{.spec.replicas}") == "2"
    })
    .await;
    wait_condition(n, "queue/jobs", "AutoscalingActive", "True/*").await;

    // When the backlog cannot be read at all, AutoscalingActive says so.
    kubectl(&["patch", "-n", n, "queue/jobs", "--type=merge", "-p", r#"{"spec":{"deletionPolicy":"Retain"}}"#]);
    drop(real);
    wait_condition(n, "queue/jobs", "AutoscalingActive", "False/*").await;
    kubectl(&["delete", "-n", n, "queue/jobs", "--timeout=30s"]);
}
