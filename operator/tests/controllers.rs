//! Controller tests against a mocked Kubernetes API server (kube-rs
//! `tower-test` idiom) and, for the topology controllers, a fake broker
//! served over real gRPC. Each scenario asserts the exact sequence of API
//! requests the reconcile made.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use serde_json::{Value, json};
use support::fake_broker::FakeBroker;
use support::{ApiServer, Fixture, broker, context, object, path, within};
use warren_client::proto::QueueInfo;
use warren_crds::v1alpha1::{Binding, Broker, Exchange, Queue};
use warren_operator::error::Error;
use warren_operator::topology::{binding, exchange, queue};

const NS: &str = "ns";

/// The scenarios, named for what the operator does.
enum Scenario {
    /// A new Queue gets the finalizer, and nothing else happens yet.
    QueueFinalizerAdded,
    /// A finalized Queue is declared: broker lookup, Created event, status.
    QueueCreated,
    /// A Queue that exists with other arguments: condition and warning, no
    /// silent success.
    QueueUpdateRefused,
    /// A Queue deleted by hand is re-declared with a Recreated event.
    QueueDriftRepaired,
    /// Deletion with Retain: the queue stays, the finalizer goes.
    QueueDeletedWithRetain,
    /// Deletion with Delete on an empty queue: deleted, finalizer removed.
    QueueDeletedWithDelete,
    /// Deletion with Delete on a queue holding messages: kept, condition
    /// says why, finalizer stays.
    QueueDeletionBlockedByMessages,
    /// An autoscaled Queue with a backlog scales its Deployment from zero.
    QueueAutoscaledFromZero,
    /// An Exchange is declared, then deleted.
    ExchangeCreatedAndDeleted,
    /// A Binding waits for its source, then binds once it exists.
    BindingWaitsThenBinds,
    /// A Binding whose arguments changed: the old binding is removed, the
    /// new one made, and the status records it.
    BindingRebound,
}

struct Env {
    api: ApiServer,
    broker: FakeBroker,
    ctx: Arc<warren_operator::context::Context>,
}

async fn env() -> Env {
    let (client, api) = ApiServer::start();
    let (fake, addr) = FakeBroker::start().await;
    api.put(&path("brokers", NS, "warren"), broker(NS, "warren", &addr));
    Env { api, broker: fake, ctx: context(client) }
}

fn queue_obj(spec_extra: Value) -> Value {
    let mut spec = json!({"brokerRef": {"name": "warren"}, "messageTtlMs": 60000});
    spec.as_object_mut().unwrap().extend(spec_extra.as_object().unwrap().clone());
    object("Queue", NS, "orders", spec)
}

fn qpath() -> String {
    path("queues", NS, "orders")
}

async fn reconcile_queue(e: &Env, obj: Value) -> Result<kube::runtime::controller::Action, Error> {
    e.api.put(&qpath(), obj.clone());
    let q: Queue = serde_json::from_value(obj).unwrap();
    within(queue::reconcile(Arc::new(q), e.ctx.clone())).await
}

fn status_patch(p: &str) -> String {
    format!("PATCH {p}/status")
}

