//! Backlog autoscaling: the decision is a pure function of the policy, the
//! backlog, the current replicas and recent recommendations; applying it
//! (reading and patching the target's `scale` subresource) is separate.
//!
//! Rules, in order:
//! 1. The raw recommendation, clamped to `[minReplicas, maxReplicas]`, is
//!    - 0 when the queue is idle: nothing ready and nothing unacknowledged
//!      (whatever `backlog` counts, so consumers busy with delivered
//!      messages are never scaled away);
//!    - 0 when the workload is at zero and the backlog is at most
//!      `activationMessages` (the threshold only gates starting from zero);
//!    - otherwise `ceil(backlog / messagesPerReplica)`, at least 1.
//! 2. Scaling up (raw above current) is immediate, so a backlog on a
//!    workload at zero starts it within one polling interval.
//! 3. Scaling down goes only to the highest recommendation made within the
//!    stabilization window, so a short lull never stops busy consumers:
//!    scaling to zero needs the queue idle for the whole window. After an
//!    operator restart the window starts again (history seeded with the
//!    current replicas), erring on the side of keeping consumers.
//! 4. One workload, one autoscaling Queue: when several Queues target the
//!    same workload, the oldest drives it and the others report
//!    `TargetConflict` instead of fighting over its replicas.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::EventType;
use warren_client::proto::QueueInfo;
use warren_crds::v1alpha1::{Autoscaling, AutoscalingStatus, Backlog, Queue, ScaleTarget};

use crate::conditions::{self, AUTOSCALING_ACTIVE};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::metrics::{DecisionLabels, QueueLabels};

/// The autoscaling policy of one Queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Backlog one replica handles.
    pub messages_per_replica: u64,
    /// Backlog at or below this counts as none.
    pub activation_messages: u64,
    /// Scale-down stabilization window.
    pub stabilization: Duration,
}

impl Policy {
    /// The policy of a Queue's `spec.autoscaling`. Out-of-range values
    /// (refused by the schema anyway) are clamped to something safe.
    pub fn from_spec(a: &Autoscaling) -> Self {
        let min_replicas = a.min_replicas.max(0);
        Self {
            min_replicas,
            max_replicas: a.max_replicas.max(min_replicas).max(1),
            messages_per_replica: u64::try_from(a.messages_per_replica).unwrap_or(1).max(1),
            activation_messages: u64::try_from(a.activation_messages).unwrap_or(0),
            stabilization: Duration::from_secs(u64::try_from(a.scale_down_stabilization_seconds).unwrap_or(0)),
        }
    }
}

/// The backlog of a queue, as the policy counts it.
pub fn backlog(info: &QueueInfo, which: Backlog) -> u64 {
    match which {
        Backlog::ReadyAndUnacked => info.ready.saturating_add(info.unacked),
        Backlog::Ready => info.ready,
    }
}

/// Why the decision is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// More replicas, now.
    ScaledUp,
    /// Fewer replicas: the whole window agreed.
    ScaledDown,
    /// Fewer replicas are recommended, but not for the whole window yet.
    StabilizingScaleDown,
    /// Nothing to change.
    Stable,
}

impl Reason {
    /// The CamelCase reason in status, Events and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ScaledUp => "ScaledUp",
            Reason::ScaledDown => "ScaledDown",
            Reason::StabilizingScaleDown => "StabilizingScaleDown",
            Reason::Stable => "Stable",
        }
    }
}

/// An autoscaling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to set.
    pub desired: i32,
    /// What the backlog alone asks for.
    pub recommended: i32,
    /// Why.
    pub reason: Reason,
}

/// Recent recommendations of one Queue, for scale-down stabilization.
#[derive(Clone, Debug, Default)]
pub struct History {
    recommendations: VecDeque<(Instant, i32)>,
}

impl History {
    /// A history that starts with `replicas` recommended at `now`.
    pub fn seeded(now: Instant, replicas: i32) -> Self {
        Self { recommendations: VecDeque::from([(now, replicas)]) }
    }

