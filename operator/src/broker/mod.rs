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
//! A Broker of more than one replica is a cluster: its StatefulSet is
//! rolled one pod at a time and scaled down only when the broker says no
//! queue would lose its majority ([`rollout`]). That needs the broker's
//! answer before the StatefulSet is applied, so a cluster's reconcile
//! reads the stored StatefulSet and calls the broker first.
//!
//! Security objects ([`access`]): the administrator Secret is created
//! before anything else, a `spec.tls.secretName` Secret is checked before
//! anything is applied, and the NetworkPolicy, the Certificate and the
//! TokenReview binding are applied before the pods.
//!
//! Events: `InvalidSpec`, `NameConflict`, `TLSSecretMissing`,
//! `TLSSecretInvalid`, `CertManagerMissing`, `ApplyFailed`,
//! `ScaleDownRefused` (Warning), `RolloutWaiting` when a restart waits for
//! the broker, `ReplicasMoved` when a scale-down moved quorum queue
//! replicas, and `Ready` / `NotReady` when the `Ready` condition changes
//! (Normal).

pub mod access;
pub mod build;
pub mod rollout;
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
use warren_client::proto::{
    GrowQueuesRequest, ListQueuesRequest, MembershipChangeResponse, QueueInfo, QuorumCriticalRequest, ShrinkQueuesRequest,
};
use warren_crds::v1alpha1::{Broker, BrokerStatus};

