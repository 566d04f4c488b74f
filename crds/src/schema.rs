//! Schema helpers shared by the CRD types: CEL rules written into
//! `x-kubernetes-validations`, and the free-form `arguments` map.
//!
//! Transition rules for optional fields are placed on the parent object (the
//! `spec`), never on the field itself: the API server evaluates a rule on a
//! field only when both the old and the new object have it, so a rule on the
//! field would let a user add or remove an immutable optional field.

use schemars::{Schema, SchemaGenerator, json_schema};
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

/// Schema of a free-form `arguments` map: string keys, values of any JSON
/// type (string, integer, boolean, number, list, map), as AMQP field tables
/// allow. Bounded in size.
pub fn arguments_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_ARGUMENTS,
        "additionalProperties": { "x-kubernetes-preserve-unknown-fields": true },
    })
}

/// A free-form value in an `arguments` map. Serializes as plain JSON.
pub type ArgumentValue = Value;
