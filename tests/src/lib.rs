//! Test harness: runs the real `warren-broker` binary on a free loopback
//! port in a temporary directory, and the real `warrenctl`.
//!
//! * The binaries are built once per test process (`cargo build --workspace
//!   --bins`, a no-op when up to date), so a test never runs a stale binary.
//!   It is the build `./dev run`, `./dev ctl` and `./dev test` make: the same
//!   packages resolve the same features, so none of them rebuilds what
//!   another built. Set `WARREN_BROKER_BIN` / `WARRENCTL_BIN` to use given
//!   binaries instead.
//! * A [`TestBroker`] is killed when dropped; its data directory lives as long
//!   as the value, so a test can kill, restart and inspect it.
//! * Everything listens on 127.0.0.1; every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use warren_client::Client;

/// How long a broker may take to start (recovery of a large backlog
/// included) before a test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

fn target_bin_dir() -> Result<PathBuf> {
    // Test executables live in `<target>/<profile>/deps/`.
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let deps = exe.parent().ok_or_else(|| anyhow!("test executable has no directory"))?;
    let dir = if deps.ends_with("deps") { deps.parent().unwrap_or(deps) } else { deps };
    Ok(dir.to_path_buf())
}

fn build_binaries() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_bin_dir().map_err(|e| e.to_string())?;
            if std::env::var_os("WARREN_SKIP_BUILD").is_some() {
                return Ok(dir);
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--manifest-path"]).arg(&manifest).args(["--workspace", "--bins"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().map_err(|e| format!("cannot run cargo to build the binaries: {e}"))?;
            if !status.success() {
                return Err(format!("building warren-broker and warrenctl failed ({status})"));
            }
            Ok(dir)
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn binary(env: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let path = build_binaries()?.join(name);
    if !path.exists() {
        bail!("{} does not exist; run `cargo build --workspace --bins` first", path.display());
    }
    Ok(path)
}

/// The `warren-broker` binary.
pub fn broker_bin() -> Result<PathBuf> {
    binary("WARREN_BROKER_BIN", "warren-broker")
}

/// The `warrenctl` binary.
pub fn warrenctl_bin() -> Result<PathBuf> {
    binary("WARRENCTL_BIN", "warrenctl")
}

/// A running broker process.
pub struct TestBroker {
    child: Option<Child>,
    data: tempfile::TempDir,
    extra: Vec<String>,
    envs: Vec<(String, String)>,
    /// Where its stderr goes, when captured (else it is inherited).
    stderr_log: Option<PathBuf>,
    /// The gRPC address it listens on.
    pub addr: String,
    /// The HTTP address (`/metrics`, `/healthz`, `/readyz`) it listens on.
    pub http_addr: String,
    /// The cluster listener's address, when it runs in a cluster.
    pub cluster_addr: Option<String>,
    /// Lines the broker printed to stdout (its configuration, the ready line).
    pub stdout: Vec<String>,
}

impl TestBroker {
    /// Starts a broker in a new temporary directory.
    pub async fn start() -> Result<TestBroker> {
        TestBroker::start_with(&[]).await
    }

    /// Starts a broker with extra command-line arguments.
    pub async fn start_with(args: &[&str]) -> Result<TestBroker> {
        TestBroker::start_with_env(args, &[]).await
    }

    /// Starts a broker with extra command-line arguments and environment
    /// variables.
    pub async fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Result<TestBroker> {
        TestBroker::start_inner(args, envs, false).await
    }

    /// Starts a broker whose stderr (logs, and any panic message) goes to a
    /// file in its temporary directory, read back with
    /// [`stderr`](Self::stderr).
    pub async fn start_capturing_stderr(args: &[&str]) -> Result<TestBroker> {
        TestBroker::start_inner(args, &[], true).await
    }

    /// Starts a broker with extra arguments and environment variables
    /// (which win over the harness's own, `RUST_LOG` included), its stderr
    /// captured when `capture_stderr`.
    pub async fn start_with_options(args: &[&str], envs: &[(&str, &str)], capture_stderr: bool) -> Result<TestBroker> {
        TestBroker::start_inner(args, envs, capture_stderr).await
    }

    async fn start_inner(args: &[&str], envs: &[(&str, &str)], capture_stderr: bool) -> Result<TestBroker> {
        let data = tempfile::Builder::new().prefix("warren-test-").tempdir().context("cannot create a temp dir")?;
        let stderr_log = capture_stderr.then(|| data.path().join("stderr.log"));
        let mut b = TestBroker {
            child: None,
            data,
            extra: args.iter().map(|s| s.to_string()).collect(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            stderr_log,
            addr: String::new(),
            http_addr: String::new(),
            cluster_addr: None,
            stdout: Vec::new(),
        };
        b.spawn().await?;
        Ok(b)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the broker wrote to stderr so far (empty unless started with
    /// [`start_capturing_stderr`](Self::start_capturing_stderr)).
    pub fn stderr(&self) -> String {
        self.stderr_log.as_ref().and_then(|p| std::fs::read(p).ok()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Whether the process is still running (it has not exited or been
    /// killed).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    async fn spawn(&mut self) -> Result<()> {
        let bin = broker_bin()?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--data-dir")
            .arg(self.data.path().join("data"))
            // A restarted broker listens where it did before, as a pod
            // behind its stable DNS name does: clients given several
            // nodes' addresses find it again.
            .args(["--grpc-addr", if self.addr.is_empty() { "127.0.0.1:0" } else { self.addr.as_str() }])
            .args(["--http-addr", if self.http_addr.is_empty() { "127.0.0.1:0" } else { self.http_addr.as_str() }])
            .args(&self.extra)
            .env_remove("WARREN_CONFIG")
            .env("RUST_LOG", std::env::var("WARREN_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match &self.stderr_log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                cmd.stderr(Stdio::from(file));
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        // Read lines on a thread until the ready line; keep draining after so
        // the broker never blocks on a full pipe.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens, keep draining.
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        self.stdout.clear();
        self.child = Some(child);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the broker did not print its ready line within {START_TIMEOUT:?}; output so far: {:?}", self.stdout);
            }
            let line = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.recv()).await;
            match line {
                Ok(Some(line)) => {
                    if let Some(addr) = line.strip_prefix("warren-broker ready: grpc=") {
                        self.addr = addr.split_whitespace().next().unwrap_or(addr).to_string();
                        self.http_addr = line
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("http="))
                            .ok_or_else(|| anyhow!("the ready line names no http= address: {line}"))?
                            .to_string();
                        self.cluster_addr = line.split_whitespace().find_map(|w| w.strip_prefix("cluster=")).map(str::to_string);
                        self.stdout.push(line);
                        return Ok(());
                    }
                    self.stdout.push(line);
                }
                Err(_) => {
                    if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                        bail!("the broker exited with {status} before it was ready; output: {:?}", self.stdout);
                    }
                }
                Ok(None) => {
                    let status = self.child.as_mut().map(|c| c.wait());
                    bail!("the broker closed its stdout before it was ready ({status:?}); output: {:?}", self.stdout);
                }
            }
        }
    }

    /// A new client connection.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(self.url()).await?)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stays, but answers nothing until
    /// [`resume`](Self::resume) (a hung node, a long GC pause).
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("the broker is not running"))?;
        let status = Command::new("kill").args([sig, &pid.to_string()]).status().context("cannot run kill")?;
        if !status.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns whether it
    /// exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut c) = self.child.take() else { return Ok(true) };
        let status = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("the broker did not stop within 60s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the broker again on the same data directory (after
    /// [`kill`](Self::kill) or [`stop`](Self::stop)), on the same addresses.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// The broker's resident set size, from /proc.
    pub fn rss_bytes(&self) -> Option<u64> {
        self.proc_status_bytes("VmRSS:")
    }

    /// The broker's peak resident set size since it started (`VmHWM`), from
    /// /proc.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.proc_status_bytes("VmHWM:")
    }

    /// A size field (in kB) of the broker's /proc status, in bytes.
    fn proc_status_bytes(&self, field: &str) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// `GET path` on the broker's HTTP server: (status code, body).
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.http_addr, path).await
    }

    /// `GET path` with extra request headers.
    pub async fn http_get_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        http_request(&self.http_addr, path, headers).await
    }

    /// The broker's metrics as Prometheus scrapes them (it asks for
    /// OpenMetrics first).
    pub async fn metrics(&self) -> Result<String> {
        let r = self.http_get_with("/metrics", &[("Accept", PROMETHEUS_SCRAPE_ACCEPT)]).await?;
        if r.code != 200 {
            bail!("GET /metrics answered {}: {}", r.code, r.body);
        }
        Ok(r.body)
    }

    /// Runs `warrenctl --server <this broker> args...`.
    pub fn warrenctl(&self, args: &[&str]) -> Result<CtlOutput> {
        self.warrenctl_stdin(args, None)
    }

    /// Runs `warrenctl` with `stdin` as its standard input.
    pub fn warrenctl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<CtlOutput> {
        run_warrenctl(&self.url(), args, stdin)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        // A paused process would not die of SIGTERM; SIGKILL works anyway.
        self.kill();
    }
}

