//! A focused OpenAPI v3 validator for the subset of the schema language the
//! Warren CRDs use, applied the way the API server does (with
//! `kubectl --validate=strict`): types, enums, ranges, lengths, patterns,
//! required fields, unknown fields (rejected unless
//! `x-kubernetes-preserve-unknown-fields`), `x-kubernetes-int-or-string`,
//! `nullable`, plus the CEL rules evaluated with kube-cel.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The openAPIV3Schema of the CRD for `kind`.
pub fn schema_for_kind(kind: &str) -> Value {
    for crd in warren_crds::crds() {
        if crd.spec.names.kind == kind {
            let v = &crd.spec.versions[0];
            let s = v.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
            return serde_json::to_value(s).unwrap();
        }
    }
    panic!("no Warren CRD of kind {kind}")
}

/// Validates a manifest (any Warren kind) against its CRD: structure first,
/// then the CEL rules (creation rules, or transition rules with `old`).
pub fn validate_object(obj: &Value, old: Option<&Value>) -> Result<(), Vec<String>> {
    let kind = obj["kind"].as_str().ok_or_else(|| vec!["no kind".to_string()])?;
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    if api_version != "warren.dev/v1alpha1" {
        return Err(vec![format!("apiVersion {api_version:?} is not warren.dev/v1alpha1")]);
    }
    let schema = schema_for_kind(kind);
    let mut errors = Vec::new();
    let mut body = obj.clone();
    if let Some(map) = body.as_object_mut() {
        // apiVersion, kind and metadata are checked by the API server itself.
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(md) = obj.get("metadata")
            && md.get("name").and_then(Value::as_str).unwrap_or("").is_empty()
        {
            errors.push("metadata.name: required".into());
        }
    }
    let mut schema_no_md = schema.clone();
    schema_no_md["properties"].as_object_mut().unwrap().remove("metadata");
    validate(&schema_no_md, &body, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    kube_cel::Validator::new()
        .validate(&schema, obj, old)
        .map_err(|e| e.as_slice().iter().map(|e| format!("{}: {}", e.field_path, e.message)).collect())
}

fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let here = if path.is_empty() { "<root>".to_string() } else { path.to_string() };
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            errors.push(format!("{here}: must not be null"));
        }
        return;
    }
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true);
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true)
        && !(value.is_i64() || value.is_u64() || value.is_string())
    {
        errors.push(format!("{here}: must be an integer or a string"));
        return;
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{here}: must be of type {ty}, got {value}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{here}: unsupported value {value}; supported values: {allowed:?}"));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            errors.push(format!("{here}: must be greater than or equal to {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            errors.push(format!("{here}: must be less than or equal to {max}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            errors.push(format!("{here}: should be at least {min} chars long"));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            errors.push(format!("{here}: may not be more than {max} chars long"));
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str)
            && !regex::Regex::new(p).unwrap().is_match(s)
        {
            errors.push(format!("{here}: should match '{p}'"));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && items.len() as u64 > max
        {
            errors.push(format!("{here}: must have at most {max} items"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(map) = value.as_object() {
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
            && map.len() as u64 > max
        {
            errors.push(format!("{here}: must have at most {max} properties"));
        }
        for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let req = req.as_str().unwrap_or_default();
            if !map.contains_key(req) {
                errors.push(format!("{}: Required value", join(path, req)));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (key, v) in map {
            let sub = join(path, key);
            match (props.and_then(|p| p.get(key)), additional) {
                (Some(s), _) => validate(s, v, &sub, errors),
                (None, Some(s)) if s.is_object() => validate(s, v, &sub, errors),
                (None, _) if preserve => {}
                (None, _) => errors.push(format!("{sub}: unknown field \"{key}\"")),
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// The names of the properties of `schema` that CEL can see, the way the
/// API server builds a rule's type (`SchemaDeclType`): a property is visible
/// only when its schema has a `type` (or is `x-kubernetes-int-or-string`),
/// and a map or list only when its values or items are visible themselves.
/// Free-form values (`x-kubernetes-preserve-unknown-fields` without a type)
/// make the whole field disappear.
pub fn cel_visible_properties(schema: &Value) -> Vec<String> {
    fn visible(s: &Value) -> bool {
        if s.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
            return true;
        }
        match s.get("type").and_then(Value::as_str) {
            Some("array") => s.get("items").is_some_and(visible),
            Some("object") => match s.get("additionalProperties") {
                Some(a) if a.is_object() => visible(a),
                _ => true,
            },
            Some(_) => true,
            None => false,
        }
    }
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| props.iter().filter(|(_, s)| visible(s)).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default()
}

/// Every schema node carrying `x-kubernetes-validations`, with its path.
pub fn nodes_with_rules(schema: &Value, path: &str, out: &mut Vec<(String, Value)>) {
    if schema.get("x-kubernetes-validations").is_some() {
        out.push((path.to_string(), schema.clone()));
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            nodes_with_rules(v, &format!("{path}.{k}"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(v) = schema.get(key).filter(|v| v.is_object()) {
            nodes_with_rules(v, &format!("{path}[]"), out);
        }
    }
}

/// Every YAML document in the files of `dir` (recursively) whose
/// apiVersion is `warren.dev/v1alpha1`, with the file it came from.
pub fn warren_documents(dir: &Path) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.extend(documents(&p).into_iter().map(|v| (p.clone(), v)));
            }
        }
    }
    out.retain(|(_, v)| v["apiVersion"].as_str().is_some_and(|a| a.starts_with("warren.dev/")));
    out
}

/// Every YAML document of a file, as JSON.
pub fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        if v.is_null() {
            continue;
        }
        out.push(serde_json::to_value(v).unwrap());
    }
    out
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}
