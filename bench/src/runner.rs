//! One run of one workload against one broker: topology, clients, the
//! broker's resource use, and the numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::brokers::{self, WarrenProcess};
use crate::clients::{self, ConsumerStats, Ctx, ProducerStats};
use crate::procfs;
use crate::report::{Backlog, Latency, Resources, RunResult, latency_histogram};
use crate::workload::Workload;

/// A broker under test: one node or a 3-node cluster of either.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// One Warren node, started by the bench per run.
    Warren,
    /// The local RabbitMQ node (`rabbitmq-server`, AMQP port 5672).
    Rabbitmq,
    /// Three Warren nodes (`--node-id`, `--cluster-addr`, `--peers`),
    /// started by the bench per run.
    WarrenCluster,
    /// Three RabbitMQ nodes on this host, clustered with `join_cluster`,
    /// started by the bench for the run and stopped after it.
    RabbitmqCluster,
}

/// The wire protocol (and client library) of a broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC, `warren-client`.
    Warren,
    /// AMQP 0-9-1, `lapin`.
    Amqp,
}

impl BrokerKind {
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Warren => "warren",
            BrokerKind::Rabbitmq => "rabbitmq",
            BrokerKind::WarrenCluster => "warren-cluster",
            BrokerKind::RabbitmqCluster => "rabbitmq-cluster",
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            BrokerKind::Warren | BrokerKind::WarrenCluster => Protocol::Warren,
            BrokerKind::Rabbitmq | BrokerKind::RabbitmqCluster => Protocol::Amqp,
        }
    }

    pub fn is_cluster(self) -> bool {
        matches!(self, BrokerKind::WarrenCluster | BrokerKind::RabbitmqCluster)
    }
}

/// Which cluster node each client connects to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Connect {
    /// Every client on the node that leads the bench queue (RabbitMQ: the
    /// node the queue was declared on, its `client-local` leader
    /// placement): no hop between nodes on the client's path, each
    /// broker's best case.
    #[default]
    Leader,
    /// Clients round-robin over the nodes, starting after the leader: a
    /// 1p1c run has its producer and its consumer on two followers, as
    /// clients behind one Kubernetes Service may land; every message
    /// crosses a node boundary on the way in and on the way out.
    Spread,
}

/// A client's role, for [`Connect::node_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Producer,
    Consumer,
}

impl Connect {
    /// The node (index into the cluster's nodes) that client `index` of
    /// `role` connects to, in a cluster of `nodes` whose bench queue is led
    /// by node `leader`.
    pub fn node_for(self, role: Role, index: usize, leader: usize, nodes: usize) -> usize {
        if nodes <= 1 {
            return 0;
        }
        match self {
            Connect::Leader => leader % nodes,
            Connect::Spread => {
                let offset = match role {
                    Role::Producer => 1,
                    Role::Consumer => 2,
                };
                (leader + offset + index) % nodes
            }
        }
    }
}

/// The broker a run talks to.
pub struct Target {
    pub kind: BrokerKind,
    /// One per node: gRPC URL (Warren) or AMQP URI (RabbitMQ).
    pub endpoints: Vec<String>,
    /// The node that leads the bench queues (or the only node); setup and
    /// clean-up go there.
    pub leader: usize,
    pub connect: Connect,
    /// The broker's processes (one per node), for CPU and memory; empty
    /// means not measured.
    pub pids: Vec<u32>,
    /// The Warren process, when the bench runs a single node (needed for
    /// `--restart`).
    pub process: Option<WarrenProcess>,
    /// Cluster targets: finds the node leading a queue, asked once the
    /// queues are declared (a failure is reported and `leader` kept).
    pub resolve_leader: Option<LeaderLookup>,
}

/// Finds the node (index into `endpoints`) leading a queue.
pub type LeaderLookup = Arc<dyn Fn(&str) -> Result<usize> + Send + Sync>;

impl Target {
    pub fn warren(process: WarrenProcess) -> Target {
        Target::single(BrokerKind::Warren, process.addr.clone(), process.pid(), Some(process))
    }

