//! Prometheus metrics.
//!
//! * Node-wide counters and histograms live in one process-wide [`Metrics`]
//!   ([`global`]): plain atomics, so that counting on the publish and
//!   deliver paths is one relaxed atomic add and never takes a lock. One
//!   broker runs per process; tests that start several brokers in one
//!   process share these counters.
//! * Per-queue gauges are not registered per queue: at scrape time the
//!   [`BrokerCollector`] takes the broker's routing snapshot once and reads
//!   each queue's published counts ([`crate::queue::QueueShared`]), so 10,000
//!   queues cost one pass over 10,000 sets of atomics and nothing between
//!   scrapes. Counters carry no `queue` label: per-queue rates follow from
//!   the gauges, and a label would multiply the series count by the number
//!   of queues on every scrape.
//!
//! Names follow Prometheus conventions: the `warren_` prefix, base units
//! (seconds, bytes) in the name, `_total` on counters. The full list is in
//! `docs/observability.md`.
//!
//! Two exposition formats, negotiated on `Accept` ([`Format::negotiate`]):
//! OpenMetrics 1.0 when the scraper asks for it (Prometheus does), else the
//! Prometheus text format 0.0.4 (what `curl` and older tools get). The
//! registry encodes OpenMetrics; [`to_prometheus_text`] rewrites the few
//! lines that differ. Nothing here emits exemplars or `_created` samples,
//! which 0.0.4 could not carry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::{Registry, Unit};
use warren_client::proto::ConfirmStatus;

use crate::alarms::{self, Resource};
use crate::broker::Broker;
use crate::queue::state::{OutDelivery, QueueStats};
use crate::topology::Snapshot;

/// Confirm statuses, in the order of [`Metrics::confirmed`].
const CONFIRM_STATUSES: [&str; 5] = ["routed", "unroutable", "returned", "rejected", "duplicate"];

/// Dead-letter reasons as RabbitMQ names them (`x-death` `reason`), and a
/// catch-all.
const DEAD_LETTER_REASONS: [&str; 5] = ["rejected", "expired", "maxlen", "delivery_limit", "other"];

fn reason_index(reason: &str) -> usize {
    DEAD_LETTER_REASONS.iter().position(|r| *r == reason).unwrap_or(DEAD_LETTER_REASONS.len() - 1)
}

/// A histogram with fixed bucket bounds, updated with atomics only.
/// Observations are integers in a unit `scale` times smaller than the
/// exposed one (nanoseconds for seconds).
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds (inclusive), ascending, in observation units.
    bounds: Box<[u64]>,
    /// One counter per bound, plus the `+Inf` bucket.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    scale: f64,
}

impl Histogram {
    /// Bounds in seconds; observations as durations.
    pub fn seconds(bounds: impl IntoIterator<Item = f64>) -> Histogram {
        Histogram::new(bounds.into_iter().map(|s| (s * 1e9).round() as u64).collect(), 1e9)
    }

    /// Bounds and observations as plain counts.
    pub fn counts(bounds: impl IntoIterator<Item = u64>) -> Histogram {
        Histogram::new(bounds.into_iter().collect(), 1.0)
    }

    fn new(mut bounds: Vec<u64>, scale: f64) -> Histogram {
        bounds.sort_unstable();
        bounds.dedup();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram { bounds: bounds.into_boxed_slice(), counts, sum: AtomicU64::new(0), scale }
    }