    fn record(&mut self, now: Instant, replicas: i32, window: Duration) {
        self.recommendations.push_back((now, replicas));
        while let Some(&(at, _)) = self.recommendations.front() {
            if now.saturating_duration_since(at) >= window {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }

    fn highest(&self) -> Option<i32> {
        self.recommendations.iter().map(|&(_, r)| r).max()
    }
}

/// What the autoscaler reads from the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The backlog as the policy counts it ([`backlog`]).
    pub backlog: u64,
    /// Nothing ready and nothing unacknowledged: the only state in which a
    /// workload may go to zero.
    pub idle: bool,
}

impl Observation {
    /// What a queue's counts mean for the policy `which`.
    pub fn of(info: &QueueInfo, which: Backlog) -> Self {
        Self { backlog: backlog(info, which), idle: info.ready == 0 && info.unacked == 0 }
    }
}

/// What the queue alone asks for (rule 1).
pub fn recommend(policy: &Policy, obs: Observation, current: i32) -> i32 {
    let raw = if obs.idle || (current <= 0 && obs.backlog <= policy.activation_messages) {
        0
    } else {
        obs.backlog.div_ceil(policy.messages_per_replica).max(1)
    };
    let raw = i32::try_from(raw).unwrap_or(i32::MAX);
    raw.clamp(policy.min_replicas, policy.max_replicas)
}

/// Decides the replicas (rules 1 to 3) and records the recommendation.
pub fn decide(policy: &Policy, obs: Observation, current: i32, now: Instant, history: &mut History) -> Decision {
    let recommended = recommend(policy, obs, current);
    history.record(now, recommended, policy.stabilization);
    let (desired, reason) = if recommended > current {
        (recommended, Reason::ScaledUp)
    } else if recommended == current {
        (current, Reason::Stable)
    } else {
        let floor = history.highest().unwrap_or(recommended).max(recommended);
        let desired = floor.min(current).clamp(policy.min_replicas, policy.max_replicas);
        if desired < current {
            (desired, Reason::ScaledDown)
        } else if desired > current {
            // current is below min: raise it to min.
            (desired, Reason::ScaledUp)
        } else {
            (current, Reason::StabilizingScaleDown)
        }
    };
    Decision { desired, recommended, reason }
}

/// The API group of an `apiVersion` (`apps/v1` → `apps`, `v1` → ``).
fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map_or("", |(g, _)| g)
}

/// Whether two Queues drive the same workload (same namespace, API group,
/// kind and name; the version does not matter).
fn same_target(a: &Queue, b: &Queue) -> bool {
    match (&a.spec.autoscaling, &b.spec.autoscaling) {
        (Some(x), Some(y)) => {
            a.namespace() == b.namespace()
                && group_of(&x.target.api_version) == group_of(&y.target.api_version)
                && x.target.kind == y.target.kind
                && x.target.name == y.target.name
        }
        _ => false,
    }
}

/// When another live Queue targets the same workload and is older (by
/// creation time, then name), the name of that Queue: it drives the
/// workload, `q` must not (rule 4).
pub fn conflicting_owner(q: &Queue, all: &[std::sync::Arc<Queue>]) -> Option<String> {
    let key = |x: &Queue| (x.metadata.creation_timestamp.clone().map(|t| t.0), x.name_any());
    all.iter()
        .filter(|o| o.uid() != q.uid() && o.metadata.deletion_timestamp.is_none() && same_target(q, o))
        .filter(|o| key(o) < key(q))
        .min_by_key(|o| key(o))
        .map(|o| o.name_any())
}

/// The API of a scale target's kind. Common workload kinds are known;
/// anything else (a custom resource with a scale subresource) is looked up
/// through discovery once and cached.
async fn target_api(ctx: &Context, namespace: &str, t: &ScaleTarget) -> Result<Api<DynamicObject>> {
    let key = format!("{}/{}", t.api_version, t.kind);
    let ar = match ctx.cached_scale_resource(&key) {
        Some(ar) => ar,
        None => {
            let (group, version) = t.api_version.split_once('/').unwrap_or(("", t.api_version.as_str()));
            let gvk = GroupVersionKind::gvk(group, version, &t.kind);
            let known = match (group, t.kind.as_str()) {
                ("apps", "Deployment") => Some("deployments"),
                ("apps", "StatefulSet") => Some("statefulsets"),
                ("apps", "ReplicaSet") => Some("replicasets"),
                _ => None,
            };
            let ar = match known {
                Some(plural) => ApiResource::from_gvk_with_plural(&gvk, plural),
                None => {
                    kube::discovery::pinned_kind(&ctx.client, &gvk)
                        .await
                        .map_err(|e| Error::ScaleTarget { target: key.clone(), message: format!("unknown kind: {e}") })?
                        .0
                }
            };
            ctx.cache_scale_resource(key, ar.clone());
            ar
        }
    };
    Ok(Api::namespaced_with(ctx.client.clone(), namespace, &ar))
}