/// Free TCP ports on 127.0.0.1 (bound, read, released: another process
/// could take one meanwhile, which a test then reports as a failed start).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>().context("cannot find a free port")?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// N broker processes forming one cluster on 127.0.0.1: node ids 1..=N,
/// each with its own data directory and a fixed cluster port (so that a
/// restarted node keeps its address), gRPC and HTTP on free ports.
pub struct TestCluster {
    nodes: Vec<TestBroker>,
    /// The `--peers` value every node got.
    pub peers: String,
    /// Nodes removed by [`remove_last_node`](Self::remove_last_node), last
    /// removed last, with their `--peers` entry: stopped, data kept.
    removed: Vec<(TestBroker, String)>,
}

impl TestCluster {
    /// Starts `n` nodes.
    pub async fn start(n: usize) -> Result<TestCluster> {
        TestCluster::start_with(n, &[]).await
    }

    /// Starts `n` nodes, each with extra arguments.
    pub async fn start_with(n: usize, args: &[&str]) -> Result<TestCluster> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        TestCluster::start_each(n, |_| args.clone()).await
    }

    /// Starts `n` nodes, node `id` with the extra arguments `args(id)`.
    pub async fn start_each(n: usize, args: impl Fn(u64) -> Vec<String>) -> Result<TestCluster> {
        TestCluster::start_inner(n, args, &[], false).await
    }

    /// Starts `n` nodes with extra arguments and environment variables
    /// (`RUST_LOG` included), each node's stderr captured when
    /// `capture_stderr` (read back with [`TestBroker::stderr`]).
    pub async fn start_with_options(n: usize, args: &[&str], envs: &[(&str, &str)], capture_stderr: bool) -> Result<TestCluster> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        TestCluster::start_inner(n, |_| args.clone(), envs, capture_stderr).await
    }

    async fn start_inner(n: usize, args: impl Fn(u64) -> Vec<String>, envs: &[(&str, &str)], capture_stderr: bool) -> Result<TestCluster> {
        let ports = free_ports(n)?;
        let peers = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",");
        let starts = ports.iter().enumerate().map(|(i, port)| {
            let mut all: Vec<String> = vec![
                "--node-id".into(),
                (i + 1).to_string(),
                "--cluster-addr".into(),
                format!("127.0.0.1:{port}"),
                "--peers".into(),
                peers.clone(),
            ];
            all.extend(args(i as u64 + 1));
            async move {
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                TestBroker::start_with_options(&refs, envs, capture_stderr).await
            }
        });
        // All at once, as a StatefulSet with parallel pod management does.
        let started = futures::future::join_all(starts).await;
        let nodes = started.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(TestCluster { nodes, peers, removed: Vec::new() })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Starts node N+1 with `--peers` listing every node, as a StatefulSet
    /// scale-up starts its new pods; the others get the longer list at
    /// their next [`restart`](Self::restart), as the operator's rolling
    /// restart gives it to the old pods. Returns the new node's id.
    pub async fn add_node(&mut self) -> Result<u64> {
        let id = self.nodes.len() as u64 + 1;
        let port = free_ports(1)?[0];
        self.set_peers(format!("{},{id}=127.0.0.1:{port}", self.peers));
        let node_args = |node: &TestBroker| node.extra.iter().skip_while(|a| *a != "--peers").skip(2).cloned().collect::<Vec<_>>();
        let mut all: Vec<String> = vec![
            "--node-id".into(),
            id.to_string(),
            "--cluster-addr".into(),
            format!("127.0.0.1:{port}"),
            "--peers".into(),
            self.peers.clone(),
        ];
        all.extend(self.nodes.first().map(node_args).unwrap_or_default());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let node = TestBroker::start_with(&refs).await?;
        self.nodes.push(node);
        Ok(id)
    }

    /// Kills the last node and leaves it out of every other node's
    /// `--peers` from their next [`restart`](Self::restart) (a scale-down
    /// by one). Its data is kept, as a StatefulSet keeps the volume of a
    /// pod it scaled down: [`bring_back_node`](Self::bring_back_node)
    /// starts it again. Returns its id.
    pub fn remove_last_node(&mut self) -> Result<u64> {
        let id = self.nodes.len() as u64;
        let mut last = self.nodes.pop().ok_or_else(|| anyhow!("no node to remove"))?;
        last.kill();
        let prefix = format!("{id}=");
        let entry = self.peers.split(',').find(|p| p.starts_with(&prefix)).unwrap_or_default().to_string();
        let peers: Vec<&str> = self.peers.split(',').filter(|p| !p.starts_with(&prefix)).collect();
        self.set_peers(peers.join(","));
        self.removed.push((last, entry));
        Ok(id)
    }

    /// Starts the node removed last again, on the data it had, listing
    /// every node; the others list it from their next
    /// [`restart`](Self::restart) (a scale-up onto a retained volume).
    /// Returns its id.
    pub async fn bring_back_node(&mut self) -> Result<u64> {
        let (node, entry) = self.removed.pop().ok_or_else(|| anyhow!("no removed node to bring back"))?;
        self.nodes.push(node);
        self.set_peers(format!("{},{entry}", self.peers));
        let id = self.nodes.len() as u64;
        self.restart(id).await?;
        Ok(id)
    }

    /// The `--peers` every node gets at its next start.
    fn set_peers(&mut self, peers: String) {
        for node in &mut self.nodes {
            if let Some(i) = node.extra.iter().position(|a| a == "--peers") {
                node.extra[i + 1] = peers.clone();
            }
        }
        self.peers = peers;
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node ids, 1..=N.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        1..=self.nodes.len() as u64
    }

    fn index(&self, id: u64) -> Result<usize> {
        let i = usize::try_from(id).ok().and_then(|i| i.checked_sub(1)).filter(|i| *i < self.nodes.len());
        i.ok_or_else(|| anyhow!("no node {id} in a cluster of {}", self.nodes.len()))
    }

    /// The node with id `id` (1-based).
    pub fn node(&self, id: u64) -> &TestBroker {
        &self.nodes[self.index(id).unwrap_or(0)]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut TestBroker {
        let i = self.index(id).unwrap_or(0);
        &mut self.nodes[i]
    }

    /// SIGKILL of node `id`.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        self.nodes[i].kill();
        Ok(())
    }

    /// Starts node `id` again on its data and cluster port.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        self.nodes[i].restart().await
    }

    /// SIGSTOP of node `id`.
    pub fn pause(&self, id: u64) -> Result<()> {
        self.nodes[self.index(id)?].pause()
    }

    /// SIGCONT of node `id`.
    pub fn resume(&self, id: u64) -> Result<()> {
        self.nodes[self.index(id)?].resume()
    }

    /// Which members node `id` sees alive (from its `/metrics`).
    pub async fn peers_up(&self, id: u64) -> Result<std::collections::BTreeMap<u64, bool>> {
        let text = self.node(id).metrics().await?;
        let mut up = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("warren_cluster_peer_up{")) {
            let node = line.split("node=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|n| n.parse().ok());
            let value = line.rsplit(' ').next().map(str::trim);
            if let Some(node) = node {
                up.insert(node, value == Some("1"));
            }
        }
        Ok(up)
    }

    /// Waits until node `id` sees exactly `alive` as the live members.
    pub async fn wait_for_peers(&self, id: u64, alive: &[u64], timeout: Duration) -> Result<()> {
        let want: std::collections::BTreeSet<u64> = alive.iter().copied().collect();
        eventually(timeout, &format!("node {id} to see {want:?} alive"), || async {
            let up = self.peers_up(id).await.ok()?;
            let seen: std::collections::BTreeSet<u64> = up.iter().filter(|(_, a)| **a).map(|(n, _)| *n).collect();
            (seen == want).then_some(())
        })
        .await
    }
}

