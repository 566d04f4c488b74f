//! Status conditions following Kubernetes conventions: `type`, `status`
//! (`True` / `False` / `Unknown`), `reason` (CamelCase), `message`,
//! `observedGeneration` and `lastTransitionTime`, which changes only when
//! `status` does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types.
pub const READY: &str = "Ready";
/// The Broker's rollout is in progress.
pub const PROGRESSING: &str = "Progressing";
/// The Broker runs with fewer ready pods than wanted, or cannot be applied.
pub const DEGRADED: &str = "Degraded";
/// A Queue's autoscaler could read the backlog and scale the target.
pub const AUTOSCALING_ACTIVE: &str = "AutoscalingActive";

/// Builds a condition stamped with `now`.
pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Merges `updates` into `existing`: a condition whose status did not change
/// keeps its `lastTransitionTime`; conditions of other types are kept.
/// The result is sorted by type, so equal inputs give equal output.
pub fn merge(existing: &[Condition], updates: Vec<Condition>) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing.iter().filter(|c| !updates.iter().any(|u| u.type_ == c.type_)).cloned().collect();
    for mut update in updates {
        if let Some(old) = existing.iter().find(|c| c.type_ == update.type_)
            && old.status == update.status
        {
            update.last_transition_time = old.last_transition_time.clone();
        }
        out.push(update);
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The condition of `type_`, if any.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_keep_transition_time_while_status_is_unchanged() {
        let mut old = new(READY, true, "Declared", "ok", Some(1));
        old.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let merged = merge(std::slice::from_ref(&old), vec![new(READY, true, "Declared", "still ok", Some(2))]);
        assert_eq!(merged[0].last_transition_time, old.last_transition_time);
        assert_eq!(merged[0].observed_generation, Some(2));
        let merged = merge(&[old.clone()], vec![new(READY, false, "BrokerNotFound", "gone", Some(2))]);
        assert_ne!(merged[0].last_transition_time, old.last_transition_time);
    }

    #[test]
    fn should_keep_other_types_and_sort() {
        let a = new(PROGRESSING, false, "Done", "", None);
        let merged = merge(&[a], vec![new(READY, true, "Ok", "", None), new(DEGRADED, false, "Ok", "", None)]);
        let types: Vec<_> = merged.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [DEGRADED, PROGRESSING, READY]);
    }
}
