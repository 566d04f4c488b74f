//! Topology controllers against the real broker process (the Kubernetes
//! side is the mocked API server). Needs the broker binary: run
//! `cargo build -p warren-broker` first (same CARGO_TARGET_DIR), or set
//! WARREN_BROKER_BIN. Without it these tests FAIL with that hint.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use serde_json::json;
use support::real_broker::RealBroker;
use support::{ApiServer, Fixture, broker, context, object, path, within};
use warren_client::proto::warren_client::WarrenClient;
use warren_client::proto::{DeleteQueueRequest, ListBindingsRequest, ListQueuesRequest, Message, PublishRequest, QueueInfo, value::Kind};
use warren_crds::v1alpha1::{Binding, Exchange, Queue};
use warren_operator::topology::{binding, exchange, queue};

const NS: &str = "ns";

struct Env {
    _broker: RealBroker,
    api: ApiServer,
    grpc: WarrenClient<tonic::transport::Channel>,
    ctx: Arc<warren_operator::context::Context>,
}

async fn env() -> Env {
    let real = RealBroker::start();
    let (client, api) = ApiServer::start();
    api.put(&path("brokers", NS, "warren"), broker(NS, "warren", &real.addr));
    let grpc = WarrenClient::connect(format!("http://{}", real.addr)).await.unwrap();
    Env { _broker: real, api, grpc, ctx: context(client) }
}

async fn queues(e: &Env) -> Vec<QueueInfo> {
    e.grpc.clone().list_queues(ListQueuesRequest {}).await.unwrap().into_inner().queues
}

async fn find(e: &Env, name: &str) -> Option<QueueInfo> {
    queues(e).await.into_iter().find(|q| q.name == name)
}

async fn reconcile_queue(e: &Env, obj: serde_json::Value) -> Result<kube::runtime::controller::Action, warren_operator::error::Error> {
    e.api.put(&path("queues", NS, "orders"), obj.clone());
    let q: Queue = serde_json::from_value(obj).unwrap();
    within(queue::reconcile(Arc::new(q), e.ctx.clone())).await
}

fn orders(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({"brokerRef": {"name": "warren"}, "messageTtlMs": 60000, "maxLength": 1000, "overflow": "reject-publish", "deadLetterExchange": "dlx"});
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    object("Queue", NS, "orders", spec).finalized()
}

#[tokio::test]
async fn should_declare_update_repair_and_delete_a_queue_on_the_real_broker() {
    let e = env().await;

    // Declare.
    reconcile_queue(&e, orders(json!({}))).await.unwrap();
    let q = find(&e, "orders").await.expect("declared");
    assert!(q.durable);
    assert_eq!(q.arguments["x-message-ttl"].kind, Some(Kind::Int(60000)));
    assert_eq!(q.arguments["x-overflow"].kind, Some(Kind::String("reject-publish".into())));
    let status = e.api.last_status("orders");
    assert_eq!(status["conditions"][0]["reason"], "Declared", "{status}");

    // Update: mutable fields change nothing on the broker; the status mirrors counts.
    let publish = Message { exchange: String::new(), routing_key: "orders".into(), body: "x".into(), ..Message::default() };
    e.grpc.clone().publish(PublishRequest { messages: vec![publish.clone(), publish.clone()] }).await.unwrap();
    reconcile_queue(&e, orders(json!({"deletionPolicy": "Delete"})).was_ready()).await.unwrap();
    assert_eq!(e.api.last_status("orders")["ready"], 2);

    // A change the broker cannot apply (had the schema not refused it) is reported.
    reconcile_queue(&e, orders(json!({"messageTtlMs": 5})).was_ready()).await.unwrap();
    let ready = e.api.last_status("orders")["conditions"][0].clone();
    assert_eq!(ready["reason"], "PropertiesMismatch", "{ready}");
    assert_eq!(find(&e, "orders").await.unwrap().arguments["x-message-ttl"].kind, Some(Kind::Int(60000)), "unchanged");

    // Drift: deleted by hand, re-created with an Event.
    e.grpc.clone().delete_queue(DeleteQueueRequest { name: "orders".into(), ..DeleteQueueRequest::default() }).await.unwrap();
    e.api.clear();
    reconcile_queue(&e, orders(json!({})).was_ready()).await.unwrap();
    assert!(find(&e, "orders").await.is_some(), "re-created");
    assert!(e.api.events().iter().any(|(t, r, _)| t == "Warning" && r == "Recreated"), "{:?}", e.api.events());

    // Delete while holding messages: kept, condition says why.
    e.grpc.clone().publish(PublishRequest { messages: vec![publish] }).await.unwrap();
    let err = reconcile_queue(&e, orders(json!({})).deleting()).await.unwrap_err();
    assert!(err.to_string().contains("still holds 1 messages"), "{err}");
    assert!(find(&e, "orders").await.is_some());
    assert_eq!(e.api.last_status("orders")["conditions"][0]["reason"], "QueueNotEmpty");

    // Retain: finalizer removed, queue stays.
    e.api.clear();
    reconcile_queue(&e, orders(json!({"deletionPolicy": "Retain"})).deleting()).await.unwrap();
    assert!(find(&e, "orders").await.is_some());
    assert!(e.api.lines().iter().any(|l| l == &format!("PATCH {}", path("queues", NS, "orders"))));

    // Delete with messages, opted in.
    reconcile_queue(&e, orders(json!({"deleteWithMessages": true})).deleting()).await.unwrap();
    assert!(find(&e, "orders").await.is_none(), "deleted");
}

