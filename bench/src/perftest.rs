//! `warren-bench perftest`: RabbitMQ's own load tool, PerfTest, against the
//! same RabbitMQ (single node or the bench's 3-node cluster) with the same
//! workload as warren-bench's lapin client, alternating run by run, medians
//! side by side. It answers one question: does lapin's client cost limit
//! RabbitMQ's figures? (If PerfTest, a mature Java client, gets no more out
//! of RabbitMQ, it does not.)
//!
//! `bench/perftest.sh` fetches PerfTest from Maven Central (cached outside
//! the clone, by version) and calls this with its class path.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use crate::brokers;
use crate::cluster::RabbitCluster;
use crate::procfs;
use crate::report::{self, RunResult, fmt_num, median};
use crate::runner::{self, BrokerKind, Target, cpu_now};
use crate::workload::{QueueType, Workload, parse_duration};

#[derive(Clone, Debug, Args, Serialize)]
pub struct PerfTestArgs {
    /// PerfTest's class path (`bench/perftest.sh` fetches it).
    #[arg(long)]
    #[serde(skip)]
    pub classpath: String,
    /// For the report.
    #[arg(long, default_value = "unknown")]
    pub perftest_version: String,
    /// `rabbitmq` (the local node, a classic v2 queue) or
    /// `rabbitmq-cluster` (the bench's 3 nodes, a quorum queue; clients on
    /// the queue's leader).
    #[arg(long, value_enum, default_value_t = BrokerKind::Rabbitmq)]
    pub target: BrokerKind,
    /// Client counts to run (each: that many producers and consumers).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub clients: Vec<usize>,
    /// Runs per client count and tool.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Publishing time of each run (whole seconds for PerfTest).
    #[arg(long, default_value = "12s", value_parser = parse_duration)]
    #[serde(skip)]
    pub duration: Duration,
    /// Leading part left out of the rates.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(skip)]
    pub warmup: Duration,
    #[arg(long, default_value_t = 256)]
    pub confirm_window: usize,
    #[arg(long, default_value_t = 256)]
    pub prefetch: u32,
    #[arg(long, default_value = brokers::DEFAULT_AMQP_URI)]
    #[serde(skip)]
    pub amqp_uri: String,
    /// Where to write every run and the medians as JSON.
    #[arg(long, default_value = "warren-bench-perftest.json")]
    #[serde(skip)]
    pub json: PathBuf,
}

/// One PerfTest run, from its console output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PerfTestRun {
    /// Mean of the per-second `received` rates after the warm-up.
    pub consume_rate: f64,
    /// Mean of the per-second `confirmed` rates after the warm-up.
    pub publish_rate: f64,
    /// The whole run's consumer latency percentiles (PerfTest's summary
    /// line; includes the warm-up), ms.
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub confirm_p50_ms: f64,
    pub confirm_p99_ms: f64,
    pub broker_cpu_s: f64,
    /// CPU seconds of the PerfTest JVM over the whole run (JIT included).
    pub client_cpu_s: f64,
    pub seconds_sampled: usize,
}

/// `key: N msg/s` in a PerfTest line.
fn rate_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The `a/b/c/d/e µs` after `label` in a PerfTest line: (p50, p99) in ms.
fn percentiles_after(line: &str, label: &str) -> Option<(f64, f64)> {
    let rest = &line[line.find(label)? + label.len()..];
    let nums: Vec<f64> = rest.trim_start_matches(':').split_whitespace().next()?.split('/').filter_map(|v| v.parse().ok()).collect();
    if nums.len() != 5 {
        return None;
    }
    Some((nums[1] / 1000.0, nums[4] / 1000.0))
}

