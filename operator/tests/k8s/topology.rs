//! Exchanges, Queues and Bindings reconciled into a real broker process on
//! loopback: live depth, drift repair, deletion policies and finalizers;
//! cross-namespace references and one owner per broker-side name.

use std::time::Duration;

use warren_client::proto::{DeleteQueueRequest, ListBindingsRequest, Message, PublishRequest};

use crate::harness::*;

#[tokio::test]
async fn should_declare_repair_and_delete_topology_in_a_real_broker() {
    let _serial = serial().await;
    let ns = namespace("topology");
    let n = &ns.0;
    let (real, _op) = ready_broker(n, &["--resync-seconds", "2"]).await;
    for f in ["exchange.yaml", "queue-with-dead-letter.yaml", "binding.yaml"] {
        kubectl(&["apply", "-n", n, "-f", &format!("examples/{f}")]);
    }
    wait_ready(n, &["exchange/orders", "exchange/orders-dlx", "queue/orders", "queue/orders-dead", "binding.warren.dev/orders-to-orders"]);
    let queues = broker_queues(&real.addr).await;
    assert!(queues.contains(&"orders".to_string()) && queues.contains(&"orders-dead".to_string()), "{queues:?}");
    assert_eq!(jsonpath(n, "queue/orders", "{.metadata.finalizers[0]}"), "warren.dev/broker-topology");

    // Live depth in the status.
    let mut client = grpc(&real.addr).await;
    let messages = (0..3)
        .map(|i| Message {
            exchange: "orders".into(),
            routing_key: "order.created".into(),
            body: format!("{i}").into(),
            ..Message::default()
        })
        .collect();
    client.publish(PublishRequest { messages }).await.unwrap();
    eventually("status.ready = 3", Duration::from_secs(20), || async { jsonpath(n, "queue/orders", "{.status.ready}") == "3" }).await;

    // Drift: deleted on the broker by hand, declared again.
    client.delete_queue(DeleteQueueRequest { name: "orders-dead".into(), if_unused: false, if_empty: false }).await.unwrap();
    eventually("orders-dead re-declared", Duration::from_secs(20), || async {
        broker_queues(&real.addr).await.contains(&"orders-dead".to_string())
    })
    .await;
    let events = kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        n,
        "--field-selector",
        "regarding.name=orders-dead",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Recreated"), "{events}");

    // Deleting keeps messages: Terminating with QueueNotEmpty until allowed.
    kubectl(&["delete", "-n", n, "queue/orders", "--wait=false"]);
    wait_condition(n, "queue/orders", "Ready", "False/QueueNotEmpty").await;
    assert!(broker_queues(&real.addr).await.contains(&"orders".to_string()));
    kubectl(&["patch", "-n", n, "queue/orders", "--type=merge", "-p", r#"{"spec":{"deleteWithMessages":true}}"#]);
    kubectl(&["wait", "-n", n, "--for=delete", "queue/orders", "--timeout=30s"]);
    assert!(!broker_queues(&real.addr).await.contains(&"orders".to_string()), "deleted with its messages");

    // Retain leaves the queue on the broker.
    kubectl(&["delete", "-n", n, "queue/orders-dead", "--timeout=30s"]);
    assert!(broker_queues(&real.addr).await.contains(&"orders-dead".to_string()), "deletionPolicy: Retain");

    // A Binding's finalizer unbinds.
    kubectl(&["delete", "-n", n, "binding.warren.dev/orders-to-orders", "--timeout=30s"]);
    let bindings = client.list_bindings(ListBindingsRequest {}).await.unwrap().into_inner().bindings;
    assert!(!bindings.iter().any(|b| b.source == "orders" && b.routing_key == "order.*"), "{bindings:?}");
    kubectl(&["delete", "-n", n, "exchange/orders", "exchange/orders-dlx", "--timeout=30s"]);
}

fn queue(name: &str, broker_ns: Option<&str>, spec_name: &str) -> String {
    let ns = broker_ns.map(|b| format!(", namespace: {b}")).unwrap_or_default();
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: {name}\nspec:\n  brokerRef: {{name: warren{ns}}}\n  name: {spec_name}\n"
    )
}

#[tokio::test]
async fn should_allow_cross_namespace_topology_only_when_the_broker_does_and_keep_one_owner_per_name() {
    let _serial = serial().await;
    let home = namespace("tenancy-broker");
    let other = namespace("tenancy-app");
    let (h, o) = (&home.0, &other.0);
    let (real, _op) = ready_broker(h, &["--resync-seconds", "2"]).await;

    // Another namespace may not declare into the Broker until it says so.
    apply(o, &queue("shared", Some(h), "shared"));
    wait_condition(o, "queue/shared", "Ready", "False/NamespaceNotAllowed").await;
    assert!(!broker_queues(&real.addr).await.contains(&"shared".to_string()), "the broker is not touched");
    kubectl(&["patch", "-n", h, "broker/warren", "--type=merge", "-p", &format!(r#"{{"spec":{{"topologyNamespaces":["{o}"]}}}}"#)]);
    wait_condition(o, "queue/shared", "Ready", "True/Declared").await;

    // A second object claiming the same broker-side queue is refused.
    apply(h, &queue("mine", None, "shared"));
    wait_condition(h, "queue/mine", "Ready", "False/Conflict").await;
    let message = jsonpath(h, "queue/mine", "{.status.conditions[?(@.type==\"Ready\")].message}");
    assert!(message.contains(&format!("Queue {o}/shared")), "{message}");
    // Deleting the second claimant leaves the queue to its owner.
    kubectl(&["delete", "-n", h, "queue/mine", "--timeout=30s"]);
    assert!(broker_queues(&real.addr).await.contains(&"shared".to_string()));

    // Deleting the owner while another object claims the name hands it over.
    apply(h, &queue("mine", None, "shared"));
    wait_condition(h, "queue/mine", "Ready", "False/Conflict").await;
    kubectl(&["delete", "-n", o, "queue/shared", "--timeout=30s"]);
    wait_condition(h, "queue/mine", "Ready", "True/Declared").await;
    assert!(broker_queues(&real.addr).await.contains(&"shared".to_string()), "handed over, not deleted");
    kubectl(&["delete", "-n", h, "queue/mine", "--timeout=30s"]);
    assert!(!broker_queues(&real.addr).await.contains(&"shared".to_string()), "the last owner deletes it");
}
