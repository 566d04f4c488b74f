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
//!   the broker's message; nothing is silently dropped.

pub mod args;
pub mod binding;
pub mod exchange;
pub mod queue;

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
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
    /// Reachable at this client.
    Ready(WarrenClient<Channel>),
    /// No such Broker object: the `Ready` condition says which.
    Missing(String),
    /// The Broker exists but has no endpoint yet.
    NotReady(String),
    /// The Broker is being deleted: its pods and data go with it.
    Deleting(String),
}

/// Looks up the Broker a topology object refers to.
pub async fn broker_target(ctx: &Context, own_namespace: &str, r: &BrokerRef) -> Result<BrokerTarget> {
    let namespace = r.namespace_or(own_namespace);
    let api: Api<Broker> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(broker) = api.get_opt(&r.name).await? else {
        return Ok(BrokerTarget::Missing(format!("Broker {namespace}/{} not found", r.name)));
    };
    if broker.meta().deletion_timestamp.is_some() {
        return Ok(BrokerTarget::Deleting(format!("Broker {namespace}/{} is being deleted", r.name)));
    }
    let status = broker.status.clone().unwrap_or_default();
    // A Broker whose pods are not ready has a client Service without
    // endpoints: say so rather than report a connection error.
    if let Some(c) = conditions::find(&status.conditions, READY).filter(|c| c.status != "True") {
        return Ok(BrokerTarget::NotReady(format!("Broker {namespace}/{} is not ready ({}: {})", r.name, c.reason, c.message)));
    }
    match status.endpoint {
        Some(endpoint) => Ok(BrokerTarget::Ready(ctx.broker(&endpoint)?)),
        None => Ok(BrokerTarget::NotReady(format!("Broker {namespace}/{} has no endpoint yet (not reconciled or not ready)", r.name))),
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
