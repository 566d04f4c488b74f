//! `warren-bench compare`: the standard suite against both brokers in one
//! run, alternating brokers run by run, with medians and Warren / RabbitMQ
//! ratios, and the targets checked against them.
//!
//! The suite has two scopes. Single-node entries run on `warren` and
//! `rabbitmq`; cluster entries (`quorum-*`, `failover`, `idle-queues`) run
//! on `warren-cluster` and `rabbitmq-cluster` (3 nodes each, quorum
//! queues). `--brokers` picks the brokers and so the entries; naming both
//! scopes shows single-node and cluster figures in one run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::brokers::{self, WarrenProcess};
use crate::cluster::{RabbitCluster, WarrenCluster};
use crate::failover::{self, FailoverResult};
use crate::idle::{self, IdleResult};
use crate::report::{self, RunResult, Summary, fmt_num, ratio};
use crate::runner::{self, BrokerKind, Connect, Target};
use crate::workload::{ExchangeType, QueueType, Workload, parse_duration};

#[derive(Clone, Debug, Args, Serialize)]
pub struct CompareArgs {
    /// Runs of each suite entry per broker; tables show medians.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Publishing time of each steady-state run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(skip)]
    pub duration: Duration,
    /// Leading part of each steady-state run left out of the numbers.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(skip)]
    pub warmup: Duration,
    /// Messages of the backlog entry (fill, restart, drain).
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: u64,
    /// Runs of the backlog entry per broker (default: --runs).
    #[arg(long)]
    pub backlog_runs: Option<usize>,
    /// Only these suite entries (comma-separated names; see --list).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print the suite and exit.
    #[arg(long)]
    pub list: bool,
    /// Brokers to run (comma-separated): `warren`, `rabbitmq` (single
    /// nodes: the single-node entries), `warren-cluster`, `rabbitmq-cluster`
    /// (3 nodes each on this host: the cluster entries).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "warren,rabbitmq")]
    pub brokers: Vec<BrokerKind>,
    /// Cluster entries: which node clients connect to (`quorum-4p4c-spread`
    /// always spreads).
    #[arg(long, value_enum, default_value_t = Connect::Leader)]
    pub connect: Connect,
    /// Failover entry: leader kills per broker.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Idle-queues entry: quorum queues to declare.
    #[arg(long, default_value_t = 1000)]
    pub idle_queues: usize,
    /// Idle-queues entry: the window each node's CPU is measured over.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(skip)]
    pub idle_window: Duration,
    /// Unconfirmed messages per producer, both brokers.
    #[arg(long, default_value_t = 256)]
    pub confirm_window: usize,
    /// Unacknowledged deliveries per consumer, both brokers.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u32,
    /// Where to write every run and the medians as JSON.
    #[arg(long, default_value = "warren-bench-results.json")]
    #[serde(skip)]
    pub json: PathBuf,
    /// The warren-broker binary (default: next to warren-bench).
    #[arg(long)]
    #[serde(skip)]
    pub warren_bin: Option<PathBuf>,
    /// Extra flags for warren-broker (e.g. `--broker-arg=--block-cache-bytes=16777216`).
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    pub broker_args: Vec<String>,
    #[arg(long, default_value = brokers::DEFAULT_AMQP_URI)]
    #[serde(skip)]
    pub amqp_uri: String,
}

/// Which brokers an entry runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `warren` and `rabbitmq`.
    Single,
    /// `warren-cluster` and `rabbitmq-cluster`.
    Cluster,
}

impl Scope {
    pub fn of(kind: BrokerKind) -> Scope {
        if kind.is_cluster() { Scope::Cluster } else { Scope::Single }
    }

    /// The (Warren, RabbitMQ) pair this scope compares.
    pub fn pair(self) -> (BrokerKind, BrokerKind) {
        match self {
            Scope::Single => (BrokerKind::Warren, BrokerKind::Rabbitmq),
            Scope::Cluster => (BrokerKind::WarrenCluster, BrokerKind::RabbitmqCluster),
        }
    }
}

/// What an entry measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Its workload (steady or backlog), `--runs` times per broker.
    Load,
    /// Leader kills ([`failover`]), once per broker (`--kills` kills).
    Failover,
    /// Idle quorum queues ([`idle`]), once per broker.
    IdleQueues,
}

