//! What third-party tools and habits expect of the real binary: server
//! reflection in both versions grpcurl and GUI clients speak, `/metrics` in
//! the format the scraper asks for (checked by a strict parser of the
//! Prometheus text format 0.0.4), and `warrenctl` property names spelled
//! with dashes like its flags.

use std::collections::{HashMap, HashSet};

use serde_json::Value as Json;
use warren_client::{Message, QueueOptions, Subscription};
use warren_tests::{PROMETHEUS_SCRAPE_ACCEPT, TestBroker};

use crate::SETTLE;

/// grpcurl and GUI clients discover the API through server reflection;
/// older grpcurl and several GUI clients speak only `v1alpha`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_serve_reflection_v1_and_v1alpha() {
    let b = TestBroker::start().await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(b.url()).unwrap().connect().await.unwrap();
    let expected =
        ["warren.v1.Warren", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};
        let request = |r| ServerReflectionRequest { host: String::new(), message_request: Some(r) };
        let mut client = ServerReflectionClient::new(channel.clone());
        let requests = vec![
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol("warren.v1.Warren".into())),
        ];
        let stream = client.server_reflection_info(futures::stream::iter(requests)).await;
        let mut responses = stream.unwrap_or_else(|s| panic!("v1alpha reflection is not served: {s:?}")).into_inner();
        let r: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = r.message_response else { panic!("v1alpha: {r:?}") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(names.iter().any(|n| n == service), "v1alpha: {service} missing from {names:?}");
        }
        let r: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = r.message_response else { panic!("v1alpha: {r:?}") };
        assert!(!files.file_descriptor_proto.is_empty(), "v1alpha: no descriptor for warren.v1.Warren");
    }
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
        let request = |r| ServerReflectionRequest { host: String::new(), message_request: Some(r) };
        let mut client = ServerReflectionClient::new(channel.clone());
        let requests = vec![
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol("warren.v1.Warren".into())),
        ];
        let mut responses = client.server_reflection_info(futures::stream::iter(requests)).await.unwrap().into_inner();
        let r: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = r.message_response else { panic!("v1: {r:?}") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(names.iter().any(|n| n == service), "v1: {service} missing from {names:?}");
        }
        let r: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = r.message_response else { panic!("v1: {r:?}") };
        assert!(!files.file_descriptor_proto.is_empty(), "v1: no descriptor for warren.v1.Warren");
    }
}

/// A scraper that asks for the Prometheus text format 0.0.4 (or names no
/// format, like `curl`) gets one that parses by 0.0.4's rules; one that asks
/// for OpenMetrics (Prometheus does) gets OpenMetrics. Both carry the same
/// samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_serve_prometheus_text_or_openmetrics_as_the_scraper_asks() {
    let b = TestBroker::start().await.unwrap();
    let c = b.client().await.unwrap();
    // Something in every family: a queue (with a name that needs escaping),
    // confirms, deliveries, acks, a histogram with observations.
    c.declare_queue("jobs \"eu\"\\1", QueueOptions::durable()).await.unwrap();
    for i in 0..3 {
        assert!(c.publish(Message::new("", "jobs \"eu\"\\1", format!("m{i}")).persistent()).await.unwrap().is_routed());
    }
    let mut consumer = c.consume(Subscription::new("jobs \"eu\"\\1").prefetch(1)).await.unwrap();
    let d = consumer.next_timeout(SETTLE).await.unwrap().unwrap();
    consumer.ack(d.delivery_tag).await.unwrap();

    let get = async |accept: Option<&str>| {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
        let r = b.http_get_with("/metrics", &headers).await.unwrap();
        assert_eq!(r.code, 200, "{r:?}");
        (r.header("content-type").unwrap_or_default().to_string(), r.body)
    };

    for accept in [None, Some("text/plain;version=0.0.4"), Some("text/plain"), Some("*/*")] {
        let (content_type, text) = get(accept).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "Accept: {accept:?}");
        if let Err(e) = check_prometheus_text(&text) {
            panic!("Accept {accept:?}: not valid Prometheus text format 0.0.4: {e}\n{text}");
        }
        promtool_check(&text);
    }

    for accept in ["application/openmetrics-text; version=1.0.0", PROMETHEUS_SCRAPE_ACCEPT] {
        let (content_type, text) = get(Some(accept)).await;
        assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8", "Accept: {accept}");
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        assert!(text.contains("# TYPE warren_messages_acknowledged counter\nwarren_messages_acknowledged_total "), "{text}");
        assert!(text.contains("# TYPE warren_build info\n"), "{text}");
        assert!(text.contains("# UNIT warren_confirm_latency_seconds seconds\n"), "{text}");
    }

    // The same samples either way (values aside: uptime moves).
    let names =
        |t: &str| -> Vec<String> { t.lines().filter(|l| !l.starts_with('#')).map(|l| l.rsplit_once(' ').unwrap().0.to_string()).collect() };
    let (_, prometheus) = get(None).await;
    let (_, openmetrics) = get(Some("application/openmetrics-text")).await;
    assert_eq!(names(&prometheus), names(&openmetrics));
    assert!(prometheus.contains("warren_queue_messages_ready{queue=\"jobs \\\"eu\\\"\\\\1\"} 1\n"), "{prometheus}");
    assert!(prometheus.contains("\nwarren_messages_acknowledged_total 1\n"), "{prometheus}");
}

