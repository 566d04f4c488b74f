//! What a run does: producers, consumers, queues, messages, pacing and
//! length. One [`Workload`] drives either broker with the same settings.

use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

/// How messages are routed from producers to queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// One binding per queue (key = queue name); producers spread messages
    /// over the queues round-robin.
    Direct,
    /// Every message goes to every queue.
    Fanout,
    /// Queue `i` is bound with `bench.q<i>.*`; producers publish
    /// `bench.q<i>.msg` round-robin.
    Topic,
}

impl ExchangeType {
    pub fn exchange_name(self) -> &'static str {
        match self {
            ExchangeType::Direct => "warren-bench.direct",
            ExchangeType::Fanout => "warren-bench.fanout",
            ExchangeType::Topic => "warren-bench.topic",
        }
    }

    /// The binding key of queue `index` (named `queue`).
    pub fn binding_key(self, index: usize, queue: &str) -> String {
        match self {
            ExchangeType::Direct => queue.to_string(),
            ExchangeType::Fanout => String::new(),
            ExchangeType::Topic => format!("bench.q{index}.*"),
        }
    }

    /// The routing key of a message meant for queue `index`.
    pub fn routing_key(self, index: usize, queue: &str) -> String {
        match self {
            ExchangeType::Direct => queue.to_string(),
            ExchangeType::Fanout => String::new(),
            ExchangeType::Topic => format!("bench.q{index}.msg"),
        }
    }

    /// How many queues receive each published message.
    pub fn copies(self, queues: usize) -> u64 {
        match self {
            ExchangeType::Fanout => queues as u64,
            _ => 1,
        }
    }
}

/// The kind of queue a workload declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    /// A durable queue with no type argument: Warren's only single-node
    /// kind; RabbitMQ's classic queue in its default version (1 in 3.10).
    Classic,
    /// RabbitMQ: a classic queue, version 2 (`x-queue-version: 2`, the
    /// faster, non-lazy-by-design index of 3.10). Warren: the same as
    /// `classic`.
    ClassicV2,
    /// A replicated queue (`x-queue-type: quorum`) on both brokers; needs a
    /// cluster for replication (RabbitMQ accepts it on one node too).
    Quorum,
}

impl QueueType {
    /// RabbitMQ's declare arguments for this type.
    pub fn rabbitmq_arguments(self) -> Vec<(&'static str, QueueArg)> {
        match self {
            QueueType::Classic => vec![],
            QueueType::ClassicV2 => vec![("x-queue-version", QueueArg::Int(2))],
            QueueType::Quorum => vec![("x-queue-type", QueueArg::Str("quorum"))],
        }
    }

    /// Warren's declare arguments: no queue version (Warren has one
    /// single-node queue implementation).
    pub fn warren_arguments(self) -> Vec<(&'static str, QueueArg)> {
        match self {
            QueueType::Classic | QueueType::ClassicV2 => vec![],
            QueueType::Quorum => vec![("x-queue-type", QueueArg::Str("quorum"))],
        }
    }
}

/// A queue argument's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueArg {
    Int(i64),
    Str(&'static str),
}

/// A workload: the same flags for both brokers.
#[derive(Clone, Debug, Args, Serialize)]
pub struct Workload {
    /// Publishing clients, each on its own connection.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consuming clients, each on its own connection; consumer `i` reads
    /// queue `i % queues`. Must be at least `queues` (every queue drained).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Durable queues (`<prefix>-0` ...).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Body size in bytes (at least 8: the first 8 carry the send time).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Transient messages (default: persistent, delivery mode 2).
    #[arg(long)]
    pub transient: bool,
    /// Unconfirmed messages each producer may have in flight.
    #[arg(long, default_value_t = 256)]
    pub confirm_window: usize,
    /// Unacknowledged deliveries each consumer may hold (QoS).
    #[arg(long, default_value_t = 256)]
    pub prefetch: u32,
    /// Total publish rate in messages per second over all producers; 0 means
    /// as fast as confirms allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How long producers publish (`10s`, `500ms`, `2m`). Ignored with
    /// `--count` and `--backlog`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Publish this many messages in total instead of running for a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Leading part of the run left out of rates and latencies.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,
    #[arg(long, value_enum, default_value_t = ExchangeType::Direct)]
    pub exchange: ExchangeType,
    /// Backlog mode: publish this many messages with no consumer running,
    /// then start the consumers and drain the queues.
    #[arg(long)]
    pub backlog: Option<u64>,
    /// In backlog mode, restart the broker between fill and drain and time
    /// how long it takes to be ready again (needs a broker the bench
    /// started, or RabbitMQ's `rabbitmqctl`).
    #[arg(long)]
    pub restart: bool,
    /// Queue name prefix.
    #[arg(long, default_value = "warren-bench")]
    pub queue_prefix: String,
    /// The queues' type (declare arguments).
    #[arg(long, value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
    /// Give up on messages not consumed this long after the producers stop.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            producers: 1,
            consumers: 1,
            queues: 1,
            size: 1024,
            transient: false,
            confirm_window: 256,
            prefetch: 256,
            rate: 0,
            duration: Duration::from_secs(10),
            count: None,
            warmup: Duration::ZERO,
            exchange: ExchangeType::Direct,
            backlog: None,
            restart: false,
            queue_prefix: "warren-bench".into(),
            queue_type: QueueType::Classic,
            drain_timeout: Duration::from_secs(60),
        }
    }
}

