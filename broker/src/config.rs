//! The broker's configuration: one typed struct, from flags, `WARREN_*`
//! environment variables and an optional TOML file, validated at start and
//! printed once.
//!
//! Precedence, highest first: command-line flag, environment variable,
//! configuration file (`--config` / `WARREN_CONFIG`), built-in default. The
//! file's keys are the flag names in snake case (`disk_free_limit = "1GiB"`);
//! an unknown key is an error, never ignored.
//!
//! Sizes accept plain bytes (`1048576`) or a binary/decimal unit (`512MiB`,
//! `2GB`); durations accept `250ms`, `10s`, `5m`, `1h` (a plain number is
//! seconds). Every error names the setting it is about.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Bounds of `raft_snapshot_entries`: below, snapshots would be taken
/// almost per batch; above, a log could hold gigabytes before truncation.
pub const RAFT_SNAPSHOT_ENTRIES_MIN: u64 = 100;
pub const RAFT_SNAPSHOT_ENTRIES_MAX: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The type of a queue declared without `x-queue-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    /// Kept on the node that declared it.
    Classic,
    /// Replicated with Raft over `x-quorum-initial-group-size` nodes (in a
    /// cluster; a single node keeps it as a durable classic queue). Only
    /// durable, non-exclusive, non-auto-delete queues: others stay classic.
    Quorum,
}

/// How the memory alarm measures the broker's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemoryStrategy {
    /// Resident set size of the process, as the kernel reports it
    /// (`/proc/self/statm`): everything, RocksDB's caches included.
    Rss,
    /// Bytes currently allocated by the broker's heap allocator (jemalloc):
    /// messages, queues, connections; not RocksDB's own C++ allocations (its
    /// block cache and memtables have fixed budgets). Falls as soon as
    /// messages are consumed, where RSS may lag.
    Allocated,
}

impl MemoryStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryStrategy::Rss => "rss",
            MemoryStrategy::Allocated => "allocated",
        }
    }
}

/// The memory high watermark: a fraction of the memory available to the
/// process (its cgroup limit when there is one, else the host's RAM), or an
/// absolute number of bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryWatermark {
    Fraction(f64),
    Bytes(u64),
}

impl MemoryWatermark {
    /// The limit in bytes, given the memory available to the process.
    pub fn resolve(self, available: u64) -> u64 {
        match self {
            MemoryWatermark::Bytes(b) => b,
            MemoryWatermark::Fraction(f) => (available as f64 * f) as u64,
        }
    }
}

impl fmt::Display for MemoryWatermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryWatermark::Fraction(x) => write!(f, "{x}"),
            MemoryWatermark::Bytes(b) => write!(f, "{}", ByteSize(*b)),
        }
    }
}

/// A number of bytes, printed with a binary unit when it is a whole one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Parses `1048576`, `512MiB`, `2GB`, `64k`: binary units (`KiB`, `MiB`,
/// `GiB`, `TiB`, and the shorthands `K`, `M`, `G`, `T`) are powers of 1024,
/// decimal ones (`kB`, `MB`, `GB`, `TB`) powers of 1000.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let digits = digits.replace('_', "");
    if digits.is_empty() {
        return Err(format!("'{s}' is not a size: expected bytes such as 1048576 or 512MiB"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "Ki" => 1 << 10,
        "M" | "m" | "MiB" | "Mi" => 1 << 20,
        "G" | "g" | "GiB" | "Gi" => 1 << 30,
        "T" | "t" | "TiB" | "Ti" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("'{other}' is not a size unit: use B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_usize_bytes(s: &str) -> Result<usize, String> {
    usize::try_from(parse_bytes(s)?).map_err(|_| format!("'{s}' is too large"))
}

fn parse_byte_size(s: &str) -> Result<ByteSize, String> {
    parse_bytes(s).map(ByteSize)
}

/// Parses a watermark: a fraction such as `0.4` (written with a decimal
/// point), or bytes as [`parse_bytes`] reads them.
pub fn parse_watermark(s: &str) -> Result<MemoryWatermark, String> {
    let t = s.trim();
    if t.contains('.') {
        let f: f64 = t.parse().map_err(|_| format!("'{t}' is neither a fraction (such as 0.4) nor a size (such as 512MiB)"))?;
        return Ok(MemoryWatermark::Fraction(f));
    }
    parse_bytes(t).map(MemoryWatermark::Bytes)
}

/// Parses `250ms`, `10s`, `5m`, `1h`; a plain number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{t}' is not a duration: expected such as 250ms, 10s, 5m"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("'{other}' is not a duration unit: use ms, s, m or h")),
    };
    Ok(d)
}

/// The default port of the cluster listener.
pub const DEFAULT_CLUSTER_PORT: u16 = 5681;

/// Parses `HOST:PORT` with an IP host, or a bare IP (port 5681).
pub fn parse_cluster_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    match t.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, DEFAULT_CLUSTER_PORT)),
        Err(_) => Err(format!("'{t}' is not an address to listen on: expected IP:PORT such as 0.0.0.0:5681")),
    }
}

/// Every member of a cluster: node id -> the `host:port` its peers dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers(pub std::collections::BTreeMap<u64, String>);

impl fmt::Display for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(id, addr)| format!("{id}={addr}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...` (a missing port is 5681; HOST
/// may be a DNS name, such as a StatefulSet pod's name under its headless
/// Service).
pub fn parse_peers(s: &str) -> Result<Peers, String> {
    let mut peers = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("'{part}' is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("'{}' in '{part}' is not a node id (a number)", id.trim()))?;
        let addr = addr.trim();
        let (host, port) = match addr.rsplit_once(':') {
            // An IPv6 address without a port has colons but no brackets.
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.starts_with('[')) => {
                let port: u16 = p.parse().map_err(|_| format!("'{p}' in '{part}' is not a port"))?;
                (h.to_string(), port)
            }
            _ => (addr.to_string(), DEFAULT_CLUSTER_PORT),
        };
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
            return Err(format!("'{part}' has no valid host"));
        }
        if port == 0 {
            return Err(format!("'{part}': port 0 cannot be dialed"));
        }
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
        if peers.insert(id, format!("{host}:{port}")).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers: expected ID=HOST:PORT,...".into());
    }
    Ok(Peers(peers))
}

