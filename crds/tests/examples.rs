//! Every manifest under `examples/` (and the chart's Broker template
//! defaults, rendered by `charts/check.sh`) validates against the generated
//! CRD schemas, and the validator really rejects bad manifests.
#![allow(clippy::unwrap_used)]

mod support;

#[test]
fn should_validate_every_example_against_the_generated_schemas() {
    let docs = support::warren_documents(&support::repo_root().join("examples"));
    let kinds: std::collections::BTreeSet<_> = docs.iter().map(|(_, d)| d["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["Binding", "Broker", "Exchange", "Permission", "Queue", "User"],
        "the examples cover every kind"
    );
    let mut failures = Vec::new();
    for (file, doc) in &docs {
        if let Err(errors) = support::validate_object(doc, None) {
            failures.push(format!("{}: {} {}:\n  {}", file.display(), doc["kind"], doc["metadata"]["name"], errors.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "invalid examples:\n{}", failures.join("\n"));
}

#[test]
fn should_reject_a_bad_example() {
    // The same example with a typo, a value out of range and a CEL violation.
    let text = std::fs::read_to_string(support::repo_root().join("examples/queue-with-dead-letter.yaml")).unwrap();
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
        docs.push(serde_json::to_value(v).unwrap());
    }
    let mut queue = docs.into_iter().find(|d| d["kind"] == "Queue").unwrap();
    support::validate_object(&queue, None).unwrap();

    queue["spec"]["maxPriorty"] = 10.into();
    let e = support::validate_object(&queue, None).unwrap_err().join("\n");
    assert!(e.contains("unknown field \"maxPriorty\""), "{e}");

    queue["spec"].as_object_mut().unwrap().remove("maxPriorty");
    queue["spec"]["messageTtlMs"] = (-1).into();
    let e = support::validate_object(&queue, None).unwrap_err().join("\n");
    assert!(e.contains("spec.messageTtlMs: must be greater than or equal to 0"), "{e}");

    queue["spec"]["messageTtlMs"] = 1000.into();
    queue["spec"]["arguments"] = serde_json::json!({"x-dead-letter-exchange": "elsewhere"});
    let e = support::validate_object(&queue, None).unwrap_err().join("\n");
    assert!(e.contains("set spec.deadLetterExchange instead"), "{e}");
}

#[test]
fn should_validate_the_charts_optional_broker_against_the_schema() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(support::repo_root().join("charts/warren/values.yaml")).unwrap()).unwrap();
    let values = serde_json::to_value(values).unwrap();
    let broker = serde_json::json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": values["broker"]["name"]},
        "spec": values["broker"]["spec"],
    });
    support::validate_object(&broker, None).unwrap();
}