/// Parses PerfTest's console output (per-second lines and the summary).
pub fn parse_output(out: &str, warmup: Duration) -> Result<PerfTestRun> {
    let mut received = Vec::new();
    let mut confirmed = Vec::new();
    let mut run = PerfTestRun::default();
    for line in out.lines() {
        if let Some(t) = line.find(", time ").and_then(|i| line[i + 7..].split_whitespace().next()).and_then(|t| t.parse::<f64>().ok()) {
            // A sample covers the second before `t`.
            if t - 1.0 >= warmup.as_secs_f64() - 1e-3
                && let (Some(r), Some(c)) = (rate_after(line, "received:"), rate_after(line, "confirmed:"))
            {
                received.push(r);
                confirmed.push(c);
            }
        } else if line.contains("consumer latency min/median/75th/95th/99th") {
            if let Some((p50, p99)) = percentiles_after(line, "consumer latency min/median/75th/95th/99th") {
                run.e2e_p50_ms = p50;
                run.e2e_p99_ms = p99;
            }
        } else if line.contains("confirm latency min/median/75th/95th/99th")
            && let Some((p50, p99)) = percentiles_after(line, "confirm latency min/median/75th/95th/99th")
        {
            run.confirm_p50_ms = p50;
            run.confirm_p99_ms = p99;
        }
    }
    if received.is_empty() {
        bail!("no per-second samples after the warm-up in PerfTest's output:\n{out}");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    run.consume_rate = mean(&received);
    run.publish_rate = mean(&confirmed);
    run.seconds_sampled = received.len();
    Ok(run)
}

/// PerfTest's flags for `w` against `uri`, on the bench's predeclared
/// topology (exchange, durable queue of the workload's type, binding).
pub fn perftest_flags(uri: &str, w: &Workload, seconds: u64) -> Vec<String> {
    let q = w.queue_name(0);
    let mut f: Vec<String> = vec![
        "--uri".into(),
        uri.into(),
        "--producers".into(),
        w.producers.to_string(),
        "--consumers".into(),
        w.consumers.to_string(),
        "--size".into(),
        w.size.to_string(),
        "--confirm".into(),
        w.confirm_window.to_string(),
        "--qos".into(),
        w.prefetch.to_string(),
        // Acknowledge every delivery on its own (the bench does).
        "--multi-ack-every".into(),
        "0".into(),
        "--exchange".into(),
        w.exchange.exchange_name().into(),
        "--type".into(),
        "direct".into(),
        "--routing-key".into(),
        q.clone(),
        "--queue".into(),
        q,
        "--predeclared".into(),
        "--auto-delete".into(),
        "false".into(),
        "--time".into(),
        seconds.to_string(),
    ];
    if w.persistent() {
        f.extend(["--flag".into(), "persistent".into()]);
    }
    f
}

/// Runs PerfTest once (topology set up and removed around it).
async fn perftest_run(args: &PerfTestArgs, uri: &str, pids: &[u32], w: &Workload) -> Result<PerfTestRun> {
    crate::clients::rabbit::setup(uri, w).await?;
    let seconds = w.duration.as_secs().max(1);
    let flags = perftest_flags(uri, w, seconds);
    let cp = args.classpath.clone();
    let warmup = w.warmup;
    let pids_owned = pids.to_vec();
    let result = tokio::task::spawn_blocking(move || -> Result<PerfTestRun> {
        let (cpu0, _) = cpu_now(&pids_owned);
        let mut child = Command::new("java")
            .args(["-cp", &cp, "com.rabbitmq.perf.PerfTest"])
            .args(&flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run java (install Java 17+)")?;
        let java_pid = child.id();
        let mut out = String::new();
        let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        // Bounded: the run's length plus start-up and drain.
        let deadline = Instant::now() + Duration::from_secs(seconds + 120);
        let mut java_cpu = 0.0;
        loop {
            if let Some(c) = procfs::cpu_seconds(java_pid) {
                java_cpu = c;
            }
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    bail!("PerfTest failed ({status}): {err}");
                }
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("PerfTest did not finish within {}s", seconds + 120);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        out.push_str(&reader.join().unwrap_or_default());
        let (cpu1, _) = cpu_now(&pids_owned);
        let mut run = parse_output(&out, warmup)?;
        run.broker_cpu_s = cpu1 - cpu0;
        run.client_cpu_s = java_cpu;
        Ok(run)
    })
    .await?;
    if let Err(e) = crate::clients::rabbit::cleanup(uri, w).await {
        eprintln!("warning: cleaning up after PerfTest failed: {e:#}");
    }
    result
}

#[derive(Serialize)]
struct Comparison {
    clients: usize,
    lapin: Vec<RunResult>,
    perftest: Vec<PerfTestRun>,
}

pub async fn perftest(args: PerfTestArgs) -> Result<()> {
    if args.runs == 0 || args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--runs and --clients must be at least 1");
    }
    if args.duration <= args.warmup {
        bail!("--duration must be longer than --warmup");
    }
    let mut cluster = None;
    let (uri, pids, queue_type, resolve): (String, Vec<u32>, QueueType, Option<runner::LeaderLookup>) = match args.target {
        BrokerKind::Rabbitmq => {
            let pid = if args.amqp_uri == brokers::DEFAULT_AMQP_URI {
                Some(tokio::task::spawn_blocking(brokers::ensure_rabbitmq).await??)
            } else {
                tokio::task::spawn_blocking(brokers::rabbitmq_pid).await?
            };
            (args.amqp_uri.clone(), pid.into_iter().collect(), QueueType::ClassicV2, None)
        }
        BrokerKind::RabbitmqCluster => {
            eprintln!("starting a 3-node RabbitMQ cluster on loopback ...");
            let c = tokio::task::spawn_blocking(RabbitCluster::start).await??;
            let ctl = c.ctl.clone();
            let r = (
                c.nodes[0].uri(),
                c.pids(),
                QueueType::Quorum,
                Some(std::sync::Arc::new(move |q: &str| ctl.leader_of(q, 0)) as runner::LeaderLookup),
            );
            cluster = Some(c);
            r
        }
        BrokerKind::Warren | BrokerKind::WarrenCluster => bail!("--target is rabbitmq or rabbitmq-cluster"),
    };
    let outcome = async {
        let mut comparisons = Vec::new();
        for &n in &args.clients {
            let w = Workload {
                producers: n,
                consumers: n,
                size: 1024,
                confirm_window: args.confirm_window,
                prefetch: args.prefetch,
                duration: args.duration,
                warmup: args.warmup,
                queue_type,
                ..Workload::default()
            };
            let mut cmp = Comparison { clients: n, lapin: Vec::new(), perftest: Vec::new() };
            for i in 0..args.runs {
                for tool in if i % 2 == 0 { ["lapin", "perftest"] } else { ["perftest", "lapin"] } {
                    eprintln!("[{n}p{n}c {}/{}] {tool} ...", i + 1, args.runs);
                    if tool == "lapin" {
                        // The cluster's queue is declared through node 1,
                        // which leads it (RabbitMQ's client-local placement).
                        let mut t = Target::single(args.target, uri.clone(), None, None);
                        t.pids = pids.clone();
                        t.resolve_leader = resolve.clone();
                        let r = runner::run(&mut t, &w).await?;
                        eprintln!(
                            "  lapin: consume {} msg/s, e2e p99 {} ms, client CPU {} s",
                            fmt_num(r.consume_rate),
                            fmt_num(r.end_to_end.p99_ms),
                            fmt_num(r.resources.client_cpu_s)
                        );
                        cmp.lapin.push(r);
                    } else {
                        let r = perftest_run(&args, &uri, &pids, &w).await?;
                        eprintln!(
                            "  PerfTest: consume {} msg/s, e2e p99 {} ms, JVM CPU {} s",
                            fmt_num(r.consume_rate),
                            fmt_num(r.e2e_p99_ms),
                            fmt_num(r.client_cpu_s)
                        );
                        cmp.perftest.push(r);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            comparisons.push(cmp);
        }
        Ok::<_, anyhow::Error>(comparisons)
    }
    .await;
    if let Some(mut c) = cluster.take() {
        tokio::task::block_in_place(|| c.stop());
    }
    let comparisons = outcome?;
    println!("{}", render(&args, &comparisons));
    let json = serde_json::json!({ "settings": &args, "target": args.target.name(), "comparisons": comparisons });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?).with_context(|| format!("cannot write {}", args.json.display()))?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}

fn render(args: &PerfTestArgs, comparisons: &[Comparison]) -> String {
    let mut rows = Vec::new();
    for c in comparisons {
        let l = |f: &dyn Fn(&RunResult) -> f64| median(&c.lapin.iter().map(f).collect::<Vec<_>>());
        let p = |f: &dyn Fn(&PerfTestRun) -> f64| median(&c.perftest.iter().map(f).collect::<Vec<_>>());
        let metrics: [(&str, f64, f64); 7] = [
            ("consume msg/s", l(&|r| r.consume_rate), p(&|r| r.consume_rate)),
            ("publish msg/s", l(&|r| r.publish_rate), p(&|r| r.publish_rate)),
            ("e2e p50 ms", l(&|r| r.end_to_end.p50_ms), p(&|r| r.e2e_p50_ms)),
            ("e2e p99 ms", l(&|r| r.end_to_end.p99_ms), p(&|r| r.e2e_p99_ms)),
            ("confirm p99 ms", l(&|r| r.confirm.p99_ms), p(&|r| r.confirm_p99_ms)),
            ("broker CPU s", l(&|r| r.resources.broker_cpu_s), p(&|r| r.broker_cpu_s)),
            ("client CPU s", l(&|r| r.resources.client_cpu_s), p(&|r| r.client_cpu_s)),
        ];
        for (i, (m, a, b)) in metrics.iter().enumerate() {
            rows.push(vec![
                if i == 0 { format!("{}p{}c", c.clients, c.clients) } else { String::new() },
                m.to_string(),
                fmt_num(*a),
                fmt_num(*b),
                format!("{:.2}", report::ratio(*b, *a)),
            ]);
        }
    }
    format!(
        "{} ({} queue), medians of {} run(s) per tool; PerfTest {}\n\
         PerfTest latencies are its whole-run summary (warm-up included); its client CPU covers the whole JVM run, lapin's the measured window\n{}",
        args.target.name(),
        if args.target == BrokerKind::RabbitmqCluster { "quorum" } else { "classic v2" },
        args.runs,
        args.perftest_version,
        report::table(&["clients", "metric", "lapin", "perftest", "perftest/lapin"], &rows)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const OUT: &str = "id: test-023050-792, starting producer #0
id: test-023050-792, time 1.017 s, sent: 3174 msg/s, confirmed: 3156 msg/s, nacked: 0 msg/s, received: 3074 msg/s, min/median/75th/95th/99th consumer latency: 9833/52996/72279/103802/117321 µs, confirm latency: 1372/15150/23892/37441/43239 µs
id: test-023050-792, time 2.001 s, sent: 4659 msg/s, confirmed: 4670 msg/s, nacked: 0 msg/s, received: 4713 msg/s, min/median/75th/95th/99th consumer latency: 1006/34023/76068/93853/101728 µs, confirm latency: 862/16186/25225/39268/40578 µs
id: test-023050-792, time 3.005 s, sent: 7512 msg/s, confirmed: 7264 msg/s, nacked: 0 msg/s, received: 7305 msg/s, min/median/75th/95th/99th consumer latency: 3946/31105/64708/103173/114909 µs, confirm latency: 959/14839/22456/41767/44160 µs
id: test-023050-792, time 4.001 s, sent: 8882 msg/s, confirmed: 8910 msg/s, nacked: 0 msg/s, received: 8113 msg/s, min/median/75th/95th/99th consumer latency: 5134/66353/86959/119191/127754 µs, confirm latency: 1769/14612/20660/44250/59989 µs
test stopped (Reached time limit)
id: test-023050-792, sending rate avg: 6489 msg/s
id: test-023050-792, receiving rate avg: 6169 msg/s
id: test-023050-792, consumer latency min/median/75th/95th/99th 2147/66642/124958/230438/273023 µs
id: test-023050-792, confirm latency min/median/75th/95th/99th 1102/16044/24833/39604/52913 µs
";

    #[test]
    fn should_average_the_seconds_after_the_warmup() {
        let r = parse_output(OUT, Duration::from_secs(2)).unwrap();
        // Samples ending at 3.005 s and 4.001 s.
        assert_eq!(r.seconds_sampled, 2);
        assert_eq!(r.consume_rate, (7305.0 + 8113.0) / 2.0);
        assert_eq!(r.publish_rate, (7264.0 + 8910.0) / 2.0);
        assert_eq!((r.e2e_p50_ms, r.e2e_p99_ms), (66.642, 273.023));
        assert_eq!((r.confirm_p50_ms, r.confirm_p99_ms), (16.044, 52.913));
        let all = parse_output(OUT, Duration::ZERO).unwrap();
        assert_eq!(all.seconds_sampled, 4);
        assert!(parse_output("nothing", Duration::ZERO).is_err());
    }

    #[test]
    fn should_map_the_workload_to_perftest_flags() {
        let w = Workload { producers: 4, consumers: 4, queue_type: QueueType::Quorum, ..Workload::default() };
        let f = perftest_flags("amqp://x", &w, 12).join(" ");
        for part in [
            "--uri amqp://x",
            "--producers 4",
            "--consumers 4",
            "--size 1024",
            "--confirm 256",
            "--qos 256",
            "--multi-ack-every 0",
            "--exchange warren-bench.direct",
            "--routing-key warren-bench-0",
            "--queue warren-bench-0",
            "--predeclared",
            "--time 12",
            "--flag persistent",
        ] {
            assert!(f.contains(part), "{part} missing in {f}");
        }
        let t = Workload { transient: true, ..Workload::default() };
        assert!(!perftest_flags("amqp://x", &t, 1).contains(&"persistent".to_string()));
    }

    #[test]
    fn should_parse_the_subcommand() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: PerfTestArgs,
        }
        let a = Cli::try_parse_from(["x", "--classpath", "a.jar:b.jar", "--target", "rabbitmq-cluster", "--clients", "1,4", "--runs", "5"])
            .unwrap()
            .a;
        assert_eq!((a.target, a.clients, a.runs), (BrokerKind::RabbitmqCluster, vec![1, 4], 5));
        assert_eq!(a.duration, Duration::from_secs(12));
    }
}
