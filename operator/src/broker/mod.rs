//! The Broker controller: `validate → build → apply → status`.
//!
//! Children are applied with server-side apply under one field manager and
//! carry a controller owner reference, so Kubernetes garbage-collects them
//! with the Broker (volumes excepted: the StatefulSet retains its claims).
//! No finalizer: nothing outside Kubernetes needs cleaning up.
//!
//! Never adopt: an existing object with a child's name that this Broker
//! does not control (the namespace's `default` ServiceAccount for a Broker
//! named `default`, the API server's `kubernetes` Service) is left alone,
//! and the Broker reports `Degraded`, reason `NameConflict`, naming it.
//! A forced apply would take it over, and the garbage collector would
//! delete it with the Broker.
//!
//! Events: `InvalidSpec`, `NameConflict`, `ApplyFailed` (Warning) and
//! `Ready` / `NotReady` when the `Ready` condition changes (Normal).

pub mod build;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use warren_crds::v1alpha1::{Broker, BrokerStatus};

use crate::conditions::{self, READY};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::topology::publish;

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "broker";

/// Reconciles one Broker.
pub async fn reconcile(broker: Arc<Broker>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let namespace = broker.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let name = broker.name_any();
    let brokers: Api<Broker> = Api::namespaced(ctx.client.clone(), &namespace);
    let previous = broker.status.clone().unwrap_or_default();

    let generation = broker.metadata.generation;
    let validated = match build::validate(&broker, &ctx.settings.broker_image) {
        Ok(v) => v,
        Err(Error::InvalidSpec(message)) => {
            let status = status::invalid(&previous, generation, &message);
            if broker.status.as_ref() != Some(&status) {
                publish(&ctx, broker.as_ref(), EventType::Warning, "InvalidSpec", "Validate", message).await;
                patch_status(&brokers, &name, &status).await?;
            }
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };

    let children = build::build(&validated);
    if let Some(conflict) = foreign_child(&ctx, &namespace, &validated, &children).await? {
        let status = status::name_conflict(&previous, generation, &conflict);
        if broker.status.as_ref() != Some(&status) {
            publish(&ctx, broker.as_ref(), EventType::Warning, "NameConflict", "Apply", conflict).await;
            patch_status(&brokers, &name, &status).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let sts = match apply_children(&ctx, &namespace, &children).await {
        Ok(sts) => sts,
        Err(e) => {
            // Never silent: a child the API server refuses (an immutable
            // StatefulSet field, a quota, RBAC) shows in the Broker status.
            let status = status::apply_failed(&previous, generation, &e.to_string());
            if broker.status.as_ref() != Some(&status) {
                publish(&ctx, broker.as_ref(), EventType::Warning, "ApplyFailed", "Apply", e.to_string()).await;
            }
            patch_status(&brokers, &name, &status).await?;
            return Err(e);
        }
    };

    let status = status::from_stateful_set(&validated, &sts, &previous, k8s_openapi::jiff::Timestamp::now());
    if broker.status.as_ref() != Some(&status) {
        let was = conditions::find(&previous.conditions, READY).map(|c| c.status == "True");
        if let Some(now) = conditions::find(&status.conditions, READY).filter(|c| was != Some(c.status == "True")) {
            let (type_, reason) = if now.status == "True" { (EventType::Normal, "Ready") } else { (EventType::Normal, "NotReady") };
            publish(&ctx, broker.as_ref(), type_, reason, "Reconcile", now.message.clone()).await;
        }
        patch_status(&brokers, &name, &status).await?;
    }
    // Children changes wake us through `.owns()`; the requeue is a safety net.
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The first child name taken by an object this Broker does not control,
/// described for the condition.
async fn foreign_child(ctx: &Context, namespace: &str, v: &build::ValidatedBroker, c: &build::Children) -> Result<Option<String>> {
    let checks = [
        foreign(ctx, namespace, v, &c.service_account).await?,
        foreign(ctx, namespace, v, &c.config_map).await?,
        foreign(ctx, namespace, v, &c.headless_service).await?,
        foreign(ctx, namespace, v, &c.client_service).await?,
        foreign(ctx, namespace, v, &c.stateful_set).await?,
        foreign(ctx, namespace, v, &c.pod_disruption_budget).await?,
    ];
    Ok(checks.into_iter().flatten().next())
}

/// Whether `obj`'s name is taken by an object not controlled by the Broker.
async fn foreign<K>(ctx: &Context, namespace: &str, v: &build::ValidatedBroker, obj: &K) -> Result<Option<String>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = obj.meta().name.clone().ok_or(Error::MissingObjectKey("name"))?;
    let Some(existing) = api.get_metadata_opt(&name).await? else { return Ok(None) };
    let ours = existing.metadata.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == v.owner.uid);
    if ours {
        return Ok(None);
    }
    let owner = match existing.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true)) {
        Some(o) => format!("it is controlled by {} {}", o.kind, o.name),
        None => "it was not created by this Broker".to_string(),
    };
    Ok(Some(format!(
        "{} {namespace}/{name} already exists and {owner}; the Broker does not take it over. \
         Rename the Broker (its name names its objects) or remove that {}",
        K::kind(&()),
        K::kind(&())
    )))
}

/// Applies every child in order; returns the StatefulSet the API server
/// stored.
async fn apply_children(ctx: &Context, namespace: &str, children: &build::Children) -> Result<StatefulSet> {
    apply(ctx, namespace, &children.service_account).await?;
    apply(ctx, namespace, &children.config_map).await?;
    apply(ctx, namespace, &children.headless_service).await?;
    apply(ctx, namespace, &children.client_service).await?;
    let sts = apply(ctx, namespace, &children.stateful_set).await?;
    apply(ctx, namespace, &children.pod_disruption_budget).await?;
    Ok(sts)
}

/// Server-side applies one child object and returns what the API server
/// stored.
async fn apply<K>(ctx: &Context, namespace: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = obj.meta().name.clone().ok_or(Error::MissingObjectKey("name"))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(obj)).await?)
}

/// Writes a Broker's status with server-side apply.
pub async fn patch_status(api: &Api<Broker>, name: &str, status: &BrokerStatus) -> Result<()> {
    let patch = serde_json::json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "Broker",
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Types the Broker controller owns (for `.owns()` and RBAC).
pub type Owned = (ServiceAccount, ConfigMap, Service, StatefulSet, PodDisruptionBudget);