async fn run(scenario: Scenario) {
    let e = env().await;
    let broker_get = format!("GET {}", path("brokers", NS, "warren"));
    let events = format!("POST /apis/events.k8s.io/v1/namespaces/{NS}/events");
    match scenario {
        Scenario::QueueFinalizerAdded => {
            reconcile_queue(&e, queue_obj(json!({}))).await.unwrap();
            assert_eq!(e.api.lines(), [format!("PATCH {}", qpath())]);
            let patch = &e.api.recorded()[0];
            assert_eq!(patch.content_type, "application/json-patch+json");
            assert_eq!(patch.body[1]["path"], "/metadata/finalizers");
            assert_eq!(patch.body[1]["value"], json!([warren_operator::topology::FINALIZER]));
            assert!(!e.broker.has_queue("orders"), "nothing is declared before the finalizer is in place");
        }
        Scenario::QueueCreated => {
            reconcile_queue(&e, queue_obj(json!({})).finalized()).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, status_patch(&qpath())]);
            let status_req = e.api.recorded()[2].clone();
            assert_eq!(status_req.content_type, "application/apply-patch+yaml");
            assert!(status_req.uri.contains("fieldManager=warren-operator") && status_req.uri.contains("force=true"), "{}", status_req.uri);
            let status = e.api.last_status("orders");
            assert_eq!(status["conditions"][0]["type"], "Ready");
            assert_eq!(status["conditions"][0]["status"], "True");
            assert_eq!(status["conditions"][0]["observedGeneration"], 1);
            assert_eq!(status["ready"], 0);
            assert_eq!(e.api.events()[0].1, "Created");
            let q = e.broker.queue("orders").unwrap();
            assert!(q.durable);
            assert_eq!(q.arguments["x-message-ttl"].kind, Some(warren_client::proto::value::Kind::Int(60000)));
        }
        Scenario::QueueUpdateRefused => {
            e.broker.add_queue(QueueInfo { name: "orders".into(), durable: true, ready: 4, ..QueueInfo::default() });
            reconcile_queue(&e, queue_obj(json!({})).finalized()).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, status_patch(&qpath())]);
            let status = e.api.last_status("orders");
            let ready = &status["conditions"][0];
            assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("PropertiesMismatch")));
            assert!(ready["message"].as_str().unwrap().contains("x-message-ttl"), "{ready}");
            assert_eq!(status["ready"], 4, "counts are still mirrored");
            assert_eq!(e.api.events()[0].0, "Warning");
        }
        Scenario::QueueDriftRepaired => {
            reconcile_queue(&e, queue_obj(json!({})).finalized().was_ready()).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, status_patch(&qpath())]);
            let (type_, reason, note) = e.api.events()[0].clone();
            assert_eq!((type_.as_str(), reason.as_str()), ("Warning", "Recreated"));
            assert!(note.contains("missing on the broker"), "{note}");
            assert!(e.broker.has_queue("orders"));
        }
        Scenario::QueueDeletedWithRetain => {
            e.broker.add_queue(QueueInfo { name: "orders".into(), ready: 10, ..QueueInfo::default() });
            reconcile_queue(&e, queue_obj(json!({"deletionPolicy": "Retain"})).finalized().deleting()).await.unwrap();
            assert_eq!(e.api.lines(), [events, format!("PATCH {}", qpath())]);
            assert_eq!(e.api.events()[0].1, "Retained");
            let patch = &e.api.recorded()[1];
            assert_eq!(patch.body[1]["op"], "remove");
            assert_eq!(patch.body[1]["path"], "/metadata/finalizers/0");
            assert!(e.broker.has_queue("orders"), "Retain keeps the queue and its messages");
        }
        Scenario::QueueDeletedWithDelete => {
            e.broker.add_queue(QueueInfo { name: "orders".into(), ..QueueInfo::default() });
            reconcile_queue(&e, queue_obj(json!({})).finalized().deleting()).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, format!("PATCH {}", qpath())]);
            assert_eq!(e.api.events()[0].1, "Deleted");
            assert!(!e.broker.has_queue("orders"));
        }
        Scenario::QueueDeletionBlockedByMessages => {
            e.broker.add_queue(QueueInfo { name: "orders".into(), ready: 3, unacked: 2, ..QueueInfo::default() });
            let err = reconcile_queue(&e, queue_obj(json!({})).finalized().deleting()).await.unwrap_err();
            assert!(err.to_string().contains("still holds 5 messages"), "{err}");
            assert_eq!(e.api.lines(), [broker_get, status_patch(&qpath()), events], "no finalizer removal");
            let status = e.api.last_status("orders");
            assert_eq!(status["conditions"][0]["reason"], "QueueNotEmpty");
            assert!(status["conditions"][0]["message"].as_str().unwrap().contains("deleteWithMessages"));
            assert!(e.broker.has_queue("orders"));
            // Opting in deletes it with its messages.
            e.api.clear();
            reconcile_queue(&e, queue_obj(json!({"deleteWithMessages": true})).finalized().deleting()).await.unwrap();
            assert!(!e.broker.has_queue("orders"));
            assert!(e.api.events()[0].2.contains("with 5 messages"));
        }
        Scenario::QueueAutoscaledFromZero => {
            let scale = "/apis/apps/v1/namespaces/ns/deployments/worker/scale";
            e.api.put(
                scale,
                json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "worker"}, "spec": {"replicas": 0}}),
            );
            e.broker.add_queue(QueueInfo {
                name: "orders".into(),
                durable: true,
                arguments: [
                    (
                        "x-message-ttl".to_string(),
                        warren_client::proto::Value { kind: Some(warren_client::proto::value::Kind::Int(60000)) },
                    ),
                    (
                        "x-queue-type".to_string(),
                        warren_client::proto::Value { kind: Some(warren_client::proto::value::Kind::String("classic".into())) },
                    ),
                ]
                .into(),
                ready: 25,
                unacked: 4,
                ..QueueInfo::default()
            });
            let autoscaling =
                json!({"autoscaling": {"target": {"name": "worker"}, "maxReplicas": 10, "messagesPerReplica": 10, "pollingSeconds": 2}});
            let action = reconcile_queue(&e, queue_obj(autoscaling).finalized().was_ready()).await.unwrap();
            assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2)), "polls every pollingSeconds");
            assert_eq!(e.api.lines(), [broker_get, format!("GET {scale}"), format!("PATCH {scale}"), events, status_patch(&qpath())]);
            assert_eq!(e.api.recorded()[2].body, json!({"spec": {"replicas": 3}}), "ceil((25 + 4) / 10)");
            let status = e.api.last_status("orders");
            assert_eq!(status["autoscaling"]["desiredReplicas"], 3);
            assert_eq!(status["autoscaling"]["currentReplicas"], 3);
            assert_eq!(status["autoscaling"]["backlog"], 29);
            assert_eq!(status["autoscaling"]["reason"], "ScaledUp");
            assert_eq!(e.api.events()[0].1, "ScaledUp");
            let metrics = e.ctx.metrics.encode().unwrap();
            assert!(
                metrics.contains("warren_operator_scaling_decisions_total{namespace=\"ns\",queue=\"orders\",direction=\"up\"} 1"),
                "{metrics}"
            );
        }
        Scenario::ExchangeCreatedAndDeleted => {
            let xpath = path("exchanges", NS, "orders");
            let obj = object("Exchange", NS, "orders", json!({"brokerRef": {"name": "warren"}, "type": "topic"})).finalized();
            e.api.put(&xpath, obj.clone());
            let x: Exchange = serde_json::from_value(obj.clone()).unwrap();
            within(exchange::reconcile(Arc::new(x), e.ctx.clone())).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get.clone(), events.clone(), status_patch(&xpath)]);
            assert!(e.broker.state.lock().unwrap().exchanges.contains_key("orders"));
            e.api.clear();
            let x: Exchange = serde_json::from_value(obj.deleting()).unwrap();
            within(exchange::reconcile(Arc::new(x), e.ctx.clone())).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, format!("PATCH {xpath}")]);
            assert!(!e.broker.state.lock().unwrap().exchanges.contains_key("orders"));
        }
        Scenario::BindingWaitsThenBinds => {
            let bpath = path("bindings", NS, "orders-to-jobs");
            let obj = object(
                "Binding",
                NS,
                "orders-to-jobs",
                json!({"brokerRef": {"name": "warren"}, "source": "orders", "destination": "jobs", "routingKey": "order.*"}),
            )
            .finalized();
            e.api.put(&bpath, obj.clone());
            let b: Binding = serde_json::from_value(obj.clone()).unwrap();
            within(binding::reconcile(Arc::new(b.clone()), e.ctx.clone())).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get.clone(), status_patch(&bpath)]);
            assert_eq!(e.api.last_status("orders-to-jobs")["conditions"][0]["reason"], "WaitingForSource");
            e.broker.add_exchange("orders");
            e.api.clear();
            within(binding::reconcile(Arc::new(b.clone()), e.ctx.clone())).await.unwrap();
            assert_eq!(e.api.last_status("orders-to-jobs")["conditions"][0]["reason"], "WaitingForDestination");
            e.broker.add_queue(QueueInfo { name: "jobs".into(), ..QueueInfo::default() });
            e.api.clear();
            within(binding::reconcile(Arc::new(b), e.ctx.clone())).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, status_patch(&bpath)]);
            assert_eq!(e.api.last_status("orders-to-jobs")["conditions"][0]["reason"], "Bound");
            assert_eq!(e.broker.bindings()[0].routing_key, "order.*");
            let bound = &e.api.last_status("orders-to-jobs")["bound"];
            assert_eq!((bound["source"].as_str(), bound["routingKey"].as_str()), (Some("orders"), Some("order.*")));
        }
        Scenario::BindingRebound => {
            let bpath = path("bindings", NS, "pdfs");
            e.broker.add_exchange("docs");
            e.broker.add_queue(QueueInfo { name: "pdfs".into(), ..QueueInfo::default() });
            let spec = |m: &str| json!({"brokerRef": {"name": "warren"}, "source": "docs", "destination": "pdfs", "arguments": {"x-match": m, "format": "pdf"}});
            let first = object("Binding", NS, "pdfs", spec("all")).finalized();
            e.api.put(&bpath, first.clone());
            within(binding::reconcile(Arc::new(serde_json::from_value::<Binding>(first).unwrap()), e.ctx.clone())).await.unwrap();
            let status = e.api.last_status("pdfs");
            assert_eq!(status["bound"]["arguments"]["x-match"], "all");
            assert_eq!(e.broker.bindings().len(), 1);

            // The user edits the arguments (not immutable: CEL cannot see them).
            let mut edited = object("Binding", NS, "pdfs", spec("any")).finalized();
            edited["metadata"]["generation"] = 2.into();
            edited["status"] = status;
            e.api.clear();
            e.api.put(&bpath, edited.clone());
            within(binding::reconcile(Arc::new(serde_json::from_value::<Binding>(edited).unwrap()), e.ctx.clone())).await.unwrap();
            assert_eq!(e.api.lines(), [broker_get, events, status_patch(&bpath)]);
            assert_eq!(e.api.events()[0].1, "Rebound");
            let bindings = e.broker.bindings();
            assert_eq!(bindings.len(), 1, "the old binding is gone: {bindings:?}");
            assert_eq!(bindings[0].arguments["x-match"].kind, Some(warren_client::proto::value::Kind::String("any".into())));
            let status = e.api.last_status("pdfs");
            assert_eq!(status["bound"]["arguments"]["x-match"], "any");
            assert_eq!(status["conditions"][0]["reason"], "Bound");
            assert_eq!(status["observedGeneration"], 2);

            // Deleting removes what was bound.
            let mut deleting = e.api.get(&bpath).unwrap().deleting();
            deleting["status"] = e.api.last_status("pdfs");
            within(binding::reconcile(Arc::new(serde_json::from_value::<Binding>(deleting).unwrap()), e.ctx.clone())).await.unwrap();
            assert!(e.broker.bindings().is_empty());
        }
    }
}

