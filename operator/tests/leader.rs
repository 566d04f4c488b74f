//! Leader election against a mocked API server.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use support::ApiServer;
use warren_operator::leader::LeaseLock;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/warren-operator";

#[tokio::test]
async fn should_create_the_lease_when_none_exists() {
    let (client, api) = ApiServer::start();
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client, "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    assert!(lock.try_acquire_or_renew().await.unwrap());
    assert_eq!(api.lines(), [format!("GET {LEASE}"), "POST /apis/coordination.k8s.io/v1/namespaces/ops/leases".to_string()]);
    let created = &api.recorded()[1].body;
    assert_eq!(created["spec"]["holderIdentity"], "pod-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn should_not_take_a_lease_another_replica_renewed_recently() {
    let (client, api) = ApiServer::start();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.put(
        LEASE,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "warren-operator", "namespace": "ops", "resourceVersion": "7"},
        "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "renewTime": now}}),
    );
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client, "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    assert!(!lock.try_acquire_or_renew().await.unwrap());
    assert_eq!(api.lines(), [format!("GET {LEASE}")], "no write while another replica holds the lease");
}

#[tokio::test]
async fn should_take_over_an_expired_lease_with_optimistic_concurrency() {
    let (client, api) = ApiServer::start();
    api.put(LEASE, json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "warren-operator", "namespace": "ops", "resourceVersion": "7"},
        "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "renewTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 4}}));
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client, "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    assert!(lock.try_acquire_or_renew().await.unwrap());
    let lines = api.lines();
    assert_eq!(lines, [format!("GET {LEASE}"), format!("PUT {LEASE}")]);
    let put = &api.recorded()[1].body;
    assert_eq!(put["metadata"]["resourceVersion"], "7", "replace carries the resourceVersion it read");
    assert_eq!(put["spec"]["holderIdentity"], "pod-a");
    assert_eq!(put["spec"]["leaseTransitions"], 5);
}

#[tokio::test]
async fn should_renew_its_own_lease_and_lose_a_race_on_conflict() {
    let (client, api) = ApiServer::start();
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client.clone(), "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    assert!(lock.try_acquire_or_renew().await.unwrap(), "created");
    assert!(lock.try_acquire_or_renew().await.unwrap(), "renewed");
    assert_eq!(api.lines()[2..], [format!("GET {LEASE}"), format!("PUT {LEASE}")]);
    assert_eq!(api.get(LEASE).unwrap()["metadata"]["resourceVersion"], "2");

    // Another candidate read version 2, then pod-a renewed (version 3): the
    // candidate's replace conflicts and it does not become leader.
    let mut stale = api.get(LEASE).unwrap();
    assert!(lock.try_acquire_or_renew().await.unwrap());
    stale["spec"]["holderIdentity"] = "pod-b".into();
    let leases: Api<Lease> = Api::namespaced(client, "ops");
    let stale: Lease = serde_json::from_value(stale).unwrap();
    let err = leases.replace("warren-operator", &Default::default(), &stale).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(e) if e.code == 409));
}
