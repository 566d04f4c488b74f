//! Failover time: `kill -9` of the node leading the bench queue, then the
//! time until a message published after the kill is confirmed through
//! another node. Repeated `kills` times (the killed node is started again
//! and the queue's members are all back before the next kill); the median
//! is the figure.
//!
//! The measurement loop ([`time_to_first_confirm`]) is independent of the
//! broker and of the clock, so its logic is tested without timing
//! anything.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;

use crate::cluster::{NODES, RabbitCluster, WarrenCluster};
use crate::report::median;
use crate::workload::{QueueType, Workload};

/// One attempt to get a message confirmed.
pub trait Probe {
    /// Publishes one persistent message and waits for its confirm, at most
    /// `timeout`. `Ok(true)`: confirmed; `Ok(false)`: refused (nack, not
    /// routed) or timed out; `Err`: the connection failed (the probe
    /// reconnects, possibly to another node, on its next attempt).
    fn attempt(&mut self, timeout: Duration) -> impl Future<Output = Result<bool>>;
}

/// Elapsed time since some fixed instant.
pub trait Clock {
    fn now(&self) -> Duration;
}

/// The real clock.
pub struct Wall(pub Instant);

impl Clock for Wall {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// What one kill cost.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Timing {
    /// From the kill to the first confirm of a message sent after it.
    pub to_first_confirm_s: f64,
    /// Publish attempts until then (the last one succeeded).
    pub attempts: u32,
    /// Attempts that failed, were refused or timed out.
    pub failed: u32,
}

