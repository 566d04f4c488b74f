//! The Binding controller: binds once the source exchange and the
//! destination exist, and re-binds when the binding disappears.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tonic::Code;
use tonic::transport::Channel;
use warren_client::proto::warren_client::WarrenClient;
use warren_client::proto::{BindRequest, BindingInfo, DeclareExchangeRequest, DeclareQueueRequest, DestinationKind, ListBindingsRequest};
use warren_crds::v1alpha1::{Binding, BindingStatus, BoundBinding, DeletionPolicy, TopologyStatus};

use super::{
    BrokerTarget, FINALIZER, WAY_OUT, args, broker_target, claim, failure_condition, namespace_of, patch_status, publish, ready, reason_for,
};
use crate::conditions::{self, READY};
use crate::context::Context;
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "binding";

/// Reconciles one Binding.
pub async fn reconcile(b: Arc<Binding>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let api: Api<Binding> = Api::namespaced(ctx.client.clone(), &namespace_of(b.as_ref())?);
    let result = finalizer(&api, FINALIZER, b.clone(), |event| async {
        match event {
            Finalizer::Apply(b) => apply(&b, &ctx, &api).await,
            Finalizer::Cleanup(b) => cleanup(&b, &ctx, &api).await,
        }
    })
    .await
    .map_err(Error::from);
    if let Err(e) = &result
        && let Some((reason, message)) = failure_condition(e)
        && let Err(w) = write(&api, &b, ready(false, reason, message, b.metadata.generation)).await
    {
        tracing::debug!(error = %w, "writing the failure into the status failed too");
    }
    result
}

/// The broker-side identity of a Binding (every field the broker tells
/// bindings apart by), for [`claim`].
pub fn claim_key(b: &Binding) -> Option<claim::Key> {
    let s = &b.spec;
    let identity = serde_json::to_string(&(&s.source, &s.destination, s.destination_kind, &s.routing_key, &s.arguments)).ok()?;
    Some(claim::Key::new(&b.namespace()?, &s.broker_ref, identity))
}

/// How long a list of a broker's bindings answers "does this binding
/// exist" for every Binding reconcile, so that N Bindings cost one list per
/// broker and interval instead of N (each of N bindings).
pub const LIST_TTL: Duration = Duration::from_secs(5);

/// Bindings listed from each broker, by endpoint. Only decides whether a
/// binding was missing (the `Recreated` Event): binding is idempotent and
/// happens on every reconcile anyway.
#[derive(Default)]
pub struct ListCache {
    lists: Mutex<HashMap<String, Listed>>,
}

/// One broker's bindings, and when they were listed.
type Listed = (Instant, Arc<Vec<BindingInfo>>);

impl ListCache {
    fn fresh(&self, endpoint: &str) -> Option<Arc<Vec<BindingInfo>>> {
        let lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        lists.get(endpoint).filter(|(at, _)| at.elapsed() < LIST_TTL).map(|(_, l)| l.clone())
    }

    /// Whether the broker at `endpoint` has the binding `r`, from a list at
    /// most [`LIST_TTL`] old.
    async fn contains(&self, endpoint: &str, client: &mut WarrenClient<Channel>, r: &BindRequest) -> Result<bool, tonic::Status> {
        let list = match self.fresh(endpoint) {
            Some(list) => list,
            None => {
                let list = Arc::new(client.list_bindings(ListBindingsRequest {}).await?.into_inner().bindings);
                self.lists.lock().unwrap_or_else(|p| p.into_inner()).insert(endpoint.to_string(), (Instant::now(), list.clone()));
                list
            }
        };
        Ok(list.iter().any(|i| same_binding(i, r)))
    }

    /// Records a binding just made, so that a fresh list still has it.
    fn note_bound(&self, endpoint: &str, r: &BindRequest) {
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, list)) = lists.get_mut(endpoint) {
            let info = BindingInfo {
                source: r.source.clone(),
                destination: r.destination.clone(),
                destination_kind: r.destination_kind,
                routing_key: r.routing_key.clone(),
                arguments: r.arguments.clone(),
            };
            Arc::make_mut(list).push(info);
        }
    }

    /// Forgets the list of `endpoint` (after an unbind).
    fn invalidate(&self, endpoint: &str) {
        self.lists.lock().unwrap_or_else(|p| p.into_inner()).remove(endpoint);
    }
}

