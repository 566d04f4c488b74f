//! `warrenctl`, run as a process against a real broker: the tour's commands,
//! JSON output, typed arguments, exit codes and error messages.

use serde_json::Value as Json;
use warren_tests::{TestBroker, run_warrenctl};

fn json(out: &warren_tests::CtlOutput) -> Json {
    assert!(out.ok(), "warrenctl failed: {out:?}");
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_declare_publish_list_get_and_delete_through_warrenctl() {
    let b = TestBroker::start().await.unwrap();
    let ok = |args: &[&str]| {
        let out = b.warrenctl(args).unwrap();
        assert!(out.ok(), "warrenctl {args:?}: {out:?}");
        out.stdout
    };
    ok(&["exchange", "declare", "orders", "--type", "topic", "--durable"]);
    ok(&["queue", "declare", "orders.eu", "--durable", "--arg", "x-max-length=1000"]);
    ok(&["bind", "--exchange", "orders", "--queue", "orders.eu", "--routing-key", "orders.eu.#"]);
    let out = ok(&["publish", "--exchange", "orders", "--routing-key", "orders.eu.new", "--persistent", "hello"]);
    assert!(out.contains("routed to 1 queue"), "{out}");
    // Body from stdin, and from a file.
    let out = b
        .warrenctl_stdin(&["publish", "--exchange", "orders", "--routing-key", "orders.eu.x", "--header", "n=1"], Some(b"from stdin"))
        .unwrap();
    assert!(out.ok(), "{out:?}");
    let file = b.data_dir().join("body.txt");
    std::fs::write(&file, "from a file").unwrap();
    ok(&["publish", "--exchange", "orders", "--routing-key", "orders.eu.y", "--file", file.to_str().unwrap()]);

    let table = ok(&["queue", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), vec!["NAME", "READY", "UNACKED", "CONSUMERS"]);
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), vec!["orders.eu", "3", "0", "0"]);

    let listed = json(&b.warrenctl(&["queue", "list", "--output", "json"]).unwrap());
    let q = &listed.as_array().unwrap()[0];
    assert_eq!(
        (q["name"].as_str(), q["ready"].as_u64(), q["unacked"].as_u64(), q["consumers"].as_u64()),
        (Some("orders.eu"), Some(3), Some(0), Some(0))
    );
    // Integer-looking argument values are sent as integers.
    assert_eq!(q["arguments"]["x-max-length"], Json::from(1000));

    // get without --ack leaves the message; with --ack takes it.
    assert_eq!(ok(&["get", "--queue", "orders.eu"]), "hello\n");
    assert_eq!(ok(&["get", "--queue", "orders.eu", "--ack", "--count", "2"]), "hello\nfrom stdin\n");
    assert_eq!(ok(&["consume", "--queue", "orders.eu", "--count", "1"]), "from a file\n");
    assert_eq!(ok(&["get", "--queue", "orders.eu", "--ack"]), "", "empty queue prints nothing and exits 0");

    let bindings = json(&b.warrenctl(&["binding", "list", "-o", "json"]).unwrap());
    assert_eq!(bindings[0]["routing_key"], "orders.eu.#");
    let exchanges = json(&b.warrenctl(&["exchange", "list", "-o", "json"]).unwrap());
    assert!(exchanges.as_array().unwrap().iter().any(|x| x["name"] == "orders" && x["type"] == "topic"));
    ok(&["unbind", "--exchange", "orders", "--queue", "orders.eu", "--routing-key", "orders.eu.#"]);
    ok(&["queue", "purge", "orders.eu"]);
    ok(&["queue", "delete", "orders.eu", "--if-empty"]);
    ok(&["exchange", "delete", "orders"]);
    let status = json(&b.warrenctl(&["status", "-o", "json"]).unwrap());
    assert_eq!(status["totals"]["queues"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_fail_with_a_clear_message_and_exit_code() {
    let b = TestBroker::start().await.unwrap();
    b.warrenctl(&["queue", "declare", "q", "--durable"]).unwrap();
    let out = b.warrenctl(&["queue", "declare", "q"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("FAILED_PRECONDITION") && out.stderr.contains("durable"), "{}", out.stderr);
    let out = b.warrenctl(&["queue", "delete", "missing"]).unwrap();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("NOT_FOUND") && out.stderr.contains("'missing'"), "{}", out.stderr);
    let out = b.warrenctl(&["publish", "--exchange", "amq.direct", "--routing-key", "nobody", "--mandatory", "x"]).unwrap();
    assert_eq!(out.code, 1, "a returned mandatory message is a failure: {out:?}");
    assert!(out.stdout.contains("returned"), "{out:?}");
    let out = b.warrenctl(&["exchange", "declare", "x", "--type", "round-robin"]).unwrap();
    assert_eq!(out.code, 2, "usage error: {out:?}");
    let out = b.warrenctl(&["publish", "--property", "colour=red", "x"]).unwrap();
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("colour"), "{}", out.stderr);
    // Nothing listens on this port (it was just bound and released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = run_warrenctl(&format!("http://127.0.0.1:{port}"), &["queue", "list"], None).unwrap();
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
}

/// `consume --count N` takes exactly N messages, whatever the prefetch, with
/// and without --no-ack: the others stay ready, not redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_consume_exactly_count_messages() {
    let b = TestBroker::start().await.unwrap();
    let ok = |args: &[&str]| {
        let out = b.warrenctl(args).unwrap();
        assert!(out.ok(), "warrenctl {args:?}: {out:?}");
        out.stdout
    };
    ok(&["queue", "declare", "q", "--arg", "x-delivery-limit=0"]);
    for i in 0..10 {
        ok(&["publish", "--routing-key", "q", &format!("m{i}")]);
    }
    assert_eq!(ok(&["consume", "--queue", "q", "--count", "2", "--no-ack"]), "m0\nm1\n");
    assert_eq!(ok(&["consume", "--queue", "q", "--count", "3", "--prefetch", "2"]), "m2\nm3\nm4\n");
    assert_eq!(ok(&["consume", "--queue", "q", "--count", "1"]), "m5\n");
    let c = b.client().await.unwrap();
    let q = c.queue_info("q").await.unwrap();
    assert_eq!((q.ready, q.unacked), (4, 0), "exactly 6 taken");
    // None of the rest was delivered (the delivery limit of 0 would have
    // dropped a redelivered one).
    let rest = c.get("q", 10, true).await.unwrap();
    assert_eq!(rest.iter().map(|d| (d.redelivered, d.delivery_count)).collect::<Vec<_>>(), vec![(false, 1); 4]);
}

/// Quotes force a string: a routing key that looks like a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_send_quoted_argument_values_as_strings() {
    let b = TestBroker::start().await.unwrap();
    let out =
        b.warrenctl(&["queue", "declare", "q", "--arg", "x-dead-letter-exchange=", "--arg", "x-dead-letter-routing-key=\"123\""]).unwrap();
    assert!(out.ok(), "{out:?}");
    let out = b.warrenctl(&["publish", "--routing-key", "q", "--property", "priority=300", "x"]).unwrap();
    assert_eq!(out.code, 2, "priority is 0..=255: {out:?}");
}

/// Changing replica sets needs a cluster: a single node refuses, with the
/// reason, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_refuse_replica_changes_on_a_single_node() {
    let b = TestBroker::start().await.unwrap();
    for args in [&["queue", "grow", "1"][..], &["queue", "shrink", "1"], &["queue", "rebalance"]] {
        let out = b.warrenctl(args).unwrap();
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("FAILED_PRECONDITION") && out.stderr.contains("single node"), "{args:?}: {out:?}");
    }
}
