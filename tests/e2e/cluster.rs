//! Clusters of real broker processes on 127.0.0.1.

use std::time::Duration;

use warren_tests::TestCluster;

/// Liveness is judged within about a second; allow for slow machines.
const LIVENESS: Duration = Duration::from_secs(30);

#[tokio::test]
async fn should_form_a_cluster_of_three_processes_that_see_each_other_and_notice_failures() {
    let mut c = TestCluster::start(3).await.unwrap();
    for id in c.ids() {
        let node = c.node(id);
        assert!(node.cluster_addr.is_some(), "node {id} reports its cluster listener: {:?}", node.stdout);
        assert!(node.stdout.iter().any(|l| l.contains("peers = ") && l.contains(&c.peers)), "the peers setting is printed");
    }
    for id in c.ids() {
        c.wait_for_peers(id, &[1, 2, 3], LIVENESS).await.unwrap();
    }
    // kill -9: the others notice, and see it again once restarted.
    c.kill(3).unwrap();
    for id in [1, 2] {
        c.wait_for_peers(id, &[1, 2], LIVENESS).await.unwrap();
    }
    c.restart(3).await.unwrap();
    for id in c.ids() {
        c.wait_for_peers(id, &[1, 2, 3], LIVENESS).await.unwrap();
    }
    // SIGSTOP: a paused node stops answering; SIGCONT brings it back.
    c.pause(2).unwrap();
    for id in [1, 3] {
        c.wait_for_peers(id, &[1, 3], LIVENESS).await.unwrap();
    }
    c.resume(2).unwrap();
    for id in c.ids() {
        c.wait_for_peers(id, &[1, 2, 3], LIVENESS).await.unwrap();
    }
}

#[tokio::test]
async fn should_run_as_a_single_node_without_peers() {
    let b = warren_tests::TestBroker::start().await.unwrap();
    assert!(b.cluster_addr.is_none());
    assert!(!b.metrics().await.unwrap().contains("warren_cluster_peer_up"), "no cluster metrics on a single node");
}
