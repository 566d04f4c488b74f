//! Security metrics: authentication attempts, authorization denials, limit
//! rejections, TLS handshakes and certificate reloads. Process-wide, plain
//! atomics (as [`crate::metrics`]), exposed by a collector registered beside
//! the broker's.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;

use super::authz::OPERATIONS;

/// Authentication mechanisms, in the order of [`SecurityMetrics::attempts`].
pub const MECHANISMS: [&str; 4] = ["password", "token", "serviceaccount", "certificate"];

#[derive(Default)]
struct ListenerStats {
    handshake_failures: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    not_after: i64,
}

/// The counters.
pub struct SecurityMetrics {
    /// [mechanism][0 = success, 1 = failure]
    attempts: [[AtomicU64; 2]; 4],
    denied: Vec<AtomicU64>,
    limit_connections: AtomicU64,
    limit_streams: AtomicU64,
    cluster_refused: AtomicU64,
    listeners: Mutex<BTreeMap<&'static str, ListenerStats>>,
}

static GLOBAL: LazyLock<SecurityMetrics> = LazyLock::new(|| SecurityMetrics {
    attempts: Default::default(),
    denied: OPERATIONS.iter().map(|_| AtomicU64::new(0)).collect(),
    limit_connections: AtomicU64::new(0),
    limit_streams: AtomicU64::new(0),
    cluster_refused: AtomicU64::new(0),
    listeners: Mutex::default(),
});

pub fn global() -> &'static SecurityMetrics {
    &GLOBAL
}

impl SecurityMetrics {
    pub fn attempt(&self, mechanism: &str, ok: bool) {
        if let Some(i) = MECHANISMS.iter().position(|m| *m == mechanism) {
            self.attempts[i][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn denied(&self, operation: &str) {
        if let Some(i) = OPERATIONS.iter().position(|o| *o == operation) {
            self.denied[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Denials of `operation` so far (for tests).
    pub fn denied_count(&self, operation: &str) -> u64 {
        OPERATIONS.iter().position(|o| *o == operation).map_or(0, |i| self.denied[i].load(Ordering::Relaxed))
    }

    pub fn limit_reached(&self, streams: bool) {
        if streams { &self.limit_streams } else { &self.limit_connections }.fetch_add(1, Ordering::Relaxed);
    }

    /// A node-to-node call refused for want of the cluster secret.
    pub fn cluster_refused(&self) {
        self.cluster_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Refused node-to-node calls so far (for tests).
    pub fn cluster_refused_count(&self) -> u64 {
        self.cluster_refused.load(Ordering::Relaxed)
    }

    pub fn tls_loaded(&self, listener: &'static str, not_after: i64) {
        self.listeners.lock().entry(listener).or_default().not_after = not_after;
    }

    pub fn tls_reload(&self, listener: &'static str, ok: bool) {
        let mut l = self.listeners.lock();
        let s = l.entry(listener).or_default();
        if ok {
            s.reloads_ok += 1;
        } else {
            s.reloads_failed += 1;
        }
    }

    pub fn tls_handshake_failed(&self, listener: &'static str) {
        self.listeners.lock().entry(listener).or_default().handshake_failures += 1;
    }
}

fn labelled_counter(e: &mut MetricEncoder<'_>, labels: &[(&str, &str)], v: u64) -> Result<(), std::fmt::Error> {
    e.encode_family(&labels.to_vec())?.encode_counter::<NoLabelSet, u64, u64>(&v, None::<&Exemplar<NoLabelSet, u64>>)
}

#[derive(Debug)]
struct SecurityCollector;

impl Collector for SecurityCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = global();
        let ctr = MetricType::Counter;
        {
            let help =
                "Authentication attempts, by mechanism (password, token, serviceaccount, certificate) and result (success, failure).";
            let mut e = enc.encode_descriptor("auth_attempts", help, None, ctr)?;
            for (mechanism, counts) in MECHANISMS.iter().zip(&m.attempts) {
                for (result, v) in ["success", "failure"].iter().zip(counts) {
                    labelled_counter(&mut e, &[("mechanism", mechanism), ("result", result)], v.load(Ordering::Relaxed))?;
                }
            }
        }
        {
            let help = "Calls refused with PERMISSION_DENIED, by operation.";
            let mut e = enc.encode_descriptor("authorization_denied", help, None, ctr)?;
            for (op, v) in OPERATIONS.iter().zip(&m.denied) {
                labelled_counter(&mut e, &[("operation", op)], v.load(Ordering::Relaxed))?;
            }
        }
        {
            let help = "Connections and streams refused with RESOURCE_EXHAUSTED because their user was at its limit, by limit.";
            let mut e = enc.encode_descriptor("user_limit_rejections", help, None, ctr)?;
            labelled_counter(&mut e, &[("limit", "connections")], m.limit_connections.load(Ordering::Relaxed))?;
            labelled_counter(&mut e, &[("limit", "streams")], m.limit_streams.load(Ordering::Relaxed))?;
        }
        {
            let help = "Node-to-node calls refused because they carried no or a wrong cluster secret.";
            let mut e = enc.encode_descriptor("cluster_auth_failures", help, None, ctr)?;
            e.encode_counter::<NoLabelSet, u64, u64>(&m.cluster_refused.load(Ordering::Relaxed), None::<&Exemplar<NoLabelSet, u64>>)?;
        }
        let listeners = m.listeners.lock();
        if !listeners.is_empty() {
            {
                let help =
                    "TLS handshakes that failed (bad or expired client certificate, plain text on a TLS port, timeout), by listener.";
                let mut e = enc.encode_descriptor("tls_handshake_failures", help, None, ctr)?;
                for (l, s) in listeners.iter() {
                    labelled_counter(&mut e, &[("listener", l)], s.handshake_failures)?;
                }
            }
            {
                let help = "Certificate reloads after the files changed, by listener and result (success, failure: the previous certificate stays).";
                let mut e = enc.encode_descriptor("tls_reloads", help, None, ctr)?;
                for (l, s) in listeners.iter() {
                    labelled_counter(&mut e, &[("listener", l), ("result", "success")], s.reloads_ok)?;
                    labelled_counter(&mut e, &[("listener", l), ("result", "failure")], s.reloads_failed)?;
                }
            }
            {
                let help = "When the certificate in use expires (notAfter), Unix seconds, by listener.";
                let mut e = enc.encode_descriptor("tls_certificate_expiry_timestamp_seconds", help, None, MetricType::Gauge)?;
                for (l, s) in listeners.iter() {
                    e.encode_family(&vec![("listener", *l)])?.encode_gauge(&s.not_after)?;
                }
            }
        }
        Ok(())
    }
}

/// Adds the security metrics to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(SecurityCollector));
}
