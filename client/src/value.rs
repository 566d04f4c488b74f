//! Typed values (AMQP field-table style): conversions from Rust values, from
//! command-line text, and to JSON and display text.

use crate::proto::value::Kind;
use crate::proto::{Value, ValueList, ValueMap};

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value { kind: Some(Kind::Int(v)) }
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::from(v as i64)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::from(v as i64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value { kind: Some(Kind::Bool(v)) }
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value { kind: Some(Kind::Double(v)) }
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value { kind: Some(Kind::String(v.to_string())) }
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value { kind: Some(Kind::String(v)) }
    }
}

impl From<Vec<Value>> for Value {
    fn from(values: Vec<Value>) -> Value {
        Value { kind: Some(Kind::List(ValueList { values })) }
    }
}

/// A value typed from command-line text: integers become integers,
/// `true` / `false` booleans, anything else a string. Double quotes force a
/// string: `"123"` is the string 123.
pub fn parse_cli_value(text: &str) -> Value {
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'))
        && text.len() >= 2
    {
        return Value::from(inner);
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::from(i);
    }
    match text {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => Value::from(text),
    }
}

/// Reading values back.
pub trait ValueExt {
    fn as_str(&self) -> Option<&str>;
    fn as_i64(&self) -> Option<i64>;
    /// The value as JSON (bytes as an array of numbers).
    fn to_json(&self) -> serde_json::Value;
    /// The value as short display text.
    fn display(&self) -> String;
}

impl ValueExt for Value {
    fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Some(Kind::String(s)) => Some(s),
            _ => None,
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match &self.kind {
            Some(Kind::Int(i)) => Some(*i),
            _ => None,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.kind {
            None => J::Null,
            Some(Kind::String(s)) => J::String(s.clone()),
            Some(Kind::Int(i)) => J::from(*i),
            Some(Kind::Bool(b)) => J::Bool(*b),
            Some(Kind::Double(d)) => J::from(*d),
            Some(Kind::Bytes(b)) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
            Some(Kind::List(ValueList { values })) => J::Array(values.iter().map(ValueExt::to_json).collect()),
            Some(Kind::Map(ValueMap { fields })) => {
                let mut keys: Vec<&String> = fields.keys().collect();
                keys.sort();
                J::Object(keys.into_iter().map(|k| (k.clone(), fields[k].to_json())).collect())
            }
        }
    }

    fn display(&self) -> String {
        match &self.kind {
            Some(Kind::String(s)) => s.clone(),
            _ => self.to_json().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_type_cli_values() {
        assert_eq!(parse_cli_value("5000"), Value::from(5000i64));
        assert_eq!(parse_cli_value("-3"), Value::from(-3i64));
        assert_eq!(parse_cli_value("true"), Value::from(true));
        assert_eq!(parse_cli_value("dlx"), Value::from("dlx"));
        assert_eq!(parse_cli_value("5s"), Value::from("5s"));
        assert_eq!(parse_cli_value(""), Value::from(""));
        assert_eq!(parse_cli_value("\"123\""), Value::from("123"));
        assert_eq!(parse_cli_value("\"true\""), Value::from("true"));
        assert_eq!(parse_cli_value("\""), Value::from("\""));
    }

    #[test]
    fn should_render_json() {
        let v = Value::from(vec![Value::from(1i64), Value::from("a"), Value::from(true)]);
        assert_eq!(v.to_json().to_string(), r#"[1,"a",true]"#);
        assert_eq!(Value::from("x").display(), "x");
        assert_eq!(Value::from(7i64).display(), "7");
    }
}