/// Prints a duration the way [`parse_duration`] reads it.
pub fn show_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 { format!("{}ms", d.as_millis()) } else { format!("{}s", d.as_secs()) }
}

/// The lowest absolute memory watermark accepted: an idle broker already
/// holds more than a few MiB.
pub const MIN_ABSOLUTE_WATERMARK: u64 = 32 << 20;

/// Warren message broker: AMQP 0-9-1 messaging over gRPC, stored in RocksDB.
///
/// Every setting is a flag, a WARREN_* environment variable, or a key of the
/// TOML file given with --config (same name as the flag, in snake case).
/// Precedence: flag, then environment, then file, then default.
///
/// Logs: level from RUST_LOG (default info). Traces: set
/// OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) to
/// export OpenTelemetry traces over OTLP/gRPC; OTEL_SERVICE_NAME and the other
/// standard OTEL_* variables apply. Tracing is off when neither is set.
#[derive(Clone, Debug, Parser)]
#[command(name = "warren-broker", version, about, long_about)]
pub struct Config {
    /// TOML configuration file; its keys are the flag names in snake case
    /// (`disk_free_limit = "1GiB"`). Flags and environment variables
    /// override it.
    #[arg(long, env = "WARREN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory of the node's RocksDB database (created if missing).
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "./data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Address the gRPC server listens on. Port 0 picks a free port (the
    /// chosen address is printed in the `ready` line).
    #[arg(long, env = "WARREN_GRPC_ADDR", default_value = "127.0.0.1:5680", value_name = "ADDR")]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP server: Prometheus `/metrics`, `/healthz`
    /// (alive) and `/readyz` (recovered and accepting clients). Port 0 picks
    /// a free port (printed in the `ready` line).
    #[arg(long, env = "WARREN_HTTP_ADDR", default_value = "127.0.0.1:15680", value_name = "ADDR")]
    pub http_addr: SocketAddr,

    /// Name of this node in status and logs (default: the host name).
    #[arg(long, env = "WARREN_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// This node's id in the cluster: a number unique among the peers and
    /// stable across restarts (on Kubernetes, the StatefulSet ordinal).
    /// Required with --peers.
    #[arg(long, env = "WARREN_NODE_ID", value_name = "N")]
    pub node_id: Option<u64>,

    /// Address the cluster listener binds, for traffic between nodes
    /// (IP:PORT, or an IP for port 5681). Used only with --peers.
    #[arg(long, env = "WARREN_CLUSTER_ADDR", default_value = "127.0.0.1:5681", value_parser = parse_cluster_addr, value_name = "HOST:PORT")]
    pub cluster_addr: SocketAddr,

    /// Every member of the cluster, this node included, as
    /// ID=HOST:PORT,... with the address the other nodes dial (on
    /// Kubernetes the pods' stable names through the headless Service; it
    /// may differ from --cluster-addr, which is where this node binds).
    /// Without it the broker runs as a single node: no cluster listener,
    /// no replication.
    #[arg(long, env = "WARREN_PEERS", value_parser = parse_peers, value_name = "ID=HOST:PORT,...")]
    pub peers: Option<Peers>,

    /// In a cluster, the type of a durable queue declared without
    /// `x-queue-type` (exclusive and auto-delete queues are always classic).
    #[arg(long, env = "WARREN_DEFAULT_QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum, value_name = "TYPE")]
    pub default_queue_type: QueueType,

