//! Running a node: open storage, recover, serve, stop cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warren_client::proto::{FILE_DESCRIPTOR_SET, warren_server::WarrenServer};

use crate::broker::{Broker, BrokerConfig};
use crate::config::Config;
use crate::queue::state::Limits;
use crate::server::{WarrenService, incoming};
use crate::store::Store;
use crate::store::rocks::{RocksEngine, RocksTuning};

/// How long in-flight calls get to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the broker until `shutdown` is cancelled. `on_ready` gets the bound
/// gRPC address once the node serves.
pub async fn run(config: Config, shutdown: CancellationToken, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let tuning = RocksTuning { block_cache_bytes: config.block_cache_bytes, ..RocksTuning::default() };
    let data_dir = config.data_dir.clone();
    let engine = tokio::task::spawn_blocking(move || RocksEngine::open(&data_dir, tuning))
        .await?
        .with_context(|| format!("cannot open the database in {}", config.data_dir.display()))?;
    let store = Store::new(Arc::new(engine), None);
    let broker = Broker::open(
        store,
        BrokerConfig {
            node_name: config.node_name(),
            max_message_size: config.max_message_size,
            limits: Limits { window_messages: config.queue_window_messages, window_bytes: config.queue_window_bytes },
        },
    )
    .await
    .context("recovering the broker state failed")?;

    let listener =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("cannot listen on {} (grpc_addr)", config.grpc_addr))?;
    let addr = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WarrenServer<WarrenService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let limit = config.max_message_size.saturating_mul(2).saturating_add(1 << 20);
    let service =
        WarrenServer::new(WarrenService::new(broker.clone(), shutdown.clone(), config.data_dir.display().to_string(), addr.to_string()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);

    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener, broker.clone()), shutdown.clone().cancelled_owned());
    let server = tokio::spawn(server);
    tracing::info!(%addr, recovery_ms = started.elapsed().as_millis() as u64, queues = broker.list_queues().len(), "broker ready");
    on_ready(addr);

    shutdown.cancelled().await;
    tracing::info!("stopping: no new connections; ending subscriptions and draining publishes");
    health.set_not_serving::<WarrenServer<WarrenService>>().await;
    broker.begin_shutdown();
    broker.cancel_consumers("broker is shutting down").await;
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
        Err(_) => tracing::warn!("calls still open after {DRAIN_TIMEOUT:?}; stopping anyway"),
    }
    broker.shutdown().await.context("closing storage")?;
    tracing::info!("stopped cleanly");
    Ok(())
}
