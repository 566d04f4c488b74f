//! The User controller: a broker user with a password from a Secret (one
//! generated when the User names none), put into its Broker through the
//! `Users` API. Deleting the User deletes it on the broker (its credentials
//! stop working, its streams end); the generated Secret goes with the User
//! (owner reference).
//!
//! The password is sent to the broker only when something changed (the
//! User's generation, the Secret's resourceVersion, or the user is missing
//! on the broker): the broker hashes it with argon2, which is slow by
//! design. Nothing here logs, records or reports a password.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use tonic::Code;
use warren_client::UsersClient;
use warren_client::proto::{DeleteUserRequest, ListUsersRequest, PutUserRequest};
use warren_crds::v1alpha1::{SAME_NAMESPACE, TopologyStatus, User, UserStatus};

use super::{BrokerTarget, FINALIZER, broker_target, claim, failure_condition, namespace_of, patch_status, publish, ready, reason_for};
use crate::broker::access::secret_value;
use crate::conditions;
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "user";

/// The broker-side identity of a User: its Broker and user name (one
/// owner per name, as for queues).
pub fn claim_key(u: &User) -> Option<claim::Key> {
    Some(claim::Key::new(&u.namespace()?, &u.spec.broker_ref, u.broker_name()))
}

/// Whether an access object is in its Broker's namespace: only there may
/// it change the broker's users (whoever may create one may create an
/// administrator). The CRD refuses others; this covers objects stored
/// before that rule.
pub fn beside_its_broker(own_namespace: &str, r: &warren_crds::v1alpha1::BrokerRef) -> bool {
    r.namespace_or(own_namespace) == own_namespace
}