/// One entry of the standard suite.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: &'static str,
    pub description: &'static str,
    pub workload: Workload,
    /// Publish at half of RabbitMQ's median rate in this entry.
    pub half_rate_of: Option<&'static str>,
    pub scope: Scope,
    pub scenario: Scenario,
    /// Cluster entries: where clients connect.
    pub connect: Connect,
}

/// The standard suite: 1 KiB persistent messages, durable queues, confirms
/// and manual acks throughout. Single-node RabbitMQ queues are classic
/// queues version 2 (its faster classic queue); cluster entries use quorum
/// queues on both brokers.
pub fn suite(args: &CompareArgs) -> Vec<Entry> {
    let base = Workload {
        size: 1024,
        confirm_window: args.confirm_window,
        prefetch: args.prefetch,
        duration: args.duration + args.warmup,
        warmup: args.warmup,
        queue_type: QueueType::ClassicV2,
        ..Workload::default()
    };
    let single = |name, description, workload, half_rate_of| Entry {
        name,
        description,
        workload,
        half_rate_of,
        scope: Scope::Single,
        scenario: Scenario::Load,
        connect: Connect::Leader,
    };
    let quorum = Workload { queue_type: QueueType::Quorum, ..base.clone() };
    let cluster = |name, description, workload, half_rate_of, connect| Entry {
        name,
        description,
        workload,
        half_rate_of,
        scope: Scope::Cluster,
        scenario: Scenario::Load,
        connect,
    };
    vec![
        single("1p1c", "1 producer, 1 consumer, 1 queue", base.clone(), None),
        single("1p1c-half-rate", "1p1c at half of RabbitMQ's 1p1c throughput (latency)", base.clone(), Some("1p1c")),
        single("4p4c", "4 producers, 4 consumers, 1 queue", Workload { producers: 4, consumers: 4, ..base.clone() }, None),
        single(
            "fanout10",
            "1 producer, fanout to 10 queues, 1 consumer each (rates count deliveries)",
            Workload { consumers: 10, queues: 10, exchange: ExchangeType::Fanout, ..base.clone() },
            None,
        ),
        single(
            "100q",
            "4 producers round-robin over 100 queues, 1 consumer each",
            Workload { producers: 4, consumers: 100, queues: 100, ..base.clone() },
            None,
        ),
        single(
            "backlog",
            "fill N messages with no consumer, restart the broker, drain",
            Workload {
                backlog: Some(args.backlog),
                restart: true,
                warmup: Duration::ZERO,
                drain_timeout: Duration::from_secs(600),
                ..base
            },
            None,
        ),
        cluster("quorum-1p1c", "3 nodes, 1 quorum queue, 1 producer, 1 consumer", quorum.clone(), None, args.connect),
        cluster(
            "quorum-1p1c-half-rate",
            "quorum-1p1c at half of RabbitMQ's quorum-1p1c throughput (latency)",
            quorum.clone(),
            Some("quorum-1p1c"),
            args.connect,
        ),
        cluster(
            "quorum-4p4c",
            "3 nodes, 1 quorum queue, 4 producers, 4 consumers",
            Workload { producers: 4, consumers: 4, ..quorum.clone() },
            None,
            args.connect,
        ),
        cluster(
            "quorum-4p4c-spread",
            "quorum-4p4c with clients spread over the 3 nodes (most traffic crosses nodes)",
            Workload { producers: 4, consumers: 4, ..quorum.clone() },
            None,
            Connect::Spread,
        ),
        Entry {
            scenario: Scenario::Failover,
            ..cluster(
                "failover",
                "kill -9 of the quorum queue's leader -> first confirm through another node",
                failover::failover_workload(),
                None,
                Connect::Leader,
            )
        },
        Entry {
            scenario: Scenario::IdleQueues,
            ..cluster(
                "idle-queues",
                "declare N idle quorum queues: time, then each node's idle CPU and RSS",
                idle::idle_workload(args.idle_queues),
                None,
                Connect::Leader,
            )
        },
    ]
}

#[derive(Serialize)]
struct EntryResult {
    entry: Entry,
    runs: BTreeMap<&'static str, Vec<RunResult>>,
    median: BTreeMap<&'static str, Summary>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    failover: BTreeMap<&'static str, FailoverResult>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    idle: BTreeMap<&'static str, IdleResult>,
}

impl EntryResult {
    fn new(entry: Entry) -> EntryResult {
        EntryResult { entry, runs: BTreeMap::new(), median: BTreeMap::new(), failover: BTreeMap::new(), idle: BTreeMap::new() }
    }
}