    /// In a cluster, the Raft entries a group (a quorum queue, the
    /// metadata) appends between two snapshots of its state; the log
    /// before a snapshot is then truncated (keeping 1,000 entries). Fewer:
    /// shorter logs and more frequent snapshots.
    #[arg(long, env = "WARREN_RAFT_SNAPSHOT_ENTRIES", default_value_t = 10_000, value_name = "N")]
    pub raft_snapshot_entries: u64,

    /// Largest message accepted, in bytes (units allowed: 16MiB): its body
    /// plus its encoded properties, headers included.
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE", default_value_t = 16 << 20, value_parser = parse_usize_bytes, value_name = "BYTES")]
    pub max_message_size: usize,

    /// Ready messages per queue held in memory; the rest of a backlog stays
    /// on disk.
    #[arg(long, env = "WARREN_QUEUE_WINDOW_MESSAGES", default_value_t = 2048, value_name = "N")]
    pub queue_window_messages: usize,

    /// Body bytes per queue held in memory.
    #[arg(long, env = "WARREN_QUEUE_WINDOW_BYTES", default_value_t = 8 << 20, value_parser = parse_bytes, value_name = "BYTES")]
    pub queue_window_bytes: u64,

    /// Most unacknowledged deliveries per consumer: what a prefetch of 0
    /// means, and the cap on a larger prefetch. Auto-ack consumers are held
    /// to it for deliveries not yet written to their connection.
    #[arg(long, env = "WARREN_CONSUMER_MAX_UNACKED", default_value_t = 2048, value_name = "N")]
    pub consumer_max_unacked: u32,

    /// Most bytes (bodies, headers and properties) of unacknowledged, or not
    /// yet sent, deliveries per consumer. A single larger message is still
    /// delivered.
    #[arg(long, env = "WARREN_CONSUMER_MAX_UNACKED_BYTES", default_value_t = 16 << 20, value_parser = parse_bytes, value_name = "BYTES")]
    pub consumer_max_unacked_bytes: u64,

    /// Bytes of writes waiting for the disk. When the disk falls behind,
    /// queues wait for room here and publishers wait for their queues
    /// (back-pressure), instead of memory growing.
    #[arg(long, env = "WARREN_WRITE_BUFFER_BYTES", default_value_t = 64 << 20, value_parser = parse_bytes, value_name = "BYTES")]
    pub write_buffer_bytes: u64,

    /// RocksDB block cache, in bytes.
    #[arg(long, env = "WARREN_BLOCK_CACHE_BYTES", default_value_t = 32 << 20, value_parser = parse_usize_bytes, value_name = "BYTES")]
    pub block_cache_bytes: usize,

    /// Memory high watermark: publishers are blocked while the broker uses
    /// more. A fraction (written with a decimal point, such as 0.4) of the
    /// cgroup memory limit, or of the host's RAM when there is no limit; or
    /// an absolute size such as 2GiB.
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK", default_value = "0.4", value_parser = parse_watermark, value_name = "FRACTION|BYTES")]
    pub memory_high_watermark: MemoryWatermark,

    /// What the memory alarm measures: `rss` (resident set size, everything
    /// the process holds) or `allocated` (bytes allocated by the broker's
    /// heap, which falls as soon as messages are consumed).
    #[arg(long, env = "WARREN_MEMORY_CALCULATION_STRATEGY", value_enum, default_value_t = MemoryStrategy::Rss, value_name = "STRATEGY")]
    pub memory_calculation_strategy: MemoryStrategy,

    /// Disk free limit: publishers are blocked while the file system holding
    /// data_dir has less free space than this.
    #[arg(long, env = "WARREN_DISK_FREE_LIMIT", default_value = "50MiB", value_parser = parse_byte_size, value_name = "BYTES")]
    pub disk_free_limit: ByteSize,

    /// How long a unary Publish waits while a resource alarm blocks
    /// publishers before it fails with RESOURCE_EXHAUSTED. (Streaming
    /// publishes wait as long as the alarm lasts: the broker stops reading
    /// them.)
    #[arg(long, env = "WARREN_PUBLISH_BLOCK_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub publish_block_timeout: Duration,

    /// How often memory and disk are checked against their limits.
    #[arg(long, env = "WARREN_ALARM_CHECK_INTERVAL", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub alarm_check_interval: Duration,

    /// Log format: human-readable text or one JSON object per line (for log
    /// collectors). The level comes from RUST_LOG (default `info`).
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,

    // Client limits: what one client may ask of the broker.
    /// Most gRPC calls (HTTP/2 streams) open at once on one connection. A
    /// client that reaches it waits for one of its calls to end before the
    /// next starts (gRPC clients honour the limit the server announces).
    #[arg(long, env = "WARREN_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS, value_name = "N")]
    pub max_concurrent_streams: u32,

    /// How long a Consume stream may stay open before it sends its Subscribe
    /// request; past it the stream ends with RESOURCE_EXHAUSTED.
    #[arg(long, env = "WARREN_CONSUME_SUBSCRIBE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub consume_subscribe_timeout: Duration,