use crate::conditions::{self, PROGRESSING, READY};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::topology::publish;

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "broker";
/// How soon a rollout waiting for the broker is checked again.
pub const ROLLOUT_RECHECK: Duration = Duration::from_secs(10);
/// How soon a refused scale-down is checked again (the queues may have
/// been shrunk meanwhile, which Kubernetes does not see).
pub const SCALE_DOWN_RECHECK: Duration = Duration::from_secs(30);

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

    let mut children = build::build(&validated);
    let conflict = match foreign_child(&ctx, &namespace, &validated, &children).await? {
        Some(c) => Some(c),
        // Creating the generated Secrets is the first write: a refusal
        // (RBAC, a quota) is reported like any child's.
        None => match access::ensure_generated_secrets(&ctx, &validated).await {
            Ok(c) => c,
            Err(e) => return apply_failed(&ctx, &brokers, &broker, e).await,
        },
    };
    if let Some(conflict) = conflict {
        let status = status::name_conflict(&previous, generation, &conflict);
        if broker.status.as_ref() != Some(&status) {
            publish(&ctx, broker.as_ref(), EventType::Warning, "NameConflict", "Apply", conflict).await;
            patch_status(&brokers, &name, &status).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    // Pods that could not mount their TLS Secret would never start: wait
    // for it (Secrets are not watched, hence the short requeue).
    if let Some((reason, message)) = access::check_tls_secret(&ctx, &validated).await? {
        return blocked(&ctx, &brokers, &broker, reason, message).await;
    }
    let mut waiting = None;
    if validated.is_cluster() {
        match plan_cluster(&ctx, &namespace, &validated, &broker, &mut children.stateful_set).await? {
            Plan::Proceed(w) => waiting = w,
            Plan::RefuseScaleDown(message) => {
                let status = status::scale_down_refused(&previous, generation, &message);
                if broker.status.as_ref() != Some(&status) {
                    publish(&ctx, broker.as_ref(), EventType::Warning, "ScaleDownRefused", "Scale", message).await;
                    patch_status(&brokers, &name, &status).await?;
                }
                return Ok(Action::requeue(SCALE_DOWN_RECHECK));
            }
        }
    }
    // The NetworkPolicy, the Certificate and the TokenReview binding
    // first: pods never run unprotected or without their certificate.
    let applied = match access::apply_security(&ctx, &validated).await {
        Ok(()) => apply_children(&ctx, &namespace, &children).await,
        Err(Error::CertManagerMissing) => {
            return blocked(&ctx, &brokers, &broker, "CertManagerMissing", Error::CertManagerMissing.to_string()).await;
        }
        Err(e) => Err(e),
    };
    let sts = match applied {
        Ok(sts) => sts,
        Err(e) => return apply_failed(&ctx, &brokers, &broker, e).await,
    };

    let mut status = status::from_stateful_set(&validated, &sts, &previous, k8s_openapi::jiff::Timestamp::now());
    if let Some(w) = &waiting {
        status = status::rollout_waiting(&status, generation, w.reason, &w.message);
    }
    if broker.status.as_ref() != Some(&status) {
        let was = conditions::find(&previous.conditions, READY).map(|c| c.status == "True");
        if let Some(now) = conditions::find(&status.conditions, READY).filter(|c| was != Some(c.status == "True")) {
            let (type_, reason) = if now.status == "True" { (EventType::Normal, "Ready") } else { (EventType::Normal, "NotReady") };
            publish(&ctx, broker.as_ref(), type_, reason, "Reconcile", now.message.clone()).await;
        }
        let was_reason = conditions::find(&previous.conditions, PROGRESSING).map(|c| c.reason.clone());
        if let Some(w) = &waiting
            && was_reason.as_deref() != Some(w.reason)
        {
            publish(&ctx, broker.as_ref(), EventType::Normal, "RolloutWaiting", "Rollout", w.message.clone()).await;
        }
        patch_status(&brokers, &name, &status).await?;
    }
    // Children changes wake us through `.owns()`; the requeue is a safety
    // net, or the next look at a rollout waiting for the broker.
    Ok(Action::requeue(if waiting.is_some() { ROLLOUT_RECHECK } else { Duration::from_secs(300) }))
}

/// What a cluster's reconcile does with its StatefulSet.
enum Plan {
    /// Apply it (its partition set), possibly with a rollout waiting.
    Proceed(Option<Waiting>),
    /// Apply nothing: the scale-down is unsafe or cannot be checked.
    RefuseScaleDown(String),
}

/// A rollout step held back, for the `Progressing` condition.
struct Waiting {
    reason: &'static str,
    message: String,
}

/// Decides a cluster's scale-down and its rollout partition (set on
/// `sts`), asking the broker where [`rollout`] says to.
async fn plan_cluster(ctx: &Context, namespace: &str, v: &build::ValidatedBroker, broker: &Broker, sts: &mut StatefulSet) -> Result<Plan> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    let observed = api.get_opt(&v.name).await?.as_ref().map(rollout::Observed::from_stateful_set);
    let desired = v.spec.replicas;
    if let Some(o) = observed.as_ref().filter(|o| o.replicas > desired) {
        let removed: Vec<String> = (desired..o.replicas).map(|i| build::ValidatedBroker::node_id(i).to_string()).collect();
        let what = format!("scaling down from {} to {desired} pods removes nodes {}", o.replicas, removed.join(", "));
        let queues = match broker_client(ctx, v, broker).await?.list_queues(ListQueuesRequest {}).await {
            Ok(r) => r.into_inner().queues,
            Err(e) => {
                return Ok(Plan::RefuseScaleDown(format!(
                    "{what}; the broker must list its queues to show that none would lose its majority, and it could not: {}; \
                     checked again every {} s",
                    Error::broker("ListQueues", e),
                    SCALE_DOWN_RECHECK.as_secs()
                )));
            }
        };
        // What moving replicas cannot fix (a classic queue's only copy)
        // refuses the scale-down before anything moves.
        let classic: Vec<QueueInfo> = queues.iter().filter(|q| q.queue_type != "quorum").cloned().collect();
        let blockers = rollout::scale_down_blockers(&classic, desired);
        if !blockers.is_empty() {
            return Ok(Plan::RefuseScaleDown(format!(
                "{what}, which would remove the only copy of {} classic queue(s): {}. Move or delete them, or set replicas \
                 back to {}; checked again every {} s",
                blockers.len(),
                rollout::some_of(&blockers, 5),
                o.replicas,
                SCALE_DOWN_RECHECK.as_secs()
            )));
        }
        // Quorum queues move their replicas off the nodes that go.
        let moves = rollout::replica_moves(&queues, desired);
        let queues = if moves.is_empty() {
            queues
        } else {
            if let Err(failure) = move_replicas(ctx, v, broker, &moves).await? {
                return Ok(Plan::RefuseScaleDown(format!(
                    "{what}; their quorum queue replicas must move to the nodes that stay first, and {failure}; \
                     checked again every {} s",
                    SCALE_DOWN_RECHECK.as_secs()
                )));
            }
            let queues: Vec<String> =
                moves.iter().map(|m| m.queue.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let note = format!(
                "{what}: moved {} replica(s) of {} quorum queue(s) to the nodes that stay: {}",
                moves.len(),
                queues.len(),
                rollout::some_of(&queues, 5)
            );
            publish(ctx, broker, EventType::Normal, "ReplicasMoved", "Scale", note).await;
            match broker_client(ctx, v, broker).await?.list_queues(ListQueuesRequest {}).await {
                Ok(r) => r.into_inner().queues,
                Err(e) => {
                    return Ok(Plan::RefuseScaleDown(format!(
                        "{what}; the broker must list its queues again after moving replicas, and it could not: {}; \
                         checked again every {} s",
                        Error::broker("ListQueues", e),
                        SCALE_DOWN_RECHECK.as_secs()
                    )));
                }
            }
        };
        let blockers = rollout::scale_down_blockers(&queues, desired);
        if !blockers.is_empty() {
            return Ok(Plan::RefuseScaleDown(format!(
                "{what}, which would leave {} queue(s) without a majority of replicas or without their only copy: {}. \
                 Move or delete the classic queues on those nodes, or set replicas back to {}; checked again every {} s",
                blockers.len(),
                rollout::some_of(&blockers, 5),
                o.replicas,
                SCALE_DOWN_RECHECK.as_secs()
            )));
        }
    }
    let hash = build::template_hash(sts).unwrap_or_default().to_string();
    let (partition, waiting) = match rollout::next(desired, &hash, observed.as_ref()) {
        rollout::Next::Apply(p) => (p, None),
        rollout::Next::Ask { hold, index, node } => {
            let pod = v.pod_name(index);
            match broker_client(ctx, v, broker).await?.quorum_critical(QuorumCriticalRequest { node }).await {
                Ok(r) if r.get_ref().queues.is_empty() => (index, None),
                Ok(r) => {
                    let queues = r.into_inner().queues;
                    let message = format!(
                        "pod {pod} (node {node}) restarts next, but stopping it now would leave {} quorum queue(s) without a majority \
                         of replicas up: {}; waiting for their replicas to catch up (checked every {} s)",
                        queues.len(),
                        rollout::some_of(&queues, 5),
                        ROLLOUT_RECHECK.as_secs()
                    );
                    (hold, Some(Waiting { reason: "QuorumCritical", message }))
                }
                // A node the broker does not know holds no replica.
                Err(e) if e.code() == tonic::Code::InvalidArgument => (index, None),
                Err(e) => {
                    let message = format!(
                        "pod {pod} (node {node}) restarts next, but the broker could not say whether a queue needs it: {}; \
                         checked again every {} s",
                        Error::broker("QuorumCritical", e),
                        ROLLOUT_RECHECK.as_secs()
                    );
                    (hold, Some(Waiting { reason: "QuorumUnknown", message }))
                }
            }
        }
    };
    build::set_partition(sts, partition);
    Ok(Plan::Proceed(waiting))
}

/// A gRPC client of the Broker (its Service, or the configured override),
/// with the Broker's TLS and the administrator credential.
async fn broker_client(ctx: &Context, v: &build::ValidatedBroker, broker: &Broker) -> Result<warren_client::RawClient> {
    let endpoint = ctx.broker_endpoint(&v.namespace, &v.name, Some(&v.endpoint())).unwrap_or_else(|| v.endpoint());
    let access = access::broker_access(ctx, broker).await?;
    Ok(ctx.broker(&endpoint, &access)?.0)
}

/// Makes the replica moves of a scale-down through the broker, each an
/// add (`GrowQueues` on the node that stays, for that queue only) then a
/// remove (`ShrinkQueues` on the node that goes), so that a queue never has
/// fewer replicas than it had. `Ok(Err(why))`: a move failed (the broker
/// refused or could not be asked); the moves already made stand, and the
/// next reconcile plans from where they left the queues.
async fn move_replicas(ctx: &Context, v: &build::ValidatedBroker, broker: &Broker, moves: &[rollout::Move]) -> Result<Result<(), String>> {
    let mut client = broker_client(ctx, v, broker).await?;
    for m in moves {
        let pattern = rollout::exact_pattern(&m.queue);
        if let Some(node) = m.add {
            let request = GrowQueuesRequest { node, queue_pattern: pattern.clone(), ..GrowQueuesRequest::default() };
            let what = format!("adding a replica of queue {} on node {node}", m.queue);
            if let Some(why) = move_failure(client.grow_queues(request).await, "GrowQueues", &m.queue, &what) {
                return Ok(Err(why));
            }
        }
        let request = ShrinkQueuesRequest { node: m.remove, queue_pattern: pattern };
        let what = format!("removing the replica of queue {} on node {}", m.queue, m.remove);
        if let Some(why) = move_failure(client.shrink_queues(request).await, "ShrinkQueues", &m.queue, &what) {
            return Ok(Err(why));
        }
        tracing::info!(queue = %m.queue, added = ?m.add, removed = m.remove, "moved a quorum queue replica for a scale-down");
    }
    Ok(Ok(()))
}

/// Why a `GrowQueues` / `ShrinkQueues` call did not make `what` happen to
/// `queue`: the call failed, or the broker refused it for that queue.
fn move_failure(
    result: std::result::Result<tonic::Response<MembershipChangeResponse>, tonic::Status>,
    call: &'static str,
    queue: &str,
    what: &str,
) -> Option<String> {
    match result {
        Err(e) => Some(format!("{what} failed: {}", Error::broker(call, e))),
        Ok(r) => r
            .into_inner()
            .changes
            .into_iter()
            .find(|c| c.queue == queue && !c.ok)
            .map(|c| format!("the broker refused {what}: {}", c.error)),
    }
}

/// Never silent: an object the API server refuses (an immutable
/// StatefulSet field, a quota, RBAC) shows in the Broker status
/// (`Degraded`, reason `ApplyFailed`) and a Warning Event; the error goes
/// on to the controller's backoff.
async fn apply_failed(ctx: &Context, brokers: &Api<Broker>, broker: &Broker, e: Error) -> Result<Action> {
    let previous = broker.status.clone().unwrap_or_default();
    let status = status::apply_failed(&previous, broker.metadata.generation, &e.to_string());
    if broker.status.as_ref() != Some(&status) {
        publish(ctx, broker, EventType::Warning, "ApplyFailed", "Apply", e.to_string()).await;
    }
    patch_status(brokers, &broker.name_any(), &status).await?;
    Err(e)
}

/// Reports a Broker waiting for something outside it (`reason`): status
/// and a Warning Event when it changes; tries again shortly.
async fn blocked(ctx: &Context, brokers: &Api<Broker>, broker: &Broker, reason: &str, message: String) -> Result<Action> {
    let previous = broker.status.clone().unwrap_or_default();
    let status = status::blocked(&previous, broker.metadata.generation, reason, &message);
    if broker.status.as_ref() != Some(&status) {
        publish(ctx, broker, EventType::Warning, reason, "Apply", message).await;
        patch_status(brokers, &broker.name_any(), &status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(15)))
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