#[tokio::test]
async fn should_remove_the_old_binding_when_its_arguments_change() {
    run(Scenario::BindingRebound).await;
}

#[tokio::test]
async fn should_report_a_child_the_api_server_refuses_in_the_broker_status() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    let bpath = path("brokers", NS, "warren");
    let obj = json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": NS, "uid": "u1", "generation": 2}, "spec": {}
    });
    api.put(&bpath, obj.clone());
    let sts = "/apis/apps/v1/namespaces/ns/statefulsets/warren";
    api.fail(
        "PATCH",
        sts,
        422,
        "StatefulSet.apps \"warren\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than ...",
    );
    let b: Broker = serde_json::from_value(obj).unwrap();
    let err = within(warren_operator::broker::reconcile(Arc::new(b), ctx)).await.unwrap_err();
    assert!(err.to_string().contains("Forbidden"), "{err}");
    assert_eq!(
        api.lines(),
        [
            "GET /api/v1/namespaces/ns/serviceaccounts/warren",
            "GET /api/v1/namespaces/ns/configmaps/warren-config",
            "GET /api/v1/namespaces/ns/services/warren-headless",
            "GET /api/v1/namespaces/ns/services/warren",
            "GET /apis/apps/v1/namespaces/ns/statefulsets/warren",
            "GET /apis/policy/v1/namespaces/ns/poddisruptionbudgets/warren",
            "GET /api/v1/namespaces/ns/secrets/warren-admin",
            "POST /api/v1/namespaces/ns/secrets",
            "PATCH /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/warren",
            "PATCH /api/v1/namespaces/ns/serviceaccounts/warren",
            "PATCH /api/v1/namespaces/ns/configmaps/warren-config",
            "PATCH /api/v1/namespaces/ns/services/warren-headless",
            "PATCH /api/v1/namespaces/ns/services/warren",
            "PATCH /apis/apps/v1/namespaces/ns/statefulsets/warren",
            "POST /apis/events.k8s.io/v1/namespaces/ns/events",
            "PATCH /apis/warren.dev/v1alpha1/namespaces/ns/brokers/warren/status",
        ],
        "checks that no name is taken, stops at the refused child and reports it (Event, status)"
    );
    let status = api.last_status("warren");
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("ApplyFailed")));
    assert!(degraded["message"].as_str().unwrap().contains("Forbidden"), "{degraded}");
}