impl Workload {
    pub fn persistent(&self) -> bool {
        !self.transient
    }

    pub fn queue_name(&self, index: usize) -> String {
        format!("{}-{index}", self.queue_prefix)
    }

    pub fn queue_names(&self) -> Vec<String> {
        (0..self.queues).map(|i| self.queue_name(i)).collect()
    }

    /// Messages the producers publish in total, when bounded by count.
    pub fn total_messages(&self) -> Option<u64> {
        self.backlog.or(self.count)
    }

    /// Messages producer `index` publishes, when bounded by count.
    pub fn per_producer(&self, index: usize) -> Option<u64> {
        let total = self.total_messages()?;
        let p = self.producers as u64;
        let i = index as u64;
        Some(total / p + u64::from(i < total % p))
    }

    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.producers == 0 {
            return Err("--producers must be at least 1".into());
        }
        if self.queues == 0 {
            return Err("--queues must be at least 1".into());
        }
        if self.consumers < self.queues {
            return Err(format!(
                "--consumers ({}) must be at least --queues ({}) so that every queue is drained",
                self.consumers, self.queues
            ));
        }
        if self.size < 8 {
            return Err("--size must be at least 8 bytes (the send timestamp)".into());
        }
        if self.confirm_window == 0 {
            return Err("--confirm-window must be at least 1".into());
        }
        if self.prefetch == 0 {
            return Err("--prefetch must be at least 1 (unlimited prefetch is not comparable)".into());
        }
        if self.count == Some(0) || self.backlog == Some(0) {
            return Err("--count and --backlog must be at least 1".into());
        }
        if self.restart && self.backlog.is_none() {
            return Err("--restart needs --backlog".into());
        }
        if self.total_messages().is_none() && self.duration <= self.warmup {
            return Err("--duration must be longer than --warmup".into());
        }
        Ok(())
    }
}

/// Parses `250ms`, `10s`, `2m`, or a plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 2m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration {s:?}: must be a non-negative number"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        w: Workload,
    }

    #[test]
    fn should_parse_durations_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn should_parse_workload_flags_and_defaults() {
        let w = Cli::try_parse_from(["x"]).unwrap().w;
        assert_eq!((w.producers, w.consumers, w.queues, w.size), (1, 1, 1, 1024));
        assert!(w.persistent());
        assert_eq!(w.exchange, ExchangeType::Direct);
        assert!(w.validate().is_ok());
        let w = Cli::try_parse_from([
            "x",
            "--producers",
            "4",
            "--consumers",
            "10",
            "--queues",
            "10",
            "--exchange",
            "fanout",
            "--transient",
            "--rate",
            "5000",
            "--duration",
            "3s",
            "--warmup",
            "500ms",
        ])
        .unwrap()
        .w;
        assert_eq!(w.exchange, ExchangeType::Fanout);
        assert!(!w.persistent());
        assert_eq!(w.rate, 5000);
        assert_eq!(w.duration, Duration::from_secs(3));
        assert_eq!(w.warmup, Duration::from_millis(500));
        assert_eq!(w.exchange.copies(w.queues), 10);
        assert!(w.validate().is_ok());
        assert_eq!(w.queue_type, QueueType::Classic);
        let w = Cli::try_parse_from(["x", "--queue-type", "classic-v2"]).unwrap().w;
        assert_eq!(w.queue_type, QueueType::ClassicV2);
        let w = Cli::try_parse_from(["x", "--queue-type", "quorum"]).unwrap().w;
        assert_eq!(w.queue_type, QueueType::Quorum);
    }

    #[test]
    fn should_reject_inconsistent_workloads() {
        let w = Workload { consumers: 1, queues: 2, ..Workload::default() };
        assert!(w.validate().unwrap_err().contains("--consumers"));
        let w = Workload { size: 4, ..Workload::default() };
        assert!(w.validate().unwrap_err().contains("--size"));
        let w = Workload { restart: true, ..Workload::default() };
        assert!(w.validate().unwrap_err().contains("--backlog"));
    }

    #[test]
    fn should_map_queue_types_to_declare_arguments() {
        assert!(QueueType::Classic.rabbitmq_arguments().is_empty());
        assert_eq!(QueueType::ClassicV2.rabbitmq_arguments(), vec![("x-queue-version", QueueArg::Int(2))]);
        assert!(QueueType::ClassicV2.warren_arguments().is_empty());
        assert_eq!(QueueType::Quorum.rabbitmq_arguments(), vec![("x-queue-type", QueueArg::Str("quorum"))]);
        assert_eq!(QueueType::Quorum.warren_arguments(), QueueType::Quorum.rabbitmq_arguments());
    }

    #[test]
    fn should_split_counts_over_producers() {
        let w = Workload { producers: 3, count: Some(10), ..Workload::default() };
        let split: Vec<u64> = (0..3).map(|i| w.per_producer(i).unwrap()).collect();
        assert_eq!(split, vec![4, 3, 3]);
        assert_eq!(Workload::default().per_producer(0), None);
    }
}
