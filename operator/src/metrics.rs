//! Prometheus metrics of the operator, served on `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `broker`, `exchange`, `queue` or `binding`.
    pub controller: &'static str,
}

/// Labels of reconcile errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The controller.
    pub controller: &'static str,
    /// [`Error::metric_label`].
    pub error: &'static str,
}

/// Labels of per-queue autoscaling metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Namespace of the Queue object.
    pub namespace: String,
    /// Name of the Queue object.
    pub queue: String,
}

/// Labels of scaling decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Namespace of the Queue object.
    pub namespace: String,
    /// Name of the Queue object.
    pub queue: String,
    /// `up` or `down`.
    pub direction: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabels, Histogram>,
    /// Replica changes made by the autoscaler.
    pub scaling_decisions: Family<DecisionLabels, Counter>,
    /// Replicas the autoscaler wants, per queue.
    pub desired_replicas: Family<QueueLabels, Gauge>,
    /// Backlog the autoscaler last read, per queue.
    pub backlog: Family<QueueLabels, Gauge>,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register("reconciles", "Reconciliations started", reconciles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("reconcile_errors", "Reconciliations that failed, by error", errors.clone());
        let durations = Family::<ControllerLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register("reconcile_duration_seconds", "Time spent in one reconciliation", durations.clone());
        let scaling_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("scaling_decisions", "Replica changes made by the queue autoscaler", scaling_decisions.clone());
        let desired_replicas = Family::<QueueLabels, Gauge>::default();
        registry.register("desired_replicas", "Replicas the autoscaler wants for a queue's target", desired_replicas.clone());
        let backlog = Family::<QueueLabels, Gauge>::default();
        registry.register("queue_backlog", "Backlog the autoscaler last read for a queue", backlog.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        Self { registry, reconciles, errors, durations, scaling_decisions, desired_replicas, backlog, leader }
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    /// Counts a reconcile start; the returned guard records its duration
    /// when dropped.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&ControllerLabels { controller }).inc();
        ReconcileTimer { metrics: self, controller, start: Instant::now() }
    }

    /// Counts a failed reconcile.
    pub fn error(&self, controller: &'static str, error: &Error) {
        self.errors.get_or_create(&ErrorLabels { controller, error: error.metric_label() }).inc();
    }

    /// Drops the per-queue gauges of a deleted Queue.
    pub fn forget_queue(&self, namespace: &str, queue: &str) {
        let labels = QueueLabels { namespace: namespace.into(), queue: queue.into() };
        self.desired_replicas.remove(&labels);
        self.backlog.remove(&labels);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.durations.get_or_create(&ControllerLabels { controller: self.controller }).observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_encode_reconciles_errors_and_decisions() {
        let m = Metrics::default();
        drop(m.reconcile("queue"));
        m.error("queue", &Error::InvalidSpec("x".into()));
        m.scaling_decisions.get_or_create(&DecisionLabels { namespace: "ns".into(), queue: "jobs".into(), direction: "up" }).inc();
        let text = m.encode().unwrap_or_default();
        assert!(text.contains("warren_operator_reconciles_total{controller=\"queue\"} 1"), "{text}");
        assert!(text.contains("warren_operator_reconcile_errors_total{controller=\"queue\",error=\"invalid_spec\"} 1"), "{text}");
        assert!(text.contains("warren_operator_reconcile_duration_seconds_count{controller=\"queue\"} 1"), "{text}");
        assert!(text.contains("warren_operator_scaling_decisions_total{namespace=\"ns\",queue=\"jobs\",direction=\"up\"} 1"), "{text}");
    }
}
