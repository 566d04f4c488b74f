//! Running a node: serve health and metrics, open storage, recover, watch
//! resources, serve gRPC, stop cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warren_client::proto::users_server::UsersServer;
use warren_client::proto::{FILE_DESCRIPTOR_SET, warren_server::WarrenServer};

use crate::alarms::{self, MonitorSettings};
use crate::auth::{self, Auth};
use crate::broker::{Broker, BrokerConfig, ClusterParts};
use crate::cluster::{Cluster, ClusterConfig};
use crate::config::{Config, MemoryWatermark};
use crate::http::{self, HttpState, Phase};
use crate::metrics;
use crate::queue::state::Limits;
use crate::raft::{RaftHost, RaftOptions};
use crate::replica::meta::Meta;
use crate::replica::quorum::ReplicaCtx;
use crate::server::{WarrenService, incoming};
use crate::store::rocks::{RocksEngine, RocksTuning};
use crate::store::{BatchObserver, Store};
use crate::telemetry;
use crate::tls::ServerTls;

/// HTTP/2 flow-control windows the server grants each stream and each
/// connection.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// How long in-flight calls get to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The addresses a node serves on once it is ready.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The cluster listener, in a cluster.
    pub cluster: Option<SocketAddr>,
}

/// The memory high watermark in bytes, and how it was found.
fn memory_limit(watermark: MemoryWatermark) -> (u64, String) {
    match watermark {
        MemoryWatermark::Bytes(b) => (b, format!("{} (absolute)", alarms::human_bytes(b))),
        MemoryWatermark::Fraction(f) => match alarms::available_memory() {
            Some((available, source)) => {
                let limit = watermark.resolve(available);
                (limit, format!("{} ({f} of the {source}, {})", alarms::human_bytes(limit), alarms::human_bytes(available)))
            }
            None => (0, "none: the memory available could not be read, so the memory alarm is off".into()),
        },
    }
}

