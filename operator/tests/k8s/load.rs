//! 1,000 Queues and 1,000 Bindings against the real API server and a real
//! broker: how long until all are Ready, and how many API requests the
//! operator made (counted from the API server's audit log), then how many
//! it makes while nothing changes. Figures, not timed assertions: the
//! bounds only catch an operator that does not finish, or one whose
//! requests grow with the square of the object count.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::api::PostParams;
use warren_crds::v1alpha1::{Binding, Queue};

use crate::harness::*;

const N: usize = 1000;

#[tokio::test]
async fn should_reconcile_a_thousand_queues_and_bindings() {
    let _serial = serial().await;
    let ns = namespace("load");
    let n = &ns.0;
    let (real, op) = ready_broker(n, &["--resync-seconds", "30"]).await;
    apply(
        n,
        "apiVersion: warren.dev/v1alpha1\nkind: Exchange\nmetadata:\n  name: load\nspec:\n  brokerRef: {name: warren}\n  type: direct\n",
    );
    wait_ready(n, &["exchange/load"]);

    let client = admin().await;
    let queues: Api<Queue> = Api::namespaced(client.clone(), n);
    let bindings: Api<Binding> = Api::namespaced(client, n);
    let (before, before_by_verb) = operator_requests();
    let started = Instant::now();
    let creates = (0..N).flat_map(|i| [(i, true), (i, false)]).map(|(i, is_queue)| {
        let (queues, bindings) = (queues.clone(), bindings.clone());
        async move {
            let name = format!("q-{i:04}");
            if is_queue {
                let q: Queue = serde_json::from_value(serde_json::json!({
                    "apiVersion": "warren.dev/v1alpha1", "kind": "Queue", "metadata": {"name": name},
                    "spec": {"brokerRef": {"name": "warren"}}
                }))
                .unwrap();
                queues.create(&PostParams::default(), &q).await.map(|_| ())
            } else {
                let b: Binding = serde_json::from_value(serde_json::json!({
                    "apiVersion": "warren.dev/v1alpha1", "kind": "Binding", "metadata": {"name": name},
                    "spec": {"brokerRef": {"name": "warren"}, "source": "load", "destination": name, "routingKey": name}
                }))
                .unwrap();
                bindings.create(&PostParams::default(), &b).await.map(|_| ())
            }
        }
    });
    let results: Vec<_> = futures::stream::iter(creates).buffer_unordered(16).collect().await;
    assert!(results.iter().all(Result::is_ok), "creating the objects failed: {:?}", results.iter().find(|r| r.is_err()));
    let created = started.elapsed();

    let ready = |list: Vec<serde_json::Value>| {
        list.iter()
            .filter(|o| o["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True"))
            .count()
    };
    let last;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let q =
            ready(queues.list(&Default::default()).await.unwrap().items.into_iter().map(|o| serde_json::to_value(o).unwrap()).collect());
        let b =
            ready(bindings.list(&Default::default()).await.unwrap().items.into_iter().map(|o| serde_json::to_value(o).unwrap()).collect());
        if q == N && b == N {
            last = (q, b);
            break;
        }
        assert!(Instant::now() < deadline, "not all Ready after 600 s: {q} Queues, {b} Bindings");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let took = started.elapsed();
    let (after, after_by_verb) = operator_requests();
    let requests = after - before;
    let by_verb = request_diff(&before_by_verb, &after_by_verb);
    figure(&format!(
        "{N} Queues + {N} Bindings created in {:.1} s, all Ready after {:.1} s; operator API requests: {requests} \
         ({:.2} per object): {by_verb:?}",
        created.as_secs_f64(),
        took.as_secs_f64(),
        requests as f64 / (2 * N) as f64
    ));
    assert_eq!(last, (N, N));
    let on_broker = broker_queues(&real.addr).await.iter().filter(|q| q.starts_with("q-")).count();
    assert_eq!(on_broker, N);

    // Steady state: one resync of every object (30 s) with nothing changed
    // writes nothing.
    let (quiet_start, quiet_before) = operator_requests();
    tokio::time::sleep(Duration::from_secs(35)).await;
    let (quiet_end, quiet_after) = operator_requests();
    let quiet_by_verb = request_diff(&quiet_before, &quiet_after);
    figure(&format!(
        "operator API requests during 35 s of resyncs of {} unchanged objects: {} {quiet_by_verb:?}",
        2 * N,
        quiet_end - quiet_start
    ));
    assert!(quiet_end - quiet_start < 50, "an unchanged object costs no API request per resync");
    assert!(requests < 20 * N, "{requests} requests for {} objects", 2 * N);

    // Clean up while the operator runs: with the Broker gone, every
    // finalizer lets go without touching the broker.
    let cleanup = Instant::now();
    kubectl(&["delete", "-n", n, "broker/warren", "--wait=true", "--timeout=60s"]);
    kubectl(&["delete", "namespace", n, "--wait=true", "--timeout=300s"]);
    figure(&format!("namespace with {} topology objects deleted in {:.1} s", 2 * N + 1, cleanup.elapsed().as_secs_f64()));
    drop(op);
}
