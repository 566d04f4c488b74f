//! The broker's configuration: one typed struct, from flags and `WARREN_*`
//! environment variables, validated at start and printed once.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Warren message broker: AMQP 0-9-1 messaging over gRPC, stored in RocksDB.
#[derive(Clone, Debug, Parser)]
#[command(name = "warren-broker", version, about, long_about = None)]
pub struct Config {
    /// Directory of the node's RocksDB database (created if missing).
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Address the gRPC server listens on. Port 0 picks a free port (the
    /// chosen address is printed in the `ready` line).
    #[arg(long, env = "WARREN_GRPC_ADDR", default_value = "127.0.0.1:5680")]
    pub grpc_addr: SocketAddr,

    /// Name of this node in status and logs (default: the host name).
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node_name: Option<String>,

    /// Largest message body accepted, in bytes.
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE", default_value_t = 16 << 20)]
    pub max_message_size: usize,

    /// Ready messages per queue held in memory; the rest of a backlog stays
    /// on disk.
    #[arg(long, env = "WARREN_QUEUE_WINDOW_MESSAGES", default_value_t = 2048)]
    pub queue_window_messages: usize,

    /// Body bytes per queue held in memory.
    #[arg(long, env = "WARREN_QUEUE_WINDOW_BYTES", default_value_t = 8 << 20)]
    pub queue_window_bytes: u64,

    /// RocksDB block cache, in bytes.
    #[arg(long, env = "WARREN_BLOCK_CACHE_BYTES", default_value_t = 32 << 20)]
    pub block_cache_bytes: usize,

    /// Log format: human-readable text or one JSON object per line. The level
    /// comes from RUST_LOG (default `info`).
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_size == 0 {
            return Err("max_message_size must be greater than 0".into());
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
        Ok(())
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
            ("data_dir", self.data_dir.display().to_string()),
            ("grpc_addr", self.grpc_addr.to_string()),
            ("node_name", self.node_name()),
            ("max_message_size", self.max_message_size.to_string()),
            ("queue_window_messages", self.queue_window_messages.to_string()),
            ("queue_window_bytes", self.queue_window_bytes.to_string()),
            ("block_cache_bytes", self.block_cache_bytes.to_string()),
            ("log_format", format!("{:?}", self.log_format).to_lowercase()),
        ];
        rows.iter().map(|(k, v)| format!("  {k} = {v}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn should_parse_defaults_and_validate() {
        Config::command().debug_assert();
        let c = Config::try_parse_from(["warren-broker"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:5680");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(c.validate().is_ok());
        let c = Config::try_parse_from(["warren-broker", "--max-message-size", "0"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.validate().unwrap_err().contains("max_message_size"));
    }
}
