//! Planning leadership moves so that every live node leads about as many
//! quorum queues: a pure function of who leads what and who may take over,
//! tested without a cluster. The broker carries the moves out.

use std::collections::BTreeMap;

use crate::raft::NodeId;

/// One queue as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub queue: String,
    pub leader: NodeId,
    /// Voters that could lead it now: up and caught up (the leader aside).
    pub candidates: Vec<NodeId>,
}

/// A move: `queue`'s leadership from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub queue: String,
    pub from: NodeId,
    pub to: NodeId,
}

/// Leaders per node among `nodes` (every live node, with 0 if it leads
/// nothing).
pub fn leaders_per_node(queues: &[Leadership], nodes: &[NodeId]) -> BTreeMap<NodeId, u32> {
    let mut counts: BTreeMap<NodeId, u32> = nodes.iter().map(|n| (*n, 0)).collect();
    for q in queues {
        *counts.entry(q.leader).or_default() += 1;
    }
    counts
}

/// The moves that even out the leaders over `nodes`: while some queue's
/// leader leads at least two more queues than one of its candidates (a node
/// of `nodes`), move it to the candidate that leads the fewest. Each move
/// lowers the sum of squared counts, so this ends; it moves no queue twice.
pub fn plan(queues: &[Leadership], nodes: &[NodeId]) -> Vec<Move> {
    let mut counts = leaders_per_node(queues, nodes);
    let mut moves = Vec::new();
    let mut moved = vec![false; queues.len()];
    loop {
        // The most loaded leader first, then queues in name order.
        let mut best: Option<(usize, NodeId)> = None;
        let mut order: Vec<usize> = (0..queues.len()).filter(|i| !moved[*i]).collect();
        order.sort_by(|a, b| counts[&queues[*b].leader].cmp(&counts[&queues[*a].leader]).then(queues[*a].queue.cmp(&queues[*b].queue)));
        for i in order {
            let q = &queues[i];
            let from = counts[&q.leader];
            let to = q
                .candidates
                .iter()
                .copied()
                .filter(|c| *c != q.leader && counts.contains_key(c))
                .min_by_key(|c| (counts[c], *c))
                .filter(|c| counts[c] + 2 <= from);
            if let Some(to) = to {
                best = Some((i, to));
                break;
            }
        }
        let Some((i, to)) = best else { break };
        let q = &queues[i];
        *counts.get_mut(&q.leader).expect("counted") -= 1;
        *counts.get_mut(&to).expect("counted") += 1;
        moved[i] = true;
        moves.push(Move { queue: q.queue.clone(), from: q.leader, to });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, leader: NodeId, candidates: &[NodeId]) -> Leadership {
        Leadership { queue: name.into(), leader, candidates: candidates.to_vec() }
    }

    fn after(queues: &[Leadership], nodes: &[NodeId], moves: &[Move]) -> BTreeMap<NodeId, u32> {
        let mut qs = queues.to_vec();
        for m in moves {
            let x = qs.iter_mut().find(|x| x.queue == m.queue).unwrap();
            assert_eq!(x.leader, m.from);
            assert!(x.candidates.contains(&m.to), "{m:?} to a node that may not lead it");
            x.leader = m.to;
        }
        leaders_per_node(&qs, nodes)
    }

    #[test]
    fn should_even_out_leaders_over_the_nodes() {
        let queues: Vec<Leadership> = (0..6).map(|i| q(&format!("q{i}"), 1, &[1, 2, 3])).collect();
        let moves = plan(&queues, &[1, 2, 3]);
        assert_eq!(moves.len(), 4);
        assert_eq!(after(&queues, &[1, 2, 3], &moves), BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
    }

    #[test]
    fn should_move_nothing_when_already_even() {
        let queues = vec![q("a", 1, &[1, 2, 3]), q("b", 2, &[1, 2, 3]), q("c", 3, &[1, 2, 3]), q("d", 1, &[1, 2, 3])];
        assert!(plan(&queues, &[1, 2, 3]).is_empty());
    }

    #[test]
    fn should_only_move_to_candidates_on_live_nodes() {
        // Node 3 may lead only "c"; node 4 is not live.
        let queues = vec![q("a", 1, &[1, 2, 4]), q("b", 1, &[1, 2]), q("c", 1, &[1, 3]), q("d", 1, &[1, 2])];
        let moves = plan(&queues, &[1, 2, 3]);
        let counts = after(&queues, &[1, 2, 3], &moves);
        assert!(moves.iter().all(|m| m.to != 4), "{moves:?}");
        let (min, max) = (counts.values().min().unwrap(), counts.values().max().unwrap());
        assert!(max - min <= 1 && counts[&3] == 1, "{counts:?} after {moves:?}");
        // No candidate at all: nothing moves.
        assert!(plan(&[q("x", 1, &[1]), q("y", 1, &[1])], &[1, 2]).is_empty());
    }

    #[test]
    fn should_end_with_counts_at_most_one_apart_when_everyone_may_lead() {
        for n in 1..40usize {
            let queues: Vec<Leadership> = (0..n).map(|i| q(&format!("q{i:02}"), [1, 1, 2, 1, 5][i % 5], &[1, 2, 3, 4, 5])).collect();
            let moves = plan(&queues, &[1, 2, 3, 4, 5]);
            let counts = after(&queues, &[1, 2, 3, 4, 5], &moves);
            let (min, max) = (counts.values().min().unwrap(), counts.values().max().unwrap());
            assert!(max - min <= 1, "{n} queues: {counts:?}");
        }
    }
}