async fn write(api: &Api<Binding>, b: &Binding, condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) -> Result<()> {
    let bound = b.status.as_ref().and_then(|s| s.bound.clone());
    write_bound(api, b, condition, bound).await
}

/// Writes the status with `bound`, the binding now made on the broker.
async fn write_bound(
    api: &Api<Binding>,
    b: &Binding,
    condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
    bound: Option<BoundBinding>,
) -> Result<()> {
    let previous = b.status.clone().unwrap_or_default();
    let status = BindingStatus {
        topology: TopologyStatus {
            observed_generation: b.metadata.generation,
            conditions: conditions::merge(&previous.topology.conditions, vec![condition]),
        },
        bound,
    };
    if b.status.as_ref() == Some(&status) {
        return Ok(());
    }
    patch_status(api, &b.name_any(), &status).await
}

async fn wait(api: &Api<Binding>, b: &Binding, reason: &str, message: String) -> Result<Action> {
    write(api, b, ready(false, reason, message, b.metadata.generation)).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// Whether an exchange (`is_queue` false) or queue exists on the broker.
async fn exists(client: &mut WarrenClient<Channel>, name: &str, is_queue: bool) -> Result<bool, tonic::Status> {
    let result = if is_queue {
        let req = DeclareQueueRequest { name: name.into(), passive: true, ..DeclareQueueRequest::default() };
        client.declare_queue(req).await.map(|_| ())
    } else {
        let req = DeclareExchangeRequest { name: name.into(), passive: true, ..DeclareExchangeRequest::default() };
        client.declare_exchange(req).await.map(|_| ())
    };
    match result {
        Ok(()) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(s),
    }
}

fn same_binding(info: &warren_client::proto::BindingInfo, r: &BindRequest) -> bool {
    let kind = |k: i32| if k == DestinationKind::Unspecified as i32 { DestinationKind::Queue as i32 } else { k };
    info.source == r.source
        && info.destination == r.destination
        && kind(info.destination_kind) == kind(r.destination_kind)
        && info.routing_key == r.routing_key
        && info.arguments == r.arguments
}

async fn apply(b: &Binding, ctx: &Context, api: &Api<Binding>) -> Result<Action> {
    let generation = b.metadata.generation;
    let request = match args::bind(b) {
        Ok(r) => r,
        Err(Error::InvalidSpec(message)) => {
            write(api, b, ready(false, "InvalidSpec", message, generation)).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let (mut client, endpoint) = match broker_target(ctx, &namespace_of(b)?, &b.spec.broker_ref).await? {
        BrokerTarget::Ready(client, endpoint) => (client, endpoint),
        BrokerTarget::Missing(m) => return wait(api, b, "BrokerNotFound", m).await,
        BrokerTarget::NotReady(m) | BrokerTarget::Deleting(m) => return wait(api, b, "BrokerNotReady", m).await,
        BrokerTarget::NotAllowed(m) => return wait(api, b, "NamespaceNotAllowed", m).await,
    };
    let all = super::all_in(ctx.stores.bindings.get()).await;
    if let (Some(owner), Some(key)) = (claim::owner_other_than(b, &all, claim_key), claim_key(b)) {
        let what = format!("binding {} -> {} (key {:?})", request.source, request.destination, request.routing_key);
        return wait(api, b, "Conflict", claim::conflict_message("Binding", &what, &key, &owner)).await;
    }

    let to_queue = args::destination_kind(b) == DestinationKind::Queue;
    let what = if to_queue { "queue" } else { "exchange" };
    match exists(&mut client, &request.source, false).await {
        Ok(true) => {}
        Ok(false) => {
            let m = format!("waiting for source exchange {} to exist on the broker", request.source);
            return wait(api, b, "WaitingForSource", m).await;
        }
        Err(s) => return wait(api, b, reason_for(&s), format!("checking exchange {}: {}", request.source, s.message())).await,
    }
    match exists(&mut client, &request.destination, to_queue).await {
        Ok(true) => {}
        Ok(false) => {
            let m = format!("waiting for destination {what} {} to exist on the broker", request.destination);
            return wait(api, b, "WaitingForDestination", m).await;
        }
        Err(s) => return wait(api, b, reason_for(&s), format!("checking {what} {}: {}", request.destination, s.message())).await,
    }
    let wanted = BoundBinding::from_spec(&b.spec);
    let describe = format!("{} -> {what} {} (key {:?})", request.source, request.destination, request.routing_key);
    // The spec changed since the operator bound (its arguments: the rest is
    // immutable): remove the old binding first, so it does not keep routing.
    // If removing succeeds and binding fails, the status still names the old
    // binding: the next pass removes it again (NOT_FOUND) and retries.
    let previous = b.status.as_ref().and_then(|s| s.bound.clone()).filter(|old| *old != wanted);
    let rebound = previous.is_some();
    if let Some(old) = previous {
        // An old form that does not convert was never bound.
        if let Ok(r) = args::unbind(&old) {
            match client.unbind(r).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return wait(api, b, reason_for(&s), format!("removing the previous binding: {}", s.message())).await,
            }
        }
        ctx.binding_lists.invalidate(&endpoint);
        let note = format!("binding changed; removed the previous one, binding {describe}");
        publish(ctx, b, EventType::Normal, "Rebound", "Bind", note).await;
    }
    let existed = match ctx.binding_lists.contains(&endpoint, &mut client, &request).await {
        Ok(existed) => existed,
        Err(s) => return wait(api, b, reason_for(&s), format!("listing bindings: {}", s.message())).await,
    };
    if let Err(s) = client.bind(request.clone()).await {
        let reason = reason_for(&s);
        if reason == "NotFound" {
            // Deleted between the check and the bind: wait for it again.
            return wait(api, b, "WaitingForDestination", format!("binding {describe}: {}", s.message())).await;
        }
        let message = format!("the broker refused binding {describe}: {}", s.message());
        write(api, b, ready(false, reason, message, generation)).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    ctx.binding_lists.note_bound(&endpoint, &request);
    let was_ready =
        b.status.as_ref().is_some_and(|s| conditions::is_true(&s.topology.conditions, READY) && s.bound.as_ref() == Some(&wanted));
    if !existed && was_ready {
        let note = format!("binding {describe} was missing on the broker; re-created it");
        publish(ctx, b, EventType::Warning, "Recreated", "Bind", note).await;
    } else if !existed && !rebound {
        publish(ctx, b, EventType::Normal, "Created", "Bind", format!("bound {describe}")).await;
    }
    write_bound(api, b, ready(true, "Bound", format!("bound {describe}"), generation), Some(wanted)).await?;
    Ok(Action::requeue(ctx.settings.resync))
}

async fn cleanup(b: &Binding, ctx: &Context, api: &Api<Binding>) -> Result<Action> {
    if b.spec.deletion_policy == DeletionPolicy::Retain {
        publish(ctx, b, EventType::Normal, "Retained", "Delete", "binding left on the broker (deletionPolicy: Retain)".into()).await;
        return Ok(Action::await_change());
    }
    if let Some(other) = claim::heir(b, &super::all_in(ctx.stores.bindings.get()).await, claim_key) {
        let note = format!("the binding is also declared by Binding {other}: left on the broker for it");
        publish(ctx, b, EventType::Normal, "HandedOver", "Delete", note).await;
        return Ok(Action::await_change());
    }
    let mut client = match broker_target(ctx, &namespace_of(b)?, &b.spec.broker_ref).await? {
        BrokerTarget::Ready(client, _) => client,
        BrokerTarget::Missing(m) | BrokerTarget::Deleting(m) | BrokerTarget::NotAllowed(m) => {
            publish(ctx, b, EventType::Normal, "BrokerGone", "Delete", format!("{m}; nothing to unbind")).await;
            return Ok(Action::await_change());
        }
        BrokerTarget::NotReady(m) => {
            let message = format!("cannot unbind yet: {m}; {WAY_OUT}");
            write(api, b, ready(false, "DeletionBlocked", message.clone(), b.metadata.generation)).await?;
            return Err(Error::BrokerNotReady(message));
        }
    };
    // What the operator bound (status), else what the spec asks for.
    let bound = b.status.as_ref().and_then(|s| s.bound.clone()).unwrap_or_else(|| BoundBinding::from_spec(&b.spec));
    let request = match args::unbind(&bound) {
        Ok(r) => r,
        // A spec the broker never accepted was never bound.
        Err(Error::InvalidSpec(_)) => return Ok(Action::await_change()),
        Err(e) => return Err(e),
    };
    match client.unbind(request).await {
        Ok(_) => {
            publish(ctx, b, EventType::Normal, "Deleted", "Unbind", "unbound".into()).await;
            Ok(Action::await_change())
        }
        Err(s) if s.code() == Code::NotFound => Ok(Action::await_change()),
        Err(s) => Err(Error::broker("Unbind", s)),
    }
}
