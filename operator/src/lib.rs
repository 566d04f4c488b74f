//! Warren's Kubernetes operator.
//!
//! - [`broker`]: runs each `Broker` as a StatefulSet and its companions
//!   (`validate → build → apply → status`; builders are pure).
//! - [`topology`]: declares `Exchange`, `Queue` and `Binding` objects into
//!   their Broker over gRPC, with finalizers, drift repair and conditions.
//! - [`autoscaler`]: scales a Queue's consumer workload with its backlog.
//! - [`leader`], [`http`], [`metrics`]: the binary's plumbing.
//!
//! Invariants: every write to Kubernetes uses the field manager
//! [`context::FIELD_MANAGER`]; status is written with server-side apply;
//! reconcilers never panic on input (errors are [`error::Error`] values and
//! conditions with a reason).
#![forbid(unsafe_code)]

pub mod autoscaler;
pub mod broker;
pub mod conditions;
pub mod context;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod topology;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use warren_crds::v1alpha1::{Binding, Broker, Exchange, Queue};

use crate::context::Context;
use crate::error::Error;

/// Checks that every Warren CRD is installed, by listing one object of each
/// kind. On failure the error says how to install them.
pub async fn check_crds(client: &Client, namespace: Option<&str>) -> Result<(), String> {
    async fn probe<K>(client: &Client, namespace: Option<&str>) -> Result<(), String>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    {
        let api: Api<K> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(format!(
                "the CustomResourceDefinition {}.{} is not installed. Install the CRDs with \
                 `kubectl apply --server-side -f charts/warren/crds/` (or `helm install warren charts/warren`), then restart the operator",
                K::plural(&()),
                K::group(&())
            )),
            Err(e) => Err(format!("listing {}.{}: {e}", K::plural(&()), K::group(&()))),
        }
    }
    probe::<Broker>(client, namespace).await?;
    probe::<Exchange>(client, namespace).await?;
    probe::<Queue>(client, namespace).await?;
    probe::<Binding>(client, namespace).await?;
    Ok(())
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Requeue delay after a failed reconcile; errors are counted per
/// controller and kind.
fn error_policy<K>(controller: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |_obj, error, ctx| {
        ctx.metrics.error(controller, error);
        let delay = match error {
            Error::QueueNotEmpty { .. } => Duration::from_secs(30),
            Error::InvalidSpec(_) => Duration::from_secs(300),
            _ => Duration::from_secs(15),
        };
        Action::requeue(delay)
    }
}

fn log_result<K: Resource, E: std::fmt::Display>(
    controller: &'static str,
) -> impl Fn(Result<(ObjectRef<K>, Action), E>) -> std::future::Ready<()> {
    move |result| {
        match result {
            Ok((obj, _)) => tracing::debug!(controller, object = %obj, "reconciled"),
            Err(e) => tracing::warn!(controller, error = %e, "reconcile failed"),
        }
        std::future::ready(())
    }
}

/// A topology controller: triggers on spec, finalizer and annotation
/// changes (not on its own status writes), plus the periodic requeues.
fn topology_controller<K, F, Fut>(
    client: &Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    controller: &'static str,
    reconcile: F,
    on_store: impl FnOnce(&reflector::Store<K>),
) -> impl Future<Output = ()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let (reader, writer) = reflector::store();
    on_store(&reader);
    let stream = watcher(api::<K>(client, namespace), watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(topology::trigger_hash, Default::default());
    Controller::for_stream(stream, reader)
        .shutdown_on_signal()
        .run(reconcile, error_policy(controller), ctx)
        .for_each(log_result(controller))
}

/// Runs the four controllers until a shutdown signal.
pub async fn run_controllers(client: Client, namespace: Option<String>, ctx: Arc<Context>) {
    let ns = namespace.as_deref();
    let wc = watcher::Config::default().any_semantic();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=warren-operator");
    let brokers = Controller::new(api::<Broker>(&client, ns), wc)
        .owns(api::<StatefulSet>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<ServiceAccount>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned)
        .shutdown_on_signal()
        .run(broker::reconcile, error_policy(broker::CONTROLLER), ctx.clone())
        .for_each(log_result(broker::CONTROLLER));
    let exchanges = topology_controller::<Exchange, _, _>(
        &client,
        ns,
        ctx.clone(),
        topology::exchange::CONTROLLER,
        topology::exchange::reconcile,
        |_| {},
    );
    let queue_ctx = ctx.clone();
    let queues =
        topology_controller::<Queue, _, _>(&client, ns, ctx.clone(), topology::queue::CONTROLLER, topology::queue::reconcile, |s| {
            queue_ctx.set_queues(s.clone())
        });
    let bindings =
        topology_controller::<Binding, _, _>(&client, ns, ctx, topology::binding::CONTROLLER, topology::binding::reconcile, |_| {});
    futures::join!(brokers, exchanges, queues, bindings);
}
