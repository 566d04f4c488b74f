//! Routing: from (exchange, routing key, headers) to the set of queues.
//!
//! The broker publishes an immutable [`RoutingTable`] snapshot after every
//! topology change and swaps it atomically; the publish path reads it
//! without locks. Exchanges are `Arc`s so a change rebuilds only the
//! exchange it touches.

pub mod topic;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use warren_client::proto::Value;
use warren_client::proto::value::Kind;

use crate::model::ExchangeKind;
use topic::TopicIndex;

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

/// A binding as the router sees it.
#[derive(Clone, Debug)]
pub struct RouteBinding {
    pub routing_key: String,
    pub arguments: BTreeMap<String, Value>,
    pub dest: Dest,
}

/// One exchange, compiled for matching.
#[derive(Debug)]
pub struct ExchangeRoute {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub internal: bool,
    pub alternate: Option<Arc<str>>,
    matcher: Matcher,
}

#[derive(Debug)]
enum Matcher {
    Direct(HashMap<String, Vec<Dest>>),
    Fanout(Vec<Dest>),
    Topic(TopicIndex<Dest>),
    Headers(Vec<(HeadersMatch, Dest)>),
}

impl ExchangeRoute {
    pub fn new(name: Arc<str>, kind: ExchangeKind, internal: bool, alternate: Option<Arc<str>>, bindings: &[RouteBinding]) -> Self {
        let matcher = match kind {
            ExchangeKind::Direct => {
                let mut map: HashMap<String, Vec<Dest>> = HashMap::new();
                for b in bindings {
                    map.entry(b.routing_key.clone()).or_default().push(b.dest.clone());
                }
                Matcher::Direct(map)
            }
            ExchangeKind::Fanout => Matcher::Fanout(bindings.iter().map(|b| b.dest.clone()).collect()),
            ExchangeKind::Topic => {
                let mut idx = TopicIndex::new();
                for b in bindings {
                    idx.insert(&b.routing_key, b.dest.clone());
                }
                Matcher::Topic(idx)
            }
            ExchangeKind::Headers => Matcher::Headers(bindings.iter().map(|b| (HeadersMatch::new(&b.arguments), b.dest.clone())).collect()),
        };
        ExchangeRoute { name, kind, internal, alternate, matcher }
    }

    fn for_each_dest<'a>(&'a self, routing_key: &str, headers: &BTreeMap<String, Value>, f: &mut impl FnMut(&'a Dest)) {
        match &self.matcher {
            Matcher::Direct(map) => {
                if let Some(dests) = map.get(routing_key) {
                    dests.iter().for_each(&mut *f);
                }
            }
            Matcher::Fanout(dests) => dests.iter().for_each(&mut *f),
            Matcher::Topic(idx) => idx.for_each_match(routing_key, f),
            Matcher::Headers(list) => {
                for (m, d) in list {
                    if m.matches(headers) {
                        f(d);
                    }
                }
            }
        }
    }
}

/// A headers-exchange binding: `x-match` and the headers to compare.
#[derive(Debug, Clone)]
pub struct HeadersMatch {
    any: bool,
    fields: Vec<(String, Value)>,
}

impl HeadersMatch {
    pub fn new(args: &BTreeMap<String, Value>) -> Self {
        let mode = match args.get("x-match").and_then(|v| v.kind.as_ref()) {
            Some(Kind::String(s)) => s.as_str(),
            _ => "all",
        };
        let any = mode.starts_with("any");
        let with_x = mode.ends_with("-with-x");
        let mut fields: Vec<(String, Value)> = args
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.starts_with("x-")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        HeadersMatch { any, fields }
    }

    pub fn matches(&self, headers: &BTreeMap<String, Value>) -> bool {
        let eq = |(k, v): &(String, Value)| headers.get(k) == Some(v);
        if self.any { self.fields.iter().any(eq) } else { self.fields.iter().all(eq) }
    }
}

