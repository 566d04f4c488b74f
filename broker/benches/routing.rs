//! Topic routing against 10,000 bindings: the publish path's cost of
//! matching one routing key, through the broker's own `RoutingTable`.
//!
//! `cargo bench -p warren-broker --bench routing`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use warren_broker::model::ExchangeKind;
use warren_broker::routing::{Dest, ExchangeRoute, RouteBinding, RoutingTable};

const BINDINGS: usize = 10_000;

/// 10,000 bindings over 1,000 queues, shaped like real topic keys:
/// `<region>.<service>.<event>` with exact words, `*` and `#` mixed.
fn topic_bindings() -> Vec<RouteBinding> {
    let regions = ["eu", "us", "ap", "sa", "af", "me", "cn", "in", "jp", "au"];
    (0..BINDINGS)
        .map(|i| {
            let region = regions[i % regions.len()];
            let service = format!("svc{}", i % 500);
            let key = match i % 10 {
                0 => format!("{region}.{service}.#"),
                1 => format!("*.{service}.created"),
                2 => format!("{region}.*.deleted"),
                3 => format!("#.{service}.audit"),
                _ => format!("{region}.{service}.event{}", i % 7),
            };
            RouteBinding { routing_key: key, arguments: BTreeMap::new(), dest: Dest::Queue(format!("q{}", i % 1000).into()) }
        })
        .collect()
}

fn table(name: &str, kind: ExchangeKind, bindings: &[RouteBinding]) -> RoutingTable {
    let mut t = RoutingTable::default();
    t.exchanges.insert(name.into(), Arc::new(ExchangeRoute::new(name.into(), kind, false, None, bindings)));
    t
}

fn bench_topic(c: &mut Criterion) {
    let bindings = topic_bindings();
    let t = table("topic", ExchangeKind::Topic, &bindings);
    let headers = BTreeMap::new();
    let keys = ["eu.svc42.event0", "us.svc7.created", "ap.svc499.deleted", "cn.svc3.x.y.audit", "nomatch.nothing.here"];
    for k in keys {
        let n = t.route("topic", k, &headers).queues.len();
        eprintln!("routing key {k:?} matches {n} queue(s)");
    }
    let mut g = c.benchmark_group("topic_10k_bindings");
    g.throughput(Throughput::Elements(1));
    for k in keys {
        g.bench_function(k, |b| b.iter(|| black_box(t.route("topic", black_box(k), &headers))));
    }
    g.finish();
    c.bench_function("topic_10k_bindings/build", |b| b.iter(|| black_box(table("topic", ExchangeKind::Topic, &bindings))));
}

fn bench_direct_and_fanout(c: &mut Criterion) {
    let headers = BTreeMap::new();
    let direct: Vec<RouteBinding> = (0..BINDINGS)
        .map(|i| RouteBinding { routing_key: format!("key{i}"), arguments: BTreeMap::new(), dest: Dest::Queue(format!("q{i}").into()) })
        .collect();
    let t = table("direct", ExchangeKind::Direct, &direct);
    c.bench_function("direct_10k_bindings/hit", |b| b.iter(|| black_box(t.route("direct", black_box("key4242"), &headers))));
    let fanout: Vec<RouteBinding> = direct.into_iter().take(10).collect();
    let t = table("fanout", ExchangeKind::Fanout, &fanout);
    c.bench_function("fanout_10_queues", |b| b.iter(|| black_box(t.route("fanout", black_box(""), &headers))));
}

criterion_group!(benches, bench_topic, bench_direct_and_fanout);
criterion_main!(benches);