/// Runs the broker until `shutdown` is cancelled. `on_ready` gets the bound
/// addresses once the node serves.
pub async fn run(config: Config, shutdown: CancellationToken, on_ready: impl FnOnce(Ready)) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // The default posture, before anything listens: gRPC beyond loopback
    // needs authentication (or --insecure), and so does the node-to-node
    // listener of a cluster.
    config.check_posture().map_err(anyhow::Error::msg)?;
    let grpc_tls = match config.security.grpc_tls() {
        Some(files) => Some(ServerTls::load("grpc", files, &[b"h2"]).context("loading the gRPC listener's TLS certificate")?),
        None => None,
    };
    let http_tls = match config.security.http_tls() {
        Some(files) => Some(ServerTls::load("http", files, &[b"h2", b"http/1.1"]).context("loading the HTTP listener's TLS certificate")?),
        None => None,
    };
    let tls_stop = CancellationToken::new();
    for tls in grpc_tls.iter().chain(http_tls.iter()) {
        tls.watch(config.security.tls_reload_interval, tls_stop.clone());
    }
    let traces = telemetry::init(&config.node_name()).context("starting OpenTelemetry")?;
    if telemetry::enabled() {
        tracing::info!("exporting traces over OTLP");
    }

    // Health and metrics first: alive while recovering, ready only after.
    let http_listener =
        TcpListener::bind(config.http_addr).await.with_context(|| format!("cannot listen on {} (http_addr)", config.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let collector = metrics::BrokerCollector::new();
    let mut registry = metrics::registry(collector.clone());
    auth::metrics::register(&mut registry);
    let http_state = HttpState::new(registry);
    let http_stop = CancellationToken::new();
    let http_server = tokio::spawn(http::serve(http_listener, http_tls, http_state.clone(), http_stop.clone()));

    let tuning = RocksTuning { block_cache_bytes: config.block_cache_bytes, ..RocksTuning::default() };
    let data_dir = config.data_dir.clone();
    let engine = tokio::task::spawn_blocking(move || RocksEngine::open(&data_dir, tuning))
        .await?
        .with_context(|| format!("cannot open the database in {}", config.data_dir.display()))?;
    let engine: Arc<dyn crate::store::Engine> = Arc::new(engine);
    let observer: BatchObserver = Arc::new(|requests, synced, took| metrics::global().store_batch(requests, synced, took));
    let write_buffer = u32::try_from(config.write_buffer_bytes).unwrap_or(u32::MAX);
    let store = Store::with_write_buffer(engine.clone(), Some(observer), write_buffer);
    // The gRPC encoding limit; a Get reply is bounded below it.
    let limit = config.max_message_size.saturating_mul(2).saturating_add(1 << 20);
    let raft_store = store.clone();
    let broker = Broker::open(
        store,
        BrokerConfig {
            node_name: config.node_name(),
            max_message_size: config.max_message_size,
            limits: Limits {
                window_messages: config.queue_window_messages,
                window_bytes: config.queue_window_bytes,
                consumer_max_unacked: config.consumer_max_unacked,
                consumer_max_unacked_bytes: config.consumer_max_unacked_bytes,
            },
            max_reply_bytes: BrokerConfig::reply_budget(limit),
            max_message_headers: config.max_message_headers,
            max_message_header_bytes: config.max_message_header_bytes,
        },
    )
    .await
    .context("recovering the broker state failed")?;
    collector.set_broker(broker.clone());
    let access = Auth::from_config(&config.security, Some(broker.store().clone())).await.context("loading users")?;
    match (access.enabled(), &grpc_tls) {
        (false, _) if !config.grpc_addr.ip().is_loopback() => {
            tracing::warn!(grpc_addr = %config.grpc_addr, "authentication is OFF (--insecure): anyone who can reach the gRPC port can do anything");
        }
        (true, None) if !config.grpc_addr.ip().is_loopback() => {
            tracing::warn!(grpc_addr = %config.grpc_addr, "authentication is on but TLS is off: passwords and tokens cross the network in clear text (set --tls-cert and --tls-key)");
        }
        _ => {}
    }

    // In a cluster: the node-to-node listener and the Raft groups' host.
    let cluster = match config.cluster() {
        None => None,
        Some((node_id, listen, peers)) => {
            let mut cc = ClusterConfig::new(node_id, listen, peers);
            cc.max_message_bytes = limit;
            if let Some(files) = config.security.cluster_tls() {
                let tls = ServerTls::load("cluster", files, &[b"h2"]).context("loading the node-to-node TLS files")?;
                tls.watch(config.security.tls_reload_interval, tls_stop.clone());
                cc.tls = Some(tls);
            }
            if let Some(path) = &config.security.cluster_secret_file {
                cc.secret = Some(crate::cluster::ClusterSecret::read(path).map_err(anyhow::Error::msg)?);
            }
            let (mutual_tls, secret) = (cc.tls.is_some(), cc.secret.is_some());
            let (cluster, cluster_addr) = Cluster::start(cc).await.with_context(|| format!("cannot listen on {listen} (cluster_addr)"))?;
            collector.set_cluster(cluster.liveness());
            let host = RaftHost::new(
                cluster.clone(),
                raft_store,
                config.data_dir.join("raft"),
                RaftOptions { snapshot_after: config.raft_snapshot_entries, ..RaftOptions::default() },
            )
            .map_err(|e| anyhow::anyhow!("Raft settings: {e}"))?;
            collector.set_raft_quiet(host.quiet_groups());
            collector.set_raft(host.clone());
            tracing::info!(node_id, %cluster_addr, mutual_tls, secret, "cluster listener ready");
            if !cluster_addr.ip().is_loopback() {
                match (mutual_tls, secret) {
                    (false, false) => {
                        tracing::warn!(%cluster_addr, "the node-to-node listener has no authentication (--insecure): anyone who can reach it can read and change every replicated queue")
                    }
                    (false, true) => {
                        tracing::warn!(%cluster_addr, "node-to-node traffic, the cluster secret included, crosses the network in clear text (set --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca)")
                    }
                    _ => {}
                }
            }
            // Quorum queues and the metadata group; the broker applies the
            // metadata's changes from now on.
            let nodes: std::collections::BTreeSet<u64> = cluster.members().collect();
            let replicas = ReplicaCtx::new(host.clone(), broker.config().limits);
            let (meta, events) = Meta::start(host.clone(), nodes.clone()).await.map_err(|e| anyhow::anyhow!(e))?;
            let default_quorum = config.default_queue_type == crate::config::QueueType::Quorum;
            broker.attach_cluster(ClusterParts { meta, replicas, nodes, default_quorum }, events);
            Some((cluster, cluster_addr, host))
        }
    };

    let (memory_limit, memory_text) = memory_limit(config.memory_high_watermark);
    tracing::info!(
        memory_limit,
        strategy = config.memory_calculation_strategy.as_str(),
        disk_free_limit = config.disk_free_limit.0,
        "resource alarms: memory high watermark {memory_text}, disk free limit {}",
        alarms::human_bytes(config.disk_free_limit.0)
    );
    let monitor_stop = CancellationToken::new();
    let monitor = alarms::start_monitor(
        MonitorSettings {
            data_dir: config.data_dir.clone(),
            memory_limit,
            strategy: config.memory_calculation_strategy,
            disk_free_limit: config.disk_free_limit.0,
            interval: config.alarm_check_interval,
        },
        engine,
        monitor_stop.clone(),
    )
    .await;

    let listener =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("cannot listen on {} (grpc_addr)", config.grpc_addr))?;
    let addr = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WarrenServer<WarrenService>>().await;
    // Server reflection in both versions: `grpc.reflection.v1`, and
    // `v1alpha` for the tools that still ask only for it (older grpcurl,
    // several GUI clients). Each lists both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha().context("building the reflection service (v1alpha)")?;
    let reflection = reflection().build_v1().context("building the reflection service")?;
    let users = UsersServer::new(auth::service::UsersService::new(access.clone()));
    let service = WarrenServer::new(
        WarrenService::new(broker.clone(), shutdown.clone(), config.data_dir.display().to_string(), addr.to_string())
            .with_publish_block_timeout(config.publish_block_timeout)
            .with_consume_subscribe_timeout(config.consume_subscribe_timeout),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    let server = tonic::transport::Server::builder()
        // Authentication before any service; authorization is a hook per RPC.
        .layer(auth::layer::AuthLayer::new(access.clone()))
        .tcp_nodelay(true)
        // A publish stream blocked by a resource alarm is not read, so its
        // unread data holds up to one stream window of the connection's
        // window. Small stream windows and a large connection window keep
        // acks and calls on the same connection flowing while up to 32
        // publish streams are blocked.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Streams per connection: a client cannot hold unbounded calls.
        .max_concurrent_streams(config.max_concurrent_streams)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(users)
        .serve_with_incoming_shutdown(
            incoming(crate::tls::accept_loop("grpc", listener, grpc_tls.clone()), broker.clone()),
            shutdown.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    http_state.set_phase(Phase::Ready);
    tracing::info!(%addr, %http_addr, tls = grpc_tls.is_some(), authentication = access.enabled(), recovery_ms = started.elapsed().as_millis() as u64, queues = broker.list_queues().len(), "broker ready");
    on_ready(Ready { grpc: addr, http: http_addr, cluster: cluster.as_ref().map(|(_, a, _)| *a) });

    shutdown.cancelled().await;
    tracing::info!("stopping: no new connections; ending subscriptions and draining publishes");
    http_state.set_phase(Phase::Stopping);
    health.set_not_serving::<WarrenServer<WarrenService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    broker.begin_shutdown();
    broker.cancel_consumers("broker is shutting down").await;
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
        Err(_) => tracing::warn!("calls still open after {DRAIN_TIMEOUT:?}; stopping anyway"),
    }
    monitor_stop.cancel();
    tls_stop.cancel();
    let _ = monitor.await;
    if let Some((cluster, _, host)) = &cluster {
        host.shutdown().await;
        cluster.stop();
    }
    broker.shutdown().await.context("closing storage")?;
    http_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), http_server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
        Err(_) => tracing::debug!("HTTP connections still open; stopping anyway"),
    }
    if let Some(guard) = traces {
        // Flushing exports the last spans through the runtime: block a
        // blocking-pool thread on it, not a runtime worker.
        let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