/// Valid `x-match` values.
pub const X_MATCH_VALUES: [&str; 4] = ["all", "any", "all-with-x", "any-with-x"];

/// The outcome of routing one message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routed {
    /// Queue names, each once, in a stable order.
    pub queues: Vec<Arc<str>>,
    /// Whether an alternate exchange was used.
    pub via_alternate: bool,
}

/// An immutable snapshot of every exchange.
#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    pub exchanges: imbl::HashMap<Arc<str>, Arc<ExchangeRoute>>,
}

impl RoutingTable {
    pub fn exchange(&self, name: &str) -> Option<&Arc<ExchangeRoute>> {
        self.exchanges.get(name)
    }

    /// Routes through `exchange`, following exchange-to-exchange bindings and
    /// alternate exchanges. The default exchange (`""`) is handled by the
    /// caller (it routes to the queue named by the routing key).
    pub fn route(&self, exchange: &str, routing_key: &str, headers: &BTreeMap<String, Value>) -> Routed {
        let mut out = Routed::default();
        let mut seen_queues: HashSet<Arc<str>> = HashSet::new();
        let mut tried: HashSet<&str> = HashSet::new();
        let mut name = exchange;
        while tried.insert(name) {
            let Some(ex) = self.exchanges.get(name) else { break };
            self.route_bindings(ex, routing_key, headers, &mut seen_queues, &mut out.queues);
            if !out.queues.is_empty() {
                break;
            }
            match &ex.alternate {
                Some(alt) => {
                    name = alt;
                    out.via_alternate = true;
                }
                None => break,
            }
        }
        if out.queues.is_empty() {
            out.via_alternate = false;
        }
        out
    }