#[tokio::test]
async fn should_bind_once_exchange_and_queue_exist_on_the_real_broker() {
    let e = env().await;
    let bobj = object(
        "Binding",
        NS,
        "b",
        json!({"brokerRef": {"name": "warren"}, "source": "events", "destination": "audit", "routingKey": "user.#"}),
    )
    .finalized();
    e.api.put(&path("bindings", NS, "b"), bobj.clone());
    let b: Binding = serde_json::from_value(bobj.clone()).unwrap();
    within(binding::reconcile(Arc::new(b.clone()), e.ctx.clone())).await.unwrap();
    assert_eq!(e.api.last_status("b")["conditions"][0]["reason"], "WaitingForSource");

    let xobj = object("Exchange", NS, "events", json!({"brokerRef": {"name": "warren"}, "type": "topic"})).finalized();
    e.api.put(&path("exchanges", NS, "events"), xobj.clone());
    let x: Exchange = serde_json::from_value(xobj.clone()).unwrap();
    within(exchange::reconcile(Arc::new(x), e.ctx.clone())).await.unwrap();
    within(binding::reconcile(Arc::new(b.clone()), e.ctx.clone())).await.unwrap();
    assert_eq!(e.api.last_status("b")["conditions"][0]["reason"], "WaitingForDestination");

    let qobj = object("Queue", NS, "audit", json!({"brokerRef": {"name": "warren"}})).finalized();
    e.api.put(&path("queues", NS, "audit"), qobj.clone());
    let q: Queue = serde_json::from_value(qobj).unwrap();
    within(queue::reconcile(Arc::new(q), e.ctx.clone())).await.unwrap();
    within(binding::reconcile(Arc::new(b.clone()), e.ctx.clone())).await.unwrap();
    assert_eq!(e.api.last_status("b")["conditions"][0]["reason"], "Bound");
    let bindings = e.grpc.clone().list_bindings(ListBindingsRequest {}).await.unwrap().into_inner().bindings;
    assert!(bindings.iter().any(|x| x.source == "events" && x.destination == "audit" && x.routing_key == "user.#"));

    // Unbind on delete.
    let b: Binding = serde_json::from_value(bobj.deleting()).unwrap();
    within(binding::reconcile(Arc::new(b), e.ctx.clone())).await.unwrap();
    let bindings = e.grpc.clone().list_bindings(ListBindingsRequest {}).await.unwrap().into_inner().bindings;
    assert!(!bindings.iter().any(|x| x.source == "events" && x.destination == "audit"));

    // Exchange delete.
    let x: Exchange = serde_json::from_value(xobj.deleting()).unwrap();
    within(exchange::reconcile(Arc::new(x), e.ctx.clone())).await.unwrap();
    let passive = warren_client::proto::DeclareExchangeRequest { name: "events".into(), passive: true, ..Default::default() };
    assert_eq!(e.grpc.clone().declare_exchange(passive).await.unwrap_err().code(), tonic::Code::NotFound);
}

