//! A Broker's security objects, and how the operator itself reaches the
//! broker.
//!
//! * The administrator credential: a Secret `<name>-admin` generated once
//!   (created only when missing, never re-applied, so the password never
//!   changes under the broker), mounted into the pod as a file, and used by
//!   the operator for every call to that broker.
//! * TLS: the Secret named in `spec.tls.secretName`, or a cert-manager
//!   Certificate the operator creates for `spec.tls.issuerRef`. The operator
//!   trusts the Secret's `ca.crt` (system roots when there is none).
//! * A NetworkPolicy admitting only client and peer traffic.
//! * For `TokenReview`, a ClusterRoleBinding of the Broker's ServiceAccount
//!   to the chart's ClusterRole (`tokenreviews: create`); cluster-scoped, so
//!   no owner reference collects it: bindings of Brokers that are gone are
//!   removed by a sweep every resync period ([`sweep_forever`]) and by
//!   every Broker reconcile.
//!
//! No Secret content is ever logged, written into an Event or a status.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use warren_crds::v1alpha1::Broker;

use super::build::{self, ValidatedBroker};
use crate::context::{BrokerAccess, Context, FIELD_MANAGER};
use crate::error::{Error, Result};

/// How long what the operator read from a Broker's Secrets is reused.
const ACCESS_TTL: Duration = Duration::from_secs(30);

/// Creates the Secrets the operator generates when they do not exist: the
/// administrator credential (with authentication on) and the secret a
/// cluster's nodes share. A Secret of that name not controlled by this
/// Broker is a conflict (never adopted); its message is returned.
pub async fn ensure_generated_secrets(ctx: &Context, v: &ValidatedBroker) -> Result<Option<String>> {
    if v.spec.auth.enabled {
        let secret = build::admin_secret(v, &build::generate_password());
        if let Some(conflict) = ensure_secret(ctx, v, secret, "the administrator credential").await? {
            return Ok(Some(conflict));
        }
    }
    if v.is_cluster() {
        let secret = build::cluster_secret(v, &build::generate_password());
        return ensure_secret(ctx, v, secret, "the cluster's node-to-node secret").await;
    }
    Ok(None)
}

async fn ensure_secret(ctx: &Context, v: &ValidatedBroker, secret: Secret, what: &str) -> Result<Option<String>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &v.namespace);
    let name = secret.metadata.name.clone().unwrap_or_default();
    if let Some(existing) = api.get_metadata_opt(&name).await? {
        let ours = existing.metadata.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == v.owner.uid);
        return Ok((!ours).then(|| {
            format!(
                "Secret {}/{name} already exists and was not created by this Broker; the Broker does not take it over. \
                 Rename the Broker or remove that Secret",
                v.namespace
            )
        }));
    }
    match api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }, &secret).await {
        Ok(_) => {
            tracing::info!(broker = %v.name, namespace = %v.namespace, secret = %name, "generated {what}");
            Ok(None)
        }
        // Another reconcile created it first.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Why the Broker's TLS Secret cannot serve it, as a (reason, message)
/// for its conditions: the Secret named in `spec.tls.secretName` missing,
/// or without `tls.crt` / `tls.key`, or without `ca.crt` when client
/// certificates are asked for. A pod mounting it could not start, so
/// nothing is applied until it is fixed. The Secret a cert-manager
/// Certificate writes is not checked: it appears after the Certificate.
pub async fn check_tls_secret(ctx: &Context, v: &ValidatedBroker) -> Result<Option<(&'static str, String)>> {
    let Some(tls) = v.spec.tls.as_ref() else { return Ok(None) };
    let Some(name) = tls.secret_name.as_deref() else { return Ok(None) };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &v.namespace);
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(Some(("TLSSecretMissing", format!("the TLS Secret {}/{name} (spec.tls.secretName) does not exist", v.namespace))));
    };
    let has = |key: &str| secret.data.as_ref().is_some_and(|d| d.get(key).is_some_and(|b| !b.0.is_empty()));
    let mut missing: Vec<&str> = ["tls.crt", "tls.key"].into_iter().filter(|k| !has(k)).collect();
    if tls.client_auth != warren_crds::v1alpha1::ClientAuth::None && !has("ca.crt") {
        missing.push("ca.crt (spec.tls.clientAuth verifies client certificates against it)");
    }
    if missing.is_empty() {
        return Ok(None);
    }
    Ok(Some(("TLSSecretInvalid", format!("the TLS Secret {}/{name} has no {}", v.namespace, missing.join(", no ")))))
}