/// Runs `promtool check metrics` on `text` when `PROMTOOL` names a promtool
/// binary (not needed by the suite: [`check_prometheus_text`] applies the
/// same rules).
fn promtool_check(text: &str) {
    use std::io::Write;
    let Some(promtool) = std::env::var_os("PROMTOOL") else { return };
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {promtool:?}: {e}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics failed: {said}");
    eprintln!("promtool check metrics: ok {}", said.trim());
}

/// A strict reader of the Prometheus text format 0.0.4
/// (<https://prometheus.io/docs/instrumenting/exposition_formats/>), with
/// the checks `promtool check metrics` adds (its lint): every sample belongs
/// to the family its `TYPE` line declared just before it; `TYPE` is one of
/// the five 0.0.4 types and comes at most once per name, before the
/// samples; families are not split; histograms have `le` buckets ending in
/// `+Inf` and `_sum` / `_count`; counters end in `_total`; label and metric
/// names and values parse; no line is OpenMetrics-only (`# EOF`, `# UNIT`).
fn check_prometheus_text(text: &str) -> Result<(), String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut hist_series: HashMap<String, (bool, bool, bool)> = HashMap::new(); // (+Inf, sum, count)
    if !text.ends_with('\n') {
        return Err("the exposition must end with a line feed".into());
    }
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    let name = words.next().ok_or_else(|| at("HELP without a name".into()))?;
                    check_metric_name(name).map_err(at)?;
                    if !helps.insert(name.to_string()) {
                        return Err(at(format!("second HELP for {name}")));
                    }
                    open_family(name, &mut current, &mut finished).map_err(at)?;
                }
                Some("TYPE") => {
                    let name = words.next().ok_or_else(|| at("TYPE without a name".into()))?;
                    let kind = words.next().ok_or_else(|| at("TYPE without a type".into()))?;
                    check_metric_name(name).map_err(at)?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown metric type {kind:?}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                    if kind == "counter" && !name.ends_with("_total") {
                        return Err(at(format!("counter metrics should have \"_total\" suffix: {name}")));
                    }
                    open_family(name, &mut current, &mut finished).map_err(at)?;
                }
                Some(w) if w == "EOF" || w == "UNIT" => return Err(at(format!("# {w} is OpenMetrics, not 0.0.4"))),
                _ => {} // a plain comment
            }
            continue;
        }
        let (name, labels, value) = parse_sample(line).map_err(at)?;
        let family = family_of(&name, &types);
        if current.as_deref() != Some(family.as_str()) {
            if types.contains_key(&family) {
                return Err(at(format!("sample of {family} outside its family's block")));
            }
            // An untyped family: it starts here.
            open_family(&family, &mut current, &mut finished).map_err(at)?;
        }
        value.parse::<f64>().map_err(|_| at(format!("value {value:?} is not a number")))?;
        if types.get(&family).map(String::as_str) == Some("histogram") {
            let series: Vec<&(String, String)> = labels.iter().filter(|(k, _)| k != "le").collect();
            let entry = hist_series.entry(format!("{family}{series:?}")).or_default();
            if name.ends_with("_bucket") {
                let le = labels.iter().find(|(k, _)| k == "le").ok_or_else(|| at("a bucket without le".into()))?;
                if le.1 == "+Inf" {
                    entry.0 = true;
                } else {
                    le.1.parse::<f64>().map_err(|_| at(format!("le {:?} is not a number", le.1)))?;
                }
            } else if name.ends_with("_sum") {
                entry.1 = true;
            } else if name.ends_with("_count") {
                entry.2 = true;
            } else {
                return Err(at(format!("{name} in histogram {family}")));
            }
        }
    }
    for (series, (inf, sum, count)) in hist_series {
        if !(inf && sum && count) {
            return Err(format!("histogram {series}: +Inf bucket {inf}, _sum {sum}, _count {count}"));
        }
    }
    if types.is_empty() {
        return Err("no TYPE line at all".into());
    }
    Ok(())
}