#[derive(Serialize)]
struct Target1 {
    target: &'static str,
    met: Option<bool>,
    detail: String,
}

#[derive(Serialize)]
struct Output<'a> {
    machine: Machine,
    settings: &'a CompareArgs,
    entries: Vec<EntryResult>,
    targets: Vec<Target1>,
}

#[derive(Serialize)]
struct Machine {
    cores: usize,
    kernel: String,
    rabbitmq_version: Option<String>,
    warren_version: &'static str,
}

/// The brokers the bench starts once per comparison (the RabbitMQ
/// cluster: 20-30 s to form), stopped when the comparison ends.
#[derive(Default)]
struct Shared {
    rabbit_cluster: Option<RabbitCluster>,
}

impl Shared {
    async fn rabbit_cluster(&mut self) -> Result<&mut RabbitCluster> {
        if self.rabbit_cluster.is_none() {
            eprintln!("starting a 3-node RabbitMQ cluster on loopback ...");
            let c = tokio::task::spawn_blocking(RabbitCluster::start).await??;
            eprintln!("RabbitMQ cluster up: {}", c.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "));
            self.rabbit_cluster = Some(c);
        }
        self.rabbit_cluster.as_mut().ok_or_else(|| anyhow::anyhow!("no RabbitMQ cluster"))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.rabbit_cluster.take() {
            tokio::task::block_in_place(|| c.stop());
        }
    }
}

async fn start_warren_cluster(args: &CompareArgs) -> Result<WarrenCluster> {
    let bin = args.warren_bin.clone().unwrap_or_else(brokers::default_warren_bin);
    let extra = args.broker_args.clone();
    tokio::task::spawn_blocking(move || WarrenCluster::start(&bin, &extra)).await?
}

async fn one_run(kind: BrokerKind, args: &CompareArgs, entry: &Entry, w: &Workload, shared: &mut Shared) -> Result<RunResult> {
    match kind {
        BrokerKind::Warren => {
            let bin = args.warren_bin.clone().unwrap_or_else(brokers::default_warren_bin);
            let dir = tempfile::Builder::new().prefix("warren-bench-").tempdir().context("cannot create a temp dir")?;
            let data = dir.path().join("data");
            let extra = args.broker_args.clone();
            let (process, _) = tokio::task::spawn_blocking(move || WarrenProcess::start(&bin, &data, &extra)).await??;
            let mut target = Target::warren(process);
            let result = runner::run(&mut target, w).await;
            if let Some(mut p) = target.process.take() {
                tokio::task::spawn_blocking(move || p.stop()).await??;
            }
            result
        }
        BrokerKind::Rabbitmq => {
            let pid = tokio::task::spawn_blocking(brokers::rabbitmq_pid).await?;
            let mut target = Target::single(kind, args.amqp_uri.clone(), pid, None);
            runner::run(&mut target, w).await
        }
        BrokerKind::RabbitmqCluster => {
            let cluster = shared.rabbit_cluster().await?;
            let ctl = cluster.ctl.clone();
            // The queue is declared through node 1; RabbitMQ's default
            // `client-local` placement makes node 1 its leader, which
            // `resolve_leader` checks after the declare.
            let mut target = Target {
                kind,
                endpoints: cluster.endpoints(),
                leader: 0,
                connect: entry.connect,
                pids: cluster.pids(),
                process: None,
                resolve_leader: Some(std::sync::Arc::new(move |q: &str| ctl.leader_of(q, 0))),
            };
            runner::run(&mut target, w).await
        }
        BrokerKind::WarrenCluster => {
            let mut cluster = start_warren_cluster(args).await?;
            let mut target = Target {
                kind,
                endpoints: cluster.endpoints(),
                leader: 0,
                connect: entry.connect,
                pids: cluster.pids(),
                process: None,
                resolve_leader: Some({
                    let endpoints = cluster.endpoints();
                    std::sync::Arc::new(move |q: &str| crate::cluster::warren_leader(&endpoints, q))
                }),
            };
            let result = runner::run(&mut target, w).await;
            tokio::task::spawn_blocking(move || cluster.stop()).await??;
            result
        }
    }
}

async fn failover_run(kind: BrokerKind, args: &CompareArgs, shared: &mut Shared) -> Result<FailoverResult> {
    match kind {
        BrokerKind::RabbitmqCluster => failover::rabbitmq(shared.rabbit_cluster().await?, args.kills).await,
        BrokerKind::WarrenCluster => {
            let mut cluster = start_warren_cluster(args).await?;
            let r = failover::warren(&mut cluster, args.kills).await;
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
            r
        }
        BrokerKind::Warren | BrokerKind::Rabbitmq => bail!("failover needs a cluster"),
    }
}

async fn idle_run(kind: BrokerKind, args: &CompareArgs, w: &Workload, shared: &mut Shared) -> Result<IdleResult> {
    match kind {
        BrokerKind::RabbitmqCluster => {
            let cluster = shared.rabbit_cluster().await?;
            let (uris, pids) = (cluster.endpoints(), cluster.pids());
            idle::run(kind.name(), &pids, w.queues, args.idle_window, |delete| {
                let (uris, w) = (uris.clone(), w.clone());
                async move { idle::rabbitmq_queues(&uris, &w, delete).await }
            })
            .await
        }
        BrokerKind::WarrenCluster => {
            let mut cluster = start_warren_cluster(args).await?;
            let (addrs, pids) = (cluster.endpoints(), cluster.pids());
            let r = idle::run(kind.name(), &pids, w.queues, args.idle_window, |delete| {
                let (addrs, w) = (addrs.clone(), w.clone());
                async move { idle::warren_queues(&addrs, &w, delete).await }
            })
            .await;
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
            r
        }
        BrokerKind::Warren | BrokerKind::Rabbitmq => bail!("idle-queues needs a cluster"),
    }
}

/// The brokers of `args` that `entry` runs on, in `args`' order.
fn brokers_for(entry: &Entry, brokers: &[BrokerKind]) -> Vec<BrokerKind> {
    brokers.iter().copied().filter(|b| Scope::of(*b) == entry.scope).collect()
}

/// Half of the reference broker's median consume rate in `base` (RabbitMQ
/// of the entry's scope, else whichever broker ran it).
fn half_rate(results: &[EntryResult], base: &str, scope: Scope) -> Option<u64> {
    let r = results.iter().find(|r| r.entry.name == base)?;
    let (w, rabbit) = scope.pair();
    let rate = r.median.get(rabbit.name()).or_else(|| r.median.get(w.name()))?.consume_rate;
    (rate > 0.0).then(|| (rate / 2.0).round().max(1.0) as u64)
}

pub async fn compare(args: CompareArgs) -> Result<()> {
    let entries: Vec<Entry> = suite(&args).into_iter().filter(|e| args.only.is_empty() || args.only.iter().any(|o| o == e.name)).collect();
    if args.list {
        for e in suite(&args) {
            let scope = match e.scope {
                Scope::Single => "warren, rabbitmq",
                Scope::Cluster => "warren-cluster, rabbitmq-cluster",
            };
            println!("{:<22} {:<34} {}", e.name, scope, e.description);
        }
        return Ok(());
    }
    if entries.is_empty() {
        bail!("--only matches no suite entry (see --list)");
    }
    if entries.iter().all(|e| brokers_for(e, &args.brokers).is_empty()) {
        bail!(
            "no selected entry runs on --brokers {:?} (single-node entries need warren/rabbitmq, cluster entries warren-cluster/rabbitmq-cluster)",
            args.brokers
        );
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let uses_rabbit = args.brokers.iter().any(|b| matches!(b, BrokerKind::Rabbitmq | BrokerKind::RabbitmqCluster));
    if args.brokers.contains(&BrokerKind::Rabbitmq) {
        tokio::task::spawn_blocking(brokers::ensure_rabbitmq).await??;
    }
    let rabbit_version = if uses_rabbit { tokio::task::spawn_blocking(brokers::rabbitmq_version).await? } else { None };
    let mut shared = Shared::default();
    let outcome = run_entries(&args, entries, &mut shared).await;
    shared.stop();
    let results = outcome?;
    let targets = check_targets(&results);
    println!("{}", render(&results, &targets, args.runs));
    let out = Output {
        machine: Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            rabbitmq_version: rabbit_version,
            warren_version: env!("CARGO_PKG_VERSION"),
        },
        settings: &args,
        entries: results,
        targets,
    };
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?).with_context(|| format!("cannot write {}", args.json.display()))?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}