    /// Records one value, in observation units.
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// (sum, count, per-bucket counts with their upper bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let buckets = self.bounds.iter().map(|b| *b as f64 / self.scale).chain(std::iter::once(f64::INFINITY)).zip(counts.iter().copied());
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.scale;
        (sum, counts.iter().sum(), buckets.collect())
    }

    fn encode(&self, m: &mut MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Node-wide counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    confirmed: [AtomicU64; 5],
    delivered: AtomicU64,
    redelivered: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    dead_lettered: [AtomicU64; 5],
    dropped: [AtomicU64; 5],
    expired: AtomicU64,
    queue_reloads: AtomicU64,
    /// From a publish's arrival to its confirm, for messages routed to at
    /// least one queue (durable ones include the WAL sync).
    pub confirm_latency: Histogram,
    /// From enqueue to first delivery.
    pub publish_to_deliver: Histogram,
    /// Duration of synced store batches (write + WAL fsync).
    pub wal_sync: Histogram,
    /// Write requests merged into each synced batch.
    pub wal_sync_batch: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

fn geometric(start: f64, factor: f64, n: usize) -> impl Iterator<Item = f64> {
    (0..n).map(move |i| start * factor.powi(i as i32))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            confirmed: Default::default(),
            delivered: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            dead_lettered: Default::default(),
            dropped: Default::default(),
            expired: AtomicU64::new(0),
            queue_reloads: AtomicU64::new(0),
            // 50µs .. ~6.5s
            confirm_latency: Histogram::seconds(geometric(0.00005, 2.0, 18)),
            // 1ms .. ~4.5h: a message can wait in a backlog for hours.
            publish_to_deliver: Histogram::seconds(geometric(0.001, 4.0, 13)),
            // 50µs .. ~1.6s
            wal_sync: Histogram::seconds(geometric(0.00005, 2.0, 16)),
            // 1 .. 4096 requests
            wal_sync_batch: Histogram::counts((0..13).map(|i| 1u64 << i)),
        }
    }

    /// A confirm went to a publisher.
    pub fn confirmed(&self, status: ConfirmStatus) {
        let i = match status {
            ConfirmStatus::Routed => 0,
            ConfirmStatus::Unroutable | ConfirmStatus::Unspecified => 1,
            ConfirmStatus::Returned => 2,
            ConfirmStatus::Rejected => 3,
            ConfirmStatus::Duplicate => 4,
        };
        self.confirmed[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A message was handed to a consumer (or a Get); `since_enqueue` is how
    /// long it waited, observed for first deliveries only.
    pub fn delivered(&self, redelivered: bool, since_enqueue: Duration) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if redelivered {
            self.redelivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.publish_to_deliver.observe_duration(since_enqueue);
        }
    }

    /// Messages handed out by a queue (to consumers, or to a Get).
    pub fn deliveries(&self, ds: &[OutDelivery]) {
        if ds.is_empty() {
            return;
        }
        let now = crate::model::now_ms();
        for d in ds {
            self.delivered(d.redelivered, Duration::from_millis(now.saturating_sub(d.msg.enqueued_at_ms)));
        }
    }

    pub fn acked(&self, n: u64) {
        if n > 0 {
            self.acked.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Messages acknowledged by consumers so far.
    pub fn acked_total(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Messages negatively acknowledged (nack or reject, requeued or not).
    pub fn nacked(&self, n: u64) {
        if n > 0 {
            self.nacked.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A message was dead-lettered. `reason` is the `x-death` reason:
    /// `rejected`, `expired`, `maxlen` or `delivery_limit`.
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// A message left its queue for one of the dead-letter reasons, but the
    /// queue has no dead-letter exchange: it is gone.
    pub fn dropped(&self, reason: &str) {
        self.dropped[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// Messages expired (message TTL or per-message expiration), whether or
    /// not they were dead-lettered.
    pub fn expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
    }

    /// A queue dropped its memory and started again from storage (after a
    /// failed write or an internal error).
    pub fn queue_reloaded(&self) {
        self.queue_reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// The store writer finished a batch (the [`crate::store::BatchObserver`]).
    pub fn store_batch(&self, requests: usize, synced: bool, took: Duration) {
        if synced {
            self.wal_sync.observe_duration(took);
            self.wal_sync_batch.observe(requests as u64);
        }
    }

    /// The confirm of a message routed to at least one queue was decided.
    pub fn confirm_latency(&self, since_publish: Instant) {
        self.confirm_latency.observe_duration(since_publish.elapsed());
    }
}

// ------------------------------------------------------------- exposition

/// Everything `/metrics` shows: the node's counters, the process's
/// resources and alarms, and (once recovery has finished) the broker's
/// queues.
#[derive(Default)]
pub struct BrokerCollector {
    broker: OnceLock<Broker>,
    started: OnceLock<Instant>,
    cluster: OnceLock<crate::cluster::Liveness>,
    raft_quiet: OnceLock<Arc<AtomicU64>>,
    raft: OnceLock<crate::raft::RaftHost>,
}

impl std::fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCollector").field("recovered", &self.broker.get().is_some()).finish()
    }
}

impl BrokerCollector {
    pub fn new() -> Arc<BrokerCollector> {
        let c = BrokerCollector::default();
        let _ = c.started.set(Instant::now());
        Arc::new(c)
    }

    /// Starts showing the broker's queues (after recovery).
    pub fn set_broker(&self, broker: Broker) {
        let _ = self.broker.set(broker);
    }

    /// Starts showing which cluster members answer heartbeats.
    pub fn set_cluster(&self, liveness: crate::cluster::Liveness) {
        let _ = self.cluster.set(liveness);
    }

    /// Starts showing how many Raft groups are quiet on this node.
    pub fn set_raft_quiet(&self, quiet: Arc<AtomicU64>) {
        let _ = self.raft_quiet.set(quiet);
    }

    /// Starts showing this node's view of each quorum queue's Raft group.
    pub fn set_raft(&self, host: crate::raft::RaftHost) {
        let _ = self.raft.set(host);
    }
}

/// A registry with the `warren_` prefix and the collector.
pub fn registry(collector: Arc<BrokerCollector>) -> Registry {
    let mut registry = Registry::with_prefix("warren");
    registry.register_collector(Box::new(collector));
    registry
}

/// The text exposition (OpenMetrics) of `registry`.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(64 << 10);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An exposition format `/metrics` answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
}

impl Format {
    /// The format for a request's `Accept` header, as Prometheus's own
    /// client libraries choose it: the acceptable media range with the
    /// highest `q` (the first one on a tie) among `application/openmetrics-text`
    /// and `text/plain`; the Prometheus text format when the header names
    /// neither (or is missing).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';');
            let format = match parts.next().unwrap_or_default().trim().to_ascii_lowercase().as_str() {
                "application/openmetrics-text" => Format::OpenMetrics,
                "text/plain" => Format::Prometheus,
                _ => continue,
            };
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map_or(Format::Prometheus, |(_, f)| f)
    }

    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => CONTENT_TYPE,
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The exposition of `registry` in `format`.
pub fn encode_as(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let text = encode(registry)?;
    Ok(match format {
        Format::OpenMetrics => text,
        Format::Prometheus => to_prometheus_text(&text),
    })
}

/// Rewrites an OpenMetrics exposition (as [`encode`] writes it: no
/// exemplars, no `_created`) into the Prometheus text format 0.0.4. Samples
/// are the same in both; the metadata differs:
///
/// * a counter's `HELP` and `TYPE` name its sample, `x_total`, not the
///   family `x`;
/// * `info` does not exist: `x` of type info becomes the gauge `x_info`
///   (its sample, always 1); `unknown` is `untyped`;
/// * there is no `# UNIT` line and no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, which decides its name.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "unknown" => (family.to_string(), "untyped"),
                other => (family.to_string(), other),
            };
            if let Some(text) = help.take().and_then(|h| h.strip_prefix(family)) {
                out.push_str("# HELP ");
                out.push_str(&name);
                out.push_str(text);
                out.push('\n');
            }
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn counter(m: &mut MetricEncoder<'_>, v: u64) -> Result<(), std::fmt::Error> {
    m.encode_counter::<NoLabelSet, u64, u64>(&v, None::<&Exemplar<NoLabelSet, u64>>)
}

fn labelled_counter(m: &mut MetricEncoder<'_>, labels: &impl EncodeLabelSet, v: u64) -> Result<(), std::fmt::Error> {
    m.encode_family(labels)?.encode_counter::<NoLabelSet, u64, u64>(&v, None::<&Exemplar<NoLabelSet, u64>>)
}

impl Collector for BrokerCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = global();
        let gauge = MetricType::Gauge;
        let ctr = MetricType::Counter;

        // Node counters.
        {
            let help = "Publisher confirms sent, by status (routed, unroutable, returned, rejected, duplicate).";
            let mut e = enc.encode_descriptor("messages_confirmed", help, None, ctr)?;
            for (status, v) in CONFIRM_STATUSES.iter().zip(&m.confirmed) {
                labelled_counter(&mut e, &[("status", *status)], v.load(Ordering::Relaxed))?;
            }
        }
        let help = "Mandatory messages returned to their publisher as unroutable (also in messages_confirmed).";
        counter(&mut enc.encode_descriptor("messages_returned", help, None, ctr)?, m.confirmed[2].load(Ordering::Relaxed))?;
        let rows: [(&str, &str, &AtomicU64); 6] = [
            ("messages_delivered", "Messages handed to consumers and to Get, redeliveries included.", &m.delivered),
            ("messages_redelivered", "Deliveries of messages delivered before.", &m.redelivered),
            ("messages_acknowledged", "Messages acknowledged by consumers.", &m.acked),
            ("messages_nacked", "Messages negatively acknowledged (nack or reject), requeued or not.", &m.nacked),
            ("messages_expired", "Messages that expired (message TTL or per-message expiration).", &m.expired),
            (
                "queue_reloads",
                "Queues restarted from storage after a failed write or an internal error (their consumers were cancelled).",
                &m.queue_reloads,
            ),
        ];
        for (name, help, v) in rows {
            counter(&mut enc.encode_descriptor(name, help, None, ctr)?, v.load(Ordering::Relaxed))?;
        }
        {
            let help = "Messages dead-lettered, by reason (rejected, expired, maxlen, delivery_limit).";
            let mut e = enc.encode_descriptor("messages_dead_lettered", help, None, ctr)?;
            for (reason, v) in DEAD_LETTER_REASONS.iter().zip(&m.dead_lettered) {
                labelled_counter(&mut e, &[("reason", *reason)], v.load(Ordering::Relaxed))?;
            }
        }
        {
            let help = "Messages that left their queue for a dead-letter reason with no dead-letter exchange to go to: dropped, by reason.";
            let mut e = enc.encode_descriptor("messages_dropped", help, None, ctr)?;
            for (reason, v) in DEAD_LETTER_REASONS.iter().zip(&m.dropped) {
                labelled_counter(&mut e, &[("reason", *reason)], v.load(Ordering::Relaxed))?;
            }
        }

        // Histograms.
        let hists: [(&str, &str, Option<Unit>, &Histogram); 4] = [
            (
                "confirm_latency",
                "From a publish's arrival to its confirm, for messages routed to a queue.",
                Some(Unit::Seconds),
                &m.confirm_latency,
            ),
            (
                "publish_to_deliver_latency",
                "From enqueue to first delivery (wall clock, millisecond resolution).",
                Some(Unit::Seconds),
                &m.publish_to_deliver,
            ),
            ("wal_sync_duration", "Duration of a synced store batch: write and WAL fsync.", Some(Unit::Seconds), &m.wal_sync),
            ("wal_sync_batch_requests", "Write requests merged into one synced batch (group commit).", None, &m.wal_sync_batch),
        ];
        for (name, help, unit, h) in hists {
            h.encode(&mut enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Histogram)?)?;
        }

        // Process and resources.
        let a = alarms::global();
        let s = a.sample();
        let bytes = Some(Unit::Bytes);
        let rows: [(&str, &str, u64); 7] = [
            ("process_resident_memory", "Resident set size of the broker process.", s.rss_bytes),
            ("heap_allocated", "Bytes allocated by the broker's heap allocator (jemalloc).", s.heap_bytes),
            ("memory_used", "Memory as the memory alarm measures it (memory_calculation_strategy).", s.memory_used),
            ("memory_limit", "The memory high watermark.", s.memory_limit),
            ("disk_free", "Free space of the file system holding the data directory.", s.disk_free),
            ("disk_free_limit", "The disk free limit.", s.disk_free_limit),
            ("store_disk_usage", "Bytes the RocksDB database uses on disk.", s.store_disk_usage),
        ];
        for (name, help, v) in rows {
            enc.encode_descriptor(name, help, bytes.as_ref(), gauge)?.encode_gauge(&v)?;
        }
        {
            let mut e =
                enc.encode_descriptor("alarm", "1 while a resource alarm is raised (publishers are blocked), else 0.", None, gauge)?;
            for r in [Resource::Memory, Resource::Disk] {
                e.encode_family(&[("resource", r.as_str())])?.encode_gauge(&u64::from(a.is_raised(r)))?;
            }
        }
        if let Some(started) = self.started.get() {
            enc.encode_descriptor("uptime", "Time since the broker process started.", Some(&Unit::Seconds), gauge)?
                .encode_gauge(&started.elapsed().as_secs_f64())?;
        }
        enc.encode_descriptor("build", "Version of the broker.", None, MetricType::Info)?
            .encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        if let Some(liveness) = self.cluster.get() {
            let help = "1 while a cluster member answers the node-pair heartbeat (this node: always 1), else 0.";
            let mut e = enc.encode_descriptor("cluster_peer_up", help, None, gauge)?;
            for (node, status) in liveness.current() {
                e.encode_family(&[("node", node.to_string().as_str())])?.encode_gauge(&u64::from(status.alive))?;
            }
        }
        if let Some(quiet) = self.raft_quiet.get() {
            let help = "Raft groups quiet on this node: idle, without ticks, heartbeats or election timers.";
            enc.encode_descriptor("raft_groups_quiet", help, None, gauge)?.encode_gauge(&quiet.load(Ordering::Relaxed))?;
        }
        if let Some(host) = self.raft.get() {
            let stats = host.log_stats();
            let rows: [(&str, &str, &AtomicU64); 2] = [
                ("raft_log_cached", "Bytes of written Raft entries kept in memory until applied (at most 32 MiB).", &stats.cached_bytes),
                (
                    "raft_unwritten",
                    "Bytes of quorum queues' applied state held in memory before it is written to the store (about 64 MiB at most: then the next queue to apply writes its own).",
                    &stats.unwritten_bytes,
                ),
            ];
            for (name, help, v) in rows {
                enc.encode_descriptor(name, help, Some(&Unit::Bytes), gauge)?.encode_gauge(&v.load(Ordering::Relaxed))?;
            }
        }

        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let published = broker.totals().published.load(Ordering::Relaxed);
        counter(&mut enc.encode_descriptor("messages_published", "Messages received from publishers.", None, ctr)?, published)?;
        let stats = broker.store().stats();
        let rows: [(&str, &str, Option<Unit>, &AtomicU64); 3] = [
            ("store_write_batches", "Batches the store writer applied.", None, &stats.batches),
            ("store_synced_batches", "Batches the store writer synced to the WAL.", None, &stats.synced_batches),
            ("store_written", "Bytes of keys and values the store writer applied.", Some(Unit::Bytes), &stats.bytes),
        ];
        for (name, help, unit, v) in rows {
            counter(&mut enc.encode_descriptor(name, help, unit.as_ref(), ctr)?, v.load(Ordering::Relaxed))?;
        }
        enc.encode_descriptor("connections", "Open client connections.", None, gauge)?.encode_gauge(&broker.open_sessions())?;

        let snapshot = broker.snapshot();
        encode_queues(&mut enc, &snapshot, crate::model::now_ms())?;
        if let Some(host) = self.raft.get() {
            encode_quorum_queues(&mut enc, &snapshot, host)?;
        }
        Ok(())
    }
}

