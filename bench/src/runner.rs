//! One run of one workload against one broker: topology, clients, the
//! broker's resource use, and the numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Warren,
    Rabbitmq,
}

impl BrokerKind {
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Warren => "warren",
            BrokerKind::Rabbitmq => "rabbitmq",
        }
    }
}

/// The broker a run talks to.
pub struct Target {
    pub kind: BrokerKind,
    /// gRPC URL (Warren) or AMQP URI (RabbitMQ).
    pub endpoint: String,
    /// The broker's pid, for CPU and memory; none means not measured.
    pub pid: Option<u32>,
    /// The Warren process, when the bench runs it (needed for `--restart`).
    pub process: Option<WarrenProcess>,
}

impl Target {
    pub fn warren(process: WarrenProcess) -> Target {
        Target { kind: BrokerKind::Warren, endpoint: process.addr.clone(), pid: process.pid(), process: Some(process) }
    }

    async fn setup(&self, w: &Workload) -> Result<()> {
        match self.kind {
            BrokerKind::Warren => clients::warren::setup(&self.endpoint, w).await,
            BrokerKind::Rabbitmq => clients::rabbit::setup(&self.endpoint, w).await,
        }
    }

    async fn cleanup(&self, w: &Workload) -> Result<()> {
        match self.kind {
            BrokerKind::Warren => clients::warren::cleanup(&self.endpoint, w).await,
            BrokerKind::Rabbitmq => clients::rabbit::cleanup(&self.endpoint, w).await,
        }
    }

    async fn ready(&self, w: &Workload) -> Result<u64> {
        match self.kind {
            BrokerKind::Warren => clients::warren::ready(&self.endpoint, w).await,
            BrokerKind::Rabbitmq => clients::rabbit::ready(&self.endpoint, w).await,
        }
    }

    fn spawn_producer(&self, w: &Arc<Workload>, index: usize, ctx: &Arc<Ctx>) -> JoinHandle<Result<ProducerStats>> {
        let (e, w, ctx) = (self.endpoint.clone(), w.clone(), ctx.clone());
        match self.kind {
            BrokerKind::Warren => tokio::spawn(clients::warren::producer(e, w, index, ctx)),
            BrokerKind::Rabbitmq => tokio::spawn(clients::rabbit::producer(e, w, index, ctx)),
        }
    }

    /// Starts every consumer and waits until each is subscribed.
    async fn spawn_consumers(&self, w: &Arc<Workload>, ctx: &Arc<Ctx>) -> Result<Vec<JoinHandle<Result<ConsumerStats>>>> {
        let mut handles = Vec::new();
        let mut ready = Vec::new();
        for index in 0..w.consumers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (e, w, ctx) = (self.endpoint.clone(), w.clone(), ctx.clone());
            handles.push(match self.kind {
                BrokerKind::Warren => tokio::spawn(clients::warren::consumer(e, w, index, ctx, tx)),
                BrokerKind::Rabbitmq => tokio::spawn(clients::rabbit::consumer(e, w, index, ctx, tx)),
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
                self.endpoint = p.addr.clone();
                self.pid = p.pid();
                self.process = Some(p);
                Ok(took)
            }
            BrokerKind::Rabbitmq => {
                let took = tokio::task::spawn_blocking(brokers::restart_rabbitmq_app).await??;
                self.pid = brokers::rabbitmq_pid();
                Ok(took)
            }
        }
    }
}

/// Samples the broker's RSS every 100 ms and keeps the highest value.
struct Monitor {
    pid: Arc<AtomicU32>,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Monitor {
    fn start(pid: Option<u32>) -> Monitor {
        let pid = Arc::new(AtomicU32::new(pid.unwrap_or(0)));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(p) = pid_of(&pid) {
            procfs::reset_peak_rss(p);
        }
        let task = {
            let (pid, peak, stop) = (pid.clone(), peak_kib.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = pid_of(&pid).and_then(procfs::rss_mib) {
                        peak.fetch_max((rss * 1024.0) as u64, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Monitor { pid, peak_kib, stop, task }
    }

    /// The peak so far (sampled, or the kernel's mark if higher), MiB; then
    /// starts a new peak.
    fn take_peak(&self) -> f64 {
        let sampled = self.peak_kib.swap(0, Ordering::Relaxed) as f64 / 1024.0;
        let kernel = pid_of(&self.pid).and_then(procfs::peak_rss_mib).unwrap_or(0.0);
        if let Some(p) = pid_of(&self.pid) {
            procfs::reset_peak_rss(p);
        }
        sampled.max(kernel)
    }

    fn set_pid(&self, pid: Option<u32>) {
        self.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }

    async fn finish(self) -> f64 {
        let peak = self.take_peak();
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        peak
    }
}

fn pid_of(pid: &AtomicU32) -> Option<u32> {
    match pid.load(Ordering::Relaxed) {
        0 => None,
        p => Some(p),
    }
}

/// CPU seconds of the broker and of this process, now.
fn cpu_now(pid: Option<u32>) -> (f64, f64) {
    (pid.and_then(procfs::cpu_seconds).unwrap_or(0.0), procfs::cpu_seconds(std::process::id()).unwrap_or(0.0))
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
    let monitor = Monitor::start(target.pid);
    let ctx = Arc::new(Ctx::new());
    let consumers = target.spawn_consumers(w, &ctx).await?;
    let duration = if w.count.is_some() { None } else { Some(w.duration) };
    let from_ns = ctx.start(w.warmup, duration);
    let cpu_start = {
        let (ctx, pid) = (ctx.clone(), target.pid);
        tokio::spawn(async move {
            let wait = from_ns.saturating_sub(ctx.now_ns());
            tokio::time::sleep(Duration::from_nanos(wait)).await;
            cpu_now(pid)
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
    let (cpu1, self1) = cpu_now(target.pid);
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
    let monitor = Monitor::start(target.pid);
    let (cpu0, self0) = cpu_now(target.pid);
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
    let rss_after_fill = target.pid.and_then(procfs::rss_mib).unwrap_or(0.0);
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
        let (c, _) = cpu_now(target.pid);
        cpu_before_restart = Some(c - cpu0);
        let took = target.restart().await?;
        monitor.set_pid(target.pid);
        backlog.restart_s = Some(took.as_secs_f64());
        backlog.rss_after_restart_mib = target.pid.and_then(procfs::rss_mib);
        let ready = target.ready(w).await?;
        if ready != expected {
            eprintln!("warning: {} holds {ready} ready messages after the restart; {expected} were confirmed", target.kind.name());
        }
    }
    let (cpu_drain0, _) = cpu_now(target.pid);
    ctx.producers_finished(expected, w.drain_timeout);
    let drain_started_ns = ctx.now_ns();
    let consumers = target.spawn_consumers(w, &ctx).await?;
    let consumers = join_all(consumers, "consumer").await?;
    let (cpu1, self1) = cpu_now(target.pid);
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