#[tokio::test]
async fn should_add_the_finalizer_before_touching_the_broker() {
    run(Scenario::QueueFinalizerAdded).await;
}

#[tokio::test]
async fn should_declare_a_queue_and_patch_its_status() {
    run(Scenario::QueueCreated).await;
}

#[tokio::test]
async fn should_report_a_change_the_broker_refuses() {
    run(Scenario::QueueUpdateRefused).await;
}

#[tokio::test]
async fn should_recreate_a_queue_deleted_by_hand() {
    run(Scenario::QueueDriftRepaired).await;
}

#[tokio::test]
async fn should_keep_the_queue_with_retain_and_remove_the_finalizer() {
    run(Scenario::QueueDeletedWithRetain).await;
}

#[tokio::test]
async fn should_delete_an_empty_queue_and_remove_the_finalizer() {
    run(Scenario::QueueDeletedWithDelete).await;
}

#[tokio::test]
async fn should_not_delete_a_queue_that_holds_messages() {
    run(Scenario::QueueDeletionBlockedByMessages).await;
}

#[tokio::test]
async fn should_scale_a_deployment_from_zero_on_backlog() {
    run(Scenario::QueueAutoscaledFromZero).await;
}

#[tokio::test]
async fn should_declare_and_delete_an_exchange() {
    run(Scenario::ExchangeCreatedAndDeleted).await;
}

#[tokio::test]
async fn should_wait_for_source_and_destination_before_binding() {
    run(Scenario::BindingWaitsThenBinds).await;
}

#[tokio::test]
async fn should_report_a_missing_broker_in_the_condition() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    let obj = queue_obj(json!({})).finalized();
    api.put(&qpath(), obj.clone());
    let q: Queue = serde_json::from_value(obj).unwrap();
    within(queue::reconcile(Arc::new(q), ctx)).await.unwrap();
    let status = api.last_status("orders");
    assert_eq!(status["conditions"][0]["reason"], "BrokerNotFound");
    assert!(status["conditions"][0]["message"].as_str().unwrap().contains("Broker ns/warren not found"));
}