/// The strongest check that the operator writes only settings the broker
/// accepts (it refuses unknown keys and bad values, and every pod would
/// crash-loop): the configuration file generated from a Broker that sets
/// every field starts the real broker, which prints the values it took.
#[tokio::test]
async fn should_start_the_real_broker_on_the_generated_configuration_file() {
    let broker: warren_crds::v1alpha1::Broker = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": NS, "uid": "u"},
        "spec": {"config": {
            "maxMessageSize": 1048576, "queueWindowMessages": 512, "queueWindowBytes": 4194304,
            "blockCacheBytes": 16777216, "logFormat": "text",
            "memoryHighWatermark": "0.6", "memoryCalculationStrategy": "allocated",
            "diskFreeLimit": "10Mi", "publishBlockTimeout": "30s", "alarmCheckInterval": "500ms"
        }}
    }))
    .unwrap();
    let v = warren_operator::broker::build::validate(&broker, "img").unwrap();
    let written: Vec<&str> = v.settings.iter().map(|(k, _)| *k).collect();
    assert_eq!(written, warren_operator::broker::build::CONFIG_KEYS, "the test sets every key the operator can write");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("warren.toml");
    std::fs::write(&file, warren_operator::broker::build::config_toml(&v)).unwrap();

    let real = RealBroker::start_with(&["--config", file.to_str().unwrap()]);
    for expected in [
        "max_message_size = 1048576",
        "queue_window_messages = 512",
        "queue_window_bytes = 4194304",
        "block_cache_bytes = 16777216",
        "memory_high_watermark = 0.6",
        "memory_calculation_strategy = allocated",
        "disk_free_limit = 10MiB",
        "publish_block_timeout = 30s",
        "alarm_check_interval = 500ms",
        "log_format = text",
    ] {
        assert!(real.banner.contains(expected), "the broker did not take `{expected}`:\n{}", real.banner);
    }
}

/// The smallest absolute memory watermark the CRD and the operator accept
/// is one the broker starts with, and one byte less is refused by the
/// operator too (the CRD refuses it with a CEL rule): `16Mi` used to pass
/// both and stop the broker.
#[tokio::test]
async fn should_accept_exactly_the_watermarks_the_broker_accepts() {
    let broker = |w: &str| -> warren_crds::v1alpha1::Broker {
        serde_json::from_value(json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
            "metadata": {"name": "warren", "namespace": NS, "uid": "u"},
            "spec": {"config": {"memoryHighWatermark": w, "diskFreeLimit": 5368709120_u64}}
        }))
        .unwrap()
    };
    let floor = format!("{}", warren_crds::v1alpha1::MIN_ABSOLUTE_WATERMARK);
    let v = warren_operator::broker::build::validate(&broker(&floor), "img").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("warren.toml");
    std::fs::write(&file, warren_operator::broker::build::config_toml(&v)).unwrap();
    let real = RealBroker::start_with(&["--config", file.to_str().unwrap()]);
    assert!(
        real.banner.contains("memory_high_watermark = 32.0 MiB") || real.banner.contains("memory_high_watermark = 32MiB"),
        "{}",
        real.banner
    );
    assert!(real.banner.contains("disk_free_limit = 5.0 GiB") || real.banner.contains("disk_free_limit = 5GiB"), "{}", real.banner);
    for too_low in ["16Mi", &format!("{}", warren_crds::v1alpha1::MIN_ABSOLUTE_WATERMARK - 1)] {
        let e = warren_operator::broker::build::validate(&broker(too_low), "img").unwrap_err();
        assert!(e.to_string().contains("below 32Mi"), "{e}");
    }
}