/// What a `warrenctl` run printed and returned.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Runs `warrenctl --server <server> args...` with a bounded wait.
pub fn run_warrenctl(server: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<CtlOutput> {
    run_warrenctl_env(server, args, stdin, &[])
}

/// Runs `warrenctl` with extra environment variables (`WARREN_PASSWORD`).
pub fn run_warrenctl_env(server: &str, args: &[&str], stdin: Option<&[u8]>, envs: &[(&str, &str)]) -> Result<CtlOutput> {
    use std::io::Write;
    let mut child = Command::new(warrenctl_bin()?)
        .envs(envs.iter().copied())
        .arg("--server")
        .arg(server)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start warrenctl")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)?;
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out?,
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            bail!("warrenctl {args:?} did not finish within 60s");
        }
    };
    Ok(CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The `Accept` header Prometheus 2.x sends when it scrapes.
pub const PROMETHEUS_SCRAPE_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub code: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET (loopback, bounded): (status code, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let r = http_request(addr, path, &[]).await?;
    Ok((r.code, r.body))
}

/// A minimal HTTP/1.1 GET with extra request headers (loopback, bounded).
pub async fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(60), exchange).await.map_err(|_| anyhow!("GET {path} took over 60s"))??;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response: {raw:?}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let code = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok());
    let code = code.ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Ok(HttpResponse { code, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16) else { break };
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest.get(n + 2..).unwrap_or_default();
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, failing after
/// `timeout`. For conditions that become true eventually (a count that
/// settles), never for timing assertions.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy on 127.0.0.1 that can cut the link it stands for: while
/// `partitioned`, bytes stop flowing both ways (connections stay open and
/// silent, as across a real network partition, so peers see timeouts, not
/// resets); healing closes the silent connections, so peers reconnect.
pub struct FaultProxy {
    /// The port clients connect to.
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    partitioned: std::sync::atomic::AtomicBool,
    /// Bumped on every change: connections of an older epoch end.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl FaultProxy {
    /// Forwards `127.0.0.1:PORT` to `target`.
    pub async fn start(target: String) -> Result<FaultProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("proxy listener")?;
        let port = listener.local_addr()?.port();
        let state = std::sync::Arc::new(ProxyState {
            partitioned: std::sync::atomic::AtomicBool::new(false),
            epoch: tokio::sync::watch::channel(0).0,
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                let st = st.clone();
                let target = target.clone();
                tokio::spawn(async move { proxy_one(inbound, target, st).await });
            }
        });
        Ok(FaultProxy { port, state, task })
    }

    /// Cuts (true) or heals (false) the link.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.state.partitioned.store(partitioned, std::sync::atomic::Ordering::SeqCst);
        self.state.epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.epoch.send_modify(|e| *e += 1);
    }
}

