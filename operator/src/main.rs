//! `warren-operator`: runs Warren Brokers, declares their topology and
//! scales consumers with the backlog. Configuration from flags or
//! `WARREN_OPERATOR_*` environment variables; `--help` lists them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use warren_operator::context::{Context, Settings, parse_broker_endpoint};
use warren_operator::http::{self, Health};
use warren_operator::leader::LeaseLock;
use warren_operator::metrics::Metrics;
use warren_operator::watch::Watches;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Kubernetes operator for Warren.
#[derive(Debug, Parser)]
#[command(name = "warren-operator", version, about)]
struct Config {
    /// Address of the HTTP server (/metrics, /healthz, /readyz). `[::]`
    /// listens on IPv6 and IPv4 (falling back to 0.0.0.0 without IPv6).
    #[arg(long, env = "WARREN_OPERATOR_HTTP_ADDR", default_value = "[::]:8080")]
    http_addr: SocketAddr,
    /// Image for Brokers that do not set spec.image.
    #[arg(long, env = "WARREN_OPERATOR_BROKER_IMAGE", default_value = concat!("ghcr.io/warren-mq/warren-broker:", env!("CARGO_PKG_VERSION")))]
    broker_image: String,
    /// Seconds between checks of each topology object against its broker
    /// (drift repair, status counts of queues without autoscaling).
    #[arg(long, env = "WARREN_OPERATOR_RESYNC_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    resync_seconds: u64,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WARREN_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Take part in leader election, so several replicas can run.
    #[arg(long, env = "WARREN_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease used for leader election.
    #[arg(long, env = "WARREN_OPERATOR_LEASE_NAME", default_value = "warren-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the operator's own namespace).
    #[arg(long, env = "WARREN_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a lease lasts without renewal.
    #[arg(long, env = "WARREN_OPERATOR_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    lease_seconds: u64,
    /// This replica's identity in the lease and in Events (default: the pod
    /// name from POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reach the Broker NAMESPACE/NAME at HOST:PORT instead of its
    /// in-cluster Service (an operator running outside the cluster, or a
    /// broker on loopback in tests). Repeatable; the variable takes a
    /// comma-separated list.
    #[arg(long = "broker-endpoint", env = "WARREN_OPERATOR_BROKER_ENDPOINTS", value_delimiter = ',', value_parser = parse_broker_endpoint, value_name = "NAMESPACE/NAME=HOST:PORT")]
    broker_endpoints: Vec<(String, String)>,
    /// Most reconciles running at once, per controller.
    #[arg(long, env = "WARREN_OPERATOR_MAX_CONCURRENT_RECONCILES", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_concurrent_reconciles: u16,
    /// Seconds a watch may keep failing (no successful list or event in
    /// between) before /healthz fails, so that a stuck operator is restarted.
    #[arg(long, env = "WARREN_OPERATOR_WATCH_STUCK_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    watch_stuck_seconds: u64,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "WARREN_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn own_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| format!("warren-operator-{}", std::process::id())));
    tracing::info!(?config, %identity, "starting warren-operator {}", env!("CARGO_PKG_VERSION"));

    let metrics = Arc::new(Metrics::default());
    let watches = Watches::new(Duration::from_secs(config.watch_stuck_seconds));
    let health = Arc::new(Health { metrics: metrics.clone(), ready: Default::default(), watches: watches.clone() });
    let server = tokio::spawn(http::serve(config.http_addr, health.clone()));

    let client = Client::try_default().await.context("no Kubernetes configuration found (in-cluster service account or KUBECONFIG)")?;
    if let Err(hint) = warren_operator::check_crds(&client).await {
        tracing::error!("{hint}");
        eprintln!("warren-operator: {hint}");
        std::process::exit(2);
    }
    health.ready.store(true, Ordering::Relaxed);

    let settings = Settings {
        broker_image: config.broker_image.clone(),
        resync: Duration::from_secs(config.resync_seconds),
        broker_endpoints: config.broker_endpoints.iter().cloned().collect(),
        concurrency: config.max_concurrent_reconciles,
        ..Settings::default()
    };
    let ctx = Context::new(client.clone(), metrics.clone(), settings, Some(identity.clone()));
    let controllers = warren_operator::run_controllers(client.clone(), config.watch_namespace.clone(), ctx, watches);

    if config.leader_election {
        let namespace = config.lease_namespace.clone().unwrap_or_else(own_namespace);
        let lock = LeaseLock::new(
            Api::<Lease>::namespaced(client, &namespace),
            &config.lease_name,
            &identity,
            Duration::from_secs(config.lease_seconds),
        );
        tracing::info!(lease = %config.lease_name, %namespace, "waiting to become leader");
        lock.acquire().await;
        metrics.leader.set(1);
        tracing::info!("became leader; starting controllers");
        tokio::select! {
            () = controllers => {
                // A clean stop (SIGTERM): hand over at once instead of making
                // the standby wait for the lease to expire.
                tracing::info!("controllers stopped; releasing the leader lease");
                metrics.leader.set(0);
                if let Err(e) = lock.release().await {
                    tracing::warn!(error = %e, "releasing the leader lease failed; it expires by itself");
                }
            }
            () = lock.hold() => {
                // Dropping the controllers future stops every reconcile now,
                // before the lease can expire for the other replicas.
                metrics.leader.set(0);
                anyhow::bail!("lost the leader lease; exiting so that only one replica reconciles");
            }
        }
    } else {
        controllers.await;
    }
    server.abort();
    Ok(())
}