async fn run_entries(args: &CompareArgs, entries: Vec<Entry>, shared: &mut Shared) -> Result<Vec<EntryResult>> {
    let mut results: Vec<EntryResult> = Vec::new();
    for entry in entries {
        let brokers = brokers_for(&entry, &args.brokers);
        if brokers.is_empty() {
            continue;
        }
        let mut w = entry.workload.clone();
        if let Some(base) = entry.half_rate_of {
            match half_rate(&results, base, entry.scope) {
                Some(rate) => w.rate = rate,
                None => {
                    eprintln!("skipping {}: it needs the results of {base} (run it too)", entry.name);
                    continue;
                }
            }
        }
        let entry = Entry { workload: w.clone(), ..entry };
        let mut result = EntryResult::new(entry.clone());
        match entry.scenario {
            Scenario::Failover => {
                for kind in brokers {
                    eprintln!("[{}] {} ({} kills) ...", entry.name, kind.name(), args.kills);
                    let r = failover_run(kind, args, shared).await.with_context(|| format!("{} on {}", entry.name, kind.name()))?;
                    eprintln!("[{}] {}: median {} s, max {} s", entry.name, kind.name(), fmt_num(r.median_s), fmt_num(r.max_s));
                    result.failover.insert(kind.name(), r);
                }
            }
            Scenario::IdleQueues => {
                for kind in brokers {
                    let r = idle_run(kind, args, &w, shared).await.with_context(|| format!("{} on {}", entry.name, kind.name()))?;
                    result.idle.insert(kind.name(), r);
                }
            }
            Scenario::Load => {
                let runs = if w.backlog.is_some() { args.backlog_runs.unwrap_or(args.runs) } else { args.runs };
                for i in 0..runs {
                    let mut order = brokers.clone();
                    if i % 2 == 1 {
                        order.reverse();
                    }
                    for kind in order {
                        eprintln!("[{} {}/{}] {} ...", entry.name, i + 1, runs, kind.name());
                        let r = one_run(kind, args, &entry, &w, shared)
                            .await
                            .with_context(|| format!("{} run {} on {}", entry.name, i + 1, kind.name()))?;
                        eprintln!(
                            "[{} {}/{}] {}: publish {} msg/s, consume {} msg/s, e2e p99 {} ms, broker CPU {} s, peak RSS {} MiB{}",
                            entry.name,
                            i + 1,
                            runs,
                            kind.name(),
                            fmt_num(r.publish_rate),
                            fmt_num(r.consume_rate),
                            fmt_num(r.end_to_end.p99_ms),
                            fmt_num(r.resources.broker_cpu_s),
                            fmt_num(r.resources.broker_peak_rss_mib),
                            r.backlog.map(|b| format!(", restart {} s", fmt_num(b.restart_s.unwrap_or(f64::NAN)))).unwrap_or_default()
                        );
                        result.runs.entry(kind.name()).or_default().push(r);
                        // Let the disk and the other broker settle between runs.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                result.median = result.runs.iter().map(|(k, v)| (*k, Summary::of(v))).collect();
            }
        }
        results.push(result);
    }
    Ok(results)
}

fn summary<'a>(results: &'a [EntryResult], entry: &str, broker: &str) -> Option<&'a Summary> {
    results.iter().find(|r| r.entry.name == entry)?.median.get(broker)
}

