//! The chart with real helm: install, upgrade, uninstall; its RBAC as the
//! API server evaluates it; the documented CRD upgrade.

use crate::harness::*;

/// Installs a second release (its own ClusterRoles), upgrades and
/// uninstalls it; the CRDs stay.
#[tokio::test]
async fn should_install_upgrade_and_uninstall_the_chart() {
    let _serial = serial().await;
    chart();
    let ns = namespace("chart-lifecycle");
    let release = "lifecycle";
    let out = helm(&["install", release, "charts/warren", "-n", &ns.0, "--wait", "--timeout", "120s"]);
    // NOTES must work from a packaged chart: no repository paths.
    assert!(!out.contains("examples/"), "NOTES point at files a packaged chart lacks:\n{out}");
    assert!(out.contains("kind: Broker"), "NOTES show a Broker to apply:\n{out}");
    let deployment = "deployment/lifecycle-warren-operator";
    assert_eq!(jsonpath(&ns.0, deployment, "{.status.readyReplicas}"), "1", "the operator pod is Ready (kwok)");
    kubectl(&[
        "get",
        "clusterrole",
        "lifecycle-warren-operator",
        "lifecycle-warren-operator-crds",
        "lifecycle-warren-edit",
        "lifecycle-warren-view",
    ]);

    helm(&[
        "upgrade",
        release,
        "charts/warren",
        "-n",
        &ns.0,
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.resyncSeconds=10",
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert_eq!(jsonpath(&ns.0, deployment, "{.spec.replicas}"), "2");
    let env = jsonpath(&ns.0, deployment, "{.spec.template.spec.containers[0].env[?(@.name==\"WARREN_OPERATOR_RESYNC_SECONDS\")].value}");
    assert_eq!(env, "10");

    helm(&["uninstall", release, "-n", &ns.0, "--wait", "--timeout", "60s"]);
    assert!(try_kubectl(&["get", "-n", &ns.0, deployment]).is_err(), "the operator is gone");
    assert!(try_kubectl(&["get", "clusterrole", "lifecycle-warren-operator"]).is_err(), "its ClusterRole is gone");
    kubectl(&["get", "crd", "queues.warren.dev"]);
}

/// The chart's ClusterRole, as the API server evaluates it for the
/// operator's ServiceAccount; and the aggregated roles for users.
#[tokio::test]
async fn should_grant_the_operator_and_users_what_they_need() {
    let _serial = serial().await;
    chart();
    let sa = format!("system:serviceaccount:{SYSTEM_NS}:{OPERATOR_SA}");
    let can = |args: &[&str], who: &str| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--as", who]);
        try_kubectl(&all).map(|s| s == "yes").unwrap_or(false)
    };
    // blockOwnerDeletion on a Broker's children (OwnerReferencesPermission-
    // Enforcement is on in this API server).
    assert!(can(&["update", "brokers.warren.dev", "--subresource=finalizers", "-A"], &sa), "update brokers/finalizers");
    assert!(can(&["get", "customresourcedefinitions/queues.warren.dev"], &sa), "read its CRDs (schema revision)");
    assert!(!can(&["get", "customresourcedefinitions/foos.example.com"], &sa), "only its own CRDs");
    assert!(!can(&["delete", "statefulsets", "-A"], &sa), "never deletes children itself");
    assert!(can(&["patch", "deployments.apps", "--subresource=scale", "-A"], &sa));

    // Aggregated ClusterRoles: `edit` may manage Warren objects, `view` read them.
    let ns = namespace("chart-rbac");
    for (user, role) in [("dev", "edit"), ("auditor", "view")] {
        kubectl(&["create", "serviceaccount", user, "-n", &ns.0]);
        kubectl(&["create", "rolebinding", user, "-n", &ns.0, "--clusterrole", role, "--serviceaccount", &format!("{}:{user}", ns.0)]);
    }
    let dev = format!("system:serviceaccount:{}:dev", ns.0);
    let auditor = format!("system:serviceaccount:{}:auditor", ns.0);
    for resource in ["brokers.warren.dev", "queues.warren.dev", "exchanges.warren.dev", "bindings.warren.dev"] {
        assert!(can(&["create", resource, "-n", &ns.0], &dev), "edit creates {resource}");
        assert!(can(&["delete", resource, "-n", &ns.0], &dev), "edit deletes {resource}");
        assert!(can(&["list", resource, "-n", &ns.0], &auditor), "view lists {resource}");
        assert!(!can(&["create", resource, "-n", &ns.0], &auditor), "view does not create {resource}");
    }
}

/// The documented CRD upgrade: Helm owns the CRDs' fields after `helm
/// install`, so `kubectl apply --server-side` needs `--force-conflicts`.
#[tokio::test]
async fn should_upgrade_the_crds_with_kubectl_server_side_apply() {
    let _serial = serial().await;
    chart();
    // A changed CRD (as a newer chart ships it): another schema revision.
    let original = std::fs::read_to_string(repo().join("charts/warren/crds/exchanges.warren.dev.yaml")).unwrap();
    let current = format!("warren.dev/schema-revision: '{}'", warren_crds::SCHEMA_REVISION);
    assert!(original.contains(&current), "the chart's CRD carries its schema revision");
    let changed = original.replace(&current, &format!("warren.dev/schema-revision: '{}'", warren_crds::SCHEMA_REVISION + 1));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("exchanges.warren.dev.yaml");
    std::fs::write(&file, &changed).unwrap();
    let file = file.display().to_string();
    let refused = try_kubectl(&["apply", "--server-side", "-f", &file]).expect_err("a conflict with helm's field manager");
    assert!(refused.contains("conflict"), "{refused}");
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &file]);
    // Back to the committed CRD, the way the docs say.
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", "charts/warren/crds/"]);
}
