//! Rolling restarts and scale-down of a cluster Broker, decided as pure
//! functions of what the StatefulSet and the broker report.
//!
//! A cluster's StatefulSet uses a `RollingUpdate` partition: pods at that
//! index and above run the newest pod template, the others keep theirs.
//! When the operator builds a new template (an image, a setting, the member
//! list after a resize) it applies it with the partition at the number of
//! existing pods, so that no running pod restarts yet (new pods of a
//! scale-up start at once with the new template). Then, one pod at a time,
//! it lowers the partition by one, letting the StatefulSet controller
//! restart the next pod, and only when:
//!
//! - the StatefulSet controller has seen the current spec and every pod
//!   above the partition runs the new template (the previous restart is
//!   done);
//! - the broker answers `QuorumCritical(node)` with no queue: stopping that
//!   pod leaves every quorum queue it holds a majority of replicas that are
//!   up and caught up. While some queue is critical, or the broker cannot
//!   be asked, the rollout waits (condition `Progressing`, reason
//!   `QuorumCritical` / `QuorumUnknown`) and is checked again shortly.
//!
//! With no pod ready there is nothing to protect, and nobody to ask: the
//! partition goes down without asking, so that a cluster stuck on a bad
//! template can always be fixed with a new one.
//!
//! A scale-down removes the pods at the top at once (the StatefulSet's
//! `Parallel` policy). Before anything is applied, the operator moves every
//! quorum queue replica off the pods that go ([`replica_moves`]: a replica
//! added on a node that stays, then the one on the node that goes removed,
//! through the broker's `GrowQueues` / `ShrinkQueues`). The scale-down is
//! refused while a durable classic queue lives on a pod that goes, or a
//! move fails, or a quorum queue would still keep fewer than a majority of
//! its replicas, or the broker cannot say (condition `Degraded`, reason
//! `ScaleDownRefused`).

use k8s_openapi::api::apps::v1::StatefulSet;
use warren_client::proto::QueueInfo;

use super::build::{self, ValidatedBroker};

/// What the operator reads from a cluster's StatefulSet before it applies
/// a new one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `spec.replicas`.
    pub replicas: i32,
    /// The rolling update partition.
    pub partition: i32,
    /// The pod template hash the operator recorded.
    pub template_hash: Option<String>,
    /// The StatefulSet controller has acted on the current spec
    /// (`status.observedGeneration` is the object's generation).
    pub settled: bool,
    /// Pods running the newest template (`status.updatedReplicas`).
    pub updated: i32,
    /// Pods ready (`status.readyReplicas`).
    pub ready: i32,
}

impl Observed {
    /// Reads a stored StatefulSet.
    pub fn from_stateful_set(sts: &StatefulSet) -> Observed {
        let status = sts.status.clone().unwrap_or_default();
        Observed {
            replicas: sts.spec.replicas.unwrap_or(1),
            partition: build::partition(sts),
            template_hash: build::template_hash(sts).map(str::to_string),
            settled: status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
        }
    }
}

/// The partition to apply next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Apply this partition; nothing to ask the broker.
    Apply(i32),
    /// The pod at `index` (broker node `node`) restarts next: apply
    /// `index` if the broker says stopping that node is safe, else `hold`.
    Ask {
        /// The partition that restarts nothing more.
        hold: i32,
        /// The next pod's index (and the partition that restarts it).
        index: i32,
        /// Its broker node id.
        node: u64,
    },
}

/// The next step of a cluster's rollout: `desired` pods whose template
/// hashes to `hash`, given the StatefulSet the API server holds (`None`:
/// not created yet).
pub fn next(desired: i32, hash: &str, stored: Option<&Observed>) -> Next {
    let Some(o) = stored else {
        // A new cluster: every pod starts at once with the template.
        return Next::Apply(0);
    };
    if o.template_hash.as_deref() != Some(hash) {
        // A new template: restart none of the pods that exist and stay;
        // pods added by a scale-up start with it.
        return Next::Apply(o.replicas.min(desired).max(0));
    }
    let hold = o.partition.clamp(0, desired);
    if hold == 0 {
        return Next::Apply(0);
    }
    // The previous step is done: the controller has seen the spec, scaled
    // to it, and every pod from `hold` up runs the new template.
    let done = o.settled && o.replicas == desired && o.updated >= desired - hold;
    if !done {
        return Next::Apply(hold);
    }
    if o.ready == 0 {
        return Next::Apply(hold - 1);
    }
    Next::Ask { hold, index: hold - 1, node: ValidatedBroker::node_id(hold - 1) }
}

