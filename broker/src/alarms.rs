//! Resource alarms: the memory high watermark and the disk free limit.
//!
//! A monitor task samples memory and disk every `alarm_check_interval` and
//! raises or clears each alarm (a warning when raised, an info line when
//! cleared). While any alarm is raised publishers are blocked at the gRPC
//! edge: a publish stream is not read (HTTP/2 flow control pushes back on
//! the client), a unary publish waits up to `publish_block_timeout` and then
//! fails with `RESOURCE_EXHAUSTED`. Consumers are never blocked: draining
//! queues is what lets a memory alarm clear, and it clears by itself at the
//! next check once usage is back under the limit.
//!
//! The state is process-wide ([`global`]), like the memory it measures.
//!
//! Memory is measured one of two ways (`memory_calculation_strategy`):
//! * `rss`: the process's resident set size (`/proc/self/statm`);
//! * `allocated`: bytes allocated through the broker's heap allocator
//!   (jemalloc's `stats.allocated`), which falls as soon as consumed messages
//!   are freed, where RSS may lag behind the allocator returning pages.
//!
//! A fractional watermark is resolved against the cgroup memory limit when
//! there is one (v2 `memory.max`, v1 `memory.limit_in_bytes`), else against
//! the host's `MemTotal`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warren_client::proto;

use crate::config::MemoryStrategy;
use crate::error::Error;
use crate::store::Engine;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Disk,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Memory => "memory",
            Resource::Disk => "disk",
        }
    }
}

/// One reading of the resources and the limits they were compared with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub rss_bytes: u64,
    pub heap_bytes: u64,
    /// Memory as the strategy measures it.
    pub memory_used: u64,
    pub memory_limit: u64,
    pub disk_free: u64,
    pub disk_free_limit: u64,
    pub store_disk_usage: u64,
}

impl Sample {
    /// Which alarms this reading raises: (memory, disk). A limit of 0 never
    /// raises its alarm (no reading yet).
    pub fn alarms(&self) -> (bool, bool) {
        let memory = self.memory_limit > 0 && self.memory_used > self.memory_limit;
        let disk = self.disk_free_limit > 0 && self.disk_free < self.disk_free_limit;
        (memory, disk)
    }
}

/// The alarm state.
#[derive(Debug)]
pub struct Alarms {
    memory: AtomicBool,
    disk: AtomicBool,
    /// Whether publishers are blocked; waiters watch it.
    blocked: watch::Sender<bool>,
    strategy: parking_lot::Mutex<MemoryStrategy>,
    sample: parking_lot::Mutex<Sample>,
    /// Mirrors `blocked` for the publish path's check (no lock).
    blocked_fast: AtomicBool,
    checks: AtomicU64,
}

static ALARMS: LazyLock<Alarms> = LazyLock::new(Alarms::new);

/// The process's alarms.
pub fn global() -> &'static Alarms {
    &ALARMS
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms::new()
    }
}

impl Alarms {
    pub fn new() -> Alarms {
        Alarms {
            memory: AtomicBool::new(false),
            disk: AtomicBool::new(false),
            blocked: watch::Sender::new(false),
            strategy: parking_lot::Mutex::new(MemoryStrategy::Rss),
            sample: parking_lot::Mutex::new(Sample::default()),
            blocked_fast: AtomicBool::new(false),
            checks: AtomicU64::new(0),
        }
    }

    /// Whether publishers are blocked (some alarm is raised).
    pub fn blocked(&self) -> bool {
        self.blocked_fast.load(Ordering::Acquire)
    }

    pub fn is_raised(&self, r: Resource) -> bool {
        match r {
            Resource::Memory => self.memory.load(Ordering::Acquire),
            Resource::Disk => self.disk.load(Ordering::Acquire),
        }
    }

    /// The latest reading.
    pub fn sample(&self) -> Sample {
        *self.sample.lock()
    }