    pub fn single(kind: BrokerKind, endpoint: String, pid: Option<u32>, process: Option<WarrenProcess>) -> Target {
        Target {
            kind,
            endpoints: vec![endpoint],
            leader: 0,
            connect: Connect::Leader,
            pids: pid.into_iter().collect(),
            process,
            resolve_leader: None,
        }
    }

    /// Where setup, clean-up and queue inspection go.
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.leader.min(self.endpoints.len().saturating_sub(1))]
    }

    fn client_endpoint(&self, role: Role, index: usize) -> String {
        self.endpoints[self.connect.node_for(role, index, self.leader, self.endpoints.len())].clone()
    }

    async fn setup(&self, w: &Workload) -> Result<()> {
        match self.kind.protocol() {
            Protocol::Warren => clients::warren::setup(self.endpoint(), w).await,
            Protocol::Amqp => clients::rabbit::setup(self.endpoint(), w).await,
        }
    }

    async fn cleanup(&self, w: &Workload) -> Result<()> {
        match self.kind.protocol() {
            Protocol::Warren => clients::warren::cleanup(self.endpoint(), w).await,
            Protocol::Amqp => clients::rabbit::cleanup(self.endpoint(), w).await,
        }
    }

    async fn ready(&self, w: &Workload) -> Result<u64> {
        match self.kind.protocol() {
            Protocol::Warren => clients::warren::ready(self.endpoint(), w).await,
            Protocol::Amqp => clients::rabbit::ready(self.endpoint(), w).await,
        }
    }

    fn spawn_producer(&self, w: &Arc<Workload>, index: usize, ctx: &Arc<Ctx>) -> JoinHandle<Result<ProducerStats>> {
        let (e, w, ctx) = (self.client_endpoint(Role::Producer, index), w.clone(), ctx.clone());
        match self.kind.protocol() {
            Protocol::Warren => tokio::spawn(clients::warren::producer(e, w, index, ctx)),
            Protocol::Amqp => tokio::spawn(clients::rabbit::producer(e, w, index, ctx)),
        }
    }

    /// Starts every consumer and waits until each is subscribed.
    async fn spawn_consumers(&self, w: &Arc<Workload>, ctx: &Arc<Ctx>) -> Result<Vec<JoinHandle<Result<ConsumerStats>>>> {
        let mut handles = Vec::new();
        let mut ready = Vec::new();
        for index in 0..w.consumers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (e, w, ctx) = (self.client_endpoint(Role::Consumer, index), w.clone(), ctx.clone());
            handles.push(match self.kind.protocol() {
                Protocol::Warren => tokio::spawn(clients::warren::consumer(e, w, index, ctx, tx)),
                Protocol::Amqp => tokio::spawn(clients::rabbit::consumer(e, w, index, ctx, tx)),
            });
            ready.push(rx);
        }
        for (i, rx) in ready.into_iter().enumerate() {
            if rx.await.is_err() {
                // The consumer failed before subscribing: surface its error.
                let h = handles.remove(i);
                return Err(match h.await {
                    Ok(Err(e)) => e.context("a consumer failed to subscribe"),
                    Ok(Ok(_)) => anyhow!("a consumer ended before subscribing"),
                    Err(e) => anyhow!("a consumer task failed: {e}"),
                });
            }
        }
        Ok(handles)
    }

    /// Restarts the broker (keeping its data); returns the time to ready.
    async fn restart(&mut self) -> Result<Duration> {
        match self.kind {
            BrokerKind::Warren => {
                let mut p = self.process.take().ok_or_else(|| anyhow!("--restart needs a Warren broker started by the bench"))?;
                let (p, took) = tokio::task::spawn_blocking(move || p.restart().map(|t| (p, t))).await??;
                self.endpoints = vec![p.addr.clone()];
                self.pids = p.pid().into_iter().collect();
                self.process = Some(p);
                Ok(took)
            }
            BrokerKind::Rabbitmq => {
                let took = tokio::task::spawn_blocking(brokers::restart_rabbitmq_app).await??;
                self.pids = brokers::rabbitmq_pid().into_iter().collect();
                Ok(took)
            }
            BrokerKind::WarrenCluster | BrokerKind::RabbitmqCluster => {
                Err(anyhow!("--restart is for single nodes (the cluster scenarios kill nodes instead)"))
            }
        }
    }
}

