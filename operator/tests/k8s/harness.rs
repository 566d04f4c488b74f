//! The harness of the control-plane suite: one real control plane per test
//! process (`operator/k8s/control-plane.sh`), real `helm` and `kubectl`,
//! the real `warren-operator` and `warren-broker` binaries as local
//! processes, and bounded waits.
//!
//! - The control plane is the one named by `WARREN_K8S_DIR` (as `./dev
//!   k8s-up` starts it), else one started in a temporary directory for this
//!   process; it stops by itself when the process exits, however it exits.
//! - Tests run one at a time ([`serial`]): each runs its own operator over
//!   the whole cluster, in its own namespaces, and deletes them at the end.
//! - The operator runs with the token of the chart's ServiceAccount, so a
//!   verb missing from the chart's ClusterRole fails the test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The chart's release and namespace every operator identity comes from.
pub const RELEASE: &str = "warren";
pub const SYSTEM_NS: &str = "warren-system";
/// The chart's ServiceAccount (and ClusterRole, and Lease) name.
pub const OPERATOR_SA: &str = "warren-operator";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// The directory the test binaries' target profile builds into
/// (`target/debug`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

/// One test at a time: every test runs its own cluster-wide operator.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub api: String,
}

/// The control plane of this process (started on first use).
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let dir = match std::env::var_os("WARREN_K8S_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let dir = tempfile::Builder::new().prefix("warren-k8s-").tempdir().unwrap().keep();
                let started = Instant::now();
                let mut cmd = Command::new(repo().join("operator/k8s/control-plane.sh"));
                cmd.arg("up").arg(&dir).args(["--watch", &std::process::id().to_string()]);
                if std::env::var_os("WARREN_K8S_KEEP").is_none() {
                    cmd.arg("--remove");
                }
                let out = cmd.stderr(Stdio::inherit()).output().expect("running operator/k8s/control-plane.sh");
                assert!(out.status.success(), "starting the control plane failed (logs in {})", dir.display());
                figure(&format!(
                    "control plane up (certificates, etcd, kube-apiserver ready, node Ready) in {:.1} s ({})",
                    started.elapsed().as_secs_f64(),
                    dir.display()
                ));
                dir
            }
        };
        let api = std::fs::read_to_string(dir.join("api")).expect("no control plane in WARREN_K8S_DIR").trim().to_string();
        ControlPlane { kubeconfig: dir.join("kubeconfig"), api, dir }
    })
}

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

/// A cluster-admin client.
pub async fn admin() -> Client {
    client_for(&control_plane().kubeconfig).await
}

/// `helm` and `kubectl` (installed by charts/install-helm.sh once).
pub fn tools() -> &'static (PathBuf, PathBuf) {
    static TOOLS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TOOLS.get_or_init(|| {
        if let (Ok(h), Ok(k)) = (std::env::var("HELM"), std::env::var("KUBECTL")) {
            return (h.into(), k.into());
        }
        let out = Command::new(repo().join("charts/install-helm.sh")).stderr(Stdio::inherit()).output().unwrap();
        assert!(out.status.success(), "charts/install-helm.sh failed");
        let helm = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim());
        let kubectl = helm.with_file_name("kubectl");
        (helm, kubectl)
    })
}

fn run_tool(tool: &Path, args: &[&str], stdin: Option<&str>, kubeconfig: &Path) -> Output {
    let mut child = Command::new(tool)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", control_plane().dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", control_plane().dir.join("helm/config"))
        .env("HELM_DATA_HOME", control_plane().dir.join("helm/data"))
        .current_dir(repo())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `kubectl ARGS` as the admin; its output, or the failure.
pub fn try_kubectl(args: &[&str]) -> Result<String, String> {
    let out = run_tool(&tools().1, args, None, &control_plane().kubeconfig);
    if out.status.success() { Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()) } else { Err(text(&out)) }
}

/// `kubectl ARGS` as the admin; panics with the output when it fails.
pub fn kubectl(args: &[&str]) -> String {
    try_kubectl(args).unwrap_or_else(|e| panic!("kubectl {} failed:\n{e}", args.join(" ")))
}

/// `kubectl apply -f -` of `yaml` as the admin: the output, or the refusal.
pub fn try_apply(namespace: &str, yaml: &str) -> Result<String, String> {
    let out = run_tool(&tools().1, &["apply", "-n", namespace, "-f", "-"], Some(yaml), &control_plane().kubeconfig);
    if out.status.success() { Ok(text(&out)) } else { Err(text(&out)) }
}

pub fn apply(namespace: &str, yaml: &str) {
    try_apply(namespace, yaml).unwrap_or_else(|e| panic!("kubectl apply failed:\n{e}\n---\n{yaml}"));
}

/// `helm ARGS` as the admin.
pub fn try_helm(args: &[&str]) -> Result<String, String> {
    let out = run_tool(&tools().0, args, None, &control_plane().kubeconfig);
    if out.status.success() { Ok(text(&out)) } else { Err(text(&out)) }
}

pub fn helm(args: &[&str]) -> String {
    try_helm(args).unwrap_or_else(|e| panic!("helm {} failed:\n{e}", args.join(" ")))
}

