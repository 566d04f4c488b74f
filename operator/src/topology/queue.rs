//! The Queue controller: declares the queue, mirrors its counts into the
//! status, and runs the autoscaler every `pollingSeconds`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tonic::Code;
use warren_client::proto::{DeclareQueueRequest, DeleteQueueRequest, QueueInfo};
use warren_crds::v1alpha1::{AutoscalingStatus, DeletionPolicy, Queue, QueueStatus, TopologyStatus};

use super::{
    BrokerTarget, FINALIZER, args, broker_target, claim, failure_condition, namespace_of, patch_status, publish, ready, reason_for,
};
use crate::autoscaler;
use crate::conditions::{self, AUTOSCALING_ACTIVE, READY};
use crate::context::Context;
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "queue";

/// Reconciles one Queue.
pub async fn reconcile(q: Arc<Queue>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let api: Api<Queue> = Api::namespaced(ctx.client.clone(), &namespace_of(q.as_ref())?);
    let result = finalizer(&api, FINALIZER, q.clone(), |event| async {
        match event {
            Finalizer::Apply(q) => apply(&q, &ctx, &api).await,
            Finalizer::Cleanup(q) => cleanup(&q, &ctx, &api).await,
        }
    })
    .await
    .map_err(Error::from);
    if let Err(e) = &result
        && let Some((reason, message)) = failure_condition(e)
        && let Err(w) = write(&api, &q, only(ready(false, reason, message, q.metadata.generation))).await
    {
        tracing::debug!(error = %w, "writing the failure into the status failed too");
    }
    result
}

/// The broker-side identity of a Queue, for [`claim`].
pub fn claim_key(q: &Queue) -> Option<claim::Key> {
    Some(claim::Key::new(&q.namespace()?, &q.spec.broker_ref, q.broker_name()))
}

/// What to write into the status.
struct Update {
    conditions: Vec<Condition>,
    info: Option<QueueInfo>,
    autoscaling: Option<AutoscalingStatus>,
}

async fn write(api: &Api<Queue>, q: &Queue, update: Update) -> Result<()> {
    let previous = q.status.clone().unwrap_or_default();
    let mut conditions = conditions::merge(&previous.topology.conditions, update.conditions);
    if q.spec.autoscaling.is_none() {
        conditions.retain(|c| c.type_ != AUTOSCALING_ACTIVE);
    }
    let info = update.info;
    let status = QueueStatus {
        topology: TopologyStatus { observed_generation: q.metadata.generation, conditions },
        ready: info.as_ref().map(|i| i.ready).or(previous.ready),
        unacked: info.as_ref().map(|i| i.unacked).or(previous.unacked),
        delayed: info.as_ref().map(|i| i.delayed).or(previous.delayed),
        consumers: info.as_ref().map(|i| i.consumers).or(previous.consumers),
        autoscaling: if q.spec.autoscaling.is_some() { update.autoscaling.or(previous.autoscaling) } else { None },
    };
    // Autoscaled queues are looked at every few seconds: write only what
    // changed, not a status per poll.
    if q.status.as_ref() == Some(&status) {
        return Ok(());
    }
    patch_status(api, &q.name_any(), &status).await
}

fn only(condition: Condition) -> Update {
    Update { conditions: vec![condition], info: None, autoscaling: None }
}

/// How soon to look again: the autoscaler's polling interval, or the resync.
fn next_poll(q: &Queue, ctx: &Context) -> Action {
    match &q.spec.autoscaling {
        Some(a) => Action::requeue(Duration::from_secs(u64::try_from(a.polling_seconds).unwrap_or(5).max(1))),
        None => Action::requeue(ctx.settings.resync),
    }
}