/// Per quorum queue, this node's view of its Raft group (queues with a
/// replica here): leader, term, commit index, members, elections, and on
/// the leader each follower's lag.
fn encode_quorum_queues(enc: &mut DescriptorEncoder<'_>, snap: &Snapshot, host: &crate::raft::RaftHost) -> Result<(), std::fmt::Error> {
    let gauge = MetricType::Gauge;
    let groups: Vec<(&str, crate::raft::GroupStatus)> = snap
        .queues
        .iter()
        .filter(|(_, e)| crate::replica::meta::is_quorum_id(e.def.id))
        .filter_map(|(name, e)| host.status(e.def.id).map(|s| (&**name, s)))
        .collect();
    type Field = fn(&crate::raft::GroupStatus) -> u64;
    let families: [(&str, &str, Field); 5] = [
        ("quorum_queue_leader", "The node that leads the queue's Raft group, as this node sees it (0: none known).", |s| {
            s.leader.unwrap_or(0)
        }),
        ("quorum_queue_is_leader", "1 while this node leads the queue, else 0.", |s| u64::from(s.role == crate::raft::Role::Leader)),
        ("quorum_queue_term", "The Raft term of the queue's group on this node.", |s| s.term),
        ("quorum_queue_commit_index", "The last committed log index of the queue's group, as this node knows it.", |s| {
            s.committed.unwrap_or(0)
        }),
        ("quorum_queue_members", "Voting replicas of the queue.", |s| s.voters.len() as u64),
    ];
    for (name, help, field) in families {
        let mut e = enc.encode_descriptor(name, help, None, gauge)?;
        for (queue, s) in &groups {
            e.encode_family(&[("queue", *queue)])?.encode_gauge(&field(s))?;
        }
    }
    {
        let help = "Leaders elected in the queue's group since this node started its replica.";
        let mut e = enc.encode_descriptor("quorum_queue_elections", help, None, MetricType::Counter)?;
        for (queue, s) in &groups {
            labelled_counter(&mut e, &[("queue", *queue)], s.elections)?;
        }
    }
    type LagField = fn(&crate::raft::Lag) -> u64;
    let lags: [(&str, &str, LagField); 3] = [
        ("quorum_queue_replica_lag_entries", "On the queue's leader: log entries each other replica lacks.", |l| l.entries),
        (
            "quorum_queue_replica_lag_bytes",
            "On the queue's leader: bytes of the log entries each other replica lacks (a lower bound for a replica that needs a snapshot).",
            |l| l.bytes,
        ),
        (
            "quorum_queue_replica_lag_messages",
            "On the queue's leader: messages in the log entries each other replica lacks (a lower bound for a replica that needs a snapshot).",
            |l| l.messages,
        ),
    ];
    for (name, help, field) in lags {
        let mut e = enc.encode_descriptor(name, help, None, gauge)?;
        for (queue, s) in &groups {
            for (node, lag) in &s.lag {
                e.encode_family(&[("queue", *queue), ("node", node.to_string().as_str())])?.encode_gauge(&field(lag))?;
            }
        }
    }
    Ok(())
}