    /// Most headers one message may carry (top-level entries of its
    /// headers table); a message with more is rejected.
    #[arg(long, env = "WARREN_MAX_MESSAGE_HEADERS", default_value_t = DEFAULT_MAX_MESSAGE_HEADERS, value_name = "N")]
    pub max_message_headers: usize,

    /// Most bytes of headers one message may carry: names plus encoded
    /// values, nested lists and tables included; a message with more is
    /// rejected.
    #[arg(long, env = "WARREN_MAX_MESSAGE_HEADER_BYTES", default_value = "128KiB", value_parser = parse_usize_bytes, value_name = "BYTES")]
    pub max_message_header_bytes: usize,

    /// TLS, authentication, limits per user (`auth::config`).
    #[command(flatten)]
    pub security: crate::auth::config::SecurityConfig,
}

/// Default of `max_concurrent_streams`.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Default of `max_message_headers`.
pub const DEFAULT_MAX_MESSAGE_HEADERS: usize = 1024;
/// Default of `max_message_header_bytes`.
pub const DEFAULT_MAX_MESSAGE_HEADER_BYTES: usize = 128 << 10;

/// Why the configuration could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// Bad flags or environment, or `--help` / `--version`: clap prints it
    /// and picks the exit code.
    Args(clap::Error),
    /// The configuration file is unreadable or holds a bad setting.
    File(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Args(e) => write!(f, "{e}"),
            LoadError::File(e) => f.write_str(e),
        }
    }
}

impl Config {
    /// Reads the configuration from the process's arguments, environment
    /// and the configuration file they name.
    pub fn load() -> Result<Config, LoadError> {
        Config::load_from(std::env::args_os())
    }