#[tokio::test]
async fn should_apply_every_broker_child_with_one_field_manager_then_the_status() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    let bpath = path("brokers", NS, "warren");
    let obj = json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": NS, "uid": "u1", "generation": 2},
        "spec": {"storage": {"size": "5Gi"}}
    });
    api.put(&bpath, obj.clone());
    // The StatefulSet the API server holds reports one ready pod.
    let sts = "/apis/apps/v1/namespaces/ns/statefulsets/warren";
    let owned = json!([{"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "name": "warren", "uid": "u1", "controller": true}]);
    api.put(
        sts,
        json!({"metadata": {"name": "warren", "ownerReferences": owned}, "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}}),
    );
    let b: Broker = serde_json::from_value(obj).unwrap();
    within(warren_operator::broker::reconcile(Arc::new(b), ctx)).await.unwrap();
    assert_eq!(
        api.lines(),
        [
            "GET /api/v1/namespaces/ns/serviceaccounts/warren",
            "GET /api/v1/namespaces/ns/configmaps/warren-config",
            "GET /api/v1/namespaces/ns/services/warren-headless",
            "GET /api/v1/namespaces/ns/services/warren",
            "GET /apis/apps/v1/namespaces/ns/statefulsets/warren",
            "GET /apis/policy/v1/namespaces/ns/poddisruptionbudgets/warren",
            "GET /api/v1/namespaces/ns/secrets/warren-admin",
            "POST /api/v1/namespaces/ns/secrets",
            "PATCH /apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/warren",
            "PATCH /api/v1/namespaces/ns/serviceaccounts/warren",
            "PATCH /api/v1/namespaces/ns/configmaps/warren-config",
            "PATCH /api/v1/namespaces/ns/services/warren-headless",
            "PATCH /api/v1/namespaces/ns/services/warren",
            "PATCH /apis/apps/v1/namespaces/ns/statefulsets/warren",
            "PATCH /apis/policy/v1/namespaces/ns/poddisruptionbudgets/warren",
            "POST /apis/events.k8s.io/v1/namespaces/ns/events",
            "PATCH /apis/warren.dev/v1alpha1/namespaces/ns/brokers/warren/status",
        ]
    );
    for r in api.recorded().iter().filter(|r| r.method == "PATCH") {
        assert_eq!(r.content_type, "application/apply-patch+yaml", "{}", r.path);
        assert!(r.uri.contains("fieldManager=warren-operator") && r.uri.contains("force=true"), "{}", r.uri);
    }
    let recorded = api.recorded();
    let applied_sts = &recorded.iter().find(|r| r.method == "PATCH" && r.path.ends_with("statefulsets/warren")).unwrap().body;
    assert_eq!(applied_sts["metadata"]["ownerReferences"][0]["uid"], "u1");
    assert_eq!(applied_sts["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(applied_sts["metadata"]["ownerReferences"][0]["blockOwnerDeletion"], true);
    // The generated administrator credential: owned by the Broker, and its
    // password appears nowhere else (not in the status, not in Events).
    let admin = &recorded.iter().find(|r| r.method == "POST" && r.path.ends_with("/secrets")).unwrap().body;
    assert_eq!(admin["metadata"]["name"], "warren-admin");
    assert_eq!(admin["metadata"]["ownerReferences"][0]["uid"], "u1");
    let password = admin["stringData"]["password"].as_str().unwrap();
    assert!(password.len() >= 24, "a generated password of {} characters", password.len());
    for r in recorded.iter().filter(|r| !r.path.ends_with("/secrets")) {
        assert!(!r.body.to_string().contains(password), "the admin password leaked into {} {}", r.method, r.path);
    }
    let status = api.last_status("warren");
    assert_eq!(status["endpoint"], "warren.ns.svc:5680");
    assert_eq!(status["readyReplicas"], 1);
    assert_eq!(status["observedGeneration"], 2);
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("True"), Some("AllReplicasReady")));
}

#[tokio::test]
async fn should_report_an_invalid_broker_spec_without_applying_anything() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    let name = "a".repeat(60);
    let bpath = path("brokers", NS, &name);
    let obj = json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "metadata": {"name": name, "namespace": NS, "uid": "u1", "generation": 1}, "spec": {}});
    api.put(&bpath, obj.clone());
    let b: Broker = serde_json::from_value(obj).unwrap();
    within(warren_operator::broker::reconcile(Arc::new(b), ctx)).await.unwrap();
    assert_eq!(api.lines(), ["POST /apis/events.k8s.io/v1/namespaces/ns/events".to_string(), format!("PATCH {bpath}/status")]);
    let status = api.last_status(&name);
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"].as_str().unwrap().contains("at most 52"));
}

/// A child's name taken by an object the Broker does not control (the
/// namespace's `default` ServiceAccount for a Broker named `default`):
/// nothing is applied, the status and an Event say which object.
#[tokio::test]
async fn should_not_take_over_an_object_it_does_not_control() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    let bpath = path("brokers", NS, "default");
    let obj = json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "default", "namespace": NS, "uid": "u1", "generation": 1}, "spec": {}});
    api.put(&bpath, obj.clone());
    api.put("/api/v1/namespaces/ns/serviceaccounts/default", json!({"metadata": {"name": "default", "namespace": NS}}));
    let b: Broker = serde_json::from_value(obj).unwrap();
    within(warren_operator::broker::reconcile(Arc::new(b), ctx)).await.unwrap();
    assert!(api.lines().iter().all(|l| !l.starts_with("PATCH /api/v1/namespaces/ns/serviceaccounts")), "{:?}", api.lines());
    assert!(api.lines().iter().all(|l| !l.contains("statefulsets/default") || l.starts_with("GET")), "{:?}", api.lines());
    let status = api.last_status("default");
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!(degraded["reason"], "NameConflict");
    assert!(degraded["message"].as_str().unwrap().contains("ServiceAccount ns/default already exists"), "{degraded}");
    assert_eq!(api.events()[0].1, "NameConflict");
}

/// A TLS Secret that is missing or incomplete: nothing is applied (pods
/// could not mount it), the status says which Secret and which key.
#[tokio::test]
async fn should_wait_for_a_usable_tls_secret_before_applying_anything() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    let bpath = path("brokers", NS, "warren");
    let obj = json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": NS, "uid": "u1", "generation": 1},
        "spec": {"tls": {"secretName": "warren-cert", "clientAuth": "Required"}}
    });
    api.put(&bpath, obj.clone());
    let b: Broker = serde_json::from_value(obj).unwrap();
    within(warren_operator::broker::reconcile(Arc::new(b.clone()), ctx.clone())).await.unwrap();
    assert!(api.lines().iter().all(|l| !l.starts_with("PATCH /api") || l.ends_with("/status")), "{:?}", api.lines());
    let status = api.last_status("warren");
    let find = |t: &str| status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!((find("Degraded")["status"].as_str(), find("Degraded")["reason"].as_str()), (Some("True"), Some("TLSSecretMissing")));
    assert_eq!(find("Ready")["status"], "False");
    assert!(find("Degraded")["message"].as_str().unwrap().contains("ns/warren-cert"));
    assert_eq!(api.events()[0].1, "TLSSecretMissing");

    // There, but without the CA that client certificates are checked against.
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.put(
        "/api/v1/namespaces/ns/secrets/warren-cert",
        json!({"metadata": {"name": "warren-cert"}, "type": "kubernetes.io/tls", "data": {"tls.crt": b64("cert"), "tls.key": b64("key")}}),
    );
    api.clear();
    within(warren_operator::broker::reconcile(Arc::new(b), ctx)).await.unwrap();
    let status = api.last_status("warren");
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap().clone();
    assert_eq!(degraded["reason"], "TLSSecretInvalid");
    assert!(degraded["message"].as_str().unwrap().contains("no ca.crt"), "{degraded}");
}

