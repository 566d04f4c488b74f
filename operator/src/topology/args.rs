//! Spec → gRPC request conversion: the typed CRD fields become the broker's
//! RabbitMQ-named arguments. Pure functions, unit-tested.

use std::collections::BTreeMap;

use warren_client::proto::{
    self, BindRequest, DeclareExchangeRequest, DeclareQueueRequest, DestinationKind, ExchangeType, UnbindRequest, value::Kind,
};
use warren_crds::schema::KnownArgument;
use warren_crds::v1alpha1::{self as v1, Binding, BoundBinding, Exchange, Queue};

use crate::error::{Error, Result};

/// Most bytes in a broker-side name.
pub const MAX_NAME_BYTES: usize = 255;

fn int(v: i64) -> proto::Value {
    proto::Value { kind: Some(Kind::Int(v)) }
}

fn string(v: &str) -> proto::Value {
    proto::Value { kind: Some(Kind::String(v.to_string())) }
}

fn boolean(v: bool) -> proto::Value {
    proto::Value { kind: Some(Kind::Bool(v)) }
}

/// A free-form JSON argument value as an AMQP field value: integers stay
/// integers, other numbers are doubles, lists and maps nest. `null` has no
/// AMQP equivalent and is refused.
pub fn to_value(v: &serde_json::Value, path: &str) -> Result<proto::Value> {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => return Err(Error::InvalidSpec(format!("{path} is null; give a value or remove the argument"))),
        J::Bool(b) => Kind::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Kind::Int(i),
            (None, Some(f)) if n.is_f64() => Kind::Double(f),
            _ => return Err(Error::InvalidSpec(format!("{path} = {n} does not fit a 64-bit integer"))),
        },
        J::String(s) => Kind::String(s.clone()),
        J::Array(items) => Kind::List(proto::ValueList {
            values: items.iter().enumerate().map(|(i, item)| to_value(item, &format!("{path}[{i}]"))).collect::<Result<_>>()?,
        }),
        J::Object(map) => Kind::Map(proto::ValueMap {
            fields: map.iter().map(|(k, item)| Ok((k.clone(), to_value(item, &format!("{path}.{k}"))?))).collect::<Result<_>>()?,
        }),
    };
    Ok(proto::Value { kind: Some(kind) })
}

fn free_form(args: &BTreeMap<String, serde_json::Value>, known: &[KnownArgument]) -> Result<BTreeMap<String, proto::Value>> {
    let mut out = BTreeMap::new();
    for (key, value) in args {
        // The schema refuses these too; this covers objects stored before it did.
        if let Some(k) = known.iter().find(|k| k.name == key) {
            return Err(Error::InvalidSpec(format!("spec.arguments sets {key}, which has a typed field: set spec.{} instead", k.field)));
        }
        out.insert(key.clone(), to_value(value, &format!("spec.arguments.{key}"))?);
    }
    Ok(out)
}

fn check_name(name: &str, field: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidSpec(format!("{field} is empty")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidSpec(format!("{field} is {} bytes long; the broker allows at most {MAX_NAME_BYTES}", name.len())));
    }
    if name.starts_with("amq.") {
        return Err(Error::InvalidSpec(format!("{field} {name:?} starts with 'amq.', which is reserved")));
    }
    Ok(())
}

/// The arguments map of a Queue: typed fields first, then the free-form
/// ones.
pub fn queue_arguments(spec: &v1::QueueSpec) -> Result<BTreeMap<String, proto::Value>> {
    let mut args = free_form(&spec.arguments, v1::KNOWN_QUEUE_ARGUMENTS)?;
    args.insert("x-queue-type".into(), string(spec.type_.as_str()));
    let ints = [
        ("x-message-ttl", spec.message_ttl_ms),
        ("x-expires", spec.expires_ms),
        ("x-max-length", spec.max_length),
        ("x-max-length-bytes", spec.max_length_bytes),
        ("x-max-priority", spec.max_priority.map(i64::from)),
        ("x-delivery-limit", spec.delivery_limit),
        ("x-deduplication-window", spec.deduplication_window_ms),
    ];
    for (key, value) in ints {
        if let Some(value) = value {
            args.insert(key.into(), int(value));
        }
    }
    if let Some(overflow) = spec.overflow {
        args.insert("x-overflow".into(), string(overflow.as_str()));
    }
    if let Some(dlx) = &spec.dead_letter_exchange {
        args.insert("x-dead-letter-exchange".into(), string(dlx));
    }
    if let Some(key) = &spec.dead_letter_routing_key {
        args.insert("x-dead-letter-routing-key".into(), string(key));
    }
    if spec.single_active_consumer {
        args.insert("x-single-active-consumer".into(), boolean(true));
    }
    Ok(args)
}