    /// Reads the configuration from `args` (the first is the program name),
    /// the environment, and the configuration file they name.
    pub fn load_from<I, T>(args: I) -> Result<Config, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Config::command();
        let matches = cmd.clone().try_get_matches_from(&args).map_err(LoadError::Args)?;
        let config = Config::from_arg_matches(&matches).map_err(LoadError::Args)?;
        let Some(path) = config.config.clone() else {
            return Ok(config);
        };
        let table = read_file(&path)?;
        // Settings from the file become flags appended to the command line,
        // but only for settings neither a flag nor the environment gave:
        // clap then parses and checks them like any other value.
        let mut merged = args;
        for (key, value) in table {
            let Some(arg) = cmd.get_arguments().find(|a| a.get_id().as_str() == key && key != "config") else {
                return Err(LoadError::File(format!("{}: unknown setting '{key}'", path.display())));
            };
            if matches!(matches.value_source(&key), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
                continue;
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => {
                    let s = f.to_string();
                    if s.contains('.') { s } else { format!("{s}.0") }
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(LoadError::File(format!(
                        "{}: setting '{key}' must be a string or a number, not {}",
                        path.display(),
                        other.type_str()
                    )));
                }
            };
            let long = arg.get_long().unwrap_or(key.as_str());
            merged.push(format!("--{long}").into());
            merged.push(text.into());
        }
        let matches = cmd.try_get_matches_from(&merged).map_err(|e| LoadError::File(file_error(&path, &e)))?;
        Config::from_arg_matches(&matches).map_err(|e| LoadError::File(file_error(&path, &e)))
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_size == 0 {
            return Err("max_message_size must be greater than 0".into());
        }
        if !(RAFT_SNAPSHOT_ENTRIES_MIN..=RAFT_SNAPSHOT_ENTRIES_MAX).contains(&self.raft_snapshot_entries) {
            return Err(format!(
                "raft_snapshot_entries is {}; it must be between {RAFT_SNAPSHOT_ENTRIES_MIN} and {RAFT_SNAPSHOT_ENTRIES_MAX}",
                self.raft_snapshot_entries
            ));
        }
        if self.max_message_size > 512 << 20 {
            return Err(format!("max_message_size is {} bytes; the most allowed is 536870912 (512 MiB)", self.max_message_size));
        }
        if self.queue_window_messages == 0 {
            return Err("queue_window_messages must be greater than 0".into());
        }
        if self.queue_window_bytes == 0 {
            return Err("queue_window_bytes must be greater than 0".into());
        }
        if self.consumer_max_unacked == 0 {
            return Err("consumer_max_unacked must be greater than 0".into());
        }
        if self.consumer_max_unacked_bytes == 0 {
            return Err("consumer_max_unacked_bytes must be greater than 0".into());
        }
        if self.write_buffer_bytes < 1 << 20 || self.write_buffer_bytes > 4 << 30 {
            return Err(format!("write_buffer_bytes is {}; it must be between 1MiB and 4GiB", ByteSize(self.write_buffer_bytes)));
        }
        match self.memory_high_watermark {
            MemoryWatermark::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(format!("memory_high_watermark is {f}; a fraction must be greater than 0 and at most 1.0"));
            }
            MemoryWatermark::Bytes(b) if b < MIN_ABSOLUTE_WATERMARK => {
                return Err(format!(
                    "memory_high_watermark is {}; an absolute watermark below {} would block publishers from the start: \
                     write a fraction with a decimal point (0.4) or a size such as 2GiB",
                    ByteSize(b),
                    ByteSize(MIN_ABSOLUTE_WATERMARK)
                ));
            }
            _ => {}
        }
        if self.publish_block_timeout > Duration::from_secs(3600) {
            return Err(format!("publish_block_timeout is {}; the most allowed is 1h", show_duration(self.publish_block_timeout)));
        }
        if self.alarm_check_interval < Duration::from_millis(10) || self.alarm_check_interval > Duration::from_secs(60) {
            return Err(format!("alarm_check_interval is {}; it must be between 10ms and 60s", show_duration(self.alarm_check_interval)));
        }
        if self.http_addr.port() != 0 && self.http_addr == self.grpc_addr {
            return Err(format!("http_addr and grpc_addr are both {}; they must differ", self.http_addr));
        }
        self.security.validate()?;
        self.check_posture()?;
        self.validate_client_limits()
    }

    /// The default posture: gRPC beyond loopback needs authentication (or
    /// `--insecure`), and so does a cluster's node-to-node listener.
    pub fn check_posture(&self) -> Result<(), String> {
        self.security.check_posture(self.grpc_addr)?;
        if self.peers.is_some() {
            self.security.check_cluster_posture(self.cluster_addr)?;
        }
        Ok(())
    }

    /// Checks the client limits; the error names the setting.
    fn validate_client_limits(&self) -> Result<(), String> {
        if self.max_concurrent_streams == 0 {
            return Err("max_concurrent_streams must be greater than 0".into());
        }
        if self.consume_subscribe_timeout < Duration::from_millis(10) || self.consume_subscribe_timeout > Duration::from_secs(3600) {
            return Err(format!(
                "consume_subscribe_timeout is {}; it must be between 10ms and 1h",
                show_duration(self.consume_subscribe_timeout)
            ));
        }
        if self.max_message_headers == 0 {
            return Err("max_message_headers must be greater than 0".into());
        }
        if self.max_message_header_bytes == 0 {
            return Err("max_message_header_bytes must be greater than 0".into());
        }
        if self.max_message_header_bytes > 512 << 20 {
            return Err(format!(
                "max_message_header_bytes is {} bytes; the most allowed is 536870912 (512 MiB)",
                self.max_message_header_bytes
            ));
        }
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), String> {
        let Some(peers) = &self.peers else {
            if let Some(id) = self.node_id {
                return Err(format!("node_id is {id} but peers is not set: a cluster needs both (a single node needs neither)"));
            }
            return Ok(());
        };
        let Some(id) = self.node_id else {
            return Err(format!("peers is set ({peers}) but node_id is not: give this node's id, one of the peers"));
        };
        if !peers.0.contains_key(&id) {
            return Err(format!("node_id {id} is not among the peers ({peers}): list every member, this node included"));
        }
        for (name, addr) in [("grpc_addr", self.grpc_addr), ("http_addr", self.http_addr)] {
            if self.cluster_addr.port() != 0 && self.cluster_addr == addr {
                return Err(format!("cluster_addr and {name} are both {addr}; they must differ"));
            }
        }
        Ok(())
    }

    /// The cluster settings, when this node is a member of one (`peers`
    /// set and the configuration validated).
    pub fn cluster(&self) -> Option<(u64, SocketAddr, std::collections::BTreeMap<u64, String>)> {
        Some((self.node_id?, self.cluster_addr, self.peers.as_ref()?.0.clone()))
    }

    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "warren".into())
        })
    }

    /// The effective configuration, one `key = value` per line.
    pub fn render(&self) -> String {
        let rows: Vec<(&str, String)> = vec![
            ("config", self.config.as_ref().map_or_else(|| "(none)".to_string(), |p| p.display().to_string())),
            ("data_dir", self.data_dir.display().to_string()),
            ("grpc_addr", self.grpc_addr.to_string()),
            ("http_addr", self.http_addr.to_string()),
            ("node_name", self.node_name()),
            ("node_id", self.node_id.map_or_else(|| "(none)".to_string(), |n| n.to_string())),
            (
                "cluster_addr",
                if self.peers.is_some() { self.cluster_addr.to_string() } else { format!("{} (unused: no peers)", self.cluster_addr) },
            ),
            ("peers", self.peers.as_ref().map_or_else(|| "(none: a single node)".to_string(), Peers::to_string)),
            ("default_queue_type", format!("{:?}", self.default_queue_type).to_lowercase()),
            ("raft_snapshot_entries", self.raft_snapshot_entries.to_string()),
            ("max_message_size", self.max_message_size.to_string()),
            ("queue_window_messages", self.queue_window_messages.to_string()),
            ("queue_window_bytes", self.queue_window_bytes.to_string()),
            ("consumer_max_unacked", self.consumer_max_unacked.to_string()),
            ("consumer_max_unacked_bytes", self.consumer_max_unacked_bytes.to_string()),
            ("write_buffer_bytes", self.write_buffer_bytes.to_string()),
            ("block_cache_bytes", self.block_cache_bytes.to_string()),
            ("memory_high_watermark", self.memory_high_watermark.to_string()),
            ("memory_calculation_strategy", self.memory_calculation_strategy.as_str().to_string()),
            ("disk_free_limit", self.disk_free_limit.to_string()),
            ("publish_block_timeout", show_duration(self.publish_block_timeout)),
            ("alarm_check_interval", show_duration(self.alarm_check_interval)),
            ("log_format", format!("{:?}", self.log_format).to_lowercase()),
            ("max_concurrent_streams", self.max_concurrent_streams.to_string()),
            ("consume_subscribe_timeout", show_duration(self.consume_subscribe_timeout)),
            ("max_message_headers", self.max_message_headers.to_string()),
            ("max_message_header_bytes", self.max_message_header_bytes.to_string()),
        ];
        rows.iter().chain(self.security.render_rows().iter()).map(|(k, v)| format!("  {k} = {v}\n")).collect()
    }
}

