//! OpenTelemetry traces over OTLP/gRPC.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is
//! not `true`); the exporter reads the other standard `OTEL_EXPORTER_OTLP_*`
//! variables (headers, timeout, compression) and the SDK the `OTEL_BSP_*`,
//! `OTEL_TRACES_SAMPLER*`, `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` ones. When off, every hook here is one atomic
//! load that finds no tracer: no span is built, no header touched.
//!
//! Spans, and how they connect:
//! * `publish` (server kind): a message arriving from a publisher. Its
//!   parent is the W3C trace context in the message's `traceparent` (and
//!   `tracestate`) header when the producer sent one. The broker then writes
//!   the publish span's own context into those headers, so that the stored
//!   and delivered message carries it.
//! * `route` and `enqueue` (internal): children of `publish`, found through
//!   the same header; `enqueue` once per queue the message reaches.
//! * `deliver` (producer kind): a delivery to a consumer (or a Get). It
//!   starts a trace of its own with a *link* to the publish span: a message
//!   may wait for hours and be delivered many times, so the consumer side is
//!   not a child of the producer's request. A consumer's own span links to
//!   the producer's the same way, from the delivered `traceparent` header.
//! * `ack` / `nack` / `reject` (server kind): a settlement, linked to the
//!   `deliver` spans of the messages it settles.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Link, Span as _, SpanContext, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use parking_lot::Mutex;
use warren_client::proto::{self, Value, value::Kind};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Most deliveries a consume stream remembers for linking their
/// settlements; beyond it, settlements of older ones are not linked.
const MAX_PENDING_LINKS: usize = 65_536;

/// Most links one settlement span carries (an ack with `multiple`).
const MAX_LINKS_PER_SPAN: usize = 128;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether traces are exported.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// Flushes and stops the exporter when dropped.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last traces failed");
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Starts exporting traces if the environment asks for it. Must run inside
/// the Tokio runtime (the gRPC exporter's connection lives on it).
pub fn init(node_name: &str) -> anyhow::Result<Option<TelemetryGuard>> {
    if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        tracing::info!("OpenTelemetry is disabled (OTEL_SDK_DISABLED=true)");
        return Ok(None);
    }
    for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Ok(p) = std::env::var(var)
            && p != "grpc"
        {
            anyhow::bail!("{var}={p}: Warren exports traces over OTLP/gRPC only; set it to grpc or unset it");
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(KeyValue::new("service.instance.id", node_name.to_string()));
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("warren-broker");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build())
        .build();
    let tracer = provider.tracer("warren-broker");
    if TRACER.set(tracer).is_err() {
        anyhow::bail!("OpenTelemetry was already initialised in this process");
    }
    Ok(Some(TelemetryGuard { provider }))
}

// ------------------------------------------------------------ propagation

struct HeaderInjector<'a>(&'a mut BTreeMap<String, Value>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), Value { kind: Some(Kind::String(value)) });
    }
}