async fn proxy_one(mut inbound: tokio::net::TcpStream, target: String, st: std::sync::Arc<ProxyState>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut epoch = st.epoch.subscribe();
    let start = *epoch.borrow_and_update();
    if st.partitioned.load(std::sync::atomic::Ordering::SeqCst) {
        // Accepted, then silent until healed (or the proxy goes).
        let _ = epoch.changed().await;
        return;
    }
    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
    let (mut ri, mut wi) = inbound.split();
    let (mut ro, mut wo) = outbound.split();
    let mut a = [0u8; 16 << 10];
    let mut b = [0u8; 16 << 10];
    loop {
        tokio::select! {
            n = ri.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if wo.write_all(&a[..n]).await.is_err() { return },
            },
            n = ro.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if wi.write_all(&b[..n]).await.is_err() { return },
            },
            _ = epoch.changed() => {
                if *epoch.borrow() == start { continue }
                if st.partitioned.load(std::sync::atomic::Ordering::SeqCst) {
                    // Partitioned: hold both sockets, pass nothing, until healed.
                    let _ = epoch.changed().await;
                }
                return;
            }
        }
    }
}

/// A cluster whose every node-to-node link (i dials j) goes through its own
/// [`FaultProxy`], so that a test can partition any set of nodes.
pub struct PartitionedCluster {
    pub nodes: Vec<TestBroker>,
    /// `proxies[&(i, j)]`: the link node i uses to reach node j.
    pub proxies: std::collections::BTreeMap<(u64, u64), FaultProxy>,
}