async fn apply(q: &Queue, ctx: &Context, api: &Api<Queue>) -> Result<Action> {
    let generation = q.metadata.generation;
    let request = match args::declare_queue(q) {
        Ok(r) => r,
        Err(Error::InvalidSpec(message)) => {
            write(api, q, only(ready(false, "InvalidSpec", message, generation))).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let retry = Action::requeue(Duration::from_secs(10));
    let mut client = match broker_target(ctx, &namespace_of(q)?, &q.spec.broker_ref).await? {
        BrokerTarget::Ready(client, _) => client,
        BrokerTarget::Missing(m) => return waiting(api, q, "BrokerNotFound", m).await,
        BrokerTarget::NotReady(m) | BrokerTarget::Deleting(m) => return waiting(api, q, "BrokerNotReady", m).await,
        BrokerTarget::NotAllowed(m) => return waiting(api, q, "NamespaceNotAllowed", m).await,
    };
    let all = super::all_in(ctx.stores.queues.get()).await;
    if let (Some(owner), Some(key)) = (claim::owner_other_than(q, &all, claim_key), claim_key(q)) {
        let message = claim::conflict_message("Queue", &format!("queue {}", request.name), &key, &owner);
        return waiting(api, q, "Conflict", message).await;
    }

    let name = request.name.clone();
    let passive = DeclareQueueRequest { passive: true, ..request.clone() };
    let existed = match client.declare_queue(passive).await {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => {
            let message = format!("checking queue {name}: {}", s.message());
            return waiting(api, q, reason_for(&s), message).await;
        }
    };
    let info = match client.declare_queue(request).await {
        Ok(response) => {
            let was_ready = q.status.as_ref().is_some_and(|s| conditions::is_true(&s.topology.conditions, READY));
            if !existed && was_ready {
                let note = format!("queue {name} was missing on the broker (deleted by hand, or auto-deleted); re-created it");
                publish(ctx, q, EventType::Warning, "Recreated", "Declare", note).await;
            } else if !existed {
                publish(ctx, q, EventType::Normal, "Created", "Declare", format!("declared queue {name}")).await;
            }
            response.into_inner().queue.unwrap_or_default()
        }
        Err(s) => {
            let reason = reason_for(&s);
            let message = format!("the broker refused queue {name}: {}", s.message());
            let already =
                q.status.as_ref().and_then(|st| conditions::find(&st.topology.conditions, READY)).is_some_and(|c| c.reason == reason);
            if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument) && !already {
                publish(ctx, q, EventType::Warning, reason, "Declare", message.clone()).await;
            }
            // The queue may still exist with other properties: keep
            // mirroring its counts from a passive declare, and keep scaling
            // its consumers from them (they can still consume from it).
            let passive = DeclareQueueRequest { name: name.clone(), passive: true, ..DeclareQueueRequest::default() };
            let info = client.declare_queue(passive).await.ok().and_then(|r| r.into_inner().queue);
            let mut update = Update { conditions: vec![ready(false, reason, message.clone(), generation)], info, autoscaling: None };
            if let Some(a) = &q.spec.autoscaling {
                match &update.info {
                    Some(info) => {
                        let outcome = autoscaler::run(ctx, q, a, info).await;
                        update.conditions.push(outcome.condition);
                        update.autoscaling = Some(outcome.status);
                    }
                    None => {
                        // Never `AutoscalingActive=True` while nothing is read.
                        let m = format!("the backlog cannot be read: {message}");
                        update.conditions.push(conditions::new(AUTOSCALING_ACTIVE, false, "QueueUnavailable", m, generation));
                    }
                }
            }
            write(api, q, update).await?;
            return Ok(if q.spec.autoscaling.is_some() { next_poll(q, ctx) } else { retry });
        }
    };

    let mut update = Update {
        conditions: vec![ready(true, "Declared", format!("queue {name} exists on the broker as declared"), generation)],
        info: Some(info.clone()),
        autoscaling: None,
    };
    if let Some(a) = &q.spec.autoscaling {
        let outcome = autoscaler::run(ctx, q, a, &info).await;
        update.conditions.push(outcome.condition);
        update.autoscaling = Some(outcome.status);
    }
    write(api, q, update).await?;
    Ok(next_poll(q, ctx))
}

/// `Ready=False` with `reason`, and with an autoscaled Queue
/// `AutoscalingActive=False` too (nothing is read, so nothing is scaled);
/// looks again in 10 s.
async fn waiting(api: &Api<Queue>, q: &Queue, reason: &str, message: String) -> Result<Action> {
    let generation = q.metadata.generation;
    let mut conditions = vec![ready(false, reason, message.clone(), generation)];
    if q.spec.autoscaling.is_some() {
        let m = format!("the backlog cannot be read: {message}");
        conditions.push(conditions::new(AUTOSCALING_ACTIVE, false, reason, m, generation));
    }
    write(api, q, Update { conditions, info: None, autoscaling: None }).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

async fn cleanup(q: &Queue, ctx: &Context, api: &Api<Queue>) -> Result<Action> {
    let name = q.broker_name();
    if let Some(uid) = q.uid() {
        ctx.histories.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
    }
    ctx.metrics.forget_queue(&namespace_of(q)?, &q.name_any());
    if q.spec.deletion_policy == DeletionPolicy::Retain {
        let note = format!("queue {name} and its messages left on the broker (deletionPolicy: Retain)");
        publish(ctx, q, EventType::Normal, "Retained", "Delete", note).await;
        return Ok(Action::await_change());
    }
    if let Some(other) = claim::heir(q, &super::all_in(ctx.stores.queues.get()).await, claim_key) {
        let note = format!("queue {name} is also declared by Queue {other}: left on the broker, with its messages, for it");
        publish(ctx, q, EventType::Normal, "HandedOver", "Delete", note).await;
        return Ok(Action::await_change());
    }
    let generation = q.metadata.generation;
    let way_out = super::WAY_OUT;
    let mut client = match broker_target(ctx, &namespace_of(q)?, &q.spec.broker_ref).await? {
        BrokerTarget::Ready(client, _) => client,
        BrokerTarget::NotAllowed(m) => {
            let note = format!("{m}; queue {name} was never declared by this object, so it is not deleted");
            publish(ctx, q, EventType::Normal, "NotDeleted", "Delete", note).await;
            return Ok(Action::await_change());
        }
        BrokerTarget::Missing(m) | BrokerTarget::Deleting(m) => {
            let note = format!("{m}; queue {name} is not deleted (its data stays on the Broker's retained volume)");
            publish(ctx, q, EventType::Normal, "BrokerGone", "Delete", note).await;
            return Ok(Action::await_change());
        }
        BrokerTarget::NotReady(m) => {
            let message = format!("cannot delete queue {name} yet: {m}; {way_out}");
            write(api, q, only(ready(false, "DeletionBlocked", message.clone(), generation))).await?;
            return Err(Error::BrokerNotReady(message));
        }
    };
    let passive = DeclareQueueRequest { name: name.clone(), passive: true, ..DeclareQueueRequest::default() };
    if !q.spec.delete_with_messages {
        // The broker's if_empty counts ready and unacknowledged messages but
        // not delayed ones: look first, so that a delayed backlog is not lost.
        match client.declare_queue(passive.clone()).await {
            Ok(r) => {
                let info = r.into_inner().queue.unwrap_or_default();
                if info.ready + info.unacked + info.delayed > 0 {
                    return not_empty(q, ctx, api, name, Some(info)).await;
                }
            }
            Err(s) if s.code() == Code::NotFound => return Ok(Action::await_change()),
            Err(s) => return blocked(q, api, Error::broker("DeclareQueue", s), way_out).await,
        }
    }
    let request = DeleteQueueRequest { name: name.clone(), if_unused: false, if_empty: !q.spec.delete_with_messages };
    match client.delete_queue(request).await {
        Ok(response) => {
            let lost = response.into_inner().message_count;
            let note = if lost > 0 {
                format!("deleted queue {name} with {lost} messages (deleteWithMessages: true)")
            } else {
                format!("deleted queue {name}")
            };
            publish(ctx, q, EventType::Normal, "Deleted", "Delete", note).await;
            Ok(Action::await_change())
        }
        Err(s) if s.code() == Code::NotFound => Ok(Action::await_change()),
        Err(s) if s.code() == Code::FailedPrecondition => {
            let info = client.declare_queue(passive).await.ok().and_then(|r| r.into_inner().queue);
            not_empty(q, ctx, api, name, info).await
        }
        Err(s) => blocked(q, api, Error::broker("DeleteQueue", s), way_out).await,
    }
}

/// Deletion waits for the queue to drain: condition, Event, error (retried).
async fn not_empty(q: &Queue, ctx: &Context, api: &Api<Queue>, name: String, info: Option<QueueInfo>) -> Result<Action> {
    let messages = info.as_ref().map(|i| i.ready + i.unacked + i.delayed).unwrap_or(0);
    let message = format!(
        "queue {name} still holds {messages} messages (ready, unacknowledged or delayed), so it is not deleted; it will be once it is empty. \
         To delete it now set spec.deleteWithMessages: true; to keep it set spec.deletionPolicy: Retain"
    );
    let already =
        q.status.as_ref().and_then(|s| conditions::find(&s.topology.conditions, READY)).is_some_and(|c| c.reason == "QueueNotEmpty");
    let update =
        Update { conditions: vec![ready(false, "QueueNotEmpty", message.clone(), q.metadata.generation)], info, autoscaling: None };
    write(api, q, update).await?;
    if !already {
        publish(ctx, q, EventType::Warning, "QueueNotEmpty", "Delete", message).await;
    }
    Err(Error::QueueNotEmpty { queue: name, messages })
}

/// Deletion cannot reach the broker: the condition says so and how to let
/// the object go; the error is retried.
async fn blocked(q: &Queue, api: &Api<Queue>, error: Error, way_out: &str) -> Result<Action> {
    let message = format!("deleting queue {} failed: {error}; {way_out}", q.broker_name());
    write(api, q, only(ready(false, "DeletionBlocked", message, q.metadata.generation))).await?;
    Err(error)
}
