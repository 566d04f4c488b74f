//! The topology controllers: `Exchange`, `Queue` and `Binding` objects
//! declared into their Broker over gRPC.
//!
//! Invariants:
//! - Each object carries the finalizer [`FINALIZER`] while it may exist on
//!   the broker; it is removed only after the broker-side object is gone
//!   (or retained by `deletionPolicy: Retain`, or the Broker itself is gone).
//! - Every reconcile re-checks the broker (periodic resync): an object
//!   missing on the broker is re-declared, with an Event saying so.
//! - A change the broker refuses is reported in the `Ready` condition with
//!   the broker's message; nothing is silently dropped. So is a failed
//!   Kubernetes API call (reason `KubernetesApiError`), best effort.
//! - Only objects in the Broker's namespace, or in a namespace its
//!   `spec.topologyNamespaces` lists, touch it (no confused deputy through a
//!   cross-namespace `brokerRef`).
//! - One broker-side name, one owner: when several objects claim the same
//!   queue, exchange or binding of a Broker, the oldest (by creation time,
//!   then namespace and name) owns it; the others report `Ready=False`,
//!   reason `Conflict`, and never declare or delete it. Deleting the owner
//!   while another object still claims the name leaves it on the broker for
//!   that object ([`claim`]).

pub mod args;
pub mod binding;
pub mod exchange;
pub mod queue;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;
use tonic::transport::Channel;
use warren_client::proto::warren_client::WarrenClient;
use warren_crds::v1alpha1::{Broker, BrokerRef};

use crate::conditions::{self, READY};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};

/// The finalizer on every topology object.
pub const FINALIZER: &str = "warren.dev/broker-topology";

/// How to let a Terminating object go when its broker cannot be reached:
/// the condition of a blocked deletion says it.
pub const WAY_OUT: &str = "to let the object go without touching the broker, set spec.deletionPolicy: Retain";

/// Where a topology object's Broker stands.
pub enum BrokerTarget {
    /// Reachable at this client, at this endpoint.
    Ready(WarrenClient<Channel>, String),
    /// No such Broker object: the `Ready` condition says which.
    Missing(String),
    /// The Broker exists but has no endpoint yet.
    NotReady(String),
    /// The Broker is being deleted: its pods and data go with it.
    Deleting(String),
    /// The Broker does not let objects of this namespace declare topology
    /// in it (`spec.topologyNamespaces`).
    NotAllowed(String),
}

