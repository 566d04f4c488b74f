//! Schema helpers shared by the CRD types: CEL rules written into
//! `x-kubernetes-validations`, and the free-form `arguments` map.
//!
//! Transition rules for optional fields are placed on the parent object (the
//! `spec`), never on the field itself: the API server evaluates a rule on a
//! field only when both the old and the new object have it, so a rule on the
//! field would let a user add or remove an immutable optional field.
//!
//! CEL only sees fields whose schema has a type. The values of a free-form
//! `arguments` map have none (any JSON value), so the API server drops the
//! whole map from the CEL type of its parent, and a rule that mentions
//! `self.arguments` fails to compile: the API server would refuse the CRD.
//! No rule may reference `arguments` (a test walks every rule to check that
//! each field it names is visible to CEL). Known argument names are refused
//! by declaring them as properties of the map that carry a rule of their
//! own; changes to the other arguments are reported by the operator.

use schemars::{Schema, SchemaGenerator};
use serde_json::{Value, json};

/// Maximum number of entries in a free-form `arguments` map. Bounded so the
/// API server's CEL cost estimate for the rules over the map stays small.
pub const MAX_ARGUMENTS: u32 = 32;

/// Appends CEL rules to a schema's `x-kubernetes-validations`.
pub fn push_rules(schema: &mut Schema, rules: impl IntoIterator<Item = Value>) {
    let obj = schema.ensure_object();
    let entry = obj.entry("x-kubernetes-validations").or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(list) = entry {
        list.extend(rules);
    }
}

/// A CEL rule with its message.
pub fn rule(rule: impl Into<String>, message: impl Into<String>) -> Value {
    json!({ "rule": rule.into(), "message": message.into() })
}

/// A transition rule on the parent object that refuses adding, removing or
/// changing the (possibly optional) field `field`. `why` finishes the
/// sentence "`field` is immutable: ...".
pub fn immutable(field: &str, why: &str) -> Value {
    json!({
        "rule": format!(
            "has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
        ),
        "message": format!("{field} is immutable: {why}"),
        "fieldPath": format!(".{field}"),
        "reason": "FieldValueForbidden",
    })
}

/// Transition rules making each of `fields` immutable (see [`immutable`]).
pub fn immutable_fields(fields: &[&str], why: &str) -> Vec<Value> {
    fields.iter().map(|f| immutable(f, why)).collect()
}

/// An argument name that has a typed field and must not appear in an
/// `arguments` map.
#[derive(Clone, Copy, Debug)]
pub struct KnownArgument {
    /// The argument, such as `x-message-ttl`.
    pub name: &'static str,
    /// The typed spec field to use instead, such as `messageTtlMs`.
    pub field: &'static str,
    /// Whether the broker takes a boolean (else an integer or a string).
    pub boolean: bool,
}

/// Schema of a free-form `arguments` map: string keys, values of any JSON
/// type (string, integer, boolean, number, list, map), as AMQP field tables
/// allow. Bounded in size. Each of `known` is declared as a property whose
/// rule always fails with a message naming the typed field to use, so the
/// API server refuses it at admission.
pub fn arguments_schema_refusing(known: &[KnownArgument]) -> Schema {
    let mut properties = serde_json::Map::new();
    for k in known {
        let message = format!("{} has a typed field: set spec.{} instead", k.name, k.field);
        let mut property = json!({
            "description": format!("Not allowed here: use spec.{}.", k.field),
            "x-kubernetes-validations": [{ "rule": "false", "message": message }],
        });
        if k.boolean {
            property["type"] = json!("boolean");
        } else {
            property["x-kubernetes-int-or-string"] = json!(true);
        }
        properties.insert(k.name.to_string(), property);
    }
    let mut schema = json!({
        "type": "object",
        "maxProperties": MAX_ARGUMENTS,
        "x-kubernetes-preserve-unknown-fields": true,
    });
    if !properties.is_empty() {
        schema["properties"] = Value::Object(properties);
    }
    Schema::try_from(schema).unwrap_or_default()
}

/// Schema of a free-form `arguments` map with no reserved names.
pub fn arguments_schema(_: &mut SchemaGenerator) -> Schema {
    arguments_schema_refusing(&[])
}

/// A free-form value in an `arguments` map. Serializes as plain JSON.
pub type ArgumentValue = Value;