    fn route_bindings<'a>(
        &'a self,
        start: &'a ExchangeRoute,
        routing_key: &str,
        headers: &BTreeMap<String, Value>,
        seen_queues: &mut HashSet<Arc<str>>,
        queues: &mut Vec<Arc<str>>,
    ) {
        let mut visited: HashSet<&'a str> = HashSet::from([&*start.name]);
        let mut stack: Vec<&'a ExchangeRoute> = vec![start];
        // Each exchange is visited once: cycles of exchange-to-exchange
        // bindings end here.
        while let Some(ex) = stack.pop() {
            ex.for_each_dest(routing_key, headers, &mut |d| match d {
                Dest::Queue(q) => {
                    if seen_queues.insert(q.clone()) {
                        queues.push(q.clone());
                    }
                }
                Dest::Exchange(x) => {
                    if !visited.contains(&**x)
                        && let Some(next) = self.exchanges.get(&**x)
                    {
                        visited.insert(&next.name);
                        stack.push(next);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value { kind: Some(Kind::String(v.into())) }
    }

    fn i(v: i64) -> Value {
        Value { kind: Some(Kind::Int(v)) }
    }

    fn q(name: &str, key: &str) -> RouteBinding {
        RouteBinding { routing_key: key.into(), arguments: BTreeMap::new(), dest: Dest::Queue(name.into()) }
    }

    fn x(name: &str, key: &str) -> RouteBinding {
        RouteBinding { routing_key: key.into(), arguments: BTreeMap::new(), dest: Dest::Exchange(name.into()) }
    }

    fn table(exs: Vec<(&str, ExchangeKind, Option<&str>, Vec<RouteBinding>)>) -> RoutingTable {
        let mut t = RoutingTable::default();
        for (name, kind, alt, bindings) in exs {
            t.exchanges.insert(name.into(), Arc::new(ExchangeRoute::new(name.into(), kind, false, alt.map(Into::into), &bindings)));
        }
        t
    }

    fn names(r: &Routed) -> Vec<&str> {
        let mut v: Vec<&str> = r.queues.iter().map(|q| &**q).collect();
        v.sort();
        v
    }

    #[test]
    fn should_route_direct_by_exact_key() {
        let t = table(vec![("d", ExchangeKind::Direct, None, vec![q("a", "k1"), q("b", "k2"), q("c", "k1")])]);
        assert_eq!(names(&t.route("d", "k1", &BTreeMap::new())), vec!["a", "c"]);
        assert!(t.route("d", "k3", &BTreeMap::new()).queues.is_empty());
    }

    #[test]
    fn should_route_fanout_to_all_once() {
        let t = table(vec![("f", ExchangeKind::Fanout, None, vec![q("a", "x"), q("b", "y"), q("a", "z")])]);
        assert_eq!(names(&t.route("f", "anything", &BTreeMap::new())), vec!["a", "b"]);
    }

    #[test]
    fn should_follow_exchange_to_exchange_bindings_and_cut_cycles() {
        let t = table(vec![
            ("t", ExchangeKind::Topic, None, vec![x("f", "orders.#"), q("audit", "#")]),
            ("f", ExchangeKind::Fanout, None, vec![q("a", ""), q("b", ""), x("t", "")]),
        ]);
        assert_eq!(names(&t.route("t", "orders.eu", &BTreeMap::new())), vec!["a", "audit", "b"]);
        assert_eq!(names(&t.route("t", "users", &BTreeMap::new())), vec!["audit"]);
    }

    #[test]
    fn should_use_alternate_exchange_only_when_unroutable() {
        let t = table(vec![
            ("d", ExchangeKind::Direct, Some("ae"), vec![q("a", "k")]),
            ("ae", ExchangeKind::Fanout, None, vec![q("unrouted", "")]),
        ]);
        let r = t.route("d", "k", &BTreeMap::new());
        assert_eq!(names(&r), vec!["a"]);
        assert!(!r.via_alternate);
        let r = t.route("d", "other", &BTreeMap::new());
        assert_eq!(names(&r), vec!["unrouted"]);
        assert!(r.via_alternate);
    }

    #[test]
    fn should_stop_on_alternate_exchange_cycles() {
        let t = table(vec![("a", ExchangeKind::Direct, Some("b"), vec![]), ("b", ExchangeKind::Direct, Some("a"), vec![])]);
        let r = t.route("a", "k", &BTreeMap::new());
        assert!(r.queues.is_empty());
        assert!(!r.via_alternate);
    }

    #[test]
    fn should_match_headers_all_and_any() {
        let mut all = BTreeMap::new();
        all.insert("x-match".to_string(), s("all"));
        all.insert("format".to_string(), s("pdf"));
        all.insert("type".to_string(), s("report"));
        let mut any = all.clone();
        any.insert("x-match".to_string(), s("any"));
        let m_all = HeadersMatch::new(&all);
        let m_any = HeadersMatch::new(&any);
        let mut h = BTreeMap::new();
        h.insert("format".to_string(), s("pdf"));
        assert!(!m_all.matches(&h));
        assert!(m_any.matches(&h));
        h.insert("type".to_string(), s("report"));
        assert!(m_all.matches(&h));
        h.insert("type".to_string(), i(1));
        assert!(!m_all.matches(&h));
        // No fields: `all` matches everything, `any` nothing.
        assert!(HeadersMatch::new(&BTreeMap::new()).matches(&h));
        let mut only_any = BTreeMap::new();
        only_any.insert("x-match".to_string(), s("any"));
        assert!(!HeadersMatch::new(&only_any).matches(&h));
    }

    #[test]
    fn should_ignore_x_headers_unless_with_x() {
        let mut args = BTreeMap::new();
        args.insert("x-match".to_string(), s("all"));
        args.insert("x-tenant".to_string(), s("t1"));
        let mut h = BTreeMap::new();
        h.insert("x-tenant".to_string(), s("t2"));
        assert!(HeadersMatch::new(&args).matches(&h));
        args.insert("x-match".to_string(), s("all-with-x"));
        assert!(!HeadersMatch::new(&args).matches(&h));
    }
}
