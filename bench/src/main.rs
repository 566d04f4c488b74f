//! `warren-bench`: the same workload against Warren (gRPC) and RabbitMQ
//! (AMQP 0-9-1), measured in one process with one clock.
//!
//! * `warren-bench run --broker warren|rabbitmq [workload flags]`: one
//!   workload, printed as a table (and as JSON with `--json`).
//! * `warren-bench compare`: the standard suite against both brokers,
//!   alternating, with medians and ratios (see `bench/README.md`); with
//!   `--brokers warren-cluster,rabbitmq-cluster` the 3-node quorum-queue
//!   entries (throughput, failover, idle queues).
//! * `warren-bench perftest`: RabbitMQ's PerfTest beside the lapin client,
//!   against the same RabbitMQ (`bench/perftest.sh`).

mod brokers;
mod clients;
mod cluster;
mod compare;
mod failover;
mod idle;
mod perftest;
mod procfs;
mod report;
mod runner;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use brokers::WarrenProcess;
use runner::{BrokerKind, Target};
use workload::Workload;

#[derive(Parser)]
#[command(name = "warren-bench", version, about = "Warren vs RabbitMQ: the same workload, side by side")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one workload against one broker.
    Run(RunArgs),
    /// Runs the standard suite against both brokers; prints medians and
    /// ratios, writes JSON.
    Compare(compare::CompareArgs),
    /// Cross-checks RabbitMQ's figures with RabbitMQ's PerfTest (Java)
    /// against warren-bench's lapin client (see `bench/perftest.sh`).
    Perftest(perftest::PerfTestArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value_t = BrokerKind::Warren)]
    broker: BrokerKind,
    /// A running Warren broker (default: the bench starts one from
    /// `--warren-bin` in a temporary directory).
    #[arg(long)]
    warren_addr: Option<String>,
    /// The broker's pid, for CPU and RSS (found automatically for a broker
    /// the bench starts, and for RabbitMQ's beam.smp).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// The warren-broker binary (default: next to warren-bench).
    #[arg(long)]
    warren_bin: Option<PathBuf>,
    /// Extra flags for a warren-broker the bench starts.
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    broker_args: Vec<String>,
    #[arg(long, default_value = brokers::DEFAULT_AMQP_URI)]
    amqp_uri: String,
    /// Repeat the run this many times (each printed).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also write the results as JSON to this file (`-` for stdout instead
    /// of the table).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    workload: Workload,
}

async fn run(args: RunArgs) -> Result<()> {
    args.workload.validate().map_err(|e| anyhow::anyhow!(e))?;
    let mut _dir = None;
    let mut target = match (args.broker, &args.warren_addr) {
        (BrokerKind::Warren, Some(addr)) => {
            Target::single(BrokerKind::Warren, warren_client::normalize_server(addr), args.broker_pid, None)
        }
        (BrokerKind::Warren, None) => {
            let dir = tempfile::Builder::new().prefix("warren-bench-").tempdir()?;
            let data = dir.path().join("data");
            _dir = Some(dir);
            let bin = args.warren_bin.clone().unwrap_or_else(brokers::default_warren_bin);
            let extra = args.broker_args.clone();
            let (p, took) = tokio::task::spawn_blocking(move || WarrenProcess::start(&bin, &data, &extra)).await??;
            eprintln!("started warren-broker (pid {}) at {} in {:.2}s", p.pid().unwrap_or(0), p.addr, took.as_secs_f64());
            Target::warren(p)
        }
        (BrokerKind::Rabbitmq, _) => {
            let pid = match args.broker_pid.or_else(brokers::rabbitmq_pid) {
                Some(pid) => Some(pid),
                None if args.amqp_uri == brokers::DEFAULT_AMQP_URI => Some(tokio::task::spawn_blocking(brokers::ensure_rabbitmq).await??),
                None => None,
            };
            Target::single(BrokerKind::Rabbitmq, args.amqp_uri.clone(), pid, None)
        }
        (BrokerKind::WarrenCluster | BrokerKind::RabbitmqCluster, _) => {
            bail!("`run` drives one node; for the 3-node clusters use `compare --brokers warren-cluster,rabbitmq-cluster`")
        }
    };
    let mut results = Vec::new();
    for i in 0..args.runs.max(1) {
        let r = runner::run(&mut target, &args.workload).await.with_context(|| format!("run {} on {}", i + 1, target.kind.name()))?;
        if args.json.as_deref() != Some(std::path::Path::new("-")) {
            println!("{}", report::render_run(&r));
        }
        results.push(r);
    }
    if let Some(mut p) = target.process.take() {
        tokio::task::spawn_blocking(move || p.stop()).await??;
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&serde_json::json!({ "workload": &args.workload, "runs": results }))?;
        if path.as_os_str() == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Run(args) => run(args).await,
            Cmd::Compare(args) => compare::compare(args).await,
            Cmd::Perftest(args) => perftest::perftest(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn should_parse_both_subcommands() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["warren-bench", "run", "--broker", "rabbitmq", "--producers", "2", "--consumers", "2"]).unwrap();
        match cli.cmd {
            Cmd::Run(a) => {
                assert_eq!(a.broker, BrokerKind::Rabbitmq);
                assert_eq!(a.workload.producers, 2);
            }
            Cmd::Compare(_) | Cmd::Perftest(_) => panic!("expected run"),
        }
        let cli = Cli::try_parse_from(["warren-bench", "compare", "--runs", "3", "--only", "1p1c,backlog", "--brokers", "warren"]).unwrap();
        match cli.cmd {
            Cmd::Compare(a) => {
                assert_eq!(a.runs, 3);
                assert_eq!(a.only, vec!["1p1c", "backlog"]);
                assert_eq!(a.brokers, vec![BrokerKind::Warren]);
            }
            Cmd::Run(_) | Cmd::Perftest(_) => panic!("expected compare"),
        }
    }
}