/// Test namespaces not deleted yet.
static NAMESPACES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Creates a namespace for a test. It is deleted when the test's operator
/// stops (while it still runs, so that finalizers let go and nothing is
/// left for the next test's operator), or else by the returned guard.
pub fn namespace(name: &str) -> Namespace {
    let _ = try_kubectl(&["delete", "namespace", name, "--wait=true", "--timeout=60s"]);
    kubectl(&["create", "namespace", name]);
    NAMESPACES.lock().unwrap_or_else(|p| p.into_inner()).push(name.to_string());
    Namespace(name.to_string())
}

/// Deletes every test namespace and waits (bounded) until they are gone.
fn delete_test_namespaces() {
    if std::env::var_os("WARREN_K8S_KEEP").is_some() {
        return;
    }
    let names: Vec<String> = std::mem::take(&mut *NAMESPACES.lock().unwrap_or_else(|p| p.into_inner()));
    if names.is_empty() {
        return;
    }
    let mut args = vec!["delete", "namespace", "--ignore-not-found", "--wait=true", "--timeout=120s"];
    args.extend(names.iter().map(String::as_str));
    if let Err(e) = try_kubectl(&args) {
        eprintln!("k8s: deleting test namespaces {names:?}: {e}");
    }
}

pub struct Namespace(pub String);

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::env::var_os("WARREN_K8S_KEEP").is_none() {
            let _ = try_kubectl(&["delete", "namespace", &self.0, "--ignore-not-found", "--wait=false"]);
        }
    }
}

/// The chart, installed once per process as release `warren` in
/// `warren-system` with real helm (CRDs from its `crds/`).
pub fn chart() -> &'static str {
    static INSTALLED: OnceLock<String> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        control_plane();
        if try_helm(&["status", RELEASE, "-n", SYSTEM_NS]).is_ok() {
            return String::new();
        }
        helm(&["install", RELEASE, "charts/warren", "-n", SYSTEM_NS, "--create-namespace", "--wait", "--timeout", "120s"])
    })
}

/// A kubeconfig authenticating as ServiceAccount `namespace/name` (a
/// TokenRequest token), written into the control plane's directory.
pub fn token_kubeconfig(namespace: &str, name: &str) -> PathBuf {
    let token = kubectl(&["create", "token", name, "-n", namespace, "--duration", "4h"]);
    let cp = control_plane();
    let path = cp.dir.join(format!("{namespace}-{name}.kubeconfig"));
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
        cp.api,
        cp.dir.join("ca.crt").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The chart's operator identity (installs the chart first).
pub fn operator_identity() -> PathBuf {
    chart();
    token_kubeconfig(SYSTEM_NS, OPERATOR_SA)
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real `warren-operator`, as a local process.
pub struct Operator {
    child: Option<Child>,
    pub http: u16,
    pub log: PathBuf,
    pub name: String,
}

impl Operator {
    /// Starts the operator as the chart's ServiceAccount, cluster-wide,
    /// without leader election, with `args` added.
    pub fn start(args: &[&str]) -> Operator {
        Self::start_as(&operator_identity(), "op", args)
    }

    /// Starts the operator with a kubeconfig and extra arguments.
    pub fn start_as(kubeconfig: &Path, name: &str, args: &[&str]) -> Operator {
        let bin = std::env::var_os("WARREN_OPERATOR_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("warren-operator"));
        assert!(bin.exists(), "{} does not exist: run `cargo build -p warren-operator` first (same CARGO_TARGET_DIR)", bin.display());
        let http = free_port();
        let log = control_plane().dir.join(format!("operator-{name}-{http}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut all = vec![
            "--http-addr".to_string(),
            format!("127.0.0.1:{http}"),
            "--log-format".into(),
            "text".into(),
            "--identity".into(),
            name.into(),
        ];
        if !args.iter().any(|a| a.starts_with("--leader-election")) {
            all.push("--leader-election=false".into());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let child = Command::new(&bin)
            .args(&all)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", SYSTEM_NS)
            .env("RUST_LOG", "info,warren_operator=debug,kube_runtime=info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Operator { child: Some(child), http, log, name: name.into() }
    }

    /// `GET path` on the operator's HTTP port: (status, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path).await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        eventually(&format!("operator {} ready", self.name), Duration::from_secs(30), || async {
            matches!(self.get("/readyz").await, Some((200, _)))
        })
        .await;
    }

    /// A metric's value from `/metrics` (the first line starting with
    /// `name`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    }

    /// Kills the process (SIGKILL: no clean hand-over).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if self.is_running() {
            delete_test_namespaces();
        }
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of operator {} ({}):", self.name, self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1:`port`.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.ok().flatten()
}

/// Polls `f` every 100 ms until it returns true; panics after `timeout`.
/// Returns how long it took.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kubectl get` of one JSONPath, empty when missing.
pub fn jsonpath(namespace: &str, object: &str, path: &str) -> String {
    try_kubectl(&["get", "-n", namespace, object, "-o", &format!("jsonpath={path}")]).unwrap_or_default()
}

/// The `reason` of the condition `type_` of an object.
pub fn condition(namespace: &str, object: &str, type_: &str) -> String {
    jsonpath(
        namespace,
        object,
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}"),
    )
}

/// Waits for the condition `type_` of `object` to read `status/reason`
/// (`reason` may be `*`).
pub async fn wait_condition(namespace: &str, object: &str, type_: &str, want: &str) {
    let (want_status, want_reason) = want.split_once('/').unwrap();
    let mut last = String::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            last = condition(namespace, object, type_);
            let (s, r) = last.split_once('/').unwrap_or_default();
            if s == want_status && (want_reason == "*" || r == want_reason) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if found.is_err() {
        let status = jsonpath(namespace, object, "{.status}");
        panic!("{namespace}/{object}: condition {type_} is {last:?}, not {want:?}, after 60 s; status: {status}");
    }
}

/// A PersistentVolume pre-bound to the first pod's claim of Broker
/// `namespace/name` (nothing provisions volumes here).
pub fn volume_for(namespace: &str, broker: &str) {
    volume_named(namespace, &format!("pv-{namespace}-{broker}"), &format!("data-{broker}-0"));
}

/// PersistentVolumes pre-bound to the claims of the pods of cluster Broker
/// `namespace/name` with these ordinals.
pub fn cluster_volumes_for(namespace: &str, broker: &str, ordinals: std::ops::RangeInclusive<i32>) {
    for i in ordinals {
        volume_named(namespace, &format!("pv-{namespace}-{broker}-{i}"), &format!("data-{broker}-{i}"));
    }
}

fn volume_named(namespace: &str, pv: &str, claim: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {pv}\nspec:\n  capacity: {{storage: 10Gi}}\n  \
         accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: \"\"\n  \
         hostPath: {{path: /var/lib/warren-test}}\n  claimRef: {{namespace: {namespace}, name: {claim}}}\n"
    );
    let _ = try_kubectl(&["delete", "pv", pv, "--wait=false"]);
    apply("default", &yaml);
}