/// Applies the NetworkPolicy, the cert-manager Certificate and the
/// TokenReview binding as the Broker and the operator's settings ask, and
/// removes what they no longer ask for.
pub async fn apply_security(ctx: &Context, v: &ValidatedBroker) -> Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &v.namespace);
    if ctx.settings.network_policy {
        policies.patch(&v.name, &params, &Patch::Apply(&build::network_policy(v))).await?;
    } else {
        delete_if_ours(&policies, &v.name, v).await?;
    }
    if let Some(cert) = build::certificate(v) {
        let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate");
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &v.namespace, &ApiResource::from_gvk(&gvk));
        let name = format!("{}-tls", v.name);
        api.patch(&name, &params, &Patch::Apply(&cert)).await.map_err(|e| match e {
            kube::Error::Api(ref a) if a.code == 404 => Error::CertManagerMissing,
            other => other.into(),
        })?;
    }
    if let Some(role) = &ctx.settings.token_review_cluster_role {
        let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
        let name = build::token_review_binding_name(&v.namespace, &v.name);
        if v.needs_api_token() && v.spec.auth.service_account_tokens == warren_crds::v1alpha1::ServiceAccountTokens::TokenReview {
            api.patch(&name, &params, &Patch::Apply(&build::token_review_binding(v, role))).await?;
        } else if api.get_opt(&name).await?.is_some() {
            api.delete(&name, &DeleteParams::default()).await?;
        }
        sweep_token_review_bindings(ctx, &api).await?;
    }
    Ok(())
}

async fn delete_if_ours<K>(api: &Api<K>, name: &str, v: &ValidatedBroker) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if let Some(existing) = api.get_metadata_opt(name).await?
        && existing.metadata.owner_references.iter().flatten().any(|o| o.uid == v.owner.uid)
    {
        api.delete(name, &DeleteParams::default()).await?;
    }
    Ok(())
}

/// Removes the TokenReview bindings of Brokers that are gone, every
/// `resync` for as long as it runs (a binding is cluster-scoped: no owner
/// reference can collect it with its Broker, and the last Broker's deletion
/// triggers no reconcile). Starts once the Broker cache has listed: an
/// empty cache would look like every Broker gone. Never returns when the
/// operator binds no ClusterRole.
pub async fn sweep_forever(ctx: std::sync::Arc<Context>) {
    if ctx.settings.token_review_cluster_role.is_none() {
        return std::future::pending().await;
    }
    if let Some(store) = ctx.stores.brokers.get()
        && store.wait_until_ready().await.is_err()
    {
        return std::future::pending().await;
    }
    let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(ctx.settings.resync.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sweep_token_review_bindings(&ctx, &api).await {
            tracing::warn!(error = %e, "sweeping TokenReview bindings failed; trying again later");
        }
    }
}

/// Removes TokenReview bindings whose Broker no longer exists.
async fn sweep_token_review_bindings(ctx: &Context, api: &Api<ClusterRoleBinding>) -> Result<()> {
    let selector = format!("app.kubernetes.io/managed-by=warren-operator,{}", build::TOKEN_REVIEW_NAMESPACE_LABEL);
    for crb in api.list_metadata(&ListParams::default().labels(&selector)).await?.items {
        let labels = crb.metadata.labels.clone().unwrap_or_default();
        let (Some(ns), Some(name)) = (labels.get(build::TOKEN_REVIEW_NAMESPACE_LABEL), labels.get("app.kubernetes.io/instance")) else {
            continue;
        };
        if crate::topology::find_broker(ctx, ns, name).await?.is_none() {
            let binding = crb.name_any();
            tracing::info!(%binding, broker = %format!("{ns}/{name}"), "removing the TokenReview binding of a Broker that is gone");
            api.delete(&binding, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

/// How the operator reaches `broker`: TLS when it has `spec.tls` (trusting
/// the Secret's `ca.crt`), the generated administrator credential when
/// authentication is on. Read from the Secrets, reused for a short while.
pub async fn broker_access(ctx: &Context, broker: &Broker) -> Result<BrokerAccess> {
    let namespace = broker.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let name = broker.name_any();
    let key = format!("{namespace}/{name}/{}", broker.metadata.generation.unwrap_or_default());
    if let Some((at, access)) = ctx.access.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
        && at.elapsed() < ACCESS_TTL
    {
        return Ok(access.clone());
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut access = BrokerAccess::default();
    if broker.spec.auth.enabled {
        let secret_name = format!("{name}-admin");
        let secret = secrets.get_opt(&secret_name).await?;
        let password = secret.as_ref().and_then(|s| secret_value(s, "password"));
        let password = password
            .ok_or_else(|| Error::BrokerNotReady(format!("the administrator Secret {namespace}/{secret_name} is not there yet")))?;
        access.admin = Some((build::ADMIN_USER.to_string(), password));
    }
    if let Some(tls) = &broker.spec.tls {
        access.tls = true;
        let secret_name = tls.secret_name.clone().unwrap_or_else(|| format!("{name}-tls"));
        let secret = secrets.get_opt(&secret_name).await?;
        access.ca_pem = secret.as_ref().and_then(|s| secret_value(s, "ca.crt")).map(String::into_bytes);
        // A broker that requires client certificates gets the one it
        // serves with (cert-manager's carries the client usage too); the
        // administrator credential still says who the operator is.
        if tls.client_auth == warren_crds::v1alpha1::ClientAuth::Required {
            access.identity =
                secret.as_ref().and_then(|s| Some((secret_value(s, "tls.crt")?.into_bytes(), secret_value(s, "tls.key")?.into_bytes())));
        }
        // Whatever address the operator dials (an override in tests), the
        // certificate names the client Service.
        access.server_name = Some(format!("{name}.{namespace}.svc"));
    }
    ctx.access.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (Instant::now(), access.clone()));
    Ok(access)
}

/// A key of a Secret, as text.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}