#[tokio::test]
async fn should_exit_with_a_hint_when_the_crds_are_missing_or_older() {
    let (client, api) = ApiServer::start();
    let crd_path = |name: &str| format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
    let hint = warren_operator::check_crds(&client).await.unwrap_err().to_string();
    assert!(hint.contains("brokers.warren.dev is not installed"), "{hint}");
    assert!(hint.contains("kubectl apply --server-side --force-conflicts -f charts/warren/crds/"), "{hint}");
    assert_eq!(api.lines(), [format!("GET {}", crd_path("brokers.warren.dev"))]);

    // Installed at an older schema revision: the fields it lacks would be
    // pruned by the API server, so refuse with the upgrade command.
    for crd in warren_crds::crds() {
        let mut value = serde_json::to_value(&crd).unwrap();
        value["metadata"]["annotations"][warren_crds::SCHEMA_REVISION_ANNOTATION] = "1".into();
        api.put(&crd_path(crd.metadata.name.as_deref().unwrap()), value);
    }
    let hint = warren_operator::check_crds(&client).await.unwrap_err().to_string();
    assert!(hint.contains("schema revision 1, older than"), "{hint}");

    // Current: every CRD is read, none listed.
    for crd in warren_crds::crds() {
        api.put(&crd_path(crd.metadata.name.as_deref().unwrap()), serde_json::to_value(&crd).unwrap());
    }
    api.clear();
    warren_operator::check_crds(&client).await.unwrap();
    assert_eq!(api.lines().len(), warren_crds::crds().len());
}

#[tokio::test]
async fn should_not_delete_a_queue_holding_only_delayed_messages() {
    // The broker's if_empty counts ready and unacked messages, not delayed
    // ones: the operator looks first, so a delayed backlog is never lost.
    let e = env().await;
    e.broker.add_queue(QueueInfo { name: "orders".into(), delayed: 4, ..QueueInfo::default() });
    let err = reconcile_queue(&e, queue_obj(json!({})).finalized().deleting()).await.unwrap_err();
    assert!(err.to_string().contains("still holds 4 messages"), "{err}");
    assert!(e.broker.has_queue("orders"), "delayed messages are kept");
    let status = e.api.last_status("orders");
    assert_eq!(status["conditions"][0]["reason"], "QueueNotEmpty");
    assert_eq!(status["delayed"], 4);
    assert_eq!(e.api.events().len(), 1);

    // Retried while it waits: the condition stays, no new Event each time.
    let mut again = queue_obj(json!({})).finalized().deleting();
    again["status"] = status;
    e.api.clear();
    reconcile_queue(&e, again).await.unwrap_err();
    assert!(e.api.events().is_empty(), "one Warning, not one per retry: {:?}", e.api.lines());
}