/// Why a scale-down from the stored size to `keep` pods is unsafe: each
/// queue that would keep fewer than a majority of its replicas, and each
/// durable classic queue on a pod that goes, described for the condition.
/// Empty: safe.
pub fn scale_down_blockers(queues: &[QueueInfo], keep: i32) -> Vec<String> {
    let kept = |node: u64| (1..=keep).any(|i| ValidatedBroker::node_id(i - 1) == node);
    let mut out = Vec::new();
    for q in queues {
        match q.queue_type.as_str() {
            "quorum" => {
                let left = q.members.iter().filter(|m| kept(**m)).count();
                if left * 2 <= q.members.len() {
                    out.push(format!("{} (replicas on nodes {}; {left} would remain)", q.name, list(&q.members)));
                }
            }
            _ if q.durable && q.leader != 0 && !kept(q.leader) => {
                out.push(format!("{} (classic, on node {})", q.name, q.leader));
            }
            _ => {}
        }
    }
    out
}

/// One replica to move before a scale-down: add the queue's replica on
/// `add` (a node that stays; `None` when every node that stays holds one
/// already), then remove the one on `remove` (a node that goes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub queue: String,
    pub add: Option<u64>,
    pub remove: u64,
}

/// The replica moves that take every quorum queue off the nodes a
/// scale-down to `keep` pods removes, keeping each queue's replica count
/// where the nodes that stay allow it. Each replacement goes to the node
/// that stays and holds the fewest replicas (then the lowest id), so the
/// replicas stay spread. Queues in name order, so the plan is the same on
/// every reconcile.
pub fn replica_moves(queues: &[QueueInfo], keep: i32) -> Vec<Move> {
    let kept: Vec<u64> = (0..keep.max(0)).map(ValidatedBroker::node_id).collect();
    let mut load: std::collections::BTreeMap<u64, usize> = kept.iter().map(|n| (*n, 0)).collect();
    for q in queues.iter().filter(|q| q.queue_type == "quorum") {
        for m in &q.members {
            if let Some(l) = load.get_mut(m) {
                *l += 1;
            }
        }
    }
    let mut sorted: Vec<&QueueInfo> = queues.iter().filter(|q| q.queue_type == "quorum").collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for q in sorted {
        let mut members = q.members.clone();
        for gone in q.members.iter().filter(|m| !kept.contains(m)) {
            let add = load.iter().filter(|(n, _)| !members.contains(n)).min_by_key(|(n, l)| (**l, **n)).map(|(n, _)| *n);
            if let Some(n) = add {
                members.push(n);
                *load.entry(n).or_default() += 1;
            }
            out.push(Move { queue: q.name.clone(), add, remove: *gone });
        }
    }
    out
}

/// A regular expression that matches exactly `name` (the broker's
/// `queue_pattern`).
pub fn exact_pattern(name: &str) -> String {
    let mut p = String::with_capacity(name.len() + 2);
    p.push('^');
    for c in name.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('$');
    p
}

