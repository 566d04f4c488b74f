//! Two operator processes on the chart's Lease: one leads, and when it is
//! killed the other takes over and reconciles.

use std::time::{Duration, Instant};

use crate::harness::*;

async fn leader(op: &Operator) -> bool {
    op.metric("warren_operator_leader").await == Some(1.0)
}

#[tokio::test]
async fn should_hand_leadership_over_when_the_leader_is_killed() {
    let _serial = serial().await;
    let ns = namespace("leader");
    let n = &ns.0;
    let identity = operator_identity();
    let args = ["--leader-election=true", "--lease-seconds", "3"];
    let a = Operator::start_as(&identity, "replica-a", &args);
    a.wait_ready().await;
    let b = Operator::start_as(&identity, "replica-b", &args);
    b.wait_ready().await;
    eventually("a leader", Duration::from_secs(30), || async { leader(&a).await || leader(&b).await }).await;
    let (mut first, second) = if leader(&a).await { (a, b) } else { (b, a) };
    assert!(!leader(&second).await, "only one leader");
    assert_eq!(jsonpath(SYSTEM_NS, "lease/warren-operator", "{.spec.holderIdentity}"), first.name);

    first.kill();
    let killed = Instant::now();
    eventually("the standby takes over", Duration::from_secs(30), || async { leader(&second).await }).await;
    let took = killed.elapsed();
    figure(&format!("leader killed (SIGKILL) -> standby leading in {:.1} s (lease 3 s)", took.as_secs_f64()));
    assert_eq!(jsonpath(SYSTEM_NS, "lease/warren-operator", "{.spec.holderIdentity}"), second.name);

    // The new leader reconciles.
    apply(n, "apiVersion: warren.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: q\nspec:\n  brokerRef: {name: nowhere}\n");
    wait_condition(n, "queue/q", "Ready", "False/BrokerNotFound").await;
    kubectl(&["delete", "-n", n, "queue/q", "--timeout=30s"]);
    drop(second);
}