impl PartitionedCluster {
    pub async fn start(n: usize) -> Result<PartitionedCluster> {
        let ports = free_ports(n)?;
        let mut proxies = std::collections::BTreeMap::new();
        for i in 1..=n as u64 {
            for j in 1..=n as u64 {
                if i != j {
                    proxies.insert((i, j), FaultProxy::start(format!("127.0.0.1:{}", ports[(j - 1) as usize])).await?);
                }
            }
        }
        let starts = (1..=n as u64).map(|i| {
            let peers = (1..=n as u64)
                .map(|j| {
                    let port = if i == j { ports[(j - 1) as usize] } else { proxies[&(i, j)].port };
                    format!("{j}=127.0.0.1:{port}")
                })
                .collect::<Vec<_>>()
                .join(",");
            let args: Vec<String> = vec![
                "--node-id".into(),
                i.to_string(),
                "--cluster-addr".into(),
                format!("127.0.0.1:{}", ports[(i - 1) as usize]),
                "--peers".into(),
                peers,
            ];
            async move {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                TestBroker::start_with(&refs).await
            }
        });
        let nodes = futures::future::join_all(starts).await.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(PartitionedCluster { nodes, proxies })
    }

    pub fn node(&self, id: u64) -> &TestBroker {
        &self.nodes[(id - 1) as usize]
    }

    /// Cuts every link between `side` and the other nodes (both ways).
    pub fn isolate(&self, side: &[u64]) {
        for ((i, j), p) in &self.proxies {
            if side.contains(i) != side.contains(j) {
                p.set_partitioned(true);
            }
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.set_partitioned(false);
        }
    }
}
