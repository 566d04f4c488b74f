//! Warren's Kubernetes operator.
//!
//! - [`broker`]: runs each `Broker` as a StatefulSet and its companions
//!   (`validate → build → apply → status`; builders are pure).
//! - [`topology`]: declares `Exchange`, `Queue` and `Binding` objects into
//!   their Broker over gRPC, with finalizers, drift repair and conditions.
//! - [`autoscaler`]: scales a Queue's consumer workload with its backlog.
//! - [`leader`], [`http`], [`metrics`], [`watch`]: the binary's plumbing.
//!
//! Invariants: every write to Kubernetes uses the field manager
//! [`context::FIELD_MANAGER`]; status is written with server-side apply;
//! reconcilers never panic on input (errors are [`error::Error`] values and
//! conditions with a reason); one object the operator cannot read never
//! stops the others from being reconciled ([`watch`]), and a failed list is
//! retried, never fatal.
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
pub mod watch;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::finalizer;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use warren_crds::v1alpha1::{Binding, Broker, Exchange, Queue};

use crate::context::Context;
use crate::error::Error;
use crate::watch::Watches;

/// Why the operator cannot start: the CRDs are missing or older than it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CrdProblem(pub String);

/// Checks that every Warren CRD is installed at the schema revision this
/// operator was built for (or a newer one), by reading the
/// CustomResourceDefinitions. Transient failures are retried (bounded
/// backoff, forever: the operator cannot work without the API server);
/// only a missing or outdated CRD is an error, whose message says how to
/// install the current ones. Without the right to read CRDs (a
/// hand-written Role), it logs a warning and trusts the watchers.
pub async fn check_crds(client: &Client) -> Result<(), CrdProblem> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let install = "kubectl apply --server-side --force-conflicts -f charts/warren/crds/";
    for want in warren_crds::crds() {
        let name = want.metadata.name.clone().unwrap_or_default();
        let mut delay = Duration::from_millis(500);
        let installed = loop {
            match api.get_opt(&name).await {
                Ok(found) => break found,
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    tracing::warn!(crd = %name, "cannot read CustomResourceDefinitions (forbidden); not checking the schema revision");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(crd = %name, error = %e, "reading the CRD failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        let Some(installed) = installed else {
            return Err(CrdProblem(format!(
                "the CustomResourceDefinition {name} is not installed. Install the CRDs with `{install}` \
                 (or `helm install warren charts/warren`), then restart the operator"
            )));
        };
        let revision = installed
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(warren_crds::SCHEMA_REVISION_ANNOTATION))
            .and_then(|r| r.parse::<u32>().ok())
            .unwrap_or(0);
        if revision < warren_crds::SCHEMA_REVISION {
            return Err(CrdProblem(format!(
                "the installed CustomResourceDefinition {name} has schema revision {revision}, older than the {} this operator needs \
                 (Helm installs CRDs only on first install). Update them with `{install}`, then restart the operator",
                warren_crds::SCHEMA_REVISION
            )));
        }
    }
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

/// The error a reconciler returned, unwrapped from the finalizer's error.
pub fn root_error(error: &Error) -> &Error {
    match error {
        Error::Finalizer(inner) => match inner.as_ref() {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            _ => error,
        },
        e => e,
    }
}

/// Requeue delay after a failed reconcile, by the reconciler's own error
/// (unwrapped from the finalizer's).
pub fn retry_delay(error: &Error) -> Duration {
    match root_error(error) {
        Error::QueueNotEmpty { .. } => Duration::from_secs(30),
        Error::InvalidSpec(_) => Duration::from_secs(300),
        _ => Duration::from_secs(15),
    }
}

/// Requeue after a failed reconcile; errors are counted per controller and
/// kind.
fn error_policy<K>(controller: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |_obj, error, ctx| {
        ctx.metrics.error(controller, error);
        Action::requeue(retry_delay(error))
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
    watches: &Arc<Watches>,
    controller: &'static str,
    reconcile: F,
    on_store: impl FnOnce(&reflector::Store<K>),
) -> impl Future<Output = ()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let (reader, writer) = reflector::store();
    on_store(&reader);
    let stream = watch::lenient::<K>(client.clone(), namespace, watches.clone(), controller)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(topology::trigger_hash, Default::default());
    Controller::for_stream(stream, reader)
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy(controller), ctx)
        .for_each(log_result(controller))
}

