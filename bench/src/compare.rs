//! `warren-bench compare`: the standard suite against both brokers in one
//! run, alternating brokers run by run, with medians and Warren / RabbitMQ
//! ratios, and the targets checked against them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::brokers::{self, WarrenProcess};
use crate::report::{self, RunResult, Summary, fmt_num, ratio};
use crate::runner::{self, BrokerKind, Target};
use crate::workload::{ExchangeType, Workload, parse_duration};

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
    /// Brokers to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "warren,rabbitmq")]
    pub brokers: Vec<BrokerKind>,
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

/// One entry of the standard suite.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: &'static str,
    pub description: &'static str,
    pub workload: Workload,
    /// Publish at half of RabbitMQ's median rate in this entry.
    pub half_rate_of: Option<&'static str>,
}

/// The standard suite: 1 KiB persistent messages, durable queues, confirms
/// and manual acks throughout.
pub fn suite(args: &CompareArgs) -> Vec<Entry> {
    let base = Workload {
        size: 1024,
        confirm_window: args.confirm_window,
        prefetch: args.prefetch,
        duration: args.duration + args.warmup,
        warmup: args.warmup,
        ..Workload::default()
    };
    vec![
        Entry { name: "1p1c", description: "1 producer, 1 consumer, 1 queue", workload: base.clone(), half_rate_of: None },
        Entry {
            name: "1p1c-half-rate",
            description: "1p1c at half of RabbitMQ's 1p1c throughput (latency)",
            workload: base.clone(),
            half_rate_of: Some("1p1c"),
        },
        Entry {
            name: "4p4c",
            description: "4 producers, 4 consumers, 1 queue",
            workload: Workload { producers: 4, consumers: 4, ..base.clone() },
            half_rate_of: None,
        },
        Entry {
            name: "fanout10",
            description: "1 producer, fanout to 10 queues, 1 consumer each (rates count deliveries)",
            workload: Workload { consumers: 10, queues: 10, exchange: ExchangeType::Fanout, ..base.clone() },
            half_rate_of: None,
        },
        Entry {
            name: "100q",
            description: "4 producers round-robin over 100 queues, 1 consumer each",
            workload: Workload { producers: 4, consumers: 100, queues: 100, ..base.clone() },
            half_rate_of: None,
        },
        Entry {
            name: "backlog",
            description: "fill N messages with no consumer, restart the broker, drain",
            workload: Workload {
                backlog: Some(args.backlog),
                restart: true,
                warmup: Duration::ZERO,
                drain_timeout: Duration::from_secs(600),
                ..base
            },
            half_rate_of: None,
        },
    ]
}

#[derive(Serialize)]
struct EntryResult {
    entry: Entry,
    runs: BTreeMap<&'static str, Vec<RunResult>>,
    median: BTreeMap<&'static str, Summary>,
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

async fn one_run(kind: BrokerKind, args: &CompareArgs, w: &Workload) -> Result<RunResult> {
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
            let pid = brokers::rabbitmq_pid();
            let mut target = Target { kind, endpoint: args.amqp_uri.clone(), pid, process: None };
            runner::run(&mut target, w).await
        }
    }
}