#[tokio::test]
async fn should_put_users_and_permissions_into_the_real_broker_and_revoke_them() {
    use support::secured_broker;
    use warren_client::{Client, ConnectOptions, QueueOptions};
    use warren_crds::v1alpha1::{Permission, User};
    use warren_operator::topology::{permission, user};

    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("admin-password");
    std::fs::write(&pw_file, "admin-pw-1").unwrap();
    let real = RealBroker::start_with(&["--admin-password-file", pw_file.to_str().unwrap()]);
    let (client, api) = ApiServer::start();
    let (b, secret_path, secret) = secured_broker(NS, "warren", &real.addr, "admin-pw-1");
    api.put(&path("brokers", NS, "warren"), b);
    api.put(&secret_path, secret);
    let ctx = context(client);
    let url = format!("http://{}", real.addr);
    let admin = Client::connect_with(&url, &ConnectOptions::default().basic("admin", "admin-pw-1")).await.unwrap();

    // A User without a Secret: the operator generates one (owned by the
    // User) and puts the user into the broker.
    let uobj = object("User", NS, "alice", json!({"brokerRef": {"name": "warren"}, "tags": ["monitoring"]})).finalized();
    api.put(&path("users", NS, "alice"), uobj.clone());
    let u: User = serde_json::from_value(uobj).unwrap();
    within(user::reconcile(Arc::new(u.clone()), ctx.clone())).await.unwrap();
    let generated = api.get(&format!("/api/v1/namespaces/{NS}/secrets/alice-user-credentials")).expect("a generated Secret");
    assert_eq!(generated["metadata"]["ownerReferences"][0]["kind"], "User");
    let password = generated["stringData"]["password"].as_str().unwrap().to_string();
    assert_eq!(password.len(), 32);
    let status = api.last_status("alice");
    assert_eq!((status["username"].as_str(), status["credentialsSecret"].as_str()), (Some("alice"), Some("alice-user-credentials")));
    assert_eq!(status["conditions"][0]["reason"], "Applied", "{status}");
    let alice = Client::connect_with(&url, &ConnectOptions::default().basic("alice", password.clone())).await.unwrap();
    alice.status().await.expect("the monitoring tag lets alice see the node");
    assert_eq!(alice.declare_queue("alice.jobs", QueueOptions::default()).await.unwrap_err().code(), Some(tonic::Code::PermissionDenied));

    // Idempotent: a second reconcile puts nothing (no argon2 on the broker,
    // no new Event).
    let events = api.events().len();
    within(user::reconcile(Arc::new(u.clone()), ctx.clone())).await.unwrap();
    assert_eq!(api.events().len(), events, "{:?}", api.events());

    // Permissions for alice, and for a ServiceAccount.
    let pobj = object(
        "Permission",
        NS,
        "alice",
        json!({"brokerRef": {"name": "warren"}, "user": "alice", "configure": "^alice\\.", "write": "^alice\\.", "read": "^alice\\."}),
    )
    .finalized();
    api.put(&path("permissions", NS, "alice"), pobj.clone());
    let p: Permission = serde_json::from_value(pobj).unwrap();
    within(permission::reconcile(Arc::new(p.clone()), ctx.clone())).await.unwrap();
    alice.declare_queue("alice.jobs", QueueOptions::default()).await.unwrap();
    assert_eq!(alice.declare_queue("bob.jobs", QueueOptions::default()).await.unwrap_err().code(), Some(tonic::Code::PermissionDenied));
    assert_eq!(api.last_status("permissions/alice")["principal"], "alice");
    let sobj = object(
        "Permission",
        NS,
        "worker",
        json!({"brokerRef": {"name": "warren"}, "serviceAccount": {"name": "worker"}, "read": "^jobs$"}),
    )
    .finalized();
    api.put(&path("permissions", NS, "worker"), sobj.clone());
    let sp: Permission = serde_json::from_value(sobj).unwrap();
    within(permission::reconcile(Arc::new(sp.clone()), ctx.clone())).await.unwrap();
    let listed = admin.users().list_users(warren_client::proto::ListUsersRequest {}).await.unwrap().into_inner().users;
    let sa = listed.iter().find(|u| u.name == "system:serviceaccount:ns:worker").expect("the ServiceAccount's permissions");
    assert_eq!(sa.permissions.as_ref().unwrap().read, "^jobs$");
    assert!(!sa.has_password);

    // Deleting the Permission clears alice's permissions; deleting the User
    // revokes it at once.
    within(permission::reconcile(
        Arc::new(
            serde_json::from_value(object("Permission", NS, "alice", serde_json::to_value(&p.spec).unwrap()).finalized().deleting())
                .unwrap(),
        ),
        ctx.clone(),
    ))
    .await
    .unwrap();
    assert_eq!(alice.declare_queue("alice.more", QueueOptions::default()).await.unwrap_err().code(), Some(tonic::Code::PermissionDenied));
    let deleting: User =
        serde_json::from_value(object("User", NS, "alice", serde_json::to_value(&u.spec).unwrap()).finalized().deleting()).unwrap();
    within(user::reconcile(Arc::new(deleting), ctx.clone())).await.unwrap();
    assert_eq!(alice.list_queues().await.unwrap_err().code(), Some(tonic::Code::Unauthenticated));

    // No password in any Event or status the operator wrote.
    for r in api.recorded() {
        let body = r.body.to_string();
        if r.path.ends_with("/events") || r.path.ends_with("/status") {
            assert!(!body.contains(&password) && !body.contains("admin-pw-1"), "{} {body}", r.path);
        }
    }
}

