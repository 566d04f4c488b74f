//! Dead-lettering, the pure part: what a message looks like after it dies
//! in a queue (RabbitMQ's `x-death` history), and when re-routing it would
//! loop.
//!
//! `x-death` is a list of tables, most recent first, one per (queue,
//! reason): `queue`, `reason`, `count`, `time` (seconds since the epoch),
//! `exchange`, `routing-keys`, and `original-expiration` when the message
//! had a per-message TTL. A death for a (queue, reason) already in the list
//! increments that entry's count and moves it to the front.
//! `x-first-death-{queue,reason,exchange}` are set once,
//! `x-last-death-{queue,reason,exchange}` every time.

use std::collections::BTreeMap;

use warren_client::proto::value::Kind;
use warren_client::proto::{Value, ValueList, ValueMap};

use super::state::DeathReason;
use crate::model::MessageData;

pub const X_DEATH: &str = "x-death";

fn string(v: &str) -> Value {
    Value { kind: Some(Kind::String(v.to_string())) }
}

fn int(v: i64) -> Value {
    Value { kind: Some(Kind::Int(v)) }
}

fn field<'a>(entry: &'a BTreeMap<String, Value>, name: &str) -> Option<&'a str> {
    match entry.get(name).and_then(|v| v.kind.as_ref()) {
        Some(Kind::String(s)) => Some(s),
        _ => None,
    }
}

/// The `x-death` entries of a message, as tables.
pub fn deaths(data: &MessageData) -> Vec<BTreeMap<String, Value>> {
    match data.properties.headers.get(X_DEATH).and_then(|v| v.kind.as_ref()) {
        Some(Kind::List(ValueList { values })) => values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::Map(ValueMap { fields })) => Some(fields.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The message as it leaves `queue` for `reason`: death history updated,
/// per-message TTL removed (kept as `original-expiration`), addressed to the
/// dead-letter exchange with the dead-letter routing key (or its own).
pub fn dead_lettered(data: &MessageData, queue: &str, reason: DeathReason, now_ms: u64, dlx: &str, dlrk: Option<&str>) -> MessageData {
    let mut out = data.clone();
    let mut history = deaths(data);
    let original_expiration = out.properties.expiration_ms.take();
    let time = int((now_ms / 1000) as i64);
    match history.iter().position(|e| field(e, "queue") == Some(queue) && field(e, "reason") == Some(reason.as_str())) {
        Some(pos) => {
            let mut entry = history.remove(pos);
            // The history comes from the message's headers, which a client
            // may have set to anything: a count that is not a positive
            // integer starts again, one at its maximum stays there.
            let count = match entry.get("count").and_then(|v| v.kind.as_ref()) {
                Some(Kind::Int(n)) => (*n).max(0),
                _ => 0,
            };
            entry.insert("count".into(), int(count.saturating_add(1)));
            entry.insert("time".into(), time);
            history.insert(0, entry);
        }
        None => {
            let mut entry = BTreeMap::from([
                ("queue".to_string(), string(queue)),
                ("reason".to_string(), string(reason.as_str())),
                ("count".to_string(), int(1)),
                ("time".to_string(), time),
                ("exchange".to_string(), string(&data.exchange)),
                ("routing-keys".to_string(), Value { kind: Some(Kind::List(ValueList { values: vec![string(&data.routing_key)] })) }),
            ]);
            if let Some(ms) = original_expiration {
                entry.insert("original-expiration".into(), string(&ms.to_string()));
            }
            history.insert(0, entry);
        }
    }
    let headers = &mut out.properties.headers;
    let values = history.into_iter().map(|fields| Value { kind: Some(Kind::Map(ValueMap { fields })) }).collect();
    headers.insert(X_DEATH.into(), Value { kind: Some(Kind::List(ValueList { values })) });
    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), string(reason.as_str()));
        headers.insert("x-first-death-queue".into(), string(queue));
        headers.insert("x-first-death-exchange".into(), string(&data.exchange));
    }
    headers.insert("x-last-death-reason".into(), string(reason.as_str()));
    headers.insert("x-last-death-queue".into(), string(queue));
    headers.insert("x-last-death-exchange".into(), string(&data.exchange));
    out.routing_key = dlrk.map_or_else(|| data.routing_key.clone(), str::to_string);
    out.exchange = dlx.to_string();
    out
}