struct HeaderExtractor<'a>(&'a BTreeMap<String, Value>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.get(key)?.kind.as_ref()? {
            Kind::String(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The trace context a message's headers carry (an empty context when
/// none, or when it does not parse).
pub fn extract(headers: &BTreeMap<String, Value>) -> Context {
    if !headers.contains_key(TRACEPARENT) {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s span context into `headers` (`traceparent`, and
/// `tracestate` when not empty), replacing what was there.
pub fn inject(cx: &Context, headers: &mut BTreeMap<String, Value>) {
    headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

fn remote_span_context(headers: &BTreeMap<String, Value>) -> Option<SpanContext> {
    let cx = extract(headers);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

// ------------------------------------------------------------------ spans

/// Starts the `publish` span of a message that just arrived, as a child of
/// the context its headers carry, and puts the span's context in its
/// headers. `None` (and the message untouched) when traces are off.
pub fn publish_span(msg: &mut proto::Message) -> Option<Span> {
    TRACER.get().map(|t| publish_span_with(t, msg))
}

fn publish_span_with(tracer: &SdkTracer, msg: &mut proto::Message) -> Span {
    let props = msg.properties.get_or_insert_with(Default::default);
    let parent = extract(&props.headers);
    let mut attrs = vec![
        KeyValue::new("messaging.system", "warren"),
        KeyValue::new("messaging.operation.type", "publish"),
        KeyValue::new("messaging.destination.name", msg.exchange.clone()),
        KeyValue::new("messaging.rabbitmq.destination.routing_key", msg.routing_key.clone()),
        KeyValue::new("messaging.message.body.size", msg.body.len() as i64),
    ];
    if !props.message_id.is_empty() {
        attrs.push(KeyValue::new("messaging.message.id", props.message_id.clone()));
    }
    let span = tracer.span_builder("publish").with_kind(SpanKind::Server).with_attributes(attrs).start_with_context(tracer, &parent);
    let cx = Context::new().with_remote_span_context(span.span_context().clone());
    inject(&cx, &mut props.headers);
    span
}

fn child_span(tracer: &SdkTracer, name: &'static str, headers: &BTreeMap<String, Value>, attrs: Vec<KeyValue>) -> Span {
    let parent = extract(headers);
    tracer.span_builder(name).with_kind(SpanKind::Internal).with_attributes(attrs).start_with_context(tracer, &parent)
}

/// Starts the `route` span of a message (a child of its publish span).
pub fn route_span(msg: &proto::Message) -> Option<Span> {
    let tracer = TRACER.get()?;
    let headers = msg.properties.as_ref().map(|p| &p.headers)?;
    Some(child_span(tracer, "route", headers, vec![KeyValue::new("messaging.destination.name", msg.exchange.clone())]))
}

/// Ends a `route` span with the number of queues the message goes to.
pub fn end_route(span: Option<Span>, queues: usize) {
    if let Some(mut span) = span {
        span.set_attribute(KeyValue::new("warren.queues", queues as i64));
        span.end();
    }
}

/// Starts the `enqueue` span of a message entering `queue`.
pub fn enqueue_span(properties: &proto::Properties, queue: &str) -> Option<Span> {
    let tracer = TRACER.get()?;
    if !properties.headers.contains_key(TRACEPARENT) {
        return None;
    }
    Some(child_span(tracer, "enqueue", &properties.headers, vec![KeyValue::new("messaging.destination.name", queue.to_string())]))
}

fn deliver_span_with(tracer: &SdkTracer, queue: &str, d: &proto::Delivery) -> Span {
    let producer = d.properties.as_ref().and_then(|p| remote_span_context(&p.headers));
    let links = producer.map(|sc| vec![Link::with_context(sc)]).unwrap_or_default();
    let attrs = vec![
        KeyValue::new("messaging.system", "warren"),
        KeyValue::new("messaging.operation.type", "deliver"),
        KeyValue::new("messaging.destination.name", queue.to_string()),
        KeyValue::new("messaging.consumer.group.name", d.consumer_tag.clone()),
        KeyValue::new("messaging.rabbitmq.message.delivery_tag", d.delivery_tag as i64),
        KeyValue::new("warren.redelivered", d.redelivered),
        KeyValue::new("warren.delivery_count", i64::from(d.delivery_count)),
    ];
    tracer
        .span_builder("deliver")
        .with_kind(SpanKind::Producer)
        .with_attributes(attrs)
        .with_links(links)
        .start_with_context(tracer, &Context::new())
}

/// Spans of messages pulled with Get.
pub fn get_spans(queue: &str, deliveries: &[proto::Delivery]) {
    if let Some(tracer) = TRACER.get() {
        for d in deliveries {
            deliver_span_with(tracer, queue, d).end();
        }
    }
}

/// The traces of one consume stream: `deliver` spans, and settlement spans
/// linked to them.
pub struct ConsumeTraces {
    tracer: SdkTracer,
    queue: String,
    /// Deliver span contexts of unsettled deliveries, by delivery tag (none
    /// in auto-ack mode).
    pending: Option<Mutex<BTreeMap<u64, SpanContext>>>,
}

impl ConsumeTraces {
    /// `None` when traces are off.
    pub fn new(queue: &str, auto_ack: bool) -> Option<Arc<ConsumeTraces>> {
        let tracer = TRACER.get()?.clone();
        Some(Arc::new(ConsumeTraces::with_tracer(tracer, queue, auto_ack)))
    }

    fn with_tracer(tracer: SdkTracer, queue: &str, auto_ack: bool) -> ConsumeTraces {
        ConsumeTraces { tracer, queue: queue.to_string(), pending: (!auto_ack).then(|| Mutex::new(BTreeMap::new())) }
    }

    /// Records the `deliver` span of a delivery.
    pub fn deliver(&self, d: &proto::Delivery) {
        let span = deliver_span_with(&self.tracer, &self.queue, d);
        if let Some(pending) = &self.pending {
            let mut p = pending.lock();
            if p.len() < MAX_PENDING_LINKS {
                p.insert(d.delivery_tag, span.span_context().clone());
            }
        }
    }

    /// Records a settlement: `op` is `ack`, `nack` or `reject`.
    pub fn settle(&self, op: &'static str, tag: u64, multiple: bool, requeue: Option<bool>) {
        let settled: Vec<SpanContext> = match &self.pending {
            None => Vec::new(),
            Some(pending) => {
                let mut p = pending.lock();
                if multiple {
                    // u64::MAX with `multiple` settles everything.
                    let keep =
                        if tag == 0 { BTreeMap::new() } else { tag.checked_add(1).map_or_else(BTreeMap::new, |after| p.split_off(&after)) };
                    std::mem::replace(&mut *p, keep).into_values().collect()
                } else {
                    p.remove(&tag).into_iter().collect()
                }
            }
        };
        let mut attrs = vec![
            KeyValue::new("messaging.system", "warren"),
            KeyValue::new("messaging.operation.type", "settle"),
            KeyValue::new("messaging.operation.name", op),
            KeyValue::new("messaging.destination.name", self.queue.clone()),
            KeyValue::new("messaging.rabbitmq.message.delivery_tag", tag as i64),
            KeyValue::new("warren.multiple", multiple),
            KeyValue::new("warren.settled", settled.len() as i64),
        ];
        if let Some(requeue) = requeue {
            attrs.push(KeyValue::new("warren.requeue", requeue));
        }
        let links = settled.into_iter().take(MAX_LINKS_PER_SPAN).map(Link::with_context).collect();
        self.tracer
            .span_builder(op)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .with_links(links)
            .start_with_context(&self.tracer, &Context::new())
            .end();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    fn header(headers: &BTreeMap<String, Value>, key: &str) -> Option<String> {
        match headers.get(key)?.kind.as_ref()? {
            Kind::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn should_parent_publish_on_the_producer_and_link_deliver_and_ack_to_it() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let tracer = provider.tracer("test");

        let producer_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let producer_span = "00f067aa0ba902b7";
        let mut msg = proto::Message {
            exchange: "orders".into(),
            routing_key: "eu".into(),
            properties: Some(proto::Properties {
                headers: BTreeMap::from([
                    (TRACEPARENT.to_string(), Value { kind: Some(Kind::String(format!("00-{producer_trace}-{producer_span}-01"))) }),
                    (TRACESTATE.to_string(), Value { kind: Some(Kind::String("vendor=1".into())) }),
                    ("tenant".to_string(), Value { kind: Some(Kind::String("acme".into())) }),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let publish = publish_span_with(&tracer, &mut msg);
        let publish_cx = publish.span_context().clone();
        drop(publish);
        let headers = msg.properties.as_ref().unwrap().headers.clone();
        assert_eq!(
            header(&headers, TRACEPARENT).unwrap(),
            format!("00-{producer_trace}-{}-01", publish_cx.span_id()),
            "the stored message carries the publish span's context"
        );
        assert_eq!(header(&headers, TRACESTATE).as_deref(), Some("vendor=1"), "tracestate is carried along");
        assert_eq!(header(&headers, "tenant").as_deref(), Some("acme"), "other headers are untouched");

        // Route and enqueue are children of publish, found through the header.
        child_span(&tracer, "enqueue", &headers, Vec::new()).end();

        let traces = ConsumeTraces::with_tracer(tracer.clone(), "orders.eu", false);
        let delivery = proto::Delivery { delivery_tag: 7, properties: msg.properties.clone(), ..Default::default() };
        traces.deliver(&delivery);
        traces.deliver(&proto::Delivery { delivery_tag: 8, ..Default::default() });
        traces.settle("ack", 8, true, None);

        let spans = exporter.get_finished_spans().unwrap();
        let by_name = |n: &str| spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no {n} span in {spans:?}"));
        let publish = by_name("publish");
        assert_eq!(publish.span_context.trace_id(), TraceId::from_hex(producer_trace).unwrap());
        assert_eq!(publish.parent_span_id, SpanId::from_hex(producer_span).unwrap(), "publish is a child of the producer's span");
        let enqueue = by_name("enqueue");
        assert_eq!(enqueue.parent_span_id, publish.span_context.span_id());
        let deliver = spans.iter().find(|s| s.name == "deliver" && !s.links.links.is_empty()).unwrap();
        assert_ne!(deliver.span_context.trace_id(), publish.span_context.trace_id(), "deliver starts its own trace");
        let ids = |sc: &SpanContext| (sc.trace_id(), sc.span_id());
        assert_eq!(ids(&deliver.links.links[0].span_context), ids(&publish.span_context), "deliver links to publish");
        let ack = by_name("ack");
        assert_eq!(ack.links.links.len(), 2, "an ack with multiple links every delivery it settles");
        assert!(ack.links.links.iter().any(|l| ids(&l.span_context) == ids(&deliver.span_context)));
        assert!(traces.pending.as_ref().unwrap().lock().is_empty());
    }

    #[test]
    fn should_settle_everything_for_the_largest_tag_with_multiple() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let traces = ConsumeTraces::with_tracer(provider.tracer("test"), "q", false);
        traces.deliver(&proto::Delivery { delivery_tag: 1, ..Default::default() });
        traces.deliver(&proto::Delivery { delivery_tag: u64::MAX, ..Default::default() });
        traces.settle("ack", u64::MAX, true, None);
        assert!(traces.pending.as_ref().unwrap().lock().is_empty());
        let spans = exporter.get_finished_spans().unwrap();
        let ack = spans.iter().find(|s| s.name == "ack").unwrap();
        assert_eq!(ack.links.links.len(), 2);
    }

    #[test]
    fn should_start_a_new_trace_when_the_message_carries_none() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let tracer = provider.tracer("test");
        let mut msg = proto::Message::default();
        let span = publish_span_with(&tracer, &mut msg);
        let tp = header(&msg.properties.as_ref().unwrap().headers, TRACEPARENT).unwrap();
        assert_eq!(tp, format!("00-{}-{}-01", span.span_context().trace_id(), span.span_context().span_id()));
        drop(span);
        assert_eq!(exporter.get_finished_spans().unwrap()[0].parent_span_id, SpanId::INVALID);
        // Garbage in the header is ignored, not propagated.
        let mut headers = BTreeMap::from([(TRACEPARENT.to_string(), Value { kind: Some(Kind::String("nonsense".into())) })]);
        assert!(!extract(&headers).span().span_context().is_valid());
        inject(&Context::new(), &mut headers);
    }

    #[test]
    fn should_do_nothing_when_off() {
        if enabled() {
            return;
        }
        let mut msg = proto::Message::default();
        assert!(publish_span(&mut msg).is_none());
        assert!(msg.properties.is_none(), "the message is untouched");
        assert!(ConsumeTraces::new("q", false).is_none());
    }
}