/// Requests the operator's identities made, from the API server's audit
/// log (every ServiceAccount of `warren-system`): (total, by verb).
pub fn operator_requests() -> (usize, std::collections::BTreeMap<String, usize>) {
    let log = std::fs::read_to_string(control_plane().dir.join("logs/audit.log")).unwrap_or_default();
    let mut by_verb = std::collections::BTreeMap::new();
    let mut total = 0;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["user"]["username"].as_str() != Some(&format!("system:serviceaccount:{SYSTEM_NS}:{OPERATOR_SA}")) {
            continue;
        }
        total += 1;
        let key = format!("{} {}", v["verb"].as_str().unwrap_or("?"), v["objectRef"]["resource"].as_str().unwrap_or("-"));
        *by_verb.entry(key).or_insert(0) += 1;
    }
    (total, by_verb)
}

/// A Broker `warren` in `namespace` (examples/broker.yaml), Ready on the
/// simulated node, whose topology the operator declares into a real
/// broker process on loopback (`--broker-endpoint`). `args` go to the
/// operator.
pub async fn ready_broker(namespace: &str, args: &[&str]) -> (crate::real_broker::RealBroker, Operator) {
    let real = crate::real_broker::RealBroker::start();
    volume_for(namespace, "warren");
    let mapping = format!("{namespace}/warren={}", real.addr);
    let mut all = vec!["--broker-endpoint", mapping.as_str()];
    all.extend_from_slice(args);
    let op = Operator::start(&all);
    op.wait_ready().await;
    kubectl(&["apply", "-n", namespace, "-f", "examples/broker.yaml"]);
    kubectl(&["wait", "-n", namespace, "--for=condition=Ready", "broker/warren", "--timeout=120s"]);
    (real, op)
}

/// A gRPC client of a real broker.
pub async fn grpc(addr: &str) -> warren_client::proto::warren_client::WarrenClient<tonic::transport::Channel> {
    warren_client::proto::warren_client::WarrenClient::connect(format!("http://{addr}")).await.unwrap()
}

/// The names of the queues on a real broker.
pub async fn broker_queues(addr: &str) -> Vec<String> {
    let list = grpc(addr).await.list_queues(warren_client::proto::ListQueuesRequest {}).await.unwrap().into_inner();
    list.queues.into_iter().map(|q| q.name).collect()
}

/// `kubectl wait --for=condition=Ready` on objects.
pub fn wait_ready(namespace: &str, objects: &[&str]) {
    let mut args = vec!["wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s"];
    args.extend_from_slice(objects);
    kubectl(&args);
}

/// Prints a measurement as a `k8s-figure:` line on the real stderr (not
/// captured by the test harness, so CI logs show it).
pub fn figure(text: &str) {
    let _ = writeln!(std::io::stderr(), "k8s-figure: {text}");
}

/// Requests by verb and resource between two [`operator_requests`] counts.
pub fn request_diff(
    before: &std::collections::BTreeMap<String, usize>,
    after: &std::collections::BTreeMap<String, usize>,
) -> std::collections::BTreeMap<String, usize> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect()
}