/// What one autoscaling pass produced, for the Queue status.
pub struct Outcome {
    /// `status.autoscaling`.
    pub status: AutoscalingStatus,
    /// The `AutoscalingActive` condition.
    pub condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
}

/// Reads the target's replicas, decides, patches the scale subresource when
/// the replicas change, and records the decision (Event, metrics).
pub async fn run(ctx: &Context, q: &Queue, a: &Autoscaling, info: &QueueInfo) -> Outcome {
    let generation = q.metadata.generation;
    let previous = q.status.as_ref().and_then(|s| s.autoscaling.clone()).unwrap_or_default();
    let target = format!("{}/{}", a.target.kind, a.target.name);
    let obs = Observation::of(info, a.backlog);
    let backlog = obs.backlog;
    let fail = |reason: &str, message: String| Outcome {
        status: AutoscalingStatus { backlog: Some(backlog), reason: Some(reason.to_string()), ..previous.clone() },
        condition: conditions::new(AUTOSCALING_ACTIVE, false, reason, message, generation),
    };
    let Some(namespace) = q.namespace() else {
        return fail("MissingNamespace", "the Queue has no namespace".into());
    };
    if let Some(owner) = ctx.queues().and_then(|store| conflicting_owner(q, &store.state())) {
        return fail(
            "TargetConflict",
            format!(
                "{target} is already autoscaled by Queue {owner} (the oldest Queue targeting it); this Queue does not scale it. \
                 Point one Queue at one workload"
            ),
        );
    }
    let api = match target_api(ctx, &namespace, &a.target).await {
        Ok(api) => api,
        Err(e) => return fail("UnknownTargetKind", e.to_string()),
    };
    let scale = match api.get_scale(&a.target.name).await {
        Ok(s) => s,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return fail("TargetNotFound", format!("{target} not found in namespace {namespace} (or it has no scale subresource)"));
        }
        Err(e) => return fail("TargetUnreadable", format!("reading the scale of {target}: {e}")),
    };
    let current = scale.spec.and_then(|s| s.replicas).unwrap_or(0);

    let policy = Policy::from_spec(a);
    let now = Instant::now();
    let key = q.uid().unwrap_or_else(|| format!("{namespace}/{}", q.name_any()));
    let decision = {
        let mut histories = ctx.histories.lock().unwrap_or_else(|p| p.into_inner());
        let history = histories.entry(key).or_insert_with(|| History::seeded(now, current));
        decide(&policy, obs, current, now, history)
    };

    let labels = QueueLabels { namespace: namespace.clone(), queue: q.name_any() };
    ctx.metrics.backlog.get_or_create(&labels).set(i64::try_from(backlog).unwrap_or(i64::MAX));
    ctx.metrics.desired_replicas.get_or_create(&labels).set(i64::from(decision.desired));

    let mut status = AutoscalingStatus {
        current_replicas: Some(current),
        desired_replicas: Some(decision.desired),
        backlog: Some(backlog),
        reason: Some(decision.reason.as_str().to_string()),
        last_scale_time: previous.last_scale_time.clone(),
    };
    let explain = format!(
        "backlog {backlog} ({:?}), {} per replica, recommended {}, bounds {}..={}",
        a.backlog, policy.messages_per_replica, decision.recommended, policy.min_replicas, policy.max_replicas
    );
    if decision.desired != current {
        let patch = serde_json::json!({ "spec": { "replicas": decision.desired } });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        if let Err(e) = api.patch_scale(&a.target.name, &params, &Patch::Merge(&patch)).await {
            return fail("ScaleFailed", format!("setting {target} to {} replicas: {e}", decision.desired));
        }
        status.current_replicas = Some(decision.desired);
        status.last_scale_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let direction = if decision.desired > current { "up" } else { "down" };
        ctx.metrics.scaling_decisions.get_or_create(&DecisionLabels { namespace: namespace.clone(), queue: q.name_any(), direction }).inc();
        let note = format!("scaled {target} from {current} to {} replicas: {explain}", decision.desired);
        tracing::info!(queue = %q.name_any(), %namespace, "{note}");
        crate::topology::publish(ctx, q, EventType::Normal, decision.reason.as_str(), "Scale", note).await;
    }
    Outcome {
        status,
        condition: conditions::new(
            AUTOSCALING_ACTIVE,
            true,
            decision.reason.as_str(),
            format!("{target} at {} replicas: {explain}", decision.desired),
            generation,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: i32, max: i32, per: u64, activation: u64, window_s: u64) -> Policy {
        Policy {
            min_replicas: min,
            max_replicas: max,
            messages_per_replica: per,
            activation_messages: activation,
            stabilization: Duration::from_secs(window_s),
        }
    }

    /// One row: (policy, backlog, current replicas) → (desired, reason),
    /// with a fresh history seeded by the current replicas at t=0 and the
    /// decision made at t=`at_s`.
    #[test]
    fn should_decide_per_table() {
        use Reason::*;
        let p = policy(0, 10, 10, 0, 60);
        #[rustfmt::skip]
        let rows: &[(&str, Policy, u64, i32, u64, i32, Reason)] = &[
            ("from zero, any backlog starts one replica",      p, 1,      0, 0,   1,  ScaledUp),
            ("from zero, backlog needs three",                 p, 25,     0, 0,   3,  ScaledUp),
            ("exact multiple",                                 p, 30,     0, 0,   3,  ScaledUp),
            ("capped at max",                                  p, 10_000, 2, 0,   10, ScaledUp),
            ("no backlog at zero stays at zero",               p, 0,      0, 0,   0,  Stable),
            ("steady state",                                   p, 40,     4, 0,   4,  Stable),
            ("lower backlog within the window holds",          p, 5,      4, 30,  4,  StabilizingScaleDown),
            ("lower backlog after the window scales down",     p, 5,      4, 61,  1,  ScaledDown),
            ("empty after the window scales to zero",          p, 0,      4, 61,  0,  ScaledDown),
            ("min replicas is a floor",                        policy(2, 10, 10, 0, 0), 0, 5, 0, 2, ScaledDown),
            ("below min is raised to min",                     policy(2, 10, 10, 0, 0), 0, 0, 0, 2, ScaledUp),
            ("activation: at threshold stays at zero",         policy(0, 10, 10, 50, 0), 50, 0, 0, 0, Stable),
            ("activation: above threshold starts",             policy(0, 10, 10, 50, 0), 51, 0, 0, 6, ScaledUp),
            ("activation does not stop running consumers",  policy(0, 10, 10, 50, 0), 20, 3, 0, 2, ScaledDown),
            ("activation: a small backlog keeps one",       policy(0, 10, 10, 50, 0), 3, 3, 0, 1, ScaledDown),
            ("no window scales down at once",                  policy(0, 10, 10, 0, 0), 15, 6, 0, 2, ScaledDown),
            ("manual scale above max comes back to max",       policy(0, 3, 10, 0, 0), 1000, 7, 0, 3, ScaledDown),
            ("huge backlog does not overflow",                 policy(0, 10_000, 1, 0, 0), u64::MAX, 0, 0, 10_000, ScaledUp),
        ];
        let t0 = Instant::now();
        for &(name, p, backlog, current, at_s, want, reason) in rows {
            let mut h = History::seeded(t0, current);
            // Here the backlog is all ready messages: idle exactly when empty.
            let obs = Observation { backlog, idle: backlog == 0 };
            let d = decide(&p, obs, current, t0 + Duration::from_secs(at_s), &mut h);
            assert_eq!((d.desired, d.reason), (want, reason), "{name}");
        }
    }

    #[test]
    fn should_scale_down_only_to_the_highest_recommendation_in_the_window() {
        let p = policy(0, 10, 10, 0, 60);
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let o = |backlog| Observation { backlog, idle: backlog == 0 };
        let mut h = History::seeded(t0, 0);
        assert_eq!(decide(&p, o(80), 0, s(0), &mut h).desired, 8); // burst
        assert_eq!(decide(&p, o(30), 8, s(20), &mut h).desired, 8); // lull: hold
        assert_eq!(decide(&p, o(30), 8, s(70), &mut h).desired, 3); // burst left the window
        assert_eq!(decide(&p, o(0), 3, s(100), &mut h).desired, 3); // 30 s of zero: hold
        let d = decide(&p, o(0), 3, s(131), &mut h);
        assert_eq!((d.desired, d.reason), (0, Reason::ScaledDown)); // a full minute of zero
    }

    #[test]
    fn should_count_unacked_messages_by_default() {
        let info = QueueInfo { ready: 0, unacked: 7, ..QueueInfo::default() };
        assert_eq!(backlog(&info, Backlog::ReadyAndUnacked), 7);
        assert_eq!(backlog(&info, Backlog::Ready), 0);
        // Busy consumers (everything delivered, nothing ready) keep a replica.
        let p = policy(0, 10, 10, 0, 0);
        let mut h = History::seeded(Instant::now(), 1);
        let d = decide(&p, Observation::of(&info, Backlog::ReadyAndUnacked), 1, Instant::now(), &mut h);
        assert_eq!(d.desired, 1);
    }

    /// Scale to zero only when ready and unacked are both zero, whatever the
    /// backlog mode and activation threshold: the complaint about
    /// autoscalers that count only ready messages.
    #[test]
    fn should_never_scale_busy_consumers_to_zero() {
        let no_window = policy(0, 10, 10, 100, 0);
        let t = Instant::now();
        let busy = QueueInfo { ready: 0, unacked: 3, ..QueueInfo::default() };
        for which in [Backlog::Ready, Backlog::ReadyAndUnacked] {
            let mut h = History::seeded(t, 2);
            let d = decide(&no_window, Observation::of(&busy, which), 2, t, &mut h);
            assert_eq!(d.desired, 1, "{which:?}: unacked work keeps one consumer");
        }
        // Only delayed messages: nothing to work on yet, scale to zero.
        let waiting = QueueInfo { delayed: 50, ..QueueInfo::default() };
        let mut h = History::seeded(t, 1);
        assert_eq!(decide(&no_window, Observation::of(&waiting, Backlog::ReadyAndUnacked), 1, t, &mut h).desired, 0);
        // Idle for less than the window: held; for the whole window: zero.
        let p = policy(0, 10, 10, 0, 60);
        let idle = Observation::of(&QueueInfo::default(), Backlog::ReadyAndUnacked);
        let mut h = History::seeded(t, 2);
        assert_eq!(decide(&p, idle, 2, t + Duration::from_secs(59), &mut h).desired, 2);
        assert_eq!(decide(&p, idle, 2, t + Duration::from_secs(61), &mut h).desired, 0);
    }

    fn autoscaled(name: &str, created: &str, target: &str) -> Queue {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": name, "namespace": "ns", "uid": name, "creationTimestamp": created},
            "spec": {"brokerRef": {"name": "w"}, "autoscaling": {"target": {"name": target}, "maxReplicas": 3}}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn should_let_only_the_oldest_queue_drive_a_workload() {
        let a = std::sync::Arc::new(autoscaled("a", "2026-01-01T00:00:00Z", "worker"));
        let b = std::sync::Arc::new(autoscaled("b", "2026-01-02T00:00:00Z", "worker"));
        let c = std::sync::Arc::new(autoscaled("c", "2025-01-01T00:00:00Z", "other"));
        let all = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(conflicting_owner(&a, &all), None, "the oldest drives it");
        assert_eq!(conflicting_owner(&b, &all).as_deref(), Some("a"));
        assert_eq!(conflicting_owner(&c, &all), None, "another workload");
        // apps/v1 and apps/v1beta2 Deployment "worker" are the same workload.
        let mut d = autoscaled("d", "2026-01-03T00:00:00Z", "worker");
        if let Some(x) = d.spec.autoscaling.as_mut() {
            x.target.api_version = "apps/v1beta2".into();
        }
        assert_eq!(conflicting_owner(&d, &all).as_deref(), Some("a"));
    }
}
