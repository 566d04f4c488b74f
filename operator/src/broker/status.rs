//! The Broker status, computed from the StatefulSet as a pure function.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use warren_crds::v1alpha1::BrokerStatus;

use super::build::ValidatedBroker;
use crate::conditions::{self, DEGRADED, PROGRESSING, READY};

/// How long pods may stay not ready during a rollout or start before the
/// Broker counts as `Degraded` (like a Deployment's progress deadline).
pub const PROGRESS_DEADLINE: SignedDuration = SignedDuration::from_mins(10);

/// Status of a Broker whose spec cannot be applied.
pub fn invalid(previous: &BrokerStatus, generation: Option<i64>, message: &str) -> BrokerStatus {
    BrokerStatus {
        observed_generation: generation,
        conditions: conditions::merge(
            &previous.conditions,
            vec![
                conditions::new(READY, false, "InvalidSpec", message, generation),
                conditions::new(PROGRESSING, false, "InvalidSpec", message, generation),
                conditions::new(DEGRADED, true, "InvalidSpec", message, generation),
            ],
        ),
        ..previous.clone()
    }
}

/// Status of a Broker whose children the API server refused: `Degraded`
/// says why; `Ready` keeps what the pods last showed.
pub fn apply_failed(previous: &BrokerStatus, generation: Option<i64>, message: &str) -> BrokerStatus {
    let message = format!("applying the Broker's objects failed: {message}");
    BrokerStatus {
        conditions: conditions::merge(
            &previous.conditions,
            vec![
                conditions::new(PROGRESSING, false, "ApplyFailed", &message, generation),
                conditions::new(DEGRADED, true, "ApplyFailed", &message, generation),
            ],
        ),
        ..previous.clone()
    }
}

/// Status of a Broker one of whose child names is taken by an object it
/// does not control: nothing was applied.
pub fn name_conflict(previous: &BrokerStatus, generation: Option<i64>, message: &str) -> BrokerStatus {
    BrokerStatus {
        observed_generation: generation,
        conditions: conditions::merge(
            &previous.conditions,
            vec![
                conditions::new(READY, false, "NameConflict", message, generation),
                conditions::new(PROGRESSING, false, "NameConflict", message, generation),
                conditions::new(DEGRADED, true, "NameConflict", message, generation),
            ],
        ),
        ..previous.clone()
    }
}

/// Status of a Broker that waits for something outside it before anything
/// is applied (its TLS Secret, cert-manager): `Degraded` and not
/// `Progressing`, with `reason`. `Ready` keeps what the pods last showed;
/// a Broker that never ran is not `Ready`.
pub fn blocked(previous: &BrokerStatus, generation: Option<i64>, reason: &str, message: &str) -> BrokerStatus {
    let mut changed = vec![
        conditions::new(PROGRESSING, false, reason, message, generation),
        conditions::new(DEGRADED, true, reason, message, generation),
    ];
    if conditions::find(&previous.conditions, READY).is_none() {
        changed.push(conditions::new(READY, false, reason, message, generation));
    }
    BrokerStatus { observed_generation: generation, conditions: conditions::merge(&previous.conditions, changed), ..previous.clone() }
}

/// Status of a cluster whose scale-down was refused: nothing was applied,
/// the pods keep running as they are (`Ready` keeps what they last
/// showed); `Degraded` says why and what to do.
pub fn scale_down_refused(previous: &BrokerStatus, generation: Option<i64>, message: &str) -> BrokerStatus {
    BrokerStatus {
        observed_generation: generation,
        conditions: conditions::merge(
            &previous.conditions,
            vec![
                conditions::new(PROGRESSING, false, "ScaleDownRefused", message, generation),
                conditions::new(DEGRADED, true, "ScaleDownRefused", message, generation),
            ],
        ),
        ..previous.clone()
    }
}

/// `status` with the rollout shown as waiting for the broker: `Progressing`
/// stays `True`, with `reason` (`QuorumCritical`, `QuorumUnknown`) and
/// `message` naming the pod that restarts next and why it waits.
pub fn rollout_waiting(status: &BrokerStatus, generation: Option<i64>, reason: &str, message: &str) -> BrokerStatus {
    BrokerStatus {
        conditions: conditions::merge(&status.conditions, vec![conditions::new(PROGRESSING, true, reason, message, generation)]),
        ..status.clone()
    }
}

/// Status from the StatefulSet the API server returned.
pub fn from_stateful_set(v: &ValidatedBroker, sts: &StatefulSet, previous: &BrokerStatus, now: Timestamp) -> BrokerStatus {
    let want = v.spec.replicas;
    let st = sts.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let observed = st.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    let revision_done = match (&st.current_revision, &st.update_revision) {
        (Some(c), Some(u)) => c == u,
        _ => true,
    };
    let rolled_out = observed && updated >= want && revision_done;
    let all_ready = ready >= want;

    // Since when the pods have not all been ready (for the deadline).
    let not_ready_since =
        conditions::find(&previous.conditions, READY).filter(|c| c.status == "False").map(|c| c.last_transition_time.0).unwrap_or(now);
    let past_deadline = now.duration_since(not_ready_since) > PROGRESS_DEADLINE;
    let progressing = !rolled_out || (!all_ready && !past_deadline);
    let degraded = !all_ready && !progressing;

    let generation = v.generation;
    let pods = format!("{ready}/{want} pods ready");
    let ready_c = if all_ready {
        conditions::new(READY, true, "AllReplicasReady", &pods, generation)
    } else {
        conditions::new(READY, false, "ReplicasNotReady", &pods, generation)
    };
    let progressing_c = if !rolled_out {
        conditions::new(PROGRESSING, true, "RollingOut", format!("{updated}/{want} pods updated; {pods}"), generation)
    } else if progressing {
        conditions::new(PROGRESSING, true, "WaitingForReadiness", &pods, generation)
    } else {
        conditions::new(PROGRESSING, false, "RolloutComplete", &pods, generation)
    };
    let degraded_c = if degraded {
        conditions::new(
            DEGRADED,
            true,
            "ReplicasNotReady",
            format!("{pods} for more than {} minutes", PROGRESS_DEADLINE.as_mins()),
            generation,
        )
    } else {
        conditions::new(DEGRADED, false, "AsExpected", &pods, generation)
    };

    BrokerStatus {
        observed_generation: generation,
        replicas: Some(st.replicas),
        ready_replicas: Some(ready),
        endpoint: Some(v.endpoint()),
        conditions: conditions::merge(&previous.conditions, vec![ready_c, progressing_c, degraded_c]),
    }
}
