//! The Broker controller: `validate → build → apply → status`.
//!
//! Children are applied with server-side apply under one field manager and
//! carry a controller owner reference, so Kubernetes garbage-collects them
//! with the Broker (volumes excepted: the StatefulSet retains its claims).
//! No finalizer: nothing outside Kubernetes needs cleaning up.

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
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use warren_crds::v1alpha1::{Broker, BrokerStatus};

use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "broker";

/// Reconciles one Broker.
pub async fn reconcile(broker: Arc<Broker>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let namespace = broker.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let name = broker.name_any();
    let brokers: Api<Broker> = Api::namespaced(ctx.client.clone(), &namespace);
    let previous = broker.status.clone().unwrap_or_default();

    let validated = match build::validate(&broker, &ctx.settings.broker_image) {
        Ok(v) => v,
        Err(Error::InvalidSpec(message)) => {
            let status = status::invalid(&previous, broker.metadata.generation, &message);
            patch_status(&brokers, &name, &status).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };

    let children = build::build(&validated);
    let sts = match apply_children(&ctx, &namespace, &children).await {
        Ok(sts) => sts,
        Err(e) => {
            // Never silent: a child the API server refuses (an immutable
            // StatefulSet field, a quota, RBAC) shows in the Broker status.
            let status = status::apply_failed(&previous, broker.metadata.generation, &e.to_string());
            patch_status(&brokers, &name, &status).await?;
            return Err(e);
        }
    };

    let status = status::from_stateful_set(&validated, &sts, &previous, k8s_openapi::jiff::Timestamp::now());
    if broker.status.as_ref() != Some(&status) {
        patch_status(&brokers, &name, &status).await?;
    }
    // Children changes wake us through `.owns()`; the requeue is a safety net.
    Ok(Action::requeue(Duration::from_secs(300)))
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