/// The DeclareQueue request for a Queue (not passive).
pub fn declare_queue(q: &Queue) -> Result<DeclareQueueRequest> {
    let name = q.broker_name();
    check_name(&name, "the queue name (spec.name or metadata.name)")?;
    Ok(DeclareQueueRequest {
        name,
        durable: q.spec.durable,
        exclusive: false,
        auto_delete: q.spec.auto_delete,
        arguments: queue_arguments(&q.spec)?,
        passive: false,
    })
}

/// The DeclareExchange request for an Exchange (not passive).
pub fn declare_exchange(x: &Exchange) -> Result<DeclareExchangeRequest> {
    let name = x.broker_name();
    check_name(&name, "the exchange name (spec.name or metadata.name)")?;
    let mut arguments = free_form(&x.spec.arguments, v1::KNOWN_EXCHANGE_ARGUMENTS)?;
    if let Some(ae) = &x.spec.alternate_exchange {
        arguments.insert("alternate-exchange".into(), string(ae));
    }
    let type_ = match x.spec.type_ {
        v1::ExchangeType::Direct => ExchangeType::Direct,
        v1::ExchangeType::Fanout => ExchangeType::Fanout,
        v1::ExchangeType::Topic => ExchangeType::Topic,
        v1::ExchangeType::Headers => ExchangeType::Headers,
    };
    Ok(DeclareExchangeRequest {
        name,
        r#type: type_ as i32,
        durable: x.spec.durable,
        auto_delete: x.spec.auto_delete,
        internal: x.spec.internal,
        arguments,
        passive: false,
    })
}

/// The Bind request for a Binding.
pub fn bind(b: &Binding) -> Result<BindRequest> {
    bind_request(&BoundBinding::from_spec(&b.spec))
}

/// The Bind request for a binding as recorded (spec or status).
pub fn bind_request(b: &BoundBinding) -> Result<BindRequest> {
    if b.source.is_empty() {
        return Err(Error::InvalidSpec("spec.source is empty; the default exchange cannot be bound".into()));
    }
    if b.source.len() > MAX_NAME_BYTES || b.destination.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidSpec(format!("spec.source and spec.destination may have at most {MAX_NAME_BYTES} bytes")));
    }
    let mut arguments = BTreeMap::new();
    for (key, value) in &b.arguments {
        arguments.insert(key.clone(), to_value(value, &format!("spec.arguments.{key}"))?);
    }
    let kind = match b.destination_kind {
        v1::DestinationKind::Queue => DestinationKind::Queue,
        v1::DestinationKind::Exchange => DestinationKind::Exchange,
    };
    Ok(BindRequest {
        source: b.source.clone(),
        destination: b.destination.clone(),
        destination_kind: kind as i32,
        routing_key: b.routing_key.clone(),
        arguments,
    })
}

/// The Unbind request matching a recorded binding.
pub fn unbind(b: &BoundBinding) -> Result<UnbindRequest> {
    let r = bind_request(b)?;
    Ok(UnbindRequest {
        source: r.source,
        destination: r.destination,
        destination_kind: r.destination_kind,
        routing_key: r.routing_key,
        arguments: r.arguments,
    })
}