fn list(nodes: &[u64]) -> String {
    nodes.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// At most `n` names of a list, then how many more.
pub fn some_of(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        s.push_str(&format!(" and {} more", items.len() - n));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(replicas: i32, partition: i32, hash: &str, updated: i32, ready: i32) -> Observed {
        Observed { replicas, partition, template_hash: Some(hash.into()), settled: true, updated, ready }
    }

    fn mv(queue: &str, add: Option<u64>, remove: u64) -> Move {
        Move { queue: queue.into(), add, remove }
    }

    #[test]
    fn should_move_replicas_off_the_nodes_that_go_to_the_least_loaded_that_stay() {
        let queues = [quorum("b", &[3, 4, 5]), quorum("a", &[1, 2, 3]), quorum("c", &[4, 5, 1]), quorum("classic", &[])];
        // Nodes 1..=3 stay; a holds 1, 2, 3 already; loads before: 1:2, 2:1, 3:2.
        assert_eq!(replica_moves(&queues, 3), vec![mv("b", Some(2), 4), mv("b", Some(1), 5), mv("c", Some(2), 4), mv("c", Some(3), 5)]);
        // Nothing goes: nothing moves.
        assert_eq!(replica_moves(&queues, 5), vec![]);
        // Fewer nodes stay than a queue has replicas: the extra ones go
        // without a replacement.
        assert_eq!(replica_moves(&[quorum("d", &[1, 2, 3])], 2), vec![mv("d", None, 3)]);
    }

    #[test]
    fn should_make_an_exact_pattern_of_any_queue_name() {
        assert_eq!(exact_pattern("orders.eu"), "^orders\\.eu$");
        assert_eq!(exact_pattern("a+b(c)"), "^a\\+b\\(c\\)$");
        assert_eq!(exact_pattern("plain_name"), "^plain_name$");
    }

    #[test]
    fn should_start_a_new_cluster_at_once() {
        assert_eq!(next(3, "h", None), Next::Apply(0));
    }

    #[test]
    fn should_restart_no_pod_when_the_template_changes() {
        assert_eq!(next(3, "new", Some(&observed(3, 0, "old", 3, 3))), Next::Apply(3));
        // A scale-up: the new pods (index 3 and 4) start with the new template.
        assert_eq!(next(5, "new", Some(&observed(3, 0, "old", 3, 3))), Next::Apply(3));
        // A scale-down: the pods that stay restart one by one.
        assert_eq!(next(3, "new", Some(&observed(5, 0, "old", 5, 5))), Next::Apply(3));
        // A template written by an operator that recorded none.
        let mut o = observed(3, 0, "", 3, 3);
        o.template_hash = None;
        assert_eq!(next(3, "new", Some(&o)), Next::Apply(3));
    }

    #[test]
    fn should_step_down_one_pod_at_a_time_after_asking() {
        assert_eq!(next(3, "h", Some(&observed(3, 3, "h", 0, 3))), Next::Ask { hold: 3, index: 2, node: 3 });
        // The pod at index 2 is not back on the new template yet.
        assert_eq!(next(3, "h", Some(&observed(3, 2, "h", 0, 2))), Next::Apply(2));
        assert_eq!(next(3, "h", Some(&observed(3, 2, "h", 1, 3))), Next::Ask { hold: 2, index: 1, node: 2 });
        assert_eq!(next(3, "h", Some(&observed(3, 1, "h", 2, 3))), Next::Ask { hold: 1, index: 0, node: 1 });
        assert_eq!(next(3, "h", Some(&observed(3, 0, "h", 3, 3))), Next::Apply(0));
    }

    #[test]
    fn should_wait_until_the_controller_has_seen_the_spec() {
        let mut o = observed(3, 3, "h", 0, 3);
        o.settled = false;
        assert_eq!(next(3, "h", Some(&o)), Next::Apply(3));
        // Scaling up: the new pods do not exist yet.
        assert_eq!(next(5, "h", Some(&observed(3, 3, "h", 0, 3))), Next::Apply(3));
    }

    #[test]
    fn should_not_ask_when_no_pod_is_ready() {
        assert_eq!(next(3, "h", Some(&observed(3, 3, "h", 0, 0))), Next::Apply(2));
    }

    fn quorum(name: &str, members: &[u64]) -> QueueInfo {
        QueueInfo { name: name.into(), durable: true, queue_type: "quorum".into(), members: members.to_vec(), ..QueueInfo::default() }
    }

    #[test]
    fn should_refuse_a_scale_down_that_takes_a_majority_away() {
        let queues = [quorum("a", &[1, 2, 3]), quorum("b", &[3, 4, 5]), quorum("c", &[1, 4, 5]), quorum("d", &[2, 3, 5])];
        let blockers = scale_down_blockers(&queues, 3);
        assert_eq!(blockers, ["b (replicas on nodes 3, 4, 5; 1 would remain)", "c (replicas on nodes 1, 4, 5; 1 would remain)"]);
        assert!(scale_down_blockers(&queues, 5).is_empty());
        assert_eq!(scale_down_blockers(&[quorum("two", &[1, 2])], 1).len(), 1, "1 of 2 is not a majority");
    }

    #[test]
    fn should_refuse_a_scale_down_that_removes_a_durable_classic_queue() {
        let classic = |name: &str, node: u64, durable: bool| QueueInfo {
            name: name.into(),
            durable,
            queue_type: "classic".into(),
            leader: node,
            ..QueueInfo::default()
        };
        let queues = [classic("kept", 2, true), classic("gone", 4, true), classic("transient", 5, false)];
        assert_eq!(scale_down_blockers(&queues, 3), ["gone (classic, on node 4)"]);
    }

    #[test]
    fn should_shorten_long_lists() {
        let items: Vec<String> = (0..7).map(|i| format!("q{i}")).collect();
        assert_eq!(some_of(&items, 3), "q0, q1, q2 and 4 more");
        assert_eq!(some_of(&items[..2], 3), "q0, q1");
    }
}
