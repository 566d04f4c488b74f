//! Security on the real API server, as the chart's ServiceAccount: a
//! Broker's generated administrator Secret, its NetworkPolicy and its
//! TokenReview binding (swept when the Broker is gone); the pod's security
//! settings; bad TLS settings and CEL refusals with their reasons; and
//! Users and Permissions put into a real broker that enforces them.

use std::time::Duration;

use base64::Engine as _;
use warren_client::proto::{ListUsersRequest, WhoAmIRequest};
use warren_client::{Client, ConnectOptions, QueueOptions};

use crate::harness::*;

/// The chart's ClusterRole granting `tokenreviews: create` (release
/// `warren`, `brokerTokenReview.enabled`).
const TOKEN_REVIEW_ROLE: &str = "warren-broker-tokenreview";

/// A key of a Secret, decoded.
fn secret_value(namespace: &str, secret: &str, key: &str) -> String {
    let b64 = jsonpath(namespace, &format!("secret/{secret}"), &format!("{{.data.{}}}", key.replace('.', "\\.")));
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap_or_default()).unwrap_or_default()
}

/// Everything a namespace's Events, ConfigMaps and Warren objects say, as
/// JSON: where no Secret material may appear.
fn visible_text(namespace: &str) -> String {
    ["events", "configmaps", "brokers.warren.dev", "users.warren.dev", "permissions.warren.dev", "statefulsets"]
        .iter()
        .map(|kind| try_kubectl(&["get", kind, "-n", namespace, "-o", "json"]).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn should_secure_a_broker_by_default() {
    let _serial = serial().await;
    let ns = namespace("security-broker");
    let n = &ns.0;
    volume_for(n, "warren");
    let op = Operator::start(&["--token-review-cluster-role", TOKEN_REVIEW_ROLE, "--resync-seconds", "2"]);
    op.wait_ready().await;
    kubectl(&["apply", "-n", n, "-f", "examples/broker.yaml"]);
    kubectl(&["wait", "-n", n, "--for=condition=Ready", "broker/warren", "--timeout=120s"]);
    let uid = jsonpath(n, "broker/warren", "{.metadata.uid}");

    // The administrator credential: generated once, owned by the Broker,
    // mounted as a file; the operator uses it.
    assert_eq!(jsonpath(n, "secret/warren-admin", "{.metadata.ownerReferences[0].uid}"), uid);
    let password = secret_value(n, "warren-admin", "password");
    assert_eq!(secret_value(n, "warren-admin", "username"), "admin");
    assert!(password.len() >= 32 && password.chars().all(|c| c.is_ascii_alphanumeric()), "a generated password");
    let container = "{.spec.template.spec.containers[0]";
    let env = |name: &str| jsonpath(n, "statefulset/warren", &format!("{container}.env[?(@.name==\"{name}\")].value}}"));
    assert_eq!(env("WARREN_ADMIN_PASSWORD_FILE"), "/etc/warren-admin/password");
    assert_eq!(env("WARREN_KUBERNETES_AUTH"), "token-review");
    assert_eq!(env("WARREN_KUBERNETES_AUDIENCE"), "warren");
    assert_eq!(env("WARREN_INSECURE"), "", "authentication is on: never --insecure");
    assert_eq!(jsonpath(n, "statefulset/warren", "{.spec.template.spec.volumes[?(@.name==\"admin\")].secret.secretName}"), "warren-admin");
    // The broker's own token is mounted (it calls TokenReview); the pod is
    // locked down.
    let pod = "{.spec.template.spec";
    assert_eq!(jsonpath(n, "statefulset/warren", &format!("{pod}.automountServiceAccountToken}}")), "true");
    assert_eq!(jsonpath(n, "statefulset/warren", &format!("{pod}.securityContext.runAsNonRoot}}")), "true");
    assert_eq!(jsonpath(n, "statefulset/warren", &format!("{pod}.securityContext.seccompProfile.type}}")), "RuntimeDefault");
    assert_eq!(jsonpath(n, "statefulset/warren", &format!("{container}.securityContext.readOnlyRootFilesystem}}")), "true");
    assert_eq!(jsonpath(n, "statefulset/warren", &format!("{container}.securityContext.allowPrivilegeEscalation}}")), "false");
    assert_eq!(jsonpath(n, "statefulset/warren", &format!("{container}.securityContext.capabilities.drop}}")), "[\"ALL\"]");

    // The NetworkPolicy: clients on gRPC and metrics, peers on 5681 from the
    // Broker's own pods only; owned by the Broker.
    assert_eq!(jsonpath(n, "networkpolicy/warren", "{.metadata.ownerReferences[0].uid}"), uid);
    assert_eq!(jsonpath(n, "networkpolicy/warren", "{.spec.policyTypes}"), "[\"Ingress\"]");
    assert_eq!(jsonpath(n, "networkpolicy/warren", "{.spec.ingress[0].ports[*].port}"), "5680 15680");
    assert_eq!(jsonpath(n, "networkpolicy/warren", "{.spec.ingress[1].ports[*].port}"), "5681");
    let from = jsonpath(n, "networkpolicy/warren", "{.spec.ingress[1].from[0].podSelector.matchLabels}");
    assert!(from.contains("\"app.kubernetes.io/instance\":\"warren\""), "{from}");

    // TokenReview: the Broker's ServiceAccount may create TokenReviews, as
    // the API server evaluates it.
    let binding = format!("clusterrolebinding/warren-tokenreview-{n}-warren");
    assert_eq!(jsonpath("", &binding, "{.roleRef.name}"), TOKEN_REVIEW_ROLE);
    let sa = format!("system:serviceaccount:{n}:warren");
    assert_eq!(kubectl(&["auth", "can-i", "create", "tokenreviews.authentication.k8s.io", "--as", &sa]), "yes");

    // No Secret material outside the Secret.
    let visible = visible_text(n);
    assert!(!visible.contains(&password), "the administrator password appears outside its Secret");
    assert!(!op.log().contains(&password), "the administrator password appears in the operator's log");

    // Deleting the Broker: the garbage collector takes the Secret and the
    // NetworkPolicy, the operator's sweep the cluster-scoped binding.
    kubectl(&["delete", "-n", n, "broker/warren", "--wait=true", "--timeout=60s"]);
    let took =
        eventually("the TokenReview binding swept", Duration::from_secs(60), || async { try_kubectl(&["get", &binding]).is_err() }).await;
    figure(&format!("TokenReview binding of a deleted Broker removed {:.1} s after the Broker (resync 2 s)", took.as_secs_f64()));
    eventually("the admin Secret and the NetworkPolicy collected", Duration::from_secs(60), || async {
        try_kubectl(&["get", "-n", n, "secret/warren-admin"]).is_err() && try_kubectl(&["get", "-n", n, "networkpolicy/warren"]).is_err()
    })
    .await;
    drop(op);
}

#[tokio::test]
async fn should_report_bad_security_settings_with_reasons() {
    let _serial = serial().await;
    let ns = namespace("security-refusals");
    let n = &ns.0;
    let op = Operator::start(&[]);
    op.wait_ready().await;
    let broker =
        |name: &str, spec: &str| format!("apiVersion: warren.dev/v1alpha1\nkind: Broker\nmetadata:\n  name: {name}\nspec:\n{spec}");

    // The API server refuses what the CEL rules and patterns forbid.
    let refusals = [
        (broker("both", "  tls:\n    secretName: a\n    issuerRef: {name: ca}\n"), "set exactly one of secretName and issuerRef"),
        (
            "apiVersion: warren.dev/v1alpha1\nkind: Permission\nmetadata:\n  name: both\nspec:\n  brokerRef: {name: warren}\n  \
             user: app\n  serviceAccount: {name: worker}\n"
                .to_string(),
            "set exactly one of user and serviceAccount",
        ),
        (
            "apiVersion: warren.dev/v1alpha1\nkind: Permission\nmetadata:\n  name: none\nspec:\n  brokerRef: {name: warren}\n".to_string(),
            "set exactly one of user and serviceAccount",
        ),
        (
            "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: colon\nspec:\n  brokerRef: {name: warren}\n  name: \"a:b\"\n"
                .to_string(),
            "spec.name",
        ),
        (
            "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: root\nspec:\n  brokerRef: {name: warren}\n  tags: [root]\n"
                .to_string(),
            "Unsupported value: \"root\"",
        ),
        // Whoever creates a User may make it an administrator: only beside
        // the Broker, whatever its topologyNamespaces say.
        (
            "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: remote\nspec:\n  \
             brokerRef: {name: warren, namespace: platform}\n  tags: [administrator]\n"
                .to_string(),
            "live in their Broker's namespace",
        ),
        (
            "apiVersion: warren.dev/v1alpha1\nkind: Permission\nmetadata:\n  name: remote\nspec:\n  \
             brokerRef: {name: warren, namespace: platform}\n  user: app\n  configure: '.*'\n"
                .to_string(),
            "live in their Broker's namespace",
        ),
    ];
    for (yaml, message) in refusals {
        let err = try_apply(n, &yaml).expect_err(&format!("accepted:\n{yaml}"));
        assert!(err.contains(message), "{message:?} not in: {err}");
    }
    // Immutable: a User cannot be moved to another Broker.
    apply(n, "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: app\nspec:\n  brokerRef: {name: warren}\n");
    let err = try_apply(n, "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: app\nspec:\n  brokerRef: {name: other}\n")
        .expect_err("a User moved to another Broker");
    assert!(err.contains("cannot be renamed or moved"), "{err}");
    // ... and with no such Broker it says so.
    wait_condition(n, "user/app", "Ready", "False/BrokerNotFound").await;

    // A TLS Secret that is missing, then without the CA client certificates
    // need: nothing is applied (the pods could not start), the reason says
    // which; complete, the Broker proceeds.
    apply(n, &broker("tls", "  tls:\n    secretName: tls-cert\n    clientAuth: Required\n"));
    wait_condition(n, "broker/tls", "Degraded", "True/TLSSecretMissing").await;
    assert!(jsonpath(n, "broker/tls", "{.status.conditions[?(@.type==\"Degraded\")].message}").contains(&format!("{n}/tls-cert")));
    assert!(try_kubectl(&["get", "-n", n, "statefulset/tls"]).is_err(), "no pods that cannot start");
    let dir = tempfile::tempdir().unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(dir.path().join(f), format!("not really a {f}")).unwrap();
    }
    let file = |f: &str| format!("--from-file={f}={}", dir.path().join(f).display());
    kubectl(&["create", "secret", "generic", "tls-cert", "-n", n, &file("tls.crt"), &file("tls.key")]);
    wait_condition(n, "broker/tls", "Degraded", "True/TLSSecretInvalid").await;
    assert!(jsonpath(n, "broker/tls", "{.status.conditions[?(@.type==\"Degraded\")].message}").contains("no ca.crt"));
    kubectl(&["delete", "secret", "tls-cert", "-n", n]);
    kubectl(&["create", "secret", "generic", "tls-cert", "-n", n, &file("tls.crt"), &file("tls.key"), &file("ca.crt")]);
    eventually("the StatefulSet applied once the Secret is complete", Duration::from_secs(60), || async {
        try_kubectl(&["get", "-n", n, "statefulset/tls"]).is_ok()
    })
    .await;
    let mounted = jsonpath(n, "statefulset/tls", "{.spec.template.spec.volumes[?(@.name==\"tls\")].secret.secretName}");
    assert_eq!(mounted, "tls-cert");
    let env = jsonpath(n, "statefulset/tls", "{.spec.template.spec.containers[0].env[?(@.name==\"WARREN_TLS_CLIENT_AUTH\")].value}");
    assert_eq!(env, "required");

    // cert-manager is not installed here.
    apply(n, &broker("issued", "  tls:\n    issuerRef: {name: ca, kind: ClusterIssuer}\n"));
    wait_condition(n, "broker/issued", "Degraded", "True/CertManagerMissing").await;
    assert!(try_kubectl(&["get", "-n", n, "statefulset/issued"]).is_err());

    // The administrator Secret's name taken by someone else's Secret.
    kubectl(&["create", "secret", "generic", "taken-admin", "-n", n, "--from-literal=password=theirs"]);
    apply(n, &broker("taken", "  replicas: 1\n"));
    wait_condition(n, "broker/taken", "Degraded", "True/NameConflict").await;
    assert!(
        jsonpath(n, "broker/taken", "{.status.conditions[?(@.type==\"Degraded\")].message}").contains(&format!("Secret {n}/taken-admin"))
    );
    assert_eq!(secret_value(n, "taken-admin", "password"), "theirs", "not taken over");
    kubectl(&["delete", "-n", n, "broker/tls", "broker/issued", "broker/taken", "user/app", "--wait=true", "--timeout=60s"]);
    drop(op);
}

/// A client of the real broker with a username and password.
async fn as_user(addr: &str, user: &str, password: &str) -> Client {
    Client::connect_with(addr, &ConnectOptions::default().basic(user, password)).await.unwrap()
}

fn status_code<T: std::fmt::Debug>(r: Result<T, warren_client::Error>) -> tonic::Code {
    match r {
        Err(warren_client::Error::Status(s)) => s.code(),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test]
async fn should_put_users_and_permissions_into_a_real_broker() {
    let _serial = serial().await;
    let ns = namespace("security-users");
    let n = &ns.0;
    // The broker (on loopback) must know the administrator password the
    // operator generates: the operator starts first, the broker once the
    // Secret exists, on the port the operator was told.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mapping = format!("{n}/warren={addr}");
    volume_for(n, "warren");
    let op = Operator::start(&["--broker-endpoint", &mapping, "--resync-seconds", "2"]);
    op.wait_ready().await;
    kubectl(&["apply", "-n", n, "-f", "examples/broker.yaml"]);
    eventually("the administrator Secret", Duration::from_secs(60), || async { !secret_value(n, "warren-admin", "password").is_empty() })
        .await;
    let admin_password = secret_value(n, "warren-admin", "password");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("admin-password");
    std::fs::write(&password_file, &admin_password).unwrap();
    let _real =
        crate::real_broker::RealBroker::start_with(&["--grpc-addr", &addr, "--admin-password-file", password_file.to_str().unwrap()]);
    kubectl(&["wait", "-n", n, "--for=condition=Ready", "broker/warren", "--timeout=120s"]);
    let admin = as_user(&addr, "admin", &admin_password).await;
    let users = || async { admin.users().list_users(ListUsersRequest {}).await.unwrap().into_inner().users };

    // A User without a Secret: the operator generates one (owned by the
    // User) and puts the user into the broker.
    kubectl(&["apply", "-n", n, "-f", "examples/user.yaml"]);
    wait_ready(n, &["user/checkout", "user/dashboards"]);
    assert_eq!(jsonpath(n, "user/checkout", "{.status.username} {.status.credentialsSecret}"), "checkout checkout-user-credentials");
    let uid = jsonpath(n, "user/checkout", "{.metadata.uid}");
    assert_eq!(jsonpath(n, "secret/checkout-user-credentials", "{.metadata.ownerReferences[0].uid}"), uid);
    let password = secret_value(n, "checkout-user-credentials", "password");
    assert_eq!(secret_value(n, "checkout-user-credentials", "username"), "checkout");
    let listed = users().await;
    let dashboards = listed.iter().find(|u| u.name == "dashboards").unwrap();
    assert_eq!((dashboards.tags.clone(), dashboards.max_connections), (vec!["monitoring".to_string()], Some(4)));
    let checkout = as_user(&addr, "checkout", &password).await;
    let me = checkout.users().who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.user.as_str(), me.mechanism.as_str(), me.authentication_enabled), ("checkout", "password", true));
    assert_eq!(status_code(checkout.declare_queue("checkout.jobs", QueueOptions::default()).await), tonic::Code::PermissionDenied);

    // Permissions: the user's and a ServiceAccount's.
    kubectl(&["apply", "-n", n, "-f", "examples/permission.yaml"]);
    wait_ready(n, &["permission/checkout", "permission/orders-worker"]);
    assert_eq!(jsonpath(n, "permission/checkout", "{.status.principal}"), "checkout");
    let worker = format!("system:serviceaccount:{n}:orders-worker");
    assert_eq!(jsonpath(n, "permission/orders-worker", "{.status.principal}"), worker);
    checkout.declare_queue("checkout.jobs", QueueOptions::default()).await.unwrap();
    assert_eq!(status_code(checkout.declare_queue("billing.jobs", QueueOptions::default()).await), tonic::Code::PermissionDenied);
    let listed = users().await;
    let p = listed.iter().find(|u| u.name == worker).and_then(|u| u.permissions.clone()).unwrap();
    assert_eq!((p.configure.as_str(), p.write.as_str(), p.read.as_str()), ("", "", "^orders$"));
    let topics = listed.iter().find(|u| u.name == "checkout").and_then(|u| u.permissions.clone()).unwrap().topics;
    assert_eq!(topics.get("orders").map(|t| t.write.as_str()), Some("^order\\."));

    // Bad input, reported with reasons.
    apply(
        n,
        "apiVersion: warren.dev/v1alpha1\nkind: Permission\nmetadata:\n  name: broken\nspec:\n  brokerRef: {name: warren}\n  \
         user: checkout-2\n  read: '('\n",
    );
    wait_condition(n, "permission/broken", "Ready", "False/RejectedByBroker").await;
    assert!(jsonpath(n, "permission/broken", "{.status.conditions[0].message}").contains("not a valid regular expression"));
    apply(
        n,
        "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: given\nspec:\n  brokerRef: {name: warren}\n  \
         credentialsSecret: nowhere\n",
    );
    wait_condition(n, "user/given", "Ready", "False/CredentialsMissing").await;
    apply(n, "apiVersion: warren.dev/v1alpha1\nkind: User\nmetadata:\n  name: admin\nspec:\n  brokerRef: {name: warren}\n");
    wait_condition(n, "user/admin", "Ready", "False/DefinedInBrokerConfig").await;
    as_user(&addr, "admin", &admin_password).await.status().await.expect("the configured administrator is untouched");

    // A new password in the Secret is put on the next reconcile.
    let rotated = "rotated-password-1234567890";
    let patch = format!("{{\"stringData\":{{\"password\":\"{rotated}\"}}}}");
    kubectl(&["patch", "-n", n, "secret/checkout-user-credentials", "--type=merge", "-p", &patch]);
    eventually("the rotated password accepted", Duration::from_secs(30), || async {
        let c = as_user(&addr, "checkout", rotated).await;
        c.users().who_am_i(WhoAmIRequest {}).await.is_ok()
    })
    .await;
    assert_eq!(status_code(as_user(&addr, "checkout", &password).await.list_queues().await), tonic::Code::Unauthenticated);

    // Deleting the Permission clears the permissions; deleting the User
    // deletes it on the broker (its credentials stop working) and the
    // garbage collector takes its generated Secret.
    kubectl(&["delete", "-n", n, "permission/checkout", "--timeout=30s"]);
    let fresh = as_user(&addr, "checkout", rotated).await;
    assert_eq!(status_code(fresh.declare_queue("checkout.more", QueueOptions::default()).await), tonic::Code::PermissionDenied);
    assert!(users().await.iter().find(|u| u.name == "checkout").is_some_and(|u| u.permissions.is_none()));
    kubectl(&["delete", "-n", n, "user/checkout", "--timeout=30s"]);
    assert!(!users().await.iter().any(|u| u.name == "checkout"));
    assert_eq!(status_code(as_user(&addr, "checkout", rotated).await.list_queues().await), tonic::Code::Unauthenticated);
    eventually("the generated Secret collected", Duration::from_secs(60), || async {
        try_kubectl(&["get", "-n", n, "secret/checkout-user-credentials"]).is_err()
    })
    .await;
    // The ServiceAccount's entry goes with its Permission.
    kubectl(&["delete", "-n", n, "permission/orders-worker", "--timeout=30s"]);
    assert!(!users().await.iter().any(|u| u.name == worker));

    // No password in Events, statuses, ConfigMaps, or the operator's log.
    let visible = visible_text(n);
    for secret in [admin_password.as_str(), password.as_str(), rotated] {
        assert!(!visible.contains(secret), "a password appears outside its Secret");
        assert!(!op.log().contains(secret), "a password appears in the operator's log");
    }
    kubectl(&["delete", "-n", n, "user/given", "user/admin", "user/dashboards", "permission/broken", "--wait=true", "--timeout=60s"]);
    drop(op);
}