/// How long a reconcile waits for a cache's first complete list before it
/// reads it anyway (a watch that cannot list shows in `/healthz`).
pub const CACHE_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything in a cache, once it has listed once (or after
/// [`CACHE_SYNC_WAIT`]): a partial list would hide other claimants.
pub async fn synced<K: Resource<DynamicType = ()> + Clone>(store: &kube::runtime::reflector::Store<K>) -> Vec<Arc<K>> {
    let _ = tokio::time::timeout(CACHE_SYNC_WAIT, store.wait_until_ready()).await;
    store.state()
}

/// Every object of a cache ([`synced`]); none without a cache.
pub async fn all_in<K: Resource<DynamicType = ()> + Clone>(store: Option<&kube::runtime::reflector::Store<K>>) -> Vec<Arc<K>> {
    match store {
        Some(store) => synced(store).await,
        None => Vec::new(),
    }
}

/// The Broker `namespace/name`: from the Broker controller's cache when it
/// runs (no API request per reconcile), else from the API server.
pub async fn find_broker(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Arc<Broker>>> {
    if let Some(store) = ctx.stores.brokers.get() {
        // Before its first list, "not found" would be a lie.
        let _ = tokio::time::timeout(CACHE_SYNC_WAIT, store.wait_until_ready()).await;
        return Ok(store.get(&ObjectRef::new(name).within(namespace)));
    }
    let api: Api<Broker> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(api.get_opt(name).await?.map(Arc::new))
}

/// Looks up the Broker a topology object refers to.
pub async fn broker_target(ctx: &Context, own_namespace: &str, r: &BrokerRef) -> Result<BrokerTarget> {
    let namespace = r.namespace_or(own_namespace);
    let Some(broker) = find_broker(ctx, namespace, &r.name).await? else {
        return Ok(BrokerTarget::Missing(format!("Broker {namespace}/{} not found", r.name)));
    };
    if !broker.spec.allows_topology_from(namespace, own_namespace) {
        return Ok(BrokerTarget::NotAllowed(format!(
            "Broker {namespace}/{} does not allow topology from namespace {own_namespace}: \
             its spec.topologyNamespaces must list {own_namespace} (or \"*\")",
            r.name
        )));
    }
    if broker.meta().deletion_timestamp.is_some() {
        return Ok(BrokerTarget::Deleting(format!("Broker {namespace}/{} is being deleted", r.name)));
    }
    let status = broker.status.clone().unwrap_or_default();
    // A Broker whose pods are not ready has a client Service without
    // endpoints: say so rather than report a connection error.
    if let Some(c) = conditions::find(&status.conditions, READY).filter(|c| c.status != "True") {
        return Ok(BrokerTarget::NotReady(format!("Broker {namespace}/{} is not ready ({}: {})", r.name, c.reason, c.message)));
    }
    match ctx.broker_endpoint(namespace, &r.name, status.endpoint.as_deref()) {
        Some(endpoint) => Ok(BrokerTarget::Ready(ctx.broker(&endpoint)?, endpoint)),
        None => Ok(BrokerTarget::NotReady(format!("Broker {namespace}/{} has no endpoint yet (not reconciled or not ready)", r.name))),
    }
}

/// Which object owns a broker-side name, among every live object of one
/// kind that claims it.
pub mod claim {
    use super::*;

    /// Identifies a broker-side object: the Broker (`namespace/name`) and
    /// the name (or a binding's source, destination, kind, key and
    /// arguments) on it.
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    pub struct Key {
        /// `namespace/name` of the Broker.
        pub broker: String,
        /// The object on the broker.
        pub name: String,
    }

    impl Key {
        /// The key of an object in `namespace` referring to `r`.
        pub fn new(namespace: &str, r: &BrokerRef, name: String) -> Self {
            Key { broker: format!("{}/{}", r.namespace_or(namespace), r.name), name }
        }
    }

    fn order<K: Resource>(o: &K) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
        (o.meta().creation_timestamp.as_ref().map(|t| t.0), o.namespace().unwrap_or_default(), o.name_any())
    }

    /// The object that owns `obj`'s broker-side name when it is not `obj`:
    /// the oldest other live object with the same key (`Namespace/name`).
    /// `None` when `obj` owns it (or nothing else claims it).
    pub fn owner_other_than<K: Resource>(obj: &K, all: &[Arc<K>], key: impl Fn(&K) -> Option<Key>) -> Option<String> {
        let mine = key(obj)?;
        all.iter()
            .filter(|o| o.meta().uid != obj.meta().uid && o.meta().deletion_timestamp.is_none())
            .filter(|o| order(o.as_ref()) < order(obj))
            .filter(|o| key(o.as_ref()).as_ref() == Some(&mine))
            .min_by_key(|o| order(o.as_ref()))
            .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
    }

    /// Another live object (any age) claiming `obj`'s broker-side name, to
    /// hand it over to when `obj` is deleted.
    pub fn heir<K: Resource>(obj: &K, all: &[Arc<K>], key: impl Fn(&K) -> Option<Key>) -> Option<String> {
        let mine = key(obj)?;
        all.iter()
            .filter(|o| o.meta().uid != obj.meta().uid && o.meta().deletion_timestamp.is_none())
            .filter(|o| key(o.as_ref()).as_ref() == Some(&mine))
            .min_by_key(|o| order(o.as_ref()))
            .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
    }

    /// The message of a `Conflict` condition.
    pub fn conflict_message(kind: &str, what: &str, key: &Key, owner: &str) -> String {
        format!(
            "{what} on Broker {} is already declared by {kind} {owner} (the oldest object claiming it); \
             this {kind} does not declare or delete it. Give it another name, or delete one of the two",
            key.broker
        )
    }
}

/// The `Ready` condition's reason and message for a failed reconcile, when
/// the reconciler did not already write a more precise one.
pub fn failure_condition(error: &Error) -> Option<(&'static str, String)> {
    let inner = match error {
        Error::Finalizer(f) => match f.as_ref() {
            kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => return Some(("FinalizerFailed", other.to_string())),
        },
        e => e,
    };
    match inner {
        // Written by the reconciler with their own reason.
        Error::QueueNotEmpty { .. } | Error::BrokerNotReady(_) => None,
        Error::Kube(e) => Some(("KubernetesApiError", format!("a Kubernetes API request failed: {e}"))),
        Error::Broker { .. } => Some(("BrokerUnavailable", inner.to_string())),
        e => Some(("ReconcileFailed", e.to_string())),
    }
}

/// The `Ready` condition's reason for a broker error.
pub fn reason_for(status: &tonic::Status) -> &'static str {
    match status.code() {
        Code::FailedPrecondition => "PropertiesMismatch",
        Code::InvalidArgument => "RejectedByBroker",
        Code::NotFound => "NotFound",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "BrokerResourceExhausted",
        _ => "BrokerUnavailable",
    }
}

