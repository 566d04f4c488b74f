//! The control plane itself: the pinned release, RBAC on, a Ready node.

use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn should_run_the_pinned_release_with_rbac_and_a_simulated_node() {
    let _serial = serial().await;
    let version: serde_json::Value = serde_json::from_str(&kubectl(&["version", "-o", "json"])).unwrap();
    let server = version["serverVersion"]["gitVersion"].as_str().unwrap_or_default().to_string();
    assert!(server.starts_with("v1.37."), "kube-apiserver reports {server} (version ldflags)");
    figure(&format!("kube-apiserver {server}"));

    // RBAC is enforced: a ServiceAccount with no bindings may not list pods.
    let ns = namespace("cp-rbac");
    kubectl(&["create", "serviceaccount", "nobody", "-n", &ns.0]);
    let nobody = token_kubeconfig(&ns.0, "nobody");
    let client = client_for(&nobody).await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, &ns.0);
    match pods.list(&Default::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("a ServiceAccount without bindings listed pods: {other:?}"),
    }

    // kwok's node is Ready, and a Deployment's pod runs on it and becomes Ready.
    assert_eq!(jsonpath("default", "node/kwok-node-0", "{.status.conditions[?(@.type==\"Ready\")].status}"), "True");
    kubectl(&["create", "deployment", "hello", "-n", &ns.0, "--image=registry.invalid/hello:1", "--replicas=2"]);
    kubectl(&["rollout", "status", "-n", &ns.0, "deployment/hello", "--timeout=60s"]);
    let ready = eventually("two Ready pods", Duration::from_secs(30), || async {
        jsonpath(&ns.0, "deployment/hello", "{.status.readyReplicas}") == "2"
    })
    .await;
    figure(&format!("deployment pods Ready {:.1} s after rollout status returned", ready.as_secs_f64()));
}
