//! The Exchange controller.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tonic::Code;
use warren_client::proto::{DeclareExchangeRequest, DeleteExchangeRequest};
use warren_crds::v1alpha1::{DeletionPolicy, Exchange, ExchangeStatus, TopologyStatus};

use super::{
    BrokerTarget, FINALIZER, WAY_OUT, args, broker_target, claim, failure_condition, namespace_of, patch_status, publish, ready, reason_for,
};
use crate::conditions::{self, READY};
use crate::context::Context;
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "exchange";

/// Reconciles one Exchange.
pub async fn reconcile(x: Arc<Exchange>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let api: Api<Exchange> = Api::namespaced(ctx.client.clone(), &namespace_of(x.as_ref())?);
    let result = finalizer(&api, FINALIZER, x.clone(), |event| async {
        match event {
            Finalizer::Apply(x) => apply(&x, &ctx, &api).await,
            Finalizer::Cleanup(x) => cleanup(&x, &ctx, &api).await,
        }
    })
    .await
    .map_err(Error::from);
    if let Err(e) = &result
        && let Some((reason, message)) = failure_condition(e)
        && let Err(w) = write(&api, &x, ready(false, reason, message, x.metadata.generation)).await
    {
        tracing::debug!(error = %w, "writing the failure into the status failed too");
    }
    result
}

/// The broker-side identity of an Exchange, for [`claim`].
pub fn claim_key(x: &Exchange) -> Option<claim::Key> {
    Some(claim::Key::new(&x.namespace()?, &x.spec.broker_ref, x.broker_name()))
}

/// The Exchange that owns `x`'s broker-side name, when it is another one.
async fn owner(ctx: &Context, x: &Exchange) -> Option<String> {
    let all = super::all_in(ctx.stores.exchanges.get()).await;
    claim::owner_other_than(x, &all, claim_key)
}

async fn write(api: &Api<Exchange>, x: &Exchange, condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) -> Result<()> {
    let previous = x.status.clone().unwrap_or_default().topology;
    let status = ExchangeStatus {
        topology: TopologyStatus {
            observed_generation: x.metadata.generation,
            conditions: conditions::merge(&previous.conditions, vec![condition]),
        },
    };
    if x.status.as_ref() == Some(&status) {
        return Ok(());
    }
    patch_status(api, &x.name_any(), &status).await
}

async fn apply(x: &Exchange, ctx: &Context, api: &Api<Exchange>) -> Result<Action> {
    let generation = x.metadata.generation;
    let resync = Action::requeue(ctx.settings.resync);
    let request = match args::declare_exchange(x) {
        Ok(r) => r,
        Err(Error::InvalidSpec(message)) => {
            write(api, x, ready(false, "InvalidSpec", message, generation)).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let mut client = match broker_target(ctx, &namespace_of(x)?, &x.spec.broker_ref).await? {
        BrokerTarget::Ready(client, _) => client,
        BrokerTarget::Missing(m) => return wait(api, x, "BrokerNotFound", m).await,
        BrokerTarget::NotReady(m) | BrokerTarget::Deleting(m) => return wait(api, x, "BrokerNotReady", m).await,
        BrokerTarget::NotAllowed(m) => return wait(api, x, "NamespaceNotAllowed", m).await,
    };
    if let (Some(owner), Some(key)) = (owner(ctx, x).await, claim_key(x)) {
        let message = claim::conflict_message("Exchange", &format!("exchange {}", request.name), &key, &owner);
        return wait(api, x, "Conflict", message).await;
    }

    let passive = DeclareExchangeRequest { passive: true, ..request.clone() };
    let existed = match client.declare_exchange(passive).await {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => return wait(api, x, reason_for(&s), format!("checking the exchange: {}", s.message())).await,
    };
    let name = request.name.clone();
    match client.declare_exchange(request).await {
        Ok(_) => {
            let was_ready = x.status.as_ref().is_some_and(|s| conditions::is_true(&s.topology.conditions, READY));
            if !existed && was_ready {
                publish(
                    ctx,
                    x,
                    EventType::Warning,
                    "Recreated",
                    "Declare",
                    format!("exchange {name} was missing on the broker (deleted by hand?); re-created it"),
                )
                .await;
            } else if !existed {
                publish(ctx, x, EventType::Normal, "Created", "Declare", format!("declared exchange {name}")).await;
            }
            write(api, x, ready(true, "Declared", format!("exchange {name} exists on the broker as declared"), generation)).await?;
            Ok(resync)
        }
        Err(s) => {
            let reason = reason_for(&s);
            let message = format!("the broker refused exchange {name}: {}", s.message());
            if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument) {
                let already =
                    x.status.as_ref().and_then(|st| conditions::find(&st.topology.conditions, READY)).is_some_and(|c| c.reason == reason);
                if !already {
                    publish(ctx, x, EventType::Warning, reason, "Declare", message.clone()).await;
                }
            }
            write(api, x, ready(false, reason, message, generation)).await?;
            Ok(resync)
        }
    }
}

async fn wait(api: &Api<Exchange>, x: &Exchange, reason: &str, message: String) -> Result<Action> {
    write(api, x, ready(false, reason, message, x.metadata.generation)).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

async fn cleanup(x: &Exchange, ctx: &Context, api: &Api<Exchange>) -> Result<Action> {
    let name = x.broker_name();
    if x.spec.deletion_policy == DeletionPolicy::Retain {
        publish(ctx, x, EventType::Normal, "Retained", "Delete", format!("exchange {name} left on the broker (deletionPolicy: Retain)"))
            .await;
        return Ok(Action::await_change());
    }
    if let Some(other) = claim::heir(x, &super::all_in(ctx.stores.exchanges.get()).await, claim_key) {
        let note = format!("exchange {name} is also declared by Exchange {other}: left on the broker for it");
        publish(ctx, x, EventType::Normal, "HandedOver", "Delete", note).await;
        return Ok(Action::await_change());
    }
    let mut client = match broker_target(ctx, &namespace_of(x)?, &x.spec.broker_ref).await? {
        BrokerTarget::Ready(client, _) => client,
        BrokerTarget::Missing(m) | BrokerTarget::Deleting(m) | BrokerTarget::NotAllowed(m) => {
            publish(ctx, x, EventType::Normal, "BrokerGone", "Delete", format!("{m}; nothing to delete")).await;
            return Ok(Action::await_change());
        }
        BrokerTarget::NotReady(m) => {
            let message = format!("cannot delete exchange {name} yet: {m}; {WAY_OUT}");
            write(api, x, ready(false, "DeletionBlocked", message.clone(), x.metadata.generation)).await?;
            return Err(Error::BrokerNotReady(message));
        }
    };
    match client.delete_exchange(DeleteExchangeRequest { name: name.clone(), if_unused: false }).await {
        Ok(_) => {
            publish(ctx, x, EventType::Normal, "Deleted", "Delete", format!("deleted exchange {name}")).await;
            Ok(Action::await_change())
        }
        Err(s) if s.code() == Code::NotFound => Ok(Action::await_change()),
        Err(s) => Err(Error::broker("DeleteExchange", s)),
    }
}
