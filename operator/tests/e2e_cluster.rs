//! End-to-end on a real cluster (kind or k3d): installs the chart, applies
//! the examples, publishes a backlog and watches the consumer Deployment
//! scale up and back down.
//!
//! Skipped (with a loud message) unless KUBECONFIG is set. See
//! README.md, "Run on Kubernetes" > "End-to-end tests", for building and loading the
//! images. Knobs: WARREN_E2E_OPERATOR_IMAGE, WARREN_E2E_BROKER_IMAGE
//! (repository:tag), HELM, KUBECTL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warren_client::proto::warren_client::WarrenClient;
use warren_client::proto::{Message, PublishRequest, PurgeQueueRequest};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(var: &str, name: &str) -> String {
    if let Ok(v) = std::env::var(var) {
        return v;
    }
    let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/warren/bin").join(name);
    if cached.exists() { cached.display().to_string() } else { name.to_string() }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn split_image(image: &str) -> (String, String) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo.to_string(), tag.to_string()),
        _ => (image.to_string(), "latest".to_string()),
    }
}

/// Polls `f` every 2 s until it returns true, at most `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            eprintln!("e2e: {what} after {:?}", start.elapsed());
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!("e2e: timed out after {timeout:?} waiting for {what}");
}

/// Uninstalls and deletes the namespace, even when the test fails.
struct Cleanup {
    kubectl: String,
    helm: String,
    ns: String,
    forward: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut f) = self.forward.take() {
            let _ = f.kill();
        }
        if std::env::var_os("WARREN_E2E_KEEP").is_some() {
            eprintln!("e2e: WARREN_E2E_KEEP set; leaving namespace {}", self.ns);
            return;
        }
        // Topology first (the operator removes finalizers), then the rest.
        let _ = Command::new(&self.kubectl)
            .args(["delete", "-n", &self.ns, "-f", "examples/", "--wait=true", "--timeout=120s"])
            .current_dir(repo())
            .status();
        let _ = Command::new(&self.helm).args(["uninstall", "warren-e2e", "-n", &self.ns, "--wait"]).status();
        let _ = Command::new(&self.kubectl).args(["delete", "namespace", &self.ns, "--wait=false"]).status();
    }
}

#[tokio::test]
async fn should_scale_the_consumer_with_the_backlog_on_a_real_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        // Written to the stderr handle directly: the test harness captures
        // eprintln!, and this message must show in CI logs.
        let _ = writeln!(
            std::io::stderr(),
            "\n=== SKIPPED e2e_cluster: KUBECONFIG is not set, so there is no cluster. \
             Run it on kind or k3d: see README.md, 'Run on Kubernetes > End-to-end tests'. ===\n"
        );
        return;
    }
    let kubectl = tool("KUBECTL", "kubectl");
    let helm = tool("HELM", "helm");
    let ns = format!("warren-e2e-{}", std::process::id());
    let (op_repo, op_tag) =
        split_image(&std::env::var("WARREN_E2E_OPERATOR_IMAGE").unwrap_or_else(|_| "ghcr.io/warren-mq/warren-operator:0.1.0".into()));
    let broker_image = std::env::var("WARREN_E2E_BROKER_IMAGE").unwrap_or_else(|_| "ghcr.io/warren-mq/warren-broker:0.1.0".into());
    let (br_repo, br_tag) = split_image(&broker_image);
    let mut cleanup = Cleanup { kubectl: kubectl.clone(), helm: helm.clone(), ns: ns.clone(), forward: None };
    let chart = repo().join("charts/warren").display().to_string();

    eprintln!("e2e: installing the chart into {ns}");
    run(
        &helm,
        &[
            "install",
            "warren-e2e",
            &chart,
            "-n",
            &ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
            "--set",
            &format!("operator.image.repository={op_repo}"),
            "--set",
            &format!("operator.image.tag={op_tag}"),
            "--set",
            "operator.image.pullPolicy=IfNotPresent",
            "--set",
            &format!("brokerImage.repository={br_repo}"),
            "--set",
            &format!("brokerImage.tag={br_tag}"),
        ],
    );

    let examples = repo().join("examples");
    let ex = |f: &str| examples.join(f).display().to_string();
    run(&kubectl, &["apply", "-n", &ns, "-f", &ex("broker.yaml")]);
    run(&kubectl, &["wait", "-n", &ns, "--for=condition=Ready", "broker/warren", "--timeout=300s"]);
    for f in ["exchange.yaml", "queue-with-dead-letter.yaml", "binding.yaml", "autoscaled-consumer.yaml"] {
        run(&kubectl, &["apply", "-n", &ns, "-f", &ex(f)]);
    }
    // The consumer runs the broker image under test.
    run(&kubectl, &["set", "image", "-n", &ns, "deployment/jobs-worker", &format!("worker={broker_image}")]);
    for q in ["queue/orders", "queue/jobs", "binding.warren.dev/orders-to-orders", "exchange/orders"] {
        run(&kubectl, &["wait", "-n", &ns, "--for=condition=Ready", q, "--timeout=120s"]);
    }
    let replicas =
        || run(&kubectl, &["get", "-n", &ns, "deployment/jobs-worker", "-o", "jsonpath={.spec.replicas}"]).parse::<i32>().unwrap_or(-1);
    assert_eq!(replicas(), 0, "the consumer starts at zero");

    // Reach the broker through a port-forward.
    let mut forward =
        Command::new(&kubectl).args(["port-forward", "-n", &ns, "svc/warren", "0:5680"]).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = forward.stdout.take().unwrap();
    cleanup.forward = Some(forward);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port = line.split("127.0.0.1:").nth(1).and_then(|s| s.split_whitespace().next()).expect("port-forward address");
    let mut client = WarrenClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();

    eprintln!("e2e: publishing a backlog of 100 messages to queue jobs");
    let messages = (0..100)
        .map(|i| Message { exchange: String::new(), routing_key: "jobs".into(), body: format!("job {i}").into(), ..Message::default() })
        .collect();
    client.publish(PublishRequest { messages }).await.unwrap();

    // pollingSeconds is 2: the Deployment must scale up within a few polls.
    eventually("jobs-worker scaled up", Duration::from_secs(30), || async { replicas() >= 1 }).await;
    let desired = run(&kubectl, &["get", "-n", &ns, "queue/jobs", "-o", "jsonpath={.status.autoscaling.desiredReplicas}"]);
    eprintln!("e2e: queue jobs wants {desired} replicas");

    // Drain whatever the consumers have not taken, then expect scale-down
    // after the 60 s stabilization window.
    let _ = client.purge_queue(PurgeQueueRequest { name: "jobs".into() }).await;
    eventually("jobs-worker scaled back to zero", Duration::from_secs(240), || {
        let mut client = client.clone();
        async move {
            let _ = client.purge_queue(PurgeQueueRequest { name: "jobs".into() }).await;
            replicas() == 0
        }
    })
    .await;
    let events = run(&kubectl, &["get", "events", "-n", &ns, "--field-selector", "involvedObject.name=jobs", "-o", "name"]);
    assert!(!events.is_empty(), "the scaling decisions are recorded as Events");
}