    /// How many readings have been taken.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Waits until no alarm blocks publishers.
    pub async fn wait_clear(&self) {
        if !self.blocked() {
            return;
        }
        let mut rx = self.blocked.subscribe();
        // The sender lives in a static and is never dropped.
        let _ = rx.wait_for(|blocked| !*blocked).await;
    }

    /// Waits until no alarm blocks publishers, or until `shutdown`; returns
    /// false on shutdown.
    pub async fn wait_clear_unless(&self, shutdown: &CancellationToken) -> bool {
        if !self.blocked() {
            return true;
        }
        tokio::select! {
            _ = self.wait_clear() => true,
            _ = shutdown.cancelled() => false,
        }
    }

    /// Waits up to `timeout` for publishers to be unblocked; fails with
    /// `RESOURCE_EXHAUSTED` naming the alarms if they are not.
    pub async fn wait_clear_for(&self, timeout: Duration) -> Result<(), Error> {
        if !self.blocked() {
            return Ok(());
        }
        match tokio::time::timeout(timeout, self.wait_clear()).await {
            Ok(()) => Ok(()),
            Err(_) => {
                let why: Vec<String> = self.active().into_iter().map(|a| a.message).collect();
                let why = if why.is_empty() { "a resource alarm was raised".to_string() } else { why.join("; ") };
                Err(Error::ResourceExhausted(format!("publishing is blocked: {why}; waited {}", crate::config::show_duration(timeout))))
            }
        }
    }

    /// The raised alarms, for the status call.
    pub fn active(&self) -> Vec<proto::Alarm> {
        let s = self.sample();
        let strategy = *self.strategy.lock();
        let mut out = Vec::new();
        if self.is_raised(Resource::Memory) {
            out.push(proto::Alarm {
                resource: Resource::Memory.as_str().into(),
                message: format!(
                    "memory used ({}) is {}, above the high watermark {}",
                    strategy.as_str(),
                    human_bytes(s.memory_used),
                    human_bytes(s.memory_limit)
                ),
                used_bytes: s.memory_used,
                limit_bytes: s.memory_limit,
            });
        }
        if self.is_raised(Resource::Disk) {
            out.push(proto::Alarm {
                resource: Resource::Disk.as_str().into(),
                message: format!(
                    "free disk space is {}, below the disk free limit {} (used_bytes carries the free space)",
                    human_bytes(s.disk_free),
                    human_bytes(s.disk_free_limit)
                ),
                used_bytes: s.disk_free,
                limit_bytes: s.disk_free_limit,
            });
        }
        out
    }