/// The proto destination kind of a Binding.
pub fn destination_kind(b: &Binding) -> DestinationKind {
    match b.spec.destination_kind {
        v1::DestinationKind::Queue => DestinationKind::Queue,
        v1::DestinationKind::Exchange => DestinationKind::Exchange,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn queue(spec: serde_json::Value) -> Queue {
        serde_json::from_value(json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": "orders", "namespace": "ns"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn should_map_every_typed_field_to_its_rabbitmq_argument() {
        let q = queue(json!({
            "brokerRef": {"name": "w"}, "messageTtlMs": 60000, "expiresMs": 3600000, "maxLength": 10,
            "maxLengthBytes": 1024, "overflow": "reject-publish-dlx", "deadLetterExchange": "",
            "deadLetterRoutingKey": "dead", "maxPriority": 9, "deliveryLimit": 3,
            "deduplicationWindowMs": 5000, "singleActiveConsumer": true, "arguments": {"x-custom": [1, "a"]}
        }));
        let req = declare_queue(&q).unwrap();
        assert_eq!(req.name, "orders");
        assert!(req.durable && !req.exclusive && !req.auto_delete && !req.passive);
        let a = &req.arguments;
        assert_eq!(a["x-queue-type"], string("classic"));
        assert_eq!(a["x-message-ttl"], int(60000));
        assert_eq!(a["x-expires"], int(3600000));
        assert_eq!(a["x-max-length"], int(10));
        assert_eq!(a["x-max-length-bytes"], int(1024));
        assert_eq!(a["x-overflow"], string("reject-publish-dlx"));
        assert_eq!(a["x-dead-letter-exchange"], string(""));
        assert_eq!(a["x-dead-letter-routing-key"], string("dead"));
        assert_eq!(a["x-max-priority"], int(9));
        assert_eq!(a["x-delivery-limit"], int(3));
        assert_eq!(a["x-deduplication-window"], int(5000));
        assert_eq!(a["x-single-active-consumer"], boolean(true));
        assert_eq!(a["x-custom"], proto::Value { kind: Some(Kind::List(proto::ValueList { values: vec![int(1), string("a")] })) });
        assert_eq!(a.len(), 13);
    }

    #[test]
    fn should_send_only_the_queue_type_for_a_plain_queue() {
        let req = declare_queue(&queue(json!({"brokerRef": {"name": "w"}, "name": "jobs"}))).unwrap();
        assert_eq!(req.name, "jobs");
        assert_eq!(req.arguments.keys().collect::<Vec<_>>(), ["x-queue-type"]);
    }

    #[test]
    fn should_declare_a_quorum_queue_with_its_type() {
        let q = queue(json!({"brokerRef": {"name": "w"}, "type": "quorum", "deliveryLimit": 5,
                             "arguments": {"x-quorum-initial-group-size": 5}}));
        let req = declare_queue(&q).unwrap();
        assert!(req.durable && !req.auto_delete);
        assert_eq!(req.arguments["x-queue-type"], string("quorum"));
        assert_eq!(req.arguments["x-quorum-initial-group-size"], int(5));
    }

    #[test]
    fn should_refuse_what_the_broker_would_refuse_with_the_field_named() {
        let e = declare_queue(&queue(json!({"brokerRef": {"name": "w"}, "arguments": {"x-max-length": 5}}))).unwrap_err();
        assert!(e.to_string().contains("spec.arguments sets x-max-length, which has a typed field: set spec.maxLength instead"), "{e}");
        let e = declare_queue(&queue(json!({"brokerRef": {"name": "w"}, "arguments": {"x-a": null}}))).unwrap_err();
        assert!(e.to_string().contains("spec.arguments.x-a is null"), "{e}");
        let e = declare_queue(&queue(json!({"brokerRef": {"name": "w"}, "name": "é".repeat(200)}))).unwrap_err();
        assert!(e.to_string().contains("400 bytes long"), "{e}");
        let e = declare_queue(&queue(json!({"brokerRef": {"name": "w"}, "name": "amq.x"}))).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn should_build_exchange_and_binding_requests() {
        let x: Exchange = serde_json::from_value(json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Exchange", "metadata": {"name": "orders", "namespace": "ns"},
            "spec": {"brokerRef": {"name": "w"}, "type": "topic", "alternateExchange": "ae", "arguments": {"x-rate": 1.5}}
        }))
        .unwrap();
        let req = declare_exchange(&x).unwrap();
        assert_eq!(req.r#type, ExchangeType::Topic as i32);
        assert!(req.durable);
        assert_eq!(req.arguments["alternate-exchange"], string("ae"));
        assert_eq!(req.arguments["x-rate"], proto::Value { kind: Some(Kind::Double(1.5)) });

        let b: Binding = serde_json::from_value(json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Binding", "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"brokerRef": {"name": "w"}, "source": "orders", "destination": "audit",
                     "destinationKind": "Exchange", "routingKey": "order.*"}
        }))
        .unwrap();
        let req = bind(&b).unwrap();
        assert_eq!(req.destination_kind, DestinationKind::Exchange as i32);
        assert_eq!(req.routing_key, "order.*");
        let un = unbind(&BoundBinding::from_spec(&b.spec)).unwrap();
        assert_eq!((un.source.as_str(), un.destination.as_str()), ("orders", "audit"));
    }
}