/// Reconciles one User.
pub async fn reconcile(u: Arc<User>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let api: Api<User> = Api::namespaced(ctx.client.clone(), &namespace_of(u.as_ref())?);
    let result = finalizer(&api, FINALIZER, u.clone(), |event| async {
        match event {
            Finalizer::Apply(u) => apply(&u, &ctx, &api).await,
            Finalizer::Cleanup(u) => cleanup(&u, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    if let Err(e) = &result
        && let Some((reason, message)) = failure_condition(e)
        && let Err(w) = write(&api, &u, ready(false, reason, message, u.metadata.generation)).await
    {
        tracing::debug!(error = %w, "writing the failure into the status failed too");
    }
    result
}

async fn write(api: &Api<User>, u: &User, condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) -> Result<()> {
    let previous = u.status.clone().unwrap_or_default().topology;
    let status = UserStatus {
        topology: TopologyStatus {
            observed_generation: u.metadata.generation,
            conditions: conditions::merge(&previous.conditions, vec![condition]),
        },
        username: Some(u.broker_name()),
        credentials_secret: Some(u.secret_name()),
    };
    if u.status.as_ref() == Some(&status) {
        return Ok(());
    }
    patch_status(api, &u.name_any(), &status).await
}

async fn wait(api: &Api<User>, u: &User, reason: &str, message: String) -> Result<Action> {
    write(api, u, ready(false, reason, message, u.metadata.generation)).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// The password and the Secret's resourceVersion; generates the Secret
/// when the User names none and it does not exist yet.
async fn credentials(ctx: &Context, u: &User) -> Result<std::result::Result<(String, String), String>> {
    let namespace = namespace_of(u)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = u.secret_name();
    let secret = match secrets.get_opt(&name).await? {
        Some(s) => s,
        None if u.spec.credentials_secret.is_some() => {
            return Ok(Err(format!("the credentials Secret {namespace}/{name} does not exist")));
        }
        None => {
            let owner = u.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("uid"))?;
            let generated = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(
                        [
                            ("app.kubernetes.io/managed-by".to_string(), "warren-operator".to_string()),
                            ("app.kubernetes.io/part-of".to_string(), "warren".to_string()),
                        ]
                        .into(),
                    ),
                    owner_references: Some(vec![owner]),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                string_data: Some(
                    [("username".to_string(), u.broker_name()), ("password".to_string(), crate::broker::build::generate_password())].into(),
                ),
                ..Secret::default()
            };
            let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
            match secrets.create(&params, &generated).await {
                Ok(s) => {
                    publish(
                        ctx,
                        u,
                        EventType::Normal,
                        "CredentialsGenerated",
                        "Generate",
                        format!("generated the credentials into Secret {name}"),
                    )
                    .await;
                    s
                }
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let Some(password) = secret_value(&secret, "password").filter(|p| !p.is_empty()) else {
        return Ok(Err(format!("the credentials Secret {namespace}/{name} has no key 'password'")));
    };
    if let Some(user) = secret_value(&secret, "username")
        && user != u.broker_name()
    {
        return Ok(Err(format!("the credentials Secret {namespace}/{name} names user '{user}', but this User is '{}'", u.broker_name())));
    }
    Ok(Ok((password, secret.metadata.resource_version.clone().unwrap_or_default())))
}

async fn exists(users: &mut UsersClient, name: &str) -> std::result::Result<bool, tonic::Status> {
    let list = users.list_users(ListUsersRequest {}).await?.into_inner().users;
    Ok(list.iter().any(|u| u.name == name))
}

async fn apply(u: &User, ctx: &Context, api: &Api<User>) -> Result<Action> {
    let generation = u.metadata.generation;
    let name = u.broker_name();
    if !beside_its_broker(&namespace_of(u)?, &u.spec.broker_ref) {
        return wait(api, u, "NamespaceNotAllowed", SAME_NAMESPACE.to_string()).await;
    }
    let mut users = match broker_target(ctx, &namespace_of(u)?, &u.spec.broker_ref).await? {
        BrokerTarget::Ready(_, _, users) => users,
        BrokerTarget::Missing(m) => return wait(api, u, "BrokerNotFound", m).await,
        BrokerTarget::NotReady(m) | BrokerTarget::Deleting(m) => return wait(api, u, "BrokerNotReady", m).await,
        BrokerTarget::NotAllowed(m) => return wait(api, u, "NamespaceNotAllowed", m).await,
    };
    let all = super::all_in(ctx.stores.users.get()).await;
    if let (Some(owner), Some(key)) = (claim::owner_other_than(u, &all, claim_key), claim_key(u)) {
        let message = claim::conflict_message("User", &format!("user {name}"), &key, &owner);
        return wait(api, u, "Conflict", message).await;
    }
    let (password, version) = match credentials(ctx, u).await? {
        Ok(c) => c,
        Err(message) => return wait(api, u, "CredentialsMissing", message).await,
    };
    let uid = u.uid().unwrap_or_default();
    let present = match exists(&mut users, &name).await {
        Ok(p) => p,
        Err(s) => return wait(api, u, reason_for(&s), format!("listing the broker's users: {}", s.message())).await,
    };
    let last = ctx.users_applied.lock().unwrap_or_else(|p| p.into_inner()).get(&uid).cloned();
    if present && last == Some((generation, version.clone())) {
        write(api, u, ready(true, "Applied", format!("user {name} exists on the broker"), generation)).await?;
        return Ok(Action::requeue(ctx.settings.resync));
    }
    let request = PutUserRequest {
        name: name.clone(),
        password,
        tags: u.spec.tags.iter().map(|t| t.as_str().to_string()).collect(),
        max_connections: u.spec.max_connections.map(|n| n.max(0) as u32),
        max_streams: u.spec.max_streams.map(|n| n.max(0) as u32),
        ..PutUserRequest::default()
    };
    match users.put_user(request).await {
        Ok(_) => {
            ctx.users_applied.lock().unwrap_or_else(|p| p.into_inner()).insert(uid, (generation, version));
            let note = if present { format!("updated user {name}") } else { format!("created user {name}") };
            publish(ctx, u, EventType::Normal, if present { "Updated" } else { "Created" }, "Put", note).await;
            write(api, u, ready(true, "Applied", format!("user {name} exists on the broker"), generation)).await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(s) => {
            let message = format!("the broker refused user {name}: {}", s.message());
            let reason = if s.code() == Code::FailedPrecondition { "DefinedInBrokerConfig" } else { reason_for(&s) };
            if s.code() == Code::InvalidArgument || s.code() == Code::FailedPrecondition {
                publish(ctx, u, EventType::Warning, reason, "Put", message.clone()).await;
            }
            write(api, u, ready(false, reason, message, generation)).await?;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
    }
}

async fn cleanup(u: &User, ctx: &Context) -> Result<Action> {
    let name = u.broker_name();
    ctx.users_applied.lock().unwrap_or_else(|p| p.into_inner()).remove(&u.uid().unwrap_or_default());
    let all = super::all_in(ctx.stores.users.get()).await;
    if claim::owner_other_than(u, &all, claim_key).is_some() || !beside_its_broker(&namespace_of(u)?, &u.spec.broker_ref) {
        // Never put by this object: not its to delete.
        return Ok(Action::await_change());
    }
    if let Some(other) = claim::heir(u, &all, claim_key) {
        let note = format!("user {name} is also declared by User {other}: left on the broker for it");
        publish(ctx, u, EventType::Normal, "HandedOver", "Delete", note).await;
        return Ok(Action::await_change());
    }
    let mut users = match broker_target(ctx, &namespace_of(u)?, &u.spec.broker_ref).await? {
        BrokerTarget::Ready(_, _, users) => users,
        BrokerTarget::Missing(m) | BrokerTarget::Deleting(m) | BrokerTarget::NotAllowed(m) => {
            publish(ctx, u, EventType::Normal, "BrokerGone", "Delete", format!("{m}; nothing to delete")).await;
            return Ok(Action::await_change());
        }
        BrokerTarget::NotReady(m) => return Err(Error::BrokerNotReady(format!("cannot delete user {name} yet: {m}"))),
    };
    match users.delete_user(DeleteUserRequest { name: name.clone() }).await {
        Ok(_) => {
            publish(ctx, u, EventType::Normal, "Deleted", "Delete", format!("deleted user {name}: its credentials no longer work")).await;
            Ok(Action::await_change())
        }
        Err(s) if s.code() == Code::NotFound => Ok(Action::await_change()),
        // Defined in the broker's own configuration: never put by this
        // object, so nothing of it to delete.
        Err(s) if s.code() == Code::FailedPrecondition => {
            publish(
                ctx,
                u,
                EventType::Normal,
                "NotDeleted",
                "Delete",
                format!("user {name} is defined in the broker's configuration; left as it is"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(s) => Err(Error::broker("DeleteUser", s)),
    }
}
