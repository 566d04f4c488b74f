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

#[tokio::test(start_paused = true)]
async fn should_take_over_a_lease_only_after_seeing_it_unrenewed_for_its_duration() {
    let (client, api) = ApiServer::start();
    // renewTime is long past by this clock: a skewed holder clock must not
    // hand the lease over early, so the candidate waits a full duration of
    // its own clock from when it first saw this record.
    api.put(LEASE, json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "warren-operator", "namespace": "ops", "resourceVersion": "7"},
        "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "renewTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 4}}));
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client, "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    assert!(!lock.try_acquire_or_renew().await.unwrap(), "first sight: not expired yet");
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(!lock.try_acquire_or_renew().await.unwrap());
    assert_eq!(api.lines(), [format!("GET {LEASE}"), format!("GET {LEASE}")], "no write while it may be valid");

    // The holder renews: the wait starts again.
    let mut renewed = api.get(LEASE).unwrap();
    renewed["spec"]["renewTime"] = "2020-01-01T00:00:05.000000Z".into();
    api.put(LEASE, renewed);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!lock.try_acquire_or_renew().await.unwrap(), "renewed 2 s ago by our clock");

    tokio::time::advance(Duration::from_secs(16)).await;
    api.clear();
    assert!(lock.try_acquire_or_renew().await.unwrap(), "unrenewed for 16 s: expired");
    assert_eq!(api.lines(), [format!("GET {LEASE}"), format!("PUT {LEASE}")]);
    let put = &api.recorded()[1].body;
    assert_eq!(put["metadata"]["resourceVersion"], "7", "replace carries the resourceVersion it read");
    assert_eq!(put["spec"]["holderIdentity"], "pod-a");
    assert_eq!(put["spec"]["leaseTransitions"], 5);
}

#[tokio::test]
async fn should_take_a_released_lease_at_once_and_release_its_own() {
    let (client, api) = ApiServer::start();
    api.put(
        LEASE,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "warren-operator", "namespace": "ops", "resourceVersion": "3"},
        "spec": {"leaseDurationSeconds": 1, "renewTime": "2026-01-01T00:00:00.000000Z"}}),
    );
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client.clone(), "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    // Releasing a lease someone else holds (here: nobody) writes nothing.
    lock.release().await.unwrap();
    assert_eq!(api.lines(), [format!("GET {LEASE}")]);
    assert!(lock.try_acquire_or_renew().await.unwrap(), "no holder: free at once");
    lock.release().await.unwrap();
    let lease = api.get(LEASE).unwrap();
    assert!(lease["spec"].get("holderIdentity").is_none(), "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);
}

/// A leader whose renewals hang or fail stops within the renew deadline,
/// before the lease (15 s) can expire for another replica.
#[tokio::test(start_paused = true)]
async fn should_step_down_before_the_lease_can_expire_when_renewals_fail() {
    let (client, api) = ApiServer::start();
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client, "ops"), "warren-operator", "pod-a", Duration::from_secs(15));
    assert!(lock.try_acquire_or_renew().await.unwrap());
    api.fail("GET", LEASE, 500, "etcd unavailable");
    let start = tokio::time::Instant::now();
    lock.hold().await;
    let held = start.elapsed();
    assert!(held >= lock.renew_deadline() && held < Duration::from_secs(15), "stepped down after {held:?}");
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