/// Whether dead-lettering the message into `target` closes a cycle: it
/// already died in `target` and nothing in its history was a rejection by
/// a consumer (a deliberate retry loop). Such a message is dropped for that
/// target, as RabbitMQ does.
pub fn is_cycle(data: &MessageData, target: &str) -> bool {
    let history = deaths(data);
    history.iter().any(|e| field(e, "queue") == Some(target)) && !history.iter().any(|e| field(e, "reason") == Some("rejected"))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use warren_client::proto::Properties;

    use super::*;

    fn msg() -> MessageData {
        MessageData {
            exchange: "orders".into(),
            routing_key: "eu.new".into(),
            properties: Properties { expiration_ms: Some(5000), persistent: true, ..Default::default() },
            body: Bytes::from_static(b"x"),
        }
    }

    fn count(e: &BTreeMap<String, Value>) -> i64 {
        match e.get("count").and_then(|v| v.kind.as_ref()) {
            Some(Kind::Int(n)) => *n,
            _ => -1,
        }
    }

    #[test]
    fn should_record_the_death_and_readdress_the_message() {
        let d = dead_lettered(&msg(), "work", DeathReason::Expired, 90_000, "dlx", None);
        assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("dlx", "eu.new"));
        assert_eq!(d.properties.expiration_ms, None, "per-message TTL is not carried on");
        assert!(d.properties.persistent);
        let h = deaths(&d);
        assert_eq!(h.len(), 1);
        assert_eq!(field(&h[0], "queue"), Some("work"));
        assert_eq!(field(&h[0], "reason"), Some("expired"));
        assert_eq!(field(&h[0], "exchange"), Some("orders"));
        assert_eq!(field(&h[0], "original-expiration"), Some("5000"));
        assert_eq!(count(&h[0]), 1);
        assert_eq!(h[0].get("time"), Some(&int(90)));
        assert_eq!(d.properties.headers.get("x-first-death-reason"), Some(&string("expired")));
        let d2 = dead_lettered(&msg(), "work", DeathReason::Rejected, 0, "dlx", Some("retry"));
        assert_eq!(d2.routing_key, "retry");
    }

    #[test]
    fn should_count_repeated_deaths_and_keep_most_recent_first() {
        let d = dead_lettered(&msg(), "work", DeathReason::Rejected, 1000, "dlx", None);
        let d = dead_lettered(&d, "retry", DeathReason::Expired, 2000, "", Some("work"));
        let d = dead_lettered(&d, "work", DeathReason::Rejected, 3000, "dlx", None);
        let h = deaths(&d);
        let summary: Vec<(Option<&str>, i64)> = h.iter().map(|e| (field(e, "queue"), count(e))).collect();
        assert_eq!(summary, vec![(Some("work"), 2), (Some("retry"), 1)]);
        assert_eq!(d.properties.headers.get("x-first-death-queue"), Some(&string("work")));
        assert_eq!(d.properties.headers.get("x-last-death-reason"), Some(&string("rejected")));
    }

    fn death(queue: &str, reason: &str, count: Value) -> Value {
        let fields =
            BTreeMap::from([("queue".to_string(), string(queue)), ("reason".to_string(), string(reason)), ("count".to_string(), count)]);
        Value { kind: Some(Kind::Map(ValueMap { fields })) }
    }

    fn with_x_death(value: Value) -> MessageData {
        let mut m = msg();
        m.properties.headers.insert(X_DEATH.into(), value);
        m
    }

    #[test]
    fn should_saturate_a_client_supplied_death_count() {
        let list = |values: Vec<Value>| Value { kind: Some(Kind::List(ValueList { values })) };
        let m = with_x_death(list(vec![death("work", "rejected", int(i64::MAX))]));
        let d = dead_lettered(&m, "work", DeathReason::Rejected, 1000, "dlx", None);
        assert_eq!(count(&deaths(&d)[0]), i64::MAX, "saturates instead of overflowing");
        let d = dead_lettered(&d, "work", DeathReason::Rejected, 2000, "dlx", None);
        assert_eq!(count(&deaths(&d)[0]), i64::MAX);
        // Negative and non-integer counts start again at one.
        for odd in [int(i64::MIN), int(-1), string("many"), Value { kind: Some(Kind::Double(f64::NAN)) }, Value { kind: None }] {
            let m = with_x_death(list(vec![death("work", "rejected", odd.clone())]));
            let d = dead_lettered(&m, "work", DeathReason::Rejected, 1000, "dlx", None);
            assert_eq!(count(&deaths(&d)[0]), 1, "{odd:?}");
        }
    }

    #[test]
    fn should_replace_an_x_death_header_of_any_other_shape() {
        let odd_values = [
            string("not a list"),
            int(7),
            Value { kind: Some(Kind::Bytes(vec![0xff; 3].into())) },
            Value { kind: Some(Kind::List(ValueList { values: vec![int(1), string("x"), Value { kind: None }] })) },
            Value { kind: Some(Kind::Map(ValueMap { fields: BTreeMap::from([("count".to_string(), int(i64::MAX))]) })) },
            Value { kind: None },
        ];
        for odd in odd_values {
            let m = with_x_death(odd.clone());
            let d = dead_lettered(&m, "work", DeathReason::Expired, 1000, "dlx", None);
            let h = deaths(&d);
            assert_eq!(h.len(), 1, "{odd:?}");
            assert_eq!((field(&h[0], "queue"), count(&h[0])), (Some("work"), 1), "{odd:?}");
            assert!(!is_cycle(&m, "work"), "{odd:?}");
        }
        // Entries whose queue or reason is not a string are kept as they are
        // but never match.
        let weird = Value {
            kind: Some(Kind::List(ValueList {
                values: vec![Value {
                    kind: Some(Kind::Map(ValueMap {
                        fields: BTreeMap::from([("queue".to_string(), int(1)), ("count".to_string(), int(i64::MAX))]),
                    })),
                }],
            })),
        };
        let d = dead_lettered(&with_x_death(weird), "work", DeathReason::Expired, 1000, "dlx", None);
        assert_eq!(deaths(&d).len(), 2);
        assert_eq!(count(&deaths(&d)[0]), 1);
    }

    proptest::proptest! {
        /// Whatever headers a client sent, dead-lettering records one more
        /// death and never panics; the history stays bounded by (queue,
        /// reason) pairs plus what the client sent.
        #[test]
        fn should_dead_letter_whatever_headers_the_message_has(
            headers in proptest::collection::btree_map(
                proptest::prop_oneof![proptest::strategy::Just(X_DEATH.to_string()), "[a-z-]{0,8}"],
                crate::model::args::tests::arb_value(),
                0..4,
            ),
            now in proptest::prelude::any::<u64>(),
            reason in proptest::sample::select(vec![DeathReason::Rejected, DeathReason::Expired, DeathReason::Maxlen, DeathReason::DeliveryLimit]),
        ) {
            let mut m = msg();
            m.properties.headers = headers;
            let before = deaths(&m).len();
            let d = dead_lettered(&m, "work", reason, now, "dlx", None);
            let after = deaths(&d);
            proptest::prop_assert!(after.len() == before || after.len() == before + 1);
            proptest::prop_assert_eq!(field(&after[0], "queue"), Some("work"));
            proptest::prop_assert!(count(&after[0]) >= 1);
            let again = dead_lettered(&d, "work", reason, now, "dlx", None);
            proptest::prop_assert_eq!(deaths(&again).len(), after.len());
            proptest::prop_assert!(count(&deaths(&again)[0]) >= count(&after[0]));
            let _ = is_cycle(&again, "work");
        }
    }

    #[test]
    fn should_detect_automatic_cycles_but_allow_rejection_retries() {
        let expired = dead_lettered(&msg(), "a", DeathReason::Expired, 0, "x", None);
        assert!(!is_cycle(&expired, "b"));
        assert!(is_cycle(&expired, "a"), "a -> a by expiry loops forever");
        let twice = dead_lettered(&expired, "b", DeathReason::Expired, 0, "x", None);
        assert!(is_cycle(&twice, "a"));
        let rejected = dead_lettered(&msg(), "a", DeathReason::Rejected, 0, "x", None);
        assert!(!is_cycle(&rejected, "a"), "a consumer's rejection breaks the cycle");
    }
}