    /// Takes a reading: raises and clears alarms, logs the changes, and
    /// unblocks publishers when none is left.
    pub fn update(&self, sample: Sample, strategy: MemoryStrategy) {
        *self.strategy.lock() = strategy;
        *self.sample.lock() = sample;
        self.checks.fetch_add(1, Ordering::Relaxed);
        let (memory, disk) = sample.alarms();
        let was_memory = self.memory.swap(memory, Ordering::AcqRel);
        let was_disk = self.disk.swap(disk, Ordering::AcqRel);
        match (was_memory, memory) {
            (false, true) => tracing::warn!(
                resource = "memory",
                used = sample.memory_used,
                limit = sample.memory_limit,
                strategy = strategy.as_str(),
                "memory alarm raised: {} used, above the high watermark {}; publishers are blocked",
                human_bytes(sample.memory_used),
                human_bytes(sample.memory_limit)
            ),
            (true, false) => tracing::info!(
                resource = "memory",
                used = sample.memory_used,
                limit = sample.memory_limit,
                "memory alarm cleared: {} used, under the high watermark {}",
                human_bytes(sample.memory_used),
                human_bytes(sample.memory_limit)
            ),
            _ => {}
        }
        match (was_disk, disk) {
            (false, true) => tracing::warn!(
                resource = "disk",
                free = sample.disk_free,
                limit = sample.disk_free_limit,
                "disk alarm raised: {} free, below the disk free limit {}; publishers are blocked",
                human_bytes(sample.disk_free),
                human_bytes(sample.disk_free_limit)
            ),
            (true, false) => tracing::info!(
                resource = "disk",
                free = sample.disk_free,
                limit = sample.disk_free_limit,
                "disk alarm cleared: {} free, over the disk free limit {}",
                human_bytes(sample.disk_free),
                human_bytes(sample.disk_free_limit)
            ),
            _ => {}
        }
        let blocked = memory || disk;
        self.blocked_fast.store(blocked, Ordering::Release);
        self.blocked.send_if_modified(|b| {
            let changed = *b != blocked;
            *b = blocked;
            changed
        });
    }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

// ------------------------------------------------------------ measuring

/// The memory available to the process and where that figure comes from:
/// the cgroup limit when there is one, else the host's RAM.
pub fn available_memory() -> Option<(u64, &'static str)> {
    let host = read_meminfo_total();
    let cgroup = read_cgroup_limit();
    match (cgroup, host) {
        (Some(c), Some(h)) if c < h => Some((c, "cgroup memory limit")),
        (Some(c), None) => Some((c, "cgroup memory limit")),
        (_, Some(h)) => Some((h, "host memory")),
        (None, None) => None,
    }
}

fn read_cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_limit_files(&own).iter().filter_map(|path| std::fs::read_to_string(path).ok()).filter_map(|text| parse_limit(&text)).min()
}

/// A limit file's value: "max" (v2) and a near-u64::MAX number (v1) mean
/// no limit.
fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|n| *n < (1 << 60))
}

/// The memory limit files that apply to this process, from the content of
/// `/proc/self/cgroup`: its own cgroup and every ancestor (the effective
/// limit is the lowest), in v2 (`0::/path`) and v1 (`N:...memory...:/path`)
/// form, plus the mount roots for a private cgroup namespace.
fn cgroup_limit_files(proc_self_cgroup: &str) -> Vec<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let mut out: Vec<PathBuf> = Vec::new();
    let mut add_chain = |root: &str, file: &str, own: &str| {
        let mut dir = Path::new(own.trim_start_matches('/')).to_path_buf();
        loop {
            out.push(Path::new(root).join(&dir).join(file));
            if !dir.pop() {
                break;
            }
        }
    };
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" && controllers.is_empty() {
            add_chain("/sys/fs/cgroup", "memory.max", path);
        } else if controllers.split(',').any(|c| c == "memory") {
            add_chain("/sys/fs/cgroup/memory", "memory.limit_in_bytes", path);
        }
    }
    for root in ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"] {
        let root = PathBuf::from(root);
        if !out.contains(&root) {
            out.push(root);
        }
    }
    out
}

fn read_meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident set size of this process.
pub fn rss_bytes() -> u64 {
    // statm: size resident shared text lib data dt, in pages.
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

/// Bytes allocated through jemalloc (0 when the binary does not use it).
pub fn heap_allocated_bytes() -> u64 {
    // Statistics are refreshed when the epoch advances.
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return 0;
    }
    tikv_jemalloc_ctl::stats::allocated::read().map(|n| n as u64).unwrap_or(0)
}

/// Free bytes (available to unprivileged users) of the file system holding
/// `path`.
pub fn disk_free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// What the monitor compares, and how often.
#[derive(Clone, Debug)]
pub struct MonitorSettings {
    pub data_dir: PathBuf,
    pub memory_limit: u64,
    pub strategy: MemoryStrategy,
    pub disk_free_limit: u64,
    pub interval: Duration,
}

