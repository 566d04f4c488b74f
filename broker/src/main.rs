//! `warren-broker`: runs one Warren node.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use warren_broker::config::{Config, LoadError, LogFormat};

/// jemalloc: it returns freed memory to the system steadily under a
/// broker's churn of message buffers, and its statistics give the
/// `allocated` memory measure (`memory_calculation_strategy`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        // --help and --version exit 0; bad flags or environment exit 2.
        Err(LoadError::Args(e)) => e.exit(),
        Err(e @ LoadError::File(_)) => {
            eprintln!("warren-broker: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("warren-broker: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    init_logging(config.log_format);
    println!("warren-broker {} starting with:\n{}", env!("CARGO_PKG_VERSION"), config.render());

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let result = warren_broker::run::run(config, shutdown, |ready| {
        // Scripts and tests wait for this line; `grpc=` stays first.
        match ready.cluster {
            Some(cluster) => println!("warren-broker ready: grpc={} http={} cluster={cluster}", ready.grpc, ready.http),
            None => println!("warren-broker ready: grpc={} http={}", ready.grpc, ready.http),
        }
    })
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
