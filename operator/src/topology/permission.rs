//! The Permission controller: a user's (or a ServiceAccount's)
//! configure / write / read patterns, set on its Broker through the `Users`
//! API; deleting the Permission clears them.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tonic::Code;
use warren_client::proto::{self, ClearPermissionsRequest, ListUsersRequest, SetPermissionsRequest};
use warren_crds::v1alpha1::{Permission, PermissionStatus, TopologyStatus};

use super::{BrokerTarget, FINALIZER, broker_target, claim, failure_condition, namespace_of, patch_status, publish, ready, reason_for};
use crate::conditions;
use crate::context::Context;
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "permission";

/// The broker-side identity of a Permission: its Broker and principal
/// (one Permission per principal and Broker).
pub fn claim_key(p: &Permission) -> Option<claim::Key> {
    let namespace = p.namespace()?;
    Some(claim::Key::new(&namespace, &p.spec.broker_ref, p.principal(&namespace)?))
}

/// Reconciles one Permission.
pub async fn reconcile(p: Arc<Permission>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let api: Api<Permission> = Api::namespaced(ctx.client.clone(), &namespace_of(p.as_ref())?);
    let result = finalizer(&api, FINALIZER, p.clone(), |event| async {
        match event {
            Finalizer::Apply(p) => apply(&p, &ctx, &api).await,
            Finalizer::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    if let Err(e) = &result
        && let Some((reason, message)) = failure_condition(e)
        && let Err(w) = write(&api, &p, None, ready(false, reason, message, p.metadata.generation)).await
    {
        tracing::debug!(error = %w, "writing the failure into the status failed too");
    }
    result
}

async fn write(
    api: &Api<Permission>,
    p: &Permission,
    principal: Option<String>,
    condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) -> Result<()> {
    let previous = p.status.clone().unwrap_or_default();
    let status = PermissionStatus {
        topology: TopologyStatus {
            observed_generation: p.metadata.generation,
            conditions: conditions::merge(&previous.topology.conditions, vec![condition]),
        },
        principal: principal.or(previous.principal),
    };
    if p.status.as_ref() == Some(&status) {
        return Ok(());
    }
    patch_status(api, &p.name_any(), &status).await
}

/// The permissions a Permission asks for, in the API's form.
pub fn wanted(p: &Permission) -> proto::Permissions {
    proto::Permissions {
        configure: p.spec.configure.clone(),
        write: p.spec.write.clone(),
        read: p.spec.read.clone(),
        topics: p
            .spec
            .topics
            .iter()
            .map(|t| (t.exchange.clone(), proto::TopicPermission { write: t.write.clone(), read: t.read.clone() }))
            .collect(),
    }
}

async fn apply(p: &Permission, ctx: &Context, api: &Api<Permission>) -> Result<Action> {
    let generation = p.metadata.generation;
    let namespace = namespace_of(p)?;
    let Some(principal) = p.principal(&namespace) else {
        write(api, p, None, ready(false, "InvalidSpec", "set exactly one of user and serviceAccount", generation)).await?;
        return Ok(Action::await_change());
    };
    let wait = |reason: &'static str, message: String| {
        let principal = principal.clone();
        async move {
            write(api, p, Some(principal), ready(false, reason, message, generation)).await?;
            Ok(Action::requeue(Duration::from_secs(10)))
        }
    };
    if !super::user::beside_its_broker(&namespace, &p.spec.broker_ref) {
        return wait("NamespaceNotAllowed", warren_crds::v1alpha1::SAME_NAMESPACE.to_string()).await;
    }
    let mut users = match broker_target(ctx, &namespace, &p.spec.broker_ref).await? {
        BrokerTarget::Ready(_, _, users) => users,
        BrokerTarget::Missing(m) => return wait("BrokerNotFound", m).await,
        BrokerTarget::NotReady(m) | BrokerTarget::Deleting(m) => return wait("BrokerNotReady", m).await,
        BrokerTarget::NotAllowed(m) => return wait("NamespaceNotAllowed", m).await,
    };
    let all = super::all_in(ctx.stores.permissions.get()).await;
    if let (Some(owner), Some(key)) = (claim::owner_other_than(p, &all, claim_key), claim_key(p)) {
        let message = claim::conflict_message("Permission", &format!("the permissions of {principal}"), &key, &owner);
        return wait("Conflict", message).await;
    }
    let want = wanted(p);
    let current = match users.list_users(ListUsersRequest {}).await {
        Ok(r) => r.into_inner().users.into_iter().find(|u| u.name == principal).and_then(|u| u.permissions),
        Err(s) => return wait(reason_for(&s), format!("listing the broker's users: {}", s.message())).await,
    };
    if current.as_ref() != Some(&want) {
        if let Err(s) = users.set_permissions(SetPermissionsRequest { user: principal.clone(), permissions: Some(want) }).await {
            let message = format!("the broker refused the permissions of {principal}: {}", s.message());
            let reason = if s.code() == Code::FailedPrecondition { "DefinedInBrokerConfig" } else { reason_for(&s) };
            if s.code() == Code::InvalidArgument || s.code() == Code::FailedPrecondition {
                publish(ctx, p, EventType::Warning, reason, "Set", message.clone()).await;
            }
            write(api, p, Some(principal), ready(false, reason, message, generation)).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        publish(ctx, p, EventType::Normal, "Applied", "Set", format!("set the permissions of {principal}")).await;
    }
    write(api, p, Some(principal.clone()), ready(true, "Applied", format!("{principal} has these permissions on the broker"), generation))
        .await?;
    Ok(Action::requeue(ctx.settings.resync))
}

async fn cleanup(p: &Permission, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(p)?;
    let Some(principal) = p.principal(&namespace) else { return Ok(Action::await_change()) };
    let all = super::all_in(ctx.stores.permissions.get()).await;
    if claim::owner_other_than(p, &all, claim_key).is_some() || !super::user::beside_its_broker(&namespace, &p.spec.broker_ref) {
        return Ok(Action::await_change());
    }
    if let Some(other) = claim::heir(p, &all, claim_key) {
        let note = format!("the permissions of {principal} are also set by Permission {other}: left on the broker for it");
        publish(ctx, p, EventType::Normal, "HandedOver", "Delete", note).await;
        return Ok(Action::await_change());
    }
    let mut users = match broker_target(ctx, &namespace, &p.spec.broker_ref).await? {
        BrokerTarget::Ready(_, _, users) => users,
        BrokerTarget::Missing(m) | BrokerTarget::Deleting(m) | BrokerTarget::NotAllowed(m) => {
            publish(ctx, p, EventType::Normal, "BrokerGone", "Delete", format!("{m}; nothing to clear")).await;
            return Ok(Action::await_change());
        }
        BrokerTarget::NotReady(m) => return Err(Error::BrokerNotReady(format!("cannot clear the permissions of {principal} yet: {m}"))),
    };
    match users.clear_permissions(ClearPermissionsRequest { user: principal.clone() }).await {
        Ok(_) => {
            publish(ctx, p, EventType::Normal, "Cleared", "Delete", format!("cleared the permissions of {principal}")).await;
            Ok(Action::await_change())
        }
        Err(s) if s.code() == Code::FailedPrecondition => {
            let note = format!("{principal} is defined in the broker's configuration; its permissions are left as they are");
            publish(ctx, p, EventType::Normal, "NotCleared", "Delete", note).await;
            Ok(Action::await_change())
        }
        Err(s) => Err(Error::broker("ClearPermissions", s)),
    }
}