pub async fn compare(args: CompareArgs) -> Result<()> {
    let entries: Vec<Entry> = suite(&args).into_iter().filter(|e| args.only.is_empty() || args.only.iter().any(|o| o == e.name)).collect();
    if args.list {
        for e in suite(&args) {
            println!("{:<16} {}", e.name, e.description);
        }
        return Ok(());
    }
    if entries.is_empty() {
        bail!("--only matches no suite entry (see --list)");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let rabbit_version = if args.brokers.contains(&BrokerKind::Rabbitmq) {
        tokio::task::spawn_blocking(brokers::ensure_rabbitmq).await??;
        brokers::rabbitmq_version()
    } else {
        None
    };
    let mut results: Vec<EntryResult> = Vec::new();
    for entry in entries {
        let mut w = entry.workload.clone();
        if let Some(base) = entry.half_rate_of {
            let reference = results
                .iter()
                .find(|r| r.entry.name == base)
                .and_then(|r| r.median.get("rabbitmq").or_else(|| r.median.get("warren")))
                .map(|s| s.consume_rate);
            match reference {
                Some(rate) if rate > 0.0 => w.rate = (rate / 2.0).round().max(1.0) as u64,
                _ => {
                    eprintln!("skipping {}: it needs the results of {base} (run it too)", entry.name);
                    continue;
                }
            }
        }
        let runs = if w.backlog.is_some() { args.backlog_runs.unwrap_or(args.runs) } else { args.runs };
        let mut by_broker: BTreeMap<&'static str, Vec<RunResult>> = BTreeMap::new();
        for i in 0..runs {
            let mut order = args.brokers.clone();
            if i % 2 == 1 {
                order.reverse();
            }
            for kind in order {
                eprintln!("[{} {}/{}] {} ...", entry.name, i + 1, runs, kind.name());
                let r = one_run(kind, &args, &w).await.with_context(|| format!("{} run {} on {}", entry.name, i + 1, kind.name()))?;
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
                by_broker.entry(kind.name()).or_default().push(r);
                // Let the disk and the other broker settle between runs.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let median = by_broker.iter().map(|(k, v)| (*k, Summary::of(v))).collect();
        let entry = Entry { workload: w, ..entry };
        results.push(EntryResult { entry, runs: by_broker, median });
    }
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

fn summary<'a>(results: &'a [EntryResult], entry: &str, broker: &str) -> Option<&'a Summary> {
    results.iter().find(|r| r.entry.name == entry)?.median.get(broker)
}

fn check_targets(results: &[EntryResult]) -> Vec<Target1> {
    let mut out = Vec::new();
    let pair = |e: &str| (summary(results, e, "warren"), summary(results, e, "rabbitmq"));
    if let (Some(w), Some(r)) = pair("1p1c") {
        let x = ratio(w.consume_rate, r.consume_rate);
        out.push(Target1 {
            target: "1p1c end-to-end throughput >= 3x RabbitMQ",
            met: Some(x >= 3.0),
            detail: format!("{} vs {} msg/s = {:.2}x", fmt_num(w.consume_rate), fmt_num(r.consume_rate), x),
        });
    }
    if let (Some(w), Some(r)) = pair("1p1c-half-rate") {
        out.push(Target1 {
            target: "p99 end-to-end latency <= RabbitMQ's at half its max rate",
            met: Some(w.e2e_p99_ms <= r.e2e_p99_ms),
            detail: format!("{} ms vs {} ms", fmt_num(w.e2e_p99_ms), fmt_num(r.e2e_p99_ms)),
        });
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
    for r in results {
        let w = r.median.get("warren");
        let b = r.median.get("rabbitmq");
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
    let mut out = format!("Medians of {runs} run(s) per broker (backlog entry: see JSON for its run count)\n");
    out.push_str(&report::table(&["suite entry", "metric", "warren", "rabbitmq", "warren/rabbitmq"], &rows));
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
        assert_eq!(names, vec!["1p1c", "1p1c-half-rate", "4p4c", "fanout10", "100q", "backlog"]);
        for e in &s {
            assert!(e.workload.validate().is_ok(), "{}: {:?}", e.name, e.workload.validate());
            assert!(e.workload.persistent());
        }
        assert_eq!(s[0].workload.duration, Duration::from_secs(3));
        assert_eq!(s.last().unwrap().workload.backlog, Some(1000));
        assert_eq!(args.brokers, vec![BrokerKind::Warren, BrokerKind::Rabbitmq]);
    }

    #[test]
    fn should_check_targets_against_medians() {
        let mk = |name: &'static str, w: Summary, r: Summary| EntryResult {
            entry: Entry { name, description: "", workload: Workload::default(), half_rate_of: None },
            runs: BTreeMap::new(),
            median: BTreeMap::from([("warren", w), ("rabbitmq", r)]),
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
}
