//! The scale scenario: many idle quorum queues on a 3-node cluster. Each
//! node's CPU (over a quiet window) and RSS with no queue, the time to
//! declare N quorum queues (one declaring client per node, each declaring
//! its share in turn, so leaders spread over the nodes), each node's CPU
//! and RSS with the N queues idle, and the time to delete them.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::procfs;
use crate::workload::{QueueType, Workload};

/// One node's idle cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeIdle {
    /// 1-based node number.
    pub node: usize,
    /// CPU use (% of one core) over the window with no queue.
    pub cpu_pct_empty: f64,
    pub rss_empty_mib: f64,
    /// CPU use (% of one core) over the window with the queues idle.
    pub cpu_pct: f64,
    pub rss_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleResult {
    pub broker: String,
    pub queues: usize,
    pub window_s: f64,
    pub declare_s: f64,
    pub delete_s: f64,
    pub nodes: Vec<NodeIdle>,
}

impl IdleResult {
    /// Summed over the nodes: (CPU % empty, CPU % with queues, RSS MiB
    /// empty, RSS MiB with queues).
    pub fn totals(&self) -> (f64, f64, f64, f64) {
        self.nodes
            .iter()
            .fold((0.0, 0.0, 0.0, 0.0), |a, n| (a.0 + n.cpu_pct_empty, a.1 + n.cpu_pct, a.2 + n.rss_empty_mib, a.3 + n.rss_mib))
    }
}

/// CPU use in % of one core from two readings `window` apart.
pub fn cpu_percent(cpu0_s: f64, cpu1_s: f64, window: Duration) -> f64 {
    if window.is_zero() { 0.0 } else { 100.0 * (cpu1_s - cpu0_s).max(0.0) / window.as_secs_f64() }
}

/// Each process's CPU % over `window` and its RSS at the end.
pub async fn measure(pids: &[u32], window: Duration) -> Vec<(f64, f64)> {
    let before: Vec<f64> = pids.iter().map(|p| procfs::cpu_seconds(*p).unwrap_or(0.0)).collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let took = started.elapsed();
    pids.iter()
        .zip(before)
        .map(|(p, c0)| (cpu_percent(c0, procfs::cpu_seconds(*p).unwrap_or(c0), took), procfs::rss_mib(*p).unwrap_or(0.0)))
        .collect()
}

/// The idle queues' workload (their names and type).
pub fn idle_workload(queues: usize) -> Workload {
    Workload { queues, consumers: queues, queue_prefix: "warren-bench-idle".into(), queue_type: QueueType::Quorum, ..Workload::default() }
}

/// Queue `i` is declared (and deleted) through node `i % nodes`.
pub fn share(queues: usize, node: usize, nodes: usize) -> Vec<usize> {
    (0..queues).filter(|i| i % nodes == node).collect()
}

/// Declares (or deletes) the idle queues over AMQP, one client per node at
/// once; returns the wall time.
pub async fn rabbitmq_queues(uris: &[String], w: &Workload, delete: bool) -> Result<Duration> {
    let started = Instant::now();
    let tasks: Vec<_> = uris
        .iter()
        .enumerate()
        .map(|(node, uri)| {
            let (uri, w, mine) = (uri.clone(), w.clone(), share(w.queues, node, uris.len()));
            tokio::spawn(async move {
                let conn = crate::clients::rabbit::connect(&uri).await?;
                let ch = conn.create_channel().await?;
                for i in mine {
                    let q = w.queue_name(i);
                    if delete {
                        ch.queue_delete(q.as_str().into(), lapin::options::QueueDeleteOptions::default()).await?;
                    } else {
                        crate::clients::rabbit::declare_queue(&ch, &q, w.queue_type).await?;
                    }
                }
                let _ = conn.close(200, "bye".into()).await;
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// Declares (or deletes) the idle queues over gRPC, one client per node at
/// once; returns the wall time.
pub async fn warren_queues(addrs: &[String], w: &Workload, delete: bool) -> Result<Duration> {
    let started = Instant::now();
    let tasks: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(node, addr)| {
            let (addr, w, mine) = (addr.clone(), w.clone(), share(w.queues, node, addrs.len()));
            tokio::spawn(async move {
                let client = warren_client::Client::connect(&addr).await?;
                for i in mine {
                    let q = w.queue_name(i);
                    if delete {
                        client.delete_queue(&q, false, false).await?;
                    } else {
                        client.declare_queue(&q, crate::clients::warren::queue_options(&w)).await?;
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// Settling time after declaring, before the idle window.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Runs the scenario given how to declare/delete and the nodes' pids
/// (read again after declaring, in case they changed).
pub async fn run<D, F>(broker: &str, pids: &[u32], queues: usize, window: Duration, mut declare: D) -> Result<IdleResult>
where
    D: FnMut(bool) -> F,
    F: Future<Output = Result<Duration>>,
{
    eprintln!("[idle-queues] {broker}: {}s with no queue ...", window.as_secs());
    let empty = measure(pids, window).await;
    eprintln!("[idle-queues] {broker}: declaring {queues} quorum queues ...");
    let declare_s = declare(false).await?.as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    eprintln!("[idle-queues] {broker}: declared in {declare_s:.1}s; {}s idle ...", window.as_secs());
    let full = measure(pids, window).await;
    let delete_s = declare(true).await?.as_secs_f64();
    let nodes = empty
        .iter()
        .zip(&full)
        .enumerate()
        .map(|(i, (e, f))| NodeIdle { node: i + 1, cpu_pct_empty: e.0, rss_empty_mib: e.1, cpu_pct: f.0, rss_mib: f.1 })
        .collect();
    Ok(IdleResult { broker: broker.into(), queues, window_s: window.as_secs_f64(), declare_s, delete_s, nodes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn should_compute_cpu_percent_of_one_core() {
        assert!((cpu_percent(10.0, 10.3, Duration::from_secs(30)) - 1.0).abs() < 1e-9);
        assert_eq!(cpu_percent(10.0, 9.0, Duration::from_secs(30)), 0.0);
        assert_eq!(cpu_percent(0.0, 1.0, Duration::ZERO), 0.0);
    }

    #[test]
    fn should_split_queues_over_nodes() {
        assert_eq!(share(7, 0, 3), vec![0, 3, 6]);
        assert_eq!(share(7, 2, 3), vec![2, 5]);
        let all: usize = (0..3).map(|n| share(1000, n, 3).len()).sum();
        assert_eq!(all, 1000);
    }

    #[test]
    fn should_sum_nodes() {
        let n = |c: f64, r: f64| NodeIdle { node: 1, cpu_pct_empty: c / 2.0, rss_empty_mib: r / 2.0, cpu_pct: c, rss_mib: r };
        let r = IdleResult { nodes: vec![n(1.0, 100.0), n(3.0, 200.0)], ..IdleResult::default() };
        assert_eq!(r.totals(), (2.0, 4.0, 150.0, 300.0));
        let w = idle_workload(1000);
        assert!(w.validate().is_ok());
        assert_eq!(w.queue_name(999), "warren-bench-idle-999");
        assert_eq!(w.queue_type, QueueType::Quorum);
    }
}