/// A `Ready` condition.
pub fn ready(status: bool, reason: &str, message: impl Into<String>, generation: Option<i64>) -> Condition {
    conditions::new(READY, status, reason, message, generation)
}

/// Publishes an Event about `obj`. A failure to publish is logged, never
/// fatal: Events are for people, the status is the record.
pub async fn publish<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing an event failed");
    }
}

/// Writes `status` with server-side apply under the operator's field manager.
pub async fn patch_status<K>(api: &Api<K>, name: &str, status: &impl Serialize) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// The namespace of a namespaced object.
pub fn namespace_of<K: Resource>(obj: &K) -> Result<String> {
    obj.namespace().ok_or(Error::MissingObjectKey("namespace"))
}

/// Watch predicate for topology objects: reconcile on spec changes
/// (generation, which deletion also bumps), finalizer and annotation
/// changes, but not on our own status writes — the periodic requeue
/// refreshes those.
pub fn trigger_hash<K: Resource>(obj: &K) -> Option<u64> {
    let meta = obj.meta();
    let mut h = DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.annotations.hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::claim::{Key, heir, owner_other_than};
    use super::*;
    use warren_crds::v1alpha1::Queue;

    fn queue(ns: &str, name: &str, created: &str, broker_ns: Option<&str>, deleting: bool) -> Arc<Queue> {
        let mut v = serde_json::json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": name, "namespace": ns, "uid": format!("{ns}/{name}"), "creationTimestamp": created},
            "spec": {"brokerRef": {"name": "warren", "namespace": broker_ns}, "name": "shared"}
        });
        if deleting {
            v["metadata"]["deletionTimestamp"] = "2026-03-01T00:00:00Z".into();
        }
        Arc::new(serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}")))
    }

    fn key(q: &Queue) -> Option<Key> {
        Some(Key::new(&q.namespace()?, &q.spec.broker_ref, q.broker_name()))
    }

    #[test]
    fn should_give_a_broker_side_name_to_the_oldest_live_claimant() {
        let owner = queue("app", "a", "2026-01-01T00:00:00Z", Some("brokers"), false);
        let second = queue("brokers", "b", "2026-01-02T00:00:00Z", None, false);
        let elsewhere = queue("app", "c", "2025-01-01T00:00:00Z", None, false); // another Broker (app/warren)
        let all = vec![owner.clone(), second.clone(), elsewhere.clone()];
        assert_eq!(owner_other_than(owner.as_ref(), &all, key), None);
        assert_eq!(owner_other_than(second.as_ref(), &all, key).as_deref(), Some("app/a"));
        assert_eq!(owner_other_than(elsewhere.as_ref(), &all, key), None);
        // The owner being deleted hands the name over.
        assert_eq!(heir(owner.as_ref(), &all, key).as_deref(), Some("brokers/b"));
        let gone = queue("app", "a", "2026-01-01T00:00:00Z", Some("brokers"), true);
        assert_eq!(owner_other_than(second.as_ref(), &[gone, second.clone()], key), None);
        assert_eq!(heir(second.as_ref(), std::slice::from_ref(&second), key), None);
    }
}