/// Watches objects a Broker owns, for `.owns_stream()`, recording the
/// watch's health.
fn owned<K>(
    client: &Client,
    namespace: Option<&str>,
    watches: &Arc<Watches>,
    name: &'static str,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let cfg = watcher::Config::default().labels("app.kubernetes.io/managed-by=warren-operator").any_semantic();
    let watches = watches.clone();
    watches.register(name);
    watcher(api::<K>(client, namespace), cfg)
        .default_backoff()
        .inspect(move |event| watches.record(name, event.as_ref().err()))
        .touched_objects()
}

/// Runs the four controllers until a shutdown signal. `watches` records
/// the health of every watch (for `/healthz`).
pub async fn run_controllers(client: Client, namespace: Option<String>, ctx: Arc<Context>, watches: Arc<Watches>) {
    let ns = namespace.as_deref();
    let (broker_reader, broker_writer) = reflector::store();
    let _ = ctx.stores.brokers.set(broker_reader.clone());
    let broker_stream =
        watch::lenient::<Broker>(client.clone(), ns, watches.clone(), broker::CONTROLLER).reflect(broker_writer).applied_objects();
    let brokers = Controller::for_stream(broker_stream, broker_reader)
        .owns_stream(owned::<StatefulSet>(&client, ns, &watches, "statefulsets"))
        .owns_stream(owned::<Service>(&client, ns, &watches, "services"))
        .owns_stream(owned::<ConfigMap>(&client, ns, &watches, "configmaps"))
        .owns_stream(owned::<ServiceAccount>(&client, ns, &watches, "serviceaccounts"))
        .owns_stream(owned::<PodDisruptionBudget>(&client, ns, &watches, "poddisruptionbudgets"))
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .shutdown_on_signal()
        .run(broker::reconcile, error_policy(broker::CONTROLLER), ctx.clone())
        .for_each(log_result(broker::CONTROLLER));
    let stores = ctx.clone();
    let exchanges = topology_controller::<Exchange, _, _>(
        &client,
        ns,
        ctx.clone(),
        &watches,
        topology::exchange::CONTROLLER,
        topology::exchange::reconcile,
        |s| {
            let _ = stores.stores.exchanges.set(s.clone());
        },
    );
    let queues = topology_controller::<Queue, _, _>(
        &client,
        ns,
        ctx.clone(),
        &watches,
        topology::queue::CONTROLLER,
        topology::queue::reconcile,
        |s| {
            let _ = stores.stores.queues.set(s.clone());
        },
    );
    let bindings = topology_controller::<Binding, _, _>(
        &client,
        ns,
        ctx.clone(),
        &watches,
        topology::binding::CONTROLLER,
        topology::binding::reconcile,
        |s| {
            let _ = stores.stores.bindings.set(s.clone());
        },
    );
    futures::join!(brokers, exchanges, queues, bindings);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finalizer wraps every reconciler error: the per-error delays
    /// must look inside it.
    #[test]
    fn should_apply_per_error_delays_through_the_finalizer_error() {
        let wrapped = |e: Error| Error::from(finalizer::Error::<Error>::CleanupFailed(e));
        let not_empty = || Error::QueueNotEmpty { queue: "q".into(), messages: 3 };
        assert_eq!(retry_delay(&wrapped(not_empty())), Duration::from_secs(30));
        assert_eq!(retry_delay(&not_empty()), Duration::from_secs(30));
        let invalid = Error::from(finalizer::Error::<Error>::ApplyFailed(Error::InvalidSpec("x".into())));
        assert_eq!(retry_delay(&invalid), Duration::from_secs(300));
        assert_eq!(retry_delay(&Error::Timeout("t")), Duration::from_secs(15));
    }

    /// A failed API call leaves a condition saying so, except where the
    /// reconciler wrote a more precise one.
    #[test]
    fn should_report_failures_the_reconciler_did_not_report() {
        let mut status = kube::core::Status::failure("forbidden", "Forbidden");
        status.code = 403;
        let api = Error::Kube(kube::Error::Api(status.boxed()));
        let (reason, message) = topology::failure_condition(&Error::from(finalizer::Error::<Error>::ApplyFailed(api))).unwrap();
        assert_eq!(reason, "KubernetesApiError");
        assert!(message.contains("forbidden"), "{message}");
        let not_empty = Error::from(finalizer::Error::<Error>::CleanupFailed(Error::QueueNotEmpty { queue: "q".into(), messages: 1 }));
        assert!(topology::failure_condition(&not_empty).is_none());
    }
}
