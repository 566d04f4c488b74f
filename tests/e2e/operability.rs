//! Operability, against the real binary: health and readiness, Prometheus
//! metrics (with 10,000 queues), resource alarms blocking and releasing
//! publishers, configuration from flags / environment / file, JSON logs,
//! and OpenTelemetry traces exported to a fake OTLP collector.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value as Json;
use warren_client::proto::value::Kind;
use warren_client::{Client, Message, QueueOptions, Subscription};
use warren_tests::{TestBroker, broker_bin, eventually};

use crate::{SETTLE, code, queue};

/// A metric's value in an exposition: the sample named exactly `series`
/// (name and labels, e.g. `warren_alarm{resource="disk"}`).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn alarms(c: &Client) -> Vec<String> {
    c.status().await.unwrap().alarms.into_iter().map(|a| a.resource).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_report_health_readiness_and_queue_metrics() {
    let b = TestBroker::start().await.unwrap();
    assert!(b.stdout.last().unwrap().contains(&format!("http={}", b.http_addr)), "{:?}", b.stdout);
    assert_eq!(b.http_get("/healthz").await.unwrap().0, 200);
    assert_eq!(b.http_get("/readyz").await.unwrap(), (200, "ready\n".to_string()));

    // grpc.health.v1 agrees: the node and the Warren service serve.
    let channel = tonic::transport::Channel::from_shared(b.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "warren.v1.Warren"] {
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "service {service:?}");
    }

    let c = b.client().await.unwrap();
    queue(&c, "jobs").await;
    c.declare_queue("orders \"eu\"", QueueOptions::durable()).await.unwrap();
    for i in 0..3 {
        assert!(c.publish(Message::new("", "jobs", format!("m{i}")).persistent()).await.unwrap().is_routed());
    }
    assert!(!c.publish(Message::new("", "nowhere", "x").mandatory()).await.unwrap().is_routed());
    let mut consumer = c.consume(Subscription::new("jobs").prefetch(1)).await.unwrap();
    let d = consumer.next_timeout(SETTLE).await.unwrap().unwrap();
    consumer.ack(d.delivery_tag).await.unwrap();
    let d = consumer.next_timeout(SETTLE).await.unwrap().unwrap();
    consumer.nack(d.delivery_tag, false, true).await.unwrap();

    let m = eventually(SETTLE, "the ack, the nack and the redelivery in the metrics", || async {
        let m = b.metrics().await.ok()?;
        (sample(&m, "warren_messages_acknowledged_total") == Some(1.0)
            && sample(&m, "warren_messages_nacked_total") == Some(1.0)
            && sample(&m, "warren_messages_redelivered_total") == Some(1.0))
        .then_some(m)
    })
    .await
    .unwrap();
    let expect = [
        ("warren_messages_published_total", 4.0),
        ("warren_messages_confirmed_total{status=\"routed\"}", 3.0),
        ("warren_messages_confirmed_total{status=\"returned\"}", 1.0),
        ("warren_messages_returned_total", 1.0),
        ("warren_messages_delivered_total", 3.0),
        ("warren_queue_messages_ready{queue=\"jobs\"}", 1.0),
        ("warren_queue_messages_unacked{queue=\"jobs\"}", 1.0),
        ("warren_queue_consumers{queue=\"jobs\"}", 1.0),
        ("warren_queue_messages_ready_bytes{queue=\"jobs\"}", 2.0),
        ("warren_queue_messages_ready{queue=\"orders \\\"eu\\\"\"}", 0.0),
        ("warren_queues", 2.0),
        ("warren_alarm{resource=\"memory\"}", 0.0),
        ("warren_alarm{resource=\"disk\"}", 0.0),
        ("warren_confirm_latency_seconds_count", 3.0),
        ("warren_publish_to_deliver_latency_seconds_count", 2.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&m, series), Some(value), "{series} in\n{m}");
    }
    assert!(sample(&m, "warren_wal_sync_duration_seconds_count").is_some_and(|n| n >= 1.0), "persistent publishes sync");
    assert!(sample(&m, "warren_queue_oldest_ready_message_age_seconds{queue=\"jobs\"}").is_some());
    assert!(sample(&m, "warren_process_resident_memory_bytes").is_some_and(|n| n > 0.0));
    assert!(sample(&m, "warren_store_disk_usage_bytes").is_some_and(|n| n > 0.0));
    assert!(m.trim_end().ends_with("# EOF"));
    // Conventions: every series is warren_*, counters end in _total.
    for line in m.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split_whitespace().skip(2);
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        assert!(name.starts_with("warren_"), "{line}");
        if kind == "counter" {
            assert!(m.contains(&format!("\n{name}_total")), "counter {name} has no _total series");
        }
    }
}