/// A cluster pod's settings start the real broker as that member: the node
/// id its `pod-index` label gives pod `warren-2`, the member list and the
/// default queue type exactly as the StatefulSet sets them (the listen
/// addresses stay on loopback here; the other members are not running).
#[tokio::test]
async fn should_start_the_real_broker_as_a_cluster_member_with_the_generated_settings() {
    let broker: warren_crds::v1alpha1::Broker = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "warren", "namespace": NS, "uid": "u"},
        "spec": {"replicas": 3, "defaultQueueType": "classic"}
    }))
    .unwrap();
    let v = warren_operator::broker::build::validate(&broker, "img").unwrap();
    let sts = warren_operator::broker::build::stateful_set(&v);
    let env = sts.spec.template.spec.as_ref().unwrap().containers[0].env.clone().unwrap();
    let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone()).unwrap();
    let peers = value("WARREN_PEERS");
    let queue_type = value("WARREN_DEFAULT_QUEUE_TYPE");
    // The node-to-node secret as the operator generates it, where the pod
    // mounts it from.
    assert_eq!(value("WARREN_CLUSTER_SECRET_FILE"), "/etc/warren-cluster/secret");
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    let secret = warren_operator::broker::build::cluster_secret(&v, &warren_operator::broker::build::generate_password());
    std::fs::write(&secret_file, &secret.string_data.unwrap()["secret"]).unwrap();
    let real = RealBroker::start_with(&[
        "--node-id",
        "2",
        "--peers",
        &peers,
        "--default-queue-type",
        &queue_type,
        "--cluster-addr",
        "127.0.0.1:0",
        "--cluster-secret-file",
        secret_file.to_str().unwrap(),
    ]);
    let secret_line = format!("cluster_secret_file = {}", secret_file.display());
    for expected in ["node_id = 2".to_string(), format!("peers = {peers}"), "default_queue_type = classic".into(), secret_line] {
        assert!(real.banner.contains(&expected), "the broker did not take `{expected}`:\n{}", real.banner);
    }
}