fn read_file(path: &Path) -> Result<toml::Table, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::File(format!("cannot read the configuration file {}: {e}", path.display())))?;
    text.parse::<toml::Table>().map_err(|e| LoadError::File(format!("{} is not valid TOML: {}", path.display(), e.message())))
}

/// A clap error about a value that came from the file, as one line that
/// names the file and the setting.
fn file_error(path: &Path, e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ");
    format!("{}: {first}", path.display())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn load(args: &[&str]) -> Result<Config, LoadError> {
        Config::load_from(std::iter::once("warren-broker").chain(args.iter().copied()))
    }

    fn loaded(args: &[&str]) -> Config {
        load(args).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn should_parse_defaults_and_validate() {
        Config::command().debug_assert();
        let c = loaded(&[]);
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:5680");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:15680");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.memory_high_watermark, MemoryWatermark::Fraction(0.4));
        assert_eq!(c.disk_free_limit, ByteSize(50 << 20));
        assert_eq!(c.publish_block_timeout, Duration::from_secs(10));
        assert_eq!(c.alarm_check_interval, Duration::from_secs(1));
        assert!(c.validate().is_ok());
        let c = loaded(&["--max-message-size", "0"]);
        assert!(c.validate().unwrap_err().contains("max_message_size"));
    }

    #[test]
    fn should_parse_sizes_fractions_and_durations() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("1_000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        assert_eq!(parse_watermark("0.4"), Ok(MemoryWatermark::Fraction(0.4)));
        assert_eq!(parse_watermark("1GiB"), Ok(MemoryWatermark::Bytes(1 << 30)));
        assert_eq!(parse_watermark("1073741824"), Ok(MemoryWatermark::Bytes(1 << 30)));
        assert_eq!(MemoryWatermark::Fraction(0.5).resolve(1000), 500);
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(show_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(show_duration(Duration::from_secs(10)), "10s");
        assert_eq!(ByteSize(50 << 20).to_string(), "50MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn should_name_the_setting_in_every_error() {
        for (args, setting) in [
            (&["--memory-high-watermark", "1.5"][..], "memory_high_watermark"),
            (&["--memory-high-watermark", "0"][..], "memory_high_watermark"),
            (&["--memory-high-watermark", "1"][..], "memory_high_watermark"),
            (&["--alarm-check-interval", "1ms"][..], "alarm_check_interval"),
            (&["--publish-block-timeout", "2h"][..], "publish_block_timeout"),
            (&["--http-addr", "127.0.0.1:5680"][..], "http_addr"),
        ] {
            let err = loaded(args).validate().unwrap_err();
            assert!(err.contains(setting), "{args:?}: {err}");
        }
        for (args, flag) in [
            (&["--disk-free-limit", "plenty"][..], "--disk-free-limit"),
            (&["--memory-high-watermark", "a.b"][..], "--memory-high-watermark"),
            (&["--publish-block-timeout", "soon"][..], "--publish-block-timeout"),
        ] {
            let Err(LoadError::Args(e)) = load(args) else { panic!("{args:?} should not parse") };
            assert!(e.to_string().contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn should_refuse_an_unauthenticated_node_to_node_listener_beyond_loopback() {
        let cluster = |addr: &'static str, extra: &[&'static str]| {
            let mut args = vec!["--node-id", "1", "--peers", "1=n1:5681,2=n2:5681,3=n3:5681", "--cluster-addr", addr, "--auth"];
            args.extend_from_slice(extra);
            loaded(&args).validate()
        };
        assert!(cluster("127.0.0.1:5681", &[]).is_ok(), "loopback stays open");
        let err = cluster("0.0.0.0:5681", &[]).unwrap_err();
        assert!(err.contains("node-to-node") && err.contains("--cluster-secret-file") && err.contains("--insecure"), "{err}");
        assert!(cluster("0.0.0.0:5681", &["--cluster-secret-file", "/run/secrets/cluster"]).is_ok());
        assert!(cluster("0.0.0.0:5681", &["--insecure"]).is_ok());
        let tls = ["--cluster-tls-cert", "/tls/tls.crt", "--cluster-tls-key", "/tls/tls.key", "--cluster-tls-ca", "/tls/ca.crt"];
        assert!(cluster("0.0.0.0:5681", &tls).is_ok());
        // Mutual TLS needs all three files.
        let Err(LoadError::Args(e)) = load(&["--cluster-tls-cert", "/tls/tls.crt", "--cluster-tls-key", "/tls/tls.key"]) else {
            panic!("a cluster certificate without a CA should not parse")
        };
        assert!(e.to_string().contains("cluster-tls-ca"), "{e}");
        // A single node has no node-to-node listener to protect.
        assert!(loaded(&["--cluster-addr", "0.0.0.0:5681"]).validate().is_ok());
    }

    #[test]
    fn should_refuse_to_serve_beyond_loopback_without_authentication() {
        for addr in ["127.0.0.1:5680", "[::1]:5680"] {
            assert!(loaded(&["--grpc-addr", addr]).validate().is_ok(), "{addr}: loopback stays open");
        }
        for addr in ["0.0.0.0:5680", "[::]:5680", "10.1.2.3:5680"] {
            let err = loaded(&["--grpc-addr", addr]).validate().unwrap_err();
            assert!(err.contains("without authentication") && err.contains("--insecure"), "{addr}: {err}");
            assert!(loaded(&["--grpc-addr", addr, "--insecure"]).validate().is_ok(), "{addr} with --insecure");
            assert!(loaded(&["--grpc-addr", addr, "--insecure", "false"]).validate().is_err(), "{addr} with --insecure false");
            for auth in [&["--admin-password-file", "/run/secrets/pw"][..], &["--auth"], &["--kubernetes-auth", "token-review"]] {
                let mut args = vec!["--grpc-addr", addr];
                args.extend_from_slice(auth);
                assert!(loaded(&args).validate().is_ok(), "{addr} with {auth:?}");
            }
        }
    }

    #[test]
    fn should_load_and_check_the_client_limits() {
        let c = loaded(&[]);
        assert_eq!(c.max_concurrent_streams, DEFAULT_MAX_CONCURRENT_STREAMS);
        assert_eq!(c.consume_subscribe_timeout, Duration::from_secs(10));
        assert_eq!(c.max_message_headers, DEFAULT_MAX_MESSAGE_HEADERS);
        assert_eq!(c.max_message_header_bytes, DEFAULT_MAX_MESSAGE_HEADER_BYTES);
        let c = loaded(&[
            "--max-concurrent-streams",
            "8",
            "--consume-subscribe-timeout",
            "250ms",
            "--max-message-headers",
            "3",
            "--max-message-header-bytes",
            "1KiB",
        ]);
        assert!(c.validate().is_ok());
        assert_eq!((c.max_concurrent_streams, c.max_message_headers, c.max_message_header_bytes), (8, 3, 1024));
        assert_eq!(c.consume_subscribe_timeout, Duration::from_millis(250));
        let rendered = c.render();
        for line in [
            "max_concurrent_streams = 8",
            "consume_subscribe_timeout = 250ms",
            "max_message_headers = 3",
            "max_message_header_bytes = 1024",
        ] {
            assert!(rendered.contains(line), "{line} in {rendered}");
        }
        for (args, setting) in [
            (&["--max-concurrent-streams", "0"][..], "max_concurrent_streams"),
            (&["--consume-subscribe-timeout", "0s"][..], "consume_subscribe_timeout"),
            (&["--consume-subscribe-timeout", "2h"][..], "consume_subscribe_timeout"),
            (&["--max-message-headers", "0"][..], "max_message_headers"),
            (&["--max-message-header-bytes", "0"][..], "max_message_header_bytes"),
            (&["--max-message-header-bytes", "1GiB"][..], "max_message_header_bytes"),
        ] {
            let err = loaded(args).validate().unwrap_err();
            assert!(err.contains(setting), "{args:?}: {err}");
        }
        let Err(LoadError::Args(e)) = load(&["--max-concurrent-streams=-1"]) else { panic!("a negative stream limit parsed") };
        assert!(e.to_string().contains("--max-concurrent-streams"), "{e}");
    }

    #[test]
    fn should_parse_and_validate_cluster_settings() {
        let c = loaded(&[]);
        assert_eq!(c.peers, None);
        assert_eq!(c.cluster_addr.to_string(), "127.0.0.1:5681");
        assert!(c.cluster().is_none(), "no peers: a single node");
        assert!(c.render().contains("peers = (none: a single node)"));
        assert_eq!(c.raft_snapshot_entries, 10_000);
        assert_eq!(loaded(&["--raft-snapshot-entries", "100"]).raft_snapshot_entries, 100);

        let c = loaded(&[
            "--node-id",
            "2",
            "--cluster-addr",
            "0.0.0.0",
            "--peers",
            "1=warren-0.warren:5681, 2=warren-1.warren,3=10.0.0.3:7000",
            "--cluster-secret-file",
            "/run/secrets/cluster",
        ]);
        c.validate().unwrap();
        assert_eq!(c.cluster_addr.to_string(), "0.0.0.0:5681", "a bare IP gets the default port");
        let (id, listen, peers) = c.cluster().unwrap();
        assert_eq!((id, listen.port()), (2, 5681));
        assert_eq!(peers[&1], "warren-0.warren:5681");
        assert_eq!(peers[&2], "warren-1.warren:5681", "a missing port is 5681");
        assert_eq!(peers[&3], "10.0.0.3:7000");
        assert!(c.render().contains("peers = 1=warren-0.warren:5681,2=warren-1.warren:5681,3=10.0.0.3:7000"), "{}", c.render());
        assert_eq!(parse_peers("1=[::1]:5681,2=::1").unwrap().0[&2], "[::1]:5681");

        for (args, setting) in [
            (&["--peers", "1=a:1,2=b:2"][..], "node_id"),
            (&["--node-id", "3", "--peers", "1=a:1,2=b:2"][..], "node_id"),
            (&["--node-id", "3"][..], "peers"),
            (&["--node-id", "1", "--peers", "1=a:1", "--cluster-addr", "127.0.0.1:5680"][..], "cluster_addr"),
            (&["--raft-snapshot-entries", "99"][..], "raft_snapshot_entries"),
            (&["--raft-snapshot-entries", "1000001"][..], "raft_snapshot_entries"),
        ] {
            let err = loaded(args).validate().unwrap_err();
            assert!(err.contains(setting), "{args:?}: {err}");
        }
        for bad in ["1=a:1,1=b:2", "x=a:1", "1=a:port", "1=", "1=a:0", "a:1", ""] {
            assert!(parse_peers(bad).is_err(), "{bad:?} should not parse");
            let Err(LoadError::Args(e)) = load(&["--peers", bad]) else { panic!("{bad:?} should not load") };
            assert!(e.to_string().contains("--peers"), "{bad:?}: {e}");
        }
        let Err(LoadError::Args(e)) = load(&["--cluster-addr", "warren-0:5681"]) else { panic!("a name is not a bind address") };
        assert!(e.to_string().contains("--cluster-addr"), "{e}");
    }

    #[test]
    fn should_take_cluster_settings_from_the_file_and_environment() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, "node_id = 1\ncluster_addr = \"0.0.0.0:7001\"\npeers = \"1=n1:7001,2=n2:7001,3=n3:7001\"\ncluster_secret_file = \"/run/secrets/cluster\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let c = loaded(&["--config", path.to_str().unwrap_or_default()]);
        c.validate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.node_id, Some(1));
        assert_eq!(c.cluster_addr.to_string(), "0.0.0.0:7001");
        assert_eq!(c.peers.as_ref().map(|p| p.0.len()), Some(3));
    }

    #[test]
    fn should_take_settings_from_the_file_below_flags() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("warren.toml");
        std::fs::write(
            &path,
            "# comment\nqueue_window_messages = 77\nblock_cache_bytes = \"64MiB\"\nmemory_high_watermark = 0.5\n\
             disk_free_limit = 1048576\npublish_block_timeout = \"250ms\"\nlog_format = \"json\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let file = path.to_str().unwrap_or_default();
        let c = loaded(&["--config", file, "--block-cache-bytes", "1024"]);
        assert_eq!(c.queue_window_messages, 77, "from the file");
        assert_eq!(c.block_cache_bytes, 1024, "the flag wins over the file");
        assert_eq!(c.memory_high_watermark, MemoryWatermark::Fraction(0.5));
        assert_eq!(c.disk_free_limit, ByteSize(1 << 20));
        assert_eq!(c.publish_block_timeout, Duration::from_millis(250));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:5680", "default when nobody sets it");

        std::fs::write(&path, "disk_free_limt = 5\n").unwrap_or_else(|e| panic!("{e}"));
        let err = load(&["--config", file]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unknown setting 'disk_free_limt'"), "{err}");
        std::fs::write(&path, "disk_free_limit = \"heaps\"\n").unwrap_or_else(|e| panic!("{e}"));
        let err = load(&["--config", file]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("disk-free-limit") && err.contains("warren.toml"), "{err}");
        std::fs::write(&path, "queue_window_messages = [1]\n").unwrap_or_else(|e| panic!("{e}"));
        let err = load(&["--config", file]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("queue_window_messages"), "{err}");
        std::fs::write(&path, "queue_window_messages = \n").unwrap_or_else(|e| panic!("{e}"));
        let err = load(&["--config", file]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not valid TOML"), "{err}");
        let err = load(&["--config", "/nonexistent/warren.toml"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cannot read the configuration file"), "{err}");
    }
}