/// The per-queue gauges: one pass over the snapshot's queues to read their
/// shared counts, then one family at a time.
fn encode_queues(enc: &mut DescriptorEncoder<'_>, snap: &Snapshot, now_ms: u64) -> Result<(), std::fmt::Error> {
    let gauge = MetricType::Gauge;
    let queues: Vec<(&str, QueueStats)> = snap.queues.iter().map(|(name, e)| (&**name, e.handle.shared.stats())).collect();
    enc.encode_descriptor("queues", "Queues on this node.", None, gauge)?.encode_gauge(&(queues.len() as u64))?;
    type Field = fn(&QueueStats) -> u64;
    let families: [(&str, &str, Option<Unit>, Field); 5] = [
        ("queue_messages_ready", "Messages ready for delivery.", None, |s| s.ready),
        ("queue_messages_ready", "Body bytes of the ready messages.", Some(Unit::Bytes), |s| s.ready_bytes),
        ("queue_messages_unacked", "Messages delivered and not yet acknowledged.", None, |s| s.unacked),
        ("queue_messages_delayed", "Messages waiting for their delay to pass.", None, |s| s.delayed),
        ("queue_consumers", "Consumers subscribed to the queue.", None, |s| u64::from(s.consumers)),
    ];
    for (name, help, unit, field) in families {
        let mut e = enc.encode_descriptor(name, help, unit.as_ref(), gauge)?;
        for (queue, s) in &queues {
            e.encode_family(&[("queue", *queue)])?.encode_gauge(&field(s))?;
        }
    }
    let help = "Age of the message at the head of the queue (0 when none is ready).";
    let mut e = enc.encode_descriptor("queue_oldest_ready_message_age", help, Some(&Unit::Seconds), gauge)?;
    for (queue, s) in &queues {
        let age = s.oldest_ready_ms.map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
        e.encode_family(&[("queue", *queue)])?.encode_gauge(&age)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_bucket_observations_inclusively() {
        let h = Histogram::counts([1, 2, 4]);
        for v in [0, 1, 2, 3, 4, 5, 100] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 7);
        assert_eq!(sum, 115.0);
        assert_eq!(buckets, vec![(1.0, 2), (2.0, 1), (4.0, 2), (f64::INFINITY, 2)]);
        let h = Histogram::seconds([0.001, 0.01]);
        h.observe_duration(Duration::from_millis(1));
        h.observe_duration(Duration::from_millis(5));
        let (sum, _, buckets) = h.snapshot();
        assert!((sum - 0.006).abs() < 1e-9);
        assert_eq!(buckets, vec![(0.001, 1), (0.01, 1), (f64::INFINITY, 0)]);
    }

    #[test]
    fn should_expose_node_metrics_with_conventional_names() {
        let m = global();
        m.confirmed(ConfirmStatus::Returned);
        m.dead_lettered("maxlen");
        m.dead_lettered("something new");
        m.dropped("delivery_limit");
        m.store_batch(3, true, Duration::from_micros(300));
        let text = encode(&registry(BrokerCollector::new())).unwrap_or_default();
        for line in [
            "# TYPE warren_messages_confirmed counter",
            "warren_messages_confirmed_total{status=\"returned\"}",
            "warren_messages_returned_total",
            "warren_messages_dead_lettered_total{reason=\"maxlen\"}",
            "warren_messages_dead_lettered_total{reason=\"other\"}",
            "warren_messages_dropped_total{reason=\"delivery_limit\"}",
            "# TYPE warren_confirm_latency_seconds histogram",
            "warren_wal_sync_duration_seconds_bucket{le=\"+Inf\"}",
            "warren_wal_sync_batch_requests_count",
            "warren_alarm{resource=\"memory\"} 0",
            "warren_alarm{resource=\"disk\"} 0",
            "warren_process_resident_memory_bytes",
            "warren_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("warren_"), "{line}");
        }
    }

    #[test]
    fn should_negotiate_the_exposition_format_on_accept() {
        use Format::{OpenMetrics, Prometheus};
        for (accept, expected) in [
            (None, Prometheus),
            (Some(""), Prometheus),
            (Some("*/*"), Prometheus),
            (Some("text/plain;version=0.0.4"), Prometheus),
            (Some("text/plain"), Prometheus),
            (Some("application/openmetrics-text"), OpenMetrics),
            (Some("application/openmetrics-text; version=1.0.0; charset=utf-8"), OpenMetrics),
            // Prometheus 2.x and 3.x scrapers.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                ),
                OpenMetrics,
            ),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                ),
                OpenMetrics,
            ),
            // A scraper configured for the classic format.
            (Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"), Prometheus),
            (Some("application/openmetrics-text;q=0,text/plain;q=0.1"), Prometheus),
            (Some("APPLICATION/OpenMetrics-Text ; Q=0.7 , text/plain ; q=0.7"), OpenMetrics),
            (Some("application/json, */*"), Prometheus),
        ] {
            assert_eq!(Format::negotiate(accept), expected, "{accept:?}");
        }
        assert!(Prometheus.content_type().starts_with("text/plain; version=0.0.4"));
        assert!(OpenMetrics.content_type().starts_with("application/openmetrics-text"));
    }

    #[test]
    fn should_write_the_prometheus_text_format_without_openmetrics_metadata() {
        global().acked(1);
        let registry = registry(BrokerCollector::new());
        let text = encode_as(&registry, Format::Prometheus).unwrap_or_default();
        for line in [
            "# HELP warren_messages_acknowledged_total Messages acknowledged by consumers.\n",
            "# TYPE warren_messages_acknowledged_total counter\nwarren_messages_acknowledged_total ",
            "# TYPE warren_messages_confirmed_total counter\nwarren_messages_confirmed_total{status=\"routed\"} ",
            "# TYPE warren_build_info gauge\nwarren_build_info{version=",
            "# TYPE warren_confirm_latency_seconds histogram\n",
            "# TYPE warren_uptime_seconds gauge\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for absent in ["# EOF", "# UNIT", " info\n", " unknown\n"] {
            assert!(!text.contains(absent), "{absent:?} in\n{text}");
        }
        // The same samples in both formats.
        let samples = |t: &str| {
            t.lines().filter(|l| !l.starts_with('#')).map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_string()).collect::<Vec<_>>()
        };
        assert_eq!(samples(&text), samples(&encode_as(&registry, Format::OpenMetrics).unwrap_or_default()));
    }

    #[test]
    fn should_expose_ten_thousand_queues_in_one_cheap_pass() {
        use std::collections::BTreeMap;

        use crate::queue::{QueueRef, QueueShared};
        use crate::topology::{QueueDef, QueueEntry};

        const QUEUES: u64 = 10_000;
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let mut queues = BTreeMap::new();
        for id in 0..QUEUES {
            let name: Arc<str> = format!("queue-{id:05}").into();
            let shared = Arc::new(QueueShared::default());
            shared.publish(QueueStats { ready: id, oldest_ready_ms: Some(1_000), ..QueueStats::default() });
            let def = QueueDef {
                id,
                name: name.clone(),
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments: BTreeMap::new(),
                args: Default::default(),
                owner: None,
            };
            queues.insert(name.clone(), QueueEntry { def: Arc::new(def), handle: QueueRef { id, name, tx: tx.clone(), shared } });
        }
        let snap = Snapshot { routes: Default::default(), queues: queues.into_iter().collect() };

        struct Queues(Snapshot);
        impl std::fmt::Debug for Queues {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Queues")
            }
        }
        impl Collector for Queues {
            fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
                encode_queues(&mut enc, &self.0, 3_500)
            }
        }
        let mut registry = Registry::with_prefix("warren");
        registry.register_collector(Box::new(Queues(snap)));
        let started = Instant::now();
        let text = encode(&registry).unwrap_or_default();
        eprintln!("encoded {QUEUES} queues in {:?}: {} bytes, {} lines", started.elapsed(), text.len(), text.lines().count());
        for family in ["ready", "ready_bytes", "unacked", "delayed"] {
            let n = text.lines().filter(|l| l.starts_with(&format!("warren_queue_messages_{family}{{queue="))).count();
            assert_eq!(n as u64, QUEUES, "{family}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("warren_queue_consumers{queue=")).count() as u64, QUEUES);
        assert!(text.contains("warren_queue_messages_ready{queue=\"queue-09999\"} 9999\n"));
        assert!(text.contains("warren_queue_oldest_ready_message_age_seconds{queue=\"queue-00042\"} 2.5\n"));
        assert!(text.contains("warren_queues 10000\n"));
    }
}