fn check_targets(results: &[EntryResult]) -> Vec<Target1> {
    let mut out = Vec::new();
    let pair = |e: &str, scope: Scope| {
        let (w, r) = scope.pair();
        (summary(results, e, w.name()), summary(results, e, r.name()))
    };
    for (entry, scope, target) in [
        ("1p1c", Scope::Single, "1p1c end-to-end throughput >= 3x RabbitMQ"),
        ("quorum-1p1c", Scope::Cluster, "quorum 1p1c throughput >= 3x RabbitMQ 3-node quorum"),
        ("quorum-4p4c", Scope::Cluster, "quorum 4p4c throughput >= 3x RabbitMQ 3-node quorum"),
    ] {
        if let (Some(w), Some(r)) = pair(entry, scope) {
            let x = ratio(w.consume_rate, r.consume_rate);
            out.push(Target1 {
                target,
                met: Some(x >= 3.0),
                detail: format!("{} vs {} msg/s = {:.2}x", fmt_num(w.consume_rate), fmt_num(r.consume_rate), x),
            });
        }
    }
    for (entry, scope, target) in [
        ("1p1c-half-rate", Scope::Single, "p99 end-to-end latency <= RabbitMQ's at half its max rate"),
        ("quorum-1p1c-half-rate", Scope::Cluster, "quorum p99 end-to-end latency <= RabbitMQ's at half its max rate"),
    ] {
        if let (Some(w), Some(r)) = pair(entry, scope) {
            out.push(Target1 {
                target,
                met: Some(w.e2e_p99_ms <= r.e2e_p99_ms),
                detail: format!("{} ms vs {} ms", fmt_num(w.e2e_p99_ms), fmt_num(r.e2e_p99_ms)),
            });
        }
    }
    if let Some(w) = summary(results, "backlog", "warren") {
        let after = w.backlog_rss_after_fill_mib.unwrap_or(f64::NAN);
        out.push(Target1 {
            target: "backlog: broker RSS <= 150 MiB",
            met: Some(w.broker_peak_rss_mib <= 150.0),
            detail: format!("peak {} MiB over fill and drain, {} MiB with the backlog in", fmt_num(w.broker_peak_rss_mib), fmt_num(after)),
        });
        if let Some(s) = w.backlog_restart_s {
            out.push(Target1 { target: "backlog: restart to ready <= 3 s", met: Some(s <= 3.0), detail: format!("{} s", fmt_num(s)) });
        }
    }
    if let Some(f) = results.iter().find_map(|r| r.failover.get(BrokerKind::WarrenCluster.name())) {
        out.push(Target1 {
            target: "failover: first confirm <= 5 s after kill -9 of the leader (median)",
            met: Some(f.median_s <= 5.0),
            detail: format!("median {} s, max {} s over {} kills", fmt_num(f.median_s), fmt_num(f.max_s), f.kills.len()),
        });
    }
    out
}