/// Every queue in one scrape: 10,000 queues by default
/// (`WARREN_SCRAPE_QUEUES` changes it). The scrape time is printed, not
/// asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_expose_every_queue_in_one_scrape() {
    let queues: usize = std::env::var("WARREN_SCRAPE_QUEUES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    let declared = Instant::now();
    let mut tasks = futures::stream::iter(0..queues)
        .map(|i| {
            let c = c.clone();
            async move { c.declare_queue(&format!("q-{i:05}"), QueueOptions::default()).await.map(|_| ()) }
        })
        .buffer_unordered(16);
    while let Some(r) = tasks.next().await {
        r.unwrap();
    }
    let declared = declared.elapsed();
    let scraped = Instant::now();
    let m = b.metrics().await.unwrap();
    let scraped = scraped.elapsed();
    let series = m.lines().filter(|l| l.starts_with("warren_queue_messages_ready{queue=")).count();
    eprintln!("declared {queues} queues in {declared:?}; one scrape took {scraped:?} ({} bytes, {} lines)", m.len(), m.lines().count());
    assert_eq!(series, queues);
    assert_eq!(m.lines().filter(|l| l.starts_with("warren_queue_consumers{queue=")).count(), queues);
    assert_eq!(sample(&m, "warren_queues"), Some(queues as f64));
}

fn numbered(n: u64, size: usize) -> Message {
    let mut body = format!("{n:08}").into_bytes();
    body.resize(size, b'.');
    Message::new("", "big", body)
}

fn number(d: &warren_client::Delivery) -> u64 {
    String::from_utf8_lossy(&d.body[..8]).parse().unwrap()
}