/// Samples the broker's RSS every 100 ms and keeps the highest value (for
/// a cluster: the highest sum over its nodes' processes).
struct Monitor {
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// The summed RSS of `pids`, MiB (none when no process could be read).
pub fn total_rss_mib(pids: &[u32]) -> Option<f64> {
    let v: Vec<f64> = pids.iter().filter_map(|p| procfs::rss_mib(*p)).collect();
    if v.is_empty() { None } else { Some(v.iter().sum()) }
}

impl Monitor {
    fn start(pids: &[u32]) -> Monitor {
        let pids = Arc::new(std::sync::Mutex::new(pids.to_vec()));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for p in pids_of(&pids) {
            procfs::reset_peak_rss(p);
        }
        let task = {
            let (pids, peak, stop) = (pids.clone(), peak_kib.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = total_rss_mib(&pids_of(&pids)) {
                        peak.fetch_max((rss * 1024.0) as u64, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Monitor { pids, peak_kib, stop, task }
    }

    /// The peak so far (sampled, or for one process the kernel's mark if
    /// higher), MiB; then starts a new peak.
    fn take_peak(&self) -> f64 {
        let sampled = self.peak_kib.swap(0, Ordering::Relaxed) as f64 / 1024.0;
        let pids = pids_of(&self.pids);
        // The kernel's per-process marks add up to more than the peak of
        // the sum; only a single process's mark is comparable.
        let kernel = match pids.as_slice() {
            [p] => procfs::peak_rss_mib(*p).unwrap_or(0.0),
            _ => 0.0,
        };
        for p in pids {
            procfs::reset_peak_rss(p);
        }
        sampled.max(kernel)
    }

    fn set_pids(&self, pids: &[u32]) {
        if let Ok(mut g) = self.pids.lock() {
            *g = pids.to_vec();
        }
    }

    async fn finish(self) -> f64 {
        let peak = self.take_peak();
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        peak
    }
}

fn pids_of(pids: &std::sync::Mutex<Vec<u32>>) -> Vec<u32> {
    pids.lock().map(|g| g.clone()).unwrap_or_default()
}

/// CPU seconds of the broker (summed over its processes) and of this
/// process, now.
pub fn cpu_now(pids: &[u32]) -> (f64, f64) {
    (pids.iter().filter_map(|p| procfs::cpu_seconds(*p)).sum(), procfs::cpu_seconds(std::process::id()).unwrap_or(0.0))
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

async fn join_all<T>(handles: Vec<JoinHandle<Result<T>>>, what: &str) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.with_context(|| format!("a {what} task panicked"))?.with_context(|| format!("a {what} failed"))?);
    }
    Ok(out)
}

/// Runs `w` against `target`: declares the topology, runs, deletes it.
pub async fn run(target: &mut Target, w: &Workload) -> Result<RunResult> {
    w.validate().map_err(|e| anyhow!(e))?;
    let w = Arc::new(w.clone());
    target.setup(&w).await.with_context(|| format!("setting up the topology on {}", target.kind.name()))?;
    if let Some(lookup) = target.resolve_leader.clone() {
        let queue = w.queue_name(0);
        match tokio::task::spawn_blocking(move || lookup(&queue)).await? {
            Ok(leader) if leader < target.endpoints.len() => {
                if leader != target.leader {
                    eprintln!("note: {} leads the bench queue from node {}", target.kind.name(), leader + 1);
                }
                target.leader = leader;
            }
            Ok(leader) => eprintln!("warning: leader index {leader} out of range; clients use node {}", target.leader + 1),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    let result = if w.backlog.is_some() { run_backlog(target, &w).await } else { run_steady(target, &w).await };
    if let Err(e) = target.cleanup(&w).await {
        eprintln!("warning: cleaning up after the run on {} failed: {e:#}", target.kind.name());
    }
    result
}

/// The confirm latencies of every producer and the end-to-end latencies of
/// every consumer, each merged into one histogram.
fn merged_latencies(producers: &[ProducerStats], consumers: &[ConsumerStats]) -> Result<(Histogram<u64>, Histogram<u64>)> {
    let mut confirm = latency_histogram();
    let mut e2e = latency_histogram();
    for p in producers {
        confirm.add(&p.confirm_latency)?;
    }
    for c in consumers {
        e2e.add(&c.latency)?;
    }
    Ok((confirm, e2e))
}

async fn run_steady(target: &mut Target, w: &Arc<Workload>) -> Result<RunResult> {
    let monitor = Monitor::start(&target.pids);
    let ctx = Arc::new(Ctx::new());
    let consumers = target.spawn_consumers(w, &ctx).await?;
    let duration = if w.count.is_some() { None } else { Some(w.duration) };
    let from_ns = ctx.start(w.warmup, duration);
    let cpu_start = {
        let (ctx, pids) = (ctx.clone(), target.pids.clone());
        tokio::spawn(async move {
            let wait = from_ns.saturating_sub(ctx.now_ns());
            tokio::time::sleep(Duration::from_nanos(wait)).await;
            cpu_now(&pids)
        })
    };
    let producers: Vec<_> = (0..w.producers).map(|i| target.spawn_producer(w, i, &ctx)).collect();
    let producers = join_all(producers, "producer").await;
    let (confirmed, nacked) = match &producers {
        Ok(p) => (p.iter().map(|s| s.confirmed).sum::<u64>(), p.iter().map(|s| s.nacked).sum::<u64>()),
        Err(_) => (0, 0),
    };
    let expected = confirmed * w.exchange.copies(w.queues);
    // Even when a producer failed, let the consumers end.
    ctx.producers_finished(if producers.is_ok() { expected } else { 0 }, w.drain_timeout);
    let consumers = join_all(consumers, "consumer").await?;
    let producers = producers?;
    let (cpu1, self1) = cpu_now(&target.pids);
    let (cpu0, self0) = cpu_start.await?;
    let peak = monitor.finish().await;

    let (confirm, e2e) = merged_latencies(&producers, &consumers)?;
    let measured_pub: u64 = producers.iter().map(|p| p.measured).sum();
    let measured_con: u64 = consumers.iter().map(|c| c.measured).sum();
    let pub_end = producers.iter().map(|p| p.last_confirm_ns).max().unwrap_or(0);
    let con_end = consumers.iter().map(|c| c.last_receive_ns).max().unwrap_or(0);
    let consumed: u64 = consumers.iter().map(|c| c.received).sum();
    let rate = |n: u64, end: u64| if end > from_ns { n as f64 / secs(end - from_ns) } else { 0.0 };
    Ok(RunResult {
        broker: target.kind.name().into(),
        publish_rate: rate(measured_pub, pub_end),
        consume_rate: rate(measured_con, con_end),
        published: confirmed,
        consumed,
        nacked,
        lost: expected.saturating_sub(consumed),
        window_s: secs(con_end.max(pub_end).saturating_sub(from_ns)),
        end_to_end: Latency::from_histogram(&e2e),
        confirm: Latency::from_histogram(&confirm),
        resources: Resources { broker_cpu_s: cpu1 - cpu0, broker_peak_rss_mib: peak, client_cpu_s: self1 - self0 },
        backlog: None,
    })
}

async fn run_backlog(target: &mut Target, w: &Arc<Workload>) -> Result<RunResult> {
    let total = w.backlog.unwrap_or(0);
    let monitor = Monitor::start(&target.pids);
    let (cpu0, self0) = cpu_now(&target.pids);
    let ctx = Arc::new(Ctx::new());
    ctx.start(Duration::ZERO, None);
    let fill_started = Instant::now();
    let producers: Vec<_> = (0..w.producers).map(|i| target.spawn_producer(w, i, &ctx)).collect();
    let producers = join_all(producers, "producer").await?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    let confirmed: u64 = producers.iter().map(|p| p.confirmed).sum();
    let nacked: u64 = producers.iter().map(|p| p.nacked).sum();
    let expected = confirmed * w.exchange.copies(w.queues);
    // Let the broker settle (background flushes) before reading its RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_fill = total_rss_mib(&target.pids).unwrap_or(0.0);
    let peak_fill = monitor.take_peak();
    let mut backlog = Backlog {
        messages: total,
        fill_rate: confirmed as f64 / fill_s,
        fill_s,
        rss_after_fill_mib: rss_after_fill,
        peak_rss_fill_mib: peak_fill,
        ..Backlog::default()
    };
    let mut cpu_before_restart = None;
    if w.restart {
        let (c, _) = cpu_now(&target.pids);
        cpu_before_restart = Some(c - cpu0);
        let took = target.restart().await?;
        monitor.set_pids(&target.pids);
        backlog.restart_s = Some(took.as_secs_f64());
        backlog.rss_after_restart_mib = total_rss_mib(&target.pids);
        let ready = target.ready(w).await?;
        if ready != expected {
            eprintln!("warning: {} holds {ready} ready messages after the restart; {expected} were confirmed", target.kind.name());
        }
    }
    let (cpu_drain0, _) = cpu_now(&target.pids);
    ctx.producers_finished(expected, w.drain_timeout);
    let drain_started_ns = ctx.now_ns();
    let consumers = target.spawn_consumers(w, &ctx).await?;
    let consumers = join_all(consumers, "consumer").await?;
    let (cpu1, self1) = cpu_now(&target.pids);
    let peak_drain = monitor.finish().await;
    let consumed: u64 = consumers.iter().map(|c| c.received).sum();
    let drain_end = consumers.iter().map(|c| c.last_receive_ns).max().unwrap_or(drain_started_ns);
    backlog.drain_s = secs(drain_end.saturating_sub(drain_started_ns));
    backlog.drain_rate = if backlog.drain_s > 0.0 { consumed as f64 / backlog.drain_s } else { 0.0 };
    backlog.peak_rss_drain_mib = peak_drain;
    let broker_cpu = match cpu_before_restart {
        Some(before) => before + (cpu1 - cpu_drain0),
        None => cpu1 - cpu0,
    };
    let (confirm, e2e) = merged_latencies(&producers, &consumers)?;
    Ok(RunResult {
        broker: target.kind.name().into(),
        publish_rate: backlog.fill_rate,
        consume_rate: backlog.drain_rate,
        published: confirmed,
        consumed,
        nacked,
        lost: expected.saturating_sub(consumed),
        window_s: backlog.fill_s + backlog.drain_s,
        end_to_end: Latency::from_histogram(&e2e),
        confirm: Latency::from_histogram(&confirm),
        resources: Resources { broker_cpu_s: broker_cpu, broker_peak_rss_mib: peak_fill.max(peak_drain), client_cpu_s: self1 - self0 },
        backlog: Some(backlog),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_put_every_client_on_the_leader_by_default() {
        for i in 0..5 {
            assert_eq!(Connect::Leader.node_for(Role::Producer, i, 2, 3), 2);
            assert_eq!(Connect::Leader.node_for(Role::Consumer, i, 2, 3), 2);
        }
        // A single node: always node 0.
        assert_eq!(Connect::Spread.node_for(Role::Consumer, 3, 0, 1), 0);
    }

    #[test]
    fn should_spread_clients_starting_after_the_leader() {
        // 1p1c with leader 0: producer on node 1, consumer on node 2.
        assert_eq!(Connect::Spread.node_for(Role::Producer, 0, 0, 3), 1);
        assert_eq!(Connect::Spread.node_for(Role::Consumer, 0, 0, 3), 2);
        // 4 producers with leader 1: nodes 2, 0, 1, 2.
        let p: Vec<usize> = (0..4).map(|i| Connect::Spread.node_for(Role::Producer, i, 1, 3)).collect();
        assert_eq!(p, vec![2, 0, 1, 2]);
    }

    #[test]
    fn should_name_brokers_as_the_flags_do() {
        use clap::ValueEnum;
        for k in [BrokerKind::Warren, BrokerKind::Rabbitmq, BrokerKind::WarrenCluster, BrokerKind::RabbitmqCluster] {
            assert_eq!(BrokerKind::from_str(k.name(), false), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.name()));
        }
        assert!(BrokerKind::RabbitmqCluster.is_cluster() && !BrokerKind::Rabbitmq.is_cluster());
        assert_eq!(BrokerKind::WarrenCluster.protocol(), Protocol::Warren);
    }
}