/// Publishes through `probe` until a message sent at or after `killed_at`
/// (on `clock`) is confirmed; gives up `deadline` after the kill. Waits
/// `pause` after a failed attempt (a broker that refuses at once must not
/// be hammered).
pub async fn time_to_first_confirm<P: Probe, C: Clock>(
    probe: &mut P,
    clock: &C,
    killed_at: Duration,
    attempt_timeout: Duration,
    pause: Duration,
    deadline: Duration,
) -> Result<Timing> {
    let mut attempts = 0u32;
    let mut failed = 0u32;
    loop {
        let sent = clock.now();
        if sent.saturating_sub(killed_at) >= deadline {
            bail!("no confirm within {deadline:?} of the kill ({attempts} attempts)");
        }
        attempts += 1;
        match probe.attempt(attempt_timeout).await {
            Ok(true) if sent >= killed_at => {
                let at = clock.now();
                return Ok(Timing { to_first_confirm_s: at.saturating_sub(killed_at).as_secs_f64(), attempts, failed });
            }
            Ok(true) => {}
            Ok(false) | Err(_) => {
                failed += 1;
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// Every kill of one failover run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverResult {
    pub broker: String,
    pub kills: Vec<Timing>,
    /// Seconds from spawn to serving again, per restarted node.
    pub restart_s: Vec<f64>,
    pub median_s: f64,
    pub max_s: f64,
}

impl FailoverResult {
    pub fn finish(mut self) -> FailoverResult {
        let v: Vec<f64> = self.kills.iter().map(|k| k.to_first_confirm_s).collect();
        self.median_s = median(&v);
        self.max_s = v.iter().copied().fold(0.0, f64::max);
        self
    }
}

/// How long one publish may wait for its confirm before it counts as
/// failed and is sent again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Give up on a kill after this long without a confirm.
const KILL_DEADLINE: Duration = Duration::from_secs(60);
const PAUSE: Duration = Duration::from_millis(20);

/// The bench queue of the failover scenario.
pub fn failover_workload() -> Workload {
    Workload { queue_prefix: "warren-bench-failover".into(), queue_type: QueueType::Quorum, ..Workload::default() }
}

// ---------------------------------------------------------------- RabbitMQ

/// A publisher over AMQP with confirms that reconnects on failure, trying
/// the given nodes in turn.
pub struct AmqpProbe {
    uris: Vec<String>,
    next: usize,
    conn: Option<(lapin::Connection, lapin::Channel)>,
    queue: String,
}

impl AmqpProbe {
    pub fn new(uris: Vec<String>, queue: &str) -> AmqpProbe {
        AmqpProbe { uris, next: 0, conn: None, queue: queue.into() }
    }

    async fn channel(&mut self, timeout: Duration) -> Result<lapin::Channel> {
        if let Some((_, ch)) = &self.conn {
            return Ok(ch.clone());
        }
        let uri = self.uris[self.next % self.uris.len()].clone();
        self.next += 1;
        let conn =
            tokio::time::timeout(timeout, crate::clients::rabbit::connect(&uri)).await.map_err(|_| anyhow!("connect timed out"))??;
        let ch = conn.create_channel().await?;
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
        self.conn = Some((conn, ch.clone()));
        Ok(ch)
    }

    pub async fn close(&mut self) {
        if let Some((c, _)) = self.conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.close(200, "bye".into())).await;
        }
    }
}

impl Probe for AmqpProbe {
    async fn attempt(&mut self, timeout: Duration) -> Result<bool> {
        let r: Result<bool> = async {
            let ch = self.channel(timeout).await?;
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            let confirm = ch
                .basic_publish("".into(), self.queue.as_str().into(), lapin::options::BasicPublishOptions::default(), &[0u8; 1024], props)
                .await?;
            match tokio::time::timeout(timeout, confirm).await {
                Ok(c) => Ok(c?.is_ack()),
                Err(_) => Ok(false),
            }
        }
        .await;
        if !matches!(r, Ok(true)) {
            // Start afresh: the channel may be dead or stuck behind the
            // dead leader.
            self.close().await;
        }
        r
    }
}

/// Failover on the bench's RabbitMQ cluster: `kills` times, find the
/// quorum queue's leader (`rabbitmqctl list_queues name leader`), connect
/// a publisher to the next node, `kill -9` the leader, time the first
/// confirm, start the node again and wait for all members to be online.
pub async fn rabbitmq(cluster: &mut RabbitCluster, kills: usize) -> Result<FailoverResult> {
    let w = failover_workload();
    let queue = w.queue_name(0);
    {
        let conn = crate::clients::rabbit::connect(&cluster.nodes[0].uri()).await?;
        let ch = conn.create_channel().await?;
        crate::clients::rabbit::declare_queue(&ch, &queue, QueueType::Quorum).await?;
        let _ = conn.close(200, "bye".into()).await;
    }
    let mut result = FailoverResult { broker: "rabbitmq-cluster".into(), ..FailoverResult::default() };
    let outcome = async {
        for k in 0..kills {
            let leader = {
                let c = &*cluster;
                let q = queue.clone();
                tokio::task::block_in_place(|| c.leader_of(&q, 0))?
            };
            let survivors: Vec<String> = (1..NODES).map(|d| cluster.nodes[(leader + d) % NODES].uri()).collect();
            let mut probe = AmqpProbe::new(survivors, &queue);
            // The path works before the kill.
            let warm = Wall(Instant::now());
            time_to_first_confirm(&mut probe, &warm, Duration::ZERO, ATTEMPT_TIMEOUT, PAUSE, KILL_DEADLINE)
                .await
                .context("no confirm before the kill")?;
            let clock = Wall(Instant::now());
            let killed_at = clock.now();
            tokio::task::block_in_place(|| cluster.kill_node(leader))?;
            let t = time_to_first_confirm(&mut probe, &clock, killed_at, ATTEMPT_TIMEOUT, PAUSE, KILL_DEADLINE).await;
            probe.close().await;
            let t = t.with_context(|| format!("kill {} of {kills} (leader node {})", k + 1, leader + 1))?;
            eprintln!(
                "[failover {}/{kills}] rabbitmq-cluster: killed node {}, first confirm after {:.3} s",
                k + 1,
                leader + 1,
                t.to_first_confirm_s
            );
            result.kills.push(t);
            let took = tokio::task::block_in_place(|| cluster.restart_node(leader))?;
            result.restart_s.push(took.as_secs_f64());
            let c = &*cluster;
            tokio::task::block_in_place(|| c.await_members_online(&queue, Duration::from_secs(180)))?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    // Delete the queue whatever happened (on a node that is up).
    if let Ok(conn) = crate::clients::rabbit::connect(&cluster.nodes[0].uri()).await
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = ch.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        let _ = conn.close(200, "bye".into()).await;
    }
    outcome?;
    Ok(result.finish())
}

// ------------------------------------------------------------------ Warren

/// A unary publisher over gRPC that reconnects on failure, trying the
/// given nodes in turn.
pub struct WarrenProbe {
    addrs: Vec<String>,
    next: usize,
    client: Option<warren_client::Client>,
    queue: String,
}

impl WarrenProbe {
    pub fn new(addrs: Vec<String>, queue: &str) -> WarrenProbe {
        WarrenProbe { addrs, next: 0, client: None, queue: queue.into() }
    }
}

impl Probe for WarrenProbe {
    async fn attempt(&mut self, timeout: Duration) -> Result<bool> {
        let r: Result<bool> = async {
            if self.client.is_none() {
                let addr = self.addrs[self.next % self.addrs.len()].clone();
                self.next += 1;
                let c = tokio::time::timeout(timeout, crate::clients::warren::connect(&addr))
                    .await
                    .map_err(|_| anyhow!("connect timed out"))??;
                self.client = Some(c);
            }
            let client = self.client.as_ref().ok_or_else(|| anyhow!("no client"))?;
            let m = warren_client::Message::new("", &self.queue, vec![0u8; 1024]).persistent();
            match tokio::time::timeout(timeout, client.publish(m)).await {
                Ok(c) => Ok(c?.is_routed()),
                Err(_) => Ok(false),
            }
        }
        .await;
        if !matches!(r, Ok(true)) {
            self.client = None;
        }
        r
    }
}

/// Failover on a Warren cluster, as for RabbitMQ.
///
/// The queue's leader comes from the nodes (`QueueInfo.leader`); after a
/// restart the next kill waits until every replica is up again.
pub async fn warren(cluster: &mut WarrenCluster, kills: usize) -> Result<FailoverResult> {
    let w = failover_workload();
    let queue = w.queue_name(0);
    let first = cluster.nodes[0].addr.clone();
    crate::clients::warren::connect(&first).await?.declare_queue(&queue, crate::clients::warren::queue_options(&w)).await?;
    let mut result = FailoverResult { broker: "warren-cluster".into(), ..FailoverResult::default() };
    for k in 0..kills {
        let leader = tokio::task::block_in_place(|| cluster.leader_of(&queue))?;
        let survivors: Vec<String> = (1..NODES).map(|d| cluster.nodes[(leader + d) % NODES].addr.clone()).collect();
        let mut probe = WarrenProbe::new(survivors, &queue);
        let warm = Wall(Instant::now());
        time_to_first_confirm(&mut probe, &warm, Duration::ZERO, ATTEMPT_TIMEOUT, PAUSE, KILL_DEADLINE)
            .await
            .context("no confirm before the kill")?;
        let clock = Wall(Instant::now());
        let killed_at = clock.now();
        cluster.kill_node(leader);
        let t = time_to_first_confirm(&mut probe, &clock, killed_at, ATTEMPT_TIMEOUT, PAUSE, KILL_DEADLINE)
            .await
            .with_context(|| format!("kill {} of {kills} (leader node {})", k + 1, leader + 1))?;
        eprintln!(
            "[failover {}/{kills}] warren-cluster: killed node {}, first confirm after {:.3} s",
            k + 1,
            leader + 1,
            t.to_first_confirm_s
        );
        result.kills.push(t);
        let took = tokio::task::block_in_place(|| cluster.restart_node(leader))?;
        result.restart_s.push(took.as_secs_f64());
        // Every replica up again before the next kill.
        tokio::task::block_in_place(|| cluster.wait_replicas(&queue, Duration::from_secs(60)))?;
    }
    Ok(result.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::cell::Cell;

    /// A clock that only moves when the probe says so.
    struct FakeClock(Cell<Duration>);

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            self.0.get()
        }
    }

    /// Fails `fail` times, each attempt taking `cost` of fake time (the
    /// confirm timeout, say), then succeeds.
    struct Flaky<'a> {
        clock: &'a FakeClock,
        fail: u32,
        cost: Duration,
        calls: u32,
        error: bool,
    }

    impl Probe for Flaky<'_> {
        async fn attempt(&mut self, timeout: Duration) -> Result<bool> {
            assert_eq!(timeout, Duration::from_secs(2));
            self.calls += 1;
            self.clock.0.set(self.clock.0.get() + self.cost);
            if self.calls <= self.fail { if self.error { Err(anyhow!("connection refused")) } else { Ok(false) } } else { Ok(true) }
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn should_time_from_the_kill_to_the_first_confirm_after_it() {
        let clock = FakeClock(Cell::new(Duration::from_secs(10)));
        let mut probe = Flaky { clock: &clock, fail: 4, cost: Duration::from_millis(250), calls: 0, error: false };
        let killed_at = Duration::from_secs(10);
        let t =
            block_on(time_to_first_confirm(&mut probe, &clock, killed_at, Duration::from_secs(2), Duration::ZERO, Duration::from_secs(60)))
                .unwrap();
        // 4 failed attempts and the successful one, 250 ms each.
        assert_eq!(t, Timing { to_first_confirm_s: 1.25, attempts: 5, failed: 4 });
    }

    #[test]
    fn should_count_connection_errors_as_failed_attempts() {
        let clock = FakeClock(Cell::new(Duration::ZERO));
        let mut probe = Flaky { clock: &clock, fail: 2, cost: Duration::from_millis(100), calls: 0, error: true };
        let t = block_on(time_to_first_confirm(
            &mut probe,
            &clock,
            Duration::ZERO,
            Duration::from_secs(2),
            Duration::ZERO,
            Duration::from_secs(60),
        ))
        .unwrap();
        assert_eq!((t.attempts, t.failed), (3, 2));
        assert!((t.to_first_confirm_s - 0.3).abs() < 1e-9);
    }

    #[test]
    fn should_ignore_confirms_of_messages_sent_before_the_kill() {
        // The kill happens at 1 s; attempts that start before it do not
        // count even when confirmed.
        let clock = FakeClock(Cell::new(Duration::from_millis(400)));
        let mut probe = Flaky { clock: &clock, fail: 0, cost: Duration::from_millis(300), calls: 0, error: false };
        let t = block_on(time_to_first_confirm(
            &mut probe,
            &clock,
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::ZERO,
            Duration::from_secs(60),
        ))
        .unwrap();
        // Attempts start at 0.4, 0.7, 1.0 (counts), confirmed at 1.3.
        assert_eq!(t.attempts, 3);
        assert!((t.to_first_confirm_s - 0.3).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn should_give_up_at_the_deadline() {
        let clock = FakeClock(Cell::new(Duration::ZERO));
        let mut probe = Flaky { clock: &clock, fail: u32::MAX, cost: Duration::from_secs(2), calls: 0, error: false };
        let e = block_on(time_to_first_confirm(
            &mut probe,
            &clock,
            Duration::ZERO,
            Duration::from_secs(2),
            Duration::ZERO,
            Duration::from_secs(60),
        ))
        .unwrap_err();
        assert!(format!("{e}").contains("no confirm within"), "{e}");
        // Bounded: 30 attempts of 2 s fill the 60 s.
        assert_eq!(probe.calls, 30);
    }

    #[test]
    fn should_report_median_and_max_over_kills() {
        let t = |s: f64| Timing { to_first_confirm_s: s, attempts: 1, failed: 0 };
        let r = FailoverResult { kills: vec![t(3.0), t(1.0), t(2.0)], ..FailoverResult::default() }.finish();
        assert_eq!((r.median_s, r.max_s), (2.0, 3.0));
    }
}