/// The memory alarm measured as the heap allocator's allocated bytes, with
/// a 64 MiB watermark: 1 MiB transient messages held in memory push it over,
/// consuming them brings it back. Nothing confirmed may be lost or
/// duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_block_publishers_during_a_memory_alarm_and_resume_once_consumers_drain() {
    const MIB: usize = 1 << 20;
    let b = TestBroker::start_with(&[
        "--memory-calculation-strategy",
        "allocated",
        "--memory-high-watermark",
        "64MiB",
        "--alarm-check-interval",
        "50ms",
        "--publish-block-timeout",
        "1s",
        // Keep every message in memory (no paging to disk).
        "--queue-window-bytes",
        "1GiB",
    ])
    .await
    .unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "big").await;
    assert!(alarms(&c).await.is_empty(), "an idle broker is under 64 MiB");

    // Publish on a stream until the alarm is raised. The message in flight
    // when it is raised may or may not get in before the gate: `uncertain`.
    let publisher = c.publisher().await.unwrap();
    let mut confirmed: Vec<u64> = Vec::new();
    let mut uncertain = None;
    for n in 1..=300u64 {
        let mut pending = publisher.send(numbered(n, MIB)).await.unwrap();
        let raised = async {
            while alarms(&c).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            confirm = &mut pending => {
                assert!(confirm.unwrap().is_routed());
                confirmed.push(n);
            }
            _ = raised => {
                uncertain = Some((n, pending));
                break;
            }
        }
    }
    assert!(uncertain.is_some() || !alarms(&c).await.is_empty(), "300 MiB of messages never raised the memory alarm");
    eprintln!("memory alarm raised after {} confirmed 1 MiB messages", confirmed.len());
    assert_eq!(alarms(&c).await, ["memory"]);

    // Blocked: a message sent on the stream now is not read, let alone
    // confirmed, and nothing enters the queue.
    let next = confirmed.len() as u64 + 2;
    let mut probe = publisher.send(numbered(next, MIB)).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(1), &mut probe).await.is_err(), "a streamed message was confirmed during the alarm");
    let ready_before = c.queue_info("big").await.unwrap().ready;
    // A unary publish waits publish_block_timeout (1s), then fails.
    let (status, message) = code(c.publish(numbered(next + 1, 16)).await);
    assert_eq!(status, tonic::Code::ResourceExhausted, "{message}");
    assert!(message.contains("memory used (allocated)") && message.contains("high watermark"), "{message}");
    assert_eq!(c.queue_info("big").await.unwrap().ready, ready_before, "no message entered the queue during the alarm");
    assert!(ready_before >= confirmed.len() as u64);

    // Visible in the metrics, in the status call and in warrenctl.
    let m = b.metrics().await.unwrap();
    assert_eq!(sample(&m, "warren_alarm{resource=\"memory\"}"), Some(1.0));
    assert!(sample(&m, "warren_memory_used_bytes").unwrap() > sample(&m, "warren_memory_limit_bytes").unwrap());
    let out = b.warrenctl(&["status"]).unwrap();
    assert!(out.ok() && out.stdout.lines().any(|l| l.starts_with("alarms") && l.contains("memory (memory used")), "{out:?}");
    let out = b.warrenctl(&["status", "-o", "json"]).unwrap();
    let status: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(status["alarms"][0]["resource"], "memory");
    assert_eq!(status["alarms"][0]["limit_bytes"], 64 * MIB as u64);
    let out = b.warrenctl(&["publish", "--routing-key", "big", "small"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("RESOURCE_EXHAUSTED"), "{out:?}");

    // More publish streams on the same connection block too. Their unread
    // data must not starve the connection's HTTP/2 window: the consumer
    // below shares the connection and must still get its acks through.
    let mut more_blocked = Vec::new();
    let mut extra_publishers = Vec::new();
    for p in 0..3u64 {
        let publisher = c.publisher().await.unwrap();
        for j in 0..3u64 {
            let n = next + 100 + p * 10 + j;
            more_blocked.push((n, publisher.send(numbered(n, MIB)).await.unwrap()));
        }
        extra_publishers.push(publisher);
    }

    // Consumers keep working during the alarm; draining clears it.
    let mut received: BTreeMap<u64, usize> = BTreeMap::new();
    let mut consumer = c.consume(Subscription::new("big").prefetch(8)).await.unwrap();
    for _ in 0..ready_before {
        let d = consumer.next_timeout(SETTLE).await.unwrap().expect("a message confirmed before the alarm");
        *received.entry(number(&d)).or_default() += 1;
        consumer.ack(d.delivery_tag).await.unwrap();
    }
    eventually(SETTLE, "the memory alarm to clear", || async { alarms(&c).await.is_empty().then_some(()) }).await.unwrap();

    // Publishing resumes: the blocked messages go through, new ones too.
    let mut expected: Vec<u64> = confirmed.clone();
    let mut waiting = vec![(next, probe)];
    waiting.extend(more_blocked);
    if let Some((n, pending)) = uncertain {
        waiting.push((n, pending));
    }
    for (n, pending) in waiting {
        let confirm = tokio::time::timeout(SETTLE, pending).await.expect("a blocked publish to be confirmed").unwrap();
        assert!(confirm.is_routed(), "{confirm:?}");
        expected.push(n);
    }
    for n in next + 2..next + 5 {
        assert!(c.publish(numbered(n, 1024)).await.unwrap().is_routed());
        expected.push(n);
    }
    while received.values().sum::<usize>() < expected.len() {
        let d = consumer.next_timeout(SETTLE).await.unwrap().expect("every confirmed message");
        *received.entry(number(&d)).or_default() += 1;
        consumer.ack(d.delivery_tag).await.unwrap();
    }
    assert!(consumer.next_timeout(Duration::from_millis(300)).await.unwrap().is_none(), "nothing beyond what was confirmed");
    expected.sort_unstable();
    assert_eq!(received.keys().copied().collect::<Vec<_>>(), expected, "every confirmed message arrived");
    assert!(received.values().all(|n| *n == 1), "and exactly once: {received:?}");
    let m = b.metrics().await.unwrap();
    assert_eq!(sample(&m, "warren_alarm{resource=\"memory\"}"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_raise_the_disk_alarm_when_free_space_is_under_the_limit() {
    // Far more than any disk has: the alarm is raised from the first check.
    let b = TestBroker::start_with(&["--disk-free-limit", "1000000TiB", "--publish-block-timeout", "200ms"]).await.unwrap();
    let c = b.client().await.unwrap();
    let status = c.status().await.unwrap();
    assert_eq!(status.alarms.len(), 1, "{status:?}");
    let alarm = &status.alarms[0];
    assert_eq!(alarm.resource, "disk");
    assert_eq!(alarm.limit_bytes, 1_000_000u64 << 40);
    assert!(alarm.used_bytes < alarm.limit_bytes && alarm.message.contains("free disk space"), "{alarm:?}");
    queue(&c, "q").await;
    let (status, message) = code(c.publish(Message::new("", "q", "x")).await);
    assert_eq!(status, tonic::Code::ResourceExhausted, "{message}");
    assert!(message.contains("disk free limit"), "{message}");
    // Everything but publishing still works.
    assert!(c.get("q", 1, true).await.unwrap().is_empty());
    assert_eq!(c.queue_info("q").await.unwrap().ready, 0);
    let m = b.metrics().await.unwrap();
    assert_eq!(sample(&m, "warren_alarm{resource=\"disk\"}"), Some(1.0));
    assert_eq!(sample(&m, "warren_disk_free_limit_bytes"), Some((1_000_000u64 << 40) as f64));
}

/// Runs the broker binary to completion (it must fail fast): (exit code,
/// stderr).
fn run_broker(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(broker_bin().unwrap())
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("WARREN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_take_settings_from_flags_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("warren.toml");
    std::fs::write(
        &file,
        "# written by a test\nqueue_window_messages = 11\nqueue_window_bytes = \"2MiB\"\nblock_cache_bytes = 1048576\n\
         disk_free_limit = \"1MiB\"\nmemory_high_watermark = 0.5\nnode_name = \"from-file\"\n",
    )
    .unwrap();
    let b = TestBroker::start_with_env(
        &["--config", file.to_str().unwrap(), "--block-cache-bytes", "3MiB"],
        &[("WARREN_QUEUE_WINDOW_BYTES", "4MiB"), ("WARREN_PUBLISH_BLOCK_TIMEOUT", "250ms")],
    )
    .await
    .unwrap();
    let printed = b.stdout.join("\n");
    for line in [
        "queue_window_messages = 11",        // file over default
        "queue_window_bytes = 4194304",      // environment over file
        "block_cache_bytes = 3145728",       // flag over file
        "publish_block_timeout = 250ms",     // environment over default
        "disk_free_limit = 1MiB",            // file
        "memory_high_watermark = 0.5",       // file, a fraction
        "node_name = from-file",             // file
        "memory_calculation_strategy = rss", // default
    ] {
        assert!(printed.contains(line), "missing {line:?} in\n{printed}");
    }
    assert_eq!(b.client().await.unwrap().status().await.unwrap().node, "from-file");

    // Bad settings stop the broker with exit code 2 and name the setting.
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let base = ["--data-dir", data, "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (&["--disk-free-limit", "lots"], &[], "--disk-free-limit"),
        (&["--memory-high-watermark", "1.5"], &[], "memory_high_watermark"),
        (&[], &[("WARREN_ALARM_CHECK_INTERVAL", "soon")], "--alarm-check-interval"),
        (&[], &[("WARREN_QUEUE_WINDOW_MESSAGES", "0")], "queue_window_messages"),
        (&["--config", "/nonexistent/warren.toml"], &[], "/nonexistent/warren.toml"),
        (&["--grpc-addr", "127.0.0.1:7000", "--http-addr", "127.0.0.1:7000"], &[], "http_addr"),
    ];
    for (args, envs, setting) in cases {
        let mut all: Vec<&str> = base.to_vec();
        if args.first() == Some(&"--grpc-addr") {
            all.truncate(2);
        }
        all.extend_from_slice(args);
        let (code, _, stderr) = run_broker(&all, envs);
        assert_eq!(code, 2, "{args:?} {envs:?}: {stderr}");
        assert!(stderr.contains(setting), "{args:?} {envs:?} should name {setting}: {stderr}");
    }
    std::fs::write(&file, "disk_free_limitt = \"1MiB\"\n").unwrap();
    let (code, _, stderr) = run_broker(&[&base[..], &["--config", file.to_str().unwrap()]].concat(), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown setting 'disk_free_limitt'"), "{stderr}");

    // --help documents every setting with its environment variable.
    let (code, help, _) = run_broker(&["--help"], &[]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--data-dir",
        "--grpc-addr",
        "--http-addr",
        "--node-name",
        "--max-message-size",
        "--queue-window-messages",
        "--queue-window-bytes",
        "--block-cache-bytes",
        "--memory-high-watermark",
        "--memory-calculation-strategy",
        "--disk-free-limit",
        "--publish-block-timeout",
        "--alarm-check-interval",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
        let env = format!("WARREN_{}", flag.trim_start_matches("--").replace('-', "_").to_uppercase());
        assert!(help.contains(&env), "--help lacks {env}:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_log_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(broker_bin().unwrap())
        .args(["--data-dir", dir.path().join("data").to_str().unwrap(), "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + SETTLE;
    while !lines.iter().any(|l: &String| l.contains("broker ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().any(|l| l.contains("broker ready")), "{lines:?}");
    for line in &lines {
        let v: Json = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string() && v["message"].is_string(), "{line}");
    }
    let ready: Json = serde_json::from_str(lines.iter().find(|l| l.contains("broker ready")).unwrap()).unwrap();
    assert!(ready["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{ready}");
}

// ------------------------------------------------------------ OpenTelemetry

/// An OTLP/gRPC trace collector that keeps what it receives.
#[derive(Clone, Default)]
struct FakeCollector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for FakeCollector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header(d: &warren_client::Delivery, key: &str) -> Option<String> {
    match d.properties.as_ref()?.headers.get(key)?.kind.as_ref()? {
        Kind::String(s) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_export_spans_that_follow_a_message_from_producer_to_consumer() {
    let collector = FakeCollector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let b = TestBroker::start_with_env(
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_SERVICE_NAME", "warren-test")],
    )
    .await
    .unwrap();
    let c = b.client().await.unwrap();
    queue(&c, "traced").await;

    // The producer's own span context travels in the message.
    let producer_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let producer_span = "00f067aa0ba902b7";
    let msg = Message::new("", "traced", "hello").header("traceparent", format!("00-{producer_trace}-{producer_span}-01"));
    assert!(c.publish(msg).await.unwrap().is_routed());
    let mut consumer = c.consume(Subscription::new("traced").prefetch(4)).await.unwrap();
    let d = consumer.next_timeout(SETTLE).await.unwrap().unwrap();
    consumer.ack(d.delivery_tag).await.unwrap();

    // The consumer sees the broker's publish span as the message's context.
    let delivered = header(&d, "traceparent").expect("the delivery carries a traceparent");
    let parts: Vec<&str> = delivered.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", producer_trace, "01"), "{delivered}");
    let publish_span = parts[2].to_string();
    assert_ne!(publish_span, producer_span);

    let spans = eventually(SETTLE, "publish, route, enqueue, deliver and ack spans at the collector", || {
        let spans = collector.spans.lock().unwrap().clone();
        async move {
            let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            ["publish", "route", "enqueue", "deliver", "ack"].iter().all(|n| names.contains(n)).then_some(spans)
        }
    })
    .await
    .unwrap();
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let publish = by_name["publish"];
    assert_eq!(hex(&publish.trace_id), producer_trace, "publish joins the producer's trace");
    assert_eq!(hex(&publish.parent_span_id), producer_span, "publish is a child of the producer's span");
    assert_eq!(hex(&publish.span_id), publish_span, "the header carries the publish span");
    for child in ["route", "enqueue"] {
        assert_eq!(hex(&by_name[child].parent_span_id), publish_span, "{child} is a child of publish");
        assert_eq!(hex(&by_name[child].trace_id), producer_trace);
    }
    let deliver = by_name["deliver"];
    assert_eq!(deliver.links.len(), 1, "{deliver:?}");
    assert_eq!((hex(&deliver.links[0].trace_id), hex(&deliver.links[0].span_id)), (producer_trace.to_string(), publish_span.clone()));
    let ack = by_name["ack"];
    assert_eq!(ack.links.len(), 1, "{ack:?}");
    assert_eq!(hex(&ack.links[0].span_id), hex(&deliver.span_id), "ack links to the delivery it settles");
    server.abort();
}