#[tokio::test]
async fn should_wait_for_a_broker_that_is_not_ready_and_let_go_with_retain() {
    let e = env().await;
    let mut b = broker(NS, "warren", "127.0.0.1:1");
    b["status"]["conditions"] = json!([{"type": "Ready", "status": "False", "reason": "ReplicasNotReady", "message": "0/1 pods ready",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
    e.api.put(&path("brokers", NS, "warren"), b);

    reconcile_queue(&e, queue_obj(json!({})).finalized()).await.unwrap();
    let ready = e.api.last_status("orders")["conditions"][0].clone();
    assert_eq!(ready["reason"], "BrokerNotReady");
    assert!(ready["message"].as_str().unwrap().contains("0/1 pods ready"), "{ready}");

    // Deleting while the broker is down: blocked, and the condition says how out.
    let err = reconcile_queue(&e, queue_obj(json!({})).finalized().deleting()).await.unwrap_err();
    assert!(err.to_string().contains("not ready"), "{err}");
    let ready = e.api.last_status("orders")["conditions"][0].clone();
    assert_eq!(ready["reason"], "DeletionBlocked");
    assert!(ready["message"].as_str().unwrap().contains("deletionPolicy: Retain"), "{ready}");
    assert!(e.api.get(&qpath()).unwrap()["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()));

    // The way out: Retain lets the object go without the broker.
    e.api.clear();
    reconcile_queue(&e, queue_obj(json!({"deletionPolicy": "Retain"})).finalized().deleting()).await.unwrap();
    assert_eq!(e.api.get(&qpath()).unwrap()["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn should_refuse_to_scale_a_workload_another_queue_already_drives() {
    use kube::runtime::{reflector, watcher};
    let e = env().await;
    e.broker.add_queue(QueueInfo {
        name: "orders".into(),
        durable: true,
        arguments: [
            ("x-message-ttl".to_string(), warren_client::proto::Value { kind: Some(warren_client::proto::value::Kind::Int(60000)) }),
            (
                "x-queue-type".to_string(),
                warren_client::proto::Value { kind: Some(warren_client::proto::value::Kind::String("classic".into())) },
            ),
        ]
        .into(),
        ready: 50,
        ..QueueInfo::default()
    });
    let autoscaling = json!({"autoscaling": {"target": {"name": "worker"}, "maxReplicas": 10}});
    let mut mine = queue_obj(autoscaling.clone()).finalized();
    mine["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z".into();
    let mut older = object("Queue", NS, "first", json!({"brokerRef": {"name": "warren"}, "autoscaling": autoscaling["autoscaling"]}));
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
    let (reader, mut writer) = reflector::store::<Queue>();
    for q in [&older, &mine] {
        writer.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(q.clone()).unwrap()));
    }
    let _ = e.ctx.stores.queues.set(reader);

    reconcile_queue(&e, mine).await.unwrap();
    let broker_get = format!("GET {}", path("brokers", NS, "warren"));
    assert_eq!(e.api.lines(), [broker_get, status_patch(&qpath())], "no scale read or write");
    let status = e.api.last_status("orders");
    let active = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "AutoscalingActive").unwrap().clone();
    assert_eq!((active["status"].as_str(), active["reason"].as_str()), (Some("False"), Some("TargetConflict")));
    assert!(active["message"].as_str().unwrap().contains("already autoscaled by Queue first"), "{active}");
}

#[tokio::test]
async fn should_not_write_an_unchanged_status_on_every_poll() {
    let e = env().await;
    reconcile_queue(&e, queue_obj(json!({})).finalized()).await.unwrap();
    let mut again = queue_obj(json!({})).finalized();
    again["status"] = e.api.last_status("orders");
    e.api.clear();
    reconcile_queue(&e, again.clone()).await.unwrap();
    assert_eq!(e.api.lines(), [format!("GET {}", path("brokers", NS, "warren"))], "nothing changed, nothing written");
    // A count changes: written.
    e.broker.set_messages("orders", 7, 0);
    reconcile_queue(&e, again).await.unwrap();
    assert_eq!(e.api.last_status("orders")["ready"], 7);
}

/// A Kubernetes API error (here: reading the Broker is forbidden) leaves a
/// condition saying so, not a stale status.
#[tokio::test]
async fn should_report_a_kubernetes_api_error_in_the_status() {
    let (client, api) = ApiServer::start();
    let ctx = context(client);
    api.fail("GET", &path("brokers", NS, "warren"), 403, "brokers.warren.dev \"warren\" is forbidden");
    let obj = queue_obj(json!({})).finalized();
    api.put(&qpath(), obj.clone());
    let q: Queue = serde_json::from_value(obj).unwrap();
    let err = within(queue::reconcile(Arc::new(q), ctx)).await.unwrap_err();
    assert_eq!(warren_operator::retry_delay(&err), std::time::Duration::from_secs(15));
    let status = api.last_status("orders");
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["reason"], "KubernetesApiError");
    assert!(ready["message"].as_str().unwrap().contains("forbidden"), "{ready}");
}

/// A cluster Broker (3 replicas) whose StatefulSet the API server holds,
/// reconciled with the broker reached at the fake's address.
struct ClusterEnv {
    api: ApiServer,
    broker: FakeBroker,
    ctx: Arc<warren_operator::context::Context>,
    obj: Value,
}

const STS: &str = "/apis/apps/v1/namespaces/ns/statefulsets/warren";

async fn cluster_env(replicas: i32) -> ClusterEnv {
    let (client, api) = ApiServer::start();
    let (fake, addr) = FakeBroker::start().await;
    let mut settings = warren_operator::context::Settings {
        broker_image: "warren/broker:test".into(),
        broker_timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    settings.broker_endpoints.insert(format!("{NS}/warren"), addr);
    let ctx = warren_operator::context::Context::new(client, Arc::new(warren_operator::metrics::Metrics::default()), settings, None);
    let obj = json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": NS, "uid": "u1", "generation": 2},
        "spec": {"replicas": replicas}
    });
    api.put(&path("brokers", NS, "warren"), obj.clone());
    ClusterEnv { api, broker: fake, ctx, obj }
}

impl ClusterEnv {
    /// The template hash the operator builds for this Broker.
    fn hash(&self) -> String {
        let b: Broker = serde_json::from_value(self.obj.clone()).unwrap();
        let v = warren_operator::broker::build::validate(&b, "warren/broker:test").unwrap();
        warren_operator::broker::build::template_hash(&warren_operator::broker::build::stateful_set(&v)).unwrap().to_string()
    }

    /// Stores a StatefulSet of `replicas` pods, all ready, `updated` of them
    /// on the template hashing to `hash`, with `partition`.
    fn store_sts(&self, replicas: i32, hash: &str, partition: i32, updated: i32) {
        let owned = json!([{"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "name": "warren", "uid": "u1", "controller": true}]);
        self.api.put(
            STS,
            json!({
                "metadata": {"name": "warren", "generation": 7, "ownerReferences": owned,
                             "annotations": {warren_operator::broker::build::TEMPLATE_HASH_ANNOTATION: hash}},
                "spec": {"replicas": replicas, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}}},
                "status": {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": updated, "observedGeneration": 7}
            }),
        );
    }

    async fn reconcile(&self) -> kube::runtime::controller::Action {
        let b: Broker = serde_json::from_value(self.obj.clone()).unwrap();
        within(warren_operator::broker::reconcile(Arc::new(b), self.ctx.clone())).await.unwrap()
    }

    /// The StatefulSet the last reconcile applied, if any.
    fn applied_sts(&self) -> Option<Value> {
        self.api.recorded().iter().rev().find(|r| r.method == "PATCH" && r.path == STS).map(|r| r.body.clone())
    }

    fn progressing(&self) -> Value {
        let status = self.api.last_status("warren");
        status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing").unwrap().clone()
    }
}

/// A rollout restarts the next pod only once the broker says no queue
/// needs it; meanwhile `Progressing` says which queues it waits for.
#[tokio::test]
async fn should_hold_a_cluster_rollout_while_a_queue_is_quorum_critical() {
    let e = cluster_env(3).await;
    // A new template (the hash differs): no pod restarts yet.
    e.store_sts(3, "old", 0, 3);
    let action = e.reconcile().await;
    assert_eq!(e.applied_sts().unwrap()["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 3);
    assert_eq!(e.applied_sts().unwrap()["metadata"]["annotations"][warren_operator::broker::build::TEMPLATE_HASH_ANNOTATION], e.hash());
    assert!(e.broker.critical_asked().is_empty(), "nothing to ask before the controller has seen the template");
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)));

    // The controller has seen it; node 3 (pod warren-3) is next, but a queue needs it.
    e.store_sts(3, &e.hash(), 3, 0);
    e.broker.set_critical(3, &["orders", "payments"]);
    e.api.clear();
    let action = e.reconcile().await;
    assert_eq!(e.broker.critical_asked(), [3]);
    assert_eq!(e.applied_sts().unwrap()["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 3, "held");
    let p = e.progressing();
    assert_eq!((p["status"].as_str(), p["reason"].as_str()), (Some("True"), Some("QuorumCritical")));
    let message = p["message"].as_str().unwrap();
    assert!(message.contains("pod warren-3 (node 3)") && message.contains("orders, payments"), "{message}");
    assert_eq!(action, kube::runtime::controller::Action::requeue(warren_operator::broker::ROLLOUT_RECHECK));
    assert_eq!(e.api.events().iter().map(|(_, r, _)| r.as_str()).collect::<Vec<_>>(), ["RolloutWaiting"]);

    // The replicas caught up: warren-3 restarts.
    e.broker.set_critical(3, &[]);
    e.api.clear();
    e.reconcile().await;
    assert_eq!(e.applied_sts().unwrap()["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 2);
    assert_ne!(e.progressing()["reason"], "QuorumCritical");

    // warren-3 is back on the new template: node 2 is asked about next.
    e.store_sts(3, &e.hash(), 2, 1);
    e.api.clear();
    e.reconcile().await;
    assert_eq!(e.broker.critical_asked(), [3, 3, 2]);
    assert_eq!(e.applied_sts().unwrap()["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 1);
}

/// A broker that cannot be asked holds the rollout (`QuorumUnknown`).
#[tokio::test]
async fn should_hold_a_cluster_rollout_while_the_broker_cannot_be_asked() {
    let e = cluster_env(3).await;
    let (client, api) = (e.ctx.client.clone(), e.api.clone());
    let mut settings = e.ctx.settings.clone();
    settings.broker_endpoints.insert(format!("{NS}/warren"), "127.0.0.1:1".into());
    let ctx = warren_operator::context::Context::new(client, Arc::new(warren_operator::metrics::Metrics::default()), settings, None);
    let e = ClusterEnv { api, broker: e.broker, ctx, obj: e.obj };
    e.store_sts(3, &e.hash(), 3, 0);
    e.reconcile().await;
    assert_eq!(e.applied_sts().unwrap()["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 3);
    assert_eq!(e.progressing()["reason"], "QuorumUnknown");
    assert!(e.progressing()["message"].as_str().unwrap().contains("QuorumCritical"), "{}", e.progressing());
}

/// Removing pods that hold a majority of a queue's replicas is refused
/// before anything is applied; once the queue moved, the scale-down goes.
#[tokio::test]
async fn should_move_quorum_replicas_off_the_pods_a_scale_down_removes_and_refuse_for_a_classic_queue() {
    let e = cluster_env(3).await;
    e.store_sts(5, "old", 0, 5);
    let quorum = |members: &[u64]| QueueInfo {
        name: "orders".into(),
        durable: true,
        queue_type: "quorum".into(),
        members: members.to_vec(),
        ..QueueInfo::default()
    };
    e.broker.add_queue(quorum(&[3, 4, 5]));
    // A durable classic queue on node 4 has its only copy there: refused
    // before anything moves.
    e.broker.add_queue(QueueInfo {
        name: "sessions".into(),
        durable: true,
        queue_type: "classic".into(),
        leader: 4,
        ..QueueInfo::default()
    });
    let action = e.reconcile().await;
    assert!(e.api.lines().iter().all(|l| !l.starts_with("PATCH") || l.ends_with("/status")), "nothing applied: {:?}", e.api.lines());
    let status = e.api.last_status("warren");
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap().clone();
    assert_eq!(degraded["reason"], "ScaleDownRefused");
    let message = degraded["message"].as_str().unwrap();
    assert!(message.contains("scaling down from 5 to 3 pods removes nodes 4, 5"), "{message}");
    assert!(message.contains("sessions (classic, on node 4)"), "{message}");
    assert_eq!(e.broker.membership_calls(), Vec::<String>::new(), "no replica moved");
    assert_eq!(e.api.events()[0].0, "Warning");
    assert_eq!(e.api.events()[0].1, "ScaleDownRefused");
    assert_eq!(action, kube::runtime::controller::Action::requeue(warren_operator::broker::SCALE_DOWN_RECHECK));

    // The classic queue gone: the quorum queue's replicas move to nodes that
    // stay (an add, then a remove, per replica), then the StatefulSet is
    // applied with 3 pods, and the pods that stay restart one by one.
    e.broker.remove_queue("sessions");
    e.api.clear();
    e.reconcile().await;
    let mut members = e.broker.queue("orders").unwrap().members;
    members.sort();
    assert_eq!(members, [1, 2, 3]);
    let calls = e.broker.membership_calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls[0].starts_with("grow ") && calls[1] == "shrink 4 ^orders$", "{calls:?}");
    assert!(calls[2].starts_with("grow ") && calls[3] == "shrink 5 ^orders$", "{calls:?}");
    assert!(e.api.events().iter().any(|ev| ev.1 == "ReplicasMoved"), "{:?}", e.api.events());
    let sts = e.applied_sts().unwrap();
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 3);
}