/// Takes one reading.
pub fn measure(settings: &MonitorSettings, engine: &dyn Engine) -> Sample {
    let rss = rss_bytes();
    let heap = heap_allocated_bytes();
    let disk_free = match disk_free_bytes(&settings.data_dir) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, dir = %settings.data_dir.display(), "cannot read the free disk space");
            u64::MAX
        }
    };
    Sample {
        rss_bytes: rss,
        heap_bytes: heap,
        memory_used: match settings.strategy {
            MemoryStrategy::Rss => rss,
            MemoryStrategy::Allocated => heap,
        },
        memory_limit: settings.memory_limit,
        disk_free,
        disk_free_limit: settings.disk_free_limit,
        store_disk_usage: engine.disk_usage(),
    }
}

/// Starts the monitor: a first reading right away (so that a node that
/// starts short of disk blocks publishers from its first client on), then
/// one every interval until `shutdown`.
pub async fn start_monitor(settings: MonitorSettings, engine: Arc<dyn Engine>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    let alarms = global();
    let first = {
        let (settings, engine) = (settings.clone(), engine.clone());
        tokio::task::spawn_blocking(move || measure(&settings, engine.as_ref())).await
    };
    if let Ok(sample) = first {
        alarms.update(sample, settings.strategy);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let (s, e) = (settings.clone(), engine.clone());
            match tokio::task::spawn_blocking(move || measure(&s, e.as_ref())).await {
                Ok(sample) => alarms.update(sample, settings.strategy),
                Err(e) => tracing::warn!(error = %e, "resource check failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {

    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_find_the_processes_own_cgroup_limits_and_their_ancestors() {
        let files = cgroup_limit_files("4:memory:/process_api/abc\n0::/system.slice/warren.service\n");
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        for expected in [
            "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/system.slice/warren.service/memory.max",
            "/sys/fs/cgroup/system.slice/memory.max",
            "/sys/fs/cgroup/memory.max",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(536_870_912));
    }

    fn sample(memory_used: u64, disk_free: u64) -> Sample {
        Sample { memory_used, memory_limit: 100, disk_free, disk_free_limit: 10, ..Sample::default() }
    }

    #[test]
    fn should_raise_when_over_the_watermark_or_under_the_free_limit() {
        assert_eq!(sample(100, 10).alarms(), (false, false), "at the limits is fine");
        assert_eq!(sample(101, 10).alarms(), (true, false));
        assert_eq!(sample(0, 9).alarms(), (false, true));
        assert_eq!(Sample { memory_used: 5, disk_free: 0, ..Sample::default() }.alarms(), (false, false), "no limits yet");
    }

    #[tokio::test]
    async fn should_block_publishers_until_every_alarm_clears() {
        let a = Alarms::new();
        assert!(a.wait_clear_for(Duration::from_millis(1)).await.is_ok());
        a.update(sample(500, 5), MemoryStrategy::Allocated);
        assert!(a.blocked() && a.is_raised(Resource::Memory) && a.is_raised(Resource::Disk));
        let active = a.active();
        assert_eq!(active.iter().map(|x| x.resource.as_str()).collect::<Vec<_>>(), ["memory", "disk"]);
        assert_eq!((active[0].used_bytes, active[0].limit_bytes), (500, 100));
        let Err(Error::ResourceExhausted(msg)) = a.wait_clear_for(Duration::from_millis(10)).await else { panic!("should time out") };
        assert!(msg.contains("memory used (allocated)") && msg.contains("free disk space"), "{msg}");

        let a = Arc::new(a);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.wait_clear().await })
        };
        a.update(sample(50, 5), MemoryStrategy::Allocated);
        assert!(a.blocked(), "the disk alarm still blocks");
        assert!(!waiter.is_finished());
        a.update(sample(50, 50), MemoryStrategy::Allocated);
        assert!(!a.blocked());
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        assert!(a.active().is_empty());
    }

    #[test]
    fn should_measure_this_process() {
        assert!(rss_bytes() > 0);
        assert!(available_memory().is_some_and(|(n, _)| n > 0));
        assert!(disk_free_bytes(Path::new(".")).unwrap() > 0);
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