/// Starts the block of `name`, which must not have been seen before.
fn open_family(name: &str, current: &mut Option<String>, finished: &mut HashSet<String>) -> Result<(), String> {
    if current.as_deref() == Some(name) {
        return Ok(());
    }
    if let Some(done) = current.take() {
        finished.insert(done);
    }
    if finished.contains(name) {
        return Err(format!("{name} appears in two separate blocks"));
    }
    *current = Some(name.to_string());
    Ok(())
}

/// The family a sample belongs to: itself, or for `x_bucket`, `x_sum`,
/// `x_count` a histogram or summary `x`.
fn family_of(sample: &str, types: &HashMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix)
            && matches!(types.get(base).map(String::as_str), Some("histogram" | "summary"))
        {
            return base.to_string();
        }
    }
    sample.to_string()
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok { Ok(()) } else { Err(format!("invalid metric name {name:?}")) }
}

/// A sample line: its name, its labels and its value (as written).
type Sample = (String, Vec<(String, String)>, String);

/// `name{label="value",...} value [timestamp]`, with 0.0.4's escapes in
/// label values (`\\`, `\"`, `\n`).
fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..end];
    check_metric_name(name)?;
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find('=').ok_or("a label without =")?;
            let key = &r[..eq];
            let mut kc = key.chars();
            if !(kc.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && kc.all(|c| c.is_ascii_alphanumeric() || c == '_')) {
                return Err(format!("invalid label name {key:?}"));
            }
            r = r[eq + 1..].strip_prefix('"').ok_or("a label value without quotes")?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("invalid escape {other:?} in a label value")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value".into()),
                }
            };
            if labels.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(format!("label {key} twice"));
            }
            labels.push((key.to_string(), value));
            r = &r[close + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
        rest = r;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("a sample without a value")?.to_string();
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("timestamp {ts:?} is not an integer"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields (exemplars are OpenMetrics only)".into());
    }
    Ok((name.to_string(), labels, value))
}

/// The checker itself refuses what `promtool check metrics` refuses.
#[test]
fn should_refuse_what_promtool_refuses() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
    assert_eq!(check_prometheus_text(ok), Ok(()));
    for bad in [
        "# TYPE b info\nb_info{v=\"1\"} 1\n",
        "# TYPE a counter\na_total 1\n",
        "# TYPE a_total counter\na_total 1\n# EOF\n",
        "# TYPE a_seconds gauge\n# UNIT a_seconds seconds\na_seconds 1\n",
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"2\"} 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 3\nh_count 2\n",
        "# TYPE a gauge\na{x=\"\\q\"} 1\n",
        "# TYPE a gauge\na 1 # {trace_id=\"1\"} 1\n",
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",
    ] {
        assert!(check_prometheus_text(bad).is_err(), "accepted {bad:?}");
    }
}

/// `--property message-id=...` works like `message_id`: every property can
/// be spelled with dashes, like the CLI's flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_accept_dashed_property_names_in_warrenctl() {
    let b = TestBroker::start().await.unwrap();
    let ok = |args: &[&str]| {
        let out = b.warrenctl(args).unwrap();
        assert!(out.ok(), "warrenctl {args:?}: {out:?}");
        out.stdout
    };
    ok(&["queue", "declare", "q", "--arg", "x-deduplication-window=60000"]);
    let published = ok(&[
        "publish",
        "--routing-key",
        "q",
        "--property",
        "message-id=m-1",
        "--property",
        "content-type=application/json",
        "--property",
        "content-encoding=identity",
        "--property",
        "correlation-id=c-1",
        "--property",
        "reply-to=replies",
        "--property",
        "user-id=alice",
        "--property",
        "app-id=tour",
        "--property",
        "delivery-mode=2",
        "--property",
        "type=order",
        "{}",
    ]);
    assert!(published.contains("routed"), "{published}");
    // The message id is the deduplication key: the same id again is a duplicate.
    let again = ok(&["publish", "--routing-key", "q", "--property", "message_id=m-1", "{}"]);
    assert!(again.to_lowercase().contains("duplicate"), "{again}");

    let out = ok(&["get", "--queue", "q", "--ack", "--output", "json"]);
    let got: Json = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let d = got.as_array().map_or(&got, |a| &a[0]);
    let p = &d["properties"];
    let expected = [
        ("message_id", "m-1"),
        ("content_type", "application/json"),
        ("content_encoding", "identity"),
        ("correlation_id", "c-1"),
        ("reply_to", "replies"),
        ("user_id", "alice"),
        ("app_id", "tour"),
        ("type", "order"),
    ];
    for (k, v) in expected {
        assert_eq!(p[k], v, "{k} in {d}");
    }
    assert_eq!(p["persistent"], true, "{d}");

    // Unknown names are still refused, by the name given.
    let out = b.warrenctl(&["publish", "--routing-key", "q", "--property", "colour-code=red", "x"]).unwrap();
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("colour-code"), "{}", out.stderr);
}