/// A table row: its label and how to read it from a summary.
type Metric = (&'static str, fn(&Summary) -> Option<f64>);

const STEADY_METRICS: &[Metric] = &[
    ("publish msg/s", |s| Some(s.publish_rate)),
    ("consume msg/s", |s| Some(s.consume_rate)),
    ("e2e p50 ms", |s| Some(s.e2e_p50_ms)),
    ("e2e p99 ms", |s| Some(s.e2e_p99_ms)),
    ("e2e p99.9 ms", |s| Some(s.e2e_p999_ms)),
    ("e2e max ms", |s| Some(s.e2e_max_ms)),
    ("confirm p50 ms", |s| Some(s.confirm_p50_ms)),
    ("confirm p99 ms", |s| Some(s.confirm_p99_ms)),
    ("broker CPU s", |s| Some(s.broker_cpu_s)),
    ("broker peak RSS MiB", |s| Some(s.broker_peak_rss_mib)),
];

const BACKLOG_METRICS: &[Metric] = &[
    ("fill msg/s", |s| s.backlog_fill_rate),
    ("drain msg/s", |s| s.backlog_drain_rate),
    ("RSS with backlog MiB", |s| s.backlog_rss_after_fill_mib),
    ("peak RSS MiB", |s| Some(s.broker_peak_rss_mib)),
    ("restart to ready s", |s| s.backlog_restart_s),
    ("broker CPU s", |s| Some(s.broker_cpu_s)),
];

fn render(results: &[EntryResult], targets: &[Target1], runs: usize) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut cluster_rows = false;
    for r in results.iter().filter(|r| r.entry.scenario == Scenario::Load) {
        let (wk, rk) = r.entry.scope.pair();
        cluster_rows |= r.entry.scope == Scope::Cluster;
        let w = r.median.get(wk.name());
        let b = r.median.get(rk.name());
        let metrics: &[Metric] = if r.entry.workload.backlog.is_some() { BACKLOG_METRICS } else { STEADY_METRICS };
        let name = if r.entry.workload.rate > 0 {
            format!("{} ({} msg/s)", r.entry.name, r.entry.workload.rate)
        } else {
            r.entry.name.to_string()
        };
        for (i, (metric, f)) in metrics.iter().enumerate() {
            let wv = w.and_then(f);
            let bv = b.and_then(f);
            rows.push(vec![
                if i == 0 { name.clone() } else { String::new() },
                metric.to_string(),
                wv.map_or("-".into(), fmt_num),
                bv.map_or("-".into(), fmt_num),
                match (wv, bv) {
                    (Some(a), Some(c)) => format!("{:.2}", ratio(a, c)),
                    _ => "-".into(),
                },
            ]);
        }
    }
    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&format!("Medians of {runs} run(s) per broker (backlog entry: see JSON for its run count)\n"));
        if cluster_rows {
            out.push_str(
                "quorum-* rows: 3-node clusters with quorum queues (warren-cluster vs rabbitmq-cluster); other rows: single nodes\n",
            );
        }
        out.push_str(&report::table(&["suite entry", "metric", "warren", "rabbitmq", "warren/rabbitmq"], &rows));
    }
    let failover: Vec<Vec<String>> = results
        .iter()
        .flat_map(|r| r.failover.values())
        .map(|f| {
            vec![f.broker.clone(), f.kills.len().to_string(), fmt_num(f.median_s), fmt_num(f.max_s), fmt_num(report::median(&f.restart_s))]
        })
        .collect();
    if !failover.is_empty() {
        out.push_str(
            "\nFailover: kill -9 of the queue's leader -> first confirm of a message published after the kill, through another node\n",
        );
        out.push_str(&report::table(&["broker", "kills", "median s", "max s", "node restart s (median)"], &failover));
    }
    let mut idle_rows: Vec<Vec<String>> = Vec::new();
    for i in results.iter().flat_map(|r| r.idle.values()) {
        for n in &i.nodes {
            idle_rows.push(vec![
                if n.node == 1 { format!("{} ({} queues)", i.broker, i.queues) } else { String::new() },
                n.node.to_string(),
                fmt_num(n.cpu_pct_empty),
                fmt_num(n.cpu_pct),
                fmt_num(n.rss_empty_mib),
                fmt_num(n.rss_mib),
            ]);
        }
        let (c0, c1, r0, r1) = i.totals();
        idle_rows.push(vec![
            format!("  declare {} s, delete {} s", fmt_num(i.declare_s), fmt_num(i.delete_s)),
            "all".into(),
            fmt_num(c0),
            fmt_num(c1),
            fmt_num(r0),
            fmt_num(r1),
        ]);
    }
    if !idle_rows.is_empty() {
        out.push_str(
            "\nIdle quorum queues: each node's CPU (% of one core, over the window) and RSS, with no queue and with the queues idle\n",
        );
        out.push_str(&report::table(
            &["broker", "node", "CPU % empty", "CPU % idle queues", "RSS MiB empty", "RSS MiB idle queues"],
            &idle_rows,
        ));
    }
    if !targets.is_empty() {
        out.push_str("\nTargets\n");
        let rows: Vec<Vec<String>> = targets
            .iter()
            .map(|t| {
                vec![
                    t.target.to_string(),
                    match t.met {
                        Some(true) => "met".into(),
                        Some(false) => "NOT met".into(),
                        None => "-".into(),
                    },
                    t.detail.clone(),
                ]
            })
            .collect();
        out.push_str(&report::table(&["target", "result", "numbers"], &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CompareArgs,
    }

    #[test]
    fn should_build_a_valid_suite_from_flags() {
        let args = Cli::try_parse_from(["x", "--runs", "1", "--duration", "2s", "--warmup", "1s", "--backlog", "1000"]).unwrap().args;
        let s = suite(&args);
        let names: Vec<&str> = s.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            vec![
                "1p1c",
                "1p1c-half-rate",
                "4p4c",
                "fanout10",
                "100q",
                "backlog",
                "quorum-1p1c",
                "quorum-1p1c-half-rate",
                "quorum-4p4c",
                "quorum-4p4c-spread",
                "failover",
                "idle-queues"
            ]
        );
        for e in &s {
            assert!(e.workload.validate().is_ok(), "{}: {:?}", e.name, e.workload.validate());
            assert!(e.workload.persistent());
            let expected = if e.scope == Scope::Single { QueueType::ClassicV2 } else { QueueType::Quorum };
            assert_eq!(e.workload.queue_type, expected, "{}", e.name);
        }
        assert_eq!(s[0].workload.duration, Duration::from_secs(3));
        assert_eq!(s[5].workload.backlog, Some(1000));
        assert_eq!(args.brokers, vec![BrokerKind::Warren, BrokerKind::Rabbitmq]);
        assert_eq!((args.kills, args.idle_queues, args.idle_window), (20, 1000, Duration::from_secs(30)));
        let spread = s.iter().find(|e| e.name == "quorum-4p4c-spread").unwrap();
        assert_eq!(spread.connect, Connect::Spread);
        assert_eq!(s.iter().find(|e| e.name == "quorum-4p4c").unwrap().connect, Connect::Leader);
    }

    #[test]
    fn should_run_each_entry_on_the_brokers_of_its_scope() {
        let args = Cli::try_parse_from(["x", "--brokers", "warren,warren-cluster,rabbitmq-cluster", "--connect", "spread"]).unwrap().args;
        let s = suite(&args);
        let one = s.iter().find(|e| e.name == "1p1c").unwrap();
        assert_eq!(brokers_for(one, &args.brokers), vec![BrokerKind::Warren]);
        let q = s.iter().find(|e| e.name == "quorum-1p1c").unwrap();
        assert_eq!(brokers_for(q, &args.brokers), vec![BrokerKind::WarrenCluster, BrokerKind::RabbitmqCluster]);
        assert_eq!(q.connect, Connect::Spread);
        // The default selection runs no cluster entry.
        let default = Cli::try_parse_from(["x"]).unwrap().args;
        assert!(brokers_for(q, &default.brokers).is_empty());
    }

    #[test]
    fn should_take_half_of_rabbitmqs_rate_in_the_same_scope() {
        let mut single = EntryResult::new(Entry { name: "1p1c", ..suite(&Cli::try_parse_from(["x"]).unwrap().args)[0].clone() });
        single.median.insert("warren", Summary { consume_rate: 30000.0, ..Summary::default() });
        single.median.insert("rabbitmq", Summary { consume_rate: 7657.0, ..Summary::default() });
        let mut quorum = EntryResult::new(Entry { name: "quorum-1p1c", ..single.entry.clone() });
        quorum.median.insert("warren-cluster", Summary { consume_rate: 9000.0, ..Summary::default() });
        quorum.median.insert("rabbitmq-cluster", Summary { consume_rate: 3001.0, ..Summary::default() });
        let results = vec![single, quorum];
        assert_eq!(half_rate(&results, "1p1c", Scope::Single), Some(3829));
        assert_eq!(half_rate(&results, "quorum-1p1c", Scope::Cluster), Some(1501));
        assert_eq!(half_rate(&results, "4p4c", Scope::Single), None);
    }

    #[test]
    fn should_check_targets_against_medians() {
        let mk = |name: &'static str, w: Summary, r: Summary| EntryResult {
            median: BTreeMap::from([("warren", w), ("rabbitmq", r)]),
            ..EntryResult::new(Entry {
                name,
                description: "",
                workload: Workload::default(),
                half_rate_of: None,
                scope: Scope::Single,
                scenario: Scenario::Load,
                connect: Connect::Leader,
            })
        };
        let results = vec![
            mk("1p1c", Summary { consume_rate: 30.0, ..Summary::default() }, Summary { consume_rate: 10.0, ..Summary::default() }),
            mk("1p1c-half-rate", Summary { e2e_p99_ms: 2.0, ..Summary::default() }, Summary { e2e_p99_ms: 1.0, ..Summary::default() }),
        ];
        let t = check_targets(&results);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[1].met, Some(false));
        let text = render(&results, &t, 5);
        assert!(text.contains("3.00"), "{text}");
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json[0]["met"], true);
    }

    #[test]
    fn should_render_failover_and_idle_tables_and_check_failover() {
        let mut f = EntryResult::new(suite(&Cli::try_parse_from(["x"]).unwrap().args).into_iter().find(|e| e.name == "failover").unwrap());
        let t = |s: f64| failover::Timing { to_first_confirm_s: s, attempts: 2, failed: 1 };
        f.failover.insert(
            "warren-cluster",
            FailoverResult {
                broker: "warren-cluster".into(),
                kills: vec![t(1.0), t(2.0), t(9.0)],
                restart_s: vec![0.5],
                ..Default::default()
            }
            .finish(),
        );
        let mut i = EntryResult::new(Entry { name: "idle-queues", scenario: Scenario::IdleQueues, ..f.entry.clone() });
        let node = |n: usize| idle::NodeIdle { node: n, cpu_pct_empty: 0.5, rss_empty_mib: 100.0, cpu_pct: 1.5, rss_mib: 150.0 };
        i.idle.insert(
            "rabbitmq-cluster",
            IdleResult {
                broker: "rabbitmq-cluster".into(),
                queues: 1000,
                declare_s: 12.5,
                nodes: vec![node(1), node(2), node(3)],
                ..Default::default()
            },
        );
        let results = vec![f, i];
        let targets = check_targets(&results);
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].met, Some(true));
        let text = render(&results, &targets, 1);
        assert!(text.contains("warren-cluster") && text.contains("2.00") && text.contains("9.00"), "{text}");
        assert!(text.contains("rabbitmq-cluster (1000 queues)") && text.contains("declare 12.50 s"), "{text}");
        assert!(text.contains("450.0"), "{text}");
    }
}
