//! Queue and exchange arguments: parsed once at declare time into typed
//! values; an invalid value is rejected with `INVALID_ARGUMENT` naming the
//! argument. Names and units follow RabbitMQ where RabbitMQ has the feature.

use std::collections::BTreeMap;

use warren_client::proto::Value;
use warren_client::proto::value::Kind;

use crate::error::{Error, Result};

/// What happens when a queue is over `x-max-length` / `x-max-length-bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (and dead-letter) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse new messages: the publisher's confirm says rejected.
    RejectPublish,
    /// Refuse and dead-letter new messages.
    RejectPublishDlx,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// Most replicas of a quorum queue.
pub const MAX_GROUP_SIZE: u32 = 9;

/// Typed queue arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueArgs {
    /// `x-message-ttl`: milliseconds a message may stay in the queue.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires`: milliseconds of disuse after which the queue is deleted.
    pub expires_ms: Option<u64>,
    /// `x-max-length`: most ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: most ready body bytes.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority`: 1..=255; absent means priorities are ignored.
    pub max_priority: Option<u8>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-delivery-limit`: deliveries after which a message is dead-lettered.
    pub delivery_limit: Option<u32>,
    /// `x-deduplication-window`: milliseconds a message id is remembered.
    pub deduplication_window_ms: Option<u64>,
    /// `x-queue-type: quorum`: replicated with Raft (in a cluster).
    pub quorum: bool,
    /// `x-quorum-initial-group-size`: replicas of a new quorum queue.
    pub quorum_initial_group_size: Option<u32>,
}

/// Queue arguments Warren understands; others are stored and ignored, as
/// RabbitMQ does.
pub const KNOWN_QUEUE_ARGS: [&str; 13] = [
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-priority",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-deduplication-window",
    "x-queue-type",
    "x-quorum-initial-group-size",
];

fn describe(v: &Value) -> String {
    match &v.kind {
        None => "an empty value".into(),
        Some(Kind::String(s)) => format!("string {s:?}"),
        Some(Kind::Int(i)) => format!("integer {i}"),
        Some(Kind::Bool(b)) => format!("boolean {b}"),
        Some(Kind::Double(d)) => format!("double {d}"),
        Some(Kind::Bytes(_)) => "bytes".into(),
        Some(Kind::List(_)) => "a list".into(),
        Some(Kind::Map(_)) => "a map".into(),
    }
}

fn int_arg(name: &str, v: &Value, min: i64, max: i64, unit: &str) -> Result<i64> {
    match &v.kind {
        Some(Kind::Int(i)) if (min..=max).contains(i) => Ok(*i),
        Some(Kind::Int(i)) => Err(Error::InvalidArgument(format!("argument '{name}' must be between {min} and {max}{unit}, got {i}"))),
        _ => Err(Error::InvalidArgument(format!("argument '{name}' must be an integer{unit}, got {}", describe(v)))),
    }
}

fn string_arg(name: &str, v: &Value) -> Result<String> {
    match &v.kind {
        Some(Kind::String(s)) => Ok(s.clone()),
        _ => Err(Error::InvalidArgument(format!("argument '{name}' must be a string, got {}", describe(v)))),
    }
}

fn bool_arg(name: &str, v: &Value) -> Result<bool> {
    match &v.kind {
        Some(Kind::Bool(b)) => Ok(*b),
        _ => Err(Error::InvalidArgument(format!("argument '{name}' must be a boolean, got {}", describe(v)))),
    }
}

impl QueueArgs {
    pub fn parse(args: &BTreeMap<String, Value>) -> Result<QueueArgs> {
        let mut out = QueueArgs::default();
        const MS: &str = " (milliseconds)";
        for (name, v) in args {
            match name.as_str() {
                "x-message-ttl" => out.message_ttl_ms = Some(int_arg(name, v, 0, i64::MAX, MS)? as u64),
                "x-expires" => out.expires_ms = Some(int_arg(name, v, 1, i64::MAX, MS)? as u64),
                "x-max-length" => out.max_length = Some(int_arg(name, v, 0, i64::MAX, "")? as u64),
                "x-max-length-bytes" => out.max_length_bytes = Some(int_arg(name, v, 0, i64::MAX, " (bytes)")? as u64),
                "x-overflow" => {
                    out.overflow = match string_arg(name, v)?.as_str() {
                        "drop-head" => Overflow::DropHead,
                        "reject-publish" => Overflow::RejectPublish,
                        "reject-publish-dlx" => Overflow::RejectPublishDlx,
                        other => {
                            return Err(Error::InvalidArgument(format!(
                                "argument 'x-overflow' must be drop-head, reject-publish or reject-publish-dlx, got {other:?}"
                            )));
                        }
                    }
                }
                "x-dead-letter-exchange" => {
                    let s = string_arg(name, v)?;
                    super::validate_name("dead-letter exchange", &s, true)?;
                    out.dead_letter_exchange = Some(s);
                }
                "x-dead-letter-routing-key" => {
                    let s = string_arg(name, v)?;
                    super::validate_routing_key(&s)?;
                    out.dead_letter_routing_key = Some(s);
                }
                "x-max-priority" => out.max_priority = Some(int_arg(name, v, 1, 255, "")? as u8),
                "x-single-active-consumer" => out.single_active_consumer = bool_arg(name, v)?,
                "x-delivery-limit" => out.delivery_limit = Some(int_arg(name, v, 0, u32::MAX as i64, "")? as u32),
                "x-deduplication-window" => out.deduplication_window_ms = Some(int_arg(name, v, 1, i64::MAX, MS)? as u64),
                "x-queue-type" => {
                    out.quorum = match string_arg(name, v)?.as_str() {
                        "classic" => false,
                        "quorum" => true,
                        other => {
                            return Err(Error::InvalidArgument(format!(
                                "argument 'x-queue-type' must be \"classic\" or \"quorum\", got {other:?}"
                            )));
                        }
                    }
                }
                "x-quorum-initial-group-size" => {
                    out.quorum_initial_group_size = Some(int_arg(name, v, 1, MAX_GROUP_SIZE as i64, " (replicas)")? as u32)
                }
                _ => {}
            }
        }
        if out.quorum_initial_group_size.is_some() && !out.quorum {
            return Err(Error::InvalidArgument("argument 'x-quorum-initial-group-size' needs 'x-queue-type' \"quorum\"".into()));
        }
        if out.dead_letter_routing_key.is_some() && out.dead_letter_exchange.is_none() {
            return Err(Error::InvalidArgument("argument 'x-dead-letter-routing-key' needs 'x-dead-letter-exchange'".into()));
        }
        Ok(out)
    }
}

/// Typed exchange arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExchangeArgs {
    /// `alternate-exchange`: where messages this exchange cannot route go.
    pub alternate_exchange: Option<String>,
}

impl ExchangeArgs {
    pub fn parse(args: &BTreeMap<String, Value>) -> Result<ExchangeArgs> {
        let mut out = ExchangeArgs::default();
        for (name, v) in args {
            if name == "alternate-exchange" {
                let s = string_arg(name, v)?;
                super::validate_name("alternate exchange", &s, false)?;
                out.alternate_exchange = Some(s);
            }
        }
        Ok(out)
    }
}

/// Checks a headers-exchange binding's `x-match`.
pub fn validate_binding_args(args: &BTreeMap<String, Value>) -> Result<()> {
    if let Some(v) = args.get("x-match") {
        let s = string_arg("x-match", v)?;
        if !crate::routing::X_MATCH_VALUES.contains(&s.as_str()) {
            return Err(Error::InvalidArgument(format!("argument 'x-match' must be one of all, any, all-with-x, any-with-x; got {s:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Any value a client can send, nested a few levels, with the integers
    /// and strings that sit at the edges of what the parsers accept.
    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            prop_oneof![
                -3i64..300,
                prop::sample::select(vec![i64::MIN, -1, 0, 1, 255, 256, u32::MAX as i64, u32::MAX as i64 + 1, i64::MAX]),
                any::<i64>()
            ]
            .prop_map(|i| Value { kind: Some(Kind::Int(i)) }),
            prop_oneof![
                prop::sample::select(vec!["", "classic", "quorum", "drop-head", "reject-publish", "reject-publish-dlx", "all", "any"])
                    .prop_map(String::from),
                Just("x".repeat(256)),
                any::<String>(),
            ]
            .prop_map(|s| Value { kind: Some(Kind::String(s)) }),
            any::<bool>().prop_map(|b| Value { kind: Some(Kind::Bool(b)) }),
            any::<f64>().prop_map(|d| Value { kind: Some(Kind::Double(d)) }),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(|b| Value { kind: Some(Kind::Bytes(b.into())) }),
            Just(Value { kind: None }),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|values| Value { kind: Some(Kind::List(warren_client::proto::ValueList { values })) }),
                prop::collection::btree_map("[a-z-]{0,6}", inner, 0..4)
                    .prop_map(|fields| Value { kind: Some(Kind::Map(warren_client::proto::ValueMap { fields })) }),
            ]
        })
    }

    /// Argument tables: known names (and a few others) with any value.
    pub(crate) fn arb_args() -> impl Strategy<Value = BTreeMap<String, Value>> {
        let name = prop_oneof![
            prop::sample::select(KNOWN_QUEUE_ARGS.to_vec()).prop_map(String::from),
            prop::sample::select(vec!["alternate-exchange", "x-match", "x-custom", ""]).prop_map(String::from),
        ];
        prop::collection::btree_map(name, arb_value(), 0..6)
    }

    proptest! {
        /// The parsers take anything a client sends: a typed value or an
        /// INVALID_ARGUMENT naming an argument, never a panic.
        #[test]
        fn should_parse_or_refuse_any_arguments(args in arb_args()) {
            match QueueArgs::parse(&args) {
                Ok(a) => {
                    prop_assert!(a.max_priority.is_none_or(|p| p >= 1));
                    prop_assert!(a.expires_ms.is_none_or(|e| e >= 1));
                    prop_assert!(a.deduplication_window_ms.is_none_or(|w| w >= 1));
                }
                Err(Error::InvalidArgument(msg)) => prop_assert!(msg.contains("argument") || msg.contains("name") || msg.contains("routing key"), "{}", msg),
                Err(e) => prop_assert!(false, "not INVALID_ARGUMENT: {e:?}"),
            }
            match ExchangeArgs::parse(&args) {
                Ok(_) => {}
                Err(Error::InvalidArgument(_)) => {}
                Err(e) => prop_assert!(false, "not INVALID_ARGUMENT: {e:?}"),
            }
            match validate_binding_args(&args) {
                Ok(()) => {}
                Err(Error::InvalidArgument(msg)) => prop_assert!(msg.contains("x-match"), "{}", msg),
                Err(e) => prop_assert!(false, "not INVALID_ARGUMENT: {e:?}"),
            }
        }
    }

    fn int(i: i64) -> Value {
        Value { kind: Some(Kind::Int(i)) }
    }
    fn s(v: &str) -> Value {
        Value { kind: Some(Kind::String(v.into())) }
    }
    fn args(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn should_parse_known_arguments() {
        let a = QueueArgs::parse(&args(&[
            ("x-message-ttl", int(5000)),
            ("x-max-length", int(10)),
            ("x-overflow", s("reject-publish")),
            ("x-dead-letter-exchange", s("dlx")),
            ("x-max-priority", int(10)),
            ("x-single-active-consumer", Value { kind: Some(Kind::Bool(true)) }),
            ("x-custom", s("kept")),
        ]))
        .unwrap();
        assert_eq!(a.message_ttl_ms, Some(5000));
        assert_eq!(a.max_length, Some(10));
        assert_eq!(a.overflow, Overflow::RejectPublish);
        assert_eq!(a.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(a.max_priority, Some(10));
        assert!(a.single_active_consumer);
    }

    #[test]
    fn should_name_the_argument_in_errors() {
        for (name, v, needle) in [
            ("x-message-ttl", s("5s"), "must be an integer"),
            ("x-message-ttl", int(-1), "between 0"),
            ("x-max-priority", int(256), "between 1 and 255"),
            ("x-max-priority", int(0), "between 1 and 255"),
            ("x-expires", int(0), "between 1"),
            ("x-overflow", s("drop-tail"), "drop-head, reject-publish"),
            ("x-single-active-consumer", int(1), "must be a boolean"),
            ("x-queue-type", s("stream"), "classic"),
        ] {
            let e = QueueArgs::parse(&args(&[(name, v)])).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
        }
    }

    #[test]
    fn should_require_exchange_for_dead_letter_routing_key() {
        let e = QueueArgs::parse(&args(&[("x-dead-letter-routing-key", s("k"))])).unwrap_err();
        assert!(e.to_string().contains("x-dead-letter-exchange"));
    }

    #[test]
    fn should_validate_x_match() {
        assert!(validate_binding_args(&args(&[("x-match", s("any"))])).is_ok());
        assert!(validate_binding_args(&args(&[("x-match", s("some"))])).is_err());
        assert!(validate_binding_args(&args(&[("x-match", int(1))])).is_err());
    }
}
